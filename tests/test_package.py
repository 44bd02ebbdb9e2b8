"""The package itself: import, the extension's build flags, `python -m pyllm info`."""
import inspect
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm import _C
from pyllm.ops import BACKENDS, _util


def test_import_and_version():
    assert pyllm.__version__
    assert callable(pyllm.swiglu) and callable(pyllm.swiglu_packed)
    for name in pyllm.__all__:  # every name it lists is there (linear_cross_entropy: from pyllm.nn, on demand)
        assert getattr(pyllm, name) is not None, name
    from pyllm import linear_cross_entropy
    from pyllm.nn import linear_cross_entropy as in_nn
    assert linear_cross_entropy is in_nn
    # the submodules as the docs name them (pyllm.nn.RMSNorm after a bare `import pyllm` had raised
    # AttributeError), imported at first use: `import pyllm` does not load them
    code = ("import sys, pyllm; assert 'pyllm.hf' not in sys.modules and 'pyllm.train' not in sys.modules; "
            "print(pyllm.nn.RMSNorm.__name__, pyllm.model.LLM.__name__, pyllm.hf.apply_pyllm_kernels.__name__, "
            "pyllm.train.TrainConfig.__name__, pyllm.data.open_tokens.__name__, pyllm.evaluate.__name__, "
            "pyllm.flash_attn_interface.flash_attn_func.__name__, pyllm.cpu_memory.reuse_cpu_memory.__name__, "
            "pyllm.plan.__name__, pyllm.cli.main.__name__)")
    root = Path(pyllm.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["RMSNorm", "LLM", "apply_pyllm_kernels", "TrainConfig", "open_tokens", "pyllm.evaluate",
                           "flash_attn_func", "reuse_cpu_memory", "pyllm.plan", "main"]


def _flagged_functions():
    import pyllm.flash_attn_interface as fai
    import pyllm.nn
    interface = [(getattr(fai, name), "return_attn_probs") for name in (
        "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
        "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func")]
    return [(pyllm.flash_attn, "return_lse"), (pyllm.flash_attn_with_kvcache, "return_lse"),
            (pyllm.cross_entropy, "return_z_loss"), (pyllm.nn.linear_cross_entropy, "return_z_loss"),
            (pyllm.nn.linear_cross_entropy, "return_token_stats"), (pyllm.nn.linear_token_logps, "return_token_stats"),
            (fai.flash_attn_with_kvcache, "return_softmax_lse"), *interface]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is Python 3.11's")
@pytest.mark.parametrize("func, flag", _flagged_functions(), ids=lambda x: getattr(x, "__qualname__", x))
def test_overloads_follow_the_function(func, flag):
    """A function whose flag adds return values has three overloads (flag False -> out, True -> a
    tuple, a bool -> either), so that a type checker sees a Tensor where one is returned (pyright had
    flagged `pyllm.flash_attn(q, k, v).square()`). Each must keep the function's parameters: names in
    order and defaults (a parameter added to the function alone would be refused by type checkers).
    Where a function has two such flags, each flag's three are those where the other is not True."""
    overloads = typing.get_overloads(func)
    annotations = [{name: str(p.annotation) for name, p in inspect.signature(o).parameters.items()} for o in overloads]
    others = {name for a in annotations for name, kind in a.items() if name != flag and kind == "Literal[True]"}
    assert [a[flag] for a in annotations if not any(a[other] == "Literal[True]" for other in others)] == \
        ["Literal[False]", "Literal[True]", "bool"]
    real = inspect.signature(func).parameters
    for o, a in zip(overloads, annotations):
        params = inspect.signature(o).parameters
        assert list(params) == list(real), o
        for name, p in params.items():
            if name != flag and a[name] != "Literal[True]":  # (a flag True: a required keyword there)
                assert p.default == real[name].default, (name, o)


def test_extension_reports_its_build():
    assert isinstance(_C.has_cuda, bool) and isinstance(_C.cpu_openmp, bool)
    if _C.has_cuda:
        assert _C.cuda_archs  # e.g. "80,90"
        assert _C.cuda_device_count() >= 0  # 0, not an exception, without a GPU or driver
        assert _C.cuda_runtime_version().count(".") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_extension_keeps_static_libraries_private():
    # A toolchain that links libstdc++ statically must not export it: torch's libstdc++.so.6 would
    # take over part of it and C++ error messages segfault (seen on the H200 machine, 2026-11-30).
    # These are libstdc++'s own definitions, never instantiated in pyllm's files.
    out = subprocess.run(["nm", "-D", "--defined-only", "-C", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    leaked = [line for line in out.splitlines()
              if any(name in line for name in ("std::locale::classic", "std::ios_base::Init", "__cxa_throw"))]
    assert not leaked, leaked


def test_dtype_codes_match_the_cpp_side():
    # csrc/common/dtype.h: f32 = 0, f16 = 1, bf16 = 2, f64 = 3
    import torch

    assert _util.DTYPE_CODES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pyllm", "info"], capture_output=True, text=True, check=True).stdout
    assert f"pyllm {pyllm.__version__}" in out
    assert "CUDA kernels:" in out and "GPU usable now:" in out
    for op in BACKENDS:
        assert op in out


def test_inference_does_not_import_torch_dynamo():
    # torch wraps every custom op's kernel in a dynamo guard imported at its first call (1.1-1.6 s
    # here); eager CPU calls without autograd run the ops' bodies, so generation starts at once.
    code = """
import sys, torch
if 'torch._dynamo' in sys.modules:
    print('preloaded'); sys.exit()
import pyllm
from pyllm.model import LLM, ModelConfig
if 'torch._dynamo' in sys.modules:  # (AdamW.step's torch.compiler.disable had imported it with pyllm, 0.85 s)
    print('imported by import pyllm'); sys.exit()
model = LLM(ModelConfig.from_preset('tiny')).eval()
model.generate(torch.randint(0, 100, (1, 20)), 4)
with torch.no_grad():
    x = torch.randn(3, 64)
    pyllm.swiglu(x, x), pyllm.swiglu_packed(x)
    q = torch.randn(1, 5, 2, 32)
    pyllm.flash_attn(q, q, q, causal=True)
print('imported' if 'torch._dynamo' in sys.modules else 'not imported')
"""
    root = Path(pyllm.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    if "preloaded" in out:
        pytest.skip("this torch imports torch._dynamo at import")
    assert out.strip() == "not imported"


# torch.jit.trace's deprecation: a DeprecationWarning up to torch 2.13, a FutureWarning from 2.14.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.torch.jit.trace. is deprecated:FutureWarning",
                            "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_ops():
    # Eager inference calls skip the custom op, but not under torch.jit.trace: the trace must hold
    # the op, not the body's allocations without its kernel call (a silently wrong trace).
    import torch

    def fn(gate, up, q, k_cache, v_cache, k_new):
        attn = pyllm.flash_attn(q, q, q, causal=True)
        cached = pyllm.flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, 3, k_new, k_new)
        return pyllm.swiglu(gate, up) * 2, pyllm.swiglu_packed(gate) + 1, attn * 2, cached + 1

    def inputs():
        q = torch.randn(1, 6, 2, 32)
        return (torch.randn(4, 8), torch.randn(4, 8), q, torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32),
                torch.randn(1, 1, 2, 32))

    with torch.no_grad():
        traced = torch.jit.trace(fn, inputs(), check_trace=False)
        args = inputs()
        for got, want in zip(traced(*[a.clone() for a in args]), fn(*args)):
            torch.testing.assert_close(got, want)


# torch 2.14: forward AD's decompositions call torch.jit.script (its FutureWarning), and vmap's
# fallback over a custom op without a batching rule (correct, per example) became a UserWarning.
@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:FutureWarning",
                            "ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_forward_mode_ad_is_refused_not_zero():
    # The ops register torch.autograd's backward only: forward mode (torch.func.jvp / jacfwd, dual
    # tensors) had given a tangent of 0, or none, silently. vmap and torch.func.grad work
    # (test_torch_func_reverse_mode_matches_autograd, test_vmap_batches_each_op_as_a_loop_would).
    import torch
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jacfwd, jvp, vmap

    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(2, 3, dtype=torch.float64, generator=gen) for _ in range(2))
    x, w = torch.randn(3, 8, dtype=torch.float64, generator=gen), torch.rand(8, dtype=torch.float64, generator=gen)
    q = torch.randn(1, 4, 2, 32, dtype=torch.float64, generator=gen)
    with pytest.raises(NotImplementedError, match="swiglu: pyllm's ops have no forward-mode AD"):
        jvp(lambda g: pyllm.swiglu(g, u), (g,), (torch.ones_like(g),))
    with pytest.raises(NotImplementedError, match="rms_norm: pyllm's ops have no forward-mode AD"):
        jacfwd(lambda x: pyllm.rms_norm(x, w, 1e-6))(x)
    with pytest.raises(NotImplementedError, match="flash_attn: pyllm's ops have no forward-mode AD"):
        jvp(lambda q: pyllm.flash_attn(q, q, q, causal=True), (q,), (torch.ones_like(q),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="cross_entropy: pyllm's ops have no forward"):
        pyllm.cross_entropy(fwAD.make_dual(x, torch.ones_like(x)), torch.tensor([1, 2, 3]))
    with pytest.raises(NotImplementedError, match="swiglu: pyllm's ops have no forward-mode AD"):
        torch.func.hessian(lambda g: pyllm.swiglu(g, g).sum())(g[0])
    with pytest.raises(NotImplementedError, match="swiglu_backward: pyllm's backward ops have no derivative"):
        grad(grad(lambda g: pyllm.swiglu(g, g).sum()))(g[0, 0])
    torch.testing.assert_close(vmap(lambda g: pyllm.swiglu(g, u[0]))(g), torch.nn.functional.silu(g) * u[0])
    # an op on constants inside a transform that differentiates something else runs as before
    scale = torch.rand(3, 8, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(grad(lambda s: (s * pyllm.rms_norm(x, w, 1e-6)).sum())(scale), pyllm.rms_norm(x, w, 1e-6))


def test_double_backward_names_the_op():
    # A gradient taken with create_graph=True and then differentiated (a gradient penalty): pyllm's
    # backward ops have no derivative, and said so in torch's words ("no autograd formula was
    # registered. Please use register_autograd to add one", advice for the op's author); now the
    # forward op's name and what is missing. The first backward with create_graph=True still works.
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, generator=gen, requires_grad=True)
    q = torch.randn(1, 4, 2, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([1, 2, 3])
    calls = {"flash_attn": lambda: pyllm.flash_attn(q, q, q, causal=True), "swiglu": lambda: pyllm.swiglu(x, x),
             "swiglu_packed": lambda: pyllm.swiglu_packed(x), "geglu": lambda: pyllm.geglu(x, x),
             "rms_norm": lambda: pyllm.rms_norm(x, w, 1e-6), "cross_entropy": lambda: pyllm.cross_entropy(x, targets),
             "generalized_jsd": lambda: pyllm.generalized_jsd(x, x.detach().flip(1))}
    for name, call in calls.items():
        inputs = [t for t in (q, x, w) if t.grad_fn is None]
        grads = [g for g in torch.autograd.grad(call().sum(), inputs, create_graph=True, allow_unused=True)
                 if g is not None]
        op = {"generalized_jsd": "distill"}.get(name, name)
        with pytest.raises(NotImplementedError, match=f"pyllm.{op}: no second derivative"):
            sum(g.sum() for g in grads).backward()


def _autograd(fn, *inputs):
    """torch.autograd's gradients of fn(*inputs).sum() for every input."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs).sum(), inputs)


@pytest.mark.filterwarnings("error:There is a performance drop")
def test_torch_func_reverse_mode_matches_autograd():
    # torch.func.grad / vjp / jacrev over the ops had failed on torch's "must override the
    # setup_context staticmethod" (torch.library's autograd has none); per-example gradients
    # (vmap of grad, Opacus's and functional meta-learning's route) too. They run each op's own
    # backward: the same numbers as torch.autograd, bit for bit; vmap through batching rules.
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)
    g, u, x2 = rand(3, 5, 8), rand(3, 5, 8), rand(3, 5, 16)
    w, cos, sin = rand(8) + 1, rand(5, 2), rand(5, 2)
    q, k, v = rand(3, 1, 6, 4, 32), rand(3, 1, 6, 2, 32), rand(3, 1, 6, 2, 32)
    logits, targets, teacher = rand(3, 6, 10), torch.randint(0, 10, (3, 6), generator=gen), rand(3, 6, 10)
    square = lambda t: t * t  # a loss whose gradient depends on the output, not just ones
    cases = {  # name: (fn of one example's tensors, the batched tensors; vmap maps dim 0)
        "swiglu": (lambda a, b: square(pyllm.swiglu(a, b)), (g, u)),
        "geglu": (lambda a, b: square(pyllm.geglu(a, b)), (g, u)),
        "swiglu_packed": (lambda a: square(pyllm.swiglu_packed(a)), (x2,)),
        "rms_norm": (lambda a, ww: square(pyllm.rms_norm(a, ww)), (g, w.expand(3, 8))),
        "rope": (lambda a: square(pyllm.rope(a.reshape(1, 5, 2, 4), cos, sin)), (g,)),
        "flash_attn": (lambda a, b, c: square(pyllm.flash_attn(a, b, c, causal=True)), (q, k, v)),
        "cross_entropy": (lambda a: pyllm.cross_entropy(a, targets[0], z_loss=1e-3), (logits,)),
        "generalized_jsd": (lambda a: pyllm.generalized_jsd(a, teacher[0]), (logits,)),
    }
    for name, (fn, batched) in cases.items():
        one = [t[0] for t in batched]
        argnums = tuple(range(len(one)))
        want = _autograd(fn, *one)
        got = torch.func.grad(lambda *a: fn(*a).sum(), argnums=argnums)(*one)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), name
        out, pullback = torch.func.vjp(fn, *one)
        assert all(torch.equal(a, b) for a, b in zip(pullback(torch.ones_like(out)), want)), name
        # per-example gradients: vmap over the batch of grad, against autograd on each example
        per_example = torch.func.vmap(torch.func.grad(lambda *a: fn(*a).sum(), argnums=argnums))(*batched)
        for i in range(3):
            want_i = _autograd(fn, *[t[i] for t in batched])
            for a, b in zip(per_example, want_i):
                torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12, msg=f"{name} example {i}")
    # jacrev against autograd's jacobian; grad of a vmap
    torch.testing.assert_close(torch.func.jacrev(lambda a: pyllm.swiglu(a, u[0, 0]))(g[0, 0]),
                               torch.autograd.functional.jacobian(lambda a: F.silu(a) * u[0, 0], g[0, 0]))
    got = torch.func.grad(lambda a: torch.func.vmap(lambda r: square(pyllm.rms_norm(r, w)))(a).sum())(g)
    torch.testing.assert_close(got, _autograd(lambda a: square(pyllm.rms_norm(a, w)), g)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("error:There is a performance drop")
@pytest.mark.parametrize("fused_loss", [False, True])
def test_per_example_gradients_of_the_model(fused_loss):
    # torch.func.functional_call + grad, vmapped over examples: the whole model (rms_norm, rope,
    # flash_attn, swiglu, cross_entropy) gives each example the gradient loss.backward() gives it.
    # The fused loss (gradients computed in its forward, which torch.func cannot take) computes the
    # logits under torch.func, and every target's position (vmap takes no data-dependent shape).
    from pyllm.model import LLM, ModelConfig

    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=64, block_size=16, n_layers=2, n_heads=4, n_kv_heads=2, dim=64)).double()
    model.fused_loss = fused_loss
    idx, targets = torch.randint(0, 64, (3, 1, 8)), torch.randint(0, 64, (3, 1, 8))
    targets[1, 0, :3] = -1  # a prompt: no loss there
    _assert_per_example_gradients(model, idx, targets)


def _assert_per_example_gradients(model, idx, targets):
    """vmap(grad) over functional_call of model's loss, for each example of idx / targets (N, 1, T),
    against model(idx[i], targets[i]) and backward(), for every parameter that wants a gradient."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(params, idx, targets):
        return torch.func.functional_call(model, params, (idx, targets))[1]

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, idx, targets)
    for i in range(idx.shape[0]):
        model.zero_grad()
        model(idx[i], targets[i])[1].backward()
        for name in params:
            torch.testing.assert_close(per_example[name][i], model.get_parameter(name).grad, rtol=1e-10, atol=1e-12,
                                       msg=f"{name} example {i}")


@pytest.mark.filterwarnings("error:There is a performance drop")
def test_torch_func_through_the_fused_losses():
    # pyllm.nn's fused losses keep state in their autograd.Functions (gradients made in the
    # forward, logits recomputed in the backward), which torch.func cannot take: they had failed on
    # its setup_context message. Under torch.func they compute the whole logits and take the ops'
    # derivatives: the fused paths' gradients (autograd), per example too.
    import pyllm.nn as pnn

    gen = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)
    x, w, xt, wt = rand(3, 6, 16), rand(11, 16), rand(3, 6, 8), rand(11, 8)
    targets = torch.randint(0, 11, (3, 6), generator=gen)
    targets[0, :2] = -1  # a prompt's rows
    ref = rand(3, 3)

    def dpo(logps, s0, s1):  # pairs (chosen, rejected) of 2-row sequences
        d = (logps[0::2] - logps[1::2]) - ref[0, s0 // 2:s1 // 2]
        return -F.logsigmoid(0.1 * d).sum()

    cases = {
        "linear_token_logps": lambda a, ww, t: pnn.linear_token_logps(a, ww, t, chunk_rows=4, softcap=3.0).square(),
        "linear_sequence_loss": lambda a, ww, t: pnn.linear_sequence_loss(a, ww, t, [2, 2, 1, 1], 2, dpo,
                                                                          chunk_rows=3, scale=0.5)[0],
        "linear_distill": lambda a, ww, t: pnn.linear_distill(a, ww, xt[0], wt, beta=0.3, temperature=2.0,
                                                              chunk_rows=4, teacher_softcap=5.0),
        "linear_cross_entropy": lambda a, ww, t: pnn.linear_cross_entropy(a, ww, t, chunk_rows=4, z_loss=1e-2),
    }
    for name, fn in cases.items():
        for i in range(3):
            want = _autograd(lambda a, ww: fn(a, ww, targets[i]), x[i], w)
            got = torch.func.grad(lambda a, ww: fn(a, ww, targets[i]).sum(), argnums=(0, 1))(x[i], w)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{name} example {i}")
        per_example = torch.func.vmap(torch.func.grad(lambda a, ww, t: fn(a, ww, t).sum(), argnums=(0, 1)),
                                      in_dims=(0, None, 0))(x, w, targets)
        for i in range(3):
            for a, b in zip(per_example, _autograd(lambda a, ww: fn(a, ww, targets[i]), x[i], w)):
                torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12, msg=f"{name} vmap example {i}")
    # the frozen head's path (the forward keeps d logp / dx): x alone differentiated
    want = _autograd(lambda a: cases["linear_token_logps"](a, w, targets[1]), x[1])[0]
    got = torch.func.grad(lambda a: cases["linear_token_logps"](a, w, targets[1]).sum())(x[1])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("error:There is a performance drop")
@pytest.mark.parametrize("lora", [False, True])
def test_per_example_gradients_of_a_mixture_of_experts(lora):
    # The experts' sorted path reads the routing on the host and runs autograd.Functions of its
    # own (torch.func: its setup_context message; vmap: no storage to read). Under torch.func the
    # layer gathers each (token, choice) pair's expert weights, LoRA's factors too.
    from pyllm.model import LLM, ModelConfig

    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=64, block_size=16, n_layers=2, n_heads=4, n_kv_heads=2, dim=32,
                            n_experts=4, experts_per_token=2)).double()
    if lora:
        model.add_lora(4, 8.0, targets=["q", "experts"])
        with torch.no_grad():  # B starts at 0: A would get no gradient
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_(0, 0.1)
    assert any("gate_up" in name for name, p in model.named_parameters() if p.requires_grad)
    _assert_per_example_gradients(model, torch.randint(0, 64, (3, 1, 8)), torch.randint(0, 64, (3, 1, 8)))


