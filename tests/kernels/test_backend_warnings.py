"""When ``backend="auto"`` warns: on CPU tensors the PyTorch reference *is* the backend, so nothing is said; once
per backend where a faster one was expected and is missing: CUDA tensors without the CUDA extension (or without
Triton), a Triton kernel that fails to compile (its inputs then go to the next backend). ``tidar env`` still says
which backends are live.

No GPU needed: ``resolve`` only looks at the device type, so a CUDA device can be named; the loaders' errors and the
implementations are monkeypatched."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import tidar
import tidar_kernels as tk
from tidar_kernels import _loaders, backends, layouts

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch):
    """Nothing warned yet, no kernel marked broken (restored after the test)."""
    backends.resolve("kv_append", "reference", CPU)  # load the backends
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setattr(backends, "_BROKEN", set(), raising=False)


def _tidar_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "tidar_kernels" in str(w.message)]


def _record(fn):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn()
    return out, _tidar_warnings(record)


def _cpu_op_calls():
    lay = layouts.decode_step(2)
    q = torch.randn(1, 2, lay.seg_len, 8)
    k = torch.randn(1, 2, lay.seg_len + 3, 8)
    tk.tidar_attention(q, k, k, lay.local_limit, lay.block_id, torch.tensor([3], dtype=torch.int32))
    cache = torch.zeros(1, 2, 8, 4)
    tk.kv_append(cache, cache.clone(), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), torch.tensor([2]))
    logits = torch.randn(2, 3, 11)
    tk.rejection_sample(logits, torch.randn(2, 3, 3, 11), torch.zeros(2, 3, dtype=torch.long))
    tk.draft_sample(torch.randn(2, 11), torch.randn(2, 3, 11))


def test_no_warning_for_cpu_tensors(fresh):
    for op in ("kv_append", "tidar_attention", "rejection_sample", "draft_sample"):
        _, said = _record(lambda op=op: backends.resolve(op, "auto", CPU))
        assert said == [], said
    _, said = _record(_cpu_op_calls)
    assert said == [], said


def test_no_warning_for_a_cpu_generate(fresh):
    model = tiny_model("qwen2")

    def run():
        tidar.patch(model, draft_len=3)
        return tidar.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=5)

    out, said = _record(run)
    assert out.sequences.shape == (1, 8) and said == [], said


@pytest.fixture
def no_cuda_extension(monkeypatch, fresh):
    """The CUDA extension did not load (as on a machine where it was never built)."""
    monkeypatch.setitem(_loaders._ERRORS, "cuda", "the CUDA extension tidar_kernels._C is not built (test)")
    for impls in backends._IMPLS.values():
        if "cuda" in impls:
            monkeypatch.delitem(impls, "cuda")


def test_cuda_tensors_without_the_extension_warn_once(no_cuda_extension):
    chain, said = _record(lambda: backends.resolve("kv_append", "auto", CUDA))
    assert [r.backend for r in chain.records] == ["triton", "reference"]
    assert len(said) == 1
    assert "the cuda backend is missing (the CUDA extension tidar_kernels._C is not built (test))" in said[0]
    assert "runs the triton kernels on CUDA tensors instead (first for kv_append)" in said[0]
    assert "tidar env" in said[0]
    for op in ("kv_append", "tidar_attention", "rejection_sample"):  # once per backend, not per op or call
        _, said = _record(lambda op=op: backends.resolve(op, "auto", CUDA))
        assert said == []
    _, said = _record(lambda: backends.resolve("kv_append", "auto", CPU))
    assert said == []


def test_cuda_tensors_without_any_kernel_backend_name_the_reference(no_cuda_extension, monkeypatch):
    monkeypatch.setitem(_loaders._ERRORS, "triton", "tidar_kernels.triton not importable: no module triton (test)")
    for impls in backends._IMPLS.values():
        if "triton" in impls:
            monkeypatch.delitem(impls, "triton")
    chain, said = _record(lambda: backends.resolve("tidar_attention", "auto", CUDA))
    assert [r.backend for r in chain.records] == ["reference"]
    assert len(said) == 2 and all("runs the PyTorch reference on CUDA tensors instead" in s for s in said)
    assert "the cuda backend is missing" in said[0] and "the triton backend is missing" in said[1]


def test_cuda_tensors_with_every_backend_loaded_say_nothing(fresh):
    if _loaders.load_error("cuda") is not None or _loaders.load_error("triton") is not None:
        pytest.skip("a kernel backend does not load here")
    _, said = _record(lambda: backends.resolve("kv_append", "auto", CUDA))
    assert said == []


@pytest.fixture
def fake_op(fresh):
    """An op with a reference and a Triton implementation; ``calls`` lists which ran, ``fail`` what Triton raises."""
    op, calls, fail = "_test_compile_op", [], {}

    def triton_impl(x):
        calls.append("triton")
        if x.dtype in fail:
            raise fail[x.dtype]
        return "triton"

    backends.register(op, "reference")(lambda x: calls.append("reference") or "reference")
    backends.register(op, "triton")(triton_impl)
    yield op, calls, fail
    backends._IMPLS.pop(op, None)
    for name in backends.BACKENDS:
        backends._RECORDS.pop((op, name), None)


@pytest.mark.parametrize(
    "error",
    [OutOfResources(300000, 232448, "shared memory"), CompilationError("src", None, "unsupported layout")],
    ids=["out_of_resources", "compilation_error"],
)
def test_a_triton_kernel_that_fails_to_compile_hands_on_and_warns_once(fake_op, error):
    op, calls, fail = fake_op
    fail[torch.float16] = error
    chain = backends.resolve(op, "auto", CUDA)
    assert [r.backend for r in chain.records][-2:] == ["triton", "reference"]
    out, said = _record(lambda: chain(torch.zeros(2, 64, dtype=torch.float16)))
    assert out == "reference" and calls == ["triton", "reference"]
    assert len(said) == 1 and f"the triton {op} kernel failed to compile for float16 inputs of last dim 64" in said[0]
    assert type(error).__name__ in said[0] and "runs the PyTorch reference for them from now on" in said[0]
    calls.clear()
    out, said = _record(lambda: chain(torch.zeros(2, 64, dtype=torch.float16)))
    assert out == "reference" and calls == ["reference"] and said == []  # not compiled again
    calls.clear()
    out, said = _record(lambda: chain(torch.zeros(2, 64, dtype=torch.float32)))  # other inputs: Triton again
    assert out == "triton" and calls == ["triton"] and said == []


def test_other_triton_errors_are_not_swallowed(fake_op):
    op, calls, fail = fake_op
    fail[torch.float16] = RuntimeError("CUDA error: an illegal memory access was encountered")
    chain = backends.resolve(op, "auto", CUDA)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        chain(torch.zeros(2, 64, dtype=torch.float16))
    assert backends._BROKEN == set()


def test_an_explicit_triton_backend_raises_the_compile_error(fake_op):
    op, calls, fail = fake_op
    fail[torch.float16] = OutOfResources(300000, 232448, "shared memory")
    with pytest.raises(OutOfResources):
        backends.resolve(op, "triton", CUDA)(torch.zeros(2, 64, dtype=torch.float16))


def test_tidar_env_still_lists_the_live_backends(no_cuda_extension):
    from tidar_kernels import env

    report = env.report()
    assert report["cuda_extension_error"] == "the CUDA extension tidar_kernels._C is not built (test)"
    for op, live in report["backends"].items():
        assert live[0] == "reference" and "cuda" not in live, (op, live)
    assert "reference" in env.format_report(report)
