"""tidar.patch / unpatch / add_mask_token on real HF models."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar


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
        tidar.attention.tidar_kernels.tidar_attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
        patched = model(ids).logits
    finally:
        tidar.attention.tidar_kernels.tidar_attention = orig
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
