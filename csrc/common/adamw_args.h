// The argument table of the AdamW launchers and its checks, shared by csrc/cpu/adamw.cpp and
// csrc/cuda/adamw.cu so that both sides refuse the same calls with the same messages.
// Table: int64, kRows rows x n_tensors (pointers as integers); pyllm/ops/adamw.py builds it.
#pragma once
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "common/checks.h"
#include "common/dtype.h"

namespace pyllm {
namespace adamw {

enum Row { kRowParam = 0, kRowGrad, kRowMaster, kRowExpAvg, kRowExpAvgSq, kRowStep, kRowNumel, kRows };

struct Table {
  const int64_t* t;
  int64_t n;
  int64_t get(Row r, int64_t i) const { return t[r * n + i]; }
  template <typename T> T* ptr(Row r, int64_t i) const { return reinterpret_cast<T*>(uintptr_t(get(r, i))); }
  int64_t numel(int64_t i) const { return get(kRowNumel, i); }
};

inline Table check_table(const char* what, uintptr_t table, int64_t n_tensors, std::initializer_list<Row> needed,
                         int64_t max_numel = std::numeric_limits<int64_t>::max()) {
  PYLLM_CHECK(n_tensors >= 0, what, ": n_tensors must be >= 0, got ", n_tensors);
  PYLLM_CHECK(n_tensors == 0 || table != 0, what, ": null tensor table");
  Table tab{reinterpret_cast<const int64_t*>(table), n_tensors};
  for (int64_t i = 0; i < n_tensors; ++i) {
    PYLLM_CHECK(tab.numel(i) >= 0, what, ": tensor ", i, " has numel ", tab.numel(i));
    PYLLM_CHECK(tab.numel(i) < max_numel, what, ": tensor ", i, " is too large");
    if (tab.numel(i) == 0) continue;
    for (Row r : needed) PYLLM_CHECK(tab.get(r, i) != 0, what, ": null pointer in row ", int(r), " for tensor ", i);
  }
  return tab;
}

// Whether a step goes ahead (sumsq: the grads' sum of squares, or null for no skip): the unscale
// factor 1 / loss scale within fp32, the sum finite (no inf / nan grad) and the grads' norm once
// unscaled within fp32, as pyllm.optim.AdamW decides found_inf. A loss scale backed off to 1e-39 had
// passed the sum's check alone, and unscaling made every param NaN.
#if defined(__CUDACC__) || defined(PYLLM_CUDA_EMU)
__host__ __device__
#endif
inline bool step_goes_ahead(const double* sumsq, double inv_scale) {
  const float mult = float(inv_scale);
  if (mult - mult != 0.0f) return false;  // (finite checks as x - x == 0: no std:: in device code)
  if (!sumsq) return true;
  const double s = *sumsq;
  const float norm = float(sqrt(s) * inv_scale);
  return s - s == 0.0 && norm - norm == 0.0f;
}

// Everything adamw_step_{cpu,cuda} checks before touching memory; returns the table.
inline Table check_step(uintptr_t table, int64_t n_tensors, int param_dtype, bool has_master, double lr,
                        double beta1, double beta2, double eps, double weight_decay, uintptr_t sumsq,
                        double max_grad_norm, bool stochastic_rounding,
                        int64_t max_numel = std::numeric_limits<int64_t>::max()) {
  const Table tab = check_table(
      "adamw_step", table, n_tensors,
      has_master ? std::initializer_list<Row>{kRowParam, kRowGrad, kRowMaster, kRowExpAvg, kRowExpAvgSq, kRowStep}
                 : std::initializer_list<Row>{kRowParam, kRowGrad, kRowExpAvg, kRowExpAvgSq, kRowStep},
      max_numel);
  PYLLM_CHECK(param_dtype == int(DType::f32) || param_dtype == int(DType::bf16) || param_dtype == int(DType::f16),
              "adamw_step: params must be float32, bfloat16 or float16, got ", dtype_name(param_dtype));
  PYLLM_CHECK(!(has_master && param_dtype == int(DType::f32)), "adamw_step: float32 params are their own master");
  PYLLM_CHECK(!stochastic_rounding || param_dtype == int(DType::bf16),
              "adamw_step: stochastic rounding is for bfloat16 params, got ", dtype_name(param_dtype));
  PYLLM_CHECK(lr >= 0 && eps >= 0 && weight_decay >= 0 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
              "adamw_step: need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr=", lr, " eps=", eps,
              " weight_decay=", weight_decay, " betas=(", beta1, ", ", beta2, ")");
  PYLLM_CHECK(max_grad_norm < 0 || sumsq != 0, "adamw_step: clipping needs the grads' sum of squares");
  return tab;
}

}  // namespace adamw
}  // namespace pyllm
