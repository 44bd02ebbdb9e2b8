// FlashAttention backward on CUDA: recomputes P = exp(S - lse) from the saved LSE.
// Partly verified: ran on an H200 (2026-11-30): compute-sanitizer clean, its small cases right; the CUDA test suite not yet run through (see README).
// The fp32 SIMT reference: 5-7 TFLOP/s fwd+bwd there, 10-30x slower than the mma backward.
//
// flash_attn_bwd_cuda runs the delta kernel below, then one of three implementations of dK, dV, dQ
// chosen by its `algo` argument (Python: PYLLM_ATTN_BWD=mma|simt|atomic, default mma):
//   mma (algo 0):    the FlashAttention-2 tensor-core kernels of flash_attn_bwd_mma.cu;
//   simt (algo 1):   the correctness-first fp32 SIMT kernels below, kept as the reference the GPU
//                    tests compare the mma kernels with (and a fallback);
//   atomic (algo 2): the mma kernels with dQ added into an fp32 buffer by the dk_dv kernel (fp32
//                    atomics, FlashAttention-2's default) instead of a dq kernel recomputing S and
//                    dP; only with deterministic = false, at D = 64 / 128 on sm_90 (an experiment:
//                    UNVERIFIED, never run on a GPU), else algo 0.
// mma and simt give every gradient element one owner that sums in a fixed order, with no atomics:
// they are bitwise deterministic, whatever `deterministic` says.
//
// The SIMT version (fp32 FMA, no tensor cores) is structured like the CPU twin's backward
// (csrc/cpu/flash_attn.cpp). Three kernels:
//   delta:  delta_i = sum_d dO_id O_id - dlse_i, one warp per query row (shared with mma)
//   dk_dv:  one CTA per (b, kv head, block of kKeys keys), looping over the queries of every
//           query head of the GQA group that see them, kQueryChunk rows at a time through shared
//           memory; dK and dV of its keys accumulate in registers
//   dq:     one CTA per (b, query head, block of kQueries queries), looping over their keys
//           kKeyChunk at a time through shared memory; dQ accumulates in registers
// Each row (of keys in dk_dv, of queries in dq) belongs to 8 consecutive lanes, each holding the
// head-dim elements d = 8c + lane % 8; dot products reduce over those 8 lanes with shuffles.
// Capped scores and ALiBi: ScoreMod (flash_attn_common.cuh) in natural-log units, dS through the
// cap's derivative, in both SIMT kernels (unverified on a GPU, 2026-12-05); dropout likewise
// (Dropout, 2026-12-05, unverified).
// Memory beyond inputs and outputs: the (B, H, Tq) fp32 delta (caller-allocated workspace).
// Work: 14 * Tq * Tk * D FLOPs per head (S and dP are computed in both dk_dv and dq), all on
// the FP32 pipes.
#include <cmath>

#include "cuda/cuda_ops.h"
#include "cuda/flash_attn_common.cuh"

