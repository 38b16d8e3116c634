"""IQL critic (Kostrikov, Nair & Levine 2021, "Offline RL with Implicit Q-Learning").

Twin Q networks ``Q_1, Q_2(s, a)``, a state value ``V(s)`` fitted by expectile regression
onto the target twins' minimum, and Polyak-averaged target copies of the Q networks::

    L_V = E[ |τ − 1(u < 0)| · u² ],           u = min_i Q̄_i(s, a) − V(s)     (Q̄ detached)
    L_Q = Σ_i E[ (Q_i(s, a) − y)² ],           y = r + γ (1 − d) V(s')        (y detached)
    Q̄ ← (1 − τ_t) Q̄ + τ_t Q                                                   (after each step)

The two losses are gradient-isolated: ``L_V`` reaches only V's parameters, ``L_Q`` only the
online Q networks'; the targets never receive gradient. The critic takes and returns RAW
environment-space observations and actions: its normaliser statistics are buffers, so they
travel in ``model.safetensors`` with the weights (keys ``normalizer.<field>.<param>``, the
layout of :meth:`~diffalign.data.normalizer.NormalizerSet.to_tensors`).

:func:`expectile_loss`, :func:`iql_value_loss`, :func:`iql_q_loss` and :func:`awr_weights` are
the pure formulas; :class:`IQLCritic` wraps them; :func:`train_critic` runs the generic trainer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..data.episodes import Episodes
from ..data.normalizer import NormalizerSet
from ..train.checkpoint import CONFIG, CheckpointError, load_model_files, read_json, save_model

__all__ = [
    "CRITIC_KIND",
    "ENSEMBLE_KIND",
    "CriticConfig",
    "CriticEnsemble",
    "DeviceData",
    "FieldNormalizer",
    "IQLCritic",
    "as_tensor",
    "build_from_files",
    "make_field_normalizers",
    "module_device",
    "resolve_timeouts_as_terminals",
    "trainer_config",
    "awr_weights",
    "evaluate_critic",
    "expectile_loss",
    "featured_mlp",
    "iql_q_loss",
    "iql_value_loss",
    "load_critic",
    "mlp",
    "sample_batch",
    "train_critic",
    "transitions_from_episodes",
]

CRITIC_KIND = "iql_critic"
ENSEMBLE_KIND = "iql_critic_ensemble"


# ----------------------------------------------------------------------------- pure losses
def expectile_loss(diff: Tensor, tau: float) -> Tensor:
    """``mean(|tau − 1(diff < 0)| · diff²)``: the asymmetric L2 of expectile regression.

    ``tau = 0.5`` is half the MSE; ``tau → 1`` approaches the maximum of the target.
    """
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff.pow(2)).mean()


def iql_value_loss(q_target_min: Tensor, v: Tensor, tau: float) -> Tensor:
    """IQL's value loss: ``expectile_loss(stopgrad(q_target_min) − v, tau)``."""
    return expectile_loss(q_target_min.detach() - v, tau)


