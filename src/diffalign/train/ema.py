"""Exponential moving average of a model's weights.

``ema ← decay·ema + (1 − decay)·θ`` for every floating-point parameter and buffer, after each
optimiser step; integer buffers (counters, indices) are copied. The averaged model is a deep
copy kept in ``eval`` mode with gradients off; its ``state_dict`` is checkpointed by the
trainer, so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Keeps ``self.model``, a deep copy of ``model`` whose weights follow the running average."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got decay={decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model`` (same architecture as the copy)."""
        src = model.state_dict()
        dst = self.model.state_dict()
        if src.keys() != dst.keys():
            raise ValueError("EMA.update: model state_dict keys differ from the EMA copy's")
        d = self.decay
        for k, e in dst.items():
            v = src[k].detach()
            if e.is_floating_point() or e.is_complex():
                # written out as the formula (not lerp) so tests can check it exactly
                e.mul_(d).add_(v.to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
