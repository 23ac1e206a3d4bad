"""Triton kernels of ``tidar_attention`` (forward, split-KV merge, dQ, dK/dV) and their device functions; the
work decomposition and tile classes are described in ``tidar_attention.py``, which launches them."""

from __future__ import annotations

import triton
import triton.language as tl

# Hand-formatted (kernel parameters grouped by role, one role per line; long device-function calls kept dense):
# the formatter would put every parameter and argument on a line of its own.
# fmt: off

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_stats(LL, BID, SPAN_LO, SPAN_HI, rows, row_ok, G, S):
    qi = rows // G
    ll = tl.load(LL + qi, mask=row_ok, other=0)
    bq = tl.load(BID + qi, mask=row_ok, other=-1)
    slo = tl.load(SPAN_LO + qi, mask=row_ok, other=S)
    shi = tl.load(SPAN_HI + qi, mask=row_ok, other=0)
    lim_min = tl.min(tl.where(row_ok, ll, S), 0)
    lim_max = tl.max(ll, 0)
    blk_lo = tl.min(slo, 0)
    blk_hi = tl.max(shi, 0)
    return qi, ll, bq, lim_min, lim_max, blk_lo, blk_hi


@triton.jit
def _tanh(x):
    """tanh to a few ulp in fp32 on the interpreter and the GPU alike (libdevice is not interpretable): an odd
    Taylor polynomial near 0 (where 1 - exp(-2|x|) would cancel), else (1 - e) / (1 + e) with e = exp(-2|x|)."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|), in (0, 1]: no overflow
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                      + x2 * 0.021869488536155203))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, qk_scale, cap, SOFTCAP: tl.constexpr):
    """log2-domain scores of raw dot products ``qk`` and ``t``, the tanh of the soft-cap (for the backward).
    Without soft-capping ``qk_scale = scale * log2(e)`` and ``t`` is unused; with it ``qk_scale = scale / softcap``,
    ``cap = softcap * log2(e)``: s = log2(e) * softcap * tanh(scale * qk / softcap) (Gemma2's order: scale, cap)."""
    if SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * cap
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _visible(kj, ll, bq, seg, S, BID):
    """The layout rule for a [rows, keys] tile (keys kj absolute, out-of-range keys never visible)."""
    rel = kj - seg
    in_seg = (rel >= 0) & (rel < S)
    bk = tl.load(BID + rel, mask=in_seg, other=-2)
    return (rel[None, :] < ll[:, None]) | (in_seg[None, :] & (bq[:, None] >= 0) & (bk[None, :] == bq[:, None]))


@triton.jit
def _kv_tile_scores(q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID, qk_scale, cap, sks, svs,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    """One K/V tile at key ``start`` for a query tile (forward and dQ): (k, v, scores s in log2 units, tanh t of the
    soft-capped scores); on a MASKED (partial) tile, keys past Skv are not loaded and s is -inf where the layout rule
    hides a key (full tiles skip both)."""
    kj = start + offs_n
    if MASKED:
        kmask = (kj < Skv)[:, None] & d_ok[None, :]
    else:
        kmask = (kj >= 0)[:, None] & d_ok[None, :]
    k = tl.load(k_ptrs + kj[:, None].to(tl.int64) * sks, mask=kmask, other=0.0)
    v = tl.load(v_ptrs + kj[:, None].to(tl.int64) * svs, mask=kmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s, t = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap, SOFTCAP)
    if MASKED:
        s = tl.where(_visible(kj, ll, bq, seg, S, BID), s, float("-inf"))
    return k, v, s, t


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID, qk_scale, cap,
              sks, svs, MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    k, v, s, _ = _kv_tile_scores(q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID, qk_scale, cap,
                                 sks, svs, MASKED, UPCAST, PREC, SOFTCAP)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, LL, BID, SPAN_LO, SPAN_HI, SEG,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    slb, slh, sls, sl_split,
    S, Skv, G, Hkv, qk_scale, cap, n_splits,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    sid = tl.program_id(2)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * G
    qi, ll, bq, lim_min, lim_max, blk_lo, blk_hi = _tile_stats(LL, BID, SPAN_LO, SPAN_HI, rows, row_ok, G, S)
    head = hk * G + rows % G
    seg = tl.load(SEG + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    q_off = b64 * sqb + head.to(tl.int64)[:, None] * sqh + qi.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + b64 * skb + hk.to(tl.int64) * skh + offs_d[None, :] * skd
    v_ptrs = V + b64 * svb + hk.to(tl.int64) * svh + offs_d[None, :] * svd

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # range A, this split's share of its tiles: full tiles, then the partial tail
    end_a = seg + lim_max
    n_tiles_a = tl.cdiv(end_a, BLOCK_N)
    per = tl.cdiv(n_tiles_a, n_splits)
    lo = sid * per * BLOCK_N
    hi = tl.minimum((sid + 1) * per, n_tiles_a) * BLOCK_N
    full_end = ((seg + lim_min) // BLOCK_N) * BLOCK_N
    for start in range(lo, tl.minimum(hi, full_end), BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv,
                                  BID, qk_scale, cap, sks, svs, False, UPCAST, PREC, SOFTCAP)
    for start in range(tl.maximum(lo, full_end), hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv,
                                  BID, qk_scale, cap, sks, svs, True, UPCAST, PREC, SOFTCAP)
    # range B (the own-block part past range A), split 0 only
    if sid == 0:
        for start in range(tl.maximum(seg + blk_lo, n_tiles_a * BLOCK_N), seg + blk_hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv,
                                      BID, qk_scale, cap, sks, svs, True, UPCAST, PREC, SOFTCAP)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = m_i + tl.log2(tl.where(seen, l_i, 1.0))  # log2-sum-exp2 of the scaled scores
    o_off = b64 * sob + head.to(tl.int64)[:, None] * soh + qi.to(tl.int64)[:, None] * sos + offs_d[None, :] * sod
    l_off = b64 * slb + head.to(tl.int64) * slh + qi.to(tl.int64) * sls
    if SPLIT:
        o_off += sid.to(tl.int64) * sl_split * BLOCK_D  # partial outputs: [split][B, Hq, S, BLOCK_D] fp32
        tl.store(O + o_off, out, mask=row_ok[:, None])
        tl.store(LSE + sid.to(tl.int64) * sl_split + l_off, tl.where(seen, lse2, float("-inf")), mask=row_ok)
    else:
        tl.store(O + o_off, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        # natural-log LSE for the backward; +inf for a query that sees nothing (its P is then 0)
        tl.store(LSE + l_off, tl.where(seen, lse2 / 1.4426950408889634, float("inf")), mask=row_ok)


@triton.jit
def _merge_kernel(OP, LSEP, O, LSE, n_rows, n_splits, split_stride, Hq, S, sob, soh, sos, sod,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    r = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_SPLIT)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    lse = tl.load(LSEP + offs_s.to(tl.int64) * split_stride + r, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx_safe)
    tot = tl.sum(w, 0)
    o = tl.load(OP + (offs_s.to(tl.int64) * split_stride + r)[:, None] * BLOCK_D + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    b = r // (Hq * S)
    h = (r // S) % Hq
    i = r % S
    o_off = b.to(tl.int64) * sob + h.to(tl.int64) * soh + i.to(tl.int64) * sos + offs_d * sod
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + r, tl.where(tot > 0, (mx + tl.log2(tot)) / 1.4426950408889634, float("inf")))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, LL, BID, SPAN_LO, SPAN_HI, SEG,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    S, Skv, G, Hkv, qk_scale, cap, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * G
    qi, ll, bq, lim_min, lim_max, blk_lo, blk_hi = _tile_stats(LL, BID, SPAN_LO, SPAN_HI, rows, row_ok, G, S)
    head = hk * G + rows % G
    Hq = Hkv * G
    seg = tl.load(SEG + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    rmask = row_ok[:, None] & d_ok[None, :]
    q_off = b64 * sqb + head.to(tl.int64)[:, None] * sqh + qi.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(Q + q_off, mask=rmask, other=0.0)
    d_off = b64 * sdb + head.to(tl.int64)[:, None] * sdh + qi.to(tl.int64)[:, None] * sds + offs_d[None, :] * sdd
    do = tl.load(DO + d_off, mask=rmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    r_off = (b64 * Hq + head) * S + qi  # LSE / DELTA are contiguous [B, Hq, S]
    lse2 = tl.load(LSE + r_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + r_off, mask=row_ok, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + b64 * skb + hk.to(tl.int64) * skh + offs_d[None, :] * skd
    v_ptrs = V + b64 * svb + hk.to(tl.int64) * svh + offs_d[None, :] * svd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end_a = tl.cdiv(seg + lim_max, BLOCK_N) * BLOCK_N
    full_end = ((seg + lim_min) // BLOCK_N) * BLOCK_N
    for start in range(0, tl.minimum(end_a, full_end), BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID,
                      qk_scale, cap, sks, svs, False, UPCAST, PREC, SOFTCAP)
    for start in range(full_end, end_a, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID,
                      qk_scale, cap, sks, svs, True, UPCAST, PREC, SOFTCAP)
    for start in range(tl.maximum(seg + blk_lo, end_a), seg + blk_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID,
                      qk_scale, cap, sks, svs, True, UPCAST, PREC, SOFTCAP)
    dq_off = b64 * sqb + head.to(tl.int64)[:, None] * sqh + qi.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID, qk_scale, cap,
             sks, svs, MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    k, v, s, t = _kv_tile_scores(q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID, qk_scale, cap,
                                 sks, svs, MASKED, UPCAST, PREC, SOFTCAP)
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
        ds = ds * (1.0 - t * t)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _dkdv_tile(dk, dv, k, v, m0, kj, n0, offs_d, d_ok, b64, hk, seg, Q, DO, LSE, DELTA, LL, BID, SPAN_LO, SPAN_HI,
               sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, S, G, Hq, qk_scale, cap,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               SOFTCAP: tl.constexpr):
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < S * G
    qi, ll, bq, lim_min, lim_max, blk_lo, blk_hi = _tile_stats(LL, BID, SPAN_LO, SPAN_HI, rows, row_ok, G, S)
    head = hk * G + rows % G
    rmask = row_ok[:, None] & d_ok[None, :]
    q_off = (b64 * sqb + head.to(tl.int64)[:, None] * sqh + qi.to(tl.int64)[:, None] * sqs
             + offs_d[None, :] * sqd)
    q = tl.load(Q + q_off, mask=rmask, other=0.0)
    d_off = (b64 * sdb + head.to(tl.int64)[:, None] * sdh + qi.to(tl.int64)[:, None] * sds
             + offs_d[None, :] * sdd)
    do = tl.load(DO + d_off, mask=rmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    r_off = (b64 * Hq + head) * S + qi
    lse2 = tl.load(LSE + r_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + r_off, mask=row_ok, other=0.0)
    s, t = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap, SOFTCAP)
    # the layout rule, skipped (as a select, not a branch around the loads) on full tiles
    full = n0 + BLOCK_N <= seg + lim_min
    s = tl.where(_visible(kj, ll, bq, seg, S, BID) | full, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, LL, BID, SPAN_LO, SPAN_HI, SEG, RANGES,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    s_dkb, s_dkh, s_dks, s_dkd, s_dvb, s_dvh, s_dvs, s_dvd,
    S, Skv, G, Hkv, qk_scale, cap, sm_scale, n_key_tiles,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    Hq = Hkv * G
    b64 = b.to(tl.int64)
    seg = tl.load(SEG + b)
    n0 = pid_n * BLOCK_N
    kj = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kmask = (kj < Skv)[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * skb + hk.to(tl.int64) * skh + kj[:, None].to(tl.int64) * sks + offs_d[None, :] * skd,
                mask=kmask, other=0.0)
    v = tl.load(V + b64 * svb + hk.to(tl.int64) * svh + kj[:, None].to(tl.int64) * svs + offs_d[None, :] * svd,
                mask=kmask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # the (at most two, disjoint) query-row ranges that can see this key tile (``dkdv_ranges``), walked as one
    # loop (range B's rows follow range A's; the jump is arithmetic, not a branch) with no data-dependent
    # branch around the Q/dO loads, so the software pipeliner applies (cp.async)
    r_ptr = RANGES + (b64 * n_key_tiles + pid_n) * 4
    a_lo = tl.load(r_ptr)
    a_hi = tl.load(r_ptr + 1)
    b_lo = tl.load(r_ptr + 2)
    b_hi = tl.load(r_ptr + 3)
    jump = b_lo - a_hi
    for m in range(a_lo, a_hi + (b_hi - b_lo), BLOCK_M):
        m0 = m + tl.where(m >= a_hi, jump, 0)
        dk, dv = _dkdv_tile(dk, dv, k, v, m0, kj, n0, offs_d, d_ok, b64, hk, seg, Q, DO, LSE, DELTA, LL, BID,
                            SPAN_LO, SPAN_HI, sqb, sqh, sqs, sqd, sdb, sdh, sds, sdd, S, G, Hq, qk_scale, cap,
                            BLOCK_M, BLOCK_N, UPCAST, PREC, SOFTCAP)
    dk_off = b64 * s_dkb + hk.to(tl.int64) * s_dkh + kj[:, None].to(tl.int64) * s_dks + offs_d[None, :] * s_dkd
    dv_off = b64 * s_dvb + hk.to(tl.int64) * s_dvh + kj[:, None].to(tl.int64) * s_dvs + offs_d[None, :] * s_dvd
    tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + dv_off, dv.to(DV.dtype.element_ty), mask=kmask)
