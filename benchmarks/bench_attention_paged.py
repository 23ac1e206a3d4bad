"""Paged TiDAR attention and paged KV append (suite ``attention_paged``): the inference step (S = K + K*K) over
ragged rows whose keys sit in a shuffled pool of fixed-size blocks (vLLM's NHD layout), addressed by block tables.

Peers, in the same run, all reading the same pool (checked against the fp32/fp64 reference):
- ``contiguous:<backend>``: ``tidar_attention``'s implementation on the same keys in a contiguous
  ``[B, Hkv, Skv, D]`` cache (gathered outside the timing): what paging costs (the goal: within 10%).
- ``sdpa-gathered``: gather the rows' keys through the table (index ops) + SDPA with the dense mask (built
  outside the timing), GQA by ``enable_gqa``: the obvious PyTorch way.
- ``flex-blockmask-paged``: FlexAttention over the whole pool as one key sequence, the rows' queries as one query
  sequence, a ``mask_mod`` that maps each physical slot to its row and logical position (attention-gym's paged
  attention, without the logical-to-physical block-mask conversion: its BlockMask comes from ``create_block_mask``
  over the physical pool, outside the timing). Compiled on GPU; eager on CPU (``--smoke``: not FlexAttention's times).
- ``flashinfer-paged-prefill``: FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` on the same NHD pool with the
  TiDAR mask as its custom mask (plan outside the timing), when FlashInfer is importable (CUDA only).
- ``ours:<backend>``: ``tidar_attention_paged``'s implementation (no host-side validation); ``+api``: the public op;
  ``+seg``: the separate-segment form (the K * K proposal rows' K/V in ``k_seg``/``v_seg``, not in the pool).

``kv_append_paged`` rows (suite ``kv_append_paged``): a step's tokens to shuffled slots (10% -1) against one
``index_put_`` per cache (``torch-index_put``); bit-exact over the whole pool; GB/s counts bytes read + written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import tidar_kernels
from tidar_kernels import layouts
from tidar_kernels.backends import resolve
from tidar_kernels.reference.tidar_attention_paged import gather_paged_kv

from . import shapes
from .environment import flashinfer, our_backends
from .flex import flex_fn
from .harness import Bench, err_check

OP = "tidar_attention_paged"


def _pool(lens, Hkv, D, bs, dt, dev, seed=0, spare=4):
    """A shuffled pool holding each row's keys, its block table (rows padded with -1) and seq_lens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    need = [math.ceil(n / bs) for n in lens]
    nb = sum(need) + spare
    perm = torch.randperm(nb, generator=g)
    table = torch.full((len(lens), max(need)), -1, dtype=torch.int32)
    used = 0
    for b, m in enumerate(need):
        table[b, :m] = perm[used : used + m].int()
        used += m
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dt).to(dev)
    vc = torch.randn(nb, bs, Hkv, D, generator=g).to(dt).to(dev)
    return kc, vc, table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)


def _flex_paged_mask(table, seq_lens, lay, S, nb, bs, dev):
    """create_block_mask over (all rows' queries) x (the whole pool) from the TiDAR rule read through the table."""
    from torch.nn.attention.flex_attention import create_block_mask

    B = table.shape[0]
    owner = torch.full((nb,), -1, dtype=torch.long, device=dev)
    logical = torch.zeros(nb, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)[:, None].expand_as(table)
    cols = torch.arange(table.shape[1], device=dev)[None].expand_as(table)
    ok = table >= 0
    owner[table[ok].long()] = rows[ok]
    logical[table[ok].long()] = cols[ok]
    ll, bid = lay.local_limit.to(dev).long(), lay.block_id.to(dev).long()
    lens = seq_lens.long()
    seg = lens - S

    def mask_mod(b, h, q_idx, kv_idx):
        r, i = q_idx // S, q_idx % S
        p = kv_idx // bs
        j = logical[p] * bs + kv_idx % bs
        rel = j - seg[r]
        in_seg = (rel >= 0) & (rel < S)
        bk = bid[rel.clamp(0, S - 1)]
        rule = (j < seg[r] + ll[i]) | (in_seg & (bid[i] >= 0) & (bk == bid[i]))
        return (owner[p] == r) & (j < lens[r]) & rule

    return create_block_mask(mask_mod, 1, None, B * S, nb * bs, device=str(dev), BLOCK_SIZE=128)


