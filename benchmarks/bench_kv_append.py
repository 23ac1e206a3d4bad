"""KV append: write a segment's K/V at per-row offsets into a preallocated cache (ragged rows).

- ``torch-index_copy``: one ``index_copy_`` per tensor over the flattened cache, the row indices computed
  from ``seg_start`` inside the timed call (as a decoding loop must).
- ``torch-slice-assign``: ``cache[b, :, s_b:s_b+S] = new[b]`` per row (host offsets, 2B copies).
- ``flashinfer-paged``: FlashInfer's ``append_paged_kv_cache`` into a paged HND cache (page size 16), the
  appended K/V in its ragged token-major layout and the page metadata prepared outside the timing.
- ``ours:<backend>``: ``kv_append``'s implementation; ``ours:<backend>+api``: the public ``kv_append``.

Each output is checked bit for bit on the whole cache (no stray writes). GB/s counts bytes read + bytes
written (the new K and V, once each way), like the copy bandwidth it is compared with.
"""

from __future__ import annotations

import math

import torch

import tidar_kernels
from tidar_kernels.backends import resolve

from . import shapes
from .environment import flashinfer, our_backends
from .harness import Bench

OP = "kv_append"
PAGE = 16


def _exact(kc, vc, ek, ev) -> str:
    return "bit-exact (whole cache)" if torch.equal(kc, ek) and torch.equal(vc, ev) else "MISMATCH vs expected cache"


def run(bench: Bench):
    dt = torch.bfloat16 if bench.cuda else torch.float32
    main = shapes.attention(shapes.SMOKE if bench.smoke else shapes.MAIN)
    D, H = main.head_dim, main.kv_heads
    if bench.smoke:
        cases = [(1, H, 1, 16), (2, H, 6, 16), (3, H, 12, 0)]
    else:
        H8 = shapes.attention(shapes.LARGE).kv_heads
        # (B, Hkv, S, prefix): AR step, TiDAR K=16 step (S=272) at 1.5B (Hkv=2) and 8B (Hkv=8) shapes, a prefill
        cases = [
            (1, H, 1, 4096),
            (1, H, 272, 4096),
            (8, H, 272, 4096),
            (64, H, 272, 4096),
            (64, H8, 1, 4096),
            (64, H8, 272, 4096),
            (1, H8, 4096, 0),
            (8, H8, 4096, 0),
        ]
    fi = flashinfer(bench.device)
    bench.start_suite("kv_append", 60 if bench.smoke else 30)
    for B, H, S, prefix in cases:
        _case(bench, B, H, S, prefix, D, dt, fi)
        if bench.cuda:
            torch.cuda.empty_cache()


def _case(bench: Bench, B, H, S, prefix, D, dt, fi):
    """Every implementation on one case; ``fi``: (FlashInfer, None) or (None, why it is not used)."""
    dev = bench.device
    case = f"B={B} Hkv={H} S={S} prefix~{prefix} D={D}"
    nbytes = 4 * B * H * S * D * (torch.finfo(dt).bits // 8)
    params = {"B": B, "H": H, "S": S, "prefix": prefix, "MiB": nbytes / 2**20}
    g = torch.Generator(device=dev).manual_seed(0)
    seg_list = [prefix + (37 * b) % 64 for b in range(B)]  # ragged rows
    Smax = max(seg_list) + S + 8
    seg = torch.tensor(seg_list, dtype=torch.int32, device=dev)
    kn = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)
    vn = torch.randn(B, H, S, D, device=dev, dtype=dt, generator=g)
    poison_k = torch.randn(B, H, Smax, D, device=dev, dtype=dt, generator=g)
    poison_v = torch.randn(B, H, Smax, D, device=dev, dtype=dt, generator=g)
    ek, ev = poison_k.clone(), poison_v.clone()
    for b, s in enumerate(seg_list):
        ek[b, :, s : s + S] = kn[b]
        ev[b, :, s : s + S] = vn[b]
    common = dict(bytes_moved=nbytes, cold_l2=True, graph=True, params=params, rep_ms=50)

    def checked(fn_of):
        """setup for ``measure``: a fresh poisoned cache, ``fn_of(kc, vc)`` called once and checked bit for bit."""

        def setup():
            kc, vc = poison_k.clone(), poison_v.clone()
            fn = fn_of(kc, vc)
            fn()
            return fn, _exact(kc, vc, ek, ev)

        return setup

    def index_copy(kc, vc):
        base = (torch.arange(B * H, device=dev).view(B, H) * Smax)[:, :, None]
        steps = torch.arange(S, device=dev)

        def fn():
            rows = (base + (seg.long()[:, None] + steps[None])[:, None, :]).reshape(-1)
            kc.view(-1, D).index_copy_(0, rows, kn.reshape(-1, D))
            vc.view(-1, D).index_copy_(0, rows, vn.reshape(-1, D))

        return fn

    def slice_assign(kc, vc):
        def fn():
            for b, s in enumerate(seg_list):
                kc[b, :, s : s + S] = kn[b]
                vc[b, :, s : s + S] = vn[b]

        return fn

    bench.measure(case, "torch-index_copy", checked(index_copy), **common)
    bench.measure(case, "torch-slice-assign", checked(slice_assign), notes=f"{2 * B} copies", **common)
    if fi[0] is None:
        bench.skip(case, "flashinfer-paged", fi[1], params=params)
    else:
        bench.measure(
            case,
            "flashinfer-paged",
            lambda: _flashinfer(fi[0], kn, vn, seg_list, S, dev),
            notes=f"paged HND cache, page size {PAGE}; metadata prepared outside timing",
            **common,
        )
    for backend, why in our_backends(OP, dev):
        name = f"ours:{backend}"
        if why is not None:
            bench.skip(case, name, why, params=params)
            continue

        def ours(kc, vc, backend=backend):
            impl = resolve(OP, backend, dev)
            return lambda: impl(kc, vc, kn, vn, seg)

        bench.measure(case, name, checked(ours), notes="kernel (no host-side validation)", **common)
        api = lambda kc, vc, b=backend: lambda: tidar_kernels.kv_append(kc, vc, kn, vn, seg, backend=b)  # noqa: E731
        bench.measure(case, name + "+api", checked(api), notes="public kv_append (validation included)", **common)


