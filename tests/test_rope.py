from types import SimpleNamespace

import pytest
import torch

import pyllm
from pyllm import _C
from pyllm.nn import apply_rope, rope_cos_sin
from pyllm.ops import _util
from pyllm.ops import rope as rope_ops
from helpers import CPU_AND_CUDA, assert_compiles_like_eager, on_unsupported_device, poisoned, rel_err, tolerance

# (B, T, H, D, R): full and partial rotary (Phi-4-mini's R < D), R/2 not a multiple of 16 (the
# AVX-512 tails), one token, one head.
SHAPES = [(2, 7, 3, 32, 32), (1, 1, 4, 64, 64), (3, 5, 2, 128, 128), (2, 9, 3, 80, 48), (1, 6, 1, 34, 34)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TABLES = ["shared", "per_row", "broadcast_row"]


def randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)


def tables(kind, B, T, R, dtype, device):
    """cos, sin as the model makes them: (T, R/2), (B, T, R/2) at per-row positions, or (1, T, R/2)."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "per_row":
        positions = torch.stack([torch.randperm(1000)[:T] for _ in range(B)])
        cos, sin = rope_cos_sin(T, R, theta=500.0, dtype=table_dtype, positions=positions)
    else:
        cos, sin = rope_cos_sin(T, R, theta=500.0, start=37, dtype=table_dtype)
        if kind == "broadcast_row":
            cos, sin = cos[None], sin[None]
    return cos.to(device), sin.to(device)


def pairs(x, half, interleaved):
    """The two members of each rotated pair: (i, i + R/2), or (2i, 2i + 1) interleaved."""
    return (x[..., 0:2 * half:2], x[..., 1:2 * half:2]) if interleaved else (x[..., :half], x[..., half:2 * half])


def unpairs(r1, r2, rest, interleaved):
    rotated = torch.stack([r1, r2], dim=-1).flatten(-2) if interleaved else torch.cat([r1, r2], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def exact(x, cos, sin, interleaved=False):
    """The rotation in float64 on the CPU, from the same tables."""
    x, cos, sin = x.double().cpu(), cos.double().cpu(), sin.double().cpu()
    half = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = pairs(x, half, interleaved)
    return unpairs(x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:], interleaved)


def as_torch_writes_it(x, cos, sin, interleaved=False):
    """pyllm.nn.apply_rope's torch form (HF's rotate_half, in the tables' fp32, cast back once)."""
    half = cos.shape[-1]
    x1, x2 = pairs(x.to(cos.dtype), half, interleaved)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    r1, r2 = (x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype)
    return unpairs(r1, r2, x[..., 2 * half:], interleaved)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_and_backward_match_float64(device, dtype, shape, table, interleaved):
    # interleaved: GPT-J's / Meta's pairs (2i, 2i + 1), flash-attn's rotary_interleaved
    B, T, H, D, R = shape
    # x as the model makes q: a view of a fused projection, (B, T, H, D) with a token stride of 3 H D
    x = randn((B, T, 3 * H * D), dtype, device)[..., H * D:2 * H * D].view(B, T, H, D)
    cos, sin = tables(table, B, T, R, dtype, device)
    dout = randn((B, T, H, D), dtype, device)
    ref = exact(x, cos, sin, interleaved)
    x64 = x.detach().double().cpu().requires_grad_()
    (ref_grad,) = torch.autograd.grad(exact(x64, cos, sin, interleaved), x64, dout.double().cpu())
    xt = x.detach().clone().requires_grad_()
    theirs = as_torch_writes_it(xt, cos, sin, interleaved)
    (their_grad,) = torch.autograd.grad(theirs, xt, dout)
    xo = x.detach().clone().requires_grad_()
    ours = pyllm.rope(xo, cos, sin, interleaved=interleaved)
    (our_grad,) = torch.autograd.grad(ours, xo, dout)
    assert ours.shape == x.shape and ours.dtype == dtype and ours.is_contiguous()
    assert rel_err(ours, ref) <= tolerance(theirs, ref)
    assert rel_err(our_grad, ref_grad) <= tolerance(their_grad, ref_grad)
    assert torch.equal(ours[..., R:], x[..., R:])  # partial rotary: the rest passes through unrounded


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_element_is_written(device, dtype):
    for B, T, H, D, R in [(2, 33, 5, 64, 64), (1, 17, 3, 80, 32), (300, 1, 2, 128, 128)]:
        x = randn((B, T, H, D), dtype, device)
        cos, sin = tables("shared", B, T, R, dtype, device)
        for interleaved in (False, True):
            out = poisoned((B, T, H, D), dtype, device)
            rope_ops.rope_into(x, cos, sin, out, interleaved=interleaved)
            assert not out.isnan().any()
            back = poisoned((B, T, H, D), dtype, device)
            rope_ops.rope_into(out, cos, sin, back, inverse=True, interleaved=interleaved)
            assert rel_err(back, x) < 3 * torch.finfo(dtype).eps  # rotating back gives x again


@pytest.mark.level_free
def test_gradcheck_float64():
    x = torch.randn(2, 4, 3, 10, dtype=torch.float64, requires_grad=True)
    for kind in TABLES:
        cos, sin = tables(kind, 2, 4, 8, torch.float64, "cpu")
        for interleaved in (False, True):
            fn = lambda t: pyllm.rope(t, cos, sin, interleaved=interleaved)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.level_free
