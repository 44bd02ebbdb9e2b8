// FlashAttention-2 forward on tensor cores (sm80 mma.sync; runs unchanged on sm90).
// Partly verified: ran on an H200 (2026-11-30): compute-sanitizer clean, its small cases right; the CUDA test suite not yet run through (see README).
// Its loop has changed since (2026-12-05, "Issue slots" below): that version never ran on a GPU.
// Speed there (bf16, H = 8): 68-154 TFLOP/s, 0.52-0.66x torch SDPA's flash backend: not tuned yet.
// The 128-row tiles (MT = 2, PYLLM_ATTN_FWD_BLOCK_M=128) are unverified: never run on a GPU.
//
// Grid (ceil(Tq / kBlockM), n_heads, batch); one CTA = 4 warps = 64 * MT query rows of one head,
// each warp owning MT m-tiles of 16 rows (MT = 1 by default, see FwdTile). Per key block of
// kBlockN keys (only the blocks the mask leaves):
//   S = Q K^T          mma.m16n8k16, Q from shared memory (ldmatrix), K via ldmatrix (non-trans)
//   S *= scale*log2(e), masked (-inf) only on blocks that cross the mask or the sequence end; with
//                      softcap / ALiBi S = log2(e) (c tanh(S scale / c) - slope |i - j|) first
//                      (ScoreMod, flash_attn_common.cuh; unverified on a GPU, 2026-12-05)
//   online softmax per row in registers (the 4 lanes of a row reduce with shuffles), exp2
//                      with dropout_p: the dropped P zeroed after the row sums, out scaled by
//                      1 / (1 - p) at the end (Dropout, flash_attn_common.cuh; unverified, 2026-12-05)
//   O = O * corr + P V P packed from the S accumulators straight into A fragments, V via
//                      ldmatrix.trans
// K and V tiles are double-buffered: the cp.async copy of block n+1 runs while block n is
// computed. out = O / l and lse = m ln2 + ln l are written once; nothing T x T ever exists, the
// extra memory is the (B, H, Tq) fp32 LSE.
// Issue slots (2026-12-05, UNVERIFIED on a GPU): the probabilities by exp2_ftz (one MUFU.EX2, as
// FlashAttention-2's exp2f under --use_fast_math; exp2f had been 4 instructions a score) of one FFMA
// (the scale folded in: one FMUL a score fewer), the mask in a branch of its own (mask_scores; ptxas
// had predicated its ~3 instructions a score on every block), full K / V tiles copied without row
// tests (load_tile_async), and O rescaled only where a row's maximum moved (a warp vote).
// tools/sass_census.py (nvcc 13.0, sm_90, bf16, one warp per key block, mma.sync included), a full
// block no mask crosses, no row's maximum moving (moving) / the most a block can take:
//   D = 64: 1,008 -> 755 (782) / 960;  D = 128: 1,334 -> 915 (975) / 1,152;
//   MT = 2: D = 64 1,675 -> 1,005 / 1,338, D = 128 2,025 -> 1,280 / 1,675.
// What that buys in time is a GPU measurement (the softmax is the part no mma overlaps).
// Work: 4 * Tq * Tk * D FLOPs per head (half that causal); reads Q once and K, V once per query
// block (Tq / kBlockM times, mostly from L2), writes O and LSE once.
// Layout, mask (bottom-right causal, windows), varlen and KV-cache conventions:
// csrc/common/attn_params.h; csrc/cpu/flash_attn.cpp is the reference twin.
#include <cmath>

#include "cuda/cuda_ops.h"
#include "cuda/flash_attn_common.cuh"

