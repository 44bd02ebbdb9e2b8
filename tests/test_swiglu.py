import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm import _C
from pyllm.nn import SwiGLUMLP
from pyllm.ops import _util
from pyllm.ops import swiglu as swiglu_ops
from helpers import CPU_AND_CUDA, assert_compiles_like_eager, on_unsupported_device, poisoned, rel_err, tolerance

SHAPES = [(1,), (7,), (3, 5), (2, 17, 33), (4, 1, 257), (64, 1024), (2, 3, 4, 11)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPES_BY_DEVICE = {"cpu": DTYPES, "cuda": DTYPES}


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# Each gated activation: its public functions, the activation in torch, and the kernels' name for it.
GLUS = {
    "swiglu": SimpleNamespace(split=pyllm.swiglu, packed=pyllm.swiglu_packed, act=F.silu, activation="silu"),
    "geglu": SimpleNamespace(split=pyllm.geglu, packed=pyllm.geglu_packed, act=gelu_tanh, activation="gelu_tanh"),
}
GLU_NAMES = list(GLUS)


@pytest.fixture(params=GLU_NAMES)
def glu(request):
    return SimpleNamespace(name=request.param, **vars(GLUS[request.param]))


def reference(gate, up, act=F.silu):
    g, u = gate.double().cpu(), up.double().cpu()
    return act(g) * u


def randn(shape, dtype, device, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64(device, dtype, shape, glu):
    gate, up = randn(shape, dtype, device), randn(shape, dtype, device)
    ref = reference(gate, up, glu.act)
    out = glu.split(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.device == gate.device
    assert rel_err(out, ref) <= tolerance(glu.act(gate) * up, ref)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_forward_matches_float64(device, dtype, shape, glu):
    x = randn((*shape[:-1], 2 * shape[-1]), dtype, device)
    gate, up = x.chunk(2, dim=-1)
    ref = reference(gate, up, glu.act)
    out = glu.packed(x)
    assert out.shape == shape
    assert rel_err(out, ref) <= tolerance(glu.act(gate) * up, ref)


def torch_grads(gate, up, dout, act=F.silu):
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    (act(g) * u).backward(dout)
    return g.grad, u.grad


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backward_matches_float64(device, dtype, shape, packed, glu):
    gate, up, dout = (randn(shape, dtype, device) for _ in range(3))
    ref_dg, ref_du = torch_grads(gate.double().cpu(), up.double().cpu(), dout.double().cpu(), glu.act)
    torch_dg, torch_du = torch_grads(gate, up, dout, glu.act)
    if packed:
        x = torch.cat([gate, up], dim=-1).requires_grad_()
        glu.packed(x).backward(dout)
        dg, du = x.grad.chunk(2, dim=-1)
    else:
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        glu.split(g, u).backward(dout)
        dg, du = g.grad, u.grad
    assert rel_err(dg, ref_dg) <= tolerance(torch_dg, ref_dg)
    assert rel_err(du, ref_du) <= tolerance(torch_du, ref_du)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_element_is_written(device, dtype, glu):
    # Odd sizes exercise the kernels' tails (and the scalar path on CUDA).
    for shape in [(5, 1031), (4096 + 3,), (3, 8192 * 2 + 5)]:
        gate, up, dout = (randn(shape, dtype, device) for _ in range(3))
        out = poisoned(shape, dtype, device)
        swiglu_ops.swiglu_forward_into(gate, up, out, glu.activation)
        dg, du = poisoned(shape, dtype, device), poisoned(shape, dtype, device)
        swiglu_ops.swiglu_backward_into(dout, gate, up, dg, du, glu.activation)
        x = torch.cat([gate, up], dim=-1)
        out_p, dx = poisoned(shape, dtype, device), poisoned(x.shape, dtype, device)
        swiglu_ops.swiglu_packed_forward_into(x, out_p, glu.activation)
        swiglu_ops.swiglu_packed_backward_into(dout, x, dx, glu.activation)
        for t in (out, dg, du, out_p, dx):
            assert not t.isnan().any()
        assert torch.equal(out, out_p)
        assert torch.equal(torch.cat([dg, du], dim=-1), dx)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_elements_bits_do_not_depend_on_where_it_sits(device, dtype, glu):
    # The CPU kernels' vector bodies and row tails (masked on AVX-512, a padded buffer on AVX2, the
    # compiler's epilogue elsewhere) give the same bits: the same value at offsets 0..15 of rows
    # of 1..40 elements comes out the same, forward and backward.
    values = randn((3, 40), dtype, device)
    full_out = glu.split(values[0], values[1])
    full_dg, full_du = poisoned((40,), dtype, device), poisoned((40,), dtype, device)
    swiglu_ops.swiglu_backward_into(values[2], values[0], values[1], full_dg, full_du, glu.activation)
    for start in (0, 1, 7, 8, 9, 15):
        for length in (1, 5, 8, 13, 24, 40 - 15):
            window = values[:, start:start + length].contiguous()
            assert torch.equal(glu.split(window[0], window[1]), full_out[start:start + length])
            dg, du = poisoned((length,), dtype, device), poisoned((length,), dtype, device)
            swiglu_ops.swiglu_backward_into(window[2], window[0], window[1], dg, du, glu.activation)
            assert torch.equal(dg, full_dg[start:start + length]) and torch.equal(du, full_du[start:start + length])


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_misaligned_and_strided_inputs(device, glu):
    # Offset views break 16-byte alignment and non-contiguous inputs get copied: same answers.
    base = randn((3, 2 * 64 + 1), torch.bfloat16, device)
    x = base[:, 1:]  # packed (3, 128), misaligned by one element
    gate, up = x.chunk(2, dim=-1)  # non-contiguous views
    expected = glu.split(gate.contiguous(), up.contiguous())
    assert torch.equal(glu.packed(x), expected)
    assert torch.equal(glu.split(gate, up), expected)
    assert torch.equal(glu.split(gate.t().contiguous().t(), up.t().contiguous().t()), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_empty_tensors(device, glu):
    for shape in [(0,), (3, 0), (0, 5)]:
        g = torch.randn(shape, device=device, requires_grad=True)
        u = torch.randn(shape, device=device, requires_grad=True)
        out = glu.split(g, u)
        assert out.shape == shape
        out.sum().backward()
        assert g.grad.shape == shape
    x = torch.randn(0, 6, device=device, requires_grad=True)
    out = glu.packed(x)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 6)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude_inputs(device, dtype, glu):
    # |gate| up to ~150 reaches exp's clamps and the saturated ends of sigmoid.
    gate, up, dout = randn((4, 999), dtype, device, scale=40.0), randn((4, 999), dtype, device), randn((4, 999), dtype, device)
    ref = reference(gate, up, glu.act)
    assert rel_err(glu.split(gate, up), ref) <= tolerance(glu.act(gate) * up, ref)
    ref_dg, ref_du = torch_grads(gate.double().cpu(), up.double().cpu(), dout.double().cpu(), glu.act)
    torch_dg, torch_du = torch_grads(gate, up, dout, glu.act)
    dg, du = getattr(torch.ops.pyllm, f"{glu.name}_backward")(dout, gate, up)
    assert rel_err(dg, ref_dg) <= tolerance(torch_dg, ref_dg)
    assert rel_err(du, ref_du) <= tolerance(torch_du, ref_du)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_and_infinite_gates_match_torch(device, dtype, glu):
    # Where torch's fp32 sigmoid underflows to exactly 0 (gate < ~-88.7), silu is -0 for finite
    # gates and NaN for -inf (-inf * 0), and so are the gradients (the tanh GELU's likewise, from
    # gate ~ -9 on); 16 lanes of each value reach the AVX-512 paths (masked tails there; the
    # portable builds of .ci/cpu_paths run the scalar loop). +-1.2e13 and 2e13: the tanh GELU's
    # g z'(g) overflows fp32 where its partner factor is 0 (torch: dgate 1 and 0, no NaN).
    big = [1.2e13, 2e13, -1.2e13, -2e13] if dtype != torch.float16 else []
    specials = [-math.inf, -1000.0, -120.0, -89.0, -60.0, 60.0, 1000.0, math.inf, math.nan, *big]
    gate = torch.tensor(specials * 17, dtype=dtype, device=device)
    up = torch.full_like(gate, 3.0)
    dout = torch.full_like(gate, 2.0)
    want = (glu.act(gate.float()) * up.float()).to(dtype)
    leaves = [gate.float().requires_grad_(), up.float().requires_grad_()]
    want_dg, want_du = (g.to(dtype) for g in torch.autograd.grad(glu.act(leaves[0]) * leaves[1], leaves, dout.float()))
    got = glu.split(gate, up)
    dg, du = getattr(torch.ops.pyllm, f"{glu.name}_backward")(dout, gate, up)
    for name, ours, theirs in (("out", got, want), ("dgate", dg, want_dg), ("dup", du, want_du)):
        nonfinite = ~torch.isfinite(theirs) | (theirs == 0)
        assert torch.equal(ours.isnan(), theirs.isnan()), name
        assert torch.equal(ours[nonfinite].isnan(), theirs[nonfinite].isnan()), name
        same = nonfinite & ~theirs.isnan()
        assert torch.equal(ours[same], theirs[same]), name


def test_nonfinite_inputs_propagate(glu):
    gate = torch.tensor([float("nan"), 1.0, float("inf"), 3.0])
    up = torch.tensor([1.0, float("nan"), 1.0, float("inf")])
    out = glu.split(gate, up)
    assert out[0].isnan() and out[1].isnan()
    assert out[2] == float("inf") and out[3] == float("inf")


def gelu_tanh_as_sigmoid(x):
    """0.5 x (1 + tanh(y)) written as x sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3): the same
    function, without 1 + tanh(y)'s cancellation (which zeroes it even in float64 from x ~ -8)."""
    return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))


def test_geglu_keeps_the_small_negative_outputs():
    # torch's fp32 tanh GELU rounds 1 + tanh(y) to 0 from gate ~ -5.3 (float64's from ~ -8): the
    # kernels' sigmoid form keeps the value there, and its gradient too: to exp's condition number,
    # |z| <= 66 here, times z's few fp32 roundings (measured 9.7e-6 on the CPU).
    gate = torch.linspace(-9.0, -4.0, 48, dtype=torch.float64)
    assert (gelu_tanh(gate.float()) == 0).any()
    leaf = gate.clone().requires_grad_()
    ref = gelu_tanh_as_sigmoid(leaf)
    (ref_dg,) = torch.autograd.grad(ref.sum(), leaf)
    ones = torch.ones(48)
    out = pyllm.geglu(gate.float(), ones)
    assert (out < 0).all()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=0)
    dg, _ = torch.ops.pyllm.geglu_backward(ones, gate.float(), ones)
    torch.testing.assert_close(dg.double(), ref_dg, rtol=2e-5, atol=0)


