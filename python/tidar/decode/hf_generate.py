"""The drop-in ``model.generate`` of a patched model: Hugging Face's API (options, precedence, length rules,
logits processors, outputs), decoded by ``tidar.generate``.

HF's own preparation runs step for step as in ``GenerationMixin.generate`` (the merged generation config, the model
kwargs check, the inputs, the special tokens, the length rules, the processor list). HF's logits processors run
inside TiDAR's verification (``hf_processors``), so greedy output equals HF's and sampled output has HF's
distribution; HF's outputs come from ``hf_outputs``. What TiDAR cannot honour (beam search and its relatives,
assisted decoding with a second model, ...) raises a clear error instead of running something else.
``compile_config`` and static caches compile the decode steps' forward where HF's ``generate`` would
(``hf_compile``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tidar.decode.args import check_input_ids, token_ids
from tidar.decode.decoder import generate

# Generation options TiDAR refuses: option -> (the value that means "off", what it is).
_DECODING_ONLY = "TiDAR runs greedy and sampling decoding only"
_REFUSED = {
    "num_beams": (1, f"beam search; {_DECODING_ONLY}"),
    "num_beam_groups": (1, f"group beam search; {_DECODING_ONLY}"),
    "penalty_alpha": (None, f"contrastive search; {_DECODING_ONLY}"),
    "force_words_ids": (None, f"constrained beam search; {_DECODING_ONLY}"),
    "constraints": (None, f"constrained beam search; {_DECODING_ONLY}"),
    "guidance_scale": (None, "classifier-free guidance: a second, unconditional forward per token"),
    "watermarking_config": (None, "watermarking: its processors keep state across HF's one-token steps"),
    "dola_layers": (None, f"DoLa decoding; {_DECODING_ONLY}"),
    "use_mtp": (None, "multi-token prediction heads: TiDAR drafts with its own [MASK] blocks"),
}
# generate() arguments TiDAR refuses, with what they are.
_REFUSED_KWARGS = {
    "assistant_model": "assisted decoding with a second model",
    "assistant_tokenizer": "assisted decoding with a second model",
    "prefix_allowed_tokens_fn": "prefix-constrained decoding",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "custom_generate": "a custom decoding loop",
}
# Cache implementations TiDAR honours: its own cache is preallocated for the whole request (static by construction),
# so "static" and the model defaults that only describe the layer layout are what it runs anyway.
_CACHES = (None, "dynamic", "static", "hybrid", "sliding_window")
# Model kwargs the drop-in generate takes (beyond them, HF's own check names what the model does not take).
_MODEL_KWARGS = ("attention_mask", "use_cache", "input_ids", "inputs_embeds", "position_ids", "logits_to_keep")
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")  # model kwargs in transformers 5.x, config fields before
TIDAR_KWARGS = ("draft_len", "beta", "generator", "backend", "seed", "proposal_levels", "context_drafts", "full_logits")
# HF's sampling warpers that TiDAR's sampler applies itself (temperature, top-k, top-p): without any other
# processor, the lean sampling path runs them.
_KERNEL_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")


def _refuse(kwargs, synced_gpus) -> None:
    for k, what in _REFUSED_KWARGS.items():
        if kwargs.get(k) is not None:
            raise ValueError(
                f"TiDAR generate does not support {k}= ({what}); call tidar.unpatch(model) for plain HF generate"
            )
    if synced_gpus:
        raise ValueError("TiDAR generate does not support synced_gpus=True (one process decodes its own batch)")


def _check_options(gen) -> None:
    """Refuse what TiDAR cannot honour, naming the option and what it is."""
    for k, (off, what) in _REFUSED.items():
        v = getattr(gen, k, off)
        if v is None or v == off or (k == "guidance_scale" and v == 1):
            continue
        raise ValueError(
            f"TiDAR generate cannot honour {k}={v!r} ({what}); leave it unset, or call tidar.unpatch(model) for "
            "plain HF generate"
        )
    if gen.cache_implementation not in _CACHES:
        raise ValueError(
            f"TiDAR generate cannot honour cache_implementation={gen.cache_implementation!r}: it decodes with its own "
            f"preallocated cache on the model's device (accepted: {', '.join(repr(c) for c in _CACHES)})"
        )
    mode = getattr(gen.get_generation_mode(None), "value", None)
    lookup = gen.prompt_lookup_num_tokens is not None  # prompt lookup: TiDAR's context drafts do that job
    if mode not in ("greedy_search", "sample") and not (mode == "assisted_generation" and lookup):
        raise ValueError(f"TiDAR generate runs greedy or sampling decoding only, not {mode}")


def _eos_without_negatives(value):
    """HF's "never stop" idiom: negative EOS ids (``eos_token_id=-1``) match no token; they are dropped."""
    if isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool:
        return value[value >= 0] if value.dim() == 1 else (value if value >= 0 else None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, (list, tuple)):
        return [x for x in value if not (isinstance(x, int) and not isinstance(x, bool) and x < 0)]
    return value


