// BPE encoder (CPU), token-identical with tiktoken.
//
// Per text: pre-tokenize (bpe_pretokenize.cpp), then per piece, as tiktoken does: a piece that is
// itself a token is that token; otherwise start from its bytes and repeatedly merge the adjacent
// pair whose concatenation has the lowest rank (leftmost on ties) until no pair is a token.
// "Concatenation is a token" is looked up as a pair of ranks in a hash map built once from the
// vocabulary (every split of every token into two tokens), instead of hashing byte strings.
//
// Merging: pieces of up to kSmallPiece bytes use two small arrays (symbols and pair ranks) with a
// linear scan for the minimum: O(n^2) but branch-light on tiny n. Longer pieces use a linked list
// and a binary min-heap of (rank, position) with lazy deletion: O(n log n), so a megabyte without
// spaces costs about as much per byte as ordinary text. Both give tiktoken's exact merge order: the
// minimum (rank, leftmost position) among the current pairs.
//
// Pieces of 2..kMaxCachedPiece bytes that are not tokens are cached per thread (a direct-mapped
// table; most such pieces repeat). encode_batch runs texts on std::threads, GIL released by the
// binding; each thread takes a cache from a pool. Traffic: the text is read about 3 times
// (classify, hash, merge), ids are written once (4 bytes per token).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <functional>
#include <queue>
#include <thread>

#include "bpe.h"
#include "common/checks.h"

namespace pyllm::bpe {
namespace {
// Not yet measured: tiktoken switches to its heap at 100 bytes; we keep arrays on the stack.
constexpr size_t kSmallPiece = 128;
constexpr size_t kMaxCachedPiece = 64;
constexpr uint32_t kNone = ~0u;
}  // namespace

struct PieceCache {
  static constexpr size_t kSlots = 1 << 14;
  static constexpr size_t kMaxArena = 1 << 22;  // bytes of keys; then start over
  struct Entry {
    uint64_t hash = 0;
    uint32_t key_off = 0, ids_off = 0;
    uint16_t key_len = 0, n_ids = 0;  // key_len 0: empty
  };
  std::vector<Entry> entries = std::vector<Entry>(kSlots);
  std::string keys;
  std::vector<uint32_t> ids;

  bool find(uint64_t hash, const uint8_t* p, size_t n, std::vector<uint32_t>& out) const {
    const Entry& e = entries[hash & (kSlots - 1)];
    if (e.hash != hash || e.key_len != n || std::memcmp(keys.data() + e.key_off, p, n) != 0) return false;
    out.insert(out.end(), ids.begin() + e.ids_off, ids.begin() + e.ids_off + e.n_ids);
    return true;
  }
  void insert(uint64_t hash, const uint8_t* p, size_t n, const uint32_t* piece_ids, size_t n_ids) {
    if (keys.size() + n > kMaxArena) {
      keys.clear();
      ids.clear();
      std::fill(entries.begin(), entries.end(), Entry{});
    }
    Entry& e = entries[hash & (kSlots - 1)];
    e = Entry{hash, uint32_t(keys.size()), uint32_t(ids.size()), uint16_t(n), uint16_t(n_ids)};
    keys.append(reinterpret_cast<const char*>(p), n);
    ids.insert(ids.end(), piece_ids, piece_ids + n_ids);
  }
};

Encoder::Encoder(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks, int pattern,
                 const std::vector<std::string>& special_tokens, const std::vector<uint32_t>& special_ids)
    : pattern_(pattern_from_code(pattern)), specials_(special_tokens), special_ids_(special_ids) {
  PYLLM_CHECK(tokens.size() == ranks.size(), "bpe: ", tokens.size(), " tokens but ", ranks.size(), " ranks");
  PYLLM_CHECK(special_tokens.size() == special_ids.size(), "bpe: ", special_tokens.size(),
              " special tokens but ", special_ids.size(), " ids");
  PYLLM_CHECK(!tokens.empty(), "bpe: empty vocabulary");
  uint32_t max_rank = 0;
  size_t total = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    PYLLM_CHECK(!tokens[i].empty(), "bpe: token of rank ", ranks[i], " is empty");
    PYLLM_CHECK(tokens[i].size() < (1u << 24), "bpe: token of rank ", ranks[i], " is too long");
    PYLLM_CHECK(ranks[i] < 0x7FFFFFFFu, "bpe: rank ", ranks[i], " is out of range");
    max_rank = std::max(max_rank, ranks[i]);
    total += tokens[i].size();
  }
  blob_.reserve(total);
  token_span_.assign(size_t(max_rank) + 1, ~0ull);
  size_t cap = 16;
  while (cap < tokens.size() * 2) cap <<= 1;
  slots_.assign(cap, Slot{0, kNone});
  slot_mask_ = cap - 1;
  for (size_t i = 0; i < tokens.size(); ++i) {
    PYLLM_CHECK(token_span_[ranks[i]] == ~0ull, "bpe: rank ", ranks[i], " appears twice");
    const auto* p = reinterpret_cast<const uint8_t*>(tokens[i].data());
    const uint64_t h = hash_bytes(p, tokens[i].size());
    PYLLM_CHECK(lookup_bytes(p, tokens[i].size()) == kNone, "bpe: the byte string of rank ", ranks[i],
                " appears twice in the vocabulary");
    token_span_[ranks[i]] = (uint64_t(blob_.size()) << 24) | tokens[i].size();
    blob_ += tokens[i];
    size_t slot = h & slot_mask_;
    while (slots_[slot].rank != kNone) slot = (slot + 1) & slot_mask_;
    slots_[slot] = Slot{h, ranks[i]};
  }
  for (int b = 0; b < 256; ++b) {
    const uint8_t byte = uint8_t(b);
    byte_rank_[b] = lookup_bytes(&byte, 1);
    PYLLM_CHECK(byte_rank_[b] != kNone, "bpe: the vocabulary lacks the single byte ", b,
                " (a byte-level BPE vocabulary has all 256)");
  }
  pairs_.reserve(tokens.size() * 2);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const auto* p = reinterpret_cast<const uint8_t*>(tokens[i].data());
    for (size_t k = 1; k < tokens[i].size(); ++k) {
      const uint32_t left = lookup_bytes(p, k), right = lookup_bytes(p + k, tokens[i].size() - k);
      if (left != kNone && right != kNone) pairs_.at_or_insert(pair_key(left, right)) = ranks[i];
    }
  }
  for (size_t i = 0; i < specials_.size(); ++i) {
    PYLLM_CHECK(!specials_[i].empty(), "bpe: empty special token");
  }
}

