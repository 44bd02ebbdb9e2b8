"""pyllm.model against a plain-torch reference written out below, with the same weights."""
from __future__ import annotations

import json
import warnings
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyllm.model import LLM, PRESETS, ModelConfig, sample, until_stop

from helpers import CPU_AND_CUDA, rel_err, shaped_logits, tolerance


# --- the reference: the same architectures, written plainly from a state dict ---------------------

def ref_norm(cfg, x, sd, prefix):
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".weight"]
    return F.layer_norm(x, (cfg.dim,), sd[prefix + ".weight"], sd.get(prefix + ".bias"), cfg.norm_eps)


def ref_linear(x, sd, prefix):
    y = x @ sd[prefix + ".weight"].T
    return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y


def ref_rope(x, pos, theta, factor=1.0):  # x (B, T, H, D), rotating pairs (i, i + D/2); positions / factor
    D = x.shape[-1]
    freqs = torch.tensor([theta ** (-2 * i / D) / factor for i in range(D // 2)], dtype=torch.float64)
    ang = pos[:, None].double() * freqs[None]  # (T, D/2)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).to(x.dtype)


def ref_alibi_slopes(n_heads):
    """transformers' BLOOM build_alibi_tensor's slopes, written out in its own terms (in fp64: BLOOM's
    fp32 powers can differ from the correctly rounded slopes by an ulp)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != n_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** i for i in range(1, 1 + 2 * min(closest, n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float64)


def ref_attention(cfg, x, sd, prefix, layer):
    B, T, C = x.shape
    H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = ref_linear(x, sd, prefix + ".qkv")
    q = qkv[..., : H * D].reshape(B, T, H, D)
    k = qkv[..., H * D: (H + Hk) * D].reshape(B, T, Hk, D)
    v = qkv[..., (H + Hk) * D:].reshape(B, T, Hk, D)
    if cfg.qk_norm:  # over each head's D, or over all heads at once
        width = (lambda t: t.reshape(B, T, -1)) if cfg.qk_norm_all_heads else (lambda t: t)  # noqa: E731
        qn, kn = width(q), width(k)
        q = (qn / torch.sqrt((qn * qn).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".q_norm.weight"]).reshape(q.shape)
        k = (kn / torch.sqrt((kn * kn).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".k_norm.weight"]).reshape(k.shape)
    windowed = cfg.sliding_window is not None and layer in (cfg.window_layers or range(cfg.n_layers))
    if cfg.positions == "rope" and layer not in (cfg.nope_layers or ()):
        pos = torch.arange(T)
        theta, factor = cfg.rope_theta, (cfg.rope_scaling or {}).get("factor", 1.0)
        if windowed and cfg.local_rope_theta is not None:  # the windowed layers' own theta, unscaled
            theta, factor = cfg.local_rope_theta, 1.0
        q, k = ref_rope(q, pos, theta, factor), ref_rope(k, pos, theta, factor)
    k = k.repeat_interleave(H // Hk, dim=2)  # query head h reads kv head h // (H / Hk)
    v = v.repeat_interleave(H // Hk, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * (cfg.softmax_scale or 1 / math.sqrt(D))
    if cfg.attn_softcap:  # Gemma 2
        scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if cfg.positions == "alibi":  # BLOOM's, MPT's: -slope_h * (i - j) on every score
        scores = scores - ref_alibi_slopes(H)[:, None, None] * (i - j).abs()
    unseen = j > i  # causal
    if windowed:
        unseen |= j <= i - cfg.sliding_window  # the query and the sliding_window - 1 keys before it
    scores = scores.masked_fill(unseen, float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * D)
    return ref_linear(y, sd, prefix + ".proj")


def ref_mlp(cfg, x, sd, prefix, router_probs=None):
    if cfg.n_experts:  # every expert on every token, each weighted by its router weight (0 unless chosen)
        probs = ref_linear(x, sd, prefix + ".router").softmax(-1)  # (B, T, E)
        if router_probs is not None:
            router_probs.append(probs.reshape(-1, cfg.n_experts))
        top, chosen = probs.topk(cfg.experts_per_token, dim=-1)
        if cfg.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(cfg.n_experts):
            gate, up = (x @ sd[prefix + ".gate_up"][e].T).chunk(2, dim=-1)
            out += (top * (chosen == e)).sum(-1, keepdim=True) * ((F.silu(gate) * up) @ sd[prefix + ".down"][e].T)
        if cfg.shared_expert_hidden:  # Qwen2-MoE's shared expert, gated
            gate, up = ref_linear(x, sd, prefix + ".shared.gate_up").chunk(2, dim=-1)
            out = out + torch.sigmoid(ref_linear(x, sd, prefix + ".shared_gate")) * ref_linear(
                F.silu(gate) * up, sd, prefix + ".shared.down")
        return out
    if cfg.mlp in ("swiglu", "geglu"):
        gate, up = ref_linear(x, sd, prefix + ".gate_up").chunk(2, dim=-1)
        act = F.silu(gate) if cfg.mlp == "swiglu" else F.gelu(gate, approximate="tanh")
        return ref_linear(act * up, sd, prefix + ".down")
    return ref_linear(F.gelu(ref_linear(x, sd, prefix + ".up"), approximate="tanh"), sd, prefix + ".down")


def ref_router_aux_loss(cfg, router_probs, mask=None):
    """transformers' load_balancing_loss_func over all layers' tokens: E * sum_e f_e * P_e (the
    means over mask's True tokens alone where given: its attention_mask)."""
    probs = torch.cat(router_probs)  # (L * N, E)
    picks = F.one_hot(probs.topk(cfg.experts_per_token, dim=-1).indices, cfg.n_experts).sum(1)  # (L * N, E)
    if mask is not None:
        keep = mask.reshape(-1).repeat(len(router_probs))
        probs, picks = probs[keep], picks[keep]
    return cfg.n_experts * (picks.double().mean(0) * probs.mean(0)).sum()


def ref_forward(cfg, sd, idx, router_probs=None):
    x = sd["tok_emb.weight"][idx] * (math.sqrt(cfg.dim) if cfg.embed_scale else 1.0) * (cfg.embed_multiplier or 1.0)
    if cfg.positions == "learned":
        x = x + sd["pos_emb.weight"][: idx.shape[1]]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        out_norm = lambda y, name: (ref_norm(cfg, y, sd, p + name) if cfg.sandwich_norm else y) * (  # noqa: E731
            cfg.residual_multiplier or 1.0)
        in_norm = lambda y, name: ref_norm(cfg, y, sd, p + name) if cfg.pre_norm else y  # noqa: E731
        h = in_norm(x, ".norm1")
        if cfg.parallel_block:
            x = x + (ref_attention(cfg, h, sd, p + ".attn", i) + ref_mlp(cfg, h, sd, p + ".mlp")) * (
                cfg.residual_multiplier or 1.0)
        else:
            x = x + out_norm(ref_attention(cfg, h, sd, p + ".attn", i), ".attn_out_norm")
            x = x + out_norm(ref_mlp(cfg, in_norm(x, ".norm2"), sd, p + ".mlp", router_probs), ".mlp_out_norm")
    x = ref_norm(cfg, x, sd, "norm_f")
    logits = x @ (sd["tok_emb.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]).T / (cfg.logits_scaling or 1.0)
    return logits if cfg.final_softcap is None else cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)


SMALL = dict(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=128)  # head dim 32, as flash_attn needs
CONFIGS = {
    "llama": dict(SMALL),
    "gqa-untied": dict(SMALL, n_kv_heads=2, tie_embeddings=False),
    "gpt2": dict(SMALL, norm="layernorm", mlp="gelu", positions="learned", bias=True),
    "palm-mqa": dict(SMALL, n_kv_heads=1, norm="layernorm", parallel_block=True),
    "rope-bias-gelu": dict(SMALL, mlp="gelu", bias=True, n_kv_heads=2),
    # Mistral's: a 3-key sliding window in every layer
    "window": dict(SMALL, n_kv_heads=2, sliding_window=3),
    # Qwen3's and SmolLM3's pieces: 4 heads x 64 (256 wide in a 128-wide model), q / k norms, a 5-key
    # window in layer 1 only, no RoPE in layer 0
    "qk-norm-window-nope": dict(SMALL, n_kv_heads=2, head_dim=64, qk_norm=True, sliding_window=5, window_layers=[1],
                                nope_layers=[0]),
    # Gemma 3's pieces: scaled embeddings, sandwich norms, GeGLU, MQA, softmax scale 0.1, a 4-key window in
    # layer 0 with its own RoPE theta, linearly scaled RoPE in layer 1
    "gemma-style": dict(SMALL, n_kv_heads=1, mlp="geglu", embed_scale=True, sandwich_norm=True, qk_norm=True,
                        softmax_scale=0.1, sliding_window=4, window_layers=[0], local_rope_theta=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 3.0}),
    # OLMo 2's: norms after the sublayers only, q / k norms across all heads
    "olmo-style": dict(SMALL, n_kv_heads=2, pre_norm=False, sandwich_norm=True, qk_norm=True, qk_norm_all_heads=True),
    # Gemma 2's: capped attention scores and logits (caps that bind on these weights), sandwich norms,
    # GeGLU, a 4-key window in layer 0
    "softcap": dict(SMALL, n_kv_heads=2, mlp="geglu", embed_scale=True, sandwich_norm=True, softmax_scale=0.1,
                    sliding_window=4, window_layers=[0], attn_softcap=1.5, final_softcap=2.5),
    # Mixtral's: 5 experts, 2 per token
    "moe": dict(SMALL, n_kv_heads=2, n_experts=5, experts_per_token=2),
    # BLOOM's: ALiBi instead of positions (6 heads: BLOOM's slopes for a count not a power of 2), with GQA
    "alibi": dict(SMALL, n_heads=6, n_kv_heads=2, head_dim=32, positions="alibi", norm="layernorm", mlp="gelu",
                  bias=True),
    # ALiBi at head dim 16, which pyllm's kernels take zero-padded to 32 on the CPU (torch's ops on the
    # whole scores elsewhere; before 2026-12-03 on the CPU too); a 5-key window
    "alibi-sdpa": dict(SMALL, n_heads=8, n_kv_heads=4, head_dim=16, positions="alibi", sliding_window=5),
    # Phi-2's head dim 80: the kernels zero-padded to 96 on the CPU (the decode step too, in 16 bits)
    "head-dim-80": dict(SMALL, n_heads=2, n_kv_heads=1, head_dim=80),
    # OLMoE's: 3 of 4 experts, the chosen weights not renormalized
    "moe-unnormalized": dict(SMALL, n_kv_heads=2, n_experts=4, experts_per_token=3, norm_topk_prob=False),
    # IBM Granite's scalars (embeddings x 3, sublayer outputs x 0.3, logits / 2.5, softmax scale 0.05), as a MoE
    "granite-moe": dict(SMALL, n_kv_heads=2, embed_multiplier=3.0, residual_multiplier=0.3, logits_scaling=2.5,
                        softmax_scale=0.05, n_experts=4, experts_per_token=2),
    # Qwen2-MoE's: a gated shared expert beside 4 routed ones, q / k / v biases
    "moe-shared": dict(SMALL, n_kv_heads=2, n_experts=4, experts_per_token=2, norm_topk_prob=False,
                       shared_expert_hidden=96, qkv_bias=True),
}


def randomized(cfg: ModelConfig) -> LLM:
    """A float64 model whose every weight (norms and biases too) is random, so no term can hide."""
    model = LLM(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference(name):
    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    idx = torch.randint(0, cfg.vocab_size, (2, 17))
    targets = torch.randint(0, cfg.vocab_size, (2, 17))
    logits, loss = model(idx, targets)
    router_probs = []
    ref = ref_forward(cfg, sd, idx, router_probs)
    assert logits.shape == (2, 17, cfg.vocab_size)
    assert rel_err(logits, ref) < 1e-12
    ref_loss = F.cross_entropy(ref.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    if cfg.n_experts:  # training adds the weighted load-balancing loss; its gradient reaches the routers
        ref_aux = ref_router_aux_loss(cfg, router_probs)
        assert abs(model.aux_loss.item() - cfg.router_aux_loss_coef * ref_aux.item()) < 1e-12
        ref_loss = ref_loss + cfg.router_aux_loss_coef * ref_aux
        router, live = model.blocks[0].mlp.router.weight, []  # the reference on the parameters themselves
        ref_forward(cfg, model.state_dict(keep_vars=True), idx, live)
        aux_grad, = torch.autograd.grad(model.aux_loss, router, retain_graph=True)
        ref_grad, = torch.autograd.grad(cfg.router_aux_loss_coef * ref_router_aux_loss(cfg, live), router)
        assert rel_err(aux_grad, ref_grad) < 1e-10
        with torch.no_grad():  # none in eval
            assert abs(model.eval()(idx, targets)[1].item() - (loss - cfg.router_aux_loss_coef * ref_aux).item()) < 1e-10
            assert model.aux_loss is None
    assert abs(loss.item() - ref_loss.item()) < 1e-10


def test_router_aux_loss_leaves_masked_tokens_out_as_transformers():
    """token_mask (a packed row's padding False) is transformers' attention_mask in
    load_balancing_loss_func: the loss over the True tokens alone, its gradient too."""
    load_balancing_loss_func = pytest.importorskip("transformers.models.mixtral.modeling_mixtral").load_balancing_loss_func
    cfg = ModelConfig(**CONFIGS["moe"])
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 13))
    mask = torch.rand(3, 13) < 0.6
    mask[2] = False  # a row of padding alone
    mask[0, 0] = True
    router_logits = []
    hooks = [b.mlp.router.register_forward_hook(lambda m, i, o: router_logits.append(o)) for b in model.blocks]
    model(idx, idx, token_mask=mask)
    for h in hooks:
        h.remove()
    ref = ref_router_aux_loss(cfg, [logits.softmax(-1) for logits in router_logits], mask)
    assert abs(model.aux_loss.item() - cfg.router_aux_loss_coef * ref.item()) < 1e-12
    # transformers' own (its picks' means in fp32)
    theirs = load_balancing_loss_func(tuple(router_logits), cfg.n_experts, cfg.experts_per_token, mask.long())
    assert abs(theirs.item() - ref.item()) < 1e-6 * ref.item()
    unmasked = load_balancing_loss_func(tuple(router_logits), cfg.n_experts, cfg.experts_per_token)
    assert abs(unmasked.item() - ref.item()) > 1e-3  # the mask mattered
    router = model.blocks[1].mlp.router.weight
    grad, = torch.autograd.grad(model.aux_loss, router, retain_graph=True)
    ref_grad, = torch.autograd.grad(cfg.router_aux_loss_coef * ref, router)
    assert rel_err(grad, ref_grad) < 1e-10
    # no True token: 0, not NaN; a mask of the wrong shape, dtype or kind is refused
    model(idx, idx, token_mask=torch.zeros_like(mask))
    assert model.aux_loss.item() == 0
    for bad in (mask[:, :-1], mask.long(), mask.tolist(), mask.reshape(-1)):
        with pytest.raises(ValueError, match="token_mask must be a bool tensor"):
            model(idx, idx, token_mask=bad)


def test_moe_model_runs_on_meta_for_its_shapes():
    cfg = ModelConfig(**CONFIGS["moe"])
    with torch.device("meta"):
        model = LLM(cfg)
        idx = torch.zeros(2, 9, dtype=torch.long)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 9, cfg.vocab_size) and loss.shape == () and model.aux_loss.shape == ()


def test_alibi_slopes_are_blooms():
    from pyllm.nn import alibi_slopes

    for n in range(1, 41):
        assert torch.allclose(alibi_slopes(n).double(), ref_alibi_slopes(n), rtol=1e-7, atol=0), n
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]  # the paper's 8 heads
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


def test_alibi_model_keeps_its_slopes_in_fp32_and_out_of_checkpoints():
    # The slopes are a buffer (they follow .to(device)) that is not saved, and stay fp32 whatever the
    # model's dtype (12 heads: slopes 2^(-i/2) that bf16 would round).
    cfg = ModelConfig(**dict(CONFIGS["alibi"], n_heads=12, n_kv_heads=4, head_dim=32))
    model = LLM(cfg)
    assert not any("alibi" in name for name in model.state_dict()) and model.pos_emb is None
    for dtype in (torch.bfloat16, torch.float64, torch.float32):
        model = model.to(dtype)
        slopes = model.blocks[1].attn.alibi
        assert slopes.dtype == torch.float32 and torch.equal(slopes, ref_alibi_slopes(12).float())
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.isfinite(model.to(torch.bfloat16)(idx)[0]).all()
    with torch.device("meta"):  # meta initialisation, then to_empty: the slopes are made, not left empty
        meta = LLM(cfg)
    assert torch.equal(meta.to_empty(device="cpu").blocks[0].attn.alibi, ref_alibi_slopes(12).float())
    with torch.inference_mode():  # a .to() that changes nothing leaves them (and the model trainable)
        model = model.to("cpu")
    model(idx, idx)[1].backward()
    with pytest.raises(ValueError, match="positions must be one of rope, learned, alibi"):
        ModelConfig(**dict(CONFIGS["alibi"], positions="sinusoidal"))


@pytest.mark.parametrize("name", ["llama", "gpt2", "palm-mqa", "window", "qk-norm-window-nope", "gemma-style",
                                  "olmo-style", "softcap", "moe", "moe-shared", "granite-moe", "alibi", "alibi-sdpa"])
def test_cached_forward_matches_full(name):
    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(idx)[0]
    cache = model.new_kv_cache(2)
    # prefill 7 tokens, then 5 at once (masked multi-token append), then single tokens
    got = [model.forward_cached(idx[:, :7], cache, 0), model.forward_cached(idx[:, 7:12], cache, 7)]
    got += [model.forward_cached(idx[:, t:t + 1], cache, t) for t in range(12, 20)]
    want = [full[:, 6], full[:, 11]] + [full[:, t] for t in range(12, 20)]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["llama", "gpt2", "palm-mqa", "window", "gemma-style", "olmo-style", "softcap", "moe",
                                  "alibi", "alibi-sdpa"])
def test_decode_step_at_device_positions_matches_forward_cached(name, dtype):
    # decode_step (positions in an int32 tensor, never read on the host: what a CUDA graph replays)
    # computes forward_cached's logits bitwise, on pyllm's kernels (fp32, bf16) and on SDPA (fp64),
    # also with rows at different lengths (each row as if alone).
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg).to(dtype).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        caches = [model.new_kv_cache(2, 16) for _ in range(2)]
        for cache in caches:
            model.forward_cached(idx[:, :9], cache, 0)
        want = model.forward_cached(idx[:, 9:10], caches[0], 9)
        got = model.decode_step(idx[:, 9:10], caches[1], torch.full((2,), 9, dtype=torch.int32))
        assert torch.equal(got, want)
        for layer_a, layer_b in zip(*caches):  # (k, v) per layer: the same token written
            for a, b in zip(layer_a, layer_b):
                assert torch.equal(a[:, :10], b[:, :10])
        # ragged: row 0 holds 5 tokens, row 1 holds 9; each row's logits as its own forward_cached's
        ragged = model.new_kv_cache(2, 16)
        model.forward_cached(idx[:, :9], ragged, 0)
        got = model.decode_step(idx[:, 9:10], ragged, torch.tensor([5, 9], dtype=torch.int32))
        for row, n in enumerate((5, 9)):
            alone = model.new_kv_cache(1, 16)
            model.forward_cached(idx[row:row + 1, :n], alone, 0)
            assert rel_err(got[row], model.forward_cached(idx[row:row + 1, 9:10], alone, n)[0]) < (
                1e-12 if dtype == torch.float64 else 1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["softcap", "alibi"])
def test_capped_and_alibi_attention_on_the_cuda_kernels(name, monkeypatch):
    # Gemma 2's capped scores and BLOOM's ALiBi take the CUDA kernels with PYLLM_ATTN_SCORE_MODS_CUDA=1
    # (torch's ops on the whole scores without it, until the kernels are verified on a GPU): loss and
    # gradients within twice the torch-ops path's own bf16 error (the float64 CPU model the reference)
    torch.manual_seed(0)
    model = LLM(ModelConfig(**CONFIGS[name])).double()
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    loss = model(idx, idx)[1]
    exact = [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))
    cuda_model = LLM(ModelConfig(**CONFIGS[name])).to("cuda", torch.bfloat16)
    cuda_model.load_state_dict(model.state_dict())

    def run():
        loss = cuda_model(idx.cuda(), idx.cuda())[1]
        return [loss.detach()] + list(torch.autograd.grad(loss, list(cuda_model.parameters())))

    monkeypatch.delenv("PYLLM_ATTN_SCORE_MODS_CUDA", raising=False)  # (bench/gpu_check.sh sets it)
    torch_ops = run()
    monkeypatch.setenv("PYLLM_ATTN_SCORE_MODS_CUDA", "1")
    kernels = run()
    for got, theirs, want in zip(kernels, torch_ops, exact):
        assert rel_err(got.cpu(), want) <= tolerance(theirs.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama", "gpt2", "window", "moe", "softcap", "alibi"])
def test_generate_with_a_cuda_graph_gives_the_same_tokens(name):
    # (softcap, alibi: on the CUDA kernels where PYLLM_ATTN_SCORE_MODS_CUDA=1, as gpu_check sets; the
    # slopes' finiteness is read before the capture, which cannot read them)
    # cuda_graph replays decode_step captured once: the same greedy tokens as the eager steps, also
    # past block_size (the restart from the recent half runs eagerly, then the graph goes on), and
    # the same sampled ones from one generator seed.
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[name])
    model = LLM(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 5), device="cuda")
    for n in (20, cfg.block_size + 10):
        eager = model.generate(prompt, n, temperature=0)
        assert torch.equal(model.generate(prompt, n, temperature=0, cuda_graph=True), eager)
    sampled = [model.generate(prompt, 20, temperature=1.0, top_k=10, cuda_graph=graph,
                              generator=torch.Generator("cuda").manual_seed(3)) for graph in (False, True)]
    assert torch.equal(*sampled)
    prompts = [prompt[0, :n] for n in (2, 5, 4)]  # ragged rows: the graph takes each row's length
    assert (model.generate_batch(prompts, 10, temperature=0, cuda_graph=True)
            == model.generate_batch(prompts, 10, temperature=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["llama", "gpt2", "window", "gemma-style", "softcap", "moe", "alibi", "alibi-sdpa"])
def test_generate_batch_of_ragged_prompts_matches_each_alone(name, dtype):
    # Prompts of 3, 7 and 5 tokens in one batch, no padding: greedy, each row continues as generate()
    # continues that prompt alone; stop tokens cut each row after its own first one.
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg).to(dtype)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)) for n in (3, 7, 5)]
    alone = [model.generate(p[None], 8, temperature=0)[0, len(p):].tolist() for p in prompts]
    assert model.generate_batch([p.tolist() for p in prompts], 8, temperature=0) == alone
    stop = alone[1][2]
    cut = model.generate_batch(prompts, 8, temperature=0, stop_tokens=[stop])
    assert cut == [row[:row.index(stop) + 1] if stop in row else row for row in alone]
    sampled = [model.generate_batch(prompts, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
               for _ in range(2)]
    assert sampled[0] == sampled[1] and all(len(row) == 6 for row in sampled[0])


@pytest.mark.parametrize("name", ["llama", "window", "softcap", "moe"])
@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_speculative_greedy_is_the_models_own(name, draft_tokens):
    # Greedy speculative decoding gives this model's own greedy tokens (fp64) whatever the draft
    # proposes: a different random model (most proposals rejected) or the model itself (every one
    # kept); stop tokens end it after the first; the counts add up.
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CONFIGS[name], "block_size": 48})
    model, other = randomized(cfg).double(), randomized(ModelConfig(**{**CONFIGS["llama"], "block_size": 48})).double()
    prompt = torch.randint(0, cfg.vocab_size, (1, 6))
    want = model.generate(prompt, 20, temperature=0)[0, 6:].tolist()
    for draft, all_kept in ((other, False), (model, True)):
        stats = {}
        got = [int(t) for t in model.generate_speculative(prompt, draft, 20, temperature=0, draft_tokens=draft_tokens,
                                                          stats=stats)]
        assert got == want
        assert stats["rounds"] >= 20 / (draft_tokens + 1) and (stats["accepted"] == stats["drafted"]) == all_kept
        assert stats["accepted"] + stats["rounds"] >= 20  # (each round settles its kept tokens and one more)
    stop = want[7]
    cut = [int(t) for t in model.generate_speculative(prompt, other, 20, temperature=0, draft_tokens=draft_tokens,
                                                      stop_tokens=[stop])]
    assert cut == want[:want.index(stop) + 1]


