"""Timing helpers for the benchmarks: device synchronisation and best-of-``repeat`` timing.

Benchmarks time whole blocks of work; the device is synchronised around a block, never inside
the library's hot paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["best_of", "synchronize"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], repeat: int = 3,
            device: torch.device | str = "cpu") -> float:
    """The shortest wall time of ``repeat`` calls of ``fn`` in seconds, after one untimed
    warm-up call, with ``device`` synchronised around each timed call."""
    if repeat < 1:
        raise ValueError(f"best_of: repeat must be >= 1, got {repeat}")
    fn()
    best = float("inf")
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best
