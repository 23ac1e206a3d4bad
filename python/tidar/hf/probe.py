"""The check ``tidar.patch`` runs before it accepts a model: a small probe forward proving TiDAR is in control.

On the model's device, with no gradient, in eval mode (the training flags are restored after), on two short
prompts of different lengths:
1. the model's own forward (its attention implementation as it was) gives the reference logits: the plain
   causal forward of each prompt (and of the prompt followed by drafts), and the prefill's mask rows under the
   equivalent dense 4-D mask (when the model's own path takes a 4-D mask);
2. the TiDAR forwards (a per-row prefill of prompt + one block of masks, then one ragged decode step at
   ``seg_start`` = the prompt lengths, through a real ``TidarCache``) must run every attention layer exactly
   once per forward through the "tidar" attention function *with the TiDAR step*, and their logits must equal
   the reference.
Anything else raises :class:`UnsupportedModel` naming the family and the reason. Known causes are named before
the forward (attention sinks, layers without attention); the forward names the rest (attention interface not
used, keyword arguments not passed down to attention, attention options TiDAR ignores, logits that differ).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field

import torch

from tidar.hf.attention import NAME, TidarStep, tidar_attention_forward, tidar_forward
from tidar_kernels import layouts

PROBE_NAME = "tidar_probe"  # the attention function the probe runs: "tidar" plus a log of every call
_LOG: contextvars.ContextVar = contextvars.ContextVar("tidar_probe_log", default=None)
# Keyword arguments HF passes to attention functions that carry no attention semantics TiDAR must honour.
_PLUMBING = {
    "tidar_step",
    "position_ids",
    "cache_position",
    "output_attentions",
    "use_cache",
    "past_key_values",
    "past_key_value",
    "layer_idx",
    "position_embeddings",
    "is_causal",
    "sliding_window",
    "softcap",
}
# Attention layer types (config.layer_types) that are softmax attention over the sequence.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "attention", "global", "local"}
_MISMATCH_HINTS = {  # what a mismatch at each stage of the probe points to
    "prefill prompt-row": "the model's own causal forward is not what TiDAR computes (it derives positions or "
    "masks itself, or applies attention options TiDAR does not take)",
    "prefill mask-row": "the mask block (positions after the prompt, seeing the prompt and each other) differs "
    "from the model's own forward under the same 4-D mask",
    "decode-step draft-row": "a step on cached keys at positions past the prompt differs from the plain forward "
    "(the model ignores position_ids or derives positions from the cache length or the input)",
}
PROMPT_LENGTHS = (7, 5)  # the probe's two prompts (ragged on purpose)
PROBE_K = 3  # block length of the probe's prefill and decode step


# Why a model is refused, as a stable category (the sentence names details that change between transformers
# releases; code and tests may branch on the category).
REFUSAL_CATEGORIES = {
    "attention_not_reached": "the TiDAR step does not reach every attention call (AttentionInterface not used, "
    "or keyword arguments not passed down)",
    "attention_variant": "an attention variant the TiDAR op does not compute (sinks, chunked, latent attention)",
    "stateful_layers": "layers whose state cannot be rolled back to the accepted drafts (recurrent, convolution)",
    "layer_structure": "decoder layers that do not run attention exactly once each with a layer index",
    "forward_failed": "the model's own or the TiDAR probe forward raised an error",
    "logits_differ": "the TiDAR forward's logits differ from the model's own forward",
}


class UnsupportedModel(ValueError):
    """``tidar.patch`` refused the model: it would not run exactly under TiDAR. ``category`` is one of
    :data:`REFUSAL_CATEGORIES` (stable across transformers releases); the message gives the details."""

    def __init__(self, message: str, category: str = "forward_failed"):
        super().__init__(message)
        self.category = category


@dataclass
class ProbeReport:
    """What the probe learned: the sliding window the attention layers apply (None: none), the number of
    attention layers, and the largest logit difference to the model's own forward."""

    window: int | None
    layers: int
    max_abs_diff: float
    compared_mask_rows: bool
    kwargs_seen: set = field(default_factory=set)


@dataclass
class _Call:
    layer_idx: int | None
    module: str
    has_step: bool
    extra: dict  # semantic keyword arguments with a value (name -> value or a short description)


