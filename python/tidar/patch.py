"""Patch a Hugging Face causal LM for TiDAR: the "tidar" attention backend and a drop-in ``generate``.

``patch`` is idempotent and ``unpatch`` restores the model exactly (attention implementation, the
instance's ``generate``, nothing else touched). The weights are never changed by either.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import NAME, tidar_attention_forward, tidar_mask

_REGISTERED = False


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
    stats: dict | None = None  # running acceptance statistics of draft_len="auto" (kept across generate calls)


def _register() -> None:
    """Register "tidar" once in transformers' attention and mask interfaces."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, tidar_attention_forward)
    AttentionMaskInterface.register(NAME, tidar_mask)
    _REGISTERED = True


def settings(model) -> TidarSettings:
    s = getattr(model, "_tidar", None)
    if s is None:
        raise ValueError("this model is not patched for TiDAR: call tidar.patch(model) first")
    return s


def is_patched(model) -> bool:
    return getattr(model, "_tidar", None) is not None


def patch(model, draft_len: int | str = "auto", mask_token_id: int | None = None, *, backend: str = "auto",
          proposal_levels=None, context_drafts: bool = True):
    """Route the model's attention through ``tidar_kernels.tidar_attention`` and make ``model.generate``
    decode with TiDAR. Calling it again updates the settings (idempotent). Returns the model.

    ``draft_len``: K, or ``"auto"`` (default: chosen per step from the measured token-slot curve and the
    running acceptance). ``proposal_levels``: the acceptance counts that get a proposal block (default all).
    ``context_drafts``: also draft from n-gram matches in the text. All three are defaults of ``generate``."""
    from .generate_args import check_draft_len, check_levels

    draft_len = check_draft_len(draft_len)
    proposal_levels = check_levels(proposal_levels, draft_len)
    if not isinstance(context_drafts, bool):
        raise ValueError(f"context_drafts must be True or False, got {context_drafts!r}")
    if backend not in ("auto", "reference", "triton", "cuda"):
        raise ValueError(f"backend must be one of auto, reference, triton, cuda; got {backend!r}")
    config = model.config
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                "the model has no mask token: config.mask_token_id is not set. Call "
                "tidar.add_mask_token(model, tokenizer) first (or pass mask_token_id=)"
            )
    vocab = model.get_input_embeddings().weight.shape[0]
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id must be a token id in [0, {vocab}) (the embedding size), got {mask_token_id!r}")
    _register()
    old = getattr(model, "_tidar", None)
    if old is None:
        own = model.__dict__.get("generate")
        old = TidarSettings(draft_len, mask_token_id, backend, config._attn_implementation, own is not None, own)
        model.set_attn_implementation(NAME)
        from .hf_generate import patched_generate

        model.generate = patched_generate.__get__(model)
    model._tidar = TidarSettings(
        draft_len, mask_token_id, backend, old.previous_attn_implementation, old.had_own_generate, old.own_generate,
        proposal_levels, context_drafts, old.stats,
    )
    return model


def unpatch(model):
    """Undo ``patch`` exactly. A no-op on an unpatched model. Returns the model."""
    s = getattr(model, "_tidar", None)
    if s is None:
        return model
    model.set_attn_implementation(s.previous_attn_implementation)
    if s.had_own_generate:
        model.generate = s.own_generate
    else:
        del model.generate
    del model._tidar
    return model


def add_mask_token(model, tokenizer, token: str = "[MASK]") -> int:
    """Add ``token`` to the tokenizer (if missing) as its mask token, grow the embeddings to cover it and
    record ``config.mask_token_id`` (so ``save_pretrained``/``from_pretrained`` keep it). Returns the id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": token})
    elif getattr(tokenizer, "mask_token", None) != token:
        tokenizer.mask_token = token
    mask_id = tokenizer.convert_tokens_to_ids(token)
    if mask_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.mask_token_id = int(mask_id)
    return int(mask_id)


__all__ = ["add_mask_token", "is_patched", "patch", "settings", "unpatch", "TidarSettings"]
