"""Probe: GEMM + all-reduce fused at row-chunk granularity (CUTLASS stores, a reducer beside it).

Not a registered benchmark. Build the library (``CUTLASS_DIR=... bash benchmarks/cutlass/build.sh``),
carry ``benchmarks/cutlass/libcf_gemm.so``, then ``python -m benchmarks.overlap_cutlass_ar_probe
--nproc 4 [--rounds 20] [--chunks 8] [--ctas 16] [--threads 512] [--unroll 1] [--poll-ns 32]
[--serial-ctas 0] [--hold-s 0] [--timeline 0] [--shapes NAME:M,...] [--out FILE]``
(``--shapes``: substrings of ``name:M``, default all).

Why: docs/overlap.md "Decisions" bounded what a fused all-reduce could reach by two unknowns,
what the transfers cost the GEMM beside them and the tail after it; this measures them with the
least new code. Per call, on every rank:

* ``gemm_sm90_array.cu``, one persistent launch of ``R * chunks`` problems ordered chunk-major
  (every destination's chunk 0, then chunk 1, ...; this rank's own rows last within a chunk), each
  storing its ``[M / (R * chunks), N]`` partial straight into slot ``rank`` of its owner's
  symmetric buffer, on ``SMs - ctas`` SMs;
* beside it, on a side stream, ``ar_reduce.cu`` on ``ctas`` CTAs of ``threads`` threads: the
  slots start filled with a NaN pattern no GEMM of finite inputs writes, so it sums each row as
  soon as all R partials of the row are in (fp32, rank order, one rounding), stores the reduced
  row into every rank's output buffer over NVLink and re-arms the slots;
* a symmetric-memory barrier after the reducer (every rank's rows are in every output), then the
  caller's stream waits for it; the output buffers alternate between two copies, so a rank still
  copying out one call's result is not overwritten by a faster peer's next call.

Variants, timed in alternation (``commflow.overlap.autotune.sample_ms``, medians, slowest rank):
``cublas`` (``torch.mm`` of the whole ``x [M, K/R] @ w``); ``cutlass_full`` / ``cutlass_less`` (the
chunked ptr-array GEMM storing locally on all SMs / on ``SMs - ctas``: what the reducer's SMs
cost); ``fused_ar`` (the above, the GEMM launched first, result copied into new memory);
``fused_ar_split`` (the GEMM as one launch per chunk); ``fused_ar_rfirst`` (the reducer launched
first); ``serial_ar`` / ``serial_ar_view`` (not fused: one problem per destination block on all
SMs, a barrier, then the reducer on one CTA per SM, ``--serial-ctas``, with / without the copy
out); ``fused_local`` / ``serial_local_view`` (the reducer storing into this rank's output only:
not an all-reduce, the control for what its NVLink stores cost); ``library_ar`` (the library's
copy-engine all-reduce, forced to overlap, its plan's groups, replayed as a CUDA graph) and
``sequential`` (``torch.mm`` + NCCL's all-reduce). ``fused_ar``, ``serial_ar`` and ``library_ar``
are checked against ``sequential`` with the outputs filled with NaN first; the reducer's error
flag (a vector that never arrived within 8 s) is read after every shape. ``--timeline 1`` adds
the reducer's per-chunk timeline on the GPU clock (first and last row complete, last store
issued, us after its start) for both fused forms; ``--hold-s S`` runs five forms back to back
for ~S s each while rank 0 samples every GPU's SM clock and power.

Found (session 15, 4x H100, ``overlap_cutlass_ar_probe_4xH100_20261127-s15-*.json``; the table is
in docs/overlap.md): correct everywhere, but the fused form (0.98x geomean of sequential on the
six shapes) is slower than its two kernels run one after the other (1.08x with the copy out,
1.19x without; the library's all-reduce 1.01x in the same run): beside the GEMM the reducer moves
data at about a quarter of its own rate, while the cards run at full clock (they wait).
"""

from __future__ import annotations

