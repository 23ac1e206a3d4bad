"""The CUDA sampling and kv_append kernels (csrc/rejection_sample.cu, csrc/kv_append.cu) run on the CPU under a
fiber emulator of CUDA threads
(csrc/tests/emu/cuda_runtime.h + csrc/tests/emu_sampling.h: every thread a fiber, warp shuffles as true warp
collectives, __syncthreads for the whole block, divergence and deadlocks reported; the sampling kernels' shared
memory is race-checked, and every test asserts no race).

Both paths of the verification step run here: the one-CTA-per-row path and the vocabulary-parallel one (forced
with TIDAR_CUDA_VOCAB_PARALLEL=1 and small TIDAR_CUDA_VOCAB_CHUNK, so 1 to 38 chunks on V = 1..4500).
EXACT vs the reference given the same uniforms / seed+offset: accepted, emitted, next drafts (and next-draft
probabilities to 1e-6), greedy and temperature, beta mix, K = 1, V not a multiple of the chunk (2048) nor of the
block (512), fp16/bf16/fp32/fp64 and mixed logit dtypes, strided/expanded inputs, top-k/top-p thresholds, device
seed/offset scalars. kv_append: bit-exact over the whole cache on both paths (16-byte words, strided elements),
fp16/fp32/fp64. This is the kernel source nvcc compiles, so the logic (reductions, scans, indexing,
acceptance walk) is checked here even without a GPU; timing and hardware behaviour need the GPU tests.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tidar_kernels.reference import rejection_sample as ref

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
P = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    out = tmp_path_factory.mktemp("emu") / "libtidar_sampling_emu.so"
    cmd = [
        "g++",
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-DTIDAR_EMULATE",
        f"-I{CSRC / 'tests' / 'emu'}",
        f"-I{CSRC / 'tests'}",
        f"-I{CSRC}",
        str(CSRC / "tests" / "sampling_emu_lib.cpp"),
        str(CSRC / "tests" / "kv_append_emu.cpp"),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    so = ctypes.CDLL(str(out))
    so.emu_rejection_sample.restype = ctypes.c_int
    so.emu_draft_sample.restype = ctypes.c_int
    so.emu_kv_append.restype = ctypes.c_int
    so.emu_rejection_workspace_bytes.restype = ctypes.c_int64
    so.emu_rejection_workspace_bytes.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    so.emu_rejection_uses_vocab_parallel.restype = ctypes.c_int
    so.emu_rejection_uses_vocab_parallel.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    so.emu_sampling_races.restype = ctypes.c_long
    so.emu_race_selftest.restype = ctypes.c_long
    so.emu_philox_uniform.restype = ctypes.c_float
    so.emu_philox_uniform.argtypes = [ctypes.c_int64] * 5
    return so


@pytest.fixture(autouse=True)
def _no_shared_memory_races(request):
    """Every test: the sampling kernels' shared memory (TIDAR_SH fields) had no same-interval cross-thread access."""
    if "lib" not in request.fixturenames:
        yield
        return
    so = request.getfixturevalue("lib")
    so.emu_sampling_races()
    yield
    assert so.emu_sampling_races() == 0, "shared-memory race in a sampling kernel (details on stderr)"


def test_emulated_race_checker_is_live(lib):
    assert lib.emu_race_selftest() > 0


def _ptr(t):
    return None if t is None else P(t.data_ptr())


def _strides(t):
    return torch.tensor(t.stride(), dtype=torch.int64)


