"""FlashAttention: tiled exact attention with online softmax, forward, backward and KV-cache decode.

Kernels: csrc/cpu/flash_attn.cpp (the C++ twin, what CI runs), csrc/cuda/flash_attn_*.cu (sm80
mma.sync kernels). Conventions shared by both (layout, mask, LSE): csrc/common/attn_params.h.
The forward saves only out and the log-sum-exp; the backward recomputes the probabilities.
"""
from __future__ import annotations

import math
import operator
import os
from array import array
from typing import Callable, Literal, Optional, Union, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util
from pyllm.ops import rope as rope_ops

OP = "flash_attn"
HEAD_DIMS = (32, 64, 96, 128, 256)  # the kernels'
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float16, torch.bfloat16),
}
# What the public calls take: other head dims up to 256 (flash-attn's: Phi-2's 80, tiny test
# models' 16) run zero-padded to the next kernel head dim, and fp16 on the CPU (flash-attn's usual
# dtype, for code moved to a CPU) in fp32: _widened.
ACCEPTED = {"cpu": DTYPES["cpu"] + (torch.float16,), "cuda": DTYPES["cuda"]}


# --- validation ---------------------------------------------------------------------------------

def _check_qkv(op: str, q, k, v, varlen: bool, same_batch: bool = True, kv: tuple[str, str] = ("k", "v")) -> None:
    """kv: what the caller calls k and v (the KV-cache call's k_cache, v_cache)."""
    kn, vn = kv
    for name, t in (("q", q), (kn, k), (vn, v)):
        _util.check_tensor(op, name, t, ACCEPTED)
    _util.check_same(op, **{"q": q, kn: k, vn: v})
    want = 3 if varlen else 4
    layout = "(total_tokens, n_heads, head_dim)" if varlen else "(batch, seqlen, n_heads, head_dim)"
    for name, t in (("q", q), (kn, k), (vn, v)):
        if t.dim() != want:
            raise ValueError(f"{op}: {name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: {kn} and {vn} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if not 0 < head_dim <= HEAD_DIMS[-1]:
        raise ValueError(f"{op}: head_dim {head_dim} is not supported: head dims 1 to {HEAD_DIMS[-1]} "
                         f"({', '.join(map(str, HEAD_DIMS))} run as they are, others zero-padded to the next of these)")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{op}: q and {kn} must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"{op}: the number of query heads ({n_heads}) must be a multiple of the number of "
                         f"key/value heads ({n_kv_heads}) (GQA / MQA)")
    if not varlen and same_batch and q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: q and {kn} must have the same batch size, got {q.shape[0]} and {k.shape[0]}")


