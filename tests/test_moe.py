"""nn.MoEMLP (mixtures of experts) against a float64 reference that runs every expert on every token."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyllm.model import LLM, ModelConfig
from pyllm.nn import MoEMLP, moe_experts_gathered, moe_experts_grouped, moe_experts_lora, moe_experts_sorted

from helpers import CPU_AND_CUDA, rel_err, tolerance


def reference(x, router, gate_up, down, top_k, norm_topk_prob):
    """Each expert on every token, weighted by its router weight (0 where it was not chosen)."""
    probs = (x @ router.T).softmax(-1)  # (N, E)
    top, chosen = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros(x.shape[0], down.shape[1], dtype=x.dtype, device=x.device)
    for e in range(gate_up.shape[0]):
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        out = out + (top * (chosen == e)).sum(-1, keepdim=True).to(x.dtype) * ((F.silu(gate) * up) @ down[e].T)
    return out


def random_moe(n_experts=6, top_k=2, norm_topk_prob=True, dim=48, hidden=40, device="cpu"):
    torch.manual_seed(0)
    moe = MoEMLP(dim, hidden, n_experts, top_k, norm_topk_prob).double().to(device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def weights64(moe):
    return [w.detach().double().cpu().requires_grad_() for w in (moe.router.weight, moe.gate_up, moe.down)]


@pytest.mark.parametrize("n_experts, top_k, norm", [(6, 2, True), (6, 2, False), (4, 1, True), (3, 3, True)])
@pytest.mark.parametrize("path", [moe_experts_sorted, moe_experts_gathered], ids=["sorted", "gathered"])
def test_float64_forward_and_gradients_match_the_reference(n_experts, top_k, norm, path, monkeypatch):
    # Every path the layer takes (tokens sorted by expert; weights gathered per token) computes the
    # reference's outputs and all gradients (input, router, experts) in float64, with experts that
    # get no token (5 tokens x 1 of 4 experts leaves some idle: their gradients are zeros).
    import pyllm.nn

    moe = random_moe(n_experts, top_k, norm)
    monkeypatch.setattr(pyllm.nn, "moe_experts_sorted", path)  # the path forward takes on the CPU
    for n in (5, 37):
        x = torch.randn(n, 48, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(n, 48, dtype=torch.float64)
        out = moe(x)
        grads = torch.autograd.grad(out, [x, moe.router.weight, moe.gate_up, moe.down], dy)
        x64, ws = x.detach().clone().requires_grad_(), weights64(moe)
        ref = reference(x64, *ws, top_k, norm)
        want = torch.autograd.grad(ref, [x64, *ws], dy)
        assert rel_err(out, ref) < 1e-13
        for got, exp in zip(grads, want):  # (atol: top_k 1 renormalized, a weight of 1, the router's gradient roundoff)
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    idle = torch.ones(n_experts, dtype=torch.bool)
    idle[moe.route(x.detach()[:5])[1].flatten()] = False
    if idle.any():  # the first 5 tokens alone: the idle experts' gradients are exactly 0
        out = moe(x.detach()[:5])
        g, = torch.autograd.grad(out, moe.gate_up, dy[:5])
        assert not g[idle].any() and g[~idle].abs().sum(dim=(1, 2)).all()


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_within_twice_torchs_error(device, dtype):
    # The layer in dtype (the swiglu kernel between the matmuls) against float64, within twice the
    # error of the reference run in dtype by torch: the same router matmul in both, so the same
    # experts are chosen even where float64 would choose otherwise.
    moe = random_moe(n_experts=8, top_k=2, device=device).to(dtype)
    x = torch.randn(300, 48, device=device).to(dtype).requires_grad_()
    dy = torch.randn(300, 48, device=device).to(dtype)
    out = moe(x)
    params = [moe.router.weight, moe.gate_up, moe.down]
    got = torch.autograd.grad(out, [x, *params], dy)
    ws = [w.detach().requires_grad_() for w in params]
    xt = x.detach().clone().requires_grad_()
    # torch's own as a torch MoE computes it (transformers' Mixtral / Qwen-MoE: the routing softmax and
    # the experts' sum in fp32): reference() run in bf16 rounds both, 4-10x the error of this
    theirs = reference_fp32_routing(xt, *ws, 2, True)
    their_grads = torch.autograd.grad(theirs, [xt, *ws], dy)
    # float64 with the experts dtype chose (from the dtype router's probabilities)
    chosen = moe.route(x.detach())[1]
    x64, ws64 = x.detach().double().cpu().requires_grad_(), weights64(moe)
    ref = routed_reference(x64, ws64, chosen.cpu())
    ref_grads = torch.autograd.grad(ref, [x64, *ws64], dy.double().cpu())
    assert rel_err(out, ref) <= tolerance(theirs, ref)
    for name, g, t, r in zip(("dx", "drouter", "dgate_up", "ddown"), got, their_grads, ref_grads):  # every gradient
        assert rel_err(g, r) <= tolerance(t, r), name


def reference_fp32_routing(x, router, gate_up, down, top_k, norm_topk_prob):
    """reference() with the router's softmax and the sum over experts in fp32, the result in x's dtype."""
    probs = (x @ router.T).float().softmax(-1)
    top, chosen = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    top = top.to(x.dtype)
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        out = out + ((top * (chosen == e)).sum(-1, keepdim=True) * ((F.silu(gate) * up) @ down[e].T)).float()
    return out.to(x.dtype)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_grouped_gemm_path_in_bf16(device):
    # The path CUDA takes in bf16 (torch's grouped GEMM, device offsets, no host read), run here
    # through torch's CPU grouped GEMM: outputs and gradients within twice torch's error of float64
    # (the experts chosen in bf16), idle experts included.
    moe = random_moe(n_experts=8, top_k=2, device=device).to(torch.bfloat16)
    for n in (300, 3):
        x = torch.randn(n, 48, device=device).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(n, 48, device=device).to(torch.bfloat16)
        _, chosen, weights = moe.route(x)  # (the reference's weights depend on x too)
        out = moe_experts_grouped(x, chosen, weights, moe.gate_up, moe.down)
        got = torch.autograd.grad(out, [x, moe.gate_up, moe.down], dy)
        ws = [w.detach().requires_grad_() for w in (moe.router.weight, moe.gate_up, moe.down)]
        xt = x.detach().clone().requires_grad_()
        theirs = routed_reference(xt, ws, chosen)
        their_grads = torch.autograd.grad(theirs, [xt, ws[1], ws[2]], dy)
        x64, ws64 = x.detach().double().cpu().requires_grad_(), weights64(moe)
        ref = routed_reference(x64, ws64, chosen.cpu())
        ref_grads = torch.autograd.grad(ref, [x64, ws64[1], ws64[2]], dy.double().cpu())
        assert rel_err(out, ref) <= tolerance(theirs, ref)
        for g, t, r in zip(got, their_grads, ref_grads):
            assert rel_err(g, r) <= tolerance(t, r)


def routed_reference(x, ws, chosen):
    """reference with the experts given (chosen (N, k)) rather than chosen from x's probabilities."""
    router, gate_up, down = ws
    probs = (x @ router.T).softmax(-1)
    top = probs.gather(1, chosen)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        out = out + (top * (chosen == e)).sum(-1, keepdim=True) * ((F.silu(gate) * up) @ down[e].T)
    return out



