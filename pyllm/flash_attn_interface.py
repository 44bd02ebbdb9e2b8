"""flash-attn 2's function names and arguments over pyllm's kernels, for code written against
`flash_attn.flash_attn_interface`: change the import, keep the calls.

    from pyllm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same layouts, same bottom-right causal alignment, same window semantics, same LSE shapes
((batch, n_heads, seqlen_q); (n_heads, total_q) for varlen); softcap and alibi_slopes on the CPU
kernels (with ALiBi, flash-attn's causal kernels return an LSE shifted by slope * (i + seqlen_k -
seqlen_q), pyllm's the bias as documented; the outputs agree). The kv-cache call takes all of
flash-attn's options: rotary embedding inside the call (any device), cache_batch_idx, cache_leftpad
and paged caches (block_table, any page size; CPU kernels), return_softmax_lse. Options pyllm has no
kernel for (dropout, softcap and ALiBi on CUDA, the cache options on CUDA, a block_table in the
varlen call) raise NotImplementedError naming the option instead of being ignored: silently dropping
one would give a different model. `return_attn_probs=True` returns (out, softmax_lse, None): flash-attn's
third value only carries a dropout pattern for its own tests. `num_splits` is a tuning hint and is
ignored (pyllm picks the split-KV count itself). Unlike flash-attn, CPU tensors work too (fp32,
bf16, fp64).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from pyllm.ops.flash_attn import flash_attn, flash_attn_with_kvcache as _kvcache


def _unsupported(op: str, **options) -> None:
    """Raises for the first option set to something other than its no-op default."""
    for name, (value, default) in options.items():
        if (value is not None) if default is None else (value != default):
            raise NotImplementedError(f"{op}: {name}={value!r} is not supported by pyllm (only {name}={default!r})")


def _attn(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
          return_attn_probs, **varlen):
    _unsupported(op, dropout_p=(dropout_p, 0.0))
    result = flash_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, window=tuple(window_size),
                        return_lse=return_attn_probs, deterministic=deterministic, softcap=softcap,
                        alibi_slopes=alibi_slopes, **varlen)
    return (*result, None) if return_attn_probs else result


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """q (batch, seqlen_q, n_heads, head_dim), k and v (batch, seqlen_k, n_kv_heads, head_dim) ->
    out like q; see pyllm.flash_attn for dtypes, head dims and masking."""
    return _attn("flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False):
    """qkv (batch, seqlen, 3, n_heads, head_dim): q, k, v are read as strided views (no copy)."""
    q, k, v = qkv.unbind(dim=2)
    return _attn("flash_attn_qkvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """q (batch, seqlen_q, n_heads, head_dim), kv (batch, seqlen_k, 2, n_kv_heads, head_dim)."""
    k, v = kv.unbind(dim=2)
    return _attn("flash_attn_kvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Optional[Tensor] = None):
    """Packed sequences: q (total_q, n_heads, head_dim), k and v (total_k, n_kv_heads, head_dim),
    int32 cu_seqlens (batch + 1,)."""
    _unsupported("flash_attn_varlen_func", block_table=(block_table, None))
    return _attn("flash_attn_varlen_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs, cu_seqlens_q=cu_seqlens_q,
                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Attention over a KV cache, appending k / v (new tokens) in place at cache_seqlens. Note
    flash-attn's default causal=False here (pyllm.flash_attn_with_kvcache defaults to True).
    cache_seqlens None means every cache is full (nothing to append). Unlike flash-attn 2, any
    page size (not only multiples of 256), and cache_leftpad with a paged cache."""
    op = "flash_attn_with_kvcache"
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{op}: appending k / v needs cache_seqlens (where the new tokens go)")
        # every cache full: a paged one holds its table's blocks
        cache_seqlens = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    return _kvcache(q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale=softmax_scale,
                    window=tuple(window_size), softcap=softcap, alibi_slopes=alibi_slopes, rotary_cos=rotary_cos,
                    rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, cache_batch_idx=cache_batch_idx,
                    cache_leftpad=cache_leftpad, block_table=block_table, return_lse=return_softmax_lse)


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache"]
