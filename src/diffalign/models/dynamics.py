"""A one-step dynamics model ``s' = f(s, a)`` learned from the offline dataset's transitions.

Alignment uses it to see where a policy goes without the environment: rollouts of the
critic's greedy policy through this model give the conditions (states) the aligned model is
trained and validated on (:mod:`diffalign.align.conditions`). An MLP on the standardised
``(s, a)`` predicts the standardised displacement ``s' − s``; the observation and action
normalisers, and the displacement's, are buffers saved with the weights.

Checkpoint: ``config.json`` (``kind`` = ``"dynamics_model"``) + ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.episodes import Episodes
from ..data.normalizer import NormalizerSet
from ..train.checkpoint import load_model_files, save_model
from .critic import (
    DeviceData,
    as_tensor,
    build_from_files,
    make_field_normalizers,
    mlp,
    module_device,
    sample_batch,
    transitions_from_episodes,
)

__all__ = ["DYNAMICS_KIND", "DynamicsConfig", "DynamicsModel", "dynamics_transitions",
           "fit_on_transitions", "train_dynamics"]

DYNAMICS_KIND = "dynamics_model"


@dataclass
class DynamicsConfig:
    """Hyper-parameters of the dynamics model and of its training run."""

    hidden: int = 128
    """Width of the hidden layers."""
    depth: int = 3
    """Hidden layers."""
    steps: int = 1500
    """Optimiser steps. On Nav1D (1000 random-policy episodes, one CPU thread) these defaults
    train in about 8 s to a mean position error of 0.0007 (max 0.019) over uniform states
    and actions; width 256 and 2000 steps: 0.0003 in 14 s; two layers of 128 and 1000 steps:
    0.0024 in 3 s."""
    batch_size: int = 256
    """Transitions per step."""
    lr: float = 1e-3
    """AdamW learning rate, decayed to zero along a cosine."""
    seed: int = 0
    """Seed of the initialisation and of the batches."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""

    def __post_init__(self) -> None:
        for name, least in (("hidden", 1), ("depth", 1), ("steps", 1), ("batch_size", 1),
                            ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"DynamicsConfig.{name} must be an integer >= {least}, got "
                                 f"{name}={v!r}")
        if not self.lr > 0:
            raise ValueError(f"DynamicsConfig.lr must be > 0, got lr={self.lr}")


class DynamicsModel(nn.Module):
    """``s' = s + unnorm_Δ(MLP([norm(s), norm(a)]))`` on RAW observations and actions."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: DynamicsConfig | None = None,
                 normalizers: NormalizerSet | None = None) -> None:
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"need obs_dim >= 1 and act_dim >= 1, got obs_dim={obs_dim} "
                             f"act_dim={act_dim}")
        self.cfg = cfg if cfg is not None else DynamicsConfig()
        """Hyper-parameters."""
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.normalizer = make_field_normalizers(
            normalizers, {"observations": obs_dim, "actions": act_dim, "deltas": obs_dim})
        """Normalisers of the inputs and of the displacement (buffers)."""
        self.net = mlp(obs_dim + act_dim, self.cfg.hidden, self.cfg.depth, obs_dim)
        """The MLP of the standardised displacement."""

    def _inputs(self, obs: Any, act: Any) -> Tensor:
        dev = module_device(self)
        o = self.normalizer["observations"].normalize(as_tensor(obs, dev))
        a = self.normalizer["actions"].normalize(as_tensor(act, dev))
        return torch.cat([o, a], -1)

    def forward(self, obs: Any, act: Any) -> Tensor:
        """The predicted next observation, RAW, shape of ``obs``."""
        obs_t = as_tensor(obs, module_device(self))
        return obs_t + self.normalizer["deltas"].unnormalize(self.net(self._inputs(obs_t, act)))

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean squared error of the standardised displacement."""
        target = self.normalizer["deltas"].normalize(
            batch["next_observations"] - batch["observations"])
        pred = self.net(self._inputs(batch["observations"], batch["actions"]))
        return {"loss": ((pred - target) ** 2).mean()}

    def config_dict(self) -> dict[str, Any]:
        return {"kind": DYNAMICS_KIND, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "config": asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (weights and normalisers)."""
        return save_model(directory, self, self.config_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> DynamicsModel:
        """Rebuild a model saved by :meth:`save`; a :class:`CheckpointError` names the path."""
        config, tensors = load_model_files(directory, device="cpu")
        model = build_from_files(cls, DynamicsConfig, directory, config, tensors, DYNAMICS_KIND)
        return model.to(device).eval()


def dynamics_transitions(episodes: Episodes) -> dict[str, np.ndarray]:
    """``observations``, ``actions``, ``next_observations`` of every non-terminal step (a
    terminal step's next observation is not a state the dynamics lead to)."""
    data = transitions_from_episodes(episodes)
    keep = data["dones"] < 0.5
    if not keep.any():
        raise ValueError(f"{episodes.source or 'dataset'}: every transition is terminal; "
                         "there is nothing to learn the dynamics from")
    return {k: data[k][keep] for k in ("observations", "actions", "next_observations")}


def train_dynamics(episodes: Episodes, cfg: DynamicsConfig | None = None,
                   out_dir: str | Path | None = None, progress: bool = True) -> DynamicsModel:
    """Fit a :class:`DynamicsModel` on the transitions of ``episodes`` (saved to ``out_dir``
    when given, at the end: a killed run trains it again, which takes seconds). Returns it
    in eval mode."""
    cfg = cfg if cfg is not None else DynamicsConfig()
    data = dynamics_transitions(episodes)
    norms = NormalizerSet.fit_arrays({
        "observations": data["observations"], "actions": data["actions"],
        "deltas": data["next_observations"] - data["observations"]}, kind="gaussian")
    torch.manual_seed(cfg.seed)
    model = DynamicsModel(episodes.obs_dim, episodes.act_dim, cfg, norms)
    return fit_on_transitions(model, data, cfg, out_dir, progress, "dynamics")


def fit_on_transitions(model: nn.Module, data: dict[str, np.ndarray], cfg: Any,
                       out_dir: str | Path | None, progress: bool, log_prefix: str) -> nn.Module:
    """Train a small model whose ``loss(batch)`` takes a batch of ``data``'s transitions, for
    ``cfg.steps`` AdamW steps at ``cfg.lr`` along a cosine (``cfg``: steps, batch_size, lr,
    seed, device); saved to ``out_dir`` at the end when given. Returns it in eval mode."""
    from ..train.trainer import TrainConfig, fit

    tensors = DeviceData(data)

    def loss_fn(m: nn.Module, batch_size: int, gen: torch.Generator) -> dict[str, Tensor]:
        return m.loss(sample_batch(tensors.on(module_device(m)), batch_size, gen))

    train = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=0,
                        schedule="cosine", grad_clip=10.0,
                        ema_decay=0.0, seed=cfg.seed, device=cfg.device, bf16=False,
                        ckpt_every=0, progress=progress)
    result = fit(model, loss_fn, train,
                 out_dir=None if out_dir is None else Path(out_dir),
                 save_fn=lambda d, m: m.save(d), log_prefix=log_prefix)
    return result.model.eval()
