"""pyllm's CUDA kernels, run on the CPU by tools/cuda_emu (no GPU needed; skipped without a CUDA
toolkit's headers).

Each kernel (SwiGLU / GeGLU, RMSNorm, RoPE, cross-entropy, generalized JSD, AdamW, the KV-cache
decode, the attention forward and backwards, their inline PTX through flash_attn_common.cuh's CPU
stand-ins, the BPE batch encoder with its host side) runs through its real launcher, its blocks'
threads as fibers: the
grid, block and shared-memory arithmetic, the index math, the barriers and warp shuffles are the
CUDA source's own. Its outputs are compared with the CPU twin's in float64 (the same semantics,
tested against torch elsewhere), within twice the CPU twin's own error in the same dtype (that is
within twice torch's: test_<op>.py), and every buffer is framed by NaN margins whose bytes must be
left as they were (a write out of bounds) and which a read out of bounds would carry into the
outputs. Races are test_cuda_emu_race.py's (these cases again, under ThreadSanitizer). What the
emulator cannot see (timing, the hardware's fast intrinsics' error) is the GPU's to check: these
kernels stay unverified until they pass there (README).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyllm
from pyllm import _C
from pyllm.tokenizer import PATTERNS, Tokenizer
from pyllm.ops import flash_attn as attn_ops
from helpers import all_pairs, cuda_emu_build, rel_err, shaped_logits, tolerance
from test_cross_entropy import reference_rows, target_probability
from test_bpe import _cuda_texts, _shuffled_ranks_tokenizer, corpus_texts
from test_distill import divergence_and_grad
from test_flash_attn import alibi_slopes, attention, attention_varlen, dropped_attention, grads_of

ROOT = Path(__file__).resolve().parent.parent
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MARGIN = 64  # elements of NaN before and after every buffer: 128-256 bytes keep 16-byte alignment
# The margins' NaN: a read carries it into the outputs; a payload no arithmetic makes (computed NaNs
# are the canonical 0x7fc00000 / 0x7e00 / 0x7fc0), so a write of any value shows in the bits.
CANARY = {torch.float32: 0x7FA5A5A5, torch.float64: 0x7FF5A5A5A5A5A5A5, torch.float16: 0x7D5A, torch.bfloat16: 0x7FA5}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

P, I64, I32, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
IP = ctypes.POINTER(ctypes.c_int64)
SIGNATURES = {
    "emu_swiglu_fwd": [P, P, P, I64, I64, I64, I64, I32, I32],
    "emu_swiglu_bwd": [P, P, P, P, P, I64, I64, I64, I64, I32, I32],
    "emu_rms_norm_fwd": [P, P, P, P, I64, I64, F64, F64, I32, I32],
    "emu_rms_norm_bwd": [P, P, P, P, P, P, I64, I64, I64, F64, I32, I32],
    "emu_rms_norm_partials": [I64, I64, I32],
    "emu_cross_entropy": [P, P, P, P, P, P, I64, I64, I64, I64, I64, F64, F64, F64, F64, F64, I32, I32],
    "emu_distill": [P, P, P, P, P, I64, I64, I64, I64, I64, F64, F64, F64, F64, F64, F64, F64, I32],
    "emu_rope": [P, P, P, P, I64, I64, I64, I64, I64, IP, IP, I64, I32, I32, I32],
    "emu_adamw_grad_sumsq": [P, I64, I32, P, I64, P],
    "emu_adamw_step": [P, I64, I32, I32, F64, F64, F64, F64, F64, P, P, F64, I32, ctypes.c_uint64],
    "emu_flash_attn_decode": [P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, IP, IP, IP, IP, IP, F64, I64, I64, I32,
                              P, I64, P, P, P, I64, I64, I64, F64, P, I64],
    "emu_flash_attn_decode_workspace": [I64, I64, I64, I64, I64],
    "emu_flash_attn_fwd": [P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, IP, IP, IP, IP, IP, F64, I64, I64, I32,
                           I64, I64, F64, P, I64, F64, ctypes.c_uint64],
    "emu_bpe_encode": [P, P, P, I64, I32, P, P, I64, I32, P, P],
    "emu_flash_attn_bwd": [P, P, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, IP, IP, IP, IP, IP, IP, F64,
                           I64, I64, I32, I32, I32, I64, I64, P, I64, P, I64, F64, P, I64, F64, ctypes.c_uint64],
}


class Emu:
    """The emulator's entry points; each raises RuntimeError with the launcher's message on failure."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_set_device.argtypes = [I32, I32, I32, I32]
        lib.emu_set_block_order.argtypes = [I32, ctypes.c_uint64]
        for name, types in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = types
            fn.restype = I64 if name.endswith(("partials", "workspace")) else I32

    def __getattr__(self, name):
        fn = getattr(self.lib, "emu_" + name)

        def call(*args):
            args = [(ctypes.c_int64 * len(a))(*a) if isinstance(a, (list, tuple)) else a for a in args]
            rc = fn(*args)
            if fn.restype is I32 and rc != 0:
                raise RuntimeError(self.lib.emu_error().decode())
            return rc
        return call


@pytest.fixture(scope="module")
def emu():
    lib = cuda_emu_build().load(race=os.environ.get("PYLLM_EMU_RACE") == "1")  # (test_cuda_emu_race.py's runs)
    if lib is None:
        pytest.skip("no CUDA toolkit headers to build the emulator with")
    e = Emu(lib)
    lib.emu_set_device(4, 9, 0, 227 * 1024)
    # PYLLM_EMU_BLOCK_ORDER=reverse|shuffle: every launch's blocks in that order (the grid's otherwise)
    e.block_order = {"reverse": 1, "shuffle": 2}.get(os.environ.get("PYLLM_EMU_BLOCK_ORDER", ""), 0)
    lib.emu_set_block_order(e.block_order, 1)
    return e


class Framed:
    """Buffers inside NaN margins: .t is the tensor the kernel gets, check() says the margins are untouched."""

    def __init__(self):
        self.frames = []

    def __call__(self, like: torch.Tensor | None = None, *, shape=None, dtype=None, fill=None, offset: int = 0):
        shape = tuple(like.shape) if shape is None else tuple(shape)
        dtype = like.dtype if dtype is None else dtype
        n = 1
        for s in shape:
            n *= s
        whole = torch.empty((n + 2 * MARGIN + offset,), dtype=dtype)
        whole.view(BITS[dtype.itemsize]).fill_(CANARY[dtype] if dtype in CANARY else -7)
        t = whole[MARGIN + offset:MARGIN + offset + n].view(shape)
        if like is not None:
            t.copy_(like)
        elif fill is not None:
            t.fill_(fill)
        self.frames.append((whole, MARGIN + offset, n, whole.clone()))
        return t

    def check(self):
        for whole, start, n, before in self.frames:
            bits = lambda x: x.view(torch.uint8)
            assert torch.equal(bits(whole[:start]), bits(before[:start])), "a write before a buffer's start"
            assert torch.equal(bits(whole[start + n:]), bits(before[start + n:])), "a write past a buffer's end"


def ptr(t):
    return 0 if t is None else t.data_ptr()


