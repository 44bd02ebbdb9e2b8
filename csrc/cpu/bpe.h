// Byte-level BPE (tiktoken-compatible): shared declarations of the pre-tokenizers
// (bpe_pretokenize.cpp), the encoder (bpe_encode.cpp) and the trainer (bpe_train.cpp).
// Token ids are tiktoken "ranks": a lower rank merges first. Text is UTF-8 bytes.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pyllm::bpe {

// The longest token a vocabulary may hold (Encoder's index is quadratic in a token's length;
// tokenizer.MAX_TOKEN_BYTES says it first, in Python).
constexpr size_t kMaxTokenBytes = size_t(1) << 16;

// The built-in split patterns; kCustom means the caller pre-tokenizes (Python's `regex`).
enum class Pattern : int { kCustom = -1, kGpt2 = 0, kCl100k = 1, kO200k = 2 };
Pattern pattern_from_code(int code);  // throws std::invalid_argument on an unknown code

// Per-code-point class flags (generated tables; keep in sync with tools/gen_unicode_tables.py).
enum : uint8_t { kLetter = 1, kNumber = 2, kSpace = 4, kUpperish = 8, kLowerish = 16 };

// Splits text exactly as the pattern's regex would (re.findall): appends the end offset of each
// piece to `ends`; the pieces tile the text. Invalid UTF-8 bytes count as one "other" char each.
void pretokenize(Pattern pattern, const uint8_t* text, size_t n, std::vector<uint32_t>& ends);
// Streaming form: from `start` (a piece boundary), appends at most max_pieces ends; returns where it
// stopped (n when done). Resuming there gives the same pieces: no alternative looks behind.
size_t pretokenize(Pattern pattern, const uint8_t* text, size_t n, size_t start, std::vector<uint32_t>& ends,
                   size_t max_pieces);
// The same, for Python (tests): the end byte offset of each piece.
std::vector<uint32_t> pretokenize_offsets(int pattern, std::string_view text);

// Cuts text into spans of about `span_bytes` (at the first safe cut at or after each span's start
// plus span_bytes; the rest of the text where none comes) at piece boundaries of the built-in
// pattern, so the spans pre-tokenize independently to the whole's pieces. Appends the span ends.
// A safe cut is patterns.SAFE_CUTS[pattern] in Python (its comment says why they hold): after "\n"
// (cl100k, o200k: also after "\r\n", which they take whole) whose char before is not whitespace
// (visible ASCII, or a char from U+0080 up that is not White_Space), before an ASCII letter or a
// char from U+0080 up that is not White_Space; so text in other scripts ("。\n" + a CJK line) and
// CRLF lines are cut too. kCustom: one span (no cut is proven for a pattern we do not know).
void cut_at_safe_boundaries(Pattern pattern, std::string_view text, size_t span_bytes, std::vector<size_t>& ends);
// The same, for Python (tests): the span ends.
std::vector<size_t> safe_cut_offsets(int pattern, std::string_view text, size_t span_bytes);

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
  // Raw table, for the CUDA encoder's copy (same layout and probe sequence on the device).
  const std::vector<uint64_t>& raw_keys() const { return keys_; }
  const std::vector<uint32_t>& raw_values() const { return values_; }
  static uint64_t mix(uint64_t k) {
    k ^= k >> 31;
    k *= 0x9E3779B97F4A7C15ull;
    return k ^ (k >> 29);
  }
  template <typename F>
  void for_each(F&& f) const {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i] != kEmptyKey) f(keys_[i], values_[i]);
  }

 private:
  void grow();
  std::vector<uint64_t> keys_;
  std::vector<uint32_t> values_;
  size_t mask_ = 0, size_ = 0;
};

inline uint64_t pair_key(uint32_t left, uint32_t right) { return (uint64_t(left) << 32) | right; }

class CudaEncoder;
struct PieceCache;        // per-thread cache of encoded pieces (bpe_encode.cpp)
struct LongPieceScratch;  // per-thread scratch of the long-piece merge (bpe_encode.cpp)

// The encoder: immutable after construction (the piece caches are pooled under a mutex), so one
// Encoder serves any number of threads.
class Encoder {
 public:
  Encoder(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks, int pattern,
          const std::vector<std::string>& special_tokens, const std::vector<uint32_t>& special_ids);
  // SentencePiece-style BPE, as Hugging Face's BPE model with byte_fallback runs it (Llama 2's,
  // Mistral's): a piece starts as its UTF-8 characters, each the token of that character, else the
  // tokens of its bytes (byte_fallback[b], when all of them exist), else unk_id (consecutive ones
  // fused into one when fuse_unk; dropped when unk_id is ~0u); then the listed merges (left, right,
  // merged triples) apply in list order, not by the merged token's id: the lowest-indexed merge
  // present, leftmost on ties. whole_first (Hugging Face's ignore_merges) takes a piece that is
  // itself a token as that token first. Pre-tokenization is the caller's (encode_pieces only).
  Encoder(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks,
          const std::vector<std::string>& special_tokens, const std::vector<uint32_t>& special_ids,
          const std::vector<uint32_t>& merges, const std::vector<uint32_t>& byte_fallback, uint32_t unk_id,
          bool fuse_unk, bool whole_first);
  ~Encoder();
  bool char_level() const { return char_level_; }

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

