"""Wall time of vLLM's step functions per engine step (see ../vllm_cpu_step_breakdown.md).

``PYTHONPATH=python:. python step_breakdown.py ENGINE B`` (ENGINE: vllm, vllm-ngram, vllm-tidar, as
``benchmarks/bench_vllm.py`` names them) from the repository root, with the Python of a vLLM venv: 8 prompts in
batches of B (3 rounds when B > 1), 96 tokens each, after two warm-up batches. ``NODRAFT=1`` withholds every TiDAR
draft (``step_pays`` forced false). Wrappers with ``perf_counter``, no profiler; the engine core runs in this
process.
"""

import collections
import functools
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import vllm  # noqa: E402
from vllm.model_executor.layers.logits_processor import LogitsProcessor  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.engine.output_processor import OutputProcessor  # noqa: E402
from vllm.v1.sample.rejection_sampler import RejectionSampler  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

import tidar.vllm  # noqa: E402
import tidar.vllm.proposer  # noqa: E402
from benchmarks.bench_vllm import ENGINE_KW, _engines, _generate  # noqa: E402
from tidar.cli.demo import bundled_model_dir  # noqa: E402
from tidar.ordinary_prompts import all_prompts  # noqa: E402

SECONDS = collections.defaultdict(float)
CALLS = collections.defaultdict(int)
TIMED = [
    (GPUModelRunner, "execute_model"),
    (GPUModelRunner, "_prepare_inputs"),
    (GPUModelRunner, "_model_forward"),
    (GPUModelRunner, "sample_tokens"),
    (GPUModelRunner, "_sample"),
    (GPUModelRunner, "propose_draft_token_ids"),
    (RejectionSampler, "forward"),
    (Sampler, "forward"),
    (LogitsProcessor, "forward"),
    (Scheduler, "schedule"),
    (Scheduler, "update_from_output"),
    (OutputProcessor, "process_outputs"),
]


def timed(cls, name):
    f = getattr(cls, name)
    label = f"{cls.__name__}.{name}"

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - t
            CALLS[label] += 1

    setattr(cls, name, wrapper)


def main():
    which, B = sys.argv[1], int(sys.argv[2])
    for cls, name in TIMED:
        timed(cls, name)
    if os.environ.get("NODRAFT"):
        tidar.vllm.proposer.step_pays = lambda gains, verify_cost: False
    spec = _engines()[which]
    llm = vllm.LLM(model=str(bundled_model_dir()), speculative_config=spec, **ENGINE_KW)
    prompts = [p for _, p in all_prompts()][:8]
    for _ in range(2):
        _generate(llm, prompts[:B], 96)
    SECONDS.clear()
    CALLS.clear()
    total = steps = tokens = 0
    for _ in range(3 if B > 1 else 1):
        for i in range(0, len(prompts), B):
            _, dt, n = _generate(llm, prompts[i : i + B], 96)
            total, steps, tokens = total + dt, steps + n, tokens + 96 * len(prompts[i : i + B])
    print(f"{which} B={B}: {total * 1e3 / steps:.2f} ms per step, {steps} steps, {tokens / total:.0f} tokens/s")
    for label in sorted(SECONDS, key=lambda k: -SECONDS[k]):
        print(f"  {label:40s} {SECONDS[label] * 1e3 / steps:7.3f} ms per step  ({CALLS[label]} calls)")


if __name__ == "__main__":
    main()
