"""Reference ``tidar_attention_paged``: gather each row's keys through its block table with one index op, then the
reference ``tidar_attention`` with ``seg_start = seq_lens - S`` (no loop over rows or blocks)."""

from __future__ import annotations

import torch

from .._checks import int_range
from ..backends import register
from .tidar_attention import tidar_attention


def gather_paged_kv(k_cache, v_cache, block_table, seq_lens, kv_len: int | None = None):
    """``(k, v)`` ``[B, Hkv, kv_len, D]``: key j of row b is ``k_cache[block_table[b, j // block_size], j %
    block_size]`` for ``j < seq_lens[b]``; slots past a row's length hold the pool's block 0 (never seen: they lie
    past the row's segment). ``kv_len`` defaults to ``max(seq_lens)`` (the whole table while capturing a graph)."""
    block_size = k_cache.shape[1]
    if kv_len is None:
        rng = int_range(seq_lens) if seq_lens.numel() else (0, 0)
        kv_len = rng[1] if rng is not None else block_table.shape[1] * block_size
    j = torch.arange(kv_len, device=k_cache.device)
    blocks = block_table.long()[:, j // block_size]  # [B, kv_len]
    blocks = torch.where(j[None] < seq_lens[:, None].long(), blocks, 0)  # entries past a row's length may be junk
    offsets = (j % block_size)[None].expand_as(blocks)
    k = k_cache[blocks, offsets].transpose(1, 2)  # [B, kv_len, Hkv, D] -> [B, Hkv, kv_len, D]
    v = v_cache[blocks, offsets].transpose(1, 2)
    return k, v


@register("tidar_attention_paged", "reference", grad=False)
def tidar_attention_paged(q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap=None):
    k, v = gather_paged_kv(k_cache, v_cache, block_table, seq_lens)
    seg_start = seq_lens - q.shape[2]
    return tidar_attention(q, k, v, local_limit, block_id, seg_start, scale, softcap)
