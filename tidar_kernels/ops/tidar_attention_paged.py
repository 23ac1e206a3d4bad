"""``tidar_attention_paged``: ``tidar_attention`` over a paged KV pool read through block tables (design.md §7.1)."""

from __future__ import annotations

import torch

from .. import _checks
from ..backends import resolve

OP = "tidar_attention_paged"


def tidar_attention_paged(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    local_limit,
    block_id,
    *,
    scale=None,
    softcap=None,
    k_seg=None,
    v_seg=None,
    backend: str = "auto",
):
    """Attention of each row's segment of S queries over its keys in a paged pool (vLLM's NHD block layout).

    Row b's keys are ``seq_lens[b]`` slots: key j lives at ``k_cache[block_table[b, j // block_size], j %
    block_size]``; its segment is its last S keys (``seg_start = seq_lens - S``). The result equals
    ``tidar_attention(q, k, v, local_limit, block_id, seq_lens - S)`` on the keys gathered that way.

    Args:
        q: ``[B, Hq, S, D]`` float16/bfloat16/float32/float64.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype and device, ``Hq % Hkv == 0`` (GQA).
        block_table: int32 (or int64 with values in range) ``[B, max_blocks]``: the pool block of each row's
            block of keys, in any order; entries past a row's ``ceil(seq_lens[b] / block_size)`` are not read.
        seq_lens: int32 (or int64) ``[B]``: keys of each row, ``S <= seq_lens[b] <= max_blocks * block_size``.
        local_limit, block_id: int32 (or int64 with values in int32 range) ``[S]``, the TiDAR layout.
        scale: softmax scale, a finite float > 0; default ``D ** -0.5``.
        softcap: attention logit soft-capping as in ``tidar_attention`` (None or a finite float > 0).
        k_seg, v_seg: None, or ``[B, Hkv, S_sep, D]`` (``1 <= S_sep <= S``): the keys/values of the segment's last
            S_sep tokens, not in the pool (the ``[MASK]`` proposal rows of a step, docs/design.md §7.1). Then
            ``seq_lens`` counts pool keys only, row b's keys are its pool keys followed by its ``k_seg`` keys, and its
            segment is its last ``S - S_sep`` pool keys followed by them (``S - S_sep <= seq_lens[b]``).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns ``[B, Hq, S, D]``; a query that sees no key returns zeros. An inference op: no backward (an input that
    requires grad with grad enabled is an error). Every bad argument raises (TypeError or ValueError naming it)
    before any work.
    """
    args = _validate(q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap, k_seg, v_seg)
    impl = resolve(OP, backend, q.device)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if args[-1] is None:  # the plain form: the implementations' short signature
        return impl(*args[:-2])
    return impl(*args)


