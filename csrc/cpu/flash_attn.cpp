// FlashAttention on the CPU: the same tiling and online softmax as csrc/cuda/flash_attn_*.cu, so
// that the algorithm's logic (block edges, bottom-right mask offsets, varlen, GQA head mapping,
// LSE) runs in CI on every commit, and fast enough to train with on a CPU. Layout, mask and LSE
// conventions: csrc/common/attn_params.h.
//
// Forward, per (sequence b, query head h, block of kBlockQ queries):
//   Q_blk * scale -> fp32 tile; for each block of kBlockK keys that some query of the block sees:
//     S = Q_blk K_blk^T, masked; m_new = max(m, rowmax S); P = exp(S - m_new);
//     l = l * exp(m - m_new) + rowsum P;  O = O * exp(m - m_new) + P V_blk
//   out = O / l, lse = m + log(l). The T x T matrix never exists: memory is O(kBlockQ * kBlockK)
//   per thread. Blocks entirely outside the mask are skipped, blocks entirely inside it skip the
//   per-element mask.
// Backward (FlashAttention-2, recomputing P = exp(S - lse) from the saved LSE), one pass per
// (sequence b, kv head, chunk of its queries): for each key block j, for each query head h of the
// GQA group and each query block i of the chunk that sees j:
//     S = Q_i K_j^T, P = exp(S - lse), dP = dO_i V_j^T, dS = P * (dP - delta)
//     dV_j += P^T dO_i,  dK_j += dS^T Q_i,  dQ_i += dS K_j
//   with delta_i = sum_d dO_id O_id - dlse_i (dlse: a gradient flowing into the returned lse, for
//   which d lse_i / d S_ij = P_ij folds into the same term). 5 block matmuls, as FlashAttention-2,
//   no recomputation. dQ of the chunk's rows accumulates in a per-thread fp32 buffer and is
//   written at the end. With one chunk (the usual case: at least kMinBwdItems (sequence, kv head)
//   pairs) dK_j, dV_j are complete when block j is and are written then; with more, each chunk
//   writes fp32 partials and a last pass adds them in chunk order. Every gradient element is thus
//   summed in a fixed order that depends on the shape only: the CPU backward is always bitwise
//   deterministic, for any thread count, with no atomics.
// Capped scores (softcap > 0, Gemma 2): S -> c tanh(S / c) after the scale, before the mask, so
// the LSE is of the capped scores; the backward recomputes the cap and multiplies dS by its
// derivative 1 - (S' / c)^2. The decode kernel caps its chunks too; the AMX path does not take
// it (dispatch sends such calls to the tiles here).
// ALiBi (alibi_slopes, attn_params.h): -slope * |distance| added after the scale and the cap, before
// the mask, in the forward, the backward (the same bias bit for bit; the cap's derivative then comes
// from the capped score before the bias) and the decode kernel; not on AMX (the tiles here instead).
// Its cost, one vector pass over each score tile: below.
// Dropout (dropout_p, attn_params.h; new 2026-12-05): the forward zeroes the dropped probabilities
// after the row sums and scales the output by 1 / (1 - p) once; the backward recomputes the same
// mask (common/counter_rng.h's AttnDropoutKey: a pure function of the seed, sequence, head, query
// and key), takes dV over the kept P and dS = P (f dP - delta). Here, on AMX (flash_attn_amx.cpp)
// and in the CUDA kernels alike; not in the decode kernel (KV-cache calls are inference).
// FLOPs: 4 * Tq * Tk * D per head forward (2 matmuls), 10 backward (5), halved for causal.
// Bytes: the forward reads q once and k, v once per thread that works on the head (each key block
// is packed into that thread's fp32 copy of the head the first time one of its query blocks needs
// it), writes out and lse once; the backward reads q, dout, out, k, v once and writes dq, dk, dv
// once. Scratch, per thread and kept across calls while under 32 MB a kernel (kKeptScratchBytes) and
// 64 MB a thread over all kernels (kKeptScratchThreadBytes): forward
// 2 * Tk * D * 4 bytes, backward 3 * group * Tq * D * 4 bytes (q, dout, dq of the group: 6 MB at
// T = 4096, D = 128, MHA); a split backward also allocates its partials, chunks (<= 8) times
// dk + dv in fp32 (34 MB for MQA, B = 1, T = 4096, D = 128).
// Both are compute-bound: every element packed into a tile takes part in 64-128 FMAs, so the
// floor is the FMA rate (2 FLOPs x 16 lanes x ~3.6 GHz = 116 GFLOP/s per core measured here).
//
// Vectorisation: every block matmul is one micro-kernel, C[R rows][up to 64 columns] +=
// A(r, k) * B[k][:], with the accumulators in GCC vector-extension registers (one register of the
// build's ISA: 16 fp32 lanes on AVX-512, 8 on AVX2, 4 on SSE / NEON; see kVecBytes), all
// operands packed into contiguous fp32 tiles first (bf16 converted once per tile, not per use; fp32
// tiles copied too: rows of a (B, T, H, D) tensor at D = 128, H = 8 are 4 KB apart, and reading a
// 64-row tile in place aliased into the same L1 sets: the fp32 forward ran at half the bf16 speed;
// fp32 decode-sized blocks, which read each row once, are the exception).
// R = 4 rows x 4 vectors = 16 accumulators + 4 B vectors fits AVX-512's 32 registers; 4 x 2 + 2
// fits the 16 of AVX2 and SSE (kMaxNV).
// bf16 inputs on CPUs with AVX512_BF16: the score matmuls (S = Q K^T forward and backward, dP =
// dO V^T) run on the bf16 values themselves with vdpbf16ps (micro_kernel_bf16: exact products,
// fp32 sums, twice the fp32 FMA rate on Zen 4, half of it on the Intel Xeon below); P V and the
// three gradient matmuls stay fp32, since P and dS exist only in fp32. Rounding them to bf16 (as
// flash-attn's CUDA kernels do) and running them on vdpbf16ps was tried on the Intel Xeon and was
// slower there (below); not measured on Zen 4. On CPUs with AMX-BF16 the bf16 forward and
// backward run on AMX tiles instead (flash_attn_amx.cpp, with its measurements). Softmax rows are explicit vector loops with
// common/cpu_math.h's exp2 of (x - m) log2(e) (vreduceps + polynomial + vscalefps under AVX-512; no
// -ffast-math; vsoftmax_exp below). Math in fp32 for fp32 / bf16
// storage, fp64 for fp64 (kept for gradcheck; the LSE is then fp64 too). Threading: OpenMP over
// work items, dynamic schedule.
//
// Measured (2026-11-23, 2-core AMD EPYC Zen 4 VM shared with other jobs, so preliminary):
//   one core's fp32 FMA peak, 12 independent vfmadd231ps chains: 116 GFLOP/s
//   micro-kernel, hot L1, 64 x 64 x 64..128 blocks: 100-109 GFLOP/s (46-83 before the register pin)
//   whole kernels, 1 thread, B = 1, H = 8, T = 1024, non-causal, useful FLOPs: forward 86-91
//   GFLOP/s fp32 D = 64, 126 bf16 D = 128 (97 before vdpbf16ps); backward 91 fp32 D = 64, 110-115
//   bf16 D = 128; perf (cpu-clock samples, fp32): 78% of the backward and ~70% of the forward
//   inside the micro-kernel.
//   bench/bench_attention.py, 2 threads, H = 8, B = 4..1 at T = 512..4096, D = 64 / 128, fp32 and
//   bf16, causal or not, vs torch 2.13's SDPA in the same process: all 64 rows ahead, forward
//   1.05-3.23x, forward + backward 1.06-2.67x; non-causal 0.16-0.19 TFLOPs fp32 (70-82% of the
//   two cores' fp32 FMA peak), 0.20-0.24 bf16. Before the bf16 dot products bf16 D = 128,
//   T = 4096, non-causal forward + backward was the one row behind (0.90x). Decode (one token,
//   cache 512..4096): bf16 2.0-5.1x SDPA, fp32 0.4-0.9x; decode (Tq <= 8) now has its own path
//   (decode below, with its measurements).
// Measured (2026-11-30, 2-core Intel Xeon VM, shared; AVX512_BF16, AVX512_FP16, AMX-BF16):
//   vfmadd231ps zmm 5.0-5.3 G/s (2 per cycle), vdpbf16ps zmm or ymm 1.1-1.3 G/s (1 per 2 cycles):
//   bf16 dot products run at half the fp32 FMA FLOP rate here, not twice. Micro-kernels, hot L1,
//   64 x 64 x 64..128: gemm 138-163 GFLOP/s, gemm_bf16 81-85 (scores and P V orientations alike).
//   Whole kernels, bf16, 1 thread, B = 1, H = 8, T = 1024 / 4096, D = 64 / 128, causal or not,
//   interleaved A/B of two builds, 2-3 runs: O += P V on vdpbf16ps (P rounded to bf16, nearest
//   even) made the forward 1.08-1.29x slower (mostly ~1.24x; the tests passed, the worst
//   forward error / tolerance going 0.31 -> 0.36); dV += P^T dO alone made forward + backward
//   1.01-1.25x slower (mostly ~1.08x); neither kept, the other two gradient matmuls not tried.
//   The bf16 scores themselves lose here: a build without PYLLM_BF16_DOT (bf16 widened to fp32
//   tiles) ran bf16 forward in 0.70-0.83x the time, forward + backward in 0.71-0.88x. Torch 2.13's
//   SDPA, 1 thread, T = 1024: fp32 at par with this kernel (1.00-1.05x its time), bf16 at 254-368
//   GFLOP/s, above the fp32 FMA peak (AMX tiles, presumably through oneDNN): 2.9-4x ahead of ours
//   (one run). On such CPUs the bf16 path wants AMX (or at least the fp32 tiles), not vdpbf16ps.
// Measured (2026-11-30, 2-core Intel Xeon VM with AMX, shared and noisy: +-15% between runs), bf16
//   forward on AMX tiles (flash_attn_amx.cpp) vs this file's fp32 tiles (PYLLM_ATTN_CPU_AMX=0) vs
//   torch 2.13's SDPA, 1 thread, B = 1, H = 8, SDPA in the same process, min of 3, two runs each,
//   our speed / SDPA's (non-causal; causal):
//     T = 1024: D = 64 AMX 0.96-1.00; 1.32-1.47, D = 128 0.98-1.02; 1.15-1.34
//     T = 2048: D = 64 AMX 0.87-1.02; 1.02-1.21, D = 128 1.00-1.08; 1.13-1.22
//     T = 4096: D = 64 AMX 0.87-0.90; 1.05-1.23, D = 128 0.67-1.07; 0.93-1.14
//     fp32 tiles, all 12 shapes: 0.29-0.76 (D = 128 non-causal 0.29-0.38): AMX is 2-3.5x faster.
//   2 threads, T = 1024 / 4096, same 8 shapes, two runs: AMX 0.82-1.23 non-causal, 1.00-1.57 causal;
//   fp32 tiles 0.29-0.80.
//   AMX 138-414 GFLOP/s per core. bench/bench_attention.py --quick (2 threads, T = 512 causal):
//   bf16 forward 1.37x SDPA at D = 64, 1.12x at D = 128. Non-causal D = 64 at long T stayed below
//   SDPA: there the softmax's vector work (~20 ops per 16 scores) outweighed the tiles' matmuls.
//   Later the same day, with that forward retuned (~10 vector ops per 16 scores, tile steps
//   interleaved with them, 64-byte-aligned tiles) and the backward on AMX tiles too
//   (flash_attn_amx.cpp has their measurements), bench/bench_attention.py, 2 threads, all 32 bf16
//   rows: forward 1.20-1.81x SDPA, forward + backward 1.45-3.93x.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/attn_params.h"
#include "common/checks.h"
#include "common/counter_rng.h"
#include "common/cpu_math.h"
#include "common/dtype.h"
#include "cpu/cpu_ops.h"
#include "cpu/flash_attn.h"

