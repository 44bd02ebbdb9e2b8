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


def reference(gate, up):
    g, u = gate.double().cpu(), up.double().cpu()
    return F.silu(g) * u


def randn(shape, dtype, device, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64(device, dtype, shape):
    gate, up = randn(shape, dtype, device), randn(shape, dtype, device)
    ref = reference(gate, up)
    out = pyllm.swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.device == gate.device
    assert rel_err(out, ref) <= tolerance(F.silu(gate) * up, ref)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_packed_forward_matches_float64(device, dtype, shape):
    x = randn((*shape[:-1], 2 * shape[-1]), dtype, device)
    gate, up = x.chunk(2, dim=-1)
    ref = reference(gate, up)
    out = pyllm.swiglu_packed(x)
    assert out.shape == shape
    assert rel_err(out, ref) <= tolerance(F.silu(gate) * up, ref)


def torch_grads(gate, up, dout):
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    (F.silu(g) * u).backward(dout)
    return g.grad, u.grad


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backward_matches_float64(device, dtype, shape, packed):
    gate, up, dout = (randn(shape, dtype, device) for _ in range(3))
    ref_dg, ref_du = torch_grads(gate.double().cpu(), up.double().cpu(), dout.double().cpu())
    torch_dg, torch_du = torch_grads(gate, up, dout)
    if packed:
        x = torch.cat([gate, up], dim=-1).requires_grad_()
        pyllm.swiglu_packed(x).backward(dout)
        dg, du = x.grad.chunk(2, dim=-1)
    else:
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        pyllm.swiglu(g, u).backward(dout)
        dg, du = g.grad, u.grad
    assert rel_err(dg, ref_dg) <= tolerance(torch_dg, ref_dg)
    assert rel_err(du, ref_du) <= tolerance(torch_du, ref_du)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_element_is_written(device, dtype):
    # Odd sizes exercise the kernels' tails (and the scalar path on CUDA).
    for shape in [(5, 1031), (4096 + 3,), (3, 8192 * 2 + 5)]:
        gate, up, dout = (randn(shape, dtype, device) for _ in range(3))
        out = poisoned(shape, dtype, device)
        swiglu_ops.swiglu_forward_into(gate, up, out)
        dg, du = poisoned(shape, dtype, device), poisoned(shape, dtype, device)
        swiglu_ops.swiglu_backward_into(dout, gate, up, dg, du)
        x = torch.cat([gate, up], dim=-1)
        out_p, dx = poisoned(shape, dtype, device), poisoned(x.shape, dtype, device)
        swiglu_ops.swiglu_packed_forward_into(x, out_p)
        swiglu_ops.swiglu_packed_backward_into(dout, x, dx)
        for t in (out, dg, du, out_p, dx):
            assert not t.isnan().any()
        assert torch.equal(out, out_p)
        assert torch.equal(torch.cat([dg, du], dim=-1), dx)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_misaligned_and_strided_inputs(device):
    # Offset views break 16-byte alignment and non-contiguous inputs get copied: same answers.
    base = randn((3, 2 * 64 + 1), torch.bfloat16, device)
    x = base[:, 1:]  # packed (3, 128), misaligned by one element
    gate, up = x.chunk(2, dim=-1)  # non-contiguous views
    expected = pyllm.swiglu(gate.contiguous(), up.contiguous())
    assert torch.equal(pyllm.swiglu_packed(x), expected)
    assert torch.equal(pyllm.swiglu(gate, up), expected)
    assert torch.equal(pyllm.swiglu(gate.t().contiguous().t(), up.t().contiguous().t()), expected)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_empty_tensors(device):
    for shape in [(0,), (3, 0), (0, 5)]:
        g = torch.randn(shape, device=device, requires_grad=True)
        u = torch.randn(shape, device=device, requires_grad=True)
        out = pyllm.swiglu(g, u)
        assert out.shape == shape
        out.sum().backward()
        assert g.grad.shape == shape
    x = torch.randn(0, 6, device=device, requires_grad=True)
    out = pyllm.swiglu_packed(x)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 6)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude_inputs(device, dtype):
    # |gate| up to ~150 reaches exp's clamps and the saturated ends of sigmoid.
    gate, up, dout = randn((4, 999), dtype, device, scale=40.0), randn((4, 999), dtype, device), randn((4, 999), dtype, device)
    ref = reference(gate, up)
    assert rel_err(pyllm.swiglu(gate, up), ref) <= tolerance(F.silu(gate) * up, ref)
    ref_dg, ref_du = torch_grads(gate.double().cpu(), up.double().cpu(), dout.double().cpu())
    torch_dg, torch_du = torch_grads(gate, up, dout)
    dg, du = torch.ops.pyllm.swiglu_backward(dout, gate, up)
    assert rel_err(dg, ref_dg) <= tolerance(torch_dg, ref_dg)
    assert rel_err(du, ref_du) <= tolerance(torch_du, ref_du)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_and_infinite_gates_match_torch(device, dtype):
    # Where torch's fp32 sigmoid underflows to exactly 0 (gate < ~-88.7), silu is -0 for finite
    # gates and NaN for -inf (-inf * 0), and so are the gradients; 16 lanes of each value reach
    # the AVX-512 paths, the odd count the scalar tail.
    specials = [-math.inf, -1000.0, -120.0, -89.0, -60.0, 60.0, 1000.0, math.inf, math.nan]
    gate = torch.tensor(specials * 17, dtype=dtype, device=device)
    up = torch.full_like(gate, 3.0)
    dout = torch.full_like(gate, 2.0)
    want = (F.silu(gate.float()) * up.float()).to(dtype)
    leaves = [gate.float().requires_grad_(), up.float().requires_grad_()]
    want_dg, want_du = (g.to(dtype) for g in torch.autograd.grad(F.silu(leaves[0]) * leaves[1], leaves, dout.float()))
    got = pyllm.swiglu(gate, up)
    dg, du = torch.ops.pyllm.swiglu_backward(dout, gate, up)
    for name, ours, theirs in (("out", got, want), ("dgate", dg, want_dg), ("dup", du, want_du)):
        nonfinite = ~torch.isfinite(theirs) | (theirs == 0)
        assert torch.equal(ours[nonfinite].isnan(), theirs[nonfinite].isnan()), name
        same = nonfinite & ~theirs.isnan()
        assert torch.equal(ours[same], theirs[same]), name


