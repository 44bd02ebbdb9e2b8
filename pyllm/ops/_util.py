"""Helpers shared by every op wrapper: the extension handle, argument packing, validation."""
from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import re
import sys
import threading

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake  # (loaded by `import torch` already)
from torch.autograd import forward_ad

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # a torch without it: eager_plain_cpu then always says no
    def _get_current_dispatch_mode():
        raise AttributeError("_get_current_dispatch_mode")

from pyllm import _C

HAS_CUDA_KERNELS: bool = bool(_C.has_cuda)
CUDA_ARCHS: str = _C.cuda_archs

# Must match csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


_this_thread = threading.local()


def init_cpu_threads() -> None:
    """Before a C++ CPU kernel: this thread's OpenMP teams sized as torch.set_num_threads says.
    OpenMP keeps the count per thread, and a thread torch has run no op in still has the runtime's
    default (every core; OMP_NUM_THREADS) until torch sets it, as torch does before its own first op
    in each thread (at::lazy_init_num_threads, which torch.get_num_threads runs)."""
    if not getattr(_this_thread, "ready", False):
        torch.get_num_threads()
        _this_thread.ready = True


def cuda_usable() -> bool:
    """True when pyllm's CUDA kernels were built and torch sees a GPU to run them on."""
    return HAS_CUDA_KERNELS and torch.cuda.is_available() and _C.cuda_device_count() > 0


# The oldest GPU the build has code for: sm_80 at least (cp.async, bf16 and the tensor-core
# instructions every kernel file assumes), or the oldest of PYLLM_CUDA_ARCHS ("80,90"; a CMake
# name such as "native" says nothing, so 80).
_built_archs = [int(m.group()) for a in CUDA_ARCHS.split(",") if (m := re.match(r"\d+", a.strip()))]  # "90a", "100-real"
_CUDA_MIN_CAPABILITY = max(80, min(_built_archs)) if _built_archs else 80
_runs_on: dict[int, bool] = {}


def cuda_kernels_run_on(t: torch.Tensor) -> bool:
    """Whether pyllm's CUDA kernels run on CUDA tensor t's GPU: built, and the GPU sm_80 (A100) or
    newer. An older GPU (V100, T4) has no image to run: the model's layers take torch's ops there,
    and an op called on it says so instead of the launch's "no kernel image is available". While
    tracing (torch.compile, fake tensors) the answer known for the device is taken (LLM.to and the
    first eager call ask), else yes: the capability is a host query."""
    if not HAS_CUDA_KERNELS:
        return False
    ok = _runs_on.get(t.get_device())  # (first: asked per layer per decoded token)
    if ok is not None:
        return ok
    if torch.compiler.is_compiling() or is_fake(t):
        return True
    return gpu_runs_kernels(t.get_device())


def gpu_runs_kernels(index: int | None = None) -> bool:
    """cuda_kernels_run_on for GPU `index` (None: torch's current device)."""
    if index is None:
        index = torch.cuda.current_device()
    ok = _runs_on.get(index)
    if ok is None:
        major, minor = torch.cuda.get_device_capability(index)
        ok = _runs_on[index] = HAS_CUDA_KERNELS and major * 10 + minor >= _CUDA_MIN_CAPABILITY
    return ok


def is_dtensor(t) -> bool:
    """A DTensor (FSDP2's or tensor parallelism's shards), known without importing its module: its
    public name from torch 2.5, its private one before."""
    return type(t).__module__.startswith(("torch.distributed.tensor", "torch.distributed._tensor"))


def check_row_lengths(op: str, rows: int, per: str = "row", **tensors) -> None:
    """ValueError unless each given tensor (None: absent) holds `rows` elements: a kernel reads or
    writes one per row (or per column, ...) wherever the tensor points."""
    check_sizes(op, rows, f"one element per {per} ({rows})", **tensors)


