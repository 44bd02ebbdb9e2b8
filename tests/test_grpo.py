"""GRPO: group-normalized rewards of the policy's own samples (train.grpo_batch_loss) and the trainer's use of it."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pyllm import data
from pyllm import train as trainer
from pyllm.model import LLM, ModelConfig
from pyllm.train import TrainConfig

from helpers import run_torchrun
from test_train import TINY, chat_dir, config, data_dir, losses, pairs_dir, run_two_processes  # noqa: F401  (fixtures)

SPEC = "test_grpo:sevens"  # the reward function below, as "module:function"


def sevens(completion_ids, **kwargs):
    """A verifiable reward (TRL's convention: by keyword, the rest in kwargs): the share of a
    completion's tokens that are 7; its mean logged through TRL's log_metric where given."""
    shares = [sum(t == 7 for t in c) / len(c) for c in completion_ids]
    if "log_metric" in kwargs and shares:
        kwargs["log_metric"]("sevens_mean", sum(shares) / len(shares))
    return shares


def short_or_none(completion_ids, **kwargs):
    """A second reward: 1 for samples without a 9, None (unscored) for those starting with a multiple of 3."""
    return [None if c[0] % 3 == 0 else float(9 not in c) for c in completion_ids]


CALLS = []  # what answered was given (test_chat's CLI run)


def answered(prompts, completions, answer, **kwargs):
    """A reward of a data column (TRL's convention): 1 where the completion's text holds the line's answer."""
    CALLS.append(dict(prompts=prompts, completions=completions, answer=answer, **kwargs))
    return [float(a in (c if isinstance(c, str) else c[0]["content"])) for c, a in zip(completions, answer)]


def tiny(**kw):
    torch.manual_seed(0)
    return LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64, "block_size": 32, **kw}))


def test_sampling_runs_compiled_blocks_eager():
    # Under FSDP with --compile each block is compiled (wrap_model); the samples, a token at a time
    # through a KV cache, had recompiled the blocks for each new shape (8 graphs a rank in 3 GRPO
    # steps, near dynamo's limit of 8): they run eager, the samples those of the uncompiled model.
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    want = trainer.sample_replies(model, prompts, 6, 1.0, [], torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile()
    got = trainer.sample_replies(model, prompts, 6, 1.0, [], torch.Generator().manual_seed(3))
    assert got == want and counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("shape", [{}, {"logits_scaling": 4.0}, {"final_softcap": 3.0}])
@pytest.mark.parametrize("fused", [False, True])
def test_log_probabilities_at_a_temperature(shape, fused):
    # LLM.forward(per_token=True, temperature=T): log_softmax(final logits / T), the distribution GRPO's
    # samples are drawn from (TRL's GRPOTrainer divides its logits by the temperature), with the
    # fused loss too (the division folded into its scale; after a cap, the logits whole)
    model = tiny(**shape).double()
    model.fused_loss = fused
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, 1)
    targets[:, :3] = -1
    logits = model(idx)[0]
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -1)
    torch.testing.assert_close(model(idx, targets, per_token=True, temperature=0.7)[1], want, rtol=1e-12, atol=1e-12)
    for call in (dict(), dict(targets=targets), dict(targets=targets, per_token=True, temperature=0.0)):
        with pytest.raises(ValueError, match="temperature"):  # (ignored, or a ZeroDivisionError, before)
            model(idx, **{"temperature": 0.7, **call})


@pytest.mark.parametrize("beta,iterations", [(0.0, 1), (0.3, 2)])
def test_grpo_log_probabilities_are_at_the_sampling_temperature(chat_dir, beta, iterations):  # noqa: F811
    # The policy's, p_old's and the reference's log-probabilities at --grpo-temperature, as TRL's
    # (its logits / args.temperature): at T = 0.7 they had been at T = 1, another objective than the
    # sampling policy's (gradients 0.066 apart of at most 0.21; from the GRPO audit)
    T = 0.7
    model, ref_model = tiny().double(), tiny(dim=96, n_heads=3, n_kv_heads=1).double()
    batch = data.PackedLoader(chat_dir / "train.bin", 3, 32, seed=0).next_batch()
    stops = list(range(12))
    cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=5, grpo_beta=beta,
                      sample_stop_tokens=stops, grpo_temperature=T, grpo_iterations=iterations)
    reward = trainer.load_reward(cfg, model, "fp32", torch.device("cpu"))
    reference = torch.no_grad()(lambda x, y, cu: ref_model(x, y, cu, per_token=True, temperature=T)[1])
    rollout = trainer.grpo_rollout(model, batch, cfg, reward, torch.Generator().manual_seed(1))
    trainer.grpo_prepare([rollout], cfg, trainer.DistInfo(), model, reference if beta else None)
    loss, _ = trainer.grpo_loss(model, rollout, cfg)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    terms = []
    for prompt, sample, a in zip(rollout["prompt_ids"], rollout["completion_ids"], rollout["advantages"]):
        ids = torch.tensor(prompt + sample)

        def logps(m):
            return torch.log_softmax(m(ids[None])[0][0] / T, -1)[torch.arange(len(ids) - 1), ids[1:]][len(prompt) - 1:]

        logp = logps(model)
        ratio = torch.exp(logp - logp.detach())  # (p_old at T too: the ratio 1 in value)
        term = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
        with torch.no_grad():
            d = logps(ref_model) - logp
        d = d.detach() + logp.detach() - logp
        terms.append(term + beta * (torch.exp(d) - d - 1) * ratio)
    want = torch.cat(terms).sum() / sum(len(t) for t in terms)  # dapo's
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("scale,beta,clip,masked", [("group", 0.0, [], False), ("batch", 0.3, [0.1, 0.6], True),
                                                    ("none", 0.3, [], False)])
def test_rloo_is_trls_rloo_trainer(chat_dir, scale, beta, clip, masked):  # noqa: F811
    # grpo_loss_type rloo, TRL 1.16's RLOOTrainer in fp64: rewards clamped to clip, less beta times
    # each sample's summed log p_old - log p_ref (the KL in the reward), advantages the reward less
    # the mean of its group's others, normalized over the generation with scale batch (TRL's
    # normalize_advantages); per sample -min(ratio A, clip(ratio) A), ratio the exp of its summed
    # log-ratio to p_old (moved off the policy here), their mean; the clip shares over samples
    model, ref_model = tiny().double(), tiny(dim=96, n_heads=3, n_kv_heads=1).double()
    batch = data.PackedLoader(chat_dir / "train.bin", 3, 32, seed=0).next_batch()
    stops = list(range(12))
    cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=5, grpo_beta=beta,
                      sample_stop_tokens=stops, grpo_loss_type="rloo", grpo_scale_rewards=scale, grpo_epsilon=0.1,
                      grpo_epsilon_high=0.15, grpo_reward_clip=clip, grpo_mask_truncated=masked)
    reward = trainer.load_reward(cfg, model, "fp32", torch.device("cpu"))
    reference = torch.no_grad()(lambda x, y, cu: ref_model(x, y, cu, per_token=True)[1])
    rollout = trainer.grpo_rollout(model, batch, cfg, reward, torch.Generator().manual_seed(1))
    trainer.grpo_prepare([rollout], cfg, trainer.DistInfo(), model, reference if beta else None)
    x, y, cu, at = rollout["packed"]
    sampled_old = rollout["old"].clone()
    g = torch.Generator().manual_seed(2)  # (as if the policy had moved since it sampled: some ratios clipped)
    rollout["old"] = rollout["old"] + torch.randn(y.shape, generator=g, dtype=torch.float64) * 0.3 * (y != -1)
    loss, loss_stats = trainer.grpo_loss(model, rollout, cfg)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    samples = rollout["completion_ids"]
    rewards = torch.tensor(sevens(samples), dtype=torch.float32).double()
    if clip:
        rewards = rewards.clamp(*clip)
    flat_old, flat_ref = sampled_old.view(-1), (reference(x, y, cu).view(-1) if beta else None)
    moved_old, coefs, kl_sum, kl_tokens = rollout["old"].view(-1), [], 0.0, 0
    for i, (prompt, sample) in enumerate(zip(rollout["prompt_ids"], samples)):
        start = int(cu[at[i]]) + len(prompt) - 1
        span = slice(start, start + len(sample))
        ids = torch.tensor(prompt + sample)
        logp = torch.log_softmax(model(ids[None])[0][0], -1)[torch.arange(len(ids) - 1), ids[1:]][len(prompt) - 1:]
        trained = not masked or sample[-1] in stops  # (TRL's completion_mask: 0 for a masked truncated sample)
        coefs.append(torch.exp(logp.sum() - moved_old[span].sum()) if trained else torch.ones((), dtype=torch.float64))
        if beta and trained:
            kl = (flat_old[span] - flat_ref[span]).sum()
            rewards[i] -= beta * kl
            kl_sum, kl_tokens = kl_sum + kl.item(), kl_tokens + len(sample)
    grouped = rewards.view(-1, 4)
    advantages = (grouped - (grouped.sum(1, keepdim=True) - grouped) / 3).view(-1)
    if scale == "batch":
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    assert torch.allclose(rollout["advantages"], advantages, rtol=1e-10, atol=1e-12)
    coef = torch.stack(coefs)
    want = -torch.min(coef * advantages, torch.clamp(coef, 0.9, 1.15) * advantages).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-7, atol=1e-12)
    low, high = ((coef < 0.9) & (advantages < 0)).double(), ((coef > 1.15) & (advantages > 0)).double()
    assert (loss_stats[5].item(), loss_stats[6].item(), loss_stats[3].item()) == (low.sum(), high.sum(), len(samples))
    assert low.sum() + high.sum() > 0 and (not beta or rollout["kl"] == pytest.approx(kl_sum / kl_tokens, rel=1e-9))


