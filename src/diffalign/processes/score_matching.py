"""Score matching with the continuous-time VP-SDE (Song et al. 2021).

Forward SDE ``dx = -½β(t) x dt + √β(t) dW`` with ``β(t) = β_min + t (β_max − β_min)``, so
``x_t = √ᾱ(t) x_0 + √(1−ᾱ(t)) ε`` with ``log ᾱ(t) = −(β_min t + ½(β_max−β_min) t²)``.
The network predicts ε; the score is ``s = −ε̂ / √(1−ᾱ(t))``.

Samplers: ``"em"`` (Euler–Maruyama on the reverse SDE, stochastic) and ``"ode"`` (Euler on the
probability-flow ODE, deterministic). The last step (to t = 0) returns the x0-prediction
(Tweedie denoising), as score-SDE samplers do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import DiffusionProcess, _rand, gaussian_step

__all__ = ["ScoreMatching"]

SAMPLERS = ("em", "ode")


class ScoreMatching(DiffusionProcess):
    """Continuous-time VP-SDE score model with ε-parameterisation."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, sampler: str = "em",
                 t_min: float = 1e-3, default_steps: int = 50):
        """
        Args:
            beta_min, beta_max: the linear β(t) range of the VP-SDE.
            sampler: "em" (Euler–Maruyama, stochastic) or "ode" (probability flow).
            t_min: smallest training time (the score is singular at t = 0).
            default_steps: sampling steps when ``sample`` is not told.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max
        self.sampler = sampler
        self.t_min = t_min
        self.default_steps = default_steps
        self.stochastic = sampler == "em"

    def with_sampler(self, sampler: str) -> ScoreMatching:
        """The same process with another sampler (processes are stateless, so this is cheap)."""
        return ScoreMatching(self.beta_min, self.beta_max, sampler, self.t_min,
                             self.default_steps)

    def stochastic_variant(self) -> ScoreMatching:
        return self if self.sampler == "em" else self.with_sampler("em")

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_abar(self, t):
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def _abar(self, t: Tensor | float, like: Tensor) -> Tensor:
        if isinstance(t, Tensor):
            return torch.exp(self.log_abar(t.to(like))).view(-1, 1, 1)
        return torch.tensor(math.exp(self.log_abar(float(t))), dtype=like.dtype,
                            device=like.device)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ / (1 − ᾱ) at per-sample times ``(B,)``."""
        a = torch.exp(self.log_abar(t.float()))
        return a / (1 - a).clamp_min(1e-12)

    def add_noise(self, x0, t, noise):
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sample_train_time(self, batch, generator, like):
        return self.t_min + (1 - self.t_min) * _rand((batch,), generator, like)

    def target(self, x0, noise, t):
        return noise

    def _eps_x0(self, net, x, t, cond, extra):
        a = self._abar(t, x)
        eps = self._net(net, x, t, cond, extra)
        return eps, (x - (1 - a).sqrt() * eps) / a.sqrt()

    def predict_x0(self, net, x, t, cond=None, extra=None):
        return self._eps_x0(net, x, t, cond, extra)[1]

    def score(self, net, x, t, cond=None, extra=None) -> Tensor:
        """∇ log p_t(x) ≈ −ε̂ / σ_t."""
        a = self._abar(t, x)
        return -self._net(net, x, t, cond, extra) / (1 - a).sqrt()

    def timesteps(self, steps):
        return torch.linspace(1.0, 0.0, self._check_steps(steps) + 1, dtype=torch.float64)

    def step(self, net, x, t, t_prev, cond=None, extra=None, generator=None, noise=None):
        t = max(float(t), self.t_min)
        eps, x0 = self._eps_x0(net, x, t, cond, extra)
        if t_prev <= 0:
            return gaussian_step(x, x0, 0.0, x0, generator, None)
        h = t - float(t_prev)
        b = self.beta(t)
        s = -eps / (1 - self._abar(t, x)).sqrt()
        if self.sampler == "ode":
            return gaussian_step(x, x + h * 0.5 * b * (x + s), 0.0, x0, generator, None)
        mean = x + h * (0.5 * b * x + b * s)
        return gaussian_step(x, mean, math.sqrt(b * h), x0, generator, noise)
