"""One benchmark run (``Bench``): its device and mode, the measured ceilings, suites with time budgets, and the
rows with provenance; plus the checks of a timed output against its reference.

Timing is ``timing.py`` (on ``tidar_kernels.timing``, the one timer), the outputs ``report.py``, the provenance
``environment.py``. A row is ``ok`` (timed), ``skipped`` (with the reason: backend not live, peer not importable,
time budget spent), ``error`` (the exception, shortened) or ``derived`` (computed from other rows): a peer that
fails never stops the run and never gets a number it did not earn.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from tidar_kernels.timing import synchronize

from .environment import env_info
from .report import COLUMNS, markdown, one_line, short, write_csv
from .timing import Timing, time_fn


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
        """Median and p20/p80 of ``fn()`` in ms (``timing.time_fn``: the method on each device)."""
        return time_fn(
            fn,
            self.device,
            smoke=self.smoke,
            cold_l2=cold_l2,
            graph=graph,
            warmup_ms=warmup_ms,
            rep_ms=rep_ms,
            grad_to_none=grad_to_none,
        )

    def sync(self):
        synchronize(self.device)

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
            print(one_line(full), flush=True)
        self.write_csv()  # after every row: a run cut short still leaves its rows
        return full

    # --- outputs -------------------------------------------------------------------------------
    def write_csv(self, path: Path | None = None):
        write_csv(self.rows, path or self.out / "results.csv")

    def write_markdown(self, command: str, path: Path | None = None) -> str:
        path = path or self.out / "results.md"
        text = markdown(self.rows, self.env, self._ceil or {}, self.goals, self.notes, command)
        path.write_text(text)
        (self.out / "env.json").write_text(json.dumps({**self.env, **(self._ceil or {}), "command": command}, indent=2))
        return text


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def err_check(out, ref, tol: float) -> str:
    e = rel_err(out, ref)
    return f"rel_err={e:.1e} " + ("ok" if e <= tol else f"HIGH (> {tol:g})")
