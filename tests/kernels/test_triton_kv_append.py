"""Triton kv_append (under TRITON_INTERPRET=1 on CPU): EXACTNESS checks, bit for bit over the whole cache.

The op tests of test_kv_append.py run on backend="triton" through the conftest ``backend`` fixture (whole cache
vs a Python-loop twin, special values, non-contiguous inputs and cache views, repeated appends, bad calls leave
the cache untouched); here: fresh random shapes that do not divide the tiles and a GPU variant at real size.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
from test_kv_append import bits, expected, rand  # noqa: E402  (the twins)

from tidar_kernels import (
    backends,  # noqa: E402
    kv_append,  # noqa: E402
)
from tidar_kernels.backends import resolve  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_backend_is_live():
    from tidar_kernels.triton import kv_append as impl

    assert resolve("kv_append", "triton", torch.device(DEV)).records == (backends.record("kv_append", "triton"),)
    assert backends._IMPLS["kv_append"]["triton"] is impl.kv_append


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("S,D", [(1, 16), (7, 32), (113, 24), (127, 64), (300, 16)])
def test_exact_random_shapes(dtype, S, D):
    """EXACT: fresh random data, per-row offsets including both ends, D not a power of two."""
    g = torch.Generator().manual_seed(S * 1000 + D)
    B, H = 3, 2
    Smax = S + 37
    seg = [0, Smax - S, int(torch.randint(0, Smax - S + 1, (1,), generator=g))]
    k_cache, v_cache = rand((B, H, Smax, D), dtype, S), rand((B, H, Smax, D), dtype, S + 1)
    k_new, v_new = rand((B, H, S, D), dtype, S + 2), rand((B, H, S, D), dtype, S + 3)
    want_k, want_v = expected(k_cache, k_new, seg), expected(v_cache, v_new, seg)
    kv_append(k_cache, v_cache, k_new, v_new, torch.tensor(seg, dtype=torch.int32), backend="triton")
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))


def test_exact_nan_payloads_fp16():
    """EXACT: every fp16 bit pattern (all NaN payloads included) survives the copy."""
    allbits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    new = allbits.view(torch.float16).reshape(1, 1, 2**14, 4)
    k_cache, v_cache = (
        torch.zeros(1, 1, 2**14 + 3, 4, dtype=torch.float16),
        torch.zeros(1, 1, 2**14 + 3, 4, dtype=torch.float16),
    )
    kv_append(k_cache, v_cache, new, new.flip(2), torch.tensor([3]), backend="triton")
    assert torch.equal(bits(k_cache[0, 0, 3:]), bits(new[0, 0]))
    assert torch.equal(bits(v_cache[0, 0, 3:]), bits(new.flip(2)[0, 0]))
    assert (bits(k_cache[0, 0, :3]) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_exact_real_size(dtype):
    """EXACT (GPU): a K=16 decode step (272 tokens) into a 32k cache, 8 KV heads, D=128, ragged offsets."""
    B, H, Smax, S, D = 4, 8, 32768, 272, 128
    k_cache = torch.randn(B, H, Smax, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(B, H, Smax, D, device="cuda", dtype=dtype)
    k_new = torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)  # strided, as from a projection
    v_new = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
    seg = torch.tensor([0, 17, 20000, Smax - S], device="cuda", dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_append(want_k, want_v, k_new, v_new, seg, backend="reference")
    kv_append(k_cache, v_cache, k_new, v_new, seg, backend="triton")
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))
