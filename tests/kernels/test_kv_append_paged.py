"""kv_append_paged: bit-exact over the whole pool (no stray writes) against a Python-loop twin, -1 slots skipped,
shuffled slots across blocks, block sizes 1..32, non-contiguous inputs and pool views, special values; bad calls
(a slot outside the pool, a slot twice, dtype/device/shape mismatches) raise before writing anything."""

from __future__ import annotations

import pytest
import torch
from test_kv_append import bits, rand  # noqa: E402  (the twins of kv_append)

from tidar_kernels import kv_append_paged

OP = "kv_append_paged"  # the `backend` fixture (conftest) runs each test on every live implementation of it
pytestmark = pytest.mark.triton_interpreter  # every test here also runs on Triton under the interpreter

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def expected(cache: torch.Tensor, new: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Python-loop twin: token t to (slot // block_size, slot % block_size) of a clone; -1 skipped."""
    out = cache.clone()
    bs = cache.shape[1]
    for t, s in enumerate(slots):
        if s >= 0:
            out[s // bs, s % bs] = new[t]
    return out


def random_slots(T, n_slots, seed, skip=0.2):
    """T distinct slots drawn from the whole pool (any block, any order), about ``skip`` of them -1."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(n_slots, generator=g)[:T]
    slots[torch.rand(T, generator=g) < skip] = -1
    return slots.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "NB,bs,H,D,T",
    [
        (6, 16, 2, 16, 40),  # block size 16
        (5, 32, 1, 8, 150),  # block size 32, most of the pool
        (7, 1, 3, 5, 7),  # block size 1: every slot a block; D not a power of two
        (3, 4, 2, 4, 12),  # every slot of the pool written (with skips)
        (4, 16, 2, 16, 1),  # one token (an AR step)
    ],
)
def test_whole_pool_bit_exact(backend, device, dtype, NB, bs, H, D, T):
    k_cache, v_cache = rand((NB, bs, H, D), dtype, 1), rand((NB, bs, H, D), dtype, 2)
    k_new, v_new = rand((T, H, D), dtype, 3), rand((T, H, D), dtype, 4)
    slots = random_slots(T, NB * bs, seed=NB * 100 + T)
    want_k, want_v = expected(k_cache, k_new, slots), expected(v_cache, v_new, slots)
    k_cache, v_cache, k_new, v_new = (t.to(device) for t in (k_cache, v_cache, k_new, v_new))
    k_ptr = k_cache.data_ptr()
    ret = kv_append_paged(k_cache, v_cache, k_new, v_new, torch.tensor(slots, device=device), backend=backend)
    assert ret[0] is k_cache and ret[1] is v_cache and k_cache.data_ptr() == k_ptr, "in place, returns the caches"
    assert torch.equal(bits(k_cache.cpu()), bits(want_k)) and torch.equal(bits(v_cache.cpu()), bits(want_v))


def test_skips_int32_slots_and_all_skipped(backend, device):
    """int32 slot_mapping; -1 slots leave their (would-be) targets alone; a mapping of only -1 writes nothing."""
    kc, vc = rand((2, 4, 1, 4), torch.float32, 5), rand((2, 4, 1, 4), torch.float32, 6)
    new = rand((3, 1, 4), torch.float32, 7)
    want = expected(kc, new, [7, -1, 0])
    kc_d, vc_d = kc.to(device), vc.to(device)
    kv_append_paged(kc_d, vc_d, new.to(device), new.to(device), torch.tensor([7, -1, 0], **_i32(device)),
                    backend=backend)  # fmt: skip
    assert torch.equal(bits(kc_d.cpu()), bits(want))
    kc_d = kc.to(device)
    kv_append_paged(kc_d, kc_d.clone(), new.to(device), new.to(device), torch.full((3,), -1, device=device),
                    backend=backend)  # fmt: skip
    assert torch.equal(bits(kc_d.cpu()), bits(kc))


def _i32(device):
    return dict(dtype=torch.int32, device=device)


def test_non_contiguous_inputs_and_pool_views(backend, device):
    """k_new/v_new as transposed views of the engine's [H, T, D] projections; the pool as K and V interleaved in one
    tensor ([NB, bs, 2, H, D]): only the K or V half of each slot is written."""
    dtype, NB, bs, H, D, T = torch.float16, 4, 16, 2, 8, 20
    kv = rand((NB, bs, 2, H, D), dtype, 8)
    k_new = rand((H, T, D), dtype, 9).transpose(0, 1)  # [T, H, D], non-contiguous
    v_new = rand((H, T, D), dtype, 10).transpose(0, 1)
    slots = random_slots(T, NB * bs, seed=11)
    want = kv.clone()
    want[:, :, 0] = expected(kv[:, :, 0], k_new, slots)
    want[:, :, 1] = expected(kv[:, :, 1], v_new, slots)
    kv_d = kv.to(device)
    kv_append_paged(kv_d[:, :, 0], kv_d[:, :, 1], k_new.to(device), v_new.to(device), torch.tensor(slots).to(device),
                    backend=backend)  # fmt: skip
    assert torch.equal(bits(kv_d.cpu()), bits(want))


def test_special_values_copied_bit_for_bit(backend, device):
    """-0.0, inf, NaN with a payload, subnormals: a copy, not arithmetic."""
    raw = torch.tensor([[-(2**31), 0x7F800000, 0x7FC01234, 0x00000001]], dtype=torch.int32)
    new = raw.view(torch.float32).view(1, 1, 4)
    kc, vc = rand((2, 2, 1, 4), torch.float32, 12), rand((2, 2, 1, 4), torch.float32, 13)
    kc, vc = kc.to(device), vc.to(device)
    kv_append_paged(kc, vc, new.to(device), new.to(device), torch.tensor([3], device=device), backend=backend)
    assert torch.equal(bits(kc[1, 1].cpu()), raw) and torch.equal(bits(vc[1, 1].cpu()), raw)


# ---------------------------------------------------------------------------------------------
# Bad calls: a clear error naming the argument, nothing written
# ---------------------------------------------------------------------------------------------


def good(**kw):
    """A valid call: a pool of 3 blocks of 4 slots, 2 heads, D 4; 3 tokens."""
    args = dict(
        k_cache=rand((3, 4, 2, 4), torch.float32, 20),
        v_cache=rand((3, 4, 2, 4), torch.float32, 21),
        k_new=rand((3, 2, 4), torch.float32, 22),
        v_new=rand((3, 2, 4), torch.float32, 23),
        slot_mapping=torch.tensor([5, -1, 11]),
    )
    args.update(kw)
    return args


BAD = [  # (name, call, exception, text of the message)
    ("slot_past_pool", good(slot_mapping=torch.tensor([5, 12, 0])), ValueError, "slot_mapping holds slot 12"),
    ("slot_below_minus_1", good(slot_mapping=torch.tensor([5, -2, 0])), ValueError, "slot_mapping holds slot -2"),
    ("slot_int64_huge", good(slot_mapping=torch.tensor([2**32 + 1, 0, 1])), ValueError, "slot_mapping"),
    ("slot_twice", good(slot_mapping=torch.tensor([7, -1, 7])), ValueError, "slot_mapping writes slot 7 more than"),
    ("slot_float", good(slot_mapping=torch.tensor([5.0, 1.0, 0.0])), TypeError, "slot_mapping"),
    ("slot_length", good(slot_mapping=torch.tensor([5, 1])), ValueError, "slot_mapping"),
    ("slot_2d", good(slot_mapping=torch.tensor([[5, 1, 0]])), ValueError, "slot_mapping"),
    ("slot_device", good(slot_mapping=torch.tensor([5, 1, 0], device="meta")), ValueError, "slot_mapping"),
    ("k_new_dtype", good(k_new=rand((3, 2, 4), torch.float16, 24)), TypeError, "k_new"),
    ("k_new_4d_contiguous_layout", good(k_new=rand((1, 2, 3, 4), torch.float32, 24)), ValueError, "k_new"),
    ("k_new_heads", good(k_new=rand((3, 1, 4), torch.float32, 24)), ValueError, "k_new"),
    ("v_new_shape", good(v_new=rand((2, 2, 4), torch.float32, 24)), ValueError, "v_new"),
    ("v_cache_dtype", good(v_cache=rand((3, 4, 2, 4), torch.bfloat16, 24)), TypeError, "v_cache"),
    ("v_cache_shape", good(v_cache=rand((3, 8, 2, 4), torch.float32, 24)), ValueError, "v_cache"),
    ("k_cache_3d", good(k_cache=rand((12, 2, 4), torch.float32, 24)), ValueError, "k_cache"),
    ("k_cache_int", good(k_cache=torch.zeros(3, 4, 2, 4, dtype=torch.int32)), TypeError, "k_cache"),
    ("k_new_not_tensor", good(k_new=[[0.0]]), TypeError, "k_new"),
]


@pytest.mark.parametrize("name,args,exc,text", BAD, ids=[c[0] for c in BAD])
def test_bad_input_refused_and_nothing_written(name, args, exc, text, impl_calls):
    before = {k: bits(v).clone() for k, v in args.items() if torch.is_tensor(v) and v.is_floating_point()}
    with pytest.raises(exc) as info:
        kv_append_paged(**args)
    assert text in str(info.value), f"the message does not say {text!r}: {info.value}"
    assert impl_calls == [], "a backend ran before the error"
    for k, b in before.items():
        assert torch.equal(bits(args[k]), b), f"{k} changed by a failed call"


def test_repeated_skips_are_valid_and_no_tokens_is_a_no_op(impl_calls):
    args = good(slot_mapping=torch.tensor([-1, 3, -1]))
    kv_append_paged(**args)
    assert impl_calls == [(OP, "reference")]
    empty = good(k_new=torch.zeros(0, 2, 4), v_new=torch.zeros(0, 2, 4), slot_mapping=torch.zeros(0, dtype=torch.long))
    kv_append_paged(**empty)
    assert impl_calls == [(OP, "reference")]
    with pytest.raises(ValueError, match="backend"):
        kv_append_paged(**empty, backend="nope")
