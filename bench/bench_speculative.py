"""Speculative decoding: pyllm's generate_speculative vs transformers' assisted generation, each vs its own plain decoding.

One prompt, greedy, --new-tokens tokens, the same weights on both sides: a target LlamaForCausalLM in
SmolLM2-135M's shape with --layers layers (--quick: 8), and a draft made of its first --draft-layers
layers (1) with its embeddings and output layer. The target's later layers have their output
projections (o_proj, down_proj) scaled by --perturb (0.05), so the target computes about what its
first layers do: the draft agrees with it on most tokens, at a fraction of its cost, as a good
draft model does (random weights give no draft that agrees otherwise). Greedy speculative decoding
returns the target's own tokens on both sides (checked). Rows: tokens/s of plain decoding and of
speculative decoding with --draft-tokens tokens a round (transformers: num_assistant_tokens with
the constant schedule), the share of drafted tokens kept, and each side's speedup over its own
plain decoding; median of --repeat, interleaved. Needs transformers; prints why and exits 0 without it.
"""
from __future__ import annotations

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
    parser.add_argument("--layers", type=int, default=0, help="the target's layers (default 30; --quick: 8)")
    parser.add_argument("--draft-layers", type=int, default=1)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=0, help="default 128 (--quick: 48)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--perturb", type=float, default=0.05)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_speculative",
                                      "transformers is not installed; nothing to compare with")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    layers, new = args.layers or (8 if args.quick else 30), args.new_tokens or (48 if args.quick else 128)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = common.smollm2_config(transformers, layers, attn_implementation="sdpa")
    target = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in target.model.layers[args.draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(args.perturb)
            layer.mlp.down_proj.weight.mul_(args.perturb)
    draft = transformers.LlamaForCausalLM(common.smollm2_config(transformers, args.draft_layers, attn_implementation="sdpa"))
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("model.layers.") or int(k.split(".")[2]) < args.draft_layers})
    ours = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in (("target", target), ("draft", draft)):
            model.save_pretrained(f"{folder}/{name}")
            ours[name] = LLM.from_hf(f"{folder}/{name}").to(args.device, dtype).eval()
    target, draft = target.to(args.device, dtype).eval(), draft.to(args.device, dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device=args.device)
    k = args.draft_tokens
    out, kept = {}, {}

    def pyllm_plain():
        out["pyllm plain"] = ours["target"].generate(prompt, new, temperature=0)[0, args.prompt:].tolist()

    def pyllm_speculative():
        stats = {}
        out["pyllm speculative"] = [int(t) for t in ours["target"].generate_speculative(
            prompt, ours["draft"], new, temperature=0, draft_tokens=k, stats=stats)]
        kept["pyllm speculative"] = stats["accepted"] / stats["drafted"]

    def hf(assisted: bool):
        def run():
            extra = {}
            if assisted:
                draft.generation_config.num_assistant_tokens = k
                draft.generation_config.num_assistant_tokens_schedule = "constant"
                draft.generation_config.assistant_confidence_threshold = 0.0
                extra = dict(assistant_model=draft)
            with torch.no_grad():
                ids = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0, **extra)
            out["transformers " + ("assisted" if assisted else "plain")] = ids[0, args.prompt:].tolist()
        return run

    runs = {"pyllm plain": pyllm_plain, "pyllm speculative": pyllm_speculative,
            "transformers plain": hf(False), "transformers assisted": hf(True)}
    for run in runs.values():  # warm-up
        run()
    seconds = common.interleaved_seconds(runs, args.repeat, args.device)
    assert out["pyllm speculative"] == out["pyllm plain"], "greedy speculative decoding left the target's tokens"
    assert out["transformers assisted"] == out["transformers plain"]
    agree = sum(a == b for a, b in zip(out["pyllm plain"], out["transformers plain"])) / new
    rows = []
    for name, s in seconds.items():
        plain = seconds[name.split()[0] + " plain"]
        rows.append({"impl": name, "tokens/s": round(new / s, 1), "kept": f"{kept[name]:.0%}" if name in kept else "",
                     "vs its plain": f"{plain / s:.2f}x", "vs transformers assisted": f"{seconds['transformers assisted'] / s:.2f}x",
                     **common.spread(s)})
    print(f"# greedy speculative decoding on {common.device_description(args.device)}: target {layers} layers, draft "
          f"{args.draft_layers}, {args.dtype}, prompt {args.prompt}, {new} new tokens, {k} drafted a round, perturb "
          f"{args.perturb}; pyllm and transformers agree on {agree:.0%} of the greedy tokens; transformers "
          f"{transformers.__version__}")
    common.print_table(rows, ["impl", "tokens/s", "kept", "vs its plain", "vs transformers assisted"])
    common.write_json(args.json, "speculative", args.device, rows, {
        "layers": layers, "draft_layers": args.draft_layers, "draft_tokens": k, "new_tokens": new, "prompt": args.prompt,
        "perturb": args.perturb, "dtype": args.dtype, "agree": agree, "transformers": transformers.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
