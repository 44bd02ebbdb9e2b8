// Entry points of the CUDA launchers, bound in csrc/bind.cpp when the CUDA sources were built.
// Every launcher takes the device index and the stream (torch's current stream, as an integer).
#pragma once
#include <cstdint>
#include <string>

namespace pyllm {

// runtime.cu
int cuda_device_count();  // 0 where there is no GPU or no driver; never throws
std::string cuda_runtime_version();

// swiglu.cu
void swiglu_fwd_cuda(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols,
                     int64_t in_stride, int64_t out_stride, int dtype, int device, uintptr_t stream);
void swiglu_bwd_cuda(uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                     int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride, int dtype,
                     int device, uintptr_t stream);

}  // namespace pyllm
