# A/B of the plugin's plain-sampler steps and verification price (see README.md); needs the temporary
# TIDAR_VERIFY_OFF / TIDAR_PLAIN_OFF switches that README.md shows: they are not in the package.
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, "python")
sys.path.insert(0, ".")
import vllm

import tidar.vllm
from benchmarks.bench_vllm import ENGINE_KW, _generate
from tidar.cli.demo import bundled_model_dir
from tidar.ordinary_prompts import PROMPTS


def main():
    spec = tidar.vllm.speculative_config(num_speculative_tokens=8)
    M = str(bundled_model_dir())

    def mk(env):
        for k in ("TIDAR_VERIFY_OFF", "TIDAR_PLAIN_OFF"):
            os.environ.pop(k, None)
        os.environ.update(env)
        return vllm.LLM(model=M, speculative_config=spec, **ENGINE_KW)

    llms = {
        "plain": vllm.LLM(model=M, **ENGINE_KW),
        "verify": mk({}),
        "noverify": mk({"TIDAR_VERIFY_OFF": "1"}),
        "old": mk({"TIDAR_VERIFY_OFF": "1", "TIDAR_PLAIN_OFF": "1"}),
    }

    def drafter(l):
        return l.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.drafter

    allp = [p for v in PROMPTS.values() for p in v]
    for nb, R in ((8, 8), (1, 3)):
        ps = allp[:8] if nb == 8 else allp[:12]
        for l in llms.values():
            _generate(l, ps[:nb], 16)
        best = {k: {} for k in llms}
        for _r in range(R):
            for k, l in llms.items():
                if nb == 8:
                    _, dt, st = _generate(l, ps, 96)
                    best[k][0] = min(best[k].get(0, 1e9), dt)
                else:
                    for i, p in enumerate(ps):
                        _, dt, st = _generate(l, [p], 96)
                        best[k][i] = min(best[k].get(i, 1e9), dt)
        tot = {k: sum(v.values()) for k, v in best.items()}
        print(nb, {k: f"{96 * len(ps) / t:.0f} tok/s {tot['plain'] / t:.3f}x" for k, t in tot.items()})


if __name__ == "__main__":
    main()
