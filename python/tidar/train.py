"""``tidar train``: train a small causal LM with the TiDAR hybrid objective (or, with ``--no-diffusion``,
the AR-only baseline) over a folder of text/code files; default corpus: the interpreter's standard library.

    tidar train --output runs/tiny --max-steps 600           # hybrid, K=16, L=256
    tidar train --output runs/tiny --resume latest           # continue from the newest checkpoint
    tidar train --output runs/ar --max-steps 600 --no-diffusion

For multi-GPU training with Hugging Face ``Trainer`` (accelerate/torchrun/FSDP), use ``tidar.train.TidarTrainer``
(a ``Trainer`` whose ``compute_loss`` is the hybrid loss) on a patched model; the built-in loop here is
the single-device path the CLI uses.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from . import corpus as corpus_mod
from . import self_distill
from .hybrid_loss import ar_loss, hybrid_loss
from .patch import is_patched, patch

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
POOL_FILE = "distill_pool.pt"


# ----------------------------------------------------------------------------------------------------
# Hugging Face Trainer integration


class HybridLossMixin:
    """``compute_loss`` for ``transformers.Trainer``: the TiDAR hybrid loss on ``inputs["input_ids"]``
    (``[B, L]``, L a multiple of ``tidar_block_size``). Set ``tidar_block_size``/``tidar_alpha`` (or pass
    ``block_size=``/``alpha=`` to ``TidarTrainer``); ``tidar_alpha=None`` trains the AR-only baseline."""

    tidar_block_size: int = 16
    tidar_alpha: float | None = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if self.tidar_alpha is None:
            loss = ar_loss(model, inputs["input_ids"], attention_mask=mask)
            return (loss, {"ar_loss": loss.detach()}) if return_outputs else loss
        r = hybrid_loss(model, inputs["input_ids"], self.tidar_block_size, self.tidar_alpha, attention_mask=mask)
        extra = {"ar_loss": r.ar_loss.detach(), "diffusion_loss": r.diffusion_loss.detach()}
        return (r.loss, extra) if return_outputs else r.loss


def _make_trainer_class():
    from transformers import Trainer

    class TidarTrainer(HybridLossMixin, Trainer):
        """``transformers.Trainer`` with the TiDAR hybrid loss. The model must be patched (``tidar.patch``)."""

        def __init__(self, *args, block_size: int = 16, alpha: float | None = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.tidar_block_size = block_size
            self.tidar_alpha = alpha

    return TidarTrainer


def __getattr__(name):  # TidarTrainer imports transformers.Trainer (and accelerate) only when asked for
    if name == "TidarTrainer":
        return _make_trainer_class()
    raise AttributeError(name)


# ----------------------------------------------------------------------------------------------------
# Model, data, schedule


def build_model(args, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
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
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
    return model


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, state) from a checkpoint folder written by ``tidar train``. Clear errors for a
    missing, incomplete or corrupt folder."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a folder)")
    need = ["config.json", "model.safetensors", "tokenizer.json"]
    missing = [n for n in need if not (path / n).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        tokenizer = corpus_mod.load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and a hint
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    if getattr(model.config, "mask_token_id", None) is None:
        raise ValueError(f"checkpoint {path} has no mask token (config.mask_token_id); it is not a TiDAR model")
    state = {}
    if (path / STATE_FILE).is_file():
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {path} is corrupt: {STATE_FILE} is not valid JSON ({e})") from e
    return model.to(device), tokenizer, state


def load_init_model(path, device="cpu"):
    """(model, tokenizer) to start a run from a saved causal LM folder (``--init-from``). The tokenizer must have
    a mask token; the model's config gets its id."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--init-from {path} does not exist (or is not a folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--init-from {path} is not a saved model: no config.json")
    tokenizer = corpus_mod.load_tokenizer(path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"--init-from {path}: the tokenizer has no mask token")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    model.config.mask_token_id = tokenizer.mask_token_id
    return model.to(device), tokenizer


