"""TiDAR served by vLLM: a plugin (``vllm.general_plugins`` entry point ``tidar``), no fork.

    import vllm, tidar.vllm
    llm = vllm.LLM(model=DIR, speculative_config=tidar.vllm.speculative_config(num_speculative_tokens=8))

or ``vllm serve DIR --speculative-config '<the same dict as JSON>'``. Each step is one forward: vLLM's scheduled
rows (verified by vLLM's own rejection sampler) plus TiDAR's [MASK] proposal blocks (docs/design.md §1.5).
Importing this package does not import vLLM.
"""

from .options import TidarOptions, speculative_config

__all__ = ["TidarOptions", "register", "speculative_config"]


def register() -> None:
    """The plugin's entry point (vLLM calls it in each process)."""
    from .plugin import register as _register

    _register()