def randn(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def close(emulated, cpu_same_dtype, cpu_float64, what=""):
    """The emulated CUDA output within twice the CPU twin's own error in that dtype (float64 reference)."""
    assert torch.isfinite(emulated.double()).all() == torch.isfinite(cpu_float64).all(), what
    err, tol = rel_err(emulated, cpu_float64), tolerance(cpu_same_dtype, cpu_float64)
    assert err <= tol, f"{what}: rel err {err:.3g} > tol {tol:.3g}"


# --- SwiGLU / GeGLU --------------------------------------------------------------------------------

GLU_CASES = [(1, 1), (3, 5), (37, 129), (4, 256), (2, 1000), (130, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, cols", GLU_CASES)
@pytest.mark.parametrize("activation", [0, 1], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("layout", ["split", "packed", "misaligned"])
def test_glu_forward_and_backward(emu, dtype, rows, cols, activation, layout):
    frame = Framed()
    offset = 1 if layout == "misaligned" else 0  # the scalar path (VEC = 1)
    if layout == "packed":
        x = randn((rows, 2 * cols), dtype, 2.0)
        x_e = frame(x)
        gate, up, in_stride = x[:, :cols], x[:, cols:], 2 * cols
        g_ptr, u_ptr = ptr(x_e), ptr(x_e) + cols * x.element_size()
    else:
        gate, up, in_stride = randn((rows, cols), dtype, 2.0), randn((rows, cols), dtype, 2.0), cols
        g_ptr, u_ptr = ptr(frame(gate, offset=offset)), ptr(frame(up, offset=offset))
    dout = randn((rows, cols), dtype)
    out = frame(shape=(rows, cols), dtype=dtype, offset=offset)
    dgate, dup = (frame(shape=(rows, in_stride), dtype=dtype, fill=float("nan")) for _ in range(2)) \
        if layout == "packed" else (frame(shape=(rows, cols), dtype=dtype, offset=offset) for _ in range(2))
    emu.swiglu_fwd(g_ptr, u_ptr, ptr(out), rows, cols, in_stride, cols, CODES[dtype], activation)
    if layout == "packed":  # dgate and dup as the packed backward writes them: halves of one dx row
        dx = frame(shape=(rows, 2 * cols), dtype=dtype)
        emu.swiglu_bwd(ptr(frame(dout)), g_ptr, u_ptr, ptr(dx), ptr(dx) + cols * dx.element_size(), rows, cols,
                       in_stride, cols, CODES[dtype], activation)
        dg, du = dx[:, :cols], dx[:, cols:]
    else:
        emu.swiglu_bwd(ptr(frame(dout, offset=offset)), g_ptr, u_ptr, ptr(dgate), ptr(dup), rows, cols, in_stride,
                       cols, CODES[dtype], activation)
        dg, du = dgate, dup
    frame.check()

    def cpu(dt):
        g, u, d = (t.to(dt).contiguous() for t in (gate, up, dout))
        o, dg_, du_ = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
        _C.swiglu_fwd_cpu(ptr(g), ptr(u), ptr(o), rows, cols, cols, cols, CODES[dt], activation)
        _C.swiglu_bwd_cpu(ptr(d), ptr(g), ptr(u), ptr(dg_), ptr(du_), rows, cols, cols, cols, CODES[dt], activation)
        return o, dg_, du_

    same, ref = cpu(dtype), cpu(torch.float64)
    for name, got, s, r in zip(("out", "dgate", "dup"), (out, dg, du), same, ref):
        close(got, s, r, name)


# --- RMSNorm ---------------------------------------------------------------------------------------

# cols: a warp per row (<= 1,024 16-bit elements, 256 fp32), a block per row beyond, an odd width
# (the scalar path), the backward's widest shared-memory row, and more rows than the backward's
# grid has groups on the emulated 4 SMs (its rows loop takes a second step: group_sum twice per block)
RMS_CASES = [(1, 8), (5, 100), (9, 256), (7, 1024), (3, 1500), (6, 4096), (2, 8200), (100, 2048)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, cols", RMS_CASES)
@pytest.mark.parametrize("weight, offset, cast_first", [(True, 0.0, False), (True, 1.0, True), (False, 0.0, False)],
                         ids=["llama", "gemma", "no-weight"])
def test_rms_norm_forward_and_backward(emu, dtype, rows, cols, weight, offset, cast_first):
    frame = Framed()
    x, dout = randn((rows, cols), dtype, 3.0), randn((rows, cols), dtype)
    w = randn((cols,), dtype) if weight else None
    out, rstd = frame(shape=(rows, cols), dtype=dtype), frame(shape=(rows,), dtype=torch.float32)
    x_e, w_e, dout_e = frame(x), frame(w) if weight else None, frame(dout)
    emu.rms_norm_fwd(ptr(x_e), ptr(w_e), ptr(out), ptr(rstd), rows, cols, 1e-6, offset, cast_first, CODES[dtype])
    n = emu.rms_norm_partials(rows, cols, CODES[dtype])
    assert n >= 1
    dx = frame(shape=(rows, cols), dtype=dtype)
    partials = frame(shape=(n, cols), dtype=torch.float32) if weight else None
    emu.rms_norm_bwd(ptr(dout_e), ptr(x_e), ptr(w_e), ptr(rstd), ptr(dx), ptr(partials), n if weight else 0, rows,
                     cols, offset, cast_first, CODES[dtype])
    frame.check()

    def cpu(dt):
        xs, ds = x.to(dt), dout.to(dt)
        ws = w.to(dt) if weight else None
        o, r = torch.empty_like(xs), torch.empty(rows, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        dx_, dw_ = torch.empty_like(xs), torch.empty(cols, dtype=dt) if weight else None
        _C.rms_norm_fwd_cpu(ptr(xs), ptr(ws), ptr(o), ptr(r), rows, cols, 1e-6, offset, cast_first, CODES[dt])
        _C.rms_norm_bwd_cpu(ptr(ds), ptr(xs), ptr(ws), ptr(r), ptr(dx_), ptr(dw_), rows, cols, offset, cast_first,
                            CODES[dt], False)
        return o, r, dx_, dw_

    same, ref = cpu(dtype), cpu(torch.float64)
    close(out, same[0], ref[0], "out")
    # rstd is fp32 whatever the dtype: against torch's own fp32 reduction (the CPU twin's sum in
    # fp64 lanes is closer than any fp32 tree, the shuffles' included)
    close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6), ref[1], "rstd")
    close(dx, same[2], ref[2], "dx")
    if weight:  # against torch's own dweight (its fp32 sum over rows: the CPU twin's fp64 lanes are closer)
        wt = w.clone().requires_grad_()
        if offset == 0.0:
            y = torch.nn.functional.rms_norm(x, (cols,), wt, 1e-6)
        else:
            y = torch.nn.functional.rms_norm(x, (cols,), None, 1e-6) * (offset + wt)
        y.backward(dout)
        close(partials.sum(0), wt.grad, ref[3], "dweight")


# --- RoPE ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, H, D, rotary", [(1, 1, 1, 8, 8), (2, 7, 3, 64, 64), (1, 33, 4, 128, 64), (3, 5, 2, 80, 32)])
@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per-batch"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inverse"])
def test_rope(emu, dtype, B, T, H, D, rotary, per_batch, interleaved, inverse):
    frame = Framed()
    qkv = randn((B, T, 3 * H, D), dtype)  # x a strided view of a fused projection, as in the model
    x = qkv[:, :, H:2 * H]
    half = rotary // 2
    angles = torch.rand((B if per_batch else 1, T, half), dtype=torch.float64) * 6.0
    if not per_batch:
        angles = angles[0]
    qkv_e = frame(qkv)
    x_e = qkv_e[:, :, H:2 * H]
    cos_e, sin_e = frame(angles.cos().float()), frame(angles.sin().float())  # fp32 tables (fp64 for fp64 x)
    out = frame(shape=x.shape, dtype=dtype)
    cs_batch = T * half if per_batch and B > 1 else 0
    emu.rope(ptr(x_e), ptr(cos_e), ptr(sin_e), ptr(out), B, T, H, D, half, list(x_e.stride()[:3]),
             list(out.stride()[:3]), cs_batch, inverse, CODES[dtype], interleaved)
    frame.check()

    def cpu(dt):
        xs, o = x.to(dt), torch.empty(x.shape, dtype=dt)
        table = torch.float64 if dt == torch.float64 else torch.float32
        c, s = angles.cos().float().to(table), angles.sin().float().to(table)
        _C.rope_cpu(ptr(xs), ptr(c), ptr(s), ptr(o), B, T, H, D, half, list(xs.stride()[:3]), list(o.stride()[:3]),
                    cs_batch, inverse, CODES[dt], interleaved=interleaved)
        return o

    close(out, cpu(dtype), cpu(torch.float64), "out")


# --- cross-entropy and generalized JSD (row losses over logits) -------------------------------------

def math_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


# (rows, vocab): short rows (fewer threads than the block's cap; 32 of them: one row's error is a sample
# of one or two roundings, which the tolerance cannot bound), odd vocabularies (the scalar
# path), rows of several 16-byte packs per thread
ROW_CASES = [(32, 5), (6, 100), (4, 1001), (3, 4096), (2, 20011)]
CE_OPTIONS = {"plain": dict(), "smoothing": dict(label_smoothing=0.1), "z-loss": dict(z_loss=1e-3),
              "capped": dict(scale=0.7, softcap=5.0), "grad-rows": dict(grad_rows=True, grad_scale=0.25),
              # DFT's: each row times its target's probability, with z-loss and smoothing in it too
              "token-scaling": dict(token_scaling=True, z_loss=1e-3, label_smoothing=0.1, grad_rows=True)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, vocab", ROW_CASES)
@pytest.mark.parametrize("option", list(CE_OPTIONS))
@pytest.mark.parametrize("in_place", [False, True], ids=["grad", "in-place"])
def test_cross_entropy(emu, dtype, rows, vocab, option, in_place):
    o = dict(scale=1.0, softcap=0.0, label_smoothing=0.0, z_loss=0.0, grad_scale=1.0, grad_rows=False,
             token_scaling=False)
    o.update(CE_OPTIONS[option])
    frame = Framed()
    logits = randn((rows, vocab + 3), dtype, 4.0)[:, :vocab]  # rows a stride apart, as a view's
    targets = torch.randint(0, vocab, (rows,))
    targets[0] = -100  # an ignored row
    grad_rows = torch.rand(rows, dtype=torch.float64) if o["grad_rows"] else None
    whole = frame(shape=(rows, vocab + 3), dtype=dtype, fill=0.0)
    whole[:, :vocab] = logits
    logits_e = whole[:, :vocab]
    loss, z_part = frame(shape=(rows,), dtype=torch.float32), frame(shape=(rows,), dtype=torch.float32)
    grad = logits_e if in_place else frame(shape=(rows, vocab), dtype=dtype)
    emu.cross_entropy(ptr(logits_e), ptr(frame(targets)), ptr(loss), ptr(z_part), ptr(grad),
                      ptr(frame(grad_rows.float())) if o["grad_rows"] else 0, rows, vocab, vocab + 3,
                      grad.stride(0), -100, o["scale"], o["softcap"], o["label_smoothing"], o["z_loss"],
                      o["grad_scale"], CODES[dtype], int(o["token_scaling"]))
    frame.check()

    def cpu(dt):  # the CPU twin: in float64 the reference
        lg = logits.to(dt).contiguous()
        m = math_dtype(dt)
        l_, z_, g_ = torch.empty(rows, dtype=m), torch.empty(rows, dtype=m), torch.empty_like(lg)
        gr = grad_rows.to(m) if o["grad_rows"] else None
        _C.cross_entropy_cpu(ptr(lg), ptr(targets), ptr(l_), ptr(z_), ptr(g_), ptr(gr), rows, vocab, vocab, vocab,
                             -100, o["scale"], o["softcap"], o["label_smoothing"], o["z_loss"], o["grad_scale"],
                             CODES[dt], token_scaling=o["token_scaling"])
        return l_, z_, g_

    ref = cpu(torch.float64)
    # torch's own: the same losses in fp32 from the same logits (autocast's F.cross_entropy), the
    # gradient by autograd, rounded to the logits' dtype
    x = logits.detach().float().requires_grad_()
    theirs = reference_rows(x, targets, -100, o["label_smoothing"], o["z_loss"], o["scale"], o["softcap"] or None,
                            torch.float32, o["token_scaling"])
    weights = torch.full((rows,), o["grad_scale"]) * (grad_rows.float() if o["grad_rows"] else 1.0)
    (their_grad,) = torch.autograd.grad(theirs, x, weights)
    z = shaped_logits(logits.float(), o["scale"], o["softcap"] or None)
    their_z = o["z_loss"] * torch.logsumexp(z, -1).square() * (targets != -100)
    if o["token_scaling"]:
        their_z = their_z * target_probability(z, targets)
    close(loss, theirs.detach(), ref[0], "loss")
    close(z_part, their_z, ref[1], "z_part")
    close(grad, their_grad.to(dtype), ref[2], "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, vocab", ROW_CASES)
@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 0.7)], ids=["fwd-kl", "jsd", "rev-kl"])
@pytest.mark.parametrize("option", ["plain", "capped", "one-teacher-row", "grad-rows"])
def test_generalized_jsd(emu, dtype, rows, vocab, beta, temperature, option):
    frame = Framed()
    student = randn((rows, vocab), dtype, 3.0)
    teacher = randn((1 if option == "one-teacher-row" else rows, vocab), dtype, 3.0)
    t_stride = 0 if option == "one-teacher-row" else vocab
    caps = (0.9, 6.0, 1.2, 8.0) if option == "capped" else (1.0, 0.0, 1.0, 0.0)
    grad_rows = torch.rand(rows, dtype=torch.float64) if option == "grad-rows" else None
    loss, grad = frame(shape=(rows,), dtype=torch.float32), frame(shape=(rows, vocab), dtype=dtype)
    emu.distill(ptr(frame(student)), ptr(frame(teacher)), ptr(loss), ptr(grad),
                ptr(frame(grad_rows.float())) if grad_rows is not None else 0, rows, vocab, vocab, t_stride, vocab,
                *caps, temperature, beta, 0.5, CODES[dtype])
    frame.check()

    def cpu(dt):  # the CPU twin: in float64 the reference
        s, t = student.to(dt), teacher.to(dt)
        m = math_dtype(dt)
        l_, g_ = torch.empty(rows, dtype=m), torch.empty_like(s)
        gr = grad_rows.to(m) if grad_rows is not None else None
        _C.distill_cpu(ptr(s), ptr(t), ptr(l_), ptr(g_), ptr(gr), rows, vocab, vocab, t_stride, vocab, *caps,
                       temperature, beta, 0.5, CODES[dt])
        return l_, g_

    ref = cpu(torch.float64)
    # torch's own: the divergence written in torch ops on the inputs' dtype, its gradient by autograd
    scale, softcap, teacher_scale, teacher_softcap = caps
    theirs, their_grad = divergence_and_grad(student, teacher.expand(rows, vocab), beta, temperature, scale,
                                             softcap or None, teacher_scale, teacher_softcap or None)
    weights = 0.5 * (grad_rows if grad_rows is not None else torch.ones(rows, dtype=torch.float64))
    close(loss, theirs.float(), ref[0], "loss")
    close(grad, (their_grad.double() * weights[:, None]).to(dtype), ref[1], "grad")