  // A text cut at its allowed special tokens (after the disallowed check, which throws): text
  // spans [begin, end) with special_id == kNoSpecial, and special tokens with their id.
  static constexpr uint32_t kNoSpecial = ~0u;
  struct Segment {
    size_t begin, end;
    uint32_t special_id;
  };
  void check_disallowed(std::string_view text, const std::vector<uint32_t>& disallowed) const;
  void segments(std::string_view text, const std::vector<uint32_t>& allowed, const std::vector<uint32_t>& disallowed,
                std::vector<Segment>& out) const;

  // For the CUDA encoder: the merge table as (left, right, merged) triples and the byte ranks.
  std::vector<uint32_t> merge_triples() const;
  std::vector<uint32_t> byte_ranks() const { return std::vector<uint32_t>(byte_rank_, byte_rank_ + 256); }
  int pattern_code() const { return int(pattern_); }

 private:
  struct Slot {
    uint64_t hash;
    uint32_t rank;
  };
  uint32_t lookup_bytes(const uint8_t* p, size_t n) const;  // ~0u when not a token
  uint32_t lookup_bytes(const uint8_t* p, size_t n, uint64_t hash) const;
  // The priority of a pair (kNone: no merge), and the token a merge of that priority makes: the
  // same number for tiktoken's vocabularies (priority = the merged token's rank), a merge-list
  // index for SentencePiece-style ones.
  uint32_t pair_rank(uint32_t left, uint32_t right) const { return pairs_.get(pair_key(left, right)); }
  uint32_t merged_token(uint32_t priority) const { return merged_.empty() ? priority : merged_[priority]; }
  size_t priority_count() const { return merged_.empty() ? token_span_.size() : merged_.size(); }
  // A piece's starting symbols, at most n of them: its bytes' tokens, or (char_level_) the tokens
  // of its characters with byte fallback and unk.
  size_t initial_symbols(const uint8_t* p, size_t n, uint32_t* sym) const;
  void index_vocabulary(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks);
  void encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache) const;
  void merge_small(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const;
  void merge_long(const uint8_t* p, size_t n, std::vector<uint32_t>& out, LongPieceScratch& scratch) const;
  void encode_ordinary_into(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache,
                            std::vector<uint32_t>& ends) const;
  void encode_into(std::string_view text, const std::vector<uint32_t>& allowed,
                   const std::vector<uint32_t>& disallowed, std::vector<uint32_t>& out, PieceCache& cache,
                   std::vector<uint32_t>& ends) const;
  std::unique_ptr<PieceCache> take_cache() const;
  void give_cache(std::unique_ptr<PieceCache> cache) const;
  friend class CudaEncoder;

  Pattern pattern_;
  std::string blob_;                      // token bytes, concatenated
  std::vector<uint64_t> token_span_;      // rank -> (offset << 24 | length); ~0 for a hole
  std::vector<Slot> slots_;               // bytes -> rank, open addressing on hash_bytes
  size_t slot_mask_ = 0;
  PairMap pairs_;                         // (left rank, right rank) -> rank of their concatenation
  uint32_t byte_rank_[256];
  bool char_level_ = false;               // SentencePiece-style (see the second constructor)
  bool whole_first_ = true;               // a piece that is a token is that token (tiktoken's rule)
  std::vector<uint32_t> merged_;          // SentencePiece-style: merge priority -> merged token
  uint32_t byte_fallback_[256];           // SentencePiece-style: byte -> its <0xXX> token, or kNone
  uint32_t unk_id_ = ~0u;
  bool fuse_unk_ = false;
  // SentencePiece-style: no token holds another character followed by "▁" (true of SentencePiece's
  // own vocabularies, whose pieces start at a space or are runs of spaces), so no merge crosses the
  // point before such a "▁" and a piece is merged word by word there: the same tokens, with the
  // words cached (a Llama 2 text is one piece of the whole text otherwise).
  bool cut_words_ = false;
  std::vector<std::string> specials_;
  std::vector<uint32_t> special_ids_;
  mutable std::mutex cache_mutex_;
  mutable std::vector<std::unique_ptr<PieceCache>> free_caches_;
};

// CUDA batch encoder (csrc/cuda/bpe.cu; only in builds with CUDA). Holds a copy of the
// encoder's tables on one GPU; the Encoder must outlive it (the binding keeps it alive).
// Pre-tokenization and special tokens run on the host (threads); whole-piece lookup and merging
// of pieces up to kMaxDevicePiece bytes run on the GPU, longer pieces on the host.
class CudaEncoder {
 public:
  CudaEncoder(const Encoder& encoder, int device);
  ~CudaEncoder();
  CudaEncoder(const CudaEncoder&) = delete;
  CudaEncoder& operator=(const CudaEncoder&) = delete;
  std::vector<std::vector<uint32_t>> encode_batch(const std::vector<std::string_view>& texts,
                                                  const std::vector<uint32_t>& allowed,
                                                  const std::vector<uint32_t>& disallowed, uintptr_t stream,
                                                  int num_threads) const;
  // GPU time of the last call's kernels (lookup + merge + compaction), in ms: the merge stage.
  float last_kernel_ms() const { return last_kernel_ms_.load(); }

 private:
  const Encoder& encoder_;
  int device_;
  void* tables_;  // DeviceTables (bpe.cu)
  mutable std::atomic<float> last_kernel_ms_{0.0f};
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