namespace pyllm {
namespace attn {

// tall_tiles asks which virtual arch the device runs this module's code from (flash_attn_common.cuh).
__global__ void tall_tiles_probe_kernel() {}

// Tile sizes, not yet tuned (first GPU run: 0.52-0.66x SDPA-flash, see above): kBlockM = 64 rows (4 warps x 16) as in
// FlashAttention-2's sm80 defaults for small CTAs; kBlockN = 64 keys up to D = 128 and 32 at
// D = 256 to keep shared memory (Q + 2 stages of K and V) at 80 KB (D = 128) / 96 KB (D = 256),
// within an A100's 163 KB and leaving room for 2 CTAs per SM up to D = 128.
// ptxas (nvcc 13.0, sm_90, -O3, 2026-11-30): registers per thread D = 32/64/96/128/256: 103 / 168 /
// 136 / 172 / 252; only D = 64 spills (16-byte stack frame, 20 B stores / 24 B loads). Not an
// array indexed at run time (row_lo / row_hi as scalars: the same): ptxas caps D = 64 at 168
// registers on its own, i.e. 3 CTAs per SM, and spills to stay there; __launch_bounds__(128, 1)
// gives 185 registers, no spill, 2 CTAs per SM (D = 128: 203). Which is faster is a GPU measurement
// (3 CTAs: more latency hiding, 20 B of L1 spill traffic per thread). At 172 registers D = 128 fits
// 2 CTAs of 128 threads per SM by registers.
// Since the 2026-12-05 changes above (sm_90): 121 / 134 / 164 / 171 / 255, no spill (D = 64's is
// gone, 3 CTAs per SM still); MT = 2: D = 64 no spill; D = 128 255 with 48 B of spill stores / 32 B
// loads (16 / 48 before). sm_80: 119 / 136 / 168 / 171 / 254, no spill.
// MT: 16-row m-tiles per warp. Shared memory moves 128 B per clock per SM, so one ldmatrix.x4
// (512 B) takes 4 clocks; with MT = 1 each K or V fragment feeds 2 mma.m16n8k16 (4096 FMAs) and
// the Q fragments add a fifth load per 4, so shared memory alone caps the kernel at ~820 FMAs per
// clock per SM: ~430 TFLOP/s on an H200 (132 SMs, 1.98 GHz), ~40% of its dense bf16 peak, before
// the softmax's share. MT = 2 (128 rows per CTA, 4 warps, as FlashAttention-2's sm80 forward at
// D = 64 / 128) feeds 4 mmas per fragment: ~1365 FMAs per clock, ~710 TFLOP/s, out of the way.
// Prediction: the compute-bound rows (T = 2048) of the forward 1.3-1.6x faster, less at T = 512
// (fewer CTAs: B = 16, H = 8, T = 512 gives 512 CTAs of 128 rows for 132 SMs). Built for D = 64 /
// 128 only, chosen at run time by PYLLM_ATTN_FWD_BLOCK_M=128 until a GPU run measures it:
// UNVERIFIED (never run on a GPU). Every row takes the same steps as with MT = 1 (plus key blocks
// only the tile's other rows need, fully masked for it: o * 1 + 0), so the output bits must match.
// ptxas (nvcc 13.0, sm_90, 2026-12-01), MT = 2: D = 64: 236 registers, no spill (2 CTAs per SM);
// D = 128: 255 registers, 16 B spill stores / 48 B loads (FlashAttention-2 sits at 255 there too).
// The MT = 1 kernels' PTX is the same as before MT existed, up to register names and operand order.
// Checked without a GPU: tools/flash_attn_mma_emulate.py transliterates both tile heights (its
// M128_CASES: several 128-row blocks, windows, GQA, varlen): 1e-15 from float64, MT = 2 the same
// bits as MT = 1. Barriers, cp.async and registers are the GPU's to check.
template <int D, int MT = 1>
struct FwdTile {
  static constexpr int kBlockM = 64 * MT;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kThreads = 128;
  static constexpr int kSmemBytes = (kBlockM * D + 4 * kBlockN * D) * 2;
};

// Mods: capped / biased scores (ScoreMod), MT = 1 only (dispatch_fwd).
template <typename T, int D, int MT, bool Mods>
__global__ void __launch_bounds__(128) flash_attn_fwd_kernel(const AttnParams p, float scale_log2) {
  static_assert(!Mods || MT == 1, "the taller tiles take no score mods");
#ifdef PYLLM_ATTN_UNSUPPORTED_ARCH
  __trap();
#else
#if __CUDA_ARCH__ < 900
  if constexpr (MT > 1) {  // Hopper only while it is an experiment: half the compile (tall_tiles)
    __trap();
    return;
  }
#endif
  using Tile = FwdTile<D, MT>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, NT = BN / 8, DT = D / 8;
  static_assert(NT % 2 == 0 && DT % 2 == 0, "tiles pair up for ldmatrix.x4");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;      // 2 stages of BN x D
  T* sV = sK + 2 * BN * D;  // 2 stages of BN x D

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  if (i0 >= s.len_q) return;  // uniform per CTA: before any barrier
  const int mq = int(min(int64_t(BM), s.len_q - i0));
  const int hk = h / int(p.n_heads / p.n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row = warp * 16 * MT;  // this warp's first row in the tile; m-tile mt starts 16 * mt below
  const ScoreMod mod = Mods ? ScoreMod(p, b, h, float(p.scale), 1.4426950408889634f) : ScoreMod();
  const Dropout drop = Mods ? Dropout(p, b, h) : Dropout();
  uint32_t drop_row[2] = {0, 0};  // dropout: the row hashes of this lane's rows g, g + 8 (MT = 1)
  if (Mods && drop.on)
    for (int rr = 0; rr < 2; ++rr) drop_row[rr] = drop.key.row_hash(i0 + warp_row + g + rr * 8);

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + (s.q_start + i0) * p.q_strides[1] +
                    h * p.q_strides[2];
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_strides[0] + s.k_start * p.k_strides[1] + hk * p.k_strides[2];
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_strides[0] + s.k_start * p.v_strides[1] + hk * p.v_strides[2];

  int n_first = 0, n_end = 0;
  {
    const int64_t lo = key_lo(p, i0, s.len_q, s.len_k), hi = key_hi(p, i0 + mq - 1, s.len_q, s.len_k);
    if (hi > lo && s.len_k > 0) {
      n_first = int(lo / BN);
      n_end = int((hi + BN - 1) / BN);
    }
  }
  const int64_t lo_last = key_lo(p, i0 + mq - 1, s.len_q, s.len_k), hi_first = key_hi(p, i0, s.len_q, s.len_k);
  // Keys [row_lo, row_hi) seen by this lane's rows g and g + 8 of each m-tile (int: sequence
  // lengths are int32).
  int row_lo[MT][2], row_hi[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t i = i0 + warp_row + mt * 16 + g + rr * 8;
      row_lo[mt][rr] = int(key_lo(p, i, s.len_q, s.len_k));
      row_hi[mt][rr] = int(key_hi(p, i, s.len_q, s.len_k));
    }
  }

  auto load_kv = [&](int nb, int stage) {
    const int64_t j0 = int64_t(nb) * BN;
    const int valid = int(min(int64_t(BN), s.len_k - j0));
    load_tile_async<BN, D, Tile::kThreads>(sK + stage * BN * D, k_head + j0 * p.k_strides[1], p.k_strides[1], valid);
    load_tile_async<BN, D, Tile::kThreads>(sV + stage * BN * D, v_head + j0 * p.v_strides[1], p.v_strides[1], valid);
  };

  load_tile_async<BM, D, Tile::kThreads>(sQ, q_base, p.q_strides[1], mq);
  if (n_first < n_end) load_kv(n_first, 0);
  cp_async_commit();

  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

  for (int nb = n_first; nb < n_end; ++nb) {
    const int stage = (nb - n_first) & 1;
    if (nb + 1 < n_end) {
      load_kv(nb + 1, stage ^ 1);  // that stage was released by the barrier ending the last iteration
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* cK = sK + stage * BN * D;
    const T* cV = sV + stage * BN * D;

    // S = Q K^T for this warp's 16 * MT rows x BN keys: each K fragment feeds MT m-tiles.
    float sacc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) sacc[mt][nt][0] = sacc[mt][nt][1] = sacc[mt][nt][2] = sacc[mt][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], smem_addr(sQ + Swizzle<D>::offset(warp_row + mt * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                                             kk * 16 + (lane / 16) * 8)));
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t bb[4];
        ldmatrix_x4(bb, smem_addr(cK + Swizzle<D>::offset(nt * 8 + (lane % 8) + (lane / 16) * 8,
                                                          kk * 16 + ((lane / 8) % 2) * 8)));
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<T>(sacc[mt][nt], a[mt], b0);
          mma_16x8x16<T>(sacc[mt][nt + 1], a[mt], b1);
        }
      }
    }

    // Capped and biased scores (ScoreMod) into log2 units here; plain ones stay q . k, their scale
    // folded into the exponent's FFMA below (as FlashAttention-2: one FMUL a score fewer), which
    // takes scale > 0 (the max of the raw scores is then the max of the scaled ones; dispatch_fwd
    // sends other scales to the Mods instances). Mask only blocks that cross the mask or the end of
    // the keys.
    const int64_t j0 = int64_t(nb) * BN;
    const bool need_mask = !(lo_last <= j0 && j0 + BN <= hi_first);
    if constexpr (Mods) {
      // ALiBi distance of element e of tile (mt, nt): query i0 + warp_row + 16 mt + g + 8 (e / 2),
      // key j0 + 8 nt + 2t + (e & 1).
      const int dist0 = int(i0 + (s.len_k - s.len_q) - j0) + warp_row + g - 2 * t;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float dcap;
            sacc[mt][nt][e] = mod.score(sacc[mt][nt][e], dist0 + mt * 16 + (e / 2) * 8 - nt * 8 - (e & 1), dcap);
          }
    }
    const float unit = Mods ? 1.f : scale_log2;  // what the scores still need
    if (need_mask) mask_scores(-INFINITY, int(j0) + 2 * t, row_lo, row_hi, sacc);  // a branch (mask_scores)

    // Online softmax for rows g (rr = 0) and g + 8 (rr = 1) of each m-tile, m in log2 units. fmaxf
    // skips NaN, so one NaN score does not poison the running max; exp2 of it is NaN and reaches the
    // output. A row that has seen only masked keys keeps m = -inf and takes exp2 against 0
    // (exp2(-inf) = 0, no inf - inf).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float corr[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(sacc[mt][nt][2 * rr], sacc[mt][nt][2 * rr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][rr], mx * unit);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        corr[rr] = exp2_ftz(m[mt][rr] - m_use);
        m[mt][rr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          sacc[mt][nt][2 * rr] = exp2_ftz(fmaf(sacc[mt][nt][2 * rr], unit, -m_use));
          sacc[mt][nt][2 * rr + 1] = exp2_ftz(fmaf(sacc[mt][nt][2 * rr + 1], unit, -m_use));
          sum += sacc[mt][nt][2 * rr] + sacc[mt][nt][2 * rr + 1];
        }
        l[mt][rr] = l[mt][rr] * corr[rr] + sum;  // this lane's partial row sum; the 4 lanes are summed at the end
      }
      // O rescaled only when a row of the warp's m-tile has a new maximum: corr is exactly 1 for the
      // others (exp2 of 0), so skipping is bitwise the same; after the first blocks most rows keep
      // theirs (an LLM's often from its first key), and the 4 * D / 8 multiplies a lane are skipped.
      if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mt][dt][0] *= corr[0];
          o[mt][dt][1] *= corr[0];
          o[mt][dt][2] *= corr[1];
          o[mt][dt][3] *= corr[1];
        }
      }
    }

    if (Mods && drop.on) {  // the dropped P zeroed after the row sums (Dropout, flash_attn_common.cuh)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const uint32_t col = drop.key.col_hash(j0 + nt * 8 + 2 * t + c);
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) sacc[0][nt][2 * rr + c] *= float(drop.kept(drop_row[rr], col));
        }
    }

    // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of k-step kk; each V
    // fragment feeds MT m-tiles.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(sacc[mt][2 * kk][0], sacc[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(sacc[mt][2 * kk][2], sacc[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(sacc[mt][2 * kk + 1][0], sacc[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(sacc[mt][2 * kk + 1][2], sacc[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt = 0; dt < DT; dt += 2) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, smem_addr(cV + Swizzle<D>::offset(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                                                dt * 8 + (lane / 16) * 8)));
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16x8x16<T>(o[mt][dt], a[mt], b0);
          mma_16x8x16<T>(o[mt][dt + 1], a[mt], b1);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // no copy may be in flight at exit (the no-key case issued Q only)

  // Epilogue: full row sums, out = O / l, lse in natural log units.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      l[mt][rr] += __shfl_xor_sync(0xffffffffu, l[mt][rr], 1);
      l[mt][rr] += __shfl_xor_sync(0xffffffffu, l[mt][rr], 2);
    }
  }
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = warp_row + mt * 16 + g + rr * 8;
      if (row >= mq) continue;
      const bool empty = l[mt][rr] == 0.f;  // saw no key (NaN stays NaN)
      const float inv = empty ? 0.f : (Mods && drop.on ? drop.scale : 1.f) / l[mt][rr];
      T* dst =
          static_cast<T*>(p.out) + b * p.o_strides[0] + (s.q_start + i0 + row) * p.o_strides[1] + h * p.o_strides[2];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * t) =
            pack2<T>(o[mt][dt][2 * rr] * inv, o[mt][dt][2 * rr + 1] * inv);
      if (t == 0) {
        const int64_t token = (p.cu_seqlens_q ? s.q_start : 0) + i0 + row;
        lse[b * p.lse_strides[0] + h * p.lse_strides[1] + token] =
            empty ? INFINITY : m[mt][rr] * 0.69314718055994531f + logf(l[mt][rr]);
      }
    }
  }
