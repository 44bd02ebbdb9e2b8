// BPE encoder (CPU), token-identical with tiktoken.
//
// Per text: pre-tokenize (bpe_pretokenize.cpp), then per piece, as tiktoken does: a piece that is
// itself a token is that token; otherwise start from its bytes and repeatedly merge the adjacent
// pair whose concatenation has the lowest rank (leftmost on ties) until no pair is a token.
// "Concatenation is a token" is looked up as a pair of ranks in a hash map built once from the
// vocabulary (every split of every token into two tokens), instead of hashing byte strings.
//
// Merging: pieces of up to kSmallPiece bytes use two small arrays (symbols and pair ranks) with a
// linear scan for the minimum: O(n^2) but branch-light on tiny n. Longer pieces (merge_long) use a
// linked list and one bucket of pair positions per rank: the lowest non-empty rank comes from a
// small heap of ranks, and within a bucket positions come out in order because a left-to-right
// sweep inserts them in order (the rare out-of-order insert goes to a per-bucket heap). Stale
// entries are skipped by a per-node version. Worst case O(n log n), in practice O(n): 1 MB of
// one letter costs about 1.2x the per-byte time of ordinary text here (bench/bench_bpe.py), where
// a binary heap over all pairs cost 7x. Both paths give tiktoken's exact merge order: the minimum
// (rank, leftmost position) among the current pairs (tested on shuffled-rank vocabularies too).
//
// Pieces of 2..kMaxCachedPiece bytes that are not tokens are cached per thread (a direct-mapped
// table; most such pieces repeat). Text is pre-tokenized in blocks of 1024 pieces, so the piece
// ends stay in L1. encode_batch runs texts (long ones cut into 1 MiB spans at safe boundaries) on
// std::threads, GIL released by the binding; each thread takes a cache from a pool. Traffic: the
// text is read about 3 times (classify, hash, compare), ids are written once (4 bytes per token).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>

#include "bpe.h"
#include "common/checks.h"
#include "common/parallel.h"

