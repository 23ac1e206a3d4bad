"""One engine in its own process, for tests that need an engine besides the session's two (vLLM's metrics live in
one process-wide Prometheus registry: a third engine in the test process would hide theirs).

    python engine_script.py '{"spec": ..., "engine": {...}, "prompts": [...], "sampling": {...}}'

prints ``{"token_ids": [...], "metrics": {name: value}}`` as its last line.
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    import vllm
    from conftest import make_llm

    job = json.loads(sys.argv[1])
    llm = make_llm(job.get("spec"), **job.get("engine", {}))
    outs = llm.generate(job["prompts"], vllm.SamplingParams(**job["sampling"]), use_tqdm=False)
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    config = llm.llm_engine.vllm_config
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "metrics": metrics,
        "eager": config.model_config.enforce_eager,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
    }
    llm.llm_engine.engine_core.shutdown()
    print(json.dumps(result))
