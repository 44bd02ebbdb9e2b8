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

}  // namespace pyllm
