// FlashAttention-2 backward on tensor cores (sm80 mma.sync m16n8k16; runs unchanged on sm90).
// Partly verified: ran on an H200 (2026-11-30): compute-sanitizer clean, its small cases right; the CUDA test suite not yet run through (see README).
// Its loops have changed since (2026-12-05, "Issue slots" below): that version never ran on a GPU.
// Speed there: fwd+bwd 0.30-0.50x torch SDPA's flash backend (bf16, D = 64 / 128): not tuned yet.
// The taller tiles (the dq kernel's 128 rows, PYLLM_ATTN_BWD_DQ_BLOCK_M=128; the dk_dv kernel's 128
// keys at D = 64, PYLLM_ATTN_BWD_DKV_BLOCK_N=128) are unverified: never run on a GPU.
//
// Called by flash_attn_bwd_cuda (flash_attn_bwd.cu) after its delta kernel has written
// delta_i = dO_i . O_i - dlse_i; P is recomputed from the forward's LSE, nothing T x T is stored.
// With scale_log2 = softmax_scale * log2(e) and lse2 = lse * log2(e), for one key block x query
// block:  S = Q K^T,  P = exp2(S * scale_log2 - lse2),  dP = dO V^T,  dS = P * (dP - delta),
//         dV += P^T dO,  dK += scale * dS^T Q,  dQ += scale * dS K.
// Capped scores and ALiBi (ScoreMod, flash_attn_common.cuh; unverified on a GPU, 2026-12-05): S is
// recomputed as the forward's, and dS scaled by the cap's derivative 1 - tanh^2 (the bias is a
// constant); the default tiles only (launch_bwd_mma_d).
// Dropout (dropout_p; Dropout, flash_attn_common.cuh; unverified on a GPU, 2026-12-05): the same
// elements as the forward's; dV over the kept P, scaled by 1 / (1 - p) once at the end, and
// dS = P (f dP - delta) with f = 1 / (1 - p) or 0; in the same instances as the score mods.
//
// dk_dv kernel: grid (ceil(Tk / kBlockN), n_kv_heads, batch), 4 warps. One CTA owns kBlockN keys of
//   one KV head and loops over the query blocks (kBlockM queries) of every query head of the GQA
//   group that can see them; dK and dV stay in registers and are written once (summed over the
//   group, as the API wants). Everything is computed transposed, keys as the mma's M dimension:
//   warp w owns 16 keys, so S^T = K Q^T and dP^T = V dO^T come out in accumulator layout with
//   keys as rows, and those accumulators ARE the A fragments of P^T and dS^T for dV += P^T dO and
//   dK += dS^T Q (same repacking as the forward's P V). At D = 256, 16 x 256 fp32 of both dK and
//   dV would be 256 registers per thread, so two warps share each 16 keys and split the head dim
//   of dK / dV (kWarpsD = 2); both compute the same S^T and dP^T (recomputed, not exchanged).
// dq kernel: grid (ceil(Tq / 64), n_heads, batch), 4 warps x 16 query rows, looping over the key
//   blocks the rows see, K and V double-buffered as in the forward; dQ stays in registers.
//
// dQ choice: by default a separate dq kernel (FlashAttention-2's option of recomputing S and dP
// there) rather than fp32 atomicAdd of dS K into a dQ accumulator from the dk_dv kernel. Every
// gradient element then has one owner that sums in a fixed order: the result is bitwise
// deterministic by construction whatever `deterministic` says, there is no fp32 dQ buffer and no
// conversion pass. The cost is recomputing S and dP: 7 matmuls of Tq x Tk x D per head instead of
// 5 (14 vs 10 * Tq * Tk * D FLOPs, half for causal).
// The atomic variant (AtomicDQ; PYLLM_ATTN_BWD=atomic with deterministic = false, D = 64 / 128,
// sm_90 while it is an experiment: UNVERIFIED, never run on a GPU) is FlashAttention-2's default:
// after each step's dK / dV mmas the dk_dv kernel stores dS^T (16-bit, as the dK mma rounds it)
// in shared memory, and each warp computes 16 queries x 64 columns of dQ += dS K over the block's
// keys (dS via ldmatrix.trans of the stored dS^T, K as the dq kernel reads it), then adds them
// into a (rows, heads, D) fp32 buffer with red.global.add.v2.f32 (the launcher zeroes it first;
// flash_attn_dq_from_accum_kernel scales and converts it to dq after). Per step and warp
// (D = 64, BM = 64): 32 more mmas and 20 ldmatrix.x4 beside the 64 + 64 of S^T / dP^T and dV / dK,
// one more barrier, 8 KB more shared memory (D = 128, BM = 32: 4 KB); ptxas (nvcc 13.0, sm_90):
// 236 / 251 registers at D = 64 / 128, no spill (235 / 248 without). Traffic: BM x D fp32
// reductions per step, i.e. dQ summed in L2 once per key block that sees it (Tk / 64 times, half
// for causal) instead of the dq kernel's recompute; plus 4 + 4 + 2 bytes per dq element for the
// zeroing, the conversion's read and its write. Summation order across key blocks is the order
// the CTAs' reductions reach L2: dq is not bitwise repeatable; dk, dv are (the same sums as
// without it: tests/test_cuda_emu.py checks the same bits). Which is faster is a GPU measurement
// (bench_attention's "pyllm atomic-dq" rows). tools/cuda_emu/barrier_check.py (2026-12-04): each of
// this file's 5 barriers removed in turn is reported by the race build, the new dS^T barrier
// among them (its removal left the plain emulator's answers right: only the race build sees it).
//
// Memory traffic per (batch, KV head): dk_dv reads K, V once and Q, dO (plus 8 bytes of lse /
// delta per row) once per key block per query head, mostly from L2; dq reads Q, dO once and K, V
// once per query block. Writes: dQ, dK, dV once. Extra memory: the (B, H, Tq) fp32 delta.
//
// Masks: per element against the per-row bounds of common/attn_params.h (key_lo/key_hi for query
// rows, query_lo/query_hi for key rows), only on blocks that cross a mask edge or a sequence end;
// rows past a sequence's end are zero-filled by cp.async and get lse = +inf (P = 0).
// Issue slots (2026-12-05, UNVERIFIED on a GPU): P by exp2_ftz (one MUFU.EX2; exp2f had been 4
// instructions), the mask in a branch of its own (mask_scores) and full tiles copied without row
// tests (load_tile_async), as in the forward. tools/sass_census.py (nvcc 13.0, sm_90, bf16, one warp
// per step, mma.sync included), on a full block no mask crosses: dk_dv D = 64 1,244 -> 927, D = 128
// 1,093 -> 905; dq D = 64 1,018 -> 781, D = 128 840 -> 769 (a block the mask crosses: dq D = 128
// 887, 5% above before, where the branch costs more than the predicated mask did). ptxas: no new
// spill in a default-tile loop (sm_90: dq D = 64's and dq-m128's 4 B are gone; sm_80: dq D = 64 at
// its 168-register cap spills 16 B outside the loop, 4 B before). The score-mod instances
// (unverified too): dk_dv D = 64 255 registers with 64 B of spill stores, 6 loads a step.
//
// Fragment layouts used below (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"; lane = 4 * g + t, see also flash_attn_common.cuh):
//   A (16 x 16, row-major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16 x 8, k x n):       b0 = B[2t, 2t+1][g],  b1 = B[2t+8, 2t+9][g]
//   C (16 x 8, fp32):        c0, c1 = C[g][2t, 2t+1],  c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.x4 (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): lanes 8i .. 8i+7 give
//   the row addresses of 8x8 matrix i, and lane 4g + t receives row g, columns 2t, 2t+1 of matrix
//   i in register i; with .trans it receives rows 2t, 2t+1 of column g instead (the transpose).
// So for a tile stored row-major with rows r and 16-bit columns c in shared memory:
//   - as an A operand (rows = M): non-trans, lane address row (lane % 8) + 8 * ((lane / 8) % 2),
//     column 8 * (lane / 16): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//     = a0..a3 (as the forward loads Q);
//   - as a B operand with rows = N (B = tile^T, e.g. K in Q K^T): non-trans, row (lane % 8) +
//     8 * (lane / 16), column 8 * ((lane / 8) % 2): gives b0, b1 of n-tile 0 then of n-tile 1 (as
//     the forward loads K);
//   - as a B operand with rows = K (B = tile, e.g. V in P V): .trans, row (lane % 8) +
//     8 * ((lane / 8) % 2), column 8 * (lane / 16): gives b0, b1 of n-tile 0 then of n-tile 1 (as
//     the forward loads V).
//   - the C fragments of n-tiles 2k and 2k+1 are, packed to 16 bits, the A fragment of k-step k:
//     {pack(c[2k][0..1]), pack(c[2k][2..3]), pack(c[2k+1][0..1]), pack(c[2k+1][2..3])}.
//
// Checked without a GPU only: a line-by-line numpy transliteration of both kernels
// (tools/flash_attn_mma_emulate.py, which also covers the forward), with ldmatrix and mma
// emulated from the layouts above, matched a float64 autograd reference to 1e-15
// (every head dim, causal / windows, GQA / MQA, Tq != Tk, varlen with empty and length-1
// sequences), wrote every output element exactly once and kept every ldmatrix address 16-byte
// aligned and inside its tile; with garbage cu_seqlens every access stayed in bounds. Barriers,
// cp.async groups and real rounding are not covered by that: compute-sanitizer
// (bench/sanitize_cases.py) and the `cuda` tests are.
//
// Tile sizes: not yet tuned (first GPU run above). Chosen so that the fp32 accumulators
// fit in registers (dk_dv: kSliceD for dK, dV + kBlockM for S^T, dP^T = at most 160 floats per
// thread; ptxas, nvcc 13.0: 134-248 registers on sm_80, no spills but 4 bytes in dq at D = 64;
// 100-250 on sm_90, no spills. Re-run 2026-12-04 (bench/results/ptxas_attention_2026-12-04.json):
// sm_80 dk_dv at D = 32 now takes 128 registers and spills 28 B / 20 B, dq at D = 64 4 B on both
// archs, the rest as before) and
// shared memory stays under the 99 KB a CTA may opt into on sm86 / sm89 (the smallest sm80+
// limit), see the static_asserts.
#include <cmath>

