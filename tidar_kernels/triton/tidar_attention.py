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

from ..backends import register, triton_interpreted
from .tidar_attention_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel, _merge_kernel
from .tidar_attention_tiles import EMPTY, FULL, PARTIAL, _block_spans, dkdv_ranges, tile_classes

LOG2E = 1.4426950408889634

# Test hook: force tile sizes, e.g. {"BLOCK_M": 16, "BLOCK_N": 16}; None = automatic.
_FORCE_CONFIG: dict | None = None


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
        cfg = dict(
            BLOCK_M=128 if big else 64,
            BLOCK_N=64 if BLOCK_D <= 128 else 32,
            num_warps=8 if big else 4,
            num_stages=3 if BLOCK_D <= 128 else 2,
        )
    cfg["BLOCK_D"] = BLOCK_D
    cfg["UPCAST"] = dtype == torch.bfloat16 and triton_interpreted()  # interpreter: bf16 tl.dot is wrong
    cfg["PREC"] = "ieee" if dtype == torch.float32 else "tf32"
    return cfg


def _launch_opts(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


def _tile_consts(cfg: dict, D: int, BM: int, BN: int, BD: int, soft: bool) -> dict:
    """The compile-time constants and launch options every attention kernel (forward, dQ, dK/dV) takes."""
    consts = dict(D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, UPCAST=cfg["UPCAST"], PREC=cfg["PREC"], SOFTCAP=soft)
    return {**consts, **_launch_opts(cfg)}


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
    common = _tile_consts(cfg, D, BM, BN, BD, soft)
    grid = (n_m, B * Hkv, num_splits)
    if num_splits == 1:
        # fmt: off
        _fwd_kernel[grid](
            q, k, v, out, lse, ll, bid, span_lo, span_hi, seg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), 0,
            S, Skv, G, Hkv, qk_scale, cap, 1, SPLIT=False, **common,
        )
        # fmt: on
        return out, lse
    rows = B * Hq * S
    o_part = torch.empty((num_splits, B, Hq, S, BD), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((num_splits, B, Hq, S), dtype=torch.float32, device=q.device)
    # fmt: off
    _fwd_kernel[grid](
        q, k, v, o_part, lse_part, ll, bid, span_lo, span_hi, seg,
        *q.stride(), *k.stride(), *v.stride(), Hq * S * BD, S * BD, BD, 1, Hq * S, S, 1, rows,
        S, Skv, G, Hkv, qk_scale, cap, num_splits, SPLIT=True, **common,
    )
    # fmt: on
    # fmt: off
    _merge_kernel[(rows,)](
        o_part, lse_part, out, lse, rows, num_splits, rows, Hq, S, *out.stride(),
        D=D, BLOCK_D=BD, BLOCK_SPLIT=max(2, triton.next_power_of_2(num_splits)),
    )
    # fmt: on
    return out, lse


def _backward(do, q, k, v, out, lse, local_limit, block_id, seg_start, scale, softcap=0.0):
    B, Hq, S, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cfg = _config(D, q.dtype, q.device, backward=True)
    if softcap > 0 and cfg["BLOCK_D"] == 64 and cfg.get("num_warps") == 4 and "dkdv_stages" not in cfg:
        cfg["dkdv_warps"] = 8  # the GPU config's D = 64 dK/dV spills 48 B with 4 warps and the tanh tile (sm_90 check)
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
    common = _tile_consts(cfg, D, BM, BN, BD, soft)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    # fmt: off
    _bwd_dq_kernel[(triton.cdiv(S * G, BM), B * Hkv)](
        q, k, v, do, dq, lse, delta, ll, bid, span_lo, span_hi, seg, *strides,
        S, Skv, G, Hkv, qk_scale, cap, scale, **common,
    )
    # fmt: on
    n_n = triton.cdiv(Skv, BN)
    ranges = dkdv_ranges(ll, bid, seg, Skv, G, BM, BN)  # [B, n_n, 4]
    dkdv_opts = dict(common)
    if "dkdv_warps" in cfg:
        dkdv_opts["num_warps"] = cfg["dkdv_warps"]
    if "dkdv_stages" in cfg:
        dkdv_opts["num_stages"] = cfg["dkdv_stages"]
    # fmt: off
    _bwd_dkdv_kernel[(n_n, B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, ll, bid, span_lo, span_hi, seg, ranges, *strides, *dk.stride(),
        *dv.stride(), S, Skv, G, Hkv, qk_scale, cap, scale, n_n, **dkdv_opts,
    )
    # fmt: on
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile / CUDA graphs) + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tidar_kernels::triton_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local_limit: torch.Tensor,
    block_id: torch.Tensor,
    seg_start: torch.Tensor,
    scale: float,
    num_splits: int,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, local_limit, block_id, seg_start, scale, num_splits, softcap)


@_fwd_op.register_fake
def _(q, k, v, local_limit, block_id, seg_start, scale, num_splits, softcap=0.0):
    B, Hq, S, D = q.shape
    return q.new_empty((B, Hq, S, D)), q.new_empty((B, Hq, S), dtype=torch.float32)


@torch.library.custom_op("tidar_kernels::triton_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    local_limit: torch.Tensor,
    block_id: torch.Tensor,
    seg_start: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, local_limit, block_id, seg_start, scale, softcap)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, local_limit, block_id, seg_start, scale, softcap=0.0):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


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
    out, lse = _fwd_op(
        q,
        k,
        v,
        local_limit,
        block_id,
        seg_start,
        float(scale),
        int(num_splits),
        0.0 if softcap is None else float(softcap),
    )
    return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))


# limits stated in the record (tidar_kernels.backends): auto falls back to the reference outside them
@register("tidar_attention", "triton", dtypes=_TL_DTYPES, max_head_dim=256)
def tidar_attention(q, k, v, local_limit, block_id, seg_start, scale, softcap=None):
    return _fwd_op(
        q, k, v, local_limit, block_id, seg_start, float(scale), 0, 0.0 if softcap is None else float(softcap)
    )[0]


__all__ = ["attention_with_lse", "dkdv_ranges", "tidar_attention", "tile_classes", "EMPTY", "FULL", "PARTIAL"]
