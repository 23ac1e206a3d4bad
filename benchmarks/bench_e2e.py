"""End to end on random-weight models with real shapes (Qwen2.5-1.5B; an 8B Llama-3 shape if memory allows).

- ``e2e_forward``: latency of one forward against the number of tokens in it (1..512) over a 4k context:
  the "free token slots" curve TiDAR rests on. ``hf-sdpa``: the unpatched model with a ``StaticCache``
  (CUDA graph when capture works); ``ours:<backend>``: the patched model, causal layout, ``TidarCache``.
- ``e2e_step``: one TiDAR step (forward over S = K + K*K tokens + ``rejection_sample``, greedy) for
  K = 4, 8, 16 against one AR decode step (1-token forward + argmax). ``ours:reference`` is the TiDAR step
  with SDPA and the dense mask (HF SDPA's way to run it).
- ``e2e_tokens``: tokens/s = tokens per forward / step time, with the measured tokens per forward of the
  bundled model (``--tpf`` or ``tidar demo --json``, when available) and with the paper's 7.45, against AR
  (1 token per AR step, the fastest AR row).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

import tidar_kernels
from tidar_kernels import layouts

from .environment import our_backends
from .harness import Bench, rel_err
from .hf_compat import cache_kw, rewind
from .report import short
from .shapes import LARGE, MAIN, SMOKE, build_model, n_params

PAPER_TPF = 7.45
CTX = 4096


def run(bench: Bench):
    from . import bench_decode  # the bundled model's decoding (bench_decode.py): on CPU, the whole e2e suite

    if not bench.cuda and not bench.smoke:
        return bench_decode.run(bench)
    _run_shapes(bench)
    bench_decode.run(bench)


def _run_shapes(bench: Bench):
    dev = bench.device
    if bench.smoke:
        models, dtype, ctx, B = [SMOKE], torch.float32, 32, 1
        ns, Ks = [1, 4, 16], [2, 3]
    else:
        models, dtype, ctx, B = [MAIN, LARGE], torch.bfloat16, CTX, 1
        ns, Ks = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], [16, 8, 4]
    bench.start_suite("e2e_step", 90 if bench.smoke else 130)
    with torch.no_grad():
        for i, name in enumerate(models):
            if i > 0 and bench.cuda:
                free, _ = torch.cuda.mem_get_info()
                need = 3 * n_params(name) * 2
                if free < need:
                    bench.skip(
                        f"{name}",
                        "(all)",
                        f"not enough GPU memory ({free / 2**30:.0f} GiB free, ~{need / 2**30:.0f} GiB needed)",
                        suite="e2e_step",
                    )
                    continue
            if bench.over_budget():
                bench.skip(name, "(all)", bench.budget_reason())
                continue
            try:
                model = build_model(name, dev, dtype, max_pos=ctx + 1024)
            except Exception as e:
                bench._error("(build)", name, e)
                continue
            _model_rows(bench, model, name, ctx, B, ns if i == 0 else [1], Ks if i == 0 else [max(Ks)])
            del model
            if bench.cuda:
                torch.cuda.empty_cache()
    _projections(bench)


def _model_rows(bench: Bench, model, name, ctx, B, ns, Ks):
    """Every row of one model: the unpatched model's forwards (HF SDPA, StaticCache), then the patched model's
    forwards and TiDAR steps per backend, its logits checked against the unpatched ones and the reference."""
    import tidar

    dev = bench.device
    V = model.config.vocab_size
    g = torch.Generator(device=dev).manual_seed(0)
    prompt = torch.randint(0, V - 1, (B, ctx), device=dev, generator=g)
    fwd_ids = {n: torch.randint(0, V - 1, (B, n), device=dev, generator=g) for n in ns}
    max_n = max(ns + [K + K * K for K in Ks])
    base = {"model": name, "ctx": ctx, "B": B}
    hf_logits = _hf_rows(bench, model, name, base, prompt, fwd_ids, max_n)
    if bench.cuda:
        torch.cuda.empty_cache()
    backends = our_backends("tidar_attention", dev)
    tidar.patch(model, draft_len=max(Ks), mask_token_id=V - 1)
    forward = _ours_prefill(bench, model, name, base, prompt, max_n, [b for b, why in backends if why is None])
    if forward is not None:
        _ours_forward_rows(bench, name, base, forward, backends, fwd_ids, hf_logits)
        for K in Ks:
            _ours_step_rows(bench, name, base, forward, backends, K, V, g)
    tidar.unpatch(model)


def _hf_rows(bench: Bench, model, name, base, prompt, fwd_ids, max_n) -> dict:
    """HF SDPA (unpatched) with a StaticCache after the prompt: the AR baseline and the forward curve. Gives the
    unpatched model's logits per token count: what ours must reproduce."""
    dev = bench.device
    B, ctx = prompt.shape
    kw_cache = cache_kw(model)
    try:
        from transformers import StaticCache

        hf_cache = StaticCache(config=model.config, max_cache_len=ctx + max_n)
        model(
            input_ids=prompt,
            **{kw_cache: hf_cache},
            cache_position=torch.arange(ctx, device=dev),
            use_cache=True,
            logits_to_keep=1,
        )
        rewind(hf_cache, ctx)
    except Exception as e:
        bench._error("hf-sdpa", f"{name} prefill", e)
        hf_cache = None
    hf_logits = {}
    for n, ids in fwd_ids.items():
        case = f"{name} forward of {n} tokens, ctx {ctx}, B={B}"
        params = {**base, "n": n, "kind": "forward"}
        if hf_cache is None:
            reason = "the StaticCache prefill failed (see the error row)"
            bench.skip(case, "hf-sdpa", reason, params=params, suite="e2e_forward")
            continue
        cp = torch.arange(ctx, ctx + n, device=dev)

        def hf_fwd(ids=ids, cp=cp, n=n):
            def logits():
                out = model(
                    input_ids=ids,
                    **{kw_cache: hf_cache},
                    cache_position=cp,
                    position_ids=cp[None].expand(B, -1),
                    use_cache=True,
                ).logits
                rewind(hf_cache, ctx)
                return out

            hf_logits[n] = logits().float()
            return (lambda: logits()[:, -1].argmax(-1)), None

        notes = "unpatched model, StaticCache"
        bench.measure(case, "hf-sdpa", hf_fwd, graph=True, params=params, suite="e2e_forward", rep_ms=150, notes=notes)
        if n == 1:  # the AR decode step, in the step table too
            step_params = {**base, "kind": "ar_step"}
            case = f"{name} AR step, ctx {ctx}, B={B}"
            bench.measure(
                case, "hf-sdpa", hf_fwd, graph=True, rep_ms=150, params=step_params, suite="e2e_step", notes=notes
            )
    return hf_logits


