// FlashAttention forward and backward for bf16 on Intel AMX tiles (TDPBF16PS), chosen at run time by
// flash_attn.cpp for bf16 inputs when flash_attn_amx_usable(): the CPU has AMX-BF16 (cpuid) and
// Linux grants this process the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), asked once
// per process). PYLLM_ATTN_CPU_AMX=0 turns it off. This file alone is compiled with -mamx-tile
// -mamx-bf16 (CMakeLists.txt); without AVX512_BF16 in the build's -march it is a stub.
// Dropout (dropout_p) runs here too, with flash_attn.cpp's masks (dropout_kept below); softcap and
// ALiBi do not (flash_attn.cpp's tiles take those calls).
//
// Algorithm: flash_attn.cpp's forward (its header), same work items (sequence, head, block of
// kBlockQ = 64 queries), same transposed score tile St[key][query] and the same fp32 online
// softmax down its columns (lse = m + log l by log_block), with the two block matmuls on tiles:
//   St = K_blk Q_blk^T:  C tile St[16 keys][16 queries] fp32 += A K[16 keys][32 d] bf16 (K rows as
//                        they are) x B Qp[16 d-pairs][16 queries] (Q in the VNNI pair layout:
//                        Qp[d2][q] = (q[2 d2], q[2 d2 + 1])); the softmax scale is applied in fp32 after,
//                        folded into the exponent: P = 2^(St scale log2(e) - m log2(e)), one fmsub
//                        and a degree-4 exp2 (exp2_block) per 16 scores, the block max taken of the
//                        raw St (a negative scale flips Q's sign bits instead, exact in bf16).
//   O^T += V_blk^T P^T:  C tile O^T[16 d][16 queries] fp32 += A V^T[16 d][32 keys] bf16 x B
//                        Pp[16 key pairs][16 queries] with Pp[j2][q] = (P[q][2 j2], P[q][2 j2 + 1]):
//                        P rounded to bf16 (nearest even, vcvtne2ps2bf16) as flash-attn's GPU
//                        kernels do, while the row sums l take the fp32 P. O^T, not O: its columns
//                        are queries, like St's, so the online-softmax correction is a vector
//                        multiply per row of O^T, and the P^T pairs come from two rows of St by one
//                        conversion and one permute per 32 values. O^T is transposed once, at the end.
// Each matmul runs in 2 x 2 blocks of C tiles (tmm0-3), with two A (tmm4-5) and two B (tmm6-7)
// tiles per 32-wide reduction step: 4 TDPBF16PS per 4 tile loads. Every tile is 16 rows x 64
// bytes (one config for all 8); partial blocks are zero-padded (K rows, V^T columns, P^T pairs
// past the last key, Q pairs past the last query), so padding contributes exact zeros.
// Memory: K of the (sequence, kv head) is kept as bf16 rows and V as bf16 V^T blocks, packed once
// per thread the first time one of its query blocks needs them (2 * Tk * D * 2 bytes, kept across
// calls); per key block the tiles read K (kAmxBlockK x D x 2 bytes), V^T (the same), Q pairs
// (64 x D x 2) and P^T pairs (kAmxBlockK x 64 x 2), write St (kAmxBlockK x 64 x 4, read back by
// the softmax), and load and store O^T (D x 64 x 4). Per thread: Qp 64 x D x 2, two St buffers
// 2 x 32 KB, two Pp buffers 2 x 16 KB, O^T D x 64 x 4 bytes (32 KB at D = 128), all 64-byte
// aligned (TileBuffer). Items go to threads in chunks of up to one head's query blocks, so that
// a thread packs the K / V of fewer heads.
// Ordering: software-pipelined over key blocks. In the max pass and exp loop of block k, the tile
// unit runs the scores of block k + 1 (into the other St buffer) and then O^T += V^T P^T of block
// k - 1 (from the other Pp buffer), one 2 x 2 step (MatmulSteps) every few iterations:
// the tiles and the vector units then work at the same time (a loop of dp_2x2 steps with 128
// independent vector FMAs between them took the time of the tiles alone). O^T is rescaled for
// block k after its loop, once block k - 1's P V is in. The next block's scores come first, so
// the max pass's vector loads do not wait on tile stores just issued; and O^T is rescaled lazily
// (kRescaleSlack), since the vector rescale and the next tile loads of the same O^T waited on
// each other (perf, eager rescale: ~40% of the kernel's samples in the P V tiles, ~10% in the
// rescale, for a quarter of the FLOPs each).
// Determinism: every output is summed by one work item in a fixed order of tiles and blocks: the
// same bits for any thread count.
// Tried, not kept (forward; 1 thread, thread CPU time, min over 8 interleaved processes of 3 calls,
// 2026-11-30, same bits): the pipeline above carried across work items (the next item's first
// scores during the last block's softmax, the last block's P V during the next item's first one,
// Q / O^T / m / l in two slots, items taken from an atomic counter so that the next one is known):
// level or slower, 64n512 1.41 -> 1.47 ms, 128n512 2.35 -> 2.37, 64n1024 4.51 -> 4.68, 128n1024
// 7.59 -> 7.67, 64n4096 63.3 -> 66.2, 128n4096 117.4 -> 121.8. The tile work it hides is real
// (doing the first block's scores and the last block's P V twice: ~6-10% more time at T = 512 /
// 1024), but the loop it moves into is tile-bound (perf, 64n512: most of the kernel's samples on
// tileloadd / tdpbf16ps): more tile steps per softmax lengthen it by as much. Tile steps in the
// masked (diagonal) max pass too: causal level or slower (64c512 1.72 -> 1.87 ms, 128c512 2.72 ->
// 3.10, 3 noisy rounds).
//
// Backward: flash_attn.cpp's (FlashAttention-2, P recomputed from the saved lse; its work items,
// (sequence, kv head, chunk of queries), key blocks of kBlockK = 64 and query blocks of kBlockQ =
// 64, dK, dV of a key block complete when its loop ends, dQ accumulated per thread, chunk partials
// as there) with its five block matmuls on tiles, all in the forward's key x query orientation:
//   S^T = K Q^T, dP^T = V dO^T:  A = K / V rows [key][d], B = Q / dO as pairs along d [d2][query];
//                                P^T = exp(scale S^T - lse), dS^T = P^T (dP^T - delta) in fp32, down
//                                columns as the forward's softmax (lse, delta: vectors of queries);
//   dV += P^T dO, dK += dS^T Q:  A = P^T / dS^T as bf16 rows [key][query], B = dO / Q as pairs of
//                                queries [q2][d]; dK is scaled once when it is written;
//   dQ^T += K^T dS^T:            A = K^T [d][key], B = dS^T as pairs of keys [k2][query] (the forward's
//                                P^T pairs, from the same conversion as the dS^T rows); dQ^T per query
//                                block, transposed and scaled once at the end.
// P and dS are rounded to bf16 (nearest even) for their matmuls, as flash-attn's GPU kernels do;
// S, dP, the softmax and every accumulator stay fp32 (worst error / test tolerance 0.19-0.34 vs
// 0.14-0.25 on fp32 tiles, tests/test_flash_attn.py's AMX shapes). Padding queries of a partial
// block get lse = +inf (P = dS = 0); padding keys are zero rows of K, V and zero P, dS pairs.
// Memory per thread: per query block of the item's queries (group x chunk) Q and dO in two pair
// layouts (4 x 64 x D x 2 bytes) and dQ^T (64 x D x 4): 96 KB at D = 128, 6 MB at T = 4096, as the
// fp32 backward's three fp32 rows; per key block K, V, K^T (3 x 64 x D x 2), dK, dV (2 x 64 x D x
// 4), S^T, dP^T (2 x 16 KB), P^T, dS^T rows and dS^T pairs (3 x 8 KB).
// Measured (2026-11-30, the Intel Xeon VM, 1 thread, thread CPU time; the VM was shared with two
// other jobs, so +-30%): bf16 forward + backward vs SDPA in one process, B = 1, H = 8, T = 1024 /
// 2048 / 4096, D = 64 / 128, causal or not: 1.25-2.22x (0.48-1.10x with this file's backward
// off, i.e. on flash_attn.cpp's fp32 tiles), before the 64-byte alignment of its buffers, which
// then took the backward to 0.70-0.75x the time (TileBuffer); 400-440 GFLOP/s at T = 1024,
// D = 128. Where its time went before that fix (T = 1024, D = 128, non-causal, 31 ms; each part
// left out in turn): S^T and dP^T tiles 9 ms, dV and dK tiles 12, dQ^T tiles 5.5, the vector pass
// 4, packing and the rest 6. Tile primitives alone (aligned buffers, hot L1): TDPBF16PS 8.7 ns
// (1.9 TFLOP/s), a tile load 4-4.5 ns, a store 8 ns; matmul_tiles of the S^T shape (64 x 64,
// K = D = 128, zeroed C) 1.4 TFLOP/s, of the dV shape (64 x 128 C loaded and stored, K = 64
// queries) 0.94, and 0.51 with its B and C cycling through 16 blocks (L2), as the sweep over a key
// block's query blocks does: the gradient matmuls pay for their C tiles' loads and stores.
// Tried, no gain measurable here (unaligned buffers): key blocks 4 at a time per sweep of the query
// blocks (each query block's operands reused for 4 key blocks; T = 2048 / 4096, bitwise the same
// results); scores one pair ahead and the gradient matmuls one pair behind (double buffers) in a
// micro-benchmark. With aligned buffers (1 thread, quiet machine, min of 3 interleaved runs,
// same bits): a software pipeline, pair n + 1's S^T, dP^T and pair n - 1's gradient matmuls in
// steps spread over pair n's vector pass (as the forward's), level (T = 1024 D = 128 24.0 vs
// 24.1 ms, T = 4096 D = 128 344 vs 341, T = 2048 D = 64 causal 26.0 vs 26.5): the vector pass is
// not what the tiles wait for. Two query blocks per step (dV, dK reducing over 128 queries per
// load and store of C: 0.8-0.85x the time of two 64-query ones in a micro-benchmark; same bits):
// mixed, not kept (T = 1024 D = 128 21.7 vs 23.7 ms, T = 4096 D = 128 361 vs 343, T = 512 D = 64
// and T = 2048 D = 64 causal level or slower; min of 3 interleaved runs).
#include "cpu/flash_attn.h"

