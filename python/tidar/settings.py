"""The settings ``tidar.patch`` stores on a model (``model._tidar``) and their accessors: a leaf every layer reads
(the decoding loop, the slot timing, the training objective) without importing the patching that writes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TidarSettings:
    draft_len: int | str  # K, or "auto"
    mask_token_id: int
    backend: str
    previous_attn_implementation: str | None
    had_own_generate: bool
    own_generate: object
    proposal_levels: tuple | None = None  # None = all of 1..K
    context_drafts: bool = True
    max_len: int | None = None  # the most positions a row may reach: max_position_embeddings and the sliding window
    max_len_reason: str = ""  # which limit max_len is ("max_position_embeddings 1024", "sliding window 64")
    attn_implementations: list | None = None  # (config, implementation) of every config before the patch
    window: int | None = None  # the smallest sliding window the attention layers apply (None: none)
    config_swaps: list | None = None  # (module, attribute, caller's config) re-pointed to the model's own copy


def settings_of(model) -> TidarSettings:
    s = getattr(model, "_tidar", None)
    if s is None:
        raise ValueError("this model is not patched for TiDAR: call tidar.patch(model) first")
    return s


def is_patched(model) -> bool:
    return getattr(model, "_tidar", None) is not None
