"""nanoGPT's character vocabulary (its data/shakespeare_char/prepare.py: meta.pkl's stoi / itos), so
that a run trained on nanoGPT's token files encodes prompts and decodes samples as nanoGPT's
sample.py does. Only what `pyllm generate` / `train` / `eval` ask of a tokenizer."""
from __future__ import annotations

import operator
from pathlib import Path


class CharTokenizer:
    """One id per character, from nanoGPT's meta.pkl; no special tokens, no merges."""

    def __init__(self, stoi: dict[str, int], itos: dict[int, str], vocab_size: int):
        self.stoi, self.itos, self.vocab_size = stoi, itos, vocab_size
        self.special_tokens: dict[str, int] = {}

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        from pyllm.data import TokenFileError, read_nanogpt_meta

        meta = read_nanogpt_meta(path)
        stoi, itos = meta.get("stoi"), meta.get("itos")
        if isinstance(itos, (list, tuple)):  # (a list indexes as nanoGPT's sample.py reads its dict)
            itos = dict(enumerate(itos))
        if not (isinstance(stoi, dict) and isinstance(itos, dict) and all(
                isinstance(c, str) and isinstance(i, int) for c, i in stoi.items())
                and all(isinstance(i, int) and isinstance(c, str) for i, c in itos.items())):
            raise TokenFileError(f"{path}: a vocab_size without a character vocabulary (stoi and itos, dicts of str "
                                 "and int): its data decodes with a pyllm tokenizer of its ids (GPT-2's: "
                                 "Tokenizer.from_tiktoken(tiktoken.get_encoding('gpt2')))")
        if any(not 0 <= i < meta["vocab_size"] for i in stoi.values()):
            raise TokenFileError(f"{path}: stoi has ids outside [0, vocab_size = {meta['vocab_size']})")
        return cls(stoi, itos, meta["vocab_size"])

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this character vocabulary "
                             f"({len(self.stoi)} characters)") from None

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        return self.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=None, **_) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        # An id without a character (a vocabulary padded past itos) is U+FFFD, as the BPE tokenizer's
        # undecodable bytes are, so that sampling from an untrained model never stops with a KeyError;
        # operator.index refuses a float id rather than truncating it to another character's id.
        return "".join(self.itos.get(operator.index(i), "\ufffd") for i in ids)


def is_nanogpt_meta(path) -> bool:
    return Path(path).name.endswith(".pkl")
