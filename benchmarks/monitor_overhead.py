"""commflow.monitor: what tracing costs a training step (goal: < 1 %).

Each rank trains two copies of the same model, alternating single steps: one plain
(no tracer, DDP's built-in all-reduce), one watched (``commflow.monitor.watch`` with
the reporter thread streaming to a live coordinator in the launching process, DDP's
all-reduce through the traced comm hook). Alternating steps cancel drift (other load,
clocks); the overhead is median(watched step) / median(plain step) - 1 per rank, the
slowest rank's reported. A second number is the tracer's own cost per call, in a
world of one (no peers, no network: only the wrapper's CPU time), best of 5 rounds of
``--calls`` small all-reduces, with and without the tracer; multiplied by the calls
per step it bounds the overhead from below on any machine.

Workloads: ``ddp`` (default) a stack of ``nn.TransformerEncoderLayer`` under DDP;
``train`` ``commflow train``'s own ``train()`` loop, one run whose steps alternate
between plain and watched (the tracer put in or taken out between steps, ABBA order,
after ``TRAIN_WARMUP_STEPS``; ``--steps x --blocks`` steps of each; ``--train-args
"preset=small,seq_len=4096,..."``).

    python -m benchmarks monitor_overhead --device cpu --nproc 4
    python -m benchmarks monitor_overhead --device cuda --nproc 4 --d-model 2048 --layers 8 --seq 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from .registry import register

CPU_TRAIN_ARGS = "preset=tiny,seq_len=64,batch=8"
CUDA_TRAIN_ARGS = "preset=350m,pattern=S,seq_len=32768,batch=1,dp=1,device=cuda,dtype=bfloat16,mqar_vocab=32768"
"""One 32K sequence per step on sequence parallelism over every GPU (the trainer's default
global batch of 32 sequences of 32K does not fit: 77 GiB and out of memory on an H100)."""


def _arguments(p: argparse.ArgumentParser) -> None:
    import torch

    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--workload", choices=["ddp", "train"], default="ddp")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    p.add_argument("--blocks", type=int, default=6, help="blocks per variant (alternating)")
    p.add_argument("--calls", type=int, default=2000, help="tiny all-reduces for the per-call cost")
    p.add_argument("--poll-s", type=float, default=0.05,
                   help="the reporter's completion-poll period while calls are in flight (watch(poll_interval=))")
    p.add_argument("--tracer-events", action="store_true",
                   help="time async CUDA collectives with the tracer's events, not NCCL's (watch(nccl_timing=False))")
    p.add_argument("--report-s", type=float, default=0.1, help="the reporter's report period (watch(interval=))")
    p.add_argument("--train-args", default=None,
                   help="workload=train: TrainConfig fields, comma separated key=value (default: "
                        f"{CPU_TRAIN_ARGS!r} on CPU, {CUDA_TRAIN_ARGS!r} on CUDA)")


def _watch(monitor, args: argparse.Namespace, endpoint: str):
    """``monitor.watch()`` with the reporter and CUDA-mark settings of the command line."""
    return monitor.watch(endpoint, interval=args.report_s, poll_interval=args.poll_s,
                         nccl_timing=not args.tracer_events)


def _step_fn(model, opt, x, cuda: bool):
    import torch

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def _ddp_worker(args: argparse.Namespace, endpoint: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch import nn

    from commflow import monitor
    from commflow.dist import init_distributed

    cuda = args.device == "cuda"
    info = init_distributed(device=args.device)
    dev, rank = info.device, info.rank
    dtype = torch.bfloat16 if cuda else torch.float32

    def build():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(args.d_model, max(1, args.d_model // 64), 4 * args.d_model,
                                           batch_first=True, dropout=0.0)
        return nn.TransformerEncoder(layer, args.layers).to(dev, dtype)

    x = torch.randn(args.batch, args.seq, args.d_model, device=dev, dtype=dtype)
    plain = nn.parallel.DistributedDataParallel(build())  # built before watch(): no hook, untraced
    plain_step = _step_fn(plain, torch.optim.SGD(plain.parameters(), lr=1e-4), x, cuda)
    tracer = _watch(monitor, args, endpoint)
    watched = nn.parallel.DistributedDataParallel(build())
    watched_step = _step_fn(watched, torch.optim.SGD(watched.parameters(), lr=1e-4), x, cuda)
    for _ in range(3):  # warm-up both (the comm hook is installed on the first forward)
        watched_step()
    tracer.uninstall()
    for _ in range(3):
        plain_step()
    times = {"plain": [], "watched": []}
    # Alternate single steps (the patching happens between them, untimed): load on a
    # shared machine drifts on the scale of seconds, and this cancels it.
    for _ in range(args.blocks * args.steps):
        for variant, fn in (("plain", plain_step), ("watched", watched_step)):
            if variant == "watched":
                tracer.install()
            dist.barrier()
            times[variant].append(fn())
            if variant == "watched":
                tracer.uninstall()
    # Per-call cost: tiny all-reduces, plain then traced.
    t = torch.ones(1, device=dev)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        dist.all_reduce(t)
    plain_call = (time.perf_counter() - t0) / args.calls
    tracer.install()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        dist.all_reduce(t)
    if cuda:
        torch.cuda.synchronize()
    traced_call = (time.perf_counter() - t0) / args.calls
    records = tracer.calls
    monitor.unwatch()
    return {"rank": rank, "plain_ms": statistics.median(times["plain"]) * 1e3,
            "watched_ms": statistics.median(times["watched"]) * 1e3,
            "plain_call_us": plain_call * 1e6, "traced_call_us": traced_call * 1e6, "records": records}


TRAIN_WARMUP_STEPS = 3
"""Untimed first steps of the train workload (compile, autotune, allocator, NCCL)."""


def watched_schedule(step: int, warmup: int) -> bool:
    """Whether training step ``step`` (0-based) runs watched: plain during the warm-up,
    then pairs in ABBA order (plain/watched, watched/plain, ...), so a drift over the
    run, linear in steps, favours neither variant."""
    if step < warmup:
        return False
    i = step - warmup
    return (i % 2 == 1) != ((i // 2) % 2 == 1)


def _train_worker(args: argparse.Namespace, endpoint: str) -> dict | None:
    import json
    import tempfile

    import commflow.monitor as monitor
    from commflow.train.config import TrainConfig
    from commflow.train.loop import train

    spec = args.train_args or (CUDA_TRAIN_ARGS + f",sp={args.nproc}" if args.device == "cuda" else CPU_TRAIN_ARGS)
    flat = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    flat = {k: (int(v) if v.isdigit() else v) for k, v in flat.items()}
    flat["steps"] = TRAIN_WARMUP_STEPS + 2 * args.steps * args.blocks
    out_dir = Path(tempfile.mkdtemp(prefix="cf-ovh-"))
    cfg = TrainConfig.from_flat(**flat, out=out_dir, progress=False, ckpt_every=0, eval_batches=0, log_every=1)
    # One run; the trainer calls monitor.step() before each step's timer starts, and there
    # the tracer is put in (watched) or taken out (plain): the same process, model, data
    # and allocator state for both variants, step by step.
    tracer = _watch(monitor, args, endpoint)
    real_step = monitor.step

    def alternating_step(step: int) -> int:
        if watched_schedule(step, TRAIN_WARMUP_STEPS):
            tracer.install()
        else:
            tracer.uninstall()
        return real_step(step)

    monitor.step = alternating_step
    try:
        train(cfg)
    finally:
        monitor.step = real_step
        monitor.unwatch()
    rank = int(os.environ["RANK"])
    if rank != 0:  # only rank 0 writes metrics.jsonl; its step times are the synchronised ones
        return None
    times: dict[str, list[float]] = {"plain": [], "watched": []}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step_time_s" in rec and rec["step"] > TRAIN_WARMUP_STEPS:  # metrics number a step after it ran
            times["watched" if watched_schedule(rec["step"] - 1, TRAIN_WARMUP_STEPS) else "plain"].append(
                rec["step_time_s"])
    watched_steps = sum(watched_schedule(s, TRAIN_WARMUP_STEPS) for s in range(flat["steps"]))
    return {"rank": rank, "plain_ms": statistics.median(times["plain"]) * 1e3,
            "watched_ms": statistics.median(times["watched"]) * 1e3, "steps": {k: len(v) for k, v in times.items()},
            # calls traced per watched step: x the per-call cost = the wrapper's share
            "traced_calls_per_step": tracer.calls / max(1, watched_steps),
            # of which timed by NCCL itself (async CUDA collectives; 0 if the switch did not take)
            "nccl_timed_calls_per_step": tracer.nccl_timed_calls / max(1, watched_steps),
            "step_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()}}


def _per_call_cost(calls: int, device: str = "cpu", nccl_timing: bool = True) -> dict:
    """The tracer's own host time per call: a world of one (no network, no peers to wait
    for), the same small all-reduce with and without the wrapper, best of 5 rounds. On
    CUDA (NCCL) this includes the two CUDA events of a blocking call."""
    import torch
    import torch.distributed as dist

    from commflow.monitor.trace import Tracer

    t = torch.ones(16, device=device)
    tracer = Tracer(rank=0, nccl_timing=nccl_timing)

    def timed() -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                dist.all_reduce(t)
            best = min(best, (time.perf_counter() - t0) / calls)
        return best

    plain = timed()
    tracer.install()
    try:
        traced = timed()
    finally:
        tracer.uninstall()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"plain_us": plain * 1e6, "traced_us": traced * 1e6, "cost_us": (traced - plain) * 1e6}


def run(args: argparse.Namespace) -> dict:
    from commflow.dist import spawn
    from commflow.monitor import Coordinator

    # In a world of one of its own (spawn builds and tears down the group).
    per_call = spawn(_per_call_cost, 1, args.calls, backend="gloo", timeout_s=600)[0]
    per_call_cuda = None
    if args.device == "cuda":  # the path a GPU job's blocking calls take: NCCL, two CUDA events
        per_call_cuda = spawn(_per_call_cost, 1, args.calls, "cuda", not args.tracer_events,
                              backend="nccl", timeout_s=600)[0]

    with Coordinator() as coord:
        fn = _ddp_worker if args.workload == "ddp" else _train_worker
        per_rank = spawn(fn, args.nproc, args, coord.endpoint, backend=None, init=False, timeout_s=3600)
        per_rank = [r for r in per_rank if r is not None]  # train workload: rank 0 only
        verdicts = [v.to_json() for v in coord.verdicts]
    worst = max(per_rank, key=lambda r: r["watched_ms"] / r["plain_ms"])
    out = {
        "per_rank": per_rank,
        "plain_step_ms": worst["plain_ms"],
        "watched_step_ms": worst["watched_ms"],
        "overhead_pct": 100.0 * (worst["watched_ms"] / worst["plain_ms"] - 1.0),
        "verdicts_during_run": verdicts,
        "per_call_world1": per_call,
        "per_call_world1_cuda": per_call_cuda,
    }
    if "plain_call_us" in worst:
        out["per_call_overhead_us"] = max(r["traced_call_us"] - r["plain_call_us"] for r in per_rank)
    if "traced_calls_per_step" in worst:
        # The wrapper's host time per step as a share of the step (world-of-one cost per
        # call, on CUDA with its marks): what the overhead would be were the host the bottleneck.
        cost_us = (per_call_cuda or per_call)["cost_us"]
        out["wrapper_share_pct"] = 100.0 * worst["traced_calls_per_step"] * cost_us / 1e3 / worst["plain_ms"]
    return out


register("monitor_overhead", "commflow.monitor: tracing overhead on a training step (goal < 1 %)",
         _arguments)(run)
