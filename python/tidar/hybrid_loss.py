"""The TiDAR hybrid training objective (design.md 1.2).

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

from tidar_kernels import layouts

from .attention import TidarStep, tidar_forward
from .patch import is_patched, settings


class HybridLoss(NamedTuple):
    loss: torch.Tensor  # (alpha * ar_loss + diffusion_loss) / (1 + alpha), the one to backpropagate
    ar_loss: torch.Tensor  # mean next-token cross-entropy on the clean half
    diffusion_loss: torch.Tensor  # mean aligned cross-entropy on the mask half


def _resolve_mask_id(model, mask_token_id):
    if mask_token_id is None and is_patched(model):
        mask_token_id = settings(model).mask_token_id
    if mask_token_id is None:
        mask_token_id = getattr(model.config, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError(
            "the model has no mask token: config.mask_token_id is not set. Call "
            "tidar.add_mask_token(model, tokenizer) first (or pass mask_token_id=)"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id must be a token id in [0, {vocab}) (the embedding size), got {mask_token_id!r}")
    return mask_token_id


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _check_ids(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, L = input_ids.shape
    if B == 0 or L < 2:
        raise ValueError(f"input_ids must have at least one row and two tokens, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got {getattr(attention_mask, 'shape', None)}")
        m = attention_mask.bool()
        # right padding only: real tokens first (a pad in the prefix would be seen by later queries)
        if bool((m[:, 1:] & ~m[:, :-1]).any()):
            raise ValueError("attention_mask must be right-padded (1s then 0s in every row)")
        return m
    return None


def _mean_ce(logits, labels, valid):
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    if valid is None:
        return ce.mean()
    valid = valid.to(ce.dtype)
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)


def hybrid_forward(model, input_ids: torch.Tensor, block_size: int, mask_token_id: int | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
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
    mask_id = _resolve_mask_id(base, mask_token_id)
    emb = base.get_input_embeddings().weight
    input_ids = input_ids.to(emb.device).long()
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= emb.shape[0]:
        raise ValueError(f"input_ids must be token ids in [0, {emb.shape[0]}) (the model's vocabulary)")
    layout = layouts.training(L, block_size).to(emb.device)
    ids = torch.cat([input_ids, torch.full_like(input_ids, mask_id)], 1)
    pos = layout.position_ids[None].expand(B, -1)
    step = TidarStep(layout, torch.zeros(B, dtype=torch.int32, device=emb.device), None,
                     settings(base).backend if backend is None else backend)
    return tidar_forward(model, ids, pos, step).logits


def hybrid_loss(model, input_ids: torch.Tensor, block_size: int, alpha: float = 1.0, mask_token_id: int | None = None,
                *, attention_mask: torch.Tensor | None = None, backend: str | None = None) -> HybridLoss:
    """TiDAR hybrid loss of a patched HF causal LM (``tidar.patch``) on ``input_ids`` ``[B, L]``.

    Args:
        block_size: K, the diffusion block length; L must be a multiple of it.
        alpha: weight of the AR term: ``(alpha * ar + diffusion) / (1 + alpha)``.
        mask_token_id: default: the patch's, else ``model.config.mask_token_id``.
        attention_mask: optional ``[B, L]`` right-padding mask (1 = real token); padded positions carry no loss.
        backend: ``tidar_attention`` backend (default: the patch's).
    Returns ``HybridLoss(loss, ar_loss, diffusion_loss)``.
    """
    valid = _check_ids(input_ids, attention_mask)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < float("inf"):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    logits = hybrid_forward(model, input_ids, block_size, mask_token_id, backend=backend)
    L = input_ids.shape[1]
    labels = input_ids.to(logits.device).long()
    if valid is not None:
        valid = valid.to(logits.device)
    ar = _mean_ce(logits[:, : L - 1], labels[:, 1:], None if valid is None else valid[:, 1:])
    diff = _mean_ce(logits[:, L:], labels, valid)
    return HybridLoss((alpha * ar + diff) / (1.0 + alpha), ar, diff)


def ar_loss(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain next-token cross-entropy (the AR-only baseline's objective), a mean over valid positions."""
    valid = _check_ids(input_ids, attention_mask)
    device = _unwrap(model).get_input_embeddings().weight.device
    input_ids = input_ids.to(device).long()
    logits = model(input_ids=input_ids, use_cache=False).logits
    return _mean_ce(logits[:, :-1], input_ids[:, 1:], None if valid is None else valid[:, 1:].to(device))


__all__ = ["HybridLoss", "ar_loss", "hybrid_forward", "hybrid_loss"]
