"""The built-in split patterns (tiktoken's), each with a hand-written C++ pre-tokenizer."""
import re

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
    """regex with each "^" / "$" outside a character class written start / end, escapes and classes
    kept. Oniguruma (Hugging Face's engine, Ruby's syntax) reads a bare "^" / "$" as a line's start /
    end, Rust's regex crate (tiktoken's, the syntax pyllm's patterns are in) as the text's; a
    pattern with an inline m flag is left alone (Ruby's m is Rust's s)."""
    if re.search(r"\(\?[a-zA-Z]*m", regex):
        return regex
    return "".join({"^": start, "$": end}.get(piece, piece) if not depth else piece
                   for piece, depth, _ in regex_pieces(regex))


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
