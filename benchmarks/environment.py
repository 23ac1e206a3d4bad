"""Where a benchmark runs: provenance of every row (device, versions, git sha, date), the machine of a decode
run, and what is available here (optional peers such as FlashInfer, the live backends of our ops)."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """``git rev-parse HEAD`` (+ ``-dirty`` when the tree has changes), or ``unknown``. No network."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: torch.device) -> dict:
    """The provenance columns of every row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine(device: torch.device) -> dict:
    """The machine of a decode run: CPU model, cores, torch threads, Python, load average, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        info["load_average_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    """torch, transformers and tidar versions of a decode run."""
    import transformers

    import tidar

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tidar": tidar.__version__}


def optional_import(name: str):
    """(module, None) or (None, why it is missing)."""
    if name == "flashinfer" and os.environ.get("TIDAR_BENCH_FLASHINFER", "1") == "0":
        return None, "disabled by TIDAR_BENCH_FLASHINFER=0"
    try:
        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a broken install raising anything else
        return None, f"{name} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def flashinfer(device: torch.device):
    """FlashInfer, the optional peer (CUDA only): (module, None) or (None, why it is not used here)."""
    fi, why = optional_import("flashinfer")
    if fi is not None and device.type != "cuda":
        return None, "FlashInfer runs on CUDA only"
    return fi, why


def our_backends(op: str, device: torch.device) -> list[tuple[str, str | None]]:
    """Every backend of ``op`` with None when it runs on ``device``, else the reason it does not
    (from ``tidar_kernels``' own dispatch, so the row says what ``tidar env`` would)."""
    from tidar_kernels import backends as kb

    live = kb.live_backends(device).get(op, [])
    out = []
    for b in kb.BACKENDS:
        if b in live:
            out.append((b, None))
            continue
        try:
            kb.resolve(op, b, device)
            out.append((b, "not live on this device"))
        except Exception as e:
            out.append((b, " ".join(str(e).split())))
    return out
