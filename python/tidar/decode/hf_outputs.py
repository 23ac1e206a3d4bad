"""Hugging Face's ``generate`` outputs from a TiDAR decode: ``GenerateDecoderOnlyOutput`` with ``sequences``,
``scores`` / ``logits`` (the verification rows that chose each emitted token), and ``attentions``,
``hidden_states`` and the ``cache`` (``past_key_values``) in HF's format.

The cache holds the positions ``[0, L - 1)`` of the ``L``-token sequences, as HF's, so a later ``generate``
continues from it. It is built from the TiDAR cache's committed prefix (``from_tidar_cache``: the committed keys
and values are exactly what AR decoding caches) when the TiDAR rows are HF's rows shifted past their left padding.
Otherwise (attentions or hidden states asked for, a static cache, rows that stopped early, which HF keeps feeding
pad tokens, other masks) the outputs come from plain forwards of the finished sequences shaped as HF's loop runs
them (``replay``), with HF's mask and positions: every emitted token's AR context is exactly the prefix before it,
so the attention rows, hidden states and keys/values are those HF's loop produces (up to floating-point summation
order).
"""

from __future__ import annotations

import torch


def step_tensors(per_row: list, steps: int, vocab: int, device) -> tuple | None:
    """``steps`` tensors ``[B, V]`` (HF's per-step ``scores`` / ``logits``) from per-row lists of ``[V]``
    rows. A row that stopped before a step (HF keeps feeding it pad tokens) has zeros there."""
    if steps == 0:
        return ()
    out = []
    for t in range(steps):
        rows = [r[t] if t < len(r) else torch.zeros(vocab, device=device) for r in per_row]
        out.append(torch.stack(rows))
    return tuple(out)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """HF's position ids for a left-padded mask: the count of real tokens before each one (0 on padding)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@torch.no_grad()
def replay(
    model,
    sequences,
    prompt_mask,
    *,
    attentions: bool,
    hidden_states: bool,
    cache,
    prompt_len: int,
    use_cache=True,
    prompt_embeds=None,
    positions=None,
):
    """Plain forwards of ``sequences[:, :-1]`` with HF's mask (the prompt's, then ones) and positions, shaped as
    HF's loop runs them: the prompt, then the generated tokens but the last (one forward on the cache: a token's
    attention and hidden state depend only on the prefix before it). Returns ``(attentions, hidden_states,
    cache)`` per generated step as HF returns them: step 0 covers the prompt (queries ``[0, P)``), step t >= 1
    the one query at ``P + t - 1``."""
    B, L = sequences.shape
    P = prompt_len
    mask = torch.ones(B, L - 1, dtype=torch.long, device=sequences.device)
    if prompt_mask is not None:
        mask[:, :P] = prompt_mask
    pos = hf_positions(mask)
    if positions is not None:  # the caller's position_ids (hf_inputs.PromptPositions)
        pos[:, :P] = positions
    pos[:, P:] = pos[:, P - 1 : P] + 1 + torch.arange(L - 1 - P, device=pos.device)  # HF: one past the previous
    if not use_cache:  # HF's loop without a cache runs the whole sequence at every step
        return _uncached(model, sequences[:, :-1], mask, pos, attentions, hidden_states, P, prompt_embeds)
    flags = dict(output_attentions=attentions, output_hidden_states=hidden_states, use_cache=True)
    if cache is None:
        cache = new_cache(model, None, B, L)
    arg = _cache_arg(model)
    inputs = dict(input_ids=sequences[:, :P]) if prompt_embeds is None else dict(inputs_embeds=prompt_embeds)
    first = model(**inputs, attention_mask=mask[:, :P], position_ids=pos[:, :P], **{arg: cache}, **flags)
    rest = None
    if L - 1 > P:
        rest = model(
            input_ids=sequences[:, P : L - 1], attention_mask=mask, position_ids=pos[:, P:], **{arg: cache}, **flags
        )
    steps = L - P
    static = bool(getattr(cache, "is_compileable", False))  # HF's attentions then span the whole static cache
    att = (
        _per_step(first.attentions, rest and rest.attentions, steps, P, keys=None if static else True)
        if attentions
        else None
    )
    hid = _per_step(first.hidden_states, rest and rest.hidden_states, steps, P, keys=False) if hidden_states else None
    return att, hid, cache


def _uncached(model, ids, mask, pos, attentions, hidden_states, P, prompt_embeds=None):
    """Per-step outputs of HF's loop without a cache: step t covers the whole sequence so far (``P + t`` rows and
    keys), taken from one forward of the whole sequence (a token depends only on the tokens before it)."""
    inputs = dict(input_ids=ids)
    if prompt_embeds is not None:
        emb = model.get_input_embeddings()(ids)
        inputs = dict(inputs_embeds=torch.cat([prompt_embeds.to(emb.dtype), emb[:, P:]], 1))
    out = model(
        **inputs,
        attention_mask=mask,
        position_ids=pos,
        use_cache=False,
        output_attentions=attentions,
        output_hidden_states=hidden_states,
    )
    steps = ids.shape[1] + 1 - P
    att = tuple(tuple(x[:, :, : P + t, : P + t] for x in out.attentions) for t in range(steps)) if attentions else None
    hid = tuple(tuple(x[:, : P + t] for x in out.hidden_states) for t in range(steps)) if hidden_states else None
    return att, hid, None


def _per_step(first, rest, steps: int, P: int, *, keys: bool | None) -> tuple:
    """HF's per-step tuples: step 0 the prompt forward's per-layer tensors, step t >= 1 row t - 1 of the rest's
    (attention weights ``[B, H, 1, P + t]``: the keys the step's query saw, or all of a static cache's keys with
    ``keys=None``; hidden states ``[B, 1, hidden]``)."""
    res = [tuple(first)]
    for t in range(1, steps):
        if keys:
            res.append(tuple(x[:, :, t - 1 : t, : P + t] for x in rest))
        elif keys is None:
            res.append(tuple(x[:, :, t - 1 : t] for x in rest))
        else:
            res.append(tuple(x[:, t - 1 : t] for x in rest))
    return tuple(res)


def _cache_arg(model) -> str:
    """The forward's cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def from_tidar_cache(model, result, prompt_mask, P: int, steps: int, into=None):
    """HF's ``DynamicCache`` (or ``into``, a caller's cache, refilled) of the ``P + steps - 1`` positions HF's loop
    caches, built from the TiDAR cache's committed prefix (no forward), when the TiDAR rows are HF's rows shifted
    past their left padding: every row emitted ``steps`` tokens (HF feeds a stopped row pad tokens TiDAR never ran)
    and the mask is left padding only. Padding positions hold zeros (HF's hold the pad tokens' keys; the mask hides
    both). None otherwise."""
    if result is None or result.cache is None or not result.cache.keys:
        return None
    if any(len(t) != steps for t in result.new_tokens):
        return None
    if prompt_mask is not None:
        m = prompt_mask.bool()
        if not bool((m == m.cummax(1).values).all()):
            return None
    from transformers import DynamicCache

    B = len(result.new_tokens)
    lengths = [P] * B if prompt_mask is None else [int(x) for x in prompt_mask.sum(1).tolist()]
    L = P + steps - 1
    if any(result.cache.lengths[b] < n + steps - 1 for b, n in enumerate(lengths)):
        return None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True)) if into is None else into
    cache.reset()  # a caller's cache: refilled with the whole sequence (its prefix was recomputed)
    for layer, (k, v) in enumerate(zip(result.cache.keys, result.cache.values)):
        keys = k.new_zeros(B, k.shape[1], L, k.shape[3])
        values = v.new_zeros(B, v.shape[1], L, v.shape[3])
        for b, n in enumerate(lengths):
            keys[b, :, P - n :] = k[b, :, : n + steps - 1]
            values[b, :, P - n :] = v[b, :, : n + steps - 1]
        cache.update(keys, values, layer)
    return cache


