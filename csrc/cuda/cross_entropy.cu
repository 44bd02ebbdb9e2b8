// Cross-entropy over rows of logits on CUDA: the semantics of csrc/cpu/cross_entropy.cpp (label
// smoothing, z-loss, logit scale and tanh cap, the gradient written in the same call, over the
// logits when asked), one thread block per row.
//
// Pass 1 reads the row once: each thread keeps an online softmax (its max m and sum of exp(z - m),
// rescaled when the max grows, once per 16-byte pack), the sum of z (label smoothing) and a NaN
// flag; the block combines them (warp shuffles, then one shared slot per warp; the sums merged in
// fp64, the row's lse, loss and gradient factors formed in fp64 from them: once per row, not per
// element; token scaling (DFT) weighs each row by its target's probability). Pass 2 reads the
// row again, forms softmax_j = exp(z_j - m) / s and writes the gradient in x's dtype (in place: each
// element is read before its own write, by the same thread). Traffic per element: two reads and one
// write (6 B in bf16); no scratch in global memory. The cap's tanh is recomputed in pass 2.
//
// Block: up to 512 threads (fewer for short rows: one 16-byte pack per thread at least), 16-byte
// loads where the row start, stride and vocab allow it. UNVERIFIED on a GPU (compiled only, sm_80 /
// sm_90, 2026-12-02): the sizes are a first guess, to be measured against Liger-Kernel's Triton
// kernel (bench/bench_cross_entropy.py) when one is lent.
//
// A target outside [0, vocab) that is not ignore_index gives a NaN loss and a NaN gradient for its
// row (a kernel cannot throw; checking first would cost a device-to-host sync per call).
#include <algorithm>
#include <cstdint>

#include "common/cross_entropy_args.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.h"

namespace pyllm {
namespace {

constexpr int kMaxThreads = 512;

struct Args {
  int64_t vocab, stride, grad_stride, ignore_index;
  float scale, softcap, label_smoothing, z_loss, grad_scale;
  bool token_scaling;
};

__device__ __forceinline__ float final_logit(float x, const Args& a) {
  const float z = x * a.scale;
  return a.softcap > 0.f ? a.softcap * tanhf(z / a.softcap) : z;
}

// (max, sum of exp(z - max)) pairs merged; a -inf max has an empty sum. In fp64 (a few merges per
// thread): each fp32 rescale had added an ulp or two to the sum, ~4 ulp over a block's tree, which
// the target's probability (token scaling) carries whole (2-3x torch's error, tools/cuda_emu).
__device__ __forceinline__ void merge(float& m, double& s, float m2, double s2) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) return;
  s = (m == -INFINITY ? 0.0 : s * exp(double(m) - double(top))) +
      (m2 == -INFINITY ? 0.0 : s2 * exp(double(m2) - double(top)));
  m = top;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_kernel(const T* x, const int64_t* __restrict__ targets, float* __restrict__ loss,
                     float* __restrict__ z_part, T* grad, const float* __restrict__ grad_rows, Args a) {
  __shared__ float red_m[kMaxThreads / 32], red_sum[kMaxThreads / 32];
  __shared__ double red_s[kMaxThreads / 32];
  __shared__ int red_nan[kMaxThreads / 32];
  const int64_t r = blockIdx.x, V = a.vocab;
  const T* row = x + r * a.stride;
  T* grow = grad ? grad + r * a.grad_stride : nullptr;
  const int64_t target = targets[r];
  const float nan = __int_as_float(0x7fc00000);
  if (target == a.ignore_index || target < 0 || target >= V) {
    const float fill = target == a.ignore_index ? 0.f : nan;
    if (threadIdx.x == 0) {
      loss[r] = fill;
      if (z_part) z_part[r] = fill;
    }
    if (grow)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) grow[j] = from_f32<T>(fill);
    return;
  }

