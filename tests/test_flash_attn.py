import itertools
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyllm
from pyllm import _C
from pyllm.ops import _util
from pyllm.ops import flash_attn as fa
from helpers import CPU_AND_CUDA, on_unsupported_device, peak_rss_growth_mib, poisoned, rel_err, tolerance

DTYPES_BY_DEVICE = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


# --- the reference: softmax(q k^T * scale) v written out, any dtype -----------------------------

def mask_of(tq: int, tk: int, causal: bool, window) -> torch.Tensor:
    """(tq, tk) bool, True = seen; bottom-right aligned as in flash-attn >= 2.1."""
    left, right = window
    if causal:
        right = 0
    pos = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    seen = torch.ones(tq, tk, dtype=torch.bool)
    if left >= 0:
        seen &= j >= pos - left
    if right >= 0:
        seen &= j <= pos + right
    return seen


def attention(q, k, v, causal=False, window=(-1, -1), scale=None, softcap=0.0, sinks=None, alibi=None, keep=None,
              dropout_p=0.0):
    """Plain attention in q's dtype and device: the float64 reference, or torch's own in a low
    precision dtype. (B, T, H, D) layout; queries that see no key give 0; returns (out, lse).
    softcap: the scaled scores capped as softcap * tanh(s / softcap) first. sinks: (H,) logits
    appended to each row of scores (a key with a zero value), as transformers' gpt-oss does.
    alibi: (H,) or (B, H) slopes, -slope * |i + tk - tq - j| added after the cap (flash-attn's
    alibi_slopes), as an additive float mask the way transformers' BLOOM / MPT build it.
    keep: (B, H, Tq, Tk) bool, the probabilities dropout keeps, scaled by 1 / (1 - dropout_p)
    (the LSE is of every key)."""
    b, tq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = k.repeat_interleave(h // hk, dim=2), v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        distance = (torch.arange(tq)[:, None] + (tk - tq) - torch.arange(tk)[None, :]).abs().to(s.device, s.dtype)
        slopes = alibi.to(s.device, s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * distance
    seen = mask_of(tq, tk, causal, window).to(q.device)
    s = s.masked_fill(~seen, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(b, h, tq, 1)], dim=-1)
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if sinks is not None:
        p = p[..., :-1]
    if keep is not None:
        p = p * keep.to(p.device) / (1 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def attention_varlen(q, k, v, cu_q, cu_k, alibi=None, dropout=None, **kw):
    """attention() of each packed sequence; dropout: (the call's seed, p), sequence i's mask
    dropout_mask(seed, i, head, ...) over its own positions."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        slopes = None if alibi is None else alibi if alibi.dim() == 1 else alibi[i]
        if dropout is not None:
            kw["keep"] = torch.stack([fa.dropout_mask(dropout[0], i, j, cq[i + 1] - cq[i], ck[i + 1] - ck[i], dropout[1])
                                      for j in range(q.shape[1])])[None]
            kw["dropout_p"] = dropout[1]
        o, lse = attention(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]], alibi=slopes,
                           **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def rand(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)


def grads_of(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(out, leaves, dout)


def check_against_reference(q, k, v, dout, fn_ours, fn_ref):
    """Forward and gradients of ours vs the float64 reference, within 2x torch's own error."""
    as64 = [t.double().cpu() for t in (q, k, v)]
    ref, ref_grads = grads_of(fn_ref, as64, dout.double().cpu())
    torch_out, torch_grads = grads_of(fn_ref, (q, k, v), dout)
    out, our_grads = grads_of(fn_ours, (q, k, v), dout)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= tolerance(torch_out, ref)
    for name, ours, theirs, exact in zip("qkv", our_grads, torch_grads, ref_grads):
        if exact.abs().max() == 0:
            # Exactly zero in exact arithmetic (one key per query: softmax is constant). Ours is
            # P * (dO.V - dO.O), two length-D dot products equal in exact arithmetic: rounding
            # leaves up to D * eps of the gradients' scale (that of dv, nonzero here).
            scale = ref_grads[2].norm()
            assert ours.double().norm().cpu() <= q.shape[-1] * torch.finfo(q.dtype).eps * scale, f"d{name}"
            continue
        assert rel_err(ours, exact) <= tolerance(theirs, exact), f"d{name}"


def check_against_reference_any_dtype(q, k, v, dout, fn_ours, fn_ref):
    """check_against_reference; for float64 inputs (the reference's own dtype, where torch's "error"
    would be 0) agreement to rounding."""
    if q.dtype != torch.float64:
        return check_against_reference(q, k, v, dout, fn_ours, fn_ref)
    (out, grads), (ref, ref_grads) = grads_of(fn_ours, (q, k, v), dout), grads_of(fn_ref, (q, k, v), dout)
    for a, b in zip((out, *grads), (ref, *ref_grads)):  # dq, dk of one key are 0: against dv's size then
        assert (a - b).norm() <= 1e-13 * max(b.norm(), ref_grads[2].norm())


# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim): T = 1, T not a multiple of the
# 64-wide tiles, Tq < Tk and Tq > Tk (bottom-right causal leaves the first queries without keys),
# GQA and MQA, every head dim. The CPU backward splits each sequence's queries into chunks when
# there are fewer than 8 (sequence, kv head) pairs (most shapes here); the last shape has 8.
SHAPES = [
    (2, 1, 1, 2, 2, 64),
    (1, 77, 77, 4, 4, 32),
    (2, 65, 130, 4, 2, 64),
    (1, 100, 37, 4, 1, 128),
    (1, 129, 129, 2, 2, 96),
    (1, 40, 70, 2, 1, 256),
    (1, 150, 150, 8, 8, 32),  # >= 8 (sequence, kv head) pairs: the CPU backward's unsplit path
]
WINDOWS = [(-1, -1), (16, -1), (5, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_idx", [0, 1])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(device, dtype_idx, shape, causal, window):
    dtype = DTYPES_BY_DEVICE[device][dtype_idx]
    b, tq, tk, h, hk, d = shape
    q, k, v = rand((b, tq, h, d), dtype, device), rand((b, tk, hk, d), dtype, device), rand((b, tk, hk, d), dtype, device)
    dout = rand((b, tq, h, d), dtype, device)
    check_against_reference(
        q, k, v, dout,
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window),
        lambda q, k, v: attention(q, k, v, causal, window)[0],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_scale_and_lse(device):
    dtype = DTYPES_BY_DEVICE[device][0]
    q, k, v = rand((2, 70, 4, 64), dtype, device), rand((2, 90, 2, 64), dtype, device), rand((2, 90, 2, 64), dtype, device)
    for causal, window, scale in [(False, (-1, -1), 0.3), (True, (10, -1), None)]:
        out, lse = pyllm.flash_attn(q, k, v, causal=causal, window=window, softmax_scale=scale, return_lse=True)
        ref, ref_lse = attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal, window, scale)
        torch_out, torch_lse = attention(q, k, v, causal, window, scale)
        assert lse.shape == (2, 4, 70) and lse.dtype == torch.float32
        assert rel_err(out, ref) <= tolerance(torch_out, ref)
        assert rel_err(lse, ref_lse) <= tolerance(torch_lse, ref_lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_negative_scale_matches_reference(causal):
    # bf16 on the CPU: with AVX512_BF16 the scores come from the unscaled bf16 values and are
    # scaled after, before masking (a negative scale must not turn masked -inf into +inf).
    q, k, v, dout = (rand((1, 100, 2, 64), torch.bfloat16, "cpu") for _ in range(4))
    check_against_reference(
        q, k, v, dout,
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, softmax_scale=-0.2),
        lambda q, k, v: attention(q, k, v, causal, scale=-0.2)[0],
    )


def test_empty_rows_give_zero_and_inf_lse():
    # 6 queries, 2 keys, causal bottom-right: queries 0..3 see nothing.
    q, k, v = torch.randn(1, 6, 2, 32), torch.randn(1, 2, 2, 32), torch.randn(1, 2, 2, 32)
    q.requires_grad_()
    out, lse = pyllm.flash_attn(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[0, :4], torch.zeros(4, 2, 32))
    assert torch.isinf(lse[0, :, :4]).all() and (lse[0, :, :4] > 0).all()
    assert torch.isfinite(lse[0, :, 4:]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, :4], torch.zeros(4, 2, 32))


def test_huge_windows_mean_unlimited():
    # sys.maxsize as "no limit": the mask bounds add the window to positions, which overflowed
    # int64 (every key masked, out 0) before the launchers capped windows at 2**62.
    q, k, v = torch.randn(1, 5, 2, 32), torch.randn(1, 7, 2, 32), torch.randn(1, 7, 2, 32)
    big = 2**63 - 1
    assert torch.equal(pyllm.flash_attn(q, k, v, window=(big, big)), pyllm.flash_attn(q, k, v))
    assert torch.equal(pyllm.flash_attn(q, k, v, window=(big, 0)), pyllm.flash_attn(q, k, v, causal=True))
    dout = torch.randn(q.shape)
    huge = grads_of(lambda q, k, v: pyllm.flash_attn(q, k, v, window=(big, 0)), (q, k, v), dout)[1]
    causal = grads_of(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True), (q, k, v), dout)[1]
    for a, b in zip(huge, causal):  # the backward's query bounds (query_hi) add window_left
        assert torch.equal(a, b)
    cache = torch.randn(1, 8, 2, 32)
    assert torch.equal(pyllm.flash_attn_with_kvcache(q[:, :1], cache, cache, 6, window=(big, -1)),
                       pyllm.flash_attn_with_kvcache(q[:, :1], cache, cache, 6))


def test_nan_input_propagates():
    q, k, v = torch.randn(1, 3, 1, 32), torch.randn(1, 3, 1, 32), torch.randn(1, 3, 1, 32)
    q[0, 1, 0, 0] = float("nan")
    out = pyllm.flash_attn(q, k, v)
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,capacity", [(1, 1024), (1, 300), (16, 1024)])
def test_nan_reaches_a_decode_row_whatever_its_splits(dtype, batch, capacity):
    # A decode step's keys are split across threads for small batches and long caches: a NaN query, or
    # NaN keys filling one whole split, must give NaN as with one split (the combine had skipped such a
    # split: its max skips NaN and stayed -inf, so the row came out 0 / finite), and only in that row.
    cache_k, cache_v = (torch.randn(batch, capacity, 2, 64).to(dtype) for _ in range(2))
    q = torch.randn(batch, 1, 2, 64).to(dtype)
    lengths = torch.full((batch,), min(1000, capacity - 1), dtype=torch.int32)
    q[0, 0, 1, 5] = float("nan")
    out, lse = pyllm.flash_attn_with_kvcache(q, cache_k, cache_v, lengths, return_lse=True)
    assert out[0, 0, 1].isnan().all() and lse[0, 1].isnan().all()
    assert not out[0, 0, 0].isnan().any() and not out[1:].isnan().any()
    q[0, 0, 1, 5] = 0.5
    cache_k[0, :250, 0, 7] = float("nan")
    out = pyllm.flash_attn_with_kvcache(q, cache_k, cache_v, lengths)
    assert out[0, 0, 0].isnan().all() and not out[0, 0, 1].isnan().any() and not out[1:].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_v_of_a_later_block_stays_there(dtype):
    # Causal: queries 0..63 see no key past 63, so a NaN in V of key 100 must not reach them (the
    # AMX forward's 128-key blocks used to take it in with P = 0, and 0 * NaN = NaN).
    q, k, v = (torch.randn(1, 128, 1, 64) for _ in range(3))
    v[0, 100, 0, 3] = float("nan")
    out = pyllm.flash_attn(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert not out[0, :64].isnan().any() and out[0, 100:, 0, 3].isnan().all()


# --- varlen ---------------------------------------------------------------------------------------

def check_score_mods(q, k, v, dout, slopes, **kw):
    """pyllm.flash_attn with alibi_slopes=slopes and kw (softcap, causal, window): out and gradients
    against the float64 reference within twice torch's error, the LSE within 1e-2 (1e-10 in fp64)."""
    ours = lambda q, k, v: pyllm.flash_attn(q, k, v, alibi_slopes=slopes, **kw)  # noqa: E731
    reference = lambda q, k, v: attention(q, k, v, alibi=slopes, **kw)[0]  # noqa: E731
    check_against_reference_any_dtype(q, k, v, dout, ours, reference)
    _, lse = pyllm.flash_attn(q, k, v, alibi_slopes=slopes, return_lse=True, **kw)
    ref_lse = attention(q.double(), k.double(), v.double(), alibi=slopes, **kw)[1]
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    if q.dtype == torch.float64:
        assert (lse[seen].double() - ref_lse[seen]).abs().max() < 1e-10
    else:  # twice torch's own LSE error (an absolute 1e-2 let a 2e-4 relative error through in fp32)
        torch_lse = attention(q, k, v, alibi=slopes, **kw)[1]
        assert rel_err(lse[seen], ref_lse[seen]) <= tolerance(torch_lse[seen], ref_lse[seen])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (16, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[6]], ids=str)
def test_softcap_matches_float64_reference(dtype, shape, causal, window):
    # Gemma 2's capped scores (flash-attn's softcap), forward and backward on the CPU kernels (bf16
    # off the AMX path, which takes no cap): inputs twice unit size so that the cap of 1.5 binds.
    b, tq, tk, h, hk, d = shape
    q, k, v = (2 * rand(s, dtype, "cpu") for s in ((b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d)))
    dout = rand((b, tq, h, d), dtype, "cpu")
    check_score_mods(q, k, v, dout, None, causal=causal, window=window, softcap=1.5)


def test_softcap_varlen_and_checks():
    lens = [0, 1, 70, 5, 130]
    cu_q = cu(lens)
    q, k, v = (2 * rand((sum(lens), 4 if i == 0 else 2, 64), torch.float32, "cpu") for i in range(3))
    dout = rand(q.shape, torch.float32, "cpu")
    check_against_reference(
        q, k, v, dout,
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, softcap=3.0),
        lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_q, causal=True, softcap=3.0)[0],
    )
    for bad in (-1.0, math.inf, "1"):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, softcap=bad)
    if q.is_cpu:  # a cap fp32 holds no more (the scores' math type) would read as no cap
        with pytest.raises(ValueError, match="softcap 1e-46 rounds to 0 in fp32"):
            pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, softcap=1e-46)


@pytest.mark.cuda
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3))], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]], ids=str)
@pytest.mark.parametrize("mods", ["softcap", "alibi", "alibi-batch-softcap"])
def test_softcap_and_alibi_on_cuda(shape, causal, window, mods, monkeypatch, algo="mma", dtype=torch.bfloat16):
    # The CUDA kernels' capped scores and ALiBi (new 2026-12-05, unverified until this passes on a
    # GPU): forward, LSE and the backward (test_softcap_and_alibi_on_cuda_other_backwards: the others)
    monkeypatch.setenv("PYLLM_ATTN_BWD", algo)
    b, tq, tk, h, hk, d = shape
    q, k, v = (2 * rand(s, dtype, "cuda") for s in ((b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d)))
    dout = rand((b, tq, h, d), dtype, "cuda")
    slopes = alibi_slopes((b, h) if "batch" in mods else (h,)).cuda() if "alibi" in mods else None
    check_score_mods(q, k, v, dout, slopes, causal=causal, window=window, softcap=1.5 if "softcap" in mods else 0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ["simt", "atomic", "mma-fp16"])  # (atomic: the deterministic kernels run with them)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=str)
def test_softcap_and_alibi_on_cuda_other_backwards(algo, shape, monkeypatch):
    # the SIMT backward, "atomic" with them (the deterministic kernels), and fp16's instances
    dtype = torch.float16 if algo == "mma-fp16" else torch.bfloat16
    test_softcap_and_alibi_on_cuda(shape, True, (5, -1), "alibi-batch-softcap", monkeypatch, algo.split("-")[0], dtype)


# --- ALiBi (flash-attn's alibi_slopes; BLOOM, MPT) -----------------------------------------------

def alibi_slopes(shape) -> torch.Tensor:
    """Random positive slopes around ALiBi's own (2^-8/H .. 2^-1) and above, so that the bias
    decides much of each softmax."""
    return torch.rand(shape, dtype=torch.float64).mul(0.6).add(0.02).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (16, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[6]], ids=str)
@pytest.mark.parametrize("per_sequence,softcap", [(False, 0.0), (True, 0.0), (True, 1.5)], ids=str)
def test_alibi_matches_float64_reference(dtype, shape, causal, window, per_sequence, softcap):
    # Forward, LSE and backward of the CPU tiles (bf16: off AMX, which takes no bias), slopes per
    # head or per (sequence, head), alone and after Gemma 2's cap (the backward's cap derivative is
    # of the capped score before the bias). Inputs twice unit size so that a cap of 1.5 binds.
    b, tq, tk, h, hk, d = shape
    q, k, v = (2 * rand(s, dtype, "cpu") for s in ((b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d)))
    dout = rand((b, tq, h, d), dtype, "cpu")
    slopes = alibi_slopes((b, h) if per_sequence else (h,))
    kw = dict(causal=causal, window=window, softcap=softcap)
    check_score_mods(q, k, v, dout, slopes, **kw)
    if tk > 1:  # (the bias binds)
        plain = pyllm.flash_attn(q, k, v, **kw)
        assert not torch.allclose(plain.double(), attention(q.double(), k.double(), v.double(), alibi=slopes, **kw)[0],
                                  atol=1e-2)


def test_alibi_varlen_per_sequence_slopes():
    # Packed sequences (empty and length-1 ones among them), each with its own slopes: as each
    # sequence alone with its row of slopes; Tq != Tk per sequence (bottom-right distances).
    lens_q, lens_k = [0, 1, 70, 5, 130], [3, 1, 90, 0, 130]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q = rand((sum(lens_q), 4, 64), torch.float32, "cpu")
    k, v = (rand((sum(lens_k), 2, 64), torch.float32, "cpu") for _ in range(2))
    dout = rand(q.shape, torch.float32, "cpu")
    slopes = alibi_slopes((len(lens_q), 4))
    for causal in (False, True):
        check_against_reference(
            q, k, v, dout,
            lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                             alibi_slopes=slopes),
            lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_k, causal=causal, alibi=slopes)[0],
        )


@pytest.mark.level_free
def test_alibi_gradcheck_and_opcheck():
    q, k, v = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 9, 4, 32), (2, 13, 2, 32),
                                                                                (2, 13, 2, 32)))
    slopes = alibi_slopes((2, 4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True), (q, k, v))
    args = (q.detach(), k.detach(), v.detach(), None, None, -1, -1, 0.25, -1, 0, False, 0.0, slopes)
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, args)
    grad_args = tuple(t.clone().requires_grad_() for t in args[:3]) + args[3:]
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, grad_args)
    cache = torch.zeros(2, 16, 2, 32)
    torch.library.opcheck(torch.ops.pyllm.flash_attn_with_kvcache.default,
                          (torch.randn(2, 1, 4, 32), cache, cache.clone(), torch.tensor([3, 5], dtype=torch.int32),
                           torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32), 0.25, -1, 0, 0.0, None, slopes[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tq", [1, 3, 12], ids=lambda t: f"tq{t}")  # 12 > kDecodeMaxQueries: the tiles
@pytest.mark.parametrize("lengths_kind", ["tensor", "int"])
@pytest.mark.parametrize("h,hk", [(4, 4), (8, 2)], ids=str)
def test_kvcache_alibi_matches_float64_reference(dtype, tq, lengths_kind, h, hk):
    # Decode over a cache with ALiBi (the CPU decode kernel for tq <= 8, its splits of long caches
    # included; the tiles above): each sequence as full attention over its first lengths[b] + tq
    # keys, the new ones appended; per-(sequence, head) slopes, and with a left window.
    b, cap, d = 4, 1100, 64
    lengths = [0, 37, 700, 1080] if lengths_kind == "tensor" else [500] * b
    k_cache, v_cache = rand((b, cap, hk, d), dtype, "cpu"), rand((b, cap, hk, d), dtype, "cpu")
    q, k_new, v_new = rand((b, tq, h, d), dtype, "cpu"), rand((b, tq, hk, d), dtype, "cpu"), rand((b, tq, hk, d), dtype, "cpu")
    slopes = alibi_slopes((b, h)) * 0.1  # reaches back ~100 keys at slope 0.05
    seqlens = lengths[0] if lengths_kind == "int" else torch.tensor(lengths, dtype=torch.int32)
    for window in ((-1, -1), (300, -1)):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = pyllm.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, v_new, window=window, alibi_slopes=slopes)
        for i, n in enumerate(lengths):
            keys = torch.cat([k_cache[i:i + 1, :n], k_new[i:i + 1]], dim=1)
            vals = torch.cat([v_cache[i:i + 1, :n], v_new[i:i + 1]], dim=1)
            assert torch.equal(kc[i:i + 1, :n + tq], keys)
            kw = dict(causal=True, window=window, alibi=slopes[i])
            ref, _ = attention(q[i:i + 1].double(), keys.double(), vals.double(), **kw)
            torch_out, _ = attention(q[i:i + 1], keys, vals, **kw)
            assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), (i, n, window)


def test_alibi_checks():
    q = rand((2, 5, 4, 64), torch.float32, "cpu")
    k = rand((2, 7, 2, 64), torch.float32, "cpu")
    good = alibi_slopes((4,))
    cases = [
        (good.double(), TypeError, "alibi_slopes must be float32"),
        ([0.5] * 4, TypeError, "alibi_slopes must be a torch.Tensor or None"),
        (good[:3], ValueError, r"shape \(n_heads,\) = \(4,\) or \(batch, n_heads\) = \(2, 4\), got \(3,\)"),
        (alibi_slopes((3, 4)), ValueError, r"got \(3, 4\)"),
        (good.clone().requires_grad_(), ValueError, "get no gradient; pass alibi_slopes.detach"),
        (torch.tensor([0.5, math.inf, 0.1, 0.2]), ValueError, "alibi_slopes must be finite"),
        (torch.tensor([0.5, math.nan, 0.1, 0.2]), ValueError, "alibi_slopes must be finite"),
        (good.to("meta"), ValueError, "alibi_slopes must be on q's device cpu"),
    ]
    for slopes, error, message in cases:
        with pytest.raises(error, match=message):
            pyllm.flash_attn(q, k, k, alibi_slopes=slopes)
        with pytest.raises(error, match=message.replace("(2, 4)", "(2, 4)")):
            pyllm.flash_attn_with_kvcache(q, k.clone(), k.clone(), 2, alibi_slopes=slopes)
    # the C++ launcher re-checks what Python passes
    out, lse = torch.empty_like(q), torch.empty(2, 4, 5)
    args = (q.data_ptr(), k.data_ptr(), k.data_ptr(), out.data_ptr(), lse.data_ptr(), 0, 0, 0, 2, 5, 7, 4, 2, 64,
            list(q.stride()[:3]), list(k.stride()[:3]), list(k.stride()[:3]), list(out.stride()[:3]), [20, 5], 0.125,
            -1, -1, _util.dtype_code(q))
    with pytest.raises(ValueError, match="alibi_batch_stride must be 0 .* or at least n_heads \\(4\\), got 3"):
        _C.flash_attn_fwd_cpu(*args, alibi_slopes=good.data_ptr(), alibi_batch_stride=3)
    bad = torch.tensor([0.1, 0.2, 0.3, math.inf])
    with pytest.raises(ValueError, match="alibi_slopes must be finite, got inf for sequence 0, head 3"):
        _C.flash_attn_fwd_cpu(*args, alibi_slopes=bad.data_ptr())
    # and the kernel call the op runs (a DTensor's whole slopes beside a shard of the heads: the
    # kernel would read the first heads' slopes)
    from pyllm.ops import flash_attn as fa
    with pytest.raises(ValueError, match=r"alibi_slopes must be \(n_heads,\) = \(2,\) .* got \(4,\)"):
        fa.flash_attn_forward_into(q[:, :, :2], k[:, :, :1], k[:, :, :1], out[:, :, :2], lse[:, :2], None, None, 5, 7,
                                   0.125, -1, -1, alibi_slopes=good)


