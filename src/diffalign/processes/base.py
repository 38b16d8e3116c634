"""The one interface shared by every diffusion process (docs/design.md §2).

Conventions used throughout:

* Data tensors have shape ``(B, H, D)`` (H = horizon, or 1 for flat data).
* Time is continuous, ``t ∈ [0, 1]``; ``t = 1`` is pure noise and ``t = 0`` is data.
  Discrete-time processes (DDPM, DDIM) map ``t = k / K`` onto their schedule index ``k``.
  Networks always receive ``t`` as a float tensor of shape ``(B,)``.
* A sampling run with ``steps = S`` visits the decreasing grid ``times[0] = 1 > … > times[S]``
  returned by :meth:`DiffusionProcess.timesteps`; one :meth:`step` moves from ``times[i]``
  to ``times[i + 1]``.
* Processes are stateless: no counters, no caches that depend on a previous call. A planner
  and a policy can share one instance.
* A transition of a stochastic sampler is Gaussian, ``x_prev ~ N(mean, std² I)``; the final
  transition (to ``t = 0``) is deterministic (``std = 0``), as in DDPM.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DiffusionProcess", "Inpaint", "SampleOutput", "StepOutput", "gaussian_log_prob",
           "gaussian_step", "masked_mean"]


@dataclass
class StepOutput:
    """Result of one reverse transition ``x_t -> x_prev``."""

    prev: Tensor
    """The sample at the next (lower) time, in-painting already applied."""
    mean: Tensor
    """Mean of the Gaussian transition (equals ``prev`` for deterministic samplers)."""
    std: Tensor
    """Standard deviation of the transition, shape ``(B, 1, 1)``; zero where deterministic."""
    x0_pred: Tensor
    """The network's prediction of the clean sample at the current time."""


@dataclass
class SampleOutput:
    """Result of a full sampling run."""

    x0: Tensor
    """The final clean sample ``(B, H, D)``."""
    chain: Tensor | None = None
    """``(S + 1, B, H, D)``: the sample at every grid time, from noise to data (detached)."""
    means: Tensor | None = None
    """``(S, B, H, D)``: the mean of each transition (detached)."""
    stds: Tensor | None = None
    """``(S, B, 1, 1)``: the std of each transition."""
    x0_preds: Tensor | None = None
    """``(S, B, H, D)``: the x0-prediction made at each step (detached)."""
    times: Tensor | None = None
    """``(S + 1,)``: the time grid that was used."""


@dataclass
class Inpaint:
    """Known entries to impose during sampling.

    ``value`` holds clean values; entries where ``mask`` is True are re-imposed after every
    step. By default they are imposed CLEAN at every noise level, as the planners are trained
    (:meth:`DiffusionProcess.loss` with ``known=``: the network sees clean known entries in a
    noisy ``x_t``, Janner et al.'s convention, docs/design.md §3). ``noised=True`` imposes them
    at the noise level of the step instead (RePaint), for entries the network was never
    trained to see clean, such as an in-painted action.
    """

    value: Tensor
    """Clean values, shape ``(B, H, D)`` (only masked entries are read)."""
    mask: Tensor
    """Bool tensor broadcastable to ``(B, H, D)``; True = known."""
    noised: bool | Tensor = False
    """Impose the known entries at the step's noise level (RePaint) instead of clean: all of
    them (True), or those where this bool tensor (broadcastable to ``(B, H, D)``) is True."""


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, mask: Tensor | None = None) -> Tensor:
    """Log-density of ``x`` under ``N(mean, std² I)``, summed over all but the batch dimension.

    ``mask`` (bool, broadcastable to ``x``) selects the entries that count: in-painted
    (known) entries are not random and should be excluded by passing ``~known``.
    """
    std = std.expand_as(x) if std.dim() == x.dim() else std
    var = std**2
    lp = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    if mask is not None:
        lp = lp * mask.to(lp.dtype)
    return lp.flatten(1).sum(1)


