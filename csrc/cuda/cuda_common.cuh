// Shared by the CUDA launchers: error checks that throw (never abort), the device guard, and the
// 16-bit type conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/checks.h"
#include "common/dtype.h"

// A failed call's error is cleared before the throw (cudaGetLastError), as the launch check's is
// (below): left set in this module's own cudart, a non-sticky error (an out-of-memory) would be
// reported again by the next launch check on the thread, for a launch that succeeded.
#define PYLLM_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    cudaError_t err_ = (expr);                                                              \
    if (err_ != cudaSuccess) {                                                              \
      (void)cudaGetLastError();                                                             \
      PYLLM_CHECK_RUNTIME(false, #expr, " failed: ", cudaGetErrorString(err_));             \
    }                                                                                       \
  } while (0)

// Launch errors (bad configuration, no kernel image for this GPU) surface here, at the call.
// cudaGetLastError, not cudaPeekAtLastError: peeking leaves a failed launch's error set, and this
// module links its own static cudart, whose error state torch never reads or clears, so every
// later pyllm launch on the thread would throw that stale error again.
#define PYLLM_CUDA_CHECK_LAUNCH(what)                                                              \
  do {                                                                                             \
    cudaError_t err_ = cudaGetLastError();                                                         \
    PYLLM_CHECK_RUNTIME(err_ == cudaSuccess, what, ": launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace pyllm {

// Makes `device` current for the launcher's scope and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PYLLM_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) PYLLM_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {  // errors ignored (a destructor must not throw), and cleared: see PYLLM_CUDA_CHECK
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_ && cudaSetDevice(prev_) != cudaSuccess)
      (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// VEC elements of T moved as one aligned load or store (16 bytes: 8 bf16 / fp16 or 4 fp32).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

}  // namespace pyllm

// PYLLM_DISPATCH_CUDA(code, T, body): fp32, fp16, bf16 (the CUDA kernels' dtypes).
#define PYLLM_DISPATCH_CUDA(code, T, ...)                                                  \
  switch (static_cast<::pyllm::DType>(code)) {                                            \
    case ::pyllm::DType::f32: { using T = float; __VA_ARGS__; break; }                     \
    case ::pyllm::DType::f16: { using T = __half; __VA_ARGS__; break; }                    \
    case ::pyllm::DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; break; }            \
    default: PYLLM_CHECK(false, "unsupported dtype for CUDA: ", ::pyllm::dtype_name(code)); \
  }
