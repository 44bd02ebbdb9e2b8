"""flash-attn 2's function names and arguments over pyllm's kernels, for code written against
`flash_attn.flash_attn_interface`: change the import, keep the calls.

    from pyllm.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same layouts, same bottom-right causal alignment, same window semantics, same LSE shapes
((batch, n_heads, seqlen_q); (n_heads, total_q) for varlen); softcap and alibi_slopes (on CUDA
unverified on a GPU, 2026-12-05; with ALiBi, flash-attn's causal kernels return an LSE shifted by slope * (i + seqlen_k -
seqlen_q), pyllm's the bias as documented; the outputs agree). The kv-cache call takes all of
flash-attn's options: rotary embedding inside the call, cache_batch_idx, cache_leftpad and paged
caches (block_table, any page size; on CUDA unverified on a GPU), return_softmax_lse. The varlen call takes
a paged k / v too (block_table), gathered into packed tensors for the kernels. dropout_p runs in
the kernels (on CUDA unverified on a GPU), its elements drawn by pyllm's own generator of masks, not
flash-attn's Philox: the same statistics, other elements (pyllm.ops.flash_attn.dropout_mask gives
them). `return_attn_probs=True` returns (out, softmax_lse, an empty tensor): flash-attn's third
value (the dropout pattern, for its own tests) is not made. The kv-cache call has no backward: a
loss through its output raises at backward() (flash-attn's output has no grad_fn, and the gradient
is lost silently). `num_splits` is a tuning hint and is ignored (pyllm picks the
split-KV count itself). As flash-attn: head dims up to 256 (those without a kernel zero-padded to the
next one), windows as its kernels take them (a side >= seqlen_k unlimited, then a negative right beside
a left >= 0 is seqlen_k, not unlimited: it differs from the window as written for the queries more
than seqlen_k before the last; until 2026-12-06 pyllm took the window as written), softcap <= 0 no cap, max_seqlen as any integer at
least the longest sequence (a smaller one raises, where flash-attn leaves rows unwritten),
alibi_slopes that require grad given none (detached, with a warning),
packed tensors longer than cu_seqlens' last entry (the rows past it: zeros, where flash-attn leaves
them unwritten; their gradients zeros), a KV cache of more rows than the batch (its first rows). Unlike flash-attn, CPU tensors
work too (fp32, bf16, fp64, and fp16 computed in fp32). flash_attn.bert_padding's helpers are here
too (unpad_input, pad_input, index_first_axis, index_put_first_axis,
unpad_input_for_concatenated_sequences), with flash-attn 2.8's return values.
"""
from __future__ import annotations

import operator
import re
import warnings
from typing import Literal, Optional, Union, overload

import torch
from torch import Tensor

from pyllm.ops._util import is_number
from pyllm.ops.flash_attn import cu_seqlens_of, flash_attn, flash_attn_with_kvcache as _kvcache, real_tokens


# The return types of the overloads below: out, or with the flag (out, softmax_lse[, empty]) as flash-attn's
_OutProbs = tuple[Tensor, Tensor, Tensor]
_OutMaybeProbs = Union[Tensor, _OutProbs]
_OutLse = tuple[Tensor, Tensor]
_OutMaybeLse = Union[Tensor, _OutLse]


