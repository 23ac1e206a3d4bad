"""The per-request draft pricing of the vLLM plugin (``tidar.vllm.draft_source``): pure Python, no vLLM needed."""

from __future__ import annotations

import itertools

import pytest

from tidar.vllm.draft_source import (
    BLOCK_COST,
    PROBE_EVERY,
    ROW_COST,
    VERIFY_COST,
    SourceEvidence,
    best_drafts,
    fixed_prices,
    gain,
    step_pays,
)


@pytest.mark.parametrize("block", [True, False])
def test_best_drafts_is_the_argmax_of_gain(block):
    for q, batch, row_cost, lo in itertools.product(
        [0.0, 0.2, 0.5, 0.8, 0.95, 1.0], [1, 2, 3, 8, 16], [0.0, 0.01, ROW_COST, 0.2], [1, 2]
    ):
        gains = {k: gain(q, k, batch, block, row_cost) for k in range(lo, 9)}
        top = max(gains.values())
        want = 0 if top <= 0 else min(k for k, g in gains.items() if g == top)
        assert best_drafts(q, 8, batch, block, row_cost, lo=lo) == want, (q, batch, row_cost, lo)


def test_gain_counts_the_block_rows():
    # 2 drafts at q = 1 for one request: saves 2 steps (plus their rows), costs 2 draft rows and 3 block rows
    assert gain(1.0, 2, 1, False, 0.1) == pytest.approx(2 * 1.1 - 0.2)
    assert gain(1.0, 2, 1, True, 0.1) == pytest.approx(2 * 1.1 - 0.2 - 0.3 - BLOCK_COST)
    assert gain(1.0, 2, 1, True, 0.0) == pytest.approx(2.0)  # free rows: the block costs nothing


def test_a_block_pays_alone_but_not_in_a_full_batch():
    ev = SourceEvidence()  # the prior: q = 0.5
    assert ev.wants_block(8, batch=1) and ev.block_drafts(8, batch=1) >= 2
    assert not ev.wants_block(8, batch=8)
    # the batch empties as requests finish: the block comes back
    assert [ev.wants_block(8, b) for b in (8, 4, 2, 1)][-1]
    # free rows (row_cost 0): a block and K drafts whatever the batch
    free = SourceEvidence(row_cost=0.0)
    assert free.wants_block(8, batch=8) and free.block_drafts(8, batch=8) == 8


def test_drafts_grow_with_acceptance_and_shrink_with_the_batch():
    ev = SourceEvidence()
    short = ev.context_drafts(8, batch=8)
    for _ in range(5):  # context drafts all accepted, step after step (a loop)
        ev.last = ("context", 8)
        ev.observe(list(range(9)))
    assert ev.q("context") > 0.8
    assert ev.context_drafts(8, batch=8) == 8 > short
    assert ev.context_drafts(8, batch=1) == 8
    bad = SourceEvidence()
    for _ in range(5):  # every first context draft rejected
        bad.last = ("context", 4)
        bad.observe([7])
    assert bad.q("context") < 0.2
    assert bad.context_drafts(8, batch=8) == 0 < bad.context_drafts(8, batch=1)


def test_observe_counts_the_first_rejection_and_censors_a_full_acceptance():
    ev = SourceEvidence()
    a, c = ev.accepted["diffusion"], ev.checked["diffusion"]
    ev.last = ("diffusion", 4)
    ev.observe([5, 6])  # 1 accepted, the 2nd rejected: 2 checked
    assert ev.accepted["diffusion"] == pytest.approx(0.7 * a + 1)
    assert ev.checked["diffusion"] == pytest.approx(0.7 * c + 2)
    a, c = ev.accepted["diffusion"], ev.checked["diffusion"]
    ev.last = ("diffusion", 2)
    ev.observe([1, 2, 3])  # both accepted plus the bonus: 2 checked, no rejection seen
    assert ev.accepted["diffusion"] == pytest.approx(0.7 * a + 2)
    assert ev.checked["diffusion"] == pytest.approx(0.7 * c + 2)


def test_unproposed_context_drafts_are_scored_so_a_loop_is_noticed():
    ev = SourceEvidence()
    for _ in range(3):  # diffusion drafts half accepted, context drafts rejected at once
        ev.last, ev.shadow = ("diffusion", 2), [9, 9]
        ev.observe([1, 2])
    assert not ev.prefers_context()
    for _ in range(4):  # the text starts repeating: the context drafts it did not propose would have been right
        ev.last, ev.shadow = ("diffusion", 2), [1, 2, 3, 4]
        ev.observe([1, 2])
    assert ev.prefers_context()
    ev.last = ("context", 8)  # drafting from the context and preferring it: no block
    assert not ev.wants_block(8, batch=1)


def test_a_rejecting_request_probes_a_block_now_and_then_when_alone():
    ev = SourceEvidence()
    for _ in range(6):
        ev.last = ("diffusion", 4)
        ev.observe([3])
    assert not ev.wants_block(8, batch=1)
    for _ in range(PROBE_EVERY):
        ev.planned(False)
    assert ev.wants_block(8, batch=1)  # a probe at the prior's price
    assert not ev.wants_block(8, batch=8)  # not worth a probe in a full batch


def test_a_step_drafts_only_when_its_drafts_pay_for_the_verification():
    assert fixed_prices().verify_cost == VERIFY_COST > 0 and fixed_prices(0.0).verify_cost == 0.0
    assert not step_pays([], 0.0)  # no drafts: nothing to verify
    assert step_pays([0.01], 0.0)
    assert not step_pays([0.03, 0.04], 0.08) and step_pays([0.03, 0.04, 0.02], 0.08)
    ev = SourceEvidence()  # q = 0.5: one draft alone is worth far more than a verification, in a full batch less
    assert ev.expected_gain("context", 1, 1) > VERIFY_COST > ev.expected_gain("context", 1, 8) > 0
    assert ev.expected_gain("context", 0, 1) == 0.0
    assert ev.expected_gain("context", 3, 1) == pytest.approx(gain(0.5, 3, 1, False, ROW_COST))


def test_withheld_drafts_are_scored_as_shadows_of_their_source():
    ev = SourceEvidence()
    q0 = ev.q("diffusion")
    for _ in range(4):  # diffusion drafts withheld, and the text goes on with them
        ev.last = ("diffusion", 3)
        ev.withhold("diffusion", [5, 6, 7])
        assert ev.last == ("diffusion", 0)  # the source stays, with nothing proposed to score
        ev.observe([5])
    assert ev.q("diffusion") > q0 and ev.q("context") == 0.5
    ev.last = ("context", 2)
    ev.withhold("context", [1, 2])
    ev.observe([9])  # the first context draft was wrong
    assert ev.q("context") < 0.5 and ev.withheld is None and ev.shadow is None
