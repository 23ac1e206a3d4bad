"""The [MASK] rows' attention inside a vLLM attention layer (docs/design.md §1.5).

The layer gets the step's rows followed by the mask rows. vLLM's own attention (and its cache write) runs on the
step's rows exactly as without the plugin. Then, per group of requests with one layout (``step_layout``), the
blocks attend as ``tidar_attention_paged`` would over the TiDAR segment (``block_attention``): the prefix and the
scheduled rows' keys from vLLM's pool, the blocks' own keys and values off the pool: mask rows are never cached.
"""

from __future__ import annotations

import logging

import torch

from .block_attention import BlockAttention
from .kv_pool import probe_layout

logger = logging.getLogger("tidar.vllm")


class GroupRows:
    """One layout group in the forward: its mask rows ``[B, M]`` and their attention."""

    def __init__(self, group, layout, seq_lens: list[int], block_table, P: int, block_size: int):
        M = len(group.js) * (group.K + 1)
        reqs = group.requests
        self.group = group
        starts = [layout.block_start[r][0] for r in reqs]
        # the group's rows in one run (one request, or requests whose blocks follow each other): slices, no gathers
        run = all(s == starts[0] + i * M for i, s in enumerate(starts))
        self.span = slice(starts[0], starts[0] + len(starts) * M) if run else None
        self.fwd = slice(starts[0] + P, starts[0] + len(starts) * M + P) if run else None
        if run:
            self.mask = self.mask_in_forward = None
        else:
            self.mask = (torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(M)[None]).contiguous()
            self.mask_in_forward = self.mask.view(-1) + P
        self.shape = (len(reqs), M)
        lens = torch.tensor([seq_lens[r] for r in reqs], dtype=torch.int32)  # pool keys, scheduled included
        if reqs == list(range(reqs[0], reqs[0] + len(reqs))):
            table = block_table[reqs[0] : reqs[0] + len(reqs)]
        else:
            table = block_table.index_select(0, torch.tensor(reqs, device=block_table.device))
        self.attention = BlockAttention(group, lens, table, block_size)


class MaskRows:
    """The mask part of one forward, shared by every layer of it."""

    def __init__(self, layout, num_input_rows: int, seq_lens: list[int], block_table, block_size: int):
        self.layout = layout
        self.num_input_rows = num_input_rows  # rows vLLM scheduled (with its padding), before the mask rows
        self.groups = [GroupRows(g, layout, seq_lens, block_table, num_input_rows, block_size) for g in layout.groups]
        # one group holding every mask row in order: its output is the layer's mask output as it is
        g0 = self.groups[0] if len(self.groups) == 1 else None
        self.whole = g0 is not None and g0.span is not None and g0.span.start == 0 and g0.span.stop == layout.num_rows


class LayerHook:
    """Wraps one ``vllm`` ``Attention`` layer's forward."""

    def __init__(self, layer, state):
        self.layer, self.state = layer, state
        self.orig = layer.forward
        self.layouts = None  # the pool's key/value layouts, probed at the first mask step
        impl = layer.impl
        self.H, self.Hkv, self.D = impl.num_heads, impl.num_kv_heads, impl.head_size
        self.scale = float(impl.scale)

    def __call__(self, query, key, value, *args, **kwargs):
        rows = self.state.mask_rows
        if rows is None:
            return self.orig(query, key, value, *args, **kwargs)
        P = rows.num_input_rows
        out = self.orig(query[:P], key[:P], value[:P], *args, **kwargs)
        return torch.cat([out, self._mask_attention(rows, query, key, value)])

    def kv_cache(self) -> torch.Tensor:
        from vllm.forward_context import get_forward_context

        kv_cache = self.layer.kv_cache
        if isinstance(kv_cache, (list, tuple)):  # one per virtual engine in some releases
            kv_cache = kv_cache[get_forward_context().virtual_engine]
        return kv_cache

    def _mask_attention(self, rows: MaskRows, query, key, value):
        kv_cache = self.kv_cache()
        if self.layouts is None:
            self.layouts = probe_layout(self.layer, self.layer.impl, kv_cache)
            logger.debug("TiDAR: layer %s pool layout %s", getattr(self.layer, "layer_name", "?"), self.layouts)
        H, Hkv, D = self.H, self.Hkv, self.D
        out = None
        for g in rows.groups:
            B, M = g.shape
            sel = g.fwd if g.fwd is not None else g.mask_in_forward
            q = query[sel].reshape(B, M, H, D).transpose(1, 2)
            k_seg = key[sel].reshape(B, M, Hkv, D).transpose(1, 2)
            v_seg = value[sel].reshape(B, M, Hkv, D).transpose(1, 2)
            o = g.attention.attend_packed(q, k_seg, v_seg, kv_cache, self.layouts, self.scale)
            o = o.transpose(1, 2).reshape(B * M, H * D)
            if rows.whole:
                return o
            if out is None:
                out = query.new_empty((rows.layout.num_rows, H * D))
            if g.span is not None:
                out[g.span] = o
            else:
                out[g.mask.view(-1)] = o
        return out


def check_layer(layer) -> None:
    """Refuses a layer whose attention the mask rows cannot reproduce (with the reason)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = layer.impl
    name = getattr(layer, "layer_name", type(layer).__name__)
    if not isinstance(impl, CPUAttentionBackendImpl):
        raise ValueError(
            f"TiDAR in vLLM reads the KV pool of vLLM's CPU attention backend; layer {name} uses {type(impl).__name__}"
        )
    if getattr(impl, "sliding_window", -1) not in (-1, None):
        raise ValueError(f"TiDAR in vLLM does not support sliding-window attention (layer {name})")
    if getattr(impl, "alibi_slopes", None) is not None or getattr(impl, "sinks", None) is not None:
        raise ValueError(f"TiDAR in vLLM does not support ALiBi or attention sinks (layer {name})")
    if getattr(impl, "logits_soft_cap", 0):
        raise ValueError(f"TiDAR in vLLM does not support attention logit soft-capping (layer {name})")
    if getattr(impl, "attn_type", "decoder") != "decoder":
        raise ValueError(f"TiDAR in vLLM needs decoder self-attention, layer {name} is {impl.attn_type!r}")