def _flashinfer(fi, kn, vn, seg_list, S, dev):
    B, H, _, D = kn.shape
    lens = [s + S for s in seg_list]
    pages_per_row = math.ceil(max(lens) / PAGE)
    kc = torch.randn(B * pages_per_row, H, PAGE, D, device=dev, dtype=kn.dtype)  # HND pages
    vc = torch.randn_like(kc)
    used = [math.ceil(n / PAGE) for n in lens]
    kv_indices = torch.cat([torch.arange(b * pages_per_row, b * pages_per_row + u) for b, u in enumerate(used)])
    kv_indptr = torch.tensor([0] + list(torch.tensor(used).cumsum(0)), dtype=torch.int32)
    last = torch.tensor([n - (u - 1) * PAGE for n, u in zip(lens, used)], dtype=torch.int32)
    kv_indices, kv_indptr, last = (t.to(dev, torch.int32) for t in (kv_indices, kv_indptr, last))
    append_indptr = (torch.arange(B + 1, dtype=torch.int32) * S).to(dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    batch_idx, pos = fi.page.get_batch_indices_positions(append_indptr, seq_lens, B * S)
    k_rag = kn.permute(0, 2, 1, 3).reshape(B * S, H, D).contiguous()  # FlashInfer's ragged [nnz, H, D]
    v_rag = vn.permute(0, 2, 1, 3).reshape(B * S, H, D).contiguous()

    def fn():
        fi.page.append_paged_kv_cache(
            k_rag, v_rag, batch_idx, pos, (kc, vc), kv_indices, kv_indptr, last, kv_layout="HND"
        )

    fn()
    ok = True
    for b, s in enumerate(seg_list):  # row b's pages, read back as [H, tokens, D]
        rows = kc[b * pages_per_row : b * pages_per_row + used[b]].permute(1, 0, 2, 3).reshape(H, -1, D)
        rows_v = vc[b * pages_per_row : b * pages_per_row + used[b]].permute(1, 0, 2, 3).reshape(H, -1, D)
        ok &= torch.equal(rows[:, s : s + S], kn[b]) and torch.equal(rows_v[:, s : s + S], vn[b])
    return fn, "appended rows bit-exact" if ok else "MISMATCH in appended rows"


def goals(bench: Bench):
    rows = [
        r
        for r in bench.rows
        if r["suite"] == "kv_append"
        and r["status"] == "ok"
        and r["impl"].startswith("ours:")
        and not r["impl"].endswith("+api")
    ]
    if not rows:
        bench.goal("KV append", ">= 80% of copy BW", "not measured", "no ours rows")
        return
    big = max(r["params"]["B"] * r["params"]["H"] * r["params"]["S"] for r in rows)
    best = max(
        (r for r in rows if r["params"]["B"] * r["params"]["H"] * r["params"]["S"] == big),
        key=lambda r: r.get("pct_copy_bw") or 0,
    )
    pct = best.get("pct_copy_bw")
    if not isinstance(pct, float):
        bench.goal("KV append", ">= 80% of copy BW", "no copy bandwidth measured", "unknown")
        return
    bench.goal(
        f"KV append (largest case: {best['case']})",
        ">= 80% of copy BW",
        f"{pct:.0f}% ({best['gbps']:.0f} GB/s, {best['impl']})",
        "met" if pct >= 80 else f"missed by {80 / pct:.2f}x",
    )


def plots(bench: Bench, plot):
    copy = (bench._ceil or {}).get("copy_gbps")
    return [
        plot(
            "kv_append.png",
            title="KV append: GB/s (read + write) against bytes moved",
            x="MiB",
            y="gbps",
            logx=True,
            logy=True,
            ylabel="GB/s",
            xlabel="MiB moved (read + write)",
            where=lambda r: r["suite"] == "kv_append",
            hlines={"measured copy BW": copy},
        )
    ]
