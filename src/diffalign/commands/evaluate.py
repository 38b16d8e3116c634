"""``diffalign evaluate DIR``: roll a trained model out and write eval.json + eval.png.

DIR is a model directory (``diffalign train``), an exported stage (``diffalign export``) or
a run directory of ``diffalign run nav1d``. For a run, the stage (``--stage``, default the
run's final one) is evaluated as the run did it: the same candidates, critic, seed and
episodes, so the result equals the run's own ``eval/<stage>/eval.json``; it is written to
``RUN/eval-again/<stage>/`` (or ``--out``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from ..errors import UserError

__all__ = ["EvaluateArgs", "evaluate_main"]


@dataclass
class EvaluateArgs:
    """Evaluate a trained control model, an exported stage or a run's stage in its
    environment."""

    model_dir: Annotated[Path, tyro.conf.Positional]
    """Directory written by `diffalign train` or `diffalign export`, or a run directory of
    `diffalign run nav1d`."""
    stage: str | None = None
    """Run directory only: the stage to evaluate (default: the run's final stage)."""
    critic: Path | None = None
    """IQL critic directory (from `diffalign critic`) to rank candidates (default: the
    run's or the export's critic, if any)."""
    episodes: int | None = None
    """Evaluation episodes, run in parallel (default: the run's count for its stage, else
    100)."""
    candidates: int | None = None
    """Samples N per decision, chosen among by --selection (default: the stage's, else 1)."""
    steps: int | None = None
    """Denoising steps (default: the process's default)."""
    selection: Literal["auto", "expectation", "idql_greedy", "idql_softmax", "best", "random",
                       "first"] = "auto"
    """auto: idql_greedy (dp) / best (planners) with a critic, else expectation (dp) / first."""
    temperature: float = 1.0
    """Temperature of idql_softmax."""
    out: Path | None = None
    """Where eval.json and eval.png go (default: MODEL_DIR; for a run RUN/eval-again/STAGE)."""
    seed: int | None = None
    """Seed of the environments' starts and of sampling (default: the run's or export's
    seed, else 0)."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        for name in ("episodes", "candidates"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {name}={v}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be >= 1, got steps={self.steps}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got temperature={self.temperature}")


def evaluate_main(args: EvaluateArgs) -> dict[str, Any]:
    """Entry point of ``diffalign evaluate``; prints and returns the metrics."""
    from ..atomic import write_json
    from ..eval.evaluate import evaluate
    from ..runs import UserError, is_export_dir, is_run_dir, load_dir

    if not args.model_dir.exists():
        raise FileNotFoundError(f"model directory {str(args.model_dir)!r} does not exist")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(steps=args.steps, selection=args.selection, temperature=args.temperature,
              device=device, progress=args.progress)
    run = is_run_dir(args.model_dir)
    if not run and args.stage is not None:
        raise UserError(f"--stage is for a run directory; {args.model_dir} is a model "
                        "directory")
    if not run and not is_export_dir(args.model_dir):  # a plain model directory
        res = evaluate(args.model_dir, critic=args.critic, episodes=args.episodes or 100,
                       candidates=args.candidates or 1, out_dir=args.out,
                       seed=args.seed or 0, **kw)
    else:
        st = load_dir(args.model_dir, stage=args.stage, device=device)
        out = args.out
        if out is None:
            out = args.model_dir / "eval-again" / st.name if run else args.model_dir
        critic = args.critic if args.critic is not None else st.critic_dir
        res = evaluate(st.model, critic=critic, episodes=args.episodes or st.episodes or 100,
                       candidates=args.candidates or st.candidates, out_dir=out,
                       seed=st.seed if args.seed is None else args.seed, **kw)
        res.update(stage=st.name, model_dir=str(args.model_dir))
        write_json(Path(out) / "eval.json", {k: v for k, v in res.items() if k != "files"})
        if run and st.eval_json is not None:
            own = json.loads(st.eval_json.read_text())
            same = own.get("episodes") == res["episodes"] and own.get("seed") == res["seed"]
            print(f"the run's own evaluation of {st.name} ({st.eval_json}): return "
                  f"{own['return_mean']:.4f}" + (" (same episodes and seed)" if same else ""))
    keys = ("stage", "return_mean", "return_std", "normalized", "success_rate", "coherency",
            "entropy", "decisions_per_s")
    print(json.dumps({k: res[k] for k in keys if k in res}, indent=2))
    print(f"wrote {', '.join(res.get('files', []))}")
    return res
