"""TiDAR served by vLLM (``--only vllm``; run with the Python of a venv that has vLLM and this repo installed, e.g.
the one .ci/vllm_tests.sh makes): plain vLLM, vLLM's n-gram drafts and vLLM + TiDAR (``tidar.vllm``'s
defaults) on the bundled model, the same prompts (``python/tidar/ordinary_prompts.py``, four classes), greedy.

- ``vllm_b1``: one request at a time, ``NEW_TOKENS`` tokens each (EOS ignored); the three engines are interleaved
  prompt by prompt over ``ROUNDS`` rounds and each prompt's best round is kept (a shared machine only adds time).
  Tokens per step = generated tokens / engine steps (the prefill's step included).
- ``vllm_concurrent``: ``CONCURRENT`` requests at once (different prompts), the engines interleaved in each round
  (each round: the batch-1 prompts, then ``CONCURRENT_REPEATS`` concurrent batches), the best batch.
Every text is checked identical to plain vLLM's. Writes ``vllm.md`` (the table) and ``vllm.json``. (vLLM's own
spec-decode metrics are not read here: with three engines in one process its Prometheus registry shows only the
last one's; tests/vllm checks them on one engine.)
"""

from __future__ import annotations

import json
import time

from tidar.ordinary_prompts import PROMPTS

from .harness import Bench

NEW_TOKENS = 96
ROUNDS = 5
CONCURRENT = 8
CONCURRENT_REPEATS = 3  # concurrent batches per engine and round (one batch is about half a second)
PER_CLASS = 3  # prompts of each class at batch 1
NGRAM = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=8, disable_log_stats=False)


def _engines():
    import tidar.vllm

    return {"vllm": None, "vllm-ngram": NGRAM, "vllm-tidar": tidar.vllm.speculative_config(num_speculative_tokens=8)}


def _generate(llm, prompts, n):
    """``(token ids per prompt, seconds, engine steps)`` of one batch, all requests added at once."""
    import vllm

    engine = llm.llm_engine
    params = vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    outs, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
        steps += 1
    dt = time.perf_counter() - t
    return [outs[k] for k in sorted(outs, key=lambda k: int(k.rsplit("-", 1)[1]))], dt, steps


def run(bench: Bench):
    try:
        import vllm
    except ImportError:
        bench.start_suite("vllm_b1", 1)
        bench.skip("(all)", "(all)", "vLLM is not installed in this Python: run with the vLLM venv's python")
        return
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tidar.cli.demo import bundled_model_dir

    model = str(bundled_model_dir())
    n = 8 if bench.smoke else NEW_TOKENS
    per_class = 1 if bench.smoke else PER_CLASS
    b1_prompts = [(cls, p) for cls, ps in PROMPTS.items() for p in ps[:per_class]]
    conc_prompts = [p for ps in PROMPTS.values() for p in ps][:CONCURRENT]
    rounds = 1 if bench.smoke else ROUNDS
    llms = {name: vllm.LLM(model=model, speculative_config=spec, **ENGINE_KW) for name, spec in _engines().items()}
    result = {"model": model, "new_tokens": n, "vllm": vllm.__version__, "b1": {}, "concurrent": {}}
    try:
        for llm in llms.values():  # warm-up
            _generate(llm, [b1_prompts[0][1]], 8)
        # batch 1: per prompt, per engine, the best round; concurrent: per engine, the best round; both phases in
        # every round, so a busy spell of the machine hits all engines and both settings alike
        best = {name: [None] * len(b1_prompts) for name in llms}
        texts = {name: [None] * len(b1_prompts) for name in llms}
        cbest, ctexts = {}, {}
        bench.start_suite("vllm_b1", 60 if bench.smoke else 1200)
        for _ in range(rounds):
            for i, (_, p) in enumerate(b1_prompts):
                for name, llm in llms.items():
                    (ids,), dt, steps = _generate(llm, [p], n)
                    if best[name][i] is None or dt < best[name][i][0]:
                        best[name][i] = (dt, steps)
                    texts[name][i] = ids
            for name, llm in [e for _ in range(CONCURRENT_REPEATS) for e in llms.items()]:
                ids, dt, steps = _generate(llm, conc_prompts, n)
                if name not in cbest or dt < cbest[name][0]:
                    cbest[name] = (dt, steps)
                ctexts[name] = ids
    finally:
        for llm in llms.values():
            llm.llm_engine.engine_core.shutdown()
    _rows(bench, b1_prompts, best, texts, cbest, ctexts, result)
    (bench.out / "vllm.json").write_text(json.dumps(result, indent=2))
    (bench.out / "vllm.md").write_text(_table(result))


