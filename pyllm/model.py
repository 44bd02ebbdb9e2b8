"""A decoder-only transformer covering LLaMA, GPT-2 and PaLM by configuration.

Read top to bottom: ModelConfig (with presets), the attention, the MLPs, the block, the LLM, then
generation with a KV cache. Shapes: B batch, T time, C model dim, H query heads, H_kv key/value
heads, D head dim, V vocab.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import numbers
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pyllm.ops import _util
from pyllm.ops import cross_entropy as cross_entropy_ops
from pyllm.ops.rms_norm import max_cols_cuda_with_dw as rms_norm_max_cols_cuda_with_dw
from pyllm.nn import (MoEMLP, RMSNorm, SwiGLUMLP, _geglu, alibi_slopes, apply_rope, attention, attention_with_kvcache,
                      document_ids, linear_cross_entropy, linear_distill, linear_sequence_loss, linear_token_logps,
                      rope_cos_sin, token_logps)


# Guards the switch to eval mode and back around generation (LLM._in_eval), for generations in threads.
_MODE_LOCK = threading.Lock()

# The parameters of Llama 3.1's RoPE scaling (nn.llama3_scaled), besides rope_type = "llama3".
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# LongRoPE's (Phi-3.5 / Phi-4-mini; nn.rope_cos_sin): per-frequency factors for sequences up to and
# past original_max_position_embeddings, and the cos / sin scale.
# GELU MLPs (up, down): GPT-2's tanh form, and the erf form (nanoGPT's nn.GELU, transformers' "gelu")
GELU_MLPS = ("gelu", "gelu_exact")

LONGROPE_KEYS = ("short_factor", "long_factor", "attention_factor", "original_max_position_embeddings")
# YaRN's (Peng et al. 2023; Qwen2.5 / Qwen3's long context, DeepSeek's; nn.yarn_scaled), resolved as
# transformers resolves them: each frequency interpolated by factor, extrapolated, or blended on a
# ramp between beta_fast and beta_slow rotations over the original context; cos / sin scaled.
YARN_KEYS = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "truncate")


def _of_kind(value, kind: str) -> bool:
    """Whether value is of the kind a ModelConfig annotation names (int, float, bool, str, list[...],
    dict, None); an int is a float, a bool no int."""
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "float"):
        return isinstance(value, (int, float) if kind == "float" else int) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("list"):
        return isinstance(value, (list, tuple))
    return kind == "dict" and isinstance(value, dict)


def _positive_number(value) -> bool:
    """A finite number > 0 (not a bool)."""
    return _util.is_number(value) and math.isfinite(value) and value > 0


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence (context length)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; in between: GQA
    dim: int = 128
    mlp_hidden: int | None = None  # None: 4*dim for gelu, 8/3*dim rounded up to 64 for swiglu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu (GPT-2's tanh GELU) | gelu_exact (erf: nanoGPT's nn.GELU) | geglu (Gemma's)
    positions: str = "rope"  # rope | learned | alibi (BLOOM's, MPT's: no position embedding, a bias on the scores)
    bias: bool = False  # bias in every Linear and LayerNorm
    qkv_bias: bool = False  # bias in the q, k, v projections only (Qwen2)
    head_dim: int | None = None  # None: dim // n_heads; n_heads * head_dim may differ from dim (Qwen3)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    qk_norm_all_heads: bool = False  # with qk_norm: over all of q's (k's) heads at once (OLMo 2)
    pre_norm: bool = True  # a norm before each sublayer; False with sandwich_norm: after only (OLMo 2)
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it
    window_layers: list[int] | None = None  # the layers sliding_window applies to; None: all of them
    nope_layers: list[int] | None = None  # layers without RoPE (SmolLM3: every 4th)
    rotary_dim: int | None = None  # RoPE on each head's first rotary_dim dims; None: all (Phi-4-mini: 3/4)
    local_rope_theta: float | None = None  # RoPE theta of the sliding-window layers, unscaled (Gemma 3)
    sandwich_norm: bool = False  # also a norm on the attention's and the MLP's outputs (Gemma 2 / 3)
    embed_scale: bool = False  # token embeddings times sqrt(dim), rounded to their dtype (Gemma)
    # IBM Granite's scalars: token embeddings times embed_multiplier, each sublayer's output times
    # residual_multiplier before the residual add, the output logits divided by logits_scaling.
    embed_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim) (Gemma 3: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # attention scores capped as softcap * tanh(s / softcap) (Gemma 2: 50)
    final_softcap: float | None = None  # the output logits likewise (Gemma 2: 30)
    parallel_block: bool = False  # PaLM: x + attn(norm(x)) + mlp(norm(x))
    # Mixture of experts (nn.MoEMLP; Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, GraniteMoE): n_experts SwiGLU experts of
    # mlp_hidden each in every block, experts_per_token of them per token. None: one dense MLP.
    n_experts: int | None = None
    experts_per_token: int = 2
    norm_topk_prob: bool = True  # the chosen experts' weights renormalized to sum to 1 (Mixtral's)
    shared_expert_hidden: int | None = None  # Qwen2-MoE: a gated SwiGLU expert of this width for every token
    # Training adds router_aux_loss_coef times the load-balancing loss (LLM.router_aux_loss; Switch
    # Transformer's alpha = 0.01); from_hf sets the checkpoint's when its config asks for router logits.
    router_aux_loss_coef: float = 0.01
    # > 0: a score head, Linear(dim, num_labels) at each sequence's last token (LLM.forward's scores;
    # reward models: 1, as transformers' *ForSequenceClassification); the LM head stays.
    num_labels: int = 0
    # A reward model's pad token (config.json's pad_token_id): its scores are read at each sequence's
    # last token that is not this one, as transformers' *ForSequenceClassification reads them (with
    # pad == eos, TRL's default, the token before a trailing EOS); None: each sequence's last token.
    pad_token_id: int | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0  # while training: on the embeddings, each block's two outputs and the attention
    # probabilities (nanoGPT's three; the last in pyllm.flash_attn's kernels, dropout_p)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1's: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    norm_eps: float = 1e-5
    # RMSNorm weights stored as w for a scale of (norm_offset + w), computed in fp32 and rounded once
    # (Gemma's 1.0: a bf16 model then scales as transformers' does; 0: LLaMA's w, rounded after the norm)
    norm_offset: float = 0.0

    def __post_init__(self):
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.dim if self.mlp in GELU_MLPS else 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0 and isinstance(self.dim, int) \
                and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def _check_types(self) -> None:
        """Each field of its annotated kind (ints where ints, true / false or 1 / 0 for flags) before
        anything computes with them: `--model dim=abc` and a config file's "bias = 'no'" (a truthy
        string) get a ValueError naming the field, not a TypeError from arithmetic or a flag on."""
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = f.type.replace(" ", "").split("|")
            if "bool" in kinds and type(value) is int and value in (0, 1):
                setattr(self, f.name, bool(value))
                continue
            if not any(_of_kind(value, kind) for kind in kinds):
                raise ValueError(f"ModelConfig.{f.name} must be {f.type.replace('|', 'or')}, got {value!r}")

    def layer_window(self, layer: int) -> int:
        """How many keys before its own position a query of this layer sees (-1: all)."""
        if self.sliding_window is None or (self.window_layers is not None and layer not in self.window_layers):
            return -1
        return self.sliding_window - 1

    def validate(self) -> None:
        choices = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", *GELU_MLPS, "geglu"),
                   "positions": ("rope", "learned", "alibi")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "block_size", "n_layers", "n_heads", "n_kv_heads", "dim", "mlp_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.head_dim is None:
            raise ValueError(f"ModelConfig: n_heads ({self.n_heads}) must divide dim ({self.dim}), or give head_dim")
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"ModelConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"ModelConfig.sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        for name in ("window_layers", "nope_layers"):
            layers = getattr(self, name)
            if layers is not None and (not isinstance(layers, (list, tuple)) or not all(
                    isinstance(i, int) and 0 <= i < self.n_layers for i in layers)):
                raise ValueError(f"ModelConfig.{name} must be None or a list of layer indices in [0, {self.n_layers}), "
                                 f"got {layers!r}")
        if self.window_layers is not None and self.sliding_window is None:
            raise ValueError("ModelConfig.window_layers needs a sliding_window")
        if not self.pre_norm and not self.sandwich_norm:
            raise ValueError("ModelConfig.pre_norm=False needs sandwich_norm=True (a norm after each sublayer)")
        if self.qk_norm_all_heads and not self.qk_norm:
            raise ValueError("ModelConfig.qk_norm_all_heads needs qk_norm=True")
        if self.nope_layers and self.positions != "rope":
            raise ValueError("ModelConfig.nope_layers needs positions = 'rope'")
        for name in ("attn_softcap", "final_softcap", "embed_multiplier", "residual_multiplier", "logits_scaling",
                     "softmax_scale", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not _positive_number(value):
                raise ValueError(f"ModelConfig.{name} must be None or a positive number, got {value!r}")
        finite_offset = _util.is_number(self.norm_offset) and math.isfinite(self.norm_offset)
        if not finite_offset or (self.norm_offset and self.norm != "rmsnorm"):
            raise ValueError(f"ModelConfig.norm_offset must be a finite number, and 0 unless norm='rmsnorm', got "
                             f"{self.norm_offset!r} with norm={self.norm!r}")
        for name in ("rope_theta", "norm_eps"):  # (NaN logits otherwise, at the first forward)
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: rope needs an even head dim, got {self.head_dim}")
        if self.rotary_dim is not None and (not isinstance(self.rotary_dim, int) or self.rotary_dim < 2
                                            or self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(f"ModelConfig.rotary_dim must be None or an even int in [2, head_dim = {self.head_dim}], "
                             f"got {self.rotary_dim!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
            keys = {"rope_type", *{"longrope": LONGROPE_KEYS, "linear": ("factor",),
                                   "yarn": YARN_KEYS}.get(kind, LLAMA3_ROPE_KEYS)}
            if kind not in ("llama3", "longrope", "linear", "yarn") or set(self.rope_scaling) != keys:
                raise ValueError(f"ModelConfig.rope_scaling must be None, Llama 3.1's (rope_type 'llama3' and "
                                 f"{', '.join(LLAMA3_ROPE_KEYS)}), LongRoPE's (rope_type 'longrope' and "
                                 f"{', '.join(LONGROPE_KEYS)}), YaRN's (rope_type 'yarn' and {', '.join(YARN_KEYS)}) "
                                 f"or linear (rope_type 'linear' and factor), got {self.rope_scaling!r}")
            if kind == "yarn" and not isinstance(self.rope_scaling["truncate"], bool):
                raise ValueError(f"ModelConfig.rope_scaling: YaRN's truncate must be a bool, got "
                                 f"{self.rope_scaling['truncate']!r}")
            if kind == "longrope" and not all(
                    isinstance(f, list) and len(f) == (self.rotary_dim or self.head_dim) // 2
                    and all(_positive_number(x) for x in f)
                    for f in (self.rope_scaling["short_factor"], self.rope_scaling["long_factor"])):
                raise ValueError("ModelConfig.rope_scaling: LongRoPE's short_factor and long_factor need one number "
                                 f"per rotated pair ({(self.rotary_dim or self.head_dim) // 2}), each positive")
            positive = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                                    "beta_fast", "beta_slow") if k in self.rope_scaling]
            if kind == "yarn":
                positive.append("attention_factor")
            if kind == "longrope" and self.rope_scaling.get("attention_factor") is not None:
                positive.append("attention_factor")
            bad = [k for k in positive if not _positive_number(self.rope_scaling[k])]
            if bad:
                raise ValueError(f"ModelConfig.rope_scaling: {', '.join(bad)} must be positive numbers, got "
                                 f"{', '.join(repr(self.rope_scaling[k]) for k in bad)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.n_experts is not None:
            if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 1:
                raise ValueError(f"ModelConfig.n_experts must be None or a positive integer, got {self.n_experts!r}")
            if isinstance(self.experts_per_token, bool) or not isinstance(self.experts_per_token, int) \
                    or not 1 <= self.experts_per_token <= self.n_experts:
                raise ValueError(f"ModelConfig.experts_per_token must be an integer in [1, n_experts = "
                                 f"{self.n_experts}], got {self.experts_per_token!r}")
            if self.mlp != "swiglu" or self.bias:
                raise ValueError(f"ModelConfig.n_experts: the experts are SwiGLU MLPs without biases, got "
                                 f"mlp={self.mlp!r}, bias={self.bias}")
        if self.shared_expert_hidden is not None and (not self.n_experts or isinstance(self.shared_expert_hidden, bool)
                                                      or not isinstance(self.shared_expert_hidden, int)
                                                      or self.shared_expert_hidden < 1):
            raise ValueError(f"ModelConfig.shared_expert_hidden must be None or a positive integer, with n_experts; got "
                             f"{self.shared_expert_hidden!r} (n_experts {self.n_experts!r})")
        if isinstance(self.router_aux_loss_coef, bool) or not isinstance(self.router_aux_loss_coef, (int, float)) \
                or not self.router_aux_loss_coef >= 0:
            raise ValueError(f"ModelConfig.router_aux_loss_coef must be a number >= 0, got {self.router_aux_loss_coef!r}")
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ValueError(f"ModelConfig.num_labels must be an integer >= 0, got {self.num_labels!r}")
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool) or not isinstance(
                self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"ModelConfig.pad_token_id must be None or a token id in [0, vocab_size = "
                             f"{self.vocab_size}), got {self.pad_token_id!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        check_fields(overrides)
        preset = PRESETS[name]
        try:
            return cls(**{**preset, **overrides})
        except ValueError as e:
            if "n_kv_heads" in str(e) and "n_kv_heads" in preset and "n_kv_heads" not in overrides:
                raise ValueError(f"{e}: n_kv_heads {preset['n_kv_heads']} comes from preset {name!r}; give n_kv_heads too "
                                 "(= n_heads for plain multi-head attention)") from None
            raise

    def to_dict(self) -> dict:
        return asdict(self)


# nanoGPT's GPTConfig names, for the error a nanoGPT config meets here
_NANOGPT_NAMES = {"n_layer": "n_layers", "n_head": "n_heads", "n_embd": "dim"}


def check_fields(overrides: dict) -> None:
    """ValueError naming ModelConfig fields overrides does not have (nanoGPT's names pointed to ours)."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        hints = [f"{n} is {_NANOGPT_NAMES[n]} here" for n in sorted(unknown) if n in _NANOGPT_NAMES]
        raise ValueError(f"unknown ModelConfig field(s) {', '.join(sorted(unknown))}"
                         + (f" ({'; '.join(hints)}: nanoGPT's GPT-2 is preset gpt2-124m with mlp=gelu_exact (its "
                            "nn.GELU) and bias=false (its train.py's default))" if hints else "")
                         + f"; fields: {', '.join(sorted(known))}")


PRESETS: dict[str, dict] = {
    # The CPU default: 1.3M params (0.5M of them the tied 4096 x 128 token table); one 16 x 128
    # training step takes about 0.17 s on 2 shared cores here (fp32, eager).
    "tiny": dict(vocab_size=4096, block_size=128, n_layers=4, n_heads=4, n_kv_heads=2, dim=128),
    # tiny as a mixture of experts: 8 experts of half tiny's MLP width, 2 per token (tiny's FLOPs per
    # token, 4x its MLP weights), Mixtral's routing and load balancing.
    "tiny-moe": dict(vocab_size=4096, block_size=128, n_layers=4, n_heads=4, n_kv_heads=2, dim=128, mlp_hidden=192,
                     n_experts=8, experts_per_token=2),
    # LLaMA's recipe at GPT-2-small size.
    "llama-124m": dict(vocab_size=50304, block_size=1024, n_layers=12, n_heads=12, dim=768),
    "gpt2-124m": dict(vocab_size=50304, block_size=1024, n_layers=12, n_heads=12, dim=768, norm="layernorm",
                      mlp="gelu", positions="learned", bias=True),
    # PaLM: parallel block, multi-query attention, SwiGLU, RoPE, no biases (Chowdhery et al. 2022, sec. 2).
    "palm-style": dict(vocab_size=50304, block_size=1024, n_layers=12, n_heads=12, n_kv_heads=1, dim=768,
                       norm="layernorm", parallel_block=True),
}


def rms_norm_of(cfg: ModelConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=cfg.norm_eps, offset=cfg.norm_offset, cast_first=not cfg.norm_offset)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return rms_norm_of(cfg, cfg.dim)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        q_width, k_width = (cfg.n_heads, cfg.n_kv_heads) if cfg.qk_norm_all_heads else (1, 1)
        self.q_norm = rms_norm_of(cfg, q_width * cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = rms_norm_of(cfg, k_width * cfg.head_dim) if cfg.qk_norm else None
        self.qk_norm_all_heads = cfg.qk_norm_all_heads
        self.use_rope = cfg.positions == "rope" and layer not in (cfg.nope_layers or ())
        self.window = cfg.layer_window(layer)  # keys before a query's own that it sees; -1: all
        self.local_rope = self.window >= 0 and cfg.local_rope_theta is not None  # rope[1], else rope[0]
        self.softmax_scale = cfg.softmax_scale
        self.softcap = cfg.attn_softcap
        self.attn_dropout = cfg.dropout  # on the attention probabilities too, as nanoGPT's and GPT-2's
        # ALiBi's fixed slopes (H,): a buffer, so that they follow the model's device; not saved
        self.register_buffer("alibi", alibi_slopes(cfg.n_heads) if cfg.positions == "alibi" else None, persistent=False)

    def _apply(self, fn, recurse=True):
        # The slopes move with the model but stay fp32 (the kernels' dtype): model.to(torch.bfloat16)
        # would round slopes like 2^-0.5 (12 heads) to 8 bits, another model; and a meta-initialised
        # model's to_empty would leave them uninitialised: made anew then. A call that changes
        # nothing leaves them as they are.
        before = self.alibi
        super()._apply(fn, recurse)
        after = self.alibi
        if after is not None and after is not before and (after.dtype != torch.float32 or before.is_meta):
            self.alibi = (alibi_slopes(self.n_heads) if before.is_meta else before.float()).to(after.device)
        return self

    def forward(self, x, rope=None, cache=None, cache_seqlen: int = 0, cu_seqlens=None):
        B, T, C = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
        if self.q_norm is not None and self.qk_norm_all_heads:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, T, H * D), (B, T, H_kv * D)
        q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
        if self.q_norm is not None and not self.qk_norm_all_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos_sin = rope[1] if self.local_rope else rope[0]
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if cache is None:
            y = attention(q, k, v, causal=True, window_left=self.window, scale=self.softmax_scale,
                          cu_seqlens=cu_seqlens, softcap=self.softcap, alibi=self.alibi,
                          dropout_p=self.attn_dropout if self.training else 0.0)  # (B, T, H, D)
        else:
            y = attention_with_kvcache(q, cache[0], cache[1], k, v, cache_seqlen, window_left=self.window,
                                       scale=self.softmax_scale, softcap=self.softcap, alibi=self.alibi)
        return self.proj(y.reshape(B, T, H * D))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool, approximate: str = "tanh"):
        super().__init__()
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)
        self.approximate = approximate  # "tanh": GPT-2's; "none": the erf form (nanoGPT's nn.GELU)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class GeGLUMLP(nn.Module):
    """Gemma's MLP, down(gelu_tanh(x W_gate) * (x W_up)), gate and up fused as in SwiGLUMLP, and
    gelu_tanh(gate) * up one kernel (pyllm.geglu_packed)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x):
        return self.down(_geglu(self.gate_up(x)))  # (..., hidden) -> (..., dim)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm1 = make_norm(cfg) if cfg.pre_norm else nn.Identity()
        self.norm2 = None if cfg.parallel_block else make_norm(cfg) if cfg.pre_norm else nn.Identity()  # PaLM: one
        self.attn = Attention(cfg, layer)
        mlps = {"swiglu": SwiGLUMLP, "gelu": GeluMLP, "gelu_exact": functools.partial(GeluMLP, approximate="none"),
                "geglu": GeGLUMLP}
        self.mlp = (MoEMLP(cfg.dim, cfg.mlp_hidden, cfg.n_experts, cfg.experts_per_token, cfg.norm_topk_prob,
                           cfg.shared_expert_hidden) if cfg.n_experts else mlps[cfg.mlp](cfg.dim, cfg.mlp_hidden, cfg.bias))
        # Gemma's sandwich: the attention's and the MLP's outputs are normed before the residual add.
        self.attn_out_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.mlp_out_norm = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.residual_multiplier = cfg.residual_multiplier
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, cache_seqlen: int = 0, cu_seqlens=None):  # x: (B, T, C)
        h = self.norm1(x)
        a = self.dropout(self.scaled(self.attn_out_norm(self.attn(h, rope, cache, cache_seqlen, cu_seqlens))))
        if self.parallel:
            return x + a + self.dropout(self.scaled(self.mlp_out_norm(self.mlp(h))))
        x = x + a
        return x + self.dropout(self.scaled(self.mlp_out_norm(self.mlp(self.norm2(x)))))

    def scaled(self, y):
        return y if self.residual_multiplier is None else y * self.residual_multiplier  # Granite's


@contextlib.contextmanager
def _moe_recompute(moe, collect: bool):
    """A checkpointed MoE block's recompute: collect_stats as its forward had it (a block compiled alone
    guards on it), the statistics it makes dropped after (LLM.forward has made its loss of them)."""
    moe.collect_stats = collect
    try:
        yield
    finally:
        moe.stats, moe.collect_stats = None, False


def _moe_recompute_contexts(moe, collect: bool):
    """torch.utils.checkpoint's context_fn: nothing around the forward, _moe_recompute around the recompute."""
    return contextlib.nullcontext(), _moe_recompute(moe, collect)