# --- AdamW -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("param_dtype, master", [(torch.float32, False), (torch.bfloat16, True),
                                                 (torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp32", "bf16-master", "fp16-master", "bf16"])
@pytest.mark.parametrize("clip, scaled", [(False, False), (True, True), (True, 1e-40)],
                         ids=["plain", "unscale-clip", "scale-past-fp32"])  # the last: a skipped step
def test_adamw(emu, param_dtype, master, clip, scaled):
    # sizes across the grad-norm pass's 65,536-element chunks, odd ones (the scalar tail), one element
    sizes = [1, 7, 1000, 65536 + 13, 3 * 65536]
    frame = Framed()

    def state(dt, framed):
        make = frame if framed else (lambda t: t.clone())
        torch.manual_seed(0)
        params = [make(randn((n,), torch.float32).to(param_dtype)) for n in sizes]
        grads = [make(randn((n,), torch.float32, 3.0).to(param_dtype)) for n in sizes]
        masters = [make(p.float()) for p in params] if master else [None] * len(sizes)
        m = [make(randn((n,), torch.float32, 0.1)) for n in sizes]
        v = [make(randn((n,), torch.float32, 0.1).abs()) for n in sizes]
        steps = [make(torch.tensor([3.0])) for _ in sizes]
        return params, grads, masters, m, v, steps

    from pyllm.ops import adamw as adamw_ops
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)

    def run(framed):
        params, grads, masters, m, v, steps = state(param_dtype, framed)
        table = adamw_ops.build_table(params, grads, masters, m, v, steps)
        code = CODES[param_dtype]
        sumsq = frame(shape=(1,), dtype=torch.float64, fill=0.0) if framed else torch.zeros(1, dtype=torch.float64)
        loss_scale = torch.tensor([8.0 if scaled is True else scaled]) if scaled else None
        if framed:
            chunks = sum((n + adamw_ops.CUDA_CHUNK - 1) // adamw_ops.CUDA_CHUNK for n in sizes)
            partials = frame(shape=(chunks,), dtype=torch.float64)
            emu.adamw_grad_sumsq(ptr(table), len(sizes), code, ptr(partials), chunks, ptr(sumsq))
            emu.adamw_step(ptr(table), len(sizes), code, master, *hyper.values(), ptr(sumsq), ptr(loss_scale),
                           1.0 if clip else -1.0, False, 0)
        else:
            _C.adamw_grad_sumsq_cpu(ptr(table), len(sizes), code, ptr(sumsq))
            _C.adamw_step_cpu(ptr(table), len(sizes), code, master, *hyper.values(), ptr(sumsq), ptr(loss_scale),
                              1.0 if clip else -1.0, False, 0)
        return sumsq, params, masters, m, v

    emulated, cpu = run(True), run(False)
    frame.check()
    if scaled not in (True, False):  # nothing written
        before = state(param_dtype, False)
        for got, want in zip(emulated[1], before[0]):
            assert torch.equal(got, want)
    # test_optim's GPU test's bounds: the same per-element arithmetic, up to the order of its
    # roundings (fma contraction) and the norm's summation order
    assert emulated[0].item() == pytest.approx(cpu[0].item(), rel=1e-12)
    for i, got_list in enumerate(emulated[1:], start=1):
        for got, want in zip(got_list, cpu[i]):
            if want is None:
                continue
            if i == 1 and want.dtype != torch.float32:  # 16-bit params: rounded from the fp32 masters
                assert (got != want).double().mean().item() < 1e-3
            else:
                assert rel_err(got, want) < (1e-6 if i == 1 else 1e-5)


# --- KV-cache decode (split-KV) --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B, Tq, H, Hkv, capacity, lengths",
                         [(1, 1, 2, 2, 64, [37]), (2, 1, 4, 1, 300, [300, 1]), (3, 2, 4, 2, 700, [5, 700, 333]),
                          (2, 4, 8, 2, 129, [0, 129])],
                         ids=["mha", "mqa", "gqa-2q", "gqa-4q-empty"])