def test_alibi_slopes_layouts_and_inference_tensors():
    # A (1, H) view whose first stride is free, slopes made under inference_mode then used with
    # autograd (saved for the backward: cloned), and the eager KV-cache shortcut (the op's bits;
    # declining slopes it would not take, which the general path then refuses).
    q, k, v = (rand((1, 9, 4, 32), torch.float32, "cpu") for _ in range(3))
    slopes = alibi_slopes((4,))
    want = pyllm.flash_attn(q, k, v, causal=True, alibi_slopes=slopes)
    odd = slopes[:, None].t()  # (1, 4), strides (1, 1)
    assert odd.is_contiguous() and odd.stride(0) == 1
    assert torch.equal(pyllm.flash_attn(q, k, v, causal=True, alibi_slopes=odd), want)
    with torch.inference_mode():
        frozen = slopes.clone()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pyllm.flash_attn(*leaves, causal=True, alibi_slopes=frozen)
    assert torch.equal(out, want)
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)
    b, cap, h, hk, d = 3, 40, 4, 2, 32
    q, k_new, v_new = new_kv(b, 1, h, hk, d, torch.float32, "packed")
    lengths = torch.tensor([0, 37, 19], dtype=torch.int32)
    for shape in ((h,), (b, h)):
        slopes = alibi_slopes(shape)
        k_cache, v_cache, base = kv_cache_pair(b, cap, hk, d, torch.float32, "contiguous")
        ref_k, ref_v, _ = kv_cache_pair(b, cap, hk, d, torch.float32, "contiguous", base)
        out = fa._kvcache_eager_cpu(q, k_cache, v_cache, lengths, k_new, v_new, True, None, fa._NO_WINDOW, 0.0, slopes)
        assert out is not None, "the shortcut declined ALiBi slopes"
        want = torch.ops.pyllm.flash_attn_with_kvcache(q, ref_k, ref_v, lengths, k_new, v_new, 1 / math.sqrt(d), -1, 0,
                                                        0.0, None, slopes)[0]
        assert torch.equal(out, want) and torch.equal(k_cache, ref_k)
    for bad in (slopes.double(), torch.full((h,), math.nan), slopes.clone().requires_grad_(), slopes[:, :2]):
        assert fa._kvcache_eager_cpu(q, k_cache, v_cache, lengths, k_new, v_new, True, None, fa._NO_WINDOW, 0.0,
                                     bad) is None
        before = k_cache.clone()
        with pytest.raises((TypeError, ValueError)):
            pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new, alibi_slopes=bad)
        assert torch.equal(k_cache, before)  # refused before the append


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per head", "per sequence"])
def test_alibi_sdpa_fallback_matches_the_kernels(monkeypatch, per_sequence):
    # pyllm.nn's attention where pyllm has no kernel (CUDA for now, other dtypes and head dims): the
    # same distances as the kernels' (bottom-right, the KV cache's per-row lengths, packed documents).
    from pyllm import nn as pyllm_nn

    b, h, hk, d = 2, 4, 2, 32
    q, k, v = rand((b, 7, h, d), torch.float64, "cpu"), rand((b, 11, hk, d), torch.float64, "cpu"), \
        rand((b, 11, hk, d), torch.float64, "cpu")
    slopes = alibi_slopes((b, h) if per_sequence else (h,))
    cache = [rand((b, 16, hk, d), torch.float64, "cpu") for _ in range(2)]
    lengths = torch.tensor([3, 9], dtype=torch.int32)
    cu_seqlens = cu([4, 3, 7])
    kernels = [pyllm_nn.attention(q, k, v, alibi=slopes),
               pyllm_nn.attention_with_kvcache(q[:, :2], *[c.clone() for c in cache], k[:, :2], v[:, :2], lengths,
                                               alibi=slopes)]
    if not per_sequence:  # packed documents take one set of slopes
        kernels.append(pyllm_nn.attention(q, q[..., :hk, :], q[..., :hk, :], cu_seqlens=cu_seqlens, alibi=slopes))
    monkeypatch.setattr(pyllm_nn, "_kernel_dtypes", lambda x, by_device: ())
    fallback = [pyllm_nn.attention(q, k, v, alibi=slopes),
                pyllm_nn.attention_with_kvcache(q[:, :2], *[c.clone() for c in cache], k[:, :2], v[:, :2], lengths,
                                                alibi=slopes)]
    if not per_sequence:
        fallback.append(pyllm_nn.attention(q, q[..., :hk, :], q[..., :hk, :], cu_seqlens=cu_seqlens, alibi=slopes))
    for ours, theirs in zip(kernels, fallback):
        assert rel_err(ours, theirs) < 1e-12


@pytest.mark.cuda
def test_alibi_slopes_on_another_device_are_refused_on_cuda():
    # CPU slopes for CUDA inputs (and the op called directly, past the public checks): an error
    # before anything is appended, never a kernel reading a host pointer
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    slopes = torch.tensor([0.5, 0.25])
    with pytest.raises(ValueError, match="alibi_slopes must be on q's device"):
        pyllm.flash_attn(q, q, q, alibi_slopes=slopes)
    cache = q.clone()
    with pytest.raises(ValueError, match="alibi_slopes must be on q's device"):
        pyllm.flash_attn_with_kvcache(q[:, :1], cache, q.clone(), 3, q[:, :1], q[:, :1], alibi_slopes=slopes)
    with pytest.raises(ValueError, match="alibi_slopes must be float32 with a contiguous last dim on q's device"):
        torch.ops.pyllm.flash_attn_with_kvcache(q[:, :1], cache, q.clone(), torch.tensor([3], dtype=torch.int32, device="cuda"),
                                                q[:, :1], q[:, :1], 0.125, -1, 0, 0.0, None, slopes)
    assert torch.equal(cache, q)  # nothing appended
    bad = torch.tensor([0.5, math.inf], device="cuda")
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        pyllm.flash_attn(q, q, q, alibi_slopes=bad)
    good = bad.clone()
    good[1] = 0.25
    pyllm.flash_attn(q, q, q, alibi_slopes=good)  # read once, then kept with the tensor's version
    good[1] = math.inf  # an in-place write bumps it: read again
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        pyllm.flash_attn(q, q, q, alibi_slopes=good)


# --- dropout on the probabilities (flash-attn's dropout_p) -------------------------------------

