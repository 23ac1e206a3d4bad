"""The caller's ``position_ids`` in the drop-in ``generate`` (``hf_inputs.PromptPositions``): prompt tokens at the
given positions, new tokens from the last given position + 1 on, as HF's ``generate`` extends them; sequences,
scores, hidden states and the returned cache equal HF's. Two families, a left-padded batch."""

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
HF_POSITIONS = (BATCH_MASK.cumsum(-1) - 1).masked_fill(BATCH_MASK == 0, 0)


def _pair(arch):
    twin = tiny_model(arch)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=4)
    return model, twin


CUSTOM = {
    "shifted": HF_POSITIONS + torch.tensor([[3], [10], [0]]),
    "padding at position 1 (HF's own tests)": HF_POSITIONS.masked_fill(BATCH_MASK == 0, 1),
    "gaps": torch.tensor([[0, 0, 0, 2, 4, 6], [0, 1, 2, 5, 6, 7], [0, 7, 8, 9, 10, 20]]),
    "one row for the batch": torch.arange(6)[None] + 2,
}


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_position_ids_equal_hf(arch, name):
    model, twin = _pair(arch)
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=9, do_sample=False, position_ids=CUSTOM[name])
    assert torch.equal(model.generate(BATCH, **kw), twin.generate(BATCH, **kw))


@pytest.mark.parametrize("arch", FAMILIES)
def test_custom_position_ids_outputs_equal_hf(arch):
    model, twin = _pair(arch)
    kw = dict(
        attention_mask=BATCH_MASK,
        max_new_tokens=6,
        do_sample=False,
        position_ids=CUSTOM["shifted"],
        return_dict_in_generate=True,
        output_scores=True,
    )
    for extra in (dict(), dict(output_hidden_states=True), dict(repetition_penalty=1.3)):
        got, want = model.generate(BATCH, **kw, **extra), twin.generate(BATCH, **kw, **extra)
        assert torch.equal(got.sequences, want.sequences)
        for g, w in zip(got.scores, want.scores):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        real = torch.cat([BATCH_MASK, torch.ones(3, 5, dtype=torch.long)], 1).bool()
        for g, w in zip(got.past_key_values.layers, want.past_key_values.layers):
            torch.testing.assert_close(g.keys.transpose(1, 2)[real], w.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
        if extra.get("output_hidden_states"):
            for g, w in zip(got.hidden_states[-1], want.hidden_states[-1]):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_custom_position_ids_refused_where_hf_decodes_otherwise():
    model, _ = _pair("llama")
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="right-padded row"):
        model.generate(BATCH[:1], attention_mask=right, position_ids=torch.arange(6)[None] + 4, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"position_ids must be a tensor \[batch, prompt length\]"):
        model.generate(BATCH, attention_mask=BATCH_MASK, position_ids=torch.arange(5)[None], max_new_tokens=3)
