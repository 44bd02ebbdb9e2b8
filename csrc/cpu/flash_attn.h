// Pieces of the CPU FlashAttention shared by its two translation units: flash_attn.cpp (every
// dtype and ISA) and flash_attn_amx.cpp (the bf16 forward and backward on AMX tiles, compiled
// with the AMX flags). Internal linkage (an anonymous namespace), so each file gets its own copy and no
// function compiled with the AMX flags can stand in for one of the other file's.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <utility>
#include <vector>

#include "common/attn_params.h"
#include "common/dtype.h"

namespace pyllm {

// flash_attn_amx.cpp: whether this build has the AMX forward and the CPU and kernel let this
// process use it (cpuid AMX-BF16 and the tile state granted by arch_prctl; asked once per process).
bool flash_attn_amx_usable();
// The bf16 forward and backward on AMX tiles (only when flash_attn_amx_usable()); params as
// flash_attn.cpp's fwd and bwd.
void flash_attn_fwd_amx(const AttnParams& p);
void flash_attn_bwd_amx(const AttnParams& p);

// flash_attn.cpp: bytes held in tile buffers now, by every thread (Aligned64 below counts them).
std::atomic<int64_t>& flash_attn_cpu_scratch_counter();
// flash_attn.cpp: what each kernel keeps on the calling thread (release_if_large below), one list
// for both files' kernels.
std::vector<std::pair<const void*, size_t>>& flash_attn_kept_by_kernel();

namespace {

// Tile sizes: 64 x 64 keeps S (16 KB fp32) and a D = 128 tile (32 KB) near L1 and gives the
// micro-kernel full 4-vector column chunks. 128-query forward blocks for unmasked problems ran
// 3-8% faster while every query block packed its own K / V tiles, and the same as 64 once the
// tiles were packed once per thread (T = 1024, D = 64 fp32 / 128 bf16, 1 thread, interleaved
// runs); masked problems lost ~5% to the wider diagonal blocks (T = 512 causal). Other sizes
// not measured.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

// Tile buffers (both files) are 64-byte aligned. AMX: each 64-byte tile row is then one cache
// line: rows across two lines (std::vector's 16-byte alignment) took ~20 ns per TDPBF16PS
// against ~8 aligned (2 x 2 blocks, operands hot in L1, 2026-11-30), and the forward's two
// matmuls ran at ~38 ns per TDPBF16PS (D = 64 and 128, same test; aligned: 10-17). The forward,
// 1 thread, same outputs bit for bit: 0.65-0.88x the time on the 11 bench rows (128c2048 29.0 ->
// 17.5 ms, 64n4096 91.6 -> 79.4 ms); the backward 0.70-0.75x (T = 1024 D = 128 non-causal 31.4 ->
// 23.5 ms, T = 2048 D = 64 causal 38.7 -> 26.7, min of 4 interleaved runs). flash_attn.cpp's
// fp32 tiles (64-byte vector loads, which split in two across cache lines): fp32 forward 0.94-0.96x
// the time, backward 0.96-0.98x (1 thread, B = 1, H = 8, T = 1024 / 2048, D = 64 / 128, non-causal,
// min of 3 interleaved runs, 2026-11-30).
// Every tile buffer's bytes are counted (flash_attn_cpu_scratch_bytes: what the threads keep between
// calls, for the tests); a relaxed atomic add per allocation, a few per thread per call.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    T* ptr = static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
    flash_attn_cpu_scratch_counter().fetch_add(int64_t(n * sizeof(T)), std::memory_order_relaxed);
    return ptr;
  }
  void deallocate(T* ptr, size_t n) {
    flash_attn_cpu_scratch_counter().fetch_sub(int64_t(n * sizeof(T)), std::memory_order_relaxed);
    ::operator delete(ptr, std::align_val_t(64));
  }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <typename T>
using TileBuffer = std::vector<T, Aligned64<T>>;

// Some scratch is per thread and kept across calls (static thread_local TileBuffers: the K / V of
// a head in the forwards, a GQA group's Q / dO / dQ in the backwards), so that a training step's
// calls do not allocate and page-fault it again each time. Without a bound, one long-context call
// would leave it at its largest on every OpenMP thread until exit (fp32 backward, T = 32k, D = 128:
// 48 MB per thread for MHA, 384 MB for a GQA group of 8). A thread whose kept buffers of one kernel
// total more than this frees them when the call ends, as torch's own buffers are freed (32 MB is
// glibc malloc's largest mmap threshold on 64-bit: torch's CPU buffers above it go back to the
// system at free too). Faulting the pages in again costs ~14 ms per 32 MB here (2.3 GB/s,
// 2026-11-30): next to nothing beside the compute of a call that needs that much, except where one
// side is short: a 64-query chunk against 32k keys at D = 128 is ~11 ms of forward compute per head,
// so a thread with one such head per call takes up to twice as long.
constexpr size_t kKeptScratchBytes = size_t(32) << 20;
// Grows a kept buffer to exactly n elements when it is smaller. Its old contents are not needed, so
// unlike vector::resize this neither copies them nor doubles the capacity (which would make what a
// thread keeps depend on the order of its calls).
template <typename Buffer>
void grow_to(Buffer& buffer, size_t n) {
  if (buffer.size() < n) {
    Buffer().swap(buffer);
    buffer.resize(n);
  }
}
// The bound per thread, over every kernel: each kernel (head dim x dtype x forward / backward /
// decode / AMX: 15 forwards alone) keeps buffers of its own, and one thread that had run a long call
// of each kept 32 MB of each for good (375 MB after one forward per head dim and dtype). 64 MB keeps
// a training step's forward and backward of one shape both.
constexpr size_t kKeptScratchThreadBytes = size_t(64) << 20;
// At the end of a kernel's call on this thread: its kept buffers freed when they total more than
// kKeptScratchBytes, or when with what the thread's other kernels keep they pass
// kKeptScratchThreadBytes (so after every call the thread keeps at most that).
template <typename First, typename... Buffers>
void release_if_large(First& first, Buffers&... buffers) {
  const size_t bytes = first.capacity() * sizeof(typename First::value_type) +
                       (size_t(0) + ... + (buffers.capacity() * sizeof(typename Buffers::value_type)));
  auto& kept = flash_attn_kept_by_kernel();  // (the kernel known by its first kept buffer's address)
  size_t others = 0;
  std::pair<const void*, size_t>* mine = nullptr;
  for (auto& entry : kept) {
    if (entry.first == &first) mine = &entry;
    else others += entry.second;
  }
  if (mine == nullptr) mine = &kept.emplace_back(&first, 0);
  if (bytes > kKeptScratchBytes || others + bytes > kKeptScratchThreadBytes) {
    First().swap(first);
    (Buffers().swap(buffers), ...);
    mine->second = 0;
  } else {
    mine->second = bytes;
  }
}

template <typename A> constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// Element pointers into the (batch, token, head, D) tensors.
template <typename T>
inline const T* at(const void* base, const int64_t* strides, int64_t b, int64_t token, int64_t h) {
  return static_cast<const T*>(base) + b * strides[0] + token * strides[1] + h * strides[2];
}
template <typename T>
inline T* at_mut(void* base, const int64_t* strides, int64_t b, int64_t token, int64_t h) {
  return static_cast<T*>(base) + b * strides[0] + token * strides[1] + h * strides[2];
}
// Row `token` (a cache position: s.k_start + key) of sequence b's keys or values, head h, wherever
// a KV cache's options put it: a block of a paged cache, another batch row, or row b.
template <typename T>
inline const T* kv_row(const AttnParams& p, const void* base, const int64_t* strides, int64_t b, int64_t token,
                       int64_t h) {
  return static_cast<const T*>(base) + kv_offset(p, strides, b, token, h);
}
inline int64_t lse_index(const AttnParams& p, int64_t b, int64_t h, const SeqInfo& s, int64_t i) {
  return b * p.lse_strides[0] + h * p.lse_strides[1] + (p.cu_seqlens_q ? s.q_start : 0) + i;
}

// Rows of a (B, T, H, D) tensor are H * D elements apart, a stride the hardware prefetcher did
// not follow here: each row's first load missed in turn, and packing Q took ~1/3 of the
// forward's own samples (perf cpu-clock, T = 512 causal, 1 thread); prefetching every row of the
// tile first brought that to ~1/5. The packers now ask for the lines of row r + kPrefetchRows
// while converting row r, which measured the same within the noise, but cannot evict its own
// lines: at a 2 or 4 KB stride all rows map to the same few L1 sets, about 16 rows' worth.
constexpr int64_t kPrefetchRows = 8;
template <int D, typename T>
inline void prefetch_row(const T* row) {
  for (size_t byte = 0; byte < D * sizeof(T); byte += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
}
template <int D, typename T>
inline const T* row_prefetching(const void* base, const int64_t* strides, int64_t b, int64_t start, int64_t h,
                                int64_t r, int64_t rows) {
  if (r == 0)
    for (int64_t ahead = 0; ahead < std::min(kPrefetchRows, rows); ++ahead)
      prefetch_row<D>(at<T>(base, strides, b, start + ahead, h));
  if (r + kPrefetchRows < rows) prefetch_row<D>(at<T>(base, strides, b, start + r + kPrefetchRows, h));
  return at<T>(base, strides, b, start + r, h);
}

// bf16 tokens kept as bf16 for the vdpbf16ps matmuls: rows as they are (pairs along D)...
template <int D>
inline void pack_rows_bf16(uint32_t* __restrict dst, const void* base, const int64_t* strides, int64_t b,
                           int64_t start, int64_t h, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * (D / 2), row_prefetching<D, bf16>(base, strides, b, start, h, r, rows), D * sizeof(bf16));
}
// ... or transposed by pairs, dst[d2 * ld + r] = (x[r][2 d2], x[r][2 d2 + 1]), columns rows..ld zero.
template <int D>
inline void pack_pairs_transposed(uint32_t* __restrict dst, int64_t ld, const void* base, const int64_t* strides,
                                  int64_t b, int64_t start, int64_t h, int64_t rows) {
  uint32_t row[D / 2];
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(row, row_prefetching<D, bf16>(base, strides, b, start, h, r, rows), D * sizeof(bf16));
    for (int d2 = 0; d2 < D / 2; ++d2) dst[d2 * ld + r] = row[d2];
  }
  if (rows < ld)
    for (int d2 = 0; d2 < D / 2; ++d2)
      for (int64_t r = rows; r < ld; ++r) dst[d2 * ld + r] = 0;
}