def _ours_prefill(bench: Bench, model, name, base, prompt, max_n, live):
    """The patched model's prefill into a TidarCache; gives ``forward(layout, ids, backend) -> logits`` of a
    segment after the prompt (repeatable: the cache is not committed), or None after an error row."""
    import tidar

    dev = bench.device
    B, ctx = prompt.shape
    kv_live = set(b for b, why in our_backends("kv_append", dev) if why is None)
    try:
        cache = tidar.TidarCache(B, ctx + max_n + 8, backend=live[-1] if live[-1] in kv_live else "auto")
        pre = layouts.causal(ctx).to(dev)
        tidar.tidar_forward(
            model,
            prompt,
            pre.position_ids[None].expand(B, -1),
            tidar.TidarStep(pre, torch.zeros(B, dtype=torch.int32, device=dev), cache, live[-1]),
        )
    except Exception as e:
        bench._error("ours", f"{name} prefill", e)
        return None
    seg = torch.full((B,), ctx, dtype=torch.int32, device=dev)

    def forward(layout, ids, backend):
        cache.backend = backend if backend in kv_live else "auto"
        pos = ctx + layout.position_ids[None].expand(B, -1)
        return tidar.tidar_forward(model, ids, pos, tidar.TidarStep(layout, seg, cache, backend)).logits

    return forward