def check_documents(cu_seqlens: torch.Tensor, B: int, T: int, device) -> None:
    """ValueError unless cu_seqlens is LLM.forward's packing of documents into B rows of T tokens."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of document offsets, got {type(cu_seqlens).__name__}")
    if T == 0:
        raise ValueError("cu_seqlens: rows of T = 0 tokens hold no documents (give idx of at least one column)")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of document offsets (N + 1 values), got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, idx on {device}: put both on one device")
    if _util.values_unreadable(cu_seqlens) or (cu_seqlens.is_cuda and os.environ.get("PYLLM_ATTN_CHECK_SEQLENS") != "1"):
        return  # reading the offsets would break the graph (or a fake tensor's trace) / sync the device
    offsets = cu_seqlens.cpu().numpy()
    if offsets[0] != 0 or offsets[-1] != B * T or (offsets[1:] < offsets[:-1]).any():
        raise ValueError(f"cu_seqlens must rise from 0 to B * T = {B * T} without falling, got "
                         f"{offsets[:8].tolist()}{' ...' if len(offsets) > 8 else ''} (ending at {offsets[-1]})")
    rows = np.arange(T, B * T, T)
    if not np.isin(rows, offsets).all():
        row = int(rows[~np.isin(rows, offsets)][0])
        raise ValueError(f"cu_seqlens: a document crosses the end of row {row // T - 1} (offset {row} = row * T "
                         "is missing): documents are packed into rows, none spilling into the next")


class LLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.dim) if cfg.positions == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.score = nn.Linear(cfg.dim, cfg.num_labels, bias=False) if cfg.num_labels else None
        # Training with autograd keeps only each block's input and recomputes the rest during the
        # backward (one more forward of the blocks: ~1/3 more compute), when set. Not part of the
        # config: it changes memory and time, not the function.
        self.activation_checkpointing = False
        # forward(idx, targets) computes the loss with linear_cross_entropy and returns no logits,
        # when set: the (B, T, V) logits and their gradient never exist (big vocabularies). Likewise
        # not part of the config.
        self.fused_loss = False
        self.aux_loss = None  # the last training forward's weighted load-balancing loss (MoE; forward)
        self.z_loss_term = None  # the last forward's z-loss share of its loss, detached (forward's z_loss; for the log)
        self.token_stats_term = None  # the last forward's (entropy sum, targets its argmax, targets) (token_stats)
        self.token_stats_rows = None  # and per target, (B, T, 3): (entropy, 1.0 if the argmax, mean logit)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: std 0.02 / sqrt(2 * n_layers).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight", "mlp.down")):  # "mlp.down": the experts'
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def init_weights(self) -> None:
        """Draws every weight as the constructor does (normal std 0.02, GPT-2's scaled residual
        projections, norms at 1, biases 0, the experts, a score head; LoRA updates as they start,
        their frozen weights drawn too), the output layer tied to the embeddings where the config
        says: torchtitan's meta-device flow, `with torch.device("meta"): model = LLM(cfg)`, then
        `model.to_empty(device=...)` and `model.init_weights()` (or load a state dict)."""
        self._tie()
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # norms to 1, LoRA updates, the experts' own draw
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight", "mlp.down")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))

    def _tie(self) -> None:
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    def _apply(self, fn, recurse=True):
        # to_empty (a meta-device model's) gives every Parameter a new object: the tied output layer
        # would come apart from the embeddings (trained apart, then saved as tied: another model)
        super()._apply(fn, recurse)
        self._tie()
        weight = self.tok_emb.weight
        if weight.is_cuda and _util.HAS_CUDA_KERNELS and not _util.is_fake(weight):
            # whether this GPU runs pyllm's kernels, asked here, eagerly: a compiled forward reads the
            # answer (a V100's layers then trace torch's ops) instead of assuming yes
            _util.gpu_runs_kernels(weight.get_device())
            rms_norm_max_cols_cuda_with_dw(weight)
        return self

    def __getstate__(self):
        # the last forward's losses hold its graph: copy.deepcopy (an EMA, a reference model) and
        # pickle take the model without them
        state = dict(self.__dict__)
        state["aux_loss"] = None
        for name in ("_eval_depth", "_eval_restores"):  # (a copy made mid-generation starts with none running)
            state.pop(name, None)
        return state

    @staticmethod
    def _init_weights(module):
        from pyllm.nn import LoRALinear

        if isinstance(module, (nn.Linear, nn.Embedding, LoRALinear)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, (nn.Linear, LoRALinear)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, MoEMLP):
            nn.init.normal_(module.gate_up, mean=0.0, std=0.02)
            nn.init.normal_(module.down, mean=0.0, std=0.02)

    def _embed(self, idx, start: int | torch.Tensor = 0, positions=None, doc_lengths=None):
        """Token (+ learned position) embeddings and RoPE's (cos, sin) for positions start.. of each
        row, or for positions (B, T) (packed documents, each starting at 0; doc_lengths (B, T): each
        token's document's length, which picks LongRoPE's factors). start may be an int tensor (B,)
        of each row's first position, read on its device only (decode_step)."""
        T = idx.shape[1]
        on_device = isinstance(start, torch.Tensor)
        if on_device:  # (B, T) positions; their bounds are the caller's (no host read)
            positions, start = start.long()[:, None] + torch.arange(T, device=idx.device), 0
        elif T + start > self.config.block_size:
            raise ValueError(f"sequence of {T + start} tokens is longer than block_size {self.config.block_size}")
        cfg = self.config
        x = self.tok_emb(idx)  # (B, T, C)
        if cfg.embed_multiplier is not None:  # Granite's
            x = x * cfg.embed_multiplier
        if cfg.embed_scale:  # the scale in x's dtype first, as Gemma's (bf16: sqrt(1152) = 33.94 -> 34)
            x = x * torch.tensor(math.sqrt(cfg.dim), dtype=x.dtype)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        else:  # (cos, sin) of the layers without a window, and of those with one when they have their own theta
            dims, dtype = cfg.rotary_dim or cfg.head_dim, torch.promote_types(self.tok_emb.weight.dtype, torch.float32)
            at = positions if on_device else None  # (B, T, R/2) computed at each position
            rope = (rope_cos_sin(T, dims, cfg.rope_theta, start, idx.device, dtype, cfg.rope_scaling, at),
                    None if cfg.local_rope_theta is None else rope_cos_sin(T, dims, cfg.local_rope_theta, start,
                                                                            idx.device, dtype, positions=at))
            if positions is not None and not on_device:  # (T, R/2) tables -> (B, T, R/2), each token at its own position
                rope = tuple(None if cs is None else (cs[0][positions], cs[1][positions]) for cs in rope)
                scaling = cfg.rope_scaling or {}
                if doc_lengths is not None and scaling.get("rope_type") == "longrope" and (
                        T > (switch := scaling["original_max_position_embeddings"])):
                    # LongRoPE picks its factors by each document's own length (as the document alone does), not
                    # by the packed row's: the tables above have the long ones, documents within the switch the short
                    short = rope_cos_sin(switch, dims, cfg.rope_theta, 0, idx.device, dtype, cfg.rope_scaling)
                    at, alone = positions.clamp(max=switch - 1), (doc_lengths <= switch)[..., None]
                    rope = ((torch.where(alone, short[0][at], rope[0][0]), torch.where(alone, short[1][at], rope[0][1])),
                            rope[1])
        return self.dropout(x), rope

    def add_score_head(self, num_labels: int = 1, std: float = 0.02) -> None:
        """A score head (ModelConfig.num_labels) on a model without one, drawn as transformers draws
        its *ForSequenceClassification's (normal, std the config's initializer_range, 0.02 in
        nearly every family): a reward model's start from a language model."""
        if self.score is not None:
            raise ValueError(f"add_score_head: the model has a score head already ({self.config.num_labels} labels)")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"add_score_head: num_labels must be an integer >= 1, got {num_labels!r}")
        self.config.num_labels = num_labels
        w = self.norm_f.weight
        self.score = nn.Linear(self.config.dim, num_labels, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                per_token: bool = False, hidden: bool = False, distill: dict | None = None, scores: bool = False,
                z_loss: float = 0.0, sequence_loss: dict | None = None, token_mask: torch.Tensor | None = None,
                temperature: float = 1.0, token_stats: bool = False, token_scaling: bool = False):
        """idx (B, T) int64 -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy
        (targets of -1 are ignored). With fused_loss set and targets given, logits is None (the
        loss came from linear_cross_entropy, chunk by chunk). per_token: instead of the logits and
        the loss, None and each target's log-probability (B, T) fp32, 0 where the target is -1 (for
        sequence-level losses: nn.sequence_logps), the output layer computed at the targets'
        positions only (all of them where this forward is compiled); with fused_loss by nn.linear_token_logps.
        temperature (per_token only): log_softmax(logits / temperature), GRPO's log-probabilities of
        samples drawn at that temperature (TRL's GRPOTrainer divides its logits by args.temperature).
        Mixture-of-experts models in training add router_aux_loss_coef times router_aux_loss() to
        the loss, also kept as aux_loss (for per_token's callers to add; None otherwise);
        token_mask, bool (B, T), False at padding (packed rows' ends: the trainer's), leaves those
        tokens out of it, as transformers' attention_mask does (nothing else reads it).
        z_loss (with targets, for the mean loss): adds z_loss times the mean over the counted targets
        of logsumexp(logits)^2 (PaLM's auxiliary loss, 1e-4 there: it keeps the softmax's normaliser
        near 1, so the logits do not drift in bf16), with or without fused_loss; that share is
        kept, detached, as z_loss_term (None without z_loss).
        token_scaling (with targets, for the mean loss): each target's loss (and z-loss share) times
        its probability under the model, held constant: DFT (Dynamic Fine-Tuning, arXiv 2508.05629;
        TRL's SFT loss_type "dft"), still divided by the counted targets; from the same kernel pass.
        token_stats (with targets, for the loss, per_token or sequence_loss): keeps, as
        token_stats_term, a (3,) fp32 tensor (fp64 for an fp64 model): the sum over the counted
        targets of the entropy of the next-token distribution (per_token at a temperature: of logits / temperature, GRPO's), how
        many of them are its argmax, and how many are counted (TRL's SFT metrics entropy and
        mean_token_accuracy are the first two over the third; None without token_stats); and, but
        after the fused mean loss (which sums them in its pass), as token_stats_rows (B, T, 3) in
        that dtype, each target's entropy, 1.0 where it is the argmax, and the mean over the
        vocabulary of its final logits, 0s where the target is -1 (per document: preference tuning's
        metrics, TRL's DPOTrainer's logits/chosen and logits/rejected). From the fused losses' own
        pass over each chunk of logits; one more read of the logits otherwise
        (cross_entropy_ops.token_stats).

        sequence_loss (with targets and cu_seqlens, fused_loss set; not under torch.compile): a loss
        over whole documents' log-probabilities fused with the output layer (nn.linear_sequence_loss:
        DPO's pairs, their gradients in the forward, no (N, V) logits), {"documents": the indices of
        cu_seqlens' documents it covers, increasing (the others must have no targets), "group": how
        many consecutive ones form a group (2: a pair), "loss_fn": loss_fn(logps, d0, d1) -> the summed
        loss of the groups of those documents d0 .. d1 - 1 (positions in the list), optionally
        "token_weights": (B, T) each target's weight in its document's sum (LD-DPO)}. Gives (those
        documents' summed log-probabilities, detached, the loss: a sum; a MoE's aux_loss is the
        caller's to add, as with per_token).

        Distillation (with targets): hidden gives (None, the final hidden states (N, C) at the N
        targets that are not -1), what a teacher gives its student; distill = {"teacher_hidden": those,
        "teacher_weight": the teacher's output layer, "teacher_logits": its logit_shape() (optional),
        "beta", "temperature", "alpha"} gives (None,
        alpha times the mean over those targets of nn.distill_divergence between the student's and
        the teacher's next-token distributions + (1 - alpha) times the cross-entropy), both fused
        (nn.linear_distill, linear_cross_entropy): no (N, V) logits. Not under torch.compile.

        scores (a model with a score head, ModelConfig.num_labels): (None, the head's scores (N,
        num_labels), fp32 at least, at the last token of each of cu_seqlens' N documents, or of each
        row without them, that is not ModelConfig.pad_token_id (where set; a document of pad tokens
        alone: its first), as transformers' *ForSequenceClassification pools them (its last token
        that is not padding); targets are not read. A reward model's rewards.

        cu_seqlens: packed documents. int32 (N + 1,) on idx's device, the offsets in idx.view(-1) where
        each of N documents starts, then B * T; none may cross the end of a row (every multiple of T
        is an offset; zero-length documents are allowed). Each document is then computed as if it
        were alone: its positions start at 0 and its tokens attend to its own tokens only (flash_attn's
        varlen call). The offsets are checked on the CPU; on CUDA only with PYLLM_ATTN_CHECK_SEQLENS=1
        (reading them costs a device sync): bad ones there give wrong results, never a bad access."""
        self.z_loss_term = self.token_stats_term = self.token_stats_rows = None
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"LLM.forward: idx must be a (B, T) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        weight = self.tok_emb.weight  # (a DTensor shard, FSDP2's CPU offload: its hook moves it, not checked here)
        if idx.device != weight.device and not _util.is_dtensor(weight):
            raise ValueError(f"LLM.forward: idx is on {idx.device}, the model on {weight.device}: "
                             "put them on one device")
        if targets is not None and (not _util.int_tensor(targets) or targets.shape != idx.shape):
            raise ValueError(f"LLM.forward: targets must be an integer tensor of idx's shape {tuple(idx.shape)} (-1: "
                             "no target), got " + (f"{targets.dtype} {tuple(targets.shape)}"
                                                   if isinstance(targets, torch.Tensor) else type(targets).__name__))
        if z_loss and (targets is None or per_token or hidden or distill is not None or scores or sequence_loss):
            raise ValueError("LLM.forward: z_loss goes with the mean loss of targets (not per_token, hidden, distill, "
                             "scores or sequence_loss)")
        if token_scaling and (targets is None or per_token or hidden or distill is not None or scores
                              or sequence_loss):
            raise ValueError("LLM.forward: token_scaling goes with the mean loss of targets (not per_token, hidden, "
                             "distill, scores or sequence_loss)")
        if token_stats and (targets is None or hidden or distill is not None or scores):
            raise ValueError("LLM.forward: token_stats goes with the loss, per_token log-probabilities or sequence_loss "
                             "of targets (not hidden, distill or scores)")
        if sequence_loss is not None and (targets is None or cu_seqlens is None or not self.fused_loss
                                          or torch.compiler.is_compiling()):
            raise ValueError("LLM.forward: sequence_loss needs targets, cu_seqlens and fused_loss, and is not compiled")
        if sequence_loss is not None and (per_token or hidden or distill is not None or scores):
            raise ValueError("LLM.forward: sequence_loss goes alone (not with per_token, hidden, distill or scores)")
        if token_mask is not None and (not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool
                                       or token_mask.shape != idx.shape or token_mask.device != idx.device):
            raise ValueError(f"LLM.forward: token_mask must be a bool tensor of idx's shape {tuple(idx.shape)} on "
                             f"{idx.device}, got " + (f"{token_mask.dtype} {tuple(token_mask.shape)} on {token_mask.device}"
                                                if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__))
        positions = doc = None
        if cu_seqlens is not None:
            B, T = idx.shape
            check_documents(cu_seqlens, B, T, idx.device)
            doc = document_ids(cu_seqlens, B, T)  # (B, T): each token's document
            starts = cu_seqlens.long()[doc]  # (B, T): its document's first token
            positions = torch.arange(B * T, device=idx.device).view(B, T) - starts
            doc_lengths = cu_seqlens.long()[doc + 1] - starts  # (B, T): its document's length
        # The last forward's loss term and its graph (through every block's activations) let go before
        # this one runs: a loss dropped without backward (a skipped step) had been held through it.
        self.aux_loss = None
        x, rope = self._embed(idx, positions=positions, doc_lengths=doc_lengths if cu_seqlens is not None else None)
        moes = [block.mlp for block in self.blocks if isinstance(block.mlp, MoEMLP)]
        balance = bool(moes) and bool(self.config.router_aux_loss_coef) and self.training and torch.is_grad_enabled()
        for moe in moes:  # this forward's statistics only (a block run without autograd sets none), when wanted
            moe.stats, moe.collect_stats = None, balance
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant: works with DDP, FSDP2, torch.compile and inputs that need no grad;
            # the dropout masks are redrawn identically (the RNG state is saved).
            if recompute:
                # A block compiled alone (wrap_model under FSDP2 with --compile) guards on its MoE's
                # collect_stats: the backward's recompute runs with the forward's value (else another graph,
                # saving other tensors: CheckpointError under bf16 autocast), its statistics dropped after
                # (the whole forward compiled traces the recompute into its own graph: no context there)
                moe = block.mlp if isinstance(block.mlp, MoEMLP) and not torch.compiler.is_compiling() else None
                extra = {} if moe is None else {"context_fn": functools.partial(_moe_recompute_contexts, moe, balance)}
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, 0, cu_seqlens, use_reentrant=False, **extra)
            else:
                x = block(x, rope, cu_seqlens=cu_seqlens)
        if balance:
            self.aux_loss = self.config.router_aux_loss_coef * self.router_aux_loss(token_mask)
        for moe in moes:  # (the (N, E) probabilities are not held past the loss; a backward's recompute stores none)
            moe.stats, moe.collect_stats = None, False
        if scores:
            if self.score is None:
                raise ValueError("forward(scores=True): the model has no score head (ModelConfig.num_labels, "
                                 "LLM.add_score_head)")
            B, T = idx.shape
            last = (cu_seqlens[1:].long() - 1 if cu_seqlens is not None
                    else torch.arange(1, B + 1, device=idx.device) * T - 1)  # (N,) in the B * T positions
            if self.config.pad_token_id is not None:  # transformers' pooling: the last token that is not pad
                position = torch.arange(B * T, device=idx.device)
                doc = (document_ids(cu_seqlens, B, T).reshape(-1).long() if cu_seqlens is not None
                       else position // T)  # (B * T,)
                kept = idx.reshape(-1) != self.config.pad_token_id
                found = torch.full_like(last, -1).scatter_reduce(0, doc[kept], position[kept], "amax")
                first = cu_seqlens[:-1].long() if cu_seqlens is not None else torch.arange(B, device=idx.device) * T
                last = torch.where(found >= 0, found, first)  # (pad alone: the first, transformers' argmax of 0s)
            h = self.norm_f(x.reshape(B * T, -1)[last.clamp(min=0)])  # (N, C)
            out = self.score(h)
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            if cu_seqlens is not None:  # an empty document has no last token: NaN, not its neighbour's score
                out = torch.where((cu_seqlens[1:] > cu_seqlens[:-1])[:, None], out, torch.nan)
            return None, out
        fused = targets is not None and self.fused_loss
        if temperature != 1.0 and (not per_token or targets is None or not temperature > 0):
            raise ValueError(f"LLM.forward: temperature {temperature} takes per_token=True with targets (the "
                             "log-probabilities of samples drawn at it) and a value > 0")
        if targets is not None and (hidden or distill is not None) and torch.compiler.is_compiling():
            raise NotImplementedError("distillation (LLM.forward's hidden / distill) is not compiled")
        if sequence_loss is not None:
            h = self.norm_f(x)  # (B, T, C)
            at = (targets != -1).nonzero(as_tuple=True)  # the trained tokens, document after document
            documents = list(sequence_loss["documents"])
            counts = torch.bincount(doc[at], minlength=cu_seqlens.numel() - 1).tolist()
            rows = [counts[d] for d in documents]
            if sorted(set(documents)) != documents or (documents and documents[0] < 0) or sum(rows) != len(at[0]):
                raise ValueError("LLM.forward: sequence_loss's documents must be increasing indices of cu_seqlens' "
                                 "documents and hold every target")
            weights = sequence_loss.get("token_weights")  # (B, T): each target's weight in its document's sum
            out = linear_sequence_loss(h[at], self.lm_head.weight, targets[at], rows, sequence_loss["group"],
                                       sequence_loss["loss_fn"], **self.logit_shape(), return_token_stats=token_stats,
                                       row_weights=None if weights is None else weights[at])
            if token_stats:
                self._keep_token_stats(out[2], targets, at)
            return out[1], out[0]
        if targets is not None and (per_token or fused or hidden or distill is not None):
            h = self.norm_f(x)  # (B, T, C)
            at = None
            # (compiled, meta or fake: every position, a shape that does not depend on the data; so
            # under torch.func, whose vmap takes no data-dependent shape)
            if not _util.values_unreadable(targets) and not _util.torch_func_active():
                # The output layer at the targets' positions alone: a prompt's tokens (-1) take no
                # logits, often most of a packed row of conversations or preference pairs.
                at = (targets != -1).nonzero(as_tuple=True)
                h, targets_at = h[at], targets[at]  # (N, C), (N,)
            else:
                targets_at = targets
            if hidden:
                return None, h  # (N, C)
            if distill is not None:
                n, alpha = (targets != -1).sum().clamp(min=1), distill["alpha"]
                teacher = {"teacher_" + name: value for name, value in distill.get("teacher_logits", {}).items()}
                loss = alpha * linear_distill(h, self.lm_head.weight, distill["teacher_hidden"], distill["teacher_weight"],
                                              distill["beta"], distill["temperature"], **self.logit_shape(),
                                              **teacher) / n
                if alpha < 1:
                    loss = loss + (1 - alpha) * linear_cross_entropy(h, self.lm_head.weight, targets_at,
                                                                     **self.logit_shape()) / n
                return None, loss if self.aux_loss is None else loss + self.aux_loss
            if not per_token:  # no (B, T, V) logits at all (linear_cross_entropy)
                n = (targets != -1).sum().clamp(min=1)
                out = linear_cross_entropy(h, self.lm_head.weight, targets_at, **self.logit_shape(), z_loss=z_loss,
                                           return_z_loss=True, return_token_stats=token_stats,
                                           token_scaling=token_scaling)
                loss, z_part = out[:2]
                if token_stats:
                    self.token_stats_term = torch.stack([out.entropy, out.token_accuracy,
                                                         (targets != -1).sum().to(out.entropy.dtype)])
                loss = loss / n
                if z_loss:
                    self.z_loss_term = z_part / n
                return None, loss if self.aux_loss is None else loss + self.aux_loss
            shape = self.logit_shape()
            if temperature != 1.0 and shape["softcap"] is None:  # (the division folded into the scale, in fp32)
                shape["scale"] /= temperature
            if fused and (temperature == 1.0 or shape["softcap"] is None):
                logps = linear_token_logps(h, self.lm_head.weight, targets_at, **shape, return_token_stats=token_stats)
                if token_stats:
                    self._keep_token_stats(cross_entropy_ops.TokenStats(*logps[1:]), targets, at)
                    logps = logps.logps
            else:  # (a cap, then the division: the final logits / temperature, as sampling divides them)
                logits = self._logits(h)
                logits = logits if temperature == 1.0 else logits / temperature
                logps = token_logps(logits, targets_at)
                if token_stats:
                    self._keep_token_stats(cross_entropy_ops.token_stats(logits, targets_at, ignore_index=-1), targets, at)
            return None, logps if at is None else logps.new_zeros(targets.shape).index_put(at, logps)
        logits = self._logits(self.norm_f(x))  # (B, T, V)
        loss = None
        if token_stats:
            self._keep_token_stats(cross_entropy_ops.token_stats(logits, targets, ignore_index=-1), targets)
        if targets is not None:
            # The sum over the counted targets rather than reduction="mean": a batch whose targets
            # are all -1 (a packed row of prompts alone) gives 0, not NaN.
            counted = targets != -1
            n = counted.sum().clamp(min=1)
            if cross_entropy_ops.takes(logits):  # pyllm's kernel: one pass each way, no fp32 (B, T, V) copy
                loss, z_part = cross_entropy_ops.cross_entropy(logits, targets, ignore_index=-1, reduction="sum",
                                                               z_loss=z_loss, return_z_loss=True,
                                                               token_scaling=token_scaling)
                loss = loss / n
                if z_loss:
                    self.z_loss_term = z_part / n
            else:
                logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
                flat = logits32.reshape(-1, logits.shape[-1])
                p = counted
                if token_scaling:  # DFT: each target's probability, exp(-its loss), held constant (0 where ignored)
                    rows = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1, reduction="none")
                    p = torch.where(counted, (-rows.detach()).exp().view(targets.shape), 0.0)  # (B, T)
                    loss = (rows * p.view(-1)).sum() / n
                else:
                    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1, reduction="sum") / n
                if z_loss:
                    z_part = z_loss * (torch.logsumexp(logits32, dim=-1).square() * p).sum() / n
                    loss = loss + z_part
                    self.z_loss_term = z_part.detach()
            if self.aux_loss is not None:
                loss = loss + self.aux_loss
        return logits, loss

    # The ModelConfig fields that change how a model trains but not its weights: a fine-tune sets them
    # over what its checkpoint says (nanoGPT's override_args at init_from).
    TRAINING_FIELDS = ("dropout", "router_aux_loss_coef")

    def set_training_options(self, **options) -> None:
        """Set TRAINING_FIELDS (dropout: on the embeddings, each block's two outputs and the attention
        probabilities; router_aux_loss_coef: a mixture of experts' load-balancing loss) in this built
        model and its config, which the checkpoint records."""
        if set(options) - set(self.TRAINING_FIELDS):
            raise ValueError(f"set_training_options takes {', '.join(self.TRAINING_FIELDS)}, got "
                             f"{', '.join(sorted(set(options) - set(self.TRAINING_FIELDS)))}")
        replace(self.config, **options)  # (validated there)
        for key, value in options.items():
            setattr(self.config, key, value)
        p = self.config.dropout
        self.dropout.p = p
        for block in self.blocks:
            block.dropout.p = p
            block.attn.attn_dropout = p

    def router_aux_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The load-balancing loss of the routers of the forward under way (forward calls it: its value
        is aux_loss, weighted; the statistics are dropped after it) (Fedus et al. 2021, as
        transformers' load_balancing_loss_func takes it over all MoE layers' tokens at once): E *
        sum_e f_e * P_e, f_e the picks of expert e per token (summing to top_k), P_e its mean router
        probability; top_k when the load is even. Only P carries a gradient. token_mask (bool, one
        per token of that forward, e.g. (B, T)): only its True tokens count (transformers'
        attention_mask there: a packed row's padding left out); 0 when none is True."""
        stats = [block.mlp.stats for block in self.blocks if isinstance(block.mlp, MoEMLP)]
        if any(s is None for s in stats):
            raise RuntimeError("router_aux_loss: the last forward left no router statistics: it ran the MoE blocks "
                               "without autograd (torch.utils.checkpoint with use_reentrant=True does; use "
                               "use_reentrant=False, as LLM.activation_checkpointing does), or none ran in training")
        E = self.config.n_experts
        picks = probs_sum = tokens = 0
        for experts, probs in stats:  # (N, k), (N, E)
            # index_add_, not bincount: no host read of the count's size, and meta / fake tensors take it
            if token_mask is None:
                weight, probs_of = probs.new_ones(()).expand(experts.numel()), probs.sum(0)
                tokens = tokens + probs.shape[0]
            else:
                w = token_mask.reshape(-1, 1).to(probs.dtype)  # (N, 1)
                weight, probs_of = w.expand(experts.shape).flatten(), (probs * w).sum(0)
                tokens = tokens + w.sum()
            picks = picks + probs.new_zeros(E).index_add_(0, experts.flatten(), weight.detach())
            probs_sum = probs_sum + probs_of
        tokens = tokens.clamp(min=1) if token_mask is not None else max(tokens, 1)  # (no token: 0, not NaN)
        return E * (picks / tokens * probs_sum / tokens).sum()

    def _keep_token_stats(self, stats, targets: torch.Tensor, at=None) -> None:
        """token_stats_term and token_stats_rows from the token statistics (cross_entropy_ops.TokenStats)
        of targets (B, T) (-1: none), or of targets[at] alone (at: their indices, nonzero's)."""
        rows = torch.stack([stats.entropy, stats.is_top1.to(stats.entropy.dtype), stats.mean_logit], dim=-1)
        if at is not None:  # (N, 3) at the targets' positions
            rows = rows.new_zeros(*targets.shape, cross_entropy_ops.STATS).index_put(at, rows)
        self.token_stats_rows = rows  # (B, T, 3)
        self.token_stats_term = torch.stack([rows[..., 0].sum(), rows[..., 1].sum(),
                                             (targets != -1).sum().to(rows.dtype)])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.config.logits_scaling is not None:  # Granite's
            logits = logits / self.config.logits_scaling
        cap = self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)  # Gemma 2's capped logits

    def logit_shape(self) -> dict:
        """What _logits does after the output layer, as the fused losses (nn.linear_cross_entropy,
        ...) take it: {"scale": 1 / logits_scaling (Granite's; else 1), "softcap": final_softcap}."""
        scaling = self.config.logits_scaling
        return {"scale": 1.0 if scaling is None else 1.0 / scaling, "softcap": self.config.final_softcap}

    # --- accounting ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False, frozen: bool = False) -> int:
        """Unique parameters (tied weights counted once); non_embedding drops the position table
        and the token table (the latter only when it is not also the output layer's matmul);
        frozen counts only those that do not require grad."""
        counted = [p for p in self.parameters() if not (frozen and p.requires_grad)]
        if non_embedding:
            tables = [self.pos_emb.weight] if self.pos_emb is not None else []
            if not self.config.tie_embeddings:
                tables.append(self.tok_emb.weight)
            counted = [p for p in counted if all(p is not t for t in tables)]
        return sum(p.numel() for p in counted)

    def _weight_flops_per_token(self) -> int:
        """6 per matmul weight (forward, input grad, weight grad), 4 per frozen one (no weight grad:
        LoRA's base weights). non_embedding keeps the lm_head matmul (tied or not) and drops the
        table lookups; a token goes through experts_per_token of a MoE layer's n_experts experts."""
        return (6 * (self.num_params(non_embedding=True) - self._idle_expert_params())
                - 2 * (self.num_params(non_embedding=True, frozen=True) - self._idle_expert_params(frozen=True)))

    def _idle_expert_params(self, frozen: bool = False) -> int:
        """The expert weights one token does not go through: (E - k) / E of each MoE layer's
        (frozen: of those that do not require grad)."""
        cfg = self.config
        experts = [p for block in self.blocks if isinstance(block.mlp, MoEMLP)
                   for name, p in block.mlp.named_parameters(recurse=False) if name.startswith(("gate_up", "down"))
                   and not (frozen and p.requires_grad)]  # the experts' weights and their LoRA updates
        return sum(p.numel() for p in experts) * (cfg.n_experts - cfg.experts_per_token) // cfg.n_experts if experts else 0

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6 per matmul weight (4 if frozen) plus the
        attention scores and values, 12 * n_layers * dim * T (Chowdhery et al. 2022, appendix B),
        with n_heads * head_dim for dim and, in sliding-window layers, at most sliding_window for T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        keys = sum(T if cfg.layer_window(i) < 0 else min(T, cfg.sliding_window) for i in range(cfg.n_layers))
        return self._weight_flops_per_token() + 12 * cfg.n_heads * cfg.head_dim * keys

    # --- nanoGPT's names, for code written against its GPT ------------------------------------------

    def get_num_params(self, non_embedding: bool = True) -> int:
        """nanoGPT's count: num_params with its default, the position table left out."""
        return self.num_params(non_embedding=non_embedding)

    def crop_block_size(self, block_size: int) -> None:
        """A shorter context, in place, as nanoGPT's (a checkpoint of 1,024 positions trained on at 256):
        the learned position table cut to its first block_size rows; RoPE and ALiBi need nothing."""
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
                or not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be an int in [1, {self.config.block_size}], got "
                             f"{block_size!r}")
        block_size = int(block_size)
        self.config.block_size = block_size
        if self.pos_emb is not None:
            self.pos_emb.weight = nn.Parameter(self.pos_emb.weight[:block_size].detach().clone())
            self.pos_emb.num_embeddings = block_size

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float | None = None) -> float:
        """nanoGPT's model FLOPs utilisation of an iteration of fwdbwd_per_iter sequences of block_size
        tokens taking dt seconds, against peak_flops (default: this device's bf16 peak where known, as
        pyllm train's MFU; where unknown, the CPU, nanoGPT's own 312 TFLOP/s of an A100 in bf16, which
        it divides by on every device: a number, so that its training loop's running average runs
        (None had failed it at iteration 5 on the CPU))."""
        if not (isinstance(dt, numbers.Real) and dt > 0):
            raise ValueError(f"estimate_mfu: dt (the iteration's seconds) must be > 0, got {dt!r}")
        if peak_flops is None:
            from pyllm.train import peak_flops as device_peak

            peak_flops = device_peak(self.lm_head.weight.device) or 312e12
        T = self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak_flops

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type=None):
        """nanoGPT's: pyllm's fused AdamW, weight decay on the matrices (every parameter of 2 or more
        dims: the embeddings too, as nanoGPT), none on the norms' and biases' vectors. device_type is
        nanoGPT's argument for torch's fused flag, which pyllm's step always is: unused."""
        from pyllm.optim import AdamW

        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return AdamW(groups, lr=learning_rate, betas=betas)

    def add_lora(self, rank: int, alpha: float, frozen_dtype: torch.dtype | None = None, targets=None,
                 dropout: float = 0.0) -> None:
        """Freezes every weight and gives each block's linear layers a trainable rank-`rank` update
        scaled by alpha / rank (nn.LoRALinear): LoRA. The model computes what it did until trained (up
        to frozen_dtype's rounding: the blocks' frozen linear weights held in it, see LoRALinear).

        targets None: every linear layer of the blocks, the fused qkv and gate_up projections one
        update each (rank `rank` over the fused output). targets, PEFT's way: the projections named
        (lora_targets: q, k, v, o, gate, up, down, or PEFT's q_proj ... down_proj, or "all-linear"),
        each its own update, also inside a fused layer. dropout: on each update's input (PEFT's
        lora_dropout; one mask for a fused layer's parts, where PEFT draws one a projection). A
        mixture-of-experts model's experts, router and shared expert are not adapted by default nor
        by all-linear (PEFT 0.21's all-linear adapts the router and a shared expert, and the experts
        through target_parameters: pyllm adapts fewer parameters there); targets experts (both projections) or experts.gate_up / experts.down (PEFT's target_parameters
        experts.gate_up_proj / experts.down_proj) give each expert updates of its own
        (MoEMLP.add_lora; no dropout there, as PEFT's ParamWrapper). The frozen experts are held in
        frozen_dtype too."""
        from pyllm.nn import LoRALinear

        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        if not _positive_number(alpha):
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if frozen_dtype is not None and not (isinstance(frozen_dtype, torch.dtype) and frozen_dtype.is_floating_point):
            raise ValueError(f"add_lora: frozen_dtype must be a floating-point torch.dtype, got {frozen_dtype!r}")
        if self.lora_scale() is not None:  # a second set would freeze the first, leaving nothing to train
            raise ValueError("add_lora: the model has LoRA updates already (merge them first: LLM.load of its save)")
        wanted = None if targets is None else set(lora_targets(targets))
        all_linear = targets is not None and bool({"all-linear", "all"} & set(_lora_target_names(targets)))
        if self.config.n_experts and wanted and wanted & {"gate", "up", "down"} and not all_linear:
            raise ValueError(f"LoRA targets {', '.join(sorted(wanted & {'gate', 'up', 'down'}))}: a mixture-of-experts "
                             "model's experts take no LoRA update of a linear layer (its attention projections do: q, "
                             "k, v, o; its experts through experts, or experts.gate_up_proj / experts.down_proj)")
        experts = [t.removeprefix("experts.") for t in LORA_EXPERT_TARGETS if wanted and t in wanted]
        if experts and not self.config.n_experts:
            raise ValueError(f"LoRA targets {', '.join('experts.' + e for e in experts)}: the model has no experts "
                             "(n_experts is not set)")
        if experts and dropout:
            raise ValueError("LoRA dropout does not go with expert updates (targets experts...): PEFT's ParamWrapper "
                             "refuses it too (the input of one expert's update is not the layer's)")
        for p in self.parameters():
            p.requires_grad_(False)
        for block in self.blocks:
            if isinstance(block.mlp, MoEMLP) and (experts or frozen_dtype is not None):
                block.mlp.add_lora(rank, alpha, experts, frozen_dtype)
        if wanted is not None and not wanted - set(LORA_EXPERT_TARGETS):
            return  # the experts alone
        for block in self.blocks:
            moe = set(block.mlp.modules()) if isinstance(block.mlp, MoEMLP) else set()
            for parent in list(block.modules()):
                if parent in moe:  # the router (and a shared expert) stay as they are (PEFT 0.21's all-linear adapts them)
                    continue
                for name, child in list(parent.named_children()):
                    if type(child) is not nn.Linear:
                        continue
                    parts = None
                    if wanted is not None:
                        names = self._projections(parent, name)
                        adapted = [part in wanted for part, _ in names]
                        if not any(adapted):
                            continue
                        parts = [(rows, a) for (_, rows), a in zip(names, adapted)] if len(names) > 1 else None
                    setattr(parent, name, LoRALinear(child, rank, alpha, frozen_dtype, parts, dropout))
        self.train(self.training)  # the new layers (their dropout) in the model's mode

    def _projections(self, parent: nn.Module, name: str) -> list[tuple[str, int]]:
        """The projections (lora_targets' names) a block's linear layer computes, with their output
        sizes, in order: [("q", H * D), ("k", H_kv * D), ("v", H_kv * D)] for attention's qkv."""
        cfg, out = self.config, getattr(parent, name).out_features
        if isinstance(parent, Attention):
            return ([("q", cfg.n_heads * cfg.head_dim), ("k", cfg.n_kv_heads * cfg.head_dim),
                     ("v", cfg.n_kv_heads * cfg.head_dim)] if name == "qkv" else [("o", out)])
        if name == "gate_up":
            return [("gate", out // 2), ("up", out // 2)]
        if name in ("up", "down"):
            return [(name, out)]
        raise ValueError(f"add_lora: no projection name for the linear layer {type(parent).__name__}.{name}")

    @contextlib.contextmanager
    def lora_disabled(self):
        """Within it the model computes without its LoRA updates (the frozen base model): DPO's
        reference model at no memory cost, as PEFT's disable_adapter()."""
        from pyllm.nn import LoRALinear

        layers = [m for m in self.modules() if isinstance(m, LoRALinear)]
        moes = [m for m in self.modules() if isinstance(m, MoEMLP)]
        for m in layers:
            m.disabled = True
        for m in moes:
            m.lora_disabled = True
        try:
            yield
        finally:
            for m in layers:
                m.disabled = False
            for m in moes:
                m.lora_disabled = False

    def lora_scale(self) -> float | None:
        """alpha / rank of the LoRA layers (add_lora), None without them."""
        from pyllm.nn import LoRALinear

        return next((m.scale for m in self.modules() if isinstance(m, LoRALinear)),
                    next((m.lora_scale for m in self.modules() if isinstance(m, MoEMLP) and m.lora_factors()), None))

    def flops_of_documents(self, lengths, output_tokens: int | None = None, forward_only: bool = False) -> float:
        """flops_per_token's count for documents of these lengths, each token's keys being its own
        document's (what packed and document-masked batches compute): less than rows of T
        would count, whose attention term assumes every token sees T keys. [T] gives T *
        flops_per_token(T). output_tokens: how many of the tokens the output layer runs at (the
        trained ones, for packed conversations and preference pairs: forward(per_token=True) and
        the fused loss skip the rest); None: all. forward_only: a pass without backward (KTO's KL
        documents): 2 FLOPs per weight and token, a third of the attention's."""
        cfg = self.config
        windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        keys = sum(n * (n if w < 0 else min(n, cfg.sliding_window)) for n in lengths for w in windows)
        if forward_only:
            weights, output = 2 * (self.num_params(non_embedding=True) - self._idle_expert_params()), 2
        else:  # 6 FLOPs per output weight and token (4 when it is frozen)
            weights, output = self._weight_flops_per_token(), 6 if self.lm_head.weight.requires_grad else 4
        flops = weights * sum(lengths) + (4 if forward_only else 12) * cfg.n_heads * cfg.head_dim * keys
        if output_tokens is not None:
            flops -= output * self.lm_head.weight.numel() * (sum(lengths) - output_tokens)
        return flops

    # --- weights --------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Weights as safetensors, the config in its metadata (tied weights stored once; LoRA
        updates merged in: the file is the plain model's)."""
        save_weights(self.state_dict(), self.config, path, self.lora_scale())

    @classmethod
    def load(cls, path, device="cpu") -> "LLM":
        """The model LLM.save wrote, in eval mode (dropout off, as transformers' from_pretrained
        returns its models: model.train() before training it; the trainer does). path: the file,
        or a run's folder (its model.safetensors)."""
        from safetensors.torch import load_file

        if Path(path).is_dir():  # (a run's folder, as from_pretrained takes a checkpoint's)
            if not (Path(path) / "model.safetensors").is_file():
                raise ValueError(f"{path}: a folder without model.safetensors (LLM.load reads a run's weights; a "
                                 "Hugging Face checkpoint folder: LLM.from_hf)")
            path = Path(path) / "model.safetensors"
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        if "pyllm_config" not in meta:
            raise ValueError(f"{path}: no pyllm_config in its metadata; was it written by LLM.save?")
        cfg = ModelConfig(**json.loads(meta["pyllm_config"]))
        if cfg.tie_embeddings and "tok_emb.weight" in state:
            state["lm_head.weight"] = state["tok_emb.weight"]
        model = cls.fitting(cfg, state, path)
        model.load_state_dict(state)
        return model.to(device).eval()  # as transformers' from_pretrained: model.train() to train

    @classmethod
    def fitting(cls, cfg: ModelConfig, state: dict, source) -> "LLM":
        """cls(cfg), once a shape-only copy built on the meta device says that state's tensors are its
        weights: a few-hundred-byte file whose config claims a huge model had been built (gigabytes
        drawn) before load_state_dict found no weights to fill it with."""
        with torch.device("meta"):
            shell = cls(cfg)
        want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
        missing = [k for k in want if k not in state]
        wrong = [f"{k} {tuple(state[k].shape)} (the config's {want[k]})" for k in want
                 if k in state and tuple(state[k].shape) != want[k]]
        if missing or wrong:
            raise ValueError(f"{source}: its weights are not the model its config describes: "
                             + "; ".join(([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")]
                                          if missing else []) + wrong[:3]))
        return cls(cfg)

    @classmethod
    def from_nanogpt(cls, path, device="cpu") -> "LLM":
        """A checkpoint karpathy/nanoGPT's train.py wrote (ckpt.pt: its model_args and the model's
        state dict, torch.compile's "_orig_mod." prefix or not), as the same function: GPT-2's
        layout (LayerNorm, learned positions, tied embeddings) with the exact GELU nanoGPT's MLP
        uses (mlp="gelu_exact"), biases as its `bias` says, its dropout. Read with
        weights_only=True (no code runs from the file). Then generate, train on (--init-from-run
        after save), or export to transformers (to_hf: GPT2LMHeadModel, activation "gelu")."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a checkpoint torch.load reads as plain data ({e})") from e
        if isinstance(ckpt, dict) and {"model_config", "model"} <= set(ckpt):  # pyllm's own checkpoint.pt
            raise ValueError(f"{path}: a checkpoint of `pyllm train`, not nanoGPT's: its weights are "
                             f"{Path(path).with_name('model.safetensors')} (or --run {Path(path).parent})")
        if not isinstance(ckpt, dict) or not {"model_args", "model"} <= set(ckpt):
            raise ValueError(f"{path}: not a nanoGPT checkpoint (a dict with model_args and model)")
        args = ckpt["model_args"]
        cfg = ModelConfig(vocab_size=args["vocab_size"], block_size=args["block_size"], n_layers=args["n_layer"],
                          n_heads=args["n_head"], dim=args["n_embd"], mlp_hidden=4 * args["n_embd"], norm="layernorm",
                          mlp="gelu_exact", positions="learned", bias=bool(args.get("bias", True)),
                          tie_embeddings=True, norm_eps=1e-5, dropout=float(args.get("dropout", 0.0)))
        theirs = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v for k, v in ckpt["model"].items()}
        state = {"tok_emb.weight": theirs["wte.weight"], "pos_emb.weight": theirs["wpe.weight"],
                 "norm_f.weight": theirs["ln_f.weight"], "lm_head.weight": theirs["wte.weight"]}
        if cfg.bias:
            state["norm_f.bias"] = theirs["ln_f.bias"]
        for i in range(cfg.n_layers):
            for name, ours in GPT2_NAMES.items():  # nn.Linear weights: (out, in) as ours, no transpose
                state[f"blocks.{i}.{ours}.weight"] = theirs[f"h.{i}.{name}.weight"]
                if cfg.bias:
                    state[f"blocks.{i}.{ours}.bias"] = theirs[f"h.{i}.{name}.bias"]
        model = cls.fitting(cfg, state, path)
        model.load_state_dict(state)
        return model.to(device).eval()  # as transformers' from_pretrained: model.train() to train

    @classmethod
    def from_hf(cls, folder, device="cpu", dtype=torch.float32, adapter=None) -> "LLM":
        """A Hugging Face checkpoint folder (config.json and model.safetensors, or shards with their
        model.safetensors.index.json, as save_pretrained writes them) of LlamaForCausalLM (also
        Mistral, Qwen2, Qwen3, SmolLM3, Phi-3, OLMo 2, Granite and the mixtures of experts Mixtral, Qwen3-MoE,
        OLMoE, Qwen2-MoE and GraniteMoE: HF_DECODERS), Gemma2ForCausalLM,
        Gemma3ForCausalLM (or the language model of a Gemma3ForConditionalGeneration) or
        GPT2LMHeadModel, with its weights in
        `dtype` (fp32: master weights for training; the checkpoint's own dtype may be bf16), or a hub
        repo id (see hf_folder). Read with safetensors alone, no transformers needed. Anything the
        model cannot compute the same way (biases in LLaMA layers, RoPE scalings other than Llama
        3.1's, LongRoPE and YaRN, another activation, layer types other than full and sliding-window attention) raises
        NotImplementedError. adapter: a PEFT LoRA adapter folder (adapter_config.json,
        adapter_model.safetensors) trained on this model, merged into its weights (merge_peft_adapter)."""
        from safetensors.torch import load_file

        folder = hf_folder(folder)
        hf = json.loads((folder / "config.json").read_text())
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
        if outside:  # (a downloaded index naming ../../x read files outside the checkpoint's folder)
            raise ValueError(f"{folder}: model.safetensors.index.json names shards outside the folder: {outside[:3]}")
        if not all((folder / f).exists() for f in files):
            raise ValueError(f"{folder}: no model.safetensors (or shards listed in model.safetensors.index.json)")
        hf_state = {k: v for f in files for k, v in load_file(str(folder / f)).items()}
        expert_updates = merge_peft_adapter(hf_state, adapter) if adapter is not None else {}
        cfg = config_from_hf(hf)
        state = state_from_hf(hf_state, cfg, hf["model_type"])
        head, saved = expert_updates.pop("lm_head.weight", None), expert_updates.pop("lm_head.base_layer", None)
        if head is not None:  # an adapter of the output layer: PeftModel's forward leaves the embeddings as they were
            base = state["tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight"]
            if base.shape != head.shape:
                raise ValueError(f"{adapter}: an update of shape {tuple(head.shape)} for lm_head.weight, which the "
                                 f"model has as {tuple(base.shape)}")
            low = min(saved.dtype, base.dtype, key=lambda t: t.itemsize) if saved is not None else None
            if saved is not None and (saved.shape != base.shape or not torch.equal(saved.to(low), base.to(low))):
                raise NotImplementedError(f"{adapter}: its lm_head.base_layer.weight is not the model's output layer "
                                          "(a resized vocabulary?); pyllm merges LoRA updates of the model's own "
                                          "weights only")
            state["lm_head.weight"] = base.to(torch.promote_types(base.dtype, torch.float32)) + head
            cfg = replace(cfg, tie_embeddings=False)  # (untied: the updated head is a weight of its own)
        for name, update in expert_updates.items():  # a MoE's experts, in pyllm's layout whatever the checkpoint's
            if name not in state or state[name].shape != update.shape:
                raise ValueError(f"{adapter}: an update of shape {tuple(update.shape)} for {name}, which the model "
                                 f"{'has as ' + str(tuple(state[name].shape)) if name in state else 'does not have'}")
            state[name] = state[name].to(torch.promote_types(state[name].dtype, torch.float32)) + update
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        model = cls.fitting(cfg, state, folder).to(dtype)
        model.load_state_dict(state)  # strict: a name or shape the mapping missed raises
        return model.to(device).eval()  # as transformers' from_pretrained: model.train() to train

    def to_hf(self, folder, hf_config: dict | None = None) -> Path:
        """Writes a Hugging Face checkpoint folder (config.json, model.safetensors) that transformers
        loads as the same function: the inverse of from_hf. hf_config: the config.json this model
        was read from (kept as it is, its model_type choosing the weight names); None writes a
        LlamaForCausalLM config for LLaMA-shaped models (RMSNorm, SwiGLU, RoPE, no biases, full or
        Mistral-style windowed attention) and a GPT2LMHeadModel one for GPT-2-shaped ones, and raises
        NotImplementedError for what neither computes. A model with a score head (a reward model)
        is written as that kind's *ForSequenceClassification (its score head, no LM head; from_hf
        reads it back). Returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        hf = dict(hf_config) if hf_config is not None else hf_config_of(self.config)  # (refused: no folder made)
        if hf.get("model_type") == "gemma3":  # a multimodal source: its language model, as Gemma3ForCausalLM
            hf = gemma3_text_config(hf)
        kind = hf.get("model_type")
        if self.config.num_labels:  # a reward model: transformers' *ForSequenceClassification of this kind
            causal = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
            hf.update(architectures=[causal.replace("ForCausalLM", "ForSequenceClassification")
                                     .replace("LMHeadModel", "ForSequenceClassification")],
                      id2label={str(i): f"LABEL_{i}" for i in range(self.config.num_labels)},
                      label2id={f"LABEL_{i}": i for i in range(self.config.num_labels)})
            hf.pop("num_labels", None)
            hf["pad_token_id"] = self.config.pad_token_id  # where transformers reads the scores, as pyllm does
        # (what the model trained with, TRAINING_FIELDS, is no part of the function written)
        trained = {k: getattr(self.config, k) for k in self.TRAINING_FIELDS}
        # (a Gemma run saved before norm_offset holds its norms folded, 1 + w, state_to_hf unfolds them)
        folded = {"norm_offset": 0.0} if kind in GEMMA_KINDS and not self.config.norm_offset else {}
        if hf_config is not None and replace(config_from_hf(hf), **trained, **folded) != self.config:
            raise ValueError(f"to_hf: hf_config (model_type {kind!r}) does not describe this model's config")
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.lora_scale() is not None:  # the updates merged, as save() writes them
            state = merge_lora_state(state, self.lora_scale())
        state = state_to_hf(state, self.config, kind)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        dtypes = {v.dtype for v in state.values()}
        if len(dtypes) == 1:  # transformers 5 reads "dtype", 4 "torch_dtype"
            hf["dtype"] = hf["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(hf, indent=2))
        return folder

    # --- generation -------------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int | None = None):
        """One (k, v) pair per layer, each (B, S_max, H_kv, D), in the dtype of the weights, zeros.
        Zeros, not torch.empty's leftovers: the SDPA fallback for per-row lengths (head dims the
        kernels do not take, softcap on CUDA unless asked) multiplies the whole cache by its masked weights, and 0 times
        a leftover NaN or inf is NaN (generate_batch sampled from NaN logits, now and then, with
        head_dim 16; the kernels read no position past a row's length)."""
        cfg, p = self.config, self.lm_head.weight
        shape = (batch_size, max_len or cfg.block_size, cfg.n_kv_heads, cfg.head_dim)
        return [(torch.zeros(shape, device=p.device, dtype=p.dtype), torch.zeros(shape, device=p.device, dtype=p.dtype))
                for _ in range(cfg.n_layers)]

    def forward_cached(self, idx: torch.Tensor, cache, start: int, last: torch.Tensor | None = None,
                       keep: int = 0) -> torch.Tensor:
        """Logits (B, V) of the last position of idx (B, T), which continues a sequence whose first
        `start` positions are in the cache; appends idx's keys and values to the cache. last: (B,)
        each row's position in idx to give the logits of instead (right-padded rows); keep > 0:
        the logits of the last `keep` positions, (B, keep, V) (speculative decoding's check of a
        draft; not the whole prompt's before it)."""
        x, rope = self._embed(idx, start)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, rope, layer_cache, start)
        if keep:
            return self._logits(self.norm_f(x[:, -keep:]))
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]  # (B, C)
        return self._logits(self.norm_f(x))

    def decode_step(self, token: torch.Tensor, cache, lengths: torch.Tensor) -> torch.Tensor:
        """forward_cached for one new token per row at positions held on the device: token (B, 1),
        lengths int32 (B,) (each row's tokens already in the cache, where the new one goes; < the
        cache's capacity, not checked: that would read them on the host). Logits (B, V). With no
        host read and no shape that changes from token to token, a CUDA graph can hold it
        (generate_stream's cuda_graph). forward_cached with a tensor start: _embed and the
        attention read it on the device."""
        return self.forward_cached(token, cache, lengths)

    @contextlib.contextmanager
    def _in_eval(self):
        """Eval mode within, the mode before restored after (an exception too). Generations in
        several threads at once on one model share it: the first in sets eval mode, the last out
        restores training mode (each restoring its own had turned dropout back on under the others)."""
        with _MODE_LOCK:
            depth = self.__dict__.get("_eval_depth", 0)
            if depth == 0:
                self._eval_restores = self.training
                if self.training:  # (already eval: no walk over every module, per decoded token)
                    self.eval()
            self._eval_depth = depth + 1
        try:
            yield
        finally:
            with _MODE_LOCK:
                self._eval_depth -= 1
                if self._eval_depth == 0 and self._eval_restores:
                    self.train(True)

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                        generator: torch.Generator | None = None,
                        stop_tokens: Iterable[int] = (), cuda_graph: bool = False, min_p: float | None = None,
                        repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                        min_new_tokens: int = 0, typical_p: float | None = None, epsilon_cutoff: float = 0.0,
                        eta_cutoff: float = 0.0) -> Iterator[torch.Tensor]:
        """Yields up to max_new_tokens next tokens (B,) one at a time, in eval mode (no dropout).
        temperature 0 is greedy; then top_k, then top_p, then min_p, typical_p, epsilon_cutoff and
        eta_cutoff, as transformers' warpers (the same probabilities); repetition_penalty (CTRL's,
        transformers' RepetitionPenaltyLogitsProcessor, greedy too) divides a positive logit of every
        id the row's text holds so far (prompt and new tokens, the whole of them past block_size too),
        multiplies a negative one; no_repeat_ngram_size n (transformers' NoRepeatNGramLogitsProcessor,
        greedy too) bans each id that would end an n-gram the row's text already holds;
        min_new_tokens bans stop_tokens until that many new tokens (MinNewTokensLengthLogitsProcessor,
        which bans the eos ids); top_k None cuts
        nothing (nanoGPT's default: transformers' generate takes 50 unless told, as `pyllm generate`
        does). Past block_size the cached path re-reads the last block_size/2 tokens into a fresh cache
        (nanoGPT crops to the last block_size tokens at every step, as use_cache=False does here: the
        tokens past block_size differ between the two). Stops after the step at which every row has
        sampled one of stop_tokens (an id or several: end-of-sequence ids); a row that stopped earlier
        repeats its stop token until then (as transformers pads finished rows). idx's rows are whole
        prompts of one length, not padded: prompts of different lengths go to generate_batch.

        cuda_graph (CUDA, use_cache): each one-token step replays a CUDA graph of decode_step
        (captured once per call, before the prompt fills the cache) instead of launching its kernels
        from Python one by one: generation of small models is bound by those launches. The same
        tokens as without it (the same kernels). Not with LongRoPE. UNVERIFIED: not yet run on a GPU."""
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size, min_new_tokens,
                       typical_p, epsilon_cutoff, eta_cutoff)
        check_new_tokens(max_new_tokens, "generate")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate: idx must be (batch, T) with T >= 1 prompt tokens, got shape {tuple(idx.shape)}")
        # Eval mode around each step's forward, not across the yields (the caller's code between two
        # tokens sees the model's own mode; generate_stream called alone had kept dropout on)
        cut = _Cut(min_p, typical_p, epsilon_cutoff, eta_cutoff)
        yield from self._generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                                         stop_tokens, cuda_graph, cut, repetition_penalty, no_repeat_ngram_size,
                                         min_new_tokens)

    def _generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator, stop_tokens,
                         cuda_graph, cut, repetition_penalty, no_repeat_ngram_size,
                         min_new_tokens) -> Iterator[torch.Tensor]:
        stop_tokens = stop_ids(stop_tokens)  # (read once: an iterator's ids are for the stop and min_new_tokens both)
        stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        ended = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)  # each stopped row's stop token
        block = self.config.block_size
        # As long as this generation can get, not block_size: a 128k-context checkpoint would
        # otherwise ask for a 128k cache per layer (GBs on a GPU) to sample a few tokens.
        capacity = min(block, min(idx.shape[1], block) + max_new_tokens)
        cache, cache_len = (self.new_kv_cache(idx.shape[0], capacity) if use_cache else None), 0
        pending = idx[:, -block:]  # tokens not yet in the cache
        switch = _longrope_switch(self.config)  # LongRoPE: past this length every position is re-rotated
        graph = None
        if cuda_graph:
            if not use_cache:
                raise ValueError("generate: cuda_graph needs use_cache (it replays the cached decode step)")
            with self._in_eval():
                graph = _DecodeGraph(self, cache, idx.shape[0])  # captured before the prompt fills the cache
        rules = _LogitRules(self, idx, repetition_penalty, no_repeat_ngram_size, min_new_tokens, stop_tokens)
        for _ in range(max_new_tokens):
            with self._in_eval():
                logits, cache_len = self._next_logits(idx, pending, cache, cache_len, graph, use_cache, switch)
            next_token = _sample(rules(logits), temperature, top_k, top_p, generator, cut)  # (B,)
            if rules.active:
                rules.advance(next_token)
            if len(stop):
                next_token = torch.where(done, ended, next_token)  # a stopped row repeats its stop token
                ended = torch.where(done, ended, next_token)
                done |= torch.isin(next_token, stop)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            pending = next_token[:, None]
            yield next_token
            if len(stop) and bool(done.all()):  # a host sync per token, only when stop tokens are given
                return

    def _next_logits(self, idx, pending, cache, cache_len: int, graph, use_cache: bool, switch):
        """One step of _generate_stream: (logits (B, V) after idx, the cache's new length)."""
        block = self.config.block_size
        if not use_cache:
            return self(idx[:, -block:])[0][:, -1], cache_len
        if cache_len + pending.shape[1] > block:  # window full: restart from the recent half
            pending, cache_len = idx[:, -max(1, block // 2):], 0
        elif cache_len and cache_len <= switch < cache_len + pending.shape[1]:
            pending, cache_len = idx[:, -block:], 0  # as transformers' Phi-3: the cache starts over
        if graph is not None and pending.shape[1] == 1:
            logits = graph(pending, cache_len)
        else:
            logits = self.forward_cached(pending, cache, cache_len)
        return logits, cache_len + pending.shape[1]

    def _seen_ids(self, rows, repetition_penalty: float) -> torch.Tensor | None:
        """(B, vocab) bool: the ids each of rows (a (B, T) tensor or 1-D ones) holds, which
        repetition_penalty penalizes; None where it is 1 (no penalty)."""
        if repetition_penalty == 1:
            return None
        seen = torch.zeros(len(rows), self.lm_head.weight.shape[0], dtype=torch.bool,
                           device=self.lm_head.weight.device)
        for b, ids in enumerate(rows):
            seen[b, ids.to(seen.device)] = True
        return seen

    def generate_speculative(self, idx: torch.Tensor, draft: "LLM", max_new_tokens: int, temperature: float = 1.0,
                             top_k: int | None = None, top_p: float | None = None, draft_tokens: int = 4,
                             generator: torch.Generator | None = None, stop_tokens: Iterable[int] = (),
                             stats: dict | None = None, min_p: float | None = None,
                             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                             min_new_tokens: int = 0, typical_p: float | None = None, epsilon_cutoff: float = 0.0,
                             eta_cutoff: float = 0.0) -> Iterator[torch.Tensor]:
        """generate_stream's tokens for one sequence (idx (1, T)) by speculative decoding (Leviathan
        et al. 2023; Chen et al. 2023; transformers' assisted generation): the draft, a smaller model
        over the same vocabulary, proposes draft_tokens tokens one at a time, this model scores all
        of them in one cached forward, and they are kept up to the first it rejects: greedy
        (temperature 0), while each is this model's argmax; sampling, each with probability
        min(1, p / q) (p this model's, q the draft's distribution after repetition_penalty,
        no_repeat_ngram_size, min_new_tokens, temperature and the warpers, each at its position:
        a proposal's rules count the ones before it),
        the first rejected one replaced by a draw from max(0, p - q) normalized, and after a draft
        wholly kept one more token from p: the tokens come from this model's own distribution (greedy:
        its own tokens, to rounding). Each round adds 1 to draft_tokens + 1 tokens for one forward of
        this model. Yields (1,) tokens as they are settled, up to max_new_tokens; stops after a stop
        token. The prompt + max_new_tokens must fit in both models' block_size (no sliding restart),
        and stay short of a LongRoPE model's switch to its long factors (generate's cache starts
        over there). stats (a dict): filled with "rounds", "drafted" and "accepted" counts. The
        arguments are checked when it is called, before any token is asked for (a caller printing
        the prompt first, pyllm generate, had been refused after it)."""
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size, min_new_tokens,
                       typical_p, epsilon_cutoff, eta_cutoff)
        check_new_tokens(max_new_tokens, "generate_speculative")
        if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
            raise ValueError(f"generate_speculative: one sequence at a time (idx (1, T), T >= 1), got shape "
                             f"{tuple(idx.shape)}")
        if draft.config.vocab_size != self.config.vocab_size:
            raise ValueError(f"generate_speculative: the draft predicts {draft.config.vocab_size} ids, this model "
                             f"{self.config.vocab_size}: they must share the tokenizer")
        if draft_tokens < 1:
            raise ValueError(f"generate_speculative: draft_tokens must be >= 1, got {draft_tokens}")
        # (a round writes at most k = min(draft_tokens, tokens still to come) proposals: positions stay
        # below prompt + max_new_tokens in both caches)
        capacity = idx.shape[1] + max_new_tokens + 1
        if capacity - 1 > min(self.config.block_size, draft.config.block_size):
            raise ValueError(f"generate_speculative: a prompt of {idx.shape[1]} tokens + {max_new_tokens} new ones is "
                             "more than the block_size of a model; generate() it instead")
        if capacity - 1 > min(_longrope_switch(self.config), _longrope_switch(draft.config)):
            raise NotImplementedError("generate_speculative: past LongRoPE's switch to its long factors every cached "
                                      "key is rotated again (generate starts its cache over there); generate() it")
        stop = stop_ids(stop_tokens)
        counts = stats if stats is not None else {}
        counts.update(rounds=0, drafted=0, accepted=0)
        rules = _LogitRules(self, idx, repetition_penalty, no_repeat_ngram_size, min_new_tokens, stop)
        return self._speculative_tokens(idx, draft, max_new_tokens, temperature, top_k, top_p, draft_tokens, generator,
                                        stop, counts, capacity, _Cut(min_p, typical_p, epsilon_cutoff, eta_cutoff),
                                        rules)

    @torch.no_grad()
    def _speculative_tokens(self, idx, draft, max_new_tokens, temperature, top_k, top_p, draft_tokens, generator,
                            stop, counts, capacity, cut, rules) -> Iterator[torch.Tensor]:
        """generate_speculative's rounds, its arguments checked."""
        with self._in_eval(), draft._in_eval():
            cache, draft_cache = self.new_kv_cache(1, capacity), draft.new_kv_cache(1, capacity)
            length, draft_length = 0, 0  # positions in each cache
            pending, draft_pending = idx, idx  # tokens each has yet to read
            made = 0
            while made < max_new_tokens:
                k = min(draft_tokens, max_new_tokens - made)
                # the draft's proposals, one token at a time
                proposed, q = [], []
                # the rules after the settled text (for proposal 1) .. after proposal k
                held = [rules.fork()] if rules.active else None
                for i in range(k):
                    logits = draft.forward_cached(draft_pending, draft_cache, draft_length)  # (1, V)
                    if held is not None:
                        logits = held[i](logits)
                    draft_length += draft_pending.shape[1]
                    if temperature == 0:
                        token = logits.argmax(-1)
                    else:
                        q.append(_sampling_probs(logits, temperature, top_k, top_p, cut)[0])
                        token = torch.multinomial(q[-1], 1, generator=generator)
                    proposed.append(token.view(1))
                    draft_pending = token.view(1, 1)
                    if held is not None:
                        held.append(held[i].fork().advance(token.view(1)))
                drafted = torch.cat(proposed)  # (k,)
                # this model's distributions after its pending tokens and each proposal, one forward
                # (k + 1, V): after the last pending token (for proposal 1) .. after proposal k
                logits = self.forward_cached(torch.cat([pending, drafted[None]], 1), cache, length, keep=k + 1)[0]
                if held is not None:
                    logits = torch.cat([rule(row[None]) for rule, row in zip(held, logits)])
                length += pending.shape[1]  # (the kept proposals are added below)
                kept = 0
                if temperature == 0:
                    best = logits.argmax(-1)  # (k + 1,)
                    while kept < k and int(best[kept]) == int(drafted[kept]):
                        kept += 1
                    extra = best[kept].view(1)
                else:
                    p = _sampling_probs(logits, temperature, top_k, top_p, cut)  # (k + 1, V)
                    extra = None
                    for i in range(k):
                        t = int(drafted[i])
                        u = torch.rand((), generator=generator, device=p.device) if generator is not None else torch.rand(())
                        if float(u) * float(q[i][t]) < float(p[i, t]):  # accept with probability min(1, p / q)
                            kept += 1
                            continue
                        rest = (p[i] - q[i]).clamp(min=0)  # (all 0 only where p = q: a rejection of probability 0)
                        extra = torch.multinomial(rest / rest.sum() if rest.sum() > 0 else p[i], 1, generator=generator)
                        break
                    if extra is None:  # every proposal kept: one more from this model
                        extra = torch.multinomial(p[k], 1, generator=generator)
                counts["rounds"] += 1
                counts["drafted"] += k
                counts["accepted"] += kept
                settled = torch.cat([drafted[:kept], extra.view(1)])
                if held is not None:
                    for token in settled[:max_new_tokens - made]:
                        rules.advance(token.view(1))
                length += kept  # this model's cache: its pending tokens and the kept proposals
                # the draft read everything but its last proposal: back to the kept part
                draft_length = draft_length - (k - 1) + min(kept, k - 1)
                draft_pending = (drafted[k - 1:k] if kept == k else drafted[:0])
                draft_pending = torch.cat([draft_pending, extra.view(1)])[None]
                pending = extra.view(1, 1)
                for token in settled:
                    if made == max_new_tokens:
                        return
                    made += 1
                    yield token.view(1)
                    if int(token) in stop:
                        return

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 callback: Callable[[torch.Tensor], None] | None = None,
                 generator: torch.Generator | None = None, stop_tokens: Iterable[int] = (),
                 cuda_graph: bool = False, min_p: float | None = None,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 min_new_tokens: int = 0, typical_p: float | None = None, epsilon_cutoff: float = 0.0,
                 eta_cutoff: float = 0.0) -> torch.Tensor:
        """idx (B, T) followed by up to max_new_tokens sampled tokens, (B, T + n); callback gets each
        new (B,) token as it comes (for streaming); stop_tokens, cuda_graph, min_p, repetition_penalty,
        no_repeat_ngram_size, min_new_tokens, typical_p, epsilon_cutoff, eta_cutoff: see generate_stream.
        The rows of idx are prompts of one length, not padded (a left-padded batch would condition
        on its padding): prompts of different lengths go to generate_batch."""
        with self._in_eval():  # (restored even when sampling raises)
            out = [idx]
            for token in self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                                              stop_tokens, cuda_graph, min_p, repetition_penalty,
                                              no_repeat_ngram_size, min_new_tokens, typical_p, epsilon_cutoff,
                                              eta_cutoff):
                out.append(token[:, None])
                if callback is not None:
                    callback(token)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate_batch(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       stop_tokens: Iterable[int] = (), cuda_graph: bool = False,
                       stop_when: Callable[[int, list[int]], bool] | None = None, min_p: float | None = None,
                       repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                       min_new_tokens: int = 0, typical_p: float | None = None, epsilon_cutoff: float = 0.0,
                       eta_cutoff: float = 0.0) -> list[list[int]]:
        """Continues several prompts of different lengths at once: one prefill of the prompts (each a
        list of ids or a 1-D tensor, at least one token) padded on the right, then every step samples
        one token per row at each row's own position (decode_step), no padding in between. Returns each prompt's
        new tokens, up to max_new_tokens, cut after its first stop token. Greedy rows get the tokens
        generate() gives that prompt alone (the same function per row, rounding aside).
        prompt length + max_new_tokens must fit in block_size (no sliding restart here: generate()
        has one). cuda_graph: as in generate_stream (CUDA; unverified). stop_when: (a row's index in
        prompts, its new tokens so far) -> whether the row ends with the last of them (kept), as
        after a stop token (pyllm generate's --stop strings, transformers' StopStringCriteria); asked
        on the host after each token of a row not yet ended. Generation ends when every row has ended.
        min_p, repetition_penalty, no_repeat_ngram_size, min_new_tokens, typical_p, epsilon_cutoff,
        eta_cutoff: as in generate_stream, each row's penalty and n-grams over its own prompt and
        tokens (transformers' penalty over a left-padded batch leaves the padding out too; its
        n-grams count the padding's)."""
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size, min_new_tokens,
                       typical_p, epsilon_cutoff, eta_cutoff)
        check_new_tokens(max_new_tokens, "generate_batch")
        cut = _Cut(min_p, typical_p, epsilon_cutoff, eta_cutoff)
        stop_tokens = stop_ids(stop_tokens)  # (read once: an iterator's ids are for the stop and min_new_tokens both)
        device = self.lm_head.weight.device
        rows = []
        for p in prompts:
            ids = torch.as_tensor(p)
            if ids.dim() != 1 or ids.numel() and not _util.int_tensor(ids):
                raise ValueError(f"generate_batch: each prompt must be a list or 1-D tensor of int ids, got "
                                 f"{ids.dtype} of shape {tuple(ids.shape)}")
            rows.append(ids.to(device=device, dtype=torch.long))
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("generate_batch: give at least one prompt, each of at least one token")
        if max_new_tokens == 0:
            return [[] for _ in rows]
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate_batch: a prompt of {longest} tokens + {max_new_tokens} new ones is more than "
                             f"block_size {self.config.block_size}; shorten them, or generate() that prompt alone")
        if (self.config.rope_scaling or {}).get("rope_type") == "longrope":
            # LongRoPE (Phi-3.5, Phi-4-mini) picks its factors by position on the host, one position for
            # the batch: a row at a time through generate() (the batch had raised an internal message)
            if cuda_graph:  # as generate() and _DecodeGraph refuse it (the flag had been dropped here silently)
                raise NotImplementedError("generate_batch: cuda_graph does not take LongRoPE (its factors change "
                                          "with the position)")
            stops = stop_tokens  # (a set of ids: stop_ids' above)

            def alone(b: int, r) -> list[int]:
                new = []
                for token in self.generate_stream(r[None], max_new_tokens, temperature, top_k, top_p,
                                                  generator=generator, stop_tokens=stops, min_p=min_p,
                                                  repetition_penalty=repetition_penalty,
                                                  no_repeat_ngram_size=no_repeat_ngram_size,
                                                  min_new_tokens=min_new_tokens, typical_p=typical_p,
                                                  epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff):
                    new.append(int(token[0]))
                    if new[-1] in stops or stop_when is not None and stop_when(b, new):
                        break
                return new
            return [alone(b, r) for b, r in enumerate(rows)]
        with self._in_eval():  # (restored even when sampling raises)
            cache = self.new_kv_cache(len(rows), longest + max_new_tokens)
            graph = _DecodeGraph(self, cache, len(rows)) if cuda_graph else None  # before the prompts fill the cache
            # One prefill of the right-padded prompts: causal attention keeps each row's real tokens from
            # its padding, whose keys and values land past the row's length, where decode_step writes
            # its next token and never looks beyond.
            lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=device)
            # A prompt given several times (GRPO's groups, n samples of one prompt) is read once: its
            # cache rows and last logits are copied to each of its rows. 4 prompts of 110 tokens x 8
            # rows, 64 new tokens, bf16, 4 SmolLM2-shaped layers (2-core EPYC, 2026-12-01): 4.05-4.23 s
            # with every row read -> 3.72-3.94 s (decoding the 32 rows is most of it).
            first = {}
            for b, r in enumerate(rows):
                first.setdefault(tuple(r.tolist()), b)
            unique = list(first.values())
            which = torch.tensor([first[tuple(r.tolist())] for r in rows], device=device)
            which = torch.searchsorted(torch.tensor(unique, device=device), which)  # each row's unique prompt
            padded = torch.zeros(len(unique), longest, dtype=torch.long, device=device)
            for i, b in enumerate(unique):
                padded[i, :len(rows[b])] = rows[b]
            if len(unique) == len(rows):
                logits = self.forward_cached(padded, cache, 0, last=lengths.long() - 1)  # (B, V)
            else:
                read = self.new_kv_cache(len(unique), longest)
                logits = self.forward_cached(padded, read, 0, last=lengths[unique].long() - 1)[which]
                for (k, v), (k_read, v_read) in zip(cache, read):  # (in place: a CUDA graph holds these tensors)
                    k[:, :longest].copy_(k_read[which])
                    v[:, :longest].copy_(v_read[which])
                del read
            stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            made = [[] for _ in rows]  # stop_when: each row's new tokens, on the host
            ends = [None] * len(rows)  # where stop_when ended a row
            out = []
            rules = _LogitRules(self, rows, repetition_penalty, no_repeat_ngram_size, min_new_tokens, stop_tokens)
            for step in range(max_new_tokens):
                token = _sample(rules(logits), temperature, top_k, top_p, generator, cut)  # (B,)
                if rules.active:
                    rules.advance(token)
                out.append(token)
                if len(stop):
                    done |= torch.isin(token, stop)
                if stop_when is not None:
                    for b, (t, ended) in enumerate(zip(token.tolist(), done.tolist())):
                        if not ended:
                            made[b].append(t)
                            if stop_when(b, made[b]):
                                ends[b] = step + 1
                                done[b] = True
                if (len(stop) or stop_when is not None) and bool(done.all()):  # a host sync per token, only then
                    break
                if step + 1 < max_new_tokens:
                    logits = graph(token[:, None], lengths) if graph is not None else self.decode_step(token[:, None], cache,
                                                                                                       lengths)
                    lengths += 1
        stops = set(stop.tolist())
        return [until_stop(row, stops)[:end] for row, end in zip(torch.stack(out, dim=1).tolist(), ends)]  # (B, n) rows


