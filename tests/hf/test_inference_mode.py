"""Under ``torch.inference_mode`` (a common way to call generation) the ops and the decode loop work and stay
exact: inference tensors carry no version counter, so the per-forward memos must neither crash on them nor go
stale when such a tensor changes in place."""

from __future__ import annotations

import torch
from conftest import tiny_model

import tidar
import tidar_kernels
from tidar_kernels import layouts
from tidar_kernels.reference.tidar_attention import dense_mask


def _sdpa(q, k, v, lay, seg_start):
    mask = dense_mask(lay.local_limit, lay.block_id, seg_start, k.shape[2])[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_attention_memo_follows_in_place_changes_of_inference_tensors():
    torch.manual_seed(0)
    lay = layouts.decode_step(3)
    S, B, H, D, Skv = lay.seg_len, 2, 2, 16, 40
    with torch.inference_mode():
        q = torch.randn(B, H, S, D)
        k, v = torch.randn(B, H, Skv, D), torch.randn(B, H, Skv, D)
        seg_start = torch.tensor([5, 9], dtype=torch.int32)
        assert seg_start.is_inference()
        args = (lay.local_limit, lay.block_id, seg_start)
        first = tidar_kernels.tidar_attention(q, k, v, *args, backend="reference")
        torch.testing.assert_close(first, _sdpa(q, k, v, lay, seg_start))
        seg_start.add_(7)  # same object, new values, no version bump: the memo must not serve the old mask
        second = tidar_kernels.tidar_attention(q, k, v, *args, backend="reference")
        torch.testing.assert_close(second, _sdpa(q, k, v, lay, seg_start))
        assert not torch.allclose(first, second)
        seg_start.fill_(Skv)  # now out of range: still caught (the range memo is not stale either)
        try:
            tidar_kernels.tidar_attention(q, k, v, *args, backend="reference")
        except ValueError as e:
            assert "seg_start" in str(e)
        else:
            raise AssertionError("an out-of-range seg_start passed under inference_mode")


def test_kv_append_bit_exact_under_inference_mode():
    torch.manual_seed(1)
    with torch.inference_mode():
        k, v = torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
        k_new, v_new = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
        seg_start = torch.tensor([3, 11], dtype=torch.int32)
        want_k, want_v = k.clone(), v.clone()
        for b, s in enumerate(seg_start.tolist()):
            want_k[b, :, s : s + 4], want_v[b, :, s : s + 4] = k_new[b], v_new[b]
        tidar_kernels.kv_append(k, v, k_new, v_new, seg_start, backend="reference")
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_generate_under_inference_mode_equals_hf_greedy():
    model = tidar.patch(tiny_model("qwen2"), draft_len=4)
    ids = torch.tensor([[5, 17, 33, 2, 9], [40, 41, 42, 43, 44]])
    with torch.no_grad():
        want = model.generate(ids, do_sample=False, max_new_tokens=20, draft_len=1)  # AR steps of the same model
    with torch.inference_mode():
        got = tidar.generate(model, ids, max_new_tokens=20)
        again = tidar.generate(model, ids, max_new_tokens=20, draft_len="auto")
        dropin = model.generate(ids, do_sample=False, max_new_tokens=20)
    assert torch.equal(got.sequences, want)
    assert torch.equal(again.sequences, want)
    assert torch.equal(dropin, want)
    # and the layouts first built under inference mode still serve a later autograd-free call outside it
    with torch.no_grad():
        assert torch.equal(tidar.generate(model, ids, max_new_tokens=20).sequences, want)
