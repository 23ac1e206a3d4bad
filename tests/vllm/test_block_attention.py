"""The mask blocks' layout and attention (no vLLM needed): ``block_attention`` equals ``tidar_attention_paged``
on the request's TiDAR segment (scheduled rows, then blocks off the pool), restricted to the block rows."""

from __future__ import annotations

import pytest
import torch

from tidar.vllm.block_attention import BlockAttention
from tidar.vllm.step_layout import plan_step
from tidar_kernels import tidar_attention_paged


def test_plan_step_positions_and_levels():
    # request 0: a prompt of 5 (no drafts); request 1: last token + 3 drafts at positions 20..23; K = 3
    lay = plan_step([0, 20], [5, 4], [0, 3], K=[3, 3], levels=[None, None], max_position=26)
    assert lay.request_levels == [[1], [1, 2, 3, 4]]
    assert lay.positions[:4].tolist() == [5, 6, 7, 8]  # after the prompt: slot 0 = the first sampled token
    # request 1, block l sees j = l scheduled tokens: slots at 20 + l .. 20 + l + 3, clamped to 25
    assert lay.positions[4:8].tolist() == [21, 22, 23, 24]
    assert lay.positions[-4:].tolist() == [24, 25, 25, 25]
    assert [(g.n, g.js, g.requests) for g in lay.groups] == [(5, (5,), [0]), (4, (1, 2, 3, 4), [1])]
    assert lay.block_for(1, 3) == (4 + 2 * 4, 3)
    sparse = plan_step([20], [4], [3], K=[3], levels=[(1, 4)], max_position=100)
    assert sparse.request_levels == [[1, 4]] and sparse.block_for(0, 3) == (0, 1)
    assert plan_step([20], [4], [3], K=[3], levels=[()], max_position=100).num_rows == 0
    # blocks of different lengths per request: separate groups, positions per block length
    mixed = plan_step([7, 7], [3, 3], [2, 2], K=[2, 4], levels=[(1,), (1,)], max_position=100)
    assert mixed.block_len == [3, 5] and [g.K for g in mixed.groups] == [2, 4]
    assert mixed.positions.tolist() == [8, 9, 10, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("levels", [None, (1,), (1, 3)])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2)])
def test_block_attention_equals_the_paged_op(levels, Hq, Hkv):
    torch.manual_seed(0)
    K, D, bs, nblocks = 3, 16, 8, 12
    computed, sched, drafts = [13, 5], [4, 4], [3, 3]
    lay = plan_step(computed, sched, drafts, [K, K], [levels, levels], max_position=1000)
    (g,) = lay.groups
    B = len(computed)
    seq_lens = torch.tensor([c + n for c, n in zip(computed, sched)], dtype=torch.int32)
    # 3 blocks hold each row's 17 or 9 pool keys; the reference paged op also indexes the table over the keys off
    # the pool (seq_lens + S_sep), so the table is wider than the rows need
    table = torch.stack([torch.randperm(nblocks)[:8] for _ in range(B)]).int()
    k_pool, v_pool = torch.randn(nblocks, bs, Hkv, D), torch.randn(nblocks, bs, Hkv, D)
    M, n = len(g.js) * (K + 1), g.n
    q = torch.randn(B, Hq, n + M, D)
    k_seg, v_seg = torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
    ref = tidar_attention_paged(
        q, k_pool, v_pool, table, seq_lens, g.local_limit, g.block_id, k_seg=k_seg, v_seg=v_seg, backend="reference"
    )
    got = BlockAttention(g, seq_lens, table, bs)(q[:, :, n:], k_seg, v_seg, k_pool, v_pool, D**-0.5)
    torch.testing.assert_close(got, ref[:, :, n:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layouts", [("plain", "plain"), ("transposed", "plain"), ("transposed", "transposed")])
@pytest.mark.parametrize("computed", [[13, 5], [2, 0], [30, 21]])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2)])
def test_attend_packed_reads_vllm_cpu_pool(computed, Hq, Hkv, layouts):
    """``attend_packed`` on vLLM's CPU pool ``[num_blocks, Hkv, block_size, 2 * D]`` (keys and values in each
    layout ``kv_pool`` reads) equals the paged op over the same pool's views: rows of different lengths, one or several
    pool blocks, the last one partly filled."""
    from tidar.vllm.kv_pool import pool_views

    torch.manual_seed(1)
    K, D, bs, nblocks = 3, 16, 8, 12
    sched, drafts = [4, 4], [3, 3]
    lay = plan_step(computed, sched, drafts, [K, K], [None, None], max_position=1000)
    (g,) = lay.groups
    B = len(computed)
    seq_lens = torch.tensor([c + n for c, n in zip(computed, sched)], dtype=torch.int32)
    table = torch.stack([torch.randperm(nblocks)[:8] for _ in range(B)]).int()
    kv_cache = torch.randn(nblocks, Hkv, bs, 2 * D)
    k_pool, v_pool = pool_views(kv_cache, layouts)
    M, n = len(g.js) * (K + 1), g.n
    q = torch.randn(B, Hq, n + M, D)
    k_seg, v_seg = torch.randn(B, Hkv, M, D), torch.randn(B, Hkv, M, D)
    ref = tidar_attention_paged(
        q, k_pool, v_pool, table, seq_lens, g.local_limit, g.block_id, k_seg=k_seg, v_seg=v_seg, backend="reference"
    )
    att = BlockAttention(g, seq_lens, table, bs)
    got = att.attend_packed(q[:, :, n:], k_seg, v_seg, kv_cache, layouts, D**-0.5)
    torch.testing.assert_close(got, ref[:, :, n:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att(q[:, :, n:], k_seg, v_seg, k_pool, v_pool, D**-0.5), got, rtol=1e-6, atol=1e-6)