def _prompt(model, inputs, gen, model_kwargs):
    """``(input_ids, inputs_embeds, model_kwargs)`` as HF prepares them: ``inputs`` / ``input_ids`` / a BOS row when
    none are given; with ``inputs_embeds``, HF's ``input_ids`` are the ones given with them or an empty ``[B, 0]``
    (the output then holds the new tokens only)."""
    ids, name, model_kwargs = model._prepare_model_inputs(inputs, gen.bos_token_id, model_kwargs)
    if name != "inputs_embeds":
        check_input_ids(ids)
        return ids, None, model_kwargs
    embeds = ids
    ids = model_kwargs.pop("input_ids")
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[1] == 0:
        raise ValueError(f"inputs_embeds must be a tensor [B, P >= 1, hidden], got {getattr(embeds, 'shape', embeds)}")
    if ids.shape[1] not in (0, embeds.shape[1]) or ids.shape[0] != embeds.shape[0]:
        raise ValueError(
            f"input_ids {tuple(ids.shape)} given with inputs_embeds {tuple(embeds.shape)} must be their token ids "
            "(the same batch and length)"
        )
    return ids, embeds, model_kwargs


def _attention_mask(model, ids, gen, given):
    """The caller's mask, else HF's (inferred from pad tokens; none for an embeddings prompt, ``ids`` empty); None
    when nothing is padded."""
    mask = given
    if mask is None and ids.shape[1] > 0:
        mask = model._prepare_attention_mask_for_generation(ids, gen, {"input_ids": ids})
    if mask is not None and bool((mask == 1).all()):
        return None
    return mask


def _custom_positions(position_ids, ids, mask):
    """The caller's ``position_ids`` ``[B, P]`` where they differ from HF's own (derived from the mask) on a token
    the mask keeps, else None (TiDAR computes those). Taken for rows whose last column is a token; refused on a
    right-padded row, whose new tokens HF places from its last, masked column."""
    if position_ids is None:
        return None
    from tidar.decode.hf_outputs import hf_positions

    B, P = ids.shape
    shape = tuple(getattr(position_ids, "shape", ()))
    if not isinstance(position_ids, torch.Tensor) or len(shape) != 2 or shape[1] != P or shape[0] not in (1, B):
        raise ValueError(f"position_ids must be a tensor [batch, prompt length] = {(B, P)} or [1, {P}], got {shape}")
    m = torch.ones_like(ids) if mask is None else mask
    want = hf_positions(m).to(position_ids.device)
    given = position_ids.expand(B, -1).to(torch.long)
    if torch.equal(given.masked_fill(m == 0, 0), want):
        return None
    if bool((m[:, -1] == 0).any()):
        raise ValueError(
            "position_ids other than HF's own cannot be combined with a right-padded row (attention_mask 0 in the "
            "last column): TiDAR decodes such rows as HF does, from positions HF derives from the mask"
        )
    return given


def _check_cache(cache, prompt_len: int) -> None:
    """A cache from an earlier ``generate`` holds the keys and values of a prefix of ``input_ids``: TiDAR's
    prefill recomputes them (the same values), so the cache is accepted and not read."""
    if cache is None:
        return
    n = cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
    if n is None:
        raise TypeError(f"past_key_values must be a transformers Cache, got {type(cache).__name__}")
    if n >= prompt_len:
        raise ValueError(
            f"past_key_values holds {n} positions but the prompt only {prompt_len}: give the whole sequence "
            "(the cached prefix and the new tokens), as HF's generate expects"
        )


def _lengths(model, ids, generation_config, kwargs, gen, embeds=None):
    """HF's length rules (``max_new_tokens`` over ``max_length``; the default of 20 new tokens, capped at
    ``max_position_embeddings``) with HF's warnings and errors. Returns the generation config."""
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
    P = ids.shape[1]
    gen = model._prepare_generated_length(
        generation_config=gen,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids" if embeds is None else "inputs_embeds",
        inputs_tensor=ids if embeds is None else embeds,
        input_ids_length=P,
    )
    model._validate_generated_length(gen, P, has_default_max_length)
    return gen


