"""Sparse proposal levels as data: ``layouts.decode_step(K, levels)`` keeps exactly the rows and keys of the
chosen blocks of the full layout, its dense twin follows the mask rule, and attention under it equals the
full layout's attention restricted to those rows (every backend takes it: it is only data)."""

from __future__ import annotations

import pytest
import torch

import tidar_kernels as tk
from tidar_kernels import layouts


def _rows(K, levels):
    return list(range(K)) + [K + (j - 1) * K + s for j in levels for s in range(K)]


@pytest.mark.parametrize("K,levels", [(1, (1,)), (3, (2,)), (4, (1, 3)), (5, (1, 2, 3, 4, 5)), (6, (2, 4, 6)), (4, ())])
def test_levels_are_a_subset_of_the_full_layout(K, levels):
    full, sub = layouts.decode_step(K), layouts.decode_step(K, levels)
    keep = torch.tensor(_rows(K, levels))
    assert sub.seg_len == K * (1 + len(levels))
    assert torch.equal(sub.local_limit, full.local_limit[keep])
    assert torch.equal(sub.block_id, full.block_id[keep])
    assert torch.equal(sub.position_ids, full.position_ids[keep])
    # the dense twin: full mask restricted to the kept rows and the kept segment keys (prefix of 7 cached keys)
    pre = 7
    m_full = tk.dense_mask(full.local_limit, full.block_id, pre, pre + full.seg_len)[0]
    m_sub = tk.dense_mask(sub.local_limit, sub.block_id, pre, pre + sub.seg_len)[0]
    cols = torch.cat([torch.arange(pre), pre + keep])
    assert torch.equal(m_sub, m_full[keep][:, cols])
    assert layouts.decode_step(K, levels) is sub  # cached


def test_levels_none_is_the_papers_layout_and_bad_levels_raise():
    assert layouts.decode_step(4, None) is layouts.decode_step(4)
    for bad in ([2, 1], [0], [5], [1, 1], [1.0], "12", [True], 3):
        with pytest.raises(ValueError, match="levels"):
            layouts.decode_step(4, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_under_levels_equals_full_layout_rows(dtype):
    torch.manual_seed(0)
    K, levels, B, Hq, Hkv, D, pre = 5, (2, 5), 2, 4, 2, 16, [9, 3]
    full, sub = layouts.decode_step(K), layouts.decode_step(K, levels)
    keep = torch.tensor(_rows(K, levels))
    Skv = max(pre) + full.seg_len
    q = torch.randn(B, Hq, full.seg_len, D, dtype=dtype)
    k = torch.randn(B, Hkv, Skv, D, dtype=dtype)
    v = torch.randn(B, Hkv, Skv, D, dtype=dtype)
    seg = torch.tensor(pre, dtype=torch.int32)
    out_full = tk.tidar_attention(q.float(), k.float(), v.float(), full.local_limit, full.block_id, seg)
    # the sparse segment: its keys are the kept segment keys, written contiguously after the prefix
    k2, v2 = (
        torch.zeros(B, Hkv, max(pre) + sub.seg_len, D, dtype=dtype),
        torch.zeros(B, Hkv, max(pre) + sub.seg_len, D, dtype=dtype),
    )
    for b in range(B):
        k2[b, :, : pre[b]], v2[b, :, : pre[b]] = k[b, :, : pre[b]], v[b, :, : pre[b]]
        k2[b, :, pre[b] : pre[b] + sub.seg_len] = k[b, :, pre[b] + keep]
        v2[b, :, pre[b] : pre[b] + sub.seg_len] = v[b, :, pre[b] + keep]
    out_sub = tk.tidar_attention(q[:, :, keep], k2, v2, sub.local_limit, sub.block_id, seg)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out_sub.float(), out_full[:, :, keep], atol=tol, rtol=tol)