#endif
}

template <typename T, int D, int MT, bool Mods = false>
void launch_fwd(const AttnParams& p, int device, cudaStream_t stream) {
  using Tile = FwdTile<D, MT>;
  constexpr auto kernel = flash_attn_fwd_kernel<T, D, MT, Mods>;
  opt_in_dynamic_smem<kernel>(Tile::kSmemBytes, device, "the forward kernel");
  const dim3 grid(unsigned((p.seqlen_q + Tile::kBlockM - 1) / Tile::kBlockM), unsigned(p.n_heads), unsigned(p.batch));
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p, float(p.scale * 1.4426950408889634));
  PYLLM_CUDA_CHECK_LAUNCH("flash_attn_fwd_kernel");
}

template <typename T>
void dispatch_fwd(const AttnParams& p, int device, cudaStream_t stream) {
  // MT = 2 exists at D = 64 / 128 only (FwdTile); 10 s more nvcc per arch, hence sm_90 alone.
  // Capped and biased scores, dropout: their own instances of the default tiles (ScoreMod, Dropout).
  // So are scales <= 0, which the others' softmax does not take (it folds a positive scale into exp2).
  if (has_score_mods(p) || has_dropout(p) || !(p.scale > 0)) {
    dispatch_head_dim(p.head_dim, [&](auto d) { launch_fwd<T, decltype(d)::value, 1, true>(p, device, stream); });
    return;
  }
  if ((p.head_dim == 64 || p.head_dim == 128) && tall_tiles(device, "PYLLM_ATTN_FWD_BLOCK_M") == 2) {
    if (p.head_dim == 64)
      launch_fwd<T, 64, 2>(p, device, stream);
    else
      launch_fwd<T, 128, 2>(p, device, stream);
    return;
  }
  dispatch_head_dim(p.head_dim, [&](auto d) { launch_fwd<T, decltype(d)::value, 1>(p, device, stream); });
}

}  // namespace attn

