"""TiDAR generation (design.md 1.3): one forward per step drafts K tokens and verifies the previous K.

Exact: with beta = 1, greedy output equals the model's AR greedy output token for token, and sampling
has the AR distribution (speculative sampling with the diffusion drafts as proposals).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

import tidar_kernels
from tidar_kernels import layouts

from .attention import TidarStep, tidar_forward
from .cache import TidarCache
from .generate_args import check_generate_args
from .patch import settings


@dataclass
class TidarGenerateOutput:
    sequences: torch.Tensor  # [B, P + new]: the prompt as given (left padding kept), then the new tokens
    forwards: int  # model forwards run (prefill included)
    tokens_per_forward: float  # new tokens / forwards, per row, averaged over rows
    accepted_histogram: dict = field(default_factory=dict)  # a (1..K) -> number of (row, step) pairs
    new_tokens: list = field(default_factory=list)  # per row: the generated token ids (no padding)
    cache: TidarCache | None = None  # per row, the committed K/V: a prefix of (prompt + new tokens)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    draft_len: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beta: float = 1.0,
    eos_token_id=None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    backend: str | None = None,
    seed: int | None = None,
) -> TidarGenerateOutput:
    """Decode with TiDAR. ``model`` must be patched (``tidar.patch``).

    Args:
        input_ids / attention_mask: ``[B, P]`` prompts, left-padded as for HF ``generate``.
        max_new_tokens: new tokens per row (fewer when the row emits ``eos_token_id``).
        draft_len: K (default: the patch's). temperature 0 = greedy.
        top_k, top_p: sampling filters, applied to targets and drafts alike.
        beta: 1.0 (default) is exact; < 1 mixes the diffusion logits into the target ("trust diffusion"),
            which is faster to accept but no longer the AR distribution.
        eos_token_id: an int or a list; a row stops after emitting one. pad_token_id fills finished rows.
        generator: torch.Generator for sampling (reproducible); streamer: an HF streamer (batch 1).
        seed: instead of ``generator``, Philox4x32-10 counter-based sampling (the same tokens on every backend
            and device): the prefill uses offset 0 and each step advances the offset by B * 2K.
    """
    s = settings(model)
    K = s.draft_len if draft_len is None else draft_len
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"draft_len must be an int >= 1, got {K!r}")
    max_draft = getattr(model.config, "max_position_embeddings", None)
    if max_draft is not None and K + K * K > max_draft:
        raise ValueError(f"draft_len {K} is too large: a step of {K + K * K} tokens exceeds max_position_embeddings {max_draft}")
    backend = s.backend if backend is None else backend
    g = check_generate_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, beta,
                            eos_token_id, pad_token_id, generator, seed, streamer)
    prompts, eos, pad_token_id, device, B = g.prompts, g.eos, g.pad_token_id, g.device, len(g.prompts)
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, beta=beta, generator=generator, backend=backend)
    if seed is not None:
        del sample_kw["generator"]
        sample_kw.update(seed=seed, offset=0)

    step_layout = layouts.decode_step(K).to(device)
    S = step_layout.seg_len
    cache = TidarCache(B, max(map(len, prompts)) + max_new_tokens + S, backend=backend)

    # Prefill: prompt (causal) + one block of K masks. Rows of different lengths run one by one.
    drafts, probs = _prefill(model, prompts, K, s.mask_token_id, cache, device, sample_kw)
    forwards = 1 if len(set(map(len, prompts))) == 1 else B
    row_forwards = [1] * B
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    hist: Counter = Counter()

    def emit(b, tokens):
        for t in tokens:
            out[b].append(t)
            if t in eos or len(out[b]) >= max_new_tokens:
                done[b] = True
                break

    first = drafts[:, 0].tolist()
    for b in range(B):
        emit(b, [first[b]])
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(out[0]))

    masks = torch.full((B, K * K), s.mask_token_id, dtype=torch.long, device=device)
    while not all(done):
        seg_start = cache.seq_lengths(device)
        ids = torch.cat([drafts, masks], 1)
        pos = seg_start.long()[:, None] + step_layout.position_ids[None]
        cache.check_room(S)
        logits = tidar_forward(model, ids, pos, TidarStep(step_layout, seg_start, cache, backend)).logits
        forwards += 1
        V = logits.shape[-1]
        if seed is not None:  # Philox: every step draws fresh counters
            sample_kw["offset"] += B * 2 * K
        r = tidar_kernels.rejection_sample(
            logits[:, :K], logits[:, K:].reshape(B, K, K, V), drafts, probs, **sample_kw
        )
        accepted = r.accepted.tolist()
        new_first = r.next_drafts[:, 0].tolist()
        before = [len(o) for o in out]
        for b in range(B):
            if done[b]:
                accepted[b] = 0  # finished rows ride along without committing
                continue
            row_forwards[b] += 1
            hist[accepted[b]] += 1
            emit(b, drafts[b, 1 : accepted[b]].tolist() + [new_first[b]])
            # Commit d_0..d_{a-1}; a row that stopped mid-step keeps only the drafts it emitted.
            accepted[b] = min(accepted[b], len(out[b]) - before[b] + 1)
        if streamer is not None and len(out[0]) > before[0]:
            streamer.put(torch.tensor(out[0][before[0] :]))
        cache.commit(accepted)
        drafts, probs = r.next_drafts, r.next_draft_probs
    if streamer is not None:
        streamer.end()

    width = max(map(len, out))
    new = torch.full((B, width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for b, o in enumerate(out):
        new[b, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    tpf = sum(len(o) / f for o, f in zip(out, row_forwards)) / B
    return TidarGenerateOutput(torch.cat([input_ids, new], 1), forwards, tpf, dict(sorted(hist.items())), out, cache)


def _prefill(model, prompts, K, mask_id, cache, device, sample_kw):
    """Run the prefill forward(s) and return the first drafts ``[B, K]`` and their distributions."""
    lengths = list(map(len, prompts))
    if len(set(lengths)) == 1:
        groups = [(list(range(len(prompts))), cache)]
    else:
        groups = [([b], cache.row(b)) for b in range(len(prompts))]
    ar, blocks = [], []
    for rows, target in groups:
        n = lengths[rows[0]]
        layout = layouts.prefill(n, K).to(device)
        ids = torch.tensor([prompts[b] + [mask_id] * K for b in rows], dtype=torch.long, device=device)
        pos = layout.position_ids[None].expand(len(rows), -1)
        seg_start = torch.zeros(len(rows), dtype=torch.int32, device=device)
        logits = tidar_forward(model, ids, pos, TidarStep(layout, seg_start, target, sample_kw["backend"])).logits
        ar.append(logits[:, n - 1])
        blocks.append(logits[:, n:])
    r = tidar_kernels.draft_sample(torch.cat(ar), torch.cat(blocks), **sample_kw)
    cache.commit(lengths)
    return r.next_drafts, r.next_draft_probs


__all__ = ["generate", "TidarGenerateOutput"]