def _gather_paged(op: str, k: Tensor, v: Tensor, block_table: Tensor, cu_seqlens_k: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values of a paged cache (num_blocks, page_size, Hkv, D), packed (total_k, Hkv, D)
    in the order cu_seqlens_k gives: a prefill over a paged cache copies each sequence's rows once,
    against attention's reads of them once per block of queries."""
    for name, t in (("block_table", block_table), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be an int32 tensor")
    if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{op}: with block_table, k and v must be (num_blocks, page_size, n_kv_heads, head_dim), got "
                         f"{tuple(getattr(k, 'shape', ()))} and {tuple(getattr(v, 'shape', ()))}")
    batch = cu_seqlens_k.numel() - 1
    if block_table.dim() != 2 or block_table.shape[0] != batch or not block_table.shape[1] or cu_seqlens_k.dim() != 1:
        raise ValueError(f"{op}: block_table must be (batch, blocks per sequence) with batch {batch} (cu_seqlens_k's), "
                         f"got {tuple(block_table.shape)}")
    if block_table.device != k.device or cu_seqlens_k.device != k.device:
        raise ValueError(f"{op}: block_table and cu_seqlens_k must be on k's device {k.device}")
    num_blocks, page = k.shape[:2]
    if batch and (not num_blocks or not page):
        raise ValueError(f"{op}: with block_table, k needs blocks of at least one position, got shape {tuple(k.shape)}")
    starts = cu_seqlens_k[:-1].long()
    lengths = cu_seqlens_k[1:].long() - starts
    # The packed size is the host's to know anyway (repeat_interleave syncs on CUDA): checked there too.
    capacity = block_table.shape[1] * page
    if batch and (cu_seqlens_k[0] != 0 or bool((lengths < 0).any()) or bool((lengths > capacity).any())):
        raise ValueError(f"{op}: cu_seqlens_k must start at 0 and give each sequence 0..{capacity} keys (its "
                         f"block_table row's), got {cu_seqlens_k.tolist()}")
    sequence = torch.repeat_interleave(torch.arange(batch, device=k.device), lengths)  # (total_k,)
    position = torch.arange(sequence.numel(), device=k.device) - starts[sequence]
    blocks = block_table.long()[sequence, position // page]
    if bool(((blocks < 0) | (blocks >= num_blocks)).any()):
        raise ValueError(f"{op}: block_table must name blocks in [0, {num_blocks}) for every key of every sequence")
    rows = position % page
    return k[blocks, rows], v[blocks, rows]


# pyllm's argument names in its errors, and flash-attn's for them
_THEIR_NAMES = {"window": "window_size", "k_new": "k", "v_new": "v"}
_PYLLM_OPS = ("flash_attn_with_kvcache: ", "flash_attn: ")


def _in_their_words(op: str, call, lse_name: str):
    """call() with pyllm's errors said as flash-attn would: op's name, flash-attn's argument names
    (window_size, the kv-cache call's k / v, the LSE flag lse_name). Other errors pass as they are."""
    try:
        return call()
    except (TypeError, ValueError, NotImplementedError) as e:
        text = str(e)
        ours = next((prefix for prefix in _PYLLM_OPS if text.startswith(prefix)), None)
        if ours is None or type(e) not in (TypeError, ValueError, NotImplementedError):
            raise
        names = {**_THEIR_NAMES, "return_lse": lse_name}
        text = re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m[1]], text[len(ours):])
        raise type(e)(f"{op}: {text}").with_traceback(e.__traceback__) from None


def _window(op: str, window_size) -> tuple:
    try:
        return tuple(window_size)
    except TypeError:
        raise TypeError(f"{op}: window_size must be a pair of ints (left, right), got {window_size!r}") from None


def _as_flash_attn_kernel_window(window: tuple, seqlen_k) -> tuple:
    """window_size as flash-attn 2's kernels apply it (flash_api.cpp: mha_fwd, set_params_fprop): a
    side >= seqlen_k is -1, then a negative right beside a left >= 0 is seqlen_k (not unlimited). This
    differs from the literal window only for queries more than seqlen_k before the last one
    (seqlen_q > seqlen_k + 1). seqlen_k: k's length, varlen's max_seqlen_k, the cache's capacity."""
    try:
        left, right, seqlen_k = (operator.index(x) for x in (*window, seqlen_k))
    except (TypeError, ValueError):
        return window  # (bad values: the call's own checks say so)
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    if left >= 0 and right < 0:
        right = seqlen_k
    return (left, right)


def _no_cap(softcap):
    """flash-attn's softcap: any value <= 0 is no cap (a numpy scalar or a 0-d tensor as a float)."""
    if isinstance(softcap, Tensor) and softcap.numel() == 1 and not softcap.requires_grad:
        softcap = softcap.item()
    return 0.0 if is_number(softcap) and softcap <= 0 else softcap


_warned_alibi_grad = False


def _fixed_slopes(op: str, slopes):
    """flash-attn's alibi_slopes: fixed biases, given no gradient even when they require one (a
    trainable parameter in the caller's model): detached here as there, with a warning once (pyllm's
    own flash_attn refuses them, as it cannot give their gradient)."""
    global _warned_alibi_grad
    if isinstance(slopes, Tensor) and slopes.requires_grad:
        if not _warned_alibi_grad:
            warnings.warn(f"{op}: alibi_slopes requires grad; as flash-attn's, the attention gives it none "
                          "(detached)", stacklevel=4)
            _warned_alibi_grad = True
        return slopes.detach()
    return slopes


def _attn(op, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
          return_attn_probs, **varlen):
    window = _window(op, window_size)
    if isinstance(k, Tensor) and k.dim() >= 3:
        window = _as_flash_attn_kernel_window(window, varlen["max_seqlen_k"] if varlen else k.shape[1])
    alibi_slopes = _fixed_slopes(op, alibi_slopes)
    result = _in_their_words(op, lambda: flash_attn(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, return_lse=return_attn_probs,
        deterministic=deterministic, softcap=_no_cap(softcap), alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        **varlen), "return_attn_probs")
    # flash-attn's third value: the dropout pattern (its tests'), not made
    return (*result, q.new_empty(0)) if return_attn_probs else result


@overload
def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    *, return_attn_probs: Literal[True]) -> _OutProbs: ...