class _Refusal(Exception):
    """Raised inside the probe's attention function: a named reason the model cannot run under TiDAR."""

    category = "attention_variant"


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "tidar" attention function, logging each call (layer, whether the TiDAR step arrived, options)."""
    log = _LOG.get()
    if log is not None and value.shape[-1] != key.shape[-1]:
        raise _Refusal(
            f"its attention values have head dim {value.shape[-1]} and its keys {key.shape[-1]} (as multi-head "
            "latent attention): the TiDAR cache and attention op take keys and values of one head dim"
        )
    if log is not None:
        extra = {}
        for k, v in kwargs.items():
            if k in _PLUMBING or v is None or v is False:
                continue
            extra[k] = v if isinstance(v, (int, float, str)) else type(v).__name__
        if kwargs.get("softcap") is not None:
            extra["softcap"] = kwargs["softcap"]
        if kwargs.get("sliding_window") is not None:
            extra["sliding_window"] = kwargs["sliding_window"]
        log.append(
            _Call(
                getattr(module, "layer_idx", None), type(module).__name__, kwargs.get("tidar_step") is not None, extra
            )
        )
    return tidar_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def family(model) -> str:
    cfg = getattr(model, "config", None)
    return f"{getattr(cfg, 'model_type', '?')} ({type(model).__name__})"


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def refuse(model, reason: str, category: str):
    assert category in REFUSAL_CATEGORIES, category
    raise UnsupportedModel(
        f"tidar.patch: {family(model)} is not supported: {reason}. The model is unchanged.", category
    )


def static_checks(model) -> None:
    """Causes known without a forward."""
    cfg = text_config(model)
    for name, mod in model.named_modules():
        sinks = getattr(mod, "sinks", None)
        if isinstance(sinks, torch.Tensor):
            refuse(
                model,
                f"its attention has attention sinks ({name}.sinks, as GPT-OSS): a learned per-head logit "
                "in every softmax that the TiDAR attention op does not take",
                "attention_variant",
            )
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)):
        other = sorted({str(t) for t in types} - ATTENTION_LAYER_TYPES)
        idx = [i for i, t in enumerate(types) if str(t) not in ATTENTION_LAYER_TYPES]
        chunked = [t for t in other if "chunk" in t]
        if chunked:
            refuse(
                model,
                f"chunked attention (layer_types {chunked} at layers {idx[:8]}): attention restricted to "
                "fixed chunks of the sequence, which the TiDAR layout does not express",
                "attention_variant",
            )
        if other:
            refuse(
                model,
                f"layers without softmax attention (layer_types {other} at layers {idx[:8]}): their "
                "recurrent/convolution state cannot be rolled back to the accepted drafts",
                "stateful_layers",
            )
    can = getattr(model, "_can_set_attn_implementation", None)
    if callable(can) and not can():
        refuse(
            model,
            "its attention does not go through transformers' AttentionInterface (the attention "
            "implementation cannot be set), so the TiDAR layout would never reach attention",
            "attention_not_reached",
        )


def _device(model):
    return model.get_input_embeddings().weight.device


def _prompts(vocab: int, mask_id: int):
    """Deterministic token ids (no RNG is consumed), never the mask token."""
    ids = [[(7 + 13 * i + 29 * b) % vocab for i in range(n)] for b, n in enumerate(PROMPT_LENGTHS)]
    return [[t if t != mask_id else (t + 1) % vocab for t in row] for row in ids]


def _logits(out):
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(f"the forward returned {type(out).__name__} without logits")
    return logits.float()


def _reference(model, prompts, drafts, mask_id, device):
    """The model's own forwards: causal logits of every prompt + drafts (``[len(row) + K, V]`` per row; an error
    here is the caller's refusal), and the prefill's mask rows under the equivalent 4-D mask (``[K, V]`` per row),
    or None when the model's own path does not take that mask (then the mask rows are not compared)."""
    causal = [_causal_logits(model, row + dr, device) for row, dr in zip(prompts, drafts)]
    return causal, _mask_rows(model, prompts, mask_id, device)


def _causal_logits(model, tokens: list, device) -> torch.Tensor:
    logits = _logits(model(input_ids=torch.tensor([tokens], device=device), use_cache=False))
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, len(tokens)):
        raise ValueError(f"its causal forward of {len(tokens)} tokens returned logits of shape {tuple(logits.shape)}")
    return logits[0]


