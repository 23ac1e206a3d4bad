"""``tidar profile``: the token-slot curve, the acceptance statistics per draft source and depth, and the plan
``draft_len="auto"`` would choose; on a tiny random model with synthetic curves (fast, deterministic choices)
and once on the bundled model through the command line (few tokens, a short grid)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from tidar.cli import main
from tidar.cli.profile import format_report, plan_table, profile_model
from tidar.decode.planner import AcceptanceStats, new_stats
from tidar.decode.slot_timing import GRID, SlotCurve


def _curve(fn, head=0.0):
    """A synthetic curve whose host terms (zero) count as measured: the planner's choices then follow the curve
    alone, whatever the machine's load (``generate`` would otherwise time its host work and add it)."""
    return SlotCurve(list(GRID), [float(fn(n)) for n in GRID], head, "cpu", "float32", host_measured=True)


FLAT = _curve(lambda n: 10.0)  # every token slot free: the longest drafts pay
STEEP = _curve(lambda n: 10.0 * n)  # every token costs a forward: plain AR steps pay


def _stats(alpha):
    stats = new_stats()
    stats["diffusion"] = AcceptanceStats(prior=alpha, weight=1e6)  # the prior alone decides
    return stats


def test_plan_table_picks_long_k_on_a_flat_curve_and_ar_on_a_steep_one():
    flat = plan_table(FLAT, _stats(0.9))
    assert flat["choice"]["draft_len"] == 16
    assert flat["choice"]["tokens_per_s"] == max(p["tokens_per_s"] for p in flat["plans"])
    assert flat["choice"]["x_ar"] > 5  # 1 + 0.9 + 0.81 + ... tokens per step at the cost of one
    steep = plan_table(STEEP, _stats(0.9))
    assert steep["choice"]["draft_len"] == 1 and steep["choice"]["levels"] == []
    assert steep["choice"]["x_ar"] == pytest.approx(1.0)
    ar = [p for p in steep["plans"] if p["draft_len"] == 1][0]
    assert ar["seg_len"] == 1 and ar["tokens_per_step"] == 1.0
    assert steep["ar"]["step_ms"] == pytest.approx(10.0)
    # a poor drafter on a flat curve still drafts (free slots), but expects little
    poor = plan_table(FLAT, _stats(0.05))
    assert poor["choice"]["tokens_per_step"] < 1.1


def test_plan_table_respects_fixed_levels_and_max_k():
    t = plan_table(FLAT, _stats(0.9), proposal_levels=(1, 2), max_k=8)
    assert max(p["draft_len"] for p in t["plans"]) <= 8
    assert all(set(p["levels"]) <= {1, 2} for p in t["plans"])
    assert all(p["seg_len"] == p["draft_len"] * (1 + len(p["levels"])) for p in t["plans"])


def test_profile_on_a_tiny_model_reports_what_generation_did():
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13]]
    r = profile_model(model, prompts, max_new_tokens=12, curve=FLAT)
    g = r["generation"]
    assert g["prompts"] == 2 and g["new_tokens"] == sum(x["new_tokens"] for x in g["runs"]) == 24
    assert g["forwards"] == sum(x["forwards"] for x in g["runs"])
    for run in g["runs"]:  # one K per forward (the prefill's block first)
        assert len(run["draft_lens"]) == run["forwards"]
        assert sum(run["accepted_histogram"].values()) == run["forwards"] - 1
    assert sum(g["draft_lens"].values()) == g["forwards"]
    assert max(int(k) for k in g["draft_lens"]) > 1  # a flat curve: auto drafts
    assert r["curve"]["tokens"] == list(GRID) and r["curve"]["body_ms"] == FLAT.body_ms
    acc = r["acceptance"]
    assert set(acc) == {"diffusion", "context"}
    used = [s for s in acc if acc[s]["depths"]]
    assert used, acc  # some drafts were verified
    for s in used:
        d = acc[s]["depths"]
        assert [x["depth"] for x in d] == list(range(1, len(d) + 1))
        assert d[0]["trials"] > 0
        assert all(0.0 <= x["alpha"] <= 1.0 for x in d)
        assert all(x["rate"] is None or 0.0 <= x["rate"] <= 1.0 for x in d)
        trials = [x["trials"] for x in d]
        assert trials == sorted(trials, reverse=True)  # depth i is tried only after 1..i-1 were accepted
    src_steps = sum(g["draft_sources"].values())
    assert src_steps == g["forwards"] - g["prompts"]  # one source per (row, step)
    text = format_report(r)
    assert "token-slot curve" in text and "auto would choose" in text and "diffusion" in text
    from tidar.hf import cpu_packed

    body = "direct (qwen2)" + (", packed CPU projections" if cpu_packed.enabled() else "")
    assert r["decoder_body"] == body and f"decoder body: {body}" in text


def test_profile_fixed_k_and_bad_arguments():
    model = tiny_model("llama")
    r = profile_model(model, [[3, 4, 5, 6]], max_new_tokens=6, draft_len=4, context_drafts=False, curve=STEEP)
    assert set(r["generation"]["draft_lens"]) <= {"1", "2", "3", "4"}
    assert "context" not in r["generation"]["draft_sources"]
    assert r["auto"]["choice"]["draft_len"] == 1  # a steep curve: auto would decode plain AR steps
    with pytest.raises(ValueError, match="max_new_tokens"):
        profile_model(model, [[3, 4]], max_new_tokens=0, curve=STEEP)
    with pytest.raises(ValueError, match="prompts"):
        profile_model(model, [], curve=STEEP)
    with pytest.raises(ValueError, match="prompts"):
        profile_model(model, [[]], curve=STEEP)


def test_cli_on_the_bundled_model(capsys):
    rc = main(
        [
            "profile",
            "--device",
            "cpu",
            "--json",
            "--grid",
            "1,2,4",
            "--max-new-tokens",
            "6",
            "--prompt",
            "def add(a, b):\n",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["curve"]["tokens"] == [1, 2, 4] and all(ms > 0 for ms in out["curve"]["body_ms"])
    assert out["curve"]["body_ms"] == sorted(out["curve"]["body_ms"])
    assert out["generation"]["new_tokens"] == 6 and out["generation"]["draft_len"] == "auto"
    assert out["auto"]["choice"]["draft_len"] in {p["draft_len"] for p in out["auto"]["plans"]}
    assert out["model_dir"].endswith("tidar-python-tiny")


@pytest.mark.parametrize(
    "argv, what",
    [
        (["--draft-len", "0"], "--draft-len"),
        (["--draft-len", "big"], "--draft-len"),
        (["--grid", "1,x"], "--grid"),
        (["--grid", "0,4"], "--grid"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--model", "/nonexistent/tidar-model"], "does not exist"),
    ],
)
def test_cli_bad_inputs(argv, what, capsys):
    assert main(["profile", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert "tidar profile: error:" in err and what in err
