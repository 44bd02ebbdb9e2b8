"""Builds pyllm's CUDA kernels for the CPU emulator (cuda_emu.h says what it models and what not).

Each csrc/cuda file in SOURCES is rewritten as C++ (a launch `kernel<<<grid, block, smem, stream>>>(args)`
becomes `::emu::launch(kernel, grid, block, smem, stream)(args)`, an `extern __shared__` array a pointer
to the launch's dynamic shared memory) and compiled by the host compiler with cuda_emu.h force-included,
together with cuda_emu.cpp and shim.cpp (plain C entry points for ctypes), into one shared library.
NVIDIA's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) come from the CUDA toolkit nvcc belongs to;
without one, `load()` returns None. The library is cached under build/cuda_emu/ by the sources' hash.

    python tools/cuda_emu/build.py          # build (or find) it, print its path
    python tools/cuda_emu/build.py --race   # the race-checking build (ThreadSanitizer; cuda_emu.cpp says how)

The race build can only be loaded into a process that starts with ThreadSanitizer's runtime
(`LD_PRELOAD=$(g++ -print-file-name=libtsan.so)`); tests/test_cuda_emu_race.py runs the emulator's
tests that way.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
# Every kernel; the attention kernels' inline PTX (mma.sync, ldmatrix, cp.async) is emulated through
# flash_attn_common.cuh's PYLLM_CUDA_EMU branches.
SOURCES = ["runtime.cu", "swiglu.cu", "rms_norm.cu", "rope.cu", "cross_entropy.cu", "distill.cu", "adamw.cu",
           "flash_attn_decode.cu", "flash_attn_fwd.cu", "flash_attn_bwd.cu", "flash_attn_bwd_mma.cu", "bpe.cu"]
# The CPU code bpe.cu's host side calls (the pre-tokenizers, the Encoder's tables, the long-piece merge):
# plain C++, compiled as it is (neither rewritten nor instrumented).
CPU_SOURCES = ["cpu/bpe_encode.cpp", "cpu/bpe_pretokenize.cpp"]
# The race build's own kernels: races planted on purpose, and their fixed twins, to show it finds them.
RACE_SOURCES = ["race_selftest.cu"]


def cuda_include() -> Path | None:
    """The include folder of the CUDA toolkit nvcc belongs to (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent / "include")
        try:  # a wrapper script (this machine's /usr/local/bin/nvcc) names the real one
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            candidates += [Path(m).parent.parent / "include" for m in re.findall(r"(/\S+/bin/nvcc)", text)]
        except OSError:
            pass
    candidates += [Path("/usr/local/cuda/include")] + [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*/include"))]
    for c in candidates:
        if (c / "cuda_runtime.h").is_file() and (c / "cuda_bf16.h").is_file():
            return c
    return None


def _callee_start(text: str, end: int) -> int:
    """Where the kernel expression before `<<<` at `end` starts: a (qualified) name with template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments, balanced
        depth = 0
        while i > 0:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _static_shared(m: re.Match) -> str:
    """A static __shared__ declaration (`T a[N], b;`) and the registration of each array it declares."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(m.group(2)):
        depth += (c in "[(") - (c in "])")
        if c == "," and depth == 0:
            parts.append(m.group(2)[start:i])
            start = i + 1
    parts.append(m.group(2)[start:])
    # the first part is the type and the first declarator: its name is the last word before any [
    names = [re.findall(r"\w+", parts[0].split("[")[0])[-1]] + [re.match(r"\s*(\w+)", p).group(1) for p in parts[1:]]
    return (f"{m.group(1)}static {m.group(2)}; " +
            " ".join(f"::emu::static_smem(&{n}, sizeof({n}));" for n in names))


def translate(text: str) -> str:
    """A .cu file's text as C++ for the emulator."""
    out, pos = [], 0
    for m in re.finditer(r"<<<(.*?)>>>", text, flags=re.S):
        start = _callee_start(text, m.start())
        out.append(text[pos:start])
        out.append(f"::emu::launch({text[start:m.start()].strip()}, {m.group(1)})")
        pos = m.end()
    out.append(text[pos:])
    text = "".join(out).replace("__CUDA_ARCH__", "PYLLM_EMU_CUDA_ARCH")  # pyllm's arch checks: the modelled sm_90
    # __shared__ float a[N], b[N];  ->  static float a[N], b[N]; ::emu::static_smem(&a, sizeof(a)); ...
    # (whole-line declarations: the garbage a GPU block finds there; cuda_emu.h's macro takes the rest)
    text = re.sub(r"^([ \t]*)__shared__\s+([^;\n]*);", _static_shared, text, flags=re.M)
    # extern __shared__ __align__(16) T name[];  ->  T* name = reinterpret_cast<T*>(::emu::dynamic_smem());
    return re.sub(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([\w:\s]+?)\s*(?:__align__\s*\(\s*\d+\s*\)\s*)?(\w+)\s*\[\s*\]\s*;",
                  lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::emu::dynamic_smem());", text)


def tsan_runtime() -> Path | None:
    """The host compiler's ThreadSanitizer runtime (to LD_PRELOAD for the race build), or None."""
    try:
        out = subprocess.run([os.environ.get("CXX", "g++"), "-print-file-name=libtsan.so"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out and Path(out).is_absolute() and Path(out).is_file() else None


def _tsan_env(tsan: Path, log_dir: Path) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, LD_PRELOAD=str(tsan), PYLLM_EMU_RACE="1", OMP_NUM_THREADS="1",
                TSAN_OPTIONS=f"exitcode=66 log_path={log_dir / 'tsan'}")


def tsan_reports(log_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("tsan*")))


def run_under_tsan(tsan: Path, args: list[str], cwd: Path, log_dir: Path, timeout: float | None = None
                   ) -> tuple[subprocess.CompletedProcess, str]:
    """Runs `python args` in cwd with TSan preloaded and the race build selected (PYLLM_EMU_RACE=1);
    returns the process and TSan's reports, read from its log files in log_dir (a test runner would
    swallow them on stderr)."""
    env = _tsan_env(tsan, log_dir)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, tsan_reports(log_dir)


def start_under_tsan(tsan: Path, args: list[str], cwd: Path, log_dir: Path) -> subprocess.Popen:
    """run_under_tsan's process, started and not waited for: its stdout and stderr go to the files
    log_dir/stdout and log_dir/stderr, TSan's reports to log_dir/tsan* (tsan_reports)."""
    env = _tsan_env(tsan, log_dir)
    with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=err)


