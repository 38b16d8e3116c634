"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023).

``x_t = (1 − t) x_0 + t ε``; the network predicts the velocity ``v = ε − x_0``, so
``x̂_0 = x_t − t v̂`` and ``ε̂ = x_t + (1 − t) v̂``.

Samplers: ``"euler"`` and ``"heun"`` integrate the ODE (deterministic); ``"sde"`` injects
noise while keeping the marginals: with diffusion ``g(t)² = a² t`` the reverse SDE is
``x_{t−h} = x − h v̂ − h (a²/2) ε̂ + a √(t h) z``, a Gaussian transition whose log-prob RL
needs. For every sampler the final step (to t = 0) is the Euler step ``x − t v̂ = x̂_0``
(as in EDM's Heun sampler, the field is not evaluated at t = 0).
"""

from __future__ import annotations

import math

import torch

from .base import DiffusionProcess, _rand, gaussian_step

__all__ = ["FlowMatching"]

SAMPLERS = ("euler", "heun", "sde")


class FlowMatching(DiffusionProcess):
    """Rectified flow with velocity prediction."""

    def __init__(self, sampler: str = "euler", noise_level: float = 0.7,
                 default_steps: int = 20):
        """
        Args:
            sampler: "euler", "heun" (ODE) or "sde" (noise-injected, stochastic).
            noise_level: ``a`` in ``g(t) = a √t`` for the "sde" sampler.
            default_steps: sampling steps when ``sample`` is not told.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        self.sampler = sampler
        self.noise_level = noise_level
        self.default_steps = default_steps
        self.stochastic = sampler == "sde" and noise_level > 0

    def with_sampler(self, sampler: str) -> FlowMatching:
        """The same process with another sampler (e.g. "sde" for RL fine-tuning)."""
        return FlowMatching(sampler, self.noise_level, self.default_steps)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ((1 − t) / t)² at per-sample times ``(B,)``."""
        t = t.float()
        return ((1 - t) / t.clamp_min(1e-6)) ** 2

    def stochastic_variant(self) -> FlowMatching:
        return self if self.stochastic else FlowMatching("sde", self.noise_level or 0.7,
                                                         self.default_steps)

    def add_noise(self, x0, t, noise):
        t = t.to(x0).view(-1, 1, 1) if isinstance(t, torch.Tensor) else float(t)
        return (1 - t) * x0 + t * noise

    def sample_train_time(self, batch, generator, like):
        return _rand((batch,), generator, like)

    def target(self, x0, noise, t):
        return noise - x0

    def velocity(self, net, x, t, cond=None, extra=None):
        return self._net(net, x, t, cond, extra)

    def predict_x0(self, net, x, t, cond=None, extra=None):
        tt = t.to(x).view(-1, 1, 1) if isinstance(t, torch.Tensor) else float(t)
        return x - tt * self.velocity(net, x, t, cond, extra)

    def timesteps(self, steps):
        return torch.linspace(1.0, 0.0, self._check_steps(steps) + 1, dtype=torch.float64)

    def step(self, net, x, t, t_prev, cond=None, extra=None, generator=None, noise=None):
        t, t_prev = float(t), float(t_prev)
        h = t - t_prev
        v = self.velocity(net, x, t, cond, extra)
        x0 = x - t * v
        euler = x - h * v
        if self.sampler == "euler" or t_prev <= 0:
            return gaussian_step(x, euler, 0.0, x0, generator, None)
        if self.sampler == "heun":
            v2 = self.velocity(net, euler, t_prev, cond, extra)
            return gaussian_step(x, x - 0.5 * h * (v + v2), 0.0, x0, generator, None)
        a = self.noise_level
        eps = x + (1 - t) * v
        mean = euler - h * 0.5 * a**2 * eps
        return gaussian_step(x, mean, a * math.sqrt(t * h), x0, generator, noise)
