import copy
import importlib
import io
import math
import warnings
import sys

import pytest
import torch
import torch.nn as nn

from pyllm import _C
from pyllm.ops import _util
from pyllm.optim import AdamW, DynamicLossScaler
from helpers import CPU_AND_CUDA, free_port, rel_err, tolerance

# One layer of 80K weights: several 16K-element chunks and past the CPU kernel's threading cutoff.
IN, HIDDEN, OUT = 32, 2500, 8

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="compared with torch.optim.Muon (torch 2.9+)")


def make_model(device="cpu", dtype=torch.float32):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(device, dtype)


def batch(device, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, IN, generator=g), torch.randn(64, OUT, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


def backward(model, x, y, scale=1.0):
    for p in model.parameters():
        p.grad = None
    loss = ((model(x) - y) ** 2).mean()
    (loss * scale).backward()


def train(model, opt, steps, device, dtype=torch.float32, **step_kwargs):
    x, y = batch(device, dtype)
    for _ in range(steps):
        backward(model, x, y)
        opt.step(**step_kwargs)


def flat(params):
    """All params as one float64 vector: error statistics over the whole model, not over an
    8-element bias where either side can get lucky."""
    return torch.cat([p.detach().double().cpu().reshape(-1) for p in params])


def random_grads(params, generator, scale=1.0):
    return [(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale) for p in params]


def snapshot(model, opt):
    """Every bit the optimizer owns or writes."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


# --- fp32: against torch.optim.AdamW and a float64 run ------------------------------------------

@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_fp32_100_steps_match_torch_against_float64(device):
    # A fixed random gradient sequence, not the model's own gradients: through the model each
    # step's rounding feeds the next gradients, and Adam's near sign-like steps on near-zero
    # gradients make 100-step differences chaotic (on one machine torch and ours drifted 2x apart
    # from float64 by luck). Fixed gradients leave only the optimizer's own rounding to compare.
    ours, torch32 = make_model(device), make_model(device)
    ref = make_model("cpu", torch.float64)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opts = (AdamW(ours.parameters(), **hyper), torch.optim.AdamW(torch32.parameters(), **hyper),
            torch.optim.AdamW(ref.parameters(), **hyper))
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        grads = random_grads(list(ref.parameters()), gen)
        for model, opt in zip((ours, torch32, ref), opts):
            for param, g in zip(model.parameters(), grads):
                param.grad = g.to(param.device, param.dtype)
            opt.step()
    p, t, r = flat(ours.parameters()), flat(torch32.parameters()), flat(ref.parameters())
    assert rel_err(p, r) <= tolerance(t.float(), r)
    assert rel_err(p, t) <= tolerance(t.float(), r)  # and close to torch itself


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_param_groups_with_different_lr_and_weight_decay(device):
    def groups(m):
        return [{"params": m[0].parameters(), "lr": 1e-2, "weight_decay": 0.3},
                {"params": m[2].parameters(), "lr": 2e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]
    ours, torch32, ref = make_model(device), make_model(device), make_model("cpu", torch.float64)
    train(ours, AdamW(groups(ours), lr=1.0), 20, device)
    train(torch32, torch.optim.AdamW(groups(torch32), lr=1.0), 20, device)
    train(ref, torch.optim.AdamW(groups(ref), lr=1.0), 20, "cpu", torch.float64)
    for layer in (0, 2):  # per group
        p, t, r = (flat(m[layer].parameters()) for m in (ours, torch32, ref))
        assert rel_err(p, r) <= tolerance(t.float(), r)


def test_lr_scheduler_drives_lr():
    ours, torch32 = make_model(), make_model()
    opt_ours, opt_torch = AdamW(ours.parameters(), lr=1e-2), torch.optim.AdamW(torch32.parameters(), lr=1e-2)
    sched_ours = torch.optim.lr_scheduler.LambdaLR(opt_ours, lambda s: 1.0 / (1 + s))
    sched_torch = torch.optim.lr_scheduler.LambdaLR(opt_torch, lambda s: 1.0 / (1 + s))
    x, y = batch("cpu")
    for _ in range(10):
        for m, o, s in ((ours, opt_ours, sched_ours), (torch32, opt_torch, sched_torch)):
            backward(m, x, y)
            o.step()
            s.step()
    assert opt_ours.param_groups[0]["lr"] == opt_torch.param_groups[0]["lr"] == pytest.approx(1e-2 / 11)
    for p, t in zip(ours.parameters(), torch32.parameters()):
        assert rel_err(p, t) < 1e-5


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_params_without_grads_are_left_alone(device):
    model = make_model(device)
    opt = AdamW(model.parameters(), lr=1e-2)
    frozen = model[0].weight
    before = frozen.detach().clone()
    x, y = batch(device)
    for _ in range(3):
        backward(model, x, y)
        frozen.grad = None
        opt.step(max_grad_norm=1.0)
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert not torch.equal(model[2].weight, make_model(device)[2].weight)


def test_bitwise_the_same_for_any_thread_count():
    """The grad norm's reduction order is fixed by the chunking, not by the threads."""
    threads_before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)  # torch and pyllm share one OpenMP runtime
            model = make_model("cpu", torch.bfloat16)
            opt = AdamW(model.parameters(), lr=1e-2, stochastic_rounding=True)
            gen = torch.Generator().manual_seed(0)  # grads that do not depend on torch's threads
            for _ in range(2):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=gen).bfloat16()
                opt.step(max_grad_norm=0.1)
            results.append([opt.last_grad_norm] + snapshot(model, opt))
    finally:
        torch.set_num_threads(threads_before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- 16-bit params with fp32 master weights -------------------------------------------------------

@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_with_master_tracks_fp32_reference(device, dtype):
    """Same (16-bit-rounded) grads into our 16-bit model and into torch's fp32 / fp64 AdamW:
    our master weights follow the fp32 reference to fp32 accuracy, and the 16-bit params are
    the master rounded to nearest."""
    torch.manual_seed(3)
    init = [torch.randn(3000), torch.randn(7, 13), torch.randn(70000)]
    ours = [nn.Parameter(t.to(device, dtype)) for t in init]
    ref32 = [nn.Parameter(p.detach().float()) for p in ours]
    ref64 = [nn.Parameter(p.detach().double().cpu()) for p in ours]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt, opt32, opt64 = AdamW(ours, **hyper), torch.optim.AdamW(ref32, **hyper), torch.optim.AdamW(ref64, **hyper)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        for g, p, p32, p64 in zip(random_grads(init, gen), ours, ref32, ref64):
            g16 = g.to(dtype)
            p.grad, p32.grad, p64.grad = g16.to(device), g16.float().to(device), g16.double()
        opt.step(), opt32.step(), opt64.step()
    for p, p32, p64 in zip(ours, ref32, ref64):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32
        assert rel_err(master, p64) <= tolerance(p32, p64)
        assert torch.equal(p, master.to(dtype))
        assert rel_err(p, p64) <= 2 * rel_err(p64.to(dtype), p64) + tolerance(p32, p64)


@pytest.mark.parametrize("dtype, mantissa_bits", [(torch.bfloat16, 7), (torch.float16, 10)], ids=["bf16", "fp16"])
def test_16bit_without_master_rounds_each_step(dtype, mantissa_bits):
    """master_weights=False: the update runs in fp32 from the 16-bit param and rounds back: within
    one unit in the last place of the exact (float64) update."""
    torch.manual_seed(5)
    p = nn.Parameter(torch.randn(5000).to(dtype))
    opt = AdamW([p], lr=1e-2, weight_decay=0.1, master_weights=False)
    g = torch.randn(5000).to(dtype)
    start = p.detach().double()
    p.grad = g
    opt.step()
    assert "master" not in opt.state[p] and opt.state[p]["exp_avg"].dtype == torch.float32
    gd = g.double()
    m, v = 0.1 * gd, 0.001 * gd * gd
    expect = start * (1 - 1e-3) - 1e-2 / 0.1 * m / ((v / 0.001).sqrt() + 1e-8)
    ulp = (expect.abs() * 2.0**-mantissa_bits).clamp_min(2.0**-24)
    assert ((p.double() - expect).abs() <= ulp).all()


# --- clipping, unscaling, inf/nan ---------------------------------------------------------------

def norm_errors(grads):
    """(float64 norm of these gradients, |torch's fp32 norm of them - that|), as clip_grad_norm_ computes it."""
    exact = torch.cat([g.detach().double().cpu().reshape(-1) for g in grads]).norm().item()
    torch32 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
    return exact, abs(torch32 - exact)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipped", "not-clipped"])
def test_clipping_matches_clip_grad_norm(device, max_norm):
    ours, torch32, ref = make_model(device), make_model(device), make_model("cpu", torch.float64)
    opt = AdamW(ours.parameters(), lr=1e-2)
    opt32, opt64 = torch.optim.AdamW(torch32.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x, y = batch(device)
    for _ in range(5):
        backward(ours, x, y)
        grads = [p.grad.clone() for p in ours.parameters()]
        opt.step(max_grad_norm=max_norm)
        backward(torch32, x, y)
        nn.utils.clip_grad_norm_(torch32.parameters(), max_norm)
        opt32.step()
        backward(ref, x.double().cpu(), y.double().cpu())
        nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt64.step()
        assert opt.last_grad_norm.dtype == torch.float64 and not bool(opt.last_step_skipped)
        # The norm of the gradients the optimizer was given, against their float64 norm and torch's
        # fp32 norm of those same gradients (the float64 model's norm differs by the fp32 model's
        # own gradient error, the same for both: comparing against it compared noise).
        exact, torch_err = norm_errors(grads)
        floor = (1e-7 if device == "cpu" else 1e-6) * exact  # CUDA: fp32 sums per chunk
        assert abs(opt.last_grad_norm.item() - exact) <= 2 * max(torch_err, floor)
    for layer in (0, 2):  # per group
        p, t, r = (flat(m[layer].parameters()) for m in (ours, torch32, ref))
        assert rel_err(p, r) <= tolerance(t.float(), r)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_mixed_dtypes_in_one_group_share_one_global_norm(device):
    """bf16 weights and fp32 norms in one group: two buckets, one norm over both, one clip."""
    torch.manual_seed(6)
    ours = [nn.Parameter(torch.randn(3000, device=device).bfloat16()), nn.Parameter(torch.randn(50, device=device)),
            nn.Parameter(torch.randn(7, 9, device=device).half())]
    ref = [nn.Parameter(p.detach().double().cpu()) for p in ours]
    torch32 = [nn.Parameter(p.detach().float().cpu()) for p in ours]  # torch's own: fp32 masters, fp32 AdamW
    opt, opt64 = AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    opt32 = torch.optim.AdamW(torch32, lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p, r, t in zip(ours, ref, torch32):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, r.grad, t.grad = g.to(device), g.double(), g.float()
        opt.step(max_grad_norm=0.5)
        norm64 = nn.utils.clip_grad_norm_(ref, 0.5)
        opt64.step()
        nn.utils.clip_grad_norm_(torch32, 0.5)
        opt32.step()
        # CPU: fp64 accumulation; CUDA: fp32 sums per 64K-element chunk, then fp64
        assert opt.last_grad_norm.item() == pytest.approx(norm64.item(), rel=1e-9 if device == "cpu" else 1e-6)
    masters = [opt.state[ours[0]]["master"], ours[1], opt.state[ours[2]]["master"]]
    assert rel_err(flat(masters), flat(ref)) <= tolerance(flat(torch32), flat(ref))  # (< 1e-6 had been ~7x that)


def test_unscaling_matches_torch_grad_scaler():
    """Scaled loss -> our fused unscale + clip + step, against torch.amp.GradScaler.unscale_ +
    clip_grad_norm_ + AdamW, both against an unscaled float64 run (scales are powers of two)."""
    ours, torch32, ref = make_model(), make_model(), make_model("cpu", torch.float64)
    opt, opt32 = AdamW(ours.parameters(), lr=1e-2), torch.optim.AdamW(torch32.parameters(), lr=1e-2)
    opt64 = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scaler, torch_scaler = DynamicLossScaler(init_scale=2.0**12), torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch("cpu")
    for _ in range(5):
        for p in ours.parameters():
            p.grad = None
        scaler.scale(((ours(x) - y) ** 2).mean()).backward()
        opt.step(grad_scaler=scaler, max_grad_norm=0.5)
        scaler.update()
        opt32.zero_grad()
        torch_scaler.scale(((torch32(x) - y) ** 2).mean()).backward()
        torch_scaler.unscale_(opt32)
        norm32 = nn.utils.clip_grad_norm_(torch32.parameters(), 0.5)
        torch_scaler.step(opt32)
        torch_scaler.update()
        backward(ref, x.double(), y.double())
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt64.step()
        assert opt.last_grad_norm.item() == pytest.approx(norm32.item(), rel=1e-5)
    assert scaler.get_scale() == torch_scaler.get_scale()
    for layer in (0, 2):  # per group
        p, t, r = (flat(m[layer].parameters()) for m in (ours, torch32, ref))
        assert rel_err(p, r) <= tolerance(t.float(), r)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_inf_or_nan_in_one_grad_skips_the_whole_step(device, dtype, bad):
    model = make_model(device, dtype)
    opt = AdamW(model.parameters(), lr=1e-2)
    scaler = DynamicLossScaler(init_scale=256.0)
    x, y = batch(device, dtype)
    for _ in range(2):
        backward(model, x, y, scale=scaler.get_scale())
        opt.step(grad_scaler=scaler, max_grad_norm=1.0)
        scaler.update()
    assert not bool(opt.last_step_skipped)
    before = snapshot(model, opt)
    backward(model, x, y, scale=scaler.get_scale())
    model[2].bias.grad[3] = bad  # one element of one small grad
    opt.step(grad_scaler=scaler, max_grad_norm=1.0)
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # bitwise, steps included
    assert bool(opt.last_step_skipped) and not math.isfinite(opt.last_grad_norm.item())
    scaler.update()
    assert scaler.get_scale() == 128.0
    # Without a scaler, clipping alone still guards the step.
    opt.step(max_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_finite_grads_are_not_an_overflow(device, dtype):
    """Grads whose squares overflow fp32 (|g| > ~1.8e19) but not the fp64 sum of squares: the norm
    is finite (and below fp32's max, which the clip computes in), so the step is taken and clipped.
    Sizes reach the CUDA kernel's 16-byte path, its scalar tail and a second chunk."""
    params = [nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) for n in (8 * 1000 + 5, 65536 + 3)]
    for p in params:
        p.grad = torch.full_like(p, 1e30)
        p.grad[1::2] = -1e20
    opt = AdamW(params, lr=1e-3, weight_decay=0.0)
    opt.step(max_grad_norm=1.0)
    ref = torch.cat([p.grad.double().cpu() for p in params]).square().sum().sqrt().item()
    assert not bool(opt.last_step_skipped)
    assert opt.last_grad_norm.item() == pytest.approx(ref, rel=1e-12)
    for p in params:  # Adam's first step moves each element by lr against its grad's sign
        assert torch.isfinite(p).all() and (p[0::2] < 0).all() and (p[1::2] > 0).all()


def test_scaler_growth_and_backoff_follow_grad_scaler():
    ours = DynamicLossScaler(init_scale=8.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=3)
    scale, tracker = torch.tensor(8.0), torch.tensor(0, dtype=torch.int32)
    pattern = [False, False, False, False, True, False, False, False, False, False, False, True, True]
    for found in pattern:
        ours.update(found)
        torch._amp_update_scale_(scale, tracker, torch.tensor(float(found)), 2.0, 0.25, 3)
        assert ours.get_scale() == scale.item()
    assert ours.state_dict()["_growth_tracker"] == tracker.item()


def test_scaler_growth_after_interval_and_state_dict():
    s = DynamicLossScaler(init_scale=4.0, growth_interval=2)
    s.update(False)
    assert s.get_scale() == 4.0
    s.update(torch.tensor(0.0))
    assert s.get_scale() == 8.0
    s.update(True)
    assert s.get_scale() == 4.0
    s.update(False)
    t = DynamicLossScaler()
    t.load_state_dict(copy.deepcopy(s.state_dict()))
    assert t.state_dict() == s.state_dict() == {"scale": 4.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                 "growth_interval": 2, "_growth_tracker": 1}
    t.update(False)
    assert t.get_scale() == 8.0
    assert (s.scale(torch.tensor(3.0)) == 12.0).all()
    big = DynamicLossScaler().scale(torch.tensor(10.0, dtype=torch.float16))
    assert big.dtype == torch.float32 and big.item() == 10.0 * 2**16  # not an fp16 overflow
    with pytest.raises(RuntimeError, match="no inf/nan check"):
        s.update()
    # torch's GradScaler.update(new_scale) sets the scale; here the argument is the found-inf flag, and
    # update(1024.0) had backed the scale off without a word (from the fp16 audit)
    with pytest.raises(TypeError, match="new_scale"):
        t.update(1024.0)
    assert t.get_scale() == 8.0
    t.update(1)  # (a flag as an int still taken)
    assert t.get_scale() == 4.0


def test_unscale_clip_check_skips_params_without_grad():
    # torch's GradScaler.unscale_ skips a param without a grad (an unused module); the helper had
    # raised AttributeError on it with a scaler (from the fp16 audit)
    from pyllm.optim import unscale_clip_check

    m = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "unused": torch.nn.Linear(4, 4)})
    opt = torch.optim.AdamW(m.parameters())
    scaler = DynamicLossScaler(init_scale=8.0)
    scaler.scale(m["used"](torch.randn(2, 4)).sum()).backward()
    expected = m["used"].weight.grad.clone() / 8.0
    norm, skipped = unscale_clip_check(list(m.parameters()), scaler, None, opt)
    assert not skipped and m["unused"].weight.grad is None
    torch.testing.assert_close(m["used"].weight.grad, expected)


# --- state_dict -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_then_identical_steps(dtype):
    model = make_model("cpu", dtype)
    opt = AdamW(model.parameters(), lr=1e-2, stochastic_rounding=dtype == torch.bfloat16)
    train(model, opt, 3, "cpu", dtype, max_grad_norm=1.0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = make_model("cpu", dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = AdamW(resumed.parameters(), lr=5.0)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["seed"] == opt.param_groups[0]["seed"]
    for p in resumed.parameters():
        st = opt2.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["step"].item() == 3.0
        assert ("master" in st) == (dtype != torch.float32)
        assert "master" not in st or st["master"].dtype == torch.float32
    train(model, opt, 4, "cpu", dtype, max_grad_norm=1.0)
    train(resumed, opt2, 4, "cpu", dtype, max_grad_norm=1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), snapshot(resumed, opt2)))


def test_load_state_dict_does_not_share_tensors():
    model = make_model()
    opt = AdamW(model.parameters())
    train(model, opt, 1, "cpu")
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].data_ptr() != sd["state"][0]["exp_avg"].data_ptr()


