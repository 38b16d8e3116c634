"""Layers: the library never imports the command layer (``diffalign.commands``, ``cli.py``);
commands are thin wrappers over it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "diffalign"
_IMPORT = re.compile(r"^\s*(from\s+(\.+commands|diffalign\.commands)\b|import\s+diffalign"
                     r"\.commands\b)|[\"']diffalign\.commands", re.M)


def _library_files() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py"))
            if p.relative_to(SRC).parts[0] != "commands" and p.name != "cli.py"]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[:2] == ["diffalign", "commands"])))
"""


def test_importing_the_library_imports_no_command_module():
    modules = [_module(p) for p in _library_files()]
    assert "diffalign.pipeline.run" in modules and "diffalign.bench.cell" in modules
    res = subprocess.run([sys.executable, "-c", _CHECK, *modules], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"the library imported {res.stdout.strip()}"


def test_no_library_source_names_the_command_layer():
    # imports inside functions too, and module names handed to importlib
    bad = [str(p.relative_to(SRC)) for p in _library_files() if _IMPORT.search(p.read_text())]
    assert bad == []
