"""Overlap or not, and with how many chunks: a decision per shape, with its reasons.

Why a plan at all: every published overlap (PyTorch async TP, Flux, Triton-distributed,
Kraken) loses to plain GEMM + NCCL at small M, where each chunk's fixed costs (a
collective's latency, a smaller GEMM's lower efficiency) outweigh the hidden transfer;
and where the GEMM dwarfs the collective (FC2 on two GPUs) there is little to hide.
The plan simulates both schedules with the calibrated constants of
:mod:`commflow.overlap.calibration` and picks overlap only when it is predicted to be
``margin`` (5%) faster, so model error falls on the side of the plain path.

The limit it works against (overlap_anchors.md §4): with ``t_seq = t_gemm + t_comm``
the best overlapped time is ``max(t_gemm, t_comm) + min(t_gemm, t_comm) / n_chunks``
(pipeline fill and drain), so the speed-up is at most
``(t_gemm + t_comm) / max(t_gemm, t_comm) <= 2``; for a row-parallel GEMM the ratio
``t_rs / t_gemm = (R-1)·b·F / (2·K·B)`` does not depend on M or N.

Two transports for the overlapped schedule (``transport``):

* ``"symm"`` (CUDA with ``reduction="fp32"``, the default there): copy-engine transfers
  over symmetric memory (:mod:`commflow.overlap.symm`). Chunks are groups of rows
  within every destination block (``chunk_sizes`` sum to M/R); the GEMM keeps all
  its SMs and the reduction is one fp32 pass per group. Modelled with the calibration's
  copy-engine rate, barrier cost and ``copy_slowdown``.
* ``"nccl"`` (CPU/gloo, or ``reduction="backend"``): one NCCL/gloo collective per chunk
  on a side stream (:mod:`commflow.overlap.ops`), modelled with the collectives' fits
  and the contention factors.

On CUDA the ``auto`` decision is then checked against the clock once per shape
(:mod:`commflow.overlap.autotune`); the model only spares the measurement where overlap
is clearly hopeless.

Dimensions, per op (M = rows = all leading dims flattened, K = the local reduction dim):

* ``matmul_reduce_scatter``: ``x [M, K]`` (before the scatter), ``w [K, N]``.
* ``matmul_all_reduce``: ``x [M, K]``, ``w [K, N]``.
* ``all_gather_matmul``: ``x`` after the gather ``[M, K]`` (``M = R x`` shard rows),
  ``w [K, N]`` (N local).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .calibration import Calibration, default_calibration
from .symm import accumulates

__all__ = ["OPS", "OverlapPlan", "plan"]

OPS = ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce")
CANDIDATE_CHUNKS = (2, 3, 4, 6, 8)
DEFAULT_MARGIN = 0.05


@dataclass(kw_only=True, frozen=True)
class OverlapPlan:
    """What an op will do for one shape, and why."""

    op: str
    """``matmul_reduce_scatter``, ``all_gather_matmul`` or ``matmul_all_reduce``."""
    m: int
    """Rows (global, all leading dims flattened)."""
    n: int
    """Columns of ``w`` (local for all_gather_matmul)."""
    k: int
    """Local reduction dim (``x.shape[-1]``)."""
    world_size: int
    dtype: str
    reduction: str
    """``fp32``: all-to-all of partials + local sum in fp32, rounded once; ``backend``:
    the backend's reduce-scatter / all-reduce on each chunk (NCCL rounds at every hop)."""
    decision: Literal["overlap", "sequential"]
    n_chunks: int
    """Chunks of the overlapped schedule (1 when sequential)."""
    chunk_sizes: tuple[int, ...] = ()
    """Size of each chunk along the split dim (columns of ``w`` for matmul_reduce_scatter,
    rows for matmul_all_reduce, rows of the local shard for all_gather_matmul); empty when
    sequential. Uneven on purpose where it pays: small first chunks start the transfer early
    when communication dominates, small last chunks shorten the drain when the GEMM does."""
    t_gemm_ms: float
    """Predicted time of the whole GEMM alone."""
    t_comm_ms: float
    """Predicted time of the plain collective alone."""
    t_sequential_ms: float
    """Predicted GEMM then collective."""
    t_overlap_ms: float | None
    """Predicted overlapped time at ``n_chunks`` (the best candidate when sequential wins; None if none fits)."""
    candidates: dict[int, float] = field(default_factory=dict)
    """Predicted overlapped ms for each chunk count considered."""
    predicted_speedup: float
    """``t_sequential_ms / time of the chosen path``."""
    reason: str
    """One sentence a person can check."""
    calibration: str
    """Source of the constants used."""
    transport: str = "nccl"
    """``symm`` (copy engine over symmetric memory) or ``nccl`` (a collective per chunk)."""
    best_split: tuple[int, ...] = ()
    """Chunk sizes of the best overlapped candidate, whatever the decision (empty if none fits)."""
    measured_sequential_ms: float | None = None
    """Set when the decision was checked against the clock (see autotune.py)."""
    measured_overlap_ms: float | None = None
    graphed: bool = False
    """The copy-engine schedule replays as a CUDA graph (:mod:`commflow.overlap.graphs`):
    chosen only by the autotune, where graphs are enabled and measured faster."""
    eager_fallback: Literal["overlap", "sequential"] = "overlap"
    """What a graphed plan runs where its graphs cannot be kept (graphs.py's thrash guard: more
    layers of one shape than the cache holds): the same schedule without a graph, or the plain
    path. The autotune sets it from the times it measured for both."""
    t_overlap_device_ms: float | None = None
    """``symm``: the fastest candidate's schedule on the device alone, without the host's
    launch bound: what a CUDA graph replay of it could reach, by the model (reported; on
    4 H100 it ran above the measured replay on 57 of 60 shapes, up to 5.6x, so the
    autotune no longer gates on it)."""

    @property
    def overlap(self) -> bool:
        return self.decision == "overlap"

    @property
    def limit_speedup(self) -> float:
        """``(t_gemm + t_comm) / max(t_gemm, t_comm)``: what perfect overlap would give."""
        return (self.t_gemm_ms + self.t_comm_ms) / max(self.t_gemm_ms, self.t_comm_ms)

    def explain(self) -> str:
        lines = [
            f"{self.op} M={self.m} N={self.n} K={self.k} on {self.world_size} ranks ({self.dtype}, "
            f"reduction={self.reduction}, transport={self.transport})",
            f"  decision: {self.decision}"
            + (f" with {self.n_chunks} chunks of {list(self.chunk_sizes)}" if self.overlap else "")
            + (f" (CUDA graph; without it: {self.eager_fallback})" if self.graphed else ""),
            f"  predicted: gemm {self.t_gemm_ms:.3f} ms, comm {self.t_comm_ms:.3f} ms, "
            f"sequential {self.t_sequential_ms:.3f} ms"
            + (f", overlapped {self.t_overlap_ms:.3f} ms" if self.t_overlap_ms is not None else ""),
            "  candidates: " + ", ".join(f"{c} chunks {t:.3f} ms" for c, t in self.candidates.items()),
            f"  limit of perfect overlap: {self.limit_speedup:.2f}x; predicted speed-up {self.predicted_speedup:.2f}x",
            f"  reason: {self.reason}",
        ]
        if self.measured_sequential_ms is not None:
            lines.append(f"  measured: sequential {self.measured_sequential_ms:.3f} ms, "
                         f"overlapped {self.measured_overlap_ms:.3f} ms")
        lines.append(f"  constants: {self.calibration}")
        return "\n".join(lines)


