"""Diffusion-DPO (Wallace et al. 2024) for any of the four processes (DESIGN §4).

``L = −log σ(−β · w(t) · [(e_θ(x^w) − e_ref(x^w)) − (e_θ(x^l) − e_ref(x^l))])``, where
``e(x) = ‖target − net(x_t)‖²`` is the denoising error of the process (ε-error for DDPM/SM,
velocity error for flow matching) at the *same* time t and noise ε for both members of a
pair, and ``w`` an SNR weighting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["diffusion_dpo_loss", "dpo_loss", "snr_weight"]


def dpo_loss(err_w: Tensor, err_ref_w: Tensor, err_l: Tensor, err_ref_l: Tensor,
             beta: float, weight: Tensor | float = 1.0) -> dict[str, Tensor]:
    """The pure Diffusion-DPO loss from per-pair denoising errors (all ``(B,)``).

    Returns ``loss`` plus diagnostics: ``accuracy`` (fraction of pairs where the model
    improved more on the winner than on the loser) and ``margin`` (the bracketed term).
    """
    margin = (err_w - err_ref_w) - (err_l - err_ref_l)
    logits = -beta * weight * margin
    return {
        "loss": -F.logsigmoid(logits).mean(),
        "accuracy": (margin < 0).float().mean().detach(),
        "margin": margin.mean().detach(),
    }


def snr_weight(process, t: Tensor, kind: str = "constant", gamma: float = 5.0) -> Tensor:
    """Weighting ``w(t)``: "constant" (1) or "min_snr" (``min(SNR, γ) / SNR``, Hang 2023)."""
    if kind == "constant":
        return torch.ones_like(t)
    if kind == "min_snr":
        snr = process.snr(t)
        return snr.clamp(max=gamma) / snr.clamp_min(1e-8)
    raise ValueError(f"unknown weighting {kind!r}; choose 'constant' or 'min_snr'")


def diffusion_dpo_loss(process, net, ref_net, x_w: Tensor, x_l: Tensor, beta: float = 1000.0,
                       cond: Tensor | None = None, mask: Tensor | None = None,
                       known: Tensor | None = None, weighting: str = "constant",
                       generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Diffusion-DPO on winner/loser batches ``x_w, x_l`` ``(B, H, D)`` (clean, normalised).

    One time and one noise per pair, shared by winner, loser, model and reference. The
    reference is evaluated without gradient.
    """
    if x_w.shape != x_l.shape:
        raise ValueError(f"winner {tuple(x_w.shape)} and loser {tuple(x_l.shape)} differ in shape")
    b = x_w.shape[0]
    t = process.sample_train_time(b, generator, x_w)
    noise = torch.randn(x_w.shape, generator=generator, device="cpu").to(x_w)
    kw = dict(cond=cond, mask=mask, known=known, t=t, noise=noise)
    err_w = process.loss(net, x_w, **kw)["loss_per_sample"]
    err_l = process.loss(net, x_l, **kw)["loss_per_sample"]
    with torch.no_grad():
        err_ref_w = process.loss(ref_net, x_w, **kw)["loss_per_sample"]
        err_ref_l = process.loss(ref_net, x_l, **kw)["loss_per_sample"]
    return dpo_loss(err_w, err_ref_w, err_l, err_ref_l, beta, snr_weight(process, t, weighting))
