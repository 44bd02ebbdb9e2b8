// Vectorisable fp32 math for the CPU kernels. libm's expf is a call the compiler cannot vectorise
// without -ffast-math (which we refuse: it drops NaN handling), so exp is written out here:
// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2, exp(r) by its Taylor series to r^Degree:
// degree 7 for fp32 results (truncation error 0.347^8/8! = 5e-9 relative, under fp32's half-ulp
// of 6e-8); degree 5 where the result is rounded to bf16/fp16 anyway (0.347^6/6! = 2.4e-6, a
// hundredth of fp16's half-ulp), which saves 2 of the ~20 vector ops per element.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/dtype.h"

namespace pyllm {

// a * b + c: one fused op where the target has an FMA unit; elsewhere (the x86-64 baseline of a
// portable build) a multiply and an add, which round twice: std::fma there is a libm call per
// element that no loop vectorises (that build ran SwiGLU at 0.08-0.31x torch eager, 2-core EPYC,
// 2026-12-02; 0.21-1.02x this way; a product and sum in fp64, exact as fma, ran at 0.09-0.31x).
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(r) for |r| <= ln2/2 by its Taylor series to r^Degree, in any lane type V, given fma(a, b, c)
// = a * b + c and splat(float) -> V: exp_f32 and the AVX-512 / AVX2 exps share it.
template <int Degree, typename V, typename Fma, typename Splat>
inline V exp_taylor(V r, Fma fma, Splat splat) {
  static_assert(Degree == 5 || Degree == 7, "exp: Taylor degree 5 or 7");
  V p;
  if constexpr (Degree == 7) {
    p = splat(1.0f / 5040.0f);
    p = fma(p, r, splat(1.0f / 720.0f));
    p = fma(p, r, splat(1.0f / 120.0f));
  } else {
    p = splat(1.0f / 120.0f);
  }
  p = fma(p, r, splat(1.0f / 24.0f));
  p = fma(p, r, splat(1.0f / 6.0f));
  p = fma(p, r, splat(0.5f));
  p = fma(p, r, splat(1.0f));
  return fma(p, r, splat(1.0f));
}

template <int Degree = 7>
inline float exp_f32(float x) {
  // Clamp so that 2^n stays a normal fp32 (n in [-126, 127]); a compare-and-select keeps NaN as NaN.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723e-6f;
  float n = (x * log2e + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  float r = fmadd(n, -ln2_hi, x);
  r = fmadd(n, -ln2_lo, r);
  const float p = exp_taylor<Degree>(r, [](float a, float b, float c) { return fmadd(a, b, c); },
                                     [](float c) { return c; });
  int32_t e = int32_t(n) + 127;
  return p * bits_to_f32(uint32_t(e) << 23);
}

// exp(d) for d = z - max <= 0 (a log-probability): exactly 0 below -87, where exp_f32 clamps, so
// that a masked class's softmax is 0, as torch's, not 1.6e-38, and a weight of 0 marks a term that
// counts 0 (cross_entropy.cpp, distill.cpp).
inline float exp_shifted(float d) {
  const float e = exp_f32<7>(d);
  return d < -87.0f ? 0.0f : e;
}
inline double exp_shifted(double d) { return std::exp(d); }

// tanh(y): below |y| = 0.5 its Taylor series to y^17 (truncation 1e-8 relative), above it
// 1 - 2 / (exp(2|y|) + 1) (the cancellation costs at most a bit there, tanh >= 0.46); the sign
// copied back. Vectorisable; cross_entropy.cpp's and distill.cpp's capped logits share it.
inline float tanh_f32(float y) {
  const float a = std::fabs(y), a2 = a * a;
  float p = 6404582.0f / 10854718875.0f;  // tanh's Taylor coefficients, y^17 down to y^3
  p = fmadd(p, a2, -929569.0f / 638512875.0f);
  p = fmadd(p, a2, 21844.0f / 6081075.0f);
  p = fmadd(p, a2, -1382.0f / 155925.0f);
  p = fmadd(p, a2, 62.0f / 2835.0f);
  p = fmadd(p, a2, -17.0f / 315.0f);
  p = fmadd(p, a2, 2.0f / 15.0f);
  p = fmadd(p, a2, -1.0f / 3.0f);
  const float small = fmadd(p * a2, a, a);
  const float large = 1.0f - 2.0f / (exp_f32<7>(2.0f * a) + 1.0f);  // exp_f32 clamps: 1 at the top
  return std::copysign(a < 0.5f ? small : large, y);
}
inline double tanh_acc(double y) { return std::tanh(y); }
inline float tanh_acc(float y) { return tanh_f32(y); }

// log(y) for y >= 0, vectorisable (libm's logf is a call no loop vectorises without -ffast-math):
// y = 2^e m with m in [sqrt(1/2), sqrt(2)) from the bits, log m = 2 atanh(s) = 2 (s + s^3/3 + ...
// + s^11/11) with s = (m - 1) / (m + 1), |s| <= 0.172 (truncation 0.172^12 / 13 = 5e-11 relative),
// e ln2 in two parts: within 1.95 ulp of the exact log (every 37th fp32 bit pattern, 2026-12-02;
// the worst near 1, where the result is small). 0 gives -inf; subnormals are scaled by 2^24 first;
// +inf and NaN pass through. Negative y is not handled (the callers' arguments are sums of
// exponentials and weights).
inline float log_f32(float y) {
  const bool tiny = y < 1.17549435e-38f;  // subnormal or 0
  const float scaled = tiny ? y * 16777216.0f : y;
  const uint32_t bits = f32_to_bits(scaled);
  int32_t e = int32_t(bits >> 23) - 127;
  float m = bits_to_f32((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 1.0f / 11.0f;
  p = fmadd(p, s2, 1.0f / 9.0f);
  p = fmadd(p, s2, 1.0f / 7.0f);
  p = fmadd(p, s2, 1.0f / 5.0f);
  p = fmadd(p, s2, 1.0f / 3.0f);
  const float log_m = fmadd(2.0f * s * s2, p, 2.0f * s);
  const float n = float(e) - (tiny ? 24.0f : 0.0f);
  const float r = fmadd(n, 0.693145751953125f, fmadd(n, 1.42860682030941723e-6f, log_m));
  const bool pass = !(y <= 3.40282347e38f);  // +inf and NaN: themselves
  return y == 0.0f ? -std::numeric_limits<float>::infinity() : (pass ? y : r);
}
inline double log_acc(double y) { return std::log(y); }
inline float log_acc(float y) { return log_f32(y); }

// 2^t for t <= 0 (or NaN), for softmaxes: t is x - max in log2 units (the caller multiplies by
// log2(e), or folds it into the scores' scale): t = n + r, n = floor(t), r in [0, 1) exact, 2^r
// by the polynomial with p(0) = 1 that minimises the relative error on [0, 1) (Lawson iterations
// in numpy, 2026-11-30); max relative error in fp32: degree 4 3.0e-6 (for bf16 / fp16 results),
// degree 6 8.8e-8 (fp32 results; exp_f32<7>: 7.9e-8, measured over 2e7 points).
// t < -126 gives 0 (a masked score: -inf), so 2^n stays a normal fp32.
template <int Degree> struct Exp2Poly;
template <> struct Exp2Poly<4> {
  static constexpr float c[4] = {0.6930448412895203f, 0.24128007888793945f, 0.052242740988731384f,
                                 0.013426518999040127f};
};
template <> struct Exp2Poly<6> {
  static constexpr float c[6] = {0.6931470632553101f, 0.2402293086051941f, 0.055485278367996216f,
                                 0.009675455279648304f, 0.0012467812048271298f, 0.0002161304437322542f};
};
template <int Degree>
inline float exp2_poly(float r) {
  float p = Exp2Poly<Degree>::c[Degree - 1];
  // Unrolled here: left to the unroller, GCC 12 met it as an inner loop of the callers' loops and
  // left those scalar ("control flow in loop").
#pragma GCC unroll 8
  for (int i = Degree - 2; i >= 0; --i) p = fmadd(p, r, Exp2Poly<Degree>::c[i]);
  return fmadd(p, r, 1.0f);
}
template <int Degree>
inline float exp2_nonpositive_f32(float t) {
  const bool tiny = t < -126.0f;  // false for NaN, which stays NaN through p
  t = tiny ? -126.0f : t;
#if defined(__SSE4_1__) || defined(__aarch64__) || !(defined(__x86_64__) || defined(__i386__))
  const float n = std::floor(t);
#else
  // x86 without SSE4.1 (the x86-64 baseline) has no vector floor: round to nearest by the
  // 1.5 * 2^23 trick, then step down where that went up (exact for |t| < 2^22; NaN stays NaN).
  const float nearest = (t + 12582912.0f) - 12582912.0f;
  const float n = nearest > t ? nearest - 1.0f : nearest;
#endif
  const float p = exp2_poly<Degree>(t - n);
  const float scaled = p * bits_to_f32(uint32_t(int32_t(n) + 127) << 23);
  return tiny ? 0.0f : scaled;
}

// exp in the accumulation type of storage type T, as accurate as T's rounding needs.
template <typename T> inline float exp_acc(float x) { return exp_f32<sizeof(T) == 2 ? 5 : 7>(x); }
template <typename T> inline double exp_acc(double x) { return std::exp(x); }

// sigmoid(g) = 1 / (1 + exp(-g)) in the math type, as torch's: exactly 0 below g = -88.5, where
// fp32 exp(-g) overflows (exp_f32 clamps there instead, which left ~6e-39 and made silu(-inf)
// -inf where torch gives NaN, silu(-1000) -4e-36 where torch gives -0).
template <typename T> inline float sigmoid_acc(float g) { return g < -88.5f ? 0.f : 1.f / (1.f + exp_acc<T>(-g)); }
template <typename T> inline double sigmoid_acc(double g) { return 1.0 / (1.0 + std::exp(-g)); }

// sigmoid(z) and 1 - sigmoid(z), the latter as exp(-z) * sigmoid(z): subtracting a rounded sigmoid
// from 1 keeps few bits where it is near 1 (GeGLU's fp32 dgate lost 2.5x torch's error that way).
// Below z = -88.5 they are 0 and 1, as sigmoid_acc's.
template <typename T> inline void sigmoid_pair_acc(float z, float& s, float& one_minus_s) {
  const float e = exp_acc<T>(-z);  // clamped: finite
  const float r = 1.f / (1.f + e);
  const bool dead = z < -88.5f;
  s = dead ? 0.f : r;
  one_minus_s = dead ? 1.f : (z > 87.f ? 0.f : e * r);  // exp_f32 floors exp(-z) at exp(-87)
}
template <typename T> inline void sigmoid_pair_acc(double z, double& s, double& one_minus_s) {
  const double e = std::exp(-z);
  s = 1.0 / (1.0 + e);
  one_minus_s = std::isinf(e) ? 1.0 : e * s;
}

}  // namespace pyllm

// ---- AVX-512: 16 fp32 lanes, used where the build targets it (-march=native on AVX-512 CPUs) ----
// The portable loops above leave ~30 vector ops per element for exp + sigmoid + bf16 rounding;
// these use what AVX-512 (F, BW, VL, DQ) has for each step: vscalefps (2^n with inf/0 saturation, so no clamping),
// vrndscaleps, vrcp14ps + one Newton step instead of vdivps, and vcvtneps2bf16 (AVX512_BF16) for
// the bf16 store. Tails use masked loads/stores, so every element of a row takes the same path
// and gives the same bits wherever it sits; other CPUs use the portable loops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define PYLLM_AVX512 1

namespace pyllm {
namespace avx512 {

// Loads and stores of n <= 16 elements (masked when n < 16), widened to / rounded from fp32.
inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

inline __m512 load(const float* p, int64_t n = 16) { return _mm512_maskz_loadu_ps(first(n), p); }
inline __m256i load16(const void* p, int64_t n) { return _mm256_maskz_loadu_epi16(first(n), p); }
inline __m512 load(const bf16* p, int64_t n = 16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load16(p, n)), 16));
}
inline __m512 load(const f16* p, int64_t n = 16) { return _mm512_cvtph_ps(load16(p, n)); }

inline void store(float* p, __m512 x, int64_t n = 16) { _mm512_mask_storeu_ps(p, first(n), x); }
inline void store16(void* p, __m256i x, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), x); }
inline void store(f16* p, __m512 x, int64_t n = 16) {
  store16(p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
}
// fp32 lanes to bf16 bits: the same rounding as from_float<bf16> (nearest even, NaN kept quiet).
inline __m256i to_bf16_bits(__m512 x) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void store(bf16* p, __m512 x, int64_t n = 16) { store16(p, to_bf16_bits(x), n); }

// x rounded to T's precision and widened back (what a store and a load of T give), in registers.
template <typename T>
inline __m512 round_trip(__m512 x) {
  if constexpr (std::is_same_v<T, bf16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(x)), 16));
  else if constexpr (std::is_same_v<T, f16>)
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    return x;
}

