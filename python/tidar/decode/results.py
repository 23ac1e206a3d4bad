"""The typed results of the decode step (``tidar.Decoder``: ``prefill`` / ``plan`` / ``step``) and of
``tidar.generate``. Per-row views (sources, drafts) are properties computed when read, so the step itself does no
host work for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tidar.decode.planner import Plan
from tidar.hf.cache import TidarCache


@dataclass
class TidarGenerateOutput:
    sequences: torch.Tensor  # [B, P + new]: the prompt as given (left padding kept), then the new tokens
    forwards: int  # model forwards run (prefill included)
    tokens_per_forward: float  # new tokens / forwards, per row, averaged over rows
    accepted_histogram: dict = field(default_factory=dict)  # a (1..K) -> number of (row, step) pairs
    new_tokens: list = field(default_factory=list)  # per row: the generated token ids (no padding)
    cache: TidarCache | None = None  # per row, the committed K/V: a prefix of (prompt + new tokens)
    draft_lens: list = field(default_factory=list)  # K of every decode step (the prefill's block first)
    levels: list = field(default_factory=list)  # the proposal levels of every decode step
    draft_sources: dict = field(default_factory=dict)  # "diffusion" / "context" / "none" -> (row, step) pairs
    draft_events: list = field(default_factory=list)  # (source, drafts verified, drafts accepted) per (row, step)


@dataclass(eq=False)
class Prefilled:
    """``Decoder.prefill``: the prompts' forward with one block of K masks, and every row's first token."""

    tokens: list  # per row: the first new token
    draft_len: int  # K of the prefill's mask block: the first step verifies up to K - 1 diffusion drafts from it
    forwards: int  # 1, or 2 when the prompts have different lengths and K > 1 (the prompts, then the mask blocks)


@dataclass(eq=False)
class PlannedStep:
    """One decode step as ``Decoder.plan`` chose it; ``Decoder.step`` runs it (a plan is for one step only)."""

    plan: Plan  # K (``plan.draft_len``) and the proposal levels (``plan.levels``; () = no proposal blocks)
    tokens: torch.Tensor  # [B, K] on the model's device: d_0 (each row's last token), its drafts, filler after them
    probs: torch.Tensor | None  # [B, K - 1, V]: the drafts' proposal distributions q when sampling, else None
    rows: list  # per row: (source, number of real drafts); source "diffusion", "context" or "none"
    host_tokens: list  # ``tokens`` as Python lists
    index: int  # the decoder's step count this plan was made at

    @property
    def draft_len(self) -> int:
        return self.plan.draft_len

    @property
    def levels(self) -> tuple:
        return self.plan.levels

    @property
    def sources(self) -> list:
        """Per row: which source drafted ("diffusion", "context"; "none" for a finished row or no drafts)."""
        return [src for src, _ in self.rows]

    @property
    def drafted(self) -> list:
        """Per row: the number of real drafts verified (filler slots after them are never counted)."""
        return [n for _, n in self.rows]

    @property
    def drafts(self) -> list:
        """Per row: the draft tokens verified (after d_0)."""
        return [t[1 : 1 + n] for t, (_, n) in zip(self.host_tokens, self.rows)]


@dataclass(eq=False)
class StepResult:
    """``Decoder.step``: what one decode step verified, accepted and emitted, per row."""

    planned: PlannedStep  # the step that ran (K, levels, drafts and their sources)
    accepted: list  # per row: drafts accepted (0 for a row finished before the step)
    emitted: list  # per row: the tokens emitted (accepted drafts, then the correction or bonus token; cut at a stop)

    @property
    def draft_len(self) -> int:
        return self.planned.draft_len

    @property
    def levels(self) -> tuple:
        return self.planned.levels

    @property
    def sources(self) -> list:
        return self.planned.sources

    @property
    def drafted(self) -> list:
        return self.planned.drafted

    @property
    def drafts(self) -> list:
        return self.planned.drafts


__all__ = ["PlannedStep", "Prefilled", "StepResult", "TidarGenerateOutput"]
