"""Corpus (retrieval) drafts simulated on the bundled model's greedy text (../corpus_drafts_simulation.md).

``python simulate.py [ordinary|demo]``: for every position of each prompt's 128-token HF greedy continuation, the
accepted length of (a) a context draft (the continuation of the latest match of the text's last 3..1 tokens in the
text so far, as prompt lookup) and (b) a corpus draft (the most frequent 8-token continuation, token by token, of
the longest suffix of the text, 8..2 tokens, found in the standard library's training split).
"""

import collections
import json
import sys
import time

import numpy as np
import torch

import tidar.ordinary_prompts as op
from tidar.cli.demo import PROMPTS_FILE, bundled_model_dir
from tidar.train.checkpoint import load_checkpoint
from tidar.train.corpus import find_corpus, read_text

NS = (8, 6, 5, 4, 3, 2)
K = 8
P = np.int64(1000003)


def build_index(arr):
    idx = {}
    for n in NS:
        h = np.zeros(len(arr) - n + 1, dtype=np.int64)
        for j in range(n):
            h = h * P + arr[j : len(arr) - n + 1 + j]  # wraps around: the same in the query
        order = np.argsort(h, kind="stable")
        idx[n] = (h[order], order)
    return idx


def key(seq):
    with np.errstate(over="ignore"):
        v = np.int64(0)
        for x in seq:
            v = v * P + np.int64(x)
    return v


def corpus_draft(arr, idx, ctx, cap=512):
    for n in NS:
        if len(ctx) < n:
            continue
        hs, order = idx[n]
        k = key(ctx[-n:])
        lo, hi = np.searchsorted(hs, k, "left"), np.searchsorted(hs, k, "right")
        if hi > lo:
            conts = [tuple(arr[s : s + K]) for s in order[lo : min(hi, lo + cap)] + n if s + K <= len(arr)]
            out = []
            while len(out) < K and conts:
                tok, _ = collections.Counter(c[len(out)] for c in conts).most_common(1)[0]
                if tok == 0:  # the file separator
                    break
                out.append(int(tok))
                conts = [c for c in conts if c[len(out) - 1] == tok]
            return out
    return []


def context_draft(ctx, maxn=3):
    for n in range(maxn, 0, -1):
        for s in range(len(ctx) - n - 1, -1, -1):
            if ctx[s : s + n] == ctx[-n:]:
                return ctx[s + n : s + n + K]
    return []


def accepted(draft, truth):
    k = 0
    for a, b in zip(draft, truth):
        if a != b:
            break
        k += 1
    return k


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "ordinary"
    model, tok, _ = load_checkpoint(bundled_model_dir(), device="cpu")
    model.eval()
    if which == "demo":
        prompts = json.loads((bundled_model_dir() / PROMPTS_FILE).read_text())["prompts"]
    else:
        prompts = [p for ps in op.PROMPTS.values() for p in ps]
    t0 = time.time()
    texts = [read_text(f) for f in find_corpus().train_files]
    arr = np.concatenate([np.array(e + [0], dtype=np.int64) for e in tok(texts, add_special_tokens=False)["input_ids"]])
    idx = build_index(arr)
    print(f"corpus: {len(arr)} tokens, {len(texts)} files, tokenized and indexed in {time.time() - t0:.1f} s")
    tot = collections.Counter()
    for p in prompts:
        ids = tok.encode(p)
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=128,
                min_new_tokens=128,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
        out = out[0, len(ids) :].tolist()
        for t in range(len(out) - K):
            ctx, truth = ids + out[:t], out[t : t + K]
            a_c, a_k = accepted(context_draft(ctx), truth), accepted(corpus_draft(arr, idx, ctx), truth)
            tot["positions"] += 1
            tot["context"] += a_c
            tot["corpus"] += a_k
            tot["better of both"] += max(a_c, a_k)
            if a_c == 0:
                tot["positions where context gives 0"] += 1
                tot["corpus there"] += a_k
    n, m = tot["positions"], max(1, tot["positions where context gives 0"])
    print(
        f"{which}: {len(prompts)} prompts, {n} positions; accepted tokens per position: context "
        f"{tot['context'] / n:.3f}, corpus {tot['corpus'] / n:.3f}, better of both {tot['better of both'] / n:.3f}; "
        f"corpus where context gives 0: {tot['corpus there'] / m:.3f} over {m} positions"
    )


if __name__ == "__main__":
    main()
