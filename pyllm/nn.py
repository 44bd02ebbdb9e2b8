"""Modules built on pyllm's ops, drop-in replacements for their LLaMA counterparts."""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.amp.autocast_mode import is_autocast_available as _is_autocast_available
except ImportError:  # torch releases without it
    def _is_autocast_available(device_type: str) -> bool:
        return device_type in ("cpu", "cuda")


# Asked once per device type here: torch 2.6's dynamo cannot trace torch._C._is_autocast_available (a
# graph break under fullgraph=True); a dict's entry it reads as a constant.
_AUTOCAST_AVAILABLE = {device_type: _is_autocast_available(device_type) for device_type in ("cpu", "cuda", "meta")}


def is_autocast_available(device_type: str) -> bool:
    known = _AUTOCAST_AVAILABLE.get(device_type)
    return _is_autocast_available(device_type) if known is None else known


from pyllm.ops import _util
from pyllm.ops import cross_entropy as cross_entropy_ops
from pyllm.ops import distill as distill_ops
from pyllm.ops import flash_attn as flash_attn_ops
from pyllm.ops import rms_norm as rms_norm_ops
from pyllm.ops import rope as rope_ops
from pyllm.ops import swiglu as swiglu_ops
from pyllm.ops.rms_norm import rms_norm
from pyllm.ops.swiglu import geglu_packed, swiglu_packed


class SwiGLUMLP(nn.Module):
    """LLaMA's MLP, down(silu(x W_gate) * (x W_up)), with the gate and up projections fused into
    one matmul whose (..., 2 * hidden_dim) output feeds the fused SwiGLU kernel directly.

    gate_up.weight is [W_gate; W_up] stacked along the output dim, so a LLaMA checkpoint loads
    with gate_up.weight = torch.cat([w1.weight, w3.weight]) and down.weight = w2.weight.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_swiglu(self.gate_up(x)))  # (..., 2 * hidden) -> (..., hidden) -> (..., dim)


def _autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (meta, a dry run's: never; torch raises for it)."""
    return is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)


def _autocast_off(x: torch.Tensor):
    """Autocast off for x's device (meta: nothing to turn off; torch.autocast raises for it)."""
    return torch.autocast(x.device.type, enabled=False) if is_autocast_available(x.device.type) else contextlib.nullcontext()


