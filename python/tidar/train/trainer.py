"""Hugging Face ``Trainer`` integration: :class:`TidarTrainer` (one class) and what ``tidar train`` runs on it.

``TidarTrainer`` alone (a ``Trainer`` whose ``compute_loss`` is the TiDAR hybrid loss on ``inputs["input_ids"]``)
is for users with their own data pipeline: ``TidarTrainer(model=tidar.patch(model), args=..., train_dataset=...,
block_size=16, alpha=1.0)``; ``alpha=None`` trains the AR-only baseline.

``tidar train`` adds a :class:`RunLoss` (the step's loss normalised by the *global* token counts, so one process,
``torchrun``/``accelerate`` data parallelism and gradient accumulation all give the same update), the deterministic
:class:`WindowDataset` (row t of step s is a window drawn from a generator seeded by (seed, s)) and
:class:`RunCallback` (logs, held-out evaluation, ``--max-minutes``/``--stop-after``, a ``STOP`` file or SIGTERM,
checkpoint extras).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback

from tidar.train.checkpoint import POOL_FILE, TIDAR_STATE_FILE
from tidar.train.objective import ar_loss, ar_loss_sums, hybrid_loss, hybrid_loss_sums, repeat_positions

STOP_FILE = "STOP"  # created in the output folder, it ends a run after the current step with a checkpoint


class HybridLossMixin:
    """``compute_loss`` for ``transformers.Trainer``: the TiDAR hybrid loss on ``inputs["input_ids"]``
    (``[B, L]``, L a multiple of ``tidar_block_size``); ``tidar_alpha=None`` trains the AR-only baseline;
    ``tidar_diffusion_target`` / ``tidar_diffusion_weighting`` as in :func:`tidar.hybrid_loss`."""

    tidar_block_size: int = 16
    tidar_alpha: float | None = 1.0
    tidar_diffusion_target: str = "data"
    tidar_diffusion_weighting: str = "uniform"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        if self.tidar_alpha is None:
            loss = ar_loss(model, inputs["input_ids"], attention_mask=mask)
            return (loss, {"ar_loss": loss.detach()}) if return_outputs else loss
        r = hybrid_loss(
            model,
            inputs["input_ids"],
            self.tidar_block_size,
            self.tidar_alpha,
            attention_mask=mask,
            diffusion_target=self.tidar_diffusion_target,
            diffusion_weighting=self.tidar_diffusion_weighting,
        )
        extra = {"ar_loss": r.ar_loss.detach(), "diffusion_loss": r.diffusion_loss.detach()}
        return (r.loss, extra) if return_outputs else r.loss


class TidarTrainer(HybridLossMixin, Trainer):
    """``transformers.Trainer`` with the TiDAR hybrid loss. The model must be patched (``tidar.patch``).

    ``run_loss``/``lr_lambda``/``weight_decay_matrices_only``/``sequential`` are what ``tidar train`` sets: its
    global-count loss, its schedule (a function of the step, multiplying ``args.learning_rate``), AdamW weight decay
    on matrices only, and batches in dataset order (the dataset is already shuffled by seed)."""

    def __init__(
        self,
        *args,
        block_size: int = 16,
        alpha: float | None = 1.0,
        diffusion_target: str = "data",
        diffusion_weighting: str = "uniform",
        run_loss=None,
        lr_lambda=None,
        sequential: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.tidar_block_size = block_size
        self.tidar_alpha = alpha
        self.tidar_diffusion_target = diffusion_target
        self.tidar_diffusion_weighting = diffusion_weighting
        self.tidar_run_loss = run_loss
        self.tidar_lr_lambda = lr_lambda
        self.tidar_sequential = sequential
        if run_loss is not None:
            # the run loss is already a share of the global mean: no division by the accumulation steps
            self.loss_is_scaled_for_ga = True
            self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.tidar_run_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.tidar_run_loss(model, inputs, self.state.global_step)
        return (loss, {}) if return_outputs else loss

    def _get_train_sampler(self, *args, **kwargs):
        if self.tidar_sequential:
            return SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        if self.tidar_lr_lambda is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        a = self.args
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
                {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=a.learning_rate,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
        )
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.tidar_lr_lambda is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.tidar_lr_lambda)
        return self.lr_scheduler


# ----------------------------------------------------------------------------------------------------
# What `tidar train` runs on the trainer


def lr_factor(step, *, max_steps, warmup_steps, min_lr_ratio):
    """Linear warmup then cosine decay to ``min_lr_ratio`` at ``max_steps`` (a factor of the peak lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def batch_starts(n_tokens: int, seq_len: int, batch: int, seed: int, step: int) -> list:
    """Window starts of ``step``'s batch, from a generator seeded by (seed, step): a resumed run sees exactly the
    batches an uninterrupted run would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - seq_len, (batch,), generator=g).tolist()


class WindowDataset(Dataset):
    """Item ``i`` = row ``t = i % batch`` of step ``s = i // batch``: ``{"input_ids": [L], "row": t}``. Read in
    order (``sequential=True``), the global batch of step s is exactly these rows, whatever the number of processes
    and accumulation steps (accelerate hands process r the batches r, r + n, ...)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch: int, seed: int, steps: int):
        if len(stream) <= seq_len:
            raise ValueError(f"the training split has {len(stream)} tokens, not more than --seq-len {seq_len}")
        self.stream, self.seq_len, self.batch, self.seed, self.steps = stream, seq_len, batch, seed, steps
        self._cached = (None, None)

    def __len__(self):
        return self.steps * self.batch

    def __getitem__(self, i):
        step, t = divmod(int(i), self.batch)
        if self._cached[0] != step:
            self._cached = (step, batch_starts(len(self.stream), self.seq_len, self.batch, self.seed, step))
        s = self._cached[1][t]
        return {"input_ids": self.stream[s : s + self.seq_len].long(), "row": torch.tensor(t)}


