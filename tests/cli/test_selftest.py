"""``tidar selftest`` on CPU: the Triton kernels under the interpreter (the conftest sets TRITON_INTERPRET) pass on
small cases, and a backend that disagrees with the reference is a FAIL row and exit status 1."""

from __future__ import annotations

import argparse

import pytest
import torch

from tidar.cli import selftest as st
from tidar_kernels import backends, layouts

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not backends.triton_interpreted(), reason="needs the Triton interpreter on CPU")


@pytest.fixture
def small(monkeypatch):
    """One small case per op (the command's own cases take about a minute under the interpreter)."""
    monkeypatch.setattr(
        st,
        "_attention_cases",
        lambda dev, interp: [("decode K=2, D=16, float32", layouts.decode_step(2), [5, 0], torch.float32, 16)],
    )
    monkeypatch.setattr(
        st,
        "_sampling_cases",
        lambda dev, interp: [
            ("T=1", 2, 3, 40, 1.0, None, None, 1.0, False),
            ("greedy Philox", 2, 3, 40, 0.0, None, None, 1.0, True),
        ],
    )


def _args(**kw):
    return argparse.Namespace(**{"device": None, "triton_interpret": False, "json": False, **kw})


def test_triton_passes_every_op(small):
    rows, missing = st.run_selftest("cpu", interpreted=True)
    assert {(r.op, r.backend) for r in rows} == {
        (op, "triton")
        for op in (
            "tidar_attention",
            "kv_append",
            "rejection_sample",
            "draft_sample",
            "tidar_attention_paged",
            "kv_append_paged",
        )
    }
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert any(k.startswith("cuda: ") for k in missing)  # CPU tensors: the CUDA backend is named as not tested


def test_a_wrong_backend_fails_with_exit_status_1(small, monkeypatch, capsys):
    def off_by_one_token(*args):
        out = backends._IMPLS["rejection_sample"]["reference"](*args)
        return (out[0], out[1], (out[2] + 1) % 40, out[3])

    monkeypatch.setitem(backends._IMPLS["rejection_sample"], "triton", off_by_one_token)
    monkeypatch.setattr(st, "check_attention", lambda *a: [])  # keep the test short
    monkeypatch.setattr(st, "check_paged", lambda *a: [])
    assert st.run(_args(triton_interpret=True)) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if " FAIL " in line]
    assert len(fails) == 2 and all(line.startswith("rejection_sample") for line in fails), out
    assert all(line.endswith("next_drafts differs from the reference's") for line in fails)
    assert "5 passed, 2 failed" in out


def test_a_kernel_error_is_a_failure_not_a_crash(small, monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(backends._IMPLS["kv_append"], "triton", broken)
    rows = st.check_kv_append(CPU, ["triton"])
    assert rows and not any(r.ok for r in rows)
    assert rows[0].detail == "RuntimeError: no kernel image is available for execution on the device"


def test_inputs_a_backend_declines_are_not_failures(small, monkeypatch):
    """The CUDA attention takes no float32: such a case is "n/a" for it, not a failure (shown with a fake record)."""
    real = backends.record("tidar_attention", "triton")
    monkeypatch.setitem(
        backends._RECORDS,
        ("tidar_attention", "triton"),
        backends.Impl("tidar_attention", "triton", ("cuda",), dtypes=(torch.float16,)),
    )
    rows = st.check_attention(CPU, ["triton"], True)
    assert [(r.ok, r.detail) for r in rows] == [
        (None, "not taken: the triton tidar_attention runs float16 inputs, got float32")
    ]
    assert real.supports(*[torch.zeros(1, 1, 1, 16)]) is None
