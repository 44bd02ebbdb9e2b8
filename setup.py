"""Builds pyllm._C with CMake.

Environment:
  PYLLM_CUDA        auto (default: build the CUDA kernels when nvcc is found), on (fail without nvcc), off
  PYLLM_CUDA_ARCHS  CMake CUDA architectures, default "80;90" (e.g. "90" alone halves CUDA compile time)
  PYLLM_NATIVE      1 (default): compile the CPU kernels for this machine's CPU (-march=native);
                    0 for a portable build (a wheel for other machines)
  PYLLM_MARCH       a -march value used instead of native (e.g. x86-64-v3, skylake-avx512): CI builds
                    the kernels' non-native paths this way
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


def march() -> str:
    """The -march value for the CPU kernels ("" = the compiler's default, a portable build)."""
    if os.environ.get("PYLLM_MARCH"):
        return os.environ["PYLLM_MARCH"]
    return "native" if os.environ.get("PYLLM_NATIVE", "1") != "0" else ""


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
            f"-DPYLLM_CUDA={os.environ.get('PYLLM_CUDA', 'auto')}",
            f"-DPYLLM_CUDA_ARCHS={os.environ.get('PYLLM_CUDA_ARCHS', '80;90')}",
            f"-DPYLLM_MARCH={march()}",
            f"-DPYLLM_OPENMP={'OFF' if os.environ.get('PYLLM_OPENMP', '1') == '0' else 'ON'}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("pyllm._C")], cmdclass={"build_ext": CMakeBuild})