// exp(x): the same reduction and Taylor degrees as exp_f32. The argument is clamped to
// [-104, 128] first (far outside, the reduction itself breaks down: x = -1e30 gave -inf), and
// vscalefps takes the ends to 0 and inf. Finite = true clamps the top at 88.5 instead, giving
// 2.7e38 where exp overflows (the reciprocal below needs a finite denominator). vmaxps / vminps
// return their second operand when either is NaN, so the clamp keeps a NaN input NaN.
template <int Degree, bool Finite = false>
inline __m512 exp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(Finite ? 88.5f : 128.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  const __m512 p = exp_taylor<Degree>(r, [](__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); },
                                      [](float c) { return _mm512_set1_ps(c); });
  return _mm512_scalef_ps(p, n);
}

// 2^t (exp2_nonpositive_f32's polynomial) for any t: vreduceps takes r = t - floor(t) exactly and
// vscalefps multiplies by 2^floor(t) itself, saturating to 0 and inf, so t = -inf gives exactly 0
// and NaN stays NaN, with no clamp or select.
template <int Degree>
inline __m512 exp2(__m512 t) {
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(Exp2Poly<Degree>::c[Degree - 1]);
  for (int i = Degree - 2; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(Exp2Poly<Degree>::c[i]));
  return _mm512_scalef_ps(_mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f)), t);
}