def check_sizes(op: str, n: int, what: str | None = None, **tensors) -> None:
    """ValueError unless each given tensor (None: absent) holds n elements (what: how the message
    says so, "n elements" by default): a kernel runs over n of them wherever the tensor points, and
    a smaller one would be read past its end."""
    for name, t in tensors.items():
        if t is not None and t.numel() != n:
            raise ValueError(f"{op}: {name} must have {what or f'{n} elements'}, got shape {tuple(t.shape)}")


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# torch.cuda.current_stream builds a Stream object per call; the raw handle is what inductor's
# generated code reads. Absent (a CPU-only torch), no CUDA tensor reaches stream_of anyway.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(t: torch.Tensor) -> int:
    if _raw_stream is not None:
        return _raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def is_number(value) -> bool:
    """A real number that is not a bool: int, float, NumPy's scalars (numbers.Real; NumPy's bool is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_tensor(t) -> bool:
    """A tensor of integer ids: an integer dtype (not bool, whose True / False would be cast to ids 1 / 0)."""
    return isinstance(t, Tensor) and not (t.dtype == torch.bool or t.is_floating_point() or t.is_complex())


def symbolic(value) -> bool:
    """Whether a number argument cannot be checked here: under torch.compile's tracing a float may be
    a symbol (dynamic=True, or one that changed between calls), whose value is unknown, and
    math.isfinite or a comparison on it is a graph break (an error under fullgraph=True). Dynamo shows
    it as a plain float, so every number is taken as one while tracing: eager calls check them
    (and the kernels their own, eps for one)."""
    return torch.compiler.is_compiling() or isinstance(value, (torch.SymFloat, torch.SymInt))


def sym_min(a, b):
    """min(a, b) of ints or SymInts without specializing a symbol: torch.sym_min where either is one
    (torch 2.6's dynamo refuses torch.sym_min of two plain ints: a torch.* op returning an int)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return torch.sym_min(a, b)
    return min(a, b)


def finite_number(value) -> bool:
    """is_number and finite, or symbolic (not checkable while tracing)."""
    return symbolic(value) or (is_number(value) and math.isfinite(value))


def check_tensor(op: str, name: str, t, dtypes: dict[str, tuple]) -> None:
    """Checks that `t` is a floating tensor on a device and dtype this op has a kernel for.

    dtypes maps a device type ("cpu", "cuda") to the dtypes its kernel takes.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    # is_cpu / is_cuda first: t.device builds a torch.device per read (these checks run per call).
    dev = "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type
    if dev == "meta":  # shapes only (dry runs): the ops' fake implementations answer, for any kernel's dtype
        allowed = tuple(dict.fromkeys(d for by_device in dtypes.values() for d in by_device))
    elif dev in dtypes:
        allowed = dtypes[dev]
    else:
        raise ValueError(f"{op}: {name} is on device '{t.device}', expected one of: {', '.join(dtypes)} (or meta)")
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected one of {_names(allowed)} on {dev}")
    if dev == "cuda":
        check_backend(op, t)


def check_backend(op: str, t: torch.Tensor | torch.device) -> None:
    """A CUDA tensor (or device) has pyllm's kernels to run on: they were built, and (for a tensor)
    its GPU is one they run on."""
    device = t if isinstance(t, torch.device) else t.device
    if device.type == "cuda" and not HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{op}: got a CUDA tensor, but this pyllm was built without CUDA kernels "
            "(nvcc was not found at build time, or PYLLM_CUDA=off). Rebuild with nvcc on PATH "
            "and PYLLM_CUDA=on to get them."
        )
    if device.type == "cuda" and not isinstance(t, torch.device) and not cuda_kernels_run_on(t):
        major, minor = torch.cuda.get_device_capability(t.get_device())
        raise RuntimeError(
            f"{op}: pyllm's CUDA kernels need a GPU of compute capability "
            f"{_CUDA_MIN_CAPABILITY // 10}.{_CUDA_MIN_CAPABILITY % 10} or newer (built for {CUDA_ARCHS}); "
            f"{t.device} ({torch.cuda.get_device_name(t.get_device())}) is {major}.{minor}. pyllm's model "
            "layers take torch's ops on such a GPU; called directly, this op has no kernel for it."
        )


def check_same(op: str, **tensors: torch.Tensor) -> None:
    """All tensors share one dtype and one device."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; they must match")