def test_nonfinite_inputs_propagate():
    gate = torch.tensor([float("nan"), 1.0, float("inf"), 3.0])
    up = torch.tensor([1.0, float("nan"), 1.0, float("inf")])
    out = pyllm.swiglu(gate, up)
    assert out[0].isnan() and out[1].isnan()
    assert out[2] == float("inf") and out[3] == float("inf")


def test_gradcheck_float64():
    for shape in [(3, 7), (2, 1, 5)]:
        gate = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        up = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(pyllm.swiglu, (gate, up))
        x = torch.randn((*shape[:-1], 2 * shape[-1]), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(pyllm.swiglu_packed, (x,))


def test_opcheck():
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    for args in [(gate, up), (gate.requires_grad_(), up.requires_grad_())]:
        torch.library.opcheck(torch.ops.pyllm.swiglu.default, args)
    x = torch.randn(4, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.pyllm.swiglu_packed.default, (x,))
    torch.library.opcheck(torch.ops.pyllm.swiglu_backward.default, (torch.randn(4, 6), gate.detach(), up.detach()))
    torch.library.opcheck(torch.ops.pyllm.swiglu_packed_backward.default, (torch.randn(4, 6), x.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_inference_call_matches_the_op(dtype):
    # Plain eager CPU calls without autograd run the op's body directly (pyllm/ops/_util.py).
    gate, up = torch.randn(5, 33, dtype=dtype), torch.randn(5, 33, dtype=dtype)
    assert torch.equal(pyllm.swiglu(gate, up), torch.ops.pyllm.swiglu(gate, up))
    x = torch.randn(3, 2, 66, dtype=dtype)[:, 1]  # strided
    assert torch.equal(pyllm.swiglu_packed(x), torch.ops.pyllm.swiglu_packed(x))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_eager_autograd_call_matches_the_op(device):
    # Eager calls with autograd run the op's body in a plain autograd.Function (pyllm/ops/_util.py):
    # the same bits forward and backward as through the op's own autograd.
    gate, up = (torch.randn(5, 33, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(2))
    x = torch.randn(3, 2, 66, dtype=torch.bfloat16, device=device).requires_grad_()
    dout = torch.randn(5, 33, dtype=torch.bfloat16, device=device)
    out, out_op = pyllm.swiglu(gate, up), torch.ops.pyllm.swiglu(gate, up)
    assert type(out.grad_fn).__name__ == "_SwigluFunctionBackward"
    assert "pyllm_swiglu" in type(out_op.grad_fn).__name__
    assert torch.equal(out, out_op)
    for g, g_op in zip(torch.autograd.grad(out, (gate, up), dout), torch.autograd.grad(out_op, (gate, up), dout)):
        assert torch.equal(g, g_op)
    packed, packed_op = pyllm.swiglu_packed(x[:, 1]), torch.ops.pyllm.swiglu_packed(x[:, 1])
    assert type(packed.grad_fn).__name__ == "_SwigluPackedFunctionBackward"
    assert torch.equal(torch.autograd.grad(packed, x, dout[:3])[0], torch.autograd.grad(packed_op, x, dout[:3])[0])
    (dgate,) = torch.autograd.grad(pyllm.swiglu(gate, up).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError):  # no double backward, as through the op
        dgate.sum().backward()


def test_meta_tensors_give_shapes():
    gate = torch.empty(3, 5, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = pyllm.swiglu(gate, gate)
    assert out.is_meta and out.shape == (3, 5) and out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(pyllm.swiglu_packed(gate[:, :4]).sum(), gate)
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

def test_bad_input_raises_clear_errors():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        pyllm.swiglu(a, torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        pyllm.swiglu(a, a.bfloat16())
    with pytest.raises(TypeError, match="expected one of"):
        pyllm.swiglu(a.int(), a.int())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pyllm.swiglu([1.0], a)
    with pytest.raises(ValueError, match="must be even"):
        pyllm.swiglu_packed(torch.randn(3, 5))
    with pytest.raises(ValueError, match="must be even"):
        pyllm.swiglu_packed(torch.tensor(1.0))
    with pytest.raises(ValueError, match="device"):
        pyllm.swiglu(on_unsupported_device(a), on_unsupported_device(a))


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
        swiglu_ops.swiglu_backward_into(fake, fake, fake, fake, fake)


@pytest.mark.cuda
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="must match"):
        pyllm.swiglu(torch.randn(3), torch.randn(3, device="cuda"))


def test_cpp_rechecks_raw_calls():
    # The C++ entry points throw on bad arguments instead of crashing.
    with pytest.raises(ValueError, match="null data pointer"):
        _C.swiglu_fwd_cpu(0, 0, 0, 1, 10, 10, 10, 0)
    with pytest.raises(ValueError, match="dtype"):
        a = torch.randn(4)
        _C.swiglu_fwd_cpu(a.data_ptr(), a.data_ptr(), a.data_ptr(), 1, 4, 4, 4, 99)
    with pytest.raises(ValueError, match=">= 0"):
        _C.swiglu_fwd_cpu(1, 1, 1, -1, 4, 4, 4, 0)
    with pytest.raises(ValueError, match="strides"):
        _C.swiglu_bwd_cpu(1, 1, 1, 1, 1, 2, 4, 2, 4, 0)
