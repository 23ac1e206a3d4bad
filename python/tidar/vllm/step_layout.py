"""Where a step's [MASK] proposal blocks go (docs/design.md §1.3, §1.5): pure index arithmetic over vLLM's batch.

Request r schedules ``n_r`` tokens at positions ``c_r .. c_r + n_r - 1`` (``c_r`` tokens already cached): its
prompt (chunk), or its last sampled token followed by ``D_r`` drafts. Block ``l`` (level l = 1 .. D_r + 1) assumes
the first ``j = n_r - D_r - 1 + l`` scheduled tokens are accepted: its ``K + 1`` [MASK] slots sit at positions
``c_r + j + s`` and see the cached prefix, those j tokens and their own block. After verification vLLM returns
``l`` sampled tokens for the request (l - 1 accepted drafts and the correction or bonus): slot 0 of block l is that
last token's position, slots 1..K give the next K drafts.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class StepLayout:
    """The mask rows of one forward, request-major, block by block, ``K + 1`` rows per block."""

    K: int
    request_levels: list[list[int]]  # per request, the levels of its blocks (ascending)
    block_start: list[list[int]]  # per request, the first mask row of each of its blocks
    positions: torch.Tensor  # [M] int64, the mask rows' positions
    seq_lens: torch.Tensor  # [B_blocks] int32, pool keys each block sees (c_r + j)
    block_rows: torch.Tensor  # [B_blocks] int64, the request each block belongs to (its block-table row)

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    def block_for(self, req: int, level: int) -> tuple[int, int] | None:
        """``(first mask row, level)`` of the block of request ``req`` with the largest level <= ``level``."""
        best = None
        for lv, start in zip(self.request_levels[req], self.block_start[req]):
            if lv <= level:
                best = (start, lv)
        return best


def plan_step(
    num_computed: list[int], num_scheduled: list[int], num_drafts: list[int], K: int, levels, max_position: int
) -> StepLayout:
    """The mask blocks of one forward (see the module docstring). ``levels``: allowed levels (None = all).
    Positions past ``max_position - 1`` are clamped: such slots lie past the model's length, vLLM never schedules
    their drafts."""
    request_levels, block_start, pos, seq_lens, rows = [], [], [], [], []
    row = 0
    slots = torch.arange(K + 1)
    for r, (c, n, d) in enumerate(zip(num_computed, num_scheduled, num_drafts)):
        lvs = [lv for lv in range(1, d + 2) if levels is None or lv in levels]
        request_levels.append(lvs)
        block_start.append([])
        for lv in lvs:
            j = n - d - 1 + lv
            block_start[-1].append(row)
            pos.append(c + j + slots)
            seq_lens.append(c + j)
            rows.append(r)
            row += K + 1
    positions = torch.cat(pos).clamp_(max=max_position - 1) if pos else torch.zeros(0, dtype=torch.int64)
    return StepLayout(
        K=K,
        request_levels=request_levels,
        block_start=block_start,
        positions=positions,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_rows=torch.tensor(rows, dtype=torch.int64),
    )
