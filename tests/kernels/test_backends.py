"""Dispatch from the implementation records (tidar_kernels.backends, docs/design.md §8), without a GPU.

``resolve`` only looks at the device type, so a CUDA device can be named here: the chain that ``auto`` builds for
CUDA tensors is called with CPU tensors and every implementation replaced by a spy that records which one ran.
"""

from __future__ import annotations

import re

import pytest
import torch

from tidar_kernels import backends, layouts, live_backends

CUDA = torch.device("cuda")
ATT = "tidar_attention"


@pytest.fixture
def ran(monkeypatch):
    """Every registered implementation replaced by a spy: returns the list of (op, backend) that ran."""
    backends.resolve("kv_append", "reference", torch.device("cpu"))  # load the backends
    calls = []
    for op, impls in backends._IMPLS.items():
        for name in list(impls):
            monkeypatch.setitem(impls, name, lambda *args, _key=(op, name): calls.append(_key) or _key)
    return calls


def _attention_args(dtype, D=64, requires_grad=False):
    lay = layouts.decode_step(2)
    q = torch.zeros(1, 2, lay.seg_len, D, dtype=dtype, requires_grad=requires_grad)
    seg = torch.zeros(1, dtype=torch.int32)
    return (q, q, q, lay.local_limit, lay.block_id, seg, 0.125, None)


def _kernels_on_cuda(op):
    return [b for b in ("cuda", "triton") if b in live_backends(CUDA).get(op, [])]


def test_every_implementation_has_a_record():
    backends.resolve("kv_append", "reference", torch.device("cpu"))
    for op, impls in backends._IMPLS.items():
        for name in impls:
            rec = backends.record(op, name)
            assert (rec.op, rec.backend) == (op, name)
            assert rec.device_types is None if name == "reference" else rec.device_types == ("cuda",)
    assert backends.record("rejection_sample", "reference").philox  # the reference expands seed/offset itself


def test_auto_on_cuda_float64_attention_falls_back_to_the_reference(ran):
    assert "triton" in _kernels_on_cuda(ATT), "the triton backend should be importable here"
    chain = backends.resolve(ATT, "auto", CUDA)
    chain(*_attention_args(torch.float64))
    assert ran == [(ATT, "reference")]  # neither kernel takes float64: no kernel error, the reference runs


def test_auto_on_cuda_picks_the_first_kernel_that_takes_the_call(ran):
    kernels = _kernels_on_cuda(ATT)
    chain = backends.resolve(ATT, "auto", CUDA)
    assert [r.backend for r in chain.records] == kernels + ["reference"]
    chain(*_attention_args(torch.float16))
    assert ran[-1] == (ATT, kernels[0])
    if "cuda" in kernels:  # the CUDA attention: head dims 64/128, no backward; Triton takes both
        chain(*_attention_args(torch.float16, D=96))
        assert ran[-1] == (ATT, "triton")
        chain(*_attention_args(torch.float16, requires_grad=True))
        assert ran[-1] == (ATT, "triton")
        with torch.no_grad():
            chain(*_attention_args(torch.float16, requires_grad=True))
        assert ran[-1] == (ATT, "cuda")


def test_explicit_backend_refuses_naming_the_reason(ran):
    explicit = backends.resolve(ATT, "triton", CUDA)
    with pytest.raises(RuntimeError, match="got float64"):  # "this backend cannot run it" (a TypeError too)
        explicit(*_attention_args(torch.float64))
    with pytest.raises(
        TypeError,
        match=r"backend='triton' cannot run tidar_attention.*float16/bfloat16/float32.*"
        r"got float64",
    ):
        explicit(*_attention_args(torch.float64))
    with pytest.raises(ValueError, match="head dims up to 256, got 264"):
        explicit(*_attention_args(torch.float16, D=264))
    assert ran == []
    explicit(*_attention_args(torch.float32))
    assert ran == [(ATT, "triton")]


def test_kernels_need_cuda_tensors_unless_interpreted():
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run kv_append: "):
        backends.resolve("kv_append", "cuda", cpu)
    assert live_backends(cpu)["kv_append"][0] == "reference"
    assert ("triton" in live_backends(cpu)["kv_append"]) == backends.triton_interpreted()


def test_fake_records_order_reasons_and_philox():
    op = "_test_records_op"
    try:
        backends.register(op, "reference", philox=True)(lambda x: "reference")
        backends.register(op, "triton", dtypes=(torch.float32,), philox=True)(lambda x: "triton")
        backends.register(
            op, "cuda", supports=lambda x: None if x.numel() > 2 else "needs more than 2 elements", grad=False
        )(lambda x: "cuda")
        chain = backends.resolve(op, "auto", CUDA)
        assert [r.backend for r in chain.records] == ["cuda", "triton", "reference"]
        assert chain.philox is False  # cuda does not draw Philox uniforms: the op layer materialises them
        assert chain(torch.zeros(3)) == "cuda"
        assert chain(torch.zeros(2)) == "triton"  # cuda's predicate declines
        assert chain(torch.zeros(2, dtype=torch.float64)) == "reference"  # and triton's dtypes too
        assert chain(torch.zeros(3, requires_grad=True)) == "triton"  # cuda has no backward
        assert backends.record(op, "cuda").supports(torch.zeros(1)) == "needs more than 2 elements"
        assert backends.record(op, "triton").supports(torch.zeros(1, dtype=torch.int64)) == (
            "the triton _test_records_op runs float32 inputs, got int64"
        )
        assert backends.resolve(op, "triton", CUDA).philox is True
    finally:
        backends._IMPLS.pop(op, None)
        for name in backends.BACKENDS:
            backends._RECORDS.pop((op, name), None)


def test_env_reports_the_records():
    from tidar_kernels import env

    d = env.report()
    assert d["limits"]["tidar_attention"]["triton"]["dtypes"] == ["float16", "bfloat16", "float32"]
    assert d["limits"]["tidar_attention"]["triton"]["max_head_dim"] == 256
    assert d["limits"]["rejection_sample"]["reference"] == {"draws_philox": True}
    report = env.format_report(d)  # columns as wide as the longest op name: compare words, not spacing
    assert re.search(r"^\s*tidar_attention\s+triton\s+devices cuda; dtypes float16/bfloat16/float32", report, re.M)
