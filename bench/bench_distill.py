"""Distillation, one step: pyllm's fused divergence vs TRL's GKD computation, one process.

The same student and teacher weights on both sides (LlamaForCausalLM with random weights in
SmolLM2-135M's shape: the student --layers deep, the teacher twice that; vocab 49152; read by
pyllm.model.LLM.from_hf), bf16, a batch of token windows, all positions trained:
- pyllm: the teacher's final hidden states (LLM.forward(hidden=True)), then the student's forward
  with the fused generalized JSD (nn.linear_distill: neither model's (tokens, vocab) logits exist).
- TRL GKD: what GKDTrainer.compute_loss does off-policy (lmbda 0): both models' logits from
  transformers, the student's and the teacher's log-softmax at the temperature, the generalized JSD
  (its generalized_jsd_loss, written out with F.kl_div as TRL does; trl is not needed), the mean over
  tokens, backward.
Rows: seconds per step (forward + backward, median of --repeat, interleaved) and the peak memory of
one step above the models' weights.

--logits: the divergence alone on given logits (batch x seq_len rows of SmolLM2's 49,152 words, one
batch row with --quick; both models' logits random at an output layer's spread), forward + backward
for the student's logits: pyllm.generalized_jsd vs TRL's generalized_jsd_loss written out in torch
ops, torch.compile of it (not with --quick), and on CUDA Liger-Kernel's LigerJSD (Triton; it takes
log-probabilities, so torch's log_softmax of both sides comes first) where it is installed.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyllm  # noqa: E402
from pyllm.model import LLM  # noqa: E402


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's generalized_jsd_loss with reduction batchmean over tokens."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        jsd = beta * F.kl_div(m, t, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            m, s, reduction="none", log_target=True)
    return jsd.sum() / (jsd.shape[0] * jsd.shape[1])


def peak_mb_and_seconds(runs: dict, repeat: int, device: str, zero) -> tuple[dict, dict]:
    """Each run's peak memory (one call) and median seconds (interleaved), zero() ahead of every call."""
    memory = {}
    for name, run in runs.items():
        zero()
        memory[name] = common.peak_memory_mb(run, device)
    return memory, common.interleaved_seconds(runs, repeat, device, before=zero)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=0, help="the student's (default 8, --quick 2); the teacher 2x")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--logits", action="store_true", help="the divergence alone on given logits")
    args = parser.parse_args()
    if args.logits:
        return logits_bench(args)
    transformers = common.peer_module("transformers", "bench_distill", "transformers is not installed; no peer")
    if transformers is None:
        return 0
    torch.manual_seed(0)
    layers = args.layers or (2 if args.quick else 8)
    dtype, device = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype], args.device
    models = {}
    with tempfile.TemporaryDirectory() as folder:
        for role, n in (("student", layers), ("teacher", 2 * layers)):
            theirs = transformers.LlamaForCausalLM(common.smollm2_config(transformers, n, attn_implementation="sdpa"))
            theirs.save_pretrained(Path(folder) / role)
            ours = LLM.from_hf(Path(folder) / role)
            models[role] = (ours.to(device, dtype), theirs.to(device, dtype))
    (student, their_student), (teacher, their_teacher) = models["student"], models["teacher"]
    teacher.eval(), their_teacher.eval()
    for m in (teacher, their_teacher):
        m.requires_grad_(False)
    x = torch.randint(0, 49152, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, 49152, (args.batch, args.seq_len), device=device)

    def pyllm_step():
        with torch.no_grad():
            hidden = teacher(x, y, hidden=True)[1]
        student(x, y, distill=dict(teacher_hidden=hidden, teacher_weight=teacher.lm_head.weight, beta=args.beta,
                                   temperature=args.temperature, alpha=1.0))[1].backward()

    def trl_step():
        with torch.no_grad():
            teacher_logits = their_teacher(input_ids=x).logits
        logits = their_student(input_ids=x).logits
        trl_generalized_jsd(logits, teacher_logits, args.beta, args.temperature).backward()

    runs = {"pyllm fused": pyllm_step, "TRL GKD (transformers)": trl_step}
    losses = {}
    with torch.no_grad():
        hidden = teacher(x, y, hidden=True)[1]
        losses["pyllm fused"] = float(student(x, y, distill=dict(
            teacher_hidden=hidden, teacher_weight=teacher.lm_head.weight, beta=args.beta,
            temperature=args.temperature, alpha=1.0))[1])
        losses["TRL GKD (transformers)"] = float(trl_generalized_jsd(
            their_student(input_ids=x).logits, their_teacher(input_ids=x).logits, args.beta, args.temperature))

    def zero():
        student.zero_grad(set_to_none=True)
        their_student.zero_grad(set_to_none=True)

    for run in runs.values():
        zero()
        run()
    memory, seconds = peak_mb_and_seconds(runs, args.repeat, device, zero)
    peer = seconds["TRL GKD (transformers)"]
    rows = [{"impl": name, "s/step": round(s, 3), "tokens/s": round(x.numel() / s),
             "vs TRL": f"{peer / s:.2f}x", "peak MB": round(memory[name]), "loss": round(losses[name], 5),
             **common.spread(s)} for name, s in seconds.items()]
    print(f"# distillation step on {common.device_description(device)}: student {layers} layers, teacher "
          f"{2 * layers}, {args.dtype}, {args.batch} x {args.seq_len} tokens, beta {args.beta}, T {args.temperature}, "
          f"transformers {transformers.__version__}")
    common.print_table(rows, ["impl", "s/step", "tokens/s", "vs TRL", "peak MB", "loss"])
    common.write_json(args.json, "distill", device, rows, {
        "student_layers": layers, "teacher_layers": 2 * layers, "batch": args.batch, "seq_len": args.seq_len,
        "beta": args.beta, "temperature": args.temperature, "dtype": args.dtype, "transformers": transformers.__version__})
    return 0


