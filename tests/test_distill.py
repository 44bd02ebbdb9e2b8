"""Distillation: the generalized JSD of GKD, its fused linear form, the model's and the trainer's use of it."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyllm

from pyllm import _C, data
from pyllm import train as trainer
from pyllm.model import check_documents
from pyllm.model import LLM, ModelConfig
from pyllm.nn import distill_divergence, linear_distill
from pyllm.ops import _util
from pyllm.ops import distill as distill_ops
from pyllm.train import TrainConfig

from helpers import CPU_AND_CUDA, assert_compiles_like_eager, poisoned, rel_err, shaped_logits, tolerance
from test_train import TINY, chat_dir, config, data_dir, losses  # noqa: F401  (fixtures)


def trl_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss per token, written out with F.kl_div (KL(target || input))."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    m = torch.logsumexp(torch.stack([s + np.log(1 - beta), t + np.log(beta)]), dim=0)
    return (beta * F.kl_div(m, t, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_is_trls(beta, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 50, dtype=torch.float64) * 3, torch.randn(2, 7, 50, dtype=torch.float64) * 3
    got = distill_divergence(student, teacher, beta, temperature)
    assert got.shape == (2, 7) and (got >= 0).all()
    assert rel_err(got, trl_jsd(student, teacher, beta, temperature)) < 1e-13
    assert distill_divergence(student, student, beta, temperature).abs().max() < 1e-13  # 0 for the same model


def reference(x, w, xt, wt, beta, temperature, scale=1.0, softcap=None, teacher_scale=1.0, teacher_softcap=None):
    return distill_divergence(shaped_logits(x @ w.t(), scale, softcap),
                              shaped_logits(xt @ wt.t(), teacher_scale, teacher_softcap),
                              beta, temperature).sum()


# Each side's logits as is, scaled (Granite's), capped (Gemma 2's) at values these logits reach.
SHAPES = {"plain": {}, "student-capped": dict(softcap=2.0, teacher_scale=0.5),
          "teacher-capped": dict(scale=1.5, teacher_softcap=3.0),
          "both-capped": dict(softcap=4.0, teacher_scale=2.0, teacher_softcap=2.5)}


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("chunk_rows", [1, 7, None])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["kernel", "torch ops"])
def test_linear_distill_float64(beta, chunk_rows, shape, path, monkeypatch):
    # The fused form (gradients in the forward, chunk by chunk) = the divergence of the whole logits
    # and autograd's gradients, in float64, at two temperatures, with either model's logits scaled
    # and capped; the teacher gets no gradient. Each chunk by the CPU kernel, and by the torch ops
    # CUDA tensors take.
    if path == "torch ops":
        monkeypatch.setattr(distill_ops, "takes", lambda logits: False)
    torch.manual_seed(0)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(300, 16, dtype=torch.float64) * 0.4).requires_grad_()
    xt, wt = torch.randn(40, 24, dtype=torch.float64), torch.randn(300, 24, dtype=torch.float64) * 0.4
    call = SHAPES[shape]
    for temperature in (1.0, 1.7):
        want = reference(x, w, xt, wt, beta, temperature, **call)
        want_grads = torch.autograd.grad(want, [x, w])
        got = linear_distill(x, w, xt, wt, beta, temperature, chunk_rows, **call)
        assert rel_err(got, want) < 1e-13
        for g, ref in zip(torch.autograd.grad(got, [x, w]), want_grads):
            assert rel_err(g, ref) < 1e-12


@pytest.mark.parametrize("device", CPU_AND_CUDA + [pytest.param("cuda kernel", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("shape", ["plain", "both-capped"])
def test_linear_distill_within_twice_torchs_error(device, dtype, beta, shape, monkeypatch):
    # A loss is one number: its error against float64 is one sample of a few roundings, torch's too
    # (fp32, beta 0.5, seed 0 on a 2-core EPYC: ours 2.07 ulps against torch's lucky 0.79, where on
    # other seeds ours was the smaller). So the losses of four draws are judged together, as one
    # vector; the gradients draw by draw. On CUDA each chunk by torch ops, and by the kernel when asked.
    if device == "cuda kernel":
        monkeypatch.setenv(distill_ops.CUDA_IN_FUSED_LOSS_ENV, "1")
        device = "cuda"
    else:
        monkeypatch.delenv(distill_ops.CUDA_IN_FUSED_LOSS_ENV, raising=False)
    losses = {"ours": [], "torch": [], "exact": []}
    for seed in range(4):
        torch.manual_seed(seed)
        x64, w64 = torch.randn(200, 64, dtype=torch.float64), torch.randn(1000, 64, dtype=torch.float64) * 0.2
        xt64, wt64 = torch.randn(200, 48, dtype=torch.float64), torch.randn(1000, 48, dtype=torch.float64) * 0.2

        def run(fn, dtype, device="cpu"):
            x, w = (t.to(device, dtype, copy=True).requires_grad_() for t in (x64, w64))
            loss = fn(x, w, xt64.to(device, dtype), wt64.to(device, dtype))
            loss.backward()
            return loss.detach().cpu(), x.grad, w.grad

        call = SHAPES[shape]
        exact = run(lambda x, w, xt, wt: reference(x, w, xt, wt, beta, 2.0, **call), torch.float64)
        theirs = run(lambda x, w, xt, wt: reference(x, w, xt, wt, beta, 2.0, **call), dtype, device)
        ours = run(lambda x, w, xt, wt: linear_distill(x, w, xt, wt, beta, 2.0, chunk_rows=37, **call), dtype, device)
        for name, got, torch_value, want in zip(("dx", "dw"), ours[1:], theirs[1:], exact[1:]):
            assert rel_err(got, want) <= tolerance(torch_value, want), (name, seed)
        for key, run_values in (("ours", ours), ("torch", theirs), ("exact", exact)):
            losses[key].append(run_values[0])
    got, torch_value, want = (torch.stack(losses[key]) for key in ("ours", "torch", "exact"))
    assert rel_err(got, want) <= tolerance(torch_value, want), "loss"


def test_bad_arguments():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="teacher logits must be a torch.Tensor, got float"):  # (AttributeError before)
        pyllm.generalized_jsd(torch.randn(2, 5), 3.0)
    with pytest.raises(ValueError, match="beta must be in"):
        linear_distill(x, w, x, w, beta=1.5)
    with pytest.raises(ValueError, match="vocabularies must match"):
        linear_distill(x, w, x, torch.randn(11, 8))
    with pytest.raises(ValueError, match=r"positions .* must match, got x \(4, 8\) / x_teacher \(2, 2, 8\)"):
        linear_distill(x, w, x.view(2, 2, 8), w)  # the same rows, laid out otherwise: not taken as the same
    with pytest.raises(ValueError, match=r"linear_distill \(the teacher's\): scale must be positive"):
        linear_distill(x, w, x, w, teacher_scale=0.0)
    with pytest.raises(ValueError, match="softcap None or positive and finite, got scale=1.0, softcap=-1.0"):
        linear_distill(x, w, x, w, softcap=-1.0)


def test_linear_distill_takes_leading_dims():
    # (B, T, C) hidden states, as a model's last layer gives them: the rows of both models in order
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    xt, wt = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(50, 24, dtype=torch.float64)
    got = linear_distill(x, w, xt, wt, 0.5, 1.5, chunk_rows=4)
    want = linear_distill(x.reshape(15, 16), w, xt.reshape(15, 24), wt, 0.5, 1.5, chunk_rows=4)
    assert rel_err(got, reference(x, w, xt, wt, 0.5, 1.5)) < 1e-13 and torch.equal(got, want)
    for g, ref in zip(torch.autograd.grad(got, [x, w]), torch.autograd.grad(reference(x, w, xt, wt, 0.5, 1.5), [x, w])):
        assert g.shape == ref.shape and rel_err(g, ref) < 1e-12


# --- the row kernel (csrc/cpu/distill.cpp) that linear_distill runs on each chunk ------------------

def kernel_case(rows, vocab, dtype, seed=0, device="cpu"):
    """Student and teacher logits (rows, V) in dtype, spread as an output layer's (std 3)."""
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(device, dtype) for _ in range(2))


