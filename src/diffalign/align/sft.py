"""Supervised fine-tuning on filtered winners (rejection sampling with an OOD guard).

Each round samples candidates (from the reference or the current model), keeps the winners
by the critic (top-k per condition or a reward quantile over the batch), drops any winner
whose likelihood under the *reference* is below a threshold (out-of-distribution guard;
by default a low quantile of the reference's likelihood of the dataset's own windows),
and trains the adapter with the plain diffusion loss on what remains (docs/design.md §4).

With ``action_proposals > 0`` the executed action is searched more finely than by sampling:
the critic ranks the candidates' first actions together with proposals spread over the
data's action range, and the source model in-paints a new sample around the best one (the
rest of the plan or action chunk). With ``replay`` the winners of earlier rounds stay in a
buffer the adapter keeps training on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..processes import Inpaint
from .common import AdapterMethod, MethodConfig, expand_condition, free_mask
from .conditions import action_proposals
from .lora import merged_view

__all__ = ["SFTConfig", "SFTMethod"]


@dataclass
class SFTConfig(MethodConfig):
    """Filtered supervised fine-tuning."""

    states_per_update: int = 64
    """Conditions per update (one round: sample, filter, train)."""
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
    likelihoods of ``likelihood_source`` (0 disables the guard)."""
    likelihood_source: Literal["data", "current"] = "data"
    """Where the guard's threshold comes from. "data" (the paper's): the quantile of the
    reference's likelihood of the dataset's own training windows, computed once per method
    (needs ``AlignSetup.episodes``), so a winner is kept only if it is as likely under the
    reference as most of the data. "current": the quantile of the round's own candidates,
    a relative filter that drops the least likely winners of each round, however far
    from the data all of them are."""
    likelihood_windows: int = 2048
    """"data": dataset windows (a random subset, fixed per method) whose likelihood sets the
    threshold."""
    likelihood_samples: int = 4
    """Noise draws of the likelihood proxy."""
    loss: Literal["min_snr", "diffusion"] = "min_snr"
    """"min_snr": the Min-SNR-γ weighted loss in x0 space
    (:meth:`~diffalign.processes.base.DiffusionProcess.min_snr_x0_loss`); "diffusion": the
    process's plain training loss. On Nav1D (Diffuser, regressing the first action onto the
    critic's argmax) the plain ε loss reached 73% of the optimum, min-SNR 85%."""
    action_proposals: int = 0
    """Proposals for the executed (first) action spread over the data's action range: an even
    grid for one action dimension, uniform draws otherwise. When > 0, the critic ranks them
    with the candidates' own first actions, and each condition's winner is a new sample of
    the source model with the best action in-painted (top-k and quantile selection do not
    apply). 0: winners are whole candidates. On Nav1D (Diffuser, layout 0, 1024 states, 1000
    steps from the reference) 201 proposals reached 79.6% of the optimum and the critic's
    best of 64 candidates 72.1%; 201 proposals on 4096 states, 2000 steps, 86.5%. Models that
    infer actions from states (dd) cannot take it.
    Use it only where the critic has seen every action (random-policy data): elsewhere the
    proposals leave the data's support."""
    replay: int = 0
    """Winners of earlier rounds kept for training (a first-in-first-out buffer of this many,
    the current round's included); 0 trains each round on its own winners only."""
    min_snr_gamma: float = 1.0
    """γ of the min-SNR weighting."""
    plan_weight: float = 0.1
    """Loss weight of the entries that do not decide the executed action (the rest of a
    plan or chunk), relative to those that do (1 = all alike, 0 = the executed action only).
    The critic scored the winner by its executed action; the rest is mostly noise."""
    epochs: int = 4
    """Gradient steps per round, on the round's winners (with ``replay``: on the buffer)."""
    batch_size: int = 64
    """Winners per gradient step."""
    lr: float = 3e-4
    """Adapter learning rate."""
    lr_final: float = 1.0
    """With ``max_updates``: the learning rate falls along a cosine from ``lr`` at the first
    round to ``lr_final · lr`` at round ``max_updates`` (1 = constant). A guard's lowering
    of the rate on a collapse multiplies the schedule. In ``run nav1d`` (24 rounds, 512
    validation states) 0.1 brought the final stage to 88.7% of the optimum on one layout-0
    foundation and 86.9% on layout 1, against 90.0% and 91.5% with a constant rate, so it is
    not the default."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.top_k <= self.candidates:
            raise ValueError(f"top_k={self.top_k} must be in [1, candidates={self.candidates}]")
        if not 0 <= self.likelihood_quantile < 1 or not 0 < self.quantile < 1:
            raise ValueError(f"quantiles must be in [0, 1): likelihood_quantile="
                             f"{self.likelihood_quantile}, quantile={self.quantile}")
        if self.likelihood_source not in ("data", "current"):
            raise ValueError(f"likelihood_source must be 'data' or 'current', got "
                             f"likelihood_source={self.likelihood_source!r}")
        if self.likelihood_windows < 1 or self.likelihood_samples < 1:
            raise ValueError(f"need likelihood_windows >= 1 and likelihood_samples >= 1, got "
                             f"likelihood_windows={self.likelihood_windows}, "
                             f"likelihood_samples={self.likelihood_samples}")
        if self.loss not in ("min_snr", "diffusion"):
            raise ValueError(f"loss must be 'min_snr' or 'diffusion', got loss={self.loss!r}")
        if self.min_snr_gamma <= 0 or not 0 <= self.plan_weight <= 1:
            raise ValueError(f"need min_snr_gamma > 0 and plan_weight in [0, 1], got "
                             f"min_snr_gamma={self.min_snr_gamma}, plan_weight="
                             f"{self.plan_weight}")
        if self.action_proposals < 0 or self.replay < 0:
            raise ValueError(f"need action_proposals >= 0 and replay >= 0, got action_proposals="
                             f"{self.action_proposals}, replay={self.replay}")
        if not 0 < self.lr_final <= 1:
            raise ValueError(f"lr_final must be in (0, 1], got lr_final={self.lr_final}")
        if self.lr <= 0 or self.epochs < 1:
            raise ValueError(f"need lr > 0 and epochs >= 1, got lr={self.lr}, "
                             f"epochs={self.epochs}")


class SFTMethod(AdapterMethod):
    """One filtering round and ``epochs`` diffusion-loss steps per :meth:`step`."""

    name = "sft"

    def __init__(self, setup, net, cfg: SFTConfig, generator: torch.Generator):
        super().__init__(setup, net, cfg, generator)
        self._first_action = None
        if cfg.action_proposals > 0:
            shape = self.model.expanded_condition(setup.val_states[:1], 1)[2]
            self._first_action = self.model.first_action_mask(shape)
            if self._first_action is None:
                raise ValueError(f"action_proposals={cfg.action_proposals} needs a model that "
                                 f"samples its actions; {type(self.model).__name__} infers "
                                 "them from states (use action_proposals=0)")
        if (cfg.likelihood_quantile > 0 and cfg.likelihood_source == "data"
                and setup.episodes is None):
            raise ValueError("likelihood_source='data' needs the dataset (AlignSetup.episodes); "
                             "use likelihood_source='current' or likelihood_quantile=0")
        self._buffer: tuple[Tensor, Tensor] | None = None
        self._round, self._lr_factor = 0, 1.0
        self._data_floor: float | None = None

    def _schedule_lr(self) -> None:
        """Scale the optimiser's rate to this round's point of the cosine (``lr_final``)."""
        cfg = self.cfg
        if cfg.lr_final < 1 and cfg.max_updates:
            frac = min(1.0, self._round / max(1, cfg.max_updates - 1))
            f = cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in self.optimizer.param_groups:
                group["lr"] *= f / self._lr_factor
            self._lr_factor = f
        self._round += 1

    @torch.no_grad()
    def winners(self):
        """Filtered winners ``x`` with their conditions, and round statistics."""
        cfg, n = self.cfg, self.cfg.candidates
        obs = self.setup.draw_states(cfg.states_per_update, self.gen)
        # sampling only: the current adapter folded into a copy is the same model, faster
        src = self.ref if cfg.source == "reference" else merged_view(self.net)
        out = self.model.sample(obs, n=n, generator=self.gen, steps=self.setup.steps, net=src)
        rows = obs.repeat_interleave(n, 0)
        r = self.setup.reward(out.x0, rows)
        if cfg.action_proposals > 0:
            x, stats = self._searched_winners(obs, out.x0, r, src)
            keep = torch.ones(len(x), dtype=torch.bool, device=x.device)
            if cfg.likelihood_quantile > 0:  # below the floor: off the data
                floor = self._floor(out.x0, obs, n)
                keep = self._ref_likelihood(x, obs, 1) >= floor
                stats["rejected_ood"] = float((~keep).float().mean())
                stats["likelihood_floor"] = float(floor)
            stats["winners"] = int(keep.sum())
            return x[keep], obs[keep], stats
        if cfg.selection == "topk":
            top = r.view(-1, n).topk(cfg.top_k, dim=1).indices
            keep = torch.zeros_like(r, dtype=torch.bool).view(-1, n)
            keep.scatter_(1, top, True)
            keep = keep.view(-1)
        else:
            keep = r >= torch.quantile(r, cfg.quantile)
        stats = {"reward": float(r.mean()), "winner_reward": float(r[keep].mean())}
        if cfg.likelihood_quantile > 0:
            if cfg.likelihood_source == "current":
                ll = self._ref_likelihood(out.x0, obs, n)
                floor = torch.quantile(ll, cfg.likelihood_quantile)
            else:  # only the winners need scoring against the data's floor
                floor = self._floor(out.x0, obs, n)
                ll = torch.full_like(r, -math.inf)
                ll[keep] = self._ref_likelihood(out.x0[keep], rows[keep], 1)
            ok = ll >= floor
            stats["rejected_ood"] = float((keep & ~ok).sum()) / max(1, int(keep.sum()))
            stats["likelihood_floor"] = float(floor)
            keep = keep & ok
        stats["winners"] = int(keep.sum())
        return out.x0[keep], rows[keep], stats

    def _floor(self, x0: Tensor, obs: Tensor, n: int) -> Tensor:
        """The OOD guard's threshold: the data's (:meth:`data_floor`) or the quantile of this
        round's candidates ``x0`` (``n`` per row of ``obs``)."""
        if self.cfg.likelihood_source == "data":
            return torch.tensor(self.data_floor(), device=x0.device)
        return torch.quantile(self._ref_likelihood(x0, obs, n), self.cfg.likelihood_quantile)

    @torch.no_grad()
    def data_floor(self, seed: int = 8642) -> float:
        """The ``likelihood_quantile`` of the reference's likelihood proxy on up to
        ``likelihood_windows`` of the model's training windows of the dataset
        (``model.make_dataset(episodes)``), computed on the first call and cached."""
        if self._data_floor is None:
            cfg, model = self.cfg, self.model
            ds = model.make_dataset(self.setup.episodes)
            rng = np.random.default_rng(seed)
            idx = np.arange(len(ds))
            if len(idx) > cfg.likelihood_windows:
                idx = np.sort(rng.choice(idx, size=cfg.likelihood_windows, replace=False))
            batch = ds.get_batch(idx)
            x = model.diffused(batch).to(model.device)
            obs = model.unnorm("observations", batch["obs_history"]).to(model.device)
            g = torch.Generator().manual_seed(seed)  # leaves the method's own stream alone
            ll = torch.cat([self._ref_likelihood(x[i:i + 1024], obs[i:i + 1024], 1, g)
                            for i in range(0, len(x), 1024)])
            self._data_floor = float(torch.quantile(ll.float().cpu(), cfg.likelihood_quantile))
        return self._data_floor

    def _ref_likelihood(self, x: Tensor, obs: Tensor, n: int,
                        generator: torch.Generator | None = None) -> Tensor:
        """The reference's likelihood proxy of samples ``x`` (``n`` per row of ``obs``)."""
        cond, inpaint, shape = expand_condition(self.model, obs, n)
        return self.model.process.likelihood(self.ref, x, cond=cond,
                                             n_samples=self.cfg.likelihood_samples,
                                             generator=generator or self.gen,
                                             mask=free_mask(inpaint, shape))

    def _searched_winners(self, obs: Tensor, x0: Tensor, r: Tensor, src
                          ) -> tuple[Tensor, dict[str, float]]:
        """One winner per condition: the best of the candidates' first actions and the
        proposals, by the critic, in-painted into a new sample of ``src``."""
        cfg, model, n = self.cfg, self.model, self.cfg.candidates
        s, p = len(obs), cfg.action_proposals
        first = self._first_action.expand(x0.shape)  # (B, H, D) bool
        act_dim = int(first[0].sum())
        own = x0[first].view(s, n, act_dim)
        box = torch.ones(act_dim)
        grid = action_proposals(s, p, -box, box, self.gen).to(x0.device)
        acts = torch.cat([own, grid], 1)  # (S, n + P, act_dim), normalised
        m = acts.shape[1]
        # score each proposal in the first candidate's sample of its condition
        trial = x0.view(s, n, *x0.shape[1:])[:, :1].expand(s, m, *x0.shape[1:]).clone()
        trial = trial.reshape(s * m, *x0.shape[1:])
        trial[first[:1].expand(trial.shape)] = acts.reshape(-1)
        q = self.setup.reward(trial, obs.repeat_interleave(m, 0)).view(s, m)
        best = acts[torch.arange(s, device=acts.device), q.argmax(1)]  # (S, act_dim)
        cond, inpaint, shape = expand_condition(model, obs, 1)
        value = (torch.zeros(shape, device=x0.device) if inpaint is None
                 else inpaint.value.expand(shape).clone())
        mask = (torch.zeros(shape, dtype=torch.bool, device=x0.device) if inpaint is None
                else inpaint.mask.expand(shape).clone())
        value[first[:1].expand(shape)] = best.reshape(-1)
        mask |= first[:1].expand(shape)
        # the action was never a known entry in training: imposed RePaint-style (noised)
        x = model.process.sample(src, shape, cond=cond, steps=self.setup.steps,
                                 inpaint=Inpaint(value=value, mask=mask,
                                                 noised=first[:1].expand(shape)),
                                 generator=self.gen,
                                 device=model.device).x0
        # winner_reward: the best proposal as scored in the template sample above
        return x, {"reward": float(r.mean()), "winner_reward": float(q.max(1).values.mean()),
                   "candidate_best_reward": float(r.view(s, n).max(1).values.mean())}

    def _train_set(self, x: Tensor, obs: Tensor) -> tuple[Tensor, Tensor]:
        """This round's winners, with those of earlier rounds when ``replay`` keeps them."""
        if self.cfg.replay <= 0:
            return x, obs
        if self._buffer is not None:
            x = torch.cat([self._buffer[0], x])[-self.cfg.replay:]
            obs = torch.cat([self._buffer[1], obs])[-self.cfg.replay:]
        self._buffer = (x, obs)
        return x, obs

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
        x, obs = self._train_set(x, obs)
        self._schedule_lr()
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
