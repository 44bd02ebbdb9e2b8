"""The import-time check that the CPU kernels' instructions exist on this CPU (pyllm/_cpu_guard.py)."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pyllm import _C, _cpu_guard

SKYLAKE = ["__SSE2__", "__AVX__", "__AVX2__", "__FMA__", "__AVX512F__", "__AVX512BW__", "__x86_64__"]
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def build_file(tmp_path, macros, flags="-march=skylake-avx512"):
    return write(tmp_path, "_C_cpu.json", json.dumps({"flags": flags, "compiler": "GNU 12.2.0", "macros": macros}))


def test_the_build_recorded_its_instructions_and_this_cpu_has_them():
    # Written by CMake beside the module and copied with it by every install route (wheel,
    # editable, build_ext --inplace); this process runs the module, so the CPU has what it lists.
    path = Path(_C.__file__).with_name("_C_cpu.json")
    assert path.is_file(), f"{path} missing: the build did not record its CPU flags"
    build = json.loads(path.read_text())
    assert build["macros"], "the compiler's macro dump came back empty"
    if build["processor"] in ("x86_64", "AMD64"):
        assert "__SSE2__" in build["macros"]
    if build["processor"] in ("x86_64", "AMD64") and _C.cpu_level == _C.cpu_levels[0][0]:
        # The module's own view of its paths agrees with the recorded macros (the base level's).
        assert ("avx512" in _C.cpu_isa.split()) == ("__AVX512F__" in build["macros"] and "__AVX512BW__" in build["macros"]
                                                    and "__AVX512VL__" in build["macros"] and "__AVX512DQ__" in build["macros"])
        assert ("avx2+fma" in _C.cpu_isa.split()) == ("__AVX2__" in build["macros"] and "__FMA__" in build["macros"])
    flags = _cpu_guard.cpu_flags()
    if flags is not None:
        assert _cpu_guard.missing(build, flags) == []
    assert _cpu_guard.build_flags(path) == build["flags"]


# Each dispatch level's instructions (its -march: x86-64-v3, x86-64-v4, + AVX512_BF16) as Linux's
# cpuinfo flags, which the kernel clears where the OS does not save the registers.
LEVEL_FLAGS = {
    "avx2": {"pni", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "lahf_lm", "avx", "avx2", "fma", "f16c", "bmi1",
             "bmi2", "movbe", "abm", "xsave"},
}
LEVEL_FLAGS["avx512"] = LEVEL_FLAGS["avx2"] | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
LEVEL_FLAGS["avx512bf16"] = LEVEL_FLAGS["avx512"] | {"avx512_bf16"}
LEVEL_PATHS = {"avx2": "avx2+fma portable", "avx512": "avx512 avx2+fma portable",
               "avx512bf16": "avx512 avx512bf16 avx2+fma portable"}


def test_cpu_levels_agree_with_the_cpu_flags():
    """The module's own cpuid reading of which levels run here agrees with Linux's flags; the base
    level always runs (the import checked it), and the running copy has its level's paths."""
    levels = dict(_C.cpu_levels)
    assert list(levels)[0] == _C.cpu_levels[0][0] and levels[_C.cpu_levels[0][0]] is True
    assert set(list(levels)[1:]) <= set(LEVEL_FLAGS), levels
    flags = _cpu_guard.cpu_flags()
    for level, runs in list(levels.items())[1:]:
        if flags is not None:
            assert runs == (LEVEL_FLAGS[level] <= flags), (level, sorted(LEVEL_FLAGS[level] - flags))
    assert _C.cpu_level in levels and levels[_C.cpu_level]
    if _C.cpu_level in LEVEL_PATHS:
        assert _C.cpu_isa == LEVEL_PATHS[_C.cpu_level]
    if not os.environ.get("PYLLM_CPU_LEVEL"):
        assert _C.cpu_level == [name for name, runs in _C.cpu_levels if runs][-1]  # the highest that runs


