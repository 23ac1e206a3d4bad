"""Tile classification of the Triton attention from the layout vectors alone (host, O(S) torch ops, no device
sync): the rule the kernels apply (``tidar_attention.py`` explains the tile classes), as tensors for the launchers and
the tests (``tile_classes`` is checked against the dense twin)."""

from __future__ import annotations

import torch
import triton

EMPTY, FULL, PARTIAL = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Layout statistics (host, O(S) torch ops, no device sync)
# ---------------------------------------------------------------------------------------------


def _block_spans(block_id: torch.Tensor):
    """``span_lo[i], span_hi[i]``: first and one-past-last segment index of query i's block
    (``S, 0`` when ``block_id[i] < 0``). A stable sort keeps positions ascending inside each block."""
    S = block_id.shape[0]
    bid = block_id.to(torch.int32).contiguous()
    sorted_b, order = torch.sort(bid, stable=True)
    lo = order[torch.searchsorted(sorted_b, bid, right=False)]
    hi = order[torch.searchsorted(sorted_b, bid, right=True) - 1] + 1
    has = bid >= 0
    lo = torch.where(has, lo, torch.full_like(lo, S))
    hi = torch.where(has, hi, torch.zeros_like(hi))
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def tile_classes(local_limit, block_id, seg_start, kv_len: int, group: int, block_m: int, block_n: int):
    """``[B, n_query_tiles, n_key_tiles]`` int8 classes (EMPTY/FULL/PARTIAL) as the kernels decide them,
    for key tiles aligned at 0 (what the dK/dV kernel walks) and query tiles of ``block_m`` flattened
    (query, group head) rows."""
    S = local_limit.shape[0]
    lo, hi = _block_spans(block_id)
    rows = torch.arange(triton.cdiv(S * group, block_m) * block_m, device=local_limit.device)
    ok = rows < S * group
    qi = (rows // group).clamp_max(S - 1)
    ll = local_limit.long()[qi]
    lim_min = torch.where(ok, ll, S).view(-1, block_m).amin(1)
    lim_max = torch.where(ok, ll, 0).view(-1, block_m).amax(1)
    blo = torch.where(ok, lo.long()[qi], S).view(-1, block_m).amin(1)
    bhi = torch.where(ok, hi.long()[qi], 0).view(-1, block_m).amax(1)
    seg = torch.as_tensor(seg_start, device=local_limit.device).long().view(-1, 1, 1)
    n0 = (torch.arange(triton.cdiv(kv_len, block_n), device=local_limit.device) * block_n).view(1, 1, -1)
    n1 = n0 + block_n
    lim_min, lim_max, blo, bhi = (t.view(1, -1, 1) for t in (lim_min, lim_max, blo, bhi))
    in_a = n0 < seg + lim_max
    b_start = seg + torch.maximum(blo, lim_max)
    in_b = (n0 < seg + bhi) & (n1 > b_start) & (b_start < seg + bhi)
    full = n1 <= seg + lim_min
    cls = torch.where(full, FULL, torch.where(in_a | in_b, PARTIAL, EMPTY))
    return cls.to(torch.int8)


def dkdv_ranges(local_limit, block_id, seg_start, kv_len: int, group: int, block_m: int, block_n: int):
    """``[B, n_key_tiles, 4]`` int32 ``(a_lo, a_hi, b_lo, b_hi)``: the two disjoint query-row ranges (multiples of
    ``block_m``, ``a_hi <= b_lo``; an unused range is empty) the dK/dV kernel walks for each key tile.

    Together they cover every query tile that ``tile_classes`` does not call EMPTY for that key tile (a superset
    of the tiles with a visible (query, key) pair), and they are the tightest two-range cover of them: the hull of
    the non-empty query tiles minus its longest run of empty tiles (in the training layout: the clean queries at
    or after the key tile, then the mask blocks that start past it). O(B x query tiles x key tiles) torch ops on
    the layout's device, no host sync."""
    cls = tile_classes(local_limit, block_id, seg_start, kv_len, group, block_m, block_n)
    ne = (cls != EMPTY).transpose(1, 2)  # [B, n_n, n_m]
    n_m = ne.shape[-1]
    idx = torch.arange(n_m, device=ne.device).expand_as(ne)
    last = torch.where(ne, idx, -1).amax(-1)
    first = torch.where(ne, idx, n_m).amin(-1)
    prev = torch.where(ne, idx, -1).cummax(-1).values  # last non-empty tile at or before m
    prev_excl = torch.cat([torch.full_like(prev[..., :1], -1), prev[..., :-1]], -1)
    gap = torch.where(ne & (prev_excl >= 0), idx - prev_excl - 1, 0)  # empty run ending just before m
    gmax, gend = gap.max(-1)
    split = gmax > 0
    gstart = prev_excl.gather(-1, gend.unsqueeze(-1)).squeeze(-1) + 1
    none = last < 0
    a_lo = torch.where(none, 0, first)
    a_hi = torch.where(none, 0, torch.where(split, gstart, last + 1))
    b_lo = torch.where(split, gend, a_hi)
    b_hi = torch.where(split, last + 1, a_hi)
    return (torch.stack([a_lo, a_hi, b_lo, b_hi], -1) * block_m).to(torch.int32).contiguous()
