"""The data's action band: per state, the range of actions the dataset took there.

Alignment uses it to know where the critic has data behind it (docs/design.md §9). An MLP
on the standardised observation predicts, for each action
coordinate, the ``tau`` and ``1 − tau`` quantiles of the standardised action at that state
(pinball loss); an action inside ``[lo(s), hi(s)]`` is on the data's support. Quantiles and
not a Gaussian: random-policy data is uniform in a box, and the best actions often sit on its
edges, where a Gaussian's tails would call them off-support. The band's width also says how
much of the action space the data covers near each state (:meth:`BehaviorModel.coverage`):
about 1 for random-policy data, small for a deterministic expert's.

Checkpoint: ``config.json`` (``kind`` = ``"behavior_model"``) + ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.episodes import Episodes
from ..data.normalizer import NormalizerSet
from ..train.checkpoint import load_model_files, save_model
from .critic import (
    as_tensor,
    build_from_files,
    featured_mlp,
    make_field_normalizers,
    module_device,
    transitions_from_episodes,
)

__all__ = ["BEHAVIOR_KIND", "BehaviorConfig", "BehaviorModel", "train_behavior"]

BEHAVIOR_KIND = "behavior_model"


@dataclass
class BehaviorConfig:
    """Hyper-parameters of the behaviour model and of its training run."""

    hidden: int = 256
    """Width of the hidden layers."""
    depth: int = 3
    """Hidden layers."""
    fourier_features: int = 32
    """Random Fourier features of the standardised observation at the input: a policy can
    change sharply with the state (Nav1D's best action flips with the time step)."""
    fourier_scale: float = 1.0
    """Std of their frequencies."""
    tau: float = 0.02
    """The band is the ``tau`` to ``1 − tau`` quantile of the actions at a state."""
    steps: int = 2000
    """Optimiser steps."""
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
                            ("seed", 0), ("fourier_features", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"BehaviorConfig.{name} must be an integer >= {least}, got "
                                 f"{name}={v!r}")
        if not self.lr > 0:
            raise ValueError(f"BehaviorConfig.lr must be > 0, got lr={self.lr}")
        if not 0 < self.tau < 0.5:
            raise ValueError(f"BehaviorConfig.tau must be in (0, 0.5), got tau={self.tau}")


class BehaviorModel(nn.Module):
    """The band ``[lo(s), hi(s)]`` of the data's standardised actions, on RAW inputs."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: BehaviorConfig | None = None,
                 normalizers: NormalizerSet | None = None) -> None:
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"need obs_dim >= 1 and act_dim >= 1, got obs_dim={obs_dim} "
                             f"act_dim={act_dim}")
        self.cfg = cfg if cfg is not None else BehaviorConfig()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.normalizer = make_field_normalizers(
            normalizers, {"observations": obs_dim, "actions": act_dim})
        self.register_buffer("extent", torch.ones(act_dim))
        """Width of the range of all the data's actions (max − min), standardised."""
        self.net = featured_mlp(obs_dim, self.cfg, 2 * act_dim)

    def band(self, obs: Any) -> tuple[Tensor, Tensor]:
        """``lo(s), hi(s)`` in standardised action units, each ``(B, act_dim)``."""
        o = self.normalizer["observations"].normalize(as_tensor(obs, module_device(self)))
        lo, gap = self.net(o).chunk(2, -1)
        return lo, lo + nn.functional.softplus(gap)

    def excess(self, obs: Any, act: Any, margin: float = 0.1) -> Tensor:
        """``mean_j (dist_j / margin)²``, ``(B,)``: 0 on the data's support, growing
        quadratically outside it; differentiable in ``act``. ``dist_j`` is how far action
        coordinate ``j`` lies outside the band widened by ``margin`` of its own width on each
        side (the quantiles leave ``tau`` of the data outside by design), in units of the
        data's action std."""
        lo, hi = self.band(obs)
        a = self.normalizer["actions"].normalize(as_tensor(act, module_device(self)))
        pad = margin * (hi - lo)
        dist = torch.relu(a - hi - pad) + torch.relu(lo - pad - a)
        return (dist / margin).pow(2).mean(-1)

    @torch.no_grad()
    def coverage(self, obs: Any) -> float:
        """How much of the action space the data covers near the states ``obs``: the mean over
        states and action coordinates of the band's width over the range of all the data's
        actions, clipped to 1. Uniform random actions give about ``1 − 2 tau``; a
        deterministic policy near 0."""
        lo, hi = self.band(obs)
        return float(((hi - lo) / self.extent).clamp(max=1.0).mean())

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pinball loss of the two quantiles."""
        lo, hi = self.band(batch["observations"])
        a = self.normalizer["actions"].normalize(batch["actions"])
        tau = self.cfg.tau
        return {"loss": (_pinball(a - lo, tau) + _pinball(a - hi, 1 - tau)).mean()}

    def config_dict(self) -> dict[str, Any]:
        return {"kind": BEHAVIOR_KIND, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "config": asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (weights and normalisers)."""
        return save_model(directory, self, self.config_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> BehaviorModel:
        """Rebuild a model saved by :meth:`save`; a :class:`CheckpointError` names the path."""
        config, tensors = load_model_files(directory, device="cpu")
        model = build_from_files(cls, BehaviorConfig, directory, config, tensors, BEHAVIOR_KIND)
        return model.to(device).eval()


def train_behavior(episodes: Episodes, cfg: BehaviorConfig | None = None,
                   out_dir: str | Path | None = None, progress: bool = True) -> BehaviorModel:
    """Fit a :class:`BehaviorModel` on every transition of ``episodes`` (saved to ``out_dir``
    when given). Returns it in eval mode."""
    from .dynamics import fit_on_transitions

    cfg = cfg if cfg is not None else BehaviorConfig()
    data = transitions_from_episodes(episodes)
    data = {k: data[k] for k in ("observations", "actions")}
    norms = NormalizerSet.fit_arrays(data, kind="gaussian")
    torch.manual_seed(cfg.seed)
    model = BehaviorModel(episodes.obs_dim, episodes.act_dim, cfg, norms)
    a = torch.as_tensor(norms.normalize("actions", data["actions"]), dtype=torch.float32)
    model.extent.copy_((a.max(0).values - a.min(0).values).clamp(min=1e-6))
    return fit_on_transitions(model, data, cfg, out_dir, progress, "behavior")


def _pinball(diff: Tensor, tau: float) -> Tensor:
    """Quantile-regression loss of residuals ``diff = a − q`` at level ``tau``."""
    return torch.maximum(tau * diff, (tau - 1) * diff)
