"""Engines interleaved batch by batch in one process (see ../vllm_cpu_step_breakdown.md).

``PYTHONPATH=python:. python interleaved.py B ROUNDS vllm,vllm-tidar,vllm-ngram`` (``benchmarks/bench_vllm.py``'s
engines) from the repository root, with the Python of a vLLM venv: each round takes the next B prompts of
``tidar.ordinary_prompts`` and runs them (96 tokens, greedy) on every engine in turn; texts are checked identical to
the first engine's. Prints each engine's best and median tokens/s, and each engine's median ratio to the first one
over the rounds.
"""

import os
import statistics
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import vllm  # noqa: E402

from benchmarks.bench_vllm import ENGINE_KW, _engines, _generate  # noqa: E402
from tidar.cli.demo import bundled_model_dir  # noqa: E402
from tidar.ordinary_prompts import all_prompts  # noqa: E402


def main():
    B, rounds, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    specs = _engines()
    llms = {n: vllm.LLM(model=str(bundled_model_dir()), speculative_config=specs[n], **ENGINE_KW) for n in names}
    prompts = [p for _, p in all_prompts()]
    speed = {n: [] for n in names}
    steps = {n: [] for n in names}
    for n in names:
        _generate(llms[n], prompts[:B], 16)
    for r in range(rounds):
        batch = prompts[(r * B) % len(prompts) :][:B]
        batch = batch if len(batch) == B else prompts[:B]
        first = None
        for n in names:
            ids, dt, st = _generate(llms[n], batch, 96)
            speed[n].append(B * 96 / dt)
            steps[n].append(st)
            first = ids if first is None else first
            if ids != first:
                print(f"MISMATCH: {n} differs from {names[0]} in round {r}")
    for n in names:
        best, median, st = max(speed[n]), statistics.median(speed[n]), statistics.mean(steps[n])
        print(f"{n:6s} B={B} best {best:.0f} median {median:.0f} tokens/s, {st:.1f} steps a batch")
    for n in names[1:]:
        ratio = statistics.median(a / b for a, b in zip(speed[n], speed[names[0]]))
        print(f"{n} / {names[0]}: median ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
