"""Choosing K and the proposal levels of each step (``draft_len="auto"``, docs/design.md §4).

Expected tokens per second of a plan = expected tokens per step / the step's cost, with the cost from the
measured token-slot curve (``slot_curve``: the forward by token count, the LM head's cost per call and per row,
the host work of a step) and the expectation from acceptance statistics: per draft source (diffusion, context)
and per depth i, the rate ``alpha_i`` at which draft i is accepted once drafts 1..i-1 were.

Statistics belong to one request: every ``generate`` call starts from the priors (``new_stats``), so a request's
speed never depends on what the model decoded before, and each row keeps its own evidence (``new_row_stats``),
which adapts within a few steps (a long accepted run of context drafts means the text loops: draft long; a miss
means shorten). The diffusion plans are scored at their steady state on the request's statistics (a plan's levels
decide how many drafts the next step gets); each step then picks K for the drafts every row actually has, the
step's cost being the slot curve at all rows' tokens, or, for a plan the decoder has timed a few times in this
process, the median of its measured times (``step_costs``: the model of a step can be off by tens of percent in a
given process, the steps' own clock is not). Plain AR steps (K = 1, no levels) are a plan like any
other, so TiDAR is never slower than AR by choice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tidar.decode.context_drafts import MAX_MATCH
from tidar.decode.slot_timing import SlotCurve
from tidar.decode.step_costs import StepCosts

# The largest K ``draft_len="auto"`` considers, and the deepest draft the acceptance statistics track. A fixed
# ``draft_len`` may be larger, up to ``args.MAX_DRAFT_LEN`` (the largest K taken at all).
MAX_AUTO_DRAFT_LEN = 16
SOURCES = ("diffusion", "context")
PRIORS = {"diffusion": 0.5, "context": 0.6}  # a coin flip for diffusion drafts; copies of a match a bit better
REQUEST_DECAY = 0.9  # the request's pooled evidence (steady-state plans) remembers about ten updates
ROW_DECAY = 0.6  # a row's own evidence: a few steps, so a loop found (or lost) moves K at once
MATCH_HALF = 4  # a context match of L tokens predicts each next copied token with probability L / (L + 4)


def match_expected(match_len: int, n: int) -> float:
    """Expected accepted drafts among ``n`` copied after a context match of ``match_len`` tokens: the text's own
    evidence, before any step has tried the copy (a loop that has run for 16 tokens continues with p = 0.8)."""
    if match_len <= 0 or n <= 0:
        return 0.0
    a = match_len / (match_len + MATCH_HALF)
    return a * (1 - a**n) / (1 - a)


_MATCH_TABLE = [[match_expected(m, n) for n in range(MAX_AUTO_DRAFT_LEN)] for m in range(MAX_MATCH + 1)]


def _match_worth(match_len: int, n: int) -> float:
    """``match_expected`` from the table, both arguments clamped to its range."""
    return _MATCH_TABLE[min(max(match_len, 0), MAX_MATCH)][min(max(n, 0), MAX_AUTO_DRAFT_LEN - 1)]


def context_expected(row_stats: dict, match_len: int, n: int) -> float:
    """A row's expected accepted context drafts among ``n``: the better of its tried evidence and the match's."""
    m = _match_worth(match_len, n)
    return max(row_stats["context"].expected(n), m)


def copy_worth(sampling: bool, batch: int):
    """How a row's copy is valued (``Planner`` and the draft source choice agree on it)."""
    if sampling:
        return sampled_context_expected
    return batched_context_expected if batch > 1 else context_expected


def sampled_context_expected(row_stats: dict, match_len: int, n: int) -> float:
    """A sampled row's expected accepted context drafts among ``n``: the lesser of its evidence and its match's.
    A sampled copy is accepted with the model's probability of the copied token, which is high where the text
    loops (a long match) and low after a match of a token or two; the row's evidence starts at the prior (0.6)
    before any copy was tried, which alone priced every 1-token match as a good draft (a sampled request drafted
    at ~1.3 tokens per forward for 1.4-1.6x an AR step's cost: 0.77x AR). Both must agree."""
    m = _match_worth(match_len, n)
    return min(row_stats["context"].expected(n), m)


