"""Tensor-parallel GEMM + collective: sequential vs torch's fused ops vs commflow.overlap.

Per row (op, layer shape, M tokens, world size), in one process group and on the
same buffers:

* ``gemm``: the local GEMM alone; ``comm``: the plain NCCL collective alone;
* ``sequential``: ``torch.mm`` then the NCCL collective into a fresh output (Megatron's mappings);
* ``torch_fused``: ``torch.ops.symm_mem.fused_matmul_reduce_scatter`` /
  ``fused_all_gather_matmul`` (symmetric memory, multicast off; no all-reduce variant);
* ``auto`` / ``auto_backend``: our op with the plan's choice (fp32 reduction: the
  copy-engine transport on CUDA; backend reduction: NCCL per chunk);
* ``overlap`` / ``overlap_backend``: our op forced to overlap (chunks from the plan);
* ``sequential_control``: ``sequential`` again under another name, timed as one more
  variant: its ratio to ``sequential`` is the row's measurement noise, the resolution
  against which a few per cent (the 3 % guard) can be judged.

Times are CUDA-event medians after warm-up (``commflow.overlap.autotune.sample_ms``, the
sampler the autotune decides with), variants timed in alternation (every round
times each once, in an order shuffled per round), ranks lined up before each sample, the
slowest rank's number; a sample is ``--calls-per-sample`` calls back to back (per-call
time = sample / calls), so the host's launch work overlaps the GPU as it does in a
training step, for every variant alike; host microseconds per call are recorded too.
Rounds go on past ``--iters`` until every variant has ``--min-time-ms`` of timed calls
(at most ``10 x --iters`` rounds): a 0.1 ms row gets ~100 samples, a 3 ms row 20.
Overlap efficiency
``eta = (t_gemm + t_comm - t) / min(t_gemm, t_comm)`` (T3's and Flux's definition).
A variant that fails records its error in its row; rows already measured are appended
to a ``.jsonl`` beside the result as they finish, so a crash loses nothing measured.

Shapes: the row-parallel GEMMs of Llama-3 (attention output: K = N = hidden; FC2:
K = ffn, N = hidden) for GEMM + reduce-scatter and GEMM + all-reduce; for all-gather +
GEMM the same layers' input-gradient GEMM under sequence parallelism (gather dY
``[M/R, hidden]``, multiply by ``W_r^T [hidden, K/R]``). ``--tiny`` divides every
dim by 64 so the whole benchmark runs on CPU (gloo) in seconds.

``python -m benchmarks.overlap report FILE.json`` writes the markdown table and the
plot (docs/overlap_results.md, docs/img/overlap_*.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from .registry import register
from .report import load_result, pyplot, report_main, report_paths, save_figure, write_markdown

SHAPES = {  # name: (K, N) of the row-parallel GEMM, global
    "llama3-70b-attn-out": (8192, 8192),
    "llama3-70b-fc2": (28672, 8192),
    "llama3-8b-attn-out": (4096, 4096),
    "llama3-8b-fc2": (14336, 4096),
}
SMALL_M_SHAPE = "llama3-70b-attn-out"
OPS = {"rs": "matmul_reduce_scatter", "ar": "matmul_all_reduce", "ag": "all_gather_matmul"}
VARIANTS = ("gemm", "comm", "sequential", "sequential_control", "torch_fused", "auto", "auto_backend", "overlap",
            "overlap_backend", "overlap_graphed")
GUARD = 0.97  # issue 8: never more than 3 % slower than sequential
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
TINY = 64
CHECK_TOLERANCE = 0.05
"""Max relative difference from sequential a variant may show (bf16 roundings give ~6e-3)."""


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", default="2", help="comma-separated world sizes, run one after the other")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--ops", default="rs,ar,ag", help="subset of rs,ar,ag")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    p.add_argument("--m", default="2048,4096,8192,16384", help="tokens per TP group (main sweep)")
    p.add_argument("--small-m", default="128,256,512,1024", help=f"small-M guard on {SMALL_M_SHAPE}")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-time-ms", type=float, default=50.0,
                   help="timed milliseconds each variant gathers per row at least (more rounds for short rows, "
                        "up to 10 x --iters)")
    p.add_argument("--calls-per-sample", type=int, default=4,
                   help="calls back to back per timed sample (host launch overhead overlaps the GPU, as in training)")
    p.add_argument("--tiny", action="store_true", help=f"divide every dim by {TINY} (CPU smoke run)")
    p.add_argument("--no-calibrate", action="store_true", help="use the saved/default calibration")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--graphs", choices=["on", "off"], default="on",
                   help="whether the autotune may pick CUDA-graph replays of the copy-engine schedules "
                        "(COMMFLOW_OVERLAP_GRAPHS; on is the library's default); the overlap_graphed variant "
                        "runs either way")


def _rows_plan(args) -> list[dict]:
    if args.min_time_ms < 0:
        raise SystemExit(f"--min-time-ms: must be at least 0 (0: exactly --iters rounds), got {args.min_time_ms}")
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; choose from {sorted(OPS)}")
    shapes = [s for s in args.shapes.split(",") if s]
    if set(shapes) - set(SHAPES):
        raise SystemExit(f"--shapes: unknown {sorted(set(shapes) - set(SHAPES))}; choose from {sorted(SHAPES)}")
    scale = TINY if args.tiny else 1
    rows = []
    for op in ops:
        for shape in shapes:
            for m in (int(v) for v in args.m.split(",") if v):
                rows.append({"op": op, "shape": shape, "m": m // scale, "guard": False})
        if SMALL_M_SHAPE in shapes or not shapes:
            for m in (int(v) for v in args.small_m.split(",") if v):
                rows.append({"op": op, "shape": SMALL_M_SHAPE, "m": max(8, m // scale), "guard": True})
    for row in rows:
        k, n = SHAPES[row["shape"]]
        row["K"], row["N"] = k // scale, n // scale
    return rows


def _torch_fused(op: str, group_name: str):
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed on older torch, a deprecated no-op on newer
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(group_name)
    if op == "rs":
        return lambda x, w: torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w, "sum", 0, group_name)
    if op == "ag":
        return lambda x, w: torch.ops.symm_mem.fused_all_gather_matmul(x, [w], 0, group_name)[1][0]
    return None


def symm_call(op: str, x: torch.Tensor, w: torch.Tensor, dims: tuple[int, int, int], *, groups: int | None = None,
              graphed: bool = True):
    """The library's forward of ``op`` (``"rs"``, ``"ar"``, ``"ag"``; plan dims ``(m, n, k)``)
    forced to overlap on the copy-engine transport, replayed as a CUDA graph unless
    ``graphed=False``; ``groups`` (reduce-scatter / all-reduce) pins that many equal row
    groups instead of the plan's. Also what the overlap probes time."""
    from dataclasses import replace

    from commflow.overlap import ops
    from commflow.overlap.functional import resolve_plan
    from commflow.overlap.validate import check_group

    g = check_group(None, x.device)
    p = resolve_plan(OPS[op], *dims, g, x, "overlap", None, "fp32")
    if p.transport != "symm":
        raise RuntimeError("the copy-engine transport is unavailable here (see symm.unavailable_reason)")
    p = replace(p, graphed=graphed)
    if groups is not None:
        rows = x.shape[0] // g.world_size
        p = replace(p, n_chunks=groups, chunk_sizes=tuple([rows // groups] * groups))
    if op == "rs":
        return lambda: ops.matmul_reduce_scatter_forward(x, w, g, 0, p)
    if op == "ar":
        return lambda: ops.matmul_all_reduce_forward(x, w, g, p)
    return lambda: ops.all_gather_matmul_forward(x, w, g, 0, p, False)[0]


def sequential_rs(x: torch.Tensor, w: torch.Tensor, world_size: int):
    """The probes' baseline for GEMM + reduce-scatter: ``torch.mm``, then NCCL's reduce-scatter
    into a fresh ``[M/R, N]`` tensor (as Megatron's mappings do it)."""
    import torch.distributed as dist

    def run() -> torch.Tensor:
        y = torch.mm(x, w)
        out = torch.empty(y.shape[0] // world_size, y.shape[1], device=y.device, dtype=y.dtype)
        dist.reduce_scatter_tensor(out, y)
        return out

    return run


def probe_rows(workspace_op: str, row, shapes, rounds: int) -> list[dict]:
    """The shape loop of the fused-store probes, on this (spawned) rank: ``row(g, ws, *shape,
    rounds)`` for each shape, with the default group and a symmetric workspace of the probe's
    own (``workspace_op``); rank 0 prints each row as it comes."""
    import torch.distributed as dist

    from commflow.dist import init_distributed
    from commflow.overlap import symm
    from commflow.overlap.validate import check_group

    info = init_distributed(device="cuda")
    g = check_group(None, info.device)
    ws = symm.workspace(g, workspace_op, info.device)
    rows = []
    for shape in shapes:
        rows.append(row(g, ws, *shape, rounds))
        if info.rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    dist.barrier()
    return rows


def checked_times(fns: dict, checked: list[str], sequential, rounds: int, device: torch.device,
                  before_check=None) -> tuple[dict[str, float], dict[str, float]]:
    """The fused-store probes' protocol: every fn warmed up (3 calls, ranks lined up after each
    variant), each of ``checked`` compared with ``sequential()`` (max difference relative to the
    largest value, NaN as inf, slowest rank; ``before_check()`` runs on quiet ranks first, e.g. to
    poison buffers), then all timed in alternation (``sample_ms``). Returns (rel diffs, ms per
    fn), both the slowest rank's."""
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks
    from commflow.overlap.autotune import sample_ms

    def quiet():
        torch.cuda.synchronize(device)
        dist.barrier()

    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn()
            quiet()
        ref = sequential().float()
        diff = {}
        for name in checked:
            if before_check is not None:
                quiet()
                before_check()
            quiet()
            rel = ((fns[name]().float() - ref).abs().max() / ref.abs().max()).nan_to_num(float("inf")).item()
            diff[name] = max_over_ranks(rel)
        quiet()
        timed = sample_ms(list(fns.values()), iters=rounds, calls=4, device=device)
    return diff, {name: max_over_ranks(t) for name, (t, _) in zip(fns, timed)}


def _measure_row(row: dict, variants: list[str], info, dtype, args, calibration) -> dict:
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks
    from commflow.dist import all_gather_tensor, reduce_scatter_tensor
    from commflow.overlap import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter, plan
    from commflow.overlap.autotune import sample_ms

    dev, world, op, m = info.device, info.world_size, row["op"], row["m"]
    big_k, n = row["K"], row["N"]
    out = {**row, "world_size": world, "times_ms": {}, "errors": {}, "plans": {}, "rel_diff_vs_sequential": {}}
    gen = torch.Generator(device=dev).manual_seed(1234 + info.rank)
    if op in ("rs", "ar"):
        x = torch.randn(m, big_k // world, device=dev, generator=gen).to(dtype)  # x_r [M, K/R]
        w = (torch.randn(big_k // world, n, device=dev, generator=gen) / math.sqrt(big_k)).to(dtype)
        dims = (m, n, big_k // world)
    else:  # dgrad under SP: gather dY [M/R, hidden], times W_r^T [hidden, K/R]
        x = torch.randn(m // world, n, device=dev, generator=gen).to(dtype)
        w = (torch.randn(n, big_k // world, device=dev, generator=gen) / math.sqrt(n)).to(dtype)
        dims = (m, big_k // world, n)
    out["gemm_mnk"] = list(dims)
    # Real values everywhere (a GEMM on zeros runs faster than on data).
    part = torch.mm(x, w) if op != "ag" else None
    shard_out = torch.empty(m // world, dims[1], device=dev, dtype=dtype)
    gathered = torch.cat([x] * world) if op == "ag" else None

    def comm():
        if op == "rs":
            reduce_scatter_tensor(shard_out, part)
        elif op == "ar":
            dist.all_reduce(part)
        else:
            all_gather_tensor(gathered, x)

    def gemm():
        return torch.mm(gathered if op == "ag" else x, w)

    def sequential():  # as Megatron's mappings do it: a fresh output per call, then the collective
        if op == "rs":
            out = torch.empty(m // world, dims[1], device=dev, dtype=dtype)
            reduce_scatter_tensor(out, torch.mm(x, w))
            return out
        if op == "ar":
            y = torch.mm(x, w)
            dist.all_reduce(y)
            return y
        full = torch.empty(m, n, device=dev, dtype=dtype)
        all_gather_tensor(full, x)
        return torch.mm(full, w)

    fn_of = {"rs": matmul_reduce_scatter, "ar": matmul_all_reduce, "ag": all_gather_matmul}[op]
    calls = {"gemm": gemm, "comm": comm, "sequential": sequential,
             "sequential_control": lambda: sequential()}  # a distinct callable: timed as its own variant
    for name, mode, reduction in (("auto", "auto", "fp32"), ("auto_backend", "auto", "backend"),
                                  ("overlap", "overlap", "fp32"), ("overlap_backend", "overlap", "backend")):
        if op == "ag" and reduction == "backend":
            continue  # nothing to reduce in the forward
        calls[name] = (lambda mode=mode, reduction=reduction: fn_of(x, w, mode=mode, reduction=reduction))
        try:
            p = plan(OPS[op], *dims, world_size=world, dtype=dtype, calibration=calibration, mode=mode,
                     reduction=reduction)
            out["plans"][name] = {"decision": p.decision, "n_chunks": p.n_chunks, "chunk_sizes": list(p.chunk_sizes),
                                  "transport": p.transport,
                                  "predicted_sequential_ms": p.t_sequential_ms, "predicted_ms": p.t_overlap_ms,
                                  "predicted_gemm_ms": p.t_gemm_ms, "predicted_comm_ms": p.t_comm_ms,
                                  "reason": p.reason}
        except ValueError as e:
            out["errors"][name] = f"plan: {e}"
    if dev.type == "cuda" and "overlap_graphed" in variants:
        # The forced schedule replayed as a CUDA graph (commflow.overlap.graphs), beside
        # "overlap" (the same schedule launched op by op).
        try:
            calls["overlap_graphed"] = symm_call(op, x, w, dims)
        except Exception as e:  # noqa: BLE001 - recorded, the row goes on
            out["errors"]["overlap_graphed"] = f"{type(e).__name__}: {e}"[:500]
    if dev.type == "cuda" and op in ("rs", "ag"):
        try:
            group_name = dist.group.WORLD.group_name
            fused = _torch_fused(op, group_name)
            calls["torch_fused"] = lambda: fused(x, w)
        except Exception as e:  # noqa: BLE001 - recorded, the row goes on
            out["errors"]["torch_fused"] = f"{type(e).__name__}: {e}"
    active = [v for v in variants if v in calls and v not in out["errors"]]
    with torch.no_grad():
        # The checked call sees the negated input, its warm-up calls the input itself: a graph
        # replay that read a buffer before this call's data reached it (or a stale output)
        # gives the warm-ups' result, off by twice its size, not a bf16 rounding.
        x.neg_()
        reference = sequential().float()
        x.neg_()
        checked = [v for v in active if v not in ("gemm", "comm", "sequential", "sequential_control")]

        def check(name: str) -> float:
            x.neg_()
            try:
                got = calls[name]().float()
            finally:
                x.neg_()
            diff = ((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
            # NaN is a failure on any rank: as inf, since a MAX all-reduce may drop a NaN.
            diff = max_over_ranks(diff if math.isfinite(diff) else float("inf"))
            if not diff <= CHECK_TOLERANCE:  # a wrong-but-fast variant is refused, not timed
                raise RuntimeError(f"wrong result: max rel diff {diff:.3g} vs sequential > {CHECK_TOLERANCE}")
            return diff

        for name in list(active):  # warm up (first calls plan, autotune and set up buffers) and check
            try:
                # At least two warm-ups: a one-step schedule alternates between two graphs,
                # so its first replay is the third call.
                for _ in range(max(args.warmup, 2)):
                    calls[name]()
                if name in checked:
                    out["rel_diff_vs_sequential"][name] = check(name)
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the row
                out["errors"][name] = f"{type(e).__name__}: {e}"[:500]
                active.remove(name)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        try:
            samples = sample_ms([calls[v] for v in active], iters=args.iters, calls=args.calls_per_sample, device=dev,
                                min_time_ms=args.min_time_ms)
            for name, (t, host_us) in zip(active, samples):
                out["times_ms"][name] = max_over_ranks(t)
                out.setdefault("host_us_per_call", {})[name] = max_over_ranks(host_us)
            # Checked again after the timed rounds, which interleave variants on shared
            # workspaces: a time is kept only for a variant that still computes the product.
            for name in [v for v in active if v in checked]:
                try:
                    out["rel_diff_vs_sequential"][name] = max(out["rel_diff_vs_sequential"][name], check(name))
                except RuntimeError as e:
                    out["errors"][name] = f"after timing: {e}"[:500]
                    out["times_ms"].pop(name, None)
        except Exception as e:  # noqa: BLE001
            out["errors"]["timing"] = f"{type(e).__name__}: {e}"[:500]
    from commflow.overlap.autotune import measured_choices

    for choice in measured_choices(OPS[op], *dims):
        name = "auto" if choice.reduction == "fp32" else "auto_backend"
        if name in out["plans"]:
            out["plans"][name].update(decision=choice.decision, n_chunks=choice.n_chunks,
                                      chunk_sizes=list(choice.chunk_sizes), reason=choice.reason,
                                      measured_sequential_ms=choice.measured_sequential_ms,
                                      measured_overlap_ms=choice.measured_overlap_ms, graphed=choice.graphed)
    times = out["times_ms"]
    if "gemm" in times and "comm" in times:
        tg, tc = times["gemm"], times["comm"]
        out["comm_over_gemm"] = tc / tg
        out["eta"] = {k: (tg + tc - t) / min(tg, tc) for k, t in times.items() if k not in ("gemm", "comm")}
    if "sequential" in times:
        out["speedup_vs_sequential"] = {k: times["sequential"] / t for k, t in times.items()
                                        if k not in ("gemm", "comm")}
    return out


def _worker(rows: list[dict], variants: list[str], args_dict: dict, partial_path: str) -> dict:
    os.environ.update(GPU_ENV)
    # Old result files stored --graphs as a flag (True/False), new ones as on/off.
    os.environ["COMMFLOW_OVERLAP_GRAPHS"] = "0" if args_dict.get("graphs") in ("off", False) else "1"
    import torch.distributed as dist

    from commflow.dist import init_distributed
    from commflow.overlap import calibrate, get_calibration

    args = argparse.Namespace(**args_dict)
    info = init_distributed(device=args.device, timeout_s=args.timeout_s)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.no_calibrate:
        cal = get_calibration(info.device, info.world_size)
    else:
        cal = calibrate(device=info.device, dtype=dtype, save=True)
    calibration_s = time.perf_counter() - t0
    done = []
    for i, row in enumerate(rows):
        try:
            res = _measure_row(row, variants, info, dtype, args, cal)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while allocating the row
            res = {**row, "world_size": info.world_size, "row_error": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
        done.append(res)
        if info.device.type == "cuda":
            torch.cuda.empty_cache()  # the row's buffers are gone; keep the next row's allocations clean
        if info.rank == 0:
            with open(partial_path, "a") as f:
                f.write(json.dumps(res) + "\n")
            t = res.get("times_ms", {})
            print(f"[{info.world_size} ranks] {i + 1}/{len(rows)} {row['op']} {row['shape']} M={row['m']}: "
                  + " ".join(f"{k}={v:.3f}" for k, v in t.items())
                  + (f" errors={list(res.get('errors', {}))}" if res.get("errors") else ""), flush=True)
    dist.barrier()
    from commflow.overlap import symm

    return {"world_size": info.world_size, "calibration": cal.to_json(), "calibration_s": calibration_s,
            "symm_unavailable": symm.unavailable_reason(), "symm_workspace_bytes": symm.workspace_bytes(),
            "rows": done}


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def ideal_speedup(row: dict) -> float | None:
    """Perfect overlap at the stand-alone speeds of the row: ``(t_gemm + t_comm) / max(t_gemm, t_comm)``.

    Not a hard ceiling (a transport faster than NCCL's collective, as the copy-engine
    reduce-scatter is on some shapes, can beat it), but the frame a goal sits in: the
    speed-up over sequential if the shorter of GEMM and collective hid entirely behind
    the longer, with neither slowed by the other and no cost for chunking."""
    t = row.get("times_ms", {})
    tg, tc = t.get("gemm"), t.get("comm")
    if not tg or not tc:
        return None
    return (tg + tc) / max(tg, tc)


def summarize(rows: list[dict]) -> dict:
    """Per (op, world size): the goals of issue 8, computed from the rows; beside each variant's
    geomean, the geomean of :func:`ideal_speedup` over the same rows and the share of its log
    gain the variant reached (``log(speed-up) / log(ideal)``)."""
    out = {}
    keys = sorted({(r["op"], r["world_size"]) for r in rows})
    for op, world in keys:
        mine = [r for r in rows if r["op"] == op and r["world_size"] == world and "speedup_vs_sequential" in r]
        main = [r for r in mine if not r["guard"]]
        heavy = [r for r in main if r.get("comm_over_gemm", 0) >= 0.4]
        ideal = _geomean([ideal_speedup(r) for r in main])
        entry = {"rows": len(mine), "comm_heavy_rows": len(heavy), "ideal_geomean_main": ideal}
        for variant in ("auto", "auto_backend", "overlap", "overlap_backend", "overlap_graphed", "torch_fused",
                        "sequential_control"):
            sp = [r["speedup_vs_sequential"].get(variant) for r in main]
            if not any(sp):
                continue
            every = [r["speedup_vs_sequential"].get(variant) for r in mine if variant in r["speedup_vs_sequential"]]
            geo = _geomean(sp)
            entry[variant] = {
                "geomean_speedup_main": geo,
                "share_of_ideal_main": (math.log(geo) / math.log(ideal) if geo and ideal and ideal > 1 else None),
                "geomean_speedup_comm_heavy": _geomean([r["speedup_vs_sequential"].get(variant) for r in heavy]),
                "worst_speedup_all": min(every) if every else None,
                "rows_below_guard": sum(1 for v in every if v < GUARD),
                "eta_comm_heavy_min": min((r["eta"][variant] for r in heavy if variant in r.get("eta", {})),
                                          default=None),
            }
        out[f"{op}/{world}"] = entry
    return out


@register("overlap", "TP GEMM + reduce-scatter / all-reduce / all-gather: sequential vs torch fused vs ours",
          _arguments)
def run(args: argparse.Namespace) -> dict:
    from commflow.dist import spawn

    from .results import RESULTS_DIR

    rows = _rows_plan(args)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    partial = RESULTS_DIR / f"overlap_partial_{stamp}.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    print(f"rows are appended to {partial} as they finish", flush=True)
    results = {"worlds": [], "rows": [], "partial_file": str(partial)}
    for world in (int(v) for v in str(args.nproc).split(",") if v):
        try:
            res = spawn(_worker, world, rows, variants, vars(args), str(partial), backend=None, init=False,
                        timeout_s=args.timeout_s, env=GPU_ENV)[0]
        except Exception as e:  # noqa: BLE001 - keep the other world size's numbers
            results["worlds"].append({"world_size": world, "error": f"{type(e).__name__}: {e}"[-3000:]})
            continue
        results["worlds"].append({k: v for k, v in res.items() if k != "rows"})
        if res.get("symm_unavailable"):
            print(f"[{world} ranks] copy-engine transport unavailable: {res['symm_unavailable']}", flush=True)
        results["rows"].extend(res["rows"])
    results["summary"] = summarize(results["rows"])
    if not any("error" in w for w in results["worlds"]):
        partial.unlink(missing_ok=True)  # everything is in the result file
        results["partial_file"] = None
    for key, entry in results["summary"].items():
        print(key, json.dumps(entry))
    return results


# --- report: JSON -> markdown table + plot ---------------------------------------------

LABELS = {"sequential": "seq", "torch_fused": "torch fused", "auto": "ours auto", "auto_backend": "ours auto (bk)",
          "overlap": "ours forced", "overlap_backend": "ours forced (bk)", "overlap_graphed": "ours forced (graph)",
          "sequential_control": "seq again (noise)"}


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def _source_line(path: Path, record: dict, env: dict) -> str:
    args = record.get("args", {})
    return (f"- `benchmarks/results/{path.name}`: device **{env.get('device')}** x {env.get('gpu_count')}, "
            f"torch {env.get('torch')}, NCCL {env.get('nccl')}, commit {str(env.get('git_commit'))[:10]}, "
            f"{env.get('date_utc')}. Command: `python -m benchmarks overlap "
            + " ".join(f"--{k.replace('_', '-')} {'on' if v is True else v}" for k, v in args.items()
                       if v not in (False, None) and k in ("nproc", "device", "dtype", "iters", "min_time_ms", "warmup", "graphs"))
            + (" --tiny" if args.get("tiny") else "") + "`")


def report(paths: str | Path | list, md_out: str | Path | None = None, img_dir: str | Path | None = None) -> str:
    """Markdown tables (one per op and world size) and one PNG per world size from one
    or more result files (say, a 2-GPU and a 4-GPU run); a world size found in several
    files is taken from the last."""
    plt = pyplot()
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    rows: list[dict] = []
    worlds: list[dict] = []
    sources = []
    env: dict = {}
    for path in paths:
        record, env, res = load_result(path)
        new = {r["world_size"] for r in res["rows"]}
        rows = [r for r in rows if r["world_size"] not in new] + res["rows"]
        worlds += res.get("worlds", [])
        sources.append(_source_line(path, record, env))
    md_out, img_dir = report_paths("overlap", md_out, img_dir)
    lines = [
        "# commflow.overlap: benchmark results",
        "",
        f"Generated by `python -m benchmarks.overlap report {' '.join(p.name for p in paths)}` from:",
        "",
        *sources,
        "",
        "Times in ms (median, slowest rank). Speed-up over sequential in brackets; "
        "eta = (t_gemm + t_comm - t) / min(t_gemm, t_comm). `bk` = backend reduction (NCCL's "
        "reduce-scatter/all-reduce per chunk) instead of the fp32 all-to-all reduction. "
        "Plan: the auto path's decision (`seq`, `ovl/<chunks>`, or `ovl/<chunks>/graph` for a CUDA-graph replay).",
        "",
    ]
    for world_entry in worlds:
        if "error" in world_entry:
            lines += [f"**{world_entry['world_size']} ranks failed:** `{world_entry['error'][:300]}`", ""]
    for op in OPS:
        for world in sorted({r["world_size"] for r in rows if r["op"] == op}):
            sel = [r for r in rows if r["op"] == op and r["world_size"] == world]
            variants = [v for v in LABELS if any(v in r.get("times_ms", {}) for r in sel)]
            lines += [f"## {OPS[op]}, {world} ranks", "",
                      "| shape | M | gemm | comm | comm/gemm | " + " | ".join(LABELS[v] for v in variants)
                      + " | plan | eta auto | errors |",
                      "|---|---|---|---|---|" + "---|" * len(variants) + "---|---|---|"]
            for r in sel:
                t = r.get("times_ms", {})
                sp = r.get("speedup_vs_sequential", {})
                cells = []
                for v in variants:
                    cell = _fmt(t.get(v))
                    if v != "sequential" and v in sp:
                        cell += f" ({sp[v]:.2f}x)"
                    cells.append(cell)
                p = r.get("plans", {}).get("auto", {})
                decision = ("seq" if p.get("decision") == "sequential"
                            else f"ovl/{p.get('n_chunks')}{'/graph' if p.get('graphed') else ''}" if p else "–")
                errs = "; ".join(f"{k}: {v[:80]}" for k, v in r.get("errors", {}).items())
                if "row_error" in r:
                    errs = r["row_error"][:120]
                lines.append(f"| {r['shape']}{' (guard)' if r['guard'] else ''} | {r['m']} | {_fmt(t.get('gemm'))} "
                             f"| {_fmt(t.get('comm'))} | {_fmt(r.get('comm_over_gemm'), '.2f')} | "
                             + " | ".join(cells) + f" | {decision} | {_fmt(r.get('eta', {}).get('auto'), '.2f')} "
                             f"| {errs} |")
            lines.append("")
    lines += ["## Summary (goals of issue 8)", "",
              "`ideal`: the geomean over the same rows of (gemm + comm) / max(gemm, comm), perfect overlap at "
              "the stand-alone speeds; `share`: log(speed-up) / log(ideal).", "",
              "| op / ranks | variant | geomean speed-up (M >= 2048) | ideal | share | geomean (comm-heavy) "
              "| worst (incl. small M) | rows < 0.97x | min eta (comm-heavy) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, entry in summarize(rows).items():
        for variant, s in entry.items():
            if isinstance(s, dict):
                lines.append(f"| {key} | {LABELS.get(variant, variant)} | {_fmt(s['geomean_speedup_main'], '.2f')} | "
                             f"{_fmt(entry['ideal_geomean_main'], '.2f')} | {_fmt(s['share_of_ideal_main'], '.2f')} | "
                             f"{_fmt(s['geomean_speedup_comm_heavy'], '.2f')} | {_fmt(s['worst_speedup_all'], '.2f')} "
                             f"| {s.get('rows_below_guard', '–')} | {_fmt(s['eta_comm_heavy_min'], '.2f')} |")
    lines.append("")
    for world in sorted({r["world_size"] for r in rows}):
        fig, axes = plt.subplots(1, len(OPS), figsize=(6 * len(OPS), 4.5), squeeze=False)
        for ax, op in zip(axes[0], OPS):
            sel = [r for r in rows if r["op"] == op and r["world_size"] == world and "speedup_vs_sequential" in r]
            if not sel:
                ax.set_visible(False)
                continue
            xs = range(len(sel))
            for v in ("torch_fused", "auto", "overlap", "overlap_backend", "auto_backend"):
                ys = [r["speedup_vs_sequential"].get(v, float("nan")) for r in sel]
                if not all(math.isnan(y) for y in ys):
                    ax.plot(xs, ys, marker="o", label=LABELS[v])
            ax.axhline(1.0, color="black", lw=0.8)
            ax.axhline(GUARD, color="red", lw=0.8, ls="--", label="-3%")
            ax.set_xticks(list(xs))
            ax.set_xticklabels([f"{r['shape'].replace('llama3-', '')}\nM={r['m']}" for r in sel], rotation=90,
                               fontsize=7)
            ax.set_ylabel("speed-up over mm + NCCL")
            ax.set_title(f"{OPS[op]}, {world} ranks")
            ax.legend(fontsize=7)
        fig.suptitle(f"commflow.overlap on {env.get('device')} ({', '.join(p.name for p in paths)})", fontsize=9)
        png = img_dir / f"overlap_{world}x.png"
        save_figure(fig, png, dpi=110)
        lines.append(f"![{world} ranks](img/{png.name})")
    return write_markdown(lines, md_out)


def _main(argv: list[str]) -> int:
    return report_main(argv, "overlap", "markdown tables + plots from one or more result JSONs", report, several=True)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
