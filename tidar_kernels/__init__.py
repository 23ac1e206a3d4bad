"""tidar_kernels: the op library of TiDAR (layouts, reference ops, Triton and CUDA kernels, dispatch).

Imports no transformers. Each op has one public function with ``backend=`` ("auto", "reference",
"triton", "cuda"); see ``live_backends()`` for what runs here.
"""

from . import layouts, reference  # noqa: F401  (reference registers itself)
from ._version import __version__
from .backends import BACKENDS, live_backends
from .layouts import Layout, dense_mask
from .ops.kv_append import kv_append
from .ops.kv_append_paged import kv_append_paged
from .ops.rejection_sample import (
    DraftResult,
    RejectionResult,
    check_sampling_args,
    draft_sample,
    draw_uniforms,
    rejection_sample,
)
from .ops.tidar_attention import tidar_attention
from .ops.tidar_attention_paged import tidar_attention_paged
from .reference.rejection_sample import philox_uniforms

__all__ = [
    "__version__",
    "BACKENDS",
    "check_sampling_args",
    "DraftResult",
    "Layout",
    "RejectionResult",
    "dense_mask",
    "draft_sample",
    "draw_uniforms",
    "kv_append",
    "kv_append_paged",
    "layouts",
    "live_backends",
    "philox_uniforms",
    "rejection_sample",
    "tidar_attention",
    "tidar_attention_paged",
]
