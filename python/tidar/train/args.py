"""``tidar train``'s options: the argument parser and the checks that run before any training step (each bad
value is an error naming its option)."""

from __future__ import annotations

import os
from pathlib import Path

from tidar.train import self_distill
from tidar.train.objective import DIFFUSION_WEIGHTINGS


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def add_arguments(p):
    """Every option of ``tidar train``, in four help groups (data, model, objective and optimisation, run)."""
    _add_data_options(p.add_argument_group("data"))
    _add_model_options(p.add_argument_group("model (Qwen2)"))
    g = p.add_argument_group("objective and optimisation")
    _add_objective_options(g)
    _add_distill_options(g)
    _add_optimisation_options(g)
    g = p.add_argument_group("run")
    _add_run_options(g)
    _add_saved_model_options(g)


def _add_data_options(g):
    """The corpus, its held-out split and the tokenizer."""
    g.add_argument(
        "--corpus",
        default=None,
        help='folder of text/code files, or a .txt (one document per line) / .jsonl ({"text": ...} per line) '
        "file (default: this Python's standard library)",
    )
    g.add_argument(
        "--site-packages",
        action="store_true",
        help="the standard library plus the Python sources of the packages installed in this interpreter's "
        "site-packages (de-duplicated, permissive licences only, --exclude-packages left out; a "
        "corpus_manifest.json lists them) instead of --corpus",
    )
    g.add_argument(
        "--exclude-packages",
        nargs="*",
        default=["torch", "transformers"],
        help="--site-packages: distributions left out of the corpus (default: torch transformers, held out for "
        "evaluation)",
    )
    g.add_argument(
        "--allow-corpus-change",
        action="store_true",
        help="--resume even if the corpus differs from the one the checkpoint was trained on (other files or "
        "package versions; the batches then differ from the original run's)",
    )
    g.add_argument("--ext", nargs="+", default=[".py"], help="file extensions to read (default: .py)")
    g.add_argument("--heldout-percent", type=float, default=8.0, help="share of modules held out for evaluation")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--tokenizer", default=None, help="use this tokenizer folder instead of training one")


def _add_model_options(g):
    """The shape of a fresh model (ignored with --init-from and checked against the checkpoint with --resume)."""
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    g.add_argument("--intermediate-size", type=int, default=None, help="default: 3 x hidden")


def _add_objective_options(g):
    """Row and block lengths and the hybrid loss (AR weight, diffusion target and weighting)."""
    g.add_argument("--seq-len", type=int, default=256, help="L, clean tokens per row (a multiple of --block-size)")
    g.add_argument("--block-size", type=int, default=16, help="K, the diffusion block length")
    g.add_argument(
        "--draft-len", type=int, default=None, help="draft length saved in the config (default: --block-size)"
    )
    g.add_argument("--alpha", type=float, default=1.0, help="AR weight: (alpha*AR + diffusion) / (1 + alpha)")
    g.add_argument("--no-diffusion", action="store_true", help="AR-only baseline: train the AR term alone")
    g.add_argument(
        "--diffusion-target",
        default="data",
        choices=None,
        help="what the mask half learns (docs/design.md §3.1): data (the paper), ar-hard / ar-soft (teacher-forced: "
        "the AR head's argmax / distribution at the same position, detached), greedy (the model's own "
        "continuations of real prompts, regenerated every --distill-refresh steps)",
    )
    g.add_argument(
        "--diffusion-weighting",
        default="uniform",
        help="uniform (every mask slot counts once, the paper) or acceptance (slot j of a block weighted by the "
        "model's detached probability of the block's targets before j: the term goes where drafts get accepted)",
    )


