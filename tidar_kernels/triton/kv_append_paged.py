"""Triton ``kv_append_paged``: one program per (tile of tokens, head) copies K and V of each token to its slot
``(slot // block_size, slot % block_size)`` of the pool; a slot of -1 is skipped. Pure loads and stores on integer
views (bit-exact); strides in, so non-contiguous inputs need no copy. Slots were checked on the host by
``tidar_kernels.ops.kv_append_paged`` (in the pool, no slot twice)."""

from __future__ import annotations

import triton
import triton.language as tl

from ..backends import register
from .kv_append import _as_bits


@triton.jit
def _kv_append_paged_kernel(
    kc, vc, kn, vn, slots,
    T, D, block_size,
    s_kc_b, s_kc_o, s_kc_h, s_kc_d,
    s_vc_b, s_vc_o, s_vc_h, s_vc_d,
    s_kn_t, s_kn_h, s_kn_d,
    s_vn_t, s_vn_h, s_vn_d,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slots + offs_t, mask=offs_t < T, other=-1).to(tl.int64)
    keep = slot >= 0
    m = keep[:, None] & (offs_d[None, :] < D)
    blk = tl.where(keep, slot // block_size, 0)
    off = tl.where(keep, slot % block_size, 0)
    t64 = offs_t.to(tl.int64)
    src = t64[:, None] * s_kn_t + h * s_kn_h + offs_d[None, :] * s_kn_d
    dst = blk[:, None] * s_kc_b + off[:, None] * s_kc_o + h * s_kc_h + offs_d[None, :] * s_kc_d
    tl.store(kc + dst, tl.load(kn + src, mask=m), mask=m)
    src = t64[:, None] * s_vn_t + h * s_vn_h + offs_d[None, :] * s_vn_d
    dst = blk[:, None] * s_vc_b + off[:, None] * s_vc_o + h * s_vc_h + offs_d[None, :] * s_vc_d
    tl.store(vc + dst, tl.load(vn + src, mask=m), mask=m)


@register("kv_append_paged", "triton")
def kv_append_paged(k_cache, v_cache, k_new, v_new, slot_mapping):
    T, H, D = k_new.shape
    if T == 0:
        return None
    kc, vc, kn, vn = (_as_bits(t) for t in (k_cache, v_cache, k_new, v_new))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_T = max(1, min(triton.next_power_of_2(T), max(1, 4096 // BLOCK_D), 64))
    # fmt: off
    _kv_append_paged_kernel[(triton.cdiv(T, BLOCK_T), H)](
        kc, vc, kn, vn, slot_mapping.contiguous(),
        T, D, k_cache.shape[1],
        *kc.stride(), *vc.stride(), *kn.stride(), *vn.stride(),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )
    # fmt: on
    return None
