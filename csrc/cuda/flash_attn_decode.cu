// Split-KV decode attention over a KV cache (flash_attn_with_kvcache on CUDA).
// Partly verified: ran on an H200 (2026-11-30): compute-sanitizer clean, its small cases right; the CUDA test suite not yet run through (see README).
// One decode call (B = 1, T = 2048) took 0.23-0.26 ms there, host-bound (the Python around it).
//
// With one query token per sequence, (batch x heads) CTAs would leave most SMs idle while each
// streams its whole cache. So the keys a query sees are cut into n_splits ranges, one CTA each
// (n_splits chosen so that there are >= 2 CTAs per SM, at least 64 keys per split):
//   partial kernel: per (query row, head, split), 4 warps take the split's keys round-robin; a
//     lane holds head-dim elements lane + 32c, q.k reduces over the warp; online softmax per warp,
//     then the 4 warps merge through shared memory into (lse_s, o_s = O_s / l_s)
//   combine kernel: per (query row, head), one warp: lse = logsumexp_s lse_s,
//     out = sum_s exp(lse_s - lse) o_s
// Memory: reads K and V of the used cache once per query head (GQA heads re-read from L2);
// partials are n_splits x (D + 1) fp32 per query row and head (stream-ordered allocation).
// The cache is appended to by the Python side before this runs (index_put, in place). The cache
// lengths are not read on the host (a sync per decode step): seq_info clamps them to [0, capacity].
// flash-attn's cache layouts (cache_batch_idx, cache_leftpad, a paged block_table): each key row is
// found through kv_offset, its indices clamped (unverified on a GPU, 2026-12-03).
// Capped scores and ALiBi: ScoreMod (flash_attn_common.cuh) on each key's score (unverified on a GPU,
// 2026-12-05).
// FP32 SIMT math: decode is bandwidth-bound (2 FLOPs per byte of K and V read).
#include <algorithm>
#include <cmath>

#include "cuda/cuda_ops.h"
#include "cuda/flash_attn_common.cuh"

namespace pyllm {
namespace attn {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
// Not yet measured: at least this many keys per split, so a split's fixed cost (q load, merge,
// partial write) stays small against its K / V traffic.
constexpr int64_t kMinKeysPerSplit = 64;

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads)
    flash_attn_decode_partial_kernel(const AttnParams p, int n_splits, float* o_part, float* lse_part) {
  constexpr int C = D / 32;
  __shared__ float s_m[kDecodeWarps], s_l[kDecodeWarps], s_o[kDecodeWarps][D];
  const int64_t flat = blockIdx.x;
  const int split = int(flat % n_splits);
  const int64_t rest = flat / n_splits;
  const int h = int(rest % p.n_heads);
  const int64_t bi = rest / p.n_heads;  // = b * seqlen_q + i
  const int64_t b = bi / p.seqlen_q, i = bi % p.seqlen_q;
  const int hk = h / int(p.n_heads / p.n_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo s = seq_info(p, b);

  // This split's share of the keys query i sees.
  const int64_t lo = key_lo(p, i, s.len_q, s.len_k), hi = key_hi(p, i, s.len_q, s.len_k);
  const int64_t span = hi > lo ? hi - lo : 0, per = (span + n_splits - 1) / n_splits;
  const int64_t k_begin = lo + split * per, k_end = min(hi, k_begin + per);

  const T* q_row = static_cast<const T*>(p.q) + b * p.q_strides[0] + i * p.q_strides[1] + h * p.q_strides[2];
  float q[C], o[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    q[c] = to_f32(q_row[lane + 32 * c]) * float(p.scale);
    o[c] = 0.f;
  }
  // Capped or biased scores (natural-log units; the scale is in q already). ALiBi distance of key
  // j: dist_i - j.
  const ScoreMod mod(p, b, h, 1.f, 1.f);
  const int64_t dist_i = i + (s.len_k - s.len_q);
  float m = -INFINITY, l = 0.f;
  for (int64_t j = k_begin + warp; j < k_end; j += kDecodeWarps) {
    const T* k_row = static_cast<const T*>(p.k) + kv_offset(p, p.k_strides, b, s.k_start + j, hk);
    const T* v_row = static_cast<const T*>(p.v) + kv_offset(p, p.v_strides, b, s.k_start + j, hk);
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) dot += q[c] * to_f32(k_row[lane + 32 * c]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (mod.on()) {
      float dcap;
      dot = mod.score(dot, int(dist_i - j), dcap);
    }
    // NaN scores: fmaxf skips them, expf(NaN) carries them into o and l.
    const float m_new = fmaxf(m, dot);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float corr = expf(m - m_use), pj = expf(dot - m_use);
    l = l * corr + pj;
#pragma unroll
    for (int c = 0; c < C; ++c) o[c] = o[c] * corr + pj * to_f32(v_row[lane + 32 * c]);
    m = m_new;
  }
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int c = 0; c < C; ++c) s_o[warp][lane + 32 * c] = o[c];
  __syncthreads();
  if (warp == 0) {
    float m_all = -INFINITY;
    for (int w = 0; w < kDecodeWarps; ++w) m_all = fmaxf(m_all, s_m[w]);
    const float m_use = m_all == -INFINITY ? 0.f : m_all;
    float l_all = 0.f, acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = 0.f;
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float f = expf(s_m[w] - m_use);  // a warp that saw nothing: exp(-inf) = 0
      l_all += f * s_l[w];
#pragma unroll
      for (int c = 0; c < C; ++c) acc[c] += f * s_o[w][lane + 32 * c];
    }
    const int64_t slot = (bi * p.n_heads + h) * n_splits + split;
    const bool empty = l_all == 0.f;
    const float inv = empty ? 0.f : 1.f / l_all;
#pragma unroll
    for (int c = 0; c < C; ++c) o_part[slot * D + lane + 32 * c] = acc[c] * inv;
    if (lane == 0) lse_part[slot] = empty ? -INFINITY : m_use + logf(l_all);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads)
    flash_attn_decode_combine_kernel(const AttnParams p, int n_splits, const float* o_part, const float* lse_part) {
  constexpr int C = D / 32;
  const int64_t row = int64_t(blockIdx.x) * kDecodeWarps + threadIdx.x / 32;  // (b * Tq + i) * H + h
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.seqlen_q * p.n_heads) return;  // whole warps
  const int h = int(row % p.n_heads);
  const int64_t bi = row / p.n_heads, b = bi / p.seqlen_q, i = bi % p.seqlen_q;
  float lmax = -INFINITY;
  for (int sp = 0; sp < n_splits; ++sp) lmax = fmaxf(lmax, lse_part[row * n_splits + sp]);
  const float l_use = lmax == -INFINITY ? 0.f : lmax;
  float wsum = 0.f, acc[C];
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = 0.f;
  for (int sp = 0; sp < n_splits; ++sp) {
    const float w = expf(lse_part[row * n_splits + sp] - l_use);
    wsum += w;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] += w * o_part[(row * n_splits + sp) * D + lane + 32 * c];
  }
  const bool empty = wsum == 0.f;
  const float inv = empty ? 0.f : 1.f / wsum;
  T* dst = static_cast<T*>(p.out) + b * p.o_strides[0] + i * p.o_strides[1] + h * p.o_strides[2];
