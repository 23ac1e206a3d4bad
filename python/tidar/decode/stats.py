"""What a decode run counts, kept apart from what it decides by.

- ``DecodeCounters``: counts only (forwards, new tokens, K per step, accepted lengths, drafts per source); the
  decoding never reads them back, so a caller may keep, sum or reset them freely.
- ``AcceptanceEvidence``: the planner's policy input (docs/design.md §4): decayed acceptance statistics per draft
  source for the request and for each row, and each row's context-match length. Every request starts from the
  priors, so a request's speed (and, sampling, its tokens for a given seed) never depends on what ran before.
- ``DecodeStats``: what ``tidar.generate(..., stats=DecodeStats())`` fills: the counters summed over every call
  given this object, and the evidence of the last request.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tidar.decode.planner import new_row_stats, new_stats


@dataclass
class DecodeCounters:
    """Counts of one request (``Decoder.counters``) or summed over requests (``DecodeStats.counters``)."""

    requests: int = 0
    forwards: int = 0  # model forwards run (prefills included)
    new_tokens: int = 0  # tokens emitted, all rows
    accepted_histogram: Counter = field(default_factory=Counter)  # a (1..K) -> (row, step) pairs
    draft_sources: Counter = field(default_factory=Counter)  # "diffusion" / "context" / "none" -> (row, step) pairs
    events: list = field(default_factory=list)  # (source, drafts verified, drafts accepted) per (row, step) with drafts
    draft_lens: list = field(default_factory=list)  # K of every prefill's block and decode step, in order
    levels: list = field(default_factory=list)  # the proposal levels of the same forwards

    @property
    def steps(self) -> int:
        """Decode steps run (forwards after the prefills)."""
        return len(self.draft_lens) - self.requests

    def drafts(self, source: str | None = None) -> int:
        """Drafts verified (of ``source``, or of every source)."""
        return sum(n for src, n, _ in self.events if source in (None, src))

    def accepted(self, source: str | None = None) -> int:
        """Drafts accepted (of ``source``, or of every source)."""
        return sum(a for src, _, a in self.events if source in (None, src))

    def acceptance_by_depth(self) -> dict:
        """Per source, every counted draft as undecayed ``AcceptanceStats``: trials and acceptances of draft i given
        drafts 1..i-1 were accepted, and ``alpha(i)`` smoothed toward the prior as the planner smooths."""
        stats = new_stats(decay=1.0)
        for src, n, a in self.events:
            stats[src].update(n, a)
        return stats

    def add(self, other: DecodeCounters) -> None:
        """Add ``other``'s counts to these."""
        self.requests += other.requests
        self.forwards += other.forwards
        self.new_tokens += other.new_tokens
        self.accepted_histogram.update(other.accepted_histogram)
        self.draft_sources.update(other.draft_sources)
        self.events.extend(other.events)
        self.draft_lens.extend(other.draft_lens)
        self.levels.extend(other.levels)


@dataclass
class AcceptanceEvidence:
    """The planner's evidence for one request (``Decoder.evidence``): policy, not counts."""

    request: dict  # source -> AcceptanceStats: the request's pooled evidence; scores the steady-state plans
    rows: list  # per row, source -> AcceptanceStats (a short memory): picks the row's source and its share of K
    match_lens: list  # per row: the length of its current context match (0: none)

    @classmethod
    def priors(cls, rows: int) -> AcceptanceEvidence:
        """Fresh evidence at the priors for a request of ``rows`` rows."""
        return cls(new_stats(), new_row_stats(rows), [0] * rows)


@dataclass
class DecodeStats:
    """Pass to ``tidar.generate(..., stats=...)``: each call adds its counters to ``counters`` and leaves its
    acceptance evidence in ``evidence`` (None before the first call)."""

    counters: DecodeCounters = field(default_factory=DecodeCounters)
    evidence: AcceptanceEvidence | None = None

    def record(self, counters: DecodeCounters, evidence: AcceptanceEvidence) -> None:
        self.counters.add(counters)
        self.evidence = evidence


def check_stats(stats) -> None:
    if stats is not None and not isinstance(stats, DecodeStats):
        raise TypeError(f"stats must be None or a tidar.DecodeStats, got {type(stats).__name__}")


__all__ = ["AcceptanceEvidence", "DecodeCounters", "DecodeStats", "check_stats"]