def divergence_and_grad(student, teacher, beta, temperature, scale=1.0, softcap=None, teacher_scale=1.0,
                        teacher_softcap=None, compute=None):
    """distill_divergence per row and its gradient for the student's logits, by autograd, computed in
    `compute` (float64: the reference) or, by default, as torch does in the inputs' dtype."""
    s = student.to(compute or student.dtype).detach().requires_grad_()
    t = teacher.to(compute or teacher.dtype)
    rows = distill_divergence(shaped_logits(s, scale, softcap), shaped_logits(t, teacher_scale, teacher_softcap),
                              beta, temperature)
    return rows.detach(), torch.autograd.grad(rows.sum(), s)[0]


KERNEL_SHAPES = {"plain": {}, "student-capped": dict(softcap=4.0, teacher_scale=0.7),
                 "both-capped": dict(scale=1.3, softcap=5.0, teacher_softcap=3.0)}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("vocab", [1001, 8200])
def test_row_kernel_within_twice_torchs_error(device, dtype, beta, shape, vocab):
    # Each row's divergence and the gradient written over the student's logits, against float64 on
    # the same (rounded) inputs, within twice torch's error from those inputs (fp32 math for 16-bit,
    # its gradient rounded once), at a temperature that is not a power of two; an odd width (CUDA's
    # scalar loads) and one of whole 16-byte packs.
    student, teacher = kernel_case(24, vocab, dtype, device=device)
    kw = KERNEL_SHAPES[shape]
    want, want_grad = divergence_and_grad(student, teacher, beta, 1.7, **kw, compute=torch.float64)
    theirs, their_grad = divergence_and_grad(student, teacher, beta, 1.7, **kw)
    grad = student.clone()
    got = distill_ops.distill_rows_(grad, teacher, beta=beta, temperature=1.7, **kw)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(got, want) <= tolerance(theirs, want)
    assert rel_err(grad, want_grad) <= tolerance(their_grad, want_grad)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_row_kernel_beta_near_its_ends_is_the_mixture(device):
    # The mixture tends to 0 at either end, not to the one-sided KLs: beta 1 - 1e-9 (1 in fp32) must
    # not take the reverse KL's path, and 0.999's (1 - beta) weight must not round through fp32.
    student, teacher = kernel_case(8, 4096, torch.float32, seed=9, device=device)
    for beta, end in ((1 - 1e-9, 1.0), (1e-9, 0.0)):
        near = distill_ops.distill_rows_(student.clone(), teacher, beta=beta, want_grad=False)
        at_end = distill_ops.distill_rows_(student.clone(), teacher, beta=end, want_grad=False)
        assert (near.abs() < 1e-6 * at_end).all(), (beta, near, at_end)
    want, want_grad = divergence_and_grad(student.cpu(), teacher.cpu(), 0.999, 1.0, compute=torch.float64)
    theirs, their_grad = divergence_and_grad(student, teacher, 0.999, 1.0)
    grad = student.clone()
    got = distill_ops.distill_rows_(grad, teacher, beta=0.999)
    assert rel_err(got, want) <= tolerance(theirs, want)
    assert rel_err(grad, want_grad) <= tolerance(their_grad, want_grad)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_row_kernel_large_logits(device, beta):
    # Logits of std 30 around 50 (an untrained or uncapped head): the student's softmax formed from
    # the shifted logits, not from z - lse with lse rounded at their magnitude (3.5x torch's gradient
    # error at beta 0 before). Numpy scalars pass as numbers.
    g = torch.Generator().manual_seed(11)
    student, teacher = ((torch.randn(32, 1000, generator=g, dtype=torch.float64) * 30 + 50).float().to(device)
                        for _ in range(2))
    want, want_grad = divergence_and_grad(student.cpu(), teacher.cpu(), beta, 1.0, compute=torch.float64)
    theirs, their_grad = divergence_and_grad(student, teacher, beta, 1.0)
    grad = student.clone()
    got = distill_ops.distill_rows_(grad, teacher, beta=np.float32(beta), temperature=np.float64(1.0))
    assert rel_err(got, want) <= tolerance(theirs, want)
    assert rel_err(grad, want_grad) <= tolerance(their_grad, want_grad)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_row_kernel_float64_is_the_reference(beta):
    student, teacher = kernel_case(5, 8200, torch.float64, seed=1)
    kw = KERNEL_SHAPES["both-capped"]
    want, want_grad = divergence_and_grad(student, teacher, beta, 2.0, **kw)
    grad = student.clone()
    got = distill_ops.distill_rows_(grad, teacher, beta=beta, temperature=2.0, **kw)
    assert got.dtype == torch.float64
    assert rel_err(got, want) < 1e-13 and rel_err(grad, want_grad) < 1e-13


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_row_kernel_strides_outputs_and_row_weights(device, beta):
    # Student rows inside a wider buffer: the gradient lands over them, the columns past V untouched;
    # want_grad=False leaves them as they were; distill_into's poisoned outputs all written, the
    # gradient times grad_scale and grad_rows before its one rounding; a teacher row repeated
    # (stride 0, as expand gives) is the same as its copies; rows of weight 0 get zeros, in place too,
    # with the loss of the logits they had.
    rows, vocab = 6, 3000
    student, teacher = kernel_case(rows, vocab + 5, torch.bfloat16, seed=2, device=device)
    inside = student[:, :vocab]
    padding, original = student[:, vocab:].clone(), inside.clone()
    teacher = teacher[:, :vocab].contiguous()
    want, want_grad = divergence_and_grad(original, teacher, beta, 2.0, compute=torch.float64)
    their_grad = divergence_and_grad(original, teacher, beta, 2.0)[1]
    got = distill_ops.distill_rows_(inside, teacher, beta=beta, temperature=2.0)
    assert torch.equal(student[:, vocab:], padding)
    assert rel_err(inside, want_grad) <= tolerance(their_grad, want_grad)
    fresh = original.clone()
    assert torch.equal(distill_ops.distill_rows_(fresh, teacher, beta=beta, temperature=2.0, want_grad=False), got)
    assert torch.equal(fresh, original)
    loss, grad = poisoned((rows,), torch.float32, device), poisoned((rows, vocab), torch.bfloat16, device)
    weights = torch.rand(rows, device=device) + 0.5
    distill_ops.distill_into(original, teacher, loss, grad, beta, 2.0, 1.0, 0.0, 1.0, 0.0, grad_scale=-1.5,
                             grad_rows=weights)
    assert torch.equal(loss, got)
    weighted = want_grad * (-1.5 * weights.double())[:, None]
    # torch's own: its fp32 gradient times the factors, rounded once (the bound had been twice ours + 2^-9)
    grad32 = divergence_and_grad(original.float(), teacher.float(), beta, 2.0)[1]
    assert rel_err(grad, weighted) <= tolerance((grad32 * (-1.5 * weights)[:, None]).to(grad.dtype), weighted)
    # grad_scale alone; capped logits without a gradient (no tanh row kept) give the loss of those with
    distill_ops.distill_into(original, teacher, loss, grad, beta, 2.0, 1.0, 0.0, 1.0, 0.0, grad_scale=0.75)
    assert rel_err(grad, want_grad * 0.75) <= tolerance((grad32 * 0.75).to(grad.dtype), want_grad * 0.75)
    capped = dict(softcap=4.0, teacher_softcap=3.0)
    assert torch.equal(distill_ops.distill_rows_(original.clone(), teacher, beta=beta, temperature=2.0, **capped),
                       distill_ops.distill_rows_(original.clone(), teacher, beta=beta, temperature=2.0,
                                                 want_grad=False, **capped))
    one_row = teacher[:1].expand(rows, vocab)
    assert torch.equal(distill_ops.distill_rows_(original.clone(), one_row, beta=beta, temperature=2.0),
                       distill_ops.distill_rows_(original.clone(), one_row.contiguous(), beta=beta, temperature=2.0))
    assert distill_ops.distill_rows_(original[:0].clone(), teacher[:0], beta=beta).shape == (0,)
    weights[1::2] = 0
    in_place = original.clone()
    distill_ops.distill_into(in_place, teacher, loss, in_place, beta, 2.0, 1.0, 0.0, 1.0, 0.0, grad_rows=weights)
    assert torch.equal(loss, got)
    assert (in_place[1::2] == 0).all()
    assert rel_err(in_place[0::2], want_grad[0::2] * weights[0::2, None].double()) <= tolerance(
        (grad32[0::2] * weights[0::2, None]).to(in_place.dtype), want_grad[0::2] * weights[0::2, None].double())


