"""The TiDAR hybrid training objective (docs/design.md §3.1).

One forward over the doubled sequence ``[x_0 .. x_{L-1} | [MASK] x L]`` under the training layout
(``tidar_kernels.layouts.training``): the clean half is causal and carries the autoregressive loss
(label of clean token i is x[i+1]); mask token i belongs to block b = i // K, sees the clean tokens
before its block and its own block, and carries the diffusion loss with the aligned label x[i].
Both halves use positions 0..L-1. The attention runs through ``tidar_kernels.tidar_attention``
(differentiable), so the fast backward is used wherever one exists.

    loss = (alpha * L_AR + L_diff) / (1 + alpha)

each term a mean cross-entropy over its valid positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tidar.hf.attention import TidarStep, tidar_forward
from tidar.patching import is_patched, mask_token_id_of, settings_of
from tidar_kernels import layouts


class HybridLoss(NamedTuple):
    loss: torch.Tensor  # (alpha * ar_loss + diffusion_loss) / (1 + alpha), the one to backpropagate
    ar_loss: torch.Tensor  # mean next-token cross-entropy on the clean half
    diffusion_loss: torch.Tensor  # mean aligned cross-entropy on the mask half


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _check_ids(input_ids, attention_mask):
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, L = input_ids.shape
    if B == 0 or L < 2:
        raise ValueError(f"input_ids must have at least one row and two tokens, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {(B, L)}, "
                f"got {getattr(attention_mask, 'shape', None)}"
            )
        m = attention_mask.bool()
        # right padding only: real tokens first (a pad in the prefix would be seen by later queries)
        if bool((m[:, 1:] & ~m[:, :-1]).any()):
            raise ValueError("attention_mask must be right-padded (1s then 0s in every row)")
        return m
    return None


def hybrid_forward(
    model, input_ids: torch.Tensor, block_size: int, mask_token_id: int | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Logits ``[B, 2L, V]`` of one forward over ``[input_ids | [MASK] x L]`` under the training layout:
    rows ``:L`` are the AR (clean) half, rows ``L:`` the diffusion (mask) half. ``model`` must be patched."""
    base = _unwrap(model)  # DDP/FSDP wrappers: settings live on the inner model, the forward goes through the wrapper
    if not is_patched(base):
        raise ValueError("hybrid_loss needs a TiDAR-patched model: call tidar.patch(model, draft_len=K) first")
    _check_ids(input_ids, None)
    B, L = input_ids.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if L % block_size:
        raise ValueError(f"sequence length {L} is not a multiple of the block size {block_size}")
    mask_id = mask_token_id_of(base, mask_token_id)
    emb = base.get_input_embeddings().weight
    input_ids = input_ids.to(emb.device).long()
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= emb.shape[0]:
        raise ValueError(f"input_ids must be token ids in [0, {emb.shape[0]}) (the model's vocabulary)")
    layout = layouts.training(L, block_size).to(emb.device)
    ids = torch.cat([input_ids, torch.full_like(input_ids, mask_id)], 1)
    pos = layout.position_ids[None].expand(B, -1)
    step = TidarStep(
        layout,
        torch.zeros(B, dtype=torch.int32, device=emb.device),
        None,
        settings_of(base).backend if backend is None else backend,
    )
    return tidar_forward(model, ids, pos, step).logits


DIFFUSION_TARGETS = ("data", "ar-hard", "ar-soft")
DIFFUSION_WEIGHTINGS = ("uniform", "acceptance")


