"""Cross-entropy over rows of logits, with label smoothing, z-loss, a logit scale and a tanh cap, its
gradient computed in the same kernel call (Liger-Kernel's cross-entropy, as one C++ / CUDA pass per row).

Kernels: csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu. Two entry points:
- cross_entropy(logits, targets, ...): F.cross_entropy's drop-in (ignore_index, reduction,
  label_smoothing) plus z_loss, scale, softcap, differentiable; the backward runs the kernel again
  with the incoming gradient. Nothing of (N, V) in fp32, nothing of (N, V) kept.
- cross_entropy_rows_(logits, targets, ...): the per-row losses, and the gradient written over the
  logits themselves: what pyllm.nn.linear_cross_entropy runs on each chunk of logits it makes.
And token_stats(logits, targets): each row's entropy, whether its target is the argmax and its
mean logit (TRL's SFT metrics entropy and mean_token_accuracy, its DPO metrics logits/chosen and
logits/rejected), by the same kernel on the CPU.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Literal, NamedTuple, Optional, Union, overload

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util

OP = "cross_entropy"
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
REDUCTIONS = ("mean", "sum", "none")
# The kernel's token statistics per row (its stats buffer's columns): entropy, 1.0 where the target is
# the argmax, mean final logit (csrc/cpu/cross_entropy.cpp's kStats).
STATS = 3
_TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32)


# --- validation ---------------------------------------------------------------------------------

def _check(logits, targets, ignore_index, reduction, label_smoothing, z_loss, scale, softcap,
           kernel: bool = True) -> None:
    """kernel False: logits any float tensor on any device (token_stats' torch ops off the CPU)."""
    if kernel:
        _util.check_tensor(OP, "logits", logits, DTYPES)
    elif not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"{OP}: logits must be a float tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{OP}: logits must be (..., V) with V >= 1 (the classes on the last dim), got shape "
                         f"{tuple(logits.shape)}")
    # (any integer dtype whose values int64 holds: they are widened with .long(), as linear_cross_entropy's)
    if not isinstance(targets, Tensor) or targets.dtype not in _TARGET_DTYPES:
        raise TypeError(f"{OP}: targets must be an integer tensor of class indices "
                        f"(int64, int32, int16, int8, uint8, uint16, uint32), got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"{OP}: targets must have logits' shape without its last dim, {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"{OP}: targets are on {targets.device} but logits on {logits.device}; they must match")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"{OP}: ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_shape_args(OP, label_smoothing, z_loss, scale, softcap)


def check_shape_args(name: str, label_smoothing, z_loss, scale, softcap) -> None:
    """The loss's numbers: label_smoothing in [0, 1], z_loss >= 0, scale > 0, softcap None or > 0, finite."""
    for what, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss), ("scale", scale)):
        if not _util.finite_number(value):
            raise ValueError(f"{name}: {what} must be a finite number, got {value!r}")
    if softcap is not None and not _util.symbolic(softcap) and (not _util.is_number(softcap)
                                                                 or not 0 < softcap < math.inf):
        raise ValueError(f"{name}: softcap must be None or positive and finite, got {softcap!r}")
    if not _util.symbolic(label_smoothing) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not _util.symbolic(z_loss) and z_loss < 0:
        raise ValueError(f"{name}: z_loss must be 0 or positive, got {z_loss}")
    if not _util.symbolic(scale) and scale <= 0:
        raise ValueError(f"{name}: scale must be positive, got {scale}")


# The CUDA kernel has not yet run on a GPU: pyllm.nn's fused losses take it only when asked
# (bench/gpu_check.sh asks); pyllm.cross_entropy itself always runs it.
CUDA_IN_FUSED_LOSS_ENV = "PYLLM_CROSS_ENTROPY_CUDA"


