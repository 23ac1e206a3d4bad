"""Attention of one layout group's [MASK] blocks over a paged pool (docs/design.md §1.3 rows of the proposal blocks).

The same result as ``tidar_kernels.tidar_attention_paged`` on the group's whole segment (scheduled rows, then
blocks, ``k_seg`` = the blocks), restricted to the block rows (``tests/vllm/test_block_attention.py`` checks it):
the visibility (block b sees its request's pool keys before ``c + j_b`` and its own block) and the key slots are
built once per forward, so each layer is one gather and one SDPA call. The paged op's validation and mask build
per call cost more than the attention at these sizes on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidar_kernels.reference.tidar_attention_paged import paged_slots


class BlockAttention:
    """``group``: a ``step_layout.Group``; ``seq_lens`` ``[B]``: pool keys of each request (scheduled included);
    ``block_table`` ``[B, max_blocks]``; ``block_size``: the pool's."""

    def __init__(self, group, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int):
        S1 = group.K + 1
        self.M = len(group.js) * S1
        self.block_size = block_size
        slots, self.kv_len = paged_slots(block_table, seq_lens, block_size)
        self.blocks, self.offs = slots // block_size, slots % block_size  # [B, kv_len]: the keys' pool entries
        js = torch.tensor(group.js, dtype=torch.int64).repeat_interleave(S1)  # [M]: scheduled rows each row sees
        limit = seq_lens.long()[:, None] - group.n + js[None]  # [B, M]: pool keys each row sees
        pool_vis = torch.arange(self.kv_len)[None, None] < limit[:, :, None]  # [B, M, kv_len]
        blk = torch.arange(len(group.js)).repeat_interleave(S1)
        own = (blk[:, None] == blk[None]).expand(seq_lens.shape[0], -1, -1)  # [B, M, M]
        self.mask = torch.cat([pool_vis, own], dim=2)[:, None]  # [B, 1, M, kv_len + M]

    def __call__(self, q, k_seg, v_seg, k_pool, v_pool, scale: float):
        """q ``[B, H, M, D]``, k_seg/v_seg ``[B, Hkv, M, D]``, pools ``[num_blocks, block_size, Hkv, D]`` views."""
        k = torch.cat([k_pool[self.blocks, self.offs].transpose(1, 2), k_seg], dim=2)
        v = torch.cat([v_pool[self.blocks, self.offs].transpose(1, 2), v_seg], dim=2)
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=gqa)
