"""Cascaded refiner (Ho et al. 2022), docs/design.md §4.

The cascade appends a refiner after the aligned model: ``x_lo ~ aligned``, then ``x ~
refiner(· | x_lo)``, applied ``passes`` times. Two ways to train it (``CascadeConfig.mode``):

``"aligned"`` (default): the refiner is the aligned denoiser with a second LoRA adapter of its
own (on a frozen copy of the reference with the sequence's adapter merged in, so its own
reference, the KL anchor and likelihood guard of its methods, is the aligned model). One
refinement re-noises ``x_lo`` to the time ``t_r`` of the last ``refine_frac`` of the chain's
steps and denoises those steps with the refiner. Its adapter is trained by the alignment
methods on that refinement, seen as a model (:class:`RefinementView`): SFT on the
critic-ranked best of ``branches`` refinements of one aligned sample per state (denoising loss
at ``t <= t_r`` only) and QV-PG through the refinement's steps, each until its validation
reward plateaus, under the sequence's collapse guard.

``"supervised"``: the earlier design, a regression on consistent pairs: the reference
denoiser rebuilt with an extra per-position input for ``x_lo`` (projection starting at zero),
warm-started from the aligned weights, trained with the diffusion loss on ``(x_lo, x_hi)``
pairs that branch from one latent of the aligned chain (``x_hi`` the critic's best of
``branches`` continuations) or share an in-painted prefix; it samples the whole chain.

In both modes the cascade starts as the aligned model itself: a refiner is appended only
when one validates above it, so with no training the cascade draws exactly the aligned
model's samples (an untrained refiner would not: it re-draws what it re-noises).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..nets import build_backbone
from ..processes import Inpaint
from ..processes.base import SampleOutput
from ..train.trainer import adam
from .common import (
    AlignSetup,
    expand_condition,
    fraction_below,
    free_mask,
    reward_spread,
    support_floor,
    validation_draw,
    validation_reward,
)
from .guards import Guard, GuardConfig
from .lora import add_lora, lora_parameters, merged_copy
from .rl import RLConfig, RLMethod
from .sft import SFTConfig, SFTMethod

__all__ = ["REFINER_METHODS", "CascadeConfig", "CascadeModel", "RefinementView", "RefinerQVPG",
           "RefinerSFT", "build_refiner", "cascade_pairs", "cascade_validation", "pass_metrics",
           "refine", "refine_steps", "refiner_skeleton", "sample_coherency", "train_cascade"]

REFINER_METHODS = ("sft", "rl")


@dataclass
class CascadeConfig:
    """Training of the cascaded refiner and how often it is applied."""

    mode: Literal["aligned", "supervised"] = "aligned"
    """"aligned": the refiner's own LoRA adapter, trained on re-noised aligned samples by
    the alignment methods (``methods``); "supervised": a full denoiser with an ``x_lo``
    input, regressed on best-of-branches pairs (see the module docstring)."""
    passes: int = 1
    """Refinement passes at inference: each refines the previous pass's output."""
    refine_frac: float = 0.3
    """aligned: share of the chain's denoising steps the refiner runs: it re-noises ``x_lo``
    to the time of the last ``round(refine_frac · S)`` of the S steps (at least one)."""
    methods: tuple[str, ...] = ("sft", "rl")
    """aligned: the refiner's methods in order ("sft", "rl"; RL is QV-PG)."""
    rounds: int = 6
    """supervised: rounds of pair generation; aligned: the most updates of each method."""
    states_per_update: int = 32
    """Conditions per round or update."""
    branches: int = 8
    """Continuations per shared latent (supervised) or refinements per aligned sample
    (aligned: SFT's candidates, QV-PG's group); the best by R is the target."""
    steps_per_round: int = 25
    """supervised: gradient steps per round (the aligned SFT's are ``sft.epochs``)."""
    batch_size: int = 64
    """supervised: pairs per gradient step."""
    lr: float = 1e-4
    """supervised: learning rate (full fine-tuning of the warm-started copy). The aligned
    mode's rates are those of ``sft`` and ``rl``."""
    eval_every: int = 1
    """aligned: updates between validations."""
    patience: int = 3
    """aligned: validations without a gain of ``min_delta`` before a method stops."""
    min_delta: float = 0.02
    """aligned: smallest gain that counts, in units of the spread of R across refinements of
    one aligned sample."""
    lora_rank: int = 8
    """aligned: rank of the refiner's adapter (alpha = 2 · rank)."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(likelihood_source="current"))
    """aligned: the refiner's SFT; its states_per_update, candidates and max_updates are set
    from the fields above. The likelihood guard's reference is the aligned model."""
    rl: RLConfig = field(default_factory=RLConfig)
    """aligned: the refiner's QV-PG; states_per_update, group_size and max_updates are set
    from the fields above, K is at most the refinement's steps, the KL is to the aligned
    model's transitions."""
    guard: GuardConfig | None = None
    """aligned: collapse guard thresholds (None: the alignment sequence's)."""
    pairs: Literal["branch", "inpaint"] = "branch"
    """supervised: how (x_lo, x_hi) pairs are made consistent: branching from a shared
    latent, or an in-painted shared prefix."""
    branch_frac: float = 0.5
    """supervised: branch point as a fraction of the denoising steps already taken."""
    inpaint_frac: float = 0.25
    """supervised: shared prefix of the horizon for "inpaint" pairs."""
    warm_start: Literal["aligned", "reference"] = "aligned"
    """supervised: weights the refiner starts from, the aligned model (reference + merged
    adapter) or the plain reference; its ``x_lo`` input starts at zero either way."""
    keep_best: bool = True
    """supervised: validate after every round and keep the best refiner, or none when no
    round validates above the aligned model (the aligned mode always keeps its best)."""

    def __post_init__(self):
        if self.mode not in ("aligned", "supervised"):
            raise ValueError(f"mode must be 'aligned' or 'supervised', got {self.mode!r}")
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got passes={self.passes}")
        if not 0 < self.refine_frac <= 1:
            raise ValueError(f"refine_frac must be in (0, 1], got {self.refine_frac}")
        bad = [m for m in self.methods if m not in REFINER_METHODS]
        if bad:
            raise ValueError(f"unknown refiner method(s) {bad}; choose from {REFINER_METHODS}")
        if self.rounds < 0 or self.states_per_update < 1 or self.steps_per_round < 1:
            raise ValueError(f"need rounds >= 0, states_per_update >= 1, steps_per_round >= 1; "
                             f"got {self.rounds}, {self.states_per_update}, "
                             f"{self.steps_per_round}")
        if self.eval_every < 1 or self.patience < 1 or self.lora_rank < 1:
            raise ValueError(f"eval_every={self.eval_every}, patience={self.patience}, "
                             f"lora_rank={self.lora_rank} must all be >= 1")
        if self.branches < 2:
            raise ValueError(f"branches must be >= 2, got {self.branches}")
        if self.warm_start not in ("aligned", "reference"):
            raise ValueError(f"warm_start must be 'aligned' or 'reference', got "
                             f"{self.warm_start!r}")
        if not 0 < self.branch_frac < 1 or not 0 < self.inpaint_frac < 1:
            raise ValueError(f"branch_frac={self.branch_frac} and inpaint_frac="
                             f"{self.inpaint_frac} must be in (0, 1)")
        if self.rl.algo != "qvpg":
            raise ValueError(f"the refiner's RL is QV-PG (its chain starts from a re-noised "
                             f"sample, not from noise), got rl.algo={self.rl.algo!r}")
        if self.sft.action_proposals:
            raise ValueError("the refiner's SFT ranks its own refinements: "
                             "sft.action_proposals must be 0")


