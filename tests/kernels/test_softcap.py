"""Attention logit soft-capping (``softcap``, Gemma2's ``attn_logit_softcapping``) in ``tidar_attention``:

- the reference equals transformers' own Gemma2 eager attention (scale, then ``softcap * tanh(x / softcap)``,
  then the mask, then softmax) given the dense twin of the layout as its additive mask;
- the Triton kernels (interpreter on CPU; compiled on a GPU) equal the fp64 reference: forward with odd sizes,
  GQA, ragged seg_start, forced split-KV; backward (dQ/dK/dV, through the tanh) vs autograd of the reference;
  fp32 and fp16 (bf16 only on a GPU: the interpreter's bf16 dot is broken);
- a cap so large that tanh is linear gives the uncapped attention; a small cap changes the output (tests can fail).
The CUDA kernel's soft-capping runs under the CPU emulator (tests/kernels/test_cuda_attention_emu.py).
Fresh random inputs per case.
"""

from __future__ import annotations

import os
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402

from tidar_kernels import dense_mask, layouts, tidar_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _seg(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEV)


def _inputs(B, Hq, Hkv, S, Skv, D, dtype, gen, spread=3.0):
    """q/k/v with scores spread wide enough (about +-``spread`` * sqrt(D) before the scale) that a small cap bends."""
    q = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(B, Hkv, Skv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Skv, D, generator=gen, dtype=torch.float64)
    return (t.to(device=DEV, dtype=dtype) for t in (q, k, v))


def _ref(q, k, v, ll, bid, seg_start, scale, softcap):
    return tidar_attention(q.double(), k.double(), v.double(), ll, bid, seg_start, scale, softcap, backend="reference")


def _lay(lay):
    return lay.local_limit.to(DEV), lay.block_id.to(DEV)


# ---------------------------------------------------------------------------------------------
# The reference vs transformers' Gemma2 eager attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [0.5, 7.0, 50.0])
@pytest.mark.parametrize("lay_name", ["decode_K3", "prefill_n9_K4", "training_L6_K2"])
def test_reference_equals_transformers_gemma2_eager(lay_name, softcap):
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    lay = {
        "decode_K3": layouts.decode_step(3),
        "prefill_n9_K4": layouts.prefill(9, 4),
        "training_L6_K2": layouts.training(6, 2),
    }[lay_name]
    S = lay.seg_len
    seg_start = torch.tensor([5, 0], dtype=torch.int32)
    Skv = 5 + S + 2
    g = torch.Generator().manual_seed(int(softcap * 10) + S)
    q, k, v = (t.cpu() for t in _inputs(2, 4, 2, S, Skv, 8, torch.float64, g))
    mask = dense_mask(lay.local_limit, lay.block_id, seg_start, Skv)  # [B, S, Skv]
    keep = mask.any(-1)  # HF cannot express a query that sees nothing; the training layout's first masks do
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))[:, None]
    module = types.SimpleNamespace(num_key_value_groups=2, training=False)
    want, _ = gemma2.eager_attention_forward(
        module, q, k, v, additive.masked_fill(~keep[:, None, :, None], 0.0), dropout=0.0, scaling=0.4, softcap=softcap
    )
    got = tidar_attention(q, k, v, lay.local_limit, lay.block_id, seg_start, 0.4, softcap, backend="reference")
    # HF takes the softmax in float32 whatever the input dtype: agreement to float32 rounding
    torch.testing.assert_close(got.transpose(1, 2)[keep], want[keep], rtol=1e-6, atol=1e-6)
    assert (got.transpose(1, 2)[~keep] == 0).all()


