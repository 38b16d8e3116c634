"""Denoising backbones: temporal U-Net, DiT-1D and residual MLP.

All share the calling convention ``net(x, t, cond=None, extra=None) -> (B, H, D)`` with
``x: (B, H, D)``, ``t: (B,)`` continuous time in [0, 1], ``cond: (B, cond_dim)`` and
``extra: (B, H, extra_dim)`` (zero-initialised input, used by the cascade model), and the
constructor arguments ``x_dim, horizon, cond_dim=0, extra_dim=0`` plus their own sizes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .dit import DiT1D
from .embeddings import ConditionEmbedding, SinusoidalEmbedding, sinusoidal_embedding
from .mlp import ResidualMLP
from .temporal_unet import TemporalUNet

BACKBONES: dict[str, type[nn.Module]] = {
    "unet": TemporalUNet,
    "dit": DiT1D,
    "mlp": ResidualMLP,
}
"""Backbone name -> class."""

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # Parameter counts at (x_dim=14, horizon=32, cond_dim=0, extra_dim=0). Both U-Nets need
    # horizon divisible by 8. (dim=32, dim_mults=(1, 2, 2, 2) is only 733,070.)
    "unet-1m": ("unet", {"dim": 16, "dim_mults": (1, 2, 4, 8), "kernel_size": 5}),  # 1,004,526
    "unet-4m": ("unet", {"dim": 32, "dim_mults": (1, 2, 4, 8), "kernel_size": 5}),  # 3,998,158
    "dit-1.5m": ("dit", {"hidden": 128, "depth": 5, "heads": 4, "mlp_ratio": 4.0}),  # 1,570,318
    "mlp": ("mlp", {"width": 256, "depth": 4}),  # 1,022,784 (793,986 at x_dim=2, horizon=1)
}
"""Preset name -> (backbone name, size kwargs); add ``x_dim``/``horizon`` (and cond/extra)."""


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` ("unet", "dit" or "mlp") with constructor ``kwargs``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def build_preset(preset: str, **kwargs: Any) -> nn.Module:
    """Build a :data:`PRESETS` entry; ``kwargs`` (x_dim, horizon, ...) override its sizes."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    name, sizes = PRESETS[preset]
    return build_backbone(name, **{**sizes, **kwargs})


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``net`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "BACKBONES",
    "PRESETS",
    "ConditionEmbedding",
    "DiT1D",
    "ResidualMLP",
    "SinusoidalEmbedding",
    "TemporalUNet",
    "build_backbone",
    "build_preset",
    "count_parameters",
    "sinusoidal_embedding",
]
