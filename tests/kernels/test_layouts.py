"""Layouts (docs/design.md §2-§3): the dense twin equals the rule evaluated element by element, the
per-layout tables hold, the limiting block sizes reduce to causal / bidirectional, layouts are cached,
bad arguments raise."""

from __future__ import annotations

import random

import pytest
import torch

from tidar_kernels import dense_mask, layouts

# ---------------------------------------------------------------------------------------------
# Independent twins, written from docs/design.md only (plain Python, no tensors ops of the library)
# ---------------------------------------------------------------------------------------------


def rule(local_limit: list[int], block_id: list[int], seg_start: int, j: int, i: int) -> bool:
    """docs/design.md §2: does query i (of the segment) see key j?"""
    S = len(local_limit)
    if j < seg_start + local_limit[i]:
        return True
    return seg_start <= j < seg_start + S and block_id[i] >= 0 and block_id[j - seg_start] == block_id[i]


def loop_mask(layout, seg_starts: list[int], kv_len: int) -> torch.Tensor:
    ll, bid = layout.local_limit.tolist(), layout.block_id.tolist()
    S = len(ll)
    out = torch.zeros(len(seg_starts), S, kv_len, dtype=torch.bool)
    for b, s0 in enumerate(seg_starts):
        for i in range(S):
            for j in range(kv_len):
                out[b, i, j] = rule(ll, bid, s0, j, i)
    return out


