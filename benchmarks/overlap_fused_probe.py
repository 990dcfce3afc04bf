"""Probe: a GEMM whose epilogue stores each tile into its owner's symmetric buffer (T3 / Flux style).

Not a registered benchmark (``python -m benchmarks.overlap_fused_probe --nproc 4 [--rounds 20]
[--out FILE]``). The copy-engine schedules of ``commflow.overlap`` are chunk-granular: cuBLAS
computes a destination block, then a copy engine pushes it. docs/overlap.md names a GEMM that
sends its own tiles (no chunking, no copies, the transfer spread over the whole GEMM) as the
design that could move the all-reduce goal. Before building one, two questions:

* can a Triton GEMM run close enough to cuBLAS on H100 (``triton_local_ms`` vs ``cublas_ms``:
  the same kernel with every tile stored into this rank's own buffer)?
* how fast is GEMM + reduce-scatter when the tiles go out from the epilogue
  (``fused_rs_ms``: the kernel storing each tile of row block ``d`` into slot ``rank`` of rank
  ``d``'s buffer, tiles of block ``rank + 1`` first and this rank's own last; then one
  symmetric-memory barrier and the fp32 sum of the slots), beside the library's copy-engine
  reduce-scatter forced to overlap as a CUDA graph (``library_rs_ms``) and sequential
  (``sequential_ms``: ``torch.mm`` + NCCL's reduce-scatter)?

Medians of alternating samples (``commflow.overlap.autotune.sample_ms``), slowest rank; every
variant checked against sequential first (``rel_diff``).

Found (session 12, 4x H100, ``overlap_fused_probe_4xH100_20261127-s12.json``, Triton 3.6): the
Triton GEMM runs at 0.76-0.91 of cuBLAS (best of four tile configurations, 256x128x64 on every
shape); sending the tiles from the epilogue adds 0.12-0.26 ms over storing them locally, which is
about the barrier and the fp32 sum of the slots alone on the compute-heavy shapes; the fused
reduce-scatter runs 1.05-1.26x of sequential where the library's copy-engine one runs 1.12-1.43x,
behind it on every shape by about the Triton GEMM's deficit. Not built further: it would need a
cuBLAS-class GEMM with a custom epilogue, which PyTorch does not expose.
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

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the probe only runs on GPUs
    triton = None

if triton is not None:
    _CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, w, s in ((128, 256, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (256, 128, 8, 3))]

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "PEER"])
    @triton.jit
    def _gemm_scatter(a_ptr, b_ptr, table_ptr, M, N, K, rows_per_rank, rank, world,
                      stride_am, stride_ak, stride_bk, stride_bn,
                      PEER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr):
        """``a [M, K] @ b [K, N]``; the tile of rows in block ``d`` (``rows_per_rank`` rows each)
        goes to slot ``rank`` of rank ``d``'s buffer (``PEER``) or of this rank's own (control)."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BN)
        m_per = rows_per_rank // BM
        tiles_per_block = m_per * num_n
        step = pid // tiles_per_block  # 0 .. world - 1: destination rank + 1 first, this rank last
        dst = (rank + 1 + step) % world
        local = pid % tiles_per_block
        width = GROUP_M * num_n  # grouped order inside the block, for L2 reuse of b
        first_m = (local // width) * GROUP_M
        gsz = tl.minimum(m_per - first_m, GROUP_M)
        pid_m = first_m + (local % width) % gsz
        pid_n = (local % width) // gsz
        offs_m = dst * rows_per_rank + pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, tl.cdiv(K, BK)):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BK * stride_ak
            b_ptrs += BK * stride_bk
        owner = dst if PEER else rank
        base = tl.load(table_ptr + owner).to(tl.pointer_type(tl.bfloat16))
        rows = pid_m * BM + tl.arange(0, BM)
        tl.store(base + rank * rows_per_rank * N + rows[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16))


def _row(g, ws, name: str, k_full: int, n: int, m: int, rounds: int) -> dict:
    """One shape: every variant checked against sequential, then timed in alternation."""

    from benchmarks.overlap import checked_times, sequential_rs, symm_call

    dev, world, rank = torch.device("cuda", torch.cuda.current_device()), g.world_size, g.rank
    k, mr = k_full // world, m // world
    gen = torch.Generator(device=dev).manual_seed(11 + rank)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    w = (torch.randn(k, n, device=dev, generator=gen) / math.sqrt(k_full)).to(torch.bfloat16)
    ws.ensure(world * mr * n * 2)
    table = torch.tensor(ws.handle.buffer_ptrs, dtype=torch.int64, device=dev)
    slots = ws.view(rank, (world, mr, n), torch.bfloat16, 0)  # slot s: the tiles rank s computed for this rank

    def launch(peer: bool):
        grid = lambda meta: (world * (mr // meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _gemm_scatter[grid](x, w, table, m, n, k, mr, rank, world, x.stride(0), x.stride(1), w.stride(0),
                            w.stride(1), PEER=peer)

    def fused_rs():
        # (no second copy of the slots: a fast rank's next call may write into them while a
        # peer still sums this one; timing is unaffected, the check below runs on quiet ranks)
        launch(True)
        ws.barrier()  # every rank's tiles for this rank have landed
        return torch.sum(slots, dim=0)  # fp32 accumulation, rounded once

    sequential = sequential_rs(x, w, world)

    fns = {"cublas": lambda: torch.mm(x, w), "triton_local": lambda: launch(False), "fused_rs": fused_rs,
           "library_rs": symm_call("rs", x, w, (m, n, k), groups=1), "sequential": sequential}
    # (warm-up: Triton tunes on its first calls, every rank alike)
    diff, ms = checked_times(fns, ["fused_rs", "library_rs"], sequential, rounds, dev)
    row = {"shape": name, "M": m, "K_per_rank": k, "N": n, "rel_diff": diff,
           "triton_config": str(_gemm_scatter.best_config), **{f"{nm}_ms": t for nm, t in ms.items()}}
    row["fused_speedup"] = row["sequential_ms"] / row["fused_rs_ms"]
    row["library_speedup"] = row["sequential_ms"] / row["library_rs_ms"]
    row["triton_vs_cublas"] = row["cublas_ms"] / row["triton_local_ms"]
    return row


def _worker(cfg: dict) -> dict:
    from benchmarks.overlap import probe_rows

    rows = probe_rows("fused_probe", _row, SHAPES, cfg["rounds"])
    return {"rows": rows, "torch": torch.__version__, "triton": triton.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_fused_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 20}, timeout_s=400,
                      env=ENV)


if __name__ == "__main__":
    sys.exit(main())
