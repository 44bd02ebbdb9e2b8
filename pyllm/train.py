"""The trainer: one loop (`train`), with its pieces beside it.

Pieces, in the order the loop uses them: TrainConfig; distributed setup; precision (autocast and
the fp16 loss scaler); the optimizer and its step; the learning-rate schedule; evaluation;
checkpoints (atomic, exact resume); logging (tqdm, log.jsonl, the loss plot).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pyllm.data import (PackedLoader, TokenLoader, has_documents, new_temp_file, read_header, read_rows,
                        remove_stale_temp_files)
from pyllm.model import LLM, ModelConfig, check_fields, lora_targets, save_weights
from pyllm.nn import (DPO_LOSSES, F_DIVERGENCE_LOSSES, F_DIVERGENCES, PREFERENCE_LOSSES, REFERENCE_FREE, orpo_log_odds,
                      preference_loss, sequence_logps)
from pyllm.ops import _util
from pyllm.optim import AdamW, DynamicLossScaler, Muon, MuonAdamW, ZeroAdamW, unscale_clip_check


# SAPO's gate temperatures for tokens of positive and of other advantages (Soft Adaptive Policy
# Optimization; TRL's sapo_temperature_pos / _neg defaults).
SAPO_TEMPERATURES = (1.0, 1.05)
# VESPO's gamma weighting phi(w) = e^lambda w^k e^(-lambda w) of a sample's ratio w: k and lambda for
# samples of advantage >= 0, then for the others (TRL's vespo_k_pos, _lambda_pos, _k_neg, _lambda_neg)
VESPO_GAMMA = (2.0, 3.0, 3.0, 2.0)


@dataclass
class TrainConfig:
    data_dir: str = ""  # folder holding train.bin and val.bin
    out_dir: str = "runs/main"
    preset: str = "tiny"
    init_from_hf: str = ""  # a Hugging Face checkpoint folder to start from (LLM.from_hf) instead of the preset
    init_from_run: str = ""  # a folder `pyllm train` wrote: start from its model.safetensors instead of the preset
    init_adapter: str = ""  # with init_from_hf: a PEFT LoRA adapter folder merged into its weights first
    lora_rank: int = 0  # > 0: train LoRA updates of this rank on the blocks' linear layers, every weight frozen
    lora_alpha: float = 0.0  # LoRA's alpha (updates scaled by alpha / rank); 0: 2 * lora_rank
    lora_targets: str = ""  # LoRA on these projections, each its own update (q,k,v,o,gate,up,down; all-linear; experts); "": every linear layer, fused ones one update
    lora_dropout: float = 0.0  # dropout on the LoRA updates' inputs (PEFT's lora_dropout)
    fused_loss: bool = False  # the loss by linear_cross_entropy: no (batch, seq, vocab) logits in memory
    z_loss: float = 0.0  # plus this times the mean logsumexp(logits)^2 (PaLM's z-loss, 1e-4 there; OLMo 2's 1e-5): pretraining and SFT
    loss_type: str = "nll"  # "dft": each target's loss times its probability, held constant (DFT; TRL's SFT loss_type): pretraining and SFT
    token_stats: bool = True  # log TRL's mean_token_accuracy and entropy (pretraining, SFT; DPO, KTO: with logits_*)
    preference: str = ""  # on preference pairs: dpo | ipo | hinge | simpo | orpo | kto | reward | TRL's other DPO loss types (DPO_LOSSES) ("": none)
    # the dpo family: more of its losses added (TRL's loss_type after its first; MPO's ["bco_pair"])
    preference_mix: list = field(default_factory=list)
    # each loss's weight, preference's then preference_mix's (TRL's loss_weights; sft's: sft_weight); []: 1 each
    preference_weights: list = field(default_factory=list)
    beta: float = 0.0  # the preference loss's beta (ORPO's lambda); 0: its usual value (PREFERENCE_BETA)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    label_smoothing: float = 0.0  # dpo, robust: the share of pairs taken to be mislabelled (conservative DPO); exo_pair's epsilon
    f_divergence: str = "reverse_kl"  # the dpo family: reverse_kl | forward_kl | js_divergence | alpha_divergence (f-DPO; TRL's f_divergence_type)
    f_alpha: float = 0.5  # f_divergence alpha_divergence's alpha (TRL's f_alpha_divergence_coef)
    discopop_tau: float = 0.05  # preference discopop: the log-ratio modulation's temperature (DiscoPOP's, TRL's default)
    ld_alpha: float | None = None  # the dpo family: LD-DPO's weight past a pair's shared length (TRL's); None: off
    desirable_weight: float = 1.0  # kto: the desirable examples' weight in the loss
    undesirable_weight: float = 1.0  # kto: the undesirable examples'
    kto_loss_type: str = "kto"  # kto: kto | apo_zero_unpaired (TRL's KTOConfig loss_type: no KL estimate, z = 0)
    center_rewards: float = 0.0  # reward: TRL's center_rewards_coefficient (times the mean of (chosen + rejected)^2)
    sft_weight: float = 0.0  # simpo, the dpo family (DPO_LOSSES): plus this times the chosen reply's NLL per token (RPO; TRL's loss_type "sft")
    # dpo and its family, kto: precomputed (once, before training) | lora-off (LoRA runs: each step, adapters off)
    # | model (each step, a frozen copy of the starting model)
    reference: str = "precomputed"
    teacher: str = ""  # distillation: a Hugging Face checkpoint folder (or hub id) or a pyllm run, over the same vocabulary
    distill_beta: float = 0.0  # GKD's generalized JSD: 0 forward KL(teacher || student), 1 reverse KL, else the mixture's
    distill_temperature: float = 1.0  # both models' logits divided by it before their softmax
    distill_alpha: float = 1.0  # the loss: alpha * divergence + (1 - alpha) * cross-entropy on the data
    distill_lmbda: float = 0.0  # GKD's lmbda: the share of micro-batches whose last replies are the student's own samples
    distill_max_new_tokens: int = 128  # on-policy samples: at most this many tokens each (TRL's GKD default)
    distill_sample_temperature: float = 0.9  # on-policy samples drawn at this temperature (TRL's GKD default)
    tokenizer: str = ""  # the run's tokenizer file (the CLI's): GRPO's reward functions are given text decoded with it
    sample_stop_tokens: list = field(default_factory=list)  # samples (on-policy, GRPO) end at one of these ids (the CLI: the model's end-of-sequence ids)
    grpo_reward: str = ""  # GRPO on the conversations' prompts, rewarded by reward models (pyllm runs or HF folders) and "module:function"s, comma-separated
    grpo_reward_weights: list = field(default_factory=list)  # GRPO: each reward's weight in their sum (TRL's reward_weights); []: 1 each
    grpo_generations: int = 8  # GRPO: samples per prompt, the group whose rewards are normalized (TRL's num_generations)
    grpo_generations_eval: int = 0  # GRPO: samples per prompt in eval (TRL's num_generations_eval); 0: grpo_generations
    grpo_max_new_tokens: int = 128  # GRPO: at most this many tokens a sample
    grpo_temperature: float = 1.0  # GRPO: samples drawn at this temperature (TRL's default)
    grpo_top_p: float = 1.0  # GRPO: samples drawn from the likeliest tokens whose probabilities sum to top_p (TRL's); 1: all
    grpo_top_k: int = 0  # GRPO: samples drawn from the top_k likeliest tokens (TRL's); 0: all
    grpo_min_p: float = 0.0  # GRPO: samples drawn from tokens >= min_p x the likeliest's probability (TRL's); 0: all
    grpo_repetition_penalty: float = 1.0  # GRPO: samples drawn with their text's ids penalized (TRL's); 1: none
    grpo_beta: float = 0.0  # GRPO: the KL penalty's weight, against the starting model (LoRA: the updates off); 0: none (TRL's default)
    # A reference model of its own (GRPO's with grpo_beta, reference "model"): every ref_model_sync_steps steps it
    # becomes alpha times the policy plus 1 - alpha times itself (TR-DPO, Gorbatovski et al. 2024; TRL's
    # sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps and their defaults)
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    grpo_loss_type: str = "dapo"  # GRPO: the token losses' sum divided by: dapo (the step's tokens; TRL's default) | grpo | bnpo | dr_grpo; or cispo | sapo | luspo
    grpo_scale_rewards: str = "group"  # GRPO: advantages divided by the std of their group | batch (the generation's) | none (Dr. GRPO)
    grpo_multi_objective_aggregation: str = "sum_then_normalize"  # GRPO rewards (TRL's) | normalize_then_sum (GDPO)
    grpo_iterations: int = 1  # GRPO: optimizer steps on each generation (TRL's num_iterations, mu), the ratio to it clipped
    grpo_steps_per_generation: int = 0  # GRPO: micro-batches a generation samples (TRL's steps_per_generation), a multiple of grad_accum; 0: grad_accum
    grpo_epsilon: float = 0.2  # GRPO: the ratio clipped to [1 - epsilon, 1 + epsilon_high]
    grpo_epsilon_high: float = 0.0  # GRPO: 0: epsilon (DAPO's clip-higher: 0.28)
    grpo_delta: float = 0.0  # GRPO: the unclipped ratio capped at delta (INTELLECT-2's two-sided clip, TRL's delta); 0: none
    grpo_top_entropy_quantile: float = 1.0  # GRPO: the policy loss on the top rho of tokens by entropy (TRL's; 0.2 suggested); 1: all
    grpo_off_policy_mask: float = 0.0  # GRPO: samples with A < 0 whose mean log p_old - log p passes this left out of the policy loss (TRL's off_policy_mask_threshold, DeepSeek-V3.2's); 0: off
    grpo_sapo_temperatures: list = field(default_factory=lambda: list(SAPO_TEMPERATURES))  # sapo: [positive A's, the others'] (TRL's sapo_temperature_pos / _neg)
    grpo_vespo: list = field(default_factory=lambda: list(VESPO_GAMMA))  # vespo: [k_pos, lambda_pos, k_neg, lambda_neg] (TRL's vespo_*)
    grpo_reward_clip: list = field(default_factory=list)  # RLOO: [low, high], each reward clamped to it (TRL's reward_clip_range); []: none
    grpo_importance_sampling: str = "token"  # GRPO: the ratio p / p_old per token | sequence (GSPO: the exp of its tokens' mean log-ratio)
    grpo_log_completions: int = 0  # GRPO: each generation's first N samples (every rank's) to completions.jsonl
    grpo_mask_truncated: bool = False  # GRPO: samples that end without a stop token are not trained on (DAPO's overlong filtering)
    grpo_kl_bias_correction: bool = True  # GRPO: the KL term times the ratio (TRL's use_bias_correction_kl, its default)
    distill_seq_kd: bool = False  # GKD's seq_kd: every micro-batch's last replies the teacher's samples first (sequence-level KD)
    model: dict = field(default_factory=dict)  # ModelConfig overrides, e.g. {"n_layers": 2}
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    batch_size: int = 16  # per process, per micro-step
    seq_len: int = 0  # 0: the model's block_size
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on the rest; its lr scaled to AdamW's)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    eval_choices: str = ""  # multiple-choice examples (evaluate.write_choices' file) scored at each eval
    ckpt_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 0  # also the last K checkpoints as checkpoints/step_N.pt (HF Trainer's save_total_limit)
    keep_best: bool = False  # model.safetensors: the weights of the lowest val loss, written when it falls (nanoGPT's
    # always_save_checkpoint=False), not the last step's; checkpoint.pt still holds the latest, to resume from
    seed: int = 1337
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    doc_mask: bool = False  # windows of a token stream: no attention across end-of-document tokens
    dist_mode: str = "ddp"  # ddp | fsdp | zero1 (when launched by torchrun with several processes)
    nan_patience: int = 3  # this many non-finite losses in a row stop the run
    init_loss_scale: float = 2.0 ** 16
    progress: bool = True

    @property
    def samples_replies(self) -> bool:
        """Whether training samples replies to the data's prompts (on-policy or sequence-level
        distillation, GRPO): conversations only, ending at sample_stop_tokens."""
        return bool(self.distill_lmbda or self.distill_seq_kd or self.grpo_reward)

    def validate(self) -> None:
        """ValueError naming the option, what it takes and what it got (a config file can hold anything)."""
        for f in fields(self):
            value, default = getattr(self, f.name), f.default if f.default is not MISSING else f.default_factory()
            if default is None and value is None:  # (an optional number, ld_alpha: None is off)
                continue
            kind = float if isinstance(default, (float, type(None))) else type(default)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                hint = ""
                if kind is float and isinstance(value, str):
                    hint = " (YAML 1.1 reads a number like 3e-3 as text: write 3.0e-3)"
                raise ValueError(f"TrainConfig.{f.name} must be of type {kind.__name__}, got {value!r}{hint}")
        choices = {"precision": ("auto", "fp32", "bf16", "fp16"), "schedule": ("cosine", "wsd", "constant"),
                   "dist_mode": ("ddp", "fsdp", "zero1"), "optimizer": ("adamw", "muon")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "nan_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints", "weight_decay",
                     "grad_clip", "eps", "seed"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        bounds = {"lr": (lambda x: 0 < x < math.inf, "> 0"), "min_lr_ratio": (lambda x: 0 <= x <= 1, "in [0, 1]"),
                  "decay_frac": (lambda x: 0 < x <= 1, "in (0, 1]"), "beta1": (lambda x: 0 <= x < 1, "in [0, 1)"),
                  "beta2": (lambda x: 0 <= x < 1, "in [0, 1)"),
                  "init_loss_scale": (lambda x: 0 < x < math.inf, "> 0 and finite")}
        for name, (valid, text) in bounds.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name} must be {text}, got {getattr(self, name)}")
        if self.init_from_hf and self.init_from_run:
            raise ValueError("TrainConfig: give init_from_hf or init_from_run, not both")
        if self.init_adapter and not self.init_from_hf:
            raise ValueError("TrainConfig.init_adapter goes with init_from_hf (the model the adapter was trained on)")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(f"TrainConfig.lora_rank and lora_alpha must be >= 0, got {self.lora_rank} and {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if (self.lora_targets or self.lora_dropout or self.lora_alpha) and not self.lora_rank:
            # (--lora-alpha alone had run a full fine-tune without a word)
            raise ValueError("TrainConfig.lora_targets, lora_alpha and lora_dropout go with lora_rank (a LoRA run)")
        if self.lora_targets:
            lora_targets(self.lora_targets)  # names checked before any work
        if not isinstance(self.model, dict):
            raise ValueError(f"TrainConfig.model must be a dict of ModelConfig fields, got {self.model!r}")
        check_fields(self.model)  # (at validate, not when train() builds the model)
        kept = set(self.model) - {"vocab_size", *LLM.TRAINING_FIELDS}
        if (self.init_from_hf or self.init_from_run) and kept:
            raise ValueError(f"TrainConfig.model {sorted(kept)}: a model from init_from_hf / init_from_run keeps its "
                             "own config (its weights are of that shape); leave them out (what it trains with, "
                             f"{' and '.join(LLM.TRAINING_FIELDS)}, may be set)")
        if self.keep_best and self.grpo_reward:
            raise ValueError("TrainConfig.keep_best keeps the weights of the lowest val loss; GRPO's measure is its val "
                             "reward (the prompts' loss says little of it): train without keep_best")
        if self.preference and self.preference not in PREFERENCE_LOSSES:
            raise ValueError(f"TrainConfig.preference must be one of {', '.join(PREFERENCE_LOSSES)} (or empty), "
                             f"got {self.preference!r}")
        if not 0.0 <= self.beta < math.inf or not 0.0 <= self.simpo_gamma < math.inf:
            raise ValueError(f"TrainConfig.beta and simpo_gamma must be >= 0 and finite, got {self.beta} and {self.simpo_gamma}")
        losses = [self.preference, *self.preference_mix]  # (TRL's loss_type list, its "sft" aside)
        if self.preference_mix and (not all(isinstance(k, str) and k in DPO_LOSSES for k in self.preference_mix)
                                    or self.preference not in DPO_LOSSES or len(set(losses)) < len(losses)):
            raise ValueError(f"TrainConfig.preference_mix: more losses of the dpo family ({', '.join(DPO_LOSSES)}) "
                             f"added to preference, itself one of them, each once (TRL's sft: sft_weight), got "
                             f"preference {self.preference or 'none'!r} with {self.preference_mix}")
        if self.preference_weights and (not self.preference or len(self.preference_weights) != len(losses) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < math.inf
                for w in self.preference_weights)):
            raise ValueError(f"TrainConfig.preference_weights: a finite number >= 0 for each of the {len(losses)} "
                             f"loss(es) of preference and preference_mix ({', '.join(map(repr, losses))}; TRL's "
                             f"loss_weights, sft's being sft_weight), got {self.preference_weights}")
        # (dpo's conservative and robust's smoothing need e < 0.5; EXO's epsilon alone any e in (0, 1), TRL's)
        smoothing_below = 1.0 if "exo_pair" in losses and not {"dpo", "robust"} & set(losses) else 0.5
        if not 0.0 <= self.label_smoothing < smoothing_below:
            raise ValueError(f"TrainConfig.label_smoothing must be in [0, 0.5) (exo_pair's epsilon in (0, 1), mixed "
                             f"with neither dpo nor robust), got {self.label_smoothing}")
        if not (0 < self.desirable_weight < math.inf and 0 < self.undesirable_weight < math.inf):
            raise ValueError(f"TrainConfig.desirable_weight and undesirable_weight must be > 0, got "
                             f"{self.desirable_weight} and {self.undesirable_weight}")
        if not 0.0 <= self.sft_weight < math.inf or (self.sft_weight and self.preference not in DPO_LOSSES + ("simpo",)):
            raise ValueError(f"TrainConfig.sft_weight must be >= 0 and goes with preference simpo or the dpo family "
                             f"({', '.join(DPO_LOSSES)}), got {self.sft_weight} with "
                             f"{self.preference or 'no preference loss'!r}")
        if not 0.0 <= self.z_loss < math.inf or (self.z_loss and (self.preference or self.teacher or self.grpo_reward)):
            mode = ("preference tuning" if self.preference else "distillation" if self.teacher else "GRPO"
                    if self.grpo_reward else None)
            raise ValueError(f"TrainConfig.z_loss must be >= 0 and finite and goes with pretraining and SFT (not "
                             f"preference tuning, distillation or GRPO), got {self.z_loss}"
                             + (f" with {mode}" if mode and 0.0 <= self.z_loss < math.inf else ""))
        if self.loss_type not in ("nll", "dft") or (self.loss_type == "dft" and (self.preference or self.teacher
                                                                                 or self.grpo_reward)):
            mode = ("preference tuning" if self.preference else "distillation" if self.teacher else "GRPO"
                    if self.grpo_reward else None)
            raise ValueError(f"TrainConfig.loss_type must be 'nll' or 'dft', dft with pretraining and SFT (not "
                             f"preference tuning, distillation or GRPO, whose losses are their own), got "
                             f"{self.loss_type!r}" + (f" with {mode}" if mode and self.loss_type == "dft" else ""))
        if self.label_smoothing and not {"dpo", "robust", "exo_pair"} & set(losses):
            raise ValueError("TrainConfig.label_smoothing goes with preference dpo, robust or exo_pair (or one of "
                             "them in preference_mix)")
        if "exo_pair" in losses and not self.label_smoothing:
            raise ValueError("TrainConfig.label_smoothing: preference exo_pair needs it above 0 (EXO's epsilon; its "
                             "paper's 1e-3)")
        if self.kto_loss_type not in ("kto", "apo_zero_unpaired") or (self.kto_loss_type != "kto"
                                                                       and self.preference != "kto"):
            raise ValueError(f"TrainConfig.kto_loss_type must be kto or apo_zero_unpaired and goes with preference "
                             f"kto, got {self.kto_loss_type!r} with {self.preference or 'no preference loss'!r}")
        if self.f_divergence not in F_DIVERGENCES or (self.f_divergence != "reverse_kl"
                                                      and not set(losses) <= set(F_DIVERGENCE_LOSSES)):
            raise ValueError(f"TrainConfig.f_divergence must be one of {', '.join(F_DIVERGENCES)} and, other than "
                             f"reverse_kl, goes with preference {', '.join(F_DIVERGENCE_LOSSES)}, preference_mix's "
                             f"too (f-DPO; TRL refuses the others too), got {self.f_divergence!r} with "
                             f"{', '.join(map(repr, losses)) if self.preference else 'none'}")
        if not -math.inf < self.f_alpha < math.inf or (self.f_alpha != 0.5 and self.f_divergence != "alpha_divergence"):
            raise ValueError(f"TrainConfig.f_alpha must be finite and goes with f_divergence alpha_divergence, got "
                             f"{self.f_alpha} with {self.f_divergence}")
        if not 0.0 < self.discopop_tau < math.inf:
            raise ValueError(f"TrainConfig.discopop_tau must be positive and finite, got {self.discopop_tau}")
        if self.ld_alpha is not None and (isinstance(self.ld_alpha, bool) or not isinstance(self.ld_alpha, (int, float))
                                          or not 0.0 <= self.ld_alpha <= 1.0 or self.preference not in DPO_LOSSES):
            raise ValueError(f"TrainConfig.ld_alpha must be in [0, 1] (or None: off) and goes with the dpo family "
                             f"({', '.join(DPO_LOSSES)}; LD-DPO, TRL's ld_alpha), got {self.ld_alpha!r} with "
                             f"{self.preference or 'no preference loss'!r}")
        if self.ld_alpha is not None and self.sft_weight:  # (TRL's sft term: the plain log-probabilities)
            raise ValueError("TrainConfig.ld_alpha with sft_weight: the SFT term would take the LD-weighted "
                             "log-probabilities where TRL's takes the plain ones; not combined here")
        if not 0.0 <= self.center_rewards < math.inf or (self.center_rewards and self.preference != "reward"):
            raise ValueError(f"TrainConfig.center_rewards must be >= 0 and goes with preference reward, got "
                             f"{self.center_rewards} (preference {self.preference!r})")
        if not 0.0 <= self.distill_beta <= 1.0 or not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"TrainConfig.distill_beta and distill_alpha must be in [0, 1], got {self.distill_beta} "
                             f"and {self.distill_alpha}")
        if not 0.0 < self.distill_temperature < math.inf:
            raise ValueError(f"TrainConfig.distill_temperature must be > 0, got {self.distill_temperature}")
        if self.teacher and (self.preference or self.compile):
            raise ValueError("TrainConfig.teacher (distillation, --teacher) goes with neither preference tuning "
                             "(--preference) nor torch.compile (--compile): drop one")
        if not 0.0 <= self.distill_lmbda <= 1.0 or self.distill_max_new_tokens < 1 or not self.distill_sample_temperature >= 0:
            raise ValueError(f"TrainConfig.distill_lmbda must be in [0, 1], distill_max_new_tokens >= 1 and "
                             f"distill_sample_temperature >= 0, got {self.distill_lmbda}, {self.distill_max_new_tokens} "
                             f"and {self.distill_sample_temperature}")
        if (self.distill_lmbda or self.distill_seq_kd) and not self.teacher:
            raise ValueError("TrainConfig.distill_lmbda and distill_seq_kd (samples to distill on) go with a teacher "
                             "(distillation)")
        if self.grpo_reward and (self.preference or self.teacher):
            raise ValueError("TrainConfig.grpo_reward (GRPO) goes with neither preference tuning nor distillation")
        if not 0.0 <= self.grpo_beta < math.inf:
            raise ValueError(f"TrainConfig.grpo_beta must be >= 0, got {self.grpo_beta}")
        if self.grpo_beta and not (self.lora_rank or self.init_from_hf or self.init_from_run):
            raise ValueError("TrainConfig.grpo_beta (a KL penalty against the starting model) needs init_from_hf or "
                             "init_from_run (or lora_rank: the model with its updates off)")
        if self.sync_ref_model and not ((self.grpo_reward and self.grpo_beta and not self.lora_rank)
                                        or (self.preference and self.reference == "model")):
            raise ValueError("TrainConfig.sync_ref_model moves the reference model towards the policy: it needs one "
                             "of its own, GRPO's with grpo_beta > 0 in a full fine-tune (with lora_rank the reference "
                             "is the model with its updates off) or a preference loss's with reference model (a "
                             "precomputed reference has no model to move); TRL refuses the others too")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0 or isinstance(self.ref_model_sync_steps, bool) \
                or not isinstance(self.ref_model_sync_steps, int) or self.ref_model_sync_steps < 1:
            raise ValueError(f"TrainConfig.ref_model_mixup_alpha must be in [0, 1] and ref_model_sync_steps "
                             f"an int >= 1, got {self.ref_model_mixup_alpha} and "
                             f"{self.ref_model_sync_steps!r}")
        if self.grpo_generations_eval < 0:
            raise ValueError(f"TrainConfig.grpo_generations_eval must be >= 1 (or 0: grpo_generations), got "
                             f"{self.grpo_generations_eval}")
        if self.grpo_generations < 2 or self.grpo_max_new_tokens < 1 or not self.grpo_temperature > 0:
            raise ValueError(f"TrainConfig.grpo_generations must be >= 2, grpo_max_new_tokens >= 1 and "
                             f"grpo_temperature > 0, got {self.grpo_generations}, {self.grpo_max_new_tokens} and "
                             f"{self.grpo_temperature}")
        specs = [spec for spec in self.grpo_reward.split(",") if spec.strip()] if self.grpo_reward else []
        if self.grpo_reward and len(specs) != len(self.grpo_reward.split(",")):
            raise ValueError(f"TrainConfig.grpo_reward: comma-separated reward models and functions, got {self.grpo_reward!r}")
        if self.grpo_reward_weights and (len(self.grpo_reward_weights) != len(specs) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.grpo_reward_weights)):
            raise ValueError(f"TrainConfig.grpo_reward_weights: a finite number for each of the {len(specs)} reward(s) "
                             f"of grpo_reward, got {self.grpo_reward_weights}")
        if self.grpo_loss_type not in GRPO_LOSS_TYPES or self.grpo_scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"TrainConfig.grpo_loss_type must be one of {', '.join(GRPO_LOSS_TYPES)} and "
                             f"grpo_scale_rewards group, batch or none, got {self.grpo_loss_type!r} and "
                             f"{self.grpo_scale_rewards!r}")
        if self.grpo_multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError(f"TrainConfig.grpo_multi_objective_aggregation must be sum_then_normalize or "
                             f"normalize_then_sum, got {self.grpo_multi_objective_aggregation!r}")
        if self.grpo_multi_objective_aggregation == "normalize_then_sum" and (
                self.grpo_scale_rewards != "group" or self.grpo_loss_type == "rloo"):
            raise ValueError("TrainConfig.grpo_multi_objective_aggregation normalize_then_sum (GDPO) scales each "
                             "reward by its group's std and their weighted sum by the generation's (TRL's): "
                             "grpo_scale_rewards does not apply (leave it at group), nor does RLOO's leave-one-out "
                             f"baseline, got grpo_scale_rewards {self.grpo_scale_rewards!r} and grpo_loss_type "
                             f"{self.grpo_loss_type!r}")
        if self.optimizer == "muon" and (self.lora_rank or self.dist_mode != "ddp"):
            raise ValueError("TrainConfig.optimizer muon orthogonalizes each whole matrix's update: it trains every "
                             "weight (not lora_rank) on one process or under ddp (not fsdp or zero1, whose shards "
                             "are parts of matrices)")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"TrainConfig.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.grpo_log_completions < 0:
            raise ValueError(f"TrainConfig.grpo_log_completions must be >= 0, got {self.grpo_log_completions}")
        if self.grpo_importance_sampling not in ("token", "sequence"):
            raise ValueError(f"TrainConfig.grpo_importance_sampling must be token or sequence, got "
                             f"{self.grpo_importance_sampling!r}")
        if self.grpo_iterations < 1 or not 0.0 < self.grpo_epsilon < 1.0 or not 0.0 <= self.grpo_epsilon_high < math.inf:
            raise ValueError(f"TrainConfig.grpo_iterations must be >= 1, grpo_epsilon in (0, 1) and grpo_epsilon_high "
                             f">= 0, got {self.grpo_iterations}, {self.grpo_epsilon} and {self.grpo_epsilon_high}")
        if not 0.0 <= self.grpo_top_entropy_quantile <= 1.0:
            raise ValueError(f"TrainConfig.grpo_top_entropy_quantile must be in [0, 1] (1: every token), got "
                             f"{self.grpo_top_entropy_quantile}")
        if not 0.0 < self.grpo_top_p <= 1.0 or self.grpo_top_k < 0:
            raise ValueError(f"TrainConfig.grpo_top_p must be in (0, 1] and grpo_top_k >= 0 (1 and 0: off), got "
                             f"{self.grpo_top_p} and {self.grpo_top_k}")
        if not 0.0 <= self.grpo_min_p <= 1.0 or not 0.0 < self.grpo_repetition_penalty < math.inf:
            raise ValueError(f"TrainConfig.grpo_min_p must be in [0, 1] and grpo_repetition_penalty a finite "
                             f"number > 0 (0 and 1: off), got {self.grpo_min_p} and {self.grpo_repetition_penalty}")
        if self.grpo_delta and not (1.0 < self.grpo_delta < math.inf
                                    and self.grpo_loss_type not in ("cispo", "sapo", "vespo")):
            raise ValueError(f"TrainConfig.grpo_delta must be 0 (none) or above 1 (INTELLECT-2 suggests more than 1 + "
                             f"epsilon_high), and goes with the clipped loss types (not cispo, sapo or vespo, which "
                             f"do not clip so), got {self.grpo_delta} with grpo_loss_type {self.grpo_loss_type}")
        rloo = self.grpo_loss_type == "rloo"
        if rloo and (self.grpo_importance_sampling != "token" or self.grpo_delta
                     or self.grpo_top_entropy_quantile < 1.0 or self.grpo_off_policy_mask
                     or not self.grpo_kl_bias_correction):
            raise ValueError("TrainConfig.grpo_loss_type rloo (TRL's RLOOTrainer: one ratio a sample, of its summed "
                             "log-probabilities, its KL in the rewards) goes without grpo_importance_sampling "
                             "sequence, grpo_delta, grpo_top_entropy_quantile, grpo_off_policy_mask and "
                             "grpo_kl_bias_correction off, which RLOO has not")
        if self.grpo_loss_type == "vespo" and self.grpo_importance_sampling != "token":
            raise ValueError("TrainConfig.grpo_loss_type vespo weighs each sample by its own sequence ratio: it goes "
                             "with grpo_importance_sampling token (TRL warns so too)")
        for name, size, lowest in (("grpo_sapo_temperatures", 2, 0.0), ("grpo_vespo", 4, -math.inf)):
            value = getattr(self, name)
            if len(value) != size or not all(isinstance(v, (int, float)) and lowest < v < math.inf for v in value):
                raise ValueError(f"TrainConfig.{name} must be {size} finite numbers"
                                 + (" above 0" if lowest == 0.0 else "") + f", got {value}")
        if (self.grpo_sapo_temperatures != list(SAPO_TEMPERATURES) and self.grpo_loss_type != "sapo") or (
                self.grpo_vespo != list(VESPO_GAMMA) and self.grpo_loss_type != "vespo"):
            raise ValueError("TrainConfig.grpo_sapo_temperatures goes with grpo_loss_type sapo, grpo_vespo with vespo")
        if not 0.0 <= self.grpo_off_policy_mask < math.inf:
            raise ValueError(f"TrainConfig.grpo_off_policy_mask must be 0 (off) or a positive finite threshold, got "
                             f"{self.grpo_off_policy_mask}")
        if self.grpo_reward_clip and not (rloo and len(self.grpo_reward_clip) == 2
                                          and self.grpo_reward_clip[0] <= self.grpo_reward_clip[1]):
            raise ValueError(f"TrainConfig.grpo_reward_clip must be [low, high] with low <= high and goes with "
                             f"grpo_loss_type rloo (TRL's reward_clip_range, an RLOOConfig option), got "
                             f"{self.grpo_reward_clip} with {self.grpo_loss_type}")
        if self.grpo_steps_per_generation < 0 or self.grpo_steps_per_generation % self.grad_accum:
            raise ValueError(f"TrainConfig.grpo_steps_per_generation must be a multiple of grad_accum (each optimizer "
                             f"step trains on grad_accum of a generation's micro-batches) or 0 (grad_accum), got "
                             f"{self.grpo_steps_per_generation} with grad_accum {self.grad_accum}")
        if self.reference not in ("precomputed", "lora-off", "model"):
            raise ValueError(f"TrainConfig.reference must be precomputed, lora-off or model, got {self.reference!r}")
        if self.reference == "model" and not (self.preference and self.preference not in REFERENCE_FREE
                                              and (self.init_from_hf or self.init_from_run)):
            raise ValueError("TrainConfig.reference model (a frozen copy of the starting model, loaded again) needs "
                             "a preference loss with a reference (the dpo family, kto) and init_from_hf or "
                             "init_from_run")
        if self.reference == "lora-off" and not (self.lora_rank and self.preference
                                                 and self.preference not in REFERENCE_FREE):
            raise ValueError("TrainConfig.reference lora-off (the model with its LoRA updates off) needs lora_rank and "
                             "a preference loss with a reference (the dpo family, kto)")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(sorted(unknown))}; options: {', '.join(sorted(known))}")
        return cls(**d)


def lora_alpha_of(rank: int, alpha: float | None) -> float:
    """LoRA's alpha as trained: the configured one, else 2 * rank (updates scaled by alpha / rank = 2).
    One place, read by training and by both exports, so a merged export and an adapter scale as trained."""
    return alpha or 2.0 * rank


# Each preference loss's usual beta: TRL's defaults (DPOConfig, ORPOConfig), SimPO's paper's 2.0.
PREFERENCE_BETA = {**dict.fromkeys(DPO_LOSSES, 0.1), "simpo": 2.0, "orpo": 0.1, "kto": 0.1, "reward": 1.0}


@torch.no_grad()
def sync_reference(reference: LLM, model, alpha: float) -> None:
    """TRL's SyncRefModelCallback (TR-DPO): each of reference's weights (1 - alpha) times itself plus
    alpha times the policy's (model's, gathered whole where FSDP shards it), in reference's dtype."""
    policy = dict(model.named_parameters())
    for name, weight in reference.named_parameters():
        if name not in policy:
            raise ValueError(f"sync_reference: the policy has no weight {name!r} (the reference's): not the same model")
        p = policy[name]
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        weight.mul_(1.0 - alpha).add_(p.to(weight.dtype), alpha=alpha)