// The forward's work items (both forwards): item = (b * n_heads + h) * qblocks + qb is query
// head h of sequence b, queries [i0, i0 + mq) of its block qb; mq <= 0 past the sequence's end.
struct FwdItem {
  int64_t b, h, hk, i0, mq;
  SeqInfo s;
};
inline int64_t fwd_qblocks(const AttnParams& p) { return (p.seqlen_q + kBlockQ - 1) / kBlockQ; }
inline FwdItem fwd_item(const AttnParams& p, int64_t item, int64_t qblocks) {
  FwdItem it;
  it.b = item / (p.n_heads * qblocks), it.h = (item / qblocks) % p.n_heads;
  it.hk = it.h / (p.n_heads / p.n_kv_heads);
  it.s = seq_info(p, it.b);
  it.i0 = item % qblocks * kBlockQ;
  it.mq = std::min(kBlockQ, it.s.len_q - it.i0);
  return it;
}

// Key blocks [first, end) that the queries [i0, i0 + mq) touch.
struct KeyBlocks {
  int64_t first, end;
};
template <int64_t BlockK = kBlockK>
inline KeyBlocks key_blocks(const AttnParams& p, const SeqInfo& s, int64_t i0, int64_t mq) {
  const int64_t lo = key_lo(p, i0, s.len_q, s.len_k), hi = key_hi(p, i0 + mq - 1, s.len_q, s.len_k);
  if (hi <= lo || s.len_k == 0) return {0, 0};
  return {lo / BlockK, (hi + BlockK - 1) / BlockK};
}
// True when every query of [i0, i0 + mq) sees every key of [j0, j0 + BlockK): no mask needed.
template <int64_t BlockK = kBlockK>
inline bool block_unmasked(const AttnParams& p, const SeqInfo& s, int64_t i0, int64_t mq, int64_t j0) {
  return key_lo(p, i0 + mq - 1, s.len_q, s.len_k) <= j0 && j0 + BlockK <= key_hi(p, i0, s.len_q, s.len_k);
}

