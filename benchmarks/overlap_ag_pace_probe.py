"""Probe: the all-gather's pulls all at once, or paced one beside each GEMM.

Not a registered benchmark (``python -m benchmarks.overlap_ag_pace_probe --nproc 4 [--rounds 20]
[--rows SHAPE:M,...] [--out FILE]``). Why: on the compute-heavy all-gather rows (Llama-3 70B FC2,
M = 8192-16384) PyTorch's fused all-gather matmul ran 0.6-2.0 % ahead of ours in four runs of the
overlap benchmark on 4 H100 (docs/overlap_results.md). Its schedule differs from ours in two
ways: it consumes the shards on two streams in turn, and since each shard's copy sits in a stream
behind the GEMM before it, it pulls one shard at a time beside the GEMMs, where ours pulls every
piece from the start, all beside the own shard's GEMM. Two streams were tried first and lost
(below); this probe times the second difference (``symm.AG_PACE``) in the same run, beside the
peer. Per row of the overlap benchmark's all-gather shapes (``x [M/R, N] @ w [N, K/R]``, the
gathered input's GEMM), timed in alternation (``commflow.overlap.autotune.sample_ms``, medians,
slowest rank), after a check of each against the plain path:

* ``sequential``: ``mode="sequential"`` (NCCL's all-gather, then ``torch.mm``);
* ``torch_fused``: ``torch.ops.symm_mem.fused_all_gather_matmul`` (multicast off);
* ``{upfront,paced}_pieces_{plan,1}``: the library's copy-engine schedule forced to overlap,
  replayed as a CUDA graph, pulls issued all at once or paced, in the forced plan's pieces or in
  one piece per peer (what the automatic plan ran on the compute-heavy rows); a weight of its
  own each, so each has its own graph.

Found before (4x H100): the pieces' GEMMs taking turns on two streams (the probe's first form,
``git show 1a59532:benchmarks/overlap_ag_streams_probe.py``) were never more than 0.5 % faster
than one stream and up to 8 % slower (``overlap_ag_streams_probe_4xH100_20261127-s14.json``,
``-s14-pieces.json``); not kept.
"""

from __future__ import annotations

import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
ROWS = ",".join(f"{s}:{m}" for s in ("llama3-70b-fc2", "llama3-70b-attn-out", "llama3-8b-fc2", "llama3-8b-attn-out")
                for m in (4096, 8192, 16384))


def _worker(cfg: dict) -> dict:
    from dataclasses import replace

    import torch.distributed as dist

    from benchmarks.overlap import SHAPES as DIMS
    from benchmarks.overlap import _torch_fused, checked_times
    from commflow.dist import init_distributed
    from commflow.overlap import all_gather_matmul, ops, symm
    from commflow.overlap.functional import resolve_plan
    from commflow.overlap.validate import check_group

    default = symm.AG_PACE
    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    g = check_group(None, dev)
    fused = _torch_fused("ag", dist.group.WORLD.group_name)
    rows = []
    for shape, m in [tuple(r.split(":")) for r in cfg["rows"].split(",")]:
        big_k, n, m = *DIMS[shape], int(m)
        gen = torch.Generator(device=dev).manual_seed(11 + info.rank)
        x = torch.randn(m // world, n, device=dev, generator=gen).bfloat16()
        w = (torch.randn(n, big_k // world, device=dev, generator=gen) / math.sqrt(n)).bfloat16()
        dims = (m, big_k // world, n)
        plan = replace(resolve_plan("all_gather_matmul", *dims, g, x, "overlap", None, "fp32"), graphed=True)
        pieces = {"plan": plan, "1": replace(plan, n_chunks=1, chunk_sizes=(m // world,))}

        def variant(paced, p, x=x, w=w):
            wl = w.clone()  # a weight of its own: a graph of its own

            def run():
                symm.AG_PACE = paced
                try:
                    return ops.all_gather_matmul_forward(x, wl, g, 0, p, False)[0]
                finally:
                    symm.AG_PACE = default
            return run

        sequential = lambda x=x, w=w: all_gather_matmul(x, w, mode="sequential")  # noqa: E731
        fns = {"sequential": sequential, "torch_fused": lambda x=x, w=w: fused(x, w)}
        for name, p in pieces.items():
            for paced in (False, True):
                fns[f"{'paced' if paced else 'upfront'}_pieces_{name}"] = variant(paced, p)
        diff, ms = checked_times(fns, [f for f in fns if f != "sequential"], sequential, cfg["rounds"], dev)
        row = {"shape": shape, "M": m, "gemm_mnk": list(dims), "plan_pieces": list(plan.chunk_sizes),
               "rel_diff": diff, **{f"{k}_ms": v for k, v in ms.items()}}
        rows.append(row)
        if info.rank == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    return {"rows": rows, "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_ag_pace_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 20, "rows": ROWS},
                      timeout_s=500, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