// sigmoid(g) = 1 / (1 + exp(-g)). Precise (fp32 results): a true division. Otherwise vrcp14ps and
// one Newton step (relative error ~2^-27, far below a 16-bit half-ulp); exp's clamp keeps the
// denominator finite, since rcp of inf would turn the Newton step into NaN, and the lanes it
// clamped are set to 0 afterwards.
template <bool Precise>
inline __m512 sigmoid(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), g);
  if constexpr (Precise) return _mm512_div_ps(one, _mm512_add_ps(one, exp<7>(neg)));
  const __m512 d = _mm512_add_ps(one, exp<5, true>(neg));
  const __m512 y = _mm512_rcp14_ps(d);
  // 0 where exp(-g) clamped (g < -88.5), as the precise path's and torch's overflow give.
  const __mmask16 live = _mm512_cmp_ps_mask(g, _mm512_set1_ps(-88.5f), _CMP_NLT_UQ);
  return _mm512_maskz_fmadd_ps(live, y, _mm512_fnmadd_ps(d, y, one), y);
}

// sigmoid_pair_acc in 16 lanes: exp(-z) clamped finite, the same reciprocal as sigmoid<Precise>.
template <bool Precise>
inline void sigmoid_pair(__m512 z, __m512& s, __m512& one_minus_s) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp<Precise ? 7 : 5, true>(_mm512_sub_ps(_mm512_setzero_ps(), z));
  const __m512 d = _mm512_add_ps(one, e);
  __m512 r;
  if constexpr (Precise) {
    r = _mm512_div_ps(one, d);
  } else {
    const __m512 y = _mm512_rcp14_ps(d);
    r = _mm512_fmadd_ps(y, _mm512_fnmadd_ps(d, y, one), y);
  }
  const __mmask16 live = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-88.5f), _CMP_NLT_UQ);  // NaN: live
  s = _mm512_maskz_mov_ps(live, r);
  one_minus_s = _mm512_mask_mov_ps(one, live, _mm512_mul_ps(e, r));
}

