"""Reference ``tidar_attention``: SDPA with the dense twin of the layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import register
from ..layouts import dense_mask


@register("tidar_attention", "reference")
def tidar_attention(q, k, v, local_limit, block_id, seg_start, scale):
    mask = dense_mask(local_limit, block_id, seg_start, k.shape[2])  # [B, S, Skv]
    empty = ~mask.any(-1, keepdim=True)  # queries that see nothing: compute on all keys, then zero (no NaN)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=(mask | empty)[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.masked_fill(empty[:, None], 0.0)