def _key(include: Path, race: bool) -> str:
    h = hashlib.sha256(f"{include} race={race}".encode())
    files = [CSRC / "cuda" / s for s in SOURCES] + [CSRC / s for s in CPU_SOURCES] + sorted((CSRC / "cpu").glob("*.h")) + [
        ROOT / "tools" / "gen_unicode_tables.py"] + sorted((CSRC / "cuda").glob("*.cuh")) + sorted(
        (CSRC / "common").glob("*.h")) + [CSRC / "cuda" / "cuda_ops.h"] + sorted(HERE.glob("*.[ch]*")) + [Path(__file__)]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(out_dir: Path | None = None, jobs: int = 2, race: bool = False) -> Path:
    """Compiles the library (or finds it built) and returns its path; RuntimeError without a CUDA toolkit.

    race: the kernels' units under -fsanitize=thread, the runtime telling ThreadSanitizer what orders
    what (cuda_emu.cpp), and the planted races of race_selftest.cu; load it only into a process
    started with the TSan runtime preloaded."""
    include = cuda_include()
    if include is None:
        raise RuntimeError("cuda_emu: no CUDA toolkit headers (cuda_runtime.h, cuda_bf16.h) found")
    out_dir = out_dir or ROOT / "build" / "cuda_emu"
    prefix = "libpyllm_cuda_emu_race_" if race else "libpyllm_cuda_emu_plain_"
    lib = out_dir / f"{prefix}{_key(include, race)}.so"
    if lib.is_file():
        return lib
    work = out_dir / f"src_{lib.stem}_{os.getpid()}"  # (per process: two builds at once do not mix)
    work.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    # -O1: the kernels' loops run millions of fiber switches' worth of work in the tests; -fno-fast-math
    # keeps the host's IEEE arithmetic (the GPU's fast intrinsics are within the tests' tolerances).
    flags = ["-std=c++17", "-O1", "-fPIC", "-w", "-include", str(HERE / "cuda_emu.h"), f"-I{work}", f"-I{CSRC}", f"-I{include}",
             f"-I{HERE}", "-DPYLLM_CUDA_EMU=1", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0"]  # (its longjmp check
    # refuses a jump between the fibers' stacks)
    if race:  # -g: a report's frames name the .cu file and line (the #line directives below)
        flags += ["-DPYLLM_EMU_RACE=1", "-g"]
    # the headers translated too, found first (a .cu file's "cuda/x.cuh" from its own folder)
    (work / "cuda").mkdir(exist_ok=True)
    for header in (CSRC / "cuda").glob("*.cuh"):
        (work / "cuda" / header.name).write_text(f'#line 1 "{header}"\n' + translate(header.read_text()))
    units = []
    for source in [CSRC / "cuda" / name for name in SOURCES] + ([HERE / name for name in RACE_SOURCES] if race else []):
        cpp = work / (source.stem + ".cpp")
        cpp.write_text(f'#line 1 "{source}"\n' + translate(source.read_text()))
        units.append(cpp)
    tsan = ["-fsanitize=thread"] if race else []
    # the kernels instrumented; the emulator's own bookkeeping stays out of TSan's sight
    args = [flags + tsan] * len(units)
    units += [HERE / "cuda_emu.cpp", HERE / "shim.cpp"]
    args += [flags] * 2
    units += [CSRC / s for s in CPU_SOURCES]
    args += [["-std=c++17", "-O2", "-fPIC", "-w", f"-I{CSRC}", f"-I{work}"]] * len(CPU_SOURCES)
    # the pre-tokenizers' Unicode tables, generated as CMakeLists.txt does
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_unicode_tables.py"), str(work / "bpe_unicode_tables.h")],
                   check=True, capture_output=True)
    objects = [work / (unit.stem + ".o") for unit in units]
    compile_one = lambda unit, obj, a: subprocess.run([cxx, *a, "-c", str(unit), "-o", str(obj)],
                                                      capture_output=True, text=True)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(compile_one, units, objects, args))
    errors = [r.stderr for r in results if r.returncode != 0]
    if errors:
        raise RuntimeError("cuda_emu: compile failed:\n" + "\n".join(errors)[-8000:])
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    # -Bsymbolic: the kernels' cudaGetDevice, cudaMemsetAsync, ... bind to the emulator's own definitions,
    # not to a libcudart already loaded globally (a CUDA build of torch loads its own at import: "CUDA
    # driver version is insufficient" on a machine without a driver, torch 2.7-2.15's CUDA wheels)
    subprocess.run([cxx, "-shared", *tsan, "-Wl,-Bsymbolic", "-o", str(tmp), *map(str, objects)], check=True)
    os.replace(tmp, lib)
    shutil.rmtree(work, ignore_errors=True)
    for old in out_dir.glob(f"{prefix}*.so"):  # earlier sources' builds
        if old != lib:
            old.unlink(missing_ok=True)
    return lib


def load(race: bool = False) -> ctypes.CDLL | None:
    """The built library (building it first), or None where there is no CUDA toolkit."""
    try:
        return ctypes.CDLL(str(build(race=race)))
    except RuntimeError as e:
        if "no CUDA toolkit" in str(e):
            return None
        raise


if __name__ == "__main__":
    print(build(race="--race" in sys.argv[1:]))
    sys.exit(0)