# --- rows of logits, as the row kernels (cross_entropy, distill) take them ------------------------

def kernel_rows(t: Tensor) -> bool:
    """Whether 2-D t is laid out as the row kernels read rows: a contiguous last dim, rows at least V
    apart (not expanded: a gradient written over the rows must not overlap)."""
    return t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])


def as_rows(t: Tensor) -> Tensor:
    """(..., V) as the (rows, V) the row kernels take (a view where the strides allow it; expanded
    rows, stride 0, are copied)."""
    t = t.reshape(-1, t.shape[-1])
    return t if kernel_rows(t) else t.contiguous()


def row_losses(logits: Tensor, rows: int) -> Tensor:
    """A (rows,) buffer for per-row losses in the kernels' math type: fp32, fp64 for fp64 logits."""
    return logits.new_empty(rows, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


# --- plain eager CPU calls skip the custom op ----------------------------------------------------
#
# A torch.library custom op costs 15-30 us of dispatch per call on the CPU (swiglu at (1, 256):
# 18 us through the op, 3 us for its body; flash_attn at T = 8: 55 vs 27 us; 2-core Xeon VM,
# 2026-11-30), and its first call in a process imports torch._dynamo (1.1-1.6 s here) to wrap the
# kernel. Calls that need neither autograd nor tracing (inference, generation) run the op's body
# directly when these say so; everything else (autograd, torch.compile, fake tensors, dispatch and
# function modes, subclasses, functorch transforms, CUDA) goes through the op as before, so
# torch.compile still sees the op.
_STRIDED = torch.strided


# nn.Parameter is a Tensor subclass that only disables __torch_function__: plain data, as a Tensor
# (a norm's weight reaches rms_norm as the parameter itself).
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


# Whether a torch.func transform (grad, vjp, jacrev, vmap, jvp) is running: torch's own function
# under a name, no frame of ours on the eager calls' path.
torch_func_active = torch._C._are_functorch_transforms_active

# Whether torch.export is tracing (which inlines an autograd.Function's forward and drops its
# backward); torch 2.6 and newer name it, older ones never export pyllm's ops anyway.
exporting = getattr(torch.compiler, "is_exporting", lambda: False)


# A torch.func wrapper is a Tensor too, with no storage of its own; one outlives its transform in
# what a torch.func.vjp pullback saved, called after the transform has returned.
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def plain_cpu(t) -> bool:
    return (type(t) in _PLAIN_TYPES and t.is_cpu and t.layout is _STRIDED and not t.requires_grad
            and not _wrapped(t))


def eager_untraced() -> bool:
    """No torch.compile, torch.jit.trace, dispatch or function mode, vmap / grad transform: what
    sees the op must get the op (fake tensors, make_fx, a TorchScript trace, which would record the
    body's allocations but not its kernel call)."""
    try:  # private torch helpers: where a torch release lacks them, every call takes the op
        return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
                    or torch._C._is_torch_function_mode_enabled() or torch_func_active())
    except AttributeError:
        return False


def values_unreadable(t: Tensor) -> bool:
    """Whether a check may not read t's values here: while compiling (a graph break), or t a meta
    or fake tensor (FakeTensorMode, make_fx, torch.export: its data_ptr() is 0, its values none).
    Function and dispatch modes of real tensors (torch.device(...), FlopCounterMode) read as usual."""
    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def eager_plain_cpu(*tensors) -> bool:
    """Whether a call on these tensors (None allowed) may skip the custom op and run its body."""
    return eager_untraced() and all(t is None or plain_cpu(t) for t in tensors)


# --- eager calls on the CPU and CUDA, with autograd, skip the custom op too ----------------------
#
# The same reasoning for every plain eager call, CPU or CUDA, with or without autograd: on the
# H200 (2026-11-30) swiglu's forward on 2048 x 4096 bf16 took 54 us where its kernel needs ~15 and
# torch's two eager kernels 31: the GPU waited on the op's dispatch, and fwd+bwd paid it twice
# more (the autograd wrapper, then the backward op). An eager call with autograd runs the op's
# body inside a plain autograd.Function carrying the op's own setup_context and backward, and
# that backward runs the backward op's body. Create-graph backwards (grad mode on inside
# backward) go through the backward op as before, which has no autograd and says so.

