// The arguments of cross_entropy_cpu and cross_entropy_cuda (csrc/cpu/cross_entropy.cpp,
// csrc/cuda/cross_entropy.cu), checked once for both: the sizes, strides and numbers. The targets'
// range is the CPU's own check (the GPU's targets are not on the host).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "common/dtype.h"

namespace pyllm {

inline void check_cross_entropy_args(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t grad,
                                     int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride, double scale,
                                     double softcap, double label_smoothing, double z_loss, double grad_scale,
                                     int dtype) {
  PYLLM_CHECK(rows >= 0 && vocab >= 1, "cross_entropy: rows must be >= 0 and vocab >= 1, got ", rows, " and ", vocab);
  PYLLM_CHECK(rows <= 1 || (stride >= vocab && (grad == 0 || grad_stride >= vocab)),
              "cross_entropy: row strides must be >= vocab (", vocab, "), got ", stride, " and ", grad_stride);
  PYLLM_CHECK(std::isfinite(scale) && scale > 0, "cross_entropy: scale must be positive and finite, got ", scale);
  PYLLM_CHECK(fits_math_type(scale, dtype), "cross_entropy: scale ", scale, " is 0 or inf in fp32, the math type of ",
              dtype_name(dtype), " logits");
  dtype_size(dtype);  // throws on an unknown code
  PYLLM_CHECK(std::isfinite(softcap) && softcap >= 0, "cross_entropy: softcap must be 0 (none) or positive, got ",
              softcap);
  PYLLM_CHECK(softcap == 0 || positive_in_math_type(softcap, dtype), "cross_entropy: softcap ", softcap,
              " rounds to 0 in fp32, the math type of ", dtype_name(dtype), " logits");
  PYLLM_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "cross_entropy: label_smoothing must be in [0, 1], got ",
              label_smoothing);
  PYLLM_CHECK(std::isfinite(z_loss) && z_loss >= 0, "cross_entropy: z_loss must be >= 0 and finite, got ", z_loss);
  PYLLM_CHECK(std::isfinite(grad_scale), "cross_entropy: grad_scale must be finite, got ", grad_scale);
  if (rows > 0)
    PYLLM_CHECK(logits != 0 && targets != 0 && loss != 0, "cross_entropy: null data pointer for a non-empty tensor");
}

}  // namespace pyllm
