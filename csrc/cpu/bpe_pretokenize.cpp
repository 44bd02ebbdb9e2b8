// BPE pre-tokenizers: hand-written matchers for the built-in split patterns, no regex engine.
//
// Each splitter walks the text once, trying the pattern's alternatives in order at the current
// position exactly as a backtracking regex engine would (leftmost alternative that matches wins,
// greedy quantifiers give back one char at a time), so the pieces equal `regex.findall(pattern)`
// piece for piece. Every char falls into some alternative, so the pieces tile the text.
//
//   gpt2   (r50k): '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
//   gpt4  (cl100k): '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+
//                   | ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
//   gpt4o (o200k): [^\r\n\p{L}\p{N}]?[UP]*[LO]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//                  |[^\r\n\p{L}\p{N}]?[UP]+[LO]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//                  |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   with UP = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}], LO = [\p{Ll}\p{Lm}\p{Lo}\p{M}].
//
// Char classes come from the generated two-level table (bpe_unicode_tables.h); ASCII is one load.
// \s is Unicode White_Space (as in Rust's regex, which tiktoken uses, and Python's `regex`).
// (?i) matches ASCII case pairs and U+017F (long s) for 's', as both engines' case folding does.
// Cost: each byte is classified about twice (the run scan and, at run ends, the lookahead).
#include <cstring>

#include "bpe.h"
#include "bpe_unicode_tables.h"
#include "common/checks.h"

