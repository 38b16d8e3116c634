"""Noise schedules: cumulative signal levels ᾱ for discrete (DDPM/DDIM) and VP-SDE processes."""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "alpha_bar_schedule", "cosine_alpha_bar", "linear_alpha_bar"]


def linear_alpha_bar(num_steps: int, beta_start: float | None = None,
                     beta_end: float | None = None) -> torch.Tensor:
    """ᾱ_k for k = 0..K from linearly spaced β (Ho et al. 2020), float64, ᾱ_0 = 1.

    The default β range is DDPM's 1e-4..0.02 for K = 1000, rescaled by 1000 / K so that
    short chains (K = 20..100, common in control) still end close to pure noise.
    """
    scale = 1000.0 / num_steps
    b0 = beta_start if beta_start is not None else 1e-4 * scale
    b1 = beta_end if beta_end is not None else min(0.02 * scale, 0.999)
    betas = torch.linspace(b0, b1, num_steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def cosine_alpha_bar(num_steps: int, s: float = 0.008, max_beta: float = 0.999
                     ) -> torch.Tensor:
    """ᾱ_k for k = 0..K of the cosine schedule (Nichol & Dhariwal 2021), float64, ᾱ_0 = 1."""
    k = torch.arange(num_steps + 1, dtype=torch.float64)
    f = torch.cos((k / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


SCHEDULES = {"linear": linear_alpha_bar, "cosine": cosine_alpha_bar}


def alpha_bar_schedule(name: str, num_steps: int) -> torch.Tensor:
    """Look up a schedule by name; a clear error lists the valid names."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"num_train_steps must be >= 1, got {num_steps}")
    return SCHEDULES[name](num_steps)
