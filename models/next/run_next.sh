#!/bin/bash
# The AR pretraining of the next bundled model (issue 23), in the background, one thread; its PID goes to
# /tmp/tidar_train.pid (others pause it with SIGSTOP / SIGCONT during timing runs).
#   models/next/run_next.sh MINUTES                 # a fresh run into runs/next
#   models/next/run_next.sh MINUTES --resume latest # continue runs/next from its newest checkpoint
#   models/next/run_next.sh MINUTES --resume models/next/checkpoint   # continue from the committed checkpoint
# End it early with a checkpoint: `touch runs/next/STOP` (or `kill $(cat /tmp/tidar_train.pid)`, SIGTERM): the run
# finishes its step, saves runs/next/checkpoint-N and exits; then pack_checkpoint.py it into models/next/checkpoint.
set -e
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
minutes=$1
shift
mkdir -p runs
nohup python -m tidar train --output runs/next --site-packages --no-diffusion --tokenizer models/tidar-python-tiny \
    --hidden-size 256 --layers 4 --heads 4 --batch-size 16 --seq-len 256 \
    --max-steps 10000 --lr 2e-3 --warmup-steps 200 --min-lr-ratio 0.1 \
    --save-every 500 --keep-checkpoints 2 --eval-every 500 --eval-batches 16 --eval-prompts 1 --eval-new-tokens 32 \
    --log-every 50 --device cpu --max-minutes "$minutes" "$@" >> runs/next.log 2>&1 &
echo $! > /tmp/tidar_train.pid
echo "started PID $! (log: runs/next.log)"