def takes(logits: Tensor) -> bool:
    """Whether pyllm.nn's fused losses run this kernel on (..., V) logits of this dtype and device:
    the CPU always; CUDA when pyllm was built with its kernels (fp64 on CUDA has none) and
    PYLLM_CROSS_ENTROPY_CUDA=1 (until the kernel is verified on a GPU; torch ops otherwise)."""
    if logits.is_cpu:
        return logits.dtype in DTYPES["cpu"]
    return (logits.is_cuda and _util.cuda_kernels_run_on(logits) and logits.dtype in DTYPES["cuda"]
            and os.environ.get(CUDA_IN_FUSED_LOSS_ENV) == "1")


# --- launcher: writes into given outputs (tests poison these first) ------------------------------

def cross_entropy_into(logits: Tensor, targets: Tensor, loss: Tensor, z_part: Optional[Tensor], grad: Optional[Tensor],
                       ignore_index: int, scale: float, softcap: float, label_smoothing: float, z_loss: float,
                       grad_scale: float = 1.0, grad_rows: Optional[Tensor] = None,
                       stats: Optional[Tensor] = None, token_scaling: bool = False) -> None:
    """loss (rows,), z_part (rows,) or None, grad (rows, V) or None (may be logits: in place), for 2-D
    logits and grad with a contiguous last dim; targets int64 (rows,) contiguous. The gradient is
    of the row losses times grad_scale and grad_rows (rows,) in loss's dtype, when given. stats:
    None or (rows, 3) contiguous in loss's dtype, each row's entropy, 1.0 where its target is the
    first argmax, and its mean final logit (0, 0 and 0 where ignored; NaN and 0 where its loss is
    NaN, the mean as it comes). token_scaling: each row's loss, z-loss share and gradient times its
    target's probability, held constant (DFT)."""
    rows, vocab = logits.shape
    # (the kernel reads `rows` targets and writes `rows` losses wherever they point: one shorter, a
    # DTensor's rows chunked otherwise than the logits', would be read past its end)
    _util.check_row_lengths(OP, rows, targets=targets, loss=loss, z_part=z_part, grad_rows=grad_rows)
    if stats is not None and (tuple(stats.shape) != (rows, STATS) or not stats.is_contiguous()
                              or stats.dtype != loss.dtype or stats.device != logits.device):
        raise ValueError(f"{OP}: stats must be a contiguous ({rows}, {STATS}) {loss.dtype} tensor on {logits.device}, got "
                         f"{stats.dtype} {tuple(stats.shape)} on {stats.device}"
                         + ("" if stats.is_contiguous() else f", strides {stats.stride()}"))
    if grad is not None and tuple(grad.shape) != (rows, vocab):
        raise ValueError(f"{OP}: grad must have the logits' shape {(rows, vocab)}, got {tuple(grad.shape)}")
    args = (_util.ptr(logits), _util.ptr(targets), _util.ptr(loss), 0 if z_part is None else _util.ptr(z_part),
            0 if grad is None else _util.ptr(grad), 0 if grad_rows is None else _util.ptr(grad_rows), rows, vocab,
            logits.stride(0) if rows else vocab, grad.stride(0) if grad is not None and rows else vocab,
            int(ignore_index), float(scale), float(softcap), float(label_smoothing), float(z_loss), float(grad_scale),
            _util.dtype_code(logits))
    if logits.is_cuda:
        _util.check_backend(OP, logits)
        if stats is not None:  # (the CUDA kernel writes none: torch ops, before a gradient overwrites the logits)
            _stats_in_torch(logits, targets, ignore_index, scale, softcap, stats)
        _C.cross_entropy_cuda(*args, logits.device.index, _util.stream_of(logits), bool(token_scaling))
    else:
        _util.init_cpu_threads()
        _C.cross_entropy_cpu(*args, 0 if stats is None else _util.ptr(stats), bool(token_scaling))


