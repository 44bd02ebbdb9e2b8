// BPE trainer (CPU): byte-level BPE over the unique pre-tokenized pieces and their counts.
//
// 1. Counting: texts are pre-tokenized (bpe_pretokenize.cpp) on std::threads into per-thread hash
//    tables of piece -> count, merged at the end of each call. Texts over 1 MiB are cut into work
//    items at safe piece boundaries of the pattern (cut_at_safe_boundaries).
// 2. Merging: every unique piece becomes a word of byte ids (byte b = id b) with its count. Each
//    pair of adjacent ids has a count (summed over words, times word counts) and the list of words
//    it occurs in. A max-heap of (count, pair) with lazy deletion picks the next merge: a popped
//    entry whose count is stale is pushed back with its current count. Merging (a, b) -> t
//    rewrites only the words on (a, b)'s list, left to right and non-overlapping, and updates the
//    counts of the neighbouring pairs in place: O(occurrences) per merge, not O(corpus).
// Tie-breaking (deterministic): the highest count first; among equal counts the smallest pair
// (left id, then right id). A merge whose bytes already are a token (e.g. "a"+"bc" after
// "ab"+"c") reuses that token's id and does not count as a new token, so the vocabulary never
// holds the same bytes twice (tiktoken requires that).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <thread>
#include <unordered_map>

#include "bpe.h"
#include "common/checks.h"
#include "common/parallel.h"

namespace pyllm::bpe {
namespace {

constexpr size_t kWorkItemBytes = 1 << 20;

// Open-addressing table piece bytes -> count, with the bytes in one arena.
class PieceCounter {
 public:
  struct Entry {
    uint64_t hash;
    uint64_t offset;  // into arena; ~0: empty slot
    uint32_t length;
    int64_t count;
  };
  PieceCounter() { entries_.assign(1024, Entry{0, ~0ull, 0, 0}); }

  void add(const uint8_t* p, size_t n, int64_t count) { add(p, n, count, hash_bytes(p, n)); }
  void add(const uint8_t* p, size_t n, int64_t count, uint64_t h) {
    if ((size_ + 1) * 2 > entries_.size()) grow();
    const size_t mask = entries_.size() - 1;
    size_t slot = h & mask;
    while (true) {
      Entry& e = entries_[slot];
      if (e.offset == ~0ull) {
        e = Entry{h, arena_.size(), uint32_t(n), count};
        arena_.append(reinterpret_cast<const char*>(p), n);
        ++size_;
        return;
      }
      if (e.hash == h && e.length == n && std::memcmp(arena_.data() + e.offset, p, n) == 0) {
        e.count += count;
        return;
      }
      slot = (slot + 1) & mask;
    }
  }
  void add_all(const PieceCounter& other) {
    for (const Entry& e : other.entries_) {
      if (e.offset != ~0ull) add(other.bytes(e), e.length, e.count, e.hash);
    }
  }
  const uint8_t* bytes(const Entry& e) const { return reinterpret_cast<const uint8_t*>(arena_.data() + e.offset); }
  const std::vector<Entry>& entries() const { return entries_; }
  size_t size() const { return size_; }

 private:
  void grow() {
    std::vector<Entry> old = std::move(entries_);
    entries_.assign(old.size() * 2, Entry{0, ~0ull, 0, 0});
    const size_t mask = entries_.size() - 1;
    for (const Entry& e : old) {
      if (e.offset == ~0ull) continue;
      size_t slot = e.hash & mask;
      while (entries_[slot].offset != ~0ull) slot = (slot + 1) & mask;
      entries_[slot] = e;
    }
  }
  std::vector<Entry> entries_;
  std::string arena_;
  size_t size_ = 0;
};

struct HeapEntry {
  int64_t count;
  uint64_t pair;
};
// std heap functions build a max-heap of this order: the top is the highest count, then the
// smallest pair key.
inline bool heap_less(const HeapEntry& x, const HeapEntry& y) {
  return x.count < y.count || (x.count == y.count && x.pair > y.pair);
}

struct PairInfo {
  int64_t count = 0;
  std::vector<uint32_t> words;  // may hold words that no longer have the pair (checked on use)
};

}  // namespace

struct TrainerState {
  PieceCounter counter;
  bool merging = false;
  // Words: symbols in one array; word w is syms[word_offset[w] .. + word_length[w]).
  std::vector<uint32_t> syms;
  std::vector<uint64_t> word_offset;
  std::vector<uint32_t> word_length;
  std::vector<int64_t> word_count;
  PairMap pair_index{1 << 16};
  std::vector<PairInfo> pairs;
  std::vector<HeapEntry> heap;
  std::vector<std::string> token_bytes;
  std::unordered_map<std::string, uint32_t> token_ids;
  std::vector<uint64_t> touched;

