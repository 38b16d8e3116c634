"""Fixed-length training windows cut from episodes, with padding masks and obs history.

A window starts at a step ``s`` of an episode ``[e0, e1)`` and covers steps ``s .. s+H-1``.

Shapes of one item (``WindowDataset[i]``; :meth:`WindowDataset.get_batch` adds a leading
batch axis ``B``):

- ``x``: ``(H, D)`` float32, the selected ``keys`` concatenated on the last axis in the
  given order (``D = sum of their dims``; 1-D fields such as ``rewards`` count as 1 dim);
  ``key_slices[name]`` says where each field sits in ``D``;
- ``<key>``: ``(H, d_key)`` float32 for each selected key, the same values as in ``x``;
- ``mask``: ``(H,)`` bool, True where the position is a real step of the episode, False
  where the window runs past the episode's end and was padded;
- ``obs_history``: ``(obs_history, obs_dim)`` float32, observations ``s-K+1 .. s`` (the last
  row is the window's first observation, ``K = obs_history``); steps before the episode's
  start repeat its first observation;
- ``history_mask``: ``(obs_history,)`` bool, True for real (unpadded) history rows;
- ``returns``: ``(1,)`` float32, discounted return-to-go from ``s`` (only with ``discount``);
- ``index``: int64, the global step index ``s``; ``episode``: int64, the episode index.

Padding past an episode's end: ``pad="edge"`` repeats the episode's last step, ``pad="zero"``
writes zeros. With ``allow_partial=False`` only windows that fit entirely are made (masks
are then all True and episodes shorter than ``H`` give no window).
When ``normalizers`` (a :class:`~diffalign.data.normalizer.NormalizerSet`) is given, each
selected field it holds (and the history, with its ``observations`` entry) is normalised
once, up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffalign.data.episodes import Episodes

__all__ = ["WindowDataset", "episode_return_to_go", "make_windows", "window_indices"]

_FIELDS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def window_indices(
    episodes: Episodes, horizon: int, allow_partial: bool = True, stride: int = 1
) -> np.ndarray:
    """Window start indices: an ``(M, 4)`` int64 array of rows
    ``[start, episode, episode_start, episode_end)`` (episode_end exclusive).

    With ``allow_partial`` every step (every ``stride``-th step from each episode's start)
    starts a window; without it only starts with ``start + horizon <= episode_end``.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got horizon={horizon}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got stride={stride}")
    rows = []
    for ep, (s, e) in enumerate(zip(episodes.starts, episodes.ends)):
        last = e - 1 if allow_partial else e - horizon
        if last < s:
            continue
        st = np.arange(s, last + 1, stride, dtype=np.int64)
        rows.append(
            np.stack([st, np.full_like(st, ep), np.full_like(st, s), np.full_like(st, e)], axis=1)
        )
    if not rows:
        return np.zeros((0, 4), dtype=np.int64)
    return np.concatenate(rows).astype(np.int64)


def _discounted_rtg(rewards: np.ndarray, ends_mask: np.ndarray, discount: float) -> np.ndarray:
    """Return-to-go per step, restarting at each episode end (ends_mask[i]: i ends one)."""
    out = np.zeros(len(rewards), dtype=np.float64)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        if ends_mask[i]:
            acc = 0.0
        acc = float(rewards[i]) + discount * acc
        out[i] = acc
    return out


def episode_return_to_go(episodes: Episodes, discount: float) -> np.ndarray:
    """Discounted return-to-go of every step of ``episodes``, ``(N,)`` float64."""
    ends_mask = np.zeros(episodes.num_steps, dtype=bool)
    ends_mask[episodes.ends - 1] = True
    return _discounted_rtg(episodes.rewards, ends_mask, float(discount))


class WindowDataset(Dataset):
    """Torch dataset of fixed-length windows; see the module docstring for item shapes."""

    def __init__(
        self,
        episodes: Episodes,
        horizon: int,
        obs_history: int = 1,
        keys: Sequence[str] = ("observations", "actions"),
        pad: str = "edge",
        allow_partial: bool = True,
        normalizers: Any = None,
        stride: int = 1,
        discount: float | None = None,
    ) -> None:
        if pad not in ("edge", "zero"):
            raise ValueError(f"pad must be 'edge' or 'zero', got pad={pad!r}")
        if obs_history < 1:
            raise ValueError(f"obs_history must be >= 1, got obs_history={obs_history}")
        keys = tuple(keys)
        if not keys:
            raise ValueError("keys must name at least one field")
        self.episodes = episodes
        self.horizon = int(horizon)
        self.obs_history = int(obs_history)
        self.keys = keys
        self.pad = pad
        self.indices = window_indices(episodes, horizon, allow_partial, stride)
        if len(self.indices) == 0:
            raise ValueError(
                f"no windows: every episode is shorter than horizon={horizon} "
                f"(longest has {int(episodes.lengths().max())} steps) and allow_partial=False"
            )

        parts, self.key_slices, col = [], {}, 0
        for k in keys:
            if k not in _FIELDS:
                raise ValueError(f"unknown window key {k!r}; choose from {_FIELDS}")
            arr = getattr(episodes, k)
            if arr is None:
                raise ValueError(f"window key {k!r} is not present in this dataset")
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 1:
                arr = arr[:, None]
            if normalizers is not None and k in normalizers:
                arr = np.asarray(normalizers.normalize(k, arr), dtype=np.float32)
            parts.append(arr)
            self.key_slices[k] = slice(col, col + arr.shape[1])
            col += arr.shape[1]
        self.dim = col
        self._data = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=1)))
        obs = episodes.observations
        if normalizers is not None and "observations" in normalizers:
            obs = np.asarray(normalizers.normalize("observations", obs), dtype=np.float32)
        self._obs = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
        self._rtg = None
        if discount is not None:
            rtg = episode_return_to_go(episodes, discount)
            self._rtg = torch.from_numpy(rtg.astype(np.float32))

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, idx: Any) -> dict[str, torch.Tensor]:
        """Windows ``idx`` (ints, array or tensor of shape (B,)) as a dict of (B, ...)."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64)).reshape(-1)
        rows = torch.from_numpy(self.indices)[idx]  # (B, 4)
        start, ep, ep_s, ep_e = rows.unbind(1)
        pos = start[:, None] + torch.arange(self.horizon)  # (B, H)
        real = pos < ep_e[:, None]
        src = torch.minimum(pos, ep_e[:, None] - 1)
        x = self._data[src]  # (B, H, D)
        if self.pad == "zero":
            x = x * real[..., None].to(x.dtype)
        hpos = start[:, None] + torch.arange(-(self.obs_history - 1), 1)  # (B, K)
        hreal = hpos >= ep_s[:, None]
        hist = self._obs[torch.maximum(hpos, ep_s[:, None])]
        out = {
            "x": x,
            "mask": real,
            "obs_history": hist,
            "history_mask": hreal,
            "index": start,
            "episode": ep,
        }
        for k, sl in self.key_slices.items():
            out[k] = x[..., sl]
        if self._rtg is not None:
            out["returns"] = self._rtg[start][:, None]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"window index {i} out of range for {len(self)} windows")
        batch = self.get_batch([int(i) % len(self)])
        return {k: v[0] for k, v in batch.items()}

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """A batch of ``batch_size`` windows drawn uniformly with replacement."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        return self.get_batch(idx.numpy())


def make_windows(
    episodes: Episodes,
    horizon: int,
    obs_history: int = 1,
    keys: Sequence[str] = ("observations", "actions"),
    pad: str = "edge",
    allow_partial: bool = True,
    normalizers: Any = None,
    stride: int = 1,
    discount: float | None = None,
) -> WindowDataset:
    """Cut ``episodes`` into windows of length ``horizon``; see :class:`WindowDataset`."""
    return WindowDataset(
        episodes,
        horizon,
        obs_history=obs_history,
        keys=keys,
        pad=pad,
        allow_partial=allow_partial,
        normalizers=normalizers,
        stride=stride,
        discount=discount,
    )
