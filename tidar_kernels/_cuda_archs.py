"""Which GPUs code built for a list of CUDA architectures runs on. Apart from ``tidar_kernels.cuda`` (whose import
fails where the extension cannot be used, a CPU-only torch included) so the rule is testable everywhere."""

from __future__ import annotations

import re


def arch_covers(archs, capability) -> bool:
    """Whether code built for ``archs`` (e.g. ["sm_90a", "compute_90"]) runs on a GPU of ``capability``."""
    cap = capability[0] * 10 + capability[1]
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", arch)
        if not m:
            continue
        kind, num, suffix = m.group(1), int(m.group(2)), m.group(3)
        if suffix == "a":  # arch-specific features: this exact GPU only
            if num == cap:
                return True
        elif kind == "sm":  # SASS: same major, same or newer minor
            if num // 10 == cap // 10 and num <= cap:
                return True
        elif num <= cap:  # PTX: JIT-compiled by the driver for this or any newer GPU
            return True
    return False