@pytest.mark.filterwarnings("error:There is a performance drop")
def test_vmap_batches_each_op_as_a_loop_would():
    # Batching rules (torch's fallback had looped with a "performance drop" warning): the vmapped
    # dim folded into the kernels' rows or batch where the op allows, a loop where it does not
    # (a per-example norm weight, per-row angles, varlen attention); outputs exact either way.
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape, dtype=torch.float64: torch.randn(*shape, dtype=dtype, generator=gen)
    N = 3
    g, u, x2 = rand(4, N, 8), rand(4, 8), rand(4, N, 16)
    w, ws = rand(8) + 1, rand(N, 8)
    q, k, v = rand(N, 2, 7, 4, 32), rand(2, 7, 2, 32), rand(N, 2, 7, 2, 32)
    cos, sin, cos_rows = rand(7, 8), rand(7, 8), rand(2, 7, 8)
    varlen_q, cu = rand(N, 7, 4, 32), torch.tensor([0, 3, 7], dtype=torch.int32)
    logits, targets, teacher = rand(N, 5, 11), torch.randint(0, 11, (N, 5), generator=gen), rand(5, 11)
    slopes, slopes_rows = torch.rand(4, generator=gen), torch.rand(2, 4, generator=gen)
    cases = [  # (name, fn, args, in_dims)
        ("swiglu", pyllm.swiglu, (g, u), (1, None)),
        ("geglu", pyllm.geglu, (g, g), (1, 1)),
        ("swiglu_packed", pyllm.swiglu_packed, (x2,), (1,)),
        ("rms_norm", lambda a: pyllm.rms_norm(a, w), (g,), (1,)),
        ("rms_norm per-example weight", pyllm.rms_norm, (g, ws), (1, 0)),
        ("rope", lambda a: pyllm.rope(a, cos, sin), (q,), (0,)),
        ("rope per-row angles", lambda a: pyllm.rope(a, cos_rows, cos_rows), (q,), (0,)),
        ("flash_attn", lambda a, b, c: pyllm.flash_attn(a, b, c, causal=True), (q, k, v), (0, None, 0)),
        ("flash_attn lse", lambda a, b: pyllm.flash_attn(a, b, b, return_lse=True)[1], (q, v), (0, 0)),
        ("flash_attn alibi", lambda a, b: pyllm.flash_attn(a, b, b, alibi_slopes=slopes), (q, v), (0, 0)),
        ("flash_attn alibi per row", lambda a, b: pyllm.flash_attn(a, b, b, alibi_slopes=slopes_rows), (q, v), (0, 0)),
        ("flash_attn varlen", lambda a: pyllm.flash_attn(a, a[:, :2], a[:, :2], cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                          max_seqlen_q=4, max_seqlen_k=4, causal=True), (varlen_q,), (0,)),
        ("cross_entropy", lambda a, t: pyllm.cross_entropy(a, t, label_smoothing=0.1), (logits, targets), (0, 0)),
        ("cross_entropy rows", lambda a: pyllm.cross_entropy(a, targets[0], reduction="none"), (logits,), (0,)),
        ("generalized_jsd", lambda a: pyllm.generalized_jsd(a, teacher), (logits,), (0,)),
    ]
    for name, fn, args, in_dims in cases:
        got = torch.func.vmap(fn, in_dims=in_dims)(*args)
        want = torch.stack([fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(N)])
        assert torch.equal(got, want), name