def iql_q_loss(
    q1: Tensor, q2: Tensor, reward: Tensor, done: Tensor, next_v: Tensor, gamma: float
) -> Tensor:
    """TD loss of the twin Qs: ``mean((q1 − y)²) + mean((q2 − y)²)``, ``y = r + γ(1 − d)V(s')``.

    ``y`` is detached (the sum over twins follows the reference implementation of IQL).
    """
    target = (reward + gamma * (1.0 - done.to(reward.dtype)) * next_v).detach()
    return (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()


def awr_weights(adv: Tensor, beta: float, max_weight: float = 100.0) -> Tensor:
    """Advantage-weighted-regression weights ``min(exp(beta · adv), max_weight)`` (detached).

    Computed as ``exp(min(beta · adv, log max_weight))`` so a large advantage cannot overflow.
    """
    return torch.exp((beta * adv.detach()).clamp(max=math.log(max_weight)))


# ----------------------------------------------------------------------------- config
@dataclass
class CriticConfig:
    """Hyper-parameters of the IQL critic and of its training run."""

    hidden: int = 256
    """Width of every hidden layer of the Q and V MLPs."""
    depth: int = 2
    """Number of hidden layers of each MLP."""
    fourier_features: int = 0
    """Random Fourier features of the normalised inputs (Tancik et al. 2020): ``n`` frequencies
    ``B ~ N(0, fourier_scale²)`` give ``[x, sin(2πBx), cos(2πBx)]`` at every network's input.
    0 = plain inputs. They let a small MLP fit values that change sharply with the state
    (Nav1D's reward moves to a new target at every time step)."""
    fourier_scale: float = 1.0
    """Standard deviation of the Fourier frequencies (cycles per unit of normalised input)."""
    expectile: float = 0.7
    """Expectile tau of the value regression (0.5 = mean, -> 1 = max over dataset actions)."""
    backup_actions: int = 0
    """0 = IQL: V(s) is the ``expectile`` of Q over the dataset's action at s. K > 0 = a max
    backup: V(s) regresses (squared error) onto ``max Q̄(s, a)`` over the row's own action
    and K actions drawn from the batch, i.e. from the data's own action marginal. Use it
    only where the data covers the action space at every state (a random behaviour
    policy): there it removes the expectile's downward bias, which compounds over a long
    horizon; with narrow data (an expert) the max reaches actions the data never tried
    at that state and over-estimates."""
    backup_states: int = 64
    """With ``backup_actions``: V trains on this many states of each batch (the max costs
    ``backup_actions`` target evaluations per state)."""
    backup_proposals: Literal["batch", "grid"] = "batch"
    """The K actions of the max backup: "batch" = the first K actions of the batch (draws of
    the data's action marginal); "grid" = K evenly spaced actions from the batch's smallest
    to its largest action (one action dimension only). On Nav1D (layout 0, 6000 steps, V on
    every state of the batch) 32 batch actions gave a greedy policy at 93.2% of the optimum,
    a grid of 32 94.2% (chosen by the first twin; 95.0% with ``backup_bf16``)."""
    backup_select: Literal["min", "first"] = "min"
    """How the max backup picks its action: "min" = the max over the K actions of
    ``min(Q̄_1, Q̄_2)``; "first" = the action with the largest ``Q̄_1`` (half the cost),
    valued by ``min(Q̄_1, Q̄_2)`` there (the double-Q split of choosing and valuing)."""
    backup_refine: int = 0
    """With the "grid" proposals: after the grid, this many more actions evenly spaced across
    the two grid cells beside the grid action of largest ``Q̄_1`` (or ``min(Q̄_1, Q̄_2)`` with
    ``backup_select="min"``), one such second grid per state; the max then runs over both. A
    coarse grid of 8 and a fine one of 8 (16 evaluations per state) resolve the action as
    finely as an even grid of 25 at half the cost of a grid of 32. 0 = one grid."""
    backup_bf16: bool = False
    """Evaluate the K proposals in bfloat16 (autocast): about 2.5× faster matmuls on CPUs
    with AVX512-BF16 and on GPUs. The chosen action is then valued in float32."""
    ensemble: int = 1
    """Number of IQL critics trained side by side (each its own initialisation and batches);
    with more than one, :func:`train_critic` returns a :class:`CriticEnsemble` whose Q and V
    are the members' means. A single critic's quality depends a lot on its seed (on Nav1D
    the greedy policy of three seeds ranged 83.9-95.1% of the optimum on one layout);
    averaging removes the bad draw."""
    gamma: float = 0.99
    """Discount factor."""
    target_tau: float = 0.02
    """Polyak rate of the target Q networks, applied after every optimiser step. IQL's
    0.005 suits ~1M steps; with the 3000-step default it leaves V at about half its
    converged value on Nav1D, so the default here is 0.02."""
    reward_scale: float = 1.0
    """Rewards are mapped to ``reward_scale * r + reward_bias`` before the TD target (Q and V
    are then in those units)."""
    reward_bias: float = 0.0
    """See ``reward_scale``."""
    normalize_obs: bool = True
    """Standardise observations (mean/std of the data) at the network input."""
    normalize_act: bool = True
    """Standardise actions (mean/std of the data) at the Q networks' input."""
    timeouts_as_terminals: bool | None = None
    """Treat time-outs as terminal (no bootstrap past them). None = auto: True when the
    dataset's env is Nav1D (its observation holds the time and its horizon is fixed, so the
    time-out is the true end), False otherwise (D4RL convention: bootstrap through them)."""
    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 256
    """Transitions per step."""
    lr: float = 1e-3
    """Adam learning rate (Q and V together; IQL's 3e-4 is for much longer runs)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up (as the trainer names them)."""
    grad_clip: float = 10.0
    """Global gradient-norm clip (0 = none)."""
    seed: int = 0
    """Seed of the initialisation and of the batch sampling."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    log_every: int = 100
    """Log metrics every this many steps."""
    ckpt_every: int = 1000
    """Save a resumable training state every this many steps (with an out_dir; 0 = only at
    the end)."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"CriticConfig.{name} must be {what}, got "
                                 f"{name}={getattr(self, name)!r}")

        for name in ("hidden", "depth", "steps", "batch_size", "log_every", "backup_states",
                     "ensemble"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name,
                 "an integer >= 1")
        for name in ("warmup_steps", "seed", "ckpt_every", "fourier_features",
                     "backup_actions", "backup_refine"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name,
                 "an integer >= 0")
        need(self.backup_proposals in ("batch", "grid"), "backup_proposals",
             "'batch' or 'grid'")
        need(self.backup_select in ("min", "first"), "backup_select", "'min' or 'first'")
        need(self.backup_refine == 0 or (self.backup_proposals == "grid"
                                         and self.backup_actions >= 2), "backup_refine",
             "0 unless backup_proposals='grid' with backup_actions >= 2")
        need(self.fourier_scale > 0.0 and math.isfinite(self.fourier_scale), "fourier_scale",
             "> 0")
        need(0.0 < self.expectile < 1.0, "expectile", "in (0, 1)")
        need(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]")
        need(0.0 < self.target_tau <= 1.0, "target_tau", "in (0, 1]")
        need(math.isfinite(self.reward_scale) and self.reward_scale != 0.0, "reward_scale",
             "finite and non-zero")
        need(math.isfinite(self.reward_bias), "reward_bias", "finite")
        need(self.lr > 0.0 and math.isfinite(self.lr), "lr", "> 0")
        need(self.weight_decay >= 0.0, "weight_decay", ">= 0")
        need(self.grad_clip >= 0.0, "grad_clip", ">= 0")
        need(isinstance(self.device, str) and bool(self.device), "device",
             "a device string ('auto', 'cpu', 'cuda', ...)")


