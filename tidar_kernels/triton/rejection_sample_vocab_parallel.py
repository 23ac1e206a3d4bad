"""Triton vocabulary-parallel rejection step: four launches over vocabulary chunks, for small batches with large
vocabularies (``rejection_sample.use_vocab_parallel`` picks the path; ``rejection_sample.rejection_sample`` launches
it). The same device routines as the one-launch kernel (``sampling.py``), run per chunk instead of over [0, V).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sampling import (
    MIX_AR,
    _accept_test,
    _claim_scan,
    _combine,
    _combine_argmax,
    _pick,
    _range_argmax,
    _range_mass,
    _range_stats,
    _row_start,
    _store_acceptance,
)

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


@triton.jit
def _vp_target_stats(
    AR, BLK, COEF, THR_T, STATS, ARG, K, V, CHUNK, C, s_ar_b, s_ar_k, s_blk_b, s_blk_j,
    GREEDY: tl.constexpr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    ra = AR + b * s_ar_b + t * s_ar_k
    rb = BLK + b * s_blk_b + t * s_blk_j  # block t+1, slot 0
    out = (b * K + t) * C + c
    if GREEDY:
        mx, arg = _range_argmax(ra, rb, lo, hi, COEF, MIX, BLOCK_V)
        tl.store(ARG + out, arg)
        tl.store(STATS + 2 * out, mx)
    else:
        thr = tl.load(THR_T + b * K + t) if FILTER else 0.0
        mx, s = _range_stats(ra, rb, lo, hi, COEF, thr, MIX, FILTER, BLOCK_V)
        tl.store(STATS + 2 * out, mx)
        tl.store(STATS + 2 * out + 1, s)


@triton.jit
def _vp_accept(
    AR, BLK, DRAFTS, Q, U, SEED, OFFSET, THR_T, COEF, STATS, ARG, ROWSTAT, ACC, EMIT, NEXT,
    K, C, s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    a = tl.full([], 1, tl.int32)
    going = tl.full([], 1, tl.int32)
    uv = _row_start(U, SEED, OFFSET, b, K, GREEDY, PHILOX, BLOCK_U)
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
                q_d = tl.load(Q + b * s_q_b + (i - 1) * s_q_k + d).to(tl.float64)
                ok = _accept_test(ra, rb, d, M, Z, thr, q_d, uv, i, COEF, MIX, FILTER, BLOCK_U)
            a = tl.where(ok, a + 1, a)
            going = tl.where(ok, going, 0)
    row = (b * K + a - 1) * C
    if GREEDY:
        tl.store(NEXT + b * K, _combine_argmax(STATS + 2 * row, ARG + row, C, BLOCK_C).to(tl.int64))
    else:
        M, Z = _combine(STATS + 2 * row, C, BLOCK_C)
        tl.store(ROWSTAT + 2 * b, M)
        tl.store(ROWSTAT + 2 * b + 1, Z)
    _store_acceptance(ACC, EMIT, DRAFTS, b, a, K, BLOCK_K)


@triton.jit
def _after_acceptance(ACC, CHUNK, V):
    """(chunk c, slot row r, batch row b, the chunk's [lo, hi), accepted length a) of a program of the steps that
    run after the acceptance walk, over the grid (C, K, B)."""
    c = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    return c, r, b, lo, hi, tl.load(ACC + b).to(tl.int32)


@triton.jit
def _vp_chunk_mass(
    AR, BLK, Q, THR_T, THR_S, COEF, ROWSTAT, ACC, STATS, ARG, K, V, CHUNK, C,
    s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    c, r, b, lo, hi, a = _after_acceptance(ACC, CHUNK, V)
    last = a - 1
    out = (b * K + r) * C + c
    if r == 0:
        if not GREEDY:  # residual max(0, p_a - q_a) (q_a = 0 for the bonus at a == K) and p_a chunk masses
            ra = AR + b * s_ar_b + last * s_ar_k
            rb = BLK + b * s_blk_b + last * s_blk_j
            thr = tl.load(THR_T + b * K + last) if FILTER else 0.0
            M = tl.load(ROWSTAT + 2 * b)
            Z = tl.load(ROWSTAT + 2 * b + 1)
            q_row = Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k
            tot_r, tot_p = _range_mass(ra, rb, lo, hi, M, Z, thr, q_row, a < K, COEF, MIX, FILTER, BLOCK_V)
            tl.store(STATS + 2 * out, tot_r)
            tl.store(STATS + 2 * out + 1, tot_p)
    else:  # slot r of block a (raw logits)
        row = BLK + b * s_blk_b + last * s_blk_j + r * s_blk_s
        if GREEDY:
            mx, arg = _range_argmax(row, row, lo, hi, COEF, MIX_AR, BLOCK_V)
            tl.store(ARG + out, arg)
            tl.store(STATS + 2 * out, mx)
        else:
            thr = tl.load(THR_S + (b * K + last) * K + r) if FILTER else 0.0
            mx, s = _range_stats(row, row, lo, hi, COEF, thr, MIX_AR, FILTER, BLOCK_V)
            tl.store(STATS + 2 * out, mx)
            tl.store(STATS + 2 * out + 1, s)


@triton.jit
def _vp_sample(
    AR, BLK, Q, U, SEED, OFFSET, THR_T, THR_S, COEF, ROWSTAT, ACC, STATS, ARG, NEXT, NEXT_P, K, V, CHUNK, C,
    s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c, r, b, lo, hi, a = _after_acceptance(ACC, CHUNK, V)
    last = a - 1
    srow = STATS + 2 * (b * K + r) * C
    cc = tl.arange(0, BLOCK_C)
    if GREEDY:
        if r > 0:
            if c == 0:
                tok = _combine_argmax(srow, ARG + (b * K + r) * C, C, BLOCK_C)
                tl.store(NEXT + b * K + r, tok.to(tl.int64))
    else:
        uv = _row_start(U, SEED, OFFSET, b, K, False, PHILOX, BLOCK_U)
        if r == 0:  # correction / bonus: chunk masses of the residual, or of p_a when it has none
            use_q = a < K  # at a == K the bonus is sampled from p_K itself
            mass_r = tl.load(srow + 2 * cc, mask=cc < C, other=0.0)
            mass_p = tl.load(srow + 2 * cc + 1, mask=cc < C, other=0.0)
            resid = use_q & (tl.sum(mass_r, 0) > 0)
            thr = tl.load(THR_T + b * K + last) if FILTER else 0.0
            claims, tok = _claim_scan(
                tl.where(resid, mass_r, mass_p),
                _pick(uv, 0, BLOCK_U),
                C,
                c,
                AR + b * s_ar_b + last * s_ar_k,
                BLK + b * s_blk_b + last * s_blk_j,
                lo,
                hi,
                V,
                tl.load(ROWSTAT + 2 * b),
                tl.load(ROWSTAT + 2 * b + 1),
                thr,
                Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k,
                resid,
                NEXT_P,
                False,
                COEF,
                MIX,
                FILTER,
                BLOCK_V,
                BLOCK_C,
            )
        else:  # slot r of block a (raw logits): chunk masses s_c exp(m_c - M) / Z; writes q'
            row = BLK + b * s_blk_b + last * s_blk_j + r * s_blk_s
            M, Z = _combine(srow, C, BLOCK_C)
            m_c = tl.load(srow + 2 * cc, mask=cc < C, other=float("-inf"))
            s_c = tl.load(srow + 2 * cc + 1, mask=cc < C, other=0.0)
            thr = tl.load(THR_S + (b * K + last) * K + r) if FILTER else 0.0
            claims, tok = _claim_scan(
                tl.where(m_c > float("-inf"), s_c * tl.exp(m_c - M) / Z, 0.0),
                _pick(uv, K + r, BLOCK_U),
                C,
                c,
                row,
                row,
                lo,
                hi,
                V,
                M,
                Z,
                thr,
                row,
                False,
                NEXT_P + (b * (K - 1) + r - 1) * V,
                True,
                COEF,
                MIX_AR,
                FILTER,
                BLOCK_V,
                BLOCK_C,
            )
        if claims:
            tl.store(NEXT + b * K + r, tok.to(tl.int64))
