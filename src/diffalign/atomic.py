"""Atomic file output: write to a temporary file beside the target, then rename.

A killed process never leaves a half-written file under the final name. The file is flushed
to disk before the rename (and the directory entry after it), so a power cut does not leave
an empty or torn file under the final name either. Files get the permissions an ordinary
``open(path, "w")`` would give them (``0o666`` less the umask), not the ``0o600`` of
:func:`tempfile.mkstemp`: checkpoints are shared between users and machines.

A process killed in the middle of a write leaves its temporary file behind;
:func:`clean_stale_temps` removes such leftovers (the writers of checkpoint directories call
it), telling them by their name: ``.<target name>.tmp-<pid>-<random><suffix>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "clean_stale_temps", "file_mode", "write_json"]

TEMP_TAG = ".tmp-"
"""Marks a temporary file of :func:`atomic_path`: ``.<name>.tmp-<pid>-<random><suffix>``."""

_TEMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[a-z0-9_]{8}(\..*)?$")
# the names of earlier versions, without the writer's pid: ``.<name>.<random><suffix>``
_LEGACY_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]+)$")


def _umask() -> int:
    # /proc avoids os.umask's set-and-restore, which briefly changes it for other threads
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666`` less the process umask."""
    return 0o666 & ~_umask()


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    The temporary name keeps the target's suffix (libraries such as numpy and matplotlib
    pick the format from it). On success the file is given the umask's permissions and
    synced to disk before the rename; on an exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}{os.getpid()}-",
                               suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # the rename itself is durable only once the directory is synced; not every file
    # system allows that (best effort)
    with contextlib.suppress(OSError):
        _fsync_path(path.parent, directory=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers left in ``directory``; return them.

    A temporary file whose writer (the pid in its name) is still running is kept: it may be
    being written right now. Leftovers of earlier versions (``.<name>.<8 chars><suffix>``,
    without a pid) are removed too. Other files are never touched.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        name = p.name
        if not name.startswith(".") or not p.is_file() or p.is_symlink():
            continue
        m = _TEMP_RE.match(name)
        if m is not None:
            stale = not _pid_alive(int(m["pid"]))
        else:
            legacy = _LEGACY_RE.match(name)
            stale = (legacy is not None and TEMP_TAG not in name and bool(legacy["suffix"])
                     and legacy["name"].endswith(legacy["suffix"]))
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")