template <typename T> constexpr bool has_lanes = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

// The low and high 8 of 16 fp32 lanes widened to fp64: sums over long rows in two fp64 halves.
inline __m512d low_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d high_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

}  // namespace avx512
}  // namespace pyllm
#endif

// ---- AVX2 + FMA + F16C: 8 fp32 lanes, for builds with those but not AVX-512 (x86-64-v3: Intel's
// desktop and laptop CPUs since Haswell, AMD's before Zen 4) ----
// GCC vectorises the portable loops there, but for 16-bit data it widens, rounds and packs through
// long shuffle chains: SwiGLU's bf16 forward ran at 0.70-0.88x torch eager (2-core EPYC,
// -march=x86-64-v3, 2026-12-02). These are the AVX-512 helpers' steps in 8 lanes, without its
// vscalefps, masks or vcvtneps2bf16: exp clamps as exp_f32 does and builds 2^n in the exponent
// bits, bf16 rounds by integer adds, and a row's last < 8 elements go through a padded 8-lane
// buffer (load_tail / store_tail), so every element takes the same path and gives the same bits
// wherever it sits, as on AVX-512.
#if !defined(PYLLM_AVX512) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <cstring>
#define PYLLM_AVX2 1

namespace pyllm {
namespace avx2 {

inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline void store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
// fp32 lanes to bf16 bits: the same rounding as from_float<bf16> (nearest even, NaN kept quiet).
inline __m128i to_bf16_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i high = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
  // Values <= 0xffff: the unsigned-saturating pack keeps them; it packs within 128-bit halves.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store(bf16* p, __m256 x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(x)); }
inline void store(f16* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The last n < 8 elements of a row, through an 8-element buffer (zeros past n, which the caller's
// math takes harmlessly and store_tail drops).
template <typename T>
inline __m256 load_tail(const T* p, int64_t n) {
  T buf[8] = {};
  std::memcpy(buf, p, size_t(n) * sizeof(T));
  return load(buf);
}
template <typename T>
inline void store_tail(T* p, __m256 x, int64_t n) {
  T buf[8];
  store(buf, x);
  std::memcpy(p, buf, size_t(n) * sizeof(T));
}

// exp(x) as exp_f32<Degree>: x clamped to [-87, 88] (2^n stays a normal fp32; the callers need a
// finite result), vmaxps / vminps with x second keep a NaN NaN, 2^n from the exponent bits.
template <int Degree>
inline __m256 exp(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723e-6f), r);
  const __m256 p = exp_taylor<Degree>(r, [](__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); },
                                      [](float c) { return _mm256_set1_ps(c); });
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// 1 / d: a true division for fp32 results (Precise); else vrcpps (12 bits) and one Newton step
// (~2^-22 relative, far below a 16-bit half-ulp). d is finite and >= 1 here.
template <bool Precise>
inline __m256 reciprocal(__m256 d) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (Precise) return _mm256_div_ps(one, d);
  const __m256 y = _mm256_rcp_ps(d);
  return _mm256_fmadd_ps(y, _mm256_fnmadd_ps(d, y, one), y);
}

// sigmoid(g) as sigmoid_acc: 0 below g = -88.5 (and for NaN g, NaN, through exp).
template <bool Precise>
inline __m256 sigmoid(__m256 g) {
  const __m256 e = exp<Precise ? 7 : 5>(_mm256_sub_ps(_mm256_setzero_ps(), g));
  const __m256 r = reciprocal<Precise>(_mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 dead = _mm256_cmp_ps(g, _mm256_set1_ps(-88.5f), _CMP_LT_OQ);  // NaN: not dead
  return _mm256_andnot_ps(dead, r);
}

// sigmoid_pair_acc in 8 lanes.
template <bool Precise>
inline void sigmoid_pair(__m256 z, __m256& s, __m256& one_minus_s) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp<Precise ? 7 : 5>(_mm256_sub_ps(_mm256_setzero_ps(), z));
  const __m256 r = reciprocal<Precise>(_mm256_add_ps(one, e));
  const __m256 dead = _mm256_cmp_ps(z, _mm256_set1_ps(-88.5f), _CMP_LT_OQ);
  const __m256 saturated = _mm256_cmp_ps(z, _mm256_set1_ps(87.0f), _CMP_GT_OQ);  // exp(-z) floored
  s = _mm256_andnot_ps(dead, r);
  one_minus_s = _mm256_blendv_ps(_mm256_andnot_ps(saturated, _mm256_mul_ps(e, r)), one, dead);
}

template <typename T> constexpr bool has_lanes = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

}  // namespace avx2
}  // namespace pyllm
#endif
