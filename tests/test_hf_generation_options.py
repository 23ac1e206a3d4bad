"""The drop-in ``model.generate`` against HF's own ``generate`` on an unpatched twin, in the shape of HF's
``GenerationTesterMixin``: the patch changes nothing shared, options are honoured or refused with a clear error
(never ignored), HF's logits processors run inside verification (greedy equal to HF token for token, sampling
with HF's processed distribution), HF's outputs and inputs. Two families (llama, qwen2), batches with left
padding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import tidar

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

FAMILIES = ("llama", "qwen2")
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])
BATCH = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 20, 21, 22, 23, 24]])
BATCH_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def _pair(arch, draft_len=4, **kw):
    """(patched model, unpatched twin with the same weights)."""
    twin = tiny_model(arch, **kw)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=draft_len)
    return model, twin


# ---------------------------------------------------------------------------------------- the patch is local


@pytest.mark.parametrize("arch", FAMILIES)
def test_patch_leaves_the_callers_config_untouched(arch):
    model = tiny_model(arch)
    cfg = model.config
    tidar.patch(model, draft_len=4)
    assert model.config._attn_implementation == "tidar"
    assert cfg._attn_implementation == "sdpa"  # the caller's object
    second = type(model)(cfg)  # a second model from the same config object is born as configured
    assert second.config._attn_implementation == "sdpa"
    assert not tidar.is_patched(second)
    tidar.unpatch(second)  # a no-op
    assert second.config._attn_implementation == "sdpa"
    tidar.unpatch(model)
    assert model.config is cfg
    assert all(getattr(m, "config", cfg) is cfg for m in model.modules())
    assert cfg._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", FAMILIES)
def test_output_attentions_on_a_plain_forward(arch):
    model, twin = _pair(arch)
    twin.set_attn_implementation("eager")
    for kw in (dict(input_ids=PROMPT), dict(input_ids=BATCH, attention_mask=BATCH_MASK)):
        got = model(**kw, output_attentions=True)
        want = twin(**kw, output_attentions=True)
        assert len(got.attentions) == len(want.attentions) == model.config.num_hidden_layers
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(got.logits[:, -1], want.logits[:, -1])
