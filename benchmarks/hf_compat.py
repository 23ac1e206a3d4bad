"""The transformers versions the benchmarks meet: the cache argument's name and a StaticCache's write position."""

from __future__ import annotations

import inspect

import torch


def cache_kw(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; 5.17 has only the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def rewind(cache, length: int):
    """Put a StaticCache's write position back to ``length`` (transformers >= 5.2x counts it on the device
    per layer, ``cumulative_length``; older versions take ``cache_position``), so a timed forward can repeat."""
    for layer in getattr(cache, "layers", []):
        cl = getattr(layer, "cumulative_length", None)
        if isinstance(cl, torch.Tensor):
            cl.fill_(length)
        elif isinstance(cl, int):
            layer.cumulative_length = length
