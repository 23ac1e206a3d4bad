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
chunks, see below); ``use_vocab_parallel`` picks the path by shape. Both paths run the same device routines
(``sampling.py``): the one-launch kernels over the whole vocabulary [0, V), the vocabulary-parallel ones per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register
from ..reference import rejection_sample as ref
from ..reference.rejection_sample import Philox
from .rejection_sample_vocab_parallel import _vp_accept, _vp_chunk_mass, _vp_sample, _vp_target_stats
from .sampling import (
    MIX_AR,
    MIX_BOTH,
    MIX_DIFF,
    _accept_test,
    _pick,
    _range_argmax,
    _range_stats,
    _row_start,
    _sample,
    _store_acceptance,
)


@triton.jit
def _next_drafts(BLK_ROW, s_blk_s, NEXT_ROW, NEXT_P_ROW, uv, THR_ROW, K, V, COEF, GREEDY: tl.constexpr,
                 FILTER: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_U: tl.constexpr):  # fmt: skip
    """d'_1..d'_{K-1} from slots 1..K-1 of one block (raw logits, no mix); q' rows written when sampling.
    ``THR_ROW[s]``: the top-k/top-p threshold of slot s (read with FILTER only)."""
    for s in range(1, K):
        row = BLK_ROW + s * s_blk_s
        if GREEDY:
            _, tok = _range_argmax(row, row, 0, V, COEF, MIX_AR, BLOCK_V)
        else:
            thr = tl.load(THR_ROW + s) if FILTER else 0.0
            mx, z = _range_stats(row, row, 0, V, COEF, thr, MIX_AR, FILTER, BLOCK_V)
            u = _pick(uv, K + s, BLOCK_U)
            tok = _sample(
                row, row, V, mx, z, u, row, False, NEXT_P_ROW + (s - 1) * V, True, COEF, thr, MIX_AR, FILTER, BLOCK_V
            )
        tl.store(NEXT_ROW + s, tok.to(tl.int64))


