"""vLLM's CPU KV pool read as the paged ops' ``[num_blocks, block_size, Hkv, D]`` views, without a copy.

The CPU backend keeps one tensor per layer, ``[num_blocks, Hkv, block_size, 2 * D]``: per block and head the
keys, then the values; how keys are laid out inside a block depends on the instruction set the kernel was picked
for (``layer.isa``: for "vec" they are stored transposed, ``[D, block_size]``). Rather than trust a table of ISAs,
the layout is found by writing known keys and values through the backend's own cache update into a scratch block
and checking which view reads them back; a layout neither view reads is refused.
"""

from __future__ import annotations

import torch

LAYOUTS = ("plain", "transposed")  # a half-block [block_size, D] or [D, block_size]


def _view(kv_cache: torch.Tensor, half: int, layout: str) -> torch.Tensor:
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    if layout == "plain":
        return kv_cache.view(nb, hkv, 2, bs, d)[:, :, half].permute(0, 2, 1, 3)
    return kv_cache.view(nb, hkv, 2, d, bs)[:, :, half].permute(0, 3, 1, 2)


def probe_layout(layer, impl, kv_cache: torch.Tensor) -> tuple[str, str]:
    """``(key layout, value layout)`` of this layer's pool, found with the backend's own cache update."""
    if kv_cache.dim() != 4 or kv_cache.shape[3] % 2:
        raise RuntimeError(
            f"TiDAR reads vLLM's CPU KV pool [num_blocks, Hkv, block_size, 2 * head_size]; layer "
            f"{getattr(layer, 'layer_name', '?')} has a cache of shape {tuple(kv_cache.shape)}"
        )
    _, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    scratch = torch.zeros((1, hkv, bs, d2), dtype=kv_cache.dtype)
    n = bs * hkv * d
    key = (torch.arange(n, dtype=torch.float32) + 1).view(bs, hkv, d).to(kv_cache.dtype)
    value = -key
    impl.do_kv_cache_update(layer, key, value, scratch, torch.arange(bs, dtype=torch.int64))
    found = []
    for half, want in ((0, key), (1, value)):
        hits = [lay for lay in LAYOUTS if torch.equal(_view(scratch, half, lay)[0], want)]
        if not hits:
            raise RuntimeError(
                f"TiDAR cannot read the KV pool of layer {getattr(layer, 'layer_name', '?')}: its "
                f"{'keys' if half == 0 else 'values'} are stored in a layout other than {LAYOUTS} (CPU attention ISA "
                f"{getattr(layer, 'isa', '?')!r}); this vLLM build is not supported"
            )
        found.append(hits[0])
    return found[0], found[1]


def pool_views(kv_cache: torch.Tensor, layouts: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_cache, v_cache)`` ``[num_blocks, block_size, Hkv, D]`` views of the layer's pool."""
    return _view(kv_cache, 0, layouts[0]), _view(kv_cache, 1, layouts[1])
