"""The [MASK] rows' attention inside a vLLM attention layer (docs/design.md §1.5).

The layer gets the step's rows followed by the mask rows. vLLM's own attention (and its cache write) runs on the
step's rows exactly as without the plugin; the mask rows attend, through ``tidar_attention_paged``, to their
request's keys in the pool (which now include the step's scheduled tokens) and bidirectionally to their own block,
whose keys and values stay off the pool (``k_seg``/``v_seg``): mask rows are never cached.
"""

from __future__ import annotations

import torch

from tidar_kernels import tidar_attention_paged

from .kv_pool import pool_views, probe_layout


class MaskRows:
    """The mask part of one forward, shared by every layer of it."""

    def __init__(self, layout, num_input_rows: int, block_table: torch.Tensor):
        self.layout = layout
        self.num_input_rows = num_input_rows  # rows vLLM scheduled (with its padding), before the mask rows
        self.block_table = block_table.index_select(0, layout.block_rows.to(block_table.device))
        S = layout.K + 1
        self.local_limit = torch.zeros(S, dtype=torch.int32)  # a block sees its pool keys (seq_lens), nothing more
        self.block_id = torch.zeros(S, dtype=torch.int32)  # ... and its own block, bidirectionally


class LayerHook:
    """Wraps one ``vllm`` ``Attention`` layer's forward."""

    def __init__(self, layer, state):
        self.layer, self.state = layer, state
        self.orig = layer.forward
        self.layouts = None  # the pool's key/value layouts, probed at the first mask step
        impl = layer.impl
        self.H, self.Hkv, self.D = impl.num_heads, impl.num_kv_heads, impl.head_size
        self.scale = float(impl.scale)
        cap = getattr(impl, "logits_soft_cap", None)
        self.softcap = float(cap) if cap else None

    def __call__(self, query, key, value, *args, **kwargs):
        rows = self.state.mask_rows
        if rows is None:
            return self.orig(query, key, value, *args, **kwargs)
        P = rows.num_input_rows
        out = self.orig(query[:P], key[:P], value[:P], *args, **kwargs)
        return torch.cat([out, self._mask_attention(rows, query[P:], key[P:], value[P:])])

    def _mask_attention(self, rows: MaskRows, q, k, v):
        from vllm.forward_context import get_forward_context

        kv_cache = self.layer.kv_cache
        if isinstance(kv_cache, (list, tuple)):  # one per virtual engine in some releases
            kv_cache = kv_cache[get_forward_context().virtual_engine]
        if self.layouts is None:
            self.layouts = probe_layout(self.layer, self.layer.impl, kv_cache)
        k_pool, v_pool = pool_views(kv_cache, self.layouts)
        S = rows.layout.K + 1
        nb = q.shape[0] // S
        qb = q.reshape(nb, S, self.H, self.D).transpose(1, 2)
        kb = k.reshape(nb, S, self.Hkv, self.D).transpose(1, 2)
        vb = v.reshape(nb, S, self.Hkv, self.D).transpose(1, 2)
        out = tidar_attention_paged(
            qb,
            k_pool,
            v_pool,
            rows.block_table,
            rows.layout.seq_lens,
            rows.local_limit,
            rows.block_id,
            scale=self.scale,
            softcap=self.softcap,
            k_seg=kb,
            v_seg=vb,
        )
        return out.transpose(1, 2).reshape(nb * S, self.H * self.D)


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
    if getattr(impl, "attn_type", "decoder") != "decoder":
        raise ValueError(f"TiDAR in vLLM needs decoder self-attention, layer {name} is {impl.attn_type!r}")