#include "cuda/flash_attn_common.cuh"

namespace pyllm {
namespace attn {

constexpr int kBwdMmaThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxSmemBytes = 99 * 1024;

// MK: 16-key m-tiles per warp. MK = 2 (128 keys per CTA, D = 64 only: at D = 128 the dK and dV
// accumulators alone would be 256 registers) makes each Q / dO fragment feed two key tiles, with
// queries per step halved so that the S^T and dP^T accumulators stay as many: per step and warp
// (D = 64) MK = 1, BM = 64: 72 ldmatrix.x4 for 128 mmas (1.8 per load); MK = 2, BM = 32: 48 for 128
// (2.7); ptxas (nvcc 13.0, sm_90): 255 registers, no spill (MK = 1: 233); re-run 2026-12-04: 255
// with 28 B of spill stores / 20 B of loads (MK = 1: 235, none). Built for sm_90 only,
// chosen by PYLLM_ATTN_BWD_DKV_BLOCK_N=128 until a GPU run measures
// it: UNVERIFIED (never run on a GPU). Where a key tile's first query does not move with the
// taller tile (no right window clamping it, e.g. non-causal without a window), the 16-query groups
// its mmas sum are the same and so are the bits; otherwise a rounding-level difference.
template <int D, int MK = 1, bool AtomicDQ = false>
struct BwdKVTile {
  static constexpr int kWarps = kBwdMmaThreads / 32;
  static constexpr int kWarpsD = D <= 128 ? 1 : 2;               // warps splitting the head dim of dK / dV
  static constexpr int kBlockN = 16 * MK * kWarps / kWarpsD;       // keys per CTA: 64 (128 with MK = 2), 32 at D = 256
  static constexpr int kBlockM = (D <= 64 ? 64 : 32) / MK;         // queries per step
  static constexpr int kSliceD = D / kWarpsD;                      // dK / dV columns per warp
  // K, V (one stage) + Q, dO (two stages) in 16-bit, + lse2, delta (two stages) in fp32, + with
  // AtomicDQ the step's dS^T (kBlockN x kBlockM, 16-bit).
  static constexpr int kSmemBytes =
      (2 * kBlockN * D + 4 * kBlockM * D) * 2 + 4 * kBlockM * 4 + (AtomicDQ ? kBlockN * kBlockM * 2 : 0);
  static_assert(!AtomicDQ || (MK == 1 && kWarpsD == 1), "the atomic dQ variant: 16 keys per warp, whole rows");
  static_assert(kSmemBytes <= kMaxSmemBytes, "dk_dv tile over 99 KB of shared memory");
  static_assert((kSliceD / 8) % 2 == 0 && (kBlockM / 8) % 2 == 0, "tiles pair up for ldmatrix.x4");
};

// MT: 16-row m-tiles per warp, as in the forward (flash_attn_fwd.cu's FwdTile): MT = 2 (128 query
// rows per CTA) makes each K / V fragment feed two m-tiles, 2.4 mmas per ldmatrix.x4 instead of 1.7
// at D = 64 (per key block and warp: MT = 1, BN = 64: 56 loads, 96 mmas; MT = 2, BN = 32: 40 loads,
// 96 mmas), with keys per step halved so that the S and dP accumulators stay as many (dQ's double;
// ptxas, nvcc 13.0, sm_90: 248 registers at D = 64, no spill; 255 at D = 128, 4 B of spill, as
// against 168 / 174 for MT = 1). Built for D = 64 / 128 on sm_90 only, chosen by
// PYLLM_ATTN_BWD_DQ_BLOCK_M=128 until a GPU run measures it: UNVERIFIED (never run on a GPU). Without
// a left window every row's dQ takes the same mmas in the same key order as with MT = 1 (16 keys per
// k-step from key 0 either way; key blocks only other rows need add dS = 0), so the bits must match;
// with one, the 16-key groups start at the tile's first key, which the taller tile can move: a
// rounding-level difference. tools/flash_attn_mma_emulate.py checks both (its M128_CASES).
template <int D, int MT = 1>
struct BwdQTile {
  static constexpr int kBlockM = 16 * (kBwdMmaThreads / 32) * MT;        // 64 queries per m-tile row of warps
  static constexpr int kBlockN = (D <= 64 ? 64 : (D <= 128 ? 32 : 16)) / MT;  // keys per step
  // Q, dO (one stage) + K, V (two stages).
  static constexpr int kSmemBytes = (2 * kBlockM * D + 4 * kBlockN * D) * 2;
  static_assert(kSmemBytes <= kMaxSmemBytes, "dq tile over 99 KB of shared memory");
  static_assert((kBlockN / 8) % 2 == 0 && (D / 8) % 2 == 0, "tiles pair up for ldmatrix.x4");
};

__device__ __forceinline__ int64_t lse_index(const AttnParams& p, int64_t b, int64_t h, const SeqInfo& s,
                                             int64_t i) {
  return b * p.lse_strides[0] + h * p.lse_strides[1] + (p.cu_seqlens_q ? s.q_start : 0) + i;
}

// Shared-memory address, for ldmatrix, of the 16 x 16 (x4) piece at (row0, col0) of a swizzled tile.
// A operand / B operand with rows = K (.trans): matrices ordered (r0-7, c0-7), (r8-15, c0-7),
// (r0-7, c8-15), (r8-15, c8-15).
template <int D, typename T>
__device__ __forceinline__ uint32_t frag_addr_rows_m(const T* tile, int row0, int col0, int lane) {
  return smem_addr(tile + Swizzle<D>::offset(row0 + (lane % 8) + ((lane / 8) % 2) * 8, col0 + (lane / 16) * 8));
}
// B operand with rows = N (non-trans): (r0-7, c0-7), (r0-7, c8-15), (r8-15, c0-7), (r8-15, c8-15),
// i.e. b0, b1 of n-tile row0 / 8, then b0, b1 of the next n-tile.
template <int D, typename T>
__device__ __forceinline__ uint32_t frag_addr_rows_n(const T* tile, int row0, int col0, int lane) {
  return smem_addr(tile + Swizzle<D>::offset(row0 + (lane % 8) + (lane / 16) * 8, col0 + ((lane / 8) % 2) * 8));
}

// Accumulators of n-tiles 2k, 2k+1 -> the A fragment of k-step k (see the header).
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// p[0] += x, p[1] += y in global memory (8-byte aligned): one vector reduction on sm_90 (red: no
// value returned; atomicAdd(float2*) compiles to atom.global.add.v2.f32), two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if !defined(PYLLM_CUDA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(__cvta_generic_to_global(p)), "f"(x), "f"(y)
               : "memory");
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// dq_accum: with AtomicDQ, the (rows_q, n_heads, D) fp32 dQ / scale accumulator (zeroed by the
// launcher), else unused.
// Mods: capped / biased scores (ScoreMod), on the default tiles only (launch_bwd_mma_d).
template <typename T, int D, int MK, bool AtomicDQ, bool Mods>
__global__ void __launch_bounds__(kBwdMmaThreads)
    flash_attn_bwd_dk_dv_mma_kernel(const AttnParams p, const float* __restrict__ delta, float scale_log2,
                                    float* __restrict__ dq_accum) {
#ifdef PYLLM_ATTN_UNSUPPORTED_ARCH
  __trap();
#else
#if __CUDA_ARCH__ < 900
  if constexpr (MK > 1 || AtomicDQ) {  // Hopper only while they are experiments (see BwdKVTile, launch_bwd_mma_d)
    __trap();
    return;
  }
#endif
  using Tile = BwdKVTile<D, MK, AtomicDQ>;
  constexpr int BN = Tile::kBlockN, BM = Tile::kBlockM, MT = BM / 8, ST = Tile::kSliceD / 8;
  static_assert(!Mods || (MK == 1 && !AtomicDQ), "the experiments take no score mods");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;       // 2 stages of BM x D
  T* sdO = sQ + 2 * BM * D;  // 2 stages of BM x D
  float* sLse2 = reinterpret_cast<float*>(sdO + 2 * BM * D);  // 2 stages of BM, log2 units
  float* sDelta = sLse2 + 2 * BM;                               // 2 stages of BM
  T* sdS = reinterpret_cast<T*>(sDelta + 2 * BM);               // AtomicDQ: BN x BM, dS^T (keys x queries)

  const int b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t j0 = int64_t(blockIdx.x) * BN;
  if (j0 >= s.len_k) return;  // uniform per CTA: before any barrier
  const int nk = int(min(int64_t(BN), s.len_k - j0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int key_row0 = (warp / Tile::kWarpsD) * 16 * MK;  // this warp's 16 * MK keys within the block
  const int dt0 = (warp % Tile::kWarpsD) * ST;            // its first 8-wide column tile of dK / dV
  const int group = int(p.n_heads / p.n_kv_heads);

  // Queries that see any of this block's keys (both bounds are monotone in the key), cut into
  // blocks of BM, for each query head of the group: n_steps steps in all.
  const int64_t q_lo = query_lo(p, j0, s.len_q, s.len_k), q_hi = query_hi(p, j0 + nk - 1, s.len_q, s.len_k);
  const int n_qblocks = q_hi > q_lo ? int((q_hi - q_lo + BM - 1) / BM) : 0;
  const int n_steps = n_qblocks * group;
  // Queries [row_qlo, row_qhi) that see this lane's key rows g and g + 8 of each key tile (none
  // past the end).
  int row_qlo[MK][2], row_qhi[MK][2];
#pragma unroll
  for (int mk = 0; mk < MK; ++mk) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t j = j0 + key_row0 + mk * 16 + g + rr * 8;
      const bool in = j < s.len_k;
      row_qlo[mk][rr] = in ? int(query_lo(p, j, s.len_q, s.len_k)) : 0;
      row_qhi[mk][rr] = in ? int(query_hi(p, j, s.len_q, s.len_k)) : 0;
    }
  }
  const int64_t qlo_last = query_lo(p, j0 + BN - 1, s.len_q, s.len_k), qhi_first = query_hi(p, j0, s.len_q, s.len_k);

  const float* lse = static_cast<const float*>(p.lse);
  auto load_query_block = [&](int step, int stage) {
    const int hq = hk * group + step / n_qblocks;
    const int64_t i0 = q_lo + int64_t(step % n_qblocks) * BM;
    const int valid = int(min(int64_t(BM), s.len_q - i0));  // >= 1: i0 < q_hi <= len_q
    const T* q_src = static_cast<const T*>(p.q) + b * p.q_strides[0] + (s.q_start + i0) * p.q_strides[1] +
                     hq * p.q_strides[2];
    const T* do_src = static_cast<const T*>(p.dout) + b * p.o_strides[0] + (s.q_start + i0) * p.o_strides[1] +
                      hq * p.o_strides[2];
    load_tile_async<BM, D, kBwdMmaThreads>(sQ + stage * BM * D, q_src, p.q_strides[1], valid);
    load_tile_async<BM, D, kBwdMmaThreads>(sdO + stage * BM * D, do_src, p.o_strides[1], valid);
    // Plain stores: made visible by the __syncthreads that follows the cp.async wait.
    for (int r = threadIdx.x; r < BM; r += kBwdMmaThreads) {
      const bool in = r < valid;
      const int64_t idx = in ? lse_index(p, b, hq, s, i0 + r) : 0;
      sLse2[stage * BM + r] = in ? lse[idx] * kLog2e : INFINITY;
      sDelta[stage * BM + r] = in ? delta[idx] : 0.f;
    }
  };

  float dk[MK][ST][4], dv[MK][ST][4];
#pragma unroll
  for (int mk = 0; mk < MK; ++mk)
#pragma unroll
    for (int dt = 0; dt < ST; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mk][dt][e] = dv[mk][dt][e] = 0.f;

  if (n_steps > 0) {
    const T* k_src = static_cast<const T*>(p.k) + b * p.k_strides[0] + (s.k_start + j0) * p.k_strides[1] +
                     hk * p.k_strides[2];
    const T* v_src = static_cast<const T*>(p.v) + b * p.v_strides[0] + (s.k_start + j0) * p.v_strides[1] +
                     hk * p.v_strides[2];
    load_tile_async<BN, D, kBwdMmaThreads>(sK, k_src, p.k_strides[1], nk);
    load_tile_async<BN, D, kBwdMmaThreads>(sV, v_src, p.v_strides[1], nk);
    load_query_block(0, 0);
  }
  cp_async_commit();

  for (int step = 0; step < n_steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < n_steps) {
      load_query_block(step + 1, stage ^ 1);  // that stage was released by the last iteration's closing barrier
      cp_async_commit();
      cp_async_wait<1>();  // everything but the group just issued: K, V and this step's stage
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cQ = sQ + stage * BM * D;
    const T* cdO = sdO + stage * BM * D;
    const float* cLse2 = sLse2 + stage * BM;
    const float* cDelta = sDelta + stage * BM;
    const int64_t i0 = q_lo + int64_t(step % n_qblocks) * BM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 * MK keys x BM queries: each Q / dO
    // fragment feeds MK key tiles.
    float st[MK][MT][4], dpt[MK][MT][4];
#pragma unroll
    for (int mk = 0; mk < MK; ++mk)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[mk][mt][e] = dpt[mk][mt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[MK][4], av[MK][4];
#pragma unroll
      for (int mk = 0; mk < MK; ++mk) {
        ldmatrix_x4(ak[mk], frag_addr_rows_m<D>(sK, key_row0 + mk * 16, kk * 16, lane));
        ldmatrix_x4(av[mk], frag_addr_rows_m<D>(sV, key_row0 + mk * 16, kk * 16, lane));
      }
#pragma unroll
      for (int mt = 0; mt < MT; mt += 2) {
        uint32_t bq[4], bdo[4];
        ldmatrix_x4(bq, frag_addr_rows_n<D>(cQ, mt * 8, kk * 16, lane));
        ldmatrix_x4(bdo, frag_addr_rows_n<D>(cdO, mt * 8, kk * 16, lane));
        const uint32_t bq0[2] = {bq[0], bq[1]}, bq1[2] = {bq[2], bq[3]};
        const uint32_t bdo0[2] = {bdo[0], bdo[1]}, bdo1[2] = {bdo[2], bdo[3]};
#pragma unroll
        for (int mk = 0; mk < MK; ++mk) {
          mma_16x8x16<T>(st[mk][mt], ak[mk], bq0);
          mma_16x8x16<T>(st[mk][mt + 1], ak[mk], bq1);
          mma_16x8x16<T>(dpt[mk][mt], av[mk], bdo0);
          mma_16x8x16<T>(dpt[mk][mt + 1], av[mk], bdo1);
        }
      }
    }

    // P^T and dS^T in place. Element e of tile mt: key row g + 8 * (e / 2) of key tile mk, query
    // mt * 8 + 2t + e % 2. Capped or biased scores as the forward's (ScoreMod), dS through the cap.
    const bool need_mask = !(nk == BN && qlo_last <= i0 && i0 + BM <= qhi_first);
    const ScoreMod mod = Mods ? ScoreMod(p, b, hk * group + step / n_qblocks, float(p.scale), kLog2e) : ScoreMod();
    const int dist0 = int(i0 + (s.len_k - s.len_q) - j0) - key_row0 - g + 2 * t;  // ALiBi: query - key
    // Dropout (Dropout, flash_attn_common.cuh): this step's query head; the lane's keys g, g + 8
    // (MK = 1 with Mods) hashed per step, its queries per tile.
    const Dropout drop = Mods ? Dropout(p, b, hk * group + step / n_qblocks) : Dropout();
    uint32_t drop_key[2] = {0, 0};
    if (Mods && drop.on)
      for (int rr = 0; rr < 2; ++rr) drop_key[rr] = drop.key.col_hash(j0 + key_row0 + g + rr * 8);
#pragma unroll
    for (int mk = 0; mk < MK; ++mk) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = mt * 8 + 2 * t + (e & 1);
          float dcap;
          const float x =
              mod.score_or(Mods, st[mk][mt][e], scale_log2, dist0 + mt * 8 + (e & 1) - mk * 16 - (e / 2) * 8, dcap);
          float pr = exp2_ftz(x - cLse2[col]);
          float ds;
          if (Mods && drop.on) {  // dV over the kept P (scaled at the end), dS = P (f dP - delta)
            const float f = drop.kept(drop.key.row_hash(i0 + col), drop_key[e / 2]) ? drop.scale : 0.f;
            ds = pr * (dpt[mk][mt][e] * f - cDelta[col]);
            pr *= float(f != 0.f);
          } else {
            ds = pr * (dpt[mk][mt][e] - cDelta[col]);
          }
          if constexpr (Mods) ds *= dcap;
          st[mk][mt][e] = pr;
          dpt[mk][mt][e] = ds;
        }
      }
    }
    if (need_mask) mask_scores(0.f, int(i0) + 2 * t, row_qlo, row_qhi, st, dpt);  // a branch (mask_scores)
    if constexpr (AtomicDQ) {
      // dS^T, rounded as the dK mma takes it, for every warp's dQ phase below: this warp's key
      // rows g, g + 8, queries 2t, 2t + 1 of each 8-query tile (one 32-bit store each).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
          *reinterpret_cast<uint32_t*>(sdS + Swizzle<BM>::offset(key_row0 + g + rr * 8, mt * 8) + 2 * t) =
              pack2<T>(dpt[0][mt][2 * rr], dpt[0][mt][2 * rr + 1]);
    }

    // dV += P^T dO and dK += dS^T Q over the block's queries, 16 per k-step, this warp's columns;
    // each dO / Q fragment feeds MK key tiles.
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      uint32_t ap[MK][4], ads[MK][4];
#pragma unroll
      for (int mk = 0; mk < MK; ++mk) {
        acc_to_a<T>(ap[mk], st[mk][2 * kq], st[mk][2 * kq + 1]);
        acc_to_a<T>(ads[mk], dpt[mk][2 * kq], dpt[mk][2 * kq + 1]);
      }
