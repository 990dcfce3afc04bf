"""The machine constants behind the overlap plan, and how they are measured.

The plan (:mod:`commflow.overlap.plan`) predicts times from a handful of numbers:

* GEMM: ``t = gemm_latency_us + 2·m·n·k / gemm_tflops`` (fitted over GEMMs of the
  sizes the chunks have, skinny ones included, so small chunks pay their inefficiency);
* each collective: ``t = latency_us + bus_bytes / busbw`` with the nccl-tests bus
  factors (``(R-1)/R`` of the buffer for all-gather, reduce-scatter and all-to-all,
  ``2(R-1)/R`` for all-reduce);
* local memory-bound work (the fp32 sum of partials, copies): ``bytes / memory_gbps``;
* running side by side: a GEMM takes ``gemm_slowdown`` times longer while a collective
  runs beside it (NCCL's kernels take SMs), and a collective ``comm_slowdown`` times
  longer while a GEMM runs beside it (HBM and L2 are shared);
* ``chunk_overhead_us``: what one more chunk costs beyond its GEMM and collective
  latencies (host launches, events, stream switches).

:func:`calibrate` measures all of them on the current machine and group (every rank
calls it; times are the slowest rank's, so every rank derives the same constants and
hence the same decisions), and saves them where :func:`get_calibration` finds them.
Without a file, CUDA devices get the H100 numbers of ``measured.md`` (4x H100 80GB
HBM3, torch 2.11, NCCL 2.28, multicast off) and CPUs rough gloo numbers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "BUS_FACTOR",
    "Calibration",
    "CommCost",
    "calibrate",
    "calibration_path",
    "default_calibration",
    "get_calibration",
    "load_calibration",
    "set_calibration",
]

BUS_FACTOR = {
    "all_reduce": lambda r: 2 * (r - 1) / r,
    "all_gather": lambda r: (r - 1) / r,
    "reduce_scatter": lambda r: (r - 1) / r,
    "all_to_all": lambda r: (r - 1) / r,
}
"""Bus bytes per buffer byte (nccl-tests): the buffer is all-reduce's buffer, all-gather's
output, reduce-scatter's input and all-to-all's send buffer."""


@dataclass(kw_only=True, frozen=True)
class CommCost:
    """Latency-bandwidth model of one collective kind."""

    latency_us: float
    """Fixed cost per call (launch, handshake, pipeline fill)."""
    busbw_gbps: float
    """Bus bandwidth in GB/s (10^9 bytes) once the message is large."""

    def time_us(self, kind: str, buffer_bytes: float, world_size: int) -> float:
        bus = buffer_bytes * BUS_FACTOR[kind](world_size)
        return self.latency_us + bus / (self.busbw_gbps * 1e3)


@dataclass(kw_only=True, frozen=True)
class Calibration:
    """Constants of one machine and group size, measured by :func:`calibrate` or defaulted."""

    device: str
    """Device name (``torch.cuda.get_device_name`` or ``"cpu"``)."""
    world_size: int
    """Group size the collectives were measured on."""
    gemm_tflops: float
    """Sustained GEMM rate in the dtype measured (TFLOP/s)."""
    gemm_latency_us: float
    """Fixed cost per GEMM call."""
    comm: dict[str, CommCost]
    """Per collective kind: ``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``."""
    memory_gbps: float
    """Local memory-bound rate, bytes read + written per second (GB/s)."""
    chunk_overhead_us: float
    """Extra cost of one more chunk beyond its GEMM's and collective's own latencies."""
    gemm_slowdown: float
    """GEMM time factor while a collective runs beside it (>= 1)."""
    comm_slowdown: float
    """Collective time factor while a GEMM runs beside it (>= 1)."""
    copy_gbps: float = 300.0
    """Copy-engine transfer rate to or from one peer over symmetric memory (GB/s)."""
    copy_latency_us: float = 8.0
    """Fixed cost of one copy-engine transfer."""
    barrier_us: float = 12.0
    """One symmetric-memory barrier across the group (all ranks already there)."""
    copy_slowdown: float = 1.05
    """GEMM time factor while copy-engine transfers run beside it (HBM is shared; no SMs are)."""
    launch_us: float = 8.0
    """Host time to launch one GPU operation from Python (kernel, copy, event wait): a
    schedule of many small launches cannot run faster than the host issues them."""
    dtype: str = "bfloat16"
    """Element type the constants were measured with."""
    source: str = "defaults"
    """Where the numbers come from: a measurement (with date) or the defaults."""
    measurements: dict = field(default_factory=dict, compare=False)
    """Raw timings behind the fit (for the record; not used by the plan)."""

    def gemm_us(self, m: float, n: float, k: float) -> float:
        return self.gemm_latency_us + 2.0 * m * n * k / (self.gemm_tflops * 1e6)

    def comm_us(self, kind: str, buffer_bytes: float) -> float:
        return self.comm[kind].time_us(kind, buffer_bytes, self.world_size)

    def memory_us(self, nbytes: float) -> float:
        return nbytes / (self.memory_gbps * 1e3)

    @functools.cached_property  # computed once per (immutable) calibration: ops ask on every call
    def _fingerprint(self) -> str:
        d = asdict(self)
        d.pop("measurements", None)
        d.pop("source", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Hash of every number the plan reads: equal fingerprints give equal decisions."""
        return self._fingerprint

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        d = dict(d)
        d["comm"] = {k: CommCost(**v) for k, v in d["comm"].items()}
        return cls(**d)


