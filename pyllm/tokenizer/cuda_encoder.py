"""encode_batch(device="cuda"): the CUDA batch encoder of csrc/cuda/bpe.cu (partly verified: on an
H200, 2026-11-30, its ids equalled tiktoken's and compute-sanitizer was clean; see the README's
kernel table).

Pre-tokenization and special tokens run on the host (threads), whole-piece lookup and merging on
the GPU, pieces over 2048 bytes on the host. Same ids as the CPU path.
"""
from __future__ import annotations

import os

from pyllm import _C

# One device call holds the batch's bytes and 4 bytes of scratch per byte on the GPU.
_MAX_CALL_BYTES = 256 << 20
# The kernels address a call's bytes, pieces and tokens with 32-bit offsets (csrc/cuda/bpe.cu
# refuses a call of more bytes). Calls are cut between texts, never inside one, so this bounds a
# single text's UTF-8 size.
_MAX_TEXT_BYTES = (1 << 32) - 2


def _check_text_sizes(texts: list[str]) -> None:
    """ValueError, before anything runs, for a text whose UTF-8 form exceeds _MAX_TEXT_BYTES."""
    for i, text in enumerate(texts):
        if len(text) * 4 <= _MAX_TEXT_BYTES:  # UTF-8 is at most 4 bytes per char: no need to measure
            continue
        # surrogatepass: a lone surrogate takes 3 bytes, as the U+FFFD it is encoded as.
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size > _MAX_TEXT_BYTES:
            raise ValueError(f"encode_batch(device='cuda'): text {i} is {size} bytes of UTF-8; the CUDA encoder takes "
                             f"at most {_MAX_TEXT_BYTES} bytes (4 GiB, 32-bit offsets) per text (the CPU "
                             "encoder's limit is 4 GiB too); split the text")


def _encoder_for(tok, device: int):
    cached = tok._cuda_encoder
    if cached is None or cached[0] != device:
        cached = tok._cuda_encoder = (device, _C.BpeCudaEncoder(tok._enc, device))
    return cached[1]


def encode_batch(tok, texts: list[str], allowed: list[int], disallowed: list[int],
                 num_threads: int | None = None) -> list[list[int]]:
    from pyllm.ops import _util

    if not _util.HAS_CUDA_KERNELS:
        raise RuntimeError("encode_batch(device='cuda'): pyllm was built without CUDA kernels (no nvcc at build time)")
    if not _util.cuda_usable():
        raise RuntimeError("encode_batch(device='cuda'): no usable GPU")
    if tok._regex is not None:
        raise ValueError("encode_batch(device='cuda') needs a built-in pattern (gpt2, gpt4, gpt4o); "
                         f"this tokenizer splits with a custom regex: {tok.pattern!r}")
    _check_text_sizes(texts)
    import torch

    device = torch.cuda.current_device()
    enc = _encoder_for(tok, device)
    stream = torch.cuda.current_stream(device).cuda_stream
    threads = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    out: list[list[int]] = []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) * 4 <= _MAX_CALL_BYTES):
            size += len(texts[end]) * 4  # UTF-8 is at most 4 bytes per char
            end += 1
        chunk = texts[start:end]
        try:
            out += _encode_chunk(enc, chunk, allowed, disallowed, stream, threads)
        except TypeError:
            from pyllm.tokenizer.tokenizer import _fix_surrogates

            out += _encode_chunk(enc, [_fix_surrogates(t) for t in chunk], allowed, disallowed, stream, threads)
        start = end
    return out


def _encode_chunk(enc, chunk, allowed, disallowed, stream, threads):
    """One call of the encoder, its scratch memory (~4 bytes per byte of text, stream-ordered
    cudaMallocAsync, outside torch's caching allocator) retried once after torch hands back its
    cached blocks: in a training process torch may hold most of the GPU free in its cache."""
    import torch

    try:
        return enc.encode_batch(chunk, allowed, disallowed, stream, threads)
    except RuntimeError as e:
        if "out of memory" not in str(e):
            raise
        torch.cuda.empty_cache()
        return enc.encode_batch(chunk, allowed, disallowed, stream, threads)
