# Sourced by the fine-tuning recipes of this folder (convert.sh, unlikelihood.sh, drafter.sh, grow.sh, blocks4.sh),
# which set
#   threads       default CPU threads (THREADS overrides)
#   init_default  the model to start from when the caller gives none (empty: the caller must give one)
#   out_default   the run's folder when the caller gives none
#   recipe        their `tidar train` options (an array)
# and take `MINUTES [INIT_MODEL] [OUTPUT] [extra tidar train options, e.g. --resume latest]`. Starts the run in the
# background (its PID in /tmp/tidar_train.pid, its log in OUTPUT.log); with --resume, INIT_MODEL is not read: the run
# continues from OUTPUT's checkpoint.
set -e
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=${THREADS:-$threads} RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
minutes=$1
init=${2:-$init_default}
out=${3:-$out_default}
shift 3 || shift $#
mkdir -p runs
start=(--init-from "$init")
[[ " $* " == *" --resume "* ]] && start=()  # a resumed run takes its weights from its checkpoint
nohup python -m tidar train --output "$out" "${start[@]}" --site-packages "${recipe[@]}" \
    --log-every 10 --device cpu --max-minutes "$minutes" "$@" >> "$out.log" 2>&1 &
echo $! > /tmp/tidar_train.pid
echo "started PID $! (log: $out.log)"