THREADS_PROBE = """
import ctypes, sys, threading, torch, pyllm
gomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
omp_max = ctypes.CDLL(gomp).omp_get_max_threads
torch.set_num_threads(int(sys.argv[1]))
x, w = torch.randn(64, 256), torch.randn(256)
seen = []
def fresh():  # a thread no torch op has run in: OpenMP's default count there until someone sets it
    pyllm.rms_norm(x, w)
    seen.append(omp_max())
t = threading.Thread(target=fresh)
t.start()
t.join()
print(seen[0])
"""


@pytest.mark.parametrize("threads, env", [(1, None), (2, "1")])
def test_cpu_kernels_take_torchs_thread_count_in_any_thread(threads, env):
    # OpenMP's thread count is per thread: the C++ kernels in a fresh Python thread size their teams
    # as torch.set_num_threads says (torch does for its own ops), not OpenMP's default (every core,
    # or OMP_NUM_THREADS).
    import os

    if not Path("/proc/self/maps").exists() or "libgomp" not in Path("/proc/self/maps").read_text():
        pytest.skip("no GNU OpenMP runtime loaded (the probe reads its count through ctypes)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: every count is 1")
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if env is not None:
        environ["OMP_NUM_THREADS"] = env
    out = subprocess.run([sys.executable, "-c", THREADS_PROBE, str(threads)], capture_output=True, text=True,
                         check=True, env=environ).stdout
    assert int(out) == threads


