"""TiDAR attention layouts as data: ``local_limit`` + ``block_id`` (docs/design.md §2).

A segment of S tokens is appended after ``seg_start`` cached keys. Query ``i`` sees key ``j`` iff

    j < seg_start + local_limit[i]
    or (seg_start <= j < seg_start + S and block_id[i] >= 0 and block_id[j - seg_start] == block_id[i])

Keys at ``j >= seg_start + S`` (scratch of a longer row in a ragged batch) are never seen. Every layout
below is computed once per shape and cached; ``dense_mask`` builds the boolean twin from the same rule.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # identity hash: layouts are cached singletons
class Layout:
    """One segment's mask and positions. ``position_ids`` are offsets from the segment's first position."""

    local_limit: torch.Tensor  # int32 [S]
    block_id: torch.Tensor  # int32 [S]
    position_ids: torch.Tensor  # int64 [S]

    @property
    def seg_len(self) -> int:
        return self.local_limit.shape[0]

    def to(self, device) -> Layout:
        device = torch.device(device)
        if self.local_limit.device == device:
            return self
        return _on_device(self, device)


# Layouts are process-wide singletons: they are built as normal tensors even when first asked for under
# torch.inference_mode (inference tensors carry no version counter, which the ops' per-forward memos key on).
@functools.lru_cache(maxsize=256)
@torch.inference_mode(False)
def _on_device(layout: Layout, device: torch.device) -> Layout:
    return Layout(*(t.to(device) for t in (layout.local_limit, layout.block_id, layout.position_ids)))


@torch.inference_mode(False)
def _layout(local_limit, block_id, position_ids) -> Layout:
    return Layout(
        torch.tensor(local_limit, dtype=torch.int32),
        torch.tensor(block_id, dtype=torch.int32),
        torch.tensor(position_ids, dtype=torch.int64),
    )


_INT32_MAX = 2**31 - 1


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _seg_len(what: str, S: int) -> int:
    """A layout's segment length must fit the int32 ``local_limit`` values: raised before any list is built."""
    if S > _INT32_MAX:
        raise ValueError(f"{what} would have {S} tokens, more than the int32 layout vectors can index (2^31 - 1)")
    return S


def _cached(fn):
    """``lru_cache`` keyed on validated ints: a bad argument (4.0, True, "4", [4]) raises naming itself
    before the cache is consulted (the cache's key treats 4.0 == 4 and True == 1 as equal)."""
    sig = inspect.signature(fn)
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        return cached(*(_positive(n, v) for n, v in bound.arguments.items()))

    wrapper.cache_info, wrapper.cache_clear = cached.cache_info, cached.cache_clear
    return wrapper


