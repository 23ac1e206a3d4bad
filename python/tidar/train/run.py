"""``tidar train``: train a causal LM with the TiDAR hybrid objective (or, with ``--no-diffusion``, the AR-only
baseline) on ``TidarTrainer`` (Hugging Face ``Trainer``), one process or many, over a folder of text/code files or a
``.txt``/``.jsonl`` file; default corpus: the interpreter's standard library.

    tidar train --output runs/tiny --max-steps 600           # a fresh tiny Qwen2, hybrid, K=16, L=256
    tidar train --output runs/tiny --resume latest           # continue from the newest checkpoint
    tidar train --output runs/ar --max-steps 600 --no-diffusion
    tidar train --output runs/conv --init-from MODEL_DIR     # convert a saved HF causal LM (the paper's recipe)
    torchrun --nproc-per-node 2 -m tidar train ...           # data parallel (also: accelerate launch -m tidar train)

This module is the CLI and the run's orchestration; the Trainer subclass and the step loss are in
``tidar.train.trainer``, model folders and checkpoints in ``tidar.train.checkpoint``, the self-distilled targets in
``tidar.train.self_distill``. Importing it does not import ``transformers.Trainer``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from tidar.patching import patch, unpatch
from tidar.train import corpus as corpus_mod
from tidar.train import self_distill
from tidar.train.args import _world_size, check_args
from tidar.train.checkpoint import (
    POOL_FILE,
    TIDAR_STATE_FILE,
    load_checkpoint,
    load_init_model,
    load_tokenizer,
    save_model_folder,
    settings_into_config,
)
from tidar.train.evaluation import evaluate


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
    from tidar.train.trainer import lr_factor

    return args.lr * lr_factor(
        step, max_steps=args.max_steps, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio
    )


# ----------------------------------------------------------------------------------------------------
# CLI


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
    if corpus.manifest is not None:
        source = f"standard library of Python {platform.python_version()} + site-packages (corpus_manifest.json)"
    elif corpus.root == corpus_mod.stdlib_dir():
        source = f"standard library of Python {platform.python_version()}"
    else:
        source = corpus.root.name
    data = {"source": source, "heldout_modules": corpus.heldout_modules, "prompts": prompts}
    (Path(folder) / "demo_prompts.json").write_text(json.dumps(data, indent=1))


def objective_name(args) -> str:
    if args.no_diffusion:
        return "ar"
    w = "" if args.diffusion_weighting == "uniform" else f", weighting={args.diffusion_weighting}"
    if args.diffusion_target == "greedy":
        return (
            f"hybrid(alpha={args.alpha}, diffusion_target=greedy, ratio={args.distill_ratio}, "
            f"refresh={args.distill_refresh}, temperature={args.distill_temperature}{w}{_greedy_terms_name(args)})"
        )
    if args.diffusion_target != "data":
        return f"hybrid(alpha={args.alpha}, diffusion_target={args.diffusion_target}{w})"
    return f"hybrid(alpha={args.alpha}{w})"


def _greedy_terms_name(args) -> str:
    teacher = "" if args.ar_teacher is None else f", ar_teacher={args.ar_teacher}, kl={args.ar_teacher_weight}"
    if not args.unlikelihood:
        return teacher
    return f", unlikelihood={args.unlikelihood}, ngram={args.unlikelihood_ngram}{teacher}"


MODEL_ARGS = ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "init_from")


def corpus_from_args(args):
    """--site-packages: the stdlib + installed packages (``find_code_corpus``); else --corpus (default: stdlib)."""
    if getattr(args, "site_packages", False):
        return corpus_mod.find_code_corpus(args.exclude_packages, args.ext, args.heldout_percent)
    return corpus_mod.find_corpus(args.corpus, args.ext, args.heldout_percent)


def _check_resume_corpus(ck: Path, st: dict, corpus, args):
    """A run resumed on another corpus would read other batches: refused unless --allow-corpus-change."""
    saved = (st.get("corpus") or {}).get("digest")
    now = (corpus.manifest or {}).get("digest")
    if saved == now or args.allow_corpus_change:
        return
    old = {(p["name"], p["version"]) for p in (st.get("corpus") or {}).get("packages", [])}
    new = {(p["name"], p["version"]) for p in (corpus.manifest or {}).get("packages", [])}
    what = ", ".join(f"{n} {v}" for n, v in sorted(old ^ new)) or "the same packages, other files"
    raise ValueError(
        f"--resume {ck}: the corpus differs from the checkpoint's (digest {saved} there, {now} here; differs in: "
        f"{what}); pass --allow-corpus-change to continue on this corpus anyway"
    )


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
    # a run started with --init-from resumes without it (the two options exclude each other): its weights come from
    # the checkpoint, and the checkpoint's --init-from is carried on so the next resume sees the same record
    if args.init_from is None and saved.get("init_from") is not None:
        args.init_from = saved["init_from"]
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
    from tidar.train.trainer import RunCallback

    check_args(args)
    main = _is_main()
    if not main:
        log = lambda s: None  # noqa: E731 - one process talks
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    t_setup = time.time()

    corpus = corpus_from_args(args)
    model, tokenizer, state, ck, elapsed0 = _start_model(args, output, corpus, log)
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
    pool, n_data, n_gen = _distill_pool(args, train_stream, ck, log)
    teacher = _teacher(args, model, device, log)
    run_loss = _run_loss(args, pool, n_data, n_gen, teacher)
    dataset, targs = _trainer_inputs(args, train_stream, output, device)
    state.update(_run_meta(args, n_params, device))
    _record_corpus(state, corpus, output, main)
    callback = RunCallback(
        run_loss=run_loss,
        state=state,
        args=args,
        evaluate_fn=lambda: evaluate(model, tokenizer, held_stream, prompts, args, device),
        log=log,
        lr_at=lambda s: lr_at(s, args),
        main_process=main,
        pool=pool,
        elapsed0=elapsed0,
    )
    use_cache = getattr(model.config, "use_cache", True)  # the Trainer turns the KV cache default off for training
    trainer = _build_trainer(args, model, tokenizer, dataset, targs, run_loss, callback)
    log(f"setup {time.time() - t_setup:.1f}s; training to step {args.max_steps}")
    try:
        trainer.train(resume_from_checkpoint=str(ck) if ck is not None else None)
    finally:
        callback.close_bar()
        model.config.use_cache = use_cache
    step = trainer.state.global_step
    final = callback.snapshot(step)
    if main:
        final = _finish_run(
            args, trainer, tokenizer, corpus, held_stream, prompts, state, callback, output, device, log
        )
    return final


# ----------------------------------------------------------------------------------------------------
# The phases of a run


def _start_model(args, output: Path, corpus, log):
    """(model, tokenizer, state, checkpoint or None, elapsed seconds before this run): resumed from a checkpoint
    (checked against the options and the corpus), converted from --init-from, or a fresh Qwen2."""
    if args.resume:
        ck = _latest_checkpoint(output) if args.resume == "latest" else Path(args.resume)
        model, tokenizer, st = load_checkpoint(ck, "cpu")
        _check_resume(ck, st, model, args)
        _check_resume_corpus(ck, st, corpus, args)
        state = {"log_history": list(st.get("log_history", [])), "eval_history": list(st.get("eval_history", []))}
        log(f"resuming from {ck} at step {st.get('step')}")
        return model, tokenizer, state, ck, float(st.get("elapsed_s", 0.0))
    state = {"log_history": [], "eval_history": []}
    if args.init_from:
        model, tokenizer, how = load_init_model(args.init_from, "cpu")
        log(f"initialised from {args.init_from}: {how} (id {tokenizer.mask_token_id})")
        return model, tokenizer, state, None, 0.0
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        t0 = time.time()
        tokenizer = corpus_mod.train_tokenizer(None, args.vocab_size, texts=corpus.train_texts())
        log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s")
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token ([MASK]); TiDAR needs one")
    return build_model(args, tokenizer), tokenizer, state, None, 0.0


def _distill_pool(args, train_stream, ck, log):
    """(pool, n_data, n_gen) of --diffusion-target greedy (the pool restored from a resumed checkpoint); else
    (None, 0, 0)."""
    if args.no_diffusion or args.diffusion_target != "greedy":
        return None, 0, 0
    pool = None
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
    return pool, n_data, n_gen


def _teacher(args, model, device, log):
    """--ar-teacher: the frozen model whose AR distributions anchor the student's (None without the option)."""
    if args.ar_teacher is None:
        return None
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.ar_teacher, dtype=torch.float32, local_files_only=True)
    v_t, v_s = teacher.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]
    if v_t != v_s:
        raise ValueError(
            f"--ar-teacher {args.ar_teacher} has {v_t} output tokens, the trained model {v_s}; "
            "give a teacher of the same vocabulary"
        )
    teacher.requires_grad_(False).eval().to(device)
    log(f"AR teacher: {args.ar_teacher} (frozen), KL weight {args.ar_teacher_weight}")
    return teacher


