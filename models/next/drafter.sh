#!/bin/bash
# Stage 2 of the v6 recipe (issue 23): after models/next/unlikelihood.sh, the drafter catches up with the new greedy
# text. The same objective with the diffusion term weighted more (alpha 0.5: AR 1/3, diffusion 2/3), every row of
# the step also a generated row for the diffusion term (16 rows of 64 real + 192 greedy tokens, regenerated every 20
# steps), and a lighter unlikelihood term (0.5) so greedy decoding does not drift back to its loops.
# In the background; its PID goes to /tmp/tidar_train.pid. THREADS (default 2) sets its CPU threads.
#   models/next/drafter.sh MINUTES [INIT_MODEL] [OUTPUT] [extra tidar train options, e.g. --resume latest]
threads=2 init_default=runs/next-unlikelihood out_default=runs/next-drafter
recipe=(
    --batch-size 16 --seq-len 256 --block-size 16
    --max-steps 300 --lr 2e-4 --warmup-steps 10 --min-lr-ratio 0.2 --seed 3
    --alpha 0.5 --diffusion-target greedy --diffusion-weighting acceptance --distill-rows 16
    --distill-ratio 1.0 --distill-refresh 20 --distill-prompt-len 64
    --unlikelihood 0.5 --unlikelihood-ngram 4
    --save-every 100 --keep-checkpoints 3 --eval-every 100 --eval-batches 16 --eval-prompts 8 --eval-new-tokens 128
)
. "$(dirname "$0")/launch.sh"