def _longrope_switch(cfg: ModelConfig) -> float:
    """The length past which LongRoPE's long factors rotate every position (inf without LongRoPE)."""
    scaling = cfg.rope_scaling or {}
    return scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else math.inf


class _DecodeGraph:
    """LLM.decode_step for a batch of B rows captured as one CUDA graph over a KV cache whose tensors
    stay put (generate_stream's cuda_graph): a call copies the new tokens and their position into
    the graph's inputs and replays it. Built while the cache is still empty: the warm-up steps that
    capturing needs write position 0, which the prompt overwrites. UNVERIFIED: not yet run on a GPU."""

    def __init__(self, model: "LLM", cache, batch: int):
        device = model.lm_head.weight.device
        if device.type != "cuda":
            raise ValueError("generate: cuda_graph needs the model on a CUDA device")
        if _longrope_switch(model.config) != math.inf:
            raise NotImplementedError("generate: cuda_graph does not take LongRoPE (its factors change with the position)")
        self.device = device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        # The model's device made current for the capture and every replay: torch.cuda.graph's own
        # capture stream belongs to whichever device was current when it was first made, and replay
        # launches on the current device's stream (a model on cuda:1 with cuda:0 current).
        with torch.cuda.device(device):
            # Warm-up off the default stream, as torch.cuda.graph wants: first calls set kernels' shared-
            # memory attributes and the allocator's blocks, which a capture must not do.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    model.decode_step(self.token, cache, self.lengths)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.logits = model.decode_step(self.token, cache, self.lengths)  # (B, V), the graph's own memory

    def __call__(self, token: torch.Tensor, length: int | torch.Tensor) -> torch.Tensor:
        """token (B, 1); length: every row's cached tokens (an int) or each row's (int32 (B,))."""
        self.token.copy_(token)
        if isinstance(length, torch.Tensor):
            self.lengths.copy_(length)
        else:
            self.lengths.fill_(length)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits


def merge_lora_state(state_dict: dict, scale: float) -> dict:
    """A state dict with LoRA layers (LLM.add_lora) as the plain model's: each X.weight plus
    scale * X.lora_b @ X.lora_a (per part where X.lora_parts says so), and each expert stack X
    (MoEMLP's gate_up, down) plus scale * X_lora_b @ X_lora_a, expert by expert; the lora entries
    dropped."""
    from pyllm.nn import merge_lora

    merged = {k: v for k, v in state_dict.items() if not k.endswith((".lora_a", ".lora_b", ".lora_parts",
                                                                      "_lora_a", "_lora_b"))}
    for key in state_dict:
        if key.endswith(".lora_a"):
            prefix = key[:-len("lora_a")]
            merged[prefix + "weight"] = merge_lora(state_dict[prefix + "weight"], state_dict[key],
                                                   state_dict[prefix + "lora_b"], scale,
                                                   state_dict.get(prefix + "lora_parts"))
        elif key.endswith("_lora_a"):  # (E, out, r) @ (E, r, in): one product per expert
            weight = key[:-len("_lora_a")]
            merged[weight] = merge_lora(state_dict[weight], state_dict[key], state_dict[weight + "_lora_b"], scale)
    return merged


# LoRA targets by projection (LLM.add_lora), and the names PEFT gives the same layers; a MoE's
# experts (not in all-linear, as PEFT's: they are no linear layers), PEFT's target_parameters.
LORA_LINEAR_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_EXPERT_TARGETS = ("experts.gate_up", "experts.down")
LORA_TARGETS = LORA_LINEAR_TARGETS + LORA_EXPERT_TARGETS