def acceptance_weights(ce: torch.Tensor, valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, L]`` weights of the mask slots for ``diffusion_weighting="acceptance"``: slot j of a block gets
    ``prod_{i<j} exp(-ce_i)`` over the block's earlier valid slots (detached), the model's own probability that
    the drafts before it are all right. A draft only counts when every draft before it was accepted, so this puts
    the diffusion term where drafts get accepted: the whole block on a text the drafter already follows (a loop),
    the first slots only on a hard one. The first slot of every block has weight 1; invalid slots count as sure."""
    B, L = ce.shape
    if L % block_size or tuple(valid.shape) != (B, L):
        raise ValueError(
            f"acceptance_weights needs ce and valid of one shape [B, L] with L a multiple of block_size={block_size}, "
            f"got {tuple(ce.shape)} and {tuple(valid.shape)}"
        )
    q = torch.where(valid, torch.exp(-ce.detach()), torch.ones_like(ce)).view(B, L // block_size, block_size)
    w = torch.cat([torch.ones_like(q[..., :1]), torch.cumprod(q, -1)[..., :-1]], -1)
    return w.view(B, L)


def hybrid_loss(
    model,
    input_ids: torch.Tensor,
    block_size: int,
    alpha: float = 1.0,
    mask_token_id: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    backend: str | None = None,
    diffusion_target: str = "data",
    ar_valid: torch.Tensor | None = None,
    diffusion_valid: torch.Tensor | None = None,
    diffusion_weighting: str = "uniform",
) -> HybridLoss:
    """TiDAR hybrid loss of a patched HF causal LM (``tidar.patch``) on ``input_ids`` ``[B, L]``.

    Args:
        block_size: K, the diffusion block length; L must be a multiple of it.
        alpha: weight of the AR term: ``(alpha * ar + diffusion) / (1 + alpha)``.
        mask_token_id: default: the patch's, else ``model.config.mask_token_id``.
        attention_mask: optional ``[B, L]`` right-padding mask (1 = real token); padded positions carry no loss.
        backend: ``tidar_attention`` backend (default: the patch's).
        diffusion_target: what the mask half is trained toward (docs/design.md §3.1): ``"data"`` (the token x[i], the
            paper's objective), ``"ar-hard"`` (the AR head's argmax at the same position, i.e. the clean-half
            logits at i-1 of this same forward, detached; conditioned on the data's tokens before i: the
            teacher-forced approximation of what the verifier accepts) or ``"ar-soft"`` (that AR distribution,
            detached, as a soft target). Position 0 has no AR prediction and carries no diffusion loss with the
            ``ar-*`` targets. (Targets on the model's own greedy continuations: ``tidar.train.self_distill``.)
        ar_valid / diffusion_valid: optional ``[B, L]`` boolean masks of the positions whose AR label
            (``ar_valid[:, i]``: the label x[i] predicted at i-1) / diffusion label counts, combined with
            ``attention_mask``; a term with no valid position is 0.
        diffusion_weighting: ``"uniform"`` (every mask slot counts once, the paper) or ``"acceptance"`` (slot j
            of a block weighted by the model's detached probability of the block's targets before j,
            :func:`acceptance_weights`; the mean is still over the valid slots, so the term is smaller).
    Returns ``HybridLoss(loss, ar_loss, diffusion_loss)``.
    """
    _check_alpha(alpha)
    ar_sum, ar_n, diff_sum, diff_n = hybrid_loss_sums(
        model,
        input_ids,
        block_size,
        mask_token_id,
        attention_mask=attention_mask,
        backend=backend,
        diffusion_target=diffusion_target,
        ar_valid=ar_valid,
        diffusion_valid=diffusion_valid,
        diffusion_weighting=diffusion_weighting,
    )
    ar = ar_sum / ar_n.clamp_min(1.0)
    diff = diff_sum / diff_n.clamp_min(1.0)
    return HybridLoss((alpha * ar + diff) / (1.0 + alpha), ar, diff)


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < float("inf"):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _check_valid(name, v, shape):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be a boolean tensor of the shape of input_ids {tuple(shape)}, got {getattr(v, 'shape', v)!r}"
        )
    return v.bool()


def hybrid_loss_sums(
    model,
    input_ids,
    block_size,
    mask_token_id=None,
    *,
    attention_mask=None,
    backend=None,
    diffusion_target="data",
    ar_valid=None,
    diffusion_valid=None,
    diffusion_weighting="uniform",
    unlikelihood_valid=None,
    teacher_logits=None,
    teacher_valid=None,
):
    """The two terms of :func:`hybrid_loss` as (sum of cross-entropies, count) pairs:
    ``(ar_sum, ar_count, diffusion_sum, diffusion_count)`` (float tensors), so that several forwards
    (real and generated rows) can be pooled into one mean per term.

    ``unlikelihood_valid`` (``[B, L]`` bool, optional) adds a third pair, ``(ul_sum, ul_count)``: the token-level
    unlikelihood ``-log(1 - p_AR(x[i] | x[:i]))`` of the clean half at the marked positions (Welleck et al. 2019,
    "Neural Text Generation with Unlikelihood Training"; :func:`repeat_positions` marks the tokens of repeated
    n-grams of the model's own continuations). Position 0 has no AR prediction and is never counted.

    ``teacher_logits`` (``[B, L, V]``, optional, no gradient) adds a last pair, ``(kl_sum, kl_count)``: the
    divergence ``KL(teacher || model)`` of the clean half's next-token distributions (:func:`teacher_kl_sums`)
    at the positions of ``teacher_valid`` (``[B, L]`` bool, like ``ar_valid``; default: every position)."""
    if diffusion_target not in DIFFUSION_TARGETS:
        raise ValueError(f"diffusion_target must be one of {', '.join(DIFFUSION_TARGETS)}, got {diffusion_target!r}")
    if diffusion_weighting not in DIFFUSION_WEIGHTINGS:
        raise ValueError(
            f"diffusion_weighting must be one of {', '.join(DIFFUSION_WEIGHTINGS)}, got {diffusion_weighting!r}"
        )
    valid = _check_ids(input_ids, attention_mask)
    shape = input_ids.shape
    ar_valid = _check_valid("ar_valid", ar_valid, shape)
    diffusion_valid = _check_valid("diffusion_valid", diffusion_valid, shape)
    unlikelihood_valid = _check_valid("unlikelihood_valid", unlikelihood_valid, shape)
    teacher_valid = _check_valid("teacher_valid", teacher_valid, shape)
    logits = hybrid_forward(model, input_ids, block_size, mask_token_id, backend=backend)
    L = shape[1]
    dev = logits.device
    labels = input_ids.to(dev).long()
    full = torch.ones(shape, dtype=torch.bool, device=dev)
    base = full if valid is None else valid.to(dev)
    av = base if ar_valid is None else base & ar_valid.to(dev)
    dv = base if diffusion_valid is None else base & diffusion_valid.to(dev)
    ar_ce = F.cross_entropy(logits[:, : L - 1].float().flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    ar_m = av[:, 1:].flatten().float()
    mask_logits = logits[:, L:].float()
    if diffusion_target == "data":
        diff_ce = F.cross_entropy(mask_logits.flatten(0, 1), labels.flatten(), reduction="none")
    else:
        teacher = logits[:, : L - 1].detach().float()  # AR head at i-1 predicts position i; no gradient
        student = mask_logits[:, 1:]
        if diffusion_target == "ar-hard":
            ce = F.cross_entropy(student.flatten(0, 1), teacher.argmax(-1).flatten(), reduction="none")
        else:
            ce = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).flatten()
        diff_ce = torch.cat([torch.zeros_like(ce.view(shape[0], L - 1)[:, :1]), ce.view(shape[0], L - 1)], 1).flatten()
        dv = dv.clone()
        dv[:, 0] = False
    diff_m = dv.flatten().float()
    if diffusion_weighting == "acceptance":
        diff_ce = diff_ce * acceptance_weights(diff_ce.view(shape[0], L), dv, block_size).flatten()
    sums = (ar_ce * ar_m).sum(), ar_m.sum(), (diff_ce * diff_m).sum(), diff_m.sum()
    if unlikelihood_valid is not None:
        ul_m = (base & unlikelihood_valid.to(dev))[:, 1:].flatten().float()
        # -log(1 - p) with p = exp(-ce): log1p(-exp(-ce)), floored so a token the model is sure of stays finite
        ul = -torch.log1p(-torch.exp(-ar_ce).clamp(max=1.0 - 1e-6))
        sums = (*sums, (ul * ul_m).sum(), ul_m.sum())
    if teacher_logits is not None:
        tv = base if teacher_valid is None else base & teacher_valid.to(dev)
        sums = (*sums, *teacher_kl_sums(logits[:, :L], teacher_logits, tv))
    return sums


def teacher_kl_sums(logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None):
    """``(kl_sum, kl_count)``: ``KL(teacher || model)`` of the next-token distributions at positions ``0..L-2``
    (position i predicts token i + 1, counted where ``valid[:, i + 1]``, as the AR cross-entropy counts), summed.
    ``logits`` and ``teacher_logits`` are ``[B, L, V]`` causal logits; the teacher gets no gradient. Anchoring a
    model's AR head to a frozen copy of itself, on its own generated text as well as on data, keeps its free-running
    text while the diffusion term moves the shared weights (``tidar train --ar-teacher``)."""
    if teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher_logits must have the model's logits' shape {tuple(logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    L = logits.shape[1]
    t = teacher_logits[:, : L - 1].detach().to(logits.device).float().log_softmax(-1)
    s = logits[:, : L - 1].float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = torch.ones_like(kl) if valid is None else valid[:, 1:].to(kl.device).float()
    return (kl * m).sum(), m.sum()


def repeat_positions(input_ids: torch.Tensor, n: int = 4, start: int = 0) -> torch.Tensor:
    """``[B, L]`` bool: positions ``>= start`` whose token belongs to an n-gram that already occurred earlier in its
    row (the n-gram ending at j is a repeat if the same n tokens end at some j' < j). These are the candidates of
    sequence-level unlikelihood training: a greedy loop marks all its tokens after the first period, ordinary
    text only its repeated phrases."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a tensor [B, L], got {getattr(input_ids, 'shape', input_ids)!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    B, L = input_ids.shape
    out = torch.zeros(B, L, dtype=torch.bool)
    rows = input_ids.detach().cpu().tolist()
    for b, row in enumerate(rows):
        seen = set()
        for j in range(n - 1, L):
            g = tuple(row[j - n + 1 : j + 1])
            if g in seen:
                out[b, max(start, j - n + 1) : j + 1] = True
            else:
                seen.add(g)
    return out.to(input_ids.device)


def ar_loss(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain next-token cross-entropy (the AR-only baseline's objective), a mean over valid positions."""
    s, n = ar_loss_sums(model, input_ids, attention_mask=attention_mask)
    return s / n.clamp_min(1.0)


def ar_loss_sums(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, teacher_logits=None):
    """(sum of next-token cross-entropies, count) of a plain causal forward; with ``teacher_logits`` ``[B, L, V]``
    also ``(kl_sum, kl_count)`` of :func:`teacher_kl_sums` on the same positions."""
    valid = _check_ids(input_ids, attention_mask)
    device = _unwrap(model).get_input_embeddings().weight.device
    input_ids = input_ids.to(device).long()
    logits = model(input_ids=input_ids, use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    m = torch.ones_like(ce) if valid is None else valid[:, 1:].to(device).flatten().float()
    if teacher_logits is None:
        return (ce * m).sum(), m.sum()
    return (ce * m).sum(), m.sum(), *teacher_kl_sums(logits, teacher_logits, valid)


__all__ = [
    "DIFFUSION_TARGETS",
    "DIFFUSION_WEIGHTINGS",
    "acceptance_weights",
    "HybridLoss",
    "ar_loss",
    "ar_loss_sums",
    "hybrid_forward",
    "hybrid_loss",
    "hybrid_loss_sums",
    "repeat_positions",
    "teacher_kl_sums",
]
