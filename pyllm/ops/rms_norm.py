"""Fused RMSNorm: x * rstd * (offset + weight), rstd = 1 / sqrt(mean(x^2) + eps), forward and backward
in one kernel each.

Kernels: csrc/cpu/rms_norm.cpp, csrc/cuda/rms_norm.cu. The forward also returns rstd (fp32, one per
row), which autograd saves with x and weight: the backward reads dy, x and rstd and recomputes the
normalised row from them.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util

OP = "rms_norm"
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
# The CUDA backward keeps a row of dw per row group in shared memory (csrc/cuda/rms_norm.cu).
MAX_COLS_CUDA = 32768
_max_cols_with_dw: dict[int, int] = {}


def max_cols_cuda_with_dw(x: Tensor) -> int:
    """The widest row whose weight gradient the CUDA backward can keep in x's GPU's shared memory: a
    fp32 row of dw (4 bytes a column) within the opt-in limit, less 1 KB for the kernel's static
    reduction buffer: 32768 on sm_80 (163 KB) and sm_90 (227 KB), 25088 on sm_86 / sm_89 (99 KB:
    A10, L4, L40, RTX 30xx / 40xx). MAX_COLS_CUDA while tracing (no host query)."""
    index = x.get_device()
    cols = _max_cols_with_dw.get(index)  # (known while compiling once LLM.to or an eager call asked)
    if cols is None and (torch.compiler.is_compiling() or _util.is_fake(x)):
        return MAX_COLS_CUDA
    if cols is None:
        props = torch.cuda.get_device_properties(index)
        optin = getattr(props, "shared_memory_per_block_optin", None)
        if not optin:  # (an older torch): the opt-in limits of NVIDIA's tuning guides
            optin = {(8, 0): 163 * 1024, (9, 0): 227 * 1024}.get((props.major, props.minor), 99 * 1024)
        cols = _max_cols_with_dw[index] = min(MAX_COLS_CUDA, (int(optin) - 1024) // 4)
    return cols


# --- validation ---------------------------------------------------------------------------------

def _check(x, weight, eps, offset) -> None:
    _util.check_tensor(OP, "x", x, DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{OP}: x must have a last dim of at least 1 element (the normalised one), got shape "
                         f"{tuple(x.shape)}")
    if weight is not None:
        _util.check_tensor(OP, "weight", weight, DTYPES)
        if not _master_weight(x, weight):  # (an fp32 weight on 16-bit x: its gradient in fp32)
            _util.check_same(OP, x=x, weight=weight)
        elif weight.device != x.device:
            raise ValueError(f"{OP}: weight is on {weight.device} but x is on {x.device}; they must match")
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"{OP}: weight must have shape ({x.shape[-1]},) (x's last dim), got {tuple(weight.shape)}")
    if not _util.finite_number(eps) or (not _util.symbolic(eps) and eps < 0):
        raise ValueError(f"{OP}: eps must be a finite number >= 0, got {eps!r}")
    if not _util.finite_number(offset):
        raise ValueError(f"{OP}: offset must be a finite number, got {offset!r}")
    if (x.is_cuda and weight is not None and weight.requires_grad and torch.is_grad_enabled()
            and x.shape[-1] > (limit := max_cols_cuda_with_dw(x))):
        # said at the forward, not half way through the step's backward
        raise ValueError(f"{OP}: the CUDA backward takes the weight's gradient for rows of at most {limit} elements "
                         f"on {x.device} (its shared memory), got x's last dim {x.shape[-1]}: use torch's ops "
                         "for this layer (pyllm.nn.RMSNorm does so itself)")
    if x.is_cuda and x.shape[-1] > MAX_COLS_CUDA:
        raise ValueError(f"{OP}: the CUDA kernel takes rows of at most {MAX_COLS_CUDA} elements, got x's last dim "
                         f"{x.shape[-1]}")


def _master_weight(x: Tensor, weight: Optional[Tensor]) -> bool:
    """An fp32 weight on bf16 / fp16 activations (mixed precision's master): rounded to x's dtype
    for the product, as a cast before the call would, but its gradient written in fp32 (the cast's
    backward had rounded it to x's dtype: 2.3e-3 relative error at 512 x 256 bf16, torch's 1.2e-7)."""
    return weight is not None and weight.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)


def _rstd_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- launchers: write into given outputs (tests poison these first) ---------------------------

def _check_lengths(rows: int, cols: int, weight: Optional[Tensor], rstd: Tensor, x: Tensor, **like_x) -> None:
    """What the kernels read or write by the row and column, wherever it points: the weight one
    per column (a DTensor's whole weight beside x sharded on its columns would be read from its
    start), rstd one per row, the x-shaped tensors x's size."""
    _util.check_row_lengths(OP, cols, per="column", weight=weight)
    _util.check_row_lengths(OP, rows, rstd=rstd)
    _util.check_sizes(OP, x.numel(), f"x's {x.numel()} elements", **like_x)


def rms_norm_forward_into(x: Tensor, weight: Optional[Tensor], out: Tensor, rstd: Tensor, eps: float, offset: float,
                          cast_first: bool) -> None:
    """out = rms_norm(x), rstd = 1 / rms per row, for contiguous x and out (rows = x.numel() / cols)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    _check_lengths(rows, cols, weight, rstd, out=out, x=x)
    if _master_weight(x, weight):
        weight = weight.to(x.dtype)
    args = (_util.ptr(x), 0 if weight is None else _util.ptr(weight), _util.ptr(out), _util.ptr(rstd), rows, cols,
            float(eps), float(offset), bool(cast_first), _util.dtype_code(x))
    if x.is_cuda:
        _util.check_backend(OP, x)  # torch.ops.pyllm.* arrive here without rms_norm()'s checks
        _C.rms_norm_fwd_cuda(*args, x.device.index, _util.stream_of(x))
    else:
        _util.init_cpu_threads()
        _C.rms_norm_fwd_cpu(*args)


def rms_norm_backward_into(dout: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dx: Tensor,
                           dweight: Optional[Tensor], offset: float, cast_first: bool) -> None:
    """dx (and dweight, if given) for contiguous dout, x, dx."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    _check_lengths(rows, cols, weight, rstd, dout=dout, dx=dx, x=x)
    _util.check_row_lengths(OP, cols, per="column", dweight=dweight)
    if _master_weight(x, weight):  # read in x's dtype; dweight (fp32 then) written unrounded
        weight = weight.to(x.dtype)
    w_ptr = 0 if weight is None else _util.ptr(weight)
    if not x.is_cuda:
        _util.init_cpu_threads()
        _C.rms_norm_bwd_cpu(_util.ptr(dout), _util.ptr(x), w_ptr, _util.ptr(rstd), _util.ptr(dx),
                            0 if dweight is None else _util.ptr(dweight), rows, cols, float(offset), bool(cast_first),
                            _util.dtype_code(x), dweight is not None and dweight.dtype != x.dtype)
        return
    _util.check_backend(OP, x)
    device = x.device.index
    partials = None
    if dweight is not None:  # one fp32 row per block, summed here (deterministic: a fixed grid)
        n = _C.rms_norm_partials_cuda(rows, cols, _util.dtype_code(x), device) if rows else 0
        partials = torch.empty((n, cols), dtype=torch.float32, device=x.device)
    if rows:
        _C.rms_norm_bwd_cuda(_util.ptr(dout), _util.ptr(x), w_ptr, _util.ptr(rstd), _util.ptr(dx),
                             0 if partials is None else _util.ptr(partials), 0 if partials is None else partials.shape[0],
                             rows, cols, float(offset), bool(cast_first), _util.dtype_code(x), device,
                             _util.stream_of(x))
    if dweight is not None:
        dweight.copy_(partials.sum(0))


# --- torch.library custom ops ---------------------------------------------------------------

def _rms_norm_body(x: Tensor, weight: Optional[Tensor], eps: float, offset: float,
                   cast_first: bool) -> tuple[Tensor, Tensor]:
    x = x.contiguous()
    weight = None if weight is None else weight.contiguous()
    out = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=_rstd_dtype(x), device=x.device)
    rms_norm_forward_into(x, weight, out, rstd, eps, offset, cast_first)
    return out, rstd


