"""Self-distilled diffusion targets (docs/design.md §3.1): train the mask half toward what the verifier accepts.

The verifier accepts a draft when it equals the model's own AR greedy choice, so the exact target of a
diffusion block is the model's own greedy continuation of the block's prefix. It is cheapest as whole
sequences: real prompts (``prompt_len`` tokens of training data) continued greedily by the model with its
KV cache, in batches, kept in a :class:`ContinuationPool` that is regenerated every ``refresh`` steps as the
model changes. The diffusion term is taken on the generated part only (the prompt is data, not the model's);
the AR term always uses real data.

One training step (:func:`self_distill_loss`) with ``B`` real rows, ``n_data`` of them also carrying the
diffusion term on their data tokens and ``n_gen`` generated rows carrying only the diffusion term:

    AR   = mean next-token cross-entropy over the B real rows
    DIFF = mean cross-entropy of the mask slots over the n_data real rows (target: the data token) and the
           generated part of the n_gen generated rows (target: the model's own continuation, a constant)
    loss = (alpha * AR + DIFF) / (1 + alpha)

``temperature > 0`` makes the continuations samples (the analogue for sampled decoding).
"""

from __future__ import annotations

import torch

from tidar.train.objective import DIFFUSION_TARGETS, HybridLoss, ar_loss_sums, hybrid_loss_sums

# --diffusion-target: the objective's teacher-forced targets plus the self-distilled one defined here
TARGETS = (*DIFFUSION_TARGETS, "greedy")


