"""The drop-in ``model.generate`` follows HF 5.24's rules: the same calls on the unpatched model (HF's own
greedy) and on the patched one (TiDAR) give the same sequences, the same ``warnings.warn`` warnings and the same
errors: ``max_length`` vs ``max_new_tokens`` precedence, the default of 20 new tokens capped at
``max_position_embeddings``, ``generation_config`` and ``model.generation_config``, ``eos_token_id`` as an int,
a list or a tensor, left-padded batches, a 25-token prompt with the defaults."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

import tidar

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest


MAX_POS = 64
P4 = torch.tensor([[5, 6, 7, 8]])
P25 = torch.arange(3, 28)[None]
P50 = (torch.arange(50)[None] * 7) % 90 + 1
BATCH = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
BATCH_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

CALLS = {  # name -> (positional prompt, kwargs, model.generation_config changes)
    "defaults": (P4, {}, {}),
    "defaults, 25-token prompt": (P25, {}, {}),
    "defaults near max_position_embeddings": (P50, {}, {}),
    "max_new_tokens": (P4, dict(max_new_tokens=5), {}),
    "max_length": (P4, dict(max_length=30), {}),
    "max_length and max_new_tokens": (P4, dict(max_length=30, max_new_tokens=3), {}),
    "generation_config": (P4, dict(generation_config=GenerationConfig(max_new_tokens=7)), {}),
    "model.generation_config": (P4, {}, dict(max_new_tokens=6)),
    "model.generation_config max_length": (P4, {}, dict(max_length=11)),
    "prompt longer than max_length": (P25, dict(max_length=20), {}),
    "do_sample=False explicit": (P4, dict(do_sample=False, max_new_tokens=9), {}),
    "left-padded batch": (BATCH, dict(attention_mask=BATCH_MASK, max_new_tokens=9), {}),
    "left-padded batch, defaults": (BATCH, dict(attention_mask=BATCH_MASK), {}),
    "input_ids keyword": (None, dict(input_ids=P4, max_new_tokens=6), {}),
}


def _eos_calls(model):
    """eos_token_id forms, with an EOS the free run emits early (so stopping and padding are exercised)."""
    free = model.generate(BATCH, attention_mask=BATCH_MASK, do_sample=False, max_new_tokens=12)
    eos = free[1, 5 + 2].item()
    return {
        "eos int": (BATCH, dict(attention_mask=BATCH_MASK, max_new_tokens=12, eos_token_id=eos), {}),
        "eos list": (BATCH, dict(attention_mask=BATCH_MASK, max_new_tokens=12, eos_token_id=[eos, 96]), {}),
        "eos tensor": (BATCH, dict(attention_mask=BATCH_MASK, max_new_tokens=12, eos_token_id=torch.tensor([eos])), {}),
        "eos + pad": (BATCH, dict(attention_mask=BATCH_MASK, max_new_tokens=12, eos_token_id=eos, pad_token_id=3), {}),
        "eos in model.generation_config": (
            BATCH,
            dict(attention_mask=BATCH_MASK, max_new_tokens=12),
            dict(eos_token_id=eos),
        ),
    }


def _run(model, prompt, kwargs, gen_changes):
    """(result or exception text, warnings.warn messages)."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(**{**saved.to_dict(), **gen_changes})
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                out = model.generate(prompt, **kwargs) if prompt is not None else model.generate(**kwargs)
            except ValueError as e:
                out = f"ValueError: {e}"
    finally:
        model.generation_config = saved
    msgs = sorted({str(x.message) for x in w if issubclass(x.category, UserWarning) and "tidar" not in str(x.message)})
    return out, msgs


def test_drop_in_generate_follows_hf_rules():
    model = tiny_model("qwen2", max_pos=MAX_POS)
    model.generation_config = GenerationConfig(pad_token_id=0)
    calls = {**CALLS, **_eos_calls(model)}
    want = {name: _run(model, *c) for name, c in calls.items()}
    tidar.patch(model, draft_len=4)
    failures = []
    for name, c in calls.items():
        got = _run(model, *c)
        (w_out, w_warn), (g_out, g_warn) = want[name], got
        same = (w_out == g_out) if isinstance(w_out, str) or isinstance(g_out, str) else torch.equal(w_out, g_out)
        if not same or w_warn != g_warn:
            failures.append(f"{name}: HF {w_out!r} {w_warn} vs TiDAR {g_out!r} {g_warn}")
    assert not failures, "\n".join(failures)
    assert want["defaults, 25-token prompt"][0].shape == (1, 45)  # HF completes it: 20 new tokens
    assert want["defaults near max_position_embeddings"][0].shape == (1, MAX_POS)
    assert isinstance(want["prompt longer than max_length"][0], str)
    assert any("default `max_length`" in m for m in want["defaults"][1])  # HF's warning, given by both


@pytest.mark.parametrize("generation_config", [GenerationConfig(do_sample=True, temperature=0.7, top_k=5)])
def test_drop_in_sampling_from_the_generation_config(generation_config):
    """A model whose generation_config samples: the drop-in samples too (same length rules; a generator
    makes it reproducible)."""
    model = tidar.patch(tiny_model("qwen2", max_pos=MAX_POS), draft_len=4)
    model.generation_config = generation_config
    a = model.generate(P4, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    b = model.generate(P4, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    greedy = model.generate(P4, max_new_tokens=10, do_sample=False)
    assert a.shape == b.shape == greedy.shape == (1, 14) and torch.equal(a, b)