# As in swiglu.py: the op wraps its plain function, which eager calls run directly (_util.call).
_rms_norm = torch.library.custom_op("pyllm::rms_norm", mutates_args=())(_rms_norm_body)


@_rms_norm.register_fake
def _(x, weight, eps, offset, cast_first):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x))


def _rms_norm_backward_body(dout: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, offset: float,
                            cast_first: bool, weight_grad: bool) -> tuple[Tensor, Tensor]:
    """(dx, dweight); dweight is an empty tensor when weight_grad is False."""
    dout, x, rstd = dout.contiguous(), x.contiguous(), rstd.contiguous()
    weight = None if weight is None else weight.contiguous()
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight) if weight_grad else x.new_empty(0)
    rms_norm_backward_into(dout, x, weight, rstd, dx, dweight if weight_grad else None, offset, cast_first)
    return dx, dweight


_rms_norm_backward = torch.library.custom_op("pyllm::rms_norm_backward", mutates_args=())(_rms_norm_backward_body)


@_rms_norm_backward.register_fake
def _(dout, x, weight, rstd, offset, cast_first, weight_grad):
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dweight


# DTensor: rows sharded on any dim but the normalised one, the weight whole on every rank; its
# gradient is each rank's rows' share (Partial: DTensor sums it over the ranks when read).
@_util.sharding_rule(_rms_norm)
def _(x, weight, eps, offset, cast_first):
    Shard, Replicate, _ = _util.shard_placements()
    w = None if weight is None else Replicate()
    return [(out, [x_place, w, None, None, None]) for out, (x_place,) in _row_placements(x.ndim)]