namespace pyllm {
namespace attn {

// Not yet measured: 16 rows x 8 lanes = 128 threads; shared memory stays under the 48 KB that
// needs no opt-in at D = 256 (K and V tiles 2 x 16 x 264 fp32 = 33 KB, 4 query rows 8 KB).
constexpr int kBwdThreads = 128;
constexpr int kLanesPerRow = 8;
constexpr int kKeys = kBwdThreads / kLanesPerRow;     // keys per dk_dv CTA
constexpr int kQueries = kBwdThreads / kLanesPerRow;  // queries per dq CTA
constexpr int kQueryChunk = 4;
constexpr int kKeyChunk = 8;

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const int64_t* strides, int64_t b, int64_t token,
                                            int64_t h) {
  return static_cast<const T*>(base) + b * strides[0] + token * strides[1] + h * strides[2];
}

__device__ __forceinline__ float sum_over_row_lanes(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  return x;
}

__device__ __forceinline__ int64_t lse_at(const AttnParams& p, int64_t b, int64_t h, const SeqInfo& s, int64_t i) {
  return b * p.lse_strides[0] + h * p.lse_strides[1] + (p.cu_seqlens_q ? s.q_start : 0) + i;
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) flash_attn_delta_kernel(const AttnParams p, float* delta) {
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo s = seq_info(p, b);
  const int64_t i = int64_t(blockIdx.x) * (kBwdThreads / 32) + warp;
  if (i >= s.len_q) return;  // whole warps leave together: the shuffles below stay full
  const T* o = row_ptr<T>(p.out, p.o_strides, b, s.q_start + i, h);
  const T* g = row_ptr<T>(p.dout, p.o_strides, b, s.q_start + i, h);
  float sum = 0.f;
  for (int d = lane; d < D; d += 32) sum += to_f32(o[d]) * to_f32(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const int64_t idx = lse_at(p, b, h, s, i);
    delta[idx] = sum - (p.dlse ? static_cast<const float*>(p.dlse)[idx] : 0.f);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) flash_attn_dk_dv_kernel(const AttnParams p, const float* delta) {
  constexpr int C = D / kLanesPerRow, kStride = D + 8;  // +8 floats: the 4 rows of a warp hit distinct banks
  __shared__ float sK[kKeys * kStride], sV[kKeys * kStride];
  __shared__ float sQ[kQueryChunk * D], sdO[kQueryChunk * D], sLse[kQueryChunk], sDelta[kQueryChunk];
  const int b = blockIdx.z, hk = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t j0 = int64_t(blockIdx.x) * kKeys;
  if (j0 >= s.len_k) return;  // uniform per CTA
  const int nk = int(min(int64_t(kKeys), s.len_k - j0));
  const int row = threadIdx.x / kLanesPerRow, part = threadIdx.x % kLanesPerRow;
  const int64_t j = j0 + row;
  const float scale = float(p.scale);

  for (int e = threadIdx.x; e < kKeys * D; e += kBwdThreads) {
    const int r = e / D, d = e % D;
    const bool in = r < nk;
    sK[r * kStride + d] = in ? to_f32(row_ptr<T>(p.k, p.k_strides, b, s.k_start + j0 + r, hk)[d]) : 0.f;
    sV[r * kStride + d] = in ? to_f32(row_ptr<T>(p.v, p.v_strides, b, s.k_start + j0 + r, hk)[d]) : 0.f;
  }
  float dk[C], dv[C];
#pragma unroll
  for (int c = 0; c < C; ++c) dk[c] = dv[c] = 0.f;

  const int64_t q_lo = query_lo(p, j0, s.len_q, s.len_k), q_hi = query_hi(p, j0 + nk - 1, s.len_q, s.len_k);
  const int group = int(p.n_heads / p.n_kv_heads);
  for (int hq = hk * group; hq < (hk + 1) * group; ++hq) {
    const ScoreMod mod(p, b, hq, scale, 1.f);  // capped or biased scores (natural-log units)
    const Dropout drop(p, b, hq);
    const uint32_t drop_key = drop.on ? drop.key.col_hash(j) : 0u;
    for (int64_t i0 = q_lo; i0 < q_hi; i0 += kQueryChunk) {
      const int nq = int(min(int64_t(kQueryChunk), q_hi - i0));
      __syncthreads();  // the previous chunk (and, first time, the K / V tiles' readers) are done
      for (int e = threadIdx.x; e < kQueryChunk * D; e += kBwdThreads) {
        const int r = e / D, d = e % D;
        const bool in = r < nq;
        sQ[e] = in ? to_f32(row_ptr<T>(p.q, p.q_strides, b, s.q_start + i0 + r, hq)[d]) : 0.f;
        sdO[e] = in ? to_f32(row_ptr<T>(p.dout, p.o_strides, b, s.q_start + i0 + r, hq)[d]) : 0.f;
      }
      if (threadIdx.x < kQueryChunk) {
        const bool in = int(threadIdx.x) < nq;
        const int64_t idx = in ? lse_at(p, b, hq, s, i0 + threadIdx.x) : 0;
        sLse[threadIdx.x] = in ? static_cast<const float*>(p.lse)[idx] : INFINITY;
        sDelta[threadIdx.x] = in ? delta[idx] : 0.f;
      }
      __syncthreads();
      for (int r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        float sdot = 0.f, dpdot = 0.f;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int d = c * kLanesPerRow + part;
          sdot += sQ[r * D + d] * sK[row * kStride + d];
          dpdot += sdO[r * D + d] * sV[row * kStride + d];
        }
        sdot = sum_over_row_lanes(sdot);
        dpdot = sum_over_row_lanes(dpdot);
        float pr_dv;
        const bool seen = row < nk && j >= key_lo(p, i, s.len_q, s.len_k) && j < key_hi(p, i, s.len_q, s.len_k);
        float dcap;
        const float x = mod.score_or(mod.on(), sdot, scale, int(i + (s.len_k - s.len_q) - j), dcap);
        float pr = seen ? __expf(x - sLse[r]) : 0.f;
        if (drop.on) {  // dV over the kept P (scaled at the end), dS = P (f dP - delta) (Dropout)
          const float f = drop.kept(drop.key.row_hash(i), drop_key) ? drop.scale : 0.f;
          dpdot *= f;
          pr_dv = pr * float(f != 0.f);
        } else {
          pr_dv = pr;
        }
        const float ds = pr * (dpdot - sDelta[r]) * dcap;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int d = c * kLanesPerRow + part;
          dv[c] += pr_dv * sdO[r * D + d];
          dk[c] += ds * sQ[r * D + d];
        }
      }
    }
  }
  if (row < nk) {
    T* dk_row = static_cast<T*>(p.dk) + b * p.dkv_strides[0] + (s.k_start + j) * p.dkv_strides[1] + hk * p.dkv_strides[2];
    T* dv_row = static_cast<T*>(p.dv) + b * p.dkv_strides[0] + (s.k_start + j) * p.dkv_strides[1] + hk * p.dkv_strides[2];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      dk_row[c * kLanesPerRow + part] = from_f32<T>(dk[c] * scale);
      dv_row[c * kLanesPerRow + part] = from_f32<T>(dv[c] * (has_dropout(p) ? float(p.dropout_scale) : 1.f));
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) flash_attn_dq_kernel(const AttnParams p, const float* delta) {
  constexpr int C = D / kLanesPerRow;
  __shared__ float sK[kKeyChunk * D], sV[kKeyChunk * D];
  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b);
  const int64_t i_first = int64_t(blockIdx.x) * kQueries;
  if (i_first >= s.len_q) return;  // uniform per CTA
  const int mq = int(min(int64_t(kQueries), s.len_q - i_first));
  const int row = threadIdx.x / kLanesPerRow, part = threadIdx.x % kLanesPerRow;
  const bool active = row < mq;
  const int64_t i = i_first + (active ? row : 0);
  const int hk = h / int(p.n_heads / p.n_kv_heads);
  const float scale = float(p.scale);
  const ScoreMod mod(p, b, h, scale, 1.f);  // capped or biased scores (natural-log units)
  const Dropout drop(p, b, h);

