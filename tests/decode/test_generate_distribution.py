"""Distribution exactness: TiDAR sampling draws continuations from the AR model's exact distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import chi2_pvalue, tiny_model

import tidar

V, T, N = 6, 3, 6000  # vocab (last id is [MASK]), continuation length, draws
PROMPT = [1, 3, 2]
# a prompt that loops: a sampled row takes context drafts only where its match and its evidence both say the copy
# is likely (a 1-token match is not evidence), so the context cases start inside a loop
LOOP_PROMPT = [1, 3, 2, 1, 3, 2, 1, 3]


def _exact_ar_distribution(model, temperature=1.0, prompt=PROMPT):
    """P(x_1..x_T | prompt) for every continuation, by enumeration with the unpatched model."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = (model(ids).logits.double() / temperature).log_softmax(-1)
    P = len(prompt)
    lp = sum(logp[:, P - 1 + t].gather(1, seqs[:, t : t + 1]).squeeze(1) for t in range(T))
    return {tuple(s): p for s, p in zip(seqs.tolist(), lp.exp().tolist())}


def _sample(model, K, beta=1.0, temperature=1.0, seed=0):
    ids = torch.tensor([PROMPT]).expand(N, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    out = tidar.generate(model, ids, max_new_tokens=T, draft_len=K, temperature=temperature, beta=beta, generator=g)
    return [tuple(r) for r in out.sequences[:, len(PROMPT) :].tolist()], out


@pytest.mark.parametrize("K", [2, 4])
def test_sampling_matches_exact_ar_distribution(K):
    model = tiny_model("qwen2", vocab=V, hidden=16, init=0.5, seed=K)
    exact = _exact_ar_distribution(model)
    tidar.patch(model, draft_len=K)
    samples, out = _sample(model, K)
    assert max(out.accepted_histogram) > 1, "no draft was ever accepted: the test would prove nothing"
    assert chi2_pvalue(samples, exact) > 1e-3
    tv = 0.5 * sum(abs(exact[s] - samples.count(s) / N) for s in exact)
    assert tv < 0.06

    # Power: the same statistic rejects a wrong sampler (beta = 0 verifies against the diffusion logits).
    wrong, _ = _sample(model, K, beta=0.0)
    assert chi2_pvalue(wrong, exact) < 1e-6


@pytest.mark.parametrize("K", [1, "auto"])
def test_plain_ar_steps_and_auto_keep_the_ar_distribution(K):
    """K = 1 samples the AR row alone (no proposal blocks); auto mixes such steps with drafted ones."""
    model = tiny_model("qwen2", vocab=V, hidden=16, init=0.5, seed=7)
    exact = _exact_ar_distribution(model)
    tidar.patch(model, draft_len=K)
    samples, out = _sample(model, K)
    assert chi2_pvalue(samples, exact) > 1e-3
    assert 0.5 * sum(abs(exact[s] - samples.count(s) / N) for s in exact) < 0.06


def test_temperature_is_applied_to_target_and_drafts():
    model = tiny_model("llama", vocab=V, hidden=16, init=0.5, seed=11)
    exact = _exact_ar_distribution(model, temperature=0.7)
    tidar.patch(model, draft_len=3)
    samples, _ = _sample(model, 3, temperature=0.7, seed=1)
    assert chi2_pvalue(samples, exact) > 1e-3


def test_same_generator_seed_reproduces():
    model = tidar.patch(tiny_model("qwen3", vocab=V, hidden=16, init=0.5), draft_len=3)
    a, _ = _sample(model, 3, seed=5)
    b, _ = _sample(model, 3, seed=5)
    c, _ = _sample(model, 3, seed=6)
    assert a == b and a != c


@pytest.mark.parametrize("K,levels,context", [(3, (1,), False), (4, (2, 4), True), (3, None, True)])
def test_level_sets_and_context_drafts_keep_the_ar_distribution(K, levels, context):
    """Sparse proposal levels (fewer, shifted diffusion drafts, filler drafts with q = 1) and context drafts
    (copies, q = 1) are proposals like any other: the samples still follow the exact AR distribution."""
    model = tiny_model("qwen2", vocab=V, hidden=16, init=0.5, seed=20 + K)
    prompt = LOOP_PROMPT if context else PROMPT
    exact = _exact_ar_distribution(model, prompt=prompt)
    tidar.patch(model, draft_len=K, proposal_levels=levels, context_drafts=context)
    ids = torch.tensor([prompt]).expand(N, -1).contiguous()
    g = torch.Generator().manual_seed(1)
    out = tidar.generate(model, ids, max_new_tokens=T, temperature=1.0, generator=g)
    samples = [tuple(r) for r in out.sequences[:, len(prompt) :].tolist()]
    assert max(out.accepted_histogram) > 1, "no draft was ever accepted: the test would prove nothing"
    if context:
        assert out.draft_sources.get("context", 0) > 0, out.draft_sources
    assert chi2_pvalue(samples, exact) > 1e-3
    tv = 0.5 * sum(abs(exact[s] - samples.count(s) / N) for s in exact)
    assert tv < 0.06
