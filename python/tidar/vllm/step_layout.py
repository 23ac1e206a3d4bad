"""Where a step's [MASK] proposal blocks go and what they see (docs/design.md §1.3, §1.5): index arithmetic only.

Request r schedules ``n_r`` tokens at positions ``c_r .. c_r + n_r - 1`` (``c_r`` tokens already cached): its
prompt (chunk), or its last sampled token followed by ``D_r`` drafts. Block ``l`` (level l = 1 .. D_r + 1) assumes
the first ``j = n_r - D_r - 1 + l`` scheduled tokens are accepted: its ``K_r + 1`` [MASK] slots sit at positions
``c_r + j + s`` and see the cached prefix, those j tokens and their own block. After verification vLLM returns
``l`` sampled tokens for the request (l - 1 accepted drafts and the correction or bonus): slot 0 of block l is that
last token's position, slots 1..K_r give the next drafts.

For the attention, a request's segment is its ``n_r`` scheduled rows (causal) followed by its blocks: the TiDAR
layout of design §1.3 with ``local_limit = j`` and one ``block_id`` per block. Requests with the same ``n_r`` and
levels share a layout and go to ``tidar_attention_paged`` together (one group).
"""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass
class Group:
    """Requests that share one segment layout: ``n`` scheduled rows, then ``len(js)`` blocks of ``K + 1``."""

    requests: list[int]
    n: int
    js: tuple[int, ...]  # per block, the scheduled rows it sees
    K: int  # drafts a block gives (its slots: K + 1)
    local_limit: torch.Tensor = None  # [S] int32
    block_id: torch.Tensor = None  # [S] int32

    def finish(self) -> None:
        self.local_limit, self.block_id = _segment(self.n, self.js, self.K)


@functools.lru_cache(maxsize=256)
def _segment(n: int, js: tuple[int, ...], K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local_limit, block_id)`` of a group's segment, made once per layout (read only)."""
    S1 = K + 1
    ll = list(range(1, n + 1)) + [j for j in js for _ in range(S1)]
    bid = [-1] * n + [b for b in range(len(js)) for _ in range(S1)]
    return torch.tensor(ll, dtype=torch.int32), torch.tensor(bid, dtype=torch.int32)


@dataclasses.dataclass
class StepLayout:
    """The mask rows of one forward, request-major, block by block, ``K_r + 1`` rows per block of request r."""

    block_len: list[int]  # per request, its blocks' K_r + 1 slots
    request_levels: list[list[int]]  # per request, the levels of its blocks (ascending)
    block_start: list[list[int]]  # per request, the first mask row of each of its blocks
    positions: torch.Tensor  # [M] int64, the mask rows' positions
    groups: list[Group]

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
    num_computed: list[int],
    num_scheduled: list[int],
    num_drafts: list[int],
    K: list[int],
    levels: list,
    max_position: int,
) -> StepLayout:
    """The mask blocks of one forward (see the module docstring). ``K``: per request, the drafts its blocks give
    (``K_r + 1`` slots); ``levels``: per request, the allowed levels (None = all). Positions past
    ``max_position - 1`` are clamped: such slots lie past the model's length, vLLM never schedules their drafts."""
    request_levels, block_start, pos = [], [], []
    groups: dict[tuple, Group] = {}
    row = 0
    last = max_position - 1
    for r, (c, n, d, allowed, k) in enumerate(zip(num_computed, num_scheduled, num_drafts, levels, K)):
        lvs = [lv for lv in range(1, d + 2) if allowed is None or lv in allowed]
        request_levels.append(lvs)
        starts = []
        block_start.append(starts)
        js = tuple(n - d - 1 + lv for lv in lvs)
        for j in js:
            starts.append(row)
            p0 = c + j
            pos.extend(p if p < last else last for p in range(p0, p0 + k + 1))
            row += k + 1
        if js:
            key = (n, js, k)
            if key not in groups:
                groups[key] = Group([], n, js, k)
            groups[key].requests.append(r)
    for g in groups.values():
        g.finish()
    positions = torch.tensor(pos, dtype=torch.int64)
    return StepLayout([k + 1 for k in K], request_levels, block_start, positions, list(groups.values()))
