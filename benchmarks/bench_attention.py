"""TiDAR attention: the training regime (S = 2L, forward and forward+backward) and the inference step
(S = K + K*K over a cached prefix).

Peers, in the same run:
- ``sdpa-dense-mask``: PyTorch SDPA with the dense boolean twin of the layout (the reference; K/V expanded
  to the query heads outside the timing, because SDPA's masked kernels take no GQA).
- ``flex-blockmask``: compiled FlexAttention, its BlockMask built directly from ``local_limit``/``block_id``
  (``BlockMask.from_kv_blocks`` with full/partial block tables computed per tile, see ``flex.block_tables``;
  no ``create_block_mask`` over a dense mask). On CPU in ``--smoke`` it runs eagerly (no compile).
- ``sdpa-causal (bound)``: SDPA ``is_causal`` flash over the same S (training) or SDPA over all keys with
  no mask (inference step): what a plain pass of that size costs, an upper bound on efficiency.
- ``ours:<backend>``: ``tidar_attention``'s implementation per live backend, called directly (the kernel,
  without the public function's host-side validation); ``ours:<backend>+api`` (inference step) times the
  public ``tidar_kernels.tidar_attention`` with its validation.

TFLOP/s counts only visible (query, key) pairs: 4*D flops per pair forward, 2.5x that backward.
Inference-step GB/s counts the K/V bytes read once (q and out are small), against the measured copy bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tidar_kernels
from tidar_kernels import layouts
from tidar_kernels.backends import resolve

from . import shapes
from .environment import our_backends
from .flex import block_tables, dense_block_tables, flex_block_mask, flex_fn
from .harness import Bench, err_check

OP = "tidar_attention"
# ------------------------------------------------------------------------------------------------
# one case, every implementation


class _Case:
    """The inputs of one case (q, K/V, the layout's vectors and block tables, the fp32/fp64 reference) and what
    every implementation's row shares: ``runner`` (forward, or forward + backward), ``check`` against the
    reference, and the ``measure`` keywords (flops, bytes, cold L2, graph, params)."""

    def __init__(self, bench: Bench, case, params, layout, seg_start, B, heads, backward, cold_l2, graph, report_bw):
        dev = bench.device
        Hq, Hkv, D = heads.q_heads, heads.kv_heads, heads.head_dim
        self.bench, self.case, self.params, self.backward = bench, case, params, backward
        self.dt = torch.bfloat16 if bench.cuda else torch.float32
        self.S = S = layout.seg_len
        self.Skv = Skv = seg_start + S
        self.seg_start = seg_start
        self.ll, self.bid = layout.local_limit.to(dev), layout.block_id.to(dev)
        self.scale = D**-0.5
        self.g = Hq // Hkv
        self.Hq, self.D, self.B = Hq, D, B
        torch.manual_seed(0)
        self.q = torch.randn(B, Hq, S, D, device=dev, dtype=self.dt)
        self.k = torch.randn(B, Hkv, Skv, D, device=dev, dtype=self.dt)
        self.v = torch.randn(B, Hkv, Skv, D, device=dev, dtype=self.dt)
        self.dout = torch.randn(B, Hq, S, D, device=dev, dtype=self.dt)
        self.seg_t = torch.full((B,), seg_start, dtype=torch.int32, device=dev)
        self.tables = self._checked_tables()
        flops = 4.0 * D * self.tables["pairs"] * B * Hq * (3.5 if backward else 1.0)
        kv_bytes = 2 * B * Hkv * Skv * D * self.k.element_size()
        self.mask = layouts.dense_mask(self.ll, self.bid, self.seg_t, Skv)[:, None]  # [B, 1, S, Skv]
        self.tol = 2e-2 if self.dt == torch.bfloat16 else 1e-4
        rd = torch.float32 if bench.cuda else torch.float64  # the reference: upcast SDPA with the dense mask
        self.ref = F.scaled_dot_product_attention(
            self.q.to(rd),
            self.k.repeat_interleave(self.g, 1).to(rd),
            self.v.repeat_interleave(self.g, 1).to(rd),
            attn_mask=self.mask,
            scale=self.scale,
        ).float()
        self.common = dict(
            flops=flops,
            bytes_moved=kv_bytes if report_bw else None,
            cold_l2=cold_l2,
            graph=graph and not backward,
            params=params,
        )

    def _checked_tables(self) -> dict:
        tables = block_tables(self.ll, self.bid, self.seg_start, self.Skv)
        if self.bench.smoke or self.S * self.Skv <= 4096 * 4096:  # the dense twin is cheap: prove the tables
            twin = dense_block_tables(self.ll, self.bid, self.seg_start, self.Skv)
            ok = all(torch.equal(tables[n], twin[n]) for n in ("partial", "full")) and tables["pairs"] == twin["pairs"]
            if not ok:
                raise AssertionError(f"block tables from the layout vectors disagree with the dense twin ({self.case})")
        return tables

    def leaves(self, *ts):
        return [t.detach().clone().requires_grad_(self.backward) for t in ts]

    def runner(self, attn, inputs):
        """fn for timing: forward, or forward + backward of ``attn(*inputs)``."""
        if self.backward:

            def fn():
                for t in inputs:  # no gradient accumulation between runs (host-side, no device work)
                    t.grad = None
                attn(*inputs).backward(self.dout)
        else:

            def fn():
                with torch.no_grad():
                    return attn(*inputs)

        return fn

    def check(self, attn, inputs):
        with torch.no_grad():
            return err_check(attn(*inputs).float(), self.ref, self.tol)

    def measure(self, impl, setup, **kw):
        self.bench.measure(self.case, impl, setup, **{**self.common, **kw})


def _sdpa_mask_row(c: _Case):
    def sdpa_mask():
        ins = c.leaves(c.q, c.k.repeat_interleave(c.g, 1), c.v.repeat_interleave(c.g, 1))

        def attn(q_, k_, v_):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=c.mask, scale=c.scale)

        return c.runner(attn, ins), c.check(attn, ins)

    c.measure("sdpa-dense-mask", sdpa_mask, notes="K/V expanded to Hq outside timing")


def _flex_row(c: _Case):
    compiled = c.bench.cuda
    try:
        block_mask = flex_block_mask(c.ll, c.bid, c.seg_start, c.Skv, c.tables)
        flex_reason = None
    except Exception as e:  # an old torch without from_kv_blocks' arguments, for instance
        flex_reason = f"BlockMask.from_kv_blocks failed: {type(e).__name__}: {e}"
    if flex_reason is None and c.backward and not c.bench.cuda:
        flex_reason = "FlexAttention has no backward on CPU"
    if flex_reason:
        c.bench.skip(c.case, "flex-blockmask", flex_reason, params=c.params)
        return

    def flex():
        ins = c.leaves(c.q, c.k, c.v)
        fa = flex_fn(compiled)

        def attn(q_, k_, v_):
            return fa(q_, k_, v_, block_mask=block_mask, scale=c.scale, enable_gqa=c.g > 1)

        return c.runner(attn, ins), c.check(attn, ins)

    note = "compiled" if compiled else "eager on CPU (compile skipped in --smoke; times are not FlexAttention's)"
    c.measure("flex-blockmask", flex, notes=note)


def _bound_row(c: _Case, bound: str):
    """The plain pass of that size: SDPA ``is_causal`` over S (training) or over all keys with no mask (step)."""
    causal = bound == "causal"

    def bound_fn():
        ins = c.leaves(c.q, c.k, c.v)

        def attn(q_, k_, v_):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=c.scale, enable_gqa=c.g > 1)

        return c.runner(attn, ins), None

    S, Skv = c.S, c.Skv
    if causal:
        bound_pairs = S * (S + 1) // 2
        bname, bnote = "sdpa-causal (bound)", f"plain causal over S={S}: {bound_pairs} pairs, counted as its own work"
    else:
        bound_pairs = S * Skv
        bname, bnote = "sdpa-nomask (bound)", "all keys, no mask: the same K/V read without any masking"
    bflops = 4.0 * c.D * bound_pairs * c.B * c.Hq * (3.5 if c.backward else 1.0)
    c.measure(bname, bound_fn, flops=bflops, notes=bnote)


def _our_rows(c: _Case, api: bool):
    dev = c.bench.device
    for backend, why in our_backends(OP, dev):
        name = f"ours:{backend}"
        if why is not None:
            c.bench.skip(c.case, name, why, params=c.params)
            continue
        if backend == "reference" and c.bench.cuda:
            c.bench.skip(
                c.case,
                name,
                "the reference is SDPA with the dense mask (the sdpa-dense-mask row) plus "
                "building that mask per call; not timed on GPU",
                params=c.params,
            )
            continue

        def ours(backend=backend):
            impl = resolve(OP, backend, dev)
            ins = c.leaves(c.q, c.k, c.v)

            def attn(q_, k_, v_):
                return impl(q_, k_, v_, c.ll, c.bid, c.seg_t, c.scale)

            return c.runner(attn, ins), c.check(attn, ins)

        c.measure(name, ours, notes="kernel (no host-side validation)")
        if api:

            def ours_api(backend=backend):
                ins = c.leaves(c.q, c.k, c.v)

                def attn(q_, k_, v_):
                    return tidar_kernels.tidar_attention(q_, k_, v_, c.ll, c.bid, c.seg_t, c.scale, backend=backend)

                return c.runner(attn, ins), c.check(attn, ins)

            c.measure(name + "+api", ours_api, notes="public tidar_attention (validation included)")


def _case(bench: Bench, *, bound: str, api: bool, **inputs):
    """Every implementation on one case: SDPA with the dense mask, FlexAttention, the plain-pass bound, ours."""
    c = _Case(bench, **inputs)
    _sdpa_mask_row(c)
    _flex_row(c)
    _bound_row(c, bound)
    _our_rows(c, api)
    c = None  # free the inputs now (the timed closures keep their cells)
    if bench.cuda:
        torch.cuda.empty_cache()


def run(bench: Bench):
    heads = shapes.attention(shapes.SMOKE if bench.smoke else shapes.MAIN)  # 1.5B: 12 query heads, 2 K/V, D = 128
    Hq, Hkv, D = heads.q_heads, heads.kv_heads, heads.head_dim
    B_train = 1
    if bench.smoke:
        train = [(16, 4), (32, 4)]
        steps = [(1, 32, 2), (2, 64, 3)]
    else:
        train = [(4096, 16), (1024, 16)]  # the goal's shape first: a spent budget cuts the smaller one
        steps = [(8, P, 16) for P in (8192, 32768, 16384, 4096, 1024)] + [(1, 4096, 16), (1, 16384, 16)]
        steps += [(1, 4096, 8), (1, 4096, 4)]

    bench.start_suite("attention_train", 60 if bench.smoke else 100)
    for backward in (True, False):  # fwd+bwd (the goal) first
        for L, K in train:
            pas = "fwd+bwd" if backward else "fwd"
            _case(
                bench,
                case=f"{pas} L={L} S={2 * L} K={K} B={B_train} H={Hq}/{Hkv} D={D}",
                params={"L": L, "K": K, "S": 2 * L, "B": B_train, "pass": pas},
                layout=layouts.training(L, K),
                seg_start=0,
                B=B_train,
                heads=heads,
                backward=backward,
                bound="causal",
                api=False,
                cold_l2=False,
                graph=False,
                report_bw=False,
            )

    bench.start_suite("attention_step", 60 if bench.smoke else 80)
    for B, P, K in steps:
        layout = layouts.decode_step(K)
        _case(
            bench,
            case=f"B={B} prefix={P} K={K} S={layout.seg_len} H={Hq}/{Hkv} D={D}",
            params={"B": B, "prefix": P, "K": K, "S": layout.seg_len},
            layout=layout,
            seg_start=P,
            B=B,
            heads=heads,
            backward=False,
            bound="nomask",
            api=True,
            cold_l2=True,
            graph=True,
            report_bw=True,
        )


def _best(rows, suite, case, prefix):
    ok = [
        r
        for r in rows
        if r["suite"] == suite
        and r["case"] == case
        and r["status"] == "ok"
        and r["impl"].startswith(prefix)
        and not r["impl"].endswith("+api")
    ]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def goals(bench: Bench):
    rows = bench.rows
    train = sorted(
        {r["case"] for r in rows if r["suite"] == "attention_train" and r["case"].startswith("fwd+bwd")},
        key=lambda c: int(c.split("L=")[1].split()[0]),
    )
    if train:
        c = train[-1]
        ours, flex, sdpa = (
            _best(rows, "attention_train", c, p) for p in ("ours:", "flex-blockmask", "sdpa-dense-mask")
        )
        for peer, name, target in ((flex, "FlexAttention", 1.5), (sdpa, "SDPA with mask", 5.0)):
            if ours and peer:
                x = peer["ms"] / ours["ms"]
                bench.goal(
                    f"training attention fwd+bwd vs {name} ({c})",
                    f">= {target}x",
                    f"{x:.2f}x ({ours['impl']} {ours['ms']:.3g} ms vs {peer['ms']:.3g} ms)",
                    "met" if x >= target else f"missed by {target / x:.2f}x",
                )
            else:
                bench.goal(
                    f"training attention fwd+bwd vs {name} ({c})",
                    f">= {target}x",
                    "not measured",
                    "no " + ("ours" if not ours else name) + " row",
                )
    step = [
        r
        for r in rows
        if r["suite"] == "attention_step" and r["params"].get("prefix", 0) >= 8192 and r["params"].get("K") == 16
    ]
    for case in sorted({r["case"] for r in step}):
        ours = _best(rows, "attention_step", case, "ours:")
        flex = _best(rows, "attention_step", case, "flex-blockmask")
        if ours is None:
            bench.goal(
                f"inference-step attention ({case})", ">= 70% of copy BW, >= 2x Flex", "not measured", "no ours row"
            )
            continue
        pct = ours.get("pct_copy_bw")
        x = flex["ms"] / ours["ms"] if flex else None
        met = (pct != "" and pct is not None and pct >= 70) and (x is not None and x >= 2)
        measured = (
            (f"{pct:.0f}% of copy BW" if isinstance(pct, float) else "no copy BW")
            + ", "
            + (f"{x:.2f}x Flex" if x else "no Flex row")
            + f" ({ours['impl']}, {ours['ms']:.3g} ms)"
        )
        bench.goal(
            f"inference-step attention ({case})", ">= 70% of copy BW, >= 2x Flex", measured, "met" if met else "missed"
        )


def plots(bench: Bench, plot):
    out = []
    peak = (bench._ceil or {}).get("matmul_tflops")
    for pas in ("fwd", "fwd+bwd"):
        out.append(
            plot(
                f"attention_train_{pas.replace('+', '_')}.png",
                title=f"TiDAR training attention {pas} (S = 2L, K = 16)",
                x="L",
                y="tflops",
                logx=True,
                ylabel="TFLOP/s (visible pairs only)",
                where=lambda r, p=pas: r["suite"] == "attention_train" and r["params"].get("pass") == p,
                hlines={"measured matmul peak": peak},
            )
        )
    copy = (bench._ceil or {}).get("copy_gbps")
    step = [r for r in bench.rows if r["suite"] == "attention_step" and r["params"]]
    K = max((r["params"].get("K", 0) for r in step), default=16)
    for B in sorted({r["params"].get("B") for r in step} - {None}):
        out.append(
            plot(
                f"attention_step_B{B}.png",
                title=f"TiDAR inference-step attention, K = {K}, batch {B}",
                x="prefix",
                y="gbps",
                logx=True,
                ylabel="GB/s of K/V read",
                where=lambda r, b=B: (
                    r["suite"] == "attention_step" and r["params"].get("B") == b and r["params"].get("K") == K
                ),
                hlines={"measured copy BW": copy},
            )
        )
    return out
