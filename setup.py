"""Builds the CUDA extension ``tidar_kernels._C`` (csrc/) when it can; everything else is in pyproject.toml.

The extension is built when a CUDA build of torch and a CUDA toolkit (nvcc, ``CUDA_HOME``) are present, with or
without a visible GPU (CI compiles it on CPU machines). Otherwise the wheel is pure Python and the loader says why.

Environment:
  TIDAR_SKIP_CUDA_BUILD=1   pure-Python build even when the extension could be built
  TIDAR_FORCE_CUDA=1        the extension must be built: fail instead of falling back to pure Python (when the
                            prerequisites are missing or the compile fails; without it a failed compile warns and
                            installs pure Python, and `tidar env` shows the error)
  TORCH_CUDA_ARCH_LIST      e.g. "9.0a;10.0a+PTX" (default: sm_90a SASS + compute_90 PTX, which JITs on newer GPUs)
  MAX_JOBS                  parallel compile jobs (ninja), honoured by torch's BuildExtension

The extension uses the libtorch stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION = 2.11) and the CPython limited
API (abi3), so one binary keeps loading on later torch releases and Python versions. Build with
``pip install --no-build-isolation -e .`` (or ``pip wheel . --no-build-isolation``) so it compiles against the
installed torch. csrc/sources.txt is the source list shared with CMakeLists.txt. No network or git calls here:
the git sha is read from .git/ files.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
BUILD_INFO = os.path.join(ROOT, "tidar_kernels", "_build_info.py")
TORCH_TARGET_VERSION = "0x020B000000000000"  # stable ABI of torch 2.11 (the oldest torch we support)
DEFAULT_ARCHS = [("compute_90a", "sm_90a"), ("compute_90", "compute_90")]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def read_sources():
    """(present, missing) .cu files of csrc/sources.txt, paths relative to the repo root."""
    present, missing = [], []
    with open(os.path.join(CSRC, "sources.txt"), encoding="utf-8") as f:
        for line in f:
            name = line.split("#", 1)[0].strip()
            if name:
                (present if os.path.exists(os.path.join(CSRC, name)) else missing).append(os.path.join("csrc", name))
    return present, missing


def git_sha():
    """HEAD's sha from .git/ files (no git subprocess); None outside a checkout."""
    git = os.path.join(ROOT, ".git")
    try:
        if os.path.isfile(git):  # worktree / submodule: "gitdir: <path>"
            with open(git, encoding="utf-8") as f:
                git = os.path.join(ROOT, f.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD"), encoding="utf-8") as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, os.path.join(git, "commondir")):
            if os.path.isfile(base):  # worktree: refs live in the common dir
                with open(base, encoding="utf-8") as f:
                    base = os.path.join(git, f.read().strip())
            path = os.path.join(base, ref)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    return f.read().strip()
            packed = os.path.join(base, "packed-refs")
            if os.path.isfile(packed):
                with open(packed, encoding="utf-8") as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) == 2 and parts[1] == ref:
                            return parts[0]
    except (OSError, IndexError):
        pass
    return None


