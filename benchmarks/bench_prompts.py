"""TiDAR's defaults on prompts nobody tuned for (``--only prompts``; CPU or GPU): the bundled model, patched once with
``tidar.patch(model)`` and used for every prompt in turn, against HF ``generate`` (AR) and HF prompt lookup
(``prompt_lookup_num_tokens=10``) on an unpatched copy.

- ``prompts_b1``: greedy, batch 1, ``NEW_TOKENS`` new tokens, on the ordinary code prompts of
  ``python/tidar/ordinary_prompts.py`` (four classes) and the demo's prompts; the three are interleaved prompt by
  prompt over several rounds and each prompt's best round is kept (a shared machine only adds time). Reported per
  prompt class with the spread (min / median / max of TiDAR / prompt lookup and TiDAR / AR per prompt). An A/A
  control times HF greedy a second time, interleaved as a fourth implementation: its ratio to the first per prompt
  is what the machine's noise alone makes of a per-prompt "x HF AR" (the floor of "never slower than AR").
- ``prompts_batch``: greedy, left-padded ragged batches of 4 and 16 different prompts: TiDAR vs HF AR.
- ``prompts_sampled``: temperature 0.8, batch 1 and 4: TiDAR vs HF sampling (different draws; tokens/s only).
- ``prompts_fresh``: greedy batch 1 on ``FRESH_PER_CLASS`` prompts of each class, each prompt in a fresh process
  (``python -m benchmarks.bench_prompts --fresh I``: load, patch, one warm-up call of each implementation on a
  prompt of its own, then the prompt's interleaved rounds), beside the one-process numbers of the same prompts:
  nothing a process decoded before may change a request's speed.
Every greedy text is checked identical to HF greedy. Writes ``prompts.md`` and ``prompts.json``.

``TIDAR_PROMPTS_PARTS`` (environment) runs a subset: a comma list of ``b1``, ``batch4``, ``batch16``,
``sampled1``, ``sampled4``, ``fresh`` (default: all); ``TIDAR_PROMPTS_ROUNDS`` sets the rounds of the batch groups
(default 5; HF and TiDAR alternate which runs first).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

import torch

from tidar.ordinary_prompts import PROMPTS

from .harness import Bench
from .timing import timed_call

NEW_TOKENS = 128
BATCH_NEW_TOKENS = 96
TEMPERATURE = 0.8
PARTS = ("b1", "batch4", "batch16", "sampled1", "sampled4", "fresh")
FRESH_PER_CLASS = 2  # ordinary prompts per class decoded in a fresh process each


def _parts() -> set:
    parts = {p.strip() for p in os.environ.get("TIDAR_PROMPTS_PARTS", ",".join(PARTS)).split(",") if p.strip()}
    bad = parts - set(PARTS)
    if bad:
        raise ValueError(f"TIDAR_PROMPTS_PARTS: unknown {sorted(bad)}; choose from {', '.join(PARTS)}")
    return parts


def _load(bench: Bench):
    import tidar
    from tidar.cli.demo import PROMPTS_FILE, bundled_model_dir
    from tidar.train.checkpoint import load_checkpoint

    folder = bundled_model_dir()
    td, tok, _ = load_checkpoint(folder, device=bench.device)
    td.eval()
    hf = copy.deepcopy(td)
    tidar.patch(td)  # the defaults, once: every prompt below decodes with what a user gets
    demo = json.loads((folder / PROMPTS_FILE).read_text())["prompts"]
    return folder, hf, td, tok, demo


def _hf_kwargs(tok, n, **kw):
    return dict(max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=tok.pad_token_id, **kw)


def _spread(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None


def _batch1_runs(hf, td, tok, n):
    """The three greedy batch-1 implementations: name -> ``f(ids) -> new tokens`` (a list)."""
    import tidar

    one = lambda x: torch.ones_like(x)  # noqa: E731
    return {
        "hf-ar": lambda x: hf.generate(x, attention_mask=one(x), do_sample=False, **_hf_kwargs(tok, n))[
            0, x.shape[1] :
        ].tolist(),
        "hf-prompt-lookup": lambda x: hf.generate(
            x, attention_mask=one(x), do_sample=False, prompt_lookup_num_tokens=10, **_hf_kwargs(tok, n)
        )[0, x.shape[1] :].tolist(),
        "tidar": lambda x: tidar.generate(td, x, max_new_tokens=n, eos_token_id=[]),
    }


def _interleaved_b1(runs, ids, rounds, device):
    """Each prompt's best seconds per implementation over ``rounds`` interleaved rounds (the order alternates),
    its tokens, whether every run gave the same tokens, and TiDAR's tokens per forward."""
    best = {name: [float("inf")] * len(ids) for name in runs}
    texts, tpf = [None] * len(ids), [None] * len(ids)
    same = [True] * len(ids)
    for r in range(rounds):
        for i, x in enumerate(ids):
            order = list(runs) if (r + i) % 2 == 0 else list(runs)[::-1]
            for name in order:
                out, dt = timed_call(lambda name=name, x=x: runs[name](x), device)
                best[name][i] = min(best[name][i], dt)
                toks = out.new_tokens[0] if name == "tidar" else out
                if name == "tidar":
                    tpf[i] = out.tokens_per_forward
                if texts[i] is None:
                    texts[i] = toks
                same[i] = same[i] and toks == texts[i]
    return best, texts, same, tpf


