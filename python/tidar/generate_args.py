"""Validation of ``tidar.generate``'s arguments: every bad value is a clear error naming the argument, raised
before any forward (so nothing is changed by a failed call). Returns the normalised values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import tidar_kernels

MAX_DRAFT_LEN = 16  # the largest K "auto" considers; an explicit draft_len may be larger


@dataclass
class GenerateArgs:
    prompts: list  # per row: the prompt's token ids (left padding removed)
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    beta: float
    eos: set  # token ids that end a row
    pad_token_id: int
    device: torch.device
    vocab: int


def prompt_rows(input_ids, attention_mask):
    """Per-row prompt token lists, checking HF-style left padding."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, P], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, P = input_ids.shape
    if B == 0 or P == 0:
        raise ValueError(f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.tolist()
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, P):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, P)}, got {getattr(attention_mask, 'shape', None)}")
    rows = []
    for b in range(B):
        m = attention_mask[b].tolist()
        n = int(sum(m))
        if n == 0:
            raise ValueError(f"attention_mask row {b} is all padding: every prompt needs at least one token")
        if m != [0] * (P - n) + [1] * n:
            raise ValueError("attention_mask must be 0/1 with left padding (pad tokens first), as for HF generate")
        rows.append(input_ids[b, P - n :].tolist())
    return rows


def check_draft_len(draft_len, max_positions=None):
    """``draft_len``: an int >= 1 or ``"auto"``."""
    if draft_len == "auto" and isinstance(draft_len, str):
        return "auto"
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ValueError(f"draft_len must be an int >= 1 or 'auto', got {draft_len!r}")
    return draft_len


def check_levels(levels, draft_len):
    """``proposal_levels``: None (all of 1..K) or a non-empty, strictly increasing sequence of ints in 1..K."""
    if levels is None:
        return None
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"proposal_levels must be None or a sequence of ints in 1..K, got {levels!r}")
    levels = list(levels)
    if not levels:
        raise ValueError("proposal_levels must not be empty (None means all of 1..K)")
    for j in levels:
        if isinstance(j, bool) or not isinstance(j, int):
            raise ValueError(f"proposal_levels must hold ints, got {j!r} in {levels!r}")
    if levels != sorted(set(levels)):
        raise ValueError(f"proposal_levels must be strictly increasing, got {levels!r}")
    if isinstance(draft_len, int) and (levels[0] < 1 or levels[-1] > draft_len):
        raise ValueError(f"proposal_levels must lie in 1..draft_len={draft_len}, got {levels!r}")
    if not isinstance(draft_len, int) and (levels[0] < 1 or levels[-1] > MAX_DRAFT_LEN):
        raise ValueError(f"proposal_levels must lie in 1..{MAX_DRAFT_LEN}, got {levels!r}")
    return tuple(levels)


def check_generate_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, beta,
                        eos_token_id, pad_token_id, generator, seed, streamer) -> GenerateArgs:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:  # as HF: pad finished rows with the (first) EOS token
        pad_token_id = eos_list[0] if eos_list else 0
    prompts = prompt_rows(input_ids, attention_mask)
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer needs batch size 1")
    vocab = model.get_input_embeddings().weight.shape[0]
    for ids in prompts:
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab})")
    device = model.get_input_embeddings().weight.device
    temperature, top_k, top_p, beta = tidar_kernels.check_sampling_args(temperature, top_k, top_p, beta, vocab)
    if generator is not None and generator.device != device:
        raise ValueError(f"generator must be on the model's device {device}, got {generator.device}")
    if seed is not None and generator is not None:
        raise ValueError("give either generator or seed, not both")
    return GenerateArgs(prompts, max_new_tokens, temperature, top_k, top_p, beta, set(eos_list), pad_token_id,
                        device, vocab)
