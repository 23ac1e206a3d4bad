"""Test-only speed-up of the Triton interpreter (TRITON_INTERPRET=1): device-function calls skip re-patching
triton.language while a kernel launch has already patched it.

Under the interpreter every call of a jitted device function (ours, and triton.language's own reductions such
as ``tl.max`` / ``tl.sum`` / ``tl.cumsum``, which are jitted functions too) patches the language modules again,
about 3 ms per call: most of the interpreter's time in the sampling kernels, which call device functions per
vocabulary tile. A launch patches the language modules visible from the kernel's globals and keeps them patched
until it ends, so a device call needs to patch only the modules that launch did not (the first such call
patches them for the rest of the launch). The results are unchanged: the same rewritten functions run on the same
patched language. Compiled kernels are not affected (this only wraps interpreter classes).
"""

from __future__ import annotations

import inspect

_state = {"patched": None}  # ids of the language modules patched in the running launch (None: no launch)
_LANGS: dict = {}  # python function -> ids of the language modules in its globals


def _langs(fn, tl) -> frozenset:
    ids = _LANGS.get(fn)
    if ids is None:
        ids = _LANGS[fn] = frozenset(
            id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
        )
    return ids


def install() -> bool:
    """Wraps the interpreter's launch and device-call entry points (once). False when triton has no interpreter
    classes of the expected shape (then nothing is changed and the interpreter runs at its own speed)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    fn_cls, grid_cls = getattr(interp, "InterpretedFunction", None), getattr(interp, "GridExecutor", None)
    patch_lang, err_cls = getattr(interp, "_patch_lang", None), getattr(interp, "InterpreterError", None)
    if None in (fn_cls, grid_cls, patch_lang, err_cls) or getattr(fn_cls, "_tidar_fast_calls", False):
        return bool(getattr(fn_cls, "_tidar_fast_calls", False))
    launch, device_call = grid_cls.__call__, fn_cls.__call__

    def launch_call(self, *args, **kwargs):
        outer = _state["patched"]
        _state["patched"] = set(_langs(self.fn, tl))
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state["patched"] = outer

    def fast_device_call(self, *args, **kwargs):
        patched = _state["patched"]
        if patched is None:  # called outside a launch: the interpreter's own path
            return device_call(self, *args, **kwargs)
        langs = _langs(self.fn, tl)
        if not langs <= patched:
            patch_lang(self.fn)  # as the interpreter does (its device calls never restore either)
            patched |= langs
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise err_cls(repr(e)) from e

    grid_cls.__call__ = launch_call
    fn_cls.__call__ = fast_device_call
    fn_cls._tidar_fast_calls = True
    return True