def _sequences(ids, res, pad: int | None):
    """HF's ``sequences``: the prompt as given, then each row's new tokens, ``pad`` after a row stopped."""
    width = max(map(len, res.new_tokens))
    fill = 0 if pad is None else pad
    new = torch.full((ids.shape[0], width), fill, dtype=ids.dtype, device=ids.device)
    for b, toks in enumerate(res.new_tokens):
        new[b, : len(toks)] = torch.tensor(toks, dtype=ids.dtype)
    return torch.cat([ids, new], 1)


def _token_list(t):
    if t is None:
        return None
    return [int(x) for x in t.reshape(-1).tolist() if int(x) >= 0]


def _sampling_args(model, gen):
    """(temperature, top_k, top_p) for TiDAR's own sampler, as HF's warpers take them."""
    if not gen.do_sample:
        return 0.0, None, None
    temperature = gen.temperature
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0.0:
        raise ValueError("do_sample=True needs temperature > 0")
    top_k = gen.top_k
    if top_k is not None and not isinstance(top_k, bool) and isinstance(top_k, int):
        top_k = min(top_k, model.get_input_embeddings().weight.shape[0])  # as HF's TopKLogitsWarper
        top_k = None if top_k == 0 else top_k
    top_p = gen.top_p
    if top_p is not None and not isinstance(top_p, bool) and isinstance(top_p, (int, float)) and top_p == 1.0:
        top_p = None
    return temperature, top_k, top_p


def _stopping(model, gen, user_criteria, tokenizer):
    """HF's stopping criteria when any goes beyond what TiDAR stops on itself (EOS, the length): a caller's
    ``stopping_criteria``, ``stop_strings`` (with ``tokenizer``) or ``max_time``; else None."""
    if not user_criteria and gen.stop_strings is None and gen.max_time is None:
        return None
    from transformers import StoppingCriteriaList

    return model._get_stopping_criteria(gen, user_criteria or StoppingCriteriaList(), tokenizer)


def _verifier(model, gen, ids, mask, user_processors, tokens, embeds, stopping=None):
    """An ``HfVerifier`` when HF's processor list holds more than TiDAR's sampler applies itself, scores / logits
    are to be returned, a row is right-padded or stopping criteria are given; else None (the lean path)."""
    from tidar.decode.hf_processors import HfVerifier, right_padding, row_processors

    full = model._get_logits_processor(
        generation_config=gen,
        input_ids_seq_length=ids.shape[1],
        encoder_input_ids=ids,
        logits_processor=user_processors,
        device=ids.device,
        model_kwargs={"attention_mask": mask},
    )
    record = bool(gen.return_dict_in_generate and (gen.output_scores or gen.output_logits))
    first, offset = right_padding(model, tokens, mask, embeds)
    if not record and not first and stopping is None and all(type(p).__name__ in _KERNEL_WARPERS for p in full):
        return None
    rows = row_processors(model, gen, ids, mask, user_processors)
    temperature = gen.temperature if gen.do_sample and isinstance(gen.temperature, (int, float)) else 1.0
    return HfVerifier(
        rows,
        ids.tolist(),
        sample=bool(gen.do_sample),
        draft_temperature=temperature,
        record=record,
        first_logits=first,
        pos_offset=offset,
        stopping=stopping,
        pad_stopped=gen._eos_token_tensor is not None,
    )


@dataclass
class _Call:
    """What one drop-in ``generate`` call decodes: HF's generation config, HF's ``input_ids`` (``ids``; empty under an
    embeddings-only prompt), the ids TiDAR carries for the prompt (``tokens``: ``ids``, or placeholders under
    ``embeds``), the mask, and the arguments that are not HF generation options."""

    gen: object = None
    ids: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # the caller's position_ids where they are not HF's own
    flags: dict = field(default_factory=dict)  # output_attentions / output_hidden_states
    streamer: object = None
    processors: object = None  # the caller's logits_processor
    criteria: object = None  # the caller's stopping_criteria
    tokenizer: object = None
    cache: object = None  # past_key_values / cache
    tidar_kw: dict = field(default_factory=dict)
    want_stats: bool = False


