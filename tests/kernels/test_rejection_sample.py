"""rejection_sample / draft_sample (docs/design.md §4.1): greedy semantics exactly, a hand-computed sampling
step, reproducibility, the sampling distribution (acceptance rates and chi-square against p, with a
negative control that proves the test has power), top-k/top-p support, the beta mix, bad calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tidar_kernels import draft_sample, draw_uniforms, rejection_sample

OP = "rejection_sample"  # the `backend` fixture (conftest) runs each test on every live implementation of it


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


def greedy_twin(ar, blk, drafts, beta=1.0):
    """docs/design.md §4.1, greedy, one row at a time in plain Python."""
    B, K, V = ar.shape
    acc, emitted, nxt = [], [], []
    for b in range(B):
        target = [(beta * ar[b, t].double() + (1 - beta) * blk[b, t, 0].double()).tolist() for t in range(K)]
        argmax = [max(range(V), key=lambda x: row[x]) for row in target]  # p_i at index i-1
        d = drafts[b].tolist()
        a = 1
        while a < K and d[a] == argmax[a - 1]:
            a += 1
        acc.append(a)
        emitted.append(d[:a] + [-1] * (K - a))
        nxt.append([argmax[a - 1]] + [int(blk[b, a - 1, s].argmax()) for s in range(1, K)])
    return torch.tensor(acc), torch.tensor(emitted), torch.tensor(nxt)


def planted_drafts(ar, n_accept: torch.Tensor, g):
    """Drafts whose first ``n_accept[b]`` proposals (after d_0) equal the AR argmax, then one that does not,
    then the argmax again (so acceptance must *stop* at the first mismatch)."""
    B, K, V = ar.shape
    am = ar.argmax(-1)  # [B, K]: argmax p_1..p_K
    drafts = torch.randint(0, V, (B, K), generator=g)
    for b in range(B):
        for i in range(1, K):
            if i == n_accept[b] + 1:
                drafts[b, i] = (am[b, i - 1] + 1 + torch.randint(0, V - 1, (1,), generator=g)) % V  # != argmax
            else:
                drafts[b, i] = am[b, i - 1]
    return drafts


@pytest.mark.parametrize("K,V", [(1, 7), (2, 5), (5, 11), (8, 33)])
@pytest.mark.triton_interpreter
def test_greedy_semantics(backend, K, V):
    g = gen(K * 100 + V)
    B = 96
    ar = torch.randn(B, K, V, generator=g)
    blk = torch.randn(B, K, K, V, generator=g)
    n_accept = torch.arange(B) % K  # every acceptance length a = 1..K appears
    drafts = planted_drafts(ar, n_accept, g)
    res = rejection_sample(ar, blk, drafts, backend=backend)
    acc, emitted, nxt = greedy_twin(ar, blk, drafts)
    assert torch.equal(res.accepted, n_accept + 1), "acceptance stops at the first mismatch"
    assert torch.equal(res.accepted, acc)
    assert torch.equal(res.emitted, emitted), "emitted = d_0..d_{a-1} padded with -1"
    assert torch.equal(res.next_drafts, nxt), "d'_0 = argmax p_a (correction or bonus), d'_1.. from block a"
    assert res.next_draft_probs is None
    assert res.accepted.dtype == res.emitted.dtype == res.next_drafts.dtype == torch.int64
    assert set(res.accepted.tolist()) == set(range(1, K + 1))


@pytest.mark.triton_interpreter
def test_greedy_by_hand(backend):
    """K=3, V=4: row 0 rejects d_1, row 1 accepts all (bonus), row 2 accepts d_1 only."""
    ar = torch.full((3, 3, 4), -1.0)
    ar[:, 0, 2] = 1.0  # argmax p_1 = 2
    ar[:, 1, 0] = 1.0  # argmax p_2 = 0
    ar[:, 2, 3] = 1.0  # argmax p_3 = 3 (bonus)
    blk = torch.zeros(3, 3, 3, 4)
    for j in range(3):  # block j+1: slot 1 -> token j, slot 2 -> token (j+1) % 4
        blk[:, j, 1, j] = 1.0
        blk[:, j, 2, (j + 1) % 4] = 1.0
    drafts = torch.tensor([[3, 1, 0], [3, 2, 0], [3, 2, 1]])
    res = rejection_sample(ar, blk, drafts, backend=backend)
    assert res.accepted.tolist() == [1, 3, 2]
    assert res.emitted.tolist() == [[3, -1, -1], [3, 2, 0], [3, 2, -1]]
    assert res.next_drafts.tolist() == [[2, 0, 1], [3, 2, 3], [0, 1, 2]]


@pytest.mark.triton_interpreter
def test_greedy_ignores_draft_probs_and_uniforms(backend):
    g = gen(3)
    ar, blk = torch.randn(8, 4, 9, generator=g), torch.randn(8, 4, 4, 9, generator=g)
    drafts = planted_drafts(ar, torch.arange(8) % 4, g)
    base = rejection_sample(ar, blk, drafts, backend=backend)
    q = torch.full((8, 3, 9), 1 / 9)
    other = rejection_sample(ar, blk, drafts, q, uniforms=torch.rand(8, 8, generator=g), backend=backend)
    for x, y in zip(base[:3], other[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_greedy_low_precision_logits(backend, dtype):
    g = gen(5)
    ar, blk = torch.randn(32, 4, 17, generator=g).to(dtype), torch.randn(32, 4, 4, 17, generator=g).to(dtype)
    drafts = planted_drafts(ar.float(), torch.arange(32) % 4, g)
    res = rejection_sample(ar, blk, drafts, backend=backend)
    acc, emitted, nxt = greedy_twin(ar.float(), blk.float(), drafts)
    assert torch.equal(res.accepted, acc) and torch.equal(res.emitted, emitted) and torch.equal(res.next_drafts, nxt)


@pytest.mark.triton_interpreter
def test_draft_sample_greedy(backend):
    g = gen(6)
    ar, blk = torch.randn(5, 13, generator=g), torch.randn(5, 4, 13, generator=g)
    res = draft_sample(ar, blk, backend=backend)
    assert res.next_drafts[:, 0].tolist() == ar.argmax(-1).tolist()
    assert torch.equal(res.next_drafts[:, 1:], blk[:, 1:].argmax(-1))
    assert res.next_draft_probs is None
    one = draft_sample(ar, blk[:, :1], backend=backend)  # K = 1: only d_0
    assert one.next_drafts.shape == (5, 1) and one.next_drafts[:, 0].tolist() == ar.argmax(-1).tolist()


@pytest.mark.triton_interpreter
def test_beta_mix_greedy(backend):
    """Target = beta * AR + (1 - beta) * slot 0 of the matching block, for the test and the correction/bonus."""
    V, K = 5, 2
    ar = torch.zeros(1, K, V)
    blk = torch.zeros(1, K, K, V)
    ar[0, 0] = torch.tensor([0.0, 4.0, 0.0, 3.0, 0.0])  # AR argmax 1
    blk[0, 0, 0] = torch.tensor([0.0, -4.0, 4.0, 3.0, 0.0])  # diffusion argmax 2; 0.5-mix [0,0,2,3,0] -> 3
    ar[0, 1] = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0])  # p_2 (bonus): AR argmax 0
    blk[0, 1, 0] = torch.tensor([-5.0, 0.0, 0.0, 0.0, 1.0])  # diffusion argmax 4; 0.5-mix argmax 4
    blk[0, 0, 1, 1] = 1.0  # block 1 slot 1 -> 1
    blk[0, 1, 1, 3] = 1.0  # block 2 slot 1 -> 3
    drafts = torch.tensor([[0, 3]])
    mixed = rejection_sample(ar, blk, drafts, beta=0.5, backend=backend)
    assert mixed.accepted.tolist() == [2] and mixed.next_drafts.tolist() == [[4, 3]]
    exact = rejection_sample(ar, blk, drafts, beta=1.0, backend=backend)
    assert exact.accepted.tolist() == [1] and exact.next_drafts.tolist() == [[1, 1]]
    diff = rejection_sample(ar, blk, drafts, beta=0.0, backend=backend)
    assert diff.accepted.tolist() == [1] and diff.next_drafts.tolist() == [[2, 1]]
    # twin agrees for random logits at beta = 0.3
    g = gen(8)
    ar, blk = torch.randn(40, 3, 6, generator=g), torch.randn(40, 3, 3, 6, generator=g)
    drafts = torch.randint(0, 6, (40, 3), generator=g)
    res = rejection_sample(ar, blk, drafts, beta=0.3, backend=backend)
    acc, emitted, nxt = greedy_twin(ar, blk, drafts, beta=0.3)
    assert torch.equal(res.accepted, acc) and torch.equal(res.emitted, emitted) and torch.equal(res.next_drafts, nxt)
    # draft_sample mixes d_0 the same way
    d = draft_sample(
        torch.tensor([[0.0, 4.0, 0.0, 3.0, 0.0]]),
        torch.tensor([[[0.0, -4.0, 4.0, 3.0, 0.0]]]),
        beta=0.5,
        backend=backend,
    )
    assert d.next_drafts.tolist() == [[3]]


# ---------------------------------------------------------------------------------------------
# Sampling: a hand-computed step, reproducibility
# ---------------------------------------------------------------------------------------------


def logp(*p):
    return torch.tensor(p).log()


@pytest.mark.triton_interpreter
def test_sampling_by_hand(backend):
    """K=3, V=4, temperature 1, logits = log p so the probabilities are known; uniforms chosen by hand.

    Uniform layout: u[:, 0] correction/bonus, u[:, i] test of d_i, u[:, K + s] next-draft slot s.
    """
    B, K, V = 3, 3, 4
    ar = torch.zeros(B, K, V)
    blk = torch.zeros(B, K, K, V)
    q = torch.zeros(B, K - 1, V)
    # row 0: p_1 = [.1 .2 .3 .4], q_1 = [.4 .3 .2 .1], d_1 = 0: u*q = .5*.4 = .2 >= p = .1 -> reject, a = 1.
    #        residual max(0, p - q) = [0 0 .1 .3]; u0 = .3 -> .3 * .4 = .12 -> cdf [0 0 .1 .4] -> token 3.
    #        block 1: slot 1 [.25]*4, u = .6 -> token 2; slot 2 [.7 .1 .1 .1], u = .05 -> token 0.
    ar[0, 0] = logp(0.1, 0.2, 0.3, 0.4)
    q[0, 0] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q[0, 1] = 0.25
    blk[0, 0, 1] = logp(0.25, 0.25, 0.25, 0.25)
    blk[0, 0, 2] = logp(0.7, 0.1, 0.1, 0.1)
    # row 1: d_1 = 3 (p/q = 4, accept), p_2 = [.4 .4 .1 .1], q_2 = [.2 .2 .3 .3], d_2 = 1 (p/q = 2, accept): a = 3.
    #        bonus from p_3 = [.1 .6 .2 .1], u0 = .75 -> cdf [.1 .7 .9 1] -> token 2.
    #        block 3: slot 1 [.1 .1 .1 .7], u = .25 -> cdf [.1 .2 .3 1] -> 2; slot 2 [.4 .3 .2 .1], u = .95 -> 3.
    ar[1, 0] = logp(0.1, 0.2, 0.3, 0.4)
    ar[1, 1] = logp(0.4, 0.4, 0.1, 0.1)
    ar[1, 2] = logp(0.1, 0.6, 0.2, 0.1)
    q[1, 0] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q[1, 1] = torch.tensor([0.2, 0.2, 0.3, 0.3])
    blk[1, 2, 1] = logp(0.1, 0.1, 0.1, 0.7)
    blk[1, 2, 2] = logp(0.4, 0.3, 0.2, 0.1)
    # row 2: d_1 = 1 (p/q = 2/3, u = .6: .6*.3 = .18 < .2 -> accept); p_2 = [.1 .2 .3 .4], q_2 = [.5 .2 .2 .1],
    #        d_2 = 0 (u = .7: .35 >= .1 -> reject): a = 2. residual [0 0 .1 .3], u0 = .2 -> .08 -> token 2.
    #        block 2: slot 1 [.1 .2 .3 .4], u = .5 -> cdf [.1 .3 .6 1] -> 2; slot 2 [.4 .3 .2 .1], u = .1 -> 0.
    ar[2, 0] = logp(0.1, 0.2, 0.3, 0.4)
    ar[2, 1] = logp(0.1, 0.2, 0.3, 0.4)
    q[2, 0] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q[2, 1] = torch.tensor([0.5, 0.2, 0.2, 0.1])
    blk[2, 1, 1] = logp(0.1, 0.2, 0.3, 0.4)
    blk[2, 1, 2] = logp(0.4, 0.3, 0.2, 0.1)
    drafts = torch.tensor([[2, 0, 1], [1, 3, 1], [0, 1, 0]])
    u = torch.tensor(
        [
            [0.3, 0.5, 0.9, 0.0, 0.6, 0.05],
            [0.75, 0.99, 0.99, 0.0, 0.25, 0.95],
            [0.2, 0.6, 0.7, 0.0, 0.5, 0.1],
        ]
    )
    res = rejection_sample(ar, blk, drafts, q, temperature=1.0, uniforms=u, backend=backend)
    assert res.accepted.tolist() == [1, 3, 2]
    assert res.emitted.tolist() == [[2, -1, -1], [1, 3, 1], [0, 1, -1]]
    assert res.next_drafts.tolist() == [[3, 2, 0], [2, 2, 3], [2, 2, 0]]
    want_q = torch.stack([blk[0, 0, 1:], blk[1, 2, 1:], blk[2, 1, 1:]]).softmax(-1)
    assert res.next_draft_probs.dtype == torch.float32
    torch.testing.assert_close(res.next_draft_probs, want_q)
    for _ in range(3):  # same uniforms -> bit-identical, every call
        again = rejection_sample(ar, blk, drafts, q, temperature=1.0, uniforms=u.clone(), backend=backend)
        for x, y in zip(res, again):
            assert torch.equal(x, y)


@pytest.mark.triton_interpreter
def test_draft_sample_by_hand(backend):
    ar = logp(0.1, 0.2, 0.3, 0.4)[None]
    blk = torch.stack([logp(0.25, 0.25, 0.25, 0.25), logp(0.4, 0.3, 0.2, 0.1), logp(0.1, 0.1, 0.1, 0.7)])[None]
    u = torch.tensor([[0.65, 0.0, 0.0, 0.0, 0.5, 0.35]])  # d_0: .65 -> cdf [.1 .3 .6 1] -> 3; slots: 1, 3
    res = draft_sample(ar, blk, temperature=1.0, uniforms=u, backend=backend)
    assert res.next_drafts.tolist() == [[3, 1, 3]]
    torch.testing.assert_close(res.next_draft_probs, blk[:, 1:].softmax(-1))


def _random_step(B, K, V, seed, temperature=0.9):
    g = gen(seed)
    ar, blk = torch.randn(B, K, V, generator=g) * 2, torch.randn(B, K, K, V, generator=g) * 2
    q = torch.randn(B, K - 1, V, generator=g).div(temperature).softmax(-1)
    d = torch.cat(
        [torch.randint(0, V, (B, 1), generator=g), torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K - 1)],
        1,
    )
    return ar, blk, d, q


def test_generator_reproducible_and_matches_uniforms(backend):
    B, K, V = 256, 4, 10
    ar, blk, d, q = _random_step(B, K, V, 9)
    kw = dict(temperature=0.9, backend=backend)
    r1 = rejection_sample(ar, blk, d, q, generator=gen(1234), **kw)
    r2 = rejection_sample(ar, blk, d, q, generator=gen(1234), **kw)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    # the generator path draws exactly draw_uniforms(B, K) from it
    r3 = rejection_sample(ar, blk, d, q, uniforms=draw_uniforms(B, K, generator=gen(1234)), **kw)
    for x, y in zip(r1, r3):
        assert torch.equal(x, y)
    # a different seed gives a different step (the sampler really consumes randomness)
    r4 = rejection_sample(ar, blk, d, q, generator=gen(4321), **kw)
    assert not torch.equal(r1.next_drafts, r4.next_drafts)
    assert not torch.equal(r1.accepted, r4.accepted)
    # draft_sample too
    s1 = draft_sample(ar[:, 0], blk[:, 0], temperature=0.9, generator=gen(7), backend=backend)
    s2 = draft_sample(ar[:, 0], blk[:, 0], temperature=0.9, generator=gen(7), backend=backend)
    assert torch.equal(s1.next_drafts, s2.next_drafts) and torch.equal(s1.next_draft_probs, s2.next_draft_probs)


def test_k1_sampling_without_draft_probs(backend):
    """K = 1: nothing to verify, a = 1 and the token is the bonus sampled from p_1; draft_probs not needed."""
    g = gen(10)
    ar, blk = torch.randn(4000, 1, 6, generator=g), torch.randn(4000, 1, 1, 6, generator=g)
    ar[:] = ar[0]
    d = torch.zeros(4000, 1, dtype=torch.long)
    res = rejection_sample(ar, blk, d, temperature=1.0, generator=gen(11), backend=backend)
    assert (res.accepted == 1).all() and torch.equal(res.emitted, d)
    assert res.next_draft_probs.shape == (4000, 0, 6)
    counts = np.bincount(res.next_drafts[:, 0].numpy(), minlength=6)
    p = ar[0, 0].double().softmax(-1).numpy()
    assert stats.chisquare(counts, 4000 * p).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Sampling: distributions
# ---------------------------------------------------------------------------------------------

N, KD, VD, TEMP = 20000, 3, 8, 0.8


@pytest.fixture(scope="module")
def dist_step():
    """One batched step of N identical rows: p_i, q_i fixed, drafts d_i ~ q_i. Fixed seeds."""
    g = gen(2024)
    ar0 = torch.randn(KD, VD, generator=g)
    blk0 = torch.randn(KD, KD, VD, generator=g)
    q0 = (torch.randn(KD - 1, VD, generator=g) * 1.2).softmax(-1)
    ar, blk = ar0.expand(N, KD, VD), blk0.expand(N, KD, KD, VD)
    q = q0.expand(N, KD - 1, VD)  # non-contiguous on purpose
    d_rest = torch.stack([torch.multinomial(q0[i], N, replacement=True, generator=g) for i in range(KD - 1)], 1)
    drafts = torch.cat([torch.zeros(N, 1, dtype=torch.long), d_rest], 1)
    res = rejection_sample(ar, blk, drafts, q, temperature=TEMP, generator=gen(77), backend="reference")
    p = (ar0.double() / TEMP).softmax(-1)  # p_1..p_K
    return dict(res=res, p=p, q=q0.double(), blk=blk0, drafts=drafts)


def _chi2(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = np.bincount(tokens.numpy(), minlength=VD)
    expect = len(tokens) * p.numpy()
    assert expect.min() >= 5, "chi-square needs expected counts >= 5"
    return stats.chisquare(counts, expect).pvalue


def _within_se(rate: float, want: float, n: int, k: float = 4.0) -> bool:
    se = math.sqrt(want * (1 - want) / n)
    return abs(rate - want) <= k * se


def test_acceptance_rate_matches_overlap(dist_step):
    res, p, q = dist_step["res"], dist_step["p"], dist_step["q"]
    a = res.accepted
    overlap1 = torch.minimum(p[0], q[0]).sum().item()
    overlap2 = torch.minimum(p[1], q[1]).sum().item()
    assert 0.15 < overlap1 < 0.9 and 0.15 < overlap2 < 0.9, "p and q must differ for the test to mean anything"
    rate1 = (a >= 2).double().mean().item()
    assert _within_se(rate1, overlap1, N), (rate1, overlap1)
    n2 = int((a >= 2).sum())
    rate2 = (a == 3).double().sum().item() / n2
    assert _within_se(rate2, overlap2, n2), (rate2, overlap2)


def test_emitted_tokens_distributed_as_p(dist_step):
    res, p = dist_step["res"], dist_step["p"]
    a, em, nd = res.accepted, res.emitted, res.next_drafts
    # position 1: d_1 if accepted, else the correction (residual sample)
    x1 = torch.where(a >= 2, em[:, 1], nd[:, 0])
    assert _chi2(x1, p[0]) > 1e-3
    # position 2 given d_1 accepted: d_2 if accepted, else the correction
    rows = a >= 2
    x2 = torch.where(a[rows] == 3, em[rows, 2], nd[rows, 0])
    assert _chi2(x2, p[1]) > 1e-3
    # the bonus, when everything was accepted, is a sample of p_K
    assert _chi2(nd[a == 3, 0], p[2]) > 1e-3


def test_negative_controls_are_rejected(dist_step):
    """The same statistic on samples from wrong rules is rejected: the test above has power."""
    res, p, q, drafts = dist_step["res"], dist_step["p"], dist_step["q"], dist_step["drafts"]
    # wrong rule 1: always accept the draft -> samples of q_1
    assert _chi2(drafts[:, 1], p[0]) < 1e-6
    # wrong rule 2: right acceptance, but the correction sampled from p instead of norm(max(0, p - q))
    g = gen(99)
    from_p = torch.multinomial(p[0].float(), N, replacement=True, generator=g)
    wrong = torch.where(res.accepted >= 2, res.emitted[:, 1], from_p)
    assert _chi2(wrong, p[0]) < 1e-6
    # wrong rule 3: accept with probability p/q uncapped... i.e. always accept when p >= q, never otherwise
    accept_hard = p[0][drafts[:, 1]] >= q[0][drafts[:, 1]]
    wrong3 = torch.where(accept_hard, drafts[:, 1], res.next_drafts[:, 0])
    assert _chi2(wrong3, p[0]) < 1e-6


def test_next_drafts_come_from_block_a(dist_step):
    res, blk = dist_step["res"], dist_step["blk"]
    a, nd, nq = res.accepted, res.next_drafts, res.next_draft_probs
    assert nq.shape == (N, KD - 1, VD)
    for av in range(1, KD + 1):
        rows = a == av
        want = (blk[av - 1, 1:].double() / TEMP).softmax(-1)  # slots 1..K-1 of block a
        torch.testing.assert_close(nq[rows].double(), want.expand(int(rows.sum()), -1, -1), rtol=1e-5, atol=1e-6)
        if int(rows.sum()) >= 2000:
            for s in range(1, KD):
                assert _chi2(nd[rows, s], want[s - 1]) > 1e-3, (av, s)


def test_draft_sample_distribution(backend):
    g = gen(31)
    ar0, blk0 = torch.randn(VD, generator=g), torch.randn(3, VD, generator=g)
    n = 10000
    res = draft_sample(ar0.expand(n, VD), blk0.expand(n, 3, VD), temperature=1.3, generator=gen(32), backend=backend)
    assert _chi2(res.next_drafts[:, 0], (ar0.double() / 1.3).softmax(-1)) > 1e-3
    assert _chi2(res.next_drafts[:, 2], (blk0[2].double() / 1.3).softmax(-1)) > 1e-3
    assert _chi2(res.next_drafts[:, 2], (blk0[1].double() / 1.3).softmax(-1)) < 1e-6  # wrong slot is rejected


# ---------------------------------------------------------------------------------------------
# top-k / top-p support
# ---------------------------------------------------------------------------------------------


def support(logits: torch.Tensor, temperature, top_k, top_p, slack=1e-6) -> torch.Tensor:
    """Boolean support after top-k then top-p (nucleus: keep a token if the mass strictly above it is
    < top_p), computed in fp64 row by row, with a little slack on the top-p boundary."""
    x = logits.double() / temperature
    flat = x.reshape(-1, x.shape[-1])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for r in range(flat.shape[0]):
        row = flat[r]
        idx = torch.argsort(row, descending=True)
        if top_k is not None:
            idx = idx[:top_k]
        pr = row[idx].softmax(-1)
        above = 0.0
        for t, pt in zip(idx.tolist(), pr.tolist()):
            if top_p is None or above < top_p + slack:
                keep[r, t] = True
            above += pt
    return keep.view(x.shape)


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.6), (5, 0.8), (1, None), (None, 0.05)])
def test_top_k_top_p_support(backend, top_k, top_p):
    B, K, V, T = 300, 4, 16, 0.8
    g = gen(40 + (top_k or 0))
    kw = dict(temperature=T, top_k=top_k, top_p=top_p, backend=backend)
    # the prefill drafts and their q come from the library itself (as in generation)
    pre_ar, pre_blk = torch.randn(B, V, generator=g) * 2, torch.randn(B, K, V, generator=g) * 2
    pre = draft_sample(pre_ar, pre_blk, generator=gen(41), **kw)
    assert pre.next_drafts[:, 0][..., None].lt(V).all()
    ok0 = support(pre_ar, T, top_k, top_p).gather(-1, pre.next_drafts[:, :1]).all()
    ok_rest = support(pre_blk[:, 1:], T, top_k, top_p).gather(-1, pre.next_drafts[:, 1:, None]).all()
    assert ok0 and ok_rest, "draft_sample left the filtered support"
    q = pre.next_draft_probs
    sup_q = support(pre_blk[:, 1:], T, top_k, top_p, slack=-1e-6)  # tokens surely kept
    assert (q[~support(pre_blk[:, 1:], T, top_k, top_p)] == 0).all()
    assert (q[sup_q] > 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(B, K - 1))
    # the verification step: AR logits made close to the block logits so that some drafts are accepted
    near_q = pre_blk[:, 1:] + 0.3 * torch.randn(B, K - 1, V, generator=g)  # p_i close to q_i, i < K
    ar = torch.cat([near_q, torch.randn(B, 1, V, generator=g) * 2], 1)
    blk = torch.randn(B, K, K, V, generator=g) * 2
    res = rejection_sample(ar, blk, pre.next_drafts, q, generator=gen(42), **kw)
    rows = torch.arange(B)
    last = res.accepted - 1
    sup_p = support(ar, T, top_k, top_p)
    assert sup_p[rows, last, res.next_drafts[:, 0]].all(), "correction/bonus outside the support of p_a"
    sup_blk = support(blk[rows, last, 1:], T, top_k, top_p)
    assert sup_blk.gather(-1, res.next_drafts[:, 1:, None]).all(), "next drafts outside the support of block a"
    assert (res.next_draft_probs[~sup_blk] == 0).all()
    # accepted drafts lie in the support of their target too (p_i(d_i) > 0 is needed to accept)
    for i in range(1, K):
        acc_i = res.accepted > i
        assert sup_p[acc_i, i - 1, pre.next_drafts[acc_i, i]].all()
    if top_k != 1:
        assert len(set(res.accepted.tolist())) >= 2, "the step should see more than one acceptance length"


# ---------------------------------------------------------------------------------------------
# Bad calls
# ---------------------------------------------------------------------------------------------


def _good(B=2, K=3, V=6):
    g = gen(0)
    return dict(
        ar_logits=torch.randn(B, K, V, generator=g),
        block_logits=torch.randn(B, K, K, V, generator=g),
        drafts=torch.randint(0, V, (B, K), generator=g),
        draft_probs=torch.full((B, K - 1, V), 1.0 / V),
        temperature=1.0,
        uniforms=torch.rand(B, 2 * K, generator=g),
    )


def _with(**kw):
    args = _good()
    args.update(kw)
    return args


def _nan(shape, where):
    t = torch.randn(shape)
    t.view(-1)[where] = float("nan")
    return t


def _draft_probs_zero_at_draft():
    args = _good()
    dp = args["draft_probs"].clone()
    dp[1, 0, args["drafts"][1, 1]] = 0.0
    args["draft_probs"] = dp
    return args


BAD_CALLS = [
    ("nan_ar_logits", lambda: _with(ar_logits=_nan((2, 3, 6), 7)), ValueError, "ar_logits"),
    (
        "posinf_block_logits",
        lambda: _with(block_logits=torch.randn(2, 3, 3, 6).index_fill(3, torch.tensor([2]), float("inf"))),
        ValueError,
        "block_logits",
    ),
    (
        "nan_block_logits_greedy",
        lambda: _with(block_logits=_nan((2, 3, 3, 6), 50), temperature=0.0),
        ValueError,
        "block_logits",
    ),
    ("nan_draft_probs", lambda: _with(draft_probs=_nan((2, 2, 6), 3).abs()), ValueError, "draft_probs"),
    ("vocab_block_logits", lambda: _with(block_logits=torch.randn(2, 3, 3, 7)), ValueError, "block_logits"),
    ("vocab_draft_probs", lambda: _with(draft_probs=torch.full((2, 2, 5), 0.2)), ValueError, "draft_probs"),
    ("draft_out_of_range", lambda: _with(drafts=torch.tensor([[0, 1, 6], [0, 0, 0]])), ValueError, "drafts"),
    ("draft_negative", lambda: _with(drafts=torch.tensor([[0, -1, 2], [0, 0, 0]])), ValueError, "drafts"),
    ("drafts_wrong_shape", lambda: _with(drafts=torch.zeros(2, 4, dtype=torch.long)), ValueError, "drafts"),
    ("drafts_float", lambda: _with(drafts=torch.zeros(2, 3)), TypeError, "drafts"),
    ("block_logits_wrong_shape", lambda: _with(block_logits=torch.randn(2, 2, 3, 6)), ValueError, "block_logits"),
    ("ar_logits_2d", lambda: _with(ar_logits=torch.randn(3, 6)), ValueError, "ar_logits"),
    ("ar_logits_int", lambda: _with(ar_logits=torch.zeros(2, 3, 6, dtype=torch.long)), TypeError, "ar_logits"),
    ("negative_temperature", lambda: _with(temperature=-0.5), ValueError, "temperature"),
    ("nan_temperature", lambda: _with(temperature=float("nan")), ValueError, "temperature"),
    ("top_p_zero", lambda: _with(top_p=0.0), ValueError, "top_p"),
    ("top_p_above_one", lambda: _with(top_p=1.5), ValueError, "top_p"),
    ("top_k_zero", lambda: _with(top_k=0), ValueError, "top_k"),
    ("top_k_float", lambda: _with(top_k=2.5), ValueError, "top_k"),
    ("beta_above_one", lambda: _with(beta=1.5), ValueError, "beta"),
    ("beta_negative", lambda: _with(beta=-0.1), ValueError, "beta"),
    ("missing_draft_probs", lambda: _with(draft_probs=None), ValueError, "draft_probs"),
    ("draft_probs_wrong_shape", lambda: _with(draft_probs=torch.full((2, 3, 6), 1 / 6)), ValueError, "draft_probs"),
    (
        "draft_probs_fp16",
        lambda: _with(draft_probs=torch.full((2, 2, 6), 1 / 6, dtype=torch.float16)),
        TypeError,
        "draft_probs",
    ),
    ("draft_probs_zero_at_draft", _draft_probs_zero_at_draft, ValueError, "draft_probs"),
    ("uniforms_wrong_shape", lambda: _with(uniforms=torch.rand(2, 5)), ValueError, "uniforms"),
    ("uniforms_equal_one", lambda: _with(uniforms=torch.ones(2, 6)), ValueError, "uniforms"),
    ("uniforms_negative", lambda: _with(uniforms=torch.full((2, 6), -0.1)), ValueError, "uniforms"),
    ("uniforms_fp64", lambda: _with(uniforms=torch.rand(2, 6, dtype=torch.float64)), TypeError, "uniforms"),
    ("uniforms_inf", lambda: _with(uniforms=torch.full((2, 6), float("inf"))), ValueError, "uniforms"),
    (
        "draft_probs_negative",
        lambda: _with(draft_probs=torch.tensor([0.5, -0.1, 0.2, 0.2, 0.1, 0.1]).expand(2, 2, 6)),
        ValueError,
        "draft_probs",
    ),
    ("draft_probs_inf", lambda: _with(draft_probs=torch.full((2, 2, 6), float("inf"))), ValueError, "draft_probs"),
    ("draft_probs_not_normalised", lambda: _with(draft_probs=torch.full((2, 2, 6), 0.5)), ValueError, "draft_probs"),
    ("draft_probs_logits_by_mistake", lambda: _with(draft_probs=torch.randn(2, 2, 6).abs()), ValueError, "draft_probs"),
    (
        "all_neg_inf_block_row",
        lambda: _with(block_logits=torch.randn(2, 3, 3, 6).index_fill(0, torch.tensor([1]), float("-inf"))),
        ValueError,
        "block_logits",
    ),
    (
        "beta_mix_disjoint_support",
        lambda: _with(
            ar_logits=torch.tensor([0.0, 0.0, 0.0, float("-inf"), float("-inf"), float("-inf")]).expand(2, 3, 6),
            block_logits=torch.tensor([float("-inf"), float("-inf"), float("-inf"), 0.0, 0.0, 0.0]).expand(2, 3, 3, 6),
            beta=0.5,
        ),
        ValueError,
        "beta mix",
    ),
    ("generator_and_uniforms", lambda: _with(generator=gen(0)), ValueError, "exactly one source"),
    ("seed_and_uniforms", lambda: _with(seed=1), ValueError, "exactly one source"),
    ("offset_without_seed", lambda: {**_with(offset=4), "uniforms": None}, ValueError, "offset needs a seed"),
    ("seed_float", lambda: {**_with(seed=1.5), "uniforms": None}, TypeError, "seed"),
    ("seed_bool", lambda: {**_with(seed=True), "uniforms": None}, TypeError, "seed"),
    ("seed_too_large", lambda: {**_with(seed=2**64), "uniforms": None}, ValueError, "seed"),
    (
        "seed_int32_tensor",
        lambda: {**_with(seed=torch.tensor([1], dtype=torch.int32)), "uniforms": None},
        TypeError,
        "seed",
    ),
    ("seed_two_elements", lambda: {**_with(seed=torch.tensor([1, 2])), "uniforms": None}, TypeError, "seed"),
    ("offset_negative", lambda: {**_with(seed=1, offset=-1), "uniforms": None}, ValueError, "offset"),
    ("unknown_backend", lambda: _with(backend="nope"), ValueError, "backend"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.triton_interpreter
def test_bad_calls_raise(backend, name, make, exc, match):
    args = make()
    args.setdefault("backend", backend)
    inputs = dict(args)
    before = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}
    with pytest.raises(exc, match=match):
        rejection_sample(
            args.pop("ar_logits"), args.pop("block_logits"), args.pop("drafts"), args.pop("draft_probs"), **args
        )
    for k, v in before.items():  # a failed call modifies none of its inputs
        assert torch.equal(inputs[k].isnan(), v.isnan()) and torch.equal(inputs[k].nan_to_num(), v.nan_to_num()), k


def test_good_call_of_bad_call_table_runs(backend):
    args = _good()
    res = rejection_sample(
        args.pop("ar_logits"),
        args.pop("block_logits"),
        args.pop("drafts"),
        args.pop("draft_probs"),
        backend=backend,
        **args,
    )
    assert res.accepted.shape == (2,) and ((res.accepted >= 1) & (res.accepted <= 3)).all()


@pytest.mark.triton_interpreter
def test_nan_uniforms_raise(backend):
    """BUG (tidar_kernels/ops/rejection_sample.py, ``_uniforms``): the range check
    ``((uniforms < 0) | (uniforms >= 1)).any()`` is False for NaN, so NaN uniforms pass validation and
    silently decide the step: a NaN acceptance uniform always rejects (NaN * q < p is False) and a NaN
    sampling uniform makes ``searchsorted`` run off the end, clamped to the last token id."""
    args = _with(uniforms=torch.tensor([[0.5, float("nan"), 0.5, 0.5, 0.5, 0.5], [float("nan")] + [0.5] * 5]))
    with pytest.raises(ValueError, match="uniforms"):
        rejection_sample(
            args.pop("ar_logits"),
            args.pop("block_logits"),
            args.pop("drafts"),
            args.pop("draft_probs"),
            backend=backend,
            **args,
        )
    with pytest.raises(ValueError, match="uniforms"):
        draft_sample(
            torch.randn(2, 6),
            torch.randn(2, 3, 6),
            temperature=1.0,
            uniforms=torch.full((2, 6), float("nan")),
            backend=backend,
        )


@pytest.mark.triton_interpreter
def test_beta_zero_with_masked_ar_logits(backend):
    """BUG (tidar_kernels/reference/rejection_sample.py, ``mix``): at beta = 0 (pure diffusion target, allowed
    by check_sampling_args) it computes ``0.0 * ar + 1.0 * diff``; an AR logit of -inf (a banned token, as
    logits processors produce) gives 0 * -inf = NaN, and argmax/softmax then pick exactly that banned token."""
    ar = torch.zeros(1, 2, 4)
    ar[0, :, 3] = float("-inf")  # token 3 banned in the AR logits
    blk = torch.zeros(1, 2, 2, 4)
    blk[0, 0, 0, 1] = 5.0  # block 1 slot 0 -> 1
    blk[0, 1, 0, 2] = 5.0  # block 2 slot 0 -> 2 (bonus)
    res = rejection_sample(ar, blk, torch.tensor([[0, 1]]), beta=0.0, backend=backend)
    assert res.accepted.tolist() == [2], "d_1 = 1 is the argmax of the beta = 0 target (block 1 slot 0)"
    assert res.next_drafts[0, 0].item() == 2
    d = draft_sample(ar[:, 0], blk[:, 0], beta=0.0, backend=backend)
    assert d.next_drafts[0, 0].item() == 1


@pytest.mark.triton_interpreter
def test_all_neg_inf_logit_row_raises(backend):
    """BUG (validation gap, fixed in ops/rejection_sample.py ``_check_logits``): -inf is
    allowed (masking) but a row that is -inf everywhere leaves no possible token; it is accepted silently
    and the op returns an arbitrary id (token 0 when greedy, the last token id when sampling: softmax is NaN)."""
    ar = torch.randn(2, 6)
    ar[0] = float("-inf")
    with pytest.raises(ValueError, match="ar_logits"):
        draft_sample(ar, torch.randn(2, 3, 6), temperature=1.0, generator=gen(0), backend=backend)
    args = _good()
    args["ar_logits"][1, 2] = float("-inf")
    with pytest.raises(ValueError, match="ar_logits"):
        rejection_sample(
            args.pop("ar_logits"),
            args.pop("block_logits"),
            args.pop("drafts"),
            args.pop("draft_probs"),
            backend=backend,
            **args,
        )


DRAFT_BAD = [
    ("vocab_mismatch", dict(block_logits=torch.randn(2, 3, 7)), ValueError, "block_logits"),
    ("batch_mismatch", dict(block_logits=torch.randn(3, 3, 6)), ValueError, "block_logits"),
    ("no_slots", dict(block_logits=torch.randn(2, 0, 6)), ValueError, "block_logits"),
    ("ar_3d", dict(ar_logits=torch.randn(2, 1, 6)), ValueError, "ar_logits"),
    ("nan_ar", dict(ar_logits=torch.full((2, 6), float("nan"))), ValueError, "ar_logits"),
    ("negative_temperature", dict(temperature=-1.0), ValueError, "temperature"),
    ("top_k_zero", dict(top_k=0), ValueError, "top_k"),
    ("uniforms_shape", dict(uniforms=torch.rand(2, 3)), ValueError, "uniforms"),
    ("uniforms_nan", dict(uniforms=torch.full((2, 6), float("nan"))), ValueError, "uniforms"),
    (
        "all_neg_inf_block_row",
        dict(block_logits=torch.randn(2, 3, 6).index_fill(1, torch.tensor([2]), float("-inf"))),
        ValueError,
        "block_logits",
    ),
    ("two_sources", dict(uniforms=torch.rand(2, 6), seed=3), ValueError, "exactly one source"),
    ("offset_without_seed", dict(offset=3), ValueError, "offset needs a seed"),
]


@pytest.mark.parametrize("name,override,exc,match", DRAFT_BAD, ids=[c[0] for c in DRAFT_BAD])
@pytest.mark.triton_interpreter
def test_draft_sample_bad_calls_raise(backend, name, override, exc, match):
    args = dict(ar_logits=torch.randn(2, 6), block_logits=torch.randn(2, 3, 6), temperature=1.0)
    args.update(override)
    with pytest.raises(exc, match=match):
        draft_sample(args.pop("ar_logits"), args.pop("block_logits"), backend=backend, **args)


@pytest.mark.triton_interpreter
def test_plain_ar_draft_sample_checks_only_what_it_reads(backend):
    """``draft_sample`` at K = 1 and beta = 1 (a plain sampled AR step) reads nothing of ``block_logits``: its data is
    not checked there, the AR logits are, and the token has the AR distribution (the draft probabilities are an
    empty ``[B, 0, V]``). With beta < 1 slot 0 is read and checked."""
    V = 5
    ar = torch.tensor([[0.3, -1.0, 1.2, 0.0, 2.0]], dtype=torch.float64).repeat(3, 1)
    junk = torch.full((3, 1, V), float("nan"), dtype=torch.float64)
    res = draft_sample(ar, junk, temperature=1.0, generator=gen(1), backend=backend)
    assert res.next_drafts.shape == (3, 1) and res.next_draft_probs.shape == (3, 0, V)
    bad = ar.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="ar_logits contains NaN"):
        draft_sample(bad, junk, temperature=1.0, generator=gen(1), backend=backend)
    with pytest.raises(ValueError, match="block_logits contains NaN"):
        draft_sample(ar, junk, temperature=1.0, beta=0.5, generator=gen(1), backend=backend)
    n = 20000 if backend == "reference" else 600  # the Triton interpreter runs a program per row
    rows = ar[:1].expand(n, V)
    res = draft_sample(rows, junk[:1].expand(n, 1, V), temperature=1.0, generator=gen(2), backend=backend)
    draws = res.next_drafts[:, 0]
    counts = np.bincount(draws.numpy(), minlength=V)
    p = torch.softmax(ar[0], -1).numpy()
    assert stats.chisquare(counts, p * draws.numel()).pvalue > 1e-4
