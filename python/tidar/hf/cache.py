"""The TiDAR KV cache: preallocated, ragged (per-row committed lengths), appends through ``kv_append``.

Each forward writes its whole segment at the row's committed length; commit moves the length forward
over the accepted drafts (their K/V are exactly what AR decoding caches) and never copies K/V. Everything
past a row's length is scratch that the next forward overwrites.
"""

from __future__ import annotations

import torch

import tidar_kernels
from tidar_kernels import backends
from tidar_kernels._checks import int_range, version


def cache_bytes(batch_size: int, max_len: int, layers: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes a ``TidarCache(batch_size, max_len)`` allocates for a model of these shapes: K and V buffers
    ``[batch_size, kv_heads, max_len, head_dim]`` per layer (Python ints: no overflow for any size)."""
    return 2 * layers * batch_size * kv_heads * max_len * head_dim * element_size


class TidarCache:
    def __init__(self, batch_size: int, max_len: int, *, backend: str = "auto"):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"TidarCache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        self.batch_size, self.max_len, self.backend = batch_size, max_len, backend
        self.keys: list[torch.Tensor] = []  # per layer [B, Hkv, max_len, D], allocated on first append
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * batch_size  # committed tokens per row (host copy: no sync to size views)
        self._validated = None  # (signature, kv_append implementation, seg_start) checked by the last append

    def seq_lengths(self, device=None) -> torch.Tensor:
        """Committed lengths as int32 ``[B]`` (the ``seg_start`` of the next forward)."""
        with torch.inference_mode(False):  # a normal tensor: the ops' memos key on its version counter
            t = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        # the values are known here: seed the ops' range memo so their bounds checks need no device sync
        t._tidar_range = (t._version, (min(self.lengths), max(self.lengths)))
        return t

    def check_room(self, seg_len: int, rows=None) -> None:
        """Raise before any forward if a segment of ``seg_len`` tokens would not fit in some row."""
        rows = range(self.batch_size) if rows is None else rows
        need = max(self.lengths[r] for r in rows) + seg_len
        if need > self.max_len:
            raise ValueError(
                f"kv cache overflow: a segment of {seg_len} tokens needs {need} slots, cache has {self.max_len}"
            )

    def _layer(self, layer_idx: int, k_new: torch.Tensor):
        """The layer's buffers, allocated on its first append from the K/V shapes the model produces."""
        if layer_idx == len(self.keys):
            _, H, _, D = k_new.shape
            shape = (self.batch_size, H, self.max_len, D)
            with torch.inference_mode(False):  # usable (written, cropped) inside and outside inference mode
                self.keys.append(torch.zeros(shape, dtype=k_new.dtype, device=k_new.device))
                self.values.append(torch.zeros(shape, dtype=k_new.dtype, device=k_new.device))
        elif layer_idx > len(self.keys):
            raise RuntimeError(f"TidarCache: layer {layer_idx} appended before layer {len(self.keys)}")
        return self.keys[layer_idx], self.values[layer_idx]

    def append(self, layer_idx: int, k_new: torch.Tensor, v_new: torch.Tensor, seg_start: torch.Tensor):
        """Write the segment's K/V at ``seg_start`` and return views of the keys a query may see:
        ``[B, Hkv, max(seg_start) + S, D]`` (no copy)."""
        if k_new.shape[0] != self.batch_size:
            raise ValueError(f"TidarCache was built for batch {self.batch_size}, got k/v of batch {k_new.shape[0]}")
        k, v = self._layer(layer_idx, k_new)
        sig = (
            k.shape,
            k.dtype,
            k.device,
            k_new.shape,
            v_new.shape,
            k_new.dtype,
            v_new.dtype,
            k_new.device,
            v_new.device,
            id(seg_start),
            version(seg_start),
        )
        memo = self._validated
        if memo is not None and memo[0] == sig and memo[2] is seg_start:
            memo[1](k, v, k_new, v_new, seg_start)  # checked for the first layer of this forward
            return _views(k, v, k_new, seg_start)
        out = _append(k, v, k_new, v_new, seg_start, self.backend)
        if k_new.shape[0] > 0 and seg_start.dtype == torch.int32:
            impl = backends.resolve("kv_append", self.backend, k.device)
            self._validated = (sig, impl, seg_start)
        return out

    def commit(self, n_new) -> None:
        """Row ``b`` keeps ``n_new[b]`` more tokens of the last segment (moves lengths, copies nothing)."""
        n_new = [int(n) for n in n_new]
        for b, n in enumerate(n_new):
            if n < 0 or self.lengths[b] + n > self.max_len:
                raise ValueError(f"cannot commit {n} tokens to row {b} (length {self.lengths[b]}, max {self.max_len})")
        self.lengths = [m + n for m, n in zip(self.lengths, n_new)]

    def committed(self, layer_idx: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed K/V of one row: ``[Hkv, length, D]`` each (views)."""
        n = self.lengths[row]
        return self.keys[layer_idx][row, :, :n], self.values[layer_idx][row, :, :n]

    def row(self, b: int) -> _RowView:
        """A batch-1 view of row ``b`` (prefill of one row of a padded batch writes through it)."""
        return _RowView(self, b)


class _RowView:
    """Batch-1 window onto one row of a TidarCache: same storage, own offsets."""

    def __init__(self, cache: TidarCache, b: int):
        self.cache, self.b = cache, b

    def append(self, layer_idx, k_new, v_new, seg_start):
        k, v = self.cache._layer(layer_idx, k_new)
        b = self.b
        return _append(k[b : b + 1], v[b : b + 1], k_new, v_new, seg_start, self.cache.backend)


def _append(k, v, k_new, v_new, seg_start, backend):
    tidar_kernels.kv_append(k, v, k_new, v_new, seg_start, backend=backend)
    return _views(k, v, k_new, seg_start)


def _views(k, v, k_new, seg_start):
    rng = int_range(seg_start)  # remembered from kv_append's check: no second sync
    end = (rng[1] if rng is not None else k.shape[2] - k_new.shape[2]) + k_new.shape[2]
    return k[:, :, :end], v[:, :, :end]
