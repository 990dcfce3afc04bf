"""Where LASP-2's time goes next to the local kernel: a per-kernel profile, not a timing.

The sweep (``benchmarks lasp2``) reports LASP-2 at 0.80 of the 1-GPU local kernel at 256K
tokens on 4 H100 although both run the same number of chunk passes. This runs each
method at one length on every rank, times ``--iters`` calls per rank (CUDA events, no
barrier inside the timed loop, so a rank that waits at the all-gather shows it) and
profiles ``--profile-iters`` more on ranks 0 and W-1 with ``torch.profiler``: the
GPU time of every kernel name, summed over the profiled calls and divided by their
number (ms per call), so the two methods' kernel lists can be compared line by line.

    python -m benchmarks lasp2_profile --nproc 4 --seq 262144          # CUDA; ~1-2 minutes
    python -m benchmarks lasp2_profile --device cpu --nproc 2 --seq 1024 --heads 2 --head-dim 16   # CPU smoke
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from commflow.dist import init_distributed, shutdown, spawn

from .registry import register
from .timing import time_ms

__all__ = ["run"]

_METHODS = ("local", "lasp2", "lasp2-overlap")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: every GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, default=262144, help="total tokens (split over the ranks)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decay", choices=["none", "gamma", "g"], default="g")
    p.add_argument("--methods", default=",".join(_METHODS), help=f"subset of {','.join(_METHODS)}")
    p.add_argument("--backend", default=None, help="linear kernels: fla, fla-only, torch (default: auto)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="kernels kept per method and phase")
    p.add_argument("--autotune", choices=["off", "limited", "full"], default="limited",
                   help="Triton autotuning of new keys (fla's and commflow's kernels), as in benchmarks lasp2")


def _kernel_table(prof, calls: int, top: int) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0.0)
        cpu_us = e.self_cpu_time_total
        if dev_us <= 0 and cpu_us <= 0:
            continue
        rows.append({"name": e.key[:120], "count_per_call": e.count / calls, "device_ms_per_call": dev_us / 1e3 / calls,
                     "cpu_ms_per_call": cpu_us / 1e3 / calls})
    key = "device_ms_per_call" if any(r["device_ms_per_call"] > 0 for r in rows) else "cpu_ms_per_call"
    rows.sort(key=lambda r: -r[key])
    return rows[:top]


def _worker(cfg: dict) -> dict:
    from commflow.sp import linear_triton

    with linear_triton.autotune_mode(cfg["autotune"]):
        return _profile(cfg)


def _profile(cfg: dict) -> dict:
    from commflow.sp.linear_kernels import select_kernels

    from .lasp2 import _inputs, _linear_method, _step_fn

    t0 = time.perf_counter()
    info = init_distributed()
    rank, world, dev = info.rank, info.world_size, info.device
    cuda = dev.type == "cuda"
    kernels = select_kernels(dev, backend=cfg["backend"])
    if kernels.name == "fla":  # commflow's Triton self-checks, agreed by every rank before the first call
        from commflow.sp import linear_triton

        with linear_triton.autotune_mode("off"):
            linear_triton.prime(dev, torch.bfloat16, cfg["head_dim"], cfg["head_dim"], 64)
    leaves, g_gamma, do = _inputs(1, cfg["seq"] // world, cfg["heads"], cfg["head_dim"], cfg["decay"],
                                  torch.bfloat16 if cuda else torch.float32, dev, seed=1234 + rank)
    out = {"rank": rank, "backend": kernels.name, "methods": {}}
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for method in cfg["methods"]:
        for phase in ("fwd", "fwd+bwd"):
            if rank == 0:
                print(f"[{time.perf_counter() - t0:7.1f}s] {method}/{phase}", flush=True)
            run = _step_fn(_linear_method(method, kernels), leaves, g_gamma, do, backward=phase == "fwd+bwd")
            t = time_ms(run, warmup=cfg["warmup"], iters=cfg["iters"], device=dev, barrier=True)
            entry = {"ms_median": t["median_ms"], "ms_min": t["min_ms"]}
            dist.barrier()
            if rank in (0, world - 1) and cfg["profile_iters"] > 0:
                with torch.profiler.profile(activities=activities) as prof:
                    for _ in range(cfg["profile_iters"]):
                        run()
                    if cuda:
                        torch.cuda.synchronize()
                entry["kernels"] = _kernel_table(prof, cfg["profile_iters"], cfg["top"])
            else:  # the peers still run the calls: the profiled ranks' collectives need them
                for _ in range(cfg["profile_iters"]):
                    run()
                if cuda:
                    torch.cuda.synchronize()
            out["methods"][f"{method}/{phase}"] = entry
            dist.barrier()
    shutdown(clean=True)
    return out


@register("lasp2_profile", "per-kernel GPU time of LASP-2 vs the local kernel at one length", _arguments)
def run(args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs CUDA GPUs")
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in _METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(_METHODS)}")
    if args.seq % nproc:
        raise SystemExit(f"--seq {args.seq} must be divisible by --nproc {nproc}")
    cfg = {"seq": args.seq, "heads": args.heads, "head_dim": args.head_dim, "decay": args.decay,
           "methods": methods, "backend": args.backend, "warmup": args.warmup, "iters": args.iters,
           "profile_iters": args.profile_iters, "top": args.top, "autotune": args.autotune}
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    per_rank = spawn(_worker, nproc, cfg, backend=None if cuda else "gloo", init=False, timeout_s=900, env=env)
    for r in per_rank:
        for key, entry in r["methods"].items():
            print(f"rank {r['rank']} {key:22s} median {entry['ms_median']:8.3f} ms  min {entry['ms_min']:8.3f} ms")
            for k in entry.get("kernels", [])[:12]:
                print(f"      {k['device_ms_per_call']:8.3f} ms dev {k['cpu_ms_per_call']:8.3f} ms cpu "
                      f"x{k['count_per_call']:.0f}  {k['name']}")
    return {"config": {**cfg, "nproc": nproc, "device": args.device}, "per_rank": per_rank}
