from types import SimpleNamespace

import pytest
import torch

import pyllm
from pyllm.ops import swiglu as swiglu_ops
from pyllm import _C
from pyllm.nn import RMSNorm
from pyllm.ops import _util
from pyllm.ops import rms_norm as rms_norm_ops
from helpers import CPU_AND_CUDA, assert_compiles_like_eager, on_unsupported_device, poisoned, rel_err, tolerance

# (rows..., cols): one warp per row and wide rows on CUDA (> 1,024 16-bit elements), widths that
# are not a multiple of a 16-byte vector (the scalar path), one element.
SHAPES = [(1,), (7,), (3, 5), (2, 17, 33), (4, 1, 257), (64, 1024), (3, 100), (2, 3000), (2, 8200)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (cast_first, offset, weight): LLaMA's, Gemma's, LLaMA's rounding with an offset, no weight.
VARIANTS = [(True, 0.0, True), (False, 1.0, True), (True, 0.5, True), (True, 0.0, False)]
VARIANT_IDS = ["llama", "gemma", "offset", "no_weight"]
EPS = 1e-6


def randn(shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def exact(x, weight, offset):
    """The function itself, in float64 on the CPU: no rounding anywhere."""
    x64 = x.double().cpu()
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    return h if weight is None else h * (offset + weight.double().cpu())


def as_torch_writes_it(x, weight, offset, cast_first):
    """What a torch model computes in x's dtype: LLaMA's ((x32 * rstd).to(dtype) * weight) or Gemma's."""
    x32 = x.float()
    h = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
    if weight is None:
        return h.to(x.dtype)
    if cast_first:
        return h.to(x.dtype) * (offset + weight)
    return (h * (offset + weight.float())).to(x.dtype)


def inputs(shape, dtype, device, has_weight):
    x = randn(shape, dtype, device)
    weight = randn(shape[-1:], dtype, device, scale=0.3, shift=1.0) if has_weight else None
    return x, weight


def grads(fn, x, weight, dout):
    leaves = [x.detach().clone().requires_grad_()] + ([weight.detach().clone().requires_grad_()] if weight is not None else [])
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_forward_and_backward_match_float64(device, dtype, shape, variant):
    cast_first, offset, has_weight = variant
    x, weight = inputs(shape, dtype, device, has_weight)
    dout = randn(shape, dtype, device)
    ref, ref_grads = grads(lambda *t: exact(t[0], t[1] if has_weight else None, offset),
                           x.double().cpu(), None if weight is None else weight.double().cpu(), dout.double().cpu())
    theirs, their_grads = grads(lambda *t: as_torch_writes_it(t[0], t[1] if has_weight else None, offset, cast_first),
                                x, weight, dout)
    ours, our_grads = grads(lambda *t: pyllm.rms_norm(t[0], t[1] if has_weight else None, EPS, offset=offset,
                                                      cast_first=cast_first), x, weight, dout)
    assert ours.shape == x.shape and ours.dtype == dtype and ours.device == x.device
    assert rel_err(ours, ref) <= tolerance(theirs, ref)
    for name, g, g_ref, g_torch in zip(("dx", "dweight"), our_grads, ref_grads, their_grads):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        if name == "dx" and shape[-1] == 1:  # x / |x|: dx is eps / x^2 times dy, 1 - h^2 cancelled to noise
            continue
        assert rel_err(g, g_ref) <= tolerance(g_torch, g_ref), name


def test_backward_of_a_row_of_huge_values_is_finite():
    # fp32 rows near the top of the range: the gradient's sum of g * h takes h = x * rstd first
    # (bounded by sqrt(D)) on every CPU level; the portable and AVX2 loops had formed g * x first,
    # inf for |x| ~ 3e38, and given a row of inf (the AVX-512 path: exact).
    x = 3e38 * torch.sign(torch.randn(2, 40)) * torch.rand(2, 40).clamp(min=0.5)
    weight = torch.rand(40) + 0.5
    dout = torch.randn(2, 40)
    dout[0, 3] = -3.0
    _, (dx, dw) = grads(lambda x, w: pyllm.rms_norm(x, w, eps=EPS), x, weight, dout)
    _, (dx64, dw64) = grads(lambda x, w: exact(x, w, 0.0), x.double(), weight.double(), dout.double())
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    # torch overflows here (x^2 = inf); dx and dw do not change under x -> 2^-126 x, where torch's
    # fp32 form is finite: twice its worst element's error there (rtol 1e-4 was 8-12x that)
    xs = x * 2.0 ** -126
    _, (tdx, tdw) = grads(lambda x, w: as_torch_writes_it(x, w, 0.0, True), xs, weight, dout)
    _, (sdx, sdw) = grads(lambda x, w: exact(x, w, 0.0), xs.double(), weight.double(), dout.double())
    for ours, want, theirs, scaled in ((dx, dx64, tdx, sdx), (dw, dw64, tdw, sdw)):
        rtol = 2 * ((theirs.double() - scaled).abs() / scaled.abs()).max().item()
        torch.testing.assert_close(ours.double(), want, rtol=rtol, atol=0)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_element_is_written(device, dtype):
    for shape in [(5, 1031), (3, 16), (700, 64), (3, 8192 * 2 + 5)]:
        rows, cols = shape
        x, weight = inputs(shape, dtype, device, True)
        dout = randn(shape, dtype, device)
        out, rstd = poisoned(shape, dtype, device), poisoned((rows,), torch.float32, device)
        rms_norm_ops.rms_norm_forward_into(x, weight, out, rstd, EPS, 0.0, True)
        dx, dweight = poisoned(shape, dtype, device), poisoned((cols,), dtype, device)
        rms_norm_ops.rms_norm_backward_into(dout, x, weight, rstd, dx, dweight, 0.0, True)
        for t in (out, rstd, dx, dweight):
            assert not t.isnan().any()
        rstd64 = torch.rsqrt(x.double().cpu().pow(2).mean(-1) + EPS)
        if dtype == torch.float32:  # twice torch's error (the default assert_close allowed ~75x that)
            torch_rstd = torch.rsqrt(x.float().cpu().pow(2).mean(-1) + EPS)
            assert rel_err(rstd.cpu(), rstd64) <= tolerance(torch_rstd, rstd64)
        else:  # 16-bit rows sum their squares in fp32 by design (rms_norm.cpp, sum_t): up to ~7 fp32 ulps
            torch.testing.assert_close(rstd.cpu(), rstd64.float())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_backward_is_bitwise_repeatable(device):
    x, weight = inputs((300, 520), torch.bfloat16, device, True)
    dout = randn((300, 520), torch.bfloat16, device)
    first = grads(lambda a, b: pyllm.rms_norm(a, b), x, weight, dout)[1]
    for _ in range(3):
        again = grads(lambda a, b: pyllm.rms_norm(a, b), x, weight, dout)[1]
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                                 (torch.float16, None), (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("rows", [300, 70])
def test_backward_has_the_same_bits_on_any_thread_count(dtype, weight_dtype, rows):
    # dw is summed per segment of rows that the row count sets, then in segment order: one partial
    # per thread had made its last bits depend on OMP_NUM_THREADS (2 vs 3 threads: 1-ulp differences
    # in bf16). 300 rows run 9 segments of 33 or 34 rows; 70 rows 8 of 8 or 9.
    x, weight = inputs((rows, 1040), dtype, "cpu", True)
    if weight_dtype is not None:
        weight = weight.detach().to(weight_dtype).requires_grad_()
    dout = randn((rows, 1040), dtype, "cpu")
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)  # torch and pyllm share one OpenMP runtime
            runs.append(grads(lambda a, b: pyllm.rms_norm(a, b), x, weight, dout)[1])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_strided_misaligned_and_zero_rows(device):
    # A non-contiguous x is copied; an offset view (misaligned by 2 bytes) takes the scalar path on
    # CUDA; an all-zero row gives zeros (rstd = 1 / sqrt(eps)), with finite gradients.
    base = randn((4, 2, 129), torch.bfloat16, device)
    x, weight = base[:, 1, 1:], randn((128,), torch.bfloat16, device, 0.3, 1.0)
    expected = pyllm.rms_norm(x.contiguous(), weight)
    assert torch.equal(pyllm.rms_norm(x, weight), expected)
    assert torch.equal(pyllm.rms_norm(x.t().contiguous().t(), weight), expected)
    zero_row = x.clone()
    zero_row[2] = 0
    x_leaf, w_leaf = zero_row.requires_grad_(), weight.clone().requires_grad_()
    out = pyllm.rms_norm(x_leaf, w_leaf)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    out.float().pow(2).sum().backward()
    assert torch.isfinite(x_leaf.grad).all() and torch.isfinite(w_leaf.grad).all()


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_empty_tensors(device):
    for shape in [(0, 5), (3, 0, 8)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        weight = torch.randn(shape[-1], device=device, requires_grad=True)
        out = pyllm.rms_norm(x, weight)
        assert out.shape == shape
        out.sum().backward()
        assert x.grad.shape == shape and torch.equal(weight.grad, torch.zeros_like(weight))


def test_gradcheck_float64():
    for shape, offset, cast_first in [((3, 7), 0.0, True), ((2, 1, 5), 1.0, False)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: pyllm.rms_norm(a, b, 1e-5, offset=offset, cast_first=cast_first),
                                        (x, weight))
        assert torch.autograd.gradcheck(lambda a: pyllm.rms_norm(a, None, 1e-5), (x,))


@pytest.mark.level_free
def test_opcheck():
    x, weight = torch.randn(4, 6), torch.randn(6)
    for args in [(x, weight, 1e-6, 0.0, True), (x.requires_grad_(), weight.requires_grad_(), 1e-6, 1.0, False),
                 (x, None, 1e-5, 0.0, True)]:
        torch.library.opcheck(torch.ops.pyllm.rms_norm.default, args)
    rstd = torch.rand(4) + 0.5
    torch.library.opcheck(torch.ops.pyllm.rms_norm_backward.default,
                          (torch.randn(4, 6), x.detach(), weight.detach(), rstd, 0.0, True, True))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_eager_calls_match_the_op(device):
    x = torch.randn(5, 40, dtype=torch.bfloat16, device=device)
    weight = torch.randn(40, dtype=torch.bfloat16, device=device)
    assert torch.equal(pyllm.rms_norm(x, weight), torch.ops.pyllm.rms_norm(x, weight, 1e-6, 0.0, True)[0])
    x.requires_grad_()
    weight.requires_grad_()
    dout = torch.randn_like(x)
    out, out_op = pyllm.rms_norm(x, weight), torch.ops.pyllm.rms_norm(x, weight, 1e-6, 0.0, True)[0]
    assert type(out.grad_fn).__name__ == "_RmsNormFunctionBackward"
    assert torch.equal(out, out_op)
    for g, g_op in zip(torch.autograd.grad(out, (x, weight), dout), torch.autograd.grad(out_op, (x, weight), dout)):
        assert torch.equal(g, g_op)


def test_meta_tensors_give_shapes():
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = pyllm.rms_norm(x, weight)
    assert out.is_meta and out.shape == (3, 5)
    gx, gw = torch.autograd.grad(out.sum(), (x, weight))
    assert gx.is_meta and gx.shape == (3, 5) and gw.shape == (5,)
    # a weight of another dtype is cast as on the CPU (meta had refused it)
    assert pyllm.rms_norm(x.float(), weight.double()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_module_runs_the_kernel(dtype):
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn((48,), dtype, "cpu", 0.3, 1.0))
    x = randn((2, 5, 48), dtype, "cpu").requires_grad_()
    out = norm(x)
    assert type(out.grad_fn).__name__ == "_RmsNormFunctionBackward"
    assert torch.equal(out, pyllm.rms_norm(x, norm.weight, 1e-5))
    if dtype == torch.float64:
        return
    # An fp32 weight (mixed precision) is cast to x's dtype, as the torch form does.
    out_fp32_weight = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        out_fp32_weight.weight.copy_(norm.weight.float())
    assert torch.equal(out_fp32_weight(x), out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_takes_torchs_form_and_eps_default(dtype):
    # F.rms_norm(input, normalized_shape, weight=None, eps=None), positional or by name, several
    # trailing dims normalised together, eps None = fp32's (fp64's) epsilon: cast_first=False rounds
    # as torch does, so fp64 matches to the last bits and bf16 to one rounding; the default
    # (cast_first=True) is LLaMA's order, in torch's form too.
    F = torch.nn.functional
    x, w = randn((3, 4, 8), dtype, "cpu", 1e-4), randn((4, 8), dtype, "cpu", 0.3, 1.0)
    calls = [((x, (8,)), {}), ((x, (8,), w[0], 1e-5), {}), ((x, [4, 8], w), {}), ((x, (4, 8)), dict(weight=w)),
             ((), dict(input=x, normalized_shape=(8,), weight=w[0], eps=1e-3)), ((x, torch.Size([4, 8]), None, 0.5), {})]
    old_eps = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 7)
    for args, kw in calls:
        ref = {**dict(zip(("input", "normalized_shape", "weight", "eps"), args)), **kw}
        if old_eps and ref.get("eps") is None:  # torch < 2.7: eps None was x's dtype's epsilon (bf16's 2^-7)
            ref["eps"] = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        want = F.rms_norm(**ref)
        got = pyllm.rms_norm(*args, **kw, cast_first=False)
        assert got.shape == x.shape and got.dtype == dtype
        assert rel_err(got, want) <= (1e-15 if dtype == torch.float64 else 2 ** -8), (args, kw)
    assert rel_err(pyllm.rms_norm(x, 8, None, None), pyllm.rms_norm(x, None, torch.finfo(torch.float32).eps
                                                                      if dtype != torch.float64 else 2.0 ** -52)) == 0
    assert torch.equal(pyllm.rms_norm(x, (8,), w[0], 1e-5), pyllm.rms_norm(x, w[0], 1e-5))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [512, 4096])
def test_an_fp32_weight_on_16bit_activations_gets_an_fp32_gradient(device, dtype, rows):
    # Mixed precision's master weight: rounded to x's dtype for the product (the output and dx are
    # those of the weight cast first, bitwise), its gradient summed in fp32 (fp64 across blocks of
    # rows) and written unrounded: within twice torch's error against float64 (its autograd gives
    # an fp32 parameter fp32 gradients: F.rms_norm's rounding, cast_first=False), where the cast's
    # backward had rounded it to x's dtype (2.3e-3 relative at 512 x 256 bf16).
    x = randn((rows, 256), dtype, device).requires_grad_()
    w32 = randn((256,), torch.float32, device, 0.3, 1.0).requires_grad_()
    dy = randn((rows, 256), dtype, device)
    for cast_first in (True, False):
        x.grad = w32.grad = None
        out = pyllm.rms_norm(x, w32, cast_first=cast_first)
        out.backward(dy)
        x_cast, w_cast = x.detach().clone().requires_grad_(), w32.detach().clone().requires_grad_()
        cast = pyllm.rms_norm(x_cast, w_cast.to(dtype), cast_first=cast_first)
        cast.backward(dy)
        assert out.dtype == dtype and torch.equal(out, cast) and torch.equal(x.grad, x_cast.grad)
        x64 = x.detach().double().cpu()
        h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        if cast_first:  # LLaMA's rounding of x * rstd: a few elements round the other way than float64's
            h = h.to(dtype).double()
        exact = (dy.double().cpu() * h).sum(0)
        torch_error = rel_err((dy.float().cpu() * h.float()).sum(0), exact)  # torch's fp32 sum of the products
        assert w32.grad.dtype == torch.float32
        assert rel_err(w32.grad.cpu(), exact) <= (2 * torch_error if not cast_first else 1e-5)
        assert rel_err(w_cast.grad.cpu(), exact) > 10 * rel_err(w32.grad.cpu(), exact)  # (the cast's: rounded)
    norm = RMSNorm(256, eps=EPS).to(device)  # the module passes its fp32 weight as it is (LLaMA's rounding)
    norm(x.detach()).backward(dy)
    x64 = x.detach().double().cpu()
    h = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype).double()
    assert norm.weight.grad.dtype == torch.float32
    assert rel_err(norm.weight.grad.cpu(), (dy.double().cpu() * h).sum(0)) < 1e-5


def test_module_takes_torchs_arguments():
    # torch.nn.RMSNorm(normalized_shape, eps, elementwise_affine, device, dtype): several trailing
    # dims, no weight, eps None; reset_parameters for meta-device init (FSDP2's to_empty); the 3rd
    # positional is elementwise_affine, so a device there is a clear error.
    x = randn((2, 3, 4, 8), torch.float64, "cpu")
    ours, theirs = RMSNorm((4, 8), None, dtype=torch.float64), torch.nn.RMSNorm((4, 8), dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(randn((4, 8), torch.float64, "cpu", 0.3, 1.0))
        theirs.weight.copy_(ours.weight)
    assert rel_err(ours(x), theirs(x)) <= 1e-15
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    bare = RMSNorm(8, 1e-5, False)
    assert bare.weight is None and list(bare.parameters()) == [] and "elementwise_affine=False" in repr(bare)
    assert rel_err(bare(x), torch.nn.functional.rms_norm(x, (8,), eps=1e-5)) <= 1e-15
    with torch.device("meta"):
        lazy = RMSNorm(16)
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert torch.equal(lazy.weight, torch.ones(16))
    with pytest.raises(TypeError, match="elementwise_affine"):
        RMSNorm(8, 1e-5, "cpu")
    with pytest.raises(ValueError, match=r"trailing dims must be \(4, 8\)"):
        ours(x[..., :4])
    # torch's keyword name for the size too, and one of the two names only
    named = RMSNorm(normalized_shape=(4, 8), eps=None, dtype=torch.float64)
    assert named.normalized_shape == (4, 8) and named.eps is None
    for args, kwargs in (((), {}), ((8,), dict(normalized_shape=8))):
        with pytest.raises(TypeError, match="dim .* or normalized_shape="):
            RMSNorm(*args, **kwargs)


def test_torch_compile_fullgraph():
    assert_compiles_like_eager(RMSNorm(32), torch.randn(3, 32, requires_grad=True))


# --- bad input ----------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        pyllm.rms_norm(x, torch.randn(5))
    with pytest.raises(TypeError, match="dtype"):
        pyllm.rms_norm(x, torch.randn(4).int())
    with pytest.raises(ValueError, match=r"normalized_shape must be input's trailing dims, got \(3,\)"):
        pyllm.rms_norm(x, (3,))
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(4,\)"):
        pyllm.rms_norm(x, [4], torch.randn(3, 4))
    with pytest.raises(TypeError, match="expected one of"):
        pyllm.rms_norm(x.int())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pyllm.rms_norm([1.0])
    with pytest.raises(ValueError, match="last dim of at least 1"):
        pyllm.rms_norm(torch.randn(3, 0))
    with pytest.raises(ValueError, match="last dim of at least 1"):
        pyllm.rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps must be"):
        pyllm.rms_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="offset must be"):
        pyllm.rms_norm(x, torch.randn(4), offset=float("nan"))
    with pytest.raises(ValueError, match="device"):
        pyllm.rms_norm(on_unsupported_device(x))


def test_kernel_calls_refuse_tensors_of_other_sizes():
    # The kernels read a weight per column and an rstd per row wherever they point: a whole weight
    # beside x sharded on its columns (DTensor) would be read from its start.
    x, out, rstd = torch.randn(3, 8), torch.empty(3, 8), torch.empty(3)
    with pytest.raises(ValueError, match=r"weight must have one element per column \(8\), got shape \(16,\)"):
        rms_norm_ops.rms_norm_forward_into(x, torch.ones(16), out, rstd, EPS, 0.0, True)
    with pytest.raises(ValueError, match=r"rstd must have one element per row \(3\)"):
        rms_norm_ops.rms_norm_forward_into(x, torch.ones(8), out, torch.empty(2), EPS, 0.0, True)
    with pytest.raises(ValueError, match=r"dout must have x's 24 elements"):
        rms_norm_ops.rms_norm_backward_into(x[:2], x, torch.ones(8), rstd, out, None, 0.0, True)
    with pytest.raises(ValueError, match="up must have 24 elements"):
        swiglu_ops.swiglu_forward_into(x, x[:1], out)


def test_cuda_launch_without_cuda_kernels_raises(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32, shape=(2, 4),
                           data_ptr=lambda: 256, numel=lambda: 8)
    weight, rstd = (SimpleNamespace(data_ptr=lambda: 512, numel=lambda n=n: n, shape=(n,), dtype=torch.float32) for n in (4, 2))
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        rms_norm_ops.rms_norm_forward_into(fake, weight, fake, rstd, EPS, 0.0, True)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        rms_norm_ops.rms_norm_backward_into(fake, fake, weight, rstd, fake, None, 0.0, True)


def test_cuda_row_limit_with_a_weight_gradient_follows_the_gpu(monkeypatch):
    # The backward keeps a fp32 dw row in shared memory: sm_86 / sm_89 (99 KB) take narrower rows than
    # sm_80 / sm_90, which the layer must know before it runs the forward (no GPU here: the device's
    # properties are stood in for, with and without torch's opt-in field).
    from pyllm import nn as pnn

    props = {0: SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376),
             1: SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=232448),
             2: SimpleNamespace(major=8, minor=9), 3: SimpleNamespace(major=8, minor=0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(rms_norm_ops, "_max_cols_with_dw", {})
    gpu = [SimpleNamespace(is_cuda=True, is_cpu=False, get_device=lambda i=i: i, dtype=torch.bfloat16) for i in range(4)]
    assert [rms_norm_ops.max_cols_cuda_with_dw(x) for x in gpu] == [25088, 32768, 25088, 32768]
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_util, "_runs_on", {i: True for i in range(4)})
    wide = [SimpleNamespace(**vars(x), shape=(2, 25089)) for x in gpu]
    assert [pnn._rms_norm_takes(x) for x in wide] == [False, True, False, True]