#pragma unroll
      for (int dt = 0; dt < ST; dt += 2) {
        uint32_t bdo[4], bq[4];
        ldmatrix_x4_trans(bdo, frag_addr_rows_m<D>(cdO, kq * 16, (dt0 + dt) * 8, lane));
        ldmatrix_x4_trans(bq, frag_addr_rows_m<D>(cQ, kq * 16, (dt0 + dt) * 8, lane));
        const uint32_t bdo0[2] = {bdo[0], bdo[1]}, bdo1[2] = {bdo[2], bdo[3]};
        const uint32_t bq0[2] = {bq[0], bq[1]}, bq1[2] = {bq[2], bq[3]};
#pragma unroll
        for (int mk = 0; mk < MK; ++mk) {
          mma_16x8x16<T>(dv[mk][dt], ap[mk], bdo0);
          mma_16x8x16<T>(dv[mk][dt + 1], ap[mk], bdo1);
          mma_16x8x16<T>(dk[mk][dt], ads[mk], bq0);
          mma_16x8x16<T>(dk[mk][dt + 1], ads[mk], bq1);
        }
      }
    }
    if constexpr (AtomicDQ) {
      // dQ += dS K for this block's queries over its BN keys, added into dq_accum. Warp w takes
      // 16 queries (m-tile w % QM) x D / CG columns: dS from sdS as the A operand (.trans of the
      // stored dS^T), K as the B operand (.trans, keys = k), as the dq kernel reads it.
      constexpr int QM = BM / 16, CG = (kBwdMmaThreads / 32) / QM, DQN = D / CG / 8;
      static_assert(QM * CG == kBwdMmaThreads / 32 && DQN % 2 == 0, "dQ tiles cover the block evenly");
      __syncthreads();  // every warp's dS^T rows are in sdS
      const int m0 = (warp % QM) * 16, n0 = (warp / QM) * DQN * 8;
      float dqa[DQN][4];
#pragma unroll
      for (int dt = 0; dt < DQN; ++dt) dqa[dt][0] = dqa[dt][1] = dqa[dt][2] = dqa[dt][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < BN / 16; ++kb) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, frag_addr_rows_n<BM>(sdS, kb * 16, m0, lane));