def _validate(q, k_cache, v_cache, block_table, seq_lens, local_limit, block_id, scale, softcap, k_seg, v_seg):
    dev = _checks.tensor("q", q, ndim=4, dtypes=_checks.FLOAT_TYPES).device
    _checks.tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    _checks.tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=dev)
    B, Hq, S, D = q.shape
    NB, BS, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache must have shape [num_blocks, block_size, Hkv, D={D}], got {tuple(k_cache.shape)}")
    _checks.shape("v_cache", v_cache, k_cache.shape)
    if S == 0 or Hq == 0 or D == 0:
        raise ValueError(f"q must have S >= 1 queries, Hq >= 1 heads and a head dim D >= 1, got {tuple(q.shape)}")
    if NB == 0 or BS == 0:
        raise ValueError(f"k_cache must have num_blocks >= 1 and block_size >= 1, got {tuple(k_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"GQA needs q heads ({Hq}) to be a multiple of k_cache/v_cache heads ({Hkv}, >= 1)")
    _checks.tensor("block_table", block_table, ndim=2, dtypes=_checks.INT_TYPES, device=dev)
    if block_table.shape[0] != B or (B and block_table.shape[1] == 0):
        raise ValueError(f"block_table must have shape [B={B}, max_blocks >= 1], got {tuple(block_table.shape)}")
    _checks.tensor("seq_lens", seq_lens, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
    _checks.shape("seq_lens", seq_lens, (B,))
    for name, t in (("local_limit", local_limit), ("block_id", block_id)):
        _checks.tensor(name, t, ndim=1, dtypes=_checks.INT_TYPES, device=dev)
        _checks.shape(name, t, (S,))
    scale = _checks.positive_float("scale", scale, default=D**-0.5)
    softcap = _checks.positive_float("softcap", softcap, default=None)
    if (k_seg is None) != (v_seg is None):
        raise ValueError("k_seg and v_seg go together: pass both (the segment's last tokens off the pool) or neither")
    S_sep = 0
    if k_seg is not None:
        _checks.tensor("k_seg", k_seg, ndim=4, dtypes=(q.dtype,), device=dev)
        _checks.tensor("v_seg", v_seg, ndim=4, dtypes=(q.dtype,), device=dev)
        S_sep = k_seg.shape[2]
        if k_seg.shape[:2] != (B, Hkv) or k_seg.shape[3] != D or not 1 <= S_sep <= S:
            raise ValueError(
                f"k_seg must have shape [B={B}, Hkv={Hkv}, S_sep in [1, S={S}], D={D}], got {tuple(k_seg.shape)}"
            )
        _checks.shape("v_seg", v_seg, k_seg.shape)
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_seg", k_seg), ("v_seg", v_seg)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but tidar_attention_paged is an inference op (no backward): call it "
                    "under torch.no_grad() / torch.inference_mode(), or use tidar_attention for training"
                )
    # Value checks on the host (one sync, skipped while capturing a CUDA graph): no kernel reads out of the pool.
    rng = _checks.int_range(local_limit)
    if rng is not None and (rng[0] < 0 or rng[1] > S):
        raise ValueError(f"local_limit must lie in [0, S={S}], got values in [{rng[0]}, {rng[1]}]")
    rng = _checks.int_range(block_id)
    if rng is not None and (rng[0] < -1 or rng[1] > _checks.INT32_MAX):
        raise ValueError(f"block_id must lie in [-1, 2^31 - 1] (-1 = no block), got values in [{rng[0]}, {rng[1]}]")
    if B:
        check_block_table(block_table, seq_lens, S - S_sep, NB, BS)
    return (
        q,
        k_cache,
        v_cache,
        block_table.to(torch.int32),
        seq_lens.to(torch.int32),
        local_limit.to(torch.int32),
        block_id.to(torch.int32),
        scale,
        softcap,
        k_seg,
        v_seg,
    )


def check_block_table(block_table, seq_lens, S: int, num_blocks: int, block_size: int) -> None:
    """``S <= seq_lens <= max_blocks * block_size`` (S: the segment's tokens in the pool) and every table entry a
    row reads is a block of the pool; one host sync, remembered on ``block_table`` for the versions of both tensors
    (every layer of a forward passes the same two), none while capturing a CUDA graph."""
    if _checks.capturing():
        return
    key = (id(seq_lens), _checks.version(seq_lens), _checks.version(block_table), S, num_blocks, block_size)
    memo = getattr(block_table, "_tidar_paged_ok", None)
    if memo is not None and memo[0] == key and memo[1] is seq_lens:
        return
    lo, hi = _checks.int_range(seq_lens)
    max_blocks = block_table.shape[1]
    if lo < S:
        raise ValueError(f"seq_lens must be >= S={S} (each row's segment is its last S keys), got a row with {lo} keys")
    if hi > max_blocks * block_size:
        raise ValueError(
            f"block_table is too short for seq_lens: a row of {hi} keys needs {-(-hi // block_size)} blocks of "
            f"{block_size}, block_table has {max_blocks} per row"
        )
    used = torch.arange(max_blocks, device=block_table.device)[None] * block_size < seq_lens[:, None].long()
    ids = torch.where(used, block_table.long(), 0)
    b_lo, b_hi = torch.stack(torch.aminmax(ids)).tolist()
    if b_lo < 0 or b_hi >= num_blocks:
        bad = used & ((block_table.long() < 0) | (block_table.long() >= num_blocks))
        row, col = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{row}, {col}] = {int(block_table[row, col])} is not a block of the pool "
            f"[0, num_blocks={num_blocks}) (row {row} reads it: seq_lens[{row}] = {int(seq_lens[row])})"
        )
    block_table._tidar_paged_ok = (key, seq_lens)
