"""The IQL critic's networks: the pure losses (:func:`expectile_loss`, :func:`iql_value_loss`,
:func:`iql_q_loss`, :func:`awr_weights`), the building blocks (:func:`mlp`,
:class:`FourierInput`, :func:`featured_mlp`, :class:`FieldNormalizer`), one critic
(:class:`IQLCritic`) and a mean-Q ensemble of them (:class:`CriticEnsemble`)."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...data.normalizer import NormalizerSet
from ...train.checkpoint import load_model_files, save_model
from .config import CRITIC_KIND, ENSEMBLE_KIND, CriticConfig

__all__ = [
    "CriticEnsemble",
    "FieldNormalizer",
    "FourierInput",
    "IQLCritic",
    "as_tensor",
    "awr_weights",
    "expectile_loss",
    "featured_mlp",
    "iql_q_loss",
    "iql_value_loss",
    "make_field_normalizers",
    "mlp",
    "module_device",
]


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
        from .loading import build_from_files  # loading imports this module

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
        from .loading import build_from_files  # loading imports this module

        config, tensors = load_model_files(directory, device="cpu")
        ens = build_from_files(cls, CriticConfig, directory, config, tensors, ENSEMBLE_KIND,
                               norm_prefix="members.0.normalizer.")
        return ens.to(device).eval()