@_util.sharding_rule(_rms_norm_backward)
def _(dout, x, weight, rstd, offset, cast_first, weight_grad):
    Shard, Replicate, Partial = _util.shard_placements()
    w = None if weight is None else Replicate()
    rules = []
    for out, (x_place,) in _row_placements(x.ndim):
        dweight = (Partial() if isinstance(x_place, Shard) else Replicate()) if weight_grad else Replicate()
        rules.append(([x_place, dweight], [x_place, x_place, w, x_place, None, None, None]))
    return rules


def _row_placements(ndim: int) -> list:
    """(the outputs' placements (x's, rstd's), (x's,)) for x whole or sharded on one of its row dims."""
    Shard, Replicate, _ = _util.shard_placements()
    return [([p, p], (p,)) for p in [Replicate()] + [Shard(d) for d in range(ndim - 1)]]


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, offset, cast_first = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.args = (offset, cast_first)


def _rms_norm_grad(ctx, dout, drstd):
    x, weight, rstd = ctx.saved_tensors
    weight_grad = weight is not None and ctx.needs_input_grad[1]
    dx, dweight = _util.call(_rms_norm_backward_body, torch.ops.pyllm.rms_norm_backward, None, dout, x, weight, rstd,
                             *ctx.args, weight_grad)
    return dx, (dweight if weight_grad else None), None, None, None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# vmap: rows are independent, so a vmapped x (its batch dim moved first) is more rows under one
# weight; a per-example weight, or a weight gradient per example, runs per example.
@_util.batching_rule(_rms_norm)
def _(op, info, in_dims, x, weight, eps, offset, cast_first):
    if in_dims[1] is not None:
        return _util.vmap_loop(op, info, in_dims, x, weight, eps, offset, cast_first)
    return op(_util.batch_first(info, x, in_dims[0]), weight, eps, offset, cast_first), (0, 0)


@_util.batching_rule(_rms_norm_backward)
def _(op, info, in_dims, dout, x, weight, rstd, offset, cast_first, weight_grad):
    if weight_grad or in_dims[2] is not None:
        return _util.vmap_loop(op, info, in_dims, dout, x, weight, rstd, offset, cast_first, weight_grad)
    dout, x, _, rstd = _util.batched_first(info, in_dims[:4], (dout, x, weight, rstd), expand=True)
    dx, dweight = op(dout, x, weight, rstd, offset, cast_first, weight_grad)
    return (dx, dweight), (0, None)


