"""pyllm's kernels inside a Hugging Face transformers model, for those who keep training it with
HF's Trainer or TRL (Liger-Kernel's apply_liger_kernel_to_* for one model instance):

    import pyllm.hf
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
    pyllm.hf.apply_pyllm_kernels(model)          # attention, SwiGLU, RMSNorm, RoPE, fused linear cross-entropy

or for every model from_pretrained loads from then on (Liger's apply_liger_kernel_to_llama() form; TRL's
DPO / KTO / GRPO / RLOO load their reference model again from the policy's path):

    pyllm.hf.apply_pyllm_kernels_on_load()
    model = AutoModelForCausalLM.from_pretrained(name)  # patched as above

or only the attention, chosen by name at load time (transformers' AttentionInterface):

    pyllm.hf.register_attention()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="pyllm")

The attention takes what transformers' flash-attention path takes: no mask (causal), a 2D padding
mask (the padded tokens are dropped and the rest run as one varlen call, as flash-attn's
unpadding does), sequences packed into a row (TRL's padding_free: position_ids restarting at 0, or
DataCollatorWithFlattening's cu_seq_lens_q / cu_seq_lens_k), a KV cache (queries aligned to the
cache's end; decode steps on the KV-cache kernel over views of the cache, dynamic or static),
sliding windows (Mistral, Gemma 2 / 3) and capped scores (Gemma 2). Where pyllm has no
kernel for the inputs (head dim 80, fp32 on CUDA, fp16 on the CPU, capped scores on CUDA) the same
function runs through torch's SDPA with an explicit mask, so the answer never depends on the kernel.
To go back to transformers' own code, load the model again (each patched module's class is a
subclass of its transformers class, made for the patch, with the same name).

Under torch.compile a patched model's training step is one graph (fullgraph=True works): whether a
batch pads or packs is read inside one custom op (pyllm::hf_attention), and the fused loss finds its
labelled rows inside another (pyllm::hf_labelled_loss). Decode steps over a left-padded cache still
read the padding in Python (a graph break a layer).

Models pyllm reads into its own LLM class (LLM.from_hf) train faster there; this module is for the
rest of the HF stack (PEFT adapters, Trainer callbacks, TRL's trainers, any decoder transformers has).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import threading
import types
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from pyllm import nn as pnn
from pyllm.ops import _util
from pyllm.ops import flash_attn as flash_attn_ops
from pyllm.ops import rope as rope_ops
from pyllm.ops.rms_norm import rms_norm as fused_rms_norm
from pyllm.ops.swiglu import geglu, geglu_packed, swiglu, swiglu_packed

NAME = "pyllm"

# Decoders whose ForCausalLM.forward ends in `logits = lm_head(hidden); loss = loss_function(logits,
# labels, ...)` with at most a scale and a cap between (read in transformers 5.x; each type's forward
# body compared with Llama's in 5.24, and each tested small in float64): the fused loss computes the
# same (_logit_shape).
FUSED_LOSS_MODEL_TYPES = frozenset({
    "llama", "mistral", "ministral", "ministral3", "qwen2", "qwen3", "qwen3_5_text", "gemma", "gemma2",
    "gemma3_text", "vaultgemma", "nanochat", "phi", "phi3", "olmo", "olmo2", "olmo3", "olmo_hybrid", "smollm3",
    "starcoder2", "glm", "glm4", "granite", "granite_swa", "cohere", "cohere2", "hyperclovax", "apertus",
    "apertus1p5_text", "arcee", "bitnet", "cwm", "diffllama", "ernie4_5", "exaone", "exaone4",
    "helium", "hunyuan_v1_dense", "internlm3", "iquestcoder", "jais2", "lfm2", "lfm3", "seed_oss", "youtu",
    "nemotron", "persimmon", "stablelm", "zamba", "zamba2", "gpt_neox", "opt", "hrm_text", "minicpm3", "gpt2",
    "gpt_bigcode", "gpt_neo", "falcon", "bloom", "falcon_h1", "bamba"})
# Mixtures of experts whose forward is that and then, with output_router_logits, `loss +=
# router_aux_loss_coef * load_balancing_loss_func(outputs.router_logits, self.num_experts,
# self.num_experts_per_tok, attention_mask)` (read in transformers 5.x): the fused loss adds the same,
# with transformers' own function (JetMoE adds the loss otherwise).
FUSED_LOSS_MOE_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo", "gpt_oss",
                                  "phimoe", "minimax", "jamba", "ernie4_5_moe", "granitemoe", "granitemoeshared",
                                  "granitemoe_swa", "granitemoehybrid"})
# Mixtures of experts whose forward is the first kind's, its output MoeCausalLMOutputWithPast (the router's
# logits passed on, no balancing loss added; read in transformers 5.x).
FUSED_LOSS_ROUTED_TYPES = frozenset({
    "aria_text", "axk1", "axk2", "bailing_hybrid", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1",
    "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "hunyuan_v1_moe",
    "hy_v3", "kimi_linear", "kolibri1", "lfm2_moe", "longcat_flash", "mimo_v2_flash", "sarvam_mla", "sarvam_moe",
    "solar_open", "afmoe", "beam", "cohere2_moe"})
# Those whose forward returns CausalLMOutputWithCrossAttentions (GPT-2's line), for the same output.
_CROSS_ATTENTION_OUTPUT_TYPES = frozenset({"gpt2", "gpt_bigcode", "falcon", "bloom"})
# What those forwards do to lm_head(hidden) before the loss: a scale (the types listed here: Granite's
# `logits / config.logits_scaling`, Cohere's `logits * self.logit_scale`, HyperCLOVA X's `* config.
# logits_scaling`), then `final_logit_softcapping * tanh(logits / final_logit_softcapping)` in the
# types of _CAPPED_TYPES when the config's cap is not None (Gemma 2 / 3's).
_GRANITE_SCALE = lambda model: 1.0 / model.config.logits_scaling  # noqa: E731
_COHERE_SCALE = lambda model: model.logit_scale  # noqa: E731
_LOGIT_SCALES = {"granite": _GRANITE_SCALE, "granite_swa": _GRANITE_SCALE, "granitemoe": _GRANITE_SCALE,
                 "granitemoeshared": _GRANITE_SCALE, "granitemoe_swa": _GRANITE_SCALE,
                 "granitemoehybrid": _GRANITE_SCALE, "cohere": _COHERE_SCALE, "cohere2": _COHERE_SCALE,
                 "hyperclovax": lambda model: model.config.logits_scaling,
                 "minicpm3": _GRANITE_SCALE,  # (MiniCPM3's lm_head(hidden / logits_scaling): the same)
                 "cohere2_moe": _COHERE_SCALE, "falcon_h1": lambda model: model.model.lm_head_multiplier}
_CAPPED_TYPES = frozenset({"gemma2", "gemma3_text", "vaultgemma", "nanochat", "beam"})


# --- attention ---------------------------------------------------------------------------------------

def register_attention() -> None:
    """Registers pyllm's attention with transformers as attn_implementation="pyllm" (and its mask
    function, which passes the 2D padding mask through, as flash-attention's does). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
    _continuous_batching_on_sdpa()


