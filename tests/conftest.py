import functools
import os
import sys

import pytest
import torch

from pyllm import _C
from pyllm.ops import _util

# The CLI's commands called in this process (tests/test_cli.py) would turn pyllm.cpu_memory's
# process-wide malloc and huge-page settings on for the rest of the run and its subprocesses; the
# suite keeps the default allocator (tests/test_cpu_memory.py checks the settings in a subprocess).
os.environ.setdefault("PYLLM_REUSE_CPU_MEMORY", "0")

# Set to 1 where the GPU tests must run (bench/gpu_check.sh's machine): unusable CUDA then fails
# the `cuda` tests instead of skipping them, so that a run cannot pass with all of them skipped.
REQUIRE_CUDA_ENV = "PYLLM_REQUIRE_CUDA"

# A hung kernel must cost one test, not the whole run's time limit (bench/gpu_check.sh gives pytest
# 240 s): where pytest-timeout is installed (the GPU machine has it) and no timeout was asked for,
# each cuda test gets this many seconds, setup included (the slowest take ~10 s). The thread method
# ends the process even when the hang is inside a CUDA call that a signal cannot interrupt; under
# xdist only that worker goes, a new one takes the remaining tests.
CUDA_TEST_TIMEOUT_S = 60


@functools.cache
def _cuda_usable() -> bool:
    return _util.cuda_usable()


def _why_cuda_unusable() -> str:
    if not _util.HAS_CUDA_KERNELS:
        return "pyllm was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "no usable GPU"
    return (f"torch sees {torch.cuda.device_count()} GPU(s) but pyllm's CUDA runtime "
            f"{_C.cuda_runtime_version()} sees none (a driver older than that runtime?)")


def _must_run_cuda() -> bool:
    # CUDA kernels built and a GPU that torch can use, but pyllm cannot: a broken install (driver
    # older than the runtime), not a machine without a GPU. A CPU-only build on a GPU machine (no
    # nvcc at install time, PYLLM_CUDA=auto) is a supported install: its cuda tests skip.
    return os.environ.get(REQUIRE_CUDA_ENV) == "1" or (_util.HAS_CUDA_KERNELS and torch.cuda.is_available())


def _timeout_asked_for(config) -> bool:
    return (config.getoption("timeout", None) is not None or bool(os.environ.get("PYTEST_TIMEOUT"))
            or bool(config.getini("timeout")))


def pytest_collection_modifyitems(config, items):
    if _cuda_usable():
        if config.pluginmanager.hasplugin("timeout") and not _timeout_asked_for(config):
            timeout = pytest.mark.timeout(CUDA_TEST_TIMEOUT_S, method="thread")
            for item in items:
                if "cuda" in item.keywords and item.get_closest_marker("timeout") is None:
                    item.add_marker(timeout)
        return
    if _must_run_cuda():
        return  # unusable here: pytest_runtest_setup fails them
    skip = pytest.mark.skip(reason=f"cuda: {_why_cuda_unusable()}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _race_check_module(session):
    """test_cuda_emu_race.py's module where the session runs its test_kernels_are_race_free, or None."""
    return next((item.module for item in session.items if item.name == "test_kernels_are_race_free"), None)


def pytest_collection_finish(session):
    """test_cuda_emu_race.py's check of the kernels (a single-threaded process of minutes) starts
    now, to run beside the tests before it (not under xdist: every worker collects every test)."""
    if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if (module := _race_check_module(session)) is not None:
        module.start_race_check()


def pytest_sessionfinish(session):
    if (module := _race_check_module(session)) is not None:  # (also where xdist's worker started it)
        module.stop_race_check()


def pytest_runtest_setup(item):
    if "cuda" in item.keywords and not _cuda_usable() and _must_run_cuda():
        pytest.fail(f"cuda: {_why_cuda_unusable()} (the GPU tests must run here: torch sees a GPU or "
                    f"{REQUIRE_CUDA_ENV}=1)", pytrace=False)


_context_lost: list[str] = []  # why this process's CUDA context is unusable, once it is


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """After each cuda test, a device sync: an illegal address or device-side assert is sticky (every
    later CUDA call in the process raises it), so it is pinned on the test whose kernels raised it,
    and the process stops instead of failing all its remaining tests with the same error: under
    xdist the worker exits once this test is reported (a new worker takes the rest), otherwise the
    session stops after this test."""
    outcome = yield
    if call.when != "call" or "cuda" not in item.keywords or not _cuda_usable():
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:  # torch.AcceleratorError (a RuntimeError) in recent torch
        why = f"CUDA context lost after {item.nodeid}: {e}"
        report = outcome.get_result()
        if report.failed:
            report.sections.append(("CUDA context", why))
        else:
            report.outcome, report.longrepr = "failed", why
        _context_lost.append(why)
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            item.session.shouldstop = why


def pytest_runtest_logfinish(nodeid, location):
    if _context_lost and os.environ.get("PYTEST_XDIST_WORKER"):
        print(f"\n{_context_lost[0]}; this xdist worker exits", file=sys.stderr, flush=True)
        os._exit(3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
