"""Triton TiDAR verification step (``rejection_sample``) and prefill drafts (``draft_sample``).

One launch per step: one program per batch row walks the vocabulary in ``BLOCK_V`` chunks, straight
from the raw logits (no probability tensor is materialised except the next draft distributions the
caller asked for). Greedy is its own compiled variant (argmax only). Every decision is taken in
float64 exactly as ``tidar_kernels.reference.rejection_sample`` defines it (mix, temperature, softmax
as max / sum of exp(x - max), acceptance ``u * q(d) < p(d)``, residual ``max(0, p - q)``, inverse CDF
``first index with cumsum > u * total``), so given the same uniforms the tokens and acceptance
lengths agree with the reference bit for bit (up to ~1e-16 relative summation-order effects).

Not yet: top-k / top-p (NotImplementedError), in-kernel Philox, vocabulary-parallel split of one row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register

# MIX modes of a target row: 0 = first pointer only (AR, or a raw block row), 1 = second only, 2 = mixed.
AR_ONLY, DIFF_ONLY, MIXED = 0, 1, 2


@triton.jit
def _load_x(row_a, row_b, offs, mask, COEF, MIX: tl.constexpr, TEMP: tl.constexpr):
    """float64 logits of a target row at ``offs`` (-inf where masked), mixed, divided by the temperature."""
    if MIX == 0:
        x = tl.load(row_a + offs, mask=mask, other=float("-inf")).to(tl.float64)
    elif MIX == 1:
        x = tl.load(row_b + offs, mask=mask, other=float("-inf")).to(tl.float64)
    else:
        beta = tl.load(COEF + 1)
        omb = tl.load(COEF + 2)
        xa = tl.load(row_a + offs, mask=mask, other=0.0).to(tl.float64)
        xb = tl.load(row_b + offs, mask=mask, other=0.0).to(tl.float64)
        x = tl.where(mask, beta * xa + omb * xb, float("-inf"))
    if TEMP:
        x = x / tl.load(COEF)
    return x


@triton.jit
def _argmax(row_a, row_b, V, COEF, MIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """First index of the maximum (torch.argmax tie-breaking)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        x = _load_x(row_a, row_b, v0 + offs, m, COEF, MIX, False)
        bm = tl.max(x, 0)
        bi = tl.min(tl.where((x == bm) & m, v0 + offs, V), 0)
        upd = bm > best
        best_i = tl.where(upd, bi, best_i)
        best = tl.where(upd, bm, best)
    return best_i


@triton.jit
def _softmax_stats(row_a, row_b, V, COEF, MIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, sum of exp(x - max)) in float64, max first (as torch.softmax), so exp(x - max) is the reference's."""
    offs = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), tl.float64)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < V, COEF, MIX, True)
        mx = tl.maximum(mx, tl.max(x, 0))
    z = tl.full([], 0.0, tl.float64)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < V, COEF, MIX, True)
        z += tl.sum(tl.exp(x - mx), 0)
    return mx, z


@triton.jit
def _sample(row_a, row_b, V, mx, z, u, Q_ROW, use_q, P_OUT, write_p, COEF, MIX: tl.constexpr,
            BLOCK_V: tl.constexpr):
    """Inverse-CDF sample of p = softmax (or of the residual max(0, p - q) when ``use_q`` and it has mass),
    optionally writing p as float32 to ``P_OUT``."""
    offs = tl.arange(0, BLOCK_V)
    tot_r = tl.full([], 0.0, tl.float64)
    tot_p = tl.full([], 0.0, tl.float64)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, MIX, True) - mx) / z
        q = tl.load(Q_ROW + v0 + offs, mask=m & use_q, other=0.0).to(tl.float64)
        tot_r += tl.sum(tl.maximum(p - q, 0.0), 0)
        tot_p += tl.sum(p, 0)
    resid = use_q & (tot_r > 0)
    target = u * tl.where(resid, tot_r, tot_p)
    carry = tl.full([], 0.0, tl.float64)
    found = tl.full([], V, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, MIX, True) - mx) / z
        q = tl.load(Q_ROW + v0 + offs, mask=m & use_q, other=0.0).to(tl.float64)
        w = tl.where(resid, tl.maximum(p - q, 0.0), p)
        cdf = tl.cumsum(w, 0) + carry
        found = tl.minimum(found, tl.min(tl.where((cdf > target) & m, v0 + offs, V), 0))
        carry += tl.sum(w, 0)
        tl.store(P_OUT + v0 + offs, p.to(tl.float32), mask=m & write_p)
    return tl.minimum(found, V - 1)