def _mask_rows(model, prompts, mask_id, device) -> list | None:
    """Every row's K mask-row logits under the prefill's dense 4-D mask, or None if any row's forward fails (the
    model refuses a 4-D mask) or returns logits of another shape: all rows are compared, or none."""
    K = PROBE_K
    dtype = model.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    rows = []
    for row in prompts:
        n = len(row)
        layout = layouts.prefill(n, K)
        visible = layouts.dense_mask(layout.local_limit, layout.block_id, 0, n + K)  # [1, S, S]
        add = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
        ids = torch.tensor([row + [mask_id] * K], device=device)
        try:
            out = model(
                input_ids=ids,
                attention_mask=add[:, None].to(device),
                position_ids=layout.position_ids[None].to(device),
                use_cache=False,
            )
            logits = _logits(out)
        except Exception:  # the model's own path takes no 4-D mask: the mask rows are not compared
            return None
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, n + K):
            return None
        rows.append(logits[0, n:])
    return rows


def _check_calls(model, calls: list, layers: int, what: str) -> None:
    if not calls:
        refuse(
            model,
            f"no attention layer called the TiDAR attention function in the {what} (its attention does "
            "not go through transformers' AttentionInterface)",
            "attention_not_reached",
        )
    no_step = sorted({c.layer_idx for c in calls if not c.has_step}, key=str)
    if no_step:
        refuse(
            model,
            f"the TiDAR step did not reach attention in layers {no_step[:8]} ({calls[0].module}): the "
            "decoder layers do not pass the forward's keyword arguments down to attention",
            "attention_not_reached",
        )
    seen = [c.layer_idx for c in calls]
    if None in seen:
        refuse(
            model,
            f"its attention modules ({calls[0].module}) have no layer_idx, which the TiDAR cache needs",
            "layer_structure",
        )
    if sorted(seen) != list(range(layers)):
        missing = sorted(set(range(layers)) - set(seen))
        twice = sorted({i for i in seen if seen.count(i) > 1})
        detail = f"layers {missing[:8]} ran no attention (layers without attention)" if missing else ""
        detail += ("; " if detail and twice else "") + (
            f"layers {twice[:8]} ran attention more than once" if twice else ""
        )
        if not detail:
            detail = f"attention layer indices {sorted(set(seen))[:8]}... do not match the {layers} decoder layers"
        refuse(
            model, f"in the {what}, {detail}: every decoder layer must run attention exactly once", "layer_structure"
        )


def _tolerance(dtype, scale: float) -> float:
    rel = 2e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    return rel * max(1.0, scale)


def run_probe(model, mask_id: int, backend: str) -> ProbeReport:
    """Run the probe (the model's attention implementation must still be its own). Raises UnsupportedModel;
    the caller restores the attention implementation and the training flags."""
    device = _device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    layers = _layer_count(model)
    prompts = _prompts(vocab, mask_id)
    drafts = _drafts(prompts, vocab, mask_id)
    try:
        ref_causal, ref_mask = _reference(model, prompts, drafts, mask_id, device)
    except Exception as e:
        refuse(model, f"its own forward failed on the probe prompts ({type(e).__name__}: {e})", "forward_failed")
    _use_probe_attention(model)
    run = _ProbeRun(model, layers, len(prompts), backend, device)
    run.prefill(prompts, mask_id, ref_causal, ref_mask)
    run.decode_step(prompts, drafts, mask_id, ref_causal)
    return ProbeReport(run.window, layers, max(run.diffs), ref_mask is not None, run.kwargs_seen)


def _layer_count(model) -> int:
    layers = getattr(text_config(model), "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        refuse(
            model,
            "its config has no num_hidden_layers, so the probe cannot check that every layer runs TiDAR",
            "layer_structure",
        )
    return layers


def _drafts(prompts, vocab: int, mask_id: int) -> list:
    """``PROBE_K`` deterministic draft tokens after each prompt, never the mask token."""
    drafts = [[(row[-1] + 3 + 5 * t) % vocab for t in range(PROBE_K)] for row in prompts]
    return [[t if t != mask_id else (t + 1) % vocab for t in row] for row in drafts]


def _use_probe_attention(model) -> None:
    model.set_attn_implementation(PROBE_NAME)
    if getattr(model.config, "_attn_implementation", None) != PROBE_NAME:
        refuse(
            model,
            "its attention implementation cannot be set (it does not use transformers' AttentionInterface)",
            "attention_not_reached",
        )


