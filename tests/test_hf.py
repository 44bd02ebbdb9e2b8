"""pyllm.hf: pyllm's kernels inside transformers models, against the same model in float64 with
a plain softmax(q k^T) v attention (below) and transformers' own MLP and loss, on the shapes transformers feeds an
attention function: no mask, left and right padding, packed documents, a KV cache, sliding
windows, capped scores; each also through the SDPA fallback used where no kernel takes the inputs."""
import copy
import gc
import inspect
import io
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import pyllm.hf as phf  # noqa: E402
from helpers import rel_err, tolerance  # noqa: E402

VOCAB = 97

# Small decoders of the families whose attention differs: GQA (llama), q/k/v biases (qwen2), a
# 5-key sliding window on every layer (mistral), Gemma 2's capped scores, query_pre_attn_scalar
# and alternating sliding layers, Phi-3's packed gate_up_proj. Head dim 32 (a kernel's); init
# wide enough (0.2) that attention weights are far from uniform and the cap bites.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 5, "attn_logit_softcapping": 2.0,
                                                     "final_logit_softcapping": None, "query_pre_attn_scalar": 24,
                                                     "head_dim": 32}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}
# Families whose logits are more than lm_head(hidden), for the fused loss: Gemma 2's capped logits (a cap
# these logits reach), Granite's divided (and its other multipliers), Cohere's scaled (its LayerNorm and
# parallel block, HF's own modules here).
LOGIT_FAMILIES = {
    "gemma2-capped": ("Gemma2Config", "Gemma2ForCausalLM", {**FAMILIES["gemma2"][2], "final_logit_softcapping": 2.0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 2.5, "embedding_multiplier": 3.0,
                                                        "residual_multiplier": 0.3, "attention_multiplier": 0.05}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.3}),
}


def float64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, s_aux=None, **kwargs):
    """The reference: softmax(q k^T * scaling) v written plainly, in the inputs' dtype (float64
    here; transformers' eager attention takes its softmax in fp32 and its SDPA path has no cap),
    under transformers' boolean mask (SDPA's: None for plain causal). s_aux: gpt-oss's sinks, a
    logit per head as one more key with a zero value."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores = query @ key.transpose(-1, -2) * scaling  # (B, H, T, S)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is None:  # what SDPA's is_causal makes of it: top-left causal (a static cache's
        T, S = scores.shape[-2:]  # unwritten keys come last), one query sees every key
        attention_mask = torch.ones(T, S, dtype=torch.bool).tril(0 if T > 1 else S)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    if s_aux is not None:
        sink = s_aux.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = scores.softmax(dim=-1).nan_to_num(0.0)
    return (probs @ value).transpose(1, 2).contiguous(), None  # (contiguous, as transformers' own: AFMoE views it)


transformers.AttentionInterface.register("float64", float64_attention)
transformers.masking_utils.AttentionMaskInterface.register("float64", transformers.masking_utils.sdpa_mask)


def tiny(family: str, dtype=torch.float64, head_dim: int = 32, attention: str = "float64", **overrides):
    """(reference on float64_attention, a copy patched with pyllm's kernels), the same weights."""
    config_name, model_name, extra = {**FAMILIES, **LOGIT_FAMILIES}[family]
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, **{**extra, **({"head_dim": head_dim} if "head_dim" in extra else {}), **overrides})
    config._attn_implementation = attention
    torch.manual_seed(0)
    reference = getattr(transformers, model_name)(config).to(dtype).eval()
    ours = copy.deepcopy(reference)
    if dtype == torch.float64:
        float64_norms(reference)
        float64_rotation(reference)
    return reference, ours


