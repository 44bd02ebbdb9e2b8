// Cross-entropy over rows of logits on CUDA: the semantics of csrc/cpu/cross_entropy.cpp (label
// smoothing, z-loss, logit scale and tanh cap, the gradient written in the same call, over the
// logits when asked), one thread block per row.
//
// Pass 1 reads the row once: each thread keeps an online softmax (its max m and sum of exp(z - m),
// rescaled when the max grows, once per 16-byte pack), the sum of z (label smoothing) and a NaN
// flag; the block combines them (warp shuffles, then one shared slot per warp). Pass 2 reads the
// row again, forms softmax_j = exp(z_j - lse) and writes the gradient in x's dtype (in place: each
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
};

__device__ __forceinline__ float final_logit(float x, const Args& a) {
  const float z = x * a.scale;
  return a.softcap > 0.f ? a.softcap * tanhf(z / a.softcap) : z;
}

// (max, sum of exp(z - max)) pairs merged; a -inf max has an empty sum.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * expf(m - top)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - top));
  m = top;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_kernel(const T* x, const int64_t* __restrict__ targets, float* __restrict__ loss,
                     float* __restrict__ z_part, T* grad, const float* __restrict__ grad_rows, Args a) {
  __shared__ float red_m[kMaxThreads / 32], red_s[kMaxThreads / 32], red_sum[kMaxThreads / 32];
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
  for (int off = 16; off > 0; off >>= 1) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, off);
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
    red_sum[warp] = z_sum;
    red_nan[warp] = bad;
  }
  __syncthreads();
  m = red_m[0];
  s = red_s[0];
  z_sum = red_sum[0];
  bad = red_nan[0];
  for (int w = 1; w < warps; ++w) {  // every thread, in the same order: the same result everywhere
    merge(m, s, red_m[w], red_s[w]);
    z_sum += red_sum[w];
    bad |= red_nan[w];
  }
  const bool nan_row = bad || !isfinite(m);
  const float lse = m + logf(s);
  if (threadIdx.x == 0) {
    const float e = a.label_smoothing, zp = a.z_loss * lse * lse;
    const float z_t = final_logit(to_f32(row[target]), a);
    // e = 0 leaves the mean out: a -inf logit (a masked class) makes it -inf, and 0 * inf is NaN
    loss[r] = nan_row ? nan : lse - (1.f - e) * z_t - (e > 0.f ? e * z_sum / float(V) : 0.f) + zp;
    if (z_part) z_part[r] = nan_row ? nan : zp;
  }
  if (!grow) return;
  __syncthreads();  // thread 0 read row[target] above; pass 2 may overwrite it (in place)

  // pass 2: the gradient, softmax - e / V - (1 - e) [j = target] + softmax 2 zl lse, through cap and scale
  const float grad_scale = a.grad_scale * (grad_rows ? grad_rows[r] : 1.f);
  const float zl = grad_scale * 2.f * a.z_loss * lse, smooth = grad_scale * a.label_smoothing / float(V);
  const float hit = grad_scale * (1.f - a.label_smoothing);
  // softmax_j = exp(z_j - m) / s as torch's softmax forms it: exp(z_j - lse) with lse rounded to fp32
  // carried lse's absolute error, ~|lse| * 6e-8, into every element (fp32 gradient of 6 x 100
  // logits of std 4 in tools/cuda_emu: 1.9e-7 relative against torch's 4e-8)
  const float inv_s = 1.f / s;
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
    const float p = expf(zf - m) * inv_s;
    return ((p * grad_scale - smooth - (j == target ? hit : 0.f)) + p * zl) * chain;
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
                        int dtype, int device, uintptr_t stream) {
  check_cross_entropy_args(logits, targets, loss, grad, rows, vocab, stride, grad_stride, scale, softcap,
                           label_smoothing, z_loss, grad_scale, dtype);
  PYLLM_CHECK(rows < (int64_t(1) << 31), "cross_entropy: too many rows for one launch: ", rows);
  if (rows == 0) return;
  DeviceGuard guard(device);
  const Args a{vocab, stride, grad_stride, ignore_index, float(scale), float(softcap), float(label_smoothing),
               float(z_loss), float(grad_scale)};
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
