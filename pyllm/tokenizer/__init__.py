"""Byte-level BPE tokenizer: training, encoding and decoding in C++, tiktoken-compatible.

    from pyllm.tokenizer import Tokenizer
    tok = Tokenizer.train(texts, vocab_size=32768, pattern="gpt4", special_tokens=("<|endoftext|>",))
    ids = tok.encode("hello world")
    tok.save("tok.bpe"); tok = Tokenizer.load("tok.bpe")
"""
from pyllm.tokenizer.patterns import PATTERNS
from pyllm.tokenizer.tokenizer import InvalidTokenError, Tokenizer, TokenIdOverflowError

__all__ = ["Tokenizer", "PATTERNS", "InvalidTokenError", "TokenIdOverflowError"]