def test_opcheck():
    cos, sin = tables("per_row", 2, 4, 8, torch.float32, "cpu")
    for x in [torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 12, requires_grad=True)]:
        for interleaved in (False, True):
            torch.library.opcheck(torch.ops.pyllm.rope.default, (x, cos, sin, False, interleaved))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_eager_calls_match_the_op(device):
    x = randn((2, 5, 3, 64), torch.bfloat16, device)
    cos, sin = tables("shared", 2, 5, 64, torch.bfloat16, device)
    assert torch.equal(pyllm.rope(x, cos, sin), torch.ops.pyllm.rope(x, cos, sin, False))
    x.requires_grad_()
    out, out_op = pyllm.rope(x, cos, sin), torch.ops.pyllm.rope(x, cos, sin, False)
    assert type(out.grad_fn).__name__ == "_RopeFunctionBackward"
    dout = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, dout)[0], torch.autograd.grad(out_op, x, dout)[0])


def test_model_path_runs_the_kernel_and_compiles():
    cos, sin = tables("shared", 2, 6, 32, torch.float32, "cpu")
    x = torch.randn(2, 6, 4, 32, requires_grad=True)
    out = apply_rope(x, cos, sin)
    assert type(out.grad_fn).__name__ == "_RopeFunctionBackward"
    # tables that need a gradient, or of another precision, take the torch form
    assert type(apply_rope(x, cos.requires_grad_(), sin).grad_fn).__name__ != "_RopeFunctionBackward"
    cos.requires_grad_(False)
    assert_compiles_like_eager(lambda t: apply_rope(t, cos, sin), x)
    # HF's (B, H, T, D) layout (here H = 1) is refused on the torch form too: broadcasting had made
    # a (B, T, T, D) result of it, silently
    for table in (cos.requires_grad_(), cos.half()):
        with pytest.raises(ValueError, match=r"apply_rope: x must be \(batch, seqlen, n_heads, head_dim\)"):
            apply_rope(torch.randn(2, 1, 6, 32), table, table)


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 3, 4, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cos = torch.empty(3, 4, device="meta")
    out = pyllm.rope(x, cos, cos)
    assert out.is_meta and out.shape == (2, 3, 4, 8)
    assert torch.autograd.grad(out.sum(), x)[0].shape == (2, 3, 4, 8)


def test_empty_tensors():
    cos, sin = tables("shared", 0, 3, 8, torch.float32, "cpu")
    x = torch.randn(0, 3, 2, 8, requires_grad=True)
    out = pyllm.rope(x, cos, sin)
    assert out.shape == (0, 3, 2, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape


# --- bad input ----------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 3, 4, 8)
    cos, sin = tables("shared", 2, 3, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"\(batch, seqlen, n_heads, head_dim\)"):
        pyllm.rope(x[0], cos, sin)
    with pytest.raises(TypeError, match="expected torch.float32"):
        pyllm.rope(x, cos.double(), sin.double())
    with pytest.raises(TypeError, match="expected torch.float64"):
        pyllm.rope(x.double(), cos, sin)
    with pytest.raises(ValueError, match="2 <= R <= head_dim"):
        pyllm.rope(x, torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="2 <= R <= head_dim"):
        pyllm.rope(x, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="2 <= R <= head_dim"):
        pyllm.rope(x, torch.randn(3, 3, 4), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="same shape"):
        pyllm.rope(x, cos, sin[:, :2])
    with pytest.raises(ValueError, match="no gradient flows to cos"):
        pyllm.rope(x, cos.clone().requires_grad_(), sin)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        pyllm.rope(x, 1.0, sin)
    with pytest.raises(TypeError, match="expected one of"):
        pyllm.rope(x.int(), cos, sin)
    with pytest.raises(ValueError, match="device"):
        pyllm.rope(on_unsupported_device(x), cos, sin)


def test_cuda_launch_without_cuda_kernels_raises(monkeypatch):
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32, shape=(1, 2, 1, 4),
                           data_ptr=lambda: 256, stride=lambda: (8, 4, 4, 1), dim=lambda: 2)
    angles = SimpleNamespace(shape=(2, 2), dim=lambda: 2, data_ptr=lambda: 512, dtype=torch.float32,
                             device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        rope_ops.rope_into(fake, angles, angles, fake)


def test_kernel_call_refuses_angles_of_other_positions():
    # The kernel reads T rows of angles wherever cos points: a longer table (a DTensor's whole one
    # beside a shard of x, when torch had not split it) had rotated by the first rows' positions.
    x, out = torch.randn(2, 3, 2, 8), torch.empty(2, 3, 2, 8)
    cos, sin = tables("shared", 1, 6, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"cos and sin must be \(T, R/2\)"):
        rope_ops.rope_into(x, cos, sin, out)


@pytest.mark.cuda
def test_cuda_device_mismatch_raises():
    cos, sin = tables("shared", 1, 3, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must match"):
        pyllm.rope(torch.randn(1, 3, 2, 8, device="cuda"), cos, sin)


def test_cpp_rechecks_raw_calls():
    a = torch.randn(64)
    p = a.data_ptr()
    with pytest.raises(ValueError, match="rotated dims"):
        _C.rope_cpu(p, p, p, p, 1, 2, 1, 8, 5, [16, 8, 8], [16, 8, 8], 0, False, 0)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.rope_cpu(0, p, p, p, 1, 2, 1, 8, 4, [16, 8, 8], [16, 8, 8], 0, False, 0)
    with pytest.raises(ValueError, match="strides"):
        _C.rope_cpu(p, p, p, p, 1, 2, 1, 8, 4, [16, 8], [16, 8, 8], 0, False, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.rope_cpu(p, p, p, p, 1, 2, 1, 8, 4, [16, 8, 8], [16, 8, 8], 0, False, 99)


def test_registered_op_called_directly_checks_the_angles():
    # torch.ops.pyllm.rope had read float64 angles as float32 for a float32 x (no check at that level)
    x, c = torch.randn(1, 8, 2, 32), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="cos and sin must be torch.float32"):
        torch.ops.pyllm.rope(x, c, c, False)
