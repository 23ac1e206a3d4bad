"""Decoding on the bundled model (``--only e2e``; on CPU this is the whole e2e suite): does TiDAR make more
tokens per second than AR on the machine at hand?

- ``decode_curve``: the token-slot curve of the bundled model (``tidar.decode.slot_timing.measure_slot_curve``: one
  forward after a 64-token cached prefix, by its token count, as ``draft_len="auto"`` plans with it).
- ``decode_step``: one TiDAR decode step (the decode loop's own step: forward over S = K (1 + |levels|) tokens,
  LM head on the needed rows, greedy verification, the step's host sync) against a plain HF forward of the
  same S tokens with a ``DynamicCache`` of the same prefix (unpatched model, full logits, cache cropped back),
  for K = 2, 4, 16 (all levels) and sparse level sets. The two are timed alternately, call by call.
- ``decode_e2e``: greedy generation of ``NEW_TOKENS`` tokens on the demo prompts and a few other held-out
  code prompts: HF ``generate`` (AR), HF prompt lookup (``prompt_lookup_num_tokens=10``), TiDAR at fixed K
  (diffusion drafts), level sets, and ``draft_len="auto"`` with and without context drafts. Every text is
  checked identical to HF greedy. The configurations are interleaved prompt by prompt over several rounds
  (a shared machine is noisy); tables give the median over rounds and the best round.

Besides the harness's results.csv/results.md it writes ``decode.md`` and ``decode.json`` (command, machine:
cores, torch threads, load average; versions; git sha; date).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys

import torch

from . import decode_report
from .environment import machine, versions
from .harness import Bench
from .hf_compat import cache_kw
from .report import short
from .timing import interleaved, interleaved_timing, timed_call

NEW_TOKENS = 128
PREFIX = 64
EXTRA_PROMPTS = [  # held-out stdlib modules of the bundled model (models/tidar-python-tiny/README.md) and plain code
    'def glob(pathname, *, root_dir=None, dir_fd=None, recursive=False):\n    """Return a list of paths matching '
    "a pathname pattern.\n\n",
    'def join(a, *p):\n    """Join two or more pathname components, inserting \'/\' as needed.\n    If any '
    'component is an absolute path, all previous path components\n    will be discarded."""\n    a = os.fspath(a)\n',
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n",
]
STEP_CASES = [(2, None), (4, None), (16, None), (16, (1,)), (16, (4, 7, 10)), (8, (1, 2)), (4, (1,))]
STEP_GOAL = 1.10


def _configs(smoke: bool):
    """(name, kind, kwargs): kind hf (unpatched model.generate) or tidar (tidar.generate)."""
    if smoke:
        return [
            ("hf-ar", "hf", {}),
            ("hf-prompt-lookup", "hf", {"prompt_lookup_num_tokens": 10}),
            ("tidar K=2", "tidar", {"draft_len": 2, "context_drafts": False}),
            ("tidar auto", "tidar", {"draft_len": "auto", "context_drafts": True}),
        ]
    cfgs = [("hf-ar", "hf", {}), ("hf-prompt-lookup", "hf", {"prompt_lookup_num_tokens": 10})]
    for K in (1, 2, 4, 8, 16):
        cfgs.append((f"tidar K={K}", "tidar", {"draft_len": K, "context_drafts": False}))
    for K, lv in ((16, (1,)), (16, (1, 2)), (8, (1,)), (8, (1, 2))):
        cfgs.append(
            (
                f"tidar K={K} levels {{{','.join(map(str, lv))}}}",
                "tidar",
                {"draft_len": K, "proposal_levels": lv, "context_drafts": False},
            )
        )
    cfgs.append(("tidar auto", "tidar", {"draft_len": "auto", "context_drafts": True}))
    cfgs.append(("tidar auto (no context drafts)", "tidar", {"draft_len": "auto", "context_drafts": False}))
    return cfgs