def _batch1(bench: Bench, hf, td, tok, prompts, rec):
    n = 8 if bench.smoke else NEW_TOKENS
    ids = [torch.tensor([tok.encode(p)], device=bench.device) for _, p in prompts]
    runs = _batch1_runs(hf, td, tok, n)
    # A/A control: HF greedy timed a second time as if it were another implementation. Its ratio to the first is
    # what this machine's noise alone does to a per-prompt "x HF AR" (the best-of-rounds ratio of two equal runs)
    runs["hf-ar-control"] = runs["hf-ar"]
    for f in runs.values():  # warm-up: the slot curve is measured at the first TiDAR call
        f(ids[0])
    rounds = 1 if bench.smoke else 3
    best, texts, same, tpf = _interleaved_b1(runs, ids, rounds, bench.device)
    rows = []
    for i, (cls, p) in enumerate(prompts):
        toks = texts[i]
        grams = [tuple(toks[j : j + 4]) for j in range(max(0, len(toks) - 3))]
        rows.append(
            {
                "class": cls,
                "prompt": p,
                "identical": same[i],
                "ar_tok_s": n / best["hf-ar"][i],
                "x_ar_lookup": best["hf-ar"][i] / best["hf-prompt-lookup"][i],
                "x_ar_tidar": best["hf-ar"][i] / best["tidar"][i],
                "x_lookup_tidar": best["hf-prompt-lookup"][i] / best["tidar"][i],
                "x_ar_control": best["hf-ar"][i] / best["hf-ar-control"][i],
                "tidar_tokens_per_forward": tpf[i],
                "distinct_4grams": len(set(grams)) / len(grams) if grams else None,
            }
        )
    groups = _batch1_groups(bench, rows, best, n, rounds)
    rec["batch1"] = {"new_tokens": n, "rounds": rounds, "groups": groups, "prompts": rows}


def _fresh_prompts(prompts):
    """The prompts decoded in fresh processes: the first ``FRESH_PER_CLASS`` of each ordinary class."""
    picked, seen = [], {}
    for i, (cls, _) in enumerate(prompts):
        if cls != "demo" and seen.get(cls, 0) < FRESH_PER_CLASS:
            seen[cls] = seen.get(cls, 0) + 1
            picked.append(i)
    return picked


