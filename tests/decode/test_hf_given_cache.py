"""A caller's ``cache`` (``past_key_values``) in the drop-in ``generate``: filled with the whole sequence and
returned (the same object), as HF's ``generate`` fills it, with or without ``return_dict_in_generate``, empty or
holding the prefix of an earlier call. Two families, a left-padded batch, dynamic and static caches."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import tidar

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

FAMILIES = ("llama", "qwen2")
BATCH = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 20, 21, 22, 23, 24]])
BATCH_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def _pair(arch):
    twin = tiny_model(arch)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=4)
    return model, twin


def _cache(kind, model):
    from transformers import DynamicCache, StaticCache

    cfg = model.config.get_text_config(decoder=True)
    return StaticCache(config=cfg, max_cache_len=24) if kind == "static" else DynamicCache(config=cfg)


def _same_keys(got, want, real):
    assert got.get_seq_length() == want.get_seq_length()
    for g, w in zip(got.layers, want.layers):
        assert g.keys.shape == w.keys.shape
        n = real.shape[1]
        for a, b in ((g.keys, w.keys), (g.values, w.values)):
            torch.testing.assert_close(a[:, :, :n].transpose(1, 2)[real], b[:, :, :n].transpose(1, 2)[real])


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("return_dict", [True, False])
def test_callers_cache_is_filled_as_hfs(arch, kind, return_dict):
    model, twin = _pair(arch)
    got_cache, want_cache = _cache(kind, model), _cache(kind, twin)
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=7, do_sample=False, return_dict_in_generate=return_dict)
    got = model.generate(BATCH, cache=got_cache, **kw)
    want = twin.generate(BATCH, cache=want_cache, **kw)
    if return_dict:
        assert got.past_key_values is got_cache and want.past_key_values is want_cache
        got, want = got.sequences, want.sequences
    assert torch.equal(got, want)
    real = torch.cat([BATCH_MASK, torch.ones(3, 6, dtype=torch.long)], 1).bool()  # the 12 cached positions
    _same_keys(got_cache, want_cache, real)


@pytest.mark.parametrize("arch", FAMILIES)
def test_continuing_fills_the_callers_cache(arch):
    model, twin = _pair(arch)
    got_cache, want_cache = _cache("dynamic", model), _cache("dynamic", twin)
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=4, do_sample=False)
    first = model.generate(BATCH, cache=got_cache, **kw)
    assert torch.equal(first, twin.generate(BATCH, cache=want_cache, **kw))
    mask = torch.cat([BATCH_MASK, torch.ones(3, 4, dtype=torch.long)], 1)
    more = dict(kw, attention_mask=mask)
    got = model.generate(first, cache=got_cache, **more)
    assert torch.equal(got, twin.generate(first, cache=want_cache, **more))
    _same_keys(got_cache, want_cache, torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1).bool())