def test_rloo_trains_logs_its_kl_with_the_generation_and_resumes(chat_dir, tmp_path):  # noqa: F811
    # RLOO through the trainer: its KL (in the rewards) logged with the generation, as TRL's RLOOTrainer
    # logs it, the clip ratios each step; a run stopped mid-way through a generation resumes exactly
    trainer.train(config(chat_dir, tmp_path / "base", model=dict(TINY, block_size=32), max_steps=2))
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, grpo_loss_type="rloo", grpo_beta=0.05,
              grpo_iterations=2, init_from_run=str(tmp_path / "base"), max_steps=6, eval_every=0, lr=1e-2)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw, ckpt_every=0))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert [("kl" in r, "reward" in r) for r in log] == [(True, True), (False, False)] * 3
    assert all(r["clip_ratio/region_mean"] is not None for r in log) and all(np.isfinite(r["loss"]) for r in log)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw, ckpt_every=3), stop_at=5)  # (step 3: mid-way)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw, ckpt_every=3), resume=True)
    assert losses(tmp_path / "cut") == [r["loss"] for r in log]
    for bad, message in ((dict(grpo_loss_type="rloo", grpo_importance_sampling="sequence"), "goes without"),
                         (dict(grpo_reward_clip=[0.0, 1.0]), "goes with grpo_loss_type rloo"),
                         (dict(grpo_loss_type="rloo", grpo_kl_bias_correction=False), "goes without"),
                         (dict(grpo_loss_type="rloo", grpo_reward_clip=[1.0, 0.0]), "low <= high")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(grpo_reward=SPEC, **bad).validate()


def test_vespo_logs_its_weights_and_the_options_go_with_their_loss(chat_dir, tmp_path):  # noqa: F811
    # vespo logs TRL's vespo/phi_seq_mean (1.0 on-policy: every ratio 1), no clip ratios; its gamma and
    # sapo's temperatures are refused with another loss type
    kw = dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=4, model=dict(TINY, block_size=32),
              grpo_loss_type="vespo", grpo_iterations=2, max_steps=2, eval_every=0)
    trainer.train(config(chat_dir, tmp_path / "run", **kw))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert log[0]["vespo/phi_seq_mean"] == pytest.approx(1.0) and log[1]["vespo/phi_seq_mean"] > 0
    assert not any(k.startswith("clip_ratio/") for r in log for k in r)
    for bad, message in ((dict(grpo_vespo=[1.0, 2.0, 3.0, 4.0]), "grpo_vespo with vespo"),
                         (dict(grpo_sapo_temperatures=[1.0, 2.0]), "goes with grpo_loss_type sapo"),
                         (dict(grpo_loss_type="sapo", grpo_sapo_temperatures=[0.0, 1.0]), "2 finite numbers above 0"),
                         (dict(grpo_loss_type="vespo", grpo_importance_sampling="sequence"), "goes with")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(grpo_reward=SPEC, **bad).validate()


def test_rloo_eval_logs_frac_reward_zero_std_and_kl_as_training(chat_dir, tmp_path):  # noqa: F811
    # TRL's RLOOTrainer scores its eval samples as its training ones: eval_frac_reward_zero_std of the
    # clipped, KL-penalized rewards, and eval_kl with beta (the val metrics had taken the raw rewards'
    # std and logged no kl: 0.61 where every reward is clamped to 0 and training logs 1.0)
    trainer.train(config(chat_dir, tmp_path / "base", model=dict(TINY, block_size=32), max_steps=1))
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, grpo_loss_type="rloo", max_steps=1,
              init_from_run=str(tmp_path / "base"), eval_every=1, eval_batches=2, lr=1e-2)
    trainer.train(config(chat_dir, tmp_path / "clip", **kw, grpo_reward_clip=[0.0, 0.0]))
    record = json.loads((tmp_path / "clip/log.jsonl").read_text().splitlines()[-1])
    assert record["frac_reward_zero_std"] == record["val_frac_reward_zero_std"] == 1.0 and "val_kl" not in record
    trainer.train(config(chat_dir, tmp_path / "beta", **kw, grpo_beta=0.5))
    record = json.loads((tmp_path / "beta/log.jsonl").read_text().splitlines()[-1])
    assert record["val_kl"] != 0.0 and record["val_frac_reward_zero_std"] == 0.0  # (the policy moved: penalties apart)


def test_grpo_samples_take_top_k_top_p_min_p_and_repetition_penalty(chat_dir):  # noqa: F811
    # TRL's top_k, top_p, min_p and repetition_penalty (its generation config's): the samples
    # generate_batch draws with them from the same generator; top_k 1, a top_p below any token's
    # probability or min_p 1: each prompt's G samples are its greedy continuation (0, 1, 0 and 1, the
    # defaults: no filter)
    model = tiny()
    batch = data.PackedLoader(chat_dir / "train.bin", 3, 32, seed=0).next_batch()
    prompts = [p for p in trainer.last_reply_prompts(batch, 32) for _ in range(4)]
    greedy = model.generate_batch(prompts, 5, 0.0)
    for top_k, top_p, min_p, penalty, want in ((1, 1.0, 0.0, 1.0, greedy), (0, 1e-6, 0.0, 1.0, greedy),
                                               (0, 1.0, 1.0, 1.0, greedy), (5, 0.9, 0.0, 1.0, None),
                                               (0, 1.0, 0.0, 1.0, None), (0, 1.0, 0.2, 1.0, None),
                                               (0, 1.0, 0.0, 1.5, None), (1, 1.0, 0.0, 20.0, "penalized")):
        cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=5, grpo_top_k=top_k,
                          grpo_top_p=top_p, grpo_min_p=min_p, grpo_repetition_penalty=penalty)
        reward = trainer.load_reward(cfg, model, "fp32", torch.device("cpu"))
        rollout = trainer.grpo_rollout(model, batch, cfg, reward, torch.Generator().manual_seed(1))
        drawn = model.generate_batch(prompts, 5, 1.0, top_k or None, top_p, generator=torch.Generator().manual_seed(1),
                                     min_p=min_p, repetition_penalty=penalty)
        if want == "penalized":  # top_k 1 with the penalty: greedy over the penalized logits (20: the untrained
            # tied model's logit of the token it has just read dwarfs the others)
            want = model.generate_batch(prompts, 5, 0.0, repetition_penalty=penalty)
            assert want != greedy
        assert rollout["completion_ids"] == (want or drawn)
        assert want is not None or drawn != greedy
    for bad, message in ((dict(grpo_top_p=0.0), "grpo_top_p must be in"), (dict(grpo_top_k=-1), "grpo_top_k >= 0"),
                         (dict(grpo_min_p=1.5), "grpo_min_p must be in"),
                         (dict(grpo_repetition_penalty=0.0), "grpo_repetition_penalty a finite"),
                         (dict(grpo_delta=0.9), "grpo_delta must be 0"),
                         (dict(grpo_delta=1.5, grpo_loss_type="sapo"), "not cispo, sapo or vespo")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(grpo_reward=SPEC, **bad).validate()


@pytest.mark.parametrize("loss_type,scale,beta,iterations,level,masked,delta,rho", [
    ("grpo", "group", 0.0, 1, "token", False, 0.0, 1.0), ("grpo", "group", 0.3, 1, "token", False, 0.0, 1.0),
    ("dapo", "group", 0.0, 1, "token", False, 0.0, 1.0), ("dapo", "batch", 0.3, 2, "token", True, 0.0, 1.0),
    ("bnpo", "none", 0.0, 2, "token", False, 0.0, 1.0), ("dr_grpo", "group", 0.3, 2, "token", False, 0.0, 1.0),
    ("grpo", "none", 0.0, 2, "sequence", False, 0.0, 1.0), ("dapo", "group", 0.3, 2, "sequence", True, 0.0, 1.0),
    ("cispo", "group", 0.3, 2, "token", False, 0.0, 1.0), ("sapo", "group", 0.0, 2, "token", True, 0.0, 1.0),
    ("dapo", "group", 0.3, 2, "token", False, 1.16, 1.0), ("grpo", "none", 0.0, 2, "token", False, 1.1, 1.0),
    ("dapo", "group", 0.3, 2, "token", True, 0.0, 0.2), ("grpo", "none", 0.0, 1, "sequence", False, 0.0, 0.0),
    ("luspo", "group", 0.3, 2, "sequence", True, 0.0, 1.0), ("dapo", "group", 0.3, 2, "token", True, "opsm", 0.5),
    ("vespo", "group", 0.3, 2, "token", True, 0.0, 1.0), ("vespo", "none", 0.0, 2, "token", False, "gamma", 1.0),
    ("sapo", "group", 0.0, 2, "token", False, "temperatures", 1.0)])
def test_grpo_loss_and_gradients_are_the_formula(chat_dir, loss_type, scale, beta, iterations, level, masked,  # noqa: F811
                                                 delta, rho):
    opsm = 0.05 if delta == "opsm" else 0.0  # (TRL's off_policy_mask_threshold: with the entropy mask here)
    gamma = [1.5, 2.0, 2.5, 1.0] if delta == "gamma" else [2.0, 3.0, 3.0, 2.0]  # (TRL's vespo_k_pos, ...)
    temperatures = [0.7, 1.3] if delta == "temperatures" else [1.0, 1.05]  # (TRL's sapo_temperature_pos, _neg)
    delta = delta if isinstance(delta, float) else 0.0
    # fp64: each prompt's G samples (the same generator; lengths differ: samples stop at ids < 12),
    # rewards, advantages (r - group mean) / (group std, batch std or 1) and, per sampled token,
    # -min(ratio A, clip(ratio) A) + beta k3-KL against a reference model, ratio = p / p_old (p_old
    # perturbed away from p where there are several iterations: some ratios clipped), summed and
    # divided as loss_type says; level sequence: each sample's ratio exp(mean log-ratio) (GSPO);
    # masked: samples without a stop token (cut at 5) rewarded but not trained on; delta (TRL's,
    # INTELLECT-2's two-sided clip): the first ratio capped at it (for A < 0 the loss's only bound;
    # below 1 + eps_high, no token counts as clipped high), not the KL's; rho (TRL's
    # top_entropy_quantile): the policy term on the trained tokens whose entropy is at least the
    # (1 - rho)-quantile of all of them (the KL's on all). Loss and gradients = that with each sample
    # computed alone.
    model, ref_model = tiny().double(), tiny(dim=96, n_heads=3, n_kv_heads=1).double()
    batch = data.PackedLoader(chat_dir / "train.bin", 3, 32, seed=0).next_batch()
    stops = list(range(12))
    cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=5, grpo_beta=beta, sample_stop_tokens=stops,
                      grpo_loss_type=loss_type, grpo_scale_rewards=scale, grpo_iterations=iterations, grpo_epsilon=0.1,
                      grpo_epsilon_high=0.15, grpo_importance_sampling=level, grpo_mask_truncated=masked,
                      grpo_delta=delta, grpo_top_entropy_quantile=rho, grpo_off_policy_mask=opsm,
                      **({"grpo_vespo": gamma} if loss_type == "vespo" else {}),
                      **({"grpo_sapo_temperatures": temperatures} if loss_type == "sapo" else {}))
    reward = trainer.load_reward(cfg, model, "fp32", torch.device("cpu"))
    reference = torch.no_grad()(lambda x, y, cu: ref_model(x, y, cu, per_token=True)[1])
    rollout = trainer.grpo_rollout(model, batch, cfg, reward, torch.Generator().manual_seed(1))
    trainer.grpo_prepare([rollout], cfg, trainer.DistInfo(), model, reference if beta else None)
    x, y, cu, at = rollout["packed"]
    if iterations > 1:  # as if the policy had moved since it sampled
        g = torch.Generator().manual_seed(2)  # per token, and per sample (GSPO's ratio is a sample's mean)
        shift = torch.randn(len(cu) - 1, generator=g, dtype=torch.float64)[
            torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())].view_as(y)
        rollout["old"] = rollout["old"] + (torch.randn(y.shape, generator=g, dtype=torch.float64) + shift) * 0.2 * (y != -1)
        if delta:  # (the policy's ratios mostly up: some above delta where A < 0, where the cap binds)
            rollout["old"] = rollout["old"] - 0.3 * (y != -1)
    loss, loss_stats = trainer.grpo_loss(model, rollout, cfg)
    packed_entropies = model.token_stats_rows[..., 0].detach().reshape(-1)  # (the pass's own, for rho's ties)
    kl_sum, kl_tokens, clipped_tokens, trained_tokens, entropy_sum, low_tokens, high_tokens, low_min, high_max = loss_stats
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    prompts = [p for p in trainer.last_reply_prompts(batch, 32) for _ in range(4)]
    samples = trainer.sample_replies(model, prompts, 5, 1.0, stops, torch.Generator().manual_seed(1))
    assert len(set(map(len, samples))) > 1 and len(prompts) % 4 == 0
    # (as the trainer has them: a reward function's numbers in fp32, load_reward)
    rewards = torch.tensor(sevens(samples), dtype=torch.float32).double().view(-1, 4)
    centered = rewards - rewards.mean(1, keepdim=True)
    advantages = (centered / {"group": rewards.std(1, keepdim=True) + 1e-4, "batch": rewards.std() + 1e-4,
                              "none": 1.0}[scale]).view(-1)
    old_flat = rollout["old"].view(-1) if iterations > 1 else None
    terms, kls, clipped, entropies = [], [], 0, []
    lows, highs = [], []  # (TRL's clip_ratio/low_*, high_*: each sample's clipped share, or 0/1 for its ratio)
    cap_binds = False
    policy_terms, kl_terms, token_entropies = [], [], []
    opsm_dropped, phis = 0, []
    for i, (prompt, sample, a) in enumerate(zip(prompts, samples, advantages)):
        ids = torch.tensor(prompt + sample)

        def logps(m):
            return torch.log_softmax(m(ids[None])[0][0], -1)[torch.arange(len(ids) - 1), ids[1:]][len(prompt) - 1:]

        logp = logps(model)
        start = int(cu[at[i]]) + len(prompt) - 1
        old = old_flat[start:start + len(sample)] if old_flat is not None else logp.detach()
        ratio = torch.exp(logp - old) if level == "token" else torch.exp((logp - old).mean()).expand(len(sample))
        if masked and sample[-1] not in stops:  # (its advantage counted in its group, no loss)
            phis.append(torch.ones((), dtype=torch.float64))  # (vespo's weight of a sample without tokens: TRL's 1)
            continue
        with torch.no_grad():  # (TRL's entropy: of the policy's next-token distribution at each trained token)
            lp = torch.log_softmax(model(ids[None])[0][0], -1)[len(prompt) - 1:len(ids) - 1]
            token_entropies.append(-(lp.exp() * lp).sum(-1))
            entropies.append(token_entropies[-1].sum())
            # (a group's samples share their first token's entropy: ties that rounding breaks either way in
            # the packed pass, so the quantile's mask is taken of the pass's own values, these alike)
            torch.testing.assert_close(packed_entropies[start:start + len(sample)], token_entropies[-1])
            token_entropies[-1] = packed_entropies[start:start + len(sample)]
        if loss_type == "cispo":
            term = -torch.clamp(ratio, max=0.15).detach() * a * logp
        elif loss_type == "sapo":
            tau = temperatures[0] if a > 0 else temperatures[1]
            term = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
        elif loss_type == "vespo":  # (TRL's get_gamma_weights, then -phi A log p)
            log_w = torch.clamp((logp - old).detach().clamp(-20, 20).sum(), math.log(1e-8), 20.0)
            k, lam = gamma[:2] if a >= 0 else gamma[2:]
            phis.append(torch.exp(lam + k * log_w - lam * torch.exp(log_w)))
            term = -phis[-1] * a * logp
        else:
            capped = torch.clamp(ratio, max=delta) if delta else ratio
            cap_binds = cap_binds or bool(delta and ((ratio > delta) & (a < 0)).any())
            term = -torch.min(capped * a, torch.clamp(ratio, 0.9, 1.15) * a)
            uncapped_ratio, ratio = ratio, capped  # (the clip counts' ratio; the KL's below is the uncapped one)
        if loss_type == "cispo":  # (TRL's cispo_clip_ratio: the ratio above epsilon_high, A > 0)
            clipped_here = int(((ratio > 0.15) & (a > 0)).sum())
        else:
            clipped_here = int((((ratio < 0.9) & (a < 0)) | ((ratio > 1.15) & (a > 0))).sum())
        clipped += clipped_here if level == "token" else int(clipped_here > 0)  # (TRL: samples in sequence mode)
        low, high = ((ratio < 0.9) & (a < 0)).double(), ((ratio > (0.15 if loss_type == "cispo" else 1.15)) & (a > 0)).double()
        if loss_type == "cispo":
            low = low * 0
        lows.append(low.mean().item() if level == "token" else float(low.max()))
        highs.append(high.mean().item() if level == "token" else float(high.max()))
        with torch.no_grad():
            d = logps(ref_model) - logp
        d = d.detach() + logp.detach() - logp  # (d = ref - log p, its gradient -grad log p)
        kl = torch.exp(d) - d - 1
        if loss_type not in ("cispo", "sapo", "vespo"):
            ratio = uncapped_ratio
        if opsm and a < 0 and (old - logp.detach()).mean() > opsm:  # (off-policy sequence mask: dropped)
            term, opsm_dropped = term * 0, opsm_dropped + 1
        policy_terms.append(term)
        kl_terms.append(beta * kl * ratio)  # (TRL's use_bias_correction_kl, its default: times the ratio)
        kls.append((kl * ratio).sum())  # (TRL logs the KL as it trains it: times the ratio)
    threshold = torch.quantile(torch.cat(token_entropies), 1 - rho) if rho < 1 else -math.inf
    kept = [e >= threshold for e in token_entropies]
    terms = [term * k + kl for term, kl, k in zip(policy_terms, kl_terms, kept)]
    assert rho == 1 or 0 < sum(k.sum() for k in kept) < sum(map(len, kept))  # (some tokens' policy term off)
    n, tokens, sampled = len(samples), sum(len(t) for t in terms), sum(map(len, samples))
    assert not masked or 0 < len(terms) < n
    # (grpo: the mean over all samples, masked ones adding 0)
    want = {"grpo": torch.stack([t.mean() for t in terms]).sum() / n, "bnpo": torch.cat(terms).sum() / tokens,
            "sapo": torch.stack([t.mean() for t in terms]).sum() / n, "cispo": torch.cat(terms).sum() / tokens,
            "luspo": torch.stack([t.sum() for t in terms]).sum() / n,  # (TRL's: each sample's sum, their mean)
            "dapo": torch.cat(terms).sum() / tokens,  # (TRL 1.16's count: the trained tokens, not masked ones)
            "vespo": torch.cat(terms).sum() / tokens,
            "dr_grpo": torch.cat(terms).sum() / (n * 5)}[loss_type]
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-12)
    assert (clipped > 0) == (iterations > 1 or loss_type == "cispo")  # (the perturbation clips some)
    counted = tokens if level == "token" else n  # (TRL 1.16's clip_ratio in sequence mode: over the samples)
    if loss_type == "vespo":  # (its weights' sum over the samples, TRL's vespo/phi_seq_mean's, in the clip column)
        assert clipped_tokens.item() == pytest.approx(torch.stack(phis).sum().item(), rel=1e-12)
        clipped_tokens, trained_tokens = clipped, n
        assert 0 < min(phis) < max(phis) and min(phis) < 0.99
    assert (clipped_tokens, trained_tokens, kl_tokens) == (clipped, counted if loss_type != "vespo" else n, tokens)
    if level == "token":  # (the tokens clipped low and high; the samples, of sequence ratios)
        weights = [len(t) for t in terms]
        assert (low_tokens, high_tokens) == pytest.approx((np.dot(lows, weights), np.dot(highs, weights)), abs=1e-9)
    else:
        assert (low_tokens, high_tokens) == (sum(lows), sum(highs))
    assert (low_min, high_max) == pytest.approx((min(lows), max(highs)), abs=1e-12)
    assert low_tokens + high_tokens == clipped_tokens and (iterations == 1 or max(highs) + max(lows) > 0)
    assert kl_sum.item() == pytest.approx(beta and torch.stack(kls).sum().item(), abs=1e-9)
    assert not opsm or 0 < opsm_dropped < sum(a < 0 for a in advantages)
    if delta:  # (the cap binds: a ratio above it with A < 0; at 1.1, under 1 + eps_high, no high clip)
        assert (max(highs) == 0) == (delta < 1.15) and cap_binds
    cut = [len(p) + len(s) for p, s in zip(prompts, samples)]  # (MFU's count: the sequences computed)
    assert rollout["lengths"] == cut and rollout["targets"] == tokens and sampled >= tokens
    flat = rewards.view(-1)
    assert entropy_sum.item() == pytest.approx(torch.stack(entropies).sum().item(), rel=1e-9)
    means = trainer.grpo_stat_means(torch.cat([rollout["stats"], loss_stats]), 1, scale == "batch")
    # (TRL 1.16's reward_std: the std of the step's rewards; its kl: a mean per trained token; its
    # frac_reward_zero_std: the samples whose group's std is 0, batch scaling's the step's std;
    # completions/clipped_ratio: the samples without a stop token)
    zero_std = float(flat.std() == 0) if scale == "batch" else (rewards.std(1) == 0).double().mean().item()
    assert 0 < (rewards.std(1) == 0).double().mean().item() < 1  # (some groups' rewards all equal, not all)
    unended = np.mean([not (s and s[-1] in stops) for s in samples])
    assert 0 < unended < 1
    np.testing.assert_allclose(means, [flat.mean().item(), flat.std().item(), np.mean([len(s) for s in samples]),
                                       beta and torch.stack(kls).sum().item() / tokens,
                                       torch.stack(phis).mean().item() if loss_type == "vespo" else clipped / counted,
                                       zero_std,
                                       unended, entropy_sum.item() / tokens, flat.mean().item()],
                               rtol=1e-6, atol=1e-12)


