"""Per-request, per-row planning (issue 19): evidence starts from the priors on every call, adapts within a few
steps (a loop raises K at once, a miss lowers it), rows are planned on their own evidence, a batch step costs the
slot curve at all rows' tokens, and context drafts ride loops in generated text. Output stays exact throughout."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode.context_drafts import NgramIndex
from tidar.decode.planner import MAX_AUTO_DRAFT_LEN, Plan, Planner, match_expected, new_row_stats, new_stats
from tidar.decode.slot_timing import SlotCurve, set_slot_curve

CPU_LIKE = [1, 2, 4, 8, 16, 32, 64, 128, 272]  # free slots up to a few tokens, then linear: the measured CPU shape


def _curve(fn, **extra):
    return SlotCurve(CPU_LIKE, [fn(n) for n in CPU_LIKE], 0.01, "cpu", "float32", host_measured=True, **extra)


CPU = _curve(lambda n: max(4.0, 3.6 + 0.07 * n))


def _row(stats, nd=0, nc=MAX_AUTO_DRAFT_LEN - 1, match=0, remaining=100):
    return (nd, nc, stats, match, remaining)


def test_a_loop_raises_k_within_a_few_steps_and_a_miss_lowers_it():
    planner = Planner(CPU, new_stats())
    row = new_row_stats(1)[0]
    start = planner.choose([_row(row)], MAX_AUTO_DRAFT_LEN)
    for _ in range(3):  # three context drafts accepted in full: the text loops
        row["context"].update(MAX_AUTO_DRAFT_LEN - 1, MAX_AUTO_DRAFT_LEN - 1)
    looped = planner.choose([_row(row)], MAX_AUTO_DRAFT_LEN)
    assert looped.draft_len >= 12 and looped.draft_len > start.draft_len
    before = row["context"].expected(MAX_AUTO_DRAFT_LEN - 1)
    row["context"].update(MAX_AUTO_DRAFT_LEN - 1, 0)  # a miss at the first draft halves the expectation at once
    assert row["context"].expected(MAX_AUTO_DRAFT_LEN - 1) < 0.6 * before
    for _ in range(3):  # three more: K falls (a miss costs little on a CPU, where 16 slots cost ~1.2 of one)
        row["context"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
    assert planner.choose([_row(row)], MAX_AUTO_DRAFT_LEN).draft_len <= 8


def test_a_long_match_is_evidence_before_any_step_tried_the_copy():
    row = new_row_stats(1)[0]
    planner = Planner(CPU, new_stats())
    short = planner.choose([_row(row, match=1)], MAX_AUTO_DRAFT_LEN)
    long = planner.choose([_row(row, match=48)], MAX_AUTO_DRAFT_LEN)
    assert long.draft_len > short.draft_len and long.draft_len >= 12
    assert match_expected(0, 10) == 0.0 and match_expected(4, 10) < match_expected(40, 10) < 10
    sampled = Planner(CPU, new_stats(), sampling=True)  # a loop predicts the argmax, not a sample
    assert sampled.choose([_row(row, match=48)], MAX_AUTO_DRAFT_LEN).draft_len < long.draft_len


def test_rows_are_planned_on_their_own_evidence_and_a_batch_costs_all_its_tokens():
    looping, plain = new_row_stats(2)
    for _ in range(3):
        looping["context"].update(MAX_AUTO_DRAFT_LEN - 1, MAX_AUTO_DRAFT_LEN - 1)
    for _ in range(3):
        plain["context"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
        plain["diffusion"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
    one = Planner(CPU, new_stats(), batch=1)
    assert one.choose([_row(looping)], MAX_AUTO_DRAFT_LEN).draft_len >= 12
    # a batch of 16 finishes with its slowest row: a row that accepts nothing keeps the whole batch at AR steps,
    # since 16 rows x K tokens cost far more than 16 tokens
    sixteen = Planner(CPU, new_stats(), batch=16)
    assert sixteen.choose([_row(looping)] * 15 + [_row(plain)], MAX_AUTO_DRAFT_LEN) == Plan(1, ())
    assert sixteen.cost(8, ()) > 2 * sixteen.cost(1, ())
    # ... while rows that all loop (their copies accepted, their text repeating) draft long together
    assert sixteen.choose([_row(looping, match=48)] * 16, MAX_AUTO_DRAFT_LEN).draft_len >= 4
    # untried rows with 1-token matches: at batch 1 the prior makes the copy worth a try (a few free slots), at
    # batch 16 it is no evidence (16 rows x K tokens)
    untried = new_row_stats(16)
    assert Planner(CPU, new_stats()).choose([_row(untried[0], match=1)], MAX_AUTO_DRAFT_LEN).draft_len > 1
    assert Planner(CPU, new_stats(), batch=16).choose([_row(r, match=1) for r in untried], 16) == Plan(1, ())


def test_batch_cost_counts_head_calls_host_work_and_sampling():
    c = _curve(lambda n: 4.0, head_ms_call=0.5, host_ms_step=0.25, host_ms_row=0.1, sample_ms_step=1.0)
    assert c.batch_step(4, 2, 2, 2) == 4.0 + 0.01 * 8 + 1.0 + 0.25 + 0.4
    assert c.sampled_step(1, 4, 4) > c.sampled_step(1, 4, 0) > c.batch_step(1, 4, 4, 1)
    # a sampled plain AR step has its own (measured) cost: drafted sampled steps pay rejection sampling on top
    s = _curve(lambda n: 4.0, sample_ms_ar=0.2, sample_ms_step=3.0, sample_ms_row=0.1)
    assert s.sampled_step(1, 1, 0) == pytest.approx(4.0 + 0.01 + 0.2)
    assert s.sampled_step(1, 2, 2) == pytest.approx(4.0 + 0.06 + 3.0 + 0.6)
    assert Planner(s, new_stats(), sampling=True).choose(
        [_row(new_row_stats(1)[0], nd=1, nc=0)], MAX_AUTO_DRAFT_LEN
    ) == Plan(1, ())


def test_a_batch_measured_on_its_own_replaces_the_per_row_line():
    """A batch over 4 is priced with the host work measured at that batch (the line through batch 1 and 4 overstated
    batch 16 twofold); other batches keep the line; a curve read back from JSON (string keys) keeps it."""
    c = _curve(lambda n: 4.0, host_ms_step=0.25, host_ms_row=0.5, host_ms_batch={16: 2.0})
    assert c.batch_step(16, 1, 1, 1) == c.device_step(16, 1, 1, 1) + 2.0
    assert c.batch_step(8, 1, 1, 1) == c.device_step(8, 1, 1, 1) + 0.25 + 0.5 * 8
    assert SlotCurve(**{**c.__dict__, "host_ms_batch": {"16": 2.0}}).host_ms(16) == 2.0


def test_a_batch_is_scored_by_its_pacing_row_with_the_same_choice(monkeypatch):
    """A row with no drafts and the most tokens left paces every plan: scoring it alone picks what all rows pick."""
    import tidar.decode.planner as planner_mod

    flat = _curve(lambda n: 4.0 + 0.002 * n)  # nearly free slots: drafted plans win often enough to compare
    gen = torch.Generator().manual_seed(0)
    chosen = set()
    for trial in range(40):
        rows_st = new_row_stats(6)
        for st in rows_st[:3]:  # some rows with evidence of looping context
            st["context"].update(MAX_AUTO_DRAFT_LEN - 1, int(torch.randint(0, MAX_AUTO_DRAFT_LEN, (1,), generator=gen)))
        rows = []
        for b, st in enumerate(rows_st):
            nd, nc = (int(x) for x in torch.randint(0, MAX_AUTO_DRAFT_LEN, (2,), generator=gen))
            match = int(torch.randint(0, 20, (1,), generator=gen))
            rows.append(_row(st, nd=nd, nc=nc, match=match, remaining=90 + b % 2 * 10))
        rows[trial % 6] = _row(rows_st[trial % 6], nd=0, nc=0, remaining=100 if trial % 3 else 90)
        for curve, batch in ((CPU, 4), (CPU, 16), (flat, 2), (flat, 6)):
            fast = Planner(curve, new_stats(), batch=batch).choose(rows, MAX_AUTO_DRAFT_LEN)
            with monkeypatch.context() as m:
                m.setattr(planner_mod, "_pacing_rows", lambda rs: rs)
                full = Planner(curve, new_stats(), batch=batch).choose(rows, MAX_AUTO_DRAFT_LEN)
            assert fast == full, (trial, batch)
            chosen.add(fast)
    assert len(chosen) > 1, chosen  # not only plain AR steps


def test_ngram_match_length_and_periodic_drafts():
    idx = NgramIndex([5, 6, 7] * 6)
    drafts, match = idx.match(7)
    assert drafts == [5, 6, 7, 5, 6, 7, 5] and match >= 12
    idx = NgramIndex([1, 2, 3, 9, 8, 2, 3])
    drafts, match = idx.match(3)
    assert drafts[0] == 9 and match == 2
    assert NgramIndex([1, 2, 3]).match(4) == ([], 0)


def test_one_requests_statistics_do_not_reach_the_next():
    """The same prompt decodes with the same plans (and tokens) whatever the model decoded before."""
    torch.manual_seed(0)
    model = tidar.patch(tiny_model("qwen2"))
    set_slot_curve(model, CPU)
    a = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    first = tidar.generate(model, a, max_new_tokens=24)
    for p in ([[9, 10, 11, 12, 13]], [[3, 3, 3, 3, 3, 3]], [[40, 41, 42, 40, 41, 42, 40]]):
        for _ in range(2):
            tidar.generate(model, torch.tensor(p), max_new_tokens=24)
    again = tidar.generate(model, a, max_new_tokens=24)
    assert again.draft_lens == first.draft_lens and again.levels == first.levels
    assert torch.equal(again.sequences, first.sequences)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = tidar.generate(model, a, max_new_tokens=16, temperature=0.9, generator=g1)
    tidar.generate(model, torch.tensor([[9, 10, 11]]), max_new_tokens=16, temperature=0.9)
    s2 = tidar.generate(model, a, max_new_tokens=16, temperature=0.9, generator=g2)
    assert torch.equal(s1.sequences, s2.sequences)


def test_context_drafts_ride_a_loop_in_generated_text_exactly():
    """A model that loops (forced by a hook on the logits): context drafts take the loop at long K, and the output
    equals HF greedy."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    period = [30, 31, 32, 33, 34]

    def loop(module, args, kwargs, output):  # the argmax of every row: the next token of the period
        ids = kwargs.get("input_ids", args[0] if args else None)[:, -output.logits.shape[1] :]
        nxt = torch.tensor(period)[
            (torch.tensor([[period.index(t) if t in period else 0 for t in r] for r in ids.tolist()]) + 1) % 5
        ]
        output.logits[:] += 50.0 * torch.nn.functional.one_hot(nxt, output.logits.shape[-1])
        return output

    h = model.register_forward_hook(loop, with_kwargs=True)
    try:
        ids = torch.tensor([[7, 8, 30, 31, 32]])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=60)
        tidar.patch(model)
        set_slot_curve(model, CPU)
        out = tidar.generate(model, ids, max_new_tokens=60, full_logits=True)
    finally:
        h.remove()
    assert torch.equal(out.sequences, want)
    assert out.draft_sources.get("context", 0) >= 3 and max(out.draft_lens) >= 12
    assert out.tokens_per_forward > 5


