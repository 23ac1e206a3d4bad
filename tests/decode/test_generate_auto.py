"""draft_len="auto", the token-slot curve, sparse proposal levels, context drafts and the LM head on needed rows:
every option keeps greedy TiDAR equal to HF greedy, and auto's choices follow the measured costs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode.context_drafts import NgramIndex
from tidar.decode.planner import AcceptanceStats, Plan, Planner, new_stats, steady_tokens
from tidar.decode.slot_timing import SlotCurve, measure_slot_curve, set_slot_curve, slot_curve


def _hf(model, ids, mask, n):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n)


def _curve(fn, head=0.0):
    """A hand-made slot curve whose prices are the whole price: no host work measured on the machine (under a loaded
    CPU the measured host cost outweighed this curve's 1 ms forward and turned batched plans into plain AR steps)."""
    grid = [1, 2, 4, 8, 16, 32, 64, 128, 272]
    return SlotCurve(grid, [fn(n) for n in grid], head, "cpu", "float32", host_measured=True)


def _stats(alpha):
    s = new_stats()
    for _ in range(400):  # a long history at acceptance rate ``alpha`` per draft
        n = 15
        k = 0
        while k < n and torch.rand(()).item() < alpha:
            k += 1
        s["diffusion"].update(n, k)
    return s


def test_slot_curve_measured_cached_and_on_disk(tmp_path):
    model = tidar.patch(tiny_model("qwen2"))
    c = measure_slot_curve(model, grid=(1, 3, 9), repeats=2)
    assert c.tokens == [1, 3, 9] and len(c.body_ms) == 3 and all(ms > 0 for ms in c.body_ms)
    assert c.body_ms == sorted(c.body_ms)  # a non-decreasing envelope
    assert c.step(5, 4) >= c.body(5) and c.body(5) >= c.body(3)
    f = tmp_path / "curves.json"
    first = slot_curve(model, refresh=True, cache_file=f)
    assert slot_curve(model) is first  # once per process
    stored = json.loads(f.read_text())
    assert first.key in stored and stored[first.key]["tokens"] == first.tokens
    assert "ms/token" in first.table()


def test_auto_picks_small_k_on_a_steep_curve_and_large_k_on_a_flat_one():
    torch.manual_seed(0)
    stats = _stats(0.8)
    flat = Planner(_curve(lambda n: 5.0), stats)
    steep = Planner(_curve(lambda n: 1.0 + 1.0 * n), stats)
    rows = [(15, 0)]
    assert flat.choose(rows, 16).draft_len >= 12
    assert steep.choose(rows, 16).draft_len <= 2
    # nothing is ever accepted and extra tokens cost: plain AR steps (K = 1, no proposal blocks)
    bad = Planner(_curve(lambda n: 1.0 + 0.5 * n), _stats(0.0))
    assert bad.choose([(15, 0)], 16) == Plan(1, ())
    # a long context match that is usually accepted raises K even on a steeper curve
    s = _stats(0.1)
    for _ in range(200):
        s["context"].update(12, 12)
    mid = Planner(_curve(lambda n: 4.0 + 0.1 * n), s)
    assert mid.choose([(3, 12)], 16).draft_len >= 8


def test_steady_tokens_and_levels():
    s = AcceptanceStats(prior=1.0, weight=1.0)  # every draft accepted
    assert steady_tokens(Plan(4, (1, 2, 3, 4)), s) == pytest.approx(4.0)
    assert steady_tokens(Plan(1, ()), s) == pytest.approx(1.0)
    # only level 1: after accepting all 4 the next step gets K-1-(4-1) = 0 diffusion drafts
    assert steady_tokens(Plan(4, (1,)), s) < 4.0
    assert Plan(4, (1, 3)).next_diffusion_drafts(2) == 2 and Plan(4, (2,)).next_diffusion_drafts(1) == 0


def test_ngram_index():
    ix = NgramIndex([1, 2, 3, 4, 1, 2])
    assert ix.lookup(5) == [3, 4, 1, 2, 3]  # after the earlier "1 2", continued with the period 4
    ix.extend([9])
    assert ix.lookup(3) == []  # "9" never occurred before
    ix.extend([1, 2, 3])
    assert ix.lookup(2) == [4, 1]  # longest match "1 2 3" -> its continuation
    loop = NgramIndex([5, 6, 7, 8, 6, 7, 6, 7])
    assert loop.lookup(6) == [6, 7, 6, 7, 6, 7]  # a 2-token loop predicts itself


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_auto_greedy_equals_hf_batch_and_reports_its_choices(arch):
    model = tiny_model(arch)
    rows = [[5, 9, 13, 2, 7, 5, 9, 13], [40, 3, 40, 3, 40]]
    P = max(map(len, rows))
    ids = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    want = _hf(model, ids, mask, 40)
    set_slot_curve(tidar.patch(model), _curve(lambda n: 1.0 + 0.02 * n))
    out = tidar.generate(model, ids, attention_mask=mask, max_new_tokens=40)
    assert torch.equal(out.sequences, want)
    # ragged prompts: the prefill is two forwards (the prompts, then their mask blocks), one where its K is 1 (no block)
    prefill_forwards = 2 if out.draft_lens[0] > 1 else 1
    assert len(out.draft_lens) == len(out.levels) == out.forwards - prefill_forwards + 1
    assert len(set(out.draft_lens)) >= 2, out.draft_lens  # re-chosen as generation goes on (and shrunk at the end)
    assert sum(out.draft_sources.values()) > 0
    tidar.unpatch(model)


def test_context_drafts_are_used_and_exact_on_repetitive_text():
    model = tiny_model("qwen2")
    ids = torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9]])
    want = _hf(model, ids, torch.ones_like(ids), 30)
    tidar.patch(model, draft_len=6)
    on = tidar.generate(model, ids, max_new_tokens=30)
    off = tidar.generate(model, ids, max_new_tokens=30, context_drafts=False)
    assert torch.equal(on.sequences, want) and torch.equal(off.sequences, want)
    assert on.draft_sources.get("context", 0) > 0 and "context" not in off.draft_sources
    tidar.unpatch(model)