def stats_of_shaped(z: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """(rows, 3): each row's entropy of softmax(z), 1.0 where its target is the first largest z
    (torch's argmax) and the mean of z, for final logits z (rows, V) in fp32 or fp64; 0, 0 and 0
    where valid is False; NaN and 0 where the softmax is NaN (a NaN logit, a row of -inf, a +inf),
    as the CPU kernel, and where a counted target is out of [0, V)."""
    p = torch.softmax(z, dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # (a masked class, p = 0, adds 0)
    # a target out of range (CUDA's kernel and torch ops give its loss NaN, not an error) too
    entropy = entropy.masked_fill((targets < 0) | (targets >= z.shape[-1]), math.nan)
    top1 = (z.argmax(dim=-1) == targets) & ~entropy.isnan()
    return torch.stack([torch.where(valid, entropy, 0.0), (top1 & valid).to(z.dtype),
                        torch.where(valid, z.mean(dim=-1), 0.0)], dim=1)


def _stats_in_torch(logits: Tensor, targets: Tensor, ignore_index: int, scale: float, softcap: float,
                    stats: Tensor) -> None:
    """cross_entropy_into's stats in torch ops, ~16 M logits at a time (the fp32 copies' memory)."""
    step = max(1, (1 << 24) // max(1, logits.shape[1]))
    for start in range(0, logits.shape[0], step):
        z = _final(logits[start:start + step].to(stats.dtype), scale, softcap)
        t = targets[start:start + step]
        stats[start:start + step] = stats_of_shaped(z, t, t != ignore_index)


def predicted_of(logits: Tensor, targets: Tensor, ignore_index: int, scale: float, softcap: float) -> Tensor:
    """Each row's argmax over its final logits (scaled, capped: the first of equal maxima, a NaN's
    index where one is, as torch.argmax), -1 where its target is ignore_index: Liger-Kernel's
    predicted tokens, int64 (rows,), for 2-D logits; in torch ops, ~16 M logits at a time."""
    if scale == 1.0 and not softcap:  # (the logits' own order: no fp32 copy)
        top = logits.argmax(dim=-1)
    else:
        step = max(1, (1 << 24) // max(1, logits.shape[1]))
        top = torch.cat([_final(logits[start:start + step], scale, softcap).argmax(dim=-1)
                         for start in range(0, logits.shape[0], step)]) if logits.shape[0] else \
            logits.new_empty(0, dtype=torch.long)
    return torch.where(targets == ignore_index, -1, top)


def _final(logits: Tensor, scale: float, softcap: float) -> Tensor:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


# --- the per-row op, gradient over the logits (pyllm.nn's fused output-layer loss) --------------

def _rows_inplace_body(logits: Tensor, targets: Tensor, ignore_index: int, scale: float, softcap: float,
                       label_smoothing: float, z_loss: float, want_grad: bool,
                       grad_rows: Optional[Tensor] = None, stats: Optional[Tensor] = None,
                       token_scaling: bool = False) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2 or not _util.kernel_rows(logits):
        raise ValueError(f"cross_entropy_rows_: logits must be 2-D, rows apart, with a contiguous last dim, got shape "
                         f"{tuple(logits.shape)}, strides {logits.stride()}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_rows_: targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    if grad_rows is not None and grad_rows.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_rows_: grad_rows must have shape ({logits.shape[0]},), got "
                         f"{tuple(grad_rows.shape)}")
    loss = _util.row_losses(logits, logits.shape[0])
    z_part = torch.empty_like(loss)
    cross_entropy_into(logits, targets.contiguous().long(), loss, z_part, logits if want_grad else None, ignore_index,
                       scale, softcap, label_smoothing, z_loss, 1.0,
                       None if grad_rows is None else grad_rows.to(loss.dtype).contiguous(), stats, token_scaling)
    return loss, z_part


_rows_inplace = torch.library.custom_op("pyllm::cross_entropy_rows_",
                                        mutates_args=("logits", "stats"))(_rows_inplace_body)


@_rows_inplace.register_fake
def _(logits, targets, ignore_index, scale, softcap, label_smoothing, z_loss, want_grad, grad_rows=None, stats=None,
      token_scaling=False):
    loss = _util.row_losses(logits, logits.shape[0])
    return loss, torch.empty_like(loss)


def cross_entropy_rows_(logits: Tensor, targets: Tensor, *, ignore_index: int = -100, scale: float = 1.0,
                        softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
                        want_grad: bool = True, grad_rows: Optional[Tensor] = None,
                        stats: Optional[Tensor] = None, token_scaling: bool = False) -> tuple[Tensor, Tensor]:
    """Each row's loss (lse - (1 - e) z_target - e mean(z) + z_loss lse^2, 0 where the target is
    ignore_index) and its z-loss share, both (rows,) fp32 (fp64 for fp64), for 2-D logits (rows, V)
    with a contiguous last dim (logits[i] may sit any stride apart). want_grad: logits are
    overwritten with d(row's loss) / d(logits), in their own dtype (0 on ignored rows), times
    grad_rows[i] (rows,) when given (multiplied in fp32, before the one rounding: a sequence-level
    loss's weight per row, as pyllm.nn.linear_token_logps's backward passes). No autograd: the
    gradient is the output. Arguments as cross_entropy's (softcap 0.0: none), not re-checked.
    stats: None or (rows, 3) contiguous in the losses' dtype, written with token_stats' values
    (entropy, 1.0 where the target is the first argmax, the mean logit) from the same pass.
    token_scaling: each row's loss, z-loss share and gradient times its target's probability, held
    constant (DFT, cross_entropy's)."""
    return _util.call(_rows_inplace_body, _rows_inplace, None, logits, targets, int(ignore_index), float(scale),
                      float(softcap), float(label_smoothing), float(z_loss), bool(want_grad), grad_rows, stats,
                      bool(token_scaling))


# --- the differentiable op: the backward recomputes each row's softmax from the saved logits -------
#
# Rather than writing the gradient in the forward (Liger's way): the backward's incoming gradient
# then multiplies in fp32 before the one rounding to logits' dtype (a 16-bit gradient times a
# 16-bit row weight rounds twice: 2.3x torch's error in fp16 at (7, 37), tests/test_cross_entropy.py),
# the forward writes nothing of (N, V) and keeps only a reference to logits, and the traffic is the
# same (forward: one read; backward: one read and one write, where the other way reads and writes in
# each).

def _cross_entropy_body(logits: Tensor, targets: Tensor, ignore_index: int, scale: float, softcap: float,
                        label_smoothing: float, z_loss: float, token_scaling: bool = False) -> tuple[Tensor, Tensor]:
    """(per-row losses, per-row z-loss shares), (rows,) each, for logits (..., V)."""
    rows = _util.as_rows(logits)
    loss = _util.row_losses(rows, rows.shape[0])
    z_part = torch.empty_like(loss)
    cross_entropy_into(rows, targets.reshape(-1).contiguous().long(), loss, z_part, None, ignore_index, scale, softcap,
                       label_smoothing, z_loss, token_scaling=token_scaling)
    return loss, z_part


_cross_entropy = torch.library.custom_op("pyllm::cross_entropy", mutates_args=())(_cross_entropy_body)


@_cross_entropy.register_fake
def _(logits, targets, ignore_index, scale, softcap, label_smoothing, z_loss, token_scaling=False):
    loss = _util.row_losses(logits, logits.numel() // logits.shape[-1])
    return loss, torch.empty_like(loss)


def _cross_entropy_backward_body(grad_rows: Tensor, logits: Tensor, targets: Tensor, ignore_index: int, scale: float,
                                 softcap: float, label_smoothing: float, z_loss: float,
                                 token_scaling: bool = False) -> Tensor:
    """d(sum of grad_rows * row losses) / d logits, in logits' shape and dtype."""
    rows = _util.as_rows(logits)
    grad = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    loss = _util.row_losses(rows, rows.shape[0])  # recomputed, unused
    cross_entropy_into(rows, targets.reshape(-1).contiguous().long(), loss, None, grad, ignore_index, scale, softcap,
                       label_smoothing, z_loss, 1.0, grad_rows.to(loss.dtype).contiguous(), token_scaling=token_scaling)
    return grad.reshape(logits.shape)


_cross_entropy_backward = torch.library.custom_op("pyllm::cross_entropy_backward",
                                                  mutates_args=())(_cross_entropy_backward_body)


@_cross_entropy_backward.register_fake
def _(grad_rows, logits, targets, ignore_index, scale, softcap, label_smoothing, z_loss, token_scaling=False):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


_util.row_loss_sharding(_cross_entropy, _cross_entropy_backward, 2, 6)  # DTensor: rows on the first dim


# vmap: the vmapped dim first makes more rows of one call.
for _op in (_cross_entropy, _cross_entropy_backward):
    _util.batching_rule(_op, _util.vmap_rows)


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, *args = inputs
    ctx.save_for_backward(logits, targets)
    ctx.mark_non_differentiable(output[1])  # the z-loss share: for the log, its gradient is in the loss's
    ctx.args = args


def _cross_entropy_grad(ctx, grad_loss, grad_z):
    logits, targets = ctx.saved_tensors
    if grad_loss is None:  # only the (non-differentiable) z share was used
        return torch.zeros_like(logits), *([None] * 7)
    grad = _util.call(_cross_entropy_backward_body, torch.ops.pyllm.cross_entropy_backward, None, grad_loss, logits,
                      targets, *ctx.args)
    return grad, *([None] * 7)


_cross_entropy.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)
_CrossEntropyFunction = _util.eager_function(OP, _cross_entropy_body, _cross_entropy_setup, _cross_entropy_grad)


def _weighted(logits, targets, weight, ignore_index, reduction, scale, softcap, label_smoothing, z_loss,
              return_z_loss, token_scaling):
    """cross_entropy with per-class weights: the rows' losses (the kernel's) times their targets'
    weights; the gradient through them."""
    V = logits.shape[-1]
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.shape != (V,):
        raise ValueError(f"{OP}: weight must be a float tensor of shape ({V},) (one per class), got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if weight.device != logits.device:
        raise ValueError(f"{OP}: weight is on {weight.device} but logits on {logits.device}; they must match")
    if label_smoothing or z_loss or return_z_loss:
        raise ValueError(f"{OP}: weight goes without label_smoothing, z_loss and return_z_loss")
    rows = cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none", scale=scale, softcap=softcap,
                         token_scaling=token_scaling)
    wide = targets.long()
    counted = wide != ignore_index
    row_weights = torch.where(counted, weight.to(rows.dtype)[wide.clamp(0, V - 1)], 0.0)  # (ignored rows: 0)
    losses = rows * row_weights
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / row_weights.sum()


@overload
def cross_entropy(logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, scale: float = 1.0,
                  softcap: Optional[float] = None, return_z_loss: Literal[False] = False,
                  token_scaling: bool = False) -> Tensor: ...


@overload
def cross_entropy(logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, scale: float = 1.0,
                  softcap: Optional[float] = None, return_z_loss: Literal[True],
                  token_scaling: bool = False) -> tuple[Tensor, Tensor]: ...


@overload
def cross_entropy(logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, scale: float = 1.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False,
                  token_scaling: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def cross_entropy(logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, scale: float = 1.0,
                  softcap: Optional[float] = None, return_z_loss: bool = False,
                  token_scaling: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """F.cross_entropy(logits, targets, weight, ignore_index=, reduction=, label_smoothing=) over the
    last dim (weight its third positional argument, as torch's; the rest by name), one kernel call for the forward and one for the backward, which recomputes each row's
    softmax from logits (saved by reference: no (N, V) buffer is kept). 16-bit logits are never
    widened to an fp32 (N, V) copy, as autocast's F.cross_entropy does.

    Unlike F.cross_entropy: the classes are the last dim (torch's are dim 1 of (N, C, d...)); class
    indices only (no probability targets), weight= without label smoothing; the loss is fp32 for 16-bit logits
    (torch's is in their dtype); logits are saved, not a log-softmax, so editing them in place
    between the forward and the backward is an error (torch's version counter says so); an ignored
    row's gradient is 0 without its logits being read (torch's is 0 * its softmax: NaN where the
    row holds a NaN or inf, e.g. at padding), as Liger's fused loss gives it.

    Args:
        logits: (..., V). CPU: float32, bfloat16, float16, float64. CUDA: float32, float16, bfloat16.
        targets: (...) class indices (int64, int32, int16 or uint8), ignore_index for rows to skip.
        reduction: "mean" (over the rows not ignored; NaN when all are, as torch's), "sum", "none".
        label_smoothing: the target (1 - e) on the label plus e / V on every class, as torch's.
        z_loss: adds z_loss * logsumexp(z)^2 per counted row (PaLM's auxiliary loss; Liger's
            lse_square_scale).
        scale, softcap: the logits are z = scale * logits, then softcap * tanh(z / softcap) when
            softcap is given (Gemma 2's final_logit_softcapping), in fp32 (fp64 for fp64).
        return_z_loss: -> (loss, the z-loss's share of it, detached, reduced alike).
        token_scaling: each row's loss (z-loss and smoothing included) times its target's
            probability softmax(z)[target], held constant: its gradient too is the row's times
            that probability (DFT, Dynamic Fine-Tuning, arXiv 2508.05629: TRL's SFT loss_type
            "dft", Liger-Kernel's use_token_scaling). "mean" still divides by the counted rows.
        weight: (V,) per-class weights, as F.cross_entropy's: each row's loss times its target's
            weight, "mean" divided by the counted rows' weights summed (not with label_smoothing
            or z_loss, whose weighted forms torch defines otherwise).
    Returns:
        The loss in fp32 (fp64 for fp64 logits), whatever logits' dtype: reduced to a scalar, or
        (...) for "none". Math runs in fp32 (fp64 for fp64). Backward gives logits' gradient.
    Raises:
        TypeError / ValueError for bad arguments (dtype, shapes, devices, out-of-range numbers);
        ValueError (CPU) for a target outside [0, V) that is not ignore_index; on CUDA such a row
        gets a NaN loss instead (checking would cost a sync). A row with a NaN logit, or +-inf as
        its largest logit after the cap (a cap maps +-inf to +-softcap), gets a NaN loss and gradient;
        -inf logits elsewhere (masked classes) get softmax 0, as torch's.
    """
    _check(logits, targets, ignore_index, reduction, label_smoothing, z_loss, scale, softcap)
    if weight is not None:
        return _weighted(logits, targets, weight, ignore_index, reduction, scale, softcap, label_smoothing, z_loss,
                         return_z_loss, bool(token_scaling))
    loss, z_part = _util.call(_cross_entropy_body, _cross_entropy, _CrossEntropyFunction, logits, targets,
                              int(ignore_index), float(scale), float(softcap or 0.0), float(label_smoothing),
                              float(z_loss), bool(token_scaling))
    if reduction == "none":
        if loss.shape != targets.shape:
            loss, z_part = loss.reshape(targets.shape), z_part.reshape(targets.shape)
    elif reduction == "sum":
        loss, z_part = loss.sum(), z_part.sum()
    else:  # (int64: -100 in uint8 targets would wrap to 156, a class, and miscount the mean)
        counted = (targets.long() != ignore_index).sum()
        loss, z_part = loss.sum() / counted, z_part.sum() / counted
    return (loss, z_part.detach()) if return_z_loss else loss


# --- token statistics: no autograd (a metric) -------------------------------------------------------

class TokenStats(NamedTuple):
    """token_stats' output, each of targets' shape: the entropy of the next-token distribution
    (fp32; fp64 for fp64 logits), whether the target is its argmax (bool) and the mean of its final
    logits (as the entropy's dtype)."""
    entropy: Tensor
    is_top1: Tensor
    mean_logit: Tensor

    @classmethod
    def of_rows(cls, stats: Tensor, shape) -> "TokenStats":
        """From the kernel's per-row statistics (rows, 3), each of them reshaped to shape."""
        return cls(stats[:, 0].reshape(shape), stats[:, 1].reshape(shape) > 0, stats[:, 2].reshape(shape))


def _token_stats_body(logits: Tensor, targets: Tensor, ignore_index: int, scale: float, softcap: float) -> Tensor:
    rows = _util.as_rows(logits)
    loss = _util.row_losses(rows, rows.shape[0])  # (the kernel's losses: unused)
    stats = loss.new_empty(rows.shape[0], STATS)
    cross_entropy_into(rows, targets.reshape(-1).contiguous().long(), loss, None, None, ignore_index, scale, softcap,
                       0.0, 0.0, stats=stats)
    return stats


_token_stats = torch.library.custom_op("pyllm::token_stats", mutates_args=())(_token_stats_body)


@_token_stats.register_fake
def _(logits, targets, ignore_index, scale, softcap):
    return _util.row_losses(logits, logits.numel() // logits.shape[-1]).new_empty(
        logits.numel() // logits.shape[-1], STATS)


@_util.batching_rule(_token_stats)
def _(op, info, in_dims, *args):  # vmap: the vmapped dim first makes more rows of one call
    return op(*_util.batched_first(info, in_dims, args, expand=True)).view(info.batch_size, -1, STATS), 0


# DTensor: rows on the first dim (as cross_entropy's), (rows, 3) out
_util.sharding_rule(_token_stats)(lambda logits, *args: _util.rows_rule(2, 1, min(logits.ndim, 2), extra_inputs=3))


def token_stats(logits: Tensor, targets: Tensor, *, ignore_index: int = -100, scale: float = 1.0,
                softcap: Optional[float] = None) -> TokenStats:
    """TRL's SFT metrics per token, from logits (..., V) and targets (...) as cross_entropy takes
    them: TokenStats(entropy, is_top1, mean_logit), each of targets' shape, 0 / False where the
    target is ignore_index. entropy: -sum_j p_j log p_j of p = softmax(z), z the logits times scale,
    capped as cross_entropy's (TRL's entropy); is_top1: whether the target is argmax(z), the first
    of equal maxima as torch.argmax (TRL's is_top1; their mean over the counted targets is its
    mean_token_accuracy); mean_logit: the mean of z over the vocabulary (TRL's mean_logits, whose
    mean over a DPO pair's chosen reply's tokens is its logits/chosen). A row whose loss would be
    NaN (a NaN logit, +-inf as its largest) gets a NaN entropy and False. No gradient. One read of the logits by the cross-entropy kernel on the
    CPU (in fp32, fp64 for fp64); torch ops elsewhere (CUDA, with or without pyllm's kernels)."""
    kernel = isinstance(logits, Tensor) and (logits.is_cpu or logits.is_meta)
    _check(logits, targets, ignore_index, "sum", 0.0, 0.0, scale, softcap, kernel)
    with torch.no_grad():
        if kernel:
            stats = _util.call(_token_stats_body, _token_stats, None, logits.detach(), targets, int(ignore_index),
                               float(scale), float(softcap or 0.0))
        else:
            rows = logits.detach().reshape(-1, logits.shape[-1])
            stats = rows.new_empty(rows.shape[0], 3, dtype=torch.promote_types(logits.dtype, torch.float32))
            _stats_in_torch(rows, targets.reshape(-1).long(), int(ignore_index), float(scale), float(softcap or 0.0),
                            stats)
    return TokenStats.of_rows(stats, targets.shape)
