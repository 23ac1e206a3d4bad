"""Patch a Hugging Face causal LM for TiDAR: the "tidar" attention backend and a drop-in ``generate``.

``patch`` first proves TiDAR is in control of the model (``tidar.hf.probe``: a small probe forward whose logits
must equal the model's own) and refuses the model otherwise, leaving it exactly as it was. ``patch`` is
idempotent and ``unpatch`` restores the model exactly (attention implementation, the instance's ``generate``,
nothing else touched). The weights are never changed by either.
"""

from __future__ import annotations

import torch

from tidar.decode.args import check_draft_len, check_levels
from tidar.decode.hf_generate import patched_generate
from tidar.hf.attention import NAME, tidar_attention_forward, tidar_mask
from tidar.hf.probe import (
    PROBE_NAME,
    UnsupportedModel,
    impl_restore,
    impl_snapshot,
    probe_attention,
    run_probe,
    static_checks,
    text_config,
)
from tidar.settings import TidarSettings, is_patched, settings_of

_REGISTERED = False
# Config attributes that bound the positions a model can take, in the order they are looked for.
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_target_positions", "n_ctx", "max_seq_len")


def _register() -> None:
    """Register "tidar" once in transformers' attention and mask interfaces."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, tidar_attention_forward)
    AttentionMaskInterface.register(NAME, tidar_mask)
    AttentionInterface.register(PROBE_NAME, probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, tidar_mask)
    _REGISTERED = True


def _check_model(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"model must be a Hugging Face causal LM (a transformers PreTrainedModel), got {type(model).__name__}"
        )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
        raise TypeError(
            f"model must have input embeddings with a [vocab, hidden] weight, {type(model).__name__} has none"
        )


def _limits(model, window):
    """``(max_len, reason)``: the most positions a row may reach."""
    cfg = text_config(model)
    limits = []
    for name in POSITION_LIMITS:
        max_pos = getattr(cfg, name, None)
        if isinstance(max_pos, int) and not isinstance(max_pos, bool) and max_pos > 0:
            limits.append((max_pos, f"{name} {max_pos}"))
            break
    if window is not None:
        limits.append((window, f"the sliding window {window} of its attention"))
    return min(limits) if limits else (None, "")


def mask_token_id_of(model, mask_token_id=None, *, use_patch: bool = True) -> int:
    """The [MASK] id TiDAR uses for ``model``: ``mask_token_id`` if given, else the patch's (``use_patch``), else
    ``config.mask_token_id``; checked to be a token id of the embedding table."""
    if mask_token_id is None and use_patch and is_patched(model):
        mask_token_id = settings_of(model).mask_token_id
    if mask_token_id is None:
        mask_token_id = getattr(model.config, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError(
            "the model has no mask token: config.mask_token_id is not set. Call "
            "tidar.add_mask_token(model, tokenizer) first (or pass mask_token_id=)"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
        raise ValueError(
            f"mask_token_id must be a token id in [0, {vocab}) (the embedding size), got {mask_token_id!r}"
        )
    return mask_token_id


def patch(
    model,
    draft_len: int | str = "auto",
    mask_token_id: int | None = None,
    *,
    backend: str = "auto",
    proposal_levels=None,
    context_drafts: bool = True,
):
    """Route the model's attention through ``tidar_kernels.tidar_attention`` and make ``model.generate``
    decode with TiDAR. Calling it again updates the settings (idempotent). Returns the model.

    ``draft_len``: K, or ``"auto"`` (default: chosen per step from the measured token-slot curve and the
    running acceptance). ``proposal_levels``: the acceptance counts that get a proposal block (default all).
    ``context_drafts``: also draft from n-gram matches in the text. All three are defaults of ``generate``.

    The first call runs a small probe forward on the model's device (``tidar.hf.probe``) and raises
    :class:`~tidar.hf.probe.UnsupportedModel` (a ValueError) naming the family and the reason when TiDAR
    would not run the model exactly; the model is then exactly as before the call."""
    _check_model(model)
    draft_len = check_draft_len(draft_len)
    proposal_levels = check_levels(proposal_levels, draft_len)
    if not isinstance(context_drafts, bool):
        raise ValueError(f"context_drafts must be True or False, got {context_drafts!r}")
    if not isinstance(backend, str) or backend not in ("auto", "reference", "triton", "cuda"):
        raise ValueError(f"backend must be one of auto, reference, triton, cuda; got {backend!r}")
    mask_token_id = mask_token_id_of(model, mask_token_id, use_patch=False)
    _register()
    old = getattr(model, "_tidar", None)
    if old is not None:  # already proven: update the settings only
        model._tidar = TidarSettings(
            draft_len,
            mask_token_id,
            backend,
            old.previous_attn_implementation,
            old.had_own_generate,
            old.own_generate,
            proposal_levels,
            context_drafts,
            old.max_len,
            old.max_len_reason,
            old.attn_implementations,
            old.window,
            old.config_swaps,
        )
        return model
    static_checks(model)
    swaps = own_config(model)  # the caller's config object (and every model sharing it) is never written to
    before = impl_snapshot(model)
    try:
        report, previous = _probe(model, mask_token_id, backend)
    except BaseException:
        restore_config(swaps)
        raise
    max_len, reason = _limits(model, report.window)
    own = model.__dict__.get("generate")
    model.set_attn_implementation(NAME)
    model.generate = patched_generate.__get__(model)
    model._tidar = TidarSettings(
        draft_len,
        mask_token_id,
        backend,
        previous,
        own is not None,
        own,
        proposal_levels,
        context_drafts,
        max_len,
        reason,
        before,
        report.window,
        swaps,
    )
    return model


def _probe(model, mask_id, backend):
    """Run the probe with the model in eval mode and no gradient; restore the training flags and (on a
    refusal) every attention implementation."""
    snapshot = impl_snapshot(model)
    previous = model.config._attn_implementation
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            report = run_probe(model, mask_id, backend)
    except BaseException:
        impl_restore(snapshot)
        raise
    finally:
        for m, flag in training:
            m.training = flag
    impl_restore(snapshot)
    return report, previous


def own_config(model) -> list:
    """Give ``model`` its own copy of its config (sub-configs included) before the attention implementation is
    set: every module attribute holding the caller's config object (or one of its sub-configs) is re-pointed to
    the copy's counterpart. Returns the ``(module, attribute, original)`` list ``restore_config`` undoes."""
    import copy

    old = model.config
    new = copy.deepcopy(old)
    pairs = {id(old): new}
    for key in getattr(old, "sub_configs", {}) or {}:
        sub = getattr(old, key, None)
        if sub is not None:
            pairs[id(sub)] = getattr(new, key)
    swaps = []
    for m in model.modules():
        for attr, value in list(vars(m).items()):
            if id(value) in pairs and value is not pairs[id(value)]:
                swaps.append((m, attr, value))
                setattr(m, attr, pairs[id(value)])
    return swaps


def restore_config(swaps: list) -> None:
    """Undo ``own_config``: every re-pointed attribute holds the caller's config object again."""
    for m, attr, value in swaps:
        setattr(m, attr, value)


def unpatch(model):
    """Undo ``patch`` exactly. A no-op on an unpatched model. Returns the model."""
    _check_model(model)
    s = getattr(model, "_tidar", None)
    if s is None:
        return model
    model.set_attn_implementation(s.previous_attn_implementation)
    if s.attn_implementations is not None:  # sub-configs exactly as they were
        impl_restore(s.attn_implementations)
    restore_config(s.config_swaps or [])
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


__all__ = ["add_mask_token", "is_patched", "patch", "settings_of", "unpatch", "TidarSettings", "UnsupportedModel"]
