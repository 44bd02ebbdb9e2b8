// The generalized Jensen-Shannon divergence of GKD between a student's and a teacher's rows of
// logits on CUDA: the semantics of csrc/cpu/distill.cpp (beta 0: forward KL(q || p), beta 1: reverse
// KL(p || q), else the mixture's; temperature, each side's scale and tanh cap; the student's
// gradient written in the same call, over its logits when asked), one thread block per row.
//
// Each side's logits shaped as cross_entropy.cu's (z = scale * x, then cap * tanh(z / cap)) and
// divided by T; s, t their log-softmaxes, p = e^s, q = e^t. The formulas are distill.cpp's header's.
//
// Passes per row, each re-reading both rows (no scratch in global memory). A 49,152-wide bf16 row
// pair is 192 KB: H100's 50 MB L2 holds ~260 of them, fewer than a full wave of blocks (4 of 512
// threads on each of 132 SMs), so the later passes may read from HBM: to be measured.
//   (1) each thread an online softmax per side (max and sum of exp(z - max)) and a NaN flag, merged
//       over the block: both log-sum-exps;
//   (2) beta 0: the loss's sum and the gradient p - q (written); else the loss's sums (K);
//   (3) beta != 0: the gradient, p (s - t - K) or (1 - beta) p (s - m - K).
// Traffic per element: both logits read 2 (beta 0) or 3 times, the gradient written once (10 or 14
// B in bf16). The cap's tanh is recomputed in each pass. Exps in fp32 (expf, logf: not the fast
// intrinsics, whose error grows with |x|); each thread's sums in fp64 (one add per element, cheap
// beside the exps on sm_80 / sm_90, whose fp64 runs at half the fp32 rate; sm_86 / sm_89's 1/64
// rate may make them count there) and merged in fp64, the
// KLs over the unnormalised exps with their constants apart, as on the CPU (torch's formula in fp32
// had 3x torch's loss error there).
//
// In place (grad == student): an element is read and written by one thread only, in the last pass,
// and every pass before ends at a block barrier (the reduction), so no thread reads an element
// another has overwritten.
//
// A term of weight 0 (a -inf logit, or an exp below fp32's range) counts 0 and gets a zero
// gradient; a NaN logit or a +-inf largest logit on either side gives the row a NaN loss and
// gradient; a row whose gradient factor (grad_scale times its grad_rows entry) is 0 gets zeros.
//
// Block: up to 512 threads (fewer for short rows), 16-byte loads where both rows' (and the
// gradient's) starts and strides allow it. UNVERIFIED on a GPU (compiled only, sm_80 / sm_90,
// 2026-12-02): the sizes are cross_entropy.cu's first guess, to be measured (bench/bench_distill.py
// --logits) when one is lent.
#include <algorithm>
#include <cstdint>

#include "common/distill_args.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.h"

namespace pyllm {
namespace {

constexpr int kMaxThreads = 512, kWarps = kMaxThreads / 32;

// beta and the gradient's factors in fp64, as the CPU twin's: beta = 1 - 1e-8 rounded to fp32 is 1
// (the reverse KL, where the mixture is ~0), and 1 - float(beta) carries 2^-24 / (1 - beta) relative
// error (1e-5 at 0.999) into the mixture's (1 - beta) K and its whole gradient.
struct Args {
  int64_t vocab, student_stride, teacher_stride, grad_stride;
  float scale, softcap, teacher_scale, teacher_softcap, temperature;
  double beta, grad_scale, scale_over_t;
};

// The shaped logit over T, and the cap's tanh (0 when uncapped) for the gradient's chain.
__device__ __forceinline__ float shaped(float x, float scale, float cap, float temperature, float& th) {
  const float z = x * scale;
  th = cap > 0.f ? tanhf(z / cap) : 0.f;
  return (cap > 0.f ? cap * th : z) / temperature;
}

// value where weight > 0, else 0 (a term of weight 0 counts 0, whatever its value: -inf, NaN)
__device__ __forceinline__ float weighted(float weight, float value) { return weight > 0.f ? value : 0.f; }

// (max, sum of exp(z - max)) pairs merged; a -inf max has an empty sum.
__device__ __forceinline__ void merge(float& m, double& s, float m2, double s2) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) return;
  s = (m == -INFINITY ? 0.0 : s * double(expf(m - top))) + (m2 == -INFINITY ? 0.0 : s2 * double(expf(m2 - top)));
  m = top;
}

