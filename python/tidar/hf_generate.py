"""The drop-in ``model.generate`` of a patched model: Hugging Face's API (options, precedence, length rules),
decoded by ``tidar.generate``. Options TiDAR cannot honour raise instead of running something else."""

from __future__ import annotations

from .generate import generate
from .generate_args import token_ids

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
_UNSUPPORTED_KWARGS = (
    "logits_processor",
    "stopping_criteria",
    "assistant_model",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "negative_prompt_ids",
    "inputs_embeds",
    "past_key_values",
    "cache",
)
TIDAR_KWARGS = ("draft_len", "beta", "generator", "backend", "seed", "proposal_levels", "context_drafts", "full_logits")


def _hf_length_and_tokens(model, input_ids, attention_mask, generation_config, kwargs):
    """HF 5.24's own preparation, step for step as in ``GenerationMixin.generate``: the merged generation config
    (library defaults < ``model.generation_config`` < ``generation_config`` < kwargs), the model kwargs check,
    the special tokens (``eos_token_id`` as int, list or tensor; ``pad_token_id`` defaulting to EOS) and the
    length rules (``max_new_tokens`` over ``max_length``; the default of 20 new tokens, capped at
    ``max_position_embeddings``), with HF's own warnings and errors. Returns ``(generation_config, max_new)``."""
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):  # before HF's config checks, which fail obscurely
        if kwargs.get(k) is not None:
            token_ids(k, kwargs[k])
    gen, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    model._validate_model_kwargs(model_kwargs.copy())  # HF's error for arguments the model does not take
    extra = sorted(set(model_kwargs) - {"attention_mask", "use_cache"})
    if extra:
        raise ValueError(f"TiDAR generate does not support {extra}; call tidar.unpatch(model) for plain HF generate")
    for k, off in _UNSUPPORTED.items():
        v = getattr(gen, k, off)
        if v is not None and v != off and not (k == "min_length" and v == 0):
            raise ValueError(f"TiDAR generate cannot honour {k}={v!r} (only greedy and sampling decoding)")
    mode = gen.get_generation_mode(None)
    if getattr(mode, "value", str(mode)) not in ("greedy_search", "sample"):
        raise ValueError(f"TiDAR generate runs greedy or sampling decoding only, not {getattr(mode, 'value', mode)}")
    B, P = input_ids.shape
    token_ids("eos_token_id", gen.eos_token_id)  # HF would fail deep inside torch.tensor on a str or float
    token_ids("bos_token_id", gen.bos_token_id)
    if gen.pad_token_id is not None:
        token_ids("pad_token_id", gen.pad_token_id)
    model._prepare_special_tokens(gen, attention_mask is not None, device=input_ids.device, batch_size=B)
    gen = model._prepare_generated_length(
        generation_config=gen,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        inputs_tensor=input_ids,
        input_ids_length=P,
    )
    model._validate_generated_length(gen, P, has_default_max_length)
    return gen, gen.max_length - P


def _token_list(t):
    if t is None:
        return None
    return [int(x) for x in t.reshape(-1).tolist()]


def patched_generate(self, inputs=None, generation_config=None, **kwargs):
    """``model.generate`` after ``tidar.patch``: greedy or sampling decoding through TiDAR, with HF's own
    argument handling (see ``_hf_length_and_tokens``). Options TiDAR cannot honour (beam search, penalties,
    extra outputs, ...) raise instead of running something else. Extra TiDAR options: ``draft_len``, ``beta``,
    ``generator``, ``seed``, ``proposal_levels``, ``context_drafts``, ``full_logits``, ``tidar_stats`` (True
    returns the full ``TidarGenerateOutput``)."""
    from .generate_args import check_input_ids

    for k in _UNSUPPORTED_KWARGS:
        if kwargs.get(k) is not None:
            raise ValueError(f"TiDAR generate does not support {k}=; call tidar.unpatch(model) for plain HF generate")
    if inputs is not None and kwargs.get("input_ids") is not None:
        raise ValueError("give the prompt once: inputs or input_ids, not both")
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if input_ids is None:
        raise ValueError("generate needs input_ids (or inputs): an integer tensor [B, P]")
    check_input_ids(input_ids)
    if generation_config is not None:
        from transformers import GenerationConfig

        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(
                f"generation_config must be a transformers GenerationConfig, got {type(generation_config).__name__}"
            )
    attention_mask = kwargs.pop("attention_mask", None)
    streamer = kwargs.pop("streamer", None)
    tidar_kw = {k: kwargs.pop(k) for k in TIDAR_KWARGS if k in kwargs}
    want_stats = kwargs.pop("tidar_stats", False)
    if not isinstance(want_stats, bool):
        raise TypeError(f"tidar_stats must be True or False, got {want_stats!r}")
    gen, max_new = _hf_length_and_tokens(self, input_ids, attention_mask, generation_config, kwargs)
    sample = bool(gen.do_sample)
    temperature = gen.temperature if sample else 0.0
    if sample and isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0.0:
        raise ValueError("do_sample=True needs temperature > 0")
    top_k = gen.top_k if sample else None
    if top_k is not None and not isinstance(top_k, bool) and isinstance(top_k, int):
        top_k = min(top_k, self.get_input_embeddings().weight.shape[0])  # as HF's TopKLogitsWarper
        top_k = None if top_k == 0 else top_k
    top_p = gen.top_p if sample else None
    if top_p is not None and not isinstance(top_p, bool) and isinstance(top_p, (int, float)) and top_p == 1.0:
        top_p = None
    eos = _token_list(gen._eos_token_tensor)
    pad = _token_list(gen._pad_token_tensor)
    res = generate(
        self,
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos,
        pad_token_id=pad[0] if pad else None,
        streamer=streamer,
        **tidar_kw,
    )
    return res if want_stats else res.sequences


__all__ = ["patched_generate", "TIDAR_KWARGS"]