def _load(bench: Bench):
    from tidar.cli.demo import PROMPTS_FILE, bundled_model_dir
    from tidar.train.checkpoint import load_checkpoint

    folder = bundled_model_dir()
    hf, tok, _ = load_checkpoint(folder, bench.device)
    td, _, _ = load_checkpoint(folder, bench.device)
    demo = json.loads((folder / PROMPTS_FILE).read_text())["prompts"]
    return folder, hf.eval(), td.eval(), tok, demo


# ------------------------------------------------------------------------------------------------ (a) curve


def _curve(bench: Bench, td, rec: dict):
    from tidar.decode.slot_timing import GRID, measure_slot_curve, set_slot_curve

    bench.start_suite("decode_curve", 60 if bench.smoke else 240)
    grid = [1, 4] if bench.smoke else list(GRID)
    curve = measure_slot_curve(td, grid=grid, repeats=2 if bench.smoke else 7, budget_s=30 if bench.smoke else 200)
    set_slot_curve(td, curve)  # draft_len="auto" below plans with this measurement
    for n, ms in zip(curve.tokens, curve.body_ms):
        bench.derived(
            f"forward of {n} tokens after {PREFIX} cached",
            "ours (TidarCache)",
            ms,
            params={"n": n, "kind": "curve"},
            extra={"ms/token": ms / n, "x 1 token": ms / curve.body_ms[0]},
            notes="tidar.decode.slot_timing.measure_slot_curve: what draft_len='auto' plans with",
        )
    rec["curve"] = {
        "tokens": curve.tokens,
        "body_ms": curve.body_ms,
        "head_ms_per_row": curve.head_ms_per_row,
        "measured_s": curve.measured_s,
    }
    return curve


# ------------------------------------------------------------------------------------------------ (b) step


def _ids(V, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (1, n), generator=g)


def _tidar_stepper(td, prompt, K, levels):
    """The decode loop's own step (``tidar.Decoder.step``) at a fixed plan, repeatable (``commit=False``): the step
    writes the K/V of its segment after the committed prefix and commits nothing, so every call does the same
    work."""
    from tidar import Decoder

    dec = Decoder(td, prompt, max_new_tokens=K + 1, draft_len=K, proposal_levels=levels, context_drafts=False)
    dec.prefill()
    planned = dec.plan()
    lv = tuple(range(1, K + 1)) if levels is None else tuple(levels)
    if (planned.draft_len, planned.levels) != (K, lv):
        raise RuntimeError(f"planned K={planned.draft_len} levels {planned.levels}, not K={K} levels {lv}")
    return lambda: dec.step(planned, commit=False), planned.plan.seg_len


def _hf_forward(hf, prompt, S):
    from transformers import DynamicCache

    kw = cache_kw(hf)
    P = prompt.shape[1]
    cache = DynamicCache(config=hf.config)
    hf(input_ids=prompt, **{kw: cache}, use_cache=True)
    if cache.get_seq_length() != P:
        raise RuntimeError(f"DynamicCache holds {cache.get_seq_length()} tokens after a {P}-token prefill")
    ids = _ids(hf.config.vocab_size, S, 1).to(prompt.device)

    def fn():
        if cache.get_seq_length() != P:
            raise RuntimeError(f"DynamicCache not back at the {P}-token prefix ({cache.get_seq_length()})")
        out = hf(input_ids=ids, **{kw: cache}, use_cache=True).logits
        cache.crop(-S)  # back to the prefix (transformers 5.2x takes the number of tokens to drop)
        return out

    return fn


