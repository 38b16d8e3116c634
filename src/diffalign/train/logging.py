"""Metric logging: ``metrics.jsonl`` (one JSON object per line) and TensorBoard events.

Keys are namespaced by the caller (``train/loss``, ``align/rl/reward``). TensorBoard is
optional: without it only the JSON lines are written, after one warning. On resume,
:meth:`MetricLogger.truncate_after` drops lines past the resumed step and the TensorBoard
writer purges its later events, so curves never show a step twice.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..atomic import atomic_path

__all__ = ["MetricLogger", "read_metrics"]

METRICS = "metrics.jsonl"
TB_DIR = "tb"

_warned_no_tb = False


def _clean(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None  # JSON has no NaN/inf; null marks them


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricLogger:
    """Writes metrics under ``out_dir``; a disabled logger (other ranks, no dir) does nothing.

    ``resume_step``: keep only records with ``step <= resume_step`` (0 = start afresh) and
    purge TensorBoard events after it.
    """

    def __init__(self, out_dir: str | Path | None, enabled: bool = True,
                 resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.enabled = enabled and out_dir is not None
        self.path = Path(out_dir) / METRICS if self.enabled else None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        if tensorboard:
            self._tb = self._open_tb(Path(out_dir) / TB_DIR, resume_step)
        self._fh = open(self.path, "a")  # noqa: SIM115 - closed in close()

    @staticmethod
    def _open_tb(log_dir: Path, resume_step: int | None):
        global _warned_no_tb
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed
            if not _warned_no_tb:
                warnings.warn("tensorboard is not installed: writing metrics.jsonl only",
                              stacklevel=3)
                _warned_no_tb = True
            return None
        purge = resume_step + 1 if resume_step is not None else None
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (rewritten atomically)."""
        if self.path is None or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), global_step=int(step))

    def flush(self) -> None:
        if self.enabled:
            self._fh.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        self.enabled = False

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