namespace pyllm::bpe {
namespace {
// Measured (2026-11-23, this 2-core EPYC, 32k vocab, pieces of random letters): the arrays beat
// merge_long up to ~128 bytes (96 B: 18 vs 15 MB/s; 128 B: even; 256 B: 12 vs 15 MB/s).
constexpr size_t kSmallPiece = 128;
// The longest piece kept in the per-thread cache. Measured on the held-out stdlib source (32k
// vocab): no cache 57-59 MB/s, cache up to 16 or 64 bytes 60-64 MB/s (most pieces there are whole
// tokens and skip the cache); 64 is not tuned further.
constexpr size_t kMaxCachedPiece = 64;
constexpr uint32_t kNone = ~0u;
}  // namespace

// Scratch of merge_long, kept per thread between pieces. Pairs live in one bucket per rank (a
// sorted array consumed from the front, plus a small heap for out-of-order inserts); a min-heap
// holds the ranks that have a non-empty bucket.
struct LongPieceScratch {
  struct Bucket {
    std::vector<uint64_t> base, extra;  // (position << 32 | version of that node when pushed)
    size_t cursor = 0;
    bool in_heap = false;
  };
  std::vector<Bucket> buckets;
  size_t used = 0;
  std::vector<uint32_t> bucket_of_rank, touched_ranks, rank_heap;
  struct Node {
    uint32_t sym, next, prev, version;  // sym ~0: absorbed into its left neighbour
  };
  std::vector<Node> nodes;
  std::vector<uint32_t> symbols;  // a piece's starting symbols
};

// Per-thread state: the cache of encoded pieces and the long-piece scratch.
struct PieceCache {
  LongPieceScratch long_scratch;
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
  index_vocabulary(tokens, ranks);
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
}

Encoder::Encoder(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks,
                 const std::vector<std::string>& special_tokens, const std::vector<uint32_t>& special_ids,
                 const std::vector<uint32_t>& merges, const std::vector<uint32_t>& byte_fallback, uint32_t unk_id,
                 bool fuse_unk, bool whole_first)
    : pattern_(Pattern::kCustom), char_level_(true), whole_first_(whole_first), unk_id_(unk_id), fuse_unk_(fuse_unk),
      specials_(special_tokens), special_ids_(special_ids) {  // (in declaration order: -Wreorder)
  index_vocabulary(tokens, ranks);
  PYLLM_CHECK(merges.size() % 3 == 0, "bpe: merges must be (left, right, merged) triples, got ", merges.size(),
              " numbers");
  PYLLM_CHECK(byte_fallback.empty() || byte_fallback.size() == 256, "bpe: byte_fallback must hold 256 ids or none, got ",
              byte_fallback.size());
  // Every id this mode can emit (byte tokens, unk, merge results) must be a token or a special token.
  const auto known = [&](uint32_t id) {
    return (id < token_span_.size() && token_span_[id] != ~0ull) ||
           std::find(special_ids_.begin(), special_ids_.end(), id) != special_ids_.end();
  };
  PYLLM_CHECK(unk_id == kNone || known(unk_id), "bpe: unk id ", unk_id, " is not a token");
  for (int b = 0; b < 256; ++b) {
    byte_rank_[b] = kNone;
    byte_fallback_[b] = byte_fallback.empty() ? kNone : byte_fallback[b];
    PYLLM_CHECK(byte_fallback_[b] == kNone || known(byte_fallback_[b]), "bpe: byte token id ", byte_fallback_[b],
                " is not a token");
  }
  // Where words may be cut (see cut_words_): "▁" (E2 96 81) is a token, and no token has it after
  // another character (UTF-8 is self-synchronising: E2 96 81 at offset k >= 3 follows "▁" exactly
  // when bytes k-3..k-1 are E2 96 81 too). Not with whole_first, which looks the whole piece up.
  const uint8_t space[3] = {0xE2, 0x96, 0x81};
  cut_words_ = !whole_first && lookup_bytes(space, 3) != kNone;
  for (size_t i = 0; i < tokens.size() && cut_words_; ++i) {
    const std::string& t = tokens[i];
    for (size_t k = t.find("\xE2\x96\x81", 1); k != std::string::npos; k = t.find("\xE2\x96\x81", k + 1)) {
      if (k < 3 || t.compare(k - 3, 3, "\xE2\x96\x81") != 0) {
        cut_words_ = false;
        break;
      }
    }
  }
  const size_t n_merges = merges.size() / 3;
  PYLLM_CHECK(n_merges < kNone, "bpe: too many merges");
  merged_.reserve(n_merges);
  pairs_.reserve(n_merges);
  for (size_t i = 0; i < n_merges; ++i) {
    PYLLM_CHECK(known(merges[3 * i + 2]), "bpe: merge ", i, " makes id ", merges[3 * i + 2], ", which is not a token");
    merged_.push_back(merges[3 * i + 2]);
    pairs_.at_or_insert(pair_key(merges[3 * i], merges[3 * i + 1])) = uint32_t(i);  // a repeat: the last wins, as in HF
  }
}

void Encoder::index_vocabulary(const std::vector<std::string>& tokens, const std::vector<uint32_t>& ranks) {
  PYLLM_CHECK(tokens.size() == ranks.size(), "bpe: ", tokens.size(), " tokens but ", ranks.size(), " ranks");
  PYLLM_CHECK(specials_.size() == special_ids_.size(), "bpe: ", specials_.size(), " special tokens but ",
              special_ids_.size(), " ids");
  PYLLM_CHECK(!tokens.empty(), "bpe: empty vocabulary");
  uint32_t max_rank = 0;
  size_t total = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    PYLLM_CHECK(!tokens[i].empty(), "bpe: token of rank ", ranks[i], " is empty");
    // Indexing a token hashes each of its prefixes and suffixes: quadratic in its length (a 1 MiB
    // token in a downloaded file: minutes). Real vocabularies' longest are a few hundred bytes.
    PYLLM_CHECK(tokens[i].size() <= kMaxTokenBytes, "bpe: token of rank ", ranks[i], " is ", tokens[i].size(),
                " bytes, longer than the ", kMaxTokenBytes, " a vocabulary's token may be");
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
  for (size_t i = 0; i < specials_.size(); ++i) {
    PYLLM_CHECK(!specials_[i].empty(), "bpe: empty special token");
  }
}

size_t Encoder::initial_symbols(const uint8_t* p, size_t n, uint32_t* sym) const {
  if (!char_level_) {
    for (size_t i = 0; i < n; ++i) sym[i] = byte_rank_[p[i]];
    return n;
  }
  // Hugging Face's BPE::merge_word, character by character (the caller's text is valid UTF-8; a
  // stray byte counts as a character of its own).
  size_t m = 0;
  bool unk_pending = false;
  for (size_t i = 0; i < n;) {
    const uint8_t lead = p[i];
    size_t len = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
    len = std::min(len, n - i);
    const uint32_t id = lookup_bytes(p + i, len);
    if (id != kNone) {
      if (unk_pending) sym[m++] = unk_id_;
      unk_pending = false;
      sym[m++] = id;
    } else if (std::all_of(p + i, p + i + len, [&](uint8_t b) { return byte_fallback_[b] != kNone; })) {
      // As Hugging Face: the byte tokens go in, a pending unk stays pending (only possible with an
      // incomplete set of byte tokens).
      for (size_t k = 0; k < len; ++k) sym[m++] = byte_fallback_[p[i + k]];
    } else if (unk_id_ != kNone) {
      if (unk_pending && !fuse_unk_) sym[m++] = unk_id_;
      unk_pending = true;
    }
    i += len;
  }
  if (unk_pending) sym[m++] = unk_id_;
  return m;
}

Encoder::~Encoder() = default;

uint32_t Encoder::lookup_bytes(const uint8_t* p, size_t n) const { return lookup_bytes(p, n, hash_bytes(p, n)); }

uint32_t Encoder::lookup_bytes(const uint8_t* p, size_t n, uint64_t h) const {
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
  PYLLM_CHECK(n <= kSmallPiece, "bpe: merge_small called on a piece of ", n, " bytes");
  uint32_t sym[kSmallPiece], rank[kSmallPiece];  // rank[i]: of the pair (sym[i], sym[i + 1])
  size_t m = initial_symbols(p, n, sym);
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
    sym[at] = merged_token(best);
    // Drop symbol at + 1 and the pair that started there.
    std::memmove(sym + at + 1, sym + at + 2, (m - at - 2) * sizeof(uint32_t));
    if (at + 3 <= m) std::memmove(rank + at + 1, rank + at + 2, (m - at - 3) * sizeof(uint32_t));
    --m;
    if (at > 0) rank[at - 1] = pair_rank(sym[at - 1], sym[at]);
    if (at + 1 < m) rank[at] = pair_rank(sym[at], sym[at + 1]);
  }
  out.insert(out.end(), sym, sym + m);
}

