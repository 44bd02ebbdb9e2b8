"""pyllm's CUDA kernels checked for races on the CPU: tools/cuda_emu's race build, under ThreadSanitizer
(skipped without a CUDA toolkit's headers or the host compiler's libtsan).

The race build compiles the kernels with -fsanitize=thread and tells TSan what the GPU orders
(tools/cuda_emu/cuda_emu.cpp): a block's threads are fibers, __syncthreads and warp collectives are
the only edges between them, and each thread's cp.async copies belong to a copy engine ordered only
after their issue and before the wait that lands them. TSan then reports two accesses to one
address, one a write, with no edge between them: a race on the GPU, whatever order the emulator ran
them in. This is compute-sanitizer racecheck's question (shared memory) asked of global memory too.

TSan's runtime must be in the process from its start, so each check runs a Python subprocess with
LD_PRELOAD: the planted races of tools/cuda_emu/race_selftest.cu (each must be reported, at its
line, and its fixed twin must not), then test_cuda_emu.py's cases (their answers checked as there),
a subset sized for CI that still reaches every kernel and each of its code paths.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from helpers import cuda_emu_build

ROOT = Path(__file__).resolve().parent.parent

# test_cuda_emu.py's cases under TSan: every kernel, each of its launch shapes and code paths (the
# warp- and block-per-row RMSNorm, the scalar and vector GLU paths, both AdamW passes, the decode's
# cache layouts, the attention forward and the backwards (mma, atomic dQ, SIMT) at each tile shape,
# the BPE encoder's thread and block paths), one dtype where the dtype changes nothing in the synchronisation:
# ~3 minutes. (The whole file, which passed on 2026-12-04, takes ~15 minutes under TSan:
# `PYLLM_RACE_ALL=1` runs it all.)
SUBSET = " or ".join(f"({k})" for k in [
    "test_glu_forward_and_backward and bfloat16 and silu",
    "test_rms_norm_forward_and_backward and bfloat16",
    "test_rope and bfloat16 and shared",
    "test_cross_entropy and bfloat16",
    "test_generalized_jsd and bfloat16 and not fwd-kl and not rev-kl",
    "test_adamw",
    "test_kv_cache_decode and bfloat16 and 64 and (mha or mqa or window-gqa-4q)",
    "test_kv_cache_decode_layouts and 3",
    "test_flash_attn_forward_and_backward and bfloat16 and 64 and (square or mqa or tiny) and not full-square",
    "test_flash_attn_forward_and_backward and causal-square-128-torch.bfloat16",
    "test_flash_attn_other_head_dims",
    "test_flash_attn_taller_tiles and 64",
    "test_flash_attn_simt_backward",
    "test_flash_attn_atomic_dq_backward and causal-gqa-64",  # (each atomic-dQ case: 24-40 s under TSan)
    "test_flash_attn_varlen",
    "test_flash_attn_score_mods and causal-gqa-64-alibi-batch-softcap",  # (capped and biased scores' path)
    "test_flash_attn_dropout and causal-gqa-64-torch.bfloat16",  # (dropout's path, in the same instances)
    "test_bpe_encoder and gpt4o",
])

# race_selftest.cu's cases: the kernel each planted race is in (TSan must name it)
SELFTEST = {0: "reduce_kernel", 1: "reuse_kernel", 2: "warp_kernel", 3: "cp_async_kernel", 4: "ldmatrix_kernel",
            5: "global_kernel"}


# test_kernels_are_race_free's work: the race build, then the check, one process on one core for
# ~4.5 minutes. conftest.py starts it as soon as pytest has collected the test, so that it runs beside
# the tests before it (on 2 cores the emulator's own cases, single-threaded too, leave the second
# idle) rather than after them: the suite took 15m47s with it run in turn, 11m54s with it beside
# (the emulator's cases 37 s slower; 2-core Intel Xeon VM, 2026-12-05). Keys: "built" (an Event), "build" ((build module,
# library, TSan runtime), a reason to skip, or the exception), "proc", "log_dir".
_check: dict = {}


def _race_build_or_why():
    """(build module, library, TSan runtime), a reason to skip, or the exception the build raised
    (raised again by the tests that need the build)."""
    try:
        build = cuda_emu_build()
        if build.cuda_include() is None:
            return "no CUDA toolkit headers to build the emulator with"
        tsan = build.tsan_runtime()
        if tsan is None:
            return "the host compiler has no ThreadSanitizer runtime (libtsan.so)"
        return build, build.build(race=True), tsan
    except BaseException as e:
        return e


def _start_check(build, tsan) -> None:
    selection = [] if os.environ.get("PYLLM_RACE_ALL") == "1" else ["-k", SUBSET]
    _check["log_dir"] = log_dir = Path(tempfile.mkdtemp(prefix="pyllm_race_check_"))
    _check["proc"] = build.start_under_tsan(tsan, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                                   "tests/test_cuda_emu.py", *selection], ROOT, log_dir)


def start_race_check() -> None:
    """Builds the race build and starts the kernels' check, in a thread of this process."""
    _check["built"] = threading.Event()

    def work():
        _check["build"] = got = _race_build_or_why()
        _check["built"].set()
        if isinstance(got, tuple) and not _check.get("stopping"):
            _start_check(got[0], got[2])

    _check["thread"] = threading.Thread(target=work, name="pyllm race check", daemon=True)
    _check["thread"].start()