def spread(t: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """Index (0..n-1) of the extra row carried by in-step row ``t``, or -1: ``n`` of the ``batch`` rows carry one,
    evenly spread (row t carries one iff floor((t+1) n / batch) > floor(t n / batch))."""
    a, b = (t * n) // batch, ((t + 1) * n) // batch
    return torch.where(b > a, a, torch.full_like(t, -1))


class RunLoss:
    """The step loss of ``tidar train`` as each micro-batch's share of the global mean: sums of cross-entropies
    divided by the global counts (known in advance: full windows), times the number of processes ``shards`` (DDP
    averages gradients over processes; accumulated micro-batches add up). Keeps the step's sums for logging."""

    def __init__(
        self,
        *,
        seq_len,
        batch,
        block_size,
        alpha,
        no_diffusion,
        target,
        n_data=0,
        n_gen=0,
        prompt_len=0,
        pool=None,
        shards=1,
        weighting="uniform",
        unlikelihood=0.0,
        unlikelihood_ngram=4,
        teacher=None,
        teacher_weight=0.0,
    ):
        L = seq_len
        self.L, self.batch, self.K, self.alpha = L, batch, block_size, alpha
        self.no_diffusion, self.target, self.n_data, self.n_gen, self.P, self.pool = (
            no_diffusion,
            target,
            n_data,
            n_gen,
            prompt_len,
            pool,
        )
        self.shards, self.weighting = shards, weighting
        # sequence-level unlikelihood on the generated rows (``--unlikelihood``): its weight, n-gram, and the fixed
        # count it is averaged over (every generated token), so the step's update does not depend on the repeats
        self.ul, self.ul_ngram = float(unlikelihood), unlikelihood_ngram
        self.ul_count = n_gen * (L - prompt_len)
        self.last_unlikelihood = None  # the last finished step's mean unlikelihood term (``step_means``)
        # the AR head anchored to a frozen teacher (``--ar-teacher``): KL(teacher || model) at every AR position of
        # the real and the generated rows (greedy target), averaged over that fixed count
        if teacher is not None and target != "greedy":
            raise ValueError("a teacher anchors the AR head of --diffusion-target greedy runs only")
        self.teacher, self.teacher_weight = teacher, float(teacher_weight) if teacher is not None else 0.0
        self.kl_count = (batch + n_gen) * (L - 1)
        self.last_teacher_kl = None  # the last finished step's mean KL term (``step_means``)
        self.ar_count = batch * (L - 1)
        per_row = L if target in ("data", "greedy") else L - 1
        if no_diffusion:
            self.diff_count = 0
        elif target == "greedy":
            self.diff_count = n_data * L + n_gen * (L - prompt_len)
        else:
            self.diff_count = batch * per_row
        self.reset()

    def reset(self):
        self.ar_sum, self.diff_sum, self.ul_sum, self.kl_sum = 0.0, 0.0, 0.0, 0.0

    def __call__(self, model, inputs, step):
        x, rows = inputs["input_ids"], inputs["row"]
        dev = x.device
        if self.no_diffusion:
            ar_s, _ = ar_loss_sums(model, x)
            d_s = torch.zeros((), device=dev)
        elif self.target == "greedy":
            ar_s, d_s, ul_s, kl_s = self._greedy(model, x, rows.to(dev), step)
        else:
            ar_s, _, d_s, _ = hybrid_loss_sums(
                model, x, self.K, diffusion_target=self.target, diffusion_weighting=self.weighting
            )
        self.ar_sum += float(ar_s.detach())
        self.diff_sum += float(d_s.detach())
        term_d = d_s / self.diff_count if self.diff_count else d_s * 0
        if self.no_diffusion:
            return ar_s / self.ar_count * self.shards
        loss = (self.alpha * ar_s / self.ar_count + term_d) / (1.0 + self.alpha)
        if self.ul and self.target == "greedy":
            self.ul_sum += float(ul_s.detach())
            loss = loss + self.ul * ul_s / self.ul_count
        if self.teacher is not None:
            self.kl_sum += float(kl_s.detach())
            loss = loss + self.teacher_weight * kl_s / self.kl_count
        return loss * self.shards

    def _teacher_logits(self, ids):
        """The frozen teacher's causal logits ``[B, L, V]`` (no gradient), or None without a teacher."""
        if self.teacher is None or not len(ids):
            return None
        with torch.no_grad():
            return self.teacher(input_ids=ids, use_cache=False).logits.float()

    def _greedy(self, model, x, rows, step):
        L = self.L
        data_rows = spread(rows, self.n_data, self.batch) >= 0
        gen_idx = spread(rows, self.n_gen, self.batch)
        # one process: the rows without a diffusion term take a plain causal forward (half the tokens). Several
        # processes: every row goes through one hybrid forward (its clean half is that same causal forward), so each
        # rank runs the same forwards whatever rows it holds (DDP needs it)
        single = self.shards > 1
        parts = [x if single else x[data_rows]]
        if self.n_gen:
            self.pool.maybe_refresh(model, step)
            gen_all = self.pool.rows_at(step, self.n_gen)
            sel = gen_idx[gen_idx >= 0].cpu()
            parts.append(gen_all[sel].to(x.device))
        hyb = torch.cat(parts, 0)
        zero = torch.zeros((), device=x.device)
        ar_s, d_s, ul_s, kl_s = zero, zero, zero, zero
        if len(hyb):
            nr = len(x) if single else int(data_rows.sum())
            is_real = torch.arange(len(hyb), device=x.device) < nr
            real_diff = torch.zeros(len(hyb), dtype=torch.bool, device=x.device)
            real_diff[:nr] = data_rows if single else True
            ar_valid = is_real[:, None].expand(-1, L)
            diff_valid = real_diff[:, None] | (~is_real[:, None] & (torch.arange(L, device=x.device) >= self.P)[None])
            ul_valid = None
            if self.ul:  # the tokens of repeated n-grams in the generated part of the generated rows
                ul_valid = repeat_positions(hyb, self.ul_ngram, start=self.P) & ~is_real[:, None]
            sums = hybrid_loss_sums(
                model,
                hyb,
                self.K,
                ar_valid=ar_valid,
                diffusion_valid=diff_valid,
                diffusion_weighting=self.weighting,
                unlikelihood_valid=ul_valid,
                teacher_logits=self._teacher_logits(hyb),
            )
            ar_s, d_s = ar_s + sums[0], d_s + sums[2]
            if self.ul:
                ul_s = ul_s + sums[4]
            if self.teacher is not None:
                kl_s = kl_s + sums[-2]
        if not single and bool((~data_rows).any()):
            plain = x[~data_rows]
            sums = ar_loss_sums(model, plain, teacher_logits=self._teacher_logits(plain))
            ar_s = ar_s + sums[0]
            if self.teacher is not None:
                kl_s = kl_s + sums[2]
        return ar_s, d_s, ul_s, kl_s

    def step_means(self):
        """(loss, ar, diffusion or None) of the finished step, summed over processes; resets the sums. With
        ``unlikelihood``, the step's mean unlikelihood term is left in ``last_unlikelihood`` (and is in the loss)."""
        sums = torch.tensor([self.ar_sum, self.diff_sum, self.ul_sum, self.kl_sum], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        self.reset()
        ar = float(sums[0]) / self.ar_count
        if self.no_diffusion:
            return ar, ar, None
        diff = float(sums[1]) / self.diff_count if self.diff_count else 0.0
        loss = (self.alpha * ar + diff) / (1 + self.alpha)
        self.last_unlikelihood = None
        if self.ul and self.ul_count:
            self.last_unlikelihood = float(sums[2]) / self.ul_count
            loss += self.ul * self.last_unlikelihood
        self.last_teacher_kl = None
        if self.teacher is not None:
            self.last_teacher_kl = float(sums[3]) / self.kl_count
            loss += self.teacher_weight * self.last_teacher_kl
        return loss, ar, diff


class RunCallback(TrainerCallback):
    """Per-step records (loss, AR/diffusion loss, lr, grad norm), log lines, periodic held-out evaluation,
    ``--max-minutes``/``--stop-after`` (stop, save, evaluate), and the TiDAR extras in every checkpoint."""

    def __init__(self, *, run_loss, state, args, evaluate_fn, log, lr_at, main_process, pool=None, elapsed0=0.0):
        self.run_loss, self.state, self.a, self.evaluate_fn, self.log = run_loss, state, args, evaluate_fn, log
        self.lr_at, self.main, self.pool, self.elapsed0 = lr_at, main_process, pool, elapsed0
        self.t_start = self.t_since = time.time()
        self.tokens_since = 0
        self.stopped_early = False
        self.bar = None
        self._sigterm = False  # a SIGTERM arrived (``on_train_begin`` installs the handler on the main thread)
        self._old_sigterm = None  # the handler it replaced, restored at the end

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def elapsed(self):
        return self.elapsed0 + time.time() - self.t_start

    def on_train_begin(self, args, state, control, **kw):
        self.t_start = self.t_since = time.time()
        self._sigterm = False
        if threading.current_thread() is threading.main_thread():  # a SIGTERM ends the run like a STOP file
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.main and sys.stderr.isatty():  # a progress bar with the losses and tokens/s; log lines go through it
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.a.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
            plain = self.log
            self.log = lambda s: self.bar.write(s) if self.bar is not None else plain(s)

    def _on_sigterm(self, signum, frame):
        self._sigterm = True

    def on_train_end(self, args, state, control, **kw):
        old = self._old_sigterm
        if old is not None:
            signal.signal(signal.SIGTERM, old)
            self._old_sigterm = None

    def _stop_requested(self, output_dir) -> bool:
        """A ``STOP`` file in the output folder or a SIGTERM asks the run to end after this step with a checkpoint
        (a long background run ended on demand, resumable with ``--resume latest``). In a distributed run the ranks
        agree (a max over them), so no rank stops a step before the others."""
        want = self._sigterm or (Path(output_dir) / STOP_FILE).exists()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([int(want)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            want = bool(t.item())
        return want

    def on_step_end(self, args, state, control, **kw):
        a, step = self.a, state.global_step
        loss, ar, diff = self.run_loss.step_means()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr")
        rec = {"step": step, "loss": loss, "ar_loss": ar, "lr": self.lr_at(step - 1)}
        if diff is not None:
            rec["diffusion_loss"] = diff
        if self.run_loss.last_unlikelihood is not None:
            rec["unlikelihood_loss"] = self.run_loss.last_unlikelihood
        if self.run_loss.last_teacher_kl is not None:
            rec["teacher_kl"] = self.run_loss.last_teacher_kl
        self.state["log_history"].append(rec)
        self.tokens_since += a.batch_size * a.seq_len
        if self.bar is not None:
            self.bar.update(1)
            rate = self.bar.format_dict.get("rate")
            self.bar.set_postfix(
                loss=f"{loss:.3f}",
                ar=f"{ar:.3f}",
                diff=f"{diff if diff is not None else float('nan'):.3f}",
                tok_s=f"{a.batch_size * a.seq_len * rate if rate else 0:,.0f}",
            )
        if a.stop_after is not None and step >= a.stop_after:
            self.stopped_early = control.should_training_stop = True
            self.log(f"--stop-after {a.stop_after} reached")
        if a.max_minutes is not None and time.time() - self.t_start > a.max_minutes * 60:
            self.stopped_early = control.should_training_stop = True
            self.log(f"--max-minutes {a.max_minutes} reached at step {step}")
        if not control.should_training_stop and self._stop_requested(args.output_dir):
            self.stopped_early = control.should_training_stop = True
            self.log(f"stop requested ({STOP_FILE} file or SIGTERM) at step {step}: saving a checkpoint")
            if self.main:  # honoured: a resumed run must not stop at once
                (Path(args.output_dir) / STOP_FILE).unlink(missing_ok=True)
        last = control.should_training_stop or step >= a.max_steps
        if a.save_every and step % a.save_every == 0 or last:
            control.should_save = True
        if a.eval_every and step % a.eval_every == 0 and not last and self.main:
            t = time.time()
            ev = self.evaluate_fn()
            ev["step"] = step
            self.state["eval_history"].append(ev)
            self.log(
                f"eval step {step}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k != "step")
                + f" ({time.time() - t:.1f}s)"
            )
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "grad_norm" in logs and self.state["log_history"]:
            self.state["log_history"][-1]["grad_norm"] = float(logs["grad_norm"])
        rec = self.state["log_history"][-1] if self.state["log_history"] else None
        step = state.global_step
        if (
            self.main
            and rec
            and rec["step"] == step
            and step != getattr(self, "_printed", None)
            and (step % self.a.log_every == 0 or step == self.a.max_steps)
        ):
            self._printed = step
            dt = time.time() - self.t_since
            self.log(
                f"step {step}/{self.a.max_steps} loss {rec['loss']:.4f} ar {rec['ar_loss']:.4f}"
                + (f" diff {rec['diffusion_loss']:.4f}" if "diffusion_loss" in rec else "")
                + (f" ul {rec['unlikelihood_loss']:.4f}" if "unlikelihood_loss" in rec else "")
                + (f" kl {rec['teacher_kl']:.4f}" if "teacher_kl" in rec else "")
                + f" lr {rec['lr']:.2e} gnorm {rec.get('grad_norm', float('nan')):.2f} "
                f"{self.tokens_since / max(dt, 1e-9):,.0f} tok/s elapsed {self.elapsed():.0f}s"
            )
            self.tokens_since, self.t_since = 0, time.time()

    def on_save(self, args, state, control, **kw):
        if not self.main:
            return
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ck.is_dir():
            return
        snap = self.snapshot(state.global_step)
        (ck / TIDAR_STATE_FILE).write_text(json.dumps(snap, indent=1))
        if self.pool is not None and self.pool.rows is not None:
            torch.save(self.pool.state_dict(), ck / POOL_FILE)

    def snapshot(self, step):
        return {**self.state, "step": step, "elapsed_s": self.elapsed(), "stopped_early": self.stopped_early}


__all__ = [
    "HybridLossMixin",
    "RunCallback",
    "RunLoss",
    "TidarTrainer",
    "WindowDataset",
    "batch_starts",
    "lr_factor",
    "spread",
]