def test_load_torch_adamw_state_dict_then_continue_like_torch():
    ours, torch32 = make_model(), make_model()
    opt32 = torch.optim.AdamW(torch32.parameters(), lr=1e-2, weight_decay=0.05)
    train(torch32, opt32, 3, "cpu")
    ours.load_state_dict(torch32.state_dict())
    opt = AdamW(ours.parameters())
    opt.load_state_dict(opt32.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["master_weights"] is None
    train(torch32, opt32, 3, "cpu")
    train(ours, opt, 3, "cpu")
    assert rel_err(flat(ours.parameters()), flat(torch32.parameters())) < 1e-6


def test_torch_adamw_signature_is_accepted():
    """Code written for torch.optim.AdamW passes its options: the implementation choices are
    accepted, and what would change the update is refused, never ignored."""
    model = make_model()
    AdamW(model.parameters(), 1e-3, (0.9, 0.999), 1e-8, 0.01, False, maximize=False, foreach=True,
          capturable=False, differentiable=False, fused=True)
    opt = AdamW(model.parameters(), foreach=False, fused=None, capturable=True)
    for option in ("amsgrad", "maximize", "differentiable"):
        with pytest.raises(NotImplementedError, match=f"{option}=True"):
            AdamW(model.parameters(), **{option: True})
    # torch's group and defaults keys too, with the values given (code reads group["amsgrad"] or
    # defaults["fused"]); pyllm's own beside them
    theirs = torch.optim.AdamW(model.parameters(), foreach=False, capturable=True)
    assert set(theirs.defaults) <= set(opt.defaults) and set(theirs.param_groups[0]) <= set(opt.param_groups[0])
    assert opt.defaults["foreach"] is False and opt.defaults["capturable"] is True and not opt.defaults["amsgrad"]


def test_frozen_params_of_any_dtype_are_left_alone():
    """As torch's: a param that does not require grad (an int64 counter, a float64 constant kept as an
    nn.Parameter) is never stepped, so not refused at construction; given a grad later, it is refused at
    that step, before anything moves."""
    weight = nn.Parameter(torch.randn(3))
    frozen = [nn.Parameter(torch.arange(3), requires_grad=False),
              nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False),
              nn.Parameter(torch.zeros(2, device="meta"), requires_grad=False)]
    opt = AdamW([weight, *frozen])
    weight.grad = torch.ones(3)
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight, before) and all(p not in opt.state for p in frozen)
    frozen[1].requires_grad_(True)
    frozen[1].grad = torch.ones(3, dtype=torch.float64)
    before = weight.detach().clone()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        opt.step()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_large_grads_update_the_second_moment_as_torch(device):
    """v = b2 v + ((1 - b2) g) g, torch's order: g * g alone overflows fp32 from |g| ~ 1.8e19, and v
    had gone inf there, freezing the element for good (pyllm before 2026-12-05). No clipping."""
    grads = torch.tensor([1e19, 2e19, -2e20, 3.0, 1e21], device=device)
    ours, theirs = nn.Parameter(torch.ones(5, device=device)), nn.Parameter(torch.ones(5, device=device))
    opts = AdamW([ours], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
    for _ in range(3):
        ours.grad, theirs.grad = grads.clone(), grads.clone()
        for opt in opts:
            opt.step()
    v_ours, v_theirs = opts[0].state[ours]["exp_avg_sq"], opts[1].state[theirs]["exp_avg_sq"]
    assert torch.isfinite(v_ours[:4]).all() and torch.equal(torch.isinf(v_ours), torch.isinf(v_theirs))
    assert rel_err(v_ours[:4], v_theirs[:4]) < 1e-6 and rel_err(ours.detach(), theirs.detach()) < 1e-6


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_torch_state_dict_with_options_we_lack_is_refused_at_the_step(option):
    """A group loaded from torch's state_dict carries its options: stepping it as plain AdamW
    would be another update (2.7e-2 apart after 3 steps with maximize)."""
    theirs, ours = make_model(), make_model()
    torch_opt = torch.optim.AdamW(theirs.parameters(), **{option: True})
    opt = AdamW(ours.parameters())
    opt.load_state_dict(torch_opt.state_dict())
    x, y = batch("cpu")
    backward(ours, x, y)
    before = [p.detach().clone() for p in ours.parameters()]
    with pytest.raises(NotImplementedError, match=f"param group 0: {option}=True"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, ours.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_a_16bit_param_changed_in_place_is_the_weight_again(dtype, stochastic):
    """As with torch.optim.AdamW, the param is the weight: rows set in place after some steps (a
    checkpoint, an init, a clamp) are where the next step starts, elementwise, and the untouched
    elements keep their masters' extra bits, also where a param was rewritten with its own values."""
    if stochastic and dtype == torch.float16:
        pytest.skip("stochastic rounding is bf16's")
    model = make_model(dtype=dtype)
    opt = AdamW(model.parameters(), lr=1e-2, stochastic_rounding=stochastic)
    train(model, opt, 3, "cpu", dtype)
    # The expectation: the same state with the changed rows' masters set by hand.
    reference = copy.deepcopy(model)
    ref_opt = AdamW(reference.parameters(), lr=1e-2, stochastic_rounding=stochastic)
    ref_opt.load_state_dict(opt.state_dict())
    assert not (opt.state[model[0].weight]["master"][:7] == 0.5).any()
    with torch.no_grad():
        model[0].weight[:7] = 0.5
        model[2].load_state_dict(model[2].state_dict())  # its own values again: a new version, no change
        reference[0].weight[:7] = 0.5
        ref_opt.state[reference[0].weight]["master"][:7] = 0.5
    x, y = batch("cpu", dtype)
    for m, o in ((model, opt), (reference, ref_opt)):
        backward(m, x, y)
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], ref_opt.state[q]["master"])


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16bit_value_survives_a_zero_update(device, dtype):
    """All 65536 bit patterns through the kernels' own 16-bit load and store (lr = 0, no master):
    every finite value and both infinities come back bitwise, NaNs stay NaN. Also the sum of
    squares of all finite values against float64."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    p = nn.Parameter(bits.view(dtype).clone().to(device))
    opt = AdamW([p], lr=0.0, weight_decay=0.0, master_weights=False)
    p.grad = torch.zeros_like(p)
    opt.step()
    before = bits.view(dtype).to(device)
    nan = torch.isnan(before)
    assert torch.equal(p[~nan].view(torch.int16), before[~nan].view(torch.int16))
    assert torch.isnan(p[nan]).all()
    # The grad load: with beta1 = 0 the first moment is the grad itself, in fp32.
    r = nn.Parameter(torch.zeros_like(before))
    r.grad = before.clone()
    opt3 = AdamW([r], lr=0.0, betas=(0.0, 0.999))
    opt3.step()
    assert torch.equal(opt3.state[r]["exp_avg"][~nan], before[~nan].float())
    finite = before[torch.isfinite(before)]  # bf16's up to 3.4e38: fp32 squares would overflow
    q = nn.Parameter(torch.zeros_like(finite))
    q.grad = finite.clone()
    opt2 = AdamW([q], lr=0.0)
    opt2.step(max_grad_norm=math.inf)
    ref = finite.double().cpu().square().sum().sqrt().item()
    assert opt2.last_grad_norm.item() == pytest.approx(ref, rel=1e-12)


def test_fp16_conversions_round_to_nearest_even_like_torch():
    """Random fp32 values across fp16's whole range (subnormals, the overflow edge, ties) rounded
    by the kernel's fp16 store, against torch's own conversion."""
    gen = torch.Generator().manual_seed(12)
    exps = torch.randint(-30, 17, (200_000,), generator=gen).double()
    vals = (torch.rand(200_000, generator=gen, dtype=torch.float64) + 1) * 2**exps
    vals = torch.cat([vals, -vals, torch.tensor([65504.0, 65519.99, 65520.0, 2.0**-25, 2.0**-24 * 1.5,
                                                 2.0**-14 * (1 - 2.0**-11), 0.0, -0.0, math.inf, -math.inf])])
    master = vals.float()
    p = nn.Parameter(torch.zeros(master.numel(), dtype=torch.float16))
    opt = AdamW([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.zeros_like(p)
    opt.state[p]["step"] = torch.zeros(())
    opt.state[p]["exp_avg"] = torch.zeros(master.numel())
    opt.state[p]["exp_avg_sq"] = torch.zeros(master.numel())
    opt.state[p]["master"] = master.clone()
    opt._written[id(p)] = p._version  # as a step left them: the master holds the weight, p is to be written
    opt.step()
    assert torch.equal(p.view(torch.int16), master.half().view(torch.int16))


# --- stochastic rounding, poisoned outputs -------------------------------------------------------

def sr_step(seed, n=200_000, lr_in_ulps=0.3, sr=True):
    """All params 1.0 (bf16 ulp 2^-7 above 1, 2^-8 below), one step whose update is exactly -lr."""
    torch.manual_seed(seed)
    p = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    lr = lr_in_ulps * 2.0**-8
    opt = AdamW([p], lr=lr, weight_decay=0.0, eps=0.0, stochastic_rounding=sr)
    p.grad = torch.ones(n, dtype=torch.bfloat16)
    opt.step()
    return p.detach().clone(), opt.state[p]["master"], lr


def test_stochastic_rounding_leaves_fp32_params_alone():
    """SR applies to the bf16 params of a group; its fp32 params (norms, say) step as usual."""
    w, b = nn.Parameter(torch.randn(300).bfloat16()), nn.Parameter(torch.randn(20))
    b_ref = nn.Parameter(b.detach().clone())
    opt, opt32 = AdamW([w, b], lr=1e-2, stochastic_rounding=True), torch.optim.AdamW([b_ref], lr=1e-2)
    w.grad, b.grad = torch.randn(300).bfloat16(), torch.randn(20)
    b_ref.grad = b.grad.clone()
    opt.step(), opt32.step()
    assert rel_err(b, b_ref) < 1e-6
    master = opt.state[w]["master"].double()
    assert ((w.double() - master).abs() <= master.abs() * 2.0**-7).all()  # one of the two neighbours


def test_stochastic_rounding_unbiased_and_reproducible():
    p, master, lr = sr_step(seed=7)
    assert torch.all(master == torch.tensor(1.0 - lr, dtype=torch.float32))
    # Each element is 1 - 2^-8 (prob 0.3) or 1.0 (prob 0.7): the mean is the fp32 master's value.
    down = (p == torch.tensor(1.0 - 2.0**-8, dtype=torch.bfloat16)).double().mean().item()
    assert ((p == 1.0) | (p == 1.0 - 2.0**-8)).all()
    n = p.numel()
    assert abs(down - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert abs(p.double().mean().item() - (1.0 - lr)) < 5 * 2.0**-8 * math.sqrt(0.3 * 0.7 / n)
    again, _, _ = sr_step(seed=7)
    other, _, _ = sr_step(seed=8)
    assert torch.equal(p, again) and not torch.equal(p, other)
    nearest, _, _ = sr_step(seed=7, sr=False)
    assert (nearest == 1.0).all()  # round-to-nearest loses the whole update: the bias SR removes


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_param_element_is_written(device, dtype):
    """Poison the 16-bit params after the masters exist: one step must rewrite every element
    (tails of odd sizes included) from the master."""
    params = [nn.Parameter(torch.randn(n, device=device).to(dtype)) for n in (1, 7, 16384 + 3, 70001)]
    opt = AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.data.fill_(float("nan"))
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        assert torch.isfinite(p).all() and torch.equal(p, opt.state[p]["master"].to(dtype))


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "lr"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=(0.9,)), "pair"), (dict(master_weights="yes"), "master_weights"),
    (dict(lr=math.inf), "lr must be a finite number"), (dict(weight_decay=math.inf), "weight_decay"),
    (dict(lr="0.1"), "lr must be a finite number"), (dict(betas=("0.9", 0.99)), r"betas\[0\] must be a number"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_model().parameters(), **kwargs)


def test_step_moves_the_version_counters_as_an_in_place_update():
    # Stepping D before a backward through a graph that saved D's weights (the GAN mistake): torch's
    # in-place step makes autograd refuse it; pyllm's kernels wrote through the pointer and the
    # backward ran with the new weights, silently (dz 0.25 off).
    for dtype in (torch.float32, torch.bfloat16):
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        z = torch.randn(5, 4, dtype=dtype, requires_grad=True)
        opt = AdamW(net.parameters(), lr=0.1)
        out = net(z).sum()
        out.backward(retain_graph=True)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


def test_step_runs_eagerly_inside_a_compiled_function():
    # A clamp that changes no value moves a bf16 param's version; the next step re-takes changed
    # elements from the param. Traced, inductor dropped that check's dtype round trip and every
    # master bit was taken back from the 16-bit param: the weights never moved. The step is left
    # out of the graph (its kernels are opaque anyway): the same bits as eager.
    results = []
    for compiled in (False, True):
        w = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
        opt = AdamW([w], lr=1e-4, weight_decay=0.0)
        step = torch.compile(lambda: opt.step()) if compiled else opt.step
        for _ in range(40):
            w.grad = torch.ones_like(w)
            step()
            with torch.no_grad():
                w.clamp_(-10, 10)
        results.append((w.detach().clone(), opt.state[w]["master"].clone()))
    assert results[0][1].mean() < 0.9961  # 1 - 40 * 1e-4: moved
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_numpy_numbers_and_load_state_dict_hooks():
    # lr from a numpy float32 table (LambdaLR over np.float32 under numpy 2) is a number as torch
    # takes it; load_state_dict's pre hooks change what is loaded and post hooks see fp32 state.
    import numpy as np

    net = nn.Linear(4, 4).to(torch.bfloat16)
    opt = AdamW(net.parameters(), lr=np.float32(1e-2), betas=(np.float32(0.9), 0.99))
    for _ in range(2):
        net(torch.randn(3, 4, dtype=torch.bfloat16)).sum().backward()
        opt.step()
    other = AdamW(net.parameters(), lr=1e-3)

    def zero_moments(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for state in state_dict["state"].values():
            state["exp_avg"].zero_()
            state["step"] = torch.tensor(0.0)
        return state_dict

    def negative_step(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for state in state_dict["state"].values():
            state["step"] = torch.tensor(-5.0)
        return state_dict

    bad = AdamW(net.parameters(), lr=1e-3)
    bad.register_load_state_dict_pre_hook(negative_step)  # checked as the hooks leave it, before any load
    with pytest.raises(ValueError, match="step must be one number >= 0"):
        bad.load_state_dict(opt.state_dict())
    assert not bad.state
    frozen = nn.Parameter(torch.zeros(4, 4).t(), requires_grad=False)  # no grad, never stepped: not refused
    AdamW([nn.Parameter(torch.zeros(2)), frozen])
    seen = []
    other.register_load_state_dict_pre_hook(zero_moments)
    other.register_load_state_dict_post_hook(lambda o: seen.extend(s["exp_avg"].dtype for s in o.state.values()))
    other.load_state_dict(opt.state_dict())
    assert seen == [torch.float32, torch.float32]
    for state in other.state.values():
        assert not state["exp_avg"].any() and float(state["step"]) == 0.0
        assert state["master"].dtype == torch.float32


def test_bad_params_and_grads():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="one device"):
        AdamW([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    p = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    p.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="stochastic_rounding is for bfloat16"):
        AdamW([p], stochastic_rounding=True).step()
    q = nn.Parameter(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="contiguous"):  # at construction, not at the first step
        AdamW([q])
    with pytest.raises(ValueError, match="contiguous"):  # a param made a view afterwards: at the step
        q2 = nn.Parameter(torch.zeros(4, 4))
        opt = AdamW([q2])
        q2.data = q2.data.t()
        q2.grad = torch.ones(4, 4)
        opt.step()
    with pytest.raises(ValueError, match="params must be on cpu or cuda"):
        AdamW([nn.Parameter(torch.zeros(2, device="meta"))])
    opt = AdamW([nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.zeros(2, dtype=torch.float64))]))
    assert len(opt.param_groups) == 1  # a refused group is not left behind
    r = nn.Parameter(torch.zeros(3))
    r.grad = torch.ones(3)
    with pytest.raises(TypeError, match="DynamicLossScaler"):
        AdamW([r]).step(grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW([r]).step(max_grad_norm=-1.0)
    opt = AdamW([r])
    opt.param_groups[0]["lr"] = -1.0  # a scheduler gone wrong is caught at the step
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    with warnings.catch_warnings():  # refused before torch's own warning of the same
        warnings.simplefilter("error")
        for group in ([r, r], (p for p in (r, r)), [{"params": [r]}, {"params": [r]}]):
            with pytest.raises(ValueError, match="more than (once|one parameter group)"):  # torch warned, then stepped it twice
                AdamW(group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_of_another_size_is_refused_not_overrun(dtype):
    # The fused step walks p.numel() elements of each state buffer: a state_dict of a smaller model,
    # or a param resized after its first step, had it read and write past their ends (SIGSEGV, heap
    # corruption). A ValueError naming the param now, before anything is written; a negative step
    # (NaN bias corrections) is refused at the load.
    small = nn.Parameter(torch.randn(10, dtype=dtype))
    small.grad = torch.randn(10, dtype=dtype)
    opt = AdamW([small])
    opt.step()
    big = nn.Parameter(torch.randn(4096, dtype=dtype))
    big.grad = torch.randn(4096, dtype=dtype)
    other = AdamW([big])
    other.load_state_dict(opt.state_dict())
    before = big.detach().clone()
    with pytest.raises(ValueError, match=r"param of shape \(4096,\) whose state 'exp_avg' is torch.float32 \(10,\)"):
        other.step()
    assert torch.equal(big, before)
    small.data = torch.randn(4096, dtype=dtype)
    small.grad = torch.randn(4096, dtype=dtype)
    with pytest.raises(ValueError, match="resized after its first step"):
        opt.step()
    state = opt.state_dict()
    state["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="step must be one number >= 0"):
        AdamW([nn.Parameter(torch.randn(10, dtype=dtype))]).load_state_dict(state)


def test_cuda_param_without_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _util.check_backend("AdamW", torch.device("cuda"))


def test_cuda_launchers_without_cuda_kernels_raise(monkeypatch):
    # pyllm.ops.adamw's launchers are public and skip AdamW's checks: the clear error, not an
    # AttributeError or torch's own. A stand-in for a CUDA tensor (no GPU here).
    from types import SimpleNamespace
    from pyllm.ops import adamw as adamw_ops

    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32,
                           data_ptr=lambda: 256, numel=lambda: 4)
    table = torch.zeros(7, 1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        adamw_ops.grad_sumsq_([fake], table, fake)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        adamw_ops.step_([fake], table, has_master=False, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0, sumsq=None, loss_scale=None, max_grad_norm=None,
                        stochastic_rounding=False, seed=0)


def test_a_second_step_before_update_raises_as_grad_scaler():
    # torch.amp.GradScaler refuses it: the same scaled grads would be applied twice. Two optimizers
    # sharing one scaler each step once; update() opens the next round.
    from pyllm.optim import Muon, MuonAdamW
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8))
    w, c = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    opt_a, opt_b = AdamW([a], lr=1e-2), AdamW([b], lr=1e-2)
    muon = MuonAdamW(Muon([w], lr=0.01), AdamW([c], lr=0.01))
    scaler = DynamicLossScaler(init_scale=4.0)
    for _ in range(2):
        scaler.scale((a.sum() * b.sum()) + (w @ c).square().sum()).backward()
        opt_a.step(grad_scaler=scaler)
        opt_b.step(grad_scaler=scaler)
        muon.step(grad_scaler=scaler)
        before = a.detach().clone()
        for opt in (opt_a, muon):
            with pytest.raises(RuntimeError, match="already called since the scaler's last update"):
                opt.step(grad_scaler=scaler)
        assert torch.equal(a, before)  # refused before anything moved
        scaler.update()
        for p in (a, b, w, c):
            p.grad = None


def test_bad_scaler_arguments():
    for kwargs in (dict(init_scale=0.0), dict(init_scale=math.inf), dict(growth_factor=0.5),
                   dict(backoff_factor=0.0), dict(backoff_factor=1.5), dict(growth_interval=0)):
        with pytest.raises(ValueError):
            DynamicLossScaler(**kwargs)
    with pytest.raises(TypeError):
        DynamicLossScaler().scale(3.0)
    for key, value in (("scale", -1.0), ("growth_factor", 0.0), ("backoff_factor", 5.0), ("growth_interval", 0)):
        state = DynamicLossScaler().state_dict()
        state[key] = value
        with pytest.raises(ValueError, match="DynamicLossScaler.load_state_dict"):  # as the constructor checks
            DynamicLossScaler().load_state_dict(state)


def test_cpp_rechecks_raw_arguments():
    table = torch.zeros(7, 1, dtype=torch.int64)
    table[6, 0] = 10  # numel 10 with null pointers
    with pytest.raises(ValueError, match="null pointer"):
        _C.adamw_step_cpu(table.data_ptr(), 1, 0, False, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 0, -1.0, False, 0)
    with pytest.raises(ValueError, match="null pointer"):
        _C.adamw_grad_sumsq_cpu(table.data_ptr(), 1, 0, torch.zeros((), dtype=torch.float64).data_ptr())
    with pytest.raises(ValueError, match="params must be"):
        _C.adamw_step_cpu(table.data_ptr(), 0, 3, False, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 0, -1.0, False, 0)
    with pytest.raises(ValueError, match="betas"):
        _C.adamw_step_cpu(table.data_ptr(), 0, 0, False, 1e-3, 1.0, 0.999, 1e-8, 0.0, 0, 0, -1.0, False, 0)
    with pytest.raises(ValueError, match="stochastic"):
        _C.adamw_step_cpu(table.data_ptr(), 0, 1, True, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0, 0, -1.0, True, 0)


# --- CUDA: the twin of the CPU kernel ----------------------------------------------------------

def twin_params(sizes, dtype, misaligned=()):
    """The same params on CPU and CUDA; indices in `misaligned` are views one element into their
    storage (not 16-byte aligned: the CUDA kernel's scalar path)."""
    cpu, gpu = [], []
    for i, n in enumerate(sizes):
        full = torch.randn(n + 1).to(dtype)
        lo = 1 if i in misaligned else 0
        cpu.append(nn.Parameter(full[lo:lo + n].clone()))
        gpu.append(nn.Parameter(full.cuda()[lo:lo + n]))
    return cpu, gpu


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, sr", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                       (torch.bfloat16, True)],  # stochastic rounding is bf16 only
                         ids=["float32-nearest", "bfloat16-nearest", "float16-nearest", "bfloat16-stochastic"])