# --- the schedules, simulated ----------------------------------------------------------


def _split_sizes(total: int, parts: int, unit: int = 1) -> list[int]:
    """Balanced split of ``total`` into ``parts`` sizes that are multiples of ``unit``
    (the last part takes any remainder)."""
    units, rest = divmod(total, unit)
    base, extra = divmod(units, parts)
    sizes = [(base + (1 if i < extra else 0)) * unit for i in range(parts)]
    sizes[-1] += rest
    return sizes


def _geometric_sizes(total: int, parts: int, ratio: float, unit: int = 1) -> list[int]:
    """Sizes growing (ratio > 1) or shrinking (ratio < 1) geometrically, multiples of
    ``unit``, each at least one unit, summing to ``total``."""
    units, rest = divmod(total, unit)
    weights = [ratio**i for i in range(parts)]
    scale = units / sum(weights)
    sizes = [max(1, int(round(wt * scale))) for wt in weights]
    drift = units - sum(sizes)
    order = sorted(range(parts), key=lambda i: -weights[i])  # fix rounding on the largest chunks
    i = 0
    while drift:
        j = order[i % parts]
        step = 1 if drift > 0 else -1
        if sizes[j] + step >= 1:
            sizes[j] += step
            drift -= step
        i += 1
    sizes = [sz * unit for sz in sizes]
    sizes[-1] += rest
    return sizes