#if defined(__linux__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PYLLM_AMX 1
#endif

#ifdef PYLLM_AMX
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <new>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <vector>

#include "common/counter_rng.h"
#include "common/cpu_math.h"
#endif
#include "common/checks.h"

namespace pyllm {

#ifndef PYLLM_AMX

bool flash_attn_amx_usable() { return false; }
void flash_attn_fwd_amx(const AttnParams&) { PYLLM_CHECK(false, "flash_attn: this build has no AMX forward"); }
void flash_attn_bwd_amx(const AttnParams&) { PYLLM_CHECK(false, "flash_attn: this build has no AMX backward"); }

#else

namespace {

// Keys per block: each P V block accumulates kAmxBlockK / 32 TDPBF16PS per load and store of its
// O^T tiles. Speed vs SDPA in one process (2026-11-30, the VM of the header, 1 thread, lazy
// rescale, T = 1024 / 2048 / 4096, D = 64 / 128, causal or not; 64 / 128 / 256 keys): 128 was
// ahead of 64 in 9 of the 12 rows of the later runs (0.90 -> 1.08 at T = 4096 D = 128, 0.85 -> 0.96 at
// T = 2048 D = 64; behind on T = 4096 D = 64 causal, 1.02 -> 0.91), level in the first run (T <=
// 2048); 256 no better than 128, and behind on causal D = 128 (0.85 vs 1.27 at T = 1024: twice as
// wide diagonal blocks). Noise between runs here: +-15%.
constexpr int64_t kAmxBlockK = 128;
static_assert(kAmxBlockK % 32 == 0 && kBlockQ == 64, "2 x 2 blocks of 16 x 16 tiles, 32-wide reduction steps");

// The running max m of a query moves only when a block's max exceeds it by more than this (a lazy
// rescale, in units of the scaled scores): P = exp(S - m) is then at most e^8 ~ 3000, far from
// overflowing fp32 or bf16 (and bf16 rounds it with the same relative error), and O^T is rescaled
// by vectors a few times per query block instead of at almost every key block; out = O / l and
// lse = m + log(l) hold for any such m. Against the eager rescale (slack 0, 64-key blocks, same
// process, 1 thread, the 12 shapes of kAmxBlockK): 1.01-1.42x the speed, median ~1.06x.
constexpr float kRescaleSlack = 8.0f;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every thread that runs tiles loads its own configuration (it is per-thread state).
inline void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// Both matmuls below run in 2 x 2 blocks of C tiles tmm0-3: C rows r, r + 16 x columns q, q + 16,
// fp32, rows ldc floats apart. One 32-wide reduction step: A rows a, a + 16 rows (tmm4-5, bf16,
// lda bytes apart; a16 = the second one) times B pairs b, b + 16 columns (tmm6-7, ldb bytes).
inline void load_c_2x2(const float* c, int64_t ldc) {
  _tile_loadd(0, c, ldc * 4);
  _tile_loadd(1, c + 16, ldc * 4);
  _tile_loadd(2, c + 16 * ldc, ldc * 4);
  _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
}
inline void store_c_2x2(float* c, int64_t ldc) {
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}
inline void dp_2x2(const uint16_t* a, const uint16_t* a16, int64_t lda, const uint32_t* b, int64_t ldb) {
  _tile_loadd(4, a, lda);
  _tile_loadd(5, a16, lda);
  _tile_loadd(6, b, ldb);
  _tile_loadd(7, b + 16, ldb);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// Every buffer the tiles load or store is a TileBuffer (flash_attn.h): 64-byte aligned.

inline int64_t round_up32(int64_t n) { return (n + 31) / 32 * 32; }

// C[M][N] (+)= A[M][K] B[K][N] on tiles, M, N and K multiples of 32: A bf16, rows lda elements
// apart; B as pairs along K, [K / 2][N] uint32, rows ldb apart; C fp32, rows ldc apart, zeroed
// first unless accumulate. One 2 x 2 reduction step (dp_2x2: 4 tile loads, 4 TDPBF16PS) per
// step(), so that fwd_amx's softmax loop can interleave its two matmuls with its vector work (see
// there); one such matmul at a time holds tmm0-7.
struct MatmulSteps {
  const uint16_t* a = nullptr;
  const uint32_t* b = nullptr;
  float* c = nullptr;
  int64_t M = 0, N = 0, K = 0, lda = 0, ldb = 0, ldc = 0, m = 0, n = 0, k = 0;
  bool accumulate = false;
  void start(int64_t M_, int64_t N_, int64_t K_, const uint16_t* a_, int64_t lda_, const uint32_t* b_, int64_t ldb_,
             float* c_, int64_t ldc_, bool accumulate_) {
    M = M_, N = N_, K = K_, a = a_, lda = lda_, b = b_, ldb = ldb_, c = c_, ldc = ldc_, accumulate = accumulate_;
    m = n = k = 0;
  }
  int64_t steps() const { return (M - m) / 32 * (N / 32) * (K / 32); }  // at start
  bool done() const { return m >= M; }
  void step() {
    float* cb = c + m * ldc + n;
    if (k == 0) {
      if (accumulate) {
        load_c_2x2(cb, ldc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
    }
    dp_2x2(a + m * lda + k, a + (m + 16) * lda + k, lda * 2, b + k / 2 * ldb + n, ldb * 4);
    if ((k += 32) < K) return;
    store_c_2x2(cb, ldc);
    k = 0;
    if ((n += 32) == N) n = 0, m += 32;
  }
  void finish() {
    while (!done()) step();
  }
};

// The forward's two block matmuls. St[kAmxBlockK][kBlockQ] = K Qp for the key tiles up to nk
// (rounded up to 32): k holds the block's keys as bf16 rows of D, zero past nk; qp the queries'
// pairs, Qp[d2][q], zero past the last query.
template <int D>
inline void start_scores(MatmulSteps& mm, int64_t nk, const uint16_t* k, const uint32_t* qp, float* st) {
  mm.start(round_up32(nk), kBlockQ, D, k, D, qp, kBlockQ, st, kBlockQ, false);
}
// O^T[D][kBlockQ] += V^T Pp over the key pairs up to nk (rounded up to 32 keys): vt holds V^T of the
// block, [D][kAmxBlockK] bf16, zero past nk; pp the P^T pairs, [kAmxBlockK / 2][kBlockQ], zero past nk.
template <int D>
inline void start_pv(MatmulSteps& mm, int64_t nk, const uint16_t* vt, const uint32_t* pp, float* ot) {
  mm.start(D, kBlockQ, round_up32(nk), vt, kAmxBlockK, pp, kBlockQ, ot, kBlockQ, true);
}

// bf16 pairs (x[2 j2][q], x[2 j2 + 1][q]) from the 32 bf16 of vcvtne2ps2bf16(row 2 j2 + 1, row 2 j2),
// whose low half is row 2 j2, by one permute: the forward's P^T pairs, the backward's dS^T pairs.
inline __m512i pair_interleave() {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(kInterleave);
}

// 2^t for the softmax: cpu_math.h's avx512::exp2 (t = n + r with n = floor(t), r in [0, 1) by
// vreduceps, exact, 2^r by a polynomial, vscalefps by 2^n saturating to 0 and inf; t = -inf (a
// masked score) gives exactly 0, NaN stays NaN), degree 4: max relative error in fp32 3.0e-6
// (degree 5 1.6e-7; avx512::exp<5>, used before: 2.4e-6). Degree 4: the tests' error / tolerance unchanged to 3 digits (0.11-0.29 of it, out).
// Against the former softmax (scaled St stored back by the max pass, then exp<5> of x - m with its
// clamps and a -inf compare: ~20 vector ops per 16 scores, now ~10), 1 thread, thread CPU time,
// min of 3 x 5 interleaved (2026-11-30): 0.81-0.88x the time on 10 of the 11 bench rows (64n4096
// 106.8 -> 87.5 ms, 128n2048 42.0 -> 37.0 ms), 128n512 level (15.4 / 16.0 ms, noise).
inline __m512 exp2_block(__m512 t) { return avx512::exp2<4>(t); }

// 16 x 16 transpose of 32-bit lanes in registers: four rounds of vpermt2d, each interleaving
// register i with register i + 8 into registers 2 i and 2 i + 1, rotate the 8-bit (register, lane)
// index by one bit, so that after four register c holds column c (as pack_transposed's 32 x 32).
inline void transpose_16x16_u32(__m512i (&x)[16]) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int round = 0; round < 4; ++round) {
    __m512i y[16];
    for (int i = 0; i < 8; ++i) {
      y[2 * i] = _mm512_permutex2var_epi32(x[i], lo, x[i + 8]);
      y[2 * i + 1] = _mm512_permutex2var_epi32(x[i], hi, x[i + 8]);
    }
    for (int i = 0; i < 16; ++i) x[i] = y[i];
  }
}

// A query block's pairs along D (Q in the forward, Q and dO in the backward), qp[d2][r] =
// (x[r][2 d2], x[r][2 d2 + 1]) with sign_bits xor-ed in, columns rows..kBlockQ zero: flash_attn.h's
// pack_pairs_transposed, 16 x 16 pairs at a time
// (one 4-byte store per pair took ~5% of the forward's samples at T = 512, perf, 1 thread).
// With fwd_amx's output by 16 x 16 transposes too (gathers before): 0.88-0.99x the time on 5 rows
// (128n1024 17.3 -> 15.2 ms, 64n512 5.6 -> 5.5; 1 thread, interleaved, 2026-11-30), same bits.
template <int D>
inline void pack_pairs_16x16(uint32_t* __restrict qp, const void* base, const int64_t* strides, int64_t b,
                             int64_t start, int64_t h, int64_t rows, uint32_t sign_bits) {
  const __m512i sign = _mm512_set1_epi32(int32_t(sign_bits));
  const uint32_t* src[kBlockQ];
  for (int64_t r = 0; r < rows; ++r)
    src[r] = reinterpret_cast<const uint32_t*>(row_prefetching<D, bf16>(base, strides, b, start, h, r, rows));
  for (int64_t r0 = 0; r0 < kBlockQ; r0 += 16)
    for (int c0 = 0; c0 < D / 2; c0 += 16) {
      __m512i x[16];
      for (int i = 0; i < 16; ++i)
        x[i] = r0 + i < rows ? _mm512_xor_si512(_mm512_loadu_si512(src[r0 + i] + c0), sign) : _mm512_setzero_si512();
      transpose_16x16_u32(x);
      for (int c = 0; c < 16; ++c) _mm512_store_si512(qp + (c0 + c) * kBlockQ + r0, x[c]);
    }
}

// log(l) for the lse, l > 0: l = f 2^e with f in [0.75, 1.5) (vgetmantps, vgetexpps), log(f) =
// 2 atanh(s) with s = (f - 1) / (f + 1), |s| <= 0.2, by its series to s^9 (truncation < 5e-9). NaN
// stays NaN, +inf gives +inf. Against std::log per query: ~4% of the forward's samples at T = 512
// (perf, 1 thread, 64n512); 0.97-0.98x the time at T = 512 (64n512 5.33 -> 5.16 ms, 128n512 9.86 ->
// 9.68; two interleaved runs agreed), lse within 0.5 ulp of it (2e6 random l over 2^-27..2^32).
inline __m512 log_block(__m512 l) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 f = _mm512_getmant_ps(l, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  // getexp gives floor(log2 l); f < 1 means l = f 2^(e + 1).
  const __m512 e = _mm512_mask_add_ps(_mm512_getexp_ps(l), _mm512_cmp_ps_mask(f, one, _CMP_LT_OQ), _mm512_getexp_ps(l), one);
  const __m512 sv = _mm512_div_ps(_mm512_sub_ps(f, one), _mm512_add_ps(f, one)), s2 = _mm512_mul_ps(sv, sv);
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 9), s2, _mm512_set1_ps(1.f / 7));
  poly = _mm512_fmadd_ps(poly, s2, _mm512_set1_ps(1.f / 5));
  poly = _mm512_fmadd_ps(poly, s2, _mm512_set1_ps(1.f / 3));
  poly = _mm512_fmadd_ps(poly, s2, one);
  const __m512 log_f = _mm512_mul_ps(_mm512_add_ps(sv, sv), poly);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f), log_f);
}