def preference_options(cfg) -> dict:
    """The keyword arguments of preference_loss for cfg."""
    weights = cfg.preference_weights or [1.0] * (1 + len(cfg.preference_mix))
    return {"kind": cfg.preference, "beta": cfg.beta or PREFERENCE_BETA[cfg.preference], "gamma": cfg.simpo_gamma,
            "label_smoothing": cfg.label_smoothing, "desirable_weight": cfg.desirable_weight,
            "undesirable_weight": cfg.undesirable_weight, "center_rewards": cfg.center_rewards,
            "sft_weight": cfg.sft_weight, "discopop_tau": cfg.discopop_tau, "kto_loss": cfg.kto_loss_type,
            "f_divergence": cfg.f_divergence, "f_alpha": cfg.f_alpha, "ld_alpha": cfg.ld_alpha,
            "weight": float(weights[0]), "mix": tuple(zip(cfg.preference_mix, map(float, weights[1:])))}


class TrainingDiverged(RuntimeError):
    pass


# --- distributed ---------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Joins the torchrun process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, dev)


def end_process(code: int = 0) -> None:
    """Ends a process that ran a torch.distributed group: destroys the group, runs the atexit
    handlers (logging's flush, a user's or a tracker's), flushes stdout and stderr, and exits
    without the interpreter's finalization (what `pyllm train` does under torchrun once every file
    is written).

    A gloo worker thread drops its finished collective just after the caller's wait() returns; when
    that work held the last reference to a tensor Python had made, the drop takes the GIL. If the
    main thread has reached finalization by then, Python ends that thread inside a noexcept
    destructor: std::terminate, "terminate called without an active exception", SIGABRT, after the
    run had succeeded (a core dump, 2026-12-04: ~AsyncAllreduceWork -> decref_pyobject -> take_gil
    -> pthread_exit, under Py_FinalizeEx; tests/test_dtensor.py on a 2-core VM: 1 of 24 runs, then the 4th).
    destroy_process_group neither joins gloo's threads nor waits for that drop, and a barrier does
    not either. torchrun reports such a rank as failed (and restarts the job under --max-restarts)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # (os._exit alone had skipped them: a FileHandler's last records, a tracker's upload)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compiles_blocks_alone(cfg: TrainConfig, info: DistInfo) -> bool:
    """Whether wrap_model compiles each block (FSDP2 with compile on several processes) rather than
    the whole forward, whose output layer then runs eager (at the trained tokens only)."""
    return cfg.compile and info.world_size > 1 and cfg.dist_mode == "fsdp"


def wrap_model(model: LLM, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """compile (on request), then DDP or FSDP2 when there are several processes. zero1 needs no
    wrapper: ZeroAdamW averages the grads over the ranks itself, once per optimizer step (so grad
    accumulation communicates nothing until then). Under FSDP2 each block is compiled (in place,
    its names kept) before it is sharded, as torchtitan does: the whole model compiled around
    fully_shard met FSDP's dynamo-disabled hooks in the block loop, skipped that frame and compiled
    pieces of it (12 graphs where there are 2); the embedding and the output layer's loss run eager
    (pyllm's kernels either way)."""
    if compiles_blocks_alone(cfg, info):
        from torch import _dynamo

        # The blocks run one code object, whose graphs share one cache of dynamo's recompile_limit
        # (8): GRPO with LoRA, a KL term and iterations calls it in 9 variants (trained, p_old and
        # the LoRA-off reference without grad, eval; block 0's input needing no grad), past which it
        # ran eager (the GRPO audit, 2026-12-06). Under DDP one compiled forward holds 4-6.
        limit = "recompile_limit" if hasattr(_dynamo.config, "recompile_limit") else "cache_size_limit"  # (torch < 2.7)
        setattr(_dynamo.config, limit, max(getattr(_dynamo.config, limit), 32))
        for block in model.blocks:
            block.compile()
    wrapped: torch.nn.Module = model if compiles_blocks_alone(cfg, info) or not cfg.compile else torch.compile(model)
    if info.world_size == 1 or cfg.dist_mode == "zero1":
        return wrapped
    if cfg.dist_mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP all-reduces its gradients in buckets, and the ring all-reduce adds the ranks' values in an
        # order set by an element's place in its bucket: on 3 or more ranks the sums round differently
        # when the layout changes (on 2 a + b is b + a). DDP's first backward reduces all the gradients
        # in one bucket in parameter order, then rebuilds the buckets in the order the gradients became
        # ready: a resumed run's first step had used the first layout where the uninterrupted run used
        # the rebuilt one, 1e-10 off in that step's gradients (bitwise again on 2 ranks). With
        # find_unused_parameters DDP never rebuilds: every step of every run reduces in its initial
        # buckets (1 MB first, then 25 MB, the parameters' reverse order); the cost, a walk of the
        # autograd graph a forward and a small all-reduce of the used-parameter map a step, and a
        # warning that there were none unused, only on 3 or more processes.
        wrapped = DistributedDataParallel(wrapped, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                          find_unused_parameters=info.world_size > 2)
    else:
        if info.device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
            raise RuntimeError("dist_mode fsdp on the CPU needs torch >= 2.7 (FSDP2 records events on "
                               f"torch.cpu.Stream, which torch {torch.__version__} lacks): use ddp or zero1")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 here
            from torch.distributed._composable.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        if dist.get_backend() == "gloo" and not reduce_scatter_averages():
            # FSDP2 reduce-scatters fp32 / bf16 gradients with ReduceOp.AVG, which gloo's
            # reduce_scatter summed up to torch 2.8: every gradient world_size times too large, hidden by
            # AdamW's scale invariance and by clipping, but not by a resume from a checkpoint of another
            # world size (its moments), a clip threshold the norm crosses, or the logged grad norm.
            if hasattr(model, "set_force_sum_reduction_for_comms"):  # torch 2.8: a sum, then FSDP divides
                for module in (*model.blocks, model):
                    module.set_force_sum_reduction_for_comms(True)
            else:  # torch 2.7: the trainer divides them before the optimizer step (optimizer_step)
                model.fsdp_grad_divisor = info.world_size
    return wrapped


def reduce_scatter_averages() -> bool:
    """Whether ReduceOp.AVG averages in reduce_scatter_tensor on the default process group
    (collective: every rank calls). Gloo's summed up to torch 2.8 (measured: 2.8.0 sums, 2.13
    averages)."""
    world = dist.get_world_size()
    out = torch.empty(1)
    # (reduce_scatter_tensor's new name from torch 2.10 or so, which warns of the old one)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, torch.ones(world), op=dist.ReduceOp.AVG)
    return out.item() == 1.0


def all_reduce_sum(x: torch.Tensor, info: DistInfo, op=None) -> torch.Tensor:
    """x (a small CPU tensor of sums and counts, fp64) summed over every rank (op: another
    dist.ReduceOp, MAX), on the CPU."""
    if info.world_size > 1:
        x = x.to(info.device)
        dist.all_reduce(x, **({} if op is None else {"op": op}))
        _held_by_gloo.append(x)
        x = x.cpu()
    return x


# The last few tensors given to pyllm's own collectives, kept referenced. Gloo's worker thread lets go
# of a finished collective's tensors just after the caller's wait() returns; if Python has dropped
# the tensor by then, freeing it takes the GIL, and under torch 2.7 destroy_process_group holds the
# GIL while it joins that thread: a deadlock (seen on a loaded 2-core VM, 2026-12-05: the rank of a
# run whose rank 0 had refused to start, in end_process, after any_rank's all_reduce).
_held_by_gloo: collections.deque = collections.deque(maxlen=8)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether flag is true on any rank (every rank gets the same answer)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), info).item())


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
        _held_by_gloo.append(x)
        x /= info.world_size
    return x


# --- precision -------------------------------------------------------------------------------------

