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
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_generate",
                                      "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    config = common.smollm2_config(transformers, 6 if args.quick else 30)
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = LLM.from_hf(folder).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        models = {"pyllm": ours.to(args.device, dtype), "transformers": theirs.to(args.device, dtype)}
        x = prompt.to(args.device)
        runs = {
            "pyllm": lambda: models["pyllm"].generate(x, args.new_tokens, temperature=0),
            "transformers": lambda: models["transformers"].generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0),
        }
        if args.device.startswith("cuda"):  # each token one graph replay (unverified until a GPU run)
            runs["pyllm cuda-graph"] = lambda: models["pyllm"].generate(x, args.new_tokens, temperature=0,
                                                                        cuda_graph=True)
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
        same = torch.equal(outputs["pyllm"], outputs["transformers"])
        if "pyllm cuda-graph" in outputs:  # the graph must give the eager steps' tokens
            same = f"{same}, graph {torch.equal(outputs['pyllm cuda-graph'], outputs['pyllm'])}"
        peer = statistics.median(seconds["transformers"])
        for name in runs:
            s = statistics.median(seconds[name])
            rows.append({"dtype": str(dtype).removeprefix("torch."), "impl": name, "s": round(s, 3),
                         "tokens/s": round(args.new_tokens / s, 1), "vs transformers": f"{peer / s:.2f}x",
                         "same tokens": same})
    print(f"# generate on {common.device_description(args.device)}: {config.num_hidden_layers} layers, "
          f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, transformers {transformers.__version__}")
    common.print_table(rows, ["dtype", "impl", "s", "tokens/s", "vs transformers", "same tokens"])
    common.write_json(args.json, "generate", args.device, rows, {
        "layers": config.num_hidden_layers, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "transformers": transformers.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
