#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call (device time is scarce):
#   1. tests/gpu/run_cuda_checks.sh: build the extension (TIDAR_FORCE_CUDA=1), GPU tests (CUDA), CMake bench,
#      compute-sanitizer memcheck/racecheck;
#   2. the Triton tests (their GPU variants run at real sizes in bf16) and generation with backend="triton";
#   3. benchmarks/run_gpu.sh: every benchmark side by side (SDPA, FlexAttention, FlashInfer, ours).
# usage: bash tests/gpu/session.sh OUTDIR      (then commit OUTDIR/bench as benchmarks/results/<date>-<gpu>/)
set -uo pipefail
OUT="${1:?usage: session.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
status=0
bash tests/gpu/run_cuda_checks.sh "$OUT/cuda" || status=1
python -m pytest tests/test_triton_tidar_attention.py tests/test_triton_rejection_sample.py tests/test_triton_kv_append.py \
  tests/test_generate_triton.py -q -rs > "$OUT/pytest_triton_gpu.log" 2>&1 \
  || status=1
tail -3 "$OUT/pytest_triton_gpu.log"
TIDAR_BENCH_TOTAL_S="${TIDAR_BENCH_TOTAL_S:-420}" bash benchmarks/run_gpu.sh "$OUT/bench" || status=1
echo "session: $([ $status -eq 0 ] && echo PASS || echo FAIL) (logs in $OUT)"
exit $status
