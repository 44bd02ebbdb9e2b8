"""The built-in split patterns (tiktoken's), each with a hand-written C++ pre-tokenizer."""
import os
import re
from pathlib import Path
from typing import Iterator

GPT2 = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

GPT4 = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]"""
    r"""|\s+(?!\S)|\s"""
)

GPT4O = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# name -> (regex string, code of the C++ pre-tokenizer)
PATTERNS = {"gpt2": (GPT2, 0), "gpt4": (GPT4, 1), "gpt4o": (GPT4O, 2)}


# Where a long text is cut into parts that a built-in split pattern splits into the pieces of the
# whole (so the same ids): a character that is not whitespace, "\n", a letter or a character from
# U+0080 up that is not whitespace. No piece runs on past such a newline (only whitespace runs and
# o200k's "/" after punctuation take a character after one, and neither starts the next part), and
# the newline is a piece's end either way (GPT-2's "\s++$" at a part's end takes the "\n" alone, as
# "\s" does before the next character). For cl100k's and o200k's also after "\r\n", which they
# take as one piece anyway (GPT-2's "\s++$" would take it whole at a part's end and "\r", "\n"
# within the text), so that a file of CRLF lines (Project Gutenberg's) is cut too. (The hypothesis
# test in tests/test_data.py checks each against the regex.) The C++ encoder and trainer cut their
# long texts at the same cuts (cut_at_safe_boundaries, csrc/cpu/bpe_pretokenize.cpp; tests/test_bpe.py
# checks that they agree); it had taken ASCII on both sides only, which left text in other scripts
# (a Chinese corpus: "。\n" before its next line) and CRLF lines in one part.
# White_Space from U+0080 up, as UTF-8: U+0085, U+00A0, U+1680, U+2000-200A, U+2028/9, U+202F, U+205F, U+3000
_WHITESPACE_UTF8 = [rb"\xc2\x85", rb"\xc2\xa0", rb"\xe1\x9a\x80", rb"\xe2\x80[\x80-\x8a\xa8\xa9\xaf]", rb"\xe2\x81\x9f",
                    rb"\xe3\x80\x80"]


def _cut_after(newline: bytes) -> bytes:
    """A cut after newline, with a character before it that is not whitespace."""
    after_ws = b"".join(rb"(?<!" + w + newline + rb")" for w in _WHITESPACE_UTF8)
    return rb"(?:(?<=[\x21-\x7e]" + newline + rb")|(?<=[\x80-\xbf]" + newline + rb")" + after_ws + rb")"


_NEXT = rb"(?=[A-Za-z\xc2-\xf4])(?!" + b"|".join(_WHITESPACE_UTF8) + rb")"
SAFE_CUTS = {"gpt2": re.compile(_cut_after(rb"\n") + _NEXT)}
SAFE_CUTS["gpt4"] = SAFE_CUTS["gpt4o"] = re.compile(
    rb"(?:" + _cut_after(rb"\n") + b"|" + _cut_after(rb"\r\n") + rb")" + _NEXT)


def file_parts(path: Path, part_bytes: int, pattern: str) -> Iterator[tuple[bytes, bool]]:
    """A file's bytes in parts of about part_bytes, each but the last ending at a cut of the
    built-in pattern's SAFE_CUTS (longer where none comes sooner: a file without one is a single
    part), with whether it is the last; at least one part. (What follows a cut starts with the
    character after it: the last part is never empty.)"""
    safe_cut = SAFE_CUTS[pattern]
    with open(path, "rb") as f:
        # Read, not yet handed over; no cut in it before `searched`. A cut is taken only with 3 bytes
        # after it read (its lookahead, that the next character is no white space, sees all of it: a
        # block ending inside a U+3000 after a newline had been cut there)
        rest, searched = bytearray(), 1
        while more := f.read(part_bytes):
            rest += more  # (amortized: a file without a cut is not copied, nor searched, again per read)
            del more
            cut, start, end = None, len(rest), len(rest) - 3
            while cut is None and start > searched:  # the last cut: looked for in ever longer tails of
                # what was not searched yet (the lookbehind reads the bytes before start)
                start = max(searched, start - (len(rest) - start) * 7 - (1 << 12))
                for match in safe_cut.finditer(rest, start):
                    if match.start() <= end:
                        cut = match.start()
                match = None  # (a match holds what it searched)
            searched = max(1, end)
            if cut is None:
                continue
            part = [bytes(memoryview(rest)[:cut])]  # (one copy; a slice of the bytearray would be two)
            del rest[:cut]
            searched = max(1, searched - cut)
            yield part.pop(), False
        last = [bytes(rest)]
        del rest
        yield last.pop(), True


def text_parts(path, part_bytes: int | None, pattern: str, not_utf8: dict) -> Iterator[tuple[str, bool]]:
    """A file's text (UTF-8, other bytes read as U+FFFD), whole, or in file_parts where it is larger
    than part_bytes (not None), with whether each is the last (data.prepare's and Tokenizer.train's
    reading of a file). A file not UTF-8 gets not_utf8[path] = (its first such byte's offset, that
    byte, how many bytes were read as U+FFFD), set before its last part is given."""
    if part_bytes is None or os.path.getsize(path) <= part_bytes:
        raw_parts = ((Path(path).read_bytes(), True) for _ in range(1))  # (no list holding the bytes while
    else:  # their text is tokenized)
        raw_parts = file_parts(path, part_bytes, pattern)
    offset, bad, replaced = 0, None, 0
    for raw, last in raw_parts:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # (parts end after a newline: no character is cut)
            text = raw.decode("utf-8", errors="replace")
            # the bytes replaced (a U+FFFD stands for 1-3 of them; one in the file itself is UTF-8)
            replaced += len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))
            bad = bad or (offset + e.start, raw[e.start:e.start + 1])
        offset += len(raw)
        del raw  # (the bytes beside their text while it is tokenized: twice a large file's size)
        if last and bad:
            not_utf8[path] = (*bad, replaced)
        yield text, last


def hf_spelling(regex: str) -> str:
    """A regex as Tokenizer.to_hf writes it: Oniguruma (Hugging Face's regex engine) reads "{1,3}+"
    as "({1,3})+", not as possessive. In the built-ins nothing follows "{1,3}+" inside its
    alternative, so the greedy "{1,3}" left in its place matches the same digits."""
    return regex.replace("{1,3}+", "{1,3}")


def regex_pieces(regex: str):
    """(piece, class depth, index) for each piece of a regex: an escape ("\\$"), a class's opening
    ("[" with a first "^" and a first "]", the class's own), or one character; depth 0 outside any
    class (nested classes, [a&&[^b]], as Rust reads them; a class's closing "]" at its own depth)."""
    depth, i = 0, 0
    while i < len(regex):
        if regex[i] == "\\":
            yield regex[i:i + 2], depth, i
            i += 2
            continue
        if regex[i] == "[":
            j = i + 1
            for lead in ("^", "]"):  # a negation, then a ']' first in a class, are the class's
                if regex.startswith(lead, j):
                    j += 1
            depth += 1
            yield regex[i:j], depth, i
            i = j
            continue
        yield regex[i], depth, i
        if depth and regex[i] == "]":
            depth -= 1
        i += 1


def respell_anchors(regex: str, start: str, end: str) -> str:
    """regex with each "^" / "$" outside a character class written start / end where no inline m
    flag is on, escapes and classes kept. Oniguruma (Hugging Face's engine, Ruby's syntax) reads a
    bare "^" / "$" as a line's start / end, Rust's regex crate (tiktoken's, the syntax pyllm's
    patterns are in) as the text's, unless an m flag makes them a line's: those are left as they are
    (Ruby's m is Rust's s, and Ruby's anchors are a line's anyway). The m flag is followed through
    the groups: "(?m:^)" scopes it to its group, "(?m)" holds to the end of the group it is in (a
    scoped "(?m:" anywhere had left every anchor of the pattern bare)."""
    out, multiline = [], [False]  # the m flag in each open group, the innermost last
    for piece, depth, i in regex_pieces(regex):
        if depth:
            out.append(piece)
            continue
        if piece == "(":
            flags = re.match(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])", regex[i:])
            now = multiline[-1]
            if flags and "m" in flags[1] + (flags[2] or ""):
                now = "m" in flags[1] and "m" not in (flags[2] or "")
            if flags and flags[3] == ")":  # (?m): on to the end of the enclosing group
                multiline[-1] = now
            multiline.append(now)  # (for "(?m)", what its own ")" takes off)
        elif piece == ")" and len(multiline) > 1:
            multiline.pop()
        elif piece in ("^", "$") and not multiline[-1]:
            piece = start if piece == "^" else end
        out.append(piece)
    return "".join(out)


# The POSIX classes ([[:alpha:]], inside a class) as sets: Rust's regex crate's (tiktoken's, the
# syntax pyllm's patterns are in) are ASCII; Python's `regex` module's and Oniguruma's (Hugging
# Face's) are Unicode ("ı" was a letter to one and not the other), Oniguruma's as its doc/RE
# defines them for Unicode text, written in Rust's syntax; print and graph have no such spelling.
RUST_POSIX = {"alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": r"\x00-\x7F", "blank": r"\t ",
              "cntrl": r"\x00-\x1F\x7F", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
              "punct": r"!-/:-@\[-`{-~", "space": r"\t\n\x0B\f\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
              "xdigit": "0-9A-Fa-f"}
ONIGURUMA_POSIX = {"alnum": r"\p{Alphabetic}\p{Nd}", "alpha": r"\p{Alphabetic}", "ascii": r"\x00-\x7F",
                   "blank": r"\p{Zs}\t", "cntrl": r"\p{Cc}\p{Cf}\p{Cn}\p{Co}\p{Cs}", "digit": r"\p{Nd}",
                   "lower": r"\p{Lowercase}", "punct": r"\p{P}", "space": r"\p{White_Space}",
                   "upper": r"\p{Uppercase}", "word": r"\p{L}\p{M}\p{Nd}\p{Pc}", "xdigit": "0-9A-Fa-f"}
_POSIX_RE = re.compile(r"\[:(\^?)([a-z]+):\]")


def respell_posix(regex: str, sets: dict) -> tuple[str, bool]:
    """regex with each POSIX class inside a class written as its set in sets (a negated one as a
    nested negated class, which Python's `regex` reads in its version 1 only), and whether one was
    negated. NotImplementedError for a POSIX class sets has no spelling of."""
    out, negated, skip_to = [], False, 0
    for piece, depth, i in regex_pieces(regex):
        if i < skip_to:
            continue
        posix = _POSIX_RE.match(regex, i) if piece == "[" and depth >= 2 else None
        if posix and posix[2] in RUST_POSIX:
            if posix[2] not in sets:
                raise NotImplementedError(f"the POSIX class [:{posix[2]}:] of {regex!r} has no spelling here")
            out.append(f"[^{sets[posix[2]]}]" if posix[1] else sets[posix[2]])
            negated |= bool(posix[1])
            skip_to = posix.end()
            continue
        out.append(piece)
    return "".join(out), negated


# Hugging Face's ByteLevel regex (GPT-2's release): the same pieces as GPT2 on every text. Its
# quantifiers end their alternatives, so possessive and greedy take the same; a whitespace run
# reaching the end of the text is one piece under "\s++$" and under "\s+(?!\S)" alike; one not
# reaching it ends in a lookahead match one character short (both), or is a single character
# before a non-space, which "\s" and "\s+" both take alone.
HF_BYTE_LEVEL = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Other spellings of the built-ins that split every text into the same pieces -> name, so that a
# tokenizer read back from Hugging Face (from_hf(to_hf(...))) keeps the C++ pre-tokenizer instead
# of the regex path, which is about 12x slower. Llama 3's (and Hugging Face's GPT-4) Split regex is
# not cl100k's: "\s*[\r\n]+" without "\s++$" splits "a\n  " into "a", "\n", "  ", cl100k into
# "a", "\n  ", so it stays a custom pattern.
SPELLINGS = {**{hf_spelling(regex): name for name, (regex, _) in PATTERNS.items()}, HF_BYTE_LEVEL: "gpt2"}
