"""Philox4x32-10 randomness of rejection_sample / draft_sample (seed/offset): the reference generator against
the Random123 known-answer vectors and an independent pure-Python (int) twin, the [B, 2K] counter layout,
the uniform grid and distribution (with negative controls), and the ops' seed/offset path against the
same uniforms passed explicitly. The Triton kernel's in-kernel Philox is checked in
tests/kernels/test_triton_rejection_sample.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tidar_kernels import draft_sample, philox_uniforms, rejection_sample
from tidar_kernels.reference.rejection_sample import philox4x32

M32 = 0xFFFFFFFF


def philox_twin(counter, key, rounds=10, swap_multipliers=False):
    """Philox4x32 in plain Python ints, written from the Random123 description (not from the library)."""
    mul_a, mul_b = 0xD2511F53, 0xCD9E8D57
    if swap_multipliers:  # a plausible implementation slip, for the negative control
        mul_a, mul_b = mul_b, mul_a
    c = list(counter)
    k = list(key)
    for _ in range(rounds):
        prod_a, prod_b = mul_a * c[0], mul_b * c[2]
        c = [(prod_b >> 32) ^ c[1] ^ k[0], prod_b & M32, (prod_a >> 32) ^ c[3] ^ k[1], prod_a & M32]
        k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
    return c


def uniform_twin(seed, offset, b, j, K):
    """The spec: n = offset + b * 2K + j (mod 2^64), key = seed's 64 bits, u = (c0 >> 8) * 2^-24."""
    s = seed % 2**64
    n = (offset + b * 2 * K + j) % 2**64
    c0 = philox_twin((n & M32, n >> 32, 0, 0), (s & M32, s >> 32))[0]
    return (c0 >> 8) / 2**24


KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_known_answer_vectors(counter, key, want):
    got = [int(w) for w in philox4x32(counter, key)]
    assert got == list(want)
    assert philox_twin(counter, key) == list(want)  # the twin is right too
    # negative controls: the same vectors reject a swapped multiplier and a wrong round count
    assert philox_twin(counter, key, swap_multipliers=True) != list(want)
    assert [int(w) for w in philox4x32(counter, key, rounds=7)] != list(want)


