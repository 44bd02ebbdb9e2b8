// Dtype codes as passed from Python (pyllm/ops/_util.py DTYPE_CODES holds the same table), the
// 16-bit storage types of the CPU kernels, and dispatch. CUDA code uses its own __half and
// __nv_bfloat16 and dispatches with the same codes.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/checks.h"

namespace pyllm {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float16";
    case 2: return "bfloat16";
    case 3: return "float64";
    default: return "unknown";
  }
}

inline int64_t dtype_size(int code) {
  switch (code) {
    case 0: return 4;
    case 1: return 2;
    case 2: return 2;
    case 3: return 8;
    default: PYLLM_CHECK(false, "unknown dtype code ", code);
  }
  return 0;
}

// Whether a positive number stays positive in the kernels' math type for logits of this dtype
// (fp32 for the 16- and 32-bit ones): a tanh cap below ~1.4e-45 rounds to 0 there, which the
// kernels would read as "no cap" and silently leave the logits uncapped.
inline bool positive_in_math_type(double x, int code) {
  return code == int(DType::f64) || static_cast<float>(x) > 0.f;
}
// x finite and > 0 in the kernels' math type, and so its reciprocal: a scale of 1e39 or 1e-50 is
// inf or 0 in fp32 (NaN losses, silently, from a finite double).
inline bool fits_math_type(double x, int code) {
  if (code == int(DType::f64)) return std::isfinite(x) && x > 0 && std::isfinite(1.0 / x);
  const float f = static_cast<float>(x);
  return std::isfinite(f) && f > 0.f && std::isfinite(1.f / f);
}

// CPU storage types. Conversion is written out bit by bit so the compiler vectorises it (bf16 is
// the top half of an fp32; fp16 needs exponent rebiasing, done in software: no F16C assumption).
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16 x) { return bits_to_f32(uint32_t(x.bits) << 16); }
// fp16 conversions without branches: early returns for inf/nan/subnormals stop GCC vectorising
// the loops that call these (measured in adamw.cpp: fp16 steps 4x slower than bf16 with them).
// RNE, inf/nan kept, subnormals exact; checked bit for bit against the branchy versions over all
// 2^32 floats and all 2^16 halves.
inline float to_float(f16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, magnitude = x.bits & 0x7fffu;
  // Normals and subnormals at once: the bits shifted into fp32 position, times 2^112 to rebias.
  const float finite = bits_to_f32(magnitude << 13) * 5.192296858534828e33f;  // 2^112
  const uint32_t special = 0x7f800000u | ((magnitude & 0x3ffu) << 13);        // inf / nan
  return bits_to_f32(sign | (magnitude >= 0x7c00u ? special : f32_to_bits(finite)));
}

template <typename T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {
  uint32_t u = f32_to_bits(x);
  // Round to nearest even; a NaN stays a (quiet) NaN instead of rounding up into inf.
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return bf16{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
}
template <> inline f16 from_float<f16>(float x) {
  const uint32_t u = f32_to_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  // |x| < 2^-14 (fp16 subnormal or zero): adding 0.5 lines the fp16 subnormal grid up with fp32's
  // last mantissa bits, and the FPU's own round-to-nearest-even does the rounding.
  const uint32_t subnormal = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3f000000u;
  // Normal range: rebias the exponent (127 -> 15) and round to nearest even at bit 13.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t overflow = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // nan : inf (also for >= 65520)
  const uint32_t out = a >= 0x477ff000u ? overflow : a < 0x38800000u ? subnormal : normal;
  return f16{uint16_t(sign | out)};
}
template <> inline double from_float<double>(float x) { return x; }

// The type the math runs in: fp32 for every storage type but fp64 (kept for gradcheck).
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

template <typename T> inline T from_acc(acc_t<T> x) { return from_float<T>(x); }
template <> inline double from_acc<double>(double x) { return x; }

}  // namespace pyllm

// PYLLM_DISPATCH_CPU(code, T, body): runs body with T bound to the storage type of dtype code.
#define PYLLM_DISPATCH_CPU(code, T, ...)                                                    \
  switch (static_cast<::pyllm::DType>(code)) {                                             \
    case ::pyllm::DType::f32: { using T = float; __VA_ARGS__; break; }                      \
    case ::pyllm::DType::bf16: { using T = ::pyllm::bf16; __VA_ARGS__; break; }             \
    case ::pyllm::DType::f16: { using T = ::pyllm::f16; __VA_ARGS__; break; }               \
    case ::pyllm::DType::f64: { using T = double; __VA_ARGS__; break; }                     \
    default: PYLLM_CHECK(false, "unsupported dtype code ", code);                           \
  }
