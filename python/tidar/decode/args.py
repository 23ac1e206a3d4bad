"""Validation of ``tidar.generate``'s arguments: every bad value is a clear error naming the argument, raised
before any forward (so nothing is changed by a failed call). Returns the normalised values."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

import tidar_kernels
from tidar.decode.planner import MAX_AUTO_DRAFT_LEN  # the largest K draft_len="auto" considers
from tidar.hf.cache import cache_bytes

# The largest draft_len taken at all (tidar.patch, tidar.generate; "auto" stays within MAX_AUTO_DRAFT_LEN): a decode
# step runs up to K(K + 1) tokens a row (K drafts and a block of K masks per proposal level) and the cache keeps
# K(K + 1) positions of room a row; 64 gives 4160.
MAX_DRAFT_LEN = 64
BACKENDS = ("auto", "reference", "triton", "cuda")


@dataclass
class GenerateArgs:
    prompts: list  # per row: the prompt's token ids (left padding removed)
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    beta: float
    eos: set  # token ids that end a row
    pad_token_id: int
    device: torch.device
    vocab: int
    max_len: int | None = None  # the most positions a row may reach (settings_of(model).max_len), None: no limit known
    max_len_reason: str = ""  # which limit max_len is ("max_position_embeddings 1024", "the sliding window 64 ...")


def _is_int(x) -> bool:
    """A Python or NumPy integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be an integer tensor [B, P], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"input_ids must be an integer tensor [B, P] (int32/int64), got {input_ids.dtype} of shape "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have at least one row and one token, got shape {tuple(input_ids.shape)}")