FORK_PROBE = """
import os, signal, sys, torch, pyllm
x, w, q = torch.randn(64, 4096), torch.randn(4096), torch.randn(2, 256, 4, 64)
want = pyllm.rms_norm(x, w), pyllm.flash_attn(q, q, q, causal=True)  # (the parent's OpenMP threads started)
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hang ends the child, not the test run
    got = pyllm.rms_norm(x, w), pyllm.flash_attn(q, q, q, causal=True)
    os._exit(0 if all(torch.equal(a, b) for a, b in zip(got, want)) else 3)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_process_forked_after_the_kernels_ran_runs_them():
    # A child forked after the CPU kernels had run (a DataLoader worker, a fork Pool's) hung at its
    # next kernel (killed by its alarm: -14): GNU OpenMP kept the parent's thread pool, whose
    # threads the child does not have. The child now runs them on its one thread, to the same bits.
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    out = subprocess.run([sys.executable, "-c", FORK_PROBE], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])


def test_a_gpu_older_than_the_kernels_is_named_and_left_to_torch(monkeypatch):
    # A V100 / T4 has no image of the sm_80+ kernels: pyllm's layers take torch's ops there, and an op
    # called directly says why (not the launch's "no kernel image is available"). No GPU here: the
    # capability query is stood in for, as is a CUDA tensor.
    from types import SimpleNamespace

    from pyllm import nn as pnn
    from pyllm import train as ptrain

    capability = {0: (7, 0), 1: (8, 6), 2: (9, 0)}
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_util, "_runs_on", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: ["Tesla V100", "RTX 3090", "H100"][i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert [_util.gpu_runs_kernels(i) for i in range(3)] == [False, True, True]
    assert _util.gpu_runs_kernels() is True  # torch's current device
    gpu = [SimpleNamespace(is_cuda=True, is_cpu=False, device=torch.device("cuda", i), get_device=lambda i=i: i,
                           dtype=torch.bfloat16) for i in range(3)]
    assert [_util.cuda_kernels_run_on(t) for t in gpu] == [False, True, True]
    assert [bool(pnn._kernel_dtypes(t, {"cpu": (), "cuda": (torch.bfloat16,)})) for t in gpu] == [False, True, True]
    assert [ptrain.has_kernels_for(torch.device("cuda", i)) for i in range(3)] == [False, True, True]
    with pytest.raises(RuntimeError, match=r"swiglu: pyllm's CUDA kernels need a GPU of compute capability 8\.0 .*"
                                           r"cuda:0 \(Tesla V100\) is 7\.0"):
        _util.check_backend("swiglu", gpu[0])
    _util.check_backend("swiglu", gpu[1])
    monkeypatch.setattr(_util, "HAS_CUDA_KERNELS", False)
    monkeypatch.setattr(_util, "_runs_on", {})
    assert not _util.cuda_kernels_run_on(gpu[2]) and not ptrain.has_kernels_for(torch.device("cuda", 2))


ROOT = Path(__file__).resolve().parent.parent


def _setup_functions(monkeypatch):
    """setup.py's functions, without running its setup()."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "no"])
