"""Offline datasets as flat, D4RL-layout arrays with derived episode boundaries.

All steps of all episodes are stored back to back (``N`` steps in total). Step ``i`` ends
an episode when ``terminals[i] or timeouts[i]``; a final run of steps that is not flagged
(an unterminated tail) also counts as an episode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DatasetError", "Episodes"]


class DatasetError(ValueError):
    """A dataset file or array is malformed; the message names the field and the file."""


def _where(source: str | None) -> str:
    return str(source) if source else "<arrays>"


def _as_float(name: str, value: Any, source: str | None, ndim: int) -> np.ndarray:
    """Convert ``value`` to a float32 array with ``ndim`` dimensions, or raise DatasetError."""
    where = _where(source)
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - ragged python lists and the like
        raise DatasetError(f"{where}: field '{name}' cannot be read as an array: {exc}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise DatasetError(f"{where}: field '{name}' has non-numeric dtype {arr.dtype}")
    if ndim == 1 and arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # (N, 1) rewards/flags are common; accept them as (N,)
    if arr.ndim != ndim:
        raise DatasetError(
            f"{where}: field '{name}' must have {ndim} dimension(s), got shape {arr.shape}"
        )
    arr = arr.astype(np.float32, copy=False)
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        kind = "NaN" if np.isnan(arr[tuple(bad)]) else "inf"
        raise DatasetError(
            f"{where}: field '{name}' contains {kind} (first at index {tuple(int(b) for b in bad)})"
        )
    return arr


def _as_flags(name: str, value: Any, n: int, source: str | None) -> np.ndarray:
    if value is None:
        return np.zeros(n, dtype=bool)
    arr = _as_float(name, value, source, ndim=1)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise DatasetError(f"{_where(source)}: field '{name}' must hold only 0/1 or booleans")
    return arr.astype(bool)


@dataclass(eq=False)
class Episodes:
    """Flat D4RL-layout transitions plus episode boundaries.

    Construct with :meth:`from_arrays` (which converts and validates) or directly (the
    constructor validates too). ``meta["source"]``, when set, names the file in errors.
    """

    observations: np.ndarray
    """(N, obs_dim) float32: the observation at each step."""
    actions: np.ndarray
    """(N, act_dim) float32: the action taken at each step."""
    rewards: np.ndarray
    """(N,) float32: the reward received after each step."""
    terminals: np.ndarray
    """(N,) bool: the step ended the episode in a terminal state."""
    timeouts: np.ndarray
    """(N,) bool: the step ended the episode by truncation (time limit)."""
    next_observations: np.ndarray | None = None
    """(N, obs_dim) float32 or None: the observation after each step."""
    meta: dict = field(default_factory=dict)
    """Attributes: env id, ref_min_score, ref_max_score, source path, ..."""
    starts: np.ndarray = field(init=False, repr=False)
    """(n_episodes,) int64: index of each episode's first step."""
    ends: np.ndarray = field(init=False, repr=False)
    """(n_episodes,) int64: one past each episode's last step (exclusive end)."""

    def __post_init__(self) -> None:
        self.meta = dict(self.meta or {})
        src = self.meta.get("source")
        where = _where(src)
        self.observations = _as_float("observations", self.observations, src, ndim=2)
        n = self.observations.shape[0]
        if n == 0:
            raise DatasetError(f"{where}: field 'observations' is empty (0 steps)")
        self.actions = _as_float("actions", self.actions, src, ndim=2)
        self.rewards = _as_float("rewards", self.rewards, src, ndim=1)
        self.terminals = _as_flags("terminals", self.terminals, n, src)
        self.timeouts = _as_flags("timeouts", self.timeouts, n, src)
        if self.next_observations is not None:
            self.next_observations = _as_float(
                "next_observations", self.next_observations, src, ndim=2
            )
        lengths = {
            "observations": n,
            "actions": len(self.actions),
            "rewards": len(self.rewards),
            "terminals": len(self.terminals),
            "timeouts": len(self.timeouts),
        }
        if self.next_observations is not None:
            lengths["next_observations"] = len(self.next_observations)
        for name, m in lengths.items():
            if m != n:
                raise DatasetError(
                    f"{where}: field '{name}' has {m} steps but 'observations' has {n} "
                    f"(ragged arrays: {lengths})"
                )
        if self.actions.shape[1] == 0 or self.observations.shape[1] == 0:
            empty = "actions" if self.actions.shape[1] == 0 else "observations"
            raise DatasetError(f"{where}: field '{empty}' has zero feature dimension")
        if (
            self.next_observations is not None
            and self.next_observations.shape[1] != self.observations.shape[1]
        ):
            raise DatasetError(
                f"{where}: field 'next_observations' has dim {self.next_observations.shape[1]} "
                f"but 'observations' has dim {self.observations.shape[1]}"
            )
        done = np.flatnonzero(self.terminals | self.timeouts)
        ends = done + 1
        if len(ends) == 0 or ends[-1] != n:
            ends = np.append(ends, n)  # unterminated tail counts as an episode
        self.ends = ends.astype(np.int64)
        self.starts = np.concatenate([[0], self.ends[:-1]]).astype(np.int64)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(
        cls,
        observations: Any,
        actions: Any,
        rewards: Any,
        terminals: Any = None,
        timeouts: Any = None,
        next_observations: Any = None,
        meta: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> Episodes:
        """Build from array-likes, validating them.

        ``terminals``/``timeouts`` default to all False. ``source`` (a file name) is stored
        in ``meta["source"]`` and named in every :class:`DatasetError`.
        Raises DatasetError on NaN/inf, ragged lengths, wrong ndim, obs/next_obs dimension
        mismatch, empty data or non-0/1 flags.
        """
        meta = dict(meta or {})
        if source is not None:
            meta["source"] = str(source)
        return cls(
            observations=observations,
            actions=actions,
            rewards=rewards,
            terminals=terminals,
            timeouts=timeouts,
            next_observations=next_observations,
            meta=meta,
        )

    @classmethod
    def from_episode_list(
        cls, episodes: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None
    ) -> Episodes:
        """Concatenate per-episode dicts (keys as in :meth:`episode`) into one dataset.

        An episode without ``terminals``/``timeouts`` gets ``timeouts[-1] = True`` so its
        boundary survives concatenation.
        """
        if len(episodes) == 0:
            raise DatasetError(f"{_where((meta or {}).get('source'))}: no episodes given")
        cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")
        }
        has_next = all(ep.get("next_observations") is not None for ep in episodes)
        nxt: list[np.ndarray] = []
        for ep in episodes:
            t = len(ep["observations"])
            term = np.zeros(t, bool) if ep.get("terminals") is None else np.asarray(ep["terminals"])
            tout = np.zeros(t, bool) if ep.get("timeouts") is None else np.asarray(ep["timeouts"])
            tout = tout.astype(bool).copy()
            if t and not (bool(term[-1]) or bool(tout[-1])):
                tout[-1] = True
            cols["observations"].append(np.asarray(ep["observations"]))
            cols["actions"].append(np.asarray(ep["actions"]))
            cols["rewards"].append(np.asarray(ep["rewards"]).reshape(-1))
            cols["terminals"].append(term.astype(bool))
            cols["timeouts"].append(tout)
            if has_next:
                nxt.append(np.asarray(ep["next_observations"]))
        return cls.from_arrays(
            **{k: np.concatenate(v) for k, v in cols.items()},
            next_observations=np.concatenate(nxt) if has_next else None,
            meta=meta,
        )

    # ------------------------------------------------------------------ accessors
    def __len__(self) -> int:
        """Number of episodes."""
        return len(self.starts)

    @property
    def num_steps(self) -> int:
        """Total number of steps N."""
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def source(self) -> str | None:
        return self.meta.get("source")

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Arrays of episode ``i`` (negative indices allowed): observations, actions,
        rewards, terminals, timeouts and next_observations when present."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"episode index {i} out of range for {n} episodes")
        s, e = int(self.starts[i]), int(self.ends[i])
        out = {
            "observations": self.observations[s:e],
            "actions": self.actions[s:e],
            "rewards": self.rewards[s:e],
            "terminals": self.terminals[s:e],
            "timeouts": self.timeouts[s:e],
        }
        if self.next_observations is not None:
            out["next_observations"] = self.next_observations[s:e]
        return out

    def lengths(self) -> np.ndarray:
        """(n_episodes,) int64 episode lengths."""
        return self.ends - self.starts

    def returns(self) -> np.ndarray:
        """(n_episodes,) float64 undiscounted episode returns."""
        csum = np.concatenate([[0.0], np.cumsum(self.rewards, dtype=np.float64)])
        return csum[self.ends] - csum[self.starts]

    def episode_ids(self) -> np.ndarray:
        """(N,) int64: the episode each step belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths())

    def select(self, episode_indices: Sequence[int] | np.ndarray) -> Episodes:
        """A new dataset holding only the given episodes (in the given order)."""
        idx = np.asarray(episode_indices, dtype=np.int64)
        eps = [self.episode(int(i)) for i in idx]
        # Keep the original flags; from_episode_list only adds a timeout where none is set.
        return Episodes.from_episode_list(eps, meta=self.meta)

    def __repr__(self) -> str:
        return (
            f"Episodes(n_episodes={len(self)}, num_steps={self.num_steps}, "
            f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, source={self.source!r})"
        )
