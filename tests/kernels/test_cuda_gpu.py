"""backend="cuda" on a GPU (every test here is skipped without CUDA; conftest marks them ``gpu``).

- kv_append: EXACT, bit for bit over the whole cache (stray writes show), fp16/bf16/fp32/fp64, odd sizes,
  both ends of the cache, non-contiguous inputs (slow path) and aligned ones (16-byte path), NaN payloads,
  a cache of more than 2^31 elements (64-bit offsets).
- rejection_sample / draft_sample: EXACT vs the reference on the same device given the same uniforms, and given
  the same Philox seed/offset (ints and device tensors); greedy, temperature, beta mix, K = 1, odd V up to a real
  vocabulary, mixed logit dtypes, strided/expanded inputs; Philox-in-kernel == the reference's philox_uniforms;
  chi-square of the emitted tokens; CUDA-graph capture with a device offset; torch.compile; opcheck.
- tidar_attention: forward within the FlashAttention-style bound (error vs fp32 at most 2x plain low-precision
  PyTorch + small atol) across decode/prefill/training/random layouts, S in 1, 7, 113, 127, 272, prefixes up to
  a few thousand (and 16k with split-KV), GQA, D 64/128, fp16/bf16, per-row seg_start, non-contiguous inputs;
  lse vs logsumexp; queries that see nothing give zeros; dispatch (grad / fp32 / D=96 fall through under auto).
- generation: greedy TiDAR with backend="cuda" on a tiny fp16 model equals the model's own HF greedy decode.
"""

from __future__ import annotations

import pytest
import torch

from tidar_kernels import _loaders, draft_sample, draw_uniforms, kv_append, layouts, rejection_sample, tidar_attention
from tidar_kernels.backends import live_backends
from tidar_kernels.reference.rejection_sample import philox_uniforms

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def test_extension_loads_and_is_live_on_gpu():
    """On a GPU machine the extension must load (a failure names why: not built / ABI / archs)."""
    assert _loaders.load_error("cuda") is None, _loaders.load_error("cuda")
    live = live_backends("cuda")
    for op in ("kv_append", "rejection_sample", "draft_sample", "tidar_attention"):
        assert "cuda" in live[op], (op, live)


# ---------------------------------------------------------------------------------------------
# kv_append
# ---------------------------------------------------------------------------------------------


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _rand(shape, dtype, seed):
    """Random bit patterns (NaN payloads, infs, denormals included) as ``dtype``."""
    g = _gen(seed)
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(it)
    return torch.randint(info.min, info.max, shape, dtype=it, device=DEV, generator=g).view(dtype)


def _expected(cache, new, segs):
    want = cache.clone()
    S = new.shape[2]
    for b, s0 in enumerate(segs):
        want[b, :, s0 : s0 + S] = new[b]
    return want


