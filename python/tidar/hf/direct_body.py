"""The decoder body of a patched model run as plain tensor ops, without ``nn.Module`` dispatch (docs/design.md §4.5).

A decode step of a small model is mostly host work: on a 2-core CPU the bundled model's one-row forward spends more
time in ``nn.Module.__call__``, transformers' decorators and config lookups than in its GEMMs. For the families
whose decoder layer it knows (Llama, Mistral, Qwen2, Qwen3: pre-norm RMSNorm, q/k/v/o projections with optional
bias, RoPE, a gated MLP), ``DirectBody`` runs the same tensor ops in the same order on the same parameters, calling
the "tidar" attention function itself; the rotary module is still called (its rope type and scaling are its own).

It is used only where it is proven equal: built for a model, it runs a forward beside the model's own module path
(``tidar_hidden``) on random tokens and must give bit-identical hidden states, else the module path is kept and the
reason logged once. A model whose modules change afterwards (a hook, an adapter, a replaced parameter, training
mode, hub kernels) is rebuilt and proven again at its next request (``decoder_body`` compares a fingerprint of the
modules). Hub kernels (transformers' ``use_kernels``, on by default) are covered the same way: a kernel that
replaces a module's forward is an instance override, one that changes the numbers fails the proof.
``TIDAR_DIRECT_BODY=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tidar.hf.attention import TidarStep, tidar_attention_forward, tidar_hidden
from tidar_kernels import layouts

log = logging.getLogger("tidar")

ENV = "TIDAR_DIRECT_BODY"


@dataclass(frozen=True)
class Family:
    """The class names of one family's modules and where its layers' attention window comes from."""

    name: str
    layer: str
    attn: str
    mlp: str
    norm: str
    qk_norm: bool  # Qwen3: RMSNorm on every head's q and k before RoPE
    window: str  # "none" (Llama), "config" (Mistral: config.sliding_window), "attr" (attn.sliding_window)


FAMILIES = {
    "LlamaModel": Family("llama", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", False, "none"),
    "MistralModel": Family(
        "mistral", "MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm", False, "config"
    ),
    "Qwen2Model": Family("qwen2", "Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm", False, "attr"),
    "Qwen3Model": Family("qwen3", "Qwen3DecoderLayer", "Qwen3Attention", "Qwen3MLP", "Qwen3RMSNorm", True, "attr"),
}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward (and its copies in the other families), op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    """One decoder layer's parameters (the Parameter objects, so in-place updates are seen) and constants."""

    def __init__(self, layer, family: Family):
        a, m = layer.self_attn, layer.mlp
        self.attn = a
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.q = (a.q_proj.weight, a.q_proj.bias)
        self.k = (a.k_proj.weight, a.k_proj.bias)
        self.v = (a.v_proj.weight, a.v_proj.bias)
        self.o = (a.o_proj.weight, a.o_proj.bias)
        self.qn = (a.q_norm.weight, a.q_norm.variance_epsilon) if family.qk_norm else None
        self.kn = (a.k_norm.weight, a.k_norm.variance_epsilon) if family.qk_norm else None
        self.gate = (m.gate_proj.weight, m.gate_proj.bias)
        self.up = (m.up_proj.weight, m.up_proj.bias)
        self.down = (m.down_proj.weight, m.down_proj.bias)
        self.act = m.act_fn.forward  # an activation module's forward (no hooks: see _fingerprint)
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.window = (
            None
            if family.window == "none"
            else getattr(a.config, "sliding_window", None)
            if family.window == "config"
            else a.sliding_window
        )


