"""Triton kernels behind ``backend="triton"`` (docs/design.md §7, §8).

Importing this package imports triton; an ImportError here only marks the backend as missing
(``tidar_kernels._loaders``). On CPU the kernels run under the Triton interpreter when
``TRITON_INTERPRET=1`` is set before triton is first imported.
"""

import triton  # noqa: F401  (an ImportError marks the backend missing)

from . import (  # noqa: F401  (register the triton backend)
    kv_append,
    kv_append_paged,
    rejection_sample,
    tidar_attention,
    tidar_attention_paged,
)