// The vector helpers below pass 64-byte vectors by value; without AVX-512 GCC notes that this ABI
// changed in GCC 4.6. They are internal and inlined (anonymous namespace), so no ABI is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pyllm {
namespace {


// The vectors are the widest the build's ISA has registers for: 64 bytes (AVX-512), 32 (AVX, AVX2),
// 16 (SSE, NEON). Wider than the registers, GCC keeps them in memory and every operation goes
// through the stack: the -march=x86-64-v3 (AVX2) build of 64-byte vectors ran the forward at
// 0.08-0.10x torch's SDPA (bench_attention.py --quick, 2-core EPYC, 2026-12-02).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float vec_f32 __attribute__((vector_size(kVecBytes), aligned(4)));
typedef double vec_f64 __attribute__((vector_size(kVecBytes), aligned(8)));
template <typename A> struct Vec;
template <> struct Vec<float> { using type = vec_f32; static constexpr int lanes = kVecBytes / 4; };
template <> struct Vec<double> { using type = vec_f64; static constexpr int lanes = kVecBytes / 8; };
constexpr int kLanes = Vec<float>::lanes;

template <typename A> inline typename Vec<A>::type vload(const A* p) { return *reinterpret_cast<const typename Vec<A>::type*>(p); }
template <typename A> inline void vstore(A* p, typename Vec<A>::type x) { *reinterpret_cast<typename Vec<A>::type*>(p) = x; }

// f of every lane, through an array the compiler vectorises (cpu_math.h's functions are
// branch-free; with -fno-trapping-math GCC 12 turns the loop into the vector ops themselves).
template <typename V, typename F>
inline V lanewise(V x, F f) {
  using A = std::remove_reference_t<decltype(x[0])>;
  constexpr int n = sizeof(V) / sizeof(A);
  alignas(64) A in[n], out[n];
  std::memcpy(in, &x, sizeof(V));
#pragma omp simd
  for (int l = 0; l < n; ++l) out[l] = f(in[l]);
  V r;
  std::memcpy(&r, out, sizeof(V));
  return r;
}

// exp of every lane, as accurate as exp_acc<T> (storage type T decides the polynomial degree).
template <typename T>
inline vec_f32 vexp(vec_f32 x) {
  constexpr int kDegree = sizeof(T) == 2 ? 5 : 7;
#ifdef PYLLM_AVX512
  return (vec_f32)avx512::exp<kDegree>((__m512)x);
#else
  return lanewise(x, [](float v) { return exp_f32<kDegree>(v); });
#endif
}
template <typename T>
inline vec_f64 vexp(vec_f64 x) {
  return lanewise(x, [](double v) { return std::exp(v); });
}

// e^x for the softmaxes, x = score - max (or - lse) <= 0, masked scores -inf, NaN stays NaN: in
// fp32, 2^(x log2(e)) by cpu_math.h's exp2 (degree 6 for fp32 results, 4 for bf16): 10 vector ops
// per 16 scores where exp<7> / exp<5> and the select for masked keys took 14-16. The scores stay
// in natural units (log2(e) is not folded into Q's scale) so that the LSE is m + log(l) and the
// backward's S - lse is exactly 0 where the forward's x - m was (one key: P = 1, bit for bit).
// Error: rounding x log2(e) adds |x| 2^-24 relative, so P's absolute error stays <= 8e-8 (exp<7>:
// 4.4e-8) for x in [-30, 0] (2e7 points each; P <= 1 and the row's max term is 1, so this is what
// reaches the output), the relative one reaching 3.8e-6 at x = -80 where P ~ 2e-35.
// Measured (2026-11-30, Intel Xeon VM, 1 thread, perf cpu-clock samples of 100 calls, D = 64,
// T = 2048, fp32, with the 4-way max below): the forward's work outside its matmuls 6.1-7.1k ->
// 4.4-4.6k samples, of ~28-32k in all; the fp32 backward's share outside its matmuls 16.7 -> 14.1%.
// Thread CPU time, separate processes, interleaved, min of 3 x 3: forward 0.92-0.97x the time
// (D = 64 / 128, T = 1024 causal / 2048 non-causal), forward + backward 0.94-1.03x (noise +-4%).
template <typename T>
inline vec_f32 vsoftmax_exp(vec_f32 x) {
  constexpr int kDegree = sizeof(T) == 2 ? 4 : 6;
  const vec_f32 t = x * 1.44269504088896341f;
#ifdef PYLLM_AVX512
  return (vec_f32)avx512::exp2<kDegree>((__m512)t);
#else
  return lanewise(t, [](float v) { return exp2_nonpositive_f32<kDegree>(v); });
#endif
}
template <typename T>
inline vec_f64 vsoftmax_exp(vec_f64 x) { return vexp<T>(x); }

// C[r][0 : NV * lanes] (+)= sum_k A(r, k) * B[k][0 : NV * lanes] for r < R, A(r, k) = a[r*ams + k*aks].
template <int R, int NV, typename A>
inline void micro_kernel(int64_t K, const A* __restrict a, int64_t ams, int64_t aks, const A* __restrict b,
                         int64_t ldb, A* __restrict c, int64_t ldc, bool accumulate) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes;
  V acc[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(c + r * ldc + v * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = vload(b + k * ldb + v * L);
#if defined(__AVX512F__)
      // Pins bv to a register: without this GCC 12 folds the load into each of the R FMAs that use
      // it (R + 1 loads per NV FMAs) and the kernel ran load-bound at 46-83 GFLOP/s per core
      // instead of 100-109 (hot L1; see the header).
      __asm__("" : "+v"(bv[v]));
#endif
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const A s = a[r * ams + k * aks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * L, acc[r][v]);
}

// Vectors of C per micro-kernel call: R x kMaxNV accumulators plus kMaxNV B vectors in registers.
// AVX-512 has 32: 4 x 4 + 4. AVX2 and SSE have 16: 4 x 2 + 2 (4 x 4 spilled).
constexpr int kMaxNV = kVecBytes == 64 ? 4 : 2;

template <int R, typename A>
inline void micro_cols(int nv, int64_t K, const A* a, int64_t ams, int64_t aks, const A* b, int64_t ldb, A* c,
                       int64_t ldc, bool accumulate) {
  if constexpr (kMaxNV == 4) {
    switch (nv) {
      case 1: micro_kernel<R, 1>(K, a, ams, aks, b, ldb, c, ldc, accumulate); break;
      case 2: micro_kernel<R, 2>(K, a, ams, aks, b, ldb, c, ldc, accumulate); break;
      case 3: micro_kernel<R, 3>(K, a, ams, aks, b, ldb, c, ldc, accumulate); break;
      default: micro_kernel<R, 4>(K, a, ams, aks, b, ldb, c, ldc, accumulate); break;
    }
  } else {
    if (nv == 1) micro_kernel<R, 1>(K, a, ams, aks, b, ldb, c, ldc, accumulate);
    else micro_kernel<R, 2>(K, a, ams, aks, b, ldb, c, ldc, accumulate);
  }
}

// C[M][N] (+)= A(M x K) B(K x N): B rows ldb apart, C rows ldc apart, N a multiple of the lanes.
template <int N, typename A>
void gemm(int64_t M, int64_t K, const A* a, int64_t ams, int64_t aks, const A* b, int64_t ldb, A* c, int64_t ldc,
          bool accumulate) {
  constexpr int L = Vec<A>::lanes;
  static_assert(N % L == 0, "gemm: N must be a multiple of the vector width");
  constexpr int kVectors = N / L;
  for (int v0 = 0; v0 < kVectors; v0 += kMaxNV) {
    const int nv = std::min(kMaxNV, kVectors - v0);
    const A* bc = b + v0 * L;
    A* cc = c + v0 * L;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) micro_cols<4>(nv, K, a + m * ams, ams, aks, bc, ldb, cc + m * ldc, ldc, accumulate);
    switch (M - m) {
      case 1: micro_cols<1>(nv, K, a + m * ams, ams, aks, bc, ldb, cc + m * ldc, ldc, accumulate); break;
      case 2: micro_cols<2>(nv, K, a + m * ams, ams, aks, bc, ldb, cc + m * ldc, ldc, accumulate); break;
      case 3: micro_cols<3>(nv, K, a + m * ams, ams, aks, bc, ldb, cc + m * ldc, ldc, accumulate); break;
      default: break;
    }
  }
}

#if defined(PYLLM_AVX512) && defined(__AVX512BF16__)
// bf16 inputs: the score matmuls (S = Q K^T, and dP = dO V^T in the backward) take the bf16 values
// as they are, with vdpbf16ps: 2 products per fp32 lane, each exact (8-bit mantissas), summed in
// fp32, so the scores are as accurate as the fp32 path's; one core ran it at 232 GFLOP/s, 2x
// the fp32 FMA rate, on Zen 4 (81-85 GFLOP/s, half the fp32 rate, on the Intel Xeon of the header).
// The softmax scale is applied to the fp32 scores after. P V and the gradient
// matmuls stay fp32 (their left operands, P and dS, exist only in fp32).
#define PYLLM_BF16_DOT 1
template <typename T> constexpr bool kBf16Dot = std::is_same_v<T, bf16>;

// Operands as bf16 pairs: A(r, k2) = a[r * ams + k2 * aks] holds elements 2 k2, 2 k2 + 1 of row r's
// reduction; B[k2][n] the same two of column n. C[r][0 : 16 NV] (+)= sum_k A(r, k) B[k][:].
template <int R, int NV>
inline void micro_kernel_bf16(int64_t K2, const uint32_t* __restrict a, int64_t ams, int64_t aks,
                              const uint32_t* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc,
                              bool accumulate) {
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_loadu_si512(b + k2 * ldb + v * 16);
      __asm__("" : "+v"(bv[v]));  // as in micro_kernel
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[r * ams + k2 * aks]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, (__m512bh)bv[v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
}

template <int R>
inline void micro_cols_bf16(int nv, int64_t K2, const uint32_t* a, int64_t ams, int64_t aks, const uint32_t* b,
                            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  switch (nv) {
    case 1: micro_kernel_bf16<R, 1>(K2, a, ams, aks, b, ldb, c, ldc, accumulate); break;
    case 2: micro_kernel_bf16<R, 2>(K2, a, ams, aks, b, ldb, c, ldc, accumulate); break;
    case 3: micro_kernel_bf16<R, 3>(K2, a, ams, aks, b, ldb, c, ldc, accumulate); break;
    default: micro_kernel_bf16<R, 4>(K2, a, ams, aks, b, ldb, c, ldc, accumulate); break;
  }
}

// C[M][N] = A(M x 2 K2) B(2 K2 x N) in bf16 pairs, fp32 out (as gemm; strides in pairs).
template <int N>
void gemm_bf16(int64_t M, int64_t K2, const uint32_t* a, int64_t ams, int64_t aks, const uint32_t* b, int64_t ldb,
               float* c, int64_t ldc) {
  static_assert(N % 16 == 0, "gemm_bf16: N must be a multiple of 16");
  constexpr int kVectors = N / 16;
  for (int v0 = 0; v0 < kVectors; v0 += 4) {
    const int nv = std::min(4, kVectors - v0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      micro_cols_bf16<4>(nv, K2, a + m * ams, ams, aks, b + v0 * 16, ldb, c + m * ldc + v0 * 16, ldc, false);
    switch (M - m) {
      case 1: micro_cols_bf16<1>(nv, K2, a + m * ams, ams, aks, b + v0 * 16, ldb, c + m * ldc + v0 * 16, ldc, false); break;
      case 2: micro_cols_bf16<2>(nv, K2, a + m * ams, ams, aks, b + v0 * 16, ldb, c + m * ldc + v0 * 16, ldc, false); break;
      case 3: micro_cols_bf16<3>(nv, K2, a + m * ams, ams, aks, b + v0 * 16, ldb, c + m * ldc + v0 * 16, ldc, false); break;
      default: break;
    }
  }
}
#else
template <typename T> constexpr bool kBf16Dot = false;
#endif

// A path switch from the environment: "0" off, "1" on, anything else (or unset) `otherwise`.
inline bool env_switch(const char* name, bool otherwise) {
  const char* env = std::getenv(name);
  return env && (env[0] == '0' || env[0] == '1') ? env[0] == '1' : otherwise;
}

// Whether bf16 inputs take the vdpbf16ps scores (true) or are widened into fp32 tiles like every
// other build's (false). Chosen per CPU, once per process: vdpbf16ps ran at 2x the fp32 FMA rate
// on Zen 4 but at half of it on the Intel Xeon (AMX) of the header, where the fp32 tiles ran bf16
// in 0.70-0.88x the time. AMD: dot products; others: fp32 tiles; PYLLM_ATTN_CPU_BF16_DOT=0/1
// overrides. Not timed at start-up: the two round differently, and a run must not pick one or
// the other by the noise of a measurement.
bool bf16_dot_enabled() {
#ifdef PYLLM_BF16_DOT
  static const bool enabled = [] {
    __builtin_cpu_init();
    return env_switch("PYLLM_ATTN_CPU_BF16_DOT", __builtin_cpu_is("amd"));
  }();
  return enabled;
#else
  return false;
#endif
}

// Whether the bf16 forward runs on AMX tiles (flash_attn_amx.cpp): where this build has that path
// and the CPU and kernel allow it (flash_attn_amx_usable); PYLLM_ATTN_CPU_AMX=0 turns it off (=1,
// the default, cannot force it where it is not usable). Once per process.
bool amx_enabled() {
  static const bool enabled = env_switch("PYLLM_ATTN_CPU_AMX", true) && flash_attn_amx_usable();
  return enabled;
}

// fn(std::bool_constant<Dot>) with this process's choice for bf16 (always false for other dtypes).
template <typename T, typename Fn>
void dispatch_bf16_dot(Fn&& fn) {
  if constexpr (kBf16Dot<T>) {
    if (bf16_dot_enabled()) return fn(std::true_type{});
  }
  fn(std::false_type{});
}

#ifdef PYLLM_AVX512
// 16 elements widened to fp32; unmasked, D being a multiple of 16.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

// One token's D values in the math type A, times mul (exact when mul = 1).
template <int D, typename T, typename A>
inline void row_to_acc(A* __restrict dst, const T* __restrict src, A mul) {
#ifdef PYLLM_AVX512
  if constexpr (std::is_same_v<A, float> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>)) {
    const __m512 m = _mm512_set1_ps(mul);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(load16(src + d), m));
    return;
  }
#endif
#pragma omp simd
  for (int d = 0; d < D; ++d) dst[d] = A(to_float(src[d])) * mul;
}

// `rows` tokens x D of one head packed into contiguous rows of D (times mul).
template <int D, typename T, typename A>
inline void pack_rows(A* __restrict dst, const void* base, const int64_t* strides, int64_t b, int64_t start,
                      int64_t h, int64_t rows, A mul) {
  for (int64_t r = 0; r < rows; ++r)
    row_to_acc<D>(dst + r * D, row_prefetching<D, T>(base, strides, b, start, h, r, rows), mul);
}

// `rows` tokens x D transposed into D rows of `ld` (times mul); columns rows..ld zero-filled, so
// that the padded lanes of a partial tile stay finite (they are masked or never read).
template <int D, typename T, typename A>
inline void pack_cols(A* __restrict dst, int64_t ld, const void* base, const int64_t* strides, int64_t b,
                      int64_t start, int64_t h, int64_t rows, A mul) {
  alignas(64) A row[D];
  for (int64_t r = 0; r < rows; ++r) {
    row_to_acc<D>(row, row_prefetching<D, T>(base, strides, b, start, h, r, rows), mul);
    for (int d = 0; d < D; ++d) dst[d * ld + r] = row[d];
  }
  if (rows < ld)
    for (int d = 0; d < D; ++d)
      for (int64_t r = rows; r < ld; ++r) dst[d * ld + r] = A(0);
}

// Query rows orientation (the backward): S[query r][key j], columns outside [lo, hi) -> -inf.
template <typename A>
inline void mask_row(A* __restrict srow, int64_t lo, int64_t hi) {
  const A ninf = neg_inf<A>();
#pragma omp simd
  for (int64_t j = 0; j < kBlockK; ++j) srow[j] = (j >= lo && j < hi) ? srow[j] : ninf;
}

// tanh on fp32 lanes: Cephes' odd polynomial (tanhf) below |x| = 0.625, where (1 - e) / (1 + e)
// would cancel, and (1 - e) / (1 + e), e = exp(-2|x|) (the softmax's exp, degree 6) above.
inline vec_f32 vtanh(vec_f32 x) {
  const vec_f32 ax = x < 0.f ? -x : x, z = x * x;
  const vec_f32 small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * x + x;
  const vec_f32 e = vsoftmax_exp<float>(-2.f * ax), big = (1.f - e) / (1.f + e);
  return ax < 0.625f ? small : (x < 0.f ? -big : big);
}

// Gemma 2's capped scores, s -> cap * tanh(s / cap), in place on n scaled scores (before the mask:
// a masked -inf stays the mask's). fp32: vtanh, 16 at a time; fp64: std::tanh (gradcheck's
// dtype, speed no matter). Forward + backward, B = 1, H = 8, D = 64, causal, 2 threads, 2-core Xeon
// VM, 2026-12-01: with a scalar tanhf capped fp32 took 4.7x the uncapped time at T = 2048 (299 vs
// 63 ms) and 3.4x at 512; with vtanh 1.14x (82 vs 72 ms) and 1.0x; torch's ops on the whole
// (B, H, T, T) scores (nn.attention's fallback) 964 ms. bf16 capped runs on these tiles, not AMX:
// 77 ms vs AMX's uncapped 30.
template <typename A>
inline void softcap_scores(A* __restrict s, int64_t n, A cap) {
  const A inv = A(1) / cap;
  int64_t tail = 0;  // where the scalar loop starts
  if constexpr (std::is_same_v<A, float>) {
    tail = n - n % kLanes;
    for (int64_t i = 0; i < tail; i += kLanes) vstore(s + i, cap * vtanh(vload(s + i) * inv));
  }
  for (int64_t i = tail; i < n; ++i) s[i] = cap * std::tanh(s[i] * inv);
}

// ALiBi (attn_params.h's alibi_distance): score += -slope * |distance|, after the scale and the cap,
// before the mask (a masked -inf stays -inf). One vector pass over the tile, against the 2 * D
// FMAs per score of the two matmuls around it. The distance is an exact integer in the math type
// (below 2^24 keys apart in fp32), so the forward and the backward add the same bias bit for bit.
template <typename A>
inline A alibi_slope(const AttnParams& p, int64_t b, int64_t h) {
  return p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_batch_stride + h]) : A(0);
}

