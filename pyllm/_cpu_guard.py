"""Refuses, with a message, to load CPU kernels compiled for instructions this CPU lacks.

pyllm compiles its CPU kernels with -march=native by default. Built on one machine (a wheel, a
Docker image's build stage) and run on an older one, the module would die of SIGILL ("Illegal
instruction", no traceback) in the first kernel or while loading. The build writes the compiler's
predefined instruction-set macros beside the module (`_C_cpu.json`, see CMakeLists.txt); this
compares them with the CPU's flags from /proc/cpuinfo before `_C` is imported. Where either is
missing (another OS, a build without the file) it checks nothing. PYLLM_SKIP_CPU_CHECK=1 skips it
(a hypervisor that hides a flag the CPU has).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# Predefined macro -> the Linux /proc/cpuinfo flag of the same instructions: the ones a compiler
# emits on its own in vectorised or scalar code (extensions only reached through intrinsics the
# kernels check at run time, such as AMX, are left out).
MACRO_FLAGS: dict[str, str] = {
    # x86-64
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__BMI__": "bmi1",
    "__BMI2__": "bmi2", "__MOVBE__": "movbe", "__F16C__": "f16c", "__FMA__": "fma", "__AVX__": "avx",
    "__AVX2__": "avx2", "__AVXVNNI__": "avx_vnni", "__AVX512F__": "avx512f",
    "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16", "__GFNI__": "gfni",
    "__VAES__": "vaes", "__VPCLMULQDQ__": "vpclmulqdq", "__PCLMUL__": "pclmulqdq", "__AES__": "aes",
    "__SHA__": "sha_ni", "__ADX__": "adx",
    # aarch64 (the "Features" line; Linux's hwcap names). -march=armv8.1-a and later imply LSE
    # atomics, which a std::atomic compiles to (Graviton 1 and the Cortex-A72 lack them).
    "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2", "__ARM_FEATURE_DOTPROD": "asimddp",
    "__ARM_FEATURE_MATMUL_INT8": "i8mm", "__ARM_FEATURE_SVE_MATMUL_INT8": "svei8mm",
    "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16", "__ARM_FEATURE_BF16_SCALAR_ARITHMETIC": "bf16",
    "__ARM_FEATURE_SVE_BF16": "svebf16", "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
    "__ARM_FEATURE_FP16_SCALAR_ARITHMETIC": "fphp", "__ARM_FEATURE_FP16_FML": "asimdfhm",
    "__ARM_FEATURE_ATOMICS": "atomics", "__ARM_FEATURE_QRDMX": "asimdrdm", "__ARM_FEATURE_FRINT": "frint",
    "__ARM_FEATURE_RCPC": "lrcpc", "__ARM_FEATURE_COMPLEX": "fcma", "__ARM_FEATURE_JCVT": "jscvt",
}

BUILD_FILE = Path(__file__).with_name("_C_cpu.json")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> set[str] | None:
    """The running CPU's feature flags (Linux), or None where they cannot be read.

    Only the line this architecture writes counts ("flags" on x86, "Features" on aarch64): under
    qemu-user an aarch64 process reads the x86 host's /proc/cpuinfo, whose flags say nothing of
    the CPU the kernels run on."""
    machine = (machine or platform.machine()).lower()
    key = "Features" if machine in ("aarch64", "arm64") or machine.startswith("arm") else "flags"
    try:
        with open(cpuinfo) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return set(value.split())
    except OSError:
        pass
    return None


def missing(build: dict, flags: set[str]) -> list[str]:
    """The flags the build was compiled for that the CPU lacks."""
    needed = (MACRO_FLAGS[m] for m in build.get("macros", ()) if m in MACRO_FLAGS)
    return sorted({f for f in needed if f not in flags})


def read_build(build_file: Path = BUILD_FILE) -> dict | None:
    """What the build recorded (flags, compiler, macros), or None where it recorded nothing."""
    try:
        return json.loads(build_file.read_text())
    except (OSError, ValueError):
        return None


def build_flags(build_file: Path = BUILD_FILE) -> str | None:
    """The flags that chose the CPU kernels' instructions ("-march=native"), None if unrecorded."""
    build = read_build(build_file)
    return None if build is None else build.get("flags")


def check(build_file: Path = BUILD_FILE, cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> None:
    """Raises ImportError when the built kernels need CPU flags this CPU does not have."""
    if os.environ.get("PYLLM_SKIP_CPU_CHECK", "0") not in ("", "0"):
        return
    build, flags = read_build(build_file), cpu_flags(cpuinfo, machine)
    if build is None or flags is None:
        return
    lacking = missing(build, flags)
    if lacking:
        how = build.get("flags") or "the compiler's default flags"
        raise ImportError(
            f"pyllm's CPU kernels were compiled ({how}, {build.get('compiler', '?')}) for instructions "
            f"this CPU does not have: {', '.join(lacking)}; they may stop the process with "
            "'Illegal instruction'. Build pyllm on this machine (pip install . in its source), "
            "or build a wheel for other machines with PYLLM_CPU_DISPATCH=1 (x86-64: portable kernels and AVX2 / "
            "AVX-512 ones, the best this CPU runs picked at import). "
            "PYLLM_SKIP_CPU_CHECK=1 skips this check.")
