"""Which stage of an alignment run is its answer: chosen on held-out states, never on the
evaluation episodes, and the reference itself unless a stage is reliably better
(docs/design.md §9).

Every candidate (the reference, each stage's adapter, the cascade) draws one sample for each
of ``states`` held-out dataset states, all with the same noise seed, and the alignment's
reward (the pessimistic critic when pessimism is on) scores them. A stage qualifies when its
paired gain over the reference, ``d_i = R(stage, s_i) − R(reference, s_i)``, has
``mean(d) > z / (1 − w) · se(d)``, with ``w`` the pessimism's weight (0 where the data tried
most actions, 1 where it holds one action per state): the less of the action space the data
covers, the less a critic's preference between samples can be checked against data, and at
``w = 1`` no stage is chosen over the reference. The final stage is the qualifying one with
the largest mean gain, else the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FinalStageConfig", "choose_final", "choose_from_table", "heldout_rewards"]


@dataclass
class FinalStageConfig:
    """How the final stage is chosen."""

    states: int = 512
    """Held-out dataset states (drawn apart from the training and validation conditions)."""
    z: float = 2.0
    """A stage must beat the reference by this many standard errors of the paired gain."""
    seed: int = 8642
    """Noise seed shared by every candidate's samples (paired comparison)."""

    def __post_init__(self) -> None:
        if self.states < 2:
            raise ValueError(f"states must be >= 2, got states={self.states}")
        if not self.z >= 0:
            raise ValueError(f"z must be >= 0, got z={self.z}")


@torch.no_grad()
def heldout_rewards(setup, states: Tensor, net=None, model=None, seed: int = 8642) -> Tensor:
    """The alignment reward of one sample per row of ``states``, ``(N,)``: from
    ``setup.model`` with the LoRA-wrapped ``net`` folded into a plain copy, or from another
    ``model`` with a ``sample`` method (the cascade)."""
    from .lora import merged_view

    obs = states.to(setup.model.device)
    g = torch.Generator().manual_seed(seed)
    if model is not None:
        x0 = model.sample(obs, n=1, generator=g, steps=setup.steps).x0
    else:
        x0 = setup.model.sample(obs, n=1, generator=g, steps=setup.steps,
                                net=None if net is None else merged_view(net)).x0
    return setup.reward(x0, obs).float().cpu()


def choose_final(reference: Tensor, stages: dict[str, Tensor], z: float = 2.0,
                 weight: float = 0.0, where: str | None = None
                 ) -> tuple[str, str, dict[str, dict]]:
    """``(name, reason, table)``: the final stage among ``stages`` (name → held-out rewards,
    paired with ``reference``'s), or ``"reference"``; ``table`` holds each candidate's mean
    reward, mean gain and the gain's standard error. ``weight``: the pessimism's weight;
    ``where``: what the rewards were measured on, for the reason (default: held-out
    states)."""
    ref = reference.double()
    table: dict[str, dict] = {"reference": {"mean": float(ref.mean()), "gain": 0.0, "se": 0.0}}
    for name, r in stages.items():
        d = r.double() - ref
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.inf
        table[name] = {"mean": float(r.double().mean()), "gain": float(d.mean()), "se": se}
    name, reason = choose_from_table(table, z, weight, len(ref), where=where)
    return name, reason, table


def choose_from_table(table: dict[str, dict], z: float = 2.0, weight: float = 0.0,
                      states: int | None = None, where: str | None = None
                      ) -> tuple[str, str]:
    """The rule of :func:`choose_final` on its table (also for a finished run's
    ``align.json``): ``(name, reason)``."""
    if where:
        on = f" {where}"
    else:
        on = f" on {states} held-out states" if states else " on the held-out states"
    if weight >= 1.0:
        return "reference", ("the data holds about one action per state (pessimism weight "
                             f"{weight:.2f}): no critic's preference between samples can be "
                             "checked against it, so the reference stays the answer")
    need = z / (1.0 - max(0.0, weight))
    best, best_gain = None, -math.inf
    for name, t in table.items():
        gain, se = t["gain"], t["se"]
        if name != "reference" and math.isfinite(gain) and gain > 0 and gain > need * se \
                and gain > best_gain:
            best, best_gain = name, gain
    if best is None:
        return "reference", (f"no stage beat the reference{on} by {need:.3g} standard "
                             "errors of the paired gain")
    t = table[best]
    return best, (f"largest held-out gain over the reference: {t['gain']:+.4g} "
                  f"(± {t['se']:.2g}){on}, above {need:.3g} standard errors")
