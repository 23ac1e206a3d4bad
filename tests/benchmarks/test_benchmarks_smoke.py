"""The benchmarks still run: ``python -m benchmarks --smoke`` on CPU writes a CSV and a markdown table with
rows for every op, every skipped row says why, and nothing failed. Plus the pieces a wrong number would
hide behind: FlexAttention block tables from the layout vectors against the dense twin."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # a guard against a hang, not a speed test: a loaded 2-core machine took over 300 s
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows, proc.stdout


def test_outputs_exist(smoke):
    out, rows, _ = smoke
    assert (out / "results.md").read_text().startswith("# tidar-kernels benchmarks")
    assert (out / "env.json").exists()
    assert rows


def test_every_op_has_timed_rows(smoke):
    _, rows, _ = smoke
    suites = {"ceilings", "attention_train", "attention_step", "rejection", "kv_append", "e2e_forward", "e2e_step"}
    for suite in suites:
        ok = [r for r in rows if r["suite"] == suite and r["status"] == "ok"]
        assert ok, f"no timed row in {suite}"
        assert all(float(r["ms"]) > 0 and float(r["p20_ms"]) <= float(r["ms"]) <= float(r["p80_ms"]) for r in ok)
    for suite in ("attention_train", "attention_step", "rejection", "kv_append", "e2e_step"):
        assert any(r["impl"].startswith("ours:") and r["status"] == "ok" for r in rows if r["suite"] == suite), suite


def test_rows_carry_provenance(smoke):
    _, rows, _ = smoke
    for r in rows:
        for col in ("device", "gpu", "torch", "triton", "cuda", "git_sha", "date"):
            assert r[col], (col, r)


def test_skips_say_why_and_nothing_failed(smoke):
    _, rows, _ = smoke
    errors = [(r["suite"], r["case"], r["impl"], r["reason"]) for r in rows if r["status"] == "error"]
    assert not errors, errors
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(len(r["reason"]) > 10 for r in skipped), [r for r in skipped if len(r["reason"]) <= 10]
    # a backend that is not live is reported as skipped, never silently dropped
    import tidar_kernels

    live = tidar_kernels.live_backends("cpu")["tidar_attention"]
    for b in ("triton", "cuda"):
        if b not in live:
            assert any(r["impl"] == f"ours:{b}" for r in skipped)


def test_checks_passed(smoke):
    _, rows, _ = smoke
    checks = [r["check"] for r in rows if r["check"]]
    assert checks
    assert not [c for c in checks if "HIGH" in c or "MISMATCH" in c], checks
    kv = [r for r in rows if r["suite"] == "kv_append" and r["status"] == "ok"]
    assert all(r["check"] == "bit-exact (whole cache)" for r in kv)


def test_decode_suite_on_the_bundled_model(smoke):
    """The decode rows (bench_decode.py, part of e2e): curve, step vs HF forward, end to end with identical texts,
    and decode.md/decode.json with the command, machine and versions."""
    import json

    out, rows, _ = smoke
    for suite in ("decode_curve", "decode_step", "decode_e2e"):
        assert any(r["suite"] == suite and r["status"] in ("ok", "derived") for r in rows), suite
    steps = [r for r in rows if r["suite"] == "decode_step" and r["status"] == "ok"]
    assert {r["impl"] for r in steps} == {"tidar step", "hf forward (DynamicCache)"}
    e2e = [json.loads(r["extra"]) for r in rows if r["suite"] == "decode_e2e"]
    assert e2e and all(x["identical"] == "yes" for x in e2e)
    rec = json.loads((out / "decode.json").read_text())
    assert rec["command"].startswith("python -m benchmarks") and rec["git_sha"] and rec["versions"]["transformers"]
    assert rec["machine"]["cores"] >= 1 and rec["machine"]["torch_threads"] >= 1
    names = set(rec["e2e"]["configs"]["all"])
    assert {"hf-ar", "hf-prompt-lookup", "tidar auto"} <= names
    assert (out / "decode.md").read_text().startswith("# TiDAR decoding on the bundled model")


@pytest.mark.parametrize("which", ["training", "decode", "prefill", "causal"])
def test_block_tables_match_dense_twin(which):
    from benchmarks.flex import block_tables, dense_block_tables
    from tidar_kernels import layouts

    cases = {
        "training": [(layouts.training(L, K), 0) for L, K in ((100, 16), (130, 7), (256, 16), (64, 64), (37, 1))],
        "decode": [(layouts.decode_step(K), P) for K, P in ((16, 300), (4, 0), (8, 129), (3, 1000))],
        "prefill": [(layouts.prefill(n, K), 0) for n, K in ((200, 16), (1, 4), (127, 1))],
        "causal": [(layouts.causal(S), P) for S, P in ((1, 500), (300, 0), (129, 77))],
    }[which]
    for layout, seg in cases:
        kv_len = seg + layout.seg_len
        for tiles in ((128, 128), (64, 32), (16, 16)):
            got = block_tables(layout.local_limit, layout.block_id, seg, kv_len, *tiles)
            want = dense_block_tables(layout.local_limit, layout.block_id, seg, kv_len, *tiles)
            assert torch.equal(got["partial"], want["partial"]), (which, seg, tiles)
            assert torch.equal(got["full"], want["full"]), (which, seg, tiles)
            assert got["pairs"] == want["pairs"]


def test_prompts_suite_decodes_a_prompt_in_a_fresh_process_beside_the_one_process_numbers(smoke):
    """``prompts_fresh``: a prompt decoded by a fresh process (``python -m benchmarks.bench_prompts --fresh I``),
    identical to HF greedy there, reported beside the same prompt's one-process ratios."""
    import json

    from benchmarks.bench_prompts import FRESH_PER_CLASS, _fresh_prompts
    from tidar.ordinary_prompts import PROMPTS

    out, rows, _ = smoke
    rec = json.loads((out / "prompts.json").read_text())
    fresh = rec["fresh"]["prompts"]
    assert fresh and all(r["identical"] for r in fresh)
    assert all(r["s_tidar"] > 0 and r["one_process_x_ar_tidar"] is not None for r in fresh)
    assert "A fresh process per prompt" in (out / "prompts.md").read_text()
    assert any(r["suite"] == "prompts" and "fresh process" in r["case"] for r in rows)
    listed = [(cls, p) for cls, ps in PROMPTS.items() for p in ps] + [("demo", "x")]
    picked = _fresh_prompts(listed)
    assert len(picked) == FRESH_PER_CLASS * len(PROMPTS) and all(listed[i][0] != "demo" for i in picked)


def test_prompts_suite_reports_an_aa_control_beside_every_batch1_ratio(smoke):
    """``prompts_b1`` times HF greedy twice as two implementations (A/A): every prompt and class carries that ratio,
    and the goals table states it next to the "never slower than AR" goal, so a per-prompt shortfall can be read
    against what the machine's noise alone produces."""
    import json

    out, _, _ = smoke
    rec = json.loads((out / "prompts.json").read_text())
    prompts = rec["batch1"]["prompts"]
    assert prompts and all(r["x_ar_control"] > 0 for r in prompts)
    for g in rec["batch1"]["groups"].values():
        spread = g["x_ar_control_per_prompt"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
    assert "A/A" in (out / "prompts.md").read_text()
    goals = [line for line in (out / "results.md").read_text().splitlines() if "noise floor" in line]
    assert goals and "A/A min" in goals[0]
