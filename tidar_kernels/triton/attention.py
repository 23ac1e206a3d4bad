"""Triton ``tidar_attention``: forward, split-KV merge and backward, driven by the O(S) layout vectors.

Work decomposition
------------------
Rows of a query tile are the flattened (query, GQA head) pairs of one KV head: row ``r`` of KV head
``hk`` is query ``r // G`` of q head ``hk * G + r % G`` (G = Hq // Hkv). Every K/V tile is therefore
loaded once for the whole group (the inference regime), and with G = 1 this is a plain query tile.

Tile classes (per query tile, from ``local_limit``/``block_id``/``seg_start`` only; no dense mask):
  * range A, the prefix part ``[0, seg + max(local_limit))``: key tiles ending at or before
    ``seg + min(local_limit)`` are *full* (every row sees every key: no mask arithmetic, no bound checks);
    the rest of range A is *partial* (masked by the layout rule).
  * range B, the block part ``[max(seg + min(span_lo), end of range A's last tile), seg + max(span_hi))``
    where ``span_lo/hi`` is the extent of the query's own block (from ``_block_spans``): partial.
  * everything else is *empty*: never loaded.
So the training layout (about 75% empty) costs its unmasked area, and in the decode step every
cached-prefix tile is full. ``tile_classes`` is the same rule in PyTorch (tested against the dense twin).

Split-KV: when ``B * Hkv * query tiles`` cannot fill the GPU and the prefix is long, range A is cut
into ``num_splits`` chunks written as (normalised partial output, log2-sum-exp) in fp32 and merged.

Backward (FlashAttention-2 style): ``delta = rowsum(dO * O)``; one kernel per query tile for dQ
(same tile walk as the forward) and one per key tile for dK/dV that accumulates the whole GQA group without
atomics. The dK/dV kernel walks, per key tile, at most two disjoint query-row ranges (``dkdv_ranges``, from the
same per-tile statistics as ``tile_classes``: the non-empty query tiles minus the longest empty run between them)
as one loop with no data-dependent branch around its Q/dO loads, so Triton pipelines them (cp.async); partial
tiles are masked by a select.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register, triton_interpreted

LOG2E = 1.4426950408889634
EMPTY, FULL, PARTIAL = 0, 1, 2

# Test hook: force tile sizes, e.g. {"BLOCK_M": 16, "BLOCK_N": 16}; None = automatic.
_FORCE_CONFIG: dict | None = None


# ---------------------------------------------------------------------------------------------
# Layout statistics (host, O(S) torch ops, no device sync)
# ---------------------------------------------------------------------------------------------


def _block_spans(block_id: torch.Tensor):
    """``span_lo[i], span_hi[i]``: first and one-past-last segment index of query i's block
    (``S, 0`` when ``block_id[i] < 0``). A stable sort keeps positions ascending inside each block."""
    S = block_id.shape[0]
    bid = block_id.to(torch.int32).contiguous()
    sorted_b, order = torch.sort(bid, stable=True)
    lo = order[torch.searchsorted(sorted_b, bid, right=False)]
    hi = order[torch.searchsorted(sorted_b, bid, right=True) - 1] + 1
    has = bid >= 0
    lo = torch.where(has, lo, torch.full_like(lo, S))
    hi = torch.where(has, hi, torch.zeros_like(hi))
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def tile_classes(local_limit, block_id, seg_start, kv_len: int, group: int, block_m: int, block_n: int):
    """``[B, n_query_tiles, n_key_tiles]`` int8 classes (EMPTY/FULL/PARTIAL) as the kernels decide them,
    for key tiles aligned at 0 (what the dK/dV kernel walks) and query tiles of ``block_m`` flattened
    (query, group head) rows."""
    S = local_limit.shape[0]
    lo, hi = _block_spans(block_id)
    rows = torch.arange(triton.cdiv(S * group, block_m) * block_m, device=local_limit.device)
    ok = rows < S * group
    qi = (rows // group).clamp_max(S - 1)
    ll = local_limit.long()[qi]
    lim_min = torch.where(ok, ll, S).view(-1, block_m).amin(1)
    lim_max = torch.where(ok, ll, 0).view(-1, block_m).amax(1)
    blo = torch.where(ok, lo.long()[qi], S).view(-1, block_m).amin(1)
    bhi = torch.where(ok, hi.long()[qi], 0).view(-1, block_m).amax(1)
    seg = torch.as_tensor(seg_start, device=local_limit.device).long().view(-1, 1, 1)
    n0 = (torch.arange(triton.cdiv(kv_len, block_n), device=local_limit.device) * block_n).view(1, 1, -1)
    n1 = n0 + block_n
    lim_min, lim_max, blo, bhi = (t.view(1, -1, 1) for t in (lim_min, lim_max, blo, bhi))
    in_a = n0 < seg + lim_max
    b_start = seg + torch.maximum(blo, lim_max)
    in_b = (n0 < seg + bhi) & (n1 > b_start) & (b_start < seg + bhi)
    full = n1 <= seg + lim_min
    cls = torch.where(full, FULL, torch.where(in_a | in_b, PARTIAL, EMPTY))
    return cls.to(torch.int8)


def dkdv_ranges(local_limit, block_id, seg_start, kv_len: int, group: int, block_m: int, block_n: int):
    """``[B, n_key_tiles, 4]`` int32 ``(a_lo, a_hi, b_lo, b_hi)``: the two disjoint query-row ranges (multiples of
    ``block_m``, ``a_hi <= b_lo``; an unused range is empty) the dK/dV kernel walks for each key tile.

    Together they cover every query tile that ``tile_classes`` does not call EMPTY for that key tile (a superset
    of the tiles with a visible (query, key) pair), and they are the tightest two-range cover of them: the hull of
    the non-empty query tiles minus its longest run of empty tiles (in the training layout: the clean queries at
    or after the key tile, then the mask blocks that start past it). O(B x query tiles x key tiles) torch ops on
    the layout's device, no host sync."""
    cls = tile_classes(local_limit, block_id, seg_start, kv_len, group, block_m, block_n)
    ne = (cls != EMPTY).transpose(1, 2)  # [B, n_n, n_m]
    n_m = ne.shape[-1]
    idx = torch.arange(n_m, device=ne.device).expand_as(ne)
    last = torch.where(ne, idx, -1).amax(-1)
    first = torch.where(ne, idx, n_m).amin(-1)
    prev = torch.where(ne, idx, -1).cummax(-1).values  # last non-empty tile at or before m
    prev_excl = torch.cat([torch.full_like(prev[..., :1], -1), prev[..., :-1]], -1)
    gap = torch.where(ne & (prev_excl >= 0), idx - prev_excl - 1, 0)  # empty run ending just before m
    gmax, gend = gap.max(-1)
    split = gmax > 0
    gstart = prev_excl.gather(-1, gend.unsqueeze(-1)).squeeze(-1) + 1
    none = last < 0
    a_lo = torch.where(none, 0, first)
    a_hi = torch.where(none, 0, torch.where(split, gstart, last + 1))
    b_lo = torch.where(split, gend, a_hi)
    b_hi = torch.where(split, last + 1, a_hi)
    return (torch.stack([a_lo, a_hi, b_lo, b_hi], -1) * block_m).to(torch.int32).contiguous()


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
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, offs_n, d_ok, ll, bq, seg, S, Skv, BID, qk_scale, cap,
              sks, svs, MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
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
    s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap, SOFTCAP)
    if MASKED:
        s = tl.where(_visible(kj, ll, bq, seg, S, BID), s, float("-inf"))
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


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_TL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(D: int, dtype: torch.dtype, device: torch.device, backward: bool = False) -> dict:
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if _FORCE_CONFIG is not None:
        cfg = dict(_FORCE_CONFIG)
    elif device.type != "cuda":  # interpreter: small tiles so short test sequences see every tile class
        cfg = dict(BLOCK_M=32, BLOCK_N=16)
    elif backward:
        cfg = dict(BLOCK_M=64 if BLOCK_D <= 128 else 32, BLOCK_N=64 if BLOCK_D <= 64 else 32, num_warps=4)
        if dtype == torch.float32:  # FMA dots already spill; pipelined Q/dO tiles would add ~20x the spills
            cfg["dkdv_stages"] = 1
        elif BLOCK_D > 64:  # dK/dV with pipelined Q/dO tiles: 4 warps spill at D = 96..256 (sm_90 compile check)
            cfg["dkdv_warps"] = 8
    else:
        big = BLOCK_D <= 128 and dtype != torch.float32
        cfg = dict(BLOCK_M=128 if big else 64, BLOCK_N=64 if BLOCK_D <= 128 else 32, num_warps=8 if big else 4,
                   num_stages=3 if BLOCK_D <= 128 else 2)
    cfg["BLOCK_D"] = BLOCK_D
    cfg["UPCAST"] = dtype == torch.bfloat16 and triton_interpreted()  # interpreter: bf16 tl.dot is wrong
    cfg["PREC"] = "ieee" if dtype == torch.float32 else "tf32"
    return cfg


