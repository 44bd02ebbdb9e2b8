// Fused RMSNorm on the GPU: y = x * rstd * (offset + w), rstd = 1 / sqrt(mean(x^2) + eps), and its
// backward; the semantics (cast_first, offset, no weight) of the CPU twin, csrc/cpu/rms_norm.cpp.
//
// Algorithm: a row group of `threads_per_row` threads per row, each thread on 16-byte vectors
// (8 bf16 / fp16 or 4 fp32 elements) strided by the group width; the sum of squares reduced by warp
// shuffles, then across the group's warps through shared memory. Rows of up to 1,024 16-bit
// elements (256 fp32) get one warp each, 4 rows per block; longer rows get a block of up to 512
// threads each, about 4 vectors per thread. The forward writes rstd (fp32, one per row) for the
// backward. Each row is read twice (sum of squares, then the output); the second read comes from
// L1 / L2, so DRAM sees it once.
//
// Backward: blocks of 512 threads (512 / threads_per_row row groups; fewer groups where their dw rows
// would not fit the GPU's shared memory), as many as fill the GPU once
// (the occupancy calculator's blocks per SM x SMs), each group walking rows group, group + n_groups,
// ...: per row, mean(g * h) by the same reduction, then dx = rstd * (g - h * mean(g * h)),
// g = dy * (offset + w), h = x * rstd. A thread owns the same columns in every row, so its
// dw = sum dy * h accumulates in its own slots of a cols-wide fp32 row in shared memory (no atomics,
// no races); at the end a block sums its groups' rows into one row of `dweight_partials`, and the
// caller sums those (blocks x cols fp32: ~400 x 4,096 x 4 B = 6.5 MB for a 4K-wide model on an
// H100, against 134 MB of dy and x for 8K tokens). Deterministic: the grid depends only on the
// shapes and the GPU.
//
// Memory traffic per element (the floor; both kernels are bandwidth-bound):
//   forward  reads x, writes y:          2 elements (4 B bf16, 8 B fp32), + w once per block
//   backward reads dy, x, writes dx:     3 elements (6 B bf16, 12 B fp32), + the partials
// FLOPs: ~4 forward, ~10 backward per element: 8K x 4K bf16 forward moves 134 MB, ~45 us at the
// H100's ~3.0 TB/s copy rate.
//
// Unverified: not yet run on a GPU. The geometry constants are starting values (Liger-Kernel's and
// Apex's choices for these row widths), not measurements.
#include <algorithm>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.h"

namespace pyllm {
namespace {

constexpr int kWarpRowsPerBlock = 4;      // rows per block when one warp takes a row
constexpr int kVectorsPerThread = 4;      // target vectors per thread for longer rows
constexpr int kMaxThreadsPerRow = 512;    // 128 registers per thread stay available
constexpr int kBwdThreads = 512;          // backward blocks: 512 / threads_per_row row groups each
constexpr int64_t kMaxCols = 32768;       // the backward's fp32 dw row: 128 KB of shared memory, which
                                          // sm_80 (163 KB) and sm_90 (227 KB) give; sm_86 / sm_89 (99 KB)
                                          // take rows up to 25,328 with a weight gradient

struct Geometry {
  int threads_per_row, rows_per_block;
};

// From the row width alone (not the alignment), so that the backward's partial count, asked for
// before the launch, matches the launch.
Geometry geometry(int64_t cols, int64_t elem_size) {
  const int64_t vectors = (cols * elem_size + 15) / 16;
  if (vectors <= 32 * kVectorsPerThread) return {32, kWarpRowsPerBlock};
  const int64_t threads = ((vectors + kVectorsPerThread - 1) / kVectorsPerThread + 31) / 32 * 32;
  return {int(std::min<int64_t>(threads, kMaxThreadsPerRow)), 1};
}

// Sum over each row group (blockDim.x threads, a multiple of 32) of a block whose groups all call
// it together (the forward's wide groups have a block each; the backward's rows loop runs the same
// count in every group): red holds one slot per warp of the block.
__device__ __forceinline__ float group_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x <= 32) return v;
  const int warps_per_row = blockDim.x / 32, lane = threadIdx.x % 32;
  const int warp = threadIdx.y * warps_per_row + threadIdx.x / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < warps_per_row ? red[threadIdx.y * warps_per_row + lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  __syncthreads();
  return t;
}

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_f32(pack.v[j]);
}

