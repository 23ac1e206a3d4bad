"""Triton device routines of the sampling kernels (``rejection_sample.py``): one copy of each.

Every routine works on a *target row* of logits over a vocabulary range ``[lo, hi)``: the one-launch kernels
call them over ``[0, V)``, the vocabulary-parallel kernels over one chunk. A target row is one or two pointers
combined as ``MIX`` says (docs/design.md §4.1), read as float64, divided by the temperature (``TEMP``) and, with
``FILTER`` (top-k/top-p), set to -inf below the row's threshold. Every decision is taken in float64 exactly as
``tidar_kernels.reference.rejection_sample`` defines it.
"""

from __future__ import annotations

import triton
import triton.language as tl

# How a target row's logits are formed from its two pointers (row_a: AR logits or a raw block row; row_b: slot 0
# of the matching proposal block).
MIX_AR = tl.constexpr(0)  # row_a only: beta = 1, or a raw block row
MIX_DIFF = tl.constexpr(1)  # row_b only: beta = 0
MIX_BOTH = tl.constexpr(2)  # beta * row_a + (1 - beta) * row_b (COEF[1] = beta, COEF[2] = 1 - beta)


@triton.jit
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


@triton.jit
def _row_uniforms(U_ROW, seed, n_row, K, PHILOX: tl.constexpr, BLOCK_U: tl.constexpr):
    """float64 u[b, 0..2K) of this row as one vector: loaded from the uniforms row, or Philox at counters
    ``n_row + j`` (n_row = offset + b * 2K; int64 arithmetic wraps like uint64)."""
    j = tl.arange(0, BLOCK_U)
    if PHILOX:
        u = _philox_uniform(seed, n_row + j.to(tl.int64))
    else:
        u = tl.load(U_ROW + j, mask=j < 2 * K, other=0.0)
    return u.to(tl.float64)


@triton.jit
def _pick(uv, j, BLOCK_U: tl.constexpr):
    """uv[j] as a scalar."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_U) == j, uv, 0.0), 0)


@triton.jit
def _row_start(U, SEED, OFFSET, b, K, GREEDY: tl.constexpr, PHILOX: tl.constexpr, BLOCK_U: tl.constexpr):
    """The uniforms of batch row ``b`` (zeros when greedy: nothing is drawn)."""
    if GREEDY:
        uv = tl.zeros([BLOCK_U], tl.float64)
    else:
        uv = _row_uniforms(U + b * 2 * K, tl.load(SEED), tl.load(OFFSET) + b * 2 * K, K, PHILOX, BLOCK_U)
    return uv


@triton.jit
def _store_acceptance(ACC, EMIT, DRAFTS, b, a, K, BLOCK_K: tl.constexpr):
    """Row ``b``'s accepted length ``a`` and its emitted drafts d_0..d_{a-1} (then -1)."""
    tl.store(ACC + b, a.to(tl.int64))
    offs_k = tl.arange(0, BLOCK_K)
    dk = tl.load(DRAFTS + b * K + offs_k, mask=offs_k < K, other=-1)
    tl.store(EMIT + b * K + offs_k, tl.where(offs_k < a, dk, -1), mask=offs_k < K)


@triton.jit
def _load_x(row_a, row_b, offs, mask, COEF, thr, MIX: tl.constexpr, TEMP: tl.constexpr, FILTER: tl.constexpr):
    """float64 logits of a target row at ``offs`` (-inf where masked), mixed, divided by the temperature
    (``TEMP``) and, with ``FILTER`` (top-k/top-p), -inf below the row's threshold ``thr``."""
    if MIX == MIX_AR:
        x = tl.load(row_a + offs, mask=mask, other=float("-inf")).to(tl.float64)
    elif MIX == MIX_DIFF:
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


@triton.jit
def _accept_test(row_a, row_b, d, M, Z, thr, q_d, uv, i, COEF, MIX: tl.constexpr, FILTER: tl.constexpr,
                 BLOCK_U: tl.constexpr):  # fmt: skip
    """Whether draft ``d`` (draft probability ``q_d``) is accepted under p = exp(x - M) / Z: u_i * q_d < p(d)."""
    p_d = tl.exp(_load_x(row_a, row_b, d, d >= 0, COEF, thr, MIX, True, FILTER) - M) / Z
    return _pick(uv, i, BLOCK_U) * q_d < p_d