@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (50, 0)], ids=["causal", "full", "window"])
def test_kv_cache_decode(emu, dtype, D, B, Tq, H, Hkv, capacity, lengths, window, mods="plain"):
    # mods: capped scores ("softcap") and ALiBi slopes per head or per sequence ("alibi", "alibi-batch"),
    # run by test_kv_cache_decode_score_mods
    frame = Framed()
    q = randn((B, Tq, H, D), dtype, 2.0 if mods == "softcap" else 1.0)  # (so that a cap of 1.5 binds)
    k, v = randn((B, capacity, Hkv, D), dtype), randn((B, capacity, Hkv, D), dtype)
    softcap = 1.5 if mods == "softcap" else 0.0
    slopes = {"alibi": lambda: alibi_slopes((H,)), "alibi-batch": lambda: alibi_slopes((B, H)) * 0.1}.get(mods, lambda: None)()
    slopes_e = None if slopes is None else frame(slopes)
    seqused = torch.tensor(lengths, dtype=torch.int32)
    out = frame(shape=q.shape, dtype=dtype)
    lse = frame(shape=(B, H, Tq), dtype=torch.float32)
    ws_bytes = emu.flash_attn_decode_workspace(B, Tq, capacity, H, D)
    workspace = frame(shape=(max(ws_bytes, 1),), dtype=torch.uint8)
    q_e, k_e, v_e = frame(q), frame(k), frame(v)
    s3 = lambda t: attn_ops._strides3(t, False)
    scale = D ** -0.5
    emu.flash_attn_decode(ptr(q_e), ptr(k_e), ptr(v_e), ptr(out), ptr(lse), ptr(frame(seqused)), B, Tq, capacity, H,
                          Hkv, D, s3(q_e), s3(k_e), s3(v_e), s3(out), attn_ops._lse_strides(lse, False), scale,
                          window[0], window[1], CODES[dtype], ptr(workspace), ws_bytes, 0, 0, 0, 0, 0, B, softcap,
                          ptr(slopes_e), 0 if slopes is None or slopes.dim() == 1 else H)
    frame.check()

    def cpu(dt):  # (fp16: in fp32, rounded once, as pyllm's CPU path runs it)
        o, l_ = attn_ops._attend_cache(q.to(dt), k.to(dt), v.to(dt), seqused, scale, window[0], window[1],
                                       softcap=softcap, alibi_slopes=slopes)
        return o, l_

    same, ref = cpu(torch.float32 if dtype == torch.float16 else dtype), cpu(torch.float64)
    same = (same[0].to(dtype), same[1])
    close(out, same[0], ref[0], "out")
    seen = torch.isfinite(ref[1])  # a query that sees no key: lse +inf, out 0
    assert torch.equal(torch.isfinite(lse), seen)
    close(lse[seen], same[1][seen], ref[1][seen], "lse")