# ------------------------------------------------------------------ refinement (aligned)


def refine_steps(steps: int, refine_frac: float) -> int:
    """The refinement's denoising steps: the last ``round(refine_frac · steps)`` (>= 1)."""
    return min(steps, max(1, round(refine_frac * steps)))


def _start(process, x_lo: Tensor, t: float, generator) -> Tensor:
    """``x_lo`` re-noised to time ``t``: a draw of ``q(x_t | x_0 = x_lo)``."""
    noise = torch.randn(x_lo.shape, generator=generator).to(x_lo)
    return process.add_noise(x_lo, torch.full((x_lo.shape[0],), t, device=x_lo.device), noise)


@torch.no_grad()
def refine(model, refiner: nn.Module, x_lo: Tensor, obs_hist: Tensor, n: int,
           refine_frac: float, steps: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One refinement pass: ``x_lo`` (``n`` rows per row of ``obs_hist``) re-noised to the
    time of the chain's last :func:`refine_steps`, then denoised by ``refiner`` over them."""
    proc = model.process
    total = steps or proc.default_steps
    times = proc.timesteps(total)
    first = total - refine_steps(total, refine_frac)
    cond, inpaint, _ = expand_condition(model, obs_hist, n)
    x = proc.impose(_start(proc, x_lo, float(times[first]), generator), float(times[first]),
                    inpaint, generator)
    for i in range(first, total):
        t, tp = float(times[i]), float(times[i + 1])
        x = proc.impose(proc.step(refiner, x, t, tp, cond=cond, generator=generator).prev, tp,
                        inpaint, generator)
    return x


class _ChainTail:
    """``process`` whose chain of k steps is the last k of its chain of ``total`` steps, so
    that :func:`~diffalign.align.rl.qvpg_rollout` runs the refinement's steps."""

    def __init__(self, process, total: int):
        self._process, self._total = process, total

    def timesteps(self, steps: int) -> Tensor:
        return self._process.timesteps(self._total)[self._total - steps:]

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._process, name)