def test_cuda_matches_cpu_twin_across_launches(dtype, sr):
    gen = torch.Generator().manual_seed(9)
    # 70 tensors (more than one launch's 32 slots), one of 330 chunks (more than one launch's 320
    # chunks), empty and odd sizes, and misaligned views.
    sizes = [int(s) for s in torch.randint(1, 200_000, (68,), generator=gen)] + [0, 330 * 65536 + 5]
    cpu, gpu = twin_params(sizes, dtype, misaligned={3, 10})
    torch.manual_seed(11)
    opt_cpu = AdamW(cpu, lr=1e-3, stochastic_rounding=sr)
    torch.manual_seed(11)
    opt_gpu = AdamW(gpu, lr=1e-3, stochastic_rounding=sr)
    scaler_cpu, scaler_gpu = DynamicLossScaler(2.0**8), DynamicLossScaler(2.0**8)
    for _ in range(3):
        for c, g in zip(cpu, gpu):
            c.grad = (torch.randn(c.shape, generator=gen) * 256).to(dtype)
            g.grad = c.grad.cuda()
        opt_cpu.step(grad_scaler=scaler_cpu, max_grad_norm=1.0)
        opt_gpu.step(grad_scaler=scaler_gpu, max_grad_norm=1.0)
        scaler_cpu.update(), scaler_gpu.update()
        assert opt_gpu.last_grad_norm.item() == pytest.approx(opt_cpu.last_grad_norm.item(), rel=1e-5)
    for c, g in zip(cpu, gpu):
        for key in ("exp_avg", "exp_avg_sq") + (("master",) if dtype != torch.float32 else ()):
            assert rel_err(opt_gpu.state[g][key], opt_cpu.state[c][key]) < 1e-5
        if dtype == torch.float32:
            assert rel_err(g, c) < 1e-6
        elif c.numel():  # 16-bit copies agree except where the fp32 values straddle a rounding boundary
            assert (g.cpu() != c).double().mean().item() < 1e-3