def masked_reference(student, teacher, beta, temperature):
    """Per-row divergences and their gradient for the student's logits in float64 by the closed forms,
    a term of weight 0 counting 0 (torch's formula gives 0 * inf = NaN at a -inf logit)."""
    s = torch.log_softmax(student.double() / temperature, -1)
    t = torch.log_softmax(teacher.double() / temperature, -1)
    p, q = s.exp(), t.exp()

    def weighted(w, v):
        return torch.where(w > 0, w * v, torch.zeros_like(v))

    if beta == 0:
        return weighted(q, t - s).sum(-1), (p - q) / temperature
    if beta == 1:
        kl = weighted(p, s - t).sum(-1, keepdim=True)
        return kl[:, 0], weighted(p, s - t - kl) / temperature
    m = torch.logaddexp(s + np.log(1 - beta), t + np.log(beta))
    kl = weighted(p, s - m).sum(-1, keepdim=True)
    loss = beta * weighted(q, t - m).sum(-1) + (1 - beta) * kl[:, 0]
    return loss, (1 - beta) * weighted(p, s - m - kl) / temperature


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_row_kernel_masked_classes_and_non_finite_rows(device, beta):
    # Classes masked (-inf) on both sides (row 0), on the teacher's alone (row 1: a padded
    # vocabulary), on the student's alone (row 2): a term of probability 0 counts 0 and gets a zero
    # gradient; where the other side has mass there the divergence is truly infinite (beta 0 with the
    # student masked, beta 1 with the teacher). A NaN logit, or +inf as the largest, on either side,
    # gives that row a NaN divergence and gradient (the student's cap takes its +inf to the cap: a
    # number).
    student, teacher = kernel_case(7, 64, torch.float32, seed=3)
    student[0, :10], teacher[0, :10] = float("-inf"), float("-inf")
    teacher[1, :10], student[2, :10] = float("-inf"), float("-inf")
    student[3, 5], teacher[4, 7], student[5, 9], teacher[6, 1] = float("nan"), float("nan"), float("inf"), float("inf")
    infinite = {0.0: 2, 1.0: 1}.get(beta)
    want, want_grad = masked_reference(student[:3], teacher[:3], beta, 1.5)
    student, teacher = student.to(device), teacher.to(device)
    for softcap in (None, 8.0):
        grad = student.clone()
        got = distill_ops.distill_rows_(grad, teacher, beta=beta, temperature=1.5, softcap=softcap)
        nan_rows = [3, 4, 6] if softcap else [3, 4, 5, 6]
        assert torch.isnan(got[nan_rows]).all() and torch.isnan(grad[nan_rows]).all()
        if softcap:
            assert torch.isfinite(got[5]) and torch.isfinite(grad[5]).all()
            continue
        for row in range(3):
            if row == infinite:
                assert got[row] == float("inf")
                continue
            torch.testing.assert_close(got[row].double().cpu(), want[row], rtol=1e-5, atol=0)
            torch.testing.assert_close(grad[row].double().cpu(), want_grad[row], rtol=1e-5, atol=1e-7)
        # p = 0 there; beta 0's gradient p - q is -q where only the student masks
        assert (grad[0, :10] == 0).all() and (beta == 0 or (grad[2, :10] == 0).all())


