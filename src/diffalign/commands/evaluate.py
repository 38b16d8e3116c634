"""``diffalign evaluate MODEL_DIR``: roll a trained model out and write eval.json + eval.png."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

__all__ = ["EvaluateArgs", "evaluate_main"]


@dataclass
class EvaluateArgs:
    """Evaluate a trained control model in its environment."""

    model_dir: Annotated[Path, tyro.conf.Positional]
    """Directory written by `diffalign train`."""
    critic: Path | None = None
    """IQL critic directory (from `diffalign critic`) to rank candidates."""
    episodes: int = 100
    """Evaluation episodes (run in parallel)."""
    candidates: int = 1
    """Samples N per decision, chosen among by --selection."""
    steps: int | None = None
    """Denoising steps (default: the process's default)."""
    selection: Literal["auto", "expectation", "idql_greedy", "idql_softmax", "best", "random",
                       "first"] = "auto"
    """auto: idql_greedy (dp) / best (planners) with a critic, else expectation (dp) / first."""
    temperature: float = 1.0
    """Temperature of idql_softmax."""
    out: Path | None = None
    """Where eval.json and eval.png go (default: MODEL_DIR)."""
    seed: int = 0
    """Seed of the environments' starts and of sampling."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        for name in ("episodes", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got steps={self.steps}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got temperature={self.temperature}")


def evaluate_main(args: EvaluateArgs) -> dict[str, Any]:
    """Entry point of ``diffalign evaluate``; prints and returns the metrics."""
    from ..eval.evaluate import evaluate

    if not args.model_dir.exists():
        raise FileNotFoundError(f"model directory {str(args.model_dir)!r} does not exist")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    res = evaluate(args.model_dir, critic=args.critic, episodes=args.episodes,
                   candidates=args.candidates, steps=args.steps, selection=args.selection,
                   out_dir=args.out, seed=args.seed, device=device,
                   temperature=args.temperature, progress=args.progress)
    keys = ("return_mean", "return_std", "normalized", "success_rate", "coherency", "entropy",
            "decisions_per_s")
    print(json.dumps({k: res[k] for k in keys if k in res}, indent=2))
    print(f"wrote {', '.join(res.get('files', []))}")
    return res
