"""Probe: does the overlap autotune time the plain path the way the benchmark does?

Not a registered benchmark (``python -m benchmarks.overlap_autotune_probe --out FILE``).
In session 7's overlap runs (docs/overlap.md, runs 5 and 6) the autotune kept a graphed
overlap on 0.1-0.16 ms shapes after timing the plain path (mm + NCCL) 20-30 % slower
than the benchmark later measured it. For a few such shapes this times the entry's own
plain path and the graphed one-group overlap under both protocols, each alone and in
alternation, once right after two warm-up calls (as the autotune does at a shape's
first call) and once after many:

* ``autotune``: :func:`commflow.overlap.autotune._time_ms` (4 calls per sample; since
  session 10 the benchmark's own sampler, so this column and ``bench`` differ only by
  run-to-run spread);
* ``barrier``: the same with ``dist.barrier`` as the line-up (the autotune before session
  10; session 7's 2-GPU file has it under ``autotune_*``);
* ``bench``: ``commflow.overlap.autotune.sample_ms`` (all-reduce + sync, 4 calls per sample).

Medians in ms per call, slowest rank; host microseconds per call for the bench protocol.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
CASES = [  # (op, name, K global, N, M)
    ("ag", "70b-attn", 8192, 8192, 128),
    ("ag", "70b-attn", 8192, 8192, 256),
    ("ag", "70b-attn", 8192, 8192, 512),
    ("ag", "8b-attn", 4096, 4096, 2048),
    ("rs", "70b-attn", 8192, 8192, 128),
]


def _time_after_barrier(fns, dev, rounds: int, reps: int = 4) -> list[float]:
    """The autotune's timing before session 10: ``dist.barrier`` before every sample."""
    import random
    import statistics

    import torch.distributed as dist

    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns)))
        random.Random(r).shuffle(order)
        for i in order:
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fns[i]()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / reps)
    return [statistics.median(t) for t in times]


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks
    from commflow.dist import init_distributed
    from commflow.overlap import functional, ops, plan
    from commflow.overlap.autotune import _time_ms, sample_ms
    from commflow.overlap.validate import check_group

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    g = check_group(None, dev)
    rows_out = []
    for op, name, big_k, n, m in CASES:
        gen = torch.Generator(device=dev).manual_seed(7 + info.rank)
        if op == "ag":
            x = torch.randn(m // world, n, device=dev, generator=gen).to(torch.bfloat16)
            w = (torch.randn(n, big_k // world, device=dev, generator=gen) / math.sqrt(n)).to(torch.bfloat16)
            plain = functional._plain_ag(x, g, 0)
            p = plan("all_gather_matmul", m, big_k // world, n, world_size=world, dtype=torch.bfloat16,
                     transport="symm")
            q = replace(p, decision="overlap", n_chunks=1, chunk_sizes=(m // world,), graphed=True)
            graph = lambda x=x, w=w, q=q: ops.all_gather_matmul_forward(x, w, g, 0, q, False)  # noqa: E731
        else:
            x = torch.randn(m, big_k // world, device=dev, generator=gen).to(torch.bfloat16)
            w = (torch.randn(big_k // world, n, device=dev, generator=gen) / math.sqrt(big_k)).to(torch.bfloat16)
            plain = functional._plain_rs(x, w, g, 0)
            p = plan("matmul_reduce_scatter", m, n, big_k // world, world_size=world, dtype=torch.bfloat16,
                     transport="symm")
            q = replace(p, decision="overlap", n_chunks=1, chunk_sizes=(m // world,), graphed=True)
            graph = lambda x=x, w=w, q=q: ops.matmul_reduce_scatter_forward(x, w, g, 0, q)  # noqa: E731
        plain_fn = lambda plain=plain, x=x, w=w: plain(x, w)  # noqa: E731
        row = {"op": op, "shape": name, "m": m}
        with torch.no_grad():
            for phase, warm in (("first", 2), ("warm", 50)):
                for _ in range(warm):
                    plain_fn()
                    graph()
                torch.cuda.synchronize(dev)
                at_alone = _time_ms([plain_fn], dev, None, rounds=cfg["rounds"])
                at_both = _time_ms([plain_fn, graph], dev, None, rounds=cfg["rounds"])
                bar_alone = _time_after_barrier([plain_fn], dev, cfg["rounds"])
                bar_both = _time_after_barrier([plain_fn, graph], dev, cfg["rounds"])
                b_alone = sample_ms([plain_fn], iters=cfg["rounds"], calls=4, device=dev)
                b_both = sample_ms([plain_fn, graph], iters=cfg["rounds"], calls=4, device=dev)
                row[phase] = {
                    "autotune_plain_alone": max_over_ranks(at_alone[0]),
                    "autotune_plain_alternating": max_over_ranks(at_both[0]),
                    "autotune_graph_alternating": max_over_ranks(at_both[1]),
                    "barrier_plain_alone": max_over_ranks(bar_alone[0]),
                    "barrier_plain_alternating": max_over_ranks(bar_both[0]),
                    "barrier_graph_alternating": max_over_ranks(bar_both[1]),
                    "bench_plain_alone": max_over_ranks(b_alone[0][0]),
                    "bench_plain_alternating": max_over_ranks(b_both[0][0]),
                    "bench_graph_alternating": max_over_ranks(b_both[1][0]),
                    "bench_plain_host_us": max_over_ranks(b_both[0][1]),
                    "bench_graph_host_us": max_over_ranks(b_both[1][1]),
                }
        rows_out.append(row)
        if info.rank == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    return {"rows": rows_out}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_autotune_probe", _worker, argv, __doc__, nproc=2, options={"rounds": 25}, timeout_s=600,
                      env=ENV)


if __name__ == "__main__":
    sys.exit(main())