def _flashinfer_wrapper(fi, table, seq_lens, lay, S, Hq, Hkv, D, bs, dt, dev):
    B = table.shape[0]
    lens = seq_lens.tolist()
    pages = [math.ceil(n / bs) for n in lens]
    indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0)), dtype=torch.int32, device=dev)
    indices = torch.cat([table[b, : pages[b]] for b in range(B)]).to(torch.int32)
    last = torch.tensor([n - (p - 1) * bs for n, p in zip(lens, pages)], dtype=torch.int32, device=dev)
    qo_indptr = (torch.arange(B + 1, dtype=torch.int32) * S).to(dev)
    ll, bid = lay.local_limit.to(dev), lay.block_id.to(dev)
    mask = torch.cat([layouts.dense_mask(ll, bid, n - S, n)[0].reshape(-1) for n in lens])
    workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    w.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, bs, custom_mask=mask, q_data_type=dt)
    return w


def _attention_case(bench: Bench, B, prefix, K, bs, Hq, Hkv, D, dt):
    dev = bench.device
    lay = layouts.decode_step(K)
    S = lay.seg_len
    lens = [prefix + S - (37 * b) % max(1, min(prefix, 64)) for b in range(B)]  # ragged rows
    case = f"B={B} prefix~{prefix} K={K} S={S} block={bs} H={Hq}/{Hkv} D={D}"
    params = {"B": B, "prefix": prefix, "K": K, "S": S, "block_size": bs}
    kc, vc, table, seq_lens = _pool(lens, Hkv, D, bs, dt, dev, seed=B * 7 + bs)
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.randn(B, Hq, S, D, generator=g).to(dt).to(dev)
    ll, bid = lay.local_limit.to(dev), lay.block_id.to(dev)
    scale = D**-0.5
    k_cont, v_cont = (t.contiguous() for t in gather_paged_kv(kc, vc, table, seq_lens))
    seg_t = seq_lens - S
    rd = torch.float32 if bench.cuda else torch.float64
    with torch.no_grad():
        ref = tidar_kernels.tidar_attention_paged(
            q.to(rd), kc.to(rd), vc.to(rd), table, seq_lens, ll, bid, backend="reference"
        ).float()
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    kv_bytes = 2 * sum(lens) * Hkv * D * kc.element_size()
    pairs = int(sum(int(layouts.dense_mask(lay.local_limit, lay.block_id, n - S, n).sum()) for n in lens))
    common = dict(flops=4.0 * D * pairs * Hq, bytes_moved=kv_bytes, cold_l2=True, graph=True, params=params)

    def timed(fn, reshape=None):
        def setup():
            with torch.no_grad():
                out = fn()
                out = reshape(out) if reshape else out
                return (lambda: _no_grad(fn)), err_check(out.float(), ref, tol)

        return setup

    # contiguous baseline (tidar_attention on the same keys, contiguous), then ours (paged)
    paged = (q, kc, vc, table, seq_lens, ll, bid, scale)
    _kernel_rows(bench, case, params, common, timed, K, paged, (q, k_cont, v_cont, ll, bid, seg_t, scale))

    # SDPA on the keys gathered through the table (the gather timed)
    mask = layouts.dense_mask(ll, bid, seg_t, int(seq_lens.max()))[:, None]

    def sdpa_gathered():
        k, v = gather_paged_kv(kc, vc, table, seq_lens)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)

    bench.measure(case, "sdpa-gathered", timed(sdpa_gathered), notes="gather + masked SDPA, mask prebuilt", **common)

    # FlexAttention over the pool
    _flex_row(bench, case, params, common, timed, q, kc, vc, table, seq_lens, lay, scale)

    fi, fi_why = flashinfer(dev)
    if fi is None:
        bench.skip(case, "flashinfer-paged-prefill", fi_why, params=params)
    else:

        def flashinfer_setup():
            w = _flashinfer_wrapper(fi, table, seq_lens, lay, S, Hq, Hkv, D, bs, dt, dev)
            q_rag = q.permute(0, 2, 1, 3).reshape(B * S, Hq, D).contiguous()
            return timed(lambda: w.run(q_rag, (kc, vc)), lambda o: o.view(B, S, Hq, D).permute(0, 2, 1, 3))()

        bench.measure(case, "flashinfer-paged-prefill", flashinfer_setup, notes="custom mask; plan outside timing",
                      **common)  # fmt: skip


