"""Multiple-choice evaluation (HellaSwag-shaped): packed candidates vs lm-evaluation-harness's batches.

Scoring every candidate (a context followed by one of its endings: the ending's summed
log-probability) of the same examples with the same weights (a LlamaForCausalLM with random weights
in SmolLM2-135M's shape, 30 layers (--layers; --quick: 4), read by pyllm.model.LLM.from_hf), no grad:
- pyllm packed: pyllm.evaluate.score_choice_files: candidates packed into rows of --seq-len tokens,
  each attending to itself alone (varlen attention).
- transformers sorted: what lm-evaluation-harness does with a Hugging Face model: the candidates
  sorted by length, longest first, in batches of --batch-size padded to their longest (right
  padding, attention_mask), the logits' log-softmax gathered at each ending's tokens.
Both give the same scores (checked: the largest difference is printed). Examples are drawn like
HellaSwag's validation set: contexts of log-normal length around --mean-context tokens, 4 endings
around --mean-ending. Rows: seconds (median of --repeat, interleaved), candidates/s, padding share
(the computed positions not holding a candidate's first scoring: pyllm's last batch may score the
next pass's first candidates again, counted as padding since 2026-12-06).
Needs transformers; prints why and exits 0 without it.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm import data  # noqa: E402
from pyllm.evaluate import score_choice_files  # noqa: E402
from pyllm.model import LLM  # noqa: E402


def sorted_batches(docs, masks, batch_size):
    """lm-evaluation-harness's order: longest first, batches padded to their longest."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    batches = []
    for i in range(0, len(order), batch_size):
        group = order[i:i + batch_size]
        T = len(docs[group[0]])
        x = torch.zeros(len(group), T, dtype=torch.long)
        attn = torch.zeros(len(group), T, dtype=torch.long)
        keep = torch.zeros(len(group), T, dtype=torch.bool)
        for r, d in enumerate(group):
            n = len(docs[d])
            x[r, :n], attn[r, :n], keep[r, :n] = torch.from_numpy(docs[d]), 1, torch.from_numpy(masks[d] == 1)
        batches.append((x, attn, keep, group))
    return batches


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=0, help="default 64 (--quick: 24)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward, both sides")
    parser.add_argument("--mean-context", type=int, default=80)
    parser.add_argument("--mean-ending", type=int, default=30)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--layers", type=int, default=0, help="default 30, SmolLM2-135M's (--quick: 4)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_eval", "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    n_examples = args.examples or (24 if args.quick else 64)
    config = common.smollm2_config(transformers, args.layers or (4 if args.quick else 30), attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rng = np.random.default_rng(0)
    docs, masks, labels, sizes = [], [], [], []
    for _ in range(n_examples):
        context = rng.integers(0, config.vocab_size, int(np.clip(rng.lognormal(np.log(args.mean_context), 0.5), 8, 400)))
        for _ in range(4):
            ending = rng.integers(0, config.vocab_size, int(np.clip(rng.lognormal(np.log(args.mean_ending), 0.5), 2, 200)))
            docs.append(np.concatenate([context, ending]))
            masks.append((np.arange(len(docs[-1])) >= len(context)).astype(np.uint8))
        labels.append(int(rng.integers(4)))
        sizes.append([4 * int(m.sum()) for m in masks[-4:]])  # ~4 bytes a token
    lengths = np.array([len(d) for d in docs])
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LLM.from_hf(folder)
        path = Path(folder) / "choices.bin"
        path.with_suffix(".choices.json").write_text(json.dumps({"labels": labels, "bytes": sizes}))
        data.write_documents(path, docs, masks, config.vocab_size)
        ours, theirs = ours.to(args.device, dtype).eval(), theirs.to(args.device, dtype).eval()
        batches = sorted_batches(docs, masks, args.batch_size)
        scores = {}

        @torch.no_grad()
        def pyllm_packed():
            scores["pyllm"] = score_choice_files(ours, path, args.seq_len, args.batch_size)["logps"]

        @torch.no_grad()
        def transformers_sorted():
            out = np.zeros(len(docs))
            for x, attn, keep, group in batches:
                x, attn, keep = x.to(args.device), attn.to(args.device), keep.to(args.device)
                logp = F.log_softmax(theirs(input_ids=x, attention_mask=attn).logits[:, :-1].float(), -1)
                token = torch.gather(logp, 2, x[:, 1:, None])[..., 0]
                out[group] = (token * keep[:, 1:]).sum(-1).double().cpu().numpy()
            scores["transformers"] = out

        runs = {"pyllm packed": pyllm_packed, "transformers sorted": transformers_sorted}
        for run in runs.values():  # warm-up (and the scores compared below)
            run()
        seconds = common.interleaved_seconds(runs, args.repeat, args.device)
        packed = data.PackedLoader(path, args.batch_size, args.seq_len, shuffle=False)
        # document_logps' pass: its last batch may hold the next epoch's first candidates, scored again and
        # discarded: only each candidate's first placing is real
        scored, rows = set(), 0
        while True:
            packed.next_batch()
            rows += args.batch_size
            scored.update(d for d in packed.docs if d >= 0)
            if packed.epoch > 0 or (packed.cursor == packed.units and not packed.waiting):
                break
        assert scored == set(range(len(docs))), "the packed pass left candidates out"
    positions = {"pyllm packed": rows * args.seq_len, "transformers sorted": sum(b[0].numel() for b in batches)}
    real = {name: int(lengths.sum()) for name in positions}
    peer = seconds["transformers sorted"]
    rows_out = []
    for name in runs:
        s = seconds[name]
        rows_out.append({"impl": name, "s": round(s, 2), "candidates/s": round(len(docs) / s, 1),
                         "padding": f"{1 - real[name] / positions[name]:.0%}", "vs transformers": f"{peer / s:.2f}x",
                         **common.spread(s)})
    diff = float(np.abs(scores["pyllm"] - scores["transformers"]).max() / np.abs(scores["transformers"]).max())
    print(f"# multiple-choice scoring on {common.device_description(args.device)}: {config.num_hidden_layers} layers, "
          f"{args.dtype}, {n_examples} examples x 4 endings, {lengths.sum()} tokens (candidates of mean "
          f"{lengths.mean():.0f}, max {lengths.max()}), rows {args.batch_size} x {args.seq_len} packed, batches of "
          f"{args.batch_size} sorted; largest score difference {diff:.1e} of the largest score, transformers "
          f"{transformers.__version__}")
    common.print_table(rows_out, ["impl", "s", "candidates/s", "padding", "vs transformers"])
    common.write_json(args.json, "eval", args.device, rows_out, {
        "layers": config.num_hidden_layers, "dtype": args.dtype, "examples": n_examples, "tokens": int(lengths.sum()),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "max_score_difference": diff,
        "transformers": transformers.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
