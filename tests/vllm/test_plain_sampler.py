"""The plugin's ``_sample`` hook: a step in which no request has drafts is sampled by vLLM's plain sampler, not its
rejection sampler; every other step, and every engine whose drafter is not TiDAR's, as vLLM does. The runner is a
stand-in (its two samplers record which one ran); the engine-level check that the tokens are the same is
``test_engine_sampled.py::test_steps_without_drafts_sample_as_plain_vllm``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _runner(drafter, max_num_logprobs=None, spec_token_ids=None, logprob_token_ids=None, thinking=None):
    class Batch:
        sampling_metadata = SimpleNamespace(
            max_num_logprobs=max_num_logprobs,
            spec_token_ids=spec_token_ids,
            logprob_token_ids=logprob_token_ids,
            thinking_budget_state_holder=thinking,
        )

        def update_async_output_token_ids(self):
            pass

    return SimpleNamespace(
        drafter=drafter,
        input_batch=Batch(),
        sampler=lambda logits, sampling_metadata: "plain",
        rejection_sampler=lambda metadata, draft_probs, logits, sampling_metadata: "rejection",
        use_async_scheduling=False,
        _draft_token_req_ids=None,
        _get_spec_decode_draft_probs=lambda metadata: None,
    )


@pytest.fixture(scope="module")
def sample():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import tidar.vllm.plugin as plugin

    plugin.register()  # what vLLM does through the entry point (idempotent)
    return GPUModelRunner._sample


@pytest.fixture()
def proposer():
    from tidar.vllm.proposer import TidarProposer

    p = TidarProposer.__new__(TidarProposer)  # only its sampler choice is used here
    p.plain_sampler_steps = 0
    return p


def test_a_step_without_drafts_takes_the_plain_sampler(sample, proposer):
    logits = torch.randn(2, 11)
    no_drafts, drafts = SimpleNamespace(max_spec_len=0), SimpleNamespace(max_spec_len=3)
    assert sample(_runner(proposer, spec_token_ids=[[], []]), logits, no_drafts) == "plain"
    assert sample(_runner(proposer), logits, no_drafts) == "plain"
    assert proposer.plain_sampler_steps == 2
    assert sample(_runner(proposer), logits, drafts) == "rejection"
    assert sample(_runner(proposer), logits, None) == "plain"  # vLLM's own plain step (no spec metadata)
    assert proposer.plain_sampler_steps == 2


def test_logprobs_held_drafts_thinking_budgets_and_other_drafters_keep_the_rejection_sampler(sample, proposer):
    logits, no_drafts = torch.randn(2, 11), SimpleNamespace(max_spec_len=0)
    assert sample(_runner(proposer, max_num_logprobs=3), logits, no_drafts) == "rejection"
    assert sample(_runner(proposer, spec_token_ids=[[5], []]), logits, no_drafts) == "rejection"
    # logprobs of chosen tokens only (no top-k logprobs asked)
    assert sample(_runner(proposer, logprob_token_ids={0: [3, 4]}), logits, no_drafts) == "rejection"
    # a tracked thinking budget: its forced tokens follow the bonus-token path's row offsets
    tracked = SimpleNamespace(has_tracked_requests=lambda: True)
    assert sample(_runner(proposer, thinking=tracked), logits, no_drafts) == "rejection"
    idle = SimpleNamespace(has_tracked_requests=lambda: False)
    assert sample(_runner(proposer, thinking=idle), logits, no_drafts) == "plain"
    proposer.plain_sampler_steps -= 1
    assert sample(_runner(object()), logits, no_drafts) == "rejection"  # e.g. vLLM's n-gram proposer
    assert proposer.plain_sampler_steps == 0
