// Rotary position embedding on the GPU: the semantics and layout of the CPU twin, csrc/cpu/rope.cpp
// (rotate-half pairs (i, i + R/2) of each (batch, token, head) row by the token's angles, dims R..D
// passed through, inverse = minus the angle for the backward; fp32 math, one rounding), or the
// interleaved pairs (2i, 2i + 1) (unverified on a GPU, 2026-12-03).
//
// Algorithm: one thread per output pair (or passed-through element), a grid-stride loop over
// rows x (D - R/2) items, consecutive threads on consecutive dims of a row, so loads and stores of
// a warp are contiguous runs; cos / sin rows are read by the H heads of a token (L1 / L2 hits).
// Traffic per element: reads x, writes out (4 B bf16); FLOPs: 3 per element. 2048 tokens x 32 heads
// x 128 bf16 move 34 MB: ~11 us at the H100's ~3.0 TB/s copy rate.
//
// Unverified: not yet run on a GPU; kThreads and the grid cap are swiglu.cu's starting values.
#include <algorithm>

#include "common/rope_args.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.h"

namespace pyllm {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* __restrict__ x, const float* __restrict__ cos,
                                                       const float* __restrict__ sin, T* __restrict__ out, RopeShape sh) {
  const int64_t per_row = sh.head_dim - sh.half;  // R/2 pairs, then D - R passed through
  const int64_t n = sh.batch * sh.seqlen * sh.n_heads * per_row;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t j = idx % per_row, row = idx / per_row;
    const int64_t h = row % sh.n_heads, bt = row / sh.n_heads;
    const int64_t t = bt % sh.seqlen, b = bt / sh.seqlen;
    const T* xr = x + b * sh.xs[0] + t * sh.xs[1] + h * sh.xs[2];
    T* orow = out + b * sh.os[0] + t * sh.os[1] + h * sh.os[2];
    if (j >= sh.half) {  // dims R..D
      orow[j + sh.half] = xr[j + sh.half];
      continue;
    }
    const int64_t cs = b * sh.cs_batch_stride + t * sh.half + j;
    const float c = cos[cs], s = sh.inverse ? -sin[cs] : sin[cs];
    const int64_t a = sh.first(j), b2 = sh.second(j);  // (j, j + R/2), or (2j, 2j + 1) interleaved
    const float x1 = to_f32(xr[a]), x2 = to_f32(xr[b2]);
    orow[a] = from_f32<T>(x1 * c - x2 * s);
    orow[b2] = from_f32<T>(x2 * c + x1 * s);
  }
}

}  // namespace

void rope_cuda(uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t seqlen,
               int64_t n_heads, int64_t head_dim, int64_t half, const std::vector<int64_t>& x_strides,
               const std::vector<int64_t>& out_strides, int64_t cs_batch_stride, bool inverse, int dtype, int device,
               uintptr_t stream, bool interleaved) {
  const RopeShape sh = rope_shape(x, cos, sin, out, batch, seqlen, n_heads, head_dim, half, x_strides, out_strides,
                                  cs_batch_stride, inverse, dtype, interleaved);
  const int64_t items = sh.rows() * (head_dim - half);
  if (items == 0) return;
  DeviceGuard guard(device);
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks)));
  PYLLM_DISPATCH_CUDA(dtype, T,
                      rope_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
                          reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(cos),
                          reinterpret_cast<const float*>(sin), reinterpret_cast<T*>(out), sh));
  PYLLM_CUDA_CHECK_LAUNCH("rope");
}

}  // namespace pyllm
