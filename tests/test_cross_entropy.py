import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm.ops import distill as distill_ops
from pyllm import _C
from pyllm.ops import _util
from pyllm.ops import cross_entropy as ce_ops
from helpers import CPU_AND_CUDA, on_unsupported_device, poisoned, rel_err, shaped_logits, tolerance

# (rows..., V): one class, rows of a single 16-byte pack, V not a multiple of a pack (the CUDA
# scalar path), two leading dims, wide rows (many packs per CUDA thread; the CPU's fp64 sums).
SHAPES = [(3, 1), (5, 8), (7, 37), (2, 3, 1001), (4, 8200), (2, 65536)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (label_smoothing, z_loss, scale, softcap): F.cross_entropy's, smoothing + z-loss, a scale and a cap
# that binds (logits of std 3 reach the cap's bend), all four.
VARIANTS = [(0.0, 0.0, 1.0, None), (0.1, 1e-3, 1.0, None), (0.0, 0.0, 0.7, 5.0), (0.2, 1e-2, 1.3, 3.0)]
VARIANT_IDS = ["plain", "smooth_z", "scale_cap", "all"]


def row_grid(test):
    """The per-row tests' grid: device, dtype, shape and variant (label smoothing, z-loss, scale, cap)."""
    for mark in (pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS),
                 pytest.mark.parametrize("shape", SHAPES, ids=str), pytest.mark.parametrize("dtype", DTYPES, ids=str),
                 pytest.mark.parametrize("device", CPU_AND_CUDA)):
        test = mark(test)
    return test


def logits_of(shape, dtype, device, std=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, dtype=torch.float64, generator=g) * std).to(dtype).to(device)


def targets_of(shape, vocab, device, ignore_index=-100, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, shape[:-1], generator=g)
    t.view(-1)[::5] = ignore_index  # a fifth of the rows ignored, the first among them
    return t.to(device)


def target_probability(z, targets):
    """softmax(z)[target] per row, detached (DFT's token scaling: Liger's use_token_scaling, TRL's
    loss_type "dft"), 0 where the target is out of range (ignored)."""
    flat, t = z.detach().reshape(-1, z.shape[-1]), targets.reshape(-1)
    valid = (t >= 0) & (t < flat.shape[-1])
    p = torch.softmax(flat, -1).gather(1, t.clamp(0, flat.shape[-1] - 1)[:, None])[:, 0]
    return torch.where(valid, p, 0.0).reshape(targets.shape)


def reference_rows(logits, targets, ignore_index, label_smoothing, z_loss, scale, softcap, dtype=torch.float64,
                   token_scaling=False):
    """Per-row losses written plainly in torch, in `dtype` (float64: the reference; float32: what a
    torch model computes from 16-bit logits, as autocast's F.cross_entropy runs in fp32);
    token_scaling: each times its target's probability, detached."""
    z = logits.to(dtype) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = z.reshape(-1, z.shape[-1])
    t = targets.reshape(-1)
    rows = F.cross_entropy(flat, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    rows = rows + z_loss * torch.logsumexp(flat, -1).square() * (t != ignore_index)
    if token_scaling:
        rows = rows * target_probability(flat, t)
    return rows.reshape(targets.shape)


def ours_and_grad(logits, targets, dout, **kw):
    x = logits.detach().clone().requires_grad_()
    out = pyllm.cross_entropy(x, targets, reduction="none", **kw)
    (g,) = torch.autograd.grad(out, x, dout)
    return out, g


def reference_and_grad(logits, targets, dout, ignore_index, label_smoothing, z_loss, scale, softcap, dtype,
                       token_scaling=False):
    x = logits.detach().clone().requires_grad_()
    out = reference_rows(x, targets, ignore_index, label_smoothing, z_loss, scale, softcap, dtype, token_scaling)
    (g,) = torch.autograd.grad(out, x, dout.to(out.dtype))
    return out, g


def row_case(device, dtype, shape, variant):
    """The per-row tests' logits, targets, incoming gradient (float64) and keyword arguments."""
    label_smoothing, z_loss, scale, softcap = variant
    dout = torch.rand(shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    return (logits_of(shape, dtype, device), targets_of(shape, shape[-1], device), dout,
            dict(label_smoothing=label_smoothing, z_loss=z_loss, scale=scale, softcap=softcap))


@row_grid
def test_forward_and_backward_match_float64(device, dtype, shape, variant):
    logits, targets, dout, kw = row_case(device, dtype, shape, variant)
    ours, g = ours_and_grad(logits, targets, dout.float().to(device), **kw)
    ref, g_ref = reference_and_grad(logits.cpu(), targets.cpu(), dout, -100, **kw, dtype=torch.float64)
    # torch's own: the same function in fp32 on the same logits, its gradient in logits' dtype
    theirs, g_theirs = reference_and_grad(logits, targets, dout.to(device), -100, **kw, dtype=torch.float32)
    assert ours.dtype == torch.float32 and g.dtype == dtype and g.shape == logits.shape
    assert rel_err(ours, ref) <= tolerance(theirs, ref)
    assert rel_err(g, g_ref) <= tolerance(g_theirs.to(dtype), g_ref)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[3]], ids=[VARIANT_IDS[0], VARIANT_IDS[3]])
def test_token_scaling_matches_float64(device, dtype, shape, variant):
    # DFT (token_scaling): each row's loss, z-loss share and gradient times its target's probability,
    # held constant, within twice torch's own error (the same written in fp32 on the same logits)
    logits, targets, dout, kw = row_case(device, dtype, shape, variant)
    z_loss, scale, softcap = kw["z_loss"], kw["scale"], kw["softcap"]
    ours, g = ours_and_grad(logits, targets, dout.float().to(device), **kw, token_scaling=True)
    ref, g_ref = reference_and_grad(logits.cpu(), targets.cpu(), dout, -100, **kw, dtype=torch.float64,
                                    token_scaling=True)
    theirs, g_theirs = reference_and_grad(logits, targets, dout.to(device), -100, **kw, dtype=torch.float32,
                                          token_scaling=True)
    assert rel_err(ours, ref) <= tolerance(theirs, ref)
    assert rel_err(g, g_ref) <= tolerance(g_theirs.to(dtype), g_ref)
    # the z-loss share scaled alike; "mean" still over the counted rows
    _, share = pyllm.cross_entropy(logits, targets, **kw, token_scaling=True, reduction="none", return_z_loss=True)
    z = shaped_logits(logits.cpu().double(), scale, softcap)
    want = z_loss * torch.logsumexp(z, -1).square() * target_probability(z, targets.cpu())
    assert rel_err(share.cpu().double(), want) <= 1e-5 if z_loss else not share.any()
    mean = pyllm.cross_entropy(logits, targets, **kw, token_scaling=True)
    assert rel_err(mean.cpu().double(), ref.sum() / (targets != -100).sum().cpu()) <= tolerance(theirs.sum(), ref.sum())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_torch_float64(device, reduction):
    logits = logits_of((6, 4, 50), torch.float64, "cpu").to(device)
    targets = targets_of((6, 4, 50), 50, device, ignore_index=-1)
    for label_smoothing in (0.0, 0.3):
        ours = pyllm.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction,
                                   label_smoothing=label_smoothing) if device == "cpu" else None
        if device != "cpu":  # no fp64 kernel on CUDA: fp32 there, against the fp64 reference
            ours = pyllm.cross_entropy(logits.float(), targets, ignore_index=-1, reduction=reduction,
                                       label_smoothing=label_smoothing).double()
        ref = F.cross_entropy(logits.cpu().permute(0, 2, 1), targets.cpu(), ignore_index=-1, reduction=reduction,
                              label_smoothing=label_smoothing)
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-12 if device == "cpu" else 1e-6, atol=0)


def test_mean_of_all_ignored_rows_is_nan_as_torchs():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.full((3,), -100)
    loss = pyllm.cross_entropy(logits, targets)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))
    assert pyllm.cross_entropy(logits, targets, reduction="sum").item() == 0.0
    (g,) = torch.autograd.grad(pyllm.cross_entropy(logits, targets, reduction="sum"), logits)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32], ids=str)