def _steps(bench: Bench, hf, td, rec: dict):
    bench.start_suite("decode_step", 60 if bench.smoke else 180)
    V = hf.config.vocab_size
    prompt = _ids(V, PREFIX, 0).to(bench.device)
    cases = [(2, None), (4, (1,))] if bench.smoke else STEP_CASES
    rounds = 3 if bench.smoke else 40
    rec["steps"] = []
    for K, levels in cases:
        lv_text = "all" if levels is None else "{" + ",".join(map(str, levels)) + "}"
        case = f"K={K} levels {lv_text}"
        if bench.over_budget():
            bench.skip(case, "(all)", bench.budget_reason())
            continue
        try:
            step, S = _tidar_stepper(td, prompt, K, levels)
            fwd = _hf_forward(hf, prompt, S)
            t_td, t_hf = interleaved([step, fwd], rounds, bench.device)
        except Exception as e:
            bench._error("ours", case, e)
            continue
        params = {"K": K, "levels": lv_text, "S": S, "prefix": PREFIX, "kind": "step"}
        bench._row(
            "hf forward (DynamicCache)",
            f"{case} (S={S})",
            interleaved_timing(t_hf, bench.device),
            params=params,
            notes="unpatched model, full logits, cache cropped back after each call",
        )
        m_td, m_hf = statistics.median(t_td), statistics.median(t_hf)
        ratio, best = m_td / m_hf, min(t_td) / min(t_hf)
        bench._row(
            "tidar step",
            f"{case} (S={S})",
            interleaved_timing(t_td, bench.device),
            params=params,
            check=f"step/forward median {ratio:.2f}x, min {best:.2f}x",
            notes="the decode loop's step: forward, LM head on 2K rows, greedy verification, host sync",
        )
        rec["steps"].append(
            {
                "K": K,
                "levels": lv_text,
                "S": S,
                "tidar_ms_median": m_td,
                "tidar_ms_min": min(t_td),
                "hf_ms_median": m_hf,
                "hf_ms_min": min(t_hf),
                "ratio_median": ratio,
                "ratio_min": best,
                "calls": rounds,
            }
        )


# ------------------------------------------------------------------------------------------------ (c) e2e


def _generator(hf, td, tok):
    """``run(kind, kw, x, n)``: greedy generation of ``n`` tokens after ``x`` by HF ``generate`` on the unpatched
    model (kind hf) or ``tidar.generate`` (kind tidar); gives (new tokens, TiDAR's output or None)."""
    import tidar

    eos = tok.eos_token_id

    def run(kind, kw, x, n):
        if kind == "hf":
            out = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
                **kw,
            )
            new = out[0, x.shape[1] :].tolist()
            if eos in new:
                new = new[: new.index(eos) + 1]
            return new, None
        out = tidar.generate(td, x, max_new_tokens=n, eos_token_id=eos, **kw)
        return out.new_tokens[0], out

    return run


def _e2e_rounds(bench: Bench, run, cfgs, ids, n_new):
    """Every configuration on every prompt, interleaved prompt by prompt, for as many rounds as the budget allows.
    Gives per config, per prompt, per round ``{tokens, s, identical[, forwards, tpf]}`` (or ``{error}``), the
    TiDAR configs' draft lengths and sources, and the number of rounds."""
    min_rounds, max_rounds = (1, 1) if bench.smoke else (1, 3) if bench.cuda else (3, 7)
    res = {name: [[] for _ in ids] for name, _, _ in cfgs}
    ref = [None] * len(ids)
    extra = {name: {"draft_lens": {}, "sources": {}} for name, _, _ in cfgs}
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or not bench.over_budget()):
        order = cfgs if rounds % 2 == 0 else cfgs[::-1]  # alternate the order: no config always first
        for pi, x in enumerate(ids):
            for name, kind, kw in order:
                try:
                    (new, out), dt = timed_call(lambda kind=kind, kw=kw, x=x: run(kind, kw, x, n_new), bench.device)
                except Exception as e:
                    res[name][pi].append({"error": short(e)})
                    continue
                if name == "hf-ar" and ref[pi] is None:
                    ref[pi] = new
                r = {"tokens": len(new), "s": dt, "identical": ref[pi] is None or new == ref[pi], "new": new}
                if out is not None:
                    r.update(forwards=out.forwards, tpf=out.tokens_per_forward)
                    for k in out.draft_lens:
                        extra[name]["draft_lens"][k] = extra[name]["draft_lens"].get(k, 0) + 1
                    for k, v in out.draft_sources.items():
                        extra[name]["sources"][k] = extra[name]["sources"].get(k, 0) + v
                res[name][pi].append(r)
        rounds += 1
    for name in res:  # a config that ran before hf-ar's first result is checked now
        for pi, runs in enumerate(res[name]):
            for r in runs:
                if "new" in r:
                    r["identical"] = r["new"] == ref[pi]
                    del r["new"]
    return res, extra, rounds