@triton.jit
def _range_argmax(row_a, row_b, lo, hi, COEF, MIX: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, first index of the max) of a target row over [lo, hi) (torch.argmax tie-breaking)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], 0, tl.int32) + lo
    for v0 in range(lo, hi, BLOCK_V):
        m = v0 + offs < hi
        x = _load_x(row_a, row_b, v0 + offs, m, COEF, 0.0, MIX, False, False)
        bm = tl.max(x, 0)
        bi = tl.min(tl.where((x == bm) & m, v0 + offs, hi), 0)
        upd = bm > best
        best_i = tl.where(upd, bi, best_i)
        best = tl.where(upd, bm, best)
    return best, best_i


@triton.jit
def _range_stats(row_a, row_b, lo, hi, COEF, thr, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, sum of exp(x - max)) over [lo, hi) in float64, max first (as torch.softmax), so exp(x - max) is the
    reference's; (-inf, 0) for a range with no possible token."""
    offs = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), tl.float64)
    for v0 in range(lo, hi, BLOCK_V):
        x = _load_x(row_a, row_b, v0 + offs, v0 + offs < hi, COEF, thr, MIX, True, FILTER)
        mx = tl.maximum(mx, tl.max(x, 0))
    s = tl.full([], 0.0, tl.float64)
    if mx > float("-inf"):
        for v0 in range(lo, hi, BLOCK_V):
            x = _load_x(row_a, row_b, v0 + offs, v0 + offs < hi, COEF, thr, MIX, True, FILTER)
            s += tl.sum(tl.exp(x - mx), 0)
    return mx, s


@triton.jit
def _range_mass(
    row_a, row_b, lo, hi, M, Z, thr, q_row, use_q, COEF, MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr
):
    """(mass of the residual max(0, p - q), mass of p) over [lo, hi), with p = exp(x - M) / Z and q the draft
    distribution at ``q_row`` (read only when ``use_q``; else q = 0).
    A flag (``use_q`` here, ``resid`` and ``write_p`` in ``_range_scan``) masks a load or store through the end of
    the range (``hi`` when set, ``lo`` when not), never as ``block_mask & flag``: triton 3.9's interpreter gives
    that and of a block with a scalar int32 data, which a load refuses ("mask has unsupported dtype")."""
    offs = tl.arange(0, BLOCK_V)
    hi_q = tl.where(use_q != 0, hi, lo)
    tot_r = tl.full([], 0.0, tl.float64)
    tot_p = tl.full([], 0.0, tl.float64)
    for v0 in range(lo, hi, BLOCK_V):
        m = v0 + offs < hi
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, thr, MIX, True, FILTER) - M) / Z
        q = tl.load(q_row + v0 + offs, mask=v0 + offs < hi_q, other=0.0).to(tl.float64)
        tot_r += tl.sum(tl.maximum(p - q, 0.0), 0)
        tot_p += tl.sum(p, 0)
    return tot_r, tot_p


