"""CUDA C++ kernels (csrc/) behind ``backend="cuda"``: the compiled extension ``tidar_kernels._C``.

``_C`` registers dispatcher ops in the ``tidar_cuda`` namespace with the libtorch stable ABI
(``torch.ops.tidar_cuda.kv_append``, ``rejection_sample``, ``draft_sample``, ``tidar_attention``); this module
adds their fake (meta) impls so torch.compile can trace them, and registers the backend impls.

Importing this package raises ImportError naming the reason when the extension cannot be used: not built
(and why, from the build info), does not load (ABI mismatch with the torch it was built against), or built for
other GPU architectures than the visible one. ``tidar_kernels._loaders`` records that reason for errors,
the one-time fallback warning and ``tidar env``.

What the CUDA ops cover (their records in ``tidar_kernels.backends``: ``backend="auto"`` falls through to
Triton/reference otherwise, ``backend="cuda"`` raises naming why): attention is inference only (no backward),
float16/bfloat16, head dims 64 and 128, with or without logit soft-capping. Sampling and kv_append take every
input the public ops accept (top-k/top-p become per-row thresholds computed with the reference's
``filter_threshold``, applied in the kernel).
"""

from __future__ import annotations

import importlib.util

import torch

from .._cuda_archs import arch_covers
from ..backends import record, register
from ..reference import rejection_sample as _ref
from ..reference.rejection_sample import Philox


def build_info() -> dict:
    """What setup.py recorded at build time (empty when it never ran here)."""
    try:
        from .._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


def _load():
    info = build_info()
    if torch.version.cuda is None:
        raise ImportError(
            f"torch {torch.__version__} is a CPU-only build: the CUDA extension needs a CUDA build of torch"
        )
    if importlib.util.find_spec("tidar_kernels._C") is None:
        why = info.get("skipped_because") if info else None
        raise ImportError(
            "the CUDA extension tidar_kernels._C is not built"
            + (f" ({why})" if why else "")
            + "; build it with `pip install --no-build-isolation -e .` (needs nvcc and a CUDA build of torch)"
        )
    try:
        importlib.import_module("tidar_kernels._C")  # loads the library: registers torch.ops.tidar_cuda.*
    except (ImportError, OSError) as e:
        built = info.get("torch_version", "an unknown torch")
        raise ImportError(
            f"tidar_kernels._C does not load (ABI mismatch? built against torch {built}, running torch "
            f"{torch.__version__}; rebuild with `pip install --no-build-isolation -e .`): {e}"
        ) from e
    archs = info.get("archs")
    if archs and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if not arch_covers(archs, cap):
            raise ImportError(
                f"tidar_kernels._C was built for {', '.join(archs)}, which cannot run on this GPU "
                f'(sm_{cap[0]}{cap[1]}); rebuild with TORCH_CUDA_ARCH_LIST="{cap[0]}.{cap[1]}"'
            )


