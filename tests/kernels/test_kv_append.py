"""kv_append: bit-exact over the whole cache (no stray writes), per-row offsets, non-contiguous inputs,
every float dtype; overflow and bad calls raise and leave the cache bit-identical."""

from __future__ import annotations

import pytest
import torch

from tidar_kernels import kv_append

OP = "kv_append"  # the `backend` fixture (conftest) runs each test on every live implementation of it
pytestmark = pytest.mark.triton_interpreter  # every test here also runs on Triton under the interpreter

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def rand(shape, dtype, seed):
    """Random data with all bits meaningful (no zeros), so any stray write or lost bit shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def expected(cache: torch.Tensor, new: torch.Tensor, seg_start: list[int]) -> torch.Tensor:
    """Python-loop twin: copy row b's segment into [seg_start[b], seg_start[b] + S) of a clone."""
    out = cache.clone()
    S = new.shape[2]
    for b, s0 in enumerate(seg_start):
        for s in range(S):
            out[b, :, s0 + s, :] = new[b, :, s, :]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so equality is bit equality (also for -0.0 and NaN payloads)."""
    return t.view(
        {
            torch.float16: torch.int16,
            torch.bfloat16: torch.int16,
            torch.float32: torch.int32,
            torch.float64: torch.int64,
        }[t.dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,H,Smax,D,S,seg_start",
    [
        (1, 1, 8, 4, 3, [0]),
        (3, 2, 40, 16, 7, [0, 13, 33]),  # last row ends exactly at Smax
        (4, 4, 300, 8, 272, [0, 28, 1, 5]),  # a K=16 decode step
        (2, 3, 17, 5, 1, [16, 9]),  # one token, at the very end
        (2, 2, 9, 4, 9, [0, 0]),  # the segment fills the cache
    ],
)
def test_whole_cache_bit_exact(backend, device, dtype, B, H, Smax, D, S, seg_start):
    k_cache, v_cache = rand((B, H, Smax, D), dtype, 1), rand((B, H, Smax, D), dtype, 2)
    k_new, v_new = rand((B, H, S, D), dtype, 3), rand((B, H, S, D), dtype, 4)
    want_k, want_v = expected(k_cache, k_new, seg_start), expected(v_cache, v_new, seg_start)
    k_cache, v_cache, k_new, v_new = (t.to(device) for t in (k_cache, v_cache, k_new, v_new))
    k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()
    seg = torch.tensor(seg_start, dtype=torch.int32, device=device)
    ret = kv_append(k_cache, v_cache, k_new, v_new, seg, backend=backend)
    assert ret[0] is k_cache and ret[1] is v_cache, "returns the caches it wrote in place"
    assert k_cache.data_ptr() == k_ptr and v_cache.data_ptr() == v_ptr
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))
    # and the untouched regions really are untouched: compare against a second copy of the original
    orig_k = rand((B, H, Smax, D), dtype, 1)
    for b, s0 in enumerate(seg_start):
        assert torch.equal(bits(k_cache[b, :, :s0]), bits(orig_k[b, :, :s0]))
        assert torch.equal(bits(k_cache[b, :, s0 + S :]), bits(orig_k[b, :, s0 + S :]))


def test_special_values_copied_bit_for_bit(backend, device):
    """-0.0, inf, NaN with a payload, subnormals: a copy, not arithmetic."""
    k_cache = rand((1, 1, 6, 4), torch.float32, 5)
    v_cache = rand((1, 1, 6, 4), torch.float32, 6)
    # -0.0, +inf, NaN with payload 0x1234, smallest subnormal
    raw = torch.tensor([[-(2**31), 0x7F800000, 0x7FC01234, 0x00000001]], dtype=torch.int32)
    flipped = raw ^ torch.tensor(-(2**31), dtype=torch.int32)  # sign bit flipped: +0.0, -inf, -NaN, -subnormal
    k_new = raw.view(torch.float32).reshape(1, 1, 1, 4).clone()
    v_new = flipped.view(torch.float32).reshape(1, 1, 1, 4).clone()
    k_cache, v_cache, k_new, v_new = (t.to(device) for t in (k_cache, v_cache, k_new, v_new))
    kv_append(k_cache, v_cache, k_new, v_new, torch.tensor([2], device=device), backend=backend)
    assert torch.equal(bits(k_cache[0, 0, 2]).cpu(), raw[0])
    assert torch.equal(bits(v_cache[0, 0, 2]).cpu(), flipped[0])


def test_noncontiguous_new_and_int_seg_start_and_int64_offsets(backend, device):
    B, H, Smax, D, S = 3, 4, 30, 8, 5
    k_cache, v_cache = rand((B, H, Smax, D), torch.bfloat16, 7), rand((B, H, Smax, D), torch.bfloat16, 8)
    k_src = rand((B, S, H, D), torch.bfloat16, 9)
    v_src = rand((B, H, S, 2 * D), torch.bfloat16, 10)
    k_cache, v_cache, k_src, v_src = (t.to(device) for t in (k_cache, v_cache, k_src, v_src))
    k_new = k_src.transpose(1, 2)  # [B, H, S, D], strided
    v_new = v_src[..., ::2]  # [B, H, S, D], strided last dim
    assert not k_new.is_contiguous() and not v_new.is_contiguous()
    want_k, want_v = expected(k_cache, k_new, [11] * B), expected(v_cache, v_new, [11] * B)
    kv_append(k_cache, v_cache, k_new, v_new, 11, backend=backend)
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))
    # int64 per-row offsets
    offs = [0, 25, 3]
    want_k, want_v = expected(k_cache, k_new, offs), expected(v_cache, v_new, offs)
    kv_append(k_cache, v_cache, k_new, v_new, torch.tensor(offs, dtype=torch.int64, device=device), backend=backend)
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))


def test_noncontiguous_cache_view(backend, device):
    """A cache that is a strided view (e.g. one layer of a [L, B, H, Smax, D] buffer seen as [B, H, Smax, D]
    with another axis order) is written through the view; the rest of the buffer is untouched."""
    buf_k = rand((2, 3, 20, 2, 4), torch.float16, 11).to(device)  # [layer, B, Smax, H, D]
    buf_v = rand((2, 3, 20, 2, 4), torch.float16, 12).to(device)
    orig_k, orig_v = buf_k.clone(), buf_v.clone()
    k_cache, v_cache = buf_k[1].transpose(1, 2), buf_v[1].transpose(1, 2)  # [B, H, Smax, D] views
    k_new = rand((3, 2, 4, 4), torch.float16, 13).to(device)
    v_new = rand((3, 2, 4, 4), torch.float16, 14).to(device)
    offs = [0, 16, 7]
    want_k, want_v = expected(k_cache, k_new, offs), expected(v_cache, v_new, offs)
    kv_append(k_cache, v_cache, k_new, v_new, torch.tensor(offs, device=device), backend=backend)
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))
    assert torch.equal(bits(buf_k[0]), bits(orig_k[0])) and torch.equal(bits(buf_v[0]), bits(orig_v[0]))


def test_repeated_appends_build_the_sequence(backend, device):
    """Appending step after step at moving offsets (commit = move the length) lays the tokens end to end."""
    B, H, D, Smax = 2, 2, 4, 64
    k_cache, v_cache = torch.zeros(B, H, Smax, D, device=device), torch.zeros(B, H, Smax, D, device=device)
    full_k = rand((B, H, 40, D), torch.float32, 15).to(device)
    full_v = rand((B, H, 40, D), torch.float32, 16).to(device)
    lengths = [0, 0]
    for a0, a1 in [(3, 1), (2, 4), (5, 5), (1, 2)]:
        S = 6
        seg = torch.tensor(lengths, device=device)
        k_new = torch.stack([full_k[b, :, lengths[b] : lengths[b] + S] for b in range(B)])
        v_new = torch.stack([full_v[b, :, lengths[b] : lengths[b] + S] for b in range(B)])
        kv_append(k_cache, v_cache, k_new, v_new, seg, backend=backend)
        lengths = [lengths[0] + a0, lengths[1] + a1]
    for b in range(B):
        n = lengths[b]
        assert torch.equal(k_cache[b, :, :n], full_k[b, :, :n]) and torch.equal(v_cache[b, :, :n], full_v[b, :, :n])


# ---------------------------------------------------------------------------------------------
# Errors leave the cache bit-identical
# ---------------------------------------------------------------------------------------------


def _good():
    return dict(
        k_cache=rand((2, 2, 10, 4), torch.float16, 20),
        v_cache=rand((2, 2, 10, 4), torch.float16, 21),
        k_new=rand((2, 2, 3, 4), torch.float16, 22),
        v_new=rand((2, 2, 3, 4), torch.float16, 23),
        seg_start=torch.tensor([0, 7], dtype=torch.int32),
    )


F16 = torch.float16
BAD_CALLS = [
    ("overflow_one_row", dict(seg_start=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "overflow"),
    ("overflow_int", dict(seg_start=8), ValueError, "overflow"),
    (
        "overflow_segment_longer_than_cache",
        dict(k_new=rand((2, 2, 11, 4), F16, 0), v_new=rand((2, 2, 11, 4), F16, 1), seg_start=0),
        ValueError,
        "overflow",
    ),
    ("negative_seg_start", dict(seg_start=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, "seg_start"),
    ("negative_int_seg_start", dict(seg_start=-2), ValueError, "seg_start"),
    ("seg_start_wrong_length", dict(seg_start=torch.tensor([0, 1, 2])), ValueError, "seg_start"),
    ("seg_start_float", dict(seg_start=torch.tensor([0.0, 1.0])), TypeError, "seg_start"),
    ("seg_start_2d", dict(seg_start=torch.tensor([[0, 1]])), ValueError, "seg_start"),
    ("k_new_dtype", dict(k_new=rand((2, 2, 3, 4), torch.float32, 0)), TypeError, "k_new"),
    ("v_new_dtype", dict(v_new=rand((2, 2, 3, 4), torch.bfloat16, 0)), TypeError, "v_new"),
    ("k_new_heads", dict(k_new=rand((2, 1, 3, 4), F16, 0)), ValueError, "k_new"),
    ("k_new_batch", dict(k_new=rand((3, 2, 3, 4), F16, 0)), ValueError, "k_new"),
    ("v_new_len", dict(v_new=rand((2, 2, 2, 4), F16, 0)), ValueError, "v_new"),
    ("v_new_head_dim", dict(v_new=rand((2, 2, 3, 5), F16, 0)), ValueError, "v_new"),
    ("k_new_3d", dict(k_new=rand((2, 3, 4), F16, 0)), ValueError, "k_new"),
    ("v_cache_dtype", dict(v_cache=rand((2, 2, 10, 4), torch.float32, 0)), TypeError, "v_cache"),
    ("v_cache_shape", dict(v_cache=rand((2, 2, 9, 4), F16, 0)), ValueError, "v_cache"),
    ("int_cache", dict(k_cache=torch.zeros(2, 2, 10, 4, dtype=torch.int16)), TypeError, "k_cache"),
    ("k_new_not_tensor", dict(k_new=[[0.0]]), TypeError, "k_new"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_and_leave_cache_untouched(backend, name, override, exc, match):
    args = _good()
    args.update(override)
    before = {n: t.clone() for n, t in args.items() if torch.is_tensor(t)}
    with pytest.raises(exc, match=match):
        kv_append(**args, backend=backend)
    for n, t in before.items():
        assert torch.equal(
            bits(args[n]) if t.is_floating_point() else args[n], bits(t) if t.is_floating_point() else t
        ), f"{n} changed by a failed call"


def test_good_call_of_bad_call_table_runs(backend):
    args = _good()
    want = expected(args["k_cache"], args["k_new"], [0, 7])
    kv_append(**args, backend=backend)
    assert torch.equal(bits(args["k_cache"]), bits(want))


@pytest.mark.gpu
def test_mismatched_device_raises():
    args = _good()
    args["k_new"] = args["k_new"].cuda()
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match="k_new must be on cpu"):
        kv_append(**args)
    assert torch.equal(bits(args["k_cache"]), bits(before))