import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = [  # (name, K, N, M): row-parallel, x [M, K/R] @ w [K/R, N], all-reduced
    ("llama3-70b-attn-out", 8192, 8192, 16384), ("llama3-70b-attn-out", 8192, 8192, 4096),
    ("llama3-8b-attn-out", 4096, 4096, 16384), ("llama3-8b-attn-out", 4096, 4096, 4096),
    ("llama3-70b-fc2", 28672, 8192, 8192), ("llama3-8b-fc2", 14336, 4096, 16384),
]


def _row(lib, g, ws, name: str, k_full: int, n: int, m: int, rounds: int, cfg: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.cutlass_lib import ArrayGemm, pointers
    from benchmarks.overlap import checked_times, symm_call

    dev, world, rank = torch.device("cuda", torch.cuda.current_device()), g.world_size, g.rank
    chunks, ctas, threads, unroll = cfg["chunks"], cfg["ctas"], cfg["threads"], cfg["unroll"]
    k, mr = k_full // world, m // world
    cr = mr // chunks  # rows of one problem: one chunk of one destination's block
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(23 + rank)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    w = (torch.randn(k, n, device=dev, generator=gen) / math.sqrt(k_full)).to(torch.bfloat16)
    # Symmetric buffer, bf16 elements: the R slots [R, M/R, N], then two output copies [M, N].
    ws.ensure(3 * m * n * 2)
    slots = ws.view(rank, (world, mr, n), torch.bfloat16, 0)
    outs = [ws.view(rank, (m, n), torch.bfloat16, m * n * (1 + c)) for c in (0, 1)]
    local = torch.empty(m, n, dtype=torch.bfloat16, device=dev)  # the GEMM-only controls' target
    order = [(c, (rank + 1 + j) % world) for c in range(chunks) for j in range(world)]  # chunk-major, own last
    base = ws.handle.buffer_ptrs
    a_ptrs = pointers([x.data_ptr() + (d * mr + c * cr) * k * 2 for c, d in order], dev)
    b_ptrs = pointers([w.data_ptr()] * len(order), dev)
    gemm_all, gemm_less = (ArrayGemm(lib, a_ptrs, b_ptrs, cr, n, k, s) for s in (0, sms - ctas))
    d_remote = pointers([base[d] + (rank * mr + c * cr) * n * 2 for c, d in order], dev)
    # The same problems as one launch per chunk (chunk c's R problems), so each chunk is complete,
    # and flushed by its kernel's end, before the next one starts.
    per = [order[c * world:(c + 1) * world] for c in range(chunks)]
    gemm_split = [ArrayGemm(lib, pointers([x.data_ptr() + (d * mr + c * cr) * k * 2 for c, d in o], dev),
                            pointers([w.data_ptr()] * world, dev), cr, n, k, sms - ctas) for o in per]
    d_split = [pointers([base[d] + (rank * mr + c * cr) * n * 2 for c, d in o], dev) for o in per]
    # The serial form: one problem per destination block, on all SMs.
    order1 = [(rank + 1 + j) % world for j in range(world)]
    gemm1 = ArrayGemm(lib, pointers([x.data_ptr() + d * mr * k * 2 for d in order1], dev),
                      pointers([w.data_ptr()] * world, dev), mr, n, k, 0)
    d_remote1 = pointers([base[d] + rank * mr * n * 2 for d in order1], dev)
    d_local = pointers([local.data_ptr() + (d * mr + c * cr) * n * 2 for c, d in order], dev)
    out_ptrs = [pointers([base[p] + m * n * (1 + c) * 2 for p in range(world)], dev) for c in (0, 1)]
    error = torch.zeros(1, dtype=torch.int32, device=dev)
    side = torch.cuda.Stream(device=dev)

    # The slots start empty (0xFFFF in every half); every rank's before any GEMM writes.
    slots.view(torch.int16).fill_(-1)
    torch.cuda.synchronize(dev)
    dist.barrier()
    calls = [0]

    def reduce(c: int, stream, grid: int = ctas, block: int = threads, step: int = unroll, peers: bool = True,
               stamps: torch.Tensor | None = None):
        rc = lib.cf_ar_reduce(slots.data_ptr(), out_ptrs[c].data_ptr(), rank, world, mr, n, grid, block, step,
                              int(peers), cfg["poll_ns"], error.data_ptr(),
                              None if stamps is None else stamps.data_ptr(), stream.cuda_stream)
        if rc:
            raise RuntimeError(f"cf_ar_reduce returned {rc}")

    def gemm_chunks(split: bool) -> None:
        if split:
            for gemm, d in zip(gemm_split, d_split):
                gemm(d)
        else:
            gemm_less(d_remote)

    def fused(gemm_first: bool, peers: bool = True, split: bool = False, stamps=None) -> torch.Tensor:
        c = calls[0] % 2
        calls[0] += 1
        main = torch.cuda.current_stream()
        side.wait_stream(main)  # the previous call's copy-out of this output copy is done
        # Launched first, the GEMM's clusters (2 SMs each) take whole SM pairs and the reducer the
        # SMs left; launched second, it may find fewer free pairs than it has clusters. Measured
        # (session 15): the reducer first is up to 21 % slower (70B FC2), within ~5 % on most rows.
        if gemm_first:
            gemm_chunks(split)
        with torch.cuda.stream(side):
            reduce(c, side, peers=peers, stamps=stamps)
        if not gemm_first:
            gemm_chunks(split)
        with torch.cuda.stream(side):
            ws.barrier()  # every rank's reducer is done: all rows in all outputs, all slots re-armed
        main.wait_stream(side)
        return outs[c].clone()

    def serial(copy_out: bool, peers: bool = True) -> torch.Tensor:
        # Not fused: the GEMM (one problem per destination block, all SMs) stores every partial
        # into its owner's slot, a barrier, then the reducer on serial_ctas CTAs (0: one per
        # SM) finds every partial in. Less the GEMM (cutlass_rs of overlap_cutlass_rs_probe)
        # this is the reducer's own speed.
        c = calls[0] % 2
        calls[0] += 1
        gemm1(d_remote1)
        ws.barrier()
        reduce(c, torch.cuda.current_stream(), cfg["serial_ctas"] or sms, 512, 2, peers)
        ws.barrier()
        return outs[c].clone() if copy_out else outs[c]

    def sequential() -> torch.Tensor:
        y = torch.mm(x, w)
        dist.all_reduce(y)
        return y

    fns = {"cublas": lambda: torch.mm(x, w), "cutlass_full": lambda: gemm_all(d_local),
           "cutlass_less": lambda: gemm_less(d_local), "fused_ar": lambda: fused(True),
           "fused_ar_split": lambda: fused(True, split=True),
           "fused_ar_rfirst": lambda: fused(False), "serial_ar": lambda: serial(True),
           "serial_ar_view": lambda: serial(False), "fused_local": lambda: fused(True, False),
           "serial_local_view": lambda: serial(False, False), "library_ar": symm_call("ar", x, w, (m, n, k)),
           "sequential": sequential}

    def poison() -> None:
        for o in outs:
            o.fill_(float("nan"))

    diff, ms = checked_times(fns, ["fused_ar", "serial_ar", "library_ar"], sequential, rounds, dev, before_check=poison)
    torch.cuda.synchronize(dev)
    row = {"shape": name, "M": m, "K_per_rank": k, "N": n, "chunks": chunks, "reducer_ctas": ctas,
           "reducer_threads": threads, "reducer_unroll": unroll, "poll_ns": cfg["poll_ns"], "rel_diff": diff, "reducer_error": int(error.item()),
           **{f"{nm}_ms": t for nm, t in ms.items()}}
    for nm in ("fused_ar", "fused_ar_split", "fused_ar_rfirst", "serial_ar", "serial_ar_view", "library_ar"):
        row[f"{nm}_speedup"] = row["sequential_ms"] / row[f"{nm}_ms"]
    row["gemm_cost_of_reducer_sms"] = row["cutlass_less_ms"] / row["cutlass_full_ms"]
    if cfg["timeline"]:
        row["timeline_us"] = {}
        for form, split in (("fused_ar", False), ("fused_ar_split", True)):
            stamps = torch.zeros(1 + 2 * mr, dtype=torch.int64, device=dev)
            stamps[0] = -1  # all ones: the atomicMin's start
            torch.cuda.synchronize(dev)
            dist.barrier()
            fused(True, split=split, stamps=stamps)
            torch.cuda.synchronize(dev)
            t = ((stamps[1:] - stamps[0]).double() / 1e3).view(2, chunks, cr)  # us after the reducer's start
            # Per chunk: first and last row complete, last row's stores issued.
            row["timeline_us"][form] = [[round(t[0, c].min().item(), 1), round(t[0, c].max().item(), 1),
                                         round(t[1, c].max().item(), 1)] for c in range(chunks)]
    if cfg["hold_s"] > 0:
        fns["gemm_remote"] = lambda: gemm_less(d_remote)
        ms["gemm_remote"] = ms["cutlass_less"]
        row["held"] = _held(fns, ms, cfg["hold_s"], dev, rearm=lambda: slots.view(torch.int16).fill_(-1))
    return row


HELD = ["gemm_remote", "fused_local", "serial_local_view", "fused_ar", "serial_ar_view"]


def _held(fns: dict, ms: dict, seconds: float, dev, rearm) -> dict:
    """Each of HELD back to back for ~``seconds`` (a call count from its median, the same on every
    rank: the fused forms hold barriers) while rank 0 samples every GPU's SM clock and power
    (``overlap_power_probe.ClockSampler``): ms per call (slowest rank) and the clocks. Tells
    whether the fused form loses to the serial one by clock (power) or beside it at the same
    clock (memory side). ``gemm_remote`` (the chunked GEMM storing into the owners, no reducer)
    leaves the slots full, so they are re-armed after it."""
    import time

    import torch.distributed as dist

    from benchmarks.overlap_power_probe import ClockSampler
    from benchmarks.timing import max_over_ranks

    sampler = ClockSampler() if dist.get_rank() == 0 else None
    out = {}
    try:
        for name in HELD:
            calls = max(10, int(seconds * 1e3 / ms[name]))
            torch.cuda.synchronize(dev)
            dist.barrier()
            t0 = time.time()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fns[name]()
                if i % 16 == 15:  # keep the host near the GPU, so the sampled window is the loop's
                    torch.cuda.current_stream().synchronize()
            end.record()
            torch.cuda.synchronize(dev)
            t1 = time.time()
            out[name] = {"calls": calls, "ms": max_over_ranks(start.elapsed_time(end) / calls),
                         "gpus": sampler.window(t0, t1) if sampler else None}
            if name == "gemm_remote":
                dist.barrier()
                rearm()
                torch.cuda.synchronize(dev)
                dist.barrier()
    finally:
        if sampler:
            sampler.stop()
    return out


def _worker(cfg: dict) -> dict:
    from benchmarks.cutlass_lib import load
    from benchmarks.overlap import probe_rows

    lib = load()
    wanted = [w for w in cfg["shapes"].split(",") if w]
    shapes = [s for s in SHAPES if not wanted or any(w in f"{s[0]}:{s[3]}" for w in wanted)]
    if not shapes:
        raise ValueError(f"--shapes {cfg['shapes']!r} matches none of {[f'{s[0]}:{s[3]}' for s in SHAPES]}")
    rows = probe_rows("cutlass_ar_probe", lambda g, ws, *a: _row(lib, g, ws, *a, cfg), shapes, cfg["rounds"])
    return {"rows": rows, "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_cutlass_ar_probe", _worker, argv, __doc__, nproc=4,
                      options={"rounds": 20, "chunks": 8, "ctas": 16, "threads": 512, "unroll": 1, "serial_ctas": 0,
                               "poll_ns": 32, "hold_s": 0.0, "timeline": 0,
                               "shapes": ""},
                      timeout_s=400, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
