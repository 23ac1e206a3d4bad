"""Reference ``kv_append_paged``: one index_put_ per cache at the (block, offset) of each kept token (exact copy)."""

from __future__ import annotations

from ..backends import register


@register("kv_append_paged", "reference")
def kv_append_paged(k_cache, v_cache, k_new, v_new, slot_mapping):
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):  # -1 = skip (a padding token)
        slots, k_new, v_new = slots[keep], k_new[keep], v_new[keep]
    index = (slots // block_size, slots % block_size)
    k_cache.index_put_(index, k_new)
    v_cache.index_put_(index, v_new)