template <typename T>
__device__ __forceinline__ float rounded(float v, bool cast_first) {
  return cast_first ? to_f32(from_f32<T>(v)) : v;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, float* __restrict__ rstd,
                    int64_t rows, int64_t cols, float eps, float offset, bool cast_first) {
  __shared__ float red[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // a whole warp (rows_per_block > 1) or the whole block (= 1)
  const int64_t vcols = cols / VEC;
  const T* x_row = x + row * cols;
  T* o_row = out + row * cols;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < vcols; i += blockDim.x) {
    float v[VEC];
    load<T, VEC>(x_row + i * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss = fmaf(v[j], v[j], ss);
  }
  const float s = 1.0f / sqrtf(group_sum(ss, red) / float(cols) + eps);
  if (threadIdx.x == 0) rstd[row] = s;
  for (int64_t i = threadIdx.x; i < vcols; i += blockDim.x) {
    float v[VEC], wv[VEC];
    load<T, VEC>(x_row + i * VEC, v);
    if (w != nullptr) load<T, VEC>(w + i * VEC, wv);
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o.v[j] = from_f32<T>(w != nullptr ? rounded<T>(v[j] * s, cast_first) * (offset + wv[j]) : v[j] * s);
    *reinterpret_cast<Pack<T, VEC>*>(o_row + i * VEC) = o;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdThreads)
rms_norm_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ w,
                    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_partials, int64_t rows,
                    int64_t cols, float offset, bool cast_first) {
  __shared__ float red[kBwdThreads / 32];
  extern __shared__ float dw_rows[];  // rows_per_block x cols when dw is wanted
  const int64_t group = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t n_groups = int64_t(gridDim.x) * blockDim.y;
  const int64_t vcols = cols / VEC;
  const bool want_dw = dw_partials != nullptr;
  float* dw_acc = dw_rows + threadIdx.y * cols;
  if (want_dw)
    for (int64_t i = threadIdx.x; i < vcols; i += blockDim.x)
#pragma unroll
      for (int j = 0; j < VEC; ++j) dw_acc[i * VEC + j] = 0.0f;  // a thread's own slots
  const float inv_cols = 1.0f / float(cols);
  const int64_t steps = (rows + n_groups - 1) / n_groups;  // the same in every group: group_sum syncs
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t row = group + step * n_groups;
    const bool live = row < rows;
    const T* d_row = dout + row * cols;
    const T* x_row = x + row * cols;
    const float s = live ? rstd[row] : 0.0f;
    float gh = 0.0f;
    for (int64_t i = threadIdx.x; live && i < vcols; i += blockDim.x) {
      float d[VEC], v[VEC], wv[VEC];
      load<T, VEC>(d_row + i * VEC, d);
      load<T, VEC>(x_row + i * VEC, v);
      if (w != nullptr) load<T, VEC>(w + i * VEC, wv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) gh = fmaf(d[j] * (w != nullptr ? offset + wv[j] : 1.0f), v[j] * s, gh);
    }
    const float mean_gh = group_sum(gh, red) * inv_cols;
    T* dx_row = dx + row * cols;
    for (int64_t i = threadIdx.x; live && i < vcols; i += blockDim.x) {
      float d[VEC], v[VEC], wv[VEC];
      load<T, VEC>(d_row + i * VEC, d);
      load<T, VEC>(x_row + i * VEC, v);
      if (w != nullptr) load<T, VEC>(w + i * VEC, wv);
      Pack<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float h = v[j] * s, g = d[j] * (w != nullptr ? offset + wv[j] : 1.0f);
        o.v[j] = from_f32<T>(s * (g - h * mean_gh));
        if (want_dw) dw_acc[i * VEC + j] += d[j] * rounded<T>(h, cast_first);
      }
      *reinterpret_cast<Pack<T, VEC>*>(dx_row + i * VEC) = o;
    }
  }
  if (!want_dw) return;
  __syncthreads();  // the block's groups' rows summed into one partial row, in group order
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, n_threads = blockDim.x * blockDim.y;
  for (int64_t c = tid; c < cols; c += n_threads) {
    float total = 0.0f;
    for (int y = 0; y < int(blockDim.y); ++y) total += dw_rows[y * cols + c];
    dw_partials[int64_t(blockIdx.x) * cols + c] = total;
  }
}