template <typename A>
inline typename Vec<A>::type lane_offsets() {
  typename Vec<A>::type r;
  for (int l = 0; l < Vec<A>::lanes; ++l) r[l] = A(l);
  return r;
}

// Transposed tile (the forward: St[key j][query r], the first qv vectors of queries); d0: the
// distance of (the block's first query, its first key); query r and key j lie d0 + r - j apart.
template <typename A>
inline void alibi_transposed(A* __restrict st, int qv, int64_t nk, int64_t d0, A slope) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes;
  const V lanes = lane_offsets<A>(), neg_slope = V{} - slope, zero = V{};
  for (int64_t j = 0; j < nk; ++j)
    for (int v = 0; v < qv; ++v) {
      const V d = lanes + A(d0 - j + v * L), ad = d < zero ? -d : d;
      vstore(st + j * kBlockQ + v * L, vload(st + j * kBlockQ + v * L) + neg_slope * ad);
    }
}

// n scores of one query (n a multiple of the vector width), key j at distance d0 - j.
template <typename A>
inline void alibi_row(A* __restrict srow, int64_t n, int64_t d0, A slope) {
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes;
  const V lanes = lane_offsets<A>(), neg_slope = V{} - slope, zero = V{};
  for (int64_t j = 0; j < n; j += L) {
    const V d = A(d0 - j) - lanes, ad = d < zero ? -d : d;
    vstore(srow + j, vload(srow + j) + neg_slope * ad);
  }
}

// Dropout (attn_params.h, common/counter_rng.h): the forward zeroes the dropped probabilities after
// their row sums (the softmax's denominator is of every key) and scales the output by 1 / (1 - p)
// once at the end, as the backward does dV: the kept products stay unrounded by the scale (per
// element it had put fp32 dV at 1.01x twice torch's error at p = 0.6). dS needs the scale per
// element: dS = P (f dP - delta), f = 1 / (1 - p) or 0. A multiply, not a select, so that a NaN
// probability stays NaN as in torch's reference. ~9 integer ops per score (one mix32), the column
// hashes once per key; in lanes of the build's ISA (vpmulld).
// Transposed tile (the forward: St[key j][query r], n query lanes per key row).
template <typename A>
inline void dropout_transposed(A* __restrict st, int n, int64_t nk, const uint32_t* __restrict row_hash,
                               const AttnDropoutKey& key, int64_t j0, const AttnParams& p) {
  const uint32_t threshold = p.dropout_threshold;
  for (int64_t j = 0; j < nk; ++j) {
    const uint32_t col = key.col_hash(j0 + j);
    A* __restrict row = st + j * kBlockQ;
#pragma omp simd
    for (int r = 0; r < n; ++r) row[r] *= attn_dropout_bits(row_hash[r], col) >= threshold ? A(1) : A(0);
  }
}