@pytest.mark.parametrize("penalized", [False, True])
def test_speculative_sampling_draws_from_the_models_distribution(penalized):
    # Sampling (temperature 0.8, top_k 5; then a repetition penalty and min_p too): the first two
    # tokens' joint distribution over many draws is the model's own, p(a) p(b | a) (computed exactly,
    # b's penalty counting a), though a different model drafts; a plain sampler's draws, alike, give
    # the scale of the sampling noise.
    from pyllm.model import _penalize

    torch.manual_seed(0)
    cfg = ModelConfig(**{**CONFIGS["llama"], "vocab_size": 6, "block_size": 16})
    model, draft = randomized(cfg).double(), randomized(cfg).double()
    prompt = torch.tensor([[1, 4, 2]])
    settings = dict(temperature=0.8, top_k=5, **(dict(repetition_penalty=1.5, min_p=0.1) if penalized else {}))

    def probs(ids):  # the distribution of the token after ids (1, T)
        from pyllm.model import sampling_probs

        seen = torch.zeros(1, 6, dtype=torch.bool).scatter_(1, ids, True) if penalized else None
        logits = _penalize(model(ids)[0][:, -1], seen, settings.get("repetition_penalty", 1.0))
        return sampling_probs(logits, 0.8, top_k=5, min_p=settings.get("min_p"))[0].double()

    with torch.no_grad():
        first = probs(prompt)
        joint = torch.stack([first[a] * probs(torch.cat([prompt, torch.tensor([[a]])], 1)) for a in range(6)])  # (6, 6)
    g = torch.Generator().manual_seed(3)
    n = 1500
    counts, plain = torch.zeros(6, 6), torch.zeros(6, 6)
    accepted = drafted = 0
    for _ in range(n):
        stats = {}
        a, b = (int(t) for t in model.generate_speculative(prompt, draft, 2, draft_tokens=2, generator=g, stats=stats,
                                                           **settings))
        counts[a, b] += 1
        accepted, drafted = accepted + stats["accepted"], drafted + stats["drafted"]
        a, b = model.generate(prompt, 2, generator=g, **settings)[0, 3:].tolist()
        plain[a, b] += 1
    tv = 0.5 * (counts / n - joint).abs().sum().item()
    noise = 0.5 * (plain / n - joint).abs().sum().item()
    assert tv < max(2.5 * noise, 0.04), (tv, noise)  # (0.027 vs the plain sampler's 0.040; the draft's own: 0.94)
    assert 0 < accepted < drafted  # (the draft differs: some proposals kept, some not)


@pytest.mark.cuda
def test_speculative_on_cuda():
    # On the GPU (fp32; the check of a draft runs the split-KV kernel with k + 1 queries): greedy
    # tokens = generate's (a near-tie could round apart: these random logits have none in 16), every
    # draft of the model itself kept; sampling runs on the device generator.
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CONFIGS["gqa-untied"], "block_size": 48})
    model = randomized(cfg).cuda()
    prompt = torch.randint(0, cfg.vocab_size, (1, 6), device="cuda")
    want = model.generate(prompt, 16, temperature=0)[0, 6:].tolist()
    stats = {}
    assert [int(t) for t in model.generate_speculative(prompt, model, 16, temperature=0, draft_tokens=3,
                                                       stats=stats)] == want
    assert stats["accepted"] == stats["drafted"]
    g = torch.Generator(device="cuda").manual_seed(1)
    assert len(list(model.generate_speculative(prompt, model, 16, temperature=0.8, generator=g))) == 16


def test_speculative_checks():
    model = LLM(ModelConfig(**CONFIGS["llama"]))
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="must share the tokenizer"):  # at the call, before any token is asked for
        model.generate_speculative(prompt, LLM(ModelConfig(**{**CONFIGS["llama"], "vocab_size": 50})), 4)
    with pytest.raises(ValueError, match="one sequence at a time"):
        next(model.generate_speculative(prompt.repeat(2, 1), model, 4))
    with pytest.raises(ValueError, match="more than the block_size"):
        next(model.generate_speculative(prompt, model, 29))
    assert len(list(model.generate_speculative(prompt, model, 28, temperature=0))) == 28  # (4 + 28 = block_size)
    longrope = LLM(ModelConfig(**{**CONFIGS["llama"], "block_size": 64, "rope_scaling": {
        "rope_type": "longrope", "original_max_position_embeddings": 16, "short_factor": [1.0] * 16,
        "long_factor": [2.0] * 16, "attention_factor": 1.0}}))
    assert len(list(longrope.generate_speculative(prompt, longrope, 12, temperature=0))) == 12
    with pytest.raises(NotImplementedError, match="LongRoPE"):
        next(longrope.generate_speculative(prompt, longrope, 13))


@pytest.mark.parametrize("name", ["llama", "window", "moe"])
def test_generate_batch_reads_a_repeated_prompt_once(name, monkeypatch):
    # A prompt given several times (GRPO's groups) is prefilled once, its cache rows copied to each
    # of its rows: greedy rows are still each prompt's own continuation; sampled rows differ.
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg).double()
    a, b = torch.randint(0, cfg.vocab_size, (5,)).tolist(), torch.randint(0, cfg.vocab_size, (8,)).tolist()
    prompts = [a, b, a, a, b]
    alone = {tuple(p): model.generate(torch.tensor([p]), 6, temperature=0)[0, len(p):].tolist() for p in (a, b)}
    prefill = []
    real = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda idx, *args, **kw: (prefill.append(idx.shape), real(idx, *args, **kw))[1])
    assert model.generate_batch(prompts, 6, temperature=0) == [alone[tuple(p)] for p in prompts]
    assert prefill[0] == (2, 8)  # (the two prompts, once each)
    sampled = model.generate_batch(prompts, 6, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert len({tuple(sampled[i]) for i in (0, 2, 3)}) > 1  # (prompt a's three rows: three samples)


def test_kv_cache_starts_at_zero():
    # The SDPA fallback for per-row lengths (head dims without a kernel, softcap) weighs the whole
    # cache, its unseen positions by 0: leftovers of freed memory there (torch.empty's) made NaN
    # logits now and then (generate_batch, head_dim 16). The cache is zeros, even where NaN was.
    model = LLM(ModelConfig(**CONFIGS["softcap"]))
    shape = (3, 16, model.config.n_kv_heads, model.config.head_dim)
    for _ in range(3):
        junk = [torch.full(shape, float("nan")) for _ in range(4 * model.config.n_layers)]
        del junk
        assert all(not k.any() and not v.any() for k, v in model.new_kv_cache(3, 16))


def test_score_head_scores_each_sequence_at_its_last_token(tmp_path):
    # A reward model's score head (add_score_head; ModelConfig.num_labels): the score at each packed
    # document's last token is the document's own alone (fp64), each row's last token without
    # cu_seqlens; it saves and loads with the model.
    torch.manual_seed(0)
    model = randomized(ModelConfig(**CONFIGS["llama"])).double()
    with pytest.raises(ValueError, match="no score head"):
        model(torch.zeros(1, 4, dtype=torch.long), scores=True)
    model.add_score_head(2, std=0.5)  # (the std transformers takes from initializer_range)
    assert 0.3 < model.score.weight.std().item() < 0.7
    with pytest.raises(ValueError, match="has a score head already"):
        model.add_score_head(1)
    idx = torch.randint(0, 97, (2, 16))
    cu = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    got = model(idx, None, cu, scores=True)[1]
    assert got.shape == (4, 2) and got.dtype == torch.float64
    for (a, b), row in zip([(0, 5), (5, 16), (16, 20), (20, 32)], got):
        h = model(idx.view(-1)[a:b][None], torch.zeros(1, b - a, dtype=torch.long), hidden=True)[1]  # (b - a, C), normed
        assert rel_err(row, model.score(h[-1])) < 1e-12
    rows = torch.tensor([0, 16, 32], dtype=torch.int32)  # without cu_seqlens: each row one sequence
    assert rel_err(model(idx, scores=True)[1], model(idx, None, rows, scores=True)[1]) < 1e-12
    model.save(tmp_path / "rm.safetensors")
    back = LLM.load(tmp_path / "rm.safetensors").double()  # (loaded into fp32 parameters first)
    assert back.config.num_labels == 2 and rel_err(back(idx, None, cu, scores=True)[1], got) < 1e-6


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "gpt2"])
def test_reward_model_is_transformers_sequence_classifier(name, tmp_path):
    # A reward model (a language model given a score head) written by to_hf is transformers'
    # *ForSequenceClassification of its kind: the same score at each sequence's last token (fp64);
    # from_hf reads it back with its head.
    transformers = pytest.importorskip("transformers")
    theirs = hf_models()[name]
    theirs.save_pretrained(tmp_path / "lm")
    ours = LLM.from_hf(tmp_path / "lm", dtype=torch.float64)
    ours.add_score_head(1)
    torch.nn.init.normal_(ours.score.weight, std=0.5)
    ours.to_hf(tmp_path / "rm", json.loads((tmp_path / "lm" / "config.json").read_text()))
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float64)
    assert type(classifier).__name__.endswith("ForSequenceClassification") and classifier.config.num_labels == 1
    idx = torch.randint(0, 97, (1, 13))
    with torch.no_grad():
        want = classifier.eval()(idx).logits  # (1, 1): one sequence, no padding
        assert rel_err(ours.eval()(idx, scores=True)[1], want) < 1e-6  # (its RMSNorm computes in fp32)
        back = LLM.from_hf(tmp_path / "rm", dtype=torch.float64).eval()
        assert back.config.num_labels == 1 and rel_err(back(idx, scores=True)[1], want) < 1e-6


def test_reward_model_reads_scores_before_trailing_padding_as_transformers(tmp_path):
    # TRL's reward models have pad_token_id = eos where the tokenizer has no pad token, and
    # transformers reads the score at each sequence's last token that is not pad: the token before a
    # trailing EOS. pyllm had read the EOS itself (an audit, 2026-12-06): another position than the
    # one the model was trained at, both ways (export, and a TRL reward model for GRPO).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      num_labels=1, pad_token_id=2, eos_token_id=2)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float64).eval()
    ours = LLM.from_hf(tmp_path / "rm", dtype=torch.float64).eval()
    assert ours.config.pad_token_id == 2
    g = torch.Generator().manual_seed(1)
    rows = [torch.cat([torch.randint(3, 97, (n,), generator=g), torch.tensor([2] * pads)]) for n, pads in ((9, 1), (5, 3))]
    with torch.no_grad():
        want = torch.cat([theirs(row[None]).logits for row in rows])  # (2, 1)
        packed = torch.cat([*rows, torch.tensor([2, 2])])[None]  # and a document of pad alone
        cu = torch.tensor([0, 10, 18, 20], dtype=torch.int32)
        got = ours(packed, None, cu, scores=True)[1]
        assert rel_err(got[:2], want) < 1e-6
        assert rel_err(got[2:], theirs(torch.tensor([[2, 2]])).logits) < 1e-6  # (its first token, as transformers)
        assert rel_err(ours(rows[0][None], scores=True)[1], want[:1]) < 1e-6  # (a row without cu_seqlens)
    ours.to_hf(tmp_path / "back", json.loads((tmp_path / "rm" / "config.json").read_text()))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["pad_token_id"] == 2
    with pytest.raises(ValueError, match="pad_token_id must be None or a token id"):
        ModelConfig(**{**CONFIGS["llama"], "pad_token_id": -1})


def test_generate_batch_refuses_what_it_cannot_do():
    model = LLM(ModelConfig(**CONFIGS["llama"]))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate_batch([[1, 2], []], 3)
    with pytest.raises(ValueError, match="block_size"):
        model.generate_batch([[1] * model.config.block_size], 1)


def test_generate_batch_of_a_longrope_model_is_each_alone():
    # LongRoPE (Phi-3.5, Phi-4-mini) picks its factors by position on the host: the batch had raised
    # "rope_cos_sin: ... give start" (pyllm generate --prompts-file, GRPO's samples); rows past the
    # switch to the long factors included
    rs = dict(rope_type="longrope", short_factor=[1.0] * 16, long_factor=[2.0] * 16,
              original_max_position_embeddings=8, attention_factor=1.2)
    torch.manual_seed(0)
    model = randomized(ModelConfig(**{**CONFIGS["llama"], "rope_scaling": rs})).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    got = model.generate_batch(prompts, 6, temperature=0.0, stop_tokens=[7])
    alone = [until_stop(model.generate(torch.tensor([p]), 6, temperature=0.0, stop_tokens=[7])[0, len(p):].tolist(), {7})
             for p in prompts]
    assert got == alone and any(len(p) + 6 > 8 for p in prompts)


@pytest.mark.parametrize("longrope", [False, True])
def test_generate_batch_stop_when_ends_rows_and_then_the_batch(longrope, monkeypatch):
    # stop_when (pyllm generate's --stop strings) ends a row with the token it first holds at, as a stop
    # token does: each row is what generating in full and cutting there gives (greedy and seeded
    # sampling, stop tokens too), and nothing is decoded once every row has ended (a batch had gone on
    # to max_new_tokens, its rows cut after)
    cfg = dict(CONFIGS["llama"])
    if longrope:  # (a row at a time through generate_stream)
        cfg["rope_scaling"] = dict(rope_type="longrope", short_factor=[1.0] * 16, long_factor=[2.0] * 16,
                                   original_max_position_embeddings=8, attention_factor=1.2)
    torch.manual_seed(0)
    model = randomized(ModelConfig(**cfg)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    calls = []
    counted = "forward_cached" if longrope else "decode_step"
    original = getattr(LLM, counted)
    monkeypatch.setattr(LLM, counted, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    def stop_when(b, new):
        return len(new) >= 2 and sum(new[-2:]) % 3 == b % 2  # (rows stop at other sums)

    for temperature, stop_tokens in ((0.0, ()), (1.0, ()), (1.0, [7, 30])):
        full = model.generate_batch(prompts, 16, temperature, generator=torch.Generator().manual_seed(3),
                                    stop_tokens=stop_tokens)
        want = [row[:next((n for n in range(1, len(row) + 1) if stop_when(b, row[:n])), len(row))]
                for b, row in enumerate(full)]
        assert max(map(len, want)) < 16  # (every row ends early)
        calls.clear()
        got = model.generate_batch(prompts, 16, temperature, generator=torch.Generator().manual_seed(3),
                                   stop_tokens=stop_tokens, stop_when=stop_when)
        # decode steps: one fewer than the longest row; a row at a time: one forward per token
        assert len(calls) == (sum(map(len, got)) if longrope else max(map(len, got)) - 1)
        if longrope and temperature:  # (rows drawn one after another from the generator: a row that ends
            got, want = got[:1], want[:1]  # early leaves the next row other draws, as a stop token does)
        assert got == want


def test_cuda_graph_generation_needs_cuda():
    model = LLM(ModelConfig(**CONFIGS["llama"]))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, cuda_graph=True)


@pytest.mark.parametrize("name", ["llama", "gpt2", "palm-mqa", "window", "moe", "head-dim-80"])
def test_generate_with_cache_equals_without(name):
    cfg = ModelConfig(**CONFIGS[name])
    model = LLM(cfg)
    for rows in (3, 1):  # (one row: a MoE decodes each token on its one-token path)
        prompt = torch.randint(0, cfg.vocab_size, (rows, 4))
        with_cache = model.generate(prompt, 20, temperature=0)
        without = model.generate(prompt, 20, temperature=0, use_cache=False)
        assert with_cache.shape == (rows, 24)
        assert torch.equal(with_cache, without)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("name", ["gqa-untied", "palm-mqa", "qk-norm-window-nope", "gemma-style", "moe", "head-dim-80"])
def test_bf16_forward_and_kv_cache_within_twice_torchs_error(device, name, monkeypatch):
    # The model in bf16 on pyllm's kernels (flash attention, its KV-cache decode, SwiGLU) against
    # the float64 model, within twice the error of the same bf16 model on torch's own functions
    # (SDPA, silu(gate) * up): the whole forward, and the cached path (a 7-token prefill, a
    # 5-token append, then single tokens), which on the GPU is the split-KV decode kernel.
    from pyllm import nn as pyllm_nn

    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(idx)[0]  # (B, T, V) float64
    model = model.to(device=device, dtype=torch.bfloat16)
    assert pyllm_nn._kernel_dtypes(idx.to(device), {"cpu": "cpu kernels", "cuda": "cuda kernels"})

    @torch.no_grad()
    def full_and_cached():
        x = idx.to(device)
        cache = model.new_kv_cache(2)
        steps = [model.forward_cached(x[:, :7], cache, 0), model.forward_cached(x[:, 7:12], cache, 7)]
        steps += [model.forward_cached(x[:, t:t + 1], cache, t) for t in range(12, 20)]
        return model(x)[0], torch.stack(steps, dim=1)  # (B, T, V), (B, 10, V)

    full, cached = full_and_cached()
    monkeypatch.setattr(pyllm_nn, "_kernel_dtypes", lambda x, by_device: ())  # torch's own functions
    torch_full, torch_cached = full_and_cached()
    ref_cached = ref[:, [6, 11, *range(12, 20)]]
    assert rel_err(full, ref) <= tolerance(torch_full, ref)
    assert rel_err(cached, ref_cached) <= tolerance(torch_cached, ref_cached)


def test_activation_checkpointing_same_grads_less_saved():
    cfg = ModelConfig(**CONFIGS["qk-norm-window-nope"], dropout=0.1)
    model = randomized(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 17)), torch.randint(0, cfg.vocab_size, (2, 17))

    def loss_grads_saved():
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        model.zero_grad()
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx, targets)[1]
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()], sum(saved)

    loss, grads, saved = loss_grads_saved()
    model.activation_checkpointing = True
    loss_ac, grads_ac, saved_ac = loss_grads_saved()
    assert torch.equal(loss, loss_ac) and all(torch.equal(a, b) for a, b in zip(grads, grads_ac))  # dropout too
    # Outside the checkpointed blocks only the embedding, final norm, head and loss save tensors.
    assert saved_ac < saved / 3
    model.eval()
    with torch.no_grad():  # no autograd, nothing to recompute: the plain path
        with_flag = model(idx)[0]
        model.activation_checkpointing = False
        assert torch.equal(with_flag, model(idx)[0])


def test_activation_checkpointing_under_torch_compile():
    # The whole model in one graph (fullgraph: no break around the checkpointed blocks or the ops).
    cfg = ModelConfig(**CONFIGS["qk-norm-window-nope"])
    model = LLM(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 17)), torch.randint(0, cfg.vocab_size, (2, 17))
    model(idx, targets)[1].backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    torch.compile(model, fullgraph=True)(idx, targets)[1].backward()
    for got, want in zip((p.grad for p in model.parameters()), eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # fp32, fused differently


# --- packed documents (cu_seqlens) ----------------------------------------------------------------

# Row 0 holds documents of 5, 9 and 1 tokens and 1 of padding, row 1 one of 16: T = 16, as a
# PackedLoader batch looks; lengths 1 and a whole row are the edge cases.
PACKED_LENGTHS, PACKED_T = [[5, 9, 1, 1], [16]], 16


def packed_offsets(lengths=PACKED_LENGTHS) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor([n for row in lengths for n in row]).cumsum(0).tolist()], dtype=torch.int32)


def separately(model, idx, targets, lengths=PACKED_LENGTHS):
    """Each document run alone: its logits put back in place, and the sum and count of its losses."""
    logits, loss_sum, count = torch.empty(*idx.shape, model.config.vocab_size, dtype=torch.float64), 0.0, 0
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            doc_logits = model(idx[r:r + 1, start:start + n])[0]
            logits[r, start:start + n] = doc_logits[0].detach()
            t = targets[r, start:start + n]
            if (t != -1).any():
                loss_sum = loss_sum + F.cross_entropy(doc_logits[0].double(), t, ignore_index=-1, reduction="sum")
                count += int((t != -1).sum())
            start += n
    return logits, loss_sum, count


@pytest.mark.parametrize("name", ["llama", "gpt2", "window", "qk-norm-window-nope", "gemma-style", "olmo-style",
                                  "head-dim-80", "softcap", "moe", "alibi", "alibi-sdpa"])
def test_packed_documents_compute_as_if_alone(name):
    # LLM.forward(idx, targets, cu_seqlens): every document's logits, loss and gradients are those
    # of the document run alone (positions from 0, attention within it), in float64 on the CPU
    # kernels (head dim 80 zero-padded to 96).
    # (The load-balancing loss of a MoE is one statistic of the whole batch, not a sum over its documents: off.)
    cfg = ModelConfig(**CONFIGS[name], **({"router_aux_loss_coef": 0.0} if name == "moe" else {}))
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, PACKED_T))
    targets = torch.randint(0, cfg.vocab_size, (2, PACKED_T))
    targets[0, :3] = -1  # a prompt
    targets[0, 15] = -1  # the padding
    logits, loss = model(idx, targets, packed_offsets())
    loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logits, ref_sum, count = separately(model, idx, targets)
    (ref_sum / count).backward()
    assert rel_err(logits, ref_logits) < 1e-12
    assert abs(loss.item() - (ref_sum / count).item()) < 1e-12
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_packed_documents_bf16_within_twice_torchs_error(device, monkeypatch):
    # bf16 on the varlen kernels (on the GPU: the CUDA varlen forward) against the float64 documents
    # run alone, within twice the error of the same packed bf16 model on SDPA with a mask.
    from pyllm import nn as pyllm_nn

    cfg = ModelConfig(**CONFIGS["qk-norm-window-nope"])
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, PACKED_T))
    with torch.no_grad():
        ref = separately(model, idx, torch.full_like(idx, -1))[0]
    model = model.to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = model(idx.to(device), cu_seqlens=packed_offsets().to(device))[0]
        monkeypatch.setattr(pyllm_nn, "_kernel_dtypes", lambda x, by_device: ())
        theirs = model(idx.to(device), cu_seqlens=packed_offsets().to(device))[0]
    assert rel_err(ours, ref) <= tolerance(theirs, ref)


def test_packed_documents_under_torch_compile_and_checkpointing():
    cfg = ModelConfig(**CONFIGS["qk-norm-window-nope"])
    model = LLM(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, PACKED_T)), torch.randint(0, cfg.vocab_size, (2, PACKED_T))
    model(idx, targets, packed_offsets())[1].backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    compiled = torch.compile(model, fullgraph=True)
    compiled(idx, targets, packed_offsets())[1].backward()
    for got, want in zip((p.grad for p in model.parameters()), eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    other = packed_offsets([[3, 13], [2, 2, 12]])  # another count of documents: traced again, still right
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx, None, other)[0], model(idx, None, other)[0], rtol=1e-4, atol=1e-5)


def test_one_graph_for_every_shape_under_dynamic_compile():
    # torch.compile(dynamic=True) of the fused loss and of packed documents: one graph for every
    # B, T (the fused loss's chunk size came from B * T, varlen's max_seqlen = T went through
    # operator.index: each specialized the graph, a recompile per shape and no dynamic export)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    model = LLM(ModelConfig(vocab_size=128, block_size=64, n_layers=1, n_heads=4, n_kv_heads=2, dim=64))
    model.fused_loss = True
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    before = counters["stats"]["unique_graphs"]
    for B, T in ((2, 16), (3, 21), (2, 30)):
        idx, targets = torch.randint(0, 128, (B, T)), torch.randint(0, 128, (B, T))
        cu = torch.tensor([0, 5, T, T + 3] + [b * T for b in range(2, B + 1)], dtype=torch.int32)
        for offsets in (None, cu):
            got = compiled(idx, targets, offsets)[1]
            torch.testing.assert_close(got, model(idx, targets, offsets)[1], rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - before <= 2  # one with offsets, one without


@pytest.mark.parametrize("offsets, message", [
    ([0, 5, 32], "crosses the end of row 0"),
    ([0, 5, 16, 30], "rise from 0 to B \\* T = 32"),
    ([0, 16, 5, 32], "without falling"),
    ([32], "N \\+ 1 values"),
])
def test_packed_documents_bad_offsets(offsets, message):
    model = LLM(ModelConfig(**SMALL))
    idx = torch.randint(0, 97, (2, 16))
    with pytest.raises(ValueError, match=message):
        model(idx, cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        model(idx, cu_seqlens=torch.tensor([0, 16, 32]))


def test_loss_of_no_targets_is_zero_not_nan():
    # A packed batch may hold prompts alone (every target -1): its loss is 0 and its gradients 0.
    model = LLM(ModelConfig(**SMALL))
    idx = torch.randint(0, 97, (2, 16))
    loss = model(idx, torch.full_like(idx, -1))[1]
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad.abs().max() == 0 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_unfused_loss_takes_the_cross_entropy_kernel(dtype, monkeypatch):
    # Where pyllm.cross_entropy's kernel takes the logits (the CPU), the model's loss and per-token
    # log-probabilities come from it (no fp32 copy of 16-bit logits): F.cross_entropy's values and
    # gradients, z-loss share too (fp64 to rounding; fp32 / bf16 within twice torch's error against
    # fp64, as F.cross_entropy's own path is judged).
    from pyllm.ops import cross_entropy as ce_ops

    calls = []
    kernel = ce_ops.cross_entropy
    monkeypatch.setattr(ce_ops, "cross_entropy", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    model = LLM(ModelConfig(**SMALL)).to(dtype)
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    targets[0, :5] = -1

    def run(kernel_on, exact=False):
        m = model.double() if exact else model
        with monkeypatch.context() as patch:
            if not kernel_on:
                patch.setattr(ce_ops, "takes", lambda logits: False)
            loss = m(idx, targets, z_loss=1e-3)[1]
            share = m.z_loss_term
            grads = torch.autograd.grad(loss, list(m.parameters()))
            logps = m(idx, targets, per_token=True)[1]
        return loss.detach(), share, grads, logps.detach()

    ours = run(True)
    assert len(calls) == 2
    theirs = run(False)
    assert len(calls) == 2
    exact = run(False, exact=True) if dtype != torch.float64 else theirs
    for name, got, torch_value, want in zip(("loss", "z share", "grads", "logps"), ours, theirs, exact):
        for g, t, w in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, torch_value, want))):
            bound = 1e-12 if dtype == torch.float64 else tolerance(t, w)
            assert rel_err(g, w) <= bound, name