def _continuous_batching_on_sdpa() -> None:
    """transformers' continuous batching (generate_batch; TRL's GRPO / RLOO with
    use_transformers_continuous_batching=True) takes paged|eager, sdpa and flash attention only, and
    raised "Implementation pyllm is not supported for continuous batching" for a patched model: it
    now switches such a model to transformers' SDPA for its generation (transformers may move a 16-bit
    one on to flash attention; pyllm's other kernels stay)
    and back to pyllm's attention afterwards, as transformers puts back the implementation it
    switched from. Idempotent; a transformers without continuous batching is left alone."""
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        return
    switch = ContinuousBatchingManager.__dict__.get("switch_to_cb_friendly_attn")
    if not isinstance(switch, types.FunctionType) or getattr(switch, "_pyllm", False):
        return

    @functools.wraps(switch)
    def switch_to_cb_friendly_attn(self, model, *args, **kwargs):
        if getattr(model.config, "_attn_implementation", None) != NAME:
            return switch(self, model, *args, **kwargs)
        model.set_attn_implementation("sdpa")
        try:
            switch(self, model, *args, **kwargs)
        except BaseException:
            model.set_attn_implementation(NAME)
            raise
        self._original_attn_impl = NAME  # what transformers puts back when the batching stops

    switch_to_cb_friendly_attn._pyllm = True
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: torch.Tensor | None = None, device=None, **kwargs) -> torch.Tensor | None:
    """The mask transformers hands to attention_forward: None when every key is a real token (the
    causal structure is the kernel's), else a (B, width) bool mask of real tokens, width <= kv_length:
    its last kv_length columns (a sliding-window cache keeps only those keys), or, when generate
    dropped an all-ones mask and a static cache hands over keys past those written, as many as are."""
    if attention_mask is None:
        if "allow_is_bidirectional_skip" in kwargs:  # a bidirectional mask: cross-attention's keys are all real
            return None
        written = int(q_offset) + q_length - int(kv_offset)  # the causal masks' keys past this are unwritten
        return None if written >= kv_length else torch.ones(batch_size, written, dtype=torch.bool, device=device)
    mask = attention_mask[:, -kv_length:]
    if torch.compiler.is_compiling():
        return mask  # reading it is a graph break: pyllm::hf_attention finds out whether it pads
    return None if mask.shape[1] == kv_length and bool(mask.all()) else mask


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-function contract: query (B, H, T, D), key and value (B, H_kv, S, D)
    (S >= T: a cache's keys come first), attention_mask from padding_mask; returns
    ((B, T, H, D), None). sliding_window W: a query sees itself and the W - 1 keys before it
    (transformers' convention, flash-attn's window (W - 1, W - 1))."""
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    left = sliding_window - 1 if sliding_window else -1
    window = (left, 0 if causal else left)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D), (B, S, H_kv, D)
    B, T, H, D = q.shape
    # gpt-oss's attention sinks (s_aux): a learned logit per head in every softmax (pyllm's sinks=)
    call = dict(causal=causal, window=window, scale=scaling, softcap=softcap or 0.0, sinks=kwargs.get("s_aux"))

    if attention_mask is not None and attention_mask.dim() == 4:  # the caller's own (B or 1, 1 or H, T, S)
        return _with_4d_mask(q, k, v, attention_mask, call, float(dropout)), None
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"pyllm attention takes a 2D padding mask (B, S) or a 4D mask (B, 1 or H, T, S), got shape "
                         f"{tuple(attention_mask.shape)}")
    # Training with attention dropout (GPT-2's attn_pdrop, 0.1 by default): the kernels' dropout_p
    # (pyllm's masks, not SDPA's draws); the KV-cache kernel has none (inference), so a decode-shaped
    # call with dropout takes the tiles, and the reference forms SDPA's dropout.
    dropout = float(dropout)
    decoding = not dropout
    call["dropout_p"] = dropout

    if attention_mask is not None:  # padding: only real tokens attend and are attended to
        k, v = k[:, :attention_mask.shape[1]], v[:, :attention_mask.shape[1]]  # a static cache's unwritten tail goes
        if decoding and _decoding(q, k, v, causal, call["softcap"]):
            starts = _suffix_starts(attention_mask, attention_mask.bool())
            if starts is not None and not any(starts):
                return _decode(q, k, v, **call), None  # no padding, only a static cache's unwritten keys (gone)
            if starts is not None and q.is_cpu:  # left padding: each row's keys start at its pad (cache_leftpad)
                return _decode(q, k, v, **call, pads=torch.tensor(starts, dtype=torch.int32)), None
            if starts is not None:  # CUDA (cache_leftpad there unverified): a call a row, views of the cache
                return torch.cat([_decode(q[b:b + 1], k[b:b + 1, start:], v[b:b + 1, start:], **call)
                                  for b, start in enumerate(starts)]), None
        position_ids = kwargs.get("position_ids") if T == k.shape[1] else None
        if not _kernel_takes(q, k, v, call["softcap"], decode=decoding and _step_shaped(q, k, causal),
                             dropout=dropout):
            real_k = attention_mask.bool()
            # documents too: under torch.compile a mask without padding comes here with packed rows
            return _reference_rows(q, k, v, real_k[:, -T:], real_k, **call,
                                   documents=_documents(position_ids, B, T, real_k)), None
        return _attend(q, k, v, attention_mask, position_ids, **call), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:  # documents packed into the rows by the collator (DataCollatorWithFlattening)
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q, max_k = (B * T if max_q is None else int(max_q)), (B * k.shape[1] if max_k is None else int(max_k))
        q, k, v = q.reshape(B * T, H, D), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        cu_q, cu_k = cu_q.int(), cu_k.int()
        if _kernel_takes(q, k, v, call["softcap"], dropout=dropout):
            out = flash_attn_ops.flash_attn(q, k, v, causal=causal, window=window, softmax_scale=scaling,
                                            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                            max_seqlen_k=max_k, softcap=call["softcap"], sinks=call["sinks"],
                                            dropout_p=dropout)
        else:
            out = _reference_packed(q, k, v, cu_q, cu_k, **call)
        return out.view(B, T, *out.shape[1:]), None

    position_ids = kwargs.get("position_ids") if T == k.shape[1] else None  # packing is read off these
    if decoding and _decoding(q, k, v, causal, call["softcap"]):
        return _decode(q, k, v, **call), None
    if _kernel_takes(q, k, v, call["softcap"], decode=decoding and _step_shaped(q, k, causal), dropout=dropout):
        return _attend(q, k, v, None, position_ids, **call), None
    every = torch.ones(B, k.shape[1], dtype=torch.bool, device=q.device)
    return _reference_rows(q, k, v, every[:, -T:], every, **call, documents=_documents(position_ids, B, T)), None


def _with_4d_mask(q, k, v, mask, call, dropout: float) -> torch.Tensor:
    """A 4D mask of the caller's own (block-diagonal packing, prefix-LM: transformers passes it through
    as it is): the kernels take no such mask, SDPA does, as the unpatched model computes it. bool:
    True where a query sees a key; float: added to the scores (0 or -inf / the dtype's min)."""
    if call["softcap"] or call["sinks"] is not None:
        raise ValueError("pyllm attention: a 4D mask with capped scores or attention sinks is not taken; load the "
                         "model with attn_implementation='eager' for it")
    q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, H_kv, S, D)
    k_, v_ = k_[:, :, :mask.shape[-1]], v_[:, :, :mask.shape[-1]]  # (a static cache's unwritten keys)
    k_, v_, gqa = pnn.sdpa_gqa(q_, k_, v_)
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.to(q.dtype) if mask.is_floating_point() else mask,
                                         dropout_p=dropout, scale=call["scale"], **gqa)
    return out.transpose(1, 2)  # (B, T, H, D)


def _kernel_takes(q, k, v, softcap: float, decode: bool = False, dropout: float = 0.0) -> bool:
    return (pnn._flash_attn_takes(q, k, v, decode) and q.shape[-1] == k.shape[-1] == v.shape[-1]  # not MLA's value dim
            and flash_attn_ops.takes_score_mods(q, softcap, None, dropout))  # capped scores, dropout on CUDA: when asked


# Up to this many new queries over a cache go to the KV-cache kernel, which streams the cache once per
# GQA group (pyllm.flash_attn_with_kvcache): one decoded token, B = 4, a cache of 1,024, SmolLM2's
# heads, on 2 EPYC cores: 258 us fp32 / 252 us bf16, vs 698 / 698 through flash_attn and 502 / 3,642
# through SDPA (2026-12-01).
DECODE_QUERIES = 16


def _step_shaped(q, k, causal) -> bool:
    """A decode step's shape (a few queries at the end of more keys): where the kernels on a widened
    copy (head dims without a kernel) lose to SDPA in fp32 (pyllm.nn._flash_attn_takes)."""
    return causal and q.shape[1] < k.shape[1] and q.shape[1] <= DECODE_QUERIES


def _decoding(q, k, v, causal, softcap) -> bool:
    """Whether the KV-cache kernel (inference only: no backward) takes this step; a step whose
    gradient is wanted (prefix tuning's trained cache, training over a cached prompt) does not."""
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return not wants_grad and _step_shaped(q, k, causal) and _kernel_takes(q, k, v, softcap, decode=True)


def _decode(q, k, v, causal, window, scale, softcap, sinks, pads=None, dropout_p=0.0):
    """q (B, T, H, D) at the end of the keys k, v (B, S, H_kv, D), views of transformers' cache;
    pads: int32 (B,), row b's keys start there (left padding). (Never with dropout: inference.)"""
    return flash_attn_ops.flash_attn_with_kvcache(q, k, v, k.shape[1], causal=True, softmax_scale=scale,
                                                  window=(window[0], -1), softcap=softcap, sinks=sinks,
                                                  cache_leftpad=pads)


# --- the attention as one custom op -----------------------------------------------------------------------
#
# Whether a batch is padded or packed is read off the mask / position_ids, a device sync and
# data-dependent shapes (the real tokens' indices): under torch.compile each read was a graph break,
# 13 in a 2-layer Llama. pyllm::hf_attention takes the mask and position_ids as inputs and reads
# them inside, where the compiler does not look: shapes in and out are the padded ones, so a
# compiled model is one graph. Its backward reads them again (the memos make that one read per
# forward and one per backward), so no index tensor of data-dependent size is ever saved. Reading
# them is a device sync on CUDA, which a CUDA graph cannot hold: the ops are tagged cudagraph_unsafe
# so that inductor's CUDA graphs (mode="reduce-overhead") leave them out (torch 2.8+; with an older
# torch compile such models without CUDA graphs). Decode steps over a cache stay out of the op.

def _syncing_op(name: str, body):
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    tags = {"tags": (unsafe,)} if unsafe is not None else {}
    return torch.library.custom_op(name, mutates_args=(), **tags)(body)


def _attend(q, k, v, mask, position_ids, causal, window, scale, softcap, sinks, dropout_p=0.0):
    """q (B, T, H, D) at the end of k, v (B, S, H_kv, D); mask (B, S) of real keys or None;
    position_ids (B or 1, T) restarting at 0 where documents are packed, or None. dropout_p: on the
    probabilities (each padded row or packed document a sequence of pyllm.flash_attn's masks).
    -> (B, T, H, D)."""
    flash_attn_ops._check_qkv(NAME, q, k, v, varlen=False)
    flash_attn_ops._check_sinks(NAME, q, sinks)
    scale = flash_attn_ops._resolve_scale(NAME, scale, q.shape[-1])
    like = q
    if flash_attn_ops._runs_widened(q):  # a head dim (Phi-2's 80) or dtype (CPU fp16) without a kernel
        q, k, v = (flash_attn_ops._widened(t) for t in (q, k, v))
    dropout = flash_attn_ops._dropout_inputs(NAME, dropout_p)
    out, lse = _util.call(_hf_attention_body, _hf_attention, _HfAttentionFunction, q, k, v, mask, position_ids,
                          scale, *window, float(softcap), *dropout)  # causal: window's right is 0
    if sinks is not None:
        out, _ = flash_attn_ops._with_sinks(out, lse, sinks, False)  # (B, H, T) lse: not varlen
    return out if q is like else flash_attn_ops._narrowed(out, like)