def test_grpo_rewards_are_summed_by_weight(chat_dir):  # noqa: F811
    # Two rewards (comma-separated), weighted: each sample's reward is their weighted sum with an
    # unscored (None) one left out (TRL's nansum); the stats carry each reward's mean over the
    # samples it scored. Each conversation's row reaches the functions as that of its prompt.
    model = tiny().double()
    loader = data.PackedLoader(chat_dir / "train.bin", 3, 24, seed=0)
    batch = loader.next_batch()
    cfg = TrainConfig(grpo_reward=f"{SPEC},test_grpo:short_or_none", grpo_reward_weights=[2.0, 0.5],
                      grpo_generations=4, grpo_max_new_tokens=5)
    cfg.validate()
    seen = []
    record = lambda prompt_ids, completion_ids, packed, rows, step=None: (seen.extend(rows), torch.zeros(len(rows)))[1]  # noqa: E731
    fns = trainer.load_reward(cfg, model, "fp32", torch.device("cpu")) + [record]
    cfg.grpo_reward_weights = [2.0, 0.5, 1.0]
    rows = [{"prompt": f"conversation {d}", "doc": d} for d in loader.docs]
    _, stats, _, _ = trainer.grpo_batch_loss(model, model, batch, cfg, fns, torch.Generator().manual_seed(1), rows=rows)
    segments = []
    prompts = [p for p in trainer.last_reply_prompts(batch, 24, segments) for _ in range(4)]
    samples = trainer.sample_replies(model, prompts, 5, 1.0, [], torch.Generator().manual_seed(1))
    a = np.array(sevens(samples), dtype=float)
    b = np.array([np.nan if v is None else v for v in short_or_none(samples)], dtype=float)
    assert np.isnan(b).any() and not np.isnan(b).all()
    total = 2 * a + 0.5 * np.nan_to_num(b)
    grouped = total.reshape(-1, 4)
    assert 0 < stats[7] < math.log(model.config.vocab_size)  # (the entropy)
    np.testing.assert_allclose(stats[:5] + stats[8:], [total.mean(), total.std(ddof=1),
                                                        np.mean([len(s) for s in samples]), 0.0, 0.0, a.mean(),
                                                        np.nanmean(b), 0.0], rtol=1e-6)
    # (no stop tokens: every sample ends unfinished; groups of equal rewards' share)
    assert stats[5:7] == pytest.approx([(grouped.std(1) == 0).mean(), 1.0])
    assert [r["doc"] for r in seen] == [loader.docs[s] for s in segments for _ in range(4)]
    assert trainer.reward_names(cfg.grpo_reward) == ["sevens", "short_or_none"]
    # the log's means are of sums and counts over micro-batches and ranks: a reward no sample got is None
    # (scored rewards' sum, samples, scored rewards' squares, scored samples, sampled tokens, samples of
    # groups whose std is 0, samples without a stop token, each reward's sums, counts, then
    # grpo_loss's KL sum, KL tokens, clipped tokens, trained tokens, entropy sum)
    sums = torch.tensor([3.0, 4, 5.0, 2, 8, 2, 1, 2.0, 0.0, 4, 0, 0.5, 4, 1, 10, 6.0], dtype=torch.float64)
    assert trainer.grpo_stat_means(sums, 2) == pytest.approx([1.5, 0.5 ** 0.5, 2.0, 0.125, 0.1, 0.5, 0.25, 1.5, 0.5,
                                                              None])
    assert trainer.grpo_stat_means(sums, 2, batch_scaled=True)[5] == 0.0  # (the step's std is not 0)
    with pytest.raises(ValueError, match="a finite number for each of the 2"):
        TrainConfig(grpo_reward=cfg.grpo_reward, grpo_reward_weights=[1.0]).validate()


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_grpo_advantages_leave_out_unscored_samples(scale):
    # A sample no reward function scored (each returned None) is NaN: left out of its group's mean
    # and std (and the batch's), its advantage 0, as TRL's; nansum had made it a reward of 0.
    cfg = TrainConfig(grpo_generations=4, grpo_scale_rewards=scale)
    rewards = torch.tensor([1.0, math.nan, 0.0, 1.0, 2.0, 2.0, 3.0, math.nan], dtype=torch.float64)
    rollout = {"rewards": rewards, "targets": 9, "packed": (None, None, None, None)}
    trainer.grpo_prepare([rollout], cfg, trainer.DistInfo())
    scored = rewards.view(-1, 4)
    mean = scored.nanmean(1, keepdim=True)
    std = {"group": torch.tensor([[3 ** -0.5], [3 ** -0.5]], dtype=torch.float64),
           "batch": rewards[~rewards.isnan()].std()}[scale]
    want = ((scored - mean) / (std + 1e-4)).nan_to_num(0.0).view(-1)
    torch.testing.assert_close(rollout["advantages"], want, rtol=1e-12, atol=0)
    assert rollout["advantages"][1] == 0 and rollout["advantages"][7] == 0 and rollout["tokens"] == 9
    if scale == "group":  # TRL's numbers for the group [1, None, 0, 1]
        assert rollout["advantages"][:4].tolist() == pytest.approx([0.5773, 0.0, -1.1545, 0.5773], abs=1e-4)