def test_a_bf16_model_compiles_whole():
    # Traced, a bf16 MoE takes torch's grouped GEMM (no host read of the experts' shares): one graph a
    # shape, fullgraph=True works; the sorted path had broken the graph at each layer (an audit of
    # torch.compile, 2026-12-06: tiny-moe, ~14 graphs a forward) and failed under fullgraph=True.
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch without F.grouped_mm")
    import torch._dynamo

    torch._dynamo.reset()
    config = dict(vocab_size=256, block_size=32, n_layers=2, n_heads=4, n_kv_heads=2, dim=64, n_experts=8,
                  experts_per_token=2, mlp_hidden=96)
    torch.manual_seed(0)
    model = LLM(ModelConfig(**config)).to(torch.bfloat16).train()
    compiled = torch.compile(model, fullgraph=True)
    for B, T in ((4, 32), (2, 8), (3, 16)):
        idx, targets = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
        loss = compiled(idx, targets)[1]
        eager = model(idx, targets)[1]
        assert rel_err(loss.float(), eager.float()) < 1e-2
    loss.backward()
    assert model.blocks[0].mlp.gate_up.grad is not None and model.blocks[0].mlp.gate_up.grad.abs().sum() > 0


def test_an_fp32_model_compiles_around_its_sorted_experts():
    # fp32's sorted path breaks the graph at each layer (its host read); traced past that break,
    # dynamo had gone on into the experts' raw kernel launches: a graph break and a recompile at each
    # (5 training steps: 25 break messages, 21 recompiles) and torch's "wrap it into a custom
    # operator" UserWarning, which reads as pyllm's ops not being compile-ready. Run eager instead.
    import warnings

    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=64, block_size=16, n_layers=1, n_heads=2, dim=32, n_experts=4,
                            experts_per_token=2)).train()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = torch.compile(model)(idx, targets)[1]
        loss.backward()
    assert not [w for w in caught if "Dynamo does not know how to trace" in str(w.message)]
    compiled_grad = model.blocks[0].mlp.gate_up.grad.clone()
    model.zero_grad()
    eager = model(idx, targets)[1]
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_grad, model.blocks[0].mlp.gate_up.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("top_k, norm", [(2, True), (3, False), (6, True)])
def test_one_token_without_autograd(top_k, norm):
    # Decoding one sequence on the CPU (one token, no autograd) takes its own path: the reference's value.
    moe = random_moe(6, top_k, norm)
    for _ in range(5):
        x = torch.randn(1, 48, dtype=torch.float64)
        with torch.no_grad():
            out = moe(x)
        assert rel_err(out, reference(x, *weights64(moe), top_k, norm)) < 1e-13


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_few_tokens_without_autograd(dtype):
    # Batched decoding on the CPU (a few tokens, no autograd) goes through torch's grouped GEMM: the
    # sorted path's values to rounding.
    moe = random_moe(8, 2).to(dtype)
    x = torch.randn(5, 48).to(dtype)
    with torch.no_grad():
        got = moe(x)
        _, chosen, weights = moe.route(x)
        want = moe_experts_sorted(x, chosen, weights, moe.gate_up, moe.down)
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_no_tokens_and_shapes():
    moe = random_moe()
    assert moe(torch.randn(0, 48, dtype=torch.float64)).shape == (0, 48)
    x = torch.randn(2, 3, 48, dtype=torch.float64)
    assert torch.equal(moe(x), moe(x.reshape(6, 48)).reshape(2, 3, 48))  # any leading shape


