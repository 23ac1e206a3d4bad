"""The standalone CMake build of csrc/ (library + tidar_bench) configures and compiles on this machine.

Compiles one architecture (sm_90a) to stay fast (~20-75 s on 2 cores); set TIDAR_SKIP_CMAKE_TEST=1 to skip it
(CI budgets). Without a GPU the bench only reports that there is none; on a GPU it runs its checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.environ.get("TIDAR_SKIP_CMAKE_TEST") == "1", reason="TIDAR_SKIP_CMAKE_TEST=1")
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_cmake_builds_library_and_bench(tmp_path):
    build = tmp_path / "build"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("MAX_JOBS", "2")}
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=90a-real"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    r = subprocess.run(
        ["cmake", "--build", str(build), "--target", "tidar_bench"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (build / "libtidar_kernels_cuda.a").exists()
    run = subprocess.run([str(build / "tidar_bench")], capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout + run.stderr
    else:
        assert run.returncode == 0 and "no CUDA GPU" in run.stdout