def test_ragged_prefill_is_two_batched_forwards_and_exact():
    """Prompts of different lengths prefill in two forwards (the right-padded prompts, then every row's block of
    masks at its own seg_start), not one per row; the tokens equal HF greedy on the left-padded batch."""
    from tidar_kernels import layouts

    lay = layouts.mask_block(3)
    assert lay.local_limit.tolist() == [0, 0, 0] and lay.block_id.tolist() == [0, 0, 0]
    assert lay.position_ids.tolist() == [0, 1, 2]
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20]]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    want1 = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1)
    want20 = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    tidar.patch(model, draft_len=4)
    prefilled = tidar.Decoder(model, ids, attention_mask=mask, max_new_tokens=20).prefill()
    assert prefilled.draft_len == 4 and prefilled.forwards == 2  # the prompts, then every row's block of 4 masks
    out = tidar.generate(model, ids, attention_mask=mask, max_new_tokens=1)  # K = 1: no mask block at all
    assert out.forwards == 1 and torch.equal(out.sequences, want1)
    assert torch.equal(tidar.generate(model, ids, attention_mask=mask, max_new_tokens=20).sequences, want20)


def test_an_ar_run_is_not_rescored_every_step_but_a_growing_match_is_weighed_within_a_few():
    """Host time: in a run of AR steps on unchanged evidence the planner reuses its verdict; a context match that
    keeps growing (a loop setting in) is re-scored within AR_RESCORE steps and then drafts."""
    planner = Planner(CPU, new_stats(), batch=16)
    rows = new_row_stats(16)
    for r in rows:  # nothing has ever been accepted: AR pays best
        r["diffusion"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
        r["context"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
    calls = []
    orig = planner._row_tables
    planner._row_tables = lambda *a: calls.append(1) or orig(*a)
    quiet = [(0, 0, r, 0, 50) for r in rows]
    assert planner.choose(quiet, MAX_AUTO_DRAFT_LEN) == Plan(1, ())
    n = len(calls)
    for _ in range(5):
        assert planner.choose(quiet, MAX_AUTO_DRAFT_LEN) == Plan(1, ())
    assert len(calls) == n  # reused: nothing changed
    # batch 16 as it runs: draft counts and 1-3 token matches move every step; fewer drafts and no longer match
    # reuse the verdict
    some = [(0, 3, r, 2, 50) for r in rows]
    assert planner.choose(some, MAX_AUTO_DRAFT_LEN) == Plan(1, ())
    n = len(calls)
    for step in range(8):
        fewer = [(0, (step + i) % 3, r, 1 + (step + i) % 2, 50) for i, r in enumerate(rows)]
        assert planner.choose(fewer, MAX_AUTO_DRAFT_LEN) == Plan(1, ())
    assert len(calls) == n
    fresh = new_row_stats(1)[0]  # greedy batch 1: at the prior a copy is worth ~1.5 tokens, a 3-token match less
    one = Planner(CPU, new_stats())
    assert one._match_key(fresh, 3, MAX_AUTO_DRAFT_LEN - 1) == 0
    assert one._match_key(fresh, 40, MAX_AUTO_DRAFT_LEN - 1) == 40
    assert planner._match_key(fresh, 3, MAX_AUTO_DRAFT_LEN - 1) == 3  # batched: untried evidence is no prior
    looping = [(0, MAX_AUTO_DRAFT_LEN - 1, r, 60, 50) for r in rows]  # every row's text now repeats a 60-token block
    plans = [planner.choose(looping, MAX_AUTO_DRAFT_LEN) for _ in range(Planner.AR_RESCORE + 1)]
    assert plans[-1].draft_len > 1


def _ar_only_rows(n):
    rows = new_row_stats(n)
    for r in rows:  # nothing has been accepted for a long while: AR pays best
        for _ in range(30):
            r["diffusion"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
            r["context"].update(MAX_AUTO_DRAFT_LEN - 1, 0)
    return [(0, 0, r, 0, 500) for r in rows]


def test_explorations_that_find_nothing_come_ever_more_rarely_and_a_drafted_verdict_resets_the_wait():
    """Where drafts do not pay, an AR streak explores one cheap diffusion step after EXPLORE_AFTER AR steps, then
    after twice as many each time (up to EXPLORE_MAX_AFTER); once the scoring itself picks drafts, the wait is
    EXPLORE_AFTER again."""
    rows = _ar_only_rows(1)
    planner = Planner(CPU, rows[0][2], sampling=True)  # the request's evidence: the row's
    explored = [i for i in range(600) if planner.choose(rows, MAX_AUTO_DRAFT_LEN) != Plan(1, ())]
    gaps = [b - a for a, b in zip([-1] + explored, explored)]
    first = Planner.EXPLORE_AFTER
    assert gaps[:4] == [first, 2 * first, 4 * first, 8 * first]  # the explored step ends each gap
    assert max(gaps) == Planner.EXPLORE_MAX_AFTER and len(explored) < 10  # every 16 steps: 37 explorations
    for r in rows:  # the evidence turns: long accepted runs
        for _ in range(4):
            r[2]["diffusion"].update(MAX_AUTO_DRAFT_LEN - 1, MAX_AUTO_DRAFT_LEN - 1)
    assert planner.choose(rows, MAX_AUTO_DRAFT_LEN).draft_len > 1  # scored, not explored
    assert planner.explore_after == Planner.EXPLORE_AFTER


def test_the_first_plan_of_a_batch_or_a_sampled_request_takes_drafts_only_where_they_beat_ar_by_the_margin():
    """The prefill's mask block is the first plan; where the priors' best draft plan beats AR by less than the
    planner's margin (sampling, a batch), it is K = 1: no mask block at all. Greedy batch 1 keeps drafting from
    the start (the decoder takes at least K = 2 there)."""

    def ratio(planner):  # the priors' best draft plan over AR, in tokens per ms
        best = planner.steady_plans()
        value = {K: tok / ms for K, (_, tok, ms) in best.items()}
        return max(v for K, v in value.items() if K > 1) / value[1]

    seen = set()
    for slope in [0.02 * i for i in range(1, 200)]:
        planner = Planner(_curve(lambda n, b=slope: 3.6 + b * n), new_stats(), batch=4)
        r, K0 = ratio(planner), planner.first(MAX_AUTO_DRAFT_LEN).draft_len
        if 1.0 < r < planner.margin:  # drafts win, but by less than the margin: no mask block
            assert K0 == 1, (slope, r)
            seen.add("within")
        elif r >= planner.margin:
            assert K0 > 1, (slope, r)
            seen.add("beyond")
    assert seen == {"within", "beyond"}  # the scan crossed both cases


def test_a_sampled_batch_whose_drafts_do_not_pay_prefills_without_a_mask_block_and_keeps_the_distribution():
    """End to end: with a slot curve on which drafts cannot pay, a sampled batch's prefill is the prompts' one
    forward (K0 = 1) and every token is drawn from the AR row: the first new tokens over many seeds follow the
    model's own softmax at the temperature (total variation against the exact distribution)."""
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    tidar.patch(model)
    set_slot_curve(model, _curve(lambda n: 40.0 * n))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    dec = tidar.Decoder(model, ids, max_new_tokens=8, temperature=1.0, draft_len="auto")
    pre = dec.prefill()
    assert pre.draft_len == 1 and pre.forwards == 1
    with torch.no_grad():
        target = torch.softmax(model(ids).logits[:, -1].float(), -1)
    draws = 3000
    counts = torch.zeros_like(target)
    for s in range(draws):
        out = tidar.generate(
            model, ids, max_new_tokens=1, temperature=1.0, draft_len="auto", generator=torch.Generator().manual_seed(s)
        )
        first = out.sequences[:, ids.shape[1]]
        counts[torch.arange(2), first] += 1
    tv = 0.5 * (counts / draws - target).abs().sum(-1)
    assert bool((tv < 0.08).all()), tv


def test_a_sampled_copy_is_worth_the_lesser_of_its_match_and_its_evidence():
    """Sampled, a copy is accepted with the model's probability of the copied token: high in a loop (a long match),
    low after a 1-token match. Untried evidence (the prior) alone must not make a short match a draft."""
    from tidar.decode.planner import context_expected, sampled_context_expected

    row = new_row_stats(1)[0]
    n = MAX_AUTO_DRAFT_LEN - 1
    assert context_expected(row, 1, n) > 1.0  # greedy: the prior says a copy is worth more than a token
    assert sampled_context_expected(row, 1, n) == pytest.approx(match_expected(1, n)) and match_expected(1, n) < 0.3
    assert sampled_context_expected(row, 48, n) == pytest.approx(row["context"].expected(n))  # a loop: the prior
    for _ in range(3):
        row["context"].update(n, 0)  # copies tried and refused: a long match no longer counts
    assert sampled_context_expected(row, 48, n) < 0.5
    fresh = new_row_stats(1)[0]
    curve = _curve(lambda n: 4.0 + 0.1 * n)
    short = Planner(curve, new_stats(), sampling=True).choose([_row(fresh, match=1)], MAX_AUTO_DRAFT_LEN)
    loop = Planner(curve, new_stats(), sampling=True).choose([_row(fresh, match=48)], MAX_AUTO_DRAFT_LEN)
    assert short.draft_len < loop.draft_len and loop.levels == ()  # the loop: copies, no proposal blocks


def test_a_drafted_greedy_step_pays_its_own_host_work():
    """``draft_ms_step`` (the drafts' verification, composition and the blocks' argmax, measured once) is priced on
    every drafted greedy plan and on no plain AR step; with it large enough, a row whose drafts are sometimes right
    is decoded with AR steps, where the same curve without it drafts."""
    base = _curve(lambda n: max(4.0, 3.6 + 0.07 * n), host_ms_step=0.3)
    dear = _curve(lambda n: max(4.0, 3.6 + 0.07 * n), host_ms_step=0.3, draft_ms_step=6.0)
    assert dear.greedy_step(1, 1, 0) == base.greedy_step(1, 1, 0) == base.batch_step(1, 1, 1, 1)
    assert dear.greedy_step(1, 4, 1) == pytest.approx(base.greedy_step(1, 4, 1) + 6.0)
    assert base.greedy_step(1, 4, 1) == base.batch_step(1, 8, 8, 2) and base.greedy_step(1, 4, 0) == base.batch_step(
        1, 4, 4, 1
    )
    assert Planner(dear, new_stats()).cost(4, (1,)) == pytest.approx(Planner(base, new_stats()).cost(4, (1,)) + 6.0)
    row = new_row_stats(1)[0]
    for _ in range(3):  # diffusion drafts accepted about a third of the time
        row["diffusion"].update(3, 1)
    rows = [_row(row, nd=3, nc=0)]
    assert Planner(base, new_stats()).choose(rows, MAX_AUTO_DRAFT_LEN).draft_len > 1
    assert Planner(dear, new_stats()).choose(rows, MAX_AUTO_DRAFT_LEN) == Plan(1, ())


def test_host_calibration_measures_the_drafted_greedy_steps(monkeypatch):
    """``_measure_host`` sets ``draft_ms_step`` to the median of what greedy drafted steps of fixed plans cost beyond
    the curve's price of the same plan (here timed by a stub: 1, 3 and 10 ms over the price -> 3)."""
    import tidar.decode.decoder as decoder_mod

    curve = _curve(lambda n: 4.0)
    calls = []

    def fake_step_ms(model, ids, plans, steps=12, temperature=1.0):
        calls.append(temperature)
        if temperature == 0.0:
            extra = dict(zip(plans, (1.0, 3.0, 10.0)))
            lv = {p: len(decoder_mod.levels_upto(p[0], p[1])) for p in plans}
            return [curve.greedy_step(1, K, lv[(K, levels)]) + extra[(K, levels)] for K, levels in plans]
        return [5.0 for _ in plans]

    monkeypatch.setattr(decoder_mod, "_step_ms", fake_step_ms)
    monkeypatch.setattr(decoder_mod, "_host_at", lambda model, c, B: 0.5)
    model = tidar.patch(tiny_model("qwen2", seed=3), draft_len="auto")
    decoder_mod._measure_host(model, curve)
    assert curve.draft_ms_step == pytest.approx(3.0) and calls == [0.0, 1.0]
