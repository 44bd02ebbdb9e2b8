// Rotary position embedding on the CPU (Su et al. 2021, eq. 34), "rotate half" layout (GPT-NeoX, HF
// LLaMA): for each (batch, token, head) row of x (B, T, H, D) and each i < R/2,
//   out[i]       = x[i] * cos[i] - x[i + R/2] * sin[i]
//   out[i + R/2] = x[i + R/2] * cos[i] + x[i] * sin[i]
// or, interleaved (GPT-J, Meta's LLaMA), the pairs (2i, 2i + 1) instead of (i, i + R/2).
// with cos, sin the row of the token's position (R/2 of them, fp32; fp64 for fp64 x); dims R..D
// pass through (partial rotary). inverse negates sin: the backward, a rotation by minus the angle.
// Math in fp32 with one rounding, as pyllm.nn.apply_rope's torch form (x.to(fp32) ... .to(dtype)).
//
// Layout: x and out rows at element strides (batch, token, head), last dim contiguous, so a view of a
// fused qkv projection goes in without a copy; cos / sin rows `cs_batch_stride` apart per batch row
// (0: one table for every row) and R/2 apart per token.
// Traffic per element: reads x, writes out (4 B bf16) plus the token's cos / sin row, shared by the H
// heads (from L1). Threading: OpenMP over (batch, token) rows; small calls stay on the calling thread.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/dtype.h"
#include "common/rope_args.h"
#include "cpu/cpu_ops.h"

namespace pyllm {
namespace {

constexpr int64_t kParallelMin = 32768;  // elements; as swiglu.cpp's

template <typename T>
void rotate_row(const T* __restrict x, T* __restrict o, const acc_t<T>* __restrict c, const acc_t<T>* __restrict s,
                const RopeShape& sh) {
  using A = acc_t<T>;
  const int64_t half = sh.half;
  int64_t i = 0;
  const A sign = sh.inverse ? A(-1) : A(1);
  if (sh.interleaved) {  // strided pairs: the compiler's vectors (decode-sized calls, a few rows)
#pragma omp simd
    for (int64_t k = 0; k < half; ++k) {
      const A x1 = to_float(x[2 * k]), x2 = to_float(x[2 * k + 1]), cv = c[k], sv = sign * s[k];
      o[2 * k] = from_acc<T>(x1 * cv - x2 * sv);
      o[2 * k + 1] = from_acc<T>(x2 * cv + x1 * sv);
    }
    i = half;
  }
#ifdef PYLLM_AVX512
  if constexpr (avx512::has_lanes<T>) {
    for (; i < half; i += 16) {
      const int64_t n = half - i;
      const __m512 x1 = avx512::load(x + i, n), x2 = avx512::load(x + i + half, n);
      const __m512 cv = avx512::load(c + i, n);
      __m512 sv = avx512::load(s + i, n);
      if (sh.inverse) sv = _mm512_sub_ps(_mm512_setzero_ps(), sv);
      avx512::store(o + i, _mm512_fmsub_ps(x1, cv, _mm512_mul_ps(x2, sv)), n);
      avx512::store(o + i + half, _mm512_fmadd_ps(x2, cv, _mm512_mul_ps(x1, sv)), n);
    }
  }
#endif
#pragma omp simd
  for (int64_t k = i; k < half; ++k) {
    const A x1 = to_float(x[k]), x2 = to_float(x[k + half]), cv = c[k], sv = sign * s[k];
    o[k] = from_acc<T>(x1 * cv - x2 * sv);
    o[k + half] = from_acc<T>(x2 * cv + x1 * sv);
  }
  for (int64_t k = 2 * half; k < sh.head_dim; ++k) o[k] = x[k];  // partial rotary: the rest as is
}

template <typename T>
void rope(const T* x, const acc_t<T>* cos, const acc_t<T>* sin, T* out, const RopeShape& sh) {
  const int64_t rows = sh.batch * sh.seqlen;
  const bool parallel = rows * sh.n_heads * sh.head_dim >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t bt = 0; bt < rows; ++bt) {
    const int64_t b = bt / sh.seqlen, t = bt % sh.seqlen;
    const acc_t<T>* c = cos + b * sh.cs_batch_stride + t * sh.half;
    const acc_t<T>* s = sin + b * sh.cs_batch_stride + t * sh.half;
    for (int64_t h = 0; h < sh.n_heads; ++h)
      rotate_row(x + b * sh.xs[0] + t * sh.xs[1] + h * sh.xs[2], out + b * sh.os[0] + t * sh.os[1] + h * sh.os[2], c,
                 s, sh);
  }
}

}  // namespace

void rope_cpu(uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t seqlen,
              int64_t n_heads, int64_t head_dim, int64_t half, const std::vector<int64_t>& x_strides,
              const std::vector<int64_t>& out_strides, int64_t cs_batch_stride, bool inverse, int dtype,
              bool interleaved) {
  const RopeShape sh = rope_shape(x, cos, sin, out, batch, seqlen, n_heads, head_dim, half, x_strides, out_strides,
                                  cs_batch_stride, inverse, dtype, interleaved);
  if (sh.rows() == 0) return;
  PYLLM_DISPATCH_CPU(dtype, T,
                     rope<T>(reinterpret_cast<const T*>(x), reinterpret_cast<const acc_t<T>*>(cos),
                             reinterpret_cast<const acc_t<T>*>(sin), reinterpret_cast<T*>(out), sh));
}

}  // namespace pyllm
