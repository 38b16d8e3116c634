"""Train a foundation model (Diffuser, Decision Diffuser or Diffusion Policy) on a task's data.

The library side of ``diffalign train`` and of the pipeline's foundation step: build the
model for the task's dimensions, run the generic trainer and save ``OUT/config.json`` (task,
spec, obs/act dims, training settings) and ``OUT/model.safetensors`` (EMA weights and
normalisers). A killed run resumes from ``OUT/train_state``; a state written with another
task, model, process or seed is refused.

The global RNGs are seeded from ``cfg.seed`` before the model is built, so its initial
weights, and with them the whole run, depend on the seed alone (bit-identical on CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["TRAIN_STEPS", "FoundationConfig", "resume_settings", "task_meta",
           "train_foundation"]

TRAIN_STEPS = {"diffuser": 3000, "dd": 3000, "dp": 3000}
"""Default optimiser steps per kind (a couple of minutes on 2 CPU cores for Nav1D)."""


@dataclass
class FoundationConfig:
    """The model and its training run (``None``: the kind's default)."""

    model: str = "diffuser"
    """diffuser, dd or dp."""
    process: str = "ddpm"
    """Diffusion process: ddpm, ddim, sm or fm."""
    backbone: str | None = None
    """Denoiser backbone (default: unet for planners, dit for dp)."""
    horizon: int | None = None
    """Planning horizon H (planners) or prediction horizon T_p (dp)."""
    obs_history: int | None = None
    """Observation history T_o (dp) / in-painted context states (planners)."""
    action_horizon: int | None = None
    """Actions executed per decision T_a (dp)."""
    state_cond: bool = False
    """Planners: feed the present state to every block as a global condition too."""
    cond_fourier: int = 0
    """Fourier frequencies of the global condition (0: raw values)."""
    action_weight: float = 1.0
    """Diffuser: loss weight of the executed action's entries (1: every entry alike)."""
    sample_steps: int | None = None
    """Denoising steps the model samples with by default (None: its process's default)."""
    steps: int | None = None
    """Optimiser steps (default :data:`TRAIN_STEPS`)."""
    batch_size: int = 64
    """Batch size."""
    lr: float = 1e-3
    """Peak learning rate (warm-up then cosine decay)."""
    seed: int = 0
    """Seed of initialisation and batches."""
    device: str = "cpu"
    """Torch device."""
    bf16: bool = False
    """bfloat16 autocast."""


def task_meta(task, layout_seed: int = 0) -> dict[str, Any]:
    """What the model's config records of its task (evaluation rebuilds the environment
    from it): the task string, layout seed, env id, dataset kind, reference scores."""
    meta: dict[str, Any] = {"task": task.name, "layout_seed": layout_seed}
    for key in ("env_id", "dataset_kind", "kind", "horizon", "step_size", "behaviour_policy"):
        v = task.meta.get(key)
        if isinstance(v, (str, int, float, bool)):
            meta[key] = v
    if "kind" in meta and "dataset_kind" not in meta:
        meta["dataset_kind"] = meta["kind"]
    meta.pop("kind", None)
    meta["ref_min"], meta["ref_max"] = task.ref_min, task.ref_max
    return meta


def resume_settings(task, cfg: FoundationConfig, spec: dict[str, Any],
                    layout_seed: int = 0) -> dict[str, Any]:
    """What determines a training run's result beyond its optimisation settings: recorded
    in its training state, and a resume with other values is refused."""
    settings: dict[str, Any] = {"task": task.name, "model": cfg.model, "process": cfg.process,
                                "spec": spec, "seed": cfg.seed}
    if task.name.startswith("nav1d/"):  # the generated dataset's size and layout
        settings.update(layout_seed=layout_seed, episodes=len(task.episodes))
    return settings


def train_foundation(task, cfg: FoundationConfig, out_dir: str | Path | None,
                     layout_seed: int = 0, progress: bool = True):
    """Build and train on ``task`` (a :class:`~diffalign.tasks.Task`); returns
    ``(model, fit_result, train_config)``. ``layout_seed``: the Nav1D layout recorded."""
    from ..errors import UserError
    from ..models.registry import build_model
    from .trainer import TrainConfig, fit, seed_everything

    overrides = {k: getattr(cfg, k) for k in ("horizon", "obs_history", "action_horizon")
                 if getattr(cfg, k) is not None}
    if cfg.state_cond:
        overrides["state_cond"] = True
    if cfg.cond_fourier:
        overrides["cond_fourier"] = cfg.cond_fourier
    if cfg.action_weight != 1:
        overrides["action_weight"] = cfg.action_weight
    if cfg.sample_steps is not None:
        overrides["process_kwargs"] = {"default_steps": cfg.sample_steps}
    seed_everything(cfg.seed)  # the initial weights
    try:
        model = build_model(cfg.model, cfg.process, cfg.backbone, obs_dim=task.obs_dim,
                            act_dim=task.act_dim, meta=task_meta(task, layout_seed),
                            **overrides)
    except ValueError as e:  # sizes that do not fit the kind or the backbone
        raise UserError(str(e)) from e
    dataset = model.make_dataset(task.episodes)
    tcfg = TrainConfig(steps=cfg.steps or TRAIN_STEPS[cfg.model], batch_size=cfg.batch_size,
                       lr=cfg.lr, seed=cfg.seed, device=cfg.device, bf16=cfg.bf16,
                       progress=progress, ckpt_every=1000, log_every=100)

    def loss_fn(m, batch_size, generator):
        return m.loss(dataset.sample(batch_size, generator), generator=generator)

    def save_fn(path, m):
        m.save(path, extra_config={"train": asdict(tcfg)})

    res = fit(model, loss_fn, tcfg, out_dir=out_dir, save_fn=save_fn,
              settings=resume_settings(task, cfg, model.spec.to_dict(), layout_seed))
    return res.ema_model, res, tcfg