def stop_race_check() -> None:
    """At the session's end (conftest.py): a check still running (the run stopped early) is killed."""
    _check["stopping"] = True
    if "thread" in _check:
        _check["thread"].join()
    if _check.get("proc") is not None and _check["proc"].poll() is None:
        _check["proc"].kill()
        _check["proc"].wait()
    if _check.get("log_dir"):
        shutil.rmtree(_check["log_dir"], ignore_errors=True)


@pytest.fixture(scope="module")
def race_build():
    if "thread" in _check:  # (started at collection)
        _check["built"].wait()
    else:
        _check["build"] = _race_build_or_why()
    if isinstance(_check["build"], BaseException):
        raise _check["build"]
    if isinstance(_check["build"], str):
        pytest.skip(_check["build"])
    return _check["build"]


def summary(reports: str, keep: int = 8000) -> str:
    """The reports' SUMMARY lines, then the first report in full (without the std:: frames)."""
    lines = reports.splitlines()
    heads = [line for line in lines if line.startswith("SUMMARY: ThreadSanitizer")]
    first = [line for line in lines if "std::" not in line and "emu::Launch" not in line]
    return "\n".join(heads) + "\n\n" + "\n".join(first)[:keep]


@pytest.mark.parametrize("planted", [True, False], ids=["planted", "fixed"])
@pytest.mark.parametrize("which", list(SELFTEST), ids=list(SELFTEST.values()))
def test_planted_races_are_reported(race_build, tmp_path, which, planted):
    build, lib, tsan = race_build
    code = (
        "import ctypes, sys\n"
        f"lib = ctypes.CDLL({str(lib)!r})\n"
        "lib.emu_race_selftest.argtypes = [ctypes.c_int, ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p]\n"
        "x = (ctypes.c_float * 256)(*[0.25 * i + 1.0 for i in range(256)])\n"
        "out = (ctypes.c_float * 256)()\n"
        f"sys.exit(3 if lib.emu_race_selftest({which}, {planted}, ctypes.addressof(x), ctypes.addressof(out)) else 0)\n")
    proc, reports = build.run_under_tsan(tsan, ["-c", code], ROOT, tmp_path, timeout=300)
    assert proc.returncode in (0, 66), proc.stderr[-4000:]
    if planted:
        assert proc.returncode == 66 and "WARNING: ThreadSanitizer: data race" in reports, "planted race not reported"
        # the report names the kernel and a line of race_selftest.cu
        assert SELFTEST[which] in reports and "race_selftest.cu:" in reports, summary(reports)
    else:
        assert proc.returncode == 0 and not reports, summary(reports)


def test_kernels_are_race_free(race_build):
    build, _, tsan = race_build
    if "thread" in _check:
        _check["thread"].join()  # (the process started)
    else:  # (not started at collection: under xdist)
        _start_check(build, tsan)
    proc, log_dir = _check["proc"], _check["log_dir"]
    try:
        proc.wait(timeout=3600)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = ((log_dir / name).read_text(errors="replace") for name in ("stdout", "stderr"))
    reports = build.tsan_reports(log_dir)
    assert proc.returncode != 5, "no emulator case selected: " + stdout[-2000:]
    assert not reports, "races in the CUDA kernels:\n" + summary(reports)
    assert proc.returncode == 0, stdout[-6000:] + stderr[-3000:]
    assert " passed" in stdout and "skipped" not in stdout.splitlines()[-1], stdout[-2000:]
