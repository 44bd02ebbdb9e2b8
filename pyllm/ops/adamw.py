"""Fused multi-tensor AdamW kernels: the launchers behind :class:`pyllm.optim.AdamW`.

Kernels: csrc/cpu/adamw.cpp, csrc/cuda/adamw.cu. Two passes per step, each one call per group of
tensors (not one per tensor): the grad sum-of-squares pass (global norm and inf/nan check in one
read of the grads) and the update pass (unscale + clip + AdamW + 16-bit copy).

These are plain launchers, not ``torch.library.custom_op``s: the optimizer step runs outside
autograd, and under torch.compile the usual pattern compiles the model and calls ``step()``
eagerly. A custom op would also have to spell out every mutated tensor of a group as a list
argument, where the kernels take one pointer table.

A group of tensors goes to the kernels as a table: an int64 CPU tensor of shape (7, n) whose rows
are the data pointers of param, grad, fp32 master (0 when the param is its own master), exp_avg,
exp_avg_sq, the fp32 step scalar, and the numel. The CUDA launcher reads the table on the host and
puts the pointers in the kernel arguments (no host-to-device copy).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyllm import _C
from pyllm.ops import _util

OP = "adamw"
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
# Elements per chunk of the CUDA grad-norm pass; must match kChunk in csrc/cuda/adamw.cu.
CUDA_CHUNK = 1 << 16


def build_table(params, grads, masters, exp_avgs, exp_avg_sqs, steps) -> Tensor:
    """The (7, n) int64 pointer table of one group of tensors (see the module docstring)."""
    rows = [
        [p.data_ptr() for p in params],
        [g.data_ptr() for g in grads],
        [m.data_ptr() if m is not None else 0 for m in masters],
        [m.data_ptr() for m in exp_avgs],
        [v.data_ptr() for v in exp_avg_sqs],
        [s.data_ptr() for s in steps],
        [p.numel() for p in params],
    ]
    return torch.tensor(rows, dtype=torch.int64)


def grad_sumsq_(grads: list[Tensor], table: Tensor, sumsq: Tensor) -> None:
    """sumsq (a float64 scalar on the grads' device) += sum of squares of all grads.

    Deterministic: the same bits for any thread count (CPU) or launch split (CUDA).
    """
    n = table.shape[1]
    if n == 0:
        return
    dtype = _util.dtype_code(grads[0])
    if sumsq.is_cuda:
        _util.check_backend(OP, sumsq)  # direct callers skip AdamW's checks
        chunks = sum((g.numel() + CUDA_CHUNK - 1) // CUDA_CHUNK for g in grads)
        partials = torch.empty(max(chunks, 1), dtype=torch.float64, device=sumsq.device)
        _C.adamw_grad_sumsq_cuda(table.data_ptr(), n, dtype, partials.data_ptr(), partials.numel(),
                                 sumsq.data_ptr(), sumsq.device.index, _util.stream_of(sumsq))
    else:
        _util.init_cpu_threads()
        _C.adamw_grad_sumsq_cpu(table.data_ptr(), n, dtype, sumsq.data_ptr())


def step_(params: list[Tensor], table: Tensor, *, has_master: bool, lr: float, beta1: float, beta2: float,
          eps: float, weight_decay: float, sumsq: Tensor | None, loss_scale: Tensor | None,
          max_grad_norm: float | None, stochastic_rounding: bool, seed: int) -> None:
    """One fused AdamW update of a group of same-dtype tensors described by `table`.

    sumsq: the float64 sum of squares of all grads (of the whole model, already summed) or None;
    when it is not finite nothing is written. loss_scale: a float32 scalar the grads are divided
    by, or None. max_grad_norm: clip the (unscaled) global norm to this, or None. The step scalars
    in the table must already hold this step's count.
    """
    n = table.shape[1]
    if n == 0:
        return
    args = (table.data_ptr(), n, _util.dtype_code(params[0]), has_master, float(lr), float(beta1),
            float(beta2), float(eps), float(weight_decay),
            sumsq.data_ptr() if sumsq is not None else 0,
            loss_scale.data_ptr() if loss_scale is not None else 0,
            float(max_grad_norm) if max_grad_norm is not None else -1.0,
            bool(stochastic_rounding), int(seed) & ((1 << 64) - 1))
    if params[0].is_cuda:
        _util.check_backend(OP, params[0])
        _C.adamw_step_cuda(*args, params[0].device.index, _util.stream_of(params[0]))
    else:
        _util.init_cpu_threads()
        _C.adamw_step_cpu(*args)
