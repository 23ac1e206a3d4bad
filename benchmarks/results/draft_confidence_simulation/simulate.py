"""Would choosing each step's draft count from the drafts' own confidences beat the best fixed count?

    python benchmarks/results/draft_confidence_simulation/simulate.py ROWS.pkl COSTS.json

COSTS.json: {"K,levels": ms} of greedy steps at batch 1 (``SlotCurve.greedy_step``). A step that verifies n
diffusion drafts costs the step at K = n + 1 with one proposal level (n = 0: a plain AR step) and yields
1 + min(accepted, n) tokens. The gated policy takes, per step, the n with the best expected tokens per ms, the
expectation being the product of calibrated per-slot acceptance rates (bins of confidence, fitted on the same rows:
an optimistic bound for the policy).
"""

import json
import pickle
import sys

import numpy as np

rows, costs = pickle.load(open(sys.argv[1], "rb")), json.load(open(sys.argv[2]))
BINS = np.array([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01])


def cost(n):
    return costs[f"{n + 1},{0 if n == 0 else 1}"]


for cls in ("demo", "ordinary"):
    R = [r for r in rows if r["cls"] == cls]
    acc = np.array([r["acc"] for r in R])
    agree = np.array([r["slot0"] for r in R])
    c1 = np.array([r["conf"][1] for r in R])
    ok, tried = np.zeros(len(BINS)), np.zeros(len(BINS))
    for r in R:
        for i in range(1, 16):
            if r["acc"] < i - 1:
                break
            b = np.searchsorted(BINS, r["conf"][i], side="right") - 1
            tried[b] += 1
            ok[b] += r["acc"] >= i
    cal = (ok + 1) / (tried + 2)
    fixed = {n: np.mean([1 + min(a, n) for a in acc]) / cost(n) for n in range(16)}
    best = max(fixed, key=fixed.get)
    tok = ms = 0.0
    for r in R:
        run, e, vals = 1.0, 1.0, [(1.0 / cost(0), 0)]
        for n in range(1, 16):
            run *= cal[np.searchsorted(BINS, r["conf"][n], side="right") - 1]
            e += run
            vals.append((e / cost(n), n))
        n = max(vals)[1]
        tok += 1 + min(r["acc"], n)
        ms += cost(n)
    first = (acc >= 1).mean()
    print(f"{cls}: {len(R)} positions, accepted drafts {acc.mean():.3f}, P(first draft accepted) {first:.3f}")
    yes, no = (acc[agree] >= 1).mean(), (acc[~agree] >= 1).mean()
    print(f"  slot 0 agrees with the AR token: {agree.mean():.2f} of steps; then P(first) {yes:.3f}, else {no:.3f}")
    for lo, hi in ((0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.01)):
        m = (c1 >= lo) & (c1 < hi)
        print(f"  first draft's confidence [{lo}, {hi}): {m.sum()} steps, P(accepted) {(acc[m] >= 1).mean():.3f}")
    ar, fx, gated = fixed[0], fixed[best], tok / ms
    print(f"  tokens per ms: AR {ar:.4f}, best fixed n = {best} {fx:.4f} ({fx / ar:.3f}x AR)")
    print(f"  gated {gated:.4f} ({gated / ar:.3f}x AR, {gated / fx:.3f}x the best fixed)")
