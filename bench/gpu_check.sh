#!/usr/bin/env bash
# The whole GPU check, in one call on the lent GPU machine (see the README's kernel table and docs/kernels.md):
#   build -> pytest -m cuda -> compute-sanitizer (memcheck, racecheck) on small cases -> benchmarks.
# Logs and one JSON summary go under $OUT (at most 8 files come back from the device tool).
# Usage (device tool): bash bench/gpu_check.sh            [env: PYLLM_CUDA_ARCHS, default 90]
# One device call may run 10 minutes at most. When the whole check does not fit, split it over
# calls (the machine stays warm and keeps the build between them):
#   STAGES="build test" bash bench/gpu_check.sh ; STAGES="sanitize" ... ; STAGES="bench" BENCH_ARGS=--quick ...
#   (STAGES="profile": Nsight Compute on the attention kernels, not in the default set; see below)
# Each stage also has a time limit (seconds, env TEST_LIMIT, SANITIZE_LIMIT, BENCH_LIMIT) so that one
# hang still leaves the logs of the stages before it under $OUT.
# A lent GPU comes with ~15 device minutes in all, start-up included. Measured on the H200
# (2026-11-30): start ~30 s, build 28 s, sanitize (14 pairs at once) ~30 s, bench --quick ~150 s,
# and pytest -m cuda did not finish 426 tests in 210-250 s (8-14 workers). So one call first,
#   STAGES="build test sanitize bench" TEST_LIMIT=280 SANITIZE_LIMIT=100 BENCH_ARGS=--quick BENCH_LIMIT=150
#   (device timeout_s 590), which leaves ~4.5 minutes: one more start, to rerun what failed after fixes.
# pytest runs on 8 xdist workers where pytest-xdist is installed (PYTEST_ARGS overrides), and the
# sanitizer runs its (tool, case) pairs SANITIZE_JOBS (16, all) at a time: each is a python process that
# imports torch under compute-sanitizer, slow to start, and one GPU holds them all.
# Since 2026-12-01 (not yet run): the tests of what no GPU has run yet go first, in a short pass of
# their own (FIRST_K, log pytest_cuda_first.log; 216 tests, DPO, its fused log-probabilities and softcap since the
# DPO change; since 2026-12-01's second session also the MoE layer's CUDA paths (grouped GEMM, gathered)
# and the fused distillation loss; since 2026-12-03 the decode kernel over flash-attn's cache layouts and the
# kv-cache call's rotary and LSE); taller tiles of the forward (128 query
# rows), the backward's dq kernel (128 rows) and its dk_dv kernel (128 keys, D = 64) have their own
# tests (-k 128_row), sanitizer case (flash_attn_tall_tiles) and bench rows ("pyllm fwd-m128",
# "pyllm dq-m128", "pyllm dkv-n128", "pyllm all-128"); since 2026-12-04 the backward with dQ added up
# by fp32 atomics (PYLLM_ATTN_BWD=atomic: tests -k atomic_dq, sanitizer case flash_attn_atomic_dq, bench
# row "pyllm atomic-dq"); since 2026-12-05 softcap and ALiBi in the CUDA attention kernels (tests -k
# "softcap or alibi", the models' with PYLLM_ATTN_SCORE_MODS_CUDA=1, sanitizer case flash_attn_score_mods);
# later that day dropout (dropout_p) there too (tests -k dropout, sanitizer case flash_attn_dropout);
# later still the softmax of every tensor-core attention kernel, the default ones included (one
# ex2.approx.ftz a score, the mask a branch, full tiles copied without row tests, the forward's
# scale in its exponent and O rescaled only where a maximum moved: 8-40% fewer
# instructions a block by tools/sass_census.py):
# every attention test and sanitizer case covers it, and the bench rows against 2026-11-30's ratios
# (0.52-0.66x SDPA-flash forward, 0.30-0.50x fwd+bwd) say what it bought;
# bench_generate has "cuda-graph" and batch
# rows; the bench times bursts of calls (bench/common.py median_ms), so GPU rows are no longer
# comparable with 2026-11-30's single calls.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyllm-gpu}
mkdir -p "$OUT"
# PYLLM_REQUIRE_CUDA: the cuda tests fail (naming why) rather than skip if the GPU is unusable here.
# PYLLM_CROSS_ENTROPY_CUDA: pyllm.nn's fused losses take the (unverified) CUDA cross-entropy kernel,
# so that the model's cuda tests exercise it too (its own tests call it directly either way).
export PYLLM_CUDA=on PYLLM_CUDA_ARCHS=${PYLLM_CUDA_ARCHS:-90} PYLLM_REQUIRE_CUDA=1 PYTHONUNBUFFERED=1
export PYLLM_CROSS_ENTROPY_CUDA=${PYLLM_CROSS_ENTROPY_CUDA:-1}
# PYLLM_DISTILL_CUDA: the same for pyllm.nn.linear_distill and the (unverified) CUDA distill kernel.
export PYLLM_DISTILL_CUDA=${PYLLM_DISTILL_CUDA:-1}
# PYLLM_ATTN_SCORE_MODS_CUDA: the same for pyllm.nn's capped (Gemma 2), ALiBi and dropout attention and
# the (unverified) CUDA kernels' softcap / alibi_slopes / dropout_p.
export PYLLM_ATTN_SCORE_MODS_CUDA=${PYLLM_ATTN_SCORE_MODS_CUDA:-1}
PY=${PYTHON:-python3}
STAGES=${STAGES:-build test sanitize bench}
BENCH_ARGS=${BENCH_ARGS:-}
status() { echo "== $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
pytest_rc=-1 sanitizer_rc=-1  # -1: stage not run in this call

status "device"
# No GPU, no run: every later stage would fail one test or benchmark at a time (or build for minutes first).
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1; then
  cat "$OUT/device.txt"; echo "gpu_check.sh needs an NVIDIA GPU and its driver (nvidia-smi failed here)"; exit 2
fi
cat "$OUT/device.txt"

if want build; then
  status "build"
  start=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; exit 1
  fi
  echo "build_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/device.txt"
fi
$PY -m pyllm info | tee -a "$OUT/device.txt"

if want test; then
  status "pytest -m cuda"
  # -v: one line per finished test, so a log cut by the limit still names what passed and what
  # failed (2026-11-30, H200: two cut -q logs showed an 'F' that no line named). pytest-timeout's
  # --session-timeout ends the session 20 s before the hard limit, so the failure summary and the
  # slowest tests are printed; --timeout turns one hung test into one failure, not a lost stage.
  limit=${TEST_LIMIT:-300}
  workers=$($PY -c "import xdist" 2>/dev/null && echo 8 || echo 1)
  default_args=$([ "$workers" -gt 1 ] && echo "-n $workers")
  # The tests' float64 references run on the CPU: each worker's torch would start one OpenMP thread
  # per core (16 there), 8-14 workers oversubscribing the cores many times over while their threads
  # spin (the likely cause of the slow tail that kept both 2026-11-30 runs from finishing).
  threads=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}  # this stage only
  # per pass: the session's own limit, 20 s under the hard one
  session_timeout() { $PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120 --timeout-method thread --session-timeout $(( $1 - 20 ))"; }
  # What no GPU has run yet goes first, in its own short session (its own log), so that a cut
  # full run still answers for it; the full run then leaves it out. FIRST_K="" skips this pass.
  first_k=${FIRST_K-128_row or atomic_dq or rechecks_raw or int_length or eager_autograd or lora_run_from_a_run or cuda_graph or linear_cross_entropy or linear_token_logps or dpo_with_lora or softcap or alibi or dropout or moe or linear_distill or row_kernel or generalized_jsd or kvcache_layouts or rotary_and_lse or widened_head_dims}
  first_rc=0
  if [ -n "$first_k" ]; then
    start=$(date +%s)
    OMP_NUM_THREADS=$threads timeout 150 $PY -m pytest -m cuda -k "$first_k" -v -rfE -p no:cacheprovider \
      ${PYTEST_ARGS-$default_args $(session_timeout 150)} > "$OUT/pytest_cuda_first.log" 2>&1
    first_rc=$?
    grep -E "^(FAILED|ERROR)|node down|Timeout" "$OUT/pytest_cuda_first.log" | head -20
    tail -2 "$OUT/pytest_cuda_first.log"
    limit=$(( limit - ($(date +%s) - start) ))
    first_k="not ($first_k)"
  fi
  OMP_NUM_THREADS=$threads timeout "$limit" $PY -m pytest -m cuda ${first_k:+-k "$first_k"} -v -rfE --durations=30 \
    -p no:cacheprovider ${PYTEST_ARGS-$default_args $(session_timeout $limit)} > "$OUT/pytest_cuda.log" 2>&1
  pytest_rc=$?
  [ $pytest_rc -eq 0 ] && pytest_rc=$first_rc
  grep -E "^(FAILED|ERROR)|node down|Timeout" "$OUT/pytest_cuda.log" | head -40
  tail -5 "$OUT/pytest_cuda.log"
fi

if want sanitize; then
  status "compute-sanitizer"
  cases=${CASES:-$($PY -c "import sys; sys.path.insert(0, 'bench'); import sanitize_cases; print(' '.join(sanitize_cases.CASES))")}
  mkdir -p "$OUT/.san"
  # Not always on PATH where the toolkit is installed.
  SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  export PY OUT SAN SANITIZE_LIMIT=${SANITIZE_LIMIT:-300}
  # One line per (tool, case) pair, run SANITIZE_JOBS at a time; each writes its own log and rc file.
  for tool in memcheck racecheck; do for case in $cases; do echo "$tool $case"; done; done |
    xargs -P "${SANITIZE_JOBS:-16}" -L 1 bash -c '
      log="$OUT/.san/$0.$1.log"
      timeout "$SANITIZE_LIMIT" "$SAN" --tool "$0" --error-exitcode 9 $PY bench/sanitize_cases.py "$1" > "$log" 2>&1
      echo $? > "$OUT/.san/$0.$1.rc"'
  sanitizer_rc=0
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    for case in $cases; do
      rc=$(cat "$OUT/.san/$tool.$case.rc" 2>/dev/null || echo 125)
      { echo "--- $tool $case rc=$rc"; cat "$OUT/.san/$tool.$case.log" 2>/dev/null; } >> "$OUT/sanitizer.log"
      echo "$tool $case rc=$rc"
      [ "$rc" -ne 0 ] && sanitizer_rc=$rc
    done
  done
  # gVisor machines refuse the sanitizer ("Device not supported"): that is no finding about the
  # kernels, so say so instead of reporting the failed runs as errors.
  if grep -q "Device not supported" "$OUT/sanitizer.log"; then
    echo "compute-sanitizer: 'Device not supported' on this machine (gVisor runtime?): no sanitizer results"
    sanitizer_rc=-2
  fi
  rm -rf "$OUT/.san"
fi

# Not in the default STAGES (about a minute; the second call's slot): Nsight Compute's counters for
# the attention kernels, each tile variant once (bench/profile_attention.py): SM and tensor-pipe
# throughput, shared-memory traffic and bank conflicts, stall reasons, occupancy. Firecracker
# machines only (gVisor's ncu reads no counters).
if want profile; then
  status "ncu"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -z "$NCU" ]; then
    echo "ncu: not found"
  else
    timeout "${PROFILE_LIMIT:-150}" "$NCU" --clock-control none --profile-from-start off -k regex:flash_attn \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats \
      $PY bench/profile_attention.py > "$OUT/ncu.txt" 2>&1
    echo "ncu rc=$?"
    grep -E "flash_attn_[a-z_]*kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy" "$OUT/ncu.txt" | head -60
  fi