def run_rejection(
    lib, ar, blk, drafts, q, u, temperature, beta, seed=None, offset=None, thr=(None, None), device_rng=False
):
    B, K, V = ar.shape
    accepted = torch.empty(B, dtype=torch.int64)
    emitted = torch.empty(B, K, dtype=torch.int64)
    nxt = torch.empty(B, K, dtype=torch.int64)
    probs = torch.full((B, max(K - 1, 0), V), -1.0) if temperature > 0 else None
    ws_bytes = lib.emu_rejection_workspace_bytes(B, K, V)
    ws = torch.full((max(ws_bytes // 8, 1),), float("nan"), dtype=torch.float64)
    keep = [
        _strides(ar),
        _strides(blk),
        _strides(drafts),
        None if q is None else _strides(q),
        None if u is None else _strides(u),
    ]
    seed_t = torch.tensor([seed or 0], dtype=torch.int64) if device_rng else None
    off_t = torch.tensor([offset or 0], dtype=torch.int64) if device_rng else None
    rc = lib.emu_rejection_sample(
        _ptr(ar),
        CODES[ar.dtype],
        _ptr(keep[0]),
        _ptr(blk),
        CODES[blk.dtype],
        _ptr(keep[1]),
        _ptr(drafts),
        _ptr(keep[2]),
        _ptr(q),
        _ptr(keep[3]),
        _ptr(u),
        _ptr(keep[4]),
        _ptr(seed_t),
        _ptr(off_t),
        ctypes.c_int64(0 if device_rng else (seed or 0)),
        ctypes.c_int64(0 if device_rng else (offset or 0)),
        _ptr(accepted),
        _ptr(emitted),
        _ptr(nxt),
        _ptr(probs),
        _ptr(ws),
        ctypes.c_int64(ws_bytes),
        _ptr(thr[0]),
        _ptr(thr[1]),
        ctypes.c_int(B),
        ctypes.c_int(K),
        ctypes.c_int64(V),
        ctypes.c_double(temperature),
        ctypes.c_double(beta),
    )
    assert rc == 0
    return accepted, emitted, nxt, probs


def run_draft(lib, ar, blk, u, temperature, beta, seed=0, offset=0, thr=(None, None)):
    B, V = ar.shape
    K = blk.shape[1]
    nxt = torch.empty(B, K, dtype=torch.int64)
    probs = torch.full((B, K - 1, V), -1.0) if temperature > 0 else None
    keep = [_strides(ar), _strides(blk), None if u is None else _strides(u)]
    rc = lib.emu_draft_sample(
        _ptr(ar),
        CODES[ar.dtype],
        _ptr(keep[0]),
        _ptr(blk),
        CODES[blk.dtype],
        _ptr(keep[1]),
        _ptr(u),
        _ptr(keep[2]),
        ctypes.c_int64(seed),
        ctypes.c_int64(offset),
        _ptr(nxt),
        _ptr(probs),
        _ptr(thr[0]),
        _ptr(thr[1]),
        ctypes.c_int(B),
        ctypes.c_int(K),
        ctypes.c_int64(V),
        ctypes.c_double(temperature),
        ctypes.c_double(beta),
    )
    assert rc == 0
    return nxt, probs


def _step(B, K, V, T, seed, dtype=torch.float32, blk_dtype=None):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, K - 1, V, generator=g) * 1.5).softmax(-1)
    d_rest = (
        torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K - 1)
        if K > 1
        else torch.zeros(B, 0, dtype=torch.long)
    )
    drafts = torch.cat([torch.randint(0, V, (B, 1), generator=g), d_rest], 1)
    ar = torch.randn(B, K, V, generator=g) * 2
    if K > 1:
        ar[:, :-1] = q.log() * (T if T > 0 else 1.0) + 0.5 * torch.randn(B, K - 1, V, generator=g)
    blk = torch.randn(B, K, K, V, generator=g) * 2
    return ar.to(dtype), blk.to(blk_dtype or dtype), drafts, q


def _plant(ar, blk, drafts, beta, seed):
    B, K, _ = ar.shape
    t = ref.mix(ar, blk[:, :, 0], beta)
    plant = torch.rand(B, K - 1, generator=torch.Generator().manual_seed(seed)) < 0.7
    drafts = drafts.clone()
    drafts[:, 1:] = torch.where(plant, t[:, :-1].argmax(-1), drafts[:, 1:])
    return drafts


def _same(got, want):
    acc, emit, nxt, probs = got
    assert torch.equal(acc, want[0]), (acc, want[0])
    assert torch.equal(emit, want[1])
    assert torch.equal(nxt, want[2]), (nxt, want[2])
    if want[3] is None:
        assert probs is None
    else:
        torch.testing.assert_close(probs, want[3], rtol=1e-6, atol=1e-7)


