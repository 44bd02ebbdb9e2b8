// Pieces shared by the FlashAttention CUDA kernels (flash_attn_fwd.cu, flash_attn_bwd.cu,
// flash_attn_decode.cu): tensor-core fragments (mma.sync m16n8k16, ldmatrix), cp.async, the
// swizzled shared-memory tile layout, and the launcher-side argument checks.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A 16x16 (row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B 16x8 (K x N):      b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C 16x8 fp32:         c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// so the C fragments of two adjacent 8-column tiles are exactly the A fragment of one 16-column
// k-step: the softmax probabilities go from the S accumulators into the P V mma without shared
// memory (FlashAttention-2).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/attn_params.h"
#include "common/counter_rng.h"
#include "cuda/cuda_common.cuh"

namespace pyllm {
namespace attn {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PYLLM_ATTN_UNSUPPORTED_ARCH 1  // mma.sync bf16, cp.async and ldmatrix need sm80
#endif

template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr bool is_bf16 = false; };
template <> struct MmaType<__nv_bfloat16> { static constexpr bool is_bf16 = true; };

// D += A B, fp32 accumulators, fp16 or bf16 inputs.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(PYLLM_CUDA_EMU)  // tools/cuda_emu: the instruction's semantics on the CPU, for its tests
  ::emu::mma_16x8x16(d, a, b, MmaType<T>::is_bf16);
#elif !defined(PYLLM_ATTN_UNSUPPORTED_ARCH)
  if constexpr (MmaType<T>::is_bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#if defined(PYLLM_CUDA_EMU)
  return ::emu::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(PYLLM_CUDA_EMU)
  ::emu::ldmatrix_x4(r, addr, false);
#elif !defined(PYLLM_ATTN_UNSUPPORTED_ARCH)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(PYLLM_CUDA_EMU)
  ::emu::ldmatrix_x4(r, addr, true);
#elif !defined(PYLLM_ATTN_UNSUPPORTED_ARCH)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// 2^x for the softmax's probabilities: one MUFU.EX2 (ex2.approx.ftz, FlashAttention-2's exp2f
// under --use_fast_math). exp2f without fast math is the same MUFU instruction wrapped in a range
// check and two predicated multiplies that keep results below 2^-126 as subnormals (SASS, nvcc 13,
// sm_90: FSETP, FMUL, MUFU.EX2, FMUL per score): 4 issue slots instead of 1, for probabilities that
// no 16-bit P and no row sum (>= 1, the row's maximum contributes 2^0) can hold. Same bits as exp2f
// for x >= -126; 0 below (and for -inf); NaN stays NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(PYLLM_CUDA_EMU)
  return x < -126.f ? 0.f : exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The mask of a block of scores held as mma C fragments: element e of tile (r, c) is row g + 8 (e / 2)
// of row tile r, column col_lane + 8 c + (e & 1) (col_lane = the block's first column + 2t). Columns
// outside that row's [lo, hi) get `fill`, in `acc` and in each of `more` (the dk_dv kernel zeroes P^T
// and dS^T). Query rows by key columns in the forward's S and the dq kernel's dS; key rows by query
// columns in the dk_dv kernel. The callers branch around it on the blocks no mask crosses: tested
// inside their loops over the scores, ptxas predicated its ~3 instructions per score on every block
// (2026-11-30's kernels).
template <int R, int C, typename... More>
__device__ __forceinline__ void mask_scores(float fill, int col_lane, const int (&lo)[R][2], const int (&hi)[R][2],
                                            float (&acc)[R][C][4], More&... more) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = col_lane + c * 8 + (e & 1);
        if (col < lo[r][e / 2] || col >= hi[r][e / 2]) {
          acc[r][c][e] = fill;
          ((more[r][c][e] = fill), ...);
        }
      }
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes 16 zero bytes and reads
// nothing (rows past the end of a sequence), the source address must still be a valid one.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
#if defined(PYLLM_CUDA_EMU)
  ::emu::cp_async_16(dst, src, src_bytes);
#elif !defined(PYLLM_ATTN_UNSUPPORTED_ARCH)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(PYLLM_CUDA_EMU)
  ::emu::cp_async_commit();
#elif !defined(PYLLM_ATTN_UNSUPPORTED_ARCH)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(PYLLM_CUDA_EMU)
  ::emu::cp_async_wait(N);
#elif !defined(PYLLM_ATTN_UNSUPPORTED_ARCH)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Capped scores (softcap, Gemma 2) and ALiBi (alibi_slopes) in the order of the CPU twin
// (csrc/cpu/flash_attn.cpp): scale, cap, bias, then the mask. A kernel's score of accumulator x
// (q . k) at ALiBi distance d (attn_params.h's alibi_distance), in units of `unit` (log2(e) for
// the kernels that exponentiate with exp2, 1 for natural logs):
//   unit * (cap * tanh(x * scale / cap) - slope * |d|)
// with dcap = 1 - tanh^2, the cap's derivative, by which the backward scales dS (the bias is a
// constant). The kernels without either keep their own x * scale * unit path (score_or).
// tanhf, not tanh.approx: its ~2^-11 relative error times a cap of 50 would move a score by ~0.02,
// a 2% error in P, past twice torch's bf16 error; tanhf is a dozen instructions beside a score's
// 2 * D FMAs. The tensor-core kernels take it as a template parameter (Mods): their instances
// without it are the code that ran on the H200, instruction for instruction, and keep its register
// allocation (with a runtime branch, ptxas re-planned the default kernels: a 168-register cap on
// the dq kernel, 8 B of spill on sm_80); the SIMT and decode kernels branch at run time.
struct ScoreMod {
  bool capped = false, alibi = false;
  float scale_unit = 0.f, cap_in = 0.f, cap_unit = 0.f, slope_unit = 0.f;  // cap_in = scale / cap

