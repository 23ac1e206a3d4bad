"""``kv_append``: in-place write of a segment's K/V into a preallocated cache at per-row offsets."""

from __future__ import annotations

import torch

from .. import _checks
from ..backends import resolve

OP = "kv_append"


def kv_append(k_cache, v_cache, k_new, v_new, seg_start, *, backend: str = "auto"):
    """Write ``k_new[b]``/``v_new[b]`` to ``k_cache[b, :, seg_start[b] : seg_start[b] + S]`` (same for v).

    Args:
        k_cache, v_cache: ``[B, H, Smax, D]``, written in place.
        k_new, v_new: ``[B, H, S, D]``, same dtype and device as the cache (may be non-contiguous).
        seg_start: int ``[B]`` (or an int): per-row write offset.

    Bit-exact. Raises before writing anything when a row would overflow ``Smax`` or any argument is bad (the cache
    is untouched). H and D must be >= 1; B = 0 or S = 0 (nothing to write) is a no-op.
    Returns ``(k_cache, v_cache)``.
    """
    dev = _checks.tensor("k_cache", k_cache, ndim=4, dtypes=_checks.FLOAT_TYPES).device
    _checks.tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev)
    _checks.shape("v_cache", v_cache, k_cache.shape)
    B, H, Smax, D = k_cache.shape
    if H == 0 or D == 0:
        raise ValueError(f"k_cache must have H >= 1 heads and head dim D >= 1, got shape {tuple(k_cache.shape)}")
    _checks.tensor("k_new", k_new, ndim=4, dtypes=(k_cache.dtype,), device=dev)
    _checks.tensor("v_new", v_new, ndim=4, dtypes=(k_cache.dtype,), device=dev)
    S = k_new.shape[2]
    _checks.shape("k_new", k_new, (B, H, S, D))
    _checks.shape("v_new", v_new, (B, H, S, D))
    if _checks.is_int(seg_start):
        if not 0 <= seg_start <= Smax - S:
            raise ValueError(
                f"seg_start must lie in [0, Smax - S = {Smax - S}] (kv cache overflow otherwise), got {seg_start}"
            )
        seg_start = torch.full((B,), int(seg_start), dtype=torch.int32, device=dev)
    elif not isinstance(seg_start, torch.Tensor):
        raise TypeError(f"seg_start must be an int or an int tensor [B], got {type(seg_start).__name__}")
    _checks.tensor("seg_start", seg_start, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
    _checks.shape("seg_start", seg_start, (B,))
    if B == 0:
        resolve(OP, backend, dev)  # a bad backend still raises
        return k_cache, v_cache
    # None while capturing a CUDA graph (validated on the warm-up call); int64 values are checked before the cast
    rng = _checks.int_range(seg_start)
    if rng is not None and rng[0] < 0:
        raise ValueError(f"seg_start must be >= 0, got {rng[0]}")
    if rng is not None and rng[1] + S > Smax:
        raise ValueError(
            f"kv cache overflow: writing {S} tokens at seg_start {rng[1]} needs {rng[1] + S} slots, cache has {Smax}"
        )
    resolve(OP, backend, dev)(k_cache, v_cache, k_new, v_new, seg_start.to(torch.int32))
    return k_cache, v_cache
