// The arguments of rope_cpu and rope_cuda (csrc/cpu/rope.cpp, csrc/cuda/rope.cu), checked once for
// both: x and out rows at element strides (batch, token, head), last dim contiguous; cos / sin rows
// of `half`, cs_batch_stride apart per batch row (0: one table for all). Pairs: (i, i + R/2) ("rotate
// half", GPT-NeoX, HF LLaMA) or, interleaved, (2i, 2i + 1) (GPT-J, Meta's LLaMA, flash-attn's default
// rotary_interleaved).
#pragma once
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/dtype.h"
#include "common/host_device.h"

namespace pyllm {

struct RopeShape {
  int64_t batch, seqlen, n_heads, head_dim, half;
  int64_t xs[3], os[3], cs_batch_stride;
  bool inverse;
  bool interleaved;
  int64_t rows() const { return batch * seqlen * n_heads; }
  // Pair k's two elements: (k, k + half), or (2k, 2k + 1) interleaved.
  PYLLM_HD int64_t first(int64_t k) const { return interleaved ? 2 * k : k; }
  PYLLM_HD int64_t second(int64_t k) const { return interleaved ? 2 * k + 1 : k + half; }
};

inline RopeShape rope_shape(uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t seqlen,
                            int64_t n_heads, int64_t head_dim, int64_t half, const std::vector<int64_t>& x_strides,
                            const std::vector<int64_t>& out_strides, int64_t cs_batch_stride, bool inverse,
                            int dtype, bool interleaved) {
  PYLLM_CHECK(batch >= 0 && seqlen >= 0 && n_heads >= 0, "rope: batch, seqlen and n_heads must be >= 0, got ", batch,
              ", ", seqlen, ", ", n_heads);
  PYLLM_CHECK(half >= 1 && 2 * half <= head_dim, "rope: the rotated dims (2 x ", half, ") must be in [2, head_dim = ",
              head_dim, "]");
  PYLLM_CHECK(x_strides.size() == 3 && out_strides.size() == 3, "rope: strides are (batch, token, head)");
  PYLLM_CHECK(cs_batch_stride >= 0, "rope: cs_batch_stride must be >= 0, got ", cs_batch_stride);
  dtype_size(dtype);  // throws on an unknown code
  const RopeShape sh{batch, seqlen, n_heads, head_dim, half, {x_strides[0], x_strides[1], x_strides[2]},
                     {out_strides[0], out_strides[1], out_strides[2]}, cs_batch_stride, inverse, interleaved};
  if (sh.rows() > 0)
    for (uintptr_t p : {x, cos, sin, out}) PYLLM_CHECK(p != 0, "rope: null data pointer for a non-empty tensor");
  return sh;
}

}  // namespace pyllm
