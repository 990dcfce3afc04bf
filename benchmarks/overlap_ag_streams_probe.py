"""Probe: the all-gather's piece GEMMs on one stream or taking turns on two.

Not a registered benchmark (``python -m benchmarks.overlap_ag_streams_probe --nproc 4
[--rounds 20] [--out FILE]``). Why: on the compute-heavy all-gather rows (Llama-3 70B FC2,
M = 8192-16384) PyTorch's fused all-gather matmul ran 0.6-2.0 % ahead of ours in four runs of the
overlap benchmark on 4 H100 (docs/overlap_results.md). It consumes the shards on two streams in
turn; ours ran every piece's GEMM on the caller's stream, so each GEMM's last, partial wave left
SMs idle until the next began. ``symm.AG_GEMM_STREAMS`` now sets this; this probe times both
settings in the same run, beside the peer. Per row of the overlap benchmark's all-gather shapes
(``x [M/R, N] @ w [N, K/R]``, the gathered input's GEMM), timed in alternation
(``commflow.overlap.autotune.sample_ms``, medians, slowest rank), after a check of each against
the plain path:

* ``sequential``: ``mode="sequential"`` (NCCL's all-gather, then ``torch.mm``);
* ``torch_fused``: ``torch.ops.symm_mem.fused_all_gather_matmul`` (multicast off);
* ``one_stream`` / ``two_streams``: the library's copy-engine schedule forced to overlap in
  the plan's pieces, replayed as a CUDA graph, with ``AG_GEMM_STREAMS`` 1 / 2 (a weight of its own
  each, so each has its own graph).
"""

from __future__ import annotations

import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = ("llama3-70b-fc2", "llama3-70b-attn-out", "llama3-8b-fc2", "llama3-8b-attn-out")
MS = (4096, 8192, 16384)


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.overlap import SHAPES as DIMS
    from benchmarks.overlap import _torch_fused, checked_times, symm_call
    from commflow.dist import init_distributed
    from commflow.overlap import all_gather_matmul, symm

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    fused = _torch_fused("ag", dist.group.WORLD.group_name)
    rows = []
    for shape in SHAPES:
        big_k, n = DIMS[shape]
        for m in MS:
            gen = torch.Generator(device=dev).manual_seed(11 + info.rank)
            x = torch.randn(m // world, n, device=dev, generator=gen).bfloat16()
            w = (torch.randn(n, big_k // world, device=dev, generator=gen) / math.sqrt(n)).bfloat16()
            dims = (m, big_k // world, n)
            calls = {s: symm_call("ag", x, w.clone(), dims) for s in (1, 2)}

            def with_streams(s, call):
                def run():
                    symm.AG_GEMM_STREAMS = s
                    try:
                        return call()
                    finally:
                        symm.AG_GEMM_STREAMS = 2
                return run

            sequential = lambda x=x, w=w: all_gather_matmul(x, w, mode="sequential")  # noqa: E731
            fns = {"sequential": sequential, "torch_fused": lambda x=x, w=w: fused(x, w),
                   "one_stream": with_streams(1, calls[1]), "two_streams": with_streams(2, calls[2])}
            diff, ms = checked_times(fns, ["torch_fused", "one_stream", "two_streams"], sequential, cfg["rounds"], dev)
            row = {"shape": shape, "M": m, "gemm_mnk": list(dims), "rel_diff": diff,
                   **{f"{k}_ms": v for k, v in ms.items()},
                   "two_vs_one": ms["one_stream"] / ms["two_streams"],
                   "two_vs_torch": ms["torch_fused"] / ms["two_streams"],
                   "one_vs_torch": ms["torch_fused"] / ms["one_stream"]}
            rows.append(row)
            if info.rank == 0:
                print(json.dumps(row), flush=True)
    dist.barrier()
    return {"rows": rows, "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_ag_streams_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 20},
                      timeout_s=500, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