// The forward holds a query block's scores transposed, St[key j][query i], so that the online
// softmax (max and sum over keys, per query) runs down columns: plain vector ops over the kBlockQ
// queries, no horizontal reductions. Per query i the keys [lo[i], hi[i]) are seen; padding
// queries (i >= mq) get lo = hi = 0 and see nothing.
struct QueryBounds {
  int32_t lo[kBlockQ], hi[kBlockQ];
  void set(const AttnParams& p, const SeqInfo& s, int64_t i0, int64_t mq) {
    for (int64_t r = 0; r < kBlockQ; ++r) {
      lo[r] = r < mq ? int32_t(key_lo(p, i0 + r, s.len_q, s.len_k)) : 0;
      hi[r] = r < mq ? int32_t(key_hi(p, i0 + r, s.len_q, s.len_k)) : 0;
    }
  }
};

template <typename A>
inline void mask_transposed(A* __restrict st, int64_t nk, int64_t j0, const QueryBounds& qb) {
  const A ninf = neg_inf<A>();
  for (int64_t j = 0; j < nk; ++j) {
    const int32_t key = int32_t(j0 + j);
    A* __restrict row = st + j * kBlockQ;
#pragma omp simd
    for (int64_t i = 0; i < kBlockQ; ++i) row[i] = (key >= qb.lo[i] && key < qb.hi[i]) ? row[i] : ninf;
  }
}

