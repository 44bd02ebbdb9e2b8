"""Builds pyllm._C with CMake.

Environment:
  PYLLM_CUDA        auto (default: build the CUDA kernels when nvcc is found), on (fail without nvcc), off
  PYLLM_CUDA_ARCHS  CMake CUDA architectures, default "80;90" (e.g. "90" alone halves CUDA compile time)
  PYLLM_NATIVE      1 (default): compile the CPU kernels for this machine's CPU (-march=native);
                    0 for a portable build (a wheel for other machines)
  PYLLM_MARCH       a -march value used instead of native (e.g. x86-64-v3, skylake-avx512): CI builds
                    the kernels' non-native paths this way
  PYLLM_CPU_DISPATCH  1: a build for other machines (a wheel, a Docker image): on x86-64 the CPU
                    kernels are compiled for the compiler's default -march (or PYLLM_MARCH) and
                    again for AVX2 and AVX-512 (with and without AVX512_BF16), and `import pyllm`
                    takes the highest level the CPU runs (PYLLM_CPU_LEVEL=<level> a lower one)
  PYLLM_BUILD_TYPE  Release (default) or Debug / RelWithDebInfo
  MAX_JOBS          parallel compile jobs (default: all cores)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def flag(name: str, default: bool) -> bool:
    """A build switch in the spellings PYLLM_CUDA takes (1 / 0, on / off, true / false, yes / no, any
    case); anything else stops the build ("PYLLM_NATIVE=off" had built -march=native kernels)."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    sys.exit(f"pyllm: {name}={os.environ[name]!r}: use 1 / 0 (or on / off, true / false, yes / no)")


def dispatch() -> bool:
    return flag("PYLLM_CPU_DISPATCH", False)


def march() -> str:
    """The -march value for the CPU kernels ("" = the compiler's default, a portable build); a
    dispatch build's base level."""
    if os.environ.get("PYLLM_MARCH"):
        return os.environ["PYLLM_MARCH"]
    return "native" if flag("PYLLM_NATIVE", True) and not dispatch() else ""


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fixed build folder (not setuptools' per-call temp dir) keeps rebuilds incremental.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("PYLLM_BUILD_TYPE", "Release")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYLLM_CUDA={os.environ.get('PYLLM_CUDA', 'auto')}",  # (CMake reads its spellings)
            f"-DPYLLM_CUDA_ARCHS={os.environ.get('PYLLM_CUDA_ARCHS', '80;90')}",
            f"-DPYLLM_MARCH={march()}",
            f"-DPYLLM_CPU_DISPATCH={'ON' if dispatch() else 'OFF'}",
            f"-DPYLLM_OPENMP={'ON' if flag('PYLLM_OPENMP', True) else 'OFF'}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        # A failed step ends in one line that says where its error is (a CalledProcessError's
        # traceback, ending in the 600-character cmake command, had buried CMake's message above it).
        for step, command in (("configure", configure), ("build", ["cmake", "--build", ".", "-j", jobs])):
            try:
                subprocess.run(command, cwd=build_dir, check=True)
            except FileNotFoundError:
                sys.exit("pyllm: cmake was not found: pip install cmake ninja (a build with "
                         "--no-build-isolation uses the ones installed)")
            except subprocess.CalledProcessError:
                sys.exit(f"pyllm: CMake's {step} step failed: its error is above ('CMake Error' or the compiler's "
                         "'error:' lines); the build options (PYLLM_CUDA, PYLLM_CUDA_ARCHS, PYLLM_MARCH) are in "
                         "docs/building.md")

    # CMake writes _C_cpu.json (the instruction sets the CPU kernels need, which `import pyllm`
    # checks) beside the module. A wheel takes the whole build folder; an editable install copies
    # only the module into the source tree, so the file is added to what it copies.
    def _cpu_files(self) -> dict[str, str]:
        build_py = self.get_finalized_command("build_py")
        files = {}
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            files[str(Path(regular_file).with_name("_C_cpu.json"))] = str(Path(inplace_file).with_name("_C_cpu.json"))
        return files

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for built, inplace in self._cpu_files().items():
            self.copy_file(built, inplace, level=self.verbose)

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping.update(self._cpu_files())
        return mapping


setup(ext_modules=[CMakeExtension("pyllm._C")], cmdclass={"build_ext": CMakeBuild})
