"""The direct body's projections and the LM head on oneDNN-packed weights, on a CPU (docs/design.md §4.7).

A drafted step runs the decoder on a few rows (K drafts and proposal blocks: 2 to 40), where MKL's GEMM behind
``F.linear`` is slow: it packs the weight on every call, so on the 2-core development machine the bundled model's 28
projections and head take 0.41 ms for one row, 1.07 ms for 8 and 1.52 ms for 16, and a step with drafts cost
1.6-2.3 one-row steps. Weights reordered once into oneDNN's blocked layout (``mkldnn::_reorder_linear_weight``, the
op Inductor's CPU freezing uses) run the same rows in 0.40, 0.50 and 0.66 ms, with q/k/v fused into one
projection and gate/up into another (fewer calls: oneDNN's fixed cost per call is what one row pays).
``benchmarks/results/cpu_packed_linear.md`` has the measurements, and why the copies must serve every row count:
mixing MKL's one-row calls on the originals with packed calls on the copies doubles the weights read, and past the
L3 cache that made a one-row step 1.7x slower.

A change of rounding, not of arithmetic: the packed GEMM sums in another order, as ``F.linear`` itself does between
row counts (row 0 of ``F.linear`` at 1 row and at 4 rows already differ in the last bits), so a verification never
was bit-identical to a one-row AR forward; greedy texts rest on the argmax, as before. The direct body's proof runs
the plain ops (bit-identity with the modules); the packed copies are then checked against it once per packing
(``check``). Used only where all of it holds: float32 weights on the CPU, oneDNN in the torch build, no autograd,
at most ``MAX_BYTES`` of copies per model; the copies follow the weights (``tensor_key``: an optimizer step, a reload,
``Module.to`` or ``param.data = ...`` repacks). ``TIDAR_CPU_PACKED=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger("tidar")

ENV = "TIDAR_CPU_PACKED"
MAX_BYTES = 1 << 30  # packed copies per model (the model's own weights are not counted): past it, plain F.linear
CHECK_TOL = 1e-3  # the packed body's hidden states vs the plain body's, relative to their scale (rounding: ~1e-6)


@functools.cache
def available() -> tuple[bool, str]:
    """Whether this torch build can pack linear weights for oneDNN, and why not (a property of the build: asked
    once; ``enabled`` runs at every LM head call)."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False, "this torch build lacks mkldnn::_reorder_linear_weight and _linear_pointwise"
    return True, ""


def _switched_off() -> bool:
    return os.environ.get(ENV, "1") == "0"


def enabled() -> bool:
    """The switch (``TIDAR_CPU_PACKED``, read at every request) and the build's support."""
    return not _switched_off() and available()[0]


def off_reason() -> str:
    """Why packing is off ('' when it is on): the build's reason first, else the switch."""
    ok, why = available()
    return why if not ok else (f"{ENV}=0" if _switched_off() else "")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A float32 CPU weight ``[out, in]`` reordered for oneDNN's linear (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the weight's packed copy (``pack``)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packable(weights) -> str:
    """'' when every weight can be packed, else why not."""
    for w in weights:
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return f"a weight is {w.dtype} on {w.device}, not float32 on the CPU"
    return ""


