"""`tidar train --init-from` on the families `tidar.patch` accepts: the patch's probe is the conversion's gate. On a
representative set (learned absolute positions, soft-capping, MoE, ...) the hybrid training forward equals its
written-out reference (docs/design.md §3.1), and a converted model trains, saves, loads and decodes exactly; a family
the probe refuses is refused at conversion with the probe's reason."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from family_models import MASK_ID, build, families
from test_train import _train, tiny_corpus  # noqa: F401  (module fixture)
from test_train_trainer import _tokenizer_without_mask

import tidar
import tidar_kernels
from tidar.train import checkpoint as ck_mod
from tidar.train import corpus as corpus_mod
from tidar.train.objective import hybrid_forward
from tidar_kernels import layouts

pytestmark = pytest.mark.usefixtures("module_one_thread")

CLASSES = dict(families())
# Representative families, with the config options that make their own path matter in a tiny model.
FAMILIES = {
    "llama": {},
    "gpt2": {},  # learned absolute positions: the mask half's positions 0..L-1 must reach the position embedding
    "gemma2": {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},  # small caps, so that they bite
    "phi3": {},
    "olmo2": {},
    "starcoder2": {},
    "mixtral": {},
    "qwen2_moe": {},
}
# What real checkpoints of a family set and the conversion must handle: GPT-2's attention dropout and tied
# embeddings (and a tokenizer without a mask token: the embeddings grow), MoE router logits (their auxiliary loss).
CONVERSION = {
    "gpt2": {"attn_pdrop": 0.1, "tie_word_embeddings": True},
    "mixtral": {"output_router_logits": True},
}
K = 4


def _tiny(family, seed=0, **overrides):
    model, why = build(family, CLASSES[family], seed=seed, **{**FAMILIES[family], **overrides})
    assert model is not None, why
    return model


def _reference_loss(model, x):
    """The hybrid loss written out: the model's own eager attention under the dense training mask (additive),
    positions 0..L-1 in both halves, mean AR and diffusion cross-entropies (alpha = 1)."""
    B, L = x.shape
    lay = layouts.training(L, K)
    visible = tidar_kernels.dense_mask(lay.local_limit, lay.block_id, 0, 2 * L)[:, None].expand(B, 1, -1, -1)
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    ids = torch.cat([x, torch.full_like(x, MASK_ID)], 1)
    pos = lay.position_ids[None].expand(B, -1)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    ar = F.cross_entropy(logits[:, : L - 1].flatten(0, 1), x[:, 1:].flatten())
    diff = F.cross_entropy(logits[:, L:].flatten(0, 1), x.flatten())
    return (ar + diff) / 2, logits.detach()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hybrid_loss_equals_the_dense_mask_reference(family):
    """Logits, loss and gradients (training mode) of the TiDAR hybrid forward == the model's own forward under
    the dense training mask."""
    model = _tiny(family, seed=1)
    ref = copy.deepcopy(model).train()
    ref.set_attn_implementation("eager")
    x = torch.randint(0, MASK_ID, (2, 16), generator=torch.Generator().manual_seed(0))
    want, want_logits = _reference_loss(ref, x)
    want.backward()
    tidar.patch(model, draft_len=K).train()
    got = tidar.hybrid_loss(model, x, K).loss
    got.backward()
    with torch.no_grad():
        torch.testing.assert_close(hybrid_forward(model, x, K), want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus):  # noqa: F811
    return corpus_mod.train_tokenizer(corpus_mod.find_corpus(tiny_corpus).train_files, 300)


def _save_source(folder, family, tokenizer):
    """A tiny AR model of ``family`` with the tokenizer's vocabulary, saved as an HF folder (no mask token set)."""
    model = _tiny(family, **CONVERSION.get(family, {}))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.mask_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_from_trains_saves_and_decodes_exactly(tiny_corpus, tokenizer, tmp_path, family):  # noqa: F811
    tok = _tokenizer_without_mask(tiny_corpus) if family == "gpt2" else tokenizer
    src = _save_source(tmp_path / "src", family, tok)
    state, out = _train(tmp_path, tiny_corpus, "--max-steps", "3", "--init-from", str(src), name="conv")
    assert [h["step"] for h in state["log_history"]] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["log_history"])
    model, tok, _ = ck_mod.load_checkpoint(out)
    assert model.config.model_type == family and model.config.mask_token_id == tok.mask_token_id
    if family == "gpt2":  # switched off at conversion (the TiDAR attention op has no dropout); the [MASK] row grew
        assert model.config.attn_pdrop == 0 and model.get_input_embeddings().weight.shape[0] == len(tok)
    if family == "mixtral":
        assert model.config.output_router_logits is False
    tidar.patch(model, draft_len=K)
    ids = tok("def f(x):\n", return_tensors="pt")["input_ids"]
    res = tidar.generate(model, ids, max_new_tokens=12)
    tidar.unpatch(model)
    assert torch.equal(res.sequences, model.generate(ids, max_new_tokens=12, do_sample=False))


def test_a_family_the_probe_refuses_is_refused_at_conversion(tiny_corpus, tokenizer, tmp_path):  # noqa: F811
    """GPT-OSS (attention sinks): the error names --init-from and the probe's own reason, before any step."""
    model, why = build("gpt_oss", CLASSES["gpt_oss"])
    assert model is not None, why
    with pytest.raises(tidar.UnsupportedModel) as probe:
        tidar.patch(model, draft_len=K)
    reason = str(probe.value).split("is not supported: ", 1)[1].removesuffix(" The model is unchanged.")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=re.escape(reason)) as err:
        _train(tmp_path, tiny_corpus, "--max-steps", "1", "--init-from", str(tmp_path / "src"))
    assert str(err.value).startswith(f"--init-from {tmp_path / 'src'} cannot be trained with TiDAR: gpt_oss")
    assert not (tmp_path / "run").exists()
