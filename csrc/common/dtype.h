// Dtype codes as passed from Python (pyllm/ops/_util.py DTYPE_CODES holds the same table), the
// 16-bit storage types of the CPU kernels, and dispatch. CUDA code uses its own __half and
// __nv_bfloat16 and dispatches with the same codes.
#pragma once
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

// CPU storage types. Conversion is written out bit by bit so the compiler vectorises it (bf16 is
// the top half of an fp32; fp16 needs exponent rebiasing, done in software: no F16C assumption).
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16 x) { return bits_to_f32(uint32_t(x.bits) << 16); }
inline float to_float(f16 x) {
  uint32_t sign = uint32_t(x.bits & 0x8000) << 16, exp = (x.bits >> 10) & 0x1f, man = x.bits & 0x3ff;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000 | (man << 13));  // inf / nan
  if (exp == 0) {                                                        // zero / subnormal
    float v = float(man) * 5.9604644775390625e-8f;                       // man * 2^-24
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
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
  uint32_t u = f32_to_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};            // nan
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};           // rounds to inf
  if (a < 0x38800000u) {                                                // subnormal or zero
    float v = bits_to_f32(a) * 16777216.0f;                             // to units of 2^-24
    uint32_t m = uint32_t(v), rem_bits = f32_to_bits(v - float(m));
    float rem = bits_to_f32(rem_bits);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return f16{uint16_t(sign | m)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;            // rebias 127 -> 15, RNE
  return f16{uint16_t(sign | (r >> 13))};
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