@pytest.mark.cuda
def test_cuda_step_has_no_host_sync():
    model = make_model("cuda", torch.float16)
    opt, scaler = AdamW(model.parameters(), lr=1e-3), DynamicLossScaler()
    x, y = batch("cuda", torch.float16)
    backward(model, x, y, scale=scaler.get_scale())
    opt.step(grad_scaler=scaler, max_grad_norm=1.0)  # state is created on the first step
    scaler.update()
    backward(model, x, y, scale=scaler.get_scale())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(grad_scaler=scaler, max_grad_norm=1.0)
        scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(opt.last_step_skipped)


@pytest.mark.cuda
def test_cuda_cpp_rechecks_raw_arguments():
    table = torch.zeros(7, 1, dtype=torch.int64)
    table[6, 0] = 10
    out = torch.zeros((), dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="null pointer"):
        _C.adamw_grad_sumsq_cuda(table.data_ptr(), 1, 0, out.data_ptr(), 1, out.data_ptr(), 0, 0)
    table[:, 0] = out.data_ptr()
    table[6, 0] = 10 * 65536
    with pytest.raises(ValueError, match="partials"):
        _C.adamw_grad_sumsq_cuda(table.data_ptr(), 1, 0, out.data_ptr(), 1, out.data_ptr(), 0, 0)