def _gated_packed(h: torch.Tensor, fused, act) -> torch.Tensor:
    """act(gate) * up of h = [gate | up] (..., 2 * hidden): the packed kernel `fused` where one takes
    h, else act in torch (no kernel for this device, as attention() below: the same function)."""
    if _swiglu_takes(h):
        return fused(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] (LLaMA's MLP)."""
    return _gated_packed(h, swiglu_packed, F.silu)


def _geglu(h: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up of h = [gate | up] (Gemma's MLP)."""
    return _gated_packed(h, geglu_packed, functools.partial(F.gelu, approximate="tanh"))


class MoEMLP(nn.Module):
    """A mixture of SwiGLU experts (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE): a linear router scores the n_experts
    experts for each token, which goes through its top_k best; their outputs are summed weighted by
    the router's softmax probabilities, renormalized over the chosen ones when norm_topk_prob
    (Mixtral's and Qwen3-MoE-30B's; OLMoE's are not). Each expert is a SwiGLUMLP whose weights are
    one slice of gate_up (E, 2 * hidden, dim) = [W_gate; W_up] and down (E, dim, hidden): one
    parameter each for all experts (transformers 5's layout; FSDP shards it like any other).

    The tokens are sorted by expert and each expert runs one matmul on its contiguous share (the
    shares' sizes read on the host: free on the CPU, a sync per layer on CUDA), then the weighted
    outputs are added back to their tokens. On CUDA in bf16 the shares go through torch's grouped
    GEMM instead (moe_experts_grouped: no host read, one kernel per projection for all experts,
    as transformers 5 does); a few tokens on CUDA (decoding: N * top_k <= E; CUDA-graph capture
    in other dtypes) take the gathered path, which reads each chosen expert's weights per token
    with no host read; one token on the CPU without autograd (decoding) the one-token path, a few
    (batched decoding) torch's grouped GEMM.

    After each forward in training with autograd on, `stats` holds what the load-balancing loss
    (LLM.router_aux_loss) counts: the chosen experts (N, k) and the router's probabilities (N, E);
    LLM.forward drops them once the loss is made (and turns collect_stats off where none is wanted,
    so that a checkpointed block's recompute keeps none). shared_hidden: Qwen2-MoE's shared expert (a SwiGLUMLP of that width every token goes
    through, its output times sigmoid(x w_shared_gate)).

    add_lora gives the experts LoRA updates of their own (PEFT's target_parameters); with them the
    layer takes moe_experts_lora's path."""

    LORA_PROJECTIONS = ("gate_up", "down")  # the expert weights LoRA can update (add_lora)

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, norm_topk_prob: bool = True,
                 shared_hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        if not (isinstance(n_experts, int) and n_experts >= 1 and isinstance(top_k, int) and 1 <= top_k <= n_experts):
            raise ValueError(f"MoEMLP: n_experts must be an int >= 1 and top_k an int in [1, n_experts], got "
                             f"n_experts={n_experts!r}, top_k={top_k!r}")
        self.dim, self.hidden_dim, self.n_experts, self.top_k = dim, hidden_dim, n_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(dim, n_experts, bias=False, device=device, dtype=dtype)
        # Qwen2-MoE's shared expert: every token goes through it too, its output scaled by a gate of its own
        self.shared = SwiGLUMLP(dim, shared_hidden, device=device, dtype=dtype) if shared_hidden else None
        self.shared_gate = nn.Linear(dim, 1, bias=False, device=device, dtype=dtype) if shared_hidden else None
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim, device=device, dtype=dtype))
        for w in (self.gate_up, self.down):  # each expert as nn.Linear draws its weights
            for e in range(n_experts):
                nn.init.kaiming_uniform_(w.data[e], a=math.sqrt(5))
        self.stats = None
        self.collect_stats = True  # (LLM.forward turns it off where no balancing loss wants them)
        self.lora_scale, self.lora_disabled = None, False

    def reset_parameters(self) -> None:
        """The experts drawn as at construction (each as nn.Linear draws its weight), their LoRA
        updates (add_lora) as they start: what a meta-device model's to_empty needs."""
        for w in (self.gate_up, self.down):
            for e in range(self.n_experts):
                nn.init.kaiming_uniform_(w.data[e], a=math.sqrt(5))
        for name in self.LORA_PROJECTIONS:
            a, b = getattr(self, f"{name}_lora_a", None), getattr(self, f"{name}_lora_b", None)
            if a is not None:
                nn.init.uniform_(a, -1 / math.sqrt(a.shape[-1]), 1 / math.sqrt(a.shape[-1]))
                nn.init.zeros_(b)

    def __getstate__(self):
        # the last forward's statistics hold its graph: copy.deepcopy and pickle take the module without
        state = dict(self.__dict__)
        state["stats"] = None
        return state

    def add_lora(self, rank: int, alpha: float, projections=("gate_up", "down"), frozen_dtype: torch.dtype | None = None
                 ) -> None:
        """LoRA on the experts, PEFT's way for transformers 5's fused experts (target_parameters
        experts.gate_up_proj / experts.down_proj, its ParamWrapper): each expert's weight W_e of
        the named projections gets a rank-`rank` update of its own, (alpha / rank) B_e A_e, A
        (E, rank, in) drawn as PEFT draws it (nn.Linear's bound, 1 / sqrt(in)), B (E, out, rank)
        zeros: parameters <projection>_lora_a and _lora_b. The experts' weights freeze (held in
        frozen_dtype when given: most of a MoE's memory). The updates are added as their own
        low-rank products (x A_e^T) B_e^T (moe_experts_lora), not merged into the weights each
        step (PEFT's way): the weights' gradients are never formed, and a small update is not lost
        to a 16-bit weight's rounding."""
        for name in projections:
            if name not in self.LORA_PROJECTIONS:
                raise ValueError(f"MoEMLP.add_lora: projections are among {', '.join(self.LORA_PROJECTIONS)}, got {name!r}")
        for name in ("gate_up", "down"):
            weight = getattr(self, name)
            if frozen_dtype is not None and weight.dtype != frozen_dtype:
                setattr(self, name, nn.Parameter(weight.detach().to(frozen_dtype), requires_grad=False))
            getattr(self, name).requires_grad_(False)
        for name in projections:
            E, out, inner = getattr(self, name).shape
            kw = dict(device=self.router.weight.device, dtype=self.router.weight.dtype)
            a = nn.Parameter(torch.empty(E, rank, inner, **kw))
            nn.init.uniform_(a, -1 / math.sqrt(inner), 1 / math.sqrt(inner))  # kaiming_uniform(a=sqrt(5))'s bound
            self.register_parameter(f"{name}_lora_a", a)
            self.register_parameter(f"{name}_lora_b", nn.Parameter(torch.zeros(E, out, rank, **kw)))
        if projections:
            self.lora_scale = alpha / rank

    def lora_factors(self) -> tuple | None:
        """(gate_up A, gate_up B, down A, down B), None for a projection without an update; None
        when the layer has no updates or they are off (LLM.lora_disabled)."""
        if self.lora_scale is None or self.lora_disabled:
            return None
        return tuple(getattr(self, f"{name}_lora_{ab}", None) for name in ("gate_up", "down") for ab in "ab")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> router probabilities (N, E) in fp32 (or fp64), chosen experts (N, k), their
        weights (N, k), renormalized over the k when norm_topk_prob."""
        logits = self.router(x)  # (N, E)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return probs, experts, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # (N, C)
        probs, experts, weights = self.route(x)
        if self.training and torch.is_grad_enabled() and self.collect_stats:  # kept whole: padding may be left out
            self.stats = (experts, probs)
        gate_up, down = self.gate_up, self.down
        if gate_up.dtype != x.dtype and not _autocast_on(x):
            gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)  # frozen 16-bit experts (add_lora), fp32 x
        factors = self.lora_factors()
        if _util.torch_func_active():  # per-example gradients (vmap of grad): no host read of the
            # routing, no autograd.Function computing in its forward; N * k experts' weights in memory
            path = functools.partial(moe_experts_gathered, factors=factors, scale=self.lora_scale)
        elif factors is not None:
            path = functools.partial(moe_experts_lora, factors=factors, scale=self.lora_scale)
        elif (x.is_cuda and x.shape[0] * self.top_k <= self.n_experts) or x.is_meta:  # (meta: shapes, no host read)
            path = moe_experts_gathered
        elif x.is_cuda and _grouped_mm_takes(x, self.gate_up):
            path = moe_experts_grouped
        elif x.is_cuda and torch.cuda.is_current_stream_capturing():
            path = moe_experts_gathered
        elif torch.compiler.is_compiling() and _grouped_mm_takes(x, self.gate_up):
            # traced in bf16 (the grouped GEMM's fake kernel takes bf16 alone): the sorted path's host
            # read of the experts' shares and its kernels writing into slices break the graph at each
            # layer (~14 graphs a forward of tiny-moe; fullgraph=True fails there, as in fp32 still)
            path = moe_experts_grouped
        elif x.shape[0] == 1 and not torch.is_grad_enabled():  # decoding one sequence on the CPU
            path = moe_experts_one_token
        elif (not torch.is_grad_enabled() and x.shape[0] * self.top_k <= 4 * self.n_experts and hasattr(F, "grouped_mm")
              and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_autocast_enabled("cpu")):
            # decoding a batch on the CPU: torch's grouped GEMM loops over the experts in C++ (8 tokens,
            # 64 experts, 8 each: 8.8 ms against the sorted path's 9.9, bf16; 23.4 vs 24.5 fp32)
            path = moe_experts_grouped
        else:
            path = moe_experts_sorted
        y = path(x, experts, weights, gate_up, down)
        if self.shared is not None:  # (N, C) + sigmoid((N, 1)) * (N, C)
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return y.reshape(*shape[:-1], y.shape[-1])


def _through_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, compute, *extra) -> torch.Tensor:
    """What the sorted and grouped paths share: the (token, choice) pairs sorted by expert, the
    inputs cast to autocast's dtype (outside, so the fp32 masters get their grads through the
    casts, as nn.Linear's would), compute(xs (N * k, C) in expert order, the experts' ids in token
    order, gate_up, down, *extra (more weights: LoRA's; None passes as None)) -> (N * k, C) without
    autocast, the outputs weighted and added back to their tokens."""
    N, k = experts.shape
    if N == 0:
        return x.new_zeros(0, down.shape[1])
    flat = experts.flatten()  # (N * k,) in token order
    order = flat.argsort(stable=True)  # the (token, choice) pairs grouped by expert
    token = order // k
    if _autocast_on(x):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        extra = [None if t is None else t.to(dtype) for t in extra]
    with _autocast_off(x):
        ys = compute(x[token], flat, gate_up, down, *extra)  # (N * k, C)
    ys = ys * weights.flatten()[order, None].to(ys.dtype)
    return ys.new_zeros(N, ys.shape[1]).index_add_(0, token, ys)


# Eager inside a compiled function: its host read of the experts' shares breaks the graph anyway, and
# traced, dynamo went on into _SortedExperts' raw kernel launches (a graph break each, and torch's
# "wrap it into a custom operator" UserWarning). torch._disable_dynamo imports dynamo at the first call.
@torch._disable_dynamo
def moe_experts_sorted(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) for each token n of x (N, C), experts and
    weights (N, k): the tokens sorted by expert, one matmul pair per expert that has any (an expert
    with none does nothing; its weights get zero gradients), the experts' shares read on the host.
    Under autocast the matmuls run in its dtype, as nn.Linear's would."""
    def compute(xs, flat, gate_up, down):
        counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
        return _SortedExperts.apply(xs, gate_up, down, counts)

    return _through_experts(x, experts, weights, gate_up, down, compute)


def _swiglu_into(h: torch.Tensor, out: torch.Tensor) -> None:
    if _swiglu_takes(h):
        swiglu_ops.swiglu_packed_forward_into(h, out)
    else:
        gate, up = h.chunk(2, dim=-1)
        torch.mul(F.silu(gate), up, out=out)


def _swiglu_backward_into(d_out: torch.Tensor, h: torch.Tensor, dh: torch.Tensor) -> None:
    if _swiglu_takes(h):
        swiglu_ops.swiglu_packed_backward_into(d_out, h, dh)
    else:
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        dh[:, h.shape[1] // 2:] = d_out * gate * sig
        dh[:, :h.shape[1] // 2] = d_out * up * sig * (1 + gate * (1 - sig))


class _SortedExperts(torch.autograd.Function):
    """Each expert e on its contiguous share of xs (S, C) (counts[e] rows, in expert order):
    down_e(silu(xs W_gate,e^T) * (xs W_up,e^T)). Every matmul writes into one (S, ...) or (E, ...)
    tensor in place (torch.mm's out=), where autograd through per-expert F.linear calls would
    concatenate the experts' outputs and stack their weight gradients (a copy of every expert's
    gradient: 25% of a training step's time here, bench_moe). Saves xs and the gate / up
    projections; recomputes the SwiGLU in the backward. Weight gradients only when asked for
    (frozen experts: LoRA)."""

    @staticmethod
    def forward(ctx, xs, gate_up, down, counts):
        S, H = xs.shape[0], down.shape[2]
        h = xs.new_empty(S, 2 * H)  # each row's [gate | up]
        act = xs.new_empty(S, H)
        ys = xs.new_empty(S, down.shape[1])
        # split once into every expert's rows (views): decoding's few tokens spend more time in
        # Python per expert than in its matmuls
        for e, (x_e, h_e, act_e, y_e) in enumerate(zip(*(t.split(counts) for t in (xs, h, act, ys)))):
            if counts[e]:
                torch.mm(x_e, gate_up[e].t(), out=h_e)
                _swiglu_into(h_e, act_e)
                torch.mm(act_e, down[e].t(), out=y_e)
        ctx.save_for_backward(xs, gate_up, down, h)
        ctx.counts = counts
        return ys

    @staticmethod
    def backward(ctx, d_ys):
        xs, gate_up, down, h = ctx.saved_tensors
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
        d_ys = d_ys.contiguous()
        d_xs = torch.empty_like(xs) if need_x else None
        d_gate_up = torch.empty_like(gate_up) if need_gate_up else None
        d_down = torch.empty_like(down) if need_down else None
        H = down.shape[2]
        act, d_act, dh = (xs.new_empty(max(ctx.counts), width) for width in (H, H, 2 * H))  # one expert's rows
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:  # an expert no token went to
                for grad in (d_gate_up, d_down):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            if need_down:
                _swiglu_into(h[rows], act[:n])
                torch.mm(d_ys[rows].t(), act[:n], out=d_down[e])
            torch.mm(d_ys[rows], down[e], out=d_act[:n])
            _swiglu_backward_into(d_act[:n], h[rows], dh[:n])
            if need_gate_up:
                torch.mm(dh[:n].t(), xs[rows], out=d_gate_up[e])
            if need_x:
                torch.mm(dh[:n], gate_up[e], out=d_xs[rows])
            start += n
        return d_xs, d_gate_up, d_down, None


def _grouped_mm_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether moe_experts_grouped runs here: torch's grouped GEMM takes bf16 (autocast's or the
    tensors' own) on CUDA (sm80 and newer; torch 2.8 and newer) and on the CPU."""
    if not hasattr(F, "grouped_mm"):
        return False
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    return dtype == torch.bfloat16 and (weight.dtype == torch.bfloat16 or autocast) \
        and (device == "cpu" or (device == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 8))


def moe_experts_grouped(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
    """moe_experts_sorted's function through torch's grouped GEMM (F.grouped_mm): the (token,
    choice) pairs sorted by expert, the experts' shares given as device offsets, so nothing is read
    on the host (no sync; CUDA graphs can capture it) and each projection is one kernel for all
    experts. bf16 (torch's CPU grouped GEMM runs it too, which is how the tests check it)."""
    def compute(xs, flat, gate_up, down):
        counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=xs.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # (E,): bincount's, without its host read of the largest id
        offsets = counts.cumsum(0).to(torch.int32)  # each expert's share ends here
        h = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offsets)  # (N * k, 2 * hidden)
        return F.grouped_mm(_swiglu(h), down.transpose(-2, -1), offs=offsets)  # (N * k, C)

    return _through_experts(x, experts, weights, gate_up, down, compute)


class _GroupedLinear(torch.autograd.Function):
    """x_e W_e^T for each expert e's contiguous share x_e of x (S, in) (counts[e] rows, in expert
    order), W (E, out, in): one in-place matmul per expert into one (S, out) tensor (as
    _SortedExperts). W's gradient only when asked for (frozen experts under LoRA: none)."""

    @staticmethod
    def forward(ctx, x, weight, counts):
        y = x.new_empty(x.shape[0], weight.shape[1])
        for e, (x_e, y_e) in enumerate(zip(x.split(counts), y.split(counts))):
            if counts[e]:
                torch.mm(x_e, weight[e].t(), out=y_e)
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, d_y):
        x, weight = ctx.saved_tensors
        d_y = d_y.contiguous()
        d_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        d_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # an expert with no rows: 0
        d_xs = d_x.split(ctx.counts) if d_x is not None else [None] * len(ctx.counts)
        for e, (x_e, dy_e, dx_e) in enumerate(zip(x.split(ctx.counts), d_y.split(ctx.counts), d_xs)):
            if not ctx.counts[e]:
                continue
            if dx_e is not None:
                torch.mm(dy_e, weight[e], out=dx_e)
            if d_w is not None:
                torch.mm(dy_e.t(), x_e, out=d_w[e])
        return d_x, d_w, None


class _GroupedLoRALinear(torch.autograd.Function):
    """_GroupedLinear plus each expert's LoRA update: x_e W_e^T + scale (x_e A_e^T) B_e^T, A (E, r,
    in), B (E, out, r), the low-rank product added into each expert's output rows in place
    (addmm) and its gradients in closed form: with u = x A_e^T (saved, (S, r)) and v = dy B_e,
    dx = dy W_e + scale v A_e, dA_e = scale v^T x, dB_e = scale dy^T u. Through autograd (separate
    matmuls, an (S, out) add and scale) the updates took 45% on top of the frozen layer's forward
    and backward (64 experts of 512, dim 1024, rank 16, 2048 tokens, bf16, 2 AMD EPYC cores: 435 ->
    660 ms), here 22% (530 ms); their matmuls alone are ~12%."""

    @staticmethod
    def forward(ctx, x, weight, a, b, counts, scale):
        y = x.new_empty(x.shape[0], weight.shape[1])
        u = x.new_empty(x.shape[0], a.shape[1])
        for e, (x_e, y_e, u_e) in enumerate(zip(x.split(counts), y.split(counts), u.split(counts))):
            if counts[e]:
                torch.mm(x_e, a[e].t(), out=u_e)
                torch.mm(x_e, weight[e].t(), out=y_e)
                y_e.addmm_(u_e, b[e].t(), alpha=scale)
        ctx.save_for_backward(x, weight, a, b, u)
        ctx.counts, ctx.scale = counts, scale
        return y

    @staticmethod
    def backward(ctx, d_y):
        x, weight, a, b, u = ctx.saved_tensors
        counts, scale = ctx.counts, ctx.scale
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        d_y = d_y.contiguous()
        d_x = torch.empty_like(x) if need_x else None
        d_w = torch.zeros_like(weight) if need_w else None  # an expert with no rows: 0
        d_a = torch.zeros_like(a) if need_a else None
        d_b = torch.zeros_like(b) if need_b else None
        v = x.new_empty(max(counts), a.shape[1])  # one expert's dy B_e
        d_xs = d_x.split(counts) if need_x else [None] * len(counts)
        for e, (x_e, dy_e, u_e, dx_e) in enumerate(zip(x.split(counts), d_y.split(counts), u.split(counts), d_xs)):
            n = counts[e]
            if not n:
                continue
            torch.mm(dy_e, b[e], out=v[:n])
            if dx_e is not None:
                torch.mm(dy_e, weight[e], out=dx_e)
                dx_e.addmm_(v[:n], a[e], alpha=scale)
            if d_w is not None:
                torch.mm(dy_e.t(), x_e, out=d_w[e])
            if d_a is not None:
                d_a[e].addmm_(v[:n].t(), x_e, alpha=scale)
            if d_b is not None:
                d_b[e].addmm_(dy_e.t(), u_e, alpha=scale)
        return d_x, d_w, d_a, d_b, None, None


def moe_experts_lora(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, factors: tuple, scale: float, grouped: bool | None = None) -> torch.Tensor:
    """moe_experts_sorted's function with LoRA updates of the experts (MoEMLP.add_lora): factors =
    (gate_up A (E, r, C), gate_up B (E, 2 * hidden, r), down A (E, r, hidden), down B (E, C, r)),
    None for a projection without one. Each projection x W_e^T + scale (x A_e^T) B_e^T, the
    low-rank products as their own matmuls per expert: no (E, out, in) update is formed, no weight
    gradient of the frozen experts either. Tokens sorted by expert; each projection one matmul per
    expert (the shares read on the host), or on CUDA in bf16 torch's grouped GEMM (device offsets;
    rank a multiple of 8: its 16-byte row alignment); grouped True / False forces the choice."""
    if grouped is None:
        rank = factors[0 if factors[0] is not None else 2].shape[1]
        grouped = x.is_cuda and _grouped_mm_takes(x, gate_up) and rank % 8 == 0

    def compute(xs, flat, gate_up, down, gate_up_a, gate_up_b, down_a, down_b):
        if grouped:
            counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=xs.device).scatter_add_(
                0, flat, torch.ones_like(flat))
            offsets = counts.cumsum(0).to(torch.int32)

            def linear(t, w):
                return F.grouped_mm(t, w.transpose(-2, -1), offs=offsets)

            def project(t, w, a, b):  # the scale on B (E, out, r), not on the (S, out) product
                return linear(t, w) if a is None else linear(t, w) + linear(linear(t, a), b * scale)
        else:
            counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()

            def project(t, w, a, b):
                return _GroupedLinear.apply(t, w, counts) if a is None else _GroupedLoRALinear.apply(t, w, a, b, counts, scale)

        act = _swiglu(project(xs, gate_up, gate_up_a, gate_up_b))  # (S, hidden)
        return project(act, down, down_a, down_b)  # (S, C)

    return _through_experts(x, experts, weights, gate_up, down, compute, *factors)


def moe_experts_one_token(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor) -> torch.Tensor:
    """moe_experts_sorted's function for a single token x (1, C): its k experts' gate / up rows
    computed one expert at a time into one (k, 2 * hidden) tensor, one SwiGLU, the k down
    projections, weighted and added up in the sorted path's order and rounding. No sort, no scatter:
    1.4-1.6 ms against the sorted path's 1.86 and transformers' grouped_mm's 1.74-1.79 per layer (64
    experts, 8 chosen, dim 1024, hidden 512, bf16, 2 AMD EPYC cores; the experts' weights are read
    once either way)."""
    chosen = experts[0].tolist()
    order = sorted(range(len(chosen)), key=chosen.__getitem__)  # by expert, the order the sorted path adds in
    h = _swiglu(torch.cat([F.linear(x, gate_up[chosen[j]]) for j in order]))  # (k, hidden)
    ys = torch.cat([F.linear(h[i:i + 1], down[chosen[j]]) for i, j in enumerate(order)])  # (k, C)
    ys = ys * weights[0, order, None].to(ys.dtype)
    out = ys[:1]
    for i in range(1, len(order)):  # one rounding per add, as index_add_: a token decoded alone or in a batch alike
        out = out + ys[i:i + 1]
    return out


def moe_experts_gathered(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                         down: torch.Tensor, factors: tuple | None = None, scale: float | None = None) -> torch.Tensor:
    """moe_experts_sorted's function with no host read and no data-dependent shape: each (token,
    choice) pair's expert weights gathered, (N * k, 2 * hidden, C) and (N * k, C, hidden), and
    batched matmuls. For a few tokens (decoding; CUDA graphs) and under torch.func (vmap takes no
    data-dependent shape): its memory is N * k experts. factors, scale: LoRA's, as moe_experts_lora's
    (each pair's A_e and B_e gathered too; the low-rank product as two matmuls, no update formed)."""
    N, k = experts.shape
    flat = experts.flatten()  # (N * k,)
    gate_up_a, gate_up_b, down_a, down_b = factors or (None,) * 4

    def project(t, w, a, b):  # t (N * k, in) -> (N * k, out), each pair by its expert's weights
        y = torch.bmm(w[flat], t[:, :, None])
        if a is not None:
            y = y + torch.bmm(b[flat], torch.bmm(a[flat], t[:, :, None])) * scale
        return y.squeeze(-1)

    xs = x.repeat_interleave(k, dim=0)  # (N * k, C)
    h = _swiglu(project(xs, gate_up, gate_up_a, gate_up_b))  # (N * k, hidden)
    ys = project(h, down, down_a, down_b)  # (N * k, C)
    return (ys * weights.flatten()[:, None].to(ys.dtype)).view(N, k, -1).sum(1)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA, Hu et al. 2021):
    y = x W^T + b + (alpha / rank) * (dropout(x) A^T) B^T, with A (rank, in) drawn as nn.Linear draws
    its weights (as PEFT does) and B (out, rank) zeros, so the layer starts as its base did. weight
    and bias keep nn.Linear's names (a state dict reads as the base's plus lora_a, lora_b; merge_lora
    folds the update in). frozen_dtype: hold the frozen weight and bias in it (the compute dtype of
    a bf16 / fp16 run: half the memory, no cast per forward); the updates keep the base's dtype.

    parts: for a layer that fuses several projections (q, k, v; gate, up), their output sizes in
    order, each with whether it is adapted: every adapted part gets an update of its own, as PEFT
    gives each projection (A stacks their A_i, (parts * rank, in); B their B_i, (adapted rows,
    rank); the update is B's blocks on the diagonal times A, 0 for the parts left out). The layout
    is kept in a `lora_parts` buffer, so a state dict says how to merge it. None: one update over
    the whole output (no buffer).
    dropout: PEFT's lora_dropout, on the update's input only."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, frozen_dtype: torch.dtype | None = None,
                 parts: list[tuple[int, bool]] | None = None, dropout: float = 0.0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRALinear: rank must be an int >= 1, got {rank!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        if frozen_dtype is None:
            self.weight, self.bias = base.weight, base.bias  # the same Parameters, frozen
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        else:
            self.weight = nn.Parameter(base.weight.detach().to(frozen_dtype), requires_grad=False)
            self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(frozen_dtype),
                                                                    requires_grad=False)
        if parts is not None and (sum(rows for rows, _ in parts) != self.out_features
                                  or not any(adapted for _, adapted in parts)):
            raise ValueError(f"LoRALinear: parts {parts} must split the {self.out_features} outputs and adapt one")
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        n_adapted = 1 if parts is None else sum(adapted for _, adapted in parts)
        adapted_rows = self.out_features if parts is None else sum(rows for rows, adapted in parts if adapted)
        self.lora_a = nn.Parameter(torch.empty(n_adapted * rank, self.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(adapted_rows, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # fan_in = in: each A_i drawn as alone
        # The layout as Python for the forward (reading the buffer there would sync with the GPU),
        # and as a buffer in the state dict for merging from it.
        self.parts = None if parts is None else tuple((int(rows), bool(adapted)) for rows, adapted in parts)
        if parts is not None:
            self.register_buffer("lora_parts", torch.tensor([[rows, int(adapted)] for rows, adapted in self.parts]))
        self.disabled = False  # the base layer alone (LLM.lora_disabled: the reference model of DPO)

    def reset_parameters(self) -> None:
        """The update as it starts (A drawn as PEFT's, B zeros), the parts buffer from self.parts; the
        frozen weights are the base layer's, left as they are (LLM.init_weights draws them)."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        self._write_parts()

    def _write_parts(self) -> None:
        if self.parts is not None:
            with torch.no_grad():
                self.lora_parts.copy_(torch.tensor([[rows, int(adapted)] for rows, adapted in self.parts]))

    def _apply(self, fn, recurse=True):
        # a meta-device model's to_empty leaves the buffer unset (the merge reads it): written anew
        before = getattr(self, "lora_parts", None)
        super()._apply(fn, recurse)
        if before is not None and before.is_meta and not self.lora_parts.is_meta:
            self._write_parts()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        # The frozen weights may be held in the training's 16-bit dtype (frozen_dtype): autocast casts
        # x to it; outside autocast (sampling, eval in fp32) the weights follow x.
        if weight.dtype != x.dtype and not _autocast_on(x):
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        if self.disabled:
            return F.linear(x, weight, bias)
        h = F.linear(F.dropout(x, self.dropout, self.training) if self.dropout else x, self.lora_a)
        return F.linear(x, weight, bias) + F.linear(h, lora_b_full(self.lora_b, self.parts)) * self.scale


def lora_b_full(lora_b: torch.Tensor, parts) -> torch.Tensor:
    """B of a LoRALinear as one (out, parts * rank) matrix: its per-part blocks B_i on the diagonal,
    zero rows for the parts left out; B itself for a single update (parts None). parts: LoRALinear's
    layout, [(rows, adapted)], or its lora_parts buffer."""
    if parts is None:
        return lora_b
    if isinstance(parts, torch.Tensor):
        parts = parts.tolist()
    rank, n = lora_b.shape[1], sum(1 for _, adapted in parts if adapted)
    blocks, row, k = [], 0, 0
    for rows, adapted in parts:
        if adapted:
            blocks.append(F.pad(lora_b[row:row + rows], (k * rank, (n - 1 - k) * rank)))
            row, k = row + rows, k + 1
        else:
            blocks.append(lora_b.new_zeros(rows, n * rank))
    return torch.cat(blocks)


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
               parts: torch.Tensor | None = None) -> torch.Tensor:
    """W + scale * B A, summed in fp32 at least (a bf16 model's update can be below its weights' rounding
    step one element at a time, not in the product), in the wider of the weight's and the update's
    dtypes (bf16-held weights with fp32 updates: fp32). parts: LoRALinear's layout (lora_b_full)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    update = lora_b_full(lora_b.to(acc), parts) @ lora_a.to(acc)
    if update.shape != weight.shape:  # (not broadcast: a (1, r) B had added one row to every row)
        raise ValueError(f"merge_lora: B {tuple(lora_b.shape)} @ A {tuple(lora_a.shape)} is no update of a weight of "
                         f"shape {tuple(weight.shape)}")
    merged = weight.to(acc) + update * scale
    return merged.to(torch.promote_types(weight.dtype, lora_a.dtype))


def _rows_times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a chunk a of a few rows or more. Under 4 rows padded to 4 with zeros: the CPU BLAS
    takes 1-3 rows as matrix-vector products, which round worse than its matrix products on some
    CPUs (AMD EPYC: dx of a 1000-long sum at 5.7e-7 against 2.4e-7 relative, fp32), enough to
    leave twice torch's own error in the fused losses' one-row chunks."""
    if a.shape[0] >= 4 or not a.is_cpu:
        return a @ b
    return (torch.cat([a, a.new_zeros(4 - a.shape[0], a.shape[1])]) @ b)[:a.shape[0]]


def _final_logits(logits: torch.Tensor, scale: float, softcap: float):
    """The logits a model's output layer gives from x W^T (logits: a fresh fp32 (c, V) chunk,
    overwritten): times scale (Granite's 1 / logits_scaling, Cohere's logit_scale), then capped as
    softcap * tanh(z / softcap) when softcap (Gemma 2's final logits). -> (the logits, the tanh or
    None): the tanh is kept for the chain rule, d cap / dz = 1 - tanh^2 (an extra (c, V) buffer)."""
    if scale != 1.0:
        logits.mul_(scale)
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _through_final(grad: torch.Tensor, tanh: torch.Tensor | None, scale: float) -> torch.Tensor:
    """A gradient for _final_logits' logits -> for x W^T, in place (tanh is used up)."""
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1))
    if scale != 1.0:
        grad.mul_(scale)
    return grad


def _row_slices(rows: int, width: int) -> list[slice]:
    """Slices of ~1 M elements (4 MiB in fp32) over the rows of a (rows, width) tensor: an elementwise
    pass that widens or narrows a (V, C) weight gradient runs a slice at a time on the CPU, so its
    temporaries are small blocks malloc keeps handing back rather than a fresh (V, C) buffer's page
    faults (see _ChunkBuffers)."""
    step = max(1, (1 << 20) // width)
    return [slice(start, start + step) for start in range(0, rows, step)]


class _ChunkBuffers:
    """What one fused output-layer loss call (x (N, C), weight (V, C)) writes chunk after chunk, in
    buffers made once per call: each chunk's logits (c, V), the 16-bit product grad^T x (V, C) and
    grad_w, the fp32 (at least) sum of those products. On the CPU a fresh buffer of tens of MB pays
    its page faults at first touch every time (malloc gives such blocks back to the kernel when they
    are freed): at 512 bf16 rows of SmolLM2's head, x W^T took 26 ms into a fresh tensor and 14 into a
    reused one, grad^T x 35 and 20, and adding the bf16 product into fp32 33 ms with add_ (which
    widens the whole product into a fresh copy first) and 10 slice by slice (2-core Xeon, 2026-12-02)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, chunk_rows: int, need_w: bool):
        # (not sym_min: a buffer of Min(chunk_rows, N) rows sliced to N gives the guard
        # N <= Min(chunk_rows, N), which a dynamic N cannot prove)
        rows = x.shape[0] if x.shape[0] <= chunk_rows else chunk_rows
        self.rows, self.vocab, self.device = rows, weight.shape[0], x.device
        self.buffers, self.product = {}, None
        # grad_w is written whole by the first chunk's product; zeros only where no chunk comes
        acc = torch.promote_types(weight.dtype, torch.float32)
        self.grad_w = (weight.new_empty(weight.shape, dtype=acc) if x.shape[0] != 0 else
                       weight.new_zeros(weight.shape, dtype=acc)) if need_w else None
        self.written = False

    def buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, V) buffer of dtype, the same memory at every chunk."""
        if name not in self.buffers:
            self.buffers[name] = torch.empty((self.rows, self.vocab), dtype=dtype, device=self.device)
        return self.buffers[name][:rows]

    def logits(self, xc: torch.Tensor, weight: torch.Tensor, name: str = "logits") -> torch.Tensor:
        """xc W^T (c, V) in x's dtype, as nn.Linear, over the previous chunk's."""
        return torch.mm(xc, weight.t(), out=self.buffer(name, xc.shape[0], xc.dtype))

    def add_grads(self, grad: torch.Tensor, xc: torch.Tensor, weight: torch.Tensor, rows: slice, grad_x) -> None:
        """A chunk of rows' share of the gradients, from its logits' gradient grad (c, V) in x's dtype:
        grad_x's rows (grad W) and grad_w += grad^T x, summed in fp32 (a 16-bit chunk product rounds
        once)."""
        if grad_x is not None:
            grad_x[rows] = _rows_times(grad, weight)
        grad_w = self.grad_w
        if grad_w is None:
            return
        if xc.dtype == grad_w.dtype:
            if self.written:
                grad_w.addmm_(grad.t(), xc)
            else:
                torch.mm(grad.t(), xc, out=grad_w)
        else:
            if self.product is None:
                self.product = xc.new_empty(weight.shape)
            product = torch.mm(grad.t(), xc, out=self.product)
            if not self.written:
                grad_w.copy_(product)
            elif grad_w.is_cpu:
                for part in _row_slices(*grad_w.shape):
                    grad_w[part].add_(product[part].to(grad_w.dtype))
            else:  # the kernel widens as it adds
                grad_w.add_(product)
        self.written = True


def _scaled_grad_w(grad_w: torch.Tensor, grad_total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_w (fp32 at least) times the loss's incoming gradient, in the weight's dtype; a 16-bit
    weight's on the CPU a slice at a time (the whole fp32 product first was a fresh (V, C) buffer's
    page faults: 44 -> 22 ms at SmolLM2's head, 2-core Xeon, 2026-12-02)."""
    if grad_w.dtype == dtype or not grad_w.is_cpu:
        return (grad_w * grad_total).to(dtype)
    out = torch.empty(grad_w.shape, dtype=dtype)
    for part in _row_slices(*grad_w.shape):
        out[part] = grad_w[part] * grad_total
    return out


def _refuse_create_graph(name: str) -> None:
    """The fused losses' backwards return gradients made in the forward: constants to autograd. Under
    create_graph=True (a gradient penalty, a Hessian-vector product) they came back detached and a
    term built on them got no gradient, without a word: refused instead."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"pyllm.nn.{name}: no second derivative (a backward with create_graph=True): its gradients are made in "
            "the forward and have no graph; compute such a term with torch's ops (F.linear + F.cross_entropy)")


def _saved_grads_times(ctx, grad_total: torch.Tensor, n_other_inputs: int) -> tuple:
    """The backward of a loss whose gradients the forward made and saved (grad_x, grad_w): them
    times the loss's incoming gradient, None for the other inputs."""
    _refuse_create_graph(ctx.name)
    grad_x, grad_w = ctx.saved_tensors
    # (the product in fp32: grad_total (1 / n, a micro-step's weight) rounded to bf16 first biased
    # every gradient by up to 2^-9)
    acc = None if grad_x is None else torch.promote_types(grad_x.dtype, torch.float32)
    return (None if grad_x is None else (grad_x.to(acc) * grad_total.to(acc)).to(grad_x.dtype),
            None if grad_w is None else _scaled_grad_w(grad_w, grad_total, ctx.weight_dtype),
            *([None] * n_other_inputs))


def _linear_cross_entropy_with_grads(x, weight, targets, chunk_rows: int, need_x: bool, need_w: bool,
                                     scale: float = 1.0, softcap: float = 0.0, label_smoothing: float = 0.0,
                                     z_loss: float = 0.0, grad_rows=None, rows_out=None, stats_out=None,
                                     token_scaling: bool = False, predicted_out=None):
    """_LinearCrossEntropy's forward: (the sum of losses, the z-loss's share of it (a tensor; 0
    without z_loss), grad_x or None, grad_w (fp32 at least) or None). grad_rows (N,), fp32 at least:
    the gradients are of each row's loss times its entry (reduction "none"'s backward). rows_out:
    (losses, z-loss shares), (N,) each, written per row. stats_out: (N, 3) in the losses' dtype,
    each row's entropy, 1.0 where its target is the argmax and its mean logit
    (cross_entropy_ops.token_stats'). token_scaling: each row's loss, z-loss share and gradient
    times its target's probability, held constant (DFT). predicted_out: (N,) int64, each row's argmax
    over its final logits, -1 where ignored (Liger's predicted tokens)."""
    acc = torch.promote_types(x.dtype, torch.float32)  # the logits' dtype, fp32 at least
    # chunk sums add up without drift
    total, z_total = (torch.zeros((), dtype=torch.float64, device=x.device) for _ in range(2))
    grad_x = torch.empty_like(x) if need_x else None
    buffers = _ChunkBuffers(x, weight, chunk_rows, need_w)
    vocab = weight.shape[0]

    # A chunk's tensors other than buffers' are its function's locals, freed at its return, before the
    # next chunk makes its own (a loop body's names would keep two chunks' alive at once).
    def chunk(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        xc, tc = x[rows], targets[rows]
        logits = buffers.logits(xc, weight)  # (c, V) in x's dtype
        if cross_entropy_ops.takes(logits):  # one kernel pass per row; the gradient lands over the logits
            if predicted_out is not None:  # (before the gradient overwrites the logits; torch ops: a metric asked for)
                predicted_out[rows] = cross_entropy_ops.predicted_of(logits, tc, -1, scale, softcap)
            loss, z_rows = cross_entropy_ops.cross_entropy_rows_(
                logits, tc, ignore_index=-1, scale=scale, softcap=softcap, label_smoothing=label_smoothing,
                z_loss=z_loss, want_grad=need_x or need_w, grad_rows=None if grad_rows is None else grad_rows[rows],
                stats=None if stats_out is None else stats_out[rows], token_scaling=token_scaling)
            if need_x or need_w:
                buffers.add_grads(logits, xc, weight, rows, grad_x)
            if rows_out is not None:
                rows_out[0][rows], rows_out[1][rows] = loss, z_rows
            return loss.sum(), z_rows.sum()
        # elsewhere (fp64 on CUDA, devices without kernels) in torch ops: scaled and capped in fp32
        logits, tanh = _final_logits(logits.to(acc), scale, softcap)
        valid = tc != -1
        if predicted_out is not None:  # (from the final logits made once for the loss: predicted_of's values)
            predicted_out[rows] = torch.where(valid, logits.argmax(dim=-1), -1)
        # A target outside [0, V) that is not ignored gives its row NaN, loss and gradient, as the
        # kernels do (clamped, it had been read as word 0: HF's -100 with the default ignore_index);
        # found on the device, without a host sync.
        bad = ((tc < -1) | (tc >= vocab))[:, None]
        picked = tc.clamp(min=0, max=vocab - 1)[:, None]
        # label smoothing's target: (1 - e) on the label, e / V on every word (the label's included)
        target_logit = logits.gather(1, picked)[:, 0] * (1 - label_smoothing)
        if label_smoothing:
            target_logit += logits.mean(dim=-1) * label_smoothing
        if stats_out is not None:  # (before the exp pass below overwrites the logits)
            stats_out[rows] = cross_entropy_ops.stats_of_shaped(logits, tc, valid)
        # One exp pass, in place: exp(logits - max) gives both the log-sum-exp and the softmax.
        top = logits.amax(dim=-1, keepdim=True)
        sums = logits.sub_(top).exp_().sum(dim=-1)  # (c,)
        lse = top[:, 0] + sums.log()
        z_rows = z_loss * lse.square() if z_loss else lse.new_zeros(())
        # DFT: each row times its target's probability, a constant (torch's softmax's rounding)
        w = logits.gather(1, picked)[:, 0] / sums if token_scaling else None
        if w is not None:
            z_rows = z_rows * w
        if need_x or need_w:
            # d(sum of losses) / d logits = softmax (1 + 2 z lse) - the smoothed one_hot, 0 on ignored rows
            grad = logits.div_(sums[:, None])
            if z_loss:
                grad.mul_((1 + 2 * z_loss * lse)[:, None])
            grad.scatter_add_(1, picked, -(1 - label_smoothing) * valid[:, None].to(grad.dtype))
            if label_smoothing:
                grad.sub_(label_smoothing / vocab)
            row_factor = valid if grad_rows is None else grad_rows[rows] * valid
            grad.mul_((row_factor if w is None else row_factor * w)[:, None])
            grad = _through_final(grad.masked_fill_(bad, math.nan), tanh, scale)
            buffers.add_grads(grad.to(x.dtype), xc, weight, rows, grad_x)
        losses = lse - target_logit if w is None else (lse - target_logit) * w
        losses = ((losses + z_rows) * valid).masked_fill_(bad[:, 0], math.nan)
        if rows_out is not None:
            rows_out[0][rows], rows_out[1][rows] = losses, z_rows * valid
        return losses.sum(), (z_rows * valid).sum()

    for rows in chunk_slices(x.shape[0], chunk_rows):
        loss, z_part = chunk(rows)
        total += loss
        z_total += z_part
    return total.to(acc), z_total.to(acc), grad_x, buffers.grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(x W^T, targets) (targets -1 ignored), its gradients computed
    in the forward, chunk by chunk (Liger-Kernel's fused linear cross-entropy, in torch ops): the
    (rows, vocab) logits exist one chunk at a time, never whole, and are not kept for the backward.
    -> (the loss, its z-loss share, the rows' token statistics (N, 3) (want_stats; else (0, 3)),
    these two not differentiable: for the log)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, scale, softcap, label_smoothing, z_loss, want_stats=False,
                token_scaling=False, want_predicted=False):
        ctx.name = "linear_cross_entropy"
        ctx.weight_dtype, weight = weight.dtype, weight.to(x.dtype)  # (see _fused_linear_inputs)
        # x (N, C), weight (V, C), targets (N,)
        stats, predicted = _stats_buffer(x, want_stats), _predicted_buffer(x, want_predicted)
        total, z_total, grad_x, grad_w = _linear_cross_entropy_with_grads(
            x, weight, targets, chunk_rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1], scale, softcap,
            label_smoothing, z_loss, stats_out=stats if want_stats else None, token_scaling=token_scaling,
            predicted_out=predicted if want_predicted else None)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.mark_non_differentiable(z_total, stats, predicted)
        return total, z_total, stats, predicted

    @staticmethod
    def backward(ctx, grad_total, _, __, ___):
        return _saved_grads_times(ctx, grad_total, 9)


def _stats_buffer(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    """The fused losses' per-row token statistics: (N, 3) in the losses' dtype, (0, 3) when not wanted."""
    return x.new_empty((x.shape[0] if wanted else 0, cross_entropy_ops.STATS),
                       dtype=torch.promote_types(x.dtype, torch.float32))


def _predicted_buffer(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    """The fused loss's per-row argmax (Liger's predicted tokens): (N,) int64, (0,) when not wanted."""
    return x.new_empty(x.shape[0] if wanted else 0, dtype=torch.long)


class _LinearCrossEntropyRows(torch.autograd.Function):
    """Each row's cross_entropy(x W^T, target) (reduction "none"), chunk by chunk. A row's weight in
    the gradient (its incoming gradient: a per-token weighting, a mask) is known only in the
    backward, so, as linear_token_logps', the backward recomputes each chunk's logits from x: one
    more (rows x C x V) matmul than the summed loss's (Liger's reduction "none" likewise since 2026-07:
    before, its gradients were all weighted by the first row's). -> (losses, z-loss shares), (N,)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, scale, softcap, label_smoothing, z_loss, want_stats=False,
                token_scaling=False, want_predicted=False):
        ctx.name = "linear_cross_entropy"
        ctx.weight_dtype, weight = weight.dtype, weight.to(x.dtype)  # (see _fused_linear_inputs)
        acc = torch.promote_types(x.dtype, torch.float32)
        losses, z_rows = (torch.empty(x.shape[0], dtype=acc, device=x.device) for _ in range(2))
        stats, predicted = _stats_buffer(x, want_stats), _predicted_buffer(x, want_predicted)
        _linear_cross_entropy_with_grads(x, weight, targets, chunk_rows, False, False, scale, softcap,
                                         label_smoothing, z_loss, rows_out=(losses, z_rows),
                                         stats_out=stats if want_stats else None, token_scaling=token_scaling,
                                         predicted_out=predicted if want_predicted else None)
        ctx.save_for_backward(x, weight, targets)
        ctx.args = (chunk_rows, scale, softcap, label_smoothing, z_loss, token_scaling)
        ctx.mark_non_differentiable(z_rows, stats, predicted)
        return losses, z_rows, stats, predicted

    @staticmethod
    def backward(ctx, grad_rows, _, __, ___):
        _refuse_create_graph(ctx.name)
        x, weight, targets = ctx.saved_tensors
        chunk_rows, scale, softcap, label_smoothing, z_loss, token_scaling = ctx.args
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = grad_rows.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
        _, _, grad_x, grad_w = _linear_cross_entropy_with_grads(
            x, weight, targets, chunk_rows, need_x, need_w, scale, softcap, label_smoothing, z_loss, grad_rows,
            token_scaling=token_scaling)
        return (grad_x, None if grad_w is None else grad_w.to(ctx.weight_dtype), *([None] * 9))


class LinearCrossEntropyStats(NamedTuple):
    """linear_cross_entropy's output with return_token_stats, each reduced as the loss: "sum" the
    sums over the counted targets (token_accuracy: how many are the argmax), "mean" their means (TRL's
    SFT metrics mean_token_accuracy and entropy), "none" per row (0 where ignored)."""
    loss: torch.Tensor
    z_loss: torch.Tensor  # (0 without z_loss)
    token_accuracy: torch.Tensor
    entropy: torch.Tensor


class LinearCrossEntropyPredictions(NamedTuple):
    """linear_cross_entropy's output with return_predicted_tokens: LinearCrossEntropyStats' fields, and
    each row's argmax over its final logits (Liger-Kernel's predicted tokens: int64, targets' shape,
    the first of equal maxima as torch.argmax, -1 where the target is ignored)."""
    loss: torch.Tensor
    z_loss: torch.Tensor  # (0 without z_loss)
    token_accuracy: torch.Tensor
    entropy: torch.Tensor
    predicted_tokens: torch.Tensor


@overload
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: Literal[False] = False, ignore_index: int = -1,
                         reduction: str = "sum", return_token_stats: Literal[False] = False,
                         token_scaling: bool = False,
                         return_predicted_tokens: Literal[False] = False) -> torch.Tensor: ...


@overload
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: Literal[True], ignore_index: int = -1,
                         reduction: str = "sum", return_token_stats: Literal[False] = False,
                         token_scaling: bool = False,
                         return_predicted_tokens: Literal[False] = False) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: bool = False, ignore_index: int = -1,
                         reduction: str = "sum", return_token_stats: Literal[True],
                         token_scaling: bool = False,
                         return_predicted_tokens: Literal[False] = False) -> LinearCrossEntropyStats: ...


@overload
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: bool = False, ignore_index: int = -1, reduction: str = "sum",
                         return_token_stats: bool = False, token_scaling: bool = False,
                         return_predicted_tokens: Literal[True]) -> LinearCrossEntropyPredictions: ...


@overload
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: bool = False, ignore_index: int = -1, reduction: str = "sum",
                         return_token_stats: bool = False, token_scaling: bool = False,
                         return_predicted_tokens: bool = False
                         ) -> (torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LinearCrossEntropyStats
                               | LinearCrossEntropyPredictions): ...


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         return_z_loss: bool = False, ignore_index: int = -1, reduction: str = "sum",
                         return_token_stats: bool = False, token_scaling: bool = False,
                         return_predicted_tokens: bool = False
                         ) -> (torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LinearCrossEntropyStats
                               | LinearCrossEntropyPredictions):
    """The sum over rows of F.cross_entropy(x @ weight.T, targets), -1 targets ignored, in fp32, with
    its gradients for x and weight computed chunk by chunk in the forward (a fused linear
    cross-entropy): memory O(chunk_rows * vocab) for the logits instead of O(rows * vocab) twice
    (logits and their gradient), no recomputation. x (..., C), weight (V, C), targets (...).
    Under autocast, x and weight are cast to its dtype first, as nn.Linear would be. chunk_rows:
    rows of logits at a time (default: as many as 64 MiB of logits hold, at least 1: in x's dtype
    where pyllm's cross-entropy kernel runs (the CPU; CUDA with PYLLM_CROSS_ENTROPY_CUDA=1 until
    that kernel is verified on a GPU), fp32 elsewhere).
    scale, softcap: the logits are z = scale * (x @ weight.T) (Granite's 1 / logits_scaling,
    Cohere's logit_scale), then softcap * tanh(z / softcap) when softcap is given (Gemma 2's
    final_logit_softcapping), both in fp32.
    label_smoothing: F.cross_entropy's (the target (1 - e) on the label plus e / V on every word).
    z_loss: adds z_loss * logsumexp(logits)^2 for each counted row (PaLM's auxiliary loss, 1e-4 there,
    keeping the softmax's normaliser near 1; Liger-Kernel's lse_square_scale). return_z_loss: ->
    (the loss, that term's share of it, detached: for the log) instead of the loss.
    ignore_index, reduction: for code written against Liger-Kernel's fused loss (whose defaults are
    -100 and "mean"): the targets to skip (-1 by default, pyllm's), and "sum" (pyllm's default),
    "mean" over the targets counted (NaN when none is, as F.cross_entropy's) or "none": each row's
    loss, targets' shape (0 where ignored; with return_z_loss each row's z-loss share too), for a
    weighting of your own; its backward recomputes the logits chunk by chunk (one more matmul of the
    output layer: the rows' weights are known only then).
    return_token_stats: -> LinearCrossEntropyStats(loss, z_loss, token_accuracy, entropy) (whatever
    return_z_loss), TRL's SFT metrics from the same pass over each chunk: whether each target is the
    argmax of its logits (the first of equal maxima, as torch.argmax) and the entropy of their
    softmax (the final logits': scaled and capped), detached, reduced as the loss.
    token_scaling: each row's loss (z-loss and smoothing in it) and its gradients times its target's
    probability softmax(z)[target], held constant (DFT, Dynamic Fine-Tuning, arXiv 2508.05629: TRL's
    SFT loss_type "dft", Liger-Kernel's use_token_scaling), from the same pass; "mean" still divides
    by the counted targets, the z-loss share returned is the scaled one.
    return_predicted_tokens: -> LinearCrossEntropyPredictions, return_token_stats' fields and each
    row's argmax over its final logits (Liger-Kernel's predicted tokens: int64, targets' shape, -1
    where ignored), read from each chunk of logits before its gradient overwrites it (torch ops: one
    more read of the logits, only when asked)."""
    _check_reduction("linear_cross_entropy", reduction)
    _check_targets("linear_cross_entropy", x, targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):  # (True had been class 1)
        raise TypeError(f"linear_cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")
    targets = targets.long()  # (narrower ints: -100 would wrap to a class in uint8, -1 too in masked_fill)
    if ignore_index != -1:
        # Another ignore_index makes -1 a class out of range, as in torch (it had been skipped silently):
        # NaN for its row, as any target out of range. (One no int64 holds ignores nothing.)
        ignored = targets == ignore_index if -2**63 <= ignore_index < 2**63 else None
        minus_one = targets == -1
        vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else 0
        if targets.is_cpu and not _util.values_unreadable(targets):  # (free on the CPU)
            # any target out of range, -1 among them, named with the caller's ignore_index (the
            # kernel's own message would name -1, the sentinel it is given)
            out = (targets < 0) | (targets >= vocab)
            if ignored is not None:
                out &= ~ignored
            if bool(out.any()):
                row = int(out.reshape(-1).nonzero()[0])
                raise ValueError(f"linear_cross_entropy: a target of {int(targets.reshape(-1)[row])} is out of range "
                                 f"[0, {vocab}) with ignore_index={ignore_index} (row {row}), as in F.cross_entropy")
        targets = targets.masked_fill(minus_one, vocab)
        if ignored is not None:
            targets = targets.masked_fill(ignored, -1)
    x, weight, chunk_rows = _fused_linear_inputs(x, weight, chunk_rows, softcap, cross_entropy_ops.takes)
    scale, softcap = _logit_shape("linear_cross_entropy", scale, softcap)
    label_smoothing, z_loss = _smoothing_and_z_loss("linear_cross_entropy", label_smoothing, z_loss)
    return_token_stats = return_token_stats or return_predicted_tokens
    predicted = None
    with _autocast_off(x):
        if _util.torch_func_active() or _util.exporting():
            # torch.func (per-example gradients) and torch.export (which inlines an autograd.Function's forward
            # and drops its backward) cannot take the gradients this Function computes in
            # its forward: the whole logits, and pyllm.cross_entropy's derivative, which it can.
            acc = torch.promote_types(x.dtype, torch.float32)
            logits = F.linear(x, weight.to(x.dtype))
            loss, z_part = cross_entropy_ops.cross_entropy(
                logits, targets.reshape(-1), ignore_index=-1, scale=scale,
                reduction="none" if reduction == "none" else "sum", softcap=softcap or None,
                label_smoothing=label_smoothing, z_loss=z_loss, return_z_loss=True, token_scaling=token_scaling)
            loss, z_part = loss.to(acc), z_part.detach().to(acc)
            if return_token_stats:
                entropy, top1, _ = cross_entropy_ops.token_stats(logits, targets.reshape(-1), ignore_index=-1,
                                                                 scale=scale, softcap=softcap or None)
                stats = torch.stack([entropy, top1.to(entropy.dtype)], dim=1).to(acc)
            if return_predicted_tokens:
                predicted = cross_entropy_ops.predicted_of(logits.detach(), targets.reshape(-1), -1, scale, softcap)
        else:
            function = _LinearCrossEntropyRows if reduction == "none" else _LinearCrossEntropy
            loss, z_part, stats, predicted = function.apply(
                x, weight, targets.reshape(-1), chunk_rows, scale, softcap, label_smoothing, z_loss,
                return_token_stats, bool(token_scaling), bool(return_predicted_tokens))
    if return_token_stats:
        entropy, accuracy = stats[:, 0], stats[:, 1]
        if reduction != "none":  # (summed in fp64, as the loss's chunks are)
            entropy, accuracy = (t.sum(dtype=torch.float64).to(t.dtype) for t in (entropy, accuracy))
    if reduction == "none":
        loss, z_part = loss.view(targets.shape), z_part.view(targets.shape)
        if return_token_stats:
            entropy, accuracy = entropy.view(targets.shape), accuracy.view(targets.shape)
    elif reduction == "mean":
        counted = (targets != -1).sum()
        # NaN when nothing is counted, as F.cross_entropy's, but the gradients stay 0 (they are 0 over
        # every row): a micro-batch of no targets must not poison the weights through 0 / 0.
        loss = _mean_over(loss, counted)
        z_part = z_part / counted
        if return_token_stats:
            entropy, accuracy = entropy / counted, accuracy / counted
    if return_predicted_tokens:
        return LinearCrossEntropyPredictions(loss, z_part, accuracy, entropy, predicted.view(targets.shape))
    if return_token_stats:
        return LinearCrossEntropyStats(loss, z_part, accuracy, entropy)
    return (loss, z_part) if return_z_loss else loss


def _mean_over(total: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """total / counted whose gradient is total's / max(counted, 1): NaN for none counted, as
    F.cross_entropy, with the gradient 0 (total's is 0 then) rather than 0 * inf."""
    return torch.where(counted > 0, total / counted.clamp(min=1), torch.full_like(total, math.nan))


class CrossEntropyLoss(nn.Module):
    """torch.nn.CrossEntropyLoss's arguments in its order (weight, size_average, ignore_index, reduce,
    reduction, label_smoothing; the deprecated size_average / reduce mapped to a reduction as torch
    does) over pyllm.cross_entropy: forward(logits (..., V), targets (...)), classes on the last dim."""

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        if size_average is not None or reduce is not None:
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(size_average, reduce)  # (warns, as torch's)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_ops.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction=self.reduction,
                                               label_smoothing=self.label_smoothing, weight=self.weight)


class LinearCrossEntropyOutput(NamedTuple):
    """LinearCrossEntropyLoss's output with return_z_loss: read by name as Liger's CrossEntropyOutput
    (out.loss, out.z_loss; its token_accuracy and predicted_tokens None, as Liger's unasked ones) or
    unpacked as its tuple had been (loss, z_loss = out)."""
    loss: torch.Tensor
    z_loss: torch.Tensor

    @property
    def token_accuracy(self) -> None:
        return None

    @property
    def predicted_tokens(self) -> None:
        return None


class LinearCrossEntropyAccuracyOutput(NamedTuple):
    """LinearCrossEntropyLoss's output with return_token_accuracy, read by name as Liger's
    CrossEntropyOutput: z_loss None without return_z_loss; token_accuracy the share of counted
    targets that are the argmax ("mean" and "sum"; NaN when none is counted, as Liger's) or each
    row's 1.0 / 0.0 ("none")."""
    loss: torch.Tensor
    z_loss: torch.Tensor | None
    token_accuracy: torch.Tensor

    @property
    def predicted_tokens(self) -> None:  # (Liger's, unasked)
        return None


class LinearCrossEntropyPredictionOutput(NamedTuple):
    """LinearCrossEntropyLoss's output with return_predicted_tokens: Liger's CrossEntropyOutput's
    four fields (z_loss and token_accuracy None where not asked for) and predicted_tokens, each row's
    argmax over its final logits, int64 (rows,), -1 where the target is ignored, as Liger's."""
    loss: torch.Tensor
    z_loss: torch.Tensor | None
    token_accuracy: torch.Tensor | None
    predicted_tokens: torch.Tensor


class LinearCrossEntropyLoss(nn.Module):
    """Liger-Kernel's LigerFusedLinearCrossEntropyLoss over linear_cross_entropy: its arguments in its
    order (ce_weight, ignore_index -100, lse_square_scale as z_loss, label_smoothing, reduction "mean",
    "sum" or "none", softcap, return_z_loss, accum_dtype, use_token_scaling (each row's loss and
    gradient times its target's probability, held constant: DFT, linear_cross_entropy's token_scaling),
    return_token_accuracy, return_predicted_tokens) and its forward's order, forward(lin_weight,
    _input, target): the output layer's weight first. No bias and no class weights (ce_weight must be
    None: pyllm's fused losses take neither); accum_dtype None or float32 (the weight's gradient is
    summed in fp32 either way, the chunks' products in x's dtype). return_z_loss gives a
    LinearCrossEntropyOutput (loss, z_loss), by name as Liger's CrossEntropyOutput, or unpacked as
    its tuple had been. "mean" with every target ignored gives 0, as Liger's (not
    linear_cross_entropy's NaN). return_token_accuracy gives a LinearCrossEntropyAccuracyOutput
    (loss, z_loss, token_accuracy), from the fused loss's own pass (linear_cross_entropy's
    return_token_stats); return_predicted_tokens a LinearCrossEntropyPredictionOutput (loss, z_loss,
    token_accuracy, predicted_tokens), each row's argmax (-1 where ignored, Liger's). fp64 inputs are
    capped in fp64 (Liger's kernel casts to fp32 first): two logits far past the cap, equal after an
    fp32 tanh, keep their order there (the argmax and the accuracy follow the larger)."""

    def __init__(self, ce_weight: torch.Tensor | None = None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                 return_z_loss: bool = False, accum_dtype: torch.dtype | None = None, use_token_scaling: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False):
        if ce_weight is not None:
            raise NotImplementedError("LinearCrossEntropyLoss: class weights (ce_weight) are not taken by pyllm's "
                                      "fused loss; use pyllm.cross_entropy(logits, targets, weight) on the logits")
        if accum_dtype not in (None, torch.float32):
            raise ValueError(f"LinearCrossEntropyLoss: accum_dtype must be None or torch.float32 (the weight's "
                             f"gradient is summed in fp32), got {accum_dtype}")
        # (checked here, naming the module, as Liger's asserts do; they had surfaced at the first forward)
        _check_reduction("LinearCrossEntropyLoss", reduction)
        _smoothing_and_z_loss("LinearCrossEntropyLoss", label_smoothing, lse_square_scale, "lse_square_scale")
        if softcap is not None and softcap == 0:  # (Liger asserts softcap > 0; 0 had been taken as no cap)
            raise ValueError("LinearCrossEntropyLoss: softcap must be None or positive and finite, got 0 (None: no cap)")
        _logit_shape("LinearCrossEntropyLoss", 1.0, softcap)
        super().__init__()
        self.ignore_index, self.z_loss, self.label_smoothing = ignore_index, lse_square_scale, label_smoothing
        self.reduction, self.softcap, self.return_z_loss = reduction, softcap, return_z_loss
        self.return_token_accuracy, self.use_token_scaling = return_token_accuracy, bool(use_token_scaling)
        self.return_predicted_tokens = bool(return_predicted_tokens)

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor, bias=None):
        if bias is not None:
            raise ValueError("LinearCrossEntropyLoss: an output layer with a bias is not taken (pyllm's fused "
                             "losses have none)")
        stats = self.return_token_accuracy or self.return_predicted_tokens
        out = linear_cross_entropy(_input, lin_weight, target, softcap=self.softcap,
                                   label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                   return_z_loss=self.return_z_loss, ignore_index=self.ignore_index,
                                   reduction=self.reduction, return_token_stats=stats,
                                   token_scaling=self.use_token_scaling,
                                   return_predicted_tokens=self.return_predicted_tokens)
        if stats:
            predicted = out.predicted_tokens.reshape(-1) if self.return_predicted_tokens else None  # (Liger's: flat)
            out, accuracy = (out.loss, out.z_loss), out.token_accuracy
            if self.reduction == "sum":  # (Liger's accuracy is the mean for "sum" too)
                accuracy = accuracy / (target.long() != self.ignore_index).sum()  # (uint8: -100 is no class)
        if self.reduction == "mean":
            out = self._zero_if_all_ignored(out, target, self.return_z_loss or stats)
        z_loss = out[1] if self.return_z_loss else None
        if self.return_predicted_tokens:
            return LinearCrossEntropyPredictionOutput(out[0], z_loss, accuracy if self.return_token_accuracy else None,
                                                      predicted)
        if self.return_token_accuracy:
            return LinearCrossEntropyAccuracyOutput(out[0], z_loss, accuracy)
        return LinearCrossEntropyOutput(*out) if self.return_z_loss else out

    def _zero_if_all_ignored(self, out, target: torch.Tensor, pair: bool):
        # Liger's fused loss gives 0 (not F.cross_entropy's NaN) when every target is ignored: each
        # row returns before writing its loss and the rows' zeros are summed. Keep its value here, the
        # Liger-compatible module (no host sync: a select on a device bool).
        return _zero_if_all_ignored(out, target, self.ignore_index, pair)


def _zero_if_all_ignored(out, target: torch.Tensor, ignore_index: int, pair: bool):
    """out (a loss, or with pair a tuple of them) as 0 where every target is ignore_index (Liger's
    mean over no counted target), a select on a device bool (no host sync). The targets widened
    first, as the losses count them: in uint8 -100 would compare equal to class 156."""
    none = (target.long() == ignore_index).all()
    zero_if_none = lambda t: torch.where(none, torch.zeros_like(t), t)  # noqa: E731
    return tuple(zero_if_none(t) for t in out) if pair else zero_if_none(out)


def liger_fused_linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias=None,
                                     ce_weight: torch.Tensor | None = None, ignore_index: int = -100,
                                     lse_square_scale: float = 0.0, label_smoothing: float = 0.0,
                                     reduction: str = "mean", softcap: float | None = None,
                                     return_z_loss: bool = False, accum_dtype: torch.dtype | None = None,
                                     use_token_scaling: bool = False, return_token_accuracy: bool = False,
                                     return_predicted_tokens: bool = False):
    """Liger-Kernel's functional form, liger_kernel.transformers.functional.liger_fused_linear_cross_entropy:
    its arguments in its order and with its defaults (input (BT, H) first, then the output layer's
    weight (V, H); ignore_index -100, reduction "mean"), computed and returned as
    LinearCrossEntropyLoss(ce_weight, ignore_index, ...)(weight, input, target, bias) (bias and
    ce_weight must be None). linear_cross_entropy's own signature differs: its 4th argument is
    chunk_rows, its defaults -1 and "sum", and it names lse_square_scale z_loss and
    use_token_scaling token_scaling."""
    return LinearCrossEntropyLoss(ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
                                  return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy,
                                  return_predicted_tokens)(weight, input, target, bias)


class CrossEntropyOutput(NamedTuple):
    """LigerCrossEntropyLoss's output when any return_* is asked for: Liger-Kernel's
    CrossEntropyOutput's four fields, by name (None where not asked for), or unpacked."""
    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


class LigerCrossEntropyLoss(nn.Module):
    """Liger-Kernel's LigerCrossEntropyLoss (the loss over logits) over pyllm.cross_entropy: its
    arguments in its order (weight, ignore_index -100, lse_square_scale as z_loss, label_smoothing,
    reduction "mean", "sum" or "none", softcap, return_z_loss, return_token_accuracy,
    return_predicted_tokens) and forward(_input (..., V), target (...)). The loss alone, or with any
    return_* a CrossEntropyOutput (loss, z_loss, token_accuracy, predicted_tokens) as Liger's: z_loss
    the z-loss's share of the loss (detached), token_accuracy the share of counted targets that are
    their row's first argmax ("mean" and "sum"; NaN when none counts) or each row's 1.0 / 0.0 ("none";
    0.0 where ignored), predicted_tokens each row's argmax over its final (capped) logits, int64,
    flat, -1 where ignored. "mean" with every target ignored gives 0, as Liger's (pyllm.cross_entropy:
    NaN). Unlike Liger's: the logits are not overwritten by their gradient (Liger writes it into
    _input in the forward; pyllm's backward recomputes it), the loss is fp32 for 16-bit logits (Liger
    sums the rows' losses in their dtype), and class weights go without label_smoothing and
    lse_square_scale (refused: Liger weighs the smoothing term by class and leaves z-loss unweighted)."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False):
        _check_reduction("LigerCrossEntropyLoss", reduction)
        label_smoothing, lse_square_scale = _smoothing_and_z_loss("LigerCrossEntropyLoss", label_smoothing,
                                                                  lse_square_scale, "lse_square_scale")
        if softcap is not None and softcap == 0:  # (Liger asserts softcap > 0; 0 is not "no cap")
            raise ValueError("LigerCrossEntropyLoss: softcap must be None or positive and finite, got 0 (None: no cap)")
        _logit_shape("LigerCrossEntropyLoss", 1.0, softcap)
        if weight is not None and (label_smoothing or lse_square_scale):
            raise NotImplementedError("LigerCrossEntropyLoss: class weights go without label_smoothing and "
                                      "lse_square_scale in pyllm (as pyllm.cross_entropy's weight=)")
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.lse_square_scale, self.label_smoothing = ignore_index, lse_square_scale, label_smoothing
        self.reduction, self.softcap, self.return_z_loss = reduction, softcap, bool(return_z_loss)
        self.return_token_accuracy, self.return_predicted_tokens = bool(return_token_accuracy), \
            bool(return_predicted_tokens)

    def forward(self, _input: torch.Tensor, target: torch.Tensor):
        weighted = self.weight is not None
        out = cross_entropy_ops.cross_entropy(_input, target, self.weight, ignore_index=self.ignore_index,
                                              reduction=self.reduction, label_smoothing=self.label_smoothing,
                                              z_loss=self.lse_square_scale, softcap=self.softcap,
                                              return_z_loss=not weighted)
        loss, z_loss = (out, torch.zeros_like(out)) if weighted else out  # (weighted: no z-loss, refused above)
        if self.reduction == "mean":  # Liger's 0 where every target is ignored (no host sync: a select)
            loss, z_loss = _zero_if_all_ignored((loss, z_loss), target, self.ignore_index, True)
        if not (self.return_z_loss or self.return_token_accuracy or self.return_predicted_tokens):
            return loss
        accuracy = predicted = None
        if self.return_token_accuracy or self.return_predicted_tokens:
            with torch.no_grad():
                rows = _input.detach().reshape(-1, _input.shape[-1])
                flat = target.reshape(-1).long()
                predicted = cross_entropy_ops.predicted_of(rows, flat, self.ignore_index, 1.0,
                                                           float(self.softcap or 0.0))
                hits = ((predicted == flat) & (flat != self.ignore_index)).float()
                accuracy = (hits.reshape(target.shape) if self.reduction == "none"
                            else hits.sum() / (flat != self.ignore_index).sum())
        return CrossEntropyOutput(loss, z_loss if self.return_z_loss else None,
                                  accuracy if self.return_token_accuracy else None,
                                  predicted if self.return_predicted_tokens else None)


def liger_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                        size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                        label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
                        return_z_loss: bool = False, return_token_accuracy: bool = False,
                        return_predicted_tokens: bool = False):
    """Liger-Kernel's functional form, liger_kernel.transformers.functional.liger_cross_entropy: its
    arguments in its order (F.cross_entropy's, then lse_square_scale, softcap and the return_*
    flags), computed and returned as LigerCrossEntropyLoss(...)(input, target). The deprecated
    size_average / reduce map to a reduction as torch's do (Liger ignores them)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)  # (warns, as torch's)
    return LigerCrossEntropyLoss(weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
                                 return_z_loss, return_token_accuracy, return_predicted_tokens)(input, target)


def _check_reduction(name: str, reduction) -> None:
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"{name}: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def _smoothing_and_z_loss(name: str, label_smoothing, z_loss, z_name: str = "z_loss") -> tuple[float, float]:
    """(label_smoothing, z_loss) checked, as floats (z_name: what the caller calls z_loss)."""
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"{name}: {z_name} must be 0 or positive and finite, got {z_loss}")
    return label_smoothing, z_loss


def _logit_shape(name: str, scale, softcap) -> tuple[float, float]:
    """(scale, softcap) checked, as floats; softcap 0.0 when None."""
    scale, softcap = float(scale), float(softcap or 0.0)
    if not (0.0 < scale < math.inf and 0.0 <= softcap < math.inf):
        raise ValueError(f"{name}: scale must be positive and finite, softcap None or positive and finite, got "
                         f"scale={scale}, softcap={softcap}")
    return scale, softcap


def _check_targets(op: str, x: torch.Tensor, targets) -> None:
    """TypeError / ValueError unless targets are integer class ids, one per row of x (..., C): a
    float or bool target would be cast to a class silently (torch's cross_entropy refuses them)."""
    if not _util.int_tensor(targets):
        raise TypeError(f"{op}: targets must be an integer tensor of class ids (-1: none), got "
                        + (str(targets.dtype) if isinstance(targets, torch.Tensor) else type(targets).__name__))
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else None
    if rows is not None and targets.numel() != rows:
        raise ValueError(f"{op}: targets must give one id per row of x {tuple(x.shape)}, got shape {tuple(targets.shape)}")


def _check_output_layer(what: str, x, weight) -> None:
    """x (..., C) and an output layer's weight (V, C), V >= 1, on one device: the matmuls write into
    buffers of x's device (out=), which a weight elsewhere (a meta one) left unwritten, silently."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what}: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"{what}: weight must be (vocab >= 1, C) for x of shape (..., C), got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{what}: weight is on {weight.device} but x on {x.device}; they must match")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):  # (bool / complex failed in a matmul)
        raise TypeError(f"{what}: x and weight must be floating point (float32, bfloat16, float16, float64), got "
                        f"{x.dtype} and {weight.dtype}")


def _fused_linear_inputs(x, weight, chunk_rows, softcap=None, takes=None):
    """x as rows (N, C) in the dtype nn.Linear would compute in (autocast's, else x's), weight as
    given, and the rows per chunk (default: the rows split evenly into as few chunks as keep each within
    64 MiB of fp32 logits, at least 1 row; capped logits keep two (c, V) buffers, the capped
    logits and the tanh, in that; the transient
    x-dtype matmul result and the chunk's last rounding to x's dtype come on top). takes: the ops
    module's takes(logits) (pyllm.ops.cross_entropy's, distill's), whether the loss runs that kernel
    on its chunks: where it takes the (cast) x, a chunk's (c, V) buffers are logits in x's dtype, 64
    MiB of them per buffer. Twice the rows in
    bf16, where the fewer, larger matmuls took the loss from 1,009 to 824 ms
    (bench_cross_entropy.py: SmolLM2's output layer, 1,024 rows, 2-core EPYC, 2026-12-02).
    The fused losses' Functions cast the weight to x's dtype themselves and return its gradient (the
    chunks' products summed in fp32) in the weight's own dtype: an fp32 master's under autocast
    unrounded, as Liger-Kernel's (cast here, the sum had been rounded to bf16: 2,048 rows in 64-row
    chunks 3.2e-3 from fp64, as torch's autocast F.linear, now 2.6e-3)."""
    if not (chunk_rows is None or isinstance(chunk_rows, int) and not isinstance(chunk_rows, bool)):
        raise TypeError(f"the fused loss's chunk_rows (its 4th positional argument) must be an int or None, got "
                        f"{type(chunk_rows).__name__}" + (": Liger-Kernel's 4th is the output layer's bias, which "
                        "pyllm's fused losses do not take" if isinstance(chunk_rows, torch.Tensor) else ""))
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"the fused loss's chunk_rows must be >= 1, got {chunk_rows}")
    _check_output_layer("the fused loss", x, weight)
    x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (not -1: a hidden size of 0 leaves it ambiguous)
    if _autocast_on(x):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if chunk_rows is None:
        row_bytes = x.element_size() if takes is not None and takes(x) else 4 * (2 if softcap else 1)
        most = max(1, (64 << 20) // (row_bytes * weight.shape[0]))
        if torch.compiler.is_compiling():  # not from the rows: the graph had been specialized to each
            # batch's (a recompile per B * T, no dynamic export). A power of two, so that rows of B * T
            # (powers of two, mostly) still split evenly: 1,024 rows under a budget of 333 in 4 x 256.
            return x, weight, 1 << (most.bit_length() - 1)
        # As many chunks as the budget needs, all of one size: 1,024 bf16 rows in 2 x 512, not 682 +
        # 342, took the step from 984 to 867 ms (matmuls of a few hundred rows run slower per row).
        chunk_rows = -(-x.shape[0] // -(-x.shape[0] // most)) if x.shape[0] else most
    return x, weight, int(chunk_rows)


def chunk_slices(rows, chunk_rows: int) -> list[slice]:
    """The row slices of chunk_rows each over rows; one slice when they fit in one, without a loop
    over the (possibly traced, symbolic) row count."""
    if rows <= chunk_rows:
        return [slice(0, rows)] if rows > 0 else []
    return [slice(start, start + chunk_rows) for start in range(0, rows, chunk_rows)]


def _logp_grad_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each row's g times d logp / d logits = g (one_hot - softmax), over logits (c, V) in place,
    from their log-sum-exp lse (c,); g (c,) is 0 where the target is -1."""
    grad = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    return grad.scatter_add_(1, targets.clamp(min=0)[:, None], g[:, None])


def _chunk_logps(xc, weight, tc, buffers, kernel: bool, scale: float, softcap: float, want_grad: bool = False,
                 stats=None):
    """A chunk's logits and each row's log-probability of its target (0 where it is -1): by pyllm's
    kernel over buffers' logits (c, V) in x's dtype (want_grad: they then hold d(-logp) / d logits),
    or in torch ops ((c, V) scaled and capped in fp32 at least, with their log-sum-exp and the cap's
    tanh for the backward). stats: None or the chunk's rows of token statistics (c, 3) to write
    (cross_entropy_ops.token_stats'). -> (logits, logps, lse or None, tanh or None)."""
    if kernel:
        logits = buffers.logits(xc, weight)  # (c, V) in x's dtype, read once by the kernel
        loss = cross_entropy_ops.cross_entropy_rows_(logits, tc, ignore_index=-1, scale=scale, softcap=softcap,
                                                     want_grad=want_grad, stats=stats)[0]
        return logits, loss.neg(), None, None
    acc = torch.promote_types(xc.dtype, torch.float32)
    logits, tanh = _final_logits((xc @ weight.t()).to(acc), scale, softcap)  # (c, V)
    if stats is not None:
        stats.copy_(cross_entropy_ops.stats_of_shaped(logits, tc, tc != -1))
    lse = torch.logsumexp(logits, dim=-1)
    logps = (logits.gather(1, tc.clamp(min=0)[:, None])[:, 0] - lse) * (tc != -1)
    return logits, logps, lse, tanh


def _logp_grad_over_(logits, tc, g, lse, tanh, kernel: bool, scale: float, softcap: float, dtype) -> torch.Tensor:
    """Each row's g (fp32 at least) times d logp / d logits, 0 where the target is -1, over a chunk's
    logits (_chunk_logps'), in dtype: by pyllm's kernel in place, or torch ops from lse and tanh."""
    if kernel:  # the kernel's d(-logp) / d logits, times -g per row
        cross_entropy_ops.cross_entropy_rows_(logits, tc, ignore_index=-1, scale=scale, softcap=softcap,
                                              grad_rows=g.neg())
        return logits
    return _through_final(_logp_grad_(logits, lse, tc, g * (tc != -1)), tanh, scale).to(dtype)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(x W^T)[target] per row (0 where the target is -1), chunk by chunk: the (rows,
    vocab) logits exist one chunk at a time. Unlike _LinearCrossEntropy the gradient cannot be
    computed in the forward (a sequence-level loss, DPO's, weighs each row by what the others
    give), so the backward recomputes each chunk's logits from x: one more (rows x C x V) matmul for
    O(chunk_rows * vocab) memory. Where pyllm's cross-entropy kernel runs, each chunk's softmax is
    one kernel call (the log-probability is minus its loss; the backward's gradient lands over the
    recomputed logits, each row times minus its incoming gradient); elsewhere torch ops, with the
    forward's log-sum-exp saved for the backward. A frozen head (LoRA's: only x wants a gradient)
    needs no recompute: row r's log-probability depends on x's row r alone, so the forward keeps
    J = d logp_r / d x_r (rows, C), one (c, V) x (V, C) matmul per chunk, and the backward is
    grad_x = grad_out * J: two matmuls of the head in all rather than three."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, scale, softcap, jacobian, want_stats=False):
        # x (N, C), weight (V, C), targets (N,)
        ctx.weight_dtype, weight = weight.dtype, weight.to(x.dtype)  # (see _fused_linear_inputs)
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        stats = _stats_buffer(x, want_stats)
        kernel = cross_entropy_ops.takes(x)
        lse = None if kernel or jacobian else torch.empty(x.shape[0], dtype=acc, device=x.device)
        jac = torch.empty_like(x) if jacobian else None  # d loss_r / d x_r = -d logp_r / d x_r
        buffers = _ChunkBuffers(x, weight, chunk_rows, need_w=False)
        for rows in chunk_slices(x.shape[0], chunk_rows):
            tc = targets[rows]
            logits, out[rows], chunk_lse, tanh = _chunk_logps(x[rows], weight, tc, buffers, kernel, scale, softcap,
                                                              want_grad=jacobian,
                                                              stats=stats[rows] if want_stats else None)
            if kernel:
                if jacobian:  # logits now hold d loss / d logits
                    jac[rows] = _rows_times(logits, weight)
            elif jacobian:  # d loss / d logits = -d logp / d logits
                grad = _logp_grad_(logits, chunk_lse, tc, -(tc != -1).to(acc))
                jac[rows] = _rows_times(_through_final(grad, tanh, scale).to(x.dtype), weight)
                del grad
            else:
                lse[rows] = chunk_lse
            del logits, tanh  # before the next chunk's are made
        if jacobian:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(x, weight, targets, lse)
        ctx.chunk_rows, ctx.scale, ctx.softcap, ctx.kernel, ctx.jacobian = chunk_rows, scale, softcap, kernel, jacobian
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _):
        _refuse_create_graph("linear_token_logps")
        if ctx.jacobian:
            (jac,) = ctx.saved_tensors
            acc = torch.promote_types(jac.dtype, torch.float32)
            grad_x = (jac.to(acc) * grad_out.to(acc).neg()[:, None]).to(jac.dtype)
            return grad_x, None, None, None, None, None, None, None
        x, weight, targets, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        buffers = _ChunkBuffers(x, weight, ctx.chunk_rows, need_w)
        acc = torch.promote_types(x.dtype, torch.float32)
        for rows in chunk_slices(x.shape[0], ctx.chunk_rows):
            xc, tc = x[rows], targets[rows]
            # the logits again (the kernel's not read: it writes the gradient over them)
            if ctx.kernel:
                logits, tanh = buffers.logits(xc, weight), None
            else:
                logits, tanh = _final_logits((xc @ weight.t()).to(acc), ctx.scale, ctx.softcap)
            grad = _logp_grad_over_(logits, tc, grad_out[rows].to(acc), None if lse is None else lse[rows], tanh,
                                    ctx.kernel, ctx.scale, ctx.softcap, x.dtype)
            del logits, tanh
            buffers.add_grads(grad, xc, weight, rows, grad_x)
            del grad  # before the next chunk's are made
        grad_w = buffers.grad_w
        return grad_x, None if grad_w is None else grad_w.to(ctx.weight_dtype), None, None, None, None, None, None


class TokenLogps(NamedTuple):
    """linear_token_logps' output with return_token_stats, each of targets' shape: the
    log-probabilities, and TRL's token statistics from the same pass (cross_entropy_ops.token_stats')."""
    logps: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    mean_logit: torch.Tensor


@overload
def linear_token_logps(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int | None = None, *, scale: float = 1.0, softcap: float | None = None,
                       return_token_stats: Literal[False] = False) -> torch.Tensor: ...


@overload
def linear_token_logps(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int | None = None, *, scale: float = 1.0, softcap: float | None = None,
                       return_token_stats: Literal[True]) -> TokenLogps: ...


@overload
def linear_token_logps(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int | None = None, *, scale: float = 1.0, softcap: float | None = None,
                       return_token_stats: bool = False) -> torch.Tensor | TokenLogps: ...


def linear_token_logps(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int | None = None, *, scale: float = 1.0, softcap: float | None = None,
                       return_token_stats: bool = False) -> torch.Tensor | TokenLogps:
    """log_softmax(x @ weight.T)[targets] per row, in fp32 (at least), 0 where targets is -1,
    without the (rows, vocab) logits in memory: chunk by chunk in the forward, and again in the
    backward (recomputed from x and the saved log-sum-exp). x (..., C), weight (V, C), targets (...)
    -> (...). For losses over sequences (DPO's sequence_logps), where linear_cross_entropy's
    gradients-in-the-forward cannot serve. Under autocast, x and weight are cast to its dtype
    first, as nn.Linear would be. chunk_rows, scale, softcap: as in linear_cross_entropy.
    return_token_stats: -> TokenLogps(logps, entropy, is_top1, mean_logit): also each row's entropy
    of the softmax, whether its target is the argmax and its mean logit (TRL's GRPO entropy), from
    the same pass, detached."""
    _check_targets("linear_token_logps", x, targets)
    x, weight, chunk_rows = _fused_linear_inputs(x, weight, chunk_rows, softcap, cross_entropy_ops.takes)
    scale, softcap = _logit_shape("linear_token_logps", scale, softcap)
    # Only x wants a gradient (a frozen head): the forward keeps d logp / dx instead of the inputs.
    jacobian = torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad
    with _autocast_off(x):
        if _util.torch_func_active() or _util.exporting():  # (see linear_cross_entropy)
            logps = _whole_logps(x, weight, targets.reshape(-1), scale, softcap).view(targets.shape)
            if not return_token_stats:
                return logps
            stats = cross_entropy_ops.token_stats(F.linear(x, weight.to(x.dtype)), targets.reshape(-1),
                                                  ignore_index=-1, scale=scale, softcap=softcap or None)
            return TokenLogps(logps, stats.entropy.to(logps.dtype).view(targets.shape),
                              stats.is_top1.view(targets.shape), stats.mean_logit.to(logps.dtype).view(targets.shape))
        logps, stats = _LinearTokenLogps.apply(x, weight, targets.reshape(-1), chunk_rows, scale, softcap, jacobian,
                                               return_token_stats)
    if not return_token_stats:
        return logps.view(targets.shape)
    return TokenLogps(logps.view(targets.shape), *cross_entropy_ops.TokenStats.of_rows(stats, targets.shape))


def _whole_logps(x, weight, targets, scale: float, softcap: float) -> torch.Tensor:
    """linear_token_logps under torch.func (per-example gradients), which takes no autograd.Function
    that keeps its own state (it recomputes in the backward, or computes gradients in the forward):
    the whole (rows, V) logits and pyllm.cross_entropy's derivative, which it takes. x (N, C) ->
    (N,) in fp32 at least, 0 where the target is -1."""
    losses = cross_entropy_ops.cross_entropy(F.linear(x, weight.to(x.dtype)), targets, ignore_index=-1, reduction="none",
                                             scale=scale, softcap=softcap or None)
    return losses.neg().to(torch.promote_types(x.dtype, torch.float32))


def _group_chunks(segment_rows: list[int], group: int, chunk_rows: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first segment, end segment) of each chunk: whole groups of `group`
    consecutive segments, as many as fit in chunk_rows rows (a larger group alone)."""
    chunks, row, seg = [], 0, 0
    start_row, start_seg = 0, 0
    while seg < len(segment_rows):
        rows = sum(segment_rows[seg:seg + group])
        if row > start_row and row + rows - start_row > chunk_rows:
            chunks.append((start_row, row, start_seg, seg))
            start_row, start_seg = row, seg
        row, seg = row + rows, seg + group
    if seg > start_seg:
        chunks.append((start_row, row, start_seg, len(segment_rows)))
    return chunks


def _segment_of_rows(segment_rows: list[int], rows: int, device) -> torch.Tensor:
    """(rows,) int64: each row's segment, as an index into the segments' (S,) sums."""
    return torch.repeat_interleave(torch.arange(len(segment_rows), device=device),
                                   torch.tensor(segment_rows, dtype=torch.long, device=device), output_size=rows)


class _LinearSequenceLoss(torch.autograd.Function):
    """The sum over groups of whole sequences of loss_fn(the group's summed log-probabilities), its
    gradients for x and weight computed in the forward, a chunk of whole groups at a time (Liger's
    fused preference losses: a DPO pair's loss is known once its two sequences' log-probabilities
    are): per chunk the logits x W^T, each row's log-probability (pyllm's kernel: one read), the
    chunk's sequence sums and loss_fn's gradient for them (torch autograd over a few scalars), then
    d loss / d logits = g_row (one_hot - softmax) over the logits in place (a second pass) and the
    two gradient matmuls: three (rows x C x V) matmuls, where linear_token_logps' backward recomputes
    the logits (four). -> (the loss, the (S,) sequence log-probabilities and the rows' token
    statistics (N, 3) (want_stats; else (0, 3)), these two detached). row_weights: (N,) each row's
    weight in its sequence's sum (its gradient scaled alike), or None (1)."""

    @staticmethod
    def forward(ctx, x, weight, targets, segment_rows, group, loss_fn, chunk_rows, scale, softcap, grad_enabled,
                want_stats=False, row_weights=None):
        ctx.name = "linear_sequence_loss"
        ctx.weight_dtype, weight = weight.dtype, weight.to(x.dtype)  # (see _fused_linear_inputs)
        acc = torch.promote_types(x.dtype, torch.float32)
        # (under no_grad a weight that requires grad still says so: the caller's grad mode decides)
        need_x, need_w = ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled
        grad_x = torch.empty_like(x) if need_x else None
        chunks = _group_chunks(segment_rows, group, chunk_rows)
        buffers = _ChunkBuffers(x, weight, max([end - start for start, end, _, _ in chunks], default=1), need_w)
        seq_logps = torch.zeros(len(segment_rows), dtype=acc, device=x.device)
        total = torch.zeros((), dtype=torch.float64, device=x.device)  # chunk sums add up without drift
        owner = _segment_of_rows(segment_rows, x.shape[0], x.device)
        kernel = cross_entropy_ops.takes(x)
        stats = _stats_buffer(x, want_stats)

        def chunk(r0, r1, s0, s1):
            xc, tc, oc = x[r0:r1], targets[r0:r1], owner[r0:r1] - s0
            logits, logps, lse, tanh = _chunk_logps(xc, weight, tc, buffers, kernel, scale, softcap,
                                                    stats=stats[r0:r1] if want_stats else None)
            wc = None if row_weights is None else row_weights[r0:r1].to(logps.dtype)
            sums = logps.new_zeros(s1 - s0).index_add_(0, oc, logps if wc is None else logps * wc)  # (s,)
            seq_logps[s0:s1] = sums
            if not (need_x or need_w):
                return loss_fn(sums, s0, s1).detach()
            with torch.enable_grad():
                leaf = sums.detach().requires_grad_()
                loss = loss_fn(leaf, s0, s1)
                g_seq = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
            g = (torch.zeros_like(sums) if g_seq is None else g_seq)[oc]  # (c,) d loss / d logp_row
            g = g if wc is None else g * wc
            grad = _logp_grad_over_(logits, tc, g, lse, tanh, kernel, scale, softcap, x.dtype)
            buffers.add_grads(grad, xc, weight, slice(r0, r1), grad_x)
            return loss.detach()

        for r0, r1, s0, s1 in chunks:
            total += chunk(r0, r1, s0, s1)
        ctx.save_for_backward(grad_x, buffers.grad_w)  # (no rows: _ChunkBuffers' zeros)
        ctx.mark_non_differentiable(seq_logps, stats)
        return total.to(acc), seq_logps, stats

    @staticmethod
    def backward(ctx, grad_total, _, __):
        return _saved_grads_times(ctx, grad_total, 10)


def linear_sequence_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, segment_rows,
                         group: int, loss_fn, chunk_rows: int | None = None, *, scale: float = 1.0,
                         softcap: float | None = None, return_token_stats: bool = False,
                         row_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A loss over whole sequences' log-probabilities (DPO's and its kin's, over pairs) fused with
    the output layer: -> (the loss, each sequence's summed log-probability (S,), detached).

    x (N, C) rows of hidden states, weight (V, C) the output layer, targets (N,) (-1: no
    log-probability); the rows are S sequences back to back, segment_rows[s] rows each (a list of
    ints summing to N), and every `group` consecutive sequences (a DPO pair: chosen then rejected)
    form a group whose loss depends on its own sequences alone. loss_fn(logps, s0, s1) -> a scalar:
    the summed loss of the groups of sequences s0 .. s1 - 1 from their log-probabilities logps
    (s1 - s0,) (fp32 at least; a differentiable function of them). The loss is the sum of loss_fn
    over chunks of whole groups (about chunk_rows rows each; a larger group alone), its gradients for
    x and weight computed in the forward (_LinearSequenceLoss), as linear_cross_entropy does: memory
    O(chunk_rows * vocab), three matmuls of the output layer where linear_token_logps with the loss
    after it takes four. chunk_rows, scale, softcap, autocast: as in linear_cross_entropy.
    fp16: the gradients are made at their own size in the forward, before a loss scaler multiplies
    them in the backward, so a pair's small weight (DPO's beta sigmoid(-beta d) of a well-separated
    pair) can underflow there where linear_token_logps keeps it: the trainer's fp16 runs take that.
    return_token_stats: -> (the loss, those sums, cross_entropy_ops.TokenStats(entropy, is_top1,
    mean_logit), (N,) each): TRL's token statistics of every row from the same pass (cross_entropy_ops.token_stats';
    DPO's entropy, mean_token_accuracy and logits/chosen, logits/rejected), detached.
    row_weights (N,): each row's log-probability times its weight in its sequence's sum (LD-DPO's
    ld_alpha past a pair's shared length), its gradient likewise; None: 1 each."""
    _check_targets("linear_sequence_loss", x, targets)
    if row_weights is not None and (not isinstance(row_weights, torch.Tensor) or row_weights.shape != (x.shape[0],)):
        raise ValueError(f"linear_sequence_loss: row_weights must be a tensor of the {x.shape[0]} rows' weights, got "
                         f"{getattr(row_weights, 'shape', row_weights)!r}")
    x, weight, chunk_rows = _fused_linear_inputs(x, weight, chunk_rows, softcap, cross_entropy_ops.takes)
    scale, softcap = _logit_shape("linear_sequence_loss", scale, softcap)
    segment_rows = [int(n) for n in segment_rows]
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"linear_sequence_loss: group must be a positive int, got {group!r}")
    if any(n < 0 for n in segment_rows) or sum(segment_rows) != x.shape[0] or len(segment_rows) % group:
        raise ValueError(f"linear_sequence_loss: segment_rows must be {group}-sequence groups of rows >= 0 summing "
                         f"to the {x.shape[0]} rows of x, got {len(segment_rows)} sequences of {sum(segment_rows)} rows")
    with _autocast_off(x):
        # (see linear_cross_entropy, _whole_logps) the loss of every group at once
        if _util.torch_func_active() or _util.exporting():
            owner = _segment_of_rows(segment_rows, x.shape[0], x.device)
            logps = _whole_logps(x, weight, targets.reshape(-1), scale, softcap)
            weighted = logps if row_weights is None else logps * row_weights.to(logps.dtype)
            seq_logps = logps.new_zeros(len(segment_rows)).index_add(0, owner, weighted)
            loss = loss_fn(seq_logps, 0, len(segment_rows)).to(logps.dtype)
            if not return_token_stats:
                return loss, seq_logps.detach()
            stats = cross_entropy_ops.token_stats(F.linear(x, weight.to(x.dtype)), targets.reshape(-1),
                                                  ignore_index=-1, scale=scale, softcap=softcap or None)
            return loss, seq_logps.detach(), stats._replace(entropy=stats.entropy.to(logps.dtype),
                                                            mean_logit=stats.mean_logit.to(logps.dtype))
        loss, seq_logps, stats = _LinearSequenceLoss.apply(x, weight, targets.reshape(-1), segment_rows, group,
                                                           loss_fn, chunk_rows, scale, softcap, torch.is_grad_enabled(),
                                                           return_token_stats, row_weights)
    if not return_token_stats:
        return loss, seq_logps
    return loss, seq_logps, cross_entropy_ops.TokenStats.of_rows(stats, stats.shape[:1])


def distill_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0,
                       temperature: float = 1.0) -> torch.Tensor:
    """Per row, the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024) between the
    student's and the teacher's next-token distributions at temperature T, as TRL's
    generalized_jsd_loss: beta 0 the forward KL(teacher || student) (Hinton's distillation), 1 the
    reverse KL(student || teacher), else beta KL(teacher || M) + (1 - beta) KL(student || M) with
    M = beta teacher + (1 - beta) student. logits (..., V) -> (...) in fp32 (at least). The
    reference linear_distill's fused chunks compute."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def _log_softmax_(z: torch.Tensor, work: torch.Tensor, softmax: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(z) over the last dim, in place of z (c, V), its exp pass written into work (c, V).
    -> (log_softmax, softmax in work; with softmax=False, work as the exp pass left it)."""
    z.sub_(z.amax(dim=-1, keepdim=True))
    sums = torch.exp(z, out=work).sum(dim=-1, keepdim=True)
    z.sub_(sums.log())
    return z, work.div_(sums) if softmax else work


class _LinearDistill(torch.autograd.Function):
    """sum over rows of distill_divergence(x W^T, x_t W_t^T), its gradients for x and W computed
    in the forward chunk by chunk, as _LinearCrossEntropy's: neither the student's nor the teacher's
    (rows, vocab) logits exist whole. With s, t the log-softmaxes at temperature T, p = e^s, the
    gradient for the student's logits is (p - e^t) / T (forward KL), p (s - t - KL(p || q)) / T
    (reverse) or (1 - beta) p (s - m - KL(p || M)) / T (the mixture; its teacher term's gradient
    cancels with part of the student's)."""

    @staticmethod
    def forward(ctx, x, weight, x_teacher, weight_teacher, beta, temperature, chunk_rows, shape, teacher_shape):
        ctx.weight_dtype, weight = weight.dtype, weight.to(x.dtype)  # (see _fused_linear_inputs)
        ctx.name = "linear_distill"
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(x.dtype, torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        buffers = _ChunkBuffers(x, weight, chunk_rows, need_w)

        def chunk(rows: slice) -> torch.Tensor:
            # Every (c, V) tensor is one of buffers' (fresh ones paid their page faults again at each
            # chunk: 0.86-1.33 M faults a step at 2,048 rows of SmolLM2's head, 2-core Xeon).
            xc = x[rows]
            c = xc.shape[0]
            s_logits = buffers.logits(xc, weight)  # (c, V) in x's dtype
            if distill_ops.takes(s_logits):  # one kernel pass per row; the gradient lands over s_logits
                divergences = distill_ops.distill_rows_(
                    s_logits, buffers.logits(x_teacher[rows], weight_teacher, "teacher_logits"), beta=beta,
                    temperature=temperature, scale=shape[0], softcap=shape[1], teacher_scale=teacher_shape[0],
                    teacher_softcap=teacher_shape[1], want_grad=need_x or need_w)
                if need_x or need_w:
                    buffers.add_grads(s_logits, xc, weight, rows, grad_x)
                return divergences.sum(dtype=torch.float64)
            # elsewhere (CUDA unless PYLLM_DISTILL_CUDA=1, fp64 on CUDA) in torch ops
            part = torch.zeros((), dtype=torch.float64, device=x.device)

            def widened(name: str, logits: torch.Tensor) -> torch.Tensor:
                return logits if logits.dtype == acc else buffers.buffer(name, c, acc).copy_(logits)

            z, tanh = _final_logits(widened("z", s_logits), *shape)  # (c, V)
            s, p = _log_softmax_(z.div_(temperature), buffers.buffer("p", c, acc))
            t_logits = widened("t", buffers.logits(x_teacher[rows], weight_teacher, "teacher_logits"))
            t, q = _log_softmax_(_final_logits(t_logits, *teacher_shape)[0].div_(temperature),
                                 buffers.buffer("q", c, acc), softmax=beta != 1)
            u = buffers.buffer("u", c, acc)
            if beta == 0:
                part += torch.mul(q, torch.sub(t, s, out=u), out=u).sum()
                grad = p.sub_(q)
            else:
                if beta == 1:
                    diff, scale = torch.sub(s, t, out=t), 1.0
                else:  # log M, no underflow
                    m = buffers.buffer("m", c, acc)
                    torch.logaddexp(torch.add(s, math.log(1 - beta), out=m), torch.add(t, math.log(beta), out=u), out=m)
                    part += beta * torch.mul(q, torch.sub(t, m, out=u), out=u).sum()
                    diff, scale = torch.sub(s, m, out=m), 1 - beta
                kl = torch.mul(p, diff, out=u).sum(-1, keepdim=True)  # (c, 1): KL(student || q or M)
                part += scale * kl.sum()
                grad = p.mul_(diff.sub_(kl)).mul_(scale)
            if need_x or need_w:
                grad = _through_final(grad.div_(temperature), tanh, shape[0])
                if grad.dtype != x.dtype:  # over the student's logits, read already
                    grad = buffers.buffer("logits", c, x.dtype).copy_(grad)
                buffers.add_grads(grad, xc, weight, rows, grad_x)
            return part

        for rows in chunk_slices(x.shape[0], chunk_rows):
            total += chunk(rows)
        ctx.save_for_backward(grad_x, buffers.grad_w)
        return total.to(acc)

    @staticmethod
    def backward(ctx, grad_total):
        return _saved_grads_times(ctx, grad_total, 7)


def linear_distill(x: torch.Tensor, weight: torch.Tensor, x_teacher: torch.Tensor, weight_teacher: torch.Tensor,
                   beta: float = 0.0, temperature: float = 1.0, chunk_rows: int | None = None, *,
                   scale: float = 1.0, softcap: float | None = None, teacher_scale: float = 1.0,
                   teacher_softcap: float | None = None) -> torch.Tensor:
    """The sum over rows of distill_divergence(x @ weight.T, x_teacher @ weight_teacher.T, beta,
    temperature), fp32, fused as linear_cross_entropy (Liger-Kernel's fused linear JSD): the
    student's gradients computed chunk by chunk in the forward, the teacher's logits a chunk at a
    time (no gradient for the teacher). x (N, C), weight (V, C), x_teacher (N, C_teacher),
    weight_teacher (V, C_teacher): the two models' final hidden states at the same N positions (or
    the same (B, T, ...) leading dims, taken as rows) and output layers over one vocabulary. Under
    autocast all four are cast to its dtype first. scale, softcap (and the teacher's): each model's
    logits scaled and capped, as in linear_cross_entropy, before the temperature divides them. Each
    chunk's divergences and gradient are pyllm.ops.distill's kernel where it takes them (one call,
    the chunk's logits in x's dtype, 64 MiB of each model's by default): the CPU, and CUDA with
    PYLLM_DISTILL_CUDA=1 (until its kernel is verified on a GPU); elsewhere torch ops in fp32 (at
    least)."""
    if not 0.0 <= beta <= 1.0 or not temperature > 0:
        raise ValueError(f"linear_distill: beta must be in [0, 1] and temperature > 0, got {beta}, {temperature}")
    _check_output_layer("linear_distill", x, weight)
    _check_output_layer("linear_distill (the teacher's)", x_teacher, weight_teacher)
    if weight.shape[0] != weight_teacher.shape[0] or x.shape[:-1] != x_teacher.shape[:-1]:
        raise ValueError(f"linear_distill: the student's and the teacher's positions and vocabularies must match, got "
                         f"x {tuple(x.shape)} / x_teacher {tuple(x_teacher.shape)}, "
                         f"{weight.shape[0]} / {weight_teacher.shape[0]} words")
    x_teacher = x_teacher.reshape(-1, x_teacher.shape[-1])  # (N, C_teacher), as x becomes below
    if x_teacher.device != x.device:
        raise ValueError(f"linear_distill: x_teacher is on {x_teacher.device} but x on {x.device}; they must match")
    x, weight, chunk_rows = _fused_linear_inputs(x, weight, chunk_rows, softcap or teacher_softcap, distill_ops.takes)
    shape = _logit_shape("linear_distill", scale, softcap)
    teacher_shape = _logit_shape("linear_distill (the teacher's)", teacher_scale, teacher_softcap)
    x_teacher = x_teacher.to(x.dtype)
    weight_teacher = weight_teacher.to(x.dtype)
    with _autocast_off(x):
        # (see _whole_logps) the whole logits, and the op's own derivative
        if _util.torch_func_active() or _util.exporting():
            return distill_ops.generalized_jsd(
                F.linear(x, weight.to(x.dtype)), F.linear(x_teacher, weight_teacher).detach(), beta=float(beta),
                temperature=float(temperature), reduction="sum", scale=shape[0], softcap=shape[1] or None,
                teacher_scale=teacher_shape[0], teacher_softcap=teacher_shape[1] or None,
            ).to(torch.promote_types(x.dtype, torch.float32))
        return _LinearDistill.apply(x, weight, x_teacher.detach(), weight_teacher.detach(), float(beta),
                                    float(temperature), chunk_rows, shape, teacher_shape)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[targets] in fp32 (at least), 0 where targets is -1. logits (..., V). By
    pyllm.cross_entropy's kernel where it takes the logits (no fp32 copy of 16-bit ones)."""
    if cross_entropy_ops.takes(logits):
        return -cross_entropy_ops.cross_entropy(logits, targets, ignore_index=-1, reduction="none")
    logits32 = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits32, targets.reshape(-1), ignore_index=-1, reduction="none").view(targets.shape)


def sequence_logps(token_logps: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(N,): each of the N documents of cu_seqlens (packed into the B * T positions, as
    LLM.forward takes them) summed log-probability of its targets, from token_logps (B, T) (0 where
    no target: LLM.forward(..., per_token=True)): a sequence's log p(completion | prompt) for
    preference losses."""
    B, T = token_logps.shape
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("sequence_logps: cu_seqlens must be a 1-D tensor of document offsets (N + 1 values)")
    if cu_seqlens.device.type == "cpu" and not _util.values_unreadable(cu_seqlens):  # (on CUDA: a sync, not read)
        c = cu_seqlens
        if c[0] != 0 or c[-1] != B * T or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"sequence_logps: cu_seqlens must rise from 0 to B * T = {B * T} without falling, got "
                             f"{c[:8].tolist()}{' ...' if len(c) > 8 else ''}")
    doc = document_ids(cu_seqlens, B, T).reshape(-1)
    return token_logps.new_zeros(cu_seqlens.numel() - 1).index_add(0, doc, token_logps.reshape(-1))


PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "simpo", "orpo", "kto", "reward", "robust", "exo_pair", "nca_pair",
                     "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
# The pair losses of TRL's DPOTrainer (its loss_type), each from the pair's log-ratios to the reference
DPO_LOSSES = ("dpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
              "discopop", "sigmoid_norm")
REFERENCE_FREE = ("simpo", "orpo", "reward")  # no reference model's log-probabilities needed


def preference_loss(kind: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                    rejected_tokens: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
                    ref_rejected_logps: torch.Tensor | None = None, beta: float = 0.1, gamma: float = 0.5,
                    label_smoothing: float = 0.0, desirable: torch.Tensor | None = None, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0, kl: torch.Tensor | None = None, center_rewards: float = 0.0,
                    margin: torch.Tensor | None = None, sft_weight: float = 0.0, discopop_tau: float = 0.05,
                    kto_loss: str = "kto", f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
                    weight: float = 1.0, mix: Sequence[tuple[str, float]] = ()
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of preference tuning from each pair's chosen and rejected replies' summed
    log-probabilities (sequence_logps) and their numbers of tokens, with the implicit rewards of the
    chosen and rejected replies (detached). Each (P,). As TRL computes them:
      dpo    Direct Preference Optimization (Rafailov et al. 2023): with d = (chosen - ref_chosen) -
             (rejected - ref_rejected), -log sigmoid(beta d); with label_smoothing e (the
             conservative DPO of Mitchell 2023), -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d):
             TRL's sigmoid loss before 1.x (TRL 1.16's ignores label_smoothing, which it keeps for its
             robust and exo_pair losses).
             Rewards beta * (logps - ref_logps).
      ipo    IPO (Azar et al. 2023): (d - 1 / (2 beta))^2, d from log-probabilities per token.
             Rewards beta * (logps - ref_logps) summed, as TRL logs them (its accuracy compares those).
      hinge  SLiC's hinge (Zhao et al. 2023): max(0, 1 - beta d).
      simpo  SimPO (Meng et al. 2024), no reference: -log sigmoid(beta (chosen - rejected) - gamma) of
             the log-probabilities per token. Rewards beta * logps per token.
      orpo   ORPO (Hong et al. 2024), no reference: the chosen reply's negative log-likelihood per
             token plus beta * -log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p)
             with p the probability per token, exp(logps / tokens). Rewards beta * logps per token.
             (The NLL is each pair's mean over its reply's tokens, so the mean loss weighs pairs
             alike; TRL's ORPOTrainer averages it over all of a batch's chosen sequences' tokens,
             the prompt's too.)
      kto    KTO (Ethayarajh et al. 2024), unpaired: "chosen" is each example, "rejected" the same
             prompt with another example's completion, desirable (P,) bool its label. With z the
             batch's KL estimate, mean(rejected - ref_rejected) clamped at 0 and detached (TRL's
             KL term, computed without gradient), r = chosen - ref_chosen: desirable examples
             desirable_weight (1 - sigmoid(beta (r - z))), undesirable ones undesirable_weight
             (1 - sigmoid(beta (z - r))). Rewards beta r (chosen) and beta times the mismatched
             pairs' log-ratio (rejected). kl: z given (over more pairs than these: all ranks'), else
             from these pairs. kto_loss "apo_zero_unpaired" (TRL's KTOConfig loss_type, APO-zero's
             unpaired form): z is 0, 1 - sigmoid(beta r) and sigmoid(beta r) (no KL estimate).
      reward a reward model's Bradley-Terry loss (Ouyang et al. 2022; TRL's RewardTrainer): "logps" are
             the model's scores of each reply (LLM.forward's scores), -log sigmoid(chosen - rejected
             - margin) + center_rewards (chosen + rejected)^2 (margin (P,): each pair's, Llama 2's
             preference-strength margin, TRL's "margin" column; else 0; center_rewards: TRL's
             center_rewards_coefficient); the rewards are the scores (beta is not used).
    And TRL 1.16's other DPOTrainer loss types, with cr, rr the chosen and rejected rewards
    beta * (logps - ref_logps) and m = cr - rr (rewards logged as dpo's):
      robust      Robust DPO (Chowdhury et al. 2024): (-(1 - e) log sigmoid(m) + e log sigmoid(-m)) /
                  (1 - 2 e), e = label_smoothing, the chance a label is flipped, in [0, 0.5).
      exo_pair    EXO (Ji et al. 2024): KL of (sigmoid(m), sigmoid(-m)) from (1 - e, e), e =
                  label_smoothing > 0 (the paper's 1e-3).
      nca_pair    NCA (Chen et al. 2024): -log sigmoid(cr) - (log sigmoid(-cr) + log sigmoid(-rr)) / 2.
      bco_pair    BCO's pair form: -log sigmoid(cr) - log sigmoid(-rr).
      sppo_hard   SPPO, hard labels (Wu et al. 2024): (cr / beta - 1 / (2 beta))^2 + (rr / beta + 1 / (2 beta))^2.
      apo_zero    APO-zero (D'Oosterlinck et al. 2024): 1 - sigmoid(cr) + sigmoid(rr).
      apo_down    APO-down: sigmoid(cr) + 1 - sigmoid(m).
      discopop    DiscoPOP (Chris Lu et al. 2024): -log sigmoid(m) (1 - s) + exp(-m) s, s = sigmoid(m / discopop_tau).
      sigmoid_norm  dpo's on log-ratios per token, -log sigmoid(beta d) with d per token; rewards
                  summed as ipo's.
    f_divergence (TRL's f_divergence_type, f-DPO, Wang et al. 2023; with dpo, hinge, ipo, robust,
    exo_pair, discopop and sigmoid_norm, F_DIVERGENCE_LOSSES): each reply's summed log-ratio x taken
    to f'(exp x) before the margin: forward_kl 1 - exp(-x), js_divergence log 2 + log sigmoid(x),
    alpha_divergence (exp((f_alpha - 1) x) - 1) / (f_alpha - 1) (its exponent clamped at 80, 11 in
    fp16, as TRL's; f_alpha 1: x); the rewards logged stay beta x (TRL's).
    sft_weight (simpo and the dpo family, DPO_LOSSES): plus sft_weight times the chosen reply's
    negative log-likelihood per token (RPO, Pang et al. 2024; TRL's loss_type [..., "sft"] with its
    weight, MPO's mix; TRL averages it over the batch's chosen tokens, here over each pair's as ORPO's).
    weight and mix (TRL's loss_type list with its loss_weights; MPO: dpo 0.8, mix (("bco_pair", 0.2),),
    sft_weight 1): weight times kind's losses plus each (k, w) of mix's w times k's, then sft_weight's
    NLL once; kind and mix's all of the dpo family, each once. Each kind takes the options it takes
    alone (label_smoothing dpo, robust, exo_pair; discopop_tau discopop; f_divergence all of them, as
    TRL refuses it otherwise); the rewards are kind's (beta times the summed log-ratios for every one of
    the dpo family, as TRL logs them once for the mix)."""
    if mix:
        kinds = [kind, *(k for k, _ in mix)]
        if not all(k in DPO_LOSSES for k in kinds) or len(set(kinds)) < len(kinds):
            raise ValueError(f"preference loss: a mix of losses takes the dpo family ({', '.join(DPO_LOSSES)}), "
                             f"each once (its sft: sft_weight); got {', '.join(map(repr, kinds))}")
        options = dict(chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, ref_chosen_logps=ref_chosen_logps,
                       ref_rejected_logps=ref_rejected_logps, beta=beta, gamma=gamma, label_smoothing=label_smoothing,
                       discopop_tau=discopop_tau, f_divergence=f_divergence, f_alpha=f_alpha)
        losses, chosen_rewards, rejected_rewards = preference_loss(kind, chosen_logps, rejected_logps, weight=weight,
                                                                   **options)
        for k, w in mix:
            losses = losses + preference_loss(k, chosen_logps, rejected_logps, weight=w, **options)[0]
        if sft_weight:  # (once for the mix: TRL's "sft" is a loss_type of its own)
            losses = losses + sft_weight * (-chosen_logps / chosen_tokens.clamp(min=1))
        return losses, chosen_rewards, rejected_rewards
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {kind!r}")
    if not beta > 0:
        raise ValueError(f"preference loss: beta must be > 0, got {beta}")
    if kind not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"the {kind} loss needs the reference model's log-probabilities")
    if sft_weight and kind not in DPO_LOSSES + ("simpo",):
        raise ValueError(f"preference loss: sft_weight goes with simpo and the dpo family ({', '.join(DPO_LOSSES)}; "
                         f"orpo has its own NLL), not {kind}")
    if kind == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"preference loss: exo_pair needs label_smoothing in (0, 1) (EXO's epsilon: 1e-3), got "
                         f"{label_smoothing}")
    if f_divergence != "reverse_kl" and (f_divergence not in F_DIVERGENCES or kind not in F_DIVERGENCE_LOSSES):
        raise ValueError(f"preference loss: f_divergence must be one of {', '.join(F_DIVERGENCES)} and, other than "
                         f"reverse_kl, goes with {', '.join(F_DIVERGENCE_LOSSES)}; got {f_divergence!r} with {kind}")
    nll = -chosen_logps / chosen_tokens.clamp(min=1) if sft_weight else None  # (before per_token rescales them)
    scores = None  # f-DPO: each reply's f'(ratio) of its summed log-ratio (before per_token rescales them)
    if f_divergence != "reverse_kl":
        scores = [_f_divergence_score(logps - ref, f_divergence, f_alpha)
                  for logps, ref in ((chosen_logps, ref_chosen_logps), (rejected_logps, ref_rejected_logps))]
        if kind in ("ipo", "sigmoid_norm"):
            scores = [scores[0] / chosen_tokens.clamp(min=1), scores[1] / rejected_tokens.clamp(min=1)]
    logged = None
    if kind in ("ipo", "sigmoid_norm"):  # TRL's rewards (and accuracy) for them: beta times the summed log-ratio
        logged = (beta * (chosen_logps - ref_chosen_logps)).detach(), (beta * (rejected_logps - ref_rejected_logps)).detach()
    per_token = kind in ("ipo", "sigmoid_norm", "simpo", "orpo")
    if per_token:  # a reply's mean log-probability per token (empty replies: 0)
        chosen_logps, rejected_logps = chosen_logps / chosen_tokens.clamp(min=1), rejected_logps / rejected_tokens.clamp(min=1)
        if kind in ("ipo", "sigmoid_norm"):
            ref_chosen_logps = ref_chosen_logps / chosen_tokens.clamp(min=1)
            ref_rejected_logps = ref_rejected_logps / rejected_tokens.clamp(min=1)
    if kind == "reward":
        chosen_rewards, rejected_rewards = chosen_logps, rejected_logps
    elif kind in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    else:
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    m = chosen_rewards - rejected_rewards if scores is None else beta * (scores[0] - scores[1])  # beta d (dpo's family)
    if kind == "dpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)
    elif kind == "sigmoid_norm":
        losses = -F.logsigmoid(m)
    elif kind == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(m) + label_smoothing * F.logsigmoid(-m)) / (1 - 2 * label_smoothing)
    elif kind == "exo_pair":
        losses = (torch.sigmoid(m) * (F.logsigmoid(m) - math.log1p(-label_smoothing))
                  + torch.sigmoid(-m) * (F.logsigmoid(-m) - math.log(label_smoothing)))
    elif kind == "nca_pair":
        losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                  - 0.5 * F.logsigmoid(-rejected_rewards))
    elif kind == "bco_pair":
        losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    elif kind == "sppo_hard":
        losses = (chosen_rewards / beta - 0.5 / beta) ** 2 + (rejected_rewards / beta + 0.5 / beta) ** 2
    elif kind == "apo_zero":
        losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    elif kind == "apo_down":
        losses = (1 - torch.sigmoid(m)) + torch.sigmoid(chosen_rewards)  # (TRL's sum: a tiny first term kept)
    elif kind == "discopop":
        # exp(-m) sigmoid(m / tau) as one exp: TRL's product is inf * 0 = NaN where m < -88 (fp32)
        losses = -F.logsigmoid(m) * torch.sigmoid(-m / discopop_tau) + torch.exp(F.logsigmoid(m / discopop_tau) - m)
    elif kind == "ipo":
        losses = (m / beta - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - m)
    elif kind == "simpo":
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    elif kind == "reward":
        difference = chosen_rewards - rejected_rewards - (0 if margin is None else margin.to(chosen_rewards))
        losses = -F.logsigmoid(difference) + center_rewards * (chosen_rewards + rejected_rewards) ** 2
    elif kind == "kto":
        if desirable is None:
            raise ValueError("the kto loss needs each example's label (desirable)")
        if kto_loss not in ("kto", "apo_zero_unpaired"):
            raise ValueError(f"preference loss: kto_loss must be kto or apo_zero_unpaired, got {kto_loss!r}")
        z = ((rejected_logps - ref_rejected_logps).mean() if kl is None else kl).clamp(min=0).detach()
        if kto_loss == "apo_zero_unpaired":
            z = torch.zeros_like(z)
        ratio = chosen_logps - ref_chosen_logps
        # (apo_zero_unpaired's undesirable term as TRL writes it, sigmoid(beta r): 1 - sigmoid(-beta r) rounds a
        # small one to 0 in fp32, its gradient too, below beta r of about -17)
        undesirable = (torch.sigmoid(beta * ratio) if kto_loss == "apo_zero_unpaired"
                       else 1 - torch.sigmoid(beta * (z - ratio)))
        losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                             undesirable_weight * undesirable)
    else:  # orpo
        log_odds = orpo_log_odds(chosen_logps) - orpo_log_odds(rejected_logps)
        losses = -chosen_logps - beta * F.logsigmoid(log_odds)
    if weight != 1.0:  # (weight 1 left out: today's losses bitwise)
        losses = weight * losses
    if nll is not None:
        losses = losses + sft_weight * nll
    if logged is not None:
        return losses, *logged
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The dpo family's losses of the margin of two replies' scores, which f-DPO generalizes (TRL's list)
F_DIVERGENCE_LOSSES = ("dpo", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm")


def _f_divergence_score(x: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(exp x) of a summed log-ratio x (f-DPO; TRL 1.16's forms and clamps)."""
    if kind == "forward_kl":
        return 1 - torch.exp(-x)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(x)
    if abs(alpha - 1.0) < 1e-6:  # (the limit: reverse KL's log t)
        return x
    # (in fp32 at least, fp64 kept; back to x's dtype, as TRL's, which has no fp64 clamp)
    t = ((alpha - 1.0) * x).to(torch.promote_types(x.dtype, torch.float32))
    t = t.clamp(max=11.0 if x.dtype == torch.float16 else 80.0)
    return (torch.exp(t) - 1.0).to(x.dtype) * (1.0 / (alpha - 1.0))


def orpo_log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a reply's log-probability per token (ORPO's odds), log(1 - p) as
    log(-expm1(log p)): exact as p nears 1 (and finite for a cut-off, empty reply)."""
    return logp - torch.log(-torch.expm1(logp.clamp(max=-1e-12)))


def _kernel_dtypes(x: torch.Tensor, by_device: dict) -> tuple:
    """The dtypes an op's kernel takes on x's device: none on devices pyllm has no kernels for (meta,
    mps, ...), nor on CUDA when this pyllm was built without CUDA kernels (no nvcc at install) or
    the GPU is older than they need (V100, T4: torch's ops there)."""
    # is_cpu / is_cuda, not device.type: asked once per layer per decoded token, and building the
    # torch.device costs 0.7 us each time (the attention check: 2.9 us -> 0.8 us, beside 8-14 us
    # of Python in the kvcache call itself).
    if x.is_cpu:
        return by_device["cpu"]
    return by_device["cuda"] if x.is_cuda and _util.cuda_kernels_run_on(x) else ()


def _swiglu_takes(x: torch.Tensor) -> bool:
    return x.dtype in _kernel_dtypes(x, swiglu_ops.DTYPES)


def _rms_norm_takes(x: torch.Tensor) -> bool:
    """Whether pyllm.rms_norm has a kernel for x: its dtype on its device, rows the CUDA kernel takes."""
    return x.dtype in _kernel_dtypes(x, rms_norm_ops.DTYPES) and (
        not x.is_cuda or x.shape[-1] <= rms_norm_ops.max_cols_cuda_with_dw(x))


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in fp32 and cast back, as LLaMA does:
    bf16 squares lose too many bits when summed over a 4k-wide row. torch.nn.RMSNorm's arguments
    (dim: an int or the trailing dims normalised together, also by torch's name normalized_shape=;
    elementwise_affine), with LLaMA's roundings and eps default (1e-5; None: torch's, fp32's
    epsilon). A weight of another dtype than x is cast to x's first; an fp32 weight on bf16 / fp16 x
    (under autocast) is rounded for the product too, its gradient written in fp32 (rms_norm's).
    offset, cast_first: rms_norm's; Gemma's norm is offset=1.0, cast_first=False (the weight stored
    as scale - 1, initialised to 0, the product taken in fp32 and rounded once)."""

    def __init__(self, dim=None, eps: float | None = 1e-5, elementwise_affine: bool = True, device=None, dtype=None, *,
                 normalized_shape=None, offset: float = 0.0, cast_first: bool = True):
        super().__init__()
        if (dim is None) == (normalized_shape is None):  # normalized_shape: torch.nn.RMSNorm's name for dim
            raise TypeError("RMSNorm: give the normalised size as dim (first argument) or normalized_shape= "
                            f"(torch.nn.RMSNorm's name), one of them; got dim={dim!r}, "
                            f"normalized_shape={normalized_shape!r}")
        dim = dim if normalized_shape is None else normalized_shape
        if isinstance(elementwise_affine, (torch.device, str)) or not isinstance(elementwise_affine, bool):
            raise TypeError(f"RMSNorm: elementwise_affine (the 3rd argument, as in torch.nn.RMSNorm) must be a bool, got "
                            f"{elementwise_affine!r}; give device= by name")
        self.normalized_shape = (dim,) if isinstance(dim, int) else tuple(dim)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset, self.cast_first = float(offset), bool(cast_first)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A scale of one: weights 1 - offset (what meta-device init then to_empty, FSDP2's way, calls to
        fill the weight)."""
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def extra_repr(self) -> str:
        extra = f", offset={self.offset}, cast_first={self.cast_first}" if (self.offset, self.cast_first) != (0, True) else ""
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{extra}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.normalized_shape)
        if not x.is_floating_point():  # (torch.nn.RMSNorm refuses them too)
            raise TypeError(f"RMSNorm: x must be a floating-point tensor, got {x.dtype}")
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(f"RMSNorm: x's trailing dims must be {self.normalized_shape}, got shape {tuple(x.shape)}")
        if n > 1:  # dims normalised together: one row of their product
            return self._rows(x.flatten(-n)).view(x.shape)
        return self._rows(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        eps = rms_norm_ops._torch_eps(x) if self.eps is None else self.eps
        weight = None if self.weight is None else self.weight.reshape(-1)
        if _rms_norm_takes(x):  # the same roundings, one kernel (an fp32 weight's gradient in fp32)
            return rms_norm(x, weight, eps, offset=self.offset, cast_first=self.cast_first)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        if weight is None:
            return y.to(x.dtype)
        if self.cast_first:
            y = y.to(x.dtype).to(y.dtype)
        return (y * (self.offset + weight.to(x.dtype).to(y.dtype))).to(x.dtype)  # the kernel's T(y * (offset + w))


def rope_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, start: int = 0, device=None,
                 dtype=torch.float32, scaling: dict | None = None, positions: torch.Tensor | None = None):
    """cos, sin of the rotary angles (Su et al. 2021, eq. 34) for positions start..start+seq_len-1,
    each (seq_len, head_dim // 2), in fp32 (or fp64) whatever the model dtype: angles up to 1e4 rad
    need it. scaling: Llama 3.1's long-context rule (see llama3_scaled), LongRoPE's,
    YaRN's (yarn_scaled) or linear. positions: an int tensor of
    positions instead (read on its device, never on the host: a CUDA graph's decode step), giving
    (*positions.shape, head_dim // 2); not with LongRoPE, whose factors depend on the position."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    scale = 1.0
    if positions is not None and scaling is not None and scaling["rope_type"] == "longrope":
        raise NotImplementedError("rope_cos_sin: LongRoPE picks its factors by position on the host; give start")
    if scaling is not None and scaling["rope_type"] == "longrope":
        # LongRoPE (Ding et al. 2024), as Phi-3.5 / Phi-4-mini and transformers apply it: one factor per
        # frequency, the long ones once this call's last position is past the original context (so a
        # generation crossing it starts its cache over), and cos / sin scaled by attention_factor.
        long = start + seq_len > scaling["original_max_position_embeddings"]
        factors = scaling["long_factor" if long else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, device=device, dtype=dtype)
        scale = scaling["attention_factor"]
    elif scaling is not None and scaling["rope_type"] == "linear":  # positions divided by factor
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["rope_type"] == "yarn":
        inv_freq = yarn_scaled(inv_freq, head_dim, theta, **{k: v for k, v in scaling.items()
                                                             if k not in ("rope_type", "attention_factor")})
        scale = scaling["attention_factor"]
    elif scaling is not None:
        inv_freq = llama3_scaled(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})
    if positions is not None:  # the same products as the outer product below
        angles = positions.to(dtype)[..., None] * inv_freq  # (..., D/2)
    else:
        angles = torch.outer(torch.arange(start, start + seq_len, device=device, dtype=dtype), inv_freq)  # (T, D/2)
    return angles.cos() * scale, angles.sin() * scale


def yarn_scaled(inv_freq: torch.Tensor, dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                beta_fast: float, beta_slow: float, truncate: bool) -> torch.Tensor:
    """YaRN's RoPE frequencies (Peng et al. 2023, as transformers' _compute_yarn_parameters): the
    pairs that turn more than beta_fast times over the original context keep their frequency, those
    turning fewer than beta_slow times are divided by factor, and a linear ramp over the pair index
    blends the ones between (its ends rounded outward where truncate)."""
    def pair_turning(turns: float) -> float:  # the pair index at which a frequency turns `turns` times
        return dim * math.log(original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers': no division by zero)
    ramp = ((torch.arange(dim // 2, device=inv_freq.device, dtype=inv_freq.dtype) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's RoPE frequencies for a longer context (Meta's reference code, apply_scaling):
    wavelengths shorter than original / high_freq_factor stay, those longer than
    original / low_freq_factor are stretched by factor, and the band between blends the two."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    long = wavelen > original_max_position_embeddings / low_freq_factor
    short = wavelen < original_max_position_embeddings / high_freq_factor
    return torch.where(short, inv_freq, torch.where(long, inv_freq / factor, blended))


def _rope_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether pyllm.rope has a kernel for these: x (B, T, H, D) of a kernel's dtype, tables of the
    matching precision (fp32, fp64 for fp64) that no gradient flows to, (T, R/2) or (B or 1, T, R/2)."""
    return (x.dim() == 4 and x.dtype in _kernel_dtypes(x, rope_ops.DTYPES) and cos.dtype == sin.dtype
            == rope_ops._table_dtype(x) and not (cos.requires_grad or sin.requires_grad) and cos.shape == sin.shape
            and cos.shape[-2] == x.shape[1] and (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] in (1, x.shape[0]))))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs (x[..., i], x[..., i + R/2]) of x (B, T, H, D) by the angles of their
    position (the "rotate half" layout of GPT-NeoX / HF LLaMA, not the interleaved one of Meta's),
    R = 2 * cos.shape[-1] <= D; dims from R on pass unrotated (partial RoPE, Phi-4-mini's).
    cos, sin: (T, R/2) for every row alike, or (B, T, R/2) (packed documents: positions per row);
    from transformers' full-width tables (cat(freqs, freqs)), their first R/2 columns (pyllm.rope)."""
    if _rope_takes(x, cos, sin):
        return rope_ops.rope(x, cos, sin)  # the same function in one kernel
    # torch ops (tables of another dtype or needing grad, devices without the kernel): the kernel's
    # shapes only, or broadcasting takes HF's (B, H, T, D) with (T, R/2) tables to a (B, T, T, D) result
    half = cos.shape[-1] if cos.dim() else 0
    if not (x.dim() == 4 and cos.shape == sin.shape and 1 <= half and 2 * half <= x.shape[-1]
            and cos.dim() in (2, 3) and cos.shape[-2] == x.shape[1] and (cos.dim() == 2 or cos.shape[0] in (1, x.shape[0]))):
        raise ValueError(f"apply_rope: x must be (batch, seqlen, n_heads, head_dim) and cos, sin (seqlen, R/2) or "
                         f"(batch or 1, seqlen, R/2) with 2 <= R <= head_dim; got x {tuple(x.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    x_rot, x_pass = (x, None) if 2 * half == x.shape[-1] else (x[..., :2 * half], x[..., 2 * half:])
    x1, x2 = x_rot.to(cos.dtype)[..., :half], x_rot.to(cos.dtype)[..., half:]  # (B, T, H, R/2)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, R/2) or (B, T, 1, R/2)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return rotated if x_pass is None else torch.cat([rotated, x_pass], dim=-1)


def _flash_attn_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decode: bool = False) -> bool:
    """Whether pyllm's flash attention runs these inputs (head dim, dtype, device); otherwise torch's
    SDPA computes the same function. The kernels' head dims and dtypes; and on the CPU the others
    pyllm.flash_attn takes (head dims up to 256 zero-padded, fp16 in fp32: a widened copy), which
    beat SDPA there but in fp32 decode steps (2-core EPYC, 2026-12-03, H 8, causal: head dim 80
    fwd + bwd, T 512 / 2048, fp32 1.9x / 1.8x, bf16 3.6x / 2.0x, fp16 13x at T 1,024; one decoded
    token over a cache of 512 / 2,048, B 4, GQA 4: bf16 2.8x / 6.8x, fp32 0.29x / 0.42x, the cache
    copied each step). On CUDA SDPA keeps them (its flash backend has head dim 80)."""
    if not q.dtype == k.dtype == v.dtype:
        return False
    if q.shape[-1] in flash_attn_ops.HEAD_DIMS and q.dtype in _kernel_dtypes(q, flash_attn_ops.DTYPES):
        return True
    return (q.is_cpu and 0 < q.shape[-1] <= flash_attn_ops.HEAD_DIMS[-1]
            and q.dtype in _kernel_dtypes(q, flash_attn_ops.ACCEPTED)
            and not (decode and q.dtype in (torch.float32, torch.float64)))


def _window_mask(T: int, S: int, left: int, device) -> torch.Tensor:
    """(T, S) bool, True where query i (at key position S - T + i, bottom-right aligned) sees key j:
    causal and, for left >= 0, j >= that position - left (flash_attn's window (left, 0))."""
    pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    keys = torch.arange(S, device=device)[None, :]  # (1, S)
    seen = keys <= pos
    return seen & (keys >= pos - left) if left >= 0 else seen


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's fixed slopes (Press et al. 2022), fp32 (n_heads,): 2^(-8 i / n), i = 1..n, for n a
    power of 2; otherwise those of the power of 2 below n_heads, then the odd-numbered slopes of twice
    that many (BLOOM's and MPT's construction)."""
    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    slopes += [2.0 ** (-4.0 * i / closest) for i in range(1, 2 * (n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


# F.scaled_dot_product_attention's enable_gqa arrived in torch 2.5.
_SDPA_TAKES_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """(k, v, keyword arguments) for F.scaled_dot_product_attention of q (B, H, T, D) over k, v
    (B, H_kv, S, D), H a multiple of H_kv: its enable_gqa where torch has it, else k and v repeated
    per group (torch 2.4)."""
    if q.shape[1] == k.shape[1]:
        return k, v, {}
    if _SDPA_TAKES_GQA:
        return k, v, {"enable_gqa": True}
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), {}


def _sdpa(q, k, v, mask=None, is_causal=False, scale=None, softcap=None, sinks=None, alibi=None, q_positions=None,
          dropout_p: float = 0.0):
    """SDPA on (B, T, H, D) q and (B, S, H_kv, D) k, v (GQA), returned as (B, T, H, D); mask: bool,
    broadcast to (B, H, T, S), True where seen. softcap: Gemma 2's scores, softcap * tanh(scores /
    softcap), before the mask and the softmax; sinks: (H,) logits joining each softmax with a zero
    value (gpt-oss's); alibi: (H,) or (B, H) ALiBi slopes, -slope * |p_i - j| added in fp32 after the cap, p_i
    the query's key position: q_positions (T,) or (B, T), by default S - T + i (bottom-right, as
    flash_attn). SDPA takes none of them, so with them the (B, H, T, S) scores are computed whole, in
    q's dtype as SDPA's math path does. dropout_p: dropout on the attention probabilities (training
    a model whose attention has it: transformers' GPT-2), as SDPA's."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, H_kv, S, D)
    if not softcap and sinks is None and alibi is None:
        k, v, gqa = sdpa_gqa(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                             dropout_p=dropout_p, **gqa)
        return out.transpose(1, 2)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, S)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        mask = _window_mask(q.shape[2], k.shape[2], -1, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        # Keys no query sees may be a cache's unwritten memory (NaN, inf): 0 * NaN would reach the output.
        v = v.masked_fill(~mask.any(dim=-2)[..., None], 0)
    acc = torch.promote_types(scores.dtype, torch.float32)  # the softmax in fp32 at least
    scores = scores.to(acc)
    if alibi is not None:  # after the mask: -inf stays -inf
        T, S = scores.shape[-2:]
        pos = torch.arange(S - T, S, device=q.device) if q_positions is None else q_positions  # (T,) / (B, T)
        distance = (pos[..., :, None] - torch.arange(S, device=q.device)).abs().to(acc)  # (T, S) / (B, T, S)
        scores = scores - alibi.to(acc)[..., None, None] * (distance[:, None] if distance.dim() == 3 else distance)
    if sinks is not None:  # one more column, dropped after the softmax
        sink = sinks.to(acc)[None, :, None, None].expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.nan_to_num(0.0).to(q.dtype)  # a query seeing no key: 0
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v).transpose(1, 2)


def _kvcache_sdpa_at(q, k_cache, v_cache, k, v, cache_seqlens, window_left, scale, softcap=None, alibi=None):
    """attention_with_kvcache through SDPA for per-row lengths held in a tensor: scattered writes and
    a (B, T, S_max) mask over the whole cache, no host read of the lengths. The cache's unseen
    positions must hold finite values (LLM.new_kv_cache's zeros): masked weights of 0 times NaN
    are NaN."""
    B, T = q.shape[:2]
    rows = torch.arange(B, device=q.device)[:, None]  # (B, 1)
    pos = cache_seqlens.long()[:, None] + torch.arange(T, device=q.device)  # (B, T): the new tokens' positions
    k_cache[rows, pos] = k.to(k_cache.dtype)
    v_cache[rows, pos] = v.to(v_cache.dtype)
    keys = torch.arange(k_cache.shape[1], device=q.device)  # (S_max,)
    seen = keys <= pos[:, :, None]  # (B, T, S_max)
    if window_left >= 0:
        seen &= keys >= pos[:, :, None] - window_left
    return _sdpa(q, k_cache.to(q.dtype), v_cache.to(q.dtype), seen[:, None], scale=scale, softcap=softcap, alibi=alibi,
                 q_positions=pos)


def document_ids(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T) int64: which document of cu_seqlens (packed over the B * T tokens) each token is in."""
    tokens = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True).view(B, T)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              window_left: int = -1, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
              softcap: float | None = None, alibi: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, T, H, D) and k, v (B, S, H_kv, D) with H % H_kv == 0
    (GQA/MQA), returned as (B, T, H, D): pyllm.flash_attn where it has a kernel, else SDPA.
    window_left >= 0 (causal only): a query also sees no key more than window_left before its own
    position (a sliding window of window_left + 1 keys, Mistral's sliding_window). scale: of the
    scores, None for 1 / sqrt(D). cu_seqlens (causal self-attention only): int32 (N + 1,) starts of
    the N documents packed into the B * T tokens (row-major, none crossing a row's end): a query
    sees only its own document's keys, as flash_attn's varlen call computes. softcap: Gemma 2's
    capped scores, softcap * tanh(scores / softcap); alibi: fp32 (H,) or (B, H) ALiBi slopes (BLOOM's, MPT's),
    -slope * distance added to the scores (both on pyllm's kernels: on CUDA with
    PYLLM_ATTN_SCORE_MODS_CUDA=1 until verified on a GPU, torch ops otherwise).
    dropout_p: dropout on the attention probabilities (nanoGPT's attn_dropout, GPT-2's attn_pdrop),
    in the kernels too (on CUDA with PYLLM_ATTN_SCORE_MODS_CUDA=1 until verified on a GPU); SDPA's
    dropout where SDPA runs. The two draw different elements (each its own generator of masks)."""
    if window_left >= 0 and not causal:
        raise ValueError("attention: window_left needs causal=True")
    if cu_seqlens is not None:
        return _document_attention(q, k, v, cu_seqlens, window_left, scale, softcap, alibi, dropout_p)
    if _flash_attn_takes(q, k, v) and flash_attn_ops.takes_score_mods(q, softcap, alibi, dropout_p):
        return flash_attn_ops.flash_attn(q, k, v, causal=causal, window=(window_left, -1), softmax_scale=scale,
                                         softcap=softcap or 0.0, alibi_slopes=alibi, dropout_p=dropout_p)
    mask = _window_mask(q.shape[1], k.shape[1], window_left, q.device) if window_left >= 0 else None
    return _sdpa(q, k, v, mask, causal and mask is None, scale, softcap, alibi=alibi, dropout_p=dropout_p)


def _document_attention(q, k, v, cu_seqlens, window_left, scale, softcap=None, alibi=None, dropout_p=0.0):
    B, T, H, D = q.shape
    if _flash_attn_takes(q, k, v) and flash_attn_ops.takes_score_mods(q, softcap, alibi, dropout_p):
        # max_seqlen = T bounds every document (none crosses a row), so no device sync reads cu_seqlens.
        out = flash_attn_ops.flash_attn(q.reshape(B * T, H, D), k.reshape(B * T, *k.shape[2:]),
                                        v.reshape(B * T, *v.shape[2:]), causal=True, window=(window_left, -1),
                                        softmax_scale=scale, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                        max_seqlen_q=T, max_seqlen_k=T, softcap=softcap or 0.0, alibi_slopes=alibi,
                                        dropout_p=dropout_p)
        return out.view(B, T, H, D)
    doc = document_ids(cu_seqlens, B, T)  # (B, T)
    mask = (doc[:, :, None] == doc[:, None, :]) & _window_mask(T, T, window_left, q.device)  # (B, T, T)
    # (the distance of two tokens of a document is that of their places in the row)
    return _sdpa(q, k, v, mask[:, None], scale=scale, softcap=softcap, alibi=alibi, dropout_p=dropout_p)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, cache_seqlen: int | torch.Tensor, window_left: int = -1,
                           scale: float | None = None, softcap: float | None = None,
                           alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-time attention, flash_attn_with_kvcache's contract: writes the new k, v (B, T, H_kv, D)
    into k_cache, v_cache (B, S_max, H_kv, D) at positions cache_seqlen..cache_seqlen+T-1, then
    attends q (B, T, H, D) causally over the cache's first cache_seqlen+T positions (the new queries
    sit at the end, so query i sees keys up to cache_seqlen+i, and none more than window_left before
    it when window_left >= 0). cache_seqlen: an int, or an int32 (B,) tensor of each row's length,
    read on its device only (the lengths' bounds are the caller's to keep). pyllm.flash_attn_with_kvcache
    where it has a kernel (split-KV on the GPU; softcap and ALiBi there with PYLLM_ATTN_SCORE_MODS_CUDA=1
    until verified), else the same through SDPA."""
    if (flash_attn_ops.takes_score_mods(q, softcap, alibi)
            and _flash_attn_takes(q, k_cache, v_cache, decode=q.shape[1] <= 16)  # (a prompt's prefill: not a step)
            and k.dtype == k_cache.dtype):
        if window_left < 0:  # the default window: the eager CPU shortcut skips checking it
            return flash_attn_ops.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlen, k, v, causal=True,
                                                          softmax_scale=scale, softcap=softcap or 0.0,
                                                          alibi_slopes=alibi)
        return flash_attn_ops.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlen, k, v, causal=True,
                                                      window=(window_left, -1), softmax_scale=scale,
                                                      softcap=softcap or 0.0, alibi_slopes=alibi)
    if (softcap or alibi is not None) and not isinstance(cache_seqlen, torch.Tensor):  # as decode_step's: the same bits
        cache_seqlen = torch.full((q.shape[0],), cache_seqlen, dtype=torch.int32, device=q.device)
    if isinstance(cache_seqlen, torch.Tensor):  # lengths on the device: nothing below can slice by them
        return _kvcache_sdpa_at(q, k_cache, v_cache, k, v, cache_seqlen, window_left, scale, softcap, alibi)
    T = q.shape[1]
    end = cache_seqlen + T
    k_cache[:, cache_seqlen:end] = k
    v_cache[:, cache_seqlen:end] = v
    keys, values = k_cache[:, :end], v_cache[:, :end]  # (B, S, H_kv, D)
    mask = None
    if T > 1 or window_left >= 0:  # a single new query without a window sees everything
        mask = _window_mask(T, end, window_left, q.device)
    return _sdpa(q, keys, values, mask, scale=scale, softcap=softcap)