@triton.jit
def _next_drafts(BLK_ROW, s_blk_s, NEXT_ROW, NEXT_P_ROW, U_ROW, K, V, COEF, GREEDY: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """d'_1..d'_{K-1} from slots 1..K-1 of one block (raw logits, no mix); q' rows written when sampling."""
    for s in range(1, K):
        row = BLK_ROW + s * s_blk_s
        if GREEDY:
            tok = _argmax(row, row, V, COEF, 0, BLOCK_V)
        else:
            mx, z = _softmax_stats(row, row, V, COEF, 0, BLOCK_V)
            u = tl.load(U_ROW + K + s).to(tl.float64)
            tok = _sample(row, row, V, mx, z, u, row, False, NEXT_P_ROW + (s - 1) * V, True, COEF, 0, BLOCK_V)
        tl.store(NEXT_ROW + s, tok.to(tl.int64))


@triton.jit
def _rejection_kernel(
    AR, BLK, DRAFTS, Q, U, COEF, ACC, EMIT, NEXT, NEXT_P,
    K, V, s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a = tl.full([], 1, tl.int32)
    going = tl.full([], 1, tl.int32)
    U_ROW = U + b * 2 * K
    for i in range(1, K):  # the acceptance walk: p_i is target row i - 1
        if going != 0:
            ra = AR + b * s_ar_b + (i - 1) * s_ar_k
            rb = BLK + b * s_blk_b + (i - 1) * s_blk_j  # block i, slot 0
            d = tl.load(DRAFTS + b * K + i).to(tl.int32)
            if GREEDY:
                ok = d == _argmax(ra, rb, V, COEF, MIX, BLOCK_V)
            else:
                mx, z = _softmax_stats(ra, rb, V, COEF, MIX, BLOCK_V)
                p_d = tl.exp(_load_x(ra, rb, d, d >= 0, COEF, MIX, True) - mx) / z
                q_d = tl.load(Q + b * s_q_b + (i - 1) * s_q_k + d).to(tl.float64)
                ok = tl.load(U_ROW + i).to(tl.float64) * q_d < p_d
            a = tl.where(ok, a + 1, a)
            going = tl.where(ok, going, 0)
    last = a - 1
    ra = AR + b * s_ar_b + last * s_ar_k
    rb = BLK + b * s_blk_b + last * s_blk_j
    if GREEDY:
        tok = _argmax(ra, rb, V, COEF, MIX, BLOCK_V)
    else:
        mx, z = _softmax_stats(ra, rb, V, COEF, MIX, BLOCK_V)
        has_q = a < K  # at a == K the bonus is sampled from p_K itself
        q_row = Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k
        tok = _sample(ra, rb, V, mx, z, tl.load(U_ROW).to(tl.float64), q_row, has_q, NEXT_P, False, COEF, MIX,
                      BLOCK_V)
    tl.store(NEXT + b * K, tok.to(tl.int64))
    tl.store(ACC + b, a.to(tl.int64))
    offs_k = tl.arange(0, BLOCK_K)
    dk = tl.load(DRAFTS + b * K + offs_k, mask=offs_k < K, other=-1)
    tl.store(EMIT + b * K + offs_k, tl.where(offs_k < a, dk, -1), mask=offs_k < K)
    _next_drafts(BLK + b * s_blk_b + last * s_blk_j, s_blk_s, NEXT + b * K, NEXT_P + b * (K - 1) * V, U_ROW, K, V,
                 COEF, GREEDY, BLOCK_V)


@triton.jit
def _draft_kernel(
    AR, BLK, U, COEF, NEXT, NEXT_P, K, V, s_ar_b, s_blk_b, s_blk_s,
    GREEDY: tl.constexpr, MIX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ra = AR + b * s_ar_b
    rb = BLK + b * s_blk_b  # slot 0
    U_ROW = U + b * 2 * K
    if GREEDY:
        tok = _argmax(ra, rb, V, COEF, MIX, BLOCK_V)
    else:
        mx, z = _softmax_stats(ra, rb, V, COEF, MIX, BLOCK_V)
        tok = _sample(ra, rb, V, mx, z, tl.load(U_ROW).to(tl.float64), ra, False, NEXT_P, False, COEF, MIX,
                      BLOCK_V)
    tl.store(NEXT + b * K, tok.to(tl.int64))
    _next_drafts(rb, s_blk_s, NEXT + b * K, NEXT_P + b * (K - 1) * V, U_ROW, K, V, COEF, GREEDY, BLOCK_V)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _unsupported(top_k, top_p):
    if top_k is not None or top_p is not None:
        raise NotImplementedError(
            "backend='triton' rejection_sample/draft_sample do not support top_k/top_p yet; "
            "use backend='reference' (or leave top_k/top_p unset)"
        )


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _setup(ar_logits, temperature, beta):
    mix = AR_ONLY if beta == 1.0 else DIFF_ONLY if beta == 0.0 else MIXED
    coef = torch.tensor([temperature if temperature > 0 else 1.0, beta, 1.0 - beta], dtype=torch.float64,
                        device=ar_logits.device)
    V = ar_logits.shape[-1]
    block_v = min(triton.next_power_of_2(V), 1024 if ar_logits.device.type == "cuda" else 256)
    return mix, coef, block_v


def _uniforms(u, B, K, device):
    if u is None:  # greedy: never read
        return torch.zeros((B, 2 * K), dtype=torch.float32, device=device)
    return u.contiguous()


@register("rejection_sample", "triton")
def rejection_sample(ar_logits, block_logits, drafts, draft_probs, u, temperature, top_k, top_p, beta):
    _unsupported(top_k, top_p)
    B, K, V = ar_logits.shape
    dev = ar_logits.device
    greedy = temperature == 0.0
    mix, coef, block_v = _setup(ar_logits, temperature, beta)
    ar, blk = _last_dim_contiguous(ar_logits), _last_dim_contiguous(block_logits)
    drafts = drafts.to(torch.int64).contiguous()
    if greedy or K == 1:
        q = torch.zeros((1, 1, 1), dtype=torch.float32, device=dev)  # never read
    else:
        q = _last_dim_contiguous(draft_probs)
    accepted = torch.empty(B, dtype=torch.int64, device=dev)
    emitted = torch.empty((B, K), dtype=torch.int64, device=dev)
    next_drafts = torch.empty((B, K), dtype=torch.int64, device=dev)
    next_p = None if greedy else torch.empty((B, K - 1, V), dtype=torch.float32, device=dev)
    if B == 0:
        return accepted, emitted, next_drafts, next_p
    _rejection_kernel[(B,)](
        ar, blk, drafts, q, _uniforms(u, B, K, dev), coef, accepted, emitted, next_drafts,
        next_p if next_p is not None and next_p.numel() else accepted,
        K, V, ar.stride(0), ar.stride(1), blk.stride(0), blk.stride(1), blk.stride(2), q.stride(0), q.stride(1),
        GREEDY=greedy, MIX=mix, BLOCK_V=block_v, BLOCK_K=max(2, triton.next_power_of_2(K)),
    )
    return accepted, emitted, next_drafts, next_p


@register("draft_sample", "triton")
def draft_sample(ar_logits, block_logits, u, temperature, top_k, top_p, beta):
    _unsupported(top_k, top_p)
    B, V = ar_logits.shape
    K = block_logits.shape[1]
    dev = ar_logits.device
    greedy = temperature == 0.0
    mix, coef, block_v = _setup(ar_logits, temperature, beta)
    ar, blk = _last_dim_contiguous(ar_logits), _last_dim_contiguous(block_logits)
    next_drafts = torch.empty((B, K), dtype=torch.int64, device=dev)
    next_p = None if greedy else torch.empty((B, K - 1, V), dtype=torch.float32, device=dev)
    if B == 0:
        return next_drafts, next_p
    _draft_kernel[(B,)](
        ar, blk, _uniforms(u, B, K, dev), coef, next_drafts,
        next_p if next_p is not None and next_p.numel() else next_drafts,
        K, V, ar.stride(0), blk.stride(0), blk.stride(1),
        GREEDY=greedy, MIX=mix, BLOCK_V=block_v,
    )
    return next_drafts, next_p