  uint32_t pair_slot(uint64_t key) {
    uint32_t& slot = pair_index.at_or_insert(key);
    if (slot == PairMap::kMissing) {
      slot = uint32_t(pairs.size());
      pairs.emplace_back();
    }
    return slot;
  }
  void add_pair(uint32_t left, uint32_t right, int64_t count, uint32_t word, bool track = true) {
    const uint64_t key = pair_key(left, right);
    PairInfo& info = pairs[pair_slot(key)];
    info.count += count;
    if (info.words.empty() || info.words.back() != word) info.words.push_back(word);
    if (track) touched.push_back(key);
  }
  void remove_pair(uint32_t left, uint32_t right, int64_t count) {
    const uint32_t slot = pair_index.get(pair_key(left, right));
    if (slot != PairMap::kMissing) pairs[slot].count -= count;
  }
  void push(int64_t count, uint64_t key) {
    heap.push_back(HeapEntry{count, key});
    std::push_heap(heap.begin(), heap.end(), heap_less);
  }

  void start() {
    for (int b = 0; b < 256; ++b) {
      token_bytes.emplace_back(1, char(b));
      token_ids.emplace(token_bytes.back(), uint32_t(b));
    }
    word_offset.reserve(counter.size());
    for (const auto& e : counter.entries()) {
      if (e.offset == ~0ull) continue;
      const uint8_t* p = counter.bytes(e);
      word_offset.push_back(syms.size());
      word_length.push_back(e.length);
      word_count.push_back(e.count);
      syms.insert(syms.end(), p, p + e.length);
    }
    counter = PieceCounter();
    for (uint32_t w = 0; w < word_offset.size(); ++w) {
      const uint32_t* s = syms.data() + word_offset[w];
      for (uint32_t i = 0; i + 1 < word_length[w]; ++i) add_pair(s[i], s[i + 1], word_count[w], w, false);
    }
    heap.reserve(pairs.size());
    // Rebuild the keys from the index (the index is the only key -> slot record).
    std::vector<uint64_t> keys(pairs.size());
    pair_index.for_each([&](uint64_t key, uint32_t slot) { keys[slot] = key; });
    for (uint32_t slot = 0; slot < pairs.size(); ++slot) {
      if (pairs[slot].count > 0) heap.push_back(HeapEntry{pairs[slot].count, keys[slot]});
    }
    std::make_heap(heap.begin(), heap.end(), heap_less);
    merging = true;
  }

  // Rewrites word w with (a, b) -> t; returns silently when the word no longer has the pair.
  void merge_word(uint32_t w, uint32_t a, uint32_t b, uint32_t t) {
    uint32_t* s = syms.data() + word_offset[w];
    const uint32_t n = word_length[w];
    const int64_t c = word_count[w];
    uint32_t out = 0;
    bool prev_merged = false;
    for (uint32_t i = 0; i < n;) {
      if (i + 1 < n && s[i] == a && s[i + 1] == b) {
        // s[out - 1] still is the old s[i - 1] unless it is a token merged in this pass.
        if (out > 0 && !prev_merged) remove_pair(s[out - 1], a, c);
        if (i + 2 < n) remove_pair(b, s[i + 2], c);
        if (out > 0) add_pair(s[out - 1], t, c, w);
        s[out++] = t;
        i += 2;
        prev_merged = true;
      } else {
        if (prev_merged) add_pair(t, s[i], c, w);
        s[out++] = s[i++];
        prev_merged = false;
      }
    }
    word_length[w] = out;
  }

