"""``tidar train``'s held-out evaluation: AR perplexity and diffusion loss on fixed held-out windows, TiDAR greedy
tokens per forward on held-out prompts (diffusion drafts alone; with ``sampling`` also with context drafts and at
temperature 1), and the share of distinct 4-grams of the continuations."""

from __future__ import annotations

import math

import torch

from tidar.decode.decoder import generate
from tidar.train.objective import hybrid_loss


def eval_batches(stream: torch.Tensor, args):
    """Fixed, evenly spaced held-out windows (the same every evaluation)."""
    L, n = args.seq_len, args.eval_batches * args.batch_size
    count = max(1, (len(stream) - 1) // L)
    idx = sorted({int(i * count / n) for i in range(n)}) if count > n else list(range(count))
    rows = torch.stack([stream[i * L : (i + 1) * L] for i in idx]).long()
    return rows.split(args.batch_size)


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def distinct_ngram_share(token_lists, n: int = 4) -> float:
    """Distinct n-grams / all n-grams over the given token lists (1.0 = no repeated n-gram; a looping text -> 0)."""
    seen, total = set(), 0
    for i, toks in enumerate(token_lists):
        grams = [tuple(toks[j : j + n]) for j in range(len(toks) - n + 1)]
        seen.update((i, g) for g in grams)
        total += len(grams)
    return len(seen) / total if total else float("nan")


@torch.no_grad()
def evaluate(
    model, tokenizer, heldout_stream, prompts, args, device, draft_lens=None, max_new_tokens=None, sampling=False
):
    """Held-out AR loss/perplexity, diffusion loss, TiDAR greedy tokens per forward on ``prompts`` with diffusion
    drafts only (and the share of distinct 4-grams of those greedy continuations); with ``sampling``, also with
    context (n-gram) drafts added and, diffusion drafts only, at temperature 1."""
    was_training = model.training
    model.eval()
    ar, diff, n = 0.0, 0.0, 0
    with _autocast(device):
        for x in eval_batches(heldout_stream, args):
            r = hybrid_loss(model, x.to(device), args.block_size)
            ar += float(r.ar_loss) * len(x)
            diff += float(r.diffusion_loss) * len(x)
            n += len(x)
    out = {"ar_loss": ar / n, "ar_perplexity": math.exp(ar / n), "diffusion_loss": diff / n}
    out.update(
        decode_stats(
            model,
            tokenizer,
            prompts,
            draft_lens or [args.draft_len],
            max_new_tokens or args.eval_new_tokens,
            args.seed,
            device,
            context=sampling,
            sampled=sampling,
        )
    )
    model.train(was_training)
    return out


@torch.no_grad()
def decode_stats(
    model, tokenizer, prompts, draft_lens, max_new_tokens, seed, device, context=False, sampled=False
) -> dict:
    """TiDAR greedy tokens per forward on ``prompts`` at each K with diffusion drafts only, and the share of
    distinct 4-grams of those greedy continuations (the same for every K: greedy TiDAR text is the AR text); with
    ``context``, also greedy with context (n-gram) drafts added (``generate``'s default); with ``sampled``, also
    with diffusion drafts only at temperature 1 (seeded from ``seed``)."""
    out = {}

    def mean(xs):
        return sum(xs) / len(xs)

    for K in draft_lens:
        tpf, texts, tpf_ctx, tpf_t1 = [], [], [], []
        for i, p in enumerate(prompts):
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            # the drafter alone (diffusion drafts, the paper's step); then generate's default, which may also
            # copy drafts from n-gram matches in the text (context drafts)
            res = generate(model, ids, max_new_tokens=max_new_tokens, draft_len=K, context_drafts=False)
            tpf.append(res.tokens_per_forward)
            texts.append(res.sequences[0, ids.shape[1] :].tolist())
            if context:
                res = generate(model, ids, max_new_tokens=max_new_tokens, draft_len=K, context_drafts=True)
                tpf_ctx.append(res.tokens_per_forward)
            if sampled:
                g = torch.Generator(device).manual_seed(seed * 1000 + i)
                res = generate(
                    model,
                    ids,
                    max_new_tokens=max_new_tokens,
                    draft_len=K,
                    temperature=1.0,
                    generator=g,
                    context_drafts=False,
                )
                tpf_t1.append(res.tokens_per_forward)
        if tpf:
            out[f"tokens_per_forward_k{K}"] = mean(tpf)
            out["distinct_4gram_share"] = distinct_ngram_share(texts)
        if tpf_ctx:
            out[f"tokens_per_forward_context_k{K}"] = mean(tpf_ctx)
        if tpf_t1:
            out[f"tokens_per_forward_t1_k{K}"] = mean(tpf_t1)
    return out