def test_gdpo_advantages_are_trls_normalize_then_sum():
    # TRL 1.16's multi_objective_aggregation normalize_then_sum (GDPO), written as its trainer does
    # over the generation's rewards_per_func (its nanstd): each function's scores normalized in their
    # group, weighed and summed (NaN where no function scored), then normalized by the generation's
    # mean and std, NaN to 0. Two micro-batches; a function scoring one sample of a group, a sample no
    # function scored, a flat group.
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    nan = math.nan
    cfg = TrainConfig(grpo_reward="a,b,c", grpo_generations=4, grpo_reward_weights=[1.0, 0.5, 2.0],
                      grpo_multi_objective_aggregation="normalize_then_sum")
    g = torch.Generator().manual_seed(0)
    each = torch.rand(16, 3, generator=g, dtype=torch.float64)
    each[1, 0] = each[2, 0] = each[3, 0] = nan  # function a scored one sample of group 0
    each[5] = nan  # no function scored sample 5
    each[8:12] = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)  # group 2: flat for every function
    each[13, 1] = nan
    rollouts = [{"each": part, "rewards": (part * torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)).nansum(1),
                 "targets": 5, "packed": (None, None, None, None)} for part in (each[:8], each[8:])]
    trainer.grpo_prepare(rollouts, cfg, trainer.DistInfo())
    grouped = each.view(-1, 4, 3)  # TRL's lines
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, 3)
    rewards = (reward_k * torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)).nansum(dim=1)
    rewards[torch.isnan(each).all(dim=1)] = nan
    want = ((rewards - torch.nanmean(rewards)) / (nanstd(rewards) + 1e-4)).nan_to_num(0.0)
    got = torch.cat([r["advantages"] for r in rollouts])
    # (TRL's nanstd rounds its Bessel factor count / (count - 1) to fp32: 4/3 is 3e-8 off)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    assert got[5] == 0 and got[8:12].abs().max() < 1  # (the flat group: the generation's mean, off 0)
    trainer.grpo_prepare(rollouts, replace(cfg, grpo_multi_objective_aggregation="sum_then_normalize"),
                         trainer.DistInfo())
    assert not torch.allclose(got, torch.cat([r["advantages"] for r in rollouts]))  # (the default: another thing)
    # frac_reward_zero_std: whether the summed normalized rewards' std is 0 (TRL's), 1 when every group is flat
    flat = [{**r, "each": torch.ones(8, 3, dtype=torch.float64)} for r in rollouts]
    trainer.gdpo_rewards(flat, cfg, trainer.DistInfo())
    assert flat[0]["aggregate_std"] == 0.0
    for bad in (dict(grpo_scale_rewards="batch"), dict(grpo_loss_type="rloo")):
        with pytest.raises(ValueError, match="normalize_then_sum .GDPO."):
            replace(cfg, **bad).validate()


def test_frac_reward_zero_std_with_fewer_than_two_scored_samples_is_trls():
    # TRL's nanstd of fewer than two scored rewards is NaN (not flat: 0.0), a generation of one sample
    # has std 0 (flat: 1.0; eval's with one prompt and num_generations_eval 1): GDPO's and batch
    # scaling's (from the GDPO audit, against TRL 1.16's own lines)
    cfg = TrainConfig(grpo_reward="m:a", grpo_generations=2, grpo_multi_objective_aggregation="normalize_then_sum")
    for each, want in (([[math.nan], [1.0]], 0.0), ([[math.nan], [math.nan]], 0.0)):
        each = torch.tensor(each, dtype=torch.float64)
        stats = torch.zeros(14, dtype=torch.float64)
        stats[1] = len(each)
        rollouts = [{"each": each, "completion_ids": [[5, 2]] * len(each)}]
        trainer.gdpo_rewards(rollouts, cfg, trainer.DistInfo())
        assert trainer.generation_metrics(stats, rollouts, cfg, trainer.DistInfo())["frac_reward_zero_std"] == want
    one = replace(cfg, grpo_generations=1)
    stats = torch.zeros(14, dtype=torch.float64)
    stats[[0, 1, 2, 3]] = torch.tensor([0.3, 1.0, 0.09, 1.0], dtype=torch.float64)  # (one scored reward of 0.3)
    rollouts = [{"each": torch.tensor([[0.3]], dtype=torch.float64), "completion_ids": [[5, 2]]}]
    trainer.gdpo_rewards(rollouts, one, trainer.DistInfo())
    assert trainer.generation_metrics(stats, rollouts, one, trainer.DistInfo())["frac_reward_zero_std"] == 1.0
    batch = replace(one, grpo_multi_objective_aggregation="sum_then_normalize", grpo_scale_rewards="batch")
    assert trainer.generation_metrics(stats, rollouts, batch, trainer.DistInfo())["frac_reward_zero_std"] == 1.0


def test_gdpo_logs_and_evaluates(chat_dir, tmp_path):  # noqa: F811
    # A run with two rewards (one leaving samples unscored) under normalize_then_sum trains and logs
    # frac_reward_zero_std of the summed normalized rewards, in training and eval alike
    trainer.train(config(chat_dir, tmp_path / "base", model=dict(TINY, block_size=32), max_steps=1))
    trainer.train(config(chat_dir, tmp_path / "run", grpo_reward=f"{SPEC},test_grpo:short_or_none", grpo_generations=4,
                         grpo_max_new_tokens=6, grpo_multi_objective_aggregation="normalize_then_sum", max_steps=2,
                         init_from_run=str(tmp_path / "base"), eval_every=1, eval_batches=1))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert all(r["frac_reward_zero_std"] in (0.0, 1.0) and r["val_frac_reward_zero_std"] in (0.0, 1.0) for r in log)
    assert all(math.isfinite(r["loss"]) for r in log)


def test_grpo_eval_samples_its_own_number_of_generations(chat_dir, tmp_path, monkeypatch):  # noqa: F811
    # TRL's num_generations_eval: eval samples G_eval of each prompt, its groups' stats of that size;
    # one a prompt (RLOO's eval): every group flat, frac_reward_zero_std 1 (TRL's std 0), advantages 0
    seen, rollout = [], trainer.grpo_rollout

    def spy(policy, batch, cfg, *a, **kw):
        out = rollout(policy, batch, cfg, *a, **kw)
        seen.append((cfg.grpo_generations, len(out["completion_ids"])))
        return out

    monkeypatch.setattr(trainer, "grpo_rollout", spy)
    trainer.train(config(chat_dir, tmp_path / "base", model=dict(TINY, block_size=32), max_steps=1))
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=4, max_steps=1, eval_every=1, eval_batches=1,
              init_from_run=str(tmp_path / "base"))
    trainer.train(config(chat_dir, tmp_path / "two", **kw, grpo_generations_eval=2))
    (train_g, train_n), (eval_g, eval_n) = seen
    assert (train_g, eval_g) == (4, 2) and train_n % 4 == 0 and eval_n % 2 == 0 and eval_n > 0
    trainer.train(config(chat_dir, tmp_path / "one", **kw, grpo_generations_eval=1, grpo_loss_type="rloo"))
    record = json.loads((tmp_path / "one/log.jsonl").read_text().splitlines()[-1])
    assert seen[-1][0] == 1 and record["val_frac_reward_zero_std"] == 1.0
    with pytest.raises(ValueError, match="grpo_generations_eval must be >= 1"):
        TrainConfig(grpo_reward=SPEC, grpo_generations_eval=-1).validate()


def test_grpo_leaves_out_conversations_cut_from_their_rows(chat_dir):  # noqa: F811
    # A conversation longer than the row is cut: its last reply in the row is not the one its row
    # (prompt, answer columns) speaks of, so with rows it gets no samples (grpo_rows: None); whole
    # ones do, each given its own row. Without rows every conversation is sampled.
    model = tiny()
    loader = data.PackedLoader(chat_dir / "train.bin", 4, 10, seed=0)
    batch = loader.next_batch()
    full = np.diff(loader.offsets)
    rows = [{"prompt": "p", "doc": d, "length": int(full[d])} for d in range(len(full))]
    per_segment = trainer.grpo_rows(rows, loader.docs, batch[2], loader.offsets)
    cu = batch[2].tolist()
    assert [r is None for r in per_segment] == [d < 0 or cu[i + 1] - cu[i] < full[d] for i, d in enumerate(loader.docs)]
    assert any(r is None for r, d in zip(per_segment, loader.docs) if d >= 0)  # (some are cut at 10 tokens)
    seen = []
    record = lambda p, c, packed, rows, step=None: (seen.extend(rows), torch.zeros(len(c)))[1]  # noqa: E731
    cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=2)
    trainer.grpo_rollout(model, batch, cfg, [record], torch.Generator().manual_seed(0), per_segment)
    assert seen and all(r["length"] <= 10 for r in seen)
    assert sorted({r["doc"] for r in seen}) == sorted(r["doc"] for r in per_segment if r is not None)
    assert trainer.grpo_rows(None, loader.docs, batch[2], loader.offsets) is None