def test_router_statistics_only_in_training_with_grad():
    moe = random_moe()
    x = torch.randn(9, 48, dtype=torch.float64)
    moe.eval()
    moe(x)
    assert moe.stats is None
    moe.train()
    with torch.no_grad():
        moe(x)
    assert moe.stats is None
    moe(x)
    experts, probs = moe.stats
    ref_probs, ref_experts, _ = moe.route(x)
    assert torch.equal(experts, ref_experts) and experts.shape == (9, 2)
    assert torch.equal(probs, ref_probs) and probs.shape == (9, 6) and probs.requires_grad


def test_flops_count_the_experts_a_token_goes_through():
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, n_experts=8, experts_per_token=2)
    model = LLM(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("mlp.gate_up", "mlp.down")))
    attention = 12 * cfg.n_layers * cfg.dim * 20
    assert model.flops_per_token(20) == 6 * (model.num_params(non_embedding=True) - experts * 6 // 8) + attention
    dense = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, mlp_hidden=2 * cfg.mlp_hidden))
    router = 2 * 64 * 8
    assert model.flops_per_token(20) == dense.flops_per_token(20) + 6 * router  # 2 of 8 experts = twice as wide an MLP
    model.add_lora(2, 4.0)  # frozen experts: 4 FLOPs per active weight
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = model.num_params(non_embedding=True, frozen=True) - experts * 6 // 8
    assert model.flops_per_token(20) == 4 * frozen + 6 * lora + attention
    model = LLM(cfg)
    model.add_lora(2, 4.0, targets="experts")  # each expert's updates: a token goes through k of E of them
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = model.num_params(non_embedding=True, frozen=True) - experts * 6 // 8
    assert model.flops_per_token(20) == 4 * frozen + 6 * (lora - lora * 6 // 8) + attention


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_experts=0), "n_experts must be None or a positive integer"),
    (dict(n_experts=4, experts_per_token=5), r"experts_per_token must be an integer in \[1, n_experts = 4\]"),
    (dict(n_experts=4, mlp="gelu"), "the experts are SwiGLU MLPs without biases"),
    (dict(n_experts=4, bias=True), "the experts are SwiGLU MLPs without biases"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be a number >= 0"),
    (dict(shared_expert_hidden=64), "shared_expert_hidden must be None or a positive integer, with n_experts"),
    (dict(logits_scaling=0.0), "logits_scaling must be None or a positive number"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_lora_adapts_attention_not_experts_unless_asked():
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, n_experts=4))
    with pytest.raises(ValueError, match="experts take no LoRA update of a linear layer"):
        model.add_lora(2, 4.0, targets="q,gate")
    with pytest.raises(ValueError, match="LoRA dropout does not go with expert updates"):
        model.add_lora(2, 4.0, targets="experts", dropout=0.1)
    with pytest.raises(ValueError, match="the model has no experts"):
        LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64)).add_lora(2, 4.0, targets="experts")
    with pytest.raises(ValueError, match="LoRA targets must be among"):
        model.add_lora(2, 4.0, targets="experts.up_proj")
    model.add_lora(2, 4.0, targets="all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".attn." in n for n in trainable)
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, n_experts=4))
    model.add_lora(2, 4.0, targets="o,experts.down_proj", frozen_dtype=torch.bfloat16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.proj.lora_a", "attn.proj.lora_b",
                                                                     "mlp.down_lora_a", "mlp.down_lora_b")}
    assert model.blocks[0].mlp.gate_up.dtype == model.blocks[0].mlp.down.dtype == torch.bfloat16  # frozen, 16-bit
    idx = torch.randint(0, 97, (2, 9))
    assert model(idx)[0].dtype == torch.float32  # fp32 outside autocast: the 16-bit experts follow x