def _lora_target_names(targets) -> list[str]:
    """The names given as LoRA targets (a list or a comma-separated string), stripped."""
    return [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]


def lora_targets(targets) -> list[str]:
    """LLM.add_lora's targets as projection names: a list or a comma-separated string of q, k, v, o,
    gate, up, down or PEFT's q_proj ... down_proj; "all-linear" (or "all") for all of them; a MoE's
    experts.gate_up, experts.down (PEFT's experts.gate_up_proj, experts.down_proj), or experts for
    both."""
    out, bad = [], []
    for n in _lora_target_names(targets):
        # (PEFT adapts that layer alone; pyllm's targets are every layer's)
        if any(part.isdigit() for part in n.split(".")):
            raise ValueError(f"LoRA target {n!r} names one layer's module (PEFT would adapt that layer only): pyllm's "
                             "targets are projections adapted in every layer (q_proj, self_attn.q_proj, ...); give the "
                             "projection without its layer path")
        # a module path's last part (PEFT's self_attn.q_proj, mlp.down_proj) names the projection
        short = n if n.startswith("experts.") else n.rsplit(".", 1)[-1]
        names = (LORA_LINEAR_TARGETS if n in ("all-linear", "all") else LORA_EXPERT_TARGETS if n == "experts"
                 else [short.removesuffix("_proj")])
        bad += [n for name in names if name not in LORA_TARGETS]  # (named as given)
        out += names
    if bad or not out:
        raise ValueError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}, experts (or PEFT's q_proj ... down_proj, "
                         f"experts.gate_up_proj, experts.down_proj, or all-linear; the embeddings, the output layer "
                         f"and a router take no LoRA update here), got {', '.join(dict.fromkeys(bad)) if bad else 'none'}")
    return sorted(set(out), key=LORA_TARGETS.index)


def weights_step(path) -> int | None:
    """The training step of a run's model.safetensors (save_weights' step), None when not recorded."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = (f.metadata() or {}).get("pyllm_step")
    return int(step) if step is not None else None


def save_weights(state_dict: dict, cfg: ModelConfig, path, lora_scale: float | None = None,
                 step: int | None = None) -> None:
    """Writes a state dict (e.g. gathered from FSDP shards) as LLM.load reads it; LoRA layers' (with
    their lora_scale) merged into the weights they update. step: the training step the weights are
    of, in the metadata (pyllm_step; weights_step reads it), for `pyllm export` to tell them from a
    newer checkpoint."""
    from safetensors.torch import save_file

    if lora_scale is not None:
        state_dict = merge_lora_state(state_dict, lora_scale)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    # A temp file renamed over the old one: a kill while writing (keep_best writes mid-run) leaves
    # the old weights or the new, never a torn file.
    from pyllm.data import _umask, new_temp_file

    fd, tmp = new_temp_file(path)  # (made exclusively: never written through a planted link)
    os.close(fd)
    try:
        save_file(state, str(tmp), metadata={"pyllm_config": json.dumps(cfg.to_dict()),
                                             **({"pyllm_step": str(step)} if step is not None else {})})
        # safetensors writes through a private (0600) temp file of its own, renamed onto tmp: the
        # weights get the mode any new file gets (0644 under the usual umask), as the run's others.
        os.chmod(tmp, 0o666 & ~_umask())
    except Exception as e:  # safetensors' own error type (a full disk): an OSError naming the file, as open's
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"writing {path} failed: {e}") from e
    os.replace(tmp, path)


# --- Hugging Face checkpoints -----------------------------------------------------------------------

# A checkpoint folder's files besides config.json and the weights: tokenizer, chat template,
# generation defaults (an exported fine-tune keeps its source's).
HF_SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"]
HF_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors", *HF_SIDE_FILES]


def hf_folder(name) -> Path:
    """name itself when it is a folder; else a Hugging Face hub repo id (e.g. "gpt2",
    "HuggingFaceTB/SmolLM2-135M"), whose config, safetensors weights and tokenizer.json
    huggingface_hub fetches into its cache (once) when it is installed."""
    if Path(name).is_dir():
        return Path(name)
    if str(name).startswith((".", "/", "~")) or str(name).count("/") > 1 or Path(name).exists():
        raise ValueError(f"{name}: no such folder")  # a path, not a hub repo id ("org/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{name}: no such folder (a hub repo id needs huggingface_hub installed)") from None
    try:
        return Path(snapshot_download(str(name), allow_patterns=HF_FILES))
    except Exception as e:  # offline, unknown repo, bad id: say both readings of the name
        raise ValueError(f"{name}: no such folder here, and fetching it as a Hugging Face hub repo id failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (LLaMA / Mistral / Qwen2 / Qwen3 / SmolLM3 / Phi-3 / OLMo 2,
    Granite, Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE / GraniteMoE, Gemma 2, Gemma 3's text model, or GPT-2);
    a *ForSequenceClassification's (a reward model) with its num_labels (its id2label's)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object (a model's config), got a {type(hf).__name__}")
    try:
        cfg = _decoder_config_from_hf(hf)
    except KeyError as e:  # a field its model_type requires (transformers would fall back on a default we cannot know)
        raise ValueError(f"config.json (model_type {hf.get('model_type')!r}) lacks {e.args[0]!r}, which pyllm reads "
                         "from it") from None
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
        cfg.num_labels = hf.get("num_labels") or len(hf.get("id2label") or {0: 0, 1: 1})  # (transformers' default 2)
        pad = hf.get("pad_token_id")  # where its scores are read (TRL's reward models: often its eos)
        cfg.pad_token_id = pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < cfg.vocab_size else None
    return cfg


def hf_dropout(hf: dict) -> str:
    """The dropout probabilities above 0 a Hugging Face config.json names (transformers trains with
    them; config_from_hf leaves them out, as nanoGPT's from_pretrained does), as "key=p, ..."."""
    hf = {**hf, **(hf.get("text_config") or {})}
    return ", ".join(f"{key}={hf[key]}" for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop", "attention_dropout",
                                                    "hidden_dropout", "embedding_dropout")
                     if isinstance(hf.get(key), (int, float)) and hf[key] > 0)


