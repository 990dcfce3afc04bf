"""Collective bus bandwidth (the nccl-tests definitions), the yardstick for every
communication-bound number elsewhere.

For a buffer of ``size`` bytes (the full tensor: all-reduce's buffer, all-gather's
output, reduce-scatter's input, all-to-all's send buffer) on ``n`` ranks:
``algbw = size / t`` and ``busbw = algbw * f`` with ``f = 2(n-1)/n`` for all-reduce
and ``(n-1)/n`` for the others, so busbw is comparable to the link speed.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from commflow.dist import all_gather_tensor, init_distributed, reduce_scatter_tensor, spawn

from .registry import register
from .timing import max_over_ranks, time_ms

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}


def _call(op: str, full: torch.Tensor, part: torch.Tensor, out: torch.Tensor):
    return {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: all_gather_tensor(out, part),
        "reduce_scatter": lambda: reduce_scatter_tensor(part, full),
        "all_to_all": lambda: dist.all_to_all_single(out, full),
    }[op]


def _worker(ops: list[str], sizes_mib: list[float], dtype: str, device: str, iters: int) -> list[dict]:
    info = init_distributed(device=device)
    n, dev = info.world_size, info.device
    dt = getattr(torch, dtype)
    rows = []
    for size_mib in sizes_mib:
        numel = int(size_mib * 2**20) // dt.itemsize // n * n
        full = torch.randn(numel, device=dev).to(dt)
        part = torch.empty(numel // n, device=dev, dtype=dt)
        out = torch.empty_like(full)
        for op in ops:
            t = time_ms(_call(op, full, part, out), warmup=3, iters=iters, device=dev, barrier=True)
            ms = max_over_ranks(t["median_ms"])
            algbw = numel * dt.itemsize / (ms / 1e3) / 1e9
            rows.append({"op": op, "size_mib": size_mib, "time_ms": ms, "algbw_gbps": algbw,
                         "busbw_gbps": algbw * BUS_FACTOR[op](n)})
    return rows


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter,all_to_all")
    p.add_argument("--sizes-mib", default="1,16,256", help="comma-separated buffer sizes in MiB")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)


@register("collectives", "bus bandwidth of all-reduce / all-gather / reduce-scatter / all-to-all", _arguments)
def run(args: argparse.Namespace) -> dict:
    ops = args.ops.split(",")
    unknown = set(ops) - set(BUS_FACTOR)
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; choose from {sorted(BUS_FACTOR)}")
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    rows = spawn(_worker, args.nproc, ops, sizes, args.dtype, args.device, args.iters,
                 backend=None, init=False, timeout_s=600)[0]
    for r in rows:
        print(f"{r['op']:>15} {r['size_mib']:>8.1f} MiB  {r['time_ms']:9.3f} ms  busbw {r['busbw_gbps']:8.2f} GB/s")
    return {"nproc": args.nproc, "rows": rows}
