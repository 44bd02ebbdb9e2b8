// The arguments of the FlashAttention kernels (csrc/cpu/flash_attn.cpp, csrc/cuda/flash_attn_*.cu),
// shared so that the CPU twin and the CUDA kernels read one definition of the layout and the mask.
//
// Layout: q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D) with any batch / token / head strides and a
// contiguous last dim; out, dout and dq share one (batch, token, head) stride triple, dk and dv
// another. Varlen: the batch dim is the sequence index, tokens are packed into one (total, H, D)
// tensor and sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]; batch strides are then 0.
// A KV cache (decode) gives each sequence's key count in seqused_k instead, keys starting at
// token 0 of their batch row, or (CPU kernels only, flash-attn's kv-cache options) at token
// kv_leftpad[b] of batch row kv_batch_idx[b], or, paged, token t of sequence b at row t % page_size
// of block block_table[b][t / page_size] (k and v then (blocks, page_size, Hkv, D)).
// LSE: element (b, h, t) at lse[b * lse_batch_stride + h * lse_head_stride + token index], where
// the token index is the packed one for varlen ((H, total) layout) and t otherwise ((B, H, Tq)).
//
// Mask, aligned bottom-right (flash-attn >= 2.1): with Lq queries and Lk keys in a sequence,
// query i sits at key position i + (Lk - Lq), and sees key j iff
//   j <= i + (Lk - Lq) + window_right   (causal is window_right = 0)
//   j >= i + (Lk - Lq) - window_left    (window_left < 0: unlimited)
// A query that sees no key gets out = 0 and lse = +inf (so that exp(s - lse) = 0 in backward).
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace pyllm {

struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  void* lse = nullptr;  // fp32 (fp64 for fp64 inputs on the CPU, see flash_attn.cpp)
  // backward only
  const void* dout = nullptr;
  const void* dlse = nullptr;  // gradient flowing into lse (null: none), lse's dtype and layout
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  const int32_t* cu_seqlens_q = nullptr;  // varlen: (batch + 1,), else null
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;  // KV cache: (batch,) key counts, else null
  // KV cache only, CPU kernels only (see the layout above); null: none.
  const int32_t* kv_batch_idx = nullptr;  // (batch,): sequence b's row of k / v (cache_batch_idx)
  const int32_t* kv_leftpad = nullptr;    // (batch,): sequence b's first key in its row (cache_leftpad)
  const int32_t* block_table = nullptr;   // (batch, block_table_stride): paged k / v
  int64_t block_table_stride = 0, page_size = 0;
  int64_t kv_rows = 0;  // k / v's batch rows (cache_batch_idx) or blocks (block_table): indices are clamped to it

  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;  // seqlen_*: the max over sequences for varlen
  // Varlen on CUDA: the packed token counts of q and k. The host does not read cu_seqlens there
  // (a device sync), so seq_info clamps them against these: any contents stay in bounds. -1: the
  // contents were checked on the host (the CPU launchers), nothing to clamp.
  int64_t total_q = -1, total_k = -1;
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t q_strides[3] = {0, 0, 0};  // (batch, token, head), in elements
  int64_t k_strides[3] = {0, 0, 0};
  int64_t v_strides[3] = {0, 0, 0};
  int64_t o_strides[3] = {0, 0, 0};   // out, dout, dq
  int64_t dkv_strides[3] = {0, 0, 0};  // dk, dv
  int64_t lse_strides[2] = {0, 0};    // (batch, head); the token stride is 1
  double scale = 1.0;
  double softcap = 0.0;  // > 0: the scaled scores capped as softcap * tanh(s / softcap) (Gemma 2)
  // ALiBi: fp32 slopes, sequence b's head h at alibi_slopes[b * alibi_batch_stride + h] (stride 0:
  // one (n_heads,) set for every sequence); null: none. See alibi_distance.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  int64_t window_left = -1, window_right = -1;  // causal folded in as window_right = 0
  // Dropout on the probabilities (dropout_p > 0; not for KV-cache calls): (query i, key j) of
  // sequence b, query head h is kept iff its word (common/counter_rng.h's AttnDropoutKey, keyed by
  // dropout_seed) >= dropout_threshold, and the kept ones scaled by dropout_scale = 1 / (1 - p).
  // The LSE is of the whole softmax, before dropout (flash-attn's).
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0;
  uint32_t dropout_threshold = 0;
  double dropout_scale = 1.0;
  bool deterministic = false;
  int dtype = 0;
};

// ALiBi's bias, -slope * |alibi_distance|, is added to the scaled (and capped) score of query i and
// key j, as flash-attn's alibi_slopes (Press et al. 2022): the distance from the key to the query's
// own key position (bottom-right aligned, as the mask), for causal and non-causal calls alike.
PYLLM_HD int64_t alibi_distance(int64_t i, int64_t j, int64_t len_q, int64_t len_k) { return i + (len_k - len_q) - j; }