def test_reward_functions_are_called_as_trl_calls_them():
    # By keyword: prompts (the rows' own, text or messages), completions (decoded without the stop
    # token; an assistant message where the prompt is messages), completion_ids and the rows' other
    # columns as lists; None gives NaN; a wrong count is an error naming the function. Without a
    # tokenizer the prompts and completions are the token ids.
    from pyllm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["the answer is 42. what is six times seven?"] * 4, 270, special_tokens=["<|end|>"],
                               show_progress=False)
    end = tokenizer.special_tokens["<|end|>"]
    calls = []

    def judge(prompts, completions, completion_ids, answer, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer, **kwargs))
        return [None if i == 1 else float(answer[i] in (c if isinstance(c, str) else c[0]["content"]))
                for i, c in enumerate(completions)]

    import sys
    import types

    sys.modules["grpo_judge"] = types.SimpleNamespace(judge=judge, wrong=lambda completions, **kw: [1.0],
                                                   echo=lambda **kw: (calls.append(kw), [0.0])[1])
    cfg = TrainConfig(grpo_reward="grpo_judge:judge", sample_stop_tokens=[end])
    (reward,) = trainer.load_reward(cfg, None, "fp32", torch.device("cpu"), tokenizer)
    messages = [{"role": "user", "content": "what is six times seven?"}]
    rows = [{"prompt": "what is six times seven?", "answer": "42", "level": 1},
            {"prompt": "what is six times seven?", "answer": "42", "level": 1},
            {"prompt": messages, "answer": "41", "level": 2}]
    completion_ids = [tokenizer.encode("the answer is 42.") + [end], tokenizer.encode("42"), tokenizer.encode("41")]
    got = reward([[1, 2]] * 3, completion_ids, None, rows)
    assert got[0].item() == 1.0 and np.isnan(got[1].item()) and got[2].item() == 1.0
    call = calls[-1]
    assert call["prompts"] == [rows[0]["prompt"], rows[1]["prompt"], messages] and call["answer"] == ["42", "42", "41"]
    assert call["completions"] == ["the answer is 42.", "42", [{"role": "assistant", "content": "41"}]]
    assert call["completion_ids"] == completion_ids and call["level"] == [1, 1, 2]
    (raw,) = trainer.load_reward(TrainConfig(grpo_reward="grpo_judge:echo"), None, "fp32", torch.device("cpu"))
    assert raw([[1, 2]], [[5, 6]], None, None).tolist() == [0.0]  # no tokenizer, no rows: the ids
    state = calls[-1].pop("trainer_state")
    assert callable(calls[-1].pop("log_metric")) and callable(calls[-1].pop("log_extra"))
    assert calls[-1] == {"prompts": [[1, 2]], "completions": [[5, 6]], "completion_ids": [[5, 6]]}
    assert (state.global_step, state.max_steps) == (None, 600)  # (TRL's TrainerState's step; the trainer passes it)
    cfg = TrainConfig(grpo_reward="grpo_judge:wrong")
    (wrong,) = trainer.load_reward(cfg, None, "fp32", torch.device("cpu"), tokenizer)
    with pytest.raises(ValueError, match="grpo_judge:wrong: gave 1 rewards for 2 completions"):
        wrong([[1], [2]], [[3], [4]], None, None)


def test_reward_functions_see_completions_as_trl_decodes_them_and_log_as_trls(tmp_path, monkeypatch):
    # completions decoded as TRL's batch_decode(skip_special_tokens=True): special tokens left out,
    # an added token matched as text ("special": false, Qwen's <think>) kept (a <pad> or <s> a sample
    # held had reached a format reward's regex); log_metric (a step's mean, TRL's) and log_extra (a
    # column of the completions log) given, as TRL 1.16 gives them (a function naming them had
    # raised TypeError). From the GRPO audit.
    tk = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from pyllm.tokenizer import Tokenizer

    hf = tk.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(["the answer is 42. what is six times seven?"] * 4, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_tokens(["<think>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_hf(tmp_path / "tokenizer.json")
    seen = []

    def texts(completions, log_metric, log_extra, **kwargs):
        seen.append(completions)
        log_metric("format", 0.25)
        log_metric("format", 0.75)
        log_extra("verdict", ["ok"] * len(completions))
        return [0.0] * len(completions)

    import sys
    import types

    monkeypatch.setitem(sys.modules, "grpo_texts", types.SimpleNamespace(texts=texts))
    (reward,) = trainer.load_reward(TrainConfig(grpo_reward="grpo_texts:texts", sample_stop_tokens=[2]), None, "fp32",
                                    torch.device("cpu"), tokenizer)
    ids = [3, tokenizer.special_tokens["<think>"], *tokenizer.encode("42"), 1, 2]  # <pad> <think> 42 <s> </s>
    reward([[5]], [ids], None, None)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert seen[-1] == theirs.batch_decode([ids], skip_special_tokens=True) == ["<think>42"]
    assert reward.extra == {"verdict": ["ok"]}
    assert trainer.reward_metric_means([reward], trainer.DistInfo()) == {"format": 0.5}
    assert trainer.reward_metric_means([reward], trainer.DistInfo()) == {}  # (emptied: each step its own)


def test_reward_functions_from_a_file_get_the_step(chat_dir, tmp_path, monkeypatch):  # noqa: F811
    # "path/to/rewards.py:function" loads the file; a module name is looked for in the working
    # directory too; trainer_state.global_step is the step the samples were drawn at.
    (tmp_path / "my_rewards.py").write_text(
        "def by_step(completions, trainer_state, **kwargs):\n"
        "    return [float(trainer_state.global_step)] * len(completions)\n")
    kw = dict(grpo_generations=2, grpo_max_new_tokens=2, model=dict(TINY, block_size=32), max_steps=3, eval_every=0)
    trainer.train(config(chat_dir, tmp_path / "file", grpo_reward=f"{tmp_path / 'my_rewards.py'}:by_step", **kw))
    assert [json.loads(line)["reward"] for line in (tmp_path / "file/log.jsonl").read_text().splitlines()] == [0, 1, 2]
    monkeypatch.chdir(tmp_path)
    trainer.train(config(chat_dir, tmp_path / "name", grpo_reward="my_rewards:by_step", **kw))
    with pytest.raises(ValueError, match="has no function nothing"):
        trainer.train(config(chat_dir, tmp_path / "bad", grpo_reward="my_rewards:nothing", **kw))


def test_grpo_raises_the_reward_and_resumes_exactly(chat_dir, tmp_path):  # noqa: F811
    # The policy learns to say 7 (the reward's): the logged mean reward rises; resume is exact
    # (the samples seeded by step and micro-step).
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, model=dict(TINY, block_size=32), lr=1e-2)
    trainer.train(config(chat_dir, tmp_path / "rl", max_steps=24, eval_every=24, **kw))
    log = [json.loads(line) for line in (tmp_path / "rl/log.jsonl").read_text().splitlines()]
    assert {"reward", "reward_std", "completions/mean_length", "entropy",
            "completions/max_terminated_length"} <= log[0].keys()
    assert all(r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"] <= 6
               for r in log)
    assert np.mean([r["reward"] for r in log[-5:]]) > np.mean([r["reward"] for r in log[:5]]) + 0.2
    assert log[-1]["val_reward"] > 0.5 and "val_reward" not in log[0]  # (the val prompts' samples, at the eval)
    kw.update(grad_accum=2)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    losses = [[json.loads(line)["reward"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("whole", "cut")]
    assert losses[0] == losses[1]


def test_grpo_iterations_reuse_a_generation_and_resume_mid_way(chat_dir, tmp_path):  # noqa: F811
    # grpo_iterations 3: each generation's samples train 3 steps (the loader moves on every 3rd), the
    # ratio to the sampling policy clipped; a run stopped mid-way through a generation (its step-4
    # checkpoint holds the samples) resumes exactly; so does one stopped at a generation's start.
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, model=dict(TINY, block_size=32), lr=1e-2,
              grpo_iterations=3, grpo_epsilon_high=0.28, grad_accum=2, max_steps=9)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    rewards = [r.get("reward") for r in log]  # (a generation's metrics in the step that samples it alone, TRL's)
    assert rewards[1:3] == rewards[4:6] == rewards[7:9] == [None] * 2 and len({rewards[0], rewards[3], rewards[6]}) == 3
    assert log[0]["clip_ratio/region_mean"] == 0 and max(r["clip_ratio/region_mean"] for r in log) > 0
    # TRL's num_tokens: a generation's tokens counted once, when sampled, not on each of its steps
    generated = [r["tokens"] if r["step"] % 3 == 0 else 0 for r in log]
    assert [r["num_tokens"] for r in log] == list(itertools.accumulate(generated))
    for stop, ckpt_every in ((6, 4), (5, 3)):  # checkpoints at 4 (mid-way) and 3 (a generation's start)
        run = tmp_path / f"cut{stop}"
        trainer.train(config(chat_dir, run, **kw, ckpt_every=ckpt_every), stop_at=stop)
        assert ("grpo_rollouts" in torch.load(run / "checkpoint.pt", weights_only=True)) == (ckpt_every == 4)
        if ckpt_every == 4:  # (the samples of grad_accum micro-batches: resumed with as many)
            with pytest.raises(ValueError, match="with as many \\(--grpo-steps-per-generation, or --grad-accum"):
                trainer.train(config(chat_dir, run, **{**kw, "grad_accum": 1}, ckpt_every=ckpt_every), resume=True)
        trainer.train(config(chat_dir, run, **kw, ckpt_every=ckpt_every), resume=True)
        assert losses(run) == [r["loss"] for r in log]
        resumed = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert [r["num_tokens"] for r in resumed] == [r["num_tokens"] for r in log]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo"])
def test_grpo_steps_per_generation_splits_a_generation_across_steps(chat_dir, tmp_path, loss_type):  # noqa: F811
    # TRL's steps_per_generation: a generation samples that many micro-batches and trains them in
    # turn, grad_accum a step, normalized as the generation's (dapo: its tokens times grad_accum /
    # steps_per_generation). At lr ~0 (every ratio 1) the two steps of a generation of 2 micro-batches
    # at grad_accum 1 are the one step of grad_accum 2 split in two: their mean loss is its loss, the
    # generation's samples, rewards and tokens are the same (sampled and logged once, at its first step).
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, model=dict(TINY, block_size=32), lr=1e-30,
              warmup_steps=0, grpo_loss_type=loss_type, eval_every=0, ckpt_every=0)
    trainer.train(config(chat_dir, tmp_path / "one", **kw, grad_accum=2, max_steps=1))
    trainer.train(config(chat_dir, tmp_path / "split", **kw, grpo_steps_per_generation=2, max_steps=3))
    one, split = ([json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
                  for run in ("one", "split"))
    assert (split[0]["loss"] + split[1]["loss"]) / 2 == pytest.approx(one[0]["loss"], rel=1e-6, abs=1e-9)
    assert split[0]["tokens"] + split[1]["tokens"] == one[0]["tokens"]
    for key in GENERATION_METRICS:
        assert split[0][key] == one[0][key] and key not in split[1] and key in split[2]
    # TRL's num_tokens: the generation's, at the step that samples it
    assert split[0]["num_tokens"] == split[1]["num_tokens"] == one[0]["num_tokens"] < split[2]["num_tokens"]


def test_grpo_steps_per_generation_with_iterations_and_resume(chat_dir, tmp_path):  # noqa: F811
    # 4 micro-batches a generation at grad_accum 2, 2 iterations: steps 0-3 train its halves 0, 1, 0, 1
    # (TRL's order), off-policy from step 1 (the ratio to the samples' policy clipped), steps 4-7 the
    # next generation's; a run stopped mid-way through a generation resumes exactly.
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, model=dict(TINY, block_size=32), lr=1e-2,
              grpo_iterations=2, grpo_steps_per_generation=4, grpo_epsilon_high=0.28, grad_accum=2, max_steps=8,
              eval_every=0)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw, ckpt_every=0))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert [("reward" in r) for r in log] == [True, False, False, False] * 2
    tokens = [r["tokens"] for r in log]
    assert tokens[0:2] == tokens[2:4] and tokens[4:6] == tokens[6:8] and tokens[0:2] != tokens[4:6]
    assert [r["num_tokens"] for r in log] == [sum(tokens[:2])] * 4 + [sum(tokens[:2]) + sum(tokens[4:6])] * 4
    assert log[0]["clip_ratio/region_mean"] == 0 and max(r["clip_ratio/region_mean"] for r in log[1:4]) > 0
    run = tmp_path / "cut"
    trainer.train(config(chat_dir, run, **kw, ckpt_every=3), stop_at=6)  # (step 3's and 6's: mid-way)
    assert len(torch.load(run / "checkpoint.pt", weights_only=True)["grpo_rollouts"][0]) == 4
    with pytest.raises(ValueError, match="with 4 micro-batches each"):
        trainer.train(config(chat_dir, run, **{**kw, "grpo_steps_per_generation": 2}, ckpt_every=3), resume=True)
    trainer.train(config(chat_dir, run, **kw, ckpt_every=3), resume=True)
    assert losses(run) == [r["loss"] for r in log]


