"""Reference TiDAR verification step (docs/design.md §4.1) and the prefill draft step.

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

import numbers
from typing import NamedTuple

import torch

from ..backends import register

# ---------------------------------------------------------------------------------------------
# Counter-based randomness: Philox4x32-10, shared bit for bit by the reference, Triton and CUDA
# ---------------------------------------------------------------------------------------------
# The uniforms of one step are u[b, j], b in [0, B), j in [0, 2K) (the layout above). With an int64 ``seed``
# and ``offset`` (their bits read as uint64): n = offset + b * 2K + j (mod 2^64), key (k0, k1) = (seed lo 32,
# seed hi 32), counter (c0, c1, c2, c3) = (n lo 32, n hi 32, 0, 0), ten rounds of
#     c0, c1, c2, c3 = hi(B * c2) ^ c1 ^ k0, lo(B * c2), hi(A * c0) ^ c3 ^ k1, lo(A * c0);  k0 += KEY_A; k1 += KEY_B
# (uint32 wrapping; the Random123 round order), and u = float32(c0 >> 8) * 2^-24: exact, in [0, 1).
# A generation loop advances ``offset`` by B * 2K per step, so no two uniforms of a seed reuse a counter.
PHILOX_A, PHILOX_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF


class Philox(NamedTuple):
    """The randomness of one step as device scalars (one-element int64 tensors), so CUDA graphs can capture
    it: backends get this instead of a ``[B, 2K]`` uniforms tensor when the caller gave ``seed``/``offset``."""

    seed: torch.Tensor
    offset: torch.Tensor


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``b`` held in
    int64, without overflowing int64: ``b`` is split in 16-bit halves."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    # a * b = p_hi * 2^16 + p_lo; split p_hi at bit 16 so every partial sum stays below 2^50
    low = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^33 + 2^48
    hi = (p_hi >> 16) + (low >> 32)
    return hi & _M32, low & _M32


def philox4x32(counter, key, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values: ``counter`` a 4-tuple, ``key`` a 2-tuple (tensors
    or ints, broadcast). Returns the four output words (int64 tensors in [0, 2^32))."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _M32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & _M32 for k in key)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(PHILOX_B, c2)
        hi_a, lo_a = _mul32(PHILOX_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uniforms(seed, offset, batch: int, draft_len: int, device=None) -> torch.Tensor:
    """The float32 ``[batch, 2 * draft_len]`` uniforms of one step for ``seed``/``offset`` (ints or one-element
    int64 tensors; tensors are never read on the host, so this can run inside a CUDA graph)."""
    _check_philox_args(seed, offset, batch, draft_len)
    if device is None:
        device = seed.device if torch.is_tensor(seed) else offset.device if torch.is_tensor(offset) else "cpu"
    s = _int64(seed, device).reshape(())
    o = _int64(offset, device).reshape(())
    n = o + torch.arange(batch * 2 * draft_len, dtype=torch.int64, device=device)  # wraps mod 2^64 like uint64
    c0, _, _, _ = philox4x32((n & _M32, (n >> 32) & _M32, 0, 0), (s & _M32, (s >> 32) & _M32))
    return ((c0 >> 8).to(torch.float32) * 2.0**-24).view(batch, 2 * draft_len)


def _check_philox_args(seed, offset, batch, draft_len) -> None:
    """Types and ranges only (tensor values are never read): TypeError/ValueError naming the argument."""
    for name, x in (("seed", seed), ("offset", offset)):
        if torch.is_tensor(x):
            if x.dtype != torch.int64 or x.numel() != 1:
                raise TypeError(
                    f"{name} must be an int or a one-element int64 tensor, got {x.dtype} of shape {tuple(x.shape)}"
                )
        elif isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an int or a one-element int64 tensor, got {type(x).__name__}")
        elif not -(2**63) <= x < 2**64:
            raise ValueError(f"{name} must be in [-2^63, 2^64) (its 64 bits are the Philox word), got {x}")
    for name, x, lo in (("batch", batch, 0), ("draft_len", draft_len, 1)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")


def _int64(x, device) -> torch.Tensor:
    """An int (its bits as int64: values in [2^63, 2^64) wrap) or an int64 tensor, on ``device``."""
    if torch.is_tensor(x):
        return x.to(device=device, dtype=torch.int64)
    x = int(x)
    if x >= 2**63:
        x -= 2**64
    return torch.tensor(x, dtype=torch.int64, device=device)


def as_uniforms(u, B: int, K: int, device) -> torch.Tensor | None:
    """``u`` as a ``[B, 2K]`` float32 tensor: Philox state is expanded, tensors and None pass through."""
    if isinstance(u, Philox):
        return philox_uniforms(u.seed, u.offset, B, K, device)
    return u


def process_logits64(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """float64 probabilities after temperature, top-k then top-p: the distribution every decision uses."""
    x = logits.double() / temperature
    if top_k is not None or top_p is not None:
        x = x.masked_fill(x < filter_threshold(x, top_k, top_p)[..., None], float("-inf"))
    return x.softmax(-1)


def filter_threshold(x: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Per row of the float64 tempered logits ``x`` ``[..., V]``, the smallest kept value: top-k then top-p
    keep exactly the tokens with ``x >= threshold`` (-inf when nothing is filtered).

    top-k: the k-th largest value (ties with it are kept). top-p (nucleus, after top-k): sort ascending,
    drop the prefix whose cumulative probability is ``<= 1 - top_p`` (never the most likely token); the
    threshold is the first kept value, so tokens tied with it are kept too. Kernels take these thresholds
    as a per-row input and compare ``x >= threshold`` on their own ``x``: the same set, bit for bit.
    """
    thr = x.new_full(x.shape[:-1], float("-inf"))
    if top_k is not None and top_k < x.shape[-1]:
        thr = torch.topk(x, top_k, dim=-1).values[..., -1]
    if top_p is not None and top_p < 1.0:
        xs = x if top_k is None else x.masked_fill(x < thr[..., None], float("-inf"))
        sorted_x = torch.sort(xs, dim=-1).values
        cum = sorted_x.softmax(-1).cumsum(-1)
        first_kept = (cum <= (1 - top_p)).sum(-1, keepdim=True).clamp_max(x.shape[-1] - 1)  # a prefix is dropped
        thr = torch.maximum(thr, sorted_x.gather(-1, first_kept).squeeze(-1))
    return thr


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of each row of ``probs`` ``[..., V]`` with uniforms ``u`` ``[...]``."""
    cdf = probs.double().cumsum(-1)
    target = (u * cdf[..., -1]).unsqueeze(-1).contiguous()  # u may be a strided view
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
    if K == 1:  # no drafts (a plain AR step): d'_0 alone
        return first[:, None], None if greedy else slot_logits.float()
    if greedy:
        return torch.cat([first[:, None], slot_logits.argmax(-1)], 1), None
    q = process_logits64(slot_logits, temperature, top_k, top_p)
    return torch.cat([first[:, None], sample(q, u[:, K + 1 : 2 * K])], 1), q.float()


@register("draft_sample", "reference", philox=True)  # expands ``Philox`` state itself
def draft_sample(ar_logits, block_logits, u, temperature, top_k, top_p, beta):
    """Prefill: d_0 from the AR logits at the last prompt token (mixed with slot 0), d_1.. from slots 1..K-1."""
    greedy = temperature == 0.0
    u = as_uniforms(u, ar_logits.shape[0], block_logits.shape[1], ar_logits.device)
    target = mix(ar_logits, block_logits[:, 0], beta)
    if greedy:
        first = target.argmax(-1)
    else:
        first = sample(process_logits64(target, temperature, top_k, top_p), u[:, 0])
    return _next_drafts(first, block_logits[:, 1:], u, greedy, temperature, top_k, top_p)


@register("rejection_sample", "reference", philox=True)
def rejection_sample(ar_logits, block_logits, drafts, draft_probs, u, temperature, top_k, top_p, beta):
    B, K, V = ar_logits.shape
    greedy = temperature == 0.0
    u = as_uniforms(u, B, K, ar_logits.device)
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
    next_drafts, next_q = _next_drafts(correction, block_logits[rows, last, 1:], u, greedy, temperature, top_k, top_p)
    return accepted, emitted, next_drafts, next_q
