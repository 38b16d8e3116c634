"""Conditions from rollouts: the states the critic's greedy policy visits, without the
environment.

The aligned model is trained and validated on conditions (states). Dataset states are spread
the way the behaviour policy spread them; a good policy visits few of them and concentrates
on narrow paths, where a small error decides the return. On Nav1D (layout 5, nav1d/full) the
aligned Diffuser's actions disagreed with the critic's argmax (by more than 0.25) on 27% of
uniform states and on 34% of the states it visited, and there its true Q-regret per step was
2.3× that of the critic's own argmax (0.068 against 0.029); on uniform states only 1.4×.

:func:`mix_rollout_states` replaces a fraction of a condition pool by states of rollouts of
the critic's greedy policy ``argmax_a Q(s, a)`` (searched over ``proposals`` actions) through
a :class:`~diffalign.models.dynamics.DynamicsModel` learned from the same offline data,
starting from the dataset's episode starts. The greedy policy is what alignment to the
critic aims for, so its states are where the aligned model will be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..models.dynamics import DynamicsConfig
from .online import history_states

__all__ = ["RolloutConditions", "action_proposals", "greedy_actions", "greedy_rollouts",
           "mix_rollout_states"]


@dataclass
class RolloutConditions:
    """Conditions from rollouts of the critic's greedy policy through learned dynamics."""

    fraction: float = 0.5
    """Share of the training and validation conditions taken from rollouts (the rest are
    dataset states)."""
    proposals: int = 201
    """Actions the greedy policy searches per state: an even grid over the data's action
    range for one action dimension, uniform draws in its box otherwise."""
    horizon: int = 64
    """Rollout length cap; the dataset's median episode length when that is shorter."""
    oversample: int = 1
    """Rollouts started per needed state, divided by the horizon: the states kept are drawn
    from ``oversample`` times as many (more starts, more of the paths, at that multiple of
    the cost: 2048 states of 32-step rollouts took 4 s with 1 and 24 s with 4 on one CPU
    thread, searching 201 actions with a two-critic ensemble)."""
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    """Training of the dynamics model (when one is not given)."""

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got fraction={self.fraction}")
        for name in ("proposals", "horizon", "oversample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")


def action_proposals(states: int, proposals: int, low: Tensor, high: Tensor,
                     generator: torch.Generator) -> Tensor:
    """``(states, proposals, act_dim)`` actions in the box ``[low, high]``: the same even grid
    for every state with one action dimension, uniform draws per state otherwise."""
    act_dim = low.numel()
    if act_dim == 1:
        u = torch.linspace(0, 1, proposals).view(1, proposals, 1).expand(states, proposals, 1)
    else:
        u = torch.rand(states, proposals, act_dim, generator=generator)
    return low.view(1, 1, -1) + u.to(low) * (high - low).view(1, 1, -1)


@torch.no_grad()
def greedy_actions(critic, obs: Tensor, proposals: Tensor, chunk: int = 65536) -> Tensor:
    """``argmax_a Q(s, a)`` over ``proposals`` ``(S, P, act_dim)`` for states ``obs`` (S, d)."""
    s, p, d = proposals.shape
    rows = obs.repeat_interleave(p, 0)
    acts = proposals.reshape(s * p, d)
    q = torch.cat([critic.q(rows[i:i + chunk], acts[i:i + chunk]).reshape(-1).cpu()
                   for i in range(0, s * p, chunk)])
    return proposals[torch.arange(s), q.view(s, p).argmax(1).to(proposals.device)]


@torch.no_grad()
def greedy_rollouts(critic, dynamics, starts: Tensor, horizon: int, proposals: int,
                    act_low: Tensor, act_high: Tensor, generator: torch.Generator) -> Tensor:
    """Trajectories ``(S, horizon + 1, obs_dim)`` of the critic's greedy policy through
    ``dynamics`` from the RAW observations ``starts`` (S, obs_dim)."""
    obs = starts.float()
    traj = [obs]
    for _ in range(horizon):
        acts = action_proposals(len(obs), proposals, act_low, act_high, generator)
        obs = dynamics(obs, greedy_actions(critic, obs, acts)).detach().cpu()
        traj.append(obs)
    return torch.stack(traj, 1)


def mix_rollout_states(pool: Tensor, critic, dynamics, episodes, obs_history: int,
                       cfg: RolloutConditions, seed: int = 0) -> tuple[Tensor, dict]:
    """``pool`` (N, T_o, obs_dim) with its first ``fraction · N`` rows replaced by states of
    greedy rollouts (with their histories), and a summary of what was mixed in."""
    n = len(pool)
    k = int(round(cfg.fraction * n))
    if k == 0:
        return pool, {"rollout_states": 0, "dataset_states": n}
    horizon = max(1, min(cfg.horizon, int(np.median(episodes.lengths()))))
    rng = np.random.default_rng(seed)
    n_starts = max(1, -(-k * cfg.oversample // horizon))
    first = episodes.observations[episodes.starts]
    starts = torch.as_tensor(first[rng.integers(0, len(first), n_starts)], dtype=torch.float32)
    acts = torch.as_tensor(episodes.actions, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    traj = greedy_rollouts(critic, dynamics, starts, horizon, cfg.proposals,
                           acts.min(0).values, acts.max(0).values, gen)
    states = history_states(list(traj.numpy()), obs_history)
    pick = torch.as_tensor(rng.choice(len(states), size=k, replace=len(states) < k))
    mixed = torch.cat([states[pick].to(pool), pool[k:]])
    return mixed, {"rollout_states": k, "dataset_states": n - k, "rollouts": n_starts,
                   "rollout_horizon": horizon}