@triton.jit
def _range_scan(row_a, row_b, lo, hi, V, M, Z, thr, q_row, resid, carry, target, P_OUT, write_p, COEF,
                MIX: tl.constexpr, FILTER: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Inverse-CDF scan over [lo, hi) of the weights w = max(0, p - q) (``resid``) or p, starting from the
    cumulative mass ``carry`` (float64) of the tokens before ``lo``: (first index whose cumulative mass exceeds
    ``target``, or V; last index with w > 0, or -1). Writes p as float32 to ``P_OUT`` when ``write_p``."""
    offs = tl.arange(0, BLOCK_V)
    hi_r = tl.where(resid != 0, hi, lo)  # flags mask through the range's end: see _range_mass
    hi_w = tl.where(write_p != 0, hi, lo)
    found = tl.full([], 0, tl.int32) + V
    last_w = tl.full([], -1, tl.int32)
    for v0 in range(lo, hi, BLOCK_V):
        m = v0 + offs < hi
        p = tl.exp(_load_x(row_a, row_b, v0 + offs, m, COEF, thr, MIX, True, FILTER) - M) / Z
        q = tl.load(q_row + v0 + offs, mask=v0 + offs < hi_r, other=0.0).to(tl.float64)
        w = tl.where(resid != 0, tl.maximum(p - q, 0.0), p)
        cdf = tl.cumsum(w, 0) + carry
        found = tl.minimum(found, tl.min(tl.where((cdf > target) & m, v0 + offs, V), 0))
        last_w = tl.maximum(last_w, tl.max(tl.where((w > 0) & m, v0 + offs, -1), 0))
        carry += tl.sum(w, 0)
        tl.store(P_OUT + v0 + offs, p.to(tl.float32), mask=v0 + offs < hi_w)
    return found, last_w


@triton.jit
def _sample(row_a, row_b, V, mx, z, u, Q_ROW, use_q, P_OUT, write_p, COEF, thr, MIX: tl.constexpr,
            FILTER: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Inverse-CDF sample over the whole row [0, V) of p = softmax (or of the residual max(0, p - q) when
    ``use_q`` and it has mass), optionally writing p as float32 to ``P_OUT``. Past the end (rounding): V - 1,
    as the reference's clamp."""
    tot_r, tot_p = _range_mass(row_a, row_b, 0, V, mx, z, thr, Q_ROW, use_q, COEF, MIX, FILTER, BLOCK_V)
    resid = (use_q != 0) & (tot_r > 0)
    target = u * tl.where(resid, tot_r, tot_p)
    found, _ = _range_scan(
        row_a,
        row_b,
        0,
        V,
        V,
        mx,
        z,
        thr,
        Q_ROW,
        resid,
        tl.full([], 0.0, tl.float64),
        target,
        P_OUT,
        write_p,
        COEF,
        MIX,
        FILTER,
        BLOCK_V,
    )
    return tl.minimum(found, V - 1)


@triton.jit
def _combine(STATS_ROW, C, BLOCK_C: tl.constexpr):
    """(M, Z) of a row from its C chunk statistics (m_c, s_c) stored as float64 pairs."""
    c = tl.arange(0, BLOCK_C)
    m = tl.load(STATS_ROW + 2 * c, mask=c < C, other=float("-inf"))
    s = tl.load(STATS_ROW + 2 * c + 1, mask=c < C, other=0.0)
    M = tl.max(m, 0)
    Z = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - M), 0.0), 0)
    return M, Z


@triton.jit
def _combine_argmax(STATS_ROW, ARG_ROW, C, BLOCK_C: tl.constexpr):
    """First global argmax from per-chunk (max, first argmax): the lowest chunk holding the maximum."""
    c = tl.arange(0, BLOCK_C)
    m = tl.load(STATS_ROW + 2 * c, mask=c < C, other=float("-inf"))
    i = tl.load(ARG_ROW + c, mask=c < C, other=0)
    M = tl.max(m, 0)
    first = tl.min(tl.where((m == M) & (c < C), c, BLOCK_C), 0)
    return tl.sum(tl.where(c == first, i, 0), 0)


@triton.jit
def _claim_scan(w, u, C, c, ra, rb, lo, hi, V, M, Z, thr, q_row, resid, P_OUT, write_p, COEF, MIX: tl.constexpr,
                FILTER: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Inverse CDF over chunks: ``w`` holds the row's C chunk masses (every program of the row computes the
    same claim from them); the claiming chunk scans its tokens (``_range_scan``) for the first cumulative mass
    above u * total. Returns (this chunk claims, token); past the end (rounding): the last token with mass."""
    cc = tl.arange(0, BLOCK_C)
    incl = tl.cumsum(w, 0)
    target = u * tl.max(incl, 0)
    last_pos = tl.max(tl.where((w > 0) & (cc < C), cc, 0), 0)
    claim = tl.minimum(tl.min(tl.where((incl > target) & (cc < C), cc, BLOCK_C), 0), last_pos)
    carry = tl.sum(tl.where(cc == claim, incl - w, 0.0), 0)
    found, last_w = _range_scan(
        ra, rb, lo, hi, V, M, Z, thr, q_row, resid, carry, target, P_OUT, write_p, COEF, MIX, FILTER, BLOCK_V
    )
    tok = tl.where(found < V, found, tl.where(last_w >= 0, last_w, hi - 1))  # rounding guard
    return c == claim, tok
