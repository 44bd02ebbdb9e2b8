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

size_t split_gpt2(const uint8_t* s, size_t n, size_t i, std::vector<uint32_t>& ends, size_t max_pieces) {
  for (size_t count = 0; i < n && count < max_pieces; ++count) {
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
  return i;
}

inline size_t up_to_3_numbers(const uint8_t* s, size_t n, size_t i) {
  for (int k = 0; k < 3 && i < n; ++k) {
    const Char c = char_at(s, n, i);
    if (!(c.flags & kNumber)) break;
    i += c.len;
  }
  return i;
}

size_t split_cl100k(const uint8_t* s, size_t n, size_t i, std::vector<uint32_t>& ends, size_t max_pieces) {
  for (size_t count = 0; i < n && count < max_pieces; ++count) {
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
  return i;
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

size_t split_o200k(const uint8_t* s, size_t n, size_t i, std::vector<uint32_t>& ends, size_t max_pieces) {
  for (size_t count = 0; i < n && count < max_pieces; ++count) {
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
  return i;
}

}  // namespace

Pattern pattern_from_code(int code) {
  PYLLM_CHECK(code >= -1 && code <= 2, "bpe: unknown pattern code ", code, " (expected -1, 0, 1 or 2)");
  return Pattern(code);
}

size_t pretokenize(Pattern pattern, const uint8_t* text, size_t n, size_t start, std::vector<uint32_t>& ends,
                   size_t max_pieces) {
  PYLLM_CHECK(n < (size_t(1) << 32), "bpe: a single text must be under 4 GiB, got ", n, " bytes");
  switch (pattern) {
    case Pattern::kGpt2: return split_gpt2(text, n, start, ends, max_pieces);
    case Pattern::kCl100k: return split_cl100k(text, n, start, ends, max_pieces);
    case Pattern::kO200k: return split_o200k(text, n, start, ends, max_pieces);
    default: PYLLM_CHECK(false, "bpe: pretokenize needs a built-in pattern");
  }
  return n;
}

void pretokenize(Pattern pattern, const uint8_t* text, size_t n, std::vector<uint32_t>& ends) {
  pretokenize(pattern, text, n, 0, ends, ~size_t(0));
}

std::vector<uint32_t> pretokenize_offsets(int pattern, std::string_view text) {
  std::vector<uint32_t> ends;
  pretokenize(pattern_from_code(pattern), reinterpret_cast<const uint8_t*>(text.data()), text.size(), ends);
  return ends;
}

namespace {

// The length of the Unicode White_Space char from U+0080 up that starts at p (avail bytes there),
// else 0: U+0085, U+00A0 (C2 85, C2 A0), U+1680 (E1 9A 80), U+2000-200A, U+2028/9, U+202F
// (E2 80 80-8A/A8/A9/AF), U+205F (E2 81 9F), U+3000 (E3 80 80). A newline next to one of these is
// part of a longer whitespace run, which a span's end would split differently.
inline size_t unicode_space_len(const uint8_t* p, size_t avail) {
  if (avail >= 2 && p[0] == 0xC2 && (p[1] == 0x85 || p[1] == 0xA0)) return 2;
  if (avail < 3) return 0;
  const bool space = (p[0] == 0xE1 && p[1] == 0x9A && p[2] == 0x80) ||
                     (p[0] == 0xE2 && p[1] == 0x80 &&
                      ((p[2] >= 0x80 && p[2] <= 0x8A) || p[2] == 0xA8 || p[2] == 0xA9 || p[2] == 0xAF)) ||
                     (p[0] == 0xE2 && p[1] == 0x81 && p[2] == 0x9F) || (p[0] == 0xE3 && p[1] == 0x80 && p[2] == 0x80);
  return space ? 3 : 0;
}

// Whether the char that ends at s[e - 1] is not whitespace: visible ASCII, or the last byte of a
// char from U+0080 up (a continuation byte) whose whole sequence is none of the White_Space ones.
// Looks behind only as far as the text's start (the lookbehinds of patterns.SAFE_CUTS).
inline bool ends_non_space(const uint8_t* s, size_t e) {
  if (e == 0) return false;
  const uint8_t b = s[e - 1];
  if (b > 0x20 && b < 0x7F) return true;
  if (b < 0x80 || b > 0xBF) return false;
  return !(e >= 2 && unicode_space_len(s + e - 2, 2) == 2) && !(e >= 3 && unicode_space_len(s + e - 3, 3) == 3);
}

// Whether a cut before s[c] (0 < c < n) is one of patterns.SAFE_CUTS[pattern] (see bpe.h): "\n"
// (or "\r\n" where after_crlf) between a char that is not whitespace and an ASCII letter or a char
// from U+0080 up that is not whitespace. The char before keeps the newline's whitespace run that
// newline alone, so gpt2's \s++$ at the span's end takes the same "\n" as \s in the whole text; no
// piece runs from a newline into the next char, and none looks behind.
inline bool safe_cut_at(const uint8_t* s, size_t n, size_t c, bool after_crlf) {
  if (s[c - 1] != '\n') return false;
  const uint8_t next = s[c];
  const bool letter = (next | 0x20) >= 'a' && (next | 0x20) <= 'z';
  // (a lead byte C2-F4: the whole char is looked at, so a newline before U+3000 is no cut)
  if (!letter && !(next >= 0xC2 && next <= 0xF4 && unicode_space_len(s + c, n - c) == 0)) return false;
  size_t e = c - 1;  // where the char before the newline ends
  // cl100k and o200k take "\r\n" as one piece, in the text and at a span's end alike; gpt2 takes
  // "\r", "\n" apart before a letter but "\r\n" whole at a span's end (\s++$): no cut after "\r".
  if (after_crlf && e > 0 && s[e - 1] == '\r') --e;
  return ends_non_space(s, e);
}

}  // namespace

void cut_at_safe_boundaries(Pattern pattern, std::string_view text, size_t span_bytes, std::vector<size_t>& ends) {
  PYLLM_CHECK(span_bytes > 0, "bpe: span_bytes must be positive");
  // A custom pattern (split in Python) has no proven cut: one span.
  if (pattern == Pattern::kCustom) {
    ends.push_back(text.size());
    return;
  }
  const bool after_crlf = pattern != Pattern::kGpt2;
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t begin = 0;
  while (n - begin > span_bytes) {
    // The first safe cut at or after begin + span_bytes: the newlines from there on (memchr), each
    // byte looked at once per span and a few around each newline, so linear in the text.
    size_t cut = n;
    for (size_t from = begin + span_bytes - 1; from < n;) {
      const void* nl = std::memchr(s + from, '\n', n - from);
      if (nl == nullptr) break;
      const size_t c = size_t(static_cast<const uint8_t*>(nl) - s) + 1;
      if (c < n && safe_cut_at(s, n, c, after_crlf)) {
        cut = c;
        break;
      }
      from = c;
    }
    if (cut >= n) break;
    ends.push_back(cut);
    begin = cut;
  }
  ends.push_back(n);
}

std::vector<size_t> safe_cut_offsets(int pattern, std::string_view text, size_t span_bytes) {
  std::vector<size_t> ends;
  cut_at_safe_boundaries(pattern_from_code(pattern), text, span_bytes, ends);
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
