"""Triton tidar_attention_paged (under TRITON_INTERPRET=1 on CPU) and Triton kv_append_paged: the op tests of
test_tidar_attention_paged.py / test_kv_append_paged.py run on backend="triton" through the conftest ``backend``
fixture; here the kernel's own paths: 16x16 tiles (every tile class over short rows, tiles that straddle blocks of
4 and lie inside blocks of 32), forced split-KV (the merge), shapes that divide no tile, the custom op's fake, bf16
under the interpreter's upcast. GPU variants at real sizes (K = 16 steps over 4096-key prefixes, bf16, D = 128,
block sizes 16 and 32): against the contiguous Triton kernel on the gathered keys and the fp32 reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
from test_tidar_attention_paged import contiguous_twin, make_pool, q_for, seg_twin  # noqa: E402  (the twins)

from tidar_kernels import backends, kv_append_paged, layouts, tidar_attention, tidar_attention_paged  # noqa: E402
from tidar_kernels.backends import resolve  # noqa: E402
from tidar_kernels.reference.tidar_attention_paged import gather_paged_kv  # noqa: E402
from tidar_kernels.triton import tidar_attention as tri  # noqa: E402
from tidar_kernels.triton import tidar_attention_paged as trip  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_tiles():
    old = tri._FORCE_CONFIG
    tri._FORCE_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
    yield
    tri._FORCE_CONFIG = old


def test_triton_backends_are_live():
    for op, impl in (("tidar_attention_paged", trip.tidar_attention_paged), ("kv_append_paged", None)):
        assert resolve(op, "triton", torch.device(DEV)).records == (backends.record(op, "triton"),)
        assert impl is None or backends._IMPLS[op]["triton"] is impl
    assert not backends.record("tidar_attention_paged", "triton").grad


def _paged(q, kc, vc, table, seq_lens, lay, num_splits=0, softcap=None):
    args = [t.to(DEV) for t in (q, kc, vc, table, seq_lens, lay.local_limit, lay.block_id)]
    with torch.no_grad():
        return trip.attention_paged(*args, q.shape[-1] ** -0.5, softcap, num_splits=num_splits).cpu()


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "name,lay,lens,bs",
    [
        ("decode_K3_bs4", layouts.decode_step(3), [12, 45, 70], 4),  # tiles of 16 straddle 4 blocks each
        ("prefill_n13K4_bs32", layouts.prefill(13, 4), [17, 60], 32),  # tiles inside a block
        ("training_L9K3_bs8", layouts.training(9, 3), [18, 18], 8),  # seq_lens == S: no prefix
    ],
)
def test_tiles_and_split_kv_match_the_reference(small_tiles, name, lay, lens, bs, num_splits):
    kc, vc, table, seq_lens = make_pool(lens, 2, 16, bs, torch.float32, seed=len(name))
    q = q_for(len(lens), 4, lay.seg_len, 16, torch.float32, seed=num_splits)
    out = _paged(q, kc, vc, table, seq_lens, lay, num_splits, softcap=2.5 if num_splits == 3 else None)
    want = contiguous_twin(q, kc, vc, table, seq_lens, lay, softcap=2.5 if num_splits == 3 else None)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_segment_off_pool_small_tiles_and_split_kv(small_tiles, num_splits):
    """k_seg/v_seg with tiles of 16 that hold pool keys and keys off the pool at once (pool lengths not multiples
    of 16), non-contiguous k_seg, forced split-KV."""
    lay = layouts.decode_step(4)  # S = 20: 4 drafts in the pool, 16 proposal rows off it
    pool = torch.tensor([4, 29, 51], dtype=torch.int32)
    kc, vc, table, _ = make_pool([n + 16 for n in pool.tolist()], 2, 16, 8, torch.float32, seed=num_splits)
    g = torch.Generator().manual_seed(num_splits)
    k_seg = torch.randn(3, 16, 2, 16, generator=g).transpose(1, 2)  # [B, Hkv, S_sep, D], non-contiguous
    v_seg = torch.randn(3, 16, 2, 16, generator=g).transpose(1, 2)
    q = q_for(3, 4, lay.seg_len, 16, torch.float32, seed=7)
    args = [t.to(DEV) for t in (q, kc, vc, table, pool, lay.local_limit, lay.block_id)]
    with torch.no_grad():
        out = trip.attention_paged(*args, 0.25, None, num_splits, k_seg.to(DEV), v_seg.to(DEV)).cpu()
    want = seg_twin(q, kc, vc, table, pool, k_seg, v_seg, lay, scale=0.25)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


def test_bf16_and_fp16_odd_head_dim():
    """D = 24 (padded to 32 inside), S = 7 queries of a causal step, bf16 (upcast under the interpreter) and fp16."""
    lay = layouts.causal(7)
    kc, vc, table, seq_lens = make_pool([7, 23, 40], 1, 24, 16, torch.float32, seed=2)
    q = q_for(3, 3, 7, 24, torch.float32, seed=2)
    want = contiguous_twin(q, kc, vc, table, seq_lens, lay)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        out = _paged(q.to(dtype), kc.to(dtype), vc.to(dtype), table, seq_lens, lay)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


def test_custom_op_fake_shapes():
    """torch.compile traces the op through its fake: the output's shape and dtype without running the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 6, 8, dtype=torch.float16)
        kc = torch.empty(5, 16, 2, 8, dtype=torch.float16)
        t, n, ll = (
            torch.zeros(2, 3, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
            torch.zeros(6, dtype=torch.int32),
        )
        out = trip._fwd_op(q, kc, kc, t, n, ll, ll, 0.3, 0.0, 0)
    assert out.shape == q.shape and out.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# GPU: real sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("B,prefix,K", [(1, 4096, 16), (8, 4096, 16), (4, 1000, 4)])
def test_gpu_step_equals_contiguous_kernel(bs, B, prefix, K):
    """bf16, D = 128, Hq/Hkv = 12/2, ragged rows in a shuffled pool: within the contiguous Triton kernel's own error
    (both against the fp32 reference), and the split-KV choice of a long prefix exercised at B = 1."""
    lay = layouts.decode_step(K)
    S, D, Hq, Hkv = lay.seg_len, 128, 12, 2
    lens = [prefix + S - 37 * b for b in range(B)]
    need = sum(-(-n // bs) for n in lens)
    g = torch.Generator(device="cuda").manual_seed(bs + B)
    kc = torch.randn(need + 8, bs, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    perm = torch.randperm(need + 8, device="cuda", generator=g)
    width = -(-max(lens) // bs)
    table = torch.zeros(B, width, dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(lens):
        m = -(-n // bs)
        table[b, :m] = perm[used : used + m].int()
        used += m
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ll, bid = lay.local_limit.cuda(), lay.block_id.cuda()
    with torch.no_grad():
        out = tidar_attention_paged(q, kc, vc, table, seq_lens, ll, bid, backend="triton")
        k, v = gather_paged_kv(kc, vc, table, seq_lens)
        cont = tidar_attention(q, k.contiguous(), v.contiguous(), ll, bid, seq_lens - S, backend="triton")
        truth = tidar_attention(q.float(), k.float(), v.float(), ll, bid, seq_lens - S, backend="reference")
    base = (cont.float() - truth).abs().max().item()
    err = (out.float() - truth).abs().max().item()
    assert err <= 2 * base + 2e-3, f"paged {err:.2e} vs contiguous kernel {base:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 32])
def test_gpu_proposal_rows_off_the_pool(bs):
    """The separate-segment form at a real size (K = 16: 16 drafts in the pool, 256 proposal rows off it, bf16,
    D = 128, 8 ragged rows): the plain form on the same keys, where they sit in the pool."""
    lay = layouts.decode_step(16)
    S, D, Hq, Hkv, B = lay.seg_len, 128, 12, 2, 8
    S_sep = S - 16
    lens = [4096 + S - 37 * b for b in range(B)]
    width = -(-max(lens) // bs)
    nb = B * width + 4
    g = torch.Generator(device="cuda").manual_seed(bs)
    kc = torch.randn(nb, bs, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    table = torch.randperm(nb, device="cuda", generator=g)[: B * width].view(B, width).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    k, v = gather_paged_kv(kc, vc, table, seq_lens)  # [B, Hkv, max(lens), D]
    pool = seq_lens - S_sep
    idx = (pool.long()[:, None] + torch.arange(S_sep, device="cuda")[None])[:, None, :, None]
    k_seg = k.gather(2, idx.expand(B, Hkv, S_sep, D))
    v_seg = v.gather(2, idx.expand(B, Hkv, S_sep, D))
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ll, bid = lay.local_limit.cuda(), lay.block_id.cuda()
    with torch.no_grad():
        plain = tidar_attention_paged(q, kc, vc, table, seq_lens, ll, bid, backend="triton")
        off = tidar_attention_paged(q, kc, vc, table, pool, ll, bid, k_seg=k_seg, v_seg=v_seg, backend="triton")
    torch.testing.assert_close(off.float(), plain.float(), rtol=0, atol=1e-2)


@pytest.mark.gpu
def test_gpu_append_real_size_bit_exact():
    """A K = 16 step of 64 rows (17408 tokens, 8 heads, D = 128, bf16) into a shuffled pool of blocks of 16, 10% -1."""
    T, H, D, bs, nb = 64 * 272, 8, 128, 16, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(nb, bs, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    kn = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vn = torch.randn_like(kn)
    slots = torch.randperm(nb * bs, device="cuda", generator=g)[:T]
    slots[torch.rand(T, device="cuda", generator=g) < 0.1] = -1
    want_k, want_v = kc.clone(), vc.clone()
    kv_append_paged(want_k, want_v, kn, vn, slots, backend="reference")
    kv_append_paged(kc, vc, kn, vn, slots, backend="triton")
    assert torch.equal(kc.view(torch.int16), want_k.view(torch.int16))
    assert torch.equal(vc.view(torch.int16), want_v.view(torch.int16))