class _ProbeRun:
    """The TiDAR forwards of the probe through one real ``TidarCache``: each forward's attention calls are checked
    (every layer once, with the step) and its logits compared with the model's own; it collects the attention
    options seen, the sliding window and the logit differences."""

    def __init__(self, model, layers: int, batch: int, backend: str, device):
        from tidar.hf.cache import TidarCache

        self.model, self.layers, self.backend, self.device = model, layers, backend, device
        self.cache = TidarCache(batch, max(PROMPT_LENGTHS) + PROBE_K + PROBE_K * PROBE_K, backend=backend)
        self.diffs: list = []
        self.kwargs_seen: set = set()
        self.window = None

    def prefill(self, prompts, mask_id: int, ref_causal, ref_mask) -> None:
        """Prefill, row by row (different lengths), into the ragged cache."""
        K, device = PROBE_K, self.device
        for b, row in enumerate(prompts):
            n = len(row)
            layout = layouts.prefill(n, K).to(device)
            ids = torch.tensor([row + [mask_id] * K], device=device)
            step = TidarStep(layout, torch.zeros(1, dtype=torch.int32, device=device), self.cache.row(b), self.backend)
            out = self.forward(ids, layout.position_ids[None], step, "prefill")
            self.compare(out[0, :n], ref_causal[b][:n], "prefill prompt-row")
            if ref_mask is not None:
                self.compare(out[0, n:], ref_mask[b], "prefill mask-row")
        self.cache.commit(list(PROMPT_LENGTHS))

    def decode_step(self, prompts, drafts, mask_id: int, ref_causal) -> None:
        """One ragged decode step: rows at different committed lengths."""
        K, device = PROBE_K, self.device
        layout = layouts.decode_step(K).to(device)
        seg_start = self.cache.seq_lengths(device)
        ids = torch.tensor([dr + [mask_id] * (K * K) for dr in drafts], device=device)
        pos = seg_start.long()[:, None] + layout.position_ids[None]
        out = self.forward(ids, pos, TidarStep(layout, seg_start, self.cache, self.backend), "decode-step")
        for b, row in enumerate(prompts):
            n = len(row)
            self.compare(out[b, :K], ref_causal[b][n : n + K], "decode-step draft-row")

    def forward(self, ids, pos, step, what):
        model = self.model
        calls: list = []
        token = _LOG.set(calls)
        try:
            out = _logits(tidar_forward(model, ids, pos, step))
        except _Refusal as e:
            refuse(model, str(e), e.category)
        except Exception as e:
            refuse(model, f"the TiDAR {what} forward failed ({type(e).__name__}: {e})", "forward_failed")
        finally:
            _LOG.reset(token)
        _check_calls(model, calls, self.layers, what)
        for c in calls:
            self.kwargs_seen.update(c.extra)
            w = c.extra.get("sliding_window")
            if isinstance(w, int) and not isinstance(w, bool):
                self.window = w if self.window is None else min(self.window, w)
        return out

    def compare(self, got, want, what):
        model = self.model
        if got.shape != want.shape:
            refuse(
                model,
                f"the TiDAR {what} logits have shape {tuple(got.shape)}, the model's own forward {tuple(want.shape)}",
                "logits_differ",
            )
        scale = want.abs().max().item() if want.numel() else 0.0
        d = (got - want).abs().max().item() if want.numel() else 0.0
        if not math.isfinite(d) or d > _tolerance(model.get_input_embeddings().weight.dtype, scale):
            ignored = sorted(self.kwargs_seen - {"sliding_window", "softcap"})
            hint = f"; the attention receives options TiDAR does not apply: {ignored}" if ignored else ""
            hint += "; " + _MISMATCH_HINTS[what]
            refuse(
                model,
                f"the TiDAR {what} logits differ from the model's own forward by {d:.3g} (logits up to "
                f"{scale:.3g}){hint}",
                "logits_differ",
            )
        self.diffs.append(d)


def impl_snapshot(model) -> list:
    """Every config's attention implementation (the model's, its sub-configs', its submodules')."""
    seen, out = set(), []

    def visit(cfg):
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            return
        seen.add(id(cfg))
        out.append((cfg, cfg._attn_implementation_internal))
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(getattr(cfg, key, None))

    visit(getattr(model, "config", None))
    for m in model.modules():
        visit(getattr(m, "config", None))
    return out


def impl_restore(snapshot: list) -> None:
    for cfg, impl in snapshot:
        cfg._attn_implementation_internal = impl


__all__ = [
    "PROBE_NAME",
    "ProbeReport",
    "UnsupportedModel",
    "probe_attention",
    "run_probe",
    "static_checks",
    "impl_snapshot",
    "impl_restore",
    "family",
    "NAME",
]