def test_row_kernel_bad_arguments():
    student, teacher = kernel_case(3, 10, torch.float32)
    with pytest.raises(TypeError, match="teacher has dtype torch.float64 but student has torch.float32"):
        distill_ops.distill_rows_(student, teacher.double())
    with pytest.raises(ValueError, match=r"teacher logits must have the student's shape \(3, 10\)"):
        distill_ops.distill_rows_(student, teacher[:, :9])
    with pytest.raises(ValueError, match="student logits must be 2-D"):
        distill_ops.distill_rows_(student.t(), teacher.t())
    with pytest.raises(ValueError, match="beta must be in"):
        distill_ops.distill_rows_(student, teacher, beta=-0.1)
    with pytest.raises(ValueError, match="temperature > 0"):
        distill_ops.distill_rows_(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match=r"distill \(the teacher's\): softcap must be None or positive"):
        distill_ops.distill_rows_(student, teacher, teacher_softcap=-2.0)
    with pytest.raises(ValueError, match="softcap 1e-46 rounds to 0 in fp32, the math type of float32 logits"):
        distill_ops.distill_rows_(student, teacher, teacher_softcap=1e-46)
    with pytest.raises(TypeError, match="expected one of float32, bfloat16, float16, float64"):
        distill_ops.distill_rows_(student.int(), teacher.int())
    with pytest.raises(ValueError, match="teacher logits share memory with the student's"):
        distill_ops.distill_rows_(student, student[:1].expand(3, 10))
    with pytest.raises(ValueError, match="V >= 1"):
        distill_ops.distill_rows_(student[:, :0], teacher[:, :0])
    # the C++ side checks again: rows that overlap, a beta outside [0, 1]
    loss = torch.empty(3)
    with pytest.raises(ValueError, match="row strides must be >= vocab"):
        _C.distill_cpu(student.data_ptr(), teacher.data_ptr(), loss.data_ptr(), 0, 0, 3, 10, 5, 10, 10, 1.0, 0.0,
                       1.0, 0.0, 1.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="beta must be in"):
        _C.distill_cpu(student.data_ptr(), teacher.data_ptr(), loss.data_ptr(), 0, 0, 3, 10, 10, 10, 10, 1.0, 0.0,
                       1.0, 0.0, 1.0, 1.5, 1.0, 0)


def test_cuda_launch_without_cuda_kernels_raises(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32, shape=(2, 4),
                           data_ptr=lambda: 256, stride=lambda dim: 4)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        rows = SimpleNamespace(numel=lambda: 2, data_ptr=lambda: 512)  # the loss: one per row
        distill_ops.distill_into(fake, fake, rows, None, 0.5, 1.0, 1.0, 0.0, 1.0, 0.0)


def test_linear_distill_takes_the_cuda_kernel_only_when_asked(monkeypatch):
    # Until it has run on a GPU; the CPU's always; never fp64 on CUDA (no kernel).
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_util, "_runs_on", {0: True})  # (an sm_80+ GPU 0, without one here)
    monkeypatch.delenv(distill_ops.CUDA_IN_FUSED_LOSS_ENV, raising=False)

    def logits(dtype, cuda):
        return SimpleNamespace(is_cpu=not cuda, is_cuda=cuda, dtype=dtype, get_device=lambda: 0)

    assert distill_ops.takes(logits(torch.bfloat16, False)) and distill_ops.takes(logits(torch.float64, False))
    assert not distill_ops.takes(logits(torch.bfloat16, True))
    monkeypatch.setenv(distill_ops.CUDA_IN_FUSED_LOSS_ENV, "1")
    assert distill_ops.takes(logits(torch.bfloat16, True)) and not distill_ops.takes(logits(torch.float64, True))
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    assert not distill_ops.takes(logits(torch.float32, True))