def _e2e_entry(rows, ar, sel, kind, kw, rounds) -> dict:
    """One configuration over the prompts ``sel``: tokens/s and x AR (median over rounds, and best round),
    tokens per forward (TiDAR), whether every text was identical to HF greedy."""
    per_round = []
    for k in range(rounds):
        tok_n = sum(rows[i][k]["tokens"] for i in sel)
        sec = sum(rows[i][k]["s"] for i in sel)
        ar_sec = sum(ar[i][k]["s"] for i in sel) if all("s" in ar[i][k] for i in sel) else None
        per_round.append((tok_n / sec, ar_sec / sec if ar_sec else None))
    tps = [a for a, _ in per_round]
    xs = [b for _, b in per_round if b is not None]
    tpf = None
    if kind == "tidar":
        fw = sum(r["forwards"] for i in sel for r in rows[i])
        tpf = sum(r["tokens"] for i in sel for r in rows[i]) / fw
    best_s = [min(r["s"] for r in rows[i]) for i in sel]
    best_ar_s = [min(r["s"] for r in ar[i]) for i in sel]
    tokens_each = [rows[i][0]["tokens"] for i in sel]
    return {
        "tokens_per_s_median": statistics.median(tps),
        "tokens_per_s_best": sum(tokens_each) / sum(best_s),
        "x_ar_median": statistics.median(xs) if xs else None,
        "x_ar_best": sum(best_ar_s) / sum(best_s),
        "tokens_per_forward": tpf,
        "identical": all(r["identical"] for i in sel for r in rows[i]),
        "tokens": sum(tokens_each),
        "rounds": rounds,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
    }


def _e2e_rows(bench: Bench, rec: dict, cfgs, prompts, res, extra, rounds, n_new):
    """The decode_e2e rows and ``rec["e2e"]["configs"]``: per prompt group (all, demo, other), per configuration."""
    ar = res["hf-ar"]
    for group in ("all", "demo", "other"):
        sel = [i for i, (s, _) in enumerate(prompts) if group == "all" or s == group]
        if not sel:
            continue
        for name, kind, kw in cfgs:
            rows = res[name]
            errors = [r["error"] for i in sel for r in rows[i] if "error" in r]
            if errors:
                bench._add(
                    {
                        "suite": "decode_e2e",
                        "case": f"{group} prompts",
                        "impl": name,
                        "status": "error",
                        "reason": errors[0],
                        "params": {"group": group},
                    }
                )
                continue
            entry = _e2e_entry(rows, ar, sel, kind, kw, rounds)
            if group == "all" and kind == "tidar":
                entry["draft_lens"] = dict(sorted(extra[name]["draft_lens"].items()))
                entry["draft_sources"] = extra[name]["sources"]
            rec["e2e"]["configs"].setdefault(group, {})[name] = entry
            bench.derived(
                f"{group} prompts ({len(sel)}), {n_new} new tokens",
                name,
                None,
                params={"group": group, "config": name, "kind": kind},
                extra={
                    "tok/s median": entry["tokens_per_s_median"],
                    "tok/s best": entry["tokens_per_s_best"],
                    "x AR median": entry["x_ar_median"],
                    "x AR best": entry["x_ar_best"],
                    "tok/forward": entry["tokens_per_forward"],
                    "identical": "yes" if entry["identical"] else "NO",
                },
                notes=f"{rounds} rounds, interleaved",
            )