def training_table(L: int, K: int):
    """docs/design.md §3.1 table: (local_limit, block_id, position_ids)."""
    ll = [i + 1 for i in range(L)] + [(i // K) * K for i in range(L)]
    bid = [-1] * L + [i // K for i in range(L)]
    pos = list(range(L)) + list(range(L))
    return ll, bid, pos


def prefill_table(n: int, K: int):
    return [i + 1 for i in range(n)] + [n] * K, [-1] * n + [0] * K, list(range(n + K))


def decode_table(K: int):
    ll, bid, pos = [], [], []
    for t in range(K):  # drafts d_t at m+t, causal
        ll.append(t + 1)
        bid.append(-1)
        pos.append(t)
    for j in range(1, K + 1):  # proposal block j, slot s at m+j+s
        for s in range(K):
            ll.append(j)
            bid.append(j)
            pos.append(j + s)
    return ll, bid, pos


def random_layouts(rng: random.Random, n: int):
    """n random (name, layout) pairs over the three public layouts, small enough for Python loops."""
    out = []
    for _ in range(n):
        kind = rng.choice(["training", "prefill", "decode_step"])
        if kind == "training":
            L, K = rng.randint(1, 12), rng.randint(1, 6)
            out.append((f"training({L},{K})", layouts.training(L, K)))
        elif kind == "prefill":
            n_, K = rng.randint(1, 12), rng.randint(1, 6)
            out.append((f"prefill({n_},{K})", layouts.prefill(n_, K)))
        else:
            K = rng.randint(1, 5)
            out.append((f"decode_step({K})", layouts.decode_step(K)))
    return out


# ---------------------------------------------------------------------------------------------
# Dense twin == the rule, element by element
# ---------------------------------------------------------------------------------------------


def test_dense_mask_equals_rule_on_random_layouts_and_ragged_seg_start():
    rng = random.Random(1234)
    cases = random_layouts(rng, 40)
    for name, lay in cases:
        S = lay.seg_len
        B = rng.randint(1, 3)
        seg_starts = [rng.randint(0, 9) for _ in range(B)]
        kv_len = max(seg_starts) + S + rng.randint(0, 5)  # scratch past the longest row's segment
        got = dense_mask(lay.local_limit, lay.block_id, torch.tensor(seg_starts, dtype=torch.int32), kv_len)
        want = loop_mask(lay, seg_starts, kv_len)
        assert got.dtype == torch.bool and got.shape == (B, S, kv_len), name
        assert torch.equal(got, want), f"{name} seg_starts={seg_starts} kv_len={kv_len}"


def test_dense_mask_accepts_int_seg_start_and_never_sees_scratch():
    lay = layouts.decode_step(3)
    S, seg = lay.seg_len, 5
    kv_len = seg + S + 7
    got = dense_mask(lay.local_limit, lay.block_id, seg, kv_len)
    assert got.shape == (1, S, kv_len)
    assert torch.equal(got, loop_mask(lay, [seg], kv_len))
    assert got[..., :seg].all(), "every query sees the whole cached prefix"
    assert not got[..., seg + S :].any(), "keys past seg_start + S are scratch and never seen"


def test_dense_mask_on_random_arbitrary_layouts():
    """Not only the three layouts: any (local_limit, block_id) in range follows the rule."""
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        S = int(torch.randint(1, 20, (1,), generator=g))
        ll = torch.randint(0, S + 1, (S,), generator=g, dtype=torch.int32)
        bid = torch.randint(-1, 4, (S,), generator=g, dtype=torch.int32)
        seg = torch.randint(0, 6, (2,), generator=g, dtype=torch.int32)
        kv_len = int(seg.max()) + S + 3
        lay = layouts.Layout(ll, bid, torch.arange(S))
        assert torch.equal(dense_mask(ll, bid, seg, kv_len), loop_mask(lay, seg.tolist(), kv_len)), trial


# ---------------------------------------------------------------------------------------------
# The tables of docs/design.md §3.1 / §3.3
# ---------------------------------------------------------------------------------------------


def _assert_table(lay, ll, bid, pos):
    assert lay.local_limit.dtype == torch.int32 and lay.block_id.dtype == torch.int32
    assert lay.position_ids.dtype == torch.int64
    assert lay.local_limit.tolist() == ll
    assert lay.block_id.tolist() == bid
    assert lay.position_ids.tolist() == pos
    assert lay.seg_len == len(ll)


@pytest.mark.parametrize("L,K", [(1, 1), (4, 2), (5, 2), (7, 3), (8, 8), (6, 10), (16, 4), (13, 1)])
def test_training_table(L, K):
    _assert_table(layouts.training(L, K), *training_table(L, K))


@pytest.mark.parametrize("n,K", [(1, 1), (3, 2), (5, 4), (16, 16), (9, 1)])
def test_prefill_table(n, K):
    _assert_table(layouts.prefill(n, K), *prefill_table(n, K))


@pytest.mark.parametrize("K", [1, 2, 3, 4, 16])
def test_decode_step_table(K):
    lay = layouts.decode_step(K)
    assert lay.seg_len == K + K * K  # 272 at K = 16
    _assert_table(lay, *decode_table(K))


def _ll_bid(lay):
    return lay.local_limit, lay.block_id


def test_training_mask_semantics():
    """docs/design.md §3.1 in words: clean tokens causal and blind to masks; block b sees x[< bK] and itself;
    mask blocks never see each other."""
    for L, K in [(8, 2), (7, 3), (6, 4), (5, 5)]:
        m = dense_mask(*_ll_bid(layouts.training(L, K)), 0, 2 * L)[0]
        for i in range(L):
            for j in range(2 * L):
                assert bool(m[i, j]) == (j <= i), ("clean", L, K, i, j)
        for i in range(L):
            b = i // K
            for j in range(2 * L):
                if j < L:
                    want = j < b * K
                else:
                    want = (j - L) // K == b
                assert bool(m[L + i, j]) == want, ("mask", L, K, i, j)


def test_decode_step_mask_semantics():
    """Block j (1..K) sees the prefix, drafts d_0..d_{j-1} and itself; drafts are causal."""
    K, seg = 4, 3
    S = K + K * K
    m = dense_mask(*_ll_bid(layouts.decode_step(K)), seg, seg + S)[0]
    for t in range(K):
        seen = m[t].nonzero().flatten().tolist()
        assert seen == list(range(seg + t + 1))
    for j in range(1, K + 1):
        for s in range(K):
            row = K + (j - 1) * K + s
            seen = m[row].nonzero().flatten().tolist()
            block = list(range(seg + K + (j - 1) * K, seg + K + j * K))
            assert seen == list(range(seg)) + list(range(seg, seg + j)) + block


def test_prefill_mask_semantics():
    n, K = 5, 3
    m = dense_mask(*_ll_bid(layouts.prefill(n, K)), 0, n + K)[0]
    for i in range(n):
        assert m[i].nonzero().flatten().tolist() == list(range(i + 1))
    for s in range(K):
        assert m[n + s].all(), "the mask block sees the whole prompt and itself"


# ---------------------------------------------------------------------------------------------
# Limiting block sizes, partial block
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 2, 5, 17])
def test_block_size_one_is_causal_on_each_half(L):
    m = dense_mask(*_ll_bid(layouts.training(L, 1)), 0, 2 * L)[0]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    strictly_below = torch.ones(L, L, dtype=torch.bool).tril(-1)
    assert torch.equal(m[:L, :L], causal), "clean half is causal"
    assert not m[:L, L:].any(), "clean tokens never see masks"
    assert torch.equal(m[L:, :L], strictly_below), "mask i sees clean tokens < i"
    assert torch.equal(m[L:, L:], torch.eye(L, dtype=torch.bool)), "mask i sees only itself among masks"


@pytest.mark.parametrize("L", [1, 3, 8])
def test_block_size_equal_length_is_bidirectional_mask_half(L):
    m = dense_mask(*_ll_bid(layouts.training(L, L)), 0, 2 * L)[0]
    assert m[L:, L:].all(), "one block: the mask half is bidirectional over itself"
    assert not m[L:, :L].any(), "block 0 sees no clean token"
    assert torch.equal(m[:L, :L], torch.ones(L, L, dtype=torch.bool).tril())
    # a block larger than L is the same single block
    assert torch.equal(layouts.training(L, L + 3).block_id, layouts.training(L, L).block_id)


def test_partial_last_block():
    L, K = 7, 3  # blocks {0,1,2} {3,4,5} {6}
    lay = layouts.training(L, K)
    assert lay.block_id[L:].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert lay.local_limit[L:].tolist() == [0, 0, 0, 3, 3, 3, 6]
    m = dense_mask(*_ll_bid(lay), 0, 2 * L)[0]
    last = m[2 * L - 1]
    assert last[:6].all() and not last[6:L].any(), "the partial block sees x[<6]"
    assert last[2 * L - 1] and not last[L : 2 * L - 1].any(), "and only itself among masks"


def test_causal_layout_matches_causal_mask():
    S, seg = 6, 4
    m = dense_mask(*_ll_bid(layouts.causal(S)), seg, seg + S)[0]
    want = torch.cat([torch.ones(S, seg, dtype=torch.bool), torch.ones(S, S, dtype=torch.bool).tril()], 1)
    assert torch.equal(m, want)


# ---------------------------------------------------------------------------------------------
# Caching and bad arguments
# ---------------------------------------------------------------------------------------------


def test_layouts_are_cached():
    assert layouts.training(12, 4) is layouts.training(12, 4)
    assert layouts.prefill(9, 4) is layouts.prefill(9, 4)
    assert layouts.decode_step(5) is layouts.decode_step(5)
    assert layouts.causal(7) is layouts.causal(7)
    assert layouts.training(12, 4) is not layouts.training(12, 3)
    lay = layouts.decode_step(3)
    assert lay.to("cpu") is lay and lay.to(torch.device("cpu")) is lay


# 4.0 and True are also bad, but see the cache bug test below; only values equal to no int here.
BAD = [0, -1, -16, 2.5, "4", None, float("nan")]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_layout_args_raise(bad):
    with pytest.raises(ValueError, match="seq_len"):
        layouts.training(bad, 2)
    with pytest.raises(ValueError, match="block_size"):
        layouts.training(4, bad)
    with pytest.raises(ValueError, match="prompt_len"):
        layouts.prefill(bad, 2)
    with pytest.raises(ValueError, match="draft_len"):
        layouts.prefill(3, bad)
    with pytest.raises(ValueError, match="draft_len"):
        layouts.decode_step(bad)
    with pytest.raises(ValueError, match="seq_len"):
        layouts.causal(bad)


def test_bool_and_float_single_arg_raise():
    layouts.decode_step(1), layouts.decode_step(4), layouts.causal(1)
    for bad in (True, 4.0, 1.0):
        with pytest.raises(ValueError, match="draft_len"):
            layouts.decode_step(bad)
        with pytest.raises(ValueError, match="seq_len"):
            layouts.causal(bad)


def test_bad_layout_args_raise_even_when_an_equal_int_call_is_cached():
    """BUG (tidar_kernels/layouts.py): validation runs inside ``functools.lru_cache``, whose untyped key
    treats 4.0 == 4 and True == 1 as the same arguments. Once ``training(4, 2)`` is cached,
    ``training(4.0, 2)`` returns the cached layout instead of raising; the result depends on cache state."""
    layouts.training(4, 2), layouts.prefill(3, 2), layouts.training(1, 1)
    with pytest.raises(ValueError, match="seq_len"):
        layouts.training(4.0, 2)
    with pytest.raises(ValueError, match="prompt_len"):
        layouts.prefill(3.0, 2)
    with pytest.raises(ValueError, match="seq_len"):
        layouts.training(True, 1)


def test_unhashable_layout_arg_raises_value_error():
    """BUG (same cause): an unhashable argument fails inside lru_cache with
    ``TypeError: unhashable type`` that names no argument, before validation runs."""
    with pytest.raises(ValueError, match="seq_len"):
        layouts.training([4], 2)