class RefinementView:
    """The aligned model followed by one refinement pass, as a model whose ``net`` is the
    refiner: what the alignment methods and their validation sample when they train it.

    ``sample(obs, n, net=refiner)`` draws one aligned sample per state and refines it ``n``
    times, so a state's samples differ by the refinement alone (SFT's candidates, QV-PG's
    group, the reward's spread). With ``n = 1`` it draws what the cascade of one pass draws
    with the same generator. Every other attribute is the model's.
    """

    def __init__(self, model, aligned: nn.Module, refine_frac: float):
        self._model, self._aligned, self.refine_frac = model, aligned, refine_frac

    def __getattr__(self, name):
        # this object's own fields are missing only while it is built or unpickled: asking
        # the model for them then would recurse
        if name.startswith("__") or name in ("_model", "_aligned", "_refiner", "_passes"):
            raise AttributeError(name)
        return getattr(self._model, name)

    def aligned_samples(self, obs_hist: Tensor, generator, steps: int | None) -> Tensor:
        """One aligned sample per row of ``obs_hist``."""
        with torch.no_grad():
            return self._model.sample(obs_hist, n=1, generator=generator, steps=steps,
                                      net=self._aligned).x0

    def refine_time(self, steps: int | None) -> float:
        """``t_r``, the time the refinement starts from."""
        total = steps or self._model.process.default_steps
        k = refine_steps(total, self.refine_frac)
        return float(self._model.process.timesteps(total)[total - k])

    def sample(self, obs_hist: Tensor, n: int = 1, generator=None, steps=None,
               grad_last_k=None, return_chain: bool = False, net=None) -> SampleOutput:
        if grad_last_k is not None or return_chain or net is None:
            raise ValueError("a refinement view samples a given refiner (net), without "
                             "gradients or chains")
        x_lo = self.aligned_samples(obs_hist, generator, steps).repeat_interleave(n, 0)
        return SampleOutput(x0=refine(self._model, net, x_lo, obs_hist, n, self.refine_frac,
                                      steps, generator))


def _times_below(process, b: int, t_max: float, generator, like: Tensor) -> Tensor:
    """``b`` training times of ``process`` conditioned on ``t <= t_max`` (redrawn until
    they fall there), so the refiner trains at the noise levels it denoises."""
    t = process.sample_train_time(b, generator, like)
    for _ in range(200):
        above = t > t_max + 1e-9
        if not bool(above.any()):
            return t
        t = torch.where(above, process.sample_train_time(b, generator, like), t)
    return t.clamp(max=t_max)


