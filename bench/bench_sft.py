"""Fine-tuning on conversations: packed rows with per-conversation attention vs padded batches.

One epoch over the same conversations, forward + backward (the optimizer step costs the same either
way and is left out), three ways on the same weights (a LlamaForCausalLM with random weights in
SmolLM2-135M's shape, 30 layers (--layers; --quick: 4), read by pyllm.model.LLM.from_hf):
- pyllm packed: PackedLoader rows of --seq-len tokens, whole conversations one after another, each
  attending to itself alone (LLM.forward's cu_seqlens -> flash_attn varlen); padding only at a row's end;
  the loss as the trainer computes it (pyllm.train.packed_loss: the output layer at the trained
  positions only, since 2026-12-01).
- pyllm padded: batches of conversations in the same order, each batch padded to its longest (what
  transformers' DataCollatorWithPadding does), the model's plain causal forward.
- transformers padded: the same padded batches through transformers' own model (SDPA, attention_mask,
  labels -100 on padding and prompts).
- transformers sorted: its best case for padding: batches of conversations of about equal length
  (the whole set sorted by length, as its Trainer's group_by_length does within mega-batches).
--lora R: LoRA fine-tuning instead, rank R, alpha 2R, on both sides: the same 7 updates per block (q, k,
v, o, gate, up, down): pyllm's LLM.add_lora(targets="all-linear") (per projection inside its fused qkv
and gate-up layers) vs PEFT's get_peft_model on "all-linear"; needs peft. (Until 2026-12-01 pyllm's
side took its default, 4 updates per block: fused qkv, output, fused gate-up, down.)
--lora-experts (with --lora and --moe): every expert's own updates too, both sides: pyllm's
targets "all-linear,experts" (MoEMLP.add_lora: the low-rank products as their own matmuls) vs PEFT's
target_parameters experts.gate_up_proj / experts.down_proj (its ParamWrapper: B A merged into the
expert stack each forward).
--moe E,K: a mixture of experts instead (Qwen3MoeForCausalLM, common.smollm2_moe_config: E experts,
K per token, a token's MLP FLOPs the dense model's; transformers with its default experts
implementation, grouped_mm).
The padded batches hold as many conversations as a packed batch holds on average, so each way sees
about the same real tokens per step ("vs transformers" compares real tokens/s). Conversation lengths are drawn from a log-normal around
--mean-tokens (SFT sets are long-tailed: most replies short, some long), cut to [16, --seq-len]; the
second half of each is the assistant's (the loss's). Rows: seconds per epoch (median of --repeat,
the three interleaved), real tokens/s, the share of computed positions that were padding. pyllm
packed's last batch may also hold the next epoch's first conversations (the loader fills it so): they
are in its s/epoch and its real tokens, and their tokens are printed under the table.
Needs transformers; prints why and exits 0 without it.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm import data  # noqa: E402
from pyllm.model import LLM  # noqa: E402
from pyllm.train import packed_loss  # noqa: E402


def padded_batches(docs, masks, order, per_batch):
    """(x, y, attention_mask, labels) per batch of per_batch conversations in order, padded to the
    longest: y the next token where trained, else -1 (pyllm's targets); labels the token itself where
    trained, else -100 (transformers' labels, which its loss shifts)."""
    batches = []
    for i in range(0, len(order), per_batch):
        group = [order[j] for j in range(i, min(i + per_batch, len(order)))]
        T = max(len(docs[d]) for d in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)
        attn = torch.zeros(len(group), T, dtype=torch.long)
        labels = torch.full((len(group), T), -100, dtype=torch.long)
        for r, d in enumerate(group):
            n = len(docs[d])
            x[r, :n], attn[r, :n] = torch.from_numpy(docs[d]), 1
            y[r, :n - 1] = torch.from_numpy(np.where(masks[d][1:] == 1, docs[d][1:], -1))
            labels[r, :n] = torch.from_numpy(np.where(masks[d] == 1, docs[d], -100))
        batches.append((x, y, attn, labels))
    return batches


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=0, help="default 96 (--quick: 32)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="rows per packed batch")
    parser.add_argument("--mean-tokens", type=int, default=200)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--layers", type=int, default=0, help="default 30, SmolLM2-135M's (--quick: 4)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--moe", metavar="E,K", help="a mixture of E experts, K per token, instead of SmolLM2's MLP")
    parser.add_argument("--lora-experts", action="store_true", help="with --lora and --moe: LoRA on every expert too")
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_sft", "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    n_conv = args.conversations or (32 if args.quick else 96)
    layers = args.layers or (4 if args.quick else 30)
    if args.moe:
        n_experts, top_k = (int(v) for v in args.moe.split(","))
        config = common.smollm2_moe_config(transformers, layers, n_experts, top_k, attn_implementation="sdpa")
        theirs = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = common.smollm2_config(transformers, layers, attn_implementation="sdpa")
        theirs = transformers.LlamaForCausalLM(config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(args.mean_tokens), 0.8, n_conv).astype(int), 16, args.seq_len)
    docs = [rng.integers(0, config.vocab_size, n) for n in lengths]
    masks = [(np.arange(n) >= n // 2).astype(np.uint8) for n in lengths]
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LLM.from_hf(folder)
        data.write_documents(Path(folder) / "train.bin", docs, masks, config.vocab_size)
        packing = {}  # lookahead -> (batches, padded positions, next epoch's tokens): the window's default, in order
        for lookahead in (None, 1):
            loader = data.PackedLoader(Path(folder) / "train.bin", args.rows, args.seq_len, seed=0, lookahead=lookahead)
            batches, pad, seen, again = [], 0, set(), 0
            while loader.epoch == 0:  # the last batch may hold the next epoch's first documents
                batches.append(loader.next_batch())
                pad += loader.padding
                for doc, n in zip((d for d in loader.docs if d >= 0), loader.lengths):
                    again += n if doc in seen else 0
                    seen.add(doc)
            packing[lookahead] = batches, pad, again
        packed, packed_padding, next_epoch_tokens = packing[None]
        order = [int(i) for i in loader._epoch_order(0)]
    peft_version = None
    if args.lora:
        peft = common.peer_module("peft", "bench_sft", "--lora compares with PEFT, which is not installed")
        if peft is None:
            return 0
        peft_version = peft.__version__
        experts = args.lora_experts and bool(args.moe)
        ours.add_lora(args.lora, 2.0 * args.lora, targets="all-linear,experts" if experts else "all-linear")
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules="all-linear",
            **({"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]} if experts else {})))
    ours, theirs = ours.to(args.device, dtype).train(), theirs.to(args.device, dtype).train()
    per_batch = max(1, round(n_conv / len(packed)))
    padded = padded_batches(docs, masks, order, per_batch)
    by_length = padded_batches(docs, masks, sorted(order, key=lambda d: len(docs[d])), per_batch)
    dev = lambda batch: [t.to(args.device) for t in batch]  # noqa: E731

    def epoch_pyllm_packed(limit=None):
        for batch in map(dev, packed[:limit]):
            packed_loss(ours, batch).backward()  # as the trainer computes it: logits at the trained positions

    def epoch_pyllm_padded(limit=None):
        for x, y, _, _ in map(dev, padded[:limit]):
            ours(x, y)[1].backward()

    def epoch_transformers_padded(limit=None, batches=padded):
        for x, _, attn, labels in map(dev, batches[:limit]):
            theirs(input_ids=x, attention_mask=attn, labels=labels).loss.backward()

    runs = {"pyllm packed": epoch_pyllm_packed, "pyllm padded": epoch_pyllm_padded,
            "transformers padded": epoch_transformers_padded,
            "transformers sorted": lambda limit=None: epoch_transformers_padded(limit, by_length)}
    padded_positions = sum(b[0].numel() for b in padded)
    positions = {"pyllm packed": len(packed) * args.rows * args.seq_len, "pyllm padded": padded_positions,
                 "transformers padded": padded_positions, "transformers sorted": sum(b[0].numel() for b in by_length)}
    real = {name: int(lengths.sum()) for name in positions}
    real["pyllm packed"] = positions["pyllm packed"] - packed_padding
    in_order = packing[1][1] / (len(packing[1][0]) * args.rows * args.seq_len)
    # (the next epoch's tokens trained in the last batch are real work: counted; in-order packing ignores them)
    for run in runs.values():  # warm-up
        run(limit=2)
    seconds = common.interleaved_seconds(runs, args.repeat, args.device, before=lambda: (
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)))
    peer = seconds["transformers padded"]
    rows = []
    for name in runs:
        s = seconds[name]
        rows.append({"impl": name, "batches": len(packed) if name == "pyllm packed" else len(padded),
                     "s/epoch": round(s, 2), "real tokens/s": round(real[name] / s),
                     "padding": f"{1 - real[name] / positions[name]:.0%}",
                     "vs transformers": f"{peer * real[name] / (s * real['transformers padded']):.2f}x",
                     **common.spread(s)})
    print(f"# SFT epoch on {common.device_description(args.device)}: {config.num_hidden_layers} layers, {args.dtype}, "
          f"{n_conv} conversations, {lengths.sum()} tokens (mean {lengths.mean():.0f}, max {lengths.max()}), packed "
          f"{args.rows} x {args.seq_len} (padding {in_order:.0%} when packed strictly in order), padded {per_batch} "
          f"per batch, transformers {transformers.__version__}"
          + (f", LoRA rank {args.lora} (PEFT {peft_version})" if args.lora else "")
          + (" on the experts too" if args.lora and args.moe and args.lora_experts else "")
          + (f", {args.moe.split(',')[0]} experts, {args.moe.split(',')[1]} per token" if args.moe else ""))
    common.print_table(rows, ["impl", "batches", "s/epoch", "real tokens/s", "padding", "vs transformers"])
    if next_epoch_tokens:
        print(f"# pyllm packed's last batch also trains {next_epoch_tokens} tokens of the next epoch's first conversations "
              f"({next_epoch_tokens / lengths.sum():.1%} of an epoch): in its s/epoch and its real tokens/s")
    common.write_json(args.json, ("sft_lora" if args.lora else "sft") + ("_moe" if args.moe else ""), args.device, rows, {
        "moe": args.moe,
        "layers": config.num_hidden_layers, "dtype": args.dtype, "conversations": n_conv, "tokens": int(lengths.sum()),
        "padding_packed_in_order": round(in_order, 3), "packed_next_epoch_tokens": next_epoch_tokens,
        "seq_len": args.seq_len, "rows": args.rows, "per_padded_batch": per_batch, "transformers": transformers.__version__,
        "lora_rank": args.lora, "peft": peft_version, "lora_experts": bool(args.lora and args.moe and args.lora_experts)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
