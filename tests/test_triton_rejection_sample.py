"""Triton rejection_sample / draft_sample (under TRITON_INTERPRET=1 on CPU).

EXACTNESS: tokens, acceptance lengths and emitted drafts equal the reference bit for bit given the same
uniforms (greedy and temperature > 0, beta = 1 / 0 / mixed, several K and B, V not a multiple of the
vocab block, fp32/fp16/bf16 logits, expanded (stride 0) inputs); next-draft distributions within 1e-6.
Distribution: chi-square of the emitted tokens against p on a small vocabulary (with a negative control),
plus the reference suite's greedy, hand-computed and bad-call tests re-run on backend="triton".
top-k / top-p are not implemented in the kernel: a clear NotImplementedError.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from tidar_kernels import draft_sample, draw_uniforms, rejection_sample  # noqa: E402
from tidar_kernels.backends import resolve  # noqa: E402

from test_rejection_sample import (  # noqa: E402,F401  (re-run against the triton backend)
    BAD_CALLS,
    DRAFT_BAD,
    test_bad_calls_raise,
    test_beta_mix_greedy,
    test_beta_zero_with_masked_ar_logits,
    test_draft_sample_bad_calls_raise,
    test_draft_sample_by_hand,
    test_draft_sample_greedy,
    test_greedy_by_hand,
    test_greedy_ignores_draft_probs_and_uniforms,
    test_greedy_semantics,
    test_sampling_by_hand,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton"])
def backend(request):
    return request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_triton_backend_is_live():
    from tidar_kernels.triton import rejection_sample as impl

    assert resolve("rejection_sample", "triton", torch.device(DEV)) is impl.rejection_sample
    assert resolve("draft_sample", "triton", torch.device(DEV)) is impl.draft_sample


def _step(B, K, V, T, seed, dtype=torch.float32, accept_bias=True):
    """Random step whose drafts are often accepted: AR logits near the draft distributions."""
    g = gen(seed)
    q = (torch.randn(B, K - 1, V, generator=g) * 1.5).softmax(-1)
    d_rest = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K - 1) if K > 1 else \
        torch.zeros(B, 0, dtype=torch.long)
    drafts = torch.cat([torch.randint(0, V, (B, 1), generator=g), d_rest], 1)
    ar = torch.randn(B, K, V, generator=g) * 2
    if accept_bias and K > 1:
        ar[:, :-1] = q.log() * T if T > 0 else q.log()
        ar[:, :-1] += 0.5 * torch.randn(B, K - 1, V, generator=g)
    blk = torch.randn(B, K, K, V, generator=g) * 2
    return ar.to(dtype), blk.to(dtype), drafts, q


def _assert_same(got, want):
    """EXACT on tokens / counts; draft distributions to 1e-6 (they are float32 outputs, not decisions)."""
    assert torch.equal(got.accepted, want.accepted), "accepted"
    assert torch.equal(got.emitted, want.emitted), "emitted"
    assert torch.equal(got.next_drafts, want.next_drafts), "next_drafts"
    if want.next_draft_probs is None:
        assert got.next_draft_probs is None
    else:
        assert got.next_draft_probs.dtype == torch.float32
        torch.testing.assert_close(got.next_draft_probs, want.next_draft_probs, rtol=1e-6, atol=1e-7)


EXACT_CASES = [  # (B, K, V, temperature, beta, dtype)
    (3, 1, 7, 0.0, 1.0, torch.float32),
    (3, 1, 7, 1.0, 1.0, torch.float32),
    (16, 2, 5, 0.0, 1.0, torch.float32),
    (16, 2, 5, 0.8, 1.0, torch.float32),
    (24, 4, 33, 0.0, 1.0, torch.float32),
    (24, 4, 33, 1.0, 1.0, torch.float32),
    (24, 4, 33, 0.7, 0.3, torch.float32),
    (8, 5, 300, 0.0, 0.5, torch.float16),
    (8, 5, 300, 1.3, 1.0, torch.float16),
    (8, 5, 300, 0.9, 0.0, torch.bfloat16),
    (4, 8, 1000, 1.0, 1.0, torch.float32),
    (4, 8, 1000, 0.0, 1.0, torch.bfloat16),
]


@pytest.mark.parametrize("B,K,V,T,beta,dtype", EXACT_CASES)
def test_exact_vs_reference_given_uniforms(B, K, V, T, beta, dtype):
    """EXACT: same uniforms -> same accepted / emitted / next drafts as the reference, bit for bit."""
    ar, blk, drafts, q = _step(B, K, V, T, seed=B * K + V)
    ar, blk = ar.to(dtype), blk.to(dtype)
    if T == 0.0 and K > 1:  # greedy: plant the target argmax as the draft most of the time
        target = beta * ar.double() + (1 - beta) * blk[:, :, 0].double() if 0 < beta < 1 else \
            (ar if beta == 1 else blk[:, :, 0]).double()
        plant = torch.rand(B, K - 1, generator=gen(1)) < 0.7
        drafts[:, 1:] = torch.where(plant, target[:, :-1].argmax(-1), drafts[:, 1:])
    u = draw_uniforms(B, K, generator=gen(V))
    kw = dict(temperature=T, beta=beta, uniforms=u)
    qq = q if (T > 0 and K > 1) else None
    want = rejection_sample(ar, blk, drafts, qq, backend="reference", **kw)
    got = rejection_sample(ar, blk, drafts, qq, backend="triton", **kw)
    _assert_same(got, want)
    if K > 1:
        assert len(set(want.accepted.tolist())) >= 2, "the case should exercise several acceptance lengths"
    d_want = draft_sample(ar[:, 0], blk[:, 0], backend="reference", **kw)
    d_got = draft_sample(ar[:, 0], blk[:, 0], backend="triton", **kw)
    assert torch.equal(d_got.next_drafts, d_want.next_drafts), "draft_sample next_drafts"
    if T > 0:
        torch.testing.assert_close(d_got.next_draft_probs, d_want.next_draft_probs, rtol=1e-6, atol=1e-7)


def test_exact_many_rows_every_acceptance_length():
    """EXACT: 120 rows, K=4, V=37, temperature 1: every acceptance length, every row equal to the reference."""
    B, K, V = 120, 4, 37
    ar, blk, drafts, q = _step(B, K, V, 1.0, seed=5)
    u = draw_uniforms(B, K, generator=gen(6))
    want = rejection_sample(ar, blk, drafts, q, temperature=1.0, uniforms=u, backend="reference")
    got = rejection_sample(ar, blk, drafts, q, temperature=1.0, uniforms=u, backend="triton")
    _assert_same(got, want)
    assert set(want.accepted.tolist()) == {1, 2, 3, 4}


def test_exact_expanded_and_strided_inputs():
    """EXACT: stride-0 (expanded) logits and draft probs and a non-contiguous block tensor."""
    B, K, V = 6, 3, 19
    ar0, blk0, drafts, q0 = _step(1, K, V, 0.9, seed=7)
    ar, q = ar0.expand(B, K, V), q0.expand(B, K - 1, V)
    blk = blk0.expand(B, K, K, V).transpose(1, 2).contiguous().transpose(1, 2)  # strided view
    drafts = drafts.expand(B, K)
    u = draw_uniforms(B, K, generator=gen(8))
    want = rejection_sample(ar, blk, drafts, q, temperature=0.9, uniforms=u, backend="reference")
    got = rejection_sample(ar, blk, drafts, q, temperature=0.9, uniforms=u, backend="triton")
    _assert_same(got, want)


def test_generator_path_reproducible():
    B, K, V = 32, 3, 11
    ar, blk, drafts, q = _step(B, K, V, 0.9, seed=9)
    r1 = rejection_sample(ar, blk, drafts, q, temperature=0.9, generator=gen(1), backend="triton")
    r2 = rejection_sample(ar, blk, drafts, q, temperature=0.9, generator=gen(1), backend="triton")
    r0 = rejection_sample(ar, blk, drafts, q, temperature=0.9, generator=gen(1), backend="reference")
    _assert_same(r1, r2)
    _assert_same(r1, r0)


def test_top_k_top_p_not_implemented():
    ar, blk, drafts, q = _step(2, 3, 9, 1.0, seed=1)
    for kw in (dict(top_k=3), dict(top_p=0.5)):
        with pytest.raises(NotImplementedError, match="top_k/top_p"):
            rejection_sample(ar, blk, drafts, q, temperature=1.0, generator=gen(0), backend="triton", **kw)
        with pytest.raises(NotImplementedError, match="top_k/top_p"):
            draft_sample(ar[:, 0], blk[:, 0], temperature=1.0, generator=gen(0), backend="triton", **kw)


# ---------------------------------------------------------------------------------------------
# Distribution (chi-square on a small vocabulary)
# ---------------------------------------------------------------------------------------------

N, KD, VD, TEMP = 800, 2, 4, 0.8  # the interpreter runs one program per row: keep N small


def _chi2(tokens, p):
    counts = np.bincount(tokens.numpy(), minlength=VD)
    expect = len(tokens) * p.numpy()
    assert expect.min() >= 5
    return stats.chisquare(counts, expect).pvalue


def test_emitted_tokens_distributed_as_p():
    """Speculative sampling: the token at position 1 (accepted d_1, else the residual correction) is
    distributed as p_1, whatever q_1 was; the bonus at a = K as p_K. Negative control: always accepting
    (samples of q_1) is rejected by the same statistic."""
    g = gen(2024)
    ar0 = torch.randn(KD, VD, generator=g)
    blk0 = torch.randn(KD, KD, VD, generator=g)
    q0 = (torch.randn(KD - 1, VD, generator=g) * 1.2).softmax(-1)
    d_rest = torch.stack([torch.multinomial(q0[i], N, replacement=True, generator=g) for i in range(KD - 1)], 1)
    drafts = torch.cat([torch.zeros(N, 1, dtype=torch.long), d_rest], 1)
    res = rejection_sample(ar0.expand(N, KD, VD), blk0.expand(N, KD, KD, VD), drafts, q0.expand(N, KD - 1, VD),
                           temperature=TEMP, generator=gen(77), backend="triton")
    p = (ar0.double() / TEMP).softmax(-1)
    a, em, nd = res.accepted, res.emitted, res.next_drafts
    overlap = torch.minimum(p[0], q0[0].double()).sum().item()
    assert 0.15 < overlap < 0.9
    assert abs((a >= 2).double().mean().item() - overlap) < 4 * (overlap * (1 - overlap) / N) ** 0.5
    x1 = torch.where(a >= 2, em[:, 1], nd[:, 0])
    assert _chi2(x1, p[0]) > 1e-3
    assert _chi2(drafts[:, 1], p[0]) < 1e-6, "negative control: samples of q_1 must be rejected"
    full = a == KD  # everything accepted: the bonus is a sample of p_K
    assert _chi2(nd[full, 0], p[KD - 1]) > 1e-3


def test_draft_sample_distribution():
    g = gen(31)
    ar0, blk0 = torch.randn(VD, generator=g), torch.randn(2, VD, generator=g) * 1.5
    res = draft_sample(ar0.expand(N, VD), blk0.expand(N, 2, VD), temperature=1.3, generator=gen(32), backend="triton")
    assert _chi2(res.next_drafts[:, 0], (ar0.double() / 1.3).softmax(-1)) > 1e-3
    assert _chi2(res.next_drafts[:, 1], (blk0[1].double() / 1.3).softmax(-1)) > 1e-3
    assert _chi2(res.next_drafts[:, 1], (blk0[0].double() / 1.3).softmax(-1)) < 1e-6  # wrong slot is rejected


# ---------------------------------------------------------------------------------------------
# GPU: real sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("T,beta", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.5)])
def test_gpu_exact_real_vocab(T, beta):
    """EXACT (GPU): B=4, K=16, V=151936 bf16 logits vs the reference on the same device and uniforms."""
    B, K, V = 4, 16, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    ar = torch.randn(B, K, V, device="cuda", generator=g).to(torch.bfloat16) * 3
    blk = torch.randn(B, K, K, V, device="cuda", generator=g).to(torch.bfloat16) * 3
    q = (ar[:, :-1].float() / max(T, 0.5) + 0.3 * torch.randn(B, K - 1, V, device="cuda", generator=g)).softmax(-1)
    drafts = torch.cat([torch.zeros(B, 1, dtype=torch.long, device="cuda"),
                        torch.multinomial(q.view(-1, V), 1, generator=g).view(B, K - 1)], 1)
    u = draw_uniforms(B, K, generator=g)
    kw = dict(temperature=T, beta=beta, uniforms=u)
    _assert_same(rejection_sample(ar, blk, drafts, q, backend="triton", **kw),
                 rejection_sample(ar, blk, drafts, q, backend="reference", **kw))