void Encoder::merge_long(const uint8_t* p, size_t n, std::vector<uint32_t>& out, LongPieceScratch& s) const {
  PYLLM_CHECK(n < 0xFFFFFFFFull, "bpe: piece too long");
  if (s.bucket_of_rank.size() < priority_count()) s.bucket_of_rank.assign(priority_count(), kNone);
  // One 16-byte node per symbol: a merge touches 3-4 neighbouring nodes, each one cache line.
  s.nodes.resize(n);
  LongPieceScratch::Node* node = s.nodes.data();
  s.symbols.resize(n);
  n = initial_symbols(p, n, s.symbols.data());
  if (n == 0) return;
  for (size_t i = 0; i < n; ++i) {
    node[i] = {s.symbols[i], i + 1 < n ? uint32_t(i + 1) : kNone, i > 0 ? uint32_t(i - 1) : kNone, 0};
  }
  const auto later = std::greater<uint64_t>();
  const auto later32 = std::greater<uint32_t>();
  auto insert = [&](uint32_t rank, uint32_t pos) {
    uint32_t b = s.bucket_of_rank[rank];
    if (b == kNone) {
      b = s.bucket_of_rank[rank] = uint32_t(s.used++);
      if (s.buckets.size() < s.used) s.buckets.emplace_back();
      s.touched_ranks.push_back(rank);
    }
    LongPieceScratch::Bucket& bucket = s.buckets[b];
    const uint64_t entry = (uint64_t(pos) << 32) | node[pos].version;
    if (bucket.cursor == bucket.base.size()) {
      bucket.base.clear();
      bucket.cursor = 0;
      bucket.base.push_back(entry);
    } else if (entry >= bucket.base.back()) {
      bucket.base.push_back(entry);  // the usual case: a left-to-right sweep inserts in order
    } else {
      bucket.extra.push_back(entry);
      std::push_heap(bucket.extra.begin(), bucket.extra.end(), later);
    }
    if (!bucket.in_heap) {
      bucket.in_heap = true;
      s.rank_heap.push_back(rank);
      std::push_heap(s.rank_heap.begin(), s.rank_heap.end(), later32);
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) {
    const uint32_t r = pair_rank(node[i].sym, node[i + 1].sym);
    if (r != kNone) insert(r, uint32_t(i));
  }
  while (!s.rank_heap.empty()) {
    const uint32_t r = s.rank_heap.front();
    LongPieceScratch::Bucket& bucket = s.buckets[s.bucket_of_rank[r]];
    const bool has_base = bucket.cursor < bucket.base.size();
    uint64_t entry;
    if (!bucket.extra.empty() && (!has_base || bucket.extra.front() < bucket.base[bucket.cursor])) {
      std::pop_heap(bucket.extra.begin(), bucket.extra.end(), later);
      entry = bucket.extra.back();
      bucket.extra.pop_back();
    } else if (has_base) {
      entry = bucket.base[bucket.cursor++];
    } else {
      std::pop_heap(s.rank_heap.begin(), s.rank_heap.end(), later32);
      s.rank_heap.pop_back();
      bucket.in_heap = false;
      continue;
    }
    const uint32_t i = uint32_t(entry >> 32);
    LongPieceScratch::Node& left = node[i];
    if (left.sym == kNone || left.version != uint32_t(entry)) continue;  // stale
    LongPieceScratch::Node& right = node[left.next];
    const uint32_t merged = merged_token(r);
    left.sym = merged;
    right.sym = kNone;
    left.next = right.next;
    ++left.version;
    if (left.next != kNone) node[left.next].prev = i;
    // Left pair first: a sweep then inserts positions in order (the buckets' sorted fast path).
    if (left.prev != kNone) {
      LongPieceScratch::Node& before = node[left.prev];
      ++before.version;
      const uint32_t rl = pair_rank(before.sym, merged);
      if (rl != kNone) insert(rl, left.prev);
    }
    if (left.next != kNone) {
      const uint32_t rr = pair_rank(merged, node[left.next].sym);
      if (rr != kNone) insert(rr, i);
    }
  }
  for (uint32_t i = 0; i != kNone; i = node[i].next) out.push_back(node[i].sym);
  for (const uint32_t rank : s.touched_ranks) s.bucket_of_rank[rank] = kNone;
  for (size_t b = 0; b < s.used; ++b) {
    s.buckets[b].base.clear();
    s.buckets[b].extra.clear();
    s.buckets[b].cursor = 0;
    s.buckets[b].in_heap = false;
  }
  s.used = 0;
  s.touched_ranks.clear();
  s.rank_heap.clear();
  // The scratch stays with the thread's cache; past 64 KiB pieces (~40 bytes of scratch per byte)
  // give the memory back rather than keep it for the encoder's lifetime (the bound had been 1 MiB:
  // ~40 MB kept per pooled cache after one piece just under it).
  if (n > (size_t(1) << 16)) {
    s.nodes = {};
    s.buckets = {};
    s.symbols = {};
  }
}

void Encoder::encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache) const {
  if (n == 1 && !char_level_) {
    out.push_back(byte_rank_[p[0]]);
    return;
  }
  const uint64_t h = hash_bytes(p, n);
  if (whole_first_) {
    const uint32_t whole = lookup_bytes(p, n, h);
    if (whole != kNone) {
      out.push_back(whole);
      return;
    }
  }
  if (n > kMaxCachedPiece) {
    if (n <= kSmallPiece) merge_small(p, n, out);
    else merge_long(p, n, out, cache.long_scratch);
    return;
  }
  if (cache.find(h, p, n, out)) return;
  const size_t before = out.size();
  if (n <= kSmallPiece) merge_small(p, n, out);
  else merge_long(p, n, out, cache.long_scratch);
  cache.insert(h, p, n, out.data() + before, out.size() - before);
}

