"""Bad calls of the HF layer raise clear errors and leave the model (and cache) exactly as they were."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.hf.cache import TidarCache

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest


IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture
def model():
    return tidar.patch(tiny_model("qwen2", max_pos=64), draft_len=4)


BAD_GENERATE = [
    (dict(input_ids=IDS.float()), "input_ids"),
    (dict(input_ids=IDS[0]), "input_ids"),
    (dict(input_ids=torch.tensor([[5, 600]])), "input_ids"),
    (dict(input_ids=IDS, attention_mask=torch.tensor([[1, 1, 0, 0]])), "left padding"),
    (dict(input_ids=IDS, attention_mask=torch.ones(1, 3)), "attention_mask"),
    (dict(input_ids=IDS, attention_mask=torch.zeros(1, 4)), "all padding"),
    (dict(input_ids=IDS, draft_len=0), "draft_len"),
    (dict(input_ids=IDS, max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=IDS, temperature=-1.0), "temperature"),
    (dict(input_ids=IDS, temperature=1.0, top_p=0.0), "top_p"),
    (dict(input_ids=IDS, temperature=1.0, top_k=0), "top_k"),
    (dict(input_ids=IDS, beta=1.5), "beta"),
    (dict(input_ids=IDS.expand(2, -1), streamer=object()), "streamer"),
]


def _unchanged(model, state, settings):
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model._tidar == settings and model.config._attn_implementation == "tidar"


@pytest.mark.parametrize("kwargs,match", BAD_GENERATE)
def test_bad_generate_calls(model, kwargs, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = model._tidar
    kwargs = dict(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        tidar.generate(model, kwargs.pop("input_ids"), max_new_tokens=kwargs.pop("max_new_tokens", 4), **kwargs)
    _unchanged(model, state, settings)


# what the drop-in generate refuses (processors and outputs: tests/decode/test_hf_generation_options.py)
BAD_HF_GENERATE = [
    (dict(num_beams=2), "num_beams"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(guidance_scale=1.5), "guidance_scale"),
    (dict(dola_layers="low"), "dola_layers"),
    (dict(cache_implementation="quantized"), "cache_implementation"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(stop_strings="end"), "tokenizer"),  # HF's own error: stop strings need the tokenizer
    (dict(prefix_allowed_tokens_fn=lambda b, i: [1]), "prefix_allowed_tokens_fn"),
    (dict(max_length=3), "max_length"),
    (dict(frobnicate=1), "frobnicate"),
]


@pytest.mark.parametrize("kwargs,match", BAD_HF_GENERATE)
def test_patched_hf_generate_refuses_what_it_cannot_honour(model, kwargs, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = model._tidar
    kw = {"max_new_tokens": 4, **kwargs} if "max_length" not in kwargs else kwargs
    with pytest.raises(ValueError, match=match):
        model.generate(IDS, **kw)
    _unchanged(model, state, settings)


def test_bad_patch_calls():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="draft_len"):
        tidar.patch(model, draft_len=0)
    with pytest.raises(ValueError, match="mask_token_id"):
        tidar.patch(model, mask_token_id=10_000)
    with pytest.raises(ValueError, match="backend"):
        tidar.patch(model, backend="fast")
    assert not tidar.is_patched(model) and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="tidar.patch"):
        tidar.generate(model, IDS)


def test_nan_logits_raise_and_leave_model(model):
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        tidar.generate(model, IDS, max_new_tokens=4)
    assert all(torch.equal(v, state[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())


def test_cache_overflow_leaves_cache_untouched():
    cache = TidarCache(2, 10)
    k = torch.randn(2, 2, 6, 8)
    cache.append(0, k, k + 1, torch.tensor([0, 2], dtype=torch.int32))
    cache.commit([3, 4])
    snap = (cache.keys[0].clone(), cache.values[0].clone(), list(cache.lengths))
    with pytest.raises(ValueError, match="overflow"):
        cache.append(0, k, k, torch.tensor([3, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="overflow"):
        cache.check_room(7)
    with pytest.raises(ValueError, match="commit"):
        cache.commit([8, 0])
    with pytest.raises(ValueError, match="batch"):
        cache.append(0, k[:1], k[:1], torch.tensor([0], dtype=torch.int32))
    assert torch.equal(cache.keys[0], snap[0]) and torch.equal(cache.values[0], snap[1])
    assert cache.lengths == snap[2]