@pytest.mark.parametrize("mods", ["softcap", "alibi", "alibi-batch"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B, Tq, H, Hkv, capacity, lengths",
                         [(2, 1, 4, 1, 300, [300, 1]), (2, 4, 8, 2, 129, [0, 129])], ids=["mqa", "gqa-4q-empty"])
def test_kv_cache_decode_score_mods(emu, mods, D, B, Tq, H, Hkv, capacity, lengths):
    # Gemma 2's capped scores and ALiBi (flash-attn's softcap, alibi_slopes) in the split-KV decode
    # kernel (unverified on a GPU): against the CPU twin's, causal and windowed
    for window in ((-1, 0), (50, 0)):
        test_kv_cache_decode(emu, torch.bfloat16, D, B, Tq, H, Hkv, capacity, lengths, window, mods)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("layout", ["batch-idx", "leftpad", "paged", "paged-leftpad"])
def test_kv_cache_decode_layouts(emu, dtype, Tq, layout):
    # flash-attn's cache layouts: rows of a larger cache (cache_batch_idx), left-padded rows
    # (cache_leftpad), a paged cache (block_table); the CPU twin reads the same arguments
    B, H, Hkv, D, page = 3, 4, 2, 64, 16
    frame = Framed()
    paged = layout.startswith("paged")
    kv_rows, per_row = (12, page) if paged else (5, 64)
    k, v = randn((kv_rows, per_row, Hkv, D), dtype), randn((kv_rows, per_row, Hkv, D), dtype)
    q = randn((B, Tq, H, D), dtype)
    batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32) if layout == "batch-idx" else None
    leftpad = torch.tensor([3, 0, 10], dtype=torch.int32) if layout.endswith("leftpad") else None
    table = torch.randperm(kv_rows)[:B * 4].view(B, 4).to(torch.int32) if paged else None
    seqused = torch.tensor([20, 7, 40], dtype=torch.int32)
    options = attn_ops._cache_layout_args(k, batch_idx, leftpad, table)  # the CPU twin's arguments
    capacity = options["seqlen_k"]
    out, lse = frame(shape=q.shape, dtype=dtype), frame(shape=(B, H, Tq), dtype=torch.float32)
    ws_bytes = emu.flash_attn_decode_workspace(B, Tq, capacity, H, D)
    workspace = frame(shape=(max(ws_bytes, 1),), dtype=torch.uint8)
    q_e, k_e, v_e = frame(q), frame(k), frame(v)
    s3 = lambda t: attn_ops._strides3(t, False)
    framed = {name: frame(t) for name, t in (("kv_batch_idx", batch_idx), ("kv_leftpad", leftpad),
                                             ("block_table", table)) if t is not None}
    scale = D ** -0.5
    emu.flash_attn_decode(ptr(q_e), ptr(k_e), ptr(v_e), ptr(out), ptr(lse), ptr(frame(seqused)), B, Tq, capacity, H,
                          Hkv, D, s3(q_e), s3(k_e), s3(v_e), s3(out), attn_ops._lse_strides(lse, False), scale, -1, 0,
                          CODES[dtype], ptr(workspace), ws_bytes, ptr(framed.get("kv_batch_idx")),
                          ptr(framed.get("kv_leftpad")), ptr(framed.get("block_table")),
                          options.get("block_table_stride", 0), options.get("page_size", 0), kv_rows, 0.0, 0, 0)
    frame.check()

    def cpu(dt):
        kc, vc = k.to(dt), v.to(dt)
        return attn_ops._attend_cache(q.to(dt), kc, vc, seqused, scale, -1, 0,
                                      cache_options=attn_ops._cache_layout_args(kc, batch_idx, leftpad, table))

    same, ref = cpu(dtype), cpu(torch.float64)
    close(out, same[0], ref[0], "out")
    close(lse, same[1], ref[1], "lse")


# --- FlashAttention forward and backward (tensor cores: mma.sync, ldmatrix, cp.async emulated) --------