void Encoder::encode_ordinary_into(const uint8_t* p, size_t n, std::vector<uint32_t>& out, PieceCache& cache,
                                   std::vector<uint32_t>& ends) const {
  PYLLM_CHECK(pattern_ != Pattern::kCustom, "bpe: a custom pattern is split in Python; use encode_pieces");
  // Pieces in blocks of kPiecesPerBlock: the ends buffer stays in L1 instead of growing with the text.
  constexpr size_t kPiecesPerBlock = 1024;
  size_t start = 0;
  while (start < n) {
    ends.clear();
    pretokenize(pattern_, p, n, start, ends, kPiecesPerBlock);
    for (const uint32_t end : ends) {
      encode_piece(p + start, end - start, out, cache);
      start = end;
    }
  }
}

void Encoder::check_disallowed(std::string_view text, const std::vector<uint32_t>& disallowed) const {
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
}

void Encoder::segments(std::string_view text, const std::vector<uint32_t>& allowed,
                       const std::vector<uint32_t>& disallowed, std::vector<Segment>& out) const {
  out.clear();
  check_disallowed(text, disallowed);
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
      if (pos < text.size()) out.push_back({pos, text.size(), kNoSpecial});
      return;
    }
    if (pos < best) out.push_back({pos, best, kNoSpecial});
    const size_t end = best + specials_[allowed[best_k]].size();
    out.push_back({best, end, special_ids_[allowed[best_k]]});
    pos = end;
  }
}

