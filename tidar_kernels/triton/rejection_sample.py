"""Triton TiDAR verification step (``rejection_sample``) and prefill drafts (``draft_sample``).

One launch per step (batches that fill the GPU): one program per batch row walks the vocabulary in
``BLOCK_V`` chunks, straight from the raw logits (no probability tensor is materialised except the next
draft distributions the caller asked for). Greedy is its own compiled variant (argmax only). Every decision is taken in
float64 exactly as ``tidar_kernels.reference.rejection_sample`` defines it (mix, temperature, softmax
as max / sum of exp(x - max), acceptance ``u * q(d) < p(d)``, residual ``max(0, p - q)``, inverse CDF
``first index with cumsum > u * total``), so given the same uniforms the tokens and acceptance
lengths agree with the reference bit for bit (up to ~1e-16 relative summation-order effects).

Randomness: pre-drawn uniforms, or Philox4x32-10 computed in-kernel from seed/offset device scalars (bit-exact
with ``philox_uniforms``; no uniforms tensor, so a CUDA graph can capture the step). top-k / top-p: a torch
pre-pass computes per-row float64 thresholds with the reference's own ``filter_threshold`` (exact; it sorts
the rows, so it costs a full pass when those filters are on); the kernels keep ``x >= threshold``.
Small batches with large vocabularies take the vocabulary-parallel path (four launches over vocabulary
chunks, see below); ``use_vocab_parallel`` picks the path by shape.
"""
from __future__ import annotations

import copy

import torch
import triton
import triton.language as tl
from triton.language import core as _tl_core  # noqa: F401  (see _fast_calls)

from ..backends import register
from ..reference import rejection_sample as ref
from ..reference.rejection_sample import Philox


def _fast_calls(jf):
    """Under the interpreter every call of a jitted device function re-patches triton.language (about 3 ms,
    most of the interpreter's time here). A kernel launch already patches the language modules found in
    the kernel's globals (``tl`` and, imported above for this, ``triton.language.core``), so calls made
    inside our kernels can go straight to the rewritten function. Compiled: ``jf`` unchanged."""
    cls = type(jf)
    if cls.__name__ != "InterpretedFunction" or not callable(getattr(jf, "rewrite", None)):
        return jf
    fast = copy.copy(jf)
    fast.__class__ = type("_InterpretedDeviceFunction", (cls,), {
        "__call__": lambda self, *args, **kwargs: self.rewrite()(*args, **kwargs)})
    return fast


def _device(fn):
    """``triton.jit`` for the device functions below (fast calls under the interpreter)."""
    return _fast_calls(triton.jit(fn))


# triton.language's reductions (jitted functions themselves), called through fast copies under the interpreter
_max, _min, _sum, _cumsum, _zeros = map(_fast_calls, (tl.max, tl.min, tl.sum, tl.cumsum, tl.zeros))


# MIX modes of a target row: 0 = first pointer only (AR, or a raw block row), 1 = second only, 2 = mixed.
AR_ONLY, DIFF_ONLY, MIXED = 0, 1, 2