  __device__ __forceinline__ ScoreMod() {}  // none (the kernels instantiated without them)
  // Sequence b, query head h; scale: the factor x still needs (the decode kernel folds it into q: 1).
  __device__ __forceinline__ ScoreMod(const AttnParams& p, int64_t b, int64_t h, float scale, float unit) {
    capped = p.softcap > 0;
    alibi = p.alibi_slopes != nullptr;
    scale_unit = scale * unit;
    if (capped) {
      const float cap = float(p.softcap);
      cap_in = scale / cap;
      cap_unit = cap * unit;
    }
    if (alibi) slope_unit = -p.alibi_slopes[b * p.alibi_batch_stride + h] * unit;
  }
  __device__ __forceinline__ bool on() const { return capped || alibi; }
  __device__ __forceinline__ float score(float x, int dist, float& dcap) const {
    float s;
    if (capped) {
      const float th = tanhf(x * cap_in);
      s = cap_unit * th;
      dcap = 1.f - th * th;
    } else {
      s = x * scale_unit;
      dcap = 1.f;
    }
    if (alibi) s += slope_unit * fabsf(float(dist));
    return s;
  }
  // score() where `use` (Mods, a compile-time constant in the tensor-core kernels, or on()), else the
  // plain x * plain_scale with dcap = 1.
  __device__ __forceinline__ float score_or(bool use, float x, float plain_scale, int dist, float& dcap) const {
    if (use) return score(x, dist, dcap);
    dcap = 1.f;
    return x * plain_scale;
  }
};

// Dropout on the probabilities (dropout_p; attn_params.h): (query i, key j) of sequence b's query
// head h is kept iff attn_dropout_bits(row_hash(i), col_hash(j)) >= threshold (common/counter_rng.h,
// the same words as the CPU twin's and pyllm.ops.flash_attn.dropout_mask's). As the CPU twin: the
// forward zeroes the dropped P after the row sums and scales the output by 1 / (1 - p) at the end,
// the backward takes dV over the kept P (scaled once at the end) and dS = P (f dP - delta) with
// f = 1 / (1 - p) or 0. The tensor-core kernels take it in their Mods instances (run-time branch
// there), the SIMT backward at run time. ~9 integer ops per score (one mix32), the row / column
// hashes once per lane row and column. The decode kernel has none (inference).
struct Dropout {
  AttnDropoutKey key;
  uint32_t threshold = 0;
  float scale = 1.f;
  bool on = false;
  __device__ __forceinline__ Dropout() {}
  __device__ __forceinline__ Dropout(const AttnParams& p, int64_t b, int64_t h) : on(has_dropout(p)) {
    if (on) {
      key = AttnDropoutKey(p.dropout_seed, b, h);
      threshold = p.dropout_threshold;
      scale = float(p.dropout_scale);
    }
  }
  __device__ __forceinline__ bool kept(uint32_t row_hash, uint32_t col_hash) const {
    return attn_dropout_bits(row_hash, col_hash) >= threshold;
  }
};

// Two fp32 -> one register of two 16-bit values (low half = first), as the A fragment wants.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Shared-memory tile of Rows x D 16-bit elements, stored in 16-byte chunks (8 elements) with the
// chunk index XOR-ed by the row (mod 8, or mod 4 when the row's chunk count is not a multiple of
// 8): the 8 rows that one ldmatrix phase reads at the same logical column land in different bank
// groups (D = 64, 128, 256: conflict-free; D = 32, 96: 2-way). The XOR must stay inside the row:
// D = 96 has 12 chunks, and chunk 8..11 XOR 4..7 would give 12..15, the next row's chunks, so
// its mask is 3 (chunks permute within aligned groups of 4).
template <int D>
struct Swizzle {
  static constexpr int kChunks = D / 8;
  static_assert(kChunks % 4 == 0, "the swizzle permutes chunks within aligned groups of 4 or 8");
  static constexpr int kMask = kChunks % 8 == 0 ? 7 : 3;
  __device__ __forceinline__ static int offset(int row, int col) {  // col: a multiple of 8
    return row * D + (((col >> 3) ^ (row & kMask)) << 3);
  }
};

// Copies Rows x D of one head (row r = token start + r) into a swizzled tile with cp.async;
// rows >= valid are zero-filled. Every thread of the block takes chunks in turn.
template <int Rows, int D, int Threads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t token_stride, int valid) {
  constexpr int kChunks = D / 8;
  auto copy = [&](auto full) {  // full: std::true_type for every tile but a sequence's last (no row test)
#pragma unroll
    for (int c = threadIdx.x; c < Rows * kChunks; c += Threads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const bool in = decltype(full)::value || row < valid;
      cp_async_16(smem_addr(tile + Swizzle<D>::offset(row, col)), in ? base + row * token_stride + col : base,
                  in ? 16 : 0);
    }
  };
  if (valid >= Rows)
    copy(std::true_type{});
  else
    copy(std::false_type{});
}