void Encoder::encode_into(std::string_view text, const std::vector<uint32_t>& allowed,
                          const std::vector<uint32_t>& disallowed, std::vector<uint32_t>& out, PieceCache& cache,
                          std::vector<uint32_t>& ends) const {
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  if (allowed.empty() && disallowed.empty()) {
    encode_ordinary_into(bytes, text.size(), out, cache, ends);
    return;
  }
  std::vector<Segment> parts;
  segments(text, allowed, disallowed, parts);
  for (const Segment& part : parts) {
    if (part.special_id != kNoSpecial) out.push_back(part.special_id);
    else encode_ordinary_into(bytes + part.begin, part.end - part.begin, out, cache, ends);
  }
}

// The pool's mutex is only ever tried, never waited on: a process forked while another thread held
// it (a DataLoader / fork Pool started while a thread encodes) has it locked for good, and its
// encodes had hung there. A failed try costs a fresh cache (or drops a returned one), never a hang.
// 64 tries with a yield between: a live holder keeps the lock for one push or pop (nanoseconds),
// so only a lock no thread will release outlasts them.
static bool try_lock_briefly(std::unique_lock<std::mutex>& lock) {
  for (int i = 0; i < 64 && !lock.try_lock(); ++i) std::this_thread::yield();
  return lock.owns_lock();
}

std::unique_ptr<PieceCache> Encoder::take_cache() const {
  {
    std::unique_lock<std::mutex> lock(cache_mutex_, std::defer_lock);
    if (try_lock_briefly(lock) && !free_caches_.empty()) {
      auto cache = std::move(free_caches_.back());
      free_caches_.pop_back();
      return cache;
    }
  }
  return std::make_unique<PieceCache>();
}