def plain(t) -> bool:
    return type(t) in _PLAIN_TYPES and t.layout is _STRIDED and (t.is_cpu or t.is_cuda) and not _wrapped(t)


def _direct(tensors) -> bool:
    return eager_untraced() and all(plain(t) for t in tensors)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def runs_body(*tensors) -> bool:
    """Whether an eager call on these tensors (None allowed) may run an op's body itself: what call
    does for ops without autograd."""
    tensors = [t for t in tensors if t is not None]
    return _direct(tensors) and not _needs_grad(tensors)


def _title(name: str) -> str:
    """flash_attn -> FlashAttn: the op's name in its Function classes' names."""
    return "".join(part.title() for part in name.split("_"))


def eager_function(name: str, body, setup, grad) -> type:
    """The torch.autograd.Function that call runs for an op's eager calls with autograd: body with the
    op's own setup_context and backward, named after the op (_FlashAttnFunction, _GegluPackedFunction, ...)."""
    def forward(ctx, *inputs):
        out = body(*inputs)
        setup(ctx, inputs, out)
        return out

    return type(f"_{_title(name)}Function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(grad), "setup": staticmethod(setup),
                 "__module__": body.__module__})


# --- torch.func ---------------------------------------------------------------------------------
#
# torch.func.grad / vjp / jacrev and vmap of them take an op's derivative only through an
# autograd.Function with a separate setup_context (functorch runs forward one level down, then
# wraps what it returns); torch.library's register_autograd makes one without, and torch.func.grad
# over the op failed on that. Under those transforms an op runs as this Function: its forward is
# the op itself, its setup_context and backward the op's own, its vmap the op's batching rule
# (below) calling the twin, so a grad outside the vmap still differentiates (generate_vmap_rule
# for an op without a rule).
# An op without autograd (a backward op, called by that backward with the transform's tensors)
# gets a twin whose backward refuses, and every twin's jvp: a second derivative or forward mode
# (torch.func.hessian, grad of grad, jacfwd) names itself instead of torch's setup_context message.
# torch.compile of a function that calls torch.func.grad over an op fails in dynamo (torch 2.13),
# as it did before the twins, on another message.
_FUNCTORCH: dict = {}  # the op's body -> twin


def _op_name(op) -> str:
    return getattr(op, "_name", None) or getattr(op, "__name__", "pyllm")


def _no_setup(ctx, inputs, output):
    pass


def functorch_function(body, op, function) -> type:
    """The torch.func twin of an op: op as forward, function's setup and backward (function: the
    op's eager autograd.Function, None for an op without autograd), keyed by the op's body."""
    twin = _FUNCTORCH.get(body)
    if twin is None:
        name = _op_name(op).split("::")[-1]

        def forward(*inputs):
            return op(*inputs)

        def no_second_derivative(ctx, *grads):
            raise NotImplementedError(f"{name}: pyllm's backward ops have no derivative of their own "
                                      "(no second derivatives: torch.func.hessian, grad of grad)")

        def no_forward_mode(ctx, *tangents):
            raise NotImplementedError(f"{name}: pyllm's ops have no forward-mode AD (torch.func.jvp, jacfwd, "
                                      "hessian): their derivatives are backward (reverse mode) only")

        setup = _no_setup if function is None else function.setup
        backward = no_second_derivative if function is None else function.backward
        attrs = {"forward": staticmethod(forward), "setup_context": staticmethod(setup),
                 "backward": staticmethod(backward), "jvp": staticmethod(no_forward_mode), "__module__": __name__}
        rule = _VMAP_RULES.get(name)
        if rule is not None:  # the op's own rule: generate_vmap_rule's wrappers cost ~0.3-1 ms a call
            attrs["vmap"] = staticmethod(lambda info, in_dims, *args: rule(twin.apply, info, in_dims, *args))
        else:
            attrs["generate_vmap_rule"] = True
        twin = type(f"_{_title(name)}FuncFunction", (torch.autograd.Function,), attrs)
        _FUNCTORCH[body] = twin
    return twin