def batched_context_expected(row_stats: dict, match_len: int, n: int) -> float:
    """A greedy batched row's expected accepted context drafts among ``n``: the better of its match's and its
    evidence, counting the evidence only once the row has tried copies. At batch 1 the prior (0.6) stands in for
    untried evidence, since a wrong guess costs a few free slots; in a batch a context step costs ~1.4 AR steps
    (batch 16 on a CPU), and the prior alone made every 1-3 token match a draft (0.91x AR where K = 1 ran at
    0.98x). A long match still counts after failed copies: a loop that sets in later is new evidence."""
    m = _match_worth(match_len, n)
    ctx = row_stats["context"]
    return max(ctx.expected(n), m) if ctx.tried() else m


class AcceptanceStats:
    """Decayed counts of trials and acceptances of draft i (1..MAX_AUTO_DRAFT_LEN - 1) given drafts 1..i-1 were
    accepted."""

    def __init__(self, prior: float, weight: float = 2.0, decay: float = 0.995):
        self.prior, self.weight, self.decay = prior, weight, decay
        self.trials = [0.0] * MAX_AUTO_DRAFT_LEN
        self.accepts = [0.0] * MAX_AUTO_DRAFT_LEN
        self._table: list[float] | None = None
        self._pooled: float | None = None
        self._probs: dict = {}  # n -> accept_probs(n), until the next update
        self.version = 0  # updates so far (a plan scored on unchanged evidence need not be scored again)

    def update(self, n_drafts: int, accepted: int) -> None:
        """A row had ``n_drafts`` drafts of this source and ``accepted`` of them were accepted."""
        if n_drafts <= 0:
            return
        d = self.decay
        if d < 1.0:
            self.trials = [t * d for t in self.trials]
            self.accepts = [a * d for a in self.accepts]
        accepted = min(accepted, n_drafts)
        for i in range(1, min(accepted + 1, n_drafts) + 1):
            self.trials[i] += 1.0
            if i <= accepted:
                self.accepts[i] += 1.0
        self._table = self._pooled = None
        self._probs = {}
        self.version += 1

    def tried(self) -> bool:
        """Whether any draft of this source was verified (the statistics are more than the prior)."""
        return self.version > 0

    def pooled(self) -> float:
        """The acceptance rate over all depths (smoothed toward the prior)."""
        if self._pooled is None:
            w = self.weight
            self._pooled = (sum(self.accepts) + w * self.prior) / (sum(self.trials) + w)
        return self._pooled

    def alpha(self, i: int) -> float:
        """Depth i's rate, smoothed toward the pooled rate: depths a step has rarely reached (drafts past the
        K in use) borrow from the depths it has, instead of staying at the prior and keeping K small."""
        w = self.weight
        return (self.accepts[i] + w * self.pooled()) / (self.trials[i] + w)

    def expected(self, n: int) -> float:
        """Expected accepted drafts among ``n`` of this source: sum over i <= n of prod_{t <= i} alpha_t."""
        if self._table is None:
            table, run, total = [0.0], 1.0, 0.0
            for i in range(1, MAX_AUTO_DRAFT_LEN):
                run *= self.alpha(i)
                total += run
                table.append(total)
            self._table = table
        return self._table[max(0, min(n, MAX_AUTO_DRAFT_LEN - 1))]

    def accept_probs(self, n: int) -> list[float]:
        """P(a = k + 1) for k = 0..n accepted drafts among n (read only). Remembered until the next update, as
        ``expected``: scoring the steady-state plans asks for the same n for every K and level set (at ~1 ms a
        re-scoring, it was a few per cent of a sampled request's time on a CPU)."""
        probs = self._probs.get(n)
        if probs is None:
            probs, run = [], 1.0
            for k in range(n + 1):
                if k == n:
                    probs.append(run)
                else:
                    al = self.alpha(k + 1)
                    probs.append(run * (1 - al))
                    run *= al
            self._probs[n] = probs
        return probs


@dataclass(frozen=True)
class Plan:
    draft_len: int
    levels: tuple  # proposal levels (subset of 1..K); () = no proposal blocks

    @property
    def seg_len(self) -> int:
        return self.draft_len * (1 + len(self.levels))

    def max_offset(self) -> int:
        """The largest position offset the step uses (drafts and mask slots)."""
        K = self.draft_len
        return K - 1 + (self.levels[-1] if self.levels else 0)

    @property
    def block_index(self) -> tuple:
        """Per acceptance count a = 0..K: the index in ``levels`` of the block the next drafts come from (the
        largest level <= a, docs/design.md §3.4), or -1 when no level is <= a."""
        return _block_index(self.draft_len, self.levels)

    def next_diffusion_drafts(self, a: int) -> int:
        """Diffusion drafts the next step gets after ``a`` accepted: the slots of block j* past position m + a."""
        i = self.block_index[a]
        return 0 if i < 0 else self.draft_len - 1 - (a - self.levels[i])


