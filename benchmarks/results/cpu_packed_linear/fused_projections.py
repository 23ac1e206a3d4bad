"""The bundled model's 28 projections + LM head for one forward of M rows: MKL's F.linear on the model's weights
(as the direct body ran them) against oneDNN on packed copies with q/k/v and gate/up fused (tidar.hf.cpu_packed).

    OMP_NUM_THREADS=2 python benchmarks/results/cpu_packed_linear/fused_projections.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "python"))
from best_us import best_us  # noqa: E402

from tidar.cli.demo import _load, bundled_model_dir  # noqa: E402
from tidar.hf import cpu_packed  # noqa: E402

torch.set_num_threads(2)
model, _ = _load(bundled_model_dir(), torch.device("cpu"))
layers, head = model.model.layers, model.lm_head.weight
packs = []
for layer in layers:
    a, m = layer.self_attn, layer.mlp
    qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
    gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
    packs.append([cpu_packed.pack(qkv), bias, cpu_packed.pack(a.o_proj.weight), cpu_packed.pack(gate_up)])
    packs[-1].append(cpu_packed.pack(m.down_proj.weight))
head_packed, head_t = cpu_packed.pack(head), head.detach().t().contiguous()


def mkl(x):
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
            F.linear(x, p.weight, p.bias)
        F.linear(F.silu(F.linear(x, m.gate_proj.weight)) * F.linear(x, m.up_proj.weight), m.down_proj.weight)
    rows = x.shape[1]
    return x @ head_t if rows == 1 else torch.mm(head, x.view(rows, -1).t()).t().contiguous()  # lm_head.py's


def packed(x):
    lin = cpu_packed.linear
    for qkv, bias, o, gate_up, down in packs:
        lin(x, qkv, bias)
        lin(x, o)
        g, u = lin(x, gate_up).chunk(2, -1)
        lin(F.silu(g) * u, down)
    return lin(x, head_packed)


print("| rows | MKL on the weights, us | packed + fused, us |")
print("|---|---|---|")
for rows in [1, 2, 4, 6, 8, 12, 16, 20, 32]:
    x = torch.randn(1, rows, 256)
    print(f"| {rows} | {best_us(lambda x=x: mkl(x), 500):.0f} | {best_us(lambda x=x: packed(x), 500):.0f} |")
x1, x8 = torch.randn(1, 1, 256), torch.randn(1, 8, 256)
alt_mkl = best_us(lambda: (mkl(x1), mkl(x8)), 500)
alt_packed = best_us(lambda: (packed(x1), packed(x8)), 500)
print(f"| 1 and 8 alternating | {alt_mkl:.0f} | {alt_packed:.0f} |")
