"""Reference ``tidar_attention``: SDPA with the dense twin of the layout (explicit softmax when soft-capping)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import int_range, version
from ..backends import register
from ..layouts import dense_mask

_MEMO: list = [None, None]  # (key, (attn_mask, empty, tensors)) of the last call: every layer of a forward shares it


def _mask(local_limit, block_id, seg_start, kv_len):
    """SDPA's boolean mask ``[B, 1, S, Skv]`` (rows that see nothing opened up, zeroed after) and the empty rows
    ``[B, 1, S, 1]``, built once per forward: the layers of one model forward pass the same layout and
    ``seg_start`` tensors (same objects, same versions), so the later layers reuse it. On a CPU, a mask that
    hides nothing is None (SDPA's unmasked path) and no empty rows is None."""
    key = (
        id(local_limit),
        version(local_limit),
        id(block_id),
        version(block_id),
        id(seg_start),
        version(seg_start),
        kv_len,
        local_limit.device,
    )
    if _MEMO[0] == key and _MEMO[1][2] is local_limit and _MEMO[1][3] is block_id and _MEMO[1][4] is seg_start:
        return _MEMO[1][0], _MEMO[1][1]
    if local_limit.device.type == "cpu":
        attn_mask, empty = _cpu_mask(local_limit, block_id, seg_start, kv_len)
    else:
        mask = dense_mask(local_limit, block_id, seg_start, kv_len)  # [B, S, Skv]
        empty = ~mask.any(-1, keepdim=True)  # queries that see nothing: compute on all keys, then zero (no NaN)
        attn_mask, empty = (mask | empty)[:, None], empty[:, None]
    _MEMO[0], _MEMO[1] = key, (attn_mask, empty, local_limit, block_id, seg_start)  # held: their ids stay unique
    return attn_mask, empty


def _cpu_mask(local_limit, block_id, seg_start, kv_len):
    """The CPU mask, with data-dependent shortcuts (reading a CPU tensor costs no device sync). A decode step
    (every row's segment at the same ``seg_start`` s0, ``local_limit >= 0``, the segment ending the keys) sees
    the whole prefix, so its mask is ``[ones(S, s0) | the layout's own S x S mask]``: a concatenation with the
    S x S part cached per layout, instead of the dense rule over ``[B, S, Skv]`` in every step."""
    S = local_limit.shape[0]
    rng = int_range(seg_start) if seg_start.numel() else None  # memoized: the cache seeds it
    if rng is not None and rng[0] == rng[1] and rng[0] >= 0 and rng[0] + S == kv_len:
        s0 = rng[0]
        local, local_all, local_empty, limit_ok = _local_mask(local_limit, block_id)
        if limit_ok:
            if s0 == 0:
                empty = local_empty
                attn_mask = None if local_all else (local if empty is None else local | empty)[None, None]
                return attn_mask, None if empty is None else empty[None, None]
            if local_all:
                return None, None
            return torch.cat((local.new_ones(S, s0), local), 1)[None, None], None
    if S == 1 and rng is not None and rng[0] >= 0 and rng[1] + 1 == kv_len:
        # one token per row at its own offset (a ragged batch's AR step): row b sees keys 0..seg_start[b] when the
        # layout lets the token see itself, which ``dense_mask`` would build through the general rule every step
        local, local_all, _, limit_ok = _local_mask(local_limit, block_id)
        if limit_ok and local_all:
            cols = torch.arange(kv_len, device=seg_start.device)
            return (cols[None] <= seg_start.long()[:, None])[:, None, None], None
    mask = dense_mask(local_limit, block_id, seg_start, kv_len)  # [B, S, Skv]
    empty = ~mask.any(-1, keepdim=True)
    attn_mask, empty = (mask | empty)[:, None], empty[:, None]
    return (None if bool(attn_mask.all()) else attn_mask), (empty if bool(empty.any()) else None)


_LOCAL: dict = {}  # (ids, versions) -> (local_limit, block_id, [S, S] mask, all visible, empty rows, limit >= 0)


def _local_mask(local_limit, block_id):
    key = (id(local_limit), version(local_limit), id(block_id), version(block_id))
    hit = _LOCAL.get(key)
    if hit is not None and hit[0] is local_limit and hit[1] is block_id:
        return hit[2:]
    S = local_limit.shape[0]
    local = dense_mask(local_limit, block_id, 0, S)[0]  # [S, S]
    empty = ~local.any(-1, keepdim=True)
    entry = (
        local_limit,
        block_id,
        local,
        bool(local.all()),
        empty if bool(empty.any()) else None,
        bool((local_limit >= 0).all()),
    )
    if len(_LOCAL) > 256:  # layouts are cached singletons, so this stays small; bound it anyway
        _LOCAL.clear()
    _LOCAL[key] = entry  # holds the tensors: their ids stay unique while the entry lives
    return entry[2:]


@register("tidar_attention", "reference")
def tidar_attention(q, k, v, local_limit, block_id, seg_start, scale, softcap=None):
    attn_mask, empty = _mask(local_limit, block_id, seg_start, k.shape[2])
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    else:
        full = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device) if attn_mask is None else attn_mask
        out = softcapped_attention(q, k, v, full, scale, softcap)
    return out if empty is None else out.masked_fill(empty, 0.0)


def softcapped_attention(q, k, v, mask, scale: float, softcap: float):
    """Attention with logit soft-capping in the order of transformers' Gemma2 eager attention: scores scaled,
    then ``softcap * tanh(scores / softcap)``, then masked (``mask`` boolean, broadcast to ``[B, Hq, S, Skv]``,
    True = visible), then softmax in float32, cast back to the input dtype before ``@ v``."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    weights = torch.softmax(scores, -1, dtype=acc).to(q.dtype)
    return torch.matmul(weights, v)