def new_cache(model, gen, batch: int, max_len: int):
    """The cache HF's ``generate`` would return: a ``StaticCache`` for ``cache_implementation="static"``, else a
    ``DynamicCache``."""
    from transformers import DynamicCache, StaticCache

    cfg = model.config.get_text_config(decoder=True)
    if gen is not None and gen.cache_implementation == "static":
        return StaticCache(config=cfg, max_cache_len=max_len)
    return DynamicCache(config=cfg)


def hf_output(
    model,
    gen,
    sequences,
    prompt_mask,
    verifier,
    *,
    prompt,
    hf_prompt_len: int,
    prompt_embeds=None,
    tidar_result=None,
    want_cache: bool,
    given_cache=None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    positions=None,
):
    """HF's ``GenerateDecoderOnlyOutput`` for the TiDAR result ``sequences`` (HF's ``hf_prompt_len`` input ids, then
    the new tokens) of ``prompt`` (the ids TiDAR decoded; placeholders under ``prompt_embeds``). A caller's cache
    (``given_cache``) is filled with the sequence and returned, as HF's ``generate`` fills and returns it."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    B, L = sequences.shape
    steps = L - hf_prompt_len
    prompt_len = prompt.shape[1]
    vocab = model.get_input_embeddings().weight.shape[0]
    dev = sequences.device
    record = gen.return_dict_in_generate  # else only the caller's cache is filled
    scores = step_tensors(verifier.scores, steps, vocab, dev) if record and gen.output_scores else None
    logits = step_tensors(verifier.logits, steps, vocab, dev) if record and gen.output_logits else None
    att = hid = cache = None
    if want_cache and not (output_attentions or output_hidden_states) and gen.cache_implementation != "static":
        cache = from_tidar_cache(model, tidar_result, prompt_mask, prompt.shape[1], steps, into=given_cache)
    if cache is None and (output_attentions or output_hidden_states or want_cache):
        room = gen.max_length - 1 + prompt_len - hf_prompt_len  # as HF: an embeddings prompt is not in max_length
        cache = (new_cache(model, gen, B, room) if given_cache is None else given_cache) if want_cache else None
        if cache is given_cache is not None:
            cache.reset()
        att, hid, cache = replay(
            model,
            torch.cat([prompt, sequences[:, hf_prompt_len:]], 1),
            prompt_mask,
            attentions=output_attentions,
            hidden_states=output_hidden_states,
            cache=cache,
            prompt_len=prompt_len,
            use_cache=want_cache,
            prompt_embeds=prompt_embeds,
            positions=positions,
        )
    key = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=scores, logits=logits, attentions=att, hidden_states=hid, **{key: cache}
    )


__all__ = ["hf_output", "hf_positions", "replay", "step_tensors"]
