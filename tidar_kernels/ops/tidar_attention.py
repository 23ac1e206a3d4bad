"""``tidar_attention``: attention under a TiDAR layout (design.md 1.1 and 2)."""
from __future__ import annotations

import torch

from .. import _checks
from ..backends import resolve

OP = "tidar_attention"


def tidar_attention(q, k, v, local_limit, block_id, seg_start=None, scale=None, *, backend: str = "auto"):
    """Attention of a segment of S queries over ``Skv`` keys (cached prefix + the segment) under the
    mask ``local_limit``/``block_id`` (see ``tidar_kernels.layouts``).

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0`` (GQA), same dtype and device.
        local_limit, block_id: int32 ``[S]``.
        seg_start: int32 ``[B]`` (or an int): where the segment starts in each row's keys; default ``Skv - S``.
            Keys at ``>= seg_start + S`` are never seen.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns ``[B, Hq, S, D]``. A query that sees no key returns zeros. Differentiable.
    """
    q, k, v, local_limit, block_id, seg_start, scale = _validate(q, k, v, local_limit, block_id, seg_start, scale)
    return resolve(OP, backend, q.device)(q, k, v, local_limit, block_id, seg_start, scale)


def _validate(q, k, v, local_limit, block_id, seg_start, scale):
    dev = _checks.tensor("q", q, ndim=4, dtypes=_checks.FLOAT_TYPES).device
    _checks.tensor("k", k, ndim=4, dtypes=(q.dtype,), device=dev)
    _checks.tensor("v", v, ndim=4, dtypes=(q.dtype,), device=dev)
    B, Hq, S, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k must have shape [B={B}, Hkv, Skv, D={D}], got {tuple(k.shape)}")
    _checks.shape("v", v, k.shape)
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"GQA needs q heads ({Hq}) to be a multiple of k/v heads ({Hkv})")
    if S == 0:
        raise ValueError("q must have at least one query (S >= 1)")
    for name, t in (("local_limit", local_limit), ("block_id", block_id)):
        _checks.tensor(name, t, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
        _checks.shape(name, t, (S,))
    local_limit, block_id = local_limit.to(torch.int32), block_id.to(torch.int32)
    if seg_start is None:
        if Skv < S:
            raise ValueError(f"k/v have {Skv} keys, fewer than the {S} queries; pass seg_start")
        seg_start = torch.full((B,), Skv - S, dtype=torch.int32, device=dev)
    elif isinstance(seg_start, int):
        seg_start = torch.full((B,), seg_start, dtype=torch.int32, device=dev)
    else:
        _checks.tensor("seg_start", seg_start, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
        _checks.shape("seg_start", seg_start, (B,))
        seg_start = seg_start.to(torch.int32)
    # Range checks: O(S + B) on the host (memoised per tensor), so no kernel reads or writes out of bounds.
    rng = _checks.int_range(local_limit)
    if rng is not None and (rng[0] < 0 or rng[1] > S):
        raise ValueError(f"local_limit must lie in [0, S={S}], got values in [{rng[0]}, {rng[1]}]")
    rng = _checks.int_range(block_id)
    if rng is not None and rng[0] < -1:
        raise ValueError(f"block_id must be >= -1 (-1 = no block), got {rng[0]}")
    rng = _checks.int_range(seg_start)
    if rng is not None and (rng[0] < 0 or rng[1] + S > Skv):
        raise ValueError(f"seg_start must lie in [0, Skv - S = {Skv - S}], got values in [{rng[0]}, {rng[1]}]")
    if scale is None:
        scale = D**-0.5
    return q, k, v, local_limit, block_id, seg_start, float(scale)
