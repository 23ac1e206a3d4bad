#!/usr/bin/env bash
# The CUDA build, last: the main venv's torch (the CPU build the README's test command installs) is replaced by the
# newest CUDA build the declared range admits, the extension is compiled (TIDAR_FORCE_CUDA=1: a failed build fails
# CI, it never falls back to pure Python here) and the tests that need a compiled extension but no GPU run: the
# loader's verdict, the errors of CUDA ops called on CPU tensors, the Philox host copy, fake impls, `tidar env`.
# A CUDA build of torch takes about 6 GB: on a machine with less disk free the stage is skipped and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
need_gb="${TIDAR_CUDA_STAGE_GB:-8}"
free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt "$need_gb" ]; then
    echo "== SKIPPED: the CUDA-build stage needs ${need_gb} GB of free disk (a CUDA build of torch); ${free_gb} GB here"
    exit 0
fi
. .venv/bin/activate
pip install -q --upgrade "torch>=2.11"
TIDAR_FORCE_CUDA=1 pip install -q --no-build-isolation --no-deps -e .
python -c "import torch; print('== CUDA stage: torch', torch.__version__, 'CUDA', torch.version.cuda)"
python -m pytest -q tests/kernels/test_cuda_ext.py tests/kernels/test_backend_warnings.py tests/cli/test_env.py