def arch_flags():
    """(nvcc -gencode flags, arch names) from TORCH_CUDA_ARCH_LIST ("9.0a;10.0+PTX") or the default."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    pairs = []
    if env and env != "native":
        for item in re.split(r"[;\s,]+", env):
            if not item:
                continue
            ptx = item.endswith("+PTX")
            m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item[:-4] if ptx else item)
            if not m:
                raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {item!r} (expected e.g. 9.0, 9.0a, 10.0+PTX)")
            num = m.group(1) + m.group(2) + m.group(3)
            pairs.append((f"compute_{num}", f"sm_{num}"))
            if ptx:
                pairs.append((f"compute_{num}", f"compute_{num}"))
    else:
        pairs = list(DEFAULT_ARCHS)
    flags = [f"-gencode=arch={a},code={c}" for a, c in pairs]
    return flags, [c for _, c in pairs]


def resolve_cuda_home():
    """Sets CUDA_HOME when unset and the nvcc on the PATH is a wrapper script outside its toolkit (torch would take
    the folder above the wrapper's bin/, which has no CUDA headers). Asks nvcc itself where its toolkit is."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        return
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if m:
        top = os.path.normpath(m.group(1).strip())
        if os.path.exists(os.path.join(top, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = top


def cuda_build_blocker():
    """None if the extension can be built here, else why not."""
    if _flag("TIDAR_SKIP_CUDA_BUILD"):
        return "TIDAR_SKIP_CUDA_BUILD=1"
    resolve_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:  # build isolation without torch: build with --no-build-isolation
        return f"torch is not importable at build time ({e}); build with --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        return "no CUDA toolkit found (nvcc / CUDA_HOME)"
    return None


def nvidia_include_dirs():
    """Header folders of the installed nvidia-* wheels (cu13/include holds cusparse.h & co for torch's headers)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13", "cu12"):
            inc = os.path.join(base, sub, "include")
            if os.path.isdir(inc):
                dirs.append(inc)
    return dirs


def write_build_info(info: dict):
    text = (
        '"""Generated by setup.py at build time (do not edit, not in git): how tidar_kernels._C was built."""\n'
        f"BUILD_INFO = {info!r}\n"
    )
    old = None
    if os.path.exists(BUILD_INFO):
        with open(BUILD_INFO, encoding="utf-8") as f:
            old = f.read()
    if old != text:
        with open(BUILD_INFO, "w", encoding="utf-8") as f:
            f.write(text)


def extension_setup():
    """(ext_modules, cmdclass, options); empty when the extension is not built."""
    blocker = cuda_build_blocker()
    present, missing = read_sources()
    info = {"git_sha": git_sha(), "extension": blocker is None, "skipped_because": blocker, "missing_sources": missing}
    if blocker is not None:
        if _flag("TIDAR_FORCE_CUDA") and not _flag("TIDAR_SKIP_CUDA_BUILD"):
            raise RuntimeError(f"TIDAR_FORCE_CUDA=1 but the CUDA extension cannot be built: {blocker}")
        print(f"tidar-kernels: building without the CUDA extension ({blocker})", file=sys.stderr)
        write_build_info(info)
        return [], {}, {}

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    gencode, archs = arch_flags()
    info.update(
        cuda_version=torch.version.cuda,
        torch_version=torch.__version__,
        torch_target_version=TORCH_TARGET_VERSION,
        archs=archs,
        sources=[os.path.basename(s) for s in present],
        python_limited_api="cp310",
    )
    write_build_info(info)
    if missing:
        print(f"tidar-kernels: csrc/sources.txt lists missing files, built without them: {missing}", file=sys.stderr)
    # -isystem: searched after every -I (CUDA_HOME's full headers win over the wheels' partial copies)
    isystem = [f for d in nvidia_include_dirs() for f in ("-isystem", d)]
    common = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", "-DTIDAR_BUILD_EXTENSION"]
    ext = CUDAExtension(
        name="tidar_kernels._C",
        sources=["csrc/bindings.cpp"] + present,
        include_dirs=[CSRC],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"] + common + isystem,
            "nvcc": [
                "-O3",
                "-std=c++17",
                "-lineinfo",
                # torch adds these "no half operators" defines; our kernels use cuda_fp16/bf16 operators
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-U__CUDA_NO_HALF2_OPERATORS__",
            ]
            + common
            + isystem
            + gencode,
        },
        py_limited_api=True,
    )
    base = BuildExtension.with_options(use_ninja=_has_ninja())

    class OptionalBuildExt(base):
        """A failed compile leaves a working pure-Python install whose loader says why (the build info records the
        error), unless TIDAR_FORCE_CUDA=1, where it fails the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (compiler/ninja errors come in several types)
                if _flag("TIDAR_FORCE_CUDA"):
                    raise
                msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                print(
                    f"tidar-kernels: WARNING: the CUDA extension failed to build ({msg}); installing without it "
                    "(set TIDAR_FORCE_CUDA=1 to make this an error)",
                    file=sys.stderr,
                )
                write_build_info({**info, "extension": False, "skipped_because": f"the build failed: {msg}"})

    return [ext], {"build_ext": OptionalBuildExt}, {"bdist_wheel": {"py_limited_api": "cp310"}}


def _has_ninja() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except ImportError:
        return False


ext_modules, cmdclass, options = extension_setup()

# Metadata, packages, package data, dependencies and the console script: pyproject.toml. Here only the extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
