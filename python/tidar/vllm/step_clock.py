"""What a step of the engine costs on this machine, measured while it serves (docs/design.md §10).

``draft_source`` prices drafts and [MASK] blocks in units of a step's fixed cost: a row costs ``row_cost`` of it, a
block step's own work (its layout, its attention in every layer, the drafts' logits) ``block_cost``. Constants
measured once cannot hold everywhere: the ones kept in ``draft_source`` came from 8 requests at two threads (a 4.7 ms
step, ``block_cost`` 0.1), while one request at one thread on the same CPU has a ~2 ms step, a row of ~0.1 ms and a
block step ~1.2-2.3 ms dearer (``block_cost`` ~0.7-1.2: blocks there cost more than v6's drafts return). So the proposer
times the engine's steps (``begin``: the period from one step's start to the next, scheduler, sampler and
detokenizer included) against the rows each forward ran (``ran``) and fits ``ms = fixed + row * rows + block *
has_block`` by least squares over decayed sums; the prices are ``row / fixed`` and ``block / fixed`` once
``MIN_STEPS`` steps with varied rows are in, the constants until then. A period much longer than the fit (or, before
it, than the steps so far) is idle time between requests, not a step, and is skipped.
"""

from __future__ import annotations

import time

import numpy as np


class Prices:
    """Fixed prices: ``row_cost`` and ``block_cost`` in units of a step's fixed cost."""

    measured = False

    def __init__(self, row_cost: float, block_cost: float):
        self.row_cost, self.block_cost = float(row_cost), float(block_cost)

    def begin(self, now: float | None = None) -> None:  # the clock's interface: fixed prices ignore it
        pass

    def ran(self, rows: int, block: bool) -> None:
        pass

    def skip(self) -> None:
        pass


class StepClock(Prices):
    """Prices fitted to the engine's own step times (see the module docstring)."""

    measured = True
    MIN_STEPS = 24  # steps before the fit replaces the prior prices
    REFIT_EVERY = 8  # steps between fits (a fit is a small solve, not free at every step of a batch)
    DECAY = 0.99  # weight of the past per step (about the last hundred steps count)
    IDLE = 3.0  # a period over this many times the expected step is idle time, not a step
    ROW_RANGE = (0.002, 1.0)  # the fitted row_cost is kept inside this range
    BLOCK_RANGE = (0.0, 2.0)

    def __init__(self, row_cost: float, block_cost: float):
        super().__init__(row_cost, block_cost)  # the prior prices, kept until the first fit
        self.A = np.zeros((3, 3))  # decayed sums of x x^T, x = (1, rows, has_block)
        self.y = np.zeros(3)  # decayed sums of x * ms
        self.steps = 0
        self.fit: tuple[float, float, float] | None = None  # (fixed ms, ms per row, ms per block step)
        self._mean = None  # decayed mean period before the first fit
        self._start: float | None = None  # when the step running now began
        self._step: tuple[int, bool] | None = None  # its rows and whether it carried a block

    def begin(self, now: float | None = None) -> None:
        """A step starts: the one before it ran from its own start until now."""
        now = time.perf_counter() if now is None else now
        if self._start is not None and self._step is not None:
            self._add(*self._step, (now - self._start) * 1e3)
        self._start, self._step = now, None

    def ran(self, rows: int, block: bool) -> None:
        """The step that began last ran a forward of ``rows`` rows, with [MASK] blocks or not."""
        self._step = (int(rows), bool(block))

    def skip(self) -> None:
        """The step that began last is not a serving step (a dummy or profiling run): its period is not counted."""
        self._step = None

    def expected_ms(self, rows: int, block: bool) -> float | None:
        """The fitted time of a step of ``rows`` rows (the mean step before the first fit; None before any)."""
        if self.fit is not None:
            a, b, c = self.fit
            return a + b * rows + c * block
        return self._mean

    def _add(self, rows: int, block: bool, ms: float) -> None:
        if not ms > 0.0:  # a clock that did not move forward: no step to learn from
            return
        expect = self.expected_ms(rows, block)
        if expect is not None and self.steps >= 8 and ms > self.IDLE * expect:
            return  # the engine waited for requests between the two steps
        x = np.array([1.0, rows, 1.0 if block else 0.0])
        self.A = self.DECAY * self.A + np.outer(x, x)
        self.y = self.DECAY * self.y + x * ms
        self.steps += 1
        self._mean = ms if self._mean is None else 0.9 * self._mean + 0.1 * ms
        if self.steps >= self.MIN_STEPS and (self.fit is None or self.steps % self.REFIT_EVERY == 0):
            self._refit()

    def _refit(self) -> None:
        A, y = self.A, self.y
        n = A[0, 0]
        if A[1, 1] / n - (A[0, 1] / n) ** 2 < 0.25:  # rows never varied: their price cannot be told from the fixed cost
            return
        share = A[2, 2] / n  # steps with blocks: both kinds must be seen to price a block step
        idx = [0, 1, 2] if 0.02 < share < 0.98 else [0, 1]
        try:
            theta = np.linalg.solve(A[np.ix_(idx, idx)], y[idx])
        except np.linalg.LinAlgError:
            return
        blocks = len(idx) == 3
        a, b = float(theta[0]), max(0.0, float(theta[1]))
        c = max(0.0, float(theta[2])) if blocks else None
        if a <= 0:
            return
        self.fit = (a, b, c or 0.0)
        self.row_cost = min(max(b / a, self.ROW_RANGE[0]), self.ROW_RANGE[1])
        if c is not None:
            self.block_cost = min(max(c / a, self.BLOCK_RANGE[0]), self.BLOCK_RANGE[1])