void Encoder::give_cache(std::unique_ptr<PieceCache> cache) const {
  std::unique_lock<std::mutex> lock(cache_mutex_, std::defer_lock);
  if (!try_lock_briefly(lock)) return;  // (the cache is freed)
  // As many as threads can use at once (encode_batch takes one per worker), not more: each holds
  // its arena of pieces (~12-25 MB settled).
  static const size_t kMaxPooled = std::max<size_t>(1, std::min<size_t>(64, std::thread::hardware_concurrency()));
  if (free_caches_.size() < kMaxPooled) free_caches_.push_back(std::move(cache));
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
  // Work items: whole texts, or spans of kBatchSpanBytes for long texts without allowed special
  // tokens (cut at the pattern's safe piece boundaries), so a few long texts still use every thread.
  constexpr size_t kBatchSpanBytes = 1 << 20;
  struct Item {
    size_t text, begin, end;
    bool whole;
  };
  std::vector<Item> items;
  std::vector<size_t> ends;
  for (size_t t = 0; t < texts.size(); ++t) {
    if (!allowed.empty() || texts[t].size() <= kBatchSpanBytes) {
      items.push_back({t, 0, texts[t].size(), true});
      continue;
    }
    ends.clear();
    cut_at_safe_boundaries(pattern_, texts[t], kBatchSpanBytes, ends);
    size_t begin = 0;
    for (const size_t end : ends) {
      items.push_back({t, begin, end, false});
      begin = end;
    }
  }
  std::vector<std::vector<uint32_t>> item_ids(items.size());
  const size_t threads = worker_count(items.size(), num_threads);
  struct WorkerState {
    std::unique_ptr<PieceCache> cache;
    std::vector<uint32_t> piece_ends;
  };
  std::vector<WorkerState> state(threads);
  for (auto& st : state) st.cache = take_cache();
  parallel_items(items.size(), threads, [&](size_t w, size_t k) {
    const Item& item = items[k];
    const std::string_view text = texts[item.text];
    auto& out = item_ids[k];
    out.reserve((item.end - item.begin) / 3 + 16);
    if (item.whole) {
      encode_into(text, allowed, disallowed, out, *state[w].cache, state[w].piece_ends);
    } else {
      if (item.begin == 0) check_disallowed(text, disallowed);
      encode_ordinary_into(reinterpret_cast<const uint8_t*>(text.data()) + item.begin, item.end - item.begin, out,
                           *state[w].cache, state[w].piece_ends);
    }
  });
  for (auto& st : state) give_cache(std::move(st.cache));
  std::vector<std::vector<uint32_t>> results(texts.size());
  std::vector<size_t> total(texts.size(), 0);
  for (size_t k = 0; k < items.size(); ++k) total[items[k].text] += item_ids[k].size();
  for (size_t k = 0; k < items.size(); ++k) {
    auto& out = results[items[k].text];
    if (items[k].whole || (items[k].begin == 0 && items[k].end == texts[items[k].text].size())) {
      out = std::move(item_ids[k]);  // (a long text without a safe cut is one span)
      continue;
    }
    // A long text's spans, copied once into ids reserved whole (growing by insert had copied them
    // about twice more, serially), each span's freed as it is copied.
    if (items[k].begin == 0) out.reserve(total[items[k].text]);
    out.insert(out.end(), item_ids[k].begin(), item_ids[k].end());
    item_ids[k] = {};
  }
  return results;
}

std::vector<uint32_t> Encoder::encode_pieces(const std::vector<std::string_view>& pieces) const {
  std::vector<uint32_t> out;
  auto cache = take_cache();
  for (const auto& piece : pieces) {
    const auto* p = reinterpret_cast<const uint8_t*>(piece.data());
    if (!cut_words_) {
      if (!piece.empty()) encode_piece(p, piece.size(), out, *cache);
      continue;
    }
    // Cut before each "▁" that follows another character.
    size_t start = 0;
    for (size_t k = piece.find("\xE2\x96\x81", 1); k != std::string_view::npos; k = piece.find("\xE2\x96\x81", k + 3)) {
      if (k >= 3 && piece.compare(k - 3, 3, "\xE2\x96\x81") == 0) continue;
      encode_piece(p + start, k - start, out, *cache);
      start = k;
    }
    if (start < piece.size()) encode_piece(p + start, piece.size() - start, out, *cache);
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
  PYLLM_CHECK(!char_level_, "bpe: the CUDA encoder takes byte-level vocabularies only, not SentencePiece-style ones");
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
