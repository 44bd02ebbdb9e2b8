"""Mixed-precision optimizer step: fused AdamW with fp32 master weights, loss scaling, inf/nan check,
global-norm clipping, and ZeRO-1 sharding of its state.

Typical fp16 loop (bf16 needs no scaler: pass ``max_grad_norm`` and an inf/nan grad still skips the
step)::

    opt = AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)      # fp16/bf16 params: fp32 masters
    scaler = DynamicLossScaler()
    for batch in data:
        scaler.scale(model(batch)).backward()
        opt.step(grad_scaler=scaler, max_grad_norm=1.0)   # unscale + inf check + clip + update
        scaler.update()                                   # backs off if opt found an inf/nan
        opt.zero_grad()

Kernels: pyllm/ops/adamw.py (launchers), csrc/cpu/adamw.cpp, csrc/cuda/adamw.cu.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from pyllm.ops import _util
from pyllm.ops import adamw as _ops

_STATE_KEYS_FP32 = ("exp_avg", "exp_avg_sq", "master")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _number(value) -> float | None:
    """value as a float when it is a real number (numpy's too; a one-element tensor), else None (a
    string such as "0.1" included: float() would take it, torch's comparisons do not)."""
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _check_hyper(where: str, lr, betas, eps, weight_decay) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        number = _number(value)
        if number is None or not 0.0 <= number < math.inf:  # (an inf lr or decay makes every weight -inf)
            raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        number = _number(b)
        if number is None or not 0.0 <= number < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be a number in [0, 1), got {b!r}")


def _check_param(p: Tensor) -> None:
    """A param the fused step takes: on cpu or cuda (with its kernels built), float32 / bfloat16 /
    float16, contiguous (the kernels walk param, grad and state as flat arrays). At construction
    (params that require grad) and again at each step (a param may change in between)."""
    if _util.is_dtensor(p):  # (no data pointer of its own: the step would read none)
        raise TypeError("AdamW: got a DTensor param (FSDP2's fully_shard, or tensor parallelism): pyllm's fused step "
                        "takes plain tensors; use torch.optim.AdamW for sharded params (pyllm train does), or "
                        "pyllm.optim.ZeroAdamW with DDP-style replicated params")
    if p.device.type not in _ops.DTYPES:
        raise ValueError(f"AdamW: params must be on cpu or cuda (the fused step's kernels), got one on {p.device}")
    _util.check_backend("AdamW", p)
    if p.dtype not in _ops.DTYPES[p.device.type]:
        raise TypeError(f"AdamW: params must be float32, bfloat16 or float16, got a {p.dtype} param")
    if not p.is_contiguous():
        raise ValueError(f"AdamW: params must be contiguous, got one of shape {tuple(p.shape)} with strides "
                         f"{p.stride()} (channels_last or a transposed view: give the optimizer contiguous params, "
                         "or use torch.optim.AdamW for these)")


def _loaded_step(value, where: str) -> Tensor:
    """A saved step (an int, a float, a tensor) as a float32 scalar tensor, checked: one number >= 0,
    finite (the bias corrections of a negative step are NaN)."""
    step = torch.as_tensor(value, dtype=torch.float32)
    if step.numel() != 1 or not (0 <= float(step) < math.inf):
        raise ValueError(f"{where}: a param's step must be one number >= 0 and finite, got {value!r}")
    return step.reshape(())


def _check_state(gi: int, p: Tensor, state: dict, master: bool) -> None:
    """The state the fused step walks p.numel() elements of: fp32, contiguous, p's size and device.
    A state_dict of another model (or a param resized since its first step) would have it read and
    write past the end of smaller buffers."""
    for key in ("exp_avg", "exp_avg_sq", *(("master",) if master else ())):
        t = state[key]
        if not (isinstance(t, Tensor) and t.dtype == torch.float32 and t.numel() == p.numel()
                and t.device == p.device and t.is_contiguous()):
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"AdamW: param group {gi} has a param of shape {tuple(p.shape)} whose state {key!r} is "
                             f"{got}; it must be float32 with {p.numel()} elements on {p.device} (a state_dict of "
                             "another model, or a param resized after its first step?)")
    step = state["step"]
    if not (isinstance(step, Tensor) and step.numel() == 1 and step.dtype == torch.float32 and step.device == p.device):
        raise ValueError(f"AdamW: param group {gi}: a param's step must be one float32 on {p.device}, got {step!r}")


def _check_torch_options(where: str, **options) -> None:
    """torch.optim.AdamW's options that change the update and that the fused step does not have
    (a group loaded from torch's state_dict can carry them too): refused, not silently ignored."""
    for name, value in options.items():
        if value:
            raise NotImplementedError(f"{where}: {name}=True is not supported by pyllm's fused AdamW step "
                                      f"(use torch.optim.AdamW for it)")


def _readopt_changed_params(params: list[Tensor], masters: list[Tensor], stochastic: list[bool]) -> None:
    """The 16-bit param is the weight; its fp32 master only carries the bits below the param's
    precision, while the param still is a rounding of it (the nearest; with stochastic rounding
    either neighbour). Elements changed since (a checkpoint loaded into the model, a clamp, an init,
    a broadcast) are taken from the param again, so that the next step starts from what the model
    holds, as torch.optim.AdamW's would; the other elements keep their masters' bits. (Round to
    nearest had also let the other neighbour pass as unchanged: a write landing there, ~1 element in
    300 of a broadcast's, was stepped from the stale master.)"""
    for p, master, either in zip(params, masters, stochastic):
        p = p.detach()
        nearest = master.to(p.dtype)
        changed = p != nearest
        if either:
            toward = torch.where(nearest.float() > master, -math.inf, math.inf).to(p.dtype)
            changed &= p != torch.nextafter(nearest, toward)  # the neighbour on master's other side
        master.copy_(torch.where(changed, p.float(), master))  # (no any(): a host sync on CUDA)


