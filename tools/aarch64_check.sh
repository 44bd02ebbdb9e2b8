#!/usr/bin/env bash
# The CPU kernels on aarch64 (Grace / GH200, Graviton, Ampere, Linux on Apple silicon) from an
# x86-64 machine: cross-compiled with Debian's aarch64 GCC, run under qemu-user in a Debian arm64
# root with PyPI's aarch64 torch. qemu checks what the kernels compute, not their speed (each
# instruction is emulated: the kernel tests run ~60x slower than natively).
#   STAGES="root build test" (default): all three; .ci/cpu_paths runs STAGES=build (compile only).
#   root   Debian's cross compiler, qemu-user-static and debootstrap (apt-get), qemu registered with
#          binfmt_misc, a bookworm arm64 root at $ARM64_ROOT (g++ in it: torch.compile's CPU code is
#          C++ compiled at run time) with a venv of torch==$TORCH and the tests' packages (PyPI's
#          aarch64 wheels; ~2 GB, ~15 minutes). Needs root and a network.
#   build  the extension for each -march in $MARCHES, with the root's Python headers where it
#          exists, the build machine's otherwise (a compile check: that module is not loaded).
#   test   each build's module in a copy of the tracked tree inside the root, and pytest of $TESTS
#          there (under qemu-user /proc/cpuinfo is the x86 host's: pyllm's import check finds no
#          aarch64 Features line in it and checks nothing).
# The default -march values: armv8-a, the baseline every aarch64 CPU runs (NEON, 16-byte vectors),
# and armv9-a with SVE2, BF16 and I8MM, what -march=native gives on Grace (Neoverse V2; GCC 12 has no
# -mcpu=neoverse-v2). Logs under $OUT. Exit status: nonzero if any build or test run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
STAGES=${STAGES:-root build test}
ARM64_ROOT=${ARM64_ROOT:-/tmp/pyllm-arm64}
OUT=${OUT:-/tmp/pyllm-arm64-out}
TORCH=${TORCH:-2.9.1}  # the newest aarch64 CPU wheel on PyPI when this was written (2026-12-04)
MARCHES=${MARCHES:-armv8-a armv9-a+sve2+bf16+i8mm}
TESTS=${TESTS:-tests/test_swiglu.py tests/test_rms_norm.py tests/test_rope.py tests/test_cross_entropy.py
               tests/test_distill.py tests/test_optim.py tests/test_bpe.py tests/test_cpu_guard.py tests/test_flash_attn.py}
PYTEST_ARGS=${PYTEST_ARGS:-"-q -m 'not cuda' -p no:cacheprovider"}  # (read again by the root's sh)
mkdir -p "$OUT"
rc=0
want() { [[ " $STAGES " == *" $1 "* ]]; }
say() { echo "== $*"; }

if want root; then
  say "root: $ARM64_ROOT (torch $TORCH)"
  need=()
  command -v aarch64-linux-gnu-g++ > /dev/null || need+=(g++-aarch64-linux-gnu)
  command -v qemu-aarch64-static > /dev/null || need+=(qemu-user-static)
  command -v debootstrap > /dev/null || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" > "$OUT/apt.log" 2>&1 \
      || { tail -20 "$OUT/apt.log"; exit 1; }
  fi
  # binfmt_misc lets the kernel run the root's aarch64 programs (chroot, pip's subprocesses) through
  # qemu; the F flag opens the interpreter now, so it works inside the chroot too.
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register \
    || { echo "could not register qemu-aarch64 with binfmt_misc"; exit 1; }
  if [ ! -x "$ARM64_ROOT/opt/venv/bin/python" ]; then
    if [ ! -x "$ARM64_ROOT/usr/bin/python3" ]; then
      debootstrap --arch=arm64 --include=python3,python3-venv,python3-dev,libgomp1,g++,ca-certificates \
        bookworm "$ARM64_ROOT" http://deb.debian.org/debian > "$OUT/debootstrap.log" 2>&1 \
        || { tail -20 "$OUT/debootstrap.log"; exit 1; }
    fi
    # The host's CA bundle and resolver: a network behind a proxy with its own CA reaches PyPI as here.
    cp /etc/resolv.conf "$ARM64_ROOT/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$ARM64_ROOT/etc/ssl/certs/ca-certificates.crt"
    chroot "$ARM64_ROOT" /bin/sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip install -q torch==$TORCH numpy tqdm \
      safetensors regex 'jinja2>=3.1.6' pytest hypothesis tiktoken matplotlib pyyaml" > "$OUT/pip.log" 2>&1 \
      || { tail -20 "$OUT/pip.log"; rm -rf "$ARM64_ROOT/opt/venv"; exit 1; }
  fi
