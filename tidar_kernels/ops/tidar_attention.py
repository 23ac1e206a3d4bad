"""``tidar_attention``: attention under a TiDAR layout (docs/design.md §2 and §7)."""

from __future__ import annotations

import torch

from .. import _checks
from ..backends import resolve

OP = "tidar_attention"


def tidar_attention(q, k, v, local_limit, block_id, seg_start=None, scale=None, softcap=None, *, backend: str = "auto"):
    """Attention of a segment of S queries over ``Skv`` keys (cached prefix + the segment) under the
    mask ``local_limit``/``block_id`` (see ``tidar_kernels.layouts``).

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0`` (GQA), same dtype and device.
            Every size but B must be >= 1; B = 0 returns an empty ``[0, Hq, S, D]`` tensor.
        local_limit, block_id: int32 (or int64 with values in int32 range) ``[S]``.
        seg_start: int ``[B]`` tensor or a Python int: where the segment starts in each row's keys; default
            ``Skv - S``. Keys at ``>= seg_start + S`` are never seen.
        scale: softmax scale, a finite float > 0; default ``D ** -0.5``.
        softcap: attention logit soft-capping (Gemma2's ``attn_logit_softcapping``), a finite float > 0 or None:
            the scaled scores become ``softcap * tanh(scores / softcap)`` before the mask and the softmax.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns ``[B, Hq, S, D]``. A query that sees no key returns zeros. Differentiable.
    Every bad argument raises (TypeError or ValueError naming it) before any work.
    """
    q, k, v, local_limit, block_id, seg_start, scale, softcap = _validate(
        q, k, v, local_limit, block_id, seg_start, scale, softcap
    )
    impl = resolve(OP, backend, q.device)
    if q.shape[0] == 0:
        return _empty_batch(q, k, v)
    return impl(q, k, v, local_limit, block_id, seg_start, scale, softcap)


def _empty_batch(q, k, v):
    """B = 0: the empty output, still connected to q/k/v so a backward through it gives (empty) gradients."""
    out = q.new_zeros(q.shape)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = out + (q.sum() + k.sum() + v.sum()) * 0
    return out


def _validate(q, k, v, local_limit, block_id, seg_start, scale, softcap):
    dev = _checks.tensor("q", q, ndim=4, dtypes=_checks.FLOAT_TYPES).device
    _checks.tensor("k", k, ndim=4, dtypes=(q.dtype,), device=dev)
    _checks.tensor("v", v, ndim=4, dtypes=(q.dtype,), device=dev)
    B, Hq, S, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k must have shape [B={B}, Hkv, Skv, D={D}], got {tuple(k.shape)}")
    _checks.shape("v", v, k.shape)
    if S == 0:
        raise ValueError("q must have at least one query (S >= 1), got shape " + str(tuple(q.shape)))
    if Hq == 0:
        raise ValueError(f"q must have at least one head (Hq >= 1), got shape {tuple(q.shape)}")
    if D == 0:
        raise ValueError(f"q/k/v must have a head dim D >= 1, got q of shape {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"GQA needs q heads ({Hq}) to be a multiple of k/v heads ({Hkv}) (k must have >= 1 head)")
    if Skv == 0:
        raise ValueError(f"k/v must have at least one key (Skv >= 1), got k of shape {tuple(k.shape)}")
    for name, t in (("local_limit", local_limit), ("block_id", block_id)):
        _checks.tensor(name, t, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
        _checks.shape(name, t, (S,))
    scale = _checks.positive_float("scale", scale, default=D**-0.5)
    softcap = _checks.positive_float("softcap", softcap, default=None)
    if seg_start is None:
        if Skv < S:
            raise ValueError(f"k/v have {Skv} keys, fewer than the {S} queries; pass seg_start")
        seg_start = Skv - S
    if _checks.is_int(seg_start):
        if not 0 <= seg_start <= Skv - S:
            raise ValueError(f"seg_start must lie in [0, Skv - S = {Skv - S}], got {seg_start}")
        seg_tensor = torch.full((B,), int(seg_start), dtype=torch.int32, device=dev)
    else:
        if not isinstance(seg_start, torch.Tensor):
            raise TypeError(f"seg_start must be None, an int or an int tensor [B], got {type(seg_start).__name__}")
        _checks.tensor("seg_start", seg_start, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
        _checks.shape("seg_start", seg_start, (B,))
        seg_tensor = None
    # Range checks on the values as given (before any int32 cast, so int64 values cannot wrap): O(S + B) on the
    # host, memoised per tensor, so no kernel reads or writes out of bounds and no two blocks merge.
    rng = _checks.int_range(local_limit)
    if rng is not None and (rng[0] < 0 or rng[1] > S):
        raise ValueError(f"local_limit must lie in [0, S={S}], got values in [{rng[0]}, {rng[1]}]")
    rng = _checks.int_range(block_id)
    if rng is not None and (rng[0] < -1 or rng[1] > _checks.INT32_MAX):
        raise ValueError(f"block_id must lie in [-1, 2^31 - 1] (-1 = no block), got values in [{rng[0]}, {rng[1]}]")
    if seg_tensor is None and B:
        rng = _checks.int_range(seg_start)
        if rng is not None and (rng[0] < 0 or rng[1] + S > Skv):
            raise ValueError(f"seg_start must lie in [0, Skv - S = {Skv - S}], got values in [{rng[0]}, {rng[1]}]")
    if seg_tensor is None:
        seg_tensor = seg_start.to(torch.int32)
    return q, k, v, local_limit.to(torch.int32), block_id.to(torch.int32), seg_tensor, scale, softcap