def _as_int(value) -> Optional[int]:
    """An int, or what stands for one (numpy's integers, anything with __index__); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, torch.SymInt)):  # traced with dynamic shapes, a size stays symbolic: operator.index
        return value  # specialized the graph to the example's (a packed batch's max_seqlen = T)
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_window(op: str, window) -> tuple[int, int]:
    sides = [_as_int(w) for w in window] if isinstance(window, (tuple, list)) and len(window) == 2 else [None]
    if None in sides:
        raise TypeError(f"{op}: window must be a pair of ints (left, right), got {window!r}")
    # any negative is unlimited, as in flash-attn; a side past any sequence (the kernels take int32)
    # is too
    left, right = (-1 if w < 0 or w >= 2 ** 31 - 1 else w for w in sides)
    return left, right


def _runs_widened(x: Tensor) -> bool:
    """A head dim the kernels lack, or fp16 on the CPU: the call runs on a widened copy."""
    return x.shape[-1] not in HEAD_DIMS or (x.dtype == torch.float16 and x.device.type == "cpu")


def _widened(x: Optional[Tensor]) -> Optional[Tensor]:
    """x (..., D) as the kernels take it: zero-padded to the next kernel head dim (a zero column
    adds exactly 0 to every score, and its output column is dropped after), fp16 on the CPU in fp32
    (one rounding, of the output, where fp16 kernels round P too). Differentiable."""
    if x is None:
        return None
    if x.dtype == torch.float16 and x.device.type == "cpu":
        x = x.float()
    wide = next(d for d in HEAD_DIMS if d >= x.shape[-1])
    return F.pad(x, (0, wide - x.shape[-1])) if wide != x.shape[-1] else x


def _narrowed(out: Tensor, like: Tensor) -> Tensor:
    """A widened call's output back in like's head dim and dtype, contiguous."""
    return out[..., :like.shape[-1]].to(like.dtype).contiguous()


def _check_cu_seqlens(op: str, q, cu_seqlens_q, cu_seqlens_k) -> None:
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError(f"{op}: give both cu_seqlens_q and cu_seqlens_k (varlen) or neither")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32 (as in flash-attn), got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{op}: {name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{op}: {name} is on {cu.device} but q is on {q.device}; they must match")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")


def _seqlens_of(op: str, name: str, cu: Tensor, total: int, max_seqlen: int) -> int:
    """Checks cu_seqlens' values (reads them: a sync on the GPU) and returns the max length."""
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{op}: {name}[0] must be 0, got {vals[0]}")
    lengths = [b - a for a, b in zip(vals, vals[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{op}: {name} must be non-decreasing, got {vals}")
    if vals[-1] > total:
        raise ValueError(f"{op}: {name}[-1] ({vals[-1]}) is past the total number of tokens ({total})")
    longest = max(lengths, default=0)
    if max_seqlen >= 0 and longest > max_seqlen:
        raise ValueError(f"{op}: {name} has a sequence of length {longest}, longer than max_seqlen ({max_seqlen})")
    return longest if max_seqlen < 0 else max_seqlen


# --- launchers: write into given outputs (tests poison these first) ---------------------------

def _strides3(t: Tensor, varlen: bool) -> list[int]:
    """(batch, token, head) strides in elements; varlen tensors have no batch dim."""
    return [0, t.stride(0), t.stride(1)] if varlen else [t.stride(0), t.stride(1), t.stride(2)]


def _sizes(q: Tensor, k: Tensor, cu_seqlens_q, max_seqlen_q: int, max_seqlen_k: int):
    if cu_seqlens_q is not None:
        return cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    return q.shape[0], q.shape[1], k.shape[1]


def _lse_strides(lse: Tensor, varlen: bool) -> list[int]:
    # (B, H, Tq) or (H, total_q); the token stride is 1 in both. A size-1 dim's stride is free
    # (torch calls (1, H, Tq) with strides (Tq, Tq, 1) contiguous): pass the canonical one, which
    # indexes the same elements and is what the kernels' layout checks and scratch sizes expect.
    if varlen:
        return [0, lse.stride(0) if lse.shape[0] > 1 else lse.shape[1]]
    head = lse.stride(1) if lse.shape[1] > 1 else lse.shape[2]
    return [lse.stride(0) if lse.shape[0] > 1 else lse.shape[1] * head, head]


def _packed_totals(q: Tensor, k: Tensor, varlen: bool) -> dict:
    # The CUDA kernels clamp cu_seqlens against the packed token counts (csrc/common/attn_params.h).
    return dict(total_q=q.shape[0], total_k=k.shape[0]) if varlen else {}


def _opt_ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else _util.ptr(t)


def _check_softcap(op: str, q: Tensor, softcap) -> None:
    """A public call's softcap: a finite number >= 0."""
    if not _util.symbolic(softcap) and (not _util.is_number(softcap) or not 0 <= softcap < math.inf):
        raise ValueError(f"{op}: softcap must be a finite number >= 0 (0: no cap), got {softcap!r}")


def _check_alibi(op: str, q: Tensor, slopes, batch: int) -> Optional[Tensor]:
    """A public call's alibi_slopes: None, or float32 (n_heads,) / (batch, n_heads) on q's device,
    finite, taking no gradient. Returns them contiguous."""
    if slopes is None:
        return None
    if not isinstance(slopes, Tensor):
        raise TypeError(f"{op}: alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"{op}: alibi_slopes must be float32 (as flash-attn's), got {slopes.dtype}")
    n_heads = q.shape[-2]
    if slopes.shape not in ((n_heads,), (batch, n_heads)):
        raise ValueError(f"{op}: alibi_slopes must have shape (n_heads,) = ({n_heads},) or (batch, n_heads) = "
                         f"({batch}, {n_heads}), got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"{op}: alibi_slopes must be on q's device {q.device}, got {slopes.device}")
    if slopes.requires_grad:
        raise ValueError(f"{op}: alibi_slopes are fixed biases and get no gradient; pass alibi_slopes.detach()")
    # Read here, before a kv-cache call writes anything (the CPU launchers check them again; CUDA's
    # cannot read device memory); traced calls leave it to the launchers (a data-dependent branch
    # would break the graph).
    if not _util.values_unreadable(slopes) and not _finite_slopes(slopes):
        raise ValueError(f"{op}: alibi_slopes must be finite")
    return slopes.contiguous()


def _finite_slopes(slopes: Tensor) -> bool:
    """Whether every slope is finite. On CUDA reading the answer is a device sync, which a model
    would pay in every layer of every step for the same slopes buffer: the answer is kept on the
    tensor with its version counter (in-place writes bump it), so each buffer is read once."""
    if not slopes.is_cuda:
        return bool(torch.isfinite(slopes).all())
    if torch.cuda.is_current_stream_capturing():  # a CUDA graph's capture cannot read them: left unchecked
        return True
    if slopes.is_inference():  # (no version counter to keep the answer with)
        return bool(torch.isfinite(slopes).all())
    version = slopes._version
    if getattr(slopes, "_pyllm_finite_at", None) == version:
        return True
    finite = bool(torch.isfinite(slopes).all())
    if finite:
        slopes._pyllm_finite_at = version
    return finite


def _alibi_args(slopes: Optional[Tensor], n_heads: int, batch: int, q: Tensor) -> dict:
    """The launchers' ALiBi arguments: the slopes' address and their batch stride (0: (n_heads,))."""
    if slopes is None:
        return {}
    # (the kernel reads n_heads slopes per row wherever they point: a DTensor's whole slopes beside a
    # shard of the heads would bias them by other heads' slopes without a word; and the op called
    # directly reaches here unchecked: slopes on another device would be read through a pointer
    # that is not the kernel's to read)
    if slopes.shape[-1] != n_heads or (slopes.dim() == 2 and slopes.shape[0] not in (1, batch)):
        raise ValueError(f"{OP}: alibi_slopes must be (n_heads,) = ({n_heads},) or (batch or 1, n_heads) for "
                         f"{batch} sequences, got {tuple(slopes.shape)}")
    if slopes.dtype is not torch.float32 or slopes.get_device() != q.get_device() or slopes.stride(-1) != 1:
        raise ValueError(f"{OP}: alibi_slopes must be float32 with a contiguous last dim on q's device {q.device}, "
                         f"got {slopes.dtype} on {slopes.device}")
    # A (1, H) tensor's first stride is free (contiguous whatever it is): one row is stride 0.
    return dict(alibi_slopes=_util.ptr(slopes),
                alibi_batch_stride=slopes.stride(0) if slopes.dim() == 2 and slopes.shape[0] > 1 else 0)


def _check_dropout(op: str, dropout_p) -> float:
    """A public call's dropout_p: a number in [0, 1)."""
    if _util.symbolic(dropout_p):
        return dropout_p
    if not _util.is_number(dropout_p) or not 0 <= dropout_p < 1:
        raise ValueError(f"{op}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _dropout_inputs(op: str, dropout_p) -> tuple:
    """A public call's trailing op arguments for dropout_p: (p, a fresh seed), or () without dropout."""
    return (_check_dropout(op, dropout_p), _new_dropout_seed()) if dropout_p else ()


def _new_dropout_seed() -> Tensor:
    """One call's dropout seed: a draw of torch's default CPU generator, as an int64 (1,) CPU tensor
    (reading it is no device sync; torch.manual_seed and activation checkpointing's saved RNG state
    make it repeat)."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)


def _dropout_args(dropout_p: float, seed: Optional[Tensor], q: Tensor) -> dict:
    """The launchers' dropout arguments: p and the seed as an unsigned 64-bit int."""
    if not dropout_p:
        return {}
    if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.dtype is not torch.int64:
        raise ValueError(f"{OP}: dropout_p > 0 needs dropout_seed, an int64 tensor of one element, got {seed!r}")
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        # (the seed is read on the host: a graph would replay one mask at every step)
        raise NotImplementedError(f"{OP}: dropout inside a CUDA graph capture: each replay would drop the same "
                                  "elements; capture the step without attention dropout")
    return dict(dropout_p=float(dropout_p), dropout_seed=int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


_M32 = 0xFFFF_FFFF


def _mix32(x):
    """common/counter_rng.h's mix32 on Python ints or int64 tensors holding 32-bit words."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _stream_key(seed: int, a: int, b: int) -> int:
    k = _mix32((seed & _M32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & _M32))
    k = _mix32(k ^ (a & _M32))
    return _mix32(k ^ ((b * 0x85EBCA6B) & _M32))


def dropout_mask(seed, sequence: int, head: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                 device=None) -> Tensor:
    """The kept elements of attention dropout for one (sequence, query head): a bool (seqlen_q,
    seqlen_k) tensor, True where flash_attn(dropout_p=...) with this seed kept query i's probability
    of key j (positions within the sequence; sequence: the batch row, or the varlen sequence's index).
    The kernels scale the kept ones by 1 / (1 - dropout_p). seed: the int64 one-element tensor (or
    int) of the call, e.g. from torch.manual_seed before it, then the same draw. For tests and for
    reproducing a call; the kernels compute the same words (common/counter_rng.h's AttnDropoutKey)."""
    seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    rk = _stream_key(seed, sequence, head)
    ck = _mix32(rk ^ 0x632BE5AB)
    rows = _mix32(torch.arange(seqlen_q, dtype=torch.int64, device=device) ^ rk)
    cols = _mix32(torch.arange(seqlen_k, dtype=torch.int64, device=device) ^ ck)
    words = _mix32((rows[:, None] + cols[None, :]) & _M32)
    threshold = min(round(dropout_p * 2**32), _M32)  # (nearest, ties to even: as std::nearbyint)
    return words >= threshold


def _check_kernel_tensors(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, batch: int,
                          cache_rows: bool = False, grads: tuple = ()) -> None:
    """What a launch reads and writes wherever the tensors point: k and v at q's dtype, head dim and
    batch, out (and dout, dq) at q's shape, lse at its own. The public functions check all of it first;
    the registered ops called directly (torch.ops.pyllm.*, torch.compile's graphs) reach the kernels
    through here alone, and a k of a smaller batch had been read past its end (a segfault), float64
    k / v read as float32. cache_rows: a KV cache addressed by row indices or pages (its batch free).
    grads: (dout, dlse, dq, dk, dv) of the backward."""
    # (plain comparisons, no generators: ~2 us a call, paid by every eager attention call and decode step)
    varlen = cu_seqlens_q is not None
    dtype, lse_dtype, where = q.dtype, _lse_dtype(q), q.get_device()
    same = [k, v, out]
    if grads:
        dout, dlse, dq, dk, dv = grads
        same += [dout, dq, dk, dv]
    for t in same:
        if t.dtype is not dtype or t.get_device() != where:
            raise TypeError(f"{OP}: q, k, v, out (and the gradients) must share one dtype and device, got q "
                            f"{dtype} on {q.device}, k {k.dtype} on {k.device}, v {v.dtype} on {v.device}")
    if lse.dtype is not lse_dtype or lse.get_device() != where or (grads and dlse is not None and dlse.dtype is not lse_dtype):
        raise TypeError(f"{OP}: lse must be {lse_dtype} on q's device, got {lse.dtype} on {lse.device}")
    qs, ks = q.shape, k.shape
    dims = 3 if varlen else 4
    if len(qs) != dims or len(ks) != dims or v.shape != ks or out.shape != qs or ks[-1] != qs[-1] or ks[-2] < 1 \
            or qs[-2] % ks[-2] or (not varlen and not cache_rows and ks[0] < qs[0]) \
            or lse.shape != ((qs[1], qs[0]) if varlen else (qs[0], qs[2], qs[1])) \
            or (grads and (dout.shape != qs or dq.shape != qs or dk.shape != ks or dv.shape != ks
                           or (dlse is not None and dlse.shape != lse.shape))):
        raise ValueError(f"{OP}: q {tuple(qs)}, k {tuple(ks)}, v {tuple(v.shape)} and lse {tuple(lse.shape)} do not "
                         "fit one attention call: k and v alike with q's head dim, batch and a divisor of its heads, "
                         "out and the gradients at q's and k's shapes")
    for name, t, n in (("cu_seqlens_q", cu_seqlens_q, batch + 1), ("cu_seqlens_k", cu_seqlens_k, batch + 1),
                       ("seqused_k", seqused_k, batch)):
        if t is not None and (t.dtype is not torch.int32 or t.numel() < n or t.get_device() != where):
            raise ValueError(f"{OP}: {name} must be int32 with {n} entries on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def flash_attn_forward_into(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            scale, window_left, window_right, seqused_k=None, softcap: float = 0.0,
                            alibi_slopes: Optional[Tensor] = None, cache_options: Optional[dict] = None,
                            dropout_p: float = 0.0, dropout_seed: Optional[Tensor] = None) -> None:
    """Runs the forward kernel into out (q's shape, contiguous) and lse. Inputs already checked.
    cache_options: the CPU launcher's KV-cache arguments (_cache_option_args), their seqlen_k too.
    dropout_p, dropout_seed: dropout on the probabilities, its seed an int64 tensor (_dropout_args)."""
    varlen = cu_seqlens_q is not None
    batch, seqlen_q, seqlen_k = _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if cache_options:
        cache_options = dict(cache_options)
        seqlen_k = cache_options.pop("seqlen_k")
    _check_kernel_tensors(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, batch,
                          cache_rows=bool(cache_options) and "kv_rows" in cache_options)
    args = (_util.ptr(q), _util.ptr(k), _util.ptr(v), _util.ptr(out), _util.ptr(lse), _opt_ptr(cu_seqlens_q),
            _opt_ptr(cu_seqlens_k), _opt_ptr(seqused_k), batch, seqlen_q, seqlen_k, q.shape[-2], k.shape[-2],
            q.shape[-1], _strides3(q, varlen), _strides3(k, varlen), _strides3(v, varlen), _strides3(out, varlen),
            _lse_strides(lse, varlen), float(scale), window_left, window_right, _util.dtype_code(q))
    mods = dict(softcap=float(softcap), **_alibi_args(alibi_slopes, q.shape[-2], batch, q),
                **_dropout_args(dropout_p, dropout_seed, q))
    if q.is_cuda:
        _C.flash_attn_fwd_cuda(*args, q.device.index, _util.stream_of(q), **_packed_totals(q, k, varlen), **mods)
    else:
        _util.init_cpu_threads()
        _C.flash_attn_fwd_cpu(*args, **mods, **(cache_options or {}))


# The capped (softcap), ALiBi and dropout CUDA kernels have not yet run on a GPU: pyllm.nn's
# attention (the models) takes them only when asked (bench/gpu_check.sh asks), torch ops otherwise;
# pyllm.flash_attn and flash_attn_with_kvcache themselves always run them.
SCORE_MODS_CUDA_ENV = "PYLLM_ATTN_SCORE_MODS_CUDA"


def takes_score_mods(q: Tensor, softcap, alibi_slopes, dropout_p: float = 0.0) -> bool:
    """Whether pyllm.nn's attention runs the kernels for q with these score modifiers (and dropout):
    always without them and off CUDA; on CUDA with PYLLM_ATTN_SCORE_MODS_CUDA=1 (until verified on a GPU)."""
    return ((not softcap and alibi_slopes is None and not dropout_p) or not q.is_cuda
            or os.environ.get(SCORE_MODS_CUDA_ENV) == "1")


# The CUDA backward's implementations (csrc/cuda/flash_attn_bwd.cu): the tensor-core kernels
# (default) and the fp32 SIMT ones kept as their reference, both always deterministic; "atomic",
# the tensor-core kernels with dQ added up by fp32 atomics (FlashAttention-2's default), only
# with deterministic=False at head dims 64 / 128 on sm_90, else "mma": an experiment, unverified
# on a GPU, off unless asked for.
BWD_ALGOS = {"mma": 0, "simt": 1, "atomic": 2}
ATOMIC_DQ_HEAD_DIMS = (64, 128)


def _cuda_bwd_algo(algo: Optional[str]) -> int:
    name = os.environ.get("PYLLM_ATTN_BWD", "mma") if algo is None else algo
    if name not in BWD_ALGOS:
        raise ValueError(f"{OP}: the CUDA backward must be one of {', '.join(BWD_ALGOS)} "
                         f"(PYLLM_ATTN_BWD), got {name!r}")
    return BWD_ALGOS[name]


def flash_attn_backward_into(dout, dlse, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, scale, window_left, window_right, deterministic,
                             algo: Optional[str] = None, softcap: float = 0.0,
                             alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0,
                             dropout_seed: Optional[Tensor] = None) -> None:
    """dq, dk, dv from dout (and dlse, or None). out, dout and dq share one layout, dk and dv one.

    algo: the CUDA backward, "mma", "simt" or "atomic"; None reads PYLLM_ATTN_BWD (default "mma").
    """
    varlen = cu_seqlens_q is not None
    batch, seqlen_q, seqlen_k = _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    _check_kernel_tensors(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, None, batch, grads=(dout, dlse, dq, dk, dv))
    args = (_util.ptr(dout), _opt_ptr(dlse), _util.ptr(q), _util.ptr(k), _util.ptr(v), _util.ptr(out),
            _util.ptr(lse), _util.ptr(dq), _util.ptr(dk), _util.ptr(dv), _opt_ptr(cu_seqlens_q),
            _opt_ptr(cu_seqlens_k), batch, seqlen_q, seqlen_k, q.shape[-2], k.shape[-2], q.shape[-1],
            _strides3(q, varlen), _strides3(k, varlen), _strides3(v, varlen), _strides3(out, varlen),
            _strides3(dk, varlen), _lse_strides(lse, varlen), float(scale), window_left, window_right,
            _util.dtype_code(q))
    mods = dict(softcap=float(softcap), **_alibi_args(alibi_slopes, q.shape[-2], batch, q),
                **_dropout_args(dropout_p, dropout_seed, q))
    if q.is_cuda:
        # delta = rowsum(dO * O) - dlse, fp32 in lse's layout: from torch's caching allocator.
        delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=q.device)
        delta_capacity = delta.untyped_storage().nbytes() // 4
        algo_code = _cuda_bwd_algo(algo)
        # "atomic": an fp32 dQ accumulator of q's (rows, heads, D), zeroed by the C++ side, which
        # uses it only where the variant exists (else the deterministic kernels: unused); capped or
        # biased scores run on those too
        dq_accum = None
        if (algo_code == BWD_ALGOS["atomic"] and not deterministic and q.shape[-1] in ATOMIC_DQ_HEAD_DIMS
                and not softcap and alibi_slopes is None and not dropout_p and torch.cuda.get_device_capability(q.device)[0] == 9):
            dq_accum = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
        _C.flash_attn_bwd_cuda(*args, bool(deterministic), q.device.index, _util.stream_of(q),
                               algo_code, **_packed_totals(q, k, varlen), delta=_opt_ptr(delta),
                               delta_capacity=delta_capacity, dq_accum=_opt_ptr(dq_accum),
                               dq_accum_capacity=0 if dq_accum is None else dq_accum.numel(), **mods)
    else:
        _util.init_cpu_threads()
        _C.flash_attn_bwd_cpu(*args, **mods)  # deterministic


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # The kernels take any batch / token / head strides but need unit-stride head_dim rows, aligned
    # to 16 bytes on the GPU (cp.async); anything else is copied once.
    if t.stride(-1) != 1 or (t.is_cuda and t.data_ptr() % 16) or any(s % 8 for s in t.stride()[:-1] if t.is_cuda):
        # clone, not contiguous(): a contiguous view at a misaligned offset would come back as is.
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


# Where the contents of cu_seqlens / cache_seqlens are checked. Reading them on the host is free
# for CPU tensors but a device sync for CUDA ones (latency in decode, and no CUDA graph capture),
# so on CUDA they are read only when needed (varlen without max_seqlen_q and max_seqlen_k: the
# launch needs the maximum) or asked for (PYLLM_ATTN_CHECK_SEQLENS=1). Unchecked, the kernels
# clamp them to the tensors' sizes: bad contents give wrong results, never out-of-bounds accesses.
# dtype, shape and device are checked always (no sync).
CHECK_SEQLENS_ENV = "PYLLM_ATTN_CHECK_SEQLENS"


def _check_seqlens_on_host(t: Tensor) -> bool:
    return not t.is_cuda or os.environ.get(CHECK_SEQLENS_ENV, "0") == "1"


def _resolve_max_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    if cu_seqlens_q is None:
        return q.shape[1], k.shape[1]
    if max_seqlen_q >= 0 and max_seqlen_k >= 0 and not _check_seqlens_on_host(cu_seqlens_q):
        return max_seqlen_q, max_seqlen_k  # no sync: the CUDA kernels clamp cu_seqlens
    return (_seqlens_of(OP, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
            _seqlens_of(OP, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k))


def _check_sinks(op: str, q: Tensor, sinks) -> None:
    if sinks is None:
        return
    if not isinstance(sinks, Tensor):
        raise TypeError(f"{op}: sinks must be a torch.Tensor of shape (n_heads,) or None, got {type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise TypeError(f"{op}: sinks must be a floating-point tensor, got {sinks.dtype}")
    if sinks.shape != (q.shape[-2],):
        raise ValueError(f"{op}: sinks must have shape (n_heads,) = ({q.shape[-2]},), one logit per query head, "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"{op}: sinks must be on q's device {q.device}, got {sinks.device}")


def _with_sinks(out: Tensor, lse: Tensor, sinks: Tensor, varlen: bool) -> tuple[Tensor, Tensor]:
    """Attention with a learned sink logit per head (gpt-oss's s_aux): the softmax over [scores,
    sink] with the sink's column dropped. That is the kernel's output scaled by exp(lse - lse_all),
    lse_all = logaddexp(lse, sink), so it is composed here of torch ops on the kernel's (out, lse):
    autograd through them and the kernel's backward (which takes dlse) gives dq, dk, dv and dsinks,
    and torch.compile traces them. Returns (out, lse_all); out rounded once more, from fp32."""
    # A sink of -inf is no sink; clamped to the dtype's lowest so that a query seeing no key (lse -inf
    # after the fill below) gets keep = exp(-inf) = 0, where -inf - -inf would give NaN.
    sink = sinks.to(lse.dtype).clamp_min(torch.finfo(lse.dtype).min)
    sink = sink[:, None] if varlen else sink[None, :, None]  # against lse (H, N) / (B, H, T)
    lse_keys = lse.masked_fill(lse == math.inf, -math.inf)  # a query seeing no key (+inf): all mass on the sink
    lse_all = torch.logaddexp(lse_keys, sink)
    keep = torch.exp(lse_keys - lse_all)  # the keys' share of the softmax
    keep = keep.transpose(0, 1) if varlen else keep.transpose(1, 2)  # (N, H) / (B, T, H)
    return (out * keep[..., None]).to(out.dtype), lse_all


def cu_seqlens_of(lengths: Tensor) -> tuple[Tensor, int]:
    """Sequence lengths (B,) -> their int32 cu_seqlens (B + 1,) for the varlen call, and the longest
    (an int: one device sync, as flash-attn's unpadding)."""
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max()) if lengths.numel() else 0


def real_tokens(mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """(B, L) bool of the real tokens of padded rows -> the flat indices of its True entries (int64),
    their int32 cu_seqlens (B + 1,) and the longest row's count: a padded batch as the varlen call's
    packed rows (pyllm.hf's unpadding, flash_attn_interface.unpad_input)."""
    return (mask.flatten().nonzero()[:, 0], *cu_seqlens_of(mask.sum(dim=1, dtype=torch.int32)))


def _past_end_rows(cu: Optional[Tensor]) -> Callable:
    """The allocator of a call's outputs (out, dq, dk, dv: rows on dim 0) whose rows past cu[-1]
    are in no sequence (flash-attn takes packed tensors padded past the last one, e.g. to a CUDA
    graph's size): the kernels do not write those, so they must not hold what the allocator left,
    which a gradient would carry into the weights. Zeros on CUDA, where cu[-1] cannot be read
    without a sync (a memset: half a masked fill's traffic, a few % of a backward); on the CPU
    torch.empty, and _clear_past_end zeroes the tail after."""
    return torch.zeros if cu is not None and cu.device.type != "cpu" else torch.empty


def _clear_past_end(cu: Tensor, *fills) -> None:
    """fills: (tensor, token dim, value): the rows past cu[-1] set to value. On the CPU, where
    cu[-1] is read, every fill; on CUDA the small ones (the LSE: +inf, no key seen) by a mask, the
    outputs being zeros from _past_end_rows already."""
    if cu.device.type == "cpu":
        end = int(cu[-1])
        for x, dim, value in fills:
            if end < x.shape[dim]:
                x.narrow(dim, end, x.shape[dim] - end).fill_(value)
        return
    for x, dim, value in fills:
        if dim != 0:  # (dim 0: an output, zeros already)
            past = torch.arange(x.shape[dim], device=x.device) >= cu[-1]
            x.masked_fill_(past.view([-1 if d == dim else 1 for d in range(x.dim())]), value)


# --- torch.library custom ops ---------------------------------------------------------------

def _flash_attn_body(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
                     deterministic: bool, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                     dropout_p: float = 0.0, dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    max_seqlen_q, max_seqlen_k = _resolve_max_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = _past_end_rows(cu_seqlens_q)(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=_lse_dtype(q), device=q.device)
    flash_attn_forward_into(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, window_left, window_right, softcap=softcap, alibi_slopes=alibi_slopes,
                            dropout_p=dropout_p, dropout_seed=dropout_seed)
    if cu_seqlens_q is not None:
        _clear_past_end(cu_seqlens_q, (out, 0, 0.0), (lse, 1, math.inf))
    return out, lse


# The op wraps the plain function, kept under its own name for eager calls that skip the dispatch
# (see _util.call), as the backward and KV-cache ops below.
_flash_attn = torch.library.custom_op("pyllm::flash_attn", mutates_args=())(_flash_attn_body)


@_flash_attn.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
      deterministic, softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=_lse_dtype(q))
    return out, lse


def _flash_attn_backward_body(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int,
                         window_right: int, deterministic: bool, softcap: float = 0.0,
                         alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0,
                         dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    dout, out, lse = _last_dim_contiguous(dout.contiguous()), out.contiguous(), lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    max_seqlen_q, max_seqlen_k = _resolve_max_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq = _past_end_rows(cu_seqlens_q)(q.shape, dtype=q.dtype, device=q.device)
    dk = _past_end_rows(cu_seqlens_k)(k.shape, dtype=k.dtype, device=k.device)
    dv = _past_end_rows(cu_seqlens_k)(v.shape, dtype=v.dtype, device=v.device)
    flash_attn_backward_into(dout, dlse, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, softmax_scale, window_left, window_right, deterministic, softcap=softcap,
                             alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_seed=dropout_seed)
    if cu_seqlens_q is not None:
        _clear_past_end(cu_seqlens_q, (dq, 0, 0.0))
        _clear_past_end(cu_seqlens_k, (dk, 0, 0.0), (dv, 0, 0.0))
    return dq, dk, dv


_flash_attn_backward = torch.library.custom_op("pyllm::flash_attn_backward", mutates_args=())(
    _flash_attn_backward_body)


@_flash_attn_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, deterministic, softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# vmap: padded batches (no cu_seqlens) fold the vmapped dim into B, with ALiBi slopes shared by the
# batch ((H,)); varlen, per-batch or vmapped slopes run per example. So does dropout under vmap's
# randomness="same": every example draws one call's mask, where folded ones would each draw other
# sequences' ("different" draws a seed per example, vmapped: per example too).
def _flash_attn_vmap(tensors: tuple, alibi_at: int):
    def rule(op, info, in_dims, *args):
        alibi = args[alibi_at] if len(args) > alibi_at else None
        dropout = len(args) > alibi_at + 1 and args[alibi_at + 1]
        others = [d for i, d in enumerate(in_dims) if i not in tensors]
        if any(d is not None for d in others) or any(a is not None for a in args[tensors[-1] + 1:tensors[-1] + 3]) \
                or (alibi is not None and alibi.dim() != 1) or (dropout and info.randomness == "same"):
            return _util.vmap_loop(op, info, in_dims, *args)
        return _util.vmap_folded(op, info, in_dims, args, tensors)
    return rule


# forward: q, k, v (0-2), then cu_seqlens_q / _k; backward: dout, dlse, q, k, v, out, lse (0-6), then those
_util.batching_rule(_flash_attn, _flash_attn_vmap((0, 1, 2), 12))
_util.batching_rule(_flash_attn_backward, _flash_attn_vmap((0, 1, 2, 3, 4, 5, 6), 16))


# DTensor: q, k, v (B, T, H, D) sharded on their batch or their heads (tensor parallelism: each rank
# its heads, q's and k / v's split evenly so that a GQA group stays on one rank); varlen (total, H,
# D) on its heads only. Never on the positions: every query sees every key (context parallelism
# is not this). lse (B, H, T) or (H, total) and ALiBi's slopes ((H,) or (B, H)) follow. With dropout
# the inputs are gathered: a shard's kernel counts its sequences and heads from 0, so ranks with one
# seed would drop the same elements of different heads (or sequences), not the whole call's mask.
def _attention_placements(q, k, cu_seqlens_q, alibi_slopes, dropout_p=0.0) -> list:
    """[(q / k / v / out's placement, lse's, the slopes')] the op computes locally."""
    Shard, Replicate, _ = _util.shard_placements()
    varlen = cu_seqlens_q is not None
    slopes = lambda per_head, per_batch: None if alibi_slopes is None else (
        per_batch if alibi_slopes.ndim == 2 else per_head)
    rules = [(Replicate(), Replicate(), slopes(Replicate(), Replicate()))]
    if dropout_p:
        return rules
    heads = 1 if varlen else 2
    if _util.sharded_evenly(q, heads) and _util.sharded_evenly(k, heads):
        rules.append((Shard(heads), Shard(0 if varlen else 1), slopes(Shard(0), Shard(1))))
    if not varlen:
        rules.append((Shard(0), Shard(0), slopes(Replicate(), Shard(0))))
    return rules


@_util.sharding_rule(_flash_attn)
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
      deterministic, softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    Shard, Replicate, _ = _util.shard_placements()
    cu = None if cu_seqlens_q is None else Replicate()
    seed = None if dropout_seed is None else Replicate()
    return [([qkv, lse], [qkv, qkv, qkv, cu, cu] + [None] * 7 + [slopes, None, seed])
            for qkv, lse, slopes in _attention_placements(q, k, cu_seqlens_q, alibi_slopes, dropout_p)]


@_util.sharding_rule(_flash_attn_backward)
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, deterministic, softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    Shard, Replicate, _ = _util.shard_placements()
    cu = None if cu_seqlens_q is None else Replicate()
    seed = None if dropout_seed is None else Replicate()
    return [([qkv] * 3, [qkv, None if dlse is None else lse_place, qkv, qkv, qkv, qkv, lse_place, cu, cu]
             + [None] * 7 + [slopes, None, seed])
            for qkv, lse_place, slopes in _attention_placements(q, k, cu_seqlens_q, alibi_slopes, dropout_p)]


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, deterministic = inputs[:11]
    softcap = inputs[11] if len(inputs) > 11 else 0.0
    alibi_slopes = inputs[12] if len(inputs) > 12 else None
    dropout_p = inputs[13] if len(inputs) > 13 else 0.0
    dropout_seed = inputs[14] if len(inputs) > 14 else None
    if alibi_slopes is not None and alibi_slopes.is_inference():  # made under inference_mode: not savable
        alibi_slopes = alibi_slopes.clone()
    if dropout_seed is not None and dropout_seed.is_inference():
        dropout_seed = dropout_seed.clone()
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed)
    ctx.args = (max_seqlen_q, max_seqlen_k, scale, left, right, deterministic, softcap)
    ctx.dropout_p = dropout_p
    ctx.n_inputs = len(inputs)


def _flash_attn_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed = ctx.saved_tensors
    dropout = (ctx.dropout_p, dropout_seed) if ctx.dropout_p else ()
    dq, dk, dv = _util.call(_flash_attn_backward_body, torch.ops.pyllm.flash_attn_backward, None, dout, dlse, q, k,
                            v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, alibi_slopes, *dropout)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


_flash_attn.register_autograd(_flash_attn_grad, setup_context=_flash_attn_setup)


_FlashAttnFunction = _util.eager_function("flash_attn", _flash_attn_body, _flash_attn_setup, _flash_attn_grad)


def _check_cache_layout(k_cache: Tensor, v_cache: Tensor) -> None:
    # Before anything is written: a bad call leaves the caches as they were.
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("flash_attn_with_kvcache: k_cache and v_cache need a contiguous last dim (they are written in place)")


def _check_cache_lengths(lengths: list[int], n_new: int, capacity: int, shown=None) -> None:
    """Each cache length known on the host, plus the new tokens, inside the cache (shown: what the
    message names as cache_seqlens, the list by default)."""
    if any(n < 0 or n + n_new > capacity for n in lengths):
        raise ValueError(f"flash_attn_with_kvcache: cache_seqlens + new tokens ({n_new}) must lie in "
                         f"[0, {capacity}] (the cache's capacity), got cache_seqlens {lengths if shown is None else shown}")


def _cache_capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    """Keys a sequence's cache holds: its row's length, or a paged cache's blocks per sequence times
    the block size."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def _check_cache_options(op: str, q: Tensor, k_cache: Tensor, cache_batch_idx, cache_leftpad, block_table) -> None:
    """A public call's cache_batch_idx / cache_leftpad (int32 (batch,)) and block_table (int32 (batch,
    blocks per sequence)): types, shapes and devices. Their values are read on the host in the body
    (for CUDA tensors, only with PYLLM_ATTN_CHECK_SEQLENS=1, as cache_seqlens: the kernels clamp them)."""
    batch = q.shape[0]
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad),
                    ("block_table", block_table)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be an int32 tensor or None, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
        want = "(batch, blocks per sequence)" if name == "block_table" else "(batch,)"
        if t.dim() != (2 if name == "block_table" else 1) or t.shape[0] != batch or t.device != q.device:
            raise ValueError(f"{op}: {name} must be {want} with batch {batch} on {q.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError(f"{op}: a paged cache (block_table) takes no cache_batch_idx: its table already says "
                         "where each sequence's keys are")
    if cache_batch_idx is None and block_table is None and k_cache.shape[0] != batch:
        raise ValueError(f"{op}: q and k_cache must have the same batch size, got {batch} and {k_cache.shape[0]} "
                         "(cache_batch_idx picks rows of a larger cache)")
    if (block_table is not None or cache_batch_idx is not None) and k_cache.shape[0] == 0 and batch:
        raise ValueError(f"{op}: k_cache has no {'blocks' if block_table is not None else 'rows'} for the sequences "
                         f"to be in (shape {tuple(k_cache.shape)})")
    if block_table is not None and (block_table.shape[1] == 0 or k_cache.shape[1] == 0):
        raise ValueError(f"{op}: a paged cache needs at least one block per sequence (block_table's columns) of at "
                         f"least one position (k_cache.shape[1]), got {block_table.shape[1]} and {k_cache.shape[1]}")


def _cache_layout_args(k_cache: Tensor, cache_batch_idx, cache_leftpad, block_table) -> dict:
    """The launchers' KV-cache layout arguments (addresses, block size, the cache's rows or blocks)
    and seqlen_k, the capacity a sequence addresses. "_keep" holds the tensors whose addresses they
    are, to be kept until the call returns."""
    args = {"seqlen_k": _cache_capacity(k_cache, block_table), "kv_rows": k_cache.shape[0]}
    keep = []
    for name, t in (("kv_batch_idx", cache_batch_idx), ("kv_leftpad", cache_leftpad), ("block_table", block_table)):
        if t is not None:
            t = t.contiguous()
            keep.append(t)
            args[name] = _util.ptr(t)
    if block_table is not None:
        args.update(block_table_stride=block_table.shape[1], page_size=k_cache.shape[1])
    args["_keep"] = keep
    return args


def _cache_option_args(k_cache: Tensor, lengths: list[int], n_new: int, cache_batch_idx, cache_leftpad,
                       block_table) -> dict:
    """The options' values checked on the host (before anything is appended; the CPU launcher checks
    them again), then _cache_layout_args. lengths: cache_seqlens, checked already."""
    op = "flash_attn_with_kvcache"
    host = lambda t: None if t is None else t.cpu()  # a sync for CUDA tensors: only where lengths are checked
    rows, pads, table = host(cache_batch_idx), host(cache_leftpad), host(block_table)
    if rows is not None and any(not 0 <= r < k_cache.shape[0] for r in rows.tolist()):
        raise ValueError(f"{op}: cache_batch_idx must lie in [0, {k_cache.shape[0]}) (k_cache's batch rows), "
                         f"got {rows.tolist()}")
    if pads is not None and any(not 0 <= pad <= n for pad, n in zip(pads.tolist(), lengths)):
        raise ValueError(f"{op}: cache_leftpad must lie in [0, cache_seqlens] for each sequence, got {pads.tolist()} "
                         f"with cache_seqlens {lengths}")
    if table is not None:
        # The blocks that hold each sequence's keys, at once (a table of B x 128 blocks in a Python
        # loop took 0.13 ms of a 0.17 ms decode step, B = 4, cache 2,048, blocks of 16).
        page = k_cache.shape[1]
        table = table.numpy()
        first = np.zeros(len(lengths), np.int64) if pads is None else pads.numpy().astype(np.int64) // page
        ends = (np.asarray(lengths, np.int64) + n_new + page - 1) // page
        cols = np.arange(table.shape[1])
        bad = (cols >= first[:, None]) & (cols < ends[:, None]) & ((table < 0) | (table >= k_cache.shape[0]))
        if bad.any():
            b = int(bad.any(axis=1).argmax())
            raise ValueError(f"{op}: block_table[{b}] must name blocks in [0, {k_cache.shape[0]}) (k_cache's "
                             f"blocks) for its {lengths[b] + n_new} keys, got {table[b, first[b]:ends[b]].tolist()}")
    return _cache_layout_args(k_cache, cache_batch_idx, cache_leftpad, block_table)


def _append_kv_clamped(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor,
                       cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor]) -> None:
    """The append where the lengths and indices were not read on the host (CUDA): one indexed write
    per cache, every index clamped into the cache (the identity for valid ones; cache_seqlens
    clamped to [0, capacity - n_new] already)."""
    batch, n_new = k_new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(n_new, device=k_new.device)  # (B, n_new) cache positions
    if block_table is not None:
        page = k_cache.shape[1]
        rows = block_table.long().gather(1, (pos // page).clamp_max(block_table.shape[1] - 1))
        rows, pos = rows.clamp(0, k_cache.shape[0] - 1), pos % page
    elif cache_batch_idx is not None:
        rows = cache_batch_idx.long().clamp(0, k_cache.shape[0] - 1)[:, None].expand(batch, n_new)
    else:
        rows = torch.arange(batch, device=k_new.device)[:, None].expand(batch, n_new)
    k_cache[rows, pos] = k_new
    v_cache[rows, pos] = v_new


def _append_kv_where(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, lengths: list[int],
                     cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor]) -> None:
    """cache positions n_b .. n_b + n_new of sequence b = new[b], where the options put them: batch
    row cache_batch_idx[b] (row b without), or the blocks of block_table[b], the indices checked
    already: one indexed write per cache (_append_kv_clamped's, whose clamps are the identity here; a
    copy per row took 218 us for 32 rows, generate_batch's decode step in every layer, this 15, 2-core
    EPYC, 2026-12-03), or where index_put refuses (a new row that is a view of its cache at all) a
    copy per row or block touched: copy_ takes disjoint views and raises for the rest."""
    try:
        _append_kv_clamped(k_cache, v_cache, k_new, v_new, torch.tensor(lengths, device=k_cache.device),
                           cache_batch_idx, block_table)
        return
    except RuntimeError:
        pass
    n_new = k_new.shape[1]
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else range(len(lengths))
    tables = block_table.tolist() if block_table is not None else None
    page = k_cache.shape[1]
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        for b, n in enumerate(lengths):
            if tables is None:
                cache[rows[b], n:n + n_new].copy_(new[b])
                continue
            t = n
            while t < n + n_new:
                step = min(page - t % page, n + n_new - t)
                cache[tables[b][t // page], t % page:t % page + step].copy_(new[b, t - n:t - n + step])
                t += step


def _flash_attn_with_kvcache_body(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                             k_new: Optional[Tensor], v_new: Optional[Tensor], softmax_scale: float,
                             window_left: int, window_right: int, softcap: float = 0.0,
                             sinks: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                             cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                             block_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    op = "flash_attn_with_kvcache"
    if alibi_slopes is not None:  # the op called directly: slopes a launch cannot read, refused before the append
        _alibi_args(alibi_slopes, q.shape[2], q.shape[0], q)
    # The op called directly: the layouts' dtypes and shapes, whose addresses the kernel reads as int32
    _check_cache_options(op, q, k_cache, cache_batch_idx, cache_leftpad, block_table)
    _check_cache_layout(k_cache, v_cache)
    n_new = 0 if k_new is None else k_new.shape[1]
    capacity = _cache_capacity(k_cache, block_table)
    lengths = None
    if _check_seqlens_on_host(cache_seqlens):
        lengths = cache_seqlens.tolist()  # a sync for CUDA tensors: only when asked for
        _check_cache_lengths(lengths, n_new, capacity)
    if lengths is not None and not q.is_cuda:
        # CPU fast path (decode steps are short: the general path below cost ~0.1 ms of Python and
        # tensor ops per call, about the kernel's own time at cache 512): the lengths are known and
        # valid, so no clamp, and the append is one slice copy per sequence.
        options = keep = None
        if cache_batch_idx is not None or cache_leftpad is not None or block_table is not None:
            options = _cache_option_args(k_cache, lengths, n_new, cache_batch_idx, cache_leftpad, block_table)
            keep = options.pop("_keep")  # alive until the kernel has read them
        if n_new:
            _append_kv_where(k_cache, v_cache, k_new, v_new, lengths, cache_batch_idx, block_table)
            seqused_k = torch.tensor([n + n_new for n in lengths], dtype=torch.int32)
        else:
            seqused_k = cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()
        q = _last_dim_contiguous(q)
        out = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(_lse_shape(q, False), dtype=_lse_dtype(q))
        flash_attn_forward_into(q, k_cache, v_cache, out, lse, None, None, q.shape[1], capacity, softmax_scale,
                                window_left, window_right, seqused_k=seqused_k, softcap=softcap,
                                alibi_slopes=alibi_slopes, cache_options=options)
        del keep
        return (out, lse) if sinks is None else _with_sinks(out, lse, sinks, False)
    # CUDA: the cache layouts' values checked on the host only where the lengths are (a sync).
    options = None
    if cache_batch_idx is not None or cache_leftpad is not None or block_table is not None:
        options = (_cache_option_args(k_cache, lengths, n_new, cache_batch_idx, cache_leftpad, block_table)
                   if lengths is not None else _cache_layout_args(k_cache, cache_batch_idx, cache_leftpad, block_table))
    # Unchecked (CUDA), lengths are clamped so that the append and the kernel stay inside the cache:
    # the identity for valid lengths.
    cache_seqlens = cache_seqlens.clamp(0, capacity - n_new)
    if n_new:
        _append_kv_clamped(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_batch_idx, block_table)
    return _attend_cache(q, k_cache, v_cache, (cache_seqlens + n_new).to(torch.int32), softmax_scale, window_left,
                         window_right, softcap, sinks, alibi_slopes, options)


def _attend_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqused_k: Tensor, softmax_scale: float,
                  window_left: int, window_right: int, softcap: float = 0.0, sinks: Optional[Tensor] = None,
                  alibi_slopes: Optional[Tensor] = None, cache_options: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """Attention of q over each cache's first seqused_k[b] (int32, valid) keys: the split-KV decode
    kernel on the GPU, the forward kernel on the CPU (softcap, alibi_slopes: checked before).
    cache_options: _cache_layout_args' (the cache layouts). Returns (out, lse)."""
    layout = dict(cache_options or {})
    keep = layout.pop("_keep", None)  # alive until the launch has taken their addresses
    capacity = layout.pop("seqlen_k", k_cache.shape[1])
    q = _last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, False), dtype=_lse_dtype(q), device=q.device)
    if q.is_cuda:
        # The split-KV partials, from torch's caching allocator (no driver call per decode step).
        workspace = torch.empty(_C.flash_attn_decode_workspace_cuda(q.shape[0], q.shape[1], capacity, q.shape[2],
                                                                    q.shape[3], q.device.index),
                                dtype=torch.uint8, device=q.device)
        _C.flash_attn_decode_cuda(_util.ptr(q), _util.ptr(k_cache), _util.ptr(v_cache), _util.ptr(out),
                                  _util.ptr(lse), _util.ptr(seqused_k), q.shape[0], q.shape[1], capacity,
                                  q.shape[2], k_cache.shape[2], q.shape[3], _strides3(q, False),
                                  _strides3(k_cache, False), _strides3(v_cache, False), _strides3(out, False),
                                  _lse_strides(lse, False), float(softmax_scale), window_left, window_right,
                                  _util.dtype_code(q), q.device.index, _util.stream_of(q), _opt_ptr(workspace),
                                  workspace.numel(), **layout, softcap=float(softcap),
                                  **_alibi_args(alibi_slopes, q.shape[2], q.shape[0], q))
    else:
        flash_attn_forward_into(q, k_cache, v_cache, out, lse, None, None, q.shape[1], capacity, softmax_scale,
                                window_left, window_right, seqused_k=seqused_k, softcap=softcap,
                                alibi_slopes=alibi_slopes, cache_options={**layout, "seqlen_k": capacity})
    del keep
    return (out, lse) if sinks is None else _with_sinks(out, lse, sinks, False)


# As _flash_attn: the op wraps the plain function, which eager CPU calls run themselves.
_flash_attn_with_kvcache = torch.library.custom_op("pyllm::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))(
    _flash_attn_with_kvcache_body)


class _KVCacheNoBackward(torch.autograd.Function):
    """The op's body for eager calls with an input that needs grad: the forward runs as without it
    (an eval or generation step outside no_grad works, as flash-attn's does); a backward through it
    says that there is none, where torch's generic "no autograd formula was registered" named no
    way out."""

    @staticmethod
    def forward(ctx, *args):
        return _flash_attn_with_kvcache_body(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("flash_attn_with_kvcache has no backward (flash-attn's returns an output without "
                                  "one, so a gradient through it is lost there silently): it is for inference "
                                  "with a KV cache; for training call pyllm.flash_attn (causal=True, cu_seqlens for "
                                  "packed sequences), or run the cache step under torch.no_grad()")


@_flash_attn_with_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, window_left, window_right, softcap=0.0,
      sinks=None, alibi_slopes=None, cache_batch_idx=None, cache_leftpad=None, block_table=None):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, False), dtype=_lse_dtype(q))


def _kvcache_with_int_length(q, k_cache, v_cache, length: int, k_new, v_new, softmax_scale: float, window_left: int,
                             window_right: int, softcap: float = 0.0, sinks: Optional[Tensor] = None,
                             alibi_slopes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The op's body for eager calls whose cache length is one int for every sequence (the model's
    decode step; CPU calls the shortcut below declines): known on the host, it is checked there
    (no sync), the append is one slice copy per cache and the lengths one fill, so on the GPU 4
    kernel launches where the body's clamped index_put path takes about 12 (its lengths are a
    device tensor that cannot be read without a sync). The same kernel arguments: the same bits."""
    _check_cache_layout(k_cache, v_cache)
    n_new = 0 if k_new is None else k_new.shape[1]
    _check_cache_lengths([length], n_new, k_cache.shape[1], shown=length)
    if n_new:
        _append_kv(k_cache, v_cache, k_new, v_new, None, length)
    seqused_k = torch.full((q.shape[0],), length + n_new, dtype=torch.int32, device=q.device)
    return _attend_cache(q, k_cache, v_cache, seqused_k, softmax_scale, window_left, window_right, softcap, sinks,
                         alibi_slopes)


# --- eager CPU decode: the kernel called directly ----------------------------------------------
#
# A decode step is one token per sequence: at cache 512 the CPU kernel takes ~60 us, and the general
# path below spent 31-33 us of Python around it (tensor cache_seqlens) or 66-79 us (an int and one
# new token, as the model calls it): checks that build torch.device objects and stride lists, a
# torch.full for the int, torch allocations and indexed copies at 1.5-5 us of dispatch each
# (CPU time per call, B = 1, H = 8, D = 64, 2-core Xeon VM, Nov 2026; bench_attention.py
# --overhead-only). Generation calls it once per layer per token, so plain eager CPU calls take
# the shortcut below instead: one pass of cheap checks on attributes read once, then the kernel:
# 8.5 us and 18 us. Whatever it does not accept (a failed check, a subclass, autograd, tracing,
# CUDA, an odd layout) goes the general way, unchanged, which raises the clear errors: the
# shortcut only ever accepts or declines, so the messages stay those of the general path.

# dtype -> (the kernel's dtype code, array typecode of the LSE scratch: fp32, fp64 for fp64 inputs
# as in _lse_dtype).
_EAGER_CPU_DTYPES = {torch.float32: (_util.DTYPE_CODES[torch.float32], "f"),
                     torch.bfloat16: (_util.DTYPE_CODES[torch.bfloat16], "f"),
                     torch.float64: (_util.DTYPE_CODES[torch.float64], "d")}
# The kernel reads seqused_k as int32 and writes the LSE through plain host pointers: small Python
# arrays serve (0.3 us each, vs 1.5-6 us for a torch.tensor / torch.empty). "i" is int32 on every
# platform torch supports; where not, the shortcut is off.
_INT32_ARRAY = "i" if array("i").itemsize == 4 else None
_DEFAULT_SCALES = {d: 1.0 / math.sqrt(d) for d in HEAD_DIMS}
_NO_WINDOW = (-1, -1)


def _append_kv(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, lengths: Optional[list[int]],
               start: int) -> None:
    """cache[b, n_b:n_b + n_new] = new[b] for k, then v, n_b = lengths[b] (start for every b when
    lengths is None), the lengths already checked to lie in [0, capacity - n_new]. torch's in-place
    writes keep its own checks (overlap, inference tensors) and bump the caches' version counters."""
    if lengths is not None:  # one indexed write per cache (_append_kv_where, no layout)
        _append_kv_where(k_cache, v_cache, k_new, v_new, lengths, None, None)
        return
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        cache.narrow(1, start, k_new.shape[1]).copy_(new)  # 6.6 us for both; the indexed copies ~12


def _kvcache_eager_cpu(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale,
                       window, softcap=0.0, alibi_slopes=None, cache_batch_idx=None, cache_leftpad=None,
                       block_table=None) -> Optional[Tensor]:
    """flash_attn_with_kvcache for plain eager CPU calls, or None where the general path must run.
    Same kernel arguments as the general path, so the same bits (tests/test_flash_attn.py). The
    cache layouts too: a paged decode step (B = 4, cache 2,048, blocks of 16) spent 35 us of Python
    around a 164 us kernel on the general path."""
    # Tracing first: under torch.compile nothing below runs, the op is traced as before.
    if not _util.eager_plain_cpu(q, k_cache, v_cache) or _INT32_ARRAY is None:
        return None
    if softcap and (type(softcap) not in (int, float) or not 0 < softcap < math.inf):
        return None
    dtype = q.dtype
    facts = _EAGER_CPU_DTYPES.get(dtype)
    if facts is None or k_cache.dtype is not dtype or v_cache.dtype is not dtype:
        return None
    code, lse_typecode = facts
    q_shape, cache_shape = q.shape, k_cache.shape
    if len(q_shape) != 4 or len(cache_shape) != 4 or v_cache.shape != cache_shape:
        return None
    batch, seqlen_q, n_heads, head_dim = q_shape
    _, capacity, n_kv_heads, _ = cache_shape
    layouts = cache_batch_idx is not None or cache_leftpad is not None or block_table is not None
    if layouts:
        for t, dims in ((cache_batch_idx, (batch,)), (cache_leftpad, (batch,)), (block_table, None)):
            if t is not None and (not _util.plain_cpu(t) or t.dtype is not torch.int32 or not t.is_contiguous()
                                  or (dims is not None and t.shape != dims)):
                return None
        if block_table is not None:
            if (block_table.dim() != 2 or block_table.shape[0] != batch or not block_table.shape[1]
                    or cache_batch_idx is not None or not capacity):  # (capacity: the block size here)
                return None
            capacity *= block_table.shape[1]
        if (block_table is not None or cache_batch_idx is not None) and not cache_shape[0]:
            return None
    if ((cache_shape[0] != batch and cache_batch_idx is None and block_table is None) or cache_shape[3] != head_dim
            or head_dim not in _DEFAULT_SCALES or n_kv_heads == 0 or n_heads % n_kv_heads):
        return None
    alibi = {}
    if alibi_slopes is not None:  # an ALiBi model's decode step: its (H,) fp32 slopes, finite (read: ~1 us)
        if (not _util.plain_cpu(alibi_slopes) or alibi_slopes.dtype is not torch.float32
                or alibi_slopes.shape not in ((n_heads,), (batch, n_heads)) or not alibi_slopes.is_contiguous()
                or not all(map(math.isfinite, alibi_slopes.view(-1).tolist()))):
            return None
        alibi = _alibi_args(alibi_slopes, n_heads, batch, q)
    q_strides, k_strides, v_strides = q.stride(), k_cache.stride(), v_cache.stride()
    if q_strides[3] != 1 or k_strides[3] != 1 or v_strides[3] != 1:
        return None
    n_new = 0
    if k_new is not None or v_new is not None:
        if not (_util.plain_cpu(k_new) and _util.plain_cpu(v_new)) or k_new.dtype is not dtype or v_new.dtype is not dtype:
            return None
        if 0 in k_cache.stride() or 0 in v_cache.stride() or k_cache.data_ptr() == v_cache.data_ptr():
            return None  # caches that may share memory: the general path checks them (_check_writable_caches)
        new_shape = k_new.shape
        if (len(new_shape) != 4 or v_new.shape != new_shape or new_shape[0] != batch or new_shape[2] != n_kv_heads
                or new_shape[3] != head_dim):
            return None
        n_new = new_shape[1]
    limit = capacity - n_new
    if type(cache_seqlens) is int:
        lengths, start = None, cache_seqlens
        if not 0 <= start <= limit:
            return None
    elif (type(cache_seqlens) is Tensor and cache_seqlens.dtype is torch.int32 and cache_seqlens.is_cpu
          and cache_seqlens.layout is torch.strided and cache_seqlens.shape == (batch,)):
        lengths, start = cache_seqlens.tolist(), 0
        for n in lengths:
            if not 0 <= n <= limit:
                return None
    else:
        return None
    left, right = _NO_WINDOW if window is _NO_WINDOW else _check_window("flash_attn_with_kvcache", window)
    if causal:
        right = 0
    scale = _DEFAULT_SCALES[head_dim] if softmax_scale is None else _resolve_scale(
        "flash_attn_with_kvcache", softmax_scale, head_dim)
    options = {}
    if layouts:
        try:  # the indices against the cache: a bad one is the general path's to report
            options = _cache_option_args(k_cache, [start] * batch if lengths is None else lengths, n_new,
                                         cache_batch_idx, cache_leftpad, block_table)
        except ValueError:
            return None
        # the tensors are contiguous already (the caller's own, alive through the call); the capacity is known
        del options["_keep"], options["seqlen_k"]
    # Checked: from here on the call succeeds (the C++ side re-checks what it is given).
    if n_new:
        if layouts:
            _append_kv_where(k_cache, v_cache, k_new, v_new, [start] * batch if lengths is None else lengths,
                             cache_batch_idx, block_table)
        else:
            _append_kv(k_cache, v_cache, k_new, v_new, lengths, start)  # (an int start: one slice copy)
    if lengths is None:
        seqused_k = array(_INT32_ARRAY, (start + n_new,)) * batch
    else:
        seqused_k = array(_INT32_ARRAY, [n + n_new for n in lengths])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # 1.2 us; torch.empty(q.shape) 2.9 us
    lse = array(lse_typecode, (0.0,)) * (batch * n_heads * seqlen_q)  # (B, H, Tq), not returned
    _util.init_cpu_threads()
    _C.flash_attn_fwd_cpu(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), lse.buffer_info()[0],
                          0, 0, seqused_k.buffer_info()[0], batch, seqlen_q, capacity, n_heads, n_kv_heads, head_dim,
                          q_strides[:3], k_strides[:3], v_strides[:3], out.stride()[:3],
                          (n_heads * seqlen_q, seqlen_q), scale, left, right, code, softcap=float(softcap), **alibi,
                          **options)
    return out


# --- public API -------------------------------------------------------------------------------

def _resolve_scale(op: str, softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not _util.finite_number(softmax_scale):
        raise TypeError(f"{op}: softmax_scale must be a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_max_seqlen(op: str, name: str, value) -> int:
    if value is None:
        return -1
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = value.item()  # a 0-d tensor, as some callers keep it (flash-attn's binding reads it too)
    number = _as_int(value)
    if number is None or number < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int or None, got {value!r}")
    return number


# Overloads: the return type follows return_lse, so that type checkers see a Tensor where one is returned.
@overload
def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
               window: tuple[int, int] = (-1, -1), cu_seqlens_q: Optional[Tensor] = None,
               cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
               max_seqlen_k: Optional[int] = None, return_lse: Literal[False] = False, deterministic: bool = False,
               softcap: float = 0.0, sinks: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
               dropout_p: float = 0.0) -> Tensor: ...


@overload
def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
               window: tuple[int, int] = (-1, -1), cu_seqlens_q: Optional[Tensor] = None,
               cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
               max_seqlen_k: Optional[int] = None, return_lse: Literal[True], deterministic: bool = False,
               softcap: float = 0.0, sinks: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
               dropout_p: float = 0.0) -> tuple[Tensor, Tensor]: ...


@overload
def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
               window: tuple[int, int] = (-1, -1), cu_seqlens_q: Optional[Tensor] = None,
               cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
               max_seqlen_k: Optional[int] = None, return_lse: bool = False, deterministic: bool = False,
               softcap: float = 0.0, sinks: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
               dropout_p: float = 0.0) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
               window: tuple[int, int] = (-1, -1), cu_seqlens_q: Optional[Tensor] = None,
               cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
               max_seqlen_k: Optional[int] = None, return_lse: bool = False, deterministic: bool = False,
               softcap: float = 0.0, sinks: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
               dropout_p: float = 0.0) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact attention softmax(q k^T * scale) v, tiled (FlashAttention-2), differentiable.

    Args:
        q: (batch, seqlen_q, n_heads, head_dim); k, v: (batch, seqlen_k, n_kv_heads, head_dim), with
            n_heads a multiple of n_kv_heads (GQA; MQA for n_kv_heads = 1). Any batch / token /
            head strides (e.g. views of a packed qkv tensor); a non-unit last-dim stride is copied.
            Varlen: q (total_q, n_heads, head_dim), k and v (total_k, n_kv_heads, head_dim) holding
            the sequences back to back, with cu_seqlens_q / cu_seqlens_k int32 (batch + 1,)
            cumulative lengths (sequence b is rows cu[b]:cu[b+1]; empty sequences allowed). Rows
            past cu[-1] (a packed tensor padded to a fixed size, as flash-attn takes) are in no
            sequence: their output is 0, their LSE +inf and their gradients 0.
            head_dim: 1 to 256; the kernels' are 32, 64, 96, 128 and 256, and the others (Phi-2's 80,
            flash-attn's any up to 256) run zero-padded to the next of these (exact: a zero column adds
            0 to every score), at its cost. Dtypes: CPU float32, bfloat16, float64 (math in fp32, fp64
            for fp64), and float16 run in fp32 and rounded once; CUDA float16, bfloat16 (sm80+, fp32
            accumulation).
        causal: mask keys after the query. When seqlen_q != seqlen_k the mask is aligned to the
            bottom-right corner, as in flash-attn >= 2.1: query i sits at key position
            i + seqlen_k - seqlen_q (the last query sees every key). Queries that see no key (more
            queries than keys) output 0.
        softmax_scale: defaults to 1 / sqrt(head_dim).
        window: (left, right) sliding window, -1 (any negative) = unlimited: query i (at key
            position p = i + seqlen_k - seqlen_q) sees keys p - left .. p + right. causal sets right = 0.
        max_seqlen_q, max_seqlen_k: varlen only; computed from cu_seqlens when None.
            Where cu_seqlens' contents (starts at 0, non-decreasing, ends at most at the token
            count, no sequence longer than max_seqlen) are checked: always for CPU tensors; for CUDA
            tensors only when a max_seqlen is None (the launch needs the maximum, which costs a
            device sync) or when the environment variable PYLLM_ATTN_CHECK_SEQLENS=1 is set.
            Otherwise the call does not sync (CUDA-graph capturable) and the kernels clamp
            cu_seqlens to the tensors' sizes: bad contents give wrong results but never read or
            write out of bounds. dtype (int32), shape and device are always checked.
        return_lse: also return the log-sum-exp of the scaled scores, fp32 (fp64 for fp64
            inputs), shape (batch, n_heads, seqlen_q), or (n_heads, total_q) for varlen;
            +inf for queries that see no key. It is differentiable too.
        deterministic: bitwise-repeatable gradients. Both backwards (CPU and CUDA) are, by
            default: every gradient element has one owner that sums in a fixed order (no
            atomics). The CUDA backward runs on tensor cores; PYLLM_ATTN_BWD=simt selects the
            fp32 SIMT reference kernels instead (for testing). PYLLM_ATTN_BWD=atomic (an
            experiment, unverified on a GPU: head dims 64 / 128 on sm_90) adds dq up with fp32
            atomics, as flash-attn does, when deterministic is False: not bitwise repeatable.
        softcap: > 0 caps the scaled scores as softcap * tanh(s / softcap) before the mask and the
            softmax (Gemma 2's attn_logit_softcapping, flash-attn's softcap); the LSE is of the
            capped scores. On CUDA (fp16 / bf16) the tanh is tanhf, not flash-attn's tanh.approx
            (its ~2^-11 error, times the cap, moves the scores past bf16's own error): unverified
            on a GPU (2026-12-05); the calls with it take the default tiles, never the taller or
            atomic-dQ experiments.
        sinks: None, or a (n_heads,) float tensor on q's device: one learned logit per query head
            that joins every query's softmax as an extra key with a zero value (gpt-oss's
            attention sinks, transformers' s_aux): softmax([q k^T * scale, sink]) with the sink's
            column dropped. Differentiable in sinks too. The LSE then includes the sink (a query
            that sees no key gets lse = sink and out = 0). The output is the kernel's rescaled
            by torch ops (exp(lse - lse_with_sink)), so rounded once more in 16-bit dtypes.
        alibi_slopes: None, or float32 (n_heads,) or (batch, n_heads) (batch: the number of
            sequences for varlen): ALiBi (Press et al. 2022; BLOOM, MPT), as flash-attn's
            alibi_slopes: -slope * |i + seqlen_k - seqlen_q - j| is added to the score of query i
            and key j after the scale and the cap (the distance to the query's own position,
            bottom-right aligned as the mask), causal or not. The LSE includes the bias (flash-attn's
            causal kernels return it shifted by slope * (i + seqlen_k - seqlen_q): they add
            slope * j, the same softmax). Fixed: they take no gradient. On CUDA the slopes are
            read once per tensor (a device sync; again after an in-place change) to check that
            they are finite; the kernels are unverified on a GPU (2026-12-05), as softcap's.
        dropout_p: dropout on the attention probabilities (flash-attn's dropout_p; nanoGPT's and
            GPT-2's attn_dropout), in [0, 1): each probability is zeroed with chance dropout_p and
            the kept ones scaled by 1 / (1 - dropout_p), after the softmax's row sums (the LSE is of
            every key, as flash-attn's). Pass 0 outside training, as flash-attn wants. Each call
            draws a seed from torch's default CPU generator (torch.manual_seed repeats it, and so
            does activation checkpointing's saved RNG state); the kept elements are a pure function
            of (seed, sequence, head, query, key), the same on every kernel, thread count and device
            (`dropout_mask` gives them). The backward drops the same elements. Not inside a CUDA
            graph capture (NotImplementedError: each replay would drop the same elements).
    Returns:
        out, shaped like q (contiguous), or (out, lse) with return_lse.
    Raises:
        TypeError: non-tensor inputs, unsupported or mismatched dtypes, cu_seqlens not int32, bad
            window / softmax_scale types. ValueError: shapes (head dim past 256, n_heads not a
            multiple of n_kv_heads, k and v differ), devices, and, where checked (see
            max_seqlen_q), cu_seqlens not starting at 0, not non-decreasing, ending past the
            total number of tokens or longer than max_seqlen. RuntimeError: a CUDA tensor when
            pyllm was built without CUDA kernels.
    """
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError(f"{OP}: give both cu_seqlens_q and cu_seqlens_k (varlen) or neither")
    varlen = cu_seqlens_q is not None
    _check_qkv(OP, q, k, v, varlen)
    max_q, max_k = _check_max_seqlen(OP, "max_seqlen_q", max_seqlen_q), _check_max_seqlen(OP, "max_seqlen_k", max_seqlen_k)
    if varlen:
        _check_cu_seqlens(OP, q, cu_seqlens_q, cu_seqlens_k)
        # The kernels read cu_seqlens by pointer as a packed array: a strided view's other elements
        # had been read as the bounds (rows left unwritten, garbage out).
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        # No sequence is longer than the tokens packed: a larger max_seqlen only sized the work (2^40
        # ran for an hour; sys.maxsize overflowed it to nothing, garbage out)
        max_q, max_k = _util.sym_min(max_q, q.shape[0]), _util.sym_min(max_k, k.shape[0])
    elif max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError(f"{OP}: max_seqlen_q / max_seqlen_k are for varlen (with cu_seqlens) only")
    left, right = _check_window(OP, window)
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_lse", return_lse)):
        # a bool (numpy's too) or 0 / 1: a string had been truthy (causal="no" was causal)
        if not (isinstance(flag, (bool, np.bool_)) or isinstance(flag, int) and flag in (0, 1)):
            raise TypeError(f"{OP}: {name} must be a bool, got {flag!r}")
    if causal:
        right = 0
    scale = _resolve_scale(OP, softmax_scale, q.shape[-1])
    _check_softcap(OP, q, softcap)
    _check_sinks(OP, q, sinks)
    alibi_slopes = _check_alibi(OP, q, alibi_slopes, cu_seqlens_q.numel() - 1 if varlen else q.shape[0])
    dropout = _dropout_inputs(OP, dropout_p)
    like = q
    if _runs_widened(q):
        q, k, v = _widened(q), _widened(k), _widened(v)
    out, lse = _util.call(_flash_attn_body, _flash_attn, _FlashAttnFunction, q, k, v, cu_seqlens_q, cu_seqlens_k,
                          max_q, max_k, scale, left, right, bool(deterministic),
                          float(softcap), alibi_slopes, *dropout)
    if sinks is not None:  # (on the widened output: fp16 on the CPU rounded once, after)
        out, lse = _with_sinks(out, lse, sinks, varlen)
    if q is not like:
        out = _narrowed(out, like)
    return (out, lse) if return_lse else out


def _check_rotary(op: str, q: Tensor, k_new: Optional[Tensor], rotary_cos, rotary_sin, capacity: int) -> None:
    """flash-attn's rotary tables: (seqlen_ro, rotary_dim / 2) each, float, on q's device, rotary_dim
    at most head_dim, at least one row per cache position, given with the new keys they rotate."""
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"{op}: give both rotary_cos and rotary_sin or neither")
    if k_new is None:
        raise ValueError(f"{op}: rotary_cos / rotary_sin rotate the new keys (and q) before they are appended: "
                         "give k_new and v_new too (as flash-attn)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    if rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2:
        raise ValueError(f"{op}: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2), got "
                         f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    rotary_dim = 2 * rotary_cos.shape[1]
    if not 0 < rotary_dim <= q.shape[-1]:
        raise ValueError(f"{op}: rotary_dim (2 * rotary_cos.shape[1] = {rotary_dim}) must lie in [2, head_dim = "
                         f"{q.shape[-1]}]")
    if rotary_cos.shape[0] < capacity:
        raise ValueError(f"{op}: rotary_cos / rotary_sin need a row per cache position: {rotary_cos.shape[0]} rows "
                         f"for a capacity of {capacity}")


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x (B, T, H, D) rotated in its first rotary_dim = 2 * cos.shape[-1] dims by the angles whose
    cos / sin (B, T, rotary_dim / 2) are given: pyllm.rope's kernel, fp32 math (fp64 for fp64) and one
    rounding, as flash-attn's. Interleaved (GPT-J): pairs (0, 1), (2, 3), ...; else (GPT-NeoX,
    Llama's rotate-half): pairs (i, i + rotary_dim / 2). (In torch ops the rotation of one decode
    step, B = 4, took 68 us, more than half the attention's own time.)"""
    table = torch.float64 if x.dtype == torch.float64 else torch.float32
    return rope_ops.rope(x, cos.to(table), sin.to(table), interleaved=interleaved)


def _rotate_new(q: Tensor, k_new: Tensor, cache_seqlens, rotary_cos: Tensor, rotary_sin: Tensor, interleaved: bool,
                per_query: bool) -> tuple[Tensor, Tensor]:
    """q and k_new rotated at their cache positions, flash-attn's: new key j of sequence b at
    cache_seqlens[b] + j, query i there too (per_query) or every query at cache_seqlens[b]. The
    tables' rows by torch indexing, the rotations by pyllm.rope's kernel, on any device. Positions
    past the tables (bad unchecked CUDA lengths, which the append clamps too) take their last row."""
    device = q.device
    last = rotary_cos.shape[0] - 1
    tq, t_new = q.shape[1], k_new.shape[1]
    if isinstance(cache_seqlens, Tensor):
        base = cache_seqlens.long()[:, None]  # (B, 1)
    else:  # one length for every sequence: one row of positions, broadcast over the batch
        base = torch.full((1, 1), cache_seqlens, dtype=torch.long, device=device)
    k_pos = (base + torch.arange(t_new, device=device)).clamp(0, last)  # (B or 1, T_new)
    k_cos, k_sin = rotary_cos[k_pos], rotary_sin[k_pos]
    if per_query and tq == t_new:  # a decode step: the queries sit where the new keys do
        q_cos, q_sin = k_cos, k_sin
    else:
        q_pos = (base + (torch.arange(tq, device=device) if per_query else 0)).clamp(0, last)
        q_pos = q_pos.expand(base.shape[0], tq)  # (B or 1, Tq)
        q_cos, q_sin = rotary_cos[q_pos], rotary_sin[q_pos]
    return _rotate(q, q_cos, q_sin, interleaved), _rotate(k_new, k_cos, k_sin, interleaved)


def _kvcache_widened(q, k_cache, v_cache, cache_seqlens, k_new, v_new, capacity: int, scale: float, left: int,
                     right: int, softcap: float, sinks, alibi_slopes, cache_batch_idx, cache_leftpad, block_table,
                     return_lse: bool):
    """flash_attn_with_kvcache for the head dims between the kernels' and fp16 on the CPU (q, k_new
    rotated already): the call runs on widened copies of the caches (_widened), which it appends
    to as it checks; then the new tokens go into the caches themselves. The copy is the keys in use
    where the lengths are known on the host (an int, CPU tensors), else (CUDA lengths) and for a
    paged cache the whole cache, each call: the price of head dims and dtypes the kernels were not
    instantiated for (each would double the build's attention code)."""
    _check_cache_layout(k_cache, v_cache)
    n_new = 0 if k_new is None else k_new.shape[1]
    # the keys in use end at the longest sequence's, known on the host for an int or CPU lengths
    longest = None
    traced = _util.values_unreadable(q)  # (torch.export / make_fx: the lengths are not to be read)
    if isinstance(cache_seqlens, int):  # checked there, as the kernels' path does
        _check_cache_lengths([cache_seqlens], n_new, capacity, shown=cache_seqlens)
        longest = cache_seqlens
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    elif cache_seqlens.device.type == "cpu" and not traced:
        # checked against the whole cache here: the call below sees only its first `keys` rows
        _check_cache_lengths(cache_seqlens.tolist(), n_new, capacity)
        longest = int(cache_seqlens.max()) if cache_seqlens.numel() else 0
    # only those copied (bad lengths: the call says so); a paged cache's blocks are anywhere: all of them
    keys = capacity if block_table is not None or longest is None else min(max(longest + n_new, 0), capacity)
    out, lse = _util.call(_flash_attn_with_kvcache_body, _flash_attn_with_kvcache, _KVCacheNoBackward, _widened(q),
                          _widened(k_cache[:, :keys]), _widened(v_cache[:, :keys]), cache_seqlens, _widened(k_new),
                          _widened(v_new), scale, left, right, softcap, sinks, alibi_slopes, cache_batch_idx,
                          cache_leftpad, block_table)
    if n_new:  # checked by the call on the host where it reads the lengths, else clamped as it clamps them
        if cache_seqlens.device.type != "cpu" or traced:
            _append_kv_clamped(k_cache, v_cache, k_new, v_new, cache_seqlens.clamp(0, capacity - n_new),
                               cache_batch_idx, block_table)
        else:
            _append_kv_where(k_cache, v_cache, k_new, v_new, cache_seqlens.tolist(), cache_batch_idx, block_table)
    out = _narrowed(out, q)
    return (out, lse) if return_lse else out


def _check_writable_caches(op: str, k_cache: Tensor, v_cache: Tensor) -> None:
    """Caches the new keys and values are written into: no element reachable twice (an expanded
    batch: row 1's append landing in row 0's memory) and not one tensor for both (the values' append
    overwriting the keys'). Views into one buffer (kv[0], kv[1]) are fine; overlaps that take more
    than strides to find are left to the caller, as torch's in-place ops leave them."""
    if _util.symbolic(k_cache.shape[0]) or _util.values_unreadable(k_cache):
        return  # (fake tensors' data_ptr() is 0 for both: every pair looked like one tensor)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if torch._debug_has_internal_overlap(cache) == 1:  # 1: certainly (a stride 0 over a dim > 1)
            raise ValueError(f"{op}: {name} has elements in the same memory (an expanded tensor, strides "
                             f"{cache.stride()}); the new keys and values are written into it: give it memory of its own")
    try:
        same = k_cache.data_ptr() == v_cache.data_ptr() and k_cache.stride() == v_cache.stride() and k_cache.numel()
    except RuntimeError:  # fake tensors (tracing): no memory to compare
        return
    if same:
        raise ValueError(f"{op}: k_cache and v_cache are the same memory; the new values would overwrite the new keys")


def _apart_from_caches(k_cache, v_cache, *news) -> tuple:
    """news, each one that shares memory with a cache copied (real tensors'; traced and fake ones are
    left to torch)."""
    caches = {c.untyped_storage().data_ptr() for c in (k_cache, v_cache)
              if isinstance(c, Tensor) and not _util.values_unreadable(c)}
    return tuple(new.clone() if isinstance(new, Tensor) and not _util.values_unreadable(new)
                 and new.untyped_storage().data_ptr() in caches else new for new in news)


@overload
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, k_new: Optional[Tensor] = None,
                            v_new: Optional[Tensor] = None, causal: bool = True, *,
                            softmax_scale: Optional[float] = None, window: tuple[int, int] = _NO_WINDOW,
                            softcap: float = 0.0, sinks: Optional[Tensor] = None,
                            alibi_slopes: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = True,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            return_lse: Literal[False] = False) -> Tensor: ...


@overload
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, k_new: Optional[Tensor] = None,
                            v_new: Optional[Tensor] = None, causal: bool = True, *,
                            softmax_scale: Optional[float] = None, window: tuple[int, int] = _NO_WINDOW,
                            softcap: float = 0.0, sinks: Optional[Tensor] = None,
                            alibi_slopes: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = True,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            return_lse: Literal[True]) -> tuple[Tensor, Tensor]: ...


