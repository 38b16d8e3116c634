"""Hyper-parameters of the IQL critic (:class:`CriticConfig`) and their validation, and the
``config.json`` kinds of its checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from ...train.checkpoint import CheckpointError

__all__ = ["CRITIC_KIND", "ENSEMBLE_KIND", "CriticConfig"]

CRITIC_KIND = "iql_critic"
ENSEMBLE_KIND = "iql_critic_ensemble"


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
