"""tidar_attention_paged == tidar_attention on the keys gathered through the block table (a Python-loop twin, not
the op's gather): decode steps, prefills, sparse levels, causal AR steps, ragged rows, shuffled pools, shared
blocks, junk past each row's blocks, block sizes 1..64, GQA, soft-capping, strided pool views, every float dtype
(low precision against what plain PyTorch gets wrong); appends with kv_append_paged then attention, step after
step, against the contiguous cache; bad calls refused before any work; no backward."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tidar_kernels import kv_append, kv_append_paged, layouts, tidar_attention, tidar_attention_paged

OP = "tidar_attention_paged"  # the `backend` fixture (conftest) runs each test on every live implementation of it
pytestmark = pytest.mark.triton_interpreter  # every test here also runs on Triton under the interpreter

HUGE = 1e4  # planted in pool slots no row may read


def make_pool(seq_lens, Hkv, D, block_size, dtype=torch.float32, seed=0, spare=3, share_first=False):
    """A shuffled pool holding each row's ``seq_lens[b]`` keys in its own blocks (row 1 reuses row 0's first block
    when ``share_first``), spare blocks and each row's unused tail slots planted with HUGE, the table padded with
    junk ids (never read). Returns (k_cache, v_cache, block_table int32, seq_lens int32)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    nb = sum(need) + spare
    perm = torch.randperm(nb, generator=g).tolist()
    k = torch.full((nb, block_size, Hkv, D), HUGE, dtype=torch.float64)
    v = torch.full((nb, block_size, Hkv, D), -HUGE, dtype=torch.float64)
    width = max(need) + 2
    table = torch.randint(nb, nb + 1000, (len(seq_lens), width), generator=g)  # junk: outside the pool
    table[:, -1] = -1
    for b, (n, m) in enumerate(zip(seq_lens, need)):
        ids = [perm.pop() for _ in range(m)]
        if share_first and b == 1 and need[0] >= 1:
            ids[0] = int(table[0, 0])  # a prefix block shared with row 0 (prefix caching): read-only here
        table[b, :m] = torch.tensor(ids)
        for i, blk in enumerate(ids):
            used = min(block_size, n - i * block_size)
            if not (share_first and b == 1 and i == 0):
                k[blk, :used] = torch.randn(used, Hkv, D, generator=g, dtype=torch.float64)
                v[blk, :used] = torch.randn(used, Hkv, D, generator=g, dtype=torch.float64)
    if share_first and len(seq_lens) > 1:
        assert seq_lens[0] >= block_size and seq_lens[1] >= block_size, "share only full blocks"
    return k.to(dtype), v.to(dtype), table.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int32)


