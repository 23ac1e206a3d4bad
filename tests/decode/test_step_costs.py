"""The planner's prices corrected by the steps' own clock (issue 19): a plan the decoder has timed a few times is
priced at the median of its recent times, so a step the cost model underprices (a drafted sampled step in some
processes) stops being chosen, and one it overprices is taken. Only measured curves learn; a hand-made curve is
the truth. Output stays exact whatever the clock says."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode import step_costs as sc
from tidar.decode.planner import MAX_AUTO_DRAFT_LEN, Plan, Planner, new_row_stats, new_stats
from tidar.decode.slot_timing import SlotCurve, set_slot_curve

GRID = [1, 2, 4, 8, 16, 32, 64, 128, 272]


def _curve(fn, **extra):
    return SlotCurve(GRID, [fn(n) for n in GRID], 0.01, "cpu", "float32", host_measured=True, **extra)


FLAT = _curve(lambda n: 4.0 + 0.001 * n)  # drafts nearly free: the model of a step says draft long


def _looping_row():
    row = new_row_stats(1)[0]
    for _ in range(3):
        row["context"].update(MAX_AUTO_DRAFT_LEN - 1, MAX_AUTO_DRAFT_LEN - 1)
    return (0, MAX_AUTO_DRAFT_LEN - 1, row, 40, 100)


def test_step_costs_median_after_min_samples_and_an_old_time_ages_out():
    costs = sc.StepCosts(window=4, min_samples=3)
    assert costs.add((2, 2), 10.0) is None and costs.add((2, 2), 30.0) is None
    assert costs.medians == {}
    assert costs.add((2, 2), 20.0) == 20.0
    for ms in (1.0, 2.0, 3.0):  # the 10, 30 and 20 age out of a window of 4 one by one
        costs.add((2, 2), ms)
    assert costs.medians[(2, 2)] == 2.5 and list(costs.times[(2, 2)]) == [20.0, 1.0, 2.0, 3.0]
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="ms"):
            costs.add((1, 0), bad)
    assert (1, 0) not in costs.times  # a refused time leaves nothing behind
    with pytest.raises(ValueError, match="min_samples"):
        sc.StepCosts(window=2, min_samples=3)


def test_only_measured_curves_learn_and_their_times_are_kept_per_batch():
    assert sc.step_costs(FLAT, 1) is None  # a curve given by hand is the truth
    measured = _curve(lambda n: 4.0, key="k-test", step_feedback=True)
    a = sc.step_costs(measured, 1)
    assert a is sc.step_costs(measured, 1)  # one per process: what a step costs is the machine's
    assert a is not sc.step_costs(measured, 4)
    sc.clear_step_costs()
    assert sc.step_costs(measured, 1) is not a


def test_an_underpriced_drafted_plan_measured_slow_gives_way_to_ar_and_an_overpriced_one_is_taken():
    row = _looping_row()
    planner = Planner(FLAT, new_stats(), measured=sc.StepCosts())
    drafted = planner.choose([row], MAX_AUTO_DRAFT_LEN)
    assert drafted.draft_len >= 8  # priced near an AR step: a loop is drafted long
    for _ in range(3):
        planner.observe(Plan(1, ()), 4.0)
        planner.observe(drafted, 400.0)  # ... but it measures 100 AR steps
    assert planner.cost(*_key(drafted)) == 400.0 and planner.cost(1, ()) == 4.0
    again = planner.choose([row], MAX_AUTO_DRAFT_LEN)
    assert again != drafted and planner.cost(*_key(again)) < 400.0

    steep = _curve(lambda n: 4.0 * n)  # the model says a K-token step costs K AR steps: never draft
    planner = Planner(steep, new_stats(), measured=sc.StepCosts())
    assert planner.choose([row], MAX_AUTO_DRAFT_LEN) == Plan(1, ())
    for _ in range(3):  # the clock says a K = 8 copy step costs what an AR step does
        planner.observe(Plan(1, ()), 4.0)
        planner.observe(Plan(8, ()), 4.2)
    assert planner.choose([row], MAX_AUTO_DRAFT_LEN) == Plan(8, ())


def _key(plan):
    return plan.draft_len, plan.levels


def test_without_a_clock_the_planner_prices_from_the_curve_alone():
    planner = Planner(FLAT, new_stats())
    before = planner.cost(4, (1, 2, 3, 4))
    for _ in range(5):
        planner.observe(Plan(4, (1, 2, 3, 4)), 1000.0)
    assert planner.cost(4, (1, 2, 3, 4)) == before


def test_greedy_generate_times_every_step_into_the_process_costs_and_stays_exact():
    sc.clear_step_costs()
    model = tidar.patch(tiny_model("qwen2", seed=5), draft_len="auto")
    curve = _curve(lambda n: 4.0 + 0.01 * n, key="k-generate", step_feedback=True)
    set_slot_curve(model, curve)
    prompt = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(7))
    stats = tidar.DecodeStats()
    out = tidar.generate(model, prompt, max_new_tokens=24, stats=stats)
    costs = sc.step_costs(curve, 1)
    steps = stats.counters.forwards - 1  # the prefill is not a step
    assert sum(len(t) for t in costs.times.values()) == steps > 0
    taken = {(K, len(lv)) for K, lv in zip(stats.counters.draft_lens[1:], stats.counters.levels[1:])}
    assert set(costs.times) == taken
    assert all(ms > 0 for t in costs.times.values() for ms in t)
    ar = tidar.generate(model, prompt, max_new_tokens=24, draft_len=1)
    assert torch.equal(out.sequences, ar.sequences)
    hand = _curve(lambda n: 4.0 + 0.01 * n, key="k-hand")
    set_slot_curve(model, hand)
    tidar.generate(model, prompt, max_new_tokens=8)
    assert sc.step_costs(hand, 1) is None


def test_sampled_plans_keep_fixed_prices_so_a_seed_reproduces_its_tokens(monkeypatch):
    """Sampled tokens depend on the plans (each plan draws its own uniforms): the clock must not move them."""
    sc.clear_step_costs()
    model = tidar.patch(tiny_model("qwen2", seed=6), draft_len="auto")
    curve = _curve(lambda n: 4.0 + 0.01 * n, key="k-sampled", step_feedback=True)
    set_slot_curve(model, curve)
    prompt = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=24, temperature=0.9, seed=3)
    first = tidar.generate(model, prompt, **kw)
    assert sc._REGISTRY == {}  # a sampled request records nothing
    tidar.generate(model, prompt, max_new_tokens=24)  # greedy requests fill the process's clock ...
    costs = sc.step_costs(curve, 1)
    for key in list(costs.times) + [(1, 0), (2, 2), (4, 4), (8, 0)]:
        for _ in range(sc.MIN_SAMPLES):
            costs.add(key, 1000.0 * key[0])  # ... with prices far from the curve's
    assert torch.equal(tidar.generate(model, prompt, **kw).sequences, first.sequences)
