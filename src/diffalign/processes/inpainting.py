"""In-painting helpers: masks of known entries for conditioning and masked training."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Inpaint, _rand

__all__ = ["prefix_inpaint", "random_prefix_mask"]


def random_prefix_mask(batch: int, horizon: int, dim: int, dims: slice | list[int] | None = None,
                       max_prefix: int | None = None, min_prefix: int = 0,
                       generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
    """Random causal masks of known entries, ``(B, H, D)`` bool.

    For each sample a prefix length ``L ~ U{min_prefix..max_prefix}`` is drawn and the
    entries ``[:L, dims]`` are marked known: the model learns to in-paint the rest of the
    trajectory given its beginning (e.g. the current and past states of a Diffuser plan).
    """
    max_prefix = horizon if max_prefix is None else max_prefix
    if not 0 <= min_prefix <= max_prefix <= horizon:
        raise ValueError(f"need 0 <= min_prefix={min_prefix} <= max_prefix={max_prefix} <= "
                         f"horizon={horizon}")
    like = torch.empty(0, device=device)
    n = max_prefix - min_prefix + 1
    lengths = min_prefix + (_rand((batch,), generator, like) * n).floor().long().clamp(max=n - 1)
    pos = torch.arange(horizon, device=device)
    rows = pos[None, :] < lengths[:, None]  # (B, H)
    cols = torch.zeros(dim, dtype=torch.bool, device=device)
    cols[slice(None) if dims is None else dims] = True
    return rows[:, :, None] & cols[None, None, :]


def prefix_inpaint(values: Tensor, horizon: int, dim: int, dims: slice | list[int]) -> Inpaint:
    """Condition on the first ``P`` time steps of the chosen feature ``dims``.

    ``values``: ``(B, P, len(dims))`` known values (e.g. the current state, P = 1).
    """
    b, p = values.shape[:2]
    full = values.new_zeros(b, horizon, dim)
    full[:, :p, dims] = values
    mask = torch.zeros(1, horizon, dim, dtype=torch.bool, device=values.device)
    mask[:, :p, dims] = True
    return Inpaint(value=full, mask=mask)
