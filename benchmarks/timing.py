"""Timing and memory helpers shared by the benchmarks.

GPU work is asynchronous: times come from CUDA events around the region after a
warm-up, the median over repeats. On CPU, wall clock around the call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10, device: torch.device | None = None,
            barrier: bool = False) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn()`` over ``iters`` runs after ``warmup``.

    ``barrier=True`` lines the ranks up before every run, so each timed region
    starts together and a collective's time is not a peer's lateness.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if barrier and dist.is_initialized():
            dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def max_over_ranks(value: float) -> float:
    """The slowest rank's number: a collective step is as slow as its slowest member."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def peak_memory_gib(device: torch.device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
