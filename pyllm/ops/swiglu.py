"""Fused gated activations, act(gate) * up, forward and backward in one kernel each: SwiGLU
(silu, LLaMA's MLP) and GeGLU (the tanh GELU, Gemma's MLP).

Kernels: csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu (one body for both activations, common/glu.h).
The backward recomputes the activation from the saved inputs, so autograd keeps nothing beyond gate
and up (or the packed x).
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
# The kernels' activation codes (csrc/common/glu.h) and the public names that use them.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
NAMES = {"silu": "swiglu", "gelu_tanh": "geglu"}


# --- validation ---------------------------------------------------------------------------------

def _check_pair(op: str, gate, up) -> None:
    _util.check_tensor(op, "gate", gate, DTYPES)
    _util.check_tensor(op, "up", up, DTYPES)
    _util.check_same(op, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")


def _check_packed(op: str, x) -> None:
    _util.check_tensor(op, "x", x, DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(
            f"{op}: the last dim of x holds [gate | up] and must be even, got shape {tuple(x.shape)}"
        )


# --- launchers: write into given outputs (tests poison these first) ---------------------------

def _launch_fwd(gate: Tensor, up: Tensor, out: Tensor, rows: int, cols: int, in_stride: int, out_stride: int,
                activation: str):
    args = (_util.ptr(gate), _util.ptr(up), _util.ptr(out), rows, cols, in_stride, out_stride, _util.dtype_code(out),
            ACTIVATIONS[activation])
    if out.is_cuda:
        _util.check_backend(NAMES[activation], out)  # torch.ops.pyllm.* arrive here unchecked
        _C.swiglu_fwd_cuda(*args, out.device.index, _util.stream_of(out))
    else:
        _util.init_cpu_threads()
        _C.swiglu_fwd_cpu(*args)


def _launch_bwd(dout, gate, up, dgate, dup, rows, cols, in_stride, out_stride, activation: str):
    args = (_util.ptr(dout), _util.ptr(gate), _util.ptr(up), _util.ptr(dgate), _util.ptr(dup),
            rows, cols, in_stride, out_stride, _util.dtype_code(dout), ACTIVATIONS[activation])
    if dout.is_cuda:
        _util.check_backend(NAMES[activation], dout)
        _C.swiglu_bwd_cuda(*args, dout.device.index, _util.stream_of(dout))
    else:
        _util.init_cpu_threads()
        _C.swiglu_bwd_cpu(*args)


def swiglu_forward_into(gate: Tensor, up: Tensor, out: Tensor, activation: str = "silu") -> None:
    """out = act(gate) * up, for contiguous tensors of one shape (flattened into one row)."""
    _util.check_sizes(OP, gate.numel(), up=up, out=out)
    _launch_fwd(gate, up, out, 1, out.numel(), out.numel(), out.numel(), activation)


def swiglu_backward_into(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor,
                         activation: str = "silu") -> None:
    _util.check_sizes(OP, dout.numel(), gate=gate, up=up, dgate=dgate, dup=dup)
    n = dout.numel()
    _launch_bwd(dout, gate, up, dgate, dup, 1, n, n, n, activation)



def _halves(t: Tensor, half: int) -> tuple[Tensor, Tensor]:
    """(rows, H) views of the gate and up halves of a contiguous (..., 2H) tensor."""
    flat = t.view(-1, 2 * half)
    return flat[:, :half], flat[:, half:]


def swiglu_packed_forward_into(x: Tensor, out: Tensor, activation: str = "silu") -> None:
    if x.numel() == 0:
        return
    half = x.shape[-1] // 2
    gate, up = _halves(x, half)
    _launch_fwd(gate, up, out, gate.shape[0], half, 2 * half, half, activation)


def swiglu_packed_backward_into(dout: Tensor, x: Tensor, dx: Tensor, activation: str = "silu") -> None:
    if x.numel() == 0:
        return
    half = x.shape[-1] // 2
    gate, up = _halves(x, half)
    dgate, dup = _halves(dx, half)
    _launch_bwd(dout, gate, up, dgate, dup, gate.shape[0], half, 2 * half, half, activation)


# --- torch.library custom ops ---------------------------------------------------------------
# Four ops per activation (split and packed, forward and backward), named after its public
# function: pyllm::swiglu, pyllm::swiglu_backward, pyllm::swiglu_packed, ..., pyllm::geglu, ...
# Each op wraps its plain function, kept as `body`: eager calls run it directly (see _util.call),
# torch.compile and the other tracers see the op. `function` is the op's autograd for eager calls,
# without its dispatch.

class _Ops:
    def __init__(self, activation: str):
        name = NAMES[activation]
        self.split_body, self.split_op, self.split_function = self._split(name, activation)
        self.packed_body, self.packed_op, self.packed_function = self._packed(f"{name}_packed", activation)

    @staticmethod
    def _split(name: str, activation: str):
        def body(gate: Tensor, up: Tensor) -> Tensor:
            gate, up = gate.contiguous(), up.contiguous()
            out = torch.empty_like(gate)
            swiglu_forward_into(gate, up, out, activation)
            return out

        def backward_body(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
            dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
            dgate, dup = torch.empty_like(gate), torch.empty_like(up)
            swiglu_backward_into(dout, gate, up, dgate, dup, activation)
            return dgate, dup

        op = torch.library.custom_op(f"pyllm::{name}", mutates_args=())(body)
        backward_op = torch.library.custom_op(f"pyllm::{name}_backward", mutates_args=())(backward_body)
        fmt = torch.contiguous_format
        op.register_fake(lambda gate, up: torch.empty_like(gate, memory_format=fmt))
        backward_op.register_fake(
            lambda dout, gate, up: (torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)))

        def setup(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        def grad(ctx, dout):
            gate, up = ctx.saved_tensors
            return _util.call(backward_body, getattr(torch.ops.pyllm, f"{name}_backward"), None, dout, gate, up)

        op.register_autograd(grad, setup_context=setup)
        for o in (op, backward_op):
            _util.batching_rule(o, _util.vmap_elementwise)
        # DTensor: elementwise, any dim sharded alike in every tensor
        _util.sharding_rule(op)(lambda gate, up: _util.rows_rule(2, 1, gate.ndim, last=True))
        _util.sharding_rule(backward_op)(lambda dout, gate, up: _util.rows_rule(3, 2, gate.ndim, last=True))
        return body, op, _util.eager_function(name, body, setup, grad)

    @staticmethod
    def _packed(name: str, activation: str):
        def body(x: Tensor) -> Tensor:
            x = x.contiguous()
            out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
            swiglu_packed_forward_into(x, out, activation)
            return out

        def backward_body(dout: Tensor, x: Tensor) -> Tensor:
            dout, x = dout.contiguous(), x.contiguous()
            dx = torch.empty_like(x)
            swiglu_packed_backward_into(dout, x, dx, activation)
            return dx

        op = torch.library.custom_op(f"pyllm::{name}", mutates_args=())(body)
        backward_op = torch.library.custom_op(f"pyllm::{name}_backward", mutates_args=())(backward_body)
        op.register_fake(lambda x: x.new_empty((*x.shape[:-1], x.shape[-1] // 2)))
        backward_op.register_fake(lambda dout, x: torch.empty_like(x, memory_format=torch.contiguous_format))

        def setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        def grad(ctx, dout):
            (x,) = ctx.saved_tensors
            return _util.call(backward_body, getattr(torch.ops.pyllm, f"{name}_backward"), None, dout, x)

        op.register_autograd(grad, setup_context=setup)
        for o in (op, backward_op):  # the packed dim stays last: the vmapped one goes first
            _util.batching_rule(o, _util.vmap_elementwise)
        # DTensor: any dim but the packed [gate | up] one
        _util.sharding_rule(op)(lambda x: _util.rows_rule(1, 1, x.ndim))
        _util.sharding_rule(backward_op)(lambda dout, x: _util.rows_rule(2, 1, x.ndim))
        return body, op, _util.eager_function(name, body, setup, grad)


_OPS = {activation: _Ops(activation) for activation in ACTIVATIONS}


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
    _check_pair("swiglu", gate, up)
    ops = _OPS["silu"]
    return _util.call(ops.split_body, ops.split_op, ops.split_function, gate, up)


def swiglu_packed(x: Tensor) -> Tensor:
    """silu(x[..., :H]) * x[..., H:] for x of shape (..., 2H): the output of one fused
    gate-and-up matmul goes straight in, with no split or copy.

    Same dtypes, devices and errors as :func:`swiglu`; additionally ValueError if the last dim
    is odd. Returns shape (..., H).
    """
    _check_packed("swiglu_packed", x)
    ops = _OPS["silu"]
    return _util.call(ops.packed_body, ops.packed_op, ops.packed_function, x)


def geglu(gate: Tensor, up: Tensor) -> Tensor:
    """gelu(gate, approximate="tanh") * up in one fused kernel, differentiable: the MLP of Gemma
    1-3 (transformers' "gelu_pytorch_tanh", "gelu_new" and "gelu_fast" are this GELU too).

    Computed as gate * sigmoid(2 sqrt(2/pi) (gate + 0.044715 gate^3)), which equals torch's
    0.5 gate (1 + tanh(...)) and keeps the small negative outputs (gate < ~-5) that torch's fp32
    1 + tanh(...) cancels to 0. Same shapes, dtypes, devices, roundings and errors as
    :func:`swiglu`; the backward likewise recomputes from gate and up.
    """
    _check_pair("geglu", gate, up)
    ops = _OPS["gelu_tanh"]
    return _util.call(ops.split_body, ops.split_op, ops.split_function, gate, up)


def geglu_packed(x: Tensor) -> Tensor:
    """gelu_tanh(x[..., :H]) * x[..., H:] for x of shape (..., 2H), as :func:`swiglu_packed` is
    for :func:`swiglu`. Returns shape (..., H)."""
    _check_packed("geglu_packed", x)
    ops = _OPS["gelu_tanh"]
    return _util.call(ops.packed_body, ops.packed_op, ops.packed_function, x)
