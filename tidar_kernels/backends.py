"""Backend registry and dispatch: one public function per op, several implementations behind it (docs/design.md §8).

Each implementation is one ``Impl`` record: its op and backend, the device types, dtypes and head dims it takes,
whether it has a backward, whether it draws Philox uniforms itself, and an optional extra predicate. Its
``supports(*args)`` returns None when it can run a call, else the reason it cannot; dispatch and every
explanation come from these records:

- ``backend="auto"`` on CUDA tensors tries ``cuda`` > ``triton`` > ``reference``: an implementation whose
  ``supports`` declines a call hands it to the next one. On other tensors the reference is the backend (the
  kernels need CUDA tensors) and nothing is said. A warning comes once per backend only where a faster backend
  was expected and is missing: on CUDA tensors, a kernel backend that did not load (the CUDA extension not built,
  Triton not importable), or a Triton kernel that fails to compile (its inputs then go to the next backend).
- an explicit ``backend=...`` runs exactly that implementation or raises naming the reason.

``live_backends()`` reports what is live (``tidar env``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cuda")
_IMPLS: dict[str, dict[str, Callable]] = {}  # op -> backend -> the function dispatch calls
_RECORDS: dict[tuple[str, str], Impl] = {}  # (op, backend) -> what that implementation supports
_WARNED: set = set()  # what ``auto`` has warned about: a kernel backend that did not load, a failed compile
_BROKEN: set = set()  # (op, backend, dtype, last dim, device) whose Triton kernel failed to compile: auto skips it


class BackendCannotRun(RuntimeError):
    """An explicit ``backend=`` cannot run this call; the message names the limit from its ``Impl`` record."""


class BackendDtypeError(BackendCannotRun, TypeError):
    """The explicit backend does not take the inputs' dtype (a RuntimeError and a TypeError)."""