def test_generate_streams_and_runs_past_block_size():
    cfg = ModelConfig(**SMALL)
    model = LLM(cfg)
    seen = []
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 2 * cfg.block_size, temperature=0.8, top_k=10,
                         top_p=0.9, callback=seen.append, generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 1 + 2 * cfg.block_size)
    assert torch.equal(torch.cat(seen), out[0, 1:])
    assert int(out.max()) < cfg.vocab_size and int(out.min()) >= 0


def test_generate_stops_at_stop_tokens():
    model = LLM(ModelConfig(**SMALL))
    prompt = torch.randint(0, 97, (2, 4))
    full = model.generate(prompt, 12, temperature=0)  # (2, 16)
    stop = int(full[0, 6])  # row 0's third new token
    first = [next((k for k in range(12) if int(full[b, 4 + k]) == stop), 12) for b in range(2)]
    out = model.generate(prompt, 12, temperature=0, stop_tokens=stop)  # (an int: transformers' eos_token_id form)
    # every row stopped (or ran out) by the last step taken; a row that stopped repeats its stop
    # token until the last one stops (as transformers pads finished rows), no samples past it
    n = min(12, max(first) + 1)
    assert out.shape == (2, 4 + n)
    for b in range(2):
        k = min(first[b] + 1, n)
        assert torch.equal(out[b, :4 + k], full[b, :4 + k])
        assert (out[b, 4 + k:] == stop).all()
    assert torch.equal(model.generate(prompt[:1], 12, temperature=0, stop_tokens=[stop]), full[:1, :4 + first[0] + 1])


def test_preset_overrides_name_what_went_wrong():
    # n_heads alone over a GQA preset: the preset's n_kv_heads named, not an error about a field
    # the caller never set; nanoGPT's field names pointed to ours
    with pytest.raises(ValueError, match="n_kv_heads 2 comes from preset 'tiny'; give n_kv_heads too"):
        ModelConfig.from_preset("tiny", n_heads=1)
    assert ModelConfig.from_preset("tiny", n_heads=8, n_kv_heads=8).n_kv_heads == 8
    with pytest.raises(ValueError, match="n_head is n_heads here.*preset gpt2-124m"):
        ModelConfig.from_preset("gpt2-124m", n_head=4)


def test_dropout_reaches_the_attention_probabilities_while_training(monkeypatch):
    # nanoGPT's dropout is on the embeddings, the blocks' outputs and the attention probabilities
    # (attn_dropout); the last had been left out here, then ran through SDPA (no kernel had
    # dropout). Training with it: the kernels' dropout_p, packed documents too, no SDPA; eval: the
    # kernels, no dropout.
    from pyllm import nn as pyllm_nn
    from pyllm.ops import flash_attn as fa

    seen, kernel = [], fa.flash_attn
    monkeypatch.setattr(fa, "flash_attn", lambda *a, **k: seen.append(k.get("dropout_p", 0.0)) or kernel(*a, **k))
    monkeypatch.setattr(pyllm_nn, "_sdpa", None)  # (not called)
    model = LLM(ModelConfig(**{**SMALL, "dropout": 0.2})).train()
    idx = torch.randint(0, 97, (2, 12))
    torch.manual_seed(0)
    a = model(idx)[0]
    torch.manual_seed(1)
    b = model(idx)[0]
    torch.manual_seed(0)
    assert torch.equal(model(idx)[0], a)
    assert seen == [0.2] * SMALL["n_layers"] * 3 and not torch.equal(a, b)
    cu = torch.tensor([0, 5, 12, 20, 24], dtype=torch.int32)
    model(idx, cu_seqlens=cu)
    assert seen[-SMALL["n_layers"]:] == [0.2] * SMALL["n_layers"]
    seen.clear()
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0]) and seen == [0.0] * SMALL["n_layers"] * 2


def test_generation_arguments_are_checked_and_edge_values_work():
    # transformers' rules: a negative temperature, top_k < 0, top_p outside [0, 1] are errors (a
    # negative temperature had sampled the reversed distribution); top_k 0 is no top-k, top_p 0 the
    # likeliest token; an empty prompt is an error, 0 new tokens none; dropout off in
    # generate_stream called alone; block_size 1 generates.
    model = LLM(ModelConfig(**{**SMALL, "dropout": 0.5})).train()
    prompt = torch.randint(0, 97, (2, 4))
    for bad, message in ((dict(temperature=-1.0), "temperature"), (dict(temperature=None), "temperature"),
                         (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
                         (dict(temperature=1e-40), "too small to divide fp32 logits by; give 0"),  # (torch's NaN error)
                         (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(min_p=True), "min_p")):
        for call in (lambda: model.generate(prompt, 2, **bad), lambda: model.generate_batch([[1, 2]], 2, **bad),
                     lambda: sample(torch.randn(1, 5), **bad),
                     lambda: model.generate_speculative(prompt[:1], model, 2, **bad)):
            with pytest.raises(ValueError, match=message):
                call()
    for penalty in (0.0, -1.2, math.inf, math.nan, True, None):  # (transformers: a float > 0)
        for call in (lambda: model.generate(prompt, 2, repetition_penalty=penalty),
                     lambda: model.generate_batch([[1, 2]], 2, repetition_penalty=penalty),
                     lambda: model.generate_speculative(prompt[:1], model, 2, repetition_penalty=penalty)):
            with pytest.raises(ValueError, match="repetition_penalty must be a finite number > 0"):
                call()
    greedy = model.generate(prompt, 4, temperature=0)
    assert model.training  # restored
    assert torch.equal(model.generate(prompt, 4, top_p=0.0, generator=torch.Generator().manual_seed(3)), greedy)
    assert torch.equal(torch.stack(list(model.generate_stream(prompt, 4, temperature=0)), 1), greedy[:, 4:])
    stream = model.generate_stream(prompt, 4, temperature=0)
    next(stream)
    assert model.training  # eval mode within each step, not across the yields
    stream.close()
    assert model.generate(prompt, 3, top_k=0).shape == (2, 7)
    assert torch.equal(model.generate(prompt, 3, temperature=torch.tensor(0.0)), greedy[:, :7])  # a 0-d tensor
    assert model.generate(prompt, 3, stop_tokens=np.int64(5)).shape[1] <= 7  # numpy's ints too
    with pytest.raises(ValueError, match="T >= 1 prompt tokens"):
        model.generate(prompt[:, :0], 3)
    assert model.generate_batch([[1, 2], [3]], 0) == [[], []]
    tiny = LLM(ModelConfig(**{**SMALL, "block_size": 1}))
    assert tiny.generate(prompt[:, :1], 3, temperature=0).shape == (2, 4)


def test_generation_cache_is_as_long_as_the_generation():
    # Not block_size: a 128k-context checkpoint would ask for a 128k-token cache per layer.
    model, sizes = LLM(ModelConfig(**SMALL)), []
    make = model.new_kv_cache
    model.new_kv_cache = lambda batch, max_len=None: sizes.append(max_len) or make(batch, max_len)
    model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    model.generate(torch.zeros(1, 40, dtype=torch.long), 50, temperature=0)  # past block_size 32: capped
    assert sizes == [8, 32]


def test_forward_on_a_device_without_kernels():
    # meta (shape dry runs): attention and the MLP take torch's functions where pyllm has no
    # kernel, the same path a GPU takes when pyllm was built without CUDA kernels.
    cfg = ModelConfig(**SMALL)
    with torch.device("meta"):
        model = LLM(cfg)
        idx = torch.randint(0, cfg.vocab_size, (2, 9))
        logits, loss = model(idx, idx)
        from pyllm.nn import linear_cross_entropy

        model.fused_loss = True  # (its target selection, nonzero, and autocast had no meta form)
        _, fused = model(idx, idx)
        chunked = linear_cross_entropy(torch.empty(6, cfg.dim), model.lm_head.weight, idx[0, :6])
    assert logits.shape == (2, 9, cfg.vocab_size) and logits.is_meta and loss.shape == ()
    assert fused.is_meta and fused.shape == () and chunked.is_meta and chunked.shape == ()


def test_mlp_without_the_kernel_computes_the_same(monkeypatch):
    from pyllm import nn as pyllm_nn

    mlp = pyllm_nn.SwiGLUMLP(48, 80).double()
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    monkeypatch.setattr(pyllm_nn, "_swiglu_takes", lambda t: False)
    out_torch = mlp(x)
    (grad_torch,) = torch.autograd.grad(out_torch.sum(), x)
    assert rel_err(out, out_torch) < 1e-12 and rel_err(grad, grad_torch) < 1e-12


def test_sample_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=0).item() == 1
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {1}  # p(1) = 0.64 alone crosses 0.5


def test_sampling_probs_are_transformers_warpers():
    """temperature, top-k, top-p as transformers' generate(do_sample=True) applies its warpers, to
    the same probabilities: ties at the top-p edge kept as its sort keeps them, and the token that
    crosses top_p over a flat 32K vocabulary (a descending fp32 sum had dropped it in ~1% of rows)."""
    transformers = pytest.importorskip("transformers")
    from pyllm.model import sampling_probs

    g = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([[1.0, 1, 1, 1], [2, 1, 1, 0]]), 1.0, None, 0.5),
             (torch.tensor([[2.0, 1, 1, 0]]), 1.0, None, 0.6),
             ((3 * torch.randn(64, 32000, generator=g)).bfloat16(), 0.8, None, 0.9),
             (torch.randn(64, 32000, generator=g), 1.0, None, 0.95),
             (torch.randn(16, 1000, generator=g), 0.7, 40, 0.8),
             (torch.randn(4, 100, generator=g), 1.3, 5, 0.0)]
    cases = [(*case, None) for case in cases]
    # min_p after top_k and top_p (and at 0 and 1: nothing dropped, the likeliest tokens alone)
    cases += [(torch.randn(16, 1000, generator=g), 0.7, 40, 0.8, 0.05), ((3 * torch.randn(64, 32000, generator=g))
              .bfloat16(), 1.0, None, 1.0, 0.1), (torch.randn(8, 500, generator=g), 1.5, None, 1.0, 0.0),
              (torch.tensor([[2.0, 2, 1, 0]]), 1.0, None, 1.0, 1.0), (torch.randn(8, 500, generator=g), 0.5, 0, 0.9, 0.3)]
    for logits, temperature, top_k, top_p, min_p in cases:
        warpers = [transformers.TemperatureLogitsWarper(temperature)]
        warpers += [transformers.TopKLogitsWarper(top_k)] if top_k else []
        warpers += [transformers.TopPLogitsWarper(top_p)]
        warpers += [transformers.MinPLogitsWarper(min_p)] if min_p is not None else []
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        want = scores.softmax(-1)
        assert torch.equal(sampling_probs(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p), want)
        if min_p:
            assert (want > 0).sum() < (logits.float() > -math.inf).sum()  # (it dropped some)


def test_repetition_penalty_is_transformers_processor():
    # CTRL's penalty at most once an id, whichever way the logit's sign goes, on fp32 scores (an fp64
    # or bf16 model's logits too); transformers' processor over the ids of each row's text
    transformers = pytest.importorskip("transformers")
    from pyllm.model import _penalize

    g = torch.Generator().manual_seed(0)
    for dtype, penalty in ((torch.float32, 1.3), (torch.bfloat16, 0.7), (torch.float64, 2.0)):
        logits = (3 * torch.randn(4, 300, generator=g)).to(dtype)
        ids = torch.randint(0, 300, (4, 50), generator=g)  # (repeats among them)
        seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
        want = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.float())
        assert torch.equal(_penalize(logits, seen, penalty), want)
        assert not torch.equal(want, logits.float())


def nanogpt_forward(state: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward written plainly over nanoGPT's parameter names, float64: LayerNorm (eps
    1e-5), causal softmax attention, the exact (erf) GELU, tied output embeddings."""
    w = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v.double() for k, v in state.items()}
    B, T = idx.shape
    C, H = args["n_embd"], args["n_head"]
    ln = lambda x, name: F.layer_norm(x, (C,), w[name + ".weight"], w.get(name + ".bias"), 1e-5)  # noqa: E731
    lin = lambda x, name: F.linear(x, w[name + ".weight"], w.get(name + ".bias"))  # noqa: E731
    x = w["wte.weight"][idx] + w["wpe.weight"][:T]  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(args["n_layer"]):
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in lin(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, -1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(C // H)).masked_fill(~causal, float("-inf"))
        x = x + lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C), f"h.{i}.attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ w["wte.weight"].t()


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)])
def test_a_nanogpt_checkpoint_is_the_same_function(tmp_path, bias, compiled):
    # nanoGPT's ckpt.pt (its model_args and state dict; bias=False is its train.py's default, a
    # compiled model's keys carry "_orig_mod."): LLM.from_nanogpt computes what nanoGPT's GPT does
    # (float64 reference above), and to_hf writes a GPT-2 transformers computes alike (exact GELU).
    args = dict(n_layer=2, n_head=4, n_embd=64, block_size=16, bias=bias, vocab_size=97, dropout=0.1)
    g = torch.Generator().manual_seed(0)
    shapes = {"wte.weight": (97, 64), "wpe.weight": (16, 64), "ln_f.weight": (64,)}
    for i in range(2):
        shapes.update({f"h.{i}.ln_1.weight": (64,), f"h.{i}.ln_2.weight": (64,), f"h.{i}.attn.c_attn.weight": (192, 64),
                       f"h.{i}.attn.c_proj.weight": (64, 64), f"h.{i}.mlp.c_fc.weight": (256, 64),
                       f"h.{i}.mlp.c_proj.weight": (64, 256)})
    if bias:
        shapes.update({k.replace(".weight", ".bias"): (v[0],) for k, v in shapes.items() if k not in ("wte.weight", "wpe.weight")})
    state = {("_orig_mod." if compiled else "") + "transformer." + k: torch.randn(v, generator=g) * 0.3
             for k, v in shapes.items()}
    state[("_orig_mod." if compiled else "") + "lm_head.weight"] = state[("_orig_mod." if compiled else "") + "transformer.wte.weight"]
    torch.save({"model": state, "model_args": args, "iter_num": 5, "best_val_loss": torch.tensor(1.5),
                "config": {"dataset": "shakespeare_char"}}, tmp_path / "ckpt.pt")
    model = LLM.from_nanogpt(tmp_path / "ckpt.pt").double().eval()
    assert (model.config.mlp, model.config.bias, model.config.dropout) == ("gelu_exact", bias, 0.1)
    idx = torch.randint(0, 97, (3, 16), generator=g)
    want = nanogpt_forward(state, args, idx)
    assert rel_err(model(idx)[0], want) < 1e-12
    if bias:  # transformers' GPT-2 has biases
        transformers = pytest.importorskip("transformers")
        model.float().to_hf(tmp_path / "hf")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").double().eval()
        assert rel_err(hf(idx).logits, want) < 1e-6  # (written in fp32)
        back = LLM.from_hf(tmp_path / "hf").double().eval()  # transformers' activation "gelu" read back as exact
        assert back.config.mlp == "gelu_exact" and rel_err(back(idx)[0], want) < 1e-6
    with pytest.raises(ValueError, match="not a nanoGPT checkpoint"):
        torch.save({"model": state}, tmp_path / "other.pt")
        LLM.from_nanogpt(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="a checkpoint of `pyllm train`, not nanoGPT's: its weights are .*model.safetensors"):
        torch.save({"model": state, "model_config": {}}, tmp_path / "checkpoint.pt")  # (generate --model checkpoint.pt)
        LLM.from_nanogpt(tmp_path / "checkpoint.pt")
    if not bias:  # and `pyllm generate --model ckpt.pt --tokenizer meta.pkl`, as nanoGPT's sample.py
        import pickle

        from pyllm import cli

        chars = [chr(c) for c in range(32, 32 + 97)]
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 97, "itos": dict(enumerate(chars)),
                                                          "stoi": {c: i for i, c in enumerate(chars)}}))
        assert cli.main(["generate", "--model", str(tmp_path / "ckpt.pt"), "--tokenizer", str(tmp_path / "meta.pkl"),
                         "--prompt", "ab", "--max-new-tokens", "5", "--device", "cpu"]) == 0
        # training goes on from it (from_nanogpt's docstring: save, then --init-from-run with its meta.pkl
        # as --tokenizer; the folder without a run.json had been refused as a run whose tokenizer is gone)
        import numpy as np

        (tmp_path / "conv").mkdir()
        LLM.from_nanogpt(tmp_path / "ckpt.pt").save(tmp_path / "conv" / "model.safetensors")
        data = tmp_path / "data"
        data.mkdir()
        for name in ("train.bin", "val.bin"):
            np.random.default_rng(0).integers(0, 97, 2000, dtype=np.uint16).tofile(data / name)
        (data / "meta.pkl").write_bytes((tmp_path / "meta.pkl").read_bytes())
        assert cli.main(["train", "--init-from-run", str(tmp_path / "conv"), "--tokenizer", str(tmp_path / "meta.pkl"),
                         "--data", str(data), "--out", str(tmp_path / "more"), "--max-steps", "1", "--batch-size", "2",
                         "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "0"]) == 0


def test_nanogpts_method_names():
    # Code written against nanoGPT's GPT: get_num_params (its 123.65M for GPT-2 at 50,257 words),
    # crop_block_size, configure_optimizers (decay on the matrices), estimate_mfu.
    assert LLM(ModelConfig.from_preset("gpt2-124m", vocab_size=50257)).get_num_params() == 123_653_376
    model = LLM(ModelConfig.from_preset("gpt2-124m", n_layers=1, dim=64, n_heads=2, vocab_size=97, block_size=32))
    idx = torch.randint(0, 97, (2, 16))
    before = model(idx)[0]
    model.crop_block_size(16)
    assert model.pos_emb.weight.shape == (16, 64) and torch.equal(model(idx)[0], before)
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.randint(0, 97, (1, 17)))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert (decayed["weight_decay"], plain["weight_decay"], decayed["lr"]) == (0.1, 0.0, 1e-3)
    assert model.estimate_mfu(4, 0.5, peak_flops=1e12) == pytest.approx(model.flops_per_token(16) * 16 * 4 / 0.5 / 1e12)
    # the CPU, no peak known: nanoGPT's A100 figure, a number for its loop's running average
    assert model.estimate_mfu(4, 0.5) == model.estimate_mfu(4, 0.5, peak_flops=312e12)


@pytest.mark.parametrize("name", ["gpt2", "qk-norm-window-nope", "moe"])
def test_save_load_roundtrip(tmp_path, name):
    cfg = ModelConfig(**CONFIGS[name])
    model = LLM(cfg)
    model.save(tmp_path / "m.safetensors")
    loaded = LLM.load(tmp_path / "m.safetensors")
    assert loaded.config == cfg
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    # configs saved before head_dim was a field (no such key) get dim // n_heads
    old = {k: v for k, v in cfg.to_dict().items() if k != "head_dim"}
    assert ModelConfig(**old).head_dim == 32
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="safetensors"):
        LLM.load(tmp_path / "bad.safetensors")
    # a run's folder, as from_pretrained takes a checkpoint's (it had said "not a readable
    # safetensors file (No such device (os error 19))"; from the install audit)
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="a folder without model.safetensors"):
        LLM.load(tmp_path / "run")
    model.save(tmp_path / "run" / "model.safetensors")
    assert torch.equal(model(idx)[0], LLM.load(tmp_path / "run")(idx)[0])


@pytest.mark.parametrize("name", ["llama", "gpt2", "gqa-untied", "moe", "moe-shared"])
def test_lora(name, tmp_path):
    # LoRA (add_lora): only the updates train; the model starts as it was (bitwise: B = 0); a
    # trained update saves merged into plain weights that compute what the LoRA model does.
    from pyllm.nn import LoRALinear

    torch.manual_seed(0)
    model = LLM(ModelConfig(**CONFIGS[name])).double()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    before = model(idx)[0]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_lora(4, 8.0)
    assert torch.equal(model(idx)[0], before)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    per_block = 2 if model.config.n_experts else 4  # qkv, proj (a MoE's experts and router take none), gate_up, down
    assert len(loras) == per_block * model.config.n_layers and model.lora_scale() == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if n.endswith((".lora_a", ".lora_b"))}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        4 * (m.in_features + m.out_features) for m in loras)
    logits, loss = model(idx, idx)
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for m in loras:
            m.lora_b.normal_()
    trained = model(idx)[0]
    assert not torch.allclose(trained, before)
    from pyllm.model import merge_lora_state

    merged = LLM(ModelConfig(**CONFIGS[name])).double()
    merged.load_state_dict(merge_lora_state(model.state_dict(), model.lora_scale()))
    assert rel_err(merged(idx)[0], trained) < 1e-12
    model.save(tmp_path / "m.safetensors")  # the plain model's file, merged
    loaded = LLM.load(tmp_path / "m.safetensors").state_dict()
    assert loaded.keys() == base_state.keys()
    assert all(torch.equal(loaded[k], v.float()) for k, v in merged.state_dict().items())
    for key, value in merged.state_dict().items():  # the updates alone changed, each of rank <= 4
        delta = value - base_state[key]
        assert torch.linalg.matrix_rank(delta).item() <= 4 if delta.dim() == 2 and delta.any() else not delta.any()


@pytest.mark.parametrize("name,targets", [("gqa-untied", "q,v,down"), ("gemma-style", "all-linear"),
                                          ("gpt2", ["up_proj", "o_proj", "k"])])
def test_lora_targets_give_each_projection_its_own_update(name, targets):
    # PEFT's way (add_lora's targets): each named projection its own rank-r update, also inside the
    # fused qkv / gate_up layers (B's blocks on the diagonal); the others' rows and layers untouched.
    from pyllm.model import lora_targets, merge_lora_state
    from pyllm.nn import LoRALinear

    torch.manual_seed(0)
    cfg, r = ModelConfig(**CONFIGS[name]), 3
    model = LLM(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    before = model(idx)[0]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_lora(r, 6.0, targets=targets)
    assert torch.equal(model(idx)[0], before)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
    trained = model(idx)[0]
    merged_state = merge_lora_state(model.state_dict(), model.lora_scale())
    assert merged_state.keys() == base_state.keys()

    wanted = set(lora_targets(targets))
    H, H_kv, D, hidden = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden
    layers = {"attn.qkv": [("q", H * D), ("k", H_kv * D), ("v", H_kv * D)], "attn.proj": [("o", cfg.dim)],
              "mlp.down": [("down", cfg.dim)]}
    layers.update({"mlp.up": [("up", hidden)]} if cfg.mlp == "gelu" else {"mlp.gate_up": [("gate", hidden), ("up", hidden)]})
    n_trainable = 0
    for i in range(cfg.n_layers):
        for layer, parts in layers.items():
            name = f"blocks.{i}.{layer}"
            module = model.get_submodule(name)
            delta = merged_state[name + ".weight"] - base_state[name + ".weight"]
            adapted = [part in wanted for part, _ in parts]
            assert isinstance(module, LoRALinear) == any(adapted), name
            row, b_row, k = 0, 0, 0
            for (part, rows), on in zip(parts, adapted):
                if on:  # exactly (alpha / r) B_k A_k
                    a_k, b_k = module.lora_a[k * r:(k + 1) * r], module.lora_b[b_row:b_row + rows]
                    assert rel_err(delta[row:row + rows], 2.0 * b_k @ a_k) < 1e-12, (name, part)
                    n_trainable += a_k.numel() + b_k.numel()
                    b_row, k = b_row + rows, k + 1
                else:
                    assert not delta[row:row + rows].any(), (name, part)
                row += rows
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_trainable > 0
    for key in base_state:  # nothing else moved
        if not key.endswith(".weight") or key.rsplit(".", 2)[-2] not in ("qkv", "proj", "down", "up", "gate_up"):
            assert torch.equal(merged_state[key], base_state[key]), key
    merged = LLM(cfg).double()
    merged.load_state_dict(merged_state)
    assert rel_err(merged(idx)[0], trained) < 1e-12


def test_lora_dropout_acts_in_training_only():
    from pyllm.nn import LoRALinear

    torch.manual_seed(0)
    model = LLM(ModelConfig(**CONFIGS["llama"])).double()
    model.add_lora(2, 4.0, dropout=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    model.eval()
    calm = model(idx)[0]
    assert torch.equal(model(idx)[0], calm)
    model.train()
    noisy = model(idx)[0]
    assert not torch.allclose(noisy, calm)
    for m in model.modules():  # dropout off: the eval output
        if isinstance(m, LoRALinear):
            m.dropout = 0.0
    assert torch.equal(model(idx)[0], calm)
    with pytest.raises(ValueError, match="dropout"):
        LLM(ModelConfig(**CONFIGS["llama"])).add_lora(2, 4.0, dropout=1.0)
    with pytest.raises(ValueError, match="q, k, v, o, gate, up, down"):
        LLM(ModelConfig(**CONFIGS["llama"])).add_lora(2, 4.0, targets="q,attn")


# No transform; Granite's (1 / logits_scaling); Gemma 2's cap at a value these logits reach (|z| to ~8);
# Cohere's scale under a cap.
LOGIT_SHAPES = {"plain": {}, "scaled": dict(scale=0.4), "capped": dict(softcap=3.0),
                "scaled-capped": dict(scale=2.0, softcap=5.0)}
# Chunks of 1 row, 37 (not dividing the 300 rows) and the default (one chunk); one-row chunks plain only.
CHUNKS_AND_SHAPES = [(1, "plain")] + [(rows, shape) for rows in (37, None) for shape in LOGIT_SHAPES]


def fused_loss_grid(test):
    """The fused output-layer losses' test grid: device, dtype, chunking x logit shape, and the
    softmax step (softmax_step's)."""
    for mark in (pytest.mark.parametrize("step", ["kernel", "torch-ops"]),
                 pytest.mark.parametrize("chunk_rows, shape", CHUNKS_AND_SHAPES),
                 pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str),
                 pytest.mark.parametrize("device", CPU_AND_CUDA)):
        test = mark(test)
    return test


