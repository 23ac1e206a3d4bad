"""Imports the optional backends once and remembers why one is missing (for errors and ``tidar env``)."""

from __future__ import annotations

import importlib

_ERRORS: dict[str, str | None] = {}
_MODULES = {"triton": "tidar_kernels.triton", "cuda": "tidar_kernels.cuda"}


def load_all() -> None:
    for backend, module in _MODULES.items():
        if backend in _ERRORS:
            continue
        try:
            importlib.import_module(module)
            _ERRORS[backend] = None
        except ImportError as e:  # missing optional dependency or extension: report, don't crash
            _ERRORS[backend] = f"{module} not importable: {e}"


def load_error(backend: str) -> str | None:
    load_all()
    return _ERRORS.get(backend)
