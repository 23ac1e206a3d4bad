"""Hugging Face's ``generate`` inputs that are not plain left-padded token ids: any ``attention_mask`` (HF masks a
0 anywhere in the row), ``inputs_embeds`` prompts and the caller's ``position_ids``.

TiDAR decodes token ids, left-padded. A masked token is seen by no later token and takes no position (HF's
positions count the unmasked tokens), so a row decodes as its unmasked tokens alone: ``compact`` keeps those.
A prompt given as embeddings runs TiDAR's prefill on them: ``PromptEmbeds`` swaps the prompt positions' token
embeddings for the given ones in every prefill forward (the placeholder ids TiDAR carries for the prompt are never
embedded); the tokens after the prompt are ids, as in HF's loop.
"""

from __future__ import annotations

import torch


def compact(ids, mask, pad: int, embeds=None):
    """``(ids, mask, embeds)`` of the prompts TiDAR decodes: each row's unmasked tokens (and embeddings),
    left-padded; the mask None when nothing is padded. Rows already left-padded are kept as they are."""
    if mask is None:
        return ids, None, embeds
    m = mask.bool()
    if bool((m == m.cummax(1).values).all()):
        return ids, mask, embeds  # left padding only
    keep = [m[b].nonzero().flatten() for b in range(ids.shape[0])]
    width = max(1, max(len(k) for k in keep))
    out = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
    cmask = torch.zeros_like(out)
    cembeds = None if embeds is None else embeds.new_zeros(ids.shape[0], width, embeds.shape[-1])
    for b, k in enumerate(keep):
        if len(k):
            out[b, width - len(k) :] = ids[b, k]
            cmask[b, width - len(k) :] = 1
            if embeds is not None:
                cembeds[b, width - len(k) :] = embeds[b, k]
    return out, cmask, cembeds


class PromptEmbeds:
    """While installed, every prefill forward of the model (a TiDAR step whose rows all start at position 0)
    embeds the prompt positions with ``embeds`` (``[B, P, H]``, left-padded as ``mask``) instead of the token
    ids TiDAR passes; other positions (the mask block, padding scratch) keep their token embeddings."""

    def __init__(self, model, embeds: torch.Tensor, mask: torch.Tensor | None):
        B, P, _ = embeds.shape
        lengths = [P] * B if mask is None else [int(x) for x in mask.sum(1).tolist()]
        self.model = model
        self.lengths = torch.tensor(lengths, device=embeds.device)
        self.prompt = embeds.new_zeros(embeds.shape)  # row b's prompt at [0, n_b): TiDAR's positions
        for b, n in enumerate(lengths):
            self.prompt[b, :n] = embeds[b, P - n :]
        self.handle = None

    def __enter__(self):
        self.handle = self.model.base_model.register_forward_pre_hook(self._swap, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _swap(self, module, args, kwargs):
        step, ids, pos = kwargs.get("tidar_step"), kwargs.get("input_ids"), kwargs.get("position_ids")
        if step is None or ids is None or pos is None or bool((step.seg_start != 0).any()):
            return None
        rows = ids.shape[0]
        emb = self.model.get_input_embeddings()(ids)
        n = self.lengths[:rows, None]
        index = pos.clamp(0, self.prompt.shape[1] - 1)[..., None].expand(-1, -1, emb.shape[-1])
        given = self.prompt[:rows].gather(1, index).to(emb.dtype)
        kwargs = dict(kwargs)
        kwargs.pop("input_ids")
        kwargs["inputs_embeds"] = torch.where((pos < n)[..., None], given, emb)
        return args, kwargs


class PromptPositions:
    """While installed, every forward of the model takes the caller's ``position_ids`` in place of TiDAR's own
    (``0 .. n - 1`` for a row's ``n`` unmasked prompt tokens, then ``n + t`` for its new token ``t``): prompt token
    ``i`` at the position given for it, new token ``t`` at the last given position ``+ 1 + t``, as HF's ``generate``
    extends ``position_ids``. Runs after ``PromptEmbeds`` (registered later), which reads TiDAR's positions. A
    compiled decode step (``hf_compile.CompiledSteps``) takes the positions from ``remap`` instead, with the hook
    ``paused``: dynamo does not guard on module hooks, so a graph must not depend on one."""

    def __init__(self, model, position_ids: torch.Tensor, mask: torch.Tensor | None):
        keep = torch.ones_like(position_ids, dtype=torch.bool) if mask is None else mask.bool()
        self.model = model
        self.lengths = keep.sum(1)
        self.table = torch.zeros_like(position_ids)  # row b's given positions of its unmasked tokens, in order
        for b in range(position_ids.shape[0]):
            given = position_ids[b][keep[b]]
            self.table[b, : len(given)] = given
        self.shift = position_ids[:, -1] + 1 - self.lengths  # added to TiDAR's positions past the prompt
        self.handle = None
        self.paused = False

    def __enter__(self):
        self.handle = self.model.base_model.register_forward_pre_hook(self._remap, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def remap(self, pos: torch.Tensor) -> torch.Tensor:
        """The caller's positions for TiDAR's positions ``pos`` ``[rows, S]``."""
        rows = pos.shape[0]
        given = self.table[:rows].gather(1, pos.clamp(0, self.table.shape[1] - 1))
        return torch.where(pos < self.lengths[:rows, None], given, pos + self.shift[:rows, None])

    def _remap(self, module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None or self.paused:
            return None
        return args, dict(kwargs, position_ids=self.remap(pos))


__all__ = ["PromptEmbeds", "PromptPositions", "compact"]
