// A plain CUTLASS Hopper GEMM (bf16 in, fp32 accumulate, bf16 out) behind a C ABI, so a .so
// built off the GPU machine (CUDA 13.0 wheels, static cudart) can be loaded there with ctypes.
// x [M, K] row-major, w [K, N] row-major (N contiguous, torch's layout), y [M, N] row-major.
#include <cuda_runtime.h>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {
using T = cutlass::bfloat16_t;
using Acc = float;
using RowMajor = cutlass::layout::RowMajor;
constexpr int kAlign = 8;  // 16 bytes of bf16

template <class TileShape, class ClusterShape>
struct Config {
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, T, RowMajor, kAlign, T, RowMajor, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, RowMajor, kAlign, T, RowMajor, kAlign, Acc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class Gemm>
int run(const void* x, const void* w, void* y, int m, int n, int k, cudaStream_t stream) {
  using SA = typename Gemm::GemmKernel::StrideA;
  using SB = typename Gemm::GemmKernel::StrideB;
  using SC = typename Gemm::GemmKernel::StrideC;
  using SD = typename Gemm::GemmKernel::StrideD;
  auto sa = cutlass::make_cute_packed_stride(SA{}, make_shape(m, k, 1));
  auto sb = cutlass::make_cute_packed_stride(SB{}, make_shape(n, k, 1));
  auto sc = cutlass::make_cute_packed_stride(SC{}, make_shape(m, n, 1));
  auto sd = cutlass::make_cute_packed_stride(SD{}, make_shape(m, n, 1));
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k, 1},
                                {static_cast<const T*>(x), sa, static_cast<const T*>(w), sb},
                                {{1.0f, 0.0f}, static_cast<const T*>(y), sc, static_cast<T*>(y), sd}};
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) != 0) return 2;  // the cooperative kernel needs none
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return 3;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
  return static_cast<int>(cudaGetLastError()) ? 5 : 0;
}

using G128x256 = Config<Shape<_128, _256, _64>, Shape<_2, _1, _1>>::Gemm;
using G128x128 = Config<Shape<_128, _128, _64>, Shape<_2, _1, _1>>::Gemm;
}  // namespace

extern "C" int cf_gemm_bf16(int config, const void* x, const void* w, void* y, int m, int n, int k, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (config) {
    case 0: return run<G128x256>(x, w, y, m, n, k, s);
    case 1: return run<G128x128>(x, w, y, m, n, k, s);
    default: return 9;
  }
}
