"""The generation loop on backend="triton" (attention, kv_append and the rejection step all through the
Triton kernels, under TRITON_INTERPRET=1 on CPU): greedy gives exactly the tokens of HF greedy ``generate``
(fp32, batch 1 and 2 with left padding, K = 1 and 4) and of the reference backend; sampling with the
same generator (or the same Philox seed, made in-kernel) gives the same sequences as the reference
backend. Each test counts the Triton calls of every op, so a silent fallback to the reference fails it.

backend="auto" never runs the interpreter on CPU tensors, so every call names backend="triton".
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
from conftest import tiny_model  # noqa: E402

import tidar  # noqa: E402
from tidar_kernels import backends  # noqa: E402

NEW = 8
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter; a GPU machine runs the compiled kernels
OPS = ("tidar_attention", "kv_append", "rejection_sample", "draft_sample")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls of each op's triton implementation."""
    backends.resolve("kv_append", "reference", torch.device(DEV))  # load the backends
    calls = Counter()
    for op in OPS:
        impl = backends._IMPLS[op]["triton"]

        def counted(*args, _impl=impl, _op=op, **kwargs):
            calls[_op] += 1
            return _impl(*args, **kwargs)

        monkeypatch.setitem(backends._IMPLS[op], "triton", counted)
    return calls


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2").to(DEV)  # hidden 32, 2 layers, 4 query heads over 2 KV heads (GQA), vocab 97


PROMPTS = [[5, 9, 13, 2, 7], [40, 3], [11, 12, 13, 14, 15, 16, 17, 18]]


def _left_pad(rows, pad=0):
    P = max(map(len, rows))
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=DEV)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=DEV)
    return ids, mask


def _hf_greedy(model, ids, mask):
    tidar.unpatch(model)
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)


@pytest.mark.parametrize("K", [1, 4])
def test_greedy_triton_equals_hf(model, triton_calls, K):
    batches = [PROMPTS[:1], PROMPTS[1:]]  # batch 1, then batch 2 left padded
    want = [_hf_greedy(model, *_left_pad(rows)) for rows in batches]
    tidar.patch(model, draft_len=K)
    try:
        for rows, w in zip(batches, want):
            ids, mask = _left_pad(rows)
            got = tidar.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, backend="triton")
            assert torch.equal(got.sequences, w), f"triton TiDAR greedy != HF greedy for {rows}"
            ref = tidar.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, backend="reference")
            assert torch.equal(got.sequences, ref.sequences)
            assert got.accepted_histogram == ref.accepted_histogram and got.forwards == ref.forwards
    finally:
        tidar.unpatch(model)
    # greedy acceptance is an argmax compare on the K draft rows (the LM head runs on the needed rows only), so the
    # fused rejection kernel serves sampling; every other op ran through Triton
    assert all(triton_calls[op] > 0 for op in OPS if op != "rejection_sample"), dict(triton_calls)
    if K > 1:
        assert ref.tokens_per_forward >= 1.0


@pytest.mark.parametrize("rng", ["generator", "seed"])
def test_sampling_triton_equals_reference(model, triton_calls, rng):
    """The same randomness -> the same sampled sequences on both backends (batch 2, left padded, K = 3, top-p):
    a torch.Generator (uniforms drawn on the host), or a Philox seed (uniforms made inside the kernel)."""
    ids, mask = _left_pad(PROMPTS[1:])

    def rand(s):
        return dict(generator=torch.Generator(device=DEV).manual_seed(s)) if rng == "generator" else dict(seed=s)

    tidar.patch(model, draft_len=3)
    try:
        kw = dict(attention_mask=mask, max_new_tokens=NEW, temperature=1.0, top_p=0.9)
        got = tidar.generate(model, ids, backend="triton", **rand(0), **kw)
        ref = tidar.generate(model, ids, backend="reference", **rand(0), **kw)
        other = tidar.generate(model, ids, backend="reference", **rand(1), **kw)
    finally:
        tidar.unpatch(model)
    assert torch.equal(got.sequences, ref.sequences)
    assert got.accepted_histogram == ref.accepted_histogram
    assert not torch.equal(other.sequences, ref.sequences), "control: another seed samples other tokens"
    assert triton_calls["rejection_sample"] > 0 and triton_calls["draft_sample"] > 0


def test_seed_mode_reproducible_and_exclusive(model):
    """generate(seed=...) is reproducible, differs from another seed, and refuses a generator as well."""
    ids = torch.tensor([PROMPTS[0]], device=DEV)
    tidar.patch(model, draft_len=2)
    try:
        kw = dict(max_new_tokens=6, temperature=1.0, backend="reference")
        a = tidar.generate(model, ids, seed=3, **kw).sequences
        assert torch.equal(a, tidar.generate(model, ids, seed=3, **kw).sequences)
        assert not torch.equal(a, tidar.generate(model, ids, seed=4, **kw).sequences)
        with pytest.raises(ValueError, match="generator or seed"):
            tidar.generate(model, ids, seed=3, generator=torch.Generator(device=DEV), **kw)
    finally:
        tidar.unpatch(model)