def test_narrow_integer_targets_count_as_int64(dtype):
    # A byte-level vocabulary's uint8 targets: -100 wraps to 156 there, a class, which the mean had
    # counted against the int64 comparison's (2x off). The losses and the mean as int64 targets'.
    from pyllm.nn import linear_cross_entropy

    targets = torch.tensor([156, 3, 255, 0])
    logits, x, w = torch.randn(4, 256, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), torch.randn(256, 8)
    want = F.cross_entropy(logits, targets)
    assert rel_err(pyllm.cross_entropy(logits, targets.to(dtype)), want) < 1e-12
    fused = linear_cross_entropy(x, w.double(), targets.to(dtype), reduction="mean", ignore_index=-100)
    assert rel_err(fused, F.cross_entropy(x @ w.double().t(), targets)) < 1e-12
    s, t = torch.randn(4, 256, dtype=torch.float64), torch.randn(4, 256, dtype=torch.float64)
    assert pyllm.generalized_jsd(s, t, targets.to(dtype)) == pyllm.generalized_jsd(s, t, targets)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_as_torchs(reduction):
    # F.cross_entropy's weight=: each row times its target's weight, the mean over the counted
    # rows' weights; float64 to rounding, gradients too; bf16 within twice torch's own error.
    g = torch.Generator().manual_seed(3)
    targets = torch.tensor([1, 2, -100, 3, 29, 0, 7, 7])
    weight = torch.rand(30, dtype=torch.float64, generator=g) + 0.1
    for dtype, exact in ((torch.float64, True), (torch.bfloat16, False)):
        logits = (torch.randn(8, 30, dtype=torch.float64, generator=g) * 3).to(dtype).requires_grad_()
        ref64 = logits.detach().double().requires_grad_()
        want = F.cross_entropy(ref64, targets, weight=weight, reduction=reduction)
        (want_grad,) = torch.autograd.grad(want.sum(), ref64)
        got = pyllm.cross_entropy(logits, targets, weight=weight.to(dtype), reduction=reduction)
        (got_grad,) = torch.autograd.grad(got.sum(), logits)
        if exact:
            assert rel_err(got, want) < 1e-14 and rel_err(got_grad, want_grad) < 1e-14
        else:
            theirs = F.cross_entropy(logits.detach().requires_grad_(), targets, weight=weight.to(dtype), reduction=reduction)
            assert rel_err(got, want) <= tolerance(theirs, want)
    with pytest.raises(ValueError, match="weight goes without label_smoothing"):
        pyllm.cross_entropy(torch.randn(2, 30), targets[:2], weight=torch.ones(30), label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"weight must be a float tensor of shape \(30,\)"):
        pyllm.cross_entropy(torch.randn(2, 30), targets[:2], weight=torch.ones(29))


