#!/usr/bin/env bash
# GPU checks of backend="cuda", in one call: build the extension, run the GPU tests, run compute-sanitizer
# memcheck + racecheck (+ initcheck, synccheck) on them and on the standalone bench. Logs go to $1.
#
#   bash tests/gpu/run_cuda_checks.sh /path/to/logs        (from the repository root, on a GPU machine)
#
# Env: SKIP_BUILD=1 reuses an existing build; SANITIZER_TESTS overrides the pytest selection the sanitizer runs
# (default: a small, fast subset of tests/kernels/test_cuda_gpu.py; the full suite under the sanitizer takes long).
# Exit status: non-zero if any step failed; a summary is in $1/summary.txt.
set -uo pipefail
OUT="${1:?usage: run_cuda_checks.sh LOG_DIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
status=0
summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record the result
  local name="$1"; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$summary"
  [ $rc -eq 0 ] || status=1
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" > "$OUT/versions.txt" 2>&1

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  export MAX_JOBS="${MAX_JOBS:-16}"
  step build env TIDAR_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . || { echo "build failed: see $OUT/build.log"; exit 1; }
fi
step env "$PY" -m tidar env
"$PY" -m tidar env --json > "$OUT/env.json" 2>&1

# 1. the GPU tests (and the CPU-side CUDA tests) with the cuda backend
step pytest_cuda "$PY" -m pytest tests/kernels/test_cuda_gpu.py tests/kernels/test_cuda_ext.py tests/cli/test_env.py -v -rs \
  --junitxml="$OUT/pytest_cuda.xml"
# 2. the standalone CMake build + bench
step cmake_bench bash -c "cmake -S . -B build/cmake -DCMAKE_CUDA_ARCHITECTURES=90a-real && cmake --build build/cmake -j && build/cmake/tidar_bench"

# 3. compute-sanitizer on a subset that launches every kernel (small shapes: the sanitizer is ~100x slower)
CS="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
SEL="${SANITIZER_TESTS:-tests/kernels/test_cuda_gpu.py -k 'kv_append_whole_cache and (1-1-1-1-1 or 3-2-200-7-113) or kv_append_noncontiguous or rejection_exact_vs_reference_given_uniforms and (16-2-5 or 8-5-113 or 24-4-33) or seed_offset and 1234 or top_k_top_p_exact and 1.0-5-None or attention_random_layouts_odd_sizes and ([7-64 or 113-128 or 272-64) or attention_decode_step and 4-1000 or long_prefix_split_kv'}"
if [ -n "$CS" ]; then
  # memcheck and racecheck gate the result; initcheck and synccheck are informational (torch.empty outputs are
  # uninitialised by design). No caching allocator, so an out-of-bounds access cannot hide inside a pooled block.
  for tool in memcheck racecheck initcheck synccheck; do
    extra=""
    [ "$tool" = memcheck ] && extra="--leak-check no"
    before=$status
    step "sanitizer_$tool" bash -c "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$CS' --tool $tool $extra --error-exitcode 99 \
      --target-processes all $PY -m pytest $SEL -q -p no:cacheprovider"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer_$tool.log" | tail -3 >> "$summary"
    step "sanitizer_${tool}_bench" "$CS" --tool "$tool" --error-exitcode 99 build/cmake/tidar_bench
    if [ "$tool" = initcheck ] || [ "$tool" = synccheck ]; then status=$before; fi
  done
else
  echo "compute-sanitizer not found: sanitizer steps skipped" | tee -a "$summary"
  status=1
fi
echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$summary"
exit $status