# --- ZeRO-1 over gloo -----------------------------------------------------------------------------


def _zero_matches_unsharded(rank, world, dtype):
    from pyllm.optim import ZeroAdamW

    torch.manual_seed(0)
    shapes = [(37, 5), (300,), (11,)]  # 496 elements: not a multiple of anything, so padded
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    opt = ZeroAdamW(params, lr=1e-2, weight_decay=0.1)
    ref_opt = AdamW(ref, lr=1e-2, weight_decay=0.1)
    with torch.no_grad():  # weights loaded after the optimizer was made: the first step starts from them
        params[0][0], ref[0][0] = 1.5, 1.5
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(1)  # every rank draws every rank's grads
    for step in range(5):
        grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(world)]
        if step == 3:
            grads[1][2][4] = float("nan")  # on rank 1 only: every rank must skip
        for p, g in zip(params, grads[rank]):
            p.grad = g.clone()
        for p, per_rank in zip(ref, zip(*grads)):
            p.grad = sum(g / world for g in per_rank)
        if step == 2:  # set in place between steps: the next step starts there, as AdamW's
            with torch.no_grad():
                params[1][:10], ref[1][:10] = 0.25, 0.25
        before = [p.detach().clone() for p in params]
        opt.step(max_grad_norm=0.5)
        ref_opt.step(max_grad_norm=0.5)
        sched.step(), ref_sched.step()
        assert bool(opt.last_step_skipped) == bool(ref_opt.last_step_skipped) == (step == 3)
        if step == 3:
            assert all(torch.equal(a, b) for a, b in zip(params, before))
        else:
            assert opt.last_grad_norm.item() == pytest.approx(ref_opt.last_grad_norm.item(), rel=1e-12)
        # bf16: the masters agree to fp32 rounding, so a copy may differ by one bf16 ulp
        rtol, atol = (1e-6, 1e-7) if dtype == torch.float32 else (2.0**-7, 1e-6)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=rtol, atol=atol)
    shard_state = opt._inner.state[opt._shards[0]]
    assert shard_state["exp_avg"].numel() == -(-496 // world)  # only this rank's shard
    assert ("master" in shard_state) == (dtype == torch.bfloat16)


def _zero_groups_and_full_state(rank, world):
    """Two param groups (decay on matrices only) against AdamW with the same groups; the gathered
    full state equals AdamW's state_dict; a fresh ZeroAdamW (and a plain AdamW) loaded from it
    continue bitwise like the original."""
    from pyllm.optim import ZeroAdamW

    torch.manual_seed(0)
    shapes = [(37, 5), (11,), (9, 3), (7,)]

    def make_groups(params):
        return [{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1], params[3]], "weight_decay": 0.0}]

    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = ZeroAdamW(make_groups(params), lr=1e-2), AdamW(make_groups(ref), lr=1e-2)
    gen = torch.Generator().manual_seed(2)

    def step(optimizers_and_params):
        grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
        for o, ps, sharded in optimizers_and_params:
            for i, p in enumerate(ps):
                p.grad = grads[rank][i].clone() if sharded else sum(g[i] / world for g in grads)
            o.step(max_grad_norm=0.5)

    empty = opt.full_state_dict()
    assert empty["state"] == {} and [g["params"] for g in empty["param_groups"]] == [[0, 1], [2, 3]]
    for _ in range(3):
        step([(opt, params, True), (ref_opt, ref, False)])
    assert opt.last_grad_norm.item() == pytest.approx(ref_opt.last_grad_norm.item(), rel=1e-12)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    full, want = opt.full_state_dict(), ref_opt.state_dict()
    on_first = opt.full_state_dict(to_rank0=True)  # the same, gathered onto rank 0 alone
    if rank == 0:
        assert on_first["param_groups"] == full["param_groups"] and on_first["state"].keys() == full["state"].keys()
        for i, entry in full["state"].items():
            assert all(torch.equal(on_first["state"][i][key], value) for key, value in entry.items())
    else:
        assert on_first == {}
    assert [{k: v for k, v in g.items()} for g in full["param_groups"]] == want["param_groups"]
    for i in want["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full["state"][i][key], want["state"][i][key], rtol=1e-6, atol=1e-8)

    # Resume: a fresh ZeroAdamW over copies of the params, and a plain AdamW, both from `full`.
    # As a trainer does: optimizer built over fresh params, then the weights loaded, then the state.
    params2 = [nn.Parameter(torch.zeros(s)) for s in shapes]
    params3 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ZeroAdamW(make_groups(params2), lr=5.0)
    with torch.no_grad():
        for q, p in zip(params2, params):
            q.copy_(p)
    opt2.load_full_state_dict(full)
    opt3 = AdamW(make_groups(params3), lr=5.0)
    opt3.load_state_dict(full)
    gen_state = gen.get_state()
    for _ in range(2):
        step([(opt, params, True)])
    gen.set_state(gen_state)
    for _ in range(2):
        step([(opt2, params2, True)])
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    gen.set_state(gen_state)
    for _ in range(2):
        grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(world)]
        for i, p in enumerate(params3):
            p.grad = sum(g[i] / world for g in grads)
        opt3.step(max_grad_norm=0.5)
    for p, q in zip(params, params3):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="param groups of"):
        opt2.load_full_state_dict({"state": {}, "param_groups": [{"params": [0]}]})