Encoder::~Encoder() = default;

uint32_t Encoder::lookup_bytes(const uint8_t* p, size_t n) const {
  const uint64_t h = hash_bytes(p, n);
  size_t slot = h & slot_mask_;
  while (true) {
    const Slot& s = slots_[slot];
    if (s.rank == kNone) return kNone;
    if (s.hash == h) {
      const uint64_t span = token_span_[s.rank];
      if ((span & 0xFFFFFF) == n && std::memcmp(blob_.data() + (span >> 24), p, n) == 0) return s.rank;
    }
    slot = (slot + 1) & slot_mask_;
  }
}

void Encoder::merge_small(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const {
  uint32_t sym[kSmallPiece], rank[kSmallPiece];  // rank[i]: of the pair (sym[i], sym[i + 1])
  size_t m = n;
  for (size_t i = 0; i < m; ++i) sym[i] = byte_rank_[p[i]];
  for (size_t i = 0; i + 1 < m; ++i) rank[i] = pair_rank(sym[i], sym[i + 1]);
  while (m > 1) {
    uint32_t best = kNone;
    size_t at = 0;
    for (size_t i = 0; i + 1 < m; ++i) {
      if (rank[i] < best) {
        best = rank[i];
        at = i;
      }
    }
    if (best == kNone) break;
    sym[at] = best;
    // Drop symbol at + 1 and the pair that started there.
    std::memmove(sym + at + 1, sym + at + 2, (m - at - 2) * sizeof(uint32_t));
    if (at + 3 <= m) std::memmove(rank + at + 1, rank + at + 2, (m - at - 3) * sizeof(uint32_t));
    --m;
    if (at > 0) rank[at - 1] = pair_rank(sym[at - 1], sym[at]);
    if (at + 1 < m) rank[at] = pair_rank(sym[at], sym[at + 1]);
  }
  out.insert(out.end(), sym, sym + m);
}

void Encoder::merge_heap(const uint8_t* p, size_t n, std::vector<uint32_t>& out) const {
  PYLLM_CHECK(n < 0xFFFFFFFFull, "bpe: piece too long");
  std::vector<uint32_t> sym(n), next(n), prev(n);
  std::vector<uint64_t> heap;  // (rank << 32 | position), a min-heap
  heap.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    sym[i] = byte_rank_[p[i]];
    next[i] = i + 1 < n ? uint32_t(i + 1) : kNone;
    prev[i] = i > 0 ? uint32_t(i - 1) : kNone;
  }
  for (size_t i = 0; i + 1 < n; ++i) {
    const uint32_t r = pair_rank(sym[i], sym[i + 1]);
    if (r != kNone) heap.push_back((uint64_t(r) << 32) | i);
  }
  const auto later = std::greater<uint64_t>();
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const uint64_t top = heap.back();
    heap.pop_back();
    const uint32_t r = uint32_t(top >> 32), i = uint32_t(top);
    const uint32_t j = next[i];
    // Stale entries: i was absorbed (its next link is cut), or its pair changed since the push.
    if (j == kNone || sym[i] == kNone || pair_rank(sym[i], sym[j]) != r) continue;
    sym[i] = r;
    sym[j] = kNone;
    next[i] = next[j];
    next[j] = kNone;
    if (next[i] != kNone) prev[next[i]] = i;
    if (prev[i] != kNone) {
      const uint32_t rl = pair_rank(sym[prev[i]], r);
      if (rl != kNone) {
        heap.push_back((uint64_t(rl) << 32) | prev[i]);
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (next[i] != kNone) {
      const uint32_t rr = pair_rank(r, sym[next[i]]);
      if (rr != kNone) {
        heap.push_back((uint64_t(rr) << 32) | i);
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
  for (uint32_t i = 0; i != kNone; i = next[i]) out.push_back(sym[i]);
}

void Encoder::encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache) const {
  if (n == 1) {
    out.push_back(byte_rank_[p[0]]);
    return;
  }
  const uint32_t whole = lookup_bytes(p, n);
  if (whole != kNone) {
    out.push_back(whole);
    return;
  }
  if (n > kMaxCachedPiece) {
    if (n <= kSmallPiece) merge_small(p, n, out);
    else merge_heap(p, n, out);
    return;
  }
  const uint64_t h = hash_bytes(p, n);
  if (cache.find(h, p, n, out)) return;
  const size_t before = out.size();
  merge_small(p, n, out);
  cache.insert(h, p, n, out.data() + before, out.size() - before);
}

void Encoder::encode_ordinary_into(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache,
                                   std::vector<uint32_t>& ends) const {
  PYLLM_CHECK(pattern_ != Pattern::kCustom, "bpe: a custom pattern is split in Python; use encode_pieces");
  ends.clear();
  pretokenize(pattern_, p, n, ends);
  size_t start = 0;
  for (const uint32_t end : ends) {
    encode_piece(p + start, end - start, out, cache);
    start = end;
  }
}

void Encoder::encode_into(std::string_view text, const std::vector<uint32_t>& allowed,
                          const std::vector<uint32_t>& disallowed, std::vector<uint32_t>& out, PieceCache& cache,
                          std::vector<uint32_t>& ends) const {
  for (const uint32_t d : disallowed) {
    PYLLM_CHECK(d < specials_.size(), "bpe: special token index ", d, " out of range");
    if (text.find(specials_[d]) != std::string_view::npos) {
      throw std::invalid_argument(concat(
          "Encountered text corresponding to disallowed special token '", specials_[d],
          "'.\nIf you want this text to be encoded as a special token, pass it to `allowed_special`, e.g. "
          "`allowed_special={'", specials_[d], "', ...}`.\nIf you want this text to be encoded as normal "
          "text, disable the check for this token by passing `disallowed_special=(enc.special_tokens_set - {'",
          specials_[d], "'})`.\nTo disable this check for all special tokens, pass `disallowed_special=()`."));
    }
  }
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  if (allowed.empty()) {
    encode_ordinary_into(bytes, text.size(), out, cache, ends);
    return;
  }
  for (const uint32_t a : allowed) PYLLM_CHECK(a < specials_.size(), "bpe: special token index ", a, " out of range");
  std::vector<size_t> next_at(allowed.size(), 0);
  for (size_t k = 0; k < allowed.size(); ++k) next_at[k] = text.find(specials_[allowed[k]]);
  size_t pos = 0;
  while (true) {
    size_t best = std::string_view::npos, best_k = 0;
    for (size_t k = 0; k < allowed.size(); ++k) {
      if (next_at[k] != std::string_view::npos && next_at[k] < pos) next_at[k] = text.find(specials_[allowed[k]], pos);
      const size_t at = next_at[k];
      // Earliest occurrence; at the same position the longest special token wins.
      if (at < best || (at == best && at != std::string_view::npos &&
                        specials_[allowed[k]].size() > specials_[allowed[best_k]].size())) {
        best = at;
        best_k = k;
      }
    }
    if (best == std::string_view::npos) {
      encode_ordinary_into(bytes + pos, text.size() - pos, out, cache, ends);
      return;
    }
    encode_ordinary_into(bytes + pos, best - pos, out, cache, ends);
    out.push_back(special_ids_[allowed[best_k]]);
    pos = best + specials_[allowed[best_k]].size();
  }
}

std::unique_ptr<PieceCache> Encoder::take_cache() const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (!free_caches_.empty()) {
      auto cache = std::move(free_caches_.back());
      free_caches_.pop_back();
      return cache;
    }
  }
  return std::make_unique<PieceCache>();
}

void Encoder::give_cache(std::unique_ptr<PieceCache> cache) const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (free_caches_.size() < 64) free_caches_.push_back(std::move(cache));
}