def _kernel_rows(bench, case, params, common, timed, K, paged, contiguous):
    """``contiguous:<backend>`` (tidar_attention on the same keys, contiguous: ``contiguous`` are its arguments),
    then ``ours:<backend>`` (paged: ``paged``) with its ``+api`` and ``+seg`` (separate-segment) forms."""
    dev = bench.device
    q, kc, vc, table, seq_lens, ll, bid, scale = paged
    k_cont, v_cont = contiguous[1:3]
    B, _, S, D = q.shape
    Hkv = kc.shape[2]
    S_sep = S - K  # the proposal rows: off the pool in the separate-segment form (the same keys, contiguous)
    idx = (seq_lens.long() - S_sep)[:, None] + torch.arange(S_sep, device=dev)[None]
    k_seg, v_seg = (t.gather(2, idx[:, None, :, None].expand(B, Hkv, S_sep, D)).contiguous() for t in (k_cont, v_cont))
    for op, prefix_name, impl_args in (
        ("tidar_attention", "contiguous", contiguous),
        (OP, "ours", paged),
    ):
        for backend, why in our_backends(op, dev):
            name = f"{prefix_name}:{backend}"
            if why is not None:
                bench.skip(case, name, why, params=params)
                continue
            if backend == "reference" and bench.cuda:
                bench.skip(case, name, "the reference is SDPA with a dense mask; not timed on GPU", params=params)
                continue
            impl = resolve(op, backend, dev)
            bench.measure(case, name, timed(lambda impl=impl, a=impl_args: impl(*a)), **common)
            if op == OP:
                api = lambda b=backend: tidar_kernels.tidar_attention_paged(  # noqa: E731
                    q, kc, vc, table, seq_lens, ll, bid, scale=scale, backend=b
                )
                bench.measure(case, name + "+api", timed(api), notes="public op (validation included)", **common)
                seg_args = (q, kc, vc, table, seq_lens - S_sep, ll, bid, scale, None, k_seg, v_seg)
                bench.measure(
                    case,
                    name + "+seg",
                    timed(lambda impl=impl, a=seg_args: impl(*a)),
                    notes=f"separate-segment form: the {S_sep} proposal rows' K/V off the pool (k_seg/v_seg)",
                    **common,
                )


