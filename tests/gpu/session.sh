#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call that fits 10 minutes on one H200 from a fresh machine (build
# included). Stages in priority order; each writes its results under OUT as it ends and appends one line to
# OUT/summary.txt, so a run cut short keeps what it measured:
#   1. build   the CUDA extension (TIDAR_FORCE_CUDA=1, sm_90a), then `tidar env` and `tidar selftest` (every live
#              kernel backend against the reference, small cases of each op)
#   2. tests   the GPU correctness tests: the CUDA backend (test_cuda_gpu.py), then the GPU variants of the Triton
#              and op tests (names with gpu, and the op tests on CUDA tensors: ids with cuda)
#   3. sanitizer  compute-sanitizer memcheck + racecheck on a short subset that launches every CUDA kernel
#   4. bench   benchmarks/run_gpu.sh with the seconds that are left
# usage: bash tests/gpu/session.sh OUT        (env: SESSION_S total seconds, default 570; SKIP_BUILD=1)
# PYTHON: the one interpreter of the whole run (default python3), passed down to benchmarks/run_gpu.sh.
# DRY_RUN=1 checks the plumbing without a GPU in well under a minute (tests/benchmarks/test_gpu_session_dryrun.py): no build,
# `tidar env` and `tidar selftest` as usual, pytest collects each selection (the sanitizer's too) instead of running
# it, no compute-sanitizer, and run_gpu.sh runs the kv_append benchmarks in --smoke mode.
# The longer checks (every sanitizer tool, the CMake bench) are tests/gpu/run_cuda_checks.sh.
set -uo pipefail
OUT="${1:?usage: session.sh OUT}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"
export PYTHON="$PY" DRY_RUN="${DRY_RUN:-0}"  # one interpreter (and the mode) for every script this one runs
TOTAL="${SESSION_S:-570}"
T0=$SECONDS
status=0
summary="$OUT/summary.txt"
: > "$summary"

left() { echo $(( TOTAL - (SECONDS - T0) )); }
cap() {  # cap MAX [RESERVE]: seconds a stage may take: at most MAX, leaving RESERVE for the stages after it
  local l; l=$(( $(left) - ${2:-0} ))
  echo $(( l < $1 ? (l > 0 ? l : 0) : $1 ))
}
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, one summary line
  local name="$1" limit="$2"; shift 2
  if [ "$limit" -lt 10 ]; then
    echo "$name: skipped (no time left)" | tee -a "$summary"; return 1
  fi
  local t=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local why=""; [ $rc -eq 124 ] && why=" TIMED OUT at ${limit} s"
  echo "$name: rc=$rc ($((SECONDS - t)) s)$why" | tee -a "$summary"
  [ $rc -eq 0 ] || status=1
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# 1. build + selftest ------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = "1" ]; then
  echo "build: skipped (DRY_RUN=1)" | tee -a "$summary"
elif [ "${SKIP_BUILD:-0}" != "1" ]; then
  stage build "$(cap 330 200)" env TIDAR_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || echo "build failed: see $OUT/build.log (the Triton backend is still checked)" | tee -a "$summary"
fi
"$PY" -m tidar env > "$OUT/env.txt" 2>&1
"$PY" -m tidar env --json > "$OUT/env.json" 2>&1
stage selftest "$(cap 150 120)" "$PY" -m tidar selftest
tail -1 "$OUT/selftest.log" | tee -a "$summary"

# 2. GPU correctness tests --------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
[ "$DRY_RUN" = "1" ] && PYTEST+=(--collect-only)  # the selections exist and collect; nothing runs
# (torch.compile / opcheck tests take long cold: they are in run_cuda_checks.sh)
stage tests_cuda "$(cap 150 150)" "${PYTEST[@]}" tests/kernels/test_cuda_gpu.py tests/kernels/test_cuda_ext.py tests/kernels/test_backends.py \
  -k "not compile"
tail -1 "$OUT/tests_cuda.log" | tee -a "$summary"
stage tests_gpu "$(cap 120 100)" "${PYTEST[@]}" tests/kernels/test_kv_append.py tests/kernels/test_triton_kv_append.py \
  tests/kernels/test_triton_rejection_sample.py tests/kernels/test_triton_tidar_attention.py tests/cli/test_env.py \
  tests/kernels/test_tidar_attention_paged.py tests/kernels/test_kv_append_paged.py tests/kernels/test_triton_tidar_attention_paged.py \
  tests/hf/test_direct_body.py -k "gpu or cuda"
tail -1 "$OUT/tests_gpu.log" | tee -a "$summary"

# 3. compute-sanitizer on a short subset ------------------------------------------------------------------------
CS="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
SEL="${SANITIZER_TESTS:-tests/kernels/test_cuda_gpu.py -k 'kv_append_whole_cache and 3-2-200-7-113 or rejection_exact_vs_reference_given_uniforms and 24-4-33 or seed_offset and 1234-77 and not True or attention_decode_step and 4-1000 and float16'}"
if [ "$DRY_RUN" = "1" ]; then
  stage sanitizer_selection "$(cap 60 60)" bash -c "'$PY' -m pytest $SEL -q -p no:cacheprovider --collect-only"
  echo "sanitizer: skipped (DRY_RUN=1: its selection was collected)" | tee -a "$summary"
elif [ -n "$CS" ]; then
  for tool in memcheck racecheck; do
    stage "sanitizer_$tool" "$(cap 60 60)" bash -c "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$CS' --tool $tool \
      --error-exitcode 99 --target-processes all '$PY' -m pytest $SEL -q -p no:cacheprovider"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -2 >> "$summary"
  done
else
  echo "sanitizer: compute-sanitizer not found, skipped" | tee -a "$summary"
fi

# 4. benchmarks with the time that is left ----------------------------------------------------------------------
budget=$(( $(left) - 15 ))
if [ "$budget" -ge 60 ]; then
  SKIP_BUILD=1 bash benchmarks/run_gpu.sh "$OUT/bench" "$budget" > "$OUT/bench.log" 2>&1 || status=1
  echo "bench: $(tail -1 "$OUT/bench.log")" | tee -a "$summary"
else
  echo "bench: skipped (${budget} s left)" | tee -a "$summary"
fi
echo "session: $([ $status -eq 0 ] && echo PASS || echo FAIL) in $((SECONDS - T0)) s (results in $OUT)" | tee -a "$summary"
exit $status
