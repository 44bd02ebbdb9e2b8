"""The generalized Jensen-Shannon divergence of GKD between a student's and a teacher's rows of
logits, with the gradient for the student's logits computed in the same kernel call (Liger-Kernel's
JSD, as one C++ pass per row): what pyllm.nn.linear_distill runs on each chunk of logits it makes.

Kernel: csrc/cpu/distill.cpp. CUDA tensors take pyllm.nn's torch ops instead (no CUDA kernel yet:
takes() says no). The divergence itself, its beta and temperature: pyllm.nn.distill_divergence.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util
from pyllm.ops.cross_entropy import check_shape_args

OP = "distill"
DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def takes(logits: Tensor) -> bool:
    """Whether pyllm.nn.linear_distill runs this kernel on logits of this dtype and device."""
    return logits.is_cpu and logits.dtype in DTYPES["cpu"]


def _check(student: Tensor, teacher: Tensor, beta, temperature, scale, softcap, teacher_scale, teacher_softcap) -> None:
    _util.check_tensor(OP, "student", student, DTYPES)
    _util.check_same(OP, student=student, teacher=teacher)
    if student.dim() != 2 or student.stride(-1) != 1 or (student.shape[0] > 1 and student.stride(0) < student.shape[1]):
        raise ValueError(f"{OP}: student logits must be 2-D (rows, V), rows apart, with a contiguous last dim, got "
                         f"shape {tuple(student.shape)}, strides {student.stride()}")
    if teacher.shape != student.shape or teacher.stride(-1) != 1:
        raise ValueError(f"{OP}: teacher logits must have the student's shape {tuple(student.shape)} and a contiguous "
                         f"last dim, got shape {tuple(teacher.shape)}, strides {teacher.stride()}")
    for what, value in (("beta", beta), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{OP}: {what} must be a finite number, got {value!r}")
    if not 0.0 <= beta <= 1.0 or not temperature > 0:
        raise ValueError(f"{OP}: beta must be in [0, 1] and temperature > 0, got {beta}, {temperature}")
    check_shape_args(OP, 0.0, 0.0, scale, softcap or None)
    check_shape_args(f"{OP} (the teacher's)", 0.0, 0.0, teacher_scale, teacher_softcap or None)


def distill_into(student: Tensor, teacher: Tensor, loss: Tensor, grad: Optional[Tensor], beta: float,
                 temperature: float, scale: float, softcap: float, teacher_scale: float, teacher_softcap: float,
                 grad_scale: float = 1.0, grad_rows: Optional[Tensor] = None) -> None:
    """loss (rows,) in the math type; grad (rows, V) or None (may be student: in place), for 2-D
    student and teacher logits with a contiguous last dim. The gradient is of the row divergences
    times grad_scale and grad_rows (rows,) in loss's dtype, when given. softcaps 0.0: none."""
    rows, vocab = student.shape
    _C.distill_cpu(_util.ptr(student), _util.ptr(teacher), _util.ptr(loss), 0 if grad is None else _util.ptr(grad),
                   0 if grad_rows is None else _util.ptr(grad_rows), rows, vocab,
                   student.stride(0) if rows else vocab, teacher.stride(0) if rows else vocab,
                   grad.stride(0) if grad is not None and rows else vocab, float(scale), float(softcap),
                   float(teacher_scale), float(teacher_softcap), float(temperature), float(beta), float(grad_scale),
                   _util.dtype_code(student))


def _loss_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _rows_inplace_body(student: Tensor, teacher: Tensor, beta: float, temperature: float, scale: float, softcap: float,
                       teacher_scale: float, teacher_softcap: float, want_grad: bool) -> Tensor:
    loss = student.new_empty(student.shape[0], dtype=_loss_dtype(student))
    distill_into(student, teacher, loss, student if want_grad else None, beta, temperature, scale, softcap,
                 teacher_scale, teacher_softcap)
    return loss


_rows_inplace = torch.library.custom_op("pyllm::distill_rows_", mutates_args=("student",))(_rows_inplace_body)


@_rows_inplace.register_fake
def _(student, teacher, beta, temperature, scale, softcap, teacher_scale, teacher_softcap, want_grad):
    return student.new_empty(student.shape[0], dtype=_loss_dtype(student))


def distill_rows_(student: Tensor, teacher: Tensor, *, beta: float = 0.0, temperature: float = 1.0,
                  scale: float = 1.0, softcap: Optional[float] = None, teacher_scale: float = 1.0,
                  teacher_softcap: Optional[float] = None, want_grad: bool = True) -> Tensor:
    """Each row's generalized JSD (pyllm.nn.distill_divergence: beta 0 the forward KL(teacher ||
    student), 1 the reverse, else the mixture's) at the temperature, (rows,) fp32 (fp64 for fp64),
    for student and teacher logits (rows, V) of one dtype on the CPU, each with a contiguous last dim.
    Each side's logits are scaled, then capped (softcap * tanh(z / softcap)), then divided by the
    temperature. want_grad: the student's logits are overwritten with d(row's divergence) / d(its
    logits), in their dtype. No autograd: the gradient is the output. A term whose probability is 0
    (a -inf logit) counts 0 (torch's formula gives NaN there); a NaN in a row, or a +-inf largest
    logit on either side, gives the row a NaN divergence and gradient.
    Raises TypeError / ValueError for bad arguments (dtype, device, shapes, strides, numbers)."""
    _check(student, teacher, beta, temperature, scale, softcap, teacher_scale, teacher_softcap)
    return _util.call(_rows_inplace_body, _rows_inplace, None, student, teacher, float(beta), float(temperature),
                      float(scale), float(softcap or 0.0), float(teacher_scale), float(teacher_softcap or 0.0),
                      bool(want_grad))
