"""How the benchmarks time a call (``Bench.time`` and the interleaved decode timings).

Every interval is ``tidar_kernels.timing``'s (CUDA events on a GPU, ``perf_counter`` on a CPU), the timer the
token-slot curve uses too. On top of it:
- CUDA, cold L2, no graph: ``triton.testing.do_bench`` (CUDA events around each run, a 256 MB flush before
  each run, warm-up by time), median and p20/p80.
- CUDA, warm L2 or CUDA graph: the same event loop written out here (do_bench always flushes and cannot
  replay a graph); a graph is captured once after a side-stream warm-up and its replays are timed.
- CPU: one interval around each call, after warm-up calls.
- Interleaved (``interleaved``): several callables in turn, each call its own synchronised interval, for
  comparisons on a shared, noisy machine; the caller reports the median.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tidar_kernels.timing import Interval, clock_name, synchronize, time_ms

from .report import short


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


def quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _quantile_timing(times, timer, cold_l2, cuda_graph, notes) -> Timing:
    """Median and p20/p80 of ``times`` (ms)."""
    p20, med, p80 = (quantile(times, q) for q in (0.2, 0.5, 0.8))
    return Timing(med, p20, p80, len(times), timer, cold_l2, cuda_graph, notes)


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
    cuda = torch.device("cuda", dev)
    buf = _flush_buffer(dev) if flush else None

    def one(interval=None):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        if buf is not None:
            buf.zero_()
        if interval is not None:
            interval.start()
        fn()
        if interval is not None:
            interval.stop()

    one()
    torch.cuda.synchronize()
    first = Interval(cuda)  # the cost of a run, from 5 back to back: sets the warm-up and repetition counts
    first.start()
    for _ in range(5):
        one()
    first.stop()
    torch.cuda.synchronize()
    est = max(first.ms() / 5, 1e-4)
    n_warm = max(1, min(int(warmup_ms / est), max_runs))
    n_rep = max(5, min(int(rep_ms / est), max_runs))
    for _ in range(n_warm):
        one()
    intervals = [Interval(cuda) for _ in range(n_rep)]
    for interval in intervals:
        one(interval)
    torch.cuda.synchronize()
    return [interval.ms() for interval in intervals]


def _cpu_loop(fn, warmup_ms, rep_ms, max_runs=200, min_runs=3):
    cpu = torch.device("cpu")
    if time_ms(fn, cpu) <= warmup_ms:  # one warm-up call more, unless the first call took the warm-up time
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        times.append(time_ms(fn, cpu))
    return times


def time_fn(
    fn: Callable,
    device: torch.device,
    *,
    smoke: bool = False,
    cold_l2: bool = False,
    graph: bool = False,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    grad_to_none=None,
) -> Timing:
    """Median and p20/p80 of ``fn()`` in ms on ``device`` (see the module doc for the method on each device)."""
    if device.type != "cuda":
        if smoke:
            warmup_ms, rep_ms = min(warmup_ms, 5), min(rep_ms, 20)
        times = _cpu_loop(fn, warmup_ms, rep_ms)
        return _quantile_timing(
            times, clock_name(device), False, False, ["cold L2 not applied on CPU"] if cold_l2 else []
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
    return _quantile_timing(times, clock_name(device), cold_l2, used_graph, notes)


def interleaved(fns: list, rounds: int, device) -> list[list[float]]:
    """ms of each fn, called in turn ``rounds`` times after one warm-up call each; every call is its own
    interval, started after the device is idle."""
    for f in fns:
        f()
    synchronize(device)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            times[i].append(time_ms(f, device))
    return times


def interleaved_timing(ts: list[float], device) -> Timing:
    """The Timing row of interleaved calls: median, and p20/p80 from ``statistics.quantiles`` (clamped to the
    median)."""
    q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
    med = statistics.median(ts)
    return Timing(med, min(q[0], med), max(q[3], med), len(ts), f"{clock_name(device)}, interleaved", False, False)


def timed_call(fn: Callable, device):
    """``(fn(), seconds)``: one call of a whole run (a generation), its result kept."""
    out = []
    ms = time_ms(lambda: out.append(fn()), device)
    return out[0], ms / 1e3
