"""Greedy decoding served by vLLM with the TiDAR plugin is token-identical to the same vLLM without it: one
request at a time, concurrent requests of different lengths arriving at different steps, EOS / max_tokens / stop
strings, a cancelled request, preemption under cache pressure, requests at and past the model's length; and
vLLM's spec-decode metrics report TiDAR's drafts."""

from __future__ import annotations

import pytest
from conftest import engine_in_subprocess, run_staggered, token_ids


def _params(**kw):
    import vllm

    return vllm.SamplingParams(**{"temperature": 0.0, "max_tokens": 64, **kw})


def test_batch1_identical(plain_llm, tidar_llm, prompts):
    for p in prompts:
        want = token_ids(plain_llm.generate([p], _params(), use_tqdm=False))
        assert token_ids(tidar_llm.generate([p], _params(), use_tqdm=False)) == want, p


def test_concurrent_identical_with_stops(plain_llm, tidar_llm, prompts):
    # different lengths, max_tokens, a stop string, a stop token, EOS left on
    params = [
        _params(max_tokens=17 + 13 * i, stop=["\n\n"] if i % 3 == 1 else None, stop_token_ids=[201] if i == 2 else None)
        for i in range(len(prompts))
    ]
    want = token_ids(plain_llm.generate(prompts, params, use_tqdm=False))
    got = token_ids(tidar_llm.generate(prompts, params, use_tqdm=False))
    assert got == want
    assert any(len(w) < p.max_tokens for w, p in zip(want, params))  # some stopped before max_tokens


def test_staggered_arrivals_and_cancel(plain_llm, tidar_llm, prompts):
    schedule = [(3 * i, f"r{i}", p, _params(max_tokens=30 + 7 * i)) for i, p in enumerate(prompts)]
    want = run_staggered(plain_llm, schedule)
    assert run_staggered(tidar_llm, schedule) == want
    # request r1 cancelled after a few steps: the others are unaffected, the engine goes on serving
    got = run_staggered(tidar_llm, schedule, abort={5: ["r1"]})
    assert "r1" not in got and got == {k: v for k, v in want.items() if k != "r1"}


def test_concurrent_identical_with_blocks_in_every_step(plain_llm, tidar_free_llm, prompts):
    """The default prices [MASK] blocks out of full batches on this CPU (draft_source); with free rows
    (row_cost=0) every request that may use one carries a block, so the forwards hold many requests' blocks in
    several layout groups at once: still token-identical, arriving together and at different steps."""
    params = [_params(max_tokens=20 + 11 * i, stop=["\n\n"] if i % 3 == 1 else None) for i in range(len(prompts))]
    want = token_ids(plain_llm.generate(prompts, params, use_tqdm=False))
    assert token_ids(tidar_free_llm.generate(prompts, params, use_tqdm=False)) == want
    schedule = [(2 * i, f"f{i}", p, _params(max_tokens=25 + 6 * i)) for i, p in enumerate(prompts)]
    assert run_staggered(tidar_free_llm, schedule) == run_staggered(plain_llm, schedule)


def test_spec_decode_metrics_report_tidar(tidar_llm, prompts):
    tidar_llm.generate(prompts[:2], _params(), use_tqdm=False)
    metrics = {m.name: m for m in tidar_llm.get_metrics()}
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    assert drafts > 0 and accepted > 0 and len(per_pos) == 8 and sum(per_pos) == accepted
    assert per_pos == sorted(per_pos, reverse=True)  # position i counts only when 0..i-1 were accepted


def test_model_length_limits(plain_llm, tidar_llm, prompts):
    tok = plain_llm.get_tokenizer()
    ids = (tok.encode(prompts[0]) * 40)[:1000]  # 1000 of 1024 positions: generation stops at the model's length
    p = {"prompt_token_ids": ids}
    want = token_ids(plain_llm.generate([p], _params(max_tokens=100), use_tqdm=False))
    assert 0 < len(want[0]) <= 24
    assert token_ids(tidar_llm.generate([p], _params(max_tokens=100), use_tqdm=False)) == want
    too_long = {"prompt_token_ids": (ids * 2)[:1100]}
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="maximum context length is 1024"):
        tidar_llm.generate([too_long], _params(), use_tqdm=False)
    # the engine still serves after refusing it
    assert token_ids(tidar_llm.generate([prompts[1]], _params(), use_tqdm=False)) == token_ids(
        plain_llm.generate([prompts[1]], _params(), use_tqdm=False)
    )


def test_preemption_chunked_prefill_and_compiled_graphs_requested(plain_llm, prompts):
    """One engine (its own process) under three conditions at once, each a separate engine start otherwise:
    9 blocks of 128 slots (one request of the model's length fits) for 7 requests of up to ~260 tokens, so the
    scheduler preempts and recomputes; a 40-token budget per step, so the longer prompts are prefilled in chunks
    (a chunk that does not end its prompt gets a block whose drafts vLLM discards); and enforce_eager=False, which
    the plugin switches on."""
    import tidar.vllm

    sampling = dict(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine = {"num_gpu_blocks_override": 9, "max_num_batched_tokens": 40, "enforce_eager": False}
    got = engine_in_subprocess(tidar.vllm.speculative_config(8), engine, prompts, sampling)
    assert got["metrics"]["vllm:num_preemptions"] > 0
    assert got["max_num_batched_tokens"] == 40
    assert max(len(plain_llm.get_tokenizer().encode(p)) for p in prompts) > 40  # some prompt was chunked
    assert got["eager"]
    assert got["token_ids"] == token_ids(plain_llm.generate(prompts, _params(**sampling), use_tqdm=False))
