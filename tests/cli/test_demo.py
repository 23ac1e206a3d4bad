"""``tidar demo`` on the bundled model: greedy TiDAR text identical to AR text, stats reported."""

from __future__ import annotations

import json
from pathlib import Path

import tidar
from tidar.cli import demo, main

BUNDLED = Path(tidar.__file__).resolve().parents[2] / "models" / demo.BUNDLED_NAME


def test_bundled_model_is_small_safetensors_with_tidar_settings():
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir() if p.is_file()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pth")) for n in files)
    assert sum(files.values()) < 20 * 2**20
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["mask_token_id"] is not None and config["tidar_draft_len"] >= 1
    assert {"README.md", "tokenizer.json", demo.PROMPTS_FILE} <= set(files)
    assert demo.bundled_model_dir() == BUNDLED


def test_demo_json_identical(capsys):
    rc = main(["demo", "--json", "--device", "cpu", "--max-new-tokens", "32"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["identical"] is True
    assert len(out["prompts"]) >= 2 and all(p["identical"] for p in out["prompts"])
    assert all(p["ar_text"] == p["tidar_text"] and p["new_tokens"] == 32 for p in out["prompts"])
    assert out["tokens_per_forward"] >= 1.0
    assert sum(out["accepted_histogram"].values()) > 0
    assert out["ar_tokens_per_s"] > 0 and out["tidar_tokens_per_s"] > 0
    # the model folder's demo setting is the default (the bundled model's: HF's repetition penalty 1.2)
    setting = json.loads((BUNDLED / demo.PROMPTS_FILE).read_text()).get("repetition_penalty", 1.0)
    assert out["repetition_penalty"] == setting


def test_demo_repetition_penalty_changes_both_texts_alike(capsys):
    """The penalty is HF's processor on both sides: the AR text changes with it and TiDAR's follows exactly."""
    prompt = "class Stack:\n    def __init__(self):\n"
    runs = {}
    for rp in ("1", "1.3"):
        argv = ["demo", "--json", "--prompt", prompt, "--max-new-tokens", "40", "--device", "cpu"]
        assert main([*argv, "--repetition-penalty", rp]) == 0
        runs[rp] = json.loads(capsys.readouterr().out)
        assert runs[rp]["identical"] is True and runs[rp]["repetition_penalty"] == float(rp)
    plain, penalised = runs["1"]["prompts"][0], runs["1.3"]["prompts"][0]
    assert plain["ar_text"] != penalised["ar_text"]  # the penalty took effect, on both sides alike


def test_demo_streams_text_with_a_custom_prompt(capsys):
    rc = main(["demo", "--prompt", "def add(a, b):\n", "--max-new-tokens", "12", "--draft-len", "4", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "--- AR (Hugging Face generate) ---" in text and "--- TiDAR ---" in text
    assert "identical to AR" in text and "tokens per forward" in text and "accepted-length histogram" in text


def test_demo_sampling_runs(capsys):
    rc = main(
        [
            "demo",
            "--json",
            "--prompt",
            "import os\n",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.8",
            "--device",
            "cpu",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["identical"] is None and out["prompts"][0]["new_tokens"] >= 1


def test_demo_bad_inputs(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--model", str(tmp_path / "missing"), "--json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["demo", "--max-new-tokens", "0", "--json"]) == 2
    assert "max-new-tokens" in capsys.readouterr().err
    assert main(["demo", "--repetition-penalty", "0", "--json"]) == 2
    assert "--repetition-penalty must be a number > 0" in capsys.readouterr().err
    monkeypatch.setenv("TIDAR_MODEL", str(tmp_path))
    assert demo.bundled_model_dir() == BUNDLED  # an empty TIDAR_MODEL folder is skipped, the repo copy found