@pytest.mark.skipif(not hasattr(_C, "distill_cuda"), reason="built without CUDA kernels")
def test_cuda_launcher_rechecks_its_arguments_before_the_gpu():
    # the C++ launcher's checks come before any CUDA call, so they answer on a machine without a GPU
    with pytest.raises(ValueError, match="beta must be in"):
        _C.distill_cuda(256, 512, 768, 0, 0, 3, 10, 10, 10, 10, 1.0, 0.0, 1.0, 0.0, 1.0, 1.5, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.distill_cuda(0, 512, 768, 0, 0, 3, 10, 10, 10, 10, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0, 0, 0)


def test_row_kernel_opcheck():
    student, teacher = kernel_case(4, 9, torch.float32)
    for want_grad in (False, True):
        torch.library.opcheck(torch.ops.pyllm.distill_rows_.default,
                              (student.clone(), teacher, 0.5, 2.0, 1.0, 3.0, 1.5, 0.0, want_grad))


# --- pyllm.generalized_jsd: the differentiable op ----------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, "mask", "labels"])
def test_generalized_jsd_is_trls_in_float64(beta, reduction, masked):
    # TRL's generalized_jsd_loss per token (batchmean: over the tokens its labels keep, all of them
    # without labels), through the op and its backward, at a temperature that is not a power of two;
    # logits not contiguous (a (B, V, T) tensor's transpose), a prompt masked; a teacher that asks
    # for a gradient gets none.
    student, teacher = (t.view(2, 7, 300).transpose(1, 2).contiguous().transpose(1, 2)
                        for t in kernel_case(14, 300, torch.float64, seed=4))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    teacher = teacher.clone().requires_grad_()
    x = student.clone().requires_grad_()
    labels = torch.randint(0, 300, (2, 7)).masked_fill(~mask, -100)
    got = pyllm.generalized_jsd(x, teacher, beta=beta, temperature=1.7, reduction=reduction,
                                mask=mask if masked == "mask" else None, labels=labels if masked == "labels" else None)
    y = student.clone().requires_grad_()
    kept = mask if masked else torch.ones_like(mask)
    per_token = trl_jsd(y, teacher.detach(), beta, 1.7) * kept
    want = {"batchmean": per_token.sum() / (kept.sum() if masked else 2), "sum": per_token.sum(), "none": per_token,
            "mean": per_token.sum() / (kept.sum() * 300)}[reduction]
    assert got.shape == want.shape and got.dtype == torch.float64
    assert rel_err(got, want) < 1e-13
    dout = torch.rand(want.shape, dtype=torch.float64) + 0.5
    grad_x, grad_teacher = torch.autograd.grad(got, [x, teacher], dout, allow_unused=True)
    assert rel_err(grad_x, torch.autograd.grad(want, y, dout)[0]) < 1e-12
    assert grad_teacher is None


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_generalized_jsd_masked_rows_get_zero_gradient(device):
    # A masked row's logits NaN (or all -inf): the loss and the gradient of the other rows as without
    # it, the row's own gradient zeros.
    student, teacher = kernel_case(4, 50, torch.float32, seed=8, device=device)
    student[1] = float("nan")
    teacher[2] = float("-inf")
    mask = torch.tensor([True, False, False, True], device=device)
    x = student.clone().requires_grad_()
    loss = pyllm.generalized_jsd(x, teacher, beta=0.5, temperature=2.0, mask=mask)
    loss.backward()
    kept = student[mask].clone().requires_grad_()
    want = pyllm.generalized_jsd(kept, teacher[mask], beta=0.5, temperature=2.0)
    want.backward()
    assert torch.equal(loss.detach(), want.detach())
    assert (x.grad[~mask] == 0).all() and torch.equal(x.grad[mask], kept.grad)
    assert torch.isnan(pyllm.generalized_jsd(student[:0], teacher[:0], reduction="mean"))  # torch's mean of nothing
    assert pyllm.generalized_jsd(student[:0], teacher[:0]).item() == 0.0  # TRL's batchmean: over at least 1


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_generalized_jsd_within_twice_torchs_error(device, dtype, beta):
    # Scaled and capped logits (Gemma 2's student, Granite's teacher); the incoming gradient per row
    # multiplied in fp32 before the one rounding to the student's dtype.
    student, teacher = (t.view(3, 8, 1001) for t in kernel_case(24, 1001, dtype, seed=5, device=device))
    kw = dict(scale=1.3, softcap=5.0, teacher_scale=0.7)
    dout = torch.rand(3, 8, device=device) + 0.5

    def run(fn, compute=None):
        x = student.to(compute or dtype).detach().requires_grad_()
        rows = fn(x, teacher.to(compute or dtype))
        return rows.detach(), torch.autograd.grad(rows, x, dout.to(rows.dtype))[0]

    def reference(x, t):
        return distill_divergence(shaped_logits(x, 1.3, 5.0), shaped_logits(t, 0.7), beta, 2.0)

    want = run(reference, torch.float64)
    theirs = run(reference)
    ours = run(lambda x, t: pyllm.generalized_jsd(x, t, beta=beta, temperature=2.0, reduction="none", **kw))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    for got, torch_value, exact in zip(ours, theirs, want):
        assert rel_err(got, exact) <= tolerance(torch_value, exact)


def test_generalized_jsd_gradcheck_opcheck_and_compile():
    student, teacher = kernel_case(5, 11, torch.float64, seed=6)
    x = student.clone().requires_grad_()
    for beta in (0.0, 0.3, 1.0):
        assert torch.autograd.gradcheck(
            lambda a: pyllm.generalized_jsd(a, teacher, beta=beta, temperature=1.5, softcap=4.0, reduction="none"), (x,))
    s32, t32 = kernel_case(4, 9, torch.float32, seed=7)
    for requires_grad in (False, True):
        torch.library.opcheck(torch.ops.pyllm.distill.default,
                              (s32.clone().requires_grad_(requires_grad), t32, 0.5, 2.0, 1.0, 3.0, 1.5, 0.0))
    torch.library.opcheck(torch.ops.pyllm.distill_backward.default,
                          (torch.rand(4) + 0.5, s32, t32, 0.5, 2.0, 1.0, 3.0, 1.5, 0.0))
    assert_compiles_like_eager(lambda a: pyllm.generalized_jsd(a, t32, beta=0.5, temperature=2.0), s32.clone().requires_grad_())


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_generalized_jsd_called_as_trls_gives_its_loss(reduction, with_labels):
    """TRL's own generalized_jsd_loss, called the way GKDTrainer calls it (positional labels, its
    reductions and num_items_in_batch), in float64: the same loss and gradient."""
    trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    student, teacher = (t.view(2, 6, 40) for t in kernel_case(12, 40, torch.float64, seed=9))
    labels = torch.randint(0, 40, (2, 6))
    labels[0, :2] = labels[1, 5] = -100
    labels = labels if with_labels else None
    for extra in ({}, {"num_items_in_batch": torch.tensor(17)}):
        x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
        got = pyllm.generalized_jsd(x, teacher, labels, 0.3, 1.5, reduction, **extra)
        want = trl_gkd.GKDTrainer.generalized_jsd_loss(y, teacher, labels, 0.3, 1.5, reduction, **extra)
        assert rel_err(got, want) < 1e-13
        got.backward(), want.backward()
        assert rel_err(x.grad, y.grad) < 1e-12
    all_ignored = torch.full((2, 6), -100)
    assert pyllm.generalized_jsd(student, teacher, all_ignored).item() == 0.0  # batchmean: TRL's clamp to 1


def test_generalized_jsd_bad_arguments():
    student, teacher = kernel_case(3, 10, torch.float32)
    # a token count: 0 had given inf, -2 a negative loss, a vector a vector of losses
    for count in (0, -2, "6", True, torch.tensor(0), torch.tensor([3.0, 4.0])):
        with pytest.raises(ValueError, match="num_items_in_batch must be a positive number"):
            pyllm.generalized_jsd(student, teacher, num_items_in_batch=count)
    with pytest.raises(ValueError, match="reduction must be one of"):
        pyllm.generalized_jsd(student, teacher, reduction="avg")
    with pytest.raises(ValueError, match="labels or mask, not both"):
        pyllm.generalized_jsd(student, teacher, torch.zeros(3, dtype=torch.long), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor .* \(3,\)"):
        pyllm.generalized_jsd(student, teacher, torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the logits' shape without their last dim, \(3,\)"):
        pyllm.generalized_jsd(student, teacher, mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"teacher logits must have the student's shape \(3, 10\)"):
        pyllm.generalized_jsd(student, teacher[None])
    with pytest.raises(ValueError, match="logits must be"):
        pyllm.generalized_jsd(student[:, :0], teacher[:, :0])
    with pytest.raises(ValueError, match="beta must be in"):
        pyllm.generalized_jsd(student, teacher, beta=2.0)


SMALL = dict(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("logits", ["plain", "capped-from-scaled"])
def test_model_distill_loss_is_the_mean_divergence_at_the_targets(packed, alpha, logits):
    # LLM.forward(distill=...): alpha x the divergence of the student's and the teacher's logits,
    # averaged over the targets that are not -1, + (1 - alpha) x the cross-entropy there; the
    # teacher's hidden states from forward(hidden=True) at the same targets; packed documents too;
    # a student that caps its logits (Gemma 2's) from a teacher that scales them (Granite's).
    torch.manual_seed(0)
    extra = {"plain": ({}, {}), "capped-from-scaled": ({"final_softcap": 0.5}, {"logits_scaling": 0.2})}[logits]
    student = LLM(ModelConfig(**SMALL, **extra[0])).double()
    teacher = LLM(ModelConfig(**{**SMALL, "n_layers": 3, "dim": 96, "n_heads": 3}, **extra[1])).double()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    targets[0, :5] = -1  # a prompt
    cu = torch.tensor([0, 5, 16, 32], dtype=torch.int32) if packed else None
    with torch.no_grad():
        hidden = teacher(idx, targets, cu, hidden=True)[1]
    assert hidden.shape == (27, 96)
    loss = student(idx, targets, cu, distill=dict(teacher_hidden=hidden, teacher_weight=teacher.lm_head.weight,
                                                  teacher_logits=teacher.logit_shape(), beta=0.5, temperature=1.5,
                                                  alpha=alpha))[1]
    keep = targets != -1
    s_logits, t_logits = student(idx, cu_seqlens=cu)[0][keep], teacher(idx, cu_seqlens=cu)[0][keep].detach()
    want = alpha * distill_divergence(s_logits, t_logits, 0.5, 1.5).mean() + (1 - alpha) * F.cross_entropy(
        s_logits, targets[keep])
    assert rel_err(loss, want) < 1e-12
    g = torch.autograd.grad(loss, student.lm_head.weight)[0]
    assert rel_err(g, torch.autograd.grad(want, student.lm_head.weight)[0]) < 1e-10


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("teacher")
    trainer.train(config(data_dir, out, model=dict(TINY, n_layers=2, dim=96, n_heads=3, n_kv_heads=1), max_steps=40,
                                           eval_every=40))
    return out


@pytest.mark.level_free
def test_distillation_trains_the_student_toward_the_teacher(data_dir, teacher_run, tmp_path):  # noqa: F811
    # A student distilled from a trained teacher (a pyllm run, wider): the divergence falls; with
    # alpha 0 the loss is the cross-entropy alone (the fused loss's run, to rounding); exact resume.
    trainer.train(config(data_dir, tmp_path / "kd", teacher=str(teacher_run), max_steps=30, distill_temperature=2.0))
    kd = losses(tmp_path / "kd")
    assert np.mean(kd[-5:]) < 0.5 * np.mean(kd[:5])
    trainer.train(config(data_dir, tmp_path / "ce", teacher=str(teacher_run), distill_alpha=0.0))
    trainer.train(config(data_dir, tmp_path / "fused", fused_loss=True))
    np.testing.assert_allclose(losses(tmp_path / "ce"), losses(tmp_path / "fused"), rtol=1e-5)
    kw = dict(teacher=str(teacher_run), distill_beta=0.5, grad_accum=2)
    trainer.train(config(data_dir, tmp_path / "whole", **kw))
    trainer.train(config(data_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(data_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_mfu_counts_the_teachers_forward(data_dir, teacher_run, tmp_path, monkeypatch):  # noqa: F811
    # MFU's FLOPs per token (mfu * peak / tokens_per_s) of a distilled student: the student's
    # training FLOPs plus the teacher's forward (2 per weight, a third of the attention's).
    monkeypatch.setattr(trainer, "peak_flops", lambda device: 1e12)
    per_token, slack = {}, 0.0
    for name, kw in (("plain", {}), ("kd", dict(teacher=str(teacher_run)))):
        trainer.train(config(data_dir, tmp_path / name, max_steps=2, **kw))
        record = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1])
        per_token[name] = record["mfu"] * 1e12 / record["tokens_per_s"]
        # the log rounds tokens_per_s to 0.1: each value's share of the difference's error
        slack += per_token[name] * 0.05 / record["tokens_per_s"]
    T = TINY["block_size"]  # seq_len: the block size by default
    teacher = LLM.load(trainer.source_run_weights(teacher_run))
    want = teacher.flops_of_documents([T], forward_only=True) / T
    assert abs(per_token["kd"] - per_token["plain"] - want) <= want * 1e-6 + slack
    assert teacher.flops_of_documents([T], forward_only=True) == T * (
        2 * teacher.num_params(non_embedding=True) + 4 * teacher.config.n_layers * teacher.config.dim * T)


def test_distillation_on_conversations(chat_dir, teacher_run, tmp_path):  # noqa: F811
    # Packed conversations: the divergence at the assistant's tokens only, the val loss the cross-entropy.
    trainer.train(config(chat_dir, tmp_path / "kd", teacher=str(teacher_run), max_steps=20, eval_every=20))
    records = [json.loads(line) for line in (tmp_path / "kd/log.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["val_loss"] > 0


def test_distilling_a_mixture_of_experts_counts_its_balancing_once(chat_dir, teacher_run, tmp_path):  # noqa: F811
    # A MoE student on packed conversations: loss - aux_loss (the balancing term, added once) does not
    # depend on the term's coefficient at the first step.
    first = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"moe-{coef}"
        trainer.train(config(chat_dir, out, teacher=str(teacher_run), max_steps=1,
                             model=dict(TINY, n_experts=4, router_aux_loss_coef=coef)))
        first[coef] = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first[1.0]["aux_loss"] >= 2.0
    assert first[1.0]["loss"] - first[1.0]["aux_loss"] == pytest.approx(first[0.0]["loss"], rel=1e-5)


def multi_turn_dir(folder):
    """Conversations of two assistant replies each (user 2-4 tokens, reply 2-4, twice), so that the
    prompt of the last reply holds an earlier one; a token file as prepare_chat writes it."""
    rng = np.random.default_rng(5)
    docs, masks = [], []
    for _ in range(60):
        turns = [rng.integers(1, 64, int(rng.integers(2, 5))) for _ in range(4)]
        docs.append(np.concatenate(turns))
        masks.append(np.concatenate([np.full(len(t), i % 2, np.uint8) for i, t in enumerate(turns)]))
    data.write_documents(folder / "train.bin", docs, masks, vocab_size=64)
    return folder / "train.bin", docs, masks


def test_on_policy_batch_replaces_the_last_replies(tmp_path):
    # GKD's on-policy batch: each conversation's prompt (all before its last reply, earlier replies
    # too) continued by the student (generate_batch, the same generator), the sample's tokens the
    # only targets; packed in order into valid rows of T.
    path, docs, masks = multi_turn_dir(tmp_path)
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64, "block_size": 32}))
    loader = data.PackedLoader(path, 3, 24, seed=0)
    batch = loader.next_batch()
    cfg = TrainConfig(distill_max_new_tokens=6, distill_sample_temperature=1.0, sample_stop_tokens=[7])
    x, y, cu, sample_of = trainer.on_policy_batch(model, batch, cfg, torch.Generator().manual_seed(3))
    prompts = []
    for doc, length in zip([d for d in loader.docs if d >= 0], loader.lengths):
        mask = masks[doc][:length + 1]  # (a target may be the token past the cut)
        last = max(i for i in range(1, len(mask)) if mask[i])
        first = last
        while mask[first - 1]:
            first -= 1
        prompts.append(list(docs[doc][:first]))
    # (samples end where the rows of 24 do: drawn past them, they had been cut there untold)
    samples = model.generate_batch(prompts, min(6, 24 - max(map(len, prompts))), 1.0,
                                   generator=torch.Generator().manual_seed(3), stop_tokens=[7])
    check_documents(cu, *x.shape, "cpu")
    offsets = cu.tolist()
    segments = [(a, b) for a, b in zip(offsets[:-1], offsets[1:]) if (x.view(-1)[a:b] != 0).any()]
    assert len(segments) == len(prompts) and x.shape[1] == 24
    # each segment's sample, -1 for padding (the loader's docs' form)
    assert [offsets.index(a) for a, _ in segments] == [i for i, d in enumerate(sample_of) if d >= 0]
    assert [d for d in sample_of if d >= 0] == list(range(len(prompts))) and len(sample_of) == len(offsets) - 1
    for (a, b), prompt, sample in zip(segments, prompts, samples):
        want = (prompt + sample)[:24]
        assert x.view(-1)[a:b].tolist() == want
        targets = y.view(-1)[a:b].tolist()
        assert targets == [-1] * (len(prompt) - 1) + want[len(prompt):] + [-1]
    assert all(s[-1] == 7 or len(s) == min(6, 24 - max(map(len, prompts))) for s in samples)
    assert (y.view(-1) != -1).sum() == sum(min(len(p) + len(q), 24) - len(p) for p, q in zip(prompts, samples))


@pytest.mark.level_free
def test_on_policy_distillation_learns_and_resumes_exactly(chat_dir, teacher_run, tmp_path):  # noqa: F811
    # distill_lmbda 1: every micro-batch the student's own samples, the divergence falls; 0.5: the
    # draws are logged, and resume is exact (the draws and samples seeded by step and micro-step).
    trainer.train(config(chat_dir, tmp_path / "all", teacher=str(teacher_run), distill_lmbda=1.0, max_steps=20,
                         eval_every=20, distill_max_new_tokens=8))
    log = [json.loads(line) for line in (tmp_path / "all/log.jsonl").read_text().splitlines()]
    assert all(r["on_policy"] == 1.0 for r in log)
    assert np.mean([r["loss"] for r in log[-5:]]) < np.mean([r["loss"] for r in log[:5]])
    kw = dict(teacher=str(teacher_run), distill_lmbda=0.5, grad_accum=2, distill_max_new_tokens=8)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    draws = [json.loads(line)["on_policy"] for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert set(draws) <= {0.0, 0.5, 1.0} and 0 < np.mean(draws) < 1
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


@pytest.mark.level_free
def test_sequence_level_distillation_on_the_teachers_samples(chat_dir, teacher_run, tmp_path):  # noqa: F811
    # distill_seq_kd: every micro-batch's last replies the teacher's samples (GKD's seq_kd), the
    # divergence on them falls; with lmbda the student's replace them at its draws; exact resume.
    kw = dict(teacher=str(teacher_run), distill_seq_kd=True, distill_max_new_tokens=8, max_steps=16, eval_every=16)
    trainer.train(config(chat_dir, tmp_path / "seq", **kw))
    log = losses(tmp_path / "seq")
    assert np.mean(log[-4:]) < np.mean(log[:4])
    kw.update(distill_lmbda=0.5, grad_accum=2, max_steps=8, eval_every=4)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_distillation_options_are_checked(data_dir, teacher_run, tmp_path):  # noqa: F811
    for kwargs, message in [(dict(distill_beta=1.5), "distill_beta and distill_alpha must be in"),
                            (dict(distill_temperature=0.0), "distill_temperature must be > 0"),
                            (dict(teacher="x", compile=True), "nor torch.compile \\(--compile\\): drop one"),
                            (dict(distill_lmbda=0.5), "go with a teacher"),
                            (dict(distill_seq_kd=True), "go with a teacher"),
                            (dict(distill_lmbda=1.5), "distill_lmbda must be in"),
                            (dict(distill_max_new_tokens=0), "distill_max_new_tokens >= 1")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs).validate()
    with pytest.raises(ValueError, match="its vocabulary has 64 ids, the student's 80"):
        trainer.train(config(data_dir, tmp_path / "x", teacher=str(teacher_run), model=dict(TINY, vocab_size=80)))
    with pytest.raises(ValueError, match="they need conversations"):
        trainer.train(config(data_dir, tmp_path / "w", teacher=str(teacher_run), distill_lmbda=0.5))
    # a teacher of a shorter context than the rows: said up front, naming it (it had failed at the first
    # step as "longer than block_size 16")
    with pytest.raises(ValueError, match="its context is 16 tokens, shorter than the rows of 32"):
        trainer.train(config(data_dir, tmp_path / "b", teacher=str(teacher_run), model=dict(TINY, block_size=32)))
    TrainConfig(teacher="x", distill_lmbda=0.5, dist_mode="fsdp").validate()  # (the student gathered for its samples)


@pytest.mark.parametrize("kw", [dict(scale=1e39), dict(temperature=1e-50), dict(teacher_scale=1e39)])
def test_scales_and_temperatures_fp32_cannot_hold_are_refused(kw):
    # finite in float64, inf or 0 in the kernels' fp32 (the logits divided by the temperature): NaN before
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="finite in fp32"):
        pyllm.generalized_jsd(logits, logits.clone(), **kw)


def test_a_teacher_run_of_another_tokenizer_is_refused(tmp_path):
    # Two runs' tokenizers trained on different text have the same size and other ids: the student had
    # learnt the teacher's distribution over other words without a word (an audit, 2026-12-06)
    import json

    from pyllm import cli
    from pyllm.tokenizer import Tokenizer

    paths = []
    for name, text in (("a", "alpha beta gamma delta " * 50), ("b", "one two three four five " * 50)):
        tok = Tokenizer.train([text], 262, special_tokens=["<|endoftext|>"], show_progress=False)
        tok.save(str(tmp_path / f"{name}.bpe"))
        paths.append(tmp_path / f"{name}.bpe")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 262})).save(teacher / "model.safetensors")
    (teacher / "run.json").write_text(json.dumps({"tokenizer": str(paths[0])}))
    cli.check_teacher_tokenizer(teacher, paths[0])  # (its own: taken)
    with pytest.raises(ValueError, match="its tokenizer .* is not this run's"):
        cli.check_teacher_tokenizer(teacher, paths[1])
