"""The one timer (``tidar_kernels.timing``) and the benchmarks' statistics on it, on the CPU: an interval measures
the work inside it, the token-slot curve times with the same timer, and the benchmark Timing rows keep their
statistics (median inside p20..p80; interleaved calls: one interval per call)."""

from __future__ import annotations

import time

import pytest
import torch

from tidar_kernels import timing

CPU = torch.device("cpu")


def test_an_interval_measures_the_work_inside_it():
    assert timing.clock_name(CPU) == "perf_counter"
    ms = timing.time_ms(lambda: time.sleep(0.02), CPU)
    assert 15 <= ms < 2000
    iv = timing.Interval(CPU)
    iv.start()
    time.sleep(0.01)
    iv.stop()
    assert 5 <= iv.ms() < 2000
    timing.synchronize(CPU)  # nothing queued on a CPU: returns


def test_the_slot_curve_times_with_the_shared_timer():
    from tidar.decode import slot_timing

    run = slot_timing._timer(CPU)
    assert 15 <= run(lambda: time.sleep(0.02)) < 2000


def test_benchmark_timings_keep_their_statistics():
    from benchmarks.timing import interleaved, interleaved_timing, quantile, time_fn, timed_call

    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0 and quantile([5.0], 0.2) == 5.0
    t = time_fn(lambda: sum(range(1000)), CPU, smoke=True)
    assert t.timer == "perf_counter" and t.n_runs >= 3 and 0 < t.p20_ms <= t.ms <= t.p80_ms
    calls = []
    a, b = interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 3, CPU)
    assert len(a) == len(b) == 3 and calls == ["a", "b"] * 4  # one warm-up call each, then in turn
    row = interleaved_timing([1.0, 2.0, 3.0, 4.0], CPU)
    assert row.timer == "perf_counter, interleaved" and row.p20_ms <= row.ms == 2.5 <= row.p80_ms
    out, s = timed_call(lambda: time.sleep(0.01) or 7, CPU)
    assert out == 7 and 0.005 <= s < 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_intervals_are_events():
    dev = torch.device("cuda")
    assert timing.clock_name(dev) == "cuda-events"
    x = torch.randn(2048, 2048, device=dev)
    assert timing.time_ms(lambda: x @ x, dev) > 0
