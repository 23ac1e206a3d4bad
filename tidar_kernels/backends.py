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
_SUPPORTS: dict[tuple[str, str], Callable] = {}
_WARNED: set = set()


def register(op: str, backend: str, supports: Callable | None = None):
    """Decorator: ``fn`` implements ``op`` for ``backend``.

    ``supports(*args)`` (optional, same arguments as ``fn``) returns None when ``fn`` can run this call, else the
    reason it cannot (e.g. "needs grad", "head dim 96"): ``backend="auto"`` then falls through to the next backend
    and an explicit ``backend=...`` raises naming the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        if supports is not None:
            _SUPPORTS[(op, backend)] = supports
        return fn

    return wrap


def _guarded(op: str, backend: str, fallback: Callable | None) -> Callable:
    """The impl of ``op`` for ``backend``, checking its ``supports`` predicate per call (if it has one): an
    unsupported call goes to ``fallback``, or raises when there is none (an explicit backend)."""
    impl = _IMPLS[op][backend]
    supports = _SUPPORTS.get((op, backend))
    if supports is None:
        return impl

    def call(*args):
        why = supports(*args)
        if why is None:
            return impl(*args)
        if fallback is None:
            raise RuntimeError(f"backend={backend!r} cannot run {op} for these inputs: {why}")
        return fallback(*args)

    # Capability flags set on impls (e.g. ``philox``: takes Philox state itself) hold for the wrapper only when
    # they hold for every function it may call.
    for key, value in vars(impl).items():
        if fallback is None or getattr(fallback, key, None) == value:
            setattr(call, key, value)
    return call


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
        live = [n for n in ("cuda", "triton") if device.type == "cuda" and _why_not(op, n, device) is None]
        if live:  # a kernel whose supports() declines a call hands it to the next one (reference last)
            impl = _IMPLS[op]["reference"]
            for name in reversed(live):
                impl = _guarded(op, name, impl)
            return impl
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
    return _guarded(op, backend, None)


def live_backends(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """op -> backends that can run it on ``device`` (default: cuda if available, else cpu)."""
    from . import _loaders

    _loaders.load_all()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {op: [b for b in BACKENDS if b in impls and _why_not(op, b, device) is None] for op, impls in _IMPLS.items()}
