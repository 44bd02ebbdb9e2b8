"""One training step (forward, backward, AdamW), pyllm's model vs the same model in plain PyTorch.

pyllm: pyllm.model.LLM (its attention / SwiGLU / RMSNorm call sites) and the trainer's optimizer.
plain PyTorch: the same architecture written here with F.scaled_dot_product_attention, an eager
SwiGLU (silu(gate) * up), an eager RMSNorm and torch.optim.AdamW(fused=True) (torch has a fused
CPU AdamW too), holding pyllm's model's weights: their losses and gradients are compared first.
Both clip the global grad norm to 1. Each with and without torch.compile (--quick skips compile
unless --compile is given). Same config, weights, batch, precision and process; median step time
of repeats. --activation-checkpointing recomputes every block in the backward in both
(torch.utils.checkpoint, non-reentrant, as pyllm's LLM does); "saved MB" is what autograd keeps
from one forward (saved-tensor hooks: activations, whatever the device), "peak MB" the peak memory
of one step above what was held before it (CUDA allocator peak; CPU peak RSS). A third row, "pyllm
fused-loss", computes the loss with pyllm.nn.linear_cross_entropy (LLM.fused_loss): the (B, T,
vocab) logits and their gradient never exist.

MFU = model FLOPs per token (6N + 12 L C T) x tokens/s / the GPU's peak bf16 FLOP/s
(pyllm.train.PEAK_BF16_FLOPS); n/a on the CPU.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm.model import LLM, ModelConfig, state_to_hf  # noqa: E402
from pyllm.train import DistInfo, TrainConfig, autocast, make_optimizer, peak_flops  # noqa: E402


# pyllm's model with fused_loss: the loss by pyllm.nn.linear_cross_entropy, no (B, T, V) logits.
FUSED = "pyllm fused-loss"


# --- the plain-PyTorch model (LLaMA-style configs: rmsnorm, swiglu, rope, any n_kv_heads) ----------

class PlainRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def plain_rope(x, cos, sin):  # x (B, T, H, D)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class PlainBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.norm1, self.norm2 = PlainRMSNorm(cfg.dim, cfg.norm_eps), PlainRMSNorm(cfg.dim, cfg.norm_eps)
        self.wq, self.wk, self.wv = nn.Linear(cfg.dim, H * D, bias=False), nn.Linear(cfg.dim, Hk * D, bias=False), nn.Linear(cfg.dim, Hk * D, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.w1, self.w3 = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False), nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        H, Hk, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        h = self.norm1(x)
        q = plain_rope(self.wq(h).view(B, T, H, D), cos, sin).transpose(1, 2)
        k = plain_rope(self.wk(h).view(B, T, Hk, D), cos, sin).transpose(1, 2)
        v = self.wv(h).view(B, T, Hk, D).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hk)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PlainLLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if (cfg.norm, cfg.mlp, cfg.positions, cfg.parallel_block, cfg.bias, cfg.tie_embeddings) != (
                "rmsnorm", "swiglu", "rope", False, False, True):
            raise ValueError("the plain model covers LLaMA-style presets (rmsnorm, swiglu, rope, sequential blocks, "
                             "no biases, tied embeddings)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = PlainRMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        T, D = idx.shape[1], self.cfg.head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, D, 2, device=idx.device).float() / D)
        ang = torch.outer(torch.arange(T, device=idx.device).float(), inv_freq)
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x = self.tok_emb(idx)
        recompute = getattr(self, "activation_checkpointing", False) and torch.is_grad_enabled()
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False) if recompute else block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def load_pyllm(self, model: LLM) -> "PlainLLM":
        """Takes pyllm's model's weights, through its Hugging Face export's names and layouts (whose
        RoPE rotates halves, as plain_rope): the two models then compute the same function."""
        plain = {"model.embed_tokens.": "tok_emb.", "model.norm.": "norm_f.", "model.layers.": "blocks.",
                 "input_layernorm": "norm1", "post_attention_layernorm": "norm2", "self_attn.q_proj": "wq",
                 "self_attn.k_proj": "wk", "self_attn.v_proj": "wv", "self_attn.o_proj": "wo",
                 "mlp.gate_proj": "w1", "mlp.up_proj": "w3", "mlp.down_proj": "w2"}
        state = {}
        for name, value in state_to_hf(model.state_dict(), model.config, "llama").items():
            for theirs, ours in plain.items():
                name = name.replace(theirs, ours)
            state[name] = value
        self.load_state_dict(state, strict=False)  # (lm_head: tied to tok_emb)
        return self


def same_function(ours: nn.Module, plain: nn.Module, idx, targets, precision: str, device) -> None:
    """Raises unless the two models' loss and gradients agree (the plain one holding pyllm's
    weights): a benchmark of two models must time the same computation."""
    results = []
    for model in (ours, plain):
        model.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = model(idx, targets)[1]
        loss.backward()
        grads = dict(model.named_parameters())
        results.append([loss.detach().float()] + [grads[n].grad.float() for n in ("tok_emb.weight", "norm_f.weight")])
        model.zero_grad(set_to_none=True)
    tol = {} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    common.check_close(results[0], results[1], "pyllm's model vs the plain one (loss, embedding and final norm "
                                                "gradients)", **tol)


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--preset", help="model preset (default: llama-124m on CUDA, tiny on the CPU)")
    parser.add_argument("--batch-size", type=int, help="default: 16 on CUDA, 8 on the CPU")
    parser.add_argument("--seq-len", type=int, help="default: 1024 on CUDA, 128 on the CPU")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per implementation (default 10)")
    parser.add_argument("--compile", action="store_true", help="time the torch.compile rows even with --quick")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block in the backward, in both models")
    parser.add_argument("--reuse-cpu-memory", action="store_true",
                        help="pyllm.cpu_memory's process-wide settings first, as `pyllm train` has them (both models)")
    args = parser.parse_args()
    if args.reuse_cpu_memory:  # before the first tensor
        from pyllm.cpu_memory import reuse_cpu_memory
        print(f"# reuse_cpu_memory: {reuse_cpu_memory()}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("llama-124m" if cuda else "tiny")
    B = args.batch_size or (16 if cuda else 8)
    T = args.seq_len or (1024 if cuda else 128)
    precision = args.precision or ("bf16" if cuda else "fp32")
    cfg = ModelConfig.from_preset(preset, block_size=max(T, ModelConfig.from_preset(preset).block_size))
    peak = peak_flops(device)
    flops_per_token = LLM(cfg).flops_per_token(T)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    repeat = args.repeat if not args.quick else max(3, args.repeat // 2)

    def make(impl):
        torch.manual_seed(0)
        model = LLM(cfg)
        if not impl.startswith("pyllm"):  # the same weights, in the plain model
            model = PlainLLM(cfg).load_pyllm(model)
        model = model.to(device)
        model.activation_checkpointing = args.activation_checkpointing
        if impl == FUSED:
            model.fused_loss = True
        if impl.startswith("pyllm"):
            opt = make_optimizer(model, TrainConfig(lr=1e-4), DistInfo(device=device))
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        return model, opt

    models = {impl: make(impl)[0] for impl in ("pyllm", FUSED, "plain torch")}
    n_params = {impl: sum(p.numel() for p in models[impl].parameters()) for impl in ("pyllm", "plain torch")}
    if n_params["pyllm"] != n_params["plain torch"]:
        raise RuntimeError(f"the two models differ: {n_params}")
    for impl in ("pyllm", FUSED):
        same_function(models[impl], models["plain torch"], x[:, :-1], x[:, 1:], precision, device)
    del models

    rows, times = [], {}
    print(f"# train step on {common.device_description(args.device)}: preset {preset} ({n_params['pyllm'] / 1e6:.2f}M params), "
          f"B={B}, T={T}, {precision}, {flops_per_token / 1e6:.0f} MFLOPs/token, MFU vs "
          + (f"{peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "no known peak (n/a)"))
    for compiled in ([False] if args.quick and not args.compile else [False, True]):
        for impl in ("pyllm", FUSED, "plain torch"):
            model, opt = make(impl)
            fwd = torch.compile(model) if compiled else model

            def step():
                with autocast(precision, device):
                    loss = fwd(x[:, :-1], x[:, 1:])[1]
                loss.backward()
                if impl.startswith("pyllm"):
                    opt.step(max_grad_norm=1.0)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                opt.zero_grad(set_to_none=True)

            ms = common.median_ms(step, args.device, warmup=3 if compiled else 2, repeat=repeat)
            peak_mb = common.peak_memory_mb(step, args.device)
            tok_s = B * T / ms * 1e3
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t), autocast(precision, device):
                fwd(x[:, :-1], x[:, 1:])
            rows.append({"impl": impl, "compile": "yes" if compiled else "no", "ms/step": round(ms, 2),
                         "tokens/s": round(tok_s), "MFU": f"{flops_per_token * tok_s / peak:.1%}" if peak else "n/a",
                         "saved MB": round(sum(saved) / 2**20, 1), "peak MB": round(peak_mb, 1), **common.spread(ms)})
            times[impl, rows[-1]["compile"]] = ms
            del model, opt, fwd
    for r in rows:  # from unrounded times
        r["vs plain torch (same compile)"] = f"{times['plain torch', r['compile']] / times[r['impl'], r['compile']]:.2f}x"
    common.print_table(rows, ["impl", "compile", "ms/step", "tokens/s", "MFU", "saved MB", "peak MB",
                              "vs plain torch (same compile)"])
    common.write_json(args.json, "train", args.device, rows, {"preset": preset, "B": B, "T": T, "precision": precision,
                                                              "activation_checkpointing": args.activation_checkpointing,
                                                              "params": n_params["pyllm"], "flops_per_token": flops_per_token,
                                                              "peak_flops": peak})
    return 0


if __name__ == "__main__":
    sys.exit(main())