class RefinerSFT(SFTMethod):
    """SFT of the refiner's adapter (``setup.model`` a :class:`RefinementView`): the
    candidates are refinements, and the loss is taken at ``t <= t_r`` only."""

    name = "cascade_sft"

    def loss(self, x: Tensor, cond, known, shape) -> Tensor:
        cfg, proc = self.cfg, self.model.process
        t = _times_below(proc, len(x), self.model.refine_time(self.setup.steps), self.gen, x)
        noise = torch.randn(x.shape, generator=self.gen).to(x)
        if cfg.loss == "diffusion":
            return proc.loss(self.net, x, cond=cond, known=known, t=t, noise=noise)["loss"]
        # min-SNR-γ in x0 space, as SFTMethod's, at the refinement's times
        w = torch.ones_like(x)
        if cfg.plan_weight < 1:
            executed = self.model.executed_mask(shape).to(x.device)
            w = torch.where(executed, 1.0, cfg.plan_weight).to(x.dtype).expand_as(x)
        xt = proc.add_noise(x, t, noise)
        if known is not None:
            known = known.expand_as(x)
            xt = torch.where(known, x, xt)
            w = w * (~known).to(x)
        snr_w = proc.snr(t).to(x).clamp(max=cfg.min_snr_gamma).view(-1, 1, 1)
        err = snr_w * w * (proc.predict_x0(self.net, xt, t, cond=cond) - x) ** 2
        return err.sum() / w.sum().clamp_min(1e-12)


class RefinerQVPG(RLMethod):
    """QV-PG of the refiner's adapter (``setup.model`` a :class:`RefinementView`): the
    critic's reward backpropagated through the last K steps of the refinement of one
    aligned sample per state (``group_size`` refinements each), with the KL to the aligned
    model's transitions over the gradient steps."""

    name = "cascade_rl"

    def _qvpg_steps(self) -> int:
        """The refinement's steps: the last ``refine_frac`` of the chain."""
        return refine_steps(self._steps(), self.model.refine_frac)

    def _qvpg_start(self, obs: Tensor, n: int, shape) -> tuple[Tensor, object, object]:
        """The aligned model's samples re-noised to the refinement's time, run by the tail
        of the chain (the KL too)."""
        view, total = self.model, self._steps()
        x_lo = view.aligned_samples(obs, self.gen, self.setup.steps).repeat_interleave(n, 0)
        x = _start(self.process, x_lo, view.refine_time(self.setup.steps), self.gen)
        return x, _ChainTail(self.process, total), _ChainTail(self.kl_process, total)


def _refiner_method(name: str, setup: AlignSetup, rnet: nn.Module, cfg: CascadeConfig,
                    generator: torch.Generator):
    budget = dict(states_per_update=cfg.states_per_update, max_updates=cfg.rounds)
    if name == "sft":
        sft = dataclasses.replace(cfg.sft, candidates=cfg.branches,
                                  top_k=min(cfg.sft.top_k, cfg.branches), **budget)
        return RefinerSFT(setup, rnet, sft, generator)
    rl = dataclasses.replace(cfg.rl, group_size=cfg.branches, **budget)
    return RefinerQVPG(setup, rnet, rl, generator)