// One query's row of n keys (the backward): the factor of each, kept / (1 - p) or 0.
template <typename A>
inline void dropout_factors(A* __restrict factor, int64_t n, uint32_t row_hash, const uint32_t* __restrict col_hash,
                            const AttnParams& p) {
  const uint32_t threshold = p.dropout_threshold;
  const A kept = A(p.dropout_scale);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) factor[j] = attn_dropout_bits(row_hash, col_hash[j]) >= threshold ? kept : A(0);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// St = K Qt for the first qv vectors of the block's queries only: a partial block (decode: one
// query) does not pay for the 64 columns of a full one.
template <int D, typename A>
inline void scores_transposed(int qv, int64_t nk, const A* kr, int64_t kld, const A* qt, A* st) {
  constexpr int L = Vec<A>::lanes;
  switch (qv) {
    case 1: gemm<L>(nk, D, kr, kld, 1, qt, kBlockQ, st, kBlockQ, false); break;
    case 2: gemm<2 * L>(nk, D, kr, kld, 1, qt, kBlockQ, st, kBlockQ, false); break;
    case 3: gemm<3 * L>(nk, D, kr, kld, 1, qt, kBlockQ, st, kBlockQ, false); break;
    default: gemm<kBlockQ>(nk, D, kr, kld, 1, qt, kBlockQ, st, kBlockQ, false); break;
  }
}

#ifdef PYLLM_BF16_DOT
template <int D>
inline void scores_transposed_bf16(int qv, int64_t nk, const uint32_t* kr, const uint32_t* qp, float* st) {
  switch (qv) {
    case 1: gemm_bf16<16>(nk, D / 2, kr, D / 2, 1, qp, kBlockQ, st, kBlockQ); break;
    case 2: gemm_bf16<32>(nk, D / 2, kr, D / 2, 1, qp, kBlockQ, st, kBlockQ); break;
    case 3: gemm_bf16<48>(nk, D / 2, kr, D / 2, 1, qp, kBlockQ, st, kBlockQ); break;
    default: gemm_bf16<kBlockQ>(nk, D / 2, kr, D / 2, 1, qp, kBlockQ, st, kBlockQ); break;
  }
}
#endif

