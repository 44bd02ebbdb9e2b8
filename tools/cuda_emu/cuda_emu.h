// CUDA on the CPU, for checking kernels' index logic where no GPU is lent: force-included (g++
// -include) before a csrc/cuda/*.cu file that tools/cuda_emu/build.py has rewritten as C++ (its
// <<<...>>> launches and extern __shared__ arrays). NVIDIA's own headers give the types (dim3,
// __half, __nv_bfloat16 and their host conversions) and the runtime's declarations; this header
// and cuda_emu.cpp give the rest.
//
// Model: a launch runs its blocks one after another (in the grid's order, reversed or shuffled:
// emu_set_block_order), each finding garbage in its shared memory; a block's threads are fibers
// (ucontext) on one OS thread, each running until it reaches __syncthreads, a warp shuffle or its
// end. So __shared__ arrays are static locals (one block lives at a time), memory is plain host
// memory, and
// every interleaving is one the hardware allows. What it finds: wrong indices (with ASan), a
// barrier some threads reach at another call site or never reach (a hang on a GPU), a full-mask
// shuffle in a warp with exited or missing lanes (undefined there), a launch the GPU would refuse
// (block or grid too large, dynamic shared memory past 48 KB without the opt-in attribute or past
// the device's limit). The attention kernels' inline PTX runs through CPU stand-ins
// (flash_attn_common.cuh's PYLLM_CUDA_EMU branches). Races: the race build (build.py --race,
// PYLLM_EMU_RACE) runs the kernels under ThreadSanitizer with the GPU's ordering rules
// (cuda_emu.cpp says how); the plain build runs one interleaving and cannot see them. What neither
// can find: timing, and the GPU's own rounding of its fast intrinsics and tensor cores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

// The CUDA keywords, as a host compiler should read them here.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block at a time: a static local is the block's shared array. build.py registers each one it
// declares (static_smem below), so that every block finds garbage there, as on the GPU, not zeros
// (C++'s static storage) or what the block before left; this macro covers what it does not rewrite.
#define __shared__ static

namespace emu {

struct Thread {
  dim3 idx;
  int linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};

extern Thread* current;  // the fiber running now
extern dim3 block_idx, block_dim, grid_dim;

void syncthreads(const char* file, int line);
// Every live lane of the calling thread's warp meets here; a full-mask collective needs all 32.
void warp_meet(unsigned mask, const char* what);
void* dynamic_smem();
// A static __shared__ array (build.py adds the call after its declaration): filled with garbage the
// first time a thread passes it, then before every block (run_grid), with stores ThreadSanitizer
// does not see (they stand for no thread's write).
void static_smem(void* p, size_t bytes);
// The storage a shuffle passes values through: one slot per lane of each warp.
unsigned char* lane_slot(int warp, int lane);

struct LaunchConfig {
  dim3 grid, block;
  size_t smem = 0;
  cudaStream_t stream = nullptr;
};
// Checks a launch as the GPU would (records the launch error cudaGetLastError returns) and runs
// body(block) for each block when it is valid.
void run_grid(const void* kernel, const LaunchConfig& config, void (*body)(void*), void* state);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  LaunchConfig config;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "a kernel launch with the wrong argument count");
    struct State {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } state{kernel, std::tuple<std::decay_t<P>...>(static_cast<P>(args)...)};
    run_grid(reinterpret_cast<const void*>(kernel), config,
             [](void* s) {
               auto* st = static_cast<State*>(s);
               std::apply(st->kernel, st->params);
             },
             &state);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launch<P...>{kernel, LaunchConfig{grid, block, smem, stream}};
}

// CUDA's rule for a source lane outside the caller's width segment: the caller keeps its value.
template <typename T>
T exchange(unsigned mask, T v, int width, int lane_mask_or_delta, int mode, const char* what) {
  static_assert(sizeof(T) <= 16, "shuffle of a type over 16 bytes");  // (slots are 32 bytes)
  // (no meeting first: every collective's last meeting follows its last read of the slots)
  const int lane = current->linear % 32, warp = current->linear / 32;
  std::memcpy(lane_slot(warp, lane), &v, sizeof(T));
  warp_meet(mask, what);  // every lane's value is in its slot
  const int segment = lane & ~(width - 1);
  int src = mode == 0 ? lane ^ lane_mask_or_delta : mode == 1 ? lane + lane_mask_or_delta : lane - lane_mask_or_delta;
  if (mode == 2 ? src < segment : src >= segment + width) src = lane;
  T out;
  std::memcpy(&out, lane_slot(warp, src), sizeof(T));
  warp_meet(mask, what);  // every lane has read before a later shuffle writes its slot again
  return out;
}

