"""The trainer's throughput and reach: tokens/s, MFU and peak memory per GPU for pure softmax,
hybrid (LASP-2H, "LLLS") and pure linear Linear-Llama, from 32K tokens to the longest
sequence that trains, with every GPU on sequence parallelism (dp = 1, sp = nproc).

Every number is the real trainer (:func:`commflow.train.loop.train`, FSDP2, bf16,
activation checkpointing) on one sequence per step; the step time is the trainer's own
(``step_time_s`` in its metrics.jsonl: wall clock of forward, backward, optimizer step
and the metrics all-reduce, CUDA-synchronised), the median over the timed steps after
``--warmup`` steps. Per configuration every length of ``--seq-lens`` is measured, then
lengths double up to ``--search-max``; a length is tried only if the peak memory
extrapolated from the last two lengths fits the GPU and (beyond the listed lengths) the
extrapolated step time stays under ``--step-budget-s``, so the search ends at an
out-of-memory (measured or predicted), the time budget or the maximum, and says which.

MFU = model FLOPs per step / (step time x GPUs x ``--peak-tflops``), with the FLOPs of
:func:`flops_per_token` (matmuls, causal softmax attention, chunked linear attention).
Recomputation under activation checkpointing is not counted (the usual MFU convention).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from commflow.dist import init_distributed, shutdown, spawn

from .registry import register

ROOT = Path(__file__).resolve().parent.parent

LINEAR_CHUNK = 64
"""Chunk length of the linear-attention kernels (fla's), for the FLOP count."""


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token of a causal sequence.

    * matmul parameters: ``6 N`` (``N`` without the embedding table, output head included);
    * softmax layer: ``QK^T`` and ``AV`` cost ``4 S H hd`` per token forward without a
      mask; causal halves it: ``3 x 2 S H hd``;
    * linear layer (chunked form, chunk ``C``): per head the state update ``k v^T`` and the
      read ``q S`` (``2 hd^2`` each) plus the causal intra-chunk ``QK^T``/``AV`` (``2 C hd``):
      ``3 x H (4 hd^2 + 2 C hd)``.
    """
    n_matmul = model_cfg.num_params(embeddings=False) + model_cfg.vocab_size * model_cfg.d_model
    h, hd = model_cfg.n_heads, model_cfg.head_dim
    n_soft = model_cfg.pattern.count("S")
    n_lin = model_cfg.pattern.count("L")
    attn = n_soft * 3 * 2 * seq_len * h * hd + n_lin * 3 * h * (4 * hd * hd + 2 * LINEAR_CHUNK * hd)
    return 6 * n_matmul + attn


def _gpu_capacity_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)  # CPU tensor: the gloo side of the group
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _trial(flat: dict, out: Path, warmup: int) -> dict:
    """One length of one configuration through the real trainer, on every rank."""
    from commflow.train.config import TrainConfig
    from commflow.train.loop import train

    device = torch.device("cuda", torch.cuda.current_device()) if flat["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    status = "ok"
    try:
        train(TrainConfig.from_flat(out=out, **flat))
    except torch.cuda.OutOfMemoryError:
        status = "oom"
    # Every rank reaches this point when the OOM struck all ranks alike (the shards
    # are the same size); a rank that OOMs alone leaves its peers in a collective
    # until the group timeout, which fails the whole run (reported by spawn).
    failed = _max_over_ranks(1.0 if status != "ok" else 0.0)
    peak = _max_over_ranks(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = {"status": "oom" if failed else "ok", "peak_mem_gib": peak if device.type == "cuda" else None}
    if not failed and dist.get_rank() == 0:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = records[warmup:] or records
        row["step_time_s"] = statistics.median(r["step_time_s"] for r in timed)
        row["comm_frac"] = statistics.median(r["comm_frac"] for r in timed)
        row["timed_steps"] = len(timed)
    box = [row]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _log_kernel_loads() -> None:
    """Print every Triton kernel load (rank, time, thread, kernel): a first load beside an
    in-flight collective can hang all ranks (commflow.sp.lasp2.prime_kernels), and this
    log says which kernel loaded where."""
    import sys
    import threading

    try:
        from triton import knobs
    except ImportError:
        return
    t0, rank = time.perf_counter(), os.environ.get("RANK", "?")

    def hook(module, function, name, metadata_group, hash, **_):
        print(f"[kernel load] rank {rank} t={time.perf_counter() - t0:.1f}s thread={threading.current_thread().name} "
              f"{name} {str(hash)[:12]}", file=sys.stderr, flush=True)

    knobs.runtime.kernel_load_start_hook = hook


def _worker(opts: dict) -> list[dict]:
    import contextlib
    import faulthandler
    import sys

    # A silent GPU run is a lost run: every rank dumps its stacks to stderr if a trial
    # runs longer than this (the first 4xH100 attempt printed nothing in 235 s).
    faulthandler.dump_traceback_later(opts["stack_every_s"], repeat=True, file=sys.stderr)
    if opts["device"] == "cuda":
        _log_kernel_loads()
    tune = contextlib.nullcontext()
    if opts["device"] == "cuda":
        from commflow.sp import linear_triton

        # fla's and commflow's Triton autotuners would otherwise time every configuration
        # (up to 48 compiles per kernel and shape) inside the first training steps.
        tune = linear_triton.autotune_mode(opts["autotune"])
    try:
        with tune:
            return _trials(opts)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _trials(opts: dict) -> list[dict]:
    from commflow.train.config import PRESETS, TrainConfig, resolve_model

    info = init_distributed(device=opts["device"], timeout_s=opts["timeout_s"])
    if info.device.type == "cuda":
        from commflow.sp import linear_triton
        from commflow.sp.linear_kernels import fla_available

        # commflow's linear-attention kernel self-checks, agreed by every rank up front; a
        # run of softmax-only patterns has no linear layer and skips them (Triton compiles).
        if fla_available() and any("L" in pattern for pattern in opts["patterns"]):
            with linear_triton.autotune_mode("off"):
                hd = PRESETS[opts["preset"]].shape.head_dim
                linear_triton.prime(info.device, getattr(torch, opts["dtype"]), hd, hd, 64)
    world, device = info.world_size, info.device
    capacity = _gpu_capacity_gib(device)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="commflow-bench-train-")) if info.rank == 0 else None
    box = [tmp]
    dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    for pattern in opts["patterns"]:
        done: list[dict] = []
        # The preset's depth, rounded up to a multiple of the pattern (tiny's 2 layers -> 4 for LLLS).
        depth = PRESETS[opts["preset"]].shape.n_layers
        layers = -(-depth // len(pattern)) * len(pattern)
        lengths = sorted(opts["seq_lens"])
        seq = lengths[0]
        while seq <= opts["search_max"]:
            base = {
                "preset": opts["preset"], "pattern": pattern, "layers": layers, "seq_len": seq, "batch": 1, "dp": 1, "sp": world,
                "softmax_sp": opts["softmax_sp"], "dp_mode": opts["dp_mode"], "device": opts["device"],
                "dtype": opts["dtype"], "activation_checkpoint": opts["activation_checkpoint"],
                "mqar_vocab": opts["vocab"], "mqar_pairs": min(256, seq // 8, opts["vocab"] // 4), "steps": opts["warmup"] + opts["steps"],
                "warmup": 1, "log_every": 1, "eval_batches": 0, "ckpt_every": 0, "progress": False,
            }
            model_cfg = resolve_model(TrainConfig.from_flat(**base))
            row = {"pattern": pattern, "seq_len": seq, "params": model_cfg.num_params()}
            required = seq <= lengths[-1]  # the listed lengths are measured unless memory rules them out
            t_pred, skip = _predict(done, seq, opts["step_budget_s"], capacity, required=required)
            if skip:
                row["status"] = skip
                rows.append(row)
                break
            if t_pred is not None and t_pred > opts["long_step_s"]:
                base["steps"] = opts["warmup"] + 1  # one timed step where a step is long
            t0 = time.perf_counter()
            if info.rank == 0:
                print(f"# {pattern} seq {seq}: {base['steps']} steps ...", flush=True)
            row.update(_trial(base, tmp / f"{pattern}_{seq}", opts["warmup"]))
            row["wall_s"] = time.perf_counter() - t0
            if row["status"] == "ok":
                step = row["step_time_s"]
                row["tokens_per_s"] = seq / step
                fl = flops_per_token(model_cfg, seq) * seq
                row["tflops_per_gpu"] = fl / step / world / 1e12
                row["mfu"] = row["tflops_per_gpu"] / opts["peak_tflops"] if opts["peak_tflops"] else None
                done.append(row)
            rows.append(row)
            if info.rank == 0:
                print(json.dumps(row), flush=True)
            if row["status"] != "ok":
                break
            nxt = [n for n in lengths if n > seq]
            seq = nxt[0] if nxt else seq * 2
        else:
            rows.append({"pattern": pattern, "seq_len": seq, "status": "skipped: above --search-max"})
    shutdown(clean=True)
    return rows


def _predict(done: list[dict], seq: int, budget_s: float, capacity_gib: float | None, *,
             required: bool) -> tuple[float | None, str | None]:
    """Extrapolate length ``seq`` from the last two measured: step time as a power law,
    peak memory linearly. Returns (predicted step time, reason to skip or None)."""
    if len(done) < 2:
        return None, None
    a, b = done[-2], done[-1]
    # step time ~ c S^p, p fitted on the last two lengths (1 for linear work, -> 2 as
    # softmax attention dominates); never below 1, since short runs are overhead-bound.
    p = math.log(b["step_time_s"] / a["step_time_s"]) / math.log(b["seq_len"] / a["seq_len"])
    t_pred = b["step_time_s"] * (seq / b["seq_len"]) ** max(1.0, p)
    if capacity_gib and a["peak_mem_gib"] is not None:
        slope = (b["peak_mem_gib"] - a["peak_mem_gib"]) / (b["seq_len"] - a["seq_len"])
        m_pred = b["peak_mem_gib"] + slope * (seq - b["seq_len"])
        if m_pred > 0.92 * capacity_gib:
            return t_pred, f"skipped: predicted peak {m_pred:.0f} GiB > 92% of {capacity_gib:.0f} GiB (out of memory)"
    if not required and t_pred > budget_s:
        return t_pred, f"skipped: predicted step {t_pred:.0f} s > --step-budget-s {budget_s:.0f}"
    return t_pred, None


def _arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() if cuda else 2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--preset", default="350m" if cuda else "tiny")
    p.add_argument("--patterns", default="S,LLLS,L", help="comma-separated layer patterns")
    p.add_argument("--seq-lens", default="32768,131072,524288" if cuda else "256,512",
                   help="lengths always measured (comma-separated); the search doubles beyond the last")
    p.add_argument("--search-max", type=int, default=4 * 2**20 if cuda else 2048)
    p.add_argument("--step-budget-s", type=float, default=30.0, help="skip lengths predicted to take longer per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per length")
    p.add_argument("--long-step-s", type=float, default=10.0,
                   help="time a single step at lengths predicted to take longer than this per step")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--autotune", choices=["off", "limited", "full"], default="limited",
                   help="Triton autotuning of new kernel keys on GPU (limited: at most 8 configurations each)")
    p.add_argument("--stack-every-s", type=float, default=120.0,
                   help="every rank dumps its stacks to stderr this often while the run goes on")
    p.add_argument("--softmax-sp", default="allgather", choices=["allgather", "ulysses", "ring"])
    p.add_argument("--dp-mode", default="fsdp", choices=["ddp", "fsdp"])
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--no-activation-checkpoint", action="store_true")
    p.add_argument("--vocab", type=int, default=32768 if cuda else 256)
    p.add_argument("--peak-tflops", type=float, default=989.0 if cuda else 0.0,
                   help="dense bf16 peak per GPU for MFU (H100 SXM: 989)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout (bounds a one-rank OOM hang)")


@register("train", "trainer tokens/s, MFU, peak memory and longest context: softmax vs LLLS vs linear", _arguments)
def run(args: argparse.Namespace) -> dict:
    opts = {
        "device": args.device, "preset": args.preset, "patterns": args.patterns.split(","),
        "seq_lens": [int(s) for s in args.seq_lens.split(",")], "search_max": args.search_max,
        "step_budget_s": args.step_budget_s, "steps": args.steps, "warmup": args.warmup,
        "long_step_s": args.long_step_s,
        "softmax_sp": args.softmax_sp, "dp_mode": args.dp_mode, "dtype": args.dtype,
        "activation_checkpoint": not args.no_activation_checkpoint, "vocab": args.vocab,
        "peak_tflops": args.peak_tflops, "timeout_s": args.timeout_s,
        "autotune": args.autotune, "stack_every_s": args.stack_every_s,
    }
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           # Compiled kernels on disk in the tree (git-ignored): a later call, or a later
           # device session that carries runs/triton-cache, skips the compiles.
           "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR", str(ROOT / "runs" / "triton-cache"))}
    rows = spawn(_worker, args.nproc, opts, backend=None, init=False, timeout_s=3600, env=env)[0]
    longest = {}
    for pattern in opts["patterns"]:
        ok = [r for r in rows if r["pattern"] == pattern and r["status"] == "ok"]
        stop = [r for r in rows if r["pattern"] == pattern and r["status"] != "ok"]
        longest[pattern] = {"seq_len": max((r["seq_len"] for r in ok), default=None),
                            "stopped_by": stop[0]["status"] if stop else None}
    print(f"{'pattern':>8} {'seq':>9} {'status':>6} {'step s':>8} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6}")
    for r in rows:
        if r["status"] == "ok":
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            print(f"{r['pattern']:>8} {r['seq_len']:>9} {'ok':>6} {r['step_time_s']:>8.3f} {r['tokens_per_s']:>10,.0f} "
                  f"{r['tflops_per_gpu']:>8.1f} {mfu:>6} {mem:>6}")
        else:
            print(f"{r['pattern']:>8} {r['seq_len']:>9} {r['status']}")
    return {"nproc": args.nproc, "rows": rows, "longest": longest}