def _h100(world_size: int) -> Calibration:
    # From ../shared/research/measured.md (4x H100 80GB HBM3, NVLink NV18, NCCL 2.28.9, NVLS off):
    # collectives fitted to latency + bus_bytes/busbw through the 16 MiB and 256 MiB points;
    # GEMM rate from the row-parallel GEMM times of the same page (0.19 ms at 4096x8192x2048,
    # 0.75 ms at 16384x8192x2048 -> 735 TFLOP/s + 5 us). Contention and chunk overhead are
    # guesses until `commflow overlap calibrate` measures them (NCCL takes ~16-32 of 132 SMs).
    return Calibration(
        device="NVIDIA H100 80GB HBM3",
        world_size=world_size,
        gemm_tflops=735.0,
        gemm_latency_us=5.0,
        comm={
            "all_to_all": CommCost(latency_us=31.8, busbw_gbps=295.2),
            "all_gather": CommCost(latency_us=11.5, busbw_gbps=331.2),
            "reduce_scatter": CommCost(latency_us=21.1, busbw_gbps=301.2),
            "all_reduce": CommCost(latency_us=27.1, busbw_gbps=345.9),
        },
        memory_gbps=3000.0,
        chunk_overhead_us=10.0,
        gemm_slowdown=1.15,
        comm_slowdown=1.10,
        # Host time per launch *inside* the copy-engine schedules on the 4xH100 host: a
        # call's host time over its launches, 21 us (2 GPUs) to 35 us (4 GPUs, all-reduce);
        # a bare mm launch alone is 12 us (benchmarks/results/overlap_*_20261126-s2*.json).
        launch_us=25.0,
        source="defaults: measured.md, 4x H100 (contention and chunk overhead guessed)",
    )


def _cpu(world_size: int) -> Calibration:
    # A 2-core shared x86 box, gloo over loopback, fp32 (`commflow overlap calibrate
    # --device cpu` measures the real ones); they only steer CPU runs.
    return Calibration(
        device="cpu",
        world_size=world_size,
        gemm_tflops=0.1,
        gemm_latency_us=30.0,
        comm={k: CommCost(latency_us=300.0, busbw_gbps=0.2) for k in BUS_FACTOR},
        memory_gbps=15.0,
        chunk_overhead_us=500.0,
        gemm_slowdown=2.0,
        comm_slowdown=2.0,
        dtype="float32",
        source="defaults: a 2-core CPU with gloo",
    )