// `rows` tokens x D of one head of a bf16 (B, T, H, D) tensor as bf16 rows of D, rows
// rows..round_up32(rows) zero ...
template <int D>
inline void pack_rows_padded(uint16_t* __restrict dst, const void* base, const int64_t* strides, int64_t b,
                             int64_t start, int64_t h, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * D, row_prefetching<D, bf16>(base, strides, b, start, h, r, rows), D * 2);
  std::memset(dst + rows * D, 0, (round_up32(rows) - rows) * D * 2);
}
// ... or transposed, [D][ld] (columns nk..ld zero; the forward's V^T, the backward's K^T), 32 keys x
// 32 dims at a time: five rounds of vpermt2w, each interleaving register i with register i + 16 into registers 2 i
// and 2 i + 1, rotate the 10-bit (register, lane) index by one bit, so that after five register c
// holds column c. Against one 2-byte store per element (packing K and V was ~10% of the forward
// at T = 512: three more packs per block added 2-3 ms to 64n512's ~7 ms, 1 thread): 0.93-0.97x
// the time at T = 512 (within the noise), same bits; one pack of K and V is now ~0.3 ms of 64n512's
// 5.3 ms and ~0.8 of 128n512's 9.7.
template <int D>
inline void pack_transposed(uint16_t* __restrict dst, int64_t ld, const void* base, const int64_t* strides, int64_t b,
                            int64_t start, int64_t h, int64_t nk) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t r0 = 0; r0 < nk; r0 += 32) {
    const int64_t rows = std::min<int64_t>(32, nk - r0);
    const uint16_t* src[32];
    for (int64_t i = 0; i < rows; ++i)
      src[i] = reinterpret_cast<const uint16_t*>(row_prefetching<D, bf16>(base, strides, b, start, h, r0 + i, nk));
    for (int d0 = 0; d0 < D; d0 += 32) {
      __m512i x[32], y[32];
      for (int i = 0; i < 32; ++i) x[i] = i < rows ? _mm512_loadu_si512(src[i] + d0) : _mm512_setzero_si512();
      for (int round = 0; round < 5; ++round) {
        for (int i = 0; i < 16; ++i) {
          y[2 * i] = _mm512_permutex2var_epi16(x[i], lo, x[i + 16]);
          y[2 * i + 1] = _mm512_permutex2var_epi16(x[i], hi, x[i + 16]);
        }
        for (int i = 0; i < 32; ++i) x[i] = y[i];
      }
      for (int c = 0; c < 32; ++c) _mm512_store_si512(dst + (d0 + c) * ld + r0, x[c]);
    }
  }
  const int64_t padded = round_up32(nk);
  if (padded < ld)
    for (int d = 0; d < D; ++d) std::memset(dst + d * ld + padded, 0, (ld - padded) * 2);
}

