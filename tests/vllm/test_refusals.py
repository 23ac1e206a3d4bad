"""An engine TiDAR cannot serve exactly is refused at start, naming the reason; an option it cannot honour is
switched off with a logged reason."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import MODEL

import tidar.vllm


def _model_copy(tmp_path, **config_changes):
    dst = tmp_path / "model"
    shutil.copytree(MODEL, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in config_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_model_without_mask_token_refused(tmp_path):
    import vllm

    path = _model_copy(tmp_path, mask_token_id=None)
    with pytest.raises(ValueError, match=r"needs a model with a \[MASK\] token: config.mask_token_id"):
        vllm.LLM(model=path, speculative_config=tidar.vllm.speculative_config(4), enforce_eager=True, dtype="float32")


def test_unsupported_architecture_refused(tmp_path):
    import transformers
    import vllm

    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=4096, mask_token_id=2, n_positions=256)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    shutil.copy(f"{MODEL}/tokenizer.json", tmp_path / "gpt2")
    shutil.copy(f"{MODEL}/tokenizer_config.json", tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"TiDAR in vLLM supports the architectures .*GPT2LMHeadModel"):
        vllm.LLM(
            model=str(tmp_path / "gpt2"),
            speculative_config=tidar.vllm.speculative_config(4),
            enforce_eager=True,
            dtype="float32",
        )


def test_compiled_graphs_switched_off_with_a_reason(caplog):
    from vllm.engine.arg_utils import EngineArgs

    from tidar.vllm.engine_checks import adjust_engine_args

    args = EngineArgs(model=MODEL, speculative_config=tidar.vllm.speculative_config(4), enforce_eager=False)
    with caplog.at_level(logging.WARNING, logger="tidar.vllm"):
        adjust_engine_args(args)
    assert args.enforce_eager is True
    assert "enforce_eager switched on" in caplog.text
    plain = EngineArgs(model=MODEL, enforce_eager=False)
    adjust_engine_args(plain)
    assert plain.enforce_eager is False  # engines without TiDAR are left alone