def check_options(
    target: str, ratio: float, refresh: int, prompt_len: int, seq_len: int, rows: int, temperature: float = 0.0
) -> None:
    """Clear errors for bad self-distillation settings (names as on the command line)."""
    if target not in TARGETS:
        raise ValueError(f"--diffusion-target must be one of {', '.join(TARGETS)}, got {target!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"--distill-ratio must be a number in [0, 1], got {ratio!r}")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"--distill-refresh must be an int >= 1 (steps between regenerations), got {refresh!r}")
    if target == "greedy" and (not isinstance(prompt_len, int) or not 1 <= prompt_len < seq_len):
        raise ValueError(f"--distill-prompt-len must be in [1, --seq-len {seq_len}), got {prompt_len!r}")
    least = 1 if target == "greedy" else 0  # greedy with no diffusion row would train AR alone under a hybrid name
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < least:
        raise ValueError(f"--distill-rows must be an int >= {least} with --diffusion-target {target}, got {rows!r}")
    if not isinstance(temperature, (int, float)) or not 0.0 <= temperature < float("inf"):
        raise ValueError(f"--distill-temperature must be a finite number >= 0, got {temperature!r}")


def split_rows(rows: int, ratio: float) -> tuple:
    """(n_data, n_gen): of ``rows`` diffusion rows, ``round(ratio * rows)`` are generated continuations."""
    n_gen = int(round(ratio * rows))
    return rows - n_gen, n_gen


@torch.no_grad()
def continue_greedy(
    model,
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    batch_size: int = 64,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[N, P + new_tokens]``: each prompt row continued by the model itself, ``new_tokens`` tokens, greedy
    (``temperature == 0``) or sampled, with a KV cache, ``batch_size`` rows at a time, never stopping at EOS
    (the verifier does not either). A TiDAR-patched model is unpatched for the duration (plain causal
    attention) and re-patched with the same settings; train/eval mode is restored."""
    from transformers import DynamicCache

    from tidar.patching import is_patched, patch, settings_of, unpatch

    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(
            f"prompts must be an integer tensor [N, P] with P >= 1, got {getattr(prompts, 'shape', prompts)!r}"
        )
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    base = model
    while hasattr(base, "module") and isinstance(base.module, torch.nn.Module):
        base = base.module
    saved = settings_of(base) if is_patched(base) else None
    if saved is not None:
        unpatch(base)
    was_training = base.training
    base.eval()
    device = base.get_input_embeddings().weight.device
    out = []
    try:
        for chunk in prompts.long().split(batch_size):
            ids = chunk.to(device)
            cache = DynamicCache(config=base.config)
            logits = base(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            toks = [ids]
            for t in range(new_tokens):
                if temperature > 0:
                    probs = torch.softmax(logits.float() / temperature, -1)
                    nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
                else:
                    nxt = logits.argmax(-1, keepdim=True)
                toks.append(nxt)
                if t + 1 < new_tokens:
                    logits = base(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1]
            out.append(torch.cat(toks, 1).cpu())
    finally:
        base.train(was_training)
        if saved is not None:
            patch(base, draft_len=saved.draft_len, mask_token_id=saved.mask_token_id, backend=saved.backend)
    return torch.cat(out, 0)


def random_prompts(stream: torch.Tensor, n: int, prompt_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``prompt_len`` tokens from ``stream`` at starts drawn by a generator seeded with ``seed``."""
    if len(stream) <= prompt_len:
        raise ValueError(f"the training stream has {len(stream)} tokens, not more than the prompt length {prompt_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - prompt_len, (n,), generator=g).tolist()
    return torch.stack([stream[s : s + prompt_len] for s in starts]).long()


class ContinuationPool:
    """The generated rows: ``size`` real prompts of ``prompt_len`` tokens continued by the model to
    ``seq_len`` tokens, regenerated every ``refresh`` steps. Rows are handed out in order (``rows_at``), so each
    row is used once per refresh when ``size = rows_per_step * refresh``. ``state_dict``/``load_state_dict``
    keep a resumed run on exactly the rows of an uninterrupted one."""

    def __init__(
        self,
        stream,
        *,
        size: int,
        prompt_len: int,
        seq_len: int,
        refresh: int,
        seed: int,
        temperature: float = 0.0,
        gen_batch_size: int = 64,
    ):
        if size < 1:
            raise ValueError(f"the continuation pool needs at least one row, got size={size}")
        self.stream, self.size, self.prompt_len, self.seq_len = stream, size, prompt_len, seq_len
        self.refresh, self.seed, self.temperature, self.gen_batch_size = refresh, seed, temperature, gen_batch_size
        self.rows: torch.Tensor | None = None
        self.generated_at: int | None = None

    def maybe_refresh(self, model, step: int) -> bool:
        """Regenerate when ``step`` starts a new refresh period (or nothing is loaded). True if it did."""
        period_start = (step // self.refresh) * self.refresh
        if self.rows is not None and self.generated_at == period_start:
            return False
        index = period_start // self.refresh
        prompts = random_prompts(self.stream, self.size, self.prompt_len, self.seed * 7_919 + index)
        g = torch.Generator().manual_seed(self.seed * 104_729 + index)
        self.rows = continue_greedy(
            model,
            prompts,
            self.seq_len - self.prompt_len,
            batch_size=self.gen_batch_size,
            temperature=self.temperature,
            generator=g,
        )
        self.generated_at = period_start
        return True

    def rows_at(self, step: int, n: int) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("ContinuationPool.rows_at before maybe_refresh")
        first = (step - self.generated_at) * n
        idx = [(first + i) % self.size for i in range(n)]
        return self.rows[idx]

    def state_dict(self) -> dict:
        return {
            "rows": self.rows,
            "generated_at": self.generated_at,
            "prompt_len": self.prompt_len,
            "seq_len": self.seq_len,
            "refresh": self.refresh,
            "size": self.size,
        }

    def load_state_dict(self, d: dict) -> None:
        for k in ("prompt_len", "seq_len", "refresh", "size"):
            if d.get(k) != getattr(self, k):
                raise ValueError(f"the saved continuation pool has {k}={d.get(k)}, this run {getattr(self, k)}")
        self.rows, self.generated_at = d["rows"], d["generated_at"]


def self_distill_loss(
    model,
    real: torch.Tensor,
    generated: torch.Tensor | None,
    prompt_len: int,
    block_size: int,
    alpha: float = 1.0,
    n_data: int = 0,
    diffusion_weighting: str = "uniform",
) -> HybridLoss:
    """The step loss described in the module docstring. ``real`` ``[B, L]`` (the AR term, all rows; the first
    ``n_data`` rows also carry the data-target diffusion term), ``generated`` ``[G, L]`` or None (the diffusion
    term on positions ``>= prompt_len``, detached by construction: they are token ids); ``diffusion_weighting`` as in
    :func:`tidar.hybrid_loss`."""
    B, L = real.shape
    if not 0 <= n_data <= B:
        raise ValueError(f"n_data must be in [0, {B}] (the real rows), got {n_data}")
    if generated is not None and (generated.dim() != 2 or generated.shape[1] != L):
        raise ValueError(f"generated rows must be [G, {L}] like the real rows, got {tuple(generated.shape)}")
    device = real.device
    zero = torch.zeros((), device=device)
    ar_s, ar_n, d_s, d_n = zero, zero, zero, zero
    hyb = [real[:n_data]] if n_data else []
    if generated is not None and len(generated):
        hyb.append(generated.to(device))
    if hyb:
        x = torch.cat(hyb, 0)
        rows_real = torch.arange(len(x), device=device) < n_data
        ar_valid = rows_real[:, None].expand(-1, L)
        diff_valid = rows_real[:, None] | (torch.arange(L, device=device) >= prompt_len)[None]
        a, an, d, dn = hybrid_loss_sums(
            model, x, block_size, ar_valid=ar_valid, diffusion_valid=diff_valid, diffusion_weighting=diffusion_weighting
        )
        ar_s, ar_n, d_s, d_n = ar_s + a, ar_n + an, d_s + d, d_n + dn
    if n_data < B:
        a, an = ar_loss_sums(model, real[n_data:])
        ar_s, ar_n = ar_s + a, ar_n + an
    ar = ar_s / ar_n.clamp_min(1.0)
    diff = d_s / d_n.clamp_min(1.0)
    return HybridLoss((alpha * ar + diff) / (1.0 + alpha), ar, diff)


__all__ = [
    "TARGETS",
    "ContinuationPool",
    "check_options",
    "continue_greedy",
    "random_prompts",
    "self_distill_loss",
    "split_rows",
]