@overload
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, k_new: Optional[Tensor] = None,
                            v_new: Optional[Tensor] = None, causal: bool = True, *,
                            softmax_scale: Optional[float] = None, window: tuple[int, int] = _NO_WINDOW,
                            softcap: float = 0.0, sinks: Optional[Tensor] = None,
                            alibi_slopes: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = True,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            return_lse: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens, k_new: Optional[Tensor] = None,
                            v_new: Optional[Tensor] = None, causal: bool = True, *,
                            softmax_scale: Optional[float] = None, window: tuple[int, int] = _NO_WINDOW,
                            softcap: float = 0.0, sinks: Optional[Tensor] = None,
                            alibi_slopes: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = True,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            return_lse: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of new queries over a KV cache, appending k_new / v_new to the cache in place.

    Args:
        q: (batch, seqlen_q, n_heads, head_dim), usually seqlen_q = 1 (one decode step).
        k_cache, v_cache: (batch, capacity, n_kv_heads, head_dim), a contiguous last dim; written
            in place at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new. A cache of more
            rows than batch: its first rows (flash-attn's). With cache_batch_idx, (cache_batch,
            capacity, ...); with block_table (paged), (num_blocks, page_size, n_kv_heads, head_dim).
            Head dims and dtypes as :func:`flash_attn`'s; those without a kernel (a head dim other
            than 32, 64, 96, 128, 256; fp16 on the CPU) run on a widened copy of the cache each call:
            the keys in use where the lengths are known on the host (an int, CPU tensors: reading
            and writing them about triples the kernel's traffic), else the whole cache (CUDA
            lengths, a paged cache's every block).
        cache_seqlens: int32 (batch,) tensor (or an int for every sequence): tokens already in the
            cache. Not updated here: add seqlen_new yourself after the call. Its values (each in
            [0, capacity - seqlen_new]) are checked for an int and CPU tensors, and for CUDA tensors only
            with PYLLM_ATTN_CHECK_SEQLENS=1 (reading them is a device sync, which decode and CUDA
            graphs cannot afford); unchecked, they are clamped into that range, so bad values give
            wrong results, never out-of-bounds accesses. dtype, shape and device are always checked.
        k_new, v_new: (batch, seqlen_new, n_kv_heads, head_dim) or None.
        causal: bottom-right aligned as in :func:`flash_attn`: with L = cache_seqlens + seqlen_new
            keys, query i sees keys 0 .. L - seqlen_q + i.
        softcap: > 0 caps the scaled scores as in :func:`flash_attn` (Gemma 2's).
        sinks: a (n_heads,) logit per query head joining each softmax, as in :func:`flash_attn`.
        alibi_slopes: float32 (n_heads,) or (batch, n_heads), ALiBi as in :func:`flash_attn`: the
            distance of key j from query i is L - seqlen_q + i - j.
        rotary_cos, rotary_sin: (seqlen_ro >= capacity, rotary_dim / 2), flash-attn's rotary
            embedding inside the call: k_new (required) is rotated at positions cache_seqlens[b] + j
            before it is appended, q at cache_seqlens[b] + i when causal or windowed, else every
            query at cache_seqlens[b]; the first rotary_dim dims of each head, fp32 math, one
            rounding. rotary_interleaved: pairs (0, 1), (2, 3), ... (GPT-J, flash-attn's default);
            False: pairs (i, i + rotary_dim / 2) (GPT-NeoX, Llama).
        cache_batch_idx: int32 (batch,): sequence b's cache is row cache_batch_idx[b] of k_cache /
            v_cache (flash-attn's). Sequences sharing a row share its keys; where their new tokens
            land on the same positions, the CPU writes them in sequence order and on CUDA which one
            lands is undefined (as in flash-attn).
        cache_leftpad: int32 (batch,): sequence b's keys start at cache position cache_leftpad[b]
            (in [0, cache_seqlens[b]]); the rows before are not attended (left-padded caches). The
            new tokens still go to cache_seqlens[b], and the mask, window and ALiBi count keys from
            the pad on.
        block_table: int32 (batch, blocks per sequence): a paged cache (vLLM's, flash-attn's):
            cache position t of sequence b is row t % page_size of block block_table[b][t //
            page_size]; capacity = blocks per sequence * page_size; any page_size >= 1. Entries
            for positions past a sequence's keys are not read. On the CPU, calls of more than 8
            queries (prefill, chunked or not) and fp64 calls copy each sequence's keys and values
            once for the tiled kernels (memory: batch x longest sequence x n_kv_heads x head_dim,
            twice); decode-sized calls read the blocks in place, as the CUDA decode kernel does.
            The three layouts' indices are checked as cache_seqlens is (CPU tensors always, CUDA
            tensors with PYLLM_ATTN_CHECK_SEQLENS=1), else clamped into the cache. On CUDA they are
            unverified on a GPU (2026-12-03).
        return_lse: also return the log-sum-exp of each query's scaled scores, fp32 (fp64 for fp64
            inputs), (batch, n_heads, seqlen_q) (flash-attn's return_softmax_lse); +inf for a query
            that sees no key (with sinks, the sink's term included).
    Returns:
        out, shaped like q, or (out, lse). Not differentiable (inference). On the GPU the KV length
        is split across thread blocks (split-KV), so one query token still fills the GPU.
    Raises:
        as :func:`flash_attn`, plus ValueError when seqlen_new exceeds the capacity, or (where
        checked, see cache_seqlens) when cache_seqlens + seqlen_new does, or when a cache option
        names a row, block or pad outside the cache (where checked, before anything is written).
    """
    # New rows that are views of a cache's memory were overwritten part way through the append (torch's
    # overlap checks miss such strided 4-D views at batch > 1): appended from copies
    if k_new is not None or v_new is not None:
        # (q too: read after the append, a q in a cache's memory had been overwritten by the new keys)
        q, k_new, v_new = _apart_from_caches(k_cache, v_cache, q, k_new, v_new)
    plain = rotary_cos is None and rotary_sin is None and not return_lse
    out = None if sinks is not None or not plain else _kvcache_eager_cpu(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, window, softcap, alibi_slopes,
        cache_batch_idx, cache_leftpad, block_table)
    if out is not None:
        return out
    op = "flash_attn_with_kvcache"
    if (cache_batch_idx is None and block_table is None and isinstance(q, Tensor) and isinstance(k_cache, Tensor)
            and isinstance(v_cache, Tensor) and q.dim() == 4 and k_cache.dim() == 4
            and k_cache.shape[0] > q.shape[0] and v_cache.shape[0] == k_cache.shape[0]):
        # a cache of more rows than sequences (one made for the largest batch): its first rows, as flash-attn's
        k_cache, v_cache = k_cache[:q.shape[0]], v_cache[:q.shape[0]]
        if sinks is None and plain:
            out = _kvcache_eager_cpu(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, window,
                                     softcap, alibi_slopes, cache_batch_idx, cache_leftpad, block_table)
            if out is not None:
                return out
    _check_qkv(op, q, k_cache, v_cache, False, same_batch=False, kv=("k_cache", "v_cache"))
    _check_cache_options(op, q, k_cache, cache_batch_idx, cache_leftpad, block_table)
    capacity = _cache_capacity(k_cache, block_table)
    _check_softcap(op, q, softcap)
    _check_sinks(op, q, sinks)
    alibi_slopes = _check_alibi(op, q, alibi_slopes, q.shape[0])
    # One int for every sequence is known on the host: made a tensor only where the op needs one.
    length = cache_seqlens if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool) else None
    if length is None:
        if not isinstance(cache_seqlens, torch.Tensor):
            raise TypeError(f"{op}: cache_seqlens must be an int32 tensor or an int, got {type(cache_seqlens).__name__}")
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"{op}: cache_seqlens must be int32, got {cache_seqlens.dtype}")
        if cache_seqlens.shape != (q.shape[0],) or cache_seqlens.device != q.device:
            raise ValueError(f"{op}: cache_seqlens must be ({q.shape[0]},) on {q.device}, got "
                             f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: give both k_new and v_new or neither")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            _util.check_tensor(op, name, t, ACCEPTED)
            _util.check_same(op, q=q, **{name: t})
            if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{op}: {name} must be (batch, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}) "
                                 f"with batch {q.shape[0]}, got {tuple(t.shape)}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"{op}: k_new and v_new must have the same shape")
        if k_new.shape[1] > capacity:
            raise ValueError(f"{op}: {k_new.shape[1]} new tokens do not fit in a cache of capacity {capacity}")
        _check_writable_caches(op, k_cache, v_cache)
    left, right = _check_window(op, window)
    if causal:
        right = 0
    scale = _resolve_scale(op, softmax_scale, q.shape[-1])
    _check_rotary(op, q, k_new, rotary_cos, rotary_sin, capacity)
    if rotary_cos is not None:
        if length is not None:
            _check_cache_lengths([length], k_new.shape[1], capacity, shown=length)  # before the positions are used
        # flash-attn's: a window as long as the cache is none (queries at one position unless windowed)
        per_query = causal or 0 <= left < capacity or 0 <= right < capacity
        if (per_query and q.shape[1] > k_new.shape[1] and q.shape[0]
                and (length is not None or not cache_seqlens.is_cuda)):
            # more queries than new keys: the first ones sit past the cache's end, maybe past the tables
            last = (length if length is not None else int(cache_seqlens.max())) + q.shape[1] - 1
            if last >= rotary_cos.shape[0]:
                raise ValueError(f"{op}: query positions reach {last}, past rotary_cos / rotary_sin's "
                                 f"{rotary_cos.shape[0]} rows")
        q, k_new = _rotate_new(q, k_new, cache_seqlens if length is None else length, rotary_cos, rotary_sin,
                               bool(rotary_interleaved), per_query)
        if not return_lse and sinks is None:  # the rotated call, checked: a plain eager CPU one takes the shortcut
            out = _kvcache_eager_cpu(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, window,
                                     softcap, alibi_slopes, cache_batch_idx, cache_leftpad, block_table)
            if out is not None:
                return out
    if _runs_widened(q):
        return _kvcache_widened(q, k_cache, v_cache, cache_seqlens if length is None else length, k_new, v_new,
                                capacity, scale, left, right, float(softcap), sinks, alibi_slopes, cache_batch_idx,
                                cache_leftpad, block_table, return_lse)
    options = cache_batch_idx is not None or cache_leftpad is not None or block_table is not None
    result = None
    if length is not None and options:  # known on the host: checked here, as the int path does (no sync)
        _check_cache_lengths([length], 0 if k_new is None else k_new.shape[1], capacity, shown=length)
    if length is not None:
        if not options and _util.runs_body(q, k_cache, v_cache, k_new, v_new, sinks, alibi_slopes):
            result = _kvcache_with_int_length(q, k_cache, v_cache, length, k_new, v_new, scale, left, right,
                                              float(softcap), sinks, alibi_slopes)
        else:
            cache_seqlens = torch.full((q.shape[0],), length, dtype=torch.int32, device=q.device)
    # The op's dispatch cost ~0.1 ms per call on the CPU (op 0.20 ms vs its body 0.10 ms at cache
    # 512, D = 64, H = 8), as much as the kernel. Not differentiable: calls that need grad run it under
    # _KVCacheNoBackward, whose backward says so.
    if result is None:
        result = _util.call(_flash_attn_with_kvcache_body, _flash_attn_with_kvcache, _KVCacheNoBackward, q, k_cache,
                            v_cache, cache_seqlens, k_new, v_new, scale, left, right, float(softcap), sinks,
                            alibi_slopes, cache_batch_idx, cache_leftpad, block_table)
    return result if return_lse else result[0]
