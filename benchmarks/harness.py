"""The shared benchmark harness: timing, ceilings, rows with provenance, and the CSV/markdown/PNG writers.

Timing (``Bench.time``):
- CUDA, cold L2, no graph: ``triton.testing.do_bench`` (CUDA events around each run, a 256 MB flush before
  each run, warm-up by time), median and p20/p80.
- CUDA, warm L2 or CUDA graph: the same event loop written out here (do_bench always flushes and cannot
  replay a graph); a graph is captured once after a side-stream warm-up and its replays are timed.
- CPU: ``time.perf_counter`` around each call, after warm-up calls.

Every row carries the device, GPU name, torch/triton/CUDA versions, git sha and date, so a CSV row can be
read without the run that made it. A row is ``ok`` (timed), ``skipped`` (with the reason: backend not
live, peer not importable, time budget spent) or ``error`` (the exception, shortened): a peer that fails
never stops the run and never gets a number it did not earn.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

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


# ------------------------------------------------------------------------------------------------
# provenance


def git_sha() -> str:
    """``git rev-parse HEAD`` (+ ``-dirty`` when the tree has changes), or ``unknown``. No network."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return info


def optional_import(name: str):
    """(module, None) or (None, why it is missing)."""
    if name == "flashinfer" and os.environ.get("TIDAR_BENCH_FLASHINFER", "1") == "0":
        return None, "disabled by TIDAR_BENCH_FLASHINFER=0"
    try:
        import importlib

        return importlib.import_module(name), None
    except Exception as e:  # ImportError, or a broken install raising anything else
        return None, f"{name} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


# ------------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    ms: float
    p20_ms: float
    p80_ms: float
    n_runs: int | None
    timer: str
    cold_l2: bool
    cuda_graph: bool
    notes: list = field(default_factory=list)


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class GraphUnavailable(RuntimeError):
    pass