// Whether the scores are capped or biased (the CUDA launchers keep the experimental tiles to calls
// without).
PYLLM_HD bool has_score_mods(const AttnParams& p) { return p.softcap > 0 || p.alibi_slopes != nullptr; }

PYLLM_HD bool has_dropout(const AttnParams& p) { return p.dropout_p > 0; }

// Per-sequence view: where sequence b's tokens start and how many there are.
struct SeqInfo {
  int64_t q_start, k_start, len_q, len_k;
};

PYLLM_HD int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Sequence b's [start, start + len) from cumulative lengths. With total >= 0 (contents not checked
// on the host), clamped so that start + len <= total and len <= max_len (the launch covers max_len
// rows per sequence): bad contents give wrong answers, never an out-of-bounds access.
PYLLM_HD void packed_range(const int32_t* cu, int64_t b, int64_t total, int64_t max_len, int64_t& start,
                           int64_t& len) {
  start = cu[b];
  int64_t end = cu[b + 1];
  if (total >= 0) {
    start = clamp_to(start, 0, total);
    end = clamp_to(end, start, total);
    end = end - start > max_len ? start + max_len : end;
  }
  len = end - start;
}

PYLLM_HD SeqInfo seq_info(const AttnParams& p, int64_t b) {
  SeqInfo s;
  if (p.cu_seqlens_q) {
    packed_range(p.cu_seqlens_q, b, p.total_q, p.seqlen_q, s.q_start, s.len_q);
  } else {
    s.q_start = 0;
    s.len_q = p.seqlen_q;
  }
  if (p.cu_seqlens_k) {
    packed_range(p.cu_seqlens_k, b, p.total_k, p.seqlen_k, s.k_start, s.len_k);
  } else {
    s.k_start = 0;
    // KV cache lengths are checked on the CPU, not on CUDA (a sync): clamped to the capacity.
    s.len_k = p.seqused_k ? clamp_to(p.seqused_k[b], 0, p.seqlen_k) : p.seqlen_k;
    if (p.kv_leftpad) {  // keys [leftpad, seqused): the cache's first leftpad rows are not the sequence's
      s.k_start = clamp_to(p.kv_leftpad[b], 0, s.len_k);
      s.len_k -= s.k_start;
    }
  }
  return s;
}

// Element offset of cache position `token` (s.k_start + key) of sequence b, head h, in k or v (their
// strides), wherever the KV-cache options put it: a block of a paged cache, another batch row, or
// row b. Indices are clamped into the cache: the CPU launcher checks them on the host, CUDA's are
// not read there (a sync per decode step), so bad ones give wrong answers, never stray reads.
PYLLM_HD int64_t kv_offset(const AttnParams& p, const int64_t* strides, int64_t b, int64_t token, int64_t h) {
  int64_t row = b;
  if (p.block_table) {
    row = clamp_to(p.block_table[b * p.block_table_stride + token / p.page_size], 0, p.kv_rows - 1);
    token %= p.page_size;
  } else if (p.kv_batch_idx) {
    row = clamp_to(p.kv_batch_idx[b], 0, p.kv_rows - 1);
  }
  return row * strides[0] + token * strides[1] + h * strides[2];
}

// Keys [lo, hi) that query i of a (len_q, len_k) sequence sees; lo >= hi when it sees none.
PYLLM_HD int64_t key_lo(const AttnParams& p, int64_t i, int64_t len_q, int64_t len_k) {
  if (p.window_left < 0) return 0;
  int64_t lo = i + (len_k - len_q) - p.window_left;
  return lo < 0 ? 0 : lo;
}
PYLLM_HD int64_t key_hi(const AttnParams& p, int64_t i, int64_t len_q, int64_t len_k) {
  if (p.window_right < 0) return len_k;
  int64_t hi = i + (len_k - len_q) + p.window_right + 1;
  return hi > len_k ? len_k : hi;
}
// Queries [lo, hi) that see key j: the inverse of the two bounds above (both are monotone in i).
PYLLM_HD int64_t query_lo(const AttnParams& p, int64_t j, int64_t len_q, int64_t len_k) {
  if (p.window_right < 0) return 0;
  int64_t lo = j - (len_k - len_q) - p.window_right;
  return lo < 0 ? 0 : lo;
}
PYLLM_HD int64_t query_hi(const AttnParams& p, int64_t j, int64_t len_q, int64_t len_k) {
  if (p.window_left < 0) return len_q;
  int64_t hi = j - (len_k - len_q) + p.window_left + 1;
  return hi > len_q ? len_q : hi;
}

}  // namespace pyllm