def emulated_attention(emu, q, k, v, dout, causal, window, cu_q=None, cu_k=None, algo=0, softcap=0.0, slopes=None,
                       dropout=(0.0, 0), scale=None):
    """out, lse, dq, dk, dv from the CUDA launchers (forward, then the backward with algo 0: the
    tensor-core kernels, 1: the fp32 SIMT ones, 2: the tensor-core kernels with dQ added up by
    atomics, with deterministic=False), every buffer framed. softcap, slopes: capped scores and
    ALiBi slopes ((H,) or (batch, H) fp32). dropout: (dropout_p, seed)."""
    frame = Framed()
    varlen = cu_q is not None
    dtype, D = q.dtype, q.shape[-1]
    left, right = window[0], 0 if causal else window[1]
    if varlen:
        batch = cu_q.numel() - 1
        lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        seqlen_q, seqlen_k, totals = max(lens_q), max(lens_k), (q.shape[0], k.shape[0])
        lse = frame(shape=(q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        batch, seqlen_q, seqlen_k, totals = q.shape[0], q.shape[1], k.shape[1], (-1, -1)
        lse = frame(shape=(q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    q_e, k_e, v_e, dout_e = frame(q), frame(k), frame(v), frame(dout)
    cu_q_e, cu_k_e = (frame(t) if t is not None else None for t in (cu_q, cu_k))
    out = frame(shape=q.shape, dtype=dtype)
    s3 = lambda t: attn_ops._strides3(t, varlen)
    lse_strides = attn_ops._lse_strides(lse, varlen)
    scale = D ** -0.5 if scale is None else scale
    mods = (softcap, ptr(frame(slopes)) if slopes is not None else 0,
            slopes.shape[1] if slopes is not None and slopes.dim() == 2 else 0, *dropout)
    emu.flash_attn_fwd(ptr(q_e), ptr(k_e), ptr(v_e), ptr(out), ptr(lse), ptr(cu_q_e), ptr(cu_k_e), 0, batch, seqlen_q,
                       seqlen_k, q.shape[-2], k.shape[-2], D, s3(q_e), s3(k_e), s3(v_e), s3(out), lse_strides, scale,
                       left, right, CODES[dtype], *totals, *mods)
    dq, dk, dv = (frame(shape=t.shape, dtype=dtype) for t in (q, k, v))
    delta = frame(shape=lse.shape, dtype=torch.float32)
    # the atomic variant's fp32 dQ accumulator: (rows, heads, D) as q, poisoned (the launcher zeroes it)
    dq_accum = frame(shape=(q.numel(),), dtype=torch.float32) if algo == 2 else None
    emu.flash_attn_bwd(ptr(dout_e), 0, ptr(q_e), ptr(k_e), ptr(v_e), ptr(out), ptr(lse), ptr(dq), ptr(dk), ptr(dv),
                       ptr(cu_q_e), ptr(cu_k_e), batch, seqlen_q, seqlen_k, q.shape[-2], k.shape[-2], D, s3(q_e), s3(k_e),
                       s3(v_e), s3(out), s3(dk), lse_strides, scale, left, right, CODES[dtype], algo != 2, algo, *totals,
                       ptr(delta), delta.numel(), ptr(dq_accum), 0 if dq_accum is None else dq_accum.numel(), *mods)
    frame.check()
    return out, lse, dq, dk, dv


def check_attention(got, q, k, v, dout, reference):
    """got (out, lse, dq, dk, dv) within twice torch's own error in q's dtype (the float64 reference)."""
    exact, exact_grads = grads_of(reference, [t.double() for t in (q, k, v)], dout.double())
    exact_lse = reference(q.double(), k.double(), v.double())[1]
    theirs, their_grads = grads_of(reference, (q, k, v), dout)
    their_lse = reference(q.float(), k.float(), v.float())[1]  # (torch's lse: fp32 from fp32 scores)
    close(got[0], theirs, exact, "out")
    seen = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(got[1]), seen)
    close(got[1][seen], their_lse[seen], exact_lse[seen], "lse")
    for name, mine, t, e in zip(("dq", "dk", "dv"), got[2:], their_grads, exact_grads):
        close(mine, t, e, name)


ATTN_CASES = {  # B, Tq, Tk, H, Hkv: block edges of 64 and 128 crossed, Tq != Tk (bottom-right), GQA, MQA
    "square": (1, 130, 130, 2, 2), "gqa": (2, 70, 70, 4, 2), "mqa-short-q": (1, 33, 150, 4, 1), "tiny": (1, 1, 5, 2, 2)}


# The attention kernels' option matrices (dtype x head dim x shape x mask, ...) run as a covering subset
# (helpers.all_pairs: each two options' values together at least once; 48 -> 12 cases; this file 460 ->
# 191 s on the 2-core VM, 2026-12-05), or every case with PYLLM_EMU_ALL=1, as after a change to a
# kernel. The race build's run (PYLLM_EMU_RACE=1) picks its subset by name from all of them.
EVERY_CASE = os.environ.get("PYLLM_EMU_ALL") == "1" or os.environ.get("PYLLM_EMU_RACE") == "1"
HALF_DTYPES = ("dtype", [torch.bfloat16, torch.float16], None)
HEAD_DIMS = ("D", [64, 128], None)
MASKS = ("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 7))], ["full", "causal", "window"])


@all_pairs([HALF_DTYPES, HEAD_DIMS, ("case", list(ATTN_CASES), None), MASKS], EVERY_CASE)
def test_flash_attn_forward_and_backward(emu, dtype, D, case, causal, window):
    B, Tq, Tk, H, Hkv = ATTN_CASES[case]
    q, k, v, dout = randn((B, Tq, H, D), dtype), randn((B, Tk, Hkv, D), dtype), randn((B, Tk, Hkv, D), dtype), \
        randn((B, Tq, H, D), dtype)
    got = emulated_attention(emu, q, k, v, dout, causal, window)
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, causal, window))


@pytest.mark.parametrize("scores", ["negative scale", "kept maximum"])
@pytest.mark.parametrize("D", [64, 128])
def test_flash_attn_softmax_paths(emu, scores, D):
    # The forward's softmax folds a positive scale into its exponent (a scale <= 0 runs the
    # score-mod instance) and rescales O only for a warp where some row has a new maximum: with
    # key 0 every row's largest score (an attention sink, as LLMs' first token), the later key
    # blocks skip it (random scores seldom do: each row's maximum moves now and then).
    B, Tq, Tk, H = 1, 70, 200, 2
    q, k, v, dout = (randn(shape, torch.bfloat16) for shape in ((B, Tq, H, D), (B, Tk, H, D), (B, Tk, H, D),
                                                                  (B, Tq, H, D)))
    scale = None
    if scores == "negative scale":
        scale = -0.2
    else:
        u = randn((1, 1, H, D), torch.float32)
        q = (q.float() + 1.5 * u).to(torch.bfloat16)
        k[:, 0] = (1.5 * u[:, 0] + 0.1 * k[:, 0].float()).to(torch.bfloat16)
    for causal in (False, True):
        got = emulated_attention(emu, q, k, v, dout, causal, (-1, -1), scale=scale)
        check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, causal, scale=scale))


@pytest.mark.parametrize("D", [32, 96, 256])
def test_flash_attn_other_head_dims(emu, D):
    q, k, v, dout = (randn((1, 70, 2, D), torch.bfloat16) for _ in range(4))
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1))
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, True))


@pytest.mark.parametrize("tiles", ["PYLLM_ATTN_FWD_BLOCK_M", "PYLLM_ATTN_BWD_DQ_BLOCK_M", "PYLLM_ATTN_BWD_DKV_BLOCK_N"])
@pytest.mark.parametrize("D", [64, 128])
def test_flash_attn_taller_tiles(emu, monkeypatch, tiles, D):
    # the 128-row tiles (sm_90 only, off by default): unverified on a GPU, their index logic here
    monkeypatch.setenv(tiles, "128")
    q, k, v, dout = randn((1, 200, 2, D), torch.bfloat16), randn((1, 260, 1, D), torch.bfloat16), \
        randn((1, 260, 1, D), torch.bfloat16), randn((1, 200, 2, D), torch.bfloat16)
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1))
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, True))


@all_pairs([HEAD_DIMS, ("case", ["square", "gqa", "mqa-short-q", "tiny", "no-key-rows"], None), MASKS], EVERY_CASE)
def test_flash_attn_atomic_dq_backward(emu, D, case, causal, window):
    # PYLLM_ATTN_BWD=atomic (deterministic=False; sm_90, D = 64 / 128; unverified on a GPU): dQ
    # added into an fp32 buffer by the dk_dv kernel, no dq kernel. dk and dv are the same sums as
    # the deterministic kernels', so the same bits; dq within torch's error. "no-key-rows": causal
    # with Tq > Tk leaves the first queries with no key (dq 0).
    B, Tq, Tk, H, Hkv = ATTN_CASES[case] if case in ATTN_CASES else (2, 150, 70, 4, 1)
    q, k, v, dout = randn((B, Tq, H, D), torch.bfloat16), randn((B, Tk, Hkv, D), torch.bfloat16), \
        randn((B, Tk, Hkv, D), torch.bfloat16), randn((B, Tq, H, D), torch.bfloat16)
    got = emulated_attention(emu, q, k, v, dout, causal, window, algo=2)
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, causal, window))
    deterministic = emulated_attention(emu, q, k, v, dout, causal, window, algo=0)
    for name, mine, theirs in zip(("out", "lse", "dk", "dv"), got[:2] + got[3:], deterministic[:2] + deterministic[3:]):
        assert torch.equal(mine, theirs), name


def test_flash_attn_atomic_dq_varlen(emu):
    # packed sequences of 0, 1, 70 and 130 tokens (keys 5, 0, 90, 130), GQA: rows of the packed
    # accumulator per sequence, a sequence with no keys (dq 0)
    cu_q = torch.tensor([0, 0, 1, 71, 201], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 95, 225], dtype=torch.int32)
    q, dout = randn((201, 4, 128), torch.bfloat16), randn((201, 4, 128), torch.bfloat16)
    k, v = randn((225, 2, 128), torch.bfloat16), randn((225, 2, 128), torch.bfloat16)
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), cu_q, cu_k, algo=2)
    check_attention(got, q, k, v, dout, lambda a, b, c: attention_varlen(a, b, c, cu_q, cu_k, causal=True))
    assert torch.equal(got[2][:1], torch.zeros_like(got[2][:1]))  # the length-1 sequence sees no key


@all_pairs([("mods", ["softcap", "alibi", "alibi-batch-softcap"], None), HEAD_DIMS,
           ("case", ["square", "gqa", "mqa-short-q"], None), MASKS], EVERY_CASE)