def _add_distill_options(g):
    """--diffusion-target greedy: the self-distilled continuations (errors with any other target)."""
    g.add_argument(
        "--distill-rows",
        type=int,
        default=None,
        help="greedy target: rows carrying the diffusion term per step (default: --batch-size // 2); "
        "the AR term always uses the --batch-size real rows",
    )
    g.add_argument(
        "--distill-ratio",
        type=float,
        default=1.0,
        help="greedy target: share of the --distill-rows that are generated continuations (the rest: real "
        "rows with data targets)",
    )
    g.add_argument(
        "--distill-refresh", type=int, default=100, help="greedy target: regenerate the continuations every N steps"
    )
    g.add_argument(
        "--distill-prompt-len",
        type=int,
        default=64,
        help="greedy target: real tokens before the continuation (no diffusion loss on them)",
    )
    g.add_argument(
        "--distill-temperature",
        type=float,
        default=0.0,
        help="greedy target: 0 = greedy continuations; > 0 = sampled at this temperature",
    )
    g.add_argument("--distill-gen-batch", type=int, default=64, help="greedy target: rows generated at once")
    g.add_argument(
        "--unlikelihood",
        type=float,
        default=0.0,
        help="greedy target: weight of a sequence-level unlikelihood term (Welleck et al. 2019) on the generated "
        "rows: -log(1 - p_AR) of every token of an n-gram the continuation repeats, so greedy decoding unlearns its "
        "loops (0 = off; refresh the continuations often, e.g. --distill-refresh 10, so they are the model's own)",
    )
    g.add_argument(
        "--unlikelihood-ngram", type=int, default=4, help="--unlikelihood: the repeated n-grams it penalises"
    )
    g.add_argument(
        "--ar-teacher",
        default=None,
        help="greedy target: a model folder (e.g. the --init-from model) whose next-token distributions anchor the AR "
        "head: KL(teacher || model) at every position of the real and the generated rows, weighted by "
        "--ar-teacher-weight (the teacher is frozen; same vocabulary)",
    )
    g.add_argument("--ar-teacher-weight", type=float, default=1.0, help="--ar-teacher: weight of the KL term (> 0)")


def _add_optimisation_options(g):
    """Batch, optimizer, schedule and when to stop."""
    g.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="rows per optimizer step (the global batch, split over processes and --grad-accum)",
    )
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop (evaluate and save) after this wall time; a STOP file in --output or a SIGTERM also ends the run "
        "after the current step with a checkpoint (resume with --resume latest)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (evaluate and save) after this step; the schedule still spans --max-steps",
    )


def _add_run_options(g):
    """Where the run writes, how it starts (fresh, --init-from, --resume), and its log/eval/checkpoint cadence."""
    g.add_argument("--output", default="tidar-run", help="output folder (final model + checkpoint-N folders)")
    g.add_argument(
        "--init-from",
        default=None,
        metavar="MODEL_DIR",
        help="start from this saved causal LM (weights + tokenizer; e.g. an AR-only run: the conversion recipe) "
        "instead of a fresh model; the model-shape options are then ignored",
    )
    g.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'latest' (newest in --output)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--backend", default="auto", help="tidar_attention backend")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=200)
    g.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    g.add_argument("--eval-prompts", type=int, default=2, help="held-out prompts for tokens/forward")
    g.add_argument("--eval-new-tokens", type=int, default=64)
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--keep-checkpoints", type=int, default=2)


def _add_saved_model_options(g):
    """--evaluate (a saved model, no training) and the dtype of the final model folder."""
    g.add_argument(
        "--evaluate",
        default=None,
        metavar="MODEL_DIR",
        help="only evaluate MODEL_DIR on the held-out split (uses --eval-*, --seq-len, --block-size) and print JSON",
    )
    g.add_argument(
        "--eval-draft-lens", type=int, nargs="+", default=None, help="draft lengths for --evaluate (default 4 8 16)"
    )
    g.add_argument(
        "--eval-sampling",
        action="store_true",
        help="--evaluate also measures tokens per forward with context (n-gram) drafts and at temperature 1 "
        "(sampled, seed --seed)",
    )
    g.add_argument(
        "--card",
        action="store_true",
        help="--evaluate measures the model card's table instead: held-out stdlib modules, torch/transformers "
        "sources and the ordinary code prompts (tidar/train/card.py), the same sets whatever the model trained on",
    )
    g.add_argument(
        "--save-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the final model's weights (bf16 halves the folder; loading upcasts to fp32)",
    )