def _train_aligned(setup: AlignSetup, net: nn.Module, cfg: CascadeConfig,
                   gen: torch.Generator, seed: int, progress: bool, history: list,
                   events: list, guard_cfg: GuardConfig) -> nn.Module | None:
    """The aligned mode's training (see :func:`train_cascade`)."""
    from tqdm.auto import tqdm

    aligned = merged_copy(net)  # the aligned model, frozen: x_lo's sampler
    base_val, _ = validation_reward(setup, net=aligned)
    history.append({"round": 0, "method": "aligned", "update": 0, "val_reward": base_val})
    if cfg.rounds == 0 or not cfg.methods:
        return None
    view = RefinementView(setup.model, aligned, cfg.refine_frac)
    vsetup = dataclasses.replace(setup, model=view)
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices: seeded, the caller's
        torch.manual_seed(seed)                # global stream untouched
        rnet = add_lora(copy.deepcopy(aligned), r=cfg.lora_rank, alpha=2.0 * cfg.lora_rank)
    scale = max(reward_spread(vsetup, net=rnet), 1e-6)
    floor = support_floor(vsetup, rnet) if guard_cfg.support_frac < 1 else None
    guard = Guard(lora_parameters(rnet), reference_reward=base_val, cfg=guard_cfg, scale=scale)
    guard.observe(base_val)  # the aligned model itself is the best so far
    improved, r = False, 0
    for m in cfg.methods:
        method = _refiner_method(m, vsetup, rnet, cfg, gen)
        guard.new_stage()
        stage_best, stale = guard.best_reward, 0
        for it in tqdm(range(cfg.rounds), desc=f"align/cascade_{m}", disable=not progress,
                       leave=False):
            stats = method.step()
            reason = guard.loss_spiked(float(stats.get("loss", 0.0)))
            if reason is None and (it + 1) % cfg.eval_every == 0:
                val, _, x0 = validation_draw(vsetup, net=rnet)
                r += 1
                row = {"round": r, "method": m, "update": it + 1, "val_reward": val}
                reason = guard.reward_collapsed(val)
                if reason is None and floor is not None:
                    row["outside_support"] = fraction_below(
                        vsetup, rnet, x0, vsetup.val_states.to(x0.device), floor)
                    reason = guard.support_left(row["outside_support"])
                history.append(row)
                if reason is None:
                    new_best = guard.observe(val)
                    improved = improved or new_best
                    if new_best and val - stage_best > cfg.min_delta * scale:
                        stage_best, stale = val, 0
                    else:
                        stale += 1
            if reason is not None:
                events.append(guard.handle_collapse(reason, method.optimizer, f"cascade_{m}",
                                                    it))
                stale += 1
            if stale >= cfg.patience:
                break
        guard.restore()  # every method ends on the best validated adapter
    return merged_copy(rnet).eval() if improved else None


# ------------------------------------------------------------------ supervised refiner


def _base_net(net: nn.Module) -> nn.Module:
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def refiner_skeleton(model, extra_dim: int, reference_net: nn.Module | None = None
                     ) -> nn.Module:
    """A fresh backbone of ``model``'s spec with an ``x_lo`` input of ``extra_dim`` (0: none),
    on the model's device; weights as initialised."""
    ref = reference_net if reference_net is not None else model.net
    spec = model.spec
    x_dim, horizon = ref_shape(model)
    cond_dim = getattr(_base_net(ref), "cond_dim", 0) or 0
    return build_backbone(spec.backbone, x_dim=x_dim, horizon=horizon, cond_dim=cond_dim,
                          extra_dim=extra_dim, **spec.backbone_kwargs).to(model.device)


def build_refiner(model, reference_net: nn.Module | None = None,
                  warm_start: str = "reference") -> nn.Module:
    """The supervised refiner: the reference backbone plus a zero-initialised ``x_lo``
    input, warm-started.

    ``reference_net`` defaults to ``model.net``. If it carries a LoRA adapter, the refiner
    starts from the frozen reference (``warm_start="reference"``) or from the reference with
    the adapter merged in (``"aligned"``).
    """
    ref = reference_net if reference_net is not None else model.net
    x_dim, _ = ref_shape(model)
    refiner = refiner_skeleton(model, x_dim, ref)
    weights = aligned_state_dict(ref) if warm_start == "aligned" else reference_state_dict(ref)
    missing, unexpected = refiner.load_state_dict(weights, strict=False)
    if unexpected or any("extra" not in k for k in missing):
        raise ValueError(f"refiner does not match the reference: missing {missing}, "
                         f"unexpected {unexpected}")
    return refiner


def aligned_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The weights of a LoRA-wrapped net with its adapter merged (the net is not changed)."""
    from .lora import is_lora

    if not is_lora(net):
        return reference_state_dict(net)
    return {k: v.detach() for k, v in merged_copy(net).state_dict().items()}


def ref_shape(model) -> tuple[int, int]:
    """``(D, H)`` of one sample of ``model``."""
    c = model.condition(torch.zeros(1, model.spec.obs_history, model.obs_dim,
                                    device=model.device))
    h, d = c.shape
    return d, h


def reference_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The reference weights of a (possibly LoRA-wrapped) net under their plain names."""
    return {k.replace(".base_layer", ""): v for k, v in _base_net(net).state_dict().items()
            if "lora_" not in k}