def test_flash_attn_score_mods(emu, mods, D, case, causal, window, dtype=torch.bfloat16):
    # Gemma 2's capped scores and ALiBi (flash-attn's softcap, alibi_slopes; unverified on a GPU) in
    # the forward and the tensor-core backward, per head or per (sequence, head) slopes, the cap alone
    # and under the bias. Inputs twice unit size so that a cap of 1.5 binds.
    B, Tq, Tk, H, Hkv = ATTN_CASES[case]
    q, k, v = (randn(shape, dtype, 2.0) for shape in ((B, Tq, H, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D)))
    dout = randn((B, Tq, H, D), dtype)
    softcap = 1.5 if "softcap" in mods else 0.0
    slopes = alibi_slopes((B, H) if "batch" in mods else (H,)) if "alibi" in mods else None
    got = emulated_attention(emu, q, k, v, dout, causal, window, softcap=softcap, slopes=slopes)
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, causal, window, softcap=softcap, alibi=slopes))


@pytest.mark.parametrize("mods", ["softcap", "alibi-batch-softcap"])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (40, 7))], ids=["causal", "window"])
def test_flash_attn_score_mods_fp16(emu, mods, causal, window):
    # fp16's instances of the same kernels (its narrower range: the capped scores and dS in fp16 A fragments)
    test_flash_attn_score_mods(emu, mods, 64, "gqa", causal, window, torch.float16)


@pytest.mark.parametrize("algo", [1, 2], ids=["simt", "atomic-falls-back"])
def test_flash_attn_score_mods_other_backwards(emu, algo):
    # The SIMT reference backward takes them too; the atomic-dQ experiment does not (its registers),
    # so algo 2 with them runs the deterministic kernels
    q, k, v, dout = (randn((1, 70, 2, 64), torch.bfloat16, 2.0) for _ in range(4))
    slopes = alibi_slopes((2,))
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), algo=algo, softcap=1.5, slopes=slopes)
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, True, softcap=1.5, alibi=slopes))
    if algo == 2:
        mma = emulated_attention(emu, q, k, v, dout, True, (-1, -1), algo=0, softcap=1.5, slopes=slopes)
        assert all(torch.equal(a, b) for a, b in zip(got, mma))


def test_flash_attn_score_mods_varlen(emu):
    # packed sequences of 0, 1, 70 and 130 tokens (keys 5, 0, 90, 130), GQA, slopes per sequence:
    # bottom-right ALiBi distances per sequence
    cu_q = torch.tensor([0, 0, 1, 71, 201], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 95, 225], dtype=torch.int32)
    q, dout = randn((201, 4, 64), torch.bfloat16, 2.0), randn((201, 4, 64), torch.bfloat16)
    k, v = randn((225, 2, 64), torch.bfloat16, 2.0), randn((225, 2, 64), torch.bfloat16, 2.0)
    slopes = alibi_slopes((4, 4))
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), cu_q, cu_k, softcap=1.5, slopes=slopes)
    ref = lambda a, b, c: attention_varlen(a, b, c, cu_q, cu_k, causal=True, softcap=1.5, alibi=slopes)
    check_attention(got, q, k, v, dout, ref)


def dropout_reference(seed: int, p: float, b: int, h: int, tq: int, tk: int, first: int = 0, **kw):
    """(out, lse) of attention with the elements seed keeps (pyllm.ops.flash_attn.dropout_mask) in
    sequences first .. first + b - 1, the LSE of the whole softmax; kw: causal, window, softcap."""
    keep = torch.stack([torch.stack([attn_ops.dropout_mask(seed, i, j, tq, tk, p) for j in range(h)])
                        for i in range(first, first + b)])
    return lambda q, k, v: (dropped_attention(q, k, v, keep, p, **kw), attention(q, k, v, **kw)[1])


@all_pairs([HALF_DTYPES, HEAD_DIMS, ("case", list(ATTN_CASES), None), MASKS], EVERY_CASE)
def test_flash_attn_dropout(emu, dtype, D, case, causal, window):
    # Dropout on the probabilities (flash-attn's dropout_p; unverified on a GPU) in the forward and
    # the tensor-core backward: the elements pyllm.ops.flash_attn.dropout_mask gives for the seed,
    # the same as the CPU twin's; the LSE of the whole softmax.
    B, Tq, Tk, H, Hkv = ATTN_CASES[case]
    q, k, v = (randn(shape, dtype) for shape in ((B, Tq, H, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D)))
    dout = randn((B, Tq, H, D), dtype)
    seed = 0x9E3779B97F4A7C15
    got = emulated_attention(emu, q, k, v, dout, causal, window, dropout=(0.3, seed))
    check_attention(got, q, k, v, dout, dropout_reference(seed, 0.3, B, H, Tq, Tk, causal=causal, window=window))


@pytest.mark.parametrize("algo", [1, 2], ids=["simt", "atomic-falls-back"])
def test_flash_attn_dropout_other_backwards_and_mods(emu, algo):
    # The SIMT reference backward takes it too, under a cap; the atomic-dQ experiment does not, so
    # algo 2 with it runs the deterministic kernels (the same bits)
    q, k, v, dout = (randn((1, 70, 2, 64), torch.bfloat16, 2.0) for _ in range(4))
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), algo=algo, softcap=1.5, dropout=(0.5, 7))
    check_attention(got, q, k, v, dout, dropout_reference(7, 0.5, 1, 2, 70, 70, causal=True, softcap=1.5))
    if algo == 2:
        mma = emulated_attention(emu, q, k, v, dout, True, (-1, -1), algo=0, softcap=1.5, dropout=(0.5, 7))
        assert all(torch.equal(a, b) for a, b in zip(got, mma))


@pytest.mark.parametrize("D", [32, 96, 256])
def test_flash_attn_dropout_other_head_dims(emu, D):
    # D = 256: two warps share each 16 keys of the dk_dv kernel and split dK / dV, each drawing the
    # same mask; D = 32 / 96: the other tile shapes
    q, k, v, dout = (randn((1, 70, 2, D), torch.bfloat16) for _ in range(4))
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), dropout=(0.4, 11))
    check_attention(got, q, k, v, dout, dropout_reference(11, 0.4, 1, 2, 70, 70, causal=True))


def test_flash_attn_dropout_varlen(emu):
    # packed sequences of 0, 1, 70 and 130 tokens (keys 5, 0, 90, 130), GQA: sequence i's elements
    # are dropout_mask(seed, i, head, ...) over its own positions
    cu_q = torch.tensor([0, 0, 1, 71, 201], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 95, 225], dtype=torch.int32)
    q, dout = randn((201, 4, 64), torch.bfloat16), randn((201, 4, 64), torch.bfloat16)
    k, v = randn((225, 2, 64), torch.bfloat16), randn((225, 2, 64), torch.bfloat16)
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), cu_q, cu_k, dropout=(0.25, 3))

    def reference(a, b, c):
        outs, lses = [], []
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for i in range(4):
            qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            out, lse = dropout_reference(3, 0.25, 1, 4, qs.stop - qs.start, ks.stop - ks.start, i, causal=True)(
                a[None, qs], b[None, ks], c[None, ks])
            outs.append(out[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    check_attention(got, q, k, v, dout, reference)


def test_flash_attn_simt_backward(emu):
    q, k, v, dout = (randn((1, 70, 2, 64), torch.bfloat16) for _ in range(4))
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), algo=1)
    check_attention(got, q, k, v, dout, lambda a, b, c: attention(a, b, c, True))