DISTILL_OPTIONS = (
    "distill_rows",
    "distill_ratio",
    "distill_refresh",
    "distill_prompt_len",
    "distill_temperature",
    "unlikelihood",
    "unlikelihood_ngram",
    "ar_teacher",
)


def _check_distill_options_apply(args):
    """The --distill-* options only shape --diffusion-target greedy: given with another target they would be
    ignored without a word, so they are an error (names as on the command line)."""
    if args.diffusion_target == "greedy":
        return
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    given = [n for n in DISTILL_OPTIONS if getattr(args, n, None) != p.get_default(n)]
    if given:
        opts = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(f"{opts} only apply to --diffusion-target greedy, not {args.diffusion_target}")


def check_args(args):
    for name in ("seq_len", "block_size", "batch_size", "max_steps", "vocab_size", "hidden_size", "layers", "heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len % args.block_size:
        raise ValueError(f"--seq-len {args.seq_len} is not a multiple of --block-size {args.block_size}")
    if args.hidden_size % args.heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")
    if args.draft_len is None:
        args.draft_len = args.block_size
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError("--max-minutes must be > 0")
    _check_distill_options_apply(args)
    if args.distill_rows is None and args.diffusion_target == "greedy":
        args.distill_rows = max(1, args.batch_size // 2)
    self_distill.check_options(
        args.diffusion_target,
        args.distill_ratio,
        args.distill_refresh,
        args.distill_prompt_len,
        args.seq_len,
        0 if args.distill_rows is None else args.distill_rows,
        args.distill_temperature,
    )
    if args.distill_gen_batch < 1:
        raise ValueError(f"--distill-gen-batch must be >= 1, got {args.distill_gen_batch}")
    if not 0.0 <= args.unlikelihood < float("inf"):
        raise ValueError(f"--unlikelihood must be a finite number >= 0, got {args.unlikelihood}")
    if args.unlikelihood_ngram < 1:
        raise ValueError(f"--unlikelihood-ngram must be >= 1, got {args.unlikelihood_ngram}")
    if args.ar_teacher is not None and not (0.0 < args.ar_teacher_weight < float("inf")):
        raise ValueError(f"--ar-teacher-weight must be a finite number > 0, got {args.ar_teacher_weight}")
    if args.ar_teacher is not None and not Path(args.ar_teacher).is_dir():
        raise ValueError(f"--ar-teacher must be a model folder, got {args.ar_teacher!r} (no such folder)")
    if args.ar_teacher is not None and not (Path(args.ar_teacher) / "config.json").is_file():
        raise ValueError(f"--ar-teacher {args.ar_teacher!r} is not a saved Hugging Face model: no config.json")
    if args.unlikelihood and self_distill.split_rows(args.distill_rows, args.distill_ratio)[1] == 0:
        raise ValueError("--unlikelihood needs generated rows: --distill-ratio > 0 and --distill-rows >= 1")
    if args.diffusion_weighting not in DIFFUSION_WEIGHTINGS:
        raise ValueError(
            f"--diffusion-weighting must be one of {', '.join(DIFFUSION_WEIGHTINGS)}, got {args.diffusion_weighting!r}"
        )
    if args.no_diffusion and args.diffusion_weighting != "uniform":
        raise ValueError(
            f"--no-diffusion trains no diffusion term; --diffusion-weighting {args.diffusion_weighting} contradicts it"
        )
    if args.no_diffusion and args.diffusion_target != "data":
        raise ValueError(
            f"--no-diffusion trains no diffusion term; --diffusion-target {args.diffusion_target} contradicts it"
        )
    if args.site_packages and args.corpus:
        raise ValueError("--site-packages builds its own corpus (stdlib + site-packages); do not also give --corpus")
    if args.init_from and args.resume:
        raise ValueError("--init-from starts a new run and --resume continues one; give only one")
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    shards = _world_size() * args.grad_accum
    if args.batch_size % shards:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of processes x --grad-accum = {shards}")
    if args.diffusion_target == "greedy" and args.distill_rows > args.batch_size:
        raise ValueError(f"--distill-rows {args.distill_rows} must be <= --batch-size {args.batch_size}")
    for name in ("log_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
