"""Bad-input table of the HF layer (``tidar.patch``, ``tidar.unpatch``, ``tidar.generate``, the drop-in
``model.generate``): every case raises the expected exception type, its message names the argument, no forward
ran (a hook counts them), and the model (weights, settings, attention implementation) is exactly as before.
Plus the valid edges HF accepts (``eos_token_id`` as int, NumPy int, list, 0-d/1-d tensor) and the end of
``max_position_embeddings``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_model

import tidar

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest


IDS = torch.tensor([[5, 6, 7, 8]])
MAX_POS = 64


@pytest.fixture(scope="module")
def model():
    return tidar.patch(tiny_model("qwen2", max_pos=MAX_POS), draft_len=4)


class _Streamer:
    def put(self, t):
        pass

    def end(self):
        pass


# (kwargs of tidar.generate besides the model, exception type, what the message must name)
BAD_GENERATE = [
    (dict(input_ids=[[5, 6]]), TypeError, "input_ids"),
    (dict(input_ids=IDS.float()), ValueError, "input_ids"),
    (dict(input_ids=IDS.bool()), ValueError, "input_ids"),
    (dict(input_ids=IDS[0]), ValueError, "input_ids"),
    (dict(input_ids=IDS[None]), ValueError, "input_ids"),
    (dict(input_ids=torch.tensor([[5, 600]])), ValueError, "input_ids"),
    (dict(input_ids=torch.tensor([[5, -1]])), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), ValueError, "at least one row"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "at least one row"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 0]])), ValueError, "left padding"),
    (dict(attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.zeros(1, 4)), ValueError, "all padding"),
    (dict(attention_mask=torch.tensor([[0, 1, 2, 1]])), ValueError, "attention_mask"),
    (dict(attention_mask=[[1, 1, 1, 1]]), TypeError, "attention_mask"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=-3), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens="8"), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=None), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=10**12), ValueError, "max_position_embeddings 64"),
    (dict(max_new_tokens=MAX_POS - 3), ValueError, "more than the model can hold"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=True), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature="hot"), ValueError, "temperature"),
    (dict(temperature=None), ValueError, "temperature"),
    (dict(temperature=1.0, top_k=0), ValueError, "top_k"),
    (dict(temperature=1.0, top_k=True), ValueError, "top_k"),
    (dict(temperature=1.0, top_k=2.5), ValueError, "top_k"),
    (dict(temperature=1.0, top_p=0.0), ValueError, "top_p"),
    (dict(temperature=1.0, top_p=1.5), ValueError, "top_p"),
    (dict(temperature=1.0, top_p=math.nan), ValueError, "top_p"),
    (dict(temperature=1.0, top_p="0.9"), ValueError, "top_p"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=math.nan), ValueError, "beta"),
    (dict(beta=True), ValueError, "beta"),
    (dict(eos_token_id=1.5), TypeError, "eos_token_id"),
    (dict(eos_token_id="</s>"), TypeError, "eos_token_id"),
    (dict(eos_token_id=True), TypeError, "eos_token_id"),
    (dict(eos_token_id=torch.tensor([[1, 2]])), TypeError, "eos_token_id"),
    (dict(eos_token_id=torch.tensor([1.0])), TypeError, "eos_token_id"),
    (dict(eos_token_id=[1, "a"]), TypeError, "eos_token_id"),
    (dict(eos_token_id=[1, 2.0]), TypeError, "eos_token_id"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id"),
    (dict(eos_token_id={1: 2}), TypeError, "eos_token_id"),
    (dict(pad_token_id=1.5), TypeError, "pad_token_id"),
    (dict(pad_token_id="<pad>"), TypeError, "pad_token_id"),
    (dict(pad_token_id=torch.tensor([1, 2])), TypeError, "pad_token_id"),
    (dict(pad_token_id=True), TypeError, "pad_token_id"),
    (dict(temperature=1.0, generator=5), TypeError, "generator"),
    (dict(temperature=1.0, generator="seed"), TypeError, "generator"),
    (dict(generator=np.random.default_rng(0)), TypeError, "generator"),
    (dict(temperature=1.0, seed="1"), TypeError, "seed"),
    (dict(temperature=1.0, seed=1.5), TypeError, "seed"),
    (dict(temperature=1.0, seed=True), TypeError, "seed"),
    (dict(temperature=1.0, seed=2**64), ValueError, "seed"),
    (dict(temperature=1.0, seed=1, generator=torch.Generator()), ValueError, "generator or seed"),
    (dict(streamer=object()), TypeError, "streamer"),
    (dict(input_ids=IDS.expand(2, -1), streamer=_Streamer()), ValueError, "streamer"),
    (dict(draft_len=0), ValueError, "draft_len"),
    (dict(draft_len=-2), ValueError, "draft_len"),
    (dict(draft_len=True), ValueError, "draft_len"),
    (dict(draft_len=2.0), ValueError, "draft_len"),
    (dict(draft_len="fast"), ValueError, "draft_len"),
    (dict(draft_len=4, proposal_levels=[9]), ValueError, "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[3, 2]), ValueError, "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[]), ValueError, "proposal_levels"),
    (dict(draft_len=4, proposal_levels="12"), ValueError, "proposal_levels"),
    (dict(draft_len=4, proposal_levels=[1, True]), ValueError, "proposal_levels"),
    (dict(context_drafts="yes"), ValueError, "context_drafts"),
    (dict(full_logits=1), ValueError, "full_logits"),
]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model._tidar, model.config._attn_implementation


def _assert_unchanged(model, snap):
    state, settings, impl = snap
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model._tidar == settings and model.config._attn_implementation == impl == "tidar"


def _raises_before_any_forward(model, call, exc, match):
    snap = _snapshot(model)
    forwards = []
    handle = model.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(exc, match=match):
            call()
    finally:
        handle.remove()
    assert forwards == [], "a forward ran before the error"
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("kwargs,exc,match", BAD_GENERATE, ids=[f"generate-{i}" for i in range(len(BAD_GENERATE))])
def test_bad_generate_argument(model, kwargs, exc, match):
    kw = dict(kwargs)
    ids = kw.pop("input_ids", IDS)
    kw.setdefault("max_new_tokens", 4)
    _raises_before_any_forward(model, lambda: tidar.generate(model, ids, **kw), exc, match)


BAD_HF_GENERATE = [
    (dict(num_beams=2), ValueError, "num_beams"),
    (dict(guidance_scale=1.5), ValueError, "guidance_scale"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences"),  # HF's rule: greedy returns one
    (dict(penalty_alpha=0.6, top_k=4), ValueError, "penalty_alpha"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(do_sample=True, temperature=True), ValueError, "temperature"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(prefix_allowed_tokens_fn=lambda b, i: [1]), ValueError, "prefix_allowed_tokens_fn"),
    (dict(stop_strings="end"), ValueError, "tokenizer"),
    (dict(assistant_model="draft"), ValueError, "assistant_model"),
    (dict(dola_layers="low"), ValueError, "dola_layers"),
    (dict(cache_implementation="quantized"), ValueError, "cache_implementation"),
    (dict(max_length=3, max_new_tokens=None), ValueError, "max_length"),
    (dict(max_new_tokens=10**12), ValueError, "max_position_embeddings"),
    (dict(frobnicate=1), ValueError, "frobnicate"),
    (dict(eos_token_id="</s>"), TypeError, "eos_token_id"),
    (dict(eos_token_id=1.5), TypeError, "eos_token_id"),
    (dict(pad_token_id="<pad>"), TypeError, "pad_token_id"),
    (dict(generator=5, do_sample=True), TypeError, "generator"),
    (dict(seed="x", do_sample=True), TypeError, "seed"),
    (dict(streamer=object()), TypeError, "streamer"),
    (dict(tidar_stats="yes"), TypeError, "tidar_stats"),
    (dict(generation_config="greedy"), TypeError, "generation_config"),
    (dict(inputs=[[5, 6]]), TypeError, "input_ids"),
    (dict(inputs=torch.zeros(0, 4, dtype=torch.long)), ValueError, "at least one row"),
    (dict(inputs=IDS, input_ids=IDS), ValueError, "alongside input_ids"),
    (dict(inputs=None), ValueError, "input_ids"),
    (dict(draft_len=0), ValueError, "draft_len"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_HF_GENERATE, ids=[f"hf-{i}" for i in range(len(BAD_HF_GENERATE))])
def test_bad_drop_in_generate_argument(model, kwargs, exc, match):
    kw = {"max_new_tokens": 4, **kwargs}
    if kw.get("max_new_tokens") is None:
        del kw["max_new_tokens"]
    inputs = kw.pop("inputs", IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _raises_before_any_forward(model, lambda: model.generate(inputs, **kw), exc, match)


BAD_PATCH = [
    (lambda m: tidar.patch(torch.nn.Linear(4, 4)), TypeError, "model"),
    (lambda m: tidar.patch(None), TypeError, "model"),
    (lambda m: tidar.patch("Qwen/Qwen2-0.5B"), TypeError, "model"),
    (lambda m: tidar.patch(m, draft_len=0), ValueError, "draft_len"),
    (lambda m: tidar.patch(m, draft_len=-1), ValueError, "draft_len"),
    (lambda m: tidar.patch(m, draft_len=True), ValueError, "draft_len"),
    (lambda m: tidar.patch(m, draft_len=2.0), ValueError, "draft_len"),
    (lambda m: tidar.patch(m, draft_len=None), ValueError, "draft_len"),
    (lambda m: tidar.patch(m, mask_token_id=10_000), ValueError, "mask_token_id"),
    (lambda m: tidar.patch(m, mask_token_id=-1), ValueError, "mask_token_id"),
    (lambda m: tidar.patch(m, mask_token_id=True), ValueError, "mask_token_id"),
    (lambda m: tidar.patch(m, mask_token_id=3.0), ValueError, "mask_token_id"),
    (lambda m: tidar.patch(m, mask_token_id="[MASK]"), ValueError, "mask_token_id"),
    (lambda m: tidar.patch(m, backend="fast"), ValueError, "backend"),
    (lambda m: tidar.patch(m, backend=None), ValueError, "backend"),
    (lambda m: tidar.patch(m, backend=1), ValueError, "backend"),
    (lambda m: tidar.patch(m, proposal_levels=[0]), ValueError, "proposal_levels"),
    (lambda m: tidar.patch(m, draft_len=4, proposal_levels=[5]), ValueError, "proposal_levels"),
    (lambda m: tidar.patch(m, proposal_levels=[2, 2]), ValueError, "proposal_levels"),
    (lambda m: tidar.patch(m, context_drafts="yes"), ValueError, "context_drafts"),
    (lambda m: tidar.patch(m, context_drafts=1), ValueError, "context_drafts"),
    (lambda m: tidar.unpatch(torch.nn.Linear(4, 4)), TypeError, "model"),
    (lambda m: tidar.unpatch(None), TypeError, "model"),
]


@pytest.mark.parametrize("call,exc,match", BAD_PATCH, ids=[f"patch-{i}" for i in range(len(BAD_PATCH))])
def test_bad_patch_or_unpatch_argument(call, exc, match):
    m = tiny_model("llama")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(exc, match=match):
        call(m)
    assert not tidar.is_patched(m) and m.config._attn_implementation == "sdpa" and "generate" not in m.__dict__
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_bad_patch_of_a_patched_model_keeps_its_settings(model):
    snap = _snapshot(model)
    for kw in (dict(draft_len=0), dict(mask_token_id=-1), dict(backend="x"), dict(context_drafts=None)):
        with pytest.raises(ValueError):
            tidar.patch(model, **kw)
        _assert_unchanged(model, snap)


def test_the_table_is_large_enough():
    assert len(BAD_GENERATE) + len(BAD_HF_GENERATE) + len(BAD_PATCH) >= 80


# ---------------------------------------------------------------- valid edges: HF's behaviour
EOS_FORMS = [
    lambda e: e,
    lambda e: np.int64(e),
    lambda e: [e],
    lambda e: [e, 96],
    lambda e: (e,),
    lambda e: torch.tensor(e),
    lambda e: torch.tensor([e]),
    lambda e: torch.tensor([e, 96]),
]


@pytest.mark.parametrize("form", range(len(EOS_FORMS)))
def test_eos_token_id_forms_as_hf(form):
    model = tiny_model("qwen2", max_pos=MAX_POS)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    eos = free[0, 4 + 3].item()  # a token row 0 emits early
    want = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=EOS_FORMS[form](eos),
        pad_token_id=0,
    )
    tidar.patch(model, draft_len=4)
    got = tidar.generate(model, ids, max_new_tokens=12, eos_token_id=EOS_FORMS[form](eos), pad_token_id=0)
    assert torch.equal(got.sequences, want)
    got2 = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=EOS_FORMS[form](eos),
        pad_token_id=0,
    )
    assert torch.equal(got2, want)


def test_the_end_of_max_position_embeddings_shrinks_k():
    """A GPT-2 with 64 positions: 8-token prompt + 48 new tokens at K = 6 fits (only the mask slots of the
    last steps would pass the end), so it must work and equal HF greedy."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        mask_token_id=96,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(1, 95, (1, 8), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48)
    tidar.patch(model, draft_len=6)
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=48).sequences, want)
    with pytest.raises(ValueError, match="n_positions 64|max_position_embeddings 64"):
        tidar.generate(model, ids, max_new_tokens=57)
