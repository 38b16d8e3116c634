"""``diffalign train``: train a foundation diffusion model (Diffuser, DD, DP or SynthER).

A thin call into :func:`diffalign.train.foundation.train_foundation` (see there for what is
written and how a run resumes), after resolving the task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
from ..train.foundation import TRAIN_STEPS

__all__ = ["TRAIN_STEPS", "TrainArgs", "foundation_config", "train_main", "train_model"]


@dataclass
class TrainArgs:
    """Train a foundation diffusion planner/policy on an offline dataset."""

    out: Path
    """Output directory (config.json, model.safetensors, metrics, train_state/)."""
    task: str = "nav1d/full"
    """nav1d/{partial,full,expert}; FAMILY/NAME/DATASET (mujoco/hopper/medium,
    metaworld/button-press-v3/expert: see `diffalign collect`); a D4RL/robomimic HDF5 file;
    or a local Minari dataset id."""
    download: bool = False
    """Download a Minari --task (FAMILY/NAME/DATASET-vN) that is not found locally."""
    model: Literal["diffuser", "dd", "dp", "synther"] = "diffuser"
    """diffuser: state-action plans; dd: Decision Diffuser (states + inverse dynamics);
    dp: Diffusion Policy (action chunks); synther: transition up-sampler (experimental: IQL
    on nav1d/full returned 8.4-8.6 with its synthetic transitions added, 9.17 without)."""
    process: Literal["ddpm", "ddim", "sm", "fm"] = "ddpm"
    """Diffusion process."""
    backbone: Literal["unet", "dit", "mlp"] | None = None
    """Denoiser backbone (default: unet for planners, dit for dp)."""
    layout_seed: int = 0
    """Nav1D reward layout seed (ignored for other tasks)."""
    episodes: int = 1000
    """Nav1D dataset size in episodes (ignored for other tasks)."""
    horizon: int | None = None
    """Planning horizon H (planners) or prediction horizon T_p (dp); default per kind."""
    obs_history: int | None = None
    """Observation history T_o (dp) / in-painted context states (planners)."""
    action_horizon: int | None = None
    """Actions executed per decision T_a (dp)."""
    state_cond: bool = False
    """Planners (diffuser, dd): feed the present state to every block of the denoiser as a
    global condition as well as in-painting it (`run nav1d` turns this on)."""
    cond_fourier: int = 0
    """Fourier frequencies of the global condition (dp's observations, or the planners'
    state condition, which then needs --state-cond): each normalised value v also enters as
    sin(kπv), cos(kπv), k = 1..F. 0 = raw values (`run nav1d` uses 16)."""
    action_weight: float = 1.0
    """Diffuser: loss weight of the executed (first) action's entries; Janner et al. use
    10, and `run` on simulator tasks does."""
    steps: int | None = None
    """Optimiser steps (default 3000)."""
    batch_size: int = 64
    """Batch size."""
    lr: float = 1e-3
    """Peak learning rate (warm-up then cosine decay)."""
    seed: int = 0
    """Seed of initialisation and batches."""
    device: str = "cpu"
    """Torch device: cpu, cuda or auto."""
    bf16: bool = False
    """bfloat16 autocast (float32, with a note, where the device has no bfloat16 kernels)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("steps", "horizon", "obs_history", "action_horizon"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v < 1):
                raise UserError(f"{name} must be >= 1, got {name}={v}")
        if self.state_cond and self.model not in ("diffuser", "dd"):
            raise UserError(f"state_cond is for the planners (diffuser, dd), got "
                             f"model={self.model!r}")
        if self.cond_fourier < 0:
            raise UserError(f"cond_fourier must be >= 0, got cond_fourier={self.cond_fourier}")
        if self.cond_fourier and not (self.model == "dp" or self.state_cond):
            raise UserError(f"cond_fourier={self.cond_fourier} needs a global condition: dp, "
                             f"or a planner with --state-cond (got model={self.model!r})")
        if not 0 < self.action_weight < 1e6:
            raise UserError(f"action_weight must be > 0, got action_weight={self.action_weight}")
        if self.action_weight != 1 and self.model != "diffuser":
            raise UserError(f"action_weight is for the diffuser, got model={self.model!r}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got batch_size={self.batch_size}")
        if self.episodes < 1:
            raise UserError(f"episodes must be >= 1, got episodes={self.episodes}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got lr={self.lr}")
        if self.layout_seed < 0:
            raise UserError(f"layout_seed must be >= 0, got layout_seed={self.layout_seed}")
        if self.model not in ("diffuser", "dd", "dp", "synther"):
            raise UserError(f"unknown model {self.model!r}; choose diffuser, dd, dp or synther")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"out {str(self.out)!r} exists and is not a directory")


def foundation_config(args: TrainArgs):
    """The library's :class:`~diffalign.train.foundation.FoundationConfig` of the flags."""
    from ..train.foundation import FoundationConfig
    from ..train.trainer import bf16_if_fast

    return FoundationConfig(model=args.model, process=args.process, backbone=args.backbone,
                            horizon=args.horizon, obs_history=args.obs_history,
                            action_horizon=args.action_horizon, state_cond=args.state_cond,
                            cond_fourier=args.cond_fourier, action_weight=args.action_weight,
                            steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            device=args.device,
                            bf16=bf16_if_fast(args.bf16, args.device, "--bf16"))


def train_model(args: TrainArgs):
    """Resolve the task and train (:func:`~diffalign.train.foundation.train_foundation`);
    returns ``(model, fit_result, train_config)``."""
    from ..tasks import resolve_task
    from ..train.foundation import train_foundation

    try:
        task = resolve_task(args.task, layout_seed=args.layout_seed, episodes=args.episodes,
                            download=args.download)
    except ValueError as e:  # an unknown task or dataset name
        raise UserError(str(e)) from e
    return train_foundation(task, foundation_config(args), args.out,
                            layout_seed=args.layout_seed, progress=args.progress)


def train_main(args: TrainArgs) -> dict[str, Any]:
    """Entry point of ``diffalign train``; prints and returns a summary."""
    if args.model == "synther":
        from ..models.synther import train_synther_main

        return train_synther_main(args)
    t0 = time.perf_counter()
    model, res, cfg = train_model(args)
    summary = {"out": str(args.out), "kind": model.kind, "process": model.spec.process,
               "backbone": model.spec.backbone, "task": args.task, "steps": res.step,
               "resumed_from": res.resumed_from, "seconds": time.perf_counter() - t0,
               **{k: v for k, v in res.last_metrics.items()}}
    print(f"trained {model.kind}/{model.spec.process}/{model.spec.backbone} on {args.task} for "
          f"{res.step} steps in {summary['seconds']:.0f}s; wrote {args.out}/config.json and "
          "model.safetensors")
    return summary
