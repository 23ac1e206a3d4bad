"""Attention of one layout group's [MASK] blocks over a paged pool (docs/design.md §1.3 rows of the proposal blocks).

The same result as ``tidar_kernels.tidar_attention_paged`` on the group's whole segment (scheduled rows, then
blocks, ``k_seg`` = the blocks), restricted to the block rows (``tests/vllm/test_block_attention.py`` checks it):
the visibility (block b sees its request's pool keys before ``c + j_b`` and its own block) and the pool blocks to
read are built once per forward, so each layer is one gather and one SDPA call. The paged op's validation and mask
build per call cost more than the attention at these sizes on a CPU.

Each layer reads whole pool blocks (``attend_packed``: ``index_select`` on the block dim of vLLM's CPU pool
``[num_blocks, Hkv, block_size, 2 * D]``): one gather brings a block's keys and values for every head, and then one
copy per half puts them ``[B, Hkv, keys, D]`` beside the blocks' own keys and values. Keys of the last blocks past a
row's length are read but never seen (the visibility masks them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=256)
def _block_structure(num_blocks: int, S1: int, js: tuple[int, ...]):
    """``(js per row [M] int64, own-block visibility [M, M] bool)``, shared by every forward with this layout."""
    blk = torch.arange(num_blocks).repeat_interleave(S1)
    js_rows = torch.tensor(js, dtype=torch.int64).repeat_interleave(S1)
    return js_rows, blk[:, None] == blk[None]


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> torch.Tensor:
    return torch.arange(n)


class BlockAttention:
    """``group``: a ``step_layout.Group``; ``seq_lens`` ``[B]``: pool keys of each request (scheduled included);
    ``block_table`` ``[B, max_blocks]``; ``block_size``: the pool's."""

    def __init__(self, group, seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int):
        S1 = group.K + 1
        self.M = len(group.js) * S1
        self.block_size = block_size
        B = seq_lens.shape[0]
        self.kv_len = int(seq_lens.max()) if B else 0
        self.num_pool_blocks = -(-self.kv_len // block_size)  # table columns the longest row reads
        self.table = block_table[:, : self.num_pool_blocks].long()  # [B, nblk]
        self.flat_blocks = self.table.reshape(-1)
        js_rows, own = _block_structure(len(group.js), S1, tuple(group.js))
        limit = seq_lens.long()[:, None] - group.n + js_rows[None]  # [B, M]: pool keys each row sees
        pool_vis = _arange(self.kv_len)[None, None] < limit[:, :, None]  # [B, M, kv_len]
        self.mask = torch.cat([pool_vis, own.expand(B, -1, -1)], dim=2)[:, None]  # [B, 1, M, kv_len + M]

    def _sdpa(self, q, k, v, scale):
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=gqa)

    def __call__(self, q, k_seg, v_seg, k_pool, v_pool, scale: float):
        """q ``[B, H, M, D]``, k_seg/v_seg ``[B, Hkv, M, D]``, pools ``[num_blocks, block_size, Hkv, D]`` views."""
        j = _arange(self.kv_len)
        blocks, offs = self.table[:, j // self.block_size], (j % self.block_size)[None]
        k = torch.cat([k_pool[blocks, offs].transpose(1, 2), k_seg], dim=2)
        v = torch.cat([v_pool[blocks, offs].transpose(1, 2), v_seg], dim=2)
        return self._sdpa(q, k, v, scale)

    def attend_packed(self, q, k_seg, v_seg, kv_cache, layouts: tuple[str, str], scale: float):
        """The same as ``__call__`` read straight off vLLM's CPU pool ``kv_cache`` ``[num_blocks, Hkv, block_size,
        2 * D]``: per block and head the keys, then the values, each half ``[block_size, D]`` ("plain") or
        ``[D, block_size]`` ("transposed"), ``layouts`` as ``kv_pool.probe_layout`` found them. One gather of the
        rows' blocks, then one copy of each half into the keys and values the attention reads."""
        B, Hkv, M, D = k_seg.shape
        nblk, bs, n = self.num_pool_blocks, self.block_size, self.kv_len
        g = kv_cache.index_select(0, self.flat_blocks).view(B, nblk, Hkv, 2, bs * D)
        kv = k_seg.new_empty((2, B, Hkv, n + M, D))
        full = (nblk - 1) * bs  # keys in the whole blocks, then the last block's first n - full
        for half, layout in enumerate(layouts):
            h = g[:, :, :, half]
            h = h.view(B, nblk, Hkv, bs, D) if layout == "plain" else h.view(B, nblk, Hkv, D, bs).transpose(3, 4)
            if full:
                kv[half, :, :, :full].unflatten(2, (nblk - 1, bs)).copy_(h[:, : nblk - 1].transpose(1, 2))
            if n:
                kv[half, :, :, full:n] = h[:, nblk - 1, :, : n - full]
        kv[0, :, :, n:] = k_seg
        kv[1, :, :, n:] = v_seg
        return self._sdpa(q, kv[0], kv[1], scale)