std::vector<uint32_t> Encoder::encode_ordinary(std::string_view text) const {
  std::vector<uint32_t> out, ends;
  out.reserve(text.size() / 3 + 16);
  auto cache = take_cache();
  encode_ordinary_into(reinterpret_cast<const uint8_t*>(text.data()), text.size(), out, *cache, ends);
  give_cache(std::move(cache));
  return out;
}

std::vector<uint32_t> Encoder::encode(std::string_view text, const std::vector<uint32_t>& allowed,
                                      const std::vector<uint32_t>& disallowed) const {
  std::vector<uint32_t> out, ends;
  out.reserve(text.size() / 3 + 16);
  auto cache = take_cache();
  encode_into(text, allowed, disallowed, out, *cache, ends);
  give_cache(std::move(cache));
  return out;
}

std::vector<std::vector<uint32_t>> Encoder::encode_batch(const std::vector<std::string_view>& texts,
                                                         const std::vector<uint32_t>& allowed,
                                                         const std::vector<uint32_t>& disallowed,
                                                         int num_threads) const {
  std::vector<std::vector<uint32_t>> results(texts.size());
  size_t threads = num_threads > 0 ? size_t(num_threads) : std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, texts.size());
  std::atomic<size_t> next_text{0};
  std::vector<std::exception_ptr> errors(std::max<size_t>(threads, 1));
  auto worker = [&](size_t w) {
    try {
      auto cache = take_cache();
      std::vector<uint32_t> ends;
      for (size_t t = next_text++; t < texts.size(); t = next_text++) {
        results[t].reserve(texts[t].size() / 3 + 16);
        encode_into(texts[t], allowed, disallowed, results[t], *cache, ends);
      }
      give_cache(std::move(cache));
    } catch (...) {
      errors[w] = std::current_exception();
      next_text = texts.size();  // the others stop at their next text
    }
  };
  if (threads <= 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (size_t w = 0; w < threads; ++w) pool.emplace_back(worker, w);
    for (auto& t : pool) t.join();
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return results;
}