// Opts Kernel into `bytes` of dynamic shared memory on `device` (the current device: the launchers
// hold a DeviceGuard), after checking the device's opt-in limit. Once per (kernel, device), not per
// launch: the attribute query and cudaFuncSetAttribute are driver calls. One bit per device in a
// static of this instantiation (one per kernel, as Kernel is the template argument); two threads
// racing on a clear bit both set the same attribute, which is harmless; a failure throws and
// leaves the bit clear, so the next launch checks again. Devices past 63 are not cached.
// Assumes the primary context lives as long as the process (torch never resets it): a
// cudaDeviceReset would drop the attribute while the bit stays set.
template <auto Kernel>
void opt_in_dynamic_smem(int bytes, int device, const char* what) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return;
  if (bytes > 48 * 1024) {  // up to 48 KB needs no opt-in
    int optin = 0;
    PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    PYLLM_CHECK_RUNTIME(bytes <= optin, "flash_attn: ", what, " needs ", bytes,
                        " bytes of shared memory per block, device ", device, " allows ", optin);
    PYLLM_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
  done.fetch_or(bit, std::memory_order_release);
}

// The taller tiles of the tensor-core kernels while they are unmeasured (flash_attn_fwd.cu's
// FwdTile, flash_attn_bwd_mma.cu's BwdKVTile and BwdQTile): 2 m-tiles per warp where the variable
// env_name says 128, else 1. Read per launch, so that a benchmark or test can switch it within one
// process; built for sm_90 only (the experiment's GPU), so 1 on other devices whatever it says.
// The callers instantiate 2 only for the head dims that have it. The device's code must come from
// sm_90 itself: a build without 90 in PYLLM_CUDA_ARCHS runs on an H100 by JIT-compiling the
// compute_80 PTX, where __CUDA_ARCH__ is 800 and the taller kernels are a __trap() (a sticky error
// that takes torch's context down with it). The probe's ptxVersion says which virtual arch the
// device runs this module's code from.
// runs_sm90_code: whether `device` runs this module's sm_90 code (asked by the other sm_90
// experiments too: the backward's atomic dQ).
__global__ void tall_tiles_probe_kernel();
inline bool runs_sm90_code(int device) {
  int major = 0;
  PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9) return false;
  cudaFuncAttributes attr{};
  PYLLM_CUDA_CHECK(cudaFuncGetAttributes(&attr, tall_tiles_probe_kernel));
  return attr.ptxVersion >= 90;
}
inline int tall_tiles(int device, const char* env_name) {
  const char* env = std::getenv(env_name);
  if (!env || std::strcmp(env, "128") != 0) return 1;
  return runs_sm90_code(device) ? 2 : 1;
}

