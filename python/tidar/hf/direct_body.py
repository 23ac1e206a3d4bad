"""The decoder body of a patched model run as plain tensor ops, without ``nn.Module`` dispatch (docs/design.md §4.6).

A decode step of a small model is mostly host work: on a 2-core CPU the bundled model's one-row forward spends more
time in ``nn.Module.__call__``, transformers' decorators and config lookups than in its GEMMs. For the families
whose decoder layer it knows (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3: pre-norm RMSNorm, q/k/v/o projections,
fused in Phi-3, with optional biases, RoPE, a gated MLP), ``DirectBody`` runs the same tensor ops in the same order
on the same parameters, calling the "tidar" attention function itself; the rotary module is still called (its rope
type and scaling are its own).

It is used only where it is proven equal: for a model it runs a prompt and a cached decode step (drafts and a
proposal block, at an offset) beside the model's own module path (``tidar_hidden``) on random tokens and must give
bit-identical hidden states, else the module path is kept and the reason logged once. Where the modules would do
more than their ops it is refused before any proof: hooks (global or on a module), a ``forward`` of an instance or a
compiled module, a class that is not the family's own (by identity, not name), a projection that is not exactly
``nn.Linear`` (adapters, quantisation), hub kernels swapped into the rotary function, training mode, an attention
implementation other than TiDAR's. Every request compares a fingerprint of all this (module and class identities,
their ``forward`` functions, hooks, the constants the body reads, parameter dtypes and devices) with the proven one,
and proves again when it moved. The body holds the model's parameters only for one request (it is built per request:
a weight reloaded with ``load_state_dict(assign=True)`` is never kept alive). ``TIDAR_DIRECT_BODY=0`` turns it off.
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

from tidar.hf import cpu_packed
from tidar.hf.attention import NAME, TidarStep, tidar_attention_forward, tidar_hidden
from tidar_kernels import layouts

log = logging.getLogger("tidar")

ENV = "TIDAR_DIRECT_BODY"
PROOF_PROMPT = 24  # tokens of the proof's prompt (its decode step follows at that offset)


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
    embed: str | None = None  # the embedding's class in the family's module (None: nn.Embedding)
    gemma_norm: bool = False  # Gemma's RMSNorm: in float32, scaled by (1 + weight), epsilon ``eps``
    fused: bool = False  # Phi-3: one qkv_proj (sliced), one gate_up_proj (chunked), partial RoPE, residual dropouts


FAMILIES = {
    "LlamaModel": Family("llama", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", False, "none"),
    "MistralModel": Family(
        "mistral", "MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm", False, "config"
    ),
    "Qwen2Model": Family("qwen2", "Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm", False, "attr"),
    "Qwen3Model": Family("qwen3", "Qwen3DecoderLayer", "Qwen3Attention", "Qwen3MLP", "Qwen3RMSNorm", True, "attr"),
    "GemmaModel": Family(
        "gemma",
        "GemmaDecoderLayer",
        "GemmaAttention",
        "GemmaMLP",
        "GemmaRMSNorm",
        False,
        "none",
        embed="GemmaTextScaledWordEmbedding",
        gemma_norm=True,
    ),
    "Phi3Model": Family(
        "phi3", "Phi3DecoderLayer", "Phi3Attention", "Phi3MLP", "Phi3RMSNorm", False, "config", fused=True
    ),
}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward (and its copies in the other families), op for op; the casts only where they cast
    (on float32 they return their input: skipping them saves two dispatches a norm and changes no bit)."""
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))