def _launch_opts(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


def _auto_splits(B, Hkv, n_m_tiles, S, Skv, device) -> int:
    if device.type != "cuda":
        return 1
    n_prog = B * Hkv * n_m_tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if n_prog >= sms or Skv - S < 1024:
        return 1
    return int(max(1, min(triton.cdiv(2 * sms, n_prog), triton.cdiv(Skv, 512), 64)))


def _score_consts(scale: float, softcap: float) -> tuple[float, float, bool]:
    """(qk_scale, cap, SOFTCAP) for ``_scores``; softcap 0 = none."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E, True
    return scale * LOG2E, 0.0, False


def _forward(q, k, v, local_limit, block_id, seg_start, scale, num_splits=0, softcap=0.0):
    B, Hq, S, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cfg = _config(D, q.dtype, q.device)
    BM, BN, BD = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    n_m = triton.cdiv(S * G, BM)
    if num_splits <= 0:
        num_splits = _auto_splits(B, Hkv, n_m, S, Skv, q.device)
    span_lo, span_hi = _block_spans(block_id)
    ll = local_limit.to(torch.int32).contiguous()
    bid = block_id.to(torch.int32).contiguous()
    seg = seg_start.to(torch.int32).contiguous()
    out = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    qk_scale, cap, soft = _score_consts(scale, softcap)
    common = dict(D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, UPCAST=cfg["UPCAST"], PREC=cfg["PREC"], SOFTCAP=soft,
                  **_launch_opts(cfg))
    grid = (n_m, B * Hkv, num_splits)
    if num_splits == 1:
        _fwd_kernel[grid](
            q, k, v, out, lse, ll, bid, span_lo, span_hi, seg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), 0,
            S, Skv, G, Hkv, qk_scale, cap, 1, SPLIT=False, **common,
        )
        return out, lse
    rows = B * Hq * S
    o_part = torch.empty((num_splits, B, Hq, S, BD), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, B, Hq, S), dtype=torch.float32, device=q.device)
    _fwd_kernel[grid](
        q, k, v, o_part, lse_part, ll, bid, span_lo, span_hi, seg,
        *q.stride(), *k.stride(), *v.stride(), Hq * S * BD, S * BD, BD, 1, Hq * S, S, 1, rows,
        S, Skv, G, Hkv, qk_scale, cap, num_splits, SPLIT=True, **common,
    )
    _merge_kernel[(rows,)](
        o_part, lse_part, out, lse, rows, num_splits, rows, Hq, S, *out.stride(),
        D=D, BLOCK_D=BD, BLOCK_SPLIT=max(2, triton.next_power_of_2(num_splits)),
    )
    return out, lse


def _backward(do, q, k, v, out, lse, local_limit, block_id, seg_start, scale, softcap=0.0):
    B, Hq, S, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cfg = _config(D, q.dtype, q.device, backward=True)
    BM, BN, BD = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    span_lo, span_hi = _block_spans(block_id)
    ll = local_limit.to(torch.int32).contiguous()
    bid = block_id.to(torch.int32).contiguous()
    seg = seg_start.to(torch.int32).contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, Hq, S]
    lse = lse.contiguous()
    dq = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Skv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Skv, D), dtype=v.dtype, device=v.device)
    qk_scale, cap, soft = _score_consts(scale, softcap)
    common = dict(D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, UPCAST=cfg["UPCAST"], PREC=cfg["PREC"], SOFTCAP=soft,
                  **_launch_opts(cfg))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _bwd_dq_kernel[(triton.cdiv(S * G, BM), B * Hkv)](
        q, k, v, do, dq, lse, delta, ll, bid, span_lo, span_hi, seg, *strides,
        S, Skv, G, Hkv, qk_scale, cap, scale, **common,
    )
    n_n = triton.cdiv(Skv, BN)
    ranges = dkdv_ranges(ll, bid, seg, Skv, G, BM, BN)  # [B, n_n, 4]
    dkdv_opts = dict(common)
    if "dkdv_warps" in cfg:
        dkdv_opts["num_warps"] = cfg["dkdv_warps"]
    if "dkdv_stages" in cfg:
        dkdv_opts["num_stages"] = cfg["dkdv_stages"]
    _bwd_dkdv_kernel[(n_n, B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, ll, bid, span_lo, span_hi, seg, ranges, *strides, *dk.stride(),
        *dv.stride(), S, Skv, G, Hkv, qk_scale, cap, scale, n_n, **dkdv_opts,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile / CUDA graphs) + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tidar_kernels::triton_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_limit: torch.Tensor, block_id: torch.Tensor,
            seg_start: torch.Tensor, scale: float, num_splits: int,
            softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, local_limit, block_id, seg_start, scale, num_splits, softcap)


@_fwd_op.register_fake
def _(q, k, v, local_limit, block_id, seg_start, scale, num_splits, softcap=0.0):
    B, Hq, S, D = q.shape
    return q.new_empty((B, Hq, S, D)), q.new_empty((B, Hq, S), dtype=torch.float32)


@torch.library.custom_op("tidar_kernels::triton_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, local_limit: torch.Tensor, block_id: torch.Tensor, seg_start: torch.Tensor,
            scale: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, local_limit, block_id, seg_start, scale, softcap)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, local_limit, block_id, seg_start, scale, softcap=0.0):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, local_limit, block_id, seg_start, scale, _, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, local_limit, block_id, seg_start)
    ctx.scale = scale
    ctx.softcap = softcap
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, local_limit, block_id, seg_start = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, local_limit, block_id, seg_start, ctx.scale, ctx.softcap)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def attention_with_lse(q, k, v, local_limit, block_id, seg_start, scale, num_splits: int = 0, softcap=None):
    """``(out, lse)``: lse natural-log, fp32 ``[B, Hq, S]``, -inf for a query that sees no key (docs/design.md §7;
    the backward's saved copy holds +inf there, so its exp(s - lse) is 0); ``num_splits`` 0 = automatic, n > 0
    forces n split-KV chunks (tests, benchmarks); ``softcap`` None or > 0 (logit soft-capping)."""
    out, lse = _fwd_op(q, k, v, local_limit, block_id, seg_start, float(scale), int(num_splits),
                       0.0 if softcap is None else float(softcap))
    return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))


# limits stated in the record (tidar_kernels.backends): auto falls back to the reference outside them
@register("tidar_attention", "triton", dtypes=_TL_DTYPES, max_head_dim=256)
def tidar_attention(q, k, v, local_limit, block_id, seg_start, scale, softcap=None):
    return _fwd_op(q, k, v, local_limit, block_id, seg_start, float(scale), 0,
                   0.0 if softcap is None else float(softcap))[0]


__all__ = ["attention_with_lse", "dkdv_ranges", "tidar_attention", "tile_classes", "EMPTY", "FULL", "PARTIAL"]
