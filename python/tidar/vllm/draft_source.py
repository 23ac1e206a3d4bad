"""Per request, which drafts to propose: context (n-gram) or diffusion, from the request's own evidence
(docs/design.md §1.5: a request's speed must not depend on what was decoded before it).

Each source keeps a running mean of the drafts it got accepted per step (both start at ``PRIOR``). Context drafts
are proposed when the text's end matches and their mean is at least diffusion's; a request whose last drafts came
from the context and that still prefers them appends no [MASK] block to its next step (the block would go
unused). When context drafts start missing, their mean falls below diffusion's and the blocks come back. A request
whose diffusion drafts are mostly rejected takes plain steps, trying a block now and then. A block
gives about twice the drafts diffusion gets accepted (``block_drafts``): rows a CPU would compute for nothing.
"""

from __future__ import annotations

PRIOR = 1.0  # accepted drafts per step each source starts with
DECAY = 0.7  # weight of the past in the running means
MIN_DIFFUSION = 0.5  # diffusion drafts accepted per step below which a block costs more than it returns
PROBE_EVERY = 4  # steps without a block after which a request tries one again (its evidence may have changed)


class SourceEvidence:
    def __init__(self):
        self.mean = {"context": PRIOR, "diffusion": PRIOR}
        self.last: tuple[str, int] | None = None  # (source, count) of the drafts proposed last
        self.since_block = 0  # steps since the request last carried a block

    def observe(self, num_sampled: int) -> None:
        """The step that verified the last drafts returned ``num_sampled`` tokens (accepted drafts + 1)."""
        if self.last is None or self.last[1] == 0:
            return
        source, count = self.last
        accepted = min(num_sampled - 1, count)
        self.mean[source] = DECAY * self.mean[source] + (1 - DECAY) * accepted

    def prefers_context(self) -> bool:
        return self.mean["context"] >= self.mean["diffusion"]

    def block_drafts(self, K: int) -> int:
        """Drafts the request's next [MASK] block should give: about twice the diffusion drafts it gets accepted
        per step, at least 2, at most K (each draft is a row to compute twice: its slot, then its verification)."""
        return max(2, min(K, int(2 * self.mean["diffusion"]) + 2))

    def wants_block(self) -> bool:
        """Whether the next step should carry a [MASK] block for this request: not while it drafts from the
        context and prefers to, nor while its diffusion drafts are mostly rejected (then a plain step costs less;
        every ``PROBE_EVERY`` steps it tries a block again)."""
        if self.last is not None and self.last[0] == "context" and self.prefers_context():
            return False
        return self.mean["diffusion"] >= MIN_DIFFUSION or self.since_block >= PROBE_EVERY

    def planned(self, block: bool) -> None:
        self.since_block = 0 if block else self.since_block + 1
