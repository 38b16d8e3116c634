"""``diffalign train``: train a foundation diffusion model (Diffuser, DD, DP or SynthER).

A thin call into the library: resolve the task, build the model, run the generic trainer and
save ``OUT/config.json`` (task, spec, obs/act dims, training settings) and
``OUT/model.safetensors`` (EMA weights and normalisers). A killed run resumes from
``OUT/train_state``; a state written with another task, model, process or seed is refused.

The global RNGs are seeded from ``--seed`` before the model is built, so its initial weights,
and with them the whole run, depend on the seed alone: two runs with the same settings write
bit-identical checkpoints (on CPU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError

__all__ = ["TRAIN_STEPS", "TrainArgs", "resume_settings", "train_main", "train_model"]

TRAIN_STEPS = {"diffuser": 3000, "dd": 3000, "dp": 3000}
"""Default optimiser steps per kind (a couple of minutes on 2 CPU cores for Nav1D)."""


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
    dp: Diffusion Policy (action chunks); synther: transition up-sampler."""
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
    """bfloat16 autocast."""
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


def _task_meta(task, args: TrainArgs) -> dict[str, Any]:
    meta: dict[str, Any] = {"task": args.task, "layout_seed": args.layout_seed}
    for key in ("env_id", "dataset_kind", "kind", "horizon", "step_size", "behaviour_policy"):
        v = task.meta.get(key)
        if isinstance(v, (str, int, float, bool)):
            meta[key] = v
    if "kind" in meta and "dataset_kind" not in meta:
        meta["dataset_kind"] = meta["kind"]
    meta.pop("kind", None)
    meta["ref_min"], meta["ref_max"] = task.ref_min, task.ref_max
    return meta


def resume_settings(args: TrainArgs, spec: dict[str, Any]) -> dict[str, Any]:
    """What determines a training run's result beyond its optimisation settings: recorded
    in its training state, and a resume with other values is refused."""
    settings: dict[str, Any] = {"task": args.task, "model": args.model,
                                "process": args.process, "spec": spec, "seed": args.seed}
    if args.task.startswith("nav1d/"):  # the generated dataset's size and layout
        settings.update(layout_seed=args.layout_seed, episodes=args.episodes)
    return settings


def train_model(args: TrainArgs):
    """Build and train; returns ``(model, fit_result, train_config)``. Validates first."""
    from ..errors import UserError
    from ..models.registry import build_model
    from ..tasks import resolve_task
    from ..train.trainer import TrainConfig, fit, seed_everything

    try:
        task = resolve_task(args.task, layout_seed=args.layout_seed, episodes=args.episodes,
                            download=args.download)
    except ValueError as e:  # an unknown task or dataset name
        raise UserError(str(e)) from e
    overrides = {k: getattr(args, k) for k in ("horizon", "obs_history", "action_horizon")
                 if getattr(args, k) is not None}
    if args.state_cond:
        overrides["state_cond"] = True
    if args.cond_fourier:
        overrides["cond_fourier"] = args.cond_fourier
    seed_everything(args.seed)  # the initial weights
    try:
        model = build_model(args.model, args.process, args.backbone, obs_dim=task.obs_dim,
                            act_dim=task.act_dim, meta=_task_meta(task, args), **overrides)
    except ValueError as e:  # sizes that do not fit the kind or the backbone
        raise UserError(str(e)) from e
    dataset = model.make_dataset(task.episodes)
    cfg = TrainConfig(steps=args.steps or TRAIN_STEPS[args.model], batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, device=args.device, bf16=args.bf16,
                      progress=args.progress, ckpt_every=1000, log_every=100)

    def loss_fn(m, batch_size, generator):
        return m.loss(dataset.sample(batch_size, generator), generator=generator)

    def save_fn(path, m):
        m.save(path, extra_config={"train": asdict(cfg)})

    res = fit(model, loss_fn, cfg, out_dir=args.out, save_fn=save_fn,
              settings=resume_settings(args, model.spec.to_dict()))
    return res.ema_model, res, cfg


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