KV_CASES = [  # B, H, Smax, D, S
    (1, 1, 1, 1, 1),
    (3, 2, 200, 7, 113),
    (2, 3, 130, 8, 127),
    (2, 8, 600, 64, 272),
    (4, 8, 4096, 128, 272),
    (1, 2, 300, 100, 1),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("B,H,Smax,D,S", KV_CASES)
def test_kv_append_whole_cache_bit_exact(dtype, B, H, Smax, D, S):
    g = torch.Generator().manual_seed(B * 7 + S)
    segs = [int(torch.randint(0, Smax - S + 1, (1,), generator=g)) for _ in range(B)]
    segs[0] = Smax - S  # the last slots
    if B > 1:
        segs[1] = 0
    kc, vc = _rand((B, H, Smax, D), dtype, 1), _rand((B, H, Smax, D), dtype, 2)
    kn, vn = _rand((B, H, S, D), dtype, 3), _rand((B, H, S, D), dtype, 4)
    want_k, want_v = _expected(kc, kn, segs), _expected(vc, vn, segs)
    kv_append(kc, vc, kn, vn, torch.tensor(segs, dtype=torch.int32, device=DEV), backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(_bits(kc), _bits(want_k)) and torch.equal(_bits(vc), _bits(want_v))


def test_kv_append_noncontiguous_inputs_and_cache_view():
    """Slow path (last dim strided) and the 16-byte path on a cache view; the rest of the parent untouched."""
    B, H, Smax, D, S = 2, 4, 100, 64, 17
    parent_k = _rand((B, Smax + 10, H, D), torch.bfloat16, 5)
    parent_v = _rand((B, Smax + 10, H, D), torch.bfloat16, 6)
    kc, vc = parent_k[:, 5 : 5 + Smax].transpose(1, 2), parent_v[:, 5 : 5 + Smax].transpose(1, 2)  # [B, H, Smax, D]
    kn = _rand((B, H, D, S), torch.bfloat16, 7).transpose(2, 3)  # last dim strided
    vn = _rand((B, S, H, D), torch.bfloat16, 8).transpose(1, 2)  # aligned rows, non-contiguous
    segs = [3, Smax - S]
    want_pk, want_pv = parent_k.clone(), parent_v.clone()
    want_pk[:, 5 : 5 + Smax].transpose(1, 2).copy_(_expected(kc, kn, segs))
    want_pv[:, 5 : 5 + Smax].transpose(1, 2).copy_(_expected(vc, vn, segs))
    kv_append(kc, vc, kn, vn, torch.tensor(segs, dtype=torch.int32, device=DEV), backend="cuda")
    assert torch.equal(_bits(parent_k), _bits(want_pk)) and torch.equal(_bits(parent_v), _bits(want_pv))


def test_kv_append_overflow_raises_and_leaves_cache_untouched():
    kc = torch.zeros(2, 1, 10, 8, device=DEV)
    vc = torch.zeros_like(kc)
    new = torch.ones(2, 1, 4, 8, device=DEV)
    with pytest.raises(ValueError, match="overflow"):
        kv_append(kc, vc, new, new, torch.tensor([0, 7], dtype=torch.int32, device=DEV), backend="cuda")
    assert not kc.any() and not vc.any()


def test_kv_append_cache_over_2g_elements():
    """64-bit offsets: a [1, 2, 2^23 + 64, 128] fp16 cache (2^31 + 16384 elements per tensor), appended at the end."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~10 GiB free")
    B, H, Smax, D, S = 1, 2, 2**23 + 64, 128, 272
    kc = torch.zeros(B, H, Smax, D, device=DEV, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    kn, vn = _rand((B, H, S, D), torch.float16, 9), _rand((B, H, S, D), torch.float16, 10)
    s0 = Smax - S
    kv_append(kc, vc, kn, vn, torch.tensor([s0], dtype=torch.int32, device=DEV), backend="cuda")
    assert torch.equal(_bits(kc[:, :, s0:]), _bits(kn)) and torch.equal(_bits(vc[:, :, s0:]), _bits(vn))
    assert not _bits(kc[:, :, :s0]).any() and not _bits(vc[:, :, :s0]).any()
    del kc, vc
    torch.cuda.empty_cache()


def test_kv_append_cuda_graph_and_compile():
    kc = torch.zeros(2, 2, 64, 64, device=DEV, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    kn = torch.randn(2, 2, 8, 64, device=DEV, dtype=torch.float16)
    seg = torch.tensor([0, 3], dtype=torch.int32, device=DEV)
    fn = lambda: kv_append(kc, vc, kn, kn, seg, backend="cuda")  # noqa: E731
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    seg.copy_(torch.tensor([40, 50], dtype=torch.int32))
    graph.replay()
    assert torch.equal(kc[0, :, 40:48], kn[0]) and torch.equal(kc[1, :, 50:58], kn[1])
    kc2, vc2 = kc.clone().zero_(), vc.clone().zero_()

    @torch.compile(fullgraph=True)
    def compiled(kc, vc, kn, seg):
        torch.ops.tidar_cuda.kv_append(kc, vc, kn, kn, seg)
        return kc.sum()

    compiled(kc2, vc2, kn, seg)
    assert torch.equal(kc2[0, :, 40:48], kn[0])


def test_kv_append_opcheck():
    kc = torch.zeros(2, 2, 32, 64, device=DEV, dtype=torch.bfloat16)
    kn = torch.randn(2, 2, 5, 64, device=DEV, dtype=torch.bfloat16)
    seg = torch.tensor([1, 20], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.tidar_cuda.kv_append.default, (kc, kc.clone(), kn, kn, seg))


# ---------------------------------------------------------------------------------------------
# rejection_sample / draft_sample
# ---------------------------------------------------------------------------------------------


def _step(B, K, V, T, seed, dtype=torch.float32, blk_dtype=None):
    """Random step on the GPU whose drafts are often accepted (AR logits near the draft distributions)."""
    g = _gen(seed)
    q = (torch.randn(B, max(K - 1, 0), V, device=DEV, generator=g) * 1.5).softmax(-1)
    d_rest = (
        torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K - 1)
        if K > 1
        else torch.zeros(B, 0, dtype=torch.long, device=DEV)
    )
    drafts = torch.cat([torch.randint(0, V, (B, 1), device=DEV, generator=g), d_rest], 1)
    ar = torch.randn(B, K, V, device=DEV, generator=g) * 2
    if K > 1:
        ar[:, :-1] = (q.log() * (T if T > 0 else 1.0)) + 0.5 * torch.randn(B, K - 1, V, device=DEV, generator=g)
    blk = torch.randn(B, K, K, V, device=DEV, generator=g) * 2
    return ar.to(dtype), blk.to(blk_dtype or dtype), drafts, q


def _assert_same(got, want):
    assert torch.equal(got.accepted, want.accepted), "accepted"
    assert torch.equal(got.emitted, want.emitted), "emitted"
    assert torch.equal(got.next_drafts, want.next_drafts), "next_drafts"
    if want.next_draft_probs is None:
        assert got.next_draft_probs is None
    else:
        torch.testing.assert_close(got.next_draft_probs, want.next_draft_probs, rtol=1e-6, atol=1e-7)


def _plant_greedy(ar, blk, drafts, beta, seed):
    """Greedy: make d_i the target argmax most of the time so several acceptance lengths occur."""
    B, K, _ = ar.shape
    if K == 1:
        return drafts
    t = (
        ar.double()
        if beta == 1
        else blk[:, :, 0].double()
        if beta == 0
        else beta * ar.double() + (1 - beta) * blk[:, :, 0].double()
    )
    plant = torch.rand(B, K - 1, device=DEV, generator=_gen(seed)) < 0.7
    drafts = drafts.clone()
    drafts[:, 1:] = torch.where(plant, t[:, :-1].argmax(-1), drafts[:, 1:])
    return drafts


RS_CASES = [  # B, K, V, T, beta, dtype, blk_dtype
    (3, 1, 1, 0.0, 1.0, torch.float32, None),
    (3, 1, 7, 1.0, 1.0, torch.float32, None),
    (16, 2, 5, 0.0, 1.0, torch.float32, None),
    (16, 2, 5, 0.8, 1.0, torch.float32, None),
    (24, 4, 33, 0.7, 0.3, torch.float32, None),
    (8, 5, 113, 1.3, 1.0, torch.float16, None),
    (8, 5, 127, 0.9, 0.0, torch.bfloat16, None),
    (8, 5, 300, 0.0, 0.5, torch.float16, None),
    (5, 16, 2049, 1.0, 1.0, torch.float32, torch.bfloat16),
    (4, 8, 3000, 0.6, 0.7, torch.float64, None),
    (2, 16, 50257, 1.0, 1.0, torch.bfloat16, None),
    (2, 16, 50257, 0.0, 1.0, torch.bfloat16, None),
    (1, 16, 151936, 0.8, 1.0, torch.bfloat16, None),
]


@pytest.mark.parametrize("B,K,V,T,beta,dtype,blk_dtype", RS_CASES)
def test_rejection_exact_vs_reference_given_uniforms(B, K, V, T, beta, dtype, blk_dtype):
    ar, blk, drafts, q = _step(B, K, V, T, seed=B * K + V, dtype=dtype, blk_dtype=blk_dtype)
    if T == 0.0:
        drafts = _plant_greedy(ar, blk, drafts, beta, V)
    u = draw_uniforms(B, K, generator=_gen(V))
    qq = q if (T > 0 and K > 1) else None
    kw = dict(temperature=T, beta=beta, uniforms=u)
    _assert_same(
        rejection_sample(ar, blk, drafts, qq, backend="cuda", **kw),
        rejection_sample(ar, blk, drafts, qq, backend="reference", **kw),
    )
    d_got = draft_sample(ar[:, 0], blk[:, 0], backend="cuda", **kw)
    d_want = draft_sample(ar[:, 0], blk[:, 0], backend="reference", **kw)
    assert torch.equal(d_got.next_drafts, d_want.next_drafts)
    if T > 0 and K > 1:
        torch.testing.assert_close(d_got.next_draft_probs, d_want.next_draft_probs, rtol=1e-6, atol=1e-7)


# The vocabulary-parallel path (csrc/rejection_sample.cu passes 1-4): taken by shape for small batches with large
# vocabularies (B * K < 2 * SMs, V >= 4 chunks); TIDAR_CUDA_VOCAB_PARALLEL=1/0 forces it, TIDAR_CUDA_VOCAB_CHUNK
# sets the chunk (both read at every call). Both paths must give the reference's decisions.
VP_GPU_CASES = [  # B, K, V, T, beta, top_k, top_p, chunk
    (1, 16, 151936, 0.0, 1.0, None, None, None),
    (1, 16, 151936, 0.8, 1.0, None, None, None),
    (1, 16, 151936, 1.0, 0.6, None, None, 1000),
    (1, 16, 151936, 0.7, 1.0, 50, 0.9, None),
    (16, 16, 151936, 0.9, 1.0, None, None, None),
    (3, 4, 5003, 1.1, 0.3, None, None, 97),
]


@pytest.mark.parametrize("path", ["1", "0"])
@pytest.mark.parametrize("B,K,V,T,beta,top_k,top_p,chunk", VP_GPU_CASES)
def test_rejection_vocab_parallel_exact_vs_reference(monkeypatch, path, B, K, V, T, beta, top_k, top_p, chunk):
    monkeypatch.setenv("TIDAR_CUDA_VOCAB_PARALLEL", path)
    if chunk is not None:
        monkeypatch.setenv("TIDAR_CUDA_VOCAB_CHUNK", str(chunk))
    ar, blk, drafts, q = _step(B, K, V, T, seed=B + V + K, dtype=torch.bfloat16)
    if T == 0.0:
        drafts = _plant_greedy(ar, blk, drafts, beta, V)
    qq = q if T > 0 else None
    for kw in (dict(uniforms=draw_uniforms(B, K, generator=_gen(V))), dict(seed=7, offset=123)):
        kw.update(temperature=T, beta=beta, top_k=top_k, top_p=top_p)
        _assert_same(
            rejection_sample(ar, blk, drafts, qq, backend="cuda", **kw),
            rejection_sample(ar, blk, drafts, qq, backend="reference", **kw),
        )


def test_rejection_vocab_parallel_acceptance_lengths_b1(monkeypatch):
    """B = 1, K = 16, 152k bf16 over many steps (seeds): several acceptance lengths, bonus included."""
    monkeypatch.setenv("TIDAR_CUDA_VOCAB_PARALLEL", "1")
    B, K, V, T = 1, 16, 151936, 1.0
    seen = set()
    for step in range(12):
        ar, blk, drafts, q = _step(B, K, V, T, seed=100 + step, dtype=torch.bfloat16)
        ar[:, : step % K] = (q[:, : step % K].log() * T).to(ar.dtype)  # drafts ~ p up to bf16: long acceptances
        kw = dict(temperature=T, seed=step, offset=0)
        want = rejection_sample(ar, blk, drafts, q, backend="reference", **kw)
        _assert_same(rejection_sample(ar, blk, drafts, q, backend="cuda", **kw), want)
        seen.add(int(want.accepted))
    assert len(seen) >= 2, seen


def test_rejection_every_acceptance_length():
    B, K, V = 400, 4, 37
    ar, blk, drafts, q = _step(B, K, V, 1.0, seed=5)
    u = draw_uniforms(B, K, generator=_gen(6))
    want = rejection_sample(ar, blk, drafts, q, temperature=1.0, uniforms=u, backend="reference")
    _assert_same(rejection_sample(ar, blk, drafts, q, temperature=1.0, uniforms=u, backend="cuda"), want)
    assert set(want.accepted.tolist()) == {1, 2, 3, 4}


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 77), (-5, 2**40), (2**63 - 1, 2**64 - 3)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_rejection_exact_given_seed_offset(seed, offset, as_tensor):
    """EXACT: the kernel's in-kernel Philox == the reference's philox_uniforms for the same seed/offset."""
    B, K, V, T = 32, 6, 501, 0.9
    ar, blk, drafts, q = _step(B, K, V, T, seed=11)
    s, o = seed, offset
    if as_tensor:
        s = torch.tensor([seed], dtype=torch.int64, device=DEV)
        o = torch.tensor([offset - 2**64 if offset >= 2**63 else offset], dtype=torch.int64, device=DEV)
    want = rejection_sample(ar, blk, drafts, q, temperature=T, seed=s, offset=o, backend="reference")
    _assert_same(rejection_sample(ar, blk, drafts, q, temperature=T, seed=s, offset=o, backend="cuda"), want)
    u = philox_uniforms(seed, offset - 2**64 if offset >= 2**63 else offset, B, K, DEV)
    _assert_same(rejection_sample(ar, blk, drafts, q, temperature=T, uniforms=u, backend="cuda"), want)
    dw = draft_sample(ar[:, 0], blk[:, 0], temperature=T, seed=s, offset=o, backend="reference")
    dg = draft_sample(ar[:, 0], blk[:, 0], temperature=T, seed=s, offset=o, backend="cuda")
    assert torch.equal(dg.next_drafts, dw.next_drafts)


def test_rejection_expanded_and_strided_inputs():
    B, K, V = 6, 3, 19
    ar0, blk0, drafts, q0 = _step(1, K, V, 0.9, seed=7)
    ar, q = ar0.expand(B, K, V), q0.expand(B, K - 1, V)
    blk = blk0.expand(B, K, K, V).transpose(1, 2).contiguous().transpose(1, 2)
    drafts = drafts.expand(B, K)
    u = draw_uniforms(B, K, generator=_gen(8))[:, :].t().contiguous().t()  # strided uniforms
    kw = dict(temperature=0.9, uniforms=u)
    _assert_same(
        rejection_sample(ar, blk, drafts, q, backend="cuda", **kw),
        rejection_sample(ar, blk, drafts, q, backend="reference", **kw),
    )


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (20, 0.9), (1, None)])
@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_top_k_top_p_exact_vs_reference(top_k, top_p, beta):
    """EXACT: top-k/top-p as per-row thresholds (ties at the boundary kept) give the reference's tokens."""
    B, K, V, T = 16, 4, 300, 0.9
    ar, blk, drafts, q = _step(B, K, V, T, seed=3)
    ar = ar.round()  # integer logits: ties at the top-k boundary
    kw = dict(temperature=T, top_k=top_k, top_p=top_p, beta=beta, seed=5)
    _assert_same(
        rejection_sample(ar, blk, drafts, q, backend="cuda", **kw),
        rejection_sample(ar, blk, drafts, q, backend="reference", **kw),
    )
    dg = draft_sample(ar[:, 0], blk[:, 0], backend="cuda", **kw)
    dw = draft_sample(ar[:, 0], blk[:, 0], backend="reference", **kw)
    assert torch.equal(dg.next_drafts, dw.next_drafts)
    torch.testing.assert_close(dg.next_draft_probs, dw.next_draft_probs, rtol=1e-6, atol=1e-7)


def test_emitted_tokens_distributed_as_p():
    """Chi-square: the token at position 1 (accepted d_1 or the correction) ~ p_1 whatever q_1; negative control."""
    from scipy import stats

    N, K, V, T = 40000, 2, 6, 0.8
    g = _gen(2024)
    ar0 = torch.randn(K, V, device=DEV, generator=g)
    blk0 = torch.randn(K, K, V, device=DEV, generator=g)
    q0 = (torch.randn(K - 1, V, device=DEV, generator=g) * 1.2).softmax(-1)
    d1 = torch.multinomial(q0[0], N, replacement=True, generator=g)
    drafts = torch.stack([torch.zeros(N, dtype=torch.long, device=DEV), d1], 1)
    res = rejection_sample(
        ar0.expand(N, K, V),
        blk0.expand(N, K, K, V),
        drafts,
        q0.expand(N, K - 1, V),
        temperature=T,
        seed=77,
        backend="cuda",
    )
    p = (ar0.double() / T).softmax(-1).cpu()
    x1 = torch.where(res.accepted >= 2, res.emitted[:, 1], res.next_drafts[:, 0]).cpu()

    def pval(tokens, probs):
        return stats.chisquare(torch.bincount(tokens, minlength=V).numpy(), (len(tokens) * probs).numpy()).pvalue

    assert pval(x1, p[0]) > 1e-4
    assert pval(d1.cpu(), p[0]) < 1e-6, "negative control: samples of q_1 must be rejected"


def test_rejection_cuda_graph_with_device_offset():
    """A captured step replays with a new Philox offset written into the device tensor."""
    B, K, V, T = 8, 4, 1000, 1.0
    ar, blk, drafts, q = _step(B, K, V, T, seed=13)
    seed = torch.tensor([42], dtype=torch.int64, device=DEV)
    offset = torch.tensor([0], dtype=torch.int64, device=DEV)
    # the raw op: tidar_kernels.ops.rejection_sample validates data on the host (syncs), which capture forbids
    fn = lambda: torch.ops.tidar_cuda.rejection_sample(ar, blk, drafts, q, None, seed, offset, 0, 0, T, 1.0)  # noqa
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    offset.fill_(B * 2 * K * 5)
    graph.replay()
    want = rejection_sample(ar, blk, drafts, q, temperature=T, seed=42, offset=B * 2 * K * 5, backend="reference")
    _assert_same(type(want)(*out), want)


def test_rejection_ops_compile_and_opcheck():
    B, K, V, T = 4, 3, 77, 0.9
    ar, blk, drafts, q = _step(B, K, V, T, seed=17)
    u = draw_uniforms(B, K, generator=_gen(18))
    args = (ar, blk, drafts, q, u, None, None, 0, 0, T, 1.0)
    torch.library.opcheck(torch.ops.tidar_cuda.rejection_sample.default, args)
    torch.library.opcheck(torch.ops.tidar_cuda.draft_sample.default, (ar[:, 0], blk[:, 0], u, None, None, 0, 0, T, 0.5))
    compiled = torch.compile(lambda *a: torch.ops.tidar_cuda.rejection_sample(*a), fullgraph=True)
    for x, y in zip(compiled(*args), torch.ops.tidar_cuda.rejection_sample(*args)):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# tidar_attention
# ---------------------------------------------------------------------------------------------


def _random_layout(S, seed):
    g = torch.Generator().manual_seed(seed)
    ll = torch.randint(0, S + 1, (S,), generator=g, dtype=torch.int32)
    bid = torch.randint(-1, 4, (S,), generator=g, dtype=torch.int32)
    return ll, bid


def _layout(name, S_hint):
    if name == "decode":
        lay = layouts.decode_step(S_hint)
        return lay.local_limit, lay.block_id
    if name == "prefill":
        lay = layouts.prefill(S_hint, 16)
        return lay.local_limit, lay.block_id
    if name == "training":
        lay = layouts.training(S_hint, 4)
        return lay.local_limit, lay.block_id
    return _random_layout(S_hint, 3)


def _check_attention(dtype, ll, bid, segs, B, Hq, Hkv, D, seed=0, noncontig=False):
    S = ll.shape[0]
    ll, bid = ll.to(DEV), bid.to(DEV)
    seg_start = torch.tensor(segs, dtype=torch.int32, device=DEV)
    Skv = max(segs) + S
    g = _gen(seed)
    if noncontig:  # [B, S, H, D] storage viewed as [B, H, S, D]
        q = torch.randn(B, S, Hq, D, device=DEV, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, Skv, Hkv, D, device=DEV, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, Skv, Hkv, D, device=DEV, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, S, D, device=DEV, generator=g).to(dtype)
        k = torch.randn(B, Hkv, Skv, D, device=DEV, generator=g).to(dtype)
        v = torch.randn(B, Hkv, Skv, D, device=DEV, generator=g).to(dtype)
    from tidar_kernels import cuda

    out, lse = cuda.attention_with_lse(q, k, v, ll, bid, seg_start, D**-0.5)
    ref = tidar_attention(q.float(), k.float(), v.float(), ll, bid, seg_start, backend="reference")
    base = tidar_attention(q, k, v, ll, bid, seg_start, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max().item()
    base_err = (base.float() - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-3, f"err {err:.3g} vs PyTorch {base_err:.3g}"
    # lse vs logsumexp of the masked fp32 scores (-inf where a query sees nothing)
    from tidar_kernels import dense_mask

    mask = dense_mask(ll, bid, seg_start, Skv)[:, None]  # [B, 1, S, Skv]
    kk = k.float().repeat_interleave(Hq // Hkv, 1)
    scores = (q.float() @ kk.transpose(-1, -2)) * D**-0.5
    want_lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    empty = ~mask.any(-1).expand_as(want_lse)
    assert torch.isneginf(lse[empty]).all()
    torch.testing.assert_close(lse[~empty], want_lse[~empty], rtol=1e-3, atol=2e-2)
    if empty.any():
        assert (out.float()[empty] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1, 7, 113, 127, 272])
def test_attention_random_layouts_odd_sizes(dtype, D, S):
    ll, bid = _random_layout(S, S)
    _check_attention(dtype, ll, bid, [0, 37, 300], B=3, Hq=8, Hkv=2, D=D, seed=S)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1, 1000, 4000])
@pytest.mark.parametrize("K", [1, 4, 16])
def test_attention_decode_step(dtype, prefix, K):
    ll, bid = _layout("decode", K)
    _check_attention(dtype, ll, bid, [prefix, prefix // 3], B=2, Hq=32, Hkv=8, D=128, seed=prefix + K)


@pytest.mark.parametrize("name,n", [("prefill", 113), ("prefill", 1000), ("training", 512)])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_prefill_and_training_layouts(name, n, D):
    ll, bid = _layout(name, n)
    _check_attention(torch.bfloat16, ll, bid, [0, 0], B=2, Hq=4, Hkv=4, D=D, seed=n)


def test_attention_noncontiguous_and_gqa_groups():
    ll, bid = _layout("decode", 8)
    for hq, hkv in ((8, 8), (8, 1), (12, 4)):
        _check_attention(torch.float16, ll, bid, [500, 3], B=2, Hq=hq, Hkv=hkv, D=64, seed=hq, noncontig=True)


def test_attention_long_prefix_split_kv():
    ll, bid = _layout("decode", 16)
    _check_attention(torch.bfloat16, ll, bid, [16000], B=1, Hq=32, Hkv=8, D=128, seed=1)


def test_attention_dispatch_grad_fp32_headdim():
    """auto: grad / fp32 / D=96 go to another backend; explicit cuda raises naming why."""
    ll, bid = _layout("decode", 4)
    ll, bid = ll.to(DEV), bid.to(DEV)
    S = ll.shape[0]
    q = torch.randn(1, 4, S, 64, device=DEV, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 4, S + 10, 64, device=DEV, dtype=torch.float16, requires_grad=True)
    out = tidar_attention(q, k, k, ll, bid)  # auto with grad: Triton (differentiable)
    out.float().sum().backward()
    assert q.grad is not None
    with pytest.raises(RuntimeError, match="inference only"):
        tidar_attention(q, k, k, ll, bid, backend="cuda")
    with pytest.raises(RuntimeError, match="float16/bfloat16"):
        tidar_attention(q.detach().float(), k.detach().float(), k.detach().float(), ll, bid, backend="cuda")
    q96 = torch.randn(1, 4, S, 96, device=DEV, dtype=torch.float16)
    k96 = torch.randn(1, 4, S + 10, 96, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dims 64 and 128"):
        tidar_attention(q96, k96, k96, ll, bid, backend="cuda")
    with torch.no_grad():
        got = tidar_attention(q, k, k, ll, bid, backend="cuda")
        want = tidar_attention(q, k, k, ll, bid, backend="auto")
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # under no_grad auto picks cuda


def test_attention_cuda_graph_compile_opcheck():
    ll, bid = _layout("decode", 16)
    ll, bid = ll.to(DEV), bid.to(DEV)
    S = ll.shape[0]
    seg = torch.tensor([3000], dtype=torch.int32, device=DEV)
    q = torch.randn(1, 16, S, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 4, 3000 + S, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: tidar_attention(q, k, v, ll, bid, seg, backend="cuda")  # noqa: E731
    first = fn()
    torch.testing.assert_close(fn(), first, rtol=0, atol=0)  # deterministic
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, fn(), rtol=0, atol=0)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(), fn(), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.tidar_cuda.tidar_attention.default, (q, k, v, ll, bid, seg, 128**-0.5))


# ---------------------------------------------------------------------------------------------
# Generation: greedy exactness with backend="cuda"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("K", [1, 4, 16])
def test_generate_greedy_exact_with_cuda_backend(arch, K):
    """TiDAR greedy (every op on backend="cuda": attention, kv_append, rejection) == the model's HF greedy
    decode, token for token, except at proven near-ties of the fp16 logits."""
    from conftest import tiny_model

    import tidar

    model = tiny_model(arch, vocab=97, hidden=256, heads=4, kv_heads=2, init=0.2).half().to(DEV)  # head dim 64
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (8,), generator=g)]
    NEW = 16
    want = [
        model.generate(
            torch.tensor([p], device=DEV),
            attention_mask=torch.ones(1, len(p), dtype=torch.long, device=DEV),
            do_sample=False,
            max_new_tokens=NEW,
        )
        for p in prompts
    ]
    tidar.patch(model, draft_len=K, backend="cuda")
    try:
        for p, w in zip(prompts, want):
            ids = torch.tensor([p], device=DEV)
            with torch.no_grad():
                got = tidar.generate(model, ids, max_new_tokens=NEW, backend="cuda").sequences
            assert got.shape == w.shape
            if torch.equal(got, w):
                continue
            t = next(i for i in range(len(p), w.shape[1]) if got[0, i] != w[0, i])
            with torch.no_grad():
                logits = model(w[:, :t]).logits[0, -1].double()
            a, b = logits[w[0, t]].item(), logits[got[0, t]].item()
            assert abs(a - b) / max(abs(a), abs(b), 1e-30) < 2e-2, f"diverges at {t}: {w[0, t]} vs {got[0, t]}"
    finally:
        tidar.unpatch(model)
