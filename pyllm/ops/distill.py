"""The generalized Jensen-Shannon divergence of GKD between a student's and a teacher's rows of
logits, with the gradient for the student's logits computed in the same kernel call (Liger-Kernel's
JSD, as one C++ pass per row). Two entry points:
- generalized_jsd(student_logits, teacher_logits, ...): TRL's generalized_jsd_loss (Liger's LigerJSD)
  as a differentiable op, reduced or per row; the backward runs the kernel again with the incoming
  gradient. Nothing of (N, V) in fp32, nothing of (N, V) kept but references to the inputs.
- distill_rows_(student, teacher, ...): the per-row divergences, and the gradient written over the
  student's logits themselves: what pyllm.nn.linear_distill runs on each chunk of logits it makes.

Kernels: csrc/cpu/distill.cpp, csrc/cuda/distill.cu (not yet run on a GPU: pyllm.nn.linear_distill
takes it only with PYLLM_DISTILL_CUDA=1, torch ops otherwise; generalized_jsd always runs it). The
divergence in torch ops: pyllm.nn.distill_divergence.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util
from pyllm.ops.cross_entropy import check_shape_args

OP = "distill"
REDUCTIONS = ("batchmean", "mean", "sum", "none")
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
# The CUDA kernel has not yet run on a GPU: linear_distill takes it only when asked (bench/gpu_check.sh
# asks), as pyllm.nn's fused cross-entropy does its own.
CUDA_IN_FUSED_LOSS_ENV = "PYLLM_DISTILL_CUDA"


def takes(logits: Tensor) -> bool:
    """Whether pyllm.nn.linear_distill runs this kernel on logits of this dtype and device: the CPU
    always; CUDA when pyllm was built with its kernels (fp64 on CUDA has none) and
    PYLLM_DISTILL_CUDA=1 (until the kernel is verified on a GPU; torch ops otherwise)."""
    if logits.is_cpu:
        return logits.dtype in DTYPES["cpu"]
    return (logits.is_cuda and _util.cuda_kernels_run_on(logits) and logits.dtype in DTYPES["cuda"]
            and os.environ.get(CUDA_IN_FUSED_LOSS_ENV) == "1")


def _check(student: Tensor, teacher: Tensor, beta, temperature, scale, softcap, teacher_scale, teacher_softcap,
           rows_in_place: bool = True, want_grad: bool = True) -> None:
    _util.check_tensor(OP, "student", student, DTYPES)
    if not isinstance(teacher, Tensor):
        raise TypeError(f"{OP}: teacher logits must be a torch.Tensor, got {type(teacher).__name__}")
    _util.check_same(OP, student=student, teacher=teacher)
    if rows_in_place:  # distill_rows_ writes over the student's rows: 2-D, apart, contiguous within
        if student.dim() != 2 or not _util.kernel_rows(student):
            raise ValueError(f"{OP}: student logits must be 2-D (rows, V), rows apart, with a contiguous last dim, "
                             f"got shape {tuple(student.shape)}, strides {student.stride()}")
        if teacher.stride(-1) != 1:
            raise ValueError(f"{OP}: teacher logits must have a contiguous last dim, got strides {teacher.stride()}")
        if want_grad and _overlap(student, teacher):
            raise ValueError(f"{OP}: teacher logits share memory with the student's, which the gradient overwrites; "
                             f"pass a copy")
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"{OP}: logits must be (..., V) with V >= 1 (the vocabulary on the last dim), got shape "
                         f"{tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"{OP}: teacher logits must have the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    for what, value in (("beta", beta), ("temperature", temperature)):
        if not _util.finite_number(value):
            raise ValueError(f"{OP}: {what} must be a finite number, got {value!r}")
    if not _util.symbolic(beta) and (not 0.0 <= beta <= 1.0 or not temperature > 0):
        raise ValueError(f"{OP}: beta must be in [0, 1] and temperature > 0, got {beta}, {temperature}")
    check_shape_args(OP, 0.0, 0.0, scale, softcap or None)
    check_shape_args(f"{OP} (the teacher's)", 0.0, 0.0, teacher_scale, teacher_softcap or None)


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of a and b (first to last element) intersect: conservative (views
    that interleave without sharing an element count as overlapping); meta tensors have no memory, nor
    fake ones (torch.compile, torch.export, FakeTensorMode: data_ptr() raises or reads 0 for both)."""
    if a.numel() == 0 or b.numel() == 0 or _util.values_unreadable(a) or _util.values_unreadable(b):
        return False

    def span(t):
        start = t.data_ptr()
        return start, start + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def distill_into(student: Tensor, teacher: Tensor, loss: Tensor, grad: Optional[Tensor], beta: float,
                 temperature: float, scale: float, softcap: float, teacher_scale: float, teacher_softcap: float,
                 grad_scale: float = 1.0, grad_rows: Optional[Tensor] = None) -> None:
    """loss (rows,) in the math type; grad (rows, V) or None (may be student: in place), for 2-D
    student and teacher logits with a contiguous last dim. The gradient is of the row divergences
    times grad_scale and grad_rows (rows,) in loss's dtype, when given. softcaps 0.0: none."""
    rows, vocab = student.shape
    if tuple(teacher.shape) != (rows, vocab) or (grad is not None and tuple(grad.shape) != (rows, vocab)):
        raise ValueError(f"{OP}: teacher (and grad) must have the student's shape {(rows, vocab)}, got "
                         f"{tuple(teacher.shape)}" + ("" if grad is None else f" and {tuple(grad.shape)}"))
    _util.check_row_lengths(OP, rows, loss=loss, grad_rows=grad_rows)  # (read and written by the row)
    args = (_util.ptr(student), _util.ptr(teacher), _util.ptr(loss), 0 if grad is None else _util.ptr(grad),
            0 if grad_rows is None else _util.ptr(grad_rows), rows, vocab,
            student.stride(0) if rows else vocab, teacher.stride(0) if rows else vocab,
            grad.stride(0) if grad is not None and rows else vocab, float(scale), float(softcap),
            float(teacher_scale), float(teacher_softcap), float(temperature), float(beta), float(grad_scale),
            _util.dtype_code(student))
    if student.is_cuda:
        _util.check_backend(OP, student)
        _C.distill_cuda(*args, student.device.index, _util.stream_of(student))
    else:
        _util.init_cpu_threads()
        _C.distill_cpu(*args)


