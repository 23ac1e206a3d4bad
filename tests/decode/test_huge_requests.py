"""Requests too large for the machine are a ValueError naming the argument, raised before anything is allocated
(no forward ran, the model and its settings are as before): a draft_len past ``MAX_DRAFT_LEN``, and a batch x
length whose TiDAR cache and step need more memory than the device has (``generate_args.check_memory``). The
inputs here are tiny tensors expanded lazily: nothing large is ever allocated."""

from __future__ import annotations

import resource

import pytest
import torch
from conftest import tiny_model

import tidar
from tidar.decode import args as generate_args
from tidar.decode.args import MAX_DRAFT_LEN, available_bytes, estimate_bytes
from tidar.hf.cache import cache_bytes

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture(scope="module")
def model():
    return tidar.patch(tiny_model("qwen2", max_pos=8192), draft_len=4)


def _refused_before_anything(model, call, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings, impl = model._tidar, model.config._attn_implementation
    forwards = []
    handle = model.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=match) as info:
            call()
    finally:
        handle.remove()
    assert forwards == [], "a forward ran before the error"
    assert model._tidar == settings and model.config._attn_implementation == impl == "tidar"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return str(info.value)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


@pytest.mark.parametrize("draft_len", [MAX_DRAFT_LEN + 1, 10**4, 2**31, 2**64])
def test_a_draft_len_past_the_maximum_is_refused_by_generate(model, draft_len):
    msg = _refused_before_anything(
        model, lambda: tidar.generate(model, IDS, max_new_tokens=4, draft_len=draft_len), "draft_len"
    )
    assert f"at most {MAX_DRAFT_LEN}" in msg and str(draft_len) in msg


@pytest.mark.parametrize("draft_len", [10**4, 2**31])
def test_a_draft_len_past_the_maximum_is_refused_by_patch(draft_len):
    m = tiny_model("qwen2")
    with pytest.raises(ValueError, match=f"draft_len must be at most {MAX_DRAFT_LEN}"):
        tidar.patch(m, draft_len=draft_len)
    assert not tidar.is_patched(m) and "generate" not in m.__dict__ and m.config._attn_implementation == "sdpa"


def test_the_maximum_draft_len_itself_is_taken(model):
    out = tidar.generate(model, IDS, max_new_tokens=3, draft_len=MAX_DRAFT_LEN)
    ar = out.sequences[:, IDS.shape[1] :]
    assert ar.shape == (1, 3)


def test_a_million_rows_are_refused_naming_batch_length_and_bytes(model):
    ids = IDS.expand(10**6, -1)  # a view: 4 tokens of storage
    rss = _max_rss_bytes()
    msg = _refused_before_anything(
        model, lambda: tidar.generate(model, ids, max_new_tokens=4000), "too large.*batch 1000000 x length 4024"
    )
    length, cache, step = estimate_bytes(model, 10**6, 4, 4000, 4)
    assert length == 4 + 4000 + 4 * 5
    assert f"({cache + step} bytes)" in msg and f"({cache} bytes) for the KV cache" in msg
    for name in ("input_ids", "max_new_tokens=4000", "draft_len=4"):
        assert name in msg
    assert _max_rss_bytes() - rss < 256 * 2**20, "the refusal allocated memory"


def test_the_drop_in_generate_refuses_a_million_rows_too(model):
    ids = IDS.expand(10**6, -1)
    _refused_before_anything(model, lambda: model.generate(ids, max_new_tokens=4000, do_sample=False), "too large")


def test_the_estimate_counts_the_draft_len_given_to_generate(model, monkeypatch):
    need = sum(estimate_bytes(model, 1, 4, 8, 4)[1:])
    monkeypatch.setattr(generate_args, "available_bytes", lambda device: (need, "in this test"))
    out = generate_args.check_generate_args(model, IDS, None, 8, 0.0, None, None, 1.0, None, None, None, None, None)
    assert out.max_new_tokens == 8
    with pytest.raises(ValueError, match="draft_len=5 keeps 30 positions of room"):
        generate_args.check_generate_args(
            model, IDS, None, 8, 0.0, None, None, 1.0, None, None, None, None, None, draft_len=5
        )


def test_the_limit_is_what_the_device_has(model, monkeypatch):
    need = sum(estimate_bytes(model, 2, 4, 6, 4)[1:])
    ids = IDS.expand(2, -1)
    monkeypatch.setattr(generate_args, "available_bytes", lambda device: (need - 1, "in this test"))
    msg = _refused_before_anything(model, lambda: tidar.generate(model, ids, max_new_tokens=6), "batch 2 x length 30")
    assert f"more than the {(need - 1) / 2**30:.3g} GiB ({need - 1} bytes) in this test" in msg
    monkeypatch.setattr(generate_args, "available_bytes", lambda device: (need, "in this test"))
    out = tidar.generate(model, ids, max_new_tokens=6)
    assert out.sequences.shape == (2, 10)


def test_the_cache_estimate_is_what_generate_allocates(model):
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    out = tidar.generate(model, ids, max_new_tokens=7)
    length, cache, _ = estimate_bytes(model, 2, 5, 7, 4)
    assert out.cache.max_len == length
    assert sum(t.numel() * t.element_size() for t in out.cache.keys + out.cache.values) == cache


def test_cache_bytes_does_not_overflow():
    assert cache_bytes(10**6, 2**40, 80, 8, 128, 2) == 2 * 80 * 10**6 * 8 * 2**40 * 128 * 2


def test_a_length_past_the_position_limit_names_the_limit_not_the_memory():
    m = tidar.patch(tiny_model("qwen2", max_pos=64), draft_len=4)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        tidar.generate(m, IDS, max_new_tokens=10**12)


def test_available_bytes_reads_the_device():
    have, what = available_bytes(torch.device("cpu"))
    assert have > 0 and "RAM" in what
    assert available_bytes(torch.device("meta")) is None


def test_available_bytes_on_cuda_takes_free_and_cached_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    have, what = available_bytes(torch.device("cuda", 0))
    assert have == 4 * 2**30 and "mem_get_info" in what
