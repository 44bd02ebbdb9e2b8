// The arguments of distill_cpu and distill_cuda (csrc/cpu/distill.cpp, csrc/cuda/distill.cu), checked
// before any work: sizes, strides and numbers.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "common/dtype.h"

namespace pyllm {

inline void check_distill_args(uintptr_t student, uintptr_t teacher, uintptr_t loss, uintptr_t grad, int64_t rows,
                               int64_t vocab, int64_t student_stride, int64_t teacher_stride, int64_t grad_stride,
                               double scale, double softcap, double teacher_scale, double teacher_softcap,
                               double temperature, double beta, double grad_scale, int dtype) {
  PYLLM_CHECK(rows >= 0 && vocab >= 1, "distill: rows must be >= 0 and vocab >= 1, got ", rows, " and ", vocab);
  PYLLM_CHECK(rows <= 1 || (student_stride >= vocab && teacher_stride >= 0 && (grad == 0 || grad_stride >= vocab)),
              "distill: row strides must be >= vocab (", vocab, "; the teacher's >= 0), got ", student_stride, ", ",
              teacher_stride, " and ", grad_stride);
  for (double s : {scale, teacher_scale})
    PYLLM_CHECK(std::isfinite(s) && s > 0, "distill: scales must be positive and finite, got ", s);
  dtype_size(dtype);  // throws on an unknown code
  for (double c : {softcap, teacher_softcap}) {
    PYLLM_CHECK(std::isfinite(c) && c >= 0, "distill: softcaps must be 0 (none) or positive, got ", c);
    PYLLM_CHECK(c == 0 || positive_in_math_type(c, dtype), "distill: softcap ", c,
                " rounds to 0 in fp32, the math type of ", dtype_name(dtype), " logits");
  }
  PYLLM_CHECK(std::isfinite(temperature) && temperature > 0, "distill: temperature must be positive and finite, got ",
              temperature);
  for (double s : {scale / temperature, teacher_scale / temperature, temperature})  // (the kernels divide by it)
    PYLLM_CHECK(fits_math_type(s, dtype), "distill: scale / temperature and temperature must be > 0 and finite in fp32, the "
                "math type of ", dtype_name(dtype), " logits; got scales ", scale, ", ", teacher_scale,
                " and temperature ", temperature);
  PYLLM_CHECK(beta >= 0 && beta <= 1, "distill: beta must be in [0, 1], got ", beta);
  PYLLM_CHECK(std::isfinite(grad_scale), "distill: grad_scale must be finite, got ", grad_scale);
  if (rows > 0) PYLLM_CHECK(student != 0 && teacher != 0 && loss != 0, "distill: null data pointer for a non-empty tensor");
}

}  // namespace pyllm
