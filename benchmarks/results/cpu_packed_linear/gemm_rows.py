"""F.linear (MKL) against oneDNN's linear with a prepacked weight, by row count, on the bundled model's shapes.

OMP_NUM_THREADS=2 python benchmarks/results/cpu_packed_linear/gemm_rows.py
"""

import torch
import torch.nn.functional as F
from best_us import best_us

torch.set_num_threads(2)


print("| weight | rows | F.linear us | oneDNN packed us | max abs diff |")
print("|---|---|---|---|---|")
for out_f, in_f in [(256, 256), (768, 256), (256, 768), (4096, 256)]:
    w = torch.randn(out_f, in_f)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    for m in [1, 2, 4, 8, 16, 24, 64]:
        x = torch.randn(m, in_f)
        a = best_us(lambda x=x, w=w: F.linear(x, w))
        b = best_us(lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""))
        err = (torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "") - F.linear(x, w)).abs().max()
        print(f"| {out_f}x{in_f} | {m} | {a:.1f} | {b:.1f} | {err.item():.1e} |")
