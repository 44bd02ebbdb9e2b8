// Runtime queries for `python -m pyllm info` and the tests' skip logic.
#include <cuda_runtime.h>

#include "common/checks.h"
#include "cuda/cuda_ops.h"

namespace pyllm {

int cuda_device_count() {
  int n = 0;
  // With no driver this returns cudaErrorInsufficientDriver / NoDevice: that means "no GPU".
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::string cuda_runtime_version() {
  int v = CUDART_VERSION;
  return concat(v / 1000, ".", (v % 1000) / 10);
}

}  // namespace pyllm