fi

# The -march value as a folder name.
tag() { echo "$1" | tr -c 'A-Za-z0-9.\n-' '_'; }

if want build; then
  command -v aarch64-linux-gnu-g++ > /dev/null || { echo "aarch64-linux-gnu-g++ not found (apt-get install g++-aarch64-linux-gnu)"; exit 1; }
  if [ -e "$ARM64_ROOT/usr/include/python3.11/Python.h" ]; then
    # Debian's pyconfig.h includes its aarch64 twin by path from /usr/include, searched after the
    # cross compiler's own headers so that its glibc headers stay the ones it came with.
    py_include=$ARM64_ROOT/usr/include/python3.11 extra_flags="-idirafter $ARM64_ROOT/usr/include"
  else
    py_include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])") extra_flags=""
  fi
  printf 'set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\nset(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)\n' > "$OUT/toolchain.cmake"
  for march in $MARCHES; do
    say "build -march=$march"
    b=$OUT/build-$(tag "$march")
    rm -rf "$b"
    start=$(date +%s)
    if cmake -S "$SRC" -B "$b" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$OUT/toolchain.cmake" \
         -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" \
         -DPython_INCLUDE_DIR="$py_include" -DPython_SOABI=cpython-311-aarch64-linux-gnu \
         -DCMAKE_CXX_FLAGS="$extra_flags" -DPYLLM_CUDA=off -DPYLLM_MARCH="$march" \
         -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$b/out" > "$b.log" 2>&1 \
       && ninja -C "$b" -j "${MAX_JOBS:-$(nproc)}" >> "$b.log" 2>&1; then
      # Warnings count as failures: the x86 builds have none.
      if grep -q -E 'warning:' "$b.log"; then grep -E 'warning:' "$b.log" | head -20; rc=1; fi
      echo "built in $(( $(date +%s) - start )) s: $(file -b "$b"/out/_C*.so | cut -d, -f1-2)"
    else
      tail -40 "$b.log"; rc=1
    fi
  done
fi

if want test; then
  [ -x "$ARM64_ROOT/opt/venv/bin/python" ] || { echo "no arm64 root at $ARM64_ROOT (STAGES=root makes it)"; exit 1; }
  for march in $MARCHES; do
    t=$(tag "$march") so=$(ls "$OUT/build-$(tag "$march")"/out/_C*.so 2>/dev/null | head -1)
    [ -n "$so" ] || { echo "no build for -march=$march (STAGES=build)"; rc=1; continue; }
    say "test -march=$march"
    dst=$ARM64_ROOT/src/pyllm-$t
    rm -rf "$dst" && mkdir -p "$dst"
    git ls-files -z | xargs -0 cp --parents -t "$dst"
    cp "$so" "$dst/pyllm/_C.cpython-311-aarch64-linux-gnu.so"
    cp "$(dirname "$so")/_C_cpu.json" "$dst/pyllm/"
    start=$(date +%s)
    # shellcheck disable=SC2086
    chroot "$ARM64_ROOT" /bin/sh -c "cd /src/pyllm-$t && OMP_NUM_THREADS=$(nproc) \
      /opt/venv/bin/python -m pytest $PYTEST_ARGS $TESTS" > "$OUT/test-$t.log" 2>&1 || rc=1
    echo "$(tail -1 "$OUT/test-$t.log") ($(( $(date +%s) - start )) s)"
  done
fi
exit $rc
