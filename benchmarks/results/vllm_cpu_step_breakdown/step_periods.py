"""The periods the plugin's step clock records, for an offline fit (see ../vllm_cpu_step_breakdown.md).

``PYTHONPATH=python:. python step_periods.py B [OUT.json]`` from the repository root, with the Python of a vLLM venv:
vLLM + TiDAR (defaults), the first B prompts at once, four batches of 96 tokens; writes ``[rows, block, verify, ms]``
per step (what ``StepClock._add`` was given).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import vllm  # noqa: E402

import tidar.vllm  # noqa: E402
import tidar.vllm.step_clock as step_clock  # noqa: E402
from benchmarks.bench_vllm import ENGINE_KW, _generate  # noqa: E402
from tidar.cli.demo import bundled_model_dir  # noqa: E402
from tidar.ordinary_prompts import all_prompts  # noqa: E402


def main():
    B = int(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else f"step_periods_{B}.json"
    records = []
    add = step_clock.StepClock._add

    def recording_add(self, rows, block, verify, ms):
        records.append((rows, block, verify, ms))
        return add(self, rows, block, verify, ms)

    step_clock.StepClock._add = recording_add
    spec = tidar.vllm.speculative_config(num_speculative_tokens=8)
    llm = vllm.LLM(model=str(bundled_model_dir()), speculative_config=spec, **ENGINE_KW)
    prompts = [p for _, p in all_prompts()][:B]
    for _ in range(4):
        _generate(llm, prompts, 96)
    with open(out, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