@pytest.mark.cuda
def test_cuda_bad_input():
    with pytest.raises(ValueError, match="must match"):
        pyllm.rms_norm(torch.randn(3, 4, device="cuda"), torch.randn(4))
    with pytest.raises(ValueError, match="at most 32768"):
        pyllm.rms_norm(torch.randn(2, 32769, device="cuda"))


def test_cpp_rechecks_raw_calls():
    with pytest.raises(ValueError, match="null data pointer"):
        _C.rms_norm_fwd_cpu(0, 0, 0, 0, 2, 10, 1e-6, 0.0, True, 0)
    a = torch.randn(8)
    with pytest.raises(ValueError, match="dtype"):
        _C.rms_norm_fwd_cpu(a.data_ptr(), 0, a.data_ptr(), a.data_ptr(), 2, 4, 1e-6, 0.0, True, 99)
    with pytest.raises(ValueError, match="cols >= 1"):
        _C.rms_norm_fwd_cpu(1, 0, 1, 1, 2, 0, 1e-6, 0.0, True, 0)
    with pytest.raises(ValueError, match="eps"):
        _C.rms_norm_fwd_cpu(1, 0, 1, 1, 2, 4, -1.0, 0.0, True, 0)
    with pytest.raises(ValueError, match="without a weight"):
        _C.rms_norm_bwd_cpu(1, 1, 0, 1, 1, 1, 2, 4, 0.0, True, 0)