def _config_from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {unknown}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid {cls.__name__}: {e}") from e


# ----------------------------------------------------------------------------- pieces
def mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """``depth`` hidden ReLU layers of width ``hidden``, then a linear output."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class FourierInput(nn.Module):
    """``x -> [x, sin(2πBx), cos(2πBx)]`` with a fixed random ``B`` (a buffer, saved with the
    weights); the identity when ``n == 0``."""

    def __init__(self, in_dim: int, n: int, scale: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        self.register_buffer("freqs", torch.randn(in_dim, n, generator=gen) * float(scale))
        self.out_dim = in_dim + 2 * n

    def forward(self, x: Tensor) -> Tensor:
        if self.freqs.shape[1] == 0:
            return x
        z = 2 * math.pi * (x @ self.freqs.to(x.dtype))
        return torch.cat([x, torch.sin(z), torch.cos(z)], dim=-1)


def featured_mlp(in_dim: int, cfg: Any, out_dim: int = 1, salt: int = 0) -> nn.Sequential:
    """:func:`mlp` behind a :class:`FourierInput` of ``cfg.fourier_features`` frequencies
    (module 0 is the feature map, so a plain MLP's layer indices shift by one)."""
    if cfg.fourier_features == 0:
        return mlp(in_dim, cfg.hidden, cfg.depth, out_dim)
    feats = FourierInput(in_dim, cfg.fourier_features, cfg.fourier_scale, cfg.seed + salt)
    return nn.Sequential(feats, *mlp(feats.out_dim, cfg.hidden, cfg.depth, out_dim))


class FieldNormalizer(nn.Module):
    """One normaliser's parameters as buffers (``mean``/``std`` or ``min``/``max``).

    ``normalize(x) = (x − shift) / scale`` exactly as the matching
    :class:`~diffalign.data.normalizer.Normalizer`; the identity when built with ``dim`` only.
    """

    def __init__(self, dim: int, params: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        if params is None:
            params = {"mean": torch.zeros(dim), "std": torch.ones(dim)}
        names = tuple(sorted(params))
        if names not in (("mean", "std"), ("max", "min")):
            raise ValueError(f"normaliser parameters must be mean/std or min/max, got {names}")
        self.kind = "gaussian" if names == ("mean", "std") else "minmax"
        for k, v in params.items():
            v = torch.as_tensor(v, dtype=torch.float32).detach().clone().reshape(-1)
            if v.numel() not in (1, dim):
                raise ValueError(f"normaliser parameter {k!r} has {v.numel()} entries, "
                                 f"expected {dim}")
            self.register_buffer(k, v.expand(dim).clone())

    def _shift_scale(self) -> tuple[Tensor, Tensor]:
        if self.kind == "gaussian":
            return self.mean, self.std.clamp_min(1e-6)
        return (self.min + self.max) / 2, ((self.max - self.min) / 2).clamp_min(5e-7)

    def normalize(self, x: Tensor) -> Tensor:
        shift, scale = self._shift_scale()
        return (x - shift.to(x.dtype)) / scale.to(x.dtype)

    def unnormalize(self, x: Tensor) -> Tensor:
        shift, scale = self._shift_scale()
        return x * scale.to(x.dtype) + shift.to(x.dtype)


def make_field_normalizers(norms: NormalizerSet | None, dims: dict[str, int]) -> nn.ModuleDict:
    """A ModuleDict ``{field: FieldNormalizer}`` (identity for fields ``norms`` lacks)."""
    out = nn.ModuleDict()
    for name, dim in dims.items():
        params = norms[name].state_dict() if norms is not None and name in norms else None
        out[name] = FieldNormalizer(dim, params)
    return out


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def as_tensor(x: Any, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)


# ----------------------------------------------------------------------------- critic
class IQLCritic(nn.Module):
    """Twin Q + expectile V + target Qs, on raw observations/actions (see the module doc).

    ``normalizers`` (optional) is a fitted :class:`NormalizerSet` with ``observations`` and/or
    ``actions``; missing fields are left unnormalised.
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: CriticConfig | None = None,
                 normalizers: NormalizerSet | None = None) -> None:
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"need obs_dim >= 1 and act_dim >= 1, got obs_dim={obs_dim} "
                             f"act_dim={act_dim}")
        self.cfg = cfg if cfg is not None else CriticConfig()
        """Hyper-parameters."""
        self.obs_dim = int(obs_dim)
        """Observation size."""
        self.act_dim = int(act_dim)
        """Action size."""
        c = self.cfg
        if c.ensemble != 1:
            raise ValueError(f"IQLCritic is one critic, got cfg.ensemble={c.ensemble} (use "
                             "CriticEnsemble or train_critic for several)")
        if c.backup_actions > 0 and c.backup_proposals == "grid" and act_dim != 1:
            raise ValueError(f"backup_proposals='grid' needs one action dimension, got "
                             f"act_dim={act_dim} (use backup_proposals='batch')")
        self.normalizer = make_field_normalizers(
            normalizers, {"observations": obs_dim, "actions": act_dim})
        """Input normalisers (buffers ``normalizer.<field>.<param>``)."""
        self.q1 = featured_mlp(obs_dim + act_dim, c)
        """First online Q network."""
        self.q2 = featured_mlp(obs_dim + act_dim, c)
        """Second online Q network."""
        self.v_net = featured_mlp(obs_dim, c, salt=1)
        """State-value network."""
        self.q1_target = featured_mlp(obs_dim + act_dim, c)
        """Polyak copy of ``q1`` (no gradient)."""
        self.q2_target = featured_mlp(obs_dim + act_dim, c)
        """Polyak copy of ``q2`` (no gradient)."""
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        for p in (*self.q1_target.parameters(), *self.q2_target.parameters()):
            p.requires_grad_(False)

    # -- inputs
    def _obs(self, obs: Any) -> Tensor:
        x = as_tensor(obs, module_device(self))
        if x.shape[-1] != self.obs_dim:
            raise ValueError(f"observations must end in dim {self.obs_dim}, got {tuple(x.shape)}")
        return self.normalizer["observations"].normalize(x) if self.cfg.normalize_obs else x

    def _sa(self, obs: Any, act: Any) -> Tensor:
        a = as_tensor(act, module_device(self))
        if a.shape[-1] != self.act_dim:
            raise ValueError(f"actions must end in dim {self.act_dim}, got {tuple(a.shape)}")
        if self.cfg.normalize_act:
            a = self.normalizer["actions"].normalize(a)
        s = self._obs(obs)
        if s.shape[:-1] != a.shape[:-1]:
            raise ValueError(f"observations {tuple(s.shape)} and actions {tuple(a.shape)} have "
                             "different leading shapes")
        return torch.cat([s, a], dim=-1)

    # -- values (leading shape (...) preserved; trailing feature dim removed)
    def q1q2(self, obs: Any, act: Any) -> tuple[Tensor, Tensor]:
        """The online twins ``(Q_1(s, a), Q_2(s, a))``, each of shape ``obs.shape[:-1]``."""
        sa = self._sa(obs, act)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)

    def q_target_min(self, obs: Any, act: Any) -> Tensor:
        sa = self._sa(obs, act)
        return torch.minimum(self.q1_target(sa), self.q2_target(sa)).squeeze(-1)

    def q(self, obs: Any, act: Any) -> Tensor:
        """``min(Q̄_1, Q̄_2)(s, a)`` of the TARGET twins (what IQL uses for V and for ranking).

        Differentiable in ``act`` (and ``obs``) although the target weights get no gradient.
        """
        return self.q_target_min(obs, act)

    def v(self, obs: Any) -> Tensor:
        """``V(s)``, shape ``obs.shape[:-1]``."""
        return self.v_net(self._obs(obs)).squeeze(-1)

    def advantage(self, obs: Any, act: Any) -> Tensor:
        """``q(s, a) − v(s)``."""
        return self.q(obs, act) - self.v(obs)

    def forward(self, obs: Any, act: Any) -> Tensor:
        """Same as :meth:`q`."""
        return self.q(obs, act)

    # -- training
    def scale_reward(self, reward: Tensor) -> Tensor:
        return reward * self.cfg.reward_scale + self.cfg.reward_bias

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """IQL losses on a batch of raw transitions.

        ``batch``: ``observations (B, obs_dim)``, ``actions (B, act_dim)``, ``rewards (B,)``,
        ``next_observations (B, obs_dim)``, ``dones (B,)`` (1 = no bootstrap); the batch is
        detached (it is data, even if an actor produced its actions). Returns
        ``loss`` (= ``loss_q + loss_v``), ``loss_q``, ``loss_v`` and detached diagnostics
        ``q_mean``, ``v_mean``, ``adv_mean``.
        """
        dev = module_device(self)
        # the batch is data: detach it so the critic's loss can never reach whatever made it
        batch = {k: as_tensor(v, dev).detach() for k, v in batch.items()}
        obs, act = batch["observations"], batch["actions"]
        with torch.no_grad():
            q_t = self.q_target_min(obs, act)
            next_v = self.v(batch["next_observations"])
            if self.cfg.backup_actions > 0:
                m = min(self.cfg.backup_states, obs.shape[0])
                v_target = torch.maximum(q_t[:m], self.max_q_target(obs[:m], act))
        v = self.v(obs)
        if self.cfg.backup_actions > 0:
            loss_v = (v_target - v[:m]).pow(2).mean()
        else:
            loss_v = iql_value_loss(q_t, v, self.cfg.expectile)
        q1, q2 = self.q1q2(obs, act)
        reward = self.scale_reward(batch["rewards"])
        done = batch["dones"]
        loss_q = iql_q_loss(q1, q2, reward, done, next_v, self.cfg.gamma)
        return {
            "loss": loss_q + loss_v,
            "loss_q": loss_q,
            "loss_v": loss_v,
            "q_mean": q_t.mean(),
            "v_mean": v.detach().mean(),
            "adv_mean": (q_t - v.detach()).mean(),
        }

    @torch.no_grad()
    def max_q_target(self, obs: Tensor, act: Tensor) -> Tensor:
        """``max_j Q̄(s_i, a_j)`` over K proposals ``a_j`` for every ``s_i``; shape ``(B,)``.

        The proposals (``cfg.backup_proposals``) are the first K rows of ``act`` (a batch
        drawn at random from the data, so draws of its action marginal) or K evenly spaced
        actions between the batch's smallest and largest, then ``cfg.backup_refine`` more across
        the cells beside each state's best grid action. With ``backup_select="first"`` the
        action is chosen by ``Q̄_1`` and valued by ``min(Q̄_1, Q̄_2)``."""
        cfg = self.cfg
        b = obs.shape[0]
        if cfg.backup_proposals == "grid":
            lo, hi = act.min(0).values, act.max(0).values
            frac = torch.linspace(0, 1, cfg.backup_actions, device=act.device, dtype=act.dtype)
            pick = lo + frac[:, None] * (hi - lo)
        else:
            pick = act[:min(cfg.backup_actions, act.shape[0])]
        cand = pick.expand(b, *pick.shape)  # (b, k, act_dim)
        score = self._backup_scores(obs, cand)
        if cfg.backup_refine > 0:
            cell = (hi - lo) / (cfg.backup_actions - 1)
            centre = cand[torch.arange(b, device=obs.device), score.argmax(1)]  # (b, act_dim)
            off = torch.linspace(-1, 1, cfg.backup_refine, device=act.device, dtype=act.dtype)
            fine = torch.minimum(torch.maximum(centre[:, None] + off[:, None] * cell, lo), hi)
            cand = torch.cat([cand, fine], 1)
            score = torch.cat([score, self._backup_scores(obs, fine)], 1)
        if cfg.backup_select == "first":
            chosen = cand[torch.arange(b, device=obs.device), score.argmax(1)]
            return self.q_target_min(obs, chosen)
        return score.max(1).values

    def _backup_scores(self, obs: Tensor, cand: Tensor) -> Tensor:
        """The max backup's selection scores of candidate actions ``cand (B, K, act_dim)``
        at ``obs (B, obs_dim)``: ``Q̄_1`` ("first") or ``min(Q̄_1, Q̄_2)`` ("min"), (B, K)."""
        b, k = cand.shape[:2]
        sa = self._sa(obs.repeat_interleave(k, 0), cand.reshape(b * k, -1))
        with torch.autocast(sa.device.type, dtype=torch.bfloat16, enabled=self.cfg.backup_bf16):
            if self.cfg.backup_select == "first":
                q = self.q1_target(sa)
            else:
                q = torch.minimum(self.q1_target(sa), self.q2_target(sa))
        return q.float().view(b, k)

    @torch.no_grad()
    def update_target(self, tau: float | None = None) -> None:
        """Polyak: ``θ̄ ← (1 − tau) θ̄ + tau θ`` (``tau`` defaults to ``cfg.target_tau``)."""
        tau = self.cfg.target_tau if tau is None else float(tau)
        for online, target in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
            for p, pt in zip(online.parameters(), target.parameters()):
                pt.lerp_(p, tau)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the online Qs and V (the targets are excluded), frozen or not."""
        return [p for net in (self.q1, self.q2, self.v_net) for p in net.parameters()]

    # -- checkpoints
    def config_dict(self) -> dict[str, Any]:
        """JSON-able ``config.json`` content (``kind`` = ``"iql_critic"``)."""
        return {"kind": CRITIC_KIND, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "config": asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (weights, targets, normalisers)."""
        return save_model(directory, self, self.config_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> IQLCritic:
        """Rebuild a critic saved by :meth:`save`; :class:`CheckpointError` names the path."""
        config, tensors = load_model_files(directory, device="cpu")
        critic = build_from_files(cls, CriticConfig, directory, config, tensors, CRITIC_KIND)
        return critic.to(device).eval()


class CriticEnsemble(nn.Module):
    """``cfg.ensemble`` :class:`IQLCritic` members; Q, V and the advantage are their means.

    Each member is a whole IQL critic (twin Q, V, target twins) with its own initial weights;
    :func:`train_critic` gives each its own batches, so the members differ only by their
    draws, and the mean smooths out a bad one. The interface is the critic's (raw inputs,
    :meth:`q` differentiable in the action), so every user of a critic takes either.
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: CriticConfig | None = None,
                 normalizers: NormalizerSet | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else CriticConfig(ensemble=2)
        if cfg.ensemble < 2:
            raise ValueError(f"a CriticEnsemble needs cfg.ensemble >= 2, got "
                             f"ensemble={cfg.ensemble} (use IQLCritic for one critic)")
        self.cfg = cfg
        """Hyper-parameters (shared by every member)."""
        self.obs_dim = int(obs_dim)
        """Observation size."""
        self.act_dim = int(act_dim)
        """Action size."""
        # members differ in seed only where the seed shapes the module (Fourier features);
        # their initial weights are successive draws of torch's generator
        self.members = nn.ModuleList(
            IQLCritic(obs_dim, act_dim, replace(cfg, ensemble=1, seed=cfg.seed + i), normalizers)
            for i in range(cfg.ensemble))
        """The critics."""

    def __len__(self) -> int:
        return len(self.members)

    def q(self, obs: Any, act: Any) -> Tensor:
        """Mean over members of ``min(Q̄_1, Q̄_2)(s, a)``."""
        return torch.stack([m.q(obs, act) for m in self.members]).mean(0)

    def v(self, obs: Any) -> Tensor:
        """Mean over members of ``V(s)``."""
        return torch.stack([m.v(obs) for m in self.members]).mean(0)

    def advantage(self, obs: Any, act: Any) -> Tensor:
        """``q(s, a) − v(s)``."""
        return self.q(obs, act) - self.v(obs)

    def forward(self, obs: Any, act: Any) -> Tensor:
        """Same as :meth:`q`."""
        return self.q(obs, act)

    def loss(self, batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Sum of the members' IQL losses (each reaches only its own member's parameters).

        ``batch`` is one batch for every member or a list of one batch per member. The
        diagnostics (``q_mean``, ``v_mean``, ``adv_mean``) are averaged over members.
        """
        batches = batch if isinstance(batch, (list, tuple)) else [batch] * len(self)
        if len(batches) != len(self):
            raise ValueError(f"got {len(batches)} batches for {len(self)} ensemble members")
        outs = [m.loss(b) for m, b in zip(self.members, batches)]
        res = {k: torch.stack([o[k] for o in outs]).sum(0) for k in ("loss", "loss_q", "loss_v")}
        res.update({k: torch.stack([o[k] for o in outs]).mean(0)
                    for k in ("q_mean", "v_mean", "adv_mean")})
        return res

    @torch.no_grad()
    def update_target(self, tau: float | None = None) -> None:
        """Polyak update of every member's target twins."""
        for m in self.members:
            m.update_target(tau)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every member's online Q and V parameters."""
        return [p for m in self.members for p in m.trainable_parameters()]

    def config_dict(self) -> dict[str, Any]:
        """JSON-able ``config.json`` content (``kind`` = ``"iql_critic_ensemble"``)."""
        return {"kind": ENSEMBLE_KIND, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "config": asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + one ``model.safetensors`` (keys ``members.<i>.…``)."""
        return save_model(directory, self, self.config_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> CriticEnsemble:
        """Rebuild an ensemble saved by :meth:`save`; :class:`CheckpointError` names the path."""
        config, tensors = load_model_files(directory, device="cpu")
        ens = build_from_files(cls, CriticConfig, directory, config, tensors, ENSEMBLE_KIND,
                               norm_prefix="members.0.normalizer.")
        return ens.to(device).eval()


CRITIC_CLASSES: dict[str, type] = {CRITIC_KIND: IQLCritic, ENSEMBLE_KIND: CriticEnsemble}
"""``config.json`` kind -> critic class."""


def load_critic(directory: str | Path, device: str | torch.device = "cpu"
                ) -> IQLCritic | CriticEnsemble:
    """The critic saved in ``directory``, one :class:`IQLCritic` or a :class:`CriticEnsemble`
    (by the ``kind`` of its ``config.json``), in eval mode on ``device``."""
    # only config.json here: the class's load reads the weights, once
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = read_json(Path(directory) / CONFIG,
                       f"{directory} has no {CONFIG}: not a diffalign checkpoint")
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in CRITIC_CLASSES:
        raise CheckpointError(f"{directory}: config.json has kind {kind!r}, expected one of "
                              f"{sorted(CRITIC_CLASSES)} (a critic)")
    return CRITIC_CLASSES[kind].load(directory, device=device)


def _normalizers_from_tensors(tensors: dict[str, Tensor], where: str,
                              prefix: str = "normalizer.") -> NormalizerSet:
    try:
        return NormalizerSet.from_tensors(tensors, prefix)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: bad normaliser tensors: {e}") from e


def build_from_files(cls: type, cfg_cls: type, directory: str | Path, config: dict,
                     tensors: dict[str, Tensor], kind: str, norm_prefix: str = "normalizer."
                     ) -> Any:
    """``cls(obs_dim, act_dim, cfg_cls(**config["config"]), normalizers)`` with the weights of
    ``tensors`` loaded strictly; any mismatch is a :class:`CheckpointError` naming the path."""
    where = str(directory)
    if not isinstance(config, dict) or config.get("kind") != kind:
        got = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{where}: config.json has kind {got!r}, expected {kind!r}")
    try:
        obs_dim, act_dim, cfg_d = int(config["obs_dim"]), int(config["act_dim"]), config["config"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json lacks or mangles {e}") from e
    cfg = _config_from_dict(cfg_cls, dict(cfg_d), where)
    norms = _normalizers_from_tensors(tensors, where, norm_prefix)
    try:
        model = cls(obs_dim, act_dim, cfg, norms)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: weights do not match config.json: {e}") from e
    return model


# ----------------------------------------------------------------------------- data
def transitions_from_episodes(episodes: Episodes, timeouts_as_terminals: bool = False
                              ) -> dict[str, np.ndarray]:
    """Flat ``(s, a, r, s', done)`` arrays from an :class:`Episodes`.

    With ``next_observations`` every step is kept. Without them ``s'`` is the next row of the
    same episode; an episode's last step is kept only when it is terminal (its ``s'`` is then
    never used and is set to ``s``) and dropped otherwise (time-out or unterminated tail).
    ``done = terminals`` (``| timeouts`` when ``timeouts_as_terminals``).
    """
    obs = episodes.observations
    done = episodes.terminals.copy()
    if timeouts_as_terminals:
        done |= episodes.timeouts
    if episodes.next_observations is not None:
        keep = np.ones(len(obs), dtype=bool)
        nxt = episodes.next_observations
    else:
        last = np.zeros(len(obs), dtype=bool)
        last[episodes.ends - 1] = True
        keep = ~last | episodes.terminals
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        nxt[last] = obs[last]
    if not keep.any():
        raise ValueError(f"{episodes.source or 'dataset'}: no transitions with a next "
                         "observation (every episode has one step and no next_observations)")
    return {
        "observations": obs[keep].astype(np.float32),
        "actions": episodes.actions[keep].astype(np.float32),
        "rewards": episodes.rewards[keep].astype(np.float32),
        "next_observations": nxt[keep].astype(np.float32),
        "dones": done[keep].astype(np.float32),
    }


def _is_nav1d(episodes: Episodes) -> bool:
    from ..envs import NAV1D_ID

    return episodes.meta.get("env_id") == NAV1D_ID


def resolve_timeouts_as_terminals(cfg: CriticConfig, episodes: Episodes) -> bool:
    """``cfg.timeouts_as_terminals``, with None resolved (True for Nav1D data)."""
    if cfg.timeouts_as_terminals is not None:
        return bool(cfg.timeouts_as_terminals)
    return _is_nav1d(episodes)


def sample_batch(data: dict[str, Tensor], batch_size: int, generator: torch.Generator
                 ) -> dict[str, Tensor]:
    """``batch_size`` rows drawn uniformly with replacement (indices from ``generator``)."""
    n = next(iter(data.values())).shape[0]
    idx = torch.randint(n, (batch_size,), generator=generator)
    dev = next(iter(data.values())).device
    idx = idx.to(dev)
    return {k: v.index_select(0, idx) for k, v in data.items()}


class DeviceData:
    """Transition arrays as tensors, moved lazily to whichever device the model is on."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.cpu = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self._cache: dict[str, dict[str, Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device) for k, v in self.cpu.items()}
        return self._cache[key]


def trainer_config(cfg: Any, progress: bool):
    """The trainer's ``TrainConfig`` for a critic/agent config (EMA off)."""
    from ..train.trainer import TrainConfig

    return TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, grad_clip=cfg.grad_clip,
        ema_decay=0.0, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, seed=cfg.seed,
        device=cfg.device, bf16=False, progress=progress,
    )


def train_critic(episodes: Episodes, cfg: CriticConfig | None = None,
                 out_dir: str | Path | None = None, progress: bool = True
                 ) -> IQLCritic | CriticEnsemble:
    """Fit an :class:`IQLCritic` on the transitions of ``episodes`` with the generic trainer.

    Polyak updates run after every optimiser step; no EMA. With ``cfg.ensemble > 1`` the
    members train side by side in one loop (one optimiser step over the sum of their
    losses, each member on its own batch) and a :class:`CriticEnsemble` is returned. With
    ``out_dir`` the critic is saved there (``config.json`` + ``model.safetensors``) and a
    killed run resumes from the trainer's state in it. Returns the critic in eval mode.
    """
    from ..train.trainer import fit

    cfg = cfg if cfg is not None else CriticConfig()
    data = transitions_from_episodes(episodes, resolve_timeouts_as_terminals(cfg, episodes))
    norms = NormalizerSet.fit_arrays(
        {"observations": data["observations"], "actions": data["actions"]}, kind="gaussian")
    torch.manual_seed(cfg.seed)  # the initial weights
    cls = CriticEnsemble if cfg.ensemble > 1 else IQLCritic
    critic = cls(episodes.obs_dim, episodes.act_dim, cfg, norms)
    tensors = DeviceData(data)

    def loss_fn(model: nn.Module, batch_size: int, gen: torch.Generator) -> dict[str, Tensor]:
        on = tensors.on(module_device(model))
        if isinstance(model, CriticEnsemble):
            return model.loss([sample_batch(on, batch_size, gen) for _ in range(len(model))])
        return model.loss(sample_batch(on, batch_size, gen))

    result = fit(
        critic, loss_fn, trainer_config(cfg, progress),
        out_dir=None if out_dir is None else Path(out_dir),
        save_fn=lambda d, m: m.save(d),
        params=critic.trainable_parameters(),
        after_step=lambda m, step: m.update_target(),
        log_prefix="critic",
    )
    return result.model.eval()


@torch.no_grad()
def evaluate_critic(critic: IQLCritic | CriticEnsemble, data: dict[str, np.ndarray],
                    chunk: int = 8192) -> dict[str, float]:
    """Mean losses and values of ``critic`` over ALL transitions in ``data`` (deterministic).

    Returns ``loss_q``, ``loss_v``, ``loss``, ``q_mean``, ``v_mean``, ``adv_mean`` as floats.
    """
    n = len(data["observations"])
    sums: dict[str, float] = {}
    dev = module_device(critic)
    for s in range(0, n, chunk):
        batch = {k: torch.as_tensor(v[s:s + chunk], device=dev) for k, v in data.items()}
        out = critic.loss(batch)
        m = len(batch["observations"])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * m
    return {k: v / n for k, v in sums.items()}
