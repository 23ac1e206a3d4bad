"""Input validation shared by every backend: clear errors naming the argument, raised before any launch."""

from __future__ import annotations

import math
import numbers

import torch

INT32_MAX = 2**31 - 1


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


def is_int(x) -> bool:
    """A Python/NumPy integer that is not a bool (``True`` is an ``int`` to Python, never a count or an offset here)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and not _is_bool_like(x)


def _is_bool_like(x) -> bool:
    return type(x).__name__ == "bool_"  # numpy.bool_ (not numbers.Integral, but be explicit)


def real(name: str, x, *, expected: str) -> float:
    """``x`` as a finite Python float: a Python/NumPy real number that is not a bool, NaN or infinite."""
    if isinstance(x, bool) or _is_bool_like(x) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be {expected}, got {x!r}")
    return x


def positive_float(name: str, x, *, default):
    """None -> ``default``; else a finite real number > 0 as a float (TypeError/ValueError naming ``name``)."""
    if x is None:
        return default
    expected = "None or a finite number > 0"
    x = real(name, x, expected=expected)
    if not x > 0:
        raise ValueError(f"{name} must be {expected}, got {x!r}")
    return x


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream: host syncs are illegal then, so
    data-dependent checks are skipped (they ran on the eager warm-up call that precedes a capture)."""
    # Before CUDA is initialised nothing can be capturing (and the query costs ~0.2 ms on a CPU-only run).
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def version(t: torch.Tensor):
    """``t._version`` for memo keys; for an inference tensor (no version counter: it may change in place
    unseen) a fresh object, so a memo keyed on it never hits."""
    return object() if t.is_inference() else t._version


def int_range(t: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of a non-empty int tensor with one host sync, remembered on the tensor for its current
    version: a layout or ``seg_start`` shared by every layer of a forward syncs once, not once per layer.
    None while capturing a CUDA graph."""
    if capturing():
        return None
    memo = getattr(t, "_tidar_range", None)
    if memo is not None and memo[0] == version(t):
        return memo[1]
    lo, hi = torch.aminmax(t)
    rng = tuple(torch.stack((lo, hi)).tolist())
    t._tidar_range = (version(t), rng)
    return rng


INT_TYPES = (torch.int32, torch.int64)
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