#pragma unroll
  for (int c = 0; c < C; ++c) dst[lane + 32 * c] = from_f32<T>(acc[c] * inv);
  if (lane == 0)
    static_cast<float*>(p.lse)[b * p.lse_strides[0] + h * p.lse_strides[1] + i] = empty ? INFINITY : l_use + logf(wsum);
}

template <typename T, int D>
void launch_decode(const AttnParams& p, int n_splits, float* o_part, float* lse_part, cudaStream_t stream) {
  const int64_t partial_blocks = p.batch * p.seqlen_q * p.n_heads * n_splits;
  const int64_t rows = p.batch * p.seqlen_q * p.n_heads;
  PYLLM_CHECK(partial_blocks <= 0x7fffffff, "flash_attn_with_kvcache: too many (query, head, split) blocks");
  flash_attn_decode_partial_kernel<T, D><<<unsigned(partial_blocks), kDecodeThreads, 0, stream>>>(p, n_splits, o_part,
                                                                                                 lse_part);
  PYLLM_CUDA_CHECK_LAUNCH("flash_attn_decode_partial_kernel");
  flash_attn_decode_combine_kernel<T, D>
      <<<unsigned((rows + kDecodeWarps - 1) / kDecodeWarps), kDecodeThreads, 0, stream>>>(p, n_splits, o_part, lse_part);
  PYLLM_CUDA_CHECK_LAUNCH("flash_attn_decode_combine_kernel");
}

template <typename T>
void dispatch_decode(const AttnParams& p, int n_splits, float* o_part, float* lse_part, cudaStream_t stream) {
  dispatch_head_dim(p.head_dim,
                    [&](auto d) { launch_decode<T, decltype(d)::value>(p, n_splits, o_part, lse_part, stream); });
}

}  // namespace attn

