"""Triton tidar_attention (under TRITON_INTERPRET=1 on CPU): tile classification vs the dense twin,
forward and backward vs the fp64 reference over training / prefill / decode layouts, GQA, per-row
seg_start, shapes that divide no tile (S in 1, 7, 113, 127, 300), forced split-KV, fp32 and fp16
(FlashAttention-style bound: error vs fp64 at most 2x plain low-precision PyTorch + small atol),
empty queries, non-contiguous inputs, the custom op (opcheck), bad calls. GPU variants: bf16, real sizes.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
from test_tidar_attention import CASES, loop_attention, plain_attention, rand_inputs, seg  # noqa: E402  (the twins)

from tidar_kernels import (  # noqa: E402
    backends,  # noqa: E402
    dense_mask,
    layouts,
    tidar_attention,
)
from tidar_kernels.backends import resolve  # noqa: E402
from tidar_kernels.triton import tidar_attention as tri  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float32: 1e-5}


@pytest.fixture
def small_tiles():
    """16x16 tiles: short test sequences then cover many tiles of every class."""
    old = tri._FORCE_CONFIG
    tri._FORCE_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
    yield
    tri._FORCE_CONFIG = old


def test_triton_backend_is_live():
    assert resolve("tidar_attention", "triton", torch.device(DEV)).records == (
        backends.record("tidar_attention", "triton"),
    )
    assert backends._IMPLS["tidar_attention"]["triton"] is tri.tidar_attention


# ---------------------------------------------------------------------------------------------
# Tile classification vs the dense twin (torch.equal on every tile)
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "training_L40_K8": (layouts.training(40, 8), [0]),
    "training_L37_K5_partial_block": (layouts.training(37, 5), [0]),
    "training_K1": (layouts.training(24, 1), [0]),
    "training_KeqL": (layouts.training(20, 20), [0]),
    "decode_K4_ragged": (layouts.decode_step(4), [0, 37, 100]),
    "prefill_n29_K6": (layouts.prefill(29, 6), [0, 11]),
    "causal_7": (layouts.causal(7), [50, 3]),
}


def _random_layout(S, seed):
    g = torch.Generator().manual_seed(seed)
    ll = torch.randint(0, S + 1, (S,), generator=g, dtype=torch.int32)
    bid = torch.randint(-1, 6, (S,), generator=g, dtype=torch.int32)  # blocks not contiguous
    return ll, bid


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("name", list(LAYOUTS) + ["random_113"])
def test_tile_classes_match_dense_twin(name, group):
    if name == "random_113":
        ll, bid = _random_layout(113, 7)
        segs = [0, 20]
    else:
        lay, segs = LAYOUTS[name]
        ll, bid = lay.local_limit, lay.block_id
    S = ll.shape[0]
    seg_start = torch.tensor(segs, dtype=torch.int32)
    Skv = max(segs) + S + 9
    mask = dense_mask(ll, bid, seg_start, Skv)  # [B, S, Skv]
    rows = mask.repeat_interleave(group, 1)  # packed rows: query r // group
    for bm, bn in ((16, 16), (32, 16), (64, 64)):
        cls = tri.tile_classes(ll, bid, seg_start, Skv, group, bm, bn)
        n_m, n_n = cls.shape[1], cls.shape[2]
        padded = torch.zeros(len(segs), n_m * bm, n_n * bn, dtype=torch.bool)
        valid = torch.zeros_like(padded)
        padded[:, : S * group, :Skv] = rows
        valid[:, : S * group, :Skv] = True
        vis = padded.view(len(segs), n_m, bm, n_n, bn).transpose(2, 3)
        ok = valid.view(len(segs), n_m, bm, n_n, bn).transpose(2, 3)
        any_vis = vis.any(-1).any(-1)
        all_vis = (vis | ~ok).all(-1).all(-1)
        assert not (any_vis & (cls == tri.EMPTY)).any(), "a tile with visible keys is classified empty"
        assert torch.equal(cls == tri.FULL, (cls == tri.FULL) & all_vis), "a full tile hides a masked entry"
        # keys of the cached prefix are always full
        for b, s0 in enumerate(segs):
            assert (cls[b, :, : s0 // bn] == tri.FULL).all()


def test_training_work_scales_with_unmasked_area():
    """At 64x64 tiles the hybrid layout (L=512, K=16) is about 75% empty and the kernel skips those tiles:
    the tiles it computes cover at most 1.3x the visible area (the rest is the diagonal/block boundary)."""
    lay = layouts.training(512, 16)
    S = lay.seg_len
    cls = tri.tile_classes(lay.local_limit, lay.block_id, seg(0), S, 1, 64, 64)
    visible = dense_mask(lay.local_limit, lay.block_id, seg(0), S).float().mean().item()
    computed = (cls != tri.EMPTY).float().mean().item()
    assert visible < 0.27 and computed < 1.3 * visible, (visible, computed)


# ---------------------------------------------------------------------------------------------
# Forward vs the fp64 reference
# ---------------------------------------------------------------------------------------------


def _ref(q, k, v, ll, bid, seg_start, scale=None):
    return tidar_attention(q.double(), k.double(), v.double(), ll, bid, seg_start, scale, backend="reference")


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_forward_fp32_cases(small_tiles, case):
    """The reference suite's layouts (training K=1 and K=L, ragged prefill/decode, GQA) vs the fp64 loop twin."""
    name, lay, B, Hq, Hkv, seg_start, extra = CASES[case]
    S, D = lay.seg_len, 16
    Skv = int(seg_start.max()) + S + extra
    q, k, v = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, dtype=torch.float32, seed=100 + case)
    out = tidar_attention(q, k, v, lay.local_limit, lay.block_id, seg_start, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (B, Hq, S, D)
    assert out.abs().max() < 10, "a planted (never visible) key leaked into the output"
    want = loop_attention(q.double(), k.double(), v.double(), lay.local_limit, lay.block_id, seg_start)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


SHAPES = [  # (name, local_limit, block_id, B, Hq, Hkv, seg_start, Skv extra, D)
    ("S1_decode_K1_prefix", layouts.causal(1), 2, 2, 1, [40, 0], 3, 32),
    ("S7_causal", layouts.causal(7), 1, 2, 2, [5], 0, 16),
    ("S113_random_gqa2", "random113", 2, 4, 2, [0, 17], 9, 16),
    ("S127_prefill_n120_K7", layouts.prefill(120, 7), 1, 2, 1, [0], 0, 32),
    ("S110_decode_K10_gqa4", layouts.decode_step(10), 2, 4, 1, [70, 3], 5, 16),
    ("S300_training_L150_K16", layouts.training(150, 16), 1, 1, 1, [0], 0, 16),
]


def _layout(lay):
    if lay == "random113":
        return _random_layout(113, 11)
    return lay.local_limit, lay.block_id


@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_forward_fp32_odd_shapes(case):
    name, lay, B, Hq, Hkv, segs, extra, D = case
    ll, bid = _layout(lay)
    S = ll.shape[0]
    seg_start = seg(*segs)
    Skv = max(segs) + S + extra
    q, k, v = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, dtype=torch.float32, seed=S)
    out = tidar_attention(q, k, v, ll, bid, seg_start, backend="triton")
    assert out.abs().max() < 10, "a planted (never visible) key leaked into the output"
    torch.testing.assert_close(out.double(), _ref(q, k, v, ll, bid, seg_start), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_kv_matches(num_splits):
    """Forced split-KV (log-sum-exp merge) equals the reference, including splits that get no tile and rows
    whose prefix is empty; the merged LSE equals the unsplit one."""
    lay = layouts.decode_step(3)
    S = lay.seg_len
    seg_start = seg(90, 0, 33)
    Skv = 90 + S + 4
    q, k, v = rand_inputs(3, 4, 2, S, Skv, 16, seg_start, dtype=torch.float32, seed=num_splits)
    args = (q, k, v, lay.local_limit, lay.block_id, seg_start, 0.25)
    out1, lse1 = tri.attention_with_lse(*args, num_splits=1)
    out, lse = tri.attention_with_lse(*args, num_splits=num_splits)
    want = _ref(q, k, v, lay.local_limit, lay.block_id, seg_start, 0.25)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-5)


