"""Reference ``kv_append``: one scatter per cache with index_put_ (exact copy)."""

from __future__ import annotations

import torch

from .._checks import int_range
from ..backends import register


@register("kv_append", "reference")
def kv_append(k_cache, v_cache, k_new, v_new, seg_start):
    B, H, S, _ = k_new.shape
    rng = int_range(seg_start)  # remembered from the op's bounds check: no second sync
    if rng is not None and rng[0] == rng[1]:  # one offset for every row (batch 1, unpadded batches): a slice copy
        k_cache[:, :, rng[0] : rng[0] + S].copy_(k_new)
        v_cache[:, :, rng[0] : rng[0] + S].copy_(v_new)
        return
    rows = torch.arange(B, device=k_cache.device).view(B, 1)
    cols = seg_start.long().view(B, 1) + torch.arange(S, device=k_cache.device).view(1, S)  # [B, S]
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        # cache[b, :, cols[b, s]] = new[b, :, s]: index the (B, Smax) dims with H and D kept
        cache.transpose(1, 2).index_put_((rows, cols), new.transpose(1, 2))