@functools.lru_cache(maxsize=1024)
def _block_index(K: int, levels: tuple) -> tuple:
    return tuple(max((i for i, j in enumerate(levels) if j <= a), default=-1) for a in range(K + 1))


def levels_upto(K: int, levels: tuple | None) -> tuple:
    """The proposal levels of a step at K given the levels asked for (None: all of 1..K): () at K = 1 (a plain AR
    step), else the levels <= K, or level 1 when none is."""
    if K == 1:
        return ()
    if levels is None:
        return tuple(range(1, K + 1))
    return tuple(j for j in levels if j <= K) or (1,)


def steady_tokens(plan: Plan, stats: AcceptanceStats, iterations: int = 4) -> float:
    """Expected tokens per step when ``plan`` is used step after step with diffusion drafts only. (The planner's
    hottest loop: ``_replan`` scores ~30 plans with it; the arithmetic is kept in this order so a choice never
    depends on how fast it was computed.)"""
    K = plan.draft_len
    nxt = _next_counts(K, plan.levels)
    dist = {K - 1: 1.0}  # drafts available -> probability
    tokens = 1.0
    for _ in range(iterations):
        new, tokens = {}, 0.0
        for n, pn in dist.items():
            for k, pk in enumerate(stats.accept_probs(n if n < K - 1 else K - 1)):
                w = pn * pk
                tokens += w * (k + 1)
                m = nxt[k + 1]
                new[m] = new.get(m, 0.0) + w
        dist = new
    return tokens


@functools.lru_cache(maxsize=1024)
def _next_counts(K: int, levels: tuple) -> tuple:
    """``Plan(K, levels).next_diffusion_drafts(a)`` for a = 0..K."""
    return tuple(Plan(K, levels).next_diffusion_drafts(a) for a in range(K + 1))


def level_sets(K: int, stats: AcceptanceStats) -> list[tuple]:
    """Candidate proposal levels for K: all, {1}, and {1} plus the most likely acceptance counts."""
    if K == 1:
        return [()]  # a 1-slot block drafts nothing for the next step: K = 1 is a plain AR step
    probs = stats.accept_probs(K - 1)
    likely = sorted(range(1, K + 1), key=lambda a: -probs[a - 1])
    sets = {tuple(range(1, K + 1)), (1,)}
    for m in (2, 3, 4):
        sets.add(tuple(sorted({1, *likely[: m - 1]})))
    return sorted(sets, key=len)