  // pass 1: per-thread online softmax over whole packs of VEC
  float m = -INFINITY, s = 0.f, z_sum = 0.f;
  int bad = 0;
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < V; j0 += int64_t(blockDim.x) * VEC) {
    float z[VEC];
    if constexpr (VEC > 1) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(row + j0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = final_logit(to_f32(p.v[i]), a);
    } else {
      z[0] = final_logit(to_f32(row[j0]), a);
    }
    float top = m;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      bad |= z[i] != z[i];
      top = fmaxf(top, z[i]);
      z_sum += z[i];
    }
    if (top > m) {
      s = m == -INFINITY ? 0.f : s * expf(m - top);
      m = top;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += z[i] == -INFINITY ? 0.f : expf(z[i] - m);
  }
  double s_all = s;  // (the merges' sum: fp64)
  for (int off = 16; off > 0; off >>= 1) {
    merge(m, s_all, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s_all, off));
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, off);
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s_all;
    red_sum[warp] = z_sum;
    red_nan[warp] = bad;
  }
  __syncthreads();
  m = red_m[0];
  s_all = red_s[0];
  z_sum = red_sum[0];
  bad = red_nan[0];
  for (int w = 1; w < warps; ++w) {  // every thread, in the same order: the same result everywhere
    merge(m, s_all, red_m[w], red_s[w]);
    z_sum += red_sum[w];
    bad |= red_nan[w];
  }
  const bool nan_row = bad || !isfinite(m);
  // The row's scalars in fp64 from the fp32 max and the fp64 sum (once per row and thread, against V
  // elements): in fp32, lse's rounding (|lse| * 6e-8) entered the loss and each softmax, and the
  // target's probability (token scaling) its own few roundings: a loss near 1, which token scaling
  // weighs most, at 6x torch's error, gradients at 3x (32 x 5 logits of std 4, tools/cuda_emu).
  const double log_s = log(s_all), lse = double(m) + log_s;
  // (every thread reads it: token scaling's w scales each thread's gradient; one cached load)
  const float z_t = final_logit(to_f32(row[target]), a);
  const double w = a.token_scaling ? exp(double(z_t) - double(m)) / s_all : 1.0;  // DFT: a constant
  if (threadIdx.x == 0) {
    const double e = a.label_smoothing, zp = a.z_loss * lse * lse;
    // lse - (1 - e) z_t - e mean(z) as (1 - e) (m - z_t + log s) + e (m - mean(z) + log s); e = 0
    // leaves the mean out: a -inf logit (a masked class) makes it -inf, and 0 * inf is NaN
    const double ce = (1.0 - e) * ((double(m) - z_t) + log_s) +
                      (e > 0.0 ? e * ((double(m) - z_sum / double(V)) + log_s) : 0.0);
    loss[r] = nan_row ? nan : float(w * (ce + zp));
    if (z_part) z_part[r] = nan_row ? nan : float(w * zp);
  }
  if (!grow) return;
  __syncthreads();  // every thread read row[target] above; pass 2 may overwrite it (in place)

  // pass 2: the gradient, softmax - e / V - (1 - e) [j = target] + softmax 2 zl lse, through cap and
  // scale, softmax_j times grad_scale as exp(z_j - m) times grad_scale / s (one rounding), as the CPU twin
  const double grad_scale = double(a.grad_scale) * (grad_rows ? grad_rows[r] : 1.f) * w;
  const float smooth = float(grad_scale * a.label_smoothing / double(V));
  const float hit = float(grad_scale * (1.0 - a.label_smoothing));
  const float ce = float(grad_scale / s_all), zl = float(grad_scale * 2.0 * a.z_loss * lse / s_all);
  auto grad_of = [&](float xv, int64_t j) {
    if (nan_row) return nan;
    const float z = xv * a.scale;
    float chain = a.scale, zf = z;
    if (a.softcap > 0.f) {
      const float t = tanhf(z / a.softcap);
      zf = a.softcap * t;
      chain *= 1.f - t * t;
    }
    // the z-loss's share apart: folded into one factor, the label's 1 - p would cancel against it
    const float e = expf(zf - m);
    return ((e * ce - smooth - (j == target ? hit : 0.f)) + e * zl) * chain;
  };
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < V; j0 += int64_t(blockDim.x) * VEC) {
    if constexpr (VEC > 1) {
      Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(row + j0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) p.v[i] = from_f32<T>(grad_of(to_f32(p.v[i]), j0 + i));
      *reinterpret_cast<Pack<T, VEC>*>(grow + j0) = p;
    } else {
      grow[j0] = from_f32<T>(grad_of(to_f32(row[j0]), j0));
    }
  }
}

}  // namespace

void cross_entropy_cuda(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t z_part, uintptr_t grad,
                        uintptr_t grad_rows, int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride,
                        int64_t ignore_index,
                        double scale, double softcap, double label_smoothing, double z_loss, double grad_scale,
                        int dtype, int device, uintptr_t stream, bool token_scaling) {
  check_cross_entropy_args(logits, targets, loss, grad, rows, vocab, stride, grad_stride, scale, softcap,
                           label_smoothing, z_loss, grad_scale, dtype);
  PYLLM_CHECK(rows < (int64_t(1) << 31), "cross_entropy: too many rows for one launch: ", rows);
  if (rows == 0) return;
  DeviceGuard guard(device);
  const Args a{vocab, stride, grad_stride, ignore_index, float(scale), float(softcap), float(label_smoothing),
               float(z_loss), float(grad_scale), token_scaling};
  PYLLM_DISPATCH_CUDA(dtype, T, {
    constexpr int VEC = 16 / sizeof(T);
    auto aligned = [](uintptr_t p, int64_t row_stride) { return p % 16 == 0 && row_stride % VEC == 0; };
    const bool vec = vocab % VEC == 0 && aligned(logits, stride) && (grad == 0 || aligned(grad, grad_stride));
    const int64_t per_thread = vec ? VEC : 1, packs = (vocab + per_thread - 1) / per_thread;
    const int threads = int(std::min<int64_t>(kMaxThreads, (packs + 31) / 32 * 32));
    auto xp = reinterpret_cast<const T*>(logits);
    auto tp = reinterpret_cast<const int64_t*>(targets);
    auto lp = reinterpret_cast<float*>(loss), zp = reinterpret_cast<float*>(z_part);
    auto gp = reinterpret_cast<T*>(grad);
    auto rp = reinterpret_cast<const float*>(grad_rows);
    if (vec)
      cross_entropy_kernel<T, VEC><<<unsigned(rows), threads, 0, as_stream(stream)>>>(xp, tp, lp, zp, gp, rp, a);
    else
      cross_entropy_kernel<T, 1><<<unsigned(rows), threads, 0, as_stream(stream)>>>(xp, tp, lp, zp, gp, rp, a);
  });
  PYLLM_CUDA_CHECK_LAUNCH("cross_entropy");
}

}  // namespace pyllm