def float64_rotation(model):
    """Cohere's rotation (interleaved pairs) computes in fp32 even in a float64 model (q.float()); the
    reference's in float64, as pyllm's kernel does for float64 inputs. Llama's already does."""
    from transformers.models.cohere import modeling_cohere

    def exact(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        turn = modeling_cohere.rotate_half
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    for module in model.modules():
        forward = type(module).forward
        rotary = getattr(inspect.unwrap(forward), "__globals__", {}).get("apply_rotary_pos_emb")
        if rotary is not None and phf._same_code(rotary, modeling_cohere.apply_rotary_pos_emb):
            module.forward = types.MethodType(phf._with_globals(forward, {"apply_rotary_pos_emb": exact}), module)


def float64_norms(model):
    """transformers' RMSNorms take the mean square in fp32 even in a float64 model (x.to(float32));
    the reference's in float64, as pyllm's kernel does for float64 inputs. Gemma's scale is 1 + w."""
    def exact(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
        offset = 1.0 if "Gemma" in type(self).__name__ else 0.0
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + self.weight)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(exact, module)


@pytest.fixture(params=["kernel", "sdpa_fallback"])
def path(request, monkeypatch):
    """Each test twice: through pyllm's kernels, and with every call sent down the fallback."""
    if request.param == "sdpa_fallback":
        monkeypatch.setattr(phf, "_kernel_takes", lambda *args, **kwargs: False)
    return request.param


def inputs(B=3, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


def cache_of(output):
    """A forward's KV cache: transformers 5.25 renamed past_key_values to cache (the old name warns,
    and goes in 5.40), 5.20 (Python 3.10's last) has only the old."""
    return output.cache if "cache" in type(output).__dataclass_fields__ else output.past_key_values


def with_cache(model, cache) -> dict:
    """The cache as a forward's keyword argument, by the name this transformers takes (cache_of)."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def padded(B=3, T=13, left=True):
    mask = torch.ones(B, T, dtype=torch.long)
    for b, pad in enumerate([0, 4, 9][:B]):
        if left:
            mask[b, :pad] = 0
        else:
            mask[b, T - pad:] = 0
    return mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_are_the_references(family, padding, path, monkeypatch):
    reference, ours = tiny(family)
    applied = phf.apply_pyllm_kernels(ours)
    calls = []
    kernel = phf.flash_attn_ops._flash_attn_body  # the forward kernel, however it is reached
    monkeypatch.setattr(phf.flash_attn_ops, "_flash_attn_body", lambda *a: calls.append(1) or kernel(*a))
    assert applied == {"attention": True, "swiglu": 0 if family == "gemma2" else 2,  # Gemma's MLP is GELU-gated:
                       "geglu": 2 if family == "gemma2" else 0,  # the tanh GELU's
                       "rms_norm": 9 if family == "gemma2" else 5,  # Gemma 2: 4 per layer, else 2; + the final
                       "rope": 0 if family == "phi3" else 2,  # Phi-3's rotary has its own (partial) function
                       "fused_linear_cross_entropy": True}
    ids = inputs()
    mask = None if padding is None else padded(left=padding == "left")
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert rel_err(got[real], want[real]) < 1e-12
    assert len(calls) == (2 if path == "kernel" else 0)  # a kernel call per layer, or none


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_documents_are_each_alone(family, how, path):
    # TRL's padding_free / DataCollatorWithFlattening: documents back to back in one row, each
    # attending to itself only (the windows inside each), as if run one by one.
    reference, ours = tiny(family)
    phf.apply_pyllm_kernels(ours)
    lengths = [6, 1, 9, 4]
    ids = inputs(1, sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    extra = {}
    if how == "cu_seq_lens":
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    with torch.no_grad():
        got = ours(ids, position_ids=position_ids, **extra).logits[0]
        want = torch.cat([reference(doc[None]).logits[0] for doc in ids[0].split(lengths)])
    assert rel_err(got, want) < 1e-12


def test_a_4d_mask_of_the_callers_own():
    # A block-diagonal causal 4D mask (packing by mask; transformers passes it through as it is),
    # bool or additive: SDPA under it, as the unpatched model (the kernels take no such mask); it
    # had been refused.
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    B, T = 2, 10
    ids = inputs(B, T)
    seen = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    seen[:, :, 5:, :5] = False
    additive = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~seen, torch.finfo(torch.float64).min)
    for mask in (seen, additive):
        with torch.no_grad():
            assert rel_err(ours(ids, attention_mask=mask).logits, reference(ids, attention_mask=seen).logits) < 1e-12


def test_packed_rows_with_padding_read_by_the_mask_on_either_path(path):
    # position_ids that restart inside rows and a mask that pads: the batch is read by its mask alone
    # (as transformers' flash-attention and its SDPA mask do), on the kernels' path and on the
    # fallback alike (the fallback had applied the documents too: the two paths differed).
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    ids, mask = inputs(), padded()
    position_ids = torch.cat([torch.arange(6), torch.arange(7)])[None].expand(3, 13)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert rel_err(got[real], want[real]) < 1e-12


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_with_a_cache(family, padding, cache, path, monkeypatch):
    # The cache's queries sit at the end of its keys (decode steps: the KV-cache kernel on views of
    # transformers' cache, one call for the batch, left-padded rows' keys starting at their pads:
    # cache_leftpad); the sliding windows' caches (mistral, gemma2) drop keys once the prompt and
    # the new tokens pass the window.
    reference, ours = tiny(family)
    phf.apply_pyllm_kernels(ours)
    calls, pads = [], []
    kernel = phf.flash_attn_ops.flash_attn_with_kvcache
    monkeypatch.setattr(phf.flash_attn_ops, "flash_attn_with_kvcache",
                        lambda *a, **k: calls.append(a[0].shape[0]) or pads.append(k.get("cache_leftpad"))
                        or kernel(*a, **k))
    ids, mask = inputs(3, 9), padded(3, 9) if padding else torch.ones(3, 9, dtype=torch.long)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    if cache == "static":  # keys of a fixed capacity, the mask as wide as what is written
        settings["cache_implementation"] = "static"
    want, got = reference.generate(ids, **settings), ours.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert rel_err(torch.stack(got.logits), torch.stack(want.logits)) < 1e-12
    if path == "kernel":  # 7 decode steps of 2 layers, one call each; the pads passed while the cache
        # holds them (a window's cache drops them)
        assert calls == [3] * 2 * 7
        assert any(p is not None for p in pads) == padding


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", *LOGIT_FAMILIES])
@pytest.mark.parametrize("reduction", ["mean", "num_items_in_batch", "shift_labels"])
def test_training_loss_and_gradients(family, reduction, path):
    # Right-padded batch, labels -100 on the padding, as a collator writes them: the fused loss is
    # F.cross_entropy over the shifted labels in float64 (HF's own loss upcasts to fp32 only), with
    # the logits capped or scaled as each model's forward does.
    reference, ours = tiny(family)
    phf.apply_pyllm_kernels(ours)
    reference.train(), ours.train()
    ids, mask = inputs(), padded(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    logits = reference(ids, attention_mask=mask).logits
    want = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum")
    mean = (want / (shifted != -100).sum()).item()
    kwargs = {"labels": labels}
    if reduction == "mean":
        want = want / (shifted != -100).sum()
    elif reduction == "num_items_in_batch":
        kwargs["num_items_in_batch"] = torch.tensor(41)
        want = want / 41
    else:  # shift_labels wins over labels, as in ForCausalLMLoss
        kwargs = {"labels": ids, "shift_labels": shifted}
        want = want / (shifted != -100).sum()
    out = ours(ids, attention_mask=mask, **kwargs)
    assert out.logits is None  # never made whole
    assert rel_err(out.loss, want) < 1e-12
    want.backward()
    out.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-10, name
    ours.eval()
    with torch.no_grad():  # eval: HF's forward, logits and all
        evaluated = ours(ids, attention_mask=mask, labels=labels)
    assert evaluated.logits is not None and evaluated.loss.item() == pytest.approx(mean, rel=1e-6)


def test_inference_mode_and_reused_position_ids():
    # Inference tensors have no version counter; a position_ids tensor handed again with another
    # batch size is read again (the per-forward memo of where documents start).
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    ids, mask = inputs(3, 9), padded(3, 9)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        assert torch.equal(ours.generate(ids, **settings), reference.generate(ids, **settings))
        assert rel_err(ours(ids).logits, reference(ids).logits) < 1e-12
    position_ids = torch.cat([torch.arange(4), torch.arange(5)])[None]
    with torch.no_grad():
        for B in (1, 3):
            got = ours(ids[:B], position_ids=position_ids).logits
            want = torch.cat([reference(doc).logits for doc in ids[:B].split([4, 5], dim=1)], dim=1)
            assert rel_err(got, want) < 1e-12


def test_only_llamas_mlp_code_is_replaced():
    # An MLP that adds a step to Llama's (Falcon-H1's multipliers, say) keeps its own forward.
    from transformers.models.llama.modeling_llama import LlamaMLP

    class ScaledMLP(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 0.5

    reference, ours = tiny("llama")
    for model in (reference, ours):
        model.model.layers[1].mlp.__class__ = ScaledMLP
    assert phf.apply_pyllm_kernels(ours)["swiglu"] == 1
    ids = inputs()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, reference(ids).logits) < 1e-12


def test_same_code_compares_every_constant_and_no_docstring():
    # One scaling by another constant is not Llama's code, whichever constant comes first (Python
    # 3.14 no longer puts None first where a function has no docstring); a copy with a docstring is,
    # before 3.14 (from 3.14 its constants' indices in the bytecode differ).
    def half(x):
        return x * 0.5

    def third(x):
        return x * 0.25

    def half_documented(x):
        """Halves x."""
        return x * 0.5

    if sys.version_info < (3, 14):
        assert phf._same_code(half, half_documented) and phf._same_code(half_documented, half)
    assert phf._same_code(half, half) and not phf._same_code(half, third) and not phf._same_code(half_documented, third)
    assert not phf._same_code(None, half)


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate", "gelu", "relu"])
def test_tanh_gelu_gated_mlps_run_geglu(family, hidden_act, monkeypatch):
    # transformers' four names for the tanh GELU get the fused GeGLU (in Llama's MLP as in Gemma's,
    # and Phi-3's packed one); the exact GELU and other activations keep their own forward. Inputs no
    # kernel takes run the module's own activation (gelu_fast's constants differ in the 11th digit).
    reference, ours = tiny(family, hidden_act=hidden_act)
    tanh = hidden_act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate")
    applied = phf.apply_pyllm_kernels(ours)
    assert (applied["swiglu"], applied["geglu"]) == (0, 2 if tanh else 0)
    ids = inputs()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, reference(ids).logits) < 1e-12
        monkeypatch.setattr(phf.pnn, "_swiglu_takes", lambda x: False)
        x = torch.randn(2, 5, 128, dtype=torch.float64)
        assert torch.equal(ours.model.layers[0].mlp(x), reference.model.layers[0].mlp(x))
    assert phf.apply_pyllm_kernels(copy.deepcopy(reference), geglu=False)["geglu"] == 0


def test_activation_subclasses_keep_their_forward():
    # A subclass of torch's GELU or SiLU may compute something else: matched by exact class only.
    class ClampedGELU(nn.GELU):
        def forward(self, x):
            return super().forward(x).clamp(max=1.0)

    class ScaledSiLU(nn.SiLU):
        def forward(self, x):
            return 2 * super().forward(x)

    _, ours = tiny("llama")
    ours.model.layers[0].mlp.act_fn = ClampedGELU(approximate="tanh")
    ours.model.layers[1].mlp.act_fn = ScaledSiLU()
    applied = phf.apply_pyllm_kernels(ours)
    assert (applied["swiglu"], applied["geglu"]) == (0, 0)
    ours.model.layers[1].mlp.act_fn = nn.GELU(approximate="tanh")
    assert phf.apply_pyllm_kernels(ours)["geglu"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_geglu_mlp_within_twice_the_modules_error(dtype):
    # Gemma's MLP in the model's dtype, ours against transformers' module, both against float64.
    reference, _ = tiny("gemma2")
    mlp64 = reference.model.layers[0].mlp
    module = copy.deepcopy(mlp64).to(dtype)
    patched = copy.deepcopy(module)
    phf._patch_gated_mlps(patched, silu=True, gelu_tanh=True)
    assert patched.forward.__func__ is phf._geglu_mlp_forward
    x = torch.randn(3, 7, mlp64.hidden_size, dtype=torch.float64) * 2
    dy = torch.randn(3, 7, mlp64.hidden_size, dtype=torch.float64)

    def run(mlp, x):
        x = x.detach().clone().requires_grad_()
        y = mlp(x)
        dx, dw = torch.autograd.grad(y, (x, mlp.gate_proj.weight), dy.to(y.dtype))
        return y, dx, dw

    want = run(mlp64, x)
    theirs = run(module, x.to(dtype))
    for got, torch_out, ref in zip(run(patched, x.to(dtype)), theirs, want):
        assert rel_err(got, ref) <= tolerance(torch_out, ref)


def tiny_gpt_oss():
    """gpt-oss: attention sinks (s_aux), alternating sliding and full layers, a MoE of clamped
    SwiGLU experts with biases; sinks set far from 0 so that they matter."""
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, initializer_range=0.2,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    config._attn_implementation = "float64"
    config._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(0)
    reference = transformers.GptOssForCausalLM(config).double().eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, 4))
    ours = copy.deepcopy(reference)
    float64_norms(reference)
    return reference, ours


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_attention_sinks(padding, path, monkeypatch):
    # gpt-oss's sinks (transformers' s_aux): pyllm.flash_attn(sinks=) in the forward, the gradient of
    # the sinks and of everything else against the reference's, and decode steps over a cache.
    reference, ours = tiny_gpt_oss()
    applied = phf.apply_pyllm_kernels(ours)
    assert applied["rms_norm"] == 5  # gpt-oss's own form (scaled in fp32), 2 per layer and the final
    calls = []
    rescale = phf.flash_attn_ops._with_sinks  # the sinks' rescale of a kernel's output, on every path
    monkeypatch.setattr(phf.flash_attn_ops, "_with_sinks", lambda *a: calls.append(a[2] is not None) or rescale(*a))
    ids = inputs()
    mask = None if padding is None else padded(left=padding == "left")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    grads = []
    for model in (reference, ours):
        model.train()
        logits = model(ids, attention_mask=mask).logits
        (logits[real] ** 2).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert rel_err(logits[real], reference(ids, attention_mask=mask).logits[real]) < 1e-12
    for name, want in grads[0].items():
        assert rel_err(grads[1][name], want) < 1e-10, name
    if padding == "right":  # generating after right padding puts the padding inside the sliding window
        return  # (counted by position in the reference, by real tokens in flash-attention's unpadding)
    for model in (reference, ours):
        model.eval()
    settings = dict(attention_mask=real.long(), max_new_tokens=6, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    want, got = reference.generate(ids, **settings), ours.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert rel_err(torch.stack(got.logits), torch.stack(want.logits)) < 1e-12
    if path == "kernel":  # a training forward and a prefill of 2 layers, 5 decode steps, one call each (left
        # padded too: cache_leftpad)
        assert all(calls) and len(calls) == 14
    else:
        assert calls == []


def tiny_moe(family: str):
    """(reference, copy) of a small mixture of experts in float64: Qwen3-MoE's or Mixtral's, 4
    experts, 2 a token; gpt-oss's from tiny_gpt_oss."""
    if family == "gpt_oss":
        return tiny_gpt_oss()
    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, router_aux_loss_coef=0.3)  # a coefficient that shows
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, head_dim=32, **common)
        model = transformers.Qwen3MoeForCausalLM
    elif family == "granitemoe":  # its logits divided by logits_scaling
        config = transformers.GraniteMoeConfig(num_local_experts=4, intermediate_size=32, logits_scaling=2.5,
                                               embedding_multiplier=3.0, residual_multiplier=0.3, **common)
        model = transformers.GraniteMoeForCausalLM
    else:
        config = transformers.MixtralConfig(num_local_experts=4, intermediate_size=32, head_dim=32, **common)
        model = transformers.MixtralForCausalLM
    config._attn_implementation = "float64"
    config._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(0)
    reference = model(config).double().eval()
    ours = copy.deepcopy(reference)
    float64_norms(reference)
    return reference, ours


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "granitemoe"])
@pytest.mark.parametrize("router", [None, True, False])  # the config's (False), or asked for in the call
def test_mixture_of_experts_fused_loss_adds_the_balancing_loss(family, router):
    # HF's MoE forward adds router_aux_loss_coef times its load-balancing loss when output_router_logits:
    # the fused loss adds the same (transformers' own function), and aux_loss is returned as HF's.
    reference, ours = tiny_moe(family)
    assert phf.apply_pyllm_kernels(ours)["fused_linear_cross_entropy"]
    reference.train(), ours.train()
    ids, mask = inputs(), padded(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    extra = {} if router is None else {"output_router_logits": router}
    expected = reference(ids, attention_mask=mask, **extra)
    want = F.cross_entropy(expected.logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    if router:
        want = want + reference.router_aux_loss_coef * expected.aux_loss
    got = ours(ids, attention_mask=mask, labels=labels, **extra)
    assert got.logits is None and (got.aux_loss is None) == (not router)
    if router:
        assert rel_err(got.aux_loss, expected.aux_loss) < 1e-12 and len(got.router_logits) == 2
    assert rel_err(got.loss, want) < 1e-12
    want.backward()
    got.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        if p.grad is not None or q.grad is not None:
            assert rel_err(q.grad, p.grad) < 1e-10, name


# A small model of any listed type from its config's defaults: these sizes where the config has the
# field, and what some types need besides (multi-head latent attention's dims, a hybrid's layer kinds).
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
             n_routed_experts=4, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, n_group=1, topk_group=1,
             shared_expert_intermediate_size=32, expert_ffn_hidden_size=32, ffn_hidden_size=96, pad_token_id=0,
             bos_token_id=2, eos_token_id=1, attention_dropout=0.0, attn_pdrop=0.0,
             # the hybrids' state-space and linear-attention mixers (their defaults: 128 heads, states of
             # 256, 4.4M parameters in Kimi Linear's; 8-11 s a type in transformers' reference code paths,
             # ~2 s now); chunks of 8 so that T = 11 spans two
             mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=8, mamba_d_ssm=128,
             linear_num_heads=4, linear_head_dim=16)
MLA = dict(num_key_value_heads=4, head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=16, qk_head_dim=24, v_head_dim=16)
SMALL_BY_TYPE = {"minicpm3": dict(MLA, qk_rope_head_dim=16, head_dim=16, qk_head_dim=32),
                 "zamba": dict(layers_block_type=["linear_attention", "hybrid", "hybrid"], num_hidden_layers=3,
                               use_mamba_kernels=False),
                 "zamba2": dict(layers_block_type=["linear_attention", "hybrid", "hybrid"], num_hidden_layers=3,
                                hybrid_layer_ids=[1, 2], use_mamba_kernels=False),
                 "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
                 "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
                 "falcon_h1": dict(lm_head_multiplier=0.37),  # (1.0 by default: no scale to get wrong)
                 "beam": dict(final_logit_softcapping=2.0)}  # a cap these logits reach
# Types whose forward rounds its logits to fp32 whatever the model's dtype (Beam caps them in fp32):
# the fused loss (float64 here) within fp32 rounding of theirs.
FP32_LOGITS = {"beam"}


def tiny_of_type(model_type: str):
    """(reference, copy) of a small float64 transformers model of this model_type, on float64_attention
    where it takes attention by name, and eager experts (skipped where the installed transformers has
    no such type)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    overrides = {k: v for k, v in SMALL.items()  # (not Falcon's head_dim, a property of its other sizes)
                 if hasattr(default, k) and not isinstance(getattr(config_class, k, None), property)}
    if hasattr(default, "kv_lora_rank"):
        overrides.update({k: v for k, v in MLA.items() if hasattr(default, k)})
    config = config_class(**{**overrides, **SMALL_BY_TYPE.get(model_type, {})})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).double()
    if reference._can_set_attn_implementation():  # (Falcon, GPT-Neo, BLOOM keep their own)
        reference.set_attn_implementation("float64")
    return reference, copy.deepcopy(reference)


@pytest.mark.parametrize("model_type", sorted(phf.FUSED_LOSS_MODEL_TYPES | phf.FUSED_LOSS_MOE_TYPES
                                              | phf.FUSED_LOSS_ROUTED_TYPES))
def test_every_listed_type_gives_its_loss_and_gradients(model_type):
    # Each model type the fused loss takes, built small from its config's defaults. The fused loss
    # alone: on a right-padded batch, F.cross_entropy over the unpatched model's own logits (float64)
    # and every gradient its own, the output of the model's kind (mixtures of experts: with
    # router_logits), no logits. Every kernel the model takes as well: the loss within 1e-6 of that,
    # the gradients 1e-5 (the model's own modules round to fp32 inside a float64 model in places:
    # norms, rotary tables, routers; pyllm's kernels stay in float64; the per-family tests above
    # hold them to 1e-10 against float64 norms). Gradients compared as one vector (a key bias's is 0
    # but for rounding). A model that does not take flash-attention's
    # 2D mask refuses pyllm's attention; one whose output layer has a bias, the fused loss.
    reference, fused = tiny_of_type(model_type)
    every = copy.deepcopy(reference)
    attention = every._can_set_attn_implementation() and getattr(every, "_supports_flash_attn", True)
    if not attention:
        with pytest.raises(ValueError, match="does not take flash-attention's 2D padding mask|does not take attention "
                                             "functions by name"):
            phf.apply_pyllm_kernels(every)
    if type(fused.get_output_embeddings()) is not nn.Linear or fused.get_output_embeddings().bias is not None:
        with pytest.raises(ValueError, match="not a plain nn.Linear without bias"):  # Phi-2's biased output layer
            phf.apply_pyllm_kernels(every, attention=attention)
        return
    phf.apply_pyllm_kernels(fused, attention=False, swiglu=False, geglu=False, rms_norm=False, rope=False)
    phf.apply_pyllm_kernels(every, attention=attention)
    ids, mask = inputs(B=2, T=11), padded(B=2, T=11, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    outputs = []
    for model in (reference, fused, every):
        model.train()
        torch.manual_seed(3)  # (any dropout or router noise drawn the same)
        # use_cache=False: hybrids' caches (HF's) error in a training forward
        out = model(ids, attention_mask=mask, use_cache=False, **({} if model is reference else {"labels": labels}))
        if model is reference:
            out.loss = F.cross_entropy(out.logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        out.loss.backward()
        outputs.append(out)
    want, got, got_every = outputs
    assert got.logits is None and type(got) is type(want) and type(got_every) is type(want)
    exact = 1e-6 if model_type in FP32_LOGITS else 1e-12
    assert rel_err(got.loss, want.loss) < exact
    assert rel_err(got_every.loss, want.loss) < 1e-6
    with torch.no_grad():  # the model's own labelled loss (fp32: ForCausalLMLoss upcasts), nothing else added
        torch.manual_seed(3)
        own = reference(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    assert rel_err(got.loss, own.double()) < 1e-6
    def gradient(model):
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])

    assert rel_err(gradient(fused), gradient(reference)) < exact
    assert rel_err(gradient(every), gradient(reference)) < 1e-5


def test_tuple_outputs_and_a_lora_output_layer():
    peft = pytest.importorskip("peft")
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    reference.train(), ours.train()
    ids = inputs()
    loss, = ours(ids, labels=ids, return_dict=False)[:1]
    assert rel_err(loss, reference(ids, labels=ids).loss.double()) < 1e-6  # HF's loss is fp32
    # HF's tuple is (loss, logits, cache): the logits' place kept (None), so out[1] is not the cache
    want, got = reference(ids, labels=ids, return_dict=False), ours(ids, labels=ids, return_dict=False)
    assert len(got) == len(want) == 3 and got[1] is None and type(got[2]) is type(want[2])
    assert len(ours(ids, labels=ids, return_dict=False, use_cache=False)) == 2
    # PEFT wraps lm_head in LoRA after the patch: the output layer is no plain Linear any more, so
    # the loss is HF's forward's, the adapter trained.
    models = []
    for model in (reference, ours):
        torch.manual_seed(5)
        models.append(peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                  init_lora_weights=False)))
    want, got = (m(input_ids=ids, labels=ids).loss for m in models)
    assert rel_err(got, want) < 1e-6
    got.backward()
    assert models[1].base_model.model.lm_head.lora_A["default"].weight.grad is not None
    # PEFT first, then the patch (lm_head in LoRA, or kept whole by modules_to_save): the same, where
    # the fused loss had been refused (the order of the two had decided whether a run started)
    for lora in (dict(target_modules=["q_proj", "lm_head"]), dict(target_modules=["q_proj"], modules_to_save=["lm_head"])):
        reference, ours = tiny("llama")
        models = []
        for model in (reference, ours):
            torch.manual_seed(5)
            models.append(peft.get_peft_model(model, peft.LoraConfig(r=4, init_lora_weights=False, **lora)))
        assert phf.apply_pyllm_kernels(models[1])["fused_linear_cross_entropy"]
        for model in models:
            model.train()
        want, got = (m(input_ids=ids, labels=ids).loss for m in models)
        assert rel_err(got, want) < 1e-6


_DROPPED_ROWS: list = []  # (first real token, real tokens) of each padded row, for float64_dropped_attention


def float64_dropped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """float64_attention with pyllm's dropout: one seed drawn per call, as pyllm's attention draws it,
    and the elements pyllm.ops.flash_attn.dropout_mask keeps for (row, head) over each row's real
    tokens (_DROPPED_ROWS; positions counted from a row's first real token, as the kernels' unpadded
    sequences count them), scaled by 1 / (1 - p)."""
    if not dropout:
        return float64_attention(module, query, key, value, attention_mask, scaling, **kwargs)
    from pyllm.ops import flash_attn as fa
    seed = fa._new_dropout_seed()
    B, H, T, S = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    keep = torch.zeros(B, H, T, S, dtype=torch.bool)
    for b in range(B):
        start, n = _DROPPED_ROWS[b] if _DROPPED_ROWS else (0, T)
        for h in range(H):
            keep[b, h, start:start + n, start:start + n] = fa.dropout_mask(seed, b, h, n, n, dropout)
    groups = H // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is None:
        attention_mask = torch.ones(T, S, dtype=torch.bool).tril(0)
    probs = scores.masked_fill(~attention_mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return ((probs * keep / (1 - dropout)) @ value).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("float64_dropped", float64_dropped_attention)
transformers.masking_utils.AttentionMaskInterface.register("float64_dropped", transformers.masking_utils.sdpa_mask)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_dropout_runs_in_the_kernels(family):
    # Attention dropout while training (GPT-2's attn_pdrop 0.1 by default; Llama's attention_dropout):
    # pyllm's kernels with dropout_p (before 2026-12-05 SDPA's), the elements pyllm.ops.flash_attn's
    # dropout_mask gives for each call's seed: loss and gradients as the float64 reference with those
    # elements, padded (left or right) or not; another seed other draws. Eval (no dropout) keeps the kernels.
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
        model_class = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, attn_pdrop=0.3,
                                         resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=2, eos_token_id=1)
        model_class = transformers.GPT2LMHeadModel
    config._attn_implementation = "float64_dropped"
    torch.manual_seed(0)
    reference = model_class(config).double().train()
    ours = copy.deepcopy(reference)
    phf.apply_pyllm_kernels(ours)
    ids = inputs()
    for mask in (None, padded(left=False), padded(left=True)):
        _DROPPED_ROWS[:] = [] if mask is None else list(zip(mask.argmax(1).tolist(), mask.sum(1).tolist()))
        losses = []
        for model in (reference, ours):
            model.zero_grad()
            torch.manual_seed(1)
            losses.append(model(ids, attention_mask=mask, labels=ids).loss)
            losses[-1].backward()
        assert rel_err(losses[1], losses[0].double()) < 1e-6  # (HF's loss: fp32; the same elements dropped)
        for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
            assert rel_err(q.grad, p.grad) < 1e-5, name
        torch.manual_seed(2)
        assert abs(ours(ids, attention_mask=mask, labels=ids).loss.item() - losses[1].item()) > 1e-4  # other draws
    _DROPPED_ROWS[:] = []
    reference.eval(), ours.eval()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, reference(ids).logits) < 1e-6  # (HF's norms: fp32 in a float64 model)


def test_gradients_through_a_cached_prompt():
    # A few new tokens over a cache with gradients wanted (training over a cached prompt, prefix
    # tuning): not the KV-cache kernel (inference only), the differentiable attention.
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    ids = inputs(3, 21)
    for model in (reference, ours):
        with torch.no_grad():
            cache = cache_of(model(ids[:, :13], use_cache=True))
        model(ids[:, 13:], **with_cache(model, cache), use_cache=True).logits.logsumexp(-1).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        if p.grad is not None:
            assert rel_err(q.grad, p.grad) < 1e-10, name


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_peft_wrapper_keeps_its_forward(method):
    # apply_pyllm_kernels on a PeftModel patches the transformers model inside: PEFT's own forward
    # still adds prompt tuning's virtual tokens (prefix tuning's trained cache) while training with
    # labels, so the prompt's embedding gets its gradient (patching the wrapper had bypassed it: no
    # gradient at all). Loss and prompt gradient as the unpatched wrapper's.
    peft = pytest.importorskip("peft")
    reference, ours = tiny("llama")
    config = (peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4)
    wrapped = []
    for model in (reference, ours):
        torch.manual_seed(3)
        wrapped.append(peft.get_peft_model(model, config).train())
    phf.apply_pyllm_kernels(wrapped[1])
    assert type(wrapped[1]).__name__ == "PeftModelForCausalLM" and type(ours).__name__ == "LlamaForCausalLM"
    ids = inputs()
    losses = [m(input_ids=ids, labels=ids).loss for m in wrapped]
    assert rel_err(losses[1], losses[0].double()) < 1e-6  # (HF's loss in fp32)
    for loss in losses:
        loss.backward()
    grads = [m.prompt_encoder.default.embedding.weight.grad for m in wrapped]
    assert rel_err(grads[1], grads[0]) < 1e-6


def test_the_fused_loss_forward_has_the_models_signature():
    # Positional arguments in the model's own order (Llama's past_key_values 4th, GPT-2's 2nd), and
    # the signature that the Trainer (remove_unused_columns) and generate (its kwargs check) read:
    # the model's, so GPT-2's token_type_ids are not dropped or refused.
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    assert inspect.signature(ours.forward) == inspect.signature(reference.forward)
    ids = inputs()
    reference.train(), ours.train()
    with torch.no_grad():
        cache = cache_of(ours(ids[:, :8], use_cache=True))
        want = cache_of(reference(ids[:, :8], use_cache=True))
        got = ours(ids[:, 8:], None, None, cache).logits
        assert rel_err(got, reference(ids[:, 8:], None, None, want).logits) < 1e-10
        mask = torch.ones_like(ids)
        assert rel_err(ours(ids, mask, None, None, None, ids).loss, reference(ids, mask, labels=ids).loss.double()) < 1e-6
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2, bos_token_id=2, eos_token_id=1)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    phf.apply_pyllm_kernels(gpt2)
    assert "token_type_ids" in inspect.signature(gpt2.forward).parameters
    out = gpt2.generate(ids[:1, :5], token_type_ids=torch.zeros(1, 5, dtype=torch.long), max_new_tokens=2,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_a_value_head_dim_of_its_own():
    # DeepSeek's MLA: values narrower than queries and keys; no kernel takes that, the fallback does.
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
        n_group=1, topk_group=1, initializer_range=0.2, pad_token_id=0)
    config._attn_implementation = "float64"
    config._experts_implementation = "eager"  # grouped_mm has no float64
    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(config).double().eval()
    ours = copy.deepcopy(reference)
    float64_norms(reference)
    phf.apply_pyllm_kernels(ours, fused_linear_cross_entropy=False)
    ids, mask = inputs(), padded()
    with torch.no_grad():
        assert rel_err(ours(ids, attention_mask=mask).logits[mask.bool()],
                       reference(ids, attention_mask=mask).logits[mask.bool()]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_low_precision_error_is_within_twice_torchs(dtype, family):
    reference, _ = tiny(family)
    # torch's own: transformers' SDPA path (eager for Gemma 2, which SDPA cannot cap) in that dtype
    torch_model, ours = tiny(family, dtype, attention="eager" if family == "gemma2" else "sdpa")
    phf.apply_pyllm_kernels(ours)
    ids, mask = inputs(), padded()
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        torch_out = torch_model(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(got[real], want[real]) <= tolerance(torch_out[real], want[real])


@pytest.mark.parametrize("head_dim", [20, 260])
def test_head_dims_without_a_kernel(head_dim, monkeypatch):
    # pyllm's kernels' head dims are 32, 64, 96, 128, 256: 20 runs them zero-padded to 32 (training
    # and prefill, and the decode step over the cache), past 256 SDPA computes it, a mask per batch row.
    reference, ours = tiny("llama", head_dim=head_dim)
    phf.apply_pyllm_kernels(ours)
    masks = []
    sdpa = phf.pnn._sdpa
    monkeypatch.setattr(phf.pnn, "_sdpa", lambda q, k, v, mask, **kw: masks.append(mask.shape) or sdpa(q, k, v, mask,
                                                                                                        **kw))
    ids, mask = inputs(), padded()
    with torch.no_grad():
        assert rel_err(ours(ids, attention_mask=mask).logits[mask.bool()],
                       reference(ids, attention_mask=mask).logits[mask.bool()]) < 1e-12
    # a mask per batch row, not one over the batch's every token
    assert masks == ([] if head_dim <= 256 else [(3, 1, 13, 13)] * 2)
    # training: the gradients through it (float64 throughout; HF's own loss would round to fp32)
    got, want = (m.train()(ids, attention_mask=mask).logits[mask.bool()] for m in (ours, reference))
    dout = torch.randn_like(want)
    grads = torch.autograd.grad(got, list(ours.parameters()), dout)
    want_grads = torch.autograd.grad(want, list(reference.parameters()), dout)
    assert all(rel_err(g, w) < 1e-10 for g, w in zip(grads, want_grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_steps_at_a_head_dim_without_a_kernel_take_the_faster_route(dtype, monkeypatch):
    # Head dim 20 runs the kernels zero-padded, but the decode steps in fp32 run SDPA: the widened
    # copy of the cache each step lost there (0.21-0.32x); in 16 bits the kv-cache kernel's.
    _, ours = tiny("llama", head_dim=20)
    ours = ours.to(dtype)
    phf.apply_pyllm_kernels(ours)
    routes = []
    for name in ("_attend", "_decode", "_reference_rows"):
        original = getattr(phf, name)
        monkeypatch.setattr(phf, name, lambda *a, _f=original, _n=name, **kw: routes.append(_n) or _f(*a, **kw))
    ids, mask = inputs(), padded()
    with torch.no_grad():
        ours.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    layers = ours.config.num_hidden_layers
    assert routes[:layers] == ["_attend"] * layers  # the prompt
    assert set(routes[layers:]) == {"_reference_rows" if dtype == torch.float32 else "_decode"}


def test_attention_by_name_at_load(tmp_path):
    reference, _ = tiny("llama")
    reference.save_pretrained(tmp_path)
    phf.register_attention()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="pyllm",
                                                               dtype=torch.float64)
    assert loaded.config._attn_implementation == "pyllm"
    float64_norms(loaded)  # only the attention is pyllm's here
    ids, mask = inputs(), padded()
    with torch.no_grad():
        assert rel_err(loaded(ids, attention_mask=mask).logits[mask.bool()],
                       reference(ids, attention_mask=mask).logits[mask.bool()]) < 1e-12


def test_what_it_cannot_take_is_refused():
    _, capped = tiny("llama", final_logit_softcapping=30.0)  # a cap Llama's forward does not apply: unread
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        phf.apply_pyllm_kernels(capped)
    assert phf.apply_pyllm_kernels(capped, fused_linear_cross_entropy=False)["attention"]
    _, unscaled = tiny("granite", logits_scaling=0.0)
    with pytest.raises(ValueError, match="scale cannot be read"):
        phf.apply_pyllm_kernels(unscaled)
    for cap in (0.0, -30.0):  # HF's forward gives NaN for 0 (and caps at 30 for -30): refused at the patch
        _, odd = tiny("gemma2", final_logit_softcapping=cap)
        with pytest.raises(ValueError, match="is not a positive number"):
            phf.apply_pyllm_kernels(odd)
    _, bamba = tiny_of_type("bamba")
    bamba.z_loss_coefficient = 1e-4  # (its config's z_loss_coefficient): a z-loss over every position, unlabelled too
    with pytest.raises(ValueError, match="z-loss over every position"):
        phf.apply_pyllm_kernels(bamba, attention=False)
    _, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    ours.train()
    labels = inputs()
    labels[0, 4] = -1  # out of range, as HF's loss says (IndexError): not silently ignored yet counted
    with pytest.raises(ValueError, match=r"targets must be in \[0, 97\)"):
        ours(inputs(), labels=labels)
    ours.eval()
    with pytest.raises(ValueError, match="sinks must have shape"):
        phf.attention_forward(ours.model.layers[0].self_attn, *torch.randn(3, 1, 4, 5, 32, dtype=torch.float64),
                              None, s_aux=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"a 2D padding mask \(B, S\) or a 4D mask"):
        phf.attention_forward(ours.model.layers[0].self_attn, *torch.randn(3, 1, 4, 5, 32, dtype=torch.float64),
                              torch.ones(1, 5, 5, dtype=torch.bool))


# Models a requested part does not fit (the fused loss on a model without a plain output layer, or
# whose logits are more than lm_head(hidden)): (config, model, config overrides, the refusal).
REFUSED = {
    "llama-classifier": ("LlamaConfig", "LlamaForSequenceClassification", {}, "output layer is not a plain nn.Linear"),
    "llama-decoder": ("LlamaConfig", "LlamaModel", {}, "output layer is not a plain nn.Linear"),
    # (TRL's RewardTrainer's model: a MoE type's classifier had been told its forward is not transformers')
    "mixtral-classifier": ("MixtralConfig", "MixtralForSequenceClassification",
                           {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2},
                           "it has no language-model head"),
    "bert-masked-lm": ("BertConfig", "BertForMaskedLM", {}, "model_type 'bert' is not one whose logits"),
    "llama-capped": ("LlamaConfig", "LlamaForCausalLM", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
}


def made(config_name: str, model_name: str, **overrides):
    """A small fp32 transformers model on its default attention, each call the same weights (and a
    config of its own: set_attn_implementation writes to the config)."""
    config = getattr(transformers, config_name)(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                                                **overrides)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def model_state(model):
    """What a call that raises must leave as it was: the attention, each module's class, forward and
    attributes (by identity), each config's attributes."""
    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None),
                                                                             transformers.PretrainedConfig)}
    return (model.config._attn_implementation, [dict(vars(c)) for c in configs.values()],
            [(name, type(m), m.forward, {k: id(v) for k, v in vars(m).items()}) for name, m in model.named_modules()])