def _pop_arguments(kwargs) -> _Call:
    """Take the arguments that are not HF generation options out of ``kwargs``."""
    call = _Call(
        streamer=kwargs.pop("streamer", None),
        processors=kwargs.pop("logits_processor", None),
        criteria=kwargs.pop("stopping_criteria", None),
        tokenizer=kwargs.pop("tokenizer", None),
        cache=kwargs.pop("cache", None),
        tidar_kw={k: kwargs.pop(k) for k in TIDAR_KWARGS if k in kwargs},
        want_stats=kwargs.pop("tidar_stats", False),
    )
    if call.cache is None:
        call.cache = kwargs.pop("past_key_values", None)
    if not isinstance(call.want_stats, bool):
        raise TypeError(f"tidar_stats must be True or False, got {call.want_stats!r}")
    if "eos_token_id" in kwargs:
        kwargs["eos_token_id"] = _eos_without_negatives(kwargs["eos_token_id"])
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):  # before HF's config checks, which fail obscurely
        if kwargs.get(k) is not None:
            token_ids(k, _eos_without_negatives(kwargs[k]) if k == "pad_token_id" else kwargs[k])
    return call


def _prepare(model, call: _Call, inputs, generation_config, kwargs) -> None:
    """HF's preparation, step for step as in ``GenerationMixin.generate``: the merged config, the model kwargs
    check, the inputs, the special tokens, the mask, ``num_return_sequences`` and the length rules."""
    gen, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    model._validate_model_kwargs(model_kwargs.copy())  # HF's error for arguments the model does not take
    extra = sorted(set(model_kwargs) - set(_MODEL_KWARGS) - set(_OUTPUT_FLAGS))
    if extra:
        raise ValueError(f"TiDAR generate does not support {extra}; call tidar.unpatch(model) for plain HF generate")
    _check_options(gen)
    call.flags = {k: bool(model_kwargs.pop(k, None) or getattr(gen, k, False)) for k in _OUTPUT_FLAGS}
    position_ids = model_kwargs.pop("position_ids", None)
    given_mask = model_kwargs.pop("attention_mask", None)
    if given_mask is not None:
        model_kwargs["attention_mask"] = given_mask  # HF takes the batch size from it when no prompt is given
    ids, embeds, model_kwargs = _prompt(model, inputs, gen, model_kwargs)
    gen.eos_token_id = _eos_without_negatives(gen.eos_token_id)
    token_ids("eos_token_id", gen.eos_token_id)  # HF would fail deep inside torch.tensor on a str or float
    token_ids("bos_token_id", gen.bos_token_id)
    if gen.pad_token_id is not None:  # a negative pad id (HF fills stopped rows with it) is taken as HF takes it
        token_ids("pad_token_id", _eos_without_negatives(gen.pad_token_id))
    model._prepare_special_tokens(gen, given_mask is not None, device=ids.device, batch_size=ids.shape[0])
    tokens = ids
    if embeds is not None and ids.shape[1] == 0:
        tokens = torch.zeros(embeds.shape[:2], dtype=torch.long, device=ids.device)
    mask = _attention_mask(model, ids, gen, given_mask)
    positions = _custom_positions(position_ids, tokens, mask)
    _check_cache(call.cache, tokens.shape[1])
    n = gen.num_return_sequences or 1
    if n > 1:  # as HF: each prompt repeated, rows of one prompt next to each other
        ids, tokens = ids.repeat_interleave(n, 0), tokens.repeat_interleave(n, 0)
        mask = None if mask is None else mask.repeat_interleave(n, 0)
        embeds = None if embeds is None else embeds.repeat_interleave(n, 0)
        positions = None if positions is None else positions.repeat_interleave(n, 0)
    call.gen = _lengths(model, ids, generation_config, kwargs, gen, embeds)
    call.ids, call.tokens, call.embeds, call.mask, call.positions = ids, tokens, embeds, mask, positions
    if gen.prompt_lookup_num_tokens is not None:
        call.tidar_kw.setdefault("context_drafts", True)  # prompt lookup = TiDAR's context drafts


