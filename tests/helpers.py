"""Shared test helpers: float64 references, error measures and the tolerance rule."""
from __future__ import annotations

import importlib.util
import itertools
import socket
from pathlib import Path

import pytest
import torch

CPU_AND_CUDA = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


def cuda_emu_build():
    """tools/cuda_emu/build.py as a module (the CUDA emulator's build; tools/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "cuda_emu" / "build.py"
    spec = importlib.util.spec_from_file_location("cuda_emu_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def free_port() -> int:
    """A TCP port no process listens on now, for a test's own torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 for empty tensors); NaN anywhere gives inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def tolerance(torch_out: torch.Tensor, ref: torch.Tensor) -> float:
    """Twice torch's own error against the float64 reference, in the same dtype.

    Torch's error can come out below the unavoidable error of storing the exact answer in that
    dtype (one rounding of ref), e.g. when a tiny tensor happens to round favourably; that
    unavoidable error is the floor of what any implementation can reach, so the bound is
    2 * max(torch's error, rounding error of ref), never looser than twice the better of the two.

    On a handful of elements both measures are samples of one or two roundings and can land near
    0 (torch's result and the stored ref the correctly rounded value by luck), which no kernel that
    rounds more than once can promise: so the floor is at least the worst case of one rounding of
    the largest element, unit roundoff * max|ref| / ||ref||. That is 2**-24 relative for one fp32
    element; on a tensor of N similar elements it shrinks like 1/sqrt(N), far below either measure.
    (Seen with the test data of swiglu's fp32 shape (1,): torch's dup was the correctly rounded
    value, 0.27 ulp from exact, and the CUDA kernel's dout * g * sigmoid(g), emulated in fp32, 0.73.)
    """
    rounding = rel_err(ref.to(torch_out.dtype), ref)
    exact = ref.detach().double().cpu()
    one_rounding = 0.0
    if exact.numel() and torch.isfinite(exact).all() and exact.norm() > 0:
        unit_roundoff = torch.finfo(torch_out.dtype).eps / 2
        one_rounding = unit_roundoff * (exact.abs().max() / exact.norm()).item()
    return 2.0 * max(rel_err(torch_out, ref), rounding, one_rounding)


def shaped_logits(logits: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """The logits as the fused losses' scale and softcap make them, written plainly (in fp32 at least)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def assert_compiles_like_eager(fn, x: torch.Tensor) -> None:
    """torch.compile(fn, fullgraph=True) traces without a graph break and gives eager's output and
    gradient of x (x requires grad)."""
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(out, fn(x))
    (g_compiled,) = torch.autograd.grad(out.sum(), x)
    (g_eager,) = torch.autograd.grad(fn(x).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def peak_rss_growth_mib(step) -> float | None:
    """How far the process's peak resident set rises above its current size while step() runs, in
    MiB; None where Linux's /proc/self/clear_refs (which resets the peak) is not available."""
    import ctypes
    import gc
    from pathlib import Path

    def kib(field):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = kib("VmRSS")
    except (OSError, StopIteration):
        return None
    step()
    return (kib("VmHWM") - base) / 1024


class _ElsewhereTensor(torch.Tensor):
    """A CPU tensor that reports the mps device: a stand-in for a tensor on a device pyllm has no
    kernels for, which this machine cannot make (meta is taken: the ops accept it)."""

    @property
    def device(self):
        return torch.device("mps")

    @property
    def is_cpu(self):  # as a real mps tensor answers (the ops' checks read is_cpu / is_cuda first)
        return False


def on_unsupported_device(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_ElsewhereTensor, t)


def all_pairs(axes: list[tuple[str, list, list[str] | None]], every: bool = False):
    """One pytest.mark.parametrize over the product of axes, each (argnames, values, ids or None for
    str(value)), listed as the stacked decorators it replaces are, top to bottom, so each case's id
    is theirs ("full-square-128-torch.float16"). Unless every, only a covering subset of the product:
    rows picked greedily (the one covering most pairs not yet covered, first in product order on a
    tie) until every value of each axis has met every value of each other axis, which is what a
    fault in the interplay of two options needs to show; about the product of the two largest axes'
    sizes (48 -> 12 for 2 x 2 x 4 x 3), where the kernels' code paths are selected by one option or two."""
    names = [n for n, _, _ in axes]
    choices = [range(len(values)) for _, values, _ in axes]
    rows = list(itertools.product(*choices))
    if not every:
        pairs = lambda row: ({(a, row[a], b, row[b]) for a, b in itertools.combinations(range(len(axes)), 2)}
                             | {(a, row[a]) for a in range(len(axes))})  # (and each value: one axis alone)
        uncovered, picked = set().union(*map(pairs, rows)), []
        while uncovered:
            best = max(rows, key=lambda row: len(pairs(row) & uncovered))  # (max: the first of the best)
            picked.append(best)
            uncovered -= pairs(best)
        rows = sorted(picked)
    params = []
    for row in rows:
        values, ids = [], []
        for (name, axis_values, axis_ids), i in zip(axes, row):
            value = axis_values[i]
            values += list(value) if "," in name else [value]
            ids.append(axis_ids[i] if axis_ids is not None else str(value))
        params.append(pytest.param(*values, id="-".join(reversed(ids))))
    return pytest.mark.parametrize(", ".join(names), params)


def run_torchrun(processes: int, args: list[str], timeout: float, **kwargs):
    """subprocess.run of `torchrun --standalone --nproc_per_node <processes> <args>` (as this
    Python's torch.distributed.run) whose workers go with it on a timeout: subprocess.run kills the
    launcher alone, and its workers, hung in a collective (and deaf to SIGTERM: pyllm's stop request
    waits for the step), stayed up to gloo's 30 minutes."""
    import os
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