def lr_at(step, args):
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batch_at(stream: torch.Tensor, step: int, args) -> torch.Tensor:
    """The training batch of ``step``: random windows drawn from a generator seeded by (seed, step), so a
    resumed run sees exactly the batches an uninterrupted run would."""
    L = args.seq_len
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - L, (args.batch_size,), generator=g)
    return torch.stack([stream[s : s + L] for s in starts.tolist()]).long()


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


@torch.no_grad()
def evaluate(model, tokenizer, heldout_stream, prompts, args, device, draft_lens=None, max_new_tokens=None):
    """Held-out AR loss/perplexity, diffusion loss, and TiDAR greedy tokens per forward on ``prompts``."""
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
    for K in draft_lens:
        tpf = []
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            res = tidar.generate(model, ids, max_new_tokens=max_new, draft_len=K)
            tpf.append(res.tokens_per_forward)
        if tpf:
            out[f"tokens_per_forward_k{K}"] = sum(tpf) / len(tpf)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p):
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=None, help="folder of text/code files (default: this Python's standard library)")
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
    g.add_argument("--draft-len", type=int, default=None, help="draft length saved in the config (default: --block-size)")
    g.add_argument("--alpha", type=float, default=1.0, help="AR weight: (alpha*AR + diffusion) / (1 + alpha)")
    g.add_argument("--no-diffusion", action="store_true", help="AR-only baseline: train the AR term alone")
    g.add_argument("--diffusion-target", default="data", choices=None,
                   help="what the mask half learns (design.md 1.4): data (the paper), ar-hard / ar-soft (teacher-forced: "
                        "the AR head's argmax / distribution at the same position, detached), greedy (the model's own "
                        "continuations of real prompts, regenerated every --distill-refresh steps)")
    g.add_argument("--distill-rows", type=int, default=None,
                   help="greedy target: rows carrying the diffusion term per step (default: --batch-size // 2); "
                        "the AR term always uses the --batch-size real rows")
    g.add_argument("--distill-ratio", type=float, default=1.0,
                   help="greedy target: share of the --distill-rows that are generated continuations (the rest: real "
                        "rows with data targets)")
    g.add_argument("--distill-refresh", type=int, default=100, help="greedy target: regenerate the continuations every N steps")
    g.add_argument("--distill-prompt-len", type=int, default=64,
                   help="greedy target: real tokens before the continuation (no diffusion loss on them)")
    g.add_argument("--distill-temperature", type=float, default=0.0,
                   help="greedy target: 0 = greedy continuations; > 0 = sampled at this temperature")
    g.add_argument("--distill-gen-batch", type=int, default=64, help="greedy target: rows generated at once")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--max-minutes", type=float, default=None, help="stop (evaluate and save) after this wall time")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (evaluate and save) after this step; the schedule still spans --max-steps")
    g = p.add_argument_group("run")
    g.add_argument("--output", default="tidar-run", help="output folder (final model + checkpoint-N folders)")
    g.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from this saved causal LM (weights + tokenizer; e.g. an AR-only run: the conversion recipe) "
                        "instead of a fresh model; the model-shape options are then ignored")
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
    g.add_argument("--evaluate", default=None, metavar="MODEL_DIR",
                   help="only evaluate MODEL_DIR on the held-out split (uses --eval-*, --seq-len, --block-size) and print JSON")
    g.add_argument("--eval-draft-lens", type=int, nargs="+", default=None, help="draft lengths for --evaluate (default 4 8 16)")


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
    self_distill.check_options(args.diffusion_target, args.distill_ratio, args.distill_refresh, args.distill_prompt_len,
                               args.seq_len, args.distill_rows, args.distill_temperature)
    if args.distill_gen_batch < 1:
        raise ValueError(f"--distill-gen-batch must be >= 1, got {args.distill_gen_batch}")
    if args.no_diffusion and args.diffusion_target != "data":
        raise ValueError(f"--no-diffusion trains no diffusion term; --diffusion-target {args.diffusion_target} contradicts it")
    if args.init_from and args.resume:
        raise ValueError("--init-from starts a new run and --resume continues one; give only one")


