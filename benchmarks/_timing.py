"""Timing helper shared by the benchmark scripts (device-synchronised medians)."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