def _fresh(bench: Bench, prompts, rec):
    """Each picked prompt in a fresh process (``fresh_main``), beside the one-process numbers of ``_batch1``."""
    n = 8 if bench.smoke else NEW_TOKENS
    rounds = 1 if bench.smoke else 3
    one_process = {r["prompt"]: r for r in rec.get("batch1", {}).get("prompts", [])}
    rows = []
    for i in _fresh_prompts(prompts)[: 1 if bench.smoke else None]:
        cls, p = prompts[i]
        cmd = [sys.executable, "-m", "benchmarks.bench_prompts", "--fresh", str(i), "--new-tokens", str(n)]
        cmd += ["--rounds", str(rounds), "--device", str(bench.device), "--threads", str(torch.get_num_threads())]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fresh process for prompt {i} failed:\n{done.stderr[-2000:]}")
        row = {"class": cls, "prompt": p, **json.loads(done.stdout.strip().splitlines()[-1])}
        same = one_process.get(p)
        row["one_process_x_ar_tidar"] = same["x_ar_tidar"] if same else None
        row["one_process_x_lookup_tidar"] = same["x_lookup_tidar"] if same else None
        rows.append(row)
    if not rows:
        return
    t = {k: sum(r[k] for r in rows) for k in ("s_hf_ar", "s_lookup", "s_tidar")}
    rec["fresh"] = {
        "new_tokens": n,
        "rounds": rounds,
        "prompts": rows,
        "x_ar_tidar": t["s_hf_ar"] / t["s_tidar"],
        "x_lookup_tidar": t["s_lookup"] / t["s_tidar"],
    }
    f = rec["fresh"]
    bench.derived(
        f"{len(rows)} ordinary prompts, each in a fresh process, batch 1, greedy, {n} new tokens",
        "tidar defaults",
        None,
        params={"group": "fresh"},
        extra={
            "x HF AR": f["x_ar_tidar"],
            "x prompt lookup": f["x_lookup_tidar"],
            "min x lookup (prompt)": min(r["x_lookup_tidar"] for r in rows),
            "min x AR (prompt)": min(r["x_ar_tidar"] for r in rows),
            "identical": "yes" if all(r["identical"] for r in rows) else "NO",
        },
        notes=f"best of {rounds} interleaved rounds per prompt, after one warm-up call on another prompt",
    )


def fresh_main(argv=None) -> None:
    """One prompt of ``PROMPTS`` (+ the demo's) in this fresh process: load, patch, one warm-up call of each
    implementation on another prompt (the slot curve and host calibration of a first call; nothing of this prompt),
    then ``--rounds`` interleaved rounds. Prints one JSON line: seconds per implementation, ratios, tokens."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_prompts")
    ap.add_argument("--fresh", type=int, required=True, help="index into the ordinary prompts + the demo's")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    class _Dev:  # what _load needs of a Bench
        device = torch.device(args.device)

    with torch.no_grad():
        _, hf, td, tok, demo = _load(_Dev)
        prompts = [(cls, p) for cls, ps in PROMPTS.items() for p in ps] + [("demo", p) for p in demo]
        if not 0 <= args.fresh < len(prompts):
            raise SystemExit(f"--fresh must be in 0..{len(prompts) - 1}, got {args.fresh}")
        runs = _batch1_runs(hf, td, tok, args.new_tokens)
        warm = torch.tensor([tok.encode(prompts[(args.fresh + 1) % len(prompts)][1])], device=_Dev.device)
        for f in runs.values():
            f(warm)
        x = torch.tensor([tok.encode(prompts[args.fresh][1])], device=_Dev.device)
        best, texts, same, tpf = _interleaved_b1(runs, [x], args.rounds, _Dev.device)
    b = {k: v[0] for k, v in best.items()}
    out = {
        "s_hf_ar": b["hf-ar"],
        "s_lookup": b["hf-prompt-lookup"],
        "s_tidar": b["tidar"],
        "x_ar_tidar": b["hf-ar"] / b["tidar"],
        "x_lookup_tidar": b["hf-prompt-lookup"] / b["tidar"],
        "tidar_tokens_per_forward": tpf[0],
        "identical": same[0],
    }
    print(json.dumps(out))


def _batch1_groups(bench: Bench, rows, best, n, rounds) -> dict:
    """Per prompt class (and ordinary, all): total-time ratios TiDAR / AR / prompt lookup and their per-prompt
    spread, one derived row each. ``best``: per implementation, each prompt's best seconds."""
    groups = {}
    for cls in sorted({r["class"] for r in rows}) + ["ordinary (all)", "all"]:
        sel = [
            i
            for i, r in enumerate(rows)
            if r["class"] == cls or cls == "all" or (cls == "ordinary (all)" and r["class"] != "demo")
        ]
        total = {name: sum(best[name][i] for i in sel) for name in best}  # the same tokens for all: time ratios
        groups[cls] = {
            "prompts": len(sel),
            "identical": all(rows[i]["identical"] for i in sel),
            "x_ar_lookup": total["hf-ar"] / total["hf-prompt-lookup"],
            "x_ar_tidar": total["hf-ar"] / total["tidar"],
            "x_lookup_tidar": total["hf-prompt-lookup"] / total["tidar"],
            "x_lookup_tidar_per_prompt": _spread([rows[i]["x_lookup_tidar"] for i in sel]),
            "x_ar_tidar_per_prompt": _spread([rows[i]["x_ar_tidar"] for i in sel]),
            "x_ar_control_per_prompt": _spread([rows[i]["x_ar_control"] for i in sel]),
        }
        g = groups[cls]
        bench.derived(
            f"{cls} prompts ({len(sel)}), batch 1, greedy, {n} new tokens",
            "tidar defaults",
            None,
            params={"group": cls},
            extra={
                "x HF AR": g["x_ar_tidar"],
                "x prompt lookup": g["x_lookup_tidar"],
                "lookup x AR": g["x_ar_lookup"],
                "min x lookup (prompt)": g["x_lookup_tidar_per_prompt"]["min"],
                "min x AR (prompt)": g["x_ar_tidar_per_prompt"]["min"],
                "A/A min (prompt)": g["x_ar_control_per_prompt"]["min"],
                "identical": "yes" if g["identical"] else "NO",
            },
            notes=f"best of {rounds} interleaved rounds per prompt; A/A: HF AR timed against itself",
        )
    return groups


