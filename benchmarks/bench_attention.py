"""TiDAR attention: the training regime (S = 2L, forward and forward+backward) and the inference step
(S = K + K*K over a cached prefix).

Peers, in the same run:
- ``sdpa-dense-mask``: PyTorch SDPA with the dense boolean twin of the layout (the reference; K/V expanded
  to the query heads outside the timing, because SDPA's masked kernels take no GQA).
- ``flex-blockmask``: compiled FlexAttention, its BlockMask built directly from ``local_limit``/``block_id``
  (``BlockMask.from_kv_blocks`` with full/partial block tables computed per tile, see ``block_tables``;
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

import math

import torch
import torch.nn.functional as F

import tidar_kernels
from tidar_kernels import layouts
from tidar_kernels.backends import resolve

from .environment import our_backends
from .harness import Bench, err_check

OP = "tidar_attention"
TILE = 128  # FlexAttention's default Q and KV block size


# ------------------------------------------------------------------------------------------------
# block tables straight from the layout vectors


def block_tables(
    local_limit: torch.Tensor,
    block_id: torch.Tensor,
    seg_start: int,
    kv_len: int,
    q_tile: int = TILE,
    kv_tile: int = TILE,
) -> dict:
    """Per (query tile, key tile): full (every pair visible) or partial (some) — from the vectors, never
    from a dense mask. Work is O(S * kv_len / kv_tile): for each query, the number of visible keys in each
    key tile is the overlap of the tile with two intervals, the prefix ``[0, seg_start + local_limit[i])``
    and its block's run in the segment (blocks are contiguous runs in every TiDAR layout; checked).

    Returns ``partial``/``full`` bool ``[nq, nk]``, ``counts`` int64 ``[S, nk]`` and ``pairs`` (visible pairs)."""
    dev = local_limit.device
    S = local_limit.shape[0]
    ll = local_limit.long()
    bid = block_id.long()
    nq, nk = math.ceil(S / q_tile), math.ceil(kv_len / kv_tile)
    c0 = torch.arange(nk, device=dev) * kv_tile
    c1 = (c0 + kv_tile).clamp_max(kv_len)
    pre_end = seg_start + ll  # [S]
    counts = (torch.minimum(pre_end[:, None], c1[None]) - c0[None]).clamp_min(0)  # prefix part
    has = bid >= 0
    if bool(has.any()):
        ids = bid.clamp_min(0)
        nb = int(ids.max()) + 1
        idx = torch.arange(S, device=dev)
        lo = torch.full((nb,), S, device=dev).scatter_reduce(0, ids[has], idx[has], "amin")
        hi = torch.full((nb,), -1, device=dev).scatter_reduce(0, ids[has], idx[has], "amax") + 1
        size = torch.zeros(nb, dtype=torch.long, device=dev).scatter_add(0, ids[has], torch.ones_like(idx[has]))
        used = size > 0
        if not torch.equal((hi - lo)[used], size[used]):
            raise NotImplementedError("block_tables needs every block to be a contiguous run of the segment")
        b_lo = torch.maximum(seg_start + lo[ids], pre_end)  # keys of the block not already in the prefix
        b_hi = seg_start + hi[ids]
        blk = (torch.minimum(b_hi[:, None], c1[None]) - torch.maximum(b_lo[:, None], c0[None])).clamp_min(0)
        counts = counts + torch.where(has[:, None], blk, 0)
    tile_len = (c1 - c0)[None]
    pad = nq * q_tile - S  # query rows past S do not exist: they neither fill nor break a tile
    full_q = torch.cat([counts == tile_len, torch.ones(pad, nk, dtype=torch.bool, device=dev)])
    any_q = torch.cat([counts > 0, torch.zeros(pad, nk, dtype=torch.bool, device=dev)])
    full = full_q.view(nq, q_tile, nk).all(1)
    partial = any_q.view(nq, q_tile, nk).any(1) & ~full
    return {"partial": partial, "full": full, "counts": counts, "pairs": int(counts.sum())}


def dense_block_tables(local_limit, block_id, seg_start: int, kv_len: int, q_tile=TILE, kv_tile=TILE) -> dict:
    """The same tables from the dense twin (``layouts.dense_mask``): the check of ``block_tables``."""
    m = layouts.dense_mask(local_limit, block_id, seg_start, kv_len)[0]  # [S, Skv]
    S = m.shape[0]
    nq, nk = math.ceil(S / q_tile), math.ceil(kv_len / kv_tile)
    padded = torch.zeros(nq * q_tile, nk * kv_tile, dtype=torch.bool, device=m.device)
    padded[:S, :kv_len] = m
    valid = torch.zeros_like(padded)
    valid[:S, :kv_len] = True
    t = padded.view(nq, q_tile, nk, kv_tile).transpose(1, 2)
    v = valid.view(nq, q_tile, nk, kv_tile).transpose(1, 2)
    anyv = t.flatten(2).any(-1)
    full = (t | ~v).flatten(2).all(-1) & v.flatten(2).any(-1)
    return {"partial": anyv & ~full, "full": full, "pairs": int(m.sum())}


def _kv_table(mask: torch.Tensor):
    """bool [nq, nk] -> (num [1, 1, nq], indices [1, 1, nq, nk]) int32, listed tiles first in kv order."""
    nk = mask.shape[1]
    num = mask.sum(-1).to(torch.int32)
    order = torch.argsort((~mask).to(torch.int8) * nk + torch.arange(nk, device=mask.device), dim=-1)
    return num[None, None], order.to(torch.int32)[None, None]


def flex_block_mask(local_limit, block_id, seg_start: int, kv_len: int, tables: dict):
    from torch.nn.attention.flex_attention import BlockMask

    S = local_limit.shape[0]
    ll, bid = local_limit.long(), block_id.long()

    def mask_mod(b, h, q_idx, kv_idx):
        rel = kv_idx - seg_start
        in_seg = (rel >= 0) & (rel < S)
        bq = bid[q_idx]
        bk = bid[rel.clamp(0, S - 1)]
        return (kv_idx < seg_start + ll[q_idx]) | (in_seg & (bq >= 0) & (bk == bq))

    kv_num, kv_idx = _kv_table(tables["partial"])
    full_num, full_idx = _kv_table(tables["full"])
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(S, kv_len)
    )


_FLEX = {}


def flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _FLEX:
        import torch._dynamo

        for name in (
            "cache_size_limit",
            "recompile_limit",
            "accumulated_cache_size_limit",
            "accumulated_recompile_limit",
        ):
            if hasattr(torch._dynamo.config, name):  # one compile per shape; never fall back to eager silently
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


# ------------------------------------------------------------------------------------------------
# one case, every implementation


def _case(
    bench: Bench,
    *,
    case: str,
    params: dict,
    layout,
    seg_start: int,
    B: int,
    Hq: int,
    Hkv: int,
    D: int,
    backward: bool,
    bound: str,
    api: bool,
    cold_l2: bool,
    graph: bool,
    report_bw: bool,
):
    dev = bench.device
    dt = torch.bfloat16 if bench.cuda else torch.float32
    S = layout.seg_len
    Skv = seg_start + S
    ll, bid = layout.local_limit.to(dev), layout.block_id.to(dev)
    scale = D**-0.5
    g = Hq // Hkv
    torch.manual_seed(0)
    q = torch.randn(B, Hq, S, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, Skv, D, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, Skv, D, device=dev, dtype=dt)
    dout = torch.randn(B, Hq, S, D, device=dev, dtype=dt)
    seg_t = torch.full((B,), seg_start, dtype=torch.int32, device=dev)

    tables = block_tables(ll, bid, seg_start, Skv)
    if bench.smoke or S * Skv <= 4096 * 4096:  # the dense twin is cheap here: prove the tables against it
        twin = dense_block_tables(ll, bid, seg_start, Skv)
        ok = all(torch.equal(tables[n], twin[n]) for n in ("partial", "full")) and tables["pairs"] == twin["pairs"]
        if not ok:
            raise AssertionError(f"block tables from the layout vectors disagree with the dense twin ({case})")
    pairs = tables["pairs"]
    fwd_flops = 4.0 * D * pairs * B * Hq
    flops = fwd_flops * (3.5 if backward else 1.0)
    kv_bytes = 2 * B * Hkv * Skv * D * k.element_size()
    mask = layouts.dense_mask(ll, bid, seg_t, Skv)[:, None]  # [B, 1, S, Skv]
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    rd = torch.float32 if bench.cuda else torch.float64  # the reference: upcast SDPA with the dense mask
    ref = F.scaled_dot_product_attention(
        q.to(rd), k.repeat_interleave(g, 1).to(rd), v.repeat_interleave(g, 1).to(rd), attn_mask=mask, scale=scale
    ).float()
    common = dict(
        flops=flops,
        bytes_moved=kv_bytes if report_bw else None,
        cold_l2=cold_l2,
        graph=graph and not backward,
        params=params,
    )

    def leaves(*ts):
        return [t.detach().clone().requires_grad_(backward) for t in ts]

    def runner(attn, inputs):
        """fn for timing: forward, or forward + backward of ``attn(*inputs)``."""
        if backward:

            def fn():
                for t in inputs:  # no gradient accumulation between runs (host-side, no device work)
                    t.grad = None
                attn(*inputs).backward(dout)
        else:

            def fn():
                with torch.no_grad():
                    return attn(*inputs)

        return fn

    def check(attn, inputs):
        with torch.no_grad():
            return err_check(attn(*inputs).float(), ref, tol)

    # --- sdpa with the dense mask --------------------------------------------------------------
    def sdpa_mask():
        ins = leaves(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

        def attn(q_, k_, v_):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale)

        return runner(attn, ins), check(attn, ins)

    bench.measure(case, "sdpa-dense-mask", sdpa_mask, notes="K/V expanded to Hq outside timing", **common)

    # --- flex attention from block tables -----------------------------------------------------
    compiled = bench.cuda
    try:
        block_mask = flex_block_mask(ll, bid, seg_start, Skv, tables)
        flex_reason = None
    except Exception as e:  # an old torch without from_kv_blocks' arguments, for instance
        flex_reason = f"BlockMask.from_kv_blocks failed: {type(e).__name__}: {e}"
    if flex_reason is None and backward and not bench.cuda:
        flex_reason = "FlexAttention has no backward on CPU"
    if flex_reason:
        bench.skip(case, "flex-blockmask", flex_reason, params=params)
    else:

        def flex():
            ins = leaves(q, k, v)
            fa = flex_fn(compiled)

            def attn(q_, k_, v_):
                return fa(q_, k_, v_, block_mask=block_mask, scale=scale, enable_gqa=g > 1)

            return runner(attn, ins), check(attn, ins)

        note = "compiled" if compiled else "eager on CPU (compile skipped in --smoke; times are not FlexAttention's)"
        bench.measure(case, "flex-blockmask", flex, notes=note, **common)

    # --- the plain-pass bound ------------------------------------------------------------------
    def bound_fn():
        ins = leaves(q, k, v)
        if bound == "causal":

            def attn(q_, k_, v_):
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, enable_gqa=g > 1)
        else:

            def attn(q_, k_, v_):
                return F.scaled_dot_product_attention(q_, k_, v_, scale=scale, enable_gqa=g > 1)

        return runner(attn, ins), None

    if bound == "causal":
        bound_pairs = S * (S + 1) // 2
        bname, bnote = "sdpa-causal (bound)", f"plain causal over S={S}: {bound_pairs} pairs, counted as its own work"
    else:
        bound_pairs = S * Skv
        bname, bnote = "sdpa-nomask (bound)", "all keys, no mask: the same K/V read without any masking"
    bflops = 4.0 * D * bound_pairs * B * Hq * (3.5 if backward else 1.0)
    bench.measure(case, bname, bound_fn, **{**common, "flops": bflops}, notes=bnote)

    # --- ours -------------------------------------------------------------------------------
    for backend, why in our_backends(OP, dev):
        name = f"ours:{backend}"
        if why is not None:
            bench.skip(case, name, why, params=params)
            continue
        if backend == "reference" and bench.cuda:
            bench.skip(
                case,
                name,
                "the reference is SDPA with the dense mask (the sdpa-dense-mask row) plus "
                "building that mask per call; not timed on GPU",
                params=params,
            )
            continue

        def ours(backend=backend):
            impl = resolve(OP, backend, dev)
            ins = leaves(q, k, v)

            def attn(q_, k_, v_):
                return impl(q_, k_, v_, ll, bid, seg_t, scale)

            return runner(attn, ins), check(attn, ins)

        bench.measure(case, name, ours, notes="kernel (no host-side validation)", **common)
        if api:

            def ours_api(backend=backend):
                ins = leaves(q, k, v)

                def attn(q_, k_, v_):
                    return tidar_kernels.tidar_attention(q_, k_, v_, ll, bid, seg_t, scale, backend=backend)

                return runner(attn, ins), check(attn, ins)

            bench.measure(case, name + "+api", ours_api, notes="public tidar_attention (validation included)", **common)
    q = k = v = dout = mask = ref = None  # free the inputs now (the timed closures keep their cells)
    if bench.cuda:
        torch.cuda.empty_cache()


def run(bench: Bench):
    if bench.smoke:
        B_train, Hq, Hkv, D = 1, 4, 2, 16
        train = [(16, 4), (32, 4)]
        steps = [(1, 32, 2), (2, 64, 3)]
    else:
        B_train, Hq, Hkv, D = 1, 12, 2, 128  # Qwen2.5-1.5B attention: 12 query heads, 2 K/V heads, D = 128
        train = [(4096, 16), (1024, 16)]  # the goal's shape first: a spent budget cuts the smaller one
        steps = [(8, P, 16) for P in (8192, 32768, 16384, 4096, 1024)] + [(1, 4096, 16), (1, 16384, 16)]
        steps += [(1, 4096, 8), (1, 4096, 4)]

    bench.start_suite("attention_train", 60 if bench.smoke else 100)
    for backward in (True, False):  # fwd+bwd (the goal) first
        for L, K in train:
            pas = "fwd+bwd" if backward else "fwd"
            case = f"{pas} L={L} S={2 * L} K={K} B={B_train} H={Hq}/{Hkv} D={D}"
            _case(
                bench,
                case=case,
                params={"L": L, "K": K, "S": 2 * L, "B": B_train, "pass": pas},
                layout=layouts.training(L, K),
                seg_start=0,
                B=B_train,
                Hq=Hq,
                Hkv=Hkv,
                D=D,
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
        case = f"B={B} prefix={P} K={K} S={layout.seg_len} H={Hq}/{Hkv} D={D}"
        _case(
            bench,
            case=case,
            params={"B": B, "prefix": P, "K": K, "S": layout.seg_len},
            layout=layout,
            seg_start=P,
            B=B,
            Hq=Hq,
            Hkv=Hkv,
            D=D,
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
