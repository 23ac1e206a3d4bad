"""Engine steps of plain vLLM and vLLM + TiDAR on the bundled model (see ../vllm_cpu_block_rows.md).

``python measure.py ENGINE [prof]`` with ENGINE one of plain, ngram, tidar (the plugin's defaults), tidar0
(``row_cost=0``: a block in every step); ``NREQ`` requests at once (default 8); ``prof`` adds a cProfile of one
batch (run with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so the model runner is in this process).
"""

import cProfile
import os
import pstats
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402

import tidar.vllm  # noqa: E402
from tidar.cli.demo import bundled_model_dir  # noqa: E402
from tidar.ordinary_prompts import PROMPTS  # noqa: E402

NEW_TOKENS = 96
KW = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=8, disable_log_stats=False)
NGRAM = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def main():
    which = sys.argv[1]
    prompts = [p for ps in PROMPTS.values() for p in ps][: int(os.environ.get("NREQ", "8"))]
    spec = {
        "plain": None,
        "ngram": NGRAM,
        "tidar": tidar.vllm.speculative_config(num_speculative_tokens=8),
        "tidar0": tidar.vllm.speculative_config(num_speculative_tokens=8, row_cost=0),
    }[which]
    engine = vllm.LLM(model=str(bundled_model_dir()), speculative_config=spec, **KW).llm_engine
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def batch(tag):
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
        steps, t = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return time.perf_counter() - t, steps

    for r in range(3):
        batch(f"w{r}")
    s, steps = min(batch(f"m{r}") for r in range(4))
    tok_s = len(prompts) * NEW_TOKENS / s
    print(f"{which}: best {s:.3f} s, {steps} steps, {s / steps * 1e3:.3f} ms/step, {tok_s:.1f} tok/s")
    if len(sys.argv) > 2:
        pr = cProfile.Profile()
        pr.enable()
        batch("p")
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
