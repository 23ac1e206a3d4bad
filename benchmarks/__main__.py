"""``python -m benchmarks --out DIR [--smoke] [--only attention,rejection,kv_append,attention_paged,e2e,prompts,vllm]``

Runs the chosen suites, then writes ``DIR/results.csv`` (every row, with provenance), ``DIR/results.md``
(goals first, then one table per suite), ``DIR/env.json`` and PNG plots (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

SUITES = ("attention", "rejection", "kv_append", "attention_paged", "e2e", "prompts", "vllm")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.csv, results.md, env.json and plots")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU is fine): proves the benchmarks run")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every suite's time budget (rows past a budget are skipped, saying so)",
    )
    p.add_argument(
        "--tpf",
        type=float,
        default=None,
        help="measured TiDAR tokens per forward to project tokens/s with (default: ask `tidar demo`)",
    )
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SUITES]
    if bad:
        p.error(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # e2e and prompts on CPU: the bundled model's decoding
    if device.type != "cuda" and not args.smoke and not set(only) <= {"e2e", "prompts", "vllm"}:
        print(
            "the full benchmarks need a CUDA device; on CPU run with --smoke (tiny shapes) or --only e2e,prompts",
            file=sys.stderr,
        )
        return 2
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    from .harness import Bench

    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    bench = Bench(device, Path(args.out), smoke=args.smoke, budget_scale=args.budget_scale, tpf=args.tpf)
    t0 = time.monotonic()
    modules = _run_suites(bench, only, t0)
    _summaries(bench, only, modules, plots=not args.no_plots)
    text = bench.write_markdown(command)
    bench.write_csv()
    print(f"# {len(bench.rows)} rows in {time.monotonic() - t0:.1f} s -> {bench.out}", flush=True)
    goals = text.split("## Goals")
    if len(goals) > 1:
        print("## Goals" + goals[1].split("\n## ")[0])
    return 0


def _run_suites(bench, only, t0) -> dict:
    """The ceilings, then each suite of ``only`` (``bench_<name>.run``); gives the suites' modules. A suite that
    breaks outside its rows leaves one error row; SIGTERM or Ctrl-C ends the run with the rows measured so far."""

    def _terminated(signum, frame):  # `timeout` sends SIGTERM: still write what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminated)
    modules = {}
    try:
        print(f"# {bench.env}", flush=True)
        bench.ceilings()
        for name in only:
            mod = importlib.import_module(f".bench_{name}", __package__)
            modules[name] = mod
            t = time.monotonic()
            bench.cli_suite = name
            try:
                mod.run(bench)
            except Exception as e:  # a suite that breaks outside its rows: one error row, the others still run
                bench.suite_name = name
                bench._error("(suite)", "(setup)", e)
            print(f"# suite {name}: {time.monotonic() - t:.1f} s", flush=True)
    except KeyboardInterrupt as e:
        bench.notes.append(
            f"RUN INTERRUPTED ({e}) after {time.monotonic() - t0:.0f} s: the tables hold the rows measured so far"
        )
    return modules


def _summaries(bench, only, modules: dict, plots: bool):
    """The smoke-run note, each suite's goal verdicts and (``plots``) its PNGs."""
    if bench.smoke or (not bench.cuda and not set(only) <= {"e2e", "prompts", "vllm"}):
        bench.notes.append(
            "SMOKE RUN: tiny shapes, CPU. The goal verdicts above exercise the code only; "
            "the goals are judged on full GPU runs"
        )
    for mod in modules.values():
        try:
            mod.goals(bench)
        except Exception as e:
            bench.notes.append(f"goal summary of {mod.__name__} failed: {type(e).__name__}: {e}")
    if plots:
        _plots(bench, modules.values())


def _plots(bench, modules):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        bench.notes.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    from .report import plot_lines

    def plot(name, **kw):
        return plot_lines(bench.rows, bench.out / name, **kw)

    made = []
    for mod in modules:
        try:
            made += [m for m in mod.plots(bench, plot) if m]
        except Exception as e:
            bench.notes.append(f"plots of {mod.__name__} failed: {type(e).__name__}: {e}")
    if made:
        bench.notes.append("plots: " + ", ".join(made))


if __name__ == "__main__":
    sys.exit(main())
