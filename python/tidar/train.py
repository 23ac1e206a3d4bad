"""``tidar train``: train a causal LM with the TiDAR hybrid objective (or, with ``--no-diffusion``, the AR-only
baseline) on ``TidarTrainer`` (Hugging Face ``Trainer``), one process or many, over a folder of text/code files or a
``.txt``/``.jsonl`` file; default corpus: the interpreter's standard library.

    tidar train --output runs/tiny --max-steps 600           # a fresh tiny Qwen2, hybrid, K=16, L=256
    tidar train --output runs/tiny --resume latest           # continue from the newest checkpoint
    tidar train --output runs/ar --max-steps 600 --no-diffusion
    tidar train --output runs/conv --init-from MODEL_DIR     # convert a saved HF causal LM (the paper's recipe)
    torchrun --nproc-per-node 2 -m tidar train ...           # data parallel (also: accelerate launch -m tidar train)

This module is the CLI and the run's orchestration; the Trainer subclass and the step loss are in
``tidar.trainer``, model folders and checkpoints in ``tidar.checkpoint``, the self-distilled targets in
``tidar.self_distill``. Importing it does not import ``transformers.Trainer``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from . import corpus as corpus_mod
from . import self_distill
from .checkpoint import (
    POOL_FILE,
    TIDAR_STATE_FILE,
    load_checkpoint,
    load_init_model,
    save_model_folder,
    settings_into_config,
)
from .hybrid_loss import hybrid_loss
from .patch import patch


def __getattr__(name):  # tidar.train.TidarTrainer / HybridLossMixin: the one class in tidar.trainer, imported on use
    if name in ("TidarTrainer", "HybridLossMixin"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------------
# Model, data, schedule


def model_config(args, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(1024, args.seq_len + 4 * args.block_size),
        tie_word_embeddings=True,
        initializer_range=0.02,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )


def build_model(args, tokenizer):
    from transformers import Qwen2ForCausalLM

    config = model_config(args, tokenizer)
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")


def lr_at(step, args):
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    from .trainer import lr_factor

    return args.lr * lr_factor(
        step, max_steps=args.max_steps, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio
    )


def batch_at(stream: torch.Tensor, step: int, args) -> torch.Tensor:
    """The training batch of ``step`` (``[batch, L]``), as the run reads it."""
    from .trainer import batch_starts

    L = args.seq_len
    return torch.stack(
        [stream[s : s + L] for s in batch_starts(len(stream), L, args.batch_size, args.seed, step)]
    ).long()


def eval_batches(stream: torch.Tensor, args):
    """Fixed, evenly spaced held-out windows (the same every evaluation)."""
    L, n = args.seq_len, args.eval_batches * args.batch_size
    count = max(1, (len(stream) - 1) // L)
    idx = sorted({int(i * count / n) for i in range(n)}) if count > n else list(range(count))
    rows = torch.stack([stream[i * L : (i + 1) * L] for i in idx]).long()
    return rows.split(args.batch_size)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def distinct_ngram_share(token_lists, n: int = 4) -> float:
    """Distinct n-grams / all n-grams over the given token lists (1.0 = no repeated n-gram; a looping text -> 0)."""
    seen, total = set(), 0
    for i, toks in enumerate(token_lists):
        grams = [tuple(toks[j : j + n]) for j in range(len(toks) - n + 1)]
        seen.update((i, g) for g in grams)
        total += len(grams)
    return len(seen) / total if total else float("nan")


@torch.no_grad()
def evaluate(
    model, tokenizer, heldout_stream, prompts, args, device, draft_lens=None, max_new_tokens=None, sampling=False
):
    """Held-out AR loss/perplexity, diffusion loss, TiDAR greedy tokens per forward on ``prompts`` with diffusion
    drafts only (and the share of distinct 4-grams of those greedy continuations); with ``sampling``, also with
    context (n-gram) drafts added and, diffusion drafts only, at temperature 1."""
    import tidar

    was_training = model.training
    model.eval()
    ar, diff, n = 0.0, 0.0, 0
    with _autocast(device):
        for x in eval_batches(heldout_stream, args):
            r = hybrid_loss(model, x.to(device), args.block_size)
            ar += float(r.ar_loss) * len(x)
            diff += float(r.diffusion_loss) * len(x)
            n += len(x)
    out = {"ar_loss": ar / n, "ar_perplexity": math.exp(ar / n), "diffusion_loss": diff / n}
    draft_lens = draft_lens or [args.draft_len]
    max_new = max_new_tokens or args.eval_new_tokens

    def mean(xs):
        return sum(xs) / len(xs)

    for K in draft_lens:
        tpf, texts, tpf_ctx, tpf_t1 = [], [], [], []
        for i, p in enumerate(prompts):
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            # the drafter alone (diffusion drafts, the paper's step); then generate's default, which may also
            # copy drafts from n-gram matches in the text (context drafts)
            res = tidar.generate(model, ids, max_new_tokens=max_new, draft_len=K, context_drafts=False)
            tpf.append(res.tokens_per_forward)
            texts.append(res.sequences[0, ids.shape[1] :].tolist())
            if sampling:
                res = tidar.generate(model, ids, max_new_tokens=max_new, draft_len=K, context_drafts=True)
                tpf_ctx.append(res.tokens_per_forward)
                g = torch.Generator(device).manual_seed(args.seed * 1000 + i)
                res = tidar.generate(
                    model, ids, max_new_tokens=max_new, draft_len=K, temperature=1.0, generator=g, context_drafts=False
                )
                tpf_t1.append(res.tokens_per_forward)
        if tpf:
            out[f"tokens_per_forward_k{K}"] = mean(tpf)
            out["distinct_4gram_share"] = distinct_ngram_share(texts)
        if tpf_ctx:
            out[f"tokens_per_forward_context_k{K}"] = mean(tpf_ctx)
        if tpf_t1:
            out[f"tokens_per_forward_t1_k{K}"] = mean(tpf_t1)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p):
    g = p.add_argument_group("data")
    g.add_argument(
        "--corpus",
        default=None,
        help='folder of text/code files, or a .txt (one document per line) / .jsonl ({"text": ...} per line) '
        "file (default: this Python's standard library)",
    )
    g.add_argument("--ext", nargs="+", default=[".py"], help="file extensions to read (default: .py)")
    g.add_argument("--heldout-percent", type=float, default=8.0, help="share of modules held out for evaluation")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--tokenizer", default=None, help="use this tokenizer folder instead of training one")
    g = p.add_argument_group("model (Qwen2)")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    g.add_argument("--intermediate-size", type=int, default=None, help="default: 3 x hidden")
    g = p.add_argument_group("objective and optimisation")
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
    g.add_argument("--max-minutes", type=float, default=None, help="stop (evaluate and save) after this wall time")
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (evaluate and save) after this step; the schedule still spans --max-steps",
    )
    g = p.add_argument_group("run")
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
        "--save-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the final model's weights (bf16 halves the folder; loading upcasts to fp32)",
    )


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
    if args.distill_rows is None:
        args.distill_rows = max(1, args.batch_size // 2)
    self_distill.check_options(
        args.diffusion_target,
        args.distill_ratio,
        args.distill_refresh,
        args.distill_prompt_len,
        args.seq_len,
        args.distill_rows,
        args.distill_temperature,
    )
    if args.distill_gen_batch < 1:
        raise ValueError(f"--distill-gen-batch must be >= 1, got {args.distill_gen_batch}")
    if args.no_diffusion and args.diffusion_target != "data":
        raise ValueError(
            f"--no-diffusion trains no diffusion term; --diffusion-target {args.diffusion_target} contradicts it"
        )
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


def _latest_checkpoint(output: Path):
    cks = sorted(
        (p for p in output.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if not cks:
        raise FileNotFoundError(f"--resume latest: no checkpoint-N folder in {output}")
    return cks[-1]


def write_demo_prompts(folder, tokenizer, corpus, n: int = 3):
    """``demo_prompts.json``: held-out prompts ``tidar demo`` completes (from modules/documents never trained on)."""
    prompts = corpus_mod.heldout_prompts(tokenizer, corpus, n)
    if corpus.root == corpus_mod.stdlib_dir():
        source = f"standard library of Python {platform.python_version()}"
    else:
        source = corpus.root.name
    data = {"source": source, "heldout_modules": corpus.heldout_modules, "prompts": prompts}
    (Path(folder) / "demo_prompts.json").write_text(json.dumps(data, indent=1))


def objective_name(args) -> str:
    if args.no_diffusion:
        return "ar"
    if args.diffusion_target == "greedy":
        return (
            f"hybrid(alpha={args.alpha}, diffusion_target=greedy, ratio={args.distill_ratio}, "
            f"refresh={args.distill_refresh}, temperature={args.distill_temperature})"
        )
    if args.diffusion_target != "data":
        return f"hybrid(alpha={args.alpha}, diffusion_target={args.diffusion_target})"
    return f"hybrid(alpha={args.alpha})"


MODEL_ARGS = ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "init_from")


def _check_resume(ck: Path, st: dict, model, args):
    """A checkpoint of another model is refused (before any step): the model options must match."""
    if not st or "args" not in st:
        raise ValueError(
            f"--resume {ck}: no {TIDAR_STATE_FILE} with the run's options: it is a model folder, "
            f"not a resumable tidar train checkpoint"
        )
    if not (ck / "optimizer.pt").is_file() or not (ck / "scheduler.pt").is_file():
        raise ValueError(f"--resume {ck} has no optimizer.pt/scheduler.pt of the Trainer: not a resumable checkpoint")
    saved = st["args"]
    diff = [k for k in MODEL_ARGS if k in saved and saved[k] != getattr(args, k)]
    if diff:
        raise ValueError(
            f"--resume {ck} is a checkpoint of another model: "
            + ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} there, {getattr(args, k)!r} here" for k in diff)
        )
    if not args.init_from and saved.get("init_from") is None:
        want = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "num_attention_heads": args.heads}
        got = {k: getattr(model.config, k, None) for k in want}
        if got != want:
            raise ValueError(f"--resume {ck} holds a model of shape {got}, the options say {want}")


def _load_data(args, corpus, tokenizer, log):
    t0 = time.time()
    train_stream = corpus_mod.encode_texts(tokenizer, corpus.train_texts())
    held_texts = corpus.heldout_texts()
    held_stream = corpus_mod.encode_texts(tokenizer, held_texts) if held_texts else train_stream[-args.seq_len * 8 :]
    if len(train_stream) <= args.seq_len:
        raise ValueError(f"the training split has {len(train_stream)} tokens, not more than --seq-len {args.seq_len}")
    if len(held_stream) < args.seq_len:
        raise ValueError(f"the held-out split has {len(held_stream)} tokens, fewer than --seq-len {args.seq_len}")
    n_train = len(corpus.train_docs) if corpus.train_docs is not None else len(corpus.train_files)
    log(
        f"corpus {corpus.root}: {n_train} train documents ({len(train_stream):,} tokens), held out: "
        f"{', '.join(corpus.heldout_modules[:3])}{' ...' if len(corpus.heldout_modules) > 3 else ''} "
        f"({len(held_stream):,} tokens); encoded in {time.time() - t0:.1f}s"
    )
    return train_stream, held_stream


def train(args, log=print) -> dict:
    """Train on ``TidarTrainer``. Returns the final state (options, loss and evaluation histories)."""
    from transformers import TrainingArguments

    from .trainer import RunCallback, RunLoss, TidarTrainer, WindowDataset, lr_factor

    check_args(args)
    main = _is_main()
    if not main:
        log = lambda s: None  # noqa: E731 - one process talks
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    t_setup = time.time()

    corpus = corpus_mod.find_corpus(args.corpus, args.ext, args.heldout_percent)
    state = {"log_history": [], "eval_history": []}
    ck = None
    if args.resume:
        ck = _latest_checkpoint(output) if args.resume == "latest" else Path(args.resume)
        model, tokenizer, st = load_checkpoint(ck, "cpu")
        _check_resume(ck, st, model, args)
        state = {"log_history": list(st.get("log_history", [])), "eval_history": list(st.get("eval_history", []))}
        elapsed0 = float(st.get("elapsed_s", 0.0))
        log(f"resuming from {ck} at step {st.get('step')}")
    elif args.init_from:
        model, tokenizer, how = load_init_model(args.init_from, "cpu")
        log(f"initialised from {args.init_from}: {how} (id {tokenizer.mask_token_id})")
        elapsed0 = 0.0
    else:
        if args.tokenizer:
            tokenizer = corpus_mod.load_tokenizer(args.tokenizer)
        else:
            t0 = time.time()
            tokenizer = corpus_mod.train_tokenizer(None, args.vocab_size, texts=corpus.train_texts())
            log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s")
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token ([MASK]); TiDAR needs one")
        model = build_model(args, tokenizer)
        elapsed0 = 0.0
    settings_into_config(model, draft_len=args.draft_len, block_size=args.block_size, objective=objective_name(args))
    patch(model, draft_len=args.draft_len, backend=args.backend)
    train_stream, held_stream = _load_data(args, corpus, tokenizer, log)
    prompts = corpus_mod.heldout_prompts(tokenizer, corpus, args.eval_prompts)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {type(model).__name__} {n_params / 1e6:.2f}M params; device {device}; "
        f"objective {objective_name(args)}; "
        f"K={args.block_size}, L={args.seq_len}, batch {args.batch_size} = {_world_size()} process(es) x "
        f"{args.grad_accum} accumulation x {args.batch_size // (_world_size() * args.grad_accum)} rows"
    )

    pool, n_data, n_gen = None, 0, 0
    if not args.no_diffusion and args.diffusion_target == "greedy":
        n_data, n_gen = self_distill.split_rows(args.distill_rows, args.distill_ratio)
        if n_gen:
            pool = self_distill.ContinuationPool(
                train_stream,
                size=n_gen * args.distill_refresh,
                prompt_len=args.distill_prompt_len,
                seq_len=args.seq_len,
                refresh=args.distill_refresh,
                seed=args.seed,
                temperature=args.distill_temperature,
                gen_batch_size=args.distill_gen_batch,
            )
            if ck is not None and (ck / POOL_FILE).is_file():
                pool.load_state_dict(torch.load(ck / POOL_FILE, weights_only=True))
        log(
            f"self-distillation: per step {args.batch_size} real rows (AR term), diffusion term on {n_data} real rows "
            f"(data targets) + {n_gen} generated rows ({args.distill_prompt_len} real + "
            f"{args.seq_len - args.distill_prompt_len} {'greedy' if args.distill_temperature == 0 else 'sampled'} "
            f"tokens, regenerated every {args.distill_refresh} steps)"
        )

    shards = _world_size() * args.grad_accum
    run_loss = RunLoss(
        seq_len=args.seq_len,
        batch=args.batch_size,
        block_size=args.block_size,
        alpha=args.alpha,
        no_diffusion=args.no_diffusion,
        target=args.diffusion_target,
        n_data=n_data,
        n_gen=n_gen,
        prompt_len=args.distill_prompt_len,
        pool=pool,
        shards=_world_size(),
    )
    dataset = WindowDataset(train_stream, args.seq_len, args.batch_size, args.seed, args.max_steps)
    targs = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=args.batch_size // shards,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=args.clip,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or args.max_steps,
        save_total_limit=args.keep_checkpoints,
        seed=args.seed,
        data_seed=args.seed,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,
    )
    factor = lambda s: lr_factor(
        s,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,  # noqa: E731
        min_lr_ratio=args.min_lr_ratio,
    )
    meta = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)},
        "params": n_params,
        "device": str(device),
        "torch": torch.__version__,
        "processes": _world_size(),
    }
    state.update(meta)
    evaluate_fn = lambda: evaluate(model, tokenizer, held_stream, prompts, args, device)  # noqa: E731
    callback = RunCallback(
        run_loss=run_loss,
        state=state,
        args=args,
        evaluate_fn=evaluate_fn,
        log=log,
        lr_at=lambda s: lr_at(s, args),
        main_process=main,
        pool=pool,
        elapsed0=elapsed0,
    )
    use_cache = getattr(model.config, "use_cache", True)  # the Trainer turns the KV cache default off for training
    trainer = TidarTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        block_size=args.block_size,
        alpha=None if args.no_diffusion else args.alpha,
        diffusion_target=args.diffusion_target,
        run_loss=run_loss,
        lr_lambda=factor,
        sequential=True,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress bar (on a terminal) and log lines replace HF's dicts
    if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and _zero3(trainer)):
        if args.eval_prompts:
            raise ValueError(
                "held-out TiDAR decoding (--eval-prompts > 0) is not supported under FSDP / DeepSpeed "
                "ZeRO-3 (the weights are sharded); pass --eval-prompts 0 and evaluate the saved model "
                "with tidar train --evaluate"
            )
    log(f"setup {time.time() - t_setup:.1f}s; training to step {args.max_steps}")
    try:
        trainer.train(resume_from_checkpoint=str(ck) if ck is not None else None)
    finally:
        callback.close_bar()
        model.config.use_cache = use_cache
    step = trainer.state.global_step
    final = callback.snapshot(step)
    if main:
        model = trainer.model
        ev = evaluate(model, tokenizer, held_stream, prompts, args, device)
        ev["step"] = step
        state["eval_history"].append(ev)
        log(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k != "step"))
        final = callback.snapshot(step)
        last = output / f"checkpoint-{step}"
        if last.is_dir():
            (last / TIDAR_STATE_FILE).write_text(json.dumps(final, indent=1))
        import tidar

        tidar.unpatch(model)
        save_model_folder(
            output, model, tokenizer, final, dtype=torch.bfloat16 if args.save_dtype == "bfloat16" else None
        )
        patch(model, draft_len=args.draft_len, backend=args.backend)
        write_demo_prompts(output, tokenizer, corpus)
        log(f"saved {output} (step {step}, {final['elapsed_s'] / 60:.1f} min of training)")
    return final


def _zero3(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(plugin) and getattr(plugin, "zero_stage", 0) == 3


def evaluate_folder(args) -> dict:
    """``--evaluate``: held-out AR perplexity, diffusion loss and TiDAR greedy tokens/forward of a saved model."""
    check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, _ = load_checkpoint(args.evaluate, device)
    patch(model, draft_len=args.draft_len, backend=args.backend)
    corpus = corpus_mod.find_corpus(args.corpus, args.ext, args.heldout_percent)
    held = corpus_mod.encode_texts(tokenizer, corpus.heldout_texts())
    prompts = corpus_mod.heldout_prompts(tokenizer, corpus, args.eval_prompts)
    t0 = time.time()
    res = evaluate(
        model,
        tokenizer,
        held,
        prompts,
        args,
        device,
        args.eval_draft_lens or [4, 8, 16],
        args.eval_new_tokens,
        sampling=args.eval_sampling,
    )
    res.update(
        model=str(args.evaluate),
        prompts=len(prompts),
        new_tokens=args.eval_new_tokens,
        heldout_tokens_scored=min(len(held) // args.seq_len, args.eval_batches * args.batch_size) * args.seq_len,
        heldout_modules=corpus.heldout_modules,
        device=str(device),
        eval_s=round(time.time() - t0, 1),
    )
    return res


def run(args) -> int:
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
    return 0


__all__ = ["add_arguments", "build_model", "evaluate", "load_checkpoint", "run", "train"]