CASES = [  # B, K, V, T, beta, dtype, blk_dtype
    (3, 1, 1, 0.0, 1.0, torch.float32, None),
    (3, 1, 7, 1.0, 1.0, torch.float32, None),
    (4, 2, 5, 0.0, 1.0, torch.float32, None),
    (4, 3, 5, 0.8, 1.0, torch.float32, None),
    (5, 4, 33, 0.7, 0.3, torch.float32, None),
    (3, 3, 600, 1.3, 1.0, torch.float16, None),
    (3, 3, 600, 0.9, 0.0, torch.bfloat16, None),
    (3, 3, 600, 0.0, 0.5, torch.float16, None),
    (2, 2, 2100, 1.0, 1.0, torch.float32, torch.bfloat16),  # V past one chunk of the CDF scan (2048)
    (2, 2, 700, 0.6, 0.7, torch.float64, None),
]


@pytest.mark.parametrize("B,K,V,T,beta,dtype,blk_dtype", CASES)
def test_emulated_kernel_exact_vs_reference(lib, B, K, V, T, beta, dtype, blk_dtype):
    ar, blk, drafts, q = _step(B, K, V, T, seed=B * K + V, dtype=dtype, blk_dtype=blk_dtype)
    if T == 0.0 and K > 1:
        drafts = _plant(ar, blk, drafts, beta, V)
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(V))
    qq = q if T > 0 else None  # [B, 0, V] when K = 1 (what tidar_kernels.ops passes)
    want = ref.rejection_sample(ar, blk, drafts, qq, None if T == 0 else u, T, None, None, beta)
    _same(run_rejection(lib, ar, blk, drafts, qq, None if T == 0 else u, T, beta), want)
    d_want = ref.draft_sample(ar[:, 0], blk[:, 0], None if T == 0 else u, T, None, None, beta)
    d_got = run_draft(lib, ar[:, 0].contiguous(), blk[:, 0].contiguous(), None if T == 0 else u, T, beta)
    assert torch.equal(d_got[0], d_want[0])
    if T > 0 and K > 1:
        torch.testing.assert_close(d_got[1], d_want[1], rtol=1e-6, atol=1e-7)


def test_emulated_every_acceptance_length(lib):
    B, K, V = 12, 4, 37
    ar, blk, drafts, q = _step(B, K, V, 1.0, seed=5)
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(6))
    want = ref.rejection_sample(ar, blk, drafts, q, u, 1.0, None, None, 1.0)
    _same(run_rejection(lib, ar, blk, drafts, q, u, 1.0, 1.0), want)
    assert set(want[0].tolist()) == {1, 2, 3, 4}


@pytest.mark.parametrize("device_rng", [False, True])
@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 77), (-5, 2**40)])
def test_emulated_philox_exact(lib, seed, offset, device_rng):
    B, K, V, T = 6, 3, 50, 0.9
    ar, blk, drafts, q = _step(B, K, V, T, seed=11)
    u = ref.philox_uniforms(seed, offset, B, K)
    want = ref.rejection_sample(ar, blk, drafts, q, u, T, None, None, 1.0)
    _same(run_rejection(lib, ar, blk, drafts, q, None, T, 1.0, seed=seed, offset=offset, device_rng=device_rng), want)
    got_u = torch.tensor([[lib.emu_philox_uniform(seed, offset, b, j, K) for j in range(2 * K)] for b in range(B)])
    assert torch.equal(got_u, u)


def test_emulated_strided_and_expanded(lib):
    B, K, V = 4, 3, 19
    ar0, blk0, drafts, q0 = _step(1, K, V, 0.9, seed=7)
    ar, q = ar0.expand(B, K, V), q0.expand(B, K - 1, V)
    blk = blk0.expand(B, K, K, V).transpose(1, 2).contiguous().transpose(1, 2)
    drafts = drafts.expand(B, K)
    u = torch.rand(2 * K, B).t()  # strided uniforms
    want = ref.rejection_sample(ar, blk, drafts, q, u, 0.9, None, None, 1.0)
    _same(run_rejection(lib, ar, blk, drafts, q, u, 0.9, 1.0), want)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (20, 0.9)])