def _gemma_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GemmaRMSNorm's forward, op for op: normalised in float32, scaled by ``1 + weight`` in float32, cast back."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def _eps(norm) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    """One decoder layer's parameters (the Parameter objects, so in-place updates are seen) and constants."""

    def __init__(self, layer, family: Family):
        a, m = layer.self_attn, layer.mlp
        self.attn = a
        # the constants from the one function the fingerprint reads them with (``_constants``)
        self.eps1, self.eps2, self.head_dim, self.scaling, self.window = _layer_constants(layer, family)[:5]
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        if family.fused:  # Phi-3: q, k, v sliced from one projection (its forward's sizes)
            self.qkv = (a.qkv_proj.weight, a.qkv_proj.bias)
            self.q = self.k = self.v = None
            self.q_end = a.config.num_attention_heads * a.head_dim
            self.k_end = self.q_end + a.num_key_value_heads * a.head_dim
        else:
            self.qkv = None
            self.q = (a.q_proj.weight, a.q_proj.bias)
            self.k = (a.k_proj.weight, a.k_proj.bias)
            self.v = (a.v_proj.weight, a.v_proj.bias)
        self.o = (a.o_proj.weight, a.o_proj.bias)
        self.qn = (a.q_norm.weight, _eps(a.q_norm)) if family.qk_norm else None
        self.kn = (a.k_norm.weight, _eps(a.k_norm)) if family.qk_norm else None
        if family.fused:
            self.gate_up = (m.gate_up_proj.weight, m.gate_up_proj.bias)
            self.gate = self.up = None
            self.act = m.activation_fn.forward
        else:
            self.gate_up = None
            self.gate = (m.gate_proj.weight, m.gate_proj.bias)
            self.up = (m.up_proj.weight, m.up_proj.bias)
            self.act = m.act_fn.forward  # an activation module's forward (no hooks: see _fingerprint)
        self.down = (m.down_proj.weight, m.down_proj.bias)


def _layer_constants(layer, family: Family) -> tuple:
    """A layer's settings the body reads besides parameters: norm epsilons, head size, scaling, attention window,
    q/k norm epsilons."""
    a = layer.self_attn
    window = (
        None
        if family.window == "none"
        else getattr(a.config, "sliding_window", None)
        if family.window == "config"
        else a.sliding_window
    )
    qk = (_eps(a.q_norm), _eps(a.k_norm)) if family.qk_norm else ()
    eps = (_eps(layer.input_layernorm), _eps(layer.post_attention_layernorm))
    heads = (a.config.num_attention_heads, a.num_key_value_heads) if family.fused else ()
    return (*eps, a.head_dim, a.scaling, window, *qk, *heads)


class DirectBody:
    """``body(input_ids, position_ids, step) -> hidden [B, S, H]``: ``tidar_hidden`` without module dispatch."""

    def __init__(self, model, family: Family):
        base = model.base_model
        self.family = family
        self.embed = base.embed_tokens
        # Gemma's embedding scales in its own forward (no hooks: see _family_refusal); nn.Embedding's is F.embedding
        self.embed_forward = None if family.embed is None else base.embed_tokens.forward
        self.rms = _gemma_rms if family.gemma_norm else _rms
        self.rotary = base.rotary_emb
        self.norm, self.norm_eps = base.norm.weight, _eps(base.norm)
        self.layers = [_Layer(layer, family) for layer in base.layers[: base.config.num_hidden_layers]]
        self.packed = None  # on a CPU, the projections' packed copies (``cpu_packed``; set by ``decoder_body``)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: TidarStep) -> torch.Tensor:
        e, rms = self.embed, self.rms
        x = (
            F.embedding(input_ids, e.weight, e.padding_idx)
            if self.embed_forward is None
            else self.embed_forward(input_ids)
        )
        cos, sin = self.rotary(x, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        B, S = input_ids.shape
        packed = self.packed.layers if self.packed is not None and not torch.is_grad_enabled() else None
        for i, L in enumerate(self.layers):
            P = packed[i] if packed is not None else None  # the layer's packed projections (``cpu_packed``)
            residual = x
            h = rms(x, L.ln1, L.eps1)
            shape = (B, S, -1, L.head_dim)
            if P is not None:
                q, k, v = cpu_packed.linear(h, P.qkv, P.qkv_bias).split(P.qkv_sizes, dim=-1)
            elif L.qkv is None:
                q, k, v = F.linear(h, *L.q), F.linear(h, *L.k), F.linear(h, *L.v)
            else:  # Phi-3: q, k, v sliced from one projection
                qkv = F.linear(h, *L.qkv)
                q, k, v = qkv[..., : L.q_end], qkv[..., L.q_end : L.k_end], qkv[..., L.k_end :]
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            if L.qn is not None:
                q, k = rms(q, *L.qn), rms(k, *L.kn)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if L.qkv is None:
                q = (q * cos) + (_rotate_half(q) * sin)
                k = (k * cos) + (_rotate_half(k) * sin)
            else:  # Phi-3's partial RoPE (the rotated part, then the rest), as its forward
                r = cos.shape[-1]
                q_rot, q_pass, k_rot, k_pass = q[..., :r], q[..., r:], k[..., :r], k[..., r:]
                q = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
                k = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
            o, _ = tidar_attention_forward(
                L.attn, q, k, v, None, scaling=L.scaling, sliding_window=L.window, tidar_step=step
            )
            o = o.reshape(B, S, -1)  # contiguous already (the attention function returns it so)
            o = cpu_packed.linear(o, P.o, P.o_bias) if P is not None else F.linear(o, *L.o)
            x = residual + o
            residual = x
            h = rms(x, L.ln2, L.eps2)
            if P is not None:
                gate, up = cpu_packed.linear(h, P.gate_up, P.gate_up_bias).chunk(2, dim=-1)
            elif L.gate_up is None:
                gate, up = F.linear(h, *L.gate), F.linear(h, *L.up)
            else:  # Phi-3: one projection's halves (its residual dropouts: identity in eval)
                gate, up = F.linear(h, *L.gate_up).chunk(2, dim=-1)
            h = L.act(gate) * up if L.gate_up is None else up * L.act(gate)  # each family's order
            h = cpu_packed.linear(h, P.down, P.down_bias) if P is not None else F.linear(h, *L.down)
            x = residual + h
        return rms(x, self.norm, self.norm_eps)


def _family_refusal(model) -> tuple[Family | None, str]:
    """The model's family, or why the direct body does not apply (checked on classes and settings, not on
    behaviour: the proof forward checks behaviour)."""
    import sys

    base = getattr(model, "base_model", None)
    family = FAMILIES.get(type(base).__name__)
    if family is None:
        return None, f"{type(base).__name__} is not one of {', '.join(sorted(FAMILIES))}"
    home = sys.modules.get(type(base).__module__)  # the family's modeling module: its classes, by identity

    def foreign(mod, cls: str) -> bool:
        return type(mod) is not getattr(home, cls, None)

    if not str(type(base).__module__).startswith("transformers.models."):
        return None, f"{type(base).__name__} is not transformers' own class"
    for cfg in {id(model.config): model.config, id(base.config): base.config}.values():
        if getattr(cfg, "_attn_implementation", None) != NAME:
            return None, f"the attention implementation is {cfg._attn_implementation!r}, not {NAME!r}"
    embed_cls = nn.Embedding if family.embed is None else getattr(home, family.embed, None)
    if type(base.embed_tokens) is not embed_cls:
        want = "nn.Embedding" if family.embed is None else f"transformers' {family.embed}"
        return None, f"embed_tokens is a {type(base.embed_tokens).__name__}, not {want}"
    if base.embed_tokens.max_norm is not None:
        return None, "embed_tokens has max_norm"
    for name, m in base.named_modules():
        where = name or "the body"
        if m._forward_hooks or m._forward_pre_hooks:
            return None, f"{where} has forward hooks (they run on the module path only)"
        if "forward" in m.__dict__:
            return None, f"{where} has its own forward (hub kernels, offloading, adapters)"
        if m._compiled_call_impl is not None:
            return None, f"{where} is compiled (Module.compile)"
        for fname, f in (getattr(m, "_kernel_funcs", None) or {}).items():
            if "forward" in getattr(f, "__dict__", {}) or getattr(f, "_forward_hooks", None):
                return None, f"{where} runs a hub kernel for {fname}"
    if foreign(base.norm, family.norm):
        return None, f"the final norm is a {type(base.norm).__name__}, not transformers' {family.norm}"
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
            if foreign(mod, cls):
                return (
                    None,
                    f"layer {i}'s {what} is a {type(mod).__name__} of {type(mod).__module__}, not transformers' {cls}",
                )
        projections = ("qkv_proj", "o_proj") if family.fused else ("q_proj", "k_proj", "v_proj", "o_proj")
        for what in projections:
            if type(getattr(layer.self_attn, what)) is not nn.Linear:
                return None, f"layer {i}'s {what} is a {type(getattr(layer.self_attn, what)).__name__}, not nn.Linear"
        if family.fused:
            for what in ("resid_attn_dropout", "resid_mlp_dropout"):
                if type(getattr(layer, what)) is not nn.Dropout:
                    return None, f"layer {i}'s {what} is a {type(getattr(layer, what)).__name__}, not nn.Dropout"
        for what in ("gate_up_proj", "down_proj") if family.fused else ("gate_proj", "up_proj", "down_proj"):
            if type(getattr(layer.mlp, what)) is not nn.Linear:
                return None, f"layer {i}'s {what} is a {type(getattr(layer.mlp, what)).__name__}, not nn.Linear"
    return family, ""


def _fingerprint(model) -> tuple | None:
    """What the proof rests on beyond the classes' code: every module of the body (identity, class, its ``forward``
    function, hooks, instance and compiled forwards, hub kernel functions, training flag, parameter dtypes and
    devices), the constants the body reads (``_constants``) and the attention implementation. ``None`` when global
    module hooks are registered (they would run on the module path only)."""
    from torch.nn.modules import module as module_mod

    if any(getattr(module_mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return None
    parts = []
    for m in model.base_model.modules():
        kernels = getattr(m, "_kernel_funcs", None)
        parts.append(
            (
                id(m),
                type(m),
                getattr(type(m), "forward", None),
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                "forward" in m.__dict__,
                m._compiled_call_impl is not None,
                tuple((k, id(f), "forward" in getattr(f, "__dict__", {})) for k, f in kernels.items())
                if kernels
                else (),
                tuple((k, None if p is None else (p.dtype, p.device)) for k, p in m._parameters.items()),
            )
        )
    try:
        consts = _constants(model)
    except Exception as exc:  # an attribute this release does not have: refused (and fingerprinted) as such
        consts = repr(exc)
    impl = (
        getattr(model.config, "_attn_implementation", None),
        getattr(model.base_model.config, "_attn_implementation", None),
    )
    return (id(model.base_model), impl, consts, tuple(parts))


def _constants(model) -> tuple:
    """The settings ``DirectBody`` reads once per request besides parameters: layer count, norms' epsilons, head
    size, scaling, attention windows (a change after a proof must be proven again)."""
    base = model.base_model
    family = FAMILIES.get(type(base).__name__)
    if family is None:
        return ()
    layers = base.layers[: base.config.num_hidden_layers]
    e = base.embed_tokens
    out = [
        base.config.num_hidden_layers,
        _eps(base.norm),
        e.padding_idx,
        e.max_norm,
        getattr(e, "scalar_embed_scale", None),
    ]
    out += [_layer_constants(layer, family) for layer in layers]
    return tuple(out)


def _probe(model, f) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states ``f`` gives on random tokens: a ragged 2-row prompt of ``PROOF_PROMPT`` tokens through a
    ``TidarCache``, then a decode step of 3 drafts with every proposal block after it (the same inputs every call)."""
    from tidar.hf.cache import TidarCache

    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    n = PROOF_PROMPT
    backend = getattr(getattr(model, "_tidar", None), "backend", "auto")
    prompt = torch.randint(0, vocab, (2, n), generator=gen).to(dev)
    step = layouts.decode_step(3).to(dev)
    S = step.local_limit.shape[0]
    drafts = torch.randint(0, vocab, (2, S), generator=gen).to(dev)
    causal = layouts.causal(n).to(dev)
    cache = TidarCache(2, n + S + 1, backend=backend)
    with torch.no_grad():
        pos = causal.position_ids[None].expand(2, -1)
        h1 = f(prompt, pos, TidarStep(causal, cache.seq_lengths(dev), cache, backend))
        cache.commit([n, n - 5])  # ragged: the second row's step starts earlier
        seg = cache.seq_lengths(dev)
        h2 = f(drafts, step.position_ids[None] + seg.to(torch.long)[:, None], TidarStep(step, seg, cache, backend))
    return h1, h2


