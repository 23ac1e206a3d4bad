"""``kv_append_paged``: in-place write of tokens' K/V into a paged KV pool at their slots (vLLM's
``reshape_and_cache`` contract, docs/design.md §7.1)."""

from __future__ import annotations

import torch

from .. import _checks
from ..backends import resolve

OP = "kv_append_paged"


def kv_append_paged(k_cache, v_cache, k_new, v_new, slot_mapping, *, backend: str = "auto"):
    """Write ``k_new[t]``/``v_new[t]`` to slot ``slot_mapping[t]`` of the pool: ``k_cache[slot // block_size,
    slot % block_size] = k_new[t]`` (same for v); a slot of -1 skips the token (a padding token).

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, H, D]`` (vLLM's NHD block layout), written in place.
        k_new, v_new: ``[T, H, D]``, the cache's dtype and device (may be non-contiguous).
        slot_mapping: int64 (or int32) ``[T]``: ``-1`` or a slot in ``[0, num_blocks * block_size)``, no slot twice.

    Bit-exact. Raises before writing anything when a slot is outside the pool, a slot repeats, or any argument is
    bad (the caches are untouched). T = 0 is a no-op. Returns ``(k_cache, v_cache)``.
    """
    dev = _checks.tensor("k_cache", k_cache, ndim=4, dtypes=_checks.FLOAT_TYPES).device
    _checks.tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev)
    _checks.shape("v_cache", v_cache, k_cache.shape)
    NB, BS, H, D = k_cache.shape
    if 0 in (NB, BS, H, D):
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, H, D] with every size >= 1, got {tuple(k_cache.shape)}"
        )
    _checks.tensor("k_new", k_new, ndim=3, dtypes=(k_cache.dtype,), device=dev)
    _checks.tensor("v_new", v_new, ndim=3, dtypes=(k_cache.dtype,), device=dev)
    T = k_new.shape[0]
    _checks.shape("k_new", k_new, (T, H, D))
    _checks.shape("v_new", v_new, (T, H, D))
    _checks.tensor("slot_mapping", slot_mapping, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
    _checks.shape("slot_mapping", slot_mapping, (T,))
    impl = resolve(OP, backend, dev)  # a bad backend raises even when there is nothing to write
    if T == 0:
        return k_cache, v_cache
    check_slots(slot_mapping, NB * BS)
    impl(k_cache, v_cache, k_new, v_new, slot_mapping)
    return k_cache, v_cache


def check_slots(slot_mapping: torch.Tensor, n_slots: int) -> None:
    """Every entry -1 or a slot in ``[0, n_slots)``, no slot twice: one sort and one host sync (none while capturing
    a CUDA graph: the eager warm-up call that precedes a capture checked the same step's mapping)."""
    if _checks.capturing():
        return
    s = torch.sort(slot_mapping.long()).values
    dup = (s[1:] == s[:-1]) & (s[1:] >= 0)
    lo, hi, n_dup = torch.stack((s[0], s[-1], dup.sum())).tolist()
    if lo < -1 or hi >= n_slots:
        bad = lo if lo < -1 else hi
        raise ValueError(
            f"slot_mapping holds slot {bad}, outside the pool: a slot is -1 (skip) or in "
            f"[0, num_blocks * block_size = {n_slots})"
        )
    if n_dup:
        slot = int(s[1:][dup][0])
        raise ValueError(f"slot_mapping writes slot {slot} more than once ({n_dup + 1} or more tokens share slots)")