// The tensor-core and async-copy instructions of the attention kernels (csrc/cuda/flash_attn_common.cuh
// calls these under PYLLM_CUDA_EMU), with PTX's semantics: warp collectives, every lane taking part.
// mma.sync.m16n8k16 (fp32 accumulators, fp16 / bf16 inputs): products exact, summed in fp64, one
// rounding into the accumulator (the tensor cores' own order and rounding are the GPU's).
void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);
// ldmatrix.x4 (.trans): lanes 8j..8j+7 give the rows of 8x8 matrix j, each lane gets its fragment.
void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans);
// A "shared-space address": the offset into the launch's dynamic shared memory, checked to lie in it.
uint32_t smem_offset(const void* p);
// cp.async.cg 16 bytes (src_bytes 0: zeros), queued per thread and landing only at the
// cp.async.wait_group that covers its group: a tile read before its wait reads the garbage left there.
void cp_async_16(uint32_t dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int newest_pending);
void trap(const char* file, int line);

}  // namespace emu

// pyllm's own arch checks (`#if __CUDA_ARCH__ < 900`) read this instead (build.py renames them):
// the device modelled is an H100's, sm_90.
#define PYLLM_EMU_CUDA_ARCH 900
#define __trap() ::emu::trap(__FILE__, __LINE__)

#define threadIdx (::emu::current->idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define warpSize 32
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::warp_meet(0xffffffffu, "__syncwarp")

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::exchange(mask, v, width, lane_mask, 0, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::exchange(mask, v, width, int(delta), 1, "__shfl_down_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::emu::exchange(mask, v, width, int(delta), 2, "__shfl_up_sync");
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  // (src within the caller's segment: lane ^ (lane ^ src) of the segment's lanes)
  const int lane = ::emu::current->linear % 32;
  const int segment = lane & ~(width - 1);
  return ::emu::exchange(mask, v, 32, (segment + (src % width)) ^ lane, 0, "__shfl_sync");
}

// The warp vote the attention forward takes: an OR over the mask's lanes, by the shuffles' exchange
// (so the same checks: every lane of the mask must reach it).
inline int __any_sync(unsigned mask, int pred) {
  int v = pred != 0;
  for (int o = 1; o < 32; o <<= 1) v |= __shfl_xor_sync(mask, v, o);
  return v;
}

// Device intrinsics as the host computes them (the fast-math ones exactly: a looser bound is the
// GPU's, which the tests' tolerances already allow).
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// Atomics as one read-modify-write each (the fibers never interleave inside one), made with the
// compiler's __atomic builtins so that the race build's TSan counts them as atomic, not as races.
namespace emu {
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T next = f(old);
  while (!__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) next = f(old);
  return old;
}
}  // namespace emu
template <typename T> inline T atomicAdd(T* p, T v) { return ::emu::atomic_update(p, [v](T o) { return T(o + v); }); }
template <typename T> inline T atomicMax(T* p, T v) { return ::emu::atomic_update(p, [v](T o) { return o < v ? v : o; }); }
template <typename T> inline T atomicMin(T* p, T v) { return ::emu::atomic_update(p, [v](T o) { return v < o ? v : o; }); }
template <typename T> inline T atomicExch(T* p, T v) { return ::emu::atomic_update(p, [v](T) { return v; }); }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) {
  return ::emu::atomic_update(p, [cmp, v](T o) { return o == cmp ? v : o; });
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// The C++ runtime API cuda_runtime.h declares under nvcc only: a kernel as a function pointer.
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* kernel) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T* kernel, int block_size, size_t smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), block_size, smem);
}
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
using std::isfinite;
using std::isinf;
using std::isnan;

// CUDA's min / max overloads take mixed integer types (int with int64_t) as device code writes them.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
