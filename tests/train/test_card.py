"""``tidar train --evaluate DIR --card``: the model card's sets (held-out stdlib, torch/transformers sources, the
ordinary prompts) are fixed whatever the model trained on, and every number it reports is measured."""

from __future__ import annotations

import math

import pytest
from test_train import TINY, _args, _train, tiny_corpus  # noqa: F401  (module fixture)

from tidar import ordinary_prompts
from tidar.train import card as card_mod
from tidar.train import corpus as corpus_mod
from tidar.train import run as train_mod
from tidar.train.evaluation import distinct_ngram_share


def test_distinct_ngram_share_counts_repeats():
    assert distinct_ngram_share([list(range(10))]) == 1.0
    loop = [1, 2, 3] * 6  # 15 4-grams, 3 distinct
    assert distinct_ngram_share([loop]) == pytest.approx(3 / 15)
    # the same n-gram in two continuations counts once per continuation
    assert distinct_ngram_share([[1, 2, 3, 4], [1, 2, 3, 4]]) == 1.0
    assert math.isnan(distinct_ngram_share([[1, 2]]))


def test_package_texts_are_the_held_out_packages_evenly_spaced_and_deterministic():
    texts, versions = card_mod.package_texts(max_files=7)
    assert set(versions) == {corpus_mod.normalise_name(n) for n in corpus_mod.HELD_OUT_PACKAGES}
    assert 1 <= len(texts) <= 7 and all(texts)
    assert card_mod.package_texts(max_files=7) == (texts, versions)
    # files of both packages, not only the first one's
    assert any("torch" in t for t in texts) and any("transformers" in t for t in texts)


def test_package_texts_names_a_package_that_is_not_installed():
    with pytest.raises(FileNotFoundError, match="no-such-package"):
        card_mod.package_texts(names=("torch", "no-such-package"), max_files=2)


def test_card_evaluation_measures_every_set(tiny_corpus, tmp_path, monkeypatch):  # noqa: F811
    _, out = _train(tmp_path, tiny_corpus, "--max-steps", "2")
    prompts = ordinary_prompts.all_prompts()[:2]
    monkeypatch.setattr(card_mod, "all_prompts", lambda: prompts)
    monkeypatch.setattr(card_mod, "PACKAGE_FILES", 3)
    real = card_mod.package_texts
    monkeypatch.setattr(card_mod, "package_texts", lambda: real(max_files=3))
    args = _args("--evaluate", str(out), "--card", *TINY, "--eval-draft-lens", "2", "4")
    res = train_mod.evaluate_folder(args)
    std, pk, od = res["stdlib"], res["packages"], res["ordinary"]
    assert std["modules"] == corpus_mod.find_corpus().heldout_modules  # the stdlib split, not the training corpus
    for r in (std, pk):
        assert math.isfinite(r["ar_perplexity"]) and r["ar_perplexity"] > 1
        assert r["tokens_scored"] == 4 * 32  # --eval-batches 1 x --batch-size 4 windows of --seq-len 32
    assert pk["files"] == 3 and set(pk["versions"]) == {"torch", "transformers"}
    assert od["prompts"] == 2
    pen = res["ordinary_penalised"]
    assert pen["prompts"] == 2 and pen["repetition_penalty"] == card_mod.CARD_PENALTY
    assert 0.0 < pen["distinct_4gram_share"] <= 1.0 and pen["tokens_per_forward"] >= 1.0
    for K in (2, 4):
        assert 1.0 <= od[f"tokens_per_forward_k{K}"] <= K + 1
        assert 1.0 <= od[f"tokens_per_forward_context_k{K}"] <= K + 1
        assert 1.0 <= std[f"tokens_per_forward_k{K}"] <= K + 1
    assert 0.0 < od["distinct_4gram_share"] <= 1.0
    assert res["model"] == str(out)


def test_penalised_stats_decode_as_hf_generate_with_the_penalty(tiny_corpus, tmp_path):  # noqa: F811
    """``ordinary_penalised``: the patched ``model.generate`` under HF's repetition penalty, whose greedy text is
    HF's own under the same penalty."""
    import copy

    import torch

    import tidar
    from tidar.train.checkpoint import load_checkpoint

    _, out = _train(tmp_path, tiny_corpus, "--max-steps", "2")
    model, tok, _ = load_checkpoint(out, "cpu")
    hf = copy.deepcopy(model.eval())
    tidar.patch(model, draft_len=4, backend="reference")
    prompts = [p for _, p in ordinary_prompts.all_prompts()[:2]]
    res = card_mod.penalised_stats(model, tok, prompts, 1.5, 12, "cpu")
    assert res["prompts"] == 2 and res["repetition_penalty"] == 1.5 and res["tokens_per_forward"] >= 1.0
    texts = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=tok.pad_token_id,
        )
        texts.append(ref[0, ids.shape[1] :].tolist())
    assert res["distinct_4gram_share"] == distinct_ngram_share(texts)