@overload
def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> _OutMaybeProbs: ...


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> _OutMaybeProbs:
    """q (batch, seqlen_q, n_heads, head_dim), k and v (batch, seqlen_k, n_kv_heads, head_dim) ->
    out like q; see pyllm.flash_attn for dtypes, head dims and masking."""
    return _attn("flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs)


def _unpack(op: str, name: str, packed, dim: int, n: int, ndim: int) -> tuple:
    """The n tensors packed along dim of a tensor of ndim dims, as strided views (no copy)."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != ndim or packed.shape[dim] != n:
        raise ValueError(f"{op}: {name} must have {ndim} dims with {n} tensors packed along dim {dim}, got shape "
                         f"{tuple(packed.shape)}")
    return packed.unbind(dim=dim)


@overload
def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              *, return_attn_probs: Literal[True]) -> _OutProbs: ...


@overload
def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False) -> _OutMaybeProbs: ...


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False) -> _OutMaybeProbs:
    """qkv (batch, seqlen, 3, n_heads, head_dim): q, k, v are read as strided views (no copy)."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", "qkv", qkv, 2, 3, 5)
    return _attn("flash_attn_qkvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs)


@overload
def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             *, return_attn_probs: Literal[True]) -> _OutProbs: ...


@overload
def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> _OutMaybeProbs: ...


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                             causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False) -> _OutMaybeProbs:
    """q (batch, seqlen_q, n_heads, head_dim), kv (batch, seqlen_k, 2, n_kv_heads, head_dim)."""
    k, v = _unpack("flash_attn_kvpacked_func", "kv", kv, 2, 2, 5)
    return _attn("flash_attn_kvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs)


@overload
def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, return_attn_probs: Literal[False] = False,
                           block_table: Optional[Tensor] = None) -> Tensor: ...


@overload
def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, *, return_attn_probs: Literal[True],
                           block_table: Optional[Tensor] = None) -> _OutProbs: ...


@overload
def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Optional[Tensor] = None) -> _OutMaybeProbs: ...


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Optional[Tensor] = None) -> _OutMaybeProbs:
    """Packed sequences: q (total_q, n_heads, head_dim), k and v (total_k, n_kv_heads, head_dim),
    int32 cu_seqlens (batch + 1,). With block_table (batch, blocks per sequence) int32, k and v are
    a paged cache (num_blocks, page_size, n_kv_heads, head_dim) as flash-attn's: key t of sequence b
    at row t % page_size of block block_table[b][t // page_size], cu_seqlens_k giving the lengths
    only. Its blocks are gathered into packed k / v first (torch indexing, differentiable; the packed
    size and the indices are read on the host, a device sync on CUDA). The gradient reaching the
    blocks is summed by index_put (on CUDA with atomics where sequences share a block: not bitwise
    repeatable then, deterministic=True or not)."""
    if block_table is not None:
        k, v = _gather_paged("flash_attn_varlen_func", k, v, block_table, cu_seqlens_k)
    return _attn("flash_attn_varlen_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs, cu_seqlens_q=cu_seqlens_q,
                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@overload
def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                     deterministic: bool = False,
                                     return_attn_probs: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                     deterministic: bool = False, *, return_attn_probs: Literal[True]) -> _OutProbs: ...


@overload
def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                     deterministic: bool = False,
                                     return_attn_probs: bool = False) -> _OutMaybeProbs: ...


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                     deterministic: bool = False, return_attn_probs: bool = False) -> _OutMaybeProbs:
    """qkv (total, 3, n_heads, head_dim), one cu_seqlens for q and k: strided views, no copy."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", "qkv", qkv, 1, 3, 4)
    return _attn("flash_attn_varlen_qkvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                 max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)


@overload
def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                    deterministic: bool = False,
                                    return_attn_probs: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                    deterministic: bool = False, *, return_attn_probs: Literal[True]) -> _OutProbs: ...


@overload
def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                    deterministic: bool = False, return_attn_probs: bool = False) -> _OutMaybeProbs: ...


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                                    deterministic: bool = False, return_attn_probs: bool = False) -> _OutMaybeProbs:
    """q (total_q, n_heads, head_dim), kv (total_k, 2, n_kv_heads, head_dim)."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", "kv", kv, 1, 2, 4)
    return _attn("flash_attn_varlen_kvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@overload
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, *, return_softmax_lse: Literal[True]) -> _OutLse: ...


