"""DDPM (Ho et al. 2020): discrete Gaussian diffusion with ε-, x0- or v-prediction.

Time ``t = k / K`` maps onto the schedule index ``k ∈ {0..K}``; the network sees ``t``.
Sampling with ``steps < K`` visits an evenly spaced subset of indices and uses the exact
posterior of the skipped chain, ``q(x_{k'} | x_k, x̂_0)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DiffusionProcess, _rand, gaussian_step
from .schedules import alpha_bar_schedule

__all__ = ["DDPM", "PREDICTIONS"]

PREDICTIONS = ("eps", "x0", "v")


class DDPM(DiffusionProcess):
    """Discrete-time Gaussian diffusion; the reverse kernel is the posterior with variance β̃."""

    stochastic = True

    def __init__(self, num_train_steps: int = 100, schedule: str = "cosine",
                 prediction: str = "eps", clip_x0: float | None = None,
                 default_steps: int = 20):
        """
        Args:
            num_train_steps: K, the number of discrete noise levels.
            schedule: "linear" or "cosine".
            prediction: what the network outputs: "eps", "x0" or "v".
            clip_x0: clamp the x0-prediction to [-clip_x0, clip_x0] while sampling
                (Diffuser does this for data normalised to [-1, 1]); None disables it.
            default_steps: sampling steps when ``sample`` is not told.
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if default_steps < 1 or default_steps > num_train_steps:
            raise ValueError(f"default_steps={default_steps} must be in [1, num_train_steps="
                             f"{num_train_steps}]")
        self.num_train_steps = num_train_steps
        self.schedule = schedule
        self.prediction = prediction
        self.clip_x0 = clip_x0
        self.default_steps = default_steps
        self.alpha_bar = alpha_bar_schedule(schedule, num_train_steps)  # (K+1,) float64

    # ----- schedule lookups -------------------------------------------------------------
    def _index(self, t: Tensor | float) -> Tensor:
        k = torch.as_tensor(t, dtype=torch.float64, device="cpu") * self.num_train_steps
        return k.round().long().clamp(0, self.num_train_steps)

    def abar(self, t: Tensor | float, like: Tensor) -> Tensor:
        """ᾱ(t) shaped ``(B, 1, 1)`` (or a 0-d tensor for a float ``t``) on ``like``'s device."""
        a = self.alpha_bar[self._index(t.detach().cpu() if isinstance(t, Tensor) else t)]
        a = a.to(device=like.device, dtype=like.dtype)
        return a.view(-1, 1, 1) if a.dim() == 1 else a

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ / (1 − ᾱ) at per-sample times ``(B,)``."""
        a = self.abar(t, t.float()).view(-1)
        return a / (1 - a).clamp_min(1e-12)

    # ----- forward process ------------------------------------------------------------
    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sample_train_time(self, batch, generator, like):
        k = (_rand((batch,), generator, like) * self.num_train_steps).floor() + 1
        return k.clamp(1, self.num_train_steps) / self.num_train_steps

    def target(self, x0, noise, t):
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = self.abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    # ----- network output -> (eps, x0) --------------------------------------------------
    def split(self, out: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Convert the network output at ``x_t`` (signal level ``a = ᾱ_t``) into (ε̂, x̂0)."""
        sa, s1 = a.sqrt(), (1 - a).sqrt()
        if self.prediction == "eps":
            eps, x0 = out, (x - s1 * out) / sa
        elif self.prediction == "x0":
            x0, eps = out, (x - sa * out) / s1
        else:
            x0, eps = sa * x - s1 * out, s1 * x + sa * out
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - sa * x0) / s1
        return eps, x0

    def predict_x0(self, net, x, t, cond=None, extra=None):
        a = self.abar(t if isinstance(t, Tensor) else torch.full((x.shape[0],), float(t)), x)
        return self.split(self._net(net, x, t, cond, extra), x, a)[1]

    # ----- reverse process ------------------------------------------------------------
    def timesteps(self, steps: int) -> Tensor:
        steps = self._check_steps(steps)
        if steps > self.num_train_steps:
            raise ValueError(f"steps={steps} exceeds num_train_steps={self.num_train_steps}")
        k = torch.linspace(self.num_train_steps, 0, steps + 1, dtype=torch.float64).round()
        return k / self.num_train_steps

    def _coeffs(self, t: float, t_prev: float, like: Tensor):
        a_t = self.abar(float(t), like)
        a_p = self.abar(float(t_prev), like)
        return a_t, a_p

    def step(self, net, x, t, t_prev, cond=None, extra=None, generator=None, noise=None):
        a_t, a_p = self._coeffs(t, t_prev, x)
        eps, x0 = self.split(self._net(net, x, t, cond, extra), x, a_t)
        alpha = a_t / a_p
        beta = 1 - alpha
        mean = (a_p.sqrt() * beta / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_p) / (1 - a_t)) * x
        var = (1 - a_p) / (1 - a_t) * beta
        return gaussian_step(x, mean, var.clamp_min(0).sqrt(), x0, generator, noise)