def model_output(model):
    with torch.no_grad():
        return model(inputs())[0]  # logits, or a decoder's last hidden state


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_call_leaves_the_model_as_it_was(case):
    # The refusal came after the attention, MLPs, norms and rotations were patched (before 2026-12-03):
    # the model raised and ran pyllm's code in part.
    config_name, model_name, overrides, refusal = REFUSED[case]
    model, untouched = made(config_name, model_name, **overrides), made(config_name, model_name, **overrides)
    before = model_state(model)
    with pytest.raises(ValueError, match=refusal):
        phf.apply_pyllm_kernels(model)
    assert model_state(model) == before
    assert torch.equal(model_output(model), model_output(untouched))


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_model_takes_the_parts_it_can(case):
    # Caught and called again without the part refused: the model is patched as one never refused.
    config_name, model_name, overrides, refusal = REFUSED[case]
    model, fresh = made(config_name, model_name, **overrides), made(config_name, model_name, **overrides)
    with pytest.raises(ValueError, match=refusal):
        phf.apply_pyllm_kernels(model)
    applied = phf.apply_pyllm_kernels(model, fused_linear_cross_entropy=False)
    assert applied == phf.apply_pyllm_kernels(fresh, fused_linear_cross_entropy=False)
    assert applied["attention"] and model.config._attn_implementation == "pyllm"
    assert [(type(m).__qualname__, type(m).forward) for m in model.modules()] == [
        (type(m).__qualname__, type(m).forward) for m in fresh.modules()]
    assert torch.equal(model_output(model), model_output(fresh))


