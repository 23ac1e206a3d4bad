"""The direct body's projections and the LM head on oneDNN-packed weights (``tidar.hf.cpu_packed``): the same
hidden states as the plain body (which ``test_direct_body.py`` proves bit-identical to the modules) within float32
rounding, greedy text equal to HF greedy, copies that follow the weights, and the plain ops wherever packing does
not apply (the switch, bf16, autograd, a failed check, the size limit)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import tiny_model, two_steps

import tidar
from tidar.hf import cpu_packed, direct_body
from tidar.hf.lm_head import output_head

pytestmark = pytest.mark.skipif(not cpu_packed.available()[0], reason=cpu_packed.available()[1] or "no oneDNN")

PROMPT = [5, 9, 14, 3, 27, 41, 8, 60, 2, 33, 17]


@pytest.fixture(autouse=True)
def _packing_on(monkeypatch):
    """The tests below decide the switch themselves (a TIDAR_CPU_PACKED=0 in the caller's environment is not theirs)."""
    monkeypatch.delenv(cpu_packed.ENV, raising=False)


def _two_steps(model, body):
    """``conftest.two_steps`` on ``PROMPT`` with 4 drafts: both forwards' hidden states and the K/V, in one list."""
    h1, h2, kv = two_steps(model, body, PROMPT, 4)
    return [h1, h2, *kv]


def _bodies(model, monkeypatch):
    """(the packed body, the plain body) of a patched model."""
    with torch.no_grad():
        packed = direct_body.decoder_body(model)
        monkeypatch.setenv(cpu_packed.ENV, "0")
        plain = direct_body.decoder_body(model)
        monkeypatch.delenv(cpu_packed.ENV)
    return packed, plain


def _close(model, monkeypatch):
    packed, plain = _bodies(model, monkeypatch)
    assert packed.packed is not None and plain.packed is None
    with torch.no_grad():
        got, want = _two_steps(model, packed), _two_steps(model, plain)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _random_biases(model):
    """Every bias away from its zero init, so a bias packed against the wrong rows shows."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _with_biases(arch):
    base = tiny_model(arch)
    cfg = base.config
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(3)
    return _random_biases(type(base)(cfg).eval())


def test_packed_body_matches_the_plain_body(arch, monkeypatch):
    model = tidar.patch(_random_biases(tiny_model(arch)))  # Qwen2's q/k/v biases
    assert direct_body.status(model) == f"direct ({arch})"  # before a request: nothing packed yet
    _close(model, monkeypatch)  # its plain body dropped the copies (the switch was off)
    assert direct_body.status(model) == f"direct ({arch})"
    with torch.no_grad():
        direct_body.decoder_body(model)
    assert direct_body.status(model) == f"direct ({arch}), packed CPU projections"


def test_biases_of_every_projection_are_packed_in_place(monkeypatch):
    """Llama with biases on q/k/v/o and the MLP: the fused q/k/v and gate/up biases line up with their rows."""
    model = tidar.patch(_with_biases("llama"))
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.up_proj.bias is not None
    _close(model, monkeypatch)


@pytest.mark.parametrize("family,cls", [("phi3", "Phi3ForCausalLM"), ("gemma", "GemmaForCausalLM")])
def test_fused_and_scaled_families(family, cls, monkeypatch):
    from family_models import build

    model, why = build(family, cls)
    if model is None:
        pytest.skip(f"no tiny {family}: {why}")
    model = tidar.patch(model.float())
    _close(model, monkeypatch)


@pytest.mark.parametrize("K", ["auto", 4])
def test_greedy_text_equals_hf_greedy(arch, K):
    ref = tiny_model(arch)
    model = tidar.patch(copy.deepcopy(ref))
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    got = tidar.generate(model, ids, max_new_tokens=40, draft_len=K)
    assert direct_body.status(model).endswith("packed CPU projections")
    assert torch.equal(got.sequences, want)


def test_copies_follow_in_place_updates_and_reloads(monkeypatch):
    model = tidar.patch(tiny_model("qwen2"))
    _close(model, monkeypatch)
    first = direct_body.decoder_body(model).packed
    with torch.no_grad():  # an optimizer step: same tensors, new versions
        for p in model.parameters():
            p.mul_(1.25)
    _close(model, monkeypatch)
    assert direct_body.decoder_body(model).packed is not first
    state = {k: v.clone() * 0.8 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new tensors
    _close(model, monkeypatch)


def _head_close(head, w, b=None, rows=3):
    h = torch.randn(1, rows, w.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(head(h), torch.nn.functional.linear(h, w, b), rtol=1e-4, atol=1e-5)


def test_lm_head_packed_for_every_row_count():
    model = tidar.patch(tiny_model("qwen2"))
    head, w = output_head(model), model.lm_head.weight
    for rows in (1, 2, 5, 40):
        _head_close(head, w, rows=rows)
    assert head._packed._memo is not None and head._packed._memo[1] is not None  # the packed path ran
    with torch.no_grad():
        w.add_(1.0)  # a new version: repacked
    _head_close(head, w)
    w.data = torch.randn_like(w)  # new storage, same Parameter and version: repacked
    _head_close(head, w)
    bias = torch.randn(w.shape[0], 2)[:, 0]  # a strided bias (oneDNN reads biases as contiguous)
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    assert not model.lm_head.bias.is_contiguous()
    _head_close(head, w, model.lm_head.bias)


def test_lm_head_switch_and_failure_keep_the_plain_path(monkeypatch):
    model = tidar.patch(tiny_model("qwen2"))
    head, w = output_head(model), model.lm_head.weight
    monkeypatch.setenv(cpu_packed.ENV, "0")
    _head_close(head, w)
    assert head._packed._memo is None
    monkeypatch.delenv(cpu_packed.ENV)
    monkeypatch.setattr(cpu_packed, "pack", lambda w: (_ for _ in ()).throw(RuntimeError("no primitive")))
    _head_close(head, w)  # the plain path, the reason logged
    assert head._packed._memo[1] is None


def test_copies_follow_to_and_data_assignment(monkeypatch):
    """``Module.to`` and ``param.data = ...`` keep each Parameter and its version but move its storage: the copies
    are made again (float32 again after a bf16 round trip: from the rounded weights), or dropped (bf16)."""
    ref = tiny_model("qwen2")
    model = tidar.patch(copy.deepcopy(ref))
    ids = torch.tensor([PROMPT])
    tidar.generate(model, ids, max_new_tokens=8)
    model.to(torch.bfloat16)
    assert direct_body.decoder_body(model).packed is None
    got = tidar.generate(model, ids, max_new_tokens=16).sequences
    want = copy.deepcopy(ref).to(torch.bfloat16).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16)
    assert torch.equal(got, want)
    model.to(torch.float32)
    _close(model, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    _close(model, monkeypatch)
    twin = copy.deepcopy(model)
    tidar.unpatch(twin)
    want = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=24).sequences, want)


def test_a_packing_error_keeps_the_plain_ops(monkeypatch, caplog):
    """oneDNN refusing a shape (or a primitive on another CPU) leaves the plain ops, with the reason, and exact text."""
    monkeypatch.setattr(cpu_packed, "pack", lambda w: (_ for _ in ()).throw(RuntimeError("no primitive")))
    ref = tiny_model("qwen2")
    model = tidar.patch(copy.deepcopy(ref))
    with caplog.at_level("INFO", logger="tidar"):
        assert direct_body.decoder_body(model).packed is None
    assert "packing failed: RuntimeError: no primitive" in caplog.text
    ids = torch.tensor([PROMPT])
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=16).sequences, want)


def test_the_switch_turns_it_off(monkeypatch):
    model = tidar.patch(tiny_model("qwen2"))
    monkeypatch.setenv(cpu_packed.ENV, "0")
    assert not cpu_packed.enabled()
    assert direct_body.decoder_body(model).packed is None
    assert direct_body.status(model) == "direct (qwen2)"


def test_bf16_keeps_the_plain_ops():
    model = tidar.patch(tiny_model("qwen2").to(torch.bfloat16))
    assert direct_body.decoder_body(model).packed is None
    assert direct_body.status(model) == "direct (qwen2)"


def test_inference_tensor_weights_keep_the_plain_ops():
    """Weights made under ``torch.inference_mode`` have no version counter to key copies on: plain ops, exact."""
    with torch.inference_mode():
        ref = tiny_model("qwen2")
    model = tidar.patch(ref)
    assert model.model.layers[0].self_attn.q_proj.weight.is_inference()
    assert direct_body.decoder_body(model).packed is None
    ids = torch.tensor([PROMPT])
    got = tidar.generate(model, ids, max_new_tokens=16).sequences
    tidar.unpatch(model)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)


def test_autograd_runs_the_plain_ops(monkeypatch):
    """With grad enabled the packed copies (no autograd) are not used: bit-identical to the plain body."""
    model = tidar.patch(tiny_model("qwen2"))
    packed, plain = _bodies(model, monkeypatch)
    assert packed.packed is not None
    with torch.enable_grad():
        got, want = _two_steps(model, packed), _two_steps(model, plain)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_failed_check_keeps_the_plain_ops(monkeypatch, caplog):
    """Copies that do not reproduce the plain body (here: every weight packed doubled) are refused, with the
    reason logged, and decoding stays exact."""
    real = cpu_packed.pack
    monkeypatch.setattr(cpu_packed, "pack", lambda w: real(w * 2))
    ref = tiny_model("llama")
    model = tidar.patch(copy.deepcopy(ref))
    with caplog.at_level("INFO", logger="tidar"):
        assert direct_body.decoder_body(model).packed is None
    assert "packed CPU projections off" in caplog.text and "differ from the plain body" in caplog.text
    assert direct_body.decoder_body(model).packed is None  # decided once for these weights
    ids = torch.tensor([PROMPT])
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    monkeypatch.setattr(cpu_packed, "pack", real)  # the head packs its own copy: keep it right
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=24).sequences, want)


def test_size_limit(monkeypatch):
    monkeypatch.setattr(cpu_packed, "MAX_BYTES", 1024)
    model = tidar.patch(tiny_model("qwen2"))
    body, reason = cpu_packed.packed_body(model, direct_body.decoder_body(model).layers, lambda p: "")
    assert body is None and "over the 0 MB of packed copies allowed" in reason


def test_holds_no_model_alive():
    model = tidar.patch(tiny_model("qwen2"))
    tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=8)
    assert direct_body.status(model).endswith("packed CPU projections")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