def patched_generate(self, inputs=None, generation_config=None, **kwargs):
    """``model.generate`` after ``tidar.patch``: greedy or sampling decoding through TiDAR, with HF's own
    argument handling, logits processors, stopping rules and outputs. Beam search and its relatives and assisted
    decoding with a second model raise a clear error. Extra TiDAR options: ``draft_len``, ``beta``, ``generator``,
    ``seed``, ``proposal_levels``, ``context_drafts``, ``full_logits``, ``tidar_stats`` (True returns the full
    ``TidarGenerateOutput``)."""
    _refuse(kwargs, kwargs.pop("synced_gpus", None))
    if generation_config is not None:
        from transformers import GenerationConfig

        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(
                f"generation_config must be a transformers GenerationConfig, got {type(generation_config).__name__}"
            )
    call = _pop_arguments(kwargs)
    _prepare(self, call, inputs, generation_config, kwargs)
    gen, ids = call.gen, call.ids
    stopping = _stopping(self, gen, call.criteria, call.tokenizer)
    verifier = _verifier(self, gen, ids, call.mask, call.processors, call.tokens, call.embeds, stopping)
    if verifier is not None and call.tidar_kw.get("beta", 1.0) != 1.0:
        raise ValueError(
            f"beta={call.tidar_kw['beta']!r} (the inexact diffusion mix) cannot be combined with HF's logits "
            "processors, score outputs, stopping rules or a right-padded prompt: they verify against HF's own "
            "target (beta=1)"
        )
    compiled = _compiled(self, gen, call)
    res, pad = _decode(self, call, verifier, compiled, max_new=gen.max_length - ids.shape[1])
    if verifier is not None and verifier.limit is not None:  # rows ran past the step the last row stopped at
        res.new_tokens = [t[: verifier.limit] for t in res.new_tokens]
    sequences = _sequences(ids, res, pad)
    if verifier is not None:
        verifier.keep_emitted([len(t) for t in res.new_tokens])
    if call.want_stats:
        res.sequences = sequences
        return res
    if not gen.return_dict_in_generate and call.cache is None:
        return sequences
    from tidar.decode.hf_outputs import hf_output

    out = hf_output(  # also fills a caller's past_key_values with the whole sequence, as HF's generate does
        self,
        gen,
        sequences,
        call.mask,
        verifier,
        prompt=call.tokens,
        hf_prompt_len=ids.shape[1],
        prompt_embeds=call.embeds,
        tidar_result=res,
        want_cache=gen.use_cache is not False,
        given_cache=call.cache,
        positions=call.positions,
        **(call.flags if gen.return_dict_in_generate else {}),
    )
    return out if gen.return_dict_in_generate else sequences


def _compiled(model, gen, call: _Call):
    """HF's compiled forward when HF's ``generate`` would compile it (``hf_compile``: ``compile_config``, a static
    cache), else None; the decode steps then take the compiled forward's logits (``full_logits``)."""
    from tidar.decode.hf_compile import compiled_call

    compiled = compiled_call(model, gen, call.cache)
    if compiled is not None:
        if call.tidar_kw.get("full_logits", True) is not True:
            raise ValueError(
                f"full_logits={call.tidar_kw['full_logits']!r} cannot be combined with a compiled forward "
                "(compile_config, or a static cache HF compiles for): the decode steps take the compiled model "
                "forward's logits"
            )
        call.tidar_kw["full_logits"] = True
    return compiled


def _decode(model, call: _Call, verifier, compiled, max_new: int):
    """``tidar.generate`` on the prompts as TiDAR takes them (``hf_inputs.compact``; an embeddings prompt through
    ``hf_inputs.PromptEmbeds``, the caller's positions through ``hf_inputs.PromptPositions``), with HF's sampling
    settings and special tokens, its decode steps through ``compiled`` when given (``hf_compile.CompiledSteps``).
    Returns ``(result, pad id)``."""
    from contextlib import ExitStack

    from tidar.decode.hf_inputs import PromptEmbeds, PromptPositions, compact

    gen, tokens, mask, embeds = call.gen, call.tokens, call.mask, call.embeds

    temperature, top_k, top_p = _sampling_args(model, gen)
    if verifier is not None and verifier.sample:  # HF's warpers are in the processed scores
        temperature, top_k, top_p = 1.0, None, None
    eos = _token_list(gen._eos_token_tensor)
    pad = None if gen._pad_token_tensor is None else int(gen._pad_token_tensor.reshape(-1)[0])
    tidar_pad = pad if pad is not None and pad >= 0 else None
    prompts, prompt_mask, prompt_embeds = compact(tokens, mask, tidar_pad or 0, embeds)
    with ExitStack() as stack:
        if embeds is not None:
            stack.enter_context(PromptEmbeds(model, prompt_embeds, prompt_mask))
        positions = None
        if call.positions is not None:  # after PromptEmbeds, which reads TiDAR's own positions
            positions = stack.enter_context(PromptPositions(model, call.positions, mask))
        if compiled is not None:
            from tidar.decode.hf_compile import CompiledSteps

            stack.enter_context(CompiledSteps(model, compiled, positions))
        res = generate(
            model,
            prompts,
            attention_mask=prompt_mask,
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos,
            pad_token_id=tidar_pad,
            streamer=call.streamer,
            verifier=verifier,
            **call.tidar_kw,
        )
    return res, pad


__all__ = ["patched_generate", "TIDAR_KWARGS"]