namespace pyllm::bpe {
namespace {

struct Char {
  uint32_t flags;
  uint32_t len;  // bytes
};

inline uint32_t flags_of(uint32_t cp) {
  return tables::kStage2[size_t(tables::kStage1[cp >> 8]) * 256 + (cp & 255)];
}

inline bool is_cont(uint8_t b) { return (b & 0xC0) == 0x80; }

// Decodes the char at s[i] (i < n). Malformed UTF-8: one byte of class "other".
inline Char char_at(const uint8_t* s, size_t n, size_t i) {
  const uint8_t c = s[i];
  if (c < 0x80) return {tables::kStage2[c], 1};
  if ((c & 0xE0) == 0xC0 && c >= 0xC2 && i + 1 < n && is_cont(s[i + 1])) {
    return {flags_of(((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu)), 2};
  }
  if ((c & 0xF0) == 0xE0 && i + 2 < n && is_cont(s[i + 1]) && is_cont(s[i + 2])) {
    const uint32_t cp = ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
    if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) return {flags_of(cp), 3};
  } else if ((c & 0xF8) == 0xF0 && i + 3 < n && is_cont(s[i + 1]) && is_cont(s[i + 2]) && is_cont(s[i + 3])) {
    const uint32_t cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) |
                        (s[i + 3] & 0x3Fu);
    if (cp >= 0x10000 && cp <= 0x10FFFF) return {flags_of(cp), 4};
  }
  return {0, 1};
}

constexpr uint32_t kLNS = kLetter | kNumber | kSpace;
inline bool is_other(uint32_t f) { return (f & kLNS) == 0; }

// End of the run of chars (from i) whose flags intersect `mask`.
inline size_t run_any(const uint8_t* s, size_t n, size_t i, uint32_t mask) {
  while (i < n) {
    const Char c = char_at(s, n, i);
    if (!(c.flags & mask)) break;
    i += c.len;
  }
  return i;
}

inline size_t run_other(const uint8_t* s, size_t n, size_t i) {
  while (i < n) {
    const Char c = char_at(s, n, i);
    if (!is_other(c.flags)) break;
    i += c.len;
  }
  return i;
}

inline size_t run_bytes(const uint8_t* s, size_t n, size_t i, const char* set) {
  while (i < n && std::strchr(set, s[i]) != nullptr && s[i] != 0) ++i;
  return i;
}

inline uint8_t ascii_lower(uint8_t c) { return (c >= 'A' && c <= 'Z') ? uint8_t(c + 32) : c; }

// Length in bytes of a contraction ('s 't 'd 'm 'll 've 're) starting with the apostrophe at s[i],
// or 0. case_insensitive: also upper case and U+017F (long s, "\xC5\xBF") for s.
inline size_t contraction(const uint8_t* s, size_t n, size_t i, bool case_insensitive) {
  if (i >= n || s[i] != '\'' || i + 1 >= n) return 0;
  const uint8_t c1 = case_insensitive ? ascii_lower(s[i + 1]) : s[i + 1];
  if (c1 == 's' || c1 == 'd' || c1 == 'm' || c1 == 't') return 2;
  if (case_insensitive && s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) return 3;
  if (i + 2 >= n) return 0;
  const uint8_t c2 = case_insensitive ? ascii_lower(s[i + 2]) : s[i + 2];
  if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e')) return 3;
  return 0;
}

// The whitespace run from i: its end, the start of its last char, and the end of its last \r or \n
// (0 when it has none).
struct SpaceRun {
  size_t end, last_start, last_newline_end;
};
inline SpaceRun space_run(const uint8_t* s, size_t n, size_t i) {
  SpaceRun r{i, i, 0};
  while (r.end < n) {
    const Char c = char_at(s, n, r.end);
    if (!(c.flags & kSpace)) break;
    if (s[r.end] == '\n' || s[r.end] == '\r') r.last_newline_end = r.end + 1;
    r.last_start = r.end;
    r.end += c.len;
  }
  return r;
}

void split_gpt2(const uint8_t* s, size_t n, std::vector<uint32_t>& ends) {
  size_t i = 0;
  while (i < n) {
    const Char c = char_at(s, n, i);
    size_t end;
    const bool space_then = s[i] == ' ' && i + 1 < n;
    const uint32_t next_flags = space_then ? char_at(s, n, i + 1).flags : 0;
    if (size_t k = contraction(s, n, i, false)) {
      end = i + k;
    } else if (c.flags & kLetter) {
      end = run_any(s, n, i, kLetter);
    } else if (space_then && (next_flags & kLetter)) {
      end = run_any(s, n, i + 1, kLetter);
    } else if (c.flags & kNumber) {
      end = run_any(s, n, i, kNumber);
    } else if (space_then && (next_flags & kNumber)) {
      end = run_any(s, n, i + 1, kNumber);
    } else if (is_other(c.flags)) {
      end = run_other(s, n, i);
    } else if (space_then && is_other(next_flags)) {
      end = run_other(s, n, i + 1);
    } else {  // whitespace: \s++$ | \s+(?!\S) | \s
      const SpaceRun r = space_run(s, n, i);
      end = r.end == n ? n : (r.last_start > i ? r.last_start : i + c.len);
    }
    ends.push_back(uint32_t(end));
    i = end;
  }
}

inline size_t up_to_3_numbers(const uint8_t* s, size_t n, size_t i) {
  for (int k = 0; k < 3 && i < n; ++k) {
    const Char c = char_at(s, n, i);
    if (!(c.flags & kNumber)) break;
    i += c.len;
  }
  return i;
}

void split_cl100k(const uint8_t* s, size_t n, std::vector<uint32_t>& ends) {
  size_t i = 0;
  while (i < n) {
    const Char c = char_at(s, n, i);
    size_t end;
    if (size_t k = contraction(s, n, i, true)) {
      end = i + k;
    } else if (c.flags & kLetter) {
      end = run_any(s, n, i + c.len, kLetter);
    } else if (!(c.flags & kNumber) && s[i] != '\r' && s[i] != '\n' && i + c.len < n &&
               (char_at(s, n, i + c.len).flags & kLetter)) {
      end = run_any(s, n, i + c.len, kLetter);
    } else if (c.flags & kNumber) {
      end = up_to_3_numbers(s, n, i);
    } else if (is_other(c.flags)) {
      end = run_bytes(s, n, run_other(s, n, i), "\r\n");
    } else if (s[i] == ' ' && i + 1 < n && is_other(char_at(s, n, i + 1).flags)) {
      end = run_bytes(s, n, run_other(s, n, i + 1), "\r\n");
    } else {  // whitespace: \s++$ | \s*[\r\n] | \s+(?!\S) | \s
      const SpaceRun r = space_run(s, n, i);
      if (r.end == n) end = n;
      else if (r.last_newline_end) end = r.last_newline_end;
      else end = r.last_start > i ? r.last_start : i + c.len;
    }
    ends.push_back(uint32_t(end));
    i = end;
  }
}

// o200k's first alternative from `start` (after the optional prefix): [UP]*[LO]+ then a contraction.
// Returns the end, or 0 when it does not match.
inline size_t o200k_lower_word(const uint8_t* s, size_t n, size_t start) {
  if (start >= n) return 0;
  const size_t up_end = run_any(s, n, start, kUpperish);
  size_t end = 0;
  if (up_end < n && (char_at(s, n, up_end).flags & kLowerish)) {
    end = run_any(s, n, up_end, kLowerish);
  } else {
    // [UP]* gives back chars until [LO]+ can start: the last char of the run that is also LO
    // (Lm, Lo, M); [LO]+ then takes just that char, as the next one is not LO.
    for (size_t j = start; j < up_end;) {
      const Char c = char_at(s, n, j);
      j += c.len;
      if (c.flags & kLowerish) end = j;
    }
    if (!end) return 0;
  }
  return end + contraction(s, n, end, true);
}

// o200k's second alternative from `start`: [UP]+[LO]* then a contraction; 0 when no match.
inline size_t o200k_upper_word(const uint8_t* s, size_t n, size_t start) {
  if (start >= n || !(char_at(s, n, start).flags & kUpperish)) return 0;
  const size_t end = run_any(s, n, run_any(s, n, start, kUpperish), kLowerish);
  return end + contraction(s, n, end, true);
}

void split_o200k(const uint8_t* s, size_t n, std::vector<uint32_t>& ends) {
  size_t i = 0;
  while (i < n) {
    const Char c = char_at(s, n, i);
    const bool prefix_ok = !(c.flags & (kLetter | kNumber)) && s[i] != '\r' && s[i] != '\n' && i + c.len < n;
    size_t end = 0;
    if (prefix_ok) end = o200k_lower_word(s, n, i + c.len);
    if (!end) end = o200k_lower_word(s, n, i);
    if (!end && prefix_ok) end = o200k_upper_word(s, n, i + c.len);
    if (!end) end = o200k_upper_word(s, n, i);
    if (!end && (c.flags & kNumber)) end = up_to_3_numbers(s, n, i);
    if (!end) {
      if (s[i] == ' ' && i + 1 < n && is_other(char_at(s, n, i + 1).flags)) {
        end = run_bytes(s, n, run_other(s, n, i + 1), "\r\n/");
      } else if (is_other(c.flags)) {
        end = run_bytes(s, n, run_other(s, n, i), "\r\n/");
      }
    }
    if (!end) {  // whitespace: \s*[\r\n]+ | \s+(?!\S) | \s+
      const SpaceRun r = space_run(s, n, i);
      if (r.last_newline_end) end = r.last_newline_end;
      else if (r.end == n) end = n;
      else end = r.last_start > i ? r.last_start : r.end;
    }
    ends.push_back(uint32_t(end));
    i = end;
  }
}

}  // namespace

