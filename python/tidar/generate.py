"""TiDAR generation (design.md 1.3): one forward per step drafts K tokens and verifies the previous K.

Exact: with beta = 1, greedy output equals the model's AR greedy output token for token, and sampling
has the AR distribution (speculative sampling with the diffusion drafts as proposals).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

import tidar_kernels
from tidar_kernels import layouts

from .attention import TidarStep, tidar_forward
from .cache import TidarCache
from .patch import settings


@dataclass
class TidarGenerateOutput:
    sequences: torch.Tensor  # [B, P + new]: the prompt as given (left padding kept), then the new tokens
    forwards: int  # model forwards run (prefill included)
    tokens_per_forward: float  # new tokens / forwards, per row, averaged over rows
    accepted_histogram: dict = field(default_factory=dict)  # a (1..K) -> number of (row, step) pairs
    new_tokens: list = field(default_factory=list)  # per row: the generated token ids (no padding)
    cache: TidarCache | None = None  # per row, the committed K/V: a prefix of (prompt + new tokens)


def _prompt_rows(input_ids, attention_mask):
    """Per-row prompt token lists, checking HF-style left padding."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, P], got {getattr(input_ids, 'shape', input_ids)!r}")
    B, P = input_ids.shape
    if B == 0 or P == 0:
        raise ValueError(f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return [input_ids[b].tolist() for b in range(B)]
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, P):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, P)}, got {getattr(attention_mask, 'shape', None)}")
    rows = []
    for b in range(B):
        m = attention_mask[b].tolist()
        n = int(sum(m))
        if n == 0:
            raise ValueError(f"attention_mask row {b} is all padding: every prompt needs at least one token")
        if m != [0] * (P - n) + [1] * n:
            raise ValueError("attention_mask must be 0/1 with left padding (pad tokens first), as for HF generate")
        rows.append(input_ids[b, P - n :].tolist())
    return rows


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    draft_len: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beta: float = 1.0,
    eos_token_id=None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    backend: str | None = None,
    seed: int | None = None,
) -> TidarGenerateOutput:
    """Decode with TiDAR. ``model`` must be patched (``tidar.patch``).

    Args:
        input_ids / attention_mask: ``[B, P]`` prompts, left-padded as for HF ``generate``.
        max_new_tokens: new tokens per row (fewer when the row emits ``eos_token_id``).
        draft_len: K (default: the patch's). temperature 0 = greedy.
        top_k, top_p: sampling filters, applied to targets and drafts alike.
        beta: 1.0 (default) is exact; < 1 mixes the diffusion logits into the target ("trust diffusion"),
            which is faster to accept but no longer the AR distribution.
        eos_token_id: an int or a list; a row stops after emitting one. pad_token_id fills finished rows.
        generator: torch.Generator for sampling (reproducible); streamer: an HF streamer (batch 1).
        seed: instead of ``generator``, Philox4x32-10 counter-based sampling (the same tokens on every backend
            and device): the prefill uses offset 0 and each step advances the offset by B * 2K.
    """
    s = settings(model)
    K = s.draft_len if draft_len is None else draft_len
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"draft_len must be an int >= 1, got {K!r}")
    max_draft = getattr(model.config, "max_position_embeddings", None)
    if max_draft is not None and K + K * K > max_draft:
        raise ValueError(f"draft_len {K} is too large: a step of {K + K * K} tokens exceeds max_position_embeddings {max_draft}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    backend = s.backend if backend is None else backend
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = set(eos_list)
    if pad_token_id is None:  # as HF: pad finished rows with the (first) EOS token
        pad_token_id = eos_list[0] if eos_list else 0
    prompts = _prompt_rows(input_ids, attention_mask)
    B = len(prompts)
    if streamer is not None and B != 1:
        raise ValueError("a streamer needs batch size 1")
    vocab = model.get_input_embeddings().weight.shape[0]
    for ids in prompts:
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab})")
    device = model.get_input_embeddings().weight.device
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, beta=beta, generator=generator, backend=backend)
    tidar_kernels.check_sampling_args(temperature, top_k, top_p, beta, vocab)  # fail before any work
    if generator is not None and generator.device != device:
        raise ValueError(f"generator must be on the model's device {device}, got {generator.device}")
    if seed is not None:
        if generator is not None:
            raise ValueError("give either generator or seed, not both")
        del sample_kw["generator"]
        sample_kw.update(seed=seed, offset=0)

    step_layout = layouts.decode_step(K).to(device)
    S = step_layout.seg_len
    cache = TidarCache(B, max(map(len, prompts)) + max_new_tokens + S, backend=backend)

    # Prefill: prompt (causal) + one block of K masks. Rows of different lengths run one by one.
    drafts, probs = _prefill(model, prompts, K, s.mask_token_id, cache, device, sample_kw)
    forwards = 1 if len(set(map(len, prompts))) == 1 else B
    row_forwards = [1] * B
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    hist: Counter = Counter()

    def emit(b, tokens):
        for t in tokens:
            out[b].append(t)
            if t in eos or len(out[b]) >= max_new_tokens:
                done[b] = True
                break

    first = drafts[:, 0].tolist()
    for b in range(B):
        emit(b, [first[b]])
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(out[0]))

    masks = torch.full((B, K * K), s.mask_token_id, dtype=torch.long, device=device)
    while not all(done):
        seg_start = cache.seq_lengths(device)
        ids = torch.cat([drafts, masks], 1)
        pos = seg_start.long()[:, None] + step_layout.position_ids[None]
        cache.check_room(S)
        logits = tidar_forward(model, ids, pos, TidarStep(step_layout, seg_start, cache, backend)).logits
        forwards += 1
        V = logits.shape[-1]
        if seed is not None:  # Philox: every step draws fresh counters
            sample_kw["offset"] += B * 2 * K
        r = tidar_kernels.rejection_sample(
            logits[:, :K], logits[:, K:].reshape(B, K, K, V), drafts, probs, **sample_kw
        )
        accepted = r.accepted.tolist()
        new_first = r.next_drafts[:, 0].tolist()
        before = [len(o) for o in out]
        for b in range(B):
            if done[b]:
                accepted[b] = 0  # finished rows ride along without committing
                continue
            row_forwards[b] += 1
            hist[accepted[b]] += 1
            emit(b, drafts[b, 1 : accepted[b]].tolist() + [new_first[b]])
            # Commit d_0..d_{a-1}; a row that stopped mid-step keeps only the drafts it emitted.
            accepted[b] = min(accepted[b], len(out[b]) - before[b] + 1)
        if streamer is not None and len(out[0]) > before[0]:
            streamer.put(torch.tensor(out[0][before[0] :]))
        cache.commit(accepted)
        drafts, probs = r.next_drafts, r.next_draft_probs
    if streamer is not None:
        streamer.end()

    width = max(map(len, out))
    new = torch.full((B, width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for b, o in enumerate(out):
        new[b, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    tpf = sum(len(o) / f for o, f in zip(out, row_forwards)) / B
    return TidarGenerateOutput(torch.cat([input_ids, new], 1), forwards, tpf, dict(sorted(hist.items())), out, cache)


def _prefill(model, prompts, K, mask_id, cache, device, sample_kw):
    """Run the prefill forward(s) and return the first drafts ``[B, K]`` and their distributions."""
    lengths = list(map(len, prompts))
    if len(set(lengths)) == 1:
        groups = [(list(range(len(prompts))), cache)]
    else:
        groups = [([b], cache.row(b)) for b in range(len(prompts))]
    ar, blocks = [], []
    for rows, target in groups:
        n = lengths[rows[0]]
        layout = layouts.prefill(n, K).to(device)
        ids = torch.tensor([prompts[b] + [mask_id] * K for b in rows], dtype=torch.long, device=device)
        pos = layout.position_ids[None].expand(len(rows), -1)
        seg_start = torch.zeros(len(rows), dtype=torch.int32, device=device)
        logits = tidar_forward(model, ids, pos, TidarStep(layout, seg_start, target, sample_kw["backend"])).logits
        ar.append(logits[:, n - 1])
        blocks.append(logits[:, n:])
    r = tidar_kernels.draft_sample(torch.cat(ar), torch.cat(blocks), **sample_kw)
    cache.commit(lengths)
    return r.next_drafts, r.next_draft_probs


# ----------------------------------------------------------------------------------------------------
# Drop-in model.generate

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
    tidar_kw = {k: kwargs.pop(k) for k in ("draft_len", "beta", "generator", "backend", "seed") if k in kwargs}
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


__all__ = ["generate", "patched_generate", "TidarGenerateOutput"]
