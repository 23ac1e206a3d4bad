"""``rejection_sample``: one TiDAR verification step, from raw logits to the step's outcome (docs/design.md §4.1).

Also ``draft_sample``: the prefill's first drafts. Both take randomness from exactly one of: an explicit
``torch.Generator``, pre-drawn ``uniforms`` (layout in ``tidar_kernels.reference.rejection_sample``), or a
Philox4x32-10 ``seed``/``offset`` (ints or one-element int64 device tensors, so a CUDA graph can capture the
step and replay it with a new offset); ``philox_uniforms(seed, offset, B, K)`` gives the uniforms that a
seed/offset stands for. Any backend given the same uniforms returns the same tokens as the reference.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .. import _checks
from ..backends import resolve
from ..reference.rejection_sample import Philox, philox_uniforms


class RejectionResult(NamedTuple):
    accepted: torch.Tensor  # int64 [B]: a in 1..K, drafts d_0..d_{a-1} accepted (d_0 always)
    emitted: torch.Tensor  # int64 [B, K]: d_0..d_{a-1}, padded with -1
    next_drafts: torch.Tensor  # int64 [B, K]: d'_0 (correction or bonus) then d'_1..d'_{K-1} from block a
    next_draft_probs: torch.Tensor | None  # float32 [B, K-1, V]: q'_1..q'_{K-1} (None when greedy)


class DraftResult(NamedTuple):
    next_drafts: torch.Tensor  # int64 [B, K]
    next_draft_probs: torch.Tensor | None  # float32 [B, K-1, V] (None when greedy)


def draw_uniforms(batch: int, draft_len: int, *, generator=None, device=None) -> torch.Tensor:
    """The ``[B, 2K]`` float32 uniforms one step consumes, drawn from ``generator``."""
    _check_generator(generator)
    if not (_checks.is_int(batch) and batch >= 0):
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if not (_checks.is_int(draft_len) and draft_len >= 1):
        raise ValueError(f"draft_len must be an int >= 1, got {draft_len!r}")
    if generator is not None:
        device = generator.device
    return torch.rand((batch, 2 * draft_len), generator=generator, device=device, dtype=torch.float32)


def _number(x) -> bool:
    """A finite real number that is not a bool (``True`` would silently mean 1)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_" and math.isfinite(x)