// The backward's work items (both backwards): item = (b * n_kv_heads + hk) * chunks + c is kv head
// hk of sequence b with the queries [qa, qz) of chunk c (of every query head of hk's group).
// The backward wants at least kMinBwdItems work items; with fewer (sequence, kv head) pairs it
// splits each sequence's queries into chunks. A constant, not the thread count, so that the
// summation order (and with it every bit of dK and dV) does not depend on how many threads run.
constexpr int64_t kMinBwdItems = 8;
inline int64_t bwd_chunks(const AttnParams& p) {
  const int64_t seq_heads = p.batch * p.n_kv_heads, max_qblocks = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  return std::max<int64_t>(1, std::min(max_qblocks, (kMinBwdItems + seq_heads - 1) / seq_heads));
}
struct BwdItem {
  int64_t b, hk, c, qa, qz;  // qa: a multiple of kBlockQ
  SeqInfo s;
};
inline BwdItem bwd_item(const AttnParams& p, int64_t item, int64_t chunks) {
  BwdItem it;
  it.b = item / (p.n_kv_heads * chunks), it.hk = (item / chunks) % p.n_kv_heads, it.c = item % chunks;
  it.s = seq_info(p, it.b);
  const int64_t per = ((it.s.len_q + kBlockQ - 1) / kBlockQ + chunks - 1) / chunks;  // query blocks per chunk
  it.qa = std::min(it.s.len_q, it.c * per * kBlockQ), it.qz = std::min(it.s.len_q, (it.c + 1) * per * kBlockQ);
  return it;
}

// A split backward's (chunks > 1) dK, dV partial sums: per (chunk, kv head, key token) a row of
// 2 D accumulators (dK then dV, final scale applied), added in chunk order by sum_into() after the
// main loop. Empty with one chunk.
template <typename A>
struct DkvParts {
  const AttnParams& p;
  int64_t chunks, total_k;
  std::vector<A> data;
  DkvParts(const AttnParams& p_, int64_t chunks_, int64_t head_dim)
      : p(p_), chunks(chunks_), total_k(p_.cu_seqlens_k ? int64_t(p_.cu_seqlens_k[p_.batch]) : p_.batch * p_.seqlen_k),
        data(chunks_ > 1 ? size_t(chunks_ * p_.n_kv_heads * total_k * 2 * head_dim) : 0) {}
  template <int D>
  A* row(int64_t c, int64_t hk, int64_t b, const SeqInfo& s, int64_t j) {
    const int64_t token = (p.cu_seqlens_k ? s.k_start : b * p.seqlen_k) + j;
    return data.data() + ((c * p.n_kv_heads + hk) * total_k + token) * 2 * D;
  }
  template <int D, typename T>
  void sum_into_outputs() {
    if (chunks == 1) return;
    const int64_t kblocks = (p.seqlen_k + kBlockK - 1) / kBlockK, items = p.batch * p.n_kv_heads * kblocks;
#pragma omp parallel for schedule(dynamic) if (items > 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / (p.n_kv_heads * kblocks), hk = (item / kblocks) % p.n_kv_heads, kb = item % kblocks;
      const SeqInfo s = seq_info(p, b);
      for (int64_t j = kb * kBlockK; j < std::min(s.len_k, (kb + 1) * kBlockK); ++j) {
        alignas(64) A sum[2 * D];
        std::copy(row<D>(0, hk, b, s, j), row<D>(0, hk, b, s, j) + 2 * D, sum);
        for (int64_t c = 1; c < chunks; ++c) {
          const A* __restrict part = row<D>(c, hk, b, s, j);
#pragma omp simd
          for (int d = 0; d < 2 * D; ++d) sum[d] += part[d];
        }
        T* __restrict dk_dst = at_mut<T>(p.dk, p.dkv_strides, b, s.k_start + j, hk);
        T* __restrict dv_dst = at_mut<T>(p.dv, p.dkv_strides, b, s.k_start + j, hk);
#pragma omp simd
        for (int d = 0; d < D; ++d) {
          dk_dst[d] = from_acc<T>(sum[d]);
          dv_dst[d] = from_acc<T>(sum[D + d]);
        }
      }
    }
  }
};

}  // namespace
}  // namespace pyllm
