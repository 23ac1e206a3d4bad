"""Backend registry and dispatch: one public function per op, several implementations behind it.

``backend="auto"`` picks, for the tensors' device, the fastest implementation that is live:
``cuda`` (the compiled extension) > ``triton`` > ``reference``. When it has to fall back it says so
once per (op, device type), naming why; ``live_backends()`` reports what is live (``tidar env``).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cuda")
_IMPLS: dict[str, dict[str, Callable]] = {}
_WARNED: set = set()


def register(op: str, backend: str):
    """Decorator: ``fn`` implements ``op`` for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend not in _IMPLS.get(op, {}):
        return f"no {backend} implementation of {op} is available ({_load_error(backend)})"
    if device.type == "cuda" or (backend == "triton" and triton_interpreted()):
        return None
    if backend == "triton":
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type} tensors"
    return f"the cuda backend needs CUDA tensors, got {device.type} tensors"


def _load_error(backend: str) -> str:
    from . import _loaders

    return _loaders.load_error(backend) or "not implemented yet"


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to run on ``device``; raises with the reason when it cannot run."""
    from . import _loaders

    _loaders.load_all()
    if backend == "auto":
        # Kernels only on CUDA tensors: the Triton interpreter runs CPU tensors, but is never the fastest choice.
        for name in ("cuda", "triton"):
            if device.type == "cuda" and _why_not(op, name, device) is None:
                return _IMPLS[op][name]
        if device.type not in _WARNED:  # once per device type, not once per op or per call
            _WARNED.add(device.type)
            reason = _why_not(op, "triton", device) if device.type == "cuda" else (
                f"the triton and cuda kernels need CUDA tensors, got {device.type} tensors")
            warnings.warn(
                f"tidar_kernels: backend='auto' falls back to the PyTorch reference on {device.type} tensors "
                f"(first for {op}: {reason}); `tidar env` lists the live backends",
                stacklevel=3,
            )
        return _IMPLS[op]["reference"]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = _why_not(op, backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run {op}: {reason}")
    return _IMPLS[op][backend]


def live_backends(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """op -> backends that can run it on ``device`` (default: cuda if available, else cpu)."""
    from . import _loaders

    _loaders.load_all()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {op: [b for b in BACKENDS if b in impls and _why_not(op, b, device) is None] for op, impls in _IMPLS.items()}
