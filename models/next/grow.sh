#!/bin/bash
# v7 candidates of the bundled model (issue 23): v6 grown from 4 to 6 layers by block expansion
# (models/next/grow_depth.py: zeroed copies of layers 1 and 3, the same logits as v6 at step 0), then trained with
# v6's objective (hybrid, greedy self-distilled diffusion targets regenerated every 10 steps, acceptance weighting,
# unlikelihood on repeated 4-grams). In the background; its PID goes to /tmp/tidar_train.pid. Environment: THREADS
# (2), ALPHA (AR weight, 1.0), LR (peak, 5e-4), WARMUP (20), STEPS (1200), MIN_LR (ratio, 0.2), UL (0.3), SEED (3).
# The runs of the README: the first as the defaults; the second stage tried on it
# (STEPS=400 ALPHA=1.5 LR=2e-4 WARMUP=10 MIN_LR=0.3 UL=0.5 SEED=4, from runs/next-grow6); the second try
# (ALPHA=1.5 LR=3e-4 WARMUP=50, from runs/v6grow6).
#   python models/next/grow_depth.py models/tidar-python-tiny runs/v6grow6 --after 1 3
#   models/next/grow.sh MINUTES [INIT_MODEL] [OUTPUT] [extra tidar train options, e.g. --resume latest]
threads=2 init_default=runs/v6grow6 out_default=runs/next-grow6
recipe=(
    --batch-size 16 --seq-len 256 --block-size 16 --max-steps "${STEPS:-1200}" --lr "${LR:-5e-4}"
    --warmup-steps "${WARMUP:-20}" --min-lr-ratio "${MIN_LR:-0.2}" --seed "${SEED:-3}"
    --alpha "${ALPHA:-1.0}" --diffusion-target greedy --diffusion-weighting acceptance --distill-rows 8
    --distill-ratio 1.0 --distill-refresh 10 --distill-prompt-len 64
    --unlikelihood "${UL:-0.3}" --unlikelihood-ngram 4
    --save-every 100 --keep-checkpoints 2 --eval-every 300 --eval-batches 16 --eval-prompts 8 --eval-new-tokens 128
)
. "$(dirname "$0")/launch.sh"