def output_layer_case(seed: int):
    """300 rows of width 64, a 1000-word output layer (float64) and targets, every 7th -1 (ignored)."""
    torch.manual_seed(seed)
    x64, w64 = torch.randn(300, 64, dtype=torch.float64), torch.randn(1000, 64, dtype=torch.float64) * 0.2
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = -1
    return x64, w64, targets


def loss_and_grads(fn, x64, w64, targets, dtype, device="cpu"):
    """(fn(x, w, targets), dx, dw) with x, w copies of x64, w64 in dtype on device."""
    x, w = (t.to(device, dtype, copy=True).requires_grad_() for t in (x64, w64))
    loss = fn(x, w, targets.to(device))
    loss.backward()
    return loss.detach(), x.grad, w.grad


def softmax_step(monkeypatch, how: str) -> None:
    """The fused losses' softmax step by pyllm's cross-entropy kernel ("kernel"; on CUDA, asked for
    by its environment variable) or by torch ops ("torch-ops", what devices without the kernel run)."""
    from pyllm.ops import cross_entropy as cross_entropy_ops

    if how == "kernel":
        monkeypatch.setenv(cross_entropy_ops.CUDA_IN_FUSED_LOSS_ENV, "1")
    else:
        monkeypatch.setattr(cross_entropy_ops, "takes", lambda logits: False)


@fused_loss_grid
def test_linear_cross_entropy_matches_float64(device, dtype, chunk_rows, shape, step, monkeypatch):
    # The fused linear cross-entropy (sum over rows, -1 targets ignored): loss and both gradients
    # within twice torch's own error in that dtype (x @ W^T in it, the softmax in fp32), whatever
    # the chunking, with scaled and capped logits too, the softmax step by the kernel or torch ops.
    from pyllm.nn import linear_cross_entropy

    softmax_step(monkeypatch, step)

    call = LOGIT_SHAPES[shape]
    x64, w64, targets = output_layer_case(0)

    def plain(x, w, t):
        return F.cross_entropy(shaped_logits(x @ w.t(), **call), t, ignore_index=-1, reduction="sum")

    ref = loss_and_grads(plain, x64, w64, targets, torch.float64)
    theirs = loss_and_grads(plain, x64, w64, targets, dtype, device)
    ours = loss_and_grads(lambda x, w, t: linear_cross_entropy(x, w, t, chunk_rows, **call), x64, w64, targets, dtype,
                          device)
    for name, got, torch_value, exact in zip(("loss", "dx", "dw"), ours, theirs, ref):
        assert got.dtype == (torch.float32 if name == "loss" else dtype)
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name


# F.cross_entropy's label smoothing; PaLM's z-loss (coefficient 1e-4 there: 1e-2 here, to weigh in
# the gradients these few rows give); both.
OBJECTIVES = {"smoothed": dict(label_smoothing=0.1), "z-loss": dict(z_loss=1e-2),
              "both": dict(label_smoothing=0.2, z_loss=1e-3)}


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("chunk_rows, shape", [(37, "plain"), (None, "scaled-capped")])
@pytest.mark.parametrize("step", ["kernel", "torch-ops"])
def test_linear_cross_entropy_objectives_match_float64(device, dtype, objective, chunk_rows, shape, step,
                                                       monkeypatch):
    # label_smoothing and z_loss: loss and both gradients within twice torch's own error in that
    # dtype (F.cross_entropy's label_smoothing plus z * logsumexp^2 over the counted rows); the
    # z-loss share given back (return_z_loss) to fp32 rounding, detached.
    from pyllm.nn import linear_cross_entropy

    softmax_step(monkeypatch, step)

    call, options = LOGIT_SHAPES[shape], OBJECTIVES[objective]
    z = options.get("z_loss", 0.0)
    x64, w64, targets = output_layer_case(2)

    def z_part(x, w, t):
        return z * (torch.logsumexp(shaped_logits(x @ w.t(), **call), dim=-1).square() * (t != -1)).sum()

    def plain(x, w, t):
        return F.cross_entropy(shaped_logits(x @ w.t(), **call), t, ignore_index=-1, reduction="sum",
                               label_smoothing=options.get("label_smoothing", 0.0)) + z_part(x, w, t)

    ref = loss_and_grads(plain, x64, w64, targets, torch.float64)
    theirs = loss_and_grads(plain, x64, w64, targets, dtype, device)
    ours = loss_and_grads(lambda x, w, t: linear_cross_entropy(x, w, t, chunk_rows, **call, **options), x64, w64,
                          targets, dtype, device)
    for name, got, torch_value, exact in zip(("loss", "dx", "dw"), ours, theirs, ref):
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name
    x, w = (t.to(device, dtype) for t in (x64, w64))
    loss, share = linear_cross_entropy(x, w, targets.to(device), chunk_rows, **call, **options, return_z_loss=True)
    assert not share.requires_grad and share.dtype == torch.float32
    want = z_part(x64, w64, targets)
    # (bf16: the logits rounded to bf16 before their logsumexp)
    assert float(share) == 0.0 if not z else abs(float(share) - float(want)) <= (
        2e-2 if dtype == torch.bfloat16 else 1e-5) * float(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("step", ["kernel", "torch-ops"])
def test_linear_cross_entropy_takes_ligers_ignore_index_and_mean(dtype, step, monkeypatch):
    # Code written against Liger-Kernel's fused loss (ignore_index -100, reduction "mean"): the mean
    # over the counted targets, within twice torch's error; all ignored gives NaN, as torch's mean,
    # with gradients 0 (not 0 * inf: a micro-batch of no targets must not poison the weights). HF's
    # -100 labels left to the default ignore_index (-1) are out of range: an error from the kernel,
    # NaN from torch ops (they had been read as word 0 there: CUDA's default path).
    from pyllm.nn import linear_cross_entropy

    softmax_step(monkeypatch, step)
    x64, w64, targets = output_layer_case(3)
    targets = targets.masked_fill(targets == -1, -100)

    def plain(x, w, t):
        return F.cross_entropy(x @ w.t(), t, ignore_index=-100)

    ref = loss_and_grads(plain, x64, w64, targets, torch.float64)
    theirs = loss_and_grads(plain, x64, w64, targets, dtype)
    ours = loss_and_grads(lambda x, w, t: linear_cross_entropy(x, w, t, 37, ignore_index=-100, reduction="mean"),
                          x64, w64, targets, dtype)
    for name, got, torch_value, exact in zip(("loss", "dx", "dw"), ours, theirs, ref):
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name
    none = torch.full_like(targets, -100)
    loss, dx, dw = loss_and_grads(lambda x, w, t: linear_cross_entropy(x, w, t, 37, ignore_index=-100,
                                                                       reduction="mean"), x64, w64, none, dtype)
    assert torch.isnan(loss) and not dx.any() and not dw.any()
    if step == "kernel":
        with pytest.raises(ValueError, match="target"):
            linear_cross_entropy(x64.float(), w64.float(), targets)
    else:
        loss, dx, dw = loss_and_grads(lambda x, w, t: linear_cross_entropy(x, w, t, 37), x64, w64, targets, dtype)
        assert torch.isnan(loss) and dx.isnan().any() and dw.isnan().any()
    with pytest.raises(ValueError, match="reduction must be 'sum', 'mean' or 'none'"):
        linear_cross_entropy(x64.float(), w64.float(), targets, reduction="avg")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_rows, shape, objective", [(37, "scaled-capped", "both"), (None, "plain", None)])
@pytest.mark.parametrize("step", ["kernel", "torch-ops"])
def test_linear_cross_entropy_rows_take_a_weight_each(device, dtype, chunk_rows, shape, objective, step, monkeypatch):
    # reduction="none" (Liger's, for a weighting of one's own): each row's loss (targets' shape, 0
    # where ignored) and the gradients of the rows' losses each times its own weight, within twice
    # torch's own error in that dtype; the z-loss shares per row too. (Liger's had weighted every
    # row's gradient by the first row's weight until 2026-07.)
    from pyllm.nn import LinearCrossEntropyLoss, linear_cross_entropy

    softmax_step(monkeypatch, step)
    call, options = LOGIT_SHAPES[shape], OBJECTIVES.get(objective, {})
    z = options.get("z_loss", 0.0)
    x64, w64, targets = output_layer_case(4)
    x64, targets = x64.view(3, 100, 64), targets.view(3, 100)  # (B, T, C), (B, T)
    weights = torch.randn(3, 100, dtype=torch.float64)  # some negative: a preference-style weighting

    def rows(x, w, t):  # (B, T)
        logits = shaped_logits(x @ w.t(), **call)
        ce = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-1, reduction="none",
                             label_smoothing=options.get("label_smoothing", 0.0)).view(t.shape)
        return ce + z * torch.logsumexp(logits, dim=-1).square() * (t != -1)

    def weighted(fn):
        seen = []

        def call_and_weigh(x, w, t):
            out = fn(x, w, t)
            seen.append(out.detach())
            return (out * weights.to(out.device, out.dtype)).sum()
        return call_and_weigh, seen

    results = {}
    for name, fn, dt in (("exact", rows, torch.float64), ("torch", rows, dtype),
                         ("ours", lambda x, w, t: linear_cross_entropy(x, w, t, chunk_rows, **call, **options,
                                                                       reduction="none"), dtype)):
        fn, seen = weighted(fn)
        _, dx, dw = loss_and_grads(fn, x64, w64, targets, dt, "cpu" if dt == torch.float64 else device)
        results[name] = (seen[0], dx, dw)
    for name, got, torch_value, exact in zip(("losses", "dx", "dw"), results["ours"], results["torch"],
                                             results["exact"]):
        assert got.shape == exact.shape, name
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name
    assert torch.equal(results["ours"][0][targets == -1].cpu(), torch.zeros(int((targets == -1).sum())))
    x, w = (t.to(device, dtype) for t in (x64, w64))
    _, shares = linear_cross_entropy(x, w, targets.to(device), chunk_rows, **call, **options, reduction="none",
                                     return_z_loss=True)
    want = z * torch.logsumexp(shaped_logits(x64 @ w64.t(), **call), dim=-1).square() * (targets != -1)
    assert shares.shape == targets.shape and not shares.requires_grad
    assert not shares.any() if not z else rel_err(shares, want) <= (2e-2 if dtype == torch.bfloat16 else 1e-5)
    # Liger's module: the same rows (its ignore_index -100)
    liger = LinearCrossEntropyLoss(ignore_index=-100, reduction="none", softcap=call.get("softcap"),
                                   label_smoothing=options.get("label_smoothing", 0.0), lse_square_scale=z)
    if not call.get("scale"):
        got = liger(w, x.flatten(0, 1), targets.flatten().masked_fill(targets.flatten() == -1, -100).to(device))
        assert torch.equal(got.view(3, 100), results["ours"][0])


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction, chunk_rows, shape", [("sum", 37, "scaled-capped"), ("none", None, "plain"),
                                                          ("mean", 37, "plain")])
@pytest.mark.parametrize("step", ["kernel", "torch-ops"])
def test_linear_cross_entropy_token_scaling_matches_float64(device, dtype, reduction, chunk_rows, shape, step,
                                                            monkeypatch):
    # DFT (token_scaling, TRL's SFT loss_type "dft"): each row's loss (smoothing and z-loss in it) and
    # gradients times its target's probability, held constant, within twice torch's own error, the
    # softmax step by the kernel or torch ops; the z-loss share scaled alike
    from pyllm.nn import linear_cross_entropy

    softmax_step(monkeypatch, step)
    call, options = LOGIT_SHAPES[shape], OBJECTIVES["both"]
    x64, w64, targets = output_layer_case(5)
    weights = torch.rand(targets.shape, dtype=torch.float64) + 0.5  # ("none": a weight each)

    def rows(x, w, t, z_only=False):
        logits = shaped_logits(x @ w.t(), **call)
        p = torch.softmax(logits.detach(), -1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -1)
        z = options["z_loss"] * torch.logsumexp(logits, dim=-1).square() * p
        if z_only:
            return z
        return F.cross_entropy(logits, t, ignore_index=-1, reduction="none",
                               label_smoothing=options["label_smoothing"]) * p + z

    def reduced(fn):
        def call_and_reduce(x, w, t):
            out = fn(x, w, t)
            if reduction == "none":
                return (out * weights.to(out.device, out.dtype)).sum()
            return out.sum() if reduction == "sum" else out.sum() / (t != -1).sum()
        return call_and_reduce

    ref = loss_and_grads(reduced(rows), x64, w64, targets, torch.float64)
    theirs = loss_and_grads(reduced(rows), x64, w64, targets, dtype, device)
    ours = loss_and_grads(reduced(lambda x, w, t: linear_cross_entropy(
        x, w, t, chunk_rows, **call, **options, reduction="none", token_scaling=True)) if reduction == "none" else
        lambda x, w, t: linear_cross_entropy(x, w, t, chunk_rows, **call, **options, reduction=reduction,
                                             token_scaling=True), x64, w64, targets, dtype, device)
    for name, got, torch_value, exact in zip(("loss", "dx", "dw"), ours, theirs, ref):
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name
    x, w = (t.to(device, dtype) for t in (x64, w64))
    _, share = linear_cross_entropy(x, w, targets.to(device), chunk_rows, **call, **options, reduction="sum",
                                    return_z_loss=True, token_scaling=True)
    want = rows(x64, w64, targets, z_only=True).sum()
    assert abs(float(share) - float(want)) <= (2e-2 if dtype == torch.bfloat16 else 1e-5) * float(want)


def test_linear_cross_entropy_objectives_are_checked():
    from pyllm.nn import linear_cross_entropy

    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    for options, message in ((dict(label_smoothing=1.5), "label_smoothing must be in"),
                             (dict(label_smoothing=-0.1), "label_smoothing must be in"),
                             (dict(z_loss=-1e-4), "z_loss must be"), (dict(z_loss=math.inf), "z_loss must be")):
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(x, w, t, **options)
    # Liger's fused loss takes the output layer's bias 4th: a clear refusal, not a tensor read as a
    # chunk size ("only one element tensors can be converted to Python scalars")
    with pytest.raises(TypeError, match="Liger-Kernel's 4th is the output layer's bias"):
        linear_cross_entropy(x, w, t, torch.zeros(10))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        linear_cross_entropy(x, w, t, 0)


@fused_loss_grid
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_linear_token_logps_matches_float64(device, dtype, chunk_rows, shape, step, head, monkeypatch):
    # Each row's log-probability of its target without the logits in memory (recomputed in the
    # backward; a frozen head's d logp / dx kept from the forward instead): values and gradients,
    # under a random weight per row (as a sequence-level loss gives), within twice torch's own
    # error in that dtype; scaled and capped logits too; the softmax step by the kernel or torch ops.
    from pyllm.nn import linear_token_logps

    softmax_step(monkeypatch, step)

    call = LOGIT_SHAPES[shape]
    x64, w64, targets = output_layer_case(1)
    weights = torch.randn(300, dtype=torch.float64)

    def run(fn, dtype, device="cpu"):
        x, w = (t.to(device, dtype, copy=True).requires_grad_() for t in (x64, w64))
        w.requires_grad_(head == "trained")
        out = fn(x, w, targets.to(device))
        (out * weights.to(device, out.dtype)).sum().backward()
        return out.detach(), x.grad, w.grad

    def plain(x, w, t):
        return -F.cross_entropy(shaped_logits(x @ w.t(), **call), t, ignore_index=-1, reduction="none")

    ref = run(plain, torch.float64)
    theirs = run(plain, dtype, device)
    ours = run(lambda x, w, t: linear_token_logps(x, w, t, chunk_rows, **call), dtype, device)
    assert torch.equal(ours[0][::7].cpu(), torch.zeros(43))  # ignored rows: 0
    if head == "frozen":
        assert ours[2] is None and theirs[2] is None
        ours, theirs, ref = ours[:2], theirs[:2], ref[:2]
    for name, got, torch_value, exact in zip(("logps", "dx", "dw"), ours, theirs, ref):
        assert got.dtype == (torch.float32 if name == "logps" else dtype)
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name


# 300 rows as 40 sequences (a few empty), 20 pairs: a DPO-like loss of each pair's summed
# log-probabilities against fixed reference values, what train.preference_batch_loss fuses.
SEQUENCE_ROWS = [0, 9, 4, 17, 6, 6, 1, 0, 12, 3] * 3 + [0, 9, 4, 17, 6, 6, 1, 0, 12, 71]


def pair_loss_fn(reference: torch.Tensor):
    def loss_fn(logps, s0, s1):  # -log sigmoid(beta ((chosen - ref) - (rejected - ref))) of pairs s0 .. s1
        ratio = logps - reference[s0:s1].to(logps)
        return -F.logsigmoid(0.1 * (ratio[0::2] - ratio[1::2])).sum()
    return loss_fn


@fused_loss_grid
def test_linear_sequence_loss_matches_float64(device, dtype, chunk_rows, shape, step, monkeypatch):
    # A loss over pairs of sequences fused with the output layer (nn.linear_sequence_loss: whole
    # pairs per chunk, the gradients made in the forward): the loss, each sequence's log-probability
    # and the gradients, within twice torch's own error in that dtype (its logits, log_softmax and
    # the loss on the sums); scaled and capped logits; chunks of one pair (rows 1), of a few (37),
    # or all; the softmax step by the kernel or torch ops.
    from pyllm.nn import linear_sequence_loss

    softmax_step(monkeypatch, step)
    call = LOGIT_SHAPES[shape]
    x64, w64, targets = output_layer_case(2)
    owner = torch.repeat_interleave(torch.arange(len(SEQUENCE_ROWS)), torch.tensor(SEQUENCE_ROWS))
    loss_fn = pair_loss_fn(torch.randn(len(SEQUENCE_ROWS), dtype=torch.float64) * 20 - 60)

    def run(fn, dtype, device="cpu"):
        x, w = (t.to(device, dtype, copy=True).requires_grad_() for t in (x64, w64))
        loss, logps = fn(x, w, targets.to(device))
        (loss * 1.7).backward()
        return loss.detach(), logps, x.grad, w.grad

    def plain(x, w, t):
        logps = -F.cross_entropy(shaped_logits(x @ w.t(), **call), t, ignore_index=-1, reduction="none")
        sums = logps.new_zeros(len(SEQUENCE_ROWS)).index_add(0, owner.to(logps.device), logps)
        return loss_fn(sums, 0, len(SEQUENCE_ROWS)), sums.detach()

    ref = run(plain, torch.float64)
    theirs = run(plain, dtype, device)
    ours = run(lambda x, w, t: linear_sequence_loss(x, w, t, SEQUENCE_ROWS, 2, loss_fn, chunk_rows, **call), dtype,
               device)
    for name, got, torch_value, exact in zip(("loss", "logps", "dx", "dw"), ours, theirs, ref):
        assert got.dtype == (torch.float32 if name in ("loss", "logps") else dtype)
        assert rel_err(got, exact) <= tolerance(torch_value, exact), name


