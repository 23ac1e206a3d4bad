"""The compiled CUDA extension on a CPU machine (CI compiles it; nothing it built can run here).

- The loader's verdict matches reality: built <=> ``import tidar_kernels._C`` works <=> no recorded error;
  when it is missing, the reason says why (not built / ABI mismatch / archs).
- Every CUDA op called on CPU tensors raises a clear error naming the argument and the device, both through the
  public API (``backend="cuda"``) and straight through ``torch.ops.tidar_cuda``.
- The Philox stream of the kernels (host copy compiled from the same source) equals the reference's
  ``philox_uniforms`` bit for bit.
- ``supports`` predicates: ``auto`` falls through, an explicit backend raises naming why; capability flags.
- Fake impls: the ops trace under FakeTensorMode with the right output shapes (torch.compile's view of them).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tidar_kernels
from tidar_kernels import _loaders, backends

BUILT = importlib.util.find_spec("tidar_kernels._C") is not None


@pytest.fixture
def ext():
    """Skip unless the extension loads. Checked at run time, never at collection: loading the backends imports
    triton, which must not happen before the Triton test modules set TRITON_INTERPRET=1."""
    err = _loaders.load_error("cuda")
    if err is not None:
        pytest.skip(f"CUDA extension not usable here: {err}")


needs_ext = pytest.mark.usefixtures("ext")


def test_loader_verdict_matches_importability():
    err = _loaders.load_error("cuda")
    if torch.version.cuda is None:  # a CPU-only torch: the reason says so, built or not
        assert err is not None and "CPU-only build" in err
        return
    if not BUILT:
        assert err is not None and "not built" in err
        return
    if torch.cuda.is_available():  # arch/ABI problems show up only with a GPU or a torch mismatch
        return
    assert err is None, err
    import tidar_kernels._C as C  # noqa: F401

    assert hasattr(torch.ops.tidar_cuda, "kv_append")


@needs_ext
def test_build_info_recorded():
    from tidar_kernels import cuda

    info = cuda.build_info()
    assert info["extension"] is True
    assert info["cuda_version"] and info["torch_version"] and info["archs"]
    assert set(info["sources"]) <= {"kv_append.cu", "rejection_sample.cu", "tidar_attention.cu"}
    assert cuda.HAS_ATTENTION == ("tidar_attention.cu" in info["sources"])


def test_arch_coverage_rule():
    from tidar_kernels._cuda_archs import arch_covers

    assert arch_covers(["sm_90a"], (9, 0)) and not arch_covers(["sm_90a"], (10, 0))
    assert arch_covers(["sm_90a", "compute_90"], (10, 0))  # PTX JITs forward
    assert not arch_covers(["compute_90"], (8, 0))
    assert arch_covers(["sm_80"], (8, 6)) and not arch_covers(["sm_86"], (8, 0))
    assert not arch_covers(["compute_90a"], (10, 0))


# ---------------------------------------------------------------------------------------------
# CPU tensors: clear errors, before anything runs
# ---------------------------------------------------------------------------------------------


def _kv_args():
    k = torch.zeros(2, 2, 8, 16)
    return k, k.clone(), torch.ones(2, 2, 3, 16), torch.ones(2, 2, 3, 16)


def _rs_args(B=2, K=3, V=11):
    ar = torch.randn(B, K, V)
    blk = torch.randn(B, K, K, V)
    drafts = torch.zeros(B, K, dtype=torch.long)
    return ar, blk, drafts


@needs_ext
def test_public_api_backend_cuda_on_cpu_tensors_names_the_device():
    k, v, kn, vn = _kv_args()
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors, got cpu"):
        tidar_kernels.kv_append(k, v, kn, vn, 0, backend="cuda")
    assert torch.count_nonzero(k) == 0  # untouched
    ar, blk, drafts = _rs_args()
    with pytest.raises(RuntimeError, match="CUDA tensors, got cpu"):
        tidar_kernels.rejection_sample(ar, blk, drafts, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors, got cpu"):
        tidar_kernels.draft_sample(ar[:, 0], blk[:, 0], backend="cuda")
    q = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    ll, bid = torch.arange(1, 5, dtype=torch.int32), torch.full((4,), -1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="CUDA tensors, got cpu"):
        tidar_kernels.tidar_attention(q, q, q, ll, bid, backend="cuda")


@needs_ext
def test_raw_ops_on_cpu_tensors_name_argument_and_device():
    ops = torch.ops.tidar_cuda
    k, v, kn, vn = _kv_args()
    seg = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"kv_append: k_cache must be a CUDA tensor, got a tensor on cpu"):
        ops.kv_append(k, v, kn, vn, seg)
    assert torch.count_nonzero(k) == 0
    ar, blk, drafts = _rs_args()
    with pytest.raises(RuntimeError, match=r"rejection_sample: ar_logits must be a CUDA tensor.*cpu"):
        ops.rejection_sample(ar, blk, drafts, None, None, None, None, 0, 0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"draft_sample: ar_logits must be a CUDA tensor.*cpu"):
        ops.draft_sample(ar[:, 0], blk[:, 0], None, None, None, 0, 0, 0.0, 1.0)
    q = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    ll, bid = torch.arange(1, 5, dtype=torch.int32), torch.full((4,), -1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"tidar_attention: q must be a CUDA tensor.*cpu"):
        ops.tidar_attention(q, q, q, ll, bid, torch.zeros(1, dtype=torch.int32), 0.125)


@needs_ext
def test_env_reports_the_extension():
    from tidar_kernels import env

    d = env.report()
    assert d["cuda_extension_built"] is True and d["cuda_extension_error"] is None
    assert d["build"]["archs"]
    want = ["reference"] + (["triton", "cuda"] if torch.cuda.is_available() else [])
    assert all(b in d["backends"]["kv_append"] for b in want)


# ---------------------------------------------------------------------------------------------
# Philox: the kernels' stream vs the reference
# ---------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 7), (-1, 2**40 + 3), (2**62 + 5, 2**64 - 5), (-(2**63), 1)])
def test_philox_matches_reference(seed, offset):
    from tidar_kernels import cuda
    from tidar_kernels.reference.rejection_sample import philox_uniforms

    B, K = 3, 4
    want = philox_uniforms(seed, offset - 2**64 if offset >= 2**63 else offset, B, K)
    off = offset - 2**64 if offset >= 2**63 else offset  # int64 bits, as the op's schema takes them
    got = torch.tensor(
        [[cuda.philox_uniform(seed, off, b, j, K) for j in range(2 * K)] for b in range(B)], dtype=torch.float32
    )
    assert torch.equal(got, want)
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


# ---------------------------------------------------------------------------------------------
# supports(): auto falls through, explicit raises naming why; capability flags
# ---------------------------------------------------------------------------------------------


def test_supports_predicate_dispatch():
    op = "_test_supports_op"
    calls = []

    def ref(x):
        calls.append("reference")
        return "reference"

    def fast(x):
        calls.append("cuda")
        return "cuda"

    fast.only_fast = True  # an attribute of a function is no capability: only the records are
    try:
        backends.register(op, "reference", philox=True)(ref)
        backends.register(op, "cuda", supports=lambda x: None if x > 0 else f"x must be > 0, got {x}", philox=True)(
            fast
        )
        dev = torch.device("cuda")  # dispatch looks at the device type only; nothing runs on it
        auto = backends.resolve(op, "auto", dev)
        assert auto(1) == "cuda" and auto(-1) == "reference"
        assert auto.philox is True and not hasattr(auto, "only_fast")
        explicit = backends.resolve(op, "cuda", dev)
        assert explicit(2) == "cuda"
        with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run _test_supports_op.*x must be > 0, got -3"):
            explicit(-3)
    finally:
        backends._IMPLS.pop(op, None)
        for name in ("reference", "cuda"):
            backends._RECORDS.pop((op, name), None)


@needs_ext
def test_cuda_supports_predicates_name_the_reason():
    from tidar_kernels import cuda

    q = torch.zeros(1, 2, 3, 64, dtype=torch.float16)
    ll = torch.ones(3, dtype=torch.int32)
    assert cuda._attention_supports(q, q, q, ll, ll, ll, 1.0) is None
    assert "float16/bfloat16" in cuda._attention_supports(q.float(), q.float(), q.float(), ll, ll, ll, 1.0)
    q96 = torch.zeros(1, 2, 3, 96, dtype=torch.float16)
    assert "head dims 64 and 128, got 96" in cuda._attention_supports(q96, q96, q96, ll, ll, ll, 1.0)
    qg = q.clone().requires_grad_()
    assert "inference only" in cuda._attention_supports(qg, q, q, ll, ll, ll, 1.0)
    with torch.no_grad():
        assert cuda._attention_supports(qg, q, q, ll, ll, ll, 1.0) is None


@needs_ext
def test_attention_layout_copies_only_when_needed():
    from tidar_kernels import cuda

    x = torch.zeros(2, 3, 5, 64)
    assert cuda._attention_layout(x) is x
    assert cuda._attention_layout(x.transpose(1, 2)) is not None  # strides multiple of 8: kept as a view
    y = x[..., ::2]  # last stride 2
    assert cuda._attention_layout(y).is_contiguous()
    z = torch.zeros(2 * 3 * 5 * 64 + 3)[3:].view(2, 3, 5, 64)  # misaligned offset
    assert cuda._attention_layout(z).storage_offset() == 0


# ---------------------------------------------------------------------------------------------
# Fake impls (torch.compile): shapes under FakeTensorMode, on "cuda" fake tensors
# ---------------------------------------------------------------------------------------------


@needs_ext
def test_fake_impls_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.tidar_cuda
    with FakeTensorMode():
        B, K, V = 2, 4, 37
        ar = torch.empty(B, K, V, device="cuda")
        blk = torch.empty(B, K, K, V, device="cuda", dtype=torch.bfloat16)
        drafts = torch.empty(B, K, device="cuda", dtype=torch.long)
        q = torch.empty(B, K - 1, V, device="cuda")
        acc, emit, nxt, probs = ops.rejection_sample(
            ar,
            blk,
            drafts,
            q,
            None,
            None,
            None,
            0,
            0,
            0.7,
            1.0,
            torch.empty(B, K, device="cuda", dtype=torch.float64),
            None,
        )
        assert acc.shape == (B,) and emit.shape == (B, K) and nxt.shape == (B, K) and probs.shape == (B, K - 1, V)
        assert acc.dtype == torch.int64 and probs.dtype == torch.float32
        nxt, probs = ops.draft_sample(ar[:, 0], blk[:, 0], None, None, None, 0, 0, 0.0, 1.0)
        assert nxt.shape == (B, K) and probs.shape == (0,)
        qq = torch.empty(B, 8, 5, 128, device="cuda", dtype=torch.float16)
        kk = torch.empty(B, 2, 40, 128, device="cuda", dtype=torch.float16)
        i32 = dict(device="cuda", dtype=torch.int32)
        out, lse = ops.tidar_attention(
            qq, kk, kk, torch.empty(5, **i32), torch.empty(5, **i32), torch.empty(B, **i32), 0.1
        )
        assert out.shape == qq.shape and out.dtype == torch.float16 and lse.shape == (B, 8, 5)
        kc = torch.empty(B, 2, 50, 128, device="cuda", dtype=torch.float16)
        assert ops.kv_append(kc, kc, kk, kk, torch.empty(B, **i32)) is None


def test_extension_is_built_wherever_it_can_be():
    """CI's install must really compile the extension: with nvcc on PATH, a CUDA build of torch and no opt-out,
    a missing ``_C`` is a build failure (setup.py falls back to pure Python with a warning), not a skip."""
    import os
    import shutil

    if os.environ.get("TIDAR_SKIP_CUDA_BUILD") == "1" or not shutil.which("nvcc") or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit or no CUDA build of torch here: the pure-Python wheel is expected")
    from tidar_kernels import env

    report = env.report()
    assert BUILT and report["cuda_extension_built"], f"extension not built: {report.get('cuda_extension_error')}"
