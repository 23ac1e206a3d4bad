#!/usr/bin/env bash
# v6 retrained with diffusion blocks of 4 (not 16): four times the first- and second-slot examples per row for
# the same compute, the slots a CPU step verifies; the AR head anchored to v6 (--ar-teacher) so its text stays v6's.
# usage: models/next/blocks4.sh MINUTES [INIT] [OUT] [extra tidar-train options, e.g. --resume latest]
threads=2 init_default=models/tidar-python-tiny out_default=runs/next-blocks4
recipe=(
    --batch-size 16 --seq-len 256 --block-size 4 --draft-len 16 --max-steps "${STEPS:-1200}" --lr "${LR:-3e-4}"
    --warmup-steps "${WARMUP:-20}" --min-lr-ratio "${MIN_LR:-0.2}" --seed "${SEED:-7}"
    --alpha "${ALPHA:-1.5}" --diffusion-target greedy --diffusion-weighting acceptance --distill-rows 8
    --distill-ratio 1.0 --distill-refresh 10 --distill-prompt-len 64
    --unlikelihood "${UL:-0.3}" --unlikelihood-ngram 4
    --ar-teacher "${TEACHER:-models/tidar-python-tiny}" --ar-teacher-weight "${KLW:-1.0}"
    --save-every 100 --keep-checkpoints 2 --eval-every 300 --eval-batches 16 --eval-prompts 8 --eval-new-tokens 128
)
. "$(dirname "$0")/launch.sh"