def _decoder_config_from_hf(hf: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise NotImplementedError(f"GPT-2 with activation {activation!r}: the tanh GELU or the exact one only")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise NotImplementedError("GPT-2 with a non-standard attention scale")
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layers=hf["n_layer"],
                           n_heads=hf["n_head"], dim=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
                           norm="layernorm", mlp="gelu_exact" if activation == "gelu" else "gelu", positions="learned",
                           bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5))  # (GPT2Config's default)
    if kind == "gemma3":  # the multimodal checkpoints (4B and up): their text model alone
        return _gemma3_config(gemma3_text_config(hf))
    if kind == "gemma3_text":
        return _gemma3_config({**GEMMA3_TEXT_DEFAULTS, **hf})
    if kind == "gemma2":
        return _gemma2_config({**GEMMA2_DEFAULTS, **hf})
    if kind not in HF_DECODERS:
        raise NotImplementedError(f"Hugging Face model_type {kind!r}: pyllm reads {', '.join(HF_DECODERS)}, "
                                  "gemma2, gemma3, gemma3_text and gpt2")
    rope = hf_rope_parameters(hf, kind)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if kind == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's early names of LongRoPE, as transformers reads them
        rope_type = "longrope"
    if rope_type not in ("default", "llama3", "longrope", "yarn"):
        raise NotImplementedError(f"scaled RoPE ({rope}): pyllm's RoPE is the unscaled one, Llama 3.1's, LongRoPE or "
                                  "YaRN")
    if rope_type == "llama3" and not all(k in rope for k in LLAMA3_ROPE_KEYS):
        raise ValueError(f"llama3 RoPE scaling needs {', '.join(LLAMA3_ROPE_KEYS)}; the config has {rope}")
    scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}} if rope_type == "llama3" else None
    if rope_type == "longrope":
        scaling = _hf_longrope(hf, rope)
    # (transformers' defaults where config.json has none: Qwen3Config's head_dim is 128, not hidden / heads;
    # the Qwen MoEs' experts are 768 / 1408 wide)
    head_dim = hf.get("head_dim", HF_HEAD_DIM.get(kind)) or hf["hidden_size"] // hf["num_attention_heads"]
    block_size = hf["max_position_embeddings"]
    if rope_type == "yarn":
        scaling = _hf_yarn(hf, rope)
        # transformers sets no limit; YaRN's own is factor x the original context (Qwen2.5's 32k x 4),
        # where max_position_embeddings often stays the original's (the model cards' added rope_scaling)
        block_size = max(block_size, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and kind != "phi3":
        # transformers' Phi-3 alone rotates part of each head; the other kinds' default RoPE never reads
        # the factor (the whole head turns), and their scaled RoPEs read it but rotate q / k whole (a shape error)
        if rope_type != "default":
            raise NotImplementedError(f"{kind} with partial_rotary_factor={partial} and {rope_type} RoPE: "
                                      f"transformers' {kind} cannot compute it either (only phi3 rotates part "
                                      "of a head)")
        warnings.warn(f"{kind} partial_rotary_factor={partial}: transformers' {kind} does not read it (it rotates "
                      "each head whole), and neither does pyllm", stacklevel=3)
        partial = 1.0
    rotary_dim = int(head_dim * partial) if partial != 1.0 else None
    n_layers = hf["num_hidden_layers"]
    window, window_layers = _hf_sliding_window(hf, kind, n_layers)
    nope_layers = None
    if kind == "smollm3":
        nope_layers = [i for i, uses_rope in enumerate(_smollm3_rope_layers(hf)) if not uses_rope] or None
    # (each flag where transformers' class of that kind reads it: Qwen2's q / k / v biases are its own,
    # Mistral's attention_bias is read by nothing; "swish" is transformers' other name of SiLU)
    unsupported = {"attention_bias": kind in HF_READ_ATTENTION_BIAS and hf.get("attention_bias"),
                   "mlp_bias": kind in HF_READ_MLP_BIAS and hf.get("mlp_bias"),
                   "hidden_act": None if hf.get("hidden_act", "silu") in ("silu", "swish") else hf["hidden_act"]}
    for name, value in unsupported.items():
        if value:
            raise NotImplementedError(f"{kind} with {name}={value!r}: pyllm's LLaMA has no biases in its "
                                      "output and MLP projections and uses SiLU")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=block_size, n_layers=n_layers,
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or None,
                       dim=hf["hidden_size"], head_dim=head_dim,
                       # (the Qwen MoEs' experts'; Mixtral and OLMoE read no such key)
                       mlp_hidden=(hf.get("moe_intermediate_size") or HF_MOE_HIDDEN[kind] if kind in HF_MOE_HIDDEN
                                   else hf["intermediate_size"]),
                       # (transformers' default where config.json says nothing: SmolLM3's ties)
                       tie_embeddings=hf.get("tie_word_embeddings", kind == "smollm3"),
                       norm_eps=hf.get("rms_norm_eps", HF_RMS_NORM_EPS.get(kind, 1e-6)),
                       rope_theta=rope.get("rope_theta", hf.get("rope_theta", HF_ROPE_THETA.get(kind, 10000.0))),
                       rope_scaling=scaling,
                       qkv_bias=kind == "qwen2" or (kind == "qwen2_moe" and hf.get("qkv_bias", True)),
                       qk_norm=kind in ("qwen3", "olmo2", "qwen3_moe", "olmoe"),
                       qk_norm_all_heads=kind in ("olmo2", "olmoe"), pre_norm=kind != "olmo2",
                       sandwich_norm=kind == "olmo2", sliding_window=window, window_layers=window_layers,
                       nope_layers=nope_layers, rotary_dim=rotary_dim, **_hf_experts(hf, kind), **_hf_granite(hf, kind))


def _rope_type_named(rope: dict) -> dict:
    """rope with transformers 4's "type" key under transformers 5's name, "rope_type"."""
    if "type" in rope and "rope_type" not in rope:
        return {"rope_type": rope["type"], **{k: v for k, v in rope.items() if k != "type"}}
    return rope


def hf_rope_parameters(hf: dict, kind: str) -> dict:
    """A (non-nested) config.json's RoPE parameters as transformers 5 reads them: rope_scaling, where
    given, over rope_parameters (PreTrainedConfig.convert_rope_params_to_dict: `rope_scaling or
    rope_parameters`; a user adding "rope_scaling" to a config transformers 5 wrote, as model cards
    say to enable YaRN, gets it there). Both given with different values: refused, since transformers
    then also drops rope_parameters' rope_theta for its class default."""
    # (transformers 4's "type" key read as "rope_type": Qwen2.5's model card writes it)
    params, scaling = (_rope_type_named(hf.get(key) or {}) for key in ("rope_parameters", "rope_scaling"))
    if params and scaling:
        # transformers then takes rope_theta from rope_scaling, else the top level, else its class default,
        # never from rope_parameters: a rope_theta there alone is dropped too
        theta = scaling.get("rope_theta", hf.get("rope_theta", HF_ROPE_THETA.get(kind, 10000.0)))
        if any(params.get(k, v) != v for k, v in scaling.items()) or params.get("rope_theta", theta) != theta:
            raise NotImplementedError(f"{kind}: config.json gives both rope_parameters {params} and rope_scaling "
                                      f"{scaling}; transformers 5 applies rope_scaling alone (its rope_theta "
                                      f"{theta}): merge them into rope_parameters")
        return {**params, **scaling}
    return scaling or params


# transformers' config classes' defaults where they are not LLaMA's (1e-6, 10000), for a config.json that leaves
# them out (a hand-written or trimmed one): Mixtral's rope_theta 1e6 had read as 10000, Phi-3's eps 1e-5 as 1e-6.
HF_RMS_NORM_EPS = {"phi3": 1e-5, "olmo2": 1e-5, "mixtral": 1e-5, "olmoe": 1e-5}
HF_ROPE_THETA = {"mixtral": 1e6, "smollm3": 2e6}
HF_HEAD_DIM = {"qwen3": 128}
HF_MOE_HIDDEN = {"qwen3_moe": 768, "qwen2_moe": 1408}  # (their configs' moe_intermediate_size)


def _hf_granite(hf: dict, kind: str) -> dict:
    """ModelConfig's fields of IBM Granite's scalars ({} for other kinds): embedding_multiplier,
    residual_multiplier, logits_scaling, and attention_multiplier as the softmax scale."""
    if kind not in ("granite", "granitemoe"):
        return {}
    return dict(embed_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                logits_scaling=float(hf.get("logits_scaling", 1.0)),
                softmax_scale=float(hf.get("attention_multiplier", 1.0)))


# The mixture-of-experts decoders among HF_DECODERS: Mixtral's router and experts sit in each layer's
# block_sparse_moe, Qwen3-MoE's, OLMoE's and Qwen2-MoE's (with its shared expert) in its mlp.
HF_MOE = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "olmoe": "mlp", "qwen2_moe": "mlp",
          "granitemoe": "block_sparse_moe"}


def _hf_experts(hf: dict, kind: str) -> dict:
    """ModelConfig's mixture-of-experts fields of an HF_MOE config ({} for the dense ones): every
    layer sparse; the load-balancing loss in training only where the config asks for router logits
    (as transformers adds it)."""
    if kind not in HF_MOE:
        return {}
    unsupported = {"router_jitter_noise": hf.get("router_jitter_noise"), "clip_qkv": hf.get("clip_qkv"),
                   "mlp_only_layers": hf.get("mlp_only_layers"),
                   "decoder_sparse_step": None if hf.get("decoder_sparse_step", 1) == 1 else hf["decoder_sparse_step"]}
    for name, value in unsupported.items():
        if value:
            raise NotImplementedError(f"{kind} with {name}={value!r}: pyllm's MoE layers are all sparse, with no "
                                      "router noise or q / k / v clipping")
    return dict(n_experts=hf.get("num_local_experts") or hf["num_experts"], experts_per_token=hf["num_experts_per_tok"],
                shared_expert_hidden=hf.get("shared_expert_intermediate_size", 5632) if kind == "qwen2_moe" else None,
                norm_topk_prob=kind in ("mixtral", "granitemoe") or bool(hf.get("norm_topk_prob", False)),
                # (transformers' default where the config names none: OLMoE's 0.01, the others' 0.001)
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01 if kind == "olmoe" else 0.001)
                if hf.get("output_router_logits") or hf.get("pyllm_router_aux_loss") else 0.0)


# transformers' Gemma3TextConfig defaults: a multimodal checkpoint's text_config lists only the
# values that differ from them (tests/test_model.py checks them against transformers).
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6, rope_local_base_freq=10000.0,
    sliding_window_pattern=6, tie_word_embeddings=True)


# The Gemma families whose checkpoints store norm weights as w for (1 + w) and norm around both sublayers.
GEMMA_KINDS = ("gemma2", "gemma3_text")

# transformers' Gemma2Config defaults (tests/test_model.py checks them against transformers).
GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True)


def _gemma_layer_types(hf: dict, kind: str, unsupported: dict, default: list[str]) -> list[str]:
    """A Gemma config's layer types (hf's layer_types, else default), after refusing what pyllm's
    Gemma layout cannot compute: any truthy value in unsupported (name -> value), attention biases,
    an activation other than the tanh GELU, layer types other than full and sliding-window."""
    unsupported = {**unsupported, "attention_bias": hf.get("attention_bias"),
                   "hidden_activation": None if hf.get("hidden_activation", "gelu_pytorch_tanh") == "gelu_pytorch_tanh"
                   else hf["hidden_activation"]}
    for name, value in unsupported.items():
        if value:
            raise NotImplementedError(f"{kind} with {name}={value!r}")
    types = hf.get("layer_types") or default
    if len(types) != hf["num_hidden_layers"] or not set(types) <= {"full_attention", "sliding_attention"}:
        raise NotImplementedError(f"{kind} with layer_types={types!r}")
    return types


def _gemma2_config(hf: dict) -> ModelConfig:
    """Gemma 2 (Gemma2ForCausalLM: 2B, 9B, 27B): Gemma 3's layout without q / k norms and with one
    RoPE theta, sliding windows in every other layer (the first one too), and capped attention
    scores and output logits (attn_logit_softcapping, final_logit_softcapping: softcap * tanh(x /
    softcap)); the capped attention runs on pyllm's kernels (flash_attn and flash_attn_with_kvcache with
    softcap; on CUDA with PYLLM_ATTN_SCORE_MODS_CUDA=1 until verified on a GPU, else torch's ops)."""
    n_layers = hf["num_hidden_layers"]
    unsupported = {"use_bidirectional_attention": hf.get("use_bidirectional_attention")}
    types = _gemma_layer_types(hf, "gemma2", unsupported, [  # transformers' default: the even layers windowed
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)])
    rope = hf_rope_parameters(hf, "gemma2")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise NotImplementedError(f"gemma2 with scaled RoPE ({rope}): pyllm reads its unscaled RoPE")
    window = hf.get("sliding_window")
    window_layers = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else None
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layers=n_layers,
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or None,
                       dim=hf["hidden_size"], head_dim=hf.get("head_dim") or None, mlp_hidden=hf["intermediate_size"],
                       mlp="geglu", tie_embeddings=hf.get("tie_word_embeddings", True),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", hf.get("rope_theta")),
                       sandwich_norm=True, embed_scale=True, softmax_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
                       attn_softcap=hf.get("attn_logit_softcapping") or None,
                       final_softcap=hf.get("final_logit_softcapping") or None, norm_offset=1.0,
                       sliding_window=window if window_layers else None, window_layers=window_layers or None)


def gemma3_text_config(hf: dict) -> dict:
    """The gemma3_text config.json of a Gemma3ForConditionalGeneration checkpoint's language model
    (its text_config over transformers' defaults), which Gemma3ForCausalLM loads."""
    text = {**GEMMA3_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    text.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
    if "tie_word_embeddings" in hf:
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return text


def _gemma3_config(hf: dict) -> ModelConfig:
    """Gemma 3's text model (Gemma3ForCausalLM, the 270M and 1B checkpoints): a LLaMA with
    sqrt(dim)-scaled embeddings, norms around both sublayers' outputs too, (1 + w) norm weights
    (norm_offset=1), q / k norms, a tanh-GELU-gated MLP, softmax scale
    query_pre_attn_scalar ** -0.5, sliding-window layers (5 in 6) with their own RoPE theta, and
    Gemma 2's capped logits where the config sets final_logit_softcapping (its attention scores are
    not capped: transformers' Gemma 3 leaves attn_logit_softcapping unread)."""
    n_layers = hf["num_hidden_layers"]
    unsupported = {"use_bidirectional_attention": hf.get("use_bidirectional_attention")}
    if hf.get("attn_logit_softcapping"):  # (Gemma3TextConfig takes the field from Gemma 2's; its attention never reads it)
        warnings.warn(f"gemma3_text attn_logit_softcapping={hf['attn_logit_softcapping']}: transformers' Gemma 3 does "
                      "not cap its attention scores (only Gemma 2 does), so neither does pyllm", stacklevel=3)
    types = _gemma_layer_types(hf, "gemma3_text", unsupported, [  # transformers 4's: every pattern-th layer full
        "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(n_layers)])
    params = hf.get("rope_parameters") or {}
    if params and hf.get("rope_scaling"):  # transformers 5 updates the full layers' parameters with it
        params = {**params, "full_attention": {**(params.get("full_attention") or {}), **hf["rope_scaling"]}}
    full, local = params.get("full_attention"), params.get("sliding_attention")
    if full is None:  # transformers 4: rope_theta, rope_scaling (full layers), rope_local_base_freq
        full = {**(hf.get("rope_scaling") or {"rope_type": "default"}), "rope_theta": hf.get("rope_theta", 1e6)}
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    full_type = full.get("rope_type", full.get("type", "default"))
    if full_type not in ("default", "linear") or local.get("rope_type", "default") != "default":
        raise NotImplementedError(f"gemma3_text RoPE {params or hf.get('rope_scaling')}: pyllm reads default or "
                                  "linear scaling in the full-attention layers, default in the sliding ones")
    window = hf.get("sliding_window")
    window_layers = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else None
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layers=n_layers,
                       n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or None,
                       dim=hf["hidden_size"], head_dim=hf.get("head_dim") or None, mlp_hidden=hf["intermediate_size"],
                       mlp="geglu", tie_embeddings=hf.get("tie_word_embeddings", True),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=full["rope_theta"],
                       rope_scaling={"rope_type": "linear", "factor": full["factor"]} if full_type == "linear" else None,
                       local_rope_theta=local["rope_theta"] if window_layers else None, qk_norm=True, sandwich_norm=True,
                       embed_scale=True, norm_offset=1.0, softmax_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
                       sliding_window=window if window_layers else None, window_layers=window_layers or None,
                       # (null in Gemma 3's checkpoints; transformers' Gemma3ForCausalLM caps its logits where the
                       # config says: it had been refused)
                       final_softcap=hf.get("final_logit_softcapping") or None)


def _hf_yarn(hf: dict, rope: dict) -> dict:
    """ModelConfig.rope_scaling of a YaRN config, resolved as transformers 5 resolves it
    (_compute_yarn_parameters, standardize_rope_params): the original context a top-level
    original_max_position_embeddings, else rope's, else max_position_embeddings; factor, where null,
    max_position_embeddings over it (DeepSeek-V3's); attention_factor, where not given, YaRN's
    0.1 ln(factor) + 1, or the ratio of its mscale and mscale_all_dim forms; beta_fast 32, beta_slow 1."""
    if "factor" not in rope:  # (null is DeepSeek-V3's form; left out, transformers refuses the config)
        raise ValueError(f"YaRN RoPE scaling needs factor (null: max_position_embeddings over the original "
                         f"context); the config has {rope}")
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
        or hf["max_position_embeddings"]
    factor = rope.get("factor") or hf["max_position_embeddings"] / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original),
            "attention_factor": float(attention), "beta_fast": float(rope.get("beta_fast") or 32),
            "beta_slow": float(rope.get("beta_slow") or 1), "truncate": bool(rope.get("truncate", True))}


def _hf_longrope(hf: dict, rope: dict) -> dict:
    """ModelConfig.rope_scaling of a LongRoPE config (transformers' _compute_longrope_parameters):
    the attention factor from factor, or else from max / original positions, when not given."""
    # transformers 5 (standardize_rope_params) gives a top-level original_max_position_embeddings priority
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if not original or "short_factor" not in rope or "long_factor" not in rope:
        raise ValueError(f"LongRoPE needs short_factor, long_factor and original_max_position_embeddings; got {rope}")
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": list(rope["short_factor"]), "long_factor": list(rope["long_factor"]),
            "attention_factor": float(attention), "original_max_position_embeddings": int(original)}


def _smollm3_rope_layers(hf: dict) -> list[int]:
    """SmolLM3's no_rope_layers: 1 where a layer uses RoPE (transformers' default: all but every 4th)."""
    n, every = hf["num_hidden_layers"], hf.get("no_rope_layer_interval", 4)
    return hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]


# The LLaMA-shaped decoders config_from_hf reads (besides gpt2).
HF_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "mixtral", "qwen3_moe", "olmoe",
               "qwen2_moe", "granite", "granitemoe")
# The kinds whose transformers class reads config.attention_bias / mlp_bias (5.25's; the others'
# projections have no such flag, and a config.json that sets it anyway loads there as without)
HF_READ_ATTENTION_BIAS = ("llama", "qwen3", "smollm3", "olmo2", "qwen3_moe", "olmoe", "granite", "granitemoe")
HF_READ_MLP_BIAS = ("llama", "smollm3", "granite")


def _hf_sliding_window(hf: dict, kind: str, n_layers: int) -> tuple[int | None, list[int] | None]:
    """(sliding_window, window_layers) as transformers' modeling code reads a config.json: Mistral's
    (and Mixtral's) window is used in every layer whenever it is set, Qwen3-MoE's in every layer with
    use_sliding_window; Qwen2 / Qwen3 / SmolLM3 use theirs only with
    use_sliding_window, in the layers layer_types marks "sliding_attention" (without layer_types:
    Qwen's layers from max_window_layers on, SmolLM3's layers without RoPE). LLaMA and OLMo have none."""
    types = hf.get("layer_types")
    if types is not None and (len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}):
        raise NotImplementedError(f"{kind} with layer_types={types!r}: pyllm's layers use full or sliding-window "
                                  "attention, one type per layer")
    window = hf.get("sliding_window")
    if kind in ("llama", "olmo2", "olmoe"):
        if window or (types and "sliding_attention" in types):
            raise NotImplementedError(f"{kind} with sliding_window={window!r} / layer_types: transformers' {kind} "
                                      "has no sliding window; is this another model_type?")
        return None, None
    if kind in ("mistral", "phi3", "mixtral"):  # every layer
        if kind == "mistral" and "sliding_window" not in hf:
            window = 4096  # MistralConfig's default
        return window or None, None
    if not (hf.get("use_sliding_window") and window):
        return None, None
    if kind == "qwen3_moe":  # every layer, when used
        return window, None
    if types is None:
        if kind == "qwen2_moe":  # transformers 5 derives every other layer below max_window_layers, 4 Qwen2's rule
            raise NotImplementedError("qwen2_moe with use_sliding_window and no layer_types: transformers 4 and 5 "
                                      "put its windows on different layers; give config.json the layer_types meant")
        if kind == "smollm3":
            types = ["full_attention" if r else "sliding_attention" for r in _smollm3_rope_layers(hf)]
        else:
            types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                     for i in range(n_layers)]
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return (window, layers) if layers else (None, None)