template <int D, typename T, bool Dot = kBf16Dot<T>>
void fwd(const AttnParams& p) {
  using A = acc_t<T>;
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes, kQV = kBlockQ / L;  // vectors per row of St
  constexpr A kNegInf = neg_inf<A>();
  const V ninf = V{} + kNegInf, zero = V{};
  const int64_t qblocks = fwd_qblocks(p), items = p.batch * p.n_heads * qblocks;
  A* lse_out = static_cast<A*>(p.lse);
#pragma omp parallel if (items > 1)
  {
    constexpr bool dot = Dot;  // scores by vdpbf16ps from the bf16 values
    TileBuffer<A> qt(dot ? 0 : D * kBlockQ), st(kBlockK * kBlockQ), o(kBlockQ * D);
    TileBuffer<uint32_t> qp(dot ? D / 2 * kBlockQ : 0);
    static thread_local TileBuffer<uint32_t> k_seq16;  // K of the head in bf16 pairs, when dot
    // K and V of the (sequence, kv head) this thread last worked on, packed block by block as its
    // query blocks first need them: consecutive work items are mostly query blocks of one head,
    // so a key block is packed (and converted from bf16) once per thread instead of once per
    // query block. Kept across calls (2 * Tk * D * 4 bytes per thread); `packed` is per call.
    static thread_local TileBuffer<A> k_seq, v_seq;
    std::vector<char> packed;
    int64_t packed_b = -1, packed_hk = -1;
    alignas(64) A m[kBlockQ], l[kBlockQ], corr[kBlockQ];
    QueryBounds bounds;
    const bool drop = has_dropout(p);
    AttnDropoutKey drop_key;
    alignas(64) uint32_t row_hash[kBlockQ];  // dropout: of the block's queries
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const FwdItem it = fwd_item(p, item, qblocks);
      if (it.mq <= 0) continue;
      const int64_t b = it.b, h = it.h, hk = it.hk, i0 = it.i0, mq = it.mq;
      const SeqInfo& s = it.s;
      const int qv = int((mq + L - 1) / L);  // vectors of St that hold real queries; the rest is padding
      if (b != packed_b || hk != packed_hk) {
        packed_b = b, packed_hk = hk;
        if (v_seq.size() < size_t(s.len_k * D)) {
          grow_to(v_seq, s.len_k * D);
          if (dot) grow_to(k_seq16, s.len_k * D / 2);
          else grow_to(k_seq, s.len_k * D);
        }
        packed.assign((s.len_k + kBlockK - 1) / kBlockK, 0);
      }
      if constexpr (dot) pack_pairs_transposed<D>(qp.data(), kBlockQ, p.q, p.q_strides, b, s.q_start + i0, h, mq);
      else pack_cols<D, T>(qt.data(), kBlockQ, p.q, p.q_strides, b, s.q_start + i0, h, mq, A(p.scale));
      bounds.set(p, s, i0, mq);
      if (drop) {
        drop_key = AttnDropoutKey(p.dropout_seed, b, h);
        for (int r = 0; r < kBlockQ; ++r) row_hash[r] = drop_key.row_hash(i0 + r);
      }
      std::fill(o.begin(), o.end(), A(0));
      std::fill(m, m + kBlockQ, kNegInf);
      std::fill(l, l + kBlockQ, A(0));
      const KeyBlocks kbs = key_blocks(p, s, i0, mq);
      for (int64_t kblk = kbs.first; kblk < kbs.end; ++kblk) {
        const int64_t j0 = kblk * kBlockK, nk = std::min(kBlockK, s.len_k - j0);
        // A block of at most one vector of queries (decode: one) reads each K / V row once, so
        // fp32 rows are read in place: packing would only add a copy (fp32 decode, B = 1, H = 8,
        // D = 64, cache 2048: 0.73 -> 0.45 ms; SDPA 0.26, still ahead: the 16-column scores).
        const bool in_place = std::is_same_v<T, A> && qv == 1;
        const A* kr = dot ? nullptr : k_seq.data() + j0 * D;  // dot: k_seq16 instead
        const A* vr = v_seq.data() + j0 * D;
        int64_t kld = D, vld = D;
        if constexpr (std::is_same_v<T, A>) {
          if (in_place) {
            kr = at<T>(p.k, p.k_strides, b, s.k_start + j0, hk), kld = p.k_strides[1];
            vr = at<T>(p.v, p.v_strides, b, s.k_start + j0, hk), vld = p.v_strides[1];
          }
        }
        if (!in_place && !packed[kblk]) {
          if constexpr (dot) pack_rows_bf16<D>(k_seq16.data() + j0 * D / 2, p.k, p.k_strides, b, s.k_start + j0, hk, nk);
          else pack_rows<D, T>(k_seq.data() + j0 * D, p.k, p.k_strides, b, s.k_start + j0, hk, nk, A(1));
          pack_rows<D, T>(v_seq.data() + j0 * D, p.v, p.v_strides, b, s.k_start + j0, hk, nk, A(1));
          packed[kblk] = 1;
        }
        A* __restrict S = st.data();
        if constexpr (dot) {
#ifdef PYLLM_BF16_DOT
          scores_transposed_bf16<D>(qv, nk, k_seq16.data() + j0 * D / 2, qp.data(), S);  // St = K Q^T
          const V scale = V{} + A(p.scale);
          for (int64_t j = 0; j < nk; ++j)
            for (int v = 0; v < qv; ++v) vstore(S + j * kBlockQ + v * L, vload(S + j * kBlockQ + v * L) * scale);
#endif
        } else {
          scores_transposed<D>(qv, nk, kr, kld, qt.data(), S);  // St = K (scale Q)^T
        }
        if (p.softcap > 0) softcap_scores(S, nk * kBlockQ, A(p.softcap));
        if (p.alibi_slopes) alibi_transposed(S, qv, nk, alibi_distance(i0, j0, s.len_q, s.len_k), alibi_slope<A>(p, b, h));
        if (!block_unmasked(p, s, i0, mq, j0)) mask_transposed(S, nk, j0, bounds);
        // Online softmax down the columns. The max skips NaN (it must not poison the running max of
        // the other queries), and a query that has seen only masked keys keeps m = -inf; exp is then
        // taken against 0 so that NaN scores still come out as NaN, and masked (-inf) ones as 0.
        V m_use[kQV], sum[kQV];
        for (int v = 0; v < qv; ++v) {
          // Four running maxima: one was a chain of nk dependent vmaxps, ~12% of the fp32 forward
          // outside its matmuls (perf, D = 64); max is exact, so the order changes no bit.
          const A* col = S + v * L;
          V b0 = ninf, b1 = ninf, b2 = ninf, b3 = ninf;
          int64_t j = 0;
          for (; j + 4 <= nk; j += 4) {
            const V x0 = vload(col + j * kBlockQ), x1 = vload(col + (j + 1) * kBlockQ);
            const V x2 = vload(col + (j + 2) * kBlockQ), x3 = vload(col + (j + 3) * kBlockQ);
            b0 = x0 > b0 ? x0 : b0, b1 = x1 > b1 ? x1 : b1, b2 = x2 > b2 ? x2 : b2, b3 = x3 > b3 ? x3 : b3;
          }
          for (; j < nk; ++j) {
            const V x = vload(col + j * kBlockQ);
            b0 = x > b0 ? x : b0;
          }
          b0 = b1 > b0 ? b1 : b0, b2 = b3 > b2 ? b3 : b2;
          const V blk = b2 > b0 ? b2 : b0;
          const V m_old = vload(m + v * L), m_new = m_old < blk ? blk : m_old;
          m_use[v] = m_new == ninf ? zero : m_new;
          vstore(corr + v * L, vsoftmax_exp<T>(m_old - m_use[v]));  // m_old = -inf: 0
          vstore(m + v * L, m_new);
          sum[v] = zero;
        }
        for (int64_t j = 0; j < nk; ++j) {
          A* __restrict row = S + j * kBlockQ;
#pragma GCC unroll 8
          for (int v = 0; v < qv; ++v) {
            const V pj = vsoftmax_exp<T>(vload(row + v * L) - m_use[v]);
            vstore(row + v * L, pj);
            sum[v] += pj;
          }
        }
        for (int v = 0; v < qv; ++v) vstore(l + v * L, vload(l + v * L) * vload(corr + v * L) + sum[v]);
        if (drop) dropout_transposed(S, qv * L, nk, row_hash, drop_key, j0, p);
        for (int64_t r = 0; r < mq; ++r) {
          if (corr[r] != A(1)) {
            A* __restrict orow = o.data() + r * D;
            const A c = corr[r];
#pragma omp simd
            for (int d = 0; d < D; ++d) orow[d] *= c;
          }
        }
        gemm<D>(mq, nk, S, 1, kBlockQ, vr, vld, o.data(), D, true);  // O += P V
      }
      for (int64_t r = 0; r < mq; ++r) {
        T* __restrict dst = at_mut<T>(p.out, p.o_strides, b, s.q_start + i0 + r, h);
        const A* __restrict orow = o.data() + r * D;
        const bool empty = l[r] == A(0);  // sees no key; NaN inputs give l = NaN and stay NaN
        const A inv = empty ? A(0) : (drop ? A(p.dropout_scale) : A(1)) / l[r];
#pragma omp simd
        for (int d = 0; d < D; ++d) dst[d] = from_acc<T>(orow[d] * inv);
        lse_out[lse_index(p, b, h, s, i0 + r)] = empty ? std::numeric_limits<A>::infinity() : m[r] + std::log(l[r]);
      }
    }
    release_if_large(k_seq, v_seq, k_seq16);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode: fp32 math on fp32 or bf16 caches, a few queries per head (Tq <= kDecodeMaxQueries)
// ---------------------------------------------------------------------------------------------
// The tiled forward computes a block's scores as a 16-column matmul even for one query, 16x the
// useful FMAs (fp32 decode ran at 0.4-0.7x SDPA), and packs each head's K / V before using it
// once. Here one work item is (sequence b, split of its keys), covering every kv head: it streams
// the split's K rows in place (contiguous along D; bf16 widened in registers), dots each with all
// R = group * Tq query rows of that kv head (16-wide FMAs over D, one horizontal sum per row and
// key), runs the online softmax per row over chunks of kDecodeChunk keys, and adds P V with the V
// rows read in place. Each K and V element is read once per call: the floor is
// 2 * B * Tk * Hkv * D * sizeof(T) bytes at the machine's read bandwidth. Splits give work to
// every thread when B is small; their partial (m, l, O) are combined in split order, and the
// split count depends on the shape only, so results are bitwise repeatable for any thread count.
// A chunk of tokens is read for all heads before the next, so the cache is walked in memory order.
// Measured (2026-11-23, the shared 2-core AMD VM, preliminary; launcher called directly, same
// process, best of 3 medians; H = 8, B = 1, one token; this path / the tiled path / torch SDPA):
//   2 threads: cache 512 D = 64: 36 / 61 / 44 us; 512 D = 128: 51 / 115 / 78 us;
//              4096 D = 64: 0.26 / 0.74 / 0.67 ms; 4096 D = 128: 1.23 / 1.98 / 2.32 ms;
//              4096 D = 128 GQA Hkv = 2: 0.20 / 0.91 / 0.52 ms
//   1 thread:  512 D = 64: 51 / 117 / 77 us; 4096 D = 128: 2.64 / 4.35 / 3.74 ms
// Floor at 4096 D = 128 MHA: 33.5 MB at ~28 GB/s (bench/common.py copy_bandwidth_gbs) = 1.2 ms;
// 1.23 ms is there.
// kDecodeMaxQueries (2026-11-30, 2-core Intel Xeon VM under load, 1 thread, D = 128, cache 512 /
// 4096, this path / the tiled path, fp32; bf16 alike): Tq = 1: MHA 0.27 / 0.48, 1.8 / 4.8 ms;
// group 8 0.07 / 0.29, 0.43 / 2.7 ms; group 32 0.18 / 1.15, 1.2 / 23 ms. Tq = 4: MHA 0.36 / 0.51,
// 2.4 / 11 ms; group 8 0.16 / 0.32, 1.2 / 6.9 ms. Tq = 8: MHA 0.50 / 0.55, 3.8 / 4.7 ms; group 8
// 0.29 / 0.36, 4.6 / 7.3 ms. Tq = 16: MHA 0.90 / 0.71, 7.3 / 5.3 ms; group 8 0.67 / 0.41,
// 6.5 / 3.8 ms: from 16 queries a block's matmuls pay. Until then the group size does not matter
// (it was capped at group * Tq <= 8 rows before, which sent MQA decode with 16+ heads to the
// tiled path at 5-20x the time).
constexpr int64_t kDecodeMaxQueries = 8;
// Work items wanted (B * Hkv * splits) and the fewest keys a split gets (fork/join and the combine
// cost more than they save on shorter splits). Not yet measured: chosen for 2-16 threads.
constexpr int64_t kDecodeMinItems = 16;
constexpr int64_t kDecodeMinSplitKeys = 256;
// Keys per online-softmax step: one AVX-512 vector of scores, kChunkVecs vectors on narrower ISAs.
// Fewer keys per step rescale O and l more often, each a rounding: chunks of 4 (SSE's width) took
// the fp32 softcapped decode past twice torch's error.
constexpr int64_t kDecodeChunk = 16;
constexpr int kChunkVecs = int(kDecodeChunk) / kLanes;
// K / V rows are H * D elements apart, a stride the hardware prefetcher did not follow here (see
// kPrefetchRows): each row asks for the one this many keys ahead.
constexpr int64_t kDecodePrefetch = 32;

inline float hsum(vec_f32 x) {
#ifdef PYLLM_AVX512
  return _mm512_reduce_add_ps((__m512)x);
#else
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += x[l];
  return s;
#endif
}

// KV-cache calls only (seqused_k set): they are not differentiated. The tiled backward recomputes P
// from the LSE with its own summation order over D, which matches the tiled forward's bit for bit
// (a test compares gradients of a 2-key problem at zero tolerance); this path sums differently.
// PYLLM_ATTN_CPU_DECODE=0 turns it off (same-process A/B against the tiled path).
inline bool decode_path(const AttnParams& p) {
  static const bool enabled = env_switch("PYLLM_ATTN_CPU_DECODE", true);
  return enabled && (p.dtype == int(DType::f32) || p.dtype == int(DType::bf16)) && p.seqused_k &&
         !p.cu_seqlens_q && !p.cu_seqlens_k && p.seqlen_q <= kDecodeMaxQueries;
}

// kLanes cache elements as fp32 lanes (bf16 widened exactly).
inline vec_f32 vload_f32(const float* p) { return vload(p); }
inline vec_f32 vload_f32(const bf16* p) {
#ifdef PYLLM_AVX512
  return (vec_f32)load16(p);
#else
  // bf16 bits widened to 32 and shifted up: vpmovzxwd + vpslld on AVX2 (a lane-by-lane loop
  // made bf16 decode 5x the fp32 time there: 1.08 vs 0.20 ms, one query, cache 2,048, D = 64)
  typedef uint16_t half_bits __attribute__((vector_size(kVecBytes / 2), aligned(2)));
  typedef uint32_t bits __attribute__((vector_size(kVecBytes), aligned(4)));
  half_bits h;
  std::memcpy(&h, p, sizeof h);
  const bits w = __builtin_convertvector(h, bits) << 16;
  vec_f32 r;
  std::memcpy(&r, &w, sizeof r);
  return r;
#endif
}

template <int D, typename T>
void decode(const AttnParams& p) {
  using V = vec_f32;
  constexpr int L = kLanes, C = D / L;  // vectors per row
  constexpr int kDotAcc = 16 / L;  // D >= 32: C >= kDotAcc
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const V ninf = V{} - kInf, zero = V{};
  // Gemma 2's cap on the scaled scores, a chunk (one vector) at a time before its softmax step;
  // the masked keys' -inf kept. One query over a cache of 512, D = 64, 2-core EPYC VM, 2026-12-01
  // (bench_attention.py --decode-only --softcap 50): capped on the tiled forward, as before, fp32
  // 0.16 ms, 0.66x torch's eager capped ops; here 0.076 ms (2.0x), bf16 0.052 ms (6.5x; 0.048
  // uncapped).
  const float cap = float(p.softcap), inv_cap = cap > 0 ? 1.f / cap : 0.f;
  // Rows of a sequence: x = hk * R + g * Tq + i is query i of head hk * group + g.
  const int64_t group = p.n_heads / p.n_kv_heads, R = group * p.seqlen_q, rows = p.n_kv_heads * R;
  int64_t splits = std::max<int64_t>(1, (kDecodeMinItems + p.batch - 1) / p.batch);
  splits = std::max<int64_t>(1, std::min(splits, p.seqlen_k / kDecodeMinSplitKeys));
  const int64_t items = p.batch * splits, part_row = D + 2;
  std::vector<float> part(splits > 1 ? items * rows * part_row : 0);
  float* lse_out = static_cast<float*>(p.lse);
  auto head_of = [&](int64_t x) { return x / R * group + (x % R) / p.seqlen_q; };
#pragma omp parallel if (items > 1)
  {
    TileBuffer<float> qs(rows * D), o(rows * D), sc(rows * kDecodeChunk), m(rows), l(rows);
    std::vector<int64_t> lo(rows), hi(rows);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / splits, sp = item % splits;
      const SeqInfo s = seq_info(p, b);
      // Keys that some query sees (the bounds are monotone in the query), then this split's share.
      const int64_t all_lo = s.len_q ? key_lo(p, 0, s.len_q, s.len_k) : 0;
      const int64_t all_hi = s.len_q ? key_hi(p, s.len_q - 1, s.len_q, s.len_k) : 0;
      int64_t span = all_hi > all_lo ? (all_hi - all_lo + splits - 1) / splits : 0;
      if (p.block_table) span = (span + kDecodeChunk - 1) / kDecodeChunk * kDecodeChunk;  // splits on chunk edges
      const int64_t k0 = std::min(all_hi, all_lo + sp * span), k1 = std::max(k0, std::min(all_hi, k0 + span));
      for (int64_t x = 0; x < rows; ++x) {
        const int64_t i = x % p.seqlen_q;
        m[x] = -kInf, l[x] = 0.f;
        std::fill(o.data() + x * D, o.data() + (x + 1) * D, 0.f);
        if (i < s.len_q) {
          lo[x] = std::max(k0, key_lo(p, i, s.len_q, s.len_k)), hi[x] = std::min(k1, key_hi(p, i, s.len_q, s.len_k));
          row_to_acc<D>(qs.data() + x * D, at<T>(p.q, p.q_strides, b, s.q_start + i, head_of(x)), float(p.scale));
        } else {
          lo[x] = hi[x] = 0;
          std::fill(qs.data() + x * D, qs.data() + (x + 1) * D, 0.f);
        }
      }
      // Chunk by chunk, all kv heads of a token range: the reads walk the cache in memory order.
      for (int64_t j0 = k0, nk = 0; j0 < k1; j0 += nk) {
        nk = std::min(kDecodeChunk, k1 - j0);
        // A paged cache's chunk ends with its block, so that its rows are one stride apart, and
        // chunks start at multiples of kDecodeChunk cache positions: with blocks of a multiple of it
        // (vLLM's 16), full chunks. Cut at the blocks' edges instead, a split of blocks of 16 ran
        // twice the contiguous cache's time in half-empty chunks (2-core EPYC, 2026-12-03).
        if (p.block_table) {
          const int64_t pos = s.k_start + j0;
          nk = std::min({nk, kDecodeChunk - pos % kDecodeChunk, p.page_size - pos % p.page_size});
        }
        for (int64_t hk = 0; hk < p.n_kv_heads; ++hk) {
          const int64_t x0 = hk * R;
          // The chunk's rows are one stride apart (a paged chunk lies in one block); the rows
          // kDecodePrefetch ahead may lie in another block, looked up only for a paged cache.
          const T* __restrict kchunk = kv_row<T>(p, p.k, p.k_strides, b, s.k_start + j0, hk);
          const int64_t kld = p.k_strides[1];
          for (int64_t j = 0; j < kDecodeChunk; ++j) {
            if (j >= nk) {
              for (int64_t r = 0; r < R; ++r) sc[(x0 + r) * kDecodeChunk + j] = -kInf;
              continue;
            }
            const T* __restrict krow = kchunk + j * kld;
            if (j0 + j + kDecodePrefetch < k1)
              prefetch_row<D>(p.block_table ? kv_row<T>(p, p.k, p.k_strides, b, s.k_start + j0 + j + kDecodePrefetch, hk)
                                            : krow + kDecodePrefetch * kld);
            V kv[C];
            for (int c = 0; c < C; ++c) kv[c] = vload_f32(krow + c * L);
            const int64_t key = j0 + j;
            for (int64_t r = 0; r < R; ++r) {
              const float* __restrict qr = qs.data() + (x0 + r) * D;
              // 16 partial sums whatever the width (kDotAcc vectors of them): summed down one
              // 4-lane vector, D = 64's products took the fp32 softcapped decode past twice
              // torch's error.
              V acc[kDotAcc];
              for (int a = 0; a < kDotAcc; ++a) acc[a] = vload(qr + a * L) * kv[a];
              for (int c = kDotAcc; c < C; ++c) acc[c % kDotAcc] += vload(qr + c * L) * kv[c];
              for (int w = kDotAcc / 2; w > 0; w /= 2)
                for (int a = 0; a < w; ++a) acc[a] += acc[a + w];
              sc[(x0 + r) * kDecodeChunk + j] = (key >= lo[x0 + r] && key < hi[x0 + r]) ? hsum(acc[0]) : -kInf;
            }
          }
          // Online softmax per row, as the tiled forward: the max skips NaN, a row that has seen
          // only masked keys keeps m = -inf and exp is taken against 0 so that NaN scores stay NaN.
          for (int64_t x = x0; x < x0 + R; ++x) {
            float* __restrict sx = sc.data() + x * kDecodeChunk;
            if (cap > 0) {
              for (int c = 0; c < kChunkVecs; ++c) {
                const V raw = vload(sx + c * L);
                vstore(sx + c * L, raw == ninf ? ninf : cap * vtanh(raw * inv_cap));
              }
            }
            if (p.alibi_slopes)
              alibi_row(sx, kDecodeChunk, alibi_distance(x % p.seqlen_q, j0, s.len_q, s.len_k),
                        alibi_slope<float>(p, b, head_of(x)));
            float blk = -kInf;
            for (int j = 0; j < kDecodeChunk; ++j) blk = sx[j] > blk ? sx[j] : blk;
            const float m_old = m[x], m_new = m_old < blk ? blk : m_old;
            const float m_use = m_new == -kInf ? 0.f : m_new;
            V psum = zero;
            for (int c = 0; c < kChunkVecs; ++c) {
              const V sv = vload(sx + c * L);
              const V pj = sv == ninf ? zero : vexp<float>(sv - m_use);
              vstore(sx + c * L, pj);
              psum += pj;
            }
            float corr = 0.f;
            if (m_old != -kInf) {
              V e = zero;
              e[0] = m_old - m_use;
              corr = vexp<float>(e)[0];
            }
            m[x] = m_new;
            l[x] = l[x] * corr + hsum(psum);
            if (corr != 1.f) {
              float* __restrict ox = o.data() + x * D;
              for (int c = 0; c < C; ++c) vstore(ox + c * L, vload(ox + c * L) * corr);
            }
          }
          // O += P V with each row's O in registers over the chunk (through memory, every key
          // waited on the previous key's store); rows after the first re-read V from L1.
          const T* __restrict vrow0 = kv_row<T>(p, p.v, p.v_strides, b, s.k_start + j0, hk);
          const int64_t vld = p.v_strides[1];
          for (int64_t j = 0; j < nk; ++j)
            if (j0 + j + kDecodePrefetch < k1)
              prefetch_row<D>(p.block_table ? kv_row<T>(p, p.v, p.v_strides, b, s.k_start + j0 + j + kDecodePrefetch, hk)
                                            : vrow0 + (j + kDecodePrefetch) * vld);
          for (int64_t x = x0; x < x0 + R; ++x) {
            float* __restrict ox = o.data() + x * D;
            const float* __restrict px = sc.data() + x * kDecodeChunk;
            V acc[C];
            for (int c = 0; c < C; ++c) acc[c] = vload(ox + c * L);
            for (int64_t j = 0; j < nk; ++j) {
              const V pj = V{} + px[j];
              for (int c = 0; c < C; ++c) acc[c] += pj * vload_f32(vrow0 + j * vld + c * L);
            }
            for (int c = 0; c < C; ++c) vstore(ox + c * L, acc[c]);
          }
        }
      }
      for (int64_t x = 0; x < rows; ++x) {
        const int64_t i = x % p.seqlen_q, h = head_of(x);
        if (i >= s.len_q) continue;
        const float* ox = o.data() + x * D;
        if (splits > 1) {
          float* dst = part.data() + (item * rows + x) * part_row;
          std::copy(ox, ox + D, dst);
          dst[D] = m[x], dst[D + 1] = l[x];
          continue;
        }
        T* __restrict dst = at_mut<T>(p.out, p.o_strides, b, s.q_start + i, h);
        const bool empty = l[x] == 0.f;  // sees no key; NaN inputs give l = NaN and stay NaN
        const float inv = empty ? 0.f : 1.f / l[x];
        for (int d = 0; d < D; ++d) dst[d] = from_float<T>(ox[d] * inv);
        lse_out[lse_index(p, b, h, s, i)] = empty ? kInf : m[x] + std::log(l[x]);
      }
    }
  }
  if (splits == 1) return;
  // Combine each row's splits, in split order.
  const int64_t all_rows = p.batch * rows;
#pragma omp parallel for if (all_rows > 1)
  for (int64_t row = 0; row < all_rows; ++row) {
    const int64_t b = row / rows, x = row % rows, i = x % p.seqlen_q, h = head_of(x);
    const SeqInfo s = seq_info(p, b);
    if (i >= s.len_q) continue;
    auto partial = [&](int64_t sp) { return part.data() + ((b * splits + sp) * rows + x) * part_row; };
    float mx = -kInf;
    for (int64_t sp = 0; sp < splits; ++sp) mx = mx < partial(sp)[D] ? partial(sp)[D] : mx;
    const float m_use = mx == -kInf ? 0.f : mx;
    alignas(64) float acc[D] = {};
    float lsum = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) {
      const float* src = partial(sp);
      // A split that saw no key (l = 0, O = 0) adds nothing; one of NaN scores also has m = -inf (the
      // max skips NaN) but l = NaN, which must reach the row (w = 0, 0 * NaN = NaN), as one split's does.
      if (src[D + 1] == 0.f) continue;
      const float w = std::exp(src[D] - m_use);
      lsum += src[D + 1] * w;
      for (int d = 0; d < D; ++d) acc[d] += src[d] * w;
    }
    T* __restrict dst = at_mut<T>(p.out, p.o_strides, b, s.q_start + i, h);
    const bool empty = lsum == 0.f;
    const float inv = empty ? 0.f : 1.f / lsum;
    for (int d = 0; d < D; ++d) dst[d] = from_float<T>(acc[d] * inv);
    lse_out[lse_index(p, b, h, s, i)] = empty ? kInf : m_use + std::log(lsum);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <int D, typename T, bool Dot = kBf16Dot<T>>
void bwd(const AttnParams& p) {
  using A = acc_t<T>;
  using V = typename Vec<A>::type;
  constexpr int L = Vec<A>::lanes, kKV = kBlockK / L;  // vectors per row of S
  const int64_t group = p.n_heads / p.n_kv_heads;
  const A* lse = static_cast<const A*>(p.lse);
  const A* dlse = static_cast<const A*>(p.dlse);
  const A scale = A(p.scale), cap = A(p.softcap);
  const int64_t chunks = bwd_chunks(p), items = p.batch * p.n_kv_heads * chunks;
  DkvParts<A> parts(p, chunks, D);
#pragma omp parallel if (items > 1)
  {
    TileBuffer<A> kr(kBlockK * D), kt(D * kBlockK), vt(D * kBlockK), sc(kBlockQ * kBlockK), dp(kBlockQ * kBlockK),
        dk(kBlockK * D), dv(kBlockK * D);
    // The group's q, dout and dq (fp32 accumulators) for the item's queries, plus lse and delta:
    // kept per thread across calls, so the timed path does not fault in fresh pages each step.
    static thread_local TileBuffer<A> q_all, do_all, dq_all, lse_all, delta_all;
    // bf16 inputs with vdpbf16ps: q and dout also as bf16 rows, K^T and V^T as bf16 pairs, for S and dP.
    constexpr bool dot = Dot;
    static thread_local TileBuffer<uint32_t> q16_all, do16_all;
    TileBuffer<uint32_t> ktp(dot ? D / 2 * kBlockK : 0), vtp(dot ? D / 2 * kBlockK : 0);
    const bool drop = has_dropout(p);
    AttnDropoutKey drop_key;
    alignas(64) uint32_t col_hash[kBlockK];  // dropout: of the key block's keys, for one query head
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const BwdItem it = bwd_item(p, item, chunks);
      const int64_t b = it.b, hk = it.hk, c = it.c, qa = it.qa, qz = it.qz;
      const SeqInfo& s = it.s;
      const int64_t len_q = s.len_q, len_k = s.len_k;
      const int64_t n_rows = qz - qa, rows = group * n_rows;
      if (size_t(rows * D) > q_all.size()) {
        grow_to(q_all, rows * D), grow_to(do_all, rows * D), grow_to(dq_all, rows * D);
        grow_to(lse_all, rows), grow_to(delta_all, rows);
        if (dot) grow_to(q16_all, rows * D / 2), grow_to(do16_all, rows * D / 2);
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        // scale * Q, as the forward packs it: S = (scale q) . k then has the forward's products and
        // summation order bit for bit (q . (scale k) rounded differently unless scale is a power of
        // 2), so a query with one key gets P = 1 exactly; dK = dS^T (scale Q) needs no scale after.
        pack_rows<D, T>(q_all.data() + g * n_rows * D, p.q, p.q_strides, b, s.q_start + qa, h, n_rows, scale);
        pack_rows<D, T>(do_all.data() + g * n_rows * D, p.dout, p.o_strides, b, s.q_start + qa, h, n_rows, A(1));
        if constexpr (dot) {
          pack_rows_bf16<D>(q16_all.data() + g * n_rows * D / 2, p.q, p.q_strides, b, s.q_start + qa, h, n_rows);
          pack_rows_bf16<D>(do16_all.data() + g * n_rows * D / 2, p.dout, p.o_strides, b, s.q_start + qa, h, n_rows);
        }
        for (int64_t i = qa; i < qz; ++i) {
          const T* __restrict o = at<T>(p.out, p.o_strides, b, s.q_start + i, h);
          const A* __restrict g_row = do_all.data() + (g * n_rows + i - qa) * D;
          A dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int d = 0; d < D; ++d) dot += A(to_float(o[d])) * g_row[d];
          const int64_t idx = lse_index(p, b, h, s, i);
          lse_all[g * n_rows + i - qa] = lse[idx];
          delta_all[g * n_rows + i - qa] = dot - (dlse ? dlse[idx] : A(0));
        }
      }
      std::fill(dq_all.begin(), dq_all.begin() + rows * D, A(0));
      for (int64_t j0 = 0; j0 < len_k; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, len_k - j0);
        std::fill(dk.begin(), dk.end(), A(0));
        std::fill(dv.begin(), dv.end(), A(0));
        const int64_t q_lo = std::max(qa, query_lo(p, j0, len_q, len_k));
        const int64_t q_hi = std::min(qz, query_hi(p, j0 + nk - 1, len_q, len_k));
        if (q_lo < q_hi) {
          pack_rows<D, T>(kr.data(), p.k, p.k_strides, b, s.k_start + j0, hk, nk, A(1));
          if constexpr (dot) {
            pack_pairs_transposed<D>(ktp.data(), kBlockK, p.k, p.k_strides, b, s.k_start + j0, hk, nk);
            pack_pairs_transposed<D>(vtp.data(), kBlockK, p.v, p.v_strides, b, s.k_start + j0, hk, nk);
          } else {
            pack_cols<D, T>(kt.data(), kBlockK, p.k, p.k_strides, b, s.k_start + j0, hk, nk, A(1));
            pack_cols<D, T>(vt.data(), kBlockK, p.v, p.v_strides, b, s.k_start + j0, hk, nk, A(1));
          }
        }
        for (int64_t g = 0; g < group && q_lo < q_hi; ++g) {
          const A slope = alibi_slope<A>(p, b, hk * group + g);
          if (drop) {
            drop_key = AttnDropoutKey(p.dropout_seed, b, hk * group + g);
            for (int64_t j = 0; j < kBlockK; ++j) col_hash[j] = drop_key.col_hash(j0 + j);
          }
          for (int64_t i0 = (q_lo / kBlockQ) * kBlockQ; i0 < q_hi; i0 += kBlockQ) {  // qa is a multiple of kBlockQ
            const int64_t mq = std::min(kBlockQ, qz - i0), row0 = g * n_rows + i0 - qa;
            const A* qi = q_all.data() + row0 * D;
            const A* doi = do_all.data() + row0 * D;
            if constexpr (dot) {
#ifdef PYLLM_BF16_DOT
              const uint32_t* q16 = q16_all.data() + row0 * D / 2;
              const uint32_t* do16 = do16_all.data() + row0 * D / 2;
              gemm_bf16<kBlockK>(mq, D / 2, q16, D / 2, 1, ktp.data(), kBlockK, sc.data(), kBlockK);   // S = Q K^T
              gemm_bf16<kBlockK>(mq, D / 2, do16, D / 2, 1, vtp.data(), kBlockK, dp.data(), kBlockK);  // dP = dO V^T
#endif
            } else {
              gemm<kBlockK>(mq, D, qi, D, 1, kt.data(), kBlockK, sc.data(), kBlockK, false);   // S = (scale Q) K^T
              gemm<kBlockK>(mq, D, doi, D, 1, vt.data(), kBlockK, dp.data(), kBlockK, false);  // dP = dO V^T
            }
            const bool unmasked = block_unmasked(p, s, i0, mq, j0);
            for (int64_t r = 0; r < mq; ++r) {
              A* __restrict srow = sc.data() + r * kBlockK;
              A* __restrict dprow = dp.data() + r * kBlockK;
              if constexpr (dot)
                for (int v = 0; v < kKV; ++v) vstore(srow + v * L, vload(srow + v * L) * scale);
              if (cap > 0) softcap_scores(srow, kBlockK, cap);
              // Capped and ALiBi-biased: the cap's derivative is of the capped score before the bias.
              alignas(64) A capped[kBlockK];
              if (p.alibi_slopes) {
                if (cap > 0) std::copy(srow, srow + kBlockK, capped);
                alibi_row(srow, kBlockK, alibi_distance(i0 + r, j0, len_q, len_k), slope);
              }
              if (!unmasked) mask_row(srow, key_lo(p, i0 + r, len_q, len_k) - j0, key_hi(p, i0 + r, len_q, len_k) - j0);
              const A lse_r = lse_all[row0 + r], delta_r = delta_all[row0 + r];
              // Dropout: dS = P (f dP - delta) with f = 1 / (1 - p) or 0 (delta = dO . O is of the dropped
              // output: sum_j P f dP), so dP is scaled first; dV's P is zeroed where dropped after (and dV
              // scaled once at the end).
              alignas(64) A factor[kBlockK];
              if (drop) {
                dropout_factors(factor, kBlockK, drop_key.row_hash(i0 + r), col_hash, p);
                for (int v = 0; v < kKV; ++v) vstore(dprow + v * L, vload(dprow + v * L) * vload(factor + v * L));
              }
              if (cap > 0) {
                // Through the cap: d(cap tanh(s / cap)) / ds = 1 - (s' / cap)^2 of the capped s'; the
                // square clamped at 1 so that a masked s' = -inf gives 0, not 0 * -inf.
                const V inv_cap = V{} + A(1) / cap, one = V{} + A(1);
                const A* sc_src = p.alibi_slopes ? capped : srow;
                for (int v = 0; v < kKV; ++v) {
                  const V sv = vload(srow + v * L), t = vload(sc_src + v * L) * inv_cap, t2 = t * t;
                  const V pj = vsoftmax_exp<T>(sv - lse_r);
                  vstore(srow + v * L, pj);
                  vstore(dprow + v * L, pj * (vload(dprow + v * L) - delta_r) * (one - (t2 < one ? t2 : one)));
                }
              } else {
#pragma GCC unroll 8
                for (int v = 0; v < kKV; ++v) {
                  const V pj = vsoftmax_exp<T>(vload(srow + v * L) - lse_r);
                  vstore(srow + v * L, pj);
                  vstore(dprow + v * L, pj * (vload(dprow + v * L) - delta_r));  // dS
                }
              }
              if (drop) {
                const V zero = V{};
                for (int v = 0; v < kKV; ++v)
                  vstore(srow + v * L, vload(factor + v * L) == zero ? zero : vload(srow + v * L));
              }
            }
            gemm<D>(nk, mq, sc.data(), 1, kBlockK, doi, D, dv.data(), D, true);                    // dV += P^T dO
            gemm<D>(nk, mq, dp.data(), 1, kBlockK, qi, D, dk.data(), D, true);                     // dK += dS^T (scale Q)
            gemm<D>(mq, nk, dp.data(), kBlockK, 1, kr.data(), D, dq_all.data() + row0 * D, D, true);  // dQ += dS K
          }
        }
        if (drop)  // dV = (1 / (1 - p)) sum over the kept P dO
          for (auto& x : dv) x *= A(p.dropout_scale);
        for (int64_t r = 0; r < nk; ++r) {
          if (chunks > 1) {
            A* __restrict part = parts.template row<D>(c, hk, b, s, j0 + r);
            std::copy(dk.begin() + r * D, dk.begin() + (r + 1) * D, part);
            std::copy(dv.begin() + r * D, dv.begin() + (r + 1) * D, part + D);
            continue;
          }
          T* __restrict dk_dst = at_mut<T>(p.dk, p.dkv_strides, b, s.k_start + j0 + r, hk);
          T* __restrict dv_dst = at_mut<T>(p.dv, p.dkv_strides, b, s.k_start + j0 + r, hk);
#pragma omp simd
          for (int d = 0; d < D; ++d) {
            dk_dst[d] = from_acc<T>(dk[r * D + d]);
            dv_dst[d] = from_acc<T>(dv[r * D + d]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = qa; i < qz; ++i) {
          T* __restrict dst = at_mut<T>(p.dq, p.o_strides, b, s.q_start + i, hk * group + g);
          const A* __restrict src = dq_all.data() + (g * n_rows + i - qa) * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) dst[d] = from_acc<T>(src[d] * scale);
        }
    }
    release_if_large(q_all, do_all, dq_all, lse_all, delta_all, q16_all, do16_all);
  }
  parts.template sum_into_outputs<D, T>();
}

