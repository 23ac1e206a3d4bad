"""tidar_attention vs a naive per-query loop in fp64 (forward and backward), GQA, ragged seg_start,
low precision against what plain PyTorch gets wrong, empty queries, bad calls."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tidar_kernels import dense_mask, layouts, tidar_attention

OP = "tidar_attention"  # the `backend` fixture (conftest) runs each test on every live implementation of it

HUGE = 1e4  # planted in keys/values that must never be seen


def sees(ll: list[int], bid: list[int], seg: int, i: int, j: int) -> bool:
    """docs/design.md §2, written again here so the loop does not share code with the op."""
    S = len(ll)
    return j < seg + ll[i] or (seg <= j < seg + S and bid[i] >= 0 and bid[j - seg] == bid[i])


@contextlib.contextmanager
def one_thread():
    """Hundreds of tiny ops: intra-op threads only add barrier overhead (seconds on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def loop_attention(q, k, v, local_limit, block_id, seg_start, scale=None):
    """Naive per-query attention: for each (row, query) gather the visible keys and softmax over them.
    Differentiable (autograd through index/softmax); queries that see nothing return zeros."""
    with one_thread():
        return _loop_attention(q, k, v, local_limit, block_id, seg_start, scale)


def _loop_attention(q, k, v, local_limit, block_id, seg_start, scale):
    B, Hq, S, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    heads = torch.arange(Hq) // group  # q head h reads kv head h // group
    scale = D**-0.5 if scale is None else scale
    ll, bid = local_limit.tolist(), block_id.tolist()
    seg_starts = seg_start.tolist() if torch.is_tensor(seg_start) else [seg_start] * B
    rows = []
    for b in range(B):
        kb, vb = k[b][heads], v[b][heads]  # [Hq, Skv, D]
        outs = []
        for i in range(S):
            idx = [j for j in range(Skv) if sees(ll, bid, seg_starts[b], i, j)]
            if not idx:
                outs.append(q[b, :, i] * 0.0)
                continue
            kk = kb[:, idx]  # [Hq, n, D]
            vv = vb[:, idx]
            w = torch.softmax(torch.einsum("hd,hnd->hn", q[b, :, i], kk) * scale, -1)
            outs.append(torch.einsum("hn,hnd->hd", w, vv))
        rows.append(torch.stack(outs, 1))  # [Hq, S, D]
    return torch.stack(rows, 0)


def rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, dtype=torch.float64, seed=0, plant=True):
    """Fresh random q/k/v; keys past each row's segment end are filled with huge values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64)
    if plant:
        for b, s0 in enumerate(seg_start.tolist()):
            k[b, :, s0 + S :] = HUGE
            v[b, :, s0 + S :] = -HUGE
    return q.to(dtype), k.to(dtype), v.to(dtype)


def seg(*vals):
    return torch.tensor(vals, dtype=torch.int32)


# (name, layout, B, Hq, Hkv, seg_start, extra scratch keys after the longest row)
CASES = [
    ("training_L4K2", layouts.training(4, 2), 1, 2, 1, seg(0), 0),
    ("training_L7K3_gqa2", layouts.training(7, 3), 2, 4, 2, seg(0, 0), 0),
    ("training_K1", layouts.training(6, 1), 1, 4, 4, seg(0), 0),
    ("training_KeqL", layouts.training(5, 5), 1, 4, 1, seg(0), 0),
    ("prefill_n5K3_ragged", layouts.prefill(5, 3), 3, 4, 1, seg(0, 3, 7), 2),
    ("decode_K1", layouts.decode_step(1), 2, 2, 2, seg(1, 9), 3),  # S = 2
    ("decode_K2_ragged", layouts.decode_step(2), 3, 4, 2, seg(4, 0, 11), 5),  # S = 6
    ("decode_K3_gqa4", layouts.decode_step(3), 2, 4, 1, seg(13, 2), 1),  # S = 12
    ("causal_S1", layouts.causal(1), 2, 2, 1, seg(0, 6), 2),  # S = 1
    ("causal_S7", layouts.causal(7), 2, 4, 2, seg(9, 3), 0),  # S = 7
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_forward_matches_loop_fp64(backend, case):
    name, lay, B, Hq, Hkv, seg_start, extra = CASES[case]
    S, D = lay.seg_len, 16
    Skv = int(seg_start.max()) + S + extra
    q, k, v = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, seed=100 + case)
    out = tidar_attention(q, k, v, lay.local_limit, lay.block_id, seg_start, backend=backend)
    want = loop_attention(q, k, v, lay.local_limit, lay.block_id, seg_start)
    assert out.shape == (B, Hq, S, D) and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert out.abs().max() < 10, "a planted (never visible) key leaked into the output"
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_forward_s113_ragged_gqa2(backend):
    """S = 113 (divides no tile size), per-row seg_start, random arbitrary layout in range."""
    g = torch.Generator().manual_seed(113)
    S, D, B, Hq, Hkv = 113, 8, 2, 2, 1
    ll = torch.randint(0, S + 1, (S,), generator=g, dtype=torch.int32)
    bid = torch.randint(-1, 6, (S,), generator=g, dtype=torch.int32)
    seg_start = seg(0, 17)
    Skv = 17 + S + 9
    q, k, v = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, seed=5)
    out = tidar_attention(q, k, v, ll, bid, seg_start, backend=backend)
    torch.testing.assert_close(out, loop_attention(q, k, v, ll, bid, seg_start), rtol=1e-10, atol=1e-10)


def test_default_seg_start_and_int_seg_start_and_scale(backend):
    lay = layouts.decode_step(2)
    S, Skv = lay.seg_len, lay.seg_len + 4
    q, k, v = rand_inputs(2, 2, 1, S, Skv, 8, seg(4, 4), seed=3, plant=False)
    want = loop_attention(q, k, v, lay.local_limit, lay.block_id, 4, scale=0.3)
    for s in (None, 4, seg(4, 4), seg(4, 4).long()):
        out = tidar_attention(q, k, v, lay.local_limit, lay.block_id, s, scale=0.3, backend=backend)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # int64 layout tensors are accepted too
    out = tidar_attention(q, k, v, lay.local_limit.long(), lay.block_id.long(), backend=backend, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_ragged_rows_are_independent(backend):
    """Each row of a ragged batch equals that row run alone with its own Skv = seg_start + S."""
    lay = layouts.decode_step(3)
    S = lay.seg_len
    seg_start = seg(2, 10, 0)
    Skv = 10 + S + 3
    q, k, v = rand_inputs(3, 4, 2, S, Skv, 8, seg_start, seed=11)
    out = tidar_attention(q, k, v, lay.local_limit, lay.block_id, seg_start, backend=backend)
    for b, s0 in enumerate(seg_start.tolist()):
        alone = tidar_attention(
            q[b : b + 1],
            k[b : b + 1, :, : s0 + S],
            v[b : b + 1, :, : s0 + S],
            lay.local_limit,
            lay.block_id,
            backend=backend,
        )
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-12, atol=1e-12)


def test_noncontiguous_inputs(backend):
    lay = layouts.prefill(6, 3)
    S = lay.seg_len
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, S, 4, 8, generator=g, dtype=torch.float64).transpose(1, 2)  # [B, H, S, D] strided
    k = torch.randn(2, 2, 8, S + 3, generator=g, dtype=torch.float64).transpose(2, 3)
    v = torch.randn(2, 2, S + 3, 16, generator=g, dtype=torch.float64)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = tidar_attention(q, k, v, lay.local_limit, lay.block_id, backend=backend)
    want = loop_attention(q, k, v, lay.local_limit, lay.block_id, 3)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Low precision: error vs fp64 at most ~2x that of plain low-precision PyTorch attention
# ---------------------------------------------------------------------------------------------


def plain_attention(q, k, v, mask, scale):
    """What a user would write in PyTorch at this dtype (repeat K/V, matmul, masked softmax, matmul)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout_name", ["training", "decode"])
