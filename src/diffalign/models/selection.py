"""Action selection over N sampled candidates (docs/design.md §3).

Policies (Diffusion Policy): ``"expectation"`` (mean of the N action chunks), ``"idql_greedy"``
(argmax of the critic's Q over the N) and ``"idql_softmax"`` (one drawn with probability
∝ softmax(Q / temperature)). Planners: N plans ranked by ``model.reward(x, obs, critic)``
(``"best"``; for a policy this is the same as ``"idql_greedy"``), or ``"random"``/``"first"``
when there is no critic. ``"auto"`` picks ``idql_greedy``/``best`` with a critic and
``expectation`` (policy) / ``first`` (planner) without.

The three small pure functions :func:`expectation`, :func:`greedy_index` and
:func:`softmax_index` are the selection rules; :func:`select_actions` samples and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SELECTIONS", "Selection", "expectation", "greedy_index", "resolve_selection",
           "select_actions", "softmax_index"]

SELECTIONS = ("auto", "expectation", "idql_greedy", "idql_softmax", "best", "random", "first")
"""Valid selection names."""
NEEDS_CRITIC = ("idql_greedy", "idql_softmax", "best")


def expectation(actions: Tensor) -> Tensor:
    """Mean over the candidate axis: ``(B, N, ...) -> (B, ...)``."""
    return actions.mean(1)


def greedy_index(scores: Tensor) -> Tensor:
    """Index of the best candidate per row: ``(B, N) -> (B,)`` (first one on ties)."""
    return scores.argmax(1)


def softmax_index(scores: Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """One index per row drawn with probability ∝ ``softmax(scores / temperature)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    probs = torch.softmax(scores.double() / temperature, dim=1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(scores.device)


def resolve_selection(kind: str, selection: str, critic) -> str:
    """Check ``selection`` and resolve ``"auto"``; raises ValueError naming bad values."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")
    if selection == "auto":
        if critic is not None:
            return "idql_greedy" if kind == "dp" else "best"
        return "expectation" if kind == "dp" else "first"
    if selection in NEEDS_CRITIC and critic is None:
        raise ValueError(f"selection={selection!r} ranks candidates with a critic; give one "
                         "(--critic DIR) or use 'expectation', 'random' or 'first'")
    return selection


@dataclass
class Selection:
    """The outcome of one batched decision."""

    actions: Tensor
    """Chosen RAW actions ``(B, T_a, act_dim)``."""
    x: Tensor
    """The chosen sample ``(B, H, D)`` (normalised; for "expectation", candidate 0)."""
    candidates: Tensor
    """RAW actions of every candidate ``(B, N, T_a, act_dim)``."""
    x_all: Tensor
    """All samples ``(B, N, H, D)`` (normalised)."""
    scores: Tensor | None
    """``(B, N)`` rewards R(x0) of the candidates when a critic ranked them."""
    index: Tensor
    """``(B,)`` the chosen candidate (0 for "expectation")."""


@torch.no_grad()
def select_actions(model, obs_hist: Tensor, candidates: int = 1, steps: int | None = None,
                   selection: str = "auto", critic=None,
                   generator: torch.Generator | None = None, temperature: float = 1.0,
                   net=None) -> Selection:
    """Sample ``candidates`` per row of ``obs_hist`` (B, T_o, obs_dim) and choose actions."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got candidates={candidates}")
    sel = resolve_selection(model.kind, selection, critic)
    obs_hist = model._check_hist(obs_hist)
    b, n = obs_hist.shape[0], candidates
    x = model.sample(obs_hist, n, generator=generator, steps=steps, net=net).x0
    acts = model.actions_from_x(x, obs_hist)  # (B*n, T_a, act)
    x_all = x.reshape(b, n, *x.shape[1:])
    cand = acts.reshape(b, n, *acts.shape[1:])
    scores = None
    if sel in NEEDS_CRITIC:
        scores = model.reward(x, obs_hist, critic).reshape(b, n).float()
    if sel == "expectation":
        idx = torch.zeros(b, dtype=torch.long, device=x.device)
        chosen = expectation(cand)
    else:
        if sel in ("idql_greedy", "best"):
            idx = greedy_index(scores)
        elif sel == "idql_softmax":
            idx = softmax_index(scores, temperature, generator)
        elif sel == "random":
            idx = torch.randint(n, (b,), generator=generator).to(x.device)
        else:  # first
            idx = torch.zeros(b, dtype=torch.long, device=x.device)
        chosen = cand[torch.arange(b, device=x.device), idx]
    return Selection(actions=chosen, x=x_all[torch.arange(b, device=x.device), idx],
                     candidates=cand, x_all=x_all, scores=scores, index=idx)