def default_calibration(device_type: str, world_size: int) -> Calibration:
    """Built-in constants: H100 (measured.md) for CUDA, rough gloo numbers for CPU."""
    return _h100(world_size) if device_type == "cuda" else _cpu(world_size)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def calibration_path(device_name: str, world_size: int) -> Path:
    """Where calibrations live: ``$COMMFLOW_OVERLAP_CALIBRATION_DIR`` or ``~/.cache/commflow/overlap``."""
    root = os.environ.get("COMMFLOW_OVERLAP_CALIBRATION_DIR") or Path.home() / ".cache" / "commflow" / "overlap"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    return Path(root) / f"{slug}-w{world_size}.json"


def load_calibration(path: str | Path) -> Calibration:
    return Calibration.from_json(json.loads(Path(path).read_text()))


_ACTIVE: dict[tuple[str, int], Calibration] = {}


def set_calibration(calibration: Calibration | None, *, device_type: str = "cuda", world_size: int | None = None) -> None:
    """Make ``calibration`` the one the ops use on this process (``None`` forgets it).

    Every rank of a group must set the same one, before the ops run or all together,
    or decisions differ and the ranks hang; the ops check agreement on the first call
    with each shape (a later change on some ranks only is not caught for shapes seen).
    """
    from .functional import clear_caches

    clear_caches()  # signatures resolved with the old constants are planned again
    if calibration is None:
        for key in [k for k in _ACTIVE if k[0] == device_type and (world_size is None or k[1] == world_size)]:
            del _ACTIVE[key]
        return
    _ACTIVE[(device_type, calibration.world_size)] = calibration


def get_calibration(device: torch.device, world_size: int) -> Calibration:
    """The active calibration: set by :func:`set_calibration`, else a saved file, else defaults."""
    key = (device.type, world_size)
    if key not in _ACTIVE:
        path = calibration_path(_device_name(device), world_size)
        _ACTIVE[key] = load_calibration(path) if path.exists() else default_calibration(device.type, world_size)
    return _ACTIVE[key]


# --- measurement -----------------------------------------------------------------------


