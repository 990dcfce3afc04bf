"""The CUTLASS library of benchmarks/cutlass/ (``libcf_gemm.so``), loaded with its C signatures.

Built without a GPU by ``benchmarks/cutlass/build.sh`` (git-ignored); the probes that use it
(``cutlass_gemm_probe``, ``overlap_cutlass_rs_probe``, ``overlap_cutlass_ar_probe``) carry the
``.so`` to the GPU machine. Every exported function returns 0 on success (see the ``.cu`` files for
the other codes).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

LIB = Path(__file__).parent / "cutlass" / "libcf_gemm.so"


def load(path: Path = LIB) -> ctypes.CDLL:
    """The library with every function's argument types declared."""
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cf_gemm_bf16.argtypes = [i, p, p, p, i, i, i, p]  # config, x, w, y, m, n, k, stream
    lib.cf_gemm_bf16_array_sms.argtypes = [p, p, p, i, i, i, i, i, p, p]  # a[], b[], d[], m, n, k, L, SMs, ws, stream
    lib.cf_gemm_bf16_array_workspace_sms.argtypes = [i] * 5
    lib.cf_gemm_bf16_array_workspace_sms.restype = ctypes.c_longlong
    lib.cf_ar_reduce.argtypes = [p, p, i, i, i, i, i, i, i, i, i, p, p, p]  # slots, outs[], rank, R, rows,
    # n, ctas, threads, unroll, peers, poll_ns, err, stamps (None: off), stream
    return lib


def pointers(addresses: list[int], device: torch.device) -> torch.Tensor:
    """A device array of addresses, as the ptr-array GEMM takes its operands."""
    return torch.tensor(addresses, dtype=torch.int64, device=device)


class ArrayGemm:
    """``gemm_sm90_array.cu``: ``len(a_ptrs)`` problems ``[m, k] @ [k, n]`` of one shape in one
    persistent launch, each with its own A, B and D, on ``sm_count`` SMs (0: all), with the
    workspace it needs. Calling it with a device array of D addresses launches it on the current
    stream."""

    def __init__(self, lib: ctypes.CDLL, a_ptrs: torch.Tensor, b_ptrs: torch.Tensor, m: int, n: int, k: int,
                 sm_count: int = 0):
        self.lib, self.a_ptrs, self.b_ptrs, self.shape, self.sm_count = lib, a_ptrs, b_ptrs, (m, n, k), sm_count
        self.batches = len(a_ptrs)
        size = lib.cf_gemm_bf16_array_workspace_sms(m, n, k, self.batches, sm_count)
        self.workspace = torch.empty(max(1, size), dtype=torch.uint8, device=a_ptrs.device)

    def __call__(self, d_ptrs: torch.Tensor) -> None:
        rc = self.lib.cf_gemm_bf16_array_sms(self.a_ptrs.data_ptr(), self.b_ptrs.data_ptr(), d_ptrs.data_ptr(),
                                             *self.shape, self.batches, self.sm_count, self.workspace.data_ptr(),
                                             torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"cf_gemm_bf16_array_sms returned {rc} (1 can_implement, 3 initialize, 4 run, 5 launch)")