def check_sampling_args(temperature, top_k, top_p, beta, V):
    """Validated (temperature, top_k, top_p, beta); no-op filters become None. Bools, NaN, infinities and
    non-numbers are ValueErrors naming the argument."""
    if not _number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (_checks.is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if not _number(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1] (1 = exact AR), got {beta!r}")
    top_k = None if top_k is None else int(top_k)
    if top_k is not None and top_k >= V:
        top_k = None
    return float(temperature), top_k, (None if top_p is None or top_p >= 1.0 else float(top_p)), float(beta)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def _int64_scalar(name, x, dev, lo, hi):
    """``x`` as a one-element int64 tensor on ``dev``: an int in [lo, hi) (bits kept) or such a tensor."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int64 or x.numel() != 1:
            raise TypeError(
                f"{name} must be an int or a one-element int64 tensor, got {x.dtype} of shape {tuple(x.shape)}"
            )
        if x.device != dev:
            raise ValueError(f"{name} must be on {dev} like the logits, got {x.device}")
        return x.reshape(1)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int or a one-element int64 tensor, got {type(x).__name__}")
    if not lo <= x < hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}), got {x}")
    return torch.tensor([x - 2**64 if x >= 2**63 else x], dtype=torch.int64, device=dev)


def _randomness(uniforms, generator, seed, offset, B, K, dev, greedy):
    """The step's randomness for a backend: ``None`` (greedy), a ``[B, 2K]`` float32 tensor, or ``Philox``.

    Exactly one source: ``uniforms``, ``generator``, or ``seed`` (+ ``offset``, default 0); with none, the
    uniforms are drawn from torch's default generator. Greedy reads none and ignores what it is given.
    """
    _check_generator(generator)
    if uniforms is not None and not isinstance(uniforms, torch.Tensor):
        raise TypeError(f"uniforms must be None or a float32 tensor [B, 2K], got {type(uniforms).__name__}")
    if offset is not None and seed is None:
        raise ValueError("offset needs a seed (seed/offset are Philox's key and counter)")
    given = [n for n, v in (("generator", generator), ("uniforms", uniforms), ("seed", seed)) if v is not None]
    if greedy:
        return None
    if len(given) > 1:
        raise ValueError(f"give exactly one source of randomness (generator, uniforms or seed/offset), got {given}")
    if seed is not None:
        return Philox(
            _int64_scalar("seed", seed, dev, -(2**63), 2**64),
            _int64_scalar("offset", 0 if offset is None else offset, dev, 0, 2**64),
        )
    if uniforms is None:
        if generator is not None and generator.device != dev:
            raise ValueError(f"generator must be on {dev} like the logits, got {generator.device}")
        return draw_uniforms(B, K, generator=generator, device=dev)
    _checks.tensor("uniforms", uniforms, dtypes=(torch.float32,), device=dev)
    _checks.shape("uniforms", uniforms, (B, 2 * K))
    if not _checks.capturing() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):  # NaN fails both
        raise ValueError("uniforms must lie in [0, 1) (no NaN)")
    return uniforms


def _for_backend(impl, u, B, K, dev):
    """Philox state for backends that generate uniforms themselves, else the materialised uniforms."""
    if isinstance(u, Philox) and not getattr(impl, "philox", False):
        return philox_uniforms(u.seed, u.offset, B, K, dev)
    return u


def _row_max(t):
    """Each row's maximum: NaN where the row holds a NaN (``amax`` propagates it), +inf where it holds a +inf and
    no NaN, -inf only where every entry is -inf. One pass over the logits for all three checks."""
    return t.amax(-1) if t.numel() else t.new_zeros(t.shape[:-1])


def _check_logits(ar_logits, block_logits, slot0, beta):
    """NaN/+inf and all -inf rows (every distribution needs a possible token); with 0 < beta < 1 also the mixed
    target (-inf on either side is -inf). ``block_logits=None``: the op reads none of it (K = 1, beta = 1)."""
    tops = [("ar_logits", _row_max(ar_logits))]
    if block_logits is not None:
        tops.append(("block_logits", _row_max(block_logits)))
    for name, top in tops:
        if bool(torch.isnan(top).any()) or bool(torch.isposinf(top).any()):
            raise ValueError(f"{name} contains NaN or +inf values")
    for name, top in tops:
        if bool(torch.isneginf(top).any()):
            raise ValueError(f"{name} has a row that is -inf everywhere: no token is possible")
    if 0.0 < beta < 1.0 and ar_logits.numel():
        if bool((torch.isneginf(ar_logits) | torch.isneginf(slot0)).all(-1).any()):
            raise ValueError(
                "ar_logits and block_logits (slot 0) have no token that is finite in both: the beta "
                "mix has a row that is -inf everywhere"
            )


def _check_draft_probs(draft_probs):
    """Finite, non-negative rows that sum to 1 (within 1e-3, float64 sum)."""
    if not bool(torch.isfinite(draft_probs).all()):
        raise ValueError("draft_probs contains NaN or inf values")
    if bool((draft_probs < 0).any()):
        raise ValueError("draft_probs must be non-negative")
    if draft_probs.numel():
        err = (draft_probs.double().sum(-1) - 1.0).abs().max().item()
        if not err <= 1e-3:
            raise ValueError(f"draft_probs rows must be distributions summing to 1 (worst row is off by {err:.3g})")


def rejection_sample(
    ar_logits,
    block_logits,
    drafts,
    draft_probs=None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> RejectionResult:
    """Verify the K drafts of one step and draft the next K.

    Args:
        ar_logits: ``[B, K, V]`` raw logits at the draft rows: row t (at d_t) predicts the token after it.
        block_logits: ``[B, K, K, V]`` raw logits of the proposal blocks: ``[:, j-1, s]`` is block j, slot s.
        drafts: int ``[B, K]``: d_0 (accepted by construction) then d_1..d_{K-1}.
        draft_probs: float32 ``[B, K-1, V]``, the distributions q_1..q_{K-1} the drafts were sampled from
            (after temperature/top-k/top-p); required when ``temperature > 0``, ignored when greedy.
        temperature: 0 = greedy (accept while d_i == argmax p_i); > 0 = speculative sampling with
            acceptance min(1, p_i(d_i) / q_i(d_i)) and the residual norm(max(0, p - q)) at the first rejection.
        top_k, top_p: applied to targets and next drafts alike (as Hugging Face's warpers, top-k then top-p);
            tokens tied with the last kept value are kept too (``reference.rejection_sample.filter_threshold``).
        beta: target logits = beta * AR + (1 - beta) * slot 0 of the matching block. Only beta = 1 is exact.
        generator / uniforms / seed+offset: the randomness, exactly one of them (none: torch's default
            generator): a ``torch.Generator``; ``uniforms`` ``[B, 2K]`` float32 in [0, 1); or Philox4x32-10
            ``seed`` (int64 bits) and ``offset`` (default 0), ints or one-element int64 tensors on the logits'
            device; the step then uses ``philox_uniforms(seed, offset, B, K)`` (advance offset by B * 2K per step).

    Returns ``RejectionResult(accepted, emitted, next_drafts, next_draft_probs)``.
    """
    dev = _checks.tensor("ar_logits", ar_logits, ndim=3, dtypes=_checks.FLOAT_TYPES).device
    B, K, V = ar_logits.shape
    if K < 1 or V < 1:
        raise ValueError(f"ar_logits must be [B, K >= 1, V >= 1], got {tuple(ar_logits.shape)}")
    _checks.tensor("block_logits", block_logits, ndim=4, dtypes=_checks.FLOAT_TYPES, device=dev)
    if tuple(block_logits.shape[:3]) != (B, K, K):
        raise ValueError(f"block_logits must have shape [B={B}, K={K}, K={K}, V], got {tuple(block_logits.shape)}")
    if block_logits.shape[3] != V:
        raise ValueError(f"vocab mismatch: ar_logits has V={V}, block_logits has V={block_logits.shape[3]}")
    _checks.tensor("drafts", drafts, ndim=2, dtypes=_checks.INT_TYPES, device=dev)
    _checks.shape("drafts", drafts, (B, K))
    data = not _checks.capturing()  # data checks sync with the host: skipped while capturing a CUDA graph
    if data and bool(((drafts < 0) | (drafts >= V)).any()):
        raise ValueError(f"drafts must be token ids in [0, V={V})")
    temperature, top_k, top_p, beta = check_sampling_args(temperature, top_k, top_p, beta, V)
    if data:
        _check_logits(ar_logits, block_logits, block_logits[:, :, 0], beta)
    greedy = temperature == 0.0
    if not greedy:
        if draft_probs is None:
            if K > 1:
                raise ValueError("draft_probs [B, K-1, V] is required when temperature > 0")
            draft_probs = ar_logits.new_zeros((B, 0, V), dtype=torch.float32)
        _checks.tensor("draft_probs", draft_probs, ndim=3, dtypes=(torch.float32,), device=dev)
        if draft_probs.shape[2] != V:
            raise ValueError(f"vocab mismatch: ar_logits has V={V}, draft_probs has V={draft_probs.shape[2]}")
        _checks.shape("draft_probs", draft_probs, (B, K - 1, V))
        if data:
            _check_draft_probs(draft_probs)
        q_d = draft_probs.gather(-1, drafts[:, 1:, None].long())
        if data and bool((q_d <= 0).any()):
            raise ValueError("draft_probs gives probability 0 to a draft it proposed: drafts and draft_probs disagree")
    u = _randomness(uniforms, generator, seed, offset, B, K, dev, greedy)
    impl = resolve("rejection_sample", backend, dev)
    u = _for_backend(impl, u, B, K, dev)
    return RejectionResult(
        *impl(ar_logits, block_logits, drafts.long(), draft_probs, u, temperature, top_k, top_p, beta)
    )


def draft_sample(
    ar_logits,
    block_logits,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> DraftResult:
    """Prefill's drafts: d_0 from ``ar_logits`` ``[B, V]`` (the last prompt token's AR logits, mixed with
    slot 0 when beta < 1) and d_1..d_{K-1} from slots 1..K-1 of ``block_logits`` ``[B, K, V]``."""
    dev = _checks.tensor("ar_logits", ar_logits, ndim=2, dtypes=_checks.FLOAT_TYPES).device
    B, V = ar_logits.shape
    if V < 1:
        raise ValueError(f"ar_logits must be [B, V >= 1], got {tuple(ar_logits.shape)}")
    _checks.tensor("block_logits", block_logits, ndim=3, dtypes=_checks.FLOAT_TYPES, device=dev)
    if block_logits.shape[0] != B or block_logits.shape[1] < 1:
        raise ValueError(f"block_logits must have shape [B={B}, K >= 1, V], got {tuple(block_logits.shape)}")
    if block_logits.shape[2] != V:
        raise ValueError(f"vocab mismatch: ar_logits has V={V}, block_logits has V={block_logits.shape[2]}")
    K = block_logits.shape[1]
    temperature, top_k, top_p, beta = check_sampling_args(temperature, top_k, top_p, beta, V)
    if not _checks.capturing():  # data checks sync with the host: skipped while capturing a CUDA graph
        # at K = 1 and beta = 1 nothing of block_logits is read (no slot 0 mix, no drafts): its data goes unchecked
        unread = K == 1 and beta == 1.0
        _check_logits(ar_logits, None if unread else block_logits, block_logits[:, 0], beta)
    u = _randomness(uniforms, generator, seed, offset, B, K, dev, temperature == 0.0)
    impl = resolve("draft_sample", backend, dev)
    u = _for_backend(impl, u, B, K, dev)
    return DraftResult(*impl(ar_logits, block_logits, u, temperature, top_k, top_p, beta))