@_device
def _philox_uniform(seed, n):
    """u for the int64 ``seed`` and counter ``n`` (both read as uint64 bits): Philox4x32-10 exactly as
    ``tidar_kernels.reference.rejection_sample.philox_uniforms`` (not tl.rand: its float conversion differs)."""
    n = n.to(tl.uint64, bitcast=True)
    s = seed.to(tl.uint64, bitcast=True)
    k0 = s.to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    c0 = n.to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.full([], 0, tl.uint32)
    c3 = tl.full([], 0, tl.uint32)
    A = tl.full([], 0xD2511F53, tl.uint32)
    B = tl.full([], 0xCD9E8D57, tl.uint32)
    KEY_A = tl.full([], 0x9E3779B9, tl.uint32)
    KEY_B = tl.full([], 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.math.umulhi(B, _c2) ^ c1 ^ k0
        c2 = tl.math.umulhi(A, _c0) ^ c3 ^ k1
        c1 = B * _c2
        c3 = A * _c0
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: exact


@_device
def _row_uniforms(U_ROW, seed, n_row, K, PHILOX: tl.constexpr, BLOCK_U: tl.constexpr):
    """float64 u[b, 0..2K) of this row as one vector: loaded from the uniforms row, or Philox at counters
    ``n_row + j`` (n_row = offset + b * 2K; int64 arithmetic wraps like uint64)."""
    j = tl.arange(0, BLOCK_U)
    if PHILOX:
        u = _philox_uniform(seed, n_row + j.to(tl.int64))
    else:
        u = tl.load(U_ROW + j, mask=j < 2 * K, other=0.0)
    return u.to(tl.float64)


@_device
def _pick(uv, j, BLOCK_U: tl.constexpr):
    """uv[j] as a scalar."""
    return _sum(tl.where(tl.arange(0, BLOCK_U) == j, uv, 0.0), 0)


@_device
def _load_x(row_a, row_b, offs, mask, COEF, thr, MIX: tl.constexpr, TEMP: tl.constexpr, FILTER: tl.constexpr):
    """float64 logits of a target row at ``offs`` (-inf where masked), mixed, divided by the temperature and,
    with FILTER (top-k/top-p), -inf below the row's threshold ``thr``."""
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
    if FILTER:
        x = tl.where(x >= thr, x, float("-inf"))
    return x


@_device
def _argmax(row_a, row_b, V, COEF, MIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """First index of the maximum (torch.argmax tie-breaking)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        x = _load_x(row_a, row_b, v0 + offs, m, COEF, 0.0, MIX, False, False)
        bm = _max(x, 0)
        bi = _min(tl.where((x == bm) & m, v0 + offs, V), 0)
        upd = bm > best
        best_i = tl.where(upd, bi, best_i)
        best = tl.where(upd, bm, best)
    return best_i


@_device
def _softmax_stats(row_a, row_b, V, COEF, thr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, sum of exp(x - max)) in float64, max first (as torch.softmax), so exp(x - max) is the reference's."""
    offs = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), tl.float64)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < V, COEF, thr, MIX, True, FILTER)
        mx = tl.maximum(mx, _max(x, 0))
    z = tl.full([], 0.0, tl.float64)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < V, COEF, thr, MIX, True, FILTER)
        z += _sum(tl.exp(x - mx), 0)
    return mx, z


@_device
def _sample(row_a, row_b, V, mx, z, u, Q_ROW, use_q, P_OUT, write_p, COEF, thr, MIX: tl.constexpr,
            FILTER: tl.constexpr, BLOCK_V: tl.constexpr):
    """Inverse-CDF sample of p = softmax (or of the residual max(0, p - q) when ``use_q`` and it has mass),
    optionally writing p as float32 to ``P_OUT``."""
    offs = tl.arange(0, BLOCK_V)
    tot_r = tl.full([], 0.0, tl.float64)
    tot_p = tl.full([], 0.0, tl.float64)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, thr, MIX, True, FILTER) - mx) / z
        q = tl.load(Q_ROW + v0 + offs, mask=m & use_q, other=0.0).to(tl.float64)
        tot_r += _sum(tl.maximum(p - q, 0.0), 0)
        tot_p += _sum(p, 0)
    resid = use_q & (tot_r > 0)
    target = u * tl.where(resid, tot_r, tot_p)
    carry = tl.full([], 0.0, tl.float64)
    found = tl.full([], V, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, thr, MIX, True, FILTER) - mx) / z
        q = tl.load(Q_ROW + v0 + offs, mask=m & use_q, other=0.0).to(tl.float64)
        w = tl.where(resid, tl.maximum(p - q, 0.0), p)
        cdf = _cumsum(w, 0) + carry
        found = tl.minimum(found, _min(tl.where((cdf > target) & m, v0 + offs, V), 0))
        carry += _sum(w, 0)
        tl.store(P_OUT + v0 + offs, p.to(tl.float32), mask=m & write_p)
    return tl.minimum(found, V - 1)


@_device
def _next_drafts(BLK_ROW, s_blk_s, NEXT_ROW, NEXT_P_ROW, uv, THR_ROW, K, V, COEF,
                 GREEDY: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_U: tl.constexpr):
    """d'_1..d'_{K-1} from slots 1..K-1 of one block (raw logits, no mix); q' rows written when sampling.
    ``THR_ROW[s]``: the top-k/top-p threshold of slot s (read with FILTER only)."""
    for s in range(1, K):
        row = BLK_ROW + s * s_blk_s
        if GREEDY:
            tok = _argmax(row, row, V, COEF, 0, BLOCK_V)
        else:
            thr = tl.load(THR_ROW + s) if FILTER else 0.0
            mx, z = _softmax_stats(row, row, V, COEF, thr, 0, FILTER, BLOCK_V)
            u = _pick(uv, K + s, BLOCK_U)
            tok = _sample(row, row, V, mx, z, u, row, False, NEXT_P_ROW + (s - 1) * V, True, COEF, thr, 0, FILTER,
                          BLOCK_V)
        tl.store(NEXT_ROW + s, tok.to(tl.int64))


