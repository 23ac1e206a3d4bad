"""Triton ``tidar_attention_paged``: the forward of ``tidar_attention`` (``tidar_attention.py`` describes the work
decomposition, tile classes and split-KV) with each K/V tile loaded through the row's block table.

Key j of row b is slot ``j % PAGE`` of pool block ``block_table[b, j // PAGE]`` (vLLM's NHD layout ``[num_blocks,
PAGE, Hkv, D]``): a key tile is a gather of BLOCK_N rows of D contiguous values, each row's block id loaded with it,
so the tile walk (full / partial / empty tiles from the layout vectors) is that of the contiguous kernel with
``seg_start = seq_lens[b] - S`` and the row's own key count as the bound of partial tiles (table entries past a
row's length are never read). The block size is a compile-time constant (any size >= 1; a power of two makes the
division a shift). Split-KV partial results merge with the contiguous kernel's ``_merge_kernel``.

The separate-segment form (``k_seg``/``v_seg``, HAS_SEG): a row's keys at or past its pool length come from its
row of ``k_seg``/``v_seg`` instead; a tile that straddles the two does both masked loads and selects per key.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import int_range
from ..backends import register
from .tidar_attention import _TL_DTYPES, _auto_splits, _config, _score_consts, _tile_consts
from .tidar_attention_kernels import _merge_kernel, _scores, _tile_stats, _visible
from .tidar_attention_tiles import _block_spans

# fmt: off


@triton.jit
def _paged_tile(acc, m_i, l_i, q, K, V, BT, KS, VS, start, offs_n, offs_d, d_ok, ll, bq, seg, S, kv_pool, kv_len,
                BID, hk64, skb, sks, skh, skd, svb, svs, svh, svd, s_kss, s_ksd, s_vss, s_vsd, qk_scale, cap,
                PAGE: tl.constexpr, MASKED: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    """One K/V tile at key ``start`` of the row, folded into the online softmax: keys below ``kv_pool`` gathered
    through its block-table row ``BT``, the ones past it (HAS_SEG: the segment's keys off the pool) from its
    ``KS``/``VS`` rows. MASKED (partial) tiles read no key at or past ``kv_len`` and apply the layout rule."""
    kj = start + offs_n
    if MASKED:
        k_ok = kj < kv_len
    else:
        k_ok = kj >= 0
    if HAS_SEG:
        in_pool = k_ok & (kj < kv_pool)
    else:
        in_pool = k_ok
    page = tl.load(BT + kj // PAGE, mask=in_pool, other=0).to(tl.int64)
    slot = (kj % PAGE).to(tl.int64)
    kmask = in_pool[:, None] & d_ok[None, :]
    k = tl.load(K + page[:, None] * skb + slot[:, None] * sks + hk64 * skh + offs_d[None, :] * skd, mask=kmask,
                other=0.0)
    v = tl.load(V + page[:, None] * svb + slot[:, None] * svs + hk64 * svh + offs_d[None, :] * svd, mask=kmask,
                other=0.0)
    if HAS_SEG:
        in_seg = k_ok & (kj >= kv_pool)
        m = (kj - kv_pool).to(tl.int64)
        smask = in_seg[:, None] & d_ok[None, :]
        k = tl.where(in_seg[:, None], tl.load(KS + m[:, None] * s_kss + offs_d[None, :] * s_ksd, mask=smask,
                                               other=0.0), k)
        v = tl.where(in_seg[:, None], tl.load(VS + m[:, None] * s_vss + offs_d[None, :] * s_vsd, mask=smask,
                                               other=0.0), v)
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
def _paged_fwd_kernel(
    Q, K, V, O, LSE, BT, SEQ, LL, BID, SPAN_LO, SPAN_HI, KS, VS,
    sqb, sqh, sqs, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, soh, sos, sod,
    slb, slh, sls, sl_split, sbt,
    s_ksb, s_ksh, s_kss, s_ksd, s_vsb, s_vsh, s_vss, s_vsd,
    S, S_sep, G, Hkv, qk_scale, cap, n_splits,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SOFTCAP: tl.constexpr,
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
    kv_pool = tl.load(SEQ + b)  # the row's keys in the pool; the S_sep keys off the pool follow them
    kv_len = kv_pool + S_sep
    seg = kv_len - S
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_off = b64 * sqb + head.to(tl.int64)[:, None] * sqh + qi.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    bt = BT + b64 * sbt
    ks = KS + b64 * s_ksb + hk64 * s_ksh
    vs = VS + b64 * s_vsb + hk64 * s_vsh

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
        acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q, K, V, bt, ks, vs, start, offs_n, offs_d, d_ok, ll, bq, seg, S,
                                    kv_pool, kv_len, BID, hk64, skb, sks, skh, skd, svb, svs, svh, svd, s_kss, s_ksd,
                                    s_vss, s_vsd, qk_scale, cap, PAGE, False, HAS_SEG, UPCAST, PREC, SOFTCAP)
    for start in range(tl.maximum(lo, full_end), hi, BLOCK_N):
        acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q, K, V, bt, ks, vs, start, offs_n, offs_d, d_ok, ll, bq, seg, S,
                                    kv_pool, kv_len, BID, hk64, skb, sks, skh, skd, svb, svs, svh, svd, s_kss, s_ksd,
                                    s_vss, s_vsd, qk_scale, cap, PAGE, True, HAS_SEG, UPCAST, PREC, SOFTCAP)
    # range B (the own-block part past range A), split 0 only
    if sid == 0:
        for start in range(tl.maximum(seg + blk_lo, n_tiles_a * BLOCK_N), seg + blk_hi, BLOCK_N):
            acc, m_i, l_i = _paged_tile(acc, m_i, l_i, q, K, V, bt, ks, vs, start, offs_n, offs_d, d_ok, ll, bq, seg,
                                        S, kv_pool, kv_len, BID, hk64, skb, sks, skh, skd, svb, svs, svh, svd, s_kss,
                                        s_ksd, s_vss, s_vsd, qk_scale, cap, PAGE, True, HAS_SEG, UPCAST, PREC,
                                        SOFTCAP)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = m_i + tl.log2(tl.where(seen, l_i, 1.0))
    o_off = b64 * sob + head.to(tl.int64)[:, None] * soh + qi.to(tl.int64)[:, None] * sos + offs_d[None, :] * sod
    l_off = b64 * slb + head.to(tl.int64) * slh + qi.to(tl.int64) * sls
    if SPLIT:
        o_off += sid.to(tl.int64) * sl_split * BLOCK_D  # partial outputs: [split][B, Hq, S, BLOCK_D] fp32
        tl.store(O + o_off, out, mask=row_ok[:, None])
        tl.store(LSE + sid.to(tl.int64) * sl_split + l_off, tl.where(seen, lse2, float("-inf")), mask=row_ok)
    else:
        tl.store(O + o_off, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# fmt: on


def _forward(q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap=0.0, num_splits=0,
             k_seg=None, v_seg=None):  # fmt: skip
    B, Hq, S, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    S_sep = 0 if k_seg is None else k_seg.shape[2]
    cfg = _config(D, q.dtype, q.device)
    BM, BN, BD = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    n_m = triton.cdiv(S * G, BM)
    if num_splits <= 0:
        rng = int_range(seq_lens)  # remembered from the op's checks: no second sync (None while capturing)
        kv_max = (rng[1] if rng is not None else block_table.shape[1] * page) + S_sep
        num_splits = _auto_splits(B, Hkv, n_m, S, kv_max, q.device)
    span_lo, span_hi = _block_spans(block_id)
    ll = local_limit.to(torch.int32).contiguous()
    bid = block_id.to(torch.int32).contiguous()
    bt = block_table.to(torch.int32).contiguous()
    seq = seq_lens.to(torch.int32).contiguous()
    out = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    qk_scale, cap, soft = _score_consts(scale, softcap)
    common = _tile_consts(cfg, D, BM, BN, BD, soft)
    grid = (n_m, B * Hkv, num_splits)
    strides = (*q.stride(), *k_cache.stride(), *v_cache.stride())
    if k_seg is None:
        ks, vs, seg_strides = q, q, (0,) * 8  # not read (HAS_SEG False)
    else:
        ks, vs, seg_strides = k_seg, v_seg, (*k_seg.stride(), *v_seg.stride())
    tail = dict(PAGE=page, HAS_SEG=k_seg is not None, **common)
    if num_splits == 1:
        # fmt: off
        _paged_fwd_kernel[grid](
            q, k_cache, v_cache, out, out, bt, seq, ll, bid, span_lo, span_hi, ks, vs,
            *strides, *out.stride(), 0, 0, 0, 0, bt.stride(0), *seg_strides,
            S, S_sep, G, Hkv, qk_scale, cap, 1, SPLIT=False, **tail,
        )
        # fmt: on
        return out
    rows = B * Hq * S
    o_part = torch.empty((num_splits, B, Hq, S, BD), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, B, Hq, S), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    # fmt: off
    _paged_fwd_kernel[grid](
        q, k_cache, v_cache, o_part, lse_part, bt, seq, ll, bid, span_lo, span_hi, ks, vs,
        *strides, Hq * S * BD, S * BD, BD, 1, Hq * S, S, 1, rows, bt.stride(0), *seg_strides,
        S, S_sep, G, Hkv, qk_scale, cap, num_splits, SPLIT=True, **tail,
    )
    _merge_kernel[(rows,)](
        o_part, lse_part, out, lse, rows, num_splits, rows, Hq, S, *out.stride(),
        D=D, BLOCK_D=BD, BLOCK_SPLIT=max(2, triton.next_power_of_2(num_splits)),
    )
    # fmt: on
    return out


@torch.library.custom_op("tidar_kernels::triton_attention_paged_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    local_limit: torch.Tensor,
    block_id: torch.Tensor,
    scale: float,
    softcap: float,
    num_splits: int,
    k_seg: Optional[torch.Tensor] = None,  # noqa: UP045  (torch.library parses the annotation)
    v_seg: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    args = (q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap, num_splits)
    return _forward(*args, k_seg, v_seg)


@_fwd_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap, num_splits, k_seg=None,
      v_seg=None):  # fmt: skip
    return q.new_empty(q.shape)


def attention_paged(q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap=None,
                    num_splits: int = 0, k_seg=None, v_seg=None):  # fmt: skip
    """The kernel on validated inputs; ``num_splits`` 0 = automatic, n > 0 forces n split-KV chunks (tests)."""
    soft = 0.0 if softcap is None else float(softcap)
    args = (q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, float(scale), soft, num_splits)
    return _fwd_op(*args, k_seg, v_seg)


# limits stated in the record (tidar_kernels.backends): auto falls back to the reference outside them
@register("tidar_attention_paged", "triton", dtypes=_TL_DTYPES, max_head_dim=256, grad=False)
def tidar_attention_paged(
    q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap=None, k_seg=None, v_seg=None
):
    args = (q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap)
    return attention_paged(*args, k_seg=k_seg, v_seg=v_seg)