_load()
_ops = torch.ops.tidar_cuda
_EXPECTED = {  # op -> an argument its current schema has (a stale build from older sources fails here, not at a call)
    "kv_append": "seg_start",
    "rejection_sample": "thr_slots",
    "draft_sample": "thr_slots",
    "tidar_attention": "softcap",
    "philox_uniform": "draft_len",
    "has_attention": None,
}
for _name, _arg in _EXPECTED.items():
    if not hasattr(_ops, _name) or (_arg and _arg not in str(getattr(_ops, _name).default._schema)):
        raise ImportError(
            f"tidar_kernels._C is stale (op tidar_cuda::{_name} missing or out of date); "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
HAS_ATTENTION = bool(_ops.has_attention())

# ---------------------------------------------------------------------------------------------
# Fake (meta) impls: shapes and dtypes only, for torch.compile / FakeTensor tracing
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake("tidar_cuda::kv_append")
def _kv_append_fake(k_cache, v_cache, k_new, v_new, seg_start):
    return None


@torch.library.register_fake("tidar_cuda::rejection_sample")
def _rejection_fake(
    ar_logits,
    block_logits,
    drafts,
    draft_probs,
    uniforms,
    seed,
    offset,
    seed_value,
    offset_value,
    temperature,
    beta,
    thr_target=None,
    thr_slots=None,
):
    B, K, V = ar_logits.shape
    i64 = dict(dtype=torch.int64)
    probs = ar_logits.new_empty((B, K - 1, V) if temperature > 0 else (0,), dtype=torch.float32)
    return (
        ar_logits.new_empty((B,), **i64),
        ar_logits.new_empty((B, K), **i64),
        ar_logits.new_empty((B, K), **i64),
        probs,
    )


@torch.library.register_fake("tidar_cuda::draft_sample")
def _draft_fake(
    ar_logits,
    block_logits,
    uniforms,
    seed,
    offset,
    seed_value,
    offset_value,
    temperature,
    beta,
    thr_target=None,
    thr_slots=None,
):
    B, V = ar_logits.shape
    K = block_logits.shape[1]
    probs = ar_logits.new_empty((B, K - 1, V) if temperature > 0 else (0,), dtype=torch.float32)
    return ar_logits.new_empty((B, K), dtype=torch.int64), probs


@torch.library.register_fake("tidar_cuda::tidar_attention")
def _attention_fake(q, k, v, local_limit, block_id, seg_start, scale, softcap=0.0):
    B, Hq, S, D = q.shape
    return q.new_empty((B, Hq, S, D)), q.new_empty((B, Hq, S), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Backend impls (arguments already validated by tidar_kernels.ops.*)
# ---------------------------------------------------------------------------------------------


@register("kv_append", "cuda")
def kv_append(k_cache, v_cache, k_new, v_new, seg_start):
    _ops.kv_append(k_cache, v_cache, k_new, v_new, seg_start.to(torch.int32).contiguous())


def _random_inputs(u):
    """(uniforms, seed tensor, offset tensor) for the extension op from the step's randomness (tidar_kernels.ops)."""
    if u is None:
        return None, None, None
    if isinstance(u, Philox):
        return None, u.seed.reshape(1), u.offset.reshape(1)
    return u, None, None


def _filter_thresholds(target, slots, temperature, top_k, top_p):
    """top-k/top-p as per-row float64 thresholds (the reference's ``filter_threshold`` of the same tempered float64
    logits; the kernel keeps ``x / T >= thr``, exactly the reference's set): (thr_target, thr_slots) or Nones."""
    if temperature == 0.0 or (top_k is None and top_p is None):
        return None, None
    return (
        _ref.filter_threshold(target / temperature, top_k, top_p).contiguous(),
        _ref.filter_threshold(slots.double() / temperature, top_k, top_p).contiguous(),
    )


@register("rejection_sample", "cuda", philox=True)  # takes Philox state (device seed/offset) itself
def rejection_sample(ar_logits, block_logits, drafts, draft_probs, u, temperature, top_k, top_p, beta):
    uniforms, seed, offset = _random_inputs(u)
    greedy = temperature == 0.0
    thr_t, thr_s = (
        (None, None)
        if greedy
        else _filter_thresholds(
            _ref.mix(ar_logits, block_logits[:, :, 0], beta), block_logits, temperature, top_k, top_p
        )
    )
    accepted, emitted, next_drafts, next_probs = _ops.rejection_sample(
        ar_logits,
        block_logits,
        drafts.to(torch.int64),
        None if greedy else draft_probs,
        uniforms,
        seed,
        offset,
        0,
        0,
        float(temperature),
        float(beta),
        thr_t,
        thr_s,
    )
    return accepted, emitted, next_drafts, None if greedy else next_probs


@register("draft_sample", "cuda", philox=True)
def draft_sample(ar_logits, block_logits, u, temperature, top_k, top_p, beta):
    uniforms, seed, offset = _random_inputs(u)
    greedy = temperature == 0.0
    thr_t, thr_s = (
        (None, None)
        if greedy
        else _filter_thresholds(_ref.mix(ar_logits, block_logits[:, 0], beta), block_logits, temperature, top_k, top_p)
    )
    next_drafts, next_probs = _ops.draft_sample(
        ar_logits, block_logits, uniforms, seed, offset, 0, 0, float(temperature), float(beta), thr_t, thr_s
    )
    return next_drafts, None if greedy else next_probs


ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (64, 128)


def _attention_supports(*args):
    """None when the CUDA attention can run these arguments, else why (its record in tidar_kernels.backends)."""
    return record("tidar_attention", "cuda").supports(*args)


def _attention_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` if the kernel can read it in place (last stride 1, other strides and the offset multiples of 8
    elements, so rows stay 16-byte aligned), else a contiguous copy."""
    ok = t.stride(-1) == 1 and t.storage_offset() % 8 == 0
    ok = ok and all(st % 8 == 0 for sz, st in zip(t.shape[:-1], t.stride()[:-1]) if sz > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)  # (contiguous() keeps a bad offset)


def attention_with_lse(q, k, v, local_limit, block_id, seg_start, scale, softcap=None):
    """``(out, lse)`` of the CUDA forward (lse natural-log, fp32 ``[B, Hq, S]``; -inf for a query that sees no key);
    ``softcap`` None or > 0: scores ``softcap * tanh(scale * q.k / softcap)`` (logit soft-capping)."""
    q, k, v = (_attention_layout(t) for t in (q, k, v))
    return _ops.tidar_attention(
        q,
        k,
        v,
        local_limit.to(torch.int32).contiguous(),
        block_id.to(torch.int32).contiguous(),
        seg_start.to(torch.int32).contiguous(),
        float(scale),
        0.0 if softcap is None else float(softcap),
    )


if HAS_ATTENTION:
    # inference only (no backward), float16/bfloat16, head dims 64 and 128
    @register("tidar_attention", "cuda", dtypes=ATTENTION_DTYPES, head_dims=ATTENTION_HEAD_DIMS, grad=False)
    def tidar_attention(q, k, v, local_limit, block_id, seg_start, scale, softcap=None):
        return attention_with_lse(q, k, v, local_limit, block_id, seg_start, scale, softcap)[0]


def philox_uniform(seed: int, offset: int, b: int, j: int, draft_len: int) -> float:
    """The uniform the CUDA kernels draw for (seed, offset, row b, index j) (host code compiled from the same
    source as the device code): for CPU tests of the stream."""
    return float(_ops.philox_uniform(seed, offset, b, j, draft_len))


__all__ = ["attention_with_lse", "build_info", "HAS_ATTENTION", "philox_uniform"]