def _candidate_splits(total: int, parts: int, unit: int, ratio: float) -> list[tuple[int, ...]]:
    """Uniform, and geometric both ways with the comm/gemm ratio (clamped to [1.25, 2])."""
    q = min(2.0, max(1.25, max(ratio, 1.0 / max(ratio, 1e-9))))
    splits = {tuple(_split_sizes(total, parts, unit))}
    if total // unit >= 2 * parts:  # room for uneven chunks
        splits.add(tuple(_geometric_sizes(total, parts, q, unit)))
        splits.add(tuple(_geometric_sizes(total, parts, 1.0 / q, unit)))
    return sorted(splits)


def _max_chunks(op: str, m: int, n: int, world: int, reduction: str) -> int:
    if op == "matmul_reduce_scatter":
        return n  # column chunks
    if op == "matmul_all_reduce":
        return m // world if reduction == "fp32" else m  # row chunks (multiples of R for the all-to-all)
    return m // world  # rows of the local shard


def _sequential_us(cal: Calibration, op: str, m: int, n: int, k: int, b: int) -> tuple[float, float]:
    """(gemm, comm) of the plain path."""
    if op == "matmul_reduce_scatter":
        return cal.gemm_us(m, n, k), cal.comm_us("reduce_scatter", m * n * b)
    if op == "matmul_all_reduce":
        return cal.gemm_us(m, n, k), cal.comm_us("all_reduce", m * n * b)
    return cal.gemm_us(m, n, k), cal.comm_us("all_gather", m * k * b)


def _produce_then_communicate_us(cal: Calibration, gemm: list[float], comm: list[float]) -> float:
    """GEMM chunks back to back on one stream; chunk c's chain starts when both its GEMM
    and chain c-1 are done. GEMMs that run beside a chain, and chains beside a GEMM,
    pay the calibrated contention factors."""
    main_t, side_t = 0.0, 0.0
    n = len(gemm)
    for c in range(n):
        busy_side = side_t > main_t  # a chain is still running while this GEMM starts
        main_t += gemm[c] * (cal.gemm_slowdown if busy_side else 1.0) + cal.chunk_overhead_us
        start = max(main_t, side_t)
        beside_gemm = c < n - 1  # the next GEMM runs while this chain does
        side_t = start + comm[c] * (cal.comm_slowdown if beside_gemm else 1.0)
    return max(main_t, side_t)


def _split_unit(op: str, total: int, parts: int, world: int, reduction: str) -> int:
    """Chunk sizes are multiples of this: the world size where the all-to-all splits rows
    by destination, and 128 (a GEMM tile, aligned rows/columns) where the shape allows."""
    base = world if op == "matmul_all_reduce" and reduction == "fp32" else 1
    aligned = math.lcm(base, 128)
    return aligned if total // aligned >= parts else base