  float q[C], g[C], dq[C];
  const T* q_row = row_ptr<T>(p.q, p.q_strides, b, s.q_start + i, h);
  const T* g_row = row_ptr<T>(p.dout, p.o_strides, b, s.q_start + i, h);
#pragma unroll
  for (int c = 0; c < C; ++c) {
    q[c] = to_f32(q_row[c * kLanesPerRow + part]);
    g[c] = to_f32(g_row[c * kLanesPerRow + part]);
    dq[c] = 0.f;
  }
  const int64_t idx = lse_at(p, b, h, s, i);
  const float lse_i = static_cast<const float*>(p.lse)[idx], delta_i = delta[idx];
  const int64_t lo_i = key_lo(p, i, s.len_q, s.len_k), hi_i = key_hi(p, i, s.len_q, s.len_k);
  const uint32_t drop_row = drop.on ? drop.key.row_hash(i) : 0u;

  const int64_t k_lo = key_lo(p, i_first, s.len_q, s.len_k), k_hi = key_hi(p, i_first + mq - 1, s.len_q, s.len_k);
  for (int64_t j0 = k_lo; j0 < k_hi; j0 += kKeyChunk) {
    const int nk = int(min(int64_t(kKeyChunk), k_hi - j0));
    __syncthreads();
    for (int e = threadIdx.x; e < kKeyChunk * D; e += kBwdThreads) {
      const int r = e / D, d = e % D;
      const bool in = r < nk;
      sK[e] = in ? to_f32(row_ptr<T>(p.k, p.k_strides, b, s.k_start + j0 + r, hk)[d]) : 0.f;
      sV[e] = in ? to_f32(row_ptr<T>(p.v, p.v_strides, b, s.k_start + j0 + r, hk)[d]) : 0.f;
    }
    __syncthreads();
    for (int r = 0; r < nk; ++r) {
      const int64_t j = j0 + r;
      float sdot = 0.f, dpdot = 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        sdot += q[c] * sK[r * D + c * kLanesPerRow + part];
        dpdot += g[c] * sV[r * D + c * kLanesPerRow + part];
      }
      sdot = sum_over_row_lanes(sdot);
      dpdot = sum_over_row_lanes(dpdot);
      const bool seen = active && j >= lo_i && j < hi_i;
      float dcap;
      const float x = mod.score_or(mod.on(), sdot, scale, int(i + (s.len_k - s.len_q) - j), dcap);
      const float pr = seen ? __expf(x - lse_i) : 0.f;
      if (drop.on) dpdot *= drop.kept(drop_row, drop.key.col_hash(j)) ? drop.scale : 0.f;  // (Dropout)
      const float ds = pr * (dpdot - delta_i) * dcap;
#pragma unroll
      for (int c = 0; c < C; ++c) dq[c] += ds * sK[r * D + c * kLanesPerRow + part];
    }
  }
  if (active) {
    T* dq_row = static_cast<T*>(p.dq) + b * p.o_strides[0] + (s.q_start + i) * p.o_strides[1] + h * p.o_strides[2];
#pragma unroll
    for (int c = 0; c < C; ++c) dq_row[c * kLanesPerRow + part] = from_f32<T>(dq[c] * scale);
  }
}