def test_modules_as_torchs_and_ligers():
    # pyllm.nn.CrossEntropyLoss takes torch.nn.CrossEntropyLoss's arguments (its state_dict too);
    # pyllm.nn.LinearCrossEntropyLoss Liger's LigerFusedLinearCrossEntropyLoss's, its forward's
    # order (the output layer's weight first) and defaults (ignore_index -100, "mean").
    from pyllm.nn import CrossEntropyLoss, LinearCrossEntropyLoss

    g = torch.Generator().manual_seed(5)
    logits, targets = torch.randn(6, 12, dtype=torch.float64, generator=g), torch.tensor([1, 2, -100, 3, 11, 0])
    weight = torch.rand(12, dtype=torch.float64, generator=g)
    for kw in (dict(), dict(weight=weight), dict(label_smoothing=0.1, reduction="sum")):
        ours, theirs = CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        assert rel_err(ours(logits, targets), theirs(logits, targets)) < 1e-14
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, w = torch.randn(6, 8, dtype=torch.float64, generator=g), torch.randn(12, 8, dtype=torch.float64, generator=g)
    assert rel_err(LinearCrossEntropyLoss()(w, x, targets), F.cross_entropy(x @ w.t(), targets)) < 1e-14
    out = LinearCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True, reduction="sum")(w, x, targets)
    loss, z = out  # (Liger's tuple until its CrossEntropyOutput; read by name as that now)
    assert out.loss is loss and out.z_loss is z
    lse = torch.logsumexp(x @ w.t(), -1)[targets != -100]
    assert rel_err(z, 1e-2 * lse.square().sum()) < 1e-12
    with pytest.raises(ValueError, match="bias is not taken"):
        LinearCrossEntropyLoss()(w, x, targets, torch.zeros(12))
    # every target ignored (a micro-batch of prompt tokens alone): Liger's mean is 0, not NaN, with
    # zero gradients (an audit, 2026-12-06: NaN had reached a summed log)
    x.requires_grad_()
    ignored = torch.full((6,), -100)
    loss, z = LinearCrossEntropyLoss(lse_square_scale=1e-2, return_z_loss=True)(w, x, ignored)
    assert (loss.item(), z.item()) == (0.0, 0.0)
    loss.backward()
    assert not x.grad.any()
    x = x.detach()
    # positional arguments in torch's and Liger's orders: weight third in the function; the module's
    # (weight, size_average, ignore_index, reduce, reduction, ...), size_average / reduce mapped as
    # torch maps them (with its deprecation warning); Liger's (ce_weight, ignore_index,
    # lse_square_scale, label_smoothing, reduction, ...)
    assert rel_err(pyllm.cross_entropy(logits, targets, weight), F.cross_entropy(logits, targets, weight)) < 1e-14
    for i, args in enumerate(((weight, None, -100, None, "sum"), (weight, False), (None, None, -100, False))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours, theirs = CrossEntropyLoss(*args), torch.nn.CrossEntropyLoss(*args)
        assert len(caught) == (2 if i else 0)  # size_average / reduce: torch's deprecation warning, each
        assert ours.reduction == theirs.reduction and ours.ignore_index == theirs.ignore_index
        assert rel_err(ours(logits, targets), theirs(logits, targets)) < 1e-14
    liger = LinearCrossEntropyLoss(None, 11, 0.0, 0.0, "sum", None, False, torch.float32)
    with pytest.raises(ValueError, match=r"target of -100 is out of range \[0, 12\) with ignore_index=11"):
        liger(w, x, targets)  # -100 is a class like any other there, out of range (the message names 11)
    targets = targets.clone()
    targets[2] = 11
    assert rel_err(liger(w, x, targets), F.cross_entropy(x @ w.t(), targets, ignore_index=11, reduction="sum")) < 1e-14
    with pytest.raises(NotImplementedError, match="ce_weight"):
        LinearCrossEntropyLoss(torch.ones(12))
    with pytest.raises(ValueError, match="accum_dtype"):
        LinearCrossEntropyLoss(accum_dtype=torch.bfloat16)
    # Liger's return_token_accuracy (its tenth argument, after use_token_scaling): the share of counted
    # targets that are the argmax for "mean" and "sum", each row's for "none", by name as its
    # CrossEntropyOutput (z_loss None without return_z_loss); NaN when every target is ignored
    targets = torch.tensor([1, 2, -100, 3, 11, 0])
    logits = x @ w.t()
    targets[[0, 3]] = logits.argmax(-1)[[0, 3]]
    hits = (logits.argmax(-1) == targets) & (targets != -100)
    for reduction in ("mean", "sum", "none"):
        out = LinearCrossEntropyLoss(None, -100, 1e-2, 0.0, reduction, None, False, None, False, True)(w, x, targets)
        plain = LinearCrossEntropyLoss(lse_square_scale=1e-2, reduction=reduction)(w, x, targets)
        want = hits.double() if reduction == "none" else hits.double().sum() / 5
        assert torch.equal(out.loss, plain) and out.z_loss is None and torch.equal(out.token_accuracy, want), reduction
    assert hits.sum() >= 2
    out = LinearCrossEntropyLoss(return_z_loss=True, return_token_accuracy=True)(w, x, ignored)
    assert (out.loss.item(), out.z_loss.item()) == (0.0, 0.0) and out.token_accuracy.isnan()
    # Liger's use_token_scaling (its ninth argument; DFT): each counted row's loss and gradient times
    # its target's probability, held constant, "mean" over the counted rows
    x_ = x.detach().clone().requires_grad_()
    dft = LinearCrossEntropyLoss(None, -100, 1e-2, 0.1, "mean", None, False, None, True)(w, x_, targets)
    (dx,) = torch.autograd.grad(dft, x_)
    x_ = x.detach().clone().requires_grad_()
    want = reference_rows(x_ @ w.t(), targets, -100, 0.1, 1e-2, 1.0, None, torch.float64, True).sum() / 5
    (want_dx,) = torch.autograd.grad(want, x_)
    assert rel_err(dft, want) < 1e-14 and rel_err(dx, want_dx) < 1e-13
    assert rel_err(dft, LinearCrossEntropyLoss(lse_square_scale=1e-2, label_smoothing=0.1)(w, x, targets)) > 0.1
    # Liger's eleventh argument, return_predicted_tokens: each row's argmax over the final (capped)
    # logits, int64, -1 where ignored, the first of equal maxima (a tie planted in row 3); the fields
    # not asked for read None
    out = LinearCrossEntropyLoss(None, -100, 0.0, 0.0, "mean", None, True, None, False, False, False)(w, x, targets)
    assert (out.token_accuracy, out.predicted_tokens) == (None, None) and len(out) == 2
    assert LinearCrossEntropyLoss(return_token_accuracy=True)(w, x, targets).predicted_tokens is None
    w_tied = w.clone()
    w_tied[7] = w_tied[(x[3] @ w.t()).argmax()]  # (row 3's two largest logits equal: the first counts)
    for softcap, reduction in ((None, "mean"), (2.0, "none")):
        out = LinearCrossEntropyLoss(None, -100, 1e-2, 0.0, reduction, softcap, True, None, False, True, True)(
            w_tied, x, targets)
        plain = LinearCrossEntropyLoss(None, -100, 1e-2, 0.0, reduction, softcap, True)(w_tied, x, targets)
        z = x @ w_tied.t() if softcap is None else softcap * torch.tanh(x @ w_tied.t() / softcap)
        want = torch.where(targets == -100, -1, z.argmax(-1))
        assert out.predicted_tokens.dtype == torch.int64 and torch.equal(out.predicted_tokens, want)
        assert torch.equal(out.loss, plain.loss) and torch.equal(out.z_loss, plain.z_loss)
        assert out.token_accuracy is not None and z[3].eq(z[3].max()).sum() == 2


def test_z_loss_share_is_returned_detached():
    logits = logits_of((8, 30), torch.float64, "cpu").requires_grad_()
    targets = targets_of((8, 30), 30, "cpu")
    loss, z_share = pyllm.cross_entropy(logits, targets, z_loss=1e-2, return_z_loss=True)
    plain = pyllm.cross_entropy(logits, targets)
    counted = targets != -100
    expected = 1e-2 * torch.logsumexp(logits, -1)[counted].square().mean()
    torch.testing.assert_close(z_share, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, plain + expected, rtol=1e-12, atol=0)
    assert not z_share.requires_grad


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_is_written(device, dtype):
    rows, vocab = 9, 300
    logits = logits_of((rows, vocab), dtype, device)
    targets = targets_of((rows, vocab), vocab, device, ignore_index=-1)
    loss, z_part = poisoned((rows,), torch.float32, device), poisoned((rows,), torch.float32, device)
    grad = poisoned((rows, vocab), dtype, device)
    ce_ops.cross_entropy_into(logits, targets, loss, z_part, grad, -1, 1.0, 0.0, 0.1, 1e-3, 1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(z_part).all() and torch.isfinite(grad).all()
    ignored = targets == -1
    assert (loss[ignored] == 0).all() and (z_part[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert (loss[~ignored] > 0).all() and (z_part[~ignored] > 0).all()


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_in_place_give_the_ops_gradient(device, dtype):
    # Rows 8200 wide inside a (rows, 8208) buffer: the gradient lands over the logits, row stride
    # kept, the columns past V untouched; loss and gradient bitwise those of cross_entropy.
    rows, vocab = 6, 8200
    buffer = logits_of((rows, vocab + 8), dtype, device)
    logits = buffer[:, :vocab]
    targets = targets_of((rows, vocab), vocab, device, ignore_index=-1)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, scale=0.9, softcap=4.0)
    original = logits.clone()
    loss, g = ours_and_grad(original, targets, torch.ones(rows, device=device), ignore_index=-1, **kw)
    padding = buffer[:, vocab:].clone()
    rows_loss, rows_z = ce_ops.cross_entropy_rows_(logits, targets, ignore_index=-1, **kw)
    assert torch.equal(rows_loss, loss)
    assert torch.equal(logits, g)
    assert torch.equal(buffer[:, vocab:], padding)
    def z_of(logits):
        return 1e-3 * torch.logsumexp(4.0 * torch.tanh(0.9 * logits / 4.0), -1).square() * (targets != -1)
    exact_z = z_of(original.double().cpu()).to(rows_z.device)
    assert rel_err(rows_z, exact_z) <= tolerance(z_of(original.float()), exact_z)  # (rtol 1e-5 vs fp32: ~50x)
    # without want_grad the logits stay as they were
    fresh = logits_of((rows, vocab), dtype, device)
    kept = fresh.clone()
    ce_ops.cross_entropy_rows_(fresh, targets, ignore_index=-1, want_grad=False)
    assert torch.equal(fresh, kept)
    # grad_rows: each row's gradient times its weight before the rounding, bitwise the op's backward
    weights = torch.randn(rows, device=device)
    _, g = ours_and_grad(original, targets, weights, ignore_index=-1, **kw)
    weighted = original.clone()
    ce_ops.cross_entropy_rows_(weighted, targets, ignore_index=-1, grad_rows=weights, **kw)
    assert torch.equal(weighted, g)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_non_finite_logits(device):
    logits = logits_of((4, 64), torch.float32, device)
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :20] = float("-inf")  # masked classes: a finite loss and a zero gradient there, as torch's
    targets = torch.tensor([3, 4, 5, 30], device=device)
    ours, g = ours_and_grad(logits, targets, torch.ones(4, device=device))
    ref, g_ref = reference_and_grad(logits.cpu(), targets.cpu(), torch.ones(4, dtype=torch.float64), -100, 0.0, 0.0,
                                    1.0, None, torch.float64)
    assert torch.isnan(ours[1]) and torch.isnan(g[1]).all() and torch.isnan(ours[2]) and torch.isnan(g[2]).all()
    theirs, g_theirs = reference_and_grad(logits.cpu(), targets.cpu(), torch.ones(4), -100, 0.0, 0.0, 1.0, None,
                                          torch.float32)
    x64 = logits.cpu().double().requires_grad_()  # (reference_and_grad rounds the gradient to the leaf's fp32)
    (g64,) = torch.autograd.grad(reference_rows(x64, targets.cpu(), -100, 0.0, 0.0, 1.0, None), x64,
                                 torch.ones(4, dtype=torch.float64))
    for row in (0, 3):
        assert rel_err(ours[row], ref[row]) <= tolerance(theirs[row], ref[row])
        assert rel_err(g[row], g64[row]) <= tolerance(g_theirs[row], g64[row])
    assert (g[3, :20] == 0).all()


def test_masked_classes_with_label_smoothing_as_torch():
    # -inf logits and smoothing: torch's loss is inf (the smoothing term's mean of log-softmax) and
    # its gradient finite, -e / V at the masked classes; the same here.
    logits = logits_of((3, 40), torch.float64, "cpu")
    logits[1, :7] = float("-inf")
    targets = torch.tensor([3, 20, 39])
    ours, g = ours_and_grad(logits, targets, torch.ones(3, dtype=torch.float64), label_smoothing=0.1)
    ref, g_ref = reference_and_grad(logits, targets, torch.ones(3, dtype=torch.float64), -100, 0.1, 0.0, 1.0, None,
                                    torch.float64)
    assert torch.isinf(ours[1]) and torch.isinf(ref[1])
    torch.testing.assert_close(ours[0::2], ref[0::2], rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)


def test_float64_wide_rows_match_torch():
    logits = logits_of((3, 2, 8200), torch.float64, "cpu")
    targets = targets_of((3, 2, 8200), 8200, "cpu")
    dout = torch.rand(3, 2, dtype=torch.float64) + 0.5
    kw = dict(label_smoothing=0.1, z_loss=1e-3, scale=0.8, softcap=4.0)
    ours, g = ours_and_grad(logits, targets, dout, **kw)
    ref, g_ref = reference_and_grad(logits, targets, dout, -100, **kw, dtype=torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-16)


def test_targets_of_any_integer_dtype_and_expanded_logits():
    logits = logits_of((6, 50), torch.float32, "cpu")
    targets = targets_of((6, 50), 50, "cpu")
    want = pyllm.cross_entropy(logits, targets, reduction="none")
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(pyllm.cross_entropy(logits, targets.to(dtype), reduction="none"), want)
    counted = targets != -100
    assert torch.equal(pyllm.cross_entropy(logits[counted], targets[counted].to(torch.uint8), reduction="none"),
                       want[counted])
    # one row repeated (stride 0), as expand gives: F.cross_entropy takes it, so must this
    row = logits[:1].expand(4, 50)
    torch.testing.assert_close(pyllm.cross_entropy(row, targets[1:5].abs(), reduction="sum"),
                               F.cross_entropy(row, targets[1:5].abs(), reduction="sum"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_not_on_a_16_byte_boundary(device, dtype):
    # Rows starting one element off a 16-byte boundary: CUDA's scalar loads (the vector ones need
    # the start, the stride and V in whole packs); the same answers as the aligned copy, to rounding.
    rows, vocab = 5, 4096
    buffer = logits_of((rows * vocab + 1,), dtype, device)
    shifted = buffer[1:].view(rows, vocab)
    targets = targets_of((rows, vocab), vocab, device)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    loss, g = ours_and_grad(shifted, targets, torch.ones(rows, device=device), **kw)
    loss_aligned, g_aligned = ours_and_grad(shifted.contiguous().clone(), targets, torch.ones(rows, device=device),
                                            **kw)
    torch.testing.assert_close(loss, loss_aligned, rtol=1e-6, atol=0)
    torch.testing.assert_close(g.float(), g_aligned.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-7)


def test_gradcheck_float64():
    logits = logits_of((5, 11), torch.float64, "cpu").requires_grad_()
    targets = targets_of((5, 11), 11, "cpu")
    for kw in [{}, dict(label_smoothing=0.2, z_loss=0.05, scale=0.8, softcap=2.5)]:
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(lambda a: pyllm.cross_entropy(a, targets, reduction=reduction, **kw),
                                            (logits,))


@pytest.mark.level_free
def test_opcheck():
    logits, targets = torch.randn(4, 6), torch.tensor([1, -100, 5, 0])
    for requires_grad in (False, True):
        args = (logits.clone().requires_grad_(requires_grad), targets, -100, 1.0, 3.0, 0.1, 1e-3)
        torch.library.opcheck(torch.ops.pyllm.cross_entropy.default, args)
    torch.library.opcheck(torch.ops.pyllm.cross_entropy_backward.default,
                          (torch.rand(4) + 0.5, logits, targets, -100, 1.0, 3.0, 0.1, 1e-3))
    torch.library.opcheck(torch.ops.pyllm.cross_entropy_rows_.default,
                          (logits.clone(), targets, -100, 1.0, 3.0, 0.1, 1e-3, True))
    torch.library.opcheck(torch.ops.pyllm.cross_entropy_rows_.default,
                          (logits.clone(), targets, -100, 1.0, 3.0, 0.1, 1e-3, True, torch.randn(4)))
    # token scaling (DFT): the ops' last argument, False when left out (graphs and callers written before it)
    torch.library.opcheck(torch.ops.pyllm.cross_entropy.default,
                          (logits.clone().requires_grad_(), targets, -100, 1.0, 3.0, 0.1, 1e-3, True))
    torch.library.opcheck(torch.ops.pyllm.cross_entropy_backward.default,
                          (torch.rand(4) + 0.5, logits, targets, -100, 1.0, 3.0, 0.1, 1e-3, True))
    torch.library.opcheck(torch.ops.pyllm.cross_entropy_rows_.default,
                          (logits.clone(), targets, -100, 1.0, 3.0, 0.1, 1e-3, True, None, None, True))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_eager_calls_match_the_op(device):
    logits = logits_of((5, 40), torch.bfloat16, device).requires_grad_()
    targets = targets_of((5, 40), 40, device)
    loss = pyllm.cross_entropy(logits, targets, reduction="none")
    assert type(loss.grad_fn).__name__ == "_CrossEntropyFunctionBackward"
    loss_op = torch.ops.pyllm.cross_entropy(logits, targets, -100, 1.0, 0.0, 0.0, 0.0)[0]
    assert torch.equal(loss, loss_op)
    dout = torch.rand(5, device=device)
    assert torch.equal(torch.autograd.grad(loss, logits, dout)[0], torch.autograd.grad(loss_op, logits, dout)[0])


def test_meta_tensors_give_shapes():
    logits = torch.empty(2, 3, 7, device="meta", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.empty(2, 3, device="meta", dtype=torch.int64)
    loss = pyllm.cross_entropy(logits, targets, reduction="none")
    assert loss.is_meta and loss.shape == (2, 3) and loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert g.is_meta and g.shape == (2, 3, 7) and g.dtype == torch.bfloat16


@pytest.mark.level_free
def test_torch_compile_fullgraph():
    logits = logits_of((4, 3, 33), torch.float32, "cpu").requires_grad_()
    targets = targets_of((4, 3, 33), 33, "cpu")

    def loss_of(x):
        return pyllm.cross_entropy(x, targets, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)

    torch._dynamo.reset()
    out = torch.compile(loss_of, fullgraph=True)(logits)
    torch.testing.assert_close(out, loss_of(logits))
    torch.testing.assert_close(torch.autograd.grad(out, logits)[0], torch.autograd.grad(loss_of(logits), logits)[0])


def test_large_vocab_sums_stay_exact():
    # 256K classes: fp32 running sums would carry ~1e-5 relative error into lse; the kernel's are fp64.
    logits = logits_of((2, 262144), torch.float32, "cpu", std=1.0)
    targets = torch.tensor([5, 262143])
    ours = pyllm.cross_entropy(logits, targets, reduction="none")
    ref = reference_rows(logits, targets, -100, 0.0, 0.0, 1.0, None)
    theirs = reference_rows(logits, targets, -100, 0.0, 0.0, 1.0, None, torch.float32)
    assert rel_err(ours, ref) <= tolerance(theirs, ref)


# --- bad input ----------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    logits, targets = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 4\) or -100"):
        pyllm.cross_entropy(logits, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 4\) or -1 "):
        pyllm.cross_entropy(logits, torch.tensor([0, -100, 1]), ignore_index=-1)
    with pytest.raises(ValueError, match=r"logits' shape without its last dim, \(3,\)"):
        pyllm.cross_entropy(logits, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        pyllm.cross_entropy(logits, targets.float())
    with pytest.raises(TypeError, match="expected one of"):
        pyllm.cross_entropy(logits.int(), targets)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pyllm.cross_entropy([1.0], targets)
    with pytest.raises(ValueError, match="V >= 1"):
        pyllm.cross_entropy(torch.randn(3, 0), targets)
    with pytest.raises(ValueError, match="reduction must be one of"):
        pyllm.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        pyllm.cross_entropy(logits, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be 0 or positive"):
        pyllm.cross_entropy(logits, targets, z_loss=-1.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pyllm.cross_entropy(logits, targets, scale=float("inf"))
    with pytest.raises(ValueError, match="softcap must be None or positive"):
        pyllm.cross_entropy(logits, targets, softcap=0.0)
    # a cap fp32 holds no more would read as no cap: refused where the math is fp32, taken in fp64
    with pytest.raises(ValueError, match="softcap 1e-46 rounds to 0 in fp32, the math type of float32 logits"):
        pyllm.cross_entropy(logits.float(), targets, softcap=1e-46)
    assert torch.isfinite(pyllm.cross_entropy(logits.double(), targets, softcap=1e-46))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pyllm.cross_entropy(logits, targets, ignore_index=-1.0)
    with pytest.raises(ValueError, match="ignore_index must fit in int64, got 1180591620717411303424"):
        pyllm.cross_entropy(logits, targets, ignore_index=2**70)
    # NumPy's scalars are numbers (its bool is not)
    assert torch.equal(pyllm.cross_entropy(logits, targets, ignore_index=np.int64(1), scale=np.float32(2.0)),
                       pyllm.cross_entropy(logits, targets, ignore_index=1, scale=2.0))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pyllm.cross_entropy(logits, targets, scale=np.bool_(True))
    with pytest.raises(ValueError, match="device"):
        pyllm.cross_entropy(on_unsupported_device(logits), targets)


def test_kernel_calls_refuse_row_tensors_of_other_lengths():
    # The kernels read and write one element per row wherever targets, loss and grad_rows point: a
    # shorter one (a DTensor's rows chunked otherwise than the logits') would be read past its end.
    logits = torch.randn(6, 10)
    loss, z_part = torch.empty(6), torch.empty(6)
    with pytest.raises(ValueError, match=r"targets must have one element per row \(6\), got shape \(4,\)"):
        ce_ops.cross_entropy_into(logits, torch.zeros(4, dtype=torch.long), loss, z_part, None, -100, 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"grad_rows must have one element per row \(6\)"):
        ce_ops.cross_entropy_into(logits, torch.zeros(6, dtype=torch.long), loss, z_part, torch.empty(6, 10), -100,
                                  1.0, 0.0, 0.0, 0.0, 1.0, torch.ones(3))
    with pytest.raises(ValueError, match="teacher .* must have the student's shape"):
        distill_ops.distill_into(logits, logits[:4], loss, None, 0.5, 1.0, 1.0, 0.0, 1.0, 0.0)


def test_cuda_launch_without_cuda_kernels_raises(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32, shape=(2, 4),
                           data_ptr=lambda: 256, stride=lambda dim: 4)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        rows = SimpleNamespace(numel=lambda: 2, data_ptr=lambda: 512)  # targets, loss: one per row
        ce_ops.cross_entropy_into(fake, rows, rows, None, None, -100, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.cuda
def test_cuda_out_of_range_target_gives_a_nan_row():
    logits = logits_of((3, 20), torch.bfloat16, "cuda").requires_grad_()
    loss = pyllm.cross_entropy(logits, torch.tensor([1, 20, 3], device="cuda"), reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isnan(loss[1]) and torch.isnan(g[1]).all()
    assert torch.isfinite(loss[0::2]).all() and torch.isfinite(g[0::2]).all()


def test_cpp_rechecks_raw_calls():
    a, t = torch.randn(8), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.cross_entropy_cpu(0, 0, 0, 0, 0, 0, 2, 4, 4, 4, -100, 1.0, 0.0, 0.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.cross_entropy_cpu(a.data_ptr(), t.data_ptr(), a.data_ptr(), 0, 0, 0, 2, 4, 4, 4, -100, 1.0, 0.0, 0.0, 0.0,
                             1.0, 99)
    with pytest.raises(ValueError, match="vocab >= 1"):
        _C.cross_entropy_cpu(1, 1, 1, 0, 0, 0, 2, 0, 4, 4, -100, 1.0, 0.0, 0.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="strides must be >= vocab"):
        _C.cross_entropy_cpu(1, 1, 1, 0, 0, 0, 2, 4, 3, 4, -100, 1.0, 0.0, 0.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="label_smoothing"):
        _C.cross_entropy_cpu(1, 1, 1, 0, 0, 0, 2, 4, 4, 4, -100, 1.0, 0.0, 2.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="softcap"):
        _C.cross_entropy_cpu(1, 1, 1, 0, 0, 0, 2, 4, 4, 4, -100, 1.0, -1.0, 0.0, 0.0, 1.0, 0)


@pytest.mark.level_free
def test_compiles_with_float_arguments_symbols():
    # label_smoothing / z_loss / scale changing between compiled calls compile (a graph per value:
    # dynamo specialises a custom op's float arguments, as torch's F.cross_entropy(label_smoothing=)
    # too); the argument checks skip symbols (they broke fullgraph, 2026-12-03); eager calls check them.
    torch._dynamo.reset()
    logits, targets = torch.randn(5, 11, requires_grad=True), torch.randint(0, 11, (5,))
    for dynamic in (True, None):
        f = torch.compile(lambda l, t, s, z: pyllm.cross_entropy(l, t, label_smoothing=s, z_loss=z), fullgraph=True,
                          dynamic=dynamic)
        for s, z in ((0.0, 0.0), (0.1, 1e-4), (0.2, 1e-3)):
            assert torch.equal(f(logits, targets, s, z), pyllm.cross_entropy(logits, targets, label_smoothing=s, z_loss=z))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        pyllm.cross_entropy(logits, targets, label_smoothing=1.5)


@pytest.mark.parametrize("scale", [1e39, 1e-50])
def test_a_scale_fp32_cannot_hold_is_refused(scale):
    # finite in float64, inf or 0 in the kernels' fp32: the loss had been NaN without a word
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="is 0 or inf in fp32"):
        pyllm.cross_entropy(logits, targets, scale=scale)
    assert torch.isfinite(pyllm.cross_entropy(logits.double(), targets, scale=1e39))  # fp64 holds it


def test_linear_loss_with_another_ignore_index_takes_minus_one_as_out_of_range():
    # ignore_index=-100 (Liger's default): a -1 target had been skipped silently (pyllm's own sentinel);
    # torch raises for it, and so does this now on the CPU. A bool ignore_index had been class 1.
    from pyllm.nn import linear_cross_entropy
    x, w = torch.randn(6, 5), torch.randn(11, 5)
    t = torch.randint(0, 11, (6,))
    t[0] = -1
    with pytest.raises(ValueError, match="target of -1 is out of range"):
        linear_cross_entropy(x, w, t, ignore_index=-100)
    t[0] = -100
    want = F.cross_entropy((x @ w.T).double(), t, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(x, w, t, ignore_index=-100).double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_cross_entropy(x, w, t, ignore_index=True)
    assert torch.isfinite(linear_cross_entropy(x, w, t.clamp_min(0), ignore_index=2**70))  # ignores nothing


def test_fused_losses_refuse_inputs_that_are_not_floating_point():
    # bool and complex had failed inside torch's matmul ("addmm_impl_cpu_" not implemented for 'Bool')
    from pyllm.nn import linear_cross_entropy
    targets = torch.tensor([0, 1, 2, 3])
    for dtype in (torch.bool, torch.complex64, torch.int64):
        with pytest.raises(TypeError, match="must be floating point"):
            linear_cross_entropy(torch.ones(4, 8, dtype=dtype), torch.ones(10, 8, dtype=dtype), targets)


def test_fused_losses_refuse_an_output_layer_on_another_device():
    # a meta weight (a model not yet materialized) had given numbers from uninitialized memory
    from pyllm.nn import linear_cross_entropy, linear_distill, linear_token_logps
    x, t = torch.randn(6, 5), torch.randint(0, 11, (6,))
    meta = torch.randn(11, 5, device="meta")
    for call in (lambda: linear_cross_entropy(x, meta, t), lambda: linear_token_logps(x, meta, t),
                 lambda: linear_distill(x, torch.randn(11, 5), x.clone(), meta),
                 lambda: linear_distill(x, meta, x.clone(), torch.randn(11, 5))):
        with pytest.raises(ValueError, match="weight is on meta but x on cpu"):
            call()
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(x, torch.randn(0, 5), t)


def test_fused_output_losses_refuse_create_graph():
    # Their gradients are made in the forward: under create_graph=True (a gradient penalty) they had
    # come back detached, the penalty adding nothing without a word (an audit, 2026-12-06)
    from pyllm import nn as pnn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    xt, wt = torch.randn(4, 8, dtype=torch.float64, generator=gen), torch.randn(5, 8, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 5, (4,), generator=gen)
    pairs = lambda s, *_: -torch.nn.functional.logsigmoid(s[0::2] - s[1::2]).sum()  # noqa: E731
    calls = {"linear_cross_entropy": lambda: pnn.linear_cross_entropy(x, w, t),
             "linear_token_logps": lambda: pnn.linear_token_logps(x, w, t).sum(),
             "linear_distill": lambda: pnn.linear_distill(x, w, xt, wt, 0.5),
             "linear_sequence_loss": lambda: pnn.linear_sequence_loss(x, w, t, torch.tensor([2, 2]), 2, pairs)[0]}
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match=f"pyllm.nn.{name}: no second derivative"):
            torch.autograd.grad(call(), x, create_graph=True)
        gx, = torch.autograd.grad(call(), x)  # (a first derivative as before)
        assert gx.isfinite().all() and gx.abs().sum() > 0


class _FusedLoss(torch.nn.Module):
    """One of the fused output-layer losses of a (12, 16) input over 11 classes (an audit of
    torch.export and compile, 2026-12-06)."""

    def __init__(self, kind):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.w = torch.nn.Parameter(torch.randn(11, 16, generator=g))
        self.wt = torch.randn(11, 16, generator=g)

    def forward(self, x, t):
        import pyllm.nn as pnn

        if self.kind == "ce":
            return pnn.linear_cross_entropy(x, self.w, t)
        if self.kind == "logps":
            return pnn.linear_token_logps(x, self.w, t).sum()
        if self.kind == "sequence":  # (DPO's over the 12 rows as 2 pairs of 3-row sequences)
            pairs = lambda s, *_: -torch.nn.functional.logsigmoid(s[0::2] - s[1::2]).sum()  # noqa: E731
            return pnn.linear_sequence_loss(x, self.w, t, [3, 3, 3, 3], 2, pairs)[0]
        return pnn.linear_distill(x, self.w, x.detach() * 0.5, self.wt, 0.5, 1.0)


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch.export of pyllm's ops: torch >= 2.6")
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("kind", ["ce", "logps", "distill", "sequence"])
def test_fused_losses_export_with_gradients_and_dynamic_rows(kind, strict):
    # torch.export inlines an autograd.Function's forward and drops its backward: the exported losses
    # take the whole logits and the ops' own derivatives, as under torch.func (a backward through the
    # exported module had raised "mm(): functions with out=... arguments don't support automatic
    # differentiation"); a dynamic row count exports (the chunk buffer's Min(chunk_rows, N) rows had
    # been a constraint violation)
    m = _FusedLoss(kind)
    x, t = torch.randn(12, 16, requires_grad=True), torch.randint(0, 11, (12,))
    eager = m(x, t)
    want = torch.autograd.grad(eager, (x, m.w))
    exported = torch.export.export(m, (x, t), strict=strict)
    out = exported.module()(x, t)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, (x, m.w)), want)
    if kind == "sequence":  # (its rows' split into sequences is the call's, not a dimension)
        return
    n = torch.export.Dim("n", min=2, max=512)
    with torch.no_grad():
        exported = torch.export.export(m, (x, t), dynamic_shapes=({0: n}, {0: n}), strict=strict)
        x2, t2 = torch.randn(27, 16), torch.randint(0, 11, (27,))
        torch.testing.assert_close(exported.module()(x2, t2), m(x2, t2))


def test_linear_distill_compiles_fullgraph_and_takes_fake_tensors():
    # the student / teacher overlap check had read fake tensors' data pointers (both 0): "teacher
    # logits share memory with the student's" under FakeTensorMode, a failed fullgraph compile
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = _FusedLoss("distill")
    x, t = torch.randn(6, 16, requires_grad=True), torch.randint(0, 11, (6,))
    eager = m(x, t)
    want = torch.autograd.grad(eager, (x, m.w))
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x, t)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, (x, m.w)), want)
    with FakeTensorMode():
        s, t = torch.randn(4, 7), torch.randn(4, 7)
        assert distill_ops.distill_rows_(s, t).shape == (4,)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32])
def test_every_integer_target_dtype_is_taken(dtype):
    # (int8, uint16, uint32 had been refused as "not an integer tensor"; linear_cross_entropy took them)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 7, dtype=torch.float64, generator=g), torch.tensor([0, 6, 2, 3, 1])
    assert rel_err(pyllm.cross_entropy(logits, targets.to(dtype)), F.cross_entropy(logits, targets)) < 1e-14
    with pytest.raises(TypeError, match="int64, int32"):
        pyllm.cross_entropy(logits, targets.float())


@pytest.mark.parametrize("kw, named", [(dict(reduction="avg"), "reduction"), (dict(label_smoothing=2.0), "label_smoothing"),
                                       (dict(softcap=-1.0), "softcap"), (dict(softcap=0.0), "softcap"),
                                       (dict(lse_square_scale=-1.0), "lse_square_scale")])
def test_linear_cross_entropy_loss_checks_its_arguments_when_made(kw, named):
    # as Liger's module asserts them in __init__ (they had surfaced at the first forward, naming the function)
    from pyllm.nn import LinearCrossEntropyLoss

    with pytest.raises(ValueError, match=f"LinearCrossEntropyLoss: .*{named}"):
        LinearCrossEntropyLoss(**kw)


def test_dir_lists_the_lazy_names():
    assert {"linear_cross_entropy", "nn", "model", "rms_norm"} <= set(dir(pyllm))


@pytest.mark.parametrize("loss", ["cross_entropy", "token_logps", "sequence", "distill"])
def test_fused_losses_keep_an_fp32_master_weights_gradient_unrounded_under_autocast(loss):
    # The fused losses had cast the weight before their Functions: the fp32 sum of the chunks' products
    # came back rounded to bf16 (torch's autocast F.linear does so too; Liger's does not). From the
    # ops-API audit.
    from pyllm import nn as pnn

    g = torch.Generator().manual_seed(0)
    x, w0 = torch.randn(512, 32, generator=g), torch.randn(300, 32, generator=g) * 0.1
    t = torch.randint(0, 300, (512,), generator=g)
    xb, wb = x.bfloat16().double(), w0.bfloat16().double().requires_grad_()
    calls = {
        "cross_entropy": lambda x, w: pnn.linear_cross_entropy(x, w, t, 64),
        "token_logps": lambda x, w: pnn.linear_token_logps(x, w, t, 64).sum(),
        "sequence": lambda x, w: pnn.linear_sequence_loss(x, w, t, [64] * 8, 2, lambda s, a, b: -s.sum(), 128)[0],
        "distill": lambda x, w: pnn.linear_distill(x, w, x.flip(0), w.detach().flip(0), 0.5, 1.0, 64)}
    calls[loss](xb, wb).backward()
    w = w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        calls[loss](x, w).backward()
    assert w.grad.dtype == torch.float32 and not torch.equal(w.grad, w.grad.bfloat16().float())
    err = ((w.grad.double() - wb.grad).abs().max() / wb.grad.abs().max()).item()
    assert err < 2 ** -8  # (bf16's rounding of the whole: up to 2^-9 relative, plus the products')


# --- token statistics (TRL's metrics entropy, mean_token_accuracy and DPO's logits/*) ------------

def reference_stats(logits, targets, ignore_index, scale, softcap, dtype=torch.float64):
    """Each row's entropy of softmax(z), whether its target is argmax(z) and the mean of z, z the
    final logits in dtype (float64: the reference; float32: what torch computes, as TRL does, from
    the same logits)."""
    z = logits.to(dtype) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    counted = targets != ignore_index
    return (torch.where(counted, entropy, 0.0), (z.argmax(dim=-1) == targets) & counted,
            torch.where(counted, z.mean(dim=-1), 0.0))


@row_grid
def test_token_stats_match_float64(device, dtype, shape, variant):
    # Each row's entropy and mean logit within twice torch's own error (fp32 math on the same
    # logits, as TRL's) against float64, scaled and capped logits too; is_top1 exactly torch's
    # argmax of the fp32 final logits (the first of equal maxima), on rows whose target is the
    # argmax and rows whose target is not; 0, False and 0 where ignored.
    _, _, scale, softcap = variant
    logits = logits_of(shape, dtype, device)
    targets = targets_of(shape, shape[-1], device)
    hits = (logits.float() * scale if softcap is None else softcap * torch.tanh(logits.float() * scale / softcap)
            ).argmax(dim=-1)
    keep = targets.view(-1)[1::3] != -100
    targets.view(-1)[1::3] = torch.where(keep, hits.view(-1)[1::3], targets.view(-1)[1::3])  # a third at the argmax
    entropy, top1, mean = pyllm.ops.cross_entropy.token_stats(logits, targets, scale=scale, softcap=softcap)
    ref_entropy, _, ref_mean = reference_stats(logits.cpu(), targets.cpu(), -100, scale, softcap)
    theirs, their_top1, their_mean = reference_stats(logits, targets, -100, scale, softcap, torch.float32)
    assert entropy.dtype == mean.dtype == torch.float32 and entropy.shape == mean.shape == targets.shape
    assert top1.dtype == torch.bool
    assert rel_err(entropy, ref_entropy) <= tolerance(theirs, ref_entropy)
    # (a mean of O(1) logits can be ~0: its error is taken relative to the mean |z|, the sum's
    # condition, with one fp32 rounding of that as the floor)
    z_abs = reference_stats(logits.abs().cpu(), targets.cpu(), -100, scale, None)[2]  # (capped: |z| is less)

    def mean_err(m):
        return ((m.double().cpu() - ref_mean).abs() / z_abs.clamp_min(1e-300)).max().item()

    assert mean_err(mean) <= 2 * max(mean_err(their_mean), 2 ** -24)
    assert torch.equal(top1, their_top1) and bool(top1.any()) == bool(keep.any())
    ignored = targets == -100
    assert not entropy[ignored].any() and not top1[ignored].any() and not mean[ignored].any()


def test_token_stats_take_the_first_maximum_and_mark_rows_without_a_softmax():
    # Ties: the target is the argmax only as the first of equal maxima (torch.argmax's, TRL's
    # is_top1); a masked class (-inf) adds 0 to the entropy; a NaN logit, a row of -inf and a +inf
    # give a NaN entropy and False, as the loss is NaN there; the mean logit as it comes. The kernel
    # (CPU) and the torch ops (CUDA's) agree.
    inf, nan = math.inf, math.nan
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0], [0.5, -inf, 2.0, 1.0], [nan, 0.0, 1.0, 2.0],
                      [-inf] * 4, [inf, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([2, 1, 2, 3, 0, 0, -100])
    entropy, top1, mean = pyllm.ops.cross_entropy.token_stats(x, t)
    assert top1.tolist() == [False, True, True, False, False, False, False]
    assert mean[[0, 1, 3, 4, 5, 6]].tolist()[:2] == [1.75, 1.75] and mean[2] == -inf and mean[3].isnan()
    assert mean[4] == -inf and mean[5] == inf and mean[6] == 0
    p = torch.softmax(x[:3].double(), -1)
    want = -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1)
    assert torch.allclose(entropy[:3].double(), want, rtol=1e-6) and entropy[3:6].isnan().all() and entropy[6] == 0
    torch_ops = ce_ops.stats_of_shaped(x, t, t != -100)
    assert torch.equal(torch_ops[:, 1] > 0, top1) and torch.allclose(torch_ops[:, 0], entropy, equal_nan=True)
    assert torch.equal(torch_ops[:, 2], mean.nan_to_num(0.0)) or torch.allclose(torch_ops[:, 2], mean, equal_nan=True)
    # (a target out of range, which the CPU refuses: torch ops give it NaN and 0, as CUDA gives its loss NaN)
    out = ce_ops.stats_of_shaped(x[:2], torch.tensor([4, -5]), torch.tensor([True, True]))
    assert out[:, 0].isnan().all() and not out[:, 1].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_op_writes_every_token_stat_and_the_same_loss_and_gradient(dtype):
    # cross_entropy_rows_'s stats (the fused losses'): every entry written over a poisoned buffer,
    # token_stats' values; the losses and the gradient over the logits bit for bit the same as
    # without them.
    logits = logits_of((33, 1001), dtype, "cpu")
    targets = targets_of((33, 1001), 1001, "cpu")
    stats = poisoned((33, 3), torch.float32, "cpu")
    with_stats, without = logits.clone(), logits.clone()
    loss, z = ce_ops.cross_entropy_rows_(with_stats, targets, z_loss=1e-3, label_smoothing=0.1, stats=stats)
    loss0, z0 = ce_ops.cross_entropy_rows_(without, targets, z_loss=1e-3, label_smoothing=0.1)
    assert torch.equal(loss, loss0) and torch.equal(z, z0) and torch.equal(with_stats, without)
    entropy, top1, mean = ce_ops.token_stats(logits, targets)
    assert torch.equal(stats[:, 0], entropy) and torch.equal(stats[:, 1] > 0, top1) and torch.equal(stats[:, 2], mean)


@pytest.mark.level_free
def test_token_stats_are_checked_and_compile():
    # token_stats takes cross_entropy's checks (out-of-range targets named) and traces whole under
    # torch.compile (a custom op with a fake), giving eager's values.
    logits = logits_of((4, 9, 50), torch.float32, "cpu")
    targets = targets_of((4, 9, 50), 50, "cpu")
    with pytest.raises(ValueError, match="targets must be in"):
        ce_ops.token_stats(logits, torch.full_like(targets, 50))
    with pytest.raises(ValueError, match="targets must have logits' shape"):
        ce_ops.token_stats(logits, targets[:, :3])
    torch._dynamo.reset()
    compiled = torch.compile(lambda l, t: ce_ops.token_stats(l, t, softcap=5.0), fullgraph=True)(logits, targets)
    eager = ce_ops.token_stats(logits, targets, softcap=5.0)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager)) and len(eager) == 3