def _rows(bench, b1_prompts, best, texts, cbest, ctexts, result):
    for name in best:
        tokens = sum(len(t) for t in texts[name])
        secs = sum(b[0] for b in best[name])
        steps = sum(b[1] for b in best[name])
        same = texts[name] == texts["vllm"]
        per_class = {}
        for cls in dict.fromkeys(c for c, _ in b1_prompts):
            idx = [i for i, (c, _) in enumerate(b1_prompts) if c == cls]
            per_class[cls] = sum(len(texts[name][i]) for i in idx) / sum(best[name][i][0] for i in idx)
        r = {"tok/s": tokens / secs, "tokens/step": tokens / steps, "identical": same, "per class tok/s": per_class}
        result["b1"][name] = r
        bench.derived(f"b1 x{len(b1_prompts)} prompts", name, 1000 * secs / tokens, r, suite="vllm_b1")
        ctok = sum(len(t) for t in ctexts[name])
        rc = {
            "tok/s": ctok / cbest[name][0],
            "tokens/step (all requests)": ctok / cbest[name][1],
            "identical": ctexts[name] == ctexts["vllm"],
        }
        result["concurrent"][name] = rc
        bench.derived(f"{CONCURRENT} concurrent", name, 1000 * cbest[name][0] / ctok, rc, suite="vllm_concurrent")


def _table(result) -> str:
    lines = [
        f"# vLLM {result['vllm']}: plain, n-gram drafts, TiDAR plugin (greedy, {result['new_tokens']} new tokens)",
        "",
        "| engine | b1 tok/s | b1 tokens/step | b1 identical | "
        f"{CONCURRENT} concurrent tok/s | concurrent tokens/step (all requests) | concurrent identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in result["b1"].items():
        c = result["concurrent"][name]
        lines.append(
            f"| {name} | {b['tok/s']:.0f} | {b['tokens/step']:.2f} | {b['identical']} | {c['tok/s']:.0f} | "
            f"{c['tokens/step (all requests)']:.2f} | {c['identical']} |"
        )
    lines += ["", "Batch 1 tok/s per prompt class:", ""]
    classes = list(next(iter(result["b1"].values()))["per class tok/s"])
    lines += ["| engine | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for name, b in result["b1"].items():
        lines.append(f"| {name} | " + " | ".join(f"{b['per class tok/s'][c]:.0f}" for c in classes) + " |")
    return "\n".join(lines) + "\n"


def goals(bench: Bench):
    rows = {(r["suite"], r["impl"]): r for r in bench.rows if r["suite"].startswith("vllm_") and r["status"]}
    b1 = {impl: r["extra"] for (s, impl), r in rows.items() if s == "vllm_b1" and r["status"] == "derived"}
    cc = {impl: r["extra"] for (s, impl), r in rows.items() if s == "vllm_concurrent" and r["status"] == "derived"}
    if "vllm-tidar" not in b1 or "vllm-tidar" not in cc:
        bench.goal("vLLM + TiDAR", "measured", "not measured", "no vLLM rows")
        return
    t, p, g = b1["vllm-tidar"]["tok/s"], b1["vllm"]["tok/s"], b1["vllm-ngram"]["tok/s"]
    bench.goal("vLLM+TiDAR vs plain vLLM, batch 1", ">= 1.3x", f"{t / p:.2f}x", "met" if t >= 1.3 * p else "missed")
    tc, pc, gc = cc["vllm-tidar"]["tok/s"], cc["vllm"]["tok/s"], cc["vllm-ngram"]["tok/s"]
    bench.goal(
        f"vLLM+TiDAR vs plain vLLM, {CONCURRENT} concurrent",
        ">= 1.0x",
        f"{tc / pc:.2f}x",
        "met" if tc >= pc else "missed",
    )
    bench.goal("vLLM+TiDAR vs vLLM ngram, batch 1", ">= 1.0x", f"{t / g:.2f}x", "met" if t >= g else "missed")
    bench.goal(
        f"vLLM+TiDAR vs vLLM ngram, {CONCURRENT} concurrent",
        ">= 1.0x",
        f"{tc / gc:.2f}x",
        "met" if tc >= gc else "missed",
    )
    same = all(b1[k]["identical"] and cc[k]["identical"] for k in b1)
    bench.goal("identical greedy outputs (all engines)", "yes", str(same), "met" if same else "missed")


def plots(bench: Bench, plot):
    return []