def test_emulated_top_k_top_p_thresholds(lib, top_k, top_p):
    B, K, V, T, beta = 3, 3, 90, 0.9, 0.6
    ar, blk, drafts, q = _step(B, K, V, T, seed=3)
    ar = ar.round()  # ties at the boundary
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(4))
    want = ref.rejection_sample(ar, blk, drafts, q, u, T, top_k, top_p, beta)
    thr = (
        ref.filter_threshold(ref.mix(ar, blk[:, :, 0], beta) / T, top_k, top_p).contiguous(),
        ref.filter_threshold(blk.double() / T, top_k, top_p).contiguous(),
    )
    _same(run_rejection(lib, ar, blk, drafts, q, u, T, beta, thr=thr), want)
    d_want = ref.draft_sample(ar[:, 0], blk[:, 0], u, T, top_k, top_p, beta)
    dthr = (
        ref.filter_threshold(ref.mix(ar[:, 0], blk[:, 0, 0], beta) / T, top_k, top_p).contiguous(),
        ref.filter_threshold(blk[:, 0].double() / T, top_k, top_p).contiguous(),
    )
    d_got = run_draft(lib, ar[:, 0].contiguous(), blk[:, 0].contiguous(), u, T, beta, thr=dthr)
    assert torch.equal(d_got[0], d_want[0])
    torch.testing.assert_close(d_got[1], d_want[1], rtol=1e-6, atol=1e-7)


# ---- the vocabulary-parallel path (csrc/rejection_sample.cu, passes 1-4), forced with small chunks ----------------


@pytest.fixture
def vocab_parallel(lib, monkeypatch):
    """Forces the vocabulary-parallel path with `chunk` tokens per chunk (the launcher reads the environment)."""

    def force(chunk, B, K, V):
        monkeypatch.setenv("TIDAR_CUDA_VOCAB_PARALLEL", "1")
        monkeypatch.setenv("TIDAR_CUDA_VOCAB_CHUNK", str(chunk))
        assert lib.emu_rejection_uses_vocab_parallel(B, K, V) == 1
        C = -(-V // chunk)
        assert lib.emu_rejection_workspace_bytes(B, K, V) == 8 * (B * K * 4 + B * K * C * 2)

    return force


def test_emulated_path_choice(lib, monkeypatch):
    monkeypatch.delenv("TIDAR_CUDA_VOCAB_PARALLEL", raising=False)
    monkeypatch.delenv("TIDAR_CUDA_VOCAB_CHUNK", raising=False)
    assert lib.emu_rejection_uses_vocab_parallel(1, 16, 151936) == 1  # 132 emulated SMs
    assert lib.emu_rejection_uses_vocab_parallel(16, 16, 151936) == 1
    assert lib.emu_rejection_uses_vocab_parallel(64, 16, 151936) == 0  # the row path fills the GPU
    assert lib.emu_rejection_uses_vocab_parallel(1, 16, 8192) == 0  # too few chunks
    assert lib.emu_rejection_workspace_bytes(64, 16, 151936) == 64 * 16 * 4 * 8
    monkeypatch.setenv("TIDAR_CUDA_VOCAB_PARALLEL", "0")
    assert lib.emu_rejection_uses_vocab_parallel(1, 16, 151936) == 0
    monkeypatch.setenv("TIDAR_CUDA_VOCAB_PARALLEL", "1")
    assert lib.emu_rejection_uses_vocab_parallel(64, 16, 7) == 1


VP_CASES = [  # B, K, V, chunk, T, beta, dtype, blk_dtype
    (2, 1, 1, 1, 0.0, 1.0, torch.float32, None),
    (2, 3, 1, 1, 0.9, 1.0, torch.float32, None),
    (2, 3, 7, 3, 0.0, 0.5, torch.float16, None),
    (2, 3, 7, 2, 1.0, 1.0, torch.float32, None),
    (2, 2, 113, 16, 0.8, 0.3, torch.bfloat16, None),
    (1, 2, 113, 3, 0.8, 0.3, torch.bfloat16, None),  # 38 chunks: warp combines over two groups of 32
    (1, 3, 113, 3, 0.0, 0.0, torch.bfloat16, None),
    (1, 2, 1031, 100, 1.2, 0.7, torch.float16, torch.bfloat16),
    (1, 2, 4500, 2500, 0.9, 1.0, torch.float32, None),  # a chunk longer than one CDF scan step (2048)
]


@pytest.mark.parametrize("B,K,V,chunk,T,beta,dtype,blk_dtype", VP_CASES)
def test_emulated_vocab_parallel_exact(lib, vocab_parallel, B, K, V, chunk, T, beta, dtype, blk_dtype):
    vocab_parallel(chunk, B, K, V)
    ar, blk, drafts, q = _step(B, K, V, T, seed=B * K + V, dtype=dtype, blk_dtype=blk_dtype)
    if T == 0.0 and K > 1:
        drafts = _plant(ar, blk, drafts, beta, V)
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(V))
    qq = q if T > 0 else None
    want = ref.rejection_sample(ar, blk, drafts, qq, None if T == 0 else u, T, None, None, beta)
    _same(run_rejection(lib, ar, blk, drafts, qq, None if T == 0 else u, T, beta), want)