def import_with_level(level: str) -> subprocess.CompletedProcess:
    code = ("try:\n    from pyllm import _C\n    print('level', _C.cpu_level, '|', _C.cpu_isa)\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    env = dict(os.environ, PYLLM_CPU_LEVEL=level)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_pyllm_cpu_level_picks_a_level_or_fails_the_import_naming_them():
    base = _C.cpu_levels[0][0]
    assert f"level {base} |" in import_with_level(base).stdout
    names = ", ".join(name for name, _ in _C.cpu_levels)
    out = import_with_level("avx9000").stdout
    assert f"ImportError: pyllm: PYLLM_CPU_LEVEL=avx9000: this build's CPU kernels have the level" in out
    assert names in out
    if len(_C.cpu_levels) == 1:
        assert "PYLLM_CPU_DISPATCH=1" in out  # how to build one with more
    for level, runs in _C.cpu_levels[1:]:
        out = import_with_level(level).stdout
        if runs:
            assert out.strip() == f"level {level} | {LEVEL_PATHS[level]}"
        else:  # a level this CPU cannot run is refused, not run into SIGILL
            assert f"PYLLM_CPU_LEVEL={level}: this CPU lacks instructions" in out, out


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    assert _cpu_guard.cpu_flags(str(write(tmp_path, "cpuinfo", CPUINFO)), machine="x86_64") == {
        "fpu", "sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma"}
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve asimddp\nCPU part\t: 0xd40\n"
    assert _cpu_guard.cpu_flags(str(write(tmp_path, "arm", arm)), machine="aarch64") == {
        "fp", "asimd", "evtstrm", "aes", "sve", "asimddp"}
    # Under qemu-user an aarch64 process reads the x86 host's /proc/cpuinfo: no flags of its CPU.
    assert _cpu_guard.cpu_flags(str(tmp_path / "cpuinfo"), machine="aarch64") is None
    assert _cpu_guard.cpu_flags(str(tmp_path / "arm"), machine="x86_64") is None
    assert _cpu_guard.cpu_flags(str(tmp_path / "absent")) is None
    assert _cpu_guard.cpu_flags(str(write(tmp_path, "none", "processor\t: 0\n"))) is None


def test_a_build_for_a_newer_cpu_raises_import_error_naming_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("PYLLM_SKIP_CPU_CHECK", raising=False)
    cpuinfo = str(write(tmp_path, "cpuinfo", CPUINFO))
    with pytest.raises(ImportError) as err:
        _cpu_guard.check(build_file(tmp_path, SKYLAKE), cpuinfo, machine="x86_64")
    message = str(err.value)
    assert "avx512bw, avx512f" in message and "-march=skylake-avx512" in message and "GNU 12.2.0" in message
    assert "avx2" not in message.split("have:")[1].split(";")[0]  # the CPU has it: not listed as missing
    assert "PYLLM_CPU_DISPATCH=1" in message and "PYLLM_SKIP_CPU_CHECK=1" in message


def test_a_build_the_cpu_can_run_passes(tmp_path, monkeypatch):
    monkeypatch.delenv("PYLLM_SKIP_CPU_CHECK", raising=False)
    cpuinfo = str(write(tmp_path, "cpuinfo", CPUINFO))
    # x86-64-v3's macros, and macros that name no instruction set, and another architecture's.
    v3 = ["__SSE2__", "__SSE3__", "__SSE4_2__", "__AVX__", "__AVX2__", "__FMA__", "__linux__", "__OPTIMIZE__"]
    _cpu_guard.check(build_file(tmp_path, v3, flags="-march=x86-64-v3"), cpuinfo, machine="x86_64")
    _cpu_guard.check(build_file(tmp_path, ["__SSE2__", "__x86_64__"], flags=""), cpuinfo, machine="x86_64")


def test_aarch64_features_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("PYLLM_SKIP_CPU_CHECK", raising=False)
    graviton2 = str(write(tmp_path, "cpuinfo", "processor\t: 0\nFeatures\t: fp asimd aes asimdhp asimddp\n"))
    _cpu_guard.check(build_file(tmp_path, ["__ARM_NEON", "__ARM_FEATURE_DOTPROD"], "-march=native"), graviton2,
                     machine="aarch64")
    with pytest.raises(ImportError, match="i8mm, sve"):
        _cpu_guard.check(build_file(tmp_path, ["__ARM_FEATURE_SVE", "__ARM_FEATURE_MATMUL_INT8", "__ARM_FEATURE_DOTPROD"]), graviton2,
                         machine="aarch64")


# What GCC 12 predefines for -march=armv9-a+sve2+bf16+i8mm (tools/aarch64_check.sh's build for Grace),
# its __ARM_FEATURE_ macros, and the Features lines of Linux on Grace (Neoverse V2), Graviton 2
# (Neoverse N1) and a Raspberry Pi 4 (Cortex-A72, ARMv8.0: no LSE atomics).
ARMV9_SVE2 = ["__ARM_FEATURE_ATOMICS", "__ARM_FEATURE_BF16_SCALAR_ARITHMETIC", "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC",
              "__ARM_FEATURE_CLZ", "__ARM_FEATURE_COMPLEX", "__ARM_FEATURE_CRC32", "__ARM_FEATURE_DOTPROD",
              "__ARM_FEATURE_FMA", "__ARM_FEATURE_FP16_FML", "__ARM_FEATURE_FP16_SCALAR_ARITHMETIC",
              "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC", "__ARM_FEATURE_FRINT", "__ARM_FEATURE_IDIV", "__ARM_FEATURE_JCVT",
              "__ARM_FEATURE_MATMUL_INT8", "__ARM_FEATURE_NUMERIC_MAXMIN", "__ARM_FEATURE_QRDMX", "__ARM_FEATURE_SVE",
              "__ARM_FEATURE_SVE2", "__ARM_FEATURE_SVE_MATMUL_INT8", "__ARM_FEATURE_SVE_VECTOR_OPERATORS",
              "__ARM_FEATURE_UNALIGNED", "__ARM_NEON", "__aarch64__"]
GRACE = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 "
         "sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp sve2 sveaes svepmull "
         "svebitperm svesha3 svesm4 flagm2 frint svei8mm svebf16 i8mm bf16 dgh bti")