def _run_loss(args, pool, n_data: int, n_gen: int, teacher=None):
    from tidar.train.trainer import RunLoss

    return RunLoss(
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
        weighting=args.diffusion_weighting,
        unlikelihood=args.unlikelihood,
        unlikelihood_ngram=args.unlikelihood_ngram,
        teacher=teacher,
        teacher_weight=args.ar_teacher_weight,
    )


def _trainer_inputs(args, train_stream, output: Path, device):
    """The deterministic window dataset and the ``TrainingArguments`` the options translate to."""
    from transformers import TrainingArguments

    from tidar.train.trainer import WindowDataset

    shards = _world_size() * args.grad_accum
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
    return dataset, targs


def _run_meta(args, n_params: int, device) -> dict:
    """What the run's state records besides its histories: the options (as given), model size and machine."""
    return {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)},
        "params": n_params,
        "device": str(device),
        "torch": torch.__version__,
        "processes": _world_size(),
    }


def _record_corpus(state: dict, corpus, output: Path, main: bool) -> None:
    """A --site-packages corpus's manifest goes into the state (a resume compares it) and corpus_manifest.json."""
    if corpus.manifest is None:
        return
    state["corpus"] = corpus.manifest
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "corpus_manifest.json").write_text(json.dumps(corpus.manifest, indent=1))


