"""Per-example gradients (differential privacy, gradient-noise and data-attribution studies):
pyllm's model vs the same model in plain PyTorch (bench_train.PlainLLM: SDPA, eager SwiGLU and
RMSNorm), each two ways, in one process:

  torch.func   vmap over the examples of grad(functional_call(model)): one batched pass. pyllm's
               ops take it through their batching rules (one kernel call over every example where
               the op allows), the plain model through torch's own rules.
  loop         one forward and backward per example (what a trainer without torch.func does).

Same config, weights (their loss and gradients compared first), examples and process; median ms
per batch of per-example gradients (their values are tests/test_package.py's: torch.autograd's, example by example).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_train import PlainLLM, same_function  # noqa: E402

from pyllm.model import LLM, ModelConfig  # noqa: E402


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--examples", type=int, default=8, help="examples per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    B, T = args.examples, args.seq_len
    cfg = ModelConfig.from_preset(args.preset, block_size=max(T, ModelConfig.from_preset(args.preset).block_size))
    x = torch.randint(0, cfg.vocab_size, (B, 1, T + 1), device=device)
    idx, targets = x[..., :-1], x[..., 1:]  # (B, 1, T): one example per vmapped slice
    torch.manual_seed(0)
    ours = LLM(cfg).to(device)
    models = {"pyllm": ours, "plain torch": PlainLLM(cfg).to(device).load_pyllm(ours)}  # (the same weights)
    same_function(ours, models["plain torch"], idx[:, 0], targets[:, 0], "fp32", device)
    rows, times = [], {}
    for impl, model in models.items():
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params, idx, targets):
            return torch.func.functional_call(model, params, (idx, targets))[1]

        per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

        def loop():
            out = []
            for i in range(B):
                model.zero_grad(set_to_none=True)
                model(idx[i], targets[i])[1].backward()
                out.append({name: p.grad for name, p in model.named_parameters()})
            return out

        for method, fn in (("torch.func", lambda: per_example(params, idx, targets)), ("loop", loop)):
            ms = common.median_ms(fn, args.device, warmup=1, repeat=args.repeat, burst_ms=0)
            times[impl, method] = ms
            rows.append({"impl": impl, "method": method, "ms/batch": round(ms, 1),
                         "examples/s": round(B / ms * 1e3, 1), **common.spread(ms)})
    for r in rows:  # from unrounded times
        r["vs plain torch (same method)"] = f"{times['plain torch', r['method']] / times[r['impl'], r['method']]:.2f}x"
    common.print_table(rows, ["impl", "method", "ms/batch", "examples/s", "vs plain torch (same method)"])
    common.write_json(args.json, "per_example", args.device, rows,
                      {"preset": args.preset, "examples": B, "T": T})
    return 0


if __name__ == "__main__":
    sys.exit(main())