// ---------------------------------------------------------------------------------------------
// Argument checks and dispatch
// ---------------------------------------------------------------------------------------------

// Reads cu_seqlens / seqused_k (host memory here) and checks them against the sizes.
void check_seqlens(const AttnParams& p, int64_t total_q, int64_t total_k, int64_t k_capacity) {
  if (p.cu_seqlens_q) {
    const int32_t* cu[2] = {p.cu_seqlens_q, p.cu_seqlens_k};
    const int64_t totals[2] = {total_q, total_k}, maxes[2] = {p.seqlen_q, p.seqlen_k};
    const char* names[2] = {"cu_seqlens_q", "cu_seqlens_k"};
    for (int t = 0; t < 2; ++t) {
      PYLLM_CHECK(cu[t][0] == 0, "flash_attn: ", names[t], "[0] must be 0, got ", cu[t][0]);
      for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t len = int64_t(cu[t][b + 1]) - cu[t][b];
        PYLLM_CHECK(len >= 0, "flash_attn: ", names[t], " must be non-decreasing, but entry ", b + 1, " (",
                    cu[t][b + 1], ") < entry ", b, " (", cu[t][b], ")");
        PYLLM_CHECK(len <= maxes[t], "flash_attn: sequence ", b, " has length ", len, " in ", names[t],
                    ", more than the max_seqlen given (", maxes[t], ")");
      }
      PYLLM_CHECK(cu[t][p.batch] == totals[t], "flash_attn: ", names[t], "[-1] (", cu[t][p.batch],
                  ") must equal the total number of tokens (", totals[t], ")");
    }
  }
  if (p.seqused_k)
    for (int64_t b = 0; b < p.batch; ++b)
      PYLLM_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] <= k_capacity, "flash_attn: cache length ",
                  p.seqused_k[b], " of sequence ", b, " is outside [0, ", k_capacity, "]");
}