def _left_padded(tok, texts, device):
    enc = [tok.encode(t) for t in texts]
    P = max(map(len, enc))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(e)) + e for e in enc], device=device)
    mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc], device=device)
    return ids, mask


def _batches(bench: Bench, hf, td, tok, prompts, rec, temperature: float):
    import tidar

    n = 8 if bench.smoke else BATCH_NEW_TOKENS
    texts = [p for _, p in prompts]
    kind = "sampled" if temperature > 0 else "batch"
    sizes = [B for B in ((1, 4) if temperature > 0 else (4, 16)) if f"{kind}{B}" in _parts()]
    rounds = 1 if bench.smoke else int(os.environ.get("TIDAR_PROMPTS_ROUNDS", "5"))
    out_rows = []
    if not sizes:
        return
    for B in sizes:
        if B > len(texts):
            continue
        starts = list(range(0, len(texts) - B + 1, max(B, len(texts) // 3)))[:3] or [0]
        for s in starts:
            ids, mask = _left_padded(tok, texts[s : s + B], bench.device)
            hf_kw = _hf_kwargs(tok, n)
            if temperature > 0:
                hf_kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            else:
                hf_kw.update(do_sample=False)
            t_hf, t_td, same, tpf = float("inf"), float("inf"), True, None
            for r in range(rounds):
                g = torch.Generator(device=bench.device).manual_seed(r)
                run_hf = lambda: hf.generate(ids, attention_mask=mask, **hf_kw)  # noqa: E731
                td_kw = dict(attention_mask=mask, max_new_tokens=n, temperature=temperature, eos_token_id=[])
                run_td = lambda g=g: tidar.generate(td, ids, generator=g, **td_kw)  # noqa: E731
                for who in ("hf", "td") if r % 2 == 0 else ("td", "hf"):  # the order alternates round by round
                    if who == "hf":
                        a, dt = timed_call(run_hf, bench.device)
                        t_hf = min(t_hf, dt)
                    else:
                        o, dt = timed_call(run_td, bench.device)
                        t_td = min(t_td, dt)
                tpf = o.tokens_per_forward
                if temperature == 0:
                    same = same and torch.equal(a, o.sequences)
            row = {"batch": B, "first_prompt": s, "x_ar_tidar": t_hf / t_td, "tidar_tokens_per_forward": tpf}
            row["hf_tok_s"] = B * n / t_hf
            if temperature == 0:
                row["identical"] = same
            out_rows.append(row)
            bench.derived(
                f"batch {B} (prompts {s}..{s + B - 1}), {'greedy' if temperature == 0 else f'T={temperature}'}",
                "tidar defaults",
                None,
                params={"batch": B, "temperature": temperature},
                extra={"x HF AR": row["x_ar_tidar"], "tok/forward": tpf, "HF tok/s": row["hf_tok_s"]},
                notes=f"best of {rounds} rounds",
            )
    rec["sampled" if temperature > 0 else "batches"] = {"new_tokens": n, "temperature": temperature, "rows": out_rows}


def run(bench: Bench):
    bench.start_suite("prompts", 120 if bench.smoke else 1800)
    rec = {"date": bench.env["date"], "git_sha": bench.env["git_sha"], "torch_threads": torch.get_num_threads()}
    with torch.no_grad():
        folder, hf, td, tok, demo = _load(bench)
        rec["model"] = str(folder)
        prompts = [(cls, p) for cls, ps in PROMPTS.items() for p in ps] + [("demo", p) for p in demo]
        if bench.smoke:
            prompts = prompts[:2]
        if "b1" in _parts():
            _batch1(bench, hf, td, tok, prompts, rec)
        ordinary = [cp for cp in prompts if cp[0] != "demo"]
        _batches(bench, hf, td, tok, ordinary, rec, 0.0)
        _batches(bench, hf, td, tok, ordinary, rec, TEMPERATURE)
        if "fresh" in _parts():
            _fresh(bench, prompts, rec)
    bench.prompts_record = rec
    (bench.out / "prompts.json").write_text(json.dumps(rec, indent=1))
    (bench.out / "prompts.md").write_text(markdown(rec))


def goals(bench: Bench):
    rec = getattr(bench, "prompts_record", None)
    if not rec:
        return
    g = rec["batch1"]["groups"] if "batch1" in rec else {}
    o = g.get("ordinary (all)")
    if o:
        bench.goal(
            "ordinary prompts: TiDAR defaults vs HF prompt lookup (overall; every prompt)",
            ">= 1.00x; >= 0.85x",
            f"{o['x_lookup_tidar']:.2f}x; min {o['x_lookup_tidar_per_prompt']['min']:.2f}x",
            "met" if o["x_lookup_tidar"] >= 1.0 and o["x_lookup_tidar_per_prompt"]["min"] >= 0.85 else "missed",
        )
        bench.goal(
            "ordinary prompts: TiDAR defaults vs HF AR (overall)",
            ">= 1.50x",
            f"{o['x_ar_tidar']:.2f}x",
            "met" if o["x_ar_tidar"] >= 1.5 else "missed",
        )
    d = g.get("demo")
    if d:
        bench.goal(
            "demo prompts: TiDAR defaults vs HF AR",
            ">= 2.50x",
            f"{d['x_ar_tidar']:.2f}x",
            "met" if d["x_ar_tidar"] >= 2.5 else "missed",
        )
    worst = [r["x_ar_tidar"] for r in rec.get("batch1", {}).get("prompts", [])]
    worst += [r["x_ar_tidar"] for k in ("batches", "sampled") for r in rec.get(k, {}).get("rows", [])]
    worst += [r["x_ar_tidar"] for r in rec.get("fresh", {}).get("prompts", [])]
    if worst:
        bench.goal(
            "never slower than AR (every prompt, batch 1/4/16, greedy and sampled)",
            ">= 0.95x",
            f"min {min(worst):.2f}x",
            "met" if min(worst) >= 0.95 else "missed",
        )
    control = [r["x_ar_control"] for r in rec.get("batch1", {}).get("prompts", []) if "x_ar_control" in r]
    if control:
        tidar_b1 = [r["x_ar_tidar"] for r in rec["batch1"]["prompts"]]
        below = sum(x < 0.95 for x in tidar_b1)
        bench.goal(
            "the noise floor of that goal at batch 1: HF AR timed against itself (A/A), per prompt",
            "(reference)",
            f"A/A min {min(control):.2f}x, {sum(x < 0.95 for x in control)} of {len(control)} prompts < 0.95x; "
            f"TiDAR: {below} of {len(tidar_b1)} < 0.95x",
            "-",
        )
    fresh = rec.get("fresh")
    if fresh:
        lk = [r["x_lookup_tidar"] for r in fresh["prompts"]]
        bench.goal(
            "fresh process per prompt: TiDAR defaults vs HF prompt lookup (overall; every prompt)",
            ">= 1.00x; >= 0.85x",
            f"{fresh['x_lookup_tidar']:.2f}x; min {min(lk):.2f}x",
            "met" if fresh["x_lookup_tidar"] >= 1.0 and min(lk) >= 0.85 else "missed",
        )
    same = (
        all(r["identical"] for r in rec.get("batch1", {}).get("prompts", []))
        and all(r.get("identical", True) for r in rec.get("batches", {}).get("rows", []))
        and all(r["identical"] for r in (fresh or {}).get("prompts", []))
    )
    bench.goal("every greedy text identical to HF greedy", "all", "yes" if same else "NO", "met" if same else "MISSED")


def plots(bench: Bench, plot):
    return []


def _f(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def _prompt_cell(prompt: str, width: int) -> str:
    """A prompt in one markdown table cell: newlines and pipes escaped, cut to ``width``."""
    return prompt.replace("\n", "\\n").replace("|", "\\|")[:width]


def markdown(rec: dict) -> str:
    b1 = rec.get("batch1", {"groups": {}, "prompts": []})
    lines = [
        "# TiDAR defaults on ordinary prompts",
        "",
        f"Model {rec['model']}, git {rec['git_sha']}, {rec['date']}, {rec['torch_threads']} torch threads.",
    ]
    if "batch1" in rec:
        lines += [
            f"Batch 1: {b1['new_tokens']} new tokens, best of {b1['rounds']} interleaved rounds per prompt.",
            "",
            "| prompts | n | TiDAR x AR | TiDAR x lookup | lookup x AR | per prompt x lookup (min / median / max) "
            "| per prompt x AR (min / median / max) | A/A: HF AR x itself per prompt (min / median / max) "
            "| identical |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for cls, g in b1["groups"].items():
        sl, sa = g["x_lookup_tidar_per_prompt"], g["x_ar_tidar_per_prompt"]
        sc = g.get("x_ar_control_per_prompt") or {"min": None, "median": None, "max": None}
        lines.append(
            f"| {cls} | {g['prompts']} | {_f(g['x_ar_tidar'])} | {_f(g['x_lookup_tidar'])} | {_f(g['x_ar_lookup'])} "
            f"| {_f(sl['min'])} / {_f(sl['median'])} / {_f(sl['max'])} "
            f"| {_f(sa['min'])} / {_f(sa['median'])} / {_f(sa['max'])} "
            f"| {_f(sc['min'])} / {_f(sc['median'])} / {_f(sc['max'])} | {'yes' if g['identical'] else 'NO'} |"
        )
    for key, title in (("batches", "Greedy batches (left-padded, different prompts)"), ("sampled", "Sampled")):
        r = rec.get(key)
        if not r:
            continue
        lines += ["", f"## {title}: {r['new_tokens']} new tokens, T = {r['temperature']}", ""]
        lines += [
            "| batch | prompts from | HF tok/s | TiDAR x HF | TiDAR tok/forward | identical |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            same = "-" if "identical" not in row else ("yes" if row["identical"] else "NO")
            lines.append(
                f"| {row['batch']} | {row['first_prompt']} | {row['hf_tok_s']:.0f} | {row['x_ar_tidar']:.2f} "
                f"| {_f(row['tidar_tokens_per_forward'])} | {same} |"
            )
    fresh = rec.get("fresh")
    if fresh:
        lines += [
            "",
            f"## A fresh process per prompt: {fresh['new_tokens']} new tokens, best of {fresh['rounds']} rounds",
            "",
            f"Overall: TiDAR {fresh['x_ar_tidar']:.2f}x HF AR, {fresh['x_lookup_tidar']:.2f}x prompt lookup.",
            "",
            "| class | fresh: x AR | one process: x AR | fresh: x lookup | one process: x lookup | tok/forward "
            "| identical | prompt |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in fresh["prompts"]:
            p = _prompt_cell(r["prompt"], 50)
            lines.append(
                f"| {r['class']} | {r['x_ar_tidar']:.2f} | {_f(r['one_process_x_ar_tidar'])} "
                f"| {r['x_lookup_tidar']:.2f} | {_f(r['one_process_x_lookup_tidar'])} "
                f"| {_f(r['tidar_tokens_per_forward'])} | {'yes' if r['identical'] else 'NO'} | `{p}` |"
            )
    if not b1["prompts"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## Per prompt (batch 1)",
        "",
        "| class | TiDAR x AR | TiDAR x lookup | lookup x AR | A/A | tok/forward | distinct 4-grams | prompt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in b1["prompts"]:
        p = _prompt_cell(r["prompt"], 60)
        lines.append(
            f"| {r['class']} | {r['x_ar_tidar']:.2f} | {r['x_lookup_tidar']:.2f} | {r['x_ar_lookup']:.2f} "
            f"| {_f(r.get('x_ar_control'))} | {_f(r['tidar_tokens_per_forward'])} | {_f(r['distinct_4grams'])} "
            f"| `{p}` |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    fresh_main()