std::vector<uint32_t> Encoder::encode_pieces(const std::vector<std::string_view>& pieces) const {
  std::vector<uint32_t> out;
  auto cache = take_cache();
  for (const auto& piece : pieces) {
    if (!piece.empty()) encode_piece(reinterpret_cast<const uint8_t*>(piece.data()), piece.size(), out, *cache);
  }
  give_cache(std::move(cache));
  return out;
}

std::string Encoder::decode_bytes(const std::vector<uint32_t>& ids) const {
  std::string out;
  for (const uint32_t id : ids) {
    if (id < token_span_.size() && token_span_[id] != ~0ull) {
      out.append(blob_.data() + (token_span_[id] >> 24), token_span_[id] & 0xFFFFFF);
      continue;
    }
    const auto it = std::find(special_ids_.begin(), special_ids_.end(), id);
    PYLLM_CHECK(it != special_ids_.end(), "bpe: unknown token id ", id);
    out += specials_[it - special_ids_.begin()];
  }
  return out;
}

std::vector<uint32_t> Encoder::merge_triples() const {
  std::vector<uint32_t> triples;
  for (uint32_t rank = 0; rank < token_span_.size(); ++rank) {
    if (token_span_[rank] == ~0ull) continue;
    const auto* p = reinterpret_cast<const uint8_t*>(blob_.data() + (token_span_[rank] >> 24));
    const size_t n = token_span_[rank] & 0xFFFFFF;
    for (size_t k = 1; k < n; ++k) {
      const uint32_t left = lookup_bytes(p, k), right = lookup_bytes(p + k, n - k);
      if (left != kNone && right != kNone) triples.insert(triples.end(), {left, right, rank});
    }
  }
  return triples;
}

}  // namespace pyllm::bpe