namespace {
// One decode call's split count and workspace size. The workspace query
// (flash_attn_decode_workspace_cuda, which Python allocates from) and the launch both call this
// with the same arguments, so they agree by construction; the launch still checks the bytes it
// is given against its own plan, so a caller that passes other sizes gets an error, never an
// under-sized workspace.
struct DecodePlan {
  int n_splits = 1;
  int64_t workspace_bytes = 0;  // n_splits x (head_dim + 1) fp32 per (query row, head)
};

// Splits of the KV length: enough blocks for two waves over the SMs, none shorter than
// kMinKeysPerSplit keys, at most 128.
DecodePlan decode_plan(int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads, int64_t head_dim,
                       int device) {
  DecodePlan plan;
  if (batch <= 0 || seqlen_q <= 0) return plan;
  int sms = 0;
  PYLLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t rows = std::max<int64_t>(1, batch * seqlen_q * n_heads);
  const int64_t by_occupancy = (2 * int64_t(sms) + rows - 1) / rows;
  const int64_t by_length = std::max<int64_t>(1, capacity / attn::kMinKeysPerSplit);
  plan.n_splits = int(std::max<int64_t>(1, std::min<int64_t>({by_occupancy, by_length, 128})));
  plan.workspace_bytes = batch * seqlen_q * n_heads * plan.n_splits * (head_dim + 1) * int64_t(sizeof(float));
  return plan;
}
}  // namespace

int64_t flash_attn_decode_workspace_cuda(int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads,
                                         int64_t head_dim, int device) {
  if (batch <= 0 || seqlen_q <= 0) return 0;
  DeviceGuard guard(device);
  return decode_plan(batch, seqlen_q, capacity, n_heads, head_dim, device).workspace_bytes;
}

void flash_attn_decode_cuda(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, uintptr_t lse,
                            uintptr_t seqused_k, int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads,
                            int64_t n_kv_heads, int64_t head_dim, const std::vector<int64_t>& q_strides,
                            const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides,
                            const std::vector<int64_t>& o_strides, const std::vector<int64_t>& lse_strides,
                            double scale, int64_t window_left, int64_t window_right, int dtype, int device,
                            uintptr_t stream, uintptr_t workspace, int64_t workspace_bytes, uintptr_t kv_batch_idx,
                            uintptr_t kv_leftpad, uintptr_t block_table, int64_t block_table_stride,
                            int64_t page_size, int64_t kv_rows, double softcap, uintptr_t alibi_slopes,
                            int64_t alibi_batch_stride) {
  AttnParams p = make_attn_params(q, k_cache, v_cache, 0, 0, seqused_k, batch, seqlen_q, capacity, n_heads,
                                  n_kv_heads, head_dim, q_strides, k_strides, v_strides, o_strides, lse_strides,
                                  scale, window_left, window_right, dtype);
  set_score_mods(p, softcap, alibi_slopes, alibi_batch_stride);
  // Unverified on a GPU (2026-12-03): the cache layouts, their indices clamped in kv_offset.
  set_kv_layout(p, kv_batch_idx, kv_leftpad, block_table, block_table_stride, page_size, kv_rows);
  p.out = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  PYLLM_CHECK(dtype == int(DType::f16) || dtype == int(DType::bf16),
              "flash_attn_with_kvcache: CUDA dtype must be float16 or bfloat16, got ", dtype_name(dtype));
  // Empty tensors have null data pointers (batch 0: seqused_k too; capacity 0: the caches), so
  // these checks come after the early return, and a zero-capacity cache reads no key.
  if (batch == 0 || seqlen_q == 0) return;
  PYLLM_CHECK(seqused_k != 0, "flash_attn_with_kvcache: cache lengths (seqused_k) are required");
  PYLLM_CHECK(q && out && lse && ((k_cache && v_cache) || capacity == 0), "flash_attn_with_kvcache: null data pointer");
  DeviceGuard guard(device);
  const int64_t rows = batch * seqlen_q * n_heads;
  const DecodePlan plan = decode_plan(batch, seqlen_q, capacity, n_heads, head_dim, device);
  const int n_splits = plan.n_splits;
  // The split partials live in a workspace the caller allocates (torch's caching allocator; see
  // flash_attn_decode_workspace_cuda for its size): cudaMallocAsync's default pool would hand the
  // memory back to the driver at every sync, a remap per decode step.
  PYLLM_CHECK(workspace && workspace % 16 == 0 && workspace_bytes >= plan.workspace_bytes,
              "flash_attn_with_kvcache: the workspace needs ", plan.workspace_bytes, " bytes, 16-byte aligned "
              "(flash_attn_decode_workspace_cuda with the same arguments), got ", workspace_bytes);
  const cudaStream_t s = as_stream(stream);
  float* o_part = reinterpret_cast<float*>(workspace);
  float* lse_part = o_part + rows * n_splits * head_dim;
  if (dtype == int(DType::f16))
    attn::dispatch_decode<__half>(p, n_splits, o_part, lse_part, s);
  else
    attn::dispatch_decode<__nv_bfloat16>(p, n_splits, o_part, lse_part, s);
}

}  // namespace pyllm