def test_emulated_vocab_parallel_greedy_ties_across_chunks(lib, vocab_parallel):
    """Integer logits: the maximum repeats in several chunks; the first index must win (torch.argmax)."""
    B, K, V = 2, 3, 50
    vocab_parallel(7, B, K, V)
    g = torch.Generator().manual_seed(1)
    ar = torch.randint(-3, 3, (B, K, V), generator=g).float()
    blk = torch.randint(-3, 3, (B, K, K, V), generator=g).float()
    drafts = _plant(ar, blk, torch.randint(0, V, (B, K), generator=g), 0.5, 2)
    want = ref.rejection_sample(ar, blk, drafts, None, None, 0.0, None, None, 0.5)
    _same(run_rejection(lib, ar, blk, drafts, None, None, 0.0, 0.5), want)


def test_emulated_vocab_parallel_every_acceptance_length(lib, vocab_parallel):
    B, K, V = 12, 4, 37
    vocab_parallel(13, B, K, V)
    ar, blk, drafts, q = _step(B, K, V, 1.0, seed=5)
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(6))
    want = ref.rejection_sample(ar, blk, drafts, q, u, 1.0, None, None, 1.0)
    _same(run_rejection(lib, ar, blk, drafts, q, u, 1.0, 1.0), want)
    assert set(want[0].tolist()) == {1, 2, 3, 4}


@pytest.mark.parametrize("device_rng", [False, True])
def test_emulated_vocab_parallel_philox(lib, vocab_parallel, device_rng):
    B, K, V, T, seed, offset = 3, 3, 50, 0.9, 1234, 2**40 + 7
    vocab_parallel(9, B, K, V)
    ar, blk, drafts, q = _step(B, K, V, T, seed=11)
    u = ref.philox_uniforms(seed, offset, B, K)
    want = ref.rejection_sample(ar, blk, drafts, q, u, T, None, None, 1.0)
    _same(run_rejection(lib, ar, blk, drafts, q, None, T, 1.0, seed=seed, offset=offset, device_rng=device_rng), want)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (20, 0.9)])
def test_emulated_vocab_parallel_top_k_top_p(lib, vocab_parallel, top_k, top_p):
    """Filtered rows leave whole chunks with nothing kept ((-inf, 0) chunk statistics)."""
    B, K, V, T, beta = 2, 3, 90, 0.9, 0.6
    vocab_parallel(8, B, K, V)
    ar, blk, drafts, q = _step(B, K, V, T, seed=3)
    ar = ar.round()  # ties at the boundary
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(4))
    want = ref.rejection_sample(ar, blk, drafts, q, u, T, top_k, top_p, beta)
    thr = (
        ref.filter_threshold(ref.mix(ar, blk[:, :, 0], beta) / T, top_k, top_p).contiguous(),
        ref.filter_threshold(blk.double() / T, top_k, top_p).contiguous(),
    )
    _same(run_rejection(lib, ar, blk, drafts, q, u, T, beta, thr=thr), want)