def test_small_cap_changes_the_output_and_a_huge_cap_does_not():
    lay = layouts.decode_step(2)
    S = lay.seg_len
    g = torch.Generator().manual_seed(1)
    q, k, v = (t.cpu() for t in _inputs(1, 2, 1, S, S + 7, 16, torch.float64, g))
    args = (q, k, v, lay.local_limit, lay.block_id, None, 0.25)
    plain = tidar_attention(*args, backend="reference")
    capped = tidar_attention(*args, 1.0, backend="reference")
    assert (capped - plain).abs().max() > 0.1
    torch.testing.assert_close(tidar_attention(*args, 1e7, backend="reference"), plain, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Triton vs the fp64 reference
# ---------------------------------------------------------------------------------------------

FWD_CASES = [  # (name, layout, B, Hq, Hkv, seg_start, extra keys, D, softcap)
    ("decode_K3_gqa2_ragged", layouts.decode_step(3), 2, 4, 2, (37, 4), 3, 16, 1.3),
    ("prefill_n23_K5_D24", layouts.prefill(23, 5), 1, 3, 3, (0,), 0, 24, 30.0),
    ("training_L9_K4_gqa3", layouts.training(9, 4), 1, 3, 1, (0,), 0, 8, 5.0),
    ("causal_S1_long_prefix", layouts.causal(1), 2, 2, 1, (70, 11), 2, 32, 0.7),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_triton_forward(case, dtype):
    _, lay, B, Hq, Hkv, segs, extra, D, softcap = case
    ll, bid = _lay(lay)
    S = lay.seg_len
    seg_start = _seg(*segs)
    g = torch.Generator().manual_seed(S * 7 + D)
    q, k, v = _inputs(B, Hq, Hkv, S, max(segs) + S + extra, D, dtype, g)
    got = tidar_attention(q, k, v, ll, bid, seg_start, 0.3, softcap, backend="triton")
    want = _ref(q, k, v, ll, bid, seg_start, 0.3, softcap)
    assert (want - _ref(q, k, v, ll, bid, seg_start, 0.3, None)).abs().max() > 1e-2, "the cap must matter here"
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_split_kv(num_splits):
    from tidar_kernels.triton import tidar_attention as tri

    lay = layouts.decode_step(2)
    ll, bid = _lay(lay)
    S = lay.seg_len
    seg_start = _seg(80, 9)
    g = torch.Generator().manual_seed(num_splits)
    q, k, v = _inputs(2, 2, 1, S, 80 + S + 3, 16, torch.float32, g)
    out, lse = tri.attention_with_lse(q, k, v, ll, bid, seg_start, 0.3, num_splits=num_splits, softcap=2.0)
    want = _ref(q, k, v, ll, bid, seg_start, 0.3, 2.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # the LSE is over the capped scores: log-sum-exp of softcap * tanh(scale * q.k / softcap) over visible keys
    mask = dense_mask(ll, bid, seg_start, k.shape[2])[:, None]
    kk = k.double().repeat_interleave(2, 1)
    x = 2.0 * torch.tanh(0.3 * q.double() @ kk.transpose(-1, -2) / 2.0)
    torch.testing.assert_close(lse.double(), x.masked_fill(~mask, float("-inf")).logsumexp(-1), rtol=1e-5, atol=1e-5)


BWD_CASES = [  # (name, layout, B, Hq, Hkv, seg_start, extra keys, D, softcap)
    ("training_L10_K3_gqa2", layouts.training(10, 3), 1, 4, 2, (0,), 0, 16, 1.5),
    ("decode_K2_ragged_D24", layouts.decode_step(2), 2, 2, 1, (19, 0), 2, 24, 4.0),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_triton_backward_matches_autograd_of_the_reference(case):
    _, lay, B, Hq, Hkv, segs, extra, D, softcap = case
    ll, bid = _lay(lay)
    S = lay.seg_len
    seg_start = _seg(*segs)
    g = torch.Generator().manual_seed(S + D)
    q, k, v = _inputs(B, Hq, Hkv, S, max(segs) + S + extra, D, torch.float32, g)
    do = torch.randn(B, Hq, S, D, generator=g).to(DEV)
    grads = {}
    for name, dtype, backend in (
        ("triton", torch.float32, "triton"),
        ("ref", torch.float64, "reference"),
        ("ref_nocap", torch.float64, "reference"),
    ):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        cap = None if name == "ref_nocap" else softcap
        out = tidar_attention(qq, kk, vv, ll, bid, seg_start, 0.35, cap, backend=backend)
        out.backward(do.to(dtype))
        grads[name] = (qq.grad, kk.grad, vv.grad)
    for got, want, nocap, what in zip(grads["triton"], grads["ref"], grads["ref_nocap"], ("dq", "dk", "dv")):
        assert (want - nocap).abs().max() > 1e-2, f"{what}: the cap must matter here"
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=what)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton dots need a GPU (interpreter bf16 is broken)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bf16_fwd_bwd(dtype):  # pragma: no cover - GPU only
    lay = layouts.training(64, 16)
    ll, bid = _lay(lay)
    S = lay.seg_len
    g = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 8, 2, S, S, 64, dtype, g, spread=1.0)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    out = tidar_attention(qq, kk, vv, ll, bid, None, None, 20.0, backend="triton")
    do = torch.randn_like(out)
    out.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = tidar_attention(q64, k64, v64, ll, bid, None, None, 20.0, backend="reference")
    want.backward(do.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, ref in ((qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=5 * tol, atol=5 * tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs the CUDA extension on a GPU")
def test_gpu_cuda_backend_softcap():  # pragma: no cover - GPU only
    from tidar_kernels.backends import live_backends

    if "cuda" not in live_backends("cuda").get("tidar_attention", []):
        pytest.skip("the CUDA attention is not built")
    lay = layouts.decode_step(4)
    ll, bid = _lay(lay)
    S = lay.seg_len
    g = torch.Generator().manual_seed(4)
    q, k, v = _inputs(2, 8, 2, S, 300 + S, 128, torch.bfloat16, g, spread=1.0)
    got = tidar_attention(q, k, v, ll, bid, _seg(300, 0), None, 3.0, backend="cuda")
    want = _ref(q, k, v, ll, bid, _seg(300, 0), None, 3.0)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
