"""``compile_config`` in the drop-in ``generate``: HF's rule for compiling the model's forward, applied to TiDAR's
decode steps.

HF's ``generate`` runs its decoding steps through ``model.get_compiled_call(compile_config)`` (``torch.compile`` of
the model's ``__call__``, kept on the model as ``_compiled_call``) when ``_valid_auto_compile_criteria`` holds: a
compileable cache (``cache_implementation="static"``, or a given ``StaticCache``) on an accelerator, or anywhere with
``compile_config._compile_all_devices``; otherwise it warns that it cannot compile and runs eagerly, and so does the
drop-in ``generate`` (``compiled_call`` asks HF's own criteria). When they hold, ``CompiledSteps`` runs every TiDAR
decode step's forward through HF's compiled call, with what ``torch.compile`` needs to trace it whole:

- the step's attention (the cache append and the layout's attention, whose key range grows with the cache) is one
  opaque op, ``tidar_hf::step_attention``, so ``fullgraph=True`` traces the rest of the model;
- every step has one shape: a shorter step (fewer drafts near the end, an AR step) is padded to the widest so far
  with rows that no real row sees (their outputs dropped, their K/V scratch past the committed tokens), so
  ``dynamic=False`` compiles one graph (with a fixed ``draft_len`` the first step is the widest; with ``"auto"``
  a wider plan later compiles one more);
- the logits are the compiled forward's own (``full_logits``).

The prefill and the checks before it run eagerly, as HF's prefill does. The real rows see exactly what they see
uncompiled, so greedy output equals HF's (up to the compiler's floating-point reassociation, as HF's own).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tidar.hf.attention import TidarStep, tidar_attention_forward
from tidar_kernels.layouts import Layout

_SLOT = SimpleNamespace(step=None)  # the padded TidarStep of the compiled forward running now


# cudagraph_unsafe: the op reads host state (the committed lengths) that a CUDA graph replay would freeze
# (HF's default CompileConfig is mode="reduce-overhead"), so inductor keeps it out of any CUDA graph.
@torch.library.custom_op("tidar_hf::step_attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def step_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_idx: int,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """The tidar attention of one layer under the running step (``_SLOT``): the cache append, then the layout's
    attention. Opaque to ``torch.compile`` (its key range depends on the cache's committed lengths)."""
    layer = SimpleNamespace(layer_idx=layer_idx, training=False)
    out, _ = tidar_attention_forward(layer, query, key, value, None, scaling, tidar_step=_SLOT.step, softcap=softcap)
    return out


@step_attention.register_fake
def _(query, key, value, layer_idx, scaling, softcap):
    B, H, S, D = query.shape
    return query.new_empty(B, S, H, D)


_TIDAR_ATTENTION = [None]  # the attention function registered under the model's implementation name


def _compilable_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's attention while ``CompiledSteps`` is installed: ``step_attention`` inside a compiled step,
    the tidar attention function everywhere else."""
    if kwargs.get("tidar_step") is None and _SLOT.step is not None:
        return step_attention(query, key, value, module.layer_idx, scaling, kwargs.get("softcap")), None
    return _TIDAR_ATTENTION[0](module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def compiled_call(model, gen, given_cache):
    """HF's compiled forward (``model.get_compiled_call``) when HF's ``generate`` would compile, by HF's own criteria
    (its warning when ``compile_config`` is given and they do not hold); else None."""
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

    cache = given_cache
    if cache is None and gen.use_cache is not False and gen.cache_implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS:
        cache = SimpleNamespace(is_compileable=True)  # the StaticCache HF's generate would decode with
    if not model._valid_auto_compile_criteria({"cache": cache}, gen):
        return None
    return model.get_compiled_call(gen.compile_config)


def _padded(layout: Layout, width: int) -> Layout:
    """``layout`` with rows ``S .. width - 1`` appended: each sees the segment and the padding before it (causal),
    none in a block, so no real row sees them."""
    S = layout.seg_len
    dev = layout.local_limit.device
    extra = width - S
    limit = torch.arange(S + 1, width + 1, dtype=layout.local_limit.dtype, device=dev)
    block = torch.full((extra,), -1, dtype=layout.block_id.dtype, device=dev)
    pos = layout.position_ids[-1:].expand(extra)
    return Layout(
        torch.cat([layout.local_limit, limit]),
        torch.cat([layout.block_id, block]),
        torch.cat([layout.position_ids, pos]),
    )


class CompiledSteps:
    """While installed (``with``), the model's decode-step forwards (a ``tidar_step`` over a cache holding committed
    tokens) run through ``compiled`` at one padded width; every other forward runs eagerly. ``positions``: the
    caller's positions (``hf_inputs.PromptPositions``), applied before the compiled call with its hook paused."""

    def __init__(self, model, compiled, positions=None):
        self.model, self.compiled, self.positions = model, compiled, positions
        self.width = 0
        self.layouts: dict = {}  # (id(layout), width) -> (layout, padded layout)
        self.name = model.config._attn_implementation

    def __enter__(self):
        from transformers import AttentionInterface

        self.eager = self.model.forward
        self.own = self.model.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hook), kept
        _TIDAR_ATTENTION[0] = AttentionInterface._global_mapping[self.name]
        AttentionInterface.register(self.name, _compilable_attention)
        self.model.forward = self._forward
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        self._restore()
        AttentionInterface.register(self.name, _TIDAR_ATTENTION[0])
        _SLOT.step = None

    def _restore(self):
        """The model's forward as it was before ``__enter__``."""
        if self.own is None:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self.own

    def _forward(self, *args, **kwargs):
        step = kwargs.get("tidar_step")
        if args or step is None or step.cache is None or not any(step.cache.lengths):
            return self.eager(*args, **kwargs)  # the prefill (nothing committed yet) and plain forwards
        return self._step(kwargs)

    def _layout(self, layout: Layout, width: int) -> Layout:
        hit = self.layouts.get((id(layout), width))
        if hit is None or hit[0] is not layout:
            hit = self.layouts[(id(layout), width)] = (layout, _padded(layout, width))
        return hit[1]

    def _step(self, kwargs):
        step = kwargs.pop("tidar_step")
        ids, pos = kwargs.pop("input_ids"), kwargs.pop("position_ids")
        if self.positions is not None:
            pos = self.positions.remap(pos)
        S = ids.shape[1]
        self.width = W = max(self.width, S)
        layout = step.layout
        if W > S:
            step.cache.check_room(W)
            ids = torch.cat([ids, ids[:, -1:].expand(-1, W - S)], 1)
            pos = torch.cat([pos, pos[:, -1:].expand(-1, W - S)], 1)
            layout = self._layout(layout, W)
        _SLOT.step = TidarStep(layout, step.seg_start, step.cache, step.backend)
        self._restore()  # the compiled call traces the model's own forward
        if self.positions is not None:
            self.positions.paused = True
        try:
            out = self.compiled(input_ids=ids, position_ids=pos, **kwargs)
        finally:
            self.model.forward = self._forward
            _SLOT.step = None
            if self.positions is not None:
                self.positions.paused = False
        # a copy: with mode="reduce-overhead" (CUDA graphs) the next replay overwrites the outputs, and TiDAR keeps a
        # step's rows for the next step (HF's loop copies its logits too)
        out.logits = out.logits[:, :S].clone()
        return out


__all__ = ["CompiledSteps", "compiled_call", "step_attention"]
