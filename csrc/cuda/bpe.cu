// CUDA batch BPE encoder: the same ids as the CPU encoder (csrc/cpu/bpe_encode.cpp), hence as
// tiktoken. Partly verified: ran on an H200 (2026-11-30): compute-sanitizer clean, its small cases right; the CUDA test suite not yet run through (see README).
// There its ids equalled tiktoken's on 1.1 MB; the kernels took 0.8 ms of a 9 ms batch (host-bound).
//
// Split of the work:
//   host (std::threads over texts): the disallowed-special check, cutting at allowed special
//     tokens, pre-tokenization (the hand-written splitters), and pieces longer than
//     kMaxDevicePiece bytes (the CPU's O(n) long-piece merge; such pieces are rare and serial).
//   device: per piece, the whole-piece lookup (a piece that is a token is that token, as in
//     tiktoken), then BPE merging:
//       - pieces of <= kThreadPiece bytes: one thread each, symbols and pair ranks in local
//         arrays, linear scan for the minimum (rank, position) -- tiktoken's order;
//       - pieces of kThreadPiece+1 .. kMaxDevicePiece bytes: one block each, the symbols as a
//         linked list in shared memory, a block-wide argmin of (rank << 32 | position) per merge.
//     Tokens go to a scratch array at the piece's byte offset (a piece never has more tokens
//     than bytes); the host turns per-piece counts into offsets and a compaction kernel packs
//     the ids, which are copied back with the counts.
// Merge ranks live in a GPU copy of the CPU's open-addressing pair table (key = left << 32 |
// right, same mix function and linear probing), the whole-token table likewise (64-bit hash of
// the bytes, verified against the token bytes).
//
// The kernel time includes the host round trip for the piece counts (between the merge kernels
// and the compaction), so it overstates the merge stage slightly.
// Traffic per input byte: 1 B up, ~4 B scratch written + read, ~1.3 B (ids) + ~1 B (counts) down;
// pair-table probes hit L2 for vocabularies up to ~100k. Not yet measured on a GPU: kThreadPiece,
// kMaxDevicePiece and the block size are starting values.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <thread>

#include "common/parallel.h"
#include "cpu/bpe.h"
#include "cuda/cuda_common.cuh"

