"""Rotary position embedding (RoPE), "rotate half" layout, in one kernel forward and one backward.

Kernels: csrc/cpu/rope.cpp, csrc/cuda/rope.cu. The backward is the same kernel rotating by minus the
angle, so autograd keeps only cos and sin (no activation).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util

OP = "rope"
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _table_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- validation ---------------------------------------------------------------------------------

def _check(x, cos, sin) -> None:
    _util.check_tensor(OP, "x", x, DTYPES)
    if x.dim() != 4:
        raise ValueError(f"{OP}: x must be (batch, seqlen, n_heads, head_dim), got shape {tuple(x.shape)}")
    B, T, _, D = x.shape
    want = _table_dtype(x)
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != want:
            raise TypeError(f"{OP}: {name} has dtype {t.dtype}, expected {want} for x of dtype {x.dtype} (angles up "
                            "to 1e4 rad need it)")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}; they must match")
        if t.requires_grad:
            raise ValueError(f"{OP}: no gradient flows to {name}; pass it detached")
    if cos.shape != sin.shape:
        raise ValueError(f"{OP}: cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    half = cos.shape[-1] if cos.dim() else 0
    ok = (cos.dim() == 2 and cos.shape[0] == T) or (cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1] == T)
    if not ok or half < 1 or 2 * half > D:
        raise ValueError(f"{OP}: cos and sin must be (seqlen, R/2) or (batch or 1, seqlen, R/2) with 2 <= R <= head_dim;"
                         f" got {tuple(cos.shape)} for x of shape {tuple(x.shape)}")


# --- launcher: writes into a given output (tests poison it first) ---------------------------------

def _row_strides(t: Tensor) -> list[int]:
    return list(t.stride()[:3])


def rope_into(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, inverse: bool = False,
              interleaved: bool = False) -> None:
    """out = x rotated by the angles of cos / sin (x, out: (B, T, H, D), last dim contiguous; cos, sin
    contiguous (T, R/2) or (B or 1, T, R/2)); interleaved: the pairs (2i, 2i + 1)."""
    B, T, H, D = x.shape
    half = cos.shape[-1]
    # (the kernel reads T rows of angles wherever cos points: a longer table, a DTensor's whole one
    # beside a shard of x, would rotate by the wrong positions without a word)
    if cos.dim() not in (2, 3) or cos.shape[-2] != T or (cos.dim() == 3 and cos.shape[0] not in (1, B)) \
            or sin.shape != cos.shape:
        raise ValueError(f"{OP}: cos and sin must be (T, R/2) or (B or 1, T, R/2) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    # (and the registered op called directly, torch.ops.pyllm.rope: float64 angles had been read as fp32)
    if cos.dtype != _table_dtype(x) or sin.dtype != cos.dtype or out.dtype != x.dtype or out.shape != x.shape \
            or cos.device != x.device or sin.device != x.device or out.device != x.device:
        raise ValueError(f"{OP}: cos and sin must be {_table_dtype(x)} on x's device and out x's dtype and shape, got "
                         f"{cos.dtype} / {sin.dtype} on {cos.device} / {sin.device}, out {out.dtype} {tuple(out.shape)}")
    cs_batch_stride = T * half if cos.dim() == 3 and cos.shape[0] > 1 else 0
    args = (_util.ptr(x), _util.ptr(cos), _util.ptr(sin), _util.ptr(out), B, T, H, D, half, _row_strides(x),
            _row_strides(out), cs_batch_stride, bool(inverse), _util.dtype_code(x))
    if x.is_cuda:
        _util.check_backend(OP, x)
        _C.rope_cuda(*args, x.device.index, _util.stream_of(x), interleaved=bool(interleaved))
    else:
        _util.init_cpu_threads()
        _C.rope_cpu(*args, interleaved=bool(interleaved))


# --- torch.library custom op ------------------------------------------------------------------------

def _rope_body(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool, interleaved: bool = False) -> Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope_into(x, cos, sin, out, inverse, interleaved)
    return out


# As in swiglu.py: the op wraps its plain function, which eager calls run directly (_util.call).
_rope = torch.library.custom_op("pyllm::rope", mutates_args=())(_rope_body)


@_rope.register_fake
def _(x, cos, sin, inverse, interleaved=False):
    return x.new_empty(x.shape)


def _rope_setup(ctx, inputs, output):
    x, cos, sin, inverse, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse, ctx.interleaved = inverse, interleaved


def _rope_grad(ctx, dout):
    cos, sin = ctx.saved_tensors
    # A rotation's transpose is the rotation by minus the angle: the same op, inverse flipped.
    dx = _util.call(_rope_body, _rope, _RopeFunction, dout, cos, sin, not ctx.inverse, ctx.interleaved)
    return dx, None, None, None, None


_rope.register_autograd(_rope_grad, setup_context=_rope_setup)


# vmap: a vmapped x under angles shared by every row ((T, R/2) or (1, T, R/2)) folds into the
# batch; per-example or per-row angles run per example.
@_util.batching_rule(_rope)
def _(op, info, in_dims, x, cos, sin, inverse, interleaved=False):
    if in_dims[1] is not None or in_dims[2] is not None or in_dims[0] is None or (cos.dim() == 3 and cos.shape[0] > 1):
        return _util.vmap_loop(op, info, in_dims, x, cos, sin, inverse, interleaved)
    x = x.movedim(in_dims[0], 0)  # (N, B, T, H, D)
    out = op(x.reshape(-1, *x.shape[2:]), cos, sin, inverse, interleaved)
    return out.view(x.shape), 0


# DTensor: x (B, T, H, D) sharded on its batch, its positions (sequence parallelism: the angles' own
# positions sharded alike) or its heads; the angles whole where they do not follow the sharded dim.
@_util.sharding_rule(_rope)
def _(x, cos, sin, inverse, interleaved=False):
    Shard, Replicate, _ = _util.shard_placements()
    per_row = cos.ndim == 3 and cos.shape[0] > 1  # (B, T, R/2): each row its own angles
    rules = [([Replicate()], [Replicate(), Replicate(), Replicate(), None, None])]
    for dim, angles in ((0, Shard(0) if per_row else Replicate()), (1, Shard(cos.ndim - 2)), (2, Replicate())):
        rules.append(([Shard(dim)], [Shard(dim), angles, angles, None, None]))
    return rules


_RopeFunction = _util.eager_function("rope", _rope_body, _rope_setup, _rope_grad)


# --- public API -------------------------------------------------------------------------------

def rope(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """x rotated by RoPE (Su et al. 2021) in one fused kernel, differentiable in x: the pairs
    (x[..., i], x[..., i + R/2]) of each head, the "rotate half" layout of GPT-NeoX and HF LLaMA, or
    with interleaved=True the pairs (x[..., 2i], x[..., 2i + 1]) of GPT-J and Meta's LLaMA checkpoints
    (flash-attn's rotary_interleaved); dims from R on pass through (partial rotary).

    Args:
        x: (B, T, H, D), any strides with the last dim contiguous (a view of a fused qkv projection
            goes in without a copy). CPU: float32, bfloat16, float16, float64. CUDA: float32,
            float16, bfloat16.
        cos, sin: the angles' cosines and sines, (T, R/2) for every row alike or (B, T, R/2) (each row
            at its own positions; (1, T, R/2) broadcasts), 2 <= R <= D; float32 (float64 for float64
            x), x's device, not requiring grad (pyllm.nn.rope_cos_sin makes them). Not transformers'
            tables, whose R columns are cat(freqs, freqs): give their first R/2 (cos[..., :R // 2]);
            with partial rotary (R <= D / 2) a full-width table has a valid shape here and rotates
            2R dims by the wrong angles.
    Returns:
        A new contiguous (B, T, H, D) tensor of x's dtype: x1 * cos - x2 * sin, x2 * cos + x1 * sin
        in fp32 (fp64 for fp64), one rounding. Backward rotates the gradient back (the same kernel,
        minus the angle); nothing else is saved.
    Raises:
        TypeError for a non-tensor or an unsupported dtype (x's, or cos / sin not float32 / float64
        to match); ValueError for shapes that do not fit, mismatched devices, cos or sin requiring
        grad, an unsupported device; RuntimeError for a CUDA tensor when pyllm was built without
        CUDA kernels.
    """
    _check(x, cos, sin)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{OP}: interleaved must be a bool, got {type(interleaved).__name__}")
    return _util.call(_rope_body, _rope, _RopeFunction, x, cos, sin, False, interleaved)
