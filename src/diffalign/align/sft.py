"""Supervised fine-tuning on filtered winners (rejection sampling with an OOD guard).

Each round samples candidates (from the reference or the current model), keeps the winners
by the critic (top-k per condition or a reward quantile over the batch), drops any winner
whose likelihood under the *reference* is below a threshold (out-of-distribution guard),
and trains the adapter with the plain diffusion loss on what remains (DESIGN §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .common import AdapterMethod, MethodConfig, expand_condition, free_mask

__all__ = ["SFTConfig", "SFTMethod"]


@dataclass
class SFTConfig(MethodConfig):
    """Filtered supervised fine-tuning."""

    states_per_round: int = 64
    """Conditions per round."""
    candidates: int = 16
    """Samples per condition."""
    source: Literal["reference", "current"] = "current"
    """Which model proposes candidates."""
    selection: Literal["topk", "quantile"] = "topk"
    """Winners: the top-k per condition, or those above a reward quantile of the round."""
    top_k: int = 1
    """k of top-k."""
    quantile: float = 0.9
    """Reward quantile of "quantile" selection."""
    likelihood_quantile: float = 0.1
    """OOD guard: drop winners whose reference likelihood is below this quantile of the
    likelihoods of all candidates of the round (0 disables the guard)."""
    likelihood_samples: int = 4
    """Noise draws of the likelihood proxy."""
    loss: Literal["min_snr", "diffusion"] = "min_snr"
    """"min_snr": the Min-SNR-γ weighted loss in x0 space
    (:meth:`~diffalign.processes.base.DiffusionProcess.min_snr_x0_loss`); "diffusion": the
    process's plain training loss. On Nav1D (Diffuser, regressing the first action onto the
    critic's argmax) the plain ε loss reached 73% of the optimum, min-SNR 85%."""
    min_snr_gamma: float = 1.0
    """γ of the min-SNR weighting."""
    plan_weight: float = 0.1
    """Loss weight of the entries that do not decide the executed action (the rest of a
    plan or chunk), relative to those that do (1 = all alike, 0 = the executed action only).
    The critic scored the winner by its executed action; the rest is mostly noise."""
    epochs: int = 4
    """Gradient steps per round on its winners."""
    batch_size: int = 64
    """Winners per gradient step."""
    lr: float = 3e-4
    """Adapter learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.top_k <= self.candidates:
            raise ValueError(f"top_k={self.top_k} must be in [1, candidates={self.candidates}]")
        if not 0 <= self.likelihood_quantile < 1 or not 0 < self.quantile < 1:
            raise ValueError(f"quantiles must be in [0, 1): likelihood_quantile="
                             f"{self.likelihood_quantile}, quantile={self.quantile}")
        if self.loss not in ("min_snr", "diffusion"):
            raise ValueError(f"loss must be 'min_snr' or 'diffusion', got loss={self.loss!r}")
        if self.min_snr_gamma <= 0 or not 0 <= self.plan_weight <= 1:
            raise ValueError(f"need min_snr_gamma > 0 and plan_weight in [0, 1], got "
                             f"min_snr_gamma={self.min_snr_gamma}, plan_weight="
                             f"{self.plan_weight}")
        if self.lr <= 0 or self.epochs < 1:
            raise ValueError(f"need lr > 0 and epochs >= 1, got lr={self.lr}, "
                             f"epochs={self.epochs}")


class SFTMethod(AdapterMethod):
    """One filtering round and ``epochs`` diffusion-loss steps per :meth:`step`."""

    name = "sft"

    @torch.no_grad()
    def winners(self):
        """Filtered winners ``x`` with their conditions, and round statistics."""
        cfg, n = self.cfg, self.cfg.candidates
        obs = self.setup.draw_states(cfg.states_per_round, self.gen)
        src = self.ref if cfg.source == "reference" else self.net
        out = self.model.sample(obs, n=n, generator=self.gen, steps=self.setup.steps, net=src)
        rows = obs.repeat_interleave(n, 0)
        r = self.setup.reward(out.x0, rows)
        if cfg.selection == "topk":
            top = r.view(-1, n).topk(cfg.top_k, dim=1).indices
            keep = torch.zeros_like(r, dtype=torch.bool).view(-1, n)
            keep.scatter_(1, top, True)
            keep = keep.view(-1)
        else:
            keep = r >= torch.quantile(r, cfg.quantile)
        stats = {"reward": float(r.mean()), "winner_reward": float(r[keep].mean())}
        if cfg.likelihood_quantile > 0:
            cond, inpaint, shape = expand_condition(self.model, obs, n)
            ll = self.model.process.likelihood(self.ref, out.x0, cond=cond,
                                               n_samples=cfg.likelihood_samples,
                                               generator=self.gen,
                                               mask=free_mask(inpaint, shape))
            ok = ll >= torch.quantile(ll, cfg.likelihood_quantile)
            stats["rejected_ood"] = float((keep & ~ok).sum()) / max(1, int(keep.sum()))
            keep = keep & ok
        stats["winners"] = int(keep.sum())
        return out.x0[keep], rows[keep], stats

    def loss(self, x: Tensor, cond, known, shape) -> Tensor:
        """The configured denoising loss of the adapter on winners ``x``."""
        cfg, proc = self.cfg, self.model.process
        if cfg.loss == "diffusion":
            return proc.loss(self.net, x, cond=cond, known=known, generator=self.gen)["loss"]
        weight = None
        if cfg.plan_weight < 1:
            executed = self.model.executed_mask(shape).to(x.device)
            weight = torch.where(executed, 1.0, cfg.plan_weight).to(x.dtype)
        return proc.min_snr_x0_loss(self.net, x, cond=cond, known=known, weight=weight,
                                    gamma=cfg.min_snr_gamma, generator=self.gen)["loss"]

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        x, obs, stats = self.winners()
        if len(x) == 0:
            return {**stats, "loss": float("nan")}
        losses = []
        for _ in range(cfg.epochs):
            idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=self.gen)
            cond, inpaint, shape = expand_condition(self.model, obs[idx], 1)
            known = None if inpaint is None else inpaint.mask.expand(shape)
            loss = self.loss(x[idx], cond, known, shape)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return {**stats, "loss": sum(losses) / len(losses)}