Pattern pattern_from_code(int code) {
  PYLLM_CHECK(code >= -1 && code <= 2, "bpe: unknown pattern code ", code, " (expected -1, 0, 1 or 2)");
  return Pattern(code);
}

void pretokenize(Pattern pattern, const uint8_t* text, size_t n, std::vector<uint32_t>& ends) {
  PYLLM_CHECK(n < (size_t(1) << 32), "bpe: a single text must be under 4 GiB, got ", n, " bytes");
  switch (pattern) {
    case Pattern::kGpt2: split_gpt2(text, n, ends); break;
    case Pattern::kCl100k: split_cl100k(text, n, ends); break;
    case Pattern::kO200k: split_o200k(text, n, ends); break;
    default: PYLLM_CHECK(false, "bpe: pretokenize needs a built-in pattern");
  }
}

std::vector<uint32_t> pretokenize_offsets(int pattern, std::string_view text) {
  std::vector<uint32_t> ends;
  pretokenize(pattern_from_code(pattern), reinterpret_cast<const uint8_t*>(text.data()), text.size(), ends);
  return ends;
}

uint64_t hash_bytes(const uint8_t* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xC2B2AE3D27D4EB4Full);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 32;
    p += 8;
    n -= 8;
  }
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  h = (h ^ v) * 0xC4CEB9FE1A85EC53ull;
  return h ^ (h >> 29);
}

void PairMap::reserve(size_t expected) {
  size_t cap = 16;
  while (cap < expected * 2) cap <<= 1;
  if (cap <= keys_.size()) return;
  std::vector<uint64_t> old_keys = std::move(keys_);
  std::vector<uint32_t> old_values = std::move(values_);
  keys_.assign(cap, kEmptyKey);
  values_.assign(cap, kMissing);
  mask_ = cap - 1;
  size_ = 0;
  for (size_t i = 0; i < old_keys.size(); ++i) {
    if (old_keys[i] != kEmptyKey) at_or_insert(old_keys[i]) = old_values[i];
  }
}

void PairMap::grow() { reserve(keys_.size()); }

uint32_t& PairMap::at_or_insert(uint64_t key) {
  PYLLM_CHECK(key != kEmptyKey, "bpe: reserved pair key");
  if ((size_ + 1) * 2 > keys_.size()) grow();
  size_t slot = mix(key) & mask_;
  while (true) {
    if (keys_[slot] == key) return values_[slot];
    if (keys_[slot] == kEmptyKey) {
      keys_[slot] = key;
      ++size_;
      return values_[slot];
    }
    slot = (slot + 1) & mask_;
  }
}

}  // namespace pyllm::bpe