@pytest.mark.parametrize("step", ["kernel", "torch-ops"])
@pytest.mark.parametrize("shape", ["plain", "scaled-capped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_sequence_loss_token_stats(dtype, shape, step, monkeypatch):
    # linear_sequence_loss(return_token_stats=True) (DPO's entropy, token accuracy and mean logits
    # from the fused pass over whole pairs): each row's statistics those of linear_token_logps
    # (tested against float64 above) on the same rows, 0s where ignored; the loss, log-probabilities
    # and gradients bit for bit those without them.
    from pyllm.nn import linear_sequence_loss, linear_token_logps

    softmax_step(monkeypatch, step)
    call = LOGIT_SHAPES[shape]
    x64, w64, targets = output_layer_case(2)
    x, w = x64.to(dtype), w64.to(dtype)
    targets[1::3] = shaped_logits(x @ w.t(), **call).argmax(dim=-1)[1::3]
    loss_fn = pair_loss_fn(torch.randn(len(SEQUENCE_ROWS), dtype=torch.float64) * 20 - 60)
    runs = []
    for stats in (True, False):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = linear_sequence_loss(xg, wg, targets, SEQUENCE_ROWS, 2, loss_fn, 37, **call, return_token_stats=stats)
        out[0].backward()
        runs.append((*out, xg.grad, wg.grad))
    (loss, logps, stats, dx, dw), plain = runs
    assert all(torch.equal(a, b) for a, b in zip((loss, logps, dx, dw), plain))
    want = linear_token_logps(x, w, targets, 37, **call, return_token_stats=True)
    torch.testing.assert_close(stats.entropy, want.entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.mean_logit, want.mean_logit, rtol=1e-6, atol=1e-6)
    assert torch.equal(stats.is_top1, want.is_top1) and stats.is_top1.sum() >= 40
    ignored = targets == -1
    assert not stats.entropy[ignored].any() and not stats.mean_logit[ignored].any() and ignored.sum() > 0


def test_linear_sequence_loss_heads_grad_modes_and_checks():
    # A frozen head (no weight gradient made), no_grad (no gradients made, the loss still), no rows,
    # and the arguments checked.
    from pyllm.nn import linear_sequence_loss

    x64, w64, targets = output_layer_case(3)
    loss_fn = pair_loss_fn(torch.zeros(len(SEQUENCE_ROWS), dtype=torch.float64))
    x, w = x64.clone().requires_grad_(), w64.clone()
    loss, logps = linear_sequence_loss(x, w, targets, SEQUENCE_ROWS, 2, loss_fn, 37)
    (dx,) = torch.autograd.grad(loss, x)
    x2, w2 = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    want, want_logps = linear_sequence_loss(x2, w2, targets, SEQUENCE_ROWS, 2, loss_fn, 37)
    want_dx, _ = torch.autograd.grad(want, (x2, w2))
    assert torch.equal(loss, want) and torch.equal(logps, want_logps) and torch.equal(dx, want_dx)
    with torch.no_grad():
        loss, logps = linear_sequence_loss(x2, w2, targets, SEQUENCE_ROWS, 2, loss_fn, 37)
    assert not loss.requires_grad and torch.equal(loss, want) and torch.equal(logps, want_logps)
    empty = x2[:0]
    loss, logps = linear_sequence_loss(empty, w2, targets[:0], [0, 0], 2, loss_fn)
    dx, dw = torch.autograd.grad(loss, (x2, w2), allow_unused=True)
    assert logps.tolist() == [0.0, 0.0] and (dw is None or dw.abs().sum() == 0)
    loss, logps = linear_sequence_loss(empty, w2, targets[:0], [], 2, loss_fn)  # no sequences at all
    assert float(loss) == 0.0 and logps.numel() == 0
    assert sum(SEQUENCE_ROWS) == 300 and len(SEQUENCE_ROWS) == 40
    model, idx, next_tokens = model_and_next_tokens("llama")
    cu = torch.tensor([0, 12, 24], dtype=torch.int32)
    with pytest.raises(ValueError, match="sequence_loss needs targets, cu_seqlens and fused_loss"):
        model(idx, next_tokens, cu, sequence_loss={"documents": [0, 1], "group": 2, "loss_fn": loss_fn})
    model.fused_loss = True
    for bad in ([1, 0], [-1, 1], [0]):  # out of order, negative, a document with targets left out
        with pytest.raises(ValueError, match="increasing indices of cu_seqlens' documents and hold every target"):
            model(idx, next_tokens, cu, sequence_loss={"documents": bad, "group": 1, "loss_fn": loss_fn})
    with pytest.raises(ValueError, match="sequence_loss goes alone"):
        model(idx, next_tokens, cu, per_token=True, sequence_loss={"documents": [0, 1], "group": 2, "loss_fn": loss_fn})
    for rows, group, message in (([150, 149], 2, "summing to the 300 rows"), ([300], 2, "2-sequence groups"),
                                 ([301, -1], 2, "rows >= 0"), ([300], 0, "group must be a positive int")):
        with pytest.raises(ValueError, match=message):
            linear_sequence_loss(x2, w2, targets, rows, group, loss_fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_losses_scale_their_gradients_and_take_no_rows(dtype):
    # The fused losses keep their weight gradient in fp32 across chunks, written by the first chunk
    # and scaled by the incoming gradient in the backward (a slice at a time for 16-bit weights on
    # the CPU): 2.5 x the loss gives 2.5 x the gradients, to one rounding (a factor that is not a
    # power of two, so a missed or doubled scale shows); no rows give a 0 loss and zero gradients.
    from pyllm.nn import linear_cross_entropy, linear_distill, linear_token_logps

    x64, w64, targets = output_layer_case(1)
    x, w = x64.to(dtype), w64.to(dtype)
    teacher = (x64.flip(0).to(dtype), (w64 * 1.5).to(dtype))
    losses = {"ce": lambda x, w, n: linear_cross_entropy(x[:n], w, targets[:n], 37),
              "logps": lambda x, w, n: linear_token_logps(x[:n], w, targets[:n], 37).sum(),
              "distill": lambda x, w, n: linear_distill(x[:n], w, teacher[0][:n], teacher[1], 0.5, 2.0, 37)}
    for name, loss_of in losses.items():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        once = torch.autograd.grad(loss_of(*leaves, 300), leaves)
        scaled = torch.autograd.grad(loss_of(*leaves, 300) * 2.5, leaves)
        for g1, g25 in zip(once, scaled):
            assert g25.dtype == dtype and g1.abs().sum() > 0, name
            want = (g1.double() * 2.5).to(dtype).double()
            # within one rounding of 2.5 x the once-scaled gradient (each is the fp32 sum rounded once)
            assert (g25.double() - want).abs().max() <= (want.abs() * 2 ** -7).max(), name
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        loss = loss_of(*leaves, 0)
        dx, dw = torch.autograd.grad(loss, leaves)
        assert float(loss.detach()) == 0.0 and dx.abs().sum() == 0 and dw.abs().sum() == 0 and not dw.isnan().any(), name


def model_and_next_tokens(name: str):
    """A randomized CONFIGS[name] model, token ids (2, 12) and their next tokens as targets, the
    first 3 of each row -1 (ignored)."""
    cfg = ModelConfig(**CONFIGS[name])
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = idx.roll(-1, dims=1)
    targets[:, :3] = -1
    return model, idx, targets


@pytest.mark.parametrize("name", ["llama", "gqa-untied", "gpt2", "moe", "granite-moe", "softcap"])
def test_per_token_logps_of_the_model(name):
    # forward(..., per_token=True): each target's log-probability, 0 where -1, the same with
    # fused_loss (no logits) to fp64 rounding, gradients too; summed per document by sequence_logps.
    from pyllm.nn import sequence_logps

    model, idx, targets = model_and_next_tokens(name)
    none, logps = model(idx, targets, per_token=True)
    logits = model(idx)[0]
    want = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0] * (targets != -1)
    assert none is None and logps.shape == (2, 12) and rel_err(logps, want) < 1e-14
    cu = torch.tensor([0, 5, 12, 20, 24], dtype=torch.int32)
    params = [p for p in model.parameters()]
    packed = model(idx, targets, cu, per_token=True)[1]
    seq = sequence_logps(packed, cu)
    rows = packed.detach().reshape(-1)
    assert seq.shape == (4,) and rel_err(seq, torch.stack([rows[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])) < 1e-15
    grads = torch.autograd.grad(seq @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=seq.dtype), params)
    model.fused_loss = True
    none, fused = model(idx, targets, cu, per_token=True)
    assert none is None
    fused_seq = sequence_logps(fused, cu)
    assert rel_err(fused_seq, seq) < 1e-14
    for g, f in zip(grads, torch.autograd.grad(fused_seq @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=seq.dtype), params)):
        assert rel_err(f, g) < 1e-12


@pytest.mark.parametrize("name", ["llama", "gqa-untied", "gpt2", "moe", "granite-moe", "softcap"])
def test_fused_loss_gives_the_model_loss_and_gradients(name):
    # LLM.fused_loss: the same loss and gradients (fp64: to rounding), tied or untied output layer,
    # Granite's scaled and Gemma 2's capped logits, no logits returned; with LoRA the frozen output
    # layer takes no gradient.
    model, idx, targets = model_and_next_tokens(name)
    params = [p for p in model.parameters()]
    loss = model(idx, targets)[1]
    grads = torch.autograd.grad(loss, params)
    model.fused_loss = True
    logits, fused = model(idx, targets)
    assert logits is None and rel_err(fused, loss) < 1e-14
    for p, g, f in zip(params, grads, torch.autograd.grad(fused, params)):
        assert rel_err(f, g) < 1e-12
    model.add_lora(2, 4.0)
    assert model(idx, targets)[1].requires_grad and model.lm_head.weight.grad is None


@pytest.mark.parametrize("name", ["llama", "gqa-untied", "moe", "softcap"])
def test_z_loss_of_the_model(name):
    # forward(z_loss=): the mean cross-entropy plus z times the mean over the counted targets of
    # logsumexp(logits)^2, the same with fused_loss (fp64: to rounding), gradients too; the share
    # kept as z_loss_term; 0 is the plain loss, bitwise; asked of a forward without a mean loss, refused.
    model, idx, targets = model_and_next_tokens(name)
    params = [p for p in model.parameters()]
    logits, plain = model(idx, targets)
    assert model.z_loss_term is None
    assert torch.equal(model(idx, targets, z_loss=0.0)[1], plain)
    valid = targets != -1
    want_share = 1e-2 * (torch.logsumexp(logits, -1).square() * valid).sum() / valid.sum()
    loss = model(idx, targets, z_loss=1e-2)[1]
    assert rel_err(loss, plain + want_share) < 1e-14 and rel_err(model.z_loss_term, want_share) < 1e-14
    assert not model.z_loss_term.requires_grad
    grads = torch.autograd.grad(loss, params)
    model.fused_loss = True
    fused = model(idx, targets, z_loss=1e-2)[1]
    assert rel_err(fused, loss) < 1e-14 and rel_err(model.z_loss_term, want_share) < 1e-14
    for g, f in zip(grads, torch.autograd.grad(fused, params)):
        assert rel_err(f, g) < 1e-12
    for kw in (dict(per_token=True), dict(hidden=True)):
        with pytest.raises(ValueError, match="z_loss goes with the mean loss"):
            model(idx, targets, z_loss=1e-2, **kw)
    with pytest.raises(ValueError, match="z_loss goes with the mean loss"):
        model(idx, z_loss=1e-2)


@pytest.mark.parametrize("name", ["llama", "moe", "softcap"])
def test_token_scaling_of_the_model(name, monkeypatch):
    # forward(token_scaling=True), DFT (TRL's SFT loss_type "dft"): the mean over the counted targets
    # of each one's cross-entropy times its probability, held constant, z-loss share scaled alike;
    # the same by the kernel, by torch ops and with fused_loss (fp64: to rounding), gradients too;
    # asked of a forward without a mean loss, refused.
    from pyllm.ops import cross_entropy as ce_ops

    model, idx, targets = model_and_next_tokens(name)
    params = [p for p in model.parameters()]
    logits = model(idx)[0]
    valid = targets != -1
    logp = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    p = logp.detach().exp() * valid
    want = -(logp * p).sum() / valid.sum() + (model.aux_loss if model.aux_loss is not None else 0.0)
    want_grads = torch.autograd.grad(want, params)
    want_share = 1e-2 * (torch.logsumexp(logits.detach(), -1).square() * p).sum() / valid.sum()
    results = []
    for fused, kernel in ((False, True), (False, False), (True, True)):
        model.fused_loss = fused
        with monkeypatch.context() as patch:
            if not kernel:
                patch.setattr(ce_ops, "takes", lambda logits: False)
            loss = model(idx, targets, token_scaling=True)[1]
            results.append((loss, torch.autograd.grad(loss, params)))
            model(idx, targets, token_scaling=True, z_loss=1e-2)
            assert rel_err(model.z_loss_term, want_share) < 1e-13
    for loss, grads in results:
        assert rel_err(loss.detach(), want.detach()) < 1e-13
        for g, g0 in zip(grads, want_grads):
            assert rel_err(g, g0) < 1e-11
    plain = model(idx, targets)[1]
    assert rel_err(plain, results[0][0]) > 1e-3  # (not the NLL)
    for kw in (dict(per_token=True), dict(hidden=True)):
        with pytest.raises(ValueError, match="token_scaling goes with the mean loss"):
            model(idx, targets, token_scaling=True, **kw)


def test_z_loss_compiles_with_the_fused_loss():
    # torch.compile(fullgraph=True) of the fused loss with z_loss (the autograd function's second,
    # non-differentiable output, kept on the module): eager's loss, share and gradients.
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=128, n_layers=1, n_heads=2, dim=32, block_size=16))
    model.fused_loss = True
    x = torch.randint(0, 128, (2, 16))
    eager = model(x, x, z_loss=1e-3)[1]
    share = model.z_loss_term
    grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(x, x, z_loss=1e-3)[1]
    assert float(compiled.detach()) == pytest.approx(float(eager), rel=1e-6)
    assert float(model.z_loss_term) == pytest.approx(float(share), rel=1e-6)
    for g, c in zip(grads, torch.autograd.grad(compiled, list(model.parameters()))):
        torch.testing.assert_close(c, g, rtol=1e-5, atol=1e-7)


@fused_loss_grid
def test_linear_cross_entropy_token_stats_match_float64(device, dtype, chunk_rows, shape, step, monkeypatch):
    # return_token_stats (TRL's SFT metrics from the fused loss's own pass over each chunk): the
    # entropies within twice torch's own error (its fp32 softmax of the logits in that dtype)
    # against float64, the argmax hits those of torch.argmax on the same logits, reduced as the
    # loss ("sum", "mean", "none"); the loss and gradients are the same as without them. With
    # return_predicted_tokens (Liger's) also each row's argmax itself, -1 where ignored.
    from pyllm.nn import linear_cross_entropy

    softmax_step(monkeypatch, step)
    call = LOGIT_SHAPES[shape]
    x64, w64, targets = output_layer_case(0)
    x, w = x64.to(device, dtype), w64.to(device, dtype)
    targets[1::3] = shaped_logits(x @ w.t(), **call).argmax(dim=-1).cpu()[1::3]  # a third of the rows hit
    targets[::7] = -1
    counted = targets != -1

    def stats_of(z):  # (entropy, argmax hit) per row, 0 where ignored
        logp = torch.log_softmax(z, dim=-1)
        return (-(logp.exp() * logp).sum(dim=-1) * counted.to(z.device),
                ((z.argmax(dim=-1).cpu() == targets) & counted).double())

    exact = stats_of(shaped_logits(x64 @ w64.t(), **call))
    theirs = stats_of(shaped_logits(x @ w.t(), **call))
    argmax = shaped_logits(x @ w.t(), **call).argmax(dim=-1).cpu()
    for reduction in ("sum", "mean", "none"):
        xg, wg = (t.clone().requires_grad_() for t in (x, w))
        out = linear_cross_entropy(xg, wg, targets.to(device), chunk_rows, **call, reduction=reduction,
                                   return_token_stats=True)
        plain = linear_cross_entropy(x.clone().requires_grad_(), w.clone().requires_grad_(), targets.to(device),
                                     chunk_rows, **call, reduction=reduction)
        assert torch.equal(out.loss.detach(), plain.detach()) and not out.entropy.requires_grad
        reduce = {"sum": lambda t: t.sum(), "mean": lambda t: t.sum() / counted.sum(), "none": lambda t: t}[reduction]
        assert rel_err(out.entropy, reduce(exact[0])) <= tolerance(reduce(theirs[0]), reduce(exact[0]))
        # (exactly the same hits: "mean" rounds its fp32 division once)
        torch.testing.assert_close(out.token_accuracy.cpu().double(), reduce(theirs[1]), rtol=2 ** -24, atol=0)
        predicted = linear_cross_entropy(x, w, targets.to(device), chunk_rows, **call, reduction=reduction,
                                         return_predicted_tokens=True)
        assert torch.equal(predicted.loss, plain.detach()) and torch.equal(predicted.entropy, out.entropy)
        assert torch.equal(predicted.predicted_tokens.cpu(), torch.where(counted, argmax, -1))
    assert 40 < theirs[1].sum() <= 100


@pytest.mark.parametrize("step", ["kernel", "torch-ops"])
@pytest.mark.parametrize("shape", ["plain", "scaled-capped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_token_logps_token_stats(dtype, shape, step, monkeypatch):
    # linear_token_logps(return_token_stats=True) (GRPO's entropy, with the frozen head's Jacobian
    # path too): each row's entropy and mean logit within twice torch's own error against float64
    # and its argmax hit torch.argmax's on the same logits, 0 / False where ignored; the
    # log-probabilities and gradients the same as without them.
    from pyllm.nn import linear_token_logps

    softmax_step(monkeypatch, step)
    call = LOGIT_SHAPES[shape]
    x64, w64, targets = output_layer_case(1)
    x, w = x64.to(dtype), w64.to(dtype)
    targets[1::3] = shaped_logits(x @ w.t(), **call).argmax(dim=-1)[1::3]
    targets[::7] = -1
    counted = targets != -1

    def entropy_of(z):
        logp = torch.log_softmax(z, dim=-1)
        return -(logp.exp() * logp).sum(dim=-1) * counted

    theirs = shaped_logits(x @ w.t(), **call)
    for frozen_head in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_(not frozen_head)
        out = linear_token_logps(xg, wg, targets, 37, **call, return_token_stats=True)
        x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_(not frozen_head)
        plain = linear_token_logps(x2, w2, targets, 37, **call)
        assert torch.equal(out.logps.detach(), plain.detach()) and not out.entropy.requires_grad
        exact = entropy_of(shaped_logits(x64 @ w64.t(), **call))
        assert rel_err(out.entropy, exact) <= tolerance(entropy_of(theirs), exact)
        assert torch.equal(out.is_top1, (theirs.argmax(dim=-1) == targets) & counted) and out.is_top1.sum() >= 40
        exact_mean = shaped_logits(x64 @ w64.t(), **call).mean(dim=-1) * counted
        assert rel_err(out.mean_logit, exact_mean) <= tolerance(theirs.float().mean(dim=-1) * counted, exact_mean)
        out.logps.sum().backward()
        plain.sum().backward()
        assert torch.equal(xg.grad, x2.grad)


def test_model_token_stats_agree_on_every_loss_path():
    # LLM.forward(token_stats=True): the entropy sum, argmax hits and counted targets of its targets,
    # the same from the logits, the fused loss, the per-token paths, fused or not, and the fused
    # sequence loss (to fp32 rounding), those of a float64 computation from the model's logits,
    # compiled too; and each target's entropy, hit and mean logit (token_stats_rows, 0s where
    # ignored) but after the fused mean loss; refused where no such loss is made. At a temperature
    # (GRPO's per-token path) those of logits / temperature.
    torch.manual_seed(0)
    model = LLM(ModelConfig(**SMALL))
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :5] = -1
    with torch.no_grad():
        logits = model.double()(idx)[0]
        model.float()
    hit = logits.argmax(dim=-1) == targets
    targets[1, ::2] = torch.where(hit[1, ::2], targets[1, ::2], logits.argmax(dim=-1)[1, ::2])  # some hits
    logp = torch.log_softmax(logits, dim=-1)
    counted = targets != -1
    want_rows = torch.stack([-(logp.exp() * logp).sum(-1), (logits.argmax(-1) == targets).double(),
                             logits.mean(-1)], dim=-1) * counted[..., None]  # (B, T, 3)
    want = torch.stack([want_rows[..., 0].sum(), want_rows[..., 1].sum(), counted.sum().double()])
    got = {}
    pairs = {"cu_seqlens": torch.tensor([0, 16, 32], dtype=torch.int32),
             "sequence_loss": {"documents": [0, 1], "group": 2, "loss_fn": lambda logps, d0, d1: logps.sum()}}
    for name, fused, kw in (("logits", False, {}), ("fused", True, {}), ("per_token", False, {"per_token": True}),
                            ("fused per_token", True, {"per_token": True}), ("z_loss", True, {"z_loss": 1e-3}),
                            ("sequence_loss", True, pairs)):
        model.fused_loss = fused
        model(idx, targets, token_stats=True, **kw)
        got[name] = model.token_stats_term
        assert got[name].dtype == torch.float32 and rel_err(got[name], want) < 1e-6, name
        assert got[name][1] == want[1] and want[1] >= 4
        rows = model.token_stats_rows
        if name in ("fused", "z_loss"):  # (linear_cross_entropy sums them in its pass)
            assert rows is None
        else:
            assert rows.dtype == torch.float32 and rows.shape == (2, 16, 3), name
            for k in (0, 2):
                assert rel_err(rows[..., k], want_rows[..., k]) < 1e-6, (name, k)
            assert torch.equal(rows[..., 1].double(), want_rows[..., 1]) and not rows[~counted].any()
    model(idx, targets)
    assert model.token_stats_term is None and model.token_stats_rows is None
    for fused in (False, True):
        model.fused_loss = fused
        torch._dynamo.reset()
        torch.compile(model, fullgraph=True)(idx, targets, token_stats=True)
        torch.testing.assert_close(model.token_stats_term, got["logits"], rtol=1e-5, atol=1e-5)
        if not fused:
            torch.testing.assert_close(model.token_stats_rows, want_rows.float(), rtol=1e-5, atol=1e-5)
    logits_t = logits / 0.7
    logp_t = torch.log_softmax(logits_t, dim=-1)
    want_t = (-(logp_t.exp() * logp_t).sum(-1) * counted).sum()
    for fused in (False, True):
        model.fused_loss = fused
        model(idx, targets, per_token=True, temperature=0.7, token_stats=True)
        assert rel_err(model.token_stats_term[0], want_t) < 1e-6 and model.token_stats_term[1] == want[1]
    model.fused_loss = True
    for kw in ({}, {"hidden": True}):
        with pytest.raises(ValueError, match="token_stats goes with the loss, per_token"):
            model(idx, None if not kw else targets, token_stats=True, **kw)


def test_lora_disabled_is_the_base_model():
    # LLM.lora_disabled: inside, the frozen base model's logits bitwise (DPO's lora-off reference);
    # after, the updates again.
    torch.manual_seed(0)
    model = randomized(ModelConfig(**CONFIGS["gqa-untied"]))
    idx = torch.randint(0, 97, (2, 9))
    base = model(idx)[0]
    model.add_lora(2, 4.0, targets="q,v,down")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
    adapted = model(idx)[0]
    assert not torch.equal(adapted, base)
    with model.lora_disabled():
        assert torch.equal(model(idx)[0], base)
    assert torch.equal(model(idx)[0], adapted)


def test_lora_under_compile_and_bf16_autocast():
    # torch.compile(fullgraph=True) traces LoRALinear with its weights held in bf16 (frozen_dtype), as a
    # bf16 LoRA run trains, per-projection updates inside the fused layers and the fused loss: the same loss as eager to float rounding, the updates' gradients there.
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=128, n_layers=2, n_heads=2, dim=64, block_size=32))
    model.add_lora(2, 4.0, torch.bfloat16, targets="q,v,gate,down")  # per-projection: the fused layers' block B
    model.fused_loss = True  # and the loss by linear_cross_entropy
    x = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x, x)[1]
        loss = torch.compile(model, fullgraph=True)(x, x)[1]
    loss.backward()
    assert float(loss) == pytest.approx(float(eager), rel=1e-3)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_counts():
    model = LLM(ModelConfig(**CONFIGS["gpt2"]))
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=True) == n - 32 * 128
    cfg = model.config
    assert model.flops_per_token() == 6 * (n - 32 * 128) + 12 * cfg.n_layers * cfg.dim * cfg.block_size
    assert LLM(ModelConfig.from_preset("gpt2-124m")).num_params() / 1e6 == pytest.approx(124.5, abs=0.5)
    # attention FLOPs: n_heads * head_dim wide, over at most sliding_window keys in windowed layers
    cfg = ModelConfig(**CONFIGS["qk-norm-window-nope"])
    model = LLM(cfg)
    assert model.flops_per_token(20) == 6 * model.num_params(non_embedding=True) + 12 * 4 * 64 * (20 + 5)
    # packed documents: each token's keys are its own document's
    for lengths in ([20], [3], [20, 3, 7]):
        assert model.flops_of_documents(lengths) == sum(n * model.flops_per_token(n) for n in lengths)
    assert model.flops_of_documents([10, 10]) < 20 * model.flops_per_token(20)
    # the output layer at 12 of the 30 tokens only (packed conversations' trained tokens)
    assert model.flops_of_documents([20, 3, 7], output_tokens=12) == \
        model.flops_of_documents([20, 3, 7]) - 6 * cfg.vocab_size * cfg.dim * 18
    # a pass without backward (KTO's KL documents): a third of the work, 2 FLOPs per output weight and token
    assert 3 * model.flops_of_documents([20, 3, 7], forward_only=True) == model.flops_of_documents([20, 3, 7])
    assert model.flops_of_documents([20, 3, 7], output_tokens=12, forward_only=True) == \
        model.flops_of_documents([20, 3, 7], forward_only=True) - 2 * cfg.vocab_size * cfg.dim * 18
    # LoRA: no weight gradients for the frozen weights (4 FLOPs each, not 6), 6 for the updates
    attention = model.flops_per_token(20) - 6 * model.num_params(non_embedding=True)
    frozen = model.num_params(non_embedding=True)
    model.add_lora(2, 4.0)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.flops_per_token(20) == 4 * frozen + 6 * lora + attention
    assert model.flops_of_documents([20], forward_only=True) == 20 * (2 * (frozen + lora) + attention / 3)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset):
    cfg = ModelConfig.from_preset(preset, n_layers=1)
    assert cfg.n_layers == 1 and cfg.dim % cfg.n_heads == 0 and cfg.head_dim == cfg.dim // cfg.n_heads


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=30, n_heads=4), "n_heads .4. must divide dim .30."),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads .3. must divide n_heads .4."),
    (dict(norm="batchnorm"), "norm must be one of rmsnorm, layernorm"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(positions="sinusoidal"), "positions must be one of"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(head_dim=31), "rope needs an even head dim, got 31"),
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(sliding_window=4, window_layers=[2]), r"window_layers must be None or a list of layer indices in \[0, 2\)"),
    (dict(window_layers=[0]), "window_layers needs a sliding_window"),
    (dict(nope_layers=[0], positions="learned"), "nope_layers needs positions = 'rope'"),
    (dict(rotary_dim=3), "rotary_dim must be None or an even int"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "attention_factor": 1.0,
                        "original_max_position_embeddings": 16}), "one number per rotated pair .16."),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling must be None"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.1,
                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": 1}), "truncate must be a bool"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 0.0,
                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}), "attention_factor must be positive"),
    (dict(pre_norm=False), "pre_norm=False needs sandwich_norm=True"),
    (dict(qk_norm_all_heads=True), "qk_norm_all_heads needs qk_norm=True"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **kwargs})


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*tiny"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig field.*n_layer"):
        ModelConfig.from_preset("tiny", n_layer=3)


