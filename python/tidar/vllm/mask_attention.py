"""The [MASK] rows' attention inside a vLLM attention layer (docs/design.md §1.5).

The layer gets the step's rows followed by the mask rows. vLLM's own attention (and its cache write) runs on the
step's rows exactly as without the plugin. Then, per group of requests with one layout (``step_layout``), the
blocks attend as ``tidar_attention_paged`` would over the TiDAR segment (``block_attention``): the prefix and the
scheduled rows' keys from vLLM's pool, the blocks' own keys and values off the pool: mask rows are never cached.
"""

from __future__ import annotations

import torch

from .block_attention import BlockAttention
from .kv_pool import pool_views, probe_layout


class GroupRows:
    """One layout group in the forward: its mask rows ``[B, M]`` and their attention."""

    def __init__(self, group, layout, qsl, seq_lens, block_table, P: int, block_size: int):
        K1 = group.K + 1
        M = len(group.js) * K1
        reqs = group.requests
        self.group = group
        starts = [layout.block_start[r][0] for r in reqs]
        self.mask = torch.tensor([[s + i for i in range(M)] for s in starts], dtype=torch.int64)
        self.mask_in_forward = self.mask + P
        # the group's rows in one run (one request, or requests whose blocks follow each other): slices, no gathers
        run = all(s == starts[0] + i * M for i, s in enumerate(starts))
        self.span = slice(starts[0], starts[0] + len(starts) * M) if run else None
        lens = torch.tensor([seq_lens[r] for r in reqs], dtype=torch.int32)  # pool keys, scheduled included
        table = block_table.index_select(0, torch.tensor(reqs, device=block_table.device))
        self.attention = BlockAttention(group, lens, table, block_size)


class MaskRows:
    """The mask part of one forward, shared by every layer of it."""

    def __init__(self, layout, num_input_rows: int, qsl, seq_lens, block_table, block_size: int):
        self.layout = layout
        self.num_input_rows = num_input_rows  # rows vLLM scheduled (with its padding), before the mask rows
        self.groups = [
            GroupRows(g, layout, qsl, seq_lens, block_table, num_input_rows, block_size) for g in layout.groups
        ]


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

    def _pool(self):
        kv_cache = self.kv_cache()
        if self.layouts is None:
            self.layouts = probe_layout(self.layer, self.layer.impl, kv_cache)
        return pool_views(kv_cache, self.layouts)

    def _mask_attention(self, rows: MaskRows, query, key, value):
        k_pool, v_pool = self._pool()
        H, Hkv, D = self.H, self.Hkv, self.D
        n, P = rows.layout.num_rows, rows.num_input_rows
        out = None
        for g in rows.groups:
            B, M = g.mask.shape
            if g.span is not None:
                fwd = slice(g.span.start + P, g.span.stop + P)
                q, k_seg, v_seg = query[fwd], key[fwd], value[fwd]
            else:
                q, k_seg, v_seg = query[g.mask_in_forward], key[g.mask_in_forward], value[g.mask_in_forward]
            q = q.reshape(B, M, H, D).transpose(1, 2)
            k_seg = k_seg.reshape(B, M, Hkv, D).transpose(1, 2)
            v_seg = v_seg.reshape(B, M, Hkv, D).transpose(1, 2)
            o = g.attention(q, k_seg, v_seg, k_pool, v_pool, self.scale).transpose(1, 2).reshape(B * M, H * D)
            if g.span is not None and g.span.start == 0 and g.span.stop == n:
                return o  # one group holds every mask row, in order
            if out is None:
                out = query.new_empty((n, H * D))
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