def _flex_row(bench, case, params, common, timed, q, kc, vc, table, seq_lens, lay, scale):
    B, Hq, S, D = q.shape
    nb, bs, Hkv = kc.shape[:3]
    dense = B * S * nb * bs
    if dense > 2e8:  # create_block_mask evaluates mask_mod on every (query, pool slot) pair, with int64 temporaries
        reason = f"its block mask needs {dense:.1e} mask_mod evaluations (over 2e8)"
        bench.skip(case, "flex-blockmask-paged", reason, params=params)
        return
    try:
        block_mask = _flex_paged_mask(table, seq_lens, lay, S, nb, bs, q.device)
    except Exception as e:  # an old torch without create_block_mask's arguments, for instance
        bench.skip(case, "flex-blockmask-paged", f"FlexAttention setup failed: {type(e).__name__}: {e}", params=params)
        return
    fa = flex_fn(bench.cuda)
    q_flat = q.permute(1, 0, 2, 3).reshape(1, Hq, B * S, D).contiguous()  # every row's queries: one sequence
    k_pool = kc.view(1, nb * bs, Hkv, D).transpose(1, 2)  # the whole pool: one key sequence
    v_pool = vc.view(1, nb * bs, Hkv, D).transpose(1, 2)

    def flex():
        return fa(q_flat, k_pool, v_pool, block_mask=block_mask, scale=scale, enable_gqa=Hq != Hkv)

    note = "compiled" if bench.cuda else "eager on CPU (not FlexAttention's times)"
    bench.measure(
        case,
        "flex-blockmask-paged",
        timed(flex, lambda o: o[0].view(Hq, B, S, D).transpose(0, 1)),
        notes=note + "; block mask over the physical pool, built outside timing",
        **common,
    )


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _append_case(bench: Bench, T, H, D, bs, dt):
    dev = bench.device
    case = f"T={T} H={H} D={D} block={bs}"
    nbytes = 4 * T * H * D * (torch.finfo(dt).bits // 8)
    params = {"T": T, "H": H, "block_size": bs, "MiB": nbytes / 2**20}
    nb = math.ceil(T / bs) * 2 + 1
    g = torch.Generator(device="cpu").manual_seed(T)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[torch.rand(T, generator=g) < 0.1] = -1
    slots = slots.to(dev)
    kn, vn = (torch.randn(T, H, D, generator=g).to(dt).to(dev) for _ in range(2))
    poison = torch.randn(nb, bs, H, D, generator=g).to(dt).to(dev)
    ek, ev = poison.clone(), poison.clone()
    keep = slots >= 0
    ek.view(-1, H, D)[slots[keep]] = kn[keep]
    ev.view(-1, H, D)[slots[keep]] = vn[keep]
    common = dict(bytes_moved=nbytes, cold_l2=True, graph=True, params=params, rep_ms=50)

    def setup(fn_of):
        def make():
            kc, vc = poison.clone(), poison.clone()
            fn = fn_of(kc, vc)
            fn()
            same = torch.equal(kc, ek) and torch.equal(vc, ev)
            return fn, "bit-exact (whole pool)" if same else "MISMATCH vs expected pool"

        return make

    used = torch.zeros(nb * bs, dtype=torch.bool)
    used[slots[keep].cpu()] = True
    dump = int((~used).nonzero()[0])  # a slot no token writes: skipped tokens rewrite it with its own value

    def index_put(kc, vc):
        def fn():
            s = torch.where(keep, slots, dump)
            s_blk, s_off = s // bs, s % bs
            keep_k = torch.where(keep[:, None, None], kn, kc[s_blk, s_off])
            keep_v = torch.where(keep[:, None, None], vn, vc[s_blk, s_off])
            kc.index_put_((s_blk, s_off), keep_k)
            vc.index_put_((s_blk, s_off), keep_v)

        return fn

    bench.measure(
        case,
        "torch-index_put",
        setup(index_put),
        notes="-1 tokens rewrite an unused slot with its own value (no sync)",
        **common,
    )
    for backend, why in our_backends("kv_append_paged", dev):
        name = f"ours:{backend}"
        if why is not None:
            bench.skip(case, name, why, params=params)
            continue
        impl = resolve("kv_append_paged", backend, dev)
        bench.measure(case, name, setup(lambda kc, vc: lambda: impl(kc, vc, kn, vn, slots)), **common)
        api = lambda kc, vc, b=backend: lambda: tidar_kernels.kv_append_paged(kc, vc, kn, vn, slots, backend=b)  # noqa: E731
        bench.measure(case, name + "+api", setup(api), notes="public op (slot checks: sort + one sync)", **common)


def run(bench: Bench):
    main = shapes.attention(shapes.SMOKE if bench.smoke else shapes.MAIN)  # 1.5B: 12 query heads, 2 K/V, D = 128
    Hq, Hkv, D = main.q_heads, main.kv_heads, main.head_dim
    if bench.smoke:
        dt = torch.float32
        attn = [(1, 40, 2, 16), (2, 100, 3, 32)]
        append = [(40, Hkv, D, 16), (300, Hkv, D, 32)]
    else:
        dt = torch.bfloat16
        attn = [(8, 4096, 16, 16), (1, 16384, 16, 16), (8, 4096, 16, 32), (32, 4096, 16, 16), (8, 16384, 16, 16)]
        attn += [(1, 4096, 4, 16), (64, 1024, 4, 16)]
        large = shapes.attention(shapes.LARGE)  # 8B: 8 K/V heads
        append = [(272, Hkv, D, 16), (8 * 272, large.kv_heads, D, 16), (64 * 272, large.kv_heads, D, 16)]
        append += [(64, large.kv_heads, D, 16)]
    bench.start_suite("attention_paged", 60 if bench.smoke else 150)
    for B, prefix, K, bs in attn:
        _attention_case(bench, B, prefix, K, bs, Hq, Hkv, D, dt)
        if bench.cuda:
            torch.cuda.empty_cache()
    bench.start_suite("kv_append_paged", 30 if bench.smoke else 40)
    for T, H, Dn, bs in append:
        _append_case(bench, T, H, Dn, bs, dt)


def _best(rows, suite, case, prefix):
    ok = [r for r in rows if r["suite"] == suite and r["case"] == case and r["status"] == "ok"]
    ok = [r for r in ok if r["impl"].startswith(prefix) and "+" not in r["impl"]]  # the kernels, plain form
    return min(ok, key=lambda r: r["ms"]) if ok else None


def goals(bench: Bench):
    cases = sorted({r["case"] for r in bench.rows if r["suite"] == "attention_paged"})
    for case in cases:
        ours = _best(bench.rows, "attention_paged", case, "ours:")
        cont = _best(bench.rows, "attention_paged", case, "contiguous:")
        flex = _best(bench.rows, "attention_paged", case, "flex-blockmask-paged")
        target = "<= 1.10x contiguous, >= 2x Flex"
        if ours is None or cont is None:
            bench.goal(f"paged step attention ({case})", target, "not measured", "no ours/contiguous row")
            continue
        x = ours["ms"] / cont["ms"]
        fx = flex["ms"] / ours["ms"] if flex else None
        met = x <= 1.10 and fx is not None and fx >= 2
        measured = f"{x:.2f}x contiguous ({ours['impl']} {ours['ms']:.3g} ms vs {cont['ms']:.3g} ms), " + (
            f"{fx:.2f}x Flex" if fx else "no Flex row"
        )
        bench.goal(f"paged step attention ({case})", target, measured, "met" if met else "missed")


def plots(bench: Bench, plot):
    return []