@triton.jit
def _rejection_kernel(
    AR, BLK, DRAFTS, Q, U, SEED, OFFSET, THR_T, THR_S, COEF, ACC, EMIT, NEXT, NEXT_P,
    K, V, s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a = tl.full([], 1, tl.int32)
    going = tl.full([], 1, tl.int32)
    if GREEDY:
        uv = _zeros([BLOCK_U], tl.float64)
    else:
        uv = _row_uniforms(U + b * 2 * K, tl.load(SEED), tl.load(OFFSET) + b * 2 * K, K, PHILOX, BLOCK_U)
    for i in range(1, K):  # the acceptance walk: p_i is target row i - 1
        if going != 0:
            ra = AR + b * s_ar_b + (i - 1) * s_ar_k
            rb = BLK + b * s_blk_b + (i - 1) * s_blk_j  # block i, slot 0
            d = tl.load(DRAFTS + b * K + i).to(tl.int32)
            if GREEDY:
                ok = d == _argmax(ra, rb, V, COEF, MIX, BLOCK_V)
            else:
                thr = tl.load(THR_T + b * K + i - 1) if FILTER else 0.0
                mx, z = _softmax_stats(ra, rb, V, COEF, thr, MIX, FILTER, BLOCK_V)
                p_d = tl.exp(_load_x(ra, rb, d, d >= 0, COEF, thr, MIX, True, FILTER) - mx) / z
                q_d = tl.load(Q + b * s_q_b + (i - 1) * s_q_k + d).to(tl.float64)
                ok = _pick(uv, i, BLOCK_U) * q_d < p_d
            a = tl.where(ok, a + 1, a)
            going = tl.where(ok, going, 0)
    last = a - 1
    ra = AR + b * s_ar_b + last * s_ar_k
    rb = BLK + b * s_blk_b + last * s_blk_j
    if GREEDY:
        tok = _argmax(ra, rb, V, COEF, MIX, BLOCK_V)
    else:
        thr = tl.load(THR_T + b * K + last) if FILTER else 0.0
        mx, z = _softmax_stats(ra, rb, V, COEF, thr, MIX, FILTER, BLOCK_V)
        has_q = a < K  # at a == K the bonus is sampled from p_K itself
        q_row = Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k
        tok = _sample(ra, rb, V, mx, z, _pick(uv, 0, BLOCK_U), q_row, has_q, NEXT_P, False, COEF, thr, MIX, FILTER,
                      BLOCK_V)
    tl.store(NEXT + b * K, tok.to(tl.int64))
    tl.store(ACC + b, a.to(tl.int64))
    offs_k = tl.arange(0, BLOCK_K)
    dk = tl.load(DRAFTS + b * K + offs_k, mask=offs_k < K, other=-1)
    tl.store(EMIT + b * K + offs_k, tl.where(offs_k < a, dk, -1), mask=offs_k < K)
    _next_drafts(BLK + b * s_blk_b + last * s_blk_j, s_blk_s, NEXT + b * K, NEXT_P + b * (K - 1) * V, uv,
                 THR_S + (b * K + last) * K, K, V, COEF, GREEDY, FILTER, BLOCK_V, BLOCK_U)


@triton.jit
def _draft_kernel(
    AR, BLK, U, SEED, OFFSET, THR_T, THR_S, COEF, NEXT, NEXT_P, K, V, s_ar_b, s_blk_b, s_blk_s,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_U: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ra = AR + b * s_ar_b
    rb = BLK + b * s_blk_b  # slot 0
    if GREEDY:
        uv = _zeros([BLOCK_U], tl.float64)
    else:
        uv = _row_uniforms(U + b * 2 * K, tl.load(SEED), tl.load(OFFSET) + b * 2 * K, K, PHILOX, BLOCK_U)
    if GREEDY:
        tok = _argmax(ra, rb, V, COEF, MIX, BLOCK_V)
    else:
        thr = tl.load(THR_T + b) if FILTER else 0.0
        mx, z = _softmax_stats(ra, rb, V, COEF, thr, MIX, FILTER, BLOCK_V)
        tok = _sample(ra, rb, V, mx, z, _pick(uv, 0, BLOCK_U), ra, False, NEXT_P, False, COEF, thr, MIX, FILTER,
                      BLOCK_V)
    tl.store(NEXT + b * K, tok.to(tl.int64))
    _next_drafts(rb, s_blk_s, NEXT + b * K, NEXT_P + b * (K - 1) * V, uv, THR_S + b * K, K, V, COEF, GREEDY, FILTER,
                 BLOCK_V, BLOCK_U)


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel step (small batch, large vocabulary): programs over (vocab chunk, row, batch)
# ---------------------------------------------------------------------------------------------
# 1. _vp_target_stats  [C, K, B]: chunk statistics of the targets p_1..p_K: (max, sum exp(x - max)) or, greedy,
#                                 (max, first argmax).
# 2. _vp_accept        [B]:       combine the chunks (M = max m_c, Z = sum_c s_c exp(m_c - M), c ascending), walk
#                                 the acceptance tests, write a / emitted, (M, Z) of p_a, the greedy correction.
# 3. _vp_chunk_mass    [C, K, B]: row 0: chunk masses of the residual max(0, p_a - q_a) and of p_a; rows
#                                 s = 1..K-1: chunk statistics of slot s of block a.
# 4. _vp_sample        [C, K, B]: every program combines its row's C chunk masses the same way, so exactly
#                                 one claims the chunk holding u * total and scans it (inverse CDF); slot
#                                 programs also write their chunk of q'.
# The decisions are the reference's (float64, same formulas); only the summation order differs (chunked
# sums, then chunks in ascending order), as in the one-launch kernel: ~1e-16 relative, so a decision can
# differ only when a uniform falls within that distance of a boundary.


@_device
def _chunk_argmax(row_a, row_b, lo, hi, COEF, MIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, first index of the max) of a target row over [lo, hi)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], 0, tl.int32) + lo
    for v0 in range(lo, hi, BLOCK_V):
        m = v0 + offs < hi
        x = _load_x(row_a, row_b, v0 + offs, m, COEF, 0.0, MIX, False, False)
        bm = _max(x, 0)
        bi = _min(tl.where((x == bm) & m, v0 + offs, hi), 0)
        upd = bm > best
        best_i = tl.where(upd, bi, best_i)
        best = tl.where(upd, bm, best)
    return best, best_i