def _latest_checkpoint(output: Path):
    cks = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    if not cks:
        raise FileNotFoundError(f"--resume latest: no checkpoint-N folder in {output}")
    return cks[-1]


def save_checkpoint(path: Path, model, tokenizer, optimizer, state: dict, pool=None):
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
    if pool is not None and pool.rows is not None:
        torch.save(pool.state_dict(), tmp / POOL_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint folder is either complete or absent


def write_demo_prompts(folder, tokenizer, corpus, n: int = 3):
    """``demo_prompts.json``: held-out code prompts ``tidar demo`` completes (from modules never trained on)."""
    prompts = corpus_mod.heldout_prompts(tokenizer, corpus, n)
    source = f"standard library of Python {platform.python_version()}" if corpus.root == corpus_mod.stdlib_dir() else corpus.root.name
    data = {"source": source, "heldout_modules": corpus.heldout_modules, "prompts": prompts}
    (Path(folder) / "demo_prompts.json").write_text(json.dumps(data, indent=1))


def _settings_into_config(model, args):
    c = model.config
    c.tidar_draft_len = int(args.draft_len)
    c.tidar_block_size = int(args.block_size)
    if args.no_diffusion:
        c.tidar_objective = "ar"
    elif args.diffusion_target == "greedy":
        c.tidar_objective = (f"hybrid(alpha={args.alpha}, diffusion_target=greedy, ratio={args.distill_ratio}, "
                             f"refresh={args.distill_refresh}, temperature={args.distill_temperature})")
    elif args.diffusion_target != "data":
        c.tidar_objective = f"hybrid(alpha={args.alpha}, diffusion_target={args.diffusion_target})"
    else:
        c.tidar_objective = f"hybrid(alpha={args.alpha})"


def train(args, log=print) -> dict:
    """The built-in single-device training loop. Returns the final state (log history, eval results)."""
    import tidar

    check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    t_setup = time.time()

    corpus = corpus_mod.find_corpus(args.corpus, args.ext, args.heldout_percent)
    state = {"step": 0, "log_history": [], "eval_history": [], "elapsed_s": 0.0}
    optim_state = None
    if args.resume:
        ck = _latest_checkpoint(output) if args.resume == "latest" else Path(args.resume)
        model, tokenizer, state = load_checkpoint(ck, device)
        if not state:
            raise ValueError(f"checkpoint {ck} has no {STATE_FILE}: it is a model, not a resumable training checkpoint")
        if (ck / OPTIM_FILE).is_file():
            try:
                optim_state = torch.load(ck / OPTIM_FILE, map_location=device, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"checkpoint {ck} is corrupt: {OPTIM_FILE} unreadable ({type(e).__name__}: {e})") from e
        log(f"resumed from {ck} at step {state['step']}")
    elif args.init_from:
        model, tokenizer = load_init_model(args.init_from, device)
        log(f"initialised from {args.init_from} (mask token {tokenizer.mask_token!r} = id {tokenizer.mask_token_id})")
    else:
        if args.tokenizer:
            tokenizer = corpus_mod.load_tokenizer(args.tokenizer)
        else:
            t0 = time.time()
            tokenizer = corpus_mod.train_tokenizer(corpus.train_files, args.vocab_size)
            log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.time() - t0:.1f}s")
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token ([MASK]); TiDAR needs one")
        model = build_model(args, tokenizer).to(device)
    _settings_into_config(model, args)
    patch(model, draft_len=args.draft_len, backend=args.backend)

    t0 = time.time()
    train_stream = corpus_mod.encode_files(tokenizer, corpus.train_files)
    held_stream = corpus_mod.encode_files(tokenizer, corpus.heldout_files) if corpus.heldout_files else train_stream[-args.seq_len * 8 :]
    if len(train_stream) <= args.seq_len:
        raise ValueError(f"the training split has {len(train_stream)} tokens, not more than --seq-len {args.seq_len}")
    if len(held_stream) < args.seq_len:
        raise ValueError(f"the held-out split has {len(held_stream)} tokens, fewer than --seq-len {args.seq_len}")
    prompts = corpus_mod.heldout_prompts(tokenizer, corpus, args.eval_prompts)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"corpus {corpus.root}: {len(corpus.train_files)} train files ({len(train_stream):,} tokens), "
        f"{len(corpus.heldout_files)} held-out files in {len(corpus.heldout_modules)} modules ({len(held_stream):,} tokens); "
        f"encoded in {time.time() - t0:.1f}s")
    log(f"model: Qwen2 {n_params / 1e6:.2f}M params, d={args.hidden_size}, {args.layers} layers; device {device}; "
        f"objective {'AR only' if args.no_diffusion else f'hybrid K={args.block_size} alpha={args.alpha}'}; "
        f"L={args.seq_len}, batch {args.batch_size}")

    pool, n_data, n_gen = None, 0, 0
    if not args.no_diffusion and args.diffusion_target == "greedy":
        n_data, n_gen = self_distill.split_rows(args.distill_rows, args.distill_ratio)
        n_data = min(n_data, args.batch_size)
        if n_gen:
            pool = self_distill.ContinuationPool(
                train_stream, size=n_gen * args.distill_refresh, prompt_len=args.distill_prompt_len, seq_len=args.seq_len,
                refresh=args.distill_refresh, seed=args.seed, temperature=args.distill_temperature,
                gen_batch_size=args.distill_gen_batch)
            if args.resume and (ck / POOL_FILE).is_file():
                pool.load_state_dict(torch.load(ck / POOL_FILE, weights_only=True))
        log(f"self-distillation: per step {args.batch_size} real rows (AR), diffusion on {n_data} real rows (data) + "
            f"{n_gen} generated rows ({args.distill_prompt_len} real + {args.seq_len - args.distill_prompt_len} "
            f"{'greedy' if args.distill_temperature == 0 else f'T={args.distill_temperature}'} tokens, refreshed every "
            f"{args.distill_refresh} steps)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
    model.train()
    step = state["step"]
    elapsed0 = state.get("elapsed_s", 0.0)
    t_start = time.time()
    log(f"setup {t_start - t_setup:.1f}s; training steps {step}..{args.max_steps}")
    tokens_since, t_since = 0, time.time()
    save_meta = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}}

    def snapshot():
        return {**save_meta, "step": step, "log_history": state["log_history"], "eval_history": state["eval_history"],
                "elapsed_s": elapsed0 + time.time() - t_start, "params": n_params,
                "device": str(device), "torch": torch.__version__}

    def do_eval():
        t = time.time()
        ev = evaluate(model, tokenizer, held_stream, prompts, args, device)
        ev["step"] = step
        state["eval_history"].append(ev)
        log(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k != "step") + f" ({time.time() - t:.1f}s)")

    from tqdm.auto import tqdm  # a transformers dependency; the bar shows only on a terminal, logs go through it

    bar = tqdm(total=args.max_steps, initial=step, unit="step", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    if not bar.disable:
        plain_log, log = log, (lambda s: bar.write(s))
    stopped_early = False
    while step < args.max_steps:
        if args.stop_after is not None and step >= args.stop_after:
            stopped_early = True
            log(f"--stop-after {args.stop_after} reached")
            break
        if args.max_minutes is not None and time.time() - t_start > args.max_minutes * 60:
            stopped_early = True
            log(f"--max-minutes {args.max_minutes} reached at step {step}")
            break
        lr = lr_at(step, args)
        for g_ in optimizer.param_groups:
            g_["lr"] = lr
        x = batch_at(train_stream, step, args).to(device)
        if pool is not None:
            t_gen = time.time()
            if pool.maybe_refresh(model, step):
                log(f"step {step}: generated {pool.size} continuations in {time.time() - t_gen:.1f}s")
        with _autocast(device):
            if args.no_diffusion:
                loss = ar_loss(model, x)
                ar, diff = loss, None
            elif args.diffusion_target == "greedy":
                gen = pool.rows_at(step, n_gen) if pool is not None else None
                loss, ar, diff = self_distill.self_distill_loss(model, x, gen, args.distill_prompt_len, args.block_size,
                                                                args.alpha, n_data)
            else:
                loss, ar, diff = hybrid_loss(model, x, args.block_size, args.alpha, diffusion_target=args.diffusion_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
        optimizer.step()
        step += 1
        tokens_since += x.numel()
        rec = {"step": step, "loss": loss.item(), "ar_loss": ar.item(), "lr": lr, "grad_norm": gnorm}
        if diff is not None:
            rec["diffusion_loss"] = diff.item()
        state["log_history"].append(rec)
        bar.update(1)
        if not bar.disable:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", ar=f"{rec['ar_loss']:.3f}",
                            diff=f"{rec.get('diffusion_loss', float('nan')):.3f}",
                            tok_s=f"{x.numel() * bar.format_dict['rate'] if bar.format_dict.get('rate') else 0:,.0f}")
        if step % args.log_every == 0 or step == args.max_steps:
            dt = time.time() - t_since
            log(f"step {step}/{args.max_steps} loss {rec['loss']:.4f} ar {rec['ar_loss']:.4f}"
                + (f" diff {rec['diffusion_loss']:.4f}" if diff is not None else "")
                + f" lr {lr:.2e} gnorm {gnorm:.2f} {tokens_since / dt:,.0f} tok/s elapsed {time.time() - t_start:.0f}s")
            tokens_since, t_since = 0, time.time()
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            do_eval()
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save_checkpoint(output / f"checkpoint-{step}", model, tokenizer, optimizer, snapshot(), pool)
            cks = sorted(output.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
            for old in cks[: max(0, len(cks) - args.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
    bar.close()
    if not bar.disable:
        log = plain_log
    do_eval()
    final = snapshot()
    final["stopped_early"] = stopped_early
    save_checkpoint(output / f"checkpoint-{step}", model, tokenizer, optimizer, final, pool)
    # the final model at the top of --output: weights, tokenizer, config with the TiDAR settings, history
    tidar.unpatch(model)
    model.save_pretrained(output, safe_serialization=True)
    patch(model, draft_len=args.draft_len, backend=args.backend)
    tokenizer.save_pretrained(output)
    (output / STATE_FILE).write_text(json.dumps(final, indent=1))
    write_demo_prompts(output, tokenizer, corpus)
    log(f"saved {output} (step {step}, {final['elapsed_s'] / 60:.1f} min of training)")
    return final


def evaluate_folder(args) -> dict:
    """``--evaluate``: held-out AR perplexity, diffusion loss and TiDAR greedy tokens/forward of a saved model."""
    check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, _ = load_checkpoint(args.evaluate, device)
    patch(model, draft_len=args.draft_len, backend=args.backend)
    corpus = corpus_mod.find_corpus(args.corpus, args.ext, args.heldout_percent)
    held = corpus_mod.encode_files(tokenizer, corpus.heldout_files)
    prompts = corpus_mod.heldout_prompts(tokenizer, corpus, args.eval_prompts)
    t0 = time.time()
    res = evaluate(model, tokenizer, held, prompts, args, device, args.eval_draft_lens or [4, 8, 16], args.eval_new_tokens)
    res.update(model=str(args.evaluate), heldout_tokens_scored=min(len(held) // args.seq_len, args.eval_batches * args.batch_size) * args.seq_len,
               prompts=len(prompts), new_tokens=args.eval_new_tokens, heldout_modules=corpus.heldout_modules,
               device=str(device), eval_s=round(time.time() - t0, 1))
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


__all__ = ["HybridLossMixin", "add_arguments", "build_model", "evaluate", "load_checkpoint", "run", "train"]