def _e2e(bench: Bench, hf, td, tok, demo, rec: dict):
    import tidar

    bench.start_suite("decode_e2e", 120 if bench.smoke or bench.cuda else 900)
    n_new = 8 if bench.smoke else NEW_TOKENS
    prompts = [("demo", p) for p in demo] + [("other", p) for p in EXTRA_PROMPTS]
    if bench.smoke:
        prompts = prompts[:1]
    ids = [tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(bench.device) for _, p in prompts]
    cfgs = _configs(bench.smoke)
    run = _generator(hf, td, tok)
    tidar.patch(td, draft_len="auto")
    for _, kind, kw in cfgs:  # warm-up: first-call overheads out of the timings
        run(kind, kw, ids[0], 4)
    res, extra, rounds = _e2e_rounds(bench, run, cfgs, ids, n_new)
    rec["e2e"] = {
        "new_tokens": n_new,
        "rounds": rounds,
        "prompts": [{"set": s, "text": p} for s, p in prompts],
        "configs": {},
    }
    _e2e_rows(bench, rec, cfgs, prompts, res, extra, rounds, n_new)


# ------------------------------------------------------------------------------------------------ run, goals


def run(bench: Bench):
    import tidar

    rec = {
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine(bench.device),
        "versions": versions(),
        "git_sha": bench.env["git_sha"],
        "date": bench.env["date"],
        "smoke": bench.smoke,
    }
    bench.notes.append(
        f"decode: {rec['machine']['cores']} cores, {rec['machine']['torch_threads']} torch threads, "
        f"load average {rec['machine'].get('load_average_1m_5m_15m')} at the start"
    )
    with torch.no_grad():
        folder, hf, td, tok, demo = _load(bench)
        rec["model"] = str(folder)
        tidar.patch(td, draft_len="auto")
        try:
            _curve(bench, td, rec)
        except Exception as e:
            bench._error("ours", "slot curve", e, suite="decode_curve")
        _steps(bench, hf, td, rec)
        _e2e(bench, hf, td, tok, demo, rec)
    try:
        rec["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    bench.decode_record = rec
    (bench.out / "decode.json").write_text(json.dumps(rec, indent=1))
    (bench.out / "decode.md").write_text(decode_report.markdown(rec, PREFIX))


def goals(bench: Bench):
    rec = getattr(bench, "decode_record", None)
    if not rec:
        return
    for s in rec.get("steps", []):
        if s["levels"] == "all" and s["K"] in (2, 4, 16):
            x = s["ratio_median"]
            bench.goal(
                f"TiDAR step K={s['K']} vs HF forward of its {s['S']} tokens (bundled model)",
                f"<= {STEP_GOAL:.2f}x",
                f"{x:.2f}x (min {s['ratio_min']:.2f}x)",
                "met" if x <= STEP_GOAL else f"missed by {x / STEP_GOAL:.2f}x",
            )
    cfg = rec.get("e2e", {}).get("configs", {})
    allc = cfg.get("all", {})
    if allc:
        same = [n for n, e in allc.items() if e["identical"]]
        bench.goal(
            "every text identical to HF greedy",
            "all configurations",
            f"{len(same)}/{len(allc)}",
            "met" if len(same) == len(allc) else "MISSED: " + ", ".join(n for n in allc if n not in same),
        )
    for group, target in (("demo", 1.3), ("other", 1.2)):
        e = cfg.get(group, {}).get("tidar auto")
        if e and e["x_ar_median"] is not None:
            bench.goal(
                f"tidar auto vs HF AR tokens/s ({group} prompts)",
                f">= {target}x",
                f"{e['x_ar_median']:.2f}x (best round {e['x_ar_best']:.2f}x)",
                "met" if e["x_ar_median"] >= target else "missed",
            )
    a, p = allc.get("tidar auto"), allc.get("hf-prompt-lookup")
    if a and p:
        x = a["tokens_per_s_median"] / p["tokens_per_s_median"]
        bench.goal(
            "tidar auto vs HF prompt lookup tokens/s (all prompts)",
            ">= 1.00x",
            f"{x:.2f}x",
            "met" if x >= 1.0 else "missed",
        )


def plots(bench: Bench, plot):
    return [
        plot(
            "decode_curve.png",
            title="bundled model: one forward vs tokens in it",
            x="n",
            y="ms",
            logx=True,
            xlabel="tokens in the forward",
            ylabel="ms (median)",
            where=lambda r: r["suite"] == "decode_curve",
        )
    ]