def _split_total(op: str, m: int, n: int, world: int) -> int:
    return {"matmul_reduce_scatter": n, "matmul_all_reduce": m, "all_gather_matmul": m // world}[op]


def _overlap_us(cal: Calibration, op: str, m: int, n: int, k: int, b: int, sizes: tuple[int, ...],
                reduction: str) -> float:
    r = cal.world_size
    if op == "matmul_reduce_scatter":
        cols = sizes
        gemm = [cal.gemm_us(m, nc, k) for nc in cols]
        if reduction == "fp32":  # all-to-all of partials, then sum of R partials into the output
            comm = [cal.comm_us("all_to_all", m * nc * b) + cal.memory_us((r + 1) * (m // r) * nc * b) for nc in cols]
        else:  # reduce-scatter into a temporary, copied into the output's column block
            comm = [cal.comm_us("reduce_scatter", m * nc * b) + cal.memory_us(2 * (m // r) * nc * b) for nc in cols]
        return _produce_then_communicate_us(cal, gemm, comm)
    if op == "matmul_all_reduce":
        rows = sizes
        gemm = [cal.gemm_us(mc, n, k) for mc in rows]
        if reduction == "fp32":  # all-to-all, sum, all-gather back in place
            comm = [cal.comm_us("all_to_all", mc * n * b) + cal.memory_us((r + 1) * (mc // r) * n * b)
                    + cal.comm_us("all_gather", mc * n * b) for mc in rows]
        else:
            comm = [cal.comm_us("all_reduce", mc * n * b) for mc in rows]
        return _produce_then_communicate_us(cal, gemm, comm)
    # all_gather_matmul: every chunk's gather issued up front; the local shard's GEMM
    # needs no communication and runs first; chunk c's GEMMs (one per peer) wait for it.
    shard = m // r
    rows = sizes
    side_t, landed = 0.0, []
    for c, mc in enumerate(rows):
        side_t += cal.comm_us("all_gather", r * mc * k * b) * (cal.comm_slowdown if c < len(rows) - 1 else 1.0)
        landed.append(side_t)
    main_t = cal.gemm_us(shard, n, k) * cal.gemm_slowdown + cal.chunk_overhead_us
    for c, mc in enumerate(rows):
        beside = landed[-1] > main_t
        main_t = max(main_t, landed[c])
        main_t += (r - 1) * cal.gemm_us(mc, n, k) * (cal.gemm_slowdown if beside else 1.0) + cal.chunk_overhead_us
    return main_t


def _symm_us(cal: Calibration, op: str, groups: int, gpu_us: float) -> float:
    """A copy-engine schedule of symm.py with ``groups`` row groups whose device time is
    ``gpu_us`` (:func:`_symm_gpu_us`): no faster than the host launches its operations."""
    return max(gpu_us, symm_launches(op, cal.world_size, groups) * cal.launch_us)


def symm_launches(op: str, world_size: int, groups: int) -> int:
    """GPU operations one copy-engine schedule call launches from the host (the unit of
    ``Calibration.launch_us``)."""
    r = world_size
    if op == "all_gather_matmul":  # copy-in, barrier, per piece a pull, event, wait, GEMM
        return 6 + 4 * (r - 1) * groups
    if accumulates(r, groups):  # per group: GEMM, wait, barrier, pull, event; wait, addmm; AR: wait, barrier, 2 pulls
        return 4 + groups * (7 + (4 if op == "matmul_all_reduce" else 0))
    # per group: a GEMM, a wait and a push per peer, own GEMM, wait, barrier, sum, event
    return 4 + groups * (3 * (r - 1) + 4 + (r + 1 if op == "matmul_all_reduce" else 0))


def _symm_gpu_us(cal: Calibration, op: str, m: int, n: int, k: int, b: int, sizes: tuple[int, ...]) -> float:
    """The copy-engine schedules of symm.py on the device, simulated: GEMMs back to back
    on the caller's stream, transfers / barriers / reductions in order on the
    communication stream, each starting when both its input and the stream are ready.
    ``sizes`` are rows per destination (or per pulled piece of a shard) of each group."""
    r = cal.world_size

    def copy(nbytes: float) -> float:
        return cal.copy_latency_us + nbytes / (cal.copy_gbps * 1e3)

    if op == "all_gather_matmul":
        shard = m // r
        side = cal.memory_us(2 * shard * k * b) + cal.barrier_us
        landed = []
        for _ in range(r - 1):
            for rows in sizes:
                side += copy(rows * k * b)
                landed.append((side, rows))
        main = cal.gemm_us(shard, n, k) * cal.copy_slowdown
        for t, rows in landed:
            beside = landed[-1][0] > main
            main = max(main, t) + cal.gemm_us(rows, n, k) * (cal.copy_slowdown if beside else 1.0)
        return main
    main = side = pull = 0.0  # the caller's stream, the push stream, the all-reduce's pull stream
    if accumulates(r, len(sizes)):  # two ranks: the peer's rows first, then the own rows onto the pulled partials
        landed = []
        for rows in sizes:
            main += cal.gemm_us(rows, n, k) * (cal.copy_slowdown if side > main else 1.0)
            side = max(side, main) + cal.barrier_us + copy(rows * n * b)
            landed.append(side)
        for rows, t in zip(sizes, landed):
            busy = max(side, pull) > max(main, t)
            main = max(main, t) + cal.gemm_us(rows, n, k) * (cal.copy_slowdown if busy else 1.0)
            if op == "matmul_all_reduce":  # the peer's reduced rows pulled, the own ones copied
                pull = max(pull, main) + cal.barrier_us + copy(rows * n * b) + cal.memory_us(2 * rows * n * b)
        return max(main, pull)
    for rows in sizes:
        for _ in range(r - 1):
            main += cal.gemm_us(rows, n, k) * (cal.copy_slowdown if max(side, pull) > main else 1.0)
            side = max(side, main) + copy(rows * n * b)
        main += cal.gemm_us(rows, n, k) * (cal.copy_slowdown if max(side, pull) > main else 1.0)
        side = max(side, main) + cal.barrier_us + cal.memory_us((r + 1) * rows * n * b)
        if op == "matmul_all_reduce":  # all-gather of the reduced block: pulls from every peer
            pull = max(pull, side) + cal.barrier_us + (r - 1) * copy(rows * n * b) + cal.memory_us(2 * rows * n * b)
    return max(main, side, pull)


SYMM_CHUNKS = (1, 2, 3, 4)
"""Row groups tried by the copy-engine schedules (one group already overlaps: R steps)."""


# --- the decision ----------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def plan(
    op: str,
    m: int,
    n: int,
    k: int,
    *,
    world_size: int,
    dtype: torch.dtype | str = torch.bfloat16,
    calibration: Calibration | None = None,
    mode: str = "auto",
    n_chunks: int | None = None,
    reduction: str = "fp32",
    margin: float = DEFAULT_MARGIN,
    transport: str | None = None,
) -> OverlapPlan:
    """Decide overlap vs. plain GEMM + collective for one shape; see the module doc for M, N, K.

    ``mode="auto"`` picks the faster predicted path (overlap only if ``margin`` faster),
    ``"overlap"`` forces the overlapped schedule (the best chunk count unless
    ``n_chunks`` is given), ``"sequential"`` forces the plain path. Without
    ``calibration`` the built-in CUDA (H100) constants are used. Deterministic: every
    rank with the same calibration reaches the same decision. ``transport``: ``"symm"``
    or ``"nccl"`` (see the module doc); default ``"symm"`` for a CUDA calibration with
    ``reduction="fp32"``, else ``"nccl"``.
    """
    if op not in OPS:
        raise ValueError(f"op: got {op!r}; the rule is one of {OPS}")
    for name, v in (("m", m), ("n", n), ("k", k), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: got {v!r}; the rule is an int >= 1")
    cal = calibration or default_calibration("cuda", world_size)
    if cal.world_size != world_size:
        raise ValueError(
            f"calibration: measured on {cal.world_size} ranks but world_size={world_size}; "
            "the rule is a calibration of the same group size"
        )
    from .validate import check_mode

    check_mode(mode, reduction, n_chunks)
    if transport is None:
        transport = "symm" if cal.device != "cpu" and reduction == "fp32" else "nccl"
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: got {transport!r}; the rule is one of {TRANSPORTS}")
    if transport == "symm" and reduction != "fp32":
        raise ValueError(f"transport: 'symm' always reduces in fp32; got reduction={reduction!r}, the rule is "
                         "reduction='fp32' with transport='symm'")
    key = (op, m, n, k, world_size, _dtype_name(dtype), cal.fingerprint(), cal.source, mode, n_chunks, reduction,
           margin, transport)
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) > 4096:  # shapes seen by one job are few; this only bounds a sweep
            _CACHE.clear()
        hit = _CACHE[key] = _decide(op, m, n, k, world_size, _dtype_name(dtype), cal, mode, n_chunks, reduction,
                                    margin, transport)
    return hit


TRANSPORTS = ("symm", "nccl")


_CACHE: dict[tuple, OverlapPlan] = {}


def _decide(op, m, n, k, world, dtype_name, cal, mode, n_chunks, reduction, margin, transport) -> OverlapPlan:
    b = getattr(torch, dtype_name).itemsize
    t_gemm, t_comm = _sequential_us(cal, op, m, n, k, b)
    t_seq = t_gemm + t_comm
    symm = transport == "symm"
    limit = max(0, m // world if symm else _max_chunks(op, m, n, world, reduction))
    common = {"op": op, "m": m, "n": n, "k": k, "world_size": world, "dtype": dtype_name, "reduction": reduction,
              "t_gemm_ms": t_gemm / 1e3, "t_comm_ms": t_comm / 1e3, "t_sequential_ms": t_seq / 1e3,
              "calibration": cal.source, "transport": transport}

    def sequential(reason: str, candidates=None, best=None, best_split=()) -> OverlapPlan:
        return OverlapPlan(decision="sequential", n_chunks=1, t_overlap_ms=best, candidates=candidates or {},
                           predicted_speedup=1.0, reason=reason, best_split=best_split, **common)

    if world == 1:
        return sequential("a world of one has nothing to communicate: plain matmul")
    if mode == "sequential":
        return sequential("forced by mode='sequential'")
    if (symm or (op == "matmul_all_reduce" and reduction == "fp32")) and m % world:
        why = (f"M={m} is not divisible by world_size={world}, which the fp32 reduction over "
               f"{'symmetric memory' if symm else 'an all-to-all'} needs (reduction='backend' has no such rule)")
        if mode == "overlap":
            raise ValueError(f"x: {why}")
        return sequential(why)
    if n_chunks is not None:
        if n_chunks > limit:
            raise ValueError(f"n_chunks: got {n_chunks} but this shape has at most {limit} chunks "
                             f"({op}, M={m}, N={n}, world_size={world}); the rule is n_chunks <= {limit}")
        counts = (n_chunks,)
    else:
        counts = tuple(c for c in (SYMM_CHUNKS if symm else CANDIDATE_CHUNKS) if c <= limit)
    candidates: dict[int, float] = {}
    splits: dict[int, tuple[int, ...]] = {}
    if symm:  # groups of rows per destination block, as even as 64-row tiles allow
        total = m // world
        for c in counts:
            unit = 64 if total // 64 >= c else 1
            sizes = tuple(_split_sizes(total, c, unit))
            device_us = _symm_gpu_us(cal, op, m, n, k, b, sizes)
            candidates[c], splits[c] = _symm_us(cal, op, len(sizes), device_us) / 1e3, sizes
            device = device_us / 1e3
            common["t_overlap_device_ms"] = min(common.get("t_overlap_device_ms", device), device)
    else:
        total = _split_total(op, m, n, world)
        for c in counts:
            unit = _split_unit(op, total, c, world, reduction)
            for sizes in _candidate_splits(total, c, unit, t_comm / t_gemm):
                t = _overlap_us(cal, op, m, n, k, b, sizes, reduction) / 1e3
                if c not in candidates or t < candidates[c]:
                    candidates[c], splits[c] = t, sizes
    if not candidates:
        if mode == "overlap":
            raise ValueError(f"x: shape M={m}, N={n} is too small to split into 2 chunks for {op}")
        return sequential(f"too small to split into 2 chunks (at most {limit})")
    best_c = min(candidates, key=lambda c: (candidates[c], c))
    best = candidates[best_c]
    speedup = (t_seq / 1e3) / best
    ratio = t_comm / t_gemm
    if mode == "overlap":
        return OverlapPlan(decision="overlap", n_chunks=best_c, chunk_sizes=splits[best_c], t_overlap_ms=best,
                           candidates=candidates, predicted_speedup=speedup, reason="forced by mode='overlap'",
                           best_split=splits[best_c], **common)
    if best <= (t_seq / 1e3) * (1.0 - margin):
        reason = (f"overlap with {best_c} chunks is predicted {speedup:.2f}x faster than sequential "
                  f"(comm/gemm = {ratio:.2f}, perfect overlap would give {(t_gemm + t_comm) / max(t_gemm, t_comm):.2f}x)")
        return OverlapPlan(decision="overlap", n_chunks=best_c, chunk_sizes=splits[best_c], t_overlap_ms=best,
                           candidates=candidates, predicted_speedup=speedup, reason=reason,
                           best_split=splits[best_c], **common)
    chunk_latency = (cal.copy_latency_us + cal.barrier_us if symm
                     else cal.comm[_chunk_kind(op, reduction)].latency_us)
    if ratio < 0.1:
        why = f"compute-bound: comm/gemm = {ratio:.2f} leaves little to hide"
    elif t_seq < 200 or best_c * chunk_latency > 0.2 * t_comm:
        why = "small shape: per-chunk latencies eat the hidden transfer"
    else:
        why = "contention and pipeline fill outweigh the hidden transfer"
    return sequential(
        f"{why}; best overlap ({best_c} chunks, {best:.3f} ms) is not {margin:.0%} below sequential "
        f"({t_seq / 1e3:.3f} ms)", candidates, best, splits[best_c])


def _chunk_kind(op: str, reduction: str) -> str:
    if op == "all_gather_matmul":
        return "all_gather"
    if reduction == "fp32":
        return "all_to_all"
    return "reduce_scatter" if op == "matmul_reduce_scatter" else "all_reduce"
