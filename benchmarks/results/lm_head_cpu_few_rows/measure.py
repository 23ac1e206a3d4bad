"""The measurements of ../lm_head_cpu_few_rows.md: the LM head's GEMM for a few rows (interleaved, random order,
medians), then greedy decode steps of fixed plans on the bundled model with the old head (``hidden @ W^T`` with a
contiguous copy, one head call up to 24 rows) and the new one (``W @ hidden^T`` for 2+ rows) at one-call limits of
24 and 16 rows. Run from the repository root:
``OMP_NUM_THREADS=2 python benchmarks/results/lm_head_cpu_few_rows/measure.py``."""

import random
import statistics
import time

import torch

import tidar
import tidar.decode.forwards as fw
import tidar.hf.lm_head as lh
import tidar.ordinary_prompts as op
from tidar.cli.demo import bundled_model_dir
from tidar.train.checkpoint import load_checkpoint

torch.set_num_threads(2)
random.seed(0)


def medians(fs, reps=300):
    ts = {k: [] for k in fs}
    for _ in range(30):
        for f in fs.values():
            f()
    for _ in range(reps):
        ks = list(fs)
        random.shuffle(ks)
        for k in ks:
            t0 = time.perf_counter()
            fs[k]()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in ts.items()}


print("| rows | F.linear(h, W), us | h @ W^T (contiguous copy) | W @ h^T, transposed back contiguous |")
print("|---|---|---|---|")
W = torch.randn(4096, 256)
Wt = W.t().contiguous()
for m in (1, 2, 4, 6, 8, 12, 16, 20, 24):
    h = torch.randn(m, 256)
    r = medians(
        {
            "linear": lambda h=h: torch.nn.functional.linear(h, W),
            "copy": lambda h=h: h @ Wt,
            "wht": lambda h=h: torch.mm(W, h.t()).t().contiguous(),
        }
    )
    print(f"| {m} | {r['linear']:.0f} | {r['copy']:.0f} | {r['wht']:.0f} |")

td, tok, _ = load_checkpoint(bundled_model_dir(), device="cpu")
td.eval()
tidar.patch(td)
ids = torch.tensor([tok.encode(op.PROMPTS["function"][0])])
new = lh.OutputHead._project


def old(self, hidden):
    w = self.proj.weight
    memo = self._wt
    if memo is None or memo[0] is not w or memo[1] != w._version:
        memo = self._wt = (w, w._version, w.detach().t().contiguous())
    return hidden @ memo[2]


variants = {"old head, one call <= 24": (old, 24), "new head, <= 24": (new, 24), "new head, <= 16": (new, 16)}
plans = [(1, None), (2, None), (3, None), (3, (1,)), (4, (1,)), (4, None), (8, (1,)), (6, (1, 2))]
res = {(p, v): [] for p in plans for v in variants}
for rep in range(8):
    order = list(res)
    random.shuffle(order)
    for (K, lv), v in order:
        lh.OutputHead._project, fw.ONE_HEAD_CALL_ROWS["cpu"] = variants[v]
        dec = tidar.Decoder(
            td, ids, max_new_tokens=80, eos_token_id=[], draft_len=K, proposal_levels=lv, context_drafts=False
        )
        dec.prefill()
        while not dec.finished:
            pl = dec.plan()
            t0 = time.perf_counter()
            dec.step(pl)
            if pl.plan.draft_len == K and rep > 0:
                res[((K, lv), v)].append((time.perf_counter() - t0) * 1e3)
print()
print("| plan (K, levels) | S | " + " | ".join(variants) + " | old / new (<= 16) |")
print("|---|---|" + "---|" * (len(variants) + 1))
for K, lv in plans:
    S = K * (1 + (len(lv) if lv else (K if K > 1 else 0)))
    ms = [statistics.median(res[((K, lv), v)]) for v in variants]
    name = "all" if lv is None else str(lv)
    print(f"| {K}, {name} | {S} | " + " | ".join(f"{x:.2f}" for x in ms) + f" | {ms[0] / ms[2]:.2f}x |")