def test_emulated_vocab_parallel_strided(lib, vocab_parallel):
    B, K, V = 3, 3, 19
    vocab_parallel(4, B, K, V)
    ar0, blk0, drafts, q0 = _step(1, K, V, 0.9, seed=7)
    ar, q = ar0.expand(B, K, V), q0.expand(B, K - 1, V)
    blk = blk0.expand(B, K, K, V).transpose(1, 2).contiguous().transpose(1, 2)
    drafts = drafts.expand(B, K)
    u = torch.rand(2 * K, B).t()
    want = ref.rejection_sample(ar, blk, drafts, q, u, 0.9, None, None, 1.0)
    _same(run_rejection(lib, ar, blk, drafts, q, u, 0.9, 1.0), want)


def test_emulated_vocab_parallel_zero_residual_falls_back_to_p(lib, vocab_parallel):
    """q_a == p_a exactly (float32-representable p): the residual has no mass and the correction samples p_a."""
    B, K, V = 2, 2, 16
    vocab_parallel(5, B, K, V)
    ar = torch.zeros(B, K, V)
    ar[:, :, 4:] = float("-inf")  # p = exactly 1/4 on tokens 0..3
    blk = torch.randn(B, K, K, V, generator=torch.Generator().manual_seed(0))
    q = torch.zeros(B, K - 1, V)
    q[:, :, :4] = 0.25
    drafts = torch.tensor([[0, 5], [1, 6]])  # d_1 has p = 0: rejected
    u = torch.rand(B, 2 * K, generator=torch.Generator().manual_seed(2))
    want = ref.rejection_sample(ar, blk, drafts, q, u, 1.0, None, None, 1.0)
    assert want[0].tolist() == [1, 1]
    _same(run_rejection(lib, ar, blk, drafts, q, u, 1.0, 1.0), want)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_kv_append(lib, kc, vc, kn, vn, segs):
    B, H, Smax, D = kc.shape
    S = kn.shape[2]
    seg = torch.tensor(segs, dtype=torch.int32)
    st = [_strides(t) for t in (kc, vc, kn, vn)]
    rc = lib.emu_kv_append(
        _ptr(kc),
        _ptr(vc),
        _ptr(kn),
        _ptr(vn),
        _ptr(seg),
        *(_ptr(x) for x in st),
        *(ctypes.c_int64(x) for x in (B, H, S, D, Smax)),
        ctypes.c_int(kc.element_size()),
    )
    assert rc == 0


@pytest.mark.parametrize(
    "dtype,D,strided",
    [(torch.float16, 16, False), (torch.float16, 16, True), (torch.float32, 7, False), (torch.float64, 4, True)],
)
def test_emulated_kv_append_whole_cache_bit_exact(lib, dtype, D, strided):
    """16-byte path (D * size % 16 == 0, contiguous) and the element path (odd D, strided new K/V)."""
    B, H, Smax, S = 2, 3, 11, 4
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
    g = torch.Generator().manual_seed(D)

    def rnd(*shape):
        return torch.randint(-1000, 1000, shape, generator=g, dtype=it).view(dtype)

    kc, vc = rnd(B, H, Smax, D), rnd(B, H, Smax, D)
    if strided:
        kn, vn = rnd(B, H, D, S).transpose(2, 3), rnd(B, S, H, D).transpose(1, 2)
    else:
        kn, vn = rnd(B, H, S, D), rnd(B, H, S, D)
    segs = [Smax - S, 2]
    want_k, want_v = kc.clone(), vc.clone()
    for b, s0 in enumerate(segs):
        want_k[b, :, s0 : s0 + S] = kn[b]
        want_v[b, :, s0 : s0 + S] = vn[b]
    run_kv_append(lib, kc, vc, kn, vn, segs)
    assert torch.equal(_bits(kc), _bits(want_k)) and torch.equal(_bits(vc), _bits(want_v))