def _rows_inplace_body(student: Tensor, teacher: Tensor, beta: float, temperature: float, scale: float, softcap: float,
                       teacher_scale: float, teacher_softcap: float, want_grad: bool) -> Tensor:
    loss = _util.row_losses(student, student.shape[0])
    distill_into(student, teacher, loss, student if want_grad else None, beta, temperature, scale, softcap,
                 teacher_scale, teacher_softcap)
    return loss


_rows_inplace = torch.library.custom_op("pyllm::distill_rows_", mutates_args=("student",))(_rows_inplace_body)


@_rows_inplace.register_fake
def _(student, teacher, beta, temperature, scale, softcap, teacher_scale, teacher_softcap, want_grad):
    return _util.row_losses(student, student.shape[0])


def distill_rows_(student: Tensor, teacher: Tensor, *, beta: float = 0.0, temperature: float = 1.0,
                  scale: float = 1.0, softcap: Optional[float] = None, teacher_scale: float = 1.0,
                  teacher_softcap: Optional[float] = None, want_grad: bool = True) -> Tensor:
    """Each row's generalized JSD (pyllm.nn.distill_divergence: beta 0 the forward KL(teacher ||
    student), 1 the reverse, else the mixture's) at the temperature, (rows,) fp32 (fp64 for fp64),
    for student and teacher logits (rows, V) of one dtype and device, each with a contiguous last dim.
    Each side's logits are scaled, then capped (softcap * tanh(z / softcap)), then divided by the
    temperature. want_grad: the student's logits are overwritten with d(row's divergence) / d(its
    logits), in their dtype. No autograd: the gradient is the output. A class of probability 0 on
    both sides (-inf logits) counts 0 (torch's formula gives NaN there); one side's -inf where the
    other has mass gives +inf when it is the side under the log (beta 0: the student's, 1: the
    teacher's), else 0; a NaN in a row, or a +-inf largest logit on either side, gives the row a
    NaN divergence and gradient.
    Raises TypeError / ValueError for bad arguments (dtype, device, shapes, strides, numbers)."""
    _check(student, teacher, beta, temperature, scale, softcap, teacher_scale, teacher_softcap, want_grad=want_grad)
    return _util.call(_rows_inplace_body, _rows_inplace, None, student, teacher, float(beta), float(temperature),
                      float(scale), float(softcap or 0.0), float(teacher_scale), float(teacher_softcap or 0.0),
                      bool(want_grad))


