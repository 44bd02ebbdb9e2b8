"""Fused SwiGLU: silu(gate) * up, forward and backward in one kernel each.

Kernels: csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu. The backward recomputes silu from the saved
inputs, so autograd keeps nothing beyond gate and up (or the packed x).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util

OP = "swiglu"
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


# --- validation ---------------------------------------------------------------------------------

def _check_pair(gate, up) -> None:
    _util.check_tensor(OP, "gate", gate, DTYPES)
    _util.check_tensor(OP, "up", up, DTYPES)
    _util.check_same(OP, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{OP}: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


def _check_packed(x) -> None:
    _util.check_tensor("swiglu_packed", "x", x, DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"swiglu_packed: the last dim of x holds [gate | up] and must be even, got shape {tuple(x.shape)}"
        )


# --- launchers: write into given outputs (tests poison these first) ---------------------------

def _launch_fwd(gate: Tensor, up: Tensor, out: Tensor, rows: int, cols: int, in_stride: int, out_stride: int):
    args = (_util.ptr(gate), _util.ptr(up), _util.ptr(out), rows, cols, in_stride, out_stride, _util.dtype_code(out))
    if out.is_cuda:
        _util.check_backend(OP, out.device)  # torch.ops.pyllm.* arrive here without swiglu()'s checks
        _C.swiglu_fwd_cuda(*args, out.device.index, _util.stream_of(out))
    else:
        _C.swiglu_fwd_cpu(*args)


def _launch_bwd(dout, gate, up, dgate, dup, rows, cols, in_stride, out_stride):
    args = (_util.ptr(dout), _util.ptr(gate), _util.ptr(up), _util.ptr(dgate), _util.ptr(dup),
            rows, cols, in_stride, out_stride, _util.dtype_code(dout))
    if dout.is_cuda:
        _util.check_backend(OP, dout.device)
        _C.swiglu_bwd_cuda(*args, dout.device.index, _util.stream_of(dout))
    else:
        _C.swiglu_bwd_cpu(*args)


def swiglu_forward_into(gate: Tensor, up: Tensor, out: Tensor) -> None:
    """out = silu(gate) * up, for contiguous tensors of one shape (flattened into one row)."""
    _launch_fwd(gate, up, out, 1, out.numel(), out.numel(), out.numel())


def swiglu_backward_into(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor) -> None:
    n = dout.numel()
    _launch_bwd(dout, gate, up, dgate, dup, 1, n, n, n)


def _halves(t: Tensor, half: int) -> tuple[Tensor, Tensor]:
    """(rows, H) views of the gate and up halves of a contiguous (..., 2H) tensor."""
    flat = t.view(-1, 2 * half)
    return flat[:, :half], flat[:, half:]


def swiglu_packed_forward_into(x: Tensor, out: Tensor) -> None:
    if x.numel() == 0:
        return
    half = x.shape[-1] // 2
    gate, up = _halves(x, half)
    _launch_fwd(gate, up, out, gate.shape[0], half, 2 * half, half)


def swiglu_packed_backward_into(dout: Tensor, x: Tensor, dx: Tensor) -> None:
    if x.numel() == 0:
        return
    half = x.shape[-1] // 2
    gate, up = _halves(x, half)
    dgate, dup = _halves(dx, half)
    _launch_bwd(dout, gate, up, dgate, dup, gate.shape[0], half, 2 * half, half)


# --- torch.library custom ops ---------------------------------------------------------------

def _swiglu_body(gate: Tensor, up: Tensor) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    swiglu_forward_into(gate, up, out)
    return out


# Each op wraps its plain function, kept under its own name: eager calls run it directly (see
# _util.call), torch.compile and the other tracers see the op.
_swiglu = torch.library.custom_op("pyllm::swiglu", mutates_args=())(_swiglu_body)


@_swiglu.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_backward_body(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    swiglu_backward_into(dout, gate, up, dgate, dup)
    return dgate, dup


_swiglu_backward = torch.library.custom_op("pyllm::swiglu_backward", mutates_args=())(_swiglu_backward_body)


@_swiglu_backward.register_fake
def _(dout, gate, up):
    fmt = torch.contiguous_format
    return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    return _util.call(_swiglu_backward_body, torch.ops.pyllm.swiglu_backward, None, dout, gate, up)


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


class _SwigluFunction(torch.autograd.Function):
    """The op's autograd for eager calls, without its dispatch (see _util.call)."""

    @staticmethod
    def forward(ctx, gate, up):
        out = _swiglu_body(gate, up)
        _swiglu_setup(ctx, (gate, up), out)
        return out

    backward = staticmethod(_swiglu_grad)


def _swiglu_packed_body(x: Tensor) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    swiglu_packed_forward_into(x, out)
    return out


_swiglu_packed = torch.library.custom_op("pyllm::swiglu_packed", mutates_args=())(_swiglu_packed_body)


@_swiglu_packed.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _swiglu_packed_backward_body(dout: Tensor, x: Tensor) -> Tensor:
    dout, x = dout.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    swiglu_packed_backward_into(dout, x, dx)
    return dx


_swiglu_packed_backward = torch.library.custom_op("pyllm::swiglu_packed_backward", mutates_args=())(
    _swiglu_packed_backward_body)


@_swiglu_packed_backward.register_fake
def _(dout, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _swiglu_packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_packed_grad(ctx, dout):
    (x,) = ctx.saved_tensors
    return _util.call(_swiglu_packed_backward_body, torch.ops.pyllm.swiglu_packed_backward, None, dout, x)


_swiglu_packed.register_autograd(_swiglu_packed_grad, setup_context=_swiglu_packed_setup)


class _SwigluPackedFunction(torch.autograd.Function):
    """As _SwigluFunction, for swiglu_packed."""

    @staticmethod
    def forward(ctx, x):
        out = _swiglu_packed_body(x)
        _swiglu_packed_setup(ctx, (x,), out)
        return out

    backward = staticmethod(_swiglu_packed_grad)


# --- public API -------------------------------------------------------------------------------

def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one fused kernel, differentiable.

    Args:
        gate, up: tensors of the same shape (any number of dims, any size, empty too), dtype and
            device. CPU: float32, bfloat16, float16, float64. CUDA: float32, float16, bfloat16.
    Returns:
        A new contiguous tensor of that shape and dtype. Math runs in fp32 (fp64 for fp64 inputs)
        with one rounding to the output dtype.
    Backward recomputes silu from gate and up: nothing else is saved.
    Raises:
        TypeError for a non-tensor, an unsupported or mismatched dtype; ValueError for mismatched
        shapes or devices, or an unsupported device; RuntimeError for a CUDA tensor when pyllm
        was built without CUDA kernels.
    """
    _check_pair(gate, up)
    return _util.call(_swiglu_body, _swiglu, _SwigluFunction, gate, up)


def swiglu_packed(x: Tensor) -> Tensor:
    """silu(x[..., :H]) * x[..., H:] for x of shape (..., 2H): the output of one fused
    gate-and-up matmul goes straight in, with no split or copy.

    Same dtypes, devices and errors as :func:`swiglu`; additionally ValueError if the last dim
    is odd. Returns shape (..., H).
    """
    _check_packed(x)
    return _util.call(_swiglu_packed_body, _swiglu_packed, _SwigluPackedFunction, x)
