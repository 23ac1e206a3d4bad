"""``tidar env`` / ``tidar_kernels.env``: the report's keys, JSON output, and a built flag that tells the truth."""

from __future__ import annotations

import importlib
import json

import pytest

from tidar import cli
from tidar_kernels import env

KEYS = {
    "tidar_kernels",
    "python",
    "torch",
    "torch_cuda",
    "triton",
    "transformers",
    "cuda_available",
    "devices",
    "cuda_extension_built",
    "cuda_extension_error",
    "build",
    "backends",
}
OPS = {"kv_append", "rejection_sample", "draft_sample", "tidar_attention"}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def test_report_keys_and_types():
    d = env.report()
    assert KEYS <= set(d)
    assert isinstance(d["cuda_extension_built"], bool)
    assert d["cuda_extension_error"] is None or isinstance(d["cuda_extension_error"], str)
    assert OPS <= set(d["backends"])
    assert all("reference" in names for names in d["backends"].values())
    assert set(d["build"]) >= {"git_sha", "cuda_version", "torch_version", "archs"}
    json.dumps(d)  # serialisable as is


def test_built_flag_consistent_with_importability():
    d = env.report()
    assert d["cuda_extension_built"] == _importable("tidar_kernels.cuda")
    assert (d["cuda_extension_error"] is None) == d["cuda_extension_built"]
    if d["cuda_extension_built"]:
        assert _importable("tidar_kernels._C")
        assert d["build"]["archs"] and d["build"]["cuda_version"]


def test_cli_json(capsys):
    assert cli.main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert KEYS <= set(d)
    assert d["cuda_extension_built"] == env.report()["cuda_extension_built"]


def test_cli_text(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "CUDA extension" in out and "live backends" in out
    for op in OPS:
        assert op in out
    if not env.report()["cuda_extension_built"]:
        assert "why" in out


def test_format_report_without_extension():
    d = env.report()
    d.update(cuda_extension_built=False, cuda_extension_error="the CUDA extension tidar_kernels._C is not built")
    text = env.format_report(d)
    assert "not available" in text and "not built" in text


@pytest.mark.gpu
def test_report_lists_gpu():
    d = env.report()
    assert d["cuda_available"] and d["devices"] and d["devices"][0]["capability"]


def test_cli_reports_the_direct_body_and_its_switch(capsys, monkeypatch):
    assert cli.main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["hf_direct_body"]
    assert d["on"] is True and d["families"] == ["gemma", "llama", "mistral", "phi3", "qwen2", "qwen3"]
    monkeypatch.setenv("TIDAR_DIRECT_BODY", "0")
    assert cli.main(["env"]) == 0
    assert "HF decoder body: direct for gemma, llama, mistral, phi3, qwen2, qwen3" in capsys.readouterr().out.replace(
        "\n", " "
    )
    assert cli.main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hf_direct_body"]["on"] is False


def test_cli_reports_the_packed_cpu_projections_and_their_switch(capsys, monkeypatch):
    from tidar.hf import cpu_packed

    ok, why = cpu_packed.available()
    assert cli.main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["hf_cpu_packed"]
    assert d["on"] is ok and d["why"] == why and d["switch"] == "TIDAR_CPU_PACKED=0 turns it off"
    monkeypatch.setenv("TIDAR_CPU_PACKED", "0")
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "oneDNN-packed float32 weights: off: " in out and "(TIDAR_CPU_PACKED=0 turns it off)" in out
    assert cli.main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["hf_cpu_packed"]
    assert d["on"] is False and d["why"] == (why or "TIDAR_CPU_PACKED=0")