def lora_reference(x, ws, factors, scale, chosen, top=None):
    """routed_reference with LoRA updates of the experts, each projection x W_e^T + scale (x A_e^T) B_e^T;
    top: the chosen experts' weights given (else from the router's probabilities)."""
    router, gate_up, down = ws
    gate_up_a, gate_up_b, down_a, down_b = factors
    if top is None:
        top = (x @ router.T).softmax(-1).gather(1, chosen)
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        h = x @ gate_up[e].T
        if gate_up_a is not None:
            h = h + ((x @ gate_up_a[e].T) @ gate_up_b[e].T) * scale
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        y = act @ down[e].T
        if down_a is not None:
            y = y + ((act @ down_a[e].T) @ down_b[e].T) * scale
        out = out + (top * (chosen == e)).sum(-1, keepdim=True) * y
    return out


def random_lora_moe(projections, n_experts=6, top_k=2, dtype=torch.float64, device="cpu"):
    moe = random_moe(n_experts, top_k, device=device)
    moe.add_lora(3, 6.0, projections)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)
    return moe.to(dtype)


def lora_inputs(moe):
    """The weights a LoRA layer trains (and its router's), and its factors in moe_experts_lora's order."""
    factors = tuple(getattr(moe, f"{name}_lora_{ab}", None) for name in ("gate_up", "down") for ab in "ab")
    return [moe.router.weight] + [f for f in factors if f is not None], factors