def seeded_draw(seed: int) -> torch.Tensor:
    """The dropout seed a pyllm.flash_attn call draws right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return fa._new_dropout_seed()


def dropout_keep(seed: int, b: int, h: int, tq: int, tk: int, p: float) -> torch.Tensor:
    """(b, h, tq, tk) bool: the elements a call after torch.manual_seed(seed) keeps."""
    draw = seeded_draw(seed)
    return torch.stack([torch.stack([fa.dropout_mask(draw, i, j, tq, tk, p) for j in range(h)]) for i in range(b)])


def dropped_attention(q, k, v, keep, p, **kw):
    """The reference with dropout: attention()'s softmax times keep / (1 - p), in q's dtype."""
    b, tq, h, d = q.shape
    hk = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    k, v = k.repeat_interleave(h // hk, dim=2), v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if kw.get("softcap"):
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    seen = mask_of(tq, k.shape[1], kw.get("causal", False), kw.get("window", (-1, -1))).to(s.device)
    s = s.masked_fill(~seen, -math.inf)
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0) * keep.to(s.device) / (1 - p)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(q.dtype), v)


def seeded(fn, seed: int):
    """fn run right after torch.manual_seed(seed): every call draws the same dropout seed."""
    def run(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (16, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[6]], ids=str)
@pytest.mark.parametrize("p,softcap", [(0.6, 0.0), (0.25, 1.5)], ids=str)
def test_dropout_matches_float64_reference(dtype, shape, causal, window, p, softcap):
    # Forward and every gradient against the float64 reference computed with the same kept elements
    # (dropout_mask of the seed the call draws), within twice torch's own error; bf16 off the AMX
    # tiles (which take no dropout). The first case drops most, the second caps the scores too.
    # (Both at once, fp32 dv came to 2.05x torch's error, 1.86x with the cap alone: the backward's
    # P = exp(s - lse) carries the fp32 LSE's rounding into a whole row, which the cap's flat rows
    # and the few kept terms do not average out; FlashAttention-2's, not the mask's.)
    b, tq, tk, h, hk, d = shape
    q, k, v = (rand(sz, dtype, "cpu") for sz in ((b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d)))
    dout = rand((b, tq, h, d), dtype, "cpu")
    keep = dropout_keep(11, b, h, tq, tk, p)
    kw = dict(causal=causal, window=window, softcap=softcap)
    check_against_reference_any_dtype(
        q, k, v, dout, seeded(lambda q, k, v: pyllm.flash_attn(q, k, v, dropout_p=p, **kw), 11),
        lambda q, k, v: dropped_attention(q, k, v, keep, p, **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (5, 3))], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[5]], ids=str)
@pytest.mark.parametrize("algo,dtype", [("mma", torch.bfloat16), ("mma", torch.float16), ("simt", torch.bfloat16),
                                        ("atomic", torch.bfloat16)], ids=str)
def test_dropout_on_cuda(shape, causal, window, algo, dtype, monkeypatch):
    # The CUDA kernels' dropout (new 2026-12-05, unverified until this passes on a GPU): the elements
    # the CPU kernels and dropout_mask give for the seed (drawn from the CPU generator either way),
    # forward and every backward ("atomic" runs the deterministic kernels with it), within twice
    # torch's error against the float64 reference
    monkeypatch.setenv("PYLLM_ATTN_BWD", algo)
    b, tq, tk, h, hk, d = shape
    q, k, v = (rand(sz, dtype, "cuda") for sz in ((b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d)))
    dout = rand((b, tq, h, d), dtype, "cuda")
    keep = dropout_keep(11, b, h, tq, tk, 0.3)
    kw = dict(causal=causal, window=window)
    ours = seeded(lambda q, k, v: pyllm.flash_attn(q, k, v, dropout_p=0.3, **kw), 11)
    check_against_reference(q, k, v, dout, ours, lambda q, k, v: dropped_attention(q, k, v, keep, 0.3, **kw))
    cpu = ours(*(t.cpu().float() for t in (q, k, v)))
    assert rel_err(ours(q, k, v).cpu(), cpu) < 1e-2  # the CPU twin's elements


@pytest.mark.cuda
def test_dropout_on_cuda_varlen_and_graph_capture():
    lens = [0, 1, 70, 130]
    cu_q = cu(lens, "cuda")
    q, k, v = (rand((sum(lens), 4 if i == 0 else 2, 64), torch.bfloat16, "cuda") for i in range(3))
    call = seeded(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q,
                                                   max_seqlen_q=130, max_seqlen_k=130, dropout_p=0.2), 4)
    cpu = call(*(t.cpu().float() for t in (q, k, v)))
    assert rel_err(call(q, k, v).cpu(), cpu) < 1e-2
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(NotImplementedError, match="dropout inside a CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            pyllm.flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, max_seqlen_q=130,
                             max_seqlen_k=130, dropout_p=0.2)


def test_dropout_varlen_gqa_and_lse():
    # Packed sequences (empty and length-1 ones, Tq != Tk): sequence i's mask is dropout_mask(seed,
    # i, head, ...) over its own positions; the LSE is of the whole softmax, the same bits as
    # without dropout (flash-attn's).
    lens_q, lens_k = [0, 1, 70, 5, 130], [3, 1, 90, 0, 130]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    p = 0.3
    q = rand((sum(lens_q), 4, 64), torch.float32, "cpu")
    k, v = (rand((sum(lens_k), 2, 64), torch.float32, "cpu") for _ in range(2))
    dout = rand(q.shape, torch.float32, "cpu")
    draw = seeded_draw(5)

    def reference(q, k, v):
        outs = []
        for i in range(len(lens_q)):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            keep = torch.stack([fa.dropout_mask(draw, i, h, lens_q[i], lens_k[i], p) for h in range(4)])[None]
            outs.append(dropped_attention(q[None, qs], k[None, ks], v[None, ks], keep, p, causal=True)[0])
        return torch.cat(outs)

    call = lambda q, k, v, **kw: pyllm.flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    check_against_reference(q, k, v, dout, seeded(lambda q, k, v: call(q, k, v, dropout_p=p), 5), reference)
    torch.manual_seed(5)
    out, lse = call(q, k, v, dropout_p=p, return_lse=True)
    plain, plain_lse = call(q, k, v, return_lse=True)
    assert torch.equal(lse, plain_lse) and not torch.equal(out, plain)


def test_dropout_draws_repeat_and_differ():
    # One seed (torch.manual_seed) repeats the call bit for bit, the next call draws anew, p = 0 is
    # no dropout at all; heads, sequences and seeds each get their own masks.
    q, k, v = (rand((2, 40, 4, 32), torch.float32, "cpu") for _ in range(3))
    torch.manual_seed(0)
    a, b = pyllm.flash_attn(q, k, v, dropout_p=0.5), pyllm.flash_attn(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(pyllm.flash_attn(q, k, v, dropout_p=0.5), a) and not torch.equal(a, b)
    assert torch.equal(pyllm.flash_attn(q, k, v, dropout_p=0.0), pyllm.flash_attn(q, k, v))
    masks = [fa.dropout_mask(seed, i, h, 64, 64, 0.5) for seed in (1, 2) for i in (0, 1) for h in (0, 1)]
    for i, m in enumerate(masks):
        for other in masks[i + 1:]:
            assert (m == other).float().mean() < 0.56  # independent halves agree on ~50%


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**64 - 1), sequence=st.integers(0, 2**31 - 1), head=st.integers(0, 65535),
       p=st.floats(0.01, 0.99))
def test_dropout_mask_keeps_one_minus_p_independently(seed, sequence, head, p):
    # Kept fraction within 5 sigma of 1 - p, overall and per row / column (no row or column far off:
    # the rows' counts spread as a binomial's, not identical), and neighbouring rows, columns and
    # heads no more alike than independent draws.
    n = 256
    keep = fa.dropout_mask(seed, sequence, head, n, n, p).double()
    sigma = math.sqrt(p * (1 - p))
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma / n
    rows, cols = keep.mean(1), keep.mean(0)
    assert ((rows - (1 - p)).abs() < 6 * sigma / math.sqrt(n)).all() and ((cols - (1 - p)).abs() < 6 * sigma / math.sqrt(n)).all()
    assert 0.5 < rows.var().item() / (sigma**2 / n) < 1.6  # a binomial's spread
    other = fa.dropout_mask(seed, sequence, (head + 1) % 65536, n, n, p).double()
    for x, y in ((keep[1:], keep[:-1]), (keep[:, 1:], keep[:, :-1]), (keep, other)):
        corr = ((x - x.mean()) * (y - y.mean())).mean() / (x.std() * y.std())
        assert abs(corr.item()) < 5 / math.sqrt(x.numel())


@pytest.mark.level_free
def test_dropout_gradcheck_opcheck_and_checkpoint():
    q, k, v = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 9, 4, 32), (2, 13, 2, 32),
                                                                                (2, 13, 2, 32)))
    assert torch.autograd.gradcheck(
        seeded(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, dropout_p=0.4, return_lse=True), 3), (q, k, v))
    seed = torch.tensor([12345], dtype=torch.int64)
    args = (q.detach(), k.detach(), v.detach(), None, None, -1, -1, 0.25, -1, 0, False, 0.0, None, 0.4, seed)
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, args)
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, tuple(t.clone().requires_grad_() for t in args[:3]) + args[3:])
    # Activation checkpointing recomputes the forward under the saved RNG state: the same elements.
    from torch.utils.checkpoint import checkpoint
    f = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, dropout_p=0.4).sum()  # noqa: E731
    torch.manual_seed(8)
    grads = torch.autograd.grad(f(q, k, v), (q, k, v))
    torch.manual_seed(8)
    grads_ckpt = torch.autograd.grad(checkpoint(f, q, k, v, use_reentrant=False), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))


def test_dropout_under_vmap_follows_its_randomness_flag():
    # torch.vmap's randomness: "error" (the default) refuses the seed's draw; "same" gives every example
    # one call's mask, gradients too (examples folded into the batch had each drawn other sequences'
    # masks); "different" gives each example its own.
    q, k, v = (rand((3, 2, 24, 2, 32), torch.float32, "cpu") for _ in range(3))
    f = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, dropout_p=0.5)  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness"):
        torch.vmap(f)(q, k, v)
    vjp = lambda q, k, v: torch.func.vjp(f, q, k, v)[1](torch.ones_like(q))  # noqa: E731
    torch.manual_seed(1)
    same, same_grads = torch.vmap(f, randomness="same")(q, k, v), torch.vmap(vjp, randomness="same")(q, k, v)
    for i in range(3):
        torch.manual_seed(1)
        want = f(q[i], k[i], v[i])
        want_grads = vjp(q[i], k[i], v[i])
        assert torch.equal(same[i], want)
        assert all(torch.equal(g[i], w) for g, w in zip(same_grads, want_grads))
    alike = [t[:1].expand(3, *t.shape[1:]) for t in (q, k, v)]  # every example the same inputs
    torch.manual_seed(1)
    out = torch.vmap(f, randomness="different")(*alike)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2]) and not torch.equal(out[0], out[2])
    torch.manual_seed(1)
    out = torch.vmap(f, randomness="same")(*alike)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@pytest.mark.level_free
def test_dropout_compiles_and_checks():
    torch._dynamo.reset()

    def block(x, w):
        qkv = (x @ w).view(1, 12, 3, 2, 32)
        return pyllm.flash_attn(*qkv.unbind(dim=2), causal=True, dropout_p=0.5)

    x, w = torch.randn(12, 16), torch.randn(16, 192, requires_grad=True)
    out = torch.compile(block, fullgraph=True)(x, w)  # no graph break: the seed is drawn in the graph
    qkv = (x @ w).view(1, 12, 3, 2, 32).unbind(dim=2)
    plain = pyllm.flash_attn(*qkv, causal=True)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    (g,) = torch.autograd.grad(out.sum(), w)
    assert torch.isfinite(g).all()
    q = torch.randn(1, 5, 2, 32)
    for bad in (-0.1, 1.0, math.nan, "0.1"):
        with pytest.raises(ValueError, match="dropout_p must be a number in \\[0, 1\\)"):
            pyllm.flash_attn(q, q, q, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p > 0 needs dropout_seed"):
        torch.ops.pyllm.flash_attn(q, q, q, None, None, -1, -1, 0.25, -1, -1, False, 0.0, None, 0.5, None)
    with pytest.raises(ValueError, match="dropout_p must be in \\[0, 1\\)"):
        torch.ops.pyllm.flash_attn(q, q, q, None, None, -1, -1, 0.25, -1, -1, False, 0.0, None, 1.5,
                                   torch.tensor([1]))


def cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_idx", [0, 1])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (7, -1)), (False, (4, 9))])
def test_varlen_matches_reference(device, dtype_idx, causal, window, monkeypatch):
    nan_filled_empty(monkeypatch)  # rows a kernel leaves unwritten show, not the allocator's zeros
    dtype = DTYPES_BY_DEVICE[device][dtype_idx]
    lens_q, lens_k = [0, 1, 70, 5, 0, 130, 3], [0, 1, 70, 9, 4, 130, 0]  # empty, length-1, Tq != Tk
    cu_q, cu_k = cu(lens_q, device), cu(lens_k, device)
    h, hk, d = 4, 2, 64
    q, k, v = rand((sum(lens_q), h, d), dtype, device), rand((sum(lens_k), hk, d), dtype, device), rand((sum(lens_k), hk, d), dtype, device)
    dout = rand(q.shape, dtype, device)
    kw = dict(causal=causal, window=window)
    check_against_reference(
        q, k, v, dout,
        lambda q, k, v: pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw),
        lambda q, k, v: attention_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), **kw)[0],
    )
    out, lse = pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=130, max_seqlen_k=130,
                                return_lse=True, **kw)
    ref, ref_lse = attention_varlen(q.double().cpu(), k.double().cpu(), v.double().cpu(), cu_q.cpu(), cu_k.cpu(), **kw)
    assert lse.shape == (h, sum(lens_q))
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), ~seen)
    torch_out, torch_lse = attention_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), **kw)
    assert rel_err(out, ref) <= tolerance(torch_out, ref)
    assert rel_err(lse.cpu()[seen], ref_lse[seen]) <= tolerance(torch_lse[seen], ref_lse[seen])


# --- layout, determinism, every element written ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_no_keys_or_no_queries_at_all(device):
    # Every sequence empty on one side while max_seqlen says up to 8: empty k / v (or q) tensors
    # have null data pointers, which must not be taken for missing inputs.
    dtype = DTYPES_BY_DEVICE[device][1]
    q, k, v = rand((6, 2, 64), dtype, device), rand((0, 2, 64), dtype, device), rand((0, 2, 64), dtype, device)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in ([0, 2, 6], [0, 0, 0]))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = pyllm.flash_attn(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=8, max_seqlen_k=8,
                                return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == math.inf).all())
    dq = torch.autograd.grad(out, leaves[0], torch.ones_like(out))[0]
    assert torch.equal(dq, torch.zeros_like(dq))
    leaves = [t.clone().requires_grad_() for t in (k.new_empty(0, 2, 64), q, q)]  # no queries, 6 keys
    out = pyllm.flash_attn(*leaves, cu_seqlens_q=cu_k, cu_seqlens_k=cu_q, max_seqlen_q=8, max_seqlen_k=8)
    assert out.shape == (0, 2, 64)
    dk, dv = torch.autograd.grad(out, leaves[1:], torch.ones_like(out))
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_varlen_takes_strided_cu_seqlens_and_any_max_seqlen():
    # cu_seqlens views with a step (their other elements are not the bounds) and max_seqlen far past
    # the tokens packed (which only sizes the work): the same bits as the plain call. Before, the
    # kernel read a view's raw memory (rows left unwritten: 6.9e34 out), 2^40 ran for an hour and
    # sys.maxsize overflowed the work to nothing (garbage out). Found by a fuzz audit, 2026-12-03.
    import sys

    q, k, v = (rand((20, h, 64), torch.float32, "cpu") for h in (4, 2, 2))
    cu_q, cu_k = torch.tensor([0, 5, 20], dtype=torch.int32), torch.tensor([0, 10, 20], dtype=torch.int32)
    want = pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    strided_q = torch.tensor([0, 2, 5, 6, 20], dtype=torch.int32)[::2]
    strided_k = torch.tensor([0, 2, 10, 6, 20], dtype=torch.int32)[::2]
    assert not strided_q.is_contiguous()
    assert torch.equal(pyllm.flash_attn(q, k, v, cu_seqlens_q=strided_q, cu_seqlens_k=strided_k, causal=True), want)
    for huge in (2 ** 40, sys.maxsize):
        got = pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, max_seqlen_q=huge,
                               max_seqlen_k=huge)
        assert torch.equal(got, want)


def test_strided_views_of_packed_qkv_match_contiguous():
    qkv = torch.randn(2, 50, 3, 4, 64, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    expected = pyllm.flash_attn(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(pyllm.flash_attn(q, k, v, causal=True), expected)
    # Transposed (B, H, T, D) storage seen as (B, T, H, D): token stride 64, head stride T * 64.
    qt = torch.randn(2, 4, 50, 64).transpose(1, 2)
    assert torch.equal(pyllm.flash_attn(qt, qt, qt), pyllm.flash_attn(*(qt.contiguous(),) * 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_deterministic(dtype):
    # The same bits on every run and for any thread count (bf16: on AMX tiles where this CPU has them).
    q, k, v = (torch.randn(2, 150, h, 64, dtype=dtype) for h in (4, 1, 1))
    dout = torch.randn(2, 150, 4, 64, dtype=dtype)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            runs.append(grads_of(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, deterministic=True),
                                 (q, k, v), dout)[1])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_ignores_scratch_of_earlier_calls(dtype):
    # The CPU backward keeps per-thread scratch (q, dout, dq of a GQA group) across calls; a larger
    # call full of NaN before must not leak into a smaller one after.
    q, k, v = torch.randn(1, 70, 4, 32, dtype=dtype), torch.randn(1, 90, 2, 32, dtype=dtype), torch.randn(1, 90, 2, 32, dtype=dtype)
    dout = torch.randn(1, 70, 4, 32, dtype=dtype)
    fn = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True)  # noqa: E731
    before = grads_of(fn, (q, k, v), dout)[1]
    big = torch.full((2, 300, 4, 32), float("nan"), dtype=dtype)
    grads_of(fn, (big, big[:, :, :2], big[:, :, :2]), big)
    after = grads_of(fn, (q, k, v), dout)[1]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_every_output_element_is_written():
    # Poisoned outputs; keys that no query sees must get dk = dv = 0, queries that see no key dq = 0.
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = torch.randn(2, 67, 4, 32, dtype=dtype), torch.randn(2, 131, 2, 32, dtype=dtype), torch.randn(2, 131, 2, 32, dtype=dtype)
        out, lse = poisoned(q.shape, dtype, "cpu"), poisoned((2, 4, 67), torch.float32, "cpu")
        fa.flash_attn_forward_into(q, k, v, out, lse, None, None, 67, 131, 0.2, 3, 0)
        dq, dk, dv = poisoned(q.shape, dtype, "cpu"), poisoned(k.shape, dtype, "cpu"), poisoned(v.shape, dtype, "cpu")
        dout = torch.randn_like(out)
        fa.flash_attn_backward_into(dout, None, q, k, v, out, lse, dq, dk, dv, None, None, 67, 131, 0.2, 3, 0, True)
        for t in (out, lse, dq, dk, dv):
            assert not t.isnan().any()
        assert torch.equal(dk[:, :60], torch.zeros_like(dk[:, :60]))  # keys before the first window


# --- the CUDA backward's two implementations (PYLLM_ATTN_BWD=mma|simt) ---------------------------

BWD_ALGOS = ["mma", "simt"]
# Several query and key blocks of both kernels (64 / 32 / 16-wide tiles), block edges not on tile
# edges, GQA 4:1 and 2:1, MQA, every head dim.
BWD_SHAPES = SHAPES + [(1, 200, 200, 4, 2, 128), (2, 150, 90, 8, 2, 64), (1, 97, 161, 2, 1, 256)]


@pytest.mark.cuda
@pytest.mark.parametrize("algo", BWD_ALGOS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (16, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_cuda_backward_matches_reference(monkeypatch, algo, dtype, shape, causal, window):
    monkeypatch.setenv("PYLLM_ATTN_BWD", algo)
    b, tq, tk, h, hk, d = shape
    q, k, v = rand((b, tq, h, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda")
    dout = rand((b, tq, h, d), dtype, "cuda")
    check_against_reference(
        q, k, v, dout,
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window),
        lambda q, k, v: attention(q, k, v, causal, window)[0],
    )


@pytest.mark.cuda
@pytest.mark.parametrize("algo", BWD_ALGOS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [32, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backward_varlen_matches_reference(monkeypatch, algo, dtype, d, causal):
    monkeypatch.setenv("PYLLM_ATTN_BWD", algo)
    lens_q, lens_k = [0, 1, 70, 5, 0, 130, 3, 1], [0, 1, 70, 9, 4, 130, 0, 66]  # empty, length-1, Tq != Tk
    cu_q, cu_k = cu(lens_q, "cuda"), cu(lens_k, "cuda")
    h, hk = 4, 2
    q = rand((sum(lens_q), h, d), dtype, "cuda")
    k, v = rand((sum(lens_k), hk, d), dtype, "cuda"), rand((sum(lens_k), hk, d), dtype, "cuda")
    check_against_reference(
        q, k, v, rand(q.shape, dtype, "cuda"),
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
        lambda q, k, v: attention_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), causal=causal)[0],
    )


@pytest.mark.cuda
@pytest.mark.parametrize("algo", BWD_ALGOS)
def test_cuda_backward_bitwise_deterministic_and_writes_everything(monkeypatch, algo):
    monkeypatch.setenv("PYLLM_ATTN_BWD", algo)
    q, k, v = (rand((2, 150, h, 128), torch.bfloat16, "cuda") for h in (8, 2, 2))
    dout = rand(q.shape, torch.bfloat16, "cuda")
    runs = [grads_of(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, deterministic=True), (q, k, v), dout)[1]
            for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    # Poisoned outputs: keys no query sees get dk = dv = 0, queries that see no key dq = 0.
    q, k, v = (rand(shape, torch.float16, "cuda") for shape in ((2, 67, 4, 64), (2, 131, 2, 64), (2, 131, 2, 64)))
    out, lse = torch.empty_like(q), torch.empty(2, 4, 67, device="cuda")
    fa.flash_attn_forward_into(q, k, v, out, lse, None, None, 67, 131, 0.2, 3, 0)
    dq, dk, dv = (poisoned(t.shape, t.dtype, "cuda") for t in (q, k, v))
    fa.flash_attn_backward_into(rand(q.shape, torch.float16, "cuda"), None, q, k, v, out, lse, dq, dk, dv, None, None,
                                67, 131, 0.2, 3, 0, True, algo=algo)
    for t in (dq, dk, dv):
        assert not t.isnan().any()
    assert torch.equal(dk[:, :60], torch.zeros_like(dk[:, :60]))  # keys before the first window


@pytest.mark.cuda
@pytest.mark.parametrize("algo", BWD_ALGOS)
def test_cuda_misaligned_views_are_copied_not_rejected(monkeypatch, algo):
    # Contiguous views one element into a buffer: 2-byte aligned, not the 16 bytes cp.async needs.
    monkeypatch.setenv("PYLLM_ATTN_BWD", algo)
    shape, n = (1, 33, 2, 64), 33 * 2 * 64
    bases = [rand((n + 1,), torch.bfloat16, "cuda").requires_grad_() for _ in range(3)]
    q, k, v = (b[1:].view(shape) for b in bases)
    dout = rand((n + 1,), torch.bfloat16, "cuda")[1:].view(shape)
    assert q.data_ptr() % 16 and dout.data_ptr() % 16
    out = pyllm.flash_attn(q, k, v, causal=True)
    grads = [g[1:].view(shape) for g in torch.autograd.grad(out, bases, dout)]
    # The same values, aligned: the kernels are deterministic, so the copies must give the same bits.
    aligned_out, aligned_grads = grads_of(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True), (q, k, v),
                                          dout.clone())
    assert torch.equal(out, aligned_out)
    for a, b in zip(grads, aligned_grads):
        assert torch.equal(a, b)


# --- taller tiles of the CUDA kernels (PYLLM_ATTN_FWD_BLOCK_M, _BWD_DQ_BLOCK_M, _BWD_DKV_BLOCK_N=128) ------

# Several 128-row query blocks with partial last ones, Tq < Tk and Tq > Tk (queries that see no
# key), GQA and MQA, both head dims the 128-row tiles are built for; D = 32 checks that the setting
# leaves other head dims on the 64-row tiles.
FWD_SHAPES = [(2, 1, 1, 2, 2, 64), (2, 65, 130, 4, 2, 64), (1, 100, 37, 4, 1, 128), (1, 300, 300, 4, 2, 128),
              (2, 129, 257, 8, 1, 64), (1, 257, 129, 2, 2, 128), (1, 77, 77, 4, 4, 32)]


def forward_with_block_m(monkeypatch, block_m, q, k, v, causal, window):
    """out and lse of the forward kernel with poisoned outputs, PYLLM_ATTN_FWD_BLOCK_M=block_m."""
    monkeypatch.setenv("PYLLM_ATTN_FWD_BLOCK_M", block_m)
    (b, tq, h, d), tk = q.shape, k.shape[1]
    out, lse = poisoned(q.shape, q.dtype, "cuda"), poisoned((b, h, tq), torch.float32, "cuda")
    fa.flash_attn_forward_into(q, k, v, out, lse, None, None, tq, tk, d ** -0.5, window[0], 0 if causal else window[1])
    return out, lse


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (100, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=str)
def test_cuda_forward_128_row_tiles_match_reference(monkeypatch, dtype, shape, causal, window):
    b, tq, tk, h, hk, d = shape
    q, k, v = rand((b, tq, h, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda")
    out, lse = forward_with_block_m(monkeypatch, "128", q, k, v, causal, window)
    ref, ref_lse = attention(*(t.double().cpu() for t in (q, k, v)), causal, window)
    assert rel_err(out, ref) <= tolerance(attention(q, k, v, causal, window)[0], ref)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), ~seen)  # +inf where a query sees no key, never NaN
    torch_lse = attention(q, k, v, causal, window)[1].cpu()
    assert rel_err(lse.cpu()[seen], ref_lse[seen]) <= tolerance(torch_lse[seen], ref_lse[seen])
    unseen_rows = out.cpu()[~seen.transpose(1, 2)]
    assert torch.equal(unseen_rows, torch.zeros_like(unseen_rows))
    # The same bits as the 64-row tiles: every row takes the same steps, plus key blocks that only
    # its tile's other rows need, fully masked for it (o * 1 + 0, l * 1 + 0).
    out_64, lse_64 = forward_with_block_m(monkeypatch, "64", q, k, v, causal, window)
    assert torch.equal(out, out_64) and torch.equal(lse, lse_64)


TALL_TILES_ENV = {"fwd": "PYLLM_ATTN_FWD_BLOCK_M", "dq": "PYLLM_ATTN_BWD_DQ_BLOCK_M", "dkv": "PYLLM_ATTN_BWD_DKV_BLOCK_N"}


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["dq", "dkv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (20, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=str)
def test_cuda_backward_128_row_tiles_match_reference(monkeypatch, kernel, dtype, shape, causal, window):
    # The backward's taller tiles: the dq kernel's 128 query rows (PYLLM_ATTN_BWD_DQ_BLOCK_M=128, D =
    # 64 / 128) or the dk_dv kernel's 128 keys (PYLLM_ATTN_BWD_DKV_BLOCK_N=128, D = 64): gradients
    # within twice torch's error, and the same bits as the default tiles where a tile's first key
    # (dq: no left window) or first query (dk_dv: no right window) cannot move (BwdQTile, BwdKVTile).
    b, tq, tk, h, hk, d = shape
    q, k, v = rand((b, tq, h, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda")
    dout = rand((b, tq, h, d), dtype, "cuda")
    run = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window)  # noqa: E731
    monkeypatch.setenv(TALL_TILES_ENV[kernel], "128")
    check_against_reference(q, k, v, dout, run, lambda q, k, v: attention(q, k, v, causal, window)[0])
    same_bits = window[0] < 0 if kernel == "dq" else not causal and window[1] < 0
    if same_bits:
        tall = grads_of(run, (q, k, v), dout)[1]
        monkeypatch.setenv(TALL_TILES_ENV[kernel], "64")
        for a, b_ in zip(tall, grads_of(run, (q, k, v), dout)[1]):
            assert torch.equal(a, b_)


def cuda_varlen_case(dtype, d, causal):
    """Packed sequences of 0, 1, 130, 5, 0, 260, 3 and 1 queries (keys 0, 1, 70, 9, 4, 260, 0, 200:
    empty, length-1, Tq != Tk, a sequence with queries and no keys), GQA 4:2 on CUDA, checked against
    the float64 reference, forward and backward. Returns (run, (q, k, v), cu_q)."""
    lens_q, lens_k = [0, 1, 130, 5, 0, 260, 3, 1], [0, 1, 70, 9, 4, 260, 0, 200]
    cu_q, cu_k = cu(lens_q, "cuda"), cu(lens_k, "cuda")
    q = rand((sum(lens_q), 4, d), dtype, "cuda")
    k, v = rand((sum(lens_k), 2, d), dtype, "cuda"), rand((sum(lens_k), 2, d), dtype, "cuda")
    run = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)  # noqa: E731
    check_against_reference(q, k, v, rand(q.shape, dtype, "cuda"), run,
                            lambda q, k, v: attention_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), causal=causal)[0])
    return run, (q, k, v), cu_q


@pytest.mark.cuda
@pytest.mark.parametrize("tiles", ["fwd", "dq", "dkv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_128_row_tiles_varlen_and_gradients(monkeypatch, tiles, dtype, d, causal):
    env = TALL_TILES_ENV[tiles]
    monkeypatch.setenv(env, "128")
    run, (q, k, v), _ = cuda_varlen_case(dtype, d, causal)
    if tiles == "fwd":
        out_128 = run(q, k, v)
        monkeypatch.setenv(env, "64")
        assert torch.equal(out_128, run(q, k, v))  # the same bits, as above


# --- the atomic-dQ backward (PYLLM_ATTN_BWD=atomic, deterministic=False; D = 64 / 128, sm_90) -----

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)  # (fp16: the varlen test below; only the mma differs)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (20, -1))],
                         ids=str)
@pytest.mark.parametrize("shape", [s for s in BWD_SHAPES if s[-1] in (64, 128)] + [(2, 150, 70, 4, 1, 64)], ids=str)
def test_cuda_atomic_dq_backward_matches_reference(monkeypatch, dtype, shape, causal, window):
    # dQ added into an fp32 buffer by the dk_dv kernel (no dq kernel; flash-attn's default): dq
    # within twice torch's error, dk and dv the same sums as the deterministic kernels' (same
    # bits); with deterministic=True the deterministic kernels whatever the setting. The last
    # shape is causal with Tq > Tk: queries that see no key get dq = 0.
    b, tq, tk, h, hk, d = shape
    q, k, v = rand((b, tq, h, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda"), rand((b, tk, hk, d), dtype, "cuda")
    dout = rand((b, tq, h, d), dtype, "cuda")
    run = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window)  # noqa: E731
    run_det = lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window, deterministic=True)  # noqa: E731
    monkeypatch.setenv("PYLLM_ATTN_BWD", "atomic")
    check_against_reference(q, k, v, dout, run, lambda q, k, v: attention(q, k, v, causal, window)[0])
    atomic, atomic_det = grads_of(run, (q, k, v), dout)[1], grads_of(run_det, (q, k, v), dout)[1]
    monkeypatch.setenv("PYLLM_ATTN_BWD", "mma")
    mma = grads_of(run, (q, k, v), dout)[1]
    assert torch.equal(atomic[1], mma[1]) and torch.equal(atomic[2], mma[2])
    for a, b_ in zip(atomic_det, mma):
        assert torch.equal(a, b_)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_atomic_dq_varlen_and_poisoned_outputs(monkeypatch, dtype, d, causal):
    monkeypatch.setenv("PYLLM_ATTN_BWD", "atomic")
    run, (q, k, v), cu_q = cuda_varlen_case(dtype, d, causal)
    # The sequence of 3 queries and no keys gets dq = 0; through the raw entry point, a poisoned dq
    # is written everywhere.
    seg = cu_q[6:8].tolist()
    grads = grads_of(run, (q, k, v), rand(q.shape, dtype, "cuda"))[1]
    assert torch.equal(grads[0][seg[0]:seg[1]], torch.zeros_like(grads[0][seg[0]:seg[1]]))
    qd = rand((2, 67, 4, d), dtype, "cuda")
    kd, vd = rand((2, 131, 2, d), dtype, "cuda"), rand((2, 131, 2, d), dtype, "cuda")
    out, lse = torch.empty_like(qd), torch.empty(2, 4, 67, device="cuda")
    fa.flash_attn_forward_into(qd, kd, vd, out, lse, None, None, 67, 131, 0.2, 3, 0)
    dq, dk, dv = (poisoned(t.shape, t.dtype, "cuda") for t in (qd, kd, vd))
    fa.flash_attn_backward_into(rand(qd.shape, dtype, "cuda"), None, qd, kd, vd, out, lse, dq, dk, dv, None, None,
                                67, 131, 0.2, 3, 0, False, algo="atomic")
    assert not dq.isnan().any()


def test_emulated_tensor_core_kernels_match_reference():
    # tools/flash_attn_mma_emulate.py transliterates the CUDA kernels' index logic (tiles, swizzle,
    # ldmatrix / mma fragments, masks) to numpy: one of its cases runs, so that it stays runnable.
    # (The kernels themselves, the 128-row tiles and varlen included, run on the CPU in
    # test_cuda_emu.py, their own source through tools/cuda_emu; this case took 9 s of the 40 that
    # the 128-row ones here had added.)
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "flash_attn_mma_emulate.py"
    spec = importlib.util.spec_from_file_location("flash_attn_mma_emulate", path)
    em = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(em)
    case = em.CASES[2]  # Tq != Tk, a window, GQA, two query blocks
    assert max(em.run_fwd(**case)[:2]) < 1e-9 and max(em.run_bwd(**case)) < 1e-9


def test_bwd_algo_choice_is_checked(monkeypatch):
    assert fa._cuda_bwd_algo("simt") == 1 and fa._cuda_bwd_algo(None) == 0 and fa._cuda_bwd_algo("atomic") == 2
    monkeypatch.setenv("PYLLM_ATTN_BWD", "simt")
    assert fa._cuda_bwd_algo(None) == 1
    monkeypatch.setenv("PYLLM_ATTN_BWD", "wmma")
    with pytest.raises(ValueError, match="mma, simt"):
        fa._cuda_bwd_algo(None)


# --- autograd through lse, gradcheck, opcheck, torch.compile ------------------------------------

@pytest.mark.parametrize("device,algo", [("cpu", None)] + [pytest.param("cuda", a, marks=pytest.mark.cuda) for a in BWD_ALGOS])
def test_backward_takes_lse_with_free_size1_strides(device, algo):
    # (1, H, Tq) with strides (Tq, Tq, 1) is contiguous to torch (a size-1 dim's stride is free).
    # CPU: the raw backward took it for a layout that does not fit. CUDA: the backward's delta
    # scratch, laid out like lse, must still hold B * H * Tq rows (it was sized batch *
    # lse_strides[0] = Tq); run it under compute-sanitizer to see the out-of-bounds writes the old
    # sizing made. Same bits as with the usual strides.
    dtype = DTYPES_BY_DEVICE[device][0]
    q, k, v = (rand((1, 40, h, 64), dtype, device) for h in (4, 2, 2))
    out, lse = torch.empty_like(q), torch.empty(1, 4, 40, device=device)
    fa.flash_attn_forward_into(q, k, v, out, lse, None, None, 40, 40, 0.125, -1, 0)
    odd = torch.empty(4, 1, 40, device=device).transpose(0, 1)
    odd.copy_(lse)
    assert odd.is_contiguous() and odd.stride(0) == 40
    dout = rand(q.shape, dtype, device)
    grads = []
    for lse_in in (lse, odd):
        dq, dk, dv = (poisoned(t.shape, t.dtype, device) for t in (q, k, v))
        fa.flash_attn_backward_into(dout, None, q, k, v, out, lse_in, dq, dk, dv, None, None, 40, 40, 0.125, -1, 0,
                                    True, algo=algo)
        grads.append((dq, dk, dv))
    if device == "cuda":
        torch.cuda.synchronize()
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def subprocess_env():
    """The environment for a child Python that must import this checkout's pyllm (the one under test),
    not whichever one is installed: it runs from tests/, where `import pyllm` would find the latter."""
    import os

    root = str(Path(pyllm.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def check_bf16_in_subprocess(env: dict, path_check: str, shapes: str, options: str) -> None:
    """bf16 forward + backward against float64 (check_against_reference) in a child Python with
    `env` set: the CPU path switches are read once per process. path_check asserts the child took
    the path meant; shapes lists (b, tq, tk, h, hk, d), options (causal, window) pairs."""
    import subprocess
    import sys

    code = (
        "import torch, pyllm\n"
        "from pyllm import _C\n"
        "from test_flash_attn import check_against_reference, attention, rand\n"
        f"{path_check}\n"
        "torch.manual_seed(0)\n"
        f"for b, tq, tk, h, hk, d in {shapes}:\n"
        "    q, k, v, dout = (rand(s, torch.bfloat16, 'cpu') for s in ((b, tq, h, d), (b, tk, hk, d), (b, tk, hk, d), (b, tq, h, d)))\n"
        f"    for causal, window in {options}:\n"
        "        check_against_reference(q, k, v, dout, lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window),\n"
        "                                lambda q, k, v: attention(q, k, v, causal, window)[0])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env={**subprocess_env(), **env},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.skipif("avx512bf16" not in _C.cpu_isa, reason="this build has one bf16 path only")
@pytest.mark.parametrize("dot", ["0", "1"])
def test_cpu_bf16_paths_match_reference(dot):
    # bf16 takes vdpbf16ps scores or fp32 tiles, chosen once per process by CPU vendor (or
    # PYLLM_ATTN_CPU_BF16_DOT): whichever this machine picks, the other runs here too (AMX off, so
    # that both forwards run too).
    check_bf16_in_subprocess({"PYLLM_ATTN_CPU_BF16_DOT": dot, "PYLLM_ATTN_CPU_AMX": "0"},
                             f"assert _C.flash_attn_cpu_bf16_dot() == {dot == '1'}",
                             "[(2, 65, 130, 4, 2, 64), (1, 100, 37, 4, 1, 128), (1, 40, 70, 2, 1, 256)]",
                             "((False, (-1, -1)), (True, (-1, -1)))")


@pytest.mark.skipif(_C.flash_attn_cpu_amx() == "unavailable", reason="no AMX-BF16 (CPU, kernel or build)")
@pytest.mark.parametrize("amx", ["0", "1"])
def test_cpu_amx_matches_reference(amx):
    # The bf16 forward and backward run on AMX tiles where the CPU and kernel allow it
    # (PYLLM_ATTN_CPU_AMX=0 turns them off): both paths against float64, every head dim, partial
    # blocks, GQA, causal and windows.
    check_bf16_in_subprocess({"PYLLM_ATTN_CPU_AMX": amx},
                             f"assert _C.flash_attn_cpu_amx() == {'on' if amx == '1' else 'off'!r}, _C.flash_attn_cpu_amx()",
                             "[(2, 65, 130, 4, 2, 64), (1, 100, 37, 4, 1, 128), (1, 40, 70, 2, 1, 256), "
                             "(1, 130, 130, 2, 2, 32), (1, 33, 97, 2, 1, 96)]",
                             "((False, (-1, -1)), (True, (-1, -1)), (False, (20, 5)))")


def test_cpu_memory_is_linear_in_t():
    # Forward + backward at T = 4096 (one head): a T x T fp32 score matrix would be 64 MiB; the
    # tiled kernels need the outputs, gradients and O(T) per-thread rows, well under a quarter of it.
    t, d = 4096, 32
    q, k, v, dout = (torch.randn(1, t, 1, d) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    step = lambda: torch.autograd.grad(pyllm.flash_attn(*leaves), leaves, dout)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))  # per-thread O(T) rows: bounded on a many-core machine too
    try:
        step()  # thread pools, thread-local buffers
        grown = peak_rss_growth_mib(step)
    finally:
        torch.set_num_threads(threads)
    if grown is None:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    assert grown < t * t * 4 / 2**20 / 4, f"peak RSS grew {grown:.1f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_scratch_kept_between_calls_is_bounded(dtype):
    # The CPU kernels keep per-thread scratch for the next call (K / V of a head in the forward;
    # Q, dO, dQ of a GQA group in the backward) up to 32 MB per thread and kernel; a call that
    # needed more frees its thread's at the end instead of keeping it until exit.
    held = _C.flash_attn_cpu_scratch_bytes
    d = 64
    # Forward: one head (one work item, one thread), 64 queries against 150k keys: at least 4 kept
    # bytes per key element whatever the path (bf16 on AMX tiles; fp32 tiles 8), 38 MB.
    q = torch.randn(1, 64, 1, d, dtype=dtype)
    k, v = (torch.randn(1, 150_000, 1, d, dtype=dtype) for _ in range(2))
    before = held()
    pyllm.flash_attn(q, k, v)
    after_long = held()
    assert after_long <= before, (before, after_long)
    pyllm.flash_attn(q, k[:, :1000], v[:, :1000])
    assert held() > after_long  # short calls keep theirs
    # Backward: MQA with 8 query heads, varlen with one non-empty sequence among 8 (one work item,
    # no query chunks): at least 12 kept bytes per query element (q, dO, dQ), 8 x 6000 x 64 x 12 B
    # = 37 MB.
    lens_q, lens_k = [6000] + [0] * 7, [16] + [0] * 7
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    q = torch.randn(6000, 8, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(16, 1, d, dtype=dtype, requires_grad=True) for _ in range(2))
    out = pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    before = held()
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    after_long = held()
    assert after_long <= before, (before, after_long)
    out = pyllm.flash_attn(q[:100], k, v, cu_seqlens_q=cu_q.clamp(max=100), cu_seqlens_k=cu_k)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert held() > after_long


def test_cpu_scratch_kept_by_a_thread_is_bounded_over_every_kernel():
    # Each kernel (head dim x dtype x forward / backward, AMX or not) keeps its own buffers: the bound
    # is per thread over all of them (64 MB), not 32 MB per kernel (one long call of each head dim and
    # dtype had left a thread holding 375 MB for good). One thread, one head: one work item per call.
    held = _C.flash_attn_cpu_scratch_bytes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = held()
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for d in (64, 128):  # K and V of the head: ~20-30 MB, under the per-kernel bound each
                keys = (20 << 20) // (2 * d * (8 if dtype == torch.float64 else 4))
                q = torch.randn(1, 64, 1, d, dtype=dtype)
                k, v = (torch.randn(1, keys, 1, d, dtype=dtype) for _ in range(2))
                pyllm.flash_attn(q, k, v)
                assert held() - start <= 64 << 20, (dtype, d, (held() - start) / 2**20)
    finally:
        torch.set_num_threads(threads)


def test_gradient_through_lse():
    q, k, v = (torch.randn(1, 20, 2, 32, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, 2, 20, dtype=torch.float64)

    def loss(q, k, v):
        out, lse = pyllm.flash_attn(q, k, v, causal=True, return_lse=True)
        return out.sum() + (lse * w).sum()

    def loss_ref(q, k, v):
        out, lse = attention(q, k, v, causal=True)
        return out.sum() + (lse * w).sum()

    _, ours = grads_of(loss, (q, k, v), torch.tensor(1.0, dtype=torch.float64))
    _, ref = grads_of(loss_ref, (q, k, v), torch.tensor(1.0, dtype=torch.float64))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.level_free
def test_gradcheck_float64():
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    q, k, v = leaf(1, 9, 4, 32), leaf(1, 13, 2, 32), leaf(1, 13, 2, 32)
    assert torch.autograd.gradcheck(lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, window=(6, -1)), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: pyllm.flash_attn(q, k, v, return_lse=True), (q, k, v))
    cu_q, cu_k = cu([3, 0, 6]), cu([4, 2, 7])
    q, k, v = leaf(9, 2, 32), leaf(13, 1, 32), leaf(13, 1, 32)
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), (q, k, v))


@pytest.mark.level_free
def test_opcheck():
    q, k, v = torch.randn(2, 9, 4, 32), torch.randn(2, 11, 2, 32), torch.randn(2, 11, 2, 32)
    args = (q, k, v, None, None, -1, -1, 0.25, -1, 0, False)
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, args)
    grad_args = tuple(t.clone().requires_grad_() for t in (q, k, v)) + args[3:]
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, grad_args)
    cu_q, cu_k = cu([4, 5]), cu([5, 6])
    varlen = (q[0], k[0], v[0], cu_q, cu_k, 5, 6, 0.25, 2, 1, False)
    torch.library.opcheck(torch.ops.pyllm.flash_attn.default, varlen)
    out, lse = torch.ops.pyllm.flash_attn(*args)
    torch.library.opcheck(torch.ops.pyllm.flash_attn_backward.default,
                          (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *args[3:]))
    cache = torch.zeros(2, 16, 2, 32)
    torch.library.opcheck(torch.ops.pyllm.flash_attn_with_kvcache.default,
                          (q[:, :1], cache, cache.clone(), torch.tensor([3, 5], dtype=torch.int32),
                           torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32), 0.25, -1, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_inference_call_matches_the_op(dtype):
    # Plain eager CPU calls without autograd run the op's body directly (pyllm/ops/_util.py):
    # the same bits as through the op.
    q = torch.randn(2, 37, 4, 64, dtype=dtype)
    k, v = (torch.randn(2, 50, 2, 64, dtype=dtype) for _ in range(2))
    out, lse = pyllm.flash_attn(q, k, v, causal=True, window=(20, -1), softmax_scale=0.3, return_lse=True)
    out_op, lse_op = torch.ops.pyllm.flash_attn(q, k, v, None, None, -1, -1, 0.3, 20, 0, False)
    assert torch.equal(out, out_op) and torch.equal(lse, lse_op)
    cu_q, cu_k = cu([30, 0, 7]), cu([20, 5, 25])
    out = pyllm.flash_attn(q[0], k[0], v[0], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out_op, _ = torch.ops.pyllm.flash_attn(q[0], k[0], v[0], cu_q, cu_k, 30, 25, 0.125, -1, -1, False)
    assert torch.equal(out, out_op)


def test_flags_must_be_bools():
    q = torch.randn(1, 4, 1, 32)
    for name in ("causal", "deterministic", "return_lse"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got 'no'"):  # a string had been truthy
            pyllm.flash_attn(q, q, q, **{name: "no"})
    assert torch.equal(pyllm.flash_attn(q, q, q, causal=np.True_), pyllm.flash_attn(q, q, q, causal=1))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_zero_scale_is_uniform_attention_under_masks(device):
    """softmax_scale=0: every key a query sees weighs the same (the prefix mean under causal). The
    bf16 forward and backward on AMX tiles had given NaN rows (the masked -inf scores times the zero
    scale); within twice torch's error of float64, forward and gradients."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 70, 2, 64, generator=g, dtype=torch.float64) for _ in range(3))
    dout = torch.randn(2, 70, 2, 64, generator=g, dtype=torch.float64)
    for mask in (dict(causal=True), dict(window=(9, 3))):
        want, want_grads = grads_of(lambda q, k, v: attention(q, k, v, scale=0.0, **mask), (q, k, v), dout)
        theirs, their_grads = grads_of(lambda q, k, v: attention(q, k, v, scale=0.0, **mask),
                                       (q.to(dtype), k.to(dtype), v.to(dtype)), dout.to(dtype))
        out, grads = grads_of(lambda q, k, v: pyllm.flash_attn(q, k, v, softmax_scale=0.0, **mask),
                              (q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)),
                              dout.to(dtype).to(device))
        assert rel_err(out, want) <= tolerance(theirs, want), mask
        for got, their, ref in zip(grads, their_grads, want_grads):
            assert rel_err(got, ref) <= tolerance(their, ref), mask


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_eager_autograd_call_matches_the_op(device):
    # Eager calls with autograd run the op's body in a plain autograd.Function (pyllm/ops/_util.py):
    # the same bits forward and backward (lse too) as through the op's own autograd, which
    # torch.compile keeps using.
    dtype = torch.bfloat16
    q = torch.randn(2, 37, 4, 64, dtype=dtype, device=device, requires_grad=True)
    k, v = (torch.randn(2, 50, 2, 64, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    dout, dlse = torch.randn(2, 37, 4, 64, dtype=dtype, device=device), torch.randn(2, 4, 37, device=device)
    out, lse = pyllm.flash_attn(q, k, v, causal=True, window=(20, -1), softmax_scale=0.3, return_lse=True)
    assert type(out.grad_fn).__name__ == "_FlashAttnFunctionBackward"
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    out_op, lse_op = torch.ops.pyllm.flash_attn(q, k, v, None, None, -1, -1, 0.3, 20, 0, False)
    assert "pyllm_flash_attn" in type(out_op.grad_fn).__name__
    grads_op = torch.autograd.grad((out_op, lse_op), (q, k, v), (dout, dlse))
    assert torch.equal(out, out_op) and torch.equal(lse, lse_op)
    for g, g_op in zip(grads, grads_op):
        assert torch.equal(g, g_op)
    # A double backward is refused as through the op (the backward op has no autograd), not
    # answered with gradients that miss the second-order terms.
    out = pyllm.flash_attn(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out), create_graph=True)
    with pytest.raises(NotImplementedError, match="pyllm.flash_attn: no second derivative"):
        dq.sum().backward()
    # Saved inputs changed in place before the backward: autograd's version check still fires.
    out = pyllm.flash_attn(q, k, v, causal=True)
    with torch.no_grad():
        k.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_meta_tensors_give_shapes():
    # Dry runs on the meta device (no data): the op's fake implementation answers, for either
    # device's dtypes, forward and backward.
    q = torch.empty(2, 10, 4, 64, device="meta", dtype=torch.float16, requires_grad=True)
    k, v = (torch.empty(2, 12, 2, 64, device="meta", dtype=torch.float16) for _ in range(2))
    out, lse = pyllm.flash_attn(q, k, v, causal=True, return_lse=True)
    assert out.is_meta and out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 10) and lse.dtype == torch.float32
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert dq.is_meta and dq.shape == q.shape
    cu_seqlens = torch.empty(3, device="meta", dtype=torch.int32)
    out = pyllm.flash_attn(q[0], k[0], v[0], cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)
    assert out.is_meta and out.shape == (10, 4, 64)
    cache = torch.empty(2, 16, 2, 64, device="meta", dtype=torch.float16)
    out = pyllm.flash_attn_with_kvcache(q[:, :1].detach(), cache, cache.clone(), 3, k[:, :1], v[:, :1])
    assert out.is_meta and out.shape == (2, 1, 4, 64)
    with pytest.raises(TypeError, match="expected one of .*float16.* on meta"):
        pyllm.flash_attn(q.to(torch.int32), k, v)