class DirectBody:
    """``body(input_ids, position_ids, step) -> hidden [B, S, H]``: ``tidar_hidden`` without module dispatch."""

    def __init__(self, model, family: Family):
        base = model.base_model
        self.family = family
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.layers = [_Layer(layer, family) for layer in base.layers[: base.config.num_hidden_layers]]

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: TidarStep) -> torch.Tensor:
        e = self.embed
        x = F.embedding(input_ids, e.weight, e.padding_idx)
        cos, sin = self.rotary(x, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        B, S = input_ids.shape
        for L in self.layers:
            residual = x
            h = _rms(x, L.ln1, L.eps1)
            shape = (B, S, -1, L.head_dim)
            q = F.linear(h, *L.q).view(shape)
            k = F.linear(h, *L.k).view(shape)
            if L.qn is not None:
                q, k = _rms(q, *L.qn), _rms(k, *L.kn)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = F.linear(h, *L.v).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            o, _ = tidar_attention_forward(
                L.attn, q, k, v, None, scaling=L.scaling, sliding_window=L.window, tidar_step=step
            )
            o = F.linear(o.reshape(B, S, -1).contiguous(), *L.o)
            x = residual + o
            residual = x
            h = _rms(x, L.ln2, L.eps2)
            h = F.linear(L.act(F.linear(h, *L.gate)) * F.linear(h, *L.up), *L.down)
            x = residual + h
        return _rms(x, self.norm, self.norm_eps)


def _family_refusal(model) -> tuple[Family | None, str]:
    """The model's family, or why the direct body does not apply (checked on classes, not on behaviour: the
    proof forward checks behaviour)."""
    base = getattr(model, "base_model", None)
    family = FAMILIES.get(type(base).__name__)
    if family is None:
        return None, f"{type(base).__name__} is not one of {', '.join(sorted(FAMILIES))}"
    if not isinstance(base.embed_tokens, nn.Embedding) or type(base.embed_tokens) is not nn.Embedding:
        return None, f"embed_tokens is a {type(base.embed_tokens).__name__}, not an nn.Embedding"
    if base.embed_tokens.max_norm is not None:
        return None, "embed_tokens has max_norm"
    for name, m in base.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None, f"{name or 'the body'} has forward hooks (they run on the module path only)"
        if "forward" in m.__dict__:
            return None, f"{name or 'the body'} has its own forward (hub kernels, offloading, adapters)"
    if type(base.norm).__name__ != family.norm:
        return None, f"the final norm is a {type(base.norm).__name__}, not a {family.norm}"
    for i, layer in enumerate(base.layers[: base.config.num_hidden_layers]):
        names = {
            "layer": (layer, family.layer),
            "self_attn": (layer.self_attn, family.attn),
            "mlp": (layer.mlp, family.mlp),
            "input_layernorm": (layer.input_layernorm, family.norm),
            "post_attention_layernorm": (layer.post_attention_layernorm, family.norm),
        }
        if family.qk_norm:
            names["q_norm"] = (layer.self_attn.q_norm, family.norm)
            names["k_norm"] = (layer.self_attn.k_norm, family.norm)
        for what, (mod, cls) in names.items():
            if type(mod).__name__ != cls:
                return None, f"layer {i}'s {what} is a {type(mod).__name__}, not a {cls}"
        for what in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if type(getattr(layer.self_attn, what)) is not nn.Linear:
                return None, f"layer {i}'s {what} is a {type(getattr(layer.self_attn, what)).__name__}, not nn.Linear"
        for what in ("gate_proj", "up_proj", "down_proj"):
            if type(getattr(layer.mlp, what)) is not nn.Linear:
                return None, f"layer {i}'s {what} is a {type(getattr(layer.mlp, what)).__name__}, not nn.Linear"
    return family, ""


def _fingerprint(model) -> tuple | None:
    """What the direct body's correctness rests on beyond the classes: every module of the body with its hooks,
    instance-level ``forward`` overrides, training flag and parameter objects. ``None`` when global module hooks
    are registered (they would run on the module path only)."""
    from torch.nn.modules import module as module_mod

    if any(getattr(module_mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return None
    parts = []
    for m in model.base_model.modules():
        parts.append(
            (
                id(m),
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                "forward" in m.__dict__,
                tuple(id(p) for p in m._parameters.values()),
            )
        )
    p = next(model.parameters())
    return (id(model.base_model), p.dtype, p.device, tuple(parts))


def _prove(model, body: DirectBody) -> str:
    """Run the body beside the module path on random tokens; '' when the hidden states are bit-identical."""
    p = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    n = 6
    ids = torch.randint(0, vocab, (2, n), generator=gen).to(p.device)
    lay = layouts.causal(n).to(p.device)
    seg = torch.zeros(2, dtype=torch.int32, device=p.device)
    pos = lay.position_ids[None].expand(2, -1)
    backend = getattr(getattr(model, "_tidar", None), "backend", "auto")
    with torch.no_grad():
        want = tidar_hidden(model, ids, pos, TidarStep(lay, seg, None, backend))
        got = body(ids, pos, TidarStep(lay, seg, None, backend))
    if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
        return "its hidden states differ from the module path's on a probe forward"
    return ""


@dataclass
class _Entry:
    fingerprint: tuple | None
    body: DirectBody | None
    reason: str


_BODIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Entry (nothing stored on the model)


def _resolve(model) -> _Entry:
    if os.environ.get(ENV, "1") == "0":
        return _Entry(None, None, f"{ENV}=0")
    fp = _fingerprint(model)
    entry = _BODIES.get(model)
    if entry is not None and entry.fingerprint == fp and fp is not None:
        return entry
    if fp is None:
        entry = _Entry(None, None, "global module hooks are registered")
    elif any(m.training for m in model.base_model.modules()):
        entry = _Entry(fp, None, "the model is in training mode")
    else:
        family, reason = _family_refusal(model)
        body = None
        if family is not None:
            try:
                body = DirectBody(model, family)
                reason = _prove(model, body)
            except Exception as exc:  # an attribute this family's release does not have, a failed forward
                reason = f"{type(exc).__name__}: {exc}"
            if reason:
                body = None
        entry = _Entry(fp, body, reason)
        if reason:
            log.info("tidar: direct decoder body off for %s: %s (module path used)", type(model).__name__, reason)
    _BODIES[model] = entry
    return entry


def decoder_body(model):
    """``f(input_ids, position_ids, step) -> hidden``: the direct body where it is proven for this model as its
    modules are now, else the module path (``tidar_hidden``). Call once per request."""
    entry = _resolve(model)
    return entry.body if entry.body is not None else partial(tidar_hidden, model)


def status(model) -> str:
    """``"direct (qwen2)"`` or ``"modules: <why>"``: which body a request of ``model`` runs now."""
    entry = _resolve(model)
    return f"direct ({entry.body.family.name})" if entry.body is not None else f"modules: {entry.reason}"
