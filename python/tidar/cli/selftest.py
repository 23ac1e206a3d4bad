"""``tidar selftest``: every live kernel backend against the PyTorch reference on small cases of each op.

For a new machine or GPU: attention forward (error bounded by what PyTorch itself gets wrong in the same
precision), ``kv_append`` (bit for bit over the whole cache), the paged ops (``tidar_attention_paged``,
``kv_append_paged``) likewise, ``rejection_sample`` / ``draft_sample`` given the same
uniforms or Philox seed/offset (tokens and acceptance lengths bit for bit, draft distributions within 1e-6).
Prints a pass/fail table; exits 1 when any backend disagrees with the reference or fails to run.

    tidar selftest                       # the kernels on this machine's GPU
    tidar selftest --triton-interpret    # CPU: the Triton kernels under the interpreter (slow, small cases)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial


@dataclass
class Row:
    op: str
    case: str
    backend: str
    ok: bool | None  # None: the backend's record declines these inputs (not a failure)
    detail: str


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="device of the test tensors (default: cuda if available, else cpu)")
    p.add_argument(
        "--triton-interpret",
        action="store_true",
        help="run the Triton kernels under the interpreter (CPU tensors; sets TRITON_INTERPRET=1)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def _seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _attention_cases(dev, interpreted):
    import torch

    from tidar_kernels import layouts

    dtypes = [torch.float32, torch.float16] if dev.type == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    dims = [32] if interpreted else [64, 128]
    lays = [
        ("decode K=4", layouts.decode_step(4), [37, 0]),
        ("training L=24 K=4", layouts.training(24, 4), [0, 0]),
        ("prefill n=29 K=6", layouts.prefill(29, 6), [5, 0]),
    ]
    for name, lay, segs in lays:
        for dtype in dtypes:
            for D in dims:
                yield f"{name}, D={D}, {str(dtype).removeprefix('torch.')}", lay, segs, dtype, D


def check_attention(dev, backends, interpreted):
    """Forward error vs an fp32 reference at most 2x plain PyTorch's in the same dtype + a small atol."""
    import torch

    from tidar_kernels import tidar_attention

    rows = []
    for case, lay, segs, dtype, D in _attention_cases(dev, interpreted):
        B, Hq, Hkv, S = 2, 4, 2, lay.seg_len
        Skv = max(segs) + S + 3
        g = _seeded(S * D)
        q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype).to(dev) for h, n in ((Hq, S), (Hkv, Skv), (Hkv, Skv)))
        ll, bid = lay.local_limit.to(dev), lay.block_id.to(dev)
        seg = torch.tensor(segs, dtype=torch.int32, device=dev)
        truth = tidar_attention(q.float(), k.float(), v.float(), ll, bid, seg, backend="reference")
        base = (tidar_attention(q, k, v, ll, bid, seg, backend="reference").float() - truth).abs().max().item()
        bound = 2 * base + (1e-5 if dtype == torch.float32 else 2e-3)
        for name in backends:
            why = _declined("tidar_attention", name, q, k, v, ll, bid, seg, D**-0.5, None)
            call = partial(tidar_attention, q, k, v, ll, bid, seg, backend=name)
            check = partial(_attention_row, truth, dtype, bound)
            rows.append(
                Row("tidar_attention", case, name, None, f"not taken: {why}")
                if why
                else _run("tidar_attention", case, name, call, check)
            )
    return rows


def _attention_row(truth, dtype, bound, out):
    if out.dtype != dtype or out.shape != truth.shape:
        return False, f"returned {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(truth.shape)}"
    err = (out.float() - truth).abs().max().item()
    return err <= bound, f"max err {err:.2e} (bound {bound:.2e})"


def check_kv_append(dev, backends):
    """The whole cache bit for bit against the reference's."""
    import torch

    from tidar_kernels import kv_append

    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        B, H, Smax, D, S = 3, 2, 300, 64, 272
        g = _seeded(7)
        cache = torch.randn(B, H, Smax, D, generator=g).to(dtype).to(dev)
        new = torch.randn(B, H, S, D, generator=g).to(dtype).to(dev)
        seg = torch.tensor([0, 28, Smax - S], dtype=torch.int32, device=dev)
        want_k, want_v = cache.clone(), cache.clone()
        kv_append(want_k, want_v, new, new.transpose(2, 3).contiguous().transpose(2, 3), seg, backend="reference")
        case = f"B={B} S={S} D={D} ragged, {str(dtype).removeprefix('torch.')}"
        for name in backends:
            call = partial(
                kv_append,
                cache.clone(),
                cache.clone(),
                new,
                new.transpose(2, 3).contiguous().transpose(2, 3),
                seg,
                backend=name,
            )
            rows.append(_run("kv_append", case, name, call, partial(_same_cache, want_k, want_v)))
    return rows