def test_backward_with_fewer_threads_than_asked():
    # OpenMP may give the backward's parallel region fewer threads than omp_get_max_threads says (a
    # thread limit, OMP_DYNAMIC): every row and every partial of dw must still be computed.
    import os
    import subprocess
    import sys
    script = (
        "import torch, pyllm\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(64, 1024, dtype=torch.float64, requires_grad=True)\n"
        "w = torch.randn(1024, dtype=torch.float64, requires_grad=True)\n"
        "g = torch.randn(64, 1024, dtype=torch.float64)\n"
        "pyllm.rms_norm(x, w).backward(g)\n"
        "xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()\n"
        "(xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6) * wr).backward(g)\n"
        "assert (x.grad - xr.grad).abs().max() < 1e-12 and (w.grad - wr.grad).abs().max() < 1e-10\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_THREAD_LIMIT": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)


@pytest.mark.level_free
def test_compiles_with_eps_a_symbol():
    # torch.compile traces a float that changes between calls (or any, dynamic=True) as a symbol:
    # math.isfinite / comparisons on it in the argument checks broke fullgraph (2026-12-03). Values and
    # gradients as eager for each eps.
    torch._dynamo.reset()
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    for dynamic in (True, None):
        f = torch.compile(lambda a, b, e: pyllm.rms_norm(a, b, e), fullgraph=True, dynamic=dynamic)
        for eps in (1e-6, 1e-5, 3e-5):
            got = torch.autograd.grad(f(x, w, eps).sum(), (x, w))
            want = torch.autograd.grad(pyllm.rms_norm(x, w, eps).sum(), (x, w))
            assert torch.equal(f(x, w, eps), pyllm.rms_norm(x, w, eps)) and all(map(torch.equal, got, want))