// Dropout (attn_params.h; common/counter_rng.h's AttnDropoutKey, the words flash_attn.cpp's tiles and
// the CUDA kernels draw): the lanes of 16 queries (their row hashes) that keep one key (its column
// hash). mix32 on 16 lanes, ~9 vector integer ops per 16 scores. As the fp32 tiles: the forward
// drops P after the row sums and scales the output once, the backward takes dV over the kept P
// (scaled once) and dS = P (f dP - delta), f = 1 / (1 - p) or 0.
inline __m512i mix32_lanes(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
inline __mmask16 dropout_kept(__m512i row_hashes, uint32_t col_hash, __m512i threshold) {
  return _mm512_cmpge_epu32_mask(mix32_lanes(_mm512_add_epi32(row_hashes, _mm512_set1_epi32(int(col_hash)))),
                                 threshold);
}

template <int D>
void fwd_amx(const AttnParams& p) {
  constexpr int kQV = kBlockQ / 16;  // vectors per row of St
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(kNegInf), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  // A negative scale is folded into Q as a sign flip (exact in bf16, and every product and tile sum
  // flips with it), so that the scores' max is the raw St's max times a positive scale.
  const bool negate_q = p.scale < 0;
  const float scale_abs = std::fabs(float(p.scale));
  const __m512 scale = _mm512_set1_ps(scale_abs), slack = _mm512_set1_ps(kRescaleSlack);
  const __m512 scale_log2e = _mm512_set1_ps(float(std::fabs(p.scale) * 1.44269504088896341)),
               log2e = _mm512_set1_ps(1.44269504088896341f);
  // Pairs (St[2 j2][q], St[2 j2 + 1][q]) from the 32 bf16 of vcvtne2ps2bf16 (low half: row 2 j2).
  const __m512i interleave = pair_interleave();
  const int64_t qblocks = fwd_qblocks(p), items = p.batch * p.n_heads * qblocks;
  float* lse_out = static_cast<float*>(p.lse);
#pragma omp parallel if (items > 1)
  {
    load_tile_config();
    TileBuffer<uint32_t> qp(D / 2 * kBlockQ), pp(2 * kAmxBlockK / 2 * kBlockQ);
    TileBuffer<float> st(2 * kAmxBlockK * kBlockQ), ot(D * kBlockQ);
    // K rows and V^T blocks of the (sequence, kv head) this thread last worked on, packed block by
    // block as its query blocks first need them (as flash_attn.cpp's forward; kept across calls).
    static thread_local TileBuffer<uint16_t> k_seq, vt_seq;
    std::vector<char> packed;
    int64_t packed_b = -1, packed_hk = -1;
    alignas(64) float m[kBlockQ], l[kBlockQ], corr[kBlockQ];
    QueryBounds bounds;
    MatmulSteps scores, pv;  // start_scores / start_pv
    const bool drop = has_dropout(p);
    const __m512i drop_threshold = _mm512_set1_epi32(int(p.dropout_threshold));
    AttnDropoutKey drop_key;
    alignas(64) uint32_t row_hash[kBlockQ];  // dropout: of the item's queries
    // Chunks of up to a whole (sequence, head) of query blocks, so that each thread packs the K / V
    // of fewer heads (with chunks of one item each of 2 threads packed nearly every head: ~6-8% more
    // work at T = 512, from the pack times at pack_transposed), and still 16 chunks per thread for
    // the balance (the last one leaves the others idle). Not timed: 2-thread wall times on this
    // shared VM (load 3-5 on 2 cores) varied 2x between runs.
#ifdef _OPENMP
    const int64_t threads = omp_get_num_threads();
#else
    const int64_t threads = 1;
#endif
    const int64_t chunk = std::max<int64_t>(1, std::min(qblocks, items / (16 * threads)));
#pragma omp for schedule(dynamic, chunk)
    for (int64_t item = 0; item < items; ++item) {
      const FwdItem it = fwd_item(p, item, qblocks);
      if (it.mq <= 0) continue;
      const int64_t b = it.b, h = it.h, hk = it.hk, i0 = it.i0, mq = it.mq;
      const SeqInfo& s = it.s;
      if (b != packed_b || hk != packed_hk) {
        packed_b = b, packed_hk = hk;
        const int64_t kblocks = (s.len_k + kAmxBlockK - 1) / kAmxBlockK;
        if (k_seq.size() < size_t(kblocks * kAmxBlockK * D)) {
          grow_to(k_seq, kblocks * kAmxBlockK * D);
          grow_to(vt_seq, kblocks * kAmxBlockK * D);
        }
        packed.assign(kblocks, 0);
      }
      pack_pairs_16x16<D>(qp.data(), p.q, p.q_strides, b, s.q_start + i0, h, mq, negate_q ? 0x80008000u : 0u);
      bounds.set(p, s, i0, mq);
      if (drop) {
        drop_key = AttnDropoutKey(p.dropout_seed, b, h);
        for (int r = 0; r < kBlockQ; ++r) row_hash[r] = drop_key.row_hash(i0 + r);
      }
      std::fill(ot.begin(), ot.end(), 0.f);
      std::fill(m, m + kBlockQ, kNegInf);
      std::fill(l, l + kBlockQ, 0.f);
      const KeyBlocks kbs = key_blocks<kAmxBlockK>(p, s, i0, mq);
      // Key block kblk's scores go to St buffer kblk % 2, computed one block ahead: the next block's
      // tile stores then have the whole softmax of this one to land before vector loads read them
      // (against computing each block's scores just before its softmax: mean speed vs SDPA over
      // T = 2048 / 4096, D = 64 / 128, causal or not, two runs each, 1.16x vs 1.08x; per row within
      // the noise).
      auto block_keys = [&](int64_t kblk) { return std::min(kAmxBlockK, s.len_k - kblk * kAmxBlockK); };
      // The keys of block kblk that the tiles and the softmax go over: none past the 64-key block
      // (kBlockK) holding the item's last seen key. Keys after it are masked for every query of the
      // item (P = 0); with Tq = Tk causal every other query block's diagonal key block is half such
      // keys (~10% of the causal work at T = 512, ~5% at 1024). Stopping on kBlockK boundaries goes
      // over the same keys on the right as flash_attn.cpp's forward: a NaN or inf in V of a key
      // past them no longer reaches the output (before, V[100] = NaN, T = 128 causal, turned the
      // bf16 output of queries 0..63 to NaN, the fp32 one not); every finite output is the same bit
      // for bit (P = 0 added nothing). 1 thread, thread CPU time, min over 5-10 interleaved
      // processes (2026-11-30): 64c512 1.01 -> 0.93 ms (0.92-0.94x on 5 repeats), 128c512 1.80 ->
      // 1.68 (0.93-0.98x), 64c1024 / 128c1024 0.97-0.99x, T = 4096 and non-causal level (0.98-1.02x
      // on repeat, one 64n512 run at 1.06x that 10 x 10 calls put at 1.00x).
      const int64_t keys_end = std::min(s.len_k, (key_hi(p, i0 + mq - 1, s.len_q, s.len_k) + kBlockK - 1) / kBlockK * kBlockK);
      auto keys_used = [&](int64_t kblk) { return std::min(kAmxBlockK, keys_end - kblk * kAmxBlockK); };
      auto ensure_packed = [&](int64_t kblk) {
        if (packed[kblk]) return;
        const int64_t j0 = kblk * kAmxBlockK, nk = block_keys(kblk);
        pack_rows_padded<D>(k_seq.data() + j0 * D, p.k, p.k_strides, b, s.k_start + j0, hk, nk);
        pack_transposed<D>(vt_seq.data() + j0 * D, kAmxBlockK, p.v, p.v_strides, b, s.k_start + j0, hk, nk);
        packed[kblk] = 1;
      };
      if (kbs.first < kbs.end) {
        ensure_packed(kbs.first);
        start_scores<D>(scores, keys_used(kbs.first), k_seq.data() + kbs.first * kAmxBlockK * D, qp.data(),
                     st.data() + (kbs.first % 2) * kAmxBlockK * kBlockQ);
        scores.finish();
      }
      for (int64_t kblk = kbs.first; kblk < kbs.end; ++kblk) {
        const int64_t j0 = kblk * kAmxBlockK, nk = keys_used(kblk);
        // The tile loads below read what vector stores wrote (P, O^T): GCC's tile-load intrinsics
        // are asm without a memory clobber, so no store may be moved past them.
        asm volatile("" ::: "memory");
        if (kblk + 1 < kbs.end) {
          ensure_packed(kblk + 1);
          start_scores<D>(scores, keys_used(kblk + 1), k_seq.data() + (kblk + 1) * kAmxBlockK * D, qp.data(),
                       st.data() + ((kblk + 1) % 2) * kAmxBlockK * kBlockQ);
        }
        if (kblk > kbs.first)
          start_pv<D>(pv, keys_used(kblk - 1), vt_seq.data() + (kblk - 1) * kAmxBlockK * D,
                   pp.data() + ((kblk - 1) % 2) * kAmxBlockK / 2 * kBlockQ, ot.data());
        float* __restrict S = st.data() + (kblk % 2) * kAmxBlockK * kBlockQ;
        // The block's max per query, of the raw scores (the scale is positive, see negate_q); masked
        // blocks (the diagonal ones) first set their masked scores to -inf. The max skips NaN (vmaxps
        // returns its second operand then), as flash_attn.cpp's: a NaN must not poison the other
        // queries' running max.
        const bool masked = !block_unmasked<kAmxBlockK>(p, s, i0, mq, j0);
        const int64_t units = (masked ? 0 : nk) + 8 * ((nk + 1) / 2), tile_steps = scores.steps() + pv.steps();
        int64_t credit = 0;
        // The block's tile steps (the next block's scores, then the previous block's P V) are spread
        // over its max pass and exp loop in proportion to their vector work, a max row counted 1 and
        // an exp iteration (two rows) 8: the tiles and the vector units then work at the same time
        // (a loop of dp_2x2 steps with 128 independent vector FMAs between them took the time of the
        // tiles alone). The next block's scores go first: their stores then have the rest of the
        // block to land before its max pass loads them. Against both matmuls between the softmaxes
        // (1 thread, thread CPU time, min of interleaved runs, 2026-11-30), exp loop only: 0.84-0.96x
        // the time on 8 rows (64n512 7.76 -> 6.41 ms, 128n2048 29.1 -> 27.3, 128n4096 122.6 ->
        // 117.3); the max pass too: D = 64 0.91-0.96x (64n2048 17.3 -> 16.6), D = 128 level; weights
        // 4 and 16 for an exp iteration within the noise of 8. Same bits either way.
        auto tile_work = [&](int64_t u) {
          for (credit += u * tile_steps; credit >= units; credit -= units) {
            if (!scores.done())
              scores.step();
            else if (!pv.done())
              pv.step();
          }
        };
        __m512 blk[kQV], m_use[kQV], m_log2e[kQV], sum[kQV];
        for (int v = 0; v < kQV; ++v) blk[v] = ninf;
        if (masked) {
          __m512i lo[kQV], hi[kQV];
          for (int v = 0; v < kQV; ++v) {
            lo[v] = _mm512_loadu_si512(bounds.lo + v * 16);
            hi[v] = _mm512_loadu_si512(bounds.hi + v * 16);
          }
          for (int64_t j = 0; j < nk; ++j) {
            float* __restrict row = S + j * kBlockQ;
            const __m512i key = _mm512_set1_epi32(int32_t(j0 + j));
#pragma GCC unroll 4
            for (int v = 0; v < kQV; ++v) {
              const __mmask16 seen = _mm512_cmpge_epi32_mask(key, lo[v]) & _mm512_cmplt_epi32_mask(key, hi[v]);
              const __m512 x = _mm512_mask_mov_ps(ninf, seen, _mm512_loadu_ps(row + v * 16));
              _mm512_storeu_ps(row + v * 16, x);
              blk[v] = _mm512_max_ps(x, blk[v]);
            }
          }
        } else {
          for (int64_t j = 0; j < nk; ++j) {
#pragma GCC unroll 4
            for (int v = 0; v < kQV; ++v) blk[v] = _mm512_max_ps(_mm512_loadu_ps(S + j * kBlockQ + v * 16), blk[v]);
            tile_work(1);
          }
        }
        for (int v = 0; v < kQV; ++v) blk[v] = _mm512_mul_ps(blk[v], scale);
        // A query that has seen only masked keys keeps m = -inf; exp is then taken against 0 so that
        // NaN scores still come out as NaN (as flash_attn.cpp's). m moves only when the block's max
        // exceeds it by more than kRescaleSlack (see there).
        for (int v = 0; v < kQV; ++v) {
          const __m512 m_old = _mm512_load_ps(m + v * 16);
          const __mmask16 grows = _mm512_cmp_ps_mask(blk[v], _mm512_add_ps(m_old, slack), _CMP_GT_OQ);
          const __m512 m_new = _mm512_mask_max_ps(m_old, grows, blk[v], m_old);
          m_use[v] = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), zero);
          m_log2e[v] = _mm512_mul_ps(m_use[v], log2e);
          const __mmask16 was_empty = _mm512_cmp_ps_mask(m_old, ninf, _CMP_EQ_OQ);
          _mm512_store_ps(corr + v * 16, _mm512_mask_mov_ps(avx512::exp<5>(_mm512_sub_ps(m_old, m_use[v])), was_empty, zero));
          _mm512_store_ps(m + v * 16, m_new);
          sum[v] = zero;
        }
        // P = exp(scale S - m) = 2^(S scale log2(e) - m log2(e)) in fp32 for the row sums, and as bf16
        // pairs of keys (2 j2, 2 j2 + 1) for P V. Masked (-inf) scores give exactly 0 (exp2_block).
        uint32_t* __restrict P = pp.data() + (kblk % 2) * kAmxBlockK / 2 * kBlockQ;
        for (int64_t j = 0; j < nk; j += 2) {
          const float* r0 = S + j * kBlockQ;
          const float* r1 = S + (j + 1) * kBlockQ;
          const bool second = j + 1 < nk;
          const uint32_t col0 = drop ? drop_key.col_hash(j0 + j) : 0u, col1 = drop ? drop_key.col_hash(j0 + j + 1) : 0u;
#pragma GCC unroll 4
          for (int v = 0; v < kQV; ++v) {
            __m512 p0 = exp2_block(_mm512_fmsub_ps(_mm512_loadu_ps(r0 + v * 16), scale_log2e, m_log2e[v]));
            sum[v] = _mm512_add_ps(sum[v], p0);
            __m512 p1 = zero;
            if (second) {
              p1 = exp2_block(_mm512_fmsub_ps(_mm512_loadu_ps(r1 + v * 16), scale_log2e, m_log2e[v]));
              sum[v] = _mm512_add_ps(sum[v], p1);
            }
            if (drop) {  // after the row sums
              const __m512i rows = _mm512_load_si512(row_hash + v * 16);
              p0 = _mm512_maskz_mov_ps(dropout_kept(rows, col0, drop_threshold), p0);
              p1 = _mm512_maskz_mov_ps(dropout_kept(rows, col1, drop_threshold), p1);
            }
            const __m512i pairs = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            _mm512_storeu_si512(P + j / 2 * kBlockQ + v * 16, pairs);
          }
          tile_work(8);
        }
        scores.finish();
        pv.finish();
        const int64_t pairs_used = (nk + 1) / 2, pairs_padded = (nk + 31) / 32 * 16;
        if (pairs_used < pairs_padded) std::memset(P + pairs_used * kBlockQ, 0, (pairs_padded - pairs_used) * kBlockQ * 4);
        for (int v = 0; v < kQV; ++v) {
          const __m512 c = _mm512_load_ps(corr + v * 16);
          _mm512_store_ps(l + v * 16, _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(l + v * 16), c), sum[v]));
          if (_mm512_cmp_ps_mask(c, one, _CMP_NEQ_UQ)) {
            float* __restrict col = ot.data() + v * 16;
            for (int d = 0; d < D; ++d)
              _mm512_storeu_ps(col + d * kBlockQ, _mm512_mul_ps(_mm512_loadu_ps(col + d * kBlockQ), c));
          }
        }
      }
      if (kbs.first < kbs.end) {
        asm volatile("" ::: "memory");
        start_pv<D>(pv, keys_used(kbs.end - 1), vt_seq.data() + (kbs.end - 1) * kAmxBlockK * D,
                 pp.data() + ((kbs.end - 1) % 2) * kAmxBlockK / 2 * kBlockQ, ot.data());
        pv.finish();
      }
      // out = O / l: O^T scaled by 1 / l per column, transposed 16 x 16 at a time, rounded to bf16.
      // l = 0: the query sees no key (out 0, lse +inf); NaN inputs give l = NaN and stay NaN.
      alignas(64) float inv[kBlockQ], lse_blk[kBlockQ];
      for (int v = 0; v < kQV; ++v) {
        const __m512 lv = _mm512_load_ps(l + v * 16);
        const __mmask16 empty = _mm512_cmp_ps_mask(lv, zero, _CMP_EQ_OQ);
        _mm512_store_ps(inv + v * 16, _mm512_mask_mov_ps(_mm512_div_ps(drop ? _mm512_set1_ps(float(p.dropout_scale)) : one, lv),
                                                          empty, zero));
        _mm512_store_ps(lse_blk + v * 16, _mm512_mask_mov_ps(_mm512_add_ps(_mm512_load_ps(m + v * 16), log_block(lv)),
                                                             empty, _mm512_set1_ps(std::numeric_limits<float>::infinity())));
      }
      for (int64_t r = 0; r < mq; ++r) lse_out[lse_index(p, b, h, s, i0 + r)] = lse_blk[r];
      for (int64_t r0 = 0; r0 < mq; r0 += 16) {
        const __m512 inv_r = _mm512_load_ps(inv + r0);
        for (int d0 = 0; d0 < D; d0 += 16) {
          __m512i x[16];
          for (int i = 0; i < 16; ++i)
            x[i] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(ot.data() + (d0 + i) * kBlockQ + r0), inv_r));
          transpose_16x16_u32(x);
          for (int64_t i = 0; i < std::min<int64_t>(16, mq - r0); ++i) {
            uint16_t* dst = reinterpret_cast<uint16_t*>(at_mut<bf16>(p.out, p.o_strides, b, s.q_start + i0 + r0 + i, h));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d0), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(x[i])));
          }
        }
      }
    }
    _tile_release();
    release_if_large(k_seq, vt_seq);
  }
}


// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// C[M][N] (+)= A[M][K] B[K][N] on tiles, M, N and K multiples of 32: A bf16, rows lda elements
// apart; B as pairs along K, [K / 2][N] uint32, rows ldb apart; C fp32, rows ldc apart.
// A whole MatmulSteps matmul at once. GCC's tile intrinsics are asm without a memory clobber:
// the barriers keep the vector stores of A, B or C before the tile loads, and the vector reads of
// C after the tile stores.
inline void matmul_tiles(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b,
                         int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  asm volatile("" ::: "memory");
  MatmulSteps mm;
  mm.start(M, N, K, a, lda, b, ldb, c, ldc, accumulate);
  mm.finish();
  asm volatile("" ::: "memory");
}

// `rows` tokens of a bf16 (B, T, H, D) tensor as pairs of tokens, dst[r2][d] = (x[2 r2][d], x[2 r2 + 1][d])
// for r2 < kBlockQ / 2 (zero past rows): the backward's B operands of dV and dK.
template <int D>
inline void pack_pairs_of_rows(uint32_t* __restrict dst, const void* base, const int64_t* strides, int64_t b,
                               int64_t start, int64_t h, int64_t rows) {
  for (int64_t r2 = 0; r2 < kBlockQ / 2; ++r2) {
    const int64_t r = 2 * r2;
    const uint16_t* x0 = r < rows ? reinterpret_cast<const uint16_t*>(at<bf16>(base, strides, b, start + r, h)) : nullptr;
    const uint16_t* x1 = r + 1 < rows ? reinterpret_cast<const uint16_t*>(at<bf16>(base, strides, b, start + r + 1, h)) : nullptr;
    for (int d = 0; d < D; d += 16) {
      const __m512i lo = x0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + d))) : _mm512_setzero_si512();
      const __m512i hi = x1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + d))) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + r2 * D + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

