"""The timing both scripts of this folder use: microseconds per call of ``f``, best of 5 loops after a warm-up."""

import time

import torch


def best_us(f, n: int = 1000, warmup: int = 50) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            f()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                f()
            best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best