  // Returns false when no pair is left.
  bool merge_once(std::vector<uint32_t>& new_tokens) {
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), heap_less);
      const HeapEntry top = heap.back();
      heap.pop_back();
      const uint32_t slot = pair_index.get(top.pair);
      const int64_t count = pairs[slot].count;
      if (count != top.count) {
        if (count > 0) push(count, top.pair);
        continue;
      }
      if (count <= 0) continue;
      const uint32_t a = uint32_t(top.pair >> 32), b = uint32_t(top.pair);
      std::string merged = token_bytes[a] + token_bytes[b];
      uint32_t t;
      bool fresh = false;
      const auto it = token_ids.find(merged);
      if (it != token_ids.end()) {
        t = it->second;
      } else {
        t = uint32_t(token_bytes.size());
        token_ids.emplace(merged, t);
        token_bytes.push_back(std::move(merged));
        fresh = true;
      }
      std::vector<uint32_t> words = std::move(pairs[slot].words);
      pairs[slot].words = {};
      touched.clear();
      for (const uint32_t w : words) merge_word(w, a, b, t);
      pairs[slot].count = 0;
      std::sort(touched.begin(), touched.end());
      touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
      for (const uint64_t key : touched) {
        const int64_t c = pairs[pair_index.get(key)].count;
        if (c > 0) push(c, key);
      }
      if (fresh) {
        new_tokens.push_back(a);
        new_tokens.push_back(b);
      }
      return true;
    }
    return false;
  }
};

Trainer::Trainer(int pattern) : pattern_(pattern_from_code(pattern)), state_(std::make_unique<TrainerState>()) {}
Trainer::~Trainer() = default;

void Trainer::count_texts(const std::vector<std::string_view>& texts, int num_threads) {
  PYLLM_CHECK(pattern_ != Pattern::kCustom, "bpe: a custom pattern is split in Python; use count_pieces");
  PYLLM_CHECK(!state_->merging, "bpe: count_texts after merging started");
  // Work items: (text, begin, end), long texts cut at the (built-in) pattern's safe boundaries.
  struct Item {
    size_t text, begin, end;
  };
  std::vector<Item> items;
  std::vector<size_t> ends;
  for (size_t t = 0; t < texts.size(); ++t) {
    ends.clear();
    cut_at_safe_boundaries(pattern_, texts[t], kWorkItemBytes, ends);
    size_t begin = 0;
    for (const size_t end : ends) {
      items.push_back({t, begin, end});
      begin = end;
    }
  }
  const size_t threads = worker_count(items.size(), num_threads);
  std::vector<PieceCounter> local(threads);
  std::vector<std::vector<uint32_t>> piece_ends(threads);
  parallel_items(items.size(), threads, [&](size_t w, size_t k) {
    const Item& item = items[k];
    const auto* p = reinterpret_cast<const uint8_t*>(texts[item.text].data()) + item.begin;
    piece_ends[w].clear();
    pretokenize(pattern_, p, item.end - item.begin, piece_ends[w]);
    size_t start = 0;
    for (const uint32_t end : piece_ends[w]) {
      local[w].add(p + start, end - start, 1);
      start = end;
    }
  });
  for (const auto& counter : local) state_->counter.add_all(counter);
}

void Trainer::count_pieces(const std::vector<std::string_view>& pieces, const std::vector<int64_t>& counts) {
  PYLLM_CHECK(!state_->merging, "bpe: count_pieces after merging started");
  PYLLM_CHECK(pieces.size() == counts.size(), "bpe: ", pieces.size(), " pieces but ", counts.size(), " counts");
  for (size_t i = 0; i < pieces.size(); ++i) {
    PYLLM_CHECK(counts[i] >= 0, "bpe: negative count ", counts[i]);
    PYLLM_CHECK(pieces[i].size() < (1u << 31), "bpe: piece too long");
    if (pieces[i].empty() || counts[i] == 0) continue;
    state_->counter.add(reinterpret_cast<const uint8_t*>(pieces[i].data()), pieces[i].size(), counts[i]);
  }
}

int64_t Trainer::unique_pieces() const {
  return state_->merging ? int64_t(state_->word_offset.size()) : int64_t(state_->counter.size());
}

std::vector<uint32_t> Trainer::merge(int64_t max_new_tokens) {
  PYLLM_CHECK(max_new_tokens >= 0, "bpe: max_new_tokens must be >= 0, got ", max_new_tokens);
  if (!state_->merging) state_->start();
  std::vector<uint32_t> new_tokens;
  while (int64_t(new_tokens.size() / 2) < max_new_tokens) {
    if (!state_->merge_once(new_tokens)) break;
  }
  return new_tokens;
}

}  // namespace pyllm::bpe