class BackendShapeError(BackendCannotRun, ValueError):
    """The explicit backend does not take the inputs' shape, e.g. the head dim (a RuntimeError and a ValueError)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Impl:
    """What one implementation of an op can run. ``None`` in a field means "no limit".

    ``dtypes`` and ``head_dims`` are checked on the op's first argument (q, ar_logits or k_cache); ``head_dims``
    only for attention (q's last dim), ``max_head_dim`` likewise. ``grad`` False: no backward, so calls whose
    tensor arguments require grad (with grad enabled) are declined. ``philox``: the implementation draws the
    Philox uniforms of a seed/offset itself (the others are given the uniforms, docs/design.md §6). ``check``:
    an extra predicate with the implementation's arguments, returning None or the reason it cannot run them.
    """

    op: str
    backend: str
    device_types: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    max_head_dim: int | None = None
    grad: bool = True
    philox: bool = False
    check: Callable | None = None

    def _refusal(self, args) -> tuple[type, str] | None:
        """(exception type, reason) when this implementation cannot run ``args``, else None."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        who = f"the {self.backend} {self.op}"
        if x is not None:  # (the device was checked when the implementation was resolved)
            if self.dtypes is not None and x.dtype not in self.dtypes:
                names = "/".join(_dtype_name(d) for d in self.dtypes)
                return BackendDtypeError, f"{who} runs {names} inputs, got {_dtype_name(x.dtype)}"
            if self.head_dims is not None and x.shape[-1] not in self.head_dims:
                *most, last = map(str, self.head_dims)
                dims = f"{', '.join(most)} and {last}" if most else last
                return BackendShapeError, f"{who} supports head dims {dims}, got {x.shape[-1]}"
            if self.max_head_dim is not None and x.shape[-1] > self.max_head_dim:
                return BackendShapeError, f"{who} supports head dims up to {self.max_head_dim}, got {x.shape[-1]}"
        if not self.grad and torch.is_grad_enabled():
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
                return BackendCannotRun, f"{who} has no backward (inference only) and an input requires grad"
        if self.check is not None:
            why = self.check(*args)
            if why is not None:
                return BackendCannotRun, why
        return None

    def supports(self, *args) -> str | None:
        """None when this implementation can run a call with these (validated) arguments, else why not."""
        refusal = self._refusal(args)
        return None if refusal is None else refusal[1]


def register(
    op: str,
    backend: str,
    supports: Callable | None = None,
    *,
    device_types: tuple[str, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    head_dims: tuple[int, ...] | None = None,
    max_head_dim: int | None = None,
    grad: bool = True,
    philox: bool = False,
):
    """Decorator: ``fn`` implements ``op`` for ``backend``, with the limits of its ``Impl`` record.

    ``supports(*args)`` (optional, same arguments as ``fn``) is the record's extra ``check``. Kernel backends
    (``triton``, ``cuda``) run on CUDA tensors unless ``device_types`` says otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if device_types is None and backend != "reference":
        device_types = ("cuda",)

    def wrap(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        _RECORDS[(op, backend)] = Impl(
            op,
            backend,
            device_types=device_types,
            dtypes=dtypes,
            head_dims=head_dims,
            max_head_dim=max_head_dim,
            grad=grad,
            philox=philox,
            check=supports,
        )
        return fn

    return wrap


def record(op: str, backend: str) -> Impl:
    """The ``Impl`` record of ``op``'s ``backend`` implementation (KeyError when there is none)."""
    from . import _loaders

    _loaders.load_all()
    return _RECORDS[(op, backend)]


def _chain(op: str, names: list[str], strict: bool) -> Callable:
    """A callable running the first of ``names`` (implementations of ``op``) whose record supports the call;
    the last one always runs (``auto``: the reference), unless ``strict`` (an explicit backend), where a refused
    call raises naming the reason. Implementations are looked up per call (tests swap them)."""
    records = [_RECORDS[(op, n)] for n in names]

    def call(*args):
        for i, rec in enumerate(records):
            last = i == len(records) - 1
            if last and not strict:
                return _IMPLS[op][rec.backend](*args)
            refusal = rec._refusal(args)
            if refusal is None and (strict or rec.backend != "triton"):
                return _IMPLS[op][rec.backend](*args)
            if refusal is None:  # auto, Triton: a kernel that fails to compile hands its inputs on
                if _BROKEN and _compile_key(rec, args) in _BROKEN:
                    continue
                try:
                    return _IMPLS[op][rec.backend](*args)
                except Exception as e:
                    if not isinstance(e, _triton_compile_errors()):
                        raise
                    key = _compile_key(rec, args)
                    _BROKEN.add(key)
                    _warn_compile_failed(rec, records[i + 1].backend, key, e)
                continue
            if strict:
                exc, why = refusal
                raise exc(f"backend={rec.backend!r} cannot run {op} for these inputs: {why}")
        raise AssertionError("unreachable: the last implementation of a chain always runs")

    call.philox = all(r.philox for r in records)  # seed/offset are passed on only if every candidate draws them
    call.records = tuple(records)
    return call


def _compile_key(rec: Impl, args) -> tuple:
    """What a Triton kernel is compiled for, as far as dispatch sees it: op, backend, the first argument's dtype,
    last dim and device."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return (rec.op, rec.backend) + ((x.dtype, x.shape[-1] if x.dim() else None, x.device) if x is not None else ())


def _triton_compile_errors() -> tuple:
    """The exceptions of a Triton kernel that does not compile (or does not fit the GPU) for its inputs."""
    errors = []
    try:
        from triton.compiler.errors import CompilationError

        errors.append(CompilationError)
    except ImportError:
        pass
    try:
        from triton.runtime import errors as runtime_errors
    except ImportError:
        return tuple(errors)
    for name in ("OutOfResources", "PTXASError"):
        if isinstance(getattr(runtime_errors, name, None), type):
            errors.append(getattr(runtime_errors, name))
    return tuple(errors)


def _warn_compile_failed(rec: Impl, instead: str, key: tuple, error: Exception) -> None:
    if ("compile", rec.op, rec.backend) in _WARNED:  # once per op
        return
    _WARNED.add(("compile", rec.op, rec.backend))
    what = f"{_dtype_name(key[2])} inputs of last dim {key[3]}" if len(key) > 2 else "these inputs"
    first = (str(error).strip().splitlines() or [""])[0][:200]
    warnings.warn(
        f"tidar_kernels: the {rec.backend} {rec.op} kernel failed to compile for {what} "
        f"({type(error).__name__}: {first}); backend='auto' runs {_backend_name(instead)} for them from now on; "
        "`tidar env` lists the live backends",
        stacklevel=4,
    )


def _backend_name(backend: str) -> str:
    return "the PyTorch reference" if backend == "reference" else f"the {backend} kernels"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` is live for ``op`` on ``device`` (ignoring the inputs' dtypes and shapes), else why."""
    if backend not in _IMPLS.get(op, {}):
        return f"no {backend} implementation of {op} is available ({_load_error(backend)})"
    rec = _RECORDS[(op, backend)]
    if rec.device_types is None or device.type in rec.device_types:
        return None
    if backend == "triton" and triton_interpreted():
        return None
    if backend == "triton":
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type} tensors"
    return f"the {backend} backend needs {'/'.join(rec.device_types).upper()} tensors, got {device.type} tensors"


def _load_error(backend: str) -> str:
    from . import _loaders

    return _loaders.load_error(backend) or "not implemented yet"


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to run on ``device``; raises with the reason when it cannot run."""
    from . import _loaders

    _loaders.load_all()
    if backend == "auto":
        # Kernels only on CUDA tensors: the Triton interpreter runs CPU tensors, but is never the fastest choice.
        # On other tensors the reference is the backend: nothing is missing, nothing to say.
        if device.type != "cuda":
            return _chain(op, ["reference"], strict=False)
        live = [n for n in ("cuda", "triton") if _why_not(op, n, device) is None]
        _warn_not_loaded(op, live)
        return _chain(op, live + ["reference"], strict=False)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = _why_not(op, backend, device)
    if reason is not None:
        raise BackendCannotRun(f"backend={backend!r} cannot run {op}: {reason}")
    return _chain(op, [backend], strict=True)


def _warn_not_loaded(op: str, live: list) -> None:
    """On CUDA tensors: once per kernel backend that did not load, say why and what runs instead."""
    from . import _loaders

    for name in ("cuda", "triton"):
        error = _loaders.load_error(name)
        if error is None or ("not loaded", name) in _WARNED:
            continue
        _WARNED.add(("not loaded", name))
        instead = live[0] if live else "reference"
        warnings.warn(
            f"tidar_kernels: the {name} backend is missing ({error}); backend='auto' runs {_backend_name(instead)} "
            f"on CUDA tensors instead (first for {op}); `tidar env` lists the live backends",
            stacklevel=4,
        )


def live_backends(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """op -> backends that can run it on ``device`` (default: cuda if available, else cpu)."""
    from . import _loaders

    _loaders.load_all()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {op: [b for b in BACKENDS if b in impls and _why_not(op, b, device) is None] for op, impls in _IMPLS.items()}