@_device
def _chunk_stats(row_a, row_b, lo, hi, COEF, thr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, sum of exp(x - max)) over [lo, hi) in float64; (-inf, 0) for a chunk with no possible token."""
    offs = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), tl.float64)
    for v0 in range(lo, hi, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < hi, COEF, thr, MIX, True, FILTER)
        mx = tl.maximum(mx, _max(x, 0))
    s = tl.full([], 0.0, tl.float64)
    if mx > float("-inf"):
        for v0 in range(lo, hi, BLOCK_V):
            x = _load_x(row_a, row_b, v0 + offs, v0 + offs < hi, COEF, thr, MIX, True, FILTER)
            s += _sum(tl.exp(x - mx), 0)
    return mx, s


@_device
def _combine(STATS_ROW, C, BLOCK_C: tl.constexpr):
    """(M, Z) of a row from its C chunk statistics (m_c, s_c) stored as float64 pairs."""
    c = tl.arange(0, BLOCK_C)
    m = tl.load(STATS_ROW + 2 * c, mask=c < C, other=float("-inf"))
    s = tl.load(STATS_ROW + 2 * c + 1, mask=c < C, other=0.0)
    M = _max(m, 0)
    Z = _sum(tl.where(m > float("-inf"), s * tl.exp(m - M), 0.0), 0)
    return M, Z


@_device
def _combine_argmax(STATS_ROW, ARG_ROW, C, BLOCK_C: tl.constexpr):
    """First global argmax from per-chunk (max, first argmax): the lowest chunk holding the maximum."""
    c = tl.arange(0, BLOCK_C)
    m = tl.load(STATS_ROW + 2 * c, mask=c < C, other=float("-inf"))
    i = tl.load(ARG_ROW + c, mask=c < C, other=0)
    M = _max(m, 0)
    first = _min(tl.where((m == M) & (c < C), c, BLOCK_C), 0)
    return _sum(tl.where(c == first, i, 0), 0)


@triton.jit
def _vp_target_stats(
    AR, BLK, COEF, THR_T, STATS, ARG, K, V, CHUNK, C, s_ar_b, s_ar_k, s_blk_b, s_blk_j,
    GREEDY: tl.constexpr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    ra = AR + b * s_ar_b + t * s_ar_k
    rb = BLK + b * s_blk_b + t * s_blk_j  # block t+1, slot 0
    out = (b * K + t) * C + c
    if GREEDY:
        mx, arg = _chunk_argmax(ra, rb, lo, hi, COEF, MIX, BLOCK_V)
        tl.store(ARG + out, arg)
        tl.store(STATS + 2 * out, mx)
    else:
        thr = tl.load(THR_T + b * K + t) if FILTER else 0.0
        mx, s = _chunk_stats(ra, rb, lo, hi, COEF, thr, MIX, FILTER, BLOCK_V)
        tl.store(STATS + 2 * out, mx)
        tl.store(STATS + 2 * out + 1, s)


@triton.jit
def _vp_accept(
    AR, BLK, DRAFTS, Q, U, SEED, OFFSET, THR_T, COEF, STATS, ARG, ROWSTAT, ACC, EMIT, NEXT,
    K, C, s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a = tl.full([], 1, tl.int32)
    going = tl.full([], 1, tl.int32)
    if GREEDY:
        uv = _zeros([BLOCK_U], tl.float64)
    else:
        uv = _row_uniforms(U + b * 2 * K, tl.load(SEED), tl.load(OFFSET) + b * 2 * K, K, PHILOX, BLOCK_U)
    for i in range(1, K):
        if going != 0:
            row = (b * K + i - 1) * C
            d = tl.load(DRAFTS + b * K + i).to(tl.int32)
            if GREEDY:
                ok = d == _combine_argmax(STATS + 2 * row, ARG + row, C, BLOCK_C)
            else:
                M, Z = _combine(STATS + 2 * row, C, BLOCK_C)
                ra = AR + b * s_ar_b + (i - 1) * s_ar_k
                rb = BLK + b * s_blk_b + (i - 1) * s_blk_j
                thr = tl.load(THR_T + b * K + i - 1) if FILTER else 0.0
                p_d = tl.exp(_load_x(ra, rb, d, d >= 0, COEF, thr, MIX, True, FILTER) - M) / Z
                q_d = tl.load(Q + b * s_q_b + (i - 1) * s_q_k + d).to(tl.float64)
                ok = _pick(uv, i, BLOCK_U) * q_d < p_d
            a = tl.where(ok, a + 1, a)
            going = tl.where(ok, going, 0)
    row = (b * K + a - 1) * C
    if GREEDY:
        tl.store(NEXT + b * K, _combine_argmax(STATS + 2 * row, ARG + row, C, BLOCK_C).to(tl.int64))
    else:
        M, Z = _combine(STATS + 2 * row, C, BLOCK_C)
        tl.store(ROWSTAT + 2 * b, M)
        tl.store(ROWSTAT + 2 * b + 1, Z)
    tl.store(ACC + b, a.to(tl.int64))
    offs_k = tl.arange(0, BLOCK_K)
    dk = tl.load(DRAFTS + b * K + offs_k, mask=offs_k < K, other=-1)
    tl.store(EMIT + b * K + offs_k, tl.where(offs_k < a, dk, -1), mask=offs_k < K)


@triton.jit
def _vp_chunk_mass(
    AR, BLK, Q, THR_T, THR_S, COEF, ROWSTAT, ACC, STATS, ARG, K, V, CHUNK, C,
    s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    a = tl.load(ACC + b).to(tl.int32)
    last = a - 1
    out = (b * K + r) * C + c
    if r == 0:
        if not GREEDY:  # residual max(0, p_a - q_a) (q_a = 0 for the bonus at a == K) and p_a chunk masses
            ra = AR + b * s_ar_b + last * s_ar_k
            rb = BLK + b * s_blk_b + last * s_blk_j
            thr = tl.load(THR_T + b * K + last) if FILTER else 0.0
            M = tl.load(ROWSTAT + 2 * b)
            Z = tl.load(ROWSTAT + 2 * b + 1)
            use_q = a < K
            q_row = Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k
            offs = tl.arange(0, BLOCK_V)
            tot_r = tl.full([], 0.0, tl.float64)
            tot_p = tl.full([], 0.0, tl.float64)
            for v0 in range(lo, hi, BLOCK_V):
                m = v0 + offs < hi
                p = tl.exp(_load_x(ra, rb, v0 + offs, m, COEF, thr, MIX, True, FILTER) - M) / Z
                q = tl.load(q_row + v0 + offs, mask=m & use_q, other=0.0).to(tl.float64)
                tot_r += _sum(tl.maximum(p - q, 0.0), 0)
                tot_p += _sum(p, 0)
            tl.store(STATS + 2 * out, tot_r)
            tl.store(STATS + 2 * out + 1, tot_p)
    else:  # slot r of block a (raw logits)
        row = BLK + b * s_blk_b + last * s_blk_j + r * s_blk_s
        if GREEDY:
            mx, arg = _chunk_argmax(row, row, lo, hi, COEF, 0, BLOCK_V)
            tl.store(ARG + out, arg)
            tl.store(STATS + 2 * out, mx)
        else:
            thr = tl.load(THR_S + (b * K + last) * K + r) if FILTER else 0.0
            mx, s = _chunk_stats(row, row, lo, hi, COEF, thr, 0, FILTER, BLOCK_V)
            tl.store(STATS + 2 * out, mx)
            tl.store(STATS + 2 * out + 1, s)


@_device
def _claim_scan(w, u, C, c, ra, rb, lo, hi, V, M, Z, thr, q_row, resid, P_OUT, write_p, COEF,
                MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """Inverse CDF over chunks: ``w`` holds the row's C chunk masses (every program of the row computes the
    same claim from them); the claiming chunk scans its tokens (residual max(0, p - q) when ``resid``, else
    p = exp(x - M) / Z) for the first cumulative mass above u * total. Writes p of this chunk to ``P_OUT``
    when ``write_p``. Returns (this chunk claims, token)."""
    cc = tl.arange(0, BLOCK_C)
    incl = _cumsum(w, 0)
    target = u * _max(incl, 0)
    last_pos = _max(tl.where((w > 0) & (cc < C), cc, 0), 0)
    claim = tl.minimum(_min(tl.where((incl > target) & (cc < C), cc, BLOCK_C), 0), last_pos)
    carry = _sum(tl.where(cc == claim, incl - w, 0.0), 0)
    offs = tl.arange(0, BLOCK_V)
    found = tl.full([], 0, tl.int32) + V
    last_w = tl.full([], -1, tl.int32)
    for v0 in range(lo, hi, BLOCK_V):
        m = v0 + offs < hi
        p = tl.exp(_load_x(ra, rb, v0 + offs, m, COEF, thr, MIX, True, FILTER) - M) / Z
        q = tl.load(q_row + v0 + offs, mask=m & resid, other=0.0).to(tl.float64)
        wv = tl.where(resid, tl.maximum(p - q, 0.0), p)
        cdf = _cumsum(wv, 0) + carry
        found = tl.minimum(found, _min(tl.where((cdf > target) & m, v0 + offs, V), 0))
        last_w = tl.maximum(last_w, _max(tl.where((wv > 0) & m, v0 + offs, -1), 0))
        carry += _sum(wv, 0)
        tl.store(P_OUT + v0 + offs, p.to(tl.float32), mask=m & write_p)
    tok = tl.where(found < V, found, tl.where(last_w >= 0, last_w, hi - 1))  # rounding guard
    return c == claim, tok


@triton.jit
def _vp_sample(
    AR, BLK, Q, U, SEED, OFFSET, THR_T, THR_S, COEF, ROWSTAT, ACC, STATS, ARG, NEXT, NEXT_P, K, V, CHUNK, C,
    s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    a = tl.load(ACC + b).to(tl.int32)
    last = a - 1
    srow = STATS + 2 * (b * K + r) * C
    cc = tl.arange(0, BLOCK_C)
    if GREEDY:
        if r > 0:
            if c == 0:
                tok = _combine_argmax(srow, ARG + (b * K + r) * C, C, BLOCK_C)
                tl.store(NEXT + b * K + r, tok.to(tl.int64))
    else:
        uv = _row_uniforms(U + b * 2 * K, tl.load(SEED), tl.load(OFFSET) + b * 2 * K, K, PHILOX, BLOCK_U)
        if r == 0:  # correction / bonus: chunk masses of the residual, or of p_a when it has none
            use_q = a < K  # at a == K the bonus is sampled from p_K itself
            mass_r = tl.load(srow + 2 * cc, mask=cc < C, other=0.0)
            mass_p = tl.load(srow + 2 * cc + 1, mask=cc < C, other=0.0)
            resid = use_q & (_sum(mass_r, 0) > 0)
            thr = tl.load(THR_T + b * K + last) if FILTER else 0.0
            claims, tok = _claim_scan(
                tl.where(resid, mass_r, mass_p), _pick(uv, 0, BLOCK_U), C, c,
                AR + b * s_ar_b + last * s_ar_k, BLK + b * s_blk_b + last * s_blk_j, lo, hi, V,
                tl.load(ROWSTAT + 2 * b), tl.load(ROWSTAT + 2 * b + 1), thr,
                Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k, resid, NEXT_P, False, COEF,
                MIX, FILTER, BLOCK_V, BLOCK_C)
        else:  # slot r of block a (raw logits): chunk masses s_c exp(m_c - M) / Z; writes q'
            row = BLK + b * s_blk_b + last * s_blk_j + r * s_blk_s
            M, Z = _combine(srow, C, BLOCK_C)
            m_c = tl.load(srow + 2 * cc, mask=cc < C, other=float("-inf"))
            s_c = tl.load(srow + 2 * cc + 1, mask=cc < C, other=0.0)
            thr = tl.load(THR_S + (b * K + last) * K + r) if FILTER else 0.0
            claims, tok = _claim_scan(
                tl.where(m_c > float("-inf"), s_c * tl.exp(m_c - M) / Z, 0.0), _pick(uv, K + r, BLOCK_U), C, c,
                row, row, lo, hi, V, M, Z, thr, row, False, NEXT_P + (b * (K - 1) + r - 1) * V, True, COEF,
                0, FILTER, BLOCK_V, BLOCK_C)
        if claims:
            tl.store(NEXT + b * K + r, tok.to(tl.int64))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# No fused multiply-add: the beta mix ``beta * a + (1 - beta) * b`` must round like the reference's separate
# torch ops, since top-k/top-p thresholds (computed by torch) are compared with ``x >= threshold`` exactly.
_NO_FMA = dict(enable_fp_fusion=False)

_COEF: dict = {}  # (temperature, beta, device) -> float64 [T, beta, 1 - beta], made once (no copy inside a CUDA graph)


def _setup(ar_logits, temperature, beta):
    mix = AR_ONLY if beta == 1.0 else DIFF_ONLY if beta == 0.0 else MIXED
    key = (temperature, beta, ar_logits.device)
    coef = _COEF.get(key)
    if coef is None:
        if len(_COEF) > 64:
            _COEF.clear()
        coef = _COEF[key] = torch.tensor([temperature if temperature > 0 else 1.0, beta, 1.0 - beta],
                                         dtype=torch.float64, device=ar_logits.device)
    V = ar_logits.shape[-1]
    block_v = min(triton.next_power_of_2(V), 1024 if ar_logits.device.type == "cuda" else 256)
    return mix, coef, block_v


def _randomness(u, B, K, device):
    """(uniforms, seed, offset, PHILOX) kernel arguments; the unused ones are never read."""
    dummy_i = torch.zeros(1, dtype=torch.int64, device=device)
    if isinstance(u, Philox):
        return dummy_i.float(), u.seed, u.offset, True
    if u is None:  # greedy
        return dummy_i.float(), dummy_i, dummy_i, False
    return u.contiguous(), dummy_i, dummy_i, False


def _thresholds(target, slots, temperature, top_k, top_p):
    """top-k/top-p pre-pass: per-row float64 thresholds of the targets and the block slots (the reference's
    ``filter_threshold`` on the same float64 tempered logits, so the kernel's ``x >= thr`` keeps exactly the
    reference's tokens). Returns (THR_T, THR_S, FILTER)."""
    if top_k is None and top_p is None:
        z = torch.zeros(1, dtype=torch.float64, device=target.device)
        return z, z, False
    thr_t = ref.filter_threshold(target / temperature, top_k, top_p).contiguous()
    if top_p is None:  # top-k alone: x = logit / T is strictly increasing in the logit, so the k-th largest
        # raw logit, converted the kernel's way, is exactly the threshold (no float64 copy of the block rows)
        thr_s = (torch.topk(slots, top_k, dim=-1).values[..., -1].double() / temperature).contiguous()
    else:
        thr_s = ref.filter_threshold(slots.double() / temperature, top_k, top_p).contiguous()
    return thr_t, thr_s, True


# Path choice: the one-launch kernel runs one program per batch row; when that leaves most of the GPU idle
# (batch below the SM count) and the vocabulary is large, the step is split over vocabulary chunks.
VOCAB_PARALLEL: bool | None = None  # None: by shape; True / False force a path (tests)
VOCAB_CHUNK: int | None = None  # tokens per chunk of the vocabulary-parallel path (None: 4096 on CUDA, 64 else)


def _vocab_chunk(device) -> int:
    return VOCAB_CHUNK or (4096 if device.type == "cuda" else 64)


def use_vocab_parallel(B: int, K: int, V: int, device) -> bool:
    """Whether a [B, K, V] step runs vocabulary-parallel."""
    if VOCAB_PARALLEL is not None:
        return VOCAB_PARALLEL
    if device.type != "cuda":
        return False
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return B < sms and V >= 4 * _vocab_chunk(device)


@register("rejection_sample", "triton")
def rejection_sample(ar_logits, block_logits, drafts, draft_probs, u, temperature, top_k, top_p, beta):
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
    uu, seed, offset, philox = _randomness(u, B, K, dev)
    if greedy:
        thr_t, thr_s, filt = _thresholds(ar_logits[:0, 0], block_logits[:0, 0], 1.0, None, None)
    else:
        thr_t, thr_s, filt = _thresholds(ref.mix(ar_logits, block_logits[:, :, 0], beta), block_logits, temperature,
                                         top_k, top_p)
    p_out = next_p if next_p is not None and next_p.numel() else accepted
    strides = (ar.stride(0), ar.stride(1), blk.stride(0), blk.stride(1), blk.stride(2), q.stride(0), q.stride(1))
    flags = dict(GREEDY=greedy, MIX=mix, FILTER=filt)
    block_k, block_u = max(2, triton.next_power_of_2(K)), triton.next_power_of_2(2 * K)
    if not use_vocab_parallel(B, K, V, dev):
        _rejection_kernel[(B,)](
            ar, blk, drafts, q, uu, seed, offset, thr_t, thr_s, coef, accepted, emitted, next_drafts, p_out,
            K, V, *strides, PHILOX=philox, BLOCK_V=block_v, BLOCK_K=block_k, BLOCK_U=block_u, **flags, **_NO_FMA,
        )
        return accepted, emitted, next_drafts, next_p
    chunk = _vocab_chunk(dev)
    C = triton.cdiv(V, chunk)
    block_vc, block_c = min(triton.next_power_of_2(chunk), block_v), max(2, triton.next_power_of_2(C))
    stats = torch.empty((B, K, C, 2), dtype=torch.float64, device=dev)
    arg = torch.empty((B, K, C), dtype=torch.int32, device=dev) if greedy else accepted
    rowstat = torch.empty((B, 2), dtype=torch.float64, device=dev)
    s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k = strides
    _vp_target_stats[(C, K, B)](ar, blk, coef, thr_t, stats, arg, K, V, chunk, C, s_ar_b, s_ar_k, s_blk_b, s_blk_j,
                                BLOCK_V=block_vc, **flags, **_NO_FMA)
    _vp_accept[(B,)](ar, blk, drafts, q, uu, seed, offset, thr_t, coef, stats, arg, rowstat, accepted, emitted,
                     next_drafts, K, C, s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_q_b, s_q_k, PHILOX=philox,
                     BLOCK_K=block_k, BLOCK_U=block_u, BLOCK_C=block_c, **flags, **_NO_FMA)
    _vp_chunk_mass[(C, K, B)](ar, blk, q, thr_t, thr_s, coef, rowstat, accepted, stats, arg, K, V, chunk, C, *strides,
                              BLOCK_V=block_vc, **flags, **_NO_FMA)
    _vp_sample[(C, K, B)](ar, blk, q, uu, seed, offset, thr_t, thr_s, coef, rowstat, accepted, stats, arg,
                          next_drafts, p_out, K, V, chunk, C, *strides, PHILOX=philox, BLOCK_V=block_vc,
                          BLOCK_U=block_u, BLOCK_C=block_c, **flags, **_NO_FMA)
    return accepted, emitted, next_drafts, next_p


@register("draft_sample", "triton")
def draft_sample(ar_logits, block_logits, u, temperature, top_k, top_p, beta):
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
    uu, seed, offset, philox = _randomness(u, B, K, dev)
    if greedy:
        thr_t, thr_s, filt = _thresholds(ar_logits[:0], block_logits[:0], 1.0, None, None)
    else:
        thr_t, thr_s, filt = _thresholds(ref.mix(ar_logits, block_logits[:, 0], beta), block_logits, temperature,
                                         top_k, top_p)
    _draft_kernel[(B,)](
        ar, blk, uu, seed, offset, thr_t, thr_s, coef, next_drafts,
        next_p if next_p is not None and next_p.numel() else next_drafts,
        K, V, ar.stride(0), blk.stride(0), blk.stride(1),
        GREEDY=greedy, MIX=mix, PHILOX=philox, FILTER=filt, BLOCK_V=block_v, BLOCK_U=triton.next_power_of_2(2 * K),
        **_NO_FMA,
    )
    return next_drafts, next_p


draft_sample.philox = rejection_sample.philox = True  # Philox state is expanded in-kernel