#pragma unroll
        for (int dt = 0; dt < DQN; dt += 2) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, frag_addr_rows_m<D>(sK, kb * 16, n0 + dt * 8, lane));
          const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
          mma_16x8x16<T>(dqa[dt], a, b0);
          mma_16x8x16<T>(dqa[dt + 1], a, b1);
        }
      }
      // Rows of the sequence only (a block's last rows may lie past its end). Accumulator rows:
      // (b, token) flattened as dq's rows, packed tokens for varlen.
      const int hq = hk * group + step / n_qblocks;
      const int valid = int(min(int64_t(BM), s.len_q - i0));
      const int64_t row_base = (p.cu_seqlens_q ? 0 : int64_t(b) * p.seqlen_q) + s.q_start + i0;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int r = m0 + g + rr * 8;
        if (r >= valid) continue;
        float* dst = dq_accum + ((row_base + r) * p.n_heads + hq) * D + n0 + 2 * t;
#pragma unroll
        for (int dt = 0; dt < DQN; ++dt)
          atomic_add2(dst + dt * 8, dqa[dt][2 * rr], dqa[dt][2 * rr + 1]);
      }
    }
    __syncthreads();  // every warp is done with this stage (and sdS) before it is refilled
  }
  cp_async_wait<0>();  // nothing in flight at exit

  // Every key row of the sequence in this block is written, zeros for keys no query sees.
  const float scale = float(p.scale);
  const float dv_scale = Mods && has_dropout(p) ? float(p.dropout_scale) : 1.f;  // dropout's 1 / (1 - p)