def test_noncontiguous_inputs_and_scale():
    lay = layouts.prefill(13, 4)
    S = lay.seg_len
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, S, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 2, 16, S + 3, generator=g).transpose(2, 3)
    v = torch.randn(2, 2, S + 3, 32, generator=g)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = tidar_attention(q, k, v, lay.local_limit, lay.block_id, scale=0.3, backend="triton")
    torch.testing.assert_close(
        out.double(), _ref(q, k, v, lay.local_limit, lay.block_id, seg(3, 3), 0.3), rtol=1e-5, atol=1e-5
    )


def test_query_seeing_no_key_returns_zero_without_nan():
    ll = torch.tensor([0, 1, 0, 0], dtype=torch.int32)
    bid = torch.tensor([-1, -1, 5, 5], dtype=torch.int32)
    q, k, v = (t.requires_grad_(True) for t in rand_inputs(1, 2, 1, 4, 4, 16, seg(0), torch.float32, 50, False))
    out = tidar_attention(q, k, v, ll, bid, 0, backend="triton")
    assert not torch.isnan(out).any() and (out[:, :, 0] == 0).all()
    torch.testing.assert_close(out.double(), _ref(q, k, v, ll, bid, seg(0)), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, 0] == 0).all(), "an empty query gets zero gradient"
    for num_splits in (1, 2):  # the lse convention shared with the CUDA forward: -inf where a query sees no key
        _, lse = tri.attention_with_lse(q, k, v, ll, bid, seg(0), 0.25, num_splits=num_splits)
        assert torch.isneginf(lse[:, :, 0]).all() and torch.isfinite(lse[:, :, 1:]).all()