def _broadcast_weights_are_taken(rank, world):
    """Weights a collective wrote (dist.broadcast moves no version counter) are the weights after
    params_changed(): each rank's stale bf16 master had been written back over them (ranks re-synced
    from rank 0 drifted apart again; from the optimizer audit). AdamW per rank, and ZeroAdamW."""
    import torch.distributed as dist

    from pyllm.optim import ZeroAdamW

    for make in (lambda ps: AdamW(ps, lr=1e-2), lambda ps: ZeroAdamW(ps, lr=1e-2)):
        torch.manual_seed(rank)
        p = nn.Parameter(torch.randn(300).to(torch.bfloat16))
        opt = make([p])
        zero = isinstance(opt, ZeroAdamW)
        if zero:  # ZeRO's ranks hold one model
            with torch.no_grad():
                dist.broadcast(p, src=0)
        for _ in range(3):
            p.grad = torch.randn(300).to(torch.bfloat16)
            if zero:
                dist.broadcast(p.grad, src=0)
            opt.step()
        with torch.no_grad():
            if rank == 0:
                p.data.add_(0.25)  # (through .data: no version counter moves anywhere)
            dist.broadcast(p, src=0)
        synced = p.detach().clone()
        opt.params_changed()
        for group in opt.param_groups:
            group["lr"] = 0.0
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p, synced), type(opt).__name__


def _zero_worker(rank, world, port):
    import os

    import torch.distributed as dist

    from pyllm.train import end_process

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for dtype in (torch.float32, torch.bfloat16):
        _zero_matches_unsharded(rank, world, dtype)
    _zero_groups_and_full_state(rank, world)
    _broadcast_weights_are_taken(rank, world)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    end_process(0)  # every check passed; past gloo's abort at interpreter exit (its docstring)


@pytest.mark.level_free
def test_zero1_over_gloo_matches_unsharded():
    import torch.multiprocessing as mp

    mp.spawn(_zero_worker, args=(2, free_port()), nprocs=2, join=True)


# --- Muon ---------------------------------------------------------------------------------------

