"""DDIM (Song et al. 2021) on the DDPM schedule: η = 0 deterministic, η > 0 stochastic.

η = 1 reproduces the DDPM posterior exactly; a stochastic DDIM (η > 0) gives each transition
a Gaussian log-prob for RL (DDPO).
"""

from __future__ import annotations

from .base import gaussian_step
from .ddpm import DDPM

__all__ = ["DDIM"]


class DDIM(DDPM):
    """DDIM sampling on a DDPM-trained model (same training loss and schedule)."""

    def __init__(self, num_train_steps: int = 100, schedule: str = "cosine",
                 prediction: str = "eps", clip_x0: float | None = None,
                 default_steps: int = 20, eta: float = 0.0):
        """``eta`` scales the injected noise: 0 = deterministic ODE-like sampler."""
        super().__init__(num_train_steps, schedule, prediction, clip_x0, default_steps)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got eta={eta}")
        self.eta = eta
        self.stochastic = eta > 0

    def stochastic_variant(self) -> DDIM:
        if self.eta > 0:
            return self
        return DDIM(self.num_train_steps, self.schedule, self.prediction, self.clip_x0,
                    self.default_steps, eta=1.0)

    def step(self, net, x, t, t_prev, cond=None, extra=None, generator=None, noise=None):
        a_t, a_p = self._coeffs(t, t_prev, x)
        eps, x0 = self.split(self._net(net, x, t, cond, extra), x, a_t)
        sigma = self.eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp_min(0).sqrt()
        mean = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp_min(0).sqrt() * eps
        return gaussian_step(x, mean, sigma, x0, generator, noise)
