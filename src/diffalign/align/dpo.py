"""Diffusion-DPO (Wallace et al. 2024) for any of the four processes (docs/design.md §4).

``L = −log σ(−β · w(t) · [(e_θ(x^w) − e_ref(x^w)) − (e_θ(x^l) − e_ref(x^l))])``, where
``e(x) = ‖target − net(x_t)‖²`` is the denoising error of the process (ε-error for DDPM/SM,
velocity error for flow matching) at the *same* time t and noise ε for both members of a
pair, and ``w`` an SNR weighting.

Pairs come from model samples ranked by the critic (``pair_source`` "reference" or
"current") or from the dataset (``"dataset"``, :func:`dataset_pairs`): among the dataset
windows whose first states are nearest neighbours, the one with the highest discounted
return-to-go wins over the one with the lowest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.windows import episode_return_to_go
from .common import AdapterMethod, MethodConfig, expand_condition

__all__ = ["DPOConfig", "DPOMethod", "dataset_pairs", "diffusion_dpo_loss", "dpo_loss",
           "snr_weight"]


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


@dataclass
class DPOConfig(MethodConfig):
    """Diffusion-DPO fine-tuning on preference pairs ranked by the critic."""

    beta: float = 500.0
    """Inverse temperature β of the preference model (Diffusion-DPO uses O(10³))."""
    weighting: Literal["constant", "min_snr"] = "constant"
    """SNR weighting w(t) of the per-pair term."""
    states_per_update: int = 32
    """Conditions (pairs) per update."""
    candidates: int = 8
    """Samples per condition; the best and the worst by R form the pair."""
    pair_source: Literal["reference", "current", "dataset"] = "reference"
    """Where pairs come from: samples of the frozen reference (off-policy, classic DPO) or of
    the current aligned model (on-policy, iterated DPO), ranked by the critic; or dataset
    windows ranked by their return (:func:`dataset_pairs`; ``candidates`` is then the
    number of nearest-neighbour windows compared)."""
    discount: float = 0.99
    """Discount of the dataset return-to-go that ranks dataset pairs."""
    max_windows: int = 20000
    """Dataset windows considered for dataset pairs (a random subset of larger datasets)."""
    updates_per_batch: int = 2
    """Gradient steps on each batch of pairs."""
    lr: float = 3e-4
    """Adapter learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""

    def __post_init__(self):
        super().__post_init__()
        if self.candidates < 2:
            raise ValueError(f"DPO needs candidates >= 2 to form pairs, got {self.candidates}")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError(f"need beta > 0 and lr > 0, got beta={self.beta}, lr={self.lr}")
        if not 0 < self.discount <= 1 or self.max_windows < 2:
            raise ValueError(f"need 0 < discount <= 1 and max_windows >= 2, got discount="
                             f"{self.discount}, max_windows={self.max_windows}")


@torch.no_grad()
def dataset_pairs(model, episodes, neighbours: int = 8, discount: float = 0.99,
                  max_windows: int = 20000, seed: int = 0) -> dict[str, Tensor]:
    """Preference pairs from the dataset, ranked by return (docs/design.md §4).

    Each of up to ``max_windows`` training windows of ``model`` (the layout it trains on) is
    an anchor; among its ``neighbours`` nearest windows by first observation (normalised;
    the anchor included), the one with the highest discounted return-to-go from its first
    step is the winner and the one with the lowest the loser. Anchors whose neighbours all
    have the same return give no pair. Returns ``x_w, x_l`` (normalised windows),
    ``obs`` (the winner's RAW observation history, the pair's shared condition) and ``gap``
    (the return difference), each with one row per pair.
    """
    if neighbours < 2:
        raise ValueError(f"dataset pairs need neighbours >= 2, got neighbours={neighbours}")
    ds = model.make_dataset(episodes)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(ds))
    if len(idx) > max_windows:
        idx = np.sort(rng.choice(idx, size=max_windows, replace=False))
    batch = ds.get_batch(idx)
    hist = batch["obs_history"]  # normalised
    first = hist[:, -1]
    rtg = torch.as_tensor(episode_return_to_go(episodes, discount)[ds.indices[idx, 0]])
    k = min(neighbours, len(idx))
    nn_idx = torch.cat([torch.cdist(first[i:i + 4096], first).topk(k, largest=False).indices
                        for i in range(0, len(first), 4096)])  # (M, k)
    r = rtg[nn_idx]
    win = nn_idx.gather(1, r.argmax(1, keepdim=True))[:, 0]
    lose = nn_idx.gather(1, r.argmin(1, keepdim=True))[:, 0]
    gap = rtg[win] - rtg[lose]
    keep = gap > 0
    if not bool(keep.any()):
        raise ValueError("no dataset pairs: every window's neighbours have the same return")
    win, lose = win[keep], lose[keep]
    x = model.diffused(batch)
    return {"x_w": x[win], "x_l": x[lose],
            "obs": model.unnorm("observations", hist[win]), "gap": gap[keep].float()}


class DPOMethod(AdapterMethod):
    """One batch of pairs and ``updates_per_batch`` DPO steps per :meth:`step`."""

    name = "dpo"

    def __init__(self, setup, net, cfg, generator):
        super().__init__(setup, net, cfg, generator)
        self._data_pairs = None
        if cfg.pair_source == "dataset":
            if setup.episodes is None:
                raise ValueError("pair_source='dataset' needs the dataset (AlignSetup.episodes)")
            self._data_pairs = {k: v.to(self.model.device) for k, v in dataset_pairs(
                self.model, setup.episodes, cfg.candidates, cfg.discount, cfg.max_windows,
                seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator))).items()}

    @torch.no_grad()
    def pairs(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """Winner, loser (normalised samples), their conditions, and the mean reward gap."""
        cfg, n = self.cfg, self.cfg.candidates
        if self._data_pairs is not None:
            d = self._data_pairs
            i = torch.randint(0, len(d["gap"]), (cfg.states_per_update,), generator=self.gen)
            i = i.to(d["gap"].device)
            return d["x_w"][i], d["x_l"][i], d["obs"][i], float(d["gap"][i].mean())
        obs = self.setup.draw_states(cfg.states_per_update, self.gen)
        gen_net = self.ref if cfg.pair_source == "reference" else self.net
        out = self.model.sample(obs, n=n, generator=self.gen, steps=self.setup.steps,
                                net=gen_net)
        r = self.setup.reward(out.x0, obs.repeat_interleave(n, 0)).view(-1, n)
        x = out.x0.view(-1, n, *out.x0.shape[1:])
        ar = torch.arange(x.shape[0], device=x.device)
        win, lose = x[ar, r.argmax(1)], x[ar, r.argmin(1)]
        return win, lose, obs, float((r.max(1).values - r.min(1).values).mean())

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        x_w, x_l, obs, gap = self.pairs()
        cond, inpaint, shape = expand_condition(self.model, obs, 1)
        known = None if inpaint is None else inpaint.mask.expand(shape)
        stats = {}
        for _ in range(cfg.updates_per_batch):
            out = diffusion_dpo_loss(self.model.process, self.net, self.ref, x_w, x_l,
                                     beta=cfg.beta, cond=cond, known=known,
                                     weighting=cfg.weighting, generator=self.gen)
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            stats = {k: float(v.detach()) for k, v in out.items()}
        stats["reward_gap"] = gap
        return stats