@pytest.mark.parametrize("failing", ["set_attn_implementation", "rope", "fused loss"])
@pytest.mark.parametrize("before", ["untouched", "patched in part", "wrapped and hooked"])
def test_a_call_failing_midway_puts_the_model_back(failing, before, monkeypatch):
    # What can fail after the refusals were asked (transformers' set_attn_implementation on a submodel
    # once it set the model's config, a modeling file this transformers lacks, an interrupt) leaves the
    # model as the call found it: untouched, patched by an earlier call, or with a wrapper's forward on the
    # instance (TRL's fused head) under accelerate's hook (the fused loss's _pyllm_hf_forward and
    # _old_forward). With the failure gone, the same call patches it as it does a model never failed.
    accelerate = pytest.importorskip("accelerate") if before == "wrapped and hooked" else None

    def prepared():
        model = made("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
        if before == "patched in part":
            phf.apply_pyllm_kernels(model, rms_norm=False, rope=False, fused_linear_cross_entropy=False)
        elif before == "wrapped and hooked":
            forward = model.forward
            model.forward = lambda *args, **kwargs: forward(*args, **kwargs)
            accelerate.hooks.add_hook_to_module(model, accelerate.hooks.AlignDevicesHook(io_same_device=True))
        return model

    model, twin = prepared(), prepared()
    state = model_state(model)
    if failing == "set_attn_implementation":
        original = transformers.PreTrainedModel.set_attn_implementation

        def fails(self, *args, **kwargs):
            original(self, *args, **kwargs)
            raise RuntimeError("a submodel refused")

        monkeypatch.setattr(transformers.PreTrainedModel, "set_attn_implementation", fails)
    else:
        kind, patch = "rope" if failing == "rope" else "_fused_loss_forward", phf._patch

        def fails(module, patch_kind):
            patch(module, patch_kind)
            if patch_kind == kind:  # after the first of its modules is patched
                raise RuntimeError("interrupted")

        monkeypatch.setattr(phf, "_patch", fails)
    with pytest.raises(RuntimeError):
        phf.apply_pyllm_kernels(model)
    assert model_state(model) == state
    assert torch.equal(model_output(model), model_output(twin))
    monkeypatch.undo()
    assert phf.apply_pyllm_kernels(model) == phf.apply_pyllm_kernels(twin)
    assert [(type(m), type(m).forward) for m in model.modules()] == [(type(m), type(m).forward) for m in twin.modules()]
    assert torch.equal(model_output(model), model_output(twin))
    ids = inputs()
    assert torch.equal(model.train()(ids, labels=ids).loss, twin.train()(ids, labels=ids).loss)
    assert model(ids, labels=ids).logits is None  # the fused loss's


def test_a_loss_function_of_the_users_gets_the_logits():
    # model.loss_function = fn (transformers' setter) is the user's loss over the logits: the patched
    # model's training forward then computes them and calls it, as the unpatched one does.
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    seen = []

    def mine(logits, labels, vocab_size, **kwargs):
        seen.append(logits.shape)
        return logits.float().square().mean()

    for model in (reference, ours):
        model.loss_function = mine
    ids = inputs()
    want, got = reference.train()(ids, labels=ids), ours.train()(ids, labels=ids)
    assert seen == [(3, 13, VOCAB)] * 2 and got.logits is not None
    assert rel_err(got.loss, want.loss) < 1e-12


def test_trainer_runs_it_with_gradient_accumulation(tmp_path):
    # HF's Trainer passes num_items_in_batch to a forward taking **kwargs: the patched model's
    # logged losses are the unpatched one's, step by step (fp32), on torch's AdamW and on pyllm's
    # (handed to the Trainer as its optimizer), clipping by the Trainer's max_grad_norm included.
    import pyllm.optim

    losses = {}
    for run in ("transformers", "patched", "patched, pyllm AdamW"):
        model, _ = tiny("llama", torch.float32)
        if run != "transformers":
            phf.apply_pyllm_kernels(model)
        ids, mask = inputs(8, 13, seed=2), padded(2, 13, left=False).repeat(4, 1)
        rows = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(ids, mask)]
        args = transformers.TrainingArguments(output_dir=str(tmp_path / run), max_steps=3, learning_rate=1e-3,
                                              per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                              seed=0, data_seed=0, weight_decay=0.0, max_grad_norm=0.5)
        optimizers = (None, None)
        if run.endswith("AdamW"):
            optimizers = (pyllm.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), None)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=optimizers)
        trainer.train()
        losses[run] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["patched"]) == 3
    assert losses["patched"] == pytest.approx(losses["transformers"], rel=1e-4)
    assert losses["patched, pyllm AdamW"] == pytest.approx(losses["transformers"], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2-capped"])
@pytest.mark.parametrize("order", ["pyllm first", "trl first", "trl, accelerate's hook, pyllm"])
def test_trls_fused_head_runs_on_the_patched_model(family, order):
    # TRL's SFTTrainer (1.16) computes its loss, entropy and accuracy with its own fused LM head,
    # trl.trainer.utils.add_fused_lm_head, a wrapper of model.forward that calls the decoder itself
    # when asked (fused_lm_head=True): pyllm's attention, MLP, norm and rotation run inside it, and
    # its calls reach TRL's head whichever patch came first; loss and every gradient are the
    # reference's (float64), and a plain training forward still takes pyllm's fused loss.
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):  # TRL >= 1.15 (which needs Python >= 3.11)
        pytest.skip("the installed TRL has no fused LM head (trl.trainer.utils.add_fused_lm_head, TRL >= 1.15)")
    reference, ours = tiny(family)
    trl_utils.add_fused_lm_head(reference, outputs=("log_probs", "entropy", "is_top1"))
    if order == "pyllm first":
        phf.apply_pyllm_kernels(ours)
    trl_utils.add_fused_lm_head(ours, outputs=("log_probs", "entropy", "is_top1"))
    if "hook" in order:  # device_map's hook around TRL's wrapper: pyllm goes under it, TRL's calls still reach TRL
        accelerate = pytest.importorskip("accelerate")
        accelerate.hooks.add_hook_to_module(ours, accelerate.hooks.AlignDevicesHook(io_same_device=True))
    if order != "pyllm first":
        phf.apply_pyllm_kernels(ours)
    reference.train(), ours.train()
    ids, mask = inputs(), padded(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    want, got = (m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True) for m in (reference, ours))
    assert rel_err(got.loss, want.loss) < 1e-12 and rel_err(got.entropy, want.entropy) < 1e-12
    assert torch.equal(got.is_top1, want.is_top1)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-10, name
    assert ours(input_ids=ids, attention_mask=mask, labels=labels).logits is None  # pyllm's fused loss


