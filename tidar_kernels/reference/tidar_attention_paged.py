"""Reference ``tidar_attention_paged``: gather each row's keys through its block table with one index op, then the
reference ``tidar_attention`` with ``seg_start = seq_lens - S`` (no loop over rows or blocks).

The slot indices of a step and its ``seg_start`` tensor are built once per ``(block_table, seq_lens)`` pair and
remembered on the table for the tensors' versions: every layer of a model forward passes the same two, so a layer
costs two index_select calls and the attention (whose mask the reference ``tidar_attention`` builds once per
forward, keyed on that same ``seg_start`` object)."""

from __future__ import annotations

import torch

from .._checks import int_range, version
from ..backends import register
from .tidar_attention import tidar_attention


def paged_slots(block_table, seq_lens, block_size: int, kv_len: int | None = None):
    """``(slots [B, kv_len] int64, kv_len)``: slot ``block_table[b, j // block_size] * block_size + j % block_size``
    of key j of row b, for ``j < seq_lens[b]``; slot 0 past a row's length (never seen: past the row's segment).
    ``kv_len`` defaults to ``max(seq_lens)`` (the whole table while capturing a CUDA graph)."""
    if kv_len is None:
        rng = int_range(seq_lens) if seq_lens.numel() else (0, 0)
        kv_len = rng[1] if rng is not None else block_table.shape[1] * block_size
    j = torch.arange(kv_len, device=block_table.device)
    # a key past a row's length may lie past the table (k_seg keys follow the pool keys off the pool): clamp the
    # column; such entries are replaced by slot 0 below
    blocks = block_table.long()[:, (j // block_size).clamp(max=max(block_table.shape[1] - 1, 0))]  # [B, kv_len]
    slots = blocks * block_size + (j % block_size)[None]
    return torch.where(j[None] < seq_lens[:, None].long(), slots, 0), kv_len  # entries past a length may be junk


def gather_paged_kv(k_cache, v_cache, block_table, seq_lens, kv_len: int | None = None):
    """``(k, v)`` ``[B, Hkv, kv_len, D]``: key j of row b is ``k_cache[block_table[b, j // block_size], j %
    block_size]`` for ``j < seq_lens[b]`` (past it: the pool's slot 0)."""
    slots, kv_len = paged_slots(block_table, seq_lens, k_cache.shape[1], kv_len)
    return _gather(k_cache, slots).transpose(1, 2), _gather(v_cache, slots).transpose(1, 2)


def _gather(cache, slots):
    """``cache``'s slots ``[B, n]`` as a fresh ``[B, n, H, D]`` tensor (one index_select when the pool's blocks and
    offsets flatten to one dim without a copy)."""
    B, n = slots.shape
    nb, bs, H, D = cache.shape
    if cache.stride(0) == bs * cache.stride(1):
        flat = cache.as_strided((nb * bs, H, D), (cache.stride(1), cache.stride(2), cache.stride(3)))
        return flat.index_select(0, slots.reshape(-1)).view(B, n, H, D)
    return cache[slots // bs, slots % bs]


def _step(block_table, seq_lens, block_size: int, S: int, S_sep: int):
    """``(slots, seg_start, sep_index)`` of this (table, lengths) pair, remembered on the table for both tensors'
    versions: the slots of the pool keys (``max(seq_lens) + S_sep`` per row), ``seg_start``, and where row b's
    ``S_sep`` keys off the pool go (``(rows, seq_lens[b] + m)``, None without them)."""
    key = (id(seq_lens), version(seq_lens), version(block_table), block_size, S, S_sep)
    memo = getattr(block_table, "_tidar_paged_step", None)
    if memo is not None and memo[0] == key and memo[1] is seq_lens:
        return memo[2]
    kv_len = None
    if S_sep:
        rng = int_range(seq_lens)
        kv_len = (rng[1] if rng is not None else block_table.shape[1] * block_size) + S_sep
    slots, _ = paged_slots(block_table, seq_lens, block_size, kv_len)
    seg_start = seq_lens - (S - S_sep)
    sep_index = None
    if S_sep:
        B = seq_lens.shape[0]
        rows = torch.arange(B, device=seq_lens.device)[:, None].expand(B, S_sep)
        sep_index = (rows, seq_lens.long()[:, None] + torch.arange(S_sep, device=seq_lens.device)[None])
    block_table._tidar_paged_step = (key, seq_lens, (slots, seg_start, sep_index))
    return slots, seg_start, sep_index


@register("tidar_attention_paged", "reference", grad=False)
def tidar_attention_paged(
    q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap=None, k_seg=None, v_seg=None
):
    S_sep = 0 if k_seg is None else k_seg.shape[2]
    slots, seg_start, sep_index = _step(block_table, seq_lens, k_cache.shape[1], q.shape[2], S_sep)
    k, v = _gather(k_cache, slots), _gather(v_cache, slots)  # [B, n, Hkv, D]
    if S_sep:  # row b's keys off the pool follow its seq_lens[b] pool keys
        k.index_put_(sep_index, k_seg.transpose(1, 2))
        v.index_put_(sep_index, v_seg.transpose(1, 2))
    return tidar_attention(q, k.transpose(1, 2), v.transpose(1, 2), local_limit, block_id, seg_start, scale, softcap)