#include <vector>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/checks.h"
#include "common/dtype.h"

namespace pyllm {

// Host side: packs the launchers' flat arguments (as bound in csrc/bind.cpp) and re-checks what
// does not need the tensors' contents. Contents (cu_seqlens values) are checked by the CPU
// launchers directly; the CUDA kernels clamp them instead (see AttnParams::total_q), and Python
// checks them on the host when asked to (see pyllm/ops/flash_attn.py).
inline void copy_strides(int64_t* dst, const std::vector<int64_t>& src, size_t n, const char* name) {
  PYLLM_CHECK(src.size() == n, "flash_attn: ", name, " must have ", n, " entries, got ", src.size());
  for (size_t i = 0; i < n; ++i) dst[i] = src[i];
}

// CUDA launchers, varlen: the packed token counts the kernels clamp cu_seqlens against.
inline void set_packed_totals(AttnParams& p, int64_t total_q, int64_t total_k) {
  if (!p.cu_seqlens_q) return;
  PYLLM_CHECK(total_q >= 0 && total_k >= 0, "flash_attn: varlen on CUDA needs total_q and total_k (the packed "
              "token counts of q and k), got ", total_q, " and ", total_k);
  p.total_q = total_q, p.total_k = total_k;
}

// Calls fn(std::integral_constant<int, D>{}) for the supported head dims: the one place that maps the
// runtime head_dim to the kernels' template parameter, CPU and CUDA launchers alike.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, Fn fn) {
  switch (head_dim) {
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 96: fn(std::integral_constant<int, 96>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    case 256: fn(std::integral_constant<int, 256>{}); break;
    default: PYLLM_CHECK(false, "flash_attn: head_dim must be one of 32, 64, 96, 128, 256, got ", head_dim);
  }
}

inline void check_attn_shape(const AttnParams& p) {
  PYLLM_CHECK(p.batch >= 0 && p.seqlen_q >= 0 && p.seqlen_k >= 0,
              "flash_attn: batch and sequence lengths must be >= 0, got ", p.batch, ", ", p.seqlen_q, ", ",
              p.seqlen_k);
  PYLLM_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "flash_attn: n_heads (", p.n_heads, ") must be a positive multiple of n_kv_heads (", p.n_kv_heads, ")");
  PYLLM_CHECK(p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 96 || p.head_dim == 128 || p.head_dim == 256,
              "flash_attn: head_dim must be one of 32, 64, 96, 128, 256, got ", p.head_dim);
  PYLLM_CHECK(p.window_left >= -1 && p.window_right >= -1,
              "flash_attn: window sizes must be >= -1 (-1 = unlimited), got (", p.window_left, ", ", p.window_right, ")");
  PYLLM_CHECK(!(p.cu_seqlens_q == nullptr) == !(p.cu_seqlens_k == nullptr),
              "flash_attn: cu_seqlens_q and cu_seqlens_k come together (varlen) or not at all");
  PYLLM_CHECK(!(p.seqused_k && p.cu_seqlens_k), "flash_attn: seqused_k (KV cache) does not combine with varlen");
}

// The fields every launcher fills the same way, checked: pointers of q/k/v and the sequence
// metadata, sizes, strides, scale, window, dtype code. Each launcher adds its outputs (and, for
// the backward, the gradients) and checks what its dtype and device support.
inline AttnParams make_attn_params(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_seqlens_q,
                                   uintptr_t cu_seqlens_k, uintptr_t seqused_k, int64_t batch, int64_t seqlen_q,
                                   int64_t seqlen_k, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                   const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                                   const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                                   const std::vector<int64_t>& lse_strides, double scale, int64_t window_left,
                                   int64_t window_right, int dtype) {
  AttnParams p;
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.cu_seqlens_q = reinterpret_cast<const int32_t*>(cu_seqlens_q);
  p.cu_seqlens_k = reinterpret_cast<const int32_t*>(cu_seqlens_k);
  p.seqused_k = reinterpret_cast<const int32_t*>(seqused_k);
  p.batch = batch, p.seqlen_q = seqlen_q, p.seqlen_k = seqlen_k;
  p.n_heads = n_heads, p.n_kv_heads = n_kv_heads, p.head_dim = head_dim;
  copy_strides(p.q_strides, q_strides, 3, "q_strides");
  copy_strides(p.k_strides, k_strides, 3, "k_strides");
  copy_strides(p.v_strides, v_strides, 3, "v_strides");
  copy_strides(p.o_strides, o_strides, 3, "o_strides");
  copy_strides(p.lse_strides, lse_strides, 2, "lse_strides");
  // A window longer than any sequence is the unlimited one; capping it at 2^62 keeps the mask
  // bounds (key_hi: i + (len_k - len_q) + window_right + 1, query_hi likewise) from overflowing
  // int64: window = (sys.maxsize, sys.maxsize) masked every key instead of none.
  constexpr int64_t kWindowCap = int64_t(1) << 62;
  window_left = window_left > kWindowCap ? kWindowCap : window_left;
  window_right = window_right > kWindowCap ? kWindowCap : window_right;
  p.scale = scale, p.window_left = window_left, p.window_right = window_right, p.dtype = dtype;
  check_attn_shape(p);
  PYLLM_CHECK(std::isfinite(scale), "flash_attn: softmax_scale must be finite, got ", scale);
  // (the kernels scale by it in fp32: 1e39 was inf there, every output NaN)
  PYLLM_CHECK(dtype == int(DType::f64) || std::isfinite(static_cast<float>(scale)),
              "flash_attn: softmax_scale ", scale, " is inf in fp32, the kernels' math type for ", dtype_name(dtype));
  return p;
}

