#!/usr/bin/env bash
# The test suite under another torch, without rebuilding pyllm: the extension never links libtorch, so
# the module built here (pyllm/_C*.so, pyllm/_C_cpu.json) serves every torch >= 2.6 of this Python.
#   TORCH=2.8.0 bash tools/torch_version_check.sh [pytest args]     (default args: -q -m "not cuda")
#   TORCH=2.6.0 PIP_EXTRA="numpy==1.26.4" WORK=/tmp/pyllm-torch-2.6.0-numpy1 bash tools/torch_version_check.sh
#     (PIP_EXTRA: more pins for the venv, e.g. an older numpy; give such a venv a WORK of its own)
# Makes a venv under $WORK (default /tmp/pyllm-torch-$TORCH) with torch==$TORCH and the rest of
# requirements-dev.txt, clones this checkout's HEAD there (so edits made meanwhile do not leak into
# the run), copies the built module in, and runs pytest on it (junit XML and log beside it).
# PyPI's Linux wheels of torch are the CUDA builds (~5 GB with their libraries); they import and
# run the CPU paths without a GPU.
set -euo pipefail
: "${TORCH:?set TORCH, e.g. TORCH=2.8.0}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/pyllm-torch-$TORCH}
PY=${PYTHON:-python3}
so=$(ls "$ROOT"/pyllm/_C*.so 2>/dev/null | head -1)
[ -n "$so" ] || { echo "build pyllm here first (pip install --no-build-isolation -e .)"; exit 1; }
mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  $PY -m venv "$WORK/venv"
  grep -v "^torch==" "$ROOT/requirements-dev.txt" > "$WORK/requirements.txt"
  # shellcheck disable=SC2086  # PIP_EXTRA: several requirement specifiers, split on spaces
  "$WORK/venv/bin/pip" install -q "torch==$TORCH" -r "$WORK/requirements.txt" ${PIP_EXTRA:-} > "$WORK/pip.log" 2>&1 \
    || { tail -20 "$WORK/pip.log"; exit 1; }
fi
rm -rf "$WORK/src"
git clone -q "$ROOT" "$WORK/src"
cp "$so" "$ROOT/pyllm/_C_cpu.json" "$WORK/src/pyllm/"
cd "$WORK/src"
export PYTHONPATH="$WORK/src"  # not the editable install's finder: subprocesses of the tests import this copy too
"$WORK/venv/bin/python" -c "import numpy, torch, pyllm; print('torch', torch.__version__, 'numpy', numpy.__version__, 'pyllm from', pyllm.__file__)"
[ $# -gt 0 ] || set -- -q -m "not cuda"
"$WORK/venv/bin/python" -m pytest -p no:cacheprovider --junitxml="$WORK/junit.xml" "$@" 2>&1 | tee "$WORK/pytest.log"
