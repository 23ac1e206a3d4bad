import time, cProfile, pstats, sys, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm, tidar.vllm
from tidar.ordinary_prompts import PROMPTS
from tidar.cli.demo import bundled_model_dir
prompts = [p for ps in PROMPTS.values() for p in ps][:int(os.environ.get("NREQ", "8"))]
KW = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=8, disable_log_stats=False)
def main():
    which = sys.argv[1]
    spec = {"plain": None, "ngram": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 2}, "tidar": tidar.vllm.speculative_config(num_speculative_tokens=8), "tidar0": tidar.vllm.speculative_config(num_speculative_tokens=8, row_cost=0)}[which]
    llm = vllm.LLM(model=str(bundled_model_dir()), speculative_config=spec, **KW)
    engine = llm.llm_engine
    params = vllm.SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    def batch(tag):
        for i, p in enumerate(prompts): engine.add_request(f"{tag}-{i}", p, params)
        steps = 0; t = time.perf_counter()
        while engine.has_unfinished_requests(): engine.step(); steps += 1
        return time.perf_counter() - t, steps
    for r in range(3): batch(f"w{r}")
    best = min(batch(f"m{r}") for r in range(4))
    print(which, "best s", round(best[0], 3), "steps", best[1], "ms/step", round(best[0] / best[1] * 1e3, 3), "tok/s", round(len(prompts) * 96 / best[0], 1))
    if len(sys.argv) > 2:
        pr = cProfile.Profile(); pr.enable(); batch("p"); pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)

if __name__ == "__main__":
    main()
