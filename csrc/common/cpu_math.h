// Vectorisable fp32 math for the CPU kernels. libm's expf is a call the compiler cannot vectorise
// without -ffast-math (which we refuse: it drops NaN handling), so exp is written out here:
// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2, exp(r) by its Taylor series to r^Degree:
// degree 7 for fp32 results (truncation error 0.347^8/8! = 5e-9 relative, under fp32's half-ulp
// of 6e-8); degree 5 where the result is rounded to bf16/fp16 anyway (0.347^6/6! = 2.4e-6, a
// hundredth of fp16's half-ulp), which saves 2 of the ~20 vector ops per element.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace pyllm {

template <int Degree = 7>
inline float exp_f32(float x) {
  static_assert(Degree == 5 || Degree == 7, "exp_f32: degree 5 or 7");
  // Clamp so that 2^n stays a normal fp32 (n in [-126, 127]); a compare-and-select keeps NaN as NaN.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723e-6f;
  float n = (x * log2e + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  float r = std::fma(n, -ln2_hi, x);
  r = std::fma(n, -ln2_lo, r);
  float p;
  if constexpr (Degree == 7) {
    p = 1.0f / 5040.0f;
    p = std::fma(p, r, 1.0f / 720.0f);
    p = std::fma(p, r, 1.0f / 120.0f);
  } else {
    p = 1.0f / 120.0f;
  }
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  int32_t e = int32_t(n) + 127;
  return p * bits_to_f32(uint32_t(e) << 23);
}

// exp in the accumulation type of storage type T, as accurate as T's rounding needs.
template <typename T> inline float exp_acc(float x) { return exp_f32<sizeof(T) == 2 ? 5 : 7>(x); }
template <typename T> inline double exp_acc(double x) { return std::exp(x); }

}  // namespace pyllm
