"""tidar.patch / unpatch / add_mask_token on real HF models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_patch_routes_attention_and_unpatch_restores_exactly(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 90, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    before_logits = model(ids).logits
    before_padded = model(ids, attention_mask=mask).logits
    before_state, impl = _state(model), model.config._attn_implementation
    assert "generate" not in model.__dict__

    tidar.patch(model, draft_len=4)
    assert model.config._attn_implementation == "tidar" and tidar.is_patched(model)
    calls = []
    import tidar_kernels

    orig = tidar_kernels.tidar_attention
    try:  # every layer's attention goes through tidar_kernels.tidar_attention
        tidar.hf.attention.tidar_kernels.tidar_attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
        patched = model(ids).logits
    finally:
        tidar.hf.attention.tidar_kernels.tidar_attention = orig
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(patched, before_logits, atol=1e-5, rtol=1e-5)
    # a padded plain forward is not a TiDAR layout: it still matches HF
    padded = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[mask.bool()], before_padded[mask.bool()], atol=1e-5, rtol=1e-5)

    tidar.patch(model, draft_len=8)  # idempotent: settings updated, originals still remembered
    assert tidar.patch.__module__ and model._tidar.draft_len == 8
    tidar.unpatch(model)
    assert not tidar.is_patched(model)
    assert model.config._attn_implementation == impl
    assert "generate" not in model.__dict__
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, before_logits)
    tidar.unpatch(model)  # no-op


def test_patch_keeps_an_instance_generate():
    model = tiny_model("qwen2")
    sentinel = lambda *a, **k: "own"  # noqa: E731
    model.generate = sentinel
    tidar.patch(model, draft_len=2)
    assert model.generate is not sentinel
    tidar.unpatch(model)
    assert model.generate is sentinel


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def test_add_mask_token_resizes_and_round_trips(tmp_path):
    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(30)]
    tok = _tokenizer(words)
    model = tiny_model("llama", vocab=len(words))
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="add_mask_token"):
        tidar.patch(model)
    mask_id = tidar.add_mask_token(model, tok)
    assert mask_id == len(words) and tok.mask_token == "[MASK]"
    assert model.get_input_embeddings().weight.shape[0] >= len(words) + 1
    assert model.config.mask_token_id == mask_id
    assert tidar.add_mask_token(model, tok) == mask_id  # idempotent
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.mask_token_id == mask_id
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("[MASK]") == mask_id
    tidar.patch(again, draft_len=4)  # mask token found in the config
    ids = torch.tensor([tok.encode("w1 w2 w3")])
    want = AutoModelForCausalLM.from_pretrained(tmp_path).generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8
    )
    assert torch.equal(again.generate(ids, do_sample=False, max_new_tokens=8), want)


# ---------------------------------------------------------------- the probe: in control, or refused
from family_models import build  # noqa: E402

from tidar.hf.probe import UnsupportedModel  # noqa: E402

REFUSED = [  # (model_type, class, config overrides, the refusal category: stable across transformers releases)
    ("gpt_oss", "GptOssForCausalLM", {}, "attention_variant"),
    ("stablelm", "StableLmForCausalLM", {}, "attention_not_reached"),
    ("nemotron", "NemotronForCausalLM", {}, "attention_not_reached"),
    ("falcon", "FalconForCausalLM", {}, "attention_not_reached"),
    ("gpt_neo", "GPTNeoForCausalLM", {}, "attention_not_reached"),
    ("bloom", "BloomForCausalLM", {}, "attention_not_reached"),
    ("mpt", "MptForCausalLM", {}, "attention_not_reached"),
    ("qwen3_next", "Qwen3NextForCausalLM", {}, "stateful_layers"),
    ("lfm2", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]}, "stateful_layers"),
    ("llama4_text", "Llama4ForCausalLM", {}, "attention_variant"),
    ("bart", "BartForCausalLM", {}, "logits_differ"),
    ("diffllama", "DiffLlamaForCausalLM", {}, "layer_structure"),
]


@pytest.mark.parametrize("model_type,cls_name,overrides,category", REFUSED, ids=[r[0] for r in REFUSED])
def test_patch_refuses_with_family_and_reason_and_leaves_model_exactly(model_type, cls_name, overrides, category):
    model, why = build(model_type, cls_name, **overrides)
    assert model is not None, why
    model.train()  # the probe runs in eval mode and must restore the flags
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    cfg = model.config.to_dict()
    rng = torch.get_rng_state()
    with pytest.raises(UnsupportedModel) as e:
        tidar.patch(model, draft_len=4)
    assert e.value.category == category, str(e.value)  # the category, not a sentence a given release produces
    assert str(e.value).startswith(f"tidar.patch: {model_type} ({type(model).__name__}) is not supported: ")
    assert str(e.value).endswith(". The model is unchanged.") and len(str(e.value)) > 80  # a reason is given
    assert isinstance(e.value, ValueError)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == impl and model.config.to_dict() == cfg
    assert not tidar.is_patched(model) and "generate" not in model.__dict__
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws no random numbers


def test_patch_keeps_training_flags_grad_mode_and_rng():
    model = tiny_model("llama")
    model.train()
    model.model.layers[1].eval()
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    tidar.patch(model, draft_len=4)
    assert [m.training for m in model.modules()] == flags and torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
    tidar.unpatch(model)


def test_softcapped_attention_is_served_exactly():
    """Gemma2's attn_logit_softcapping reaches the op (a small cap, so ignoring it would change the tokens)."""
    model, why = build("gemma2", "Gemma2ForCausalLM", attn_logit_softcapping=0.5, final_logit_softcapping=None)
    assert model is not None, why
    # eager applies the cap on every release; some releases' SDPA path drops it (the probe then refuses the model)
    model.set_attn_implementation("eager")
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    want_padded = model(ids, attention_mask=mask).logits
    tidar.patch(model, draft_len=4)
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=10).sequences, want)
    got_padded = model(ids, attention_mask=mask).logits  # a padded plain forward: explicit soft-capped softmax
    torch.testing.assert_close(got_padded[:, 2:], want_padded[:, 2:], atol=1e-5, rtol=1e-5)
    calls = []
    orig = tidar.hf.attention.tidar_kernels.tidar_attention
    try:
        tidar.hf.attention.tidar_kernels.tidar_attention = lambda *a, **k: calls.append(a[7]) or orig(*a, **k)
        model(ids)
    finally:
        tidar.hf.attention.tidar_kernels.tidar_attention = orig
    assert calls == [0.5] * model.config.num_hidden_layers


def test_sliding_window_found_at_patch_and_refused_before_any_forward():
    model = tiny_model("mistral")
    model.config.sliding_window = 30
    tidar.patch(model, draft_len=2)
    assert model._tidar.window == 30 and "sliding window 30" in model._tidar.max_len_reason
    ids = torch.tensor([[5, 6, 7, 8]])
    forwards = []
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(ValueError, match="sliding window 30"):
            tidar.generate(model, ids, max_new_tokens=40)
    finally:
        handle.remove()
    assert forwards == []
    tidar.unpatch(model)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    tidar.patch(model, draft_len=2)
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=12, draft_len=2).sequences, want)
