// A CUTLASS Hopper ptr-array GEMM: L problems of one shape in ONE launch, each with its own
// A, B and D pointers (device arrays of pointers), C ABI. The fused reduce-scatter's first step:
// problem l computes destination l's row block and writes it straight into that rank's
// symmetric buffer (D = a peer address), tiles of all destinations in one persistent kernel.
// x blocks [M, K] row-major, w [K, N] row-major (N contiguous), D blocks [M, N] row-major.
#include <cuda_runtime.h>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {
using T = cutlass::bfloat16_t;
using Acc = float;
using RowMajor = cutlass::layout::RowMajor;
constexpr int kAlign = 8;
using Tile = Shape<_128, _256, _64>;
using Cluster = Shape<_2, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, RowMajor, kAlign, T, RowMajor, kAlign,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, RowMajor, kAlign, T, RowMajor, kAlign, Acc, Tile, Cluster,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::ArrayProblemShape<Shape<int, int, int, int>>,
                                                    Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments arguments(const void* const* a, const void* const* b, void* const* d, int m, int n, int k,
                                   int batches, int sm_count) {
  using SA = typename Gemm::GemmKernel::StrideA;
  using SB = typename Gemm::GemmKernel::StrideB;
  using SC = typename Gemm::GemmKernel::StrideC;
  using SD = typename Gemm::GemmKernel::StrideD;
  static int sms = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(0);
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count > 0 && sm_count < sms ? sm_count : sms;  // fewer: leave SMs to a kernel beside it
  return typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kArray,
      {{m, n, k, batches}},
      {reinterpret_cast<const T**>(const_cast<const void**>(a)), cutlass::make_cute_packed_stride(SA{}, make_shape(m, k, 1)),
       reinterpret_cast<const T**>(const_cast<const void**>(b)), cutlass::make_cute_packed_stride(SB{}, make_shape(n, k, 1))},
      {{1.0f, 0.0f}, nullptr, cutlass::make_cute_packed_stride(SC{}, make_shape(m, n, 1)),
       reinterpret_cast<T**>(const_cast<void**>(d)), cutlass::make_cute_packed_stride(SD{}, make_shape(m, n, 1))},
      hw};
}
}  // namespace

// Bytes of workspace the kernel needs (its per-problem TMA descriptors). sm_count: the SMs the
// persistent kernel may occupy (0: all of them).
extern "C" long long cf_gemm_bf16_array_workspace_sms(int m, int n, int k, int batches, int sm_count) {
  auto args = arguments(nullptr, nullptr, nullptr, m, n, k, batches, sm_count);
  return static_cast<long long>(Gemm::get_workspace_size(args));
}

// a, b, d: device arrays of `batches` pointers each. 0 on success.
extern "C" int cf_gemm_bf16_array_sms(const void* const* a, const void* const* b, void* const* d, int m, int n, int k,
                                      int batches, int sm_count, void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto args = arguments(a, b, d, m, n, k, batches, sm_count);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (gemm.initialize(args, workspace, s) != cutlass::Status::kSuccess) return 3;
  if (gemm.run(s) != cutlass::Status::kSuccess) return 4;
  return static_cast<int>(cudaGetLastError()) ? 5 : 0;
}