def refuse_second_derivatives(qualname: str) -> None:
    """Registers on a backward op (e.g. "pyllm::flash_attn_backward") an autograd formula that
    refuses: a double backward (a gradient taken with create_graph=True, then differentiated: a
    gradient penalty) raises NotImplementedError naming the forward op, where torch's own error
    asked the reader to "use register_autograd to add one". A first backward is unchanged: the
    formula only runs when a gradient is differentiated."""
    name = qualname.split("::")[-1].removesuffix("_backward")

    def refuse(ctx, *grads):
        raise NotImplementedError(
            f"pyllm.{name}: no second derivative (a backward through a gradient taken with create_graph=True, "
            "e.g. a gradient penalty): pyllm's backward kernels have no derivative of their own, as flash-attn's "
            "and Liger's have none; compute such a term with torch's own ops")

    torch.library.register_autograd(qualname, refuse, setup_context=_no_setup)


# --- vmap batching rules ---------------------------------------------------------------------------
#
# Without a rule torch.vmap runs an op once per example (its fallback, with a "performance drop"
# warning). An op whose kernel takes any number of leading dims batches by moving the vmapped dim
# first; one it cannot fold (a norm's per-example weight, a weight gradient per example) loops.

# A rule is rule(op, info, in_dims, *args) -> (outputs, out_dims), op what it calls on the batched
# tensors: the op itself for torch.vmap, the op's torch.func twin for the twin's own vmap (so a
# torch.func.grad outside the vmap differentiates through what the rule called).
_VMAP_RULES: dict = {}  # op name -> its batching rule


def batching_rule(op, rule=None):
    """Registers rule as op's torch.vmap rule (a decorator without rule); torch.func's twin of the op
    (functorch_function) runs the same rule as its vmap."""
    def register(rule):
        _VMAP_RULES[_op_name(op).split("::")[-1]] = rule
        torch.library.register_vmap(op, functools.partial(rule, op))
        return rule
    return register if rule is None else register(rule)


def vmap_loop(op, info, in_dims, *args):
    """torch's fallback, written out: op on each example, outputs stacked along dim 0."""
    outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def batch_first(info, t: Tensor, dim) -> Tensor:
    """t with its vmapped dim moved first, or, not vmapped (dim None), a broadcast one of the batch's size."""
    return t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)


def batched_first(info, in_dims, args, expand: bool) -> list:
    """args with each vmapped tensor's batch dim moved first; expand: tensors not vmapped get a
    broadcast batch dim too (elementwise ops take every tensor at one shape)."""
    return [batch_first(info, a, d) if d is not None or (expand and isinstance(a, Tensor)) else a
            for a, d in zip(args, in_dims)]


def vmap_folded(op, info, in_dims, args, folded):
    """op with the vmapped dim folded into dim 0 of the tensors at positions folded (each a
    (B, ...) tensor; one not vmapped is broadcast), every output (N * B, ...) unfolded to (N, B, ...)."""
    args = list(args)
    for i in folded:
        if args[i] is not None:
            a = batch_first(info, args[i], in_dims[i])
            args[i] = a.reshape(-1, *a.shape[2:])
    outs = op(*args)
    unfold = lambda t: t.view(info.batch_size, -1, *t.shape[1:])
    return (tuple(unfold(t) for t in outs), (0,) * len(outs)) if isinstance(outs, tuple) else (unfold(outs), 0)


def vmap_rows(op, info, in_dims, *args):
    """The batching rule of a per-row op on logits (..., V): every tensor argument row-aligned
    (logits, targets, per-row gradients), outputs per-row (rows,) or logits-shaped."""
    outs = op(*batched_first(info, in_dims, args, expand=True))
    rows = lambda t: t.view(info.batch_size, -1) if t.dim() == 1 else t  # (N * rows,) -> (N, rows)
    return (tuple(rows(t) for t in outs), (0,) * len(outs)) if isinstance(outs, tuple) else (rows(outs), 0)