def prompt_rows(input_ids, attention_mask):
    """Per-row prompt token lists, checking HF-style left padding."""
    check_input_ids(input_ids)
    B, P = input_ids.shape
    if attention_mask is None:
        return input_ids.tolist()
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be None or a tensor [B, P] of 0/1, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, P):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, P)}, got {tuple(attention_mask.shape)}")
    if attention_mask.is_complex():
        raise ValueError(f"attention_mask must hold 0/1, got {attention_mask.dtype}")
    if attention_mask.device != input_ids.device:
        raise ValueError(
            f"attention_mask must be on the device of input_ids {input_ids.device}, got {attention_mask.device}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    rows = []
    for b in range(B):
        m = [int(x) for x in attention_mask[b].tolist()]
        n = sum(m)
        if n == 0:
            raise ValueError(f"attention_mask row {b} is all padding: every prompt needs at least one token")
        if m != [0] * (P - n) + [1] * n:
            raise ValueError("attention_mask must be 0/1 with left padding (pad tokens first), as for HF generate")
        rows.append(input_ids[b, P - n :].tolist())
    return rows


def token_ids(name: str, value) -> list:
    """``eos_token_id``-style argument as HF takes it: None, an int (Python or NumPy), a list/tuple of ints,
    or a 0-d/1-d integer tensor. Returns a list of ints (empty for None)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.dim() > 1:
            raise TypeError(
                f"{name} must be an int, a list of ints or a 0-d/1-d integer tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        ids = [int(x) for x in value.reshape(-1).tolist()]
    elif _is_int(value):
        ids = [int(value)]
    elif isinstance(value, (list, tuple)):
        bad = [
            x
            for x in value
            if not _is_int(x)
            and not (
                isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_floating_point and x.dtype != torch.bool
            )
        ]
        if bad:
            raise TypeError(f"{name} must be an int or a list of ints, got {bad[0]!r} ({type(bad[0]).__name__}) in it")
        ids = [int(x) for x in value]
    else:
        raise TypeError(
            f"{name} must be an int, a list of ints or an integer tensor, got {value!r} ({type(value).__name__})"
        )
    neg = [i for i in ids if i < 0]
    if neg:
        raise ValueError(f"{name} must hold token ids >= 0, got {neg[0]}")
    return ids


def _pad_id(pad_token_id):
    if isinstance(pad_token_id, torch.Tensor):
        if pad_token_id.numel() != 1 or pad_token_id.dtype.is_floating_point or pad_token_id.dtype == torch.bool:
            raise TypeError(
                f"pad_token_id must be an int (or a one-element integer tensor), got a {pad_token_id.dtype} "
                f"tensor of shape {tuple(pad_token_id.shape)}"
            )
        return int(pad_token_id.item())
    if not _is_int(pad_token_id):
        raise TypeError(f"pad_token_id must be None or an int, got {pad_token_id!r} ({type(pad_token_id).__name__})")
    return int(pad_token_id)


def _check_window(model, longest: int, max_new_tokens: int) -> None:
    """A sliding window W (found by ``tidar.patch``): the attention refuses a forward whose keys (the committed
    tokens plus the step's segment) pass W. The decode loop shrinks its steps (K, then the proposal levels,
    down to a plain AR step) to keep the keys inside W, so the generation fits when its last AR step does:
    prompt + new tokens <= W."""
    s = getattr(model, "_tidar", None)
    window = getattr(s, "window", None)
    if window is None:
        return
    need = longest + max_new_tokens
    if need > window:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens does not fit the model's sliding "
            f"window {window} (tidar attention does not slide: every key must stay inside it); "
            f"at most {max(0, window - longest)} new tokens fit"
        )


def check_max_new_tokens(max_new_tokens) -> int:
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r} ({type(max_new_tokens).__name__})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def _limit(model):
    """``(max_len, reason)`` from the patch (``settings_of(model).max_len``); None when no limit is known."""
    s = getattr(model, "_tidar", None)
    return (getattr(s, "max_len", None), getattr(s, "max_len_reason", "")) if s is not None else (None, "")


def _config_int(cfg, name: str, default: int) -> int:
    value = getattr(cfg, name, None)
    return value if _is_int(value) and value > 0 else default


def _draft_room(draft_len) -> tuple[int, int]:
    """(K, positions of room a row needs past its tokens: a decode step's segment, K(K + 1))."""
    K = MAX_AUTO_DRAFT_LEN if draft_len == "auto" else draft_len
    return K, K * (K + 1)


def estimate_bytes(model, batch: int, prompt_len: int, max_new_tokens: int, draft_len) -> tuple[int, int, int]:
    """``(length, cache, step)``: the positions a row of the TiDAR cache holds, the cache's bytes
    (``cache.cache_bytes`` of the model's K/V shapes), and the bytes of the largest forward: a few hidden-sized and
    intermediate-sized activations per token of its segment (the prefill's prompt + K masks, or a decode step's
    K(K + 1) tokens, per row) in the model's dtype, and float32 logits of the rows the LM head takes (the K + 1 rows
    of the prefill, 2K rows of a step, or all rows of a step of up to 128 tokens: ``forwards.ONE_HEAD_CALL_ROWS``).
    A lower bound on what ``generate`` allocates (attention scratch, ``full_logits=True`` and the host's token lists
    come on top)."""
    from tidar.hf.probe import text_config

    cfg = text_config(model)
    weight = model.get_input_embeddings().weight
    vocab, hidden = weight.shape[0], weight.shape[1]
    elem = weight.element_size()
    heads = _config_int(cfg, "num_attention_heads", 1)
    kv_heads = _config_int(cfg, "num_key_value_heads", heads)
    head_dim = _config_int(cfg, "head_dim", max(1, hidden // heads))
    layers = _config_int(cfg, "num_hidden_layers", 1)
    intermediate = _config_int(cfg, "intermediate_size", 4 * hidden)
    K, room = _draft_room(draft_len)
    length = prompt_len + max_new_tokens + room
    cache = cache_bytes(batch, length, layers, kv_heads, head_dim, elem)
    segment = max(prompt_len + K, room)
    head_rows = max(K + 1, 2 * K, min(room, 128))
    step = batch * (segment * elem * (4 * hidden + 3 * intermediate) + head_rows * 4 * vocab)
    return length, cache, step


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device) -> tuple[int, str] | None:
    """``(bytes, what they are)`` that an allocation on ``device`` can take; None for other device types."""
    import os

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device} (torch.cuda.mem_get_info, plus PyTorch's cached blocks)"
    if device.type != "cpu":
        return None
    have = _meminfo_available()
    if have is not None:
        return have, "of available RAM (MemAvailable)"
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of free RAM"
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB ({n} bytes)"


def check_memory(model, batch: int, prompt_len: int, max_new_tokens: int, draft_len, max_len=None) -> None:
    """Refuse, before anything is allocated, a request whose TiDAR cache and step (``estimate_bytes``) need more
    memory than the model's device has. ``prompt_len``: the padded prompt length (the longest prompt of a
    left-padded batch); a length past ``max_len`` is counted up to ``max_len`` (the position limit refuses the rest)."""
    counted = max_new_tokens if max_len is None else max(0, min(max_new_tokens, max_len - prompt_len))
    length, cache, step = estimate_bytes(model, batch, prompt_len, counted, draft_len)
    device = model.get_input_embeddings().weight.device
    have = available_bytes(device)
    if have is None or cache + step <= have[0]:
        return
    room = _draft_room(draft_len)[1]
    raise ValueError(
        f"the request is too large for {device}: batch {batch} x length {length} (input_ids has {batch} rows of "
        f"{prompt_len} tokens, max_new_tokens={max_new_tokens}, draft_len={draft_len} keeps {room} positions of room) "
        f"needs about {_gib(cache + step)}: {_gib(cache)} for the KV cache and {_gib(step)} for a step's "
        f"activations and logits, more than the {_gib(have[0])} {have[1]}; use fewer rows of input_ids, a smaller "
        "max_new_tokens or a smaller draft_len"
    )


def check_draft_len(draft_len):
    """``draft_len``: an int in 1..MAX_DRAFT_LEN or ``"auto"``."""
    if draft_len == "auto" and isinstance(draft_len, str):
        return "auto"
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ValueError(f"draft_len must be an int >= 1 or 'auto', got {draft_len!r}")
    if draft_len > MAX_DRAFT_LEN:
        raise ValueError(
            f"draft_len must be at most {MAX_DRAFT_LEN} (MAX_DRAFT_LEN: a step runs K(K + 1) tokens a row), got "
            f"{draft_len}"
        )
    return draft_len


def check_levels(levels, draft_len):
    """``proposal_levels``: None (all of 1..K) or a non-empty, strictly increasing sequence of ints in 1..K."""
    if levels is None:
        return None
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"proposal_levels must be None or a sequence of ints in 1..K, got {levels!r}")
    levels = list(levels)
    if not levels:
        raise ValueError("proposal_levels must not be empty (None means all of 1..K)")
    for j in levels:
        if isinstance(j, bool) or not isinstance(j, int):
            raise ValueError(f"proposal_levels must hold ints, got {j!r} in {levels!r}")
    if levels != sorted(set(levels)):
        raise ValueError(f"proposal_levels must be strictly increasing, got {levels!r}")
    if isinstance(draft_len, int) and (levels[0] < 1 or levels[-1] > draft_len):
        raise ValueError(f"proposal_levels must lie in 1..draft_len={draft_len}, got {levels!r}")
    if not isinstance(draft_len, int) and (levels[0] < 1 or levels[-1] > MAX_AUTO_DRAFT_LEN):
        raise ValueError(f"proposal_levels must lie in 1..{MAX_AUTO_DRAFT_LEN}, got {levels!r}")
    return tuple(levels)


def check_decode_options(s, draft_len, proposal_levels, context_drafts, full_logits, backend) -> tuple:
    """``(K, levels, context, backend)``: ``generate``'s decoding options, each defaulting to the patch's (``s``:
    the model's ``TidarSettings``)."""
    K = check_draft_len(s.draft_len if draft_len is None else draft_len)
    levels = check_levels(s.proposal_levels if proposal_levels is None else proposal_levels, K)
    context = s.context_drafts if context_drafts is None else context_drafts
    if not isinstance(context, bool):
        raise ValueError(f"context_drafts must be True or False, got {context!r}")
    if not isinstance(full_logits, bool):
        raise ValueError(f"full_logits must be True or False, got {full_logits!r}")
    backend = s.backend if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return K, levels, context, backend


def _check_streamer(streamer, rows: int) -> None:
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put() and end() (an HF streamer), got {type(streamer).__name__}")
    if rows != 1:
        raise ValueError(f"a streamer needs batch size 1, got {rows} rows")


def _check_tokens(prompts, vocab: int, input_ids, device) -> None:
    for b, ids in enumerate(prompts):
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(
                f"input_ids must be token ids in [0, {vocab}), row {b} holds {min(ids) if min(ids) < 0 else max(ids)}"
            )
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device {device}, got {input_ids.device}")


def _check_randomness(generator, seed, device) -> None:
    """``generator`` or ``seed`` (at most one of them): a torch.Generator on the model's device, or an int."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device != device:
        raise ValueError(f"generator must be on the model's device {device}, got {generator.device}")
    if seed is not None:
        if not _is_int(seed):
            raise TypeError(f"seed must be None or an int, got {seed!r} ({type(seed).__name__})")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    if seed is not None and generator is not None:
        raise ValueError("give either generator or seed, not both")


def _check_length(model, prompts, max_new_tokens: int) -> tuple:
    """``(max_len, reason)`` of the model (``_limit``), once the longest prompt and the new tokens fit it."""
    max_len, reason = _limit(model)
    longest = max(map(len, prompts))
    _check_window(model, longest, max_new_tokens)
    if max_len is not None and longest + max_new_tokens > max_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens needs "
            f"{longest + max_new_tokens} positions, more than the model can hold ({reason}); "
            f"at most {max(0, max_len - longest)} new tokens fit"
        )
    return max_len, reason


def check_generate_args(
    model,
    input_ids,
    attention_mask,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    beta,
    eos_token_id,
    pad_token_id,
    generator,
    seed,
    streamer,
    *,
    draft_len=None,
) -> GenerateArgs:
    """Every argument of ``tidar.generate`` (but the decoding options, see ``check_decode_options``), checked before
    any work: types are TypeErrors, values ValueErrors, each naming the argument and what is expected.
    ``eos_token_id`` is taken as HF takes it (int, NumPy int, list of ints, 0-d/1-d integer tensor). A generation
    longer than the model can hold (``max_position_embeddings``, or the sliding window of its attention, found by
    ``tidar.patch``), or whose TiDAR cache and step need more memory than the model's device has (``check_memory``,
    for ``draft_len``: default the patch's), is refused here, before any allocation."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    eos_list = token_ids("eos_token_id", eos_token_id)
    if pad_token_id is None:  # as HF: pad finished rows with the (first) EOS token
        pad_token_id = eos_list[0] if eos_list else 0
    pad_token_id = _pad_id(pad_token_id)
    check_input_ids(input_ids)
    if draft_len is None:
        draft_len = getattr(getattr(model, "_tidar", None), "draft_len", 1)
    check_memory(model, input_ids.shape[0], input_ids.shape[1], max_new_tokens, draft_len, _limit(model)[0])
    prompts = prompt_rows(input_ids, attention_mask)
    _check_streamer(streamer, len(prompts))
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    _check_tokens(prompts, vocab, input_ids, device)
    temperature, top_k, top_p, beta = tidar_kernels.check_sampling_args(temperature, top_k, top_p, beta, vocab)
    _check_randomness(generator, seed, device)
    max_len, reason = _check_length(model, prompts, max_new_tokens)
    eos = set(eos_list)
    return GenerateArgs(
        prompts, max_new_tokens, temperature, top_k, top_p, beta, eos, pad_token_id, device, vocab, max_len, reason
    )
