"""A transformers model trained as it is, with and without pyllm.hf.apply_pyllm_kernels (and with
Liger-Kernel's apply_liger_kernel_to_llama where it is installed), side by side in one process.

The model: LlamaForCausalLM with random weights in SmolLM2-135M's shape (common.smollm2_config;
--layers, 30 in the real one, --quick: 2), one forward + backward with labels per step (the
optimizer costs the same on every side and is left out). --family gemma2: Gemma2ForCausalLM in that
width with Gemma 2's vocabulary (256,000), caps (scores 50, logits 30) and alternating 4,096-key
windows, on transformers' eager attention (the one that caps scores), where the fused loss's saving
is largest. Batches, each --batch x --seq-len tokens:
- padded: rows of random lengths from seq-len / 4 to seq-len, right-padded, labels -100 on the
  padding (DataCollatorWithPadding's batches): transformers' SDPA takes a (B, 1, T, T) mask, pyllm's
  attention drops the padding and runs one varlen call;
- packed: the same rows' tokens back to back in one row, position_ids restarting at each
  (TRL's padding_free): transformers builds a block-diagonal mask for SDPA (only without a cache:
  use_cache=False), pyllm reads the documents off position_ids.
Rows: median seconds per step (the contenders interleaved, --repeat rounds), real tokens / s, the
peak memory of one step above the model's (CPU: the process's peak resident set, CUDA: the
allocator's), and the ratio to transformers' own. Each model takes one untimed step per batch first;
its loss there must match transformers' own (relative difference at most 1e-4 in fp32, 2e-2 in
bf16), or the run stops: a fast wrong patch gets no ratio. --compile: each model under torch.compile
(inductor), compiled in that first step, with the number of graph breaks dynamo counted in it.
Needs transformers; prints why and exits 0 without it.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def batches(batch: int, seq_len: int, vocab: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), generator=g)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    flat = ids[mask.bool()][None]  # (1, sum of lengths)
    packed = {"input_ids": flat, "labels": flat.clone(),
              "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
              "use_cache": False}  # transformers parts the documents only without a cache (masking_utils)
    to = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    return {"padded": to(padded), "packed": to(packed)}, int(lengths.sum())


def gemma2_config(transformers, layers: int):
    """Gemma 2 2B's vocabulary, caps, windows and norms in SmolLM2-135M's width (576, 9 query / 3 KV
    heads of 64, MLP 1536), so that a CPU runs it: the output layer is 147M of its weights."""
    return transformers.Gemma2Config(
        vocab_size=256000, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, query_pre_attn_scalar=64, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
        tie_word_embeddings=True)


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--layers", type=int, default=None, help="default 4 (--quick: 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="the weights' dtype; default float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="each model under torch.compile")
    parser.add_argument("--family", choices=["llama", "gemma2"], default="llama",
                        help="llama: SmolLM2-135M's shape; gemma2: that width with Gemma 2's vocabulary and caps")
    args = parser.parse_args()
    transformers = common.peer_module("transformers", "bench_hf", "transformers is not installed: nothing to compare")
    if transformers is None:
        return 0
    import pyllm.hf

    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    layers = args.layers or (2 if args.quick else 4)
    if args.family == "gemma2":
        config = gemma2_config(transformers, layers)
        config._attn_implementation = "eager"  # SDPA cannot cap the scores
        model_class = transformers.Gemma2ForCausalLM
    else:
        config = common.smollm2_config(transformers, layers)
        config._attn_implementation = "sdpa"
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    models = {"transformers": model_class(config).to(device, dtype).train()}
    models["transformers+pyllm"] = copy.deepcopy(models["transformers"])
    applied = pyllm.hf.apply_pyllm_kernels(models["transformers+pyllm"])
    try:
        import liger_kernel.transformers as liger
        models["transformers+liger"] = copy.deepcopy(models["transformers"])
        getattr(liger, f"apply_liger_kernel_to_{args.family}")(model=models["transformers+liger"])
    except ImportError:
        print("# skipped: liger_kernel not installed: no transformers+liger rows")

    inputs, real_tokens = batches(args.batch, args.seq_len, config.vocab_size, device)
    shape = "SmolLM2-135M shape" if args.family == "llama" else "Gemma 2 in SmolLM2-135M's width"
    print(f"# bench_hf on {common.device_description(device)}: {shape}, {layers} layers, {dtype}, "
          f"{args.batch} x {args.seq_len} tokens per step ({real_tokens} real), pyllm applied: {applied}"
          + (", torch.compile" if args.compile else ""))
    rows = []
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # the losses' relative difference
    for layout, batch in inputs.items():
        def step(model, forward, batch=batch):
            loss = forward(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()
        forwards, breaks, losses = dict(models), {}, {}
        for name, model in models.items():  # one untimed step each (warm-up; under --compile, the compile)
            before = sum(torch._dynamo.utils.counters["graph_break"].values())
            if args.compile:
                forwards[name] = torch.compile(model)
            losses[name] = float(step(model, forwards[name]))
            breaks[name] = sum(torch._dynamo.utils.counters["graph_break"].values()) - before
        print(f"# {layout}: first-step losses " + ", ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
        diff = abs(losses["transformers+pyllm"] - losses["transformers"]) / abs(losses["transformers"])
        if not diff <= tolerance:
            raise RuntimeError(f"{layout} batch: transformers+pyllm's loss {losses['transformers+pyllm']:.6f} differs from "
                               f"transformers' {losses['transformers']:.6f} by {diff:.1e} (more than {tolerance:g} in "
                               f"{dtype}): not timed")
        runs = {name: (lambda m=model, f=forwards[name]: step(m, f)) for name, model in models.items()}
        seconds = common.interleaved_seconds(runs, args.repeat, device)
        base = seconds["transformers"]
        for name, model in models.items():
            peak = common.peak_memory_mb(lambda m=model, f=forwards[name]: step(m, f), device)
            rows.append({"batch": layout, "model": name, "s/step": round(seconds[name], 4),
                         "tokens/s": round(real_tokens / seconds[name]), "peak MiB": round(peak, 1),
                         "speed vs transformers": round(base / seconds[name], 2), "first loss": losses[name],
                         **({"graph breaks": breaks[name]} if args.compile else {}), **common.spread(seconds[name])})
    common.print_table(rows, ["batch", "model", "s/step", "tokens/s", "peak MiB", "speed vs transformers"]
                       + (["graph breaks"] if args.compile else []))
    common.write_json(args.json, "hf", device, rows,
                      {"family": args.family, "layers": layers, "dtype": str(dtype), "batch": args.batch,
                       "seq_len": args.seq_len, "vocab_size": config.vocab_size,
                       "transformers": transformers.__version__, "applied": applied, "compile": args.compile})
    return 0


if __name__ == "__main__":
    sys.exit(main())
