"""Which draft slots a model gets right: per slot of a diffusion block, how often the greedy token is the drafter's
top-1 / top-2 / top-4 / top-8, and how often every slot up to it is top-1 (what a chain of drafts is accepted on).

Measured on the model's own greedy continuations (what a greedy verifier accepts) of the ordinary prompts
(``tidar/ordinary_prompts.py``), 128 new tokens each, in the training layout with blocks of ``--block`` masks: a
block at position p sees the tokens before p, its slot s predicts token p + s. Slot 0 is the token the AR head
already gives (the bonus token of a step), so a step's first useful draft is slot 1. Blocks inside a prompt are
skipped; every shift of the block grid is used, so every generated position starts a block once.

usage: python models/next/slot_coverage.py MODEL_DIR [--block 8] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

import tidar
from tidar.ordinary_prompts import all_prompts
from tidar.train.checkpoint import load_checkpoint
from tidar.train.objective import hybrid_forward

TOPS = (1, 2, 4, 8)


def greedy_continuations(model, tok, new_tokens: int):
    """``[(prompt length, prompt + greedy continuation ids)]`` for every ordinary prompt (EOS not stopping)."""
    out = []
    for _, prompt in all_prompts():
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        seq = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
        out.append((ids.shape[1], seq[0]))
    return out


def slot_coverage(model, seqs, block: int):
    """``(top-k hits [block, len(TOPS)], chain hits [block], blocks counted)``; ``model`` patched."""
    hits = torch.zeros(block, len(TOPS))
    chain = torch.zeros(block)
    n = 0
    for shift in range(block):
        for plen, seq in seqs:
            L = (len(seq) - shift) // block * block
            x = seq[shift : shift + L][None]
            logits = hybrid_forward(model, x, block)[0, L:]  # the mask half: row p predicts x[p]
            for p in range(0, L, block):
                if p + shift < plen:
                    continue
                top = logits[p : p + block].topk(max(TOPS), -1).indices  # [block, 8]
                hit = top == x[0, p : p + block, None]  # [block, 8]
                for i, k in enumerate(TOPS):
                    hits[:, i] += hit[:, :k].any(-1).float()
                chain += hit[:, 0].float().cumprod(0)
                n += 1
    return hits, chain, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, _ = load_checkpoint(a.model_dir, "cpu")
    model.eval()
    with torch.no_grad():
        seqs = greedy_continuations(model, tok, a.new_tokens)
        tidar.patch(model, draft_len=a.block)
        hits, chain, n = slot_coverage(model, seqs, a.block)
    print(f"{a.model_dir}: {n} blocks of {a.block} on {len(seqs)} greedy continuations of {a.new_tokens} tokens")
    print("| slot | " + " | ".join(f"top-{k}" for k in TOPS) + " | chain (top-1 at every slot <= s) |")
    print("|---" * (len(TOPS) + 2) + "|")
    for s in range(a.block):
        print(f"| {s} | " + " | ".join(f"{float(h) / n:.3f}" for h in hits[s]) + f" | {float(chain[s]) / n:.3f} |")


if __name__ == "__main__":
    main()