def gather_loop(k_cache, v_cache, block_table, seq_lens):
    """Python-loop twin of the block-table read: ``[B, Hkv, max(seq_lens), D]``, HUGE past each row's keys."""
    bs = k_cache.shape[1]
    B, n = len(seq_lens), int(max(seq_lens))
    _, _, Hkv, D = k_cache.shape
    k = torch.full((B, Hkv, n, D), HUGE, dtype=k_cache.dtype)
    v = torch.full((B, Hkv, n, D), -HUGE, dtype=k_cache.dtype)
    for b in range(B):
        for j in range(int(seq_lens[b])):
            blk = int(block_table[b, j // bs])
            k[b, :, j] = k_cache[blk, j % bs]
            v[b, :, j] = v_cache[blk, j % bs]
    return k, v


def q_for(B, Hq, S, D, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64).to(dtype)


def contiguous_twin(q, k_cache, v_cache, table, seq_lens, lay, **kw):
    k, v = gather_loop(k_cache, v_cache, table, seq_lens)
    S = q.shape[2]
    return tidar_attention(q, k, v, lay.local_limit, lay.block_id, seq_lens - S, backend="reference", **kw)


def run(backend, device, q, k_cache, v_cache, table, seq_lens, lay, **kw):
    args = (t.to(device) for t in (q, k_cache, v_cache, table, seq_lens, lay.local_limit, lay.block_id))
    with torch.no_grad():
        return tidar_attention_paged(*args, backend=backend, **kw).cpu()


def _tol(backend):
    return dict(rtol=1e-10, atol=1e-10) if backend == "reference" else dict(rtol=2e-5, atol=2e-5)


def _dtype(backend):
    return torch.float64 if backend == "reference" else torch.float32  # the kernels take fp16/bf16/fp32


# (name, layout, seq_lens, Hq, Hkv, block_size, softcap): the segment is each row's last S keys
CASES = [
    ("decode_K2_ragged_bs16", layouts.decode_step(2), [6, 37, 70], 4, 2, 16, None),
    ("decode_K4_levels_1_3_bs32", layouts.decode_step(4, levels=(1, 3)), [12, 75], 4, 1, 32, None),
    ("prefill_n5K3_bs16_softcap", layouts.prefill(5, 3), [8, 8 + 19], 2, 2, 16, 3.0),
    ("causal_S1_ar_step_bs8", layouts.causal(1), [1, 9, 33], 2, 1, 8, None),
    ("decode_K3_gqa4_bs4", layouts.decode_step(3), [12, 29], 4, 1, 4, 2.0),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_paged_equals_contiguous(backend, device, case):
    name, lay, lens, Hq, Hkv, bs, softcap = CASES[case]
    D = 16
    dt = _dtype(backend)
    kc, vc, table, seq_lens = make_pool(lens, Hkv, D, bs, dt, seed=case)
    q = q_for(len(lens), Hq, lay.seg_len, D, dt, seed=case)
    out = run(backend, device, q, kc, vc, table, seq_lens, lay, softcap=softcap)
    want = contiguous_twin(q, kc, vc, table, seq_lens, lay, softcap=softcap)
    assert out.shape == q.shape and out.dtype == dt
    assert out.abs().max() < 10, "a planted (never visible) key leaked into the output"
    torch.testing.assert_close(out, want, **_tol(backend))


@pytest.mark.parametrize("block_size", [1, 2, 12, 16, 32, 64])  # 12: any size, not only powers of two
def test_every_block_size_and_shared_blocks(backend, device, block_size):
    lay = layouts.decode_step(2)
    lens = [70, 65, 6]
    dt = _dtype(backend)
    kc, vc, table, seq_lens = make_pool(lens, 2, 8, block_size, dt, seed=block_size, share_first=True)
    q = q_for(3, 4, lay.seg_len, 8, dt, seed=block_size)
    out = run(backend, device, q, kc, vc, table, seq_lens, lay)
    torch.testing.assert_close(out, contiguous_twin(q, kc, vc, table, seq_lens, lay), **_tol(backend))


def test_strided_pool_view_empty_queries_and_scale(backend, device):
    """A pool that is a view (K and V interleaved in one tensor, as some engines keep them), q non-contiguous,
    queries that see no key (zeros), an explicit scale."""
    lens, bs, Hkv, D = [3, 20], 16, 2, 16
    dt = _dtype(backend)
    kc, vc, table, seq_lens = make_pool(lens, Hkv, D, bs, dt, seed=5)
    kv = torch.stack((kc, vc), 2)  # [NB, bs, 2, Hkv, D]
    kc_view, vc_view = kv[:, :, 0], kv[:, :, 1]
    lay = layouts.Layout(
        local_limit=torch.tensor([0, 1, 3], dtype=torch.int32),
        block_id=torch.tensor([-1, -1, -1], dtype=torch.int32),
        position_ids=torch.arange(3),
    )
    q = q_for(2, 6, D, 3, dt).transpose(2, 3)  # non-contiguous [B, Hq, S, D]
    out = run(backend, device, q, kc_view, vc_view, table, seq_lens, lay, scale=0.3)
    want = contiguous_twin(q, kc, vc, table, seq_lens, lay, scale=0.3)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0])), "row 0's first query sees no key: zeros"
    torch.testing.assert_close(out, want, **_tol(backend))


DTYPES = [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-5)]


@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_low_precision_error_bounded_by_plain_pytorch(backend, device, dtype, atol):
    """Error vs the fp64 truth at most 2x that of plain PyTorch (the contiguous reference) in the same dtype + atol."""
    lay = layouts.decode_step(3)
    kc, vc, table, seq_lens = make_pool([12, 40], 2, 32, 16, torch.float64, seed=9)
    q = q_for(2, 4, lay.seg_len, 32, torch.float64, seed=9)
    truth = contiguous_twin(q, kc, vc, table, seq_lens, lay)
    low = [t.to(dtype) for t in (q, kc, vc)]
    base = (contiguous_twin(low[0], low[1], low[2], table, seq_lens, lay).double() - truth).abs().max().item()
    out = run(backend, device, low[0], low[1], low[2], table, seq_lens, lay)
    assert out.dtype == dtype
    err = (out.double() - truth).abs().max().item()
    assert err <= 2 * base + atol, f"{backend}: max err {err:.2e} > 2 x plain PyTorch {base:.2e} + {atol:g}"


