"""The FlexAttention peer of the attention benchmarks: a BlockMask straight from a TiDAR layout's vectors
(``block_tables``: full / partial tiles from ``local_limit`` and ``block_id``, never from a dense mask;
``dense_block_tables``: the same from the dense twin, its check) and the compiled ``flex_attention``."""

from __future__ import annotations

import math

import torch

from tidar_kernels import layouts

TILE = 128  # FlexAttention's default Q and KV block size


def block_tables(
    local_limit: torch.Tensor,
    block_id: torch.Tensor,
    seg_start: int,
    kv_len: int,
    q_tile: int = TILE,
    kv_tile: int = TILE,
) -> dict:
    """Per (query tile, key tile): full (every pair visible) or partial (some) — from the vectors, never
    from a dense mask. Work is O(S * kv_len / kv_tile): for each query, the number of visible keys in each
    key tile is the overlap of the tile with two intervals, the prefix ``[0, seg_start + local_limit[i])``
    and its block's run in the segment (blocks are contiguous runs in every TiDAR layout; checked).

    Returns ``partial``/``full`` bool ``[nq, nk]``, ``counts`` int64 ``[S, nk]`` and ``pairs`` (visible pairs)."""
    dev = local_limit.device
    S = local_limit.shape[0]
    ll = local_limit.long()
    bid = block_id.long()
    nq, nk = math.ceil(S / q_tile), math.ceil(kv_len / kv_tile)
    c0 = torch.arange(nk, device=dev) * kv_tile
    c1 = (c0 + kv_tile).clamp_max(kv_len)
    pre_end = seg_start + ll  # [S]
    counts = (torch.minimum(pre_end[:, None], c1[None]) - c0[None]).clamp_min(0)  # prefix part
    has = bid >= 0
    if bool(has.any()):
        ids = bid.clamp_min(0)
        nb = int(ids.max()) + 1
        idx = torch.arange(S, device=dev)
        lo = torch.full((nb,), S, device=dev).scatter_reduce(0, ids[has], idx[has], "amin")
        hi = torch.full((nb,), -1, device=dev).scatter_reduce(0, ids[has], idx[has], "amax") + 1
        size = torch.zeros(nb, dtype=torch.long, device=dev).scatter_add(0, ids[has], torch.ones_like(idx[has]))
        used = size > 0
        if not torch.equal((hi - lo)[used], size[used]):
            raise NotImplementedError("block_tables needs every block to be a contiguous run of the segment")
        b_lo = torch.maximum(seg_start + lo[ids], pre_end)  # keys of the block not already in the prefix
        b_hi = seg_start + hi[ids]
        blk = (torch.minimum(b_hi[:, None], c1[None]) - torch.maximum(b_lo[:, None], c0[None])).clamp_min(0)
        counts = counts + torch.where(has[:, None], blk, 0)
    tile_len = (c1 - c0)[None]
    pad = nq * q_tile - S  # query rows past S do not exist: they neither fill nor break a tile
    full_q = torch.cat([counts == tile_len, torch.ones(pad, nk, dtype=torch.bool, device=dev)])
    any_q = torch.cat([counts > 0, torch.zeros(pad, nk, dtype=torch.bool, device=dev)])
    full = full_q.view(nq, q_tile, nk).all(1)
    partial = any_q.view(nq, q_tile, nk).any(1) & ~full
    return {"partial": partial, "full": full, "counts": counts, "pairs": int(counts.sum())}


def dense_block_tables(local_limit, block_id, seg_start: int, kv_len: int, q_tile=TILE, kv_tile=TILE) -> dict:
    """The same tables from the dense twin (``layouts.dense_mask``): the check of ``block_tables``."""
    m = layouts.dense_mask(local_limit, block_id, seg_start, kv_len)[0]  # [S, Skv]
    S = m.shape[0]
    nq, nk = math.ceil(S / q_tile), math.ceil(kv_len / kv_tile)
    padded = torch.zeros(nq * q_tile, nk * kv_tile, dtype=torch.bool, device=m.device)
    padded[:S, :kv_len] = m
    valid = torch.zeros_like(padded)
    valid[:S, :kv_len] = True
    t = padded.view(nq, q_tile, nk, kv_tile).transpose(1, 2)
    v = valid.view(nq, q_tile, nk, kv_tile).transpose(1, 2)
    anyv = t.flatten(2).any(-1)
    full = (t | ~v).flatten(2).all(-1) & v.flatten(2).any(-1)
    return {"partial": anyv & ~full, "full": full, "pairs": int(m.sum())}


def _kv_table(mask: torch.Tensor):
    """bool [nq, nk] -> (num [1, 1, nq], indices [1, 1, nq, nk]) int32, listed tiles first in kv order."""
    nk = mask.shape[1]
    num = mask.sum(-1).to(torch.int32)
    order = torch.argsort((~mask).to(torch.int8) * nk + torch.arange(nk, device=mask.device), dim=-1)
    return num[None, None], order.to(torch.int32)[None, None]


def flex_block_mask(local_limit, block_id, seg_start: int, kv_len: int, tables: dict):
    from torch.nn.attention.flex_attention import BlockMask

    S = local_limit.shape[0]
    ll, bid = local_limit.long(), block_id.long()

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - seg_start
        in_seg = (rel >= 0) & (rel < S)
        bq = bid[q_idx]
        bk = bid[rel.clamp(0, S - 1)]
        return (kv_idx < seg_start + ll[q_idx]) | (in_seg & (bq >= 0) & (bk == bq))

    kv_num, kv_idx = _kv_table(tables["partial"])
    full_num, full_idx = _kv_table(tables["full"])
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(S, kv_len)
    )


_FLEX = {}


def flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _FLEX:
        import torch._dynamo

        for name in (
            "cache_size_limit",
            "recompile_limit",
            "accumulated_cache_size_limit",
            "accumulated_recompile_limit",
        ):
            if hasattr(torch._dynamo.config, name):  # one compile per shape; never fall back to eager silently
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]