@pytest.mark.parametrize("projections", [("gate_up", "down"), ("gate_up",), ("down",)])
@pytest.mark.parametrize("n_experts, top_k", [(6, 2), (4, 1), (3, 3)])
def test_expert_lora_float64(projections, n_experts, top_k):
    # Each expert's own LoRA updates (MoEMLP.add_lora): the layer's output and the gradients of x,
    # the router and every update's A and B are the reference's in float64 (the low-rank products
    # as their own matmuls); the frozen experts take none; idle experts' updates get zeros.
    moe = random_lora_moe(projections, n_experts, top_k)
    assert not moe.gate_up.requires_grad and not moe.down.requires_grad
    for n in (5, 37):
        x = torch.randn(n, 48, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(n, 48, dtype=torch.float64)
        trained, factors = lora_inputs(moe)
        out = moe(x)
        grads = torch.autograd.grad(out, [x, *trained], dy)
        chosen = moe.route(x.detach())[1]
        xr = x.detach().clone().requires_grad_()
        ws = [moe.router.weight.detach().requires_grad_(), moe.gate_up, moe.down]
        rf = tuple(None if f is None else f.detach().requires_grad_() for f in factors)
        ref = lora_reference(xr, ws, rf, moe.lora_scale, chosen)
        want = torch.autograd.grad(ref, [xr, ws[0], *[f for f in rf if f is not None]], dy)
        assert rel_err(out, ref) < 1e-13
        for got, exp in zip(grads, want):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    idle = torch.ones(n_experts, dtype=torch.bool)
    idle[moe.route(x.detach()[:2])[1].flatten()] = False
    if idle.any():
        a = trained[1]
        g, = torch.autograd.grad(moe(x.detach()[:2]), a, dy[:2])
        assert not g[idle].any() and g[~idle].abs().sum(dim=(1, 2)).all()


@pytest.mark.parametrize("grouped", [False, pytest.param(True, marks=pytest.mark.skipif(
    not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm"))], ids=["sorted", "grouped"])
def test_expert_lora_in_bf16(grouped):
    # bf16 (the model's dtype, or autocast's): the sorted per-expert matmuls (the CPU's path) and
    # torch's grouped GEMM (CUDA's path, run here through torch's CPU grouped GEMM; rank 8) within
    # twice torch's error of float64, the experts and their weights chosen in bf16.
    torch.manual_seed(1)
    moe = random_moe(8, 2)
    moe.add_lora(8, 16.0)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(300, 48).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(300, 48).to(torch.bfloat16)
    _, chosen, weights = moe.route(x)
    trained, factors = lora_inputs(moe)
    weights = weights.detach()  # (the reference takes them as given)
    out = moe_experts_lora(x, chosen, weights, moe.gate_up, moe.down, factors, moe.lora_scale, grouped=grouped)
    got = torch.autograd.grad(out, [x, *trained[1:]], dy)

    def run(dtype):
        xr = x.detach().to(dtype).requires_grad_()
        rf = tuple(f.detach().to(dtype).requires_grad_() for f in factors)
        ws = [w.detach().to(dtype) for w in (moe.router.weight, moe.gate_up, moe.down)]
        y = lora_reference(xr, ws, rf, moe.lora_scale, chosen, weights.to(dtype))
        return y, torch.autograd.grad(y, [xr, *rf], dy.to(dtype))

    theirs, their_grads = run(torch.bfloat16)
    ref, ref_grads = run(torch.float64)
    assert rel_err(out, ref) <= tolerance(theirs, ref)
    for g, t, r in zip(got, their_grads, ref_grads):
        assert rel_err(g, r) <= tolerance(t, r)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    # Recomputing each block in the backward (non-reentrant checkpoints): the load-balancing term's
    # router statistics, made inside the checkpointed blocks, still carry their gradients.
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, n_experts=4,
                            router_aux_loss_coef=0.5)).double()
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        loss = model(idx, idx)[1]
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        assert rel_err(b, a) < 1e-12


def test_moe_layer_refuses_a_top_k_it_cannot_take():
    for n_experts, top_k in ((4, 0), (4, 5), (0, 1), (4, 1.5)):
        with pytest.raises(ValueError, match=r"top_k an int in \[1, n_experts\]"):
            MoEMLP(16, 32, n_experts, top_k)


def test_a_dropped_loss_frees_its_graph_before_the_next_forward():
    # LLM.aux_loss carries the router loss's graph (through every block's activations): a loss dropped
    # without backward (a skipped step) must not hold it while the next forward runs.
    import weakref

    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=64, block_size=16, n_layers=2, n_heads=2, dim=32, n_experts=4)).train()
    idx = torch.randint(0, 64, (2, 16))
    loss = model(idx, idx)[1]
    held = weakref.ref(model.aux_loss)
    del loss
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(held() is None))
    model(idx, idx)
    assert seen == [True] and model.aux_loss is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_moe_blocks_recompute_their_forward(precision):
    # A MoE's blocks compiled alone (wrap_model under FSDP2 with --compile) with activation
    # checkpointing and the balancing loss: the recompute had run another graph (the block guards on
    # collect_stats, turned off once the loss is made), saving other tensors: CheckpointError under
    # bf16 autocast (the FSDP-compile audit, 2026-12-06). The gradients are the uncompiled model's.
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=2, dim=64, n_experts=4,
                            experts_per_token=2, router_aux_loss_coef=0.01))
    model.activation_checkpointing = True
    compiled = copy.deepcopy(model)
    for block in compiled.blocks:
        block.compile()
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for m in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = m(idx, idx)[1] + m.aux_loss
        loss.backward()
        assert all(b.mlp.stats is None for b in m.blocks)
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for k in grads[0]:  # (bf16: the compiled experts' grouped GEMM rounds otherwise than eager's sorted matmuls)
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0.05 if precision == "bf16" else 1e-4,
                                   atol=0.05 * float(grads[0][k].abs().max()) if precision == "bf16" else 1e-6)