# ---------------------------------------------------------------------------------------------
# Backward vs the fp64 reference
# ---------------------------------------------------------------------------------------------


def _grads(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out, [t.grad for t in leaves]


BWD = [  # (name, layout, B, Hq, Hkv, seg_start, extra)
    ("training_L56_K8_gqa2", layouts.training(56, 8), 1, 4, 2, [0], 0),
    ("training_L37_K5", layouts.training(37, 5), 1, 2, 2, [0], 0),
    ("decode_K4_ragged_gqa4", layouts.decode_step(4), 2, 4, 1, [30, 0], 3),
    ("prefill_n50_K7_ragged", layouts.prefill(50, 7), 2, 2, 1, [0, 9], 2),
    ("random_113", "random113", 1, 2, 1, [6], 2),
]


@pytest.mark.parametrize("case", BWD, ids=[c[0] for c in BWD])
def test_backward_fp32(case):
    name, lay, B, Hq, Hkv, segs, extra = case
    ll, bid = _layout(lay)
    S, D = ll.shape[0], 16
    seg_start = seg(*segs)
    Skv = max(segs) + S + extra
    q, k, v = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, dtype=torch.float32, seed=S + 1)
    dout = torch.randn(B, Hq, S, D, generator=torch.Generator().manual_seed(2))
    _, got = _grads(lambda q, k, v: tidar_attention(q, k, v, ll, bid, seg_start, backend="triton"), q, k, v, dout)
    _, want = _grads(
        lambda q, k, v: tidar_attention(q, k, v, ll, bid, seg_start, backend="reference"),
        q.double(),
        k.double(),
        v.double(),
        dout,
    )
    for n, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"d{n}")
    for b, s0 in enumerate(segs):  # never-seen keys get exactly zero gradient
        assert (got[1][b, :, s0 + S :] == 0).all() and (got[2][b, :, s0 + S :] == 0).all()


# ---------------------------------------------------------------------------------------------
# Low precision: FlashAttention-style bound, forward and backward
# ---------------------------------------------------------------------------------------------


def _plain(q, k, v, ll, bid, seg_start):
    mask = dense_mask(ll, bid, seg_start, k.shape[2])
    return plain_attention(q, k, v, mask, q.shape[-1] ** -0.5)


LOWP_DTYPES = [torch.float16, torch.bfloat16]  # bf16 under the interpreter: upcast before tl.dot