template <typename T, int D>
void launch_bwd(const AttnParams& p, float* delta, bool simt, cudaStream_t stream) {
  const dim3 grid_delta(unsigned((p.seqlen_q + 3) / 4), unsigned(p.n_heads), unsigned(p.batch));
  const dim3 grid_kv(unsigned((p.seqlen_k + kKeys - 1) / kKeys), unsigned(p.n_kv_heads), unsigned(p.batch));
  const dim3 grid_q(unsigned((p.seqlen_q + kQueries - 1) / kQueries), unsigned(p.n_heads), unsigned(p.batch));
  if (p.seqlen_q > 0) {
    flash_attn_delta_kernel<T, D><<<grid_delta, kBwdThreads, 0, stream>>>(p, delta);
    PYLLM_CUDA_CHECK_LAUNCH("flash_attn_delta_kernel");
  }
  if (!simt) return;  // the caller launches the mma kernels
  if (p.seqlen_k > 0) {
    flash_attn_dk_dv_kernel<T, D><<<grid_kv, kBwdThreads, 0, stream>>>(p, delta);
    PYLLM_CUDA_CHECK_LAUNCH("flash_attn_dk_dv_kernel");
  }
  if (p.seqlen_q > 0) {
    flash_attn_dq_kernel<T, D><<<grid_q, kBwdThreads, 0, stream>>>(p, delta);
    PYLLM_CUDA_CHECK_LAUNCH("flash_attn_dq_kernel");
  }
}

template <typename T>
void dispatch_bwd(const AttnParams& p, float* delta, bool simt, cudaStream_t stream) {
  dispatch_head_dim(p.head_dim, [&](auto d) { launch_bwd<T, decltype(d)::value>(p, delta, simt, stream); });
}

}  // namespace attn

