"""Triton ``kv_append``: one program per (row, head, tile of tokens) copies K and V of the segment into
the cache at ``seg_start[row]``. Pure loads and stores (bit-exact); strides in, so non-contiguous inputs
need no copy. Bounds were checked on the host by ``tidar_kernels.ops.kv_append``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import register


@triton.jit
def _kv_append_kernel(
    kc, vc, kn, vn, seg_start,
    H, S, D,
    s_kc_b, s_kc_h, s_kc_s, s_kc_d,
    s_vc_b, s_vc_h, s_vc_s, s_vc_d,
    s_kn_b, s_kn_h, s_kn_s, s_kn_d,
    s_vn_b, s_vn_h, s_vn_s, s_vn_d,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_s[:, None] < S) & (offs_d[None, :] < D)
    dst_s = tl.load(seg_start + b).to(tl.int64) + offs_s
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    src = b64 * s_kn_b + h64 * s_kn_h + offs_s[:, None].to(tl.int64) * s_kn_s + offs_d[None, :] * s_kn_d
    dst = b64 * s_kc_b + h64 * s_kc_h + dst_s[:, None] * s_kc_s + offs_d[None, :] * s_kc_d
    tl.store(kc + dst, tl.load(kn + src, mask=m), mask=m)
    src = b64 * s_vn_b + h64 * s_vn_h + offs_s[:, None].to(tl.int64) * s_vn_s + offs_d[None, :] * s_vn_d
    dst = b64 * s_vc_b + h64 * s_vc_h + dst_s[:, None] * s_vc_s + offs_d[None, :] * s_vc_d
    tl.store(vc + dst, tl.load(vn + src, mask=m), mask=m)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same memory viewed as an integer type: the copy moves bits and cannot canonicalise NaNs."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@register("kv_append", "triton")
def kv_append(k_cache, v_cache, k_new, v_new, seg_start):
    B, H, S, D = k_new.shape
    if B == 0 or H == 0 or S == 0 or D == 0:
        return None
    kc, vc, kn, vn = (_as_bits(t) for t in (k_cache, v_cache, k_new, v_new))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_S = max(1, min(triton.next_power_of_2(S), max(1, 4096 // BLOCK_D), 64))
    grid = (B * H, triton.cdiv(S, BLOCK_S))
    # fmt: off
    _kv_append_kernel[grid](
        kc, vc, kn, vn, seg_start.to(torch.int32).contiguous(),
        H, S, D,
        *kc.stride(), *vc.stride(), *kn.stride(), *vn.stride(),
        BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
    )
    # fmt: on
    return None
