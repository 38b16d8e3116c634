"""RL on the denoising chain: DDPO-style REINFORCE/PPO and QV-PG (docs/design.md §4).

The denoising chain is an MDP: state ``(x_k, k, c)``, action ``x_{k−1}``, reward ``R(x_0)`` at
the end. REINFORCE/PPO take the policy gradient of that MDP; QV-PG backpropagates the
critic's reward through the last K sampling steps. Both weight the denoising steps by a
credit λ_k (QV-PG by scaling the gradient that flows back through each step) and can add a
nearest-neighbour entropy estimate to the objective. Shapes: ``(B, K)`` for per-step
quantities (B chains, K recorded transitions), ``(B,)`` for per-chain ones.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..processes.base import DiffusionProcess, StepOutput, gaussian_log_prob
from .common import AdapterMethod, AlignSetup, MethodConfig, expand_condition, free_mask
from .lora import adapter_fixed, merged_copy, reference, refresh_merged

__all__ = ["RLConfig", "RLMethod", "credit_decreasing", "credit_retrospective",
           "credit_step_scales", "gaussian_kl_equal_var", "group_advantages", "group_scale",
           "knn_entropy", "policy_gradient_loss", "qvpg_rollout", "smallest_noisy_std",
           "transition_kl"]


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"{group_size}")


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Rewards normalised within groups of ``group_size`` consecutive samples.

    The samples of one condition (state) form a group; ``(R − mean_group) / (std_group + eps)``
    is the group baseline of docs/design.md §4 (and GRPO). ``rewards``: ``(B,)`` with B a
    multiple of ``group_size``. A group of one falls back to the batch statistics.
    """
    _check_groups(rewards, group_size)
    if group_size == 1:
        return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    g = rewards.view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def group_scale(rewards: Tensor, group_size: int, floor: float = 0.1) -> Tensor:
    """Per-sample reward scale: the std of R over its group of ``group_size`` consecutive
    samples plus ``floor`` times the mean of those stds over the batch, ``(B,)``.

    The floor keeps a state where every sample scores the same from being amplified without
    bound.
    """
    _check_groups(rewards, group_size)
    std = rewards.view(-1, group_size).std(1, unbiased=False)
    scale = std + floor * std.mean() + 1e-8
    return scale.repeat_interleave(group_size)


def policy_gradient_loss(logp: Tensor, advantages: Tensor, logp_old: Tensor | None = None,
                         clip: float | None = 0.2, credit: Tensor | None = None
                         ) -> dict[str, Tensor]:
    """REINFORCE / PPO loss over the denoising steps.

    ``L = −mean_b Σ_k λ_k · min(ρ_k A_b, clip(ρ_k, 1−ε, 1+ε) A_b)``, ``ρ_k = exp(logp − logp_old)``.
    With ``logp_old=None`` (or ``clip=None``) it is REINFORCE: ``−mean_b Σ_k λ_k logp_k A_b``.

    Args:
        logp: ``(B, K)`` log-probs of the taken transitions under the current policy.
        advantages: ``(B,)``.
        logp_old: ``(B, K)`` log-probs under the policy that sampled (no gradient).
        clip: PPO ratio clip ε; ``None`` disables clipping.
        credit: ``(K,)`` or ``(B, K)`` weights λ_k; default all ones.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, K), got {tuple(logp.shape)}")
    lam = torch.ones_like(logp) if credit is None else credit.to(logp).expand_as(logp)
    adv = advantages.to(logp).view(-1, 1)
    out: dict[str, Tensor] = {}
    if logp_old is None:
        per_step = logp * adv
    else:
        ratio = torch.exp(logp - logp_old.detach())
        per_step = ratio * adv
        if clip is not None:
            per_step = torch.minimum(per_step, ratio.clamp(1 - clip, 1 + clip) * adv)
            out["clip_frac"] = ((ratio - 1).abs() > clip).float().mean().detach()
        out["ratio_mean"] = ratio.mean().detach()
    out["loss"] = -(lam * per_step).sum(1).mean()
    return out


def gaussian_kl_equal_var(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussians of equal std: ``Σ ‖μ − μ_ref‖² / (2σ²)`` per sample, ``(B,)``.

    Exact for the transitions of the aligned model and its reference (same noise schedule);
    summed over the steps it bounds the KL between their chains.
    """
    var = (std**2).clamp_min(1e-12)
    return (((mean - mean_ref) ** 2) / (2 * var)).flatten(1).sum(1)