# --- the differentiable op: the backward recomputes each row from the saved logits ---------------
#
# As pyllm.cross_entropy's: the forward writes nothing of (N, V) and keeps references to both
# logits; the backward reads them again and multiplies the incoming gradient in fp32 before the
# one rounding to the student's dtype.

def _teacher_rows(t: Tensor) -> Tensor:
    """As _util.as_rows, but rows may repeat (stride 0: the kernel only reads the teacher's)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _distill_body(student: Tensor, teacher: Tensor, beta: float, temperature: float, scale: float, softcap: float,
                  teacher_scale: float, teacher_softcap: float) -> Tensor:
    """Per-row divergences (rows,) for logits (..., V)."""
    rows = _util.as_rows(student)
    loss = _util.row_losses(rows, rows.shape[0])
    distill_into(rows, _teacher_rows(teacher), loss, None, beta, temperature, scale, softcap, teacher_scale,
                 teacher_softcap)
    return loss


_distill = torch.library.custom_op("pyllm::distill", mutates_args=())(_distill_body)


@_distill.register_fake
def _(student, teacher, beta, temperature, scale, softcap, teacher_scale, teacher_softcap):
    return _util.row_losses(student, student.numel() // student.shape[-1])


def _distill_backward_body(grad_rows: Tensor, student: Tensor, teacher: Tensor, beta: float, temperature: float,
                           scale: float, softcap: float, teacher_scale: float, teacher_softcap: float) -> Tensor:
    """d(sum of grad_rows * row divergences) / d student, in the student's shape and dtype."""
    rows = _util.as_rows(student)
    if grad_rows.numel() != rows.shape[0]:
        raise ValueError(f"{OP}: the incoming gradient has {grad_rows.numel()} elements, the logits {rows.shape[0]} rows")
    grad = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    loss = _util.row_losses(rows, rows.shape[0])  # recomputed, unused
    distill_into(rows, _teacher_rows(teacher), loss, grad, beta, temperature, scale, softcap, teacher_scale,
                 teacher_softcap, 1.0, grad_rows.to(loss.dtype).contiguous())
    return grad.reshape(student.shape)


_distill_backward = torch.library.custom_op("pyllm::distill_backward", mutates_args=())(_distill_backward_body)


@_distill_backward.register_fake
def _(grad_rows, student, teacher, beta, temperature, scale, softcap, teacher_scale, teacher_softcap):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


_util.row_loss_sharding(_distill, _distill_backward, 1, 6)  # DTensor: rows on the first dim


# vmap: the vmapped dim first makes more rows of one call.
for _op in (_distill, _distill_backward):
    _util.batching_rule(_op, _util.vmap_rows)


def _distill_setup(ctx, inputs, output):
    student, teacher, *args = inputs
    ctx.save_for_backward(student, teacher)
    ctx.args = args


def _distill_grad(ctx, grad_rows):
    student, teacher = ctx.saved_tensors
    grad = _util.call(_distill_backward_body, torch.ops.pyllm.distill_backward, None, grad_rows, student, teacher,
                      *ctx.args)
    return grad, None, None, None, None, None, None, None