void check_cpu_dtype(int dtype) {
  PYLLM_CHECK(dtype == int(DType::f32) || dtype == int(DType::bf16) || dtype == int(DType::f64),
              "flash_attn: unsupported CPU dtype ", dtype_name(dtype), " (code ", dtype, "); expected float32, bfloat16, float64");
}

// Tokens in the q (and out) tensor, and in k / v, as the kernels will index them.
int64_t total_tokens(const int32_t* cu, int64_t batch, int64_t seqlen) {
  return cu ? int64_t(cu[batch]) : batch * seqlen;
}

template <typename T> struct TypeTag { using type = T; };

// fp32, bf16 and fp64 only (fp16 is not a CPU dtype of this op: it would double the instantiations).
template <typename Fn>
void dispatch_dtype(int dtype, Fn fn) {
  switch (static_cast<DType>(dtype)) {
    case DType::f32: fn(TypeTag<float>{}); break;
    case DType::bf16: fn(TypeTag<bf16>{}); break;
    case DType::f64: fn(TypeTag<double>{}); break;
    default: PYLLM_CHECK(false, "flash_attn: unsupported CPU dtype ", dtype_name(dtype), " (float32, bfloat16, float64)");
  }
}

}  // namespace

std::atomic<int64_t>& flash_attn_cpu_scratch_counter() {
  static std::atomic<int64_t> bytes{0};
  return bytes;
}
int64_t flash_attn_cpu_scratch_bytes() { return flash_attn_cpu_scratch_counter().load(); }
std::vector<std::pair<const void*, size_t>>& flash_attn_kept_by_kernel() {
  static thread_local std::vector<std::pair<const void*, size_t>> kept;
  return kept;
}