// The tensor-core backward's dk_dv and dq kernels (flash_attn_bwd_mma.cu), launched by
// flash_attn_bwd_cuda after its delta kernel; p.dtype is f16 or bf16. With dq_accum (fp32, rows_q *
// n_heads * head_dim, 16-byte aligned; only where atomic_dq_available) the dk_dv kernel adds dQ into
// it with fp32 atomics (not bitwise repeatable) and a conversion pass writes dq: no dq kernel.
bool atomic_dq_available(int64_t head_dim, int device);
void launch_bwd_mma(const AttnParams& p, const float* delta, int device, cudaStream_t stream, float* dq_accum,
                    int64_t rows_q);

// Host-side checks shared by the launchers.
inline void check_cuda_attn_args(const AttnParams& p, int dtype, int device) {
  PYLLM_CHECK(dtype == int(DType::f16) || dtype == int(DType::bf16),
              "flash_attn: CUDA dtype must be float16 or bfloat16, got ", dtype_name(dtype));
  int major = 0;
  PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  PYLLM_CHECK_RUNTIME(major >= 8, "flash_attn: the CUDA kernels need compute capability 8.0 (A100) or newer, device ",
                      device, " has ", major, ".x");
  // cp.async moves 16-byte chunks: every row of q, k, v must start 16-byte aligned.
  const int64_t* strides[3] = {p.q_strides, p.k_strides, p.v_strides};
  const void* ptrs[3] = {p.q, p.k, p.v};
  for (int i = 0; i < 3; ++i) {
    PYLLM_CHECK(reinterpret_cast<uintptr_t>(ptrs[i]) % 16 == 0, "flash_attn: q, k, v must be 16-byte aligned on CUDA");
    for (int j = 0; j < 3; ++j)
      PYLLM_CHECK(strides[i][j] % 8 == 0, "flash_attn: q, k, v strides must be multiples of 8 elements on CUDA, got ",
                  strides[i][j]);
  }
  PYLLM_CHECK(p.batch <= 65535 && p.n_heads <= 65535, "flash_attn: batch and n_heads must be <= 65535 on CUDA");
}

}  // namespace attn
}  // namespace pyllm
