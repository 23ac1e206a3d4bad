"""What TiDAR needs from a vLLM engine, checked where the engine is configured (the front end, before any worker
starts) and again in the worker: a clear refusal, or an option switched off with a logged reason."""

from __future__ import annotations

import logging

from .options import is_tidar_path

logger = logging.getLogger("tidar.vllm")

# vLLM model classes whose decoder layers call ``Attention(q, k, v)`` after RoPE on the forward's positions
SUPPORTED_ARCHITECTURES = (
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
)


def is_tidar_spec(spec) -> bool:
    model = spec.get("model") if isinstance(spec, dict) else getattr(spec, "model", None)
    return is_tidar_path(model)


def adjust_engine_args(args) -> None:
    """Options TiDAR cannot honour, switched off before vLLM builds its config (each with the reason)."""
    if not is_tidar_spec(args.speculative_config):
        return
    if not args.enforce_eager:
        # the mask rows change each step's row count inside the model: compiled graphs / CUDA graphs would replay
        # the shapes they were captured with
        logger.warning("TiDAR: enforce_eager switched on (compiled graphs cannot append the step's [MASK] rows)")
        args.enforce_eager = True


def check_vllm_config(vllm_config) -> None:
    """Refuses an engine TiDAR cannot serve exactly, naming the reason."""
    spec = vllm_config.speculative_config
    if spec is None or not is_tidar_spec(spec):
        return
    mc = vllm_config.model_config
    hf = mc.hf_config
    mask = getattr(hf, "mask_token_id", None)
    vocab = getattr(hf, "vocab_size", None)
    if not isinstance(mask, int) or isinstance(mask, bool) or vocab is None or not 0 <= mask < vocab:
        raise ValueError(
            f"TiDAR needs a model with a [MASK] token: config.mask_token_id must be an int in [0, vocab_size="
            f"{vocab}), got {mask!r} in {mc.model} (add one with tidar.add_mask_token and train it with tidar train)"
        )
    archs = list(getattr(hf, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"TiDAR in vLLM supports the architectures {SUPPORTED_ARCHITECTURES}; {mc.model} is {archs}")
    if not mc.enforce_eager:
        raise ValueError(
            "TiDAR in vLLM needs enforce_eager=True (compiled graphs cannot append the step's [MASK] rows); "
            "the plugin sets it when it sees the TiDAR speculative_config in EngineArgs"
        )
    if vllm_config.parallel_config.world_size > 1:
        raise ValueError("TiDAR in vLLM runs on one worker (tensor/pipeline parallel size 1)")