#pragma unroll
  for (int mk = 0; mk < MK; ++mk) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = key_row0 + mk * 16 + g + rr * 8;
      if (row >= nk) continue;
      const int64_t off = b * p.dkv_strides[0] + (s.k_start + j0 + row) * p.dkv_strides[1] + hk * p.dkv_strides[2];
      T* dk_row = static_cast<T*>(p.dk) + off;
      T* dv_row = static_cast<T*>(p.dv) + off;
#pragma unroll
      for (int dt = 0; dt < ST; ++dt) {
        const int col = (dt0 + dt) * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(dk_row + col) =
            pack2<T>(dk[mk][dt][2 * rr] * scale, dk[mk][dt][2 * rr + 1] * scale);
        if constexpr (Mods)
          *reinterpret_cast<uint32_t*>(dv_row + col) =
              pack2<T>(dv[mk][dt][2 * rr] * dv_scale, dv[mk][dt][2 * rr + 1] * dv_scale);
        else
          *reinterpret_cast<uint32_t*>(dv_row + col) = pack2<T>(dv[mk][dt][2 * rr], dv[mk][dt][2 * rr + 1]);
      }
    }
  }
#endif
}

template <typename T, int D, int MT, bool Mods>
__global__ void __launch_bounds__(kBwdMmaThreads)
    flash_attn_bwd_dq_mma_kernel(const AttnParams p, const float* __restrict__ delta, float scale_log2) {
  static_assert(!Mods || MT == 1, "the taller tiles take no score mods");
#ifdef PYLLM_ATTN_UNSUPPORTED_ARCH
  __trap();
#else
#if __CUDA_ARCH__ < 900
  if constexpr (MT > 1) {  // Hopper only while it is an experiment (see BwdQTile)
    __trap();
    return;
  }
#endif
  using Tile = BwdQTile<D, MT>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;     // 2 stages of BN x D
  T* sV = sK + 2 * BN * D;  // 2 stages of BN x D

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  if (i0 >= s.len_q) return;  // uniform per CTA: before any barrier
  const int mq = int(min(int64_t(BM), s.len_q - i0));
  const int hk = h / int(p.n_heads / p.n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row = warp * 16 * MT;  // this warp's first row in the tile; m-tile mt starts 16 * mt below
  const ScoreMod mod = Mods ? ScoreMod(p, b, h, float(p.scale), kLog2e) : ScoreMod();
  const Dropout drop = Mods ? Dropout(p, b, h) : Dropout();
  uint32_t drop_row[2] = {0, 0};  // dropout: the row hashes of this lane's rows g, g + 8 (MT = 1)
  if (Mods && drop.on)
    for (int rr = 0; rr < 2; ++rr) drop_row[rr] = drop.key.row_hash(i0 + warp_row + g + rr * 8);

  // Keys any of the block's queries see (both bounds monotone in the query), BN at a time.
  const int64_t k_lo = key_lo(p, i0, s.len_q, s.len_k), k_hi = key_hi(p, i0 + mq - 1, s.len_q, s.len_k);
  const int n_blocks = k_hi > k_lo ? int((k_hi - k_lo + BN - 1) / BN) : 0;
  const int64_t klo_last = key_lo(p, i0 + mq - 1, s.len_q, s.len_k), khi_first = key_hi(p, i0, s.len_q, s.len_k);
  // Per lane, rows g and g + 8 of each of the warp's m-tiles: key bounds, lse (log2 units), delta.
  int row_lo[MT][2], row_hi[MT][2];
  float lse2[MT][2], delta_row[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t i = i0 + warp_row + mt * 16 + g + rr * 8;
      const bool in = i < s.len_q;
      row_lo[mt][rr] = in ? int(key_lo(p, i, s.len_q, s.len_k)) : 0;
      row_hi[mt][rr] = in ? int(key_hi(p, i, s.len_q, s.len_k)) : 0;
      const int64_t idx = in ? lse_index(p, b, h, s, i) : 0;
      lse2[mt][rr] = in ? static_cast<const float*>(p.lse)[idx] * kLog2e : INFINITY;
      delta_row[mt][rr] = in ? delta[idx] : 0.f;
    }
  }

  const T* q_src = static_cast<const T*>(p.q) + b * p.q_strides[0] + (s.q_start + i0) * p.q_strides[1] +
                   h * p.q_strides[2];
  const T* do_src = static_cast<const T*>(p.dout) + b * p.o_strides[0] + (s.q_start + i0) * p.o_strides[1] +
                    h * p.o_strides[2];
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_strides[0] + s.k_start * p.k_strides[1] + hk * p.k_strides[2];
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_strides[0] + s.k_start * p.v_strides[1] + hk * p.v_strides[2];
  auto load_kv = [&](int nb, int stage) {
    const int64_t j0 = k_lo + int64_t(nb) * BN;
    const int valid = int(min(int64_t(BN), s.len_k - j0));  // >= 1: j0 < k_hi <= len_k
    load_tile_async<BN, D, kBwdMmaThreads>(sK + stage * BN * D, k_head + j0 * p.k_strides[1], p.k_strides[1], valid);
    load_tile_async<BN, D, kBwdMmaThreads>(sV + stage * BN * D, v_head + j0 * p.v_strides[1], p.v_strides[1], valid);
  };

  load_tile_async<BM, D, kBwdMmaThreads>(sQ, q_src, p.q_strides[1], mq);
  load_tile_async<BM, D, kBwdMmaThreads>(sdO, do_src, p.o_strides[1], mq);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  float dq[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) dq[mt][dt][0] = dq[mt][dt][1] = dq[mt][dt][2] = dq[mt][dt][3] = 0.f;

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int stage = nb & 1;
    if (nb + 1 < n_blocks) {
      load_kv(nb + 1, stage ^ 1);  // that stage was released by the last iteration's closing barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cK = sK + stage * BN * D;
    const T* cV = sV + stage * BN * D;
    const int64_t j0 = k_lo + int64_t(nb) * BN;

    // S = Q K^T and dP = dO V^T for this warp's 16 * MT rows x BN keys: each K / V fragment feeds
    // MT m-tiles.
    float sacc[MT][NT][4], dpacc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[mt][nt][e] = dpacc[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[MT][4], ado[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldmatrix_x4(aq[mt], frag_addr_rows_m<D>(sQ, warp_row + mt * 16, kk * 16, lane));
        ldmatrix_x4(ado[mt], frag_addr_rows_m<D>(sdO, warp_row + mt * 16, kk * 16, lane));
      }
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, frag_addr_rows_n<D>(cK, nt * 8, kk * 16, lane));
        ldmatrix_x4(bv, frag_addr_rows_n<D>(cV, nt * 8, kk * 16, lane));
        const uint32_t bk0[2] = {bk[0], bk[1]}, bk1[2] = {bk[2], bk[3]};
        const uint32_t bv0[2] = {bv[0], bv[1]}, bv1[2] = {bv[2], bv[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<T>(sacc[mt][nt], aq[mt], bk0);
          mma_16x8x16<T>(sacc[mt][nt + 1], aq[mt], bk1);
          mma_16x8x16<T>(dpacc[mt][nt], ado[mt], bv0);
          mma_16x8x16<T>(dpacc[mt][nt + 1], ado[mt], bv1);
        }
      }
    }

    // dS in place of dP. Element e of tile nt: query row g + 8 * (e / 2), key nt * 8 + 2t + e % 2.
    // Capped or biased scores as the forward's (ScoreMod), dS through the cap.
    const bool need_mask = !(klo_last <= j0 && j0 + BN <= khi_first);
    const int dist0 = int(i0 + (s.len_k - s.len_q) - j0) + warp_row + g - 2 * t;  // ALiBi: query - key
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dcap;
          const float x = mod.score_or(Mods, sacc[mt][nt][e], scale_log2,
                                       dist0 + mt * 16 + (e / 2) * 8 - nt * 8 - (e & 1), dcap);
          const float pr = exp2_ftz(x - lse2[mt][e / 2]);
          float dp = dpacc[mt][nt][e];
          if (Mods && drop.on)  // dS = P (f dP - delta), f = 1 / (1 - p) or 0 (Dropout)
            dp *= drop.kept(drop_row[e / 2], drop.key.col_hash(j0 + nt * 8 + 2 * t + (e & 1))) ? drop.scale : 0.f;
          float ds = pr * (dp - delta_row[mt][e / 2]);
          if constexpr (Mods) ds *= dcap;
          dpacc[mt][nt][e] = ds;
        }
      }
    }
    if (need_mask) mask_scores(0.f, int(j0) + 2 * t, row_lo, row_hi, dpacc);  // a branch (mask_scores)

    // dQ += dS K: the dS accumulators of key tiles 2kk, 2kk+1 are the A fragment of k-step kk; each
    // K fragment feeds MT m-tiles.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) acc_to_a<T>(a[mt], dpacc[mt][2 * kk], dpacc[mt][2 * kk + 1]);