@overload
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False) -> _OutMaybeLse: ...


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False) -> _OutMaybeLse:
    """Attention over a KV cache, appending k / v (new tokens) in place at cache_seqlens. Note
    flash-attn's default causal=False here (pyllm.flash_attn_with_kvcache defaults to True).
    cache_seqlens None means every cache is full (nothing to append). Unlike flash-attn 2, any
    page size (not only multiples of 256), and cache_leftpad with a paged cache."""
    op = "flash_attn_with_kvcache"
    if cache_seqlens is None:
        if k is not None:
            raise ValueError(f"{op}: appending k / v needs cache_seqlens (where the new tokens go)")
        # every cache full: a paged one holds its table's blocks (a bad table: the call's checks say so)
        blocks = block_table.shape[-1] if isinstance(block_table, Tensor) and block_table.dim() == 2 else 1
        cache_seqlens = k_cache.shape[1] * blocks
    window = _window(op, window_size)
    if isinstance(k_cache, Tensor) and k_cache.dim() == 4:
        pages = block_table.shape[-1] if isinstance(block_table, Tensor) and block_table.dim() == 2 else 1
        window = _as_flash_attn_kernel_window(window, k_cache.shape[1] * pages)
    return _in_their_words(op, lambda: _kvcache(
        q, k_cache, v_cache, cache_seqlens, k, v, causal, softmax_scale=softmax_scale, window=window,
        softcap=_no_cap(softcap), alibi_slopes=_fixed_slopes(op, alibi_slopes), rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        block_table=block_table, return_lse=return_softmax_lse), "return_softmax_lse")


# --- flash_attn.bert_padding's helpers: padded batches to packed tokens and back ---------------------
#
# Code written for flash-attn unpads a padded batch for the varlen call with these (many model
# repositories): `from flash_attn.bert_padding import ...` becomes an import from here. Torch
# indexing, differentiable; flash-attn 2.8's return values (unpad_input's five: code written for
# flash-attn before 2.7 unpacks four, as it would from 2.8's own).

def index_first_axis(x: Tensor, indices: Tensor) -> Tensor:
    """x[indices] over x's first axis (x at least 2-D), differentiable (the gradient summed back into
    the rows indices name)."""
    if x.dim() < 2:
        raise ValueError(f"index_first_axis: x must be at least 2-D, got shape {tuple(x.shape)}")
    return x[indices]


def index_first_axis_residual(x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """(x[indices], x as a view): flash-attn's, for a residual kept whole beside the rows taken. Both
    carry gradients back to x (flash-attn's autograd.Function adds the rows' gradient into the
    residual's; until 2026-12-05 this returned x detached, and the residual's gradient was lost)."""
    return index_first_axis(x, indices), x.view_as(x)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """A (first_axis_dim, ...) tensor of zeros with values' rows at indices, differentiable."""
    if indices.dim() != 1 or values.dim() < 2:
        raise ValueError(f"index_put_first_axis: indices must be 1-D and values at least 2-D, got shapes "
                         f"{tuple(indices.shape)} and {tuple(values.shape)}")
    return values.new_zeros((first_axis_dim, *values.shape[1:])).index_put((indices,), values)


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Optional[Tensor] = None):
    """hidden_states (batch, seqlen, ...) and attention_mask (batch, seqlen) of 1 / True for real
    tokens (unused_mask: tokens allocated but not attended to, kept in the packed rows too) ->
    (the kept tokens (total, ...), their int64 indices into batch * seqlen, int32 cu_seqlens (batch +
    1,), the longest sequence as an int (a device sync), int32 (batch,) counts of attention_mask's
    tokens): flash-attn 2.8's five values."""
    kept = attention_mask if unused_mask is None else attention_mask + unused_mask
    indices, cu_seqlens, longest = real_tokens(kept.bool())
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    return (index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices), indices, cu_seqlens,
            longest, used)


def unpad_input_for_concatenated_sequences(hidden_states: Tensor, attention_mask_in_length: Tensor):
    """Rows holding several sequences back to back: attention_mask_in_length (batch, seqlen) lists
    each row's sequence lengths first, then zeros ([[2, 3, 0, ...], ...]: a row of 2 then 3 tokens).
    -> (the tokens (total, ...), their indices, int32 cu_seqlens over every sequence, the longest)."""
    per_row = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.shape[-1]
    real = torch.arange(seqlen, device=per_row.device)[None, :] < per_row[:, None]  # (batch, seqlen)
    flat = attention_mask_in_length.flatten()
    cu_seqlens, longest = cu_seqlens_of(flat[flat != 0])
    indices = real.flatten().nonzero()[:, 0]
    return index_first_axis(hidden_states.reshape(-1, *hidden_states.shape[2:]), indices), indices, cu_seqlens, longest


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """unpad_input's inverse: the tokens (total, ...) back at indices of a (batch, seqlen, ...)
    tensor, zeros elsewhere; differentiable."""
    return index_put_first_axis(hidden_states, indices, batch * seqlen).reshape(batch, seqlen,
                                                                                  *hidden_states.shape[1:])


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "index_first_axis", "index_first_axis_residual", "index_put_first_axis", "unpad_input",
           "unpad_input_for_concatenated_sequences",
           "pad_input"]