def _layout(mask, position_ids, B: int, T: int, S: int):
    """How the (B, T) queries and (B, S) keys run: None (rows as they are), or the varlen call's
    (q_index, cu_q, max_q, k_index, cu_k, max_k), the indices None where every token is kept
    (documents packed into the rows)."""
    if mask is not None:
        unpadded = _unpadding(mask, T)
        if unpadded is not None:
            (q_index, cu_q, max_q), (k_index, cu_k, max_k) = unpadded
            return q_index, cu_q, max(max_q, 1), k_index, cu_k, max(max_k, 1)
    cu = _packed_starts(position_ids, B, T) if T == S else None
    return None if cu is None else (None, cu, T, None, cu, T)


def _rows(x: torch.Tensor, index) -> torch.Tensor:
    """(B, L, ...) -> the rows (N, ...) of index into its B * L tokens (all of them for None)."""
    if index is None:
        return x.reshape(-1, *x.shape[2:])
    return x[index // x.shape[1], index % x.shape[1]]  # no copy of a strided view (a cache) first


def _unrows(rows: torch.Tensor, index, shape, fill=0.0) -> torch.Tensor:
    """_rows' inverse: a contiguous (B, L, ...) tensor, fill where no row went."""
    if index is None:
        return rows.reshape(shape)
    full = rows.new_full((shape[0] * shape[1], *rows.shape[1:]), fill)
    return full.index_copy_(0, index, rows).view(shape)


def _lse_rows(lse: torch.Tensor, index) -> torch.Tensor:  # (B, H, T) -> (H, N)
    rows = lse.permute(1, 0, 2).reshape(lse.shape[1], -1)
    return (rows if index is None else rows[:, index]).contiguous()


def _hf_attention_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, scale: float, window_left: int, window_right: int,
                       softcap: float, dropout_p: float = 0.0,
                       dropout_seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, _ = q.shape
    layout = _layout(mask, position_ids, B, T, k.shape[1])
    if layout is None:
        return flash_attn_ops._flash_attn_body(q, k, v, None, None, -1, -1, scale, window_left, window_right,
                                               False, softcap, None, dropout_p, dropout_seed)
    q_index, cu_q, max_q, k_index, cu_k, max_k = layout
    out, lse = flash_attn_ops._flash_attn_body(_rows(q, q_index), _rows(k, k_index), _rows(v, k_index), cu_q, cu_k,
                                               max_q, max_k, scale, window_left, window_right, False, softcap, None,
                                               dropout_p, dropout_seed)
    lse = _unrows(lse.t(), q_index, (B, T, H), math.inf)  # a padded query sees no key, as the kernel's lse says
    return _unrows(out, q_index, q.shape), lse.permute(0, 2, 1).contiguous()  # (B, T, H, D), (B, H, T)


_hf_attention = _syncing_op("pyllm::hf_attention", _hf_attention_body)


@_hf_attention.register_fake
def _(q, k, v, mask, position_ids, scale, window_left, window_right, softcap, dropout_p=0.0, dropout_seed=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=flash_attn_ops._lse_dtype(q))


def _hf_attention_backward_body(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                                position_ids: torch.Tensor | None, scale: float, window_left: int, window_right: int,
                                softcap: float, dropout_p: float = 0.0,
                                dropout_seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = q.shape[:2]
    layout = _layout(mask, position_ids, B, T, k.shape[1])
    if layout is None:
        return flash_attn_ops._flash_attn_backward_body(dout, dlse, q, k, v, out, lse, None, None, -1, -1, scale,
                                                        window_left, window_right, False, softcap, None, dropout_p,
                                                        dropout_seed)
    q_index, cu_q, max_q, k_index, cu_k, max_k = layout
    dq, dk, dv = flash_attn_ops._flash_attn_backward_body(
        _rows(dout, q_index), None if dlse is None else _lse_rows(dlse, q_index), _rows(q, q_index),
        _rows(k, k_index), _rows(v, k_index), _rows(out, q_index), _lse_rows(lse, q_index), cu_q, cu_k, max_q, max_k,
        scale, window_left, window_right, False, softcap, None, dropout_p, dropout_seed)
    return _unrows(dq, q_index, q.shape), _unrows(dk, k_index, k.shape), _unrows(dv, k_index, v.shape)


_hf_attention_backward = _syncing_op("pyllm::hf_attention_backward", _hf_attention_backward_body)
_util.refuse_second_derivatives("pyllm::hf_attention_backward")


@_hf_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, mask, position_ids, scale, window_left, window_right, softcap, dropout_p=0.0,
      dropout_seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _hf_attention_setup(ctx, inputs, output):
    q, k, v, mask, position_ids, *args = inputs
    ctx.args, dropout_seed = args[:5], (args[5] if len(args) > 5 else None)  # (dropout_p's seed: a tensor, saved)
    # An inference tensor (a mask or positions made under torch.inference_mode) cannot be saved: a copy
    mask, position_ids, dropout_seed = (t.clone() if t is not None and t.is_inference() else t
                                        for t in (mask, position_ids, dropout_seed))
    ctx.save_for_backward(q, k, v, *output, mask, position_ids, dropout_seed)
    ctx.n_inputs = len(inputs)


def _hf_attention_grad(ctx, dout, dlse):
    q, k, v, out, lse, mask, position_ids, dropout_seed = ctx.saved_tensors
    seed = (dropout_seed,) if dropout_seed is not None else ()
    dq, dk, dv = _util.call(_hf_attention_backward_body, torch.ops.pyllm.hf_attention_backward, None, dout, dlse,
                            q, k, v, out, lse, mask, position_ids, *ctx.args, *seed)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


_hf_attention.register_autograd(_hf_attention_grad, setup_context=_hf_attention_setup)


_HfAttentionFunction = _util.eager_function("hf_attention", _hf_attention_body, _hf_attention_setup,
                                            _hf_attention_grad)


class _ForwardMemo:
    """The last values computed from a few tensors: every layer of a forward gets the same mask or
    position_ids tensor, so the device sync that reads it happens once per forward (and once per
    backward), not once per layer. Keyed on the tensor itself, its version (an in-place edit reads
    it again; inference tensors have none, and are not edited between layers) and what else the
    value depends on. Gemma 2 / 3 hand their sliding and their full layers two mask views in turn:
    one slot would read them again at every layer, forward and backward. The tensors are held
    weakly and an entry goes with its tensor: a batch's mask and what was read off it (device
    memory) had outlived the batch, and the model, in this module's memos."""
    SLOTS = 4

    def __init__(self):
        self.entries = []  # (weak reference to the tensor, key, value), the most recent first

    def _drop(self, ref) -> None:
        self.entries = [entry for entry in self.entries if entry[0] is not ref]

    def get(self, tensor: torch.Tensor, extra, compute):
        key = (extra, None if tensor.is_inference() else tensor._version)
        for held, held_key, value in self.entries:
            if held() is tensor and held_key == key:
                return value
        value = compute()
        self.entries = [(weakref.ref(tensor, self._drop), key, value)] + self.entries[:self.SLOTS - 1]
        return value


_suffix_memo, _unpadding_memo, _packed_memo = _ForwardMemo(), _ForwardMemo(), _ForwardMemo()


def _suffix_starts(attention_mask: torch.Tensor, real_k: torch.Tensor) -> list[int] | None:
    """Where each row's real keys start, when they run to the end of the row (left padding, as
    generation pads), else None."""
    def compute():
        width = real_k.shape[1]
        counts = real_k.sum(dim=1)  # (B,)
        first = torch.where(counts > 0, real_k.int().argmax(dim=1), width)  # each row's first real key
        starts, firsts = torch.stack([width - counts, first]).tolist()
        return starts if starts == firsts and all(start < width for start in starts) else None
    return _suffix_memo.get(attention_mask, tuple(real_k.shape), compute)


def _unpadding(attention_mask: torch.Tensor, T: int):
    """_real_tokens of the queries (the last T columns) and of the keys (one read when they are the
    same columns: no cache), or None when no token is padding."""
    def compute():
        real_k = attention_mask.bool()
        keys = _real_tokens(real_k)
        if keys[0].numel() == real_k.numel():
            return None  # every token is real: no unpadding
        return (keys if T == real_k.shape[1] else _real_tokens(real_k[:, -T:])), keys
    return _unpadding_memo.get(attention_mask, T, compute)


_real_tokens = flash_attn_ops.real_tokens  # (a module-level name: tests count the reads through it)


def _packed_starts(position_ids: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """int32 cu_seqlens of the documents packed into (B, T) rows, read off position_ids restarting at
    0 (TRL's padding_free, DataCollatorWithFlattening); None when each row is one sequence."""
    if _document_starts(position_ids, B, T) is None:
        return None

    def compute():
        starts = _document_starts(position_ids, B, T)
        if int(starts.sum()) == B:
            return None
        return F.pad(starts.flatten().nonzero()[:, 0].to(torch.int32), (0, 1), value=B * T)
    return _packed_memo.get(position_ids, (B, T), compute)


def _reference_rows(q, k, v, real_q, real_k, causal, window, scale, softcap, sinks, documents=None, dropout_p=0.0):
    """The kernel's function through SDPA, row by row of the batch: q (B, T, H, D), k and v (B, S,
    H_kv, D), real_q (B, T) / real_k (B, S) the tokens that are not padding. Each row's real queries
    sit at the end of its real keys (flash-attn's bottom-right causal, after unpadding), the window
    around that; padded queries give 0. documents (B, T), T = S: a query sees its own document's
    keys only. The mask is (B, 1, T, S): no batch-squared memory."""
    pos_k = real_k.long().cumsum(1) - 1  # (B, S): a key's place among its row's real keys
    pos_q = real_q.long().cumsum(1) - 1 + (real_k.sum(1) - real_q.sum(1))[:, None]  # (B, T), aligned to the end
    seen = _band(pos_q[:, :, None], pos_k[:, None, :], causal, window) & real_k[:, None, :] & real_q[:, :, None]
    if documents is not None:
        seen &= documents[:, :, None] == documents[:, None, :]
    out = pnn._sdpa(q, k.to(q.dtype), v.to(q.dtype), seen[:, None], scale=scale, softcap=softcap or None, sinks=sinks,
                    dropout_p=dropout_p)
    return out.masked_fill(~seen.any(dim=2)[:, :, None, None], 0)  # a query seeing no key: 0, as the kernel


def _reference_packed(q, k, v, cu_q, cu_k, causal, window, scale, softcap, sinks, dropout_p=0.0):
    """The varlen kernel's function through SDPA: sequences back to back, q (N_q, H, D), k and v
    (N_k, H_kv, D), sequence b at rows cu_q[b]:cu_q[b + 1] / cu_k[b]:cu_k[b + 1], with an (N_q, N_k)
    mask (packed rows are usually one row of the batch: B = 1)."""
    seq_q, pos_q = _sequence_positions(cu_q, q.shape[0])  # (N_q,) each
    seq_k, pos_k = _sequence_positions(cu_k, k.shape[0])
    pos_q = pos_q + (cu_k.diff() - cu_q.diff()).long()[seq_q]  # aligned to the end of its keys
    seen = (seq_q[:, None] == seq_k[None, :]) & _band(pos_q[:, None], pos_k[None, :], causal, window)
    out = pnn._sdpa(q[None], k[None].to(q.dtype), v[None].to(q.dtype), seen[None, None], scale=scale,
                    softcap=softcap or None, sinks=sinks, dropout_p=dropout_p)[0]
    return out.masked_fill(~seen.any(dim=1)[:, None, None], 0)


def _document_starts(position_ids: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """(B, T) bool: where a document packed into its row begins (position_ids restart at 0), no
    device sync; None without position_ids of that shape."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != T:
        return None
    starts = position_ids.expand(B, T) == 0
    starts[:, 0] = True  # a row begins a document wherever its positions start
    return starts


def _documents(position_ids: torch.Tensor | None, B: int, T: int, real_k: torch.Tensor | None = None
               ) -> torch.Tensor | None:
    """(B, T) int64: which document of its row each token is in, or None (see _document_starts).
    real_k: the padding mask; where it pads any row, one document a row, as the kernels' path (and
    transformers' flash-attention) reads a padded batch by its mask alone (no sync: a mask, not a branch)."""
    starts = _document_starts(position_ids, B, T)
    if starts is None:
        return None
    documents = starts.long().cumsum(1)
    return documents if real_k is None else documents.masked_fill(~real_k.all(), 0)


def _band(pos_q, pos_k, causal, window):
    """Which keys a query sees by position: causal, and the (left, right) window around it."""
    left, right = window
    seen = torch.ones(torch.broadcast_shapes(pos_q.shape, pos_k.shape), dtype=torch.bool, device=pos_q.device)
    if causal:
        right = 0
    if right >= 0:
        seen &= pos_k <= pos_q + right
    if left >= 0:
        seen &= pos_k >= pos_q - left
    return seen


def _sequence_positions(cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of n packed tokens' sequence (of cu_seqlens) and its place in it."""
    seq = pnn.document_ids(cu.long(), 1, n)[0]  # (n,)
    return seq, torch.arange(n, device=cu.device) - cu.long()[seq]


# --- SwiGLU --------------------------------------------------------------------------------------------

# Activations are matched by exact class (a subclass may override forward): torch's, or transformers'
# own by name in transformers.activations.
def _is_transformers_activation(act, names) -> bool:
    return type(act).__name__ in names and type(act).__module__ == "transformers.activations"


def _is_silu(act) -> bool:
    return type(act) is nn.SiLU or _is_transformers_activation(act, ("SiLUActivation",))


# transformers' modules for the tanh GELU: "gelu_pytorch_tanh" (Gemma 1-3), "gelu_new", "gelu_fast",
# "gelu_accurate" (the same function written out in torch ops).
_GELU_TANH_CLASSES = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation",
                      "AccurateGELUActivation")


def _is_gelu_tanh(act) -> bool:
    if type(act) is nn.GELU:
        return act.approximate == "tanh"
    return _is_transformers_activation(act, _GELU_TANH_CLASSES)


def _hub_function(f):
    """The plain function under a `kernels` hub wrapper, else f. From transformers 5.25 (with the
    `kernels` package, which it requires) a modeling file's apply_rotary_pos_emb is an instance of
    an nn.Module class "Func" whose forward calls the function it was made from (a hub kernel
    instead, once kernelized): the function is in that forward's closure, as `func`."""
    if isinstance(f, nn.Module):
        forward = type(f).forward
        names, cells = getattr(getattr(forward, "__code__", None), "co_freevars", ()), forward.__closure__ or ()
        if "func" in names and len(cells) == len(names):
            inner = cells[names.index("func")].cell_contents
            if isinstance(inner, types.FunctionType):
                return inner
    return f


def _same_code(forward, reference) -> bool:
    """Whether a module class's forward is reference's, up to local names: the MLPs transformers
    copies from Llama's (Mistral's, Qwen's, ...) are; one that scales, clamps or adds a step is not."""
    forward, reference = _hub_function(forward), _hub_function(reference)
    a, b = getattr(forward, "__code__", None), reference.__code__
    return a is not None and (a.co_code, a.co_names, _code_consts(forward)) == (b.co_code, b.co_names, _code_consts(reference))


def _code_consts(function) -> tuple:
    """A function's constants less its docstring. Before Python 3.14 co_consts[0] is the docstring or
    None; from 3.14 it is the docstring where the CO_HAS_DOCSTRING flag says there is one, else the
    first real constant, which dropping co_consts[0] blindly would leave uncompared."""
    code = function.__code__
    has_docstring = getattr(inspect, "CO_HAS_DOCSTRING", None)
    if has_docstring is None or code.co_flags & has_docstring:
        return code.co_consts[1:]
    return code.co_consts


# --- how a patch is put in -------------------------------------------------------------------------------
#
# A patched module gets a class of its own: a subclass of its transformers class whose forward is
# pyllm's, with the same name, qualname and module (what HF's name checks, _no_split_modules and
# save_pretrained's architectures read). Not a forward bound to the instance, as before 2026-12-02:
# nn.DataParallel's replicas (HF's Trainer on several GPUs without torchrun) copy an instance's __dict__
# shallowly, so every replica ran the original module's weights, and a method bound to a module does
# not pickle (torch.save(model) saved a model that did not load). Pickled, a patched module names its
# transformers class and its patch; loading makes the class again.

_PATCHED_CLASSES: dict = {}  # (transformers class, kind) -> its subclass with pyllm's forward


def _unpatched(cls: type) -> type:
    """The transformers class under a patched class (cls itself when it is not one)."""
    return getattr(cls, "_pyllm_base", cls)


def _forward_of(base: type, kind: str):
    """pyllm's forward for base's modules: kind names a forward of this module, or "rope" (a copy of
    base's own forward, per class), or the fused loss's (with base's own signature, per class)."""
    if kind == "rope":
        return _rope_forward(base)
    if kind == "_fused_loss_forward":
        return _fused_loss_forward_of(base)
    return globals()[kind]


def _patched_class(base: type, kind: str) -> type:
    if (base, kind) not in _PATCHED_CLASSES:
        forward = _forward_of(base, kind)
        if forward is None:
            raise TypeError(f"pyllm.hf: {base.__qualname__} has no forward of kind {kind!r} in this transformers")
        # The forward under its own name too: a method bound to an instance (accelerate's _old_forward, put
        # back as the forward when its hook is removed) pickles as getattr(module, its function's name).
        _PATCHED_CLASSES[base, kind] = type(base.__name__, (base,), {
            forward.__name__: forward, "forward": forward, "__module__": base.__module__,
            "__qualname__": base.__qualname__, "__doc__": base.__doc__, "__reduce_ex__": _reduce_patched,
            "_pyllm_base": base, "_pyllm_kind": kind})
    return _PATCHED_CLASSES[base, kind]


def _accelerate_hooked(module: nn.Module) -> bool:
    """Whether accelerate put a hook around the module's forward (from_pretrained's device_map, offload):
    its wrapper on the instance calls module._old_forward between moving the inputs (and offloaded
    weights) in and the outputs out."""
    return "_old_forward" in module.__dict__ and getattr(module, "_hf_hook", None) is not None


def _importable(cls: type) -> bool:
    """Whether cls is found by its module and qualname, as pickle finds a class: transformers' are; the
    classes wrappers make at run time (FSDP2's fully_shard, torch's parametrize) are not."""
    found = sys.modules.get(cls.__module__)
    for name in cls.__qualname__.split("."):
        found = getattr(found, name, None)
    return found is cls


def _patch(module: nn.Module, kind: str) -> None:
    cls = type(module)
    base = _unpatched(cls)
    hooked = _accelerate_hooked(module)
    if getattr(cls, "_pyllm_kind", None) == kind and "forward" not in module.__dict__:
        return  # patched already (FSDP2's class over a patched one too)
    forward = _forward_of(base, kind)
    # pyllm's class for transformers' own (or pyllm's); on the instance, over theirs, where someone's forward
    # is there (TRL's fused head wraps the model's) or another wrapper made the class (FSDP2, parametrize)
    swap = ("_pyllm_base" in cls.__dict__ or (cls is base and _importable(cls))) and (
        hooked or "forward" not in module.__dict__)
    if swap:
        module.__class__ = _patched_class(base, kind)
    if hooked:  # the hook stays and calls pyllm's forward
        module._old_forward = types.MethodType(forward, module)
    elif not swap:
        module.forward = types.MethodType(forward, module)


def _reduce_patched(self, protocol):
    cls = type(self)
    if "_pyllm_base" not in cls.__dict__:  # a subclass another wrapper made of a patched class: as it pickles
        return object.__reduce_ex__(self, protocol)
    return _unpickle_patched, (cls._pyllm_base, cls._pyllm_kind), self.__getstate__()


def _unpickle_patched(base: type, kind: str) -> nn.Module:
    """A patched module's empty shell, for pickle (and deepcopy) to fill; transformers' own class where
    this process's transformers or pyllm has no such patch."""
    register_attention()  # a model pickled with pyllm's attention runs it in the process that loads it
    try:
        cls = _patched_class(base, kind)
    except (KeyError, TypeError) as e:
        warnings.warn(f"pyllm.hf: {base.__qualname__} loads without pyllm's {kind} forward ({e!r})", stacklevel=2)
        cls = base
    return cls.__new__(cls)


def _gated(fused, act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.dtype == up.dtype and pnn._swiglu_takes(gate):
        return fused(gate, up)
    return act(gate) * up  # no kernel for these inputs: the module's own activation


def _swiglu_mlp_forward(self, x):  # LlamaMLP and its copies: gate_proj, up_proj, down_proj
    return self.down_proj(_gated(swiglu, self.act_fn, self.gate_proj(x), self.up_proj(x)))


def _geglu_mlp_forward(self, x):  # GemmaMLP (Llama's forward with a tanh GELU)
    return self.down_proj(_gated(geglu, self.act_fn, self.gate_proj(x), self.up_proj(x)))


# Phi3MLP: gate_up_proj holds [gate | up]; inputs no kernel takes run the module's own activation
def _packed_swiglu_mlp_forward(self, x):
    return self.down_proj(pnn._gated_packed(self.gate_up_proj(x), swiglu_packed, self.activation_fn))


def _packed_geglu_mlp_forward(self, x):
    return self.down_proj(pnn._gated_packed(self.gate_up_proj(x), geglu_packed, self.activation_fn))


def _patch_gated_mlps(model: nn.Module, silu: bool, gelu_tanh: bool) -> tuple[int, int]:
    """Points each MLP whose forward is Llama's down(act(gate) * up) (or Phi-3's on a packed
    gate_up_proj) at pyllm's fused act(gate) * up, for a SiLU (swiglu) and a tanh GELU (geglu);
    returns how many of each."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP
    counts = {"silu": 0, "gelu_tanh": 0}
    for module in model.modules():
        forward = _unpatched(type(module)).forward
        if _same_code(forward, LlamaMLP.forward):
            act, forwards = getattr(module, "act_fn", None), ("_swiglu_mlp_forward", "_geglu_mlp_forward")
        elif _same_code(forward, Phi3MLP.forward):
            act, forwards = getattr(module, "activation_fn", None), ("_packed_swiglu_mlp_forward",
                                                                     "_packed_geglu_mlp_forward")
        else:
            continue
        if silu and _is_silu(act):
            _patch(module, forwards[0])
            counts["silu"] += 1
        elif gelu_tanh and _is_gelu_tanh(act):
            _patch(module, forwards[1])
            counts["gelu_tanh"] += 1
    return counts["silu"], counts["gelu_tanh"]


# --- RMSNorm ------------------------------------------------------------------------------------------

def _rms_norm_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.shape == x.shape[-1:] and pnn._rms_norm_takes(x)


def _llama_rms_norm_forward(self, x):  # LlamaRMSNorm and its copies: weight * (x32 * rstd).to(dtype)
    weight = self.weight
    if not _rms_norm_takes(x, weight):
        return _unpatched(type(self)).forward(self, x)
    if weight.dtype == x.dtype:
        return fused_rms_norm(x, weight, self.variance_epsilon)
    # A weight of another dtype (fp32 weights, bf16 activations under autocast): the module's product
    # promotes (an fp32 output), so the kernel normalises and rounds, and torch scales, as it does.
    return weight * fused_rms_norm(x, None, self.variance_epsilon)


def _scaled_in_fp32(self, x, eps: float, offset: float):  # (x32 * rstd * (offset + weight32)).to(dtype)
    weight = self.weight
    if not _rms_norm_takes(x, weight):
        return _unpatched(type(self)).forward(self, x)
    if weight.dtype == x.dtype:
        return fused_rms_norm(x, weight, eps, offset=offset, cast_first=False)
    # Another dtype for the weight: all of it in fp32 and one rounding at the end, as the module does.
    return fused_rms_norm(x.float(), weight.float(), eps, offset=offset, cast_first=False).to(x.dtype)


def _gemma_rms_norm_forward(self, x):  # Gemma's: the weight stored as scale - 1
    return _scaled_in_fp32(self, x, self.eps, 1.0)


def _gpt_oss_rms_norm_forward(self, x):  # gpt-oss's: Llama's, scaled before the rounding
    return _scaled_in_fp32(self, x, self.variance_epsilon, 0.0)


def _patch_rms_norm(model: nn.Module) -> int:
    """Points each RMSNorm whose forward is Llama's (Qwen's, Mistral's, Qwen3's per-head q / k norms,
    ...), gpt-oss's (scaled in fp32) or Gemma's (weight stored as scale - 1) at pyllm's fused kernel, with
    the module's roundings and output dtype for any weight dtype; returns how many. Inputs no kernel takes
    run the module's own."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    count = 0
    for module in model.modules():
        cls = _unpatched(type(module))
        if _same_code(cls.forward, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon"):
            _patch(module, "_llama_rms_norm_forward")
        elif _same_code(cls.forward, GptOssRMSNorm.forward) and hasattr(module, "variance_epsilon"):
            _patch(module, "_gpt_oss_rms_norm_forward")
        elif (_same_code(cls.forward, Gemma2RMSNorm.forward) and _same_code(getattr(cls, "_norm", None),
                                                                             Gemma2RMSNorm._norm)
              and hasattr(module, "eps")):
            _patch(module, "_gemma_rms_norm_forward")
        else:
            continue
        count += 1
    return count


# --- RoPE ------------------------------------------------------------------------------------------------
#
# transformers' attention modules call their modeling file's module-level apply_rotary_pos_emb. That
# global stays as it is (replacing it, as Liger-Kernel does, changes every model of the type in the
# process, and whatever reads it: torch.compile of unpatched models too): a patched module gets its
# own copy of its class's forward whose globals name the fused function instead, bound to the module
# as the forward of the module's patched class (_patch). The copy's globals are a
# snapshot taken at the first patch: later changes to the modeling file's globals do not reach it.


def _rope_takes(q, k, cos, sin) -> bool:
    """q, k (B, H, T, D) of a kernel's dtype (one dtype: the caller checks), cos, sin (B or 1, T, D) as
    transformers' rotary embeddings make them (the same angles in both halves), no gradient to the tables."""
    return (q.dim() == 4 and k.dim() == 4 and q.dtype in pnn._kernel_dtypes(q, rope_ops.DTYPES)
            and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1] == k.shape[-1]
            and q.shape[-1] % 2 == 0 and cos.shape[1] == q.shape[2] == k.shape[2] and cos.shape[0] in (1, q.shape[0])
            and k.shape[0] == q.shape[0] and cos.device == q.device
            and not (cos.requires_grad or sin.requires_grad))


def _rotated(x, cos, sin, interleaved=False):  # (B, H, T, D) through pyllm.rope's (B, T, H, D) view, and back
    return rope_ops.rope(x.transpose(1, 2), cos, sin, interleaved=interleaved).transpose(1, 2)


def _rotate_q_k(q, k, cos, sin, args, kwargs, interleaved: bool):
    """apply_rotary_pos_emb's (q, k) on pyllm.rope, or None for calls the kernel does not take. Llama's
    rotate-half form, or with interleaved Cohere's: pairs (2i, 2i + 1), tables with each angle twice
    in a row, fp32 math, q's dtype out."""
    plain_call = not args and set(kwargs) <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1
    if not plain_call or q.dtype != k.dtype:
        return None
    # Llama's promotes (bf16 q and fp32 tables under autocast give fp32 q and k): the same dtype out,
    # the kernel run in it. Cohere's computes in fp32 and gives q's dtype back: the kernel's own fp32
    # math and rounding.
    dtype = q.dtype if interleaved else torch.promote_types(q.dtype, cos.dtype)
    q_in, k_in = (q, k) if dtype == q.dtype else (q.to(dtype), k.to(dtype))
    if not _rope_takes(q_in, k_in, cos, sin):
        return None
    table = rope_ops._table_dtype(q_in)
    pick = slice(0, None, 2) if interleaved else slice(0, cos.shape[-1] // 2)
    cos_half, sin_half = cos[..., pick].to(table), sin[..., pick].to(table)  # (B or 1, T, D/2)
    return _rotated(q_in, cos_half, sin_half, interleaved), _rotated(k_in, cos_half, sin_half, interleaved)


def _fused_rotary(original, interleaved: bool = False):
    """A drop-in for transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) on pyllm.rope
    (_rotate_q_k); calls it does not take go to `original`. Two functions, not one reading
    `interleaved` from its closure: torch.compile guards the closure's constants through the name
    the forward's globals give the function, transformers' own there, which has no closure."""
    if interleaved:
        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            rotated = _rotate_q_k(q, k, cos, sin, args, kwargs, True)
            return rotated if rotated is not None else original(q, k, cos, sin, *args, **kwargs)
    else:
        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            rotated = _rotate_q_k(q, k, cos, sin, args, kwargs, False)
            return rotated if rotated is not None else original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _with_globals(fn, replacements: dict):
    """A copy of fn whose global names in `replacements` mean other objects (fn untouched). A
    decorated fn (functools.wraps, the inner function in the wrapper's closure: transformers'
    deprecate_kwarg) is copied layer by layer. None where a wrapper does not hold its inner function,
    or is not a plain function."""
    if not isinstance(fn, types.FunctionType):
        return None
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        closure, fn_globals = fn.__closure__, {**fn.__globals__, **replacements}
    else:
        new_inner = _with_globals(inner, replacements)
        cells = fn.__closure__ or ()
        if new_inner is None or not any(c.cell_contents is inner for c in cells):
            return None
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in cells)
        fn_globals = fn.__globals__
    copy = types.FunctionType(fn.__code__, fn_globals, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__, copy.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    copy.__annotations__ = dict(fn.__annotations__)
    if hasattr(fn, "__type_params__"):  # Python 3.12+
        copy.__type_params__ = fn.__type_params__
    if inner is not None:
        copy.__wrapped__ = new_inner
    return copy


_ROPE_FORWARDS: dict = {}  # attention class -> its forward on pyllm.rope (None: cannot be made)
# Cohere's interleaved rotation (pairs (2i, 2i + 1)) is taken in these modeling files only, whose rotary
# embeddings repeat each angle twice in a row (repeat_interleave): other files with the same two
# functions (vision models') build their tables otherwise.
INTERLEAVED_ROPE_MODULES = frozenset(f"transformers.models.{m}.modeling_{m}" for m in ("cohere", "cohere2", "cohere2_moe"))


def _rope_forward(cls):
    """cls.forward with apply_rotary_pos_emb on pyllm.rope, when cls's forward calls its modeling
    file's apply_rotary_pos_emb and that is Llama's rotate-half form, with Llama's rotate_half, or
    Cohere's interleaved form in one of INTERLEAVED_ROPE_MODULES."""
    if cls not in _ROPE_FORWARDS:
        from transformers.models.cohere import modeling_cohere
        from transformers.models.llama import modeling_llama
        forward = cls.forward
        inner = inspect.unwrap(forward)
        rotary = _hub_function(getattr(inner, "__globals__", {}).get("apply_rotary_pos_emb"))
        calls = "apply_rotary_pos_emb" in getattr(getattr(inner, "__code__", None), "co_names", ()) and rotary is not None
        # (getattr: a rotation that is no plain function, a functools.partial say, is no one's to replace)
        halves = getattr(rotary, "__globals__", {}).get("rotate_half") if calls else None
        llama = (calls and _same_code(rotary, modeling_llama.apply_rotary_pos_emb)
                 and _same_code(halves, modeling_llama.rotate_half))
        cohere = (calls and rotary.__module__ in INTERLEAVED_ROPE_MODULES
                  and _same_code(rotary, modeling_cohere.apply_rotary_pos_emb)
                  and _same_code(halves, modeling_cohere.rotate_half))
        _ROPE_FORWARDS[cls] = (_with_globals(forward, {"apply_rotary_pos_emb": _fused_rotary(rotary, cohere)})
                               if llama or cohere else None)
    return _ROPE_FORWARDS[cls]


def _patch_rope(model: nn.Module) -> int:
    """Points each attention module that rotates q and k with Llama's rotate-half apply_rotary_pos_emb
    (Mistral's, Qwen2 / 3's, Gemma's, DeepSeek-V3's, ...) at a forward that does it with pyllm.rope;
    returns how many."""
    count = 0
    for module in model.modules():
        if _rope_forward(_unpatched(type(module))) is None:
            continue
        _patch(module, "rope")
        count += 1
    return count


# --- fused linear cross-entropy --------------------------------------------------------------------------

def _hf_call(model: nn.Module, **kwargs):
    """A call the fused loss leaves: to the forward a wrapper had put on the instance before the patch
    (TRL's fused head), else to the model class's own."""
    earlier = getattr(model, "_pyllm_hf_forward", None)
    return earlier(**kwargs) if earlier is not None else _unpatched(type(model)).forward(model, **kwargs)


_FUSED_LOSS_FORWARDS: dict = {}  # transformers class -> its fused-loss forward


def _fused_loss_forward_of(base: type):
    """_fused_loss_forward with base.forward's signature: positional arguments in the model's own order
    (GPT-2's puts past_key_values second, Llama's fourth), and what reads the signature (the Trainer's
    remove_unused_columns, generate's check of its keyword arguments) sees the model's parameters."""
    if base not in _FUSED_LOSS_FORWARDS:
        signature = inspect.signature(base.forward)
        first = next(iter(signature.parameters))

        def _fused_loss_forward_bound(self, *args, **kwargs):
            if args:
                named = {}
                for name, value in signature.bind(self, *args, **kwargs).arguments.items():
                    kind = signature.parameters[name].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        named.update(value)
                    elif kind is inspect.Parameter.VAR_POSITIONAL:
                        if value:
                            raise TypeError(f"{base.__name__}.forward: too many positional arguments")
                    elif name != first:  # (the instance, whatever the forward calls it)
                        named[name] = value
                kwargs = named
            return _fused_loss_forward(self, **kwargs)

        _fused_loss_forward_bound.__signature__ = signature
        _fused_loss_forward_bound.__doc__ = _fused_loss_forward.__doc__
        _fused_loss_forward_bound._pyllm_fused = True
        _FUSED_LOSS_FORWARDS[base] = _fused_loss_forward_bound
    return _FUSED_LOSS_FORWARDS[base]


def _fused_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                        labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """HF's ForCausalLM.forward; while training with labels, the loss straight from the last hidden
    states (pyllm.nn.linear_cross_entropy: the (tokens, vocab) logits never exist whole) and
    logits=None, as Liger-Kernel's. Otherwise (eval, generation, no labels, logits_to_keep, an output
    layer that is no plain Linear, such as one PEFT wrapped in LoRA, or one accelerate offloaded; a call
    for TRL's own fused head, fused_lm_head=True, when TRL wrapped the forward before this patch did; a
    loss of the user's, model.loss_function = fn, which wants the logits) HF's own forward."""
    head = self.get_output_embeddings()
    if (not self.training or labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
            or "_loss_function" in self.__dict__  # transformers' loss_function setter: the user's loss
            or type(head) is not nn.Linear or head.bias is not None or kwargs.get("fused_lm_head")
            or head.weight.device.type == "meta"):  # offloaded by accelerate: only the head's hook loads it
        return _hf_call(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                        logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    moe = self.config.model_type in FUSED_LOSS_MOE_TYPES
    if moe:  # the router's logits, for the balancing loss: as HF's forward resolves them
        router = kwargs.get("output_router_logits")
        kwargs["output_router_logits"] = router = self.config.output_router_logits if router is None else router
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs)
    hidden = outputs.last_hidden_state.to(head.weight.device)  # (B, T, C); a device_map may put the head apart
    if shift_labels is None:  # tokens < n predict n, as ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device).reshape(-1)
    counted = targets != ignore_index
    # -1 is the kernels' "ignored": a counted label of -1 (or any below 0) is out of range, as for HF's
    # F.cross_entropy (IndexError); here vocab, which the kernels refuse (CPU) or give NaN (torch ops)
    targets = torch.where(counted, targets.masked_fill(targets < 0, head.weight.shape[0]), -1)
    total = _labelled_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, *_logit_shape(self))
    if num_items_in_batch is None:  # the mean over counted tokens (0 / 0 = NaN when none, as F.cross_entropy)
        loss = total / counted.sum()
    else:
        loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                        else num_items_in_batch)
    rest = {name: value for name, value in outputs.items() if name != "last_hidden_state"}  # the cache (its
    # field's name differs between transformers versions), hidden_states, attentions, router_logits
    if moe or self.config.model_type in FUSED_LOSS_ROUTED_TYPES:
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast
        aux_loss = None
        if moe and router:
            balance = _balancing_loss_function(self)
            aux_loss = balance(outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        output = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None, **rest)
    elif self.config.model_type in _CROSS_ATTENTION_OUTPUT_TYPES:
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
        output = CausalLMOutputWithCrossAttentions(loss=loss, logits=None, **rest)
    else:
        output = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    if return_dict is not False:
        return output
    # HF's tuple: (loss, logits, cache, ...), the fields that are not None; the logits' place is kept
    # (None), so that out[1] is not the cache
    return tuple(getattr(output, f.name) for f in dataclasses.fields(output)
                 if f.name == "logits" or getattr(output, f.name) is not None)


# The output layer runs at the labelled rows only: padding and prompts (-100) cost no (tokens, vocab)
# matmul, forward or backward. Which rows those are is a device sync and a data-dependent shape:
# under torch.compile it is read inside one custom op, so the compiler traces around it (running
# every row instead cost 41% more a step on bench_hf's padded batch: 2-core EPYC, compiled,
# 2026-12-01, 3.93 s vs 2.78); the op keeps a (rows, C) grad_x for the backward with the unlabelled
# rows' zeros, where eager autograd keeps the labelled rows' alone.

def _logit_shape(model: nn.Module) -> tuple[float, float]:
    """(scale, softcap) of the model's logits as its forward makes them from lm_head(hidden) (softcap
    0.0: none)."""
    model_type = model.config.model_type
    scale = _LOGIT_SCALES[model_type](model) if model_type in _LOGIT_SCALES else 1.0
    softcap = getattr(model.config, "final_logit_softcapping", None) if model_type in _CAPPED_TYPES else None
    return pnn._logit_shape("pyllm.hf fused loss", scale, softcap)


def _labelled_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                   softcap: float = 0.0) -> torch.Tensor:
    """pnn.linear_cross_entropy(x, weight, targets, scale=, softcap=) (the sum over rows, -1 ignored),
    computed at the rows whose target is not -1 alone."""
    if not _util.values_unreadable(targets):  # eager: the same rows, and only theirs grad_x kept for the backward
        rows = (targets != -1).nonzero()[:, 0]
        return pnn.linear_cross_entropy(x[rows], weight, targets[rows], scale=scale, softcap=softcap)
    x, weight, chunk_rows = pnn._fused_linear_inputs(x, weight, None, softcap, pnn.cross_entropy_ops.takes)
    grad = torch.is_grad_enabled()
    with pnn._autocast_off(x):
        return _labelled_loss_op(x, weight, targets, chunk_rows, grad and x.requires_grad,
                                 grad and weight.requires_grad, scale, softcap)[0]


def _labelled_loss_body(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                        need_x: bool, need_w: bool, scale: float,
                        softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (the loss, grad_x (N, C), grad_w (V, C)), each gradient empty where not needed; grad_w in
    fp32 at least, returned in the weight's own dtype (an fp32 master's under autocast unrounded)."""
    rows = (targets != -1).nonzero()[:, 0]
    every = rows.numel() == targets.numel()
    total, _, grad_x, grad_w = pnn._linear_cross_entropy_with_grads(
        x if every else x[rows], weight.to(x.dtype), targets if every else targets[rows], chunk_rows, need_x, need_w, scale,
        softcap)
    if need_x and not every:
        grad_x = x.new_zeros(x.shape).index_copy_(0, rows, grad_x)
    return total, x.new_empty(0) if grad_x is None else grad_x, _grad_w_like(weight, 0) if grad_w is None else grad_w


def _grad_w_like(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return weight.new_empty((rows, weight.shape[1]), dtype=torch.promote_types(weight.dtype, torch.float32))


_labelled_loss_op = _syncing_op("pyllm::hf_labelled_loss", _labelled_loss_body)


@_labelled_loss_op.register_fake
def _(x, weight, targets, chunk_rows, need_x, need_w, scale, softcap):
    total = x.new_empty((), dtype=torch.promote_types(x.dtype, torch.float32))
    # (the body's grad_w: the weight cast to x's dtype, its products summed in fp32 at least)
    grad_w = weight.new_empty(weight.shape, dtype=total.dtype) if need_w else _grad_w_like(weight, 0)
    return total, x.new_empty(x.shape if need_x else (0,)), grad_w


def _labelled_loss_setup(ctx, inputs, output):
    _, grad_x, grad_w = output
    ctx.mark_non_differentiable(grad_x, grad_w)
    ctx.save_for_backward(grad_x, grad_w)
    ctx.need, ctx.weight_dtype = inputs[4:6], inputs[1].dtype


def _labelled_loss_grad(ctx, grad_total, *_):
    grad_x, grad_w = ctx.saved_tensors
    need_x, need_w = ctx.need
    return (grad_x * grad_total.to(grad_x.dtype) if need_x else None,
            pnn._scaled_grad_w(grad_w, grad_total, ctx.weight_dtype) if need_w else None, None, None, None, None, None, None)


_labelled_loss_op.register_autograd(_labelled_loss_grad, setup_context=_labelled_loss_setup)


def _balancing_loss_function(model: nn.Module):
    """The load_balancing_loss_func the MoE model's own forward calls (its module's; the forward is
    wrapped by transformers' decorators)."""
    return getattr(inspect.unwrap(_unpatched(type(model)).forward), "__globals__", {}).get("load_balancing_loss_func")


def _fused_loss_refusal(model: nn.Module) -> str | None:
    """Why the fused loss cannot replace this model's logits and loss (None: it can)."""
    model_type = getattr(model.config, "model_type", None)
    if model.get_output_embeddings() is None:  # a *ForSequenceClassification (TRL's RewardTrainer), a bare decoder:
        # said first, before the MoE check below blames the forward of a classifier of a MoE type
        return ("its output layer is not a plain nn.Linear without bias (it has no language-model head: a "
                "*ForSequenceClassification or a bare decoder)")
    if model_type in FUSED_LOSS_MOE_TYPES:
        if _balancing_loss_function(model) is None or not all(
                hasattr(model, name) for name in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")):
            return "its forward is not transformers' (no load_balancing_loss_func, num_experts, ...)"
    elif model_type not in FUSED_LOSS_MODEL_TYPES | FUSED_LOSS_ROUTED_TYPES:
        return (f"model_type {model_type!r} is not one whose logits are lm_head(hidden) alone "
                "(pyllm.hf.FUSED_LOSS_MODEL_TYPES, FUSED_LOSS_MOE_TYPES, FUSED_LOSS_ROUTED_TYPES)")
    if getattr(model, "z_loss_coefficient", 0):  # Bamba's z-loss, over every position (the fused loss sees the labelled)
        return "its loss adds a z-loss over every position (z_loss_coefficient)"
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None and model_type not in _CAPPED_TYPES:
        return "its logits are capped (final_logit_softcapping) where its forward is not read as Gemma 2's"
    if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):  # 0 would be no cap here
        return f"its final_logit_softcapping {cap!r} is not a positive number"
    try:
        _logit_shape(model)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        return f"its logits' scale cannot be read ({e})"
    head = model.get_output_embeddings()
    # (a subclass may compute more: Dory's scales). PEFT's wrappers (LoRA on lm_head, modules_to_save)
    # run HF's forward at each call (_fused_loss_forward), as when PEFT wraps after the patch: refused
    # here, the order of get_peft_model and the patch had decided whether a run started.
    peft_head = type(head).__module__.startswith("peft.")
    if not peft_head and (type(head) is not nn.Linear or head.bias is not None):
        return "its output layer is not a plain nn.Linear without bias"
    if not hasattr(model, "get_decoder") or model.get_decoder() is None:
        return "it has no decoder (get_decoder)"
    return None


# --- the one call ------------------------------------------------------------------------------------------

def apply_pyllm_kernels(model: nn.Module, attention: bool = True, swiglu: bool = True, rms_norm: bool = True,
                        rope: bool = True, fused_linear_cross_entropy: bool = True, geglu: bool = True) -> dict:
    """Puts pyllm's kernels into a loaded transformers model, in place:
    attention: attn_implementation "pyllm" (register_attention; model.set_attn_implementation);
    swiglu: every SiLU-gated MLP (Llama's gate_proj / up_proj / down_proj, Phi-3's gate_up_proj) runs
        silu(gate) * up as one kernel (fp32 math, one rounding) instead of two ops;
    geglu: likewise every MLP of that form gated by the tanh GELU (Gemma 1-3's gelu_pytorch_tanh;
        gelu_new, gelu_fast) runs pyllm.geglu;
    rms_norm: every RMSNorm written as Llama's (its copies, Qwen3's per-head q / k norms) or Gemma's
        runs as one kernel forward and one backward (pyllm.rms_norm), with the module's roundings;
    rope: attention modules that rotate q and k with Llama's rotate-half apply_rotary_pos_emb do it with
        pyllm.rope (fp32 math, one rounding; transformers' own rounds each product in the model's dtype);
        the module-level function stays transformers' (other models in the process keep it);
    fused_linear_cross_entropy: training forwards with labels compute the loss from the last hidden
        states chunk by chunk (pyllm.nn.linear_cross_entropy) and return logits=None (the memory of
        the logits and their gradient is what it saves); HF's loss semantics kept: -100 ignored,
        labels shifted (or shift_labels), sum / num_items_in_batch when the Trainer passes it; the
        logits scaled (Granite's, Cohere's) and capped (Gemma 2 / 3's final_logit_softcapping) as the
        model's forward does, in fp32; a mixture of experts' load-balancing loss added as its forward
        adds it (FUSED_LOSS_MOE_TYPES).
        An output layer PEFT wraps (LoRA on lm_head, modules_to_save), before or after this call,
        runs HF's own forward (logits and loss). Code that reads outputs.logits in training (a
        compute_metrics of your own) needs it off; TRL's SFTTrainer computes its entropy and token
        accuracy with its own fused head, which works either way.
    Returns what was applied: {"attention": bool, "swiglu": number of MLPs, "geglu": number of MLPs,
    "rms_norm": number of norms, "rope": number of attention modules, "fused_linear_cross_entropy": bool}. A requested part the model cannot take raises ValueError saying why (fused loss on
    a model whose logits are more than lm_head(hidden); a model that cannot switch attention or does not take
    flash-attention's 2D padding mask). A call that raises leaves the model as it was."""
    applied = {"attention": False, "swiglu": 0, "geglu": 0, "rms_norm": 0, "rope": 0,
               "fused_linear_cross_entropy": False}
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        # A PEFT wrapper: its forward adds prompt tuning's virtual tokens, prefix tuning's cache, adapter
        # hooks, then calls the transformers model, which is what takes the kernels (patching the wrapper
        # had bypassed its forward while training with labels: no gradient for the prompt).
        model = model.get_base_model()
    # Every refusal comes before the first change, in the order the parts are applied; what can still fail
    # after (transformers' set_attn_implementation on a submodel, a missing modeling file, an interrupt)
    # puts the model back as it was: a model half patched would run neither transformers' code nor pyllm's
    # as either was tested, and a caller who catches the ValueError and retries with the part off would
    # keep what the failed call had changed.
    if attention:
        register_attention()
        why = _attention_refusal(model)
        if why is not None:
            raise ValueError(f"{type(model).__name__} {why}; pass attention=False")
    if fused_linear_cross_entropy:
        why = _fused_loss_refusal(model)
        if why is not None:
            raise ValueError(f"apply_pyllm_kernels: no fused linear cross-entropy for {type(model).__name__}: {why}; "
                             "pass fused_linear_cross_entropy=False")
    saved = _saved_state(model)
    try:
        _apply(model, applied, attention, swiglu, rms_norm, rope, fused_linear_cross_entropy, geglu)
    except BaseException:
        _restore(saved)
        raise
    return applied


def _attention_refusal(model: nn.Module) -> str | None:
    """Why the model cannot take pyllm's attention (None when it can)."""
    if not model._can_set_attn_implementation():
        return "does not take attention functions by name (AttentionInterface)"
    if not getattr(model, "_supports_flash_attn", True):  # pyllm's attention gets flash-attention's mask
        return ("does not take flash-attention's 2D padding mask (_supports_flash_attn is False, as transformers "
                "marks models whose masks are more than causal and padding: DeepSeek-V3.2's sparse-attention "
                "indexer reads the 4D mask, Gemma 3's image tokens attend both ways)")
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "gemma2" and getattr(config, "use_bidirectional_attention", False):
        # transformers' Gemma 2 sets is_causal=False but still builds a causal mask: which of the two the
        # unpatched model computes depends on the attention implementation
        return "(Gemma 2 with use_bidirectional_attention): transformers' modules say not causal while its mask is causal"
    return None


# --- every model from_pretrained loads ---------------------------------------------------------------
# TRL's DPO / KTO / GRPO / RLOO trainers load their reference model again from the policy's path (not a
# deepcopy of the patched policy), as Liger-Kernel's users meet it with apply_liger_kernel_to_llama(),
# which patches transformers' classes for every model made afterwards. This patches each model
# from_pretrained returns instead: the same parts as apply_pyllm_kernels, for any family it takes.

_ON_LOAD: dict = {}  # the parts apply_pyllm_kernels_on_load asked for; empty: off
_LOADING = threading.local()  # from_pretrained's depth on this thread (a composite model loads its parts)
_FROM_PRETRAINED: list = []  # transformers' PreTrainedModel.from_pretrained, once it is wrapped


def apply_pyllm_kernels_on_load(enable: bool = True, **parts) -> None:
    """From this call on, every model a transformers from_pretrained (AutoModelForCausalLM's and any
    PreTrainedModel's) returns in this process comes back with apply_pyllm_kernels(model, **parts)
    applied, as Liger-Kernel's apply_liger_kernel_to_llama() patches the models made after it, for
    every family apply_pyllm_kernels takes: TRL's reference model (DPO, KTO, GRPO, RLOO load it again
    from the policy's path) runs the same kernels as the patched policy. enable=False turns it off
    (models loaded until then keep their patch). A part a loaded model cannot take (the fused loss on
    a reward model's score head, pyllm's attention on a model without flash-attention's mask) is left
    off for that model, with a warning saying why; the model's other parts are applied. A load that
    names another attn_implementation (eager, for its attention weights) keeps it. Models made from a
    config (from_config, the class itself) are not loaded, so not patched: call apply_pyllm_kernels
    on them."""
    known = set(inspect.signature(apply_pyllm_kernels).parameters) - {"model"}
    unknown = set(parts) - known
    if unknown:
        raise TypeError(f"apply_pyllm_kernels_on_load: unknown parts {sorted(unknown)}; parts: {sorted(known)}")
    from transformers import PreTrainedModel
    _ON_LOAD.clear()
    if enable:
        _ON_LOAD.update({part: True for part in known})
        _ON_LOAD.update(parts)
        if not _FROM_PRETRAINED:  # transformers' own, kept to call (its signature and docstring shown for it)
            _FROM_PRETRAINED.append(PreTrainedModel.__dict__["from_pretrained"].__func__)
            functools.update_wrapper(_from_pretrained_patched, _FROM_PRETRAINED[0])
            PreTrainedModel.from_pretrained = classmethod(_from_pretrained_patched)


def _from_pretrained_patched(cls, *args, **kwargs):
    depth = getattr(_LOADING, "depth", 0)
    _LOADING.depth = depth + 1
    try:
        model = _FROM_PRETRAINED[0](cls, *args, **kwargs)
    finally:
        _LOADING.depth = depth
    if depth == 0 and _ON_LOAD:
        parts = dict(_ON_LOAD)
        # the caller's choice stays (eager's attention weights): given here, or by the Auto classes in the
        # config they read first
        named = kwargs.get("attn_implementation") or getattr(kwargs.get("config"), "_attn_implementation_internal", None)
        if named not in (None, NAME):
            parts["attention"] = False
        # output_loading_info=True returns (model, loading_info)
        _apply_on_load(model[0] if isinstance(model, tuple) else model, parts)
    return model


def _apply_on_load(model: nn.Module, parts: dict) -> None:
    refusals = {}
    if parts.get("attention") and (why := _attention_refusal(model)) is not None:
        refusals["attention"] = why
    if parts.get("fused_linear_cross_entropy") and (why := _fused_loss_refusal(model)) is not None:
        refusals["fused_linear_cross_entropy"] = why
    for part, why in refusals.items():
        warnings.warn(f"pyllm.hf.apply_pyllm_kernels_on_load: {type(model).__name__} loads without pyllm's {part}: "
                      f"{why}", stacklevel=3)
        parts[part] = False
    apply_pyllm_kernels(model, **parts)


def _apply(model: nn.Module, applied: dict, attention: bool, swiglu: bool, rms_norm: bool, rope: bool,
           fused_linear_cross_entropy: bool, geglu: bool) -> None:
    """apply_pyllm_kernels' changes to the model, its refusals passed; counts into `applied`."""
    if attention:
        model.set_attn_implementation(NAME)
        applied["attention"] = True
    if swiglu or geglu:
        applied["swiglu"], applied["geglu"] = _patch_gated_mlps(model, silu=swiglu, gelu_tanh=geglu)
    if rms_norm:
        applied["rms_norm"] = _patch_rms_norm(model)
    if rope:
        applied["rope"] = _patch_rope(model)
    if fused_linear_cross_entropy:
        if not (hasattr(model, "_pyllm_hf_forward") or getattr(type(model), "_pyllm_kind", None) == "_fused_loss_forward"):
            # a wrapper's forward on the instance (TRL's fused head; under accelerate's hook, the one it calls):
            # what the fused path leaves goes to it
            earlier = model.__dict__.get("_old_forward" if _accelerate_hooked(model) else "forward")
            function = getattr(earlier, "__func__", earlier)
            if earlier is not None and function is not _unpatched(type(model)).forward and not getattr(
                    function, "_pyllm_fused", False):
                model._pyllm_hf_forward = earlier
            _patch(model, "_fused_loss_forward")
        applied["fused_linear_cross_entropy"] = True


def _saved_state(model: nn.Module) -> list:
    """What apply_pyllm_kernels can change, for _restore: each module's class and attributes (a patch's
    class, a forward on the instance, accelerate's _old_forward, the fused loss's _pyllm_hf_forward) and
    the attributes of every config set_attn_implementation may set (the model's, its submodels', their
    sub-configs at any depth). Shallow copies: the patches replace attributes, never change their values."""
    from transformers import PretrainedConfig
    objects = {}
    configs = []
    for module in model.modules():
        objects[id(module)] = module
        config = module.__dict__.get("config")
        if isinstance(config, PretrainedConfig):
            configs.append(config)
    while configs:
        config = configs.pop()
        if id(config) not in objects:
            objects[id(config)] = config
            configs.extend(sub for key in getattr(config, "sub_configs", {})
                           if isinstance(sub := getattr(config, key, None), PretrainedConfig))
    return [(obj, type(obj), dict(obj.__dict__)) for obj in objects.values()]


def _restore(saved: list) -> None:
    for obj, cls, attributes in saved:
        if type(obj) is not cls:
            obj.__class__ = cls
        now = obj.__dict__
        if now.keys() != attributes.keys() or any(now[k] is not v for k, v in attributes.items()):
            now.clear()
            now.update(attributes)