def test_build_switches_take_the_spellings_pyllm_cuda_takes(monkeypatch, value):
    # PYLLM_NATIVE=off had built -march=native kernels (a "portable" wheel that other CPUs refuse to
    # import) and PYLLM_OPENMP=false had kept OpenMP: only "0" was read as off (from the install audit)
    for var in ("PYLLM_MARCH", "PYLLM_CPU_DISPATCH", "PYLLM_OPENMP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYLLM_NATIVE", value)
    setup = _setup_functions(monkeypatch)
    assert setup["march"]() == ""
    monkeypatch.setenv("PYLLM_OPENMP", value)
    assert setup["flag"]("PYLLM_OPENMP", True) is False
    monkeypatch.setenv("PYLLM_CPU_DISPATCH", value.replace("0", "1").replace("off", "on").replace("OFF", "ON")
                       .replace("false", "true").replace("no", "yes"))
    assert setup["dispatch"]() is True
    monkeypatch.setenv("PYLLM_NATIVE", "maybe")
    with pytest.raises(SystemExit, match="PYLLM_NATIVE='maybe'"):
        setup["march"]()


@pytest.mark.skipif(not (ROOT / ".git").exists() or not (ROOT / "setup.py").is_file(), reason="needs a source checkout")
def test_sdist_holds_the_build_and_what_the_docs_link(tmp_path):
    # the docs link bench/results/ (tests/test_readme.py checks the links resolve), which the sdist
    # had left out: its tests failed there (from the install audit)
    import tarfile

    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path), "sdist", "-d", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert any(n.startswith("bench/results/") for n in names)
    assert {"CMakeLists.txt", "pyproject.toml", "README.md", "pyllm/py.typed", "csrc/bind.cpp",
            "tools/gen_unicode_tables.py", "tests/conftest.py", "bench/common.py"} <= names
    assert not any(n.startswith((".ci/", "build/")) or n.endswith(".so") for n in names)


