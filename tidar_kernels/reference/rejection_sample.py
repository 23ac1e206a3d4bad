"""Reference TiDAR verification step (design.md 1.3) and the prefill draft step.

Uniforms ``u`` are ``[B, 2K]`` float32 in [0, 1):
    u[:, 0]          the correction (first rejection) or bonus sample, or d_0 at prefill
    u[:, i]          the acceptance test of draft d_i, i = 1..K-1
    u[:, K + s]      the sample of next draft slot s, s = 1..K-1 (u[:, K] is unused)
A categorical sample from probabilities ``p`` with uniform ``u`` is the inverse CDF:
the first index whose inclusive cumulative sum exceeds ``u * sum(p)``.

Numerics (shared with the Triton kernel, so both decide identically given the same uniforms): every
decision is taken in float64. Target logits are mixed in float64 (``beta = 1``: AR only, ``beta = 0``:
diffusion only), divided by the temperature in float64, softmaxed in float64 (max, exp(x - max), sum);
acceptance compares ``u * q(d) < p(d)`` in float64; residuals and CDFs are accumulated in float64.
The only remaining differences between implementations are summation order and last-ulp ``exp``
differences (~1e-16 relative), far below anything a float32 uniform can resolve in practice.
Returned draft distributions are the float64 probabilities rounded to float32.
"""
from __future__ import annotations

import torch

from ..backends import register


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """float32 probabilities after temperature, top-k then top-p (as Hugging Face's warpers, in that order)."""
    return process_logits64(logits, temperature, top_k, top_p).float()


def process_logits64(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """float64 probabilities after temperature, top-k then top-p: the distribution every decision uses."""
    x = logits.double() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1] = False  # keep at least the most likely token
        x = x.masked_fill(drop_sorted.scatter(-1, idx, drop_sorted), float("-inf"))
    return x.softmax(-1)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of each row of ``probs`` ``[..., V]`` with uniforms ``u`` ``[...]``."""
    cdf = probs.double().cumsum(-1)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def mix(ar_logits: torch.Tensor, diff_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """float64 target logits: beta * AR + (1 - beta) * diffusion (beta = 1 is exact AR). The end points use
    one side only, so a -inf (banned) logit on the other side cannot turn into 0 * -inf = NaN."""
    if beta == 1.0:
        return ar_logits.double()
    if beta == 0.0:
        return diff_logits.double()
    return beta * ar_logits.double() + (1.0 - beta) * diff_logits.double()


def _next_drafts(first, slot_logits, u, greedy, temperature, top_k, top_p):
    """Drafts d'_0 = ``first`` and d'_1..d'_{K-1} from ``slot_logits`` ``[B, K-1, V]`` (slots 1..K-1)."""
    K = slot_logits.shape[1] + 1
    if greedy:
        return torch.cat([first[:, None], slot_logits.argmax(-1)], 1), None
    q = process_logits64(slot_logits, temperature, top_k, top_p)
    return torch.cat([first[:, None], sample(q, u[:, K + 1 : 2 * K])], 1), q.float()


@register("draft_sample", "reference")
def draft_sample(ar_logits, block_logits, u, temperature, top_k, top_p, beta):
    """Prefill: d_0 from the AR logits at the last prompt token (mixed with slot 0), d_1.. from slots 1..K-1."""
    greedy = temperature == 0.0
    target = mix(ar_logits, block_logits[:, 0], beta)
    if greedy:
        first = target.argmax(-1)
    else:
        first = sample(process_logits64(target, temperature, top_k, top_p), u[:, 0])
    return _next_drafts(first, block_logits[:, 1:], u, greedy, temperature, top_k, top_p)


@register("rejection_sample", "reference")
def rejection_sample(ar_logits, block_logits, drafts, draft_probs, u, temperature, top_k, top_p, beta):
    B, K, V = ar_logits.shape
    greedy = temperature == 0.0
    rows = torch.arange(B, device=ar_logits.device)
    # p_i (i = 1..K) at index i-1: AR logits at d_{i-1} mixed with slot 0 of proposal block i.
    target = mix(ar_logits, block_logits[:, :, 0], beta)  # [B, K, V]
    if greedy:
        ok = drafts[:, 1:] == target[:, :-1].argmax(-1)  # [B, K-1]: d_i == argmax p_i
    else:
        p = process_logits64(target, temperature, top_k, top_p)  # [B, K, V] float64
        d = drafts[:, 1:, None]
        p_d = p[:, :-1].gather(-1, d).squeeze(-1)
        q_d = draft_probs.gather(-1, d).squeeze(-1).double()
        ok = u[:, 1:K].double() * q_d < p_d  # accept with probability min(1, p/q)
    # a = 1 + number of leading accepted drafts
    accepted = 1 + ok.long().cumprod(-1).sum(-1)  # [B]
    last = accepted - 1  # index of p_a
    if greedy:
        correction = target[rows, last].argmax(-1)
    else:
        p_a = p[rows, last]
        q_a = torch.zeros_like(p_a)
        rejected = accepted < K  # at a == K the bonus is sampled from p_K itself
        if K > 1:
            q_a[rejected] = draft_probs[rows, last.clamp_max(K - 2)][rejected].double()
        residual = (p_a - q_a).clamp_min(0.0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
        correction = sample(residual, u[:, 0])
    emitted = torch.where(torch.arange(K, device=drafts.device) < accepted[:, None], drafts, -1)
    next_drafts, next_q = _next_drafts(
        correction, block_logits[rows, last, 1:], u, greedy, temperature, top_k, top_p
    )
    return accepted, emitted, next_drafts, next_q
