"""Shared by the bench_*.py scripts: timing, copy bandwidth for scale, correctness checks, the device line, tables."""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# Every bench script imports this module before pyllm: the checkout it lives in goes ahead of any
# installed pyllm (a worktree's bench measured main's editable install otherwise).
# A checkout without a built extension (pyllm installed with `pip install .`, not -e) is left out:
# its pyllm/ would shadow the installed one and fail to import _C.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if not any(Path(_CHECKOUT, "pyllm").glob("_C*.so")):
    print(f"bench: {_CHECKOUT}/pyllm has no built extension: measuring the installed pyllm "
          "(pip install --no-build-isolation -e . here measures this checkout)", file=sys.stderr)
elif _CHECKOUT not in sys.path:
    sys.path.insert(1, _CHECKOUT)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# A row whose samples' spread passes this share of their median is marked noisy in its table.
NOISY = 0.10


class Timing(float):
    """A median time (the number reported) that also carries its samples' min and spread, the
    interquartile range over the median (inclusive quartiles: with 3 samples, half their range);
    arithmetic on it gives plain floats."""
    min: float
    spread: float


def timing(samples) -> Timing:
    t = Timing(statistics.median(samples))
    t.min = min(samples)
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [t] * 3
    t.spread = (q[2] - q[0]) / t if t > 0 else 0.0
    return t


def in_ms(t: Timing) -> Timing:
    """A Timing of seconds as one of milliseconds (its min too; the spread is a ratio)."""
    ms = Timing(t * 1e3)
    ms.min, ms.spread = t.min * 1e3, t.spread
    return ms


