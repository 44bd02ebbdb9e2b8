"""A mixture-of-experts layer: pyllm's nn.MoEMLP vs transformers' Qwen3-MoE block, one process.

The same router and expert weights in both, bf16, side by side: a training step's forward +
backward (input and weight gradients) over a micro-batch of tokens, a prefill's forward, and
decoding's forward of a few tokens. transformers is measured with each of its expert
implementations that runs here (eager: a loop over the experts hit; grouped_mm, its default:
torch's grouped GEMM; batched_mm: each token's expert weights gathered, for decoding only). Shape: OLMoE-1B-7B's routing (64 experts,
8 per token) at half its width (dim 1024, expert hidden 512) by default, so that a 2-core machine
runs it in seconds. FLOP/s count the matmuls of the experts a token goes through (forward 6 * dim
* hidden per token and choice, forward + backward 3x that). "vs transformers" is the fastest
transformers implementation's time over the row's (the other scripts' convention; speedup_of_pyllm,
kept, is the row's time over pyllm's); max_rel_diff is against transformers eager, or where that did
not run the first implementation that did (named under the table). transformers' blocks with stacked
expert weights need transformers >= 5.

--lora R: LoRA fine-tuning of the experts instead (training and prefill): the experts frozen, each
with rank-R updates of its own on both projections, the same values on both sides: pyllm's
MoEMLP.add_lora (the low-rank products as their own matmuls per expert) vs PEFT's target_parameters
(its ParamWrapper, injected into transformers' block: B A merged into the expert stacks each
forward, the gradient taken through them). FLOP/s still count the frozen experts' matmuls alone, at
4 FLOPs per weight and token in training (2 forward, 2 for the input's gradient; no weight gradient:
pyllm's rule for frozen weights, LLM.flops_per_token; files before 2026-12-06 counted 6).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm.nn import MoEMLP  # noqa: E402


def their_block(transformers, ours: MoEMLP, implementation: str):
    cfg = transformers.Qwen3MoeConfig(hidden_size=ours.dim, moe_intermediate_size=ours.hidden_dim,
                                      num_experts=ours.n_experts, num_experts_per_tok=ours.top_k,
                                      norm_topk_prob=ours.norm_topk_prob, experts_implementation=implementation)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block = Qwen3MoeSparseMoeBlock(cfg).to(ours.gate_up.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.gate_up)
        block.experts.down_proj.copy_(ours.down)
    return block


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of a training micro-batch / prefill")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank of the experts' updates (0: full training)")
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_moe", "transformers is not installed: no peer to measure")
    if transformers is None:
        return 0
    device, dtype = args.device, torch.bfloat16
    torch.manual_seed(0)
    ours = MoEMLP(args.dim, args.hidden, args.experts, args.top_k, norm_topk_prob=False).to(device, dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    impls = {"pyllm": ours}
    for name in ("eager", "grouped_mm", "batched_mm"):
        try:
            impls[f"transformers {name}"] = their_block(transformers, ours, name).to(device)
        except (AttributeError, TypeError, ImportError) as e:  # transformers 4.x: a ModuleList of experts
            print(f"bench_moe: transformers {transformers.__version__}'s Qwen3-MoE block cannot take the stacked "
                  f"expert weights (transformers >= 5 needed for this peer): {type(e).__name__}: {str(e)[:80]}")
            break
    if len(impls) == 1:
        return 0
    peft_version = None
    if args.lora:
        peft = common.peer_module("peft", "bench_moe", "--lora compares with PEFT, which is not installed")
        if peft is None:
            return 0
        peft_version = peft.__version__
        ours.add_lora(args.lora, 2.0 * args.lora)
        with torch.no_grad():
            for name in ("gate_up", "down"):
                getattr(ours, f"{name}_lora_b").normal_(0, 0.02)
        for name, block in list(impls.items())[1:]:
            block.requires_grad_(False)
            impls[name] = block = peft.inject_adapter_in_model(peft.LoraConfig(
                r=args.lora, lora_alpha=2 * args.lora, target_modules=[],
                target_parameters=["experts.gate_up_proj", "experts.down_proj"]), block)
            with torch.no_grad():  # PEFT's layout: A (E r, in), B (out, r E) with expert e's column j at j E + e
                for wrapper in (m for m in block.modules() if type(m).__name__ == "ParamWrapper"):
                    a, b = getattr(ours, f"{wrapper.parameter_name.removesuffix('_proj')}_lora_a"), \
                        getattr(ours, f"{wrapper.parameter_name.removesuffix('_proj')}_lora_b")
                    wrapper.lora_A["default"].weight.copy_(a.reshape(-1, a.shape[2]))
                    wrapper.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
            block.to(device, dtype)
    print(f"# MoE layer on {common.device_description(device)}: dim {args.dim}, {args.experts} experts of "
          f"{args.hidden}, {args.top_k} per token, bf16"
          + (f", LoRA rank {args.lora} on every expert (PEFT {peft_version})" if args.lora else ""))
    rows, notes = [], []
    modes = (("train fwd+bwd", args.tokens), ("prefill fwd", args.tokens), ("decode fwd", 1), ("decode fwd", 8))
    for mode, tokens in modes[:2] if args.lora else modes:
        if args.quick and tokens == args.tokens and mode == "prefill fwd" and not args.lora:
            continue
        x = torch.randn(1, tokens, args.dim, device=device, dtype=dtype)
        runs, outs, failed = {}, {}, {}
        for name, block in impls.items():
            if name == "transformers batched_mm" and tokens > 64:  # made for decoding: 35 s a step at 512 tokens
                failed[name] = "not run: gathers every token's expert weights (made for a few tokens)"
                continue
            def run(block=block, name=name):
                if mode == "train fwd+bwd":
                    xg = x.detach().requires_grad_()
                    out = block(xg)
                    out.float().square().sum().backward()
                    for p in block.parameters():
                        p.grad = None
                else:
                    with torch.no_grad():
                        out = block(x)
                outs[name] = out.detach()
            try:
                run()
            except Exception as e:  # an implementation that does not run on this device / dtype
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                continue
            runs[name] = run
        repeat = args.repeat if tokens > 1 else 10 * args.repeat
        seconds = common.interleaved_seconds(runs, repeat, device)
        # per weight and token: 2 forward, 2 for the input's gradient, 2 for the weight's (not when frozen)
        per_weight = (4 if args.lora else 6) if mode.startswith("train") else 2
        flops = per_weight * 3 * args.dim * args.hidden * tokens * args.top_k
        base = seconds["pyllm"]
        peers = [name for name in runs if name != "pyllm"]
        reference = next((name for name in peers if name == "transformers eager"), peers[0] if peers else None)
        if reference not in (None, "transformers eager"):
            notes.append(f"{mode} {tokens}: transformers eager did not run; max_rel_diff against {reference}")
        fastest = min((seconds[name] for name in peers), default=None)
        for name in impls:
            row = {"mode": mode, "tokens": tokens, "impl": name}
            if name in failed:
                row["error"] = failed[name]
            else:
                row.update(ms=round(seconds[name] * 1e3, 3), gflops=round(flops / seconds[name] / 1e9, 1),
                           speedup_of_pyllm=round(seconds[name] / base, 2), **common.spread(seconds[name], 1e3))
                if fastest is not None:
                    row["vs transformers"] = f"{fastest / seconds[name]:.2f}x"
                if reference is not None:
                    ref = outs[reference].float()
                    row.update(max_rel_diff=float(f"{((outs[name].float() - ref).abs().max() / ref.abs().max()).item():.2e}"),
                               diff_against=reference)
            rows.append(row)
    common.print_table(rows, ["mode", "tokens", "impl", "ms", "gflops", "vs transformers", "speedup_of_pyllm",
                              "max_rel_diff", "error"])
    for note in notes:
        print(f"# {note}")
    common.write_json(args.json, "moe_lora" if args.lora else "moe", device, rows, {
        "dim": args.dim, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k, "dtype": "bf16",
        "transformers": transformers.__version__, "lora_rank": args.lora, "peft": peft_version,
        "flops_per_weight_train": 4 if args.lora else 6})
    return 0


if __name__ == "__main__":
    sys.exit(main())