#pragma unroll
      for (int dt = 0; dt < DT; dt += 2) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, frag_addr_rows_m<D>(cK, kk * 16, dt * 8, lane));
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<T>(dq[mt][dt], a[mt], b0);
          mma_16x8x16<T>(dq[mt][dt + 1], a[mt], b1);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing in flight at exit (the no-key case issued Q and dO only)

  const float scale = float(p.scale);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = warp_row + mt * 16 + g + rr * 8;
      if (row >= mq) continue;
      T* dst = static_cast<T*>(p.dq) + b * p.o_strides[0] + (s.q_start + i0 + row) * p.o_strides[1] +
               h * p.o_strides[2];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * t) =
            pack2<T>(dq[mt][dt][2 * rr] * scale, dq[mt][dt][2 * rr + 1] * scale);
    }
  }
#endif
}

template <typename T, int D, int MK, bool AtomicDQ = false, bool Mods = false>
void launch_dk_dv(const AttnParams& p, const float* delta, float scale_log2, int device, cudaStream_t stream,
                  float* dq_accum = nullptr) {
  using Tile = BwdKVTile<D, MK, AtomicDQ>;
  constexpr auto kernel = flash_attn_bwd_dk_dv_mma_kernel<T, D, MK, AtomicDQ, Mods>;
  opt_in_dynamic_smem<kernel>(Tile::kSmemBytes, device, "the backward's dk_dv kernel");
  const dim3 grid(unsigned((p.seqlen_k + Tile::kBlockN - 1) / Tile::kBlockN), unsigned(p.n_kv_heads),
                  unsigned(p.batch));
  kernel<<<grid, kBwdMmaThreads, Tile::kSmemBytes, stream>>>(p, delta, scale_log2, dq_accum);
  PYLLM_CUDA_CHECK_LAUNCH("flash_attn_bwd_dk_dv_mma_kernel");
}