def spread(t: Timing, scale: float = 1.0, digits: int = 4) -> dict:
    """A timed row's "min" (t's fastest sample times scale: the row's time unit) and "spread"."""
    return {"min": round(t.min * scale, digits), "spread": round(t.spread, 3)}


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close's tolerance between two implementations' results in dtype."""
    if dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-4, atol=1e-5)


def check_close(ours, theirs, what: str, **tol) -> None:
    """Raises, naming what, unless ours matches theirs (tensors, or sequences of them) within tol
    (assert_close's rtol, atol): a fast wrong result must not be timed into a ratio. Without tol,
    tolerance of each tensor's dtype, in two parts: element by element with atol times the tensor's
    RMS where that passes 1 (an element that a sum cancelled to near 0 keeps the rounding of its
    terms' size), and the whole tensor's relative error (norm of the difference over the norm)
    within rtol, which an output of small values (attention's over many keys) cannot pass by
    being near 0 everywhere."""
    pairs = [(ours, theirs)] if torch.is_tensor(theirs) else list(zip(ours, theirs, strict=True))
    for i, (a, b) in enumerate(pairs):
        bound, error = tol or tolerance(b.dtype), 0.0
        try:
            if not tol and b.numel():
                norm = b.double().norm().item()
                bound = {**bound, "atol": bound["atol"] * max(1.0, norm / b.numel() ** 0.5)}
                error = (a.double() - b.double()).norm().item() / (norm or 1.0)
            torch.testing.assert_close(a, b, **bound)
            if not error <= bound["rtol"]:
                raise AssertionError(f"relative error of the whole tensor {error:.2e}, more than {bound['rtol']:g}")
        except AssertionError as e:
            item = "" if len(pairs) == 1 else f" (item {i} of {len(pairs)})"
            raise AssertionError(f"{what}{item}: results differ from the peer's, not timed\n{e}") from None


def median_ms(fn, device: str, warmup: int = 3, repeat: int = 15, burst_ms: float = 1.0) -> Timing:
    """Median time per call of fn() in ms (a Timing: with the samples' min and spread). CPU: the
    wall time of one call. GPU: CUDA events around a burst of back-to-back calls (enough to fill
    about burst_ms, 1 to 64 of them) over their number, i.e. the rate a loop of such calls runs at:
    each call's Python and launch cost overlaps the kernels queued before it, as in a training step,
    and a call whose host cost exceeds its kernels shows as host time. burst_ms=0 times single
    calls, host cost included (the only way until 2026-12-01: GPU results before then include it)."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls = 1
    if device == "cuda" and burst_ms > 0:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        calls = max(1, min(64, int(burst_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return timing(times)


def interleaved_seconds(runs: dict, repeat: int, device: str, before=None) -> dict:
    """The median wall seconds (a Timing) of each of runs (name -> callable), each timed once per
    round for repeat rounds in turn (a busy spell of the machine touches them alike), the device synchronized
    around every call; before(), when given, runs untimed ahead of each (zeroing grads, say)."""
    seconds = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            if before is not None:
                before()
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
    return {name: timing(values) for name, values in seconds.items()}


def bandwidth_rows(impls: dict, step_of, device: str, nbytes: int, copy_gbs: float, base: str, ratio: str,
                   labels: dict) -> list[dict]:
    """The rows of a bandwidth-bound op's table: for each implementation (name -> fn) the median ms
    of step_of(fn)() (median_ms), the effective GB/s of nbytes (the op's minimum traffic) over it,
    that as a fraction of copy_gbs (for scale), and under `ratio` the speed relative to
    implementation `base`; labels (shape, dtype, mode, ...) lead each row. Each pyllm
    implementation's first step must match base's (check_close) before anything is timed."""
    steps = {name: step_of(fn) for name, fn in impls.items()}
    expected = steps[base]()  # every step_of(fn) starts on the same inputs
    for name, step in steps.items():
        if name.startswith("pyllm"):
            check_close(step(), expected, f"{name} vs {base}, {labels}")
    times = {name: median_ms(step, device) for name, step in steps.items()}
    rows = []
    for name, ms in times.items():
        gbs = nbytes / ms / 1e6
        rows.append({**labels, "impl": name, "ms": round(ms, 3), "GB/s": round(gbs, 1),
                     "of copy": f"{gbs / copy_gbs:.0%}", ratio: f"{times[base] / ms:.2f}x", **spread(ms)})
    return rows


# The "of copy" key (kept in the JSON) printed under a header that does not read as a bound
COPY_HEADER = {"of copy": "vs copy"}
COPY_NOTE = ("vs copy: the GB/s over a large copy's (a copy moving the same bytes), for scale, not a bound: "
             "an in-place update or a cached input can pass 100%")


def copy_bandwidth_gbs(device: str, nbytes: int = 256 << 20) -> float:
    """A large device-to-device (or RAM-to-RAM) copy's GB/s, bytes read + written: a scale for the
    bandwidth-bound ops' GB/s, not their ceiling."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    return 2 * nbytes / ms / 1e6


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    """HEAD's short hash, "-dirty" added when pyllm/, csrc/ or bench/ differ from it."""
    try:
        here = Path(__file__).parent
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL, cwd=here).strip()
        # results of edited code are not the commit's: said so
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pyllm", "csrc", "bench"], cwd=here.parent,
                               stderr=subprocess.DEVNULL).returncode == 1
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Read when the run starts (every script imports this module first): code edited or checked out
# while a long run goes on must not lend the results its commit.
START_COMMIT = git_commit()


def _device(value: str) -> str:
    if value not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"cpu or cuda, got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"no usable CUDA device here (torch {torch.__version__}, "
                                         f"built with CUDA {torch.version.cuda})")
    return value


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=_device)
    p.add_argument("--quick", action="store_true", help="skip torch.compile peers and large sizes")
    p.add_argument("--json", type=Path, help="also write the rows here as JSON")
    return p


def print_table(rows: list[dict], columns: list[str], headers: dict | None = None) -> None:
    """rows under columns (a column's header renamed by headers); a row whose "spread" passes
    NOISY ends in "~", explained under the table."""
    names = [(headers or {}).get(c, c) for c in columns]
    widths = [max(len(n), *(len(str(r.get(c, ""))) for r in rows)) for c, n in zip(columns, names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths)))
    noisy = False
    for r in rows:
        mark = isinstance(r.get("spread"), (int, float)) and r["spread"] > NOISY
        noisy |= mark
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) + ("  ~" if mark else ""))
    if noisy:
        print(f"~ noisy: the samples' interquartile range is over {NOISY:.0%} of their median (the row's \"spread\" "
              "in the JSON); its median may be off by as much")


def write_json(path: Path | None, bench: str, device: str, rows: list[dict], extra: dict | None = None) -> None:
    if path is None:
        return
    doc = {
        "bench": bench,
        "device": device_description(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": START_COMMIT,
        "dirty": START_COMMIT.endswith("-dirty"),
        # the pyllm measured: an unbuilt checkout's bench runs the installed one, not the commit above
        "pyllm": measured_pyllm(),
        "torch": torch.__version__,
        **cpu_isa(),
        "versions": peer_versions(),
        # what else changes the numbers: the command line (--quick, --repeat, --reuse-cpu-memory, ...),
        # the threads both sides ran on and the environment knobs the docs' results name
        "argv": sys.argv[1:],
        "threads": {"torch": torch.get_num_threads(), "affinity": len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "env": {k: v for k, v in sorted(os.environ.items()) if k in _ENV_KNOBS or k.startswith("PYLLM_")},
        **({"timing": "median of the samples; min: the fastest sample, in the row's time unit; spread: (p75 - p25) "
                      "/ median"} if any("spread" in r for r in rows) else {}),
        **(extra or {}),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


_ENV_KNOBS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM",
              "ATEN_CPU_CAPABILITY", "THP_MEM_ALLOC_ENABLE", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_MAX_AUTOTUNE")


def measured_pyllm() -> str:
    """'checkout' when this checkout's pyllm runs, else the installed one's version and folder."""
    import pyllm
    where = Path(pyllm.__file__).resolve().parent
    return "checkout" if where.parent == Path(_CHECKOUT) else f"installed {pyllm.__version__} at {where}"


def cpu_isa() -> dict:
    """pyllm's CPU kernels: the instruction sets compiled in and the level that runs (pyllm info's)."""
    try:
        from pyllm import _C
        return {"cpu_isa": _C.cpu_isa, "cpu_level": _C.cpu_level}
    except (ImportError, AttributeError):
        return {}


def peer_versions() -> dict:
    """The installed versions of the peers some benchmarks measure (those importable here)."""
    versions = {}
    for module, dist in (("tiktoken", "tiktoken"), ("tokenizers", "tokenizers"), ("liger_kernel", "liger-kernel"),
                         ("transformers", "transformers"), ("peft", "peft")):
        try:
            if importlib.util.find_spec(module) is not None:
                versions[module] = importlib.metadata.version(dist)
        except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
            pass
    return versions


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(step, device: str) -> float:
    """Peak memory above the starting point while step() runs, in MiB (NaN where unmeasurable).

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM), reset through
    /proc/self/clear_refs after malloc_trim hands freed pages back, so it counts every allocation,
    torch's and a kernel's own workspace alike (Linux only).
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _vm_kib("VmRSS")
    except (OSError, RuntimeError):
        return float("nan")
    step()
    return (_vm_kib("VmHWM") - base) / 1024


def peer_module(name: str, bench: str, missing: str):
    """The peer library `name` imported, or None after printing "bench: missing" (the benchmark
    then exits 0: a peer that is not installed is no failure)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        print(f"{bench}: {missing}")
        return None


def smollm2_config(transformers, layers: int, **extra):
    """transformers' LlamaConfig in SmolLM2-135M's shape (dim 576, 9 query / 3 KV heads of 64, MLP
    1536, vocab 49152, tied embeddings; 30 layers in the real one): the model the benchmarks that
    compare with transformers build with random weights."""
    return transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, **extra)


def smollm2_moe_config(transformers, layers: int, n_experts: int, top_k: int, **extra):
    """transformers' Qwen3MoeConfig around SmolLM2-135M's attention (with Qwen3's q / k norms): n_experts
    experts of 1536 / top_k, top_k per token renormalized, so that a token's MLP FLOPs are the dense
    model's: the mixture of experts bench_sft and bench_generate build with --moe."""
    return transformers.Qwen3MoeConfig(
        vocab_size=49152, hidden_size=576, moe_intermediate_size=1536 // top_k, num_experts=n_experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, **extra)
