"""The dK/dV kernel's per-key-tile query-row ranges (``dkdv_ranges``) vs the dense twin: every (query tile,
key tile) pair with a visible (query, key) element lies inside the key tile's two ranges, for random layouts and
the training / prefill / decode layouts, GQA-packed rows (G > 1), ragged seg_start and several tile sizes; and
in the training layout the ranges add no tile beyond the non-empty ones (the walk is as tight as the old skip)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402

from tidar_kernels import dense_mask, layouts  # noqa: E402
from tidar_kernels.triton import tidar_attention as tri  # noqa: E402


def _random_layout(S, seed):
    g = torch.Generator().manual_seed(seed)
    ll = torch.randint(0, S + 1, (S,), generator=g, dtype=torch.int32)
    bid = torch.randint(-1, 6, (S,), generator=g, dtype=torch.int32)  # blocks not contiguous
    return ll, bid


CASES = {
    "training_L40_K8": (layouts.training(40, 8), [0]),
    "training_L37_K5": (layouts.training(37, 5), [0, 3]),
    "prefill_n29_K6": (layouts.prefill(29, 6), [0, 11]),
    "decode_K4_ragged": (layouts.decode_step(4), [0, 37, 100]),
    "decode_K16": (layouts.decode_step(16), [5, 64]),
}


def _tile_visibility(ll, bid, segs, Skv, group, bm, bn):
    """[B, n_m, n_n]: does the (query-row tile, key tile) pair hold a visible element (dense twin)."""
    S = ll.shape[0]
    B = len(segs)
    mask = dense_mask(ll, bid, torch.tensor(segs, dtype=torch.int32), Skv)  # [B, S, Skv]
    rows = mask.repeat_interleave(group, 1)  # packed rows: row r is query r // group
    n_m, n_n = -(-S * group // bm), -(-Skv // bn)
    padded = torch.zeros(B, n_m * bm, n_n * bn, dtype=torch.bool)
    padded[:, : S * group, :Skv] = rows
    return padded.view(B, n_m, bm, n_n, bn).transpose(2, 3).any(-1).any(-1)


def _covered(ranges, n_m, bm):
    """[B, n_m, n_n] bool: query tile m is walked for key tile n."""
    m0 = (torch.arange(n_m) * bm).view(1, -1, 1)
    a_lo, a_hi, b_lo, b_hi = (ranges[..., i].long().unsqueeze(1) for i in range(4))
    return ((m0 >= a_lo) & (m0 < a_hi)) | ((m0 >= b_lo) & (m0 < b_hi))


@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("name", list(CASES) + ["random_113", "random_57"])
def test_dkdv_ranges_cover_every_visible_tile(name, group):
    if name.startswith("random"):
        S = int(name.split("_")[1])
        ll, bid = _random_layout(S, S)
        segs = [0, 20]
    else:
        lay, segs = CASES[name]
        ll, bid = lay.local_limit, lay.block_id
    S = ll.shape[0]
    Skv = max(segs) + S + 9  # scratch keys past the longest row
    for bm, bn in ((16, 16), (32, 16), (64, 32)):
        ranges = tri.dkdv_ranges(ll, bid, torch.tensor(segs, dtype=torch.int32), Skv, group, bm, bn)
        n_m, n_n = -(-S * group // bm), -(-Skv // bn)
        assert ranges.shape == (len(segs), n_n, 4) and ranges.dtype == torch.int32
        a_lo, a_hi, b_lo, b_hi = ranges.unbind(-1)
        assert (ranges % bm == 0).all() and (ranges >= 0).all() and (ranges <= n_m * bm).all()
        assert (a_lo <= a_hi).all() and (a_hi <= b_lo).all() and (b_lo <= b_hi).all()  # disjoint, A before B
        vis = _tile_visibility(ll, bid, segs, Skv, group, bm, bn)
        cov = _covered(ranges, n_m, bm)
        assert not (vis & ~cov).any(), f"visible tile outside the dK/dV ranges at {bm}x{bn}"
        # never more than the tiles the per-tile statistics call non-empty, plus the gap inside a range
        ne = tri.tile_classes(ll, bid, torch.tensor(segs, dtype=torch.int32), Skv, group, bm, bn) != tri.EMPTY
        assert not (ne & ~cov).any()


@pytest.mark.parametrize("group", [1, 4])
def test_training_ranges_walk_only_non_empty_tiles(group):
    """Hybrid layout: the non-empty query tiles of each key tile are two runs (clean queries at or after it,
    mask blocks past it); the two ranges are exactly those, so the pipelined walk does no extra tile."""
    lay = layouts.training(256, 16)
    S = lay.seg_len
    seg0 = torch.tensor([0], dtype=torch.int32)
    ranges = tri.dkdv_ranges(lay.local_limit, lay.block_id, seg0, S, group, 64, 64)
    ne = tri.tile_classes(lay.local_limit, lay.block_id, seg0, S, group, 64, 64) != tri.EMPTY
    assert torch.equal(_covered(ranges, ne.shape[1], 64), ne)
