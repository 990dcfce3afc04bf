"""Probe: GEMM + reduce-scatter with CUTLASS storing every destination's block into its owner.

Not a registered benchmark (written in session 13, first run in session 14). Build the library without a GPU
(``CUTLASS_DIR=... bash benchmarks/cutlass/build.sh``), then ``python -m
benchmarks.overlap_cutlass_rs_probe --nproc 4 [--rounds 20] [--out FILE]`` (on the device machine,
carry ``benchmarks/cutlass/libcf_gemm.so``).

The fused-epilogue probe (``overlap_fused_probe``, session 12) had a Triton GEMM store each tile
into its owner's symmetric buffer: cheap stores, but a GEMM at 0.76-0.91 of cuBLAS.
``cutlass_gemm_probe`` (session 13) has a CUTLASS Hopper GEMM at 0.87-1.10 of cuBLAS. This puts
the two together with the least new code: ``gemm_sm90_array.cu`` runs R problems of one shape in
one persistent launch, each with its own pointers; problem ``l`` multiplies the rows of
destination ``d = rank + 1 + l`` (this rank's own rows last) and its epilogue writes them straight
into slot ``rank`` of rank ``d``'s symmetric buffer. Then one symmetric-memory barrier and the
fp32 sum of the slots, as the library's reduce-scatter ends. Variants, timed in alternation
(``commflow.overlap.autotune.sample_ms``, medians, slowest rank):

* ``cublas``: ``torch.mm`` of the whole ``x [M, K/R] @ w``;
* ``cutlass_local``: the same launch with every block written into this rank's own buffer (no
  remote stores);
* ``cutlass_rs``: the launch into the owners' buffers, barrier, sum;
* ``library_rs``: the library's copy-engine reduce-scatter forced to overlap, one row group,
  replayed as a CUDA graph (``benchmarks.overlap.symm_call``);
* ``sequential``: ``torch.mm`` + NCCL's reduce-scatter.

``cutlass_rs`` is checked against ``sequential`` with the slots filled with NaN first. One copy of
the slots (as in ``overlap_fused_probe``): a fast rank's next call may write into slots a peer still
sums, which does not change the timing; the check runs on quiet ranks.

Found (4x H100, ``overlap_cutlass_rs_probe_4xH100_20261127-s14.json``, ``71d3365``): correct (the
library RS's difference from sequential); CUTLASS storing locally at 0.98-1.02 of cuBLAS;
``cutlass_rs`` 1.16x / 1.22x of sequential on 70B / 8B FC2 (library RS 1.11x / 1.18x) and behind
the library on the attention rows (1.34x vs 1.43x at 70B attn-out M = 16384, 1.15x vs 1.27x at
M = 4096, 1.07x vs 1.12x at 8B attn-out M = 16384). docs/overlap.md, "Results".
"""

from __future__ import annotations

import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = [  # (name, K, N, M): row-parallel, x [M, K/R] @ w [K/R, N]
    ("llama3-70b-attn-out", 8192, 8192, 16384), ("llama3-70b-attn-out", 8192, 8192, 4096),
    ("llama3-8b-attn-out", 4096, 4096, 16384), ("llama3-70b-fc2", 28672, 8192, 8192),
    ("llama3-8b-fc2", 14336, 4096, 16384),
]


def _row(lib, g, ws, name: str, k_full: int, n: int, m: int, rounds: int) -> dict:
    from benchmarks.cutlass_lib import ArrayGemm, pointers
    from benchmarks.overlap import checked_times, sequential_rs, symm_call

    dev, world, rank = torch.device("cuda", torch.cuda.current_device()), g.world_size, g.rank
    k, mr = k_full // world, m // world
    gen = torch.Generator(device=dev).manual_seed(17 + rank)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    w = (torch.randn(k, n, device=dev, generator=gen) / math.sqrt(k_full)).to(torch.bfloat16)
    ws.ensure(2 * world * mr * n * 2)  # slots [R, M/R, N], and as much again for the local control
    slots = ws.view(rank, (world, mr, n), torch.bfloat16, 0)  # slot s: what rank s computed for this rank
    local = ws.view(rank, (world, mr, n), torch.bfloat16, world * mr * n)
    order = [(rank + 1 + step) % world for step in range(world)]  # destinations, this rank's own last
    base = ws.handle.buffer_ptrs
    launch = ArrayGemm(lib, pointers([x.data_ptr() + d * mr * k * 2 for d in order], dev),
                       pointers([w.data_ptr()] * world, dev), mr, n, k)
    d_remote = pointers([base[d] + rank * mr * n * 2 for d in order], dev)
    d_local = pointers([local[d].data_ptr() for d in order], dev)

    def cutlass_rs() -> torch.Tensor:
        launch(d_remote)
        ws.barrier()  # every rank's block for this rank has landed
        return torch.sum(slots, dim=0)  # fp32 accumulation, rounded once

    sequential = sequential_rs(x, w, world)

    fns = {"cublas": lambda: torch.mm(x, w), "cutlass_local": lambda: launch(d_local), "cutlass_rs": cutlass_rs,
           "library_rs": symm_call("rs", x, w, (m, n, k), groups=1), "sequential": sequential}
    # Every slot must be written by the checked call: NaN in them first.
    diff, ms = checked_times(fns, ["cutlass_rs", "library_rs"], sequential, rounds, dev,
                             before_check=lambda: slots.fill_(float("nan")))
    row = {"shape": name, "M": m, "K_per_rank": k, "N": n, "rel_diff": diff, **{f"{nm}_ms": t for nm, t in ms.items()}}
    row["cutlass_rs_speedup"] = row["sequential_ms"] / row["cutlass_rs_ms"]
    row["library_speedup"] = row["sequential_ms"] / row["library_rs_ms"]
    row["cutlass_vs_cublas"] = row["cublas_ms"] / row["cutlass_local_ms"]
    return row


def _worker(cfg: dict) -> dict:
    from benchmarks.cutlass_lib import load
    from benchmarks.overlap import probe_rows

    lib = load()
    rows = probe_rows("cutlass_rs_probe", lambda *a: _row(lib, *a), SHAPES, cfg["rounds"])
    return {"rows": rows, "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_cutlass_rs_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 20},
                      timeout_s=400, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