def test_too_long_sequence():
    model = LLM(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="longer than block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --- Hugging Face checkpoints ----------------------------------------------------------------------

def hf_models():
    transformers = pytest.importorskip("transformers")
    llama = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, rms_norm_eps=1e-5)
    return {
        "llama-gqa": transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, num_key_value_heads=2, rope_theta=500.0)),
        "llama-tied": transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, tie_word_embeddings=True)),
        # head dim 16: wavelengths 6.3, 20, 63, 199, ... against 32 / 4 and 32 / 1: every branch of the rule
        "llama3-rope": transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),
        # YaRN as Qwen2.5's model card adds it (factor 4 over a 256-token original context: head dim
        # 16's pairs 0 kept, 1-3 blended, 4-7 interpolated; the context becomes 1024)
        "qwen2-yarn": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **llama, num_key_value_heads=2, rope_theta=1e4, rope_scaling=dict(
                rope_type="yarn", factor=4.0, original_max_position_embeddings=256))),
        # DeepSeek's form: the cos / sin scale from mscale / mscale_all_dim, the ramp's ends not rounded
        "llama-yarn": transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, rope_scaling=dict(
            rope_type="yarn", factor=8.0, original_max_position_embeddings=512, mscale=0.8, mscale_all_dim=1.0,
            beta_fast=16.0, beta_slow=2.0, truncate=False))),
        # q, k, v biases; real checkpoints set sliding_window with use_sliding_window false
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **llama, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, sliding_window=4096,
            use_sliding_window=False)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2,
                                                                     n_head=4)),
        # Head dims 32 run pyllm's kernels (fp64 on the CPU), 16 torch's SDPA: windows through both.
        # q / k norms, 4 heads x 32 = 128 wide against a 64-wide model, 6-key windows in layer 1 only
        "qwen3-window": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **llama, head_dim=32, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
            use_sliding_window=True, sliding_window=6, max_window_layers=1)),
        "qwen3": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**llama, head_dim=32, num_key_value_heads=1)),
        # Mistral's window is in every layer: 4 keys; head dim 16 (SDPA with a mask)
        "mistral-window": transformers.MistralForCausalLM(transformers.MistralConfig(
            **llama, num_key_value_heads=2, sliding_window=4)),
        # layer 1 without RoPE and with a 5-key window (SmolLM3's pairing), layer 0 full with RoPE
        "smollm3": transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
            **llama, head_dim=32, num_key_value_heads=2, no_rope_layer_interval=2, use_sliding_window=True,
            sliding_window=5, pad_token_id=None)),
        # q, k, v and gate, up fused in the checkpoint; LongRoPE (its short factors up to 16 positions,
        # long ones past: the 19-token logits and a generation crossing 16) on half of each 32-wide
        # head (Phi-4-mini's partial rotary); a 6-key window in every layer
        "phi3-longrope": transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **PHI3, original_max_position_embeddings=16, sliding_window=6, rope_parameters=dict(
                rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                short_factor=[1.0, 1.1, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
                long_factor=[2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0]))),
        "phi3": transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3, tie_word_embeddings=True)),
        # scaled embeddings, sandwich norms with (1 + w) weights, q / k norms, GeGLU, MQA with a 32-wide head in
        # a 64-wide model, softmax scale 24 ** -0.5, 5-key windows in layers 0 and 2 with their own RoPE theta,
        # linear RoPE scaling in the full layer
        "olmo2": transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
            **llama, num_key_value_heads=2, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
        "gemma3": transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=24,
            pad_token_id=None, bos_token_id=None, eos_token_id=None,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}})),
        # Gemma 3 with Gemma 2's caps (null in Gemma 3's checkpoints; had been refused): transformers caps its
        # logits (3, low enough to bind) and leaves attn_logit_softcapping unread, as pyllm does (a warning says)
        "gemma3-capped": transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=24,
            pad_token_id=None, bos_token_id=None, eos_token_id=None, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0, **HF_GEMMA2_ATTENTION)),
        # Gemma 3's layout without q / k norms, capped attention scores and logits (caps low enough to
        # bind on these random weights' scores), 5-key windows in layers 0 and 2 (its default pattern),
        # GQA with a 32-wide head in a 64-wide model, softmax scale 24 ** -0.5 (eager attention: see
        # HF_GEMMA2_ATTENTION)
        "gemma2": transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=None, bos_token_id=None,
            eos_token_id=None, **HF_GEMMA2_ATTENTION)),
        # Mixtures of experts (transformers' eager experts: its grouped_mm takes no fp64): 4 experts, 2 per
        # token (renormalized), a 6-key window in every layer
        "mixtral": transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **llama, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
            experts_implementation="eager")),
        # Qwen3-MoE-30B's routing (norm_topk_prob), experts of moe_intermediate_size, per-head q / k norms
        "qwen3-moe": transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **llama, head_dim=32, num_key_value_heads=2, num_experts=5, num_experts_per_tok=3,
            moe_intermediate_size=48, norm_topk_prob=True, experts_implementation="eager")),
        # Qwen2-MoE's (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): a gated shared expert, q / k / v biases
        "qwen2-moe": transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **llama, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
            shared_expert_intermediate_size=80, experts_implementation="eager")),
        # IBM Granite 3's scalars: embeddings x 12, sublayer outputs x 0.22, logits / 8, softmax scale 1/64
        "granite": transformers.GraniteForCausalLM(transformers.GraniteConfig(
            **llama, num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
            attention_multiplier=0.015625, tie_word_embeddings=True)),
        "granitemoe": transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
            **llama, num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
            attention_multiplier=0.015625, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager")),
        # OLMoE's: the chosen experts' weights not renormalized, q / k norms over all heads
        "olmoe": transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **llama, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=None,
            bos_token_id=None, eos_token_id=None, experts_implementation="eager")),
    }


# Phi3Config's default token ids lie past a 97-id vocabulary.
PHI3 = dict(vocab_size=97, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
            eos_token_id=None)
HF_EAGER_EXPERTS = dict(experts_implementation="eager")  # transformers' default grouped_mm takes no fp64
# transformers up to 5.20 (the last release for Python 3.10) ran Gemma 2 on SDPA by default, which drops its
# attention softcap; later releases refuse SDPA for it and take eager, as the tests' Gemma 2 does everywhere
HF_GEMMA2_ATTENTION = dict(attn_implementation="eager")
HF_NAMES = ["llama-gqa", "llama-tied", "llama3-rope", "qwen2-yarn", "llama-yarn", "qwen2", "gpt2", "qwen3-window", "qwen3", "mistral-window", "smollm3",
            "phi3-longrope", "phi3", "gemma3", "gemma3-capped", "gemma2", "olmo2", "mixtral", "qwen3-moe", "olmoe",
            "qwen2-moe", "granite", "granitemoe"]


@pytest.mark.parametrize("name", HF_NAMES)
def test_from_hf_computes_what_transformers_computes(name, tmp_path):
    theirs = hf_models()[name].double().eval()
    with torch.no_grad():  # past the 0.02-std init, so that every weight matters
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path, max_shard_size="50KB")  # shards and their index.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = LLM.from_hf(tmp_path, dtype=torch.float64)
    assert not [w for w in caught if "not used" in str(w.message)]  # every tensor found its place
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        expected = theirs(idx).logits
    # transformers' LLaMA computes RoPE's angles in fp32 even in an fp64 model (~1e-7 relative);
    # a wrong mapping (q / k order, gate / up, a transpose) would be off by O(1).
    assert rel_err(ours(idx)[0], expected) < (1e-10 if name == "gpt2" else 1e-6)
    prompt = idx[:, :5]
    theirs.generation_config.eos_token_id = None  # no early stop, no padding: 20 greedy tokens each
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), expected)


def perturbed_llama(tmp_path):
    """transformers' small GQA LLaMA in fp64, its weights moved off their init (ties broken), saved in
    tmp_path, and pyllm's LLM of that folder: (theirs, ours)."""
    theirs = hf_models()["llama-gqa"].double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    return theirs, LLM.from_hf(tmp_path, dtype=torch.float64)


@pytest.mark.parametrize("penalty", [1.8, 0.6])
def test_repetition_penalty_and_min_p_generate_transformers_tokens(penalty, tmp_path):
    # transformers' generate(repetition_penalty=, min_p=) on the same model: greedy tokens, sampled
    # tokens from one seed of the global generator (one multinomial draw a token there and here, over
    # the same fp32 probabilities), generate_batch's rows of different lengths as each prompt alone,
    # and speculative decoding's greedy tokens (its draft's proposals penalized after the ones before)
    theirs, ours = perturbed_llama(tmp_path)
    theirs.generation_config.eos_token_id = None
    prompt = torch.randint(0, 97, (2, 6))

    def reference(ids, **settings):
        return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, pad_token_id=0,
                               repetition_penalty=penalty, **settings)[:, ids.shape[1]:]

    greedy = reference(prompt, do_sample=False)
    assert torch.equal(ours.generate(prompt, 16, temperature=0, repetition_penalty=penalty)[:, 6:], greedy)
    assert not torch.equal(ours.generate(prompt, 16, temperature=0)[:, 6:], greedy)  # (the penalty matters)
    for seed in range(3):
        torch.manual_seed(seed)
        want = reference(prompt, do_sample=True, temperature=0.9, top_k=30, top_p=0.95, min_p=0.05)
        torch.manual_seed(seed)
        got = ours.generate(prompt, 16, 0.9, 30, 0.95, min_p=0.05, repetition_penalty=penalty)[:, 6:]
        assert torch.equal(got, want)
    rows = [prompt[0], prompt[1, :3], prompt[0, 2:]]
    alone = [reference(r[None], do_sample=False)[0].tolist() for r in rows]
    assert ours.generate_batch(rows, 16, 0.0, repetition_penalty=penalty) == alone
    draft = LLM.from_hf(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # (some proposals rejected)
    stats = {}
    spoken = ours.generate_speculative(prompt[:1], draft, 16, temperature=0, draft_tokens=3, stats=stats,
                                       repetition_penalty=penalty)
    assert [int(t) for t in spoken] == greedy[0].tolist()
    assert 0 < stats["accepted"] < stats["drafted"]
    # sampling with the model as its own draft: each proposal's distribution is the check's, the
    # penalty of the proposals before it counted alike, so every proposal is kept
    stats = {}
    spoken = ours.generate_speculative(prompt[:1], ours, 16, 0.9, min_p=0.05, draft_tokens=4, stats=stats,
                                       repetition_penalty=penalty, generator=torch.Generator().manual_seed(0))
    assert len(list(spoken)) == 16 and stats["accepted"] == stats["drafted"] > 0


def test_no_repeat_ngram_and_min_new_tokens_generate_transformers_tokens(tmp_path):
    # transformers' generate(no_repeat_ngram_size=, min_new_tokens=) on the same model: greedy and
    # seeded sampled tokens (with repetition_penalty: its order before the n-gram ban), generate_batch's
    # rows of different lengths as each prompt alone, speculative decoding's greedy tokens (each
    # proposal ruled after the ones before it) and, with the model as its own draft, every proposal kept
    theirs, ours = perturbed_llama(tmp_path)
    prompt = torch.randint(0, 97, (2, 6))

    def reference(ids, eos=None, **settings):
        theirs.generation_config.eos_token_id = eos
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, pad_token_id=0,
                              **settings)[:, ids.shape[1]:]
        return [until_stop(row, {eos}) for row in out.tolist()]  # (a finished row's padding left out)

    for n in (1, 2, 3):
        greedy = reference(prompt, do_sample=False, no_repeat_ngram_size=n)
        assert ours.generate(prompt, 24, temperature=0, no_repeat_ngram_size=n)[:, 6:].tolist() == greedy
        assert ours.generate(prompt, 24, temperature=0)[:, 6:].tolist() != greedy  # (the ban matters)
        torch.manual_seed(n)
        want = reference(prompt, do_sample=True, temperature=0.9, top_k=30, no_repeat_ngram_size=n,
                         repetition_penalty=1.3)
        torch.manual_seed(n)
        got = ours.generate(prompt, 24, 0.9, 30, no_repeat_ngram_size=n, repetition_penalty=1.3)[:, 6:]
        assert got.tolist() == want
    eos = int(ours.generate(prompt[:1], 3, temperature=0)[0, -1])  # a token greedy decoding says early
    assert eos in ours.generate(prompt[:1], 24, temperature=0)[0, 6:9].tolist()
    want = reference(prompt, eos, do_sample=False, min_new_tokens=10)
    got = ours.generate(prompt, 24, temperature=0, min_new_tokens=10, stop_tokens=eos)[:, 6:].tolist()
    assert [until_stop(row, {eos}) for row in got] == want and eos not in want[0][:10]
    rows = [prompt[0], prompt[1, :3], prompt[0, 2:]]
    alone = [reference(r[None], eos, do_sample=False, no_repeat_ngram_size=2, min_new_tokens=8)[0] for r in rows]
    assert ours.generate_batch(rows, 24, 0.0, stop_tokens=eos, no_repeat_ngram_size=2, min_new_tokens=8) == alone
    draft = LLM.from_hf(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # (some proposals rejected)
    for rules in (dict(no_repeat_ngram_size=2),
                  dict(min_new_tokens=12, no_repeat_ngram_size=1, repetition_penalty=1.2, stop_tokens=eos)):
        stats = {}
        spoken = ours.generate_speculative(prompt[:1], draft, 20, temperature=0, draft_tokens=3, stats=stats, **rules)
        assert [int(t) for t in spoken] == ours.generate(prompt[:1], 20, temperature=0, **rules)[0, 6:].tolist()
        assert 0 < stats["accepted"] < stats["drafted"]
        stats = {}
        spoken = ours.generate_speculative(prompt[:1], ours, 20, 0.9, draft_tokens=4, stats=stats,
                                           generator=torch.Generator().manual_seed(0), **rules)
        assert len(list(spoken)) == 20 and stats["accepted"] == stats["drafted"] > 0
    for bad in (dict(no_repeat_ngram_size=-1), dict(min_new_tokens=2.0), dict(no_repeat_ngram_size=True)):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            ours.generate(prompt, 4, **bad)


def test_typical_epsilon_and_eta_sampling_are_transformers_warpers(tmp_path):
    # sampling_probs with typical_p / epsilon_cutoff / eta_cutoff after temperature, top-k, top-p and
    # min-p: bitwise the probabilities of transformers' warpers in its order, over random logits of
    # random spreads; generate's seeded sampled tokens those of transformers' generate, the batch too
    from transformers.generation.logits_process import (EpsilonLogitsWarper, EtaLogitsWarper, LogitsProcessorList,
                                                        MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper, TypicalLogitsWarper)

    from pyllm.model import sampling_probs

    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        V = int(torch.randint(2, 300, (), generator=g))
        logits = torch.randn(3, V, generator=g) * float(torch.rand((), generator=g) * 6)
        T, k = float(torch.rand((), generator=g) + 0.3), int(torch.randint(0, V + 3, (), generator=g))
        p = float(torch.rand((), generator=g) * 0.9 + 0.1) if trial % 4 else None
        mp = 0.05 if trial % 5 == 0 else None
        typical = float(torch.rand((), generator=g) * 0.99 + 0.005) if trial % 2 else None
        eps = float(torch.rand((), generator=g) * 0.2) if trial % 3 == 1 else 0.0
        eta = float(torch.rand((), generator=g) * 0.2) if trial % 3 == 2 else 0.0
        warpers = [TemperatureLogitsWarper(T)] + ([TopKLogitsWarper(k)] if k else []) + (
            [TopPLogitsWarper(p)] if p is not None else []) + ([MinPLogitsWarper(mp)] if mp else []) + (
            [TypicalLogitsWarper(typical)] if typical else []) + ([EpsilonLogitsWarper(eps)] if eps else []) + (
            [EtaLogitsWarper(eta)] if eta else [])
        want = LogitsProcessorList(warpers)(None, logits.clone()).softmax(-1)
        got = sampling_probs(logits, T, k, p, mp, typical_p=typical, epsilon_cutoff=eps, eta_cutoff=eta)
        assert torch.equal(got, want), trial
    theirs, ours = perturbed_llama(tmp_path)
    theirs.generation_config.eos_token_id = None
    prompt = torch.randint(0, 97, (2, 6))
    for seed, cut in enumerate((dict(typical_p=0.6), dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.01, top_k=20))):
        torch.manual_seed(seed)
        want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, pad_token_id=0,
                               do_sample=True, temperature=0.9, **{"top_k": 0, **cut})[:, 6:]
        torch.manual_seed(seed)
        got = ours.generate(prompt, 12, 0.9, **cut)[:, 6:]
        assert torch.equal(got, want), cut
    with pytest.raises(ValueError, match="typical_p must be None or a number in"):
        ours.generate(prompt, 2, typical_p=0.0)
    with pytest.raises(ValueError, match="eta_cutoff must be a number in"):
        ours.generate(prompt, 2, eta_cutoff=1.0)


def test_min_new_tokens_with_stop_tokens_given_as_an_iterator():
    # stop_tokens is an Iterable: an iterator's ids had been read for the stop and found empty for
    # min_new_tokens (the second read), which then banned nothing: the stop token came at once
    torch.manual_seed(0)
    model = randomized(ModelConfig(**CONFIGS["llama"]))
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    eos = int(model.generate(prompt, 1, temperature=0)[0, -1])  # greedy's first token: the stop
    assert model.generate(prompt, 6, temperature=0, stop_tokens=iter([eos]))[0, 5:].tolist() == [eos]
    for stops in ([eos], iter([eos]), (t for t in [eos])):
        got = model.generate(prompt, 6, temperature=0, min_new_tokens=4, stop_tokens=stops)[0, 5:].tolist()
        assert eos not in got[:4], stops
    for stops in ([eos], iter([eos])):
        got = model.generate_batch([prompt[0]], 6, 0.0, min_new_tokens=4, stop_tokens=stops)[0]
        assert len(got) >= 5 and eos not in got[:4], stops


def test_to_hf_of_a_fine_tune_that_set_its_training_fields(tmp_path):
    # dropout and router_aux_loss_coef set for training (set_training_options) are no part of the
    # function written: the source's config.json still describes the model (export had refused it)
    from dataclasses import replace

    theirs = hf_models()["llama-gqa"]
    theirs.save_pretrained(tmp_path / "src")
    ours = LLM.from_hf(tmp_path / "src")
    ours.set_training_options(dropout=0.1, router_aux_loss_coef=0.02)
    ours.to_hf(tmp_path / "out", json.loads((tmp_path / "src/config.json").read_text()))
    assert replace(LLM.from_hf(tmp_path / "out").config, dropout=0.1, router_aux_loss_coef=0.02) == ours.config


def test_from_hf_warns_of_tensors_it_leaves_out_as_transformers_does(tmp_path):
    """A tensor the config has no place for (an o_proj bias beside attention_bias false) is left out,
    as transformers leaves it out, but said; buffers older checkpoints saved are left out silently."""
    from safetensors.torch import load_file, save_file

    theirs = hf_models()["llama-gqa"].double().eval()
    theirs.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.randn(theirs.config.hidden_size, dtype=torch.float64)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(4, dtype=torch.float64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"^1 tensors of the checkpoint are not used .*layers\.0\.self_attn\.o_proj\.bias \(") as caught:
        ours = LLM.from_hf(tmp_path, dtype=torch.float64)
    assert not [w for w in caught if "inv_freq" in str(w.message)]
    again = type(theirs).from_pretrained(tmp_path, torch_dtype=torch.float64).eval()  # transformers: the same function
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], again(idx).logits) < 1e-6
    # GPT-2's saved causal mask and masked-score constant (h.N.attn.bias, h.N.attn.masked_bias).
    gpt2 = tmp_path / "gpt2"
    hf_models()["gpt2"].save_pretrained(gpt2)
    weights = load_file(gpt2 / "model.safetensors")
    weights["h.0.attn.bias"], weights["h.0.attn.masked_bias"] = torch.ones(1, 1, 8, 8), torch.tensor(-1e4)
    save_file(weights, gpt2 / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLM.from_hf(gpt2)


@pytest.mark.parametrize("kind, flags", [("llama", dict(partial_rotary_factor=0.5)),
                                         ("granite", dict(partial_rotary_factor=0.5)),
                                         ("qwen2", dict(attention_bias=True)), ("mistral", dict(mlp_bias=True)),
                                         ("llama", dict(hidden_act="swish")),
                                         ("mixtral", dict(moe_intermediate_size=24))])
def test_from_hf_takes_flags_as_transformers_reads_them(kind, flags, tmp_path):
    # Flags transformers' class of that kind does not read (a partial_rotary_factor outside Phi-3:
    # the whole head is rotated; Qwen2's attention_bias, Mistral's mlp_bias) or reads as SiLU ("swish")
    # load as transformers computes them (an architecture audit, 2026-12-06: pyllm had rotated half of
    # each head, logits 50-100% off; the others had been refused, Mixtral's experts sized by Qwen's key).
    import transformers

    config = transformers.AutoConfig.for_model(kind, vocab_size=64, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64, **flags)
    dtype = torch.float32 if kind == "mixtral" else torch.float64  # (transformers' grouped_mm takes no fp64)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.normal_(1.0, 0.3)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = LLM.from_hf(tmp_path, dtype=dtype)
    assert any("partial_rotary_factor" in str(w.message) for w in caught) == ("partial_rotary_factor" in flags)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], theirs(idx).logits) < (1e-6 if dtype == torch.float64 else 1e-5)  # (RoPE: fp32)


@pytest.mark.parametrize("kind, key", [("qwen3", "head_dim"), ("gpt2", "layer_norm_epsilon"),
                                       ("qwen3_moe", "moe_intermediate_size")])
def test_from_hf_takes_transformers_defaults_of_a_trimmed_config(kind, key, tmp_path):
    # config.json without a field takes the config class's default: Qwen3's head_dim is 128, not
    # hidden / heads (had been refused on the shapes); GPT-2's layer_norm_epsilon 1e-5 (had been
    # refused); Qwen3-MoE's experts 768 wide, not intermediate_size
    import transformers

    sizes = dict(n_embd=64, n_layer=1, n_head=4, n_positions=32) if kind == "gpt2" else dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    if kind == "qwen3_moe":
        sizes.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768)
    config = transformers.AutoConfig.for_model(kind, vocab_size=64, **sizes)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    trimmed = json.loads((tmp_path / "config.json").read_text())
    del trimmed[key]
    (tmp_path / "config.json").write_text(json.dumps(trimmed))
    dtype = torch.float32 if kind == "qwen3_moe" else torch.float64  # (transformers' grouped_mm takes no fp64)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    ours = LLM.from_hf(tmp_path, dtype=dtype)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], theirs(idx).logits) < (1e-6 if dtype == torch.float64 else 1e-5)


def test_from_hf_names_a_tensor_the_checkpoint_lacks(tmp_path):
    # a Qwen2 checkpoint without its k_proj bias had failed on a bare KeyError of a prefix-stripped name
    from safetensors.torch import load_file, save_file

    import transformers

    config = transformers.AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the checkpoint has no tensor 'layers.0.self_attn.k_proj.bias'"):
        LLM.from_hf(tmp_path)