void check_args(const char* what, int64_t rows, int64_t cols, double eps, double offset, int dtype,
                std::initializer_list<uintptr_t> ptrs) {
  PYLLM_CHECK(rows >= 0 && cols >= 1, what, ": rows must be >= 0 and cols >= 1, got ", rows, " and ", cols);
  PYLLM_CHECK(cols <= kMaxCols, what, ": the CUDA kernel takes rows of at most ", kMaxCols, " elements, got ", cols);
  PYLLM_CHECK(eps >= 0 && eps < 1e30, what, ": eps must be finite and >= 0, got ", eps);
  PYLLM_CHECK(offset > -1e30 && offset < 1e30, what, ": offset must be finite, got ", offset);
  dtype_size(dtype);
  if (rows > 0)
    for (uintptr_t p : ptrs) PYLLM_CHECK(p != 0, what, ": null data pointer for a non-empty tensor");
}

bool vectorizable(int64_t cols, int64_t vec, std::initializer_list<uintptr_t> ptrs) {
  for (uintptr_t p : ptrs)
    if (p % 16) return false;
  return cols % vec == 0;
}

// The backward's launch: blocks of up to kBwdThreads threads (512 / threads_per_row row groups, fewer
// where their dw rows would not fit the GPU's shared memory: 99 KB a block on sm_86 / sm_89, 163 KB
// on sm_80, 227 KB on sm_90), as many as fill the GPU once (the occupancy calculator's blocks per SM,
// for the vector form; the scalar one has the same block and shared memory). One dw partial row per
// block. From the shapes, dtype, device and whether dw is wanted alone, so that the partial count
// asked for before the launch (rms_norm_partials_cuda) is the launch's.
struct BwdLaunch {
  Geometry g;
  int64_t blocks, smem;
};

template <typename T>
BwdLaunch bwd_launch(int64_t rows, int64_t cols, int device, bool want_dw) {
  int smem_limit = 0, per_sm = 0, sms = 0;
  PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto kernel = rms_norm_bwd_kernel<T, 16 / sizeof(T)>;
  cudaFuncAttributes attributes{};
  PYLLM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  smem_limit -= int(attributes.sharedSizeBytes);  // the kernel's static `red` counts against the opt-in too
  const int64_t row_bytes = cols * int64_t(sizeof(float));
  Geometry g = geometry(cols, sizeof(T));
  g.rows_per_block = kBwdThreads / g.threads_per_row;
  if (want_dw) g.rows_per_block = int(std::max<int64_t>(1, std::min<int64_t>(g.rows_per_block, smem_limit / row_bytes)));
  const int64_t smem = want_dw ? g.rows_per_block * row_bytes : 0;
  PYLLM_CHECK_RUNTIME(smem <= smem_limit, "rms_norm_backward: the weight gradient of rows of ", cols, " elements needs ",
                      smem, " bytes of shared memory per block, more than this GPU gives (", smem_limit, ")");
  if (smem > 48 * 1024) {  // above the default, shared memory is opted into per kernel
    PYLLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    PYLLM_CUDA_CHECK(cudaFuncSetAttribute(rms_norm_bwd_kernel<T, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
  }
  PYLLM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, g.threads_per_row * g.rows_per_block,
                                                                 size_t(smem)));
  PYLLM_CHECK_RUNTIME(per_sm > 0, "rms_norm_backward: no block of ", g.threads_per_row * g.rows_per_block,
                      " threads and ", smem, " bytes of shared memory fits an SM of this GPU");
  const int64_t needed = (rows + g.rows_per_block - 1) / g.rows_per_block;
  return {g, std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(per_sm) * sms)), smem};
}

}  // namespace