def test_append_then_attend_step_after_step(backend, device):
    """An engine's loop: a prefill, then two TiDAR steps with different acceptances (ragged rows), each segment
    written with kv_append_paged into a shuffled pool (the [MASK] proposal rows too: scratch past the committed
    length, overwritten next step) and attended with tidar_attention_paged, against kv_append + tidar_attention on
    a contiguous cache."""
    dt = _dtype(backend)
    B, Hq, Hkv, D, bs, K = 2, 4, 2, 16, 16, 2
    g = torch.Generator().manual_seed(3)
    table = torch.randperm(12, generator=g)[:10].view(B, 5).to(torch.int32)
    kc = torch.full((12, bs, Hkv, D), HUGE, dtype=dt, device=device)
    vc = torch.full((12, bs, Hkv, D), -HUGE, dtype=dt, device=device)
    cont_k, cont_v = torch.zeros(B, Hkv, 80, D, dtype=dt), torch.zeros(B, Hkv, 80, D, dtype=dt)
    committed = torch.zeros(B, dtype=torch.int32)
    steps = [(layouts.prefill(7, K), [7, 7]), (layouts.decode_step(K), [1, 2]), (layouts.decode_step(K), [2, 1])]
    for i, (lay, accepted) in enumerate(steps):
        S = lay.seg_len
        k_new = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dt)
        v_new = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dt)
        kv_append(cont_k, cont_v, k_new, v_new, committed, backend="reference")
        pos = committed.long()[:, None] + torch.arange(S)[None]  # [B, S] positions of the segment
        slots = (table.long().gather(1, pos // bs) * bs + pos % bs).reshape(-1)
        k_tok, v_tok = (t.permute(0, 2, 1, 3).reshape(B * S, Hkv, D).to(device) for t in (k_new, v_new))  # [T, Hkv, D]
        kv_append_paged(kc, vc, k_tok, v_tok, slots.to(device), backend=backend)
        seq_lens = committed + S
        q = q_for(B, Hq, S, D, dt, seed=10 + i)
        out = run(backend, device, q, kc.cpu(), vc.cpu(), table, seq_lens, lay)
        n = int(seq_lens.max())
        want = tidar_attention(q, cont_k[:, :, :n], cont_v[:, :, :n], lay.local_limit, lay.block_id, committed,
                               backend="reference")  # fmt: skip
        torch.testing.assert_close(out, want, **_tol(backend))
        committed = committed + torch.tensor(accepted, dtype=torch.int32)  # commit: move the lengths, copy nothing


def seg_twin(q, k_cache, v_cache, table, pool_lens, k_seg, v_seg, lay, **kw):
    """The separate-segment form's definition, by a loop: row b's pool keys followed by its k_seg keys."""
    k, v = gather_loop(k_cache, v_cache, table, [max(1, int(n)) for n in pool_lens])
    B, S_sep, S = q.shape[0], k_seg.shape[2], q.shape[2]
    n = int(pool_lens.max()) + S_sep
    kk = torch.full((B, k.shape[1], n, k.shape[3]), HUGE, dtype=k.dtype)
    vv = torch.full_like(kk, -HUGE)
    for b, m in enumerate(pool_lens.tolist()):
        kk[b, :, :m], vv[b, :, :m] = k[b, :, :m], v[b, :, :m]
        kk[b, :, m : m + S_sep], vv[b, :, m : m + S_sep] = k_seg[b], v_seg[b]
    seg = pool_lens - (S - S_sep)
    return tidar_attention(q, kk, vv, lay.local_limit, lay.block_id, seg, backend="reference", **kw)


# (name, layout, pool keys per row, keys off the pool): the proposal rows of a step off the pool, or the whole segment
SEG_CASES = [
    ("decode_K3_proposals_off_pool", layouts.decode_step(3), [3, 40, 18], 9),
    ("decode_K4_levels_2_4", layouts.decode_step(4, levels=(2, 4)), [4, 33], 8),
    ("prefill_whole_segment_off_pool", layouts.prefill(5, 2), [0, 21], 7),
]


@pytest.mark.parametrize("case", range(len(SEG_CASES)), ids=[c[0] for c in SEG_CASES])
def test_separate_segment_form(backend, device, case):
    """k_seg/v_seg (the segment's last tokens off the pool) == the same keys appended to the pool after seq_lens,
    == tidar_attention on the concatenated keys."""
    name, lay, pool_lens, S_sep = SEG_CASES[case]
    dt, D, bs, Hkv = _dtype(backend), 16, 16, 2
    S = lay.seg_len
    full_lens = [n + S_sep for n in pool_lens]
    kc, vc, table, full = make_pool(full_lens, Hkv, D, bs, dt, seed=20 + case)
    g = torch.Generator().manual_seed(case)
    k_seg = torch.randn(len(pool_lens), Hkv, S_sep, D, generator=g, dtype=torch.float64).to(dt)
    v_seg = torch.randn(len(pool_lens), Hkv, S_sep, D, generator=g, dtype=torch.float64).to(dt)
    pool = torch.tensor(pool_lens, dtype=torch.int32)
    q = q_for(len(pool_lens), 4, S, D, dt, seed=case)
    with torch.no_grad():
        args = [t.to(device) for t in (q, kc, vc, table, pool, lay.local_limit, lay.block_id)]
        out = tidar_attention_paged(*args, k_seg=k_seg.to(device), v_seg=v_seg.to(device), softcap=4.0,
                                    backend=backend).cpu()  # fmt: skip
    torch.testing.assert_close(out, seg_twin(q, kc, vc, table, pool, k_seg, v_seg, lay, softcap=4.0), **_tol(backend))
    # the same keys written into the pool after each row's pool keys: the plain form
    pos = pool.long()[:, None] + torch.arange(S_sep)[None]
    slots = (table.long().gather(1, pos // bs) * bs + pos % bs).reshape(-1)
    kv_append_paged(kc, vc, k_seg.transpose(1, 2).reshape(-1, Hkv, D), v_seg.transpose(1, 2).reshape(-1, Hkv, D), slots)
    plain = run(backend, device, q, kc, vc, table, full, lay, softcap=4.0)
    torch.testing.assert_close(out, plain, **_tol(backend))


def test_separate_segment_with_a_table_as_wide_as_the_pool_keys(backend, device):
    """k_seg's keys are off the pool, so the block table needs only the pool keys' blocks (an engine sizes it so):
    rows whose pool keys fill their last block exactly, and a table with no column to spare, are not read past."""
    lay, S_sep, bs, Hkv, D, dt = layouts.decode_step(3), 9, 16, 2, 16, _dtype(backend)
    pool_lens = [32, 16, 5]  # two rows end on a block boundary: their k_seg keys would be in a block not in the table
    kc, vc, table, pool = make_pool(pool_lens, Hkv, D, bs, dt, seed=7)
    table = table[:, : -(-max(pool_lens) // bs)].contiguous()  # exactly the pool keys' blocks
    g = torch.Generator().manual_seed(7)
    k_seg, v_seg = (torch.randn(3, Hkv, S_sep, D, generator=g, dtype=torch.float64).to(dt) for _ in range(2))
    q = q_for(3, 4, lay.seg_len, D, dt, seed=7)
    with torch.no_grad():
        args = [t.to(device) for t in (q, kc, vc, table, pool, lay.local_limit, lay.block_id)]
        out = tidar_attention_paged(*args, k_seg=k_seg.to(device), v_seg=v_seg.to(device), backend=backend).cpu()
    torch.testing.assert_close(out, seg_twin(q, kc, vc, table, pool, k_seg, v_seg, lay), **_tol(backend))


def test_buffers_updated_in_place_between_steps(backend, device):
    """Engines keep block tables and lengths in persistent buffers updated in place: every call reads the current
    values (what the op remembers per table/lengths pair is keyed on their versions), also under inference_mode."""
    lay = layouts.decode_step(2)
    kc, vc, table, seq_lens = make_pool([20, 40], 2, 16, 8, _dtype(backend), seed=6, spare=6)
    q = q_for(2, 4, lay.seg_len, 16, _dtype(backend), seed=6)
    kc_d, vc_d, q_d = kc.to(device), vc.to(device), q.to(device)
    table_d, lens_d = table.to(device), seq_lens.to(device)
    ll, bid = lay.local_limit.to(device), lay.block_id.to(device)
    for step in range(3):
        with torch.no_grad() if step < 2 else torch.inference_mode():
            out = tidar_attention_paged(q_d, kc_d, vc_d, table_d, lens_d, ll, bid, backend=backend).cpu()
        want = contiguous_twin(q, kc, vc, table_d.cpu(), lens_d.cpu(), lay)
        torch.testing.assert_close(out, want, **_tol(backend))
        table_d[:, :2] = table_d[:, :2].flip(1).clone()  # blocks swapped in place: different keys, same tensor
        lens_d -= 3  # and shorter rows (their tails stay in the pool, now unread)


def test_no_backward():
    lay = layouts.decode_step(1)
    kc, vc, table, seq_lens = make_pool([4, 9], 1, 8, 4)
    q = q_for(2, 2, lay.seg_len, 8).requires_grad_()
    with pytest.raises(ValueError, match="q requires grad.*inference op"):
        tidar_attention_paged(q, kc, vc, table, seq_lens, lay.local_limit, lay.block_id)
    with pytest.raises(ValueError, match="k_cache requires grad"):
        tidar_attention_paged(q.detach(), kc.requires_grad_(), vc, table, seq_lens, lay.local_limit, lay.block_id)
    with torch.no_grad():  # under no_grad the same call runs
        tidar_attention_paged(q, kc, vc, table, seq_lens, lay.local_limit, lay.block_id)


# ---------------------------------------------------------------------------------------------
# Bad calls: a clear error naming the argument, before any backend runs, every input unchanged
# ---------------------------------------------------------------------------------------------


def good(**kw):
    """A valid call (S = 6, pool of 9 blocks of 4, rows of 6 and 11 keys) that each case perturbs."""
    lay = layouts.decode_step(2)
    kc, vc, table, seq_lens = make_pool([6, 11], 2, 8, 4, seed=4, spare=4)
    args = dict(
        q=q_for(2, 4, 6, 8),
        k_cache=kc,
        v_cache=vc,
        block_table=table,
        seq_lens=seq_lens,
        local_limit=lay.local_limit.clone(),
        block_id=lay.block_id.clone(),
    )
    args.update(kw)
    return args


I32 = dict(dtype=torch.int32)
BAD = [  # (name, perturbation, exception, argument named in the message)
    ("q_not_tensor", lambda: good(q=[1.0]), TypeError, "q"),
    ("q_int", lambda: good(q=torch.ones(2, 4, 6, 8, dtype=torch.int32)), TypeError, "q"),
    ("q_3d", lambda: good(q=torch.ones(4, 6, 8)), ValueError, "q"),
    ("k_cache_dtype", lambda: good(k_cache=good()["k_cache"].half()), TypeError, "k_cache"),
    ("k_cache_3d", lambda: good(k_cache=good()["k_cache"][0]), ValueError, "k_cache"),
    ("k_cache_head_dim", lambda: good(k_cache=good()["k_cache"][..., :4]), ValueError, "k_cache"),
    ("v_cache_shape", lambda: good(v_cache=good()["v_cache"][:3]), ValueError, "v_cache"),
    ("gqa_heads", lambda: good(q=q_for(2, 3, 6, 8)), ValueError, "k_cache/v_cache heads"),
    ("k_cache_device", lambda: good(k_cache=good()["k_cache"].to("meta")), ValueError, "k_cache"),
    ("table_float", lambda: good(block_table=good()["block_table"].float()), TypeError, "block_table"),
    ("table_1d", lambda: good(block_table=good()["block_table"][0]), ValueError, "block_table"),
    ("table_rows", lambda: good(block_table=good()["block_table"][:1]), ValueError, "block_table"),
    ("table_no_columns", lambda: good(block_table=torch.zeros(2, 0, **I32)), ValueError, "block_table"),
    ("block_id_past_pool", lambda: good(block_table=_bad_id(9)), ValueError, "block_table[1, 2]"),
    ("block_id_negative", lambda: good(block_table=_bad_id(-1)), ValueError, "block_table[1, 2]"),
    ("block_id_wraps_int32", lambda: good(block_table=_bad_id(2**32 + 1, torch.int64)), ValueError, "block_table"),
    ("table_too_short", lambda: good(block_table=good()["block_table"][:, :2]), ValueError, "block_table is too short"),
    ("seq_lens_below_S", lambda: good(seq_lens=torch.tensor([5, 11], **I32)), ValueError, "seq_lens"),
    ("seq_lens_float", lambda: good(seq_lens=torch.tensor([6.0, 11.0])), TypeError, "seq_lens"),
    ("seq_lens_length", lambda: good(seq_lens=torch.tensor([6, 11, 6], **I32)), ValueError, "seq_lens"),
    (
        "local_limit_past_S",
        lambda: good(local_limit=torch.tensor([1, 2, 2, 2, 7, 3], **I32)),
        ValueError,
        "local_limit",
    ),
    ("local_limit_length", lambda: good(local_limit=torch.tensor([1, 2], **I32)), ValueError, "local_limit"),
    (
        "block_id_below_minus_1",
        lambda: good(block_id=torch.tensor([-2, -1, 1, 1, 2, 2], **I32)),
        ValueError,
        "block_id",
    ),
]


def _bad_id(x, dtype=torch.int32):
    """Row 1 (11 keys in blocks of 4) reads columns 0..2: put ``x`` at column 2, junk stays at column 3 (unread)."""
    t = good()["block_table"].to(dtype)
    t[1, 2] = x
    return t


SEG = dict(k_seg=torch.zeros(2, 2, 4, 8), v_seg=torch.zeros(2, 2, 4, 8))
BAD_KW = [  # keyword arguments
    ("k_seg_alone", dict(k_seg=SEG["k_seg"]), ValueError, "k_seg and v_seg"),
    ("k_seg_longer_than_S", dict(k_seg=torch.zeros(2, 2, 7, 8), v_seg=torch.zeros(2, 2, 7, 8)), ValueError, "k_seg"),
    ("k_seg_heads", dict(k_seg=torch.zeros(2, 4, 4, 8), v_seg=torch.zeros(2, 4, 4, 8)), ValueError, "k_seg"),
    ("v_seg_shape", dict(k_seg=SEG["k_seg"], v_seg=torch.zeros(2, 2, 3, 8)), ValueError, "v_seg"),
    ("v_seg_dtype", dict(k_seg=SEG["k_seg"], v_seg=SEG["v_seg"].half()), TypeError, "v_seg"),
    ("k_seg_grad", dict(k_seg=SEG["k_seg"].clone().requires_grad_(), v_seg=SEG["v_seg"]), ValueError, "k_seg"),
    ("scale_nan", dict(scale=float("nan")), ValueError, "scale"),
    ("scale_zero", dict(scale=0.0), ValueError, "scale"),
    ("scale_bool", dict(scale=True), TypeError, "scale"),
    ("softcap_negative", dict(softcap=-1.0), ValueError, "softcap"),
    ("backend_unknown", dict(backend="cudnn"), ValueError, "backend"),
]


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8).clone() if t.numel() and t.device.type != "meta" else None


@pytest.mark.parametrize("name,make,exc,arg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_refused_before_any_work(name, make, exc, arg, impl_calls):
    args = make()
    before = {k: _bits(v) for k, v in args.items() if torch.is_tensor(v)}
    with torch.no_grad(), pytest.raises(exc) as info:
        tidar_attention_paged(**args)
    assert arg in str(info.value), f"the message does not name {arg!r}: {info.value}"
    assert impl_calls == [], "a backend ran before the error"
    for k, b in before.items():
        assert b is None or torch.equal(_bits(args[k]), b), f"{k} changed by a failed call"


@pytest.mark.parametrize("name,kw,exc,arg", BAD_KW, ids=[c[0] for c in BAD_KW])
def test_bad_keyword_refused_before_any_work(name, kw, exc, arg, impl_calls):
    with contextlib.nullcontext() if name.endswith("grad") else torch.no_grad(), pytest.raises(exc) as info:
        tidar_attention_paged(**good(), **kw)
    assert arg in str(info.value) and impl_calls == []


def test_good_call_of_the_table_runs_and_junk_table_entries_are_not_read(impl_calls):
    args = good()
    assert int(args["block_table"][1, 3]) >= args["k_cache"].shape[0], "column 3 is junk, unread by 11 keys of 4"
    with torch.no_grad():
        out = tidar_attention_paged(**args)
    assert impl_calls == [(OP, "reference")] and out.shape == (2, 4, 6, 8)


def test_batch_zero_is_an_empty_result():
    lay = layouts.decode_step(1)
    kc = torch.zeros(3, 4, 1, 8)
    out = tidar_attention_paged(
        torch.zeros(0, 2, 2, 8), kc, kc, torch.zeros(0, 1, **I32), torch.zeros(0, **I32), lay.local_limit,
        lay.block_id,
    )  # fmt: skip
    assert out.shape == (0, 2, 2, 8)