def _batch_time(t: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A ``(B,)`` float tensor of times on ``like``'s device."""
    if isinstance(t, Tensor):
        t = t.to(device=like.device, dtype=torch.float32)
        return t.expand(batch) if t.dim() == 0 else t
    return torch.full((batch,), float(t), device=like.device, dtype=torch.float32)


def _randn(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn from ``generator`` (device-aware)."""
    if generator is not None and generator.device != like.device:
        # A CPU generator drives a CUDA run: draw on CPU, then move (still reproducible).
        return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _rand(shape, generator: torch.Generator | None, like: Tensor) -> Tensor:
    if generator is not None and generator.device != like.device:
        return torch.rand(shape, generator=generator).to(like.device)
    return torch.rand(shape, generator=generator, device=like.device)


def gaussian_step(x: Tensor, mean: Tensor, std: Tensor | float, x0_pred: Tensor,
                  generator: torch.Generator | None, noise: Tensor | None) -> StepOutput:
    """Draw ``prev = mean + std * noise`` and package a :class:`StepOutput`.

    ``std`` may be a float, a 0-d tensor or ``(B, 1, 1)``; it is returned as ``(B, 1, 1)``.
    A zero std draws no random numbers (the generator is left untouched).
    """
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    std = std.expand(x.shape[0]).reshape(-1, 1, 1) if std.dim() == 0 else std
    if noise is None:
        noise = None if bool((std == 0).all()) else _randn(x.shape, generator, x)
    prev = mean if noise is None else mean + std * noise
    return StepOutput(prev=prev, mean=mean, std=std, x0_pred=x0_pred)


def masked_mean(err: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean of ``err`` over unmasked entries: returns (scalar, per-sample ``(B,)``)."""
    if mask is None:
        per = err.flatten(1).mean(1)
        return per.mean(), per
    m = mask.to(err.dtype).expand_as(err)
    num = (err * m).flatten(1).sum(1)
    den = m.flatten(1).sum(1)
    per = num / den.clamp_min(1.0)
    return num.sum() / den.sum().clamp_min(1.0), per


class DiffusionProcess(ABC):
    """Abstract base: forward noising, training loss, and reverse sampling."""

    #: Whether the default sampler is stochastic (transitions have a Gaussian log-prob).
    stochastic: bool = True
    #: Steps used by :meth:`sample` when ``steps`` is not given.
    default_steps: int = 20

    # ----- forward process -------------------------------------------------------------
    @abstractmethod
    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample of ``q(x_t | x_0)`` for per-sample times ``t`` ``(B,)``."""

    @abstractmethod
    def sample_train_time(self, batch: int, generator: torch.Generator | None, like: Tensor
                          ) -> Tensor:
        """Training times ``(B,)`` drawn from the process's training distribution."""

    @abstractmethod
    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio of ``x_t`` at per-sample times ``(B,)`` (for loss weighting)."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output at ``x_t`` (ε, x0, v or velocity)."""

    @abstractmethod
    def predict_x0(self, net, x: Tensor, t: float | Tensor, cond: Tensor | None = None,
                   extra: Tensor | None = None) -> Tensor:
        """The clean-sample prediction ``x̂_0(x_t)`` at time ``t``."""

    # ----- reverse process -------------------------------------------------------------
    @abstractmethod
    def timesteps(self, steps: int) -> Tensor:
        """Decreasing time grid ``(steps + 1,)`` from 1 to 0 (float64 on CPU)."""

    @abstractmethod
    def step(self, net, x: Tensor, t: float, t_prev: float, cond: Tensor | None = None,
             extra: Tensor | None = None, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> StepOutput:
        """One reverse transition from time ``t`` to ``t_prev < t`` (no in-painting)."""

    def stochastic_variant(self) -> DiffusionProcess:
        """This process with a stochastic sampler (Gaussian transitions), for RL.

        DDPM is already stochastic; DDIM gets η = 1 when it was deterministic; score matching
        uses Euler–Maruyama and flow matching its noise-injected SDE sampler. The network and
        its training are unchanged: only the sampler differs.
        """
        return self

    # ----- shared implementations ------------------------------------------------------
    def _net(self, net, x: Tensor, t: float | Tensor, cond, extra) -> Tensor:
        tb = _batch_time(t, x.shape[0], x)
        return net(x, tb, cond=cond, extra=extra)

    def _check_steps(self, steps: int) -> int:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got steps={steps!r}")
        return steps

    def loss(self, net, x0: Tensor, cond: Tensor | None = None, mask: Tensor | None = None,
             extra: Tensor | None = None, known: Tensor | None = None,
             t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None,
             weight: Tensor | None = None) -> dict[str, Tensor]:
        """Denoising loss (mean squared error on the process's target).

        Args:
            mask: bool ``(B, H, D)`` (or broadcastable); False entries (padding) are ignored.
            known: bool mask of in-painted entries for masked training: they are set to their
                clean values in ``x_t`` and excluded from the loss.
            t, noise: fix the time and noise (DPO uses the same for both members of a pair).
            weight: per-entry weights (broadcastable to ``x0``): a weighted mean over the
                entries the masks keep.

        Returns ``{"loss": scalar, "loss_per_sample": (B,)}``.
        """
        if x0.dim() != 3:
            raise ValueError(f"x0 must have shape (B, H, D), got {tuple(x0.shape)}")
        b = x0.shape[0]
        if t is None:
            t = self.sample_train_time(b, generator, x0)
        if noise is None:
            noise = _randn(x0.shape, generator, x0)
        xt = self.add_noise(x0, t, noise)
        if known is not None:
            known = known.expand_as(x0)
            xt = torch.where(known, x0, xt)
            free = ~known
            mask = free if mask is None else (mask.expand_as(x0) & free)
        out = net(xt, t, cond=cond, extra=extra)
        err = (out - self.target(x0, noise, t)) ** 2
        if weight is not None:
            w = weight.to(err).expand_as(err)
            mask = w if mask is None else w * mask.expand_as(err).to(err)
        loss, per = masked_mean(err, mask)
        return {"loss": loss, "loss_per_sample": per}

    def min_snr_x0_loss(self, net, x0: Tensor, cond: Tensor | None = None,
                        known: Tensor | None = None, weight: Tensor | None = None,
                        gamma: float = 1.0, generator: torch.Generator | None = None
                        ) -> dict[str, Tensor]:
        """Min-SNR-γ weighted denoising loss (Hang et al. 2023), written in x0 space.

        ``mean(w · min(SNR(t), γ) · (x̂0(x_t) − x0)²)`` over the free entries, with ``x̂0``
        the process's clean-sample prediction, so it means the same for every process. The
        plain ε loss is ``SNR · (x̂0 − x0)²``: it spends its weight on the low-noise steps that
        polish details; capping the weight at γ moves it to the noisy steps where a sample's
        mode is chosen. ``known`` entries are in-painted and excluded; ``weight`` (broadcast
        to ``x0``) weighs entries, e.g. the executed action.
        """
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got gamma={gamma}")
        b = x0.shape[0]
        t = self.sample_train_time(b, generator, x0)
        xt = self.add_noise(x0, t, _randn(x0.shape, generator, x0))
        w = torch.ones_like(x0) if weight is None else weight.to(x0).expand_as(x0)
        if known is not None:
            known = known.expand_as(x0)
            xt = torch.where(known, x0, xt)
            w = w * (~known).to(x0)
        snr_w = self.snr(t).to(x0).clamp(max=gamma).view(-1, 1, 1)
        err = snr_w * w * (self.predict_x0(net, xt, t, cond=cond) - x0) ** 2
        per = err.flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)
        return {"loss": err.sum() / w.sum().clamp_min(1e-12), "loss_per_sample": per}

    def likelihood(self, net, x0: Tensor, cond: Tensor | None = None,
                   extra: Tensor | None = None, n_samples: int = 8,
                   generator: torch.Generator | None = None,
                   mask: Tensor | None = None) -> Tensor:
        """A likelihood proxy of clean samples, ``(B,)``; higher means more likely.

        The negative expected denoising error over ``n_samples`` random times and noises
        (the ELBO up to weighting and constants). Used by SFT to reject winners that are
        out of the reference model's distribution.
        """
        total = torch.zeros(x0.shape[0], device=x0.device)
        with torch.no_grad():
            for _ in range(n_samples):
                out = self.loss(net, x0, cond=cond, extra=extra, mask=mask, generator=generator)
                total += out["loss_per_sample"]
        return -total / n_samples

    def impose(self, x: Tensor, t: float, inpaint: Inpaint | None,
                generator: torch.Generator | None) -> Tensor:
        """Re-impose known entries: clean, or at the noise level of time ``t`` when
        ``inpaint.noised``."""
        if inpaint is None:
            return x
        value = inpaint.value.to(x)
        noised = inpaint.noised
        if t > 0 and (noised is True or isinstance(noised, Tensor)):
            tb = _batch_time(t, x.shape[0], x)
            noisy = self.add_noise(value, tb, _randn(x.shape, generator, x))
            value = noisy if noised is True else torch.where(noised.expand_as(x), noisy, value)
        return torch.where(inpaint.mask.expand_as(x), value, x)

    def sample(self, net, shape: tuple[int, int, int], cond: Tensor | None = None,
               steps: int | None = None, inpaint: Inpaint | None = None,
               generator: torch.Generator | None = None, return_chain: bool = False,
               grad_last_k: int | None = None, extra: Tensor | None = None,
               device: torch.device | str | None = None, x_init: Tensor | None = None,
               ) -> SampleOutput:
        """Draw samples by running the reverse process on the grid of ``steps`` steps.

        Args:
            shape: ``(B, H, D)``.
            steps: number of denoising steps (default :attr:`default_steps`), chosen freely at
                sample time.
            inpaint: known entries re-imposed after every step (see :class:`Inpaint`).
            generator: a ``torch.Generator``; the same seed gives the same samples.
            return_chain: also return every intermediate sample, mean, std and x0-prediction.
            grad_last_k: ``None`` samples without gradients. An integer ``K`` runs the first
                ``steps - K`` steps under ``torch.no_grad`` and keeps the autograd graph only
                for the last ``K`` (truncated backpropagation through sampling), so memory is
                independent of the total step count.
            x_init: start from this noise instead of drawing it (shape ``shape``).
        """
        steps = self._check_steps(self.default_steps if steps is None else steps)
        if grad_last_k is not None and not (0 <= grad_last_k <= steps):
            raise ValueError(f"grad_last_k must be in [0, steps={steps}], got {grad_last_k}")
        if len(shape) != 3:
            raise ValueError(f"shape must be (B, H, D), got {tuple(shape)}")
        dev = torch.device(device) if device is not None else next(_params_or_buffers(net))
        times = self.timesteps(steps)
        like = torch.empty(0, device=dev)
        x = _randn(shape, generator, like) if x_init is None else x_init.to(dev)
        x = self.impose(x, float(times[0]), inpaint, generator)
        rec: dict[str, list[Tensor]] = {"chain": [x.detach()], "means": [], "stds": [],
                                        "x0_preds": []}
        first_grad = steps if grad_last_k is None else steps - grad_last_k
        for i in range(steps):
            t, t_prev = float(times[i]), float(times[i + 1])
            ctx = torch.no_grad() if i < first_grad else contextlib.nullcontext()
            with ctx:
                if i == first_grad:
                    x = x.detach()
                out = self.step(net, x, t, t_prev, cond=cond, extra=extra, generator=generator)
                x = self.impose(out.prev, t_prev, inpaint, generator)
            if return_chain:
                rec["chain"].append(x.detach())
                rec["means"].append(out.mean.detach())
                rec["stds"].append(out.std.detach())
                rec["x0_preds"].append(out.x0_pred.detach())
        if not return_chain:
            return SampleOutput(x0=x, times=times)
        return SampleOutput(
            x0=x, chain=torch.stack(rec["chain"]), means=torch.stack(rec["means"]),
            stds=torch.stack(rec["stds"]), x0_preds=torch.stack(rec["x0_preds"]), times=times)

    def log_prob(self, net, x: Tensor, x_prev: Tensor, t: float, t_prev: float,
                 cond: Tensor | None = None, extra: Tensor | None = None,
                 mask: Tensor | None = None) -> Tensor:
        """Log-probability ``log p_θ(x_prev | x_t)`` of one transition, ``(B,)``.

        Differentiable in the network's parameters (used by REINFORCE/PPO). ``mask`` selects
        the free (not in-painted) entries. Raises for deterministic transitions.
        """
        out = self.step(net, x, t, t_prev, cond=cond, extra=extra,
                        noise=torch.zeros_like(x))
        if bool((out.std <= 0).any()):
            raise ValueError(
                f"transition t={t:.4f} -> t_prev={t_prev:.4f} of {type(self).__name__} is "
                "deterministic (std=0): it has no Gaussian log-prob; use a stochastic sampler "
                "or drop the final step")
        return gaussian_log_prob(x_prev, out.mean, out.std, mask)


def _params_or_buffers(net):
    """Yield the device of the first parameter or buffer of ``net`` (CPU if it has none)."""
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            yield p.device
        for b in net.buffers():
            yield b.device
    yield torch.device("cpu")
