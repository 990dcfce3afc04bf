"""Check the plan against the clock, once per shape.

The plan's model is only as good as its constants, and the one it guesses hardest is
how much a GEMM and a collective slow each other down when they share the GPU. Where
the model says "overlap" (or comes close), ``mode="auto"`` on CUDA times both paths
on the first call with a new shape (samples of four calls, CUDA events, the slowest rank's
time, agreed over the group so every rank takes the same path) and keeps the overlap
only if it measured at least ``MEASURED_MARGIN`` faster. That check, not the model,
is what keeps the automatic path from losing to the plain one. Decisions are cached
per shape, so a training step pays it once; warm up before capturing CUDA graphs.

On by default on CUDA; off on CPU (gloo timings on a shared box are noise, and tests
want model decisions). ``set_autotune(True/False)`` or ``COMMFLOW_OVERLAP_AUTOTUNE=0/1``
overrides.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from .plan import OverlapPlan
from .validate import GroupInfo

__all__ = ["MEASURED_MARGIN", "NOISE_US", "autotune_enabled", "keep_margin", "measured_choice", "measured_choices",
           "rounds_for", "sample_ms", "set_autotune"]

MEASURED_MARGIN = 0.03
"""Overlap must measure this much faster than the plain path to be kept..."""
NOISE_US = 10.0
"""...and at least this much in absolute time: at 0.1-0.15 ms a graph replay and the plain
path traded places by ~10 us between the first call's check and a benchmark minutes later
on 2 H100 (docs/overlap.md, run 7), so a 3 % win there is not a win."""


def keep_margin(t_sequential_ms: float) -> float:
    """The fraction by which overlap must beat the plain path measured at ``t_sequential_ms``."""
    return max(MEASURED_MARGIN, NOISE_US / 1e3 / max(t_sequential_ms, 1e-6))


WORTH_MEASURING = 0.8
"""Without CUDA graphs, measure only where the model predicts at least this speed-up (close
calls included: the copy-engine model is coarse, the clock is not). With graphs every shape
that splits is measured: the device-time model's floor (barrier and copy latencies, which
the calibration measures from the host) overestimated graph replays on 57 of 60 shapes on
4 H100, by more than 1.5x on 47 and up to 5.6x on small ones (0.56 ms predicted, 0.16 ms
measured for GEMM + reduce-scatter at Llama-70B attention-out M=128), and a 0.8 gate
there turned away shapes whose replay beat the plain path by 5-25 % (docs/overlap.md,
run 10). The check costs about 0.1-0.2 s once per shape (small shapes
get the most rounds)."""

_OVERRIDE: bool | None = None
_CHOICES: dict[tuple, OverlapPlan] = {}


def set_autotune(enabled: bool | None) -> None:
    """Force measuring on (True) or off (False); None restores the default."""
    global _OVERRIDE
    from .functional import clear_caches

    clear_caches()
    _OVERRIDE = enabled


def autotune_enabled(device: torch.device) -> bool:
    if _OVERRIDE is not None:
        return _OVERRIDE
    env = os.environ.get("COMMFLOW_OVERLAP_AUTOTUNE")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return device.type == "cuda"


def rounds_for(predicted_ms: float, reps: int = 4, budget_ms: float = 15.0) -> int:
    """Timing rounds for a shape: 5 where one sample (``reps`` calls) is long, up to 25 for
    the 0.1-0.2 ms shapes of the small-M guard, whose samples spread by 5-10 % on a
    host-bound machine (docs/overlap.md, run 5): about ``budget_ms`` of each path is timed."""
    return max(5, min(25, int(budget_ms / max(predicted_ms * reps, 1e-3))))


def sample_ms(fns: list[Callable[[], object]], *, iters: int, calls: int, device: torch.device, group=None,
              min_time_ms: float = 0.0, max_rounds: int | None = None) -> list[tuple[float, float]]:
    """(median ms per call, median host us per call) of each fn, measured in alternation:
    the one protocol of the autotune and the overlap benchmark, so both time a path alike.

    At least ``iters`` rounds; then more while any fn has gathered less than
    ``min_time_ms`` of timed calls, up to ``max_rounds`` (default ``10 * iters``). The
    decision to go on is the slowest rank's (an all-reduce), so every rank runs the
    same rounds.

    Every round times every fn once, in an order shuffled per round (the same on every
    rank: seeded by the round): drift (clocks, other load) and the after-effects of the
    fn timed just before hit all of them alike (a plain path timed right after a graph
    replay ran 14-39 % slower on 2 H100 than alone,
    benchmarks/results/overlap_autotune_probe_2xH100_20261126-s7.json). One sample: the
    ranks of ``group`` line up, then ``calls`` calls back to back between two CUDA events;
    the host's launch cost is inside where the GPU would outrun it, as in a training step
    of small layers. Host us: CPU time to issue the ``calls`` calls, per call.

    The line-up is a one-element all-reduce and a device sync, not ``dist.barrier``: on 4
    H100 the plain path (mm + NCCL) of the 70B all-gather guard shapes took 0.127-0.148 ms
    per call after the barrier and 0.084-0.127 ms after this line-up, the graph replay
    about the same under both (overlap_autotune_probe_4xH100_20261127-s10.json); timed
    the barrier's way, the autotune kept graph replays that the benchmark then timed at
    0.83-0.85x of the plain path (docs/overlap.md, run 11a).
    """
    cuda = device.type == "cuda"
    flag = torch.zeros(1, device=device)
    times: list[list[float]] = [[] for _ in fns]
    host: list[list[float]] = [[] for _ in fns]
    max_rounds = max(iters, max_rounds if max_rounds is not None else 10 * iters)

    def go_on(it: int) -> bool:
        if it < iters:
            return True
        if it >= max_rounds or min_time_ms <= 0:
            return False
        short = torch.tensor([float(min(sum(t) * calls for t in times) < min_time_ms)], device=device)
        if dist.is_initialized():
            dist.all_reduce(short, op=dist.ReduceOp.MAX, group=group)
        return bool(short.item())

    it = 0
    while go_on(it):
        order = list(range(len(fns)))
        random.Random(it).shuffle(order)
        it += 1
        for i in order:
            if dist.is_initialized():
                dist.all_reduce(flag, group=group)
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[i]()
            host[i].append((time.perf_counter() - t0) * 1e6 / calls)
            if cuda:
                end.record()
                end.synchronize()
                times[i].append(start.elapsed_time(end) / calls)
            else:
                times[i].append((time.perf_counter() - t0) * 1e3 / calls)
    return [(statistics.median(t), statistics.median(h)) for t, h in zip(times, host)]


def _time_ms(fns: list[Callable[[], object]], device: torch.device, group, reps: int = 4,
             rounds: int = 5) -> list[float]:
    """Median ms per call of each ``fn`` over ``rounds`` rounds of ``reps``-call samples
    (:func:`sample_ms`, the benchmark's protocol)."""
    return [ms for ms, _ in sample_ms(fns, iters=rounds, calls=reps, device=device, group=group)]


def pick_candidate(graphed: list[bool], times_ms: list[float]) -> int:
    """Index of the candidate to keep: the fastest, except that a graphed candidate within
    ``MEASURED_MARGIN`` of a faster eager one is preferred. An eager copy-engine schedule
    is host-bound (tens of launches per call), so its time moves with the host's load; a
    graph replay is one launch. On 2 H100s an eager schedule chosen this way measured
    0.75x of sequential in the benchmark while its graph ran 1.04x (docs/overlap.md)."""
    best = min(range(len(times_ms)), key=lambda i: times_ms[i])
    if graphed[best]:
        return best
    close = [i for i in range(len(times_ms)) if graphed[i] and times_ms[i] <= times_ms[best] * (1.0 + MEASURED_MARGIN)]
    return min(close, key=lambda i: times_ms[i]) if close else best


def measured_choice(p: OverlapPlan, run: Callable[[OverlapPlan], object], g: GroupInfo,
                    device: torch.device, group_key: int) -> OverlapPlan:
    """``p`` confirmed or overturned by timing ``run(plan)`` (cached per shape).

    Timed in one alternation: the plain path, the model's split and, where that has
    several row groups, a single group (on two ranks also two groups: the accumulate
    schedule), and where CUDA graphs are enabled (graphs.py) each
    of those replayed as a graph (every group costs launches and a barrier on the
    host; on the 4xH100 host one group ran GEMM + all-reduce at 1.26x sequential where the
    model's two ran at 1.05x, benchmarks/results/overlap_probe_4xH100_20261126-s2.json).
    The fastest overlapped candidate is kept if it beats the plain path by the margin.
    """
    from .graphs import graphs_enabled

    graphs = p.transport == "symm" and graphs_enabled(device)
    if not graphs and (p.t_overlap_ms is None or p.t_sequential_ms / p.t_overlap_ms < WORTH_MEASURING):
        return p  # with graphs every shape is measured (WORTH_MEASURING says why)
    key = (group_key, p.op, p.m, p.n, p.k, p.dtype, p.reduction, p.best_split, p.calibration, graphs)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if not p.best_split:
        return p
    total = sum(p.best_split)
    splits = [tuple(p.best_split)]
    if len(p.best_split) > 1:
        splits.append((total,))
    if p.transport == "symm":
        # Two and four groups of rows are always timed too. On two ranks they take the
        # accumulate schedule (symm._pair_accumulate), whose launches the model may
        # overcharge (the launch cost is the host's, and varies; on 2 H100 four groups ran
        # GEMM + all-reduce at 1.31x where the model preferred two) and a graph replay drops.
        # On more ranks every group adds a barrier, which the calibration measures from the
        # host (39-194 us on 4 H100), so the model keeps one group there; but one group
        # leaves the fp32 sum of the slots (and, for the all-reduce, the whole all-gather
        # of the reduced block) behind the last GEMM, where more groups hide all but the
        # last group's share (run 10, every row one group: the graph replay at 1.15-1.9x
        # the larger of GEMM and collective for the reduce-scatter, 1.4-1.9x for the
        # all-reduce, at M = 2048..16384).
        for groups in (2, 4):
            if total >= groups and len(p.best_split) != groups:
                splits.append(tuple(total // groups + (1 if j < total % groups else 0) for j in range(groups)))
    candidates = [replace(p, decision="overlap", n_chunks=len(s), chunk_sizes=s) for s in splits]
    if graphs:  # the same schedules replayed as CUDA graphs (graphs.py): one launch instead of tens
        candidates += [replace(c, graphed=True) for c in candidates]
    sequential = replace(p, decision="sequential", n_chunks=1, chunk_sizes=())
    paths = [sequential, *candidates]
    with torch.no_grad():
        # Warm every path (allocator, NCCL, symmetric-memory workspace, graph capture) before
        # timing; small shapes longer (about 5 ms of each path), their first calls run slow.
        for _ in range(max(2, min(20, int(5.0 / max(p.t_sequential_ms, 1e-3))))):
            for q in paths:
                run(q)
        times = _time_ms([lambda q=q: run(q) for q in paths], device, g.group, rounds=rounds_for(p.t_sequential_ms))
    agreed = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=g.group)  # the slowest rank decides for all
    t_seq, *t_cands = agreed.tolist()
    best = pick_candidate([c.graphed for c in candidates], t_cands)
    t_ovl = t_cands[best]
    keep = t_ovl <= t_seq * (1.0 - keep_margin(t_seq))
    others = "; ".join(f"{c.n_chunks} group(s){' graphed' if c.graphed else ''} {t:.3f} ms"
                       for c, t in zip(candidates, t_cands))
    verdict = (f"measured overlap {t_ovl:.3f} ms vs sequential {t_seq:.3f} ms "
               f"({t_seq / t_ovl:.2f}x; {others}): {'overlap kept' if keep else 'plain path chosen'}; "
               f"model said: {p.reason}")
    chosen = replace(candidates[best] if keep else sequential, reason=verdict, measured_sequential_ms=t_seq,
                     measured_overlap_ms=t_ovl)
    if keep and chosen.graphed:
        # Without its graph (graphs.py evicts the graphs of a shape with more layers than it
        # holds) the schedule runs eagerly, host-bound: keep that only where it was timed faster.
        t_eager = t_cands[best - len(candidates) // 2]  # its eager twin: same split, listed first
        fallback = "overlap" if t_eager <= t_seq * (1.0 - keep_margin(t_seq)) else "sequential"
        chosen = replace(chosen, eager_fallback=fallback,
                         reason=f"{verdict}; without its graph: {fallback} ({t_eager:.3f} ms eager)")
    _CHOICES[key] = chosen
    return chosen


def measured_choices(op: str | None = None, m: int | None = None, n: int | None = None,
                     k: int | None = None) -> list[OverlapPlan]:
    """The decisions checked against the clock so far on this process (for reports)."""
    return [p for p in _CHOICES.values()
            if (op is None or p.op == op) and (m is None or p.m == m) and (n is None or p.n == n)
            and (k is None or p.k == k)]
