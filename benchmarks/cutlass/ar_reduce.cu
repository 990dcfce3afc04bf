// The reducer of a fused GEMM + all-reduce (probe: benchmarks/overlap_cutlass_ar_probe.py), C ABI.
//
// Beside it, every rank's GEMM (gemm_sm90_array.cu) stores its partial of this rank's rows into
// slot `src` of this rank's symmetric buffer, row chunk by row chunk (all destinations' chunk 0,
// then chunk 1, ...). The slots start out filled with kEmpty, a bf16 NaN bit pattern that a GEMM of
// finite inputs never writes (NaN from finite operands is the canonical 0x7FFF), so the data is its
// own arrival signal: a reducer thread reads a 16-byte vector of each slot until none of its eight
// halves is kEmpty (a half, once written, holds its final value), sums the R partials in fp32 in
// rank order, rounds once, stores the reduced vector into every rank's output (NVLink stores to
// the peers), and writes kEmpty back into the slots for the next call. Rows are taken in order
// (see the kernel), the order in which the chunks land. A barrier after the kernel (the
// caller's) says every rank's rows have reached every output.
//
// Not safe for inputs holding NaN (a partial could equal kEmpty): the spin gives up after
// kTimeoutNs of waiting for one vector, sets *error and returns, so a probe fails instead of hanging.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {
constexpr uint32_t kEmpty = 0xFFFFu;
constexpr unsigned long long kTimeoutNs = 8000000000ULL;

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint4 load_volatile(const uint4* p) {
  uint4 v;
  // volatile: past L1, so stores arriving over NVLink (into this GPU's L2) are seen.
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ bool empty_half(uint32_t w) { return (w & 0xFFFFu) == kEmpty || (w >> 16) == kEmpty; }

__device__ __forceinline__ bool has_empty(const uint4& v) {
  return empty_half(v.x) || empty_half(v.y) || empty_half(v.z) || empty_half(v.w);
}

__device__ __forceinline__ void add(float* acc, uint32_t w, int i) {
  __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&w);
  float2 f = __bfloat1622float2(h);
  acc[2 * i] += f.x;
  acc[2 * i + 1] += f.y;
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// slots: this rank's R slots [R][rows][vecs] (16-byte vectors); outs: R pointers, rank p's output
// [R * rows][vecs]; this rank's rows start at row rank * rows of every output. The slot is walked
// flat, in tiles of blockDim.x * U vectors (tile t by CTA t % gridDim.x, so in row order: the order
// the chunks land in), each thread taking U vectors of its tile (threadIdx.x + u * blockDim.x),
// their R * U loads in flight at once: the kernel runs on few SMs, so its speed is its
// memory-level parallelism, and a tile spans rows when a row is shorter than it.
// peers = 0 stores only into this rank's output (not an all-reduce: a probe's control for what the
// stores over NVLink cost). stamps (nullptr: off) records a timeline on the GPU clock, in ns:
// stamps[0] the earliest CTA start (atomicMin; the caller sets it to ~0 first), stamps[1 + row]
// when the row's last vector was seen complete, stamps[1 + rows + row] when its last store was
// issued (atomicMax; the caller zeroes them).
template <int R, int U>
__global__ void ar_reduce_kernel(uint4* slots, uint4* const* outs_in, int rank, int rows, int vecs, int peers,
                                 unsigned poll_ns, int* error, unsigned long long* stamps) {
  if (stamps && threadIdx.x == 0) atomicMin(stamps, now_ns());
  uint4* outs[R];
  for (int q = 0; q < R; ++q) outs[q] = outs_in[(rank + 1 + q) % R];  // the peers first, this rank last
  const size_t slot = static_cast<size_t>(rows) * vecs;
  const size_t tile = static_cast<size_t>(blockDim.x) * U;
  for (size_t base = blockIdx.x * tile; base < slot; base += gridDim.x * tile) {
    uint4 x[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t at = base + threadIdx.x + u * blockDim.x;
#pragma unroll
      for (int s = 0; s < R; ++s)
        if (at < slot) x[u][s] = load_volatile(slots + s * slot + at);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t at = base + threadIdx.x + u * blockDim.x;
      if (at >= slot) break;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < R; ++s) {
        uint4* p = slots + s * slot + at;
        // Back off while waiting: the polls read L2, which the GEMM beside us needs.
        // poll_ns: the first back-off, doubled up to 8x (at least 2 us): a probe knob, since
        // polls beside the GEMM may cost it more than late reduction does.
        unsigned sleep = poll_ns;
        const unsigned longest = max(2048u, 8u * poll_ns);
        unsigned spins = 0;
        unsigned long long since = 0;
        while (has_empty(x[u][s])) {
          // Give up on a timeout, or at once when another thread already has (else every waiting
          // vector would sit out its own timeout).
          if (!spins++) since = now_ns();
          if ((!(spins & 63) && (now_ns() - since > kTimeoutNs || *static_cast<volatile int*>(error)))) {
            atomicExch(error, 1);
            return;
          }
          __nanosleep(sleep);
          sleep = sleep < longest ? 2 * sleep : sleep;
          x[u][s] = load_volatile(p);
        }
        add(acc, x[u][s].x, 0);
        add(acc, x[u][s].y, 1);
        add(acc, x[u][s].z, 2);
        add(acc, x[u][s].w, 3);
        *p = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);  // re-armed for the next call
      }
      const unsigned long long seen = stamps ? now_ns() : 0;
      const uint4 o = make_uint4(pack(acc[0], acc[1]), pack(acc[2], acc[3]), pack(acc[4], acc[5]), pack(acc[6], acc[7]));
      const size_t dst = static_cast<size_t>(rank) * slot + at;
      if (peers) {
#pragma unroll
        for (int q = 0; q < R; ++q) outs[q][dst] = o;
      } else {
        outs[R - 1][dst] = o;
      }
      if (stamps) {
        const size_t row = at / vecs;
        atomicMax(stamps + 1 + row, seen);
        atomicMax(stamps + 1 + rows + row, now_ns());
      }
    }
  }
}

