"""The rejection step: verify K drafts from the step's raw logits and draft the next K (docs/design.md §4.1).

Every implementation does the same work, from raw logits to the step's outcome:
target softmax, acceptance of d_1..d_{K-1}, the correction (residual sample) or bonus token, and the next
drafts sampled from slots 1..K-1 of the chosen proposal block (with their distributions, the next q).

- ``torch``: PyTorch ops (softmax, acceptance, ``torch.multinomial``), unfused.
- ``flashinfer-chain``: FlashInfer's ``chain_speculative_sampling`` fed target probabilities from a separate
  softmax (counted in its time), then the next drafts with ``sampling_from_probs`` (sampling mode only).
- ``ours:<backend>``: ``rejection_sample``'s implementation (uniforms drawn inside the timed call);
  ``ours:<backend>+api``: the public ``tidar_kernels.rejection_sample`` with its validation.

Greedy mode: argmax instead of sampling (FlashInfer has no greedy chain: skipped).
GB/s counts the fewest bytes the step must touch: the AR logits, the draft distributions, the K-1 logit rows
of the chosen block, and the next distributions written (sampling); the AR logits and K-1 block rows (greedy).
"""

from __future__ import annotations

import torch

import tidar_kernels
from tidar_kernels.backends import resolve

from . import shapes
from .environment import flashinfer, our_backends
from .harness import Bench

OP = "rejection_sample"


def torch_step(ar, blocks, drafts, q, greedy: bool):
    """The PyTorch baseline: one verification + next-draft step, unfused."""
    B, K, V = ar.shape
    rows = torch.arange(B, device=ar.device)
    if greedy:
        tgt = ar.argmax(-1)  # [B, K]
        ok = drafts[:, 1:] == tgt[:, :-1]
        a = 1 + ok.long().cumprod(-1).sum(-1)
        first = tgt[rows, a - 1]
        nxt = blocks[rows, a - 1, 1:].argmax(-1)
        return a, first, nxt, None
    p = torch.softmax(ar.float(), -1)  # [B, K, V]: p_1..p_K
    d = drafts[:, 1:, None]
    p_d = p[:, :-1].gather(-1, d).squeeze(-1)
    q_d = q.gather(-1, d).squeeze(-1)
    u = torch.rand(B, K - 1, device=ar.device)
    a = 1 + (u * q_d < p_d).long().cumprod(-1).sum(-1)  # 1..K
    q_ext = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # q_K = 0: at a = K the bonus is sampled from p_K
    resid = (p[rows, a - 1] - q_ext[rows, a - 1]).clamp_min(0)
    first = torch.multinomial(resid, 1).squeeze(-1)
    q_next = torch.softmax(blocks[rows, a - 1, 1:].float(), -1)  # [B, K-1, V]
    nxt = torch.multinomial(q_next.view(-1, V), 1).view(B, K - 1)
    return a, first, nxt, q_next


def flashinfer_step(fi, ar, blocks, drafts, q, accepted_buf, emitted_buf):
    B, K, V = ar.shape
    rows = torch.arange(B, device=ar.device)
    p = torch.softmax(ar.float(), -1)
    res = fi.sampling.chain_speculative_sampling(
        q, drafts[:, 1:].to(torch.int32).contiguous(), p, accepted_buf, emitted_buf
    )
    tokens = res[0] if isinstance(res, tuple) else res  # [B, K]: emitted drafts, the correction/bonus, -1
    emitted = res[2] if isinstance(res, tuple) and len(res) == 3 else emitted_buf
    last = emitted.long()  # drafts accepted after d_0 = a - 1
    q_next = torch.softmax(blocks[rows, last, 1:].float(), -1)
    nxt = fi.sampling.sampling_from_probs(q_next.view(-1, V)).view(B, K - 1)
    return tokens, nxt, q_next