def test_from_hf_refuses_what_it_cannot_compute(tmp_path):
    from pyllm.model import config_from_hf

    base = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    for extra, message in [(dict(attention_bias=True), "attention_bias"), (dict(sliding_window=4096), "sliding_window"),
                           (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
                           (dict(mlp_bias=True), "mlp_bias"), (dict(hidden_act="gelu"), "hidden_act"),
                           (dict(partial_rotary_factor=0.5, rope_scaling=dict(
                               rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
                            "partial_rotary_factor"),
                           (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
                           (dict(model_type="qwen3", layer_types=["chunked_attention", "full_attention"]), "layer_types"),
                           (dict(model_type="qwen3", layer_types=["full_attention"]), "layer_types"),
                           (dict(model_type="gemma"), "model_type 'gemma'"),
                           (dict(model_type="gemma2", attention_bias=True), "gemma2 with attention_bias"),
                           (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "scaled RoPE"),
                           (dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                 router_jitter_noise=0.1), "router_jitter_noise"),
                           (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0), "clip_qkv"),
                           (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
                            "mlp_only_layers"),
                           (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2),
                            "decoder_sparse_step")]:
        with pytest.raises(NotImplementedError, match=message):
            config_from_hf({**base, **extra})
    # transformers adds the load-balancing loss only where the config asks for router logits; Qwen3-MoE's
    # experts are moe_intermediate_size wide; its window (with use_sliding_window) is in every layer
    moe = dict(base, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               router_aux_loss_coef=0.02, sliding_window=16, use_sliding_window=True)
    assert (config_from_hf(moe).router_aux_loss_coef, config_from_hf({**moe, "output_router_logits": True})
            .router_aux_loss_coef) == (0.0, 0.02)
    qwen3_moe = config_from_hf(moe)
    assert (qwen3_moe.mlp_hidden, qwen3_moe.n_experts, qwen3_moe.norm_topk_prob) == (32, 8, False)
    assert (qwen3_moe.sliding_window, qwen3_moe.window_layers) == (16, None)
    assert config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None}).rope_theta == 5e5  # transformers 4's keys
    assert config_from_hf({**base, "rope_parameters": dict(rope_type="default", rope_theta=5e5)}).rope_theta == 5e5
    with pytest.raises(ValueError, match="needs factor"):
        config_from_hf({**base, "rope_scaling": dict(rope_type="llama3", factor=8.0)})
    with pytest.raises(ValueError, match="LongRoPE needs"):
        config_from_hf({**base, "rope_scaling": dict(rope_type="longrope", short_factor=[1.0] * 8)})
    # YaRN resolved as transformers 5 resolves it: the original context rope's (else max_position_embeddings),
    # a null factor max_position_embeddings over it (DeepSeek-V3's), attention_factor 0.1 ln(factor) + 1
    yarn = config_from_hf({**base, "rope_scaling": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)})
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                 "attention_factor": pytest.approx(0.1 * math.log(4) + 1), "beta_fast": 32.0,
                                 "beta_slow": 1.0, "truncate": True}
    assert yarn.block_size == 128  # factor x the original context, past max_position_embeddings' 64
    yarn = config_from_hf({**base, "rope_scaling": dict(rope_type="yarn", factor=None, original_max_position_embeddings=16)})
    assert (yarn.rope_scaling["factor"], yarn.block_size) == (4.0, 64)
    # the model card's "type" (transformers 4's key) beside a default rope_parameters conflicts, as "rope_type"
    # does (the key-by-key merge had kept rope_parameters' rope_type "default": unscaled, silently)
    with pytest.raises(NotImplementedError, match="both rope_parameters .* and rope_scaling"):
        config_from_hf({**base, "rope_theta": 1e6, "rope_parameters": dict(rope_type="default", rope_theta=1e6),
                        "rope_scaling": dict(type="yarn", factor=4.0, original_max_position_embeddings=32)})
    assert config_from_hf({**base, "rope_scaling": dict(type="yarn", factor=4.0)}).rope_scaling["rope_type"] == "yarn"
    with pytest.raises(ValueError, match="YaRN RoPE scaling needs factor"):  # transformers: a required key
        config_from_hf({**base, "rope_scaling": dict(rope_type="yarn", original_max_position_embeddings=16)})
    # transformers 4's Phi-3 configs: "su" for LongRoPE, original_max_position_embeddings at the top
    phi3 = config_from_hf({**base, "model_type": "phi3", "original_max_position_embeddings": 32,
                           "rope_scaling": dict(type="su", short_factor=[1.0] * 8, long_factor=[2.0] * 8)})
    # transformers 4's Gemma 3 configs: sliding_window_pattern, rope_local_base_freq, rope_scaling of the full layers
    gemma = config_from_hf({**base, "model_type": "gemma3_text", "num_hidden_layers": 12, "head_dim": 32,
                            "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
                            "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                            "query_pre_attn_scalar": 256})
    assert gemma.window_layers == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10] and gemma.sliding_window == 512
    assert (gemma.rope_theta, gemma.local_rope_theta, gemma.rope_scaling) == (1e6, 1e4, {"rope_type": "linear", "factor": 8.0})
    assert gemma.softmax_scale == 256 ** -0.5 and gemma.mlp == "geglu" and gemma.tie_embeddings
    for extra, message in [(dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
                           (dict(hidden_activation="gelu"), "hidden_activation"),
                           (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "RoPE")]:
        with pytest.raises(NotImplementedError, match=message):
            config_from_hf({**base, "model_type": "gemma3_text", **extra})
    assert phi3.rope_scaling["original_max_position_embeddings"] == 32
    assert phi3.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(2) / math.log(32)))
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(ValueError, match="no model.safetensors"):
        LLM.from_hf(tmp_path)


def test_from_hf_fetches_a_hub_repo_id(tmp_path, monkeypatch):
    # No hub here: huggingface_hub's download is stood in for by a folder save_pretrained wrote.
    hub = pytest.importorskip("huggingface_hub")
    from pyllm.model import HF_FILES

    hf_models()["gpt2"].save_pretrained(tmp_path)
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, allow_patterns: calls.append((repo_id, allow_patterns))
                        or str(tmp_path))
    model = LLM.from_hf("openai-community/gpt2")
    assert calls == [("openai-community/gpt2", HF_FILES)] and model.config.positions == "learned"


@pytest.mark.parametrize("name", HF_NAMES)
def test_to_hf_writes_what_transformers_loads(name, tmp_path):
    # from_hf, change every weight, to_hf with the source's config.json: transformers loads the
    # changed model and computes what ours computes (a wrong inverse mapping would be off by O(1)).
    transformers = pytest.importorskip("transformers")
    theirs = hf_models()[name].double().eval()
    theirs.save_pretrained(tmp_path / "src")
    ours = LLM.from_hf(tmp_path / "src", dtype=torch.float64)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.to_hf(tmp_path / "out", json.loads((tmp_path / "src/config.json").read_text()))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64, **HF_EAGER_EXPERTS,
                                                             **(HF_GEMMA2_ATTENTION if name == "gemma2" else {})).eval()
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        assert rel_err(back(idx).logits, ours(idx)[0]) < (1e-10 if name == "gpt2" else 1e-6)


@pytest.mark.parametrize("name, kind", [("gqa-untied", "llama"), ("window", "mistral"), ("gpt2", "gpt2"),
                                        ("moe", "mixtral"), ("qk-norm", "qwen3")])
def test_to_hf_of_a_model_pyllm_trained(name, kind, tmp_path):
    # (qk-norm: `--model qk_norm=true` runs had been refused as "neither LLaMA- nor GPT-2-shaped")
    transformers = pytest.importorskip("transformers")
    ours = randomized(ModelConfig(**CONFIGS.get(name, {**CONFIGS["gqa-untied"], "qk_norm": True}))).eval()
    ours.to_hf(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, **HF_EAGER_EXPERTS).eval()
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        assert rel_err(back(idx).logits, ours(idx)[0]) < 1e-6
    assert LLM.from_hf(tmp_path, dtype=torch.float64).config == ours.config
    if kind == "mixtral":  # output_router_logits false (as published Mixtral configs): with it true, generate
        # on a padded batch had failed in transformers' load-balancing loss; the coefficient comes back
        assert json.loads((tmp_path / "config.json").read_text())["output_router_logits"] is False
        mask = torch.tensor([[0] * 4 + [1] * 15, [1] * 19])
        back.generate(idx, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="neither LLaMA- nor GPT-2-shaped"):
        LLM(ModelConfig(**CONFIGS["gemma-style"])).to_hf(tmp_path / "x")
    with pytest.raises(NotImplementedError, match=r"\(qkv_bias=True, rotary_dim=8 has no LLaMA config\)"):  # (named)
        LLM(ModelConfig(**{**SMALL, "qkv_bias": True, "rotary_dim": 8})).to_hf(tmp_path / "x")
    assert not (tmp_path / "x").exists()  # (refused before the folder is made)
    with pytest.raises(NotImplementedError, match="a sliding window on some layers only"):  # (said so, not "neither")
        LLM(ModelConfig(**{**SMALL, "sliding_window": 4, "window_layers": [0]})).to_hf(tmp_path / "x")
    with pytest.raises(NotImplementedError, match="norm_topk_prob=False"):
        LLM(ModelConfig(**CONFIGS["moe-unnormalized"])).to_hf(tmp_path / "x")
    with pytest.raises(ValueError, match="does not describe"):
        ours.to_hf(tmp_path / "y", {**json.loads((tmp_path / "config.json").read_text()), "vocab_size": 98})
    if kind == "gpt2":  # what GPT-2's config cannot say had been dropped from the export, silently
        for extra in (dict(sliding_window=4), dict(qk_norm=True), dict(softmax_scale=0.3), dict(attn_softcap=20.0),
                      dict(final_softcap=30.0), dict(sandwich_norm=True), dict(embed_scale=True),
                      dict(embed_multiplier=2.0), dict(residual_multiplier=0.5), dict(logits_scaling=4.0)):
            with pytest.raises(NotImplementedError, match=f"GPT-2-shaped model with {next(iter(extra))} has no GPT-2"):
                LLM(ModelConfig(**{**CONFIGS[name], **extra})).to_hf(tmp_path / "z")


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "granite", "granitemoe", "mixtral", "qwen2-moe"])
def test_lora_updates_are_the_peft_adapter_of_the_hf_model(name, tmp_path):
    # add_lora's trained updates (all-linear: each projection its own) written as a PEFT adapter
    # (lora_state_to_peft) and loaded by PEFT onto transformers' model compute what pyllm's LoRA
    # model computes; a mixture of experts adapts its attention only, as PEFT's all-linear there.
    peft = pytest.importorskip("peft")
    from pyllm.model import lora_state_to_peft

    theirs = hf_models()[name].double().eval()
    theirs.save_pretrained(tmp_path)
    kind = json.loads((tmp_path / "config.json").read_text())["model_type"]
    ours = LLM.from_hf(tmp_path, dtype=torch.float64)
    ours.add_lora(4, 8.0, targets="all-linear")
    with torch.no_grad():
        for name_, p in ours.named_parameters():
            if name_.endswith("lora_b"):
                p.normal_(0, 0.1)
    adapter, targets, parameters = lora_state_to_peft(ours.state_dict(), ours.config, kind)
    assert parameters == []
    if ours.config.n_experts:
        assert targets == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft.set_peft_model_state_dict(model, adapter)  # as PeftModel.from_pretrained reads adapter_model.safetensors
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert rel_err(model(idx).logits, ours.eval()(idx)[0]) < 1e-6


@pytest.mark.parametrize("name, targets", [("mixtral", "experts"), ("qwen3-moe", "q,experts.down_proj"),
                                           ("olmoe", "experts.gate_up_proj"), ("qwen2-moe", "all-linear,experts"),
                                           ("granitemoe", "experts")])
def test_expert_lora_updates_are_the_peft_adapter_of_the_hf_model(name, targets, tmp_path):
    # Each expert's own LoRA updates (add_lora's experts targets) written as a PEFT adapter of
    # transformers 5's fused experts (target_parameters, its ParamWrapper) and loaded by PEFT compute
    # what pyllm's LoRA model computes; merged in (save_weights' merge_lora_state), the same; with
    # the updates off (lora_disabled: DPO's lora-off reference), PEFT's base model.
    peft = pytest.importorskip("peft")
    from pyllm.model import lora_state_to_peft, merge_lora_state

    theirs = hf_models()[name].double().eval()
    theirs.save_pretrained(tmp_path)
    kind = json.loads((tmp_path / "config.json").read_text())["model_type"]
    ours = LLM.from_hf(tmp_path, dtype=torch.float64)
    ours.add_lora(4, 8.0, targets=targets)
    with torch.no_grad():
        for name_, p in ours.named_parameters():
            if name_.endswith(("lora_b", "lora_a")):
                p.normal_(0, 0.1)
    adapter, modules, parameters = lora_state_to_peft(ours.state_dict(), ours.config, kind)
    want_parameters = {"experts": ["experts.down_proj", "experts.gate_up_proj"], "q,experts.down_proj": ["experts.down_proj"],
                       "experts.gate_up_proj": ["experts.gate_up_proj"]}
    assert parameters == want_parameters.get(targets, want_parameters["experts"])
    model = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules,
                                                        target_parameters=parameters))
    peft.set_peft_model_state_dict(model, adapter)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        got = ours.eval()(idx)[0]
        assert rel_err(model(idx).logits, got) < 1e-6
        plain = LLM(ours.config).double()
        plain.load_state_dict(merge_lora_state(ours.state_dict(), ours.lora_scale()))
        assert rel_err(plain(idx)[0], got) < 1e-10
        with ours.lora_disabled(), model.disable_adapter():  # the base models
            assert rel_err(ours(idx)[0], model(idx).logits) < 1e-6


def peft_adapted(name: str, tmp_path, **lora):
    """(PeftModel of hf_models()[name] in float64 with a LoraConfig(**lora), its B matrices drawn so
    that the adapter matters, pyllm's from_hf of the base with that adapter merged): the base saved
    in tmp_path / "base", the adapter in tmp_path / "adapter"."""
    peft = pytest.importorskip("peft")
    theirs = hf_models()[name].double().eval()
    theirs.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(theirs, peft.LoraConfig(**lora))
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "lora_B" in name_:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    return model, LLM.from_hf(tmp_path / "base", dtype=torch.float64, adapter=tmp_path / "adapter")


@pytest.mark.parametrize("name, parameters", [("mixtral", ["experts.gate_up_proj", "experts.down_proj"]),
                                              ("granitemoe", ["experts.down_proj"]), ("qwen3-moe", ["experts.gate_up_proj"])])
def test_peft_expert_adapter_merges_into_from_hf(name, parameters, tmp_path):
    # A PEFT adapter trained elsewhere on transformers 5's fused experts (target_parameters, beside
    # q_proj) merges on load (from_hf's adapter), whatever names the checkpoint keeps its experts
    # under: pyllm's model computes what PeftModel computes.
    model, ours = peft_adapted(name, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=parameters)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], model(idx).logits) < 1e-6
    base = LLM.from_hf(tmp_path / "base", dtype=torch.float64).state_dict()
    for projection in ("gate_up", "down"):  # the adapted experts changed, each by a rank-4 update
        delta = ours.state_dict()[f"blocks.0.mlp.{projection}"] - base[f"blocks.0.mlp.{projection}"]
        adapted = f"experts.{projection}_proj" in parameters
        assert [torch.linalg.matrix_rank(d).item() for d in delta] == [4 if adapted else 0] * len(delta)


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "llama-gqa"])
def test_peft_all_linear_adapter_merges_into_from_hf(name, tmp_path):
    # PEFT 0.21's target_modules="all-linear": on transformers 5's MoEs it adapts the experts and the
    # router as parameters (target_parameters gate_up_proj, down_proj, gate.weight) with a rank and
    # alpha of their own for gate_up_proj (rank_pattern, alpha_pattern); per-module ranks and alphas
    # of linear layers likewise. pyllm's merged model computes what PeftModel computes.
    patterns = {} if name != "llama-gqa" else dict(rank_pattern={"q_proj": 2, "down_proj": 6},
                                                   alpha_pattern={r".*\.0\.mlp\.gate_proj": 3})
    model, ours = peft_adapted(name, tmp_path, r=4, lora_alpha=8, target_modules="all-linear", **patterns)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    base = LLM.from_hf(tmp_path / "base", dtype=torch.float64)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = model(idx).logits
        assert rel_err(ours(idx)[0], want) < 1e-6
        assert not torch.allclose(base(idx)[0], want, atol=1e-3)
    if name != "llama-gqa":  # the router changed too, by a rank-4 update
        delta = ours.blocks[0].mlp.router.weight - base.blocks[0].mlp.router.weight
        assert torch.linalg.matrix_rank(delta).item() == min(4, delta.shape[0])


def test_peft_router_adapter_takes_its_own_rank_pattern(tmp_path):
    # PEFT matches a parameter's rank / alpha pattern against the parameter's name (mlp.gate.weight)
    model, ours = peft_adapted("mixtral", tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"],
                               target_parameters=["gate.weight"], rank_pattern={"mlp.gate.weight": 2},
                               alpha_pattern={"mlp.gate.weight": 10})
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], model(idx).logits) < 1e-6


def test_moe_statistics_are_not_held_past_the_loss():
    # the (N, E) router probabilities of every layer were held until the next forward (through the
    # backward and the optimizer step), and a checkpointed block's recompute stored them again
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, n_experts=4,
                            experts_per_token=2))
    model.activation_checkpointing = True
    idx = torch.randint(0, 97, (2, 9))
    loss = model(idx, idx)[1]
    assert model.aux_loss is not None and all(b.mlp.stats is None for b in model.blocks)
    loss.backward()
    assert all(b.mlp.stats is None for b in model.blocks)


@pytest.mark.parametrize("name", ["llama-tied", "llama-gqa", "qwen3-window"])
def test_peft_adapter_of_the_output_layer_merges_into_from_hf(name, tmp_path):
    # An adapter that targets lm_head too: PeftModel's logits, tied embeddings or not. With tied
    # ones PEFT's forward updates the output layer alone: pyllm unties them, the embeddings kept.
    model, ours = peft_adapted(name, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    tied = model.config.tie_word_embeddings
    base = LLM.from_hf(tmp_path / "base", dtype=torch.float64)
    idx = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = model(idx).logits
        assert rel_err(ours(idx)[0], want) < 1e-6
        assert not torch.allclose(base(idx)[0], want, atol=1e-3)
    assert base.config.tie_embeddings == tied and not ours.config.tie_embeddings
    assert torch.equal(ours.tok_emb.weight, base.tok_emb.weight)
    assert torch.linalg.matrix_rank(ours.lm_head.weight - base.lm_head.weight).item() == 4
    # the adapter's saved copy of the head (PEFT's save_embedding_layers) must be the model's own
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lm_head.base_layer.weight"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(NotImplementedError, match="not the model's output layer"):
        LLM.from_hf(tmp_path / "base", dtype=torch.float64, adapter=tmp_path / "adapter")


def test_gemma2_defaults_and_layout():
    # config_from_hf fills what a Gemma 2 config.json leaves out with transformers' defaults; the
    # windowed layers are the even ones, as Gemma2Config's default layer_types.
    transformers = pytest.importorskip("transformers")
    from pyllm.model import GEMMA2_DEFAULTS, config_from_hf

    defaults = transformers.Gemma2Config()
    for key, value in GEMMA2_DEFAULTS.items():
        want = defaults.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(defaults, key)
        assert value == want, key
    cfg = config_from_hf({"model_type": "gemma2", "num_hidden_layers": 4})
    assert cfg.window_layers == [i for i, t in enumerate(defaults.layer_types[:4]) if t == "sliding_attention"] == [0, 2]
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.softmax_scale, cfg.qk_norm) == (50.0, 30.0, 256 ** -0.5, False)


def test_gemma3_multimodal_checkpoint_gives_its_language_model(tmp_path):
    # Gemma 3 4B and up are Gemma3ForConditionalGeneration checkpoints: from_hf reads the language
    # model (text_config over transformers' defaults, weights under language_model.), which computes
    # what the multimodal model computes on text; to_hf writes it back as a Gemma3ForCausalLM.
    transformers = pytest.importorskip("transformers")
    from pyllm.model import GEMMA3_TEXT_DEFAULTS

    defaults = transformers.Gemma3TextConfig()
    for key, value in GEMMA3_TEXT_DEFAULTS.items():
        if key == "rope_theta":
            want = defaults.rope_parameters["full_attention"]["rope_theta"]
        elif key == "rope_local_base_freq":
            want = defaults.rope_parameters["sliding_attention"]["rope_theta"]
        elif key == "sliding_window_pattern":
            want = defaults.layer_types.index("full_attention") + 1
        else:
            want = getattr(defaults, key)
        assert value == want, key
    text = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=64, sliding_window=5,
                query_pre_attn_scalar=24, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    theirs = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=96, boi_token_index=94,
        eoi_token_index=95)).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "src")
    ours = LLM.from_hf(tmp_path / "src", dtype=torch.float64)
    idx = torch.randint(0, 90, (2, 19))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], theirs(input_ids=idx).logits) < 1e-6
    ours.to_hf(tmp_path / "out", json.loads((tmp_path / "src/config.json").read_text()))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             **HF_EAGER_EXPERTS).eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        assert rel_err(back(idx).logits, ours(idx)[0]) < 1e-6


def test_from_hf_of_what_transformers_5_writes_and_leaves_out(tmp_path):
    # transformers 5's own names (save_pretrained(save_original_format=False), also written for
    # PEFT-loaded or offloaded models): Mixtral's experts under mlp., GraniteMoE's router.weight,
    # fused experts (a bare KeyError before). A config.json without tie_word_embeddings takes the
    # kind's default (SmolLM3's is tied: an untied model without lm_head.weight had been built).
    # Qwen2-MoE windows without layer_types are read differently by transformers 4 and 5: refused.
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    moe = dict(small, num_local_experts=4, num_experts_per_tok=2, **HF_EAGER_EXPERTS)
    idx = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    for name, make in (("mixtral", lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**moe))),
                       ("granitemoe", lambda: transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**moe))),
                       ("smollm3", lambda: transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**small)))):
        torch.manual_seed(0)
        hf = make().double().eval()
        folder = tmp_path / name
        hf.save_pretrained(folder, save_original_format=False)
        if name == "smollm3":
            config = json.loads((folder / "config.json").read_text())
            assert config.pop("tie_word_embeddings") is True
            (folder / "config.json").write_text(json.dumps(config))
        ours = LLM.from_hf(folder, dtype=torch.float64).eval()
        with torch.no_grad():
            assert rel_err(ours(idx)[0], hf(idx).logits) < 1e-6, name
    config = json.loads((tmp_path / "smollm3" / "config.json").read_text())
    (tmp_path / "smollm3" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="no lm_head.weight and its config.json does not tie"):
        LLM.from_hf(tmp_path / "smollm3")
    from pyllm.model import _hf_sliding_window

    with pytest.raises(NotImplementedError, match="qwen2_moe with use_sliding_window and no layer_types"):
        _hf_sliding_window({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, "qwen2_moe", 4)
    assert _hf_sliding_window({"use_sliding_window": True, "sliding_window": 8, "layer_types": [
        "sliding_attention", "full_attention"]}, "qwen2_moe", 2) == (8, [0])
    from pyllm.model import _gemma2_config

    with pytest.raises(NotImplementedError, match="gemma2 with use_bidirectional_attention=True"):  # was built causal
        _gemma2_config({"num_hidden_layers": 2, "use_bidirectional_attention": True})


MOE_FAMILIES = {  # (config class, its experts' count key, what else differs)
    "mixtral": ("MixtralConfig", "num_local_experts", dict(num_experts_per_tok=1)),
    "qwen2_moe": ("Qwen2MoeConfig", "num_experts", dict(norm_topk_prob=True, moe_intermediate_size=32,
                                                        shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", "num_experts", dict(num_experts_per_tok=4, moe_intermediate_size=32)),
    "olmoe": ("OlmoeConfig", "num_experts", {}),
    "granitemoe": ("GraniteMoeConfig", "num_local_experts", dict(embedding_multiplier=3.0, residual_multiplier=0.4,
                                                                 logits_scaling=2.5, attention_multiplier=0.2)),
}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_training_loss_and_gradients_are_transformers(tmp_path, family):
    # A mixture of experts in training: transformers' loss with output_router_logits (cross-entropy
    # plus router_aux_loss_coef times load_balancing_loss_func over the attention_mask's tokens) and
    # every gradient, against from_hf's with token_mask, fp64 (transformers rounds its router softmax,
    # norms, RoPE and balancing sums through fp32: 1.3e-7 / 2.4e-6 apart at most in an audit, 1e-14
    # with those made fp64). Top-k 1, 2 and all; renormalized or not; a shared expert; multipliers.
    transformers = pytest.importorskip("transformers")
    from pyllm.model import state_from_hf

    name, experts, extra = MOE_FAMILIES[family]
    cfg = getattr(transformers, name)(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.3,
                                      pad_token_id=0, **{"num_experts_per_tok": 2, experts: 4, **extra})
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # every weight random, norms around 1: nothing cancels
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    theirs.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager",
                                                               **HF_EAGER_EXPERTS).train()
    ours = LLM.from_hf(tmp_path, dtype=torch.float64).train()
    assert ours.config.router_aux_loss_coef == 0.3
    ids = torch.randint(3, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding: neither the loss nor the balancing statistics count it
    labels = ids.masked_fill(mask == 0, -100)
    out = theirs(ids, attention_mask=mask, labels=labels)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).masked_fill(F.pad(labels[:, 1:], (0, 1), value=-100) == -100, -1)
    _, loss = ours(ids, targets, token_mask=mask.bool())
    assert float(out.aux_loss.detach()) > 0 and float(ours.aux_loss.detach()) > 0
    assert abs(loss.item() - out.loss.item()) < 1e-6 * out.loss.item()
    out.loss.backward()
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = state_from_hf({n: p.grad for n, p in theirs.named_parameters()}, ours.config, family)
    for n, p in ours.named_parameters():
        assert rel_err(p.grad, want[n]) < 1e-5, n


def test_generation_from_threads_keeps_dropout_off_throughout():
    # Several threads generating with one model left in training mode (dropout 0.5): every forward
    # runs in eval mode until the last generation ends, then training mode is back. (Each restoring
    # its own mode had turned dropout on under the others.)
    import threading

    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=97, block_size=64, n_layers=2, n_heads=2, dim=32, dropout=0.5))
    modes = []
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, i, o: modes.append(mod.training))
    prompt = torch.randint(0, 97, (1, 5))
    threads = [threading.Thread(target=lambda: [model.generate(prompt, 12, temperature=0) for _ in range(4)])
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert modes and not any(modes) and model.training
    assert all(m.training for m in model.modules())


def test_meta_device_init_weights_ties_and_draws_as_the_constructor():
    # torchtitan's flow: built on meta, to_empty, init_weights. The output layer stays tied to the
    # embeddings (to_empty gives each Parameter a new object), norms are ones, weights drawn as the
    # constructor draws them (GPT-2's scaled residual projections), the experts too: the first
    # loss is a fresh model's, not NaN. A LoRA layer's parts buffer is written anew.
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layers=4, n_heads=4, dim=64, n_experts=4, experts_per_token=2)
    with torch.device("meta"):
        model = LLM(cfg)
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.tok_emb.weight
    torch.manual_seed(0)
    model.init_weights()
    params = dict(model.named_parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in params.items() if "norm" in n)
    assert abs(params["tok_emb.weight"].std().item() - 0.02) < 0.002
    assert abs(params["blocks.0.attn.proj.weight"].std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(params["blocks.1.mlp.gate_up"].std().item() - 0.02) < 0.002
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    loss = model(idx, targets)[1]  # (+ the balancing term, 0.01 x about top_k)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(97)) < 0.2
    with torch.device("meta"):
        lora = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64))
        lora.add_lora(2, 4.0, targets="q,v")
    lora.to_empty(device="cpu")
    parts = lora.blocks[0].attn.qkv.lora_parts
    assert parts.tolist() == [[64, 1], [64, 0], [64, 1]]
    lora.init_weights()
    assert torch.count_nonzero(lora.blocks[0].attn.qkv.lora_b) == 0


