"""Shared timing loop of the benchmarks."""
from __future__ import annotations

import time
from typing import Callable

import torch


def time_steps(step: Callable[[], None], device: torch.device, warmup: int,
               iterations: int) -> tuple[float, float | None]:
    """Seconds for ``iterations`` calls of ``step`` after ``warmup`` calls, and the
    peak CUDA memory in MiB (None on CPU)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
    return elapsed, peak
