"""Shared by the bench_*.py scripts: timing, the copy-bandwidth ceiling, the device line, tables."""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
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


def median_ms(fn, device: str, warmup: int = 3, repeat: int = 15, burst_ms: float = 1.0) -> float:
    """Median time per call of fn() in ms. CPU: the wall time of one call. GPU: CUDA events around a
    burst of back-to-back calls (enough to fill about burst_ms, 1 to 64 of them) over their number,
    i.e. the rate a loop of such calls runs at: each call's Python and launch cost overlaps the
    kernels queued before it, as in a training step, and a call whose host cost exceeds its kernels
    shows as host time. burst_ms=0 times single calls, host cost included (the only way until
    2026-12-01: GPU results before then include it)."""
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
    return statistics.median(times)


def interleaved_seconds(runs: dict, repeat: int, device: str, before=None) -> dict:
    """The median wall seconds of each of runs (name -> callable), each timed once per round for
    repeat rounds in turn (a busy spell of the machine touches them alike), the device synchronized
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
    return {name: statistics.median(values) for name, values in seconds.items()}


def bandwidth_rows(impls: dict, step_of, device: str, nbytes: int, copy_gbs: float, base: str, ratio: str,
                   labels: dict) -> list[dict]:
    """The rows of a bandwidth-bound op's table: for each implementation (name -> fn) the median ms
    of step_of(fn)() (median_ms), the effective GB/s of nbytes (the op's minimum traffic) over it,
    that as a fraction of copy_gbs, and under `ratio` the speed relative to implementation `base`;
    labels (shape, dtype, mode, ...) lead each row."""
    times = {name: median_ms(step_of(fn), device) for name, fn in impls.items()}
    rows = []
    for name, ms in times.items():
        gbs = nbytes / ms / 1e6
        rows.append({**labels, "impl": name, "ms": round(ms, 3), "GB/s": round(gbs, 1),
                     "of copy": f"{gbs / copy_gbs:.0%}", ratio: f"{times[base] / ms:.2f}x"})
    return rows


def copy_bandwidth_gbs(device: str, nbytes: int = 256 << 20) -> float:
    """Measured ceiling: a large device-to-device (or RAM-to-RAM) copy, bytes read + written."""
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


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def write_json(path: Path | None, bench: str, device: str, rows: list[dict], extra: dict | None = None) -> None:
    if path is None:
        return
    doc = {
        "bench": bench,
        "device": device_description(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "torch": torch.__version__,
        **(extra or {}),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


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
