"""``tidar train --evaluate DIR --card``: the model card's held-out table, measured the same way for every model
(the bundled one, its predecessor, an AR-only baseline), whatever corpus each was trained on:

- ``stdlib``: the held-out modules of the standard library (``find_corpus()``'s split, the same for every model):
  AR perplexity and diffusion loss on fixed windows; TiDAR greedy tokens per forward at each K (diffusion drafts
  alone) on prompts from those files, and the share of distinct 4-grams of the greedy continuations;
- ``packages``: source files of packages no model trains on (``HELD_OUT_PACKAGES``: torch, transformers): AR
  perplexity on fixed windows of an evenly spaced, deterministic selection of their files;
- ``ordinary_penalised``: the same prompts decoded by the patched ``model.generate`` with HF's repetition penalty
  ``CARD_PENALTY`` (greedy on the processed scores, TiDAR verifying against them): distinct 4-grams and tokens per
  forward (what ``tidar demo --repetition-penalty 1.2`` shows);
- ``ordinary``: the ordinary code prompts (``tidar.ordinary_prompts``, never trained or tuned on): tokens per
  forward at each K (diffusion drafts alone, and ``generate``'s default with context drafts) and the share of
  distinct 4-grams of the greedy continuations (1 = no repeated 4-gram; a loop drives it towards 0).
"""

from __future__ import annotations

import math
import time

import torch

from tidar.ordinary_prompts import all_prompts
from tidar.train import corpus as corpus_mod
from tidar.train.evaluation import decode_stats, distinct_ngram_share, evaluate

CARD_PENALTY = 1.2  # HF's repetition_penalty of the card's penalised row (1.2: the value HF's docs suggest)
PACKAGE_FILES = 400  # files of torch + transformers scored (evenly spaced over their sorted paths)


def package_texts(names=corpus_mod.HELD_OUT_PACKAGES, max_files: int = PACKAGE_FILES) -> tuple[list, dict]:
    """Source texts of the installed distributions ``names`` (tests, caches and vendored copies skipped): every
    n-th file of their sorted paths, at most ``max_files``; and {name: version} of what was read."""
    wanted = {corpus_mod.normalise_name(n) for n in names}
    files, versions = [], {}
    for d in corpus_mod.installed_distributions():
        name = corpus_mod.normalise_name(d.metadata["Name"] or "")
        if name in wanted and name not in versions:
            versions[name] = d.version
            files += [p for p, _ in corpus_mod._dist_py_files(d, corpus_mod.DEFAULT_EXTENSIONS)]
    missing = wanted - set(versions)
    if missing:
        raise FileNotFoundError(f"--card scores installed packages it cannot find: {sorted(missing)}")
    files = sorted(files)
    step = max(1, math.ceil(len(files) / max_files))
    return [corpus_mod.read_text(f) for f in files[::step]], versions


def card_evaluation(model, tokenizer, args, device) -> dict:
    """The three held-out sets above for ``model`` (``--eval-*``, ``--seq-len``, ``--block-size`` as given)."""
    was_training = model.training
    model.eval()
    lens = args.eval_draft_lens or [4, 16]
    t0 = time.time()
    std = corpus_mod.find_corpus()
    held = corpus_mod.encode_texts(tokenizer, std.heldout_texts())
    prompts = corpus_mod.heldout_prompts(tokenizer, std, args.eval_prompts)
    out = {"stdlib": evaluate(model, tokenizer, held, prompts, args, device, lens, args.eval_new_tokens)}
    scored = min(len(held) // args.seq_len, args.eval_batches * args.batch_size) * args.seq_len
    out["stdlib"].update(prompts=len(prompts), tokens_scored=scored, modules=std.heldout_modules)
    texts, versions = package_texts()
    stream = corpus_mod.encode_texts(tokenizer, texts)
    out["packages"] = evaluate(model, tokenizer, stream, [], args, device, lens, args.eval_new_tokens)
    scored = min(len(stream) // args.seq_len, args.eval_batches * args.batch_size) * args.seq_len
    out["packages"].update(files=len(texts), versions=versions, tokens_scored=scored)
    ordinary = [p for _, p in all_prompts()]
    out["ordinary"] = decode_stats(
        model, tokenizer, ordinary, lens, args.eval_new_tokens, args.seed, device, context=True
    )
    out["ordinary"]["prompts"] = len(ordinary)
    out["ordinary_penalised"] = penalised_stats(model, tokenizer, ordinary, CARD_PENALTY, args.eval_new_tokens, device)
    out["eval_s"] = round(time.time() - t0, 1)
    model.train(was_training)
    return out


@torch.no_grad()
def penalised_stats(model, tokenizer, prompts, penalty: float, max_new_tokens: int, device) -> dict:
    """Greedy decoding under HF's repetition penalty through the patched ``model.generate`` (the model's default
    draft length, diffusion and context drafts): distinct 4-grams of the continuations and tokens per forward.
    ``min_new_tokens`` keeps every continuation at full length, as the unpenalised measures."""
    texts, tpf = [], []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        res = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=tokenizer.pad_token_id,
            tidar_stats=True,
        )
        texts.append(res.new_tokens[0])
        tpf.append(res.tokens_per_forward)
    return {
        "repetition_penalty": penalty,
        "distinct_4gram_share": distinct_ngram_share(texts),
        "tokens_per_forward": sum(tpf) / len(tpf),
        "prompts": len(prompts),
    }


__all__ = ["CARD_PENALTY", "card_evaluation", "package_texts", "penalised_stats"]