def check_paged(dev, attention_backends, append_backends, interpreted):
    """tidar_attention_paged against the reference on the same pool (error bound as ``check_attention``) and
    kv_append_paged bit for bit over the whole pool; a shuffled pool of blocks of 16, ragged rows, -1 slots."""
    import torch

    from tidar_kernels import kv_append_paged, layouts, tidar_attention_paged

    rows = []
    dtypes = [torch.float32, torch.float16] if dev.type == "cpu" else [torch.float16, torch.bfloat16]
    D, bs, lay = (32 if interpreted else 128), 16, layouts.decode_step(4)
    lens = [lay.seg_len + 37, lay.seg_len, lay.seg_len + 100]
    g = _seeded(21)
    table = torch.randperm(24, generator=g)[:24].view(3, 8).to(torch.int32).to(dev)
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    ll, bid = lay.local_limit.to(dev), lay.block_id.to(dev)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        kc, vc = (torch.randn(24, bs, 2, D, generator=g).to(dtype).to(dev) for _ in range(2))
        q = torch.randn(3, 4, lay.seg_len, D, generator=g).to(dtype).to(dev)
        with torch.no_grad():
            truth = tidar_attention_paged(q.float(), kc.float(), vc.float(), table, seq, ll, bid, backend="reference")
            base = tidar_attention_paged(q, kc, vc, table, seq, ll, bid, backend="reference")
        bound = 2 * (base.float() - truth).abs().max().item() + (1e-5 if dtype == torch.float32 else 2e-3)
        case = f"decode K=4, block size 16, ragged, D={D}, {name}"
        for b in attention_backends:
            call = partial(_no_grad, tidar_attention_paged, q, kc, vc, table, seq, ll, bid, backend=b)
            rows.append(_run("tidar_attention_paged", case, b, call, partial(_attention_row, truth, dtype, bound)))
        new = torch.randn(50, 2, D, generator=g).to(dtype).to(dev)
        slots = torch.randperm(24 * bs, generator=g)[:50]
        slots[::7] = -1
        slots = slots.to(dev)
        want_k, want_v = kc.clone(), vc.clone()
        kv_append_paged(want_k, want_v, new, new.flip(0), slots, backend="reference")
        for b in append_backends:
            call = partial(kv_append_paged, kc.clone(), vc.clone(), new, new.flip(0), slots, backend=b)
            case = f"T=50 (every 7th -1), block size 16, D={D}, {name}"
            rows.append(_run("kv_append_paged", case, b, call, partial(_same_cache, want_k, want_v)))
    return rows


def _no_grad(fn, *args, **kw):
    import torch

    with torch.no_grad():
        return fn(*args, **kw)


def _same_cache(want_k, want_v, out):
    same = _bits_equal(out[0], want_k) and _bits_equal(out[1], want_v)
    return same, "bit-exact" if same else "the cache differs from the reference's"


def _bits_equal(a, b) -> bool:
    import torch

    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.view(view), b.view(view)))


def _sampling_cases(dev, interpreted):
    V = 300 if interpreted else 32000  # 32000: the vocabulary-parallel path on a GPU at B=1
    return [  # (name, B, K, V, temperature, top_k, top_p, beta, philox)
        ("greedy", 4, 4, V, 0.0, None, None, 1.0, False),
        ("T=1", 4, 4, V, 1.0, None, None, 1.0, False),
        ("T=0.8 top-k 50 top-p 0.9 beta 0.5", 3, 4, V, 0.8, 50, 0.9, 0.5, False),
        ("T=1 Philox seed/offset", 4, 4, V, 1.0, None, None, 1.0, True),
        ("B=1 T=1", 1, 8, V, 1.0, None, None, 1.0, False),
    ]