def resolve_precision(precision: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def autocast(precision: str, device: torch.device):
    """Weights stay fp32 (the master copy); matmuls run in bf16/fp16 under autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_loss_scaler(precision: str, cfg: "TrainConfig"):
    """None unless fp16 (bf16 keeps fp32's exponent range and needs no scaling)."""
    return DynamicLossScaler(cfg.init_loss_scale) if precision == "fp16" else None


# --- optimizer -------------------------------------------------------------------------------------

class TorchAdamW(torch.optim.AdamW):
    """torch's AdamW behind pyllm.optim.AdamW's step(grad_scaler, max_grad_norm), for FSDP2, whose
    params are DTensor shards that pyllm's fused kernels do not take: unscale, clip the global
    norm, skip the step on an inf/nan gradient; last_grad_norm and last_step_skipped tell what
    happened."""

    def step(self, closure=None, grad_scaler: DynamicLossScaler | None = None, max_grad_norm: float | None = None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_grad_norm, self.last_step_skipped = unscale_clip_check(params, grad_scaler, max_grad_norm, self)
        if not self.last_step_skipped:
            super().step(closure)


def has_kernels_for(device: torch.device) -> bool:
    """False on a GPU when pyllm was built without CUDA kernels (nvcc was not found at install
    time) or the GPU is older than they need (sm_80): the run then takes torch's attention, SwiGLU
    and AdamW there instead of failing."""
    return device.type != "cuda" or (_util.HAS_CUDA_KERNELS and _util.gpu_runs_kernels(device.index))


def _no_kernels_why() -> str:
    if not _util.HAS_CUDA_KERNELS:
        return ("this pyllm was built without CUDA kernels (nvcc was not found when it was installed; reinstall "
                "with nvcc on PATH for pyllm's)")
    return "this GPU is older than pyllm's CUDA kernels need (compute capability 8.0: A100 or newer)"


def muon_params(model: LLM) -> tuple[list, list]:
    """The params Muon steps (cfg.optimizer muon): every matrix (or stack of them: a MoE's experts)
    of the blocks, and for each the sizes of its fused parts along its rows (q, k, v; gate, up),
    orthogonalized apart, or None. The embeddings, output layer, norms and biases are AdamW's."""
    from pyllm.nn import MoEMLP

    splits = {}
    for module in model.blocks.modules():
        if hasattr(module, "qkv") and hasattr(module, "n_kv_heads"):  # Attention
            q, kv = module.n_heads * module.head_dim, module.n_kv_heads * module.head_dim
            splits[id(module.qkv.weight)] = [q, kv, kv]
        elif isinstance(module, MoEMLP):
            splits[id(module.gate_up)] = [module.hidden_dim] * 2
        elif hasattr(module, "gate_up") and isinstance(module.gate_up, torch.nn.Linear):  # SwiGLU, GeGLU
            splits[id(module.gate_up.weight)] = [module.gate_up.out_features // 2] * 2
    params = [p for p in model.blocks.parameters() if p.requires_grad and p.dim() >= 2]
    return params, [splits.get(id(p)) for p in params]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (not on norms, biases): pyllm's fused AdamW; its ZeRO-1
    sharded form under zero1; torch's under FSDP2 (DTensor shards), and on a GPU when this pyllm
    was built without CUDA kernels. cfg.optimizer muon: Muon on the blocks' matrices (muon_params),
    AdamW on the rest, as one (optim.MuonAdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        matrices, splits = muon_params(model)
        taken = {id(p) for p in matrices}
        params = [p for p in params if id(p) not in taken]
        muon = Muon([{"params": matrices, "splits": splits}], lr=cfg.lr, momentum=cfg.muon_momentum,
                    weight_decay=cfg.weight_decay)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    hyper = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "muon":
        adamw = AdamW(groups, **hyper) if has_kernels_for(info.device) else TorchAdamW(groups, **hyper)
        return MuonAdamW(muon, adamw)
    if info.world_size > 1 and cfg.dist_mode == "zero1" and not has_kernels_for(info.device):
        raise ValueError(f"--dist-mode zero1 shards pyllm's AdamW, and {_no_kernels_why()}; "
                         "use --dist-mode ddp or fsdp")
    if any(type(p).__name__ == "DTensor" for p in params) or not has_kernels_for(info.device):
        # FACTS.md: foreach=False ran ~1.3x faster than foreach=True on this CPU.
        return TorchAdamW(groups, **hyper, **({} if info.device.type == "cuda" else {"foreach": False}))
    if info.world_size > 1 and cfg.dist_mode == "zero1":
        return ZeroAdamW(groups, **hyper)
    return AdamW(groups, **hyper)


def optimizer_step(optimizer, scaler, max_grad_norm: float, model=None) -> tuple[bool, float]:
    """Unscale, clip, step (skipped on an inf/nan gradient, which also backs off the fp16 scale),
    zero the grads. Returns (stepped, grad norm before clipping). model: its fsdp_grad_divisor, if
    set (wrap_model), divides the gradients first."""
    divisor = getattr(model, "fsdp_grad_divisor", 1)
    if divisor != 1:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(divisor)
    optimizer.step(grad_scaler=scaler, max_grad_norm=max_grad_norm if max_grad_norm > 0 else math.inf)
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return not bool(optimizer.last_step_skipped), float(optimizer.last_grad_norm)


# --- schedule ----------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr (Loshchilov & Hutter 2017), or warmup-stable-decay
    (Hu et al. 2024: constant, then a linear decay over the last decay_frac of the steps)."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - round(cfg.max_steps * cfg.decay_frac)  # int(100 * (1 - 0.8)) was 19
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (min_lr - cfg.lr) * (step - decay_start + 1) / max(1, cfg.max_steps - decay_start)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


# --- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, path, cfg: TrainConfig, seq_len: int, precision: str, info: DistInfo,
             stats: dict | None = None) -> float:
    """Mean loss over eval_batches fixed val batches (a fresh generator each time, so every eval
    sees the same windows and the training RNG is untouched). stats: a dict given gets
    val_entropy and val_mean_token_accuracy (TRL's eval_entropy, eval_mean_token_accuracy: each
    batch's over every rank's targets, then their mean)."""
    loader = make_loader(path, cfg, seq_len, cfg.seed + 1, info)
    model.eval()
    total = torch.zeros((), device=info.device)
    targets = 0
    stat_sums = torch.zeros(cfg.eval_batches, 3, device=info.device)
    for i in range(cfg.eval_batches):
        batch = loader.next_batch()
        with autocast(precision, info.device):
            packed = isinstance(loader, PackedLoader) and not cfg.fused_loss
            kw = {"token_stats": True} if stats is not None else {}
            loss = (packed_loss(model, batch, **kw) if packed else model(*batch, **kw)[1]).float()
        if stats is not None:
            stat_sums[i] = getattr(model, "module", model).token_stats_term  # (DDP's; compile's, FSDP's: through)
        if isinstance(loader, PackedLoader):  # the mean over all trained tokens, not of the batches' means
            total, targets = total + loss * loader.targets, targets + loader.global_targets
        else:
            total += loss
    model.train()
    if stats is not None:
        stats["val_entropy"], stats["val_mean_token_accuracy"] = token_stat_means(all_reduce_sum(stat_sums, info))
    if isinstance(loader, PackedLoader):  # (no trained token in the val batches: NaN, not a best loss of 0)
        return float(all_reduce_mean(total, info)) * info.world_size / targets if targets else float("nan")
    return float(all_reduce_mean(total / cfg.eval_batches, info))


def log_completions(log: "RunLog", step: int, rollouts: list[dict], cfg: TrainConfig, info: DistInfo,
                    tokenizer=None) -> None:
    """The first cfg.grpo_log_completions samples of a generation's rollouts, every rank's (rank 0's
    first; gathered as TRL's log_completions gathers them: rank 0's alone had been written), one
    line each: step, prompt, completion (text decoded with tokenizer, the stop token left out;
    without one the token ids), reward, advantage and each reward's ("rewards": {name: value}, None
    where it gave none). Collective: every rank calls."""
    names = reward_names(cfg.grpo_reward)
    stops = set(cfg.sample_stop_tokens)
    lines = []
    for r in rollouts:
        for i, (prompt, completion) in enumerate(zip(r["prompt_ids"], r["completion_ids"])):
            if len(lines) == cfg.grpo_log_completions:
                break
            if tokenizer is not None:
                prompt = tokenizer.decode(prompt)
                completion = tokenizer.decode(_without_stop(completion, stops))
            each = r["each"][i].tolist()
            lines.append({"step": step, "prompt": prompt, "completion": completion, "reward": r["rewards"][i].item(),
                          "advantage": r["advantages"][i].item(),
                          "rewards": {n: None if math.isnan(v) else v for n, v in zip(names, each)},
                          **{column: values[i] for column, values in r.get("extra", {}).items()}})
    if info.world_size > 1:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, lines)
        lines = [line for part in gathered for line in part][:cfg.grpo_log_completions]
    if info.is_main:
        for line in lines:
            log.write(line)


def evaluate_rewards(policy: LLM, path, cfg: TrainConfig, seq_len: int, reward_fns: list, rows: list | None,
                     info: DistInfo, step: int | None = None, reference=None) -> dict:
    """GRPO's eval (TRL's: the policy sampled and rewarded on the eval set): the mean reward of
    the policy's samples of the prompts of eval_batches fixed val batches (grpo_rollout: G samples
    each, as in training; seeded by batch and rank, so every eval draws alike), with val_ each of
    a generation's metrics as training logs them (TRL's eval_ ones: reward, reward_std,
    frac_reward_zero_std, completions/*, rewards/<name>/mean and /std, the reward functions'
    log_metric; not the loss's; rloo: frac_reward_zero_std of the clipped, KL-penalized rewards and, with
    cfg.grpo_beta, kl, as TRL's RLOOTrainer logs them in eval too). rows: the val set's (data.read_rows),
    or None; reference: the trainer's grpo_reference (rloo with cfg.grpo_beta). cfg.grpo_generations_eval
    samples of each prompt where given (TRL's num_generations_eval), their groups' stats of that size."""
    cfg = replace(cfg, grpo_generations=cfg.grpo_generations_eval or cfg.grpo_generations)
    loader = make_loader(path, cfg, seq_len, cfg.seed + 1, info)
    sums = torch.zeros(7 + 2 * len(reward_fns), dtype=torch.float64)  # grpo_rollout's "stats", added up
    rollouts = []
    for b in range(cfg.eval_batches):
        batch = loader.next_batch()
        seed = int(np.random.default_rng([cfg.seed, b, info.rank, 1]).integers(2 ** 62))
        rollouts.append(grpo_rollout(policy, batch, cfg, reward_fns, torch.Generator(info.device).manual_seed(seed),
                                     grpo_rows(rows, loader.docs, batch[2], loader.offsets), step))
    rloo = cfg.grpo_loss_type == "rloo"
    if rloo:  # (TRL's eval: the rewards clipped and less beta times the KL to the reference, as in training)
        if cfg.grpo_beta:
            grpo_rollout_passes(rollouts, cfg, policy, reference, p_old=True)
        rloo_advantages(rollouts, cfg, info)  # (its stats' frac_reward_zero_std; "kl")
    elif cfg.grpo_multi_objective_aggregation == "normalize_then_sum":
        gdpo_rewards(rollouts, cfg, info)  # (frac_reward_zero_std: the std of their sums)
    for r in rollouts:
        sums += r["stats"]
    sums = torch.cat([all_reduce_sum(sums, info), torch.zeros(5, dtype=torch.float64)])  # (no loss's sums)
    means = generation_metrics(sums, rollouts, cfg, info)
    if rloo and cfg.grpo_beta and rollouts:
        means["kl"] = rollouts[0]["kl"]
    means.update(reward_metric_means(reward_fns, info))
    return {f"val_{name}": value for name, value in means.items()}


@torch.no_grad()
def evaluate_preference(model, path, reference: np.ndarray | None, cfg: TrainConfig, seq_len: int, precision: str,
                        info: DistInfo) -> dict:
    """{"val_loss": the preference loss's mean, "val_reward_accuracy": the reward accuracy (the
    chosen reply's reward above the rejected one's), ...} over the preference pairs of eval_batches
    fixed val batches, with val_ each of the step's metrics (preference_metrics: TRL's eval_ ones):
    the rewards' and log-probabilities' means over the pairs, KTO's and the token metrics each batch's
    over every rank, then their mean. NaN loss and accuracy where the batches hold no pair."""
    loader = make_loader(path, cfg, seq_len, cfg.seed + 1, info)
    names = preference_stat_names(cfg.preference)
    token_stats = cfg.token_stats and cfg.preference != "reward"
    model.eval()
    total, pairs = torch.zeros(1 + len(names), device=info.device), 0
    sums = PreferenceSums(cfg.preference, cfg.eval_batches, token_stats, info.device)
    for i in range(cfg.eval_batches):
        batch = (*loader.next_batch(), loader.docs)
        with autocast(precision, info.device):
            loss, stats, *tokens = preference_batch_loss(model, batch, reference, loader.labels, loader.margins,
                                                         token_stats=token_stats, **preference_options(cfg))
        total += torch.cat([loss.float()[None], stats[:len(names)].float()]) * loader.placed
        sums.add(i, stats, tokens)
        pairs += loader.global_placed
    model.train()
    if not pairs:  # (none in the val batches: NaN, not a best loss of 0)
        return {"val_loss": float("nan"), "val_reward_accuracy": float("nan")}
    loss, *means = (all_reduce_sum(total.double(), info) / pairs).tolist()
    metrics = sums.metrics(dict(zip(names, means)), info)
    return {"val_loss": loss, **{f"val_{name}": value for name, value in metrics.items()}}


@torch.no_grad()
def document_logps(model, path, batch_size: int, seq_len: int, precision: str, info: DistInfo,
                   ld_alpha: float | None = None) -> np.ndarray:
    """Every document's sequence_logps (float64, by document index) of a set of documents
    (write_documents' files; pairs too), under model as it is now, in eval mode: one pass over the
    documents in their order, packed and cut as training packs them (PackedLoader); every rank runs
    the same number of forwards (FSDP2 gathers in each), each on its own rows. ld_alpha (pairs):
    LD-DPO's weighting of each pair's replies (ld_weighted)."""
    loader = PackedLoader(path, batch_size, seq_len, 0, info.rank, info.world_size, info.device, shuffle=False)
    n = len(loader.offsets) - 1
    sums = torch.zeros(2, n, dtype=torch.float64, device=info.device)  # log-probabilities, times computed
    was_training = model.training
    model.eval()
    while True:
        x, y, cu = loader.next_batch()
        with autocast(precision, info.device):
            logps = sequence_logps(ld_weighted(model(x, y, cu, per_token=True)[1], y, cu, loader.docs, ld_alpha), cu)
        real = [i for i, d in enumerate(loader.docs) if d >= 0]
        docs = torch.tensor([loader.docs[i] for i in real], dtype=torch.long, device=info.device)
        sums[0].index_add_(0, docs, logps[real].double())  # a document of the next epoch's first batch may come twice
        sums[1].index_add_(0, docs, torch.ones_like(docs, dtype=torch.float64))
        if loader.epoch > 0 or (loader.cursor == loader.units and not loader.waiting):
            break
    model.train(was_training)
    if info.world_size > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).cpu().numpy()


def reference_logps(model, path, cfg: TrainConfig, seq_len: int, precision: str, info: DistInfo) -> np.ndarray:
    """DPO's reference model: document_logps of the starting model, computed once before training
    (as TRL's precompute_ref_log_probs), so that no second model is held in memory; with cfg.ld_alpha
    LD-DPO's weighted sums (TRL's compute_ref_log_probs)."""
    return document_logps(model, path, cfg.batch_size, seq_len, precision, info, cfg.ld_alpha)


def ld_weighted(token_logps: torch.Tensor, y: torch.Tensor, cu: torch.Tensor, docs, ld_alpha: float | None):
    """LD-DPO (Liu et al. 2024; TRL's ld_alpha): a packed batch's per-target log-probabilities
    token_logps (B, T) (targets y, cu_seqlens; docs: each segment's document, -1 for padding, a pair's
    chosen and rejected documents one after the other) with each reply's trained targets past the
    first `shared` of them times ld_alpha, shared = the smaller of its pair's two counts of trained
    targets; token_logps itself where ld_alpha is None."""
    if ld_alpha is None:
        return token_logps
    tail = ld_tail(y, cu, docs)
    return torch.where(tail, token_logps * ld_alpha, token_logps)


def ld_tail(y: torch.Tensor, cu: torch.Tensor, docs) -> torch.Tensor:
    """(B, T) bool: ld_weighted's targets past their pair's shared length (TRL's tail_mask)."""
    from pyllm.nn import document_ids

    B, T = y.shape
    trained = (y != -1).reshape(-1).long()
    doc = document_ids(cu, B, T).reshape(-1).long()
    n = cu.numel() - 1
    counts = torch.zeros(n, dtype=torch.long, device=y.device).index_add_(0, doc, trained)
    before = torch.zeros(n, dtype=torch.long, device=y.device)  # each document's trained targets before it
    before[1:] = counts.cumsum(0)[:-1]
    rank = trained.cumsum(0) - before[doc]  # a trained target's position among its document's (1, 2, ...)
    real = [i for i, d in enumerate(docs) if d >= 0]
    shared = torch.full((n,), y.numel() + 1, dtype=torch.long, device=y.device)  # (not a pair's: no tail)
    if real:
        chosen = torch.tensor(real[0::2], dtype=torch.long, device=y.device)
        rejected = torch.tensor(real[1::2], dtype=torch.long, device=y.device)
        least = torch.minimum(counts[chosen], counts[rejected])
        shared[chosen], shared[rejected] = least, least
    return ((trained > 0) & (rank > shared[doc])).view(B, T)


def lora_off_token_logps(model: LLM, wrapped, temperature: float = 1.0):
    """f(x, y, cu_seqlens) -> each target's log-probability (B, T) (0 where none) by the model with
    its LoRA updates off (LLM.lora_disabled), in eval mode, without gradients: a LoRA run's
    reference model at the cost of one more forward per step."""
    @torch.no_grad()
    def reference(x, y, cu) -> torch.Tensor:
        training = wrapped.training
        wrapped.eval()
        with model.lora_disabled():
            logps = wrapped(x, y, cu, per_token=True, temperature=temperature)[1]
        wrapped.train(training)
        return logps

    return reference


def lora_off_reference(model: LLM, wrapped, ld_alpha: float | None = None):
    """The reference log-probabilities of a batch's segments computed on the fly by the model with
    its LoRA updates off (lora_off_token_logps): no pass before training. ld_alpha: LD-DPO's
    weighting of each pair's replies (ld_weighted)."""
    token_logps = lora_off_token_logps(model, wrapped)
    return lambda batch: sequence_logps(ld_weighted(token_logps(*batch[:3]), batch[1], batch[2], batch[3], ld_alpha),
                                        batch[2])


def model_reference(reference: LLM, ld_alpha: float | None = None):
    """The reference log-probabilities of a batch's segments computed on the fly by a frozen reference
    model (TRL's ref_model when it does not precompute them): one more forward per step, and a model
    that sync_ref_model may move. ld_alpha: as lora_off_reference's."""
    @torch.no_grad()
    def of(batch):
        x, y, cu = batch[:3]
        return sequence_logps(ld_weighted(reference(x, y, cu, per_token=True)[1], y, cu, batch[3], ld_alpha), cu)

    return of


def pack_in_order(lengths: list[int], T: int) -> tuple[list[int], list[int], list[int]]:
    """Sequences of these lengths (each <= T) packed in their order into rows of T, a row taking
    the next one while it fits (the rest of a row is padding, a segment of its own): (each
    sequence's start in the rows' positions, its segment's index in cu_seqlens, cu_seqlens: at
    least one row, cu_seqlens[-1] // T of them)."""
    starts, at, cu, used = [], [], [0], 0
    for length in lengths:
        if used + length > T:  # the row is full: pad it out
            if used < T:
                cu.append(cu[-1] + T - used)
            used = 0
        starts.append(cu[-1])
        at.append(len(cu) - 1)
        cu.append(cu[-1] + length)
        used += length
    if used < T or not lengths:
        cu.append(cu[-1] + T - used)
    return starts, at, cu


def segments_alone(x: torch.Tensor, y: torch.Tensor, cu: torch.Tensor, segments: list[int]) -> tuple:
    """(x, y, cu_seqlens, at): the packed batch (x, y (B, T), cu) cut to some of its segments
    (indices into cu's), packed again in their order (pack_in_order); at: the index of each taken
    segment in the new cu_seqlens. What a pass over part of a batch computes with: each segment is
    computed alone either way, and the rows left out are work saved."""
    T = x.shape[1]
    offsets = cu.tolist()
    lengths = [offsets[s + 1] - offsets[s] for s in segments]
    starts, at, cu_new = pack_in_order(lengths, T)
    index = torch.full((cu_new[-1],), -1, dtype=torch.long)  # each new position's old one (-1: padding)
    for s, start, length in zip(segments, starts, lengths):
        index[start:start + length] = torch.arange(offsets[s], offsets[s] + length)
    index = index.view(-1, T).to(x.device)
    taken = index.clamp(min=0)
    return (torch.where(index >= 0, x.view(-1)[taken], 0), torch.where(index >= 0, y.view(-1)[taken], -1),
            torch.tensor(cu_new, dtype=torch.int32, device=x.device), at)


def segment_logps(model, batch, segments: list[int], token_stats: bool = False):
    """Each of a packed batch's segments' summed log-probability (sequence_logps) from a pass of
    the model over those segments alone (segments_alone). token_stats: -> (those, their
    document_stats)."""
    x, y, cu, at = segments_alone(*batch[:3], segments)
    logps = sequence_logps(model(x, y, cu, per_token=True, token_stats=token_stats,
                                 **balance_kwargs(model, x, cu, at))[1], cu)[at]
    return (logps, document_stats(model, cu)[at]) if token_stats else logps


def document_stats(model, cu: torch.Tensor) -> torch.Tensor:
    """(N, 3): each of cu_seqlens' N documents' sums over its targets of the last forward's
    token statistics (LLM.token_stats_rows: entropy, argmax hits, mean logits). model: the LLM or
    its wrapper."""
    rows = getattr(model, "module", model).token_stats_rows  # (B, T, 3) (DDP's; compile's, FSDP's: through)
    return torch.stack([sequence_logps(rows[..., k], cu) for k in range(3)], dim=1)


def balance_kwargs(model, x: torch.Tensor, cu: torch.Tensor | None, segments) -> dict:
    """{"token_mask": LLM.forward's token_mask} for a packed batch (x (B, T), cu_seqlens) whose
    documents are the given segments of cu (the rest: padding): True at their tokens, so that a
    MoE's load-balancing loss leaves the padding out, as transformers' does with its attention_mask.
    {} where nothing reads it (no MoE balancing, or plain windows: no padding). model: the LLM, or
    its wrapper (DDP's .module; compile's and FSDP's take the LLM's attributes)."""
    cfg = getattr(model, "module", model).config
    if cu is None or not (cfg.n_experts and cfg.router_aux_loss_coef):
        return {}
    real = torch.zeros(len(cu) - 1, dtype=torch.bool)
    real[list(segments)] = True
    mask = real.to(cu.device, non_blocking=True).repeat_interleave(cu.diff(), output_size=x.numel()).view(x.shape)
    return {"token_mask": mask}


def batch_balance_kwargs(model, batch) -> dict:
    """balance_kwargs of a packed batch (x, y, cu_seqlens, docs: the loader's document of each
    segment, -1 for padding); {} for a batch without docs (windows)."""
    if len(batch) < 4:
        return {}
    return balance_kwargs(model, batch[0], batch[2], [i for i, d in enumerate(batch[3]) if d >= 0])


# The preference losses whose every pair's loss depends on that pair alone: with fused_loss their
# gradients are made in the forward, a chunk of whole pairs at a time (LLM.forward's sequence_loss);
# KTO's each example's alone once the batch's KL estimate is known (its pass comes first).
FUSED_PREFERENCE_LOSSES = DPO_LOSSES + ("simpo", "orpo", "kto")


def preference_batch_loss(model, batch, reference, labels: np.ndarray | None = None,
                          margins: np.ndarray | None = None, fused: bool = False, token_stats: bool = False,
                          ld_alpha: float | None = None, **options) -> tuple[torch.Tensor, ...]:
    """The mean preference loss (nn.preference_loss with options: kind, beta, ...) over a
    PackedLoader batch's pairs (x, y, cu_seqlens, docs: each pair's chosen and rejected documents
    one after the other), and the means of the chosen and rejected rewards and of the accuracy
    (chosen above rejected), detached. 0 for a batch without pairs. reference: reference_logps's
    array, or a function of the batch giving every segment's (lora_off_reference), or None (the
    reference-free losses). KTO: labels, each pair's (the loader's), and the stats are the mean
    rewards of the desirable and of the undesirable examples and the share whose reward lies on its
    label's side of the KL baseline (beta z: above for desirable, below for undesirable). Reward
    models: margins, each pair's (the loader's), subtracted from the score difference; the stats then
    end with minus the least and the largest score of the batch (-inf, -inf without pairs). fused (a
    pyllm LLM with fused_loss, not compiled, not fp16; the FUSED_PREFERENCE_LOSSES): the loss fused
    with the output layer, pairs whole (nn.linear_sequence_loss: three matmuls of it, not four); the
    same loss and gradients. A MoE's aux_loss is the caller's to add, fused or not.
    token_stats (not reward models): -> (the loss, the stats, the sums over the batch of TRL's
    DPOTrainer / KTOTrainer token metrics (7,): the entropy over the trained replies' tokens (KTO:
    the examples', not the KL documents'), their number, the chosen replies' tokens that are the
    argmax, their number, the chosen and the rejected replies' mean logits (KTO: the desirable and
    the undesirable examples'), the rejected replies' tokens), from the loss's own pass
    (LLM.forward's token_stats). ld_alpha (the dpo family, DPO_LOSSES): LD-DPO's log-probabilities
    (ld_weighted), the policy's; the reference's are the caller's to weigh alike (reference_logps,
    lora_off_reference with cfg.ld_alpha); the token counts stay plain."""
    x, y, cu, docs = batch
    if token_stats and options.get("kind") == "reward":
        raise ValueError("preference_batch_loss: token_stats goes with the preference losses of a language model, not "
                         "a reward model's scores")
    if ld_alpha is not None and options.get("kind") not in DPO_LOSSES:
        raise ValueError(f"preference_batch_loss: ld_alpha goes with the dpo family, not {options.get('kind')!r}")
    real = [i for i, d in enumerate(docs) if d >= 0]
    ref = None
    if callable(reference):
        ref = reference(batch)[real]
    elif reference is not None:
        ref = torch.from_numpy(reference[[docs[i] for i in real]])
    chosen, rejected = real[0::2], real[1::2]
    tokens = sequence_logps((y != -1).to(torch.float32), cu)  # each segment's trained tokens (exact counts)
    desirable = kl = fused_total = None
    doc_stats = None  # token_stats: (N, 3) of every segment, or (KTO) of each example
    if fused and options.get("kind") in FUSED_PREFERENCE_LOSSES and options.get("kind") != "kto" and real:
        tokens_real = tokens[real]

        def pair_losses(logps, d0, d1):  # the pairs of real documents d0 .. d1 - 1
            seg = slice(d0, d1)
            ref_of = None if ref is None else ref[seg].to(logps)
            tokens_of = tokens_real[seg].to(logps)
            return preference_loss(chosen_logps=logps[0::2], rejected_logps=logps[1::2], chosen_tokens=tokens_of[0::2],
                                   rejected_tokens=tokens_of[1::2],
                                   ref_chosen_logps=None if ref_of is None else ref_of[0::2],
                                   ref_rejected_logps=None if ref_of is None else ref_of[1::2], **options)[0].sum()

        # (each target's weight in its reply's sum: ld_weighted of ones, the unfused path's weighting)
        weights = None if ld_alpha is None else ld_weighted(torch.ones(y.shape, dtype=torch.float64, device=y.device),
                                                            y, cu, docs, ld_alpha)
        logps, fused_total = model(x, y, cu, sequence_loss={"documents": real, "group": 2, "loss_fn": pair_losses,
                                                            **({} if weights is None else {"token_weights": weights})},
                                   token_stats=token_stats, **balance_kwargs(model, x, cu, real))
        chosen_logps, rejected_logps = logps[0::2], logps[1::2]
        doc_stats = document_stats(model, cu) if token_stats else None
        ref = None if ref is None else ref.to(logps)
    elif options.get("kind") == "kto":  # a unit's documents are 2u, 2u + 1 (prepare_kto)
        # The KL documents (the mismatched completions) only give the detached estimate z: a
        # forward without autograd over them alone (TRL's KL pass), before the examples' pass so
        # that the model's aux_loss is the examples'. In one pass with the examples they would
        # take half of the backward's work for no gradient.
        if options.get("kto_loss") == "apo_zero_unpaired":  # no KL estimate (TRL's calculate_KL off): no KL pass
            ref = ref.to(x.device)
            rejected_logps, kl = ref[1::2], ref.new_zeros(())  # (the KL documents' log-ratios: 0, unused)
        else:
            with torch.no_grad():
                rejected_logps = segment_logps(model, batch, rejected)
            ref = None if ref is None else ref.to(rejected_logps)
            # The KL estimate over all ranks' pairs of this micro-step (TRL gathers it too): the same
            # global rows give the same z whatever the number of processes.
            kl_sums = torch.stack([(rejected_logps - ref[1::2]).sum(), torch.tensor(float(len(rejected)))
                                   .to(rejected_logps)])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(kl_sums)
            kl = kl_sums[0] / kl_sums[1].clamp(min=1)
        desirable = torch.tensor(labels[[docs[i] // 2 for i in chosen]], dtype=torch.bool, device=rejected_logps.device)
        if fused and chosen:  # each example's loss alone, z known: fused with the output layer
            x_alone, y_alone, cu_alone, at = segments_alone(x, y, cu, chosen)

            def example_losses(logps, d0, d1):
                seg = slice(d0, d1)
                ref_of = ref[0::2][seg].to(logps)
                return preference_loss(chosen_logps=logps, rejected_logps=logps.detach(),
                                       chosen_tokens=torch.ones_like(logps), rejected_tokens=torch.ones_like(logps),
                                       ref_chosen_logps=ref_of, ref_rejected_logps=ref_of, desirable=desirable[seg],
                                       kl=kl, **options)[0].sum()

            chosen_logps, fused_total = model(x_alone, y_alone, cu_alone, sequence_loss={
                "documents": list(at), "group": 1, "loss_fn": example_losses}, token_stats=token_stats,
                **balance_kwargs(model, x_alone, cu_alone, at))
            doc_stats = document_stats(model, cu_alone)[at] if token_stats else None
        elif token_stats and chosen:
            chosen_logps, doc_stats = segment_logps(model, batch, chosen, token_stats=True)
        else:
            chosen_logps = segment_logps(model, batch, chosen)
        ref, rejected_logps, kl = ref.to(chosen_logps), rejected_logps.to(chosen_logps), kl.to(chosen_logps)
    else:  # (N,) of every segment, padding too: log-probabilities, or a reward model's scores
        balance = balance_kwargs(model, x, cu, real)
        logps = (model(x, y, cu, scores=True, **balance)[1][:, 0] if options.get("kind") == "reward"
                 else sequence_logps(ld_weighted(model(x, y, cu, per_token=True, token_stats=token_stats, **balance)[1],
                                                 y, cu, docs, ld_alpha), cu))
        chosen_logps, rejected_logps = logps[chosen], logps[rejected]
        doc_stats = document_stats(model, cu) if token_stats else None
        ref = None if ref is None else ref.to(logps)
    tokens = tokens.to(chosen_logps)
    if margins is not None and options.get("kind") == "reward":  # a pair's documents are 2p, 2p + 1
        options = {**options, "margin": torch.from_numpy(margins[[docs[i] // 2 for i in chosen]]).to(chosen_logps)}
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_tokens=tokens[chosen],
        rejected_tokens=tokens[rejected], ref_chosen_logps=None if ref is None else ref[0::2],
        ref_rejected_logps=None if ref is None else ref[1::2], desirable=desirable, kl=kl, **options)
    n = max(len(chosen), 1)
    if fused_total is not None:  # (losses above: the same formula on the detached log-probabilities)
        losses = fused_total
    if desirable is not None:  # the accuracy: the reward on the label's side of the KL baseline beta z
        good, bad = chosen_rewards[desirable], chosen_rewards[~desirable]
        baseline = options.get("beta", 0.1) * kl.clamp(min=0)
        # sums and counts (stats[3:]): the step's means are over the examples of each label that it
        # had, as TRL logs them (a micro-batch without undesirable examples adds no 0 to their mean)
        logps = chosen_logps.detach()  # (then TRL's logps/chosen, logps/rejected: the labels' summed logps)
        stats = torch.stack([good.sum() / max(len(good), 1), bad.sum() / max(len(bad), 1),
                             ((chosen_rewards > baseline) == desirable).to(chosen_rewards.dtype).sum() / n,
                             good.sum(), bad.sum(), good.new_tensor(len(good)), bad.new_tensor(len(bad)),
                             kl.clamp(min=0).detach().to(good), logps[desirable].sum().to(good),
                             logps[~desirable].sum().to(good)])
    else:  # preference_stat_names(kind)'s sums over the pairs, / n
        stats = [chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).sum()]
        kind = options.get("kind")
        if kind != "reward":  # TRL's logps/*: DPOTrainer's summed, CPOTrainer's (simpo) and ORPOTrainer's per token
            c, r = chosen_logps.detach(), rejected_logps.detach()
            if kind in ("simpo", "orpo"):
                c, r = c / tokens[chosen].clamp(min=1), r / tokens[rejected].clamp(min=1)
            stats += [c.sum(), r.sum()]
            if kind == "orpo":  # ORPOTrainer's log_odds_ratio (the term's logsigmoid) and log_odds_chosen
                log_odds = orpo_log_odds(c) - orpo_log_odds(r)
                stats += [-c.sum(), torch.nn.functional.logsigmoid(log_odds).sum(), log_odds.sum()]
        stats = torch.stack(stats) / n
        if kind == "reward":  # then -min and max of the batch's scores (RewardTrainer's min_reward, max_reward)
            scores = torch.cat([chosen_rewards, rejected_rewards]).detach().to(stats)
            stats = torch.cat([stats, -scores.min()[None], scores.max()[None]] if len(scores)
                              else [stats, stats.new_full((2,), -math.inf)])
    if not token_stats:
        return losses.sum() / n, stats
    if desirable is not None:  # KTO: doc_stats by example; chosen and rejected are the labels
        ex = doc_stats.to(tokens) if doc_stats is not None else tokens.new_zeros(0, 3)
        t = tokens[chosen]
        sums = [ex[:, 0].sum(), t.sum(), ex[desirable, 1].sum(), t[desirable].sum(), ex[desirable, 2].sum(),
                ex[~desirable, 2].sum(), t[~desirable].sum()]
    else:
        c, r, tc, tr = doc_stats[chosen].to(tokens), doc_stats[rejected].to(tokens), tokens[chosen], tokens[rejected]
        sums = [c[:, 0].sum() + r[:, 0].sum(), tc.sum() + tr.sum(), c[:, 1].sum(), tc.sum(), c[:, 2].sum(),
                r[:, 2].sum(), tr.sum()]
    return losses.sum() / n, stats, torch.stack(sums)


def micro_step_mean(per: list, num: int, den: int, skip_empty: bool = False) -> float | None:
    """The mean over the micro-steps (per: each one's sums over every rank) of each one's ratio
    per[num] / per[den], as TRL logs a step's metrics: a micro-step whose count is 0 adds 0.0, or with
    skip_empty is left out (None where every one is)."""
    each = [m[num] / m[den] if m[den] else 0.0 for m in per if m[den] or not skip_empty]
    return sum(each) / len(each) if each else None


def extreme_means(extremes: torch.Tensor) -> tuple[float | None, float | None]:
    """(the mean least, the mean largest) over the micro-steps from each one's (-least, largest)
    over every rank (extremes (steps, 2), MAX-reduced: -inf where a micro-step had none, left out;
    None where none had)."""
    def finite_mean(values) -> float | None:
        kept = [v for v in values if math.isfinite(v)]
        return sum(kept) / len(kept) if kept else None

    return finite_mean(-a for a, _ in extremes.tolist()), finite_mean(b for _, b in extremes.tolist())


class PreferenceSums:
    """What preference_metrics reads beside the pairs' means, per micro-step of a step (or val batch),
    as the trainer and evaluate_preference collect it: KTO's preference_batch_loss stats[3:10], the
    token statistics' sums (token_stats: its third output), a reward model's -least and largest
    scores (stats[3:5])."""

    def __init__(self, kind: str, n: int, token_stats: bool, device):
        self.kind, self.token_stats = kind, token_stats
        self.kto, self.tokens = (torch.zeros(n, 7, device=device) for _ in range(2))
        self.extremes = torch.zeros(n, 2, device=device)

    def add(self, i: int, stats: torch.Tensor, extra: list) -> None:
        """Micro-step (batch) i's preference_batch_loss stats and its outputs after them (extra)."""
        if self.kind == "kto":
            self.kto[i] = stats[3:10]
        elif self.kind == "reward":
            self.extremes[i] = stats[3:5]
        if self.token_stats:
            self.tokens[i] = extra[0]

    def metrics(self, means: dict, info: DistInfo) -> dict:
        """preference_metrics of the pairs' means and these sums over every rank (collectives: every rank calls)."""
        return preference_metrics(
            self.kind, means, all_reduce_sum(self.kto, info) if self.kind == "kto" else None,
            all_reduce_sum(self.tokens, info) if self.token_stats else None, info.world_size,
            all_reduce_sum(self.extremes, info, dist.ReduceOp.MAX) if self.kind == "reward" else None)


def preference_metrics(kind: str, means: dict, kto_sums: torch.Tensor | None = None,
                       token_sums: torch.Tensor | None = None, world_size: int = 1,
                       extremes: torch.Tensor | None = None) -> dict:
    """The logged preference metrics of a step (or of the val batches) as TRL logs them: means, the
    means over the pairs of preference_stat_names(kind)'s stats; KTO: kto_sums, each micro-step's
    (batch's) preference_batch_loss stats[3:10] over every rank (then rewards/* and logps/* are each
    label's means over the micro-steps that had one, None where none had; kl the micro-steps' mean
    of z); token_sums: each one's token sums over every rank (preference_token_means); reward
    models: extremes, each one's -least and largest score over every rank (stats[3:5], a MAX),
    give RewardTrainer's min_reward and max_reward (the mean over the micro-steps that had pairs,
    None where none had), beside mean_reward (the mean score over the pairs)."""
    means = dict(means)
    chosen, rejected, accuracy = (means.pop(f"reward_{name}") for name in ("chosen", "rejected", "accuracy"))
    out = {}
    if kind == "kto":  # TRL's rewards/chosen, rejected (None when the step had none), kl
        per = kto_sums.tolist()  # (z is every rank's alike: summed world_size times)
        # the micro-steps' means over their examples of a label
        chosen, rejected = micro_step_mean(per, 0, 2, True), micro_step_mean(per, 1, 3, True)
        out.update(logps_chosen=micro_step_mean(per, 5, 2, True), logps_rejected=micro_step_mean(per, 6, 3, True))
        margins = [g / ng - b / nb for g, b, ng, nb, *_ in per if ng and nb]
        out["kl"] = sum(m[4] for m in per) / (len(per) * world_size)
        margin = sum(margins) / len(margins) if margins else None
    else:
        margin = None if chosen is None or rejected is None else chosen - rejected
    out.update(reward_chosen=chosen, reward_rejected=rejected, reward_margin=margin, reward_accuracy=accuracy, **means)
    if extremes is not None:
        least, largest = extreme_means(extremes)
        mean = None if chosen is None or rejected is None else (chosen + rejected) / 2
        out.update(min_reward=least, mean_reward=mean, max_reward=largest)
    if token_sums is not None:
        out.update(preference_token_means(token_sums, kind == "kto"))
    return out


def preference_stat_names(kind: str) -> list[str]:
    """The names in log.jsonl of preference_batch_loss's stats (the KTO ones' first three): TRL's
    rewards/chosen, rewards/rejected, rewards/accuracies, logps/chosen, logps/rejected and, ORPO's,
    nll_loss (here the NLL term of pyllm's loss: each pair's mean over its reply, TRL's a token mean
    over the chosen sequences with their prompts), log_odds_ratio, log_odds_chosen."""
    names = ["reward_chosen", "reward_rejected", "reward_accuracy"]
    if kind not in ("reward", "kto"):  # (KTO's logps: each label's, as its rewards, from the kto sums)
        names += ["logps_chosen", "logps_rejected"]
    if kind == "orpo":
        names += ["nll_loss", "log_odds_ratio", "log_odds_chosen"]
    return names


def preference_token_means(sums: torch.Tensor, kto: bool = False) -> dict:
    """TRL's DPOTrainer token metrics of a step (KTOTrainer's: no mean_token_accuracy) from each
    micro-step's preference_batch_loss token sums over every rank (grad_accum, 7): each micro-step's
    ratios, then their mean over the micro-steps: entropy (over every trained reply's tokens),
    mean_token_accuracy (the chosen replies'), logits_chosen and logits_rejected (TRL's logits/*: the
    mean logit over the vocabulary, averaged over those replies' tokens). A micro-step without
    such tokens adds 0.0, as DPOTrainer's; KTOTrainer's logits/* leave it out (None when none had any)."""
    per = sums.tolist()
    out = {"entropy": micro_step_mean(per, 0, 1)}
    if not kto:
        out["mean_token_accuracy"] = micro_step_mean(per, 2, 3)
    out.update(logits_chosen=micro_step_mean(per, 4, 3, kto), logits_rejected=micro_step_mean(per, 5, 6, kto))
    return out


def token_stat_means(sums: torch.Tensor) -> tuple[float, float]:
    """(entropy, mean_token_accuracy) of a step as TRL's SFTTrainer logs them, from each micro-step's
    (entropy sum, targets the argmax, targets) summed over every rank (grad_accum, 3): each
    micro-step's ratios (0.0 for one without targets), then their mean over the micro-steps."""
    per = sums.tolist()
    return micro_step_mean(per, 0, 2), micro_step_mean(per, 1, 2)


def packed_loss(model, batch, token_stats: bool = False, token_scaling: bool = False) -> torch.Tensor:
    """The mean loss over a PackedLoader batch's trained tokens, as model(*batch)[1], from the
    per-token log-probabilities: the output layer runs at the trained positions only (the prompts',
    users' and padding's tokens take no logits; the assistant's share of a conversation is often
    half or less). Not with fused_loss, whose forward already computes the loss at those positions
    alone, its gradients in the forward (linear_token_logps would recompute the logits).
    token_scaling: DFT's, each token's loss times its probability, held constant (TRL's)."""
    x, y, cu = batch[:3]
    logps = model(x, y, cu, per_token=True, token_stats=token_stats, **batch_balance_kwargs(model, batch))[1]
    if token_scaling:
        logps = logps * logps.detach().exp()  # (0 where the target is -1: logps are 0 there, times 1)
    return -logps.sum() / (y != -1).sum().clamp(min=1)


def load_frozen(spec: str, precision: str, device: torch.device, adapter=None) -> LLM:
    """A model to compute with, not train: a pyllm run folder (its model.safetensors) or weights
    file, else a Hugging Face checkpoint folder or hub id (with a PEFT adapter merged in), frozen, in
    eval mode, on device, its weights in the compute dtype (bf16 / fp16 runs: no fp32 copy, as no
    optimizer steps it)."""
    path = Path(spec)
    if path.suffix == ".safetensors" or (path.is_dir() and not (path / "config.json").exists()):
        model = LLM.load(path if path.suffix == ".safetensors" else source_run_weights(path))
    else:
        model = LLM.from_hf(spec, adapter=adapter)
    model = model.to(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)).eval()
    model.requires_grad_(False)
    return model


def load_teacher(cfg: TrainConfig, student: LLM, precision: str, device: torch.device) -> LLM:
    """The distillation teacher (cfg.teacher: load_frozen's). It must predict over the student's
    vocabulary."""
    teacher = load_frozen(cfg.teacher, precision, device)
    seq_len = cfg.seq_len or student.config.block_size
    if teacher.config.block_size < seq_len:
        raise ValueError(f"teacher {cfg.teacher}: its context is {teacher.config.block_size} tokens, shorter than the "
                         f"rows of {seq_len} it would read (--seq-len); give a shorter --seq-len")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher {cfg.teacher}: its vocabulary has {teacher.config.vocab_size} ids, the student's "
                         f"{student.config.vocab_size}: distillation compares their next-token distributions id by id "
                         "(the same tokenizer)")
    return teacher


def distill_loss(model, teacher: LLM, batch, cfg: TrainConfig) -> torch.Tensor:
    """The distillation loss of a batch (x, y, cu_seqlens or None[, docs]) at its trained targets:
    the teacher's final hidden states there (no autograd), then the student's fused divergence from
    them (LLM.forward's distill)."""
    with torch.no_grad():
        teacher_hidden = teacher(*batch[:3], hidden=True)[1]
    return model(*batch[:3], **batch_balance_kwargs(model, batch),
                 distill={"teacher_hidden": teacher_hidden, "teacher_weight": teacher.lm_head.weight,
                          "teacher_logits": teacher.logit_shape(), "beta": cfg.distill_beta,
                          "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha})[1]


def last_reply_prompts(batch, limit: int, segments: list | None = None) -> list[list[int]]:
    """The prompt of each conversation of a packed batch (x, y, cu_seqlens) that has trained targets:
    its tokens before its last reply (the last run of trained targets; earlier replies kept), those
    of fewer than limit tokens. segments (a list): each prompt's index among cu_seqlens' segments
    is appended to it."""
    x, y, cu = batch[:3]
    offsets = cu.tolist()
    tokens, trained = x.view(-1).tolist(), (y.view(-1) != -1).tolist()
    prompts = []
    for segment, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        first = end - 1  # back to the last trained target, then to the first of its run: the last reply's
        while first >= start and not trained[first]:
            first -= 1
        if first < start:
            continue
        while first > start and trained[first - 1]:
            first -= 1
        if first + 1 - start < limit:  # the prompt: up to the token whose target is the reply's first
            prompts.append(tokens[start:first + 1])
            if segments is not None:
                segments.append(segment)
    return prompts


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Within: a model sharded by FSDP2 (fully_shard on each block and the model) holds its whole
    parameters on every rank, each block's left gathered after its forward, so generation (which
    calls the model's parts, not its forward, a token at a time) gathers once instead of once per
    token and layer; resharded after. Every rank must enter (the gathers are collectives); what
    runs inside is each rank's own (no collectives: ranks may sample different numbers of tokens).
    TRL's unwrap_model_for_generation. A model without FSDP: nothing happens."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 (as wrap_model's fully_shard)
        from torch.distributed._composable.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    # FSDP2 names its root at the first forward through it: the model, never a block run alone.
    model._get_fsdp_state()._lazy_init()
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for block in blocks:
        _set_reshard_after_forward(block, False)
    for m in (model, *blocks):
        m.unshard()
    try:
        yield
    finally:
        for m in (model, *blocks):
            m.reshard()
        for block in blocks:  # (fully_shard's default, as wrap_model applies it)
            _set_reshard_after_forward(block, True)
        _forget_forwards(model, blocks)


def _forget_forwards(model, blocks) -> None:
    """Drops what FSDP2 recorded of the forwards run inside gathered() (its post-forward order and each
    group's indices in it, kept for the next backward's prefetching and cleared only by a backward):
    a rank that had sampled would prefetch a block those forwards left last, an all-gather the others,
    having sampled nothing (no prompt got samples), do not make: the ranks' collectives part and hang."""
    found = True
    for m in (model, *blocks):
        for group in _fsdp_groups(m):
            indices = getattr(group, "_post_forward_indices", None)
            found = found and indices is not None
            if indices is not None:
                indices.clear()
    order = getattr(getattr(model._get_fsdp_state(), "_comm_ctx", None), "post_forward_order", None)
    if order is not None:
        order.clear()
    if (order is None or not found) and not _warned_fsdp_internals:
        # (FSDP2's internals, named otherwise in this torch: a rank that sampled nothing may hang the others)
        _warned_fsdp_internals.append(True)
        warnings.warn(f"pyllm: torch {torch.__version__}'s FSDP2 keeps its post-forward order under other names: "
                      "the sampling's forwards are not forgotten, and ranks that sample different numbers of "
                      "prompts may hang in the next backward", stacklevel=2)


_warned_fsdp_internals: list = []


def _fsdp_groups(module) -> list:
    """A fully_shard module's FSDP2 parameter groups (internals: several a module from torch 2.10, one
    before, named otherwise), without the None of a module that holds no parameters of its own."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [getattr(state, "_fsdp_param_group", None)]
    return [group for group in groups if group is not None]


def _set_reshard_after_forward(block, reshard: bool) -> None:
    """FSDPModule.set_reshard_after_forward(reshard, recurse=False); torch 2.6 has no such method: its
    one param group's post-forward mesh is set as fully_shard(reshard_after_forward=reshard) sets it."""
    if hasattr(block, "set_reshard_after_forward"):
        block.set_reshard_after_forward(reshard, recurse=False)
        return
    for group in _fsdp_groups(block):
        group.post_forward_mesh_info = group.mesh_info if reshard else None


_warned_sample_room: list = []


def exact_copies(model, dtype: torch.dtype) -> dict:
    """The floating state of model that dtype does not hold exactly, each copied to the CPU in the
    narrowest of fp16 / fp32 that does: what a LoRA run's 16-bit frozen weights lose, kept for its
    merged export. Empty for a source of bf16 weights (the usual checkpoint) under bf16."""
    kept = {}
    for name, value in model.state_dict().items():
        if value.is_floating_point() and value.dtype != dtype and not torch.equal(value.to(dtype).to(value.dtype), value):
            exact16 = torch.equal(value.to(torch.float16).to(value.dtype), value)
            kept[name] = value.detach().to("cpu", torch.float16 if exact16 else torch.float32, copy=True)
    return kept


def reward_pad_id(cfg: TrainConfig) -> int | None:
    """The pad token of a reward model trained from a language model, as TRL's RewardTrainer sets
    it (its tokenizer's pad_token, else its eos_token, to config.pad_token_id): where its scores are
    read (LLM.forward's scores, transformers' *ForSequenceClassification: each sequence's last
    token that is not it). A Hugging Face source: its pad_token, else its eos_token
    (hf_special_tokens; else config.json's eos_token_id); a run of pyllm's: its tokenizer's <|endoftext|>;
    None where neither is known (each sequence's last token)."""
    from pyllm.data import EOT

    if cfg.init_from_hf:
        from pyllm.model import hf_folder
        from pyllm.tokenizer.tokenizer import hf_special_token_ids

        folder = hf_folder(cfg.init_from_hf)
        ids = hf_special_token_ids(folder)
        for role in ("pad_token", "eos_token"):
            if role in ids:
                return ids[role]
        eos = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        return eos if isinstance(eos, int) and not isinstance(eos, bool) else None
    if cfg.tokenizer and not str(cfg.tokenizer).endswith(".pkl"):
        from pyllm.tokenizer import Tokenizer

        return Tokenizer.load(str(cfg.tokenizer)).special_tokens.get(EOT)
    return None


def kto_weight_advice(labels, desirable_weight: float, undesirable_weight: float) -> str | None:
    """TRL's KTOTrainer's advice where the desirable and undesirable examples are unequal in number
    and neither weight is in the range that balances them (Ethayarajh et al. 2024, eq. 8: desirable
    weight x count over undesirable weight x count in [1, 4/3]); None where one is."""
    good = max(int(np.sum(labels)), 1)
    bad = max(len(labels) - good, 1)
    if good == bad:
        return None
    des = round(bad * undesirable_weight / good, 2), round(bad * undesirable_weight / good * 1.33, 2)
    und = round(good * desirable_weight / bad / 1.33, 2), round(good * desirable_weight / bad, 2)
    if des[0] <= desirable_weight <= des[1] or und[0] <= undesirable_weight <= und[1]:
        return None
    return (f"{good:,} desirable and {bad:,} undesirable examples: their weights balance them (TRL's advice, the KTO "
            f"paper's eq. 8) with EITHER --desirable-weight in [{des[0]}, {des[1]}] or --undesirable-weight in "
            f"[{und[0]}, {und[1]}] (not both)")


def sample_replies(model: LLM, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                   stop_tokens, generator: torch.Generator | None, limit: int | None = None,
                   top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                   repetition_penalty: float = 1.0) -> list[list[int]]:
    """Each prompt's sample (generate_batch: all at once, eval mode, no autograd, top_k, top_p, min_p
    and repetition_penalty as it takes them), in the model's own
    dtype outside autocast, at most max_new_tokens and what the model's block_size leaves. Under
    FSDP2 the whole model is gathered for it (gathered); every rank must call it then, with
    prompts or without."""
    # limit: the rows the samples are trained in (seq_len): a sample longer than them would be rewarded for
    # tokens that are cut away before training (pack_replies), its stop token among them
    room = min(model.config.block_size, limit or model.config.block_size)
    new = min(max_new_tokens, room - max((len(p) for p in prompts), default=0))
    if prompts and new < max_new_tokens and not _warned_sample_room:
        # once a run: a long prompt shortens every sample of its batch (generate_batch's one length), and
        # with grpo_mask_truncated those cut short are not trained on
        _warned_sample_room.append(True)
        warnings.warn(f"sample_replies: at most {new} new tokens (not {max_new_tokens}): the longest prompt of the batch "
                      f"has {max(map(len, prompts))} of the {room} tokens a sequence may hold (--seq-len and the "
                      f"model's block_size); said once", stacklevel=2)
    # eager: under FSDP with compile the blocks are compiled (wrap_model), and a token at a time through
    # a KV cache they had recompiled for each new shape (8 graphs a rank in 3 GRPO steps)
    stance = getattr(torch.compiler, "set_stance", None)  # (torch >= 2.6; set as soon as it is called)
    with torch.autocast(next(model.parameters()).device.type, enabled=False), gathered(model), \
            (stance("force_eager") if stance else contextlib.nullcontext()):
        if not prompts:
            return []
        return model.generate_batch(prompts, new, temperature, top_k, top_p, generator=generator,
                                    stop_tokens=stop_tokens, min_p=min_p, repetition_penalty=repetition_penalty)


def pack_replies(prompts: list[list[int]], replies: list[list[int]], T: int, device,
                 trained: list[bool] | None = None) -> tuple:
    """(x, y, cu_seqlens, at): each prompt + its reply (cut to T) packed in order into rows of T
    (pack_in_order), the replies' tokens the only targets (of those where trained says so);
    at: each sequence's segment."""
    sequences = [((prompt + reply)[:T], len(prompt)) for prompt, reply in zip(prompts, replies)]
    starts, at, cu = pack_in_order([len(ids) for ids, _ in sequences], T)
    x = torch.zeros(cu[-1], dtype=torch.long)
    y = torch.full((cu[-1],), -1, dtype=torch.long)
    for i, ((ids, prompt_len), start) in enumerate(zip(sequences, starts)):
        x[start:start + len(ids)] = torch.tensor(ids)
        if trained is None or trained[i]:
            y[start + prompt_len - 1:start + len(ids) - 1] = torch.tensor(ids[prompt_len:])  # the reply's tokens
    return x.view(-1, T).to(device), y.view(-1, T).to(device), torch.tensor(cu, dtype=torch.int32, device=device), at


def sampled_weight(batch, weights: list[float] | None, micro: int, cfg: TrainConfig, info: DistInfo) -> float:
    """The weight of a micro-batch of samples (distillation's, on every rank alike at this micro-step)
    in the step's loss: the micro-step's data weight (every rank's weights[micro], or 1 / grad_accum)
    shared between the ranks by their sampled tokens, so that the micro-step's loss is its samples'
    token mean over every rank, as one process of the same global batch computes it. Each rank's
    batch had kept its own data batch's weight, a mean of each rank's samples weighted by its data
    tokens (3 processes: the first gradient norm 13% above one process's; from the 3-process audit).
    Collective: every rank calls."""
    mine = float((batch[1] >= 0).sum())
    share = 1.0 / cfg.grad_accum if weights is None else float(weights[micro])  # (world_size x its share)
    total, tokens = all_reduce_sum(torch.tensor([share, mine], dtype=torch.float64), info).tolist()
    return total * mine / tokens if tokens else 0.0


def on_policy_batch(model: LLM, batch, cfg: TrainConfig, generator: torch.Generator | None = None) -> tuple:
    """GKD's on-policy batch (Agarwal et al. 2024; TRL's GKDTrainer with lmbda; with the teacher as
    model, its seq_kd): each conversation of a packed batch (x, y, cu_seqlens) with trained
    targets, its last reply replaced by the model's own sample from its prompt (last_reply_prompts;
    up to cfg.distill_max_new_tokens at cfg.distill_sample_temperature, ending at one of
    cfg.sample_stop_tokens), the sample's tokens the only trained targets, packed again into rows
    of T (pack_replies). Conversations with no trained target or a prompt that fills T (or the
    model's block_size) are left out (at least one row of padding comes back). (x, y, cu_seqlens,
    docs: each segment's sample's index, -1 for padding), as the loader's packed batches."""
    T = batch[0].shape[1]
    prompts = last_reply_prompts(batch, min(T, model.config.block_size))
    # limit=T: a sample is trained in rows of T (pack_replies cuts prompt + sample there); drawing past
    # them was sampling thrown away, and the cut silent (sample_replies warns once where T shortens them)
    samples = sample_replies(model, prompts, cfg.distill_max_new_tokens, cfg.distill_sample_temperature,
                             cfg.sample_stop_tokens, generator, limit=T)
    x, y, cu, at = pack_replies(prompts, samples, T, batch[0].device)
    docs = [-1] * (len(cu) - 1)
    for i, segment in enumerate(at):
        docs[segment] = i
    return x, y, cu, docs


def _is_function_spec(part: str) -> bool:
    """Whether one of grpo_reward's parts is "module:function" (not a reward model's path)."""
    return ":" in part and not Path(part).exists()


def _without_stop(ids: list[int], stops: set) -> list[int]:
    """A sample's tokens without the stop token it ended at (what is decoded as its text)."""
    return ids[:-1] if ids and ids[-1] in stops else ids


def _completion_decoder(tokenizer, stops: set):
    """sample ids -> the text TRL's GRPOTrainer decodes them to: without the stop token it ended at
    and what transformers' decode(skip_special_tokens=True) leaves out, the special tokens (not the
    added ones matched as text: Qwen's <think>, "special": false)."""
    skipped = set(tokenizer.special_ids()) if hasattr(tokenizer, "special_ids") else set()
    return lambda ids: tokenizer.decode([t for t in _without_stop(ids, stops) if t not in skipped])


def reward_names(spec: str) -> list[str]:
    """Each reward's name in the log (rewards/<name>/mean and /std): a function's name, a reward model's
    folder's."""
    return [part.rsplit(":", 1)[1] if _is_function_spec(part) else Path(part).name or part for part in spec.split(",")]


def load_reward(cfg: TrainConfig, policy: LLM, precision: str, device: torch.device, tokenizer=None) -> list:
    """GRPO's rewards (cfg.grpo_reward, comma-separated), each a function of (prompt ids, completion
    ids: token-id lists, the packed batch (x, y, cu_seqlens, at) of them, each sample's row of the
    data (data.example_row: its "prompt" and the other columns) or None) -> (n,) fp32 rewards,
    NaN where it gave None. Each is a reward model's scores at each sequence's last token (a pyllm
    run or a Hugging Face folder with a score head: --preference reward, *ForSequenceClassification;
    frozen, eval mode, the compute dtype, the policy's vocabulary), or "module:function", called
    as TRL's GRPOTrainer calls its reward functions, by keyword: prompts (the rows' prompts, text
    or messages; without rows decoded), completions (decoded with tokenizer without the stop
    token and the special tokens, TRL's skip_special_tokens; [{"role": "assistant", "content":
    text}] where the prompt is messages), completion_ids, trainer_state (TRL's TrainerState as far
    as global_step, the step sampled at, and max_steps), log_metric and log_extra (TRL's: see
    reward_metric_means and grpo_rollout's "extra") and each of the rows' other columns as a list;
    without a tokenizer prompts and completions are the token ids. It gives a number (or None) for
    each completion. module: an importable name (the working directory searched too) or a file,
    path/to/rewards.py."""
    rewards = []
    stops = set(cfg.sample_stop_tokens)
    for spec in cfg.grpo_reward.split(","):
        if _is_function_spec(spec):
            module, name = spec.rsplit(":", 1)
            function = getattr(_reward_module(module), name, None)
            if not callable(function):
                raise ValueError(f"grpo_reward {spec}: {module} has no function {name}")
            rewards.append(_reward_function(function, spec, tokenizer, stops, cfg.max_steps))
        else:
            rewards.append(_reward_model(spec, policy, precision, device, *_reward_rendering(cfg, tokenizer), stops,
                                         tokenizer))
    return rewards


def _reward_module(module: str):
    """A reward function's module: a file (path/to/rewards.py) or an importable name, looked for in
    the working directory too (a console script's sys.path does not hold it)."""
    import importlib
    import importlib.util

    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ValueError(f"grpo_reward: no file {module}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(module)


def _reward_function(function, spec: str, tokenizer, stops: set, max_steps: int = 0):
    import types

    decode = _completion_decoder(tokenizer, stops) if tokenizer is not None else None
    metrics: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:  # TRL's: averaged over the step's calls and the ranks
        metrics.setdefault(str(name), []).append(float(value))

    def log_extra(column: str, values: list) -> None:  # TRL's: a column of the completions log, one per sample
        reward.extra.setdefault(str(column), []).extend(values)

    def reward(prompt_ids, completion_ids, packed, rows, step: int | None = None):
        reward.extra = {}
        if tokenizer is not None:
            completions = [decode(ids) for ids in completion_ids]
            prompts = [row["prompt"] for row in rows] if rows else [tokenizer.decode(ids) for ids in prompt_ids]
            completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                           for prompt, text in zip(prompts, completions)]
        else:
            completions, prompts = completion_ids, [row["prompt"] for row in rows] if rows else prompt_ids
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"} if rows else {}
        state = types.SimpleNamespace(global_step=step, max_steps=max_steps)  # (TRL's TrainerState, its step)
        values = function(**{**columns, "prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                             "trainer_state": state, "log_metric": log_metric, "log_extra": log_extra})
        values = list(values)
        if len(values) != len(completion_ids):
            raise ValueError(f"grpo_reward {spec}: gave {len(values)} rewards for {len(completion_ids)} completions")
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)

    reward.metrics, reward.extra = metrics, {}
    return reward


def reward_metric_means(reward_fns: list, info: DistInfo) -> dict:
    """What reward functions gave log_metric since the last call, each name's mean over the calls
    and every rank (TRL's), emptied; None for a name no rank logged a value of."""
    pending: dict[str, list[float]] = {}
    for fn in reward_fns:
        for name, values in getattr(fn, "metrics", {}).items():
            pending.setdefault(name, []).extend(values)
        getattr(fn, "metrics", {}).clear()
    names = set(pending)
    if info.world_size > 1:  # (every rank the same names, in the same order, for the one all_reduce)
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, sorted(names))
        names = set().union(*gathered)
    if not names:
        return {}
    names = sorted(names)
    sums = all_reduce_sum(torch.tensor([[sum(pending.get(n, [])), len(pending.get(n, []))] for n in names],
                                       dtype=torch.float64), info)
    return {n: total / count if count else None for n, (total, count) in zip(names, sums.tolist())}


def _reward_rendering(cfg: TrainConfig, tokenizer) -> tuple[tuple[list[int], list[int]], Callable | None]:
    """How a reward model sees a sample of a chat prompt, from the run's Hugging Face source's chat
    template (--init-from-hf, or the one an --init-from-run run was fine-tuned from: run.json's):
    (hf_reply_framing, None) where the template puts a reply right after its generation prompt;
    where it puts more between them (Qwen3's empty think block, Phi-3.5's), (([], []), render):
    render(prompt messages, reply text, template variables) -> the ids of the conversation with the
    reply as its last assistant message, rendered as TRL's GRPOTrainer renders it for its reward
    model (apply_chat_template of prompt + completion, encoded again). (([], []), None) without a
    chat template or a tokenizer."""
    run = Path(cfg.out_dir) / "run.json"
    source = cfg.init_from_hf or (json.loads(run.read_text()).get("init_from_hf") if run.is_file() else None)
    if not source or tokenizer is None:
        return ([], []), None
    from pyllm.model import hf_folder
    from pyllm.tokenizer.tokenizer import hf_chat_prompt, hf_has_chat_template, hf_reply_framing

    folder = hf_folder(source)
    if not hf_has_chat_template(folder):
        return ([], []), None
    framing = hf_reply_framing(folder, tokenizer)
    if framing != ([], []):
        return framing, None

    def render(prompt: list[dict], reply: str, template_kwargs: dict | None) -> list[int]:
        # (no tools, as TRL's: its reward model's conversation is {"messages": prompt + completion})
        text = hf_chat_prompt(folder, [*prompt, {"role": "assistant", "content": reply}], add_generation_prompt=False,
                              **(template_kwargs or {}))
        return tokenizer.encode(text, allowed_special="all")

    return framing, render


def _reward_model(spec: str, policy: LLM, precision: str, device: torch.device,
                  framing: tuple[list[int], list[int]] = ([], []), render: Callable | None = None,
                  stops: set = frozenset(), tokenizer=None):
    """A reward model's scores of the samples at each one's last token that is not its pad (as it
    was trained). framing: (the chat template's generation prompt, what it puts after a reply)
    (hf_reply_framing): a sample of a prompt ending in the first is scored, as TRL's GRPOTrainer
    renders it, with the reply's end as the template writes it (its stop token, if any of stops,
    replaced): a reward model trained on conversations had been read at ChatML's <|im_end|> where
    it was trained at the "\n" after it (-3.02 there, +2.11 at <|im_end|>). render (_reward_rendering's,
    for templates framing cannot describe): samples of rows whose prompt is messages are decoded
    (tokenizer's, as the reward functions' completions) and the conversation rendered again, as
    TRL does (Qwen3's template: the reply after an empty think block where one was not sampled)."""
    rm = load_frozen(spec, precision, device)
    if rm.score is None or rm.config.num_labels != 1:
        raise ValueError(f"grpo_reward {spec}: not a reward model (a score head of one label: train one with "
                         "--preference reward, or give a *ForSequenceClassification checkpoint)")
    if rm.config.vocab_size != policy.config.vocab_size:
        raise ValueError(f"grpo_reward {spec}: its vocabulary has {rm.config.vocab_size} ids, the policy's "
                         f"{policy.config.vocab_size}: it scores the policy's token ids (the same tokenizer)")

    opening, closing = framing
    decode = _completion_decoder(tokenizer, stops) if render is not None else None  # (as reward functions get them)

    @torch.no_grad()
    def score(prompt_ids, completion_ids, packed, rows, step=None):
        x, _, cu, at = packed
        if render is not None and rows and all(row is not None and isinstance(row.get("prompt"), list) for row in rows):
            conversations = [render(row["prompt"], decode(ids), row.get("chat_template_kwargs"))
                             for row, ids in zip(rows, completion_ids)]
            T = max(x.shape[1], min(max(map(len, conversations)), rm.config.block_size))
            x, _, cu, at = pack_replies(conversations, [[] for _ in conversations], T, x.device)
        elif render is not None and not score.warned:
            score.warned = True  # (once: a batch of text prompts, or data prepared without its .rows.jsonl)
            print(f"pyllm: grpo_reward {spec}: samples whose rows are not all chat prompts are scored as sampled, "
                  "not rendered again with the chat template (the data's .rows.jsonl gives the prompts)",
                  file=sys.stderr)
        elif opening and closing and any(p[-len(opening):] == opening for p in prompt_ids):
            replies = [(c[:-1] if c and c[-1] in stops else c) + closing if p[-len(opening):] == opening else c
                       for p, c in zip(prompt_ids, completion_ids)]
            T = max(x.shape[1], min(x.shape[1] + len(closing), rm.config.block_size))
            x, _, cu, at = pack_replies(prompt_ids, replies, T, x.device)
        with autocast(precision, device):
            return rm(x, None, cu, scores=True)[1][at, 0].float().cpu()

    score.model, score.warned = rm, False  # (its FLOPs: the trainer's MFU)
    return score


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "rloo")


def grpo_generation_micro(cfg: TrainConfig) -> int:
    """The micro-batches (each rank's) one GRPO generation samples: cfg.grpo_steps_per_generation
    (TRL's steps_per_generation), else one optimizer step's, grad_accum."""
    return cfg.grpo_steps_per_generation or cfg.grad_accum


def grpo_generation_steps(cfg: TrainConfig) -> int:
    """The optimizer steps one GRPO generation trains: each grad_accum of its micro-batches once
    (in their order), all of them cfg.grpo_iterations times over (TRL's order)."""
    return grpo_generation_micro(cfg) // cfg.grad_accum * cfg.grpo_iterations


def grpo_rollout(policy: LLM, batch, cfg: TrainConfig, reward_fns: list, generator: torch.Generator | None,
                 rows: list | None = None, step: int | None = None) -> dict:
    """GRPO's samples of a packed batch of conversations (x, y, cu_seqlens): each one's prompt
    (last_reply_prompts) continued cfg.grpo_generations times by the policy (sample_replies,
    cfg.grpo_temperature), packed (pack_replies: "packed", x, y, cu_seqlens, at; with
    cfg.grpo_mask_truncated, a sample that ends without a stop token has no targets: TRL's
    mask_truncated_completions, rewarded and counted in its group all the same), rewarded by
    load_reward's functions (given rows[segment], the data's row of each conversation, where rows
    are given), their sum weighted by cfg.grpo_reward_weights with NaN left out (TRL's nansum):
    "rewards" (n,) fp64, NaN for a sample no function scored. Also "each" (n, R), "lengths" (each
    sequence's, cut to T: the FLOPs), "targets" (the sampled tokens trained on), "stats" (sums
    and counts: grpo_stat_means) and "sampled" (each sequence's length as sampled, uncut, and the
    sampled tokens: the sampling's FLOPs), the "prompt_ids" and "completion_ids" lists. With rows,
    a conversation whose row is None is left out (grpo_rows: one cut to the row, whose last
    reply in it is not its row's). grpo_prepare adds the advantages."""
    T = batch[0].shape[1]
    segments = []
    prompts = last_reply_prompts(batch, min(T, policy.config.block_size), segments)
    if rows is not None:
        kept = [i for i, segment in enumerate(segments) if rows[segment] is not None]
        prompts, segments = [prompts[i] for i in kept], [segments[i] for i in kept]
    G = cfg.grpo_generations
    groups = [prompt for prompt in prompts for _ in range(G)]
    group_rows = [rows[segment] for segment in segments for _ in range(G)] if rows is not None else None
    samples = sample_replies(policy, groups, cfg.grpo_max_new_tokens, cfg.grpo_temperature, cfg.sample_stop_tokens,
                             generator, limit=T, top_k=cfg.grpo_top_k, top_p=cfg.grpo_top_p, min_p=cfg.grpo_min_p,
                             repetition_penalty=cfg.grpo_repetition_penalty)
    stops = set(cfg.sample_stop_tokens)
    trained = [bool(s) and s[-1] in stops for s in samples] if cfg.grpo_mask_truncated else None
    packed = pack_replies(groups, samples, T, batch[0].device, trained)
    each = (torch.stack([reward(groups, samples, packed, group_rows, step) for reward in reward_fns], 1).to(torch.float64)
            if groups else torch.zeros(0, len(reward_fns), dtype=torch.float64))  # (n, R); fp64: n numbers
    weights = torch.tensor(cfg.grpo_reward_weights or [1.0] * len(reward_fns), dtype=torch.float64)
    rewards = (each * weights).nansum(1)  # (n,)
    # A sample no reward function scored (each returned None): NaN, left out of its group's mean and
    # std and of the logged reward, its advantage 0 (TRL's; nansum had made it a reward of 0)
    rewards[each.isnan().all(1) if each.shape[1] else torch.zeros_like(rewards, dtype=torch.bool)] = math.nan
    lengths = [min(len(p) + len(s), T) for p, s in zip(groups, samples)]
    n = len(groups)
    scored = rewards[~rewards.isnan()]
    stats = torch.cat([torch.tensor([scored.sum().item(), float(n), (scored ** 2).sum().item(), float(len(scored)),
                                     float(sum(map(len, samples))), *_flat_and_unended(rewards, samples, G, stops)],
                                    dtype=torch.float64),
                       each.nansum(0), (~each.isnan()).sum(0).double()])
    targets = sum(n - len(p) for i, (n, p) in enumerate(zip(lengths, groups)) if trained is None or trained[i])
    # the columns reward functions gave log_extra (TRL's), for the completions log: one value per sample
    extra = {column: (list(values) + [None] * n)[:n] for fn in reward_fns
             for column, values in getattr(fn, "extra", {}).items()}
    return {"packed": packed, "rewards": rewards, "each": each, "lengths": lengths, "targets": targets,
            "prompt_ids": groups, "completion_ids": samples, "stats": stats, "extra": extra,
            "sampled": ([len(p) + len(s) for p, s in zip(groups, samples)], sum(len(s) for s in samples))}


def _flat_and_unended(rewards: torch.Tensor, samples: list[list[int]], G: int, stops: set) -> list[float]:
    """For TRL's frac_reward_zero_std and completions/clipped_ratio: the samples of groups whose
    rewards' std is 0 (group and none scaling's; batch scaling's is the step's std, grpo_stat_means;
    a group no function scored has none, NaN, as TRL's nanstd) and the samples that end without a stop token."""
    flat = _flat_groups(rewards.view(-1, G)) * G if len(rewards) else 0
    return [float(flat), float(sum(not (s and s[-1] in stops) for s in samples))]


def _flat_groups(grouped: torch.Tensor) -> int:
    """How many groups (rows) have rewards of std 0 (TRL's isclose(nanstd, 0): not one with fewer
    than two scored, whose std is NaN); every group of one sample (TRL's std 0 for eval's
    num_generations_eval 1)."""
    return grouped.shape[0] if grouped.shape[1] == 1 else int((_nanstd(grouped) <= 1e-8).sum())


def upgrade_rollout_stats(rollouts: list[dict], cfg: TrainConfig) -> None:
    """A checkpoint's rollouts (written mid-way through a generation) as this pyllm lays out their
    "stats": before 2026-12-06 they held 5 + 2R sums, without _flat_and_unended's two (a resume had
    died of a size mismatch), which are computed from the saved rewards and samples."""
    for r in rollouts:
        s = r["stats"]
        if len(s) == 5 + 2 * r["each"].shape[1]:
            counts = _flat_and_unended(r["rewards"], r["completion_ids"], cfg.grpo_generations,
                                       set(cfg.sample_stop_tokens))
            r["stats"] = torch.cat([s[:5], s.new_tensor(counts), s[5:]])


def grpo_rows(rows: list | None, docs: list[int], cu_seqlens: torch.Tensor, offsets: np.ndarray) -> list | None:
    """The data's row of each segment of a packed batch (docs: the loader's document of each, -1
    for padding), None for padding and for a document the row cut: its last reply in the row may be
    an earlier one than its row's prompt and columns speak of. None without rows."""
    if rows is None:
        return None
    cu = cu_seqlens.tolist()
    return [rows[d] if d >= 0 and cu[i + 1] - cu[i] == offsets[d + 1] - offsets[d] else None
            for i, d in enumerate(docs)]


GRPO_STATS = ["reward", "reward_std", "completions/mean_length", "kl", "clip_ratio", "frac_reward_zero_std",
              "completions/clipped_ratio", "entropy"]  # (then rewards/<name>/mean of each reward)


def grpo_stat_means(sums: torch.Tensor, n_rewards: int, batch_scaled: bool = False) -> list:
    """The logged means of a step's GRPO sums (grpo_rollout's "stats" then grpo_loss's, added up
    over micro-batches and ranks), GRPO_STATS: mean reward and the std of the step's rewards (TRL's
    reward and reward_std, over the samples some function scored; reward_std had been the groups'
    mean std), mean sample length, mean KL per trained token (TRL's), the share of trained tokens
    whose ratio was clipped (of samples with GSPO's ratio a sample, as TRL counts), the share of
    samples whose group's rewards have std 0 (batch_scaled, cfg.grpo_scale_rewards batch: 1 or 0 as
    the step's std is, TRL's), the share that ended without a stop token, the mean entropy of the
    policy's next-token distribution (at the sampling temperature) per trained token (TRL's); then
    each reward's mean over the samples it scored; None where nothing counted."""
    s = sums.tolist()
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    R = n_rewards
    std = _std_of_sums(s[0], s[2], s[3])
    # (batch: the std of equal rewards from their sums is a rounding, not 0: 256 rewards of 0.7 give 1.7e-8)
    # (a generation of one sample, eval's with one prompt and num_generations_eval 1: TRL's std 0)
    flat = s[1] == 1 or std is not None and std <= max(1e-8, 1e-7 * abs(s[0] / s[3]))
    zero_std = (float(flat) if s[1] else None) if batch_scaled else ratio(s[5], s[1])
    return ([ratio(s[0], s[3]), std, ratio(s[4], s[1]), ratio(s[7 + 2 * R], s[8 + 2 * R]),
             ratio(s[9 + 2 * R], s[10 + 2 * R]), zero_std, ratio(s[6], s[1]), ratio(s[11 + 2 * R], s[8 + 2 * R])]
            + [ratio(s[7 + i], s[7 + R + i]) for i in range(R)])


def batch_scaled(cfg: TrainConfig) -> bool:
    """Whether GRPO's advantages are scaled by the generation's std (frac_reward_zero_std is then
    whether that std is 0, TRL's); RLOO's "batch" normalizes them but logs its groups' (TRL's)."""
    return cfg.grpo_scale_rewards == "batch" and cfg.grpo_loss_type != "rloo"


def generation_metrics(sums: torch.Tensor, rollouts: list[dict], cfg: TrainConfig, info: DistInfo) -> dict:
    """A generation's logged metrics, a training step's and the eval's alike (TRL's): GRPO_STATS'
    means of sums (every rank's grpo_rollout stats, then grpo_loss's) but the loss's (kl, clip_ratio,
    entropy: logged per micro-step), each reward's mean (rewards/<name>/mean), and completion_stats
    of rollouts. Collective: every rank calls."""
    names = reward_names(cfg.grpo_reward)
    means = dict(zip(GRPO_STATS + [f"rewards/{name}/mean" for name in names],  # (TRL 1.16's names)
                     grpo_stat_means(sums, len(names), batch_scaled(cfg))))
    for loss_stat in ("kl", "clip_ratio", "entropy"):
        del means[loss_stat]
    if cfg.grpo_multi_objective_aggregation == "normalize_then_sum" and rollouts:  # (TRL's: whether the std of
        # the summed normalized rewards is 0; fewer than two scored samples: TRL's nanstd is NaN, not 0 (0.0),
        # but a generation of one sample has std 0 (1.0); None for none)
        std, mean, n = rollouts[0]["aggregate_std"], rollouts[0]["aggregate_mean"], sums[1].item()
        means["frac_reward_zero_std"] = ((float(n == 1) if n else None) if std is None
                                         else float(std <= max(1e-8, 1e-7 * abs(mean))))
    means.update(completion_stats(rollouts, set(cfg.sample_stop_tokens), names, info))
    return means


def grpo_clip_metrics(cfg: TrainConfig, per: list, extremes: torch.Tensor) -> dict:
    """TRL 1.16's clip metrics of a GRPO step: clip_ratio/low_mean, high_mean, region_mean (the
    share of the trained tokens whose ratio was clipped below, above, either; of samples under
    sequence ratios), each micro-step's over every rank, then their mean (micro_step_mean of per,
    the step's per-micro-step sums: 0.0 for one without tokens), and clip_ratio/low_min,
    high_max (the least share of a sample's tokens clipped low and the largest clipped high, over
    every rank's samples, from extremes (grad_accum, 2): -low_min and high_max, MAX-reduced), the
    mean over the micro-steps that had a sample (None where none had); cispo's cispo_clip_ratio
    (above eps_high, A > 0) alone; none for sapo (no clip); vespo's vespo/phi_seq_mean (its weights'
    mean over the samples) alone; 0.0 at a single iteration (every ratio 1), as TRL's."""
    if cfg.grpo_loss_type == "cispo":
        return {"cispo_clip_ratio": micro_step_mean(per, 3, 6)}
    if cfg.grpo_loss_type == "sapo":  # (TRL logs them at one iteration too: 0.0, every ratio 1)
        return {}
    if cfg.grpo_loss_type == "vespo":  # (its weights' mean over the samples, each micro-step's: TRL's)
        return {"vespo/phi_seq_mean": micro_step_mean(per, 3, 6)}
    low_min, high_max = extreme_means(extremes)
    return {"clip_ratio/low_mean": micro_step_mean(per, 4, 6), "clip_ratio/high_mean": micro_step_mean(per, 5, 6),
            "clip_ratio/region_mean": micro_step_mean(per, 3, 6), "clip_ratio/low_min": low_min,
            "clip_ratio/high_max": high_max}


def completion_stats(rollouts: list[dict], stops: set, names: list[str], info: DistInfo) -> dict:
    """TRL's completions/min_length and max_length, and the mean, min and max length of the samples
    that ended with a stop token (0.0 where none did, as TRL's), over every rank's samples of the
    step's rollouts; rewards/<name>/std: each reward's std over the samples it
    scored (TRL's, Bessel-corrected; None for fewer than two). Collective: every rank calls."""
    lengths = [len(s) for r in rollouts for s in r["completion_ids"]]
    ended = [len(s) for r in rollouts for s in r["completion_ids"] if s and s[-1] in stops]
    each = (torch.cat([r["each"].cpu() for r in rollouts]) if rollouts
            else torch.zeros(0, len(names), dtype=torch.float64))
    scored = ~each.isnan()
    values = each.nan_to_num()
    sums = all_reduce_sum(torch.cat([torch.tensor([float(sum(ended)), float(len(ended))], dtype=torch.float64),
                                     values.sum(0), values.square().sum(0), scored.sum(0).double()]), info)
    # (the minima as maxima of their negatives: one MAX over the four)
    inf = math.inf
    top = all_reduce_sum(torch.tensor([max(lengths, default=-inf), -min(lengths, default=inf), max(ended, default=-inf),
                                       -min(ended, default=inf)], dtype=torch.float64), info, dist.ReduceOp.MAX)
    top = [v if math.isfinite(v) else None for v in top.tolist()]
    n_ended = sums[1].item()
    out = {"completions/min_length": None if top[1] is None else -top[1], "completions/max_length": top[0],
           "completions/mean_terminated_length": sums[0].item() / n_ended if n_ended else 0.0,
           "completions/min_terminated_length": 0.0 if top[3] is None else -top[3],
           "completions/max_terminated_length": 0.0 if top[2] is None else top[2]}
    R = len(names)
    for i, name in enumerate(names):  # (TRL's, one reward's too: unweighted, where reward is weighted)
        out[f"rewards/{name}/std"] = _std_of_sums(*(sums[2 + k * R + i].item() for k in range(3)))
    return out


def _std_of_sums(total: float, squares: float, count: float) -> float | None:
    """The Bessel-corrected std of count numbers from their sum and sum of squares (sums added up over
    micro-batches and ranks); None for fewer than two."""
    return math.sqrt(max(squares - total * total / count, 0.0) / (count - 1)) if count > 1 else None


def _nanstd(grouped: torch.Tensor) -> torch.Tensor:
    """Each row's std over its non-NaN values, Bessel-corrected (TRL's nanstd), (rows, 1); NaN for
    a row with fewer than two (the division had left -0.0 for a row with none)."""
    count = (~grouped.isnan()).sum(1, keepdim=True)
    deviations = (grouped - grouped.nanmean(1, keepdim=True)).square().nansum(1, keepdim=True)
    return (deviations / (count - 1)).sqrt().masked_fill(count < 2, math.nan)


def gdpo_rewards(rollouts: list[dict], cfg: TrainConfig, info: DistInfo) -> None:
    """GDPO's rewards (group reward-decoupled normalization; TRL's multi_objective_aggregation
    normalize_then_sum): each reward function's scores less their group's mean, divided by their
    group's std + 1e-4 (both over the samples it scored; Bessel-corrected, NaN for fewer than two),
    then weighed and summed over the functions that scored the sample (NaN where none did), added to
    each rollout as "aggregate" (n,), with "aggregate_mean" and "aggregate_std", the mean and
    Bessel-corrected std of every rank's (std None for fewer than two). Collective: every rank calls."""
    G = cfg.grpo_generations
    sums = torch.zeros(3, dtype=torch.float64)  # the scored sums' sum, sum of squares, count
    for r in rollouts:
        each = r["each"]  # (n, R)
        n, R = each.shape
        weights = torch.tensor(cfg.grpo_reward_weights or [1.0] * R, dtype=torch.float64, device=each.device)
        grouped = each.view(-1, G, R).transpose(1, 2).reshape(-1, G)  # (groups * R, G): a function's scores of a group
        normalized = (grouped - grouped.nanmean(1, keepdim=True)) / (_nanstd(grouped) + 1e-4)
        aggregate = (normalized.view(-1, R, G).transpose(1, 2).reshape(n, R) * weights).nansum(1)  # (n,)
        aggregate[each.isnan().all(1)] = math.nan
        r["aggregate"] = aggregate
        kept = aggregate[~aggregate.isnan()].cpu()
        sums += torch.stack([kept.sum(), kept.square().sum(), torch.tensor(float(len(kept)), dtype=torch.float64)])
    total, squares, count = all_reduce_sum(sums, info).tolist()
    for r in rollouts:
        r["aggregate_mean"], r["aggregate_std"] = total / count if count else 0.0, _std_of_sums(total, squares, count)


def grpo_prepare(rollouts: list[dict], cfg: TrainConfig, info: DistInfo, policy: LLM | None = None,
                 reference=None) -> None:
    """What a generation's rollouts (grpo_rollout's, this rank's micro-batches: grpo_generation_micro)
    need before their loss, added to each: "advantages" (n,), each reward less its group's mean,
    divided by the group's std + 1e-4 (cfg.grpo_scale_rewards group), by the std of every rank's
    rewards of the generation + 1e-4 (batch), or not (none; Dr. GRPO's), TRL's, over the samples some
    reward function scored (the others' advantage 0); GDPO's (cfg.grpo_multi_objective_aggregation
    normalize_then_sum: gdpo_rewards) their sum of normalized rewards less its mean over every rank's
    samples of the generation, divided by their std + 1e-4, TRL's; "tokens" and "samples", every rank's trained
    tokens and samples in the generation (dapo's and cispo's normalizer, grpo's: not a masked
    truncated sample's tokens, as TRL 1.16 counts; they had counted, shrinking the loss by the
    masked share); "micro_tokens", every rank's trained tokens in the micro-batches at this one's
    index (a step without any is skipped); off-policy (cfg.grpo_iterations > 1, or a generation of
    several steps) "old" (B, T), the policy's log-probabilities of the targets as sampled (the
    clipped ratio's denominator); with reference (cfg.grpo_beta) "ref", the reference's
    (reference(x, y, cu_seqlens), no autograd)."""
    G = cfg.grpo_generations
    # scored rewards' sum, sum of squares, count; trained tokens; samples; then each micro-batch's trained tokens
    totals = torch.zeros(5 + len(rollouts), dtype=torch.float64)
    for i, r in enumerate(rollouts):
        scored = r["rewards"][~r["rewards"].isnan()]
        totals[:5] += torch.stack([scored.sum(), (scored ** 2).sum(), torch.tensor(float(len(scored))),
                                   torch.tensor(float(r["targets"])), torch.tensor(float(len(r["rewards"])))])
        totals[5 + i] = r["targets"]
    totals = all_reduce_sum(totals, info).tolist()
    total, squares, count, tokens, samples = totals[:5]
    batch_std = _std_of_sums(total, squares, count) or 0.0
    rloo = cfg.grpo_loss_type == "rloo"
    grpo_rollout_passes(rollouts, cfg, policy, reference, grpo_takes_p_old(cfg))
    gdpo = cfg.grpo_multi_objective_aggregation == "normalize_then_sum"
    if rloo:
        rloo_advantages(rollouts, cfg, info)
    elif gdpo:
        gdpo_rewards(rollouts, cfg, info)
    for r, micro_tokens in zip(rollouts, totals[5:]):
        if gdpo:
            std = r["aggregate_std"] or 0.0  # (fewer than two scored samples: TRL's 0)
            r["advantages"] = ((r["aggregate"] - r["aggregate_mean"]) / (std + 1e-4)).nan_to_num(0.0)
        elif not rloo:
            grouped = r["rewards"].view(-1, G)
            advantages = grouped - grouped.nanmean(1, keepdim=True)
            if cfg.grpo_scale_rewards == "group":
                advantages = advantages / (_nanstd(grouped) + 1e-4)
            elif cfg.grpo_scale_rewards == "batch":
                advantages = advantages / (batch_std + 1e-4)
            r["advantages"] = advantages.view(-1).nan_to_num(0.0)
        r["tokens"], r["samples"], r["micro_tokens"] = tokens, samples, micro_tokens


def grpo_takes_p_old(cfg: TrainConfig) -> bool:
    """Whether a generation's samples need the policy's log-probabilities as sampled (p_old): steps
    after its first train off-policy, and RLOO's ratio and KL penalty take them however often it trains."""
    return grpo_generation_steps(cfg) > 1 or cfg.grpo_loss_type == "rloo"


def grpo_rollout_passes(rollouts: list[dict], cfg: TrainConfig, policy, reference, p_old: bool) -> None:
    """The passes without autograd a generation's rollouts take before their loss, added to each:
    with p_old "old", the policy's log-probabilities of the targets as sampled; with reference
    (its function of x, y, cu_seqlens, no autograd) "ref"; both before the loss's pass (a LoRA
    run's reference is the model itself: the aux_loss it keeps is then the loss's pass's)."""
    for r in rollouts:
        x, y, cu, _ = r["packed"]
        if p_old:
            with torch.no_grad():
                r["old"] = policy(x, y, cu, per_token=True, temperature=cfg.grpo_temperature)[1]
        if reference is not None:
            r["ref"] = reference(x, y, cu)


def rloo_advantages(rollouts: list[dict], cfg: TrainConfig, info: DistInfo) -> None:
    """TRL's RLOOTrainer's advantages (REINFORCE leave-one-out, Ahmadian et al. 2024) of a generation's
    rollouts (grpo_prepare's, "old" and with cfg.grpo_beta "ref" in them), added to each as
    "advantages" (n,): each reward clamped to cfg.grpo_reward_clip where given, less cfg.grpo_beta
    times the sample's summed first-order KL, sum(log p_old - log p_ref) over its trained tokens
    (RLOO's penalty in the reward, not the loss), less the mean of its group's other scored rewards;
    with cfg.grpo_scale_rewards batch then normalized by the mean and std of every rank's (TRL's
    normalize_advantages); 0 for an unscored sample or one alone in its group. Also "kl", the
    generation's mean KL per trained token (every rank's; TRL logs it), and each rollout's count of
    samples in groups whose penalized rewards' std is 0 (its stats' frac_reward_zero_std, TRL's).
    Collective: every rank calls."""
    G = cfg.grpo_generations
    sums = torch.zeros(5, dtype=torch.float64)  # advantages' sum, sum of squares, count; KL sum, its tokens
    for r in rollouts:
        rewards = r["rewards"].clone()
        if cfg.grpo_reward_clip:
            rewards = rewards.clamp(*cfg.grpo_reward_clip)  # (NaN, unscored, stays NaN)
        if cfg.grpo_beta:
            x, y, cu, at = r["packed"]
            per_token = (r["old"].double() - r["ref"].double()) * (y != -1)  # (B, T)
            rewards = rewards - cfg.grpo_beta * sequence_logps(per_token, cu)[at].cpu()
            sums[3:] += torch.tensor([per_token.sum().item(), float((y != -1).sum())], dtype=torch.float64)
        grouped = rewards.view(-1, G)
        others = (grouped.nansum(1, keepdim=True) - grouped) / ((~grouped.isnan()).sum(1, keepdim=True) - 1)
        advantages = (grouped - others).view(-1)  # (NaN: unscored, or alone in its group: 0 / 0)
        r["advantages"] = advantages
        r["stats"][5] = float(_flat_groups(grouped) * G)  # (TRL's isclose(std, 0) of these rewards)
        kept = advantages[~advantages.isnan()]
        sums[:3] += torch.tensor([kept.sum().item(), kept.square().sum().item(), float(len(kept))],
                                 dtype=torch.float64)
    total, squares, count, kl_sum, kl_tokens = all_reduce_sum(sums, info).tolist()
    mean, std = total / max(count, 1.0), _std_of_sums(total, squares, count)
    for r in rollouts:
        if cfg.grpo_scale_rewards == "batch":
            r["advantages"] = (r["advantages"] - mean) / ((std if std is not None else math.nan) + 1e-4)
        r["advantages"] = r["advantages"].nan_to_num(0.0)
        r["kl"] = kl_sum / max(kl_tokens, 1.0)


def grpo_loss(model, rollout: dict, cfg: TrainConfig, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's loss on a prepared rollout (grpo_rollout, grpo_prepare), as TRL's GRPOTrainer computes
    it: per sampled token t of sample i, -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps_high) A_i)
    (the first ratio capped at cfg.grpo_delta where given: INTELLECT-2's, TRL's delta), ratio = p / p_old (p_old: rollout["old"], else p.detach(): 1 in value, one update per
    generation; cfg.grpo_importance_sampling sequence, GSPO's: exp of the sample's mean log p -
    log p_old, for each of its tokens), plus cfg.grpo_beta times the k3 estimate of KL(policy || reference), exp(d) - d
    - 1 with d = ref - log p; summed over the tokens and divided (cfg.grpo_loss_type) by: grpo,
    each sample's tokens, then the generation's samples (every rank's, from grpo_prepare) /
    (world_size * grpo_generation_micro) (each sample's mean, their mean over the step once the
    trainer divides by grad_accum and DDP averages: TRL's micro-batches of equal size give that;
    pyllm's packed ones hold varying numbers of samples); bnpo, the micro-batch's tokens; dr_grpo,
    the samples, counted so, times cfg.grpo_max_new_tokens; dapo, every rank's tokens in the
    generation / (world_size * grpo_generation_micro) (TRL's normalizer, its generation's tokens
    times grad_accum / steps_per_generation, over the processes). cispo (MiniMax-M1; TRL's) takes
    -min(ratio, eps_high).detach() A log p per token, divided as dapo; sapo (TRL's) -sigmoid(tau (ratio - 1)) 4 / tau A, tau 1 for A > 0 else
    1.05 (SAPO_TEMPERATURES), divided as grpo; luspo (LUSPO, TRL's) clips as grpo and sums each
    sample's tokens, divided by the samples as grpo (meant for sequence ratios, TRL says). model: what computes the log-probabilities (DDP's
    wrapper). With cfg.grpo_kl_bias_correction (TRL's default) the KL term is times the ratio (and
    so is the KL logged, as TRL logs it). Also the sums for the log (grpo_stat_means): (the trained tokens' KL, the trained tokens,
    those whose ratio was clipped (cispo: TRL's cispo_clip_ratio, above eps_high with A > 0), the
    trained tokens, their entropies (LLM.forward's token_stats)), then TRL's clip_ratio/low_mean's
    and high_mean's numerators (below 1 - eps with A < 0, above 1 + eps_high with A > 0; of the
    trained tokens counted as the clipped ones) and clip_ratio/low_min, high_max: the least share of
    a sample's trained tokens clipped low, the largest clipped high (inf and -inf without one), fp64
    on the CPU. Under GSPO's sequence ratios those count samples, as TRL's."""
    x, y, cu, at = rollout["packed"]
    # at the sampling temperature, as TRL's (its logits / temperature): the policy that drew the samples
    token_logps = model(x, y, cu, per_token=True, temperature=cfg.grpo_temperature, token_stats=True,
                        **balance_kwargs(model, x, cu, at))[1]  # (B, T), 0 where no target
    entropy_sum = getattr(model, "module", model).token_stats_term[0].detach()  # (DDP's; the others read through)
    mask = (y != -1).to(token_logps.dtype)
    policy_mask = mask  # (the policy term's tokens: cfg.grpo_top_entropy_quantile's)
    if cfg.grpo_top_entropy_quantile < 1.0:
        entropies = getattr(model, "module", model).token_stats_rows[..., 0].detach()  # (B, T)
        policy_mask = high_entropy_mask(entropies, y != -1, 1.0 - cfg.grpo_top_entropy_quantile,
                                        world_size).to(mask.dtype)
    old = rollout.get("old")
    old = token_logps.detach() if old is None else old.to(token_logps)
    segment = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff().long())
    per_segment = torch.zeros(len(cu) - 1, dtype=token_logps.dtype, device=cu.device)
    per_segment[at] = rollout["advantages"].to(per_segment)
    advantage = per_segment[segment].view_as(token_logps)  # (B, T): each token its sample's advantage
    n = len(at)
    counts = sequence_logps(mask, cu)[at]  # each sample's trained tokens
    tokens = counts.clamp(min=1)
    if cfg.grpo_off_policy_mask:  # DeepSeek-V3.2's off-policy sequence mask (TRL's): a sample of A < 0 whose
        # mean log p_old - log p over its tokens passes the threshold is left out of the policy term
        drift = torch.zeros_like(per_segment)
        drift[at] = sequence_logps((old - token_logps.detach()) * mask, cu)[at] / tokens
        keep = (per_segment >= 0) | (drift <= cfg.grpo_off_policy_mask)  # (per_segment: the advantages still)
        policy_mask = policy_mask * keep[segment].view_as(token_logps).to(mask.dtype)
    rloo = cfg.grpo_loss_type == "rloo"
    per_sample = rloo or cfg.grpo_importance_sampling == "sequence"  # (one ratio a sample: its clips counted so)
    if per_sample:  # GSPO: each sample's mean log-ratio, its tokens alike; RLOO: its summed log-ratio
        per_segment = torch.zeros_like(per_segment)
        per_segment[at] = sequence_logps((token_logps - old) * mask, cu)[at] / (1.0 if rloo else tokens)
        ratio = torch.exp(per_segment[segment].view_as(token_logps))
    else:
        ratio = torch.exp(token_logps - old)
    high = cfg.grpo_epsilon_high or cfg.grpo_epsilon
    if rloo:  # TRL's RLOOTrainer: per sample, -min(ratio A, clip(ratio) A), ratio = p(sample) / p_old(sample)
        coef = torch.exp(per_segment[at])
        advantages = rollout["advantages"].to(coef)
        per_token = -torch.min(coef * advantages, torch.clamp(coef, 1 - cfg.grpo_epsilon, 1 + high) * advantages)
    elif cfg.grpo_loss_type == "vespo":  # VESPO: -phi(w) A log p, phi of the sample's summed log-ratio, detached
        phi = vespo_weights(token_logps.detach() - old, mask, cu, at, rollout["advantages"].to(mask), cfg.grpo_vespo)
        weight = torch.zeros_like(per_segment)
        weight[at] = phi
        per_token = -weight[segment].view_as(token_logps) * advantage * token_logps
    elif cfg.grpo_loss_type == "cispo":  # MiniMax-M1's: the ratio clipped above and detached, times A log p
        per_token = -torch.clamp(ratio, max=high).detach() * advantage * token_logps
    elif cfg.grpo_loss_type == "sapo":  # a soft gate instead of the clip
        positive, other = cfg.grpo_sapo_temperatures
        tau = torch.where(advantage > 0, ratio.new_tensor(positive), ratio.new_tensor(other))
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantage
    else:
        clipped = torch.clamp(ratio, 1 - cfg.grpo_epsilon, 1 + high)
        # INTELLECT-2's two-sided clip (TRL's delta): the unclipped ratio capped too; the KL term's ratio
        # is not, the clip metrics' is (TRL's)
        capped = torch.clamp(ratio, max=cfg.grpo_delta) if cfg.grpo_delta else ratio
        per_token = -torch.min(capped * advantage, clipped * advantage)
    if not rloo:
        per_token = per_token * policy_mask  # (the KL term below is on every trained token, TRL's)
    kl = None
    if cfg.grpo_beta and not rloo:  # (RLOO's KL is in its rewards: rloo_advantages)
        d = rollout["ref"].to(token_logps) - token_logps  # 0 where no target: exp(0) - 0 - 1 = 0
        kl = torch.exp(d) - d - 1
        # TRL's use_bias_correction_kl (its default): times the ratio, the unbiased reverse-KL
        # gradient (DeepSeek-V3.2); the ratio, 1 in value on-policy, still moves the gradient
        if cfg.grpo_kl_bias_correction:
            kl = kl * ratio  # (TRL logs this one too: grpo_trainer.py:3105, 3268)
        per_token = per_token + cfg.grpo_beta * kl
    if not rloo:
        per_token = per_token * mask
    # grpo, sapo, dr_grpo, rloo: TRL's micro-batches hold per_device_train_batch_size samples each, so every sample
    # of the step weighs 1 / (the step's samples); pyllm's hold varying numbers (packed conversations): divide by
    # the generation's samples on all ranks / (world_size * its micro-batches), as dapo by its tokens
    micro = world_size * grpo_generation_micro(cfg)
    per_batch = rollout.get("samples", n * micro) / micro
    if rloo:  # (per_token: each sample's loss, (n,); TRL's mean over a micro-batch's samples)
        loss = per_token.sum() / (per_batch or 1.0)
    elif cfg.grpo_loss_type in ("grpo", "sapo"):
        loss = (sequence_logps(per_token, cu)[at] / tokens).sum() / (per_batch or 1.0)
    elif cfg.grpo_loss_type == "luspo":  # each sample's sum (not mean) over its tokens, then as grpo
        loss = sequence_logps(per_token, cu)[at].sum() / (per_batch or 1.0)
    elif cfg.grpo_loss_type == "bnpo":
        loss = per_token.sum() / mask.sum().clamp(min=1)
    elif cfg.grpo_loss_type == "dr_grpo":
        loss = per_token.sum() / ((per_batch * cfg.grpo_max_new_tokens) or 1.0)
    else:  # dapo, cispo
        loss = per_token.sum() * (micro / max(rollout["tokens"], 1.0))
    with torch.no_grad():
        kl_sum = (kl.detach() * mask).sum() if kl is not None else mask.new_zeros(())  # (TRL's: a mean per trained token)
        if cfg.grpo_delta:
            ratio = capped
        low, high_side = (ratio < 1 - cfg.grpo_epsilon) & (advantage < 0), (ratio > 1 + high) & (advantage > 0)
        if cfg.grpo_loss_type == "cispo":  # TRL's cispo_clip_ratio: the ratio above epsilon_high itself
            low, high_side = torch.zeros_like(low), (ratio > high) & (advantage > 0)
        # each sample's clipped tokens (n,): low, high, either
        clipped_tokens = [sequence_logps(c.to(mask) * mask, cu)[at] for c in (low, high_side, low | high_side)]
        if per_sample:  # one ratio a sample: TRL counts samples there
            shares = [(c > 0).to(mask) for c in clipped_tokens]  # (a sample without tokens: 0, as TRL's)
            counted = mask.new_tensor(n)
        else:  # (a sample without trained tokens has no share: left out of the min and max, TRL's nanmin)
            shares = [torch.where(counts > 0, c / tokens, math.nan) for c in clipped_tokens]
            counted = mask.sum()
        totals = [share.sum() if per_sample else c.sum() for share, c in zip(shares, clipped_tokens)]
        inf = mask.new_tensor(math.inf)
        low_min = shares[0].nan_to_num(math.inf).min() if n else inf
        high_max = shares[1].nan_to_num(-math.inf).max() if n else -inf
        if cfg.grpo_loss_type == "vespo":  # (its phi's sum over the samples in the clipped column: TRL's phi_seq_mean)
            totals[2], counted = phi.sum(), mask.new_tensor(n)
        stats = torch.stack([kl_sum, mask.sum(), totals[2], counted, entropy_sum.to(mask), totals[0], totals[1],
                             low_min, high_max])
    return loss, stats.double().cpu()


def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cu: torch.Tensor, at, advantages: torch.Tensor,
                  gamma) -> torch.Tensor:
    """VESPO's (arXiv 2602.10693; TRL's get_gamma_weights) weight of each sample (n,): with log w its
    tokens' summed log p - log p_old (each clamped to [-20, 20], the sum to [log 1e-8, 20]) and k,
    lambda gamma's pair for its advantage's sign (A >= 0 first), phi = exp(lambda + k log w - lambda w),
    0 where that is not finite; no gradient."""
    with torch.no_grad():
        k_pos, lambda_pos, k_neg, lambda_neg = gamma
        log_w = sequence_logps(log_ratio.clamp(-20.0, 20.0) * mask, cu)[at].clamp(math.log(1e-8), 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
        lam = torch.where(nonneg, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg)).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def high_entropy_mask(entropies: torch.Tensor, trained: torch.Tensor, threshold: float, world_size: int = 1
                      ) -> torch.Tensor:
    """TRL's get_high_entropy_mask ("Beyond the 80/20 Rule", arXiv 2506.01939): the trained tokens
    (B, T bool) whose entropy is at least the threshold-quantile (torch.quantile's, interpolated)
    of every rank's trained tokens' entropies in this micro-batch; none where no rank has one.
    Collective when world_size > 1: every rank calls it for each micro-batch."""
    local = entropies[trained]
    if world_size > 1:  # (the ranks' token counts differ: gathered as objects)
        parts: list = [None] * world_size
        dist.all_gather_object(parts, local.cpu())
        local = torch.cat(parts).to(entropies.device)
    if not local.numel():
        return torch.zeros_like(trained)
    return (entropies >= torch.quantile(local, threshold)) & trained


def grpo_batch_loss(model, policy: LLM, batch, cfg: TrainConfig, reward_fns: list, generator: torch.Generator | None,
                    reference=None, rows: list | None = None) -> tuple[torch.Tensor, list, list[int], int]:
    """GRPO's loss on one packed batch of conversations, one process, no accumulation: grpo_rollout,
    grpo_prepare, grpo_loss with the policy as it is (model: what computes the log-probabilities;
    policy: the LLM that samples). Returns the loss, the means (grpo_stat_means: GRPO_STATS, then
    each reward's mean), the lengths of the
    sequences the loss was computed on and their trained targets (for MFU)."""
    rollout = grpo_rollout(policy, batch, cfg, reward_fns, generator, rows)
    cfg = replace(cfg, grad_accum=1, grpo_steps_per_generation=0)
    grpo_prepare([rollout], cfg, DistInfo(0, 1, batch[0].device), policy, reference)
    loss, loss_stats = grpo_loss(model, rollout, cfg)
    means = grpo_stat_means(torch.cat([rollout["stats"], loss_stats]), len(reward_fns),
                            batch_scaled(cfg))
    return loss, means, rollout["lengths"], rollout["targets"]


def make_loader(path, cfg: TrainConfig, seq_len: int, seed: int, info: DistInfo):
    """PackedLoader for token files of conversations (with .docs.npy and .mask.npy: each is
    computed alone anyway), else TokenLoader (with cfg.doc_mask)."""
    if has_documents(path):
        return PackedLoader(path, cfg.batch_size, seq_len, seed, info.rank, info.world_size, info.device)
    return TokenLoader(path, cfg.batch_size, seq_len, seed, info.rank, info.world_size, info.device, cfg.doc_mask)


# --- checkpoints -------------------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Rank `rank`'s torch seed for the steps from `step` on, where its random draws (dropout masks)
    are its own: with cfg.seed alone every data-parallel rank drops the same elements of its rows."""
    return int(np.random.default_rng([seed, rank, step, 2]).integers(2 ** 62))


def start_rank_rng(ckpt: dict | None, cfg: TrainConfig, info: DistInfo, step: int) -> None:
    """Each rank's random state for the training steps: its own stream under several processes (the
    set-up before drew alike on every rank: the initial weights, and the seed of stochastic
    rounding, which the replicas of DDP must share), and on resume the state the run had. A run
    resumed on another number of processes, or from a checkpoint that kept rank 0's state alone
    (format < 3), starts each rank's stream anew from (seed, rank, step): repeatable, never shared."""
    states = ckpt.get("rng_ranks") if ckpt is not None else None
    if ckpt is not None and info.world_size == 1:
        set_rng_state(ckpt["rng"], info.device)  # (rank 0's: the same for a 1-process checkpoint)
    elif states is not None and len(states) == info.world_size:
        set_rng_state(states[info.rank], info.device)
    elif info.world_size > 1:
        torch.manual_seed(rank_seed(cfg.seed, info.rank, step))


# Checkpoints hold the full (unsharded) model and optimizer state in the single-process format
# whatever the dist_mode, so a run may resume under another mode or number of processes.


def full_model_state(model, cfg: TrainConfig, info: DistInfo) -> dict:
    """The model's state dict; under FSDP2 gathered from the shards (collective: every rank calls)."""
    if info.world_size > 1 and cfg.dist_mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def param_names(model, optimizer) -> list[str]:
    """The model's name of each optimizer param, in the optimizer's order (= state_dict indices)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def rekey_optimizer_state(state: dict, old_keys: list, new_keys: list) -> dict:
    """An optimizer state dict with its param keys mapped old_keys[i] -> new_keys[i]: between
    torch.distributed.checkpoint's names (FSDP2) and the optimizer's indices (everything else)."""
    new_of = dict(zip(old_keys, new_keys))
    return {"state": {new_of[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [new_of[k] for k in g["params"]]} for g in state["param_groups"]]}


def full_optimizer_state(model, optimizer, cfg: TrainConfig, info: DistInfo) -> dict:
    """The optimizer's state dict, in AdamW's unsharded format (params keyed by index); under FSDP2
    or ZeRO-1 gathered from the shards onto rank 0, the others getting {} (collective: every rank
    calls)."""
    if info.world_size > 1 and cfg.dist_mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not info.is_main:  # cpu_offload gathers onto rank 0 only; the others get {}
            return {}
        names = param_names(model, optimizer)
        return rekey_optimizer_state(state, names, list(range(len(names))))
    if isinstance(optimizer, ZeroAdamW):  # gathered onto rank 0 only, as FSDP2's cpu_offload does
        return optimizer.full_state_dict(to_rank0=True)
    return optimizer.state_dict()


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file, fsync, then os.replace: a kill at any moment leaves either the
    old checkpoint or the new one, never a torn file. Ctrl-C and SIGTERM wait for the save (torch's
    writer had turned a Ctrl-C mid-write into an "unexpected pos" error and left the temp file); a
    failed write (a full disk) removes its temp file and says which file, with the space left."""
    with signals_held():
        tmp = None
        try:
            fd, tmp = new_temp_file(path)  # (its own per call: two writers never share one)
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if isinstance(e, (OSError, RuntimeError)):
                try:
                    free = f"; {shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
                except OSError:
                    free = ""
                raise OSError(f"writing {path} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              f"{free}): the previous checkpoint is kept") from e
            raise


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held off (recorded, not lost) for the block and raised again when it ends,
    so that a file write is never cut short by them. Python runs its signal handlers in the main
    thread only, so the handlers are swapped there (a thread's signal mask would not do: the
    signal goes to any thread that has it unmasked, torch's and OpenMP's among them, and Python's
    handler still runs in the main thread); elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    held = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:  # (None: a handler set outside Python, left alone)
            held[signum] = signal.signal(signum, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


_stop_requested = threading.Event()


def request_stop(signum=None, frame=None) -> None:
    """Ends a train() under way after the step it is on, with a checkpoint of that step, raising
    TrainingStopped: `pyllm train`'s SIGTERM handler (what SLURM, Kubernetes and torchrun send before
    a kill), or a call from another thread. As the handler, a second signal at least
    ESCALATE_AFTER_S after the first is the default's: the process ends now (a run stuck in set-up or
    a collective still dies to `kill`). Sooner, it is the same request: under SLURM and torchrun each
    worker gets SIGTERM twice within milliseconds (from the step's cgroup and from torchrun's agent)."""
    global _first_stop_at
    if signum is not None and _stop_requested.is_set():
        end_if_repeated(signum, _first_stop_at)
        return
    _first_stop_at = time.monotonic()
    _stop_requested.set()


def end_if_repeated(signum: int, first_at: float) -> None:
    """A signal handler's escalation (request_stop's, cli's SIGTERM handler's): the signal again at
    least ESCALATE_AFTER_S after the first (time.monotonic) is the default's, the process ends now;
    sooner, it is the same request (SLURM and torchrun each send one within milliseconds)."""
    if time.monotonic() - first_at >= ESCALATE_AFTER_S:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


ESCALATE_AFTER_S = 5.0
_first_stop_at = 0.0


class TrainingStopped(Exception):
    """train() stopped early by request_stop, after `step` steps, all in the checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def stop_requested(info: DistInfo) -> bool:
    """Whether any process was asked to stop, agreed by all (each then saves the same step: torchrun
    forwards a SIGTERM to every worker, each seeing it at its own moment)."""
    return any_rank(_stop_requested.is_set(), info)


def link_or_copy(source: Path, dest: Path) -> None:
    """dest (a new name) as a hard link of source where the file system allows (no second copy on
    disk), else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def keep_checkpoint(out: Path, step: int, keep: int) -> None:
    """checkpoint.pt also as checkpoints/step_<step>.pt, and only the last `keep` of those: a hard link
    where the file system allows (no second copy on disk: the next save replaces checkpoint.pt with a
    new file, the link keeps this one), else a copy. To resume from one: `--resume
    RUN/checkpoints/step_N.pt` (cli.install_kept_checkpoint; the log's later lines are dropped on resume)."""
    folder = out / "checkpoints"
    folder.mkdir(exist_ok=True)
    kept = folder / f"step_{step}.pt"
    kept.unlink(missing_ok=True)
    link_or_copy(out / CHECKPOINT, kept)
    # Steps past this one are an abandoned branch (the run was resumed from an older kept one): they
    # had outlived the run's new checkpoints. The rest: the last `keep` by step.
    steps = {int(p.stem.removeprefix("step_")): p for p in folder.glob("step_*.pt")
             if p.stem.removeprefix("step_").isdigit()}
    earlier = sorted(s for s in steps if s <= step)
    for old in [s for s in steps if s > step] + earlier[:-keep]:
        steps[old].unlink(missing_ok=True)


def source_run_weights(run_dir) -> Path:
    """The final weights of a folder `pyllm train` wrote (to fine-tune from), or ValueError."""
    path = Path(run_dir) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no model.safetensors; --init-from-run takes a folder `pyllm train` wrote "
                         "(it writes the weights at the end of a run)")
    return path


def to_device(value, device):
    """value (nested lists, tuples and dicts) with its tensors on device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def load_checkpoint(run_dir, mmap: bool = False) -> dict:
    """A run's checkpoint, checked; mmap: its tensors mapped from the file, read where used (an
    export reads its step and config, and the weights only when it takes them)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for torn files
        # (torch's long advice to load with weights_only=False is wrong, and unsafe, for a torn file)
        why = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in why:
            why = "not a file torch.load reads safely"
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {why[:200]})") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is no checkpoint `pyllm train` wrote (it lacks {', '.join(missing)}): a resume needs "
                         "the run's own (to start from other weights, see --init-from-run / --init-from-hf)")
    check_checkpoint_format(ckpt, path)
    return ckpt


CHECKPOINT_KEYS = ("model", "optimizer", "step", "skipped_steps", "model_config", "train_config", "rng", "loader")
# What a checkpoint's saved settings mean to the pyllm that resumes it. Raised with each change that
# gives a saved field another meaning on resume, so that a later pyllm can keep the old meaning for
# older checkpoints or say what changed, and an older pyllm refuses a newer checkpoint instead of
# resuming it under rules it does not know. 1: the checkpoints without the key (before 2026-12-04).
# 3: each rank's random state ("rng_ranks"; before 2026-12-05 every rank drew as rank 0 did).
CHECKPOINT_FORMAT = 3


def check_checkpoint_format(ckpt: dict, path) -> None:
    found = ckpt.get("format", 1)
    if not isinstance(found, int) or found > CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by a newer pyllm (checkpoint format {found}; this one reads up to "
                         f"{CHECKPOINT_FORMAT}): upgrade pyllm to resume it")


def changes_since(ckpt: dict, cfg: TrainConfig, world_size: int = 1) -> list[str]:
    """What a resumed run of an older checkpoint format now does otherwise, from its own settings (an
    audit resumed run folders of earlier pyllm commits: the format-1 two changed the run without a word)."""
    found = ckpt.get("format", 1)
    changes = []
    dropout = ckpt["model_config"].get("dropout", 0.0)
    if found < 3 and world_size > 1 and (dropout or cfg.lora_dropout):
        changes.append("each of the processes draws its own dropout masks (since 2026-12-05; every process had "
                       "drawn the ones of the first, so all of them dropped the same elements of their rows)")
    if found >= 2:
        return changes
    if dropout:
        changes.append(f"dropout ({dropout}) also drops attention probabilities, as nanoGPT's and GPT-2's "
                       "(since 2026-12-03; it had been the residual branches' only)")
    if cfg.schedule == "wsd":
        now, before = cfg.max_steps - round(cfg.max_steps * cfg.decay_frac), int(cfg.max_steps * (1 - cfg.decay_frac))
        if now != before:
            changes.append(f"the WSD decay starts at step {now}, not {before} (max_steps - round(max_steps * "
                           "decay_frac) since 2026-12-03, where int(max_steps * (1 - decay_frac)) fell a step short)")
    return changes


def state_finite(model_state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model_state.values() if t.is_floating_point())


# --- logging -------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Per-device peak for MFU; None on the CPU or an unknown GPU (MFU then shows n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


class RunLog:
    """log.jsonl, one JSON object per step; on resume, the lines of steps at or past the
    checkpoint (written by the killed run after its last checkpoint) are dropped first."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # torn by a full disk or a power cut: the run's own record
                    print(f"pyllm: {path}:{number} is not a whole JSON line; dropped", file=sys.stderr)
                    continue
                if record.get("step", start_step) < start_step:
                    kept.append(line)
        fd, tmp = new_temp_file(path)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.enabled:  # (a non-finite number as null: JSON has none)
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_losses(log_path: Path, png_path: Path) -> None:
    """loss.png from log.jsonl; without matplotlib (pyllm[train]'s), a note instead of the plot
    (the run's weights and log are written already: a plot is no reason to fail it)."""
    try:
        import matplotlib
    except ImportError as e:  # (not installed, or installed but broken: e says which, e.g. numpy too old for it)
        why = "matplotlib is not installed" if getattr(e, "name", None) == "matplotlib" else f"matplotlib: {e}"
        print(f"pyllm: no {png_path.name}: {why} (pip install 'pyllm[train]' or matplotlib)", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:  # (a run whose every step was skipped: no line to name, matplotlib had warned)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# --- the loop ------------------------------------------------------------------------------------------

def next_batches(loader, grad_accum: int, world_size: int) -> tuple[list, list[float] | None, list[int] | None, int,
                                                                   tuple[list[int], int] | None]:
    """A step's micro-batches, the weight of each one's mean loss, and the lengths of this rank's
    documents in them (packed or document-masked batches; None for plain windows). The weighted sum,
    averaged over the ranks as DDP averages gradients, is the step's mean loss over all its
    trained tokens: None (divide by grad_accum) for windows (every batch trains on B * T tokens); for packed
    conversations, whose batches train on different numbers of tokens, each batch's share of the
    step's (summed over the micro-batches of all ranks) times world_size, so that a batch with few
    trained tokens does not weigh as much as one with many. Preference pairs likewise by pairs
    (DPO's loss is a mean over pairs), their batches with the loader's docs as a fourth item. Last,
    this rank's trained targets in packed batches (where the output layer runs), else 0. KTO
    (labelled pairs): the lengths and targets are the examples', and a fifth item, the KL documents'
    lengths and targets (a pass without backward: preference_batch_loss); else None. Every packed
    batch has the loader's docs as a fourth item (GRPO: their rows; the padding, which a MoE's
    load balancing leaves out: batch_balance_kwargs)."""
    batches, lengths = [], []
    if not isinstance(loader, PackedLoader):
        for _ in range(grad_accum):
            batches.append(loader.next_batch())
            lengths = None if loader.lengths is None else lengths + loader.lengths
        return batches, None, lengths, 0, None
    mine, total, outputs, trained = [], 0, 0, 0
    kto = loader.labels is not None
    kl_lengths, kl_outputs = [], 0
    for _ in range(grad_accum):
        if loader.pairs is None:
            batches.append((*loader.next_batch(), loader.docs))
            mine.append(loader.targets)
            total += loader.global_targets
        else:  # preference pairs: DPO's loss is a mean over pairs, and needs to know which they are
            batches.append((*loader.next_batch(), loader.docs))
            mine.append(loader.placed)
            total += loader.global_placed
            trained += loader.global_targets  # (every rank's: a step none of whose replies is left is skipped)
        if not kto:
            lengths += loader.lengths
            outputs += loader.targets
            continue
        # an example, then its KL document (a pair's two documents, in order)
        lengths += loader.lengths[0::2]
        outputs += sum(loader.doc_targets[0::2])
        kl_lengths += loader.lengths[1::2]
        kl_outputs += sum(loader.doc_targets[1::2])
    if loader.pairs is not None and not trained:  # every reply cut away by seq_len: no weight, the step skipped
        mine = [0] * len(mine)
    return (batches, [n * world_size / max(total, 1) for n in mine], lengths, outputs,
            (kl_lengths, kl_outputs) if kto else None)


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None) -> dict:
    """Trains per cfg (resuming from cfg.out_dir's checkpoint when resume) up to cfg.max_steps, or
    returns early after step stop_at - 1 (tests use it to stand in for a kill). Returns a summary.
    Raises TrainingStopped after a request_stop (SIGTERM in `pyllm train`), its step checkpointed.
    One run at a time in a folder: another's lock on it is refused. A new run (not resume) in a
    folder that holds a run's checkpoint sets that one aside first (checkpoint.previous.pt,
    checkpoints.previous/), so that the folder never offers one run's checkpoint beside another's log."""
    cfg.validate()
    info = setup_distributed(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, info.is_main, info):
        if info.is_main:
            for name in _RUN_FILES:
                remove_stale_temp_files(out / name, older_than_s=0)
        if not resume and info.is_main:
            set_aside_earlier_run(out)
        if info.world_size > 1:
            dist.barrier()  # (no rank reads the folder before rank 0 has set it up)
        try:
            with deterministic_compiled_cpu(cfg, info):
                return _train(cfg, info, resume, stop_at)
        finally:
            _stop_requested.clear()  # (one asked for as the last step ended: nothing left to stop)


@contextlib.contextmanager
def deterministic_compiled_cpu(cfg: TrainConfig, info: DistInfo):
    """torch's deterministic algorithms for the block of a compiled run on the CPU (then restored):
    inductor lowers the embedding's backward (and any index_put / index_add with accumulate) to a
    parallel loop of atomic_adds, tokens of one id on different threads adding in the order the
    threads happen to run, so two identical runs differed by ~1e-7 (exact resume broke;
    OMP_NUM_THREADS=1 was repeatable). In this mode inductor calls aten.index_put_ there instead,
    whose CPU kernel then takes its sorted, deterministic path (the mode is read when it runs: it is
    needed while training, not only while compiling). warn_only: a CPU op with no deterministic
    algorithm warns rather than raises; uninitialized memory is not filled (the mode's NaN fill of
    each torch.empty is no part of repeatability). Eager runs are repeatable without it."""
    if not (cfg.compile and info.device.type == "cpu") or torch.are_deterministic_algorithms_enabled():
        yield  # (a caller's own deterministic mode is kept as it is)
        return
    fill = torch.utils.deterministic
    was_fill = fill.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        fill.fill_uninitialized_memory = was_fill


def set_aside_earlier_run(out: Path) -> None:
    """An earlier run's checkpoint.pt and kept checkpoints/ renamed to checkpoint.previous.pt and
    checkpoints.previous/ (replacing those of the run before it): a new run interrupted before its
    first checkpoint had pointed at the earlier run's as if it were its own (its log already the new
    run's), and deleting them outright lost a run to a forgotten --resume."""
    previous = out / "checkpoint.previous.pt"
    if (out / CHECKPOINT).exists():
        print(f"pyllm: {out} holds an earlier run's checkpoint; this new run sets it aside as {previous.name} "
              "(--resume goes on with a run instead)", file=sys.stderr)
        os.replace(out / CHECKPOINT, previous)
    if (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints.previous", ignore_errors=True)
        os.replace(out / "checkpoints", out / "checkpoints.previous")


# What new_temp_file leaves of the run's files when a kill lands mid-write (SIGKILL after a
# scheduler's grace period, mid-save): removed when the next run in the folder starts, under its lock.
_RUN_FILES = (CHECKPOINT, "model.safetensors", "log.jsonl", "completions.jsonl", "run.json")


_locked_here: set = set()  # run folders this process holds the lock of (run_lock nests: the CLI's, then train()'s)


@contextlib.contextmanager
def run_lock(out: Path, is_main: bool = True, info: DistInfo | None = None):
    """An exclusive lock on out/.lock for the block, taken by the main process (the OS drops it if
    the process dies): two runs in one folder had interleaved their logs and torn each other's
    checkpoints. Held already by this process (the CLI takes it before writing the run's data):
    nothing more. A file system without flock (NFS mounted nolock, some FUSE or Lustre mounts): a
    warning, and the run goes on unguarded. With info of a distributed run, every rank learns
    whether rank 0 got it (a refusal on rank 0 alone had left the others waiting at a barrier)."""
    key = os.path.realpath(out)
    f = None
    refused = None
    if is_main and key not in _locked_here:
        try:
            import fcntl
        except ImportError:  # (Windows: no flock; unguarded there)
            fcntl = None
        if fcntl is not None:
            f = open(out / ".lock", "a")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                _locked_here.add(key)
            except OSError as e:
                f.close()
                f = None
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    refused = (f"{out} is in use by another `pyllm train` (it holds {out / '.lock'}): give this run "
                               "another --out, or wait for that one to end")
                else:
                    print(f"pyllm: {out}'s file system takes no lock ({e.strerror}): nothing keeps a second run out "
                          "of this folder", file=sys.stderr)
    if info is not None and any_rank(refused is not None, info) and refused is None:
        refused = f"{out} is in use by another `pyllm train` (rank 0 could not lock it)"
    if refused is not None:
        raise RuntimeError(refused)
    try:
        yield
    finally:
        if f is not None:
            _locked_here.discard(key)
            f.close()  # (closing the last descriptor drops the lock)


def global_batch_notice(ckpt: dict, cfg: TrainConfig, world_size: int) -> str | None:
    """What a resume on another number of processes, batch size or accumulation does to the global
    batch (processes x --batch-size x --grad-accum sequences a step), where it changes it: the
    batch size is each process's, and a run resumed on 2 processes of 3's --batch-size went on
    with two thirds of its batch without a word (from the 3-process audit). None where it is kept
    or the checkpoint does not say its number of processes (before format 3)."""
    ranks, saved = len(ckpt.get("rng_ranks") or ()), ckpt.get("train_config") or {}
    if not ranks or "batch_size" not in saved:
        return None
    was = ranks * saved["batch_size"] * saved.get("grad_accum", 1)
    now = world_size * cfg.batch_size * cfg.grad_accum
    if was == now:
        return None
    keep = was // (world_size * cfg.grad_accum) if was % (world_size * cfg.grad_accum) == 0 else None
    return (f"the run goes on with {now} sequences a step ({world_size} process(es) x --batch-size {cfg.batch_size} "
            f"x --grad-accum {cfg.grad_accum}) where it had {was} ({ranks} x {saved['batch_size']} x "
            f"{saved.get('grad_accum', 1)}): --batch-size is each process's"
            + (f"; --batch-size {keep} keeps the run's" if keep else ""))


def loss_change_notice(ckpt: dict, cfg: TrainConfig) -> str | None:
    """What a resume that changes the training loss (--loss-type, --z-loss: taken, as the run's other
    options) does to its log: the loss logged before and after are other quantities (a dft run
    resumed as nll had jumped from 0.07 to 4.0 in its loss.png without a word). None where kept."""
    saved = ckpt.get("train_config") or {}
    was, now = (saved.get("loss_type", "nll"), saved.get("z_loss", 0.0)), (cfg.loss_type, cfg.z_loss)
    if was == now:
        return None
    return (f"the training loss changes at step {ckpt.get('step')}: --loss-type {was[0]} --z-loss {was[1]:g} before, "
            f"--loss-type {now[0]} --z-loss {now[1]:g} now; log.jsonl's loss before and after are other quantities")


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, stop_at: int | None) -> dict:
    precision = resolve_precision(cfg.precision, info.device)
    out, data = Path(cfg.out_dir), Path(cfg.data_dir)
    ckpt = load_checkpoint(out) if resume else None
    changes = changes_since(ckpt, cfg, info.world_size) if ckpt is not None else []
    if changes and info.is_main:
        print(f"pyllm: {out / CHECKPOINT} is from an earlier pyllm, whose run goes on under the current rules: "
              + "; ".join(changes), file=sys.stderr)
    if ckpt is not None and info.is_main and (notice := global_batch_notice(ckpt, cfg, info.world_size)):
        print(f"pyllm: {notice}", file=sys.stderr)
    if ckpt is not None and info.is_main and (notice := loss_change_notice(ckpt, cfg)):
        print(f"pyllm: {notice}", file=sys.stderr)
    if cfg.grpo_reward and cfg.grpo_loss_type == "luspo" and cfg.grpo_importance_sampling != "sequence" and info.is_main:
        # (TRL warns so too: LUSPO scales GSPO's sequence-level loss by each sample's length)
        print("pyllm: --grpo-loss-type luspo with token ratios; LUSPO's paper (and TRL, which warns) takes "
              "--grpo-importance-sampling sequence", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    # (val.bin's too: each file's header bounds its ids, and it was train.bin's alone that met the model)
    data_vocab = max(read_header(data / name)["vocab_size"] for name in ("train.bin", "val.bin"))  # (llm.c's shards too)
    if ckpt is not None:
        model = LLM.fitting(ModelConfig(**ckpt["model_config"]), ckpt["model"], out / CHECKPOINT)
    elif cfg.init_from_hf:  # its own config: the preset and model overrides do not apply (TRAINING_FIELDS aside)
        model = LLM.from_hf(cfg.init_from_hf, adapter=cfg.init_adapter or None)
    elif cfg.init_from_run:  # likewise
        model = LLM.load(source_run_weights(cfg.init_from_run))
    else:
        model = LLM(ModelConfig.from_preset(cfg.preset, **{"vocab_size": data_vocab, **cfg.model}))
    if ckpt is None and (cfg.init_from_hf or cfg.init_from_run):
        model.set_training_options(**{k: v for k, v in cfg.model.items() if k in LLM.TRAINING_FIELDS})
        if cfg.init_from_hf and "dropout" not in cfg.model and info.is_main:
            from pyllm.model import hf_dropout, hf_folder

            unused = hf_dropout(json.loads((hf_folder(cfg.init_from_hf) / "config.json").read_text()))
            if unused:
                print(f"pyllm: {cfg.init_from_hf}'s config.json asks for dropout ({unused}), which transformers "
                      "trains with: pyllm's fine-tune has none unless --model dropout=P says (P on the embeddings, "
                      "each block's outputs and the attention probabilities, as nanoGPT's)", file=sys.stderr)
    model.train()  # (a loaded model comes in eval mode: its dropout would be off)
    mcfg = model.config
    if cfg.preference == "reward":
        if model.score is None:  # a reward model from a language model
            std = 0.02  # (transformers draws the head with the config's initializer_range)
            if cfg.init_from_hf:
                from pyllm.model import hf_folder

                config = json.loads((hf_folder(cfg.init_from_hf) / "config.json").read_text())
                std = config.get("initializer_range", std)
            model.add_score_head(1, std=float(std))
            if ckpt is None:  # its scores read where TRL's (and so transformers') are: before a trailing pad
                pad = reward_pad_id(cfg)
                model.config.pad_token_id = pad if pad is not None and 0 <= pad < model.config.vocab_size else None
        if model.config.num_labels != 1:
            raise ValueError(f"preference reward trains a score head of one label; the model's has "
                             f"{model.config.num_labels} (ModelConfig.num_labels)")
        if not model.config.tie_embeddings:  # never computed with: frozen, not a parameter without a gradient (DDP)
            model.lm_head.requires_grad_(False)
    loaded = {}  # LoRA with 16-bit frozen weights: those the 16-bit copy would round, as loaded (for the export)
    if cfg.lora_rank:  # before the checkpoint's weights load: they hold the LoRA layers' too
        # Frozen weights need no fp32 master: held in the compute dtype (half their memory, no cast
        # per forward). Not under FSDP2, which all-gathers a block's parameters in one dtype.
        fsdp = info.world_size > 1 and cfg.dist_mode == "fsdp"
        frozen_dtype = None if fsdp else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if frozen_dtype is not None and ckpt is None:
            loaded = exact_copies(model, frozen_dtype)
        model.add_lora(cfg.lora_rank, lora_alpha_of(cfg.lora_rank, cfg.lora_alpha), frozen_dtype,
                       cfg.lora_targets or None, cfg.lora_dropout)
        if cfg.preference == "reward":  # the new head is trained whole (PEFT's modules_to_save for SEQ_CLS)
            model.score.requires_grad_(True)
    if data_vocab > mcfg.vocab_size:
        raise ValueError(f"the token files hold ids up to {data_vocab - 1}, but the model has {mcfg.vocab_size} "
                         "embeddings: tokenize with the model's own tokenizer")
    teacher = load_teacher(cfg, model, precision, info.device) if cfg.teacher else None
    reward = None  # GRPO's reward functions, and the data's rows they are given
    if cfg.grpo_reward:
        tokenizer = None
        if cfg.tokenizer:
            from pyllm.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(cfg.tokenizer)
        reward = load_reward(cfg, model, precision, info.device, tokenizer)
        rows, val_rows = read_rows(data / "train.bin"), read_rows(data / "val.bin")
        if rows is None and info.is_main and any(getattr(fn, "model", None) is None for fn in reward):
            print(f"pyllm: {data} has no train.rows.jsonl (token files made before pyllm kept the data lines' rows): "
                  "reward functions get the prompts decoded from the tokens and none of the lines' other keys "
                  "(answer=, solution=); give the *.jsonl file as --data again to have them", file=sys.stderr)
    seq_len = cfg.seq_len or mcfg.block_size
    if seq_len > mcfg.block_size:  # (said before any work: the first forward had refused it, mid-run)
        raise ValueError(f"seq_len {seq_len} is longer than the model's block_size {mcfg.block_size} (its context): "
                         f"give --seq-len {mcfg.block_size} or less")
    if info.is_main and cfg.warmup_steps >= cfg.max_steps and cfg.lr and not resume:
        # (lr (s + 1) / W at step s: the peak at step W - 1, the last step when W = max_steps)
        reach = "reaches lr {:g} only at its last step" if cfg.warmup_steps == cfg.max_steps else "never reaches lr {:g}"
        print(f"pyllm: warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate "
              f"{reach.format(cfg.lr)} in this run, and never decays (a short fine-tune wants --warmup-steps 0 or "
              "a few)", file=sys.stderr)
    if info.is_main and not has_kernels_for(info.device):
        print(f"pyllm: {_no_kernels_why()}: training runs on torch's attention, SwiGLU and AdamW", file=sys.stderr)
    model = model.to(info.device)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.fused_loss = cfg.fused_loss
    loader = make_loader(data / "train.bin", cfg, seq_len, cfg.seed, info)
    make_loader(data / "val.bin", cfg, seq_len, cfg.seed + 1, info)  # a val split too short for a window: now,
    # not at the first evaluation, eval_every steps in
    pairs = isinstance(loader, PackedLoader) and loader.pairs is not None
    labelled = isinstance(loader, PackedLoader) and loader.labels is not None
    if cfg.samples_replies and not (isinstance(loader, PackedLoader) and loader.pairs is None):
        raise ValueError("distill_lmbda, distill_seq_kd and grpo_reward (samples) continue the conversations' prompts: "
                         "they need conversations (*.jsonl), not text windows or pairs")
    if labelled != (cfg.preference == "kto"):
        raise ValueError("unpaired examples ({\"prompt\", \"completion\", \"label\"} lines) train by preference kto"
                         if labelled else "preference kto trains on unpaired examples ({\"prompt\", \"completion\", "
                         "\"label\"} lines), and these token files hold none")
    if pairs != bool(cfg.preference):
        raise ValueError("preference pairs ({\"prompt\", \"chosen\", \"rejected\"} lines) train by a preference loss: "
                         "give preference (--preference dpo)" if pairs else f"preference {cfg.preference}: it trains on "
                         "preference pairs ({\"prompt\", \"chosen\", \"rejected\"} lines), and these token files hold none")
    if labelled and info.is_main and (advice := kto_weight_advice(loader.labels, cfg.desirable_weight,
                                                                 cfg.undesirable_weight)):
        print(f"pyllm: {advice}", file=sys.stderr)
    if pairs and info.is_main:
        lengths = np.diff(loader.offsets)[loader.pairs].sum(1)
        if (lengths > seq_len).any():
            print(f"pyllm: {(lengths > seq_len).sum():,} of {len(lengths):,} preference pairs are longer than seq_len "
                  f"{seq_len} together (the longest: {lengths.max():,} tokens) and are cut to fit one row: what their "
                  "replies say past that is not compared (raise --seq-len)", file=sys.stderr)
    elif isinstance(loader, PackedLoader) and info.is_main:
        lengths = np.diff(loader.offsets)
        if (lengths > seq_len).any():
            print(f"pyllm: {(lengths > seq_len).sum():,} of {len(lengths):,} conversations are longer than seq_len "
                  f"{seq_len} (the longest: {lengths.max():,} tokens) and are cut to it: what the assistant says past "
                  "that is not trained on (raise --seq-len)", file=sys.stderr)
    wrapped = wrap_model(model, cfg, info)
    compiled_whole = cfg.compile and not compiles_blocks_alone(cfg, info)  # (its output layer at every position)
    optimizer = make_optimizer(model, cfg, info)
    scaler = make_loss_scaler(precision, cfg)
    start_step, skipped = 0, 0
    num_tokens = 0  # the tokens of every step so far (TRL's num_tokens); None from a checkpoint without it
    best_val = None  # keep_best: the lowest val loss so far, whose weights model.safetensors holds
    if ckpt is not None:
        restore(ckpt, model, optimizer, scaler, loader, cfg, info)
        start_step, skipped, num_tokens = ckpt["step"], ckpt["skipped_steps"], ckpt.get("num_tokens")
        best_val = ckpt.get("best_val_loss") if cfg.keep_best else None
    rollouts = None  # GRPO: the samples of the generation the steps are on (grpo_rollout, grpo_prepare)
    if ckpt is not None and "grpo_rollouts" in ckpt:
        if len(ckpt["grpo_rollouts"]) != info.world_size or len(ckpt["grpo_rollouts"][0]) != grpo_generation_micro(cfg):
            raise ValueError(f"this checkpoint was written mid-way through a GRPO generation's "
                             f"{grpo_generation_steps(cfg)} steps by {len(ckpt['grpo_rollouts'])} process(es) with {len(ckpt['grpo_rollouts'][0])} "
                             "micro-batches each, with their samples: resume it on as many, with as many "
                             "(--grpo-steps-per-generation, or --grad-accum where it is not given)")
        saved_accum = ckpt["train_config"].get("grad_accum", cfg.grad_accum)
        if saved_accum != cfg.grad_accum:  # (a step's micro-batches of the generation are counted by it: another
            # grad_accum had trained some of them twice, or sampled anew and left others untrained)
            raise ValueError(f"this checkpoint was written mid-way through a GRPO generation, its micro-batches "
                             f"trained --grad-accum {saved_accum} a step: resume it with --grad-accum {saved_accum} "
                             "(it may change at a checkpoint between generations)")
        rollouts = to_device(ckpt["grpo_rollouts"][info.rank], info.device)
        upgrade_rollout_stats(rollouts, cfg)
    reference = None  # DPO, IPO, hinge: the starting model's log-probability of every train and val document
    grpo_reference = None  # GRPO's KL term: the starting model's log-probabilities
    start = None  # a reference model of its own: the starting weights again, frozen (a resumed model is no longer them)
    if (cfg.grpo_beta and not cfg.lora_rank) or (cfg.preference and cfg.reference == "model"):
        start = load_frozen(cfg.init_from_hf or str(source_run_weights(cfg.init_from_run)), precision, info.device,
                            cfg.init_adapter or None)
        if cfg.sync_ref_model and ckpt is not None and "reference_model" in ckpt:  # (moved since the start)
            start.load_state_dict(ckpt["reference_model"])
    if cfg.grpo_beta and cfg.lora_rank:
        grpo_reference, start = lora_off_token_logps(model, wrapped, cfg.grpo_temperature), model
    elif cfg.grpo_beta:
        grpo_reference = torch.no_grad()(
            lambda x, y, cu: start(x, y, cu, per_token=True, temperature=cfg.grpo_temperature)[1])
    if rollouts is not None and grpo_reference is not None and any("ref" not in r for r in rollouts):
        # a run resumed with --grpo-beta mid-way through a generation sampled without it: the stored
        # samples' reference log-probabilities (every rank alike: a LoRA run's reference is collective)
        with autocast(precision, info.device):
            for r in rollouts:
                r["ref"] = grpo_reference(*r["packed"][:3])
    if cfg.preference and cfg.preference not in REFERENCE_FREE and cfg.reference == "lora-off":
        reference = dict.fromkeys(("train", "val"), lora_off_reference(model, wrapped, cfg.ld_alpha))
    elif cfg.preference and cfg.reference == "model":
        reference = dict.fromkeys(("train", "val"), model_reference(start, cfg.ld_alpha))
    elif cfg.preference and cfg.preference not in REFERENCE_FREE:
        if ckpt is not None and (was := (ckpt.get("train_config") or {}).get("ld_alpha")) != cfg.ld_alpha:
            raise ValueError(f"--ld-alpha {cfg.ld_alpha} where the run's precomputed reference log-probabilities "
                             f"(in its checkpoint) were weighted with {was} (None: off): its starting model is "
                             "gone, resume with the run's --ld-alpha")
        if ckpt is not None:
            reference = {k: v.numpy() for k, v in ckpt["reference_logps"].items()}
        else:
            if info.is_main:
                print(f"{cfg.preference}: computing the reference model's log-probabilities of the preference pairs",
                      file=sys.stderr)
            reference = {name: reference_logps(wrapped, data / f"{name}.bin", cfg, seq_len, precision, info)
                         for name in ("train", "val")}
    log = RunLog(out / "log.jsonl", start_step, info.is_main)
    completions_log = RunLog(out / "completions.jsonl", start_step, info.is_main and cfg.grpo_log_completions > 0)
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum * info.world_size
    peak = peak_flops(info.device)
    flops_per_token = model.flops_per_token(seq_len)
    if teacher is not None:  # the teacher's forward is work the hardware does each step too
        flops_per_token += teacher.flops_of_documents([seq_len], forward_only=True) / seq_len
    choices_len = 0  # rows for the multiple-choice candidates: seq_len, or the longest candidate
    if cfg.eval_choices:
        # a candidate of n tokens takes n - 1 positions (its first is never predicted); longer than the
        # model's context: cut from the left by score_choice_files, as pyllm eval cuts
        longest = int(np.diff(np.load(Path(cfg.eval_choices).with_suffix(".docs.npy"))).max()) - 1
        choices_len = min(max(seq_len, longest), mcfg.block_size)
    bar = make_progress(cfg, start_step, info)
    # (non-finite losses in a row before this step: a resume goes on counting, as the run would have)
    bad_in_a_row, val_loss, tok_s = (ckpt.get("bad_in_a_row", 0) if ckpt is not None else 0), None, 0.0
    empty = 0  # steps of this process's run without a trained token (skipped too)

    def write_weights(step_done: int) -> None:
        """model.safetensors, LoRA merged in (every rank calls: FSDP gathers; rank 0 writes)."""
        model_state = full_model_state(model, cfg, info)
        if info.is_main:
            # B A merged into the frozen weights as loaded, as PEFT's merge_and_unload adds it, not into
            # their 16-bit copies (which had rounded every adapted layer, its untargeted rows too, and
            # every MoE expert: 2e-3 off an fp32 source's weights)
            model_state = {k: loaded[k].to(torch.float32) if k in loaded and v.dtype != torch.float32 else v
                           for k, v in model_state.items()}
            save_weights(model_state, mcfg, out / "model.safetensors", model.lora_scale(), step=step_done)

    def checkpoint(step_done: int):
        model_state = full_model_state(model, cfg, info)
        optim_state = full_optimizer_state(model, optimizer, cfg, info)
        rng_ranks = [rng_state(info.device)]  # each rank's own random state
        if info.world_size > 1:
            rng_ranks = [None] * info.world_size
            dist.all_gather_object(rng_ranks, rng_state(info.device))
        grpo_rollouts = None  # mid-way through a generation's steps: every rank's samples, to go on with
        if reward is not None and step_done % grpo_generation_steps(cfg):
            grpo_rollouts = [to_device(rollouts, "cpu")]
            if info.world_size > 1:
                grpo_rollouts = [None] * info.world_size
                dist.all_gather_object(grpo_rollouts, to_device(rollouts, "cpu"))
        if not info.is_main:
            return
        if not state_finite(model_state):
            say(info, bar, f"step {step_done}: parameters hold inf/NaN; keeping the previous checkpoint")
            return
        save_checkpoint(out / CHECKPOINT, {
            "format": CHECKPOINT_FORMAT,
            "model": model_state, "optimizer": optim_state, "scaler": scaler.state_dict() if scaler else None,
            "rng": rng_ranks[0], "rng_ranks": rng_ranks, "loader": loader.state_dict(), "step": step_done,
            "skipped_steps": skipped, "bad_in_a_row": bad_in_a_row, "num_tokens": num_tokens,
            "model_config": mcfg.to_dict(),
            "train_config": asdict(cfg),
            "best_val_loss": best_val,
            # (torchrun --max-restarts: a restarted attempt of this job goes on from here, cli.elastic_restart_resume)
            "elastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            **({"reference_logps": {k: torch.from_numpy(v) for k, v in reference.items()}}
               if reference and cfg.reference == "precomputed" else {}),
            **({"grpo_rollouts": grpo_rollouts} if grpo_rollouts is not None else {}),
            # the reference model as synced so far (a resume had gone back to the starting weights)
            **({"reference_model": {k: v.cpu() for k, v in start.state_dict().items()}}
               if cfg.sync_ref_model and step_done >= cfg.ref_model_sync_steps else {})})
        if cfg.keep_checkpoints:
            keep_checkpoint(out, step_done, cfg.keep_checkpoints)

    # Packed conversations' loss from the per-token log-probabilities (packed_loss: the output layer at
    # the trained positions only, the MoE balancing term added here); the fused loss computes it at
    # those positions itself, and z-loss takes the model's own loss (logits at every position).
    per_token_packed = not cfg.fused_loss and not cfg.z_loss
    dft = {"token_scaling": True} if cfg.loss_type == "dft" else {}  # (the model's loss; val_loss stays the NLL)
    token_stats = cfg.token_stats and not (cfg.preference or reward is not None or teacher is not None)
    pair_token_stats = cfg.token_stats and cfg.preference not in ("", "reward")  # (preference_batch_loss')
    start_rank_rng(ckpt, cfg, info, start_step)  # last, after everything the set-up drew
    stopped_after = None  # request_stop: the step whose checkpoint ends the run
    for step in range(start_step, cfg.max_steps):
        if stop_at is not None and step >= stop_at:
            break
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=info.device)
        aux_sum = torch.zeros((), device=info.device)  # the part of loss_sum that is load balancing (MoE)
        z_sum = torch.zeros((), device=info.device)  # the part of loss_sum that is z-loss
        pref_names = preference_stat_names(cfg.preference) if cfg.preference else []
        pref_sums = torch.zeros(len(pref_names), device=info.device)  # their step means (KTO: chosen, rejected)
        # KTO, per micro-step: desirable, undesirable rewards' sums and counts, z (TRL logs each micro-step's
        # means over all ranks, then their mean over the micro-steps); the token sums, a reward model's extremes
        pref_extra = PreferenceSums(cfg.preference, cfg.grad_accum, pair_token_stats, info.device)
        # pretraining and SFT: each micro-step's token_stats_term (entropy sum, argmax hits, targets)
        stat_sums = torch.zeros(cfg.grad_accum, 3, device=info.device) if token_stats else None
        on_policy = 0  # micro-batches of the student's own samples (distill_lmbda)
        grpo_sums = torch.zeros(12 + 2 * len(reward or ()), dtype=torch.float64)  # grpo_stat_means' sums
        # each micro-step's entropy, KL sums, tokens, then clipped tokens (either side, low, high) and their count
        grpo_micro = torch.zeros(cfg.grad_accum, 7, dtype=torch.float64)
        grpo_extremes = torch.zeros(cfg.grad_accum, 2, dtype=torch.float64)  # and -clip_ratio/low_min, high_max
        generation_flops = 0.0
        generates = reward is not None and (step % grpo_generation_steps(cfg) == 0 or rollouts is None)
        if reward is None or generates:
            batches, weights, lengths, outputs, forward_only = next_batches(
                loader, cfg.grad_accum if reward is None else grpo_generation_micro(cfg), info.world_size)
            if cfg.kto_loss_type == "apo_zero_unpaired":  # (no pass over KTO's KL documents: not in the FLOPs)
                forward_only = None
        if generates:  # GRPO: the generation's samples first (dapo and batch scaling want all of them), reused
            rollouts = []  # for grpo_generation_steps; each rank samples its own rows, seeded by step, micro-step, rank
            for micro, batch in enumerate(batches):
                seed = int(np.random.default_rng([cfg.seed, step, micro, info.rank]).integers(2 ** 62))
                rollouts.append(grpo_rollout(model, batch[:3], cfg, reward, torch.Generator(info.device).manual_seed(seed),
                                             grpo_rows(rows, batch[3], batch[2], loader.offsets), step))
            with autocast(precision, info.device):
                grpo_prepare(rollouts, cfg, info, model, grpo_reference)
            if cfg.grpo_log_completions:
                log_completions(completions_log, step, rollouts, cfg, info, tokenizer)
        generated_tokens = 0  # GRPO: this rank's tokens in the generation the step samples (num_tokens)
        if generates:
            # the forward-only work of a generation, in the step that makes it (MFU): the sampling (each
            # sequence once, the output layer at its sampled tokens), the policy's p_old, the
            # reference's and the reward models' passes
            lengths, outputs = [n for r in rollouts for n in r["lengths"]], sum(r["targets"] for r in rollouts)
            generated_tokens = sum(lengths)
            grpo_sums[:-5] = sum(r["stats"].cpu() for r in rollouts)  # (the loss's five: each step's own)
            generation_flops = sum(model.flops_of_documents(*r["sampled"], forward_only=True) for r in rollouts)
            for extra in ([model] if grpo_takes_p_old(cfg) else []) + ([start] if grpo_reference else []):
                generation_flops += extra.flops_of_documents(lengths, outputs, forward_only=True)
            for fn in reward:
                if getattr(fn, "model", None) is not None:  # a reward model: its score head, no output layer
                    generation_flops += fn.model.flops_of_documents(lengths, 0, forward_only=True)
        if reward is not None:  # the step's grad_accum micro-batches of the generation (TRL's order: each in
            # turn, all of them again on each of grpo_iterations); the FLOPs: their training pass
            first = step % grpo_generation_steps(cfg) % (grpo_generation_micro(cfg) // cfg.grad_accum) * cfg.grad_accum
            batches, weights, forward_only = rollouts[first:first + cfg.grad_accum], None, None
            lengths, outputs = [n for r in batches for n in r["lengths"]], sum(r["targets"] for r in batches)
        for micro, batch in enumerate(batches):
            last = micro == cfg.grad_accum - 1
            no_sync = wrapped.no_sync() if hasattr(wrapped, "no_sync") and not last else contextlib.nullcontext()
            micro_weight = None  # (a micro-batch of samples': sampled_weight)
            with no_sync, autocast(precision, info.device):
                if cfg.preference:
                    loss, stats, *extra = preference_batch_loss(
                        wrapped, batch, reference and reference["train"], loader.labels, loader.margins,
                        fused=cfg.fused_loss and not compiled_whole and precision != "fp16",
                        token_stats=pair_token_stats, **preference_options(cfg))
                    pref_sums += stats[:len(pref_names)] * weights[micro]
                    pref_extra.add(micro, stats, extra)
                elif reward is not None:
                    loss, loss_stats = grpo_loss(wrapped, batch, cfg, info.world_size)
                    grpo_sums[-5:] += loss_stats[:5]
                    grpo_micro[micro] = loss_stats[[4, 0, 1, 2, 5, 6, 3]]
                    grpo_extremes[micro] = loss_stats[[7, 8]] * torch.tensor([-1.0, 1.0], dtype=torch.float64)
                elif teacher is not None:
                    # GKD's seq_kd (the teacher's samples), then lmbda (the student's): the same draw on
                    # every rank (seeded by step and micro-step), each rank's samples its own; a batch
                    # of samples keeps the weight of the one it replaced
                    seeds = np.random.default_rng([cfg.seed, step, micro, info.rank]).integers(2 ** 62, size=2)
                    # TRL's order: the student's samples at lmbda's draw, else (seq_kd) the teacher's; the
                    # teacher had sampled every micro-batch first, its samples then replaced by the student's
                    if cfg.distill_lmbda and np.random.default_rng([cfg.seed, step, micro]).random() < cfg.distill_lmbda:
                        batch = on_policy_batch(model, batch, cfg, torch.Generator(info.device).manual_seed(int(seeds[1])))
                        on_policy += 1
                        micro_weight = sampled_weight(batch, weights, micro, cfg, info)
                    elif cfg.distill_seq_kd:
                        batch = on_policy_batch(teacher, batch, cfg, torch.Generator(info.device).manual_seed(int(seeds[0])))
                        micro_weight = sampled_weight(batch, weights, micro, cfg, info)
                    loss = distill_loss(wrapped, teacher, batch, cfg)
                elif weights is not None and per_token_packed:  # packed conversations
                    loss = packed_loss(wrapped, batch, token_stats, cfg.loss_type == "dft")
                elif cfg.z_loss:
                    loss = wrapped(*batch[:3], z_loss=cfg.z_loss, token_stats=token_stats, **dft,
                                   **batch_balance_kwargs(wrapped, batch))[1]
                    z_sum += model.z_loss_term / cfg.grad_accum if weights is None else model.z_loss_term * weights[micro]
                else:
                    loss = wrapped(*batch[:3], token_stats=token_stats, **dft,
                                   **batch_balance_kwargs(wrapped, batch))[1]
                if token_stats:
                    stat_sums[micro] = model.token_stats_term
                if model.aux_loss is not None:  # a MoE's load balancing (in the loss unless the forward was per token)
                    if cfg.preference or reward is not None or (teacher is None and weights is not None
                                                                and per_token_packed):
                        loss = loss + model.aux_loss
                    aux = model.aux_loss.detach()
                    aux_sum += aux / cfg.grad_accum if weights is None else aux * weights[micro]
                loss = loss * micro_weight if micro_weight is not None else (
                    loss / cfg.grad_accum if weights is None else loss * weights[micro])
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        loss_value = float(all_reduce_mean(loss_sum, info))
        # no trained token in the step's batches of any rank (every reply cut away by seq_len): nothing to
        # learn from; skipped, its loss none (AdamW's momentum and weight decay had moved the weights).
        # Every rank's weights, not this rank's alone: a rank whose rows hold no trained token while
        # another's do must step too (its replica would drift; FSDP's and ZeRO-1's collectives mismatch)
        no_targets = weights is not None and not any_rank(any(weights), info)
        # GRPO: no sampled token to train on in the step on any rank (every prompt cut by --seq-len, or
        # every sample masked as truncated): skipped alike ("tokens" is every rank's, from grpo_prepare)
        no_targets = no_targets or (reward is not None and not any(r.get("micro_tokens", r["tokens"]) for r in batches))
        if no_targets:
            stepped, grad_norm, empty = False, float("nan"), empty + 1
            optimizer.zero_grad(set_to_none=True)
        elif math.isfinite(loss_value):
            bad_in_a_row = 0
            stepped, grad_norm = optimizer_step(optimizer, scaler, cfg.grad_clip, model)
        else:
            bad_in_a_row, stepped, grad_norm = bad_in_a_row + 1, False, float("nan")
            optimizer.zero_grad(set_to_none=True)
            if bad_in_a_row >= cfg.nan_patience:
                bar.close()
                raise TrainingDiverged(
                    f"loss was {loss_value} for {bad_in_a_row} steps in a row (steps {step - bad_in_a_row + 1}..{step}); "
                    f"stopping. The last good checkpoint is kept in {out / CHECKPOINT} (lower --lr or use --precision fp32/bf16)")
        if cfg.sync_ref_model and (step + 1) % cfg.ref_model_sync_steps == 0:  # (TRL's: at its global steps)
            sync_reference(start, model, cfg.ref_model_mixup_alpha)
        skipped += not stepped
        dt = time.perf_counter() - t0
        if lengths is None:  # windows of seq_len tokens
            step_tokens, step_flops = tokens_per_step, flops_per_token * tokens_per_step
        else:  # documents: their tokens alone (not the padding), each attending to its own document
            # packed batches: the output layer at the trained tokens only (every position when compiled,
            # or with z-loss on the plain loss: the model's own logits)
            skipped_outputs = (isinstance(loader, PackedLoader) and not compiled_whole
                               and (cfg.fused_loss or per_token_packed))
            if cfg.preference == "reward":  # the score head at a token per sequence, no output layer
                outputs, skipped_outputs = 0, True
            step_flops = model.flops_of_documents(lengths, outputs if skipped_outputs else None)
            if forward_only is not None:  # KTO's KL documents
                step_flops += model.flops_of_documents(forward_only[0], forward_only[1] if skipped_outputs else None,
                                                       forward_only=True)
                lengths = lengths + forward_only[0]
            if teacher is not None:  # (its output layer at the trained targets alone: linear_distill)
                step_flops += teacher.flops_of_documents(lengths, outputs if skipped_outputs else None, forward_only=True)
            step_flops += generation_flops  # GRPO
            # every rank's documents (their lengths differ: packed rows, pairs, KTO's examples), not
            # this rank's times world_size
            counted = all_reduce_sum(torch.tensor([step_flops, float(sum(lengths)), float(generated_tokens)],
                                                  dtype=torch.float64), info)
            step_flops, step_tokens, generated_tokens = float(counted[0]), int(counted[1]), int(counted[2])
        tok_s = step_tokens / dt
        mfu = step_flops / dt / (peak * info.world_size) if peak else None
        # (GRPO: TRL counts a generation's prompt and completion tokens once, when it samples them, not
        # again on each of the steps it trains)
        if num_tokens is not None:
            num_tokens += step_tokens if reward is None else generated_tokens
        record = {"step": step, "loss": loss_value if math.isfinite(loss_value) and not no_targets else None, "lr": lr,
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "tokens": step_tokens,
                  "num_tokens": num_tokens,
                  "tokens_per_s": round(tok_s, 1), "mfu": mfu, "skipped": not stepped}
        if scaler:
            record["loss_scale"] = scaler.get_scale()
        if mcfg.n_experts and mcfg.router_aux_loss_coef:
            record["aux_loss"] = float(all_reduce_mean(aux_sum, info))
        if cfg.z_loss:
            record["z_loss"] = float(all_reduce_mean(z_sum, info))
        if token_stats:
            record["entropy"], record["mean_token_accuracy"] = token_stat_means(all_reduce_sum(stat_sums, info))
        if cfg.distill_lmbda:
            record["on_policy"] = on_policy / cfg.grad_accum
        if generates:  # a generation's metrics once, in the step that samples it (TRL's: its steps that
            # reuse the samples log the loss's alone, not the same rewards again; every rank alike: collectives)
            record.update(generation_metrics(all_reduce_sum(grpo_sums, info), rollouts, cfg, info))
            if cfg.grpo_loss_type == "rloo" and cfg.grpo_beta:  # (RLOO's KL, in its rewards: the generation's)
                record["kl"] = rollouts[0]["kl"]
        if reward is not None:
            # TRL's entropy and KL: each micro-step's mean over every rank's trained tokens (0.0 where none), then
            # their mean (the pooled ratio had weighed micro-steps by their tokens: 0.01 nats apart at 2 and 22)
            per = all_reduce_sum(grpo_micro, info).tolist()
            record["entropy"] = micro_step_mean(per, 0, 2)
            if cfg.grpo_beta and cfg.grpo_loss_type != "rloo":
                record["kl"] = micro_step_mean(per, 1, 2)
            record.update(grpo_clip_metrics(cfg, per, all_reduce_sum(grpo_extremes, info, dist.ReduceOp.MAX)))
            record.update(reward_metric_means(reward, info))  # (reward functions' log_metric, TRL's)
        if cfg.preference:
            record.update(pref_extra.metrics(dict(zip(pref_names, all_reduce_mean(pref_sums, info).tolist())), info))
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step == cfg.max_steps - 1:
            if cfg.preference:
                record.update(evaluate_preference(wrapped, data / "val.bin", reference and reference["val"], cfg,
                                                  seq_len, precision, info))
                val_loss = record["val_loss"]
                say(info, bar, f"step {step + 1}: val {cfg.preference} loss {val_loss:.4f}, reward accuracy "
                               f"{record['val_reward_accuracy']:.1%}")
            else:
                val_loss = record["val_loss"] = evaluate(wrapped, data / "val.bin", cfg, seq_len, precision, info,
                                                         record if token_stats else None)
                say(info, bar, f"step {step + 1}: val loss {val_loss:.4f}" + (
                    " (no trained token in the val batches, or a diverged model)" if math.isnan(val_loss) else ""))
            if cfg.keep_best and math.isfinite(val_loss) and (best_val is None or val_loss < best_val):
                best_val = val_loss
                write_weights(step + 1)
                say(info, bar, f"step {step + 1}: the lowest val loss so far: its weights are model.safetensors")
            if reward is not None:  # GRPO: the policy's samples of the val prompts, rewarded
                record.update(evaluate_rewards(model, data / "val.bin", cfg, seq_len, reward, val_rows, info, step,
                                               grpo_reference))
                if record["val_reward"] is not None:
                    say(info, bar, f"step {step + 1}: val reward {record['val_reward']:.4f}")
            if cfg.eval_choices:
                from pyllm.evaluate import score_choice_files

                score = score_choice_files(wrapped, cfg.eval_choices, choices_len, cfg.batch_size, precision, info)
                # (choices_acc_per_token is what llm.c's HellaSwag eval reports as acc_norm)
                record.update(choices_acc=score["acc"], choices_acc_norm=score["acc_norm"],
                              choices_acc_per_token=score["acc_per_token"])
                say(info, bar, f"step {step + 1}: {score['examples']:,} multiple-choice examples: acc "
                               f"{score['acc']:.4f}, acc_norm {score['acc_norm']:.4f}")
        log.write(record)
        bar.set_postfix_str(f"loss {loss_value:.3f}  {tok_s:,.0f} tok/s  MFU {f'{mfu:.1%}' if mfu else 'n/a'}"
                            + (f"  skipped {skipped}" if skipped else ""))
        bar.update(1)
        stopping = stop_requested(info)
        if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step == cfg.max_steps - 1 or stopping:
            checkpoint(step + 1)
        if stopping and step < cfg.max_steps - 1:
            stopped_after = step + 1
            break
    bar.close()
    if stopped_after is not None:
        if info.world_size > 1:
            dist.barrier()  # rank 0's checkpoint is whole when any rank stops
        raise TrainingStopped(stopped_after)
    if stop_at is None:
        lost = cfg.keep_best and best_val is not None and weights_lost(out / "model.safetensors", info)
        if lost and info.is_main:
            print(f"pyllm: {out / 'model.safetensors'}, the weights of the lowest val loss ({best_val:.4f}), is gone: "
                  "writing the last weights there instead", file=sys.stderr)
        if not (cfg.keep_best and best_val is not None) or lost:
            write_weights(cfg.max_steps)  # (keep_best: written at its evaluation)
        if info.is_main:
            plot_losses(out / "log.jsonl", out / "loss.png")
    if info.world_size > 1:
        dist.barrier()  # rank 0's files are complete when any rank returns
    return {"model": model, "val_loss": val_loss, "best_val_loss": best_val, "skipped_steps": skipped,
            "empty_steps": empty, "tokens_per_s": tok_s,
            "precision": precision, "device": str(info.device), "out_dir": str(out), "rank": info.rank,
            "world_size": info.world_size}


def weights_lost(path: Path, info: DistInfo) -> bool:
    """Whether rank 0 finds no weights file at path, told to every rank: writing them is collective
    (FSDP gathers), and other nodes' folders need not show rank 0's files."""
    return any_rank(info.is_main and not path.is_file(), info)  # (rank 0's alone: the others give False)


def restore(ckpt: dict, model, optimizer, scaler, loader, cfg: TrainConfig, info: DistInfo) -> None:
    if info.world_size > 1 and cfg.dist_mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        names = param_names(model, optimizer)
        optim_state = rekey_optimizer_state(ckpt["optimizer"], list(range(len(names))), names)
        # A checkpoint from pyllm's AdamW (another mode) has group keys torch's AdamW lacks.
        optim_state["param_groups"] = [{k: v for k, v in saved.items() if k in group}
                                       for saved, group in zip(optim_state["param_groups"], optimizer.param_groups)]
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(ckpt["model"])  # before ZeroAdamW's state: it re-reads its shard of the params
        if isinstance(optimizer, ZeroAdamW):
            optimizer.load_full_state_dict(ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(ckpt["loader"])
    # (the RNG state is set by train itself, just before its loop: what set-up draws after this
    # (a frozen reference model's init) would otherwise shift the resumed run's dropout masks)


def say(info: DistInfo, bar, message: str) -> None:
    if info.is_main:
        bar.write(message)


def make_progress(cfg: TrainConfig, start_step: int, info: DistInfo):
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and info.is_main))
