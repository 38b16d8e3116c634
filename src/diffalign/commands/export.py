"""``diffalign export RUN --out DIR``: a run's stage as a plain model directory.

The stage's adapter is merged into the network (``config.json`` + ``model.safetensors``, read
by ``ControlModel.load`` and ``diffalign evaluate DIR``); the cascade stage adds its refiner
(``DIR/cascade/``), a best-of-N stage a copy of the critic (``DIR/critic/``). The config's
``export`` entry records the stage, its candidates and the run. Load it as a policy with
``diffalign.load_policy(DIR)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

__all__ = ["ExportArgs", "export_main"]


@dataclass
class ExportArgs:
    """Export a stage of a `diffalign run nav1d` directory as a plain model checkpoint."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `diffalign run nav1d`."""
    out: Path
    """New directory to write (must not exist, or be empty)."""
    stage: str | None = None
    """Stage to export (default: the run's final stage)."""
    device: str = "cpu"
    """Torch device the stage is loaded (and merged) on."""

    def __post_init__(self) -> None:
        self.run_dir, self.out = Path(self.run_dir), Path(self.out)


def export_main(args: ExportArgs) -> dict[str, Any]:
    """Entry point of ``diffalign export``; prints and returns the export's config entry."""
    from ..runs import EXPORT_KEY, export_stage

    if not args.run_dir.exists():
        raise FileNotFoundError(f"run directory {str(args.run_dir)!r} does not exist")
    out = export_stage(args.run_dir, args.out, stage=args.stage, device=args.device)
    info = json.loads((out / "config.json").read_text())[EXPORT_KEY]
    extra = [p for p in ("cascade", "critic") if info.get(p)]
    print(f"exported stage {info['stage']} of {args.run_dir} ({info['candidates']} "
          f"candidate{'s' if info['candidates'] > 1 else ''}"
          + (f"; with its {' and '.join(extra)}" if extra else "") + f") to {out}")
    return info