def _fused(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One projection of several ``(weight, bias)``: weights stacked by output row, biases likewise (zeros where a
    part has none, since ``F.linear`` adds nothing there)."""
    w = torch.cat([p[0].detach() for p in parts])
    if all(p[1] is None for p in parts):
        return w, None
    b = [p[1].detach() if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in parts]
    return w, torch.cat(b)


@dataclass
class PackedLayer:
    """One decoder layer's projections, packed: q/k/v as one (``qkv_sizes`` splits it), o, gate/up as one, down."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: list
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class PackedBody:
    """Packed copies of a ``DirectBody``'s layer projections (``packed_body`` keys them by ``tensor_key``)."""

    def __init__(self, layers):
        self.layers = []
        for L in layers:
            if L.qkv is not None:  # Phi-3: already one projection
                qkv = [L.qkv]
                sizes = [L.q_end, L.k_end - L.q_end, L.qkv[0].shape[0] - L.k_end]
            else:
                qkv = [L.q, L.k, L.v]
                sizes = [p[0].shape[0] for p in qkv]
            qkv_w, qkv_b = _fused(qkv)
            gu_w, gu_b = _fused([L.gate_up] if L.gate_up is not None else [L.gate, L.up])
            self.layers.append(
                PackedLayer(
                    pack(qkv_w),
                    qkv_b,
                    sizes,
                    pack(L.o[0]),
                    _detached(L.o[1]),
                    pack(gu_w),
                    gu_b,
                    pack(L.down[0]),
                    _detached(L.down[1]),
                )
            )


def _detached(t):
    return None if t is None else t.detach().clone()  # a copy: the packed body holds no tensor of the model


def layer_weights(layers) -> list[torch.Tensor]:
    """The weights and biases of a ``DirectBody``'s layer projections: what the packed copies copy."""
    out = []
    for L in layers:
        for pair in (L.qkv, L.q, L.k, L.v, L.o, L.gate_up, L.gate, L.up, L.down):
            if pair is not None:
                out += [t for t in pair if t is not None]
    return out


def tensor_key(t: torch.Tensor) -> tuple:
    """What a copy of ``t`` was made from: the tensor, its storage, layout and version. ``Module.to`` and
    ``param.data = ...`` keep the Parameter and its version but move its storage (pointer, dtype or device); an
    in-place update bumps the version. (An in-place update through ``param.data`` bumps another counter and is not
    seen: call ``tidar.unpatch``/``patch`` or set ``TIDAR_CPU_PACKED=0`` around such code.)"""
    return (id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape), t._version)


@dataclass
class _Entry:
    key: tuple  # tensor_key of every weight and bias it was decided for
    body: PackedBody | None
    reason: str  # why there is no packed body ('' when there is)


_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Entry


def packed_body(model, layers, check) -> tuple[PackedBody | None, str]:
    """The model's packed copies of ``layers`` (a ``DirectBody``'s), made again when the weights changed and checked
    once by ``check(packed) -> ''`` (else the reason); ``(None, why)`` where packing does not apply."""
    if not enabled():
        _MODELS.pop(model, None)  # switched off: its copies go
        return None, off_reason()
    weights = layer_weights(layers)
    if any(t.is_inference() for t in weights):  # no version counter to key copies on (made in inference_mode)
        _MODELS.pop(model, None)
        return None, "its weights are inference tensors (made under torch.inference_mode)"
    key = tuple(tensor_key(t) for t in weights)
    entry = _MODELS.get(model)
    if entry is not None and entry.key == key:
        return entry.body, entry.reason
    reason, body = packable(weights), None
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    if not reason and nbytes > MAX_BYTES:
        reason = f"its projections hold {nbytes >> 20} MB, over the {MAX_BYTES >> 20} MB of packed copies allowed"
    _MODELS.pop(model, None)  # the old copies go before new ones are made
    if not reason:
        try:
            with torch.no_grad():
                body = PackedBody(layers)
                reason = check(body)
        except Exception as exc:  # oneDNN refusing a shape or a primitive on this CPU: the plain ops run
            reason = f"packing failed: {type(exc).__name__}: {exc}"
        if reason:
            body = None
            log.info("tidar: packed CPU projections off for %s: %s", type(model).__name__, reason)
    _MODELS[model] = _Entry(key, body, reason)
    return body, reason


class PackedHead:
    """The LM head's weight packed (all row counts: see the module's docstring), remade when the weight changes
    (``tensor_key``). Holds the copy, not the weight."""

    def __init__(self):
        self._memo = None  # (tensor_key of the weight, packed copy)

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """The logits, or None where the weight cannot be packed here (the caller runs its plain path)."""
        key = tensor_key(weight)
        memo = self._memo
        if memo is None or memo[0] != key:
            self._memo = None
            try:
                memo = self._memo = (key, pack(weight))
            except Exception as exc:  # oneDNN refusing the shape on this CPU
                log.info("tidar: the LM head stays unpacked: %s: %s", type(exc).__name__, exc)
                memo = self._memo = (key, None)
        if memo[1] is None:
            return None
        return linear(hidden, memo[1], None if bias is None else bias.contiguous())


def status(model) -> str:
    """'packed CPU projections' where the model's last request ran them, '' otherwise."""
    entry = _MODELS.get(model)
    return "packed CPU projections" if entry is not None and entry.body is not None and enabled() else ""
