"""Input validation shared by every backend: clear errors naming the argument, raised before any launch."""
from __future__ import annotations

import torch


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream: host syncs are illegal then, so
    data-dependent checks are skipped (they ran on the eager warm-up call that precedes a capture)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def int_range(t: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of a non-empty int tensor with one host sync, remembered on the tensor for its current
    version: a layout or ``seg_start`` shared by every layer of a forward syncs once, not once per layer.
    None while capturing a CUDA graph."""
    if capturing():
        return None
    memo = getattr(t, "_tidar_range", None)
    if memo is not None and memo[0] == t._version:
        return memo[1]
    lo, hi = torch.aminmax(t)
    rng = tuple(torch.stack((lo, hi)).tolist())
    t._tidar_range = (t._version, rng)
    return rng


def no_nan(name: str, t: torch.Tensor) -> None:
    if torch.isnan(t).any() or torch.isposinf(t).any():
        raise ValueError(f"{name} contains NaN or +inf values")


INT_TYPES = (torch.int32, torch.int64)
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