def _prove(model, body: DirectBody) -> str:
    """The body beside the module path on ``_probe``'s inputs: '' when the hidden states of both forwards are
    bit-identical."""
    want, got = _probe(model, partial(tidar_hidden, model)), _probe(model, body)
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype or not torch.equal(g, w):
            return "its hidden states differ from the module path's on a probe forward"
    return ""


@dataclass
class _Entry:
    fingerprint: tuple | None
    family: Family | None  # proven for this fingerprint; None: the module path (``reason``)
    reason: str


_PROVEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Entry (nothing stored on the model)


def enabled() -> bool:
    """Whether the switch (``TIDAR_DIRECT_BODY``, read at every request) lets the direct body run at all."""
    return os.environ.get(ENV, "1") != "0"


def _resolve(model) -> _Entry:
    if not enabled():
        return _Entry(None, None, f"{ENV}=0")
    fp = _fingerprint(model)
    entry = _PROVEN.get(model)
    if entry is not None and fp is not None and entry.fingerprint == fp:
        return entry
    if fp is None:
        entry = _Entry(None, None, "global module hooks are registered")
    else:
        family, reason = _family_refusal(model)
        if family is not None and any(m.training for m in model.base_model.modules()):
            family, reason = None, "the model is in training mode"
        if family is not None:
            try:
                reason = _prove(model, DirectBody(model, family))
            except Exception as exc:  # an attribute this family's release does not have, a failed forward
                reason = f"{type(exc).__name__}: {exc}"
            if reason:
                family = None
        entry = _Entry(fp, family, reason)
        if reason:
            log.info("tidar: direct decoder body off for %s: %s (module path used)", type(model).__name__, reason)
    _PROVEN[model] = entry
    return entry