@pytest.mark.parametrize("K,levels", [(4, (1,)), (5, (2, 4)), (3, None)])
def test_lm_head_on_needed_rows_equals_full_logits(K, levels):
    model = tiny_model("qwen3")
    torch.manual_seed(3)
    ids = torch.randint(1, 96, (2, 6))
    want = _hf(model, ids, torch.ones_like(ids), 24)
    tidar.patch(model, draft_len=K, proposal_levels=levels)
    lean = tidar.generate(model, ids, max_new_tokens=24)
    full = tidar.generate(model, ids, max_new_tokens=24, full_logits=True)
    assert torch.equal(lean.sequences, want) and torch.equal(full.sequences, want)
    assert lean.accepted_histogram == full.accepted_histogram
    tidar.unpatch(model)


def test_lm_head_in_one_call_or_two_gives_the_same_steps(monkeypatch):
    """A small greedy step takes the LM head on all its rows in one call; a large one on the K verification
    rows, then on the K rows of the block used; a CPU decides the acceptance on the host, a GPU on the device:
    all four give the same tokens, drafts and acceptances."""
    from tidar.decode import forwards as gen

    model = tiny_model("qwen2")
    torch.manual_seed(4)
    ids = torch.randint(1, 96, (2, 5))
    want = _hf(model, ids, torch.ones_like(ids), 20)
    tidar.patch(model, draft_len=3)
    for K, levels in ((3, None), (4, (1, 3)), (2, (2,))):
        runs = []
        for rows in (0, 10**6):  # never / always one call
            for host in ({"cpu"}, set()):  # acceptance on the host (CPU) / on the device (device_step, GPU path)
                monkeypatch.setattr(gen, "ONE_HEAD_CALL_ROWS", {"cpu": rows})
                monkeypatch.setattr(gen, "HOST_VERIFY", host)
                kw = dict(draft_len=K, proposal_levels=levels, context_drafts=False)
                runs.append(tidar.generate(model, ids, max_new_tokens=20, **kw))
        assert all(torch.equal(r.sequences, want) for r in runs), (K, levels)
        assert all(r.accepted_histogram == runs[0].accepted_histogram for r in runs), (K, levels)
        assert all(r.draft_lens == runs[0].draft_lens for r in runs), (K, levels)
        assert runs[0].accepted_histogram != {1: sum(runs[0].accepted_histogram.values())}  # drafts were accepted
    tidar.unpatch(model)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 5), (3, 4), (2, 1), (0, 3)])
def test_output_head_cpu_paths_equal_the_linear_and_follow_weight_updates(shape):
    """On a CPU the head multiplies one row by a contiguous copy of W^T and several rows as W @ h^T transposed back:
    both equal the Linear, return a contiguous ``[..., V]``, and follow the weight when it changes in place (an
    optimizer step) or is replaced."""
    from tidar.hf.lm_head import OutputHead

    model = tiny_model("qwen2")
    head = OutputHead(model)
    h = torch.randn(*shape, model.config.hidden_size)
    with torch.no_grad():
        for change in (None, "in place", "replaced"):
            if change == "in place":
                model.lm_head.weight.mul_(1.5)  # as an optimizer step
            elif change == "replaced":
                model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
            got, want = head(h), model.lm_head(h)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if h.numel() == 0:
        return
    out = head(h)  # with grad enabled: the module itself (gradients reach the weight)
    out.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_near_max_position_embeddings_k_shrinks():
    model = tiny_model("qwen2", max_pos=40)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    want = _hf(model, ids, torch.ones_like(ids), 31)  # ends at position 39 = max_pos - 1
    tidar.patch(model, draft_len=6)
    out = tidar.generate(model, ids, max_new_tokens=31)
    assert torch.equal(out.sequences, want)
    assert min(out.draft_lens) < 6
    tidar.unpatch(model)


BAD = [
    (dict(draft_len=0), "draft_len"),
    (dict(draft_len="fast"), "draft_len"),
    (dict(draft_len=2.0), "draft_len"),
    (dict(draft_len=True), "draft_len"),
    (dict(draft_len=4, proposal_levels=[]), "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[2, 1]), "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[1, 1]), "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[0]), "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[5]), "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[1.0]), "proposal_levels"),
    (dict(draft_len=4, proposal_levels="12"), "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[True]), "proposal_levels"),
    (dict(context_drafts="yes"), "context_drafts"),
    (dict(full_logits=1), "full_logits"),
]


@pytest.mark.parametrize("kw,name", BAD)
def test_bad_decoding_options_fail_before_any_forward(kw, name):
    model = tidar.patch(tiny_model("qwen2"))
    calls = []
    h = model.register_forward_pre_hook(lambda *a: calls.append(1))
    hb = model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=name):
        tidar.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, **kw)
    h.remove()
    hb.remove()
    assert not calls
    if "context_drafts" not in kw and "full_logits" not in kw:
        with pytest.raises(ValueError, match=name.replace("proposal_levels", "proposal_levels|levels")):
            tidar.patch(model, **kw)


def test_model_without_output_embeddings_is_refused():
    from tidar.hf.lm_head import OutputHead

    model = tiny_model("qwen2")
    model.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="output embeddings"):
        OutputHead(model)
