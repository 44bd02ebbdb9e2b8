// Entry points of the CPU kernels, one block per op, bound in csrc/bind.cpp. Pointers arrive as
// integers (torch's data_ptr()), dtypes as the codes of common/dtype.h.
#pragma once
#include <cstdint>

namespace pyllm {

// swiglu.cpp
void swiglu_fwd_cpu(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols,
                    int64_t in_stride, int64_t out_stride, int dtype);
void swiglu_bwd_cpu(uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                    int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride, int dtype);

// adamw.cpp: `table` is int64[7][n_tensors] (param, grad, master, exp_avg, exp_avg_sq, step, numel).
void adamw_grad_sumsq_cpu(uintptr_t table, int64_t n_tensors, int dtype, uintptr_t sumsq);
void adamw_step_cpu(uintptr_t table, int64_t n_tensors, int param_dtype, bool has_master, double lr, double beta1,
                    double beta2, double eps, double weight_decay, uintptr_t sumsq, uintptr_t loss_scale,
                    double max_grad_norm, bool stochastic_rounding, uint64_t seed);

}  // namespace pyllm