@needs_torch_muon
def test_muon_step_is_torchs():
    # A plain matrix: pyllm's Muon = torch.optim.Muon with Moonlight's lr scaling (the same
    # arithmetic: bf16 Newton-Schulz, Nesterov momentum, decoupled weight decay), over 3 steps of
    # random grads, wide and tall.
    from pyllm.optim import Muon

    for shape in ((48, 80), (96, 32)):
        torch.manual_seed(0)
        ours, theirs = torch.randn(shape, requires_grad=True), None
        theirs = ours.detach().clone().requires_grad_()
        a = Muon([ours], lr=0.02, weight_decay=0.1)
        b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for _ in range(3):
            g = torch.randn(shape)
            ours.grad, theirs.grad = g.clone(), g.clone()
            a.step()
            b.step()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert not torch.equal(ours, torch.randn(shape))


@pytest.mark.cuda
@needs_torch_muon
def test_muon_on_cuda_is_torchs():
    # On the GPU: pyllm's Muon (batched bf16 Newton-Schulz) = torch.optim.Muon (unbatched), to what
    # bf16 matmuls of different kernels may round apart: a few bf16 ulps of the update's size.
    from pyllm.optim import Muon

    torch.manual_seed(0)
    ours = torch.randn(256, 512, device="cuda", requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    a = Muon([ours], lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(ours.shape, device="cuda")
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    step = 0.02 * 0.2 * math.sqrt(512)  # an update's size per element, about
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3 * step * 2 ** -8)


def test_muon_fused_parts_and_stacks_are_each_their_own():
    # A fused [q; k; v] weight split by its parts steps as the three matrices alone; a stack of
    # matrices (a MoE's experts, (E, rows, cols)) as each expert alone; split parts of a stack too.
    from pyllm.optim import Muon

    torch.manual_seed(1)
    fused = torch.randn(64 + 16 + 16, 32, requires_grad=True)
    parts = [t.detach().clone().requires_grad_() for t in fused.detach().split([64, 16, 16])]
    stack = torch.randn(3, 2 * 24, 40, requires_grad=True)
    experts = [t.detach().clone().requires_grad_() for t in stack.detach().split(24, dim=-2) for t in t.unbind(0)]
    experts = [e for pair in zip(experts[:3], experts[3:]) for e in pair]  # (expert 0 gate, up, expert 1 ...)
    one = Muon([{"params": [fused, stack], "splits": [[64, 16, 16], [24, 24]]}], lr=0.05, weight_decay=0.1)
    alone = Muon(parts + experts, lr=0.05, weight_decay=0.1)
    for _ in range(2):
        g, h = torch.randn(fused.shape), torch.randn(stack.shape)
        fused.grad, stack.grad = g.clone(), h.clone()
        for p, gp in zip(parts, g.split([64, 16, 16])):
            p.grad = gp.clone()
        hs = [t for t in h.split(24, dim=-2)]
        for e in range(3):
            experts[2 * e].grad, experts[2 * e + 1].grad = hs[0][e].clone(), hs[1][e].clone()
        one.step()
        alone.step()
    torch.testing.assert_close(fused, torch.cat(parts), rtol=0, atol=1e-6)
    want = torch.stack([torch.cat([experts[2 * e], experts[2 * e + 1]]) for e in range(3)])
    torch.testing.assert_close(stack, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="splits add up to their rows"):
        Muon([{"params": [fused], "splits": [[64, 16]]}])
    with pytest.raises(ValueError, match="params are matrices"):
        Muon([torch.zeros(5, requires_grad=True)])


def test_muon_adamw_clips_globally_skips_and_saves():
    # MuonAdamW: the grads' global norm over both parts clipped before either steps (= Muon and
    # AdamW stepped on the clipped grads), an inf grad skips both (and backs the fp16 scale off),
    # state_dict round-trips.
    from pyllm.optim import Muon, MuonAdamW

    torch.manual_seed(2)
    w, b = torch.randn(16, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    w2, b2 = (t.detach().clone().requires_grad_() for t in (w, b))
    opt = MuonAdamW(Muon([w], lr=0.01, weight_decay=0.1), AdamW([b], lr=0.01))
    ref_m, ref_a = Muon([w2], lr=0.01, weight_decay=0.1), AdamW([b2], lr=0.01)
    gw, gb = 3 * torch.randn(w.shape), 3 * torch.randn(b.shape)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step(max_grad_norm=1.0)
    total = torch.cat([gw.view(-1), gb]).norm()
    assert float(opt.last_grad_norm) == pytest.approx(total.item(), rel=1e-6) and not bool(opt.last_step_skipped)
    w2.grad, b2.grad = gw / total, gb / total  # (clip_grad_norm_'s factor, 1 / (norm + 1e-6))
    ref_m.step()
    ref_a.step()
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, b2, rtol=1e-5, atol=1e-6)
    before = (w.detach().clone(), b.detach().clone())
    w.grad, b.grad = torch.full(w.shape, math.inf), gb.clone()
    scaler = DynamicLossScaler(init_scale=1024.0)
    opt.step(grad_scaler=scaler, max_grad_norm=1.0)
    scaler.update()
    assert bool(opt.last_step_skipped) and scaler.get_scale() == 512.0
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    saved = opt.state_dict()
    again = MuonAdamW(Muon([w.detach().clone().requires_grad_()], lr=0.01), AdamW([b.detach().clone().requires_grad_()]))
    again.load_state_dict(saved)
    torch.testing.assert_close(again.muon.state_dict()["state"][0]["momentum_buffer"], opt.muon.state[w]["momentum_buffer"])


def test_what_would_step_wrongly_is_refused():
    # From an audit of the optimizers as torch's drop-ins (2026-12-06): MuonAdamW unscales grads in
    # place, and fp16 ones lost what fell below fp16's range (1e-7 grads became 0; torch's
    # GradScaler refuses them); a conv weight's 3x3 kernels had each been orthogonalized alone (the
    # reference flattens it); ZeroAdamW's sixth positional had been master_weights, torch's amsgrad.
    from pyllm.optim import Muon, MuonAdamW, ZeroAdamW

    w, b = torch.randn(16, 24, dtype=torch.float16, requires_grad=True), torch.randn(24, requires_grad=True)
    opt = MuonAdamW(Muon([w], lr=0.01), AdamW([b], lr=0.01))
    w.grad, b.grad = torch.randn(w.shape, dtype=torch.float16), torch.randn(b.shape)
    with pytest.raises(ValueError, match=r"fp16 grads \(a param of shape \(16, 24\)\) lose what falls below"):
        opt.step(grad_scaler=DynamicLossScaler())
    assert w.grad.dtype == torch.float16 and opt.muon.state == {}  # (nothing unscaled, nothing stepped)
    opt.step()  # (without a scaler: nothing to unscale)
    with pytest.raises(ValueError, match=r"a param of shape \(8, 4, 3, 3\): Muon takes matrices"):
        Muon([torch.randn(8, 4, 3, 3, requires_grad=True)])
    for args, kwargs in (((1e-3, (0.9, 0.999), 1e-8, 0.0, True), {}), ((), {"maximize": True})):
        with pytest.raises(NotImplementedError, match="ZeroAdamW: (amsgrad|maximize)=True is not supported"):
            ZeroAdamW([torch.randn(4, requires_grad=True)], *args, **kwargs)


def test_muon_adamw_leaves_a_skipped_steps_grads_and_sums_in_fp64():
    # A skipped step's grads stay as they came (clip_grad_norm_ had made every element NaN, even
    # unclipped); fp32 grads of 1e20 have a finite norm (in fp64, as AdamW's) and are clipped and
    # stepped, as pyllm's AdamW steps them, where the fp32 norm had overflowed and skipped the step.
    from pyllm.optim import Muon, MuonAdamW

    torch.manual_seed(3)
    w, b = torch.randn(16, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    opt = MuonAdamW(Muon([w], lr=0.01), AdamW([b], lr=0.01))
    gw, gb = torch.randn(w.shape), torch.randn(b.shape)
    gw[3, 4] = math.nan
    w.grad, b.grad = gw.clone(), gb.clone()
    for max_grad_norm in (None, 1.0):
        opt.step(max_grad_norm=max_grad_norm)
        assert bool(opt.last_step_skipped)
        assert torch.equal(w.grad.isnan(), gw.isnan()) and torch.equal(w.grad.nan_to_num(), gw.nan_to_num())
        assert torch.equal(b.grad, gb)
    w.grad, b.grad = 1e20 * torch.randn(w.shape), 1e20 * torch.randn(b.shape)
    expected = torch.cat([w.grad.double().view(-1), b.grad.double()]).norm()
    before = w.detach().clone()
    opt.step(max_grad_norm=1.0)
    assert not bool(opt.last_step_skipped) and float(opt.last_grad_norm) == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(w).all() and not torch.equal(w, before)
    assert float(torch.cat([w.grad.double().view(-1), b.grad.double()]).norm()) == pytest.approx(1.0, rel=1e-5)


def test_grad_norm_of_torch_optimizer_groups_takes_fp64_grads():
    # MuonAdamW over torch's AdamW on fp64 params: the norm had been asked in fp32 (a narrowing torch refuses)
    from pyllm.optim import Muon, MuonAdamW, _grad_norm

    w, b = torch.randn(8, 6, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = MuonAdamW(Muon([w], lr=0.01), torch.optim.AdamW([b], lr=0.01))
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    expected = torch.cat([w.grad.view(-1), b.grad]).norm()
    opt.step(max_grad_norm=1e9)
    assert float(opt.last_grad_norm) == pytest.approx(expected.item(), rel=1e-12)
    huge = torch.full((1000,), 3e38)  # fp32's norm overflows; the rescaled one does not
    assert float(_grad_norm(huge)) == pytest.approx(3e38 * math.sqrt(1000), rel=1e-6)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_adamw_copied_or_pickled_steps_as_the_original(copy_with):
    # torch's optimizers pickle their defaults, state and param groups alone; a copy of pyllm's
    # AdamW (fp32 params and bf16 ones with fp32 masters) then steps as the original does.
    import copy
    import pickle

    from pyllm.optim import AdamW

    torch.manual_seed(0)
    params = [torch.randn(37, 5, requires_grad=True), torch.randn(41).bfloat16().requires_grad_()]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(max_grad_norm=1.0)
    twin = copy.deepcopy(opt) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for ours, theirs in zip(params, twin.param_groups[0]["params"]):
        assert torch.equal(ours, theirs) and ours is not theirs
        ours.grad = torch.randn_like(ours)
        theirs.grad = ours.grad.clone()
    opt.step(max_grad_norm=1.0)
    twin.step(max_grad_norm=1.0)
    for ours, theirs in zip(params, twin.param_groups[0]["params"]):
        assert torch.equal(ours, theirs)
    assert torch.equal(opt.last_grad_norm, twin.last_grad_norm)


DTENSOR_PROBE = """
import os, tempfile, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from pyllm.optim import AdamW
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
model = torch.nn.Linear(8, 8)
fully_shard(model)
try:
    AdamW(model.parameters())
except TypeError as e:
    print("refused:", e)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard"),
                    reason="the probe uses torch.distributed.fsdp.fully_shard (torch 2.6+)")
@pytest.mark.level_free
def test_adamw_refuses_dtensor_params_when_built():
    # FSDP2's DTensor params have no data pointer of their own: the first step had failed with
    # "null pointer in row 0"; now the optimizer says so when it is built, naming the way out.
    import subprocess

    out = subprocess.run([sys.executable, "-c", DTENSOR_PROBE], capture_output=True, text=True, timeout=120)
    assert "refused: AdamW: got a DTensor param" in out.stdout, out.stderr[-2000:]


@needs_torch_muon
def test_muon_takes_torchs_optimizer_protocol():
    # From an audit against torch.optim.Muon: MuonAdamW is a torch.optim.Optimizer whose groups are
    # its parts' (an LR scheduler sets both); last_step_skipped is a 0-d bool tensor as AdamW's; a
    # group added later, torch.optim.Muon's state (match_rms_adamw) and a zero-size matrix step; what
    # would change the method (another adjust_lr_fn) or another optimizer's state is refused.
    import pickle

    from pyllm.optim import Muon, MuonAdamW

    torch.manual_seed(0)
    w, b, w2 = (torch.randn(*shape, requires_grad=True) for shape in ((32, 16), (16,), (8, 24)))
    muon, adamw = Muon([w], lr=0.02), AdamW([b], lr=0.01)
    opt = MuonAdamW(muon, adamw)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0] is muon.param_groups[0]
    with pytest.raises(NotImplementedError, match="add a group to its Muon or its AdamW part"):
        opt.add_param_group({"params": [torch.randn(3, 3, requires_grad=True)]})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(3):
        for p in (w, b):
            p.grad = torch.randn_like(p)
        opt.step(max_grad_norm=1.0)
        sched.step()
    assert (muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"]) == (0.02 / 8, 0.01 / 8)
    assert opt.last_step_skipped.dtype == torch.bool and opt.last_step_skipped.dim() == 0
    twin = pickle.loads(pickle.dumps(opt))
    assert torch.equal(twin.muon.param_groups[0]["params"][0], w)
    muon.add_param_group({"params": [w2]})
    w2.grad = torch.randn_like(w2)
    muon.step()
    with pytest.raises(ValueError, match="splits"):
        muon.add_param_group({"params": [torch.randn(8, 4, requires_grad=True)], "splits": [[4, 4, 0]]})
    theirs = torch.optim.Muon([torch.randn(16, 8, requires_grad=True)], lr=0.02, adjust_lr_fn="match_rms_adamw")
    p = theirs.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    theirs.step()
    ours = Muon([p], lr=0.02)
    ours.load_state_dict(theirs.state_dict())
    ours.step()
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([p]).load_state_dict(torch.optim.Muon([p], lr=0.02).state_dict())
    empty = torch.zeros(0, 16, requires_grad=True)
    empty.grad = torch.zeros(0, 16)
    Muon([empty]).step()
    with pytest.raises(ValueError, match="MuonAdamW's"):
        AdamW([b]).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="another optimizer's"):
        opt.load_state_dict(adamw.state_dict())


@needs_torch_muon
def test_muon_refused_state_leaves_the_optimizer_as_it_was():
    from pyllm.optim import Muon

    p = torch.randn(16, 8, requires_grad=True)
    ours = Muon([p], lr=0.02)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        ours.load_state_dict(torch.optim.Muon([p], lr=0.5).state_dict())
    assert ours.param_groups[0]["lr"] == 0.02 and ours.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


@needs_torch_muon
def test_muon_state_steps_in_torchs_muon():
    # pyllm's groups carry torch.optim.Muon's keys (ns_coefficients, eps, adjust_lr_fn) with the values
    # pyllm computes with: torch's step after loading pyllm's state had raised KeyError; both now
    # take the same next step
    from pyllm.optim import Muon

    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(16, 8))
    opt = Muon([ours], lr=0.02, weight_decay=0.1)
    ours.grad = torch.randn(16, 8)
    opt.step()
    theirs = nn.Parameter(ours.detach().clone())
    torch_opt = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (its buffers, not shared with ours)
    grad = torch.randn(16, 8)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    torch_opt.step()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    # a state saved before the keys were kept gets them at load, and steps in torch's Muon too
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("ns_coefficients", "eps", "adjust_lr_fn"):
            del group[key]
    again = Muon([ours], lr=0.02, weight_decay=0.1)
    again.load_state_dict(old)
    torch_opt.load_state_dict(copy.deepcopy(again.state_dict()))
    theirs.grad = torch.randn(16, 8)
    torch_opt.step()


@pytest.mark.parametrize("backoffs", [130, 150])
def test_a_loss_scale_past_fp32_skips_the_step(backoffs):
    # A scale backed off to ~1e-39 (or 0: 150 halvings) had passed the found-inf check, which saw only
    # the scaled grads' finite sum of squares; the kernel then unscaled by 1 / scale = inf and every
    # param became NaN. Now 1 / scale or the unscaled norm past fp32 is an overflow: the step skipped,
    # nothing written, as torch's GradScaler (which checks after unscaling) does.
    scaler = DynamicLossScaler(init_scale=1.0, backoff_factor=0.5)
    for _ in range(backoffs):
        scaler.update(found_inf=True)
    p = nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    opt = AdamW([p])
    p.grad = torch.randn(4) * scaler.get_scale()
    opt.step(grad_scaler=scaler)
    assert opt.last_step_skipped.item() and torch.equal(p.detach(), before)
    assert opt.state[p]["step"].item() == 0
    scaler.update()
    assert scaler.get_scale() <= 2.0 ** -129  # (backed off again: a skipped step is an overflow)


@pytest.mark.parametrize("init_scale", [1e-50, 1e300, 0.0])
def test_loss_scales_fp32_cannot_hold_are_refused(init_scale):
    with pytest.raises(ValueError, match="fp32 holds"):
        DynamicLossScaler(init_scale=init_scale)


def test_write_on_the_masters_other_neighbour_is_kept():
    # round to nearest: a param written (in place) onto its master's other bf16 neighbour is a change
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4096).to(torch.bfloat16))
    opt = AdamW([p], lr=1e-3, master_weights=True)
    p.grad = torch.randn(4096).to(torch.bfloat16)
    opt.step()
    master = opt.state[p]["master"]
    nearest = master.to(torch.bfloat16)
    other = torch.nextafter(nearest, torch.where(nearest.float() > master, -math.inf, math.inf).to(torch.bfloat16))
    with torch.no_grad():
        p.copy_(other)
    written = p.detach().clone()
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), written)