def decoder_body(model):
    """``f(input_ids, position_ids, step) -> hidden``: the direct body where it is proven for this model as its
    modules are now, else the module path (``tidar_hidden``). Call once per request: the body it returns holds the
    model's parameters, so it should not outlive the request."""
    entry = _resolve(model)
    if entry.family is None:
        return partial(tidar_hidden, model)
    body = DirectBody(model, entry.family)
    body.packed, _ = cpu_packed.packed_body(model, body.layers, partial(_check_packed, model, body))
    return body


def _check_packed(model, body: DirectBody, packed) -> str:
    """The body with ``packed`` projections against the same body's plain ops (proven bit-identical to the modules)
    on ``_probe``'s inputs: '' when within rounding (``cpu_packed.CHECK_TOL`` of the hidden states' scale)."""

    def run(p):
        body.packed = p
        return _probe(model, body)

    try:
        want, got = run(None), run(packed)
    finally:
        body.packed = None
    for g, w in zip(got, want):
        err = (g - w).abs().max().item()
        scale = w.abs().max().item()
        if not err <= cpu_packed.CHECK_TOL * max(1.0, scale):
            return f"its hidden states differ from the plain body's by {err:.3g} (scale {scale:.3g})"
    return ""


def status(model) -> str:
    """``"direct (qwen2)"`` or ``"modules: <why>"``: which body a request of ``model`` runs now."""
    entry = _resolve(model)
    if entry.family is None:
        return f"modules: {entry.reason}"
    packed = cpu_packed.status(model)
    return f"direct ({entry.family.name})" + (f", {packed}" if packed else "")
