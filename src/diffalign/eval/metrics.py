"""Evaluation metrics as pure functions on numpy arrays (torch tensors are accepted too).

- :func:`return_stats`, :func:`normalized_score` (D4RL convention, x100),
  :func:`reference_scores` and :data:`D4RL_REF_SCORES`;
- :func:`success_rate`;
- :func:`coherency_planner` and :func:`coherency_policy` (docs/design.md §5, the paper's
  Eqs. 15-16);
- :func:`candidate_entropy` (Gaussian-fit differential entropy of candidate samples).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "D4RL_REF_SCORES",
    "candidate_entropy",
    "coherency_planner",
    "coherency_policy",
    "normalized_score",
    "reference_scores",
    "return_stats",
    "success_rate",
]

D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "kitchen": (0.0, 4.0),
    "antmaze": (0.0, 1.0),
}
"""(ref_min_score, ref_max_score) of the D4RL normalised score, by environment family."""

_ALIASES = {"half_cheetah": "halfcheetah", "cheetah": "halfcheetah", "walker": "walker2d"}


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------- returns and scores
def return_stats(returns: Any) -> dict[str, float]:
    """``{"return_mean", "return_std"}`` of episode returns (population std, ddof=0)."""
    r = _np(returns).reshape(-1)
    if r.size == 0:
        raise ValueError("return_stats needs at least one return")
    return {"return_mean": float(r.mean()), "return_std": float(r.std())}


def normalized_score(ret: Any, ref_min: float, ref_max: float) -> float | np.ndarray:
    """D4RL normalised score ``100 * (ret - ref_min) / (ref_max - ref_min)``.

    Returns a float for a scalar ``ret`` and an array otherwise.
    """
    if ref_max == ref_min:
        raise ValueError(f"ref_max must differ from ref_min, got ref_min=ref_max={ref_min}")
    out = 100.0 * (_np(ret) - ref_min) / (ref_max - ref_min)
    return float(out) if out.ndim == 0 else out


def reference_scores(env_name_or_meta: str | Mapping[str, Any]) -> tuple[float, float]:
    """``(ref_min, ref_max)`` for an environment/dataset name or a dataset's ``meta``.

    A mapping with ``ref_min_score`` and ``ref_max_score`` (e.g. ``Episodes.meta`` of a
    Minari dataset) gives those; otherwise its ``env_id``/``env_name``/``dataset_id`` is
    looked up. A name matches a :data:`D4RL_REF_SCORES` family when it contains it,
    case-insensitively (``"hopper-medium-v2"``, ``"mujoco/hopper/medium-v0"``,
    ``"HalfCheetah-v4"``, ``"FrankaKitchen-v1"``, ``"antmaze-umaze-v2"``).
    Raises KeyError when nothing matches.
    """
    if isinstance(env_name_or_meta, Mapping):
        meta = env_name_or_meta
        lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
        if lo is not None and hi is not None:
            return float(lo), float(hi)
        for key in ("env_id", "env_name", "dataset_id"):
            if meta.get(key):
                try:
                    return reference_scores(str(meta[key]))
                except KeyError:
                    continue
        raise KeyError(
            "no reference scores: meta has no ref_min_score/ref_max_score and no known "
            f"env name (keys: {sorted(meta)})"
        )
    name = str(env_name_or_meta).lower()
    for family in sorted(D4RL_REF_SCORES, key=len, reverse=True):
        if family in name:
            return D4RL_REF_SCORES[family]
    for alias, family in _ALIASES.items():
        if alias in name:
            return D4RL_REF_SCORES[family]
    raise KeyError(
        f"no reference scores for {env_name_or_meta!r}; known: {sorted(D4RL_REF_SCORES)}"
    )


# ---------------------------------------------------------------------- success
_SUCCESS_KEYS = ("success", "is_success", "goal_achieved")


def _flag(item: Any) -> bool:
    if isinstance(item, Mapping):
        for key in _SUCCESS_KEYS:
            if key in item:
                return bool(np.any(_np(item[key])))
        raise KeyError(f"info dict has none of the success keys {_SUCCESS_KEYS}: {sorted(item)}")
    if isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim > 0):
        return any(_flag(x) for x in item)  # per-step flags/infos of one episode
    if isinstance(item, torch.Tensor):
        return bool(item.bool().any())
    return bool(item)


def success_rate(infos_or_flags: Any) -> float:
    """Fraction of successful episodes.

    Accepts, per episode, a flag (bool/0-1), an info dict with ``success``/``is_success``/
    ``goal_achieved``, or a sequence of per-step flags/infos (the episode succeeds if any
    step does). A 2-D array ``(episodes, steps)`` is read the same way.
    """
    items = infos_or_flags
    if isinstance(items, torch.Tensor):
        items = items.detach().cpu().numpy()
    if isinstance(items, np.ndarray) and items.ndim == 0:
        items = [items.item()]
    if len(items) == 0:
        raise ValueError("success_rate needs at least one episode")
    return float(np.mean([_flag(x) for x in items]))


# ---------------------------------------------------------------------- coherency
def coherency_planner(
    states: Any,
    actions: Any,
    dynamics_fn: Callable[[np.ndarray, np.ndarray], Any],
    tol: float,
    dims: Sequence[int] | None = None,
) -> float:
    """Planner coherency ``mean_{b,t} exp(-||s_{b,t+1} - f(s_{b,t}, a_{b,t})||^2 / (2 tol^2))``.

    ``states`` (B, H, obs_dim) and ``actions`` (B, H, act_dim) are generated plans (H - 1
    transitions each; the last action is unused). ``dynamics_fn(s, a)`` gets flattened
    ``(B*(H-1), obs_dim)`` and ``(B*(H-1), act_dim)`` numpy arrays and returns the next
    states ``(B*(H-1), obs_dim)``. ``dims`` restricts the error to some state dimensions
    (e.g. leave out a time feature). 1 means every plan obeys the dynamics; an error of one
    ``tol`` gives exp(-1/2). docs/design.md §5 uses ``tol = δ/10`` for Nav1D.
    """
    s, a = _np(states), _np(actions)
    if s.ndim != 3 or a.ndim != 3 or s.shape[:2] != a.shape[:2]:
        raise ValueError(
            f"states must be (B, H, obs) and actions (B, H, act) with equal B, H; got "
            f"states {s.shape}, actions {a.shape}"
        )
    b, h, d = s.shape
    if h < 2:
        raise ValueError(f"coherency needs plans of at least 2 steps, got H={h}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got tol={tol}")
    pred = _np(dynamics_fn(s[:, :-1].reshape(-1, d), a[:, :-1].reshape(-1, a.shape[-1])))
    pred = pred.reshape(b, h - 1, -1)
    err = s[:, 1:] - pred
    if dims is not None:
        err = err[..., list(dims)]
    sq = (err**2).sum(-1)
    return float(np.exp(-sq / (2.0 * tol**2)).mean())


def coherency_policy(
    states: Any,
    actions: Any,
    density_fn: Callable[[np.ndarray, np.ndarray], Any],
    max_density_fn: Callable[[np.ndarray], Any] | None = None,
    action_low: Any = None,
    action_high: Any = None,
    grid_size: int = 101,
    chunk: int = 4096,
) -> float:
    """Policy coherency ``mean_i π_β(a_i|s_i) / max_a' π_β(a'|s_i)``.

    ``states`` (..., obs_dim) and ``actions`` (..., act_dim) are pairs with ``a_i ~ π_θ(·|s_i)``
    (leading axes are flattened). ``density_fn(s, a)`` returns the behaviour density
    ``π_β(a|s)`` (not its log) for ``(n, obs_dim)``/``(n, act_dim)`` arrays as shape (n,).

    ``max_density_fn(s)`` returns ``max_a' π_β(a'|s)`` as (n,). When it is None the max is
    estimated on a regular grid of ``grid_size`` points per action dimension spanning
    ``[action_low, action_high]`` (scalars or per-dimension arrays; required then), i.e.
    ``grid_size ** act_dim`` density evaluations per state, done ``chunk`` states at a time.
    The grid max is a lower bound of the true max, so each ratio is capped at 1 (as if the
    sampled action were added to the grid). A state whose max is 0 counts 0.
    """
    a = _np(actions)
    s = _np(states)
    act_dim = a.shape[-1]
    a = a.reshape(-1, act_dim)
    s = s.reshape(-1, s.shape[-1])
    if len(s) != len(a):
        raise ValueError(f"states and actions differ in count: {len(s)} vs {len(a)}")
    if len(s) == 0:
        raise ValueError("coherency_policy needs at least one (state, action) pair")
    dens = _np(density_fn(s, a)).reshape(-1)
    if max_density_fn is not None:
        mx = _np(max_density_fn(s)).reshape(-1)
    else:
        if action_low is None or action_high is None:
            raise ValueError("without max_density_fn, give action_low and action_high")
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got grid_size={grid_size}")
        low = np.broadcast_to(_np(action_low), (act_dim,))
        high = np.broadcast_to(_np(action_high), (act_dim,))
        axes = [np.linspace(lo, hi, grid_size) for lo, hi in zip(low, high)]
        grid = np.array(list(itertools.product(*axes)))  # (G, act_dim)
        g = len(grid)
        per = max(1, chunk // g)  # states per density_fn call
        mx = np.empty(len(s))
        for i in range(0, len(s), per):
            sb = s[i : i + per]
            rep_s = np.repeat(sb, g, axis=0)
            rep_a = np.tile(grid, (len(sb), 1))
            mx[i : i + per] = _np(density_fn(rep_s, rep_a)).reshape(len(sb), g).max(1)
    ratio = np.divide(dens, mx, out=np.zeros_like(dens), where=mx > 0)
    return float(np.clip(ratio, 0.0, 1.0).mean())


# ---------------------------------------------------------------------- entropy
def candidate_entropy(samples: Any, ridge: float = 1e-6, per_state: bool = False) -> Any:
    """Differential entropy of a Gaussian fitted to each state's candidates, averaged.

    ``samples``: (n_states, N, D) candidates per state, or (n_states, N) for D = 1.
    Per state, ``H = 0.5 * logdet(2πe (Σ + ridge·I))`` with Σ the unbiased sample
    covariance (the ridge keeps N <= D or collapsed samples finite). Returns the mean over
    states (a float), or the (n_states,) array when ``per_state``. Raises ValueError if N < 2.
    """
    x = _np(samples)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"samples must be (n_states, N, D) or (n_states, N), got {x.shape}")
    n_states, n, d = x.shape
    if n < 2:
        raise ValueError(f"candidate_entropy needs N >= 2 candidates per state, got N={n}")
    xt = torch.from_numpy(x)
    xc = xt - xt.mean(1, keepdim=True)
    cov = xc.transpose(1, 2) @ xc / (n - 1)  # (S, D, D)
    cov = cov + ridge * torch.eye(d, dtype=cov.dtype)
    _, logdet = torch.linalg.slogdet(cov)
    ent = 0.5 * (d * math.log(2 * math.pi * math.e) + logdet)
    ent = ent.numpy()
    return ent if per_state else float(ent.mean())