@_cached
def training(seq_len: int, block_size: int) -> Layout:
    """Hybrid training layout (docs/design.md §3.1): L clean tokens then L ``[MASK]`` tokens, S = 2L.

    Clean token i is causal (local_limit i+1, block -1). The mask token at L+i belongs to block
    b = i // K, sees the clean tokens before its block (local_limit b*K) and its own block.
    Both halves use positions 0..L-1. The last block is partial when L is not a multiple of K.

    L=4, K=2 (rows are queries, ``#`` = visible)::

        keys:      c0 c1 c2 c3 m0 m1 m2 m3
        c0         #  .  .  .  .  .  .  .
        c1         #  #  .  .  .  .  .  .
        c2         #  #  #  .  .  .  .  .
        c3         #  #  #  #  .  .  .  .
        m0 (b0)    .  .  .  .  #  #  .  .
        m1 (b0)    .  .  .  .  #  #  .  .
        m2 (b1)    #  #  .  .  .  .  #  #
        m3 (b1)    #  #  .  .  .  .  #  #
    """
    L, K = _positive("seq_len", seq_len), _positive("block_size", block_size)
    _seg_len(f"training(seq_len={L}) (S = 2 * seq_len)", 2 * L)
    clean = range(L)
    return _layout(
        [i + 1 for i in clean] + [(i // K) * K for i in clean],
        [-1] * L + [i // K for i in clean],
        list(clean) + list(clean),
    )


@_cached
def prefill(prompt_len: int, draft_len: int) -> Layout:
    """Prefill layout (docs/design.md §3.2): n prompt tokens (causal) then one block of K masks that sees the
    whole prompt and itself. Positions 0..n-1 then n..n+K-1.

    n=3, K=2::

        keys:   x0 x1 x2 m0 m1
        x0      #  .  .  .  .
        x1      #  #  .  .  .
        x2      #  #  #  .  .
        m0      #  #  #  #  #
        m1      #  #  #  #  #
    """
    n, K = _positive("prompt_len", prompt_len), _positive("draft_len", draft_len)
    _seg_len(f"prefill({n}, {K}) (S = prompt_len + draft_len)", n + K)
    return _layout(
        [i + 1 for i in range(n)] + [n] * K,
        [-1] * n + [0] * K,
        list(range(n + K)),
    )


def decode_step(draft_len: int, levels=None) -> Layout:
    """Decode-step layout (docs/design.md §4): K drafts (causal), then one proposal block of K masks per
    level j in ``levels`` (default: all of 1..K, the paper's layout). Block j assumes drafts d_0..d_{j-1}
    accepted: it sees them (local_limit j) and itself; its slot s sits at position offset j+s.
    S = K + K * len(levels). ``levels`` must be strictly increasing ints in 1..K; ``()`` gives the drafts
    alone (S = K: a plain causal verification, e.g. K = 1 is an AR step).

    K=2 (the cached prefix, seen by every query, is not drawn)::

        keys:    d0 d1 b1s0 b1s1 b2s0 b2s1     pos
        d0       #  .  .    .    .    .        0
        d1       #  #  .    .    .    .        1
        b1s0     #  .  #    #    .    .        1
        b1s1     #  .  #    #    .    .        2
        b2s0     #  #  .    .    #    #        2
        b2s1     #  #  .    .    #    #        3

    With ``levels=(2,)`` only the rows and keys of block 2 remain after d0, d1.
    """
    K = _positive("draft_len", draft_len)
    if levels is None:
        return _decode_step(K, tuple(range(1, K + 1)))
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"levels must be None or a sequence of ints in 1..{K}, got {levels!r}")
    levels = tuple(levels)
    for j in levels:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral):
            raise ValueError(f"levels must hold ints, got {j!r} in {levels!r}")
    levels = tuple(int(j) for j in levels)
    if list(levels) != sorted(set(levels)):
        raise ValueError(f"levels must be strictly increasing, got {levels!r}")
    if levels and (levels[0] < 1 or levels[-1] > K):
        raise ValueError(f"levels must lie in 1..draft_len={K}, got {levels!r}")
    return _decode_step(K, levels)


@functools.lru_cache(maxsize=512)
def _decode_step(K: int, levels: tuple) -> Layout:
    _seg_len(f"decode_step(draft_len={K}) with {len(levels)} levels (S = K + K * levels)", K + K * len(levels))
    limit, block, pos = [t + 1 for t in range(K)], [-1] * K, list(range(K))
    for j in levels:
        limit += [j] * K
        block += [j] * K
        pos += [j + s for s in range(K)]
    return _layout(limit, block, pos)


def dense_mask(local_limit: torch.Tensor, block_id: torch.Tensor, seg_start, kv_len: int) -> torch.Tensor:
    """Boolean mask ``[B, S, kv_len]`` (True = visible) from the layout rule; ``seg_start`` is an int or ``[B]``.

    ``local_limit`` and ``block_id`` may hold any values (it is the twin of the rule, not of the ops' ranges). The
    segment must lie inside the keys, as for the ops: ``0 <= seg_start <= kv_len - S`` (a tensor ``seg_start`` is
    read once, remembered for its version, and not checked while a CUDA graph is captured); malformed arguments
    (types, shapes, lengths, devices, ranges) raise naming the argument."""
    S, device, seg_start, kv_len = _check_dense_args(local_limit, block_id, seg_start, kv_len)
    seg = seg_start.reshape(-1, 1, 1).long()  # [B,1,1]
    j = torch.arange(kv_len, device=device).view(1, 1, -1)  # [1,1,Skv]
    rel = j - seg  # key index relative to the segment start
    limit = local_limit.long().view(1, -1, 1)
    blk_q = block_id.long().view(1, -1, 1)
    in_seg = (rel >= 0) & (rel < S)
    blk_k = block_id.long()[rel.clamp(0, S - 1)]  # [B,1,Skv]
    same_block = in_seg & (blk_q >= 0) & (blk_k == blk_q)
    return (rel < limit) | same_block


def _check_dense_args(local_limit, block_id, seg_start, kv_len):
    from . import _checks

    _checks.tensor("local_limit", local_limit, ndim=1, dtypes=_checks.INT_TYPES)
    device = local_limit.device
    _checks.tensor("block_id", block_id, ndim=1, dtypes=_checks.INT_TYPES, device=device)
    S = local_limit.shape[0]
    if S == 0:
        raise ValueError("local_limit must have at least one entry (S >= 1)")
    _checks.shape("block_id", block_id, (S,))
    if not _checks.is_int(kv_len) or kv_len < 0:
        raise TypeError(f"kv_len must be an int >= 0, got {type(kv_len).__name__} {kv_len!r}")
    if _checks.is_int(seg_start):
        rng = (int(seg_start), int(seg_start))
    elif isinstance(seg_start, torch.Tensor):
        _checks.tensor("seg_start", seg_start, dtypes=_checks.INT_TYPES, device=device)
        if seg_start.dim() > 1:
            raise ValueError(
                f"seg_start must be an int or a 0-D/1-D int tensor [B], got shape {tuple(seg_start.shape)}"
            )
        rng = _checks.int_range(seg_start) if seg_start.numel() else None  # None: empty, or capturing
    else:
        raise TypeError(f"seg_start must be an int or an int tensor [B], got {type(seg_start).__name__}")
    _check_segment_fits(S, rng, int(kv_len))
    if not isinstance(seg_start, torch.Tensor):
        seg_start = torch.tensor([rng[0]], dtype=torch.int64, device=device)
    return S, device, seg_start, int(kv_len)


def _check_segment_fits(S: int, rng: tuple[int, int] | None, kv_len: int) -> None:
    """Every row's segment ``seg_start .. seg_start + S - 1`` must lie inside the ``kv_len`` keys (``rng``: the
    least and largest ``seg_start``, None when unknown)."""
    if kv_len < S:
        raise ValueError(f"kv_len must be >= S = {S} (the segment's own keys), got kv_len = {kv_len}")
    if rng is not None and not (0 <= rng[0] and rng[1] <= kv_len - S):
        raise ValueError(
            f"seg_start must lie in [0, kv_len - S = {kv_len - S}] (a segment of S = {S} tokens must end by "
            f"kv_len = {kv_len}), got {rng[0] if rng[0] == rng[1] else f'values in [{rng[0]}, {rng[1]}]'}"
        )


@_cached
def causal(seq_len: int) -> Layout:
    """Plain causal attention of a segment over the cached prefix (what an AR forward uses)."""
    S = _seg_len(f"causal({seq_len})", _positive("seq_len", seq_len))
    return _layout([i + 1 for i in range(S)], [-1] * S, list(range(S)))


def mask_block(draft_len: int) -> Layout:
    """One block of K masks behind the cached prefix (the second half of a ragged prefill, docs/design.md §3.2):
    every slot sees the whole prefix and the block itself. Positions 0..K-1 (offset by each row's seg_start).

    K=2, prefix x0 x1::

        keys:   x0 x1 m0 m1
        m0      #  #  #  #
        m1      #  #  #  #
    """
    K = _seg_len(f"mask_block({draft_len})", _positive("draft_len", draft_len))
    return _layout([0] * K, [0] * K, list(range(K)))
