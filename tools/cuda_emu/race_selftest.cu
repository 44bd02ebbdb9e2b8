// Races planted on purpose, each beside its fixed twin, for the race build of the emulator
// (build.py --race): tests/test_cuda_emu_race.py checks that ThreadSanitizer reports every planted
// one, at this file's line, and none of the twins. Each is a bug a kernel of csrc/cuda could have:
//   reduce:   a shared-memory tree reduction reading its neighbour's partial without the barrier
//             after the write (read after write)
//   reuse:    a loop over tiles that overwrites the shared tile without the barrier after the
//             previous tile's last read (write after read: the trailing __syncthreads)
//   warp:     one lane reading what another lane of its warp stored, with no __syncwarp between
//             (warp-synchronous code of pre-Volta days; independent thread scheduling breaks it)
//   cp_async: a tile landed by cp.async and read by another thread after its own wait but before
//             a __syncthreads (each thread's wait covers only its own copies)
//   ldmatrix: a warp's ldmatrix of rows another warp wrote, with no barrier between
//   global:   two threads of a block writing one output element
// Only for the emulator: never compiled by nvcc (CMakeLists.txt builds csrc/ only).
#include <cstdint>

#include "cuda/flash_attn_common.cuh"

namespace {

using pyllm::attn::cp_async_16;
using pyllm::attn::cp_async_commit;
using pyllm::attn::cp_async_wait;
using pyllm::attn::ldmatrix_x4;
using pyllm::attn::smem_addr;

constexpr int kThreads = 64;  // two warps

__global__ void reduce_kernel(const float* x, float* out, bool planted) {
  __shared__ float partial[kThreads];
  const int i = threadIdx.x;
  partial[i] = x[i];
  if (!planted) __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (i < half) partial[i] += partial[i + half];
    __syncthreads();
  }
  if (i == 0) out[0] = partial[0];
}

__global__ void reuse_kernel(const float* x, float* out, bool planted) {
  __shared__ float tile[kThreads];
  float acc = 0.f;
  for (int t = 0; t < 4; ++t) {
    tile[threadIdx.x] = x[t * kThreads + threadIdx.x];
    __syncthreads();
    acc += tile[(threadIdx.x + 1) % kThreads];
    if (!planted) __syncthreads();
  }
  out[threadIdx.x] = acc;
}

__global__ void warp_kernel(const float* x, float* out, bool planted) {
  __shared__ float stash[kThreads];
  stash[threadIdx.x] = x[threadIdx.x] * 2.f;
  if (!planted) __syncwarp();
  out[threadIdx.x] = stash[threadIdx.x ^ 1];  // a lane of the same warp
}

__global__ void cp_async_kernel(const __nv_bfloat16* x, float* out, bool planted) {
  extern __shared__ __align__(16) __nv_bfloat16 tile[];  // kThreads chunks of 8
  cp_async_16(smem_addr(tile + 8 * threadIdx.x), x + 8 * threadIdx.x, 16);
  cp_async_commit();
  cp_async_wait<0>();
  if (!planted) __syncthreads();
  out[threadIdx.x] = __bfloat162float(tile[8 * ((threadIdx.x + 1) % kThreads)]);
}

__global__ void ldmatrix_kernel(const __nv_bfloat16* x, float* out, bool planted) {
  extern __shared__ __align__(16) __nv_bfloat16 rows[];  // 32 rows of 8, written by warp 1
  if (threadIdx.x >= 32) {
    for (int j = 0; j < 8; ++j) rows[8 * (threadIdx.x - 32) + j] = x[8 * (threadIdx.x - 32) + j];
  }
  if (!planted) __syncthreads();
  if (threadIdx.x < 32) {  // warp 0 reads them: lane l gives row l's address
    uint32_t r[4];
    ldmatrix_x4(r, smem_addr(rows + 8 * threadIdx.x));
    out[threadIdx.x] = float(r[0] & 0xffff) + float(r[3] >> 16);
  }
}

__global__ void global_kernel(const float* x, float* out, bool planted) {
  const int owner = planted ? threadIdx.x / 2 : threadIdx.x;  // planted: two threads per element
  out[owner] = x[threadIdx.x];
}

}  // namespace

// which: 0 reduce, 1 reuse, 2 warp, 3 cp_async, 4 ldmatrix, 5 global. 0 on success, -1 for an
// unknown case or a failed launch. Inputs and outputs are the caller's (256 floats each).
extern "C" int emu_race_selftest(int which, bool planted, const float* x, float* out) {
  const auto* xh = reinterpret_cast<const __nv_bfloat16*>(x);
  constexpr int kTileBytes = kThreads * 8 * 2;
  switch (which) {
    case 0: reduce_kernel<<<2, kThreads>>>(x, out, planted); break;
    case 1: reuse_kernel<<<2, kThreads>>>(x, out, planted); break;
    case 2: warp_kernel<<<2, kThreads>>>(x, out, planted); break;
    case 3: cp_async_kernel<<<2, kThreads, kTileBytes>>>(xh, out, planted); break;
    case 4: ldmatrix_kernel<<<2, kThreads, kTileBytes>>>(xh, out, planted); break;
    case 5: global_kernel<<<2, kThreads>>>(x, out, planted); break;
    default: return -1;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : -1;
}