def test_grpo_steps_per_generation_resumed_with_another_grad_accum_is_refused(chat_dir, tmp_path):  # noqa: F811
    # A generation of 4 micro-batches at grad_accum 1 checkpointed after its first 3: resumed at
    # grad_accum 2 (steps_per_generation kept), step 3 had trained its micro-batches 2 and 3 (2 twice);
    # at step 2, it had sampled anew (2 and 3 never trained). Refused.
    kw = dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=4, model=dict(TINY, block_size=32),
              grpo_steps_per_generation=4, max_steps=4, eval_every=0, ckpt_every=3)
    trainer.train(config(chat_dir, tmp_path / "run", **kw, grad_accum=1), stop_at=3)
    with pytest.raises(ValueError, match="resume it with --grad-accum 1"):
        trainer.train(config(chat_dir, tmp_path / "run", **kw, grad_accum=2), resume=True)
    trainer.train(config(chat_dir, tmp_path / "run", **kw, grad_accum=1), resume=True)


GENERATION_METRICS = {"reward", "reward_std", "frac_reward_zero_std", "sevens_mean", "completions/mean_length",
                      "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                      "completions/mean_terminated_length", "completions/min_terminated_length",
                      "completions/max_terminated_length"}
LOSS_METRICS = {"entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"}


def test_grpo_logs_a_generations_metrics_once(chat_dir, tmp_path):  # noqa: F811
    # TRL 1.16 logs a generation's metrics (reward, reward_std, frac_reward_zero_std, completions/*, the
    # reward functions' log_metric) once, at the step that samples it: with num_iterations 2 the next
    # step's line holds the loss's metrics alone (entropy, kl, clip_ratio/*: each step's own). They had
    # been logged again on each step that reuses the samples, the same values (a plot's mean over the
    # steps weighed each generation by its steps).
    kw = dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=4, model=dict(TINY, block_size=32),
              grpo_iterations=2, grpo_beta=0.1, lora_rank=2, max_steps=4, eval_every=0)
    trainer.train(config(chat_dir, tmp_path / "run", **kw))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    for r in log:  # (the loss's metrics are each step's own: computed on its pass)
        assert LOSS_METRICS <= r.keys()
        assert (GENERATION_METRICS & r.keys()) == (GENERATION_METRICS if r["step"] % 2 == 0 else set())
    assert all(r[k] is not None for r in log for k in LOSS_METRICS) and len(log) == 4


def test_grpo_logs_trls_names_with_one_reward_and_one_iteration(chat_dir, tmp_path):  # noqa: F811
    # TRL 1.16 logs rewards/<name>/mean and /std for each reward function, one alone too (unweighted:
    # reward is weighted), and clip_ratio/* at num_iterations 1 (0.0: every ratio 1). pyllm had logged
    # rewards/<name> (TRL's old name) with several rewards only, and no clip_ratio/* at one iteration.
    # Its eval logs val_ each of a generation's metrics (val_reward and val_rewards/<name> alone before).
    kw = dict(grpo_reward=SPEC, grpo_reward_weights=[2.0], grpo_generations=4, grpo_max_new_tokens=6,
              model=dict(TINY, block_size=32), max_steps=1, eval_every=1)
    trainer.train(config(chat_dir, tmp_path / "run", **kw))
    r = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[0])
    assert r["reward"] == pytest.approx(2 * r["rewards/sevens/mean"]) and r["rewards/sevens/std"] is not None
    assert r["reward_std"] == pytest.approx(2 * r["rewards/sevens/std"]) and "rewards/sevens" not in r
    assert r["val_reward"] == pytest.approx(2 * r["val_rewards/sevens/mean"])
    # the eval's: each of a generation's metrics (TRL's eval_ ones), not the loss's
    assert {f"val_{k}" for k in GENERATION_METRICS - {"sevens_mean"}} | {"val_rewards/sevens/std"} <= r.keys()
    assert r["val_reward_std"] == pytest.approx(2 * r["val_rewards/sevens/std"]) and "val_kl" not in r
    assert r["val_completions/min_length"] <= r["val_completions/mean_length"] <= r["val_completions/max_length"] <= 6
    assert {k: r[k] for k in r if k.startswith("clip_ratio/")} == dict.fromkeys(
        ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
         "clip_ratio/high_max"], 0.0)


def test_grpo_resumes_a_mid_generation_checkpoint_of_the_old_stats_layout(chat_dir, tmp_path):  # noqa: F811
    # a checkpoint written mid-way through a generation before frac_reward_zero_std and
    # completions/clipped_ratio (2026-12-06) holds each rollout's stats as 5 + 2R sums: the resume
    # had died of a size mismatch (13 vs 11); the two are computed from the saved samples
    kw = dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=4, grpo_iterations=2, eval_every=0,
              warmup_steps=1, ckpt_every=3, max_steps=4)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    trainer.train(config(chat_dir, tmp_path / "rl", **kw), stop_at=3)
    ckpt = torch.load(tmp_path / "rl/checkpoint.pt", weights_only=True)
    for rank in ckpt["grpo_rollouts"]:
        for r in rank:
            r["stats"] = torch.cat([r["stats"][:5], r["stats"][7:]])  # the old layout
    torch.save(ckpt, tmp_path / "rl/checkpoint.pt")
    trainer.train(config(chat_dir, tmp_path / "rl", **kw), resume=True)
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("whole", "rl")]
    assert logs[1] == [{**r, **{k: logs[1][i][k] for k in ("tokens_per_s", "mfu")}} for i, r in enumerate(logs[0])]


def test_grpo_entropy_and_kl_are_the_mean_of_each_micro_steps(chat_dir, tmp_path, monkeypatch):  # noqa: F811
    # TRL's entropy, KL and clip_ratio/*_mean: each micro-step's mean over its trained tokens, then
    # their mean (the pooled ratio weighs micro-steps by their tokens); clip_ratio/low_min and high_max
    # the mean of the micro-steps' extremes; grpo_loss's stats are its micro-batch's sums (KL, tokens,
    # clipped, counted, entropy, clipped low, clipped high) and extremes
    calls = []
    real = trainer.grpo_loss
    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out[1])
        return out

    monkeypatch.setattr(trainer, "grpo_loss", recorded)
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, model=dict(TINY, block_size=32),
              grad_accum=2, max_steps=3, eval_every=0, grpo_beta=0.1, lora_rank=2, lr=1e-2)
    trainer.train(config(chat_dir, tmp_path / "run", **kw))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert len(calls) == 6 and any(calls[i][1] != calls[i + 1][1] for i in range(0, 6, 2))  # (unequal micro-steps)
    for r, (a, b) in zip(log, zip(calls[::2], calls[1::2])):
        assert r["entropy"] == pytest.approx((a[4] / a[1] + b[4] / b[1]).item() / 2, rel=1e-12)
        assert r["kl"] == pytest.approx((a[0] / a[1] + b[0] / b[1]).item() / 2, rel=1e-12)
    assert log[-1]["kl"] > 0  # (the policy has moved from the start by then)
    calls.clear()
    trainer.train(config(chat_dir, tmp_path / "again", **{**kw, "max_steps": 4}, grpo_iterations=2))
    log = [json.loads(line) for line in (tmp_path / "again/log.jsonl").read_text().splitlines()]
    for r, (a, b) in zip(log, zip(calls[::2], calls[1::2])):
        for name, at in (("region_mean", 2), ("low_mean", 5), ("high_mean", 6)):
            assert r[f"clip_ratio/{name}"] == pytest.approx((a[at] / a[3] + b[at] / b[3]).item() / 2, rel=1e-12, abs=0)
        assert r["clip_ratio/low_min"] == pytest.approx((a[7] + b[7]).item() / 2, rel=1e-12, abs=0)
        assert r["clip_ratio/high_max"] == pytest.approx((a[8] + b[8]).item() / 2, rel=1e-12, abs=0)
    assert max(r["clip_ratio/region_mean"] for r in log) > 0 and "clip_ratio" not in log[0]  # (the policy has moved from the start by then)


def test_grpo_clip_metrics_as_trl_logs_them():
    # TRL 1.16's names: the means per micro-step; the extremes' mean over the micro-steps that had a
    # sample (inf: none); cispo's cispo_clip_ratio alone; none for sapo (a single iteration's: TRL logs them)
    per = [[0, 0, 0, 3.0, 1.0, 2.0, 10.0], [0, 0, 0, 0.0, 0.0, 0.0, 0.0]]  # (each micro-step's sums)
    extremes = torch.tensor([[-0.0, 0.5], [-math.inf, -math.inf]], dtype=torch.float64)
    got = trainer.grpo_clip_metrics(TrainConfig(grpo_iterations=2), per, extremes)
    assert got == {"clip_ratio/low_mean": 0.05, "clip_ratio/high_mean": 0.1, "clip_ratio/region_mean": 0.15,
                   "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.5}
    assert trainer.grpo_clip_metrics(TrainConfig(grpo_iterations=2), per, extremes[1:].repeat(2, 1))[
        "clip_ratio/high_max"] is None
    assert trainer.grpo_clip_metrics(TrainConfig(grpo_loss_type="cispo"), per, extremes) == {
        "cispo_clip_ratio": 0.15}
    assert trainer.grpo_clip_metrics(TrainConfig(grpo_loss_type="sapo", grpo_iterations=2), per, extremes) == {}
    assert trainer.grpo_clip_metrics(TrainConfig(), per, extremes) == got


def test_completion_stats_as_trl_logs_them():
    # TRL's completions/min_length, max_length and the lengths of the samples that ended with a stop
    # token (0.0 where none did); each reward's std over the samples it scored (one reward's too, TRL 1.16's)
    nan = math.nan
    rollouts = [{"completion_ids": [[5, 1], [5], [], [2, 7, 1]], "each": torch.tensor([[1.0, nan], [2.0, 0.5],
                                                                                      [nan, nan], [4.0, 1.5]])},
                {"completion_ids": [[3, 3, 3, 3, 7]], "each": torch.tensor([[0.0, nan]])}]
    got = trainer.completion_stats(rollouts, {7}, ["a", "b"], trainer.DistInfo())
    assert got == pytest.approx({"completions/min_length": 0, "completions/max_length": 5,
                                 "completions/mean_terminated_length": 5.0, "completions/min_terminated_length": 5,
                                 "completions/max_terminated_length": 5, "rewards/a/std": np.std([1, 2, 4, 0], ddof=1),
                                 "rewards/b/std": np.std([0.5, 1.5], ddof=1)})
    none = trainer.completion_stats([{**rollouts[0], "each": rollouts[0]["each"][:, :1]}], {9}, ["a"],
                                    trainer.DistInfo())
    assert none == pytest.approx({"completions/min_length": 0, "completions/max_length": 3,
                                  "completions/mean_terminated_length": 0.0, "completions/min_terminated_length": 0.0,
                                  "completions/max_terminated_length": 0.0, "rewards/a/std": np.std([1, 2, 4], ddof=1)})


def test_frac_reward_zero_std_as_trl_counts_it():
    # TRL 1.16's: the samples of groups whose rewards' std is 0; a group no reward function scored
    # has a NaN std (nanstd), not 0 (it had counted: 0.5 here, TRL's 0.0); under batch scaling the
    # step's std, which equal rewards' sums leave a rounding above 0 (256 of 0.7: 1.7e-8; had read 0.0)
    rewards = torch.tensor([math.nan] * 4 + [1.0, 0.0, 1.0, 1.0] + [2.0] * 4, dtype=torch.float64)
    assert torch.isnan(trainer._nanstd(rewards.view(-1, 4))[0]).all()
    samples = [[5, 1], [5], [], [2, 7]] * 3
    assert trainer._flat_and_unended(rewards, samples, 4, {1}) == [4.0, 9.0]  # (the last group; all but [5, 1])
    n = 256
    sums = torch.tensor([0.7 * n, n, 0.49 * n, n, 0, 0, 0, 0, 0, 0, 1, 0], dtype=torch.float64)
    assert trainer.grpo_stat_means(sums, 0, batch_scaled=True)[5] == 1.0


def test_grpo_resumed_mid_generation_with_a_kl_term_added(chat_dir, tmp_path):  # noqa: F811
    # grpo_beta is not run-defining (a resume may add it), but a checkpoint written mid-way through a
    # generation holds samples prepared without the reference's log-probabilities: the resume had
    # died of KeyError 'ref' (from the GRPO audit, 2026-12-06). They are computed on resume.
    trainer.train(config(chat_dir, tmp_path / "base", max_steps=2))
    kw = dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=4, grpo_iterations=2, eval_every=0,
              warmup_steps=1, init_from_run=str(tmp_path / "base"))
    trainer.train(config(chat_dir, tmp_path / "rl", max_steps=3, **kw))  # (its checkpoint: mid-way, step 3 of 2 + 2)
    trainer.train(config(chat_dir, tmp_path / "rl", max_steps=4, grpo_beta=0.1, **kw), resume=True)
    log = [json.loads(line) for line in (tmp_path / "rl/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3] and "kl" not in log[2] and log[3]["kl"] >= 0


@pytest.mark.cuda
def test_grpo_on_the_gpu_resumes_mid_generation(chat_dir, tmp_path):  # noqa: F811
    # GRPO on CUDA (bf16 autocast, samples by generate_batch on the device, its generator seeded per
    # micro-step): the reward rises; a run stopped mid-way through a generation's 3 steps resumes
    # from the samples in its checkpoint, bitwise.
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, model=dict(TINY, block_size=32), lr=1e-2,
              device="cuda", grpo_iterations=3, grad_accum=2, max_steps=12, ckpt_every=4, eval_every=12)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log) and log[-1]["reward"] > log[0]["reward"]
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=6)  # (checkpoint at 4: mid-generation)
    assert "grpo_rollouts" in torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == [r["loss"] for r in log]