void rms_norm_fwd_cuda(uintptr_t x, uintptr_t weight, uintptr_t out, uintptr_t rstd, int64_t rows, int64_t cols,
                       double eps, double offset, bool cast_first, int dtype, int device, uintptr_t stream) {
  check_args("rms_norm", rows, cols, eps, offset, dtype, {x, out, rstd});
  if (rows == 0) return;
  DeviceGuard guard(device);
  PYLLM_DISPATCH_CUDA(dtype, T, {
    constexpr int VEC = 16 / sizeof(T);
    const Geometry g = geometry(cols, sizeof(T));
    const dim3 block(g.threads_per_row, g.rows_per_block);
    const int64_t blocks = (rows + g.rows_per_block - 1) / g.rows_per_block;
    PYLLM_CHECK(blocks < (int64_t(1) << 31), "rms_norm: too many rows for one launch: ", rows);
    auto xp = reinterpret_cast<const T*>(x), wp = reinterpret_cast<const T*>(weight);
    auto op = reinterpret_cast<T*>(out);
    auto sp = reinterpret_cast<float*>(rstd);
    if (vectorizable(cols, VEC, {x, weight, out}))
      rms_norm_fwd_kernel<T, VEC><<<unsigned(blocks), block, 0, as_stream(stream)>>>(
          xp, wp, op, sp, rows, cols, float(eps), float(offset), cast_first);
    else
      rms_norm_fwd_kernel<T, 1><<<unsigned(blocks), block, 0, as_stream(stream)>>>(
          xp, wp, op, sp, rows, cols, float(eps), float(offset), cast_first);
  });
  PYLLM_CUDA_CHECK_LAUNCH("rms_norm_fwd");
}

int64_t rms_norm_partials_cuda(int64_t rows, int64_t cols, int dtype, int device) {
  check_args("rms_norm_backward", rows, cols, 0.0, 0.0, dtype, {});
  if (rows == 0) return 0;
  DeviceGuard guard(device);
  int64_t blocks = 0;
  PYLLM_DISPATCH_CUDA(dtype, T, blocks = bwd_launch<T>(rows, cols, device, true).blocks);
  return blocks;
}

void rms_norm_bwd_cuda(uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx,
                       uintptr_t dweight_partials, int64_t n_partials, int64_t rows, int64_t cols, double offset,
                       bool cast_first, int dtype, int device, uintptr_t stream) {
  check_args("rms_norm_backward", rows, cols, 0.0, offset, dtype, {dout, x, rstd, dx});
  PYLLM_CHECK(dweight_partials == 0 || weight != 0, "rms_norm_backward: dweight_partials given without a weight");
  if (rows == 0) return;
  DeviceGuard guard(device);
  PYLLM_DISPATCH_CUDA(dtype, T, {
    constexpr int VEC = 16 / sizeof(T);
    const BwdLaunch launch = bwd_launch<T>(rows, cols, device, dweight_partials != 0);
    PYLLM_CHECK(dweight_partials == 0 || n_partials == launch.blocks, "rms_norm_backward: ", launch.blocks,
                " dweight partial rows needed (rms_norm_partials_cuda), got ", n_partials);
    const dim3 block(launch.g.threads_per_row, launch.g.rows_per_block);
    const unsigned blocks = unsigned(launch.blocks);
    const size_t smem = size_t(launch.smem);
    auto dp = reinterpret_cast<const T*>(dout), xp = reinterpret_cast<const T*>(x);
    auto wp = reinterpret_cast<const T*>(weight);
    auto sp = reinterpret_cast<const float*>(rstd);
    auto dxp = reinterpret_cast<T*>(dx);
    auto pp = reinterpret_cast<float*>(dweight_partials);
    if (vectorizable(cols, VEC, {dout, x, weight, dx}))
      rms_norm_bwd_kernel<T, VEC><<<unsigned(blocks), block, smem, as_stream(stream)>>>(
          dp, xp, wp, sp, dxp, pp, rows, cols, float(offset), cast_first);
    else
      rms_norm_bwd_kernel<T, 1><<<unsigned(blocks), block, smem, as_stream(stream)>>>(
          dp, xp, wp, sp, dxp, pp, rows, cols, float(offset), cast_first);
  });
  PYLLM_CUDA_CHECK_LAUNCH("rms_norm_bwd");
}

}  // namespace pyllm
