"""``tidar.vllm.step_clock``: the prices of rows and [MASK] block steps fitted to the engine's own step times (pure:
no engine; fake clocks)."""

from __future__ import annotations

import random

import pytest

from tidar.vllm.draft_source import BLOCK_COST, ROW_COST, SourceEvidence
from tidar.vllm.step_clock import Prices, StepClock


def _serve(clock, steps, fixed=1.75, per_row=0.19, per_block=0.4, per_verify=0.0, noise=0.03, idle_every=0, seed=0):
    """Feed ``steps`` steps of random rows (1-4 requests, their drafts on some, a block of 3-9 rows on some) with
    periods ``fixed + per_row * rows + per_block * block + per_verify * has_drafts`` (+-noise); every
    ``idle_every`` steps the engine idles 50 ms."""
    rng = random.Random(seed)
    now = 100.0
    for i in range(steps):
        clock.begin(now)
        block = rng.random() < 0.4
        drafts = rng.randint(1, 8) if rng.random() < 0.5 else 0
        rows = rng.randint(1, 4) + drafts + (rng.randint(3, 9) if block else 0)
        clock.ran(rows, block, drafts > 0)
        ms = (fixed + per_row * rows + per_block * block + per_verify * (drafts > 0)) * (1 + rng.uniform(-noise, noise))
        if idle_every and i % idle_every == idle_every - 1:
            ms += 50.0
        now += ms / 1e3
    clock.begin(now)


def test_fitted_prices_are_the_engine_steps_in_units_of_its_fixed_cost():
    clock = StepClock(ROW_COST, BLOCK_COST)
    _serve(clock, 300, per_verify=0.3)
    a, b, c, d = clock.fit
    assert a == pytest.approx(1.75, rel=0.1) and b == pytest.approx(0.19, rel=0.1) and c == pytest.approx(0.4, abs=0.1)
    assert d == pytest.approx(0.3, abs=0.1)
    assert clock.row_cost == pytest.approx(0.19 / 1.75, rel=0.12)
    assert clock.block_cost == pytest.approx(0.4 / 1.75, abs=0.06)
    assert clock.verify_cost == pytest.approx(0.3 / 1.75, abs=0.06)


def test_a_verification_price_needs_steps_with_and_without_drafts():
    clock = StepClock(ROW_COST, BLOCK_COST, 0.123)
    now = 0.0
    for i in range(200):  # every step verifies drafts: their price cannot be told from the fixed cost
        clock.begin(now)
        clock.ran(2 + i % 5, False, True)
        now += (2.0 + 0.2 * (2 + i % 5)) / 1e3
    clock.begin(now)
    assert clock.fit is not None and clock.fit[3] == 0.0
    assert clock.verify_cost == 0.123 and clock.row_cost == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("seed", range(4))
def test_prior_prices_until_enough_steps_and_idle_gaps_are_not_steps(seed):
    clock = StepClock(ROW_COST, BLOCK_COST)
    _serve(clock, StepClock.MIN_STEPS - 2, seed=seed)
    assert (clock.row_cost, clock.block_cost) == (ROW_COST, BLOCK_COST) and clock.fit is None
    idle = StepClock(ROW_COST, BLOCK_COST)
    # the engine waits for requests now and then, the first time before its 8th step: those periods are skipped
    _serve(idle, 300, idle_every=7, seed=seed)
    assert idle.steps == 300 - 300 // 7
    assert idle.fit[0] == pytest.approx(1.75, rel=0.1) and idle.row_cost == pytest.approx(0.19 / 1.75, rel=0.12)


def test_a_step_that_ran_no_forward_or_was_skipped_is_not_counted():
    clock = StepClock(ROW_COST, BLOCK_COST)
    clock.begin(0.0)
    clock.begin(0.002)  # no ran(): nothing is known of that step
    clock.begin(0.004)
    clock.ran(5, False)
    clock.skip()  # a dummy run
    clock.begin(0.006)
    clock.ran(5, False)
    clock.begin(0.006)  # no time passed: not a step
    assert clock.steps == 0


def test_rows_that_never_vary_keep_the_prior_row_price():
    clock = StepClock(ROW_COST, BLOCK_COST)
    now = 0.0
    for _ in range(100):
        clock.begin(now)
        clock.ran(1, False)
        now += 0.002
    assert clock.row_cost == ROW_COST


def test_requests_price_their_drafts_with_the_shared_measured_prices():
    """The proposer's requests share one clock: once it has measured dear rows, a request alone stops carrying
    blocks its diffusion evidence (q = 0.35) does not pay for, and cuts its context drafts, where the constants
    would still take both."""
    clock = StepClock(ROW_COST, BLOCK_COST)
    ev = SourceEvidence(prices=clock)
    for _ in range(6):  # diffusion drafts accepted about a third of the time
        ev.last = ("diffusion", 3)
        ev.observe([7])
        ev.last = ("diffusion", 3)
        ev.observe([7, 8])
    assert 0.3 < ev.q("diffusion") < 0.4
    assert ev.wants_block(8, 1)  # the constants: a block pays at q >= 0.22 alone
    long_ctx = ev.context_drafts(8, 1)
    _serve(clock, 300, fixed=1.0, per_row=0.3, per_block=0.6)  # rows as dear as a third of the step
    assert clock.row_cost > 0.25
    assert not ev.wants_block(8, 1)
    assert ev.context_drafts(8, 1) < long_ctx


def test_fixed_prices_are_not_measured():
    fixed = Prices(0.05, BLOCK_COST, 0.07)
    _serve(fixed, 100)
    assert (fixed.row_cost, fixed.block_cost, fixed.verify_cost, fixed.measured) == (0.05, BLOCK_COST, 0.07, False)