template <int D>
void bwd_amx(const AttnParams& p) {
  constexpr int64_t BK = kBlockK;  // keys per block (kBlockK, as the fp32 backward)
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(kNegInf), zero = _mm512_setzero_ps(), scale = _mm512_set1_ps(float(p.scale));
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), scale_log2e = _mm512_set1_ps(float(p.scale * 1.4426950408889634));
  const __m512i interleave = pair_interleave();
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(kBlockQ));
  const int64_t group = p.n_heads / p.n_kv_heads;
  const float* lse = static_cast<const float*>(p.lse);
  const float* dlse = static_cast<const float*>(p.dlse);
  const int64_t chunks = bwd_chunks(p), items = p.batch * p.n_kv_heads * chunks;
  DkvParts<float> parts(p, chunks, D);
  // Per query block of an item (blk = g * blocks + qb): Q and dO as pairs along D ([D / 2][kBlockQ],
  // the B operands of S^T and dP^T), as pairs of queries ([kBlockQ / 2][D], those of dK and dV),
  // dQ^T accumulators [D][kBlockQ], lse and delta. Offsets into the per-thread buffers below.
  constexpr int64_t kPairsD = D / 2 * kBlockQ, kPairsQ = kBlockQ / 2 * D, kDqt = D * kBlockQ;