def capture_graph(fn: Callable) -> Callable:
    """Capture ``fn`` (one call) in a CUDA graph and return its replay. Raises GraphUnavailable with the reason
    (a host sync inside ``fn`` is found first with sync-debug mode, which is clearer than a failed capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        raise GraphUnavailable(f"host sync inside the timed call ({short(e)})") from None
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:
        torch.cuda.synchronize()
        raise GraphUnavailable(f"capture failed ({short(e)})") from None
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay


_FLUSH: dict = {}


def _flush_buffer(device) -> torch.Tensor:
    if device not in _FLUSH:  # 256 MB: several times the L2 of an H100/H200 (50/60 MB), as do_bench
        _FLUSH[device] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
    return _FLUSH[device]


def _event_loop(fn, warmup_ms, rep_ms, flush, grad_to_none=None, max_runs=2000):
    dev = torch.cuda.current_device()
    buf = _flush_buffer(dev) if flush else None

    def one(start=None, end=None):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        if buf is not None:
            buf.zero_()
        if start is not None:
            start.record()
        fn()
        if end is not None:
            end.record()

    one()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        one()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-4)
    n_warm = max(1, min(int(warmup_ms / est), max_runs))
    n_rep = max(5, min(int(rep_ms / est), max_runs))
    for _ in range(n_warm):
        one()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        one(starts[i], ends[i])
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(starts, ends)]


def _cpu_loop(fn, warmup_ms, rep_ms, max_runs=200, min_runs=3):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    n_warm = 0 if first * 1e3 > warmup_ms else 1
    for _ in range(n_warm):
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


# ------------------------------------------------------------------------------------------------
# the run


def short(e: BaseException, n: int = 240) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}" + ("..." if len(msg) > n else "")


class Budget(Exception):
    pass


class Bench:
    """One benchmark run: device, mode (smoke or full), measured ceilings, rows, outputs."""

    def __init__(
        self, device, out: Path, smoke: bool, budget_scale: float = 1.0, tpf: float | None = None, verbose: bool = True
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(out)
        self.smoke = smoke
        self.budget_scale = budget_scale
        self.tpf = tpf
        self.verbose = verbose
        self.env = env_info(self.device)
        self.rows: list[dict] = []
        self.suite_name = ""
        self.cli_suite = ""  # the --only name of the running suite
        self._deadline = math.inf
        self._budget_s = math.inf
        self._ceil: dict | None = None
        self.goals: list[dict] = []  # {goal, target, measured, verdict}
        self.notes: list[str] = []
        self.out.mkdir(parents=True, exist_ok=True)

    # --- timing -------------------------------------------------------------------------------
    def time(
        self,
        fn: Callable,
        *,
        cold_l2: bool = False,
        graph: bool = False,
        warmup_ms: float = 25,
        rep_ms: float = 100,
        grad_to_none=None,
    ) -> Timing:
        """Median and p20/p80 of ``fn()`` in ms (see the module doc for the method on each device)."""
        if not self.cuda:
            if self.smoke:
                warmup_ms, rep_ms = min(warmup_ms, 5), min(rep_ms, 20)
            times = _cpu_loop(fn, warmup_ms, rep_ms)
            return Timing(
                _quantile(times, 0.5),
                _quantile(times, 0.2),
                _quantile(times, 0.8),
                len(times),
                "perf_counter",
                False,
                False,
                ["cold L2 not applied on CPU"] if cold_l2 else [],
            )
        notes = []
        run = fn
        used_graph = False
        if graph:
            try:
                run = capture_graph(fn)
                used_graph = True
            except GraphUnavailable as e:
                notes.append(f"eager: no CUDA graph ({e})")
        if cold_l2 and not used_graph:
            import triton.testing

            med, p20, p80 = triton.testing.do_bench(
                run, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none
            )
            return Timing(med, p20, p80, None, "do_bench", True, False, notes)
        times = _event_loop(run, warmup_ms, rep_ms, cold_l2, grad_to_none)
        return Timing(
            _quantile(times, 0.5),
            _quantile(times, 0.2),
            _quantile(times, 0.8),
            len(times),
            "cuda-events",
            cold_l2,
            used_graph,
            notes,
        )

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    # --- ceilings ------------------------------------------------------------------------------
    def ceilings(self) -> dict:
        """Measured bf16 (fp32 on CPU) matmul TFLOP/s and device copy GB/s (bytes read + written), once per run."""
        if self._ceil is not None:
            return self._ceil
        self._ceil = {"matmul_tflops": None, "copy_gbps": None}
        prev = self.suite_name
        self.suite_name = "ceilings"
        dt = torch.bfloat16 if self.cuda else torch.float32
        n = 8192 if self.cuda else 256
        try:
            a, b = (torch.randn(n, n, device=self.device, dtype=dt) for _ in range(2))
            t = self.time(lambda: a @ b, rep_ms=200)
            flops = 2 * n**3
            self._ceil["matmul_tflops"] = flops / t.ms / 1e9
            self._row(
                "matmul peak",
                f"{dt} {n}x{n}x{n} matmul",
                t,
                tflops=flops / t.ms / 1e9,
                params={"n": n},
                notes="the peak the attention rows are compared to",
            )
        except Exception as e:
            self._error("matmul peak", f"{n}^3", e)
        numel = (1 << 29) if self.cuda else (1 << 22)  # 1 GiB of bf16 / 8 MiB of fp16 on CPU
        try:
            src = torch.randn(numel, device=self.device, dtype=torch.float16)
            dst = torch.empty_like(src)
            t = self.time(lambda: dst.copy_(src), cold_l2=True, rep_ms=200)
            byt = 2 * src.numel() * src.element_size()
            self._ceil["copy_gbps"] = byt / t.ms / 1e6
            self._row(
                "copy bandwidth",
                f"{byt / 2 / 2**20:.0f} MiB device copy",
                t,
                gbps=byt / t.ms / 1e6,
                params={"bytes": byt},
                notes="GB/s counts bytes read + bytes written",
            )
            src = dst = None  # free the buffers (the timed closure keeps its cells)
        except Exception as e:
            self._error("copy bandwidth", "device copy", e)
        self.suite_name = prev
        return self._ceil

    # --- suites and rows -----------------------------------------------------------------------
    def start_suite(self, name: str, budget_s: float):
        self.suite_name = name
        self._budget_s = budget_s * self.budget_scale
        self._deadline = time.monotonic() + self._budget_s

    def over_budget(self) -> bool:
        return time.monotonic() > self._deadline

    def budget_reason(self) -> str:
        return (
            f"time budget of the suite ({self._budget_s:.0f} s) spent; rerun with "
            f"--only {self.cli_suite or self.suite_name} or a larger --budget-scale"
        )

    def measure(
        self,
        case: str,
        impl: str,
        setup: Callable,
        *,
        flops: float | None = None,
        bytes_moved: float | None = None,
        cold_l2: bool = False,
        graph: bool = False,
        params: dict | None = None,
        notes: str = "",
        suite: str | None = None,
        rep_ms: float = 100,
        grad_to_none: Callable | None = None,
    ) -> dict | None:
        """Time one implementation on one case. ``setup()`` builds the inputs and returns ``(fn, check)``:
        ``fn`` is timed, ``check`` (a string or None) says how its output compared with the reference.
        Never raises: a failure becomes an ``error`` row."""
        if self.over_budget():
            return self.skip(case, impl, self.budget_reason(), params=params, suite=suite)
        try:
            fn, check = setup()
            timing = self.time(
                fn, cold_l2=cold_l2, graph=graph, rep_ms=rep_ms, grad_to_none=grad_to_none() if grad_to_none else None
            )
        except Exception as e:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return self._error(impl, case, e, params=params, suite=suite)
        ceil = self._ceil or {}
        tflops = flops / timing.ms / 1e9 if flops else None
        gbps = bytes_moved / timing.ms / 1e6 if bytes_moved else None
        all_notes = "; ".join([n for n in [notes] + timing.notes if n])
        return self._row(
            impl,
            case,
            timing,
            tflops=tflops,
            gbps=gbps,
            check=check,
            params=params,
            notes=all_notes,
            suite=suite,
            peak=ceil.get("matmul_tflops"),
            copy=ceil.get("copy_gbps"),
        )

    def skip(self, case: str, impl: str, reason: str, *, params=None, suite=None) -> dict:
        return self._add(
            {
                "suite": suite or self.suite_name,
                "case": case,
                "impl": impl,
                "status": "skipped",
                "reason": reason,
                "params": params or {},
            }
        )

    def derived(self, case: str, impl: str, ms: float | None, extra: dict, *, suite=None, params=None, notes=""):
        """A row computed from measured rows (no timing of its own), e.g. projected tokens/s."""
        return self._add(
            {
                "suite": suite or self.suite_name,
                "case": case,
                "impl": impl,
                "status": "derived",
                "ms": ms,
                "extra": extra,
                "params": params or {},
                "notes": notes,
            }
        )

    def goal(self, goal: str, target: str, measured: str, verdict: str):
        self.goals.append({"goal": goal, "target": target, "measured": measured, "verdict": verdict})

    def _row(
        self,
        impl,
        case,
        t: Timing,
        *,
        tflops=None,
        gbps=None,
        check=None,
        params=None,
        notes="",
        suite=None,
        peak=None,
        copy=None,
    ):
        row = {
            "suite": suite or self.suite_name,
            "case": case,
            "impl": impl,
            "status": "ok",
            "ms": t.ms,
            "p20_ms": t.p20_ms,
            "p80_ms": t.p80_ms,
            "n_runs": t.n_runs,
            "timer": t.timer,
            "cold_l2": t.cold_l2,
            "cuda_graph": t.cuda_graph,
            "tflops": tflops,
            "gbps": gbps,
            "check": check or "",
            "notes": notes,
            "params": params or {},
        }
        if tflops is not None and peak:
            row["pct_matmul_peak"] = 100 * tflops / peak
        if gbps is not None and copy:
            row["pct_copy_bw"] = 100 * gbps / copy
        return self._add(row)

    def _error(self, impl, case, e, *, params=None, suite=None):
        if os.environ.get("TIDAR_BENCH_DEBUG"):
            traceback.print_exc()
        return self._add(
            {
                "suite": suite or self.suite_name,
                "case": case,
                "impl": impl,
                "status": "error",
                "reason": short(e),
                "params": params or {},
            }
        )

    def _add(self, row: dict) -> dict:
        full = {c: "" for c in COLUMNS}
        full.update(row)
        full.update(self.env)
        self.rows.append(full)
        if self.verbose:
            print(_one_line(full), flush=True)
        self.write_csv()  # after every row: a run cut short still leaves its rows
        return full

    # --- outputs -------------------------------------------------------------------------------
    def write_csv(self, path: Path | None = None):
        path = path or self.out / "results.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})

    def write_markdown(self, command: str, path: Path | None = None) -> str:
        path = path or self.out / "results.md"
        text = markdown(self.rows, self.env, self._ceil or {}, self.goals, self.notes, command)
        path.write_text(text)
        (self.out / "env.json").write_text(json.dumps({**self.env, **(self._ceil or {}), "command": command}, indent=2))
        return text


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


def _one_line(r: dict) -> str:
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


# ------------------------------------------------------------------------------------------------
# plots


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


# ------------------------------------------------------------------------------------------------
# our backends


def our_backends(op: str, device: torch.device) -> list[tuple[str, str | None]]:
    """Every backend of ``op`` with None when it runs on ``device``, else the reason it does not
    (from ``tidar_kernels``' own dispatch, so the row says what ``tidar env`` would)."""
    from tidar_kernels import backends as kb

    live = kb.live_backends(device).get(op, [])
    out = []
    for b in kb.BACKENDS:
        if b in live:
            out.append((b, None))
            continue
        try:
            kb.resolve(op, b, device)
            out.append((b, "not live on this device"))
        except Exception as e:
            out.append((b, " ".join(str(e).split())))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def err_check(out, ref, tol: float) -> str:
    e = rel_err(out, ref)
    return f"rel_err={e:.1e} " + ("ok" if e <= tol else f"HIGH (> {tol:g})")