def test_gradcheck_float64(glu):
    for shape in [(3, 7), (2, 1, 5)]:
        gate = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        up = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(glu.split, (gate, up))
        x = torch.randn((*shape[:-1], 2 * shape[-1]), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(glu.packed, (x,))


@pytest.mark.level_free
def test_opcheck(glu):
    ops = torch.ops.pyllm
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    for args in [(gate, up), (gate.requires_grad_(), up.requires_grad_())]:
        torch.library.opcheck(getattr(ops, glu.name).default, args)
    x = torch.randn(4, 12, requires_grad=True)
    torch.library.opcheck(getattr(ops, f"{glu.name}_packed").default, (x,))
    torch.library.opcheck(getattr(ops, f"{glu.name}_backward").default, (torch.randn(4, 6), gate.detach(), up.detach()))
    torch.library.opcheck(getattr(ops, f"{glu.name}_packed_backward").default, (torch.randn(4, 6), x.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_inference_call_matches_the_op(dtype, glu):
    # Plain eager CPU calls without autograd run the op's body directly (pyllm/ops/_util.py).
    gate, up = torch.randn(5, 33, dtype=dtype), torch.randn(5, 33, dtype=dtype)
    assert torch.equal(glu.split(gate, up), getattr(torch.ops.pyllm, glu.name)(gate, up))
    x = torch.randn(3, 2, 66, dtype=dtype)[:, 1]  # strided
    assert torch.equal(glu.packed(x), getattr(torch.ops.pyllm, f"{glu.name}_packed")(x))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_eager_autograd_call_matches_the_op(device, glu):
    # Eager calls with autograd run the op's body in a plain autograd.Function (pyllm/ops/_util.py):
    # the same bits forward and backward as through the op's own autograd.
    gate, up = (torch.randn(5, 33, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(2))
    x = torch.randn(3, 2, 66, dtype=torch.bfloat16, device=device).requires_grad_()
    dout = torch.randn(5, 33, dtype=torch.bfloat16, device=device)
    title = glu.name.title()
    out, out_op = glu.split(gate, up), getattr(torch.ops.pyllm, glu.name)(gate, up)
    assert type(out.grad_fn).__name__ == f"_{title}FunctionBackward"
    assert f"pyllm_{glu.name}" in type(out_op.grad_fn).__name__
    assert torch.equal(out, out_op)
    for g, g_op in zip(torch.autograd.grad(out, (gate, up), dout), torch.autograd.grad(out_op, (gate, up), dout)):
        assert torch.equal(g, g_op)
    packed, packed_op = glu.packed(x[:, 1]), getattr(torch.ops.pyllm, f"{glu.name}_packed")(x[:, 1])
    assert type(packed.grad_fn).__name__ == f"_{title}PackedFunctionBackward"
    assert torch.equal(torch.autograd.grad(packed, x, dout[:3])[0], torch.autograd.grad(packed_op, x, dout[:3])[0])
    (dgate,) = torch.autograd.grad(glu.split(gate, up).sum(), gate, create_graph=True)
    with pytest.raises(NotImplementedError, match=f"pyllm.{glu.name}: no second derivative"):  # as through the op
        dgate.sum().backward()


def test_meta_tensors_give_shapes(glu):
    gate = torch.empty(3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = glu.split(gate, gate)
    assert out.is_meta and out.shape == (3, 5) and out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(glu.packed(gate[:, :4]).sum(), gate)
    assert grad.is_meta and grad.shape == (3, 5)


def test_mlp_matches_llama_mlp():
    dim, hidden = 48, 80
    mlp = SwiGLUMLP(dim, hidden).double()
    w1, w3 = mlp.gate_up.weight.split(hidden)  # LLaMA's w1 (gate) and w3 (up)
    x = torch.randn(2, 5, dim, dtype=torch.float64, requires_grad=True)
    expected = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), mlp.down.weight)
    out = mlp(x)
    torch.testing.assert_close(out, expected)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    (grad_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_x, grad_ref)


def test_torch_compile_fullgraph():
    assert_compiles_like_eager(SwiGLUMLP(32, 64), torch.randn(3, 32, requires_grad=True))


# --- bad input ----------------------------------------------------------------------------

def test_bad_input_raises_clear_errors(glu):
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match=f"{glu.name}: gate and up must have the same shape"):
        glu.split(a, torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        glu.split(a, a.bfloat16())
    with pytest.raises(TypeError, match="expected one of"):
        glu.split(a.int(), a.int())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        glu.split([1.0], a)
    with pytest.raises(ValueError, match=f"{glu.name}_packed: .* must be even"):
        glu.packed(torch.randn(3, 5))
    with pytest.raises(ValueError, match="must be even"):
        glu.packed(torch.tensor(1.0))
    with pytest.raises(ValueError, match="device"):
        glu.split(on_unsupported_device(a), on_unsupported_device(a))


def test_cuda_tensor_without_cuda_kernels_raises(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _util.check_backend("swiglu", torch.device("cuda", 0))


def test_cuda_launch_without_cuda_kernels_raises(monkeypatch):
    # torch.ops.pyllm.* reach the launchers without swiglu()'s checks: the clear error, not an
    # AttributeError for the missing _C.swiglu_*_cuda. A stand-in for a CUDA tensor (no GPU here).
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32,
                           data_ptr=lambda: 256, numel=lambda: 4)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        swiglu_ops.swiglu_forward_into(fake, fake, fake)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        swiglu_ops.swiglu_backward_into(fake, fake, fake, fake, fake, "gelu_tanh")


@pytest.mark.cuda
def test_device_mismatch_raises(glu):
    with pytest.raises(ValueError, match="must match"):
        glu.split(torch.randn(3), torch.randn(3, device="cuda"))


def test_cpp_rechecks_raw_calls():
    # The C++ entry points throw on bad arguments instead of crashing.
    a = torch.randn(4)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.swiglu_fwd_cpu(0, 0, 0, 1, 10, 10, 10, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.swiglu_fwd_cpu(a.data_ptr(), a.data_ptr(), a.data_ptr(), 1, 4, 4, 4, 99, 0)
    with pytest.raises(ValueError, match="activation code must be 0 .silu. or 1 .gelu_tanh., got 2"):
        _C.swiglu_fwd_cpu(a.data_ptr(), a.data_ptr(), a.data_ptr(), 1, 4, 4, 4, 0, 2)
    with pytest.raises(ValueError, match="activation code"):
        _C.swiglu_bwd_cpu(*[a.data_ptr()] * 5, 1, 4, 4, 4, 0, -1)
    with pytest.raises(ValueError, match=">= 0"):
        _C.swiglu_fwd_cpu(1, 1, 1, -1, 4, 4, 4, 0, 1)
    with pytest.raises(ValueError, match="strides"):
        _C.swiglu_bwd_cpu(1, 1, 1, 1, 1, 2, 4, 2, 4, 0, 0)