def test_fake_tensor_mode_and_make_fx():
    # FakeTensorMode (shape inference) and make_fx trace: two caches looked like one tensor (a fake
    # tensor's data_ptr() is 0) and the ALiBi slopes' finiteness check read fake data
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        q, k_new, v_new = (torch.empty(2, 1, 4, 32) for _ in range(3))
        k_cache, v_cache = torch.empty(2, 16, 4, 32), torch.empty(2, 16, 4, 32)
        out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor([3, 5], dtype=torch.int32), k_new, v_new)
        assert out.shape == (2, 1, 4, 32)
        x = torch.empty(2, 5, 4, 32)
        assert pyllm.flash_attn(x, x, x, causal=True, alibi_slopes=torch.rand(4)).shape == (2, 5, 4, 32)
    # a head dim without a kernel (16): the widened copies, sized from the lengths when they can be
    # read; traced, the whole cache (torch.export had failed on reading them)
    B, S, D = 2, 12, 16
    q, k_new, v_new = torch.randn(B, 1, 4, D), torch.randn(B, 1, 2, D), torch.randn(B, 1, 2, D)
    caches, lengths = [torch.randn(B, S, 2, D) for _ in range(2)], torch.tensor([3, 7], dtype=torch.int32)

    class Decode(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, k_new, v_new, lengths):
            return pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)

    program = torch.export.export(Decode(), (q, *(c.clone() for c in caches), k_new, v_new, lengths))
    exported_caches, eager_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    got = program.module()(q, *exported_caches, k_new, v_new, lengths)
    torch.testing.assert_close(got, pyllm.flash_attn_with_kvcache(q, *eager_caches, lengths, k_new, v_new))
    for a, b in zip(exported_caches, eager_caches):
        assert torch.equal(a, b)
    # under a function mode of real tensors (torch.device, FlopCounterMode) the data checks still run
    cache = torch.randn(2, 16, 2, 32)
    with torch.device("cpu"), pytest.raises(ValueError, match="same memory"):
        pyllm.flash_attn_with_kvcache(torch.randn(2, 1, 4, 32), cache, cache, 3, torch.randn(2, 1, 2, 32),
                                      torch.randn(2, 1, 2, 32))
    x, slopes = torch.randn(2, 5, 4, 32), torch.rand(4)
    traced = make_fx(lambda x, s: pyllm.flash_attn(x, x, x, causal=True, alibi_slopes=s), tracing_mode="fake")(x, slopes)
    torch.testing.assert_close(traced(x, slopes), pyllm.flash_attn(x, x, x, causal=True, alibi_slopes=slopes))


@pytest.mark.parametrize("softcap,alibi", [(0.0, False), (2.0, False), (0.0, True)], ids=str)
def test_torch_compile_fullgraph(softcap, alibi):
    torch._dynamo.reset()
    slopes = alibi_slopes((2,)) if alibi else None

    def block(x, w):
        qkv = (x @ w).view(1, 12, 3, 2, 32)
        return pyllm.flash_attn(*qkv.unbind(dim=2), causal=True, softcap=softcap, alibi_slopes=slopes).sum()

    x, w = torch.randn(12, 16), torch.randn(16, 192, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(x, w)
    torch.testing.assert_close(loss, block(x, w))
    (g,) = torch.autograd.grad(loss, w)
    (g_eager,) = torch.autograd.grad(block(x, w), w)
    torch.testing.assert_close(g, g_eager)


# --- attention sinks (gpt-oss) ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_idx", [0, 1])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (16, -1))], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[6]], ids=str)
def test_sinks_match_float64_reference(device, dtype_idx, shape, causal, window):
    # A logit per head in every softmax, forward, LSE and the gradients of q, k, v and the sinks,
    # within twice torch's own error; SHAPES[3] has queries that see no key (out 0, lse = sink).
    # (Not one key per query: there dq = P (dP - D) with D = rowsum(dO * O), FlashAttention's form,
    # cancels to (1 - keep) of two dot products, where torch's softmax backward rounds one.)
    dtype = DTYPES_BY_DEVICE[device][dtype_idx]
    b, tq, tk, h, hk, d = shape
    q, k, v = rand((b, tq, h, d), dtype, device), rand((b, tk, hk, d), dtype, device), rand((b, tk, hk, d), dtype, device)
    sinks = (torch.linspace(-3.0, 4.0, h, dtype=torch.float64) + torch.randn(h, dtype=torch.float64)).float().to(device)
    dout = rand(q.shape, dtype, device)
    ours = lambda q, k, v, s: pyllm.flash_attn(q, k, v, causal=causal, window=window, sinks=s)  # noqa: E731
    theirs = lambda q, k, v, s: attention(q, k, v, causal, window, sinks=s)[0]  # noqa: E731
    inputs = (q, k, v, sinks)
    ref, ref_grads = grads_of(theirs, [t.double().cpu() for t in inputs], dout.double().cpu())
    torch_out, torch_grads = grads_of(theirs, inputs, dout)
    out, our_grads = grads_of(ours, inputs, dout)
    assert out.dtype == dtype and rel_err(out, ref) <= tolerance(torch_out, ref)
    for name, mine, torch_grad, exact in zip(["dq", "dk", "dv"], our_grads, torch_grads, ref_grads):
        assert mine.dtype == dtype and rel_err(mine, exact) <= tolerance(torch_grad, exact), name
    # dsinks = -sum over queries of p_sink * (dO . O): a sum of terms of both signs, so its error is
    # the forward's (O and the LSE, each within twice torch's, above) times the sum's condition
    # number; torch's explicit softmax can land below that (fp32: 5e-8 where ours is 7.6e-7, with
    # kappa ~ 3). Bound: the larger of twice torch's error and kappa times the forward's tolerance.
    o64, lse64 = attention(*[t.double().cpu() for t in (q, k, v)], causal, window, sinks=sinks.double().cpu())
    terms = torch.exp(sinks.double().cpu()[None, :, None] - lse64) * torch.einsum("bthd,bthd->bht", dout.double().cpu(), o64)
    kappa = (terms.abs().sum((0, 2)).norm() / terms.sum((0, 2)).norm()).item()
    bound = max(tolerance(torch_grads[3], ref_grads[3]), kappa * tolerance(torch_out, ref))
    assert our_grads[3].dtype == torch.float32 and rel_err(our_grads[3], ref_grads[3]) <= bound
    _, lse = pyllm.flash_attn(q, k, v, causal=causal, window=window, sinks=sinks, return_lse=True)
    ref_lse = attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal, window, sinks=sinks.double().cpu())[1]
    torch_lse = attention(q, k, v, causal, window, sinks=sinks)[1]
    assert torch.isfinite(lse).all() and rel_err(lse, ref_lse) <= tolerance(torch_lse, ref_lse)


def test_sinks_varlen_empty_rows_and_neutral_sinks():
    # Varlen with empty and key-less sequences: a query that sees no key has lse = sink and out 0;
    # a sink of -inf is no sink at all (the same bits as without).
    lens_q, lens_k = [0, 3, 70, 5, 2], [4, 3, 70, 0, 9]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q, k, v = rand((sum(lens_q), 4, 64), torch.float32, "cpu"), rand((sum(lens_k), 2, 64), torch.float32, "cpu"), \
        rand((sum(lens_k), 2, 64), torch.float32, "cpu")
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    out, lse = pyllm.flash_attn(q, k, v, sinks=sinks, return_lse=True, **kw)
    ref, ref_lse = attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True, sinks=sinks.double())
    assert rel_err(out, ref) < 1e-6 and (lse.double() - ref_lse).abs().max() < 1e-5
    keyless = slice(cu_q[3].item(), cu_q[4].item())  # sequence 3: 5 queries, no keys
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless]))
    assert torch.equal(lse[:, keyless], sinks[:, None].expand(4, 5))
    plain = pyllm.flash_attn(q, k, v, **kw)
    assert torch.equal(pyllm.flash_attn(q, k, v, sinks=torch.full((4,), -math.inf), **kw), plain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths_kind", ["tensor", "int"])
def test_kvcache_sinks_match_full_attention(device, lengths_kind):
    dtype = DTYPES_BY_DEVICE[device][1]
    b, cap, h, hk, d = 3, 150, 4, 2, 64
    lengths = [1, 70, 140] if lengths_kind == "tensor" else [90] * b
    k_cache, v_cache = rand((b, cap, hk, d), dtype, device), rand((b, cap, hk, d), dtype, device)
    q, k_new, v_new = rand((b, 1, h, d), dtype, device), rand((b, 1, hk, d), dtype, device), rand((b, 1, hk, d), dtype, device)
    sinks = torch.tensor([1.0, -2.0, 3.0, 0.5], device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device) if lengths_kind == "tensor" else lengths[0]
    out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new, sinks=sinks)
    for i, n in enumerate(lengths):
        keys, vals = k_cache[i:i + 1, :n + 1], v_cache[i:i + 1, :n + 1]
        ref, _ = attention(q[i:i + 1].double().cpu(), keys.double().cpu(), vals.double().cpu(), causal=True,
                           sinks=sinks.double().cpu())
        torch_out, _ = attention(q[i:i + 1], keys, vals, causal=True, sinks=sinks)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), i


def test_sinks_compile_and_checks():
    torch._dynamo.reset()
    sinks = torch.randn(2, requires_grad=True)

    def block(x, w, sinks):
        qkv = (x @ w).view(1, 12, 3, 2, 32)
        return pyllm.flash_attn(*qkv.unbind(dim=2), causal=True, sinks=sinks).sum()

    x, w = torch.randn(12, 16), torch.randn(16, 192, requires_grad=True)
    loss = torch.compile(block, fullgraph=True)(x, w, sinks)
    torch.testing.assert_close(loss, block(x, w, sinks))
    for g, g_eager in zip(torch.autograd.grad(loss, (w, sinks)), torch.autograd.grad(block(x, w, sinks), (w, sinks))):
        torch.testing.assert_close(g, g_eager)
    q = torch.randn(1, 5, 4, 32)
    cache = torch.zeros(1, 8, 2, 32)
    for call in (lambda s: pyllm.flash_attn(q, q[:, :, :2], q[:, :, :2], sinks=s),
                 lambda s: pyllm.flash_attn_with_kvcache(q, cache, cache, 3, sinks=s)):
        with pytest.raises(ValueError, match=r"sinks must have shape \(n_heads,\) = \(4,\), one logit per query head, got \(2,\)"):
            call(torch.zeros(2))
        with pytest.raises(TypeError, match="sinks must be a floating-point tensor"):
            call(torch.zeros(4, dtype=torch.int64))
        with pytest.raises(TypeError, match="sinks must be a torch.Tensor"):
            call([0.0] * 4)
        with pytest.raises(ValueError, match="sinks must be on q's device"):
            call(on_unsupported_device(torch.zeros(4)))


# --- KV cache -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_new", [0, 1, 3])
def test_kvcache_matches_full_attention(device, n_new):
    dtype = DTYPES_BY_DEVICE[device][1]
    b, cap, h, hk, d, tq = 3, 150, 4, 2, 64, max(n_new, 1)
    k_cache, v_cache = rand((b, cap, hk, d), dtype, device), rand((b, cap, hk, d), dtype, device)
    lengths = [0, 70, 140] if n_new else [1, 70, 140]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = rand((b, tq, h, d), dtype, device)
    k_new = rand((b, n_new, hk, d), dtype, device) if n_new else None
    v_new = rand((b, n_new, hk, d), dtype, device) if n_new else None
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new, causal=True)
    for i, n in enumerate(lengths):
        keys, vals = k_cache[i:i + 1, :n + n_new], v_cache[i:i + 1, :n + n_new]
        if n_new:  # appended in place, the rest untouched
            assert torch.equal(keys[0, n:], k_new[i]) and torch.equal(vals[0, n:], v_new[i])
        assert torch.equal(k_cache[i, n + n_new:], k_before[i, n + n_new:])
        assert torch.equal(k_cache[i, :n], k_before[i, :n])
        ref, _ = attention(q[i:i + 1].double().cpu(), keys.double().cpu(), vals.double().cpu(), causal=True)
        torch_out, _ = attention(q[i:i + 1], keys, vals, causal=True)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref)


def test_kvcache_fp32_decode_reads_cache_in_place():
    # fp32 blocks of at most 16 queries read K / V in place instead of packing them (CPU): one and
    # 16 queries against a cache of 150 (3 key blocks, the last partial), GQA.
    q_all = rand((2, 16, 4, 64), torch.float32, "cpu")
    k_cache, v_cache = rand((2, 150, 2, 64), torch.float32, "cpu"), rand((2, 150, 2, 64), torch.float32, "cpu")
    seqlens = torch.tensor([150, 97], dtype=torch.int32)
    for tq in (1, 16):
        q = q_all[:, :tq]
        out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens)
        for i, n in enumerate(seqlens.tolist()):
            keys, vals = k_cache[i:i + 1, :n], v_cache[i:i + 1, :n]
            ref, _ = attention(q[i:i + 1].double(), keys.double(), vals.double(), causal=True)
            torch_out, _ = attention(q[i:i + 1], keys, vals, causal=True)
            assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h,hk,d", [(4, 4, 32), (4, 1, 128), (8, 2, 64), (32, 1, 96)])
@pytest.mark.parametrize("window", [(-1, -1), (7, -1), (300, -1)])
@pytest.mark.parametrize("n_new,softcap", [(0, 0.0), (2, 0.0), (8, 0.0), (1, 1.5), (8, 1.5)])
def test_kvcache_decode_path(dtype, h, hk, d, window, n_new, softcap):
    # The CPU decode kernel (Tq <= 8 queries per head, any GQA group, fp32 or bf16 caches;
    # csrc/cpu/flash_attn.cpp decode): cache lengths 0 and 1 (with n_new = 0 a length-0 sequence
    # sees no key: out 0), short ones, and long ones whose keys are split across work items and
    # combined (capacity 1100: up to 4 splits); MHA, MQA (a group of 32), GQA; causal with and
    # without a left window; Gemma 2's capped scores (inputs twice unit size so that the cap binds).
    cap, tq = 1100, max(n_new, 1)
    scale = 2.0 if softcap else 1.0
    lengths = [0, 1, 37, 700, 1092 - n_new]
    b = len(lengths)
    k_cache, v_cache = rand((b, cap, hk, d), dtype, "cpu"), rand((b, cap, hk, d), dtype, "cpu")
    q = scale * rand((b, tq, h, d), dtype, "cpu")
    k_cache = scale * k_cache
    k_new = scale * rand((b, n_new, hk, d), dtype, "cpu") if n_new else None
    v_new = rand((b, n_new, hk, d), dtype, "cpu") if n_new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new, causal=True, window=window,
                                        softcap=softcap)
    for i, n in enumerate(lengths):
        keys, vals = k_cache[i:i + 1, :n + n_new], v_cache[i:i + 1, :n + n_new]
        ref, _ = attention(q[i:i + 1].double(), keys.double(), vals.double(), causal=True, window=window,
                           softcap=softcap)
        if n + n_new == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        torch_out, _ = attention(q[i:i + 1], keys, vals, causal=True, window=window, softcap=softcap)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), (i, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("lengths_kind", ["tensor", "int", "op"])
@pytest.mark.parametrize("n_new,window", [(0, (-1, -1)), (1, (-1, -1)), (3, (20, -1))])
def test_kvcache_softcap_matches_float64_reference(dtype, lengths_kind, n_new, window):
    # Gemma 2's capped scores over a KV cache (CPU): each path (the eager shortcut with tensor or int
    # lengths, and the custom op as tracing reaches it) = the capped softmax of the first
    # lengths[b] + n_new keys; inputs twice unit size so that the cap of 1.5 binds. bf16 here runs
    # the portable kernels (the AMX and decode kernels take no cap).
    b, cap, h, hk, d = 3, 150, 4, 2, 64
    lengths = [1, 70, 140] if lengths_kind != "int" else [90] * b
    k_cache, v_cache = 2 * rand((b, cap, hk, d), dtype, "cpu"), rand((b, cap, hk, d), dtype, "cpu")
    q = 2 * rand((b, max(n_new, 1), h, d), dtype, "cpu")
    k_new = 2 * rand((b, n_new, hk, d), dtype, "cpu") if n_new else None
    v_new = rand((b, n_new, hk, d), dtype, "cpu") if n_new else None
    seqlens = lengths[0] if lengths_kind == "int" else torch.tensor(lengths, dtype=torch.int32)
    call = (pyllm.flash_attn_with_kvcache if lengths_kind != "op" else
            lambda *a, **kw: torch.ops.pyllm.flash_attn_with_kvcache(*a[:6], 1 / math.sqrt(d), kw["window"][0], 0,
                                                                    kw["softcap"])[0])
    out = call(q, k_cache, v_cache, seqlens, k_new, v_new, causal=True, window=window, softcap=1.5)
    uncapped = pyllm.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), seqlens, causal=True, window=window)
    assert not torch.allclose(out.float(), uncapped.float(), atol=1e-3)  # (the cap binds)
    for i, n in enumerate(lengths):
        keys, vals = k_cache[i:i + 1, :n + n_new], v_cache[i:i + 1, :n + n_new]
        ref, _ = attention(q[i:i + 1].double(), keys.double(), vals.double(), causal=True, window=window, softcap=1.5)
        if dtype == torch.float64:
            assert rel_err(out[i:i + 1], ref) <= 1e-13
            continue
        torch_out, _ = attention(q[i:i + 1], keys, vals, causal=True, window=window, softcap=1.5)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), (i, n)


def test_kvcache_softcap_checks():
    q = rand((1, 1, 2, 64), torch.float32, "cpu")
    cache = rand((1, 8, 2, 64), torch.float32, "cpu")
    for bad in (-1.0, math.inf, "1"):
        with pytest.raises(ValueError, match="flash_attn_with_kvcache: softcap must be a finite number >= 0"):
            pyllm.flash_attn_with_kvcache(q, cache, cache, 3, softcap=bad)


@pytest.mark.cuda
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("mods", ["softcap", "alibi", "alibi-batch-softcap"])
def test_kvcache_softcap_and_alibi_on_cuda(tq, mods):
    # The split-KV decode kernel's capped scores and ALiBi (new 2026-12-05, unverified until this
    # passes on a GPU): each sequence as full attention over its first lengths[b] + tq keys
    b, cap, h, hk, d, dtype = 4, 1100, 8, 2, 64, torch.bfloat16
    lengths = [0, 37, 700, 1080]
    k_cache, v_cache = rand((b, cap, hk, d), dtype, "cuda"), rand((b, cap, hk, d), dtype, "cuda")
    q = 2 * rand((b, tq, h, d), dtype, "cuda")
    k_new, v_new = rand((b, tq, hk, d), dtype, "cuda"), rand((b, tq, hk, d), dtype, "cuda")
    softcap = 1.5 if "softcap" in mods else 0.0
    slopes = (alibi_slopes((b, h) if "batch" in mods else (h,)) * 0.1).cuda() if "alibi" in mods else None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    for window in ((-1, -1), (300, -1)):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = pyllm.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, v_new, window=window, softcap=softcap,
                                            alibi_slopes=slopes)
        for i, n in enumerate(lengths):
            keys = torch.cat([k_cache[i:i + 1, :n], k_new[i:i + 1]], dim=1)
            vals = torch.cat([v_cache[i:i + 1, :n], v_new[i:i + 1]], dim=1)
            row = None if slopes is None else slopes if slopes.dim() == 1 else slopes[i]
            kw = dict(causal=True, window=window, softcap=softcap, alibi=row)
            ref, _ = attention(q[i:i + 1].double(), keys.double(), vals.double(), **kw)
            torch_out, _ = attention(q[i:i + 1], keys, vals, **kw)
            assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), (i, n, window)