def test_low_precision_error_bounded_by_pytorch_error(backend, dtype, layout_name):
    lay = layouts.training(24, 4) if layout_name == "training" else layouts.decode_step(4)
    S, D, B, Hq, Hkv = lay.seg_len, 32, 2, 4, 2
    seg_start = seg(0, 0) if layout_name == "training" else seg(3, 30)
    Skv = int(seg_start.max()) + S + 2
    ql, kl, vl = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, dtype=dtype, seed=17, plant=False)
    # the truth of these (already rounded) inputs, so the error measured is the computation's only
    want = loop_attention(ql.double(), kl.double(), vl.double(), lay.local_limit, lay.block_id, seg_start)
    out = tidar_attention(ql, kl, vl, lay.local_limit, lay.block_id, seg_start, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    mask = dense_mask(lay.local_limit, lay.block_id, seg_start, Skv)
    base = plain_attention(ql, kl, vl, mask, D**-0.5)
    err = (out.double() - want).abs().max().item()
    base_err = (base.double() - want).abs().max().item()
    atol = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-7}[dtype]
    assert base_err > 0  # the baseline really is low precision
    assert err <= 2 * base_err + atol, f"{dtype}: err {err:.3g} vs plain PyTorch {base_err:.3g}"


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lay,B,Hq,Hkv,seg_start,extra",
    [
        (layouts.training(5, 2), 1, 4, 2, seg(0), 0),
        (layouts.decode_step(2), 2, 4, 1, seg(3, 0), 2),
        (layouts.prefill(7, 1), 2, 2, 2, seg(0, 4), 1),
    ],
    ids=["training", "decode_ragged", "prefill"],
)
def test_backward_matches_loop_fp64(backend, lay, B, Hq, Hkv, seg_start, extra):
    S, D = lay.seg_len, 8
    Skv = int(seg_start.max()) + S + extra
    q, k, v = rand_inputs(B, Hq, Hkv, S, Skv, D, seg_start, seed=29)
    dout = torch.randn(B, Hq, S, D, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    grads = []
    for fn in (
        lambda q, k, v: tidar_attention(q, k, v, lay.local_limit, lay.block_id, seg_start, backend=backend),
        lambda q, k, v: loop_attention(q, k, v, lay.local_limit, lay.block_id, seg_start),
    ):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves).backward(dout)
        grads.append([t.grad for t in leaves])
    for name, got, want in zip("qkv", *grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")
    dk, dv = grads[0][1], grads[0][2]
    for b, s0 in enumerate(seg_start.tolist()):  # never-seen keys get exactly zero gradient
        assert (dk[b, :, s0 + S :] == 0).all() and (dv[b, :, s0 + S :] == 0).all()
    assert dk.abs().sum() > 0 and dv.abs().sum() > 0


def test_backward_fp32_close_to_fp64(backend):
    lay = layouts.training(8, 4)
    S, D = lay.seg_len, 16
    q, k, v = rand_inputs(2, 4, 2, S, S, D, seg(0, 0), seed=41, plant=False)
    dout = torch.randn(2, 4, S, D, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    res = {}
    for dt in (torch.float32, torch.float64):
        leaves = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        tidar_attention(*leaves, lay.local_limit, lay.block_id, backend=backend).backward(dout.to(dt))
        res[dt] = [t.grad.double() for t in leaves]
    for got, want in zip(res[torch.float32], res[torch.float64]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Queries that see nothing
# ---------------------------------------------------------------------------------------------


def test_query_seeing_no_key_returns_zero_without_nan(backend):
    # seg_start 0, local_limit 0, block -1: query 0 sees nothing; query 1 sees key 0; 2 sees its block {2, 3}
    ll = torch.tensor([0, 1, 0, 0], dtype=torch.int32)
    bid = torch.tensor([-1, -1, 5, 5], dtype=torch.int32)
    q, k, v = rand_inputs(1, 2, 1, 4, 4, 8, seg(0), seed=50, plant=False)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = tidar_attention(*leaves, ll, bid, 0, backend=backend)
    assert not torch.isnan(out).any()
    assert (out[:, :, 0] == 0).all()
    torch.testing.assert_close(out[:, :, 1], v[:, :, 0].expand(1, 2, 8).contiguous())  # one key: its value
    torch.testing.assert_close(out, loop_attention(q, k, v, ll, bid, 0), rtol=1e-10, atol=1e-10)
    out.sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert (leaves[0].grad[:, :, 0] == 0).all(), "an empty query gets zero gradient"


# ---------------------------------------------------------------------------------------------
# Bad calls
# ---------------------------------------------------------------------------------------------


def _good():
    lay = layouts.decode_step(2)  # S = 6
    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 2, 10, 8)
    v = torch.randn(2, 2, 10, 8)
    return dict(q=q, k=k, v=v, local_limit=lay.local_limit, block_id=lay.block_id, seg_start=seg(4, 2))


def _with(**kw):
    args = _good()
    args.update(kw)
    return args


I32 = dict(dtype=torch.int32)
BAD_CALLS = [
    ("int_q", lambda: _with(q=torch.randint(0, 5, (2, 4, 6, 8))), TypeError, "q"),
    ("k_dtype_mismatch", lambda: _with(k=torch.randn(2, 2, 10, 8, dtype=torch.float64)), TypeError, "k"),
    ("v_dtype_mismatch", lambda: _with(v=torch.randn(2, 2, 10, 8, dtype=torch.float16)), TypeError, "v"),
    ("q_3d", lambda: _with(q=torch.randn(4, 6, 8)), ValueError, "q"),
    ("q_not_tensor", lambda: _with(q=[[1.0]]), TypeError, "q"),
    ("k_head_dim", lambda: _with(k=torch.randn(2, 2, 10, 4)), ValueError, "k"),
    ("k_batch", lambda: _with(k=torch.randn(3, 2, 10, 8)), ValueError, "k"),
    ("v_shape", lambda: _with(v=torch.randn(2, 2, 9, 8)), ValueError, "v"),
    ("gqa_ratio", lambda: _with(k=torch.randn(2, 3, 10, 8), v=torch.randn(2, 3, 10, 8)), ValueError, "GQA"),
    (
        "no_queries",
        lambda: _with(q=torch.randn(2, 4, 0, 8), local_limit=torch.zeros(0, **I32), block_id=torch.zeros(0, **I32)),
        ValueError,
        "q",
    ),
    ("local_limit_above_S", lambda: _with(local_limit=torch.full((6,), 7, **I32)), ValueError, "local_limit"),
    (
        "local_limit_negative",
        lambda: _with(local_limit=torch.tensor([1, 2, -1, 1, 2, 2], **I32)),
        ValueError,
        "local_limit",
    ),
    (
        "block_id_below_minus_one",
        lambda: _with(block_id=torch.tensor([-1, -1, -2, 1, 2, 2], **I32)),
        ValueError,
        "block_id",
    ),
    ("local_limit_wrong_length", lambda: _with(local_limit=torch.ones(5, **I32)), ValueError, "local_limit"),
    ("block_id_wrong_length", lambda: _with(block_id=torch.ones(7, **I32)), ValueError, "block_id"),
    ("block_id_float", lambda: _with(block_id=torch.ones(6)), TypeError, "block_id"),
    ("local_limit_2d", lambda: _with(local_limit=torch.ones(1, 6, **I32)), ValueError, "local_limit"),
    ("seg_start_past_end", lambda: _with(seg_start=seg(5, 2)), ValueError, "seg_start"),
    ("seg_start_negative", lambda: _with(seg_start=seg(4, -1)), ValueError, "seg_start"),
    ("seg_start_int_past_end", lambda: _with(seg_start=5), ValueError, "seg_start"),
    ("seg_start_wrong_length", lambda: _with(seg_start=seg(4, 2, 0)), ValueError, "seg_start"),
    ("seg_start_float", lambda: _with(seg_start=torch.tensor([4.0, 2.0])), TypeError, "seg_start"),
    (
        "fewer_keys_than_queries",
        lambda: _with(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8), seg_start=None),
        ValueError,
        "seg_start",
    ),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.triton_interpreter
def test_bad_calls_raise(backend, name, make, exc, match):
    args = make()
    with pytest.raises(exc, match=match):
        tidar_attention(**args, backend=backend)


@pytest.mark.triton_interpreter
def test_good_call_of_bad_call_table_runs(backend):
    """The base of the bad-call table is itself valid, so each bad call fails for its own reason."""
    out = tidar_attention(**_good(), backend=backend)
    assert out.shape == (2, 4, 6, 8) and torch.isfinite(out).all()


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        tidar_attention(**_good(), backend="nope")


@pytest.mark.skip(reason="mismatched devices need a second device (CUDA); not testable on a CPU-only machine")
def test_mismatched_device_raises():  # pragma: no cover
    pass


def _as_dense(attn_mask, empty, B, S, Skv):
    m = torch.ones(B, 1, S, Skv, dtype=torch.bool) if attn_mask is None else attn_mask.expand(B, 1, S, Skv)
    e = torch.zeros(B, 1, S, 1, dtype=torch.bool) if empty is None else empty.expand(B, 1, S, 1)
    return m, e


@pytest.mark.parametrize("seed", range(6))
def test_reference_cpu_mask_shortcuts_equal_the_dense_rule(seed):
    """The reference backend's CPU mask (a cached S x S block after a visible prefix for a uniform seg_start,
    None when nothing is hidden) equals the dense rule on every kind of call: decode steps, prefill, causal,
    negative local_limit, empty rows, ragged seg_start, keys beyond the segment."""
    from tidar_kernels.reference.tidar_attention import _mask

    g = torch.Generator().manual_seed(seed)
    cases = [
        (layouts.decode_step(3), [7, 7]),
        (layouts.decode_step(4, (1, 3)), [0]),
        (layouts.prefill(5, 2), [0, 0]),
        (layouts.causal(1), [9]),
        (layouts.causal(4), [0, 0, 0]),
        (layouts.decode_step(2), [3, 8]),  # ragged
        (layouts.causal(1), [3, 8, 0, 5]),  # a ragged batch's AR step: one token per row at its own offset
        (layouts.decode_step(1), [6, 2]),
        (
            layouts.Layout(
                torch.tensor([0], dtype=torch.int32), torch.tensor([-1], dtype=torch.int32), torch.arange(1)
            ),
            [4, 1],
        ),  # a token that may not see itself: the general rule, not the shortcut
    ]
    S = int(torch.randint(1, 9, (1,), generator=g))
    ll = torch.randint(-3, S + 2, (S,), generator=g, dtype=torch.int32)
    bid = torch.randint(-1, 3, (S,), generator=g, dtype=torch.int32)
    cases.append((layouts.Layout(ll, bid, torch.arange(S)), [4, 4]))  # random, maybe negative, maybe empty rows
    cases.append((layouts.Layout(ll.clamp_min(0), bid, torch.arange(S)), [0]))
    for lay, seg in cases:
        S = lay.seg_len
        seg_start = torch.tensor(seg, dtype=torch.int32)
        for extra in (0, 2):  # the segment ends the keys / keys beyond it
            Skv = max(seg) + S + extra
            m, e = _as_dense(*_mask(lay.local_limit, lay.block_id, seg_start, Skv), len(seg), S, Skv)
            want = dense_mask(lay.local_limit, lay.block_id, seg_start, Skv)[:, None]
            want_empty = ~want.any(-1, keepdim=True)
            assert torch.equal(e, want_empty), (lay, seg, extra)
            assert torch.equal(m, want | want_empty), (lay, seg, extra)