#pragma omp parallel if (items > 1)
  {
    load_tile_config();
    TileBuffer<uint16_t> kr(BK * D), vr(BK * D), kt(D * BK), pt(BK * kBlockQ), dst(BK * kBlockQ);
    TileBuffer<uint32_t> dsp(BK / 2 * kBlockQ);
    TileBuffer<float> st(BK * kBlockQ), dpt(BK * kBlockQ), dk(BK * D), dv(BK * D);
    static thread_local TileBuffer<uint32_t> qd_all, dod_all, qq_all, doq_all;
    const bool drop = has_dropout(p);
    const __m512i drop_threshold = _mm512_set1_epi32(int(p.dropout_threshold));
    const __m512 drop_scale = _mm512_set1_ps(float(p.dropout_scale));
    AttnDropoutKey drop_key;
    alignas(64) uint32_t row_hash[kBlockQ], col_hash[BK];  // dropout: of a query block, of the key block
    static thread_local TileBuffer<float> dqt_all, lse_all, delta_all;
    QueryBounds bounds;
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const BwdItem it = bwd_item(p, item, chunks);
      const int64_t b = it.b, hk = it.hk, qa = it.qa, qz = it.qz;
      const SeqInfo& s = it.s;
      const int64_t blocks = (qz - qa + kBlockQ - 1) / kBlockQ, all = group * blocks;
      if (qd_all.size() < size_t(all * kPairsD)) {
        grow_to(qd_all, all * kPairsD), grow_to(dod_all, all * kPairsD), grow_to(qq_all, all * kPairsQ);
        grow_to(doq_all, all * kPairsQ), grow_to(dqt_all, all * kDqt), grow_to(lse_all, all * kBlockQ);
        grow_to(delta_all, all * kBlockQ);
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t qb = 0; qb < blocks; ++qb) {
          const int64_t h = hk * group + g, blk = g * blocks + qb, i0 = qa + qb * kBlockQ;
          const int64_t mq = std::min(kBlockQ, qz - i0), t0 = s.q_start + i0;
          pack_pairs_16x16<D>(qd_all.data() + blk * kPairsD, p.q, p.q_strides, b, t0, h, mq, 0);
          pack_pairs_16x16<D>(dod_all.data() + blk * kPairsD, p.dout, p.o_strides, b, t0, h, mq, 0);
          pack_pairs_of_rows<D>(qq_all.data() + blk * kPairsQ, p.q, p.q_strides, b, t0, h, mq);
          pack_pairs_of_rows<D>(doq_all.data() + blk * kPairsQ, p.dout, p.o_strides, b, t0, h, mq);
          // Padding queries get lse = +inf: P = exp(S - lse) = 0 there, and so does dS.
          float* lse_b = lse_all.data() + blk * kBlockQ;
          float* delta_b = delta_all.data() + blk * kBlockQ;
          for (int64_t r = 0; r < kBlockQ; ++r) {
            if (r >= mq) {
              lse_b[r] = std::numeric_limits<float>::infinity(), delta_b[r] = 0.f;
              continue;
            }
            const uint16_t* o = reinterpret_cast<const uint16_t*>(at<bf16>(p.out, p.o_strides, b, t0 + r, h));
            const uint16_t* g_row = reinterpret_cast<const uint16_t*>(at<bf16>(p.dout, p.o_strides, b, t0 + r, h));
            __m512 acc = zero;
            for (int d = 0; d < D; d += 16) {
              auto widen = [](const uint16_t* x) {
                return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
              };
              acc = _mm512_fmadd_ps(widen(o + d), widen(g_row + d), acc);
            }
            const int64_t idx = lse_index(p, b, h, s, i0 + r);
            lse_b[r] = lse[idx];
            delta_b[r] = _mm512_reduce_add_ps(acc) - (dlse ? dlse[idx] : 0.f);
          }
        }
      std::fill(dqt_all.begin(), dqt_all.begin() + all * kDqt, 0.f);
      for (int64_t j0 = 0; j0 < s.len_k; j0 += BK) {
        const int64_t nk = std::min(BK, s.len_k - j0), nk32 = round_up32(nk);
        std::fill(dk.begin(), dk.end(), 0.f);
        std::fill(dv.begin(), dv.end(), 0.f);
        const int64_t q_lo = std::max(qa, query_lo(p, j0, s.len_q, s.len_k));
        const int64_t q_hi = std::min(qz, query_hi(p, j0 + nk - 1, s.len_q, s.len_k));
        if (q_lo < q_hi) {
          pack_rows_padded<D>(kr.data(), p.k, p.k_strides, b, s.k_start + j0, hk, nk);
          pack_rows_padded<D>(vr.data(), p.v, p.v_strides, b, s.k_start + j0, hk, nk);
          pack_transposed<D>(kt.data(), BK, p.k, p.k_strides, b, s.k_start + j0, hk, nk);
        }
        for (int64_t g = 0; g < group && q_lo < q_hi; ++g) {
          if (drop) {
            drop_key = AttnDropoutKey(p.dropout_seed, b, hk * group + g);
            for (int64_t j = 0; j < BK; ++j) col_hash[j] = drop_key.col_hash(j0 + j);
          }
          for (int64_t i0 = q_lo / kBlockQ * kBlockQ; i0 < q_hi; i0 += kBlockQ) {
            const int64_t blk = g * blocks + (i0 - qa) / kBlockQ, mq = std::min(kBlockQ, qz - i0), mq32 = round_up32(mq);
            if (drop)
              for (int r = 0; r < kBlockQ; ++r) row_hash[r] = drop_key.row_hash(i0 + r);
            matmul_tiles(nk32, mq32, D, kr.data(), D, qd_all.data() + blk * kPairsD, kBlockQ, st.data(), kBlockQ, false);    // S^T = K Q^T
            matmul_tiles(nk32, mq32, D, vr.data(), D, dod_all.data() + blk * kPairsD, kBlockQ, dpt.data(), kBlockQ, false);  // dP^T = V dO^T
            const bool masked = !block_unmasked(p, s, i0, mq, j0);
            if (masked) bounds.set(p, s, i0, mq);
            const float* lse_b = lse_all.data() + blk * kBlockQ;
            const float* delta_b = delta_all.data() + blk * kBlockQ;
            // P^T = exp(scale S^T - lse) and dS^T = P^T (dP^T - delta), by pairs of keys: each as
            // bf16 rows [key][query] (A of dV, dK) and dS^T also as pairs of keys (B of dQ^T).
            // P = 2^(S^T scale log2(e) - lse log2(e)), one fmsub and exp2<4> (as the forward; masked
            // keys: -inf, exactly 0). A row that saw no key has lse = +inf: -inf, 0 as well. Was
            // exp<5>(S^T scale - lse) with a select for -inf: forward + backward 0.90-0.94x the time
            // (1 thread, B = 1, H = 8, T = 1024 non-causal / 2048 causal, D = 64 / 128, thread CPU
            // time, separate processes, min of 3 x 3, 2026-11-30).
            for (int v = 0; v < mq32 / 16; ++v) {
              const __m512 lse_v = _mm512_mul_ps(_mm512_loadu_ps(lse_b + v * 16), log2e);
              const __m512 delta_v = _mm512_loadu_ps(delta_b + v * 16);
              const __m512i lo = _mm512_loadu_si512(bounds.lo + v * 16), hi = _mm512_loadu_si512(bounds.hi + v * 16);
              auto p_ds = [&](int64_t j, __m512& pj, __m512& dsj) {
                __m512 t = _mm512_fmsub_ps(_mm512_loadu_ps(st.data() + j * kBlockQ + v * 16), scale_log2e, lse_v);
                if (masked) {  // after the scale, which may be negative
                  const __m512i key = _mm512_set1_epi32(int32_t(j0 + j));
                  t = _mm512_mask_mov_ps(ninf, _mm512_cmpge_epi32_mask(key, lo) & _mm512_cmplt_epi32_mask(key, hi), t);
                }
                pj = exp2_block(t);
                __m512 dp = _mm512_loadu_ps(dpt.data() + j * kBlockQ + v * 16);
                if (drop) {  // dS = P (f dP - delta), dV's P the kept ones (scaled at the end)
                  const __mmask16 kept = dropout_kept(_mm512_load_si512(row_hash + v * 16), col_hash[j], drop_threshold);
                  dp = _mm512_maskz_mul_ps(kept, dp, drop_scale);
                  dsj = _mm512_mul_ps(pj, _mm512_sub_ps(dp, delta_v));
                  pj = _mm512_maskz_mov_ps(kept, pj);
                  return;
                }
                dsj = _mm512_mul_ps(pj, _mm512_sub_ps(dp, delta_v));
              };
              for (int64_t j = 0; j < nk; j += 2) {
                __m512 p0, ds0, p1 = zero, ds1 = zero;
                p_ds(j, p0, ds0);
                if (j + 1 < nk) p_ds(j + 1, p1, ds1);
                const __m512i pb = (__m512i)_mm512_cvtne2ps_pbh(p1, p0), db = (__m512i)_mm512_cvtne2ps_pbh(ds1, ds0);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt.data() + j * kBlockQ + v * 16), _mm512_castsi512_si256(pb));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt.data() + (j + 1) * kBlockQ + v * 16), _mm512_extracti64x4_epi64(pb, 1));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst.data() + j * kBlockQ + v * 16), _mm512_castsi512_si256(db));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst.data() + (j + 1) * kBlockQ + v * 16), _mm512_extracti64x4_epi64(db, 1));
                _mm512_storeu_si512(dsp.data() + j / 2 * kBlockQ + v * 16, _mm512_permutexvar_epi16(interleave, db));
              }
            }
            // Keys past the block's end (up to the 32-key tile edge) contribute exact zeros.
            const int64_t even = (nk + 1) / 2 * 2;
            if (even < nk32) {
              std::memset(pt.data() + even * kBlockQ, 0, (nk32 - even) * kBlockQ * 2);
              std::memset(dst.data() + even * kBlockQ, 0, (nk32 - even) * kBlockQ * 2);
              std::memset(dsp.data() + even / 2 * kBlockQ, 0, (nk32 - even) / 2 * kBlockQ * 4);
            }
            matmul_tiles(nk32, D, mq32, pt.data(), kBlockQ, doq_all.data() + blk * kPairsQ, D, dv.data(), D, true);   // dV += P^T dO
            matmul_tiles(nk32, D, mq32, dst.data(), kBlockQ, qq_all.data() + blk * kPairsQ, D, dk.data(), D, true);  // dK += dS^T Q
            matmul_tiles(D, mq32, nk32, kt.data(), BK, dsp.data(), kBlockQ, dqt_all.data() + blk * kDqt, kBlockQ, true);  // dQ^T += K^T dS^T
          }
        }
        for (int64_t r = 0; r < nk; ++r) {
          float* dk_row = dk.data() + r * D;
          for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dk_row + d, _mm512_mul_ps(_mm512_loadu_ps(dk_row + d), scale));
          if (drop)  // dV = (1 / (1 - p)) sum over the kept P dO
            for (int d = 0; d < D; d += 16)
              _mm512_storeu_ps(dv.data() + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(dv.data() + r * D + d), drop_scale));
          if (chunks > 1) {
            float* __restrict part = parts.row<D>(it.c, hk, b, s, j0 + r);
            std::copy(dk_row, dk_row + D, part);
            std::copy(dv.begin() + r * D, dv.begin() + (r + 1) * D, part + D);
            continue;
          }
          uint16_t* dk_dst = reinterpret_cast<uint16_t*>(at_mut<bf16>(p.dk, p.dkv_strides, b, s.k_start + j0 + r, hk));
          uint16_t* dv_dst = reinterpret_cast<uint16_t*>(at_mut<bf16>(p.dv, p.dkv_strides, b, s.k_start + j0 + r, hk));
          for (int d = 0; d < D; d += 16) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dk_dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(dk_row + d)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dv_dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(dv.data() + r * D + d)));
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t qb = 0; qb < blocks; ++qb) {
          const int64_t i0 = qa + qb * kBlockQ, mq = std::min(kBlockQ, qz - i0);
          const float* dqt = dqt_all.data() + (g * blocks + qb) * kDqt;
          for (int64_t r = 0; r < mq; ++r) {
            uint16_t* dq_dst = reinterpret_cast<uint16_t*>(at_mut<bf16>(p.dq, p.o_strides, b, s.q_start + i0 + r, hk * group + g));
            for (int d = 0; d < D; d += 16) {
              const __m512 x = _mm512_mul_ps(_mm512_i32gather_ps(column, dqt + d * kBlockQ + r, 4), scale);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dq_dst + d), (__m256i)_mm512_cvtneps_pbh(x));
            }
          }
        }
    }
    _tile_release();
    release_if_large(qd_all, dod_all, qq_all, doq_all, dqt_all, lse_all, delta_all);
  }
  parts.sum_into_outputs<D, bf16>();
}

}  // namespace

bool flash_attn_amx_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
    if (!amx_bf16 || !amx_tile) return false;
    // Linux (5.16+) hands out the 8 KB tile state only on request; without it the first tile
    // instruction faults (SIGILL). The permission is the process's, for all its threads.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

void flash_attn_fwd_amx(const AttnParams& p) {
  PYLLM_CHECK(flash_attn_amx_usable(), "flash_attn: the AMX forward is not usable in this process");
  dispatch_head_dim(p.head_dim, [&](auto d) { fwd_amx<decltype(d)::value>(p); });
}

void flash_attn_bwd_amx(const AttnParams& p) {
  PYLLM_CHECK(flash_attn_amx_usable(), "flash_attn: the AMX backward is not usable in this process");
  dispatch_head_dim(p.head_dim, [&](auto d) { bwd_amx<decltype(d)::value>(p); });
}

#endif  // PYLLM_AMX

}  // namespace pyllm
