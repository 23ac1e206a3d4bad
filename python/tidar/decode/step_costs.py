"""What decode steps cost in this process, timed by the steps themselves.

The planner prices a plan from the slot curve and from host and sampling terms measured once per process
(``slot_timing``, ``decoder._host_calibrated``). Those prices are a model of the step, and the model can be wrong
by tens of percent in a given process: the same sampled request ran at 0.56x HF AR in one process and 1.18x in
another because a drafted sampled step (22.5 ms measured) was priced near an AR step (12.1 ms); context-drafted
steps at batch 16 measured about 20% above their price (benchmarks/results/2026-12-06-cpu-prompts-quiet). So the
decoder times every step it runs (wall clock: its planning, forward, verification and commit), and a plan that
has run ``MIN_SAMPLES`` times is priced at the median of its last ``WINDOW`` times instead of its modelled cost.

The times are kept per process and per (model, dtype, device, threads; batch): what a step costs is a property of
the machine, not of one request (unlike the acceptance evidence, which starts at the priors in every request).
Only measured curves learn: a curve handed in with ``set_slot_curve`` (a test's, or one measured elsewhere) is
taken as it is (``SlotCurve.step_feedback``). Only greedy requests use them: greedy tokens do not depend on the
plans (exactness), while a sampled request's tokens do (each plan draws its own uniforms), and the same seed must
give the same tokens, so sampled plans keep the process's fixed prices.
"""

from __future__ import annotations

from collections import deque
from statistics import median

WINDOW = 15  # recent times per plan (the cache grows during a request; old times age out)
MIN_SAMPLES = 3  # times before a plan's median replaces its modelled cost (one slow first call is not a price)
_REGISTRY: dict[tuple, StepCosts] = {}


class StepCosts:
    """Recent wall-clock times (ms) of decode steps per plan key ``(K, number of proposal levels)``; ``medians``
    holds the median of every key with at least ``MIN_SAMPLES`` times."""

    def __init__(self, window: int = WINDOW, min_samples: int = MIN_SAMPLES):
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_samples <= window, got {window} and {min_samples}")
        self.window, self.min_samples = window, min_samples
        self.times: dict[tuple, deque] = {}
        self.medians: dict[tuple, float] = {}

    def add(self, key: tuple, ms: float) -> float | None:
        """Record one step of plan ``key`` that took ``ms``; returns the key's median (None below MIN_SAMPLES)."""
        if not ms >= 0.0:  # NaN or negative: a broken clock, never a price
            raise ValueError(f"ms must be a time >= 0, got {ms}")
        times = self.times.setdefault(key, deque(maxlen=self.window))
        times.append(float(ms))
        if len(times) >= self.min_samples:
            self.medians[key] = median(times)
        return self.medians.get(key)

    def clear(self) -> None:
        self.times.clear()
        self.medians.clear()


def step_costs(curve, batch: int) -> StepCosts | None:
    """The process's greedy step times for decoding with ``curve`` at ``batch`` rows; None where the curve is not
    corrected by measurement (``SlotCurve.step_feedback`` is False: a curve given by hand)."""
    if not getattr(curve, "step_feedback", False):
        return None
    return _REGISTRY.setdefault((curve.key, int(batch)), StepCosts())


def clear_step_costs() -> None:
    """Forget every step time of this process (a benchmark that compares cold starts)."""
    _REGISTRY.clear()