def word_tokenizer():
    """A word-level tokenizer over VOCAB ids (w0 ... w91 and four specials), for TRL's trainers."""
    tokenizers = pytest.importorskip("tokenizers")
    words = {f"w{i}": i + 4 for i in range(VOCAB - 4)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **words},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>")


@pytest.mark.parametrize("padding_free", [False, True])
def test_trl_sft_trainer_trains_the_patched_model(tmp_path, padding_free):
    # TRL's SFTTrainer on a patched model (pyllm's kernels inside, TRL's fused head for the loss):
    # the logged losses and token accuracies are the unpatched model's, step by step (fp32), on
    # padded batches and on padding-free ones (documents packed into a row, position_ids restarting).
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(j)}" for j in torch.randint(0, VOCAB - 4, (int(n),), generator=g))
             for n in torch.randint(5, 40, (32,), generator=g)]
    logs = {}
    for run in ("transformers", "patched"):
        model, _ = tiny("gemma2-capped", torch.float32)
        if run == "patched":
            phf.apply_pyllm_kernels(model)
        args = trl.SFTConfig(output_dir=str(tmp_path / run), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             padding_free=padding_free, max_length=None, save_strategy="no",
                             bf16=False)  # (SFTConfig's default: bf16 autocast, through accelerate)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                                 processing_class=word_tokenizer())
        trainer.train()
        logs[run] = [(entry["loss"], entry["mean_token_accuracy"]) for entry in trainer.state.log_history
                     if "loss" in entry]
    assert len(logs["patched"]) == 4
    for (loss, accuracy), (want_loss, want_accuracy) in zip(logs["patched"], logs["transformers"]):
        assert loss == pytest.approx(want_loss, rel=1e-5) and accuracy == want_accuracy


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_on_cuda_within_twice_torchs_error(family):
    reference, _ = tiny(family)
    torch_model, ours = (m.cuda() for m in tiny(family, torch.bfloat16,
                                                attention="eager" if family == "gemma2" else "sdpa"))
    phf.apply_pyllm_kernels(ours)
    ids, mask = inputs(), padded()
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        torch_out = torch_model(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        got = ours(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    real = mask.bool()
    assert rel_err(got[real], want[real]) <= tolerance(torch_out[real], want[real])
    settings = dict(attention_mask=mask.cuda(), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours.generate(ids.cuda(), **settings).shape == (3, 17)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["left", "right"])  # (transformers' SDPA mask parts packed documents only
def test_compiled_training_step_on_cuda(layout):       # when no cache is made: not a like-for-like peer there)
    # The ops' device syncs inside one inductor graph on the GPU, bf16: the loss and the gradient
    # (every parameter's, as one vector) within twice the unpatched model's error against float64.
    reference, _ = tiny("llama")
    torch_model, ours = (m.cuda().train() for m in tiny("llama", torch.bfloat16, attention="sdpa"))
    phf.apply_pyllm_kernels(ours)
    batch = compile_batch(layout)
    torch._dynamo.reset()
    results = []
    for model, params in ((reference.train(), reference), (torch_model, torch_model),
                          (torch.compile(ours, fullgraph=True), ours)):
        device = next(params.parameters()).device
        loss = model(**{name: t.to(device) if torch.is_tensor(t) else t for name, t in batch.items()}).loss
        loss.backward()
        results.append((loss.detach().double().cpu(),
                        torch.cat([p.grad.flatten() for p in params.parameters()]).double().cpu()))
    (want, want_grad), (torch_loss, torch_grad), (got, got_grad) = results
    assert rel_err(got, want) <= tolerance(torch_loss, want)
    assert rel_err(got_grad, want_grad) <= tolerance(torch_grad, want_grad)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weight", "fp32_weight"])
def test_rms_norm_is_the_modules_within_twice_its_error(kind, weight_dtype, monkeypatch):
    # The module on bf16 activations against the norm in float64, its weight in bf16 or in fp32 (HF's
    # Trainer under bf16 autocast: LLaMA's module then returns fp32, Gemma's bf16), gradients too.
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    norm = (LlamaRMSNorm if kind == "llama" else Gemma2RMSNorm)(200, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0 if kind == "gemma" else 1.0, 0.3)
    norm = norm.to(weight_dtype)
    exact = copy.deepcopy(norm).double()
    float64_norms(exact)
    ours = copy.deepcopy(norm)
    assert phf._patch_rms_norm(ours) == 1
    calls = []
    kernel = phf.fused_rms_norm
    monkeypatch.setattr(phf, "fused_rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x = torch.randn(4, 7, 200, dtype=torch.float64) * 3
    dout = torch.randn(4, 7, 200, dtype=torch.float64)
    x64 = x.clone().requires_grad_()
    want = exact(x64)
    want_dx, want_dw = torch.autograd.grad(want, (x64, exact.weight), dout)
    results = {}
    for name, module in (("torch", norm), ("ours", ours)):
        xb = x.bfloat16().requires_grad_()
        out = module(xb)
        dx, dw = torch.autograd.grad(out, (xb, module.weight), dout.to(out.dtype))
        results[name] = out, dx, dw
    assert results["ours"][0].dtype == results["torch"][0].dtype and len(calls) == 1
    for got, theirs, ref in zip(results["ours"], results["torch"], (want, want_dx, want_dw)):
        assert rel_err(got, ref) <= tolerance(theirs, ref)


def test_rms_norm_counts_qwen3_head_norms():
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = transformers.Qwen3ForCausalLM(config)
    assert phf.apply_pyllm_kernels(model)["rms_norm"] == 2 * 4 + 1  # input, post-attention, q, k; the final


def test_rope_runs_only_in_patched_models(monkeypatch):
    # transformers' apply_rotary_pos_emb is a module global, left as it is: the patched model's attention
    # modules get forwards that call pyllm.rope; a second model of the same type keeps transformers' bits.
    from transformers.models.llama import modeling_llama
    original = modeling_llama.apply_rotary_pos_emb
    _, ours = tiny("llama", torch.bfloat16, attention="sdpa")
    _, other = tiny("llama", torch.bfloat16, attention="sdpa")
    ids = inputs()
    with torch.no_grad():
        before = other(ids).logits
    calls = []
    kernel = phf.rope_ops.rope
    monkeypatch.setattr(phf.rope_ops, "rope", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    assert phf.apply_pyllm_kernels(ours)["rope"] == 2
    assert modeling_llama.apply_rotary_pos_emb is original
    with torch.no_grad():
        assert torch.equal(other(ids).logits, before)
        assert not calls
        ours(ids)
    assert len(calls) == 2 * 2  # q and k, per layer


def test_rope_patch_only_takes_llamas_rotation():
    # NanoChat's rotate_half turns the other way, BLT's interleaves: the same apply_rotary_pos_emb
    # bytecode, another function; Phi-3's rotation is partial, in its own function. Cohere's
    # interleaved rotation is taken in Cohere's files only (a vision model has the same functions).
    import importlib
    for name, cls, takes in [("llama", "LlamaAttention", True), ("qwen3", "Qwen3Attention", True),
                             ("nanochat", "NanoChatAttention", False), ("blt", "BltSelfAttention", False),
                             ("phi3", "Phi3Attention", False), ("cohere", "CohereAttention", True),
                             ("cohere2", "Cohere2Attention", True), ("cohere2_moe", "Cohere2MoeAttention", True),
                             ("efficientloftr", "EfficientLoFTRAttention", False)]:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        assert (phf._rope_forward(getattr(module, cls)) is not None) == takes, name


_HF_TRACES = []


def skip_unless_dynamo_traces_transformers():
    """Skips where torch.compile(fullgraph=True) breaks inside transformers' own code, before any of
    pyllm's runs: torch 2.6's dynamo cannot read func.__code__.co_varnames (transformers'
    merge_with_config_defaults) nor enter PEFT's @contextmanager forward hooks."""
    if not _HF_TRACES:
        _, plain = tiny("llama", torch.float32, attention="sdpa")
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(plain.model, fullgraph=True, backend="eager")(inputs())
            _HF_TRACES.append(True)
        except torch._dynamo.exc.Unsupported:
            _HF_TRACES.append(False)
        torch._dynamo.reset()
    if not _HF_TRACES[0]:
        pytest.skip(f"torch {torch.__version__}'s dynamo does not trace transformers {transformers.__version__} whole")


def scaled_copy(model, factor: float):
    """A deepcopy of model with every parameter times factor."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(factor)
    return twin


def test_patched_model_copies_and_compiles():
    # deepcopy (TRL's reference model, an EMA copy) copies the patched forwards with the copy's modules.
    _, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours, fused_linear_cross_entropy=False)
    twin = scaled_copy(ours, 0.5)
    reference = scaled_copy(tiny("llama")[0], 0.5)
    with torch.no_grad():
        ids = inputs()
        assert rel_err(twin(ids).logits, reference(ids).logits) < 1e-12
    # nothing global changed: an unpatched model still compiles without a graph break
    skip_unless_dynamo_traces_transformers()
    _, plain = tiny("llama", torch.float32, attention="sdpa")
    torch._dynamo.reset()
    compiled = torch.compile(plain.model, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(ids)


@pytest.mark.parametrize("family", ["llama", "gemma2-capped", "phi3"])
def test_data_parallel_replicas_run_their_own_weights(family, monkeypatch):
    # nn.DataParallel (HF's Trainer on several GPUs without torchrun) copies each module's __dict__
    # into its replicas: a forward bound to the module there would run the original's weights on every
    # replica. torch's own replicate, with its broadcast to GPUs replaced by copies that differ per
    # replica: replica 1's logits and fused loss are the reference's with replica 1's weights.
    replicate = torch.nn.parallel.replicate
    replicate_module = sys.modules[replicate.__module__]

    def broadcast(tensors, devices, detach=False):
        return [[t.detach().clone() * (1 + 0.25 * j if t.requires_grad else 1) for t in tensors]
                for j in range(len(devices))]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", broadcast)
    reference, ours = tiny(family)
    counts = phf.apply_pyllm_kernels(ours)
    assert counts["swiglu"] + counts["geglu"] == 2 and counts["rms_norm"] > 0
    replica = replicate(ours, [0, 1])[1]
    reference = scaled_copy(reference, 1.25)
    ids, mask = inputs(), padded(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    real = mask.bool()
    with torch.no_grad():
        logits = reference.eval()(ids, attention_mask=mask).logits
        assert rel_err(replica.eval()(ids, attention_mask=mask).logits[real], logits[real]) < 1e-12
        got = replica.train()(ids, attention_mask=mask, labels=labels)
    want = F.cross_entropy(logits.flatten(0, 1), F.pad(labels, (0, 1), value=-100)[:, 1:].flatten())  # float64
    assert got.logits is None and rel_err(got.loss, want) < 1e-12


@pytest.mark.parametrize("order", ["offloaded first", "pyllm first"])
def test_accelerate_hooks_stay_around_the_patched_forwards(order, monkeypatch):
    # from_pretrained(device_map=..., offload) wraps each module's forward in accelerate's hook, which
    # loads the offloaded weights (here every weight lives on "meta" between calls) and moves inputs:
    # patching after it keeps the hook and puts pyllm's forward under it (it replaced the hook before
    # 2026-12-02: "weight is on meta"). A training forward with labels takes HF's loss there (the
    # fused loss reads the head's weight, which only the head's hook loads).
    accelerate = pytest.importorskip("accelerate")
    reference, ours = tiny("llama")
    if order == "pyllm first":
        phf.apply_pyllm_kernels(ours)
    accelerate.cpu_offload(ours, execution_device=torch.device("cpu"))
    if order == "offloaded first":
        phf.apply_pyllm_kernels(ours)
    norm = ours.model.layers[0].input_layernorm  # (accelerate hooks the modules that hold weights)
    assert norm.weight.device.type == "meta" and norm._hf_hook is not None
    assert type(norm).forward is phf._llama_rms_norm_forward
    calls = []
    kernel = phf.fused_rms_norm
    monkeypatch.setattr(phf, "fused_rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids, mask = inputs(), padded(left=False)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits[mask.bool()]
        assert rel_err(ours(ids, attention_mask=mask).logits[mask.bool()], want) < 1e-12
        assert len(calls) == 5  # two a layer and the last
        labels = ids.masked_fill(mask == 0, -100)
        out = ours.train()(ids, attention_mask=mask, labels=labels)
    assert out.loss.item() == pytest.approx(reference.train()(ids, attention_mask=mask, labels=labels).loss.item(),
                                            rel=1e-6)
    # the hooks removed (the weights back in place, each forward put back on its instance): still
    # pyllm's, and a whole-model pickle loads
    accelerate.hooks.remove_hook_from_submodules(ours)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids, attention_mask=mask).logits[mask.bool()], want) < 1e-12


def test_a_class_another_wrapper_made_keeps_the_instance_patch():
    # torch's parametrize gives the module a class of its own, made at run time: pyllm's forward goes on
    # the instance, so removing the parametrization (which puts the transformers class back) still works.
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    reference, ours = tiny("llama")
    for model in (reference, ours):
        parametrize.register_parametrization(model.model.norm, "weight", Doubled())
    assert phf.apply_pyllm_kernels(ours)["rms_norm"] == 5
    assert "forward" in ours.model.norm.__dict__ and not hasattr(type(ours.model.norm), "_pyllm_base")
    ids = inputs()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, reference(ids).logits) < 1e-12
        for model in (reference, ours):
            parametrize.remove_parametrizations(model.model.norm, "weight")
        assert rel_err(ours(ids).logits, reference(ids).logits) < 1e-12


def test_patched_model_pickles_whole(tmp_path):
    # torch.save(model) pickles the modules themselves: each patched one names its transformers
    # class and its patch, and loads back patched, in this process and in a new one (where loading
    # imports pyllm.hf and registers the attention). The classes keep transformers' names.
    import subprocess
    reference, ours = tiny("gemma2-capped")
    phf.apply_pyllm_kernels(ours)
    path = tmp_path / "model.pt"
    torch.save(ours, path)
    loaded = torch.load(path, weights_only=False)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in reference.modules()]
    assert type(loaded.model.layers[0].mlp).forward is phf._geglu_mlp_forward
    ours.save_pretrained(tmp_path / "hf")  # the config names transformers' class
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").architectures == ["Gemma2ForCausalLM"]
    ids, mask = inputs(), padded(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = reference.eval()(ids, attention_mask=mask).logits[mask.bool()]
        assert rel_err(loaded.eval()(ids, attention_mask=mask).logits[mask.bool()], want) < 1e-12
        assert loaded.train()(ids, attention_mask=mask, labels=labels).logits is None
    script = (f"import torch; m = torch.load({str(path)!r}, weights_only=False).eval(); "
              f"torch.save(m(torch.tensor({ids.tolist()!r}), "
              f"attention_mask=torch.tensor({mask.tolist()!r})).logits, {str(tmp_path / 'logits.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert rel_err(torch.load(tmp_path / "logits.pt")[mask.bool()], want) < 1e-12


def compile_batch(layout: str) -> dict:
    """A training batch as each collator hands it over: plain rows, left / right padding (labels
    -100 on it), documents packed into rows (position_ids restarting at 0, or cu_seq_lens)."""
    ids = inputs(2, 13)
    if layout in ("left", "right"):
        mask = padded(2, 13, left=layout == "left")
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    batch = dict(input_ids=ids, labels=ids)
    if layout == "position_ids":
        batch["position_ids"] = torch.cat([torch.arange(5), torch.arange(8)]).repeat(2, 1)
    if layout == "cu_seq_lens":
        cu = torch.tensor([0, 5, 13, 20, 26], dtype=torch.int32)
        batch = dict(input_ids=ids.reshape(1, -1), labels=ids.reshape(1, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                     max_length_q=8, max_length_k=8,
                     position_ids=torch.cat([torch.arange(n) for n in cu.diff().tolist()])[None])
    return batch


@pytest.mark.parametrize("family, layout", [("llama", layout) for layout in ["plain", "left", "right", "position_ids",
                                                                              "cu_seq_lens"]]
                         + [("gemma2-capped", "left"), ("mistral", "position_ids"),  # capped scores and logits, windows
                            ("granite", "right")])  # scaled logits
def test_compiled_training_step_is_one_graph(family, layout):
    skip_unless_dynamo_traces_transformers()
    # torch.compile(fullgraph=True) raises at a graph break: whether a batch pads or packs is read
    # inside pyllm::hf_attention (and the fused loss runs every row, the ignored ones as -1), so the
    # patched model traces whole; its loss and gradients are eager's (themselves the reference's).
    _, ours = tiny(family)
    phf.apply_pyllm_kernels(ours)
    ours.train()
    batch = compile_batch(layout)
    results = []
    for model in (ours, torch.compile(ours, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        ours.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in ours.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert rel_err(got, want) < 1e-12
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-12


def test_compiled_lora_model_is_one_graph():
    skip_unless_dynamo_traces_transformers()
    # PEFT's LoRA around the patched projections (the MLP kernels call them as modules): still one graph.
    peft = pytest.importorskip("peft")
    _, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    lora = peft.get_peft_model(ours, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                                     init_lora_weights=False))  # non-zero B: the adapters count
    lora.train()
    batch = compile_batch("left")
    torch._dynamo.reset()
    results = []
    for model in (lora, torch.compile(lora, fullgraph=True, backend="aot_eager")):
        lora.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]))
    (want, want_grads), (got, got_grads) = results
    assert rel_err(got, want) < 1e-12 and len(got_grads) == 2 * 4 * 2  # A and B, 4 modules, 2 layers
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-12


def test_compiled_fallback_keeps_packed_documents(monkeypatch):
    skip_unless_dynamo_traces_transformers()
    # Under compile the mask reaches the attention unread, padding or not: where no kernel takes the
    # inputs (the SDPA fallback) a mask without padding must still keep packed documents apart.
    monkeypatch.setattr(phf, "_kernel_takes", lambda *args, **kwargs: False)
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    ids = inputs(2, 13)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                 position_ids=torch.cat([torch.arange(5), torch.arange(8)]).repeat(2, 1))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(ours, fullgraph=True, backend="aot_eager")(**batch).logits
        want = torch.cat([reference(doc).logits for doc in ids.split([5, 8], dim=1)], dim=1)
    assert rel_err(got, want) < 1e-12


def test_padding_is_read_once_per_mask_per_forward():
    # Gemma 2 hands its sliding and its full layers two views of the mask, in turn: each is read
    # once a forward (a device sync on CUDA), and the backward reads neither again.
    _, ours = tiny("gemma2")  # layer 0 slides, layer 1 sees all
    phf.apply_pyllm_kernels(ours)
    ours.train()
    reads = []
    real_tokens = phf._real_tokens
    phf._real_tokens = lambda mask: reads.append(1) or real_tokens(mask)
    try:
        ids = inputs()
        loss = ours(ids, attention_mask=padded(), labels=ids).loss
        forward = len(reads)
        loss.backward()
    finally:
        phf._real_tokens = real_tokens
    assert forward == 2 and len(reads) == forward


def test_the_read_masks_go_with_their_batch():
    # The memos had held a batch's mask and what was read off it (device memory on CUDA) after the
    # batch, and the model, were gone.
    _, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    ours.train()
    memos = (phf._suffix_memo, phf._unpadding_memo, phf._packed_memo)
    loss = ours(inputs(), attention_mask=padded()).logits.sum()
    assert any(memo.entries for memo in memos)  # (the graph holds the mask the layers were given)
    del loss
    gc.collect()
    assert not any(memo.entries for memo in memos)


def test_inference_tensors_as_mask_and_positions_in_training():
    # A mask or positions made under torch.inference_mode (a rollout's, a collator's) cannot be
    # saved for the backward as they are: the op saves a copy.
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours)
    reference.train(), ours.train()
    ids = inputs()
    with torch.inference_mode():
        mask, positions = padded().bool(), torch.arange(13).repeat(3, 1)
    for kwargs in (dict(attention_mask=mask), dict(position_ids=positions)):
        ours.zero_grad(), reference.zero_grad()
        ours(ids, **kwargs).logits[:, -1].sum().backward()
        reference(ids, **{name: t.clone() for name, t in kwargs.items()}).logits[:, -1].sum().backward()
        for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
            assert rel_err(q.grad, p.grad) < 1e-10, name


def test_inductor_compiles_the_attention_op():
    skip_unless_dynamo_traces_transformers()
    # Inductor trusts the op's fake outputs (shapes and strides) when it plans the buffers around it.
    _, ours = tiny("llama", torch.float32)
    phf.apply_pyllm_kernels(ours)
    ours.train()
    batch = compile_batch("left")
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    grads = []
    for model in (ours, compiled):
        ours.zero_grad()
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for g, w in zip(*grads):
        assert rel_err(g, w) < 1e-5  # fp32: inductor's own fusions round differently


def test_op_registrations():
    # The attention's and the loss's fake outputs, schema and autograd against the real ones
    # (torch.library.opcheck): padded and packed attention; every row, or the labelled ones, of the loss.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, h, 32, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    for mask_, positions in [(mask, None), (None, position_ids), (None, None), (torch.ones_like(mask), position_ids)]:
        torch.library.opcheck(torch.ops.pyllm.hf_attention.default, (q, k, v, mask_, positions, 0.2, -1, 0, 0.0))
    x, weight = torch.randn(9, 16, dtype=torch.float64, requires_grad=True), torch.randn(11, 16, dtype=torch.float64,
                                                                                         requires_grad=True)
    targets = torch.tensor([3, -1, 0, 10, -1, -1, 5, 2, 7])
    for need_x, need_w, scale, softcap in [(True, True, 1.0, 0.0), (True, False, 0.5, 0.0), (False, True, 1.0, 2.0),
                                           (True, True, 2.0, 3.0)]:
        torch.library.opcheck(torch.ops.pyllm.hf_labelled_loss.default,
                              (x, weight, targets, 4, need_x, need_w, scale, softcap))
    # a weight of another dtype than x (an fp32 master under autocast; fp32 / fp64 mixes): the body casts
    # it, its gradient fp32 at least in x's terms; the fake had given the weight's dtype (from the review)
    for x_dtype, w_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.float32)]:
        torch.library.opcheck(torch.ops.pyllm.hf_labelled_loss.default,
                              (x.detach().to(x_dtype).requires_grad_(), weight.detach().to(w_dtype).requires_grad_(),
                               targets, 4, True, True, 1.0, 0.0), test_utils=("test_faketensor",))
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)  # torch 2.8+
    for op in (torch.ops.pyllm.hf_attention, torch.ops.pyllm.hf_labelled_loss):  # they read the mask on the host
        assert unsafe is None or unsafe in op.default.tags


def test_rope_under_autocast_keeps_transformers_dtype():
    # bf16 q and k with fp32 tables: transformers' function promotes to fp32, and so does the patch.
    from transformers.models.llama import modeling_llama
    fused = phf._fused_rotary(modeling_llama.apply_rotary_pos_emb)
    q, k = torch.randn(2, 4, 5, 32).bfloat16(), torch.randn(2, 2, 5, 32).bfloat16()
    angles = torch.randn(1, 5, 16)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = fused(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cohere_rotation_within_twice_transformers_error(dtype):
    # Cohere's interleaved rotation on pyllm.rope's kernel (fp32 math, one rounding, q's dtype out, as
    # Cohere's own): q and k within twice transformers' own error against the float64 rotation.
    from transformers.models.cohere import modeling_cohere
    fused = phf._fused_rotary(modeling_cohere.apply_rotary_pos_emb, interleaved=True)
    q, k = torch.randn(2, 4, 7, 32, dtype=torch.float64), torch.randn(2, 2, 7, 32, dtype=torch.float64)
    angles = torch.randn(2, 7, 16, dtype=torch.float64) * 30
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)  # as Cohere's tables
    exact = [q * cos[:, None] + modeling_cohere.rotate_half(q) * sin[:, None],
             k * cos[:, None] + modeling_cohere.rotate_half(k) * sin[:, None]]
    theirs = modeling_cohere.apply_rotary_pos_emb(q.to(dtype), k.to(dtype), cos.float(), sin.float())
    ours = fused(q.to(dtype), k.to(dtype), cos.float(), sin.float())
    for o, t, e in zip(ours, theirs, exact):
        assert o.dtype == t.dtype == dtype and rel_err(o, e) <= tolerance(t, e)


def test_rope_under_gradient_checkpointing():
    reference, ours = tiny("llama")
    phf.apply_pyllm_kernels(ours, fused_linear_cross_entropy=False)
    ours.train()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = inputs()
    for model in (reference, ours):
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-10, name


def test_gemma2_both_ways_is_refused():
    # transformers' Gemma 2 with use_bidirectional_attention sets is_causal=False on its modules but
    # builds a causal mask: patched attention had followed is_causal (logits 91% off the unpatched)
    _, ours = tiny("gemma2", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="Gemma 2 with use_bidirectional_attention"):
        phf.apply_pyllm_kernels(ours)
    phf.apply_pyllm_kernels(ours, attention=False)


@pytest.fixture
def on_load():
    """apply_pyllm_kernels_on_load, turned off again after the test (it is process-wide)."""
    yield phf.apply_pyllm_kernels_on_load
    phf.apply_pyllm_kernels_on_load(False)


def test_models_loaded_after_on_load_come_patched(tmp_path, on_load):
    # Every model from_pretrained returns, until turned off: a causal LM with every part; a classifier
    # of the same weights with the parts it takes (no fused loss: a warning says why); none after.
    model, _ = tiny("llama", torch.float32, attention="sdpa")
    model.save_pretrained(tmp_path)
    on_load(rope=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == phf.NAME
    assert type(loaded.model.layers[0].mlp)._pyllm_kind == "_swiglu_mlp_forward"
    assert type(loaded)._pyllm_kind == "_fused_loss_forward"
    assert "_pyllm_kind" not in type(loaded.model.layers[0].self_attn).__dict__  # rope=False kept
    with pytest.warns(UserWarning, match="LlamaForSequenceClassification loads without pyllm's fused_linear_cross"):
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert type(classifier.model.layers[0].mlp)._pyllm_kind == "_swiglu_mlp_forward"
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"  # named by the caller: kept (the rest patched)
    assert type(eager.model.layers[0].mlp)._pyllm_kind == "_swiglu_mlp_forward"
    assert "pretrained_model_name_or_path" in str(inspect.signature(transformers.PreTrainedModel.from_pretrained))
    on_load(False)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config._attn_implementation != phf.NAME and not hasattr(type(again.model.layers[0].mlp), "_pyllm_kind")
    with pytest.raises(TypeError, match="unknown parts.*'swiglu'"):
        on_load(swigl=False)


def test_trls_reference_model_runs_the_policys_kernels(tmp_path, on_load):
    # TRL's DPOTrainer loads its reference model again from the policy's path: with on_load it is
    # patched as the policy is, so at step 0 the two give the same logits, bit for bit (apply_pyllm_
    # kernels on the policy alone leaves the reference with pyllm's attention and transformers' rest).
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model, _ = tiny("llama", torch.float32, attention="sdpa")
    model.save_pretrained(tmp_path / "policy")
    on_load()
    policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    pairs = {"prompt": ["w1 w2", "w3"], "chosen": [" w4 w5", " w6"], "rejected": [" w7", " w8 w9"]}
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, bf16=False, save_strategy="no")
    trainer = trl.DPOTrainer(model=policy, args=args, train_dataset=datasets.Dataset.from_dict(pairs),
                             processing_class=word_tokenizer())
    reference = trainer.ref_model
    assert reference is not policy and type(reference.model.layers[0].mlp)._pyllm_kind == "_swiglu_mlp_forward"
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(reference.model(ids).last_hidden_state, policy.model(ids).last_hidden_state)


def test_on_load_with_output_loading_info(tmp_path):
    # output_loading_info=True returns (model, loading_info): the tuple had been patched (AttributeError)
    model, _ = tiny("llama", torch.float32, attention="sdpa")
    model.save_pretrained(tmp_path)
    phf.apply_pyllm_kernels_on_load()
    try:
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        assert loaded.config._attn_implementation == phf.NAME and "missing_keys" in info
    finally:
        phf.apply_pyllm_kernels_on_load(False)


def test_continuous_batching_generates_with_the_patched_model():
    # transformers' continuous batching (generate_batch: TRL's GRPO / RLOO with use_transformers_continuous_batching)
    # takes paged|eager, sdpa and flash attention only: a patched model had raised "Implementation pyllm is not
    # supported for continuous batching". It generates on SDPA, the tokens the unpatched model gives, and has
    # pyllm's attention back afterwards.
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig
    reference, ours = tiny("llama", torch.float32, attention="sdpa")
    if not hasattr(reference, "generate_batch"):
        pytest.skip("this transformers has no continuous batching (generate_batch)")
    phf.apply_pyllm_kernels(ours)
    prompts = [inputs(1, n, seed=n)[0].tolist() for n in (3, 7, 5)]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)

    def tokens(model):
        batching = ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=32)  # (a small cache: fast)
        outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching,
                                       progress_bar=False)
        return sorted((output.prompt_ids, output.generated_tokens) for output in outputs.values())

    assert tokens(ours) == tokens(reference)
    assert ours.config._attn_implementation == phf.NAME
    assert type(ours.model.layers[0].mlp)._pyllm_kind == "_swiglu_mlp_forward"