def _ours_forward_rows(bench: Bench, name, base, forward, backends, fwd_ids, hf_logits):
    """The patched model's forward of n tokens (causal layout) per backend, and its AR step (n = 1)."""
    ctx, B = base["ctx"], base["B"]
    for backend, why in backends:
        name_b = f"ours:{backend}"
        for n, ids in fwd_ids.items():
            case = f"{name} forward of {n} tokens, ctx {ctx}, B={B}"
            params = {**base, "n": n, "kind": "forward"}
            if why is not None:
                bench.skip(case, name_b, why, params=params, suite="e2e_forward")
                continue
            layout = layouts.causal(n).to(bench.device)

            def ours_fwd(layout=layout, ids=ids, backend=backend, n=n):
                check = None
                if n in hf_logits:
                    err = rel_err(forward(layout, ids, backend).float(), hf_logits[n])
                    check = f"logits rel_err vs hf-sdpa={err:.1e}"
                return (lambda: forward(layout, ids, backend)[:, -1].argmax(-1)), check

            notes = "patched model, TidarCache"
            bench.measure(
                case, name_b, ours_fwd, graph=True, params=params, suite="e2e_forward", rep_ms=150, notes=notes
            )
            if n == 1:
                bench.measure(
                    f"{name} AR step, ctx {ctx}, B={B}",
                    name_b,
                    ours_fwd,
                    graph=True,
                    rep_ms=150,
                    params={**base, "kind": "ar_step"},
                    suite="e2e_step",
                    notes="patched model, causal layout",
                )


def _ours_step_rows(bench: Bench, name, base, forward, backends, K, V, g):
    """One TiDAR step at draft length K per backend: the forward over S = K + K*K tokens and
    ``rejection_sample``; logits checked against the reference backend's."""
    dev = bench.device
    ctx, B = base["ctx"], base["B"]
    rej_live = set(b for b, why in our_backends("rejection_sample", dev) if why is None)
    layout = layouts.decode_step(K).to(dev)
    S = layout.seg_len
    drafts = torch.randint(0, V - 1, (B, K), device=dev, generator=g)
    ids = torch.cat([drafts, torch.full((B, K * K), V - 1, device=dev)], 1)
    case = f"{name} TiDAR step K={K} (S={S}), ctx {ctx}, B={B}"
    params = {**base, "K": K, "S": S, "kind": "tidar_step"}
    ref_logits = None
    if any(b == "reference" and why is None for b, why in backends):
        try:
            ref_logits = forward(layout, ids, "reference").float()
        except Exception:
            ref_logits = None
    for backend, why in backends:
        name_b = f"ours:{backend}"
        if why is not None:
            bench.skip(case, name_b, why, params=params)
            continue
        rb = backend if backend in rej_live else "auto"

        def step(backend=backend, rb=rb):
            def fn():
                logits = forward(layout, ids, backend)
                r = tidar_kernels.rejection_sample(logits[:, :K], logits[:, K:].reshape(B, K, K, V), drafts, backend=rb)
                return r.next_drafts

            check = None
            if ref_logits is not None and backend != "reference":
                err = rel_err(forward(layout, ids, backend).float(), ref_logits)
                check = f"logits rel_err vs reference={err:.1e}"
            return fn, check

        note = "SDPA + dense mask" if backend == "reference" else ""
        notes = "; ".join(x for x in (note, f"rejection backend {rb}") if x)
        bench.measure(case, name_b, step, graph=True, params=params, rep_ms=150, notes=notes)


def _measured_tpf(bench: Bench) -> tuple[float | None, str]:
    if bench.tpf is not None:
        return bench.tpf, "--tpf"
    if bench.smoke:
        return None, "not looked up in --smoke"
    try:
        import tidar.cli.demo  # noqa: F401
    except ImportError as e:
        return None, f"no bundled model yet (tidar demo unavailable: {e})"
    try:
        left = bench._deadline - time.monotonic()
        if left < 20:
            return None, "no time left in the e2e budget to run tidar demo --json (pass --tpf)"
        out = subprocess.run(
            [sys.executable, "-m", "tidar.cli", "demo", "--json", "--device", bench.device.type],
            capture_output=True,
            text=True,
            timeout=min(90, left),
        )
        data = json.loads(out.stdout.strip().splitlines()[-1])
        return float(data["tokens_per_forward"]), "tidar demo --json (bundled model, its default draft length)"
    except Exception as e:
        return None, f"tidar demo --json gave no tokens_per_forward ({short(e, 120)})"