def _found_inf(sumsq: Tensor, scale: Tensor | None) -> Tensor:
    """1.0 where a step must be skipped, else 0.0 (fp32, on sumsq's device, no host sync): an inf / nan
    grad (sumsq not finite), or, with a loss scale, 1 / scale or the unscaled norm past fp32 (a scale
    backed off to 1e-39 had unscaled finite grads to inf, every param NaN). The kernels decide alike
    (csrc/common/adamw_args.h: step_goes_ahead)."""
    bad = ~torch.isfinite(sumsq)
    if scale is not None:
        inv = 1.0 / scale.double()
        bad = bad | ~torch.isfinite(inv.float()) | ~torch.isfinite((sumsq.sqrt() * inv).float())
    return bad.to(torch.float32)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) in one fused multi-tensor pass, with
    fp32 master weights for 16-bit params, loss-scale unscaling, inf/nan skipping and global-norm
    clipping folded into the same pass.

    Args:
        params: tensors or param-group dicts, as for any torch optimizer. float32, bfloat16 and
            float16 params, CPU or CUDA; every param of one group on one device.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (lr >= 0, eps >= 0, betas in [0, 1)).
        master_weights: for bf16/fp16 params, keep an fp32 master copy in the optimizer state and
            write the rounded 16-bit copy into the param each step. None (default) means on for
            16-bit params; False updates 16-bit params directly in fp32 registers (llm.c's mode: pair
            it with stochastic_rounding). fp32 params are always their own master. The param stays
            the weight, as with torch.optim.AdamW: where it was changed in place since the last step
            (``model.load_state_dict``, ``nn.init``, a clamp under ``torch.no_grad()``), the next
            step takes those elements from it rather than from the master. The step notices a
            change by the param's version counter, which writes through ``p.data`` and collectives
            (``dist.broadcast`` / ``all_reduce`` on the param, torch's PeriodicModelAverager,
            ``vector_to_parameters``) do not move: make them on ``p`` itself under
            ``torch.no_grad()``, or call ``params_changed()`` after them.
        amsgrad, maximize, differentiable: torch.optim.AdamW's; only False (NotImplementedError
            otherwise, also for a param group loaded from torch's state_dict with them set).
        foreach, fused, capturable: torch's choice of implementation; accepted and ignored (this
            step is always one fused multi-tensor pass, and never syncs with the host).
        stochastic_rounding: round the bf16 param copy stochastically (unbiased on average) instead
            of to nearest. The random bits are a pure function of (group["seed"], step, tensor,
            element): reproducible. The seed is torch.initial_seed() at construction (so
            torch.manual_seed fixes it), saved in the state_dict, settable as group["seed"]. bf16 only:
            a float16 param with stochastic rounding raises ValueError.

    State per param: ``step`` (fp32 scalar on the param's device), ``exp_avg``, ``exp_avg_sq``
    (fp32) and, with master weights, ``master`` (fp32); all saved by state_dict.

    After each step(), ``last_grad_norm`` is the global L2 norm of the unscaled grads before
    clipping (a 0-dim float64 tensor on the params' device, inf/nan when a grad was; None when the
    step did not compute it) and ``last_step_skipped`` a 0-dim bool tensor (None likewise). Reading
    them with .item() is the only host sync of a CUDA step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=None, stochastic_rounding=False):
        _check_hyper("AdamW", lr, betas, eps, weight_decay)
        # torch.optim.AdamW's signature, so that code written for it runs: foreach and fused choose
        # torch's implementation (pyllm's is always one fused multi-tensor pass) and capturable
        # torch's CUDA-graph mode (pyllm's step never syncs): accepted, nothing to do. What would
        # change the update is refused rather than ignored.
        _check_torch_options("AdamW", amsgrad=amsgrad, maximize=maximize, differentiable=differentiable)
        if master_weights not in (None, True, False):
            raise ValueError(f"AdamW: master_weights must be None, True or False, got {master_weights!r}")
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"AdamW: stochastic_rounding must be a bool, got {type(stochastic_rounding).__name__}")
        seed = torch.initial_seed()  # fixed by torch.manual_seed, and draws nothing from the generator
        # torch's group keys too (code reads group["amsgrad"] or defaults["fused"]; a state_dict loaded
        # into torch.optim.AdamW keeps them), with the values given
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=True, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        super().__init__(params, defaults)
        self.last_grad_norm: Tensor | None = None
        self.last_step_skipped: Tensor | None = None
        # ZeroAdamW sets this to sum the sum of squares over its ranks before anything uses it.
        self._reduce_sumsq: Callable[[Tensor], None] | None = None
        # id(param) -> its version counter right after a step wrote it (16-bit params with masters): a
        # different one at the next step means the param was changed in place since. (By id: a tensor
        # key hashes through a Python-level __hash__; the optimizer holds its params, so ids stay theirs.)
        self._written: dict[int, int] = {}

    def add_param_group(self, param_group: dict) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):  # (torch refuses a set itself)
            # Listed here, so that a param listed twice is refused before torch's warning of the same
            # ("in future, this will cause an error"), which had come first, then our error.
            param_group = {**param_group, "params": list(params)}
            self._check_no_repeats(param_group["params"])
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except BaseException:
            self.param_groups.pop()  # a refused group is not left behind for every later step to trip on
            raise

    @staticmethod
    def _check_no_repeats(params: list) -> None:
        if len({id(p) for p in params}) != len(params):
            # torch warns and steps such a param twice; the fused step would take its state once and
            # its update twice over: another trajectory, silently
            raise ValueError("AdamW: a param group lists a param more than once")

    @staticmethod
    def _check_group(group: dict) -> None:
        AdamW._check_no_repeats(group["params"])
        _check_hyper("AdamW param group", group["lr"], group["betas"], group["eps"], group["weight_decay"])
        # Frozen params are never stepped (as torch's: an int64 buffer-like Parameter, a float64
        # constant): not refused here; one that gets a grad later is checked at that step.
        trained = [p for p in group["params"] if p.requires_grad]
        devices = {p.device for p in trained}
        if len(devices) > 1:
            raise ValueError(f"AdamW: every param of a group must be on one device, got params on "
                             f"{', '.join(sorted(map(str, devices)))}")
        for p in trained:
            _check_param(p)

    # --- state -------------------------------------------------------------------------------

    @staticmethod
    def _uses_master(group: dict, p: Tensor) -> bool:
        return p.dtype in _LOW_PRECISION and group["master_weights"] is not False

    def _init_state(self, group: dict, p: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if self._uses_master(group, p) and "master" not in state:
            state["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return state

    def __setstate__(self, state: dict) -> None:
        # A state_dict from torch.optim.AdamW (or an older pyllm) lacks our group keys: take defaults.
        super().__setstate__(state)
        # pickle and deepcopy carry torch's three keys alone (Optimizer.__getstate__): the rest anew
        for name, value in (("_written", {}), ("_reduce_sumsq", None), ("last_grad_norm", None),
                            ("last_step_skipped", None)):
            self.__dict__.setdefault(name, value)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's (its load_state_dict hooks included), but keeps the fp32 state fp32 (torch casts
        floating state to the param dtype, which would turn bf16 params' masters and moments into
        bf16) and copies every tensor, so the loaded optimizer never shares state with the dict it
        came from; a step saved as a number becomes a float32 tensor."""
        if isinstance(state_dict, dict) and set(state_dict) == {"muon", "adamw"}:
            raise ValueError("AdamW.load_state_dict: this state is MuonAdamW's (--optimizer muon): resume with that "
                             "optimizer")
        # The dict as the pre hooks leave it: its steps checked before anything loads, then read again
        # in fp32 before any post hook runs (torch's casts are not overridable: it calls Optimizer's
        # own policy by name).
        loaded = {}

        def keep(_, d):  # after the user's pre hooks
            for saved in d["state"].values():
                if "step" in saved:
                    _loaded_step(saved["step"], "AdamW.load_state_dict")
            loaded.update(dict=d)

        keep = self.register_load_state_dict_pre_hook(keep)
        fix = self.register_load_state_dict_post_hook(lambda _: self._fp32_state(loaded["dict"]), prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            keep.remove()
            fix.remove()

    def _fp32_state(self, state_dict: dict) -> None:
        self._written.clear()  # the loaded masters are checked against the params at the next step
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_state:
                continue
            saved, state = saved_state[saved_id], self.state[p]
            for key in _STATE_KEYS_FP32:
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
            if "step" in saved:
                state["step"] = _loaded_step(saved["step"], "AdamW.load_state_dict").to(p.device, copy=True)

    def params_changed(self) -> None:
        """Says that the params were written where their version counters do not see it (a collective
        on the param: dist.broadcast from rank 0, an all_reduce average, local SGD's / DiLoCo's outer
        step; ``p.data = ...``; vector_to_parameters): the next step compares every 16-bit param with
        its master and takes the changed elements from the param, as after an in-place write.
        Without it such a write is undone by the next step (each rank's stale master written back:
        ranks re-synced by a broadcast drift apart again). fp32 params need none (their own master)."""
        self._written.clear()

    # --- the step ------------------------------------------------------------------------------

    def _collect(self) -> list[dict]:
        """Validates the params with grads and buckets them by (group, dtype, master)."""
        buckets, changed = [], []
        for gi, group in enumerate(self.param_groups):
            _check_hyper(f"AdamW param group {gi}", group["lr"], group["betas"], group["eps"], group["weight_decay"])
            _check_torch_options(f"AdamW param group {gi}", amsgrad=group.get("amsgrad"),
                                 maximize=group.get("maximize"), differentiable=group.get("differentiable"))
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            by_kind: dict[tuple, dict] = {}
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients; use torch.optim.SparseAdam")
                if p.device != device:
                    raise ValueError(f"AdamW: every param of a group must be on one device, group {gi} has "
                                     f"params on {device} and on {p.device}")
                _check_param(p)
                if p.grad.dtype != p.dtype or p.grad.shape != p.shape:
                    raise TypeError(f"AdamW: a grad must match its param, got grad {p.grad.dtype} "
                                    f"{tuple(p.grad.shape)} for param {p.dtype} {tuple(p.shape)}")
                if group["stochastic_rounding"] and p.dtype == torch.float16:
                    raise ValueError("AdamW: stochastic_rounding is for bfloat16 params; group "
                                     f"{gi} has a float16 param (use round-to-nearest for float16)")
                master = self._uses_master(group, p)
                bucket = by_kind.setdefault((p.dtype, master), dict(
                    group=group, device=device, has_master=master, params=[], grads=[], masters=[],
                    exp_avgs=[], exp_avg_sqs=[], steps=[]))
                had_master = "master" in self.state[p]
                state = self._init_state(group, p)
                _check_state(gi, p, state, master)
                if master and had_master and self._written.get(id(p)) != p._version:
                    changed.append((p, state["master"], bool(group["stochastic_rounding"])))
                bucket["params"].append(p)
                bucket["grads"].append(p.grad.contiguous())
                bucket["masters"].append(state["master"] if master else None)
                bucket["exp_avgs"].append(state["exp_avg"])
                bucket["exp_avg_sqs"].append(state["exp_avg_sq"])
                bucket["steps"].append(state["step"])
            buckets.extend(by_kind.values())
        if changed:
            _readopt_changed_params(*zip(*changed))
        for b in buckets:
            b["table"] = _ops.build_table(b["params"], b["grads"], b["masters"], b["exp_avgs"],
                                          b["exp_avg_sqs"], b["steps"])
        return buckets

    def _global_sumsq(self, buckets: list[dict]) -> dict:
        """Sum of squares of all grads, one float64 scalar per device (the same value on each)."""
        per_device: dict[torch.device, Tensor] = {}
        for b in buckets:
            sumsq = per_device.setdefault(b["device"], torch.zeros((), dtype=torch.float64, device=b["device"]))
            _ops.grad_sumsq_(b["grads"], b["table"], sumsq)
        devices = list(per_device)
        if len(devices) > 1:
            total = sum(per_device[d].to(devices[0]) for d in devices)
            per_device = {d: total.to(d) for d in devices}
        if self._reduce_sumsq is not None:
            for d in devices:
                self._reduce_sumsq(per_device[d])
        return per_device

    # Eager even inside a compiled function: the kernels are opaque to the compiler anyway (a graph
    # break each), and traced, the re-adoption of changed 16-bit params lost its dtype round trip to
    # inductor (emulate_precision_casts off) and took every master bit back from the param.
    # torch._disable_dynamo (torch.optim's own) imports torch._dynamo at the first step, where
    # torch.compiler.disable imported it with pyllm: 0.85 s more for every `import pyllm`.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None, grad_scaler: "DynamicLossScaler | None" = None,
             max_grad_norm: float | None = None):
        """One AdamW step over every param that has a grad.

        Args:
            closure: re-evaluates the model and returns the loss (torch's convention); optional.
            grad_scaler: a :class:`DynamicLossScaler` whose scale the grads carry: they are divided
                by it inside the fused pass (never rewritten), and the step's found-inf flag is
                recorded for the scaler's next ``update()``.
            max_grad_norm: clip the global L2 norm of the unscaled grads (over every param of every
                group) to this, as torch.nn.utils.clip_grad_norm_. ``math.inf`` computes the norm
                and the inf/nan check without clipping.
        When grad_scaler or max_grad_norm is given, an inf/nan in any grad skips the step for every
        param: params, masters, moments and step counts stay bitwise unchanged. Without either, no
        norm pass runs (as torch.optim.AdamW, a NaN grad then reaches the params).
        Returns the closure's loss (or None). The norm and the skip flag are in ``last_grad_norm``
        and ``last_step_skipped``.
        """
        if grad_scaler is not None and not isinstance(grad_scaler, DynamicLossScaler):
            raise TypeError(f"AdamW.step: grad_scaler must be a pyllm.optim.DynamicLossScaler, "
                            f"got {type(grad_scaler).__name__}")
        if max_grad_norm is not None and not float(max_grad_norm) >= 0.0:
            raise ValueError(f"AdamW.step: max_grad_norm must be >= 0 (or None), got {max_grad_norm!r}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._collect()
        self.last_grad_norm = self.last_step_skipped = None
        if not buckets:
            return loss
        if grad_scaler is not None:
            grad_scaler._begin_step(self)

        need_norm = grad_scaler is not None or max_grad_norm is not None or self._reduce_sumsq is not None
        sumsq = self._global_sumsq(buckets) if need_norm else {}
        scales = {d: grad_scaler._scale_on(d) for d in sumsq} if grad_scaler is not None else {}
        found_inf = {d: _found_inf(s, scales.get(d)) for d, s in sumsq.items()}

        # The step counts move first (by 0 on a skipped step) so the kernel reads this step's t.
        steps_by_device: dict[torch.device, list[Tensor]] = {}
        for b in buckets:
            steps_by_device.setdefault(b["device"], []).extend(b["steps"])
        for d, steps in steps_by_device.items():
            torch._foreach_add_(steps, 1.0 - found_inf[d] if need_norm else 1.0)

        for b in buckets:
            g, d = b["group"], b["device"]
            _ops.step_(b["params"], b["table"], has_master=b["has_master"], lr=g["lr"], beta1=g["betas"][0],
                       beta2=g["betas"][1], eps=g["eps"], weight_decay=g["weight_decay"],
                       sumsq=sumsq.get(d), loss_scale=scales.get(d),
                       max_grad_norm=max_grad_norm if max_grad_norm is not None and max_grad_norm != math.inf else None,
                       stochastic_rounding=g["stochastic_rounding"] and b["params"][0].dtype == torch.bfloat16,
                       seed=g["seed"])
            # The kernel writes through the pointer: the version counters move here, so that autograd
            # refuses a backward through a graph that saved the old weights (as torch's in-place step
            # makes it: stepping D before G's backward), and the next step knows its own writes.
            for p in b["params"]:  # (one at a time: torch 2.4's increment_version takes a single tensor)
                torch.autograd.graph.increment_version(p)
            if b["has_master"]:
                self._written.update((id(p), p._version) for p in b["params"])

        if need_norm:
            d0 = buckets[0]["device"]
            norm = sumsq[d0].sqrt()
            if grad_scaler is not None:
                norm = norm / scales[d0].double()
            self.last_grad_norm = norm
            self.last_step_skipped = found_inf[d0].bool()
            if grad_scaler is not None:
                grad_scaler._record_found_inf(found_inf[d0])
        return loss


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 training, with torch.amp.GradScaler's growth/backoff rule:
    a step with an inf/nan grad multiplies the scale by backoff_factor; growth_interval steps in a
    row without one multiply it by growth_factor.

    Use: ``scaler.scale(loss).backward()``; ``opt.step(grad_scaler=scaler, ...)`` (pyllm.optim.AdamW
    unscales inside its fused step and records whether it found an inf/nan); ``scaler.update()``.
    ``update(found_inf)`` takes the flag directly (a bool or a tensor, > 0 meaning found) for other
    optimizers; unlike torch.amp.GradScaler.update(new_scale) it never sets the scale (a number
    other than 0 or 1 is refused; a tensor is read as the flag).
    bf16 needs no loss scaling; ``DynamicLossScaler(init_scale=1.0, growth_factor=1.0)`` keeps the
    scale at 1 if a loop wants one code path. The scale lives in a float32 tensor on the device of
    the first loss (or optimizer) that uses it: no host sync except get_scale() and state_dict().
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self._check("DynamicLossScaler", init_scale, growth_factor, backoff_factor, growth_interval)
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._scale: Tensor | None = None
        self._growth_tracker: Tensor | None = None
        self._found_inf: Tensor | None = None
        self._stepped: set[int] = set()  # ids of the optimizers stepped since the last update()

    def _begin_step(self, optimizer) -> None:
        # torch's GradScaler refuses this too: a second step on the same scaled grads before update()
        # would apply them twice, and the backoff would come one step late.
        if optimizer is None:
            return
        if id(optimizer) in self._stepped:
            raise RuntimeError(f"{type(optimizer).__name__}.step(grad_scaler=...) was already called since the "
                               "scaler's last update(); call scaler.update() after each step (as torch.amp.GradScaler)")
        self._stepped.add(id(optimizer))

    def _scale_on(self, device) -> Tensor:
        """The scale tensor, created on (or moved for good to) `device`."""
        device = torch.device(device)
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
            self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        elif self._scale.device != device:
            self._scale, self._growth_tracker = self._scale.to(device), self._growth_tracker.to(device)
        return self._scale

    def _record_found_inf(self, found_inf: Tensor) -> None:
        found_inf = found_inf.to(torch.float32).reshape(())
        self._found_inf = found_inf if self._found_inf is None else torch.maximum(
            self._found_inf, found_inf.to(self._found_inf.device))

    def scale(self, loss: Tensor) -> Tensor:
        """loss * scale, a new tensor: backward through it gives scaled grads. A 16-bit loss is
        scaled in fp32 (an fp16 loss of 10 times 2^16 would overflow fp16 in the forward), though
        the gradient flowing back into an fp16 loss is the scale itself, past fp16's 65504 at 2^16:
        that step is skipped and the scale backed off, as torch.amp.GradScaler's (keep the loss in
        fp32, as autocast's cross-entropy does, to avoid it); the grads come out in the params' dtype."""
        if not isinstance(loss, Tensor):
            raise TypeError(f"DynamicLossScaler.scale: expected a tensor, got {type(loss).__name__}")
        if loss.dtype in _LOW_PRECISION:
            loss = loss.float()
        return loss * self._scale_on(loss.device)

    def get_scale(self) -> float:
        return self._init_scale if self._scale is None else float(self._scale)

    def update(self, found_inf=None) -> None:
        """Grows or backs off the scale. found_inf: a bool or tensor; None takes the flag the
        optimizer recorded in its last step(grad_scaler=self)."""
        if found_inf is None:
            if self._found_inf is None:
                raise RuntimeError("DynamicLossScaler.update: no inf/nan check was recorded since the last "
                                   "update; call optimizer.step(grad_scaler=scaler) first or pass found_inf")
            found_inf = self._found_inf
        elif not isinstance(found_inf, (bool, Tensor)) and found_inf not in (0, 1):
            # torch.amp.GradScaler.update(new_scale) sets the scale; here the argument is the found-inf
            # flag, and update(1024.0) had silently backed the scale off instead
            raise TypeError(f"DynamicLossScaler.update: found_inf must be a bool or a tensor, got {found_inf!r} "
                            "(torch.amp.GradScaler.update(new_scale) sets the scale; here use "
                            "load_state_dict or a new DynamicLossScaler(init_scale=...) for that)")
        scale = self._scale if self._scale is not None else self._scale_on(
            found_inf.device if isinstance(found_inf, Tensor) else "cpu")
        found = torch.as_tensor(found_inf, dtype=torch.float32).to(scale.device).reshape(())
        torch._amp_update_scale_(scale, self._growth_tracker, found, self._growth_factor,
                                 self._backoff_factor, self._growth_interval)
        self._found_inf = None
        self._stepped.clear()

    @staticmethod
    def _check(where: str, init_scale, growth_factor, backoff_factor, growth_interval) -> None:
        # (the scale lives in fp32: 1e-50 was 0 there, 1e300 inf)
        if not (math.isfinite(init_scale) and 0 < float(torch.tensor(init_scale, dtype=torch.float32)) < math.inf):
            raise ValueError(f"{where}: init_scale must be a number > 0 that fp32 holds (about 1.4e-45 to 3.4e38), "
                             f"got {init_scale!r}")
        if not growth_factor >= 1.0:
            raise ValueError(f"{where}: growth_factor must be >= 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor <= 1.0:
            raise ValueError(f"{where}: backoff_factor must be in (0, 1], got {backoff_factor!r}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"{where}: growth_interval must be an int >= 1, got {growth_interval!r}")

    def state_dict(self) -> dict:
        """The same keys as torch.amp.GradScaler's."""
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": 0 if self._growth_tracker is None else int(self._growth_tracker)}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} - set(state_dict)
        if missing:
            raise ValueError(f"DynamicLossScaler.load_state_dict: missing keys {sorted(missing)}")
        self._check("DynamicLossScaler.load_state_dict", float(state_dict["scale"]), float(state_dict["growth_factor"]),
                    float(state_dict["backoff_factor"]), state_dict["growth_interval"])
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        device = self._scale.device if self._scale is not None else "cpu"
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.full((), int(state_dict["_growth_tracker"]), dtype=torch.int32, device=device)
        self._found_inf = None
        self._stepped.clear()


class ZeroAdamW(torch.optim.Optimizer):
    """ZeRO stage 1: :class:`AdamW` with its state (fp32 master weights, m, v) partitioned over the
    ranks of a torch.distributed process group.

    The params of each param group (every group: one dtype, one device) are laid out as one flat
    vector padded to a multiple of the world size; rank r owns the r-th contiguous shard of each
    group's vector, and only its master, m and v. Param groups may differ in lr, betas, eps and
    weight_decay (e.g. no decay on norms and biases), as for AdamW.
    step():
      1. flattens each group's grads and averages them over the ranks (as DDP does), keeping this
         rank's shard: reduce_scatter_tensor on NCCL; on gloo, which has no reduce-scatter, an
         all_reduce of the whole flat grad and a slice (twice the traffic; fine for the CPU tests
         it serves);
      2. runs the fused AdamW step on the shards; the grads' sum of squares is all-reduced inside
         it, so unscaling, the inf/nan skip and clipping use the global norm over every group, as
         the unsharded step;
      3. all-gathers the updated shards and copies them into the params.
    Every rank must hold the same params and call step() together. Every param needs a grad (a
    missing one raises ValueError). Hyperparameters and the learning rate are read from
    ``param_groups`` at each step, so LR schedulers work. ``last_grad_norm`` and
    ``last_step_skipped`` are as in AdamW.

    Checkpoints, two ways: state_dict() holds this rank's shard only (load it on the same rank of a
    group of the same size); full_state_dict() gathers the unsharded state in AdamW.state_dict()'s
    format (collective; to every rank, or with to_rank0=True to the first one only), which load_full_state_dict() slices again on any number of ranks, and which
    a plain AdamW over the same param groups loads as well. Load the params' weights before the
    optimizer state: the shard of the params is re-read from them.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=None, stochastic_rounding=False, process_group=None):
        # torch.optim.AdamW's signature, as AdamW's (the 6th positional had been master_weights, where
        # torch's is amsgrad: ZeroAdamW(p, lr, betas, eps, wd, True) had meant master weights)
        _check_torch_options("ZeroAdamW", amsgrad=amsgrad, maximize=maximize, differentiable=differentiable)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroAdamW: torch.distributed is not initialised (call init_process_group first)")
        _check_hyper("ZeroAdamW", lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        all_params = [p for g in self.param_groups for p in g["params"]]
        if not all_params:
            raise ValueError("ZeroAdamW: got no params")
        first = all_params[0]
        for gi, group in enumerate(self.param_groups):
            if not group["params"]:
                raise ValueError(f"ZeroAdamW: param group {gi} has no params")
        for p in all_params:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"ZeroAdamW: all params must share one dtype and device, got {first.dtype} on "
                                 f"{first.device} and {p.dtype} on {p.device}")
            if not p.is_contiguous():
                raise ValueError("ZeroAdamW: params must be contiguous")
        self._group = process_group
        self._rank, self._world = dist.get_rank(process_group), dist.get_world_size(process_group)
        self._gloo = dist.get_backend(process_group) == "gloo"
        self._params = [list(g["params"]) for g in self.param_groups]  # per group
        self._numels = [sum(p.numel() for p in ps) for ps in self._params]
        self._shard_sizes = [-(-n // self._world) for n in self._numels]
        self._shards = [torch.nn.Parameter(self._my_slice(gi, self._flatten(gi, [p.detach() for p in ps])).clone())
                        for gi, ps in enumerate(self._params)]
        self._inner = AdamW([{"params": [shard], "lr": g["lr"], "betas": g["betas"], "eps": g["eps"],
                              "weight_decay": g["weight_decay"]} for shard, g in zip(self._shards, self.param_groups)],
                            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        self._inner._reduce_sumsq = lambda sumsq: dist.all_reduce(sumsq, group=self._group)
        # the params' version counters when the shards were last taken from them or written into them
        self._written = self._versions()
        self.last_grad_norm: Tensor | None = None
        self.last_step_skipped: Tensor | None = None

    def __getstate__(self):
        raise TypeError("ZeroAdamW cannot be pickled or copied: it holds this rank's shards of a process group's "
                        "params; save its state_dict() (or the run's checkpoint) instead")

    def _versions(self) -> list[int]:
        """The params' version counters: a change means they were written in place."""
        return [p._version for ps in self._params for p in ps]

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_inner"):
            raise RuntimeError("ZeroAdamW: param groups are fixed at construction (the shards are laid out then)")
        super().add_param_group(param_group)

    def _flatten(self, gi: int, tensors: list[Tensor]) -> Tensor:
        """One flat vector of group gi's tensors, zero-padded to world_size * shard_size."""
        pad = self._world * self._shard_sizes[gi] - self._numels[gi]
        parts = [t.reshape(-1) for t in tensors]
        if pad:
            parts.append(tensors[0].new_zeros(pad))
        return torch.cat(parts)

    def _my_slice(self, gi: int, flat: Tensor) -> Tensor:
        lo = self._rank * self._shard_sizes[gi]
        return flat[lo:lo + self._shard_sizes[gi]]

    def _all_gather(self, gi: int, shard: Tensor, out: Tensor | None = None) -> Tensor:
        """The world_size shards of group gi, concatenated (into out when given)."""
        if out is None:
            out = shard.new_empty(self._world * self._shard_sizes[gi])
        if self._gloo:  # gloo's all_gather takes a list
            dist.all_gather(list(out.split(self._shard_sizes[gi])), shard.contiguous(), group=self._group)
        else:
            dist.all_gather_into_tensor(out, shard.contiguous(), group=self._group)
        return out

    def _unflatten_into_params(self, gi: int, flat: Tensor) -> None:
        offset, views = 0, []
        for p in self._params[gi]:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        torch._foreach_copy_(self._params[gi], views)

    @torch.no_grad()
    def _reload_shards_from_params(self) -> None:
        for gi, shard in enumerate(self._shards):
            shard.copy_(self._my_slice(gi, self._flatten(gi, [p.detach() for p in self._params[gi]])))

    @torch.no_grad()
    def step(self, closure=None, grad_scaler: DynamicLossScaler | None = None, max_grad_norm: float | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [p.grad is not None for ps in self._params for p in ps]
        if not any(with_grad):
            return loss
        if not all(with_grad):
            raise ValueError("ZeroAdamW: every param needs a grad (the grads are reduced as one flat vector); "
                             f"{with_grad.count(False)} of {len(with_grad)} have none")
        flat_grads = []
        for gi, (params, shard) in enumerate(zip(self._params, self._shards)):
            flat_grad = self._flatten(gi, [p.grad for p in params])
            flat_grad.div_(self._world)
            if self._gloo:
                dist.all_reduce(flat_grad, group=self._group)
                shard.grad = self._my_slice(gi, flat_grad)
            else:
                shard.grad = flat_grad.new_empty(self._shard_sizes[gi])
                dist.reduce_scatter_tensor(shard.grad, flat_grad, group=self._group)
            flat_grads.append(flat_grad)

        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            for key in ("lr", "betas", "eps", "weight_decay"):
                inner_group[key] = group[key]
        if self._written != self._versions():
            # changed in place since the last step (as AdamW, the params are the weights): the shards
            # re-read, and the inner AdamW re-takes the changed elements from them
            self._reload_shards_from_params()
        self._inner.step(grad_scaler=grad_scaler, max_grad_norm=max_grad_norm)
        self.last_grad_norm, self.last_step_skipped = self._inner.last_grad_norm, self._inner.last_step_skipped

        for gi, (shard, flat) in enumerate(zip(self._shards, flat_grads)):
            shard.grad = None
            # The reduced grads are spent: their buffer receives the gathered params.
            self._unflatten_into_params(gi, self._all_gather(gi, shard.detach(), out=flat))
        self._written = self._versions()
        return loss

    def params_changed(self) -> None:
        """As AdamW.params_changed: the params were written where their version counters do not see
        it; the next step re-reads this rank's shards from them."""
        self._written = {}

    def state_dict(self) -> dict:
        """This rank's shard of the state (see full_state_dict for a world-size independent one)."""
        return {"rank": self._rank, "world_size": self._world, "numel": list(self._numels),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "inner": self._inner.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict() saved by the same rank of a group of the same size, over the same params."""
        mine = (self._rank, self._world, list(self._numels))
        theirs = (state_dict["rank"], state_dict["world_size"], list(state_dict["numel"]))
        if mine != theirs:
            raise ValueError(f"ZeroAdamW.load_state_dict: saved by (rank, world_size, numel per group) = {theirs}, "
                             f"loading into {mine}")
        self._reload_shards_from_params()
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self._inner.load_state_dict(state_dict["inner"])

    def _gather_to_first(self, gi: int, shard: Tensor) -> Tensor | None:
        """The world_size shards of group gi, concatenated on the CPU at the group's first rank
        (None on the others): only that rank ever holds the whole group, on the device or off it."""
        dst = dist.get_global_rank(self._group or dist.group.WORLD, 0)
        parts = [torch.empty_like(shard) for _ in range(self._world)] if self._rank == 0 else None
        dist.gather(shard.contiguous(), parts, dst=dst, group=self._group)
        return None if parts is None else torch.cat([part.cpu() for part in parts])

    @torch.no_grad()
    def full_state_dict(self, to_rank0: bool = False) -> dict:
        """The unsharded state, on the CPU, in the format of AdamW.state_dict() for an AdamW over
        the same param groups: {"state": {param index: {"step", "exp_avg", "exp_avg_sq"[, "master"]}},
        "param_groups": [...]}. Collective: every rank calls it. Every rank gets the whole dict, or
        with to_rank0 only the group's first rank does (the others get {}): a checkpoint writer
        needs it once, and the whole optimizer state on every rank's CPU is 2-3x the model in fp32."""
        if to_rank0:
            gather = lambda gi, shard: self._gather_to_first(gi, shard)  # noqa: E731
        else:
            gather = lambda gi, shard: self._all_gather(gi, shard).cpu()  # noqa: E731
        state, groups, index = {}, [], 0
        for gi, (params, shard, inner_group) in enumerate(zip(self._params, self._shards, self._inner.param_groups)):
            ids = list(range(index, index + len(params)))
            index += len(params)
            groups.append({**{k: v for k, v in inner_group.items() if k != "params"}, "params": ids})
            shard_state = self._inner.state.get(shard, {})
            if "step" not in shard_state:  # no step yet (the same on every rank: they step together)
                continue
            full = {key: gather(gi, shard_state[key]) for key in _STATE_KEYS_FP32 if key in shard_state}
            if to_rank0 and self._rank != 0:
                continue
            offset = 0
            for i, p in zip(ids, params):
                state[i] = {"step": shard_state["step"].detach().cpu().clone(),
                            **{key: flat[offset:offset + p.numel()].view(p.shape).clone() for key, flat in full.items()}}
                offset += p.numel()
        return {} if to_rank0 and self._rank != 0 else {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict) -> None:
        """Loads a full_state_dict() (from any number of ranks) or an AdamW.state_dict() over the
        same param groups: each rank keeps its shard. Not collective."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(ps) for ps in self._params]:
            raise ValueError(f"ZeroAdamW.load_full_state_dict: saved for param groups of "
                             f"{[len(g['params']) for g in saved_groups]} params, loading into groups of "
                             f"{[len(ps) for ps in self._params]}")
        self._reload_shards_from_params()
        new_state = {}
        for gi, (params, shard, saved_group) in enumerate(zip(self._params, self._shards, saved_groups)):
            self.param_groups[gi].update({k: saved_group[k] for k in ("lr", "betas", "eps", "weight_decay")})
            self._inner.param_groups[gi].update({k: v for k, v in saved_group.items() if k != "params"})
            saved = [state_dict["state"].get(i) for i in saved_group["params"]]
            if all(s is None for s in saved):
                continue
            if any(s is None for s in saved):
                raise ValueError(f"ZeroAdamW.load_full_state_dict: param group {gi} has state for some params only")
            for s, p in zip(saved, params):
                if s["exp_avg"].shape != p.shape:
                    raise ValueError(f"ZeroAdamW.load_full_state_dict: state of shape {tuple(s['exp_avg'].shape)} "
                                     f"for a param of shape {tuple(p.shape)}")
            entry = {"step": _loaded_step(saved[0]["step"], "ZeroAdamW.load_full_state_dict").to(shard.device, copy=True)}
            for key in _STATE_KEYS_FP32:
                if key in saved[0]:
                    flat = self._flatten(gi, [s[key].to(shard.device, torch.float32) for s in saved])
                    entry[key] = self._my_slice(gi, flat).clone()
            new_state[shard] = entry
        self._inner.state.clear()
        self._inner.state.update(new_state)


# --- Muon -------------------------------------------------------------------------------------------

# Jordan's quintic Newton-Schulz coefficients: the steepest slope at 0 that still keeps every
# singular value of the result in about [0.7, 1.2] after 5 steps (his muon.py; torch.optim.Muon's).
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U S' V^T, S' ~ 1) by `steps`
    quintic Newton-Schulz iterations, in bf16 (Jordan's Muon, torch.optim.Muon's arithmetic), for
    g (..., rows, cols): each matrix of a stack its own. Returns bf16."""
    a, b, c = _NS_COEFFICIENTS
    shape = g.shape
    if g.numel() == 0:  # (a matrix of no rows or columns: nothing to orthogonalize)
        return g.bfloat16()
    x = g.bfloat16().reshape(-1, *shape[-2:])  # (N, rows, cols): baddbmm, addmm's fused rounding per matrix
    tall = shape[-2] > shape[-1]
    if tall:  # (the Gram matrix of the short side)
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(shape)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025,
    Moonlight) for matrices: Nesterov momentum, each update orthogonalized (newton_schulz) and
    scaled to AdamW's update RMS, lr * 0.2 * sqrt(max(rows, cols)) (Moonlight's; torch.optim.Muon's
    adjust_lr_fn="match_rms_adamw"), so that AdamW's lr and weight decay serve; decoupled weight
    decay. A param may be a stack of matrices (experts, rows, cols), each its own (a MoE's experts:
    a 3-D param is one, not a Conv1d weight, which the reference flattens; 4-D params are refused), and
    a fused one is orthogonalized part by part: a group's "splits", aligned with its "params", each
    the sizes of its parts along the rows (q, k, v of one weight; gate and up) or None. State per
    param: ``momentum_buffer`` (the param's dtype, as torch's). No closure, no sparse grads.
    Not torch.optim.Muon's defaults: weight_decay 0 (torch's 0.1) and the AdamW-matched scale
    (torch's default adjust_lr_fn scales by max(1, rows / cols) ** 0.5: a 1024 x 1024 matrix's
    update is 6.4x larger here at one lr); pass weight_decay=0.1 for torch's decay."""

    # torch.optim.Muon's group keys, with the values this step computes with: its state_dict then steps
    # in torch.optim.Muon, which reads them (a KeyError there before 2026-12-06)
    _TORCH_KEYS = {"ns_coefficients": _NS_COEFFICIENTS, "eps": 1e-7, "adjust_lr_fn": "match_rms_adamw"}

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        if not lr >= 0 or not 0 <= momentum < 1 or not weight_decay >= 0 or ns_steps < 1:
            raise ValueError(f"Muon: lr and weight_decay must be >= 0, momentum in [0, 1) and ns_steps >= 1, got "
                             f"{lr}, {weight_decay}, {momentum} and {ns_steps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, **self._TORCH_KEYS))

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, each param checked (a matrix or a stack of them) with its split (None: whole)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except BaseException:
            self.param_groups.pop()  # a refused group is not left behind for every later step to trip on
            raise

    @staticmethod
    def _check_group(group: dict) -> None:
        splits = group.setdefault("splits", [None] * len(group["params"]))
        if len(splits) != len(group["params"]):
            raise ValueError("Muon: a group's splits must have one entry (sizes or None) per param")
        for p, split in zip(group["params"], splits):
            if p.dim() > 3:  # (each 3x3 kernel of a conv had been orthogonalized alone)
                raise ValueError(f"Muon: a param of shape {tuple(p.shape)}: Muon takes matrices and stacks of them "
                                 "(experts, 3-D); a conv weight is one matrix to Muon's reference (flattened to "
                                 "(out, in * kh * kw)): give it to AdamW, or keep it as a 2-D param")
            if p.dim() < 2 or (split is not None and (sum(split) != p.shape[-2] or not all(
                    isinstance(n, int) and n > 0 for n in split))):
                raise ValueError(f"Muon: params are matrices (or stacks of them) whose splits add up to their rows "
                                 f"(each a positive size); got a param of shape {tuple(p.shape)} split {split}")
        Muon._check_scaling(group)

    @staticmethod
    def _check_scaling(group: dict) -> None:
        adjust = group.get("adjust_lr_fn", "match_rms_adamw")
        if adjust != "match_rms_adamw":  # (torch.optim.Muon's state: its default scales otherwise)
            raise ValueError(f"Muon: a group with torch.optim.Muon's adjust_lr_fn={adjust!r}; pyllm's Muon scales "
                             "updates as adjust_lr_fn='match_rms_adamw' (its lr and weight decay are AdamW's)")

    def __setstate__(self, state: dict) -> None:
        # a state_dict from torch.optim.Muon (or one made without splits): each group checked, whole matrices
        super().__setstate__(state)
        for group in self.param_groups:
            self._check_group(group)

    def load_state_dict(self, state_dict: dict) -> None:
        for group in state_dict.get("param_groups", ()):  # refused before anything is loaded
            self._check_scaling(group)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # (a state saved before they were kept: torch's Muon reads them)
            for key, value in self._TORCH_KEYS.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon: step takes no closure")
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p, split in zip(group["params"], group["splits"]):
                if p.grad is None:
                    continue
                grad = p.grad
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                parts = update.split(list(split), dim=-2) if split is not None else (update,)
                # (scaled in the param's dtype: fp32 params' updates are not rounded to bf16 again)
                update = torch.cat([newton_schulz(u, group["ns_steps"]).to(p.dtype) * (0.2 * math.sqrt(max(u.shape[-2:])))
                                    for u in parts], dim=-2)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr)


def _grad_norm(g: Tensor) -> Tensor:
    """g's 2-norm as fp64: taken in fp32 at least (no fp64 copy of a fp32 grad: 8 bytes an element),
    and again of g / max|g| where that overflowed on finite values (past ~1.8e19 per element)."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    norm = torch.linalg.vector_norm(g, dtype=dtype).double()
    if torch.isinf(norm) and torch.isfinite(g).all():
        scale = g.abs().max().double()
        norm = torch.linalg.vector_norm(g / scale.to(g.dtype), dtype=dtype).double() * scale
    return norm


def unscale_clip_check(params: list[Tensor], grad_scaler: "DynamicLossScaler | None",
                       max_grad_norm: float | None, optimizer=None) -> tuple[Tensor, Tensor]:
    """What an optimizer built on torch's ops does before its update, as AdamW's fused pass does it:
    the grads of params unscaled by grad_scaler's scale, their global norm clipped to max_grad_norm
    (None: not), an inf/nan norm recorded with grad_scaler. Returns (the norm before clipping, a
    plain tensor even for FSDP2's DTensor grads; whether the step is to be skipped). optimizer: the
    one stepping, so that a second step before the scaler's update() raises as torch's."""
    if grad_scaler is not None:
        half = [tuple(p.shape) for p in params if p.grad is not None and p.grad.dtype == torch.float16]
        if half:  # (as torch's GradScaler.unscale_ refuses them)
            raise ValueError(f"{type(optimizer).__name__}.step(grad_scaler=): its grads are unscaled in place, in their "
                             f"dtype, and fp16 grads (a param of shape {half[0]}) lose what falls below fp16's range "
                             "there (below ~6e-5 in part, below ~6e-8 all of it): keep fp32 params under autocast "
                             "(as `pyllm train` does), bf16 params, or pyllm.optim.AdamW alone, which unscales "
                             "inside its step in fp32")
        grad_scaler._begin_step(optimizer)
        inv = 1.0 / grad_scaler.get_scale()
        for p in params:
            if p.grad is not None:  # (a frozen or unused param: nothing to unscale, as torch's unscale_)
                p.grad.mul_(inv)
    grads = [p.grad for p in params if p.grad is not None]
    if grads and hasattr(grads[0], "full_tensor"):  # FSDP2's DTensor grads: torch's reduction over the shards
        norm = (torch.nn.utils.get_total_norm(grads) if hasattr(torch.nn.utils, "get_total_norm")
                else torch.nn.utils.clip_grad_norm_(params, math.inf))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    else:  # summed in fp64, as AdamW's fused pass: fp32 grads of 1e20 had given an inf norm and a skipped step
        norm = torch.linalg.vector_norm(torch.stack([_grad_norm(g) for g in grads]) if grads
                                        else torch.zeros(1, dtype=torch.float64))
    total = float(norm)
    skipped = torch.tensor(not math.isfinite(total))  # (a 0-d bool tensor, as AdamW's last_step_skipped)
    # Clipped only when the step is taken: a skipped step leaves its grads as they came (torch's
    # clip_grad_norm_ multiplies them by max / NaN first, every element NaN).
    if max_grad_norm is not None and math.isfinite(total) and total + 1e-6 > max_grad_norm:
        for g in grads:
            g.mul_(max_grad_norm / (total + 1e-6))
    if grad_scaler is not None:
        grad_scaler._record_found_inf(skipped)
    return norm, skipped


class MuonAdamW(torch.optim.Optimizer):
    """Muon on some params (a Muon's groups: the hidden layers' matrices), pyllm's AdamW on the rest
    (embeddings, output layer, norms, biases), stepped as one optimizer the way AdamW steps:
    step(grad_scaler, max_grad_norm) unscales the grads, clips their global norm over both parts,
    skips the step on an inf/nan grad (last_grad_norm, last_step_skipped as AdamW's); one lr in
    every group (Muon's is scaled to AdamW's update RMS). state_dict: both parts'. A
    torch.optim.Optimizer whose param_groups are the two parts' groups, read from them each time (a
    part's load_state_dict makes new group dicts): torch's LR schedulers set both."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        self._building = True  # (Optimizer.__init__'s own groups: the parts hold them)
        super().__init__([p for group in self.param_groups for p in group["params"]], {})
        del self._building
        self.last_grad_norm = self.last_step_skipped = None

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @param_groups.setter
    def param_groups(self, _) -> None:
        pass  # (Optimizer.__init__ assigns a list of its own)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_building", False):
            return
        raise NotImplementedError("MuonAdamW: add a group to its Muon or its AdamW part (muon / adamw), then build "
                                  "MuonAdamW again")

    def __getstate__(self):
        # the parts with it (torch's Optimizer pickles three keys), not an LR scheduler's wrapper of step
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @torch.no_grad()
    def step(self, closure=None, grad_scaler: "DynamicLossScaler | None" = None, max_grad_norm: float | None = None):
        if closure is not None:
            raise ValueError("MuonAdamW: step takes no closure")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_grad_norm, self.last_step_skipped = unscale_clip_check(params, grad_scaler, max_grad_norm, self)
        if not self.last_step_skipped:
            self.muon.step()
            self.adamw.step()

    def params_changed(self) -> None:
        """As AdamW.params_changed, for the AdamW part's params (the Muon part keeps no master)."""
        if hasattr(self.adamw, "params_changed"):
            self.adamw.params_changed()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise ValueError("MuonAdamW.load_state_dict: a MuonAdamW state has its 'muon' and 'adamw' parts; this one "
                             "is another optimizer's (a run trained with --optimizer adamw? resume with its optimizer)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
