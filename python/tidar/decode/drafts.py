"""A decode step's drafts (docs/design.md §3.4, §4.5): composing each row's drafts from the diffusion block or the
context copy, and the proposal blocks every acceptance count would use when only some levels were computed."""

from __future__ import annotations

import torch

from tidar.decode.planner import Plan, copy_worth


def virtual_blocks(block_logits, plan: Plan, V):
    """``[B, K, K, V]`` proposal blocks for every acceptance count a = 1..K from the computed levels: block a
    is block j* = max level <= a shifted by a - j* slots; slots past the computed ones (and blocks with no
    level <= a) hold one-token logits (a deterministic filler draft, q = 1: still an exact proposal)."""
    K, levels = plan.draft_len, plan.levels
    B = block_logits.shape[0]
    if levels == tuple(range(1, K + 1)):
        return block_logits.reshape(B, K, K, V)
    comp = block_logits.reshape(B, len(levels), K, V)
    filler = torch.full((V,), float("-inf"), dtype=block_logits.dtype, device=block_logits.device)
    filler[0] = 0.0
    out = filler.expand(B, K, K, V).clone()
    for a in range(1, K + 1):
        j = plan.block_index[a]
        if j < 0:
            continue
        shift = a - levels[j]
        out[:, a - 1, : K - shift] = comp[:, j, shift:]
    return out


def _one_hot_rows(tokens, V, device):
    q = torch.zeros(len(tokens), V, dtype=torch.float32, device=device)
    if tokens:
        q[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)] = 1.0
    return q


def compose_drafts(dec, plan: Plan, out, diff, ctx, device, V):
    """The step's drafts ``[B, K]``: d_0 (the last emitted token) then, per row, the diffusion drafts or the
    context copy, whichever is expected to be accepted more, padded with filler drafts (never counted)."""
    K, B = plan.draft_len, dec.B
    row_stats, match_lens = dec.evidence.rows, dec.evidence.match_lens
    tokens, meta, q_rows = [], [], []
    worth = copy_worth(not dec.greedy, B)  # as the planner weighs a copy
    for b in range(B):
        d0 = out[b][-1] if out[b] else 0
        if dec.done[b]:
            tokens.append([d0] * K)
            meta.append(("none", 0))
            q_rows.append(None)
            continue
        dtok, dq = diff[b]
        nd, nc = min(len(dtok), K - 1), min(len(ctx[b]), K - 1)
        st = row_stats[b]  # the row's own evidence (and its match) picks its source
        use_ctx = nc > 0 and worth(st, match_lens[b], nc) > st["diffusion"].expected(nd)
        if use_ctx:
            body, src, n = ctx[b][:nc], "context", nc
        elif nd > 0:
            body, src, n = dtok[:nd], "diffusion", nd
        else:
            body, src, n = [], "none", 0
        row = [d0] + body + [body[-1] if body else d0] * (K - 1 - len(body))
        tokens.append(row)
        meta.append((src, n))
        q_rows.append((src, n, dq))
    drafts = torch.tensor(tokens, dtype=torch.long, device=device)
    probs = None
    if dec.g.temperature > 0 and K > 1:
        probs = torch.zeros(B, K - 1, V, dtype=torch.float32, device=device)
        for b in range(B):
            row = tokens[b]
            info = q_rows[b]
            start = 0
            if info is not None and info[0] == "diffusion" and info[2] is not None:
                n = min(info[1], info[2].shape[0])
                probs[b, :n] = info[2][:n]
                start = n
            if start < K - 1:
                probs[b, start:] = _one_hot_rows(row[1 + start :], V, device)
    return drafts, probs, meta, tokens
