"""What this install is: versions, the compiled CUDA extension (built? why not? how?), live backends.

``report()`` returns one JSON-serialisable dict; ``format_report(d)`` renders it for humans. ``tidar env``
prints one or the other. Build info (CUDA and torch versions, archs, git sha) was recorded by setup.py at build
time in ``tidar_kernels/_build_info.py``; nothing here calls git or probes the GPU beyond torch.cuda.
"""

from __future__ import annotations

import importlib
import platform
import sys


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001  (an optional package that fails to import is simply absent)
        return None


def report() -> dict:
    import torch

    from . import _loaders, backends
    from ._version import __version__

    _loaders.load_all()
    cuda_error = _loaders.load_error("cuda")
    try:
        from ._build_info import BUILD_INFO as build

        build = dict(build)
    except ImportError:
        build = {}
    cuda_ok = torch.cuda.is_available()
    devices = []
    if cuda_ok:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            devices.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}"})
    attention_built = None
    if cuda_error is None:
        from . import cuda as _cuda

        attention_built = _cuda.HAS_ATTENTION
    return {
        "tidar_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_available": cuda_ok,
        "devices": devices,
        "cuda_extension_built": cuda_error is None,
        "cuda_extension_error": cuda_error,
        "cuda_extension_attention": attention_built,
        "triton_error": _loaders.load_error("triton"),
        "build": {
            "git_sha": build.get("git_sha"),
            "cuda_version": build.get("cuda_version"),
            "torch_version": build.get("torch_version"),
            "torch_target_version": build.get("torch_target_version"),
            "archs": build.get("archs"),
            "sources": build.get("sources"),
            "skipped_because": build.get("skipped_because"),
        },
        "backends": backends.live_backends(),
        "backends_device": "cuda" if cuda_ok else "cpu",
        "limits": _limits(backends),
    }


def _limits(backends) -> dict:
    """op -> backend -> what its record states beyond "no limit" (limits, and whether it draws Philox itself)."""
    out = {}
    for (op, name), rec in sorted(backends._RECORDS.items()):
        lim = {}
        if rec.device_types is not None:
            lim["devices"] = list(rec.device_types)
        if rec.dtypes is not None:
            lim["dtypes"] = [str(d).removeprefix("torch.") for d in rec.dtypes]
        if rec.head_dims is not None:
            lim["head_dims"] = list(rec.head_dims)
        if rec.max_head_dim is not None:
            lim["max_head_dim"] = rec.max_head_dim
        if not rec.grad:
            lim["backward"] = False
        if rec.philox:
            lim["draws_philox"] = True
        if rec.check is not None:
            lim["check"] = getattr(rec.check, "__name__", "custom")
        out.setdefault(op, {})[name] = lim
    return out


def _show(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "/".join(map(str, v)) if isinstance(v, list) else str(v)


def format_report(d: dict) -> str:
    def yn(flag):
        return "yes" if flag else "no"

    lines = [
        f"tidar-kernels   {d['tidar_kernels']}",
        f"python          {d['python']} ({d.get('platform', '')})",
        f"torch           {d['torch']} (CUDA {d['torch_cuda'] or 'none: CPU-only build'})",
        f"triton          {d['triton'] or 'not installed'}",
        f"transformers    {d['transformers'] or 'not installed'}",
        f"CUDA available  {yn(d['cuda_available'])}",
    ]
    for dev in d.get("devices") or []:
        lines.append(f"  cuda:{dev['index']}        {dev['name']} (sm {dev['capability']})")
    b = d.get("build") or {}
    lines.append(f"CUDA extension  {'built' if d['cuda_extension_built'] else 'not available'}")
    if d["cuda_extension_built"]:
        attn = d.get("cuda_extension_attention")
        lines.append(f"  attention     {'in this build' if attn else 'not in this build'}")
    else:
        lines.append(f"  why           {d['cuda_extension_error']}")
    if b.get("cuda_version") or b.get("git_sha"):
        lines.append(
            f"  built with    CUDA {b.get('cuda_version')}, torch {b.get('torch_version')} "
            f"(stable ABI target {b.get('torch_target_version')})"
        )
        lines.append(f"  archs         {', '.join(b.get('archs') or []) or 'unknown'}")
        lines.append(f"  git sha       {b.get('git_sha') or 'unknown'}")
    if d.get("triton_error"):
        lines.append(f"triton backend  not available: {d['triton_error']}")
    lines.append(f"live backends on {d.get('backends_device', '?')} tensors:")
    for op, names in sorted(d["backends"].items()):
        lines.append(f"  {op:<21} {', '.join(names)}")
    limited = [(op, b, lim) for op, per in sorted((d.get("limits") or {}).items()) for b, lim in per.items() if lim]
    if limited:
        lines.append("backend records (outside its limits, backend='auto' hands a call to the next backend):")
        for op, b, lim in limited:
            text = "; ".join(f"{k} {_show(v)}" for k, v in lim.items())
            lines.append(f"  {op:<21} {b:<10} {text}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tidar_kernels.env
    print(format_report(report()))
    sys.exit(0)