fi

if want bench; then
  status "benchmarks"
  : > "$OUT/bench.log"
  deadline=$(( $(date +%s) + ${BENCH_LIMIT:-420} ))
  # The kernels' own benchmarks first (#7 needs them), then the model-level ones, then any other.
  ordered="attention swiglu rms_norm rope optim bpe train generate sft"
  scripts=$(for n in $ordered; do echo bench/bench_$n.py; done; ls bench/bench_*.py | grep -v -E "bench_($(echo $ordered | tr ' ' '|'))\.py")
  for script in $scripts; do
    name=$(basename "$script" .py)
    left=$(( deadline - $(date +%s) ))
    if [ $left -le 0 ]; then echo "$name skipped: BENCH_LIMIT reached" | tee -a "$OUT/bench.log"; continue; fi
    timeout $left $PY "$script" --device cuda $BENCH_ARGS --json "$OUT/$name.json" 2>&1 | tee -a "$OUT/bench.log"
  done
  # the distillation divergence alone (its CUDA kernel against TRL's formula and Liger's LigerJSD)
  left=$(( deadline - $(date +%s) ))
  if [ $left -gt 0 ]; then
    timeout $left $PY bench/bench_distill.py --device cuda $BENCH_ARGS --logits --json "$OUT/bench_distill_logits.json" 2>&1 | tee -a "$OUT/bench.log"
  fi
  # LoRA fine-tuning against PEFT (installed on the lent machine), if time is left
  left=$(( deadline - $(date +%s) ))
  if [ $left -gt 0 ]; then
    timeout $left $PY bench/bench_sft.py --device cuda $BENCH_ARGS --lora 8 --json "$OUT/bench_sft_lora.json" 2>&1 | tee -a "$OUT/bench.log"
  fi
fi

status "summary"
$PY - "$OUT" "$pytest_rc" "$sanitizer_rc" <<'PY'
import json, sys, glob, os, subprocess, datetime
out, pytest_rc, sanitizer_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
summary = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no usable GPU",
    "nvidia_smi": open(os.path.join(out, "device.txt")).readline().strip(),  # name, driver, memory
    "torch": torch.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    "commit": os.environ.get("PYLLM_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
    "pytest_cuda_rc": pytest_rc,
    "sanitizer_rc": sanitizer_rc,
    "stages": os.environ.get("STAGES", "build test sanitize bench"),
    "benchmarks": {},
}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    doc = json.load(open(path))
    summary["benchmarks"][doc["bench"]] = doc
    os.remove(path)  # folded into summary.json: the device tool brings back at most 8 files
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "benchmarks"}, indent=1))
PY
# A stage not run in this call (-1), or a sanitizer the machine refused (-2), does not fail it.
[ $pytest_rc -le 0 ] && [ $sanitizer_rc -le 0 ]