def vmap_elementwise(op, info, in_dims, *args):
    """The batching rule of an op that takes its tensors at one shape with any leading dims."""
    out = op(*batched_first(info, in_dims, args, expand=True))
    return out, ((0,) * len(out) if isinstance(out, tuple) else 0)


def _mutates(op) -> bool:
    overload = getattr(op, "_opoverload", None) or getattr(op, "default", None)
    return overload is None or overload._schema.is_mutable


def refuse_forward_mode_ad(tensors, name: str) -> None:
    """NotImplementedError under forward-mode AD (torch.func.jvp / jacfwd, autograd.forward_ad's
    dual tensors): the ops register a backward only, and forward mode went through them silently,
    the tangent 0 or dropped."""
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{name}: pyllm's ops have no forward-mode AD (a dual tensor was given): "
                                  "their derivatives are torch.autograd's backward")
    if torch_func_active():
        interpreter = torch._C._functorch.peek_interpreter_stack()
        kind = interpreter.key() if interpreter is not None else None
        # (an input the transform differentiates is wrapped at its level; constants pass as before)
        wrapped = interpreter is not None and any(
            torch._C._functorch.maybe_get_level(t) >= interpreter.level() for t in tensors)
        if wrapped and kind == torch._C._functorch.TransformType.Jvp:
            raise NotImplementedError(f"{name}: pyllm's ops run under torch.func.vmap, grad, vjp and jacrev but not "
                                      "torch.func.jvp / jacfwd: their derivatives are backward (reverse mode) only")


# --- DTensor sharding rules (tensor and sequence parallelism) ---------------------------------------
#
# A DTensor reaching a custom op needs a sharding strategy for it (NotImplementedError "does not have
# a sharding strategy registered" without one). Each op lists the placements it computes locally,
# one mesh dim at a time: the rows of a row-wise op sharded on any dim but the last, attention on
# its batch or heads; DTensor redistributes other inputs to one of them. A rule is rule(*args) ->
# [(output placements, input placements)], args as the op's with tensors as DTensor's specs (.ndim,
# .shape, .mesh), None in the input list for non-tensor arguments (torch's register_sharding). Rules
# go to DTensor as torch.distributed.tensor is imported (at pyllm's import when it is loaded already):
# importing DTensor's modules would cost every `import pyllm` ~0.4 s.
_SHARDING_RULES: list = []  # (op overload, rule)
_sharding_registered = False


def sharding_rule(op):
    """Decorator: the rule is op's DTensor sharding strategy (op: a custom op or an overload). Every
    op module is imported by pyllm.ops before it hands the rules to DTensor."""
    def register(rule):
        _SHARDING_RULES.append((getattr(op, "_opoverload", None) or getattr(op, "default", op), rule))
        return rule
    return register


def _key_on_every_argument(op) -> None:
    """DTensor caches an op's sharding decision under its tensors' specs and the arguments from the
    first int one on (register_sharding's guess), and torch 2.6 then ran a call that needed its
    inputs redistributed with the cached call's other arguments: rope's backward (inverse) ran as
    the forward, gradients wrong without a word; an RMSNorm of another eps, a cross-entropy of
    another smoothing, likewise. Every argument from the first non-tensor one is in the key here."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
        propagator = DTensor._op_dispatcher.sharding_propagator
        arguments = op._schema.arguments
        first = next((i for i, a in enumerate(arguments) if not isinstance(a.type, torch.TensorType)), len(arguments))
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
            first, [a.name for a in arguments[first:] if a.kwarg_only] or None, needs_pytree=True)
    except (ImportError, AttributeError):  # (a torch whose private layout moved: its own guess stands)
        pass


def register_sharding_rules() -> None:
    """Gives DTensor every op's sharding rule (once)."""
    global _sharding_registered
    if _sharding_registered:
        return
    _sharding_registered = True
    try:
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # (a torch built without distributed: no DTensor reaches the ops)
        return
    for op, rule in _SHARDING_RULES:
        register_sharding(op)(rule)
        _key_on_every_argument(op)


