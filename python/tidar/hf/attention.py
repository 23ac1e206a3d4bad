"""The "tidar" attention function registered in transformers' AttentionInterface.

A TiDAR forward passes ``tidar_step=TidarStep(...)`` through the model's kwargs (transformers forwards
them to the attention function). The attention function then appends the layer's K/V to the TiDAR cache
(if any) and runs ``tidar_kernels.tidar_attention`` under the step's layout. Without a step (a plain
forward of a patched model) it runs the causal layout; a padded batch (a dense mask from HF) cannot be
expressed as a TiDAR layout and runs PyTorch SDPA with that mask.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import tidar_kernels
from tidar_kernels import backends, layouts

NAME = "tidar"
# Set while a TiDAR forward runs: the mask interface then builds no dense mask (the layout is the mask).
_IN_TIDAR_FORWARD = contextvars.ContextVar("tidar_forward", default=False)


@dataclass
class TidarStep:
    """What one TiDAR forward needs inside every attention layer."""

    layout: tidar_kernels.Layout  # on the model's device
    seg_start: torch.Tensor  # int32 [B]: where the segment's K/V go in each row (committed length)
    cache: object | None = None  # a TidarCache, or None for cache-free forwards (training)
    backend: str = "auto"
    validated: dict = field(default_factory=dict, repr=False)  # op -> (signature, impl, args) checked this forward


def tidar_forward(model, input_ids, position_ids, step: TidarStep, **kwargs):
    """One forward of a patched HF model under ``step``'s layout (cache append included). Returns the
    model output. ``position_ids`` ``[B, S]`` are absolute positions."""
    token = _IN_TIDAR_FORWARD.set(True)
    try:
        kwargs.setdefault("attention_mask", _no_mask(input_ids.device))
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, tidar_step=step, **kwargs)
    finally:
        _IN_TIDAR_FORWARD.reset(token)


_NO_MASK: dict = {}


def _no_mask(device) -> torch.Tensor:
    """A 4-D placeholder mask: transformers returns a 4-D mask as it is, so a TiDAR forward skips the mask
    preparation (packed-sequence detection from the position ids, which reads the device) that it never uses:
    the layout is the mask, and the tidar attention function ignores ``attention_mask`` when it has a step."""
    t = _NO_MASK.get(device)
    if t is None:
        t = _NO_MASK[device] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    return t


def tidar_hidden(model, input_ids, position_ids, step: TidarStep):
    """The decoder body of a patched HF causal LM under ``step``'s layout (cache append included): the final
    hidden states ``[B, S, H]`` (after the final norm), without the LM head (see ``lm_head.OutputHead``)."""
    token = _IN_TIDAR_FORWARD.set(True)
    try:
        out = model.base_model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            tidar_step=step,
            attention_mask=_no_mask(input_ids.device),
        )
    finally:
        _IN_TIDAR_FORWARD.reset(token)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def tidar_mask(*args, **kwargs):
    """The "tidar" entry of transformers' AttentionMaskInterface: no mask inside a TiDAR forward;
    otherwise SDPA's rules (None for unpadded causal -> the causal TiDAR layout; a boolean mask if padded)."""
    if _IN_TIDAR_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def tidar_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention interface: q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` -> (``[B, S, Hq, D]``, None)."""
    if dropout and module.training:
        raise ValueError(f"tidar attention does not implement attention dropout (got dropout={dropout}); set it to 0")
    step: TidarStep | None = kwargs.get("tidar_step")
    if step is None and _attentions_requested():
        if attention_mask is None:
            _check_window(kwargs.get("sliding_window"), key.shape[2])
        return _plain_with_weights(module, query, key, value, attention_mask, scaling, kwargs.get("softcap"))
    if step is None:
        return _plain_forward(
            module, query, key, value, attention_mask, scaling, kwargs.get("sliding_window"), kwargs.get("softcap")
        )
    seg_start = step.seg_start
    if step.cache is not None:
        key, value = step.cache.append(module.layer_idx, key, value, seg_start)
    _check_window(kwargs.get("sliding_window"), key.shape[2])
    out = _step_attention(step, query, key, value, scaling, kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


def _step_attention(step: TidarStep, query, key, value, scaling, softcap):
    """``tidar_attention`` under the step's layout, validated once per forward: every layer of a forward
    passes inputs of the same shapes, dtypes and devices with the same layout and ``seg_start`` tensors, so
    the checks of the first layer hold for the others, which call the resolved implementation directly."""
    sig = (
        query.shape,
        key.shape,
        value.shape,
        query.dtype,
        key.dtype,
        value.dtype,
        query.device,
        key.device,
        value.device,
        scaling,
        softcap,
    )
    memo = step.validated.get("tidar_attention")
    if memo is not None and memo[0] == sig:
        return memo[1](query, key, value, *memo[2])
    lay = step.layout
    out = tidar_kernels.tidar_attention(
        query, key, value, lay.local_limit, lay.block_id, step.seg_start, scaling, softcap, backend=step.backend
    )
    if query.shape[0] > 0 and all(t.dtype == torch.int32 for t in (lay.local_limit, lay.block_id, step.seg_start)):
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        impl = backends.resolve("tidar_attention", step.backend, query.device)
        step.validated["tidar_attention"] = (
            sig,
            impl,
            (lay.local_limit, lay.block_id, step.seg_start, scale, None if softcap is None else float(softcap)),
        )
    return out


def _attentions_requested() -> bool:
    """Whether the running forward collects attention weights (``output_attentions=True``: transformers records
    the attention function's second output through its output collector)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers pass output_attentions differently
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _plain_with_weights(module, query, key, value, attention_mask, scaling, softcap=None):
    """A plain forward that returns its attention weights (``output_attentions=True``), computed as HF's eager
    attention: softmax in float32 of the scaled (soft-capped) scores under the causal or the given mask."""
    S, Skv = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1)
    v = value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        rows = torch.arange(S, device=query.device)[:, None] + (Skv - S)
        attention_mask = rows >= torch.arange(Skv, device=query.device)[None]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)  # (as eager: no NaN)
    else:
        scores = scores + attention_mask[..., :Skv]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def _plain_forward(module, query, key, value, attention_mask, scaling, sliding_window, softcap=None):
    S, Skv = query.shape[2], key.shape[2]
    if attention_mask is not None and softcap is not None:  # padded + soft-capped (Gemma2): explicit softmax
        from tidar_kernels.reference.tidar_attention import softcapped_attention

        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        visible = attention_mask.bool()
        visible = visible | ~visible.any(-1, keepdim=True)  # padding rows that see nothing: no NaN (as HF eager)
        return softcapped_attention(query, key, value, visible, scale, softcap).transpose(1, 2).contiguous(), None
    if attention_mask is not None:  # padding (or a mask HF built): not a TiDAR layout, use SDPA with it
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
        return out.transpose(1, 2).contiguous(), None
    _check_window(sliding_window, Skv)
    layout = layouts.causal(S).to(query.device)
    out = tidar_kernels.tidar_attention(
        query, key, value, layout.local_limit, layout.block_id, Skv - S, scaling, softcap
    )
    return out.transpose(1, 2).contiguous(), None


def _check_window(sliding_window, kv_len):
    if sliding_window is not None and kv_len > sliding_window:
        raise ValueError(
            f"sliding-window attention (window {sliding_window}) over {kv_len} keys is not supported by tidar "
            "attention; use a model/config without a sliding window shorter than the sequence"
        )