namespace pyllm::bpe {
namespace {

constexpr uint32_t kNone = ~0u;
constexpr int kThreadPiece = 48;      // bytes; local arrays of 2 x 48 u32 per thread
constexpr int kMaxDevicePiece = 2048;  // bytes; shared memory of the block path: 2048 x 12 B = 24 KB
constexpr int kShortThreads = 128;
constexpr int kBlockThreads = 256;
constexpr uint16_t kEnd = 0xFFFF;

struct DeviceTables {
  uint64_t* pair_keys = nullptr;
  uint32_t* pair_values = nullptr;
  uint64_t pair_mask = 0;
  uint64_t* slot_hash = nullptr;
  uint32_t* slot_rank = nullptr;
  uint64_t slot_mask = 0;
  uint8_t* blob = nullptr;
  uint64_t* token_span = nullptr;  // rank -> offset << 24 | length; ~0 for a hole
  uint64_t n_spans = 0;
  uint32_t* byte_rank = nullptr;  // 256
};

// Device views (by value into kernels).
struct Vocab {
  const uint64_t* pair_keys;
  const uint32_t* pair_values;
  uint64_t pair_mask;
  const uint64_t* slot_hash;
  const uint32_t* slot_rank;
  uint64_t slot_mask;
  const uint8_t* blob;
  const uint64_t* token_span;
  const uint32_t* byte_rank;
};

__device__ __forceinline__ uint64_t mix_dev(uint64_t k) {
  k ^= k >> 31;
  k *= 0x9E3779B97F4A7C15ull;
  return k ^ (k >> 29);
}

__device__ __forceinline__ uint32_t pair_rank_dev(const Vocab& v, uint32_t left, uint32_t right) {
  const uint64_t key = (uint64_t(left) << 32) | right;
  uint64_t slot = mix_dev(key) & v.pair_mask;
  while (true) {
    const uint64_t k = v.pair_keys[slot];
    if (k == key) return v.pair_values[slot];
    if (k == ~0ull) return kNone;
    slot = (slot + 1) & v.pair_mask;
  }
}

// Little-endian load of n <= 8 bytes (no alignment assumed).
__device__ __forceinline__ uint64_t load_le(const uint8_t* p, uint32_t n) {
  uint64_t v = 0;
  for (uint32_t k = 0; k < n; ++k) v |= uint64_t(p[k]) << (8 * k);
  return v;
}

// Same function as hash_bytes (bpe_pretokenize.cpp): the tables were built with it.
__device__ uint64_t hash_bytes_dev(const uint8_t* p, uint32_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xC2B2AE3D27D4EB4Full);
  while (n >= 8) {
    h = (h ^ load_le(p, 8)) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
    p += 8;
    n -= 8;
  }
  h = (h ^ load_le(p, n)) * 0xC4CEB9FE1A85EC53ull;
  return h ^ (h >> 29);
}

__device__ uint32_t lookup_bytes_dev(const Vocab& v, const uint8_t* p, uint32_t n) {
  const uint64_t h = hash_bytes_dev(p, n);
  uint64_t slot = h & v.slot_mask;
  while (true) {
    const uint32_t rank = v.slot_rank[slot];
    if (rank == kNone) return kNone;
    if (v.slot_hash[slot] == h) {
      const uint64_t span = v.token_span[rank];
      if ((span & 0xFFFFFF) == n) {
        const uint8_t* t = v.blob + (span >> 24);
        bool same = true;
        for (uint32_t k = 0; k < n && same; ++k) same = t[k] == p[k];
        if (same) return rank;
      }
    }
    slot = (slot + 1) & v.slot_mask;
  }
}

// One thread per piece of <= kThreadPiece bytes; longer pieces are left to the block kernel.
__global__ void __launch_bounds__(kShortThreads)
    encode_short_pieces(Vocab v, const uint8_t* __restrict__ bytes, const uint32_t* __restrict__ piece_begin,
                        const uint32_t* __restrict__ piece_len, uint32_t n_pieces, uint32_t* __restrict__ scratch,
                        uint32_t* __restrict__ counts) {
  // 64-bit: a call may hold up to 2^32 - 2 one-byte pieces, and the last block's thread indices
  // would wrap in 32 bits onto the first pieces.
  const uint64_t k = uint64_t(blockIdx.x) * kShortThreads + threadIdx.x;
  if (k >= n_pieces) return;
  const uint32_t n = piece_len[k];
  if (n > kThreadPiece) return;
  const uint8_t* p = bytes + piece_begin[k];
  uint32_t* out = scratch + piece_begin[k];
  if (n == 1) {
    out[0] = v.byte_rank[p[0]];
    counts[k] = 1;
    return;
  }
  const uint32_t whole = lookup_bytes_dev(v, p, n);
  if (whole != kNone) {
    out[0] = whole;
    counts[k] = 1;
    return;
  }
  uint32_t sym[kThreadPiece], rank[kThreadPiece];
  uint32_t m = n;
  for (uint32_t i = 0; i < m; ++i) sym[i] = v.byte_rank[p[i]];
  for (uint32_t i = 0; i + 1 < m; ++i) rank[i] = pair_rank_dev(v, sym[i], sym[i + 1]);
  while (m > 1) {
    uint32_t best = kNone, at = 0;
    for (uint32_t i = 0; i + 1 < m; ++i) {
      if (rank[i] < best) {
        best = rank[i];
        at = i;
      }
    }
    if (best == kNone) break;
    sym[at] = best;
    for (uint32_t i = at + 1; i + 1 < m; ++i) sym[i] = sym[i + 1];
    for (uint32_t i = at + 1; i + 2 < m; ++i) rank[i] = rank[i + 1];
    --m;
    if (at > 0) rank[at - 1] = pair_rank_dev(v, sym[at - 1], sym[at]);
    if (at + 1 < m) rank[at] = pair_rank_dev(v, sym[at], sym[at + 1]);
  }
  for (uint32_t i = 0; i < m; ++i) out[i] = sym[i];
  counts[k] = m;
}

// One block per piece of kThreadPiece+1 .. kMaxDevicePiece bytes (indices in `which`).
__global__ void __launch_bounds__(kBlockThreads)
    encode_block_pieces(Vocab v, const uint8_t* __restrict__ bytes, const uint32_t* __restrict__ piece_begin,
                        const uint32_t* __restrict__ piece_len, const uint32_t* __restrict__ which,
                        uint32_t* __restrict__ scratch, uint32_t* __restrict__ counts) {
  __shared__ uint32_t sym[kMaxDevicePiece], rank[kMaxDevicePiece];
  __shared__ uint16_t next[kMaxDevicePiece], prev[kMaxDevicePiece];
  __shared__ uint64_t warp_best[kBlockThreads / 32];
  __shared__ uint64_t best_key;
  __shared__ uint32_t whole;
  const uint32_t k = which[blockIdx.x];
  const uint32_t n = piece_len[k];  // kThreadPiece < n <= kMaxDevicePiece (host-checked)
  const uint8_t* p = bytes + piece_begin[k];
  uint32_t* out = scratch + piece_begin[k];
  const uint32_t tid = threadIdx.x;
  if (tid == 0) whole = lookup_bytes_dev(v, p, n);
  __syncthreads();
  if (whole != kNone) {  // block-uniform
    if (tid == 0) {
      out[0] = whole;
      counts[k] = 1;
    }
    return;
  }
  for (uint32_t i = tid; i < n; i += kBlockThreads) {
    sym[i] = v.byte_rank[p[i]];
    next[i] = i + 1 < n ? uint16_t(i + 1) : kEnd;
    prev[i] = i > 0 ? uint16_t(i - 1) : kEnd;
  }
  __syncthreads();
  for (uint32_t i = tid; i < n; i += kBlockThreads) rank[i] = i + 1 < n ? pair_rank_dev(v, sym[i], sym[i + 1]) : kNone;
  __syncthreads();
  while (true) {
    // Block argmin of (rank << 32 | position); absorbed nodes and the last node hold kNone.
    uint64_t mine = ~0ull;
    for (uint32_t i = tid; i < n; i += kBlockThreads) mine = min(mine, (uint64_t(rank[i]) << 32) | i);
    for (int offset = 16; offset > 0; offset >>= 1) mine = min(mine, __shfl_down_sync(0xFFFFFFFFu, mine, offset));
    if ((tid & 31) == 0) warp_best[tid >> 5] = mine;
    __syncthreads();
    if (tid == 0) {
      uint64_t b = warp_best[0];
      for (int w = 1; w < kBlockThreads / 32; ++w) b = min(b, warp_best[w]);
      best_key = b;
    }
    __syncthreads();
    const uint64_t key = best_key;
    if ((key >> 32) == kNone) break;  // block-uniform: every thread read the same best_key
    if (tid == 0) {
      const uint32_t i = uint32_t(key), r = uint32_t(key >> 32);
      const uint32_t j = next[i];
      sym[i] = r;
      rank[j] = kNone;
      next[i] = next[j];
      if (next[i] != kEnd) prev[next[i]] = uint16_t(i);
      rank[i] = next[i] != kEnd ? pair_rank_dev(v, r, sym[next[i]]) : kNone;
      if (prev[i] != kEnd) rank[prev[i]] = pair_rank_dev(v, sym[prev[i]], r);
    }
    __syncthreads();  // the merge is visible before the next argmin, and best_key is not rewritten early
  }
  if (tid == 0) {
    uint32_t m = 0;
    for (uint32_t i = 0; i != kEnd; i = next[i]) out[m++] = sym[i];
    counts[k] = m;
  }
}

__global__ void compact_pieces(const uint32_t* __restrict__ piece_begin, const uint32_t* __restrict__ counts,
                               const uint32_t* __restrict__ offsets, uint32_t n_pieces,
                               const uint32_t* __restrict__ scratch, uint32_t* __restrict__ packed) {
  const uint64_t k = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // 64-bit: as in encode_short_pieces
  if (k >= n_pieces) return;
  const uint32_t* src = scratch + piece_begin[k];
  uint32_t* dst = packed + offsets[k];
  for (uint32_t t = 0; t < counts[k]; ++t) dst[t] = src[t];
}

template <typename T>
T* upload_sync(const T* host, size_t count) {
  T* dev = nullptr;
  PYLLM_CUDA_CHECK(cudaMalloc(&dev, std::max<size_t>(count, 1) * sizeof(T)));
  const cudaError_t err = count ? cudaMemcpy(dev, host, count * sizeof(T), cudaMemcpyHostToDevice) : cudaSuccess;
  if (err != cudaSuccess) {
    cudaFree(dev);
    PYLLM_CUDA_CHECK(err);
  }
  return dev;
}

void free_tables(DeviceTables* t) {
  for (void* p : {static_cast<void*>(t->pair_keys), static_cast<void*>(t->pair_values),
                  static_cast<void*>(t->slot_hash), static_cast<void*>(t->slot_rank), static_cast<void*>(t->blob),
                  static_cast<void*>(t->token_span), static_cast<void*>(t->byte_rank)}) {
    if (p) cudaFree(p);
  }
  delete t;
  (void)cudaGetLastError();  // a failed free is ignored: not to be reported by a later launch check
}

// Stream-ordered device buffers of one call, freed on every exit path.
class CallBuffers {
 public:
  explicit CallBuffers(cudaStream_t stream) : stream_(stream) {}
  ~CallBuffers() {
    for (void* p : ptrs_) cudaFreeAsync(p, stream_);
    (void)cudaGetLastError();  // as free_tables
  }
  template <typename T>
  T* alloc(size_t count) {
    T* p = nullptr;
    PYLLM_CUDA_CHECK(cudaMallocAsync(&p, std::max<size_t>(count, 1) * sizeof(T), stream_));
    ptrs_.push_back(p);
    return p;
  }
  template <typename T>
  T* upload(const std::vector<T>& host) {
    T* p = alloc<T>(host.size());
    if (!host.empty())
      PYLLM_CUDA_CHECK(cudaMemcpyAsync(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream_));
    return p;
  }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

template <typename F>
void parallel_for(size_t n, int num_threads, F&& body) {
  parallel_items(n, worker_count(n, num_threads), [&](size_t, size_t i) { body(i); });
}

}  // namespace

CudaEncoder::CudaEncoder(const Encoder& encoder, int device) : encoder_(encoder), device_(device), tables_(nullptr) {
  PYLLM_CHECK(encoder.pattern_ != Pattern::kCustom, "bpe: the CUDA encoder needs a built-in pattern");
  DeviceGuard guard(device);
  auto* t = new DeviceTables();
  try {
    const auto& keys = encoder.pairs_.raw_keys();
    const auto& values = encoder.pairs_.raw_values();
    t->pair_keys = upload_sync(keys.data(), keys.size());
    t->pair_values = upload_sync(values.data(), values.size());
    t->pair_mask = keys.size() - 1;
    std::vector<uint64_t> slot_hash(encoder.slots_.size());
    std::vector<uint32_t> slot_rank(encoder.slots_.size());
    for (size_t i = 0; i < slot_hash.size(); ++i) {
      slot_hash[i] = encoder.slots_[i].hash;
      slot_rank[i] = encoder.slots_[i].rank;
    }
    t->slot_hash = upload_sync(slot_hash.data(), slot_hash.size());
    t->slot_rank = upload_sync(slot_rank.data(), slot_rank.size());
    t->slot_mask = encoder.slot_mask_;
    t->blob = upload_sync(reinterpret_cast<const uint8_t*>(encoder.blob_.data()), encoder.blob_.size());
    t->token_span = upload_sync(encoder.token_span_.data(), encoder.token_span_.size());
    t->n_spans = encoder.token_span_.size();
    t->byte_rank = upload_sync(encoder.byte_rank_, 256);
  } catch (...) {
    free_tables(t);
    throw;
  }
  tables_ = t;
}

CudaEncoder::~CudaEncoder() {
  auto* t = static_cast<DeviceTables*>(tables_);
  if (t == nullptr) return;
  int prev = -1;
  const bool switched = cudaGetDevice(&prev) == cudaSuccess && prev != device_ && cudaSetDevice(device_) == cudaSuccess;
  // No call of ours is in flight (calls synchronize), but a call that threw may have left one
  // queued. The binding (csrc/bind.cpp) runs this without the GIL.
  cudaDeviceSynchronize();
  free_tables(t);
  if (switched) cudaSetDevice(prev);
  (void)cudaGetLastError();  // what failed here is ignored, and must not be reported by a later launch check
}

std::vector<std::vector<uint32_t>> CudaEncoder::encode_batch(const std::vector<std::string_view>& texts,
                                                             const std::vector<uint32_t>& allowed,
                                                             const std::vector<uint32_t>& disallowed,
                                                             uintptr_t stream_handle, int num_threads) const {
  const size_t n_texts = texts.size();
  std::vector<std::vector<uint32_t>> results(n_texts);
  if (n_texts == 0) return results;
  std::vector<size_t> text_base(n_texts + 1, 0);
  for (size_t t = 0; t < n_texts; ++t) text_base[t + 1] = text_base[t] + texts[t].size();
  PYLLM_CHECK(text_base[n_texts] < (size_t(1) << 32) - 1, "bpe: a CUDA batch must hold under 4 GiB of text (32-bit offsets), got ",
              text_base[n_texts], " bytes (pyllm/tokenizer/cuda_encoder.py refuses such a text first)");

  // 1. Host: specials and pre-tokenization, per text. A piece: (begin in the batch, length, kind)
  //    with kind = special id, kHostPiece (too long for the device) or kDevicePiece.
  constexpr uint32_t kDevicePiece = ~0u, kHostPiece = ~0u - 1;
  struct Piece {
    uint32_t begin, length, kind;
  };
  std::vector<std::vector<Piece>> pieces(n_texts);
  parallel_for(n_texts, num_threads, [&](size_t t) {
    std::vector<Encoder::Segment> parts;
    std::vector<uint32_t> ends;
    encoder_.segments(texts[t], allowed, disallowed, parts);
    const auto* bytes = reinterpret_cast<const uint8_t*>(texts[t].data());
    for (const auto& part : parts) {
      if (part.special_id != Encoder::kNoSpecial) {
        pieces[t].push_back({uint32_t(text_base[t] + part.begin), uint32_t(part.end - part.begin), part.special_id});
        continue;
      }
      ends.clear();
      pretokenize(encoder_.pattern_, bytes + part.begin, part.end - part.begin, ends);
      size_t start = part.begin;
      for (const uint32_t e : ends) {
        const size_t end = part.begin + e;
        const uint32_t len = uint32_t(end - start);
        pieces[t].push_back({uint32_t(text_base[t] + start), len, len > kMaxDevicePiece ? kHostPiece : kDevicePiece});
        start = end;
      }
    }
  });

  // 2. The device pieces in batch order, and the block-path subset.
  std::vector<uint32_t> dev_begin, dev_len, block_pieces;
  std::vector<size_t> text_first_dev(n_texts + 1, 0);
  for (size_t t = 0; t < n_texts; ++t) {
    text_first_dev[t] = dev_begin.size();
    for (const Piece& pc : pieces[t]) {
      if (pc.kind != kDevicePiece) continue;
      if (pc.length > uint32_t(kThreadPiece)) block_pieces.push_back(uint32_t(dev_begin.size()));
      dev_begin.push_back(pc.begin);
      dev_len.push_back(pc.length);
    }
  }
  text_first_dev[n_texts] = dev_begin.size();
  const uint32_t n_dev = uint32_t(dev_begin.size());

  std::vector<uint32_t> counts(n_dev), packed;
  if (n_dev > 0) {
    DeviceGuard guard(device_);
    const cudaStream_t stream = as_stream(stream_handle);
    const auto* t = static_cast<const DeviceTables*>(tables_);
    const Vocab vocab{t->pair_keys, t->pair_values, t->pair_mask, t->slot_hash, t->slot_rank,
                      t->slot_mask, t->blob,        t->token_span, t->byte_rank};
    CallBuffers buf(stream);
    std::string all_bytes;
    all_bytes.reserve(text_base[n_texts]);
    for (const auto& text : texts) all_bytes.append(text.data(), text.size());
    uint8_t* d_bytes = buf.alloc<uint8_t>(all_bytes.size());
    PYLLM_CUDA_CHECK(cudaMemcpyAsync(d_bytes, all_bytes.data(), all_bytes.size(), cudaMemcpyHostToDevice, stream));
    uint32_t* d_begin = buf.upload(dev_begin);
    uint32_t* d_len = buf.upload(dev_len);
    uint32_t* d_block = buf.upload(block_pieces);
    uint32_t* d_scratch = buf.alloc<uint32_t>(all_bytes.size());
    uint32_t* d_counts = buf.alloc<uint32_t>(n_dev);
    // Zero counts: a piece no kernel handled then fails the host's count check instead of
    // passing with leftover memory.
    PYLLM_CUDA_CHECK(cudaMemsetAsync(d_counts, 0, n_dev * sizeof(uint32_t), stream));
    // Events bracket the kernels: the merge-stage time, read by bench/bench_bpe.py.
    cudaEvent_t events[2] = {nullptr, nullptr};
    PYLLM_CUDA_CHECK(cudaEventCreate(&events[0]));
    struct EventsGuard {
      cudaEvent_t* e;
      ~EventsGuard() {
        for (int i = 0; i < 2; ++i)
          if (e[i] && cudaEventDestroy(e[i]) != cudaSuccess) (void)cudaGetLastError();
      }
    } events_guard{events};
    PYLLM_CUDA_CHECK(cudaEventCreate(&events[1]));
    PYLLM_CUDA_CHECK(cudaEventRecord(events[0], stream));
    // Grid sizes in 64-bit: n_dev + 127 wraps in uint32 for n_dev near 2^32 (one-byte pieces).
    const uint32_t short_blocks = uint32_t((uint64_t(n_dev) + kShortThreads - 1) / kShortThreads);
    encode_short_pieces<<<short_blocks, kShortThreads, 0, stream>>>(vocab, d_bytes, d_begin, d_len, n_dev, d_scratch,
                                                                     d_counts);
    PYLLM_CUDA_CHECK_LAUNCH("encode_short_pieces");
    if (!block_pieces.empty()) {
      encode_block_pieces<<<uint32_t(block_pieces.size()), kBlockThreads, 0, stream>>>(
          vocab, d_bytes, d_begin, d_len, d_block, d_scratch, d_counts);
      PYLLM_CUDA_CHECK_LAUNCH("encode_block_pieces");
    }
    PYLLM_CUDA_CHECK(cudaMemcpyAsync(counts.data(), d_counts, n_dev * sizeof(uint32_t), cudaMemcpyDeviceToHost, stream));
    PYLLM_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<uint32_t> offsets(n_dev);
    uint64_t total = 0;
    for (uint32_t k = 0; k < n_dev; ++k) {
      PYLLM_CHECK_RUNTIME(counts[k] >= 1 && counts[k] <= dev_len[k], "bpe: CUDA encoder returned ", counts[k],
                          " tokens for a piece of ", dev_len[k], " bytes");
      offsets[k] = uint32_t(total);
      total += counts[k];
    }
    uint32_t* d_offsets = buf.upload(offsets);
    uint32_t* d_packed = buf.alloc<uint32_t>(total);
    compact_pieces<<<uint32_t((uint64_t(n_dev) + 255) / 256), 256, 0, stream>>>(d_begin, d_counts, d_offsets, n_dev,
                                                                                d_scratch, d_packed);
    PYLLM_CUDA_CHECK_LAUNCH("compact_pieces");
    PYLLM_CUDA_CHECK(cudaEventRecord(events[1], stream));
    packed.resize(total);
    PYLLM_CUDA_CHECK(cudaMemcpyAsync(packed.data(), d_packed, total * sizeof(uint32_t), cudaMemcpyDeviceToHost, stream));
    PYLLM_CUDA_CHECK(cudaStreamSynchronize(stream));
    float kernel_ms = 0.0f;
    PYLLM_CUDA_CHECK(cudaEventElapsedTime(&kernel_ms, events[0], events[1]));
    last_kernel_ms_.store(kernel_ms);
  }

  // 3. Assemble per text: device pieces from `packed`, host pieces encoded here.
  std::vector<uint64_t> packed_start(n_dev + 1, 0);
  for (uint32_t k = 0; k < n_dev; ++k) packed_start[k + 1] = packed_start[k] + counts[k];
  parallel_for(n_texts, num_threads, [&](size_t t) {
    size_t dev_k = text_first_dev[t];
    auto& out = results[t];
    for (const Piece& pc : pieces[t]) {
      if (pc.kind == kDevicePiece) {
        out.insert(out.end(), packed.begin() + packed_start[dev_k], packed.begin() + packed_start[dev_k + 1]);
        ++dev_k;
      } else if (pc.kind == kHostPiece) {
        const std::string_view piece(texts[t].data() + (pc.begin - text_base[t]), pc.length);
        const std::vector<uint32_t> ids = encoder_.encode_pieces({piece});
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        out.push_back(pc.kind);
      }
    }
  });
  return results;
}

}  // namespace pyllm::bpe
