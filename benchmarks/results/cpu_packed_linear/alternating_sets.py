"""Why packed copies beside the model's weights lose on this CPU: alternating one-row F.linear calls on n weights
with 8-row packed calls on their copies, against each alone (the copies double the working set).

    for n in 4 8 16 24 32; do OMP_NUM_THREADS=2 python benchmarks/results/cpu_packed_linear/alternating_sets.py $n; done
"""

import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
n = int(sys.argv[1])
ws = [torch.randn(768, 256) for _ in range(n)]
packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
x1, x8 = torch.randn(1, 256), torch.randn(8, 256)


def one_row():
    for w in ws:
        F.linear(x1, w)


def packed_rows():
    for p in packed:
        torch.ops.mkldnn._linear_pointwise(x8, p, None, "none", [], "")


def per_call_us(f, reps=6000):
    k = max(1, reps // n)
    for _ in range(20):
        f()
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k * 1e6 / n


a, c = per_call_us(one_row), per_call_us(packed_rows)
b = per_call_us(lambda: (packed_rows(), one_row()))
print(f"| {n} | {n * 768 * 256 * 4 / 2**20:.1f} | {a:.1f} | {c:.1f} | {b:.1f} | {a + c:.1f} |")