class Planner:
    """Chooses each step's plan from the slot curve and the acceptance statistics.

    ``stats``: the request's pooled statistics (per source), used for the steady state of diffusion plans.
    ``batch``: rows in each forward (a step's cost is the curve at ``batch`` times its segment). ``choose`` takes
    per row the drafts available and, optionally, the row's own statistics."""

    CANDIDATE_K = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
    REPLAN_EVERY = 12  # steps between re-scoring the steady-state diffusion plans (the evidence moves fast)
    EXPLORE_AFTER = 16  # AR steps in a row before one diffusion step refreshes the statistics
    EXPLORE_MAX_COST = 1.25  # ... only where that step costs at most this many AR steps
    # Each exploration that leaves the scoring at AR doubles the wait before the next (up to this many AR steps):
    # where drafts do not pay (sampling at a high temperature, a wide batch) a request explores a few times, not
    # every 16 steps; a scored drafted step (the evidence turned) resets the wait.
    EXPLORE_MAX_AFTER = 128
    AR_RESCORE = 4  # in a run of AR steps, grown context matches are re-scored every this many steps
    # Where a drafted step's gain is small (sampling; several rows of a batch) it must beat a plain AR step by
    # this much: the measured costs move between runs on a shared CPU, and a wrong guess there is a loss
    # (the noise: benchmarks/results/decode_step_cpu_host_costs.md).
    MARGIN = 1.1
    REPRICE = 0.05  # a measured price that moves by more than this share drops the AR memo (``observe``)

    def __init__(
        self,
        curve: SlotCurve,
        stats: dict,
        max_k: int = MAX_AUTO_DRAFT_LEN,
        levels: tuple | None = None,
        fixed_k: int | None = None,
        batch: int = 1,
        sampling: bool = False,
        measured: StepCosts | None = None,
    ):
        self.curve, self.stats = curve, stats
        self.measured = measured  # the steps' own times (``step_costs``): they replace the modelled prices
        self.max_k = min(max_k, MAX_AUTO_DRAFT_LEN) if fixed_k is None else fixed_k
        self.fixed_k, self.fixed_levels = fixed_k, levels
        self.batch = max(1, int(batch))
        self.sampling = sampling  # a sampled step's cost: the head on every row, rejection sampling
        self.margin = self.MARGIN if sampling or self.batch > 1 else 1.0
        # A copy's worth (``copy_worth``): greedy at batch 1 the better of the row's evidence (from the prior) and
        # its match; batched, the better of its match and its tried evidence (``batched_context_expected``);
        # sampled, the lesser of evidence and match (``sampled_context_expected``)
        self.copy_worth = copy_worth(sampling, self.batch)
        self.best: dict[int, tuple[tuple, float, float]] = {}  # K -> (levels, steady tokens per row, step ms)
        self.since_replan = self.REPLAN_EVERY
        self.ar_run = 0
        self.explore_after = self.EXPLORE_AFTER
        self._ar_memo = None  # the rows' inputs when the last full scoring chose a plain AR step
        self._tables: dict = {}  # _row_tables memo
        self._costs: dict = {}  # cost memo: (K, number of levels) -> ms
        self._memo_hits = 0
        self._replanned_at = None  # the request's evidence version at the last replan
        self._acted: dict = {}  # plan key -> its measured price when ``observe`` last acted on it

    def cost(self, K: int, levels: tuple) -> float:
        """Milliseconds of a step of this plan for the whole batch: the forward at every row's tokens, the LM head
        (rows and calls) and the host work (see ``SlotCurve.batch_step``); sampled: ``SlotCurve.sampled_step``.
        Remembered per (K, number of levels): the curve and the batch are fixed for the planner's life, and
        ``choose`` prices a dozen plans at every step. A plan the decoder has timed often enough (``measured``,
        see ``observe``) costs the median of its recent times instead."""
        key = (K, len(levels))
        if self.measured is not None:
            ms = self.measured.medians.get(key)
            if ms is not None:
                return ms
        ms = self._costs.get(key)
        if ms is None:
            if self.sampling:
                ms = self.curve.sampled_step(self.batch, K, len(levels))
            else:
                ms = self.curve.greedy_step(self.batch, K, len(levels))
            self._costs[key] = ms
        return ms

    def observe(self, plan: Plan, ms: float) -> None:
        """One step of ``plan`` took ``ms`` (wall clock, its planning included). The plan's price becomes the
        median of its recent times (``cost``); once it has moved by more than ``REPRICE`` since the planner last
        acted on it, an AR streak's memo is dropped so the next step is scored at the new prices (the steady
        plans pick the new prices up at their next re-scoring). Acting on every small move re-scored so often at
        batch 16 that the planner's own work rose by ~3% of a step."""
        if self.measured is None:
            return
        key = (plan.draft_len, len(plan.levels))
        after = self.measured.add(key, ms)
        if after is None:
            return
        acted = self._acted.get(key)
        if acted is None or abs(after - acted) > self.REPRICE * acted:
            self._acted[key] = after
            self._ar_memo = None

    def _replan(self):
        self._replanned_at = self._version(self.stats)
        diff = self.stats["diffusion"]
        ks = [self.fixed_k] if self.fixed_k else [k for k in self.CANDIDATE_K if k <= self.max_k]
        best = {}
        for K in ks:
            cands = [self._levels_for(K)] if self.fixed_levels is not None or self.fixed_k else level_sets(K, diff)
            scored = []
            for lv in cands:
                plan = Plan(K, lv)
                tok = steady_tokens(plan, diff)
                ms = self.cost(K, lv)
                scored.append((tok / ms, lv, tok, ms))
            _, lv, tok, ms = max(scored)
            best[K] = (lv, tok, ms)
        self.best = best
        self.since_replan = 0

    def steady_plans(self) -> dict:
        """The steady-state diffusion plans scored now on the request's evidence: K -> (best levels, expected tokens
        per step, step ms), the table ``choose`` weighs each step's drafts against."""
        self._replan()
        return dict(self.best)

    def _levels_for(self, K: int) -> tuple:
        return levels_upto(K, self.fixed_levels)

    def _row_tables(self, nd: int, nc: int, st: dict, match: int, slots: tuple) -> tuple[dict, dict]:
        """Expected accepted diffusion and context drafts of a row for each n in ``slots`` (the K - 1 of the
        candidate plans), capped at the drafts it has. Greedy, a copy is worth the better of the row's evidence
        and its match's (``context_expected``); batched and sampled: ``copy_worth``.
        Memoised on the row's evidence version: in a run of AR steps nothing but the match moves."""
        m = min(max(match, 0), MAX_MATCH)
        key = (id(st), self._version(st), nd, nc, m, slots)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        d = {n: st["diffusion"].expected(min(nd, n)) for n in slots}
        ctx = self.copy_worth
        c = {n: ctx(st, m, min(nc, n)) for n in slots}
        if len(self._tables) > 4096:  # one request's rows and steps; keep it bounded
            self._tables.clear()
        self._tables[key] = (d, c)
        return d, c

    def first(self, k_limit: int) -> Plan:
        """The plan of the prefill's proposal block (before any statistics of this call)."""
        if self.since_replan >= self.REPLAN_EVERY:
            self._replan()
        ks = [k for k in self.best if k <= max(1, k_limit)] or [min(self.best)]
        K = max(ks, key=lambda k: self.best[k][1] / self.best[k][2])
        if K > 1 and 1 in self.best:  # drafts must pay beyond the costs' noise (``MARGIN``), as in ``choose``
            ar = self.best[1][1] / self.best[1][2]
            if self.best[K][1] / self.best[K][2] < self.margin * ar:
                K = 1
        return Plan(K, self.best[K][0])

    def choose(self, rows: list[tuple], k_limit: int) -> Plan:
        """``rows``: per active row ``(diffusion drafts, context drafts)`` available, optionally followed by the
        row's own statistics (default: the request's), its context match length and its remaining tokens.
        ``k_limit``: the largest K the remaining tokens and positions allow.

        Scores each K with its best proposal levels (next step: the steady state of diffusion drafts, or the
        context copy where that is the row's better source) or with no proposal blocks (next step: the copy again,
        else AR) by the expected tokens of this step and the next over their cost. A batch finishes with its
        slowest row and a finished row still costs its share of the forward, so rows are weighed by their
        remaining tokens: the score is the smallest ``tokens_b / remaining_b`` over the rows (at batch 1 plain
        tokens per ms), never the batch's total, which fast rows would inflate while the slowest one waits."""
        self.since_replan += 1
        if self.since_replan >= self.REPLAN_EVERY and self._replanned_at != self._version(self.stats):
            self._replan()
        rows = [_row(r, self.stats) for r in rows]
        key = [(nd, nc, self._match_key(st, match, nc), id(st), self._version(st)) for nd, nc, st, match, _ in rows]
        if self._still_ar(key, k_limit):  # an AR streak on unchanged evidence: the scoring would say AR again
            return self._explore_or(Plan(1, ()), rows, k_limit)
        # per pacing row, once per step: expected accepted drafts of each source by draft count, the remaining tokens
        pacing = _pacing_rows(rows)
        slots = tuple(K - 1 for K in self.best if K <= max(1, k_limit))
        tables = [self._row_tables(nd, nc, st, match, slots) for nd, nc, st, match, _ in pacing]
        remaining = [r[4] for r in pacing]
        best_val, best, ar_val = -1.0, Plan(1, ()), 0.0
        for K, (lv, tok, _) in self.best.items():
            if K > max(1, k_limit):
                continue
            now = [1.0 + max(d[K - 1], c[K - 1]) for d, c in tables]
            ctx_next = [1.0 + c[K - 1] for _, c in tables]
            options = [(lv, [max(tok, x) for x in ctx_next], self.cost(K, lv))]
            if lv and self.fixed_levels is None and self.fixed_k is None:
                options.append(((), ctx_next, self.cost(K, ())))
            for levels, nxt, nxt_ms in options:
                pace = min((a + b) / r for a, b, r in zip(now, nxt, remaining)) if pacing else 1.0
                val = pace / (self.cost(K, levels) + nxt_ms)
                if K == 1 and not levels:
                    ar_val = val
                if val > best_val:
                    best_val, best = val, Plan(K, levels)
        if best != Plan(1, ()) and best_val < self.margin * ar_val:  # drafts must pay beyond the costs' noise
            best = Plan(1, ())
        self._ar_memo = (k_limit, key) if best == Plan(1, ()) else None
        self._memo_hits = 0
        return self._explore_or(best, rows, k_limit)

    def _match_key(self, st: dict, match: int, nc: int) -> int:
        """The match length as the AR memo keys it: greedy, 0 while the match says less than the row's evidence
        (``context_expected`` takes the better, so a short match changes nothing). At batch 16 some row's 1-3
        token match moves nearly every step, and keying on it re-scored every step of an AR streak (the
        planner's work: ~3% of a step)."""
        if self.sampling or match <= 0:
            return match
        m = min(match, MAX_MATCH)
        return m if _match_worth(m, nc) > self.copy_worth(st, 0, nc) else 0  # the evidence's worth alone

    @staticmethod
    def _version(stats: dict) -> tuple:
        return tuple([stats[src].version for src in SOURCES])

    def _still_ar(self, key: list, k_limit: int) -> bool:
        """Whether the last full scoring chose AR on the same evidence and K limit, and since then no row has more
        drafts or a longer (relevant) match, or some has but fewer than ``AR_RESCORE`` steps ago. Fewer drafts
        and shorter matches cannot make a drafted plan better; more are new evidence, weighed within a few steps,
        not at every one (a match grows a token a step as a loop sets in; at batch 16 some row's draft count
        moves nearly every step, and requiring equal counts re-scored most steps of an AR streak)."""
        memo = self._ar_memo
        if memo is None or memo[0] != k_limit or len(memo[1]) != len(key):
            return False
        if not all(a[3:] == b[3:] for a, b in zip(key, memo[1])):
            return False
        self._memo_hits += 1
        grown = any(a[0] > b[0] or a[1] > b[1] or a[2] > b[2] for a, b in zip(key, memo[1]))
        return not grown or self._memo_hits < self.AR_RESCORE

    def _explore_or(self, best: Plan, rows: list, k_limit: int) -> Plan:
        """``best``, or after ``explore_after`` AR steps in a row without context drafts, one cheap diffusion step."""
        if self.fixed_k is None and best.draft_len == 1 and not any(row[1] for row in rows):
            self.ar_run += 1
            if (
                self.ar_run >= self.explore_after
                and k_limit >= 2
                and 2 in self.best
                and self.cost(2, (1, 2)) <= self.EXPLORE_MAX_COST * self.cost(1, ())
            ):
                self.ar_run = 0
                self.explore_after = min(2 * self.explore_after, self.EXPLORE_MAX_AFTER)
                return Plan(2, (1, 2))
        else:
            self.ar_run = 0
            if best.draft_len > 1:
                self.explore_after = self.EXPLORE_AFTER
        return best