def test_philox4x32_vs_twin_random_words():
    """Vectorised: 2000 random counters and keys (all four counter words in use), word for word."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(2000, 6), dtype=np.uint64).astype(np.int64)
    out = philox4x32(
        tuple(torch.from_numpy(words[:, i]) for i in range(4)),
        (torch.from_numpy(words[:, 4]), torch.from_numpy(words[:, 5])),
    )
    got = torch.stack(out, 1).tolist()
    for r in range(0, 2000, 7):  # the pure-Python twin is slow: every 7th row
        w = [int(x) for x in words[r]]
        assert got[r] == philox_twin(w[:4], w[4:]), r


SEEDS_OFFSETS = [
    (0, 0),
    (1234, 0),
    (-1, 5),  # the int64 bits of -1: key (0xffffffff, 0xffffffff)
    (2**63 + 17, 2**32 - 3),  # seed given as its uint64 value; counters cross the 32-bit boundary of c0 -> c1
    (-(2**63), 2**63 - 4),  # counters cross 2^63 (negative as int64)
    (987654321987, 2**64 - 5),  # counters wrap around 2^64
]


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_philox_uniforms_vs_twin(seed, offset):
    B, K = 3, 4
    got = philox_uniforms(seed, offset, B, K)
    assert got.dtype == torch.float32 and got.shape == (B, 2 * K)
    want = torch.tensor(
        [[uniform_twin(seed, offset, b, j, K) for j in range(2 * K)] for b in range(B)], dtype=torch.float64
    )
    assert torch.equal(got.double(), want)
    # the same from one-element int64 tensors (what a CUDA graph captures)
    s_t = torch.tensor([seed - 2**64 if seed >= 2**63 else seed])
    o_t = torch.tensor([offset - 2**64 if offset >= 2**63 else offset])
    assert torch.equal(philox_uniforms(s_t, o_t, B, K), got)


def test_seed_bits_and_counter_layout():
    assert torch.equal(philox_uniforms(-1, 0, 2, 3), philox_uniforms(2**64 - 1, 0, 2, 3))
    # row b of a step is the counters offset + b * 2K ...: a step of B rows = B steps of one row
    B, K, off = 5, 3, 1000
    whole = philox_uniforms(42, off, B, K)
    for b in range(B):
        assert torch.equal(whole[b], philox_uniforms(42, off + b * 2 * K, 1, K)[0])
    # consecutive steps that advance offset by B * 2K never reuse a counter: they continue the stream
    two = philox_uniforms(42, off, 2 * B, K)
    assert torch.equal(two[B:], philox_uniforms(42, off + B * 2 * K, B, K))
    assert not torch.equal(philox_uniforms(42, off, B, K), philox_uniforms(43, off, B, K))  # the seed matters


def test_uniform_grid_and_distribution():
    u = philox_uniforms(7, 0, 2500, 10).view(-1).double()  # 50k values
    assert ((u >= 0) & (u < 1)).all()
    assert torch.equal(u * 2**24, (u * 2**24).floor()), "u is a multiple of 2^-24 (24 random bits, exact)"
    counts = np.histogram(u.numpy(), bins=20, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.chisquare(np.histogram((u**1.1).numpy(), bins=20, range=(0, 1))[0]).pvalue < 1e-6  # control
    # neighbouring counters are not correlated
    assert abs(np.corrcoef(u[:-1].numpy(), u[1:].numpy())[0, 1]) < 0.02


# ---------------------------------------------------------------------------------------------
# The ops: seed/offset is the same step as its uniforms passed explicitly
# ---------------------------------------------------------------------------------------------


def _step(B, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    ar, blk = torch.randn(B, K, V, generator=g) * 2, torch.randn(B, K, K, V, generator=g) * 2
    q = torch.randn(B, K - 1, V, generator=g).softmax(-1)
    d = torch.cat(
        [torch.randint(0, V, (B, 1), generator=g), torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K - 1)],
        1,
    )
    return ar, blk, d, q


def _same(x, y):
    return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(x, y))


@pytest.mark.parametrize("top_k,top_p", [(None, None), (4, 0.9)])
def test_seed_offset_equals_uniforms(top_k, top_p):
    B, K, V = 64, 4, 12
    ar, blk, d, q = _step(B, K, V)
    kw = dict(temperature=0.9, top_k=top_k, top_p=top_p, backend="reference")
    for seed, offset in [(5, 0), (-77, 123), (5, torch.tensor([2**62]))]:
        u = philox_uniforms(seed, offset, B, K)
        a = rejection_sample(ar, blk, d, q, seed=seed, offset=offset, **kw)
        b = rejection_sample(ar, blk, d, q, uniforms=u, **kw)
        assert _same(a, b)
        c = draft_sample(ar[:, 0], blk[:, 0], seed=torch.tensor([seed]), offset=offset, **kw)
        assert _same(c, draft_sample(ar[:, 0], blk[:, 0], uniforms=u, **kw))
    # offset defaults to 0; a different offset or seed gives a different step (the randomness is consumed)
    base = rejection_sample(ar, blk, d, q, seed=5, **kw)
    assert _same(base, rejection_sample(ar, blk, d, q, seed=5, offset=0, **kw))
    assert not torch.equal(base.next_drafts, rejection_sample(ar, blk, d, q, seed=5, offset=2 * K, **kw).next_drafts)
    assert not torch.equal(base.next_drafts, rejection_sample(ar, blk, d, q, seed=6, **kw).next_drafts)


def test_greedy_ignores_seed():
    ar, blk, d, _ = _step(8, 3, 9)
    a = rejection_sample(ar, blk, d, backend="reference")
    b = rejection_sample(ar, blk, d, seed=3, offset=9, backend="reference")
    assert _same(a[:3], b[:3])