// N sums over the block, the same in every thread (warp shuffles, then the warps' in order). The
// pass before it is over in every thread once it returns, and its slots may be used again.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double (*slots)[kWarps]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) slots[i][warp] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = slots[i][0];
    for (int w = 1; w < warps; ++w) v[i] += slots[i][w];
  }
  __syncthreads();
}

// f(s, t, g) over the thread's packs of VEC elements of both rows (fp32 arrays; 16-byte loads when
// VEC > 1); the pack's gradient g stored in T when the pass writes one (Write).
template <typename T, int VEC, bool Write, typename F>
__device__ __forceinline__ void for_packs(const T* xs, const T* xt, T* grad, int64_t V, F f) {
  for (int64_t j0 = int64_t(threadIdx.x) * VEC; j0 < V; j0 += int64_t(blockDim.x) * VEC) {
    float s[VEC], t[VEC], g[VEC];
    if constexpr (VEC > 1) {
      const Pack<T, VEC> ps = *reinterpret_cast<const Pack<T, VEC>*>(xs + j0);
      const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(xt + j0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] = to_f32(ps.v[i]), t[i] = to_f32(pt.v[i]);
    } else {
      s[0] = to_f32(xs[j0]), t[0] = to_f32(xt[j0]);
    }
    f(s, t, g);
    if constexpr (Write) {
      if constexpr (VEC > 1) {
        Pack<T, VEC> out;
#pragma unroll
        for (int i = 0; i < VEC; ++i) out.v[i] = from_f32<T>(g[i]);
        *reinterpret_cast<Pack<T, VEC>*>(grad + j0) = out;
      } else {
        grad[j0] = from_f32<T>(g[0]);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
distill_kernel(const T* student, const T* __restrict__ teacher, float* __restrict__ loss, T* grad,
               const float* __restrict__ grad_rows, Args a) {
  __shared__ float red_m[2][kWarps];
  __shared__ double red_s[2][kWarps], slots[2][kWarps];
  __shared__ int red_nan[kWarps];
  const int64_t r = blockIdx.x, V = a.vocab;
  const T* xs = student + r * a.student_stride;
  const T* xt = teacher + r * a.teacher_stride;
  T* grow = grad ? grad + r * a.grad_stride : nullptr;
  const double row_scale = a.grad_scale * (grad_rows ? double(grad_rows[r]) : 1.0);
  const bool zero_grad = row_scale == 0;  // its loss still computed: the row may be its own gradient
  const float nan = __int_as_float(0x7fc00000), T_ = a.temperature;
  // both sides shaped at element i of a pack; th_s the student's cap tanh (the gradient's chain)
  float zs[VEC], zt[VEC], th_s[VEC];
  auto shape_pack = [&](const float (&s)[VEC], const float (&t)[VEC]) {
    float unused;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      zs[i] = shaped(s[i], a.scale, a.softcap, T_, th_s[i]);
      zt[i] = shaped(t[i], a.teacher_scale, a.teacher_softcap, T_, unused);
    }
  };

  // (1) both sides' online softmax, rescaled once per pack when a max grows
  float m_s = -INFINITY, m_t = -INFINITY;
  double sum_s = 0, sum_t = 0;
  int bad = 0;
  for_packs<T, VEC, false>(xs, xt, grow, V, [&](const float (&s)[VEC], const float (&t)[VEC], float (&)[VEC]) {
    shape_pack(s, t);
    float top_s = m_s, top_t = m_t;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      bad |= (zs[i] != zs[i]) | (zt[i] != zt[i]);
      top_s = fmaxf(top_s, zs[i]);
      top_t = fmaxf(top_t, zt[i]);
    }
    if (top_s > m_s) {
      sum_s = m_s == -INFINITY ? 0.0 : sum_s * double(expf(m_s - top_s));
      m_s = top_s;
    }
    if (top_t > m_t) {
      sum_t = m_t == -INFINITY ? 0.0 : sum_t * double(expf(m_t - top_t));
      m_t = top_t;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum_s += zs[i] == -INFINITY ? 0.0 : double(expf(zs[i] - m_s));
      sum_t += zt[i] == -INFINITY ? 0.0 : double(expf(zt[i] - m_t));
    }
  });
  for (int off = 16; off > 0; off >>= 1) {
    merge(m_s, sum_s, __shfl_xor_sync(0xffffffffu, m_s, off), __shfl_xor_sync(0xffffffffu, sum_s, off));
    merge(m_t, sum_t, __shfl_xor_sync(0xffffffffu, m_t, off), __shfl_xor_sync(0xffffffffu, sum_t, off));
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    red_m[0][warp] = m_s, red_s[0][warp] = sum_s;
    red_m[1][warp] = m_t, red_s[1][warp] = sum_t;
    red_nan[warp] = bad;
  }
  __syncthreads();
  m_s = red_m[0][0], sum_s = red_s[0][0], m_t = red_m[1][0], sum_t = red_s[1][0], bad = red_nan[0];
  for (int w = 1; w < warps; ++w) {  // every thread, in the same order: the same result everywhere
    merge(m_s, sum_s, red_m[0][w], red_s[0][w]);
    merge(m_t, sum_t, red_m[1][w], red_s[1][w]);
    bad |= red_nan[w];
  }
  if (bad || !isfinite(m_s) || !isfinite(m_t)) {
    if (threadIdx.x == 0) loss[r] = nan;
    if (grow) {
      const T fill = from_f32<T>(zero_grad ? 0.f : nan);
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) grow[j] = fill;
    }
    return;
  }
  const double lse_s = double(m_s) + log(sum_s), lse_t = double(m_t) + log(sum_t);
  // the gradient's factor per element: the row's (grad_scale, its grad_rows entry, / T, the scale)
  // and the cap's 1 - tanh^2
  const float factor = float(row_scale * a.scale_over_t);
  auto chain = [&](int i) { return a.softcap > 0.f ? factor * (1.f - th_s[i] * th_s[i]) : factor; };
  const double beta = a.beta;

  if (beta == 0) {  // (2) KL(q || p) = sum_j exp(z_t - m_t) (z_t - z_s) / sum_t + lse_s - lse_t; p - q
    double v[1] = {0};
    // p = exp((z_s - m_s) - log sum_s): z_s - lse_s in fp32 would round lse_s at the logits' magnitude
    const float log_sum = float(log(sum_s)), inv_sum = float(1.0 / sum_t);
    auto pass = [&](const float (&s)[VEC], const float (&t)[VEC], float (&g)[VEC]) {
      shape_pack(s, t);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float e = expf(zt[i] - m_t);
        v[0] += double(weighted(e, e * (zt[i] - zs[i])));
        g[i] = zero_grad ? 0.f : (expf((zs[i] - m_s) - log_sum) - e * inv_sum) * chain(i);
      }
    };
    if (grow)
      for_packs<T, VEC, true>(xs, xt, grow, V, pass);
    else
      for_packs<T, VEC, false>(xs, xt, grow, V, pass);
    block_sum(v, slots);
    if (threadIdx.x == 0) loss[r] = float(v[0] / sum_t + (lse_s - lse_t));
    return;
  }

  // d = s - t (beta 1), or s - m for the mixture, and m - t, at a pack's element i: with u = s - t,
  // m - t = log(beta + (1 - beta) e^u), each difference formed apart and the log's argument in
  // [min(beta, 1 - beta), 1], as distill.cpp's row()
  const float shift = float(lse_t - lse_s), wq = float(beta), wp = float(1 - beta);
  auto diffs = [&](int i, float& m_minus_t) {
    if (beta == 1) {
      m_minus_t = 0.f;
      return zs[i] - zt[i];
    }
    const float u = (zs[i] - zt[i]) + shift, far = expf(-fabsf(u));
    const float log_rest = logf(u > 0.f ? wq * far + wp : wq + wp * far);
    m_minus_t = u > 0.f ? u + log_rest : log_rest;
    return u > 0.f ? -log_rest : u - log_rest;
  };
  // (2) sum_j e_s d; the mixture's -sum_j e_t (m - t) too
  double v[2] = {0, 0};
  for_packs<T, VEC, false>(xs, xt, grow, V, [&](const float (&s)[VEC], const float (&t)[VEC], float (&)[VEC]) {
    shape_pack(s, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float m_minus_t;
      const float d = diffs(i, m_minus_t), es = expf(zs[i] - m_s);
      v[0] += double(weighted(es, es * d));
      if (beta != 1) {
        const float et = expf(zt[i] - m_t);
        v[1] -= double(weighted(et, et * m_minus_t));
      }
    }
  });
  block_sum(v, slots);
  const double k = v[0] / sum_s;  // K = KL(p || q), or KL(p || M)
  if (threadIdx.x == 0)
    loss[r] = float(beta == 1 ? k + (lse_t - lse_s) : beta * v[1] / sum_t + (1 - beta) * k);
  if (!grow) return;
  // (3) the gradient w p (d - K), w = 1 (beta 1) or 1 - beta, 0 where p is
  const float kf = float(k), w = float((beta == 1 ? 1.0 : 1 - beta) / sum_s);
  for_packs<T, VEC, true>(xs, xt, grow, V, [&](const float (&s)[VEC], const float (&t)[VEC], float (&g)[VEC]) {
    shape_pack(s, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float m_minus_t;
      const float d = diffs(i, m_minus_t), es = expf(zs[i] - m_s);
      g[i] = zero_grad ? 0.f : weighted(es, w * es * (d - kf) * chain(i));  // zeros even where K is inf
    }
  });
}

}  // namespace