// Capped scores and ALiBi (see the fields above), checked as far as the host can without reading
// the slopes: CUDA's live in device memory (Python checks their values where it can read them); the
// CPU launchers read them too (flash_attn.cpp's set_score_mods_read). A cap that rounds to 0 in the math type
// would read as "no cap" and leave the scores uncapped without a word.
inline void set_score_mods(AttnParams& p, double softcap, uintptr_t alibi_slopes, int64_t alibi_batch_stride) {
  PYLLM_CHECK(std::isfinite(softcap) && softcap >= 0, "flash_attn: softcap must be finite and >= 0, got ", softcap);
  PYLLM_CHECK(softcap == 0 || positive_in_math_type(softcap, p.dtype), "flash_attn: softcap ", softcap,
              " rounds to 0 in fp32, the math type of ", dtype_name(p.dtype), " inputs");
  p.softcap = softcap;
  if (!alibi_slopes) return;
  PYLLM_CHECK(alibi_batch_stride == 0 || alibi_batch_stride >= p.n_heads, "flash_attn: alibi_batch_stride must be 0 ",
              "(one slope per head for every sequence) or at least n_heads (", p.n_heads, "), got ", alibi_batch_stride);
  p.alibi_slopes = reinterpret_cast<const float*>(alibi_slopes);
  p.alibi_batch_stride = alibi_batch_stride;
}

// Dropout on the probabilities (see the fields above): p in [0, 1). The threshold is p * 2^32
// rounded to nearest, so that p is kept to 2^-33; p = 0: none.
inline void set_dropout(AttnParams& p, double dropout_p, uint64_t seed) {
  PYLLM_CHECK(dropout_p >= 0 && dropout_p < 1, "flash_attn: dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = dropout_p;
  p.dropout_seed = seed;
  p.dropout_threshold = uint32_t(std::min(std::nearbyint(dropout_p * 4294967296.0), 4294967295.0));
  p.dropout_scale = 1.0 / (1.0 - dropout_p);
}

// The KV-cache options' pointers and shapes (no contents: those the CPU launcher reads itself).
// seqlen_k is the capacity a sequence addresses: with a block_table, its row's blocks times page_size.
inline void set_kv_layout(AttnParams& p, uintptr_t kv_batch_idx, uintptr_t kv_leftpad, uintptr_t block_table,
                          int64_t block_table_stride, int64_t page_size, int64_t kv_rows) {
  if (!kv_batch_idx && !kv_leftpad && !block_table) return;
  PYLLM_CHECK(p.seqused_k, "flash_attn: cache_batch_idx, cache_leftpad and block_table are for KV-cache calls");
  PYLLM_CHECK(!(kv_batch_idx && block_table), "flash_attn: a paged cache (block_table) takes no cache_batch_idx");
  PYLLM_CHECK(!(kv_batch_idx || block_table) || kv_rows > 0, "flash_attn: kv_rows (the cache's batch rows or blocks) ",
              "must be > 0 with cache_batch_idx or block_table, got ", kv_rows);
  p.kv_batch_idx = reinterpret_cast<const int32_t*>(kv_batch_idx);
  p.kv_leftpad = reinterpret_cast<const int32_t*>(kv_leftpad);
  p.block_table = reinterpret_cast<const int32_t*>(block_table);
  p.kv_rows = kv_rows;
  if (p.block_table) {
    PYLLM_CHECK(page_size > 0 && block_table_stride > 0 && block_table_stride * page_size >= p.seqlen_k,
                "flash_attn: a paged cache needs page_size > 0 and block_table_stride * page_size >= its capacity (",
                p.seqlen_k, "), got page_size ", page_size, ", block_table_stride ", block_table_stride);
    p.block_table_stride = block_table_stride, p.page_size = page_size;
  }
}

}  // namespace pyllm
