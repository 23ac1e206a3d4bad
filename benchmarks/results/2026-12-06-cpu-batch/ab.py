"""Batch groups of ``bench_prompts`` (greedy batch 4 and 16, sampled batch 4 at T = 0.8; 96 new tokens) in one
process, HF AR and TiDAR interleaved round by round, best round kept: TiDAR as committed ("new") and TiDAR with
the previous pricing of a batch step ("old": ``SlotCurve.host_ms_batch`` left empty, i.e. the host work
extrapolated from batch 1 and 4, as before this change). The pacing-row change of ``Planner.choose`` gives the
same plans either way (it only skips per-row work), so "old" here still has it.

    PYTHONPATH=. python benchmarks/results/2026-12-06-cpu-batch/ab.py [rounds] [g4,g16,s4] > out.json
"""

import copy
import dataclasses
import json
import platform
import sys
import time

import torch
import transformers

import tidar
import tidar.decode.decoder as decoder
from benchmarks.bench_prompts import _hf_kwargs, _left_padded
from benchmarks.ordinary_prompts import PROMPTS
from tidar.cli.demo import bundled_model_dir
from tidar.train.checkpoint import load_checkpoint

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
N = 96
calibrated = decoder._host_calibrated


def old_pricing(model, batch=1):
    return dataclasses.replace(calibrated(model, batch), host_ms_batch={})


def main():
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    td, tok, _ = load_checkpoint(bundled_model_dir(), device=torch.device("cpu"))
    td.eval()
    hf = copy.deepcopy(td)
    tidar.patch(td)
    texts = [p for ps in PROMPTS.values() for p in ps]
    groups = {
        "g4": [(4, s, 0.0) for s in (0, 12, 24)],
        "g16": [(16, s, 0.0) for s in (0, 16)],
        "s4": [(4, s, 0.8) for s in (0, 12, 24)],
    }
    groups = [g for name in sys.argv[2].split(",") for g in groups[name]] if len(sys.argv) > 2 else groups["g16"]
    rows = []
    for B, s, T in groups:
        ids, mask = _left_padded(tok, texts[s : s + B], "cpu")
        kw = _hf_kwargs(tok, N, do_sample=T > 0)
        if T > 0:
            kw.update(temperature=T, top_k=0, top_p=1.0)
        best = {"hf": 1e9, "new": 1e9, "old": 1e9}
        tpf, same = {}, True
        for r in range(ROUNDS + 1):  # round 0: warm-up (calibration at this batch), not counted
            t0 = time.perf_counter()
            a = hf.generate(ids, attention_mask=mask, **kw)
            t_hf = time.perf_counter() - t0
            for name in ("new", "old"):
                decoder._host_calibrated = calibrated if name == "new" else old_pricing
                g = torch.Generator().manual_seed(r)
                t0 = time.perf_counter()
                o = tidar.generate(
                    td, ids, attention_mask=mask, max_new_tokens=N, temperature=T, generator=g, eos_token_id=[]
                )
                dt = time.perf_counter() - t0
                if r:
                    best[name] = min(best[name], dt)
                tpf[name] = o.tokens_per_forward
                if T == 0:
                    same = same and torch.equal(a, o.sequences)
            decoder._host_calibrated = calibrated
            if r:
                best["hf"] = min(best["hf"], t_hf)
        row = {"batch": B, "first_prompt": s, "temperature": T, "hf_tok_s": B * N / best["hf"]}
        for name in ("new", "old"):
            row[f"x_ar_{name}"] = best["hf"] / best[name]
            row[f"tpf_{name}"] = tpf[name]
        row["identical"] = same if T == 0 else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "rounds": ROUNDS,
        "new_tokens": N,
    }
    print(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