def _median_us(fn, device: torch.device, *, warmup: int, iters: int, group) -> float:
    """Median time of ``fn()`` in microseconds, ranks lined up before each run."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _max_over_ranks(values: list[float], group, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _fit_latency_rate(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """Fit ``t = a + x / r`` minimising relative error; returns (a >= 0, r > 0)."""
    x, t = np.asarray(xs, float), np.asarray(ts, float)
    wgt = 1.0 / t
    A = np.stack([np.ones_like(x), x], axis=1) * wgt[:, None]
    (a, inv_r), *_ = np.linalg.lstsq(A, t * wgt, rcond=None)
    if a < 0 or inv_r <= 0:  # noisy points: fall back to a pure rate through the origin
        a, inv_r = 0.0, float(np.sum(x * t * wgt**2) / np.sum((x * wgt) ** 2))
    return float(a), float(1.0 / inv_r)


@dataclass(kw_only=True, frozen=True)
class _Sizes:
    gemms: tuple[tuple[int, int, int], ...]
    comm_bytes: tuple[int, ...]
    memory_bytes: int
    contention_gemm: tuple[int, int, int]
    contention_bytes: int
    warmup: int
    iters: int


def _sizes(device: torch.device) -> _Sizes:
    if device.type == "cuda":
        return _Sizes(
            gemms=((1024, 4096, 1024), (2048, 8192, 2048), (4096, 2048, 4096), (8192, 4096, 1024),
                   (8192, 8192, 2048), (4096, 8192, 7168), (16384, 2048, 2048)),
            comm_bytes=(1 << 20, 4 << 20, 16 << 20, 64 << 20),
            memory_bytes=128 << 20,
            contention_gemm=(4096, 8192, 2048),
            contention_bytes=32 << 20,
            warmup=3,
            iters=10,
        )
    return _Sizes(
        gemms=((32, 64, 32), (64, 128, 64), (128, 128, 128), (128, 256, 64)),
        comm_bytes=(16 << 10, 128 << 10, 512 << 10),
        memory_bytes=2 << 20,
        contention_gemm=(128, 256, 128),
        contention_bytes=256 << 10,
        warmup=1,
        iters=5,
    )


def _contention(device, group, world, dtype, sizes: _Sizes) -> tuple[float, float, float, float]:
    """(gemm alone, comm alone, gemm beside comm, comm beside gemm) in us, for equal-length loops."""
    from .pipeline import side_stream

    m, n, k = sizes.contention_gemm
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    send = torch.randn(sizes.contention_bytes // dtype.itemsize, device=device).to(dtype)
    send = send[: send.numel() // world * world]
    recv = torch.empty_like(send)
    one_gemm = _median_us(lambda: torch.mm(a, b), device, warmup=2, iters=3, group=group)
    one_comm = _median_us(lambda: dist.all_to_all_single(recv, send, group=group), device, warmup=2, iters=3,
                          group=group)
    one_gemm, one_comm = _max_over_ranks([one_gemm, one_comm], group, device)
    span = 8 * max(one_gemm, one_comm)
    n_gemm, n_comm = max(4, round(span / one_gemm)), max(4, round(span / one_comm))
    dist.barrier(group=group)
    if device.type == "cuda":
        main, side = torch.cuda.current_stream(device), side_stream(device)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.synchronize(device)
        dist.barrier(group=group)
        side.wait_stream(main)
        ev[0].record(main)
        ev[2].record(side)
        with torch.cuda.stream(side):
            for _ in range(n_comm):
                dist.all_to_all_single(recv, send, group=group)
        for _ in range(n_gemm):
            torch.mm(a, b)
        ev[1].record(main)
        ev[3].record(side)
        main.wait_stream(side)
        torch.cuda.synchronize(device)
        gemm_beside, comm_beside = ev[0].elapsed_time(ev[1]) * 1e3, ev[2].elapsed_time(ev[3]) * 1e3
    else:
        t0 = time.perf_counter()
        works = [dist.all_to_all_single(recv, send, group=group, async_op=True) for _ in range(n_comm)]
        for _ in range(n_gemm):
            torch.mm(a, b)
        gemm_beside = (time.perf_counter() - t0) * 1e6
        for w in works:
            w.wait()
        comm_beside = (time.perf_counter() - t0) * 1e6
    gemm_beside, comm_beside = _max_over_ranks([gemm_beside, comm_beside], group, device)
    return n_gemm * one_gemm, n_comm * one_comm, gemm_beside, comm_beside


def _launch_us(device: torch.device) -> float:
    """Host microseconds per launched op (a small GEMM), queue not full."""
    a = torch.randn(64, 64, device=device)
    for _ in range(10):
        torch.mm(a, a)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(100):
        torch.mm(a, a)
    t = (time.perf_counter() - t0) * 1e4
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return t


def _schedule_launch_us(g, device: torch.device, dtype: torch.dtype, calls: int = 20) -> float:
    """Host microseconds per launch of a small copy-engine GEMM + reduce-scatter (one row
    group), i.e. the call's host time over :func:`plan.symm_launches`. Collective: every
    rank of ``g`` calls it."""
    from . import symm
    from .plan import symm_launches

    r = g.world_size
    x = torch.randn(64 * r, 64, device=device).to(dtype)
    w = torch.randn(64, 64, device=device).to(dtype)
    for _ in range(3):
        symm.matmul_reduce_scatter(x, w, g)
    torch.cuda.synchronize(device)
    dist.barrier(group=g.group)
    t0 = time.perf_counter()
    for _ in range(calls):
        symm.matmul_reduce_scatter(x, w, g)
    host_us = (time.perf_counter() - t0) * 1e6 / calls
    torch.cuda.synchronize(device)
    return host_us / symm_launches("matmul_reduce_scatter", r, 1)


def _copy_engine(cal: Calibration, g, device: torch.device, dtype: torch.dtype, kw: dict) -> Calibration:
    """Copy-engine rate and latency (every rank pulls from the next one at once, as the
    schedules do), the symmetric-memory barrier, and the host cost per launch. Kept at
    their defaults (with the reason recorded) where symmetric memory is unavailable."""
    from . import symm

    launch = _max_over_ranks([_launch_us(device)], kw["group"], device)[0]
    cal = replace(cal, launch_us=launch)
    if not symm.available(g, device):
        return replace(cal, measurements={**cal.measurements, "copy_engine": "not measured: no symmetric memory"})
    try:
        # What a launch costs inside a real schedule (streams, events, peer copies, the
        # barrier) is more than a bare GEMM launch: time the host side of small calls.
        per_launch = _schedule_launch_us(g, device, dtype)
        per_launch = _max_over_ranks([per_launch], kw["group"], device)[0]
        cal = replace(cal, launch_us=max(launch, per_launch),
                      measurements={**cal.measurements, "launch_us": {"bare_mm": launch, "in_schedule": per_launch}})
    except Exception as e:  # noqa: BLE001 - keep the bare launch cost, say why
        cal = replace(cal, measurements={**cal.measurements, "launch_us": f"schedule timing failed: {e}"})
    try:
        ws = symm.workspace(g, "calibrate", device)
        big, small = 64 << 20, 64 << 10
        ws.ensure(big)
        peer = (g.rank + 1) % g.world_size
        src_big = ws.view(peer, (big // dtype.itemsize,), dtype, 0)
        src_small = ws.view(peer, (small // dtype.itemsize,), dtype, 0)
        dst = torch.empty(big // dtype.itemsize, device=device, dtype=dtype)
        t_big = _median_us(lambda: dst.copy_(src_big), device, **kw)
        t_small = _median_us(lambda: dst[:src_small.numel()].copy_(src_small), device, **kw)
        t_barrier = _median_us(ws.barrier, device, **kw)
        t_big, t_small, t_barrier = _max_over_ranks([t_big, t_small, t_barrier], kw["group"], device)
        rate = (big - small) / max(t_big - t_small, 1e-3) / 1e3
        return replace(cal, copy_gbps=float(rate), copy_latency_us=float(max(0.0, t_small - small / (rate * 1e3))),
                       barrier_us=float(t_barrier),
                       measurements={**cal.measurements, "copy_engine": {"copy_us": [t_small, t_big],
                                                                         "copy_bytes": [small, big],
                                                                         "barrier_us": t_barrier}})
    except Exception as e:  # noqa: BLE001 - keep the defaults, say why
        return replace(cal, measurements={**cal.measurements, "copy_engine": f"failed: {type(e).__name__}: {e}"})


def calibrate(
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    save: bool = True,
    activate: bool = True,
) -> Calibration:
    """Measure the plan's constants on this machine and group; every rank must call it.

    Times are the slowest rank's, so every rank fits the same constants. With
    ``save`` rank 0 writes them to :func:`calibration_path`; with ``activate`` every
    rank uses them from now on. Takes ~10-20 s on H100s, a few seconds on CPU.
    """
    from .ops import matmul_reduce_scatter_forward
    from .plan import plan as make_plan
    from .validate import check_group

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    g = check_group(group, device)
    world = g.world_size
    sizes = _sizes(device)
    kw = {"warmup": sizes.warmup, "iters": sizes.iters, "group": group}

    gemm_times = []
    for m, n, k in sizes.gemms:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        gemm_times.append(_median_us(lambda a=a, b=b: torch.mm(a, b), device, **kw))
    comm_times: dict[str, list[float]] = {kind: [] for kind in BUS_FACTOR}
    for nbytes in sizes.comm_bytes:
        numel = max(world, nbytes // dtype.itemsize // world * world)
        full = torch.randn(numel, device=device).to(dtype)
        part = torch.empty(numel // world, device=device, dtype=dtype)
        out = torch.empty_like(full)
        from commflow.dist import all_gather_tensor, reduce_scatter_tensor

        calls = {
            "all_reduce": lambda full=full: dist.all_reduce(full, group=group),
            "all_gather": lambda out=out, part=part: all_gather_tensor(out, part, group=group),
            "reduce_scatter": lambda part=part, full=full: reduce_scatter_tensor(part, full, group=group),
            "all_to_all": lambda out=out, full=full: dist.all_to_all_single(out, full, group=group),
        }
        for kind, fn in calls.items():
            comm_times[kind].append(_median_us(fn, device, **kw))
    buf = torch.randn(sizes.memory_bytes // dtype.itemsize // world * world, device=device).to(dtype).view(world, -1)
    memory_time = _median_us(lambda: buf.sum(0), device, **kw)
    contention = _contention(device, group, world, dtype, sizes)

    flat = gemm_times + [t for kind in BUS_FACTOR for t in comm_times[kind]] + [memory_time]
    flat = _max_over_ranks(flat, group, device)
    gemm_times, rest = flat[: len(gemm_times)], flat[len(gemm_times):]
    n_sizes = len(sizes.comm_bytes)
    for i, kind in enumerate(BUS_FACTOR):
        comm_times[kind] = rest[i * n_sizes:(i + 1) * n_sizes]
    memory_time = rest[-1]

    gemm_latency, gemm_rate = _fit_latency_rate([2.0 * m * n * k for m, n, k in sizes.gemms], gemm_times)
    comm = {}
    for kind in BUS_FACTOR:
        nbytes = [max(world, b // dtype.itemsize // world * world) * dtype.itemsize for b in sizes.comm_bytes]
        lat, rate = _fit_latency_rate([b * BUS_FACTOR[kind](world) for b in nbytes], comm_times[kind])
        comm[kind] = CommCost(latency_us=lat, busbw_gbps=rate / 1e3)
    mem_bytes = buf.numel() * dtype.itemsize * (1 + 1 / world)
    gemm_alone, comm_alone, gemm_beside, comm_beside = contention
    cal = Calibration(
        device=_device_name(device),
        world_size=world,
        gemm_tflops=gemm_rate / 1e6,
        gemm_latency_us=gemm_latency,
        comm=comm,
        memory_gbps=mem_bytes / memory_time / 1e3,
        chunk_overhead_us=0.0,
        gemm_slowdown=float(min(3.0, max(1.0, gemm_beside / gemm_alone))),
        comm_slowdown=float(min(3.0, max(1.0, comm_beside / comm_alone))),
        dtype=str(dtype).removeprefix("torch."),
        source=f"measured {time.strftime('%Y-%m-%d %H:%M:%S')} on {world} ranks",
        measurements={
            "gemm_shapes": [list(s) for s in sizes.gemms], "gemm_us": gemm_times,
            "comm_bytes": list(sizes.comm_bytes), "comm_us": comm_times, "memory_us": memory_time,
            "contention_us": {"gemm_alone": gemm_alone, "comm_alone": comm_alone,
                              "gemm_beside": gemm_beside, "comm_beside": comm_beside},
        },
    )
    # Chunk overhead: run the real overlapped op on a shape small enough that latencies
    # dominate, with 1 and 4 chunks; what the model (without overhead) misses per chunk.
    m, n, k = sizes.gemms[1]
    x = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(k, n, device=device).to(dtype)
    measured, predicted = [], []
    for chunks in (1, 4):
        p = make_plan("matmul_reduce_scatter", m, n, k, world_size=world, dtype=dtype, calibration=cal,
                      mode="overlap", n_chunks=chunks, transport="nccl")
        predicted.append(p.t_overlap_ms * 1e3)
        measured.append(_median_us(lambda p=p: matmul_reduce_scatter_forward(x, w, g, 0, p), device, **kw))
    measured = _max_over_ranks(measured, group, device)
    overhead = max(0.0, ((measured[1] - predicted[1]) - (measured[0] - predicted[0])) / 3.0)
    cal = replace(cal, chunk_overhead_us=min(overhead, 1000.0),
                  measurements={**cal.measurements, "chunk_overhead": {"measured_us": measured,
                                                                       "predicted_us": predicted}})
    cal = _copy_engine(cal, g, device, dtype, kw)
    if save and g.rank == 0:
        path = calibration_path(cal.device, world)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cal.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
    if activate:
        set_calibration(cal, device_type=device.type)
    return cal
