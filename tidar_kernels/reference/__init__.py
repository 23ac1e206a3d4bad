"""Pure-PyTorch reference implementations: the truth every kernel is tested against."""

from . import kv_append, rejection_sample, tidar_attention  # noqa: F401  (registers the reference backend)