bool flash_attn_cpu_bf16_dot() { return bf16_dot_enabled(); }

// The slopes are read here (host memory): each must be finite (an inf slope gives inf - inf = NaN at
// distance 0). softcap and the slopes' layout: set_score_mods (attn_params.h).
static void set_score_mods_read(AttnParams& p, double softcap, uintptr_t slopes, int64_t batch_stride) {
  set_score_mods(p, softcap, slopes, batch_stride);
  if (!slopes) return;
  for (int64_t b = 0; b < (batch_stride ? p.batch : 1); ++b)
    for (int64_t h = 0; h < p.n_heads; ++h)
      PYLLM_CHECK(std::isfinite(p.alibi_slopes[b * batch_stride + h]), "flash_attn: alibi_slopes must be finite, got ",
                  p.alibi_slopes[b * batch_stride + h], " for sequence ", b, ", head ", h);
}

// The forward's kernel for these (checked) arguments: decode, AMX tiles or the tiled kernel.
static void forward(const AttnParams& p) {
  if (decode_path(p)) {
    dispatch_head_dim(p.head_dim, [&](auto d) {
      if (p.dtype == int(DType::bf16)) decode<decltype(d)::value, bf16>(p);
      else decode<decltype(d)::value, float>(p);
    });
    return;
  }
  // Not a zero scale either: the AMX kernels scale the raw scores after masking them, and -inf * 0
  // is NaN (a causal softmax_scale=0 call had given NaN rows); the tiles here mask scaled scores.
  if (p.dtype == int(DType::bf16) && amx_enabled() && p.softcap == 0 && !p.alibi_slopes && p.scale != 0) {
    flash_attn_fwd_amx(p);
    return;
  }
  dispatch_head_dim(p.head_dim, [&](auto d) {
    dispatch_dtype(p.dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      dispatch_bf16_dot<T>([&](auto dot) { fwd<decltype(d)::value, T, decltype(dot)::value>(p); });
    });
  });
}

// flash-attn's kv-cache options (see AttnParams): each index read here (host memory) and checked
// against the cache it points into (kv_rows: its batch rows, or blocks when paged).
static void set_kv_options(AttnParams& p, uintptr_t kv_batch_idx, uintptr_t kv_leftpad, uintptr_t block_table,
                           int64_t block_table_stride, int64_t page_size, int64_t kv_rows) {
  set_kv_layout(p, kv_batch_idx, kv_leftpad, block_table, block_table_stride, page_size, kv_rows);
  if (!kv_batch_idx && !kv_leftpad && !block_table) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t used = p.seqused_k[b];  // checked to lie in [0, seqlen_k] before
    if (p.kv_leftpad)
      PYLLM_CHECK(p.kv_leftpad[b] >= 0 && p.kv_leftpad[b] <= used, "flash_attn: cache_leftpad ", p.kv_leftpad[b],
                  " of sequence ", b, " is outside [0, ", used, "] (its cache length)");
    if (p.kv_batch_idx)
      PYLLM_CHECK(p.kv_batch_idx[b] >= 0 && p.kv_batch_idx[b] < kv_rows, "flash_attn: cache_batch_idx ",
                  p.kv_batch_idx[b], " of sequence ", b, " is outside [0, ", kv_rows, ") (the cache's batch rows)");
    if (p.block_table) {
      const int64_t first = (p.kv_leftpad ? p.kv_leftpad[b] : 0) / page_size;
      for (int64_t blk = first; blk * page_size < used; ++blk) {
        const int32_t e = p.block_table[b * block_table_stride + blk];
        PYLLM_CHECK(e >= 0 && e < kv_rows, "flash_attn: block_table[", b, ", ", blk, "] = ", e, " is outside [0, ",
                    kv_rows, ") (the cache's blocks)");
      }
    }
  }
}

// The tiled kernels read a sequence's keys as rows at one stride: a paged or indexed cache is copied
// into one (batch, longest, Hkv, D) buffer for them (calls with more than kDecodeMaxQueries queries,
// or fp64; decode-sized calls read the cache where it is). The copy is the cache's bytes once,
// against attention's reads of it once per block of queries.
template <typename T>
static void gather_kv(AttnParams& p, std::vector<T>& k, std::vector<T>& v) {
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) longest = std::max<int64_t>(longest, p.seqused_k[b]);
  const int64_t D = p.head_dim, row = p.n_kv_heads * D;
  k.assign(size_t(p.batch * longest * row), T{});  // zero bits: rows before a left pad stay unread
  v.assign(k.size(), T{});
#pragma omp parallel for if (p.batch > 1)
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqInfo s = seq_info(p, b);
    for (int64_t t = s.k_start; t < s.k_start + s.len_k; ++t)
      for (int64_t hk = 0; hk < p.n_kv_heads; ++hk) {
        const int64_t dst = (b * longest + t) * row + hk * D;
        std::copy_n(kv_row<T>(p, p.k, p.k_strides, b, t, hk), D, k.data() + dst);
        std::copy_n(kv_row<T>(p, p.v, p.v_strides, b, t, hk), D, v.data() + dst);
      }
  }
  p.k = k.data(), p.v = v.data(), p.seqlen_k = longest;
  const int64_t strides[3] = {longest * row, row, D};
  std::copy_n(strides, 3, p.k_strides), std::copy_n(strides, 3, p.v_strides);
  p.block_table = p.kv_batch_idx = nullptr;
}

const char* flash_attn_cpu_amx() {
  return amx_enabled() ? "on" : flash_attn_amx_usable() ? "off" : "unavailable";
}

void flash_attn_fwd_cpu(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens_q,
                        uintptr_t cu_seqlens_k, uintptr_t seqused_k, int64_t batch, int64_t seqlen_q,
                        int64_t seqlen_k, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                        const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                        const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                        const std::vector<int64_t>& lse_strides, double scale, int64_t window_left,
                        int64_t window_right, int dtype, double softcap, uintptr_t alibi_slopes,
                        int64_t alibi_batch_stride, uintptr_t kv_batch_idx, uintptr_t kv_leftpad,
                        uintptr_t block_table, int64_t block_table_stride, int64_t page_size, int64_t kv_rows,
                        double dropout_p, uint64_t dropout_seed) {
  AttnParams p = make_attn_params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, batch, seqlen_q, seqlen_k,
                                  n_heads, n_kv_heads, head_dim, q_strides, k_strides, v_strides, o_strides,
                                  lse_strides, scale, window_left, window_right, dtype);
  check_cpu_dtype(dtype);
  set_score_mods_read(p, softcap, alibi_slopes, alibi_batch_stride);
  set_dropout(p, dropout_p, dropout_seed);
  PYLLM_CHECK(!(has_dropout(p) && seqused_k), "flash_attn: dropout is for training calls, not KV-cache ones");
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  const int64_t total_q = total_tokens(p.cu_seqlens_q, batch, seqlen_q);
  check_seqlens(p, total_q, total_tokens(p.cu_seqlens_k, batch, seqlen_k), seqlen_k);
  set_kv_options(p, kv_batch_idx, kv_leftpad, block_table, block_table_stride, page_size, kv_rows);
  if (total_q == 0) return;
  PYLLM_CHECK(q && out && lse, "flash_attn: null data pointer for a non-empty tensor");
  PYLLM_CHECK((k && v) || total_tokens(p.cu_seqlens_k, batch, seqlen_k) == 0,
              "flash_attn: null data pointer for a non-empty tensor");
  if ((p.block_table || p.kv_batch_idx) && !decode_path(p)) {
    dispatch_dtype(dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      std::vector<T> k_rows, v_rows;
      gather_kv(p, k_rows, v_rows);
      forward(p);
    });
    return;
  }
  forward(p);
}

void flash_attn_bwd_cpu(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_seqlens_q,
                        uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                        int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                        const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                        const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                        const std::vector<int64_t>& dkv_strides, const std::vector<int64_t>& lse_strides,
                        double scale, int64_t window_left, int64_t window_right, int dtype, double softcap,
                        uintptr_t alibi_slopes, int64_t alibi_batch_stride, double dropout_p, uint64_t dropout_seed) {
  AttnParams p = make_attn_params(q, k, v, cu_seqlens_q, cu_seqlens_k, 0, batch, seqlen_q, seqlen_k, n_heads,
                                  n_kv_heads, head_dim, q_strides, k_strides, v_strides, o_strides, lse_strides,
                                  scale, window_left, window_right, dtype);
  check_cpu_dtype(dtype);
  set_score_mods_read(p, softcap, alibi_slopes, alibi_batch_stride);
  set_dropout(p, dropout_p, dropout_seed);
  copy_strides(p.dkv_strides, dkv_strides, 3, "dkv_strides");
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  p.dout = reinterpret_cast<const void*>(dout);
  p.dlse = reinterpret_cast<const void*>(dlse);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.deterministic = true;  // always, see the header comment
  const int64_t total_q = total_tokens(p.cu_seqlens_q, batch, seqlen_q);
  const int64_t total_k = total_tokens(p.cu_seqlens_k, batch, seqlen_k);
  check_seqlens(p, total_q, total_k, seqlen_k);
  if (total_q == 0 && total_k == 0) return;
  PYLLM_CHECK(total_q == 0 || (q && out && lse && dout && dq), "flash_attn: null data pointer for a non-empty tensor");
  PYLLM_CHECK(total_k == 0 || (k && v && dk && dv), "flash_attn: null data pointer for a non-empty tensor");
  // Size of the lse layout: (B, H, Tq) or (H, total_q).
  const int64_t lse_size = p.cu_seqlens_q ? n_heads * lse_strides[1] : batch * lse_strides[0];
  PYLLM_CHECK(lse_size >= (p.cu_seqlens_q ? n_heads * total_q : batch * n_heads * seqlen_q),
              "flash_attn: lse_strides (", lse_strides[0], ", ", lse_strides[1], ") do not fit the lse layout");
  if (dtype == int(DType::bf16) && amx_enabled() && p.softcap == 0 && !p.alibi_slopes && p.scale != 0) {
    flash_attn_bwd_amx(p);
    return;
  }
  dispatch_head_dim(head_dim, [&](auto d) {
    dispatch_dtype(dtype, [&](auto t) {
      using T = typename decltype(t)::type;
      dispatch_bf16_dot<T>([&](auto dot) { bwd<decltype(d)::value, T, decltype(dot)::value>(p); });
    });
  });
}

}  // namespace pyllm