def test_deepcopy_and_pickle_after_a_training_forward():
    # A MoE model keeps its last forward's router statistics and aux loss (graph tensors):
    # deepcopy (an EMA, a reference model) and pickle take the model without them.
    import copy
    import pickle

    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=2, n_heads=4, dim=64, n_experts=4,
                            experts_per_token=2))
    idx = torch.randint(0, 97, (2, 9))
    model(idx, idx)[1].backward()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.aux_loss is None and twin.blocks[0].mlp.stats is None
        assert torch.equal(twin.eval()(idx)[0], model.eval()(idx)[0])
        model.train()


def test_moe_router_statistics_missing_say_why():
    # torch.utils.checkpoint's reentrant form runs the blocks without autograd: no statistics, a clear
    # error (it had used the previous batch's, then failed in backward); a batch of no tokens gives 0.
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64, n_experts=4,
                            experts_per_token=2))
    idx = torch.randint(0, 97, (2, 9))
    model(idx, idx)
    block = model.blocks[0]
    plain = block.forward
    block.forward = lambda x, rope, cu_seqlens=None: torch.utils.checkpoint.checkpoint(
        plain, x, rope, None, 0, cu_seqlens, use_reentrant=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(idx, idx)
    del block.forward
    model(idx[:0], idx[:0])
    assert model.aux_loss.item() == 0


def test_lora_guards_and_to_hf_merges_the_updates(tmp_path):
    pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64)
    model = LLM(cfg).eval()
    model.add_lora(2, 4.0, dropout=0.5)
    assert not any(m.training for m in model.modules())  # added in the model's mode: dropout off in eval
    idx = torch.randint(0, 97, (1, 9))
    assert torch.equal(model(idx)[0], model(idx)[0])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.to_hf(tmp_path / "hf")  # the updates merged, as save() writes them
    with torch.no_grad():
        assert rel_err(LLM.from_hf(tmp_path / "hf")(idx)[0], model(idx)[0]) < 1e-5
    with pytest.raises(ValueError, match="LoRA updates already"):
        model.add_lora(2, 4.0)
    for kwargs, match in ((dict(frozen_dtype=torch.int8), "floating-point"), (dict(alpha=float("nan")), "alpha")):
        with pytest.raises(ValueError, match=match):
            LLM(cfg).add_lora(2, **{"alpha": 4.0, **kwargs})


def test_checks_of_heads_configs_forward_and_generation():
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64)
    model = LLM(cfg)
    for bad in (-1, 1.5, 0, True):  # the config left as it was
        with pytest.raises(ValueError, match="num_labels must be an integer >= 1"):
            model.add_score_head(bad)
        assert model.config.num_labels == 0 and model.score is None
    for field, value in (("rope_theta", 0.0), ("rope_theta", float("nan")), ("norm_eps", -1e-5), ("softmax_scale", 0.0),
                         ("local_rope_theta", 0), ("rope_scaling", {"rope_type": "linear", "factor": 0.0})):
        with pytest.raises(ValueError, match="positive number"):
            ModelConfig(**{**cfg.to_dict(), field: value})
    idx = torch.randint(0, 97, (2, 8))
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) tensor"):
        model(idx[0])
    model.fused_loss = True
    for targets in (idx.float(), idx[:, :7], idx.bool()):
        for kwargs in ({}, {"per_token": True}):
            with pytest.raises(ValueError, match="targets must be an integer tensor of idx's shape"):
                model(idx, targets, **kwargs)
    for call in (lambda: model.generate(idx[:1], -1), lambda: model.generate_batch([[1, 2]], -3),
                 lambda: list(model.generate_speculative(idx[:1], model, -5)), lambda: model.generate(idx[:1], 2.5)):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            call()
    with pytest.raises(ValueError, match="each prompt must be a list or 1-D tensor of int ids"):
        model.generate_batch([[1.7, 2.2]], 2)
    assert model.generate(idx[:1], 2, temperature=0, stop_tokens=None).shape == (1, 10)
    with pytest.raises(TypeError, match="stop_tokens must be"):
        model.generate(idx[:1], 2, stop_tokens="12")
    with pytest.raises(ValueError, match="crop_block_size: block_size must be an int"):
        model.crop_block_size(2.5)
    with pytest.raises(ValueError, match="idx is on meta, the model on cpu"):
        model(idx.to("meta"))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32 tensor"):
        model(idx, cu_seqlens=[0, 8, 16])
    with pytest.raises(ValueError, match="rows of T = 0"):
        model(idx[:, :0], cu_seqlens=torch.tensor([0, 0], dtype=torch.int32))
    from pyllm.model import config_from_hf

    with pytest.raises(ValueError, match="lacks 'hidden_size'"):  # (a KeyError before)
        config_from_hf({"model_type": "llama", "vocab_size": 97})
    with pytest.raises(ValueError, match="must hold a JSON object"):
        config_from_hf([{"model_type": "llama"}])


def test_scores_of_an_empty_document_are_nan():
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64, num_labels=1))
    idx = torch.randint(0, 97, (1, 8))
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    scores = model(idx, cu_seqlens=cu, scores=True)[1]
    assert scores[1].isnan().all() and not scores[[0, 2]].isnan().any()


def test_fused_losses_and_the_norm_refuse_inputs_they_would_cast():
    # float or bool targets had been cast to classes (2.7 -> 2, -1.5 -> ignored), targets of another
    # row count read as far as they went; RMSNorm of an int tensor gave int garbage
    from pyllm.nn import RMSNorm, linear_cross_entropy, linear_sequence_loss, linear_token_logps

    x, w = torch.randn(6, 16), torch.randn(11, 16)
    good = torch.randint(0, 11, (6,))
    for targets, kind in ((good.float() + 0.7, TypeError), (good.bool(), TypeError), (good[:5], ValueError)):
        for call in (lambda t: linear_cross_entropy(x, w, t), lambda t: linear_token_logps(x, w, t),
                     lambda t: linear_sequence_loss(x, w, t, [3, 3], 2, lambda logps, a, b: logps.sum())):
            with pytest.raises(kind, match="targets must"):
                call(targets)
    with pytest.raises(TypeError, match="floating-point"):
        RMSNorm(4)(torch.arange(8).view(2, 4))


def test_sequence_logps_and_estimate_mfu_check_their_inputs():
    from pyllm.nn import sequence_logps

    logps = torch.randn(2, 4)
    assert torch.allclose(sequence_logps(logps, torch.tensor([0, 3, 8], dtype=torch.int32)),
                          torch.stack([logps.view(-1)[:3].sum(), logps.view(-1)[3:].sum()]))
    for cu in (torch.tensor([0, 5, 3, 8]), torch.tensor([0, 3, 9]), torch.tensor([1, 8])):  # (had summed silently)
        with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
            sequence_logps(logps, cu.int())
    model = LLM(ModelConfig(vocab_size=97, block_size=32, n_layers=1, n_heads=4, dim=64))
    with pytest.raises(ValueError, match="dt"):
        model.estimate_mfu(4, 0.0, peak_flops=1e12)
    assert model.estimate_mfu(4, 0.5, peak_flops=1e12) > 0


def test_a_malformed_peft_adapter_is_refused_not_broadcast(tmp_path):
    # A B of shape (1, r) had added one row to every row of its weight; a B without its A had been
    # skipped; A and B of another rank than adapter_config.json's scaled wrongly; int tensors cast.
    from safetensors.torch import load_file, save_file

    peft_adapted("llama-gqa", tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    good = load_file(path)
    b_key = next(k for k in good if k.endswith("q_proj.lora_B.weight"))
    a_key = b_key.replace("lora_B", "lora_A")
    for change, match in ((lambda t: t.update({b_key: t[b_key][:1]}), "is no update of a weight of shape"),
                          (lambda t: t.pop(a_key), "has no lora_A to go with it"),
                          (lambda t: t.update({a_key: t[a_key][:2], b_key: t[b_key][:, :2]}), "not of the rank 4"),
                          (lambda t: t.update({b_key: t[b_key].long()}), "not a float matrix")):
        tensors = dict(good)
        change(tensors)
        save_file({k: t.contiguous() for k, t in tensors.items()}, path)
        with pytest.raises(ValueError, match=match):
            LLM.from_hf(tmp_path / "base", dtype=torch.float64, adapter=tmp_path / "adapter")


def test_a_shard_index_naming_files_outside_the_folder_is_refused(tmp_path):
    import json

    hf_models()["llama-gqa"].save_pretrained(tmp_path / "base")
    (tmp_path / "elsewhere.safetensors").write_bytes((tmp_path / "base" / "model.safetensors").read_bytes())
    (tmp_path / "base" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="names shards outside the folder"):
        LLM.from_hf(tmp_path / "base")


def test_a_weights_file_whose_config_claims_another_model_is_refused_before_it_is_built(tmp_path, monkeypatch):
    # A few-hundred-byte file claiming a 64-layer, 4096-wide model had been built (gigabytes drawn)
    # before load_state_dict found nothing to fill it with: checked on a shape-only copy first.
    import json

    from safetensors.torch import save_file

    small = LLM(ModelConfig(vocab_size=64, block_size=16, n_layers=1, n_heads=2, dim=32))
    huge = dict(small.config.to_dict(), n_layers=64, dim=4096, n_heads=32, vocab_size=1 << 17)
    save_file({"tok_emb.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"),
              metadata={"pyllm_config": json.dumps(huge)})
    built = []
    real_init = LLM.__init__

    def meta_only(self, cfg):  # (a regression builds nothing real: it fails here, not by running out of memory)
        built.append(torch.empty(0).device.type)
        assert built[-1] == "meta", "the claimed model was built for real"
        real_init(self, cfg)

    monkeypatch.setattr(LLM, "__init__", meta_only)
    with pytest.raises(ValueError, match=r"its weights are not the model its config describes: missing "):
        LLM.load(tmp_path / "model.safetensors")
    assert built == ["meta"]  # the shape-only copy alone


def test_lora_targets_name_each_bad_target_once():
    from pyllm.model import lora_targets
    with pytest.raises(ValueError, match=r"got mlp, attn$"):
        lora_targets("q, mlp, attn, mlp")
    # a module path of one layer (PEFT's adapter_config.json lists them so, and PEFT adapts that layer
    # alone) had been widened to that projection in every layer; refused (from the LoRA audit)
    assert lora_targets("self_attn.q_proj,mlp.down_proj") == ["q", "down"]
    with pytest.raises(ValueError, match="names one layer's module"):
        lora_targets("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("option", [{"alora_invocation_tokens": [5, 6]}, {"layer_replication": [[1, 2], [0, 1]]},
                                    {"target_modules": ["q_proj", "embed_tokens"]}],
                         ids=["alora", "layer_replication", "embeddings"])
def test_peft_adapter_options_a_merge_cannot_express_are_refused(tmp_path, option):
    # An activated LoRA acts from its invocation tokens on (PEFT refuses its merge_and_unload), and
    # layer_replication rebuilds the layer stack: merged into the weights each had been another model
    # without a word (logits 0.4-0.8 off PeftModel's; from the LoRA audit)
    # (an adapter of the embeddings: named so, not as "no LoRA A / B matrix of a linear layer")
    match = "adapter of the token embeddings" if "target_modules" in option else next(iter(option))
    with pytest.raises(NotImplementedError, match=match):  # (its from_hf with the adapter)
        peft_adapted("llama-gqa", tmp_path, r=2, **{"target_modules": ["q_proj"], **option})


def test_from_hf_reads_rope_and_defaults_as_transformers_5_does():
    # An audit (2026-12-06): transformers 5 takes rope_scaling over rope_parameters (a user adding
    # YaRN or llama3 scaling to a config it wrote, as model cards say, got unscaled RoPE here), a
    # top-level original_max_position_embeddings over LongRoPE's own, and its classes' defaults
    # where config.json leaves a key out (Mixtral's rope_theta 1e6 had read as 10000).
    from pyllm.model import config_from_hf

    base = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16)
    with pytest.raises(NotImplementedError, match="both rope_parameters .* and rope_scaling"):
        config_from_hf({**base, "rope_parameters": dict(rope_type="default", rope_theta=5e5), "rope_scaling": llama3})
    # equal keys, but rope_theta in rope_parameters alone: transformers 5.25 drops it for the class default
    # (10000 here), so pyllm refuses rather than read 5e5; with rope_theta in rope_scaling too, both agree
    with pytest.raises(NotImplementedError, match=r"rope_scaling alone \(its rope_theta 10000.0\)"):
        config_from_hf({**base, "rope_parameters": dict(llama3, rope_theta=5e5), "rope_scaling": llama3})
    both = config_from_hf({**base, "rope_parameters": dict(llama3, rope_theta=5e5), "rope_scaling": dict(llama3, rope_theta=5e5)})
    assert both.rope_scaling["rope_type"] == "llama3" and both.rope_theta == 5e5
    assert config_from_hf({**base, "rope_theta": 5e5, "rope_parameters": dict(llama3, rope_theta=5e5),
                           "rope_scaling": llama3}).rope_theta == 5e5  # the top level's, as transformers
    for kind, theta, eps in (("mixtral", 1e6, 1e-5), ("smollm3", 2e6, 1e-6), ("phi3", 1e4, 1e-5), ("olmo2", 1e4, 1e-5),
                             ("olmoe", 1e4, 1e-5), ("qwen3", 1e4, 1e-6)):
        extra = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2)
        cfg = config_from_hf({**base, "model_type": kind, **(extra if kind in ("mixtral", "olmoe") else {})})
        assert (cfg.rope_theta, cfg.norm_eps) == (theta, eps), kind
    assert config_from_hf({**base, "model_type": "mistral"}).sliding_window == 4096  # MistralConfig's default
    assert config_from_hf({**base, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    phi3 = config_from_hf({**base, "model_type": "phi3", "original_max_position_embeddings": 32, "rope_scaling": dict(
        rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=16)})
    assert phi3.rope_scaling["original_max_position_embeddings"] == 32
    gemma3 = config_from_hf({**base, "model_type": "gemma3_text", "num_hidden_layers": 6, "head_dim": 16,
                             "sliding_window": 8, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                             "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert (gemma3.rope_scaling, gemma3.rope_theta, gemma3.local_rope_theta) == (
        {"rope_type": "linear", "factor": 8.0}, 1e6, 1e4)  # (transformers 5 scales the full layers with it)
    transformers = pytest.importorskip("transformers")
    for kind in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "mixtral", "qwen3_moe", "olmoe",
                 "qwen2_moe", "granite", "granitemoe"):  # the table is transformers' classes' defaults
        hf = transformers.AutoConfig.for_model(kind)
        cfg = config_from_hf({**base, "model_type": kind, **{k: v for k, v in (("num_local_experts", 4), (
            "num_experts", 4), ("num_experts_per_tok", 2)) if hasattr(hf, k)}})
        assert (cfg.rope_theta, cfg.norm_eps) == (hf.rope_parameters["rope_theta"], hf.rms_norm_eps), kind


def bf16_gemma_checkpoint(transformers, folder, kind: str, **sizes):
    """A random Gemma 2 / 3 checkpoint saved in bf16, as Gemma's ship, norm weights far from 0."""
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=4, **sizes)
    if kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, attn_implementation="eager"))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, attn_implementation="eager"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if "norm" in name else 0.05))
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_from_hf_bf16_gemma_norms_scale_in_fp32(tmp_path, kind):
    # A bf16 checkpoint (as Gemma ships) read into an fp32 model: its (1 + w) norm scales are
    # transformers' 1.0 + weight.float(); folded in bf16 they had been rounded (0.4% off, logits 0.02).
    # w is kept as the checkpoint has it, under norm_offset=1.
    transformers = pytest.importorskip("transformers")
    bf16_gemma_checkpoint(transformers, tmp_path, kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = LLM.from_hf(tmp_path, dtype=torch.float32)
    assert ours.config.norm_offset == 1.0
    w = hf.model.layers[0].input_layernorm.weight
    assert torch.equal(ours.blocks[0].norm1.weight, w.float())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_bf16_gemma_norms_give_transformers_bits(tmp_path, kind):
    # A bf16 model's Gemma norms: the scale 1 + w in fp32, one rounding, as transformers' Gemma RMSNorm.
    # They had held 1 + w folded in bf16 (0.36% off) and rounded twice (LLaMA's order): bf16 logits
    # 0.04-0.06 from transformers' bf16, whose own error from fp64 is ~0.03.
    transformers = pytest.importorskip("transformers")
    bf16_gemma_checkpoint(transformers, tmp_path, kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours = LLM.from_hf(tmp_path, dtype=torch.bfloat16).eval()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    pairs = [(ours.blocks[0].norm1, hf.model.layers[0].input_layernorm),
             (ours.blocks[1].attn_out_norm, hf.model.layers[1].post_attention_layernorm),
             (ours.blocks[0].mlp_out_norm, hf.model.layers[0].post_feedforward_layernorm), (ours.norm_f, hf.model.norm)]
    with torch.no_grad():
        for mine, theirs in pairs:
            assert torch.equal(mine(x), theirs(x))
        if kind == "gemma3_text":  # q / k norms, per head
            q = torch.randn(2, 4, 2, 16, dtype=torch.bfloat16)
            assert torch.equal(ours.blocks[0].attn.q_norm(q), hf.model.layers[0].self_attn.q_norm(q))
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                                attn_implementation="eager").eval()(ids).logits
        err = lambda logits: (logits.double() - ref).abs().max().item()  # noqa: E731
        assert err(ours(ids)[0]) <= 2 * err(hf(ids).logits)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_gemma_run_saved_with_folded_norms_exports_as_before(tmp_path, kind):
    # Runs saved before norm_offset hold 1 + w in their norm weights under norm_offset=0 (LLaMA's
    # norm): they compute as before and export w, as the new form does.
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace
    bf16_gemma_checkpoint(transformers, tmp_path / "hf", kind)
    new = LLM.from_hf(tmp_path / "hf", dtype=torch.float32).eval()
    old = LLM(replace(new.config, norm_offset=0.0)).eval()
    old.load_state_dict({k: v + 1.0 if "norm" in k else v for k, v in new.state_dict().items()})
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(old(ids)[0], new(ids)[0], atol=1e-5, rtol=1e-5)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    from safetensors.torch import load_file
    a = load_file(str(new.to_hf(tmp_path / "new", hf_config) / "model.safetensors"))
    b = load_file(str(old.to_hf(tmp_path / "old", hf_config) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_norm_offset_models_start_at_scale_one_and_are_checked():
    cfg = ModelConfig(vocab_size=32, block_size=16, n_layers=1, n_heads=2, dim=16, qk_norm=True, norm_offset=1.0)
    model = LLM(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.zeros_like(p)), name  # scale 1 + 0
    x = torch.randn(4, 16)
    from dataclasses import replace
    plain = LLM(replace(cfg, norm_offset=0.0)).norm_f
    torch.testing.assert_close(model.norm_f(x), plain(x))
    with pytest.raises(ValueError, match="norm_offset"):
        ModelConfig(norm="layernorm", norm_offset=1.0).validate()
    with pytest.raises(ValueError, match="norm_offset"):
        ModelConfig(norm_offset=float("nan")).validate()
    with pytest.raises(NotImplementedError, match="norm_offset"):
        model.to_hf("/nonexistent/never-made")  # (a LLaMA config cannot say it)


@pytest.mark.parametrize("stop", [7, None, [7], torch.tensor([7])])
def test_generate_batch_of_a_longrope_model_takes_every_stop_tokens_form(stop):
    # (an int id or None had raised TypeError on LongRoPE's row-at-a-time path alone; from the sampling audit)
    rs = dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4,
              original_max_position_embeddings=8, attention_factor=1.2)
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=64, block_size=32, n_layers=1, n_heads=2, dim=16, rope_scaling=rs)).eval()
    prompts = [[1, 2, 3], [4, 5]]
    got = model.generate_batch(prompts, 4, temperature=0, stop_tokens=stop)
    assert got == model.generate_batch(prompts, 4, temperature=0, stop_tokens=[7] if stop is not None else [])


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5)])
def test_sample_takes_the_shapes_greedy_takes(shape):
    # (sampling had raised torch's IndexError / "prob_dist must be 1 or 2 dim" where greedy took them)
    logits = torch.randn(*shape)
    assert sample(logits, 0).shape == sample(logits, 1.0).shape == shape[:-1]


def test_gemma2_config_does_not_warn_about_gemma3():
    # (the Gemma 3 warning about attn_logit_softcapping had been pasted into Gemma 2's config too)
    from pyllm.model import config_from_hf

    hf = dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = config_from_hf(hf)
    assert cfg.attn_softcap == 50.0


def test_generate_batch_of_a_longrope_model_refuses_cuda_graph():
    # as generate() and _DecodeGraph refuse it: the flag had been dropped silently on LongRoPE's
    # row-at-a-time path (from the KV-cache audit)
    rs = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, attention_factor=1.0,
              original_max_position_embeddings=16)
    model = LLM(ModelConfig(vocab_size=64, block_size=64, n_layers=1, n_heads=2, dim=32, rope_scaling=rs)).eval()
    with pytest.raises(NotImplementedError, match="cuda_graph does not take LongRoPE"):
        model.generate_batch([[1, 2, 3], [4, 5]], 4, temperature=0, cuda_graph=True)


def test_a_packed_longrope_document_takes_its_own_factors():
    # LongRoPE picks the short or long factors by the sequence's length (transformers' Phi-3 by each
    # text's alone): a short conversation packed in a row past the
    # switch had taken the row's long ones, so Phi-3.5 fine-tunes trained every short conversation under
    # other rotations than the model runs them with (from the Phi-3 audit: first loss 12.314 vs 12.478)
    rs = dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(4)], long_factor=[4.0] * 4,
              original_max_position_embeddings=16, attention_factor=1.1)
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=64, block_size=64, n_layers=2, n_heads=2, dim=16, rope_scaling=rs)).double().eval()
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        alone = [model(ids[:, :10])[0][0], model(ids[:, 10:])[0][0]]  # 10 tokens: short; 14: short
        longer = model(ids)[0][0]  # 24 tokens: long
        for T in (24, 48):  # rows past the switch, the second one padded
            row = torch.zeros(1, T, dtype=torch.long)
            row[0, :24] = ids[0]
            packed = model(row, cu_seqlens=torch.tensor([0, 10, 24, T], dtype=torch.int32))[0][0]
            torch.testing.assert_close(packed[:10], alone[0], rtol=0, atol=1e-10)
            torch.testing.assert_close(packed[10:24], alone[1], rtol=0, atol=1e-10)
        row = torch.zeros(1, 48, dtype=torch.long)
        row[0, :24] = ids[0]
        packed = model(row, cu_seqlens=torch.tensor([0, 24, 48], dtype=torch.int32))[0][0]
        torch.testing.assert_close(packed[:24], longer, rtol=0, atol=1e-10)  # a document past the switch: long