@torch.no_grad()
def cascade_pairs(setup: AlignSetup, net: nn.Module, cfg: CascadeConfig,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Consistent pairs ``(x_lo, x_hi, obs)`` from the aligned ``net`` (supervised mode)."""
    model = setup.model
    proc = model.process.stochastic_variant()
    obs = setup.draw_states(cfg.states_per_update, generator)
    steps = setup.steps or model.process.default_steps
    n = cfg.branches
    cond, inpaint, shape = expand_condition(model, obs, 1)
    if cfg.pairs == "branch":
        out = proc.sample(net, shape, cond=cond, steps=steps, inpaint=inpaint,
                          generator=generator, return_chain=True, device=model.device)
        k = max(1, min(steps - 1, int(round(cfg.branch_frac * steps))))
        latent = out.chain[k].repeat_interleave(n, 0)
        cond_n, inp_n, shape_n = expand_condition(model, obs, n)
        x = latent
        times = out.times
        for i in range(k, steps):
            t, tp = float(times[i]), float(times[i + 1])
            x = proc.impose(proc.step(net, x, t, tp, cond=cond_n, generator=generator).prev,
                            tp, inp_n, generator)
    else:
        first = model.sample(obs, n=1, generator=generator, steps=setup.steps, net=net).x0
        h = shape[1]
        p = max(1, int(round(cfg.inpaint_frac * h)))
        cond_n, inp_n, shape_n = expand_condition(model, obs, n)
        mask = torch.zeros(1, h, shape[2], dtype=torch.bool, device=first.device)
        mask[:, :p] = True
        value = first.repeat_interleave(n, 0)
        noised = mask.expand(shape_n)  # the sample's own prefix: RePaint-style
        if inp_n is not None:
            value = torch.where(inp_n.mask.expand(shape_n), inp_n.value, value)
            noised = noised & ~inp_n.mask.expand(shape_n)
            mask = mask | inp_n.mask
        x = proc.sample(net, shape_n, cond=cond_n, steps=steps,
                        inpaint=Inpaint(value, mask, noised=noised), generator=generator,
                        device=model.device).x0
    rows = obs.repeat_interleave(n, 0)
    r = setup.reward(x, rows).view(-1, n)
    xs = x.view(-1, n, *x.shape[1:])
    ar = torch.arange(xs.shape[0], device=x.device)
    best = r.argmax(1)
    other = (best + 1 + torch.randint(0, n - 1, best.shape, generator=generator)
             .to(best.device)) % n
    return xs[ar, other], xs[ar, best], obs


def _train_supervised(setup: AlignSetup, net: nn.Module, cfg: CascadeConfig,
                      gen: torch.Generator, progress: bool, history: list
                      ) -> nn.Module | None:
    """The supervised mode's training (see :func:`train_cascade`)."""
    from tqdm.auto import tqdm

    model = setup.model
    best, best_state = -math.inf, None
    if cfg.keep_best:  # round 0: the aligned model itself
        best = validation_reward(setup, net=net)[0]
        history.append({"round": 0, "val_reward": best})
    if cfg.rounds == 0:
        return None
    refiner = build_refiner(model, net, warm_start=cfg.warm_start)
    opt = adam(refiner.parameters(), lr=cfg.lr)
    for r in tqdm(range(cfg.rounds), desc="align/cascade", disable=not progress, leave=False):
        x_lo, x_hi, obs = cascade_pairs(setup, net, cfg, gen)
        for _ in range(cfg.steps_per_round):
            idx = torch.randint(0, len(x_hi), (min(cfg.batch_size, len(x_hi)),), generator=gen)
            cond, inpaint, shape = expand_condition(model, obs[idx], 1)
            known = None if inpaint is None else inpaint.mask.expand(shape)
            loss = model.process.loss(refiner, x_hi[idx], cond=cond, known=known,
                                      extra=x_lo[idx], generator=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(refiner.parameters(), 1.0)
            opt.step()
        if cfg.keep_best:
            val = cascade_validation(setup, net, refiner.eval())
            refiner.train()
            history.append({"round": r + 1, "val_reward": val})
            if val > best:
                best, best_state = val, copy.deepcopy(refiner.state_dict())
    if not cfg.keep_best:
        return refiner.eval()
    if best_state is None:
        return None
    refiner.load_state_dict(best_state)
    return refiner.eval()


# ------------------------------------------------------------------ training and the model


def train_cascade(setup: AlignSetup, net: nn.Module, cfg: CascadeConfig, seed: int = 0,
                  progress: bool = True, history: list | None = None,
                  events: list | None = None, guard: GuardConfig | None = None
                  ) -> nn.Module | None:
    """Train a refiner after the aligned (LoRA-wrapped) ``net``; returns it, or None when no
    trained refiner validated above the aligned model (the cascade is then the aligned
    model itself; so it is with ``rounds=0``).

    ``history`` (a list) receives one row per validation, ``{"round", "val_reward"}`` (the
    aligned mode adds ``"method"`` and ``"update"``), round 0 being the aligned model.
    ``events`` receives the aligned mode's collapse events. ``guard``: the thresholds of the
    aligned mode's collapse guard when ``cfg.guard`` is None (default: GuardConfig()).
    """
    gen = torch.Generator().manual_seed(seed)
    history = [] if history is None else history
    if cfg.mode == "supervised":
        return _train_supervised(setup, net, cfg, gen, progress, history)
    return _train_aligned(setup, net, cfg, gen, seed, progress, history,
                          [] if events is None else events,
                          cfg.guard or guard or GuardConfig())


def cascade_validation(setup: AlignSetup, net: nn.Module, refiner: nn.Module | None,
                       refine_frac: float | None = None) -> float:
    """:func:`~diffalign.align.common.validation_reward` of the cascade (the aligned ``net``
    followed by ``refiner``, one pass; ``refine_frac`` None for a supervised refiner): mean
    R of one sample per validation state, fixed seed."""
    casc = CascadeModel(setup.model, net, refiner, refine_frac=refine_frac)
    return validation_reward(dataclasses.replace(setup, model=casc))[0]


class CascadeModel:
    """An aligned model followed by its refiner; behaves like the model for sampling.

    Every attribute not defined here is the base model's, so rollouts, rewards and metrics
    work unchanged; :meth:`sample` draws ``x_lo`` from the aligned net and refines it
    ``passes`` times. ``refiner`` None: no refinement (the aligned model itself).
    ``refine_frac`` None: a supervised refiner (full chain, conditioned on ``x_lo`` through
    its extra input); a float: an aligned refiner (re-noise and denoise, :func:`refine`).
    """

    def __init__(self, model, aligned_net: nn.Module, refiner: nn.Module | None,
                 passes: int = 1, refine_frac: float | None = None):
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        if refiner is not None:
            extra = getattr(_base_net(refiner), "extra_dim", 0) or 0
            if (refine_frac is None) != (extra > 0):
                raise ValueError(f"a refiner with an x_lo input of width {extra} does not go "
                                 f"with refine_frac={refine_frac} (None for a supervised "
                                 "refiner, a fraction for an aligned one)")
        if passes > 1:
            warnings.warn(f"cascade passes={passes}: more than one refinement pass is known to "
                          "be unstable (samples drift out of distribution)", stacklevel=2)
        self._model, self._aligned, self._refiner, self._passes = (model, aligned_net,
                                                                   refiner, passes)
        self.refine_frac = refine_frac

    def __getattr__(self, name):
        # this object's own fields are missing only while it is built or unpickled: asking
        # the model for them then would recurse
        if name.startswith("__") or name in ("_model", "_aligned", "_refiner", "_passes"):
            raise AttributeError(name)
        return getattr(self._model, name)

    @property
    def mode(self) -> str:
        return "supervised" if self.refine_frac is None else "aligned"

    @property
    def passes(self) -> int:
        return self._passes

    @property
    def refiner(self) -> nn.Module | None:
        return self._refiner

    def merged(self) -> CascadeModel:
        """The same cascade with the aligned net's adapter folded into a frozen copy (faster
        sampling; see :func:`~diffalign.align.lora.merged_copy`)."""
        fast = copy.copy(self)
        fast._aligned = merged_copy(self._aligned)
        return fast

    def refine(self, x_lo: Tensor, obs_hist: Tensor, n: int = 1, generator=None,
               steps: int | None = None) -> Tensor:
        """One refinement pass of ``x_lo`` (``n`` rows per row of ``obs_hist``)."""
        if self._refiner is None:
            return x_lo
        model = self._model
        if self.refine_frac is not None:
            return refine(model, self._refiner, x_lo, obs_hist, n, self.refine_frac, steps,
                          generator)
        cond, inpaint, shape = expand_condition(model, obs_hist, n)
        with torch.no_grad():
            return model.process.sample(self._refiner, shape, cond=cond, steps=steps,
                                        inpaint=inpaint, generator=generator, extra=x_lo,
                                        device=model.device).x0

    def sample(self, obs_hist, n: int = 1, generator=None, steps=None, grad_last_k=None,
               return_chain: bool = False, net=None) -> SampleOutput:
        if grad_last_k is not None or return_chain:
            raise ValueError("the cascade samples without gradients or chains")
        out = self._model.sample(obs_hist, n=n, generator=generator, steps=steps,
                                 net=self._aligned)
        obs_hist = self._model._check_hist(obs_hist)
        x = out.x0
        for _ in range(self._passes):
            x = self.refine(x, obs_hist, n, generator, steps)
        return SampleOutput(x0=x, times=out.times)


# ------------------------------------------------------------------ per-pass report


def sample_coherency(model, x0: Tensor, obs_hist: Tensor) -> float | None:
    """The evaluation's coherency (docs/design.md §5) of samples ``x0``, one per row of
    ``obs_hist`` (RAW), without rolling out: planners, the plans under the task's dynamics
    (positions past the episode's end left out); policies, the first actions under the
    dataset's behaviour policy. None where the evaluation has none (only Nav1D has)."""
    from types import SimpleNamespace

    from ..eval.evaluate import _coherency, _is_nav1d

    meta = dict(model.meta)
    if not _is_nav1d(meta):
        return None
    with torch.no_grad():
        if model.kind == "dp":
            acts = model.actions_from_x(x0, obs_hist)[:, :1]  # (B, 1, act): one candidate
            res = SimpleNamespace(decision_states=obs_hist[:, -1].cpu().numpy(),
                                  decision_candidates=acts.cpu().numpy())
        else:
            from ..envs.nav1d import time_index

            ps, pa = model.plan_states_actions(x0)
            horizon = int(meta.get("horizon", 32))
            t = time_index(obs_hist[:, -1].cpu().numpy(), horizon)
            # row K-1 of a plan is the present step: the episode has horizon - t steps left
            valid = np.minimum(ps.shape[1], horizon - t + model.spec.obs_history - 1)
            res = SimpleNamespace(plan_states=ps.cpu().numpy(), plan_actions=pa.cpu().numpy(),
                                  plan_valid=valid)
    return _coherency(model, res, meta)


@torch.no_grad()
def pass_metrics(setup: AlignSetup, casc: CascadeModel, seed: int = 1234) -> list[dict]:
    """Per pass 0..P of ``casc`` on the validation states (one sample each, fixed seed; pass
    0 is the aligned sample, pass P what the cascade draws): ``val_reward`` (mean R),
    ``coherency`` (:func:`sample_coherency`; None off Nav1D) and ``distance``, the RMS
    change of the generated entries from the aligned sample (normalised units)."""
    model = setup.model
    obs = setup.val_states.to(model.device)
    g = torch.Generator().manual_seed(seed)
    x_al = model.sample(obs, n=1, generator=g, steps=setup.steps, net=casc._aligned).x0
    free = free_mask(expand_condition(model, obs, 1)[1], x_al.shape)
    free = torch.ones_like(x_al) if free is None else free.to(x_al)
    rows, x = [], x_al
    for p in range(casc.passes + 1):
        if p:
            x = casc.refine(x, obs, 1, g, setup.steps)
        dist = torch.sqrt((((x - x_al) ** 2) * free).sum() / free.sum().clamp_min(1))
        rows.append({"pass": p, "val_reward": float(setup.reward(x, obs).mean()),
                     "coherency": sample_coherency(model, x, obs), "distance": float(dist)})
    return rows