@pytest.mark.parametrize("dtype", LOWP_DTYPES)
@pytest.mark.parametrize("layout_name", ["training", "decode", "prefill"])
def test_low_precision_fwd_bwd_bounded_by_pytorch_error(dtype, layout_name):
    lay, segs = {
        "training": (layouts.training(40, 8), [0]),
        "decode": (layouts.decode_step(4), [3, 40]),
        "prefill": (layouts.prefill(33, 6), [0, 5]),
    }[layout_name]
    ll, bid = lay.local_limit, lay.block_id
    S, D, Hq, Hkv = lay.seg_len, 32, 4, 2
    seg_start = seg(*segs)
    Skv = max(segs) + S + 2
    q, k, v = (
        t.to(DEV) for t in rand_inputs(len(segs), Hq, Hkv, S, Skv, D, seg_start, dtype=dtype, seed=17, plant=False)
    )
    ll, bid, seg_start = ll.to(DEV), bid.to(DEV), seg_start.to(DEV)
    dout = torch.randn(len(segs), Hq, S, D, generator=torch.Generator().manual_seed(3)).to(DEV)
    out, g = _grads(lambda q, k, v: tidar_attention(q, k, v, ll, bid, seg_start, backend="triton"), q, k, v, dout)
    ref, gr = _grads(
        lambda q, k, v: tidar_attention(q, k, v, ll, bid, seg_start, backend="reference"),
        q.double(),
        k.double(),
        v.double(),
        dout,
    )
    base, gb = _grads(lambda q, k, v: _plain(q, k, v, ll, bid, seg_start), q, k, v, dout)
    assert out.dtype == dtype
    for n, x, r, bx in zip(["out", "dq", "dk", "dv"], [out] + g, [ref] + gr, [base] + gb):
        err = (x.double() - r).abs().max().item()
        base_err = (bx.double() - r).abs().max().item()
        assert base_err > 0, n
        assert err <= 2 * base_err + ATOL[dtype], f"{dtype} {n}: err {err:.3g} vs plain PyTorch {base_err:.3g}"


# ---------------------------------------------------------------------------------------------
# The op as torch.library custom ops; bad inputs
# ---------------------------------------------------------------------------------------------


def test_custom_op_opcheck():
    lay = layouts.decode_step(2)
    S = lay.seg_len
    q, k, v = rand_inputs(1, 2, 1, S, S + 5, 16, seg(5), dtype=torch.float32, seed=1, plant=False)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(
        tri._fwd_op,
        (q, k, v, lay.local_limit, lay.block_id, seg(5), 0.25, 1),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_float64_is_a_clear_error():
    lay = layouts.causal(3)
    q = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="triton"):
        tidar_attention(q, q, q, lay.local_limit, lay.block_id, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at real sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


def _gpu_bound(dtype, lay, B, Hq, Hkv, segs, D, backward):
    ll, bid = lay.local_limit.cuda(), lay.block_id.cuda()
    S = lay.seg_len
    seg_start = torch.tensor(segs, dtype=torch.int32, device="cuda")
    Skv = max(segs) + S
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, S, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, device="cuda", generator=g).to(dtype)
    dout = torch.randn(B, Hq, S, D, device="cuda", generator=g)
    fn = lambda q, k, v: tidar_attention(q, k, v, ll, bid, seg_start, backend="triton")  # noqa: E731
    ref_fn = lambda q, k, v: tidar_attention(q, k, v, ll, bid, seg_start, backend="reference")  # noqa: E731
    if backward:
        out, g1 = _grads(fn, q, k, v, dout)
        ref, gr = _grads(ref_fn, q.float(), k.float(), v.float(), dout)
        base, gb = _grads(ref_fn, q, k, v, dout)
    else:
        out, ref, base = fn(q, k, v), ref_fn(q.float(), k.float(), v.float()), ref_fn(q, k, v)
        g1 = gr = gb = []
    for n, x, r, bx in zip(["out", "dq", "dk", "dv"], [out] + g1, [ref] + gr, [base] + gb):
        err = (x.float() - r).abs().max().item()
        base_err = (bx.float() - r).abs().max().item()
        assert err <= 2 * base_err + 1e-3, f"{n}: err {err:.3g} vs PyTorch {base_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_training_fwd_bwd(dtype, D):
    _gpu_bound(dtype, layouts.training(1024, 16), 2, 8, 2, [0, 0], D, backward=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", [0, 1000, 8192])
def test_gpu_decode_step(dtype, prefix):
    _gpu_bound(dtype, layouts.decode_step(16), 2, 32, 8, [prefix, prefix // 3], 128, backward=False)


@pytest.mark.gpu
def test_gpu_split_kv_and_cuda_graph():
    lay = layouts.decode_step(16)
    S = lay.seg_len
    ll, bid = lay.local_limit.cuda(), lay.block_id.cuda()
    seg_start = torch.tensor([16000], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 16000 + S, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    want = tri.attention_with_lse(q, k, v, ll, bid, seg_start, 128**-0.5, num_splits=1)[0]
    for ns in (0, 4, 16):
        got = tri.attention_with_lse(q, k, v, ll, bid, seg_start, 128**-0.5, num_splits=ns)[0]
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    fn = lambda: tidar_attention(q, k, v, ll, bid, seg_start, backend="triton")  # noqa: E731
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, fn(), rtol=0, atol=0)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(), fn(), rtol=0, atol=0)
