"""The drop-in ``model.generate`` of a patched model: Hugging Face's API (options, precedence, length rules),
decoded by ``tidar.generate``. Options TiDAR cannot honour raise instead of running something else."""
from __future__ import annotations

from .generate import generate

_UNSUPPORTED = {  # generation options TiDAR cannot honour, with the value that means "off"
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "min_length": 0,
    "min_new_tokens": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "top_h": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "prompt_lookup_num_tokens": None,
    "dola_layers": None,
    "use_mtp": None,
}
_UNSUPPORTED_KWARGS = ("logits_processor", "stopping_criteria", "assistant_model", "prefix_allowed_tokens_fn",
                       "synced_gpus", "negative_prompt_ids", "inputs_embeds", "past_key_values", "cache")
_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _generation_options(model, generation_config, kwargs) -> dict:
    """HF's precedence: library defaults < model.generation_config < generation_config < kwargs."""
    opts = dict(_DEFAULTS)
    for cfg in (getattr(model, "generation_config", None), generation_config):
        if cfg is not None:
            opts.update({k: v for k, v in cfg.to_dict().items() if v is not None})
    opts.update(kwargs)
    return opts


def patched_generate(self, inputs=None, generation_config=None, **kwargs):
    """``model.generate`` after ``tidar.patch``: greedy or sampling decoding through TiDAR.
    Options TiDAR cannot honour (beam search, penalties, extra outputs, ...) raise instead of running
    something else. Extra TiDAR options: ``draft_len``, ``beta``, ``generator``, ``seed``, ``tidar_stats``
    (True returns the full ``TidarGenerateOutput``)."""
    for k in _UNSUPPORTED_KWARGS:
        if kwargs.get(k) is not None:
            raise ValueError(f"TiDAR generate does not support {k}=; call tidar.unpatch(model) for plain HF generate")
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if input_ids is None:
        raise ValueError("generate needs input_ids (or inputs)")
    attention_mask = kwargs.pop("attention_mask", None)
    streamer = kwargs.pop("streamer", None)
    tidar_kw = {k: kwargs.pop(k) for k in ("draft_len", "beta", "generator", "backend", "seed",
                                                 "proposal_levels", "context_drafts") if k in kwargs}
    want_stats = kwargs.pop("tidar_stats", False)
    kwargs.pop("use_cache", None)
    opts = _generation_options(self, generation_config, kwargs)
    from transformers import GenerationConfig

    unknown = set(kwargs) - set(GenerationConfig().to_dict())
    if unknown:
        raise ValueError(f"TiDAR generate does not understand {sorted(unknown)}")
    for k, off in _UNSUPPORTED.items():
        v = opts.get(k, off)
        if v is not None and v != off and not (k == "min_length" and v == 0):
            raise ValueError(f"TiDAR generate cannot honour {k}={v!r} (only greedy and sampling decoding)")
    P = input_ids.shape[-1]
    max_new = opts.get("max_new_tokens")
    if max_new is None:
        max_new = opts["max_length"] - P
        if max_new < 1:
            raise ValueError(f"max_length {opts['max_length']} leaves no room after a prompt of {P} tokens; set max_new_tokens")
    sample = bool(opts.get("do_sample"))
    temperature = float(opts["temperature"]) if sample else 0.0
    if sample and temperature == 0.0:
        raise ValueError("do_sample=True needs temperature > 0")
    eos = opts.get("eos_token_id")
    res = generate(
        self,
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=opts["top_k"] if sample else None,
        top_p=opts["top_p"] if sample else None,
        eos_token_id=eos,
        pad_token_id=opts.get("pad_token_id"),
        streamer=streamer,
        **tidar_kw,
    )
    return res if want_stats else res.sequences


__all__ = ["patched_generate"]
