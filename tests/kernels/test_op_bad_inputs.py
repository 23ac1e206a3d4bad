"""Every bad input to the public ops of ``tidar_kernels`` is a clear error before any work.

One table over ``tidar_attention``, ``kv_append``, ``rejection_sample``, ``draft_sample``, ``draw_uniforms``,
``philox_uniforms``, ``dense_mask`` and the layout functions: ints that are bools, int64 values outside the int32
range (which would wrap when cast), NaN/inf/bool/non-numeric floats, empty dimensions, mismatched lengths, wrong
types for ``generator``, ``uniforms``, ``seg_start``. For each case: the exception type, a message that names the
argument, no backend implementation called (every registered impl is replaced by a spy), and every input tensor bit
for bit unchanged (kv_append caches included). The op cases run once per backend live here (validation sits in front
of the dispatch, so a bad input is refused whatever the backend).

Edge inputs that are valid get their documented result: batch 0 (an empty output of the right shape for attention
and sampling, a no-op for kv_append), numpy ints/floats, int64 layout vectors with in-range values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import backends_under_test

import tidar_kernels as tk
from tidar_kernels import layouts

I32, I64 = dict(dtype=torch.int32), dict(dtype=torch.int64)
BIG = 2**32 + 1  # an int64 value that wraps to 1 when cast to int32


# ---------------------------------------------------------------------------------------------
# Good calls the table perturbs one argument of
# ---------------------------------------------------------------------------------------------


def attn(**kw):
    lay = layouts.decode_step(2)  # S = 6
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(2, 4, 6, 8, generator=g),
        k=torch.randn(2, 2, 10, 8, generator=g),
        v=torch.randn(2, 2, 10, 8, generator=g),
        local_limit=lay.local_limit.clone(),
        block_id=lay.block_id.clone(),
        seg_start=torch.tensor([4, 2], **I32),
    )
    args.update(kw)
    return args


def kv(**kw):
    g = torch.Generator().manual_seed(1)
    args = dict(
        k_cache=torch.randn(2, 2, 10, 4, generator=g),
        v_cache=torch.randn(2, 2, 10, 4, generator=g),
        k_new=torch.randn(2, 2, 3, 4, generator=g),
        v_new=torch.randn(2, 2, 3, 4, generator=g),
        seg_start=torch.tensor([0, 7], **I32),
    )
    args.update(kw)
    return args


def rs(**kw):
    g = torch.Generator().manual_seed(2)
    args = dict(
        ar_logits=torch.randn(2, 3, 6, generator=g),
        block_logits=torch.randn(2, 3, 3, 6, generator=g),
        drafts=torch.tensor([[0, 1, 2], [3, 4, 5]]),
        draft_probs=torch.full((2, 2, 6), 1 / 6),
        temperature=1.0,
        uniforms=torch.rand(2, 6, generator=g),
    )
    args.update(kw)
    return args


def ds(**kw):
    g = torch.Generator().manual_seed(3)
    args = dict(
        ar_logits=torch.randn(2, 6, generator=g), block_logits=torch.randn(2, 3, 6, generator=g), temperature=1.0
    )
    args.update(kw)
    return args


def no_uniforms(make, **kw):
    args = make(**kw)
    args.pop("uniforms", None)
    return args


E = ValueError
T = TypeError

# (name, op, make args, exception, the argument the message must name)
OP_CASES = [
    # --- tidar_attention: seg_start ---
    ("attn_seg_start_bool", "tidar_attention", lambda: attn(seg_start=True), T, "seg_start"),
    ("attn_seg_start_numpy_bool", "tidar_attention", lambda: attn(seg_start=np.True_), T, "seg_start"),
    ("attn_seg_start_float", "tidar_attention", lambda: attn(seg_start=2.0), T, "seg_start"),
    ("attn_seg_start_str", "tidar_attention", lambda: attn(seg_start="2"), T, "seg_start"),
    ("attn_seg_start_list", "tidar_attention", lambda: attn(seg_start=[4, 2]), T, "seg_start"),
    ("attn_seg_start_int_huge", "tidar_attention", lambda: attn(seg_start=2**40), E, "seg_start"),
    ("attn_seg_start_int_negative", "tidar_attention", lambda: attn(seg_start=-1), E, "seg_start"),
    (
        "attn_seg_start_int64_wraps",
        "tidar_attention",
        lambda: attn(seg_start=torch.tensor([2**32 + 4, 2], **I64)),
        E,
        "seg_start",
    ),
    (
        "attn_seg_start_int64_negative_wraps",
        "tidar_attention",
        lambda: attn(seg_start=torch.tensor([-(2**32) + 2, 2], **I64)),
        E,
        "seg_start",
    ),
    (
        "attn_seg_start_bool_tensor",
        "tidar_attention",
        lambda: attn(seg_start=torch.tensor([True, False])),
        T,
        "seg_start",
    ),
    ("attn_seg_start_0d", "tidar_attention", lambda: attn(seg_start=torch.tensor(2, **I32)), E, "seg_start"),
    (
        "attn_seg_start_wrong_batch",
        "tidar_attention",
        lambda: attn(seg_start=torch.tensor([4, 2, 0], **I32)),
        E,
        "seg_start",
    ),
    # --- layout vectors: int64 values that would wrap, wrong types/lengths ---
    (
        "attn_local_limit_int64_wraps",
        "tidar_attention",
        lambda: attn(local_limit=torch.tensor([1, 2, BIG, 1, 2, 2], **I64)),
        E,
        "local_limit",
    ),
    (
        "attn_block_id_int64_wraps_merges_blocks",
        "tidar_attention",
        lambda: attn(block_id=torch.tensor([-1, -1, 1, 1, BIG, BIG], **I64)),
        E,
        "block_id",
    ),
    (
        "attn_block_id_int64_below_int32",
        "tidar_attention",
        lambda: attn(block_id=torch.tensor([-1, -1, 1, 1, -(2**32) + 2, 2], **I64)),
        E,
        "block_id",
    ),
    (
        "attn_local_limit_int16",
        "tidar_attention",
        lambda: attn(local_limit=torch.ones(6, dtype=torch.int16)),
        T,
        "local_limit",
    ),
    ("attn_block_id_bool", "tidar_attention", lambda: attn(block_id=torch.zeros(6, dtype=torch.bool)), T, "block_id"),
    ("attn_local_limit_list", "tidar_attention", lambda: attn(local_limit=[1, 2, 1, 2, 2, 3]), T, "local_limit"),
    ("attn_block_id_short", "tidar_attention", lambda: attn(block_id=torch.full((5,), -1, **I32)), E, "block_id"),
    # --- scale ---
    ("attn_scale_nan", "tidar_attention", lambda: attn(scale=float("nan")), E, "scale"),
    ("attn_scale_inf", "tidar_attention", lambda: attn(scale=float("inf")), E, "scale"),
    ("attn_scale_neg_inf", "tidar_attention", lambda: attn(scale=float("-inf")), E, "scale"),
    ("attn_scale_bool", "tidar_attention", lambda: attn(scale=True), T, "scale"),
    ("attn_scale_str", "tidar_attention", lambda: attn(scale="0.3"), T, "scale"),
    ("attn_scale_tensor", "tidar_attention", lambda: attn(scale=torch.tensor(0.3)), T, "scale"),
    ("attn_scale_zero", "tidar_attention", lambda: attn(scale=0.0), E, "scale"),
    ("attn_scale_negative", "tidar_attention", lambda: attn(scale=-0.3), E, "scale"),
    ("attn_scale_complex", "tidar_attention", lambda: attn(scale=1j), T, "scale"),
    # --- softcap ---
    ("attn_softcap_nan", "tidar_attention", lambda: attn(softcap=float("nan")), E, "softcap"),
    ("attn_softcap_inf", "tidar_attention", lambda: attn(softcap=float("inf")), E, "softcap"),
    ("attn_softcap_zero", "tidar_attention", lambda: attn(softcap=0.0), E, "softcap"),
    ("attn_softcap_negative", "tidar_attention", lambda: attn(softcap=-30.0), E, "softcap"),
    ("attn_softcap_bool", "tidar_attention", lambda: attn(softcap=True), T, "softcap"),
    ("attn_softcap_str", "tidar_attention", lambda: attn(softcap="50"), T, "softcap"),
    ("attn_softcap_numpy_nan", "tidar_attention", lambda: attn(softcap=np.float32("nan")), E, "softcap"),
    # --- empty dimensions (B = 0 is valid: see test_attention_batch_zero) ---
    (
        "attn_head_dim_zero",
        "tidar_attention",
        lambda: attn(q=torch.randn(2, 4, 6, 0), k=torch.randn(2, 2, 10, 0), v=torch.randn(2, 2, 10, 0)),
        E,
        "head dim",
    ),
    ("attn_no_q_heads", "tidar_attention", lambda: attn(q=torch.randn(2, 0, 6, 8)), E, "head"),
    (
        "attn_no_kv_heads",
        "tidar_attention",
        lambda: attn(k=torch.randn(2, 0, 10, 8), v=torch.randn(2, 0, 10, 8)),
        E,
        "k/v heads",
    ),
    (
        "attn_no_queries",
        "tidar_attention",
        lambda: attn(q=torch.randn(2, 4, 0, 8), local_limit=torch.zeros(0, **I32), block_id=torch.zeros(0, **I32)),
        E,
        "quer",
    ),
    ("attn_no_keys", "tidar_attention", lambda: attn(k=torch.randn(2, 2, 0, 8), v=torch.randn(2, 2, 0, 8)), E, "key"),
    ("attn_v_dtype", "tidar_attention", lambda: attn(v=torch.randn(2, 2, 10, 8, dtype=torch.float64)), T, "v"),
    ("attn_q_not_tensor", "tidar_attention", lambda: attn(q=np.zeros((2, 4, 6, 8), np.float32)), T, "q"),
    # --- kv_append ---
    ("kv_seg_start_bool", "kv_append", lambda: kv(seg_start=True), T, "seg_start"),
    ("kv_seg_start_float", "kv_append", lambda: kv(seg_start=1.0), T, "seg_start"),
    ("kv_seg_start_list", "kv_append", lambda: kv(seg_start=[0, 7]), T, "seg_start"),
    ("kv_seg_start_int_huge", "kv_append", lambda: kv(seg_start=2**40), E, "seg_start"),
    (
        "kv_seg_start_int64_wraps_to_zero",
        "kv_append",
        lambda: kv(seg_start=torch.tensor([2**32, 0], **I64)),
        E,
        "seg_start",
    ),
    (
        "kv_seg_start_int64_negative_wraps",
        "kv_append",
        lambda: kv(seg_start=torch.tensor([-(2**32) + 1, 0], **I64)),
        E,
        "seg_start",
    ),
    ("kv_seg_start_bool_tensor", "kv_append", lambda: kv(seg_start=torch.tensor([False, True])), T, "seg_start"),
    (
        "kv_cache_no_heads",
        "kv_append",
        lambda: kv(
            k_cache=torch.randn(2, 0, 10, 4),
            v_cache=torch.randn(2, 0, 10, 4),
            k_new=torch.randn(2, 0, 3, 4),
            v_new=torch.randn(2, 0, 3, 4),
        ),
        E,
        "k_cache",
    ),
    (
        "kv_cache_head_dim_zero",
        "kv_append",
        lambda: kv(
            k_cache=torch.randn(2, 2, 10, 0),
            v_cache=torch.randn(2, 2, 10, 0),
            k_new=torch.randn(2, 2, 3, 0),
            v_new=torch.randn(2, 2, 3, 0),
        ),
        E,
        "k_cache",
    ),
    (
        "kv_new_longer_than_cache",
        "kv_append",
        lambda: kv(k_new=torch.randn(2, 2, 11, 4), v_new=torch.randn(2, 2, 11, 4), seg_start=0),
        E,
        "seg_start",
    ),
    ("kv_k_new_float64", "kv_append", lambda: kv(k_new=torch.randn(2, 2, 3, 4, dtype=torch.float64)), T, "k_new"),
    ("kv_v_cache_not_tensor", "kv_append", lambda: kv(v_cache=None), T, "v_cache"),
    # --- rejection_sample ---
    ("rs_temperature_bool", "rejection_sample", lambda: rs(temperature=True), E, "temperature"),
    ("rs_temperature_inf", "rejection_sample", lambda: rs(temperature=float("inf")), E, "temperature"),
    ("rs_temperature_str", "rejection_sample", lambda: rs(temperature="1.0"), E, "temperature"),
    ("rs_temperature_none", "rejection_sample", lambda: rs(temperature=None), E, "temperature"),
    ("rs_top_p_bool", "rejection_sample", lambda: rs(top_p=True), E, "top_p"),
    ("rs_top_p_nan", "rejection_sample", lambda: rs(top_p=float("nan")), E, "top_p"),
    ("rs_top_k_bool", "rejection_sample", lambda: rs(top_k=True), E, "top_k"),
    ("rs_top_k_str", "rejection_sample", lambda: rs(top_k="2"), E, "top_k"),
    ("rs_beta_bool", "rejection_sample", lambda: rs(beta=True), E, "beta"),
    ("rs_beta_nan", "rejection_sample", lambda: rs(beta=float("nan")), E, "beta"),
    ("rs_generator_int", "rejection_sample", lambda: no_uniforms(rs, generator=5), T, "generator"),
    ("rs_generator_str", "rejection_sample", lambda: no_uniforms(rs, generator="cpu"), T, "generator"),
    (
        "rs_generator_int_greedy",
        "rejection_sample",
        lambda: no_uniforms(rs, generator=5, temperature=0.0),
        T,
        "generator",
    ),
    ("rs_uniforms_list", "rejection_sample", lambda: rs(uniforms=[[0.5] * 6] * 2), T, "uniforms"),
    ("rs_seed_bool", "rejection_sample", lambda: no_uniforms(rs, seed=True), T, "seed"),
    ("rs_offset_float", "rejection_sample", lambda: no_uniforms(rs, seed=1, offset=2.0), T, "offset"),
    (
        "rs_empty_vocab",
        "rejection_sample",
        lambda: rs(ar_logits=torch.randn(2, 3, 0), block_logits=torch.randn(2, 3, 3, 0)),
        E,
        "ar_logits",
    ),
    (
        "rs_no_drafts",
        "rejection_sample",
        lambda: rs(
            ar_logits=torch.randn(2, 0, 6),
            block_logits=torch.randn(2, 0, 0, 6),
            drafts=torch.zeros(2, 0, dtype=torch.long),
        ),
        E,
        "ar_logits",
    ),
    ("rs_drafts_bool", "rejection_sample", lambda: rs(drafts=torch.zeros(2, 3, dtype=torch.bool)), T, "drafts"),
    (
        "rs_drafts_int64_huge",
        "rejection_sample",
        lambda: rs(drafts=torch.tensor([[0, 1, 2], [3, BIG, 5]])),
        E,
        "drafts",
    ),
    # --- draft_sample ---
    ("ds_temperature_bool", "draft_sample", lambda: ds(temperature=True), E, "temperature"),
    ("ds_temperature_neg_inf", "draft_sample", lambda: ds(temperature=float("-inf")), E, "temperature"),
    ("ds_generator_int", "draft_sample", lambda: ds(generator=5), T, "generator"),
    ("ds_generator_device_str", "draft_sample", lambda: ds(generator=torch.device("cpu")), T, "generator"),
    ("ds_top_k_float", "draft_sample", lambda: ds(top_k=1.5), E, "top_k"),
    ("ds_beta_inf", "draft_sample", lambda: ds(beta=float("inf")), E, "beta"),
    (
        "ds_empty_vocab",
        "draft_sample",
        lambda: ds(ar_logits=torch.randn(2, 0), block_logits=torch.randn(2, 3, 0)),
        E,
        "ar_logits",
    ),
    ("ds_block_logits_not_tensor", "draft_sample", lambda: ds(block_logits=[[0.0]]), T, "block_logits"),
]


# Functions without a backend: (name, callable, exception, argument named)
def _ll_bid(S: int):
    """The layout vectors of a segment of S tokens (causal)."""
    lay = layouts.causal(S)
    return lay.local_limit, lay.block_id


PLAIN_CASES = [
    ("draw_uniforms_generator_int", lambda: tk.draw_uniforms(2, 3, generator=5), T, "generator"),
    ("draw_uniforms_batch_bool", lambda: tk.draw_uniforms(True, 3), E, "batch"),
    ("draw_uniforms_draft_len_zero", lambda: tk.draw_uniforms(2, 0), E, "draft_len"),
    ("philox_uniforms_seed_bool", lambda: tk.philox_uniforms(True, 0, 2, 3), T, "seed"),
    ("philox_uniforms_offset_float", lambda: tk.philox_uniforms(1, 0.5, 2, 3), T, "offset"),
    ("philox_uniforms_seed_int32_tensor", lambda: tk.philox_uniforms(torch.tensor([1], **I32), 0, 2, 3), T, "seed"),
    ("philox_uniforms_seed_too_large", lambda: tk.philox_uniforms(2**64, 0, 2, 3), E, "seed"),
    ("philox_uniforms_batch_bool", lambda: tk.philox_uniforms(1, 0, True, 3), E, "batch"),
    ("philox_uniforms_draft_len_zero", lambda: tk.philox_uniforms(1, 0, 2, 0), E, "draft_len"),
    (
        "dense_mask_lengths_differ",
        lambda: tk.dense_mask(torch.ones(6, **I32), torch.ones(5, **I32), 0, 9),
        E,
        "block_id",
    ),
    (
        "dense_mask_seg_start_bool",
        lambda: tk.dense_mask(torch.ones(3, **I32), torch.ones(3, **I32), True, 9),
        T,
        "seg_start",
    ),
    ("dense_mask_kv_len_float", lambda: tk.dense_mask(torch.ones(3, **I32), torch.ones(3, **I32), 0, 9.0), T, "kv_len"),
    (
        "dense_mask_kv_len_negative",
        lambda: tk.dense_mask(torch.ones(3, **I32), torch.ones(3, **I32), 0, -1),
        T,
        "kv_len",
    ),
    (
        "dense_mask_local_limit_float",
        lambda: tk.dense_mask(torch.ones(3), torch.ones(3, **I32), 0, 9),
        T,
        "local_limit",
    ),
    (
        "dense_mask_block_id_2d",
        lambda: tk.dense_mask(torch.ones(3, **I32), torch.ones(1, 3, **I32), 0, 9),
        E,
        "block_id",
    ),
    (
        "dense_mask_seg_start_2d",
        lambda: tk.dense_mask(torch.ones(3, **I32), torch.ones(3, **I32), torch.zeros(2, 2, **I32), 9),
        E,
        "seg_start",
    ),
    (
        "dense_mask_empty_layout",
        lambda: tk.dense_mask(torch.ones(0, **I32), torch.ones(0, **I32), 0, 9),
        E,
        "local_limit",
    ),
    # the segment must lie inside the keys, as for the ops: 0 <= seg_start <= kv_len - S
    ("dense_mask_segment_past_kv_len", lambda: tk.dense_mask(*_ll_bid(20), 25, 30), E, "kv_len - S = 10"),
    ("dense_mask_segment_past_kv_len_names_seg_start", lambda: tk.dense_mask(*_ll_bid(20), 25, 30), E, "seg_start"),
    ("dense_mask_row_past_kv_len", lambda: tk.dense_mask(*_ll_bid(20), torch.tensor([0, 11], **I32), 30), E, "[0, 11]"),
    ("dense_mask_seg_start_negative", lambda: tk.dense_mask(*_ll_bid(20), -1, 30), E, "seg_start"),
    ("dense_mask_seg_start_tensor_negative", lambda: tk.dense_mask(*_ll_bid(3), torch.tensor([-2], **I64), 9), E, "-2"),
    ("dense_mask_seg_start_int_huge", lambda: tk.dense_mask(*_ll_bid(3), 2**70, 9), E, "seg_start"),
    ("dense_mask_kv_len_below_s", lambda: tk.dense_mask(*_ll_bid(20), 0, 19), E, "kv_len must be >= S = 20"),
    ("decode_step_bool", lambda: layouts.decode_step(True), E, "draft_len"),
    ("decode_step_float", lambda: layouts.decode_step(2.0), E, "draft_len"),
    ("decode_step_zero", lambda: layouts.decode_step(0), E, "draft_len"),
    ("decode_step_past_int32", lambda: layouts.decode_step(50_000), E, "decode_step"),
    ("decode_step_level_bool", lambda: layouts.decode_step(3, levels=[True, 2]), E, "levels"),
    ("training_block_size_bool", lambda: layouts.training(4, True), E, "block_size"),
    ("training_past_int32", lambda: layouts.training(2**30, 4), E, "training"),
    ("prefill_prompt_len_str", lambda: layouts.prefill("3", 2), E, "prompt_len"),
    ("causal_past_int32", lambda: layouts.causal(2**31), E, "causal"),
]

OPS = {
    "tidar_attention": tk.tidar_attention,
    "kv_append": tk.kv_append,
    "rejection_sample": tk.rejection_sample,
    "draft_sample": tk.draft_sample,
}


def _op_params():
    params = []
    for case in OP_CASES:
        for backend, device in backends_under_test(case[1], on_device=True, interpreter=True):
            params.append(pytest.param(case, backend, device, id=f"{case[0]}-{backend}-{device}"))
    return params


def _to(x, device):
    return x.to(device) if torch.is_tensor(x) else x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).view(torch.uint8).clone() if t.numel() else t.detach().cpu().clone()


def test_the_table_is_large_enough():
    assert len(OP_CASES) >= 60 and len({c[0] for c in OP_CASES + PLAIN_CASES}) == len(OP_CASES) + len(PLAIN_CASES)


@pytest.mark.parametrize("case,impl,dev", _op_params())  # (not "backend": conftest's fixture is one op per module)
def test_bad_op_input_is_refused_before_any_work(case, impl, dev, impl_calls):
    name, op, make, exc, arg = case
    args = {k: _to(v, dev) for k, v in make().items()}
    before = {k: _bits(v) for k, v in args.items() if torch.is_tensor(v)}
    with pytest.raises(exc) as info:
        OPS[op](**args, backend=impl)
    assert arg in str(info.value), f"the message does not name {arg!r}: {info.value}"
    assert impl_calls == [], f"a backend ran before the error: {impl_calls}"
    for k, b in before.items():
        assert torch.equal(_bits(args[k]), b), f"{k} changed by a failed call"


@pytest.mark.parametrize("name,call,exc,arg", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_bad_plain_input_is_refused(name, call, exc, arg):
    with pytest.raises(exc) as info:
        call()
    assert arg in str(info.value), f"the message does not name {arg!r}: {info.value}"


@pytest.mark.parametrize(
    "op,make", [("tidar_attention", attn), ("kv_append", kv), ("rejection_sample", rs), ("draft_sample", ds)]
)
def test_base_calls_of_the_table_are_valid(op, make, impl_calls):
    """Each bad case perturbs one argument of a call that is itself valid, so it fails for its own reason (and
    the spies see a valid call reach its backend)."""
    OPS[op](**make(), backend="reference")
    assert impl_calls == [(op, "reference")]


# ---------------------------------------------------------------------------------------------
# Valid edge inputs
# ---------------------------------------------------------------------------------------------


def test_attention_batch_zero_is_an_empty_result_with_gradients():
    a = attn(
        q=torch.randn(0, 4, 6, 8, requires_grad=True),
        k=torch.randn(0, 2, 10, 8, requires_grad=True),
        v=torch.randn(0, 2, 10, 8),
        seg_start=torch.zeros(0, **I32),
    )
    out = tk.tidar_attention(**a, backend="reference")
    assert out.shape == (0, 4, 6, 8)
    out.sum().backward()
    assert a["q"].grad.shape == (0, 4, 6, 8) and a["k"].grad.shape == (0, 2, 10, 8)
    a.pop("seg_start")
    assert tk.tidar_attention(**a, softcap=5.0).shape == (0, 4, 6, 8)  # default seg_start, auto backend
    with pytest.raises(ValueError, match="backend"):
        tk.tidar_attention(**a, backend="nope")


def test_kv_append_batch_zero_and_no_tokens_are_no_ops():
    for a in (
        kv(
            k_cache=torch.randn(0, 2, 10, 4),
            v_cache=torch.randn(0, 2, 10, 4),
            k_new=torch.randn(0, 2, 3, 4),
            v_new=torch.randn(0, 2, 3, 4),
            seg_start=torch.zeros(0, **I32),
        ),
        kv(k_new=torch.randn(2, 2, 0, 4), v_new=torch.randn(2, 2, 0, 4), seg_start=torch.tensor([10, 3], **I32)),
    ):
        before = _bits(a["k_cache"]), _bits(a["v_cache"])
        k_cache, v_cache = tk.kv_append(**a, backend="reference")
        assert k_cache is a["k_cache"] and torch.equal(_bits(k_cache), before[0])
        assert torch.equal(_bits(v_cache), before[1])


def test_sampling_batch_zero_is_an_empty_result():
    r = tk.rejection_sample(
        **rs(
            ar_logits=torch.randn(0, 3, 6),
            block_logits=torch.randn(0, 3, 3, 6),
            drafts=torch.zeros(0, 3, dtype=torch.long),
            draft_probs=torch.full((0, 2, 6), 1 / 6),
            uniforms=torch.rand(0, 6),
        ),
        backend="reference",
    )
    assert r.accepted.shape == (0,) and r.next_drafts.shape == (0, 3) and r.next_draft_probs.shape == (0, 2, 6)
    d = tk.draft_sample(
        **ds(ar_logits=torch.randn(0, 6), block_logits=torch.randn(0, 3, 6), temperature=0.0), backend="reference"
    )
    assert d.next_drafts.shape == (0, 3) and d.next_draft_probs is None


def test_numpy_scalars_and_in_range_int64_layouts_are_accepted():
    a = attn()
    want = tk.tidar_attention(**a, scale=0.3, softcap=5.0, backend="reference")
    got = tk.tidar_attention(
        **attn(local_limit=a["local_limit"].long(), block_id=a["block_id"].long(), seg_start=a["seg_start"].long()),
        scale=np.float32(0.3),
        softcap=np.int64(5),
        backend="reference",
    )
    torch.testing.assert_close(got, want)
    one = tk.tidar_attention(**attn(seg_start=np.int64(3)), backend="reference")
    torch.testing.assert_close(
        one, tk.tidar_attention(**attn(seg_start=torch.tensor([3, 3], **I32)), backend="reference")
    )
    k = kv(seg_start=np.int32(2))
    tk.kv_append(**k, backend="reference")
    assert torch.equal(k["k_cache"][:, :, 2:5], k["k_new"])
    r = tk.draft_sample(
        **ds(top_k=np.int64(2), temperature=np.float64(0.5)), generator=torch.Generator().manual_seed(0)
    )
    assert r.next_drafts.shape == (2, 3)


def test_dense_mask_takes_every_segment_that_ends_by_kv_len():
    ll, bid = _ll_bid(20)
    assert tk.dense_mask(ll, bid, 10, 30).shape == (1, 20, 30)  # the segment ends the keys
    assert tk.dense_mask(ll, bid, torch.tensor([0, 10, 3], **I32), 30).shape == (3, 20, 30)
    assert tk.dense_mask(ll, bid, torch.tensor(4, **I64), 30).shape == (1, 20, 30)  # 0-d
    assert tk.dense_mask(ll, bid, torch.zeros(0, **I32), 20).shape == (0, 20, 20)  # batch 0