# GPT-2's module names -> LLM's (its Conv1D weights are stored transposed).
GPT2_NAMES = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
              "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}


def hf_layer_norms(kind: str) -> dict:
    """A LLaMA-shaped Hugging Face layer's norms -> LLM's block norms (q / k norms apart)."""
    if kind == "olmo2":  # after the sublayers only
        return {"post_attention_layernorm": "attn_out_norm", "post_feedforward_layernorm": "mlp_out_norm"}
    if kind in GEMMA_KINDS:  # before and after both sublayers
        return {"input_layernorm": "norm1", "post_attention_layernorm": "attn_out_norm",
                "pre_feedforward_layernorm": "norm2", "post_feedforward_layernorm": "mlp_out_norm"}
    return {"input_layernorm": "norm1", "post_attention_layernorm": "norm2"}


def state_from_hf(hf_state: dict, cfg: ModelConfig, kind: str) -> dict:
    """Renames (and, for GPT-2's Conv1D weights, transposes) a Hugging Face state dict into LLM's:
    q, k, v projections stacked into qkv and gate, up into gate_up, as Attention and SwiGLUMLP
    hold them."""
    if kind == "gemma3":  # the language model of a multimodal checkpoint; the vision tower stays behind
        prefixes = ("language_model.model.", "model.language_model.", "language_model.")
        hf_state = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in hf_state.items()
                    if k.startswith(prefixes) or k == "lm_head.weight"}
        kind = "gemma3_text"
    hf_state = _ReadNames((k.removeprefix("transformer.").removeprefix("model."), v) for k, v in hf_state.items())
    state = {}
    if kind == "gpt2":
        state["tok_emb.weight"], state["pos_emb.weight"] = hf_state["wte.weight"], hf_state["wpe.weight"]
        for i in range(cfg.n_layers):
            for theirs, ours in GPT2_NAMES.items():
                weight = hf_state[f"h.{i}.{theirs}.weight"]
                state[f"blocks.{i}.{ours}.weight"] = weight if theirs.startswith("ln") else weight.t()  # Conv1D: (in, out)
                state[f"blocks.{i}.{ours}.bias"] = hf_state[f"h.{i}.{theirs}.bias"]
        state["norm_f.weight"], state["norm_f.bias"] = hf_state["ln_f.weight"], hf_state["ln_f.bias"]
    else:
        # Gemma's norms scale by (1 + w), which transformers computes in fp32 (`1.0 + weight.float()`):
        # kept as w under norm_offset=1. Folded into the weight for a config without it (a LLaMA-shaped
        # one), in fp32: folded in a bf16 checkpoint's own dtype, 1 + w had been up to 2^-9 off.
        fold = (lambda w: w.to(torch.promote_types(w.dtype, torch.float32)) + 1.0) if (  # noqa: E731
            kind in GEMMA_KINDS and not cfg.norm_offset) else (lambda w: w)
        state["tok_emb.weight"], state["norm_f.weight"] = hf_state["embed_tokens.weight"], fold(hf_state["norm.weight"])
        for i in range(cfg.n_layers):
            layer = lambda name: hf_state[f"layers.{i}.{name}.weight"]  # noqa: E731
            block = f"blocks.{i}."
            for theirs, ours in hf_layer_norms(kind).items():
                state[block + ours + ".weight"] = fold(layer(theirs))
            if kind == "phi3":  # already stacked as ours: [q; k; v] and [gate; up]
                state[block + "attn.qkv.weight"] = layer("self_attn.qkv_proj")
            else:
                state[block + "attn.qkv.weight"] = torch.cat([layer(f"self_attn.{x}_proj") for x in "qkv"])
            if cfg.qkv_bias:
                state[block + "attn.qkv.bias"] = torch.cat([hf_state[f"layers.{i}.self_attn.{x}_proj.bias"] for x in "qkv"])
            state[block + "attn.proj.weight"] = layer("self_attn.o_proj")
            if cfg.qk_norm:
                state[block + "attn.q_norm.weight"] = fold(layer("self_attn.q_norm"))
                state[block + "attn.k_norm.weight"] = fold(layer("self_attn.k_norm"))
            if cfg.n_experts:
                state.update({block + k: v for k, v in experts_from_hf(hf_state, i, cfg, kind).items()})
                continue
            state[block + "mlp.gate_up.weight"] = (layer("mlp.gate_up_proj") if kind == "phi3" else
                                                   torch.cat([layer("mlp.gate_proj"), layer("mlp.up_proj")]))
            state[block + "mlp.down.weight"] = layer("mlp.down_proj")
    if not cfg.tie_embeddings:  # a sequence classifier has none: its embeddings (the score head computes)
        if "lm_head.weight" not in hf_state and not cfg.num_labels:
            raise ValueError("the checkpoint has no lm_head.weight and its config.json does not tie the output layer "
                             "to the embeddings (tie_word_embeddings: false, or left out for a kind whose default is false)")
        state["lm_head.weight"] = hf_state.get("lm_head.weight", state["tok_emb.weight"])
    if cfg.num_labels:
        state["score.weight"] = hf_state["score.weight"]
    unused = sorted(k for k in hf_state if k not in hf_state.read and not HF_UNUSED_BY_DESIGN.search(k)
                    and not (k == "lm_head.weight" and cfg.tie_embeddings))
    if unused:  # transformers leaves them out too, with a warning: a model of this config has no place for them
        warnings.warn(f"{len(unused)} tensors of the checkpoint are not used by a model of its config.json: "
                      f"{', '.join(unused[:6])}{', ...' if len(unused) > 6 else ''} (as transformers, which leaves them "
                      "out with a warning too; weights of a part the config leaves out, such as attention_bias or "
                      "mlp_bias false beside bias tensors, were trained for another function)", stacklevel=3)
    return state


class _ReadNames(dict):
    """A state dict that records the names read from it by item or get (state_from_hf's check that
    every tensor of a checkpoint found its place)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        try:
            return super().__getitem__(name)
        except KeyError:  # (a bare KeyError of a prefix-stripped name had said nothing of the checkpoint)
            raise ValueError(f"the checkpoint has no tensor {name!r} (under its 'model.' / 'transformer.' prefix), "
                             "which a model of its config.json needs: a truncated or differently named "
                             "checkpoint, or a config.json of another model") from None

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)


# Checkpoint tensors no model reads: buffers older transformers saved (RoPE's inverse frequencies,
# GPT-2's causal mask and its masked-score constant), recomputed at load.
HF_UNUSED_BY_DESIGN = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


# The checkpoints' names of an expert's gate, up and down projections.
HF_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                   "olmoe": ("gate_proj", "up_proj", "down_proj"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}


def experts_from_hf(hf_state: dict, layer: int, cfg: ModelConfig, kind: str) -> dict:
    """A MoE layer's router and experts (names under the block) from a Hugging Face state dict
    (its "model." dropped): each expert's projections stacked into MoEMLP's gate_up (E, 2 * hidden,
    C) and down (E, C, hidden), or transformers 5's fused gate_up_proj / down_proj taken as they are."""
    moe = f"layers.{layer}.{HF_MOE[kind]}."
    if kind == "mixtral" and moe + "gate.weight" not in hf_state and f"layers.{layer}.mlp.gate.weight" in hf_state:
        moe = f"layers.{layer}.mlp."  # transformers 5's own names (save_original_format=False, PEFT, offloading)
    if kind == "granitemoe":  # its own names, the experts already stacked as ours (transformers 5's: fused, as the others')
        if moe + "input_linear.weight" in hf_state:
            return {"mlp.router.weight": hf_state[moe + "router.layer.weight"],
                    "mlp.gate_up": hf_state[moe + "input_linear.weight"], "mlp.down": hf_state[moe + "output_linear.weight"]}
        return {"mlp.router.weight": hf_state[moe + "router.weight"],
                "mlp.gate_up": hf_state[moe + "experts.gate_up_proj"], "mlp.down": hf_state[moe + "experts.down_proj"]}
    out = {"mlp.router.weight": hf_state[moe + "gate.weight"]}
    if cfg.shared_expert_hidden:  # Qwen2-MoE's
        shared = lambda name: hf_state[f"{moe}shared_expert.{name}.weight"]  # noqa: E731
        out["mlp.shared.gate_up.weight"] = torch.cat([shared("gate_proj"), shared("up_proj")])
        out["mlp.shared.down.weight"], out["mlp.shared_gate.weight"] = shared("down_proj"), hf_state[moe + "shared_expert_gate.weight"]
    if moe + "experts.gate_up_proj" in hf_state:
        out["mlp.gate_up"], out["mlp.down"] = hf_state[moe + "experts.gate_up_proj"], hf_state[moe + "experts.down_proj"]
        return out
    gate, up, down = HF_EXPERT_NAMES[kind]
    expert = lambda e, name: hf_state[f"{moe}experts.{e}.{name}.weight"]  # noqa: E731
    out["mlp.gate_up"] = torch.stack([torch.cat([expert(e, gate), expert(e, up)]) for e in range(cfg.n_experts)])
    out["mlp.down"] = torch.stack([expert(e, down) for e in range(cfg.n_experts)])
    return out


def experts_to_hf(state: dict, block: str, layer: int, kind: str) -> dict:
    """experts_from_hf's inverse, in the hub checkpoints' per-expert names (which transformers 4 and
    5, vLLM and llama.cpp all read)."""
    moe = f"model.layers.{layer}.{HF_MOE[kind]}."
    if kind == "granitemoe":
        return {moe + "router.layer.weight": state[block + "mlp.router.weight"],
                moe + "input_linear.weight": state[block + "mlp.gate_up"], moe + "output_linear.weight": state[block + "mlp.down"]}
    gate, up, down = HF_EXPERT_NAMES[kind]
    out = {moe + "gate.weight": state[block + "mlp.router.weight"]}
    if block + "mlp.shared_gate.weight" in state:  # Qwen2-MoE's shared expert
        out[moe + "shared_expert.gate_proj.weight"], out[moe + "shared_expert.up_proj.weight"] = \
            state[block + "mlp.shared.gate_up.weight"].chunk(2)
        out[moe + "shared_expert.down_proj.weight"] = state[block + "mlp.shared.down.weight"]
        out[moe + "shared_expert_gate.weight"] = state[block + "mlp.shared_gate.weight"]
    for e, (gate_up, down_w) in enumerate(zip(state[block + "mlp.gate_up"], state[block + "mlp.down"])):
        out[f"{moe}experts.{e}.{gate}.weight"], out[f"{moe}experts.{e}.{up}.weight"] = gate_up.chunk(2)
        out[f"{moe}experts.{e}.{down}.weight"] = down_w
    return out


def hf_config_of(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json for a model pyllm trained itself: LlamaForCausalLM (Mistral's
    windowed attention when every layer has the window; Mixtral's with experts; Qwen3's with q/k
    norms per head) or GPT2LMHeadModel, when one computes it."""
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    # What GPT-2's config cannot say must be at its default: these had been dropped from the export
    # silently (a window, q/k norms, a softmax scale, caps, multipliers: transformers' logits then
    # differed from pyllm's by 7-100%).
    if (cfg.norm, cfg.positions, cfg.bias, cfg.parallel_block, cfg.head_dim) == (
            "layernorm", "learned", True, False, cfg.dim // cfg.n_heads) and cfg.mlp in GELU_MLPS \
            and cfg.n_kv_heads == cfg.n_heads:
        defaults = ModelConfig()
        extra = [name for name in ("qk_norm", "sliding_window", "window_layers", "nope_layers", "sandwich_norm",
                                   "pre_norm", "embed_scale", "embed_multiplier", "residual_multiplier",
                                   "logits_scaling", "softmax_scale", "attn_softcap", "final_softcap", "n_experts")
                 if getattr(cfg, name) != getattr(defaults, name)]
        if extra:
            raise NotImplementedError(f"to_hf: a GPT-2-shaped model with {', '.join(extra)} has no GPT-2 config "
                                      "(GPT2LMHeadModel would compute another function)")
        return dict(common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=cfg.block_size,
                    n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.mlp_hidden,
                    activation_function="gelu" if cfg.mlp == "gelu_exact" else "gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)
    # q/k norms per head (Qwen3's), on a model otherwise LLaMA's with full attention: Qwen3ForCausalLM
    qwen3 = cfg.qk_norm and not cfg.qk_norm_all_heads and not cfg.sliding_window and not cfg.n_experts
    llama = {"norm": "rmsnorm", "mlp": "swiglu", "positions": "rope", "bias": False, "qkv_bias": False,
             "parallel_block": False, "qk_norm": False, "nope_layers": None, "rotary_dim": None, "sandwich_norm": False,
             "embed_scale": False, "softmax_scale": None, "local_rope_theta": None, "window_layers": None,
             "pre_norm": True, "embed_multiplier": None, "residual_multiplier": None, "logits_scaling": None,
             "attn_softcap": None, "final_softcap": None, "norm_offset": 0.0}
    # (what a LLaMA config cannot say, named in the refusal)
    unlike = [f"{name}={getattr(cfg, name)!r}" for name, value in llama.items()
              if (getattr(cfg, name) and not qwen3 if name == "qk_norm" else getattr(cfg, name)) != value]
    plain = not unlike
    if cfg.window_layers is not None and cfg.sliding_window and plain is False and (
            cfg.norm, cfg.mlp, cfg.positions, cfg.bias) == ("rmsnorm", "swiglu", "rope", False):
        raise NotImplementedError("to_hf: a sliding window on some layers only (window_layers) has no LLaMA or "
                                  "Mistral config (Mistral's window is on every layer); give the hf_config of the "
                                  "checkpoint it was read from")
    if (cfg.rope_scaling or {}).get("rope_type", "llama3") != "llama3":
        unlike.append(f"rope_scaling={cfg.rope_scaling!r}")
    if unlike:
        raise NotImplementedError(f"to_hf: this model is neither LLaMA- nor GPT-2-shaped ({', '.join(unlike)} has no "
                                  "LLaMA config); give the hf_config of the checkpoint it was read from (a model "
                                  "trained from scratch so is not exported)")
    if cfg.shared_expert_hidden:
        raise NotImplementedError("to_hf: a shared expert is Qwen2-MoE's, which pyllm exports only with the "
                                  "hf_config of the checkpoint it was read from")
    if cfg.n_experts and not cfg.norm_topk_prob:
        raise NotImplementedError("to_hf: experts whose weights are not renormalized over the chosen ones "
                                  "(norm_topk_prob=False) are no Mixtral; give the hf_config of the checkpoint "
                                  "it was read from")
    kind = "mixtral" if cfg.n_experts else "mistral" if cfg.sliding_window else "qwen3" if qwen3 else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} if cfg.rope_scaling is None else {
        **cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    hf = dict(common, model_type=kind, architectures=[f"{kind.capitalize()}ForCausalLM"], hidden_size=cfg.dim,
              intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size,
              rms_norm_eps=cfg.norm_eps, hidden_act="silu", rope_theta=cfg.rope_theta, rope_parameters=rope,
              rope_scaling=cfg.rope_scaling and rope, attention_bias=False, mlp_bias=False)
    if kind in ("mistral", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window
    if kind == "qwen3":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if kind == "mixtral":
        hf.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token, router_jitter_noise=0.0,
                  # output_router_logits false, as published Mixtral configs: true, transformers' generate on
                  # a padded batch had failed in its load-balancing loss; the coefficient pyllm trained
                  # with kept for from_hf (pyllm_router_aux_loss)
                  router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False,
                  **({"pyllm_router_aux_loss": True} if cfg.router_aux_loss_coef > 0 else {}))
    return hf


# Hugging Face model types whose layers PEFT names model.layers.{i}.self_attn.* / mlp.* (the kinds
# lora_state_to_peft writes adapters for; GPT-2's Conv1D layers and Gemma 3's multimodal wrapper not).
PEFT_KINDS = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "gemma2", "gemma3_text", "phi3", "mixtral",
              "qwen3_moe", "olmoe", "qwen2_moe", "granite", "granitemoe")


def merge_peft_adapter(hf_state: dict, adapter) -> dict:
    """Adds a PEFT LoRA adapter's updates, scale * B A (scale alpha / r, or alpha / sqrt(r) with
    rsLoRA; r and alpha per module where rank_pattern / alpha_pattern say), to the Hugging Face state
    dict's weights they were trained on, in place (in fp32 at least). What would need more than a
    weight update is refused: DoRA, trained biases or whole modules, embedding adapters, Conv1D
    (GPT-2) layouts. Returns the updates of a MoE's experts (target_parameters gate_up_proj /
    down_proj, with or without a prefix, PEFT's ParamWrapper on transformers 5's fused experts) by
    pyllm's names, blocks.{i}.mlp.gate_up / down, (E, out, in) each, and of its router
    (blocks.{i}.mlp.router.weight; gate.weight), for the caller to add in pyllm's layout (the
    checkpoint may hold them under the hub's names), and the output layer's (target_modules lm_head) as lm_head.weight: with
    tied embeddings PeftModel changes the output layer alone (the caller unties them), and a tied
    checkpoint's stored lm_head.weight is not what its model computes with."""
    from safetensors.torch import load_file

    from pyllm.nn import merge_lora

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise ValueError(f"{adapter}: not a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = list(config.get("target_parameters") or ())
    # the experts' and the router's parameters, however named: PEFT 0.21's all-linear on transformers
    # 5's MoEs names them gate_up_proj, down_proj, gate.weight
    experts = [p for p in PEFT_EXPERT_PARAMETERS if any(t == p.split(".")[-1] or t.endswith("." + p.split(".")[-1])
                                                        for t in targets)]
    router_parameter = any(t == "gate.weight" or t.endswith(".gate.weight") for t in targets)
    others = [t for t in targets if t.split(".")[-1] not in ("gate_up_proj", "down_proj")
              and not (t == "gate.weight" or t.endswith(".gate.weight"))]
    unsupported = {"peft_type": config.get("peft_type", "LORA") != "LORA", "use_dora": config.get("use_dora"),
                   "bias": config.get("bias", "none") != "none", "modules_to_save": config.get("modules_to_save"),
                   "fan_in_fan_out": config.get("fan_in_fan_out"), "target_parameters": others,
                   # an activated LoRA acts from its invocation tokens on only (PEFT refuses to merge it), and
                   # layer_replication rebuilds the stack of layers the adapter's indices refer to
                   "alora_invocation_tokens": config.get("alora_invocation_tokens"),
                   "layer_replication": config.get("layer_replication")}
    refused = [name for name, bad in unsupported.items() if bad]
    if refused:
        raise NotImplementedError(f"{adapter}: adapter_config.json sets {', '.join(refused)}; pyllm merges plain "
                                  "LoRA adapters of linear layers only (peft_type LORA, no DoRA, bias none, no "
                                  "modules_to_save, no fan_in_fan_out, target_parameters of a MoE's experts "
                                  f"({', '.join(PEFT_EXPERT_PARAMETERS)}) and router (gate.weight) alone)")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def rank_scale(module: str) -> tuple[int, float]:
        """A module's (or parameter's) rank and scale: the first pattern whose regex matches the end
        of its name, else r and lora_alpha (PEFT's get_pattern_key)."""
        match = lambda patterns, default: next((v for k, v in patterns.items()  # noqa: E731
                                                if re.match(rf"(.*\.)?({k})$", module)), default)
        r, a = match(rank_pattern, config["r"]), match(alpha_pattern, config["lora_alpha"])
        return r, (a / math.sqrt(r) if config.get("use_rslora") else a / r)

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model."
    for key in tensors:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) and not key.endswith("lm_head.base_layer.weight"):
            what = ("an adapter of the token embeddings (target_modules embed_tokens), which pyllm does not merge"
                    if "embed_tokens" in key or "lora_embedding_" in key else "no LoRA A / B matrix of a linear layer")
            raise NotImplementedError(f"{adapter}: {key} is {what}")
        pair = key[:-len("A.weight")] + "B.weight" if key.endswith(".lora_A.weight") else key[:-len("B.weight")] + "A.weight"
        if key.endswith((".lora_A.weight", ".lora_B.weight")) and pair not in tensors:
            raise ValueError(f"{adapter}: {key} has no {pair.rsplit('.', 2)[-2]} to go with it")
        if key.endswith((".lora_A.weight", ".lora_B.weight")) and (
                tensors[key].dim() != 2 or not tensors[key].is_floating_point()):
            raise ValueError(f"{adapter}: {key} is a {tensors[key].dtype} tensor of shape {tuple(tensors[key].shape)}, "
                             "not a float matrix")
    expert_updates = {}
    for key in tensors:
        if re.fullmatch(r"(?:base_model\.model\.)?lm_head\.base_layer\.weight", key):  # PEFT keeps the head it adapted
            expert_updates["lm_head.base_layer"] = tensors[key]  # (the caller checks it is the model's)
            continue
        if not key.endswith(".lora_A.weight"):
            continue  # (a B: with its A; anything else is refused below)
        acc = torch.promote_types(tensors[key].dtype, torch.float32)
        a, b = tensors[key].to(acc), tensors[key[:-len("lora_A.weight")] + "lora_B.weight"].to(acc)
        found = re.fullmatch(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\."
                             r"(base_layer\.)?lora_A\.weight", key) if experts else None
        if found:  # PEFT wraps the experts' parameters in their order, gate_up_proj innermost
            param = experts[0] if found.group(3) or len(experts) == 1 else experts[1]
            rank, scale = rank_scale(f"model.layers.{found.group(1)}.{found.group(2)}.{param}")
            E = a.shape[0] // rank  # A (E r, in), B (out, r E): expert e's column j at j E + e
            update = torch.einsum("ore,eri->eoi", b.view(b.shape[0], rank, E), a.view(E, rank, a.shape[1])) * scale
            expert_updates[f"blocks.{found.group(1)}.mlp.{param.removeprefix('experts.').removesuffix('_proj')}"] = update
            continue
        found = re.fullmatch(r"(?:base_model\.model\.)?(model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate)\."
                             r"lora_A\.weight", key)
        if found:  # a MoE's router (transformers 5's gate.weight parameter, or 4's gate Linear), by pyllm's name
            # (PEFT matches a parameter's patterns against its name, gate.weight; a Linear's against the module's)
            name = found.group(1) + (".weight" if router_parameter else "")
            rank, scale = rank_scale(name)
            if a.shape[0] != rank or b.shape[1] != rank:
                raise ValueError(f"{adapter}: {name}'s A {tuple(a.shape)} and B {tuple(b.shape)} are not of the rank "
                                 f"{rank} its adapter_config.json gives it")
            expert_updates[f"blocks.{found.group(2)}.mlp.router.weight"] = (b @ a) * scale
            continue
        module = key[len(prefix) if key.startswith(prefix) else 0:-len(".lora_A.weight")]
        (rank, scale), name = rank_scale(module), module + ".weight"
        if a.shape[0] != rank or b.shape[1] != rank:  # (the scale is alpha / r: another rank is another update)
            raise ValueError(f"{adapter}: {module}'s A {tuple(a.shape)} and B {tuple(b.shape)} are not of the rank "
                             f"{rank} its adapter_config.json gives it")
        if name == "lm_head.weight":
            expert_updates[name] = (b @ a) * scale
            continue
        if name not in hf_state:
            raise ValueError(f"{adapter}: {key} updates {name}, which the model does not have")
        hf_state[name] = merge_lora(hf_state[name].float(), tensors[key], tensors[key[:-len("lora_A.weight")] + "lora_B.weight"],
                                    scale)
    return expert_updates


