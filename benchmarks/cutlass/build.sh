#!/usr/bin/env bash
# Builds benchmarks/cutlass/libcf_gemm.so (CUTLASS Hopper GEMMs behind a C ABI: gemm_sm90.cu, the
# plain GEMM; gemm_sm90_array.cu, L problems with their own pointers in one launch; and
# ar_reduce.cu, the reducer of the fused all-reduce probe, plain CUDA) on a machine
# without a GPU: CUDA 13.0's compiler from NVIDIA's PyPI wheels, CUTLASS's headers from a
# checkout, the CUDA runtime linked statically, so the library needs only the driver on the
# GPU machine (13.0 there). ~2 min on 2 cores. Nothing it downloads goes into the repository.
#
#   CUTLASS_DIR=/path/to/cutlass bash benchmarks/cutlass/build.sh [CACHE_DIR]
#
# CUTLASS_DIR: a CUTLASS checkout (include/ and tools/util/include/ are used; measured with
# 4.7, commit 7107b05); CACHE_DIR (default ~/.cache/commflow-cuda13): where the wheels unpack.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-$HOME/.cache/commflow-cuda13}"
: "${CUTLASS_DIR:?set CUTLASS_DIR to a CUTLASS checkout}"
cuda="$cache/nvidia/cu13"
if [ ! -x "$cuda/nvvm/bin/cicc" ]; then
  mkdir -p "$cache/wheels"
  python -m pip download --no-deps -q -d "$cache/wheels" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*"
  for w in "$cache"/wheels/*.whl; do python -m zipfile -e "$w" "$cache"; done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
fi
"$cuda/bin/nvcc" -arch=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -DNDEBUG --shared -Xcompiler -fPIC \
  -cudart static -L"$cuda/lib" -I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include" \
  -diag-suppress 20012 -o "$here/libcf_gemm.so" "$here/gemm_sm90.cu" "$here/gemm_sm90_array.cu" \
  "$here/ar_reduce.cu"
echo "$here/libcf_gemm.so"
