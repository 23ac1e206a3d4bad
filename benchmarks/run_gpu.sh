#!/usr/bin/env bash
# The benchmarks on the GPU machine: install (building the CUDA extension; SKIP_BUILD=1 when it is built already),
# report the live backends, run every benchmark within a time budget, write
# OUTDIR/{results.csv,results.md,env.json,*.png,build.log,run.log}. Suite budgets shrink to the seconds left after
# the build; past the budget the run is stopped and still writes the rows it measured.
#   usage: benchmarks/run_gpu.sh OUTDIR [SECONDS] [extra args for python -m benchmarks]
#          SECONDS: the whole script's budget (default: TIDAR_BENCH_TOTAL_S, else 480)
# FlashInfer is optional: a wheel under .whl/ (carried to the machine) is installed offline when present.
# PYTHON: the interpreter of every step (default python3; tests/gpu/session.sh passes its own down). DRY_RUN=1: the
# plumbing only (no install, the kv_append benchmarks in --smoke mode; CPU is fine).
set -uo pipefail
OUT=${1:?usage: benchmarks/run_gpu.sh OUTDIR [SECONDS] [args]}
shift
TOTAL=${TIDAR_BENCH_TOTAL_S:-480}
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  TOTAL=$1
  shift
fi
PY="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
DRY=()
[ "$DRY_RUN" = "1" ] && DRY=(--smoke --only kv_append --no-plots)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
t0=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
  > "$OUT/gpu.txt" 2>&1 || true
cat "$OUT/gpu.txt"

echo "== install (CUDA extension build), log in build.log"
if [ "$DRY_RUN" = "1" ] || [ "${SKIP_BUILD:-0}" = "1" ]; then
  echo "SKIP_BUILD=1 or DRY_RUN=1: using the installed build" | tee "$OUT/build.log"
elif "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "installed in $(( $(date +%s) - t0 )) s"
else
  echo "!! pip install failed after $(( $(date +%s) - t0 )) s; tail of build.log:"; tail -25 "$OUT/build.log"
  echo "!! running from the source tree instead (cuda backend rows will say why they are missing)"
  export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
shopt -s nullglob
[ "$DRY_RUN" = "1" ] || for whl in .whl/flashinfer*.whl; do
  "$PY" -m pip install --no-deps --no-index "$whl" >> "$OUT/build.log" 2>&1 && echo "installed $whl" || echo "!! $whl did not install"
done

echo "== tidar env"
"$PY" -m tidar env 2>&1 | tee "$OUT/tidar_env.txt" || true

left=$(( TOTAL - ($(date +%s) - t0) ))
scale=$("$PY" -c "print(max(0.05, min(1.0, ($left - 45) / 410)))")
echo "== benchmarks: ${left} s left, budget scale ${scale}"
# SIGTERM at the budget: the harness then writes the rows measured so far (SIGKILL 20 s later if it hangs)
timeout --kill-after=20 $(( left > 30 ? left - 20 : 10 )) "$PY" -m benchmarks --out "$OUT" --budget-scale "$scale" \
  "${DRY[@]}" "$@" \
  2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
echo "== done in $(( $(date +%s) - t0 )) s (rc $rc); results in $OUT"
exit "$rc"