@triton.jit
def _rejection_kernel(
    AR, BLK, DRAFTS, Q, U, SEED, OFFSET, THR_T, THR_S, COEF, ACC, EMIT, NEXT, NEXT_P,
    K, V, s_ar_b, s_ar_k, s_blk_b, s_blk_j, s_blk_s, s_q_b, s_q_k,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_U: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    a = tl.full([], 1, tl.int32)
    going = tl.full([], 1, tl.int32)
    uv = _row_start(U, SEED, OFFSET, b, K, GREEDY, PHILOX, BLOCK_U)
    for i in range(1, K):  # the acceptance walk: p_i is target row i - 1
        if going != 0:
            ra = AR + b * s_ar_b + (i - 1) * s_ar_k
            rb = BLK + b * s_blk_b + (i - 1) * s_blk_j  # block i, slot 0
            d = tl.load(DRAFTS + b * K + i).to(tl.int32)
            if GREEDY:
                _, best = _range_argmax(ra, rb, 0, V, COEF, MIX, BLOCK_V)
                ok = d == best
            else:
                thr = tl.load(THR_T + b * K + i - 1) if FILTER else 0.0
                mx, z = _range_stats(ra, rb, 0, V, COEF, thr, MIX, FILTER, BLOCK_V)
                q_d = tl.load(Q + b * s_q_b + (i - 1) * s_q_k + d).to(tl.float64)
                ok = _accept_test(ra, rb, d, mx, z, thr, q_d, uv, i, COEF, MIX, FILTER, BLOCK_U)
            a = tl.where(ok, a + 1, a)
            going = tl.where(ok, going, 0)
    last = a - 1
    ra = AR + b * s_ar_b + last * s_ar_k
    rb = BLK + b * s_blk_b + last * s_blk_j
    if GREEDY:
        _, tok = _range_argmax(ra, rb, 0, V, COEF, MIX, BLOCK_V)
    else:
        thr = tl.load(THR_T + b * K + last) if FILTER else 0.0
        mx, z = _range_stats(ra, rb, 0, V, COEF, thr, MIX, FILTER, BLOCK_V)
        has_q = a < K  # at a == K the bonus is sampled from p_K itself
        q_row = Q + b * s_q_b + tl.minimum(last, K - 2) * s_q_k
        tok = _sample(
            ra, rb, V, mx, z, _pick(uv, 0, BLOCK_U), q_row, has_q, NEXT_P, False, COEF, thr, MIX, FILTER, BLOCK_V
        )
    tl.store(NEXT + b * K, tok.to(tl.int64))
    _store_acceptance(ACC, EMIT, DRAFTS, b, a, K, BLOCK_K)
    _next_drafts(
        BLK + b * s_blk_b + last * s_blk_j,
        s_blk_s,
        NEXT + b * K,
        NEXT_P + b * (K - 1) * V,
        uv,
        THR_S + (b * K + last) * K,
        K,
        V,
        COEF,
        GREEDY,
        FILTER,
        BLOCK_V,
        BLOCK_U,
    )


@triton.jit
def _draft_kernel(
    AR, BLK, U, SEED, OFFSET, THR_T, THR_S, COEF, NEXT, NEXT_P, K, V, s_ar_b, s_blk_b, s_blk_s,
    GREEDY: tl.constexpr, MIX: tl.constexpr, PHILOX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_U: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    ra = AR + b * s_ar_b
    rb = BLK + b * s_blk_b  # slot 0
    uv = _row_start(U, SEED, OFFSET, b, K, GREEDY, PHILOX, BLOCK_U)
    if GREEDY:
        _, tok = _range_argmax(ra, rb, 0, V, COEF, MIX, BLOCK_V)
    else:
        thr = tl.load(THR_T + b) if FILTER else 0.0
        mx, z = _range_stats(ra, rb, 0, V, COEF, thr, MIX, FILTER, BLOCK_V)
        tok = _sample(
            ra, rb, V, mx, z, _pick(uv, 0, BLOCK_U), ra, False, NEXT_P, False, COEF, thr, MIX, FILTER, BLOCK_V
        )
    tl.store(NEXT + b * K, tok.to(tl.int64))
    _next_drafts(
        rb,
        s_blk_s,
        NEXT + b * K,
        NEXT_P + b * (K - 1) * V,
        uv,
        THR_S + b * K,
        K,
        V,
        COEF,
        GREEDY,
        FILTER,
        BLOCK_V,
        BLOCK_U,
    )


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
    mix = (MIX_AR if beta == 1.0 else MIX_DIFF if beta == 0.0 else MIX_BOTH).value
    key = (temperature, beta, ar_logits.device)
    coef = _COEF.get(key)
    if coef is None:
        if len(_COEF) > 64:
            _COEF.clear()
        coef = _COEF[key] = torch.tensor(
            [temperature if temperature > 0 else 1.0, beta, 1.0 - beta], dtype=torch.float64, device=ar_logits.device
        )
    V = ar_logits.shape[-1]
    block_v = min(triton.next_power_of_2(V), 1024 if ar_logits.device.type == "cuda" else 256)
    return mix, coef, block_v


def _random_args(u, device):
    """(uniforms, seed, offset, PHILOX) kernel arguments; the unused ones are never read."""
    dummy_i = torch.zeros(1, dtype=torch.int64, device=device)
    if isinstance(u, Philox):
        return dummy_i.float(), u.seed, u.offset, True
    if u is None:  # greedy
        return dummy_i.float(), dummy_i, dummy_i, False
    return u.contiguous(), dummy_i, dummy_i, False


def _filter_args(target, slots, temperature, top_k, top_p):
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


@register("rejection_sample", "triton", philox=True)  # Philox state is expanded in-kernel
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
    uu, seed, offset, philox = _random_args(u, dev)
    if greedy:
        thr_t, thr_s, filt = _filter_args(ar_logits[:0, 0], block_logits[:0, 0], 1.0, None, None)
    else:
        thr_t, thr_s, filt = _filter_args(
            ref.mix(ar_logits, block_logits[:, :, 0], beta), block_logits, temperature, top_k, top_p
        )
    p_out = next_p if next_p is not None and next_p.numel() else accepted
    strides = (ar.stride(0), ar.stride(1), blk.stride(0), blk.stride(1), blk.stride(2), q.stride(0), q.stride(1))
    flags = dict(GREEDY=greedy, MIX=mix, FILTER=filt)
    block_k, block_u = max(2, triton.next_power_of_2(K)), triton.next_power_of_2(2 * K)
    # fmt: off
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
    # fmt: on
    return accepted, emitted, next_drafts, next_p


@register("draft_sample", "triton", philox=True)
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
    uu, seed, offset, philox = _random_args(u, dev)
    if greedy:
        thr_t, thr_s, filt = _filter_args(ar_logits[:0], block_logits[:0], 1.0, None, None)
    else:
        thr_t, thr_s, filt = _filter_args(
            ref.mix(ar_logits, block_logits[:, 0], beta), block_logits, temperature, top_k, top_p
        )
    # fmt: off
    _draft_kernel[(B,)](
        ar, blk, uu, seed, offset, thr_t, thr_s, coef, next_drafts,
        next_p if next_p is not None and next_p.numel() else next_drafts,
        K, V, ar.stride(0), blk.stride(0), blk.stride(1),
        GREEDY=greedy, MIX=mix, PHILOX=philox, FILTER=filt, BLOCK_V=block_v, BLOCK_U=triton.next_power_of_2(2 * K),
        **_NO_FMA,
    )
    # fmt: on
    return next_drafts, next_p
