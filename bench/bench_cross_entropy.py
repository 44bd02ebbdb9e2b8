"""The output layer's loss, ours (pyllm.nn.linear_cross_entropy: logits a chunk of rows at a time,
gradients computed in the forward) vs torch as models write it (x @ W^T, then F.cross_entropy on the
whole (N, V) logits) vs torch.compile of that (vs Liger-Kernel's fused linear cross-entropy on the
GPU when installed). Then the loss alone on given logits (N, V): pyllm.cross_entropy vs
F.cross_entropy on them in fp32 (what autocast runs) vs torch.compile of it (vs Liger's
cross-entropy on the GPU). Then the per-token log-probabilities of a sequence-level loss (DPO's,
GRPO's): pyllm.nn.linear_token_logps (chunked, the backward recomputing each chunk's logits) vs
log_softmax of the whole logits then gather, each row's log-probability times a random weight; and
the same with a frozen head (LoRA's: the gradient of x alone; pyllm keeps d logp / dx from the
forward instead of recomputing). Then DPO's loss over pairs of 64-row sequences (rows / 64 sequences,
a random reference log-probability each): pyllm.nn.linear_sequence_loss (whole pairs per chunk,
the gradients made in the forward: three matmuls of the head) vs linear_token_logps then the loss
on the sums (four) vs torch on the whole logits vs torch.compile of that.

One process, same inputs, side by side: forward and backward (the gradients of x and W, what
training needs), the mean over N rows with 1 in 8 targets ignored; plain cross-entropy and with
PaLM's z-loss (1e-4 * logsumexp^2, Liger's lse_square_scale). Times are medians of interleaved
rounds; peak memory is what one step adds above its inputs (CPU: the process's resident set). The
default shape is SmolLM2-135M's output layer (width 576, vocabulary 49,152); --rows is B * T.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyllm  # noqa: E402
from pyllm.nn import linear_cross_entropy, linear_sequence_loss, linear_token_logps  # noqa: E402

Z = 1e-4  # PaLM's z-loss coefficient


def torch_loss(x, weight, targets, z_loss):
    """The unfused loss as a model computes it: the logits whole, in fp32 for the softmax."""
    return torch_ce(x @ weight.t(), targets, z_loss)


def ours(x, weight, targets, z_loss):
    return linear_cross_entropy(x, weight, targets, z_loss=z_loss) / (targets != -1).sum()


def liger_fn():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    losses = {}

    def loss(x, weight, targets, z_loss):
        if z_loss not in losses:
            losses[z_loss] = LigerFusedLinearCrossEntropyLoss(ignore_index=-1, lse_square_scale=z_loss)
        return losses[z_loss](weight, x, targets)
    return loss


def torch_ce(logits, targets, z_loss):
    """F.cross_entropy as autocast runs it: on logits widened to fp32."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, ignore_index=-1)
    if z_loss:
        valid = targets != -1
        loss = loss + z_loss * (torch.logsumexp(logits, -1).square() * valid).sum() / valid.sum()
    return loss


def ours_ce(logits, targets, z_loss):
    return pyllm.cross_entropy(logits, targets, ignore_index=-1, z_loss=z_loss)


def torch_logps(x, weight, targets, row_weights):
    """Each target's log-probability from the whole logits in fp32, weighted and summed."""
    logits = (x @ weight.t()).float()
    logps = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0] * (targets != -1)
    return (logps * row_weights).sum()


def ours_logps(x, weight, targets, row_weights):
    return (linear_token_logps(x, weight, targets) * row_weights).sum()


SEQUENCE_ROWS = 64  # rows (trained tokens) per sequence in the DPO rows


def dpo_of(logps, reference):
    """DPO's summed loss of pairs (chosen, rejected) of sequence log-probabilities, beta 0.1."""
    ratio = logps - reference.to(logps)
    return -F.logsigmoid(0.1 * (ratio[0::2] - ratio[1::2])).sum()


def sequence_sums(token_logps, n_sequences):
    return token_logps.view(n_sequences, -1).sum(-1)


def torch_dpo(x, weight, targets, reference):
    logits = (x @ weight.t()).float()
    logps = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0] * (targets != -1)
    return dpo_of(sequence_sums(logps, reference.numel()), reference)


def ours_logps_dpo(x, weight, targets, reference):
    return dpo_of(sequence_sums(linear_token_logps(x, weight, targets), reference.numel()), reference)