def _projections(bench: Bench):
    rows = [r for r in bench.rows if r["suite"] == "e2e_step" and r["status"] == "ok"]
    if not rows:
        return
    tpf, src = _measured_tpf(bench)
    bench.notes.append(f"e2e measured tokens per forward: {tpf if tpf is not None else 'none'} ({src})")
    for model in sorted({r["params"]["model"] for r in rows}):
        ar = [r for r in rows if r["params"]["model"] == model and r["params"]["kind"] == "ar_step"]
        if not ar:
            continue
        best_ar = min(ar, key=lambda r: r["ms"])
        B = best_ar["params"]["B"]
        for r in rows:
            p = r["params"]
            if p["model"] != model or p["kind"] != "tidar_step":
                continue
            for label, t in (("measured", tpf), ("paper", PAPER_TPF)):
                if t is None:
                    continue
                tok_s = B * t * 1000 / r["ms"]
                ar_tok_s = B * 1000 / best_ar["ms"]
                bench.derived(
                    f"{model} K={p['K']} tpf={t:.2f} ({label})",
                    r["impl"],
                    r["ms"],
                    suite="e2e_tokens",
                    params={**p, "tpf": t},
                    extra={
                        "AR ms": best_ar["ms"],
                        "step/AR": r["ms"] / best_ar["ms"],
                        "AR tok/s": ar_tok_s,
                        "TiDAR tok/s": tok_s,
                        "x AR": tok_s / ar_tok_s,
                    },
                    notes=f"AR = {best_ar['impl']}",
                )


def goals(bench: Bench):
    from . import bench_decode

    bench_decode.goals(bench)
    if not bench.cuda and not bench.smoke:  # no random-shape rows on CPU
        return
    rows = [
        r for r in bench.rows if r["suite"] == "e2e_step" and r["status"] == "ok" and r["params"].get("model") == MAIN
    ]
    ar = [r for r in rows if r["params"]["kind"] == "ar_step"]
    st = [
        r
        for r in rows
        if r["params"]["kind"] == "tidar_step" and r["params"]["K"] == 16 and r["impl"] != "ours:reference"
    ]
    if not ar or not st:
        bench.goal(
            "TiDAR step K=16 vs AR step (1.5B, ctx 4k)",
            "<= 1.25x",
            "not measured",
            "no AR row" if not ar else "no TiDAR step row with a triton/cuda backend",
        )
        return
    a = min(ar, key=lambda r: r["ms"])
    s = min(st, key=lambda r: r["ms"])
    x = s["ms"] / a["ms"]
    bench.goal(
        "TiDAR step K=16 vs AR step (1.5B, ctx 4k)",
        "<= 1.25x",
        f"{x:.2f}x ({s['impl']} {s['ms']:.3g} ms vs {a['impl']} {a['ms']:.3g} ms)",
        "met" if x <= 1.25 else f"missed by {x / 1.25:.2f}x",
    )


def plots(bench: Bench, plot):
    from . import bench_decode

    out = bench_decode.plots(bench, plot)
    for model in sorted({r["params"].get("model") for r in bench.rows if r["suite"] == "e2e_forward"} - {None}):
        out.append(
            plot(
                f"e2e_forward_{model}.png",
                title=f"{model}: one forward vs tokens in it (ctx {CTX if not bench.smoke else 32})",
                x="n",
                y="ms",
                logx=True,
                ylabel="ms (median)",
                xlabel="tokens in the forward",
                where=lambda r, m=model: r["suite"] == "e2e_forward" and r["params"].get("model") == m,
            )
        )
    return out