def _pacing_rows(rows: list) -> list:
    """The rows that set a batch's pace in ``Planner.choose``. A row with no drafts of either source and the most
    tokens left paces every plan alone: its tokens are 1 this step and next step what the plan's blocks give, and
    every other row gets at least as many with no more tokens left. Scoring it alone gives the choice all rows
    give, without per-row work each step (at batch 16 some row's context match changes nearly every step, so the
    memo of an AR streak rarely holds)."""
    if len(rows) > 1:
        most = max(r[4] for r in rows)
        for r in rows:
            if r[0] == 0 and r[1] == 0 and r[4] == most:
                return [r]
    return rows


def _row(r: tuple, default_stats: dict) -> tuple:
    """A ``choose`` row as (diffusion drafts, context drafts, statistics, match length, remaining tokens)."""
    nd, nc = r[0], r[1]
    st = r[2] if len(r) > 2 and r[2] is not None else default_stats
    match = r[3] if len(r) > 3 else 0
    remaining = max(1, r[4]) if len(r) > 4 else 1
    return nd, nc, st, match, remaining


def new_stats(decay: float = REQUEST_DECAY) -> dict:
    """Fresh statistics at their priors (one request's; nothing carries over from earlier requests)."""
    return {src: AcceptanceStats(prior=PRIORS[src], decay=decay) for src in SOURCES}


def new_row_stats(rows: int) -> list[dict]:
    """Fresh per-row statistics at the priors, with a short memory (``ROW_DECAY``)."""
    return [new_stats(ROW_DECAY) for _ in range(rows)]