def credit_decreasing(num_steps: int, gamma: float = 0.9, normalize: bool = True) -> Tensor:
    """λ over the recorded steps, first (noisiest) to last: ``γ^k`` with k the steps left.

    The step that produces the clean sample gets ``γ^0 = 1`` and earlier (noisier) steps get
    geometrically less credit. ``normalize`` rescales to mean 1.
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got gamma={gamma}")
    k = torch.arange(num_steps - 1, -1, -1, dtype=torch.float32)
    lam = gamma**k
    return lam * (num_steps / lam.sum()) if normalize else lam


def credit_retrospective(x0_preds: Tensor, x0: Tensor, temperature: float = 1.0,
                         normalize: bool = True) -> Tensor:
    """λ_k from the similarity of each step's x0-prediction to the final sample, ``(B, K)``
    (the "x0_similarity" credit).

    ``λ_k = exp(−‖x̂0_k − x_0‖² / (D · temperature))``: steps whose prediction already
    resembles the final sample (the decision was taken there) get more credit.
    ``x0_preds``: ``(K, B, H, D)`` as recorded by ``sample(return_chain=True)``.
    """
    d = ((x0_preds - x0.unsqueeze(0)) ** 2).flatten(2).mean(2)  # (K, B)
    lam = torch.exp(-d / temperature).T  # (B, K)
    if normalize:
        lam = lam * (lam.shape[1] / lam.sum(1, keepdim=True).clamp_min(1e-12))
    return lam.detach()


def credit_step_scales(lam: Tensor) -> Tensor:
    """Backward multipliers that give QV-PG's K gradient steps the credits ``lam``.

    QV-PG multiplies the gradient reaching the sample after gradient step j (first to last)
    by ``s_j``; that gradient feeds step j's parameters and, through step j, every earlier
    step, so step j's share of the reward gradient ends up weighted ``Π_{i≥j} s_i``. With
    ``s_K = λ_K`` and ``s_j = λ_j / λ_{j+1}`` the product is ``λ_j``. ``lam``: ``(..., K)``,
    non-negative. A zero weight stops the gradient, so every earlier weight must be zero
    too (0/0 counts as 0): ``(0, …, 0, 1)`` is truncation to the last step.
    """
    if bool((lam < 0).any()):
        raise ValueError("credit weights must be >= 0")
    cur, nxt = lam[..., :-1], lam[..., 1:]
    if bool(((nxt == 0) & (cur != 0)).any()):
        raise ValueError("a credit weight of 0 stops the gradient to every earlier step, so "
                         "those steps must have weight 0 too")
    ratio = torch.where(nxt == 0, torch.zeros_like(cur),
                        cur / torch.where(nxt == 0, torch.ones_like(nxt), nxt))
    return torch.cat([ratio, lam[..., -1:]], -1)


def knn_entropy(x: Tensor, group_size: int, dim: int | None = None, eps: float = 1e-12
                ) -> Tensor:
    """Kozachenko–Leonenko entropy terms of samples in groups, ``(B,)``, in nats.

    Within each group of ``n = group_size`` consecutive samples (one condition's samples),
    ``h_i = d · log ρ_i + log V_d + ψ(n) − ψ(1)``, with ρ_i the distance from sample i to its
    nearest neighbour in the group, V_d the volume of the unit d-ball and ψ the digamma
    function (``ψ(n) − ψ(1) = Σ_{j<n} 1/j``); the mean of ``h_i`` over a group is the
    Kozachenko–Leonenko estimate of the differential entropy of the distribution the group
    was drawn from. ``h_i`` estimates ``−log p(x_i)`` up to that mean's bias: sample i's
    share, which rises as the sample moves away from its neighbour; its gradient pushes
    nearest neighbours apart. ``dim``: the dimension d of the varying entries (the
    generated ones; in-painted entries are equal within a group); default all entries.
    ``ρ_i² + eps`` keeps duplicates finite. Differentiable in ``x``.
    """
    if group_size < 2:
        raise ValueError(f"an entropy estimate needs group_size >= 2, got {group_size}")
    b = x.shape[0]
    if b % group_size:
        raise ValueError(f"{b} samples do not split into groups of {group_size}")
    d = x[0].numel() if dim is None else int(dim)
    g = x.reshape(b // group_size, group_size, -1)
    # from the differences, not ‖a‖² + ‖b‖² − 2ab: near neighbours cancel that in float32
    dist = torch.cdist(g, g, compute_mode="donot_use_mm_for_euclid_dist")
    eye = torch.eye(group_size, dtype=torch.bool, device=x.device)
    rho2 = dist.masked_fill(eye, float("inf")).min(-1).values.pow(2)  # (G, n)
    log_vd = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    const = sum(1.0 / i for i in range(1, group_size)) + log_vd  # ψ(n) − ψ(1) + log V_d
    return (0.5 * d * torch.log(rho2 + eps) + const).reshape(-1)


# ------------------------------------------------------------------------------ QV-PG


def transition_kl(process: DiffusionProcess, net: torch.nn.Module, x: Tensor, t: float,
                  tp: float, step: StepOutput | None = None, cond: Tensor | None = None,
                  free: Tensor | None = None, std_floor: float | None = None,
                  ref_net: torch.nn.Module | None = None) -> Tensor:
    """``KL(p_θ(·|x) ‖ p_ref(·|x))`` of one Gaussian transition of ``process`` from ``x`` at
    time ``t`` to ``tp``, ``(B,)``.

    ``p_θ`` is the transition of the LoRA-wrapped ``net`` (``step``, its
    :class:`~diffalign.processes.base.StepOutput` at ``x``, or computed here), with its
    gradient; ``p_ref`` that of the reference at the detached state, under no_grad, so the
    gradient reaches the adapter only. The reference is ``ref_net`` when given (a
    :func:`~diffalign.align.lora.reference_copy`), else ``net`` with its adapter disabled.
    The KL is :func:`gaussian_kl_equal_var` over the generated entries (``free``; in-painted
    entries are equal in both). ``std_floor``: a lower bound on the std, so that a
    deterministic transition (std 0) carries a finite KL.
    """
    zero = torch.zeros(())
    if step is None:
        step = process.step(net, x, t, tp, cond=cond, noise=zero)
    with torch.no_grad(), (reference(net) if ref_net is None else contextlib.nullcontext()):
        ref = process.step(net if ref_net is None else ref_net, x.detach(), t, tp, cond=cond,
                           noise=zero).mean
    std = step.std if std_floor is None else step.std.clamp_min(std_floor)
    m = 1.0 if free is None else free.to(ref.dtype)
    return gaussian_kl_equal_var(step.mean * m, ref * m, std)


def smallest_noisy_std(process: DiffusionProcess, steps: int, like: Tensor) -> float | None:
    """The smallest nonzero transition std of ``process``'s chain of ``steps`` steps, or None
    when every transition is deterministic. The stds depend on the times only, so one state
    shaped like a row of ``like`` and a zero network give them."""
    x = torch.zeros_like(like[:1])
    times = process.timesteps(steps)

    def zero_net(x, t, cond=None, extra=None):
        return torch.zeros_like(x)

    stds = [float(process.step(zero_net, x, float(times[i]), float(times[i + 1]),
                               noise=torch.zeros(())).std.max()) for i in range(steps)]
    noisy = [s for s in stds if s > 0]
    return min(noisy) if noisy else None


def qvpg_rollout(process: DiffusionProcess, net: torch.nn.Module, x: Tensor, steps: int,
                 grad_last_k: int, generator: torch.Generator, *, cond: Tensor | None = None,
                 inpaint=None, fast: torch.nn.Module | None = None,
                 kl_process: DiffusionProcess | None = None,
                 kl_chain_steps: int | None = None, kl_std_floor: float | None = None,
                 kl_through_state: bool = True, ref_net: torch.nn.Module | None = None,
                 on_grad_step=None) -> tuple[Tensor, Tensor]:
    """QV-PG's forward pass: sample the chain of ``steps`` steps of ``process`` from the noise
    ``x`` so that a loss on the returned ``x_0`` backpropagates the reward gradient through
    the last ``grad_last_k`` steps into the adapter of ``net``; returns ``(x_0, KL (B,))``.

    The first ``steps − grad_last_k`` steps run under no_grad (stop-gradient before the last
    K), with ``fast`` when given (the same function as ``net`` without its adapter's
    overhead: a :func:`~diffalign.align.lora.merged_copy`). ``x`` is imposed with
    ``inpaint`` first and after every step. The adapter is folded once for the whole chain
    (:func:`~diffalign.align.lora.adapter_fixed`).

    With ``kl_process`` (``process.stochastic_variant()``: deterministic samplers have no
    Gaussian transition to take a KL on) the KL to the reference is summed over:

    * ``kl_chain_steps=None``: the gradient steps;
    * ``kl_chain_steps=m``: the whole chain, estimated from ``m`` random steps rescaled by
      ``steps / m`` (unbiased). One adapter serves every step, so a KL on the last K steps
      alone leaves the earlier ones free to drift.

    Each term is :func:`transition_kl` at the visited state, against ``ref_net`` when given;
    where the sampling step is Gaussian its own transition is used, else ``kl_process``'s. A
    deterministic transition (the last step to t = 0) carries no KL, or with
    ``kl_std_floor`` the KL of that std. ``kl_through_state``: the KL's gradient also flows
    back through the visited state into the earlier gradient steps (the pathwise derivative
    of the chain's KL); False takes it at the detached state, so each term pulls on its own
    step's transition only (on the 2-D toy, with the gradient through all 10 steps, the
    pathwise term cut the reward gain from 93-99% to between −5% and 63%).
    ``on_grad_step(step, x)`` is called after each gradient step with its
    :class:`~diffalign.processes.base.StepOutput` and the new state (to register backward
    hooks on it).
    """
    times = process.timesteps(steps)
    early = steps - min(steps, grad_last_k)
    fast = net if fast is None else fast
    x = process.impose(x, float(times[0]), inpaint, generator)
    free = free_mask(inpaint, x.shape)
    kl = torch.zeros(x.shape[0], device=x.device)
    kl_at: set[int] = set()
    weight = 1.0
    if kl_process is not None:
        if kl_chain_steps is None:
            kl_at = set(range(early, steps))
        else:
            m = min(steps, kl_chain_steps)
            kl_at = set(torch.randperm(steps, generator=generator)[:m].tolist())
            weight = steps / m

    def kl_term(st, x: Tensor, t: float, tp: float) -> Tensor | None:
        proc = process
        if not kl_through_state:
            st, x = None, x.detach()
        if st is None or not bool((st.std > 0).all()):  # no Gaussian step: kl_process's
            proc = kl_process
            st = proc.step(net, x, t, tp, cond=cond, noise=torch.zeros(()))
        if kl_std_floor is None and not bool((st.std > 0).all()):
            return None
        return transition_kl(proc, net, x, t, tp, st, cond, free, kl_std_floor, ref_net)

    with adapter_fixed(net):
        for i in range(steps):
            t, tp = float(times[i]), float(times[i + 1])
            if i < early:
                if i in kl_at:
                    term = kl_term(None, x, t, tp)
                    kl = kl if term is None else kl + weight * term
                with torch.no_grad():
                    st = process.step(fast, x, t, tp, cond=cond, generator=generator)
                    x = process.impose(st.prev, tp, inpaint, generator)
                continue
            st = process.step(net, x, t, tp, cond=cond, generator=generator)
            if i in kl_at:
                term = kl_term(st, x, t, tp)
                kl = kl if term is None else kl + weight * term
            x = process.impose(st.prev, tp, inpaint, generator)
            if on_grad_step is not None:
                on_grad_step(st, x)
    return x, kl


# ------------------------------------------------------------------------------ training


@dataclass
class RLConfig(MethodConfig):
    """RL fine-tuning over the denoising chain."""

    algo: Literal["ppo", "reinforce", "qvpg"] = "qvpg"
    """"ppo" (clipped ratio), "reinforce" (plain score function) or "qvpg" (reward gradient
    through the last K sampling steps)."""
    states_per_update: int = 32
    """Conditions per update."""
    group_size: int = 8
    """Samples per condition (the group baseline of the advantage)."""
    ppo_epochs: int = 2
    """Passes over each batch of chains (ppo)."""
    clip: float = 0.2
    """PPO ratio clip ε."""
    kl_coef: float = 0.005
    """Weight of the KL to the reference, Σ_k ‖μ_θ − μ_ref‖²/(2σ_k²); 0 disables it."""
    lr: float = 1e-3
    """Adapter learning rate."""
    credit: Literal["none", "decreasing", "x0_similarity"] = "none"
    """Credit λ_k of each denoising step, for every algo: "none" (all 1), "decreasing"
    (γ^k with k the steps left to the clean sample, mean 1) or "x0_similarity" (per sample,
    exp(−‖x̂0_k − x_0‖²/D) of each step's x0-prediction to the final sample, mean 1).
    PPO/REINFORCE weight each step's loss term by λ_k; QV-PG weights each of its K gradient
    steps' share of the reward gradient by λ_k (:func:`credit_step_scales`)."""
    credit_gamma: float = 0.9
    """γ of the decreasing credit."""
    grad_last_k: int = 3
    """QV-PG: backpropagate through the last K denoising steps only (with ``random_k``, the
    upper end of K's range). PPO/REINFORCE take every step."""
    random_k: bool = False
    """QV-PG: draw K uniformly from ``grad_k_min..grad_last_k`` for each update."""
    grad_k_min: int = 1
    """QV-PG with ``random_k``: the lower end of K's range."""
    qvpg_scale: Literal["none", "group"] = "none"
    """QV-PG: "group" divides each sample's reward by the (detached) spread of R over its
    condition's group (std + 10% of the batch's mean std), so every state pulls with the same
    strength however flat R is there, and the KL weight means the same on any reward scale;
    "none" maximises R as it is."""
    entropy_coef: float = 0.0
    """Weight c of the entropy bonus: the objective becomes E[R] + c·H, with H the
    Kozachenko–Leonenko estimate over each condition's group of samples
    (:func:`knn_entropy`; needs ``group_size >= 2``); 0 disables it."""
    max_grad_norm: float = 1.0
    """Gradient clipping of the adapter."""

    def __post_init__(self):
        super().__post_init__()
        if self.algo not in ("ppo", "reinforce", "qvpg"):
            raise ValueError(f"algo must be 'ppo', 'reinforce' or 'qvpg', got algo={self.algo!r}")
        if self.credit not in ("none", "decreasing", "x0_similarity"):
            raise ValueError(f"credit must be 'none', 'decreasing' or 'x0_similarity', got "
                             f"credit={self.credit!r}")
        if self.group_size < 1 or self.states_per_update < 1:
            raise ValueError(f"group_size={self.group_size} and states_per_update="
                             f"{self.states_per_update} must be >= 1")
        if self.algo != "qvpg" and self.group_size < 2:
            raise ValueError(f"algo={self.algo!r} needs group_size >= 2 for its baseline, got "
                             f"group_size={self.group_size}")
        if self.grad_last_k < 1:
            raise ValueError(f"grad_last_k must be >= 1, got {self.grad_last_k}")
        if not 1 <= self.grad_k_min <= self.grad_last_k:
            raise ValueError(f"grad_k_min must be in [1, grad_last_k={self.grad_last_k}], got "
                             f"grad_k_min={self.grad_k_min}")
        if self.random_k and self.algo != "qvpg":
            raise ValueError(f"random_k (a random truncation K) is QV-PG's; algo={self.algo!r} "
                             "takes every step")
        if not 0 < self.credit_gamma <= 1:
            raise ValueError(f"credit_gamma must be in (0, 1], got credit_gamma="
                             f"{self.credit_gamma}")
        if not self.entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got entropy_coef={self.entropy_coef}")
        if self.entropy_coef > 0 and self.group_size < 2:
            raise ValueError(f"entropy_coef={self.entropy_coef} estimates the entropy from each "
                             f"state's samples and needs group_size >= 2, got group_size="
                             f"{self.group_size}")
        if self.lr <= 0 or self.kl_coef < 0 or self.clip <= 0:
            raise ValueError(f"need lr > 0, kl_coef >= 0, clip > 0; got lr={self.lr}, "
                             f"kl_coef={self.kl_coef}, clip={self.clip}")


class RLMethod(AdapterMethod):
    """One RL update per :meth:`step` on the LoRA adapter of ``net``."""

    name = "rl"

    def __init__(self, setup: AlignSetup, net: torch.nn.Module, cfg: RLConfig,
                 generator: torch.Generator):
        super().__init__(setup, net, cfg, generator)
        base = self.model.process
        # PPO/REINFORCE need Gaussian transitions; QV-PG differentiates any sampler.
        self.process = base if cfg.algo == "qvpg" else base.stochastic_variant()
        # The KL needs Gaussian transitions too: a deterministic sampler (DDIM η=0, FM Euler,
        # the SM ODE) takes it on the transitions of its stochastic variant.
        self.kl_process = base.stochastic_variant()
        self._fast = None  # QV-PG: a merged copy of net for the no-gradient steps

    def _merged(self) -> torch.nn.Module:
        """``net`` with its current adapter folded in (one copy, refreshed each update)."""
        if self._fast is None:
            self._fast = merged_copy(self.net)
            return self._fast
        return refresh_merged(self._fast, self.net)

    def _steps(self) -> int:
        return self.setup.steps or self.process.default_steps

    def step(self) -> dict[str, float]:
        return self._qvpg() if self.cfg.algo == "qvpg" else self._policy_gradient()

    # -- REINFORCE / PPO ---------------------------------------------------------------
    def _policy_gradient(self) -> dict[str, float]:
        cfg, proc, net = self.cfg, self.process, self.net
        obs = self.setup.draw_states(cfg.states_per_update, self.gen)
        rows = obs.repeat_interleave(cfg.group_size, 0)
        cond, inpaint, shape = expand_condition(self.model, obs, cfg.group_size)
        steps = self._steps()
        free = free_mask(inpaint, shape)
        entropy = None
        with torch.no_grad():
            out = proc.sample(net, shape, cond=cond, steps=steps, inpaint=inpaint,
                              generator=self.gen, return_chain=True, device=self.model.device)
            reward = self.setup.reward(out.x0, rows)
            shaped = reward
            if cfg.entropy_coef > 0:  # each sample's share of its group's entropy estimate
                entropy = knn_entropy(out.x0, cfg.group_size, self._free_dim(free, out.x0))
                shaped = reward + cfg.entropy_coef * entropy
            adv = group_advantages(shaped, cfg.group_size)
        active = [k for k in range(steps) if bool((out.stds[k] > 0).all())]
        credit = self._credit(out, active)
        logp_old = [gaussian_log_prob(out.chain[k + 1], out.means[k], out.stds[k], free)
                    for k in active]
        stats = {"loss": 0.0, "kl": 0.0}
        for _ in range(cfg.ppo_epochs if cfg.algo == "ppo" else 1):
            self.optimizer.zero_grad(set_to_none=True)
            for j, k in enumerate(active):
                t, tp = float(out.times[k]), float(out.times[k + 1])
                st = proc.step(net, out.chain[k], t, tp, cond=cond, noise=torch.zeros(()))
                logp = gaussian_log_prob(out.chain[k + 1], st.mean, st.std, free)
                pg = policy_gradient_loss(
                    logp[:, None], adv, logp_old[j][:, None] if cfg.algo == "ppo" else None,
                    clip=cfg.clip, credit=credit[:, j:j + 1])
                loss = pg["loss"]
                if cfg.kl_coef > 0:
                    kl = transition_kl(proc, net, out.chain[k], t, tp, st, cond, free)
                    loss = loss + cfg.kl_coef * kl.mean() / len(active)
                    stats["kl"] += float(kl.detach().mean())
                loss.backward()  # one step at a time: memory flat in the step count
                stats["loss"] += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
        res = {"reward": float(reward.mean()), "loss": stats["loss"],
               "kl": stats["kl"] / max(1, cfg.ppo_epochs)}
        if entropy is not None:
            res["entropy"] = float(entropy.mean())
        return res

    @staticmethod
    def _free_dim(free: Tensor | None, x: Tensor) -> int:
        """The number of generated (not in-painted) entries of one sample."""
        return x[0].numel() if free is None else int(free[0].sum())

    def _credit(self, out, active: list[int]) -> Tensor:
        """PPO/REINFORCE: λ of the recorded (active) steps, ``(B, len(active))``."""
        return self._credit_weights(out.x0_preds[active], out.x0)

    def _credit_weights(self, x0_preds: Tensor, x0: Tensor) -> Tensor:
        """λ of K steps, first to last, ``(B, K)``: ``x0_preds`` ``(K, B, H, D)`` are the
        steps' x0-predictions and ``x0`` ``(B, H, D)`` the final samples (detached)."""
        k, b = x0_preds.shape[0], x0.shape[0]
        if self.cfg.credit == "decreasing":
            return credit_decreasing(k, self.cfg.credit_gamma).to(x0).expand(b, -1)
        if self.cfg.credit == "x0_similarity":
            return credit_retrospective(x0_preds, x0)
        return torch.ones(b, k, device=x0.device)


    # -- QV-PG -------------------------------------------------------------------------
    def _qvpg_steps(self) -> int:
        """Denoising steps of the chain QV-PG samples through: the whole chain."""
        return self._steps()

    def _qvpg_start(self, obs: Tensor, n: int, shape) -> tuple[Tensor, object, object]:
        """``(x, process, kl_process)``: where QV-PG's chain starts (pure noise), the process
        that runs it and the one its KL is taken against."""
        x = torch.randn(shape, generator=self.gen).to(self.model.device)
        return x, self.process, self.kl_process

    def _qvpg(self) -> dict[str, float]:
        cfg, net = self.cfg, self.net
        n = cfg.group_size
        obs = self.setup.draw_states(cfg.states_per_update, self.gen)
        rows = obs.repeat_interleave(n, 0)
        cond, inpaint, shape = expand_condition(self.model, obs, n)
        steps = self._qvpg_steps()
        k_max = min(steps, cfg.grad_last_k)
        k_grad = int(torch.randint(min(cfg.grad_k_min, k_max), k_max + 1, (1,),
                                   generator=self.gen)) if cfg.random_k else k_max
        x, proc, kl_process = self._qvpg_start(obs, n, shape)
        # credit: the gradient reaching the sample after each gradient step is multiplied
        # by that step's scale (credit_step_scales), filled in once x_0 is known
        credit = cfg.credit != "none"
        scales: list[Tensor] = []
        x0_preds: list[Tensor] = []

        def on_grad_step(st, x: Tensor) -> None:
            x0_preds.append(st.x0_pred.detach())
            x.register_hook(self._scale_hook(scales, len(x0_preds) - 1))

        self.optimizer.zero_grad(set_to_none=True)
        x, kl = qvpg_rollout(
            proc, net, x, steps, k_grad, self.gen, cond=cond, inpaint=inpaint,
            fast=self._merged() if steps > k_grad else None,
            kl_process=kl_process if cfg.kl_coef > 0 else None,
            on_grad_step=on_grad_step if credit else None)
        free = free_mask(inpaint, shape)
        if credit:
            lam = self._credit_weights(torch.stack(x0_preds), x.detach())
            scales.extend(credit_step_scales(lam).T)  # (K,) rows of (B,) multipliers
        reward = self.setup.reward(x, rows)
        objective = reward
        if cfg.qvpg_scale == "group" and n > 1:
            objective = reward / group_scale(reward.detach(), n)
        loss = -objective.mean() + cfg.kl_coef * kl.mean()
        entropy = None
        if cfg.entropy_coef > 0:
            entropy = knn_entropy(x, n, self._free_dim(free, x))
            loss = loss - cfg.entropy_coef * entropy.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        res = {"reward": float(reward.detach().mean()), "loss": float(loss.detach()),
               "kl": float(kl.detach().mean()), "grad_last_k": k_grad}
        if entropy is not None:
            res["entropy"] = float(entropy.detach().mean())
        return res

    @staticmethod
    def _scale_hook(scales: list[Tensor], j: int):
        """Backward hook: the gradient of the sample after gradient step ``j`` times
        ``scales[j]`` (one multiplier per sample)."""
        def hook(grad: Tensor) -> Tensor:
            return grad * scales[j].to(grad).view(-1, *([1] * (grad.dim() - 1)))
        return hook
