"""Sample-based distances between distributions."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["energy_distance", "gaussian_moment_match"]


def energy_distance(x, y, max_points: int = 4000, seed: int = 0) -> float:
    """Energy distance ``2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖`` between two sample sets ``(N, D)``.

    Zero iff the distributions are equal. Sets larger than ``max_points`` are subsampled
    (deterministically by ``seed``) to bound the O(N²) cost.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(len(x), -1)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64).reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has {x.shape[1]}, y has {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"need at least 2 samples in each set, got {len(x)} and {len(y)}")
    g = torch.Generator().manual_seed(seed)
    if len(x) > max_points:
        x = x[torch.randperm(len(x), generator=g)[:max_points]]
    if len(y) > max_points:
        y = y[torch.randperm(len(y), generator=g)[:max_points]]
    xy = torch.cdist(x, y).mean()
    n, m = len(x), len(y)
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def gaussian_moment_match(data, n: int, seed: int = 0) -> np.ndarray:
    """``n`` samples of the Gaussian with the mean and covariance of ``data`` ``(N, D)``."""
    data = np.asarray(data, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(data.mean(0), np.cov(data, rowvar=False), size=n)
