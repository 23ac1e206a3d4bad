"""``compile_config`` and static caches in the drop-in ``generate`` (``tidar.decode.hf_compile``), in the shape of
HF's ``test_generate_compile_model_forward_fullgraph``: where HF's ``generate`` compiles the model's forward (a
static cache, on an accelerator or with ``compile_config._compile_all_devices``), TiDAR's decode steps run through
HF's compiled call (``fullgraph=True, dynamic=False``: one graph, no recompilation across steps and calls), with
greedy output equal to HF's; where HF does not compile, neither does TiDAR (HF's warning). Two families, a
left-padded batch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode import hf_compile

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

FAMILIES = ("llama", "qwen2")
BATCH = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 20, 21, 22, 23, 24]])
BATCH_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
OTHER = torch.tensor([[0, 0, 31, 32, 33, 34], [35, 36, 37, 38, 39, 40], [0, 41, 42, 43, 44, 45]])


def _compile_config(**kw):
    from transformers import CompileConfig

    cfg = CompileConfig(fullgraph=True, dynamic=False, **kw)
    cfg._compile_all_devices = True  # as HF's test: compile on a CPU too
    return cfg


def _pair(arch):
    twin = tiny_model(arch)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=4)
    return model, twin


@pytest.fixture
def step_spy(monkeypatch):
    """Counts the decode steps that ran through the compiled call, and their padded widths."""
    seen = []
    original = hf_compile.CompiledSteps._step

    def spy(self, kwargs):
        out = original(self, kwargs)
        seen.append(self.width)
        return out

    monkeypatch.setattr(hf_compile.CompiledSteps, "_step", spy)
    return seen


@pytest.mark.parametrize("arch", FAMILIES)
def test_compiled_decode_steps_equal_hf_without_recompiling(arch, step_spy):
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    model, twin = _pair(arch)
    torch.compiler.reset()
    counters.clear()
    kw = dict(max_new_tokens=9, do_sample=False, cache_implementation="static", compile_config=_compile_config())
    for prompt in (BATCH, OTHER):
        want = twin.generate(prompt, attention_mask=BATCH_MASK, max_new_tokens=9, do_sample=False)
        out = model.generate(prompt, attention_mask=BATCH_MASK, return_dict_in_generate=True, output_scores=True, **kw)
        assert torch.equal(out.sequences, want)
        assert isinstance(out.past_key_values, StaticCache)
        if prompt is BATCH:
            graphs = counters["stats"]["unique_graphs"]
    assert step_spy and len(set(step_spy)) == 1  # every decode step compiled, at one width
    assert counters["stats"]["unique_graphs"] == graphs == 1  # one graph, reused by the second call
    assert hasattr(model, "_compiled_call")  # HF's compiled call, as HF's generate leaves it


def test_sampling_through_the_compiled_forward(step_spy):
    model, _ = _pair("llama")
    out = model.generate(
        BATCH,
        attention_mask=BATCH_MASK,
        max_new_tokens=8,
        do_sample=True,
        top_k=20,
        cache_implementation="static",
        compile_config=_compile_config(),
    )
    assert out.shape == (3, 14) and step_spy


def test_no_compilation_where_hf_does_not_compile(step_spy):
    from transformers import CompileConfig

    model, twin = _pair("qwen2")
    want = twin.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=7, do_sample=False)
    for kw in (
        dict(compile_config=_compile_config()),  # a dynamic cache: HF warns and runs eagerly
        dict(compile_config=CompileConfig(), cache_implementation="static"),  # a CPU without _compile_all_devices
        dict(compile_config=_compile_config(), cache_implementation="static", disable_compile=True),
    ):
        got = model.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=7, do_sample=False, **kw)
        assert torch.equal(got, want)
    assert not step_spy and not hasattr(model, "_compiled_call")


def test_full_logits_false_is_refused_with_a_compiled_forward():
    model, _ = _pair("llama")
    with pytest.raises(ValueError, match="full_logits=False cannot be combined with a compiled forward"):
        model.generate(
            BATCH[:1],
            max_new_tokens=4,
            cache_implementation="static",
            compile_config=_compile_config(),
            full_logits=False,
        )


def test_an_instance_level_forward_is_kept(step_spy):
    """A forward set on the model object (as accelerate's hooks set it) is the model's forward again afterwards."""
    model, twin = _pair("llama")
    own = model.forward
    model.forward = own  # an instance attribute now
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=6, do_sample=False, cache_implementation="static")
    got = model.generate(BATCH, compile_config=_compile_config(), **kw)
    assert torch.equal(got, twin.generate(BATCH, **kw))
    assert step_spy and model.__dict__["forward"] is own


def test_compiled_with_position_ids_and_inputs_embeds(step_spy):
    """The caller's positions and an embeddings prompt (forward pre-hooks on the base model) trace with the rest."""
    model, twin = _pair("qwen2")
    pos = torch.tensor([[0, 0, 0, 2, 4, 6], [0, 1, 2, 5, 6, 7], [0, 7, 8, 9, 10, 20]])
    embeds = twin.get_input_embeddings()(BATCH).detach()
    base = dict(attention_mask=BATCH_MASK, max_new_tokens=8, do_sample=False, cache_implementation="static")
    for kw in (dict(input_ids=BATCH, position_ids=pos), dict(inputs_embeds=embeds, position_ids=pos)):
        got = model.generate(**kw, **base, compile_config=_compile_config())
        assert torch.equal(got, twin.generate(**kw, **base))
    assert step_spy