GRAVITON2 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
CORTEX_A72 = "fp asimd evtstrm crc32 cpuid"


def test_an_armv9_build_runs_on_grace_and_is_refused_on_older_arm_cpus(tmp_path, monkeypatch):
    monkeypatch.delenv("PYLLM_SKIP_CPU_CHECK", raising=False)
    build = build_file(tmp_path, ARMV9_SVE2, "-march=armv9-a+sve2+bf16+i8mm")
    cpu = lambda name, features: str(write(tmp_path, name, f"processor\t: 0\nFeatures\t: {features}\n"))
    _cpu_guard.check(build, cpu("grace", GRACE), machine="aarch64")
    with pytest.raises(ImportError) as err:
        _cpu_guard.check(build, cpu("graviton2", GRAVITON2), machine="aarch64")
    lacking = str(err.value).split("have: ")[1].split(";")[0]
    assert lacking == "asimdfhm, bf16, fcma, frint, i8mm, jscvt, sve, sve2, svei8mm"
    # An ARMv8.1+ build's LSE atomics (what a std::atomic compiles to there) on an ARMv8.0 core.
    armv82 = build_file(tmp_path, ["__ARM_FEATURE_ATOMICS", "__ARM_FEATURE_CRC32", "__ARM_NEON"], "-march=armv8.2-a")
    with pytest.raises(ImportError, match="have: atomics;"):
        _cpu_guard.check(armv82, cpu("a72", CORTEX_A72), machine="aarch64")
    # Under qemu-user the x86 host's /proc/cpuinfo is read: it says nothing, so nothing is refused.
    _cpu_guard.check(build, str(write(tmp_path, "host", CPUINFO)), machine="aarch64")


def test_nothing_is_checked_where_nothing_can_be_known(tmp_path, monkeypatch):
    monkeypatch.delenv("PYLLM_SKIP_CPU_CHECK", raising=False)
    cpuinfo = str(write(tmp_path, "cpuinfo", CPUINFO))
    _cpu_guard.check(tmp_path / "absent.json", cpuinfo)  # a build without the file
    _cpu_guard.check(write(tmp_path, "bad.json", "{not json"), cpuinfo)
    _cpu_guard.check(build_file(tmp_path, SKYLAKE), str(tmp_path / "absent"))  # no /proc/cpuinfo (macOS)
    monkeypatch.setenv("PYLLM_SKIP_CPU_CHECK", "1")
    _cpu_guard.check(build_file(tmp_path, SKYLAKE), cpuinfo, machine="x86_64")


def test_import_pyllm_checks_before_it_loads_the_module():
    """A CPU with none of the build's instructions: `import pyllm` raises ImportError, _C unloaded."""
    build = json.loads(Path(_C.__file__).with_name("_C_cpu.json").read_text())
    if not _cpu_guard.missing(build, set()):
        pytest.skip("this build needs no instruction set beyond the architecture's baseline")
    baseline = "Features : fp asimd" if platform.machine() in ("aarch64", "arm64") else "flags : fpu sse sse2"
    code = (
        "import builtins, io, sys\n"
        "real_open = builtins.open\n"
        f"builtins.open = lambda f, *a, **k: io.StringIO('{baseline}\\n') if str(f) == '/proc/cpuinfo' else real_open(f, *a, **k)\n"
        "try:\n"
        "    import pyllm\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "print('_C loaded:', 'pyllm._C' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYLLM_SKIP_CPU_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: pyllm's CPU kernels were compiled" in out.stdout
    assert "_C loaded: False" in out.stdout
