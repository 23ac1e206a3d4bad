"""What a run writes: the CSV columns, one printed line per row, ``results.md`` (goals, notes, one table per
suite) and PNG plots; ``short`` turns an exception into a row's reason."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

COLUMNS = [
    "suite",
    "case",
    "impl",
    "status",
    "reason",
    "ms",
    "p20_ms",
    "p80_ms",
    "n_runs",
    "timer",
    "cold_l2",
    "cuda_graph",
    "tflops",
    "pct_matmul_peak",
    "gbps",
    "pct_copy_bw",
    "check",
    "notes",
    "params",
    "extra",
    "device",
    "gpu",
    "torch",
    "triton",
    "cuda",
    "git_sha",
    "date",
]


def short(e: BaseException, n: int = 240) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}" + ("..." if len(msg) > n else "")


def write_csv(rows: list[dict], path: Path) -> None:
    """Every row, every column (dicts as JSON, floats to 6 significant digits)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


def _csv_value(v):
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _fmt(v, spec="{:.3g}"):
    if v is None or v == "":
        return ""
    return spec.format(v) if isinstance(v, (int, float)) else str(v)


def one_line(r: dict) -> str:
    head = f"[{r['suite']}] {r['case']} | {r['impl']} | {r['status']}"
    if r["status"] == "ok":
        s = f"{head} | {r['ms']:.4g} ms (p20 {r['p20_ms']:.4g}, p80 {r['p80_ms']:.4g})"
        if r.get("tflops"):
            s += f" | {r['tflops']:.3g} TFLOP/s"
        if r.get("gbps"):
            s += f" | {r['gbps']:.4g} GB/s"
        if r.get("check"):
            s += f" | {r['check']}"
        return s
    if r["status"] == "derived":
        return f"{head} | {json.dumps(r.get('extra'), sort_keys=True)}"
    return f"{head} | {r['reason']}"


def markdown(rows, env, ceil, goals, notes, command) -> str:
    lines = ["# tidar-kernels benchmarks", "", f"Command: `{command}`", ""]
    lines += [
        "| device | gpu | torch | triton | CUDA | git sha | date | matmul peak (TFLOP/s) | copy (GB/s) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {env['device']} | {env['gpu']} | {env['torch']} | {env['triton']} | {env['cuda']} | {env['git_sha']} "
        f"| {env['date']} | {_fmt(ceil.get('matmul_tflops'), '{:.1f}')} | {_fmt(ceil.get('copy_gbps'), '{:.0f}')} |",
        "",
    ]
    if goals:
        lines += ["## Goals", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
        lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | {g['verdict']} |" for g in goals]
        lines.append("")
    for n in notes:
        lines.append(f"- {n}")
    if notes:
        lines.append("")
    suites = []
    for r in rows:
        if r["suite"] not in suites:
            suites.append(r["suite"])
    for s in suites:
        rs = [r for r in rows if r["suite"] == s]
        lines += [f"## {s}", ""]
        if all(r["status"] == "derived" for r in rs):
            keys = []
            for r in rs:
                keys += [k for k in (r.get("extra") or {}) if k not in keys]
            lines += [
                "| case | impl | step ms | " + " | ".join(keys) + " | notes |",
                "|---|---|---|" + "---|" * len(keys) + "---|",
            ]
            for r in rs:
                ex = r.get("extra") or {}
                lines.append(
                    f"| {r['case']} | {r['impl']} | {_fmt(r['ms'], '{:.4g}')} | "
                    + " | ".join(_fmt(ex.get(k), "{:.4g}") for k in keys)
                    + f" | {r['notes']} |"
                )
            lines.append("")
            continue
        lines += [
            "| case | impl | status | ms (p20-p80) | TFLOP/s | % matmul peak | GB/s | % copy BW | check | notes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            if r["status"] == "ok":
                ms = f"{r['ms']:.4g} ({r['p20_ms']:.4g}-{r['p80_ms']:.4g})"
                timer = f"{r['timer']}{', cold L2' if r['cold_l2'] else ''}{', graph' if r['cuda_graph'] else ''}"
                note = "; ".join(x for x in (timer, r["notes"]) if x)
            else:
                ms, note = "", r["reason"]
            lines.append(
                f"| {r['case']} | {r['impl']} | {r['status']} | {ms} | {_fmt(r.get('tflops'))} | "
                f"{_fmt(r.get('pct_matmul_peak'), '{:.1f}')} | {_fmt(r.get('gbps'), '{:.4g}')} | "
                f"{_fmt(r.get('pct_copy_bw'), '{:.1f}')} | {r.get('check', '')} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_lines(
    rows,
    path: Path,
    *,
    title: str,
    x: str,
    y: str,
    where: Callable = lambda r: True,
    series: str = "impl",
    logx: bool = False,
    logy: bool = False,
    xlabel=None,
    ylabel=None,
    hlines: dict | None = None,
) -> str | None:
    """One PNG: ``y`` (a row column, or a key of params/extra) against params[x], one line per ``series``.
    Returns the file name, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts: dict = {}
    for r in rows:
        if r["status"] not in ("ok", "derived") or not where(r):
            continue
        xv = (r.get("params") or {}).get(x)
        yv = r.get(y)
        if yv in (None, ""):
            yv = (r.get("extra") or {}).get(y)
        if xv is None or yv in (None, ""):
            continue
        pts.setdefault(r[series], []).append((xv, yv))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, xy in sorted(pts.items()):
        xy.sort()
        ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=name)
    for label, val in (hlines or {}).items():
        if val:
            ax.axhline(val, linestyle="--", color="grey", linewidth=1)
            ax.annotate(label, (0.01, val), xycoords=("axes fraction", "data"), fontsize=8, color="grey", va="bottom")
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
