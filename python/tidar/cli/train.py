"""``tidar train``: the options (``tidar.train.args``) and the run (``tidar.train.run``) behind one subcommand."""

from __future__ import annotations

import json
import os
import sys

import torch

from tidar.train.args import add_arguments
from tidar.train.run import evaluate_folder, train


def run(args) -> int:
    if os.environ.get("OMP_NUM_THREADS"):  # tokenizers' thread pool follows the thread budget torch gets
        os.environ.setdefault("RAYON_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        if args.evaluate:
            print(json.dumps(evaluate_folder(args), indent=1))
            return 0
        train(args, log=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as e:
        print(f"tidar train: error: {e}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Destroy the process group a distributed launch (torchrun, accelerate) made, before the interpreter exits: left
    to interpreter teardown, gloo's worker threads can abort the process ("terminate called without an active
    exception", SIGABRT) after a run that succeeded (pytorch/pytorch#190489)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["add_arguments", "run"]