template <int R>
int launch(int unroll, dim3 grid, dim3 block, cudaStream_t stream, uint4* slots, uint4* const* outs, int rank,
           int rows, int vecs, int peers, unsigned poll_ns, int* error, unsigned long long* stamps) {
  switch (unroll) {
    case 1: ar_reduce_kernel<R, 1><<<grid, block, 0, stream>>>(slots, outs, rank, rows, vecs, peers, poll_ns, error, stamps); break;
    case 2: ar_reduce_kernel<R, 2><<<grid, block, 0, stream>>>(slots, outs, rank, rows, vecs, peers, poll_ns, error, stamps); break;
    case 4: ar_reduce_kernel<R, 4><<<grid, block, 0, stream>>>(slots, outs, rank, rows, vecs, peers, poll_ns, error, stamps); break;
    default: return 1;
  }
  return 0;
}
}  // namespace

// n must be a multiple of 8 (16-byte vectors of bf16), world 2, 4 or 8, unroll 1, 2 or 4; 0 on a
// clean launch, 1 on bad arguments, 5 on a launch error.
extern "C" int cf_ar_reduce(void* slots, void* const* outs, int rank, int world, int rows, int n, int ctas,
                            int threads, int unroll, int peers, int poll_ns, int* error,
                            unsigned long long* stamps, void* stream) {
  if (n % 8) return 1;
  auto* sl = static_cast<uint4*>(slots);
  auto* os = reinterpret_cast<uint4* const*>(outs);
  auto* st = static_cast<cudaStream_t>(stream);
  int bad = 1;
  if (world == 2) bad = launch<2>(unroll, ctas, threads, st, sl, os, rank, rows, n / 8, peers, poll_ns, error, stamps);
  if (world == 4) bad = launch<4>(unroll, ctas, threads, st, sl, os, rank, rows, n / 8, peers, poll_ns, error, stamps);
  if (world == 8) bad = launch<8>(unroll, ctas, threads, st, sl, os, rank, rows, n / 8, peers, poll_ns, error, stamps);
  if (bad) return 1;
  return static_cast<int>(cudaGetLastError()) ? 5 : 0;
}
