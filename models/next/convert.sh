#!/bin/bash
# The conversion recipe of the next bundled model (issue 23), run once the AR pretraining (run_next.sh) is done:
# the AR checkpoint becomes a TiDAR model with the recipe measured for v4 (docs/design.md §1.4, the v4 card):
# hybrid objective with the AR term weighted 1.5:1, diffusion targets from the model's own greedy continuations
# (self-distillation, refreshed every 100 steps), acceptance weighting. In the background, one thread; its PID goes
# to /tmp/tidar_train.pid like the pretraining's. THREADS (default 1) sets its CPU threads: 2 on an otherwise idle
# 2-core machine is about 1.6x faster.
#   models/next/convert.sh MINUTES AR_CHECKPOINT [OUTPUT] [extra tidar train options, e.g. --resume latest]
# (with --resume, AR_CHECKPOINT is not read: the run continues from OUTPUT's checkpoint)
threads=1 init_default= out_default=runs/next-convert
recipe=(
    --batch-size 16 --seq-len 256 --block-size 16
    --max-steps 1500 --lr 5e-4 --warmup-steps 20 --min-lr-ratio 0.2 --seed 1
    --alpha 1.5 --diffusion-target greedy --diffusion-weighting acceptance --distill-rows 4
    --distill-ratio 1.0 --distill-refresh 100 --distill-prompt-len 64
    --save-every 200 --keep-checkpoints 3 --eval-every 200 --eval-batches 16 --eval-prompts 4 --eval-new-tokens 64
)
. "$(dirname "$0")/launch.sh"