class _RmsNormFunction(torch.autograd.Function):
    """The op's autograd for eager calls, without its dispatch (see _util.call)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_first):
        out, rstd = _rms_norm_body(x, weight, eps, offset, cast_first)
        _rms_norm_setup(ctx, (x, weight, eps, offset, cast_first), (out, rstd))
        ctx.mark_non_differentiable(rstd)
        return out, rstd

    backward = staticmethod(_rms_norm_grad)
    setup = staticmethod(_rms_norm_setup)


# --- public API -------------------------------------------------------------------------------

def _dtypes(t: Tensor) -> tuple:
    """The dtypes rms_norm takes on t's device (meta: any kernel's, as _util.check_tensor)."""
    if t.device.type == "meta":
        return tuple({d for dtypes in DTYPES.values() for d in dtypes})
    return DTYPES.get(t.device.type, ())


def _pyllm_form(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = 1e-6, *, offset: float = 0.0,
                cast_first: bool = True) -> Tensor:
    if eps is None:
        eps = _torch_eps(x)
    if (isinstance(weight, Tensor) and isinstance(x, Tensor) and weight.dtype != x.dtype
            and weight.dtype in _dtypes(weight) and x.dtype in _dtypes(x)
            and not _master_weight(x, weight)):
        weight = weight.to(x.dtype)
    _check(x, weight, eps, offset)
    return _util.call(_rms_norm_body, _rms_norm, _RmsNormFunction, x, weight, float(eps), float(offset),
                      bool(cast_first))[0]


def _torch_form(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
                offset: float = 0.0, cast_first: bool = True) -> Tensor:
    """F.rms_norm's arguments: the mean over the trailing dims normalized_shape names."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not (isinstance(input, Tensor) and 1 <= len(shape) <= input.dim() and tuple(input.shape[-len(shape):]) == shape):
        got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"{OP}: normalized_shape must be input's trailing dims, got {shape} for input {got}")
    if isinstance(weight, Tensor) and tuple(weight.shape) != shape:
        raise ValueError(f"{OP}: weight must have shape normalized_shape {shape}, got {tuple(weight.shape)}")
    if len(shape) == 1:
        return _pyllm_form(input, weight, eps, offset=offset, cast_first=cast_first)
    flat = _pyllm_form(input.flatten(-len(shape)), None if weight is None else weight.reshape(-1), eps, offset=offset,
                       cast_first=cast_first)  # several dims normalised together: one row of their product
    return flat.view(input.shape)


def _torch_eps(x) -> float:
    """torch.nn.RMSNorm's eps=None: the epsilon of the dtype it computes in (fp32, fp64 for fp64)."""
    return torch.finfo(torch.float64 if isinstance(x, Tensor) and x.dtype == torch.float64 else torch.float32).eps


def _is_shape(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, (tuple, list, torch.Size))


def rms_norm(*args, **kwargs) -> Tensor:
    """RMSNorm over the last dim (Zhang & Sennrich 2019) in one fused kernel, differentiable:
    x * rstd * (offset + weight), rstd = 1 / sqrt(mean(x^2, -1) + eps).

    Args:
        x: (..., D), any number of leading dims (empty too). CPU: float32, bfloat16, float16,
            float64. CUDA: float32, float16, bfloat16, D <= 32768.
        weight: (D,), x's device; None for no scale (then offset is unused). A weight of another
            floating dtype is cast to x's first; an fp32 weight on bf16 / fp16 x (a master under
            autocast) is rounded to x's dtype for the product too, but its gradient is written
            in fp32, not rounded through x's dtype.
        eps: added to the mean square; None: torch's default, the machine epsilon of fp32 (fp64 for
            fp64 x), torch.nn.RMSNorm's and F.rms_norm's.
        offset: added to weight (Gemma stores weight - 1 and uses offset=1.0).
        cast_first: True rounds x * rstd to x's dtype before the scale, as LLaMA, Qwen, Mistral and
            pyllm.nn.RMSNorm write it (``(x32 * rstd).to(dtype) * weight``); False scales in fp32
            and rounds once, as Gemma does. The same in float32 and float64.
    torch's form is taken too: ``rms_norm(input, normalized_shape, weight=None, eps=None)``
    (F.rms_norm's arguments, positional or by name, its eps default included): normalized_shape
    x's trailing dims (an int or a sequence), the weight of that shape, the mean over all of them.
    Rounding: F.rms_norm and torch.nn.RMSNorm round once (cast_first=False gives their bits);
    cast_first=True (the default) is LLaMA's order, in torch's form too.

    Returns:
        A new contiguous tensor of x's shape and dtype. The mean square and every product run in
        fp32 (fp64 for fp64 inputs). Backward gives the gradients of x and weight (dw summed over
        rows in fp32, in a fixed order: bitwise repeatable).
    Raises:
        TypeError for a non-tensor, an unsupported or mismatched dtype; ValueError for a weight not
        of shape (D,), mismatched devices, D = 0, a negative or non-finite eps, a non-finite offset,
        an unsupported device, D > 32768 on CUDA; RuntimeError for a CUDA tensor when pyllm was built
        without CUDA kernels.
    """
    if (len(args) > 1 and _is_shape(args[1])) or "normalized_shape" in kwargs or "input" in kwargs:
        return _torch_form(*args, **kwargs)
    return _pyllm_form(*args, **kwargs)


rms_norm.__signature__ = inspect.signature(_pyllm_form)