void flash_attn_bwd_cuda(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                         uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_seqlens_q,
                         uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                         const std::vector<int64_t>& dkv_strides, const std::vector<int64_t>& lse_strides,
                         double scale, int64_t window_left, int64_t window_right, int dtype, bool deterministic,
                         int device, uintptr_t stream, int algo, int64_t total_q, int64_t total_k,
                         uintptr_t delta_ws, int64_t delta_capacity, uintptr_t dq_accum_ws,
                         int64_t dq_accum_capacity, double softcap, uintptr_t alibi_slopes,
                         int64_t alibi_batch_stride, double dropout_p, uint64_t dropout_seed) {
  AttnParams p = make_attn_params(q, k, v, cu_seqlens_q, cu_seqlens_k, 0, batch, seqlen_q, seqlen_k, n_heads,
                                  n_kv_heads, head_dim, q_strides, k_strides, v_strides, o_strides, lse_strides,
                                  scale, window_left, window_right, dtype);
  set_packed_totals(p, total_q, total_k);
  set_score_mods(p, softcap, alibi_slopes, alibi_batch_stride);
  set_dropout(p, dropout_p, dropout_seed);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  p.dout = reinterpret_cast<const void*>(dout);
  p.dlse = reinterpret_cast<const void*>(dlse);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  copy_strides(p.dkv_strides, dkv_strides, 3, "dkv_strides");
  PYLLM_CHECK(algo >= 0 && algo <= 2, "flash_attn: backward algo must be 0 (mma), 1 (simt) or 2 (atomic), got ", algo);
  const bool simt = algo == 1;
  // Varlen: seqlen_q / seqlen_k are the max_seqlen bounds; the packed totals say what exists.
  const int64_t rows_q = p.cu_seqlens_q ? p.total_q : seqlen_q, rows_k = p.cu_seqlens_q ? p.total_k : seqlen_k;
  if (batch == 0 || (rows_q == 0 && rows_k == 0)) return;
  PYLLM_CHECK(rows_q == 0 || (q && out && lse && dout && dq), "flash_attn: null data pointer for a non-empty tensor");
  PYLLM_CHECK(rows_k == 0 || (k && v && dk && dv), "flash_attn: null data pointer for a non-empty tensor");
  DeviceGuard guard(device);
  attn::check_cuda_attn_args(p, dtype, device);
  // The mma kernels store dq, dk, dv two elements (4 bytes) at a time.
  bool even_strides = true;
  for (int i = 0; i < 3; ++i) even_strides = even_strides && o_strides[i] % 2 == 0 && dkv_strides[i] % 2 == 0;
  PYLLM_CHECK(simt || (even_strides && dq % 4 == 0 && dk % 4 == 0 && dv % 4 == 0),
              "flash_attn: dq, dk, dv must be 4-byte aligned with even strides on CUDA");
  // ... and they read dout with 16-byte cp.async chunks, as q, k, v (checked above).
  bool strides_of_8 = true;
  for (int i = 0; i < 3; ++i) strides_of_8 = strides_of_8 && o_strides[i] % 8 == 0;
  PYLLM_CHECK(simt || seqlen_q == 0 || (strides_of_8 && dout % 16 == 0),
              "flash_attn: dout must be 16-byte aligned with strides that are multiples of 8 elements on CUDA");
  // delta has the lse layout: (B, H, Tq) or, varlen, (H, total_q) with lse_strides (0, total_q).
  // Sized by its last index + 1, not batch * lse_strides[0] (or n_heads * lse_strides[1]): torch
  // calls an lse contiguous whatever the stride of a size-1 dim, and with B = 1 (or H = 1) that
  // stride can be anything, e.g. 1, which under-allocated delta for the writes below. The caller
  // allocates it (torch's caching allocator: cudaMallocAsync's default pool hands memory back to
  // the driver at every sync unless told otherwise, a remap per call).
  PYLLM_CHECK(lse_strides[0] >= 0 && lse_strides[1] >= 0, "flash_attn: bad lse_strides");
  const int64_t delta_elems =
      rows_q > 0 ? (p.cu_seqlens_q ? 0 : (batch - 1) * lse_strides[0]) + (n_heads - 1) * lse_strides[1] + rows_q : 0;
  PYLLM_CHECK(delta_elems == 0 || (delta_ws && delta_ws % 4 == 0 && delta_capacity >= delta_elems),
              "flash_attn: the backward's delta workspace needs ", delta_elems, " fp32 elements (aligned), got ",
              delta_capacity);
  // algo 2 where it exists: the (rows_q, n_heads, head_dim) fp32 dQ accumulator, from the caller
  // (torch's caching allocator, as delta), 16-byte aligned for the conversion's float4 reads.
  const int64_t accum_rows = p.cu_seqlens_q ? p.total_q : batch * seqlen_q;
  const bool atomic_dq = algo == 2 && !deterministic && accum_rows > 0 && !has_score_mods(p) &&
                         attn::atomic_dq_available(head_dim, device) && !has_dropout(p);
  const int64_t accum_elems = atomic_dq ? accum_rows * n_heads * head_dim : 0;
  PYLLM_CHECK(!atomic_dq || (dq_accum_ws && dq_accum_ws % 16 == 0 && dq_accum_capacity >= accum_elems),
              "flash_attn: the atomic backward's dq accumulator needs ", accum_elems,
              " fp32 elements (16-byte aligned), got ", dq_accum_capacity);
  p.deterministic = !atomic_dq;
  const cudaStream_t s = as_stream(stream);
  float* delta = delta_elems ? reinterpret_cast<float*>(delta_ws) : nullptr;
  if (dtype == int(DType::f16))
    attn::dispatch_bwd<__half>(p, delta, simt, s);
  else
    attn::dispatch_bwd<__nv_bfloat16>(p, delta, simt, s);
  if (!simt)
    attn::launch_bwd_mma(p, delta, device, s, atomic_dq ? reinterpret_cast<float*>(dq_accum_ws) : nullptr,
                          accum_rows);
}

}  // namespace pyllm