def test_grpo_logs_completions(chat_dir, tmp_path):  # noqa: F811
    # grpo_log_completions 3: each generation's first 3 samples (every 2nd step with 2 iterations)
    # with their rewards (= the reward function's) and advantages; on resume the lines of the steps
    # run again are dropped first, so the file is the uninterrupted run's.
    kw = dict(grpo_reward=f"{SPEC},test_grpo:short_or_none", grpo_generations=4, grpo_max_new_tokens=5,
              model=dict(TINY, block_size=32), grpo_iterations=2, grpo_log_completions=3, max_steps=6, ckpt_every=2)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    lines = [json.loads(line) for line in (tmp_path / "whole/completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    for r in lines:
        assert r["rewards"]["sevens"] == pytest.approx(sevens([r["completion"]])[0])
        assert r["rewards"]["short_or_none"] == short_or_none([r["completion"]])[0]
        assert r["reward"] == pytest.approx(r["rewards"]["sevens"] + (r["rewards"]["short_or_none"] or 0.0))
        assert isinstance(r["prompt"], list) and np.isfinite(r["advantage"])
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=5)  # (checkpoint at 4; step 4 written)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    assert (tmp_path / "cut/completions.jsonl").read_text() == (tmp_path / "whole/completions.jsonl").read_text()


@pytest.mark.parametrize("lora", [False, True, "dropout"])
def test_grpo_kl_starts_at_zero_and_resumes_exactly(chat_dir, tmp_path, lora):  # noqa: F811
    # grpo_beta: the KL against the starting model (a frozen copy of the run it starts from, or with
    # LoRA the model with its updates off) is 0 at the first step and grows; resume is exact (the
    # reference is the starting weights, not the resumed ones). With dropout: the frozen copy's
    # initialisation draws from the RNG after a resume restored it, so the masks had shifted.
    dropout = {"dropout": 0.1} if lora == "dropout" else {}
    trainer.train(config(chat_dir, tmp_path / "base", max_steps=2, model=dict(TINY, block_size=32, **dropout)))
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, grpo_beta=0.1, lr=1e-2,
              init_from_run=str(tmp_path / "base"), **({"lora_rank": 4} if lora is True else {}))
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert (dropout or log[0]["kl"] == pytest.approx(0.0, abs=1e-7)) and log[-1]["kl"] > 1e-4
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    assert [json.loads(line)["loss"] for line in (tmp_path / "cut/log.jsonl").read_text().splitlines()] == \
        [r["loss"] for r in log]


