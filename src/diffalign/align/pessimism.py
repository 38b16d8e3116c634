"""Pessimism from the data: the alignment's reward does not trust the critic off the data's
support, with a strength measured from the data (docs/design.md §9).

The reward of a sample becomes

    R̃(s, a) = Q(s, a) − w · σ_Q · E(s, a)

with ``E`` the behaviour band's excess (:meth:`~diffalign.models.behavior.BehaviorModel.excess`:
0 inside the band of actions the data took at ``s``, quadratic outside it), ``σ_Q`` the
std of the critic's Q over the dataset's transitions (the reward's unit), and ``w`` a weight
set from the data's action coverage ``c`` (:meth:`~diffalign.models.behavior.BehaviorModel.
coverage`):

    w = strength · clip((c_high − c) / (c_high − c_low), 0, 1)

Where the data tried most actions near every state (random-policy data, ``c ≥ c_high``) the
critic's values come from data everywhere and ``w = 0``: the alignment goes as far as the
critic says. Where the data holds one action per state (an expert's, ``c ≤ c_low``) the
critic only extrapolates away from it and the full penalty keeps the samples in the band.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..models.behavior import BehaviorConfig, BehaviorModel

__all__ = ["PessimismConfig", "PessimisticCritic", "pessimism_weight", "pessimistic_critic"]


@dataclass
class PessimismConfig:
    """How strongly the alignment's reward distrusts the critic off the data's support."""

    strength: float = 1.0
    """Penalty, in units of the critic's Q spread over the data, of an action one margin
    (:attr:`margin`) outside the band, at full weight."""
    coverage_low: float = 0.2
    """At or below this action coverage the penalty has its full weight."""
    coverage_high: float = 0.6
    """At or above this action coverage the penalty is off (the data tried most actions)."""
    margin: float = 0.1
    """Unit of the distance outside the band (a share of the band's width, and of the
    data's action std), see :meth:`~diffalign.models.behavior.BehaviorModel.excess`."""
    probe_states: int = 4096
    """Dataset transitions on which the coverage and the Q spread are measured."""
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    """Training of the behaviour band."""

    def __post_init__(self) -> None:
        if not self.strength >= 0:
            raise ValueError(f"strength must be >= 0, got strength={self.strength}")
        if not 0 <= self.coverage_low < self.coverage_high <= 1:
            raise ValueError(f"need 0 <= coverage_low < coverage_high <= 1, got "
                             f"coverage_low={self.coverage_low}, "
                             f"coverage_high={self.coverage_high}")
        if not self.margin > 0:
            raise ValueError(f"margin must be > 0, got margin={self.margin}")
        if self.probe_states < 1:
            raise ValueError(f"probe_states must be >= 1, got probe_states={self.probe_states}")


def pessimism_weight(coverage: float, cfg: PessimismConfig) -> float:
    """``w = strength · clip((c_high − c) / (c_high − c_low), 0, 1)``."""
    ramp = (cfg.coverage_high - coverage) / (cfg.coverage_high - cfg.coverage_low)
    return float(cfg.strength * min(1.0, max(0.0, ramp)))


class PessimisticCritic(nn.Module):
    """A critic whose ``q`` is lowered off the data's support (module docstring); everything
    else (``v``, ``cfg``, training for online rounds) is the wrapped critic's."""

    def __init__(self, critic: nn.Module, behavior: BehaviorModel, weight: float,
                 q_scale: float, margin: float = 0.1) -> None:
        super().__init__()
        self.critic = critic
        self.behavior = behavior
        self.weight = float(weight)
        self.q_scale = float(q_scale)
        self.margin = float(margin)

    def penalty(self, obs: Any, act: Any) -> Tensor:
        """``w · σ_Q · E(s, a)``, ``(B,)``."""
        return self.weight * self.q_scale * self.behavior.excess(obs, act, self.margin)

    def q(self, obs: Any, act: Any) -> Tensor:
        q = self.critic.q(obs, act)
        if self.weight == 0.0:
            return q
        return q - self.penalty(obs, act).to(q)

    def forward(self, obs: Any, act: Any) -> Tensor:
        return self.q(obs, act)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("critic"), name)


@torch.no_grad()
def pessimistic_critic(critic: nn.Module, episodes, cfg: PessimismConfig,
                       behavior: BehaviorModel | None = None, seed: int = 0,
                       progress: bool = False) -> tuple[PessimisticCritic, dict]:
    """Wrap ``critic`` with the penalty measured on ``episodes``: trains the behaviour band
    unless ``behavior`` is given. Returns the wrapper and what was measured (coverage,
    weight, Q spread, the share of the data's own actions the band calls off-support)."""
    from ..models.behavior import train_behavior
    from ..models.critic import module_device

    dev = module_device(critic)
    if behavior is None:
        with torch.enable_grad():
            behavior = train_behavior(episodes, cfg.behavior, progress=progress)
    behavior = behavior.to(dev).eval()
    for p in behavior.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(episodes.observations), size=cfg.probe_states)
    obs = torch.as_tensor(episodes.observations[idx], dtype=torch.float32, device=dev)
    act = torch.as_tensor(episodes.actions[idx], dtype=torch.float32, device=dev)
    coverage = behavior.coverage(obs)
    weight = pessimism_weight(coverage, cfg)
    q_scale = float(critic.q(obs, act).std())
    data_off = float((behavior.excess(obs, act, cfg.margin) > 1.0).float().mean())
    info = {"coverage": coverage, "weight": weight, "q_scale": q_scale,
            "data_off_support": data_off}
    return PessimisticCritic(critic, behavior, weight, q_scale, cfg.margin).eval(), info
