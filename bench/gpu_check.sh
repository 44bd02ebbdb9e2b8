#!/usr/bin/env bash
# The whole GPU check, in one call on the lent GPU machine (see README, "GPU verification"):
#   build -> pytest -m cuda -> compute-sanitizer (memcheck, racecheck) on small cases -> benchmarks.
# Logs and one JSON summary go under $OUT (at most 8 files come back from the device tool).
# Usage (device tool): bash bench/gpu_check.sh            [env: PYLLM_CUDA_ARCHS, default 90]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyllm-gpu}
mkdir -p "$OUT"
export PYLLM_CUDA=on PYLLM_CUDA_ARCHS=${PYLLM_CUDA_ARCHS:-90} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status() { echo "== $*"; }

status "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"

status "build"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/device.txt"
$PY -m pyllm info | tee -a "$OUT/device.txt"

status "pytest -m cuda"
$PY -m pytest -m cuda -q -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1
pytest_rc=$?
tail -25 "$OUT/pytest_cuda.log"

status "compute-sanitizer"
sanitizer_rc=0
: > "$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  for case in $($PY -c "import sys; sys.path.insert(0, 'bench'); import sanitize_cases; print(' '.join(sanitize_cases.CASES))"); do
    echo "--- $tool $case" >> "$OUT/sanitizer.log"
    compute-sanitizer --tool "$tool" --error-exitcode 9 $PY bench/sanitize_cases.py "$case" >> "$OUT/sanitizer.log" 2>&1
    rc=$?; echo "$tool $case rc=$rc" | tee -a "$OUT/sanitizer.log"
    [ $rc -ne 0 ] && sanitizer_rc=$rc
  done
done

status "benchmarks"
: > "$OUT/bench.log"
for script in bench/bench_*.py; do
  name=$(basename "$script" .py)
  $PY "$script" --device cuda --json "$OUT/$name.json" 2>&1 | tee -a "$OUT/bench.log"
done

status "summary"
$PY - "$OUT" "$pytest_rc" "$sanitizer_rc" <<'PY'
import json, sys, glob, os, subprocess, datetime
out, pytest_rc, sanitizer_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
summary = {
    "device": torch.cuda.get_device_name(),
    "driver": open(os.path.join(out, "device.txt")).readline().strip(),
    "torch": torch.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    "commit": os.environ.get("PYLLM_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
    "pytest_cuda_rc": pytest_rc,
    "sanitizer_rc": sanitizer_rc,
    "benchmarks": {},
}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    doc = json.load(open(path))
    summary["benchmarks"][doc["bench"]] = doc
    os.remove(path)  # folded into summary.json: the device tool brings back at most 8 files
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "benchmarks"}, indent=1))
PY
[ $pytest_rc -eq 0 ] && [ $sanitizer_rc -eq 0 ]
