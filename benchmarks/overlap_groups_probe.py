"""Probe: the copy-engine schedules on two ranks with 1, 2, 4 and 8 row groups.

Not a registered benchmark: ``python -m benchmarks.overlap_groups_probe --out DIR``.
GEMM + all-reduce and GEMM + reduce-scatter (``commflow.overlap.symm``, eager) beside
sequential (``torch.mm`` + ``dist.all_reduce``) and the GEMM alone, 10 samples of 4
calls (``commflow.overlap.autotune.sample_ms``), slowest rank; then a CUDA kernel timeline of
three calls of the two-group all-reduce at Llama-3 70B attention output, M = 16384
(rank 0). Writes ``DIR/groups_probe.json`` and ``DIR/groups_profile.txt``. Session 7
used it to see where the accumulate schedule's all-reduce loses time (docs/overlap.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = [("70b-attn", 8192, 8192, 16384), ("8b-attn", 4096, 4096, 16384), ("70b-attn", 8192, 8192, 4096)]


def _worker(out_dir: str) -> int:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.timing import max_over_ranks
    from commflow.dist import init_distributed
    from commflow.overlap import symm
    from commflow.overlap.autotune import sample_ms
    from commflow.overlap.validate import check_group

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    g = check_group(None, dev)
    rows = []
    for name, big_k, n, m in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(3 + info.rank)
        x = torch.randn(m, big_k // world, device=dev, generator=gen).to(torch.bfloat16)
        w = (torch.randn(big_k // world, n, device=dev, generator=gen) / math.sqrt(big_k)).to(torch.bfloat16)

        def sequential(x=x, w=w):
            y = torch.mm(x, w)
            dist.all_reduce(y)
            return y

        fns = {"seq": sequential, "gemm": lambda x=x, w=w: torch.mm(x, w)}
        for groups in (1, 2, 4, 8):
            sizes = tuple([m // world // groups] * groups)
            fns[f"ar_g{groups}"] = lambda s=sizes, x=x, w=w: symm.matmul_all_reduce(x, w, g, s)
            fns[f"rs_g{groups}"] = lambda s=sizes, x=x, w=w: symm.matmul_reduce_scatter(x, w, g, s)
        with torch.no_grad():
            for fn in fns.values():
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            timed = sample_ms(list(fns.values()), iters=10, calls=4, device=dev)
        row = {"shape": name, "M": m, **{k: max_over_ranks(t[0]) for k, t in zip(fns, timed)},
               **{k + "_host_us": max_over_ranks(t[1]) for k, t in zip(fns, timed)}}
        rows.append(row)
    big_k, n, m = 8192, 8192, 16384
    x = torch.randn(m, big_k // world, device=dev).to(torch.bfloat16)
    w = (torch.randn(big_k // world, n, device=dev) / math.sqrt(big_k)).to(torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            symm.matmul_all_reduce(x, w, g, (m // 4, m // 4))
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                symm.matmul_all_reduce(x, w, g, (m // 4, m // 4))
            torch.cuda.synchronize()
    if info.rank == 0:
        events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
        t0 = events[0].time_range.start
        lines = [f"{e.time_range.start - t0:9.1f} {e.time_range.end - e.time_range.start:8.1f} us  {e.name[:90]}"
                 for e in events]
        with open(os.path.join(out_dir, "groups_profile.txt"), "w") as fh:
            fh.write("\n".join(lines[:200]))
        with open(os.path.join(out_dir, "groups_probe.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    dist.barrier()
    return 0


def main(argv=None) -> int:
    from commflow.dist import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for groups_probe.json and groups_profile.txt")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    spawn(_worker, 2, os.path.abspath(args.out), backend=None, init=False, timeout_s=300, env=ENV)
    return 0


if __name__ == "__main__":
    sys.exit(main())
