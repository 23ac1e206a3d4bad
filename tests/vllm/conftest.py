"""Tests of the vLLM plugin (tidar.vllm). The engine tests need vLLM, which pins its own torch: they run in a
separate virtual environment (.ci/vllm_tests.sh, ``pytest tests/vllm --confcutdir=tests/vllm``); the main suite
leaves this folder out (tests/conftest.py). Run by hand where vLLM is not installed, only the pure tests here are
collected."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path, where this folder reads as a namespace package "vllm": only a real one counts
_spec = importlib.util.find_spec("vllm")
HAS_VLLM = _spec is not None and _spec.origin is not None
# files that start an engine or import vLLM
collect_ignore_glob = (
    []
    if HAS_VLLM
    else ["test_engine_*.py", "test_server.py", "test_refusals.py", "test_expand_*.py", "test_plain_sampler.py"]
)
collect_ignore = ["engine_script.py"]

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "tidar-python-tiny")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=8, disable_log_stats=False)


def make_llm(spec=None, **kw):
    import vllm

    return vllm.LLM(model=MODEL, speculative_config=spec, **{**ENGINE_KW, **kw})


@pytest.fixture(scope="session")
def prompts():
    """Code prompts of different lengths: the model card's held-out prompts and short openings."""
    demo = json.load(open(Path(MODEL) / "demo_prompts.json"))["prompts"]
    return demo[:4] + ["def read_config(path):\n", "class Stack:\n    def __init__(self):\n", "import os\n"]


@pytest.fixture(scope="session")
def plain_llm():
    llm = make_llm()
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def tidar_llm():
    import tidar.vllm

    llm = make_llm(tidar.vllm.speculative_config(num_speculative_tokens=8))
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def tidar_free_llm():
    """TiDAR with free rows (``row_cost=0``): every request that may use a [MASK] block carries one, whatever the
    batch (the default prices blocks out of full batches on this CPU, so concurrent tests would see few)."""
    import tidar.vllm

    llm = make_llm(tidar.vllm.speculative_config(num_speculative_tokens=8, row_cost=0))
    yield llm
    llm.llm_engine.engine_core.shutdown()


def engine_in_subprocess(spec, engine: dict, prompts: list, sampling: dict) -> dict:
    """``engine_script.py``'s result: an engine with these settings in its own process."""
    import subprocess
    import sys

    job = json.dumps({"spec": spec, "engine": engine, "prompts": prompts, "sampling": sampling})
    here = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, str(here / "engine_script.py"), job], cwd=here, capture_output=True, text=True, timeout=600
    )
    if proc.returncode:
        raise RuntimeError(f"engine_script.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_staggered(llm, schedule, abort=None):
    """``schedule``: ``(step, request_id, prompt, params)``: each request added before engine step ``step``;
    ``abort``: ``{step: [request ids]}`` cancelled before that step. Returns ``{request_id: token ids}`` of the
    requests that finished."""
    engine = llm.llm_engine
    pending = sorted(schedule, key=lambda s: s[0])
    done, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        if abort and step in abort:
            engine.abort_request(abort[step])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    return done