def ours_fused_dpo(x, weight, targets, reference):
    n = reference.numel()
    return linear_sequence_loss(x, weight, targets, [x.shape[0] // n] * n, 2,
                                lambda logps, s0, s1: dpo_of(logps, reference[s0:s1]))[0]


def liger_ce_fn():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    losses = {}

    def loss(logits, targets, z_loss):
        if z_loss not in losses:
            losses[z_loss] = LigerCrossEntropyLoss(ignore_index=-1, lse_square_scale=z_loss)
        return losses[z_loss](logits, targets)
    # Liger writes the gradient over its input: measure() hands it a copy, made untimed before each call
    loss.overwrites_input = True
    return loss


def measure(impls: dict, inputs: tuple, targets, repeat: int, device: str, labels: dict,
            objectives=(("ce", 0.0), ("ce+z", Z))) -> list[dict]:
    """One row per impl and objective (name, the loss functions' last argument): fwd+bwd of the
    loss for the gradients of inputs, each impl's gradients checked against torch's before timing.
    An impl marked overwrites_input gets its own copy of inputs, refreshed untimed before every call."""
    copies = {name: [t.clone() for t in inputs] for name, fn in impls.items() if getattr(fn, "overwrites_input", False)}

    def refresh():
        for copy in copies.values():
            for c, t in zip(copy, inputs):
                c.copy_(t)

    rows = []
    for objective, z_loss in objectives:
        def step_of(fn, given, z_loss=z_loss):
            def step():
                leaves = [t.detach().requires_grad_() for t in given]
                return torch.autograd.grad(fn(*leaves, targets, z_loss), leaves)
            return step

        runs = {name: step_of(fn, copies.get(name, inputs)) for name, fn in impls.items()}
        refresh()
        expected = runs["torch"]()  # (each run once untimed: the warm-up, and compiles)
        for name, run in runs.items():  # the same gradients, or no ratio (a fast wrong result is not timed)
            refresh()
            got = run()
            if name != "torch":
                common.check_close(got, expected, f"{name} vs torch, {labels}, {objective}")
        seconds = common.interleaved_seconds(runs, repeat, device, before=refresh if copies else None)
        refresh()
        losses = {name: float(fn(*copies.get(name, inputs), targets, z_loss)) for name, fn in impls.items()}
        for name, run in runs.items():
            refresh()
            rows.append({**labels, "loss": objective, "impl": name, "ms": round(seconds[name] * 1e3, 1),
                         "peak MiB": round(common.peak_memory_mb(run, device)),
                         "vs torch": f"{seconds['torch'] / seconds[name]:.2f}x", "value": round(losses[name], 5),
                         **common.spread(seconds[name], 1e3)})
    return rows


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="B * T (default 8192 on CUDA, 1024 on the CPU)")
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default 15 on CUDA, 3 on the CPU)")
    args = parser.parse_args()
    device = args.device
    rows_n = args.rows or (8192 if device == "cuda" else 1024)
    repeat = args.repeat or (15 if device == "cuda" else 3)

    impls = {"pyllm": ours, "torch": torch_loss}
    ce_impls = {"pyllm": ours_ce, "torch": torch_ce}
    logps_impls = {"pyllm": ours_logps, "torch": torch_logps}
    dpo_impls = {"pyllm": ours_fused_dpo, "pyllm logps": ours_logps_dpo, "torch": torch_dpo}
    if not args.quick:
        impls["torch.compile"] = torch.compile(torch_loss)
        ce_impls["torch.compile"] = torch.compile(torch_ce)
        logps_impls["torch.compile"] = torch.compile(torch_logps)
        dpo_impls["torch.compile"] = torch.compile(torch_dpo)
    if device == "cuda":
        if (liger := liger_fn()) is not None:
            impls["liger"] = liger
        if (liger := liger_ce_fn()) is not None:
            ce_impls["liger"] = liger
        else:
            print("# skipped: liger_kernel not installed: no liger rows")

    print(f"# linear cross-entropy on {common.device_description(device)}: {rows_n} rows x {args.dim} -> "
          f"{args.vocab} words, fwd+bwd; then the loss alone on ({rows_n}, {args.vocab}) logits; then the "
          f"linear layer's token log-probabilities")
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for dtype in ((torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32, torch.bfloat16)):
        x = torch.randn(rows_n, args.dim, device=device, dtype=dtype, generator=gen)
        weight = (torch.randn(args.vocab, args.dim, device=device, generator=gen) * args.dim ** -0.5).to(dtype)
        targets = torch.randint(0, args.vocab, (rows_n,), device=device, generator=gen)
        targets[::8] = -1
        dtype_name = str(dtype).removeprefix("torch.")
        rows += measure(impls, (x, weight), targets, repeat, device, {"what": "linear+ce", "dtype": dtype_name})
        logits = (x @ weight.t()).detach()
        rows += measure(ce_impls, (logits,), targets, repeat, device, {"what": "ce", "dtype": dtype_name})
        row_weights = torch.randn(rows_n, device=device, generator=gen)
        rows += measure(logps_impls, (x, weight), targets, repeat, device, {"what": "linear+logps", "dtype": dtype_name},
                        objectives=(("logps", row_weights),))
        # A frozen head (LoRA's): only x wants a gradient; pyllm keeps d logp / dx from the forward
        frozen = {name: (lambda fn: lambda x, targets, row_weights: fn(x, weight, targets, row_weights))(fn)
                  for name, fn in logps_impls.items()}
        rows += measure(frozen, (x,), targets, repeat, device, {"what": "linear+logps, frozen head", "dtype": dtype_name},
                        objectives=(("logps", row_weights),))
        if rows_n % (2 * SEQUENCE_ROWS) == 0:
            reference = torch.randn(rows_n // SEQUENCE_ROWS, device=device, generator=gen, dtype=torch.float64) * 5 - 600
            rows += measure(dpo_impls, (x, weight), targets, repeat, device, {"what": "linear+dpo", "dtype": dtype_name},
                            objectives=(("dpo", reference),))
    common.print_table(rows, ["what", "dtype", "loss", "impl", "ms", "peak MiB", "vs torch", "value"])
    common.write_json(args.json, "cross_entropy", device, rows, {"rows": rows_n, "dim": args.dim, "vocab": args.vocab,
                                                                  "repeat": repeat})
    return 0


if __name__ == "__main__":
    sys.exit(main())