def test_sync_ref_model_moves_the_reference_and_resumes_exactly(chat_dir, tmp_path):  # noqa: F811
    # TRL's sync_ref_model (TR-DPO): after every ref_model_sync_steps-th optimizer step the KL's
    # reference is alpha * policy + (1 - alpha) * itself; a checkpoint holds it, so a resume past a sync
    # is exact (it would have gone back to the starting weights); the run differs from one without it
    trainer.train(config(chat_dir, tmp_path / "base", max_steps=2, model=dict(TINY, block_size=32)))
    kw = dict(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=6, grpo_beta=0.3, lr=1e-2, max_steps=6,
              init_from_run=str(tmp_path / "base"), sync_ref_model=True, ref_model_sync_steps=2,
              ref_model_mixup_alpha=0.25, ckpt_every=2, keep_checkpoints=3, eval_every=0)
    trainer.train(config(chat_dir, tmp_path / "whole", **kw))
    kept = {n: torch.load(tmp_path / f"whole/checkpoints/step_{n}.pt", weights_only=False) for n in (2, 4, 6)}
    reference = LLM.load(tmp_path / "base/model.safetensors").state_dict()  # (tied weights under both names)
    for n in (2, 4, 6):  # (the policy as of step n: its checkpoint's; the reference synced right after the step)
        policy, synced = kept[n]["model"], kept[n]["reference_model"]
        for name, weight in synced.items():
            want = reference[name].clone().mul_(0.75).add_(policy[name].to(weight.dtype), alpha=0.25)
            assert torch.equal(weight, want), (n, name)
        reference = synced
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), stop_at=3)  # (checkpoint at 2, past the first sync)
    trainer.train(config(chat_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    trainer.train(config(chat_dir, tmp_path / "plain", **{**kw, "sync_ref_model": False}))
    plain = losses(tmp_path / "plain")
    assert plain[:2] == losses(tmp_path / "whole")[:2] and plain[2:] != losses(tmp_path / "whole")[2:]
    for options, message in ((dict(sync_ref_model=True), "it needs one of its own"),
                             (dict(sync_ref_model=True, grpo_beta=0.1, lora_rank=2), "in a full fine-tune"),
                             (dict(ref_model_mixup_alpha=1.5), "must be in .0, 1."),
                             (dict(ref_model_sync_steps=0), "an int >= 1")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(grpo_reward=SPEC, init_from_run=str(tmp_path / "base"), **options).validate()


def test_grpo_rewarded_by_a_reward_model(pairs_dir, chat_dir, tmp_path):  # noqa: F811
    # A reward model trained by pyllm (--preference reward) rewards each sample with its score at the
    # sample's last token, as it scores the sequence alone.
    trainer.train(config(pairs_dir, tmp_path / "rm", preference="reward", max_steps=2, model=dict(TINY, block_size=32)))
    model = tiny()
    cfg = TrainConfig(grpo_reward=str(tmp_path / "rm"), grpo_generations=2, grpo_max_new_tokens=4)
    (reward,) = trainer.load_reward(cfg, model, "fp32", torch.device("cpu"))
    rm = LLM.load(tmp_path / "rm" / "model.safetensors").eval()
    prompts, samples = [[3, 14, 15], [9, 26]], [[5, 35, 8], [7]]
    got = reward(prompts, samples, trainer.pack_replies(prompts, samples, 24, "cpu"), None)
    with torch.no_grad():
        want = [rm(torch.tensor([p + s]), scores=True)[1][0, 0].item() for p, s in zip(prompts, samples)]
    np.testing.assert_allclose(got.tolist(), want, rtol=1e-5)
    trainer.train(config(chat_dir, tmp_path / "rl", grpo_reward=str(tmp_path / "rm"), grpo_generations=2,
                         grpo_max_new_tokens=4, max_steps=2, model=dict(TINY, block_size=32)))
    assert "reward" in json.loads((tmp_path / "rl/log.jsonl").read_text().splitlines()[-1])
    with pytest.raises(ValueError, match="not a reward model"):
        trainer.load_reward(TrainConfig(grpo_reward=str(tmp_path / "rl")), model, "fp32", torch.device("cpu"))


@pytest.mark.parametrize("kind,mode", [("grpo", "ddp"), ("grpo-iterations", "ddp"), ("on-policy", "ddp"),
                                       ("grpo", "fsdp"), ("on-policy", "fsdp")])
def test_sampling_runs_on_two_processes_resume_exactly(chat_dir, tmp_path, monkeypatch, kind, mode):  # noqa: F811
    # Under DDP each rank samples its own rows' replies (seeded by step, micro-step and rank), the
    # stats are every rank's mean: a 2-process run stopped and resumed = the uninterrupted one,
    # bitwise, and a 1-process checkpoint resumes on 2 processes. FSDP2 too: the sharded model
    # gathered whole on each rank for its samples (train.gathered), ranks sampling different lengths.
    if mode == "fsdp" and not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip("FSDP2 on the CPU needs torch >= 2.7 (torch.cpu.Stream.record_event)")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers import test_grpo's reward
    teacher = {}
    if kind == "on-policy":
        trainer.train(config(chat_dir, tmp_path / "teacher", model=dict(TINY, block_size=32), max_steps=2))
        teacher = dict(teacher=str(tmp_path / "teacher"), distill_lmbda=0.5, distill_max_new_tokens=4)
    common = dict(data_dir=str(chat_dir), model=dict(TINY, block_size=32), device="cpu", max_steps=8, warmup_steps=1,
                  grad_accum=2, eval_every=4, eval_batches=2, ckpt_every=4, progress=False, lr=1e-2,
                  **(dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=4, grpo_log_completions=1000)
                     if "grpo" in kind else teacher))
    if kind == "grpo-iterations":  # the step-4 checkpoint is mid-way through a generation's 6 steps (4 micro-batches,
        # 2 a step, 3 times over): both ranks' samples in it; batch scaling by the std of the generation's on both
        common.update(grpo_iterations=3, grpo_steps_per_generation=4, grpo_scale_rewards="batch",
                      sample_stop_tokens=[7, 9], grpo_top_entropy_quantile=0.5)  # (a quantile over both ranks)
    else:  # (a mid-generation checkpoint holds each rank's samples: it resumes on as many processes)
        trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "two/cross"), batch_size=4), stop_at=6)
    run_two_processes({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2, "dist_mode": mode,
                       "cross": kind != "grpo-iterations"})
    assert losses(tmp_path / "two/cut") == losses(tmp_path / "two/whole")
    log = [json.loads(line) for line in (tmp_path / "two/whole/log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(np.isfinite(r["loss"]) for r in log)
    assert ("val_reward" in log[3]) == ("grpo" in kind)
    assert ("reward" in log[6]) if "grpo" in kind else ("on_policy" in log[-1])  # (step 6: a generation's)
    # the reward function's log_metric: its mean over the step's calls on both ranks (collectives in step)
    assert ("sevens_mean" in log[-1] and 0 <= log[-1]["sevens_mean"] <= 1) if kind == "grpo" else True
    if kind == "grpo":  # completions.jsonl: every rank's samples (rank 0's alone had been written), as the
        def prompts(run):  # 1-process run of the same global batch writes its own
            lines = [json.loads(line) for line in (tmp_path / run / "completions.jsonl").read_text().splitlines()]
            return sorted(map(str, (line["prompt"] for line in lines if line["step"] == 0)))
        assert prompts("two/whole") == prompts("two/cross") and len(prompts("two/whole")) >= 8
    if kind == "grpo" and mode == "fsdp":  # the gathered model samples what DDP's whole copies do, from the same start
        run_two_processes({**common, "out_dir": str(tmp_path / "ddp"), "batch_size": 2, "dist_mode": "ddp",
                           "cross": False})
        ddp = [json.loads(line) for line in (tmp_path / "ddp/whole/log.jsonl").read_text().splitlines()]
        assert ddp[0]["reward"] == log[0]["reward"]
        lengths = [name for name in log[0] if name.startswith("completions/")]
        assert len(lengths) == 7 and [ddp[0][name] for name in lengths] == [log[0][name] for name in lengths]
    # TRL's completions/ lengths over both ranks' samples (a MAX over the ranks): the mean between them
    for r in log if "grpo" in kind and kind != "grpo-iterations" else log[::6] if "grpo" in kind else ():
        assert r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"] <= 4
        assert r["completions/min_terminated_length"] <= r["completions/mean_terminated_length"] \
            <= r["completions/max_terminated_length"]
    if kind == "grpo-iterations":  # a generation's 6 steps: its rewards; clipped ratios after its first
        assert [("reward" in r, "completions/mean_length" in r) for r in log] == [(s % 6 == 0,) * 2 for s in range(8)]
        assert log[0]["clip_ratio/region_mean"] == 0 and all(0 <= r["clip_ratio/region_mean"] < 1 for r in log)
        for r in log:  # (the extremes over both ranks' samples, a MAX collective: a sum could pass 1)
            assert 0 <= r["clip_ratio/low_min"] <= r["clip_ratio/low_mean"] + 1e-12
            assert r["clip_ratio/high_mean"] - 1e-12 <= r["clip_ratio/high_max"] <= 1
        ckpt = torch.load(tmp_path / "two/cut/checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 8 and "grpo_rollouts" in ckpt and len(ckpt["grpo_rollouts"]) == 2


def test_mfu_counts_a_generations_forward_passes(chat_dir, pairs_dir, tmp_path, monkeypatch):  # noqa: F811
    # MFU's FLOPs (mfu * peak * training tokens / tokens_per_s) of a GRPO step that generates: the
    # training pass, plus forward passes (2 FLOPs per weight, a third of the attention's) for the
    # sampling (each sequence once, the output layer at its sampled tokens), p_old (iterations 2),
    # the reference (beta) and the reward model (no output layer); the next step, reusing the
    # generation, the training pass alone.
    monkeypatch.setattr(trainer, "peak_flops", lambda device: 1e12)
    made, real = [], trainer.grpo_rollout
    monkeypatch.setattr(trainer, "grpo_rollout", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    model = dict(TINY, block_size=32)
    trainer.train(config(chat_dir, tmp_path / "base", max_steps=1, model=model))
    trainer.train(config(pairs_dir, tmp_path / "rm", preference="reward", max_steps=1, model=model))
    made.clear()
    trainer.train(config(chat_dir, tmp_path / "rl", grpo_reward=f"{SPEC},{tmp_path / 'rm'}", grpo_generations=2,
                         grpo_max_new_tokens=4, grpo_iterations=2, grpo_beta=0.1, init_from_run=str(tmp_path / "base"),
                         max_steps=2, eval_every=0, eval_batches=1))
    log = [json.loads(line) for line in (tmp_path / "rl/log.jsonl").read_text().splitlines()]
    policy, rm = (LLM.load(tmp_path / run / "model.safetensors") for run in ("rl", "rm"))
    r = made[0]  # the generation's (then the eval's)
    train = policy.flops_of_documents(r["lengths"], r["targets"])
    generation = (policy.flops_of_documents(*r["sampled"], forward_only=True)
                  + 2 * policy.flops_of_documents(r["lengths"], r["targets"], forward_only=True)
                  + rm.flops_of_documents(r["lengths"], 0, forward_only=True))
    counted = [rec["mfu"] * 1e12 * sum(r["lengths"]) / rec["tokens_per_s"] for rec in log]
    assert counted[0] == pytest.approx(train + generation, rel=1e-3)
    assert counted[1] == pytest.approx(train, rel=1e-3)


def test_grpo_options_are_checked(data_dir, pairs_dir, tmp_path):  # noqa: F811
    for kwargs, message, error in [(dict(grpo_reward=SPEC, grpo_generations=1), "grpo_generations must be >= 2", ValueError),
                                   (dict(grpo_reward=SPEC, preference="dpo"), "neither preference tuning", ValueError),
                                   (dict(grpo_reward=SPEC, grpo_beta=0.1), "needs init_from_hf or init_from_run",
                                    ValueError),
                                   (dict(grpo_reward=SPEC, grpo_loss_type="ppo"), "grpo_loss_type must be one of", ValueError),
                                   (dict(grpo_reward=SPEC, grpo_scale_rewards="z"), "grpo_scale_rewards group", ValueError),
                                   (dict(grpo_reward=SPEC, grpo_iterations=0), "grpo_iterations must be >= 1", ValueError),
                                   (dict(grpo_reward=SPEC, grad_accum=2, grpo_steps_per_generation=3),
                                    "grpo_steps_per_generation must be a multiple of grad_accum", ValueError),
                                   (dict(grpo_reward=SPEC, grpo_log_completions=-1), "grpo_log_completions must be >= 0",
                                    ValueError),
                                   (dict(grpo_reward=SPEC, grpo_epsilon=1.5), "grpo_epsilon in", ValueError),
                                   (dict(grpo_reward="a:b,"), "comma-separated", ValueError)]:
        with pytest.raises(error, match=message):
            TrainConfig(**kwargs).validate()
    for folder in (data_dir, pairs_dir):
        with pytest.raises(ValueError, match="they need conversations"):
            trainer.train(config(folder, tmp_path / "x", grpo_reward=SPEC))


@pytest.mark.parametrize("loss_type", ["grpo", "sapo", "dr_grpo"])
def test_grpo_weighs_every_sample_of_the_step_alike_however_micro_batches_split_them(chat_dir, loss_type):  # noqa: F811
    # TRL's micro-batches hold per_device_train_batch_size samples each, so each sample of a step
    # weighs 1 / (the step's samples); pyllm's packed micro-batches hold varying numbers. Divided by
    # each micro-batch's own count, samples of a smaller one had weighed more (an audit, 2026-12-06).
    model, ref_model = tiny().double(), tiny(dim=96, n_heads=3, n_kv_heads=1).double()
    reference = torch.no_grad()(lambda x, y, cu: ref_model(x, y, cu, per_token=True)[1])
    cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=4, grpo_max_new_tokens=5, grpo_loss_type=loss_type,
                      sample_stop_tokens=list(range(12)), grpo_beta=0.3)  # (a KL term: grpo's on-policy loss is 0 without)
    reward = trainer.load_reward(cfg, model, "fp32", torch.device("cpu"))

    def rollouts():
        made = [trainer.grpo_rollout(model, data.PackedLoader(chat_dir / "train.bin", rows, 32, seed=rows).next_batch(),
                                     cfg, reward, torch.Generator().manual_seed(1)) for rows in (3, 1)]
        return made, [len(r["rewards"]) for r in made]

    alone = []
    for r in rollouts()[0]:  # each micro-batch a step of its own: its samples' mean
        trainer.grpo_prepare([r], cfg, trainer.DistInfo(), model, reference)
        alone.append(trainer.grpo_loss(model, r, cfg)[0].item())
    made, n = rollouts()
    assert n[0] != n[1]
    two = replace(cfg, grad_accum=2)
    trainer.grpo_prepare(made, two, trainer.DistInfo(), model, reference)
    step = sum(trainer.grpo_loss(model, r, two)[0].item() for r in made) / 2  # (the trainer's / grad_accum)
    assert step == pytest.approx((alone[0] * n[0] + alone[1] * n[1]) / sum(n), rel=1e-9)


def test_grpo_samples_fit_the_rows_they_are_trained_in(chat_dir):  # noqa: F811
    # A sample longer than --seq-len's rows was rewarded whole but trained on its first tokens only
    # (its stop token perhaps cut away): samples now stop where the rows end.
    model = tiny(block_size=64).double()
    batch = data.PackedLoader(chat_dir / "train.bin", 2, 16, seed=0).next_batch()
    cfg = TrainConfig(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=40)
    seen = []
    record = lambda groups, samples, packed, rows, step=None: (seen.extend(zip(groups, samples)), torch.zeros(len(samples)))[1]  # noqa: E731
    trainer.grpo_rollout(model, batch, cfg, [record], torch.Generator().manual_seed(1))
    assert seen and max(len(p) + len(c) for p, c in seen) <= 16


# trains TrainConfig(**argv[1]) with each prompt's "sample" a fixed function of the prompt, so that
# runs of any number of processes distill on the same samples
FIXED_SAMPLES_WORKER = r"""
import json, random, sys, torch
torch.set_num_threads(1)
import pyllm.train as T
def fixed(model, prompts, max_new_tokens, temperature, stop_tokens, generator, limit=None):
    draws = [random.Random(len(p) * 1000 + sum(p)) for p in prompts]
    return [[r.randrange(3, 40) for _ in range(r.randint(1, max_new_tokens))] for r in draws]
T.sample_replies = fixed
T.train(T.TrainConfig(**json.loads(sys.argv[1])))
T.end_process(0)
"""


def test_on_policy_distillation_on_two_processes_is_one_process(chat_dir, tmp_path):  # noqa: F811
    # A micro-batch of samples had kept its data batch's weight on each rank: the loss a mean of each
    # rank's samples weighted by its data tokens, not the step's samples' token mean (3 processes: the
    # first gradient norm 13% above one process's). The same samples (fixed here) on 2 DDP processes
    # and on 1 process of the same global batch: the same losses and gradient norms (from the
    # 3-process audit)
    import os
    import subprocess
    import sys

    trainer.train(config(chat_dir, tmp_path / "teacher", model=dict(TINY, block_size=32), max_steps=2))
    common = dict(data_dir=str(chat_dir), model=dict(TINY, block_size=32), device="cpu", max_steps=3, warmup_steps=1,
                  grad_accum=2, eval_every=0, progress=False, lr=1e-2, teacher=str(tmp_path / "teacher"),
                  distill_lmbda=1.0, distill_max_new_tokens=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-c", FIXED_SAMPLES_WORKER, json.dumps(
        {**common, "batch_size": 4, "out_dir": str(tmp_path / "one")})], capture_output=True, text=True, timeout=300,
        env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun(2, ["--no-python", sys.executable, "-c", FIXED_SAMPLES_WORKER, json.dumps(
        {**common, "batch_size": 2, "out_dir": str(tmp_path / "two")})], timeout=300, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [r["on_policy"] for r in logs[0]] == [1.0] * 3
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-5), key


def test_grpo_luspo_with_token_ratios_says_so(chat_dir, tmp_path, capsys):  # noqa: F811
    # TRL warns when luspo runs without sequence-level ratios (the LUSPO paper's setup); so does pyllm
    kw = dict(grpo_reward=SPEC, grpo_generations=2, grpo_max_new_tokens=2, model=dict(TINY, block_size=32),
              grpo_loss_type="luspo", max_steps=1, eval_every=0, ckpt_every=0)
    trainer.train(config(chat_dir, tmp_path / "token", **kw))
    assert "--grpo-importance-sampling sequence" in capsys.readouterr().err
    trainer.train(config(chat_dir, tmp_path / "sequence", **kw, grpo_importance_sampling="sequence"))
    assert "luspo" not in capsys.readouterr().err