def _lr_lambda(args):
    """The schedule's factor of the step (a plain function: the scheduler's state_dict then stores nothing of it)."""
    from tidar.train.trainer import lr_factor

    def factor(step):
        return lr_factor(step, max_steps=args.max_steps, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio)

    return factor


def _build_trainer(args, model, tokenizer, dataset, targs, run_loss, callback):
    """``TidarTrainer`` with the run's loss, schedule and callback (HF's printer removed); held-out decoding is
    refused up front under sharded weights."""
    from transformers.trainer_callback import PrinterCallback

    from tidar.train.trainer import TidarTrainer

    trainer = TidarTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        block_size=args.block_size,
        alpha=None if args.no_diffusion else args.alpha,
        diffusion_target=args.diffusion_target,
        diffusion_weighting=args.diffusion_weighting,
        run_loss=run_loss,
        lr_lambda=_lr_lambda(args),
        sequential=True,
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar (on a terminal) and log lines replace HF's dicts
    if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and _zero3(trainer)):
        if args.eval_prompts:
            raise ValueError(
                "held-out TiDAR decoding (--eval-prompts > 0) is not supported under FSDP / DeepSpeed "
                "ZeRO-3 (the weights are sharded); pass --eval-prompts 0 and evaluate the saved model "
                "with tidar train --evaluate"
            )
    return trainer


def _finish_run(args, trainer, tokenizer, corpus, held_stream, prompts, state, callback, output, device, log) -> dict:
    """Main process, after the last step: the final evaluation, the last checkpoint's state updated with it, the
    final model folder (unpatched weights) and its demo prompts. Returns the final state."""
    step = trainer.state.global_step
    model = trainer.model
    ev = evaluate(model, tokenizer, held_stream, prompts, args, device)
    ev["step"] = step
    state["eval_history"].append(ev)
    log(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k != "step"))
    final = callback.snapshot(step)
    last = output / f"checkpoint-{step}"
    if last.is_dir():
        (last / TIDAR_STATE_FILE).write_text(json.dumps(final, indent=1))
    unpatch(model)
    save_model_folder(output, model, tokenizer, final, dtype=torch.bfloat16 if args.save_dtype == "bfloat16" else None)
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
    if args.card:
        from tidar.train.card import card_evaluation

        return dict(card_evaluation(model, tokenizer, args, device), model=str(args.evaluate), device=str(device))
    corpus = corpus_from_args(args)
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


__all__ = ["build_model", "evaluate_folder", "train"]