# The expert parameters a PEFT adapter may target (target_parameters) on transformers 5's MoEs, in
# the order their wrappers nest (the first innermost).
PEFT_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


def lora_state_to_peft(state: dict, cfg: ModelConfig, kind: str) -> tuple[dict, list[str], list[str]]:
    """The LoRA updates of a state dict (LLM.add_lora) as a PEFT adapter for the Hugging Face model
    of this kind: (adapter_model.safetensors' tensors, target_modules, target_parameters). Exact: a
    fused update (alpha / r) B A of [q; k; v] (or [gate; up]) is PEFT's q_proj, k_proj, v_proj updates
    with the same A and B's row blocks (Phi-3 keeps its fused qkv_proj / gate_up_proj); per-projection
    updates (add_lora's targets) are PEFT's as they are (not for Phi-3's fused layers: refused). A
    MoE's expert updates are PEFT's ParamWrapper's on transformers 5's fused experts (target_parameters
    experts.gate_up_proj / experts.down_proj): A (E, r, in) as one (E * r, in) matrix, B (E, out, r)
    as (out, r * E) with expert e's column j at j * E + e (its layout), the down projection's wrapper
    around the gate-up one's when both are adapted (PEFT wraps them in the experts' parameter order)."""
    if kind not in PEFT_KINDS:
        raise ValueError(f"no PEFT adapter for model_type {kind!r} (adapters are written for {', '.join(PEFT_KINDS)})")
    H, H_kv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out, targets = {}, set()

    def put(layer: int, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        out[f"base_model.model.model.layers.{layer}.{module}.lora_A.weight"] = a.clone()  # one copy per module
        out[f"base_model.model.model.layers.{layer}.{module}.lora_B.weight"] = b.contiguous()
        targets.add(module.split(".")[-1])

    for i in range(cfg.n_layers):
        for ours, fused, names in (("attn.qkv", "self_attn.qkv_proj", ("q", "k", "v")),
                                   ("mlp.gate_up", "mlp.gate_up_proj", ("gate", "up")),
                                   ("attn.proj", "self_attn.o_proj", ("o",)), ("mlp.down", "mlp.down_proj", ("down",))):
            key = f"blocks.{i}.{ours}."
            if key + "lora_a" not in state:
                continue  # not a target
            a, b, parts = state[key + "lora_a"], state[key + "lora_b"], state.get(key + "lora_parts")
            module = lambda name: ("self_attn." if name in ("q", "k", "v", "o") else "mlp.") + f"{name}_proj"  # noqa: E731
            if len(names) == 1:
                put(i, module(names[0]), a, b)
            elif parts is None and kind == "phi3":
                put(i, fused, a, b)
            elif parts is None:  # one update over the fused output: the same A for each projection
                sizes = [H * D, H_kv * D, H_kv * D] if len(names) == 3 else [b.shape[0] // 2] * 2
                for name, b_part in zip(names, b.split(sizes)):
                    put(i, module(name), a, b_part)
            elif kind == "phi3":
                raise ValueError("Phi-3 fuses qkv_proj and gate_up_proj: PEFT gives each one update, and a "
                                 "per-projection LoRA run (targets) has one per projection; train it without "
                                 "--lora-targets to export an adapter")
            else:
                rank, row, k = b.shape[1], 0, 0
                for name, (rows, adapted) in zip(names, parts.tolist()):
                    if adapted:
                        put(i, module(name), a[k * rank:(k + 1) * rank], b[row:row + rows])
                        row, k = row + rows, k + 1
    parameters = []
    for i in range(cfg.n_layers):
        adapted = [name for name in ("gate_up", "down") if f"blocks.{i}.mlp.{name}_lora_a" in state]
        experts = f"base_model.model.model.layers.{i}.{'block_sparse_moe' if kind == 'granitemoe' else 'mlp'}.experts."
        for name in adapted:
            a, b = state[f"blocks.{i}.mlp.{name}_lora_a"], state[f"blocks.{i}.mlp.{name}_lora_b"]  # (E, r, in), (E, out, r)
            module = experts + ("base_layer." if name == "gate_up" and len(adapted) == 2 else "")
            out[module + "lora_A.weight"] = a.reshape(-1, a.shape[2]).clone()
            out[module + "lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()
            parameters.append(f"experts.{name}_proj")
    if not out:
        raise ValueError("the state dict has no LoRA updates: train with --lora-rank")
    return out, sorted(targets), sorted(set(parameters))


def state_to_hf(state: dict, cfg: ModelConfig, kind: str) -> dict:
    """state_from_hf's inverse: LLM's state dict in a Hugging Face model's names and layouts."""
    out = {}
    if kind == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = state["tok_emb.weight"], state["pos_emb.weight"]
        for i in range(cfg.n_layers):
            for theirs, ours in GPT2_NAMES.items():
                weight = state[f"blocks.{i}.{ours}.weight"]
                out[f"transformer.h.{i}.{theirs}.weight"] = weight if theirs.startswith("ln") else weight.t()
                out[f"transformer.h.{i}.{theirs}.bias"] = state[f"blocks.{i}.{ours}.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["norm_f.weight"], state["norm_f.bias"]
        if not cfg.tie_embeddings and not cfg.num_labels:
            out["lm_head.weight"] = state["lm_head.weight"]
        if cfg.num_labels:  # GPT2ForSequenceClassification: the score head instead of the LM head
            out["score.weight"] = state["score.weight"]
        return out
    # Gemma's (1 + w): unfolded where the model holds it folded (a run saved before norm_offset)
    norm = (lambda w: w - 1.0) if kind in GEMMA_KINDS and not cfg.norm_offset else (lambda w: w)  # noqa: E731
    H, H_kv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out["model.embed_tokens.weight"], out["model.norm.weight"] = state["tok_emb.weight"], norm(state["norm_f.weight"])
    for i in range(cfg.n_layers):
        block, layer = f"blocks.{i}.", f"model.layers.{i}."
        for theirs, ours in hf_layer_norms(kind).items():
            out[layer + theirs + ".weight"] = norm(state[block + ours + ".weight"])
        if cfg.qk_norm:
            out[layer + "self_attn.q_norm.weight"] = norm(state[block + "attn.q_norm.weight"])
            out[layer + "self_attn.k_norm.weight"] = norm(state[block + "attn.k_norm.weight"])
        qkv, gate_up = state[block + "attn.qkv.weight"], state.get(block + "mlp.gate_up.weight")
        if kind == "phi3":
            out[layer + "self_attn.qkv_proj.weight"], out[layer + "mlp.gate_up_proj.weight"] = qkv, gate_up
        else:
            for name, w in zip("qkv", qkv.split([H * D, H_kv * D, H_kv * D])):
                out[layer + f"self_attn.{name}_proj.weight"] = w
            if cfg.qkv_bias:
                for name, b in zip("qkv", state[block + "attn.qkv.bias"].split([H * D, H_kv * D, H_kv * D])):
                    out[layer + f"self_attn.{name}_proj.bias"] = b
        out[layer + "self_attn.o_proj.weight"] = state[block + "attn.proj.weight"]
        if cfg.n_experts:
            out.update(experts_to_hf(state, block, i, kind))
            continue
        if kind != "phi3":
            out[layer + "mlp.gate_proj.weight"], out[layer + "mlp.up_proj.weight"] = gate_up.chunk(2)
        out[layer + "mlp.down_proj.weight"] = state[block + "mlp.down.weight"]
    if not cfg.tie_embeddings and not cfg.num_labels:
        out["lm_head.weight"] = state["lm_head.weight"]
    if cfg.num_labels:  # *ForSequenceClassification: the score head instead of the LM head
        out["score.weight"] = state["score.weight"]
    return out


def check_sampling(temperature, top_k, top_p, min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
                   min_new_tokens=0, typical_p=None, epsilon_cutoff=0.0, eta_cutoff=0.0) -> None:
    """ValueError for settings sample() cannot take: temperature a finite number >= 0 (a negative
    one would sample the reversed distribution), top_k None or an int >= 0 (0 or None: off, as
    transformers' GenerationConfig), top_p None or in [0, 1] (0 keeps the likeliest token alone),
    min_p None or in [0, 1] (None or 0: off), repetition_penalty a finite number > 0 (1: none; below
    1 favours repeats), typical_p None or in (0, 1] (None or 1: off), epsilon_cutoff and eta_cutoff in
    [0, 1) (0: off), as transformers' warpers take them; generation's no_repeat_ngram_size and
    min_new_tokens ints >= 0 (0: off)."""
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1 and not temperature.is_complex():
        temperature = float(temperature)  # (a 0-d tensor, as some loops keep it)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"sampling: temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if 0 < temperature < 1e-30:  # logits / t overflows fp32 to inf: NaN probabilities, torch.multinomial's error
        raise ValueError(f"sampling: temperature {temperature!r} is too small to divide fp32 logits by; give 0 for "
                         "greedy decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"sampling: top_k must be None or an int >= 0 (0 or None: no top-k), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 <= top_p <= 1):
        raise ValueError(f"sampling: top_p must be None or a number in [0, 1], got {top_p!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, numbers.Real) or not 0 <= min_p <= 1):
        raise ValueError(f"sampling: min_p must be None or a number in [0, 1], got {min_p!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, numbers.Real) \
            or not 0 < repetition_penalty < math.inf:
        raise ValueError(f"sampling: repetition_penalty must be a finite number > 0 (1: none), got "
                         f"{repetition_penalty!r}")
    if typical_p is not None and (isinstance(typical_p, bool) or not isinstance(typical_p, numbers.Real)
                                  or not 0 < typical_p <= 1):
        raise ValueError(f"sampling: typical_p must be None or a number in (0, 1] (1: off), got {typical_p!r}")
    for name, value in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"sampling: {name} must be a number in [0, 1) (0: off), got {value!r}")
    for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"generate: {name} must be an int >= 0 (0: off), got {value!r}")


def check_new_tokens(max_new_tokens, op: str) -> None:
    """ValueError unless max_new_tokens is an int >= 0 (0: nothing generated; transformers' generate
    refuses 0 as well as the rest)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"{op}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """tokens cut after the first of stops (which is kept), or all of them."""
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))]


def stop_ids(stop_tokens) -> set[int]:
    """stop_tokens as a set of ids: an int (transformers' eos_token_id form), an iterable of them, or
    None (none)."""
    if stop_tokens is None:
        return set()
    if isinstance(stop_tokens, torch.Tensor):
        if not _util.int_tensor(stop_tokens):
            raise TypeError(f"stop_tokens must hold int ids, got a {stop_tokens.dtype} tensor")
        return {int(t) for t in stop_tokens.reshape(-1).tolist()}
    if isinstance(stop_tokens, numbers.Integral) and not isinstance(stop_tokens, bool):
        return {int(stop_tokens)}
    ids = list(stop_tokens) if not isinstance(stop_tokens, (str, bytes)) and isinstance(stop_tokens, Iterable) else None
    if ids is None or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise TypeError(f"stop_tokens must be an int id or a sequence of them, got {stop_tokens!r}")
    return {int(t) for t in ids}


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, min_p: float | None = None, typical_p: float | None = None,
           epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else from softmax(logits / t)
    restricted to the top_k tokens, then to the smallest set whose probability reaches top_p, then
    to those at least min_p times as likely as the likeliest, then typical_p, epsilon_cutoff and
    eta_cutoff's sets (sampling_probs)."""
    check_sampling(temperature, top_k, top_p, min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff,
                   eta_cutoff=eta_cutoff)
    return _sample(logits, temperature, top_k, top_p, generator, _Cut(min_p, typical_p, epsilon_cutoff, eta_cutoff))


class _Cut(NamedTuple):
    """The warpers after top-k and top-p, in transformers' order: MinPLogitsWarper, TypicalLogitsWarper,
    EpsilonLogitsWarper, EtaLogitsWarper (None or 0: off; typical_p 1: off)."""
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0


def _sample(logits, temperature, top_k, top_p, generator, cut=None) -> torch.Tensor:
    """sample() for settings checked already (generation checks them once, not per token)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = _sampling_probs(logits, temperature, top_k, top_p, cut)  # (..., V), as argmax takes any leading shape
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None, typical_p: float | None = None,
                   epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0) -> torch.Tensor:
    """The distribution sample() draws from (temperature > 0), fp32, over the last dim of logits (..., V)."""
    check_sampling(temperature, top_k, top_p, min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff,
                   eta_cutoff=eta_cutoff)
    if temperature == 0:
        raise ValueError("sampling_probs: temperature 0 is greedy, no distribution: take the argmax")
    return _sampling_probs(logits, temperature, top_k, top_p, _Cut(min_p, typical_p, epsilon_cutoff, eta_cutoff))


def _penalize(logits, seen, penalty) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logits (B, V) of the ids seen (B, V) holds
    divided by penalty where positive, multiplied where negative (at most once an id), in fp32 as
    transformers' scores are (an fp64 model's too); seen None: logits as they are."""
    if seen is None:
        return logits
    logits = logits.float()
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


class _LogitRules:
    """What transformers' generate does to each row's scores before its warpers, in its order:
    RepetitionPenaltyLogitsProcessor (repetition_penalty, over the ids of the row's text so far),
    NoRepeatNGramLogitsProcessor (no_repeat_ngram_size n: an id that would end an n-gram the row's
    text already holds is banned) and MinNewTokensLengthLogitsProcessor (min_new_tokens: the stop
    ids banned until that many new tokens). Each row's text is its own prompt and new tokens (a
    left-padded batch's padding is no part of it, as for the penalty). Called on (B, V) logits it
    gives them ruled (fp32 once any rule applies, as transformers' scores); advance() adds each
    row's next token; fork() a copy to rule proposals ahead of the text (speculative decoding)."""

    def __init__(self, model: "LLM", rows, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 min_new_tokens: int = 0, stop=()):
        self.penalty, self.n, self.min_new, self.made = repetition_penalty, no_repeat_ngram_size, min_new_tokens, 0
        self.seen = model._seen_ids(rows, repetition_penalty)
        self.stop = sorted(stop_ids(stop)) if min_new_tokens else []
        self.active = self.seen is not None or bool(self.n) or bool(self.min_new and self.stop)
        self.texts = self.ends = None
        if self.n:  # per row: its text (host ints) and, for each (n - 1)-gram in it, the ids that followed it
            self.texts = [[int(t) for t in ids.tolist()] for ids in rows]
            self.ends = [{} for _ in self.texts]
            for text, ends in zip(self.texts, self.ends):
                for i in range(len(text) - self.n + 1):
                    self._add(ends, text, i)

    def _add(self, ends: dict, text: list, i: int) -> None:  # the n-gram text[i:i + n]
        key = tuple(text[i:i + self.n - 1])
        ends[key] = ends.get(key, ()) + (text[i + self.n - 1],)  # (a tuple: fork()'s shallow copy stays apart)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        logits = _penalize(logits, self.seen, self.penalty).float()
        V = logits.shape[-1]
        rows, ids = [], []
        if self.n:
            for b, (text, ends) in enumerate(zip(self.texts, self.ends)):
                if len(text) >= self.n - 1:
                    banned = [t for t in ends.get(tuple(text[len(text) - self.n + 1:]), ()) if t < V]
                    rows += [b] * len(banned)
                    ids += banned
        if self.made < self.min_new:
            stops = [t for t in self.stop if 0 <= t < V]
            for b in range(logits.shape[0]):
                rows += [b] * len(stops)
                ids += stops
        if ids:
            where = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
            logits = logits.index_put(where, torch.tensor(float("-inf"), device=logits.device))
        return logits

    def advance(self, tokens: torch.Tensor) -> "_LogitRules":
        """tokens (B,): each row's next token."""
        self.made += 1
        if self.seen is not None:
            self.seen.scatter_(1, tokens.view(-1, 1).to(self.seen.device), True)
        if self.n:
            for text, ends, t in zip(self.texts, self.ends, tokens.tolist()):
                text.append(int(t))
                if len(text) >= self.n:
                    self._add(ends, text, len(text) - self.n)
        return self

    def fork(self) -> "_LogitRules":
        other = copy.copy(self)
        if self.seen is not None:
            other.seen = self.seen.clone()
        if self.n:
            other.texts, other.ends = [list(t) for t in self.texts], [dict(e) for e in self.ends]
        return other


def _sampling_probs(logits, temperature, top_k, top_p, cut=None) -> torch.Tensor:
    cut = cut or _Cut()
    shape = logits.shape
    logits = logits.float().reshape(-1, shape[-1]) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # transformers' TopPLogitsWarper step for step: ascending, the tokens whose mass from the bottom
        # stays within 1 - top_p dropped, so the smallest top set reaching top_p is kept (with its
        # crossing token), the likeliest always (top_p 0: it alone), and equal probabilities at the
        # edge resolved as its sort resolves them. (A descending sum had dropped the crossing token
        # in ~1% of steps over a flat 32K vocabulary, by fp32 rounding, and kept other tied ids.)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if cut.min_p:  # transformers' MinPLogitsWarper (0: it drops nothing); the likeliest token is never below it
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < cut.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if cut.typical_p is not None and cut.typical_p < 1:
        # transformers' TypicalLogitsWarper (locally typical sampling, Meister et al. 2023) step for step:
        # the tokens by how far their surprisal lies from the entropy, kept up to the one whose mass
        # reaches typical_p (ties with it too), the nearest always
        normalized = logits.log_softmax(dim=-1)
        entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
        distance, order = torch.sort((-normalized - entropy).abs(), dim=-1, descending=False)
        last = (logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1) < cut.typical_p).sum(dim=1)
        last.clamp_(max=distance.shape[-1] - 1)
        drop = distance > distance.gather(1, last.view(-1, 1))
        drop[:, :1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if cut.epsilon_cutoff:  # transformers' EpsilonLogitsWarper (Hewitt et al. 2022): below epsilon dropped
        top = logits.amax(dim=-1, keepdim=True)  # (the likeliest kept)
        logits = logits.masked_fill((logits.softmax(dim=-1) < cut.epsilon_cutoff) & (logits < top), float("-inf"))
    if cut.eta_cutoff:  # EtaLogitsWarper: the cutoff min(eta, sqrt(eta) exp(-entropy)), as it computes it
        eta = torch.tensor(cut.eta_cutoff, device=logits.device)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        cutoff = torch.min(eta, torch.sqrt(eta) * torch.exp(-entropy))[..., None]
        top = logits.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill((logits.softmax(dim=-1) < cutoff) & (logits < top), float("-inf"))
    return logits.softmax(dim=-1).reshape(shape)


__all__ = ["ModelConfig", "PRESETS", "LLM", "sample"]