def liger_reference(logits, targets, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap):
    """Liger-Kernel's LigerCrossEntropyFunction's loss and z-loss, its kernel's formulas written in
    logits' dtype (float64: the reference): z capped, each counted row (1 - e) w_y (lse - z_y) + e / V
    sum_i w_i (lse - z_i) + s lse^2, "mean" divided by the counted rows' w_y summed (z-loss by their
    number), 0 for none."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    V = z.shape[-1]
    w = torch.ones(V, dtype=z.dtype) if weight is None else weight.to(z.dtype)
    counted = targets != ignore_index
    t = torch.where(counted, targets, 0)
    lse = torch.logsumexp(z, -1)
    nll = w[t] * (lse - z.gather(-1, t[..., None])[..., 0])
    smooth = label_smoothing / V * ((lse[..., None] - z) * w).sum(-1)
    z_loss = torch.where(counted, lse_square_scale * lse.square(), 0.0)
    rows = torch.where(counted, (1 - label_smoothing) * nll + smooth, 0.0) + z_loss
    if reduction == "none":
        return rows, z_loss
    if reduction == "sum":
        return rows.sum(), z_loss.sum()
    n, wsum = counted.sum(), torch.where(counted, w[t], 0.0).sum()
    main = (rows - z_loss).sum() / wsum if n else rows.sum() * 0
    return main + (z_loss.sum() / n if n else 0.0), z_loss.sum() / n if n else z_loss.sum() * 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ligers_cross_entropy_module_and_functional(reduction):
    # pyllm.nn.LigerCrossEntropyLoss: Liger-Kernel's LigerCrossEntropyLoss's arguments in its order,
    # forward(_input, target) and CrossEntropyOutput (loss, z_loss, token_accuracy, predicted_tokens)
    # when any return_* is asked; the loss and the gradient its formulas give (float64); "mean" over no
    # counted target 0 (zero gradient), accuracy NaN; liger_cross_entropy its functional signature
    from pyllm.nn import CrossEntropyOutput, LigerCrossEntropyLoss, liger_cross_entropy

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 7, 50, dtype=torch.float64, generator=g) * 3
    targets = torch.randint(0, 50, (2, 7), generator=g)
    targets[0, ::3] = -100
    targets[1, 2] = logits[1, 2].argmax()
    weight = torch.rand(50, dtype=torch.float64, generator=g) + 0.5
    for args in ((None, -100, 1e-2, 0.1, reduction, 4.0), (weight, -100, 0.0, 0.0, reduction, None),
                 (None, 7, 0.0, 0.2, reduction, None)):
        t = targets.clone()
        if args[1] == 7:
            t[t == -100] = 7
        x = logits.clone().requires_grad_()
        out = LigerCrossEntropyLoss(*args, True, True, True)(x, t)
        assert isinstance(out, CrossEntropyOutput)
        y = logits.clone().requires_grad_()
        ref, z_ref = liger_reference(y, t, *args)
        dout = torch.rand(ref.shape, dtype=torch.float64, generator=g) + 0.5
        (grad,), (grad_ref,) = torch.autograd.grad(out.loss, x, dout), torch.autograd.grad(ref, y, dout)
        assert rel_err(out.loss, ref) < 1e-13 and rel_err(grad, grad_ref) < 1e-13
        assert rel_err(out.z_loss, z_ref) < 1e-13 or (args[2] == 0 and not out.z_loss.any())
        z = logits if args[5] is None else args[5] * torch.tanh(logits / args[5])
        top = torch.where(t != args[1], z.argmax(-1), -1)
        assert out.predicted_tokens.dtype == torch.int64 and torch.equal(out.predicted_tokens, top.reshape(-1))
        hits = ((top == t) & (t != args[1])).float()
        accuracy = hits if reduction == "none" else hits.sum() / (t != args[1]).sum()
        assert torch.equal(out.token_accuracy, accuracy) and hits.any()
        # the functional form: F.cross_entropy's arguments first (size_average, reduce: torch's), then Liger's
        named = liger_cross_entropy(logits, t, args[0], ignore_index=args[1], lse_square_scale=args[2],
                                    label_smoothing=args[3], reduction=reduction, softcap=args[5])
        assert torch.equal(named, LigerCrossEntropyLoss(*args)(logits, t))
    x = logits.clone().requires_grad_()
    ignored = torch.full((2, 7), -100)
    out = LigerCrossEntropyLoss(None, -100, 1e-2, 0.1, reduction, None, True, True)(x, ignored)
    out.loss.sum().backward()
    assert not out.loss.any() and not out.z_loss.any() and not x.grad.any() and out.predicted_tokens is None
    assert out.token_accuracy.isnan().all() if reduction != "none" else not out.token_accuracy.any()
    # 16-bit logits: the loss in fp32 within twice torch's fp32-from-bf16 error of the float64 one
    half = logits.to(torch.bfloat16)
    ours = LigerCrossEntropyLoss(lse_square_scale=1e-3, label_smoothing=0.1, reduction=reduction)(half, targets)
    ref, _ = liger_reference(half.double(), targets, None, -100, 1e-3, 0.1, reduction, None)
    theirs, _ = liger_reference(half.float(), targets, None, -100, 1e-3, 0.1, reduction, None)
    assert ours.dtype == torch.float32 and rel_err(ours, ref) <= tolerance(theirs.float(), ref)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert liger_cross_entropy(logits, targets, None, None, -100, False).shape == targets.shape  # (reduce=False)
    if reduction == "mean":  # torch.compile traces it whole (the custom op, the argmax in torch ops)
        module = LigerCrossEntropyLoss(None, -100, 1e-3, 0.0, reduction, 5.0, True, True, True)
        torch._dynamo.reset()
        compiled, eager = torch.compile(module, fullgraph=True)(logits, targets), module(logits, targets)
        assert all(rel_err(a, b) < 1e-14 for a, b in zip(compiled, eager))
    with pytest.raises(NotImplementedError, match="without label_smoothing and lse_square_scale"):
        LigerCrossEntropyLoss(weight, label_smoothing=0.1)
    with pytest.raises(ValueError, match="softcap must be None or positive"):
        LigerCrossEntropyLoss(softcap=0.0)
    with pytest.raises(ValueError, match="reduction must be"):
        LigerCrossEntropyLoss(reduction="avg")


def test_ligers_functional_fused_linear_cross_entropy():
    # liger_kernel.transformers.functional.liger_fused_linear_cross_entropy's signature (input first,
    # bias 4th, ignore_index -100, "mean"), positionally and by name: LinearCrossEntropyLoss's values
    from pyllm.nn import LinearCrossEntropyLoss, liger_fused_linear_cross_entropy

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(6, 8, dtype=torch.float64, generator=g), torch.randn(12, 8, dtype=torch.float64, generator=g)
    targets = torch.tensor([1, 2, -100, 3, 11, 0])
    assert rel_err(liger_fused_linear_cross_entropy(x, w, targets), F.cross_entropy(x @ w.t(), targets)) < 1e-14
    out = liger_fused_linear_cross_entropy(x, w, targets, None, None, -100, 1e-2, 0.1, "sum", 3.0, True, None, True,
                                           True, True)
    ref = LinearCrossEntropyLoss(None, -100, 1e-2, 0.1, "sum", 3.0, True, None, True, True, True)(w, x, targets)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    named = liger_fused_linear_cross_entropy(input=x, weight=w, target=targets, lse_square_scale=1e-2,
                                             return_z_loss=True, use_token_scaling=True, return_predicted_tokens=True)
    assert named.predicted_tokens.tolist()[2] == -1 and named.token_accuracy is None
    with pytest.raises(ValueError, match="bias is not taken"):
        liger_fused_linear_cross_entropy(x, w, targets, torch.zeros(12))


@pytest.mark.parametrize("module", ["LigerCrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_ligers_losses_count_uint8_targets_that_read_as_the_ignore_index_wrapped(module):
    # uint8 targets hold no -100 (the losses widen them: no row is ignored), but uint8 == -100 compares
    # 156 == 156: a batch whose targets were all class 156 had its "mean" loss replaced by 0 (Liger's
    # value for all ignored), and "sum"'s token accuracy divided by the rows that were not 156.
    torch.manual_seed(0)
    V, D = 200, 16
    x, w = torch.randn(4, D, dtype=torch.float64), torch.randn(V, D, dtype=torch.float64)
    logits = x @ w.t()
    loss_of = (lambda t, **kw: pyllm.nn.LigerCrossEntropyLoss(**kw)(logits, t)) if module == "LigerCrossEntropyLoss" \
        else (lambda t, **kw: pyllm.nn.LinearCrossEntropyLoss(**kw)(w, x, t))
    t = torch.full((4,), 156, dtype=torch.uint8)
    assert loss_of(t).item() == pytest.approx(F.cross_entropy(logits, t.long()).item(), rel=1e-9)
    t = torch.tensor([156, 3, 156, 5], dtype=torch.uint8)
    t[:2] = logits.argmax(-1)[:2]
    wide, narrow = (loss_of(u, reduction="sum", return_token_accuracy=True).token_accuracy for u in (t.long(), t))
    assert narrow.item() == wide.item()


def test_fused_losses_take_a_hidden_size_of_zero():
    # every logit is 0 there: each counted row's loss is log V (a reshape(-1, 0) had raised torch's
    # "ambiguous" error from inside the op)
    from pyllm.nn import linear_cross_entropy, linear_token_logps

    x = torch.randn(3, 0, requires_grad=True)
    weight = torch.randn(11, 0, requires_grad=True)
    targets = torch.tensor([0, 4, -1])
    loss = linear_cross_entropy(x, weight, targets)
    assert math.isclose(loss.item(), 2 * math.log(11), rel_tol=1e-6)  # (the sum over the two counted rows)
    loss.backward()
    assert x.grad.shape == (3, 0) and weight.grad.shape == (11, 0)
    logps = linear_token_logps(x.detach(), weight.detach(), targets)
    torch.testing.assert_close(logps, torch.tensor([-math.log(11), -math.log(11), 0.0]))