_distill.register_autograd(_distill_grad, setup_context=_distill_setup)
_DistillFunction = _util.eager_function(OP, _distill_body, _distill_setup, _distill_grad)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                    beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                    num_items_in_batch=None, *, mask: Optional[Tensor] = None, ignore_index: int = -100,
                    scale: float = 1.0, softcap: Optional[float] = None, teacher_scale: float = 1.0,
                    teacher_softcap: Optional[float] = None) -> Tensor:
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024) between the student's and
    the teacher's next-token distributions at temperature T, per row of logits (..., V): TRL's
    GKDTrainer.generalized_jsd_loss, with its arguments in its order, and Liger-Kernel's LigerJSD.
    With s, t the log-softmaxes of logits / T: beta 0 the forward KL(teacher || student) (Hinton's
    distillation), 1 the reverse KL(student || teacher), else beta KL(teacher || M) + (1 - beta)
    KL(student || M), M = beta teacher + (1 - beta) student (TRL's default beta 0.5). One kernel call
    per direction; the backward recomputes each row from the saved logits, so nothing of (rows, V)
    is kept or made in fp32. The teacher is a constant: it is detached here and gets no gradient.

    Args:
        student_logits, teacher_logits: (..., V), one shape, dtype and device. CPU: float32, bfloat16,
            float16, float64; CUDA: float32, bfloat16, float16 (its kernel not yet run on a GPU).
        labels: optional integer (...): rows whose label is ignore_index (-100) count 0 and get a
            zero gradient (prompt and padding tokens), as TRL's. mask: the same as a bool (...)
            tensor, True where a row counts; give one or neither.
        reduction: TRL's. "batchmean" (its default): the sum over the rows kept, divided by their
            number (at least 1) with labels or a mask, else by the logits' first dim (the batch of
            (B, T, V) logits, the rows of (N, V) ones). "mean": divided by the number of elements
            of the rows kept, rows x V (torch's elementwise mean; before 2026-12-03 pyllm's "mean"
            was "batchmean"'s per-row mean). "sum". "none": the (...) per-row divergences, masked
            rows 0 (TRL's is per element, (..., V), and keeps only the labelled rows: a sum over
            either is the same).
        num_items_in_batch: when given, the loss is the sum over the rows kept divided by it,
            whatever the reduction (TRL's, for gradient accumulation: the number of labelled
            tokens in the whole accumulated batch).
        scale, softcap (and the teacher's): each side's logits scaled, then capped as softcap *
            tanh(z / softcap) (Gemma 2's), before the temperature divides them.
    Returns:
        fp32 (fp64 for fp64 logits), whatever the logits' dtype (TRL's is the logits' dtype, from
        16-bit log-softmaxes); "mean" of no rows is NaN, as torch's. A class of probability 0 on
        both sides (-inf logits) adds 0 (torch's written-out formula gives NaN there); one side's
        -inf where the other has mass gives +inf when it is the side under the log (beta 0: the
        student's, 1: the teacher's); a row with a NaN logit or a +-inf largest logit gives NaN.
    Raises:
        TypeError / ValueError for bad arguments (dtypes, shapes, devices, out-of-range numbers).
    """
    _check(student_logits, teacher_logits, beta, temperature, scale, softcap, teacher_scale, teacher_softcap,
           rows_in_place=False)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    rows_shape = tuple(student_logits.shape[:-1])
    if labels is not None:
        if mask is not None:
            raise ValueError(f"{OP}: give labels or mask, not both")
        if (not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex
                or labels.dtype == torch.bool or tuple(labels.shape) != rows_shape):
            raise ValueError(f"{OP}: labels must be an integer tensor of the logits' shape without their last dim, "
                             f"{rows_shape}, got {getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        mask = labels.long() != ignore_index  # (int64: -100 in uint8 labels would wrap to 156, a class)
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != rows_shape):
        raise ValueError(f"{OP}: mask must be a bool tensor of the logits' shape without their last dim, "
                         f"{rows_shape}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    rows = _util.call(_distill_body, _distill, _DistillFunction, student_logits, teacher_logits.detach(), float(beta),
                      float(temperature), float(scale), float(softcap or 0.0), float(teacher_scale),
                      float(teacher_softcap or 0.0)).reshape(rows_shape)
    if mask is not None:  # a select, not a product: a masked row's NaN stays out of the loss (and its
        # gradient: the kernel gives rows of weight 0 zeros)
        mask = mask.to(rows.device)
        rows = torch.where(mask, rows, rows.new_zeros(()))
    if num_items_in_batch is not None:
        # a count of tokens: a positive number (0 had given inf, a negative one a negative loss)
        # (read on the host only where that is free: a CPU tensor, not a CUDA one's sync)
        count = num_items_in_batch
        if isinstance(count, Tensor) and count.is_cpu and count.numel() == 1 and not _util.values_unreadable(count):
            count = count.item()
        if (isinstance(count, Tensor) and count.numel() != 1) or not isinstance(count, Tensor) and (
                isinstance(count, bool) or not _util.is_number(count) or not count > 0):  # (a vector had broadcast)
            raise ValueError(f"generalized_jsd: num_items_in_batch must be a positive number (the labelled tokens "
                             f"of the accumulated batch), got {num_items_in_batch!r}")
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(rows.device)
        return rows.sum() / num_items_in_batch
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        if mask is not None:
            return rows.sum() / mask.sum().clamp_min(1)
        return rows.sum() / max(rows_shape[0] if rows_shape else 1, 1)
    kept = mask.sum() if mask is not None else rows.numel()  # "mean": over the elements, rows x V
    return rows.sum() / (kept * student_logits.shape[-1])
