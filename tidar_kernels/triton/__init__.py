"""Triton kernels behind ``backend="triton"`` (docs/design.md §7, §8).

Importing this package imports triton; an ImportError here only marks the backend as missing
(``tidar_kernels._loaders``). On CPU the kernels run under the Triton interpreter when
``TRITON_INTERPRET=1`` is set before triton is first imported.
"""

import triton  # noqa: F401  (an ImportError marks the backend missing)

from . import kv_append, rejection_sample, tidar_attention  # noqa: F401  (register the triton backend)
