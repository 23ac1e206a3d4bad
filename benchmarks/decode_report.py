"""``decode.md``: the decode suite's record (``bench_decode.run``) as tables: the token-slot curve, the TiDAR step
against an HF forward of the same tokens, and end-to-end tokens/s per prompt group and configuration."""

from __future__ import annotations


def _f(v, spec="{:.2f}"):
    return "" if v is None else spec.format(v)


def markdown(rec: dict, prefix: int) -> str:
    """decode.md from the record; ``prefix``: the cached tokens before each timed step."""
    m, v = rec["machine"], rec["versions"]
    lines = [
        "# TiDAR decoding on the bundled model" + (" (SMOKE: tiny run)" if rec.get("smoke") else ""),
        "",
        f"Command: `{rec['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; load average {m.get('load_average_1m_5m_15m')} at the start, "
        f"{m.get('load_average_at_end')} at the end",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, tidar {v['tidar']}; "
        f"git {rec['git_sha']}; {rec['date']}; model {rec.get('model')}",
        "",
    ]
    c = rec.get("curve")
    if c:
        lines += [
            "## Token-slot curve",
            "",
            "| tokens | " + " | ".join(map(str, c["tokens"])) + " |",
            "|---|" + "---|" * len(c["tokens"]),
            "| ms | " + " | ".join(f"{x:.2f}" for x in c["body_ms"]) + " |",
            "",
            f"LM head {c['head_ms_per_row']:.4f} ms per row; measured in {c['measured_s']:.1f} s.",
            "",
        ]
    if rec.get("steps"):
        lines += [
            "## TiDAR step vs HF forward of the same tokens",
            "",
            f"Prefix {prefix} tokens; calls alternate; median (min) ms.",
            "",
            "| K | levels | tokens S | TiDAR step ms | HF forward ms | step/forward median | min/min |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in rec["steps"]:
            lines.append(
                f"| {s['K']} | {s['levels']} | {s['S']} "
                f"| {s['tidar_ms_median']:.2f} ({s['tidar_ms_min']:.2f}) "
                f"| {s['hf_ms_median']:.2f} ({s['hf_ms_min']:.2f}) | {s['ratio_median']:.2f}x "
                f"| {s['ratio_min']:.2f}x |"
            )
        lines.append("")
    e = rec.get("e2e")
    if e:
        lines += [f"## End to end: greedy, {e['new_tokens']} new tokens, {e['rounds']} interleaved rounds", ""]
        for group, cfgs in e["configs"].items():
            n = sum(1 for p in e["prompts"] if group == "all" or p["set"] == group)
            lines += [
                f"### {group} prompts ({n})",
                "",
                "| configuration | tok/s median | tok/s best | x AR median | x AR best | tok/forward | identical |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, x in cfgs.items():
                lines.append(
                    f"| {name} | {x['tokens_per_s_median']:.1f} | {x['tokens_per_s_best']:.1f} | "
                    f"{_f(x['x_ar_median'])} | {_f(x['x_ar_best'])} | {_f(x['tokens_per_forward'])} | "
                    f"{'yes' if x['identical'] else 'NO'} |"
                )
            lines.append("")
        auto = [(n, x) for n, x in e["configs"].get("all", {}).items() if "draft_lens" in x and "auto" in n]
        for n, x in auto:
            lines.append(f"- {n}: K per step {x['draft_lens']}; draft sources {x['draft_sources']}")
        lines += ["", "Prompts: " + "; ".join(f"{p['set']}: `{p['text'][:40]!r}...`" for p in e["prompts"]), ""]
    return "\n".join(lines)