def check_sampling(dev, backends, interpreted):
    """rejection_sample and draft_sample: tokens and acceptance lengths bit for bit given the same randomness."""
    import torch

    from tidar_kernels import draft_sample, draw_uniforms, rejection_sample

    rows = []
    for case, B, K, V, T, top_k, top_p, beta, philox in _sampling_cases(dev, interpreted):
        g = _seeded(B * K + V)
        q = (torch.randn(B, K - 1, V, generator=g) * 1.5).softmax(-1)
        drafts = torch.cat(
            [
                torch.randint(0, V, (B, 1), generator=g),
                torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K - 1),
            ],
            1,
        )
        ar = torch.randn(B, K, V, generator=g) * 2
        ar[:, :-1] = q.log() + 0.5 * torch.randn(B, K - 1, V, generator=g)  # drafts often accepted
        if T == 0.0:
            drafts[:, 1:] = ar[:, :-1].argmax(-1)
            drafts[B // 2 :, 2:] = (drafts[B // 2 :, 2:] + 1) % V  # some rows reject early
        blk = torch.randn(B, K, K, V, generator=g) * 2
        ar, blk, drafts, q = ar.to(dev), blk.to(dev), drafts.to(dev), q.to(dev)
        rand = dict(seed=1234, offset=B * 2 * K) if philox else dict(uniforms=draw_uniforms(B, K, generator=g).to(dev))
        kw = dict(temperature=T, top_k=top_k, top_p=top_p, beta=beta, **rand)
        qq = q if T > 0 else None
        want = rejection_sample(ar, blk, drafts, qq, backend="reference", **kw)
        dwant = draft_sample(ar[:, 0], blk[:, 0], backend="reference", **kw)
        for name in backends:
            label = f"{case}, B={B} K={K} V={V}"
            call = partial(rejection_sample, ar, blk, drafts, qq, backend=name, **kw)
            rows.append(_run("rejection_sample", label, name, call, partial(_same_step, want)))
            call = partial(draft_sample, ar[:, 0], blk[:, 0], backend=name, **kw)
            rows.append(_run("draft_sample", label, name, call, partial(_same_step, dwant)))
    return rows


def _same_step(want, got):
    import torch

    for field in want._fields:
        a, b = getattr(got, field), getattr(want, field)
        if b is None or a is None:
            if a is not b:
                return False, f"{field}: {type(a).__name__}, expected {type(b).__name__}"
        elif field == "next_draft_probs":
            err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
            if not err <= 1e-6:
                return False, f"{field} differs by {err:.2e} (> 1e-6)"
        elif not torch.equal(a, b):
            return False, f"{field} differs from the reference's"
    return True, "tokens bit-exact"


def _declined(op, backend, *args) -> str | None:
    """Why ``backend``'s record declines these inputs (e.g. the CUDA attention and float32), else None."""
    from tidar_kernels import backends

    return backends.record(op, backend).supports(*args)


def _run(op, case, backend, call, check) -> Row:
    """Row of ``check(call())``: (ok, detail); an exception (a kernel that fails to build or launch) fails."""
    try:
        ok, detail = check(call())
    except Exception as e:  # noqa: BLE001  (a kernel that fails to compile or launch is a failure to report)
        ok, detail = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return Row(op, case, backend, bool(ok), detail)


def run_selftest(device=None, *, interpreted=False) -> tuple[list[Row], dict]:
    """(rows, {"backend: why it is not live": [ops]}) for the kernel backends live on ``device``."""
    import torch

    from tidar_kernels import backends, live_backends

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    live = live_backends(dev)
    kernels = {op: [b for b in names if b != "reference"] for op, names in live.items()}
    missing = {}  # "backend: why" -> ops it leaves untested
    ops = (
        "tidar_attention",
        "kv_append",
        "rejection_sample",
        "draft_sample",
        "tidar_attention_paged",
        "kv_append_paged",
    )
    for op in ops:
        for b in ("triton", "cuda"):
            if b not in kernels.get(op, []):
                missing.setdefault(f"{b}: {backends._why_not(op, b, dev)}", []).append(op)
    rows = []
    if kernels.get("tidar_attention"):
        rows += check_attention(dev, kernels["tidar_attention"], interpreted)
    if kernels.get("kv_append"):
        rows += check_kv_append(dev, kernels["kv_append"])
    if kernels.get("tidar_attention_paged") or kernels.get("kv_append_paged"):
        rows += check_paged(
            dev, kernels.get("tidar_attention_paged", []), kernels.get("kv_append_paged", []), interpreted
        )
    sampling = sorted(set(kernels.get("rejection_sample", [])) & set(kernels.get("draft_sample", [])))
    if sampling:
        rows += check_sampling(dev, sampling, interpreted)
    return rows, missing


def format_table(rows: list[Row]) -> str:
    head = ("op", "case", "backend", "result", "detail")
    body = [(r.op, r.case, r.backend, {True: "pass", False: "FAIL", None: "n/a"}[r.ok], r.detail) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def run(args) -> int:
    if args.triton_interpret:
        if "tidar_kernels.triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "tidar selftest: the Triton kernels were already loaded without the interpreter; run "
                "`TRITON_INTERPRET=1 tidar selftest --triton-interpret`",
                file=sys.stderr,
            )
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before tidar_kernels loads triton
        if args.device not in (None, "cpu"):
            print(
                f"tidar selftest: --triton-interpret runs on CPU tensors, got --device {args.device}", file=sys.stderr
            )
            return 2
        args.device = "cpu"
    t0 = time.perf_counter()
    rows, missing = run_selftest(args.device, interpreted=args.triton_interpret)
    failed = [r for r in rows if r.ok is False]
    passed = [r for r in rows if r.ok]
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "not_live": missing, "failed": len(failed)}, indent=2))
    else:
        if rows:
            print(format_table(rows))
        for why, ops in missing.items():
            print(f"not tested: {', '.join(ops)} on {why}")
        if not rows and not args.triton_interpret:
            print(
                "no kernel backend is live here; on a CPU, `tidar selftest --triton-interpret` checks the Triton "
                "kernels under the interpreter"
            )
        na = (
            f", {len(rows) - len(passed) - len(failed)} not taken by the backend"
            if len(passed) + len(failed) < len(rows)
            else ""
        )
        print(f"{len(passed)} passed, {len(failed)} failed{na} ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0
