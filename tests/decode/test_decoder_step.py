"""The public decode step (``tidar.Decoder``: ``prefill`` / ``plan`` / ``step``, typed results) and
``tidar.generate(..., stats=...)``: stepping by hand is ``generate`` token for token (greedy, sampled, ragged, auto
K, context drafts); the results say what each step verified, accepted and emitted; counters sum over calls and stay
apart from the planner's evidence; the module's usage example runs as written."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode import decoder as decoder_module
from tidar.decode import slot_timing
from tidar.decode.slot_timing import SlotCurve, set_slot_curve

pytestmark = pytest.mark.usefixtures("module_one_thread", "own_curves")


@pytest.fixture
def own_curves(monkeypatch):
    """The synthetic slot curves set here stay out of the process-wide table other tests measure into."""
    monkeypatch.setattr(slot_timing, "_CURVES", dict(slot_timing._CURVES))


def _flat_curve():
    """Every token slot free, host costs known (nothing measured): auto drafts long, deterministically."""
    grid = [1, 2, 4, 8, 16, 32, 64, 128, 272]
    return SlotCurve(grid, [5.0] * len(grid), 0.0, "cpu", "float32", host_measured=True)


def _by_hand(model, ids, **kw):
    """``generate`` by hand through the public step; checks every typed result on the way."""
    dec = tidar.Decoder(model, ids, **kw)
    first = dec.prefill()
    assert isinstance(first, tidar.Prefilled) and len(first.tokens) == ids.shape[0]
    assert [o[0] for o in dec.out] == first.tokens and first.forwards in (1, 2)
    emitted = [[t] for t in first.tokens]
    while not dec.finished:
        planned = dec.plan()
        assert isinstance(planned, tidar.PlannedStep)
        assert tuple(planned.tokens.shape) == (ids.shape[0], planned.draft_len)
        res = dec.step(planned)
        assert isinstance(res, tidar.StepResult) and res.planned is planned
        for b in range(ids.shape[0]):
            src, n = res.sources[b], res.drafted[b]
            assert src in ("diffusion", "context", "none") and 0 <= n < res.draft_len
            assert len(res.drafts[b]) == n and res.accepted[b] <= max(n, res.draft_len - 1)
            assert len(res.emitted[b]) <= res.accepted[b] + 1  # accepted drafts and one more, cut at a stop
            emitted[b] += res.emitted[b]
    out = dec.output()
    assert emitted == out.new_tokens
    return out, dec


def _same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert a.forwards == b.forwards and a.accepted_histogram == b.accepted_histogram
    assert a.draft_lens == b.draft_lens and a.levels == b.levels
    assert a.draft_sources == b.draft_sources and a.draft_events == b.draft_events
    assert a.tokens_per_forward == b.tokens_per_forward


@pytest.mark.parametrize(
    "kw",
    [
        dict(draft_len=4),
        dict(draft_len=6, proposal_levels=(1, 3)),
        dict(draft_len="auto"),
        dict(draft_len=4, temperature=0.9, seed=3),
        dict(draft_len="auto", temperature=0.8, top_p=0.9, seed=5),
    ],
)
def test_stepping_by_hand_is_generate(kw):
    model = tidar.patch(tiny_model("qwen2"))
    set_slot_curve(model, _flat_curve())
    ids = torch.tensor([[0, 0, 7, 8, 9, 7, 8, 9, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    want = tidar.generate(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], **kw)
    got, dec = _by_hand(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], **kw)
    _same(got, want)
    assert dec.counters.forwards == got.forwards and dec.counters.new_tokens == sum(map(len, got.new_tokens))
    assert dec.counters.steps == len(got.draft_lens) - 1


def test_greedy_steps_equal_hf_and_report_context_drafts():
    model = tiny_model("llama")
    ids = torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9]])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30)
    tidar.patch(model, draft_len=6)
    out, dec = _by_hand(model, ids, max_new_tokens=30)
    assert torch.equal(out.sequences, want)
    assert dec.counters.draft_sources["context"] > 0 and dec.counters.accepted("context") > 0
    assert dec.counters.drafts() == sum(n for _, n, _ in out.draft_events)


def test_a_trial_step_is_repeatable_and_commits_nothing():
    model = tidar.patch(tiny_model("qwen2"), draft_len=4)
    dec = tidar.Decoder(model, torch.tensor([[3, 4, 5, 6, 7]]), max_new_tokens=12, context_drafts=False)
    dec.prefill()
    planned = dec.plan()
    before = (list(dec.out[0]), dec.cache.lengths, dec.counters.new_tokens)
    a, b = dec.step(planned, commit=False), dec.step(planned, commit=False)
    assert (a.accepted, a.emitted) == (b.accepted, b.emitted)
    assert (list(dec.out[0]), dec.cache.lengths, dec.counters.new_tokens) == before
    real = dec.step(planned)
    assert (real.accepted, real.emitted) == (a.accepted, a.emitted)
    assert dec.out[0] == before[0] + real.emitted[0]


def test_steps_out_of_order_are_refused():
    model = tidar.patch(tiny_model("qwen2"), draft_len=3)
    dec = tidar.Decoder(model, torch.tensor([[3, 4, 5]]), max_new_tokens=12)
    with pytest.raises(RuntimeError, match="prefill"):
        dec.plan()
    with pytest.raises(RuntimeError, match="prefill"):
        dec.output()
    dec.prefill()
    with pytest.raises(RuntimeError, match="once"):
        dec.prefill()
    stale = dec.plan()
    dec.step()  # plans and runs the next step itself
    with pytest.raises(ValueError, match="PlannedStep"):
        dec.step(stale)
    while not dec.finished:
        dec.step()
    with pytest.raises(RuntimeError, match="finished"):
        dec.step()


def test_decoder_checks_its_arguments_as_generate_does_before_any_forward():
    model = tidar.patch(tiny_model("qwen2"))
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[1, 2, 3]])
    for kw, err in [
        (dict(max_new_tokens=0), ValueError),
        (dict(draft_len=0), ValueError),
        (dict(temperature=-1.0), ValueError),
        (dict(seed=1.5), TypeError),
    ]:
        with pytest.raises(err) as a:
            tidar.Decoder(model, ids, **kw)
        with pytest.raises(err) as b:
            tidar.generate(model, ids, **kw)
        assert str(a.value) == str(b.value)
    with pytest.raises(TypeError, match="stats must be None or a tidar.DecodeStats"):
        tidar.generate(model, ids, stats={})
    handle.remove()
    assert not calls


def test_stats_sum_counters_over_calls_and_keep_the_last_requests_evidence():
    model = tidar.patch(tiny_model("qwen2"), draft_len=5)
    stats = tidar.DecodeStats()
    assert stats.evidence is None and stats.counters.requests == 0
    a = tidar.generate(model, torch.tensor([[7, 8, 9, 7, 8, 9, 7]]), max_new_tokens=20, stats=stats)
    first = stats.evidence
    b = tidar.generate(model, torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), max_new_tokens=16, stats=stats)
    c = stats.counters
    assert c.requests == 2 and c.forwards == a.forwards + b.forwards
    assert c.new_tokens == sum(map(len, a.new_tokens + b.new_tokens))
    assert c.draft_lens == a.draft_lens + b.draft_lens and c.steps == len(c.draft_lens) - 2
    assert c.events == a.draft_events + b.draft_events
    hist = dict(a.accepted_histogram)
    for k, v in b.accepted_histogram.items():
        hist[k] = hist.get(k, 0) + v
    assert dict(c.accepted_histogram) == hist
    for src in ("diffusion", "context"):
        depth = c.acceptance_by_depth()[src]
        assert depth.trials[1] == sum(1 for s, n, _ in c.events if s == src and n > 0)
        assert c.accepted(src) == sum(x for s, _, x in c.events if s == src)
    # the evidence is policy, per request (from the priors each call): the second call's, two rows
    assert isinstance(stats.evidence, tidar.AcceptanceEvidence) and stats.evidence is not first
    assert len(stats.evidence.rows) == 2 and len(first.rows) == 1
    again = tidar.generate(model, torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), max_new_tokens=16)
    assert torch.equal(again.sequences, b.sequences) and again.draft_lens == b.draft_lens  # nothing carried over


def test_public_names():
    for name in ("Decoder", "DecodeStats", "DecodeCounters", "AcceptanceEvidence", "Prefilled", "PlannedStep"):
        assert name in tidar.__all__ and getattr(tidar, name) is not None
    assert "StepResult" in tidar.__all__


def test_the_module_docstring_example_runs(capsys):
    doc = decoder_module.__doc__
    start = doc.index("    import torch, transformers, tidar")
    code = textwrap.dedent(doc[start:])
    exec(compile(code, "tidar.decode.decoder docstring", "exec"), {})
    assert capsys.readouterr().out.strip()
