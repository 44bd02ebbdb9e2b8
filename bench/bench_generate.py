"""Text generation with a KV cache, pyllm's model vs Hugging Face transformers on the same weights.

A LlamaForCausalLM with random weights in SmolLM2-135M's shape (30 layers, dim 576, 9 query / 3 KV
heads of 64, MLP 1536, vocab 49152; --quick: 6 layers) is saved with save_pretrained and read back
by pyllm.model.LLM.from_hf, so both sides hold the same numbers. Each generates greedily from the
same prompt, batch 1, with its own KV cache (transformers' generate, end-of-sequence off); rows give
tokens/s (prompt processing included, as a user waits for it), one process, the two interleaved,
median of repeats, in fp32 and bf16. "same tokens" says whether the greedy continuations agree
(bf16 rounding can make them part after a near-tie; fp32 should agree). On a GPU a third row,
"pyllm cuda-graph", replays each one-token step as a captured CUDA graph (generate(cuda_graph=True)),
its tokens checked against pyllm's eager steps.
Batch rows (--batch B, default 8): B prompts of different lengths at once, pyllm's generate_batch
(no padding: each row at its own position) vs transformers' generate on the left-padded batch (its
attention mask) and pyllm one prompt after another; tokens/s counts all rows' new tokens.
--moe E,K: a mixture of experts instead (Qwen3MoeForCausalLM, common.smollm2_moe_config; transformers
with its default experts implementation, grouped_mm).
--repetition-penalty R, --no-repeat-ngram-size N: every row (both sides) under that penalty / n-gram
ban (transformers' RepetitionPenaltyLogitsProcessor and NoRepeatNGramLogitsProcessor; pyllm's (B, V)
mask of each row's ids and its host-side table of each row's n-grams), their cost against none.
--temperature T (with --top-k, --top-p, --min-p): sampled rows instead of greedy, both sides from
one seed of torch's global generator before each run (one multinomial draw a token on each side:
fp32 gives the same tokens); the batch rows' transformers side samples its padded rows alike.
Needs transformers; prints why and exits 0 without it.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm.model import LLM  # noqa: E402


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="prompts in the ragged-batch rows (0: none)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="under this repetition penalty, both sides (default 1: none)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                        help="no N-gram twice, both sides (default 0: off)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature, both sides "
                        "from one seed (default 0: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="with --temperature: top-k (default 0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: top-p (default 1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="with --temperature: min-p (default 0: off)")
    parser.add_argument("--moe", metavar="E,K", help="a mixture of E experts, K per token (Qwen3-MoE), instead of "
                                                     "SmolLM2's MLP")
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_generate",
                                      "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    layers = 6 if args.quick else 30
    if args.moe:
        config = common.smollm2_moe_config(transformers, layers, *(int(v) for v in args.moe.split(",")))
        theirs = transformers.Qwen3MoeForCausalLM(config).eval()
    else:
        config = common.smollm2_config(transformers, layers)
        theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LLM.from_hf(folder).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    # The ragged batch: prompt lengths spread evenly from a quarter of --prompt-tokens to all of it.
    lengths = torch.linspace(max(1, args.prompt_tokens // 4), args.prompt_tokens, max(args.batch, 1)).long().tolist()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        models = {"pyllm": ours.to(args.device, dtype), "transformers": theirs.to(args.device, dtype)}
        x = prompt.to(args.device)
        ours_kw, theirs_kw = settings(args)
        runs = {
            "pyllm": seeded(lambda: models["pyllm"].generate(x, args.new_tokens, **ours_kw)),
            "transformers": seeded(lambda: models["transformers"].generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, pad_token_id=0, **theirs_kw)),
        }
        if args.device.startswith("cuda"):  # each token one graph replay (unverified until a GPU run)
            runs["pyllm cuda-graph"] = seeded(lambda: models["pyllm"].generate(x, args.new_tokens, cuda_graph=True,
                                                                               **ours_kw))
        rows += timed_rows(args, runs, dtype, 1, lambda out: torch.equal(out["pyllm"], out["transformers"]))
        if args.batch:
            rows += batch_rows(args, models, x, lengths, dtype)
    print(f"# generate on {common.device_description(args.device)}: {config.num_hidden_layers} layers, "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, transformers {transformers.__version__}; "
          f"B = {len(lengths)} rows: prompts of {lengths[0]}..{lengths[-1]} tokens"
          + (f"; {args.moe.split(',')[0]} experts, {args.moe.split(',')[1]} per token" if args.moe else "")
          + "".join(f"; {k} {v}" for k, v in settings(args)[1].items() if k != "do_sample"))
    common.print_table(rows, ["dtype", "B", "impl", "s", "tokens/s", "vs transformers", "same tokens"])
    common.write_json(args.json, "generate_moe" if args.moe else "generate", args.device, rows, {"moe": args.moe,
        "layers": config.num_hidden_layers, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "batch_prompt_tokens": lengths if args.batch else [], "transformers": transformers.__version__,
        "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "sampling": {k: v for k, v in settings(args)[1].items() if k in ("temperature", "top_k", "top_p", "min_p")}})
    return 0


def settings(args) -> tuple[dict, dict]:
    """generate()'s keyword arguments for pyllm and for transformers: the same rules and sampling (the
    settings left at their defaults left out of the second, transformers' top_k 50 turned off by 0)."""
    ours = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p or None,
                repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    theirs = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        theirs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.min_p:
            theirs["min_p"] = args.min_p
    if args.repetition_penalty != 1:
        theirs["repetition_penalty"] = args.repetition_penalty
    if args.no_repeat_ngram_size:
        theirs["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    return ours, theirs


def seeded(run):
    """run, torch's global generator seeded before it: each side's samples from the same seed."""
    def again():
        torch.manual_seed(0)
        return run()
    return again


def timed_rows(args, runs: dict, dtype, batch: int, same_of) -> list[dict]:
    """Median seconds of each run (interleaved, after a warm-up whose outputs same_of compares);
    tokens/s counts batch * --new-tokens new tokens."""
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the tokens compared
    seconds = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, run in runs.items():
            common.sync(args.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                run()
            common.sync(args.device)
            seconds[name].append(time.perf_counter() - t0)
    same = same_of(outputs)
    graph = next((name for name in outputs if "cuda-graph" in name), None)
    if graph is not None:  # the graph must give the eager steps' tokens
        ours, eager = outputs[graph], outputs[graph.removesuffix(" cuda-graph")]
        same = f"{same}, graph {ours == eager if isinstance(ours, list) else torch.equal(ours, eager)}"
    peer = statistics.median(seconds[next(name for name in runs if name.startswith("transformers"))])
    rows = []
    for name in runs:
        s = common.timing(seconds[name])
        rows.append({"dtype": str(dtype).removeprefix("torch."), "B": batch, "impl": name, "s": round(s, 3),
                     "tokens/s": round(batch * args.new_tokens / s, 1), "vs transformers": f"{peer / s:.2f}x",
                     "same tokens": same, **common.spread(s)})
    return rows


def batch_rows(args, models: dict, x, lengths: list[int], dtype) -> list[dict]:
    """Prompts of different lengths at once: pyllm's generate_batch (each row at its own position, no
    padding) vs transformers' generate on the left-padded batch (its attention mask), and pyllm's
    generate on one prompt after another."""
    prompts = [x[0, :n] for n in lengths]
    longest = max(lengths)
    ours_kw, theirs_kw = settings(args)
    padded = torch.zeros(len(lengths), longest, dtype=torch.long, device=x.device)
    mask = torch.zeros_like(padded)
    for b, n in enumerate(lengths):
        padded[b, longest - n:], mask[b, longest - n:] = prompts[b], 1
    runs = {
        "pyllm batch": seeded(lambda: models["pyllm"].generate_batch(prompts, args.new_tokens, **ours_kw)),
        "pyllm one by one": seeded(lambda: [models["pyllm"].generate(p[None], args.new_tokens, **ours_kw)[0, len(p):]
                                            .tolist() for p in prompts]),
        "transformers padded": seeded(lambda: models["transformers"].generate(
            padded, attention_mask=mask, max_new_tokens=args.new_tokens, pad_token_id=0, **theirs_kw)),
    }
    if args.device.startswith("cuda"):
        runs["pyllm batch cuda-graph"] = seeded(lambda: models["pyllm"].generate_batch(
            prompts, args.new_tokens, cuda_graph=True, **ours_kw))

    def same(outputs):  # pyllm's rows against the new tokens of transformers' rows
        return outputs["pyllm batch"] == outputs["transformers padded"][:, longest:].tolist()

    return timed_rows(args, runs, dtype, len(lengths), same)


if __name__ == "__main__":
    sys.exit(main())
