"""Memoised range checks: one host sync per tensor version, never a stale answer after an in-place write."""

import pytest
import torch

import tidar_kernels
from tidar_kernels import _checks


def test_range_is_remembered_per_version_and_refreshed_after_inplace_write():
    t = torch.tensor([3, 1, 7], dtype=torch.int32)
    assert _checks.int_range(t) == (1, 7)
    assert t._tidar_range[1] == (1, 7)
    t[0] = -5  # bumps t._version: the remembered range must not be used
    assert _checks.int_range(t) == (-5, 7)
    t[1:].fill_(100)  # a write through a view bumps the shared version too
    assert _checks.int_range(t) == (-5, 100)


def test_kv_append_sees_an_inplace_change_of_a_validated_seg_start():
    k = torch.randn(2, 1, 8, 4)
    v = torch.randn(2, 1, 8, 4)
    new = torch.randn(2, 1, 3, 4)
    seg = torch.tensor([0, 5], dtype=torch.int32)
    tidar_kernels.kv_append(k, v, new, new, seg, backend="reference")
    seg[1] = 6  # now 6 + 3 > 8: must raise, not reuse the earlier check
    before = k.clone()
    with pytest.raises(ValueError, match="overflow"):
        tidar_kernels.kv_append(k, v, new, new, seg, backend="reference")
    assert torch.equal(k, before)