def test_flash_attn_varlen(emu):
    # packed sequences of 0, 1, 70 and 130 tokens (keys 5, 0, 90, 130), GQA
    cu_q = torch.tensor([0, 0, 1, 71, 201], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5, 95, 225], dtype=torch.int32)
    q, dout = randn((201, 4, 64), torch.bfloat16), randn((201, 4, 64), torch.bfloat16)
    k, v = randn((225, 2, 64), torch.bfloat16), randn((225, 2, 64), torch.bfloat16)
    got = emulated_attention(emu, q, k, v, dout, True, (-1, -1), cu_q, cu_k)
    ref = lambda a, b, c: attention_varlen(a, b, c, cu_q, cu_k, causal=True)
    check_attention(got, q, k, v, dout, ref)


# --- the order of a launch's blocks -----------------------------------------------------------------

# One case per kernel and launch shape: (test, its arguments after emu, whether its outputs must keep
# their bits). The atomic-dQ backward's dq sums in the order blocks run (here 3 key blocks: its bits
# do change), so it is only rechecked.
BLOCK_ORDER_CASES = {
    "glu": (test_glu_forward_and_backward, (torch.bfloat16, 130, 64, 0, "split"), True),
    "rms_norm-block-rows": (test_rms_norm_forward_and_backward, (torch.float32, 100, 2048, True, 0.0, False), True),
    "rms_norm-warp-rows": (test_rms_norm_forward_and_backward, (torch.bfloat16, 9, 256, True, 1.0, True), True),
    "rope": (test_rope, (torch.bfloat16, 2, 7, 3, 64, 64, True, False, False), True),
    "cross_entropy": (test_cross_entropy, (torch.bfloat16, 6, 100, "smoothing", False), True),
    "generalized_jsd": (test_generalized_jsd, (torch.bfloat16, 4, 1001, 0.5, 2.0, "plain"), True),
    "adamw": (test_adamw, (torch.bfloat16, True, True, True), True),
    "kv_cache_decode": (test_kv_cache_decode, (torch.bfloat16, 64, 3, 2, 4, 2, 700, [5, 700, 333], (-1, 0)), True),
    "kv_cache_paged": (test_kv_cache_decode_layouts, (torch.bfloat16, 3, "paged-leftpad"), True),
    "flash_attn": (test_flash_attn_forward_and_backward, (torch.bfloat16, 64, "gqa", True, (-1, -1)), True),
    "flash_attn-d256": (test_flash_attn_other_head_dims, (256,), True),
    "flash_attn-simt": (test_flash_attn_simt_backward, (), True),
    "flash_attn-varlen": (test_flash_attn_varlen, (), True),
    "flash_attn-atomic-dq": (test_flash_attn_atomic_dq_backward, (128, "square", False, (-1, -1)), False),
}


@pytest.mark.parametrize("case", list(BLOCK_ORDER_CASES))
def test_block_order(emu, monkeypatch, case):
    # A GPU runs a launch's blocks in any order (and at once). Each case again with its blocks reversed
    # and shuffled: its checks still pass, and every buffer it framed (inputs, outputs, workspaces) has
    # the same bits as in the grid's order: no block reads what another block of its launch writes
    # (pyllm's kernels give each output one owner), and the deterministic kernels stay so.
    test, args, same_bits = BLOCK_ORDER_CASES[case]
    frames: list[Framed] = []
    init = Framed.__init__

    def recording_init(self):
        init(self)
        frames.append(self)

    monkeypatch.setattr(Framed, "__init__", recording_init)
    runs = []
    try:
        for order, seed in ((0, 0), (1, 0), (2, 12345)):
            emu.lib.emu_set_block_order(order, seed)
            frames.clear()
            torch.manual_seed(0)
            test(emu, *args)
            runs.append([whole.view(torch.uint8).clone() for f in frames for whole, *_ in f.frames])
    finally:
        emu.lib.emu_set_block_order(emu.block_order, 1)
    assert runs[0], "the case framed no buffers"
    if same_bits:
        for other in runs[1:]:
            assert len(other) == len(runs[0]) and all(torch.equal(a, b) for a, b in zip(runs[0], other))


# --- BPE batch encoder -----------------------------------------------------------------------------

def cuda_encode(emu, tok, texts, threads=2):
    """tok's ids for texts from bpe.cu's encoder (its host side and kernels, through CudaEncoder)."""
    ranks = tok.mergeable_ranks
    tokens = list(ranks)
    token_offsets = [0]
    for t in tokens:
        token_offsets.append(token_offsets[-1] + len(t))
    token_blob = ctypes.create_string_buffer(b"".join(tokens) or b"\0")
    rank_array = (ctypes.c_uint32 * len(tokens))(*ranks.values())
    encoded = [t.encode() for t in texts]
    text_offsets = [0]
    for t in encoded:
        text_offsets.append(text_offsets[-1] + len(t))
    text_blob = ctypes.create_string_buffer(b"".join(encoded) or b"\0")
    ids = (ctypes.c_uint32 * max(1, text_offsets[-1]))()
    counts = (ctypes.c_int64 * max(1, len(texts)))()
    emu.bpe_encode(ctypes.addressof(token_blob), token_offsets, ctypes.addressof(rank_array), len(tokens),
                   tok._pattern_code, ctypes.addressof(text_blob), text_offsets, len(texts), threads,
                   ctypes.addressof(ids), ctypes.addressof(counts))
    return [list(ids[text_offsets[i]:text_offsets[i] + counts[i]]) for i in range(len(texts))]


@pytest.fixture(scope="module")
def bpe_corpus():
    return corpus_texts()


@pytest.fixture(scope="module", params=list(PATTERNS))
def bpe_tokenizer(request, bpe_corpus):
    return Tokenizer.train(bpe_corpus, 1200, pattern=request.param, show_progress=False)


def test_bpe_encoder(emu, bpe_tokenizer, bpe_corpus):
    """Pieces of every path: one byte, whole tokens, the thread path (<= 48 bytes), the block path
    (49..2048: argmin over a linked list in shared memory) and the host's (> 2048), long repeats."""
    texts = _cuda_texts(bpe_corpus)
    assert cuda_encode(emu, bpe_tokenizer, texts) == [bpe_tokenizer.encode_ordinary(t) for t in texts]
    assert cuda_encode(emu, bpe_tokenizer, []) == []


def test_bpe_encoder_shuffled_ranks(emu, bpe_corpus):
    """Merge ranks that are not in the order the trainer found them: the kernels' argmin is by rank."""
    tok = _shuffled_ranks_tokenizer(bpe_corpus)
    texts = _cuda_texts(bpe_corpus)
    assert cuda_encode(emu, tok, texts, threads=1) == [tok.encode_ordinary(t) for t in texts]


_LONG_RUNS = st.sampled_from(["x" * 49, "ab" * 40, " " * 60, "\n" * 70, "1" * 100, "\u00e9" * 30, "q" * 2100])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.lists(st.one_of(st.text(max_size=30), st.text(alphabet="abcdefgh ", min_size=30, max_size=120),
                                         _LONG_RUNS), max_size=6).map("".join), max_size=4))
def test_bpe_encoder_hypothesis(emu, texts):
    tok = _small_tokenizer()
    assert cuda_encode(emu, tok, texts) == [tok.encode_ordinary(t) for t in texts]


@functools.cache
def _small_tokenizer():
    return Tokenizer.train(corpus_texts()[:20], 600, pattern="gpt4", show_progress=False)
