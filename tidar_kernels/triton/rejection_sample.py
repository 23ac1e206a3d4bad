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
from ..reference import rejection_sample as ref
from ..reference.rejection_sample import Philox



def _device(fn):
    """``triton.jit`` for the device functions below. Under the interpreter each call of a jitted device
    function re-patches ``triton.language`` (about 4 ms, most of the interpreter's time here); the launching
    kernel has already patched it, so calls go straight to the rewritten function. Compiled: plain triton.jit."""
    jf = triton.jit(fn)
    cls = type(jf)
    if cls.__name__ == "InterpretedFunction" and callable(getattr(jf, "rewrite", None)):
        jf.__class__ = type("_InterpretedDeviceFunction", (cls,), {
            "__call__": lambda self, *args, **kwargs: self.rewrite()(*args, **kwargs)})
    return jf


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
    return tl.sum(tl.where(tl.arange(0, BLOCK_U) == j, uv, 0.0), 0)


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
        bm = tl.max(x, 0)
        bi = tl.min(tl.where((x == bm) & m, v0 + offs, V), 0)
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
        mx = tl.maximum(mx, tl.max(x, 0))
    z = tl.full([], 0.0, tl.float64)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < V, COEF, thr, MIX, True, FILTER)
        z += tl.sum(tl.exp(x - mx), 0)
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
        tot_r += tl.sum(tl.maximum(p - q, 0.0), 0)
        tot_p += tl.sum(p, 0)
    resid = use_q & (tot_r > 0)
    target = u * tl.where(resid, tot_r, tot_p)
    carry = tl.full([], 0.0, tl.float64)
    found = tl.full([], V, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        m = v0 + offs < V
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, thr, MIX, True, FILTER) - mx) / z
        q = tl.load(Q_ROW + v0 + offs, mask=m & use_q, other=0.0).to(tl.float64)
        w = tl.where(resid, tl.maximum(p - q, 0.0), p)
        cdf = tl.cumsum(w, 0) + carry
        found = tl.minimum(found, tl.min(tl.where((cdf > target) & m, v0 + offs, V), 0))
        carry += tl.sum(w, 0)
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
        uv = tl.zeros([BLOCK_U], tl.float64)
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
        uv = tl.zeros([BLOCK_U], tl.float64)
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
# Launchers
# ---------------------------------------------------------------------------------------------


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _setup(ar_logits, temperature, beta):
    mix = AR_ONLY if beta == 1.0 else DIFF_ONLY if beta == 0.0 else MIXED
    coef = torch.tensor([temperature if temperature > 0 else 1.0, beta, 1.0 - beta], dtype=torch.float64,
                        device=ar_logits.device)
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
    thr_s = ref.filter_threshold(slots.double() / temperature, top_k, top_p).contiguous()
    return thr_t, thr_s, True


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
    _rejection_kernel[(B,)](
        ar, blk, drafts, q, uu, seed, offset, thr_t, thr_s, coef, accepted, emitted, next_drafts,
        next_p if next_p is not None and next_p.numel() else accepted,
        K, V, ar.stride(0), ar.stride(1), blk.stride(0), blk.stride(1), blk.stride(2), q.stride(0), q.stride(1),
        GREEDY=greedy, MIX=mix, PHILOX=philox, FILTER=filt, BLOCK_V=block_v,
        BLOCK_K=max(2, triton.next_power_of_2(K)), BLOCK_U=triton.next_power_of_2(2 * K),
    )
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
    )
    return next_drafts, next_p


draft_sample.philox = rejection_sample.philox = True  # Philox state is expanded in-kernel