// dq = scale * dq_accum in dq's dtype and layout, 4 elements per thread: every row of
// (rows_q, n_heads), rows_q being batch * seqlen_q or, varlen, the packed total (rows in no
// sequence were never added to: zeros, as the caller's dq holds there).
template <typename T>
__global__ void flash_attn_dq_from_accum_kernel(const AttnParams p, const float* __restrict__ dq_accum,
                                                int64_t rows_q) {
  const int D = int(p.head_dim);
  const int64_t n4 = rows_q * p.n_heads * D / 4;
  const float scale = float(p.scale);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * 4, row = e / D / p.n_heads;
    const int h = int(e / D % p.n_heads), d = int(e % D);
    const int64_t b = p.cu_seqlens_q ? 0 : row / p.seqlen_q, token = p.cu_seqlens_q ? row : row % p.seqlen_q;
    const float4 x = reinterpret_cast<const float4*>(dq_accum)[i];
    T* dst = static_cast<T*>(p.dq) + b * p.o_strides[0] + token * p.o_strides[1] + h * p.o_strides[2] + d;
    reinterpret_cast<uint32_t*>(dst)[0] = pack2<T>(x.x * scale, x.y * scale);
    reinterpret_cast<uint32_t*>(dst)[1] = pack2<T>(x.z * scale, x.w * scale);
  }
}