def test_kvcache_fp32_decode_is_repeatable_across_thread_counts():
    # Splits depend on the shape only and are combined in order: same bits for any thread count.
    k_cache, v_cache = rand((1, 2048, 1, 64), torch.float32, "cpu"), rand((1, 2048, 1, 64), torch.float32, "cpu")
    q = rand((1, 1, 4, 64), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 2000))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_empty_batch_and_zero_capacity(device):
    # Empty tensors have null data pointers: an empty batch returns an empty out, a cache of
    # capacity 0 gives queries that see no key (out 0), on both devices alike.
    dtype = DTYPES_BY_DEVICE[device][1]
    cache = rand((0, 8, 1, 32), dtype, device)
    out = pyllm.flash_attn_with_kvcache(rand((0, 1, 2, 32), dtype, device), cache, cache.clone(), 0)
    assert out.shape == (0, 1, 2, 32)
    cache = rand((2, 0, 1, 32), dtype, device)
    out = pyllm.flash_attn_with_kvcache(rand((2, 1, 2, 32), dtype, device), cache, cache.clone(), 0)
    assert torch.equal(out, torch.zeros_like(out))


def test_kvcache_int_seqlens_and_overflow():
    cache = torch.randn(2, 8, 1, 32)
    q = torch.randn(2, 1, 2, 32)
    out = pyllm.flash_attn_with_kvcache(q, cache, cache.clone(), 8)
    ref, _ = attention(q.double(), cache.double(), cache.double(), causal=True)
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="capacity"):
        pyllm.flash_attn_with_kvcache(q, cache, cache.clone(), 8, torch.randn(2, 1, 1, 32), torch.randn(2, 1, 1, 32))
    with pytest.raises(TypeError, match="int32"):
        pyllm.flash_attn_with_kvcache(q, cache, cache.clone(), torch.tensor([1, 2]))


# --- the eager CPU shortcut (fa._kvcache_eager_cpu): the op's bits without the op ----------------

def kv_cache_pair(b, cap, hk, d, dtype, layout, base=None):
    """(k_cache, v_cache, base): contiguous caches, or k and v interleaved in one (b, cap, 2, hk, d)
    tensor (neither contiguous: the append takes copy_). base: reuse this storage's clone."""
    if layout == "contiguous":
        base = (rand((2, b, cap, hk, d), dtype, "cpu") if base is None else base.clone())
        return base[0], base[1], base
    base = rand((b, cap, 2, hk, d), dtype, "cpu") if base is None else base.clone()
    return base[:, :, 0], base[:, :, 1], base


def new_kv(b, n, h, hk, d, dtype, layout):
    """q, k_new, v_new: contiguous, or views of one packed (b, n, h + 2 hk, d) projection as the
    model's attention makes them (q, k, v split along heads)."""
    if layout == "contiguous":
        return rand((b, n, h, d), dtype, "cpu"), rand((b, n, hk, d), dtype, "cpu"), rand((b, n, hk, d), dtype, "cpu")
    qkv = rand((b, n, h + 2 * hk, d), dtype, "cpu")
    return qkv[:, :, :h], qkv[:, :, h:h + hk], qkv[:, :, h + hk:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("cache_layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("new_layout", ["contiguous", "packed"])
@pytest.mark.parametrize("n_new", [0, 1, 3])
@pytest.mark.parametrize("seqlens", ["int", "tensor", "ragged"])
def test_kvcache_eager_shortcut_matches_the_op(dtype, cache_layout, new_layout, n_new, seqlens):
    # Same kernel arguments as the dispatched op: the same bits in out, the same caches after the
    # append (contiguous or interleaved caches, dense or strided new rows), GQA, 2 queries
    # (a strided q when packed), int / uniform / ragged cache lengths, and a window and a scale.
    b, cap, h, hk, d = 3, 40, 4, 2, 32
    q, k_new, v_new = new_kv(b, max(n_new, 2), h, hk, d, dtype, new_layout)
    q = q[:, :2]
    k_new, v_new = (k_new[:, :n_new], v_new[:, :n_new]) if n_new else (None, None)
    k_cache, v_cache, base = kv_cache_pair(b, cap, hk, d, dtype, cache_layout)
    ref_k, ref_v, _ = kv_cache_pair(b, cap, hk, d, dtype, cache_layout, base)
    lengths = {"int": [37] * b, "tensor": [5] * b, "ragged": [0, 37, 19]}[seqlens]
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    arg = lengths[0] if seqlens == "int" else lengths_t
    for causal, scale, window in ((True, None, fa._NO_WINDOW), (False, 0.3, (7, -1))):
        out = fa._kvcache_eager_cpu(q, k_cache, v_cache, arg, k_new, v_new, causal, scale, window)
        assert out is not None, "the shortcut declined a plain eager CPU call"
        want = torch.ops.pyllm.flash_attn_with_kvcache(q, ref_k, ref_v, lengths_t, k_new, v_new,
                                                        1 / math.sqrt(d) if scale is None else scale, window[0],
                                                        0 if causal else window[1])[0]
        assert torch.equal(out, want) and out.stride() == want.stride()
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
        if n_new:  # appended where the op appends: the new rows are in the caches
            assert torch.equal(k_cache[1, lengths[1]:lengths[1] + n_new], k_new[1])


def test_kvcache_public_call_takes_the_shortcut(monkeypatch):
    # Plain eager CPU calls never reach the op or its body (their Python cost is what the shortcut
    # saves); anything traced or differentiable does (next test).
    def refuse(*args):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(fa, "_flash_attn_with_kvcache", refuse)
    monkeypatch.setattr(fa, "_flash_attn_with_kvcache_body", refuse)
    q, k_new, v_new = new_kv(2, 1, 4, 2, 64, torch.bfloat16, "packed")
    k_cache, v_cache, _ = kv_cache_pair(2, 16, 2, 64, torch.bfloat16, "contiguous")
    with torch.no_grad():
        pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 3, k_new, v_new)
    pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor([4, 2], dtype=torch.int32))
    # the cache layouts too (a paged cache's decode step, rows of a larger cache, left pads)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    pyllm.flash_attn_with_kvcache(q, k_cache.view(4, 8, 2, 64), v_cache.view(4, 8, 2, 64), 5, k_new, v_new,
                                  block_table=i32([3, 0], [1, 2]))
    pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, i32(4, 2), k_new, v_new, cache_batch_idx=i32(1, 0),
                                  cache_leftpad=i32(1, 2))
    cos, sin = rotary_tables(16, 32)  # and rotated calls, once rotated
    pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, i32(4, 2), k_new, v_new, rotary_cos=cos, rotary_sin=sin)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("n_new", [0, 1, 3])
def test_kvcache_int_length_path_matches_the_op(monkeypatch, device, n_new):
    # An int cache length (the model's decode step) is checked on the host and appended with slice
    # copies, not the op's clamped index_put (fa._kvcache_with_int_length: what CUDA calls take;
    # here on the CPU with the CPU shortcut declining). The same bits in out and in the caches.
    monkeypatch.setattr(fa, "_kvcache_eager_cpu", lambda *args: None)

    def refuse(*args):
        raise AssertionError("the general path ran")

    dtype = torch.bfloat16
    b, cap, h, hk, d, length = 3, 40, 4, 2, 64, 30
    q, k_new, v_new = new_kv(b, max(n_new, 2), h, hk, d, dtype, "packed")
    q, k_new, v_new = q[:, :2].to(device), k_new[:, :n_new].to(device), v_new[:, :n_new].to(device)
    k_new, v_new = (k_new, v_new) if n_new else (None, None)
    k_cache, v_cache, base = kv_cache_pair(b, cap, hk, d, dtype, "interleaved")
    ref_k, ref_v, _ = kv_cache_pair(b, cap, hk, d, dtype, "interleaved", base)
    k_cache, v_cache, ref_k, ref_v = (t.to(device) for t in (k_cache, v_cache, ref_k, ref_v))
    lengths_t = torch.full((b,), length, dtype=torch.int32, device=device)
    want = torch.ops.pyllm.flash_attn_with_kvcache(q, ref_k, ref_v, lengths_t, k_new, v_new, 0.125, 7, 0)[0]
    with monkeypatch.context() as m:
        m.setattr(fa, "_flash_attn_with_kvcache", refuse)
        m.setattr(fa, "_flash_attn_with_kvcache_body", refuse)
        out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, length, k_new, v_new, window=(7, -1))
    assert torch.equal(out, want) and torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match="must lie in"):
        pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, cap - n_new + 1, k_new, v_new)
    with pytest.raises(ValueError, match="must lie in"):
        pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, -1, k_new, v_new)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_kvcache_shortcut_leaves_tracing_and_autograd_to_the_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k_new, v_new = new_kv(2, 1, 4, 2, 32, torch.float32, "contiguous")
    k_cache, v_cache, _ = kv_cache_pair(2, 16, 2, 32, torch.float32, "contiguous")
    args = (k_cache, v_cache, 3, k_new, v_new, True, None, fa._NO_WINDOW)
    assert fa._kvcache_eager_cpu(q.clone().requires_grad_(), *args) is None
    class Subclass(torch.Tensor):  # a subclass's __torch_function__ must see the op (nn.Parameter's is off)
        pass

    assert fa._kvcache_eager_cpu(q, k_cache.as_subclass(Subclass), *args[1:]) is None
    assert fa._kvcache_eager_cpu(q.to("meta"), *args) is None

    def step(q, k_cache, v_cache, k_new, v_new):
        return pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 3, k_new, v_new)

    for mode in ("real", "fake"):
        graph = make_fx(step, tracing_mode=mode)(q, k_cache.clone(), v_cache.clone(), k_new, v_new)
        assert "pyllm.flash_attn_with_kvcache" in graph.code, mode
    torch._dynamo.reset()
    compiled_k, compiled_v = k_cache.clone(), v_cache.clone()
    out = torch.compile(step, fullgraph=True)(q, compiled_k, compiled_v, k_new, v_new)
    assert torch.equal(out, step(q, k_cache, v_cache, k_new, v_new))
    assert torch.equal(compiled_k, k_cache) and torch.equal(compiled_v, v_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # (fp16: the widened path)
def test_kvcache_forward_under_grad_and_a_backward_that_says_there_is_none(dtype):
    # As flash-attn's: no backward. A call whose inputs need grad (a generation step outside
    # no_grad) still runs, appends and gives the no-grad call's bits; a backward through it raises
    # NotImplementedError saying what to use instead (it had raised torch's generic message).
    q, k_new, v_new = new_kv(2, 1, 4, 2, 64, dtype, "contiguous")
    k_cache, v_cache, _ = kv_cache_pair(2, 16, 2, 64, dtype, "contiguous")
    lengths = torch.tensor([3, 9], dtype=torch.int32)
    with torch.no_grad():
        want = pyllm.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), lengths, k_new, v_new)
    for cache_seqlens in (lengths, 5):
        kc, vc = k_cache.clone(), v_cache.clone()
        q_leaf, k_leaf = q.clone().requires_grad_(), k_new.clone().requires_grad_()
        out = pyllm.flash_attn_with_kvcache(q_leaf, kc, vc, cache_seqlens, k_leaf, v_new)
        assert out.requires_grad and torch.equal(kc[1, 9 if cache_seqlens is lengths else 5], k_new[1, 0])
        if cache_seqlens is lengths:
            assert torch.equal(out, want)
        with pytest.raises(NotImplementedError, match="flash_attn_with_kvcache has no backward.*pyllm.flash_attn"):
            out.sum().backward()


def test_kvcache_shortcut_append_is_seen_by_autograd_and_inference_mode():
    # The shortcut's append bumps the caches' version counters: a product that saved the cache for
    # its backward raises there instead of using the overwritten values.
    q, k_new, v_new = new_kv(1, 1, 2, 1, 32, torch.float32, "contiguous")
    k_cache, v_cache, _ = kv_cache_pair(1, 8, 1, 32, torch.float32, "contiguous")
    w = torch.randn(k_cache.shape, requires_grad=True)
    y = (w * k_cache).sum()
    versions = k_cache._version, v_cache._version
    with torch.no_grad():
        pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 3, k_new, v_new)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # Caches made in inference mode: appended in it, refused outside it (torch's own error).
    with torch.inference_mode():
        k_inf, v_inf = k_cache.clone(), v_cache.clone()
        pyllm.flash_attn_with_kvcache(q, k_inf, v_inf, 4, k_new, v_new)
        assert torch.equal(k_inf[0, 4], k_new[0, 0])
        pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 5, k_new, v_new)  # a normal cache inside it
        assert torch.equal(v_cache[0, 5], v_new[0, 0])
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        pyllm.flash_attn_with_kvcache(q, k_inf, v_inf, 5, k_new, v_new)


def test_kvcache_shortcut_new_rows_inside_their_cache():
    # New rows that are a view of the cache they are appended to are appended as copies, disjoint or
    # partly overlapping (those had raised torch's overlap error at batch 1 and been torn silently at
    # batch > 1: test_kvcache_new_rows_that_are_views_of_the_cache).
    q = rand((1, 1, 2, 32), torch.float32, "cpu")
    k_cache, v_cache, _ = kv_cache_pair(1, 8, 2, 32, torch.float32, "contiguous")
    rows = k_cache[:, 1:2].clone()
    pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 5, k_cache[:, 1:2], v_cache[:, 1:2])
    assert torch.equal(k_cache[:, 5:6], rows)
    rows = k_cache[:, 2:4].clone()
    pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, 3, k_cache[:, 2:4], v_cache[:, 2:4])
    assert torch.equal(k_cache[:, 3:5], rows)
    # per-row lengths: one indexed write per cache, which refuses any view of the cache; copy_ then
    rows = k_cache[:, 1:2].clone()
    pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor([6], dtype=torch.int32), k_cache[:, 1:2],
                                  v_cache[:, 1:2])
    assert torch.equal(k_cache[:, 6:7], rows)


def test_kvcache_appends_only_into_memory_of_its_own():
    # An expanded cache (every row the same memory) or one tensor for keys and values: the appends
    # would land in another row, or the values over the keys, silently. Refused before any write;
    # read-only calls and views into one buffer (kv[0], kv[1], or interleaved) stay fine.
    i32 = torch.int32
    q, k_new, v_new = (rand((2, 1, 1, 32), torch.float32, "cpu") for _ in range(3))
    lengths = torch.tensor([0, 5], dtype=i32)
    expanded = rand((1, 16, 1, 32), torch.float32, "cpu").expand(2, 16, 1, 32)
    expanded_before = expanded.clone()
    with pytest.raises(ValueError, match="k_cache has elements in the same memory"):
        pyllm.flash_attn_with_kvcache(q, expanded, expanded.clone(), lengths, k_new, v_new)
    assert torch.equal(expanded, expanded_before)
    one = rand((2, 16, 1, 32), torch.float32, "cpu")
    before = one.clone()
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
        pyllm.flash_attn_with_kvcache(q, one, one, lengths, k_new, v_new)
    assert torch.equal(one, before)
    assert pyllm.flash_attn_with_kvcache(q, expanded, expanded, lengths).shape == q.shape  # nothing written
    for kv in (rand((2, 2, 16, 1, 32), torch.float32, "cpu").unbind(0),
               rand((2, 16, 2, 1, 32), torch.float32, "cpu").unbind(2)):
        got = pyllm.flash_attn_with_kvcache(q, *kv, lengths, k_new, v_new)
        assert torch.equal(kv[0][1, 5], k_new[1, 0]) and torch.equal(kv[1][1, 5], v_new[1, 0])
        assert got.shape == q.shape


def test_kvcache_bad_input_raises_and_leaves_the_cache():
    # Every check of the general path still raises its message, the shortcut or not, and nothing
    # is written to the caches before a call is known to be good.
    i32 = torch.int32
    q, k_new, v_new = new_kv(2, 1, 4, 2, 32, torch.float32, "contiguous")
    k_cache, v_cache, _ = kv_cache_pair(2, 8, 2, 32, torch.float32, "contiguous")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    strided_cache = rand((2, 8, 32, 2), torch.float32, "cpu").transpose(-1, -2)  # last dim stride 2
    cases = [
        (TypeError, "int32", dict(cache_seqlens=torch.tensor([1, 2]))),
        (TypeError, "int32 tensor or an int", dict(cache_seqlens=True)),
        (TypeError, "int32 tensor or an int", dict(cache_seqlens=1.0)),
        (ValueError, r"\(2,\)", dict(cache_seqlens=torch.tensor([1], dtype=i32))),
        (ValueError, "capacity", dict(cache_seqlens=8)),  # no room for the new token
        (ValueError, "capacity", dict(cache_seqlens=-1)),
        (ValueError, "capacity", dict(cache_seqlens=torch.tensor([-1, 0], dtype=i32))),
        (ValueError, "capacity", dict(cache_seqlens=torch.tensor([0, 8], dtype=i32))),
        (ValueError, "both", dict(v_new=None)),
        (TypeError, "dtype", dict(k_new=k_new.double(), v_new=v_new.double())),
        (TypeError, "dtype", dict(q=q.bfloat16())),
        (ValueError, "k_new must be", dict(k_new=rand((2, 1, 1, 32), torch.float32, "cpu"))),
        (ValueError, "same shape", dict(k_new=rand((2, 2, 2, 32), torch.float32, "cpu"))),
        (ValueError, "do not fit", dict(k_new=rand((2, 9, 2, 32), torch.float32, "cpu"),
                                        v_new=rand((2, 9, 2, 32), torch.float32, "cpu"))),
        (ValueError, "multiple", dict(q=rand((2, 1, 3, 32), torch.float32, "cpu"))),
        (ValueError, "head_dim", dict(q=rand((2, 1, 4, 64), torch.float32, "cpu"))),
        (ValueError, "4-D", dict(q=q[0])),
        (ValueError, "contiguous last dim", dict(k_cache=strided_cache, v_cache=strided_cache.clone())),
        (TypeError, "window", dict(window=(0.5, 0))),
        (TypeError, "window", dict(window=3)),
        (TypeError, "softmax_scale", dict(softmax_scale="0.1")),
        (TypeError, "softmax_scale", dict(softmax_scale=float("nan"))),
        (ValueError, "device", dict(q=on_unsupported_device(q), k_cache=on_unsupported_device(k_cache),
                                    v_cache=on_unsupported_device(v_cache))),
    ]
    for exc, match, bad in cases:
        kw = {**dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=3, k_new=k_new, v_new=v_new), **bad}
        before = kw["k_cache"].clone(), kw["v_cache"].clone()
        with pytest.raises(exc, match=match):
            pyllm.flash_attn_with_kvcache(**kw)
        if kw["k_cache"].device.type == "cpu":
            assert torch.equal(kw["k_cache"], before[0]) and torch.equal(kw["v_cache"], before[1]), (match, bad)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


# --- where cu_seqlens / cache_seqlens are checked: no device sync on CUDA unless asked -----------

