#!/bin/bash
# The v6 recipe of the bundled model (issue 23): v5 (the converted TiDAR model, in git history: mkdir runs/v5 and
# `git show f6cd83d:models/tidar-python-tiny/FILE > runs/v5/FILE` for each file of that folder) fine-tuned
# with the conversion's objective (hybrid, AR term 1.5:1, greedy self-distilled diffusion targets, acceptance
# weighting) plus a sequence-level unlikelihood term (--unlikelihood, Welleck et al. 2019) on the model's own greedy
# continuations, regenerated every 10 steps so they are what the model writes now: every token of a repeated 4-gram
# gets -log(1 - p_AR), so greedy decoding unlearns its loops while the drafter follows the new continuations.
# In the background; its PID goes to /tmp/tidar_train.pid. THREADS (default 2) sets its CPU threads, UL (default 0.3,
# v6's; the first try had 1.0) the unlikelihood weight.
#   UL=0.3 models/next/unlikelihood.sh MINUTES [INIT_MODEL] [OUTPUT] [extra tidar train options, e.g. --resume latest]
# (with --resume, INIT_MODEL is not read: the run continues from OUTPUT's checkpoint)
threads=2 init_default=runs/v5 out_default=runs/next-unlikelihood
recipe=(
    --batch-size 16 --seq-len 256 --block-size 16
    --max-steps 800 --lr 3e-4 --warmup-steps 20 --min-lr-ratio 0.2 --seed 2
    --alpha 1.5 --diffusion-target greedy --diffusion-weighting acceptance --distill-rows 8
    --distill-ratio 1.0 --distill-refresh 10 --distill-prompt-len 64
    --unlikelihood "${UL:-0.3}" --unlikelihood-ngram 4
    --save-every 100 --keep-checkpoints 3 --eval-every 100 --eval-batches 16 --eval-prompts 8 --eval-new-tokens 128
)
. "$(dirname "$0")/launch.sh"
