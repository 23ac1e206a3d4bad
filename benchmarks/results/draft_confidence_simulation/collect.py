"""Per position t of each prompt's greedy continuation: the proposal block that sees the text up to t - 1 (slot s
predicts token t + s), its drafts (slots 1..K-1; token t itself is the AR head's), how many the greedy continuation
accepts, each slot's confidence (softmax max) and whether slot 0 agrees with the AR token. The drafts of TiDAR with
every proposal level (the paper's step), without running the decoder.

    OMP_NUM_THREADS=1 python benchmarks/results/draft_confidence_simulation/collect.py MODEL_DIR OUT.pkl
"""

import json
import pickle
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import tidar
from tidar.cli.demo import bundled_model_dir
from tidar.hf.attention import TidarStep, tidar_forward
from tidar.ordinary_prompts import PROMPTS
from tidar_kernels import layouts

K, N = 16, 96
mdir, out = sys.argv[1], sys.argv[2]
tok = PreTrainedTokenizerFast.from_pretrained(mdir)
hf = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
model = tidar.patch(AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval())
demo = json.load(open(f"{bundled_model_dir()}/demo_prompts.json"))["prompts"]
ordinary = [p for ps in PROMPTS.values() for p in ps][::3]
rows = []
for cls, prompts in (("demo", demo), ("ordinary", ordinary)):
    for pi, p in enumerate(prompts):
        x = tok(p, return_tensors="pt")["input_ids"]
        g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N + K, do_sample=False, eos_token_id=None)
        seq, n0 = g[0].tolist(), x.shape[1]
        for t in range(n0, n0 + N):
            lay = layouts.prefill(t, K)
            ids = torch.tensor([seq[:t] + [model.config.mask_token_id] * K])
            step = TidarStep(lay, torch.zeros(1, dtype=torch.int32), None, "auto")
            with torch.no_grad():
                probs = tidar_forward(model, ids, lay.position_ids[None].long(), step).logits[0, t:].softmax(-1)
            conf, arg = probs.max(-1)
            truth, drafts = seq[t : t + K], arg.tolist()
            acc = 0
            while acc < K - 1 and drafts[acc + 1] == truth[acc + 1]:
                acc += 1
            rows.append(dict(cls=cls, prompt=pi, acc=acc, conf=conf.tolist(), slot0=drafts[0] == truth[0]))
pickle.dump(rows, open(out, "wb"))