def test_seqlens_host_check_policy(monkeypatch):
    from types import SimpleNamespace

    cpu_t, cuda_t = torch.zeros(2, dtype=torch.int32), SimpleNamespace(is_cuda=True)
    monkeypatch.delenv(fa.CHECK_SEQLENS_ENV, raising=False)
    assert fa._check_seqlens_on_host(cpu_t) and not fa._check_seqlens_on_host(cuda_t)
    monkeypatch.setenv(fa.CHECK_SEQLENS_ENV, "1")
    assert fa._check_seqlens_on_host(cuda_t)
    # CPU: contents are checked even with max_seqlen given (no sync to save).
    monkeypatch.delenv(fa.CHECK_SEQLENS_ENV)
    qv = torch.randn(6, 2, 32)
    bad = torch.tensor([0, 4, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        pyllm.flash_attn(qv, qv, qv, cu_seqlens_q=bad, cu_seqlens_k=bad, max_seqlen_q=6, max_seqlen_k=6)
    # Checked from shapes alone, on any device: more new tokens than the cache holds.
    cache = torch.randn(1, 4, 1, 32)
    with pytest.raises(ValueError, match="capacity"):
        pyllm.flash_attn_with_kvcache(torch.randn(1, 1, 1, 32), cache, cache.clone(), 0, torch.randn(1, 5, 1, 32),
                                      torch.randn(1, 5, 1, 32))


@pytest.mark.cuda
def test_cuda_varlen_and_kvcache_do_not_sync(monkeypatch):
    monkeypatch.delenv(fa.CHECK_SEQLENS_ENV, raising=False)
    lens_q, lens_k = [3, 0, 70, 1], [5, 2, 70, 1]
    cu_q, cu_k = cu(lens_q, "cuda"), cu(lens_k, "cuda")
    q = rand((sum(lens_q), 4, 64), torch.bfloat16, "cuda").requires_grad_()
    k, v = (rand((sum(lens_k), 2, 64), torch.bfloat16, "cuda").requires_grad_() for _ in range(2))
    cache = rand((2, 100, 2, 64), torch.bfloat16, "cuda")
    seqlens = torch.tensor([10, 90], dtype=torch.int32, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pyllm.flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=70,
                               max_seqlen_k=70)
        out.backward(torch.ones_like(out))
        pyllm.flash_attn_with_kvcache(q.detach()[:2, None], cache, cache.clone(), seqlens, k.detach()[:2, None],
                                      v.detach()[:2, None])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref, _ = attention_varlen(q.detach().double().cpu(), k.detach().double().cpu(), v.detach().double().cpu(),
                              cu_q.cpu(), cu_k.cpu(), causal=True)
    torch_out, _ = attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal=True)
    assert rel_err(out, ref) <= tolerance(torch_out, ref)


@pytest.mark.cuda
def test_cuda_bad_seqlens_stay_in_bounds_or_raise_when_checked(monkeypatch):
    q = rand((10, 2, 64), torch.float16, "cuda")
    garbage = [torch.tensor(vals, dtype=torch.int32, device="cuda")
               for vals in ([0, 7, 3, 10], [-5, 2**30, -2**31, 10], [3, 3, 3, 3], [0, 10, 20, 40])]
    cache = rand((3, 16, 2, 64), torch.float16, "cuda")
    bad_cache_lens = torch.tensor([-4, 2**30, 15], dtype=torch.int32, device="cuda")
    monkeypatch.delenv(fa.CHECK_SEQLENS_ENV, raising=False)
    for bad in garbage:  # unchecked: wrong answers allowed, out-of-bounds accesses not
        qg = q.clone().requires_grad_()
        out = pyllm.flash_attn(qg, qg, qg, causal=True, cu_seqlens_q=bad, cu_seqlens_k=bad, max_seqlen_q=10,
                               max_seqlen_k=10)
        out.backward(torch.ones_like(out))
    k_new = rand((3, 1, 2, 64), torch.float16, "cuda")
    pyllm.flash_attn_with_kvcache(rand((3, 1, 2, 64), torch.float16, "cuda"), cache, cache.clone(), bad_cache_lens,
                                  k_new, k_new)
    torch.cuda.synchronize()  # an illegal address would surface here
    monkeypatch.setenv(fa.CHECK_SEQLENS_ENV, "1")
    for bad in garbage:
        with pytest.raises(ValueError):
            pyllm.flash_attn(q, q, q, cu_seqlens_q=bad, cu_seqlens_k=bad, max_seqlen_q=10, max_seqlen_k=10)
    with pytest.raises(ValueError, match="capacity"):
        pyllm.flash_attn_with_kvcache(rand((3, 1, 2, 64), torch.float16, "cuda"), cache, cache.clone(),
                                      bad_cache_lens, k_new, k_new)


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)
    # a window side past any sequence is unlimited (the kernels take int32: a raw pybind TypeError before)
    assert torch.equal(pyllm.flash_attn(q, k, k, window=(2 ** 64, 0)), pyllm.flash_attn(q, k, k, causal=True))
    meta = torch.empty(1, 4, 2, 64, device="meta")  # meta with ALiBi: shapes, no value read
    assert pyllm.flash_attn(meta, meta, meta, alibi_slopes=torch.empty(2, device="meta")).shape == meta.shape
    for d in (0, 257):
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported: head dims 1 to 256 \\(32, 64, 96, 128, 256"):
            pyllm.flash_attn(torch.randn(1, 4, 2, d), torch.randn(1, 4, 2, d), torch.randn(1, 4, 2, d))
    with pytest.raises(ValueError, match="multiple"):
        pyllm.flash_attn(torch.randn(1, 4, 3, 64), k, k)
    with pytest.raises(TypeError, match="dtype"):
        pyllm.flash_attn(q, k.bfloat16(), k)
    with pytest.raises(TypeError, match="expected one of"):
        pyllm.flash_attn(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="same shape"):
        pyllm.flash_attn(q, k, torch.randn(1, 5, 2, 64))
    with pytest.raises(ValueError, match="4-D"):
        pyllm.flash_attn(q[0], k[0], k[0])
    with pytest.raises(ValueError, match="device"):
        pyllm.flash_attn(on_unsupported_device(q), on_unsupported_device(k), on_unsupported_device(k))
    with pytest.raises(TypeError, match="window"):
        pyllm.flash_attn(q, k, k, window=(0.5, 0))
    with pytest.raises(TypeError, match="window"):
        pyllm.flash_attn(q, k, k, window=3)
    qv, kv = torch.randn(6, 2, 64), torch.randn(6, 2, 64)
    good = cu([2, 4])
    with pytest.raises(TypeError, match="int32"):
        pyllm.flash_attn(qv, kv, kv, cu_seqlens_q=good.long(), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="non-decreasing"):
        bad = torch.tensor([0, 4, 2, 6], dtype=torch.int32)
        pyllm.flash_attn(qv, kv, kv, cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] \(7\) is past the total number of tokens \(6\)"):
        pyllm.flash_attn(qv, kv, kv, cu_seqlens_q=cu([4, 3]), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="must be 0"):
        pyllm.flash_attn(qv, kv, kv, cu_seqlens_q=torch.tensor([1, 6], dtype=torch.int32), cu_seqlens_k=cu([6]))
    with pytest.raises(ValueError, match="both"):
        pyllm.flash_attn(qv, kv, kv, cu_seqlens_q=good)
    with pytest.raises(ValueError, match="max_seqlen"):
        pyllm.flash_attn(qv, kv, kv, cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=3)
    with pytest.raises(ValueError, match="varlen"):
        pyllm.flash_attn(q, k, k, max_seqlen_q=4)


def test_cuda_tensor_without_cuda_kernels_raises(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _util.check_backend("flash_attn", torch.device("cuda", 0))


@pytest.mark.cuda
def test_device_mismatch_raises():
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must match"):
        pyllm.flash_attn(q, q.cuda(), q.cuda())


def test_cpp_rechecks_raw_calls():
    q = torch.randn(1, 4, 2, 64)
    strides = [512, 128, 64]
    args = dict(q=q.data_ptr(), k=q.data_ptr(), v=q.data_ptr(), out=q.data_ptr(), lse=q.data_ptr(), cu_seqlens_q=0,
                cu_seqlens_k=0, seqused_k=0, batch=1, seqlen_q=4, seqlen_k=4, n_heads=2, n_kv_heads=2, head_dim=64,
                q_strides=strides, k_strides=strides, v_strides=strides, o_strides=strides, lse_strides=[8, 4],
                scale=0.1, window_left=-1, window_right=-1, dtype=0)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        _C.flash_attn_fwd_cpu(**{**args, "head_dim": 80})
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        _C.flash_attn_fwd_cpu(**{**args, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="null data pointer"):
        _C.flash_attn_fwd_cpu(**{**args, "q": 0})
    with pytest.raises(ValueError, match="dtype"):
        _C.flash_attn_fwd_cpu(**{**args, "dtype": 1})
    with pytest.raises(ValueError, match="3 entries"):
        _C.flash_attn_fwd_cpu(**{**args, "q_strides": [1, 2]})
    bad_cu = torch.tensor([0, 3, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        _C.flash_attn_fwd_cpu(**{**args, "batch": 2, "cu_seqlens_q": bad_cu.data_ptr(),
                                 "cu_seqlens_k": bad_cu.data_ptr(), "lse_strides": [0, 4]})


# --- flash-attn's kv-cache options: cache_batch_idx, cache_leftpad, block_table, rotary, lse ---------

def physical_cache(logical: torch.Tensor, layout: str, page: int, gen: torch.Generator):
    """The cache `logical` (B, cap, Hkv, D) laid out as `layout` says: "rows" (each sequence a row of
    a larger cache, rows shuffled: cache_batch_idx), "paged" (blocks of `page` positions shuffled
    among spare ones: block_table; the table's unused tail names no real block) or "plain".
    Returns (cache, options, to_logical), to_logical reading a cache back in logical order."""
    b, cap = logical.shape[:2]
    if layout == "rows":
        rows = torch.randperm(b + 2, generator=gen)[:b].to(torch.int32)
        cache = torch.full((b + 2, *logical.shape[1:]), math.nan, dtype=logical.dtype)
        cache[rows.long()] = logical
        return cache, {"cache_batch_idx": rows}, lambda c: c[rows.long()]
    if layout == "paged":
        per_seq = -(-cap // page)
        blocks = torch.randperm(b * per_seq + 3, generator=gen)[:b * per_seq].view(b, per_seq).to(torch.int32)
        cache = torch.full((b * per_seq + 3, page, *logical.shape[2:]), math.nan, dtype=logical.dtype)
        padded = torch.cat([logical, logical.new_full((b, per_seq * page - cap, *logical.shape[2:]), math.nan)], 1)
        cache[blocks.long()] = padded.view(b, per_seq, page, *logical.shape[2:])
        table = torch.cat([blocks, torch.full((b, 2), 10**6, dtype=torch.int32)], 1)  # never read: past every key
        # the capacity a table row addresses is (per_seq + 2) * page: reads stay within each row's keys
        return cache, {"block_table": table}, lambda c: c[blocks.long()].flatten(1, 2)[:, :cap]
    return logical.clone(), {}, lambda c: c


def nan_outside_caches(shape, dtype, lengths, pads, layout, page):
    """Random k and v caches (B, cap, Hkv, D) whose sequence b holds keys [pads[b], lengths[b]) and NaN
    elsewhere, laid out as physical_cache's layout says: (k_cache, v_cache, options, to_logical),
    options with cache_leftpad when any pad is not 0."""
    logical = rand(shape, dtype, "cpu"), rand(shape, dtype, "cpu")
    for t in logical:
        for i, (n, pad) in enumerate(zip(lengths, pads)):
            t[i, :pad] = math.nan
            t[i, n:] = math.nan
    (k_cache, options, to_logical), (v_cache, _, _) = (physical_cache(t, layout, page, torch.Generator().manual_seed(3))
                                                       for t in logical)
    if any(pads):
        options["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32)
    return k_cache, v_cache, options, to_logical


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout,page", [("rows", 0), ("paged", 16), ("paged", 7), ("plain", 0)])
@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("tq,n_new,window", [(1, 1, (-1, -1)), (1, 0, (40, -1)), (3, 3, (-1, -1)), (12, 12, (30, -1))])
def test_kvcache_options_match_float64_reference(dtype, layout, page, leftpad, tq, n_new, window):
    # Sequence b's keys are cache positions [pad_b, lengths_b + n_new) wherever the options put them;
    # everything else in the caches is NaN, so a read of anything else shows. Up to 8 queries run the
    # decode kernel on the cache in place (fp32 / bf16; a paged chunk ends with its block); more, and
    # fp64, the tiled kernels on a copy of the sequences' rows. Paged with page 7: blocks cut chunks.
    b, cap, h, hk, d = 3, 60, 4, 2, 64
    lengths = [5, 33, 60 - n_new]
    pads = [3, 0, 20] if leftpad else [0, 0, 0]
    k_cache, v_cache, options, to_logical = nan_outside_caches((b, cap, hk, d), dtype, lengths, pads, layout, page)
    q = rand((b, tq, h, d), dtype, "cpu")
    k_new, v_new = (rand((b, n_new, hk, d), dtype, "cpu") for _ in range(2)) if n_new else (None, None)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    # without the LSE, the eager shortcut: the same kernel arguments, the same bits
    shortcut = pyllm.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), seqlens, k_new, v_new, causal=True,
                                             window=window, **options)
    out, lse = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new, causal=True, window=window,
                                             return_lse=True, **options)
    assert torch.equal(shortcut, out)
    assert out.shape == q.shape and lse.shape == (b, h, tq) and lse.dtype == (torch.float64 if dtype == torch.float64
                                                                                else torch.float32)
    keys, vals = to_logical(k_cache), to_logical(v_cache)
    for i, (n, pad) in enumerate(zip(lengths, pads)):
        if n_new:  # appended where the options say
            assert torch.equal(keys[i, n:n + n_new], k_new[i]) and torch.equal(vals[i, n:n + n_new], v_new[i])
        seq_k, seq_v = keys[i:i + 1, pad:n + n_new], vals[i:i + 1, pad:n + n_new]
        assert torch.isfinite(seq_k).all()  # (the rows attended, untouched by the append of others)
        ref, ref_lse = attention(q[i:i + 1].double(), seq_k.double(), seq_v.double(), causal=True, window=window)
        if dtype == torch.float64:
            assert rel_err(out[i:i + 1], ref) <= 1e-13 and rel_err(lse[i:i + 1], ref_lse) <= 1e-13
            continue
        torch_out, torch_lse = attention(q[i:i + 1], seq_k, seq_v, causal=True, window=window)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), (i, n)
        assert rel_err(lse[i:i + 1], ref_lse) <= tolerance(torch_lse, ref_lse), (i, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page", [16, 7])
@pytest.mark.parametrize("tq,window,alibi", [(1, (-1, -1), False), (4, (300, -1), True)])
def test_kvcache_paged_decode_splits_match_float64_reference(dtype, page, tq, window, alibi):
    # One long sequence: the decode kernel splits its keys across work items (16 wanted, at least
    # 256 keys each), each split a whole number of 16-position chunks over the blocks, left pad 37.
    b, cap, h, hk, d, n, pad = 1, 1200, 4, 2, 64, 1100, 37
    logical = [rand((b, cap, hk, d), dtype, "cpu") for _ in range(2)]
    for t in logical:
        t[:, :pad] = math.nan
        t[:, n + tq:] = math.nan
    (k_cache, options, to_logical), (v_cache, _, _) = (physical_cache(t, "paged", page, torch.Generator().manual_seed(2))
                                                       for t in logical)
    q, k_new, v_new = rand((b, tq, h, d), dtype, "cpu"), rand((b, tq, hk, d), dtype, "cpu"), rand((b, tq, hk, d), dtype, "cpu")
    slopes = alibi_slopes((h,)) if alibi else None
    out = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor([n], dtype=torch.int32), k_new, v_new,
                                        window=window, cache_leftpad=torch.tensor([pad], dtype=torch.int32),
                                        alibi_slopes=slopes, **options)
    keys, vals = to_logical(k_cache)[:, pad:n + tq], to_logical(v_cache)[:, pad:n + tq]
    ref, _ = attention(q.double(), keys.double(), vals.double(), causal=True, window=window, alibi=slopes)
    torch_out, _ = attention(q, keys, vals, causal=True, window=window, alibi=slopes)
    assert rel_err(out, ref) <= tolerance(torch_out, ref)


def test_kvcache_rotary_with_cache_rows_and_pads():
    # rotary with cache_batch_idx and cache_leftpad: positions are cache positions (the pad counted),
    # as flash-attn's; the attention starts at the pad.
    b, cap, h, hk, d, tq = 2, 40, 4, 2, 64, 2
    lengths, pads, rows = [9, 30], [4, 0], torch.tensor([2, 0], dtype=torch.int32)
    cos, sin = rotary_tables(cap, 32)
    cache = [rand((3, cap, hk, d), torch.float64, "cpu") for _ in range(2)]
    before = [t.clone() for t in cache]
    q, k_new, v_new = (rand((b, tq, n, d), torch.float64, "cpu") for n in (h, hk, hk))
    out = pyllm.flash_attn_with_kvcache(q, *cache, torch.tensor(lengths, dtype=torch.int32), k_new, v_new,
                                        rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, cache_batch_idx=rows,
                                        cache_leftpad=torch.tensor(pads, dtype=torch.int32))
    for i, (n, pad, r) in enumerate(zip(lengths, pads, rows.tolist())):
        pos = torch.arange(n, n + tq)
        ref_k = rotate_reference(k_new[i], cos.double()[pos], sin.double()[pos], False)
        ref_q = rotate_reference(q[i], cos.double()[pos], sin.double()[pos], False)
        assert (cache[0][r, n:n + tq] - ref_k).abs().max() < 1e-12
        keys = torch.cat([before[0][r, pad:n], ref_k])[None]
        vals = torch.cat([before[1][r, pad:n], v_new[i]])[None]
        ref, _ = attention(ref_q[None], keys, vals, causal=True)
        assert rel_err(out[i:i + 1], ref) <= 1e-13
    assert torch.equal(cache[0][1], before[0][1])  # the row no sequence names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kvcache_options_equal_the_plain_call(dtype):
    # Rows picked by cache_batch_idx and pages as long as the cache are the plain call's addresses:
    # the same bits. Through the custom op (as torch.compile reaches it) as well.
    b, cap, h, hk, d = 2, 40, 4, 1, 32
    k_cache, v_cache = rand((b, cap, hk, d), dtype, "cpu"), rand((b, cap, hk, d), dtype, "cpu")
    q, k_new = rand((b, 1, h, d), dtype, "cpu"), rand((b, 1, hk, d), dtype, "cpu")
    seqlens = torch.tensor([10, 39], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want, want_lse = pyllm.flash_attn_with_kvcache(q, want_k, want_v, seqlens, k_new, k_new, return_lse=True)
    rows = torch.tensor([1, 0], dtype=torch.int32)
    ks, vs = k_cache.flip(0).contiguous(), v_cache.flip(0).contiguous()
    out = pyllm.flash_attn_with_kvcache(q, ks, vs, seqlens, k_new, k_new, cache_batch_idx=rows)
    assert torch.equal(out, want) and torch.equal(ks.flip(0), want_k) and torch.equal(vs.flip(0), want_v)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    kp, vp = k_cache.clone(), v_cache.clone()
    out, lse = pyllm.flash_attn_with_kvcache(q, kp, vp, seqlens, k_new, k_new, block_table=table, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(kp, want_k)
    kp, vp = k_cache.clone(), v_cache.clone()
    out, lse = torch.ops.pyllm.flash_attn_with_kvcache(q, kp, vp, seqlens, k_new, k_new, 1 / math.sqrt(d), -1, 0, 0.0,
                                                       None, None, None, None, table)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(kp, want_k)


def rotary_tables(n: int, rotary_dim: int, dtype=torch.float32):
    angles = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, rotary_dim, 2) / rotary_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (T, H, D) rotated by per-token cos / sin (T, rotary_dim / 2), written out pair by pair, in x's dtype."""
    out = x.clone()
    half = cos.shape[-1]
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        c, s_ = cos[:, i, None].to(x.dtype), sin[:, i, None].to(x.dtype)
        out[..., a] = x[..., a] * c - x[..., b] * s_
        out[..., b] = x[..., a] * s_ + x[..., b] * c
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (8, 4))])
@pytest.mark.parametrize("options", ["plain", "paged"])
def test_kvcache_rotary_matches_float64_reference(dtype, interleaved, rotary_dim, causal, window, options):
    # flash-attn's rotary inside the call: new key j of sequence b at position cache_seqlens[b] + j,
    # query i there too when causal or windowed, else every query at cache_seqlens[b]; the appended
    # keys are the rotated ones (one rounding from fp32 math: within twice torch's own error of the
    # same formula in the dtype); the output that of the rotated q over the cache.
    b, cap, h, hk, d, tq = 2, 48, 4, 2, 64, 3
    lengths = [4, 30]
    cos, sin = rotary_tables(cap + 32, rotary_dim)  # a row per position a table row addresses (paged: 5 blocks of 16)
    k_cache, v_cache = rand((b, cap, hk, d), dtype, "cpu"), rand((b, cap, hk, d), dtype, "cpu")
    before = k_cache.clone()
    q, k_new, v_new = rand((b, tq, h, d), dtype, "cpu"), rand((b, tq, hk, d), dtype, "cpu"), rand((b, tq, hk, d), dtype, "cpu")
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    extra = {}
    kc, vc = k_cache, v_cache
    if options == "paged":
        (kc, extra, to_logical), (vc, _, _) = (physical_cache(t, "paged", 16, torch.Generator().manual_seed(5))
                                               for t in (k_cache, v_cache))
    out = pyllm.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, v_new, causal=causal, window=window, rotary_cos=cos,
                                        rotary_sin=sin, rotary_interleaved=interleaved, **extra)
    keys, vals = (to_logical(kc), to_logical(vc)) if options == "paged" else (kc, vc)
    per_query = causal or window != (-1, -1)
    for i, n in enumerate(lengths):
        k_pos = torch.arange(n, n + tq)
        q_pos = k_pos if per_query else torch.full((tq,), n)
        ref_k = rotate_reference(k_new[i].double(), cos.double()[k_pos], sin.double()[k_pos], interleaved)
        torch_k = rotate_reference(k_new[i], cos[k_pos], sin[k_pos], interleaved)
        assert rel_err(keys[i, n:n + tq], ref_k) <= tolerance(torch_k, ref_k)
        assert torch.equal(keys[i, :n], before[i, :n]) and torch.equal(vals[i, n:n + tq], v_new[i])
        ref_q = rotate_reference(q[i].double(), cos.double()[q_pos], sin.double()[q_pos], interleaved)
        seq_k = torch.cat([k_cache[i, :n].double(), ref_k])[None]
        seq_v = torch.cat([v_cache[i, :n], v_new[i]]).double()[None]
        ref, _ = attention(ref_q[None], seq_k, seq_v, causal=causal, window=window)
        torch_q = rotate_reference(q[i], cos[q_pos], sin[q_pos], interleaved)
        torch_out, _ = attention(torch_q[None], torch.cat([k_cache[i, :n], torch_k])[None], seq_v.to(dtype),
                                 causal=causal, window=window)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), i


def test_kvcache_options_compile_and_opcheck():
    # The options through the custom op: torch.compile traces the call (rotary's torch ops around
    # it) without graph breaks, and opcheck passes with a paged cache and with cache rows.
    b, h, hk, d, page = 2, 4, 2, 32, 8
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    cache = rand((6, page, hk, d), torch.float32, "cpu")
    q, k_new = rand((b, 1, h, d), torch.float32, "cpu"), rand((b, 1, hk, d), torch.float32, "cpu")
    cos, sin = rotary_tables(3 * page, 16)
    seqlens = torch.tensor([5, 17], dtype=torch.int32)

    def step(q, kc, vc, k_new):
        return pyllm.flash_attn_with_kvcache(q, kc, vc, seqlens, k_new, k_new, rotary_cos=cos, rotary_sin=sin,
                                             rotary_interleaved=False, block_table=table, return_lse=True)

    want_k, want_v = cache.clone(), cache.clone()
    want = step(q, want_k, want_v, k_new)
    torch._dynamo.reset()
    kc, vc = cache.clone(), cache.clone()
    got = torch.compile(step, fullgraph=True)(q, kc, vc, k_new)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    for extra in ((None, None, table), (torch.tensor([1, 0], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32), None)):
        kc = rand((6, page, hk, d) if extra[2] is not None else (b, 3 * page, hk, d), torch.float32, "cpu")
        torch.library.opcheck(torch.ops.pyllm.flash_attn_with_kvcache.default,
                              (q, kc, kc.clone(), seqlens, k_new, k_new, 0.25, -1, 0, 0.0, None, None, *extra))