def liger_jsd(beta: float, temperature: float):
    """Liger-Kernel's LigerJSD on (rows, V) logits (its inputs are log-probabilities: the student's
    first, the teacher's second; its mean over the rows), or None where it is not installed."""
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return None
    jsd = LigerJSD(beta=beta)
    return lambda s, t: jsd(F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature, -1))


def logits_bench(args) -> int:
    torch.manual_seed(0)
    dtype, device = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype], args.device
    rows, vocab = (1 if args.quick else args.batch) * args.seq_len, 49152
    student = (torch.randn(rows, vocab, device=device) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    beta, temperature = args.beta, args.temperature

    def trl(s, t):  # TRL's batchmean over the (rows) tokens
        return trl_generalized_jsd(s[None], t[None], beta, temperature)

    impls = {"pyllm": lambda s, t: pyllm.generalized_jsd(s, t, beta=beta, temperature=temperature),
             "TRL's formula (torch eager)": trl}
    if not args.quick:
        impls["torch.compile of it"] = torch.compile(trl)
    if device == "cuda":
        if (liger := liger_jsd(beta, temperature)) is not None:
            impls["Liger's LigerJSD"] = liger
        else:
            print("# skipped: liger_kernel not installed: no LigerJSD row")
    runs = {name: (lambda fn=fn: fn(student, teacher).backward()) for name, fn in impls.items()}
    with torch.no_grad():
        losses = {name: float(fn(student, teacher)) for name, fn in impls.items()}
    for run in runs.values():  # warm up (and compile)
        run()

    def zero():
        student.grad = None

    memory, seconds = peak_mb_and_seconds(runs, args.repeat, device, zero)
    peer = seconds["TRL's formula (torch eager)"]
    table = [{"impl": name, "ms": round(s * 1e3, 1), "vs TRL": f"{peer / s:.2f}x", "peak MB": round(memory[name]),
              "loss": round(losses[name], 6), **common.spread(s, 1e3)} for name, s in seconds.items()]
    print(f"# generalized JSD on {rows} x {vocab} logits, fwd + bwd, {common.device_description(device)}: "
          f"{args.dtype}, beta {beta}, T {temperature}")
    common.print_table(table, ["impl", "ms", "vs TRL", "peak MB", "loss"])
    common.write_json(args.json, "distill_logits", device, table, {
        "n_rows": rows, "vocab": vocab, "beta": beta, "temperature": temperature, "dtype": args.dtype})
    return 0


if __name__ == "__main__":
    sys.exit(main())