void flash_attn_fwd_cuda(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens_q,
                         uintptr_t cu_seqlens_k, uintptr_t seqused_k, int64_t batch, int64_t seqlen_q,
                         int64_t seqlen_k, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                         const std::vector<int64_t>& lse_strides, double scale, int64_t window_left,
                         int64_t window_right, int dtype, int device, uintptr_t stream, int64_t total_q,
                         int64_t total_k, double softcap, uintptr_t alibi_slopes, int64_t alibi_batch_stride,
                         double dropout_p, uint64_t dropout_seed) {
  AttnParams p = make_attn_params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, batch, seqlen_q, seqlen_k,
                                  n_heads, n_kv_heads, head_dim, q_strides, k_strides, v_strides, o_strides,
                                  lse_strides, scale, window_left, window_right, dtype);
  set_packed_totals(p, total_q, total_k);
  set_score_mods(p, softcap, alibi_slopes, alibi_batch_stride);
  set_dropout(p, dropout_p, dropout_seed);
  PYLLM_CHECK(!(has_dropout(p) && seqused_k), "flash_attn: dropout is for training calls, not KV-cache ones");
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  // Varlen: seqlen_q / seqlen_k are the max_seqlen bounds; the packed totals say what exists.
  const int64_t rows_q = p.cu_seqlens_q ? p.total_q : seqlen_q, rows_k = p.cu_seqlens_q ? p.total_k : seqlen_k;
  if (batch == 0 || rows_q == 0) return;
  PYLLM_CHECK(q && out && lse && ((k && v) || rows_k == 0), "flash_attn: null data pointer for a non-empty tensor");
  DeviceGuard guard(device);
  attn::check_cuda_attn_args(p, dtype, device);
  PYLLM_CHECK(o_strides[0] % 2 == 0 && o_strides[1] % 2 == 0 && o_strides[2] % 2 == 0 && out % 4 == 0,
              "flash_attn: out must be 4-byte aligned with even strides on CUDA");
  if (dtype == int(DType::f16))
    attn::dispatch_fwd<__half>(p, device, as_stream(stream));
  else
    attn::dispatch_fwd<__nv_bfloat16>(p, device, as_stream(stream));
}

}  // namespace pyllm