def test_kvcache_options_checks():
    b, h, hk, d = 2, 4, 2, 32
    q = rand((b, 1, h, d), torch.float32, "cpu")
    cache = rand((b, 16, hk, d), torch.float32, "cpu")
    new = rand((b, 1, hk, d), torch.float32, "cpu")
    lens = torch.tensor([3, 9], dtype=torch.int32)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    call = lambda **kw: pyllm.flash_attn_with_kvcache(q, *kw.pop("caches", (cache, cache.clone())), lens,
                                                      *kw.pop("new", (new, new)), **kw)
    before = cache.clone()
    cases = [
        (dict(cache_batch_idx=i32(0, 2)), ValueError, r"cache_batch_idx must lie in \[0, 2\)"),
        (dict(cache_batch_idx=i32(0, -1)), ValueError, r"cache_batch_idx must lie in \[0, 2\)"),
        (dict(cache_batch_idx=torch.tensor([0, 1])), TypeError, "cache_batch_idx must be int32"),
        (dict(cache_batch_idx=i32(0)), ValueError, r"cache_batch_idx must be \(batch,\)"),
        (dict(cache_leftpad=i32(4, 0)), ValueError, r"cache_leftpad must lie in \[0, cache_seqlens\]"),
        (dict(cache_leftpad=[0, 0]), TypeError, "cache_leftpad must be an int32 tensor"),
        (dict(block_table=i32(0, 1)), ValueError, r"block_table must be \(batch, blocks per sequence\)"),
        (dict(block_table=i32([0], [2])), ValueError, r"block_table\[1\] must name blocks in \[0, 2\)"),
        (dict(block_table=i32([0], [1]), cache_batch_idx=i32(0, 1)), ValueError, "takes no cache_batch_idx"),
        (dict(block_table=torch.zeros(2, 0, dtype=torch.int32)), ValueError, "at least one block"),
        (dict(caches=(cache[:1], cache[:1].clone())), ValueError, "same batch size"),
        (dict(rotary_cos=torch.ones(16, 8)), ValueError, "both rotary_cos and rotary_sin"),
        (dict(rotary_cos=torch.ones(16, 8), rotary_sin=torch.ones(16, 8), new=(None, None)), ValueError,
         "give k_new and v_new too"),
        (dict(rotary_cos=torch.ones(16, 17), rotary_sin=torch.ones(16, 17)), ValueError, r"rotary_dim .* \[2, head_dim"),
        (dict(rotary_cos=torch.ones(15, 8), rotary_sin=torch.ones(15, 8)), ValueError, "a row per cache position"),
        (dict(rotary_cos=torch.ones(16, 8), rotary_sin=torch.ones(16, 4)), ValueError, r"both be \(seqlen_ro"),
        (dict(rotary_cos=torch.ones(16, 8, dtype=torch.int32), rotary_sin=torch.ones(16, 8)), TypeError, "floating"),
        (dict(caches=(cache[:, :0], cache[:, :0]), block_table=i32([0], [1])), ValueError, "at least one position"),
        (dict(caches=(cache[:, :0], cache[:, :0]), block_table=i32([0], [1]), new=(None, None)), ValueError,
         "at least one position"),  # (the shortcut declines it: the general path's message)
        (dict(caches=(cache[:0], cache[:0]), block_table=i32([0], [1])), ValueError, "has no blocks"),
        (dict(caches=(cache[:0], cache[:0]), cache_batch_idx=i32(0, 0), new=(None, None)), ValueError, "has no rows"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kw)
        assert torch.equal(cache, before), kw  # nothing appended
    # more queries than new keys, causal: the first queries' rotary positions must lie in the tables
    with pytest.raises(ValueError, match="query positions reach 16"):
        pyllm.flash_attn_with_kvcache(rand((b, 4, h, d), torch.float32, "cpu"), cache, cache.clone(), 13, new, new,
                                      rotary_cos=torch.ones(16, 8), rotary_sin=torch.ones(16, 8))
    assert torch.equal(cache, before)
    # the op called directly checks the layouts' dtypes and shapes (the kernel reads them as int32)
    op_args = (q, cache, cache.clone(), lens, new, new, 0.125, -1, 0, 0.0, None, None)
    for extra, error, message in (((torch.tensor([1, 0]), None, None), TypeError, "cache_batch_idx must be int32"),
                                  ((None, i32(0), None), ValueError, r"cache_leftpad must be \(batch,\)"),
                                  ((None, None, i32([0, 1])), ValueError, r"block_table must be \(batch, blocks")):
        with pytest.raises(error, match=message):
            torch.ops.pyllm.flash_attn_with_kvcache(*op_args, *extra)
        assert torch.equal(cache, before)
    # a paged cache's blocks past the keys are not read, nor checked
    out = pyllm.flash_attn_with_kvcache(q, cache, cache.clone(), lens, block_table=i32([0, 99], [1, -5]))
    assert torch.isfinite(out).all()
    # the C++ launcher re-checks the indices it reads
    args = dict(q=q.data_ptr(), k=cache.data_ptr(), v=cache.data_ptr(), out=q.clone().data_ptr(),
                lse=torch.empty(b * h).data_ptr(), cu_seqlens_q=0, cu_seqlens_k=0, seqused_k=lens.data_ptr(), batch=b,
                seqlen_q=1, seqlen_k=16, n_heads=h, n_kv_heads=hk, head_dim=d, q_strides=list(q.stride()[:3]),
                k_strides=list(cache.stride()[:3]), v_strides=list(cache.stride()[:3]),
                o_strides=list(q.stride()[:3]), lse_strides=[h, 1], scale=0.1, window_left=-1, window_right=0, dtype=0)
    rows, table, pads = i32(0, 5), i32([0, 1], [7, 0]), i32(0, 10)
    with pytest.raises(ValueError, match=r"cache_batch_idx 5 of sequence 1 is outside \[0, 2\)"):
        _C.flash_attn_fwd_cpu(**args, kv_batch_idx=rows.data_ptr(), kv_rows=2)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 7 is outside \[0, 2\)"):
        _C.flash_attn_fwd_cpu(**{**args, "seqlen_k": 16}, block_table=table.data_ptr(), block_table_stride=2,
                              page_size=8, kv_rows=2)
    with pytest.raises(ValueError, match=r"block_table_stride \* page_size"):
        _C.flash_attn_fwd_cpu(**args, block_table=table.data_ptr(), block_table_stride=1, page_size=8, kv_rows=2)
    with pytest.raises(ValueError, match=r"cache_leftpad 10 of sequence 1 is outside \[0, 9\]"):
        _C.flash_attn_fwd_cpu(**args, kv_leftpad=pads.data_ptr())
    with pytest.raises(ValueError, match="are for KV-cache calls"):
        _C.flash_attn_fwd_cpu(**{**args, "seqused_k": 0}, kv_leftpad=pads.data_ptr())


@pytest.mark.parametrize("layout", ["plain", "rows", "paged"])
def test_kvcache_appends_write_where_the_layout_says(layout, monkeypatch):
    # The indexed append (one write per cache, every index clamped: the CUDA path's, and the CPU's
    # once checked) and the per-block copies it falls back to write the same, the new tokens at their
    # logical places and nothing else; bad rows and blocks stay inside the cache (no IndexError).
    b, cap, hk, d, n_new = 3, 40, 2, 32, 5
    base = rand((b, cap, hk, d), torch.float32, "cpu")
    cache, options, to_logical = physical_cache(base, layout, 8, torch.Generator().manual_seed(4))
    cache = cache.nan_to_num(0.0)
    lengths = [0, 11, 35]
    new = rand((b, n_new, hk, d), torch.float32, "cpu")
    idx, table = options.get("cache_batch_idx"), options.get("block_table")
    got = [cache.clone(), cache.clone()]
    fa._append_kv_clamped(*got, new, new, torch.tensor(lengths, dtype=torch.int32), idx, table)
    keys = to_logical(got[0])
    for i, n in enumerate(lengths):
        assert torch.equal(keys[i, n:n + n_new], new[i])
    assert int((got[0] != cache).sum()) == b * n_new * hk * d
    copies = [cache.clone(), cache.clone()]

    def refuse(*args):
        raise RuntimeError("refused")  # as index_put refuses a new row that is a view of its cache

    monkeypatch.setattr(fa, "_append_kv_clamped", refuse)
    fa._append_kv_where(*copies, new, new, lengths, idx, table)
    assert torch.equal(copies[0], got[0]) and torch.equal(copies[1], got[1])
    monkeypatch.undo()
    if layout != "plain":
        bad_idx = None if idx is None else torch.tensor([-4, 99, 1], dtype=torch.int32)
        bad_table = None if table is None else table.clone().fill_(10**6)
        fa._append_kv_clamped(*got, new, new, torch.tensor(lengths, dtype=torch.int32), bad_idx, bad_table)


@pytest.mark.cuda
@pytest.mark.parametrize("layout,page,leftpad", [("rows", 0, False), ("paged", 16, True), ("paged", 7, False),
                                                 ("plain", 0, True)])
@pytest.mark.parametrize("tq,n_new", [(1, 1), (3, 0)])
def test_cuda_kvcache_layouts_match_float64_reference(monkeypatch, layout, page, leftpad, tq, n_new):
    # The CUDA decode kernel over the cache layouts (NaN everywhere outside the sequences), bf16,
    # within twice torch's own bf16 error on the GPU; the indices clamped (unchecked) or checked
    # on the host with PYLLM_ATTN_CHECK_SEQLENS=1, the same answer.
    b, cap, h, hk, d = 3, 300, 4, 2, 64
    lengths = [5, 133, 300 - n_new]
    pads = [3, 0, 20] if leftpad else [0, 0, 0]
    logical = [rand((b, cap, hk, d), torch.bfloat16, "cpu") for _ in range(2)]
    for t in logical:
        for i, (n, pad) in enumerate(zip(lengths, pads)):
            t[i, :pad] = math.nan
            t[i, n + n_new:] = math.nan
    (k_cache, options, to_logical), (v_cache, _, _) = (physical_cache(t, layout, page, torch.Generator().manual_seed(3))
                                                       for t in logical)
    if leftpad:
        options["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32)
    options = {k: v.cuda() for k, v in options.items()}
    q = rand((b, tq, h, d), torch.bfloat16, "cpu")
    k_new, v_new = ((rand((b, n_new, hk, d), torch.bfloat16, "cuda") for _ in range(2)) if n_new else (None, None))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    outs = []
    for check in ("0", "1"):
        monkeypatch.setenv("PYLLM_ATTN_CHECK_SEQLENS", check)
        kc, vc = k_cache.cuda(), v_cache.cuda()
        outs.append(pyllm.flash_attn_with_kvcache(q.cuda(), kc, vc, seqlens, k_new, v_new, **options))
    assert torch.equal(outs[0], outs[1])
    keys, vals = to_logical(kc.cpu()), to_logical(vc.cpu())
    for i, (n, pad) in enumerate(zip(lengths, pads)):
        seq_k, seq_v = keys[i:i + 1, pad:n + n_new], vals[i:i + 1, pad:n + n_new]
        ref, _ = attention(q[i:i + 1].double(), seq_k.double(), seq_v.double(), causal=True)
        torch_out, _ = attention(q[i:i + 1].cuda(), seq_k.cuda(), seq_v.cuda(), causal=True)
        assert rel_err(outs[0][i:i + 1], ref) <= tolerance(torch_out, ref), (i, n)


@pytest.mark.cuda
@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_rotary_and_lse_on_cuda(interleaved):
    # rotary and return_lse run on every device: CUDA against the same call on the CPU in fp32
    b, cap, h, hk, d = 2, 64, 4, 2, 64
    k_cache = rand((b, cap, hk, d), torch.bfloat16, "cpu")
    q, k_new = rand((b, 1, h, d), torch.bfloat16, "cpu"), rand((b, 1, hk, d), torch.bfloat16, "cpu")
    cos, sin = rotary_tables(cap, 32)
    lens = torch.tensor([7, 50], dtype=torch.int32)
    kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, return_lse=True)
    want, want_lse = pyllm.flash_attn_with_kvcache(q.float(), k_cache.float(), k_cache.float(), lens, k_new.float(),
                                                   k_new.float(), **kw)
    kc = k_cache.cuda()
    out, lse = pyllm.flash_attn_with_kvcache(q.cuda(), kc, kc.clone(), lens.cuda(), k_new.cuda(), k_new.cuda(),
                                             **{**kw, "rotary_cos": cos.cuda(), "rotary_sin": sin.cuda()})
    assert rel_err(out, want) < 2e-2 and rel_err(lse, want_lse) < 1e-2


# --- flash-attn's interface names (pyllm.flash_attn_interface) -------------------------------------

def test_flash_attn_interface_matches_pyllm():
    from pyllm import flash_attn_interface as fai

    q, k, v = rand((2, 33, 4, 64), torch.float32, "cpu"), rand((2, 40, 2, 64), torch.float32, "cpu"), \
        rand((2, 40, 2, 64), torch.float32, "cpu")
    want, lse = pyllm.flash_attn(q, k, v, causal=True, window=(9, -1), softmax_scale=0.3, return_lse=True)
    assert torch.equal(fai.flash_attn_func(q, k, v, 0.0, 0.3, True, [9, -1]), want)
    out, got_lse, probs = fai.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(9, -1),
                                              return_attn_probs=True)
    assert torch.equal(out, want) and torch.equal(got_lse, lse) and probs.shape == (0,)  # flash-attn's, no dropout
    assert torch.equal(fai.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), causal=True, window_size=(9, -1),
                                                    softmax_scale=0.3), want)
    # qkvpacked: one tensor, gradients flow back into it
    qkv = rand((2, 33, 3, 4, 64), torch.float32, "cpu").requires_grad_()
    out = fai.flash_attn_qkvpacked_func(qkv, causal=True)
    leaves = [t.detach().clone().requires_grad_() for t in qkv.unbind(2)]
    ref = pyllm.flash_attn(*leaves, causal=True)
    assert torch.equal(out, ref)
    dout = rand(out.shape, torch.float32, "cpu")
    (grad,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(grad, torch.stack(torch.autograd.grad(ref, leaves, dout), dim=2))
    # varlen
    cu = torch.tensor([0, 5, 5, 30], dtype=torch.int32)
    qp, kp, vp = (rand((30, 4, 32), torch.float32, "cpu") for _ in range(3))
    assert torch.equal(fai.flash_attn_varlen_func(qp, kp, vp, cu, cu, 25, 25, causal=True),
                       pyllm.flash_attn(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=25,
                                        max_seqlen_k=25, causal=True))


def test_flash_attn_interface_kvcache_and_unsupported_options():
    from pyllm import flash_attn_interface as fai

    q = rand((2, 1, 4, 64), torch.float32, "cpu")
    cache = [rand((2, 16, 2, 64), torch.float32, "cpu") for _ in range(2)]
    new = [rand((2, 1, 2, 64), torch.float32, "cpu") for _ in range(2)]
    ours = [t.clone() for t in cache]
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    out = fai.flash_attn_with_kvcache(q, *ours, *new, cache_seqlens=seqlens, causal=True)
    want = pyllm.flash_attn_with_kvcache(q, *cache, seqlens, *new, causal=True)
    assert torch.equal(out, want) and torch.equal(ours[0], cache[0]) and torch.equal(ours[1], cache[1])
    # cache_seqlens None: the whole cache; flash-attn's default causal=False
    assert torch.equal(fai.flash_attn_with_kvcache(q, *cache), pyllm.flash_attn_with_kvcache(q, *cache, 16, causal=False))
    with pytest.raises(ValueError, match="needs cache_seqlens"):
        fai.flash_attn_with_kvcache(q, *cache, *new)
    k = cache[0]
    # softcap: flash-attn's capped scores, on the CPU kernels (the kv-cache call's too)
    assert torch.equal(fai.flash_attn_func(q, k, k, softcap=30.0), pyllm.flash_attn(q, k, k, softcap=30.0))
    assert torch.equal(fai.flash_attn_with_kvcache(q, k, k, softcap=3.0),
                       pyllm.flash_attn_with_kvcache(q, k, k, k.shape[1], causal=False, softcap=3.0))
    # alibi_slopes: ALiBi, on the CPU kernels (the kv-cache call's too)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    assert torch.equal(fai.flash_attn_func(q, k, k, alibi_slopes=slopes), pyllm.flash_attn(q, k, k, alibi_slopes=slopes))
    assert torch.equal(fai.flash_attn_with_kvcache(q, k, k, alibi_slopes=slopes),
                       pyllm.flash_attn_with_kvcache(q, k, k, k.shape[1], causal=False, alibi_slopes=slopes))
    # slopes a model trains (requires_grad): fixed, as flash-attn takes them, with a warning (refused before)
    trained = slopes.clone().requires_grad_()
    fai._warned_alibi_grad = False  # (once a process)
    with pytest.warns(UserWarning, match="alibi_slopes requires grad; as flash-attn's, the attention gives it none"):
        assert torch.equal(fai.flash_attn_func(q, k, k, alibi_slopes=trained),
                           pyllm.flash_attn(q, k, k, alibi_slopes=slopes))
    # the kv-cache options pass through: rotary, cache rows, left pads, paged caches, the LSE
    cos, sin = rotary_tables(16, 32)
    rows, pads, table = (torch.tensor(v, dtype=torch.int32) for v in ([1, 0], [2, 0], [[1, 0], [0, 1]]))
    for kw in (dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False), dict(cache_batch_idx=rows),
               dict(cache_leftpad=pads), dict(block_table=table)):
        kc = [t.clone() for t in cache] if "block_table" not in kw else [t.view(4, 8, 2, 64).clone() for t in cache]
        ours = [t.clone() for t in kc]
        out, lse = fai.flash_attn_with_kvcache(q, *ours, *new, cache_seqlens=seqlens, causal=True, return_softmax_lse=True,
                                               **{k.replace("rotary_interleaved", "rotary_interleaved"): v for k, v in kw.items()})
        want, want_lse = pyllm.flash_attn_with_kvcache(q, *kc, seqlens, *new, causal=True, return_lse=True, **kw)
        assert torch.equal(out, want) and torch.equal(lse, want_lse) and torch.equal(ours[0], kc[0])
    # a full paged cache: cache_seqlens None means every block of the table
    paged = cache[0].view(4, 8, 2, 64)
    assert torch.equal(fai.flash_attn_with_kvcache(q, paged, paged, block_table=table),
                       pyllm.flash_attn_with_kvcache(q, paged, paged, 16, causal=False, block_table=table))
    # dropout_p: the kernels' (pyllm's masks), the same call as pyllm.flash_attn's
    torch.manual_seed(4)
    dropped = fai.flash_attn_func(q, k, k, dropout_p=0.1)
    torch.manual_seed(4)
    assert torch.equal(dropped, pyllm.flash_attn(q, k, k, dropout_p=0.1))
    with pytest.raises(ValueError, match=r"flash_attn_func: dropout_p must be a number in \[0, 1\)"):
        fai.flash_attn_func(q, k, k, dropout_p=1.0)


def test_flash_attn_interface_errors_use_flash_attns_names():
    # An error raised through flash-attn's names names flash-attn's function and arguments
    # (window_size, the kv-cache call's k / v), not pyllm's (window, k_new / v_new); the cache's
    # tensors are k_cache / v_cache in pyllm's own kv-cache errors too. A compiled call still
    # traces whole (no graph break from the translation).
    from pyllm import flash_attn_interface as fai

    q, k = rand((2, 5, 4, 64), torch.float32, "cpu"), rand((2, 5, 2, 64), torch.float32, "cpu")
    q1, cache = rand((2, 1, 4, 64), torch.float32, "cpu"), rand((2, 16, 2, 64), torch.float32, "cpu")
    new, seqlens = rand((2, 1, 2, 64), torch.float32, "cpu"), torch.tensor([3, 4], dtype=torch.int32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    cases = [
        (lambda: fai.flash_attn_func(q, k, k, window_size=(1, "a")), TypeError, r"^flash_attn_func: window_size must"),
        (lambda: fai.flash_attn_func(q, k, k, window_size=3), TypeError, r"^flash_attn_func: window_size must"),
        (lambda: fai.flash_attn_varlen_func(q[0], k[0], k[0], cu.long(), cu, 3, 3), TypeError,
         r"^flash_attn_varlen_func: cu_seqlens_q must be int32"),
        (lambda: fai.flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), window_size=(0.5, 1)), TypeError,
         r"^flash_attn_qkvpacked_func: window_size"),
        (lambda: fai.flash_attn_with_kvcache(q1, cache, cache, new[..., :32], new, cache_seqlens=seqlens), ValueError,
         r"^flash_attn_with_kvcache: k must be \(batch, seqlen_new"),
        (lambda: fai.flash_attn_with_kvcache(q1, cache, cache, new, cache_seqlens=seqlens), ValueError,
         r"^flash_attn_with_kvcache: give both k and v or neither"),
        (lambda: fai.flash_attn_with_kvcache(q1, cache, cache[:, :8], cache_seqlens=seqlens), ValueError,
         r"^flash_attn_with_kvcache: k_cache and v_cache must have the same shape"),
        (lambda: fai.flash_attn_with_kvcache(q1, cache, cache, cache_seqlens=seqlens, window_size=(1.5, 0)), TypeError,
         r"^flash_attn_with_kvcache: window_size must"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    with pytest.raises(ValueError, match=r"^flash_attn_with_kvcache: k_cache and v_cache must have the same shape"):
        pyllm.flash_attn_with_kvcache(q1, cache, cache[:, :8], seqlens)
    compiled = torch.compile(lambda q, k: fai.flash_attn_func(q, k, k, causal=True, window_size=(2, 0)), fullgraph=True)
    assert torch.equal(compiled(q, k), pyllm.flash_attn(q, k, k, causal=True, window=(2, 0)))


@pytest.mark.parametrize("page", [16, 5])
def test_flash_attn_interface_varlen_over_a_paged_cache(page):
    # flash-attn's varlen call over a paged k / v (prefill into a paged cache): the same as the
    # packed sequences it holds, output and LSE bitwise, gradients reaching the blocks.
    from pyllm import flash_attn_interface as fai

    lengths_q, lengths_k, h, hk, d = [3, 0, 17], [20, 0, 33], 4, 2, 64
    per_seq = -(-max(lengths_k) // page)
    gen = torch.Generator().manual_seed(1)
    table = torch.randperm(3 * per_seq + 2, generator=gen)[:3 * per_seq].view(3, per_seq).to(torch.int32)
    k_pages, v_pages = (rand((3 * per_seq + 2, page, hk, d), torch.float32, "cpu").requires_grad_() for _ in range(2))
    q = rand((sum(lengths_q), h, d), torch.float32, "cpu").requires_grad_()
    packed = [torch.cat([t[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lengths_k)]).detach().requires_grad_()
              for t in (k_pages, v_pages)]
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    out, lse, _ = fai.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 17, 33, causal=True,
                                             return_attn_probs=True, block_table=table)
    want, want_lse = pyllm.flash_attn(q, *packed, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    dout = torch.randn_like(out)
    dk, dv = torch.autograd.grad(out, (k_pages, v_pages), dout)
    want_dk, want_dv = torch.autograd.grad(want, packed, dout)
    for grad, want_grad in ((dk, want_dk), (dv, want_dv)):
        assert torch.equal(torch.cat([grad[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lengths_k)]), want_grad)
    unused = torch.ones(k_pages.shape[:2], dtype=torch.bool)  # (block, row) holding no key
    for b, n in enumerate(lengths_k):
        unused.view(-1)[(table[b].long()[:, None] * page + torch.arange(page)).flatten()[:n]] = False
    assert not dk[unused].any() and not dv[unused].any()
    with pytest.raises(ValueError, match="must name blocks"):
        fai.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 17, 33, block_table=table.clamp_max(0) - 1)
    with pytest.raises(ValueError, match=r"each sequence 0\.\.\d+ keys"):
        fai.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu([20, 0, per_seq * page + 1]), 17, 33, block_table=table)
    with pytest.raises(ValueError, match=r"block_table must be \(batch"):
        fai.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 17, 33, block_table=table[:2])
    with pytest.raises(TypeError, match="int32"):
        fai.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 17, 33, block_table=table.long())


# --- property test: random shapes x options against the float64 reference ----------------------

@st.composite
def attn_problems(draw):
    group, n_kv_heads = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    varlen = draw(st.booleans())
    n_seqs = draw(st.integers(1, 3))
    lens_q = [draw(st.integers(0 if varlen else 1, 80)) for _ in range(n_seqs)]
    lens_k = [draw(st.integers(0 if varlen else 1, 80)) for _ in range(n_seqs)]
    if not varlen:  # one length per side for the padded layout
        lens_q, lens_k = [lens_q[0]] * n_seqs, [lens_k[0]] * n_seqs
    side = st.one_of(st.just(-1), st.integers(0, 24))
    return dict(dtype=draw(st.sampled_from([torch.float64, torch.float32])), varlen=varlen, lens_q=lens_q,
                lens_k=lens_k, n_heads=group * n_kv_heads, n_kv_heads=n_kv_heads,
                head_dim=draw(st.sampled_from([32, 64, 96, 128, 256])), causal=draw(st.booleans()),
                window=(draw(side), draw(side)), scale=draw(st.sampled_from([None, 0.05, 0.7])),
                alibi=draw(st.sampled_from([None, "per head", "per sequence"])),
                softcap=draw(st.sampled_from([0.0, 0.0, 1.5])), dropout=draw(st.sampled_from([0.0, 0.0, 0.3])))


@settings(max_examples=int(__import__("os").environ.get("ATTN_EXAMPLES", 60)), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=attn_problems())
def test_random_problems_match_reference(problem):
    # Inputs seeded by the problem: the same data for an example whatever ran before it (and
    # dropout's seed: the call's draw after it).
    seed = zlib.crc32(repr(sorted(problem.items())).encode())
    torch.manual_seed(seed)
    dtype, h, hk, d = problem["dtype"], problem["n_heads"], problem["n_kv_heads"], problem["head_dim"]
    kw = dict(causal=problem["causal"], window=problem["window"], scale=problem["scale"], softcap=problem["softcap"])
    ours_kw = dict(causal=kw["causal"], window=kw["window"], softmax_scale=kw["scale"], softcap=kw["softcap"],
                   dropout_p=problem["dropout"])
    if problem["alibi"]:
        kw["alibi"] = ours_kw["alibi_slopes"] = alibi_slopes(
            (len(problem["lens_q"]), h) if problem["alibi"] == "per sequence" else (h,))
    if problem["varlen"]:
        cu_q, cu_k = cu(problem["lens_q"], "cpu"), cu(problem["lens_k"], "cpu")
        q = rand((sum(problem["lens_q"]), h, d), dtype, "cpu")
        k, v = (rand((sum(problem["lens_k"]), hk, d), dtype, "cpu") for _ in range(2))
        fn_ours = lambda q, k, v: pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **ours_kw)  # noqa: E731
        dropout = (seeded_draw(seed), problem["dropout"]) if problem["dropout"] else None
        fn_ref = lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_k, dropout=dropout, **kw)[0]  # noqa: E731
    else:
        b, tq, tk = len(problem["lens_q"]), problem["lens_q"][0], problem["lens_k"][0]
        q = rand((b, tq, h, d), dtype, "cpu")
        k, v = (rand((b, tk, hk, d), dtype, "cpu") for _ in range(2))
        fn_ours = lambda q, k, v: pyllm.flash_attn(q, k, v, **ours_kw)  # noqa: E731
        if problem["dropout"]:
            kw.update(keep=dropout_keep(seed, b, h, tq, tk, problem["dropout"]), dropout_p=problem["dropout"])
        fn_ref = lambda q, k, v: attention(q, k, v, **kw)[0]  # noqa: E731
    fn_ours = seeded(fn_ours, seed)
    if q.numel() == 0 or k.numel() == 0:
        return
    # This test hunts logic errors (masks, varlen offsets, GQA mapping, block edges) over random
    # option combinations, not rounding: the fixed tests above hold every path to 2x torch's
    # error. float64 runs the same tiling with ~1e-15 rounding, so any logic error stands out;
    # fp32 (the AVX-512 micro-kernels, 16 lanes against float64's 8) gets a bound far above its
    # rounding (worst seen over 500 examples: 8e-6 in a dq whose softmax was nearly one-hot, where
    # FlashAttention's dS = P (dP - rowsum(dO O)) cancels; torch's own error was 4e-6) and far
    # below what a misplaced key or row does (1 / Tk >= 1e-2).
    # bf16 is not drawn: its rounding is too close to a logic error's size for a fixed bound, and
    # the house rule (2x torch's bf16 error, as the fixed tests) fails by design on near-degenerate
    # rows: a query with 2-3 keys whose dS cancels gets dq, dk up to ~9x that bound, because
    # FlashAttention's delta = rowsum(dO O) uses the stored bf16 O (torch's math reference sums
    # P dP exactly). Measured 2026-11-30, Tk = 2-3, 300 seeds: AMX and fp32-tile paths alike, and
    # torch's own fused CPU SDPA the same to 2 digits (8.85x on dq at Tq = 1, Tk = 2).
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    as64 = [t.double() for t in (q, k, v)]
    dout = rand(q.shape, dtype, "cpu")
    ref, ref_grads = grads_of(fn_ref, as64, dout.double())
    out, our_grads = grads_of(fn_ours, (q, k, v), dout)
    assert rel_err(out, ref) <= bound
    for name, ours, exact in zip("qkv", our_grads, ref_grads):
        scale = max(exact.norm().item(), ref_grads[2].norm().item())  # exactly-zero dq / dk: dv's scale
        assert (ours.double() - exact).norm().item() <= bound * scale, f"d{name}"


@st.composite
def kvcache_problems(draw):
    group, hk = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    b, tq = draw(st.integers(1, 3)), draw(st.integers(1, 10))
    n_new = draw(st.integers(0, tq))
    cap = draw(st.integers(max(n_new, 1), 150))
    lengths = [draw(st.integers(0, cap - n_new)) for _ in range(b)]
    layout = draw(st.sampled_from(["plain", "rows", "paged"]))
    side = st.one_of(st.just(-1), st.integers(0, 24))
    return dict(dtype=draw(st.sampled_from([torch.float64, torch.float32])), b=b, tq=tq, n_new=n_new, cap=cap,
                lengths=lengths, pads=[draw(st.integers(0, n)) if draw(st.booleans()) else 0 for n in lengths],
                h=group * hk, hk=hk, d=draw(st.sampled_from([32, 64, 128])), layout=layout,
                page=draw(st.integers(1, 40)), causal=draw(st.booleans()), window=(draw(side), draw(side)),
                alibi=draw(st.booleans()), softcap=draw(st.sampled_from([0.0, 0.0, 2.0])),
                rotary=draw(st.sampled_from([None, "interleaved", "neox"])) if n_new else None,
                lse=draw(st.booleans()))