def test_bench_results_name_the_pyllm_they_measured(tmp_path):
    # an unbuilt clone's benchmarks run the installed pyllm, and had been labelled with the clone's commit alone
    bench = ROOT / "bench"
    if not (bench / "common.py").is_file():
        pytest.skip("needs the source's bench/")
    sys.path.insert(0, str(bench))
    try:
        import common
    finally:
        sys.path.remove(str(bench))
    out = tmp_path / "r.json"
    common.write_json(out, "probe", "cpu", [])
    measured = json.loads(out.read_text())["pyllm"]
    where = Path(pyllm.__file__).resolve().parent
    assert measured == ("checkout" if where.parent == ROOT else f"installed {pyllm.__version__} at {where}")


def test_bench_results_say_how_they_were_run(tmp_path, monkeypatch):
    # a run's command line (--quick, --reuse-cpu-memory), its threads and the environment the docs'
    # results name (ATEN_CPU_CAPABILITY=avx2) were nowhere in its JSON (from the benchmark audit)
    bench = ROOT / "bench"
    if not (bench / "common.py").is_file():
        pytest.skip("needs the source's bench/")
    monkeypatch.syspath_prepend(str(bench))
    import common

    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--quick", "--reuse-cpu-memory"])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("PYLLM_CPU_LEVEL", "portable")
    common.write_json(tmp_path / "r.json", "probe", "cpu", [])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["argv"] == ["--quick", "--reuse-cpu-memory"] and doc["threads"]["torch"] == torch.get_num_threads()
    assert doc["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and doc["env"]["PYLLM_CPU_LEVEL"] == "portable"


@pytest.mark.skipif(not (ROOT / "bench" / "bench_optim.py").is_file(), reason="needs the source's bench/")
def test_bench_optim_runs_its_mixed_precision_row():
    # the amp row stepped one DynamicLossScaler again and again without update(), which the
    # optimizer refuses since: the script died without --quick, no optimizer numbers at all
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_optim.py"), "--params", "2e6",
                          "--tensor-size", "1000000", "--repeat", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bf16+master+amp  pyllm" in out.stdout


def test_bench_train_times_two_models_of_the_same_weights(monkeypatch):
    # bench_train / bench_per_example had timed pyllm's model against a plain one initialised on
    # its own: nothing said the two computed the same function (a swapped gate / up would time on)
    bench = ROOT / "bench"
    if not (bench / "bench_train.py").is_file():
        pytest.skip("needs the source's bench/")
    monkeypatch.syspath_prepend(str(bench))
    import bench_train

    from pyllm.model import LLM, ModelConfig

    cfg = ModelConfig.from_preset("tiny", n_layers=2, vocab_size=300)
    torch.manual_seed(0)
    ours = LLM(cfg)
    plain = bench_train.PlainLLM(cfg).load_pyllm(ours)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    for precision in ("fp32", "bf16"):
        bench_train.same_function(ours, plain, x[:, :-1], x[:, 1:], precision, torch.device("cpu"))
    with torch.no_grad():
        block = plain.blocks[1]
        block.w1.weight, block.w3.weight = block.w3.weight, block.w1.weight
    with pytest.raises(AssertionError, match="results differ from the peer's, not timed"):
        bench_train.same_function(ours, plain, x[:, :-1], x[:, 1:], "fp32", torch.device("cpu"))


def test_an_extension_built_from_other_sources_is_refused():
    # pyllm._C's interface number (csrc/bind.cpp's kAbi) against this Python's: a checkout pulled and
    # not rebuilt had run a cross-entropy kernel writing two statistics a row into a buffer of three
    # (the third left as it was allocated), wrong metrics without an error; its import now fails
    import types

    import pyllm

    pyllm._check_abi(pyllm._C)  # this build's
    for abi in (None, pyllm._ABI - 1, pyllm._ABI + 1):  # (None: a build from before the number existed)
        other = types.SimpleNamespace(__file__="/elsewhere/_C.so", **({} if abi is None else {"abi": abi}))
        with pytest.raises(ImportError, match="build it again"):
            pyllm._check_abi(other)
