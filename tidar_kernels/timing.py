"""The one timer of the project: milliseconds of work on a device, CUDA events on a GPU, ``perf_counter`` on a CPU.

Used by the token-slot curve (``tidar.decode.slot_timing``) and by every benchmark (``benchmarks/``), so a
curve that ``draft_len="auto"`` plans with and a benchmark row are measured the same way. The statistic over
repeated calls (fastest of rounds, median, quantiles) is the caller's: this module times intervals.

- GPU: a pair of CUDA events around the work, read after the end event has completed. The interval is the
  device's time from the start event to the end event: the work queued in between, and any host time the
  device spends waiting for it (a host sync inside the work is counted, as on a wall clock).
- CPU: ``time.perf_counter`` around the work (CPU work is done when the call returns).

Imports torch only (no transformers, nothing of ``tidar``): a low layer that ``tidar`` and ``benchmarks`` import.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def clock_name(device) -> str:
    """What times an interval on ``device``: ``cuda-events`` or ``perf_counter`` (a benchmark row's timer)."""
    return "cuda-events" if _cuda(device) else "perf_counter"


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU)."""
    if _cuda(device):
        torch.cuda.synchronize(device)


class Interval:
    """One timed interval: ``start()``, the work, ``stop()``, then ``ms()``. Many intervals can be recorded
    back to back and read after one synchronisation (``ms()`` waits for its own end event)."""

    __slots__ = ("_cuda", "_start", "_end")

    def __init__(self, device):
        self._cuda = _cuda(device)
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        else:
            self._start = self._end = None

    def start(self) -> None:
        if self._cuda:
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._end = time.perf_counter()

    def ms(self) -> float:
        if self._cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._end - self._start) * 1e3


def time_ms(fn: Callable, device) -> float:
    """Milliseconds of one call of ``fn`` on ``device`` (its result is dropped)."""
    interval = Interval(device)
    interval.start()
    fn()
    interval.stop()
    return interval.ms()


def timer(device) -> Callable[[Callable], float]:
    """``time_ms`` bound to ``device``: ``run(fn)`` gives the milliseconds of one call of ``fn``."""
    device = torch.device(device)
    return lambda fn: time_ms(fn, device)
