"""Preference tuning (DPO, KTO, reward models): pairs packed side by side vs TRL's padded batches.

One epoch over the same preference pairs, forward + backward of the DPO loss (the optimizer step
costs the same either way and is left out; both sides take the reference log-probabilities as
precomputed, TRL's precompute_ref_log_probs, outside the timing), on the same weights (a
LlamaForCausalLM with random weights in SmolLM2-135M's shape, 30 layers (--layers; --quick: 4), read
by pyllm.model.LLM.from_hf):
- pyllm packed: PackedLoader rows of --seq-len tokens holding whole pairs, each pair's chosen and
  rejected sequences side by side, each attending to itself alone (cu_seqlens -> flash_attn varlen);
  pyllm.train.preference_batch_loss (kind dpo).
- transformers padded: what TRL's DPOTrainer computes per step (its concatenated_forward): a batch's
  chosen sequences then its rejected ones in one batch padded to the longest, transformers' model with
  its attention_mask, each sequence's log-probability summed over its reply's tokens, the same loss.
- transformers sorted: its best case for padding: pairs in batches of about equal length (sorted by
  their longer sequence).
--loss kto: KTO on unpaired examples, each packed with its KL sequence (its prompt with the next
example's reply, data.prepare_kto's), against TRL's KTOTrainer computation: the KL sequences padded
and run without autograd, then the examples padded, forward and backward. "pyllm one pass" is what
pyllm ran before 2026-12-01: the KL sequences in the examples' pass, under autograd.
--loss reward: a reward model's Bradley-Terry loss on the pairs (pyllm: a score head at each
packed sequence's last token, preference_batch_loss kind reward) against TRL's RewardTrainer
computation: transformers' LlamaForSequenceClassification on the same weights, a batch's chosen
then rejected sequences padded together (its pad id pooling the last real token).
The padded batches hold as many pairs as a packed batch holds on average. Prompt and reply lengths
are drawn from log-normals around --mean-prompt / --mean-reply (cut to [8, ...]); each pair's two
replies differ in length. Rows: seconds per epoch (median of --repeat, interleaved), real tokens/s,
the share of computed positions that were padding. pyllm packed's last batch may also hold the next
epoch's first pairs (the loader fills it so): they are in its s/epoch and its real tokens, and their
tokens are printed under the table. Needs transformers; prints why and exits 0 without it. (TRL
itself is not imported: its trainer's loop around this computation is not what is measured.)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm import data  # noqa: E402
from pyllm.model import LLM  # noqa: E402
from pyllm.nn import preference_loss, sequence_logps  # noqa: E402
from pyllm.train import preference_batch_loss  # noqa: E402

BETA = 0.1


def padded(docs, masks, seqs, seq_len):
    """(input_ids, attention_mask, loss_mask) of documents seqs, each cut to seq_len and padded to
    the longest; loss_mask marks the reply's tokens (as TRL's completion mask)."""
    T = max(min(len(docs[d]), seq_len) for d in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for r, d in enumerate(seqs):
        n = min(len(docs[d]), seq_len)
        x[r, :n], attn[r, :n] = torch.from_numpy(docs[d][:n]), 1
        loss_mask[r, :n] = torch.from_numpy(masks[d][:n] == 1)
    return x, attn, loss_mask


def concatenated_batches(docs, masks, pair_order, per_batch, seq_len, kto=False):
    """TRL's batches of per_batch pairs: DPO's concatenated ones, (input_ids, attention_mask,
    loss_mask, pairs), the chosen sequences then the rejected ones, padded together; KTO's, the
    examples padded and their KL sequences padded apart, (examples..., KL..., units)."""
    batches = []
    for i in range(0, len(pair_order), per_batch):
        pairs = pair_order[i:i + per_batch]
        first, second = [2 * p for p in pairs], [2 * p + 1 for p in pairs]
        if kto:
            batches.append((*padded(docs, masks, first, seq_len), *padded(docs, masks, second, seq_len),
                            torch.tensor(pairs)))
        else:
            batches.append((*padded(docs, masks, first + second, seq_len), torch.tensor(pairs)))
    return batches


def concatenated_logps(model, x, attn, loss_mask):
    """Each sequence's summed log-probability of its reply tokens, as TRL's concatenated_forward."""
    logits = model(input_ids=x, attention_mask=attn).logits[:, :-1].float()
    labels, keep = x[:, 1:], loss_mask[:, 1:]
    token = torch.gather(F.log_softmax(logits, -1), 2, labels[..., None])[..., 0]
    return (token * keep).sum(-1)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=0, help="default 64 (--quick: 24)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="rows per packed batch")
    parser.add_argument("--mean-prompt", type=int, default=120)
    parser.add_argument("--mean-reply", type=int, default=100)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--layers", type=int, default=0, help="default 30, SmolLM2-135M's (--quick: 4)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loss", choices=["dpo", "kto", "reward"], default="dpo",
                        help="kto: unpaired examples, each with its KL sequence (its prompt, the next example's reply); "
                             "reward: a reward model's Bradley-Terry loss")
    args = parser.parse_args()
    kto, reward = args.loss == "kto", args.loss == "reward"
    transformers = common.peer_module("transformers", "bench_dpo", "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    n_pairs = args.pairs or (24 if args.quick else 64)
    config = common.smollm2_config(transformers, args.layers or (4 if args.quick else 30), attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rng = np.random.default_rng(0)
    draw = lambda mean: np.clip(rng.lognormal(np.log(mean), 0.7, n_pairs).astype(int), 8, args.seq_len // 4)  # noqa: E731
    prompts, chosen, rejected = draw(args.mean_prompt), draw(args.mean_reply), draw(args.mean_reply)
    high = config.vocab_size - 1 if reward else config.vocab_size  # reward: the last id pads (pooling skips it)
    prompts = [rng.integers(0, high, p) for p in prompts]
    replies = [[rng.integers(0, high, n) for n in pair] for pair in zip(chosen, rejected)]
    if kto:  # an example's reply, then the next example's (its KL sequence: data.prepare_kto)
        replies = [(replies[i][0], replies[(i + 1) % n_pairs][0]) for i in range(n_pairs)]
    labels = rng.random(n_pairs) < 0.5
    docs, masks = [], []
    for prompt, pair in zip(prompts, replies):
        for reply in pair:
            docs.append(np.concatenate([prompt, reply]))
            masks.append((np.arange(len(docs[-1])) >= len(prompt)).astype(np.uint8))
    lengths = np.array([len(d) for d in docs])
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LLM.from_hf(folder)
        if reward:  # TRL's RewardTrainer: transformers' sequence classifier (num_labels 1) on the same weights
            ours.add_score_head(1)
            config.num_labels, config.pad_token_id = 1, config.vocab_size - 1
            classifier = transformers.LlamaForSequenceClassification(config)
            missing = classifier.load_state_dict({**theirs.state_dict(), "score.weight": ours.score.weight.detach()},
                                                 strict=False)
            assert missing.missing_keys == [], missing
            theirs = classifier
        path = Path(folder) / "train.bin"
        data.write_documents(path, docs, masks, config.vocab_size, np.arange(2 * n_pairs).reshape(-1, 2))
        loader = data.PackedLoader(path, args.rows, args.seq_len, seed=0)
        packed, pad, seen, next_epoch_tokens = [], 0, set(), 0
        while loader.epoch == 0:  # the last batch may hold the next epoch's first pairs
            packed.append((*loader.next_batch(), loader.docs))
            pad += loader.padding
            for doc, n in zip((d for d in loader.docs if d >= 0), loader.lengths):
                next_epoch_tokens += n if doc in seen else 0
                seen.add(doc)
        order = [int(i) for i in loader._epoch_order(0)]
    ours, theirs = ours.to(args.device, dtype).train(), theirs.to(args.device, dtype).train()
    per_batch = max(1, round(n_pairs / len(packed)))
    batches = concatenated_batches(docs, masks, order, per_batch, args.seq_len, kto)
    longer = lambda p: max(len(docs[2 * p]), len(docs[2 * p + 1]))  # noqa: E731
    by_length = concatenated_batches(docs, masks, sorted(order, key=longer), per_batch, args.seq_len, kto)
    # Reference log-probabilities: precomputed, as both sides would (any values serve the timing;
    # these are the starting model's, so DPO's losses start at log 2, KTO's at 0.5).
    reference = np.zeros(2 * n_pairs)
    with torch.no_grad():
        for i in range(0, 2 * n_pairs if not reward else 0, 2 * per_batch):
            seqs = list(range(i, min(i + 2 * per_batch, 2 * n_pairs)))
            x, attn, loss_mask = (t.to(args.device) for t in padded(docs, masks, seqs, args.seq_len))
            reference[seqs] = concatenated_logps(theirs, x, attn, loss_mask).double().cpu().numpy()
    options = dict(kind=args.loss) if reward else dict(kind=args.loss, beta=BETA)

    def epoch_pyllm_packed(limit=None, fused_loss=False, fused=False):
        ours.fused_loss = fused_loss
        for x, y, cu, docs_of in packed[:limit]:
            batch = (x.to(args.device), y.to(args.device), cu.to(args.device), docs_of)
            preference_batch_loss(ours, batch, None if reward else reference, labels, fused=fused,
                                  **options)[0].backward()
        ours.fused_loss = False

    def epoch_pyllm_one_pass(limit=None):
        """KTO as pyllm computed it before 2026-12-01: the KL sequences in the examples' pass, with
        autograd (their log-probabilities detached), rather than in a pass of their own without."""
        for x, y, cu, docs_of in packed[:limit]:
            x, y, cu = x.to(args.device), y.to(args.device), cu.to(args.device)
            logps = sequence_logps(ours(x, y, cu, per_token=True)[1], cu)
            real = [i for i, d in enumerate(docs_of) if d >= 0]
            units = [docs_of[i] // 2 for i in real[0::2]]
            ref = torch.from_numpy(reference[[docs_of[i] for i in real]]).to(logps)
            tokens = sequence_logps((y != -1).to(logps), cu)
            losses = preference_loss("kto", logps[real[0::2]], logps[real[1::2]].detach(), tokens[real[0::2]],
                                     tokens[real[1::2]], ref[0::2], ref[1::2], BETA,
                                     desirable=torch.from_numpy(labels[units]).to(args.device))[0]
            losses.mean().backward()

    def epoch_transformers(limit=None, batches=batches):
        for batch in batches[:limit]:
            pairs = batch[-1]
            ref = torch.from_numpy(reference[torch.cat([2 * pairs, 2 * pairs + 1]).numpy()]).to(args.device)
            n = len(pairs)
            if kto:  # TRL's KTOTrainer: the KL sequences' log-probabilities without autograd
                x, attn, loss_mask, kl_x, kl_attn, kl_mask = (t.to(args.device) for t in batch[:6])
                with torch.no_grad():
                    kl_logps = concatenated_logps(theirs, kl_x, kl_attn, kl_mask)
                logps = torch.cat([concatenated_logps(theirs, x, attn, loss_mask), kl_logps])
                tokens = torch.cat([loss_mask[:, 1:].sum(-1), kl_mask[:, 1:].sum(-1)]).to(logps)
                desirable = torch.from_numpy(labels[pairs.numpy()]).to(args.device)
            elif reward:  # the scores at each sequence's last token (right padding, its pad id)
                x, attn = (t.to(args.device) for t in batch[:2])
                scores = theirs(input_ids=torch.where(attn.bool(), x, config.pad_token_id), attention_mask=attn).logits[:, 0]
                torch.nn.functional.logsigmoid(scores[:n] - scores[n:]).neg().mean().backward()
                continue
            else:
                x, attn, loss_mask = (t.to(args.device) for t in batch[:3])
                logps = concatenated_logps(theirs, x, attn, loss_mask)
                tokens, desirable = loss_mask[:, 1:].sum(-1).to(logps), None
            ref = ref.to(logps)
            losses = preference_loss(args.loss, logps[:n], logps[n:], tokens[:n], tokens[n:], ref[:n], ref[n:], BETA,
                                     desirable=desirable)[0]
            losses.mean().backward()

    # DPO / KTO with --fused-loss: the loss fused with the output layer, pairs (KTO: examples) whole (the
    # trainer's way since 2026-12-03), and before that the token log-probabilities by linear_token_logps
    # (the backward recomputing the logits); "pyllm packed": the logits of the trained tokens whole.
    fused_runs = {} if reward else {
        "pyllm packed, fused loss": lambda limit=None: epoch_pyllm_packed(limit, True, True),
        "pyllm packed, fused logps": lambda limit=None: epoch_pyllm_packed(limit, True, False)}
    runs = {"pyllm packed": epoch_pyllm_packed, **fused_runs, **({"pyllm one pass": epoch_pyllm_one_pass} if kto else {}),
            "transformers padded": epoch_transformers,
            "transformers sorted": lambda limit=None: epoch_transformers(limit, by_length)}
    positions = {"pyllm packed": len(packed) * args.rows * args.seq_len,
                 "transformers padded": sum(b[0].numel() + (b[3].numel() if kto else 0) for b in batches),
                 "transformers sorted": sum(b[0].numel() + (b[3].numel() if kto else 0) for b in by_length)}
    real = {name: int(np.minimum(lengths, args.seq_len).sum()) for name in positions}
    real["pyllm packed"] = positions["pyllm packed"] - pad
    for name in ["pyllm one pass"] * kto + list(fused_runs):
        positions[name], real[name] = positions["pyllm packed"], real["pyllm packed"]
    for run in runs.values():  # warm-up
        run(limit=2)
    seconds = common.interleaved_seconds(runs, args.repeat, args.device, before=lambda: (
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)))
    peer = seconds["transformers padded"]
    rows = []
    for name in runs:
        s = seconds[name]
        rows.append({"impl": name, "batches": len(packed) if name.startswith("pyllm") else len(batches),
                     "s/epoch": round(s, 2), "real tokens/s": round(real[name] / s),
                     "padding": f"{1 - real[name] / positions[name]:.0%}",
                     "vs transformers": f"{peer * real[name] / (s * real['transformers padded']):.2f}x",
                     **common.spread(s)})
    print(f"# {args.loss.upper()} epoch on {common.device_description(args.device)}: {config.num_hidden_layers} layers, {args.dtype}, "
          f"{n_pairs} pairs, {lengths.sum()} tokens (sequences of mean {lengths.mean():.0f}, max {lengths.max()}), "
          f"packed {args.rows} x {args.seq_len}, padded {per_batch} pairs per batch, transformers {transformers.__version__}")
    common.print_table(rows, ["impl", "batches", "s/epoch", "real tokens/s", "padding", "vs transformers"])
    if next_epoch_tokens:
        print(f"# pyllm packed's last batch also trains {next_epoch_tokens} tokens of the next epoch's first pairs "
              f"({next_epoch_tokens / lengths.sum():.1%} of an epoch): in its s/epoch and its real tokens/s")
    common.write_json(args.json, args.loss, args.device, rows, {
        "layers": config.num_hidden_layers, "dtype": args.dtype, "pairs": n_pairs, "tokens": int(lengths.sum()),
        "seq_len": args.seq_len, "rows": args.rows, "pairs_per_padded_batch": per_batch,
        "transformers": transformers.__version__, "beta": BETA, "packed_next_epoch_tokens": next_epoch_tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
