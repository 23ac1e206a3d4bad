"""Pure-PyTorch reference implementations: the truth every kernel is tested against."""

from . import (  # noqa: F401  (registers the reference backend)
    kv_append,
    kv_append_paged,
    rejection_sample,
    tidar_attention,
    tidar_attention_paged,
)