@settings(max_examples=int(__import__("os").environ.get("ATTN_EXAMPLES", 60)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problem=kvcache_problems())
def test_random_kvcache_problems_match_reference(problem):
    # flash_attn_with_kvcache over random layouts (rows of a larger cache, blocks of any size,
    # left pads), lengths, new tokens, windows, ALiBi, caps and rotary against the float64
    # reference of each sequence alone; every position outside the sequences NaN. As the property
    # test above: logic errors, not rounding (float64 1e-10, fp32 1e-4 relative).
    torch.manual_seed(zlib.crc32(repr(sorted(problem.items())).encode()))
    p = problem
    dtype, b, h, hk, d, tq, n_new = p["dtype"], p["b"], p["h"], p["hk"], p["d"], p["tq"], p["n_new"]
    logical = [rand((b, p["cap"], hk, d), dtype, "cpu") for _ in range(2)]
    for t in logical:
        for i, (n, pad) in enumerate(zip(p["lengths"], p["pads"])):
            t[i, :pad] = math.nan
            t[i, n:] = math.nan
    before = [t.clone() for t in logical]
    (k_cache, options, to_logical), (v_cache, _, _) = (
        physical_cache(t, p["layout"], p["page"], torch.Generator().manual_seed(5)) for t in logical)
    physical_before = k_cache.clone()
    if any(p["pads"]):
        options["cache_leftpad"] = torch.tensor(p["pads"], dtype=torch.int32)
    q = rand((b, tq, h, d), dtype, "cpu")
    k_new, v_new = (rand((b, n_new, hk, d), dtype, "cpu") for _ in range(2)) if n_new else (None, None)
    slopes = alibi_slopes((h,)) if p["alibi"] else None
    capacity = k_cache.shape[1] * options["block_table"].shape[1] if "block_table" in options else p["cap"]
    if p["rotary"]:
        cos, sin = rotary_tables(capacity + tq, 16)
        options.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=p["rotary"] == "interleaved")
    result = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor(p["lengths"], dtype=torch.int32), k_new,
                                           v_new, causal=p["causal"], window=p["window"], softcap=p["softcap"],
                                           alibi_slopes=slopes, return_lse=p["lse"], **options)
    out = result[0] if p["lse"] else result
    keys, vals = to_logical(k_cache), to_logical(v_cache)
    # nothing written but the new tokens (B x n_new rows of Hkv x D elements), wherever they went
    changed = ~((k_cache == physical_before) | (k_cache.isnan() & physical_before.isnan()))
    assert int(changed.sum()) <= b * n_new * hk * d and (n_new == 0 or changed.any())
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    # flash-attn's rule: queries at their own positions when causal or windowed, a window as long as
    # the cache counting as none
    per_query = p["causal"] or any(0 <= side < capacity for side in p["window"])
    for i, (n, pad) in enumerate(zip(p["lengths"], p["pads"])):
        qi, new_k = q[i].double(), None if k_new is None else k_new[i].double()
        if p["rotary"]:
            interleaved = p["rotary"] == "interleaved"
            k_pos = torch.arange(n, n + n_new)
            q_pos = torch.arange(n, n + tq) if per_query else torch.full((tq,), n)
            new_k = rotate_reference(new_k, cos.double()[k_pos], sin.double()[k_pos], interleaved)
            qi = rotate_reference(qi, cos.double()[q_pos], sin.double()[q_pos], interleaved)
        if n_new:  # appended where the options say, the rest of the sequence untouched
            assert (keys[i, n:n + n_new].double() - new_k).abs().max() <= 8 * torch.finfo(dtype).eps * new_k.abs().max()
            assert torch.equal(vals[i, n:n + n_new], v_new[i])
        assert torch.equal(keys[i, pad:n], before[0][i, pad:n]) and torch.equal(vals[i, pad:n], before[1][i, pad:n])
        seq_k, seq_v = keys[i:i + 1, pad:n + n_new].double(), vals[i:i + 1, pad:n + n_new].double()
        ref, ref_lse = attention(qi[None], seq_k, seq_v, causal=p["causal"], window=p["window"], softcap=p["softcap"],
                                 alibi=slopes)
        assert rel_err(out[i:i + 1], ref) <= bound, i
        if p["lse"]:
            lse, want = result[1][i:i + 1].double(), ref_lse.double()
            assert torch.equal(lse.isinf(), want.isinf()) and rel_err(lse[~lse.isinf()], want[~want.isinf()]) <= bound


# --- head dims between the kernels' and fp16 on the CPU: a widened copy (flash-attn's head dims) ---

def nan_filled_empty(monkeypatch):
    """torch.empty's floating tensors NaN for the rest of the test: rows a kernel leaves unwritten
    show, instead of whatever fresh (often zeroed) memory holds."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() and t.device.type != "meta" else t

    monkeypatch.setattr(torch, "empty", empty)


# (fp32 at head dim 8 was 1% past twice torch's dq error on the portable build (2.94e-7 vs 2.92e-7,
# 2026-12-03): torch's 8-long dot products are nearly exact there; bf16 tests that head dim.)
WIDENED = [(torch.float32, 80), (torch.bfloat16, 40), (torch.float16, 64), (torch.float16, 112),
           (torch.float32, 16), (torch.bfloat16, 200), (torch.bfloat16, 8)]


@pytest.mark.parametrize("dtype,d", WIDENED, ids=str)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (7, -1))], ids=str)
def test_head_dims_without_a_kernel_and_cpu_fp16_match_float64_reference(dtype, d, causal, window):
    # Phi-2's 80, tiny models' 8 and 16, flash-attn's any head dim up to 256: zero-padded to the next
    # kernel head dim; fp16 (flash-attn's usual dtype) on the CPU in fp32, rounded once.
    q, k, v = rand((2, 37, 4, d), dtype, "cpu"), rand((2, 45, 2, d), dtype, "cpu"), rand((2, 45, 2, d), dtype, "cpu")
    check_against_reference(q, k, v, rand((2, 37, 4, d), dtype, "cpu"),
                            lambda q, k, v: pyllm.flash_attn(q, k, v, causal=causal, window=window),
                            lambda q, k, v: attention(q, k, v, causal, window)[0])
    out, lse = pyllm.flash_attn(q, k, v, causal=causal, window=window, return_lse=True)
    _, ref_lse = attention(q.double(), k.double(), v.double(), causal, window)
    torch_lse = attention(q, k, v, causal, window)[1]
    assert out.is_contiguous() and lse.dtype == torch.float32 and rel_err(lse, ref_lse) <= tolerance(torch_lse, ref_lse)


@pytest.mark.parametrize("dtype,d", [(torch.float16, 64), (torch.float32, 80), (torch.bfloat16, 40)], ids=str)
def test_sinks_on_a_widened_call_match_float64_reference(dtype, d):
    # The sinks rescale the widened (fp32 for CPU fp16) output before its one rounding.
    q, k, v = rand((1, 21, 4, d), dtype, "cpu"), rand((1, 30, 2, d), dtype, "cpu"), rand((1, 30, 2, d), dtype, "cpu")
    sinks = torch.randn(4)
    check_against_reference(q, k, v, rand((1, 21, 4, d), dtype, "cpu"),
                            lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, sinks=sinks),
                            lambda q, k, v: attention(q, k, v, True, sinks=sinks.to(q.dtype))[0])


@pytest.mark.parametrize("d", [64, 80])
def test_varlen_rows_past_the_last_sequence_are_zeros(d, monkeypatch):
    # flash-attn takes packed tensors longer than cu_seqlens[-1] (padded to a fixed size): the rows past
    # it are in no sequence; out 0, lse +inf (no key seen), and gradients 0 rather than whatever memory
    # held, which would reach the weights. The real rows: the call on the real rows alone, bitwise.
    nan_filled_empty(monkeypatch)
    lengths = [5, 0, 9]
    q = rand((14 + 6, 4, d), torch.float32, "cpu").requires_grad_()
    k, v = (rand((14 + 3, 2, d), torch.float32, "cpu").requires_grad_() for _ in range(2))
    cu_seqlens = cu(lengths)
    out, lse = pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, causal=True, return_lse=True)
    assert (out[14:] == 0).all() and (lse[:, 14:] == math.inf).all()
    dout = rand(out.shape, torch.float32, "cpu")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert all((g[14:] == 0).all() for g in grads)
    real = [t.detach()[:14].clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = pyllm.flash_attn(*real, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, causal=True,
                                      return_lse=True)
    assert torch.equal(out[:14], want) and torch.equal(lse[:, :14], want_lse)
    for got, exact in zip(grads, torch.autograd.grad(want, real, dout[:14])):
        assert torch.equal(got[:14], exact)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 80), (torch.bfloat16, 48), (torch.float16, 64),
                                     (torch.float16, 80)], ids=str)
@pytest.mark.parametrize("layout,page", [("plain", 0), ("rows", 0), ("paged", 7)])
@pytest.mark.parametrize("tq,n_new,leftpad", [(1, 1, False), (3, 3, True), (2, 0, False), (12, 12, True)])
def test_kvcache_widened_matches_float64_reference(dtype, d, layout, page, tq, n_new, leftpad, monkeypatch):
    # The kv-cache call at head dims without a kernel and in fp16 on the CPU: a widened copy of the
    # keys in use attends, the new tokens land in the caches themselves, bit for bit, where the
    # options put them; everything outside the sequences NaN.
    nan_filled_empty(monkeypatch)
    b, cap, h, hk = 3, 40, 4, 2
    lengths, pads = [5, 21, 40 - n_new], ([3, 0, 11] if leftpad else [0, 0, 0])
    k_cache, v_cache, options, to_logical = nan_outside_caches((b, cap, hk, d), dtype, lengths, pads, layout, page)
    untouched = k_cache.clone()
    q = rand((b, tq, h, d), dtype, "cpu")
    k_new, v_new = (rand((b, n_new, hk, d), dtype, "cpu") for _ in range(2)) if n_new else (None, None)
    out, lse = pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32), k_new,
                                             v_new, causal=True, return_lse=True, **options)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    keys, vals = to_logical(k_cache), to_logical(v_cache)
    for i, (n, pad) in enumerate(zip(lengths, pads)):
        if n_new:
            assert torch.equal(keys[i, n:n + n_new], k_new[i]) and torch.equal(vals[i, n:n + n_new], v_new[i])
        seq_k, seq_v = keys[i:i + 1, pad:n + n_new], vals[i:i + 1, pad:n + n_new]
        ref, ref_lse = attention(q[i:i + 1].double(), seq_k.double(), seq_v.double(), causal=True)
        torch_out, torch_lse = attention(q[i:i + 1], seq_k, seq_v, causal=True)
        assert rel_err(out[i:i + 1], ref) <= tolerance(torch_out, ref), i
        assert rel_err(lse[i:i + 1], ref_lse) <= tolerance(torch_lse, ref_lse), i
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)  # nothing written but the new tokens
    if n_new:
        written = ~((k_cache == untouched) | (k_cache.isnan() & untouched.isnan())).all(-1).all(-1)
        assert written.sum() == b * n_new
    assert (torch.isnan(k_cache) | written[..., None, None] | torch.isfinite(untouched)).all()


def test_kvcache_widened_rotary_and_a_cache_of_more_rows():
    # Rotary at head dim 80 (rotary_dim 32): the call on caches zero-padded to 96 by hand, bitwise,
    # and the same new keys appended. A cache of more rows than the batch: its first rows, the rest
    # untouched (flash-attn's).
    cos, sin = rotary_tables(24, 32)
    q = rand((2, 1, 4, 80), torch.float32, "cpu")
    k_new, v_new = (rand((2, 1, 2, 80), torch.float32, "cpu") for _ in range(2))
    caches = [rand((4, 24, 2, 80), torch.float32, "cpu") for _ in range(2)]
    padded = [torch.nn.functional.pad(c[:2], (0, 16)) for c in caches]
    before = [c.clone() for c in caches]
    seqlens = torch.tensor([3, 17], dtype=torch.int32)
    for interleaved in (False, True):
        kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=True)
        ours = [c.clone() for c in caches]
        theirs = [p.clone() for p in padded]
        out = pyllm.flash_attn_with_kvcache(q, *ours, seqlens, k_new, v_new, **kw)
        want = pyllm.flash_attn_with_kvcache(torch.nn.functional.pad(q, (0, 16)), *theirs, seqlens,
                                             torch.nn.functional.pad(k_new, (0, 16)),
                                             torch.nn.functional.pad(v_new, (0, 16)), softmax_scale=80 ** -0.5, **kw)
        assert torch.equal(out, want[..., :80])
        for o, t, c in zip(ours, theirs, before):
            assert torch.equal(o[:2], t[:2, :, :, :80]) and torch.equal(o[2:], c[2:])
    # more rows than sequences, at a kernel head dim: the eager shortcut on the first rows
    plain = [rand((5, 16, 2, 64), torch.float32, "cpu") for _ in range(2)]
    first = [p[:2].clone() for p in plain]
    rest = [p[2:].clone() for p in plain]
    q64, new64 = rand((2, 1, 4, 64), torch.float32, "cpu"), rand((2, 1, 2, 64), torch.float32, "cpu")
    out = pyllm.flash_attn_with_kvcache(q64, *plain, seqlens - 2, new64, new64)
    assert torch.equal(out, pyllm.flash_attn_with_kvcache(q64, *first, seqlens - 2, new64, new64))
    assert torch.equal(plain[0][:2], first[0]) and torch.equal(plain[0][2:], rest[0]) and torch.equal(plain[1][2:], rest[1])


def test_flash_attn_interface_takes_flash_attns_arguments():
    # What flash-attn takes that pyllm's own calls spell more strictly: numpy / tensor max_seqlen,
    # any negative window side, softcap <= 0, the varlen packed forms, packed tensors padded past
    # cu_seqlens[-1].
    from pyllm import flash_attn_interface as fai

    cu_seqlens = cu([3, 5])
    qkv = rand((10, 3, 4, 64), torch.float32, "cpu").requires_grad_()
    want = pyllm.flash_attn(*(t[:8] for t in qkv.unbind(1)), cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                            causal=True)
    for max_seqlen in (5, np.int64(5), torch.tensor(5)):
        out = fai.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, causal=True, window_size=(-5, -2),
                                                   softcap=-1.0)
        assert torch.equal(out[:8], want) and (out[8:] == 0).all()
    q, kv = qkv[:, 0], qkv[:, 1:]
    out = fai.flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens, 5, np.int32(5), causal=True)
    assert torch.equal(out[:8], want)
    (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert (grad[8:] == 0).all() and grad[:8].abs().sum() > 0
    with pytest.raises(ValueError, match="max_seqlen_q must be a non-negative int"):
        fai.flash_attn_varlen_func(q, q, q, cu_seqlens, cu_seqlens, 5.0, 5)
    d80 = rand((1, 6, 2, 80), torch.float32, "cpu")
    assert fai.flash_attn_func(d80, d80, d80, causal=True).shape == d80.shape


def test_flash_attn_interface_padding_helpers():
    # flash_attn.bert_padding's helpers, as code written for flash-attn unpads a padded batch for the
    # varlen call: the packed tokens, int64 indices, int32 cu_seqlens, the longest, the used counts
    # (flash-attn 2.8's five values); the varlen call on them then pad_input equals each row's
    # attention over its real tokens (float64), zeros at the padding, gradients through both.
    from pyllm import flash_attn_interface as fai

    b, t, h, d = 3, 9, 4, 32
    mask = torch.zeros(b, t, dtype=torch.int64)
    mask[0, :9], mask[1, :4], mask[2, 3:] = 1, 1, 1  # full, right-padded, left-padded
    q, k, v = (rand((b, t, h, d), torch.float64, "cpu").requires_grad_() for _ in range(3))
    (qu, indices, cu_seqlens, longest, used), (ku, *_), (vu, *_) = (fai.unpad_input(x, mask) for x in (q, k, v))
    assert qu.shape == (19, h, d) and indices.dtype == torch.int64 and cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 9, 13, 19] and longest == 9 and used.tolist() == [9, 4, 6]
    assert torch.equal(qu, q.detach().reshape(b * t, h, d)[mask.flatten().bool()])
    out = fai.pad_input(fai.flash_attn_varlen_func(qu, ku, vu, cu_seqlens, cu_seqlens, longest, longest, causal=True),
                        indices, b, t)
    assert out.shape == q.shape
    for row in range(b):
        real = mask[row].bool()
        want, _ = attention(q[row:row + 1, real].detach(), k[row:row + 1, real].detach(), v[row:row + 1, real].detach(),
                            causal=True)
        assert rel_err(out[row:row + 1, real], want) < 1e-13 and (out[row, ~real] == 0).all()
    out.sum().backward()
    assert (q.grad[mask == 0] == 0).all() and (q.grad[mask == 1] != 0).any()
    # unused_mask: allocated but unattended tokens packed too; used counts the attended alone
    unused = torch.zeros_like(mask)
    unused[1, 4:6] = 1
    _, _, cu_with, longest_with, used_with = fai.unpad_input(q.detach(), mask, unused)
    assert cu_with.tolist() == [0, 9, 15, 21] and used_with.tolist() == [9, 4, 6] and longest_with == 9
    # rows of several sequences back to back (flash-attn's docstring example)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    x = torch.arange(18.0).view(3, 6, 1)
    packed, idx, cu2, longest2 = fai.unpad_input_for_concatenated_sequences(x, lengths)
    assert cu2.tolist() == [0, 2, 5, 8, 10, 16] and longest2 == 6
    assert idx.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    real = torch.arange(6) < lengths.sum(1, keepdim=True)
    assert torch.equal(fai.pad_input(packed, idx, 3, 6), x * real[..., None])
    with pytest.raises(ValueError, match="at least 2-D"):
        fai.index_first_axis(torch.arange(4.0), torch.tensor([0]))
    rows, whole = fai.index_first_axis_residual(x.view(18, 1), idx)
    assert torch.equal(rows, packed) and torch.equal(whole, x.view(18, 1)) and not whole.requires_grad
    # both differentiable, as flash-attn's autograd.Function (its BERT keeps the last layer's keys
    # and values whole beside the rows taken): x's gradient is the residual's plus the rows'
    leaf = torch.randn(18, 3, requires_grad=True)
    rows, whole = fai.index_first_axis_residual(leaf, idx)
    (2 * rows.sum() + whole.sum()).backward()
    taken = torch.zeros(18)
    taken[idx] = 1
    assert torch.equal(leaf.grad, (1 + 2 * taken)[:, None].expand(18, 3))
    q = torch.randn(1, 4, 2, 32)
    for no_cap in (np.float32(-1.0), torch.tensor(-1.0), torch.tensor(0.0)):  # as a float's: no cap
        torch.testing.assert_close(fai.flash_attn_func(q, q, q, softcap=no_cap), fai.flash_attn_func(q, q, q))


@pytest.mark.cuda
def test_cuda_widened_head_dims_and_rows_past_the_end():
    # On the GPU: head dim 80 zero-padded for the tensor-core kernels (forward, backward, varlen with
    # rows past cu_seqlens[-1]: zeros from the allocator, LSE +inf) and the kv-cache call on a widened
    # copy, against float64 on the CPU within twice torch's error.
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = rand((2, 37, 4, 80), dtype, "cuda"), rand((2, 45, 2, 80), dtype, "cuda"), rand((2, 45, 2, 80), dtype, "cuda")
        check_against_reference(q, k, v, rand((2, 37, 4, 80), dtype, "cuda"),
                                lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True),
                                lambda q, k, v: attention(q, k, v, True)[0])
        lengths = [5, 0, 9]
        qp, kp, vp = (rand((14 + 6, 2, 80), dtype, "cuda").requires_grad_() for _ in range(3))
        cu_seqlens = cu(lengths, "cuda")
        out, lse = pyllm.flash_attn(qp, kp, vp, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=9,
                                    max_seqlen_k=9, causal=True, return_lse=True)
        grads = torch.autograd.grad(out, (qp, kp, vp), torch.ones_like(out))
        assert (out[14:] == 0).all() and (lse[:, 14:] == math.inf).all() and all((g[14:] == 0).all() for g in grads)
        cache = [rand((2, 32, 2, 80), dtype, "cuda") for _ in range(2)]
        q1, new = rand((2, 1, 4, 80), dtype, "cuda"), rand((2, 1, 2, 80), dtype, "cuda")
        lens = torch.tensor([3, 17], dtype=torch.int32, device="cuda")
        got = pyllm.flash_attn_with_kvcache(q1, *cache, lens, new, new)
        for b, n in enumerate([3, 17]):
            assert torch.equal(cache[0][b, n], new[b, 0])
            keys, values = cache[0][b:b + 1, :n + 1].double().cpu(), cache[1][b:b + 1, :n + 1].double().cpu()
            ref, _ = attention(q1[b:b + 1].double().cpu(), keys, values, causal=True)
            theirs, _ = attention(q1[b:b + 1].cpu(), cache[0][b:b + 1, :n + 1].cpu(), cache[1][b:b + 1, :n + 1].cpu(),
                                  causal=True)
            assert rel_err(got[b:b + 1].cpu(), ref) <= tolerance(theirs, ref)


def test_registered_ops_called_directly_check_what_the_kernels_read():
    # torch.ops.pyllm.flash_attn (what torch.compile's graphs call, and anyone may) had no check of
    # its own: a k of a smaller batch was read past its end (a segfault at B = 2048), float64 k / v
    # read as float32, a v shorter than k read past its end, int64 cu_seqlens read as int32.
    P = torch.ops.pyllm
    q = torch.randn(4, 8, 2, 32)
    for k, v, match in ((q[:1], q[:1], "do not fit"), (q.double(), q.double(), "one dtype"), (q, q[:, :2], "do not fit"),
                        (q[..., :16], q[..., :16], "do not fit"), (q[:, :, :0], q[:, :, :0], "do not fit")):
        with pytest.raises((ValueError, TypeError), match=match):
            P.flash_attn(q, k, v, None, None, -1, -1, 0.1, -1, -1, False)
    packed = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        P.flash_attn(packed, packed, packed, cu, cu.int(), 6, 6, 0.1, -1, -1, False)
    out, lse = P.flash_attn(q, q, q, None, None, -1, -1, 0.1, -1, -1, False)
    with pytest.raises(ValueError, match="do not fit"):
        P.flash_attn_backward(out[:2], None, q, q, q, out, lse, None, None, -1, -1, 0.1, -1, -1, False)
    with pytest.raises(TypeError, match="one dtype"):
        P.flash_attn_backward(out.double(), None, q, q, q, out, lse, None, None, -1, -1, 0.1, -1, -1, False)


def test_kvcache_new_rows_that_are_views_of_the_cache():
    # k_new / v_new viewing the cache rows they are appended after had been overwritten part way
    # through the append (torch's overlap check misses these strided views at batch > 1): the
    # cache's rows 3..4 became [2, 2], not [2, 3]; now as if they had been copies
    torch.manual_seed(0)
    q = torch.randn(2, 1, 1, 32)
    kc = torch.randn(2, 6, 1, 32)
    vc = torch.randn(2, 6, 1, 32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = pyllm.flash_attn_with_kvcache(q, kc, vc, 3, kc[:, 2:4], vc[:, 2:4])
    want = pyllm.flash_attn_with_kvcache(q, kc_ref, vc_ref, 3, kc_ref[:, 2:4].clone(), vc_ref[:, 2:4].clone())
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref) and torch.equal(out, want)


@pytest.mark.parametrize("return_lse", [False, True])
def test_kvcache_query_that_is_a_view_of_the_cache_slot_appended_to(return_lse):
    # q in the cache's memory where k_new lands had been overwritten by the append before attention
    # read it (an audit, 2026-12-06): q is read as it was at the call
    torch.manual_seed(0)
    kc, vc, k_new, v_new = torch.randn(1, 8, 1, 32), torch.randn(1, 8, 1, 32), torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = pyllm.flash_attn_with_kvcache(kc[:, 3:4], kc, vc, 3, k_new, v_new, return_lse=return_lse)
    want = pyllm.flash_attn_with_kvcache(kc_ref[:, 3:4].clone(), kc_ref, vc_ref, 3, k_new, v_new, return_lse=return_lse)
    for o, w in zip(*((out, want) if return_lse else ((out,), (want,)))):
        assert torch.equal(o, w)
    assert torch.equal(kc, kc_ref)


def test_a_softmax_scale_fp32_cannot_hold_is_refused():
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="is inf in fp32"):
        pyllm.flash_attn(q, q, q, softmax_scale=1e39)
    with pytest.raises(ValueError, match="is inf in fp32"):
        pyllm.flash_attn_with_kvcache(q[:, :1], q, q, 2, softmax_scale=1e39)


def test_packed_interface_functions_name_a_wrong_packing():
    from pyllm.flash_attn_interface import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                            flash_attn_varlen_kvpacked_func)
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="kv must have 5 dims with 2 tensors packed along dim 2"):
        flash_attn_kvpacked_func(q, torch.randn(1, 4, 3, 2, 32))
    with pytest.raises(ValueError, match="qkv must have 5 dims with 3 tensors"):
        flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 32))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv must have 4 dims"):
        flash_attn_varlen_kvpacked_func(q[0], torch.randn(4, 2, 32), cu, cu, 4, 4)


def _literal_window_attention(q, k, v, left, right):
    """float64 attention with the window as written (bottom-right aligned; -1 unlimited)."""
    sq, sk = q.shape[1], k.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / math.sqrt(q.shape[-1])
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i + sk - sq - left
    if right >= 0:
        keep &= j <= i + sk - sq + right
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~keep, float("-inf")), -1))
    return torch.einsum("bhts,bshd->bthd", p, v.double())


def test_interface_window_sides_past_seqlen_k_as_flash_attn_kernels():
    # flash-attn 2's kernels (flash_api.cpp, mha_fwd / set_params_fprop) rewrite window_size: a side
    # >= seqlen_k becomes -1, then a negative right beside a left >= 0 becomes seqlen_k; the drop-in
    # gives their numbers (it had taken the window as written: the first queries' outputs 2-4 apart
    # where seqlen_q > seqlen_k + 1). pyllm.flash_attn itself keeps the window as written.
    from pyllm import flash_attn_interface as fai
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 12, 2, 32), torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    # flash-attn 2: right >= seqlen_k -> -1; then left >= 0 with right < 0 -> right = seqlen_k
    for window, kernel in (((3, -1), (3, 4)), ((3, 5), (3, 4)), ((-1, 5), (-1, -1)), ((2, 1), (2, 1))):
        out = fai.flash_attn_func(q, k, v, window_size=window)
        torch.testing.assert_close(out.double(), _literal_window_attention(q, k, v, *kernel), atol=1e-5, rtol=0)
        cache_k, cache_v = k.clone(), v.clone()
        out = fai.flash_attn_with_kvcache(q, cache_k, cache_v, cache_seqlens=4, window_size=window)
        torch.testing.assert_close(out.double(), _literal_window_attention(q, k, v, *kernel), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_dim, dtype", [(16, torch.float32), (64, torch.float16)])  # the widened paths
def test_bad_cache_seqlens_name_the_whole_cache_capacity(head_dim, dtype):
    # the widened copy holds only the rows the lengths reach: its size had been named as the capacity
    q = torch.randn(2, 1, 4, head_dim, dtype=dtype)
    k_cache, v_cache = (torch.randn(2, 8, 2, head_dim, dtype=dtype) for _ in range(2))
    new = torch.randn(2, 1, 2, head_dim, dtype=dtype)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
        pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, torch.tensor([-1, 2], dtype=torch.int32), new, new.clone())
