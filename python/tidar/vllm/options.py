"""TiDAR's settings inside vLLM, and their encoding as the proposer's class name.

vLLM's ``SpeculativeConfig`` has no free-form field, and ``method="custom_class"`` imports ``model`` as a dotted
path. So the settings travel in that path: ``tidar.vllm.proposer.TidarProposer__levels_1_2_3__context_3``. The
proposer module resolves such names to a class carrying the settings (``proposer.__getattr__``), so the same
JSON works for ``vllm.LLM(speculative_config=...)`` and ``vllm serve --speculative-config``.
"""

from __future__ import annotations

import dataclasses

PROPOSER_MODULE = "tidar.vllm.proposer"
CLASS_PREFIX = "TidarProposer"


@dataclasses.dataclass(frozen=True)
class TidarOptions:
    """``levels``: the proposal blocks appended per request, by how many of the step's scheduled tokens they assume
    accepted (1 = only the last sampled token, ``K + 1`` = every draft); None = all of them (the paper).
    ``context``: n-gram (prompt-lookup) drafts replace the diffusion drafts of a request when the text's end
    matches an earlier n-gram of at least this many tokens (0 = diffusion drafts only).
    ``row_cost_milli``: what one more row in a step's forward costs, in thousandths of the step's fixed cost, the
    price ``draft_source`` weighs drafts and [MASK] blocks with; None = ``draft_source.ROW_COST`` (measured on
    this repository's CPU); 0 = rows are free (blocks and drafts of K tokens wherever they may be used)."""

    levels: tuple[int, ...] | None = None
    context: int = 0
    row_cost_milli: int | None = None

    def check(self, num_speculative_tokens: int) -> None:
        K = num_speculative_tokens
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {K!r}")
        if self.levels is not None:
            lv = self.levels
            if not lv or any(not isinstance(j, int) or isinstance(j, bool) or not 1 <= j <= K + 1 for j in lv):
                raise ValueError(
                    f"levels must be a non-empty list of ints in [1, num_speculative_tokens + 1 = {K + 1}] (blocks "
                    f"by the number of scheduled tokens they assume accepted), got {lv!r}"
                )
            if list(lv) != sorted(set(lv)):
                raise ValueError(f"levels must be strictly increasing, got {list(lv)!r}")
            if lv[0] != 1:
                # block 1 is the only one a prefill (no drafts yet) and a step after a full rejection can use
                raise ValueError(f"levels must include 1 (the block after the last sampled token), got {list(lv)!r}")
        if not isinstance(self.context, int) or isinstance(self.context, bool) or self.context < 0:
            raise ValueError(f"context must be an int >= 0 (minimum n-gram match, 0 = off), got {self.context!r}")
        rc = self.row_cost_milli
        if rc is not None and (not isinstance(rc, int) or isinstance(rc, bool) or not 0 <= rc <= 1000):
            raise ValueError(
                f"row_cost must be a number in [0, 1] with at most 3 decimals (a row's cost as a fraction of a "
                f"step's fixed cost), got {rc / 1000 if type(rc) is int else rc!r}"
            )

    @property
    def row_cost(self) -> float | None:
        return None if self.row_cost_milli is None else self.row_cost_milli / 1000

    def class_name(self) -> str:
        parts = [CLASS_PREFIX]
        if self.levels is not None:
            parts.append("levels_" + "_".join(str(j) for j in self.levels))
        if self.context:
            parts.append(f"context_{self.context}")
        if self.row_cost_milli is not None:
            parts.append(f"rowcost_{self.row_cost_milli}")
        return "__".join(parts)


def parse_class_name(name: str) -> TidarOptions:
    """The options a class name from ``TidarOptions.class_name`` encodes; ValueError for any other name."""
    parts = name.split("__")
    if parts[0] != CLASS_PREFIX:
        raise ValueError(f"not a TiDAR proposer name: {name!r} (expected {CLASS_PREFIX}[__option...])")
    levels, context, row_cost = None, 0, None
    for part in parts[1:]:
        key, _, rest = part.partition("_")
        values = rest.split("_") if rest else []
        if not values or not all(v.isdigit() for v in values):
            raise ValueError(f"bad option {part!r} in TiDAR proposer name {name!r}")
        if key == "levels":
            levels = tuple(int(v) for v in values)
        elif key == "context" and len(values) == 1:
            context = int(values[0])
        elif key == "rowcost" and len(values) == 1:
            row_cost = int(values[0])
        else:
            raise ValueError(
                f"unknown option {part!r} in TiDAR proposer name {name!r} (known: levels, context, rowcost)"
            )
    return TidarOptions(levels=levels, context=context, row_cost_milli=row_cost)


def is_tidar_path(model: str | None) -> bool:
    return isinstance(model, str) and model.startswith(PROPOSER_MODULE + "." + CLASS_PREFIX)


DEFAULT_LEVELS = (1,)
DEFAULT_CONTEXT = 2


def speculative_config(
    num_speculative_tokens: int = 8, *, levels=DEFAULT_LEVELS, context: int = DEFAULT_CONTEXT, row_cost=None
) -> dict:
    """The ``speculative_config`` that runs TiDAR in vLLM: pass it to ``vllm.LLM(speculative_config=...)`` or, as
    JSON, to ``vllm serve --speculative-config``.

    Args:
        num_speculative_tokens: drafts per request and step (K); each step's forward appends ``K + 1`` [MASK]
            slots per proposal block.
        levels: which proposal blocks to append (see ``TidarOptions``); ``"all"``: all ``K + 1`` (the paper).
            The default, block 1 only, costs ``K + 1`` rows per request and step (the paper's ``(K + 1)^2``
            rows cost more than they return on a CPU).
        context: minimum n-gram match for context drafts (0 = off); a request whose context drafts were all
            accepted appends no blocks in its next step.
        row_cost: one more row's cost in a step's forward as a fraction of the step's fixed cost (at most 3
            decimals); drafts and blocks are weighed with it against the step's batch (``draft_source``). None: the
            value measured on this repository's CPU (0.04); 0: rows are free (blocks and K drafts wherever they
            may be used).
    """
    if levels == "all":
        levels = None
    elif isinstance(levels, str):
        raise ValueError(f'levels must be a list of ints or "all", got {levels!r}')
    milli = row_cost
    if row_cost is not None and not isinstance(row_cost, bool) and isinstance(row_cost, (int, float)):
        milli = round(row_cost * 1000)
        if abs(milli - row_cost * 1000) > 1e-6:
            raise ValueError(f"row_cost must have at most 3 decimals, got {row_cost!r}")
    opts = TidarOptions(levels=None if levels is None else tuple(levels), context=context, row_cost_milli=milli)
    opts.check(num_speculative_tokens)
    return {
        "method": "custom_class",
        "model": f"{PROPOSER_MODULE}.{opts.class_name()}",
        "num_speculative_tokens": num_speculative_tokens,
    }