def _inputs(B, K, V, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = 2.0 * torch.randn(B, K, V, device=device, generator=g)
    ar = (base + 0.5 * torch.randn(B, K, V, device=device, generator=g)).to(dt)
    draft_logits = base[:, : K - 1] + 0.5 * torch.randn(B, K - 1, V, device=device, generator=g)
    q = torch.softmax(draft_logits, -1)  # q_i, close to p_i: realistic acceptance lengths
    d_rest = torch.multinomial(q.view(-1, V), 1, generator=g).view(B, K - 1)
    d0 = torch.randint(0, V, (B, 1), device=device, generator=g)
    drafts = torch.cat([d0, d_rest], 1)
    blocks = (2.0 * torch.randn(B, K, K, V, device=device, generator=g)).to(dt)
    base = draft_logits = None
    return ar, blocks, drafts, q


def run(bench: Bench):
    dev = bench.device
    if bench.smoke:
        cases = [(B, V, K) for K in (4, 2) for V in (1000, 64) for B in (1, 2)]
    else:  # the Qwen2.5 vocabulary and Llama-2's
        vocabs = (shapes.vocab_size(shapes.MAIN), shapes.LLAMA2_VOCAB)
        cases = [(B, V, K) for K in (16, 8, 4) for V in vocabs for B in (1, 8, 64)]
    fi = flashinfer(dev)
    bench.start_suite("rejection", 60 if bench.smoke else 70)
    for B, V, K in cases:
        if bench.over_budget():
            for mode in ("sample", "greedy"):
                bench.skip(
                    f"{mode} B={B} V={V} K={K}",
                    "(all)",
                    bench.budget_reason(),
                    params={"B": B, "V": V, "K": K, "mode": mode},
                )
            continue
        try:
            inputs = _inputs(B, K, V, dev)
        except Exception as e:
            bench._error("(inputs)", f"B={B} V={V} K={K}", e)
            if bench.cuda:
                torch.cuda.empty_cache()
            continue
        for mode in ("sample", "greedy"):
            _mode_rows(bench, inputs, mode, fi)
        inputs = None
        if bench.cuda:
            torch.cuda.empty_cache()


def _mode_rows(bench: Bench, inputs, mode: str, fi):
    """Every implementation on one case in one mode (sample or greedy); ``fi``: (FlashInfer, None) or (None, why)."""
    ar, blocks, drafts, q = inputs
    B, K, V = ar.shape
    esz = ar.element_size()
    greedy = mode == "greedy"
    case = f"{mode} B={B} V={V} K={K}"
    params = {"B": B, "V": V, "K": K, "mode": mode}
    if greedy:
        nbytes = B * K * V * esz + B * (K - 1) * V * esz
    else:
        nbytes = B * K * V * esz + B * (K - 1) * V * (4 + esz + 4)
    common = dict(bytes_moved=nbytes, cold_l2=True, graph=True, params=params, rep_ms=50)

    def torch_setup():
        return (lambda: torch_step(ar, blocks, drafts, q, greedy)), None

    bench.measure(case, "torch", torch_setup, **common)
    if greedy:
        bench.skip(
            case, "flashinfer-chain", "FlashInfer's chain speculative sampling has no greedy mode", params=params
        )
    elif fi[0] is None:
        bench.skip(case, "flashinfer-chain", fi[1], params=params)
    else:

        def fi_setup():
            bufs = [torch.zeros(B, dtype=torch.int32, device=ar.device) for _ in range(2)]
            return (lambda: flashinfer_step(fi[0], ar, blocks, drafts, q, *bufs)), None

        bench.measure(
            case, "flashinfer-chain", fi_setup, notes="+ separate softmax and next-draft sampling (counted)", **common
        )
    _our_rows(bench, inputs, greedy, case, params, common)


def _our_rows(bench: Bench, inputs, greedy: bool, case, params, common):
    """``ours:<backend>`` (the implementation, checked against the reference with the same uniforms) and
    ``ours:<backend>+api`` (the public ``rejection_sample``)."""
    ar, blocks, drafts, q = inputs
    B, K, _ = ar.shape
    dev = bench.device
    temp = 0.0 if greedy else 1.0
    u_ref = tidar_kernels.draw_uniforms(B, K, generator=torch.Generator(device=dev).manual_seed(1), device=dev)
    dp = None if greedy else q
    ref = resolve(OP, "reference", dev)(ar, blocks, drafts, dp, None if greedy else u_ref, temp, None, None, 1.0)
    for backend, why in our_backends(OP, dev):
        name = f"ours:{backend}"
        if why is not None:
            bench.skip(case, name, why, params=params)
            continue

        def ours(backend=backend):
            impl = resolve(OP, backend, dev)
            out = impl(ar, blocks, drafts, dp, None if greedy else u_ref, temp, None, None, 1.0)
            check = _compare(out, ref, greedy) if backend != "reference" else "is the reference"
            gen = torch.Generator(device=dev).manual_seed(2)

            def fn():
                u = None if greedy else tidar_kernels.draw_uniforms(B, K, generator=gen)
                return impl(ar, blocks, drafts, dp, u, temp, None, None, 1.0)

            return fn, check

        bench.measure(case, name, ours, notes="kernel (no host-side validation), uniforms drawn inside", **common)

        def ours_api(backend=backend):
            gen = torch.Generator(device=dev).manual_seed(2)

            def fn():
                return tidar_kernels.rejection_sample(
                    ar, blocks, drafts, dp, temperature=temp, generator=gen, backend=backend
                )

            return fn, None

        bench.measure(case, name + "+api", ours_api, notes="public rejection_sample (validation included)", **common)


def _compare(out, ref, greedy) -> str:
    bad = []
    for name, a, b in zip(("accepted", "emitted", "next_drafts"), out[:3], ref[:3]):
        if not torch.equal(a.long(), b.long()):
            bad.append(name)
    if not greedy and out[3] is not None and ref[3] is not None:
        err = float((out[3].double() - ref[3].double()).abs().max())
        if err > 1e-4:
            bad.append(f"next_draft_probs (max err {err:.1e})")
    return "matches reference (same uniforms)" if not bad else "MISMATCH vs reference: " + ", ".join(bad)


def goals(bench: Bench):
    rows = [r for r in bench.rows if r["suite"] == "rejection" and r["status"] == "ok"]
    worst = None
    n = 0
    for case in sorted({r["case"] for r in rows if r["case"].startswith("sample")}):
        ours = [
            r for r in rows if r["case"] == case and r["impl"].startswith("ours:") and not r["impl"].endswith("+api")
        ]
        fi = [r for r in rows if r["case"] == case and r["impl"] == "flashinfer-chain"]
        if not ours or not fi:
            continue
        best = min(ours, key=lambda r: r["ms"])
        x = fi[0]["ms"] / best["ms"]
        n += 1
        if worst is None or x < worst[0]:
            worst = (x, case, best["impl"])
    if worst is None:
        bench.goal("rejection step vs FlashInfer", ">= 3x", "not measured", "no FlashInfer or no ours rows")
    else:
        x, case, impl = worst
        bench.goal(
            "rejection step vs FlashInfer (worst of the sampling cases)",
            ">= 3x",
            f"{x:.2f}x at {case} ({impl}; {n} cases)",
            "met" if x >= 3 else f"missed by {3 / x:.2f}x",
        )


def plots(bench: Bench, plot):
    out = []
    for V in sorted({r["params"].get("V") for r in bench.rows if r["suite"] == "rejection"} - {None}):
        K = max(r["params"].get("K", 0) for r in bench.rows if r["suite"] == "rejection")
        out.append(
            plot(
                f"rejection_V{V}_K{K}.png",
                title=f"Rejection step (sampling), V = {V}, K = {K}",
                x="B",
                y="ms",
                logx=True,
                logy=True,
                ylabel="ms (median)",
                where=lambda r, v=V, k=K: (
                    r["suite"] == "rejection"
                    and r["params"].get("V") == v
                    and r["params"].get("K") == k
                    and r["params"].get("mode") == "sample"
                ),
            )
        )
    return out
