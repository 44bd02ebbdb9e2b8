// Byte-level BPE (tiktoken-compatible): shared declarations of the pre-tokenizers
// (bpe_pretokenize.cpp), the encoder (bpe_encode.cpp) and the trainer (bpe_train.cpp).
// Token ids are tiktoken "ranks": a lower rank merges first. Text is UTF-8 bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pyllm::bpe {

// The built-in split patterns; kCustom means the caller pre-tokenizes (Python's `regex`).
enum class Pattern : int { kCustom = -1, kGpt2 = 0, kCl100k = 1, kO200k = 2 };
Pattern pattern_from_code(int code);  // throws std::invalid_argument on an unknown code

// Per-code-point class flags (generated tables; keep in sync with tools/gen_unicode_tables.py).
enum : uint8_t { kLetter = 1, kNumber = 2, kSpace = 4, kUpperish = 8, kLowerish = 16 };

// Splits text exactly as the pattern's regex would (re.findall): appends the end offset of each
// piece to `ends`; the pieces tile the text. Invalid UTF-8 bytes count as one "other" char each.
void pretokenize(Pattern pattern, const uint8_t* text, size_t n, std::vector<uint32_t>& ends);
// The same, for Python (tests): the end byte offset of each piece.
std::vector<uint32_t> pretokenize_offsets(int pattern, std::string_view text);

// 64-bit hash of a byte string (not DoS-resistant; inputs are the user's own data).
uint64_t hash_bytes(const uint8_t* p, size_t n);

// Open-addressing map from a 64-bit key (a pair of token ids) to a 32-bit value.
class PairMap {
 public:
  static constexpr uint64_t kEmptyKey = ~0ull;
  static constexpr uint32_t kMissing = ~0u;
  explicit PairMap(size_t expected = 16) { reserve(expected); }
  void reserve(size_t expected);
  // Returns a reference to the value of `key`, inserting kMissing first when absent.
  uint32_t& at_or_insert(uint64_t key);
  uint32_t get(uint64_t key) const {
    size_t slot = mix(key) & mask_;
    while (true) {
      const uint64_t k = keys_[slot];
      if (k == key) return values_[slot];
      if (k == kEmptyKey) return kMissing;
      slot = (slot + 1) & mask_;
    }
  }
  size_t size() const { return size_; }
  template <typename F>
  void for_each(F&& f) const {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i] != kEmptyKey) f(keys_[i], values_[i]);
  }

 private:
  static uint64_t mix(uint64_t k) {
    k ^= k >> 31;
    k *= 0x9E3779B97F4A7C15ull;
    return k ^ (k >> 29);
  }
  void grow();
  std::vector<uint64_t> keys_;
  std::vector<uint32_t> values_;
  size_t mask_ = 0, size_ = 0;
};

inline uint64_t pair_key(uint32_t left, uint32_t right) { return (uint64_t(left) << 32) | right; }

struct PieceCache;  // per-thread cache of encoded pieces (bpe_encode.cpp)

// The encoder: immutable after construction (the piece caches are pooled under a mutex), so one
// Encoder serves any number of threads.
class Encoder {
 public:
  Encoder(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks, int pattern,
          const std::vector<std::string>& special_tokens, const std::vector<uint32_t>& special_ids);
  ~Encoder();

  // Ordinary text: the pattern's pre-tokenizer, then BPE on each piece; special tokens are text.
  std::vector<uint32_t> encode_ordinary(std::string_view text) const;
  // tiktoken's encode(): raises std::invalid_argument when text contains a special token listed in
  // `disallowed` (indices into the special tokens); those listed in `allowed` become their ids.
  std::vector<uint32_t> encode(std::string_view text, const std::vector<uint32_t>& allowed,
                               const std::vector<uint32_t>& disallowed) const;
  // encode() over many texts on `num_threads` threads (<= 0: all hardware threads).
  std::vector<std::vector<uint32_t>> encode_batch(const std::vector<std::string_view>& texts,
                                                  const std::vector<uint32_t>& allowed,
                                                  const std::vector<uint32_t>& disallowed, int num_threads) const;
  // BPE on pieces already split by the caller (the custom-pattern path).
  std::vector<uint32_t> encode_pieces(const std::vector<std::string_view>& pieces) const;
  // The byte string of each id, concatenated (ids checked).
  std::string decode_bytes(const std::vector<uint32_t>& ids) const;

  // For the CUDA encoder: the merge table as (left, right, merged) triples and the byte ranks.
  std::vector<uint32_t> merge_triples() const;
  std::vector<uint32_t> byte_ranks() const { return std::vector<uint32_t>(byte_rank_, byte_rank_ + 256); }
  int pattern_code() const { return int(pattern_); }

 private:
  struct Slot {
    uint64_t hash;
    uint32_t rank;
  };
  uint32_t lookup_bytes(const uint8_t* p, size_t n) const;  // kMissing when not a token
  uint32_t pair_rank(uint32_t left, uint32_t right) const { return pairs_.get(pair_key(left, right)); }
  void encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache) const;
  void merge_small(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const;
  void merge_heap(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const;
  void encode_ordinary_into(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache,
                            std::vector<uint32_t>& ends) const;
  void encode_into(std::string_view text, const std::vector<uint32_t>& allowed,
                   const std::vector<uint32_t>& disallowed, std::vector<uint32_t>& out, PieceCache& cache,
                   std::vector<uint32_t>& ends) const;
  std::unique_ptr<PieceCache> take_cache() const;
  void give_cache(std::unique_ptr<PieceCache> cache) const;

  Pattern pattern_;
  std::string blob_;                      // token bytes, concatenated
  std::vector<uint64_t> token_span_;      // rank -> (offset << 24 | length); ~0 for a hole
  std::vector<Slot> slots_;               // bytes -> rank, open addressing on hash_bytes
  size_t slot_mask_ = 0;
  PairMap pairs_;                         // (left rank, right rank) -> rank of their concatenation
  uint32_t byte_rank_[256];
  std::vector<std::string> specials_;
  std::vector<uint32_t> special_ids_;
  mutable std::mutex cache_mutex_;
  mutable std::vector<std::unique_ptr<PieceCache>> free_caches_;
};

struct TrainerState;  // bpe_train.cpp

// The trainer: count pre-tokenized pieces (count_texts / count_pieces, any number of calls), then
// merge() in chunks (so Python can draw a progress bar between calls). Tie-breaking: the pair with
// the highest count merges first; among equal counts, the smallest (left id, right id).
class Trainer {
 public:
  explicit Trainer(int pattern);
  ~Trainer();
  void count_texts(const std::vector<std::string_view>& texts, int num_threads);
  void count_pieces(const std::vector<std::string_view>& pieces, const std::vector<int64_t>& counts);
  int64_t unique_pieces() const;
  // Runs merges until `max_new_tokens` new tokens exist or no pair is left; returns the new tokens
  // as flattened (left id, right id) pairs, in id order (ids continue from 256 + earlier calls).
  std::vector<uint32_t> merge(int64_t max_new_tokens);

 private:
  Pattern pattern_;
  std::unique_ptr<TrainerState> state_;
};

}  // namespace pyllm::bpe
