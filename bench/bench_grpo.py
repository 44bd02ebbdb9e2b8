"""One GRPO step: pyllm's (packed prompts, generate_batch, packed training pass) vs TRL's computation through transformers.

A step of GRPO is sampling G completions of each of P prompts, then a forward + backward of the
policy over the P * G sequences (the rewards and advantages cost nothing beside them). Both sides
hold the same weights (a LlamaForCausalLM with random weights in SmolLM2-135M's shape, 30 layers
(--layers; --quick: 4), read by pyllm.model.LLM.from_hf) and sample exactly --new-tokens tokens per
completion (no end-of-sequence id: the same work on both sides), at temperature 1:
- pyllm: the trainer's own pieces on a packed batch of the prompts: train.grpo_rollout (each prompt
  G times through LLM.generate_batch: no padding, each row at its own position; the sequences packed
  into rows of --seq-len), then grpo_prepare and grpo_loss (TRL's default dapo loss) for the
  training pass, each sequence attending to itself alone.
- transformers (TRL's GRPOTrainer computation): the prompts left-padded, model.generate with
  num_return_sequences G and do_sample, then one padded forward + backward of prompt + completion
  with its attention mask, the per-token log-probabilities of the completion, the same loss (the
  clipped token loss, summed over the completions' tokens and divided by their number).
Prompt lengths are drawn from a log-normal around --mean-prompt (cut to [8, 4 x mean]). Rows: seconds
per step split into sampling and the training pass (median of --repeat, interleaved), generated
tokens/s. Needs transformers; prints why and exits 0 without it.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm import train as trainer  # noqa: E402
from pyllm.model import LLM  # noqa: E402


def group_advantages(rewards: torch.Tensor, g: int) -> torch.Tensor:
    grouped = rewards.view(-1, g)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=0, help="prompts per step (default 8; --quick: 4)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--mean-prompt", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=1024, help="pyllm's rows for the training pass")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--layers", type=int, default=0, help="default 30, SmolLM2-135M's (--quick: 4)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_grpo", "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    n_prompts, G = args.prompts or (4 if args.quick else 8), args.generations
    config = common.smollm2_config(transformers, args.layers or (4 if args.quick else 30), attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(args.mean_prompt), 0.5, n_prompts).astype(int), 8, 4 * args.mean_prompt)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LLM.from_hf(folder)
    # the prompts as a packed batch of conversations, as the trainer gets them (a one-token reply each)
    batch = trainer.pack_replies(prompts, [[0]] * n_prompts, args.seq_len, args.device)[:3]
    ours, theirs = ours.to(args.device, dtype).train(), theirs.to(args.device, dtype).train()
    theirs.generation_config.pad_token_id = 0
    cfg = trainer.TrainConfig(grpo_generations=G, grpo_max_new_tokens=args.new_tokens, grpo_temperature=1.0)
    reward = lambda prompts, completions, packed, rows, step=None: torch.rand(len(completions))  # noqa: E731  (costs nothing either way)
    times = {"pyllm": [], "transformers": []}

    def step_pyllm():
        t0 = time.perf_counter()
        rollout = trainer.grpo_rollout(ours, batch, cfg, [reward], None)  # sampling (the reward costs nothing)
        common.sync(args.device)  # the split between sampling and training is read off the host clock
        t1 = time.perf_counter()
        trainer.grpo_prepare([rollout], cfg, trainer.DistInfo(device=torch.device(args.device)))
        trainer.grpo_loss(ours, rollout, cfg)[0].backward()
        common.sync(args.device)
        times["pyllm"].append((t1 - t0, time.perf_counter() - t1))
        assert rollout["targets"] == n_prompts * G * args.new_tokens

    def step_transformers():
        t0 = time.perf_counter()
        longest = max(lengths)
        ids = torch.zeros(n_prompts, longest, dtype=torch.long)
        mask = torch.zeros(n_prompts, longest, dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding, as generation wants
            ids[r, longest - len(p):], mask[r, longest - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(args.device), mask.to(args.device)
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  num_return_sequences=G, eos_token_id=None)
        common.sync(args.device)
        t1 = time.perf_counter()
        full_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones(len(out), args.new_tokens, dtype=torch.long,
                                                                         device=args.device)], 1)
        logits = theirs(input_ids=out, attention_mask=full_mask).logits[:, longest - 1:-1].float()
        token_logps = torch.gather(F.log_softmax(logits, -1), 2, out[:, longest:, None])[..., 0]  # (P G, new)
        advantages = group_advantages(torch.rand(len(out)).double(), G).to(token_logps)[:, None]
        ratio = torch.exp(token_logps - token_logps.detach())
        loss = -torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
        (loss.sum() / loss.numel()).backward()
        common.sync(args.device)
        times["transformers"].append((t1 - t0, time.perf_counter() - t1))

    runs = {"pyllm": step_pyllm, "transformers": step_transformers}
    for run in runs.values():  # warm-up
        run()
    for name in times:
        times[name].clear()
    common.interleaved_seconds(runs, args.repeat, args.device, before=lambda: (
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)))
    rows = []
    new_tokens = n_prompts * G * args.new_tokens
    totals = {}
    for name in runs:
        sampling, training = (float(np.median([t[i] for t in times[name]])) for i in (0, 1))
        total = totals[name] = sampling + training
        steps = common.timing([a + b for a, b in times[name]])  # the spread of whole steps
        rows.append({"impl": name, "sampling s": round(sampling, 2), "training s": round(training, 2),
                     "step s": round(total, 2), "sampled tokens/s": round(new_tokens / sampling), **common.spread(steps)})
    for row in rows:  # from unrounded seconds
        row["vs transformers"] = f"{totals['transformers'] / totals[row['impl']]:.2f}x"
    print(f"# GRPO step on {common.device_description(args.device)}: {config.num_hidden_layers} layers, {args.dtype}, "
          f"{n_prompts} prompts (mean {lengths.mean():.0f} tokens) x {G} samples of {args.new_tokens} tokens, "
          f"transformers {transformers.__version__}")
    common.print_table(rows, ["impl", "sampling s", "training s", "step s", "sampled tokens/s", "vs transformers"])
    common.write_json(args.json, "grpo", args.device, rows, {
        "layers": config.num_hidden_layers, "dtype": args.dtype, "prompts": n_prompts, "generations": G,
        "new_tokens": args.new_tokens, "mean_prompt": float(lengths.mean()), "transformers": transformers.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