void distill_cuda(uintptr_t student, uintptr_t teacher, uintptr_t loss, uintptr_t grad, uintptr_t grad_rows,
                  int64_t rows, int64_t vocab, int64_t student_stride, int64_t teacher_stride, int64_t grad_stride,
                  double scale, double softcap, double teacher_scale, double teacher_softcap, double temperature,
                  double beta, double grad_scale, int dtype, int device, uintptr_t stream) {
  check_distill_args(student, teacher, loss, grad, rows, vocab, student_stride, teacher_stride, grad_stride, scale,
                     softcap, teacher_scale, teacher_softcap, temperature, beta, grad_scale, dtype);
  PYLLM_CHECK(rows < (int64_t(1) << 31), "distill: too many rows for one launch: ", rows);
  if (rows == 0) return;
  DeviceGuard guard(device);
  const Args a{vocab,         student_stride,       teacher_stride,         grad_stride,
               float(scale),  float(softcap),       float(teacher_scale),   float(teacher_softcap),
               float(temperature), beta, grad_scale, scale / temperature};
  PYLLM_DISPATCH_CUDA(dtype, T, {
    constexpr int VEC = 16 / sizeof(T);
    auto aligned = [](uintptr_t p, int64_t row_stride) { return p % 16 == 0 && row_stride % VEC == 0; };
    const bool vec = vocab % VEC == 0 && aligned(student, student_stride) && aligned(teacher, teacher_stride) &&
                     (grad == 0 || aligned(grad, grad_stride));
    const int64_t per_thread = vec ? VEC : 1, packs = (vocab + per_thread - 1) / per_thread;
    const int threads = int(std::min<int64_t>(kMaxThreads, (packs + 31) / 32 * 32));
    auto sp = reinterpret_cast<const T*>(student), tp = reinterpret_cast<const T*>(teacher);
    auto lp = reinterpret_cast<float*>(loss);
    auto gp = reinterpret_cast<T*>(grad);
    auto rp = reinterpret_cast<const float*>(grad_rows);
    if (vec)
      distill_kernel<T, VEC><<<unsigned(rows), threads, 0, as_stream(stream)>>>(sp, tp, lp, gp, rp, a);
    else
      distill_kernel<T, 1><<<unsigned(rows), threads, 0, as_stream(stream)>>>(sp, tp, lp, gp, rp, a);
  });
  PYLLM_CUDA_CHECK_LAUNCH("distill");
}

}  // namespace pyllm
