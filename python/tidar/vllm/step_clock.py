"""What a step of the engine costs on this machine, measured while it serves (docs/design.md §10).

``draft_source`` prices drafts and [MASK] blocks in units of a step's fixed cost: a row costs ``row_cost`` of it, a
block step's own work (its layout, its attention in every layer, the drafts' logits) ``block_cost``, and a step that
verifies drafts ``verify_cost`` (vLLM's rejection sampler; a step without drafts takes its plain sampler). Constants
measured once cannot hold everywhere: the ones kept in ``draft_source`` came from 8 requests at two threads (a 4.7 ms
step, ``block_cost`` 0.1), while one request at one thread on the same CPU has a ~2 ms step, a row of ~0.1 ms and a
block step ~1.2-2.3 ms dearer (``block_cost`` ~0.7-1.2: blocks there cost more than v6's drafts return). So the proposer
times the engine's steps (``begin``: the period from one step's start to the next, scheduler, sampler and
detokenizer included) against the rows each forward ran (``ran``) and fits ``ms = fixed + row * rows + block *
has_block + verify * has_drafts`` by least squares over decayed sums; the prices are ``row / fixed``, ``block /
fixed`` and ``verify / fixed`` once ``MIN_STEPS`` steps with varied rows are in, the constants until then (a block's
or a verification's price only once both kinds of step were seen). A period much longer than the fit (or, before
it, than the steps so far) is idle time between requests, not a step, and is skipped.
"""

from __future__ import annotations

import time

import numpy as np


class Prices:
    """Fixed prices: ``row_cost``, ``block_cost`` and ``verify_cost`` in units of a step's fixed cost."""

    measured = False

    def __init__(self, row_cost: float, block_cost: float, verify_cost: float = 0.0):
        self.row_cost, self.block_cost, self.verify_cost = float(row_cost), float(block_cost), float(verify_cost)

    def begin(self, now: float | None = None) -> None:  # the clock's interface: fixed prices ignore it
        pass

    def ran(self, rows: int, block: bool, verify: bool = False) -> None:
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
    VERIFY_RANGE = (0.0, 1.0)

    def __init__(self, row_cost: float, block_cost: float, verify_cost: float = 0.0):
        super().__init__(row_cost, block_cost, verify_cost)  # the prior prices, kept until the first fit
        self.A = np.zeros((4, 4))  # decayed sums of x x^T, x = (1, rows, has_block, has_drafts)
        self.y = np.zeros(4)  # decayed sums of x * ms
        self.steps = 0
        # (fixed ms, ms per row, ms per block step, ms per step that verifies drafts)
        self.fit: tuple[float, float, float, float] | None = None
        self._mean = None  # decayed mean period before the first fit
        self._start: float | None = None  # when the step running now began
        self._step: tuple[int, bool, bool] | None = None  # its rows, whether it carried a block, verified drafts

    def begin(self, now: float | None = None) -> None:
        """A step starts: the one before it ran from its own start until now."""
        now = time.perf_counter() if now is None else now
        if self._start is not None and self._step is not None:
            self._add(*self._step, (now - self._start) * 1e3)
        self._start, self._step = now, None

    def ran(self, rows: int, block: bool, verify: bool = False) -> None:
        """The step that began last ran a forward of ``rows`` rows, with [MASK] blocks or not, verifying drafts or
        not."""
        self._step = (int(rows), bool(block), bool(verify))

    def skip(self) -> None:
        """The step that began last is not a serving step (a dummy or profiling run): its period is not counted."""
        self._step = None

    def expected_ms(self, rows: int, block: bool, verify: bool = False) -> float | None:
        """The fitted time of a step of ``rows`` rows (the mean step before the first fit; None before any)."""
        if self.fit is not None:
            a, b, c, d = self.fit
            return a + b * rows + c * block + d * verify
        return self._mean

    def _add(self, rows: int, block: bool, verify: bool, ms: float) -> None:
        if not ms > 0.0:  # a clock that did not move forward: no step to learn from
            return
        expect = self.expected_ms(rows, block, verify)
        if expect is not None and self.steps >= 2 and ms > self.IDLE * expect:
            return  # the engine waited for requests between the two steps
        x = np.array([1.0, rows, 1.0 if block else 0.0, 1.0 if verify else 0.0])
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
        # a block step's or a verifying step's price needs both kinds of step in the sums
        idx = [0, 1] + [j for j in (2, 3) if 0.02 < A[j, j] / n < 0.98]
        try:
            theta = np.linalg.solve(A[np.ix_(idx, idx)], y[idx])
        except np.linalg.LinAlgError:
            return
        coef = dict(zip(idx, (float(t) for t in theta)))
        a, b = coef[0], max(0.0, coef[1])
        if a <= 0:
            return
        c, d = (max(0.0, coef[j]) if j in coef else None for j in (2, 3))
        self.fit = (a, b, c or 0.0, d or 0.0)
        self.row_cost = min(max(b / a, self.ROW_RANGE[0]), self.ROW_RANGE[1])
        if c is not None:
            self.block_cost = min(max(c / a, self.BLOCK_RANGE[0]), self.BLOCK_RANGE[1])
        if d is not None:
            self.verify_cost = min(max(d / a, self.VERIFY_RANGE[0]), self.VERIFY_RANGE[1])