class _RulesAfterDTensorImport:
    """A meta path finder that gives DTensor the ops' rules as soon as torch.distributed.tensor is
    imported (a DTensor cannot exist before), so that a compiled first call finds them too. Once."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch.distributed.tensor":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = getattr(getattr(spec, "loader", None), "exec_module", None)
        if run is not None:
            def exec_module(module):
                run(module)
                register_sharding_rules()
            spec.loader.exec_module = exec_module
        return spec


def register_sharding_rules_when_loaded() -> None:
    """The rules to DTensor now if it is loaded, else as it is imported (importing it costs ~0.4 s)."""
    if "torch.distributed.tensor" in sys.modules:
        register_sharding_rules()
    elif not any(isinstance(f, _RulesAfterDTensorImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RulesAfterDTensorImport())


def shard_placements():
    """(Shard, Replicate, Partial) of torch.distributed.tensor, imported when a rule runs."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    return Shard, Replicate, Partial


def sharded_evenly(spec, dim: int) -> bool:
    """Whether spec's dim splits evenly over every mesh dim (heads: a GQA group must not straddle ranks)."""
    return all(spec.shape[dim] % n == 0 for n in spec.mesh.shape)


def rows_rule(n_row_tensors: int, n_outputs: int, ndim: int, extra_inputs: int = 0, last: bool = False):
    """The placements of an op whose n_row_tensors leading tensor arguments share one shape (ndim
    dims) and whose n_outputs outputs follow it: every output and those inputs Replicate, or all
    Shard(d) for each d < ndim - 1 (all d with last), extra_inputs non-tensor arguments after them."""
    Shard, Replicate, _ = shard_placements()
    rules = [([Replicate()] * n_outputs, [Replicate()] * n_row_tensors + [None] * extra_inputs)]
    for d in range(ndim if last else ndim - 1):
        rules.append(([Shard(d)] * n_outputs, [Shard(d)] * n_row_tensors + [None] * extra_inputs))
    return rules


def _replicated(args) -> tuple:
    """args with each plain tensor a DTensor replicated over the first DTensor's mesh: DTensor refuses
    a mix, and what the ops take beside their sharded tensors (angles, ALiBi slopes, cu_seqlens,
    targets; the zeros autograd makes, at the global shape, for an output given no gradient) is
    whole on every rank."""
    from torch.distributed.tensor import DTensor, Replicate
    mesh = next(a.device_mesh for a in args if is_dtensor(a))
    return tuple(DTensor.from_local(a.to(mesh.device_type), mesh, [Replicate()] * mesh.ndim, run_check=False)
                 if isinstance(a, Tensor) and not is_dtensor(a) else a for a in args)


def row_loss_sharding(op, backward_op, n_outputs: int, n_scalars: int) -> None:
    """The sharding rules of a per-row loss on logits (..., V) and its backward: (logits, other
    logits or targets, n_scalars non-tensor arguments) -> n_outputs flat (rows,) tensors, and
    (grad_rows, the same) -> the logits' gradient. Rows on the first dim only (a first-dim shard is a
    contiguous share of the flat rows); a vocabulary-sharded tensor is gathered by DTensor first."""
    sharding_rule(op)(lambda logits, *args: rows_rule(2, n_outputs, min(logits.ndim, 2), extra_inputs=n_scalars))
    sharding_rule(backward_op)(lambda grad_rows, logits, *args: rows_rule(3, 1, min(logits.ndim, 2),
                                                                           extra_inputs=n_scalars))


def call(body, op, function, *args):
    """op(*args), or what it would run without its dispatch: body(*args) when no tensor argument
    needs grad, function.apply(*args) (function: None where the op has no autograd) when one does."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not torch.compiler.is_compiling():
        refuse_forward_mode_ad(tensors, _op_name(op))
        if torch_func_active() and not _mutates(op):
            return functorch_function(body, op, function).apply(*args)
    if not _direct(tensors):
        if not torch.compiler.is_compiling() and any(is_dtensor(t) for t in tensors):  # (dynamo: no str methods)
            register_sharding_rules()
            args = _replicated(args)
        return op(*args)
    if _needs_grad(tensors):
        return op(*args) if function is None else function.apply(*args)
    return body(*args)
