"""Probe: a CUTLASS Hopper GEMM built off the GPU machine, against cuBLAS (``torch.mm``).

Not a registered benchmark. Build first, on any Linux machine (no GPU needed, ~1 min):
``CUTLASS_DIR=/path/to/cutlass bash benchmarks/cutlass/build.sh``; then on one GPU
``python -m benchmarks.cutlass_gemm_probe [--lib PATH] [--out FILE]`` (on the device machine,
carry ``benchmarks/cutlass/libcf_gemm.so``).

Why: the fused-epilogue probe (``overlap_fused_probe``, session 12) found that a GEMM which stores
its tiles into the peers' buffers costs little in the stores, but its Triton GEMM ran at 0.76-0.91
of cuBLAS, and docs/overlap.md named a CUTLASS Hopper GEMM with a storing epilogue as the one
path left for the GEMM + all-reduce goal. Two things had to hold first: that such a kernel can be
built without compiling on the GPU machine (each device call is a fresh machine with 30 minutes a
session; CUTLASS's Python DSL wheel does not fit what a call carries), and that a plain CUTLASS
kernel runs at cuBLAS speed on the shapes of the overlap benchmark. ``benchmarks/cutlass/`` holds the
kernel (``gemm_sm90.cu``: TMA, warp-specialized cooperative mainloop and epilogue, bf16 in, fp32
accumulate, two tile shapes) behind a C ABI, loaded here with ``ctypes``.

Each shape: the output first filled with NaN (a stale block must not pass), checked against
``torch.mm`` on ``x`` and on ``-x``, then the median of 30 event-timed calls of each.

Found (session 13, one H100 of a 4x H100 host, ``cutlass_gemm_probe_1xH100_20261127-s13.json``,
``d38afb0``; library built with CUDA 13.0 wheels and CUTLASS 4.7 on the 2-core CI machine in 66 s,
1.2 MB): bit-equal to cuBLAS on every shape, on ``x`` and ``-x``; the 128x256 tile at 0.86-1.10x of
cuBLAS, the better of the two tiles 0.87-1.10x (70B attention-out at M = 4096 and 70B FC2 the
worst, 0.87x; 8B FC2 and the 8192^3 square faster than cuBLAS). Two earlier runs of the same kernel
from a scratch script the same session: 0.85-1.07x and 0.88-1.10x. Compare Triton's 0.76-0.91x in
the session-12 probe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SHAPES = [  # (name, M, N, K): x [M, K] @ w [K, N], the per-rank GEMMs of the 4-rank overlap rows
    ("70b-attn-out", 16384, 8192, 2048), ("70b-attn-out", 4096, 8192, 2048), ("8b-attn-out", 16384, 4096, 1024),
    ("70b-fc2", 8192, 8192, 7168), ("8b-fc2", 16384, 4096, 3584), ("sq8192", 8192, 8192, 8192),
]
CONFIGS = {0: "128x256x64, cluster 2x1", 1: "128x128x64, cluster 2x1"}  # gemm_sm90.cu's switch


def _row(lib, name: str, m: int, n: int, k: int) -> dict:
    from benchmarks.timing import time_ms

    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g).bfloat16()
    w = (torch.randn(k, n, device=dev, generator=g) / k ** 0.5).bfloat16()
    ref = torch.mm(x, w).float()

    def median_ms(fn) -> float:
        return time_ms(fn, warmup=5, iters=30, device=dev)["median_ms"]

    row = {"shape": name, "M": m, "N": n, "K": k, "cublas_ms": median_ms(lambda: torch.mm(x, w))}
    stream = torch.cuda.current_stream().cuda_stream
    for cfg in CONFIGS:
        y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)

        def call(cfg=cfg, y=y):
            return lib.cf_gemm_bf16(cfg, x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, stream)

        rc = call()
        torch.cuda.synchronize()
        if rc:
            row[f"cutlass{cfg}"] = f"rc {rc}"  # gemm_sm90.cu: 1 can_implement, 2 workspace, 3 init, 4 run, 5 launch
            continue
        diff = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        x.neg_()
        y.fill_(float("nan"))
        call()
        diff = max(diff, ((y.float() + ref).abs().max() / ref.abs().max()).item())
        row[f"cutlass{cfg}_nan"] = bool(torch.isnan(y).any())
        x.neg_()
        row[f"cutlass{cfg}_ms"] = median_ms(call)
        row[f"cutlass{cfg}_rel_diff"] = diff
        row[f"cutlass{cfg}_vs_cublas"] = row["cublas_ms"] / row[f"cutlass{cfg}_ms"]
    row["cublas_tflops"] = 2 * m * n * k / row["cublas_ms"] / 1e9
    return row


def main(argv=None) -> int:
    from benchmarks.cutlass_lib import LIB, load
    from benchmarks.results import save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=str(LIB))
    ap.add_argument("--out", default=None, help="result file (default: a new one under benchmarks/results/)")
    args = ap.parse_args(argv)
    lib = load(Path(args.lib))
    rows = []
    for shape in SHAPES:
        rows.append(_row(lib, *shape))
        print(json.dumps(rows[-1]), flush=True)
    print(save("cutlass_gemm_probe", vars(args), {"configs": CONFIGS, "rows": rows},
               Path(args.out) if args.out else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