template <typename T>
void launch_dq_from_accum(const AttnParams& p, const float* dq_accum, int64_t rows_q, cudaStream_t stream) {
  const int64_t n4 = rows_q * p.n_heads * p.head_dim / 4;
  if (n4 == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n4 + kThreads - 1) / kThreads, 8192);  // grid-stride past that
  flash_attn_dq_from_accum_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(p, dq_accum, rows_q);
  PYLLM_CUDA_CHECK_LAUNCH("flash_attn_dq_from_accum_kernel");
}

template <typename T, int D, int MT, bool Mods = false>
void launch_dq(const AttnParams& p, const float* delta, float scale_log2, int device, cudaStream_t stream) {
  using Tile = BwdQTile<D, MT>;
  constexpr auto kernel = flash_attn_bwd_dq_mma_kernel<T, D, MT, Mods>;
  opt_in_dynamic_smem<kernel>(Tile::kSmemBytes, device, "the backward's dq kernel");
  const dim3 grid(unsigned((p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM), unsigned(p.n_heads),
                  unsigned(p.batch));
  kernel<<<grid, kBwdMmaThreads, Tile::kSmemBytes, stream>>>(p, delta, scale_log2);
  PYLLM_CUDA_CHECK_LAUNCH("flash_attn_bwd_dq_mma_kernel");
}

template <typename T, int D>
void launch_bwd_mma_d(const AttnParams& p, const float* delta, int device, cudaStream_t stream, float* dq_accum,
                      int64_t rows_q) {
  const float scale_log2 = float(p.scale * 1.4426950408889634);
  // Capped and biased scores, dropout: their own instances of the default tiles (ScoreMod, Dropout;
  // flash_attn_bwd_cuda passes no dq_accum with them).
  if (has_score_mods(p) || has_dropout(p)) {
    if (p.seqlen_k > 0) launch_dk_dv<T, D, 1, false, true>(p, delta, scale_log2, device, stream);
    if (p.seqlen_q > 0) launch_dq<T, D, 1, true>(p, delta, scale_log2, device, stream);
    return;
  }
  if constexpr (D == 64 || D == 128) {  // the atomic dQ variant: D = 64 / 128, sm_90 (atomic_dq_available)
    if (dq_accum) {
      // Zeroed here, on the stream: the dk_dv CTAs of every key block add into it.
      PYLLM_CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, size_t(rows_q * p.n_heads * D) * sizeof(float), stream));
      if (p.seqlen_k > 0) launch_dk_dv<T, D, 1, true>(p, delta, scale_log2, device, stream, dq_accum);
      launch_dq_from_accum<T>(p, dq_accum, rows_q, stream);
      return;
    }
  }
  if (p.seqlen_k > 0) {
    if constexpr (D == 64) {  // the taller tiles exist at D = 64 only (BwdKVTile)
      if (tall_tiles(device, "PYLLM_ATTN_BWD_DKV_BLOCK_N") == 2)
        launch_dk_dv<T, D, 2>(p, delta, scale_log2, device, stream);
      else
        launch_dk_dv<T, D, 1>(p, delta, scale_log2, device, stream);
    } else {
      launch_dk_dv<T, D, 1>(p, delta, scale_log2, device, stream);
    }
  }
  if (p.seqlen_q > 0) {
    if constexpr (D == 64 || D == 128) {  // likewise at D = 64 / 128 (BwdQTile)
      if (tall_tiles(device, "PYLLM_ATTN_BWD_DQ_BLOCK_M") == 2)
        launch_dq<T, D, 2>(p, delta, scale_log2, device, stream);
      else
        launch_dq<T, D, 1>(p, delta, scale_log2, device, stream);
    } else {
      launch_dq<T, D, 1>(p, delta, scale_log2, device, stream);
    }
  }
}

template <typename T>
void dispatch_bwd_mma(const AttnParams& p, const float* delta, int device, cudaStream_t stream, float* dq_accum,
                      int64_t rows_q) {
  dispatch_head_dim(p.head_dim, [&](auto d) {
    launch_bwd_mma_d<T, decltype(d)::value>(p, delta, device, stream, dq_accum, rows_q);
  });
}

bool atomic_dq_available(int64_t head_dim, int device) {
  return (head_dim == 64 || head_dim == 128) && runs_sm90_code(device);
}

void launch_bwd_mma(const AttnParams& p, const float* delta, int device, cudaStream_t stream, float* dq_accum,
                    int64_t rows_q) {
  if (p.dtype == int(DType::f16))
    dispatch_bwd_mma<__half>(p, delta, device, stream, dq_accum, rows_q);
  else
    dispatch_bwd_mma<__nv_bfloat16>(p, delta, device, stream, dq_accum, rows_q);
}

}  // namespace attn
}  // namespace pyllm
