"""``tidar train`` on a tiny corpus: losses go down, resume replays the same curve, checkpoints carry the
TiDAR settings, bad inputs fail clearly."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

import tidar
from tidar.train import corpus as corpus_mod
from tidar.train import run as train_mod
from tidar.train.args import add_arguments

TINY = [
    "--hidden-size",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--vocab-size",
    "300",
    "--seq-len",
    "32",
    "--block-size",
    "8",
    "--batch-size",
    "4",
    "--lr",
    "1e-2",
    "--warmup-steps",
    "2",
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--eval-batches",
    "1",
    "--eval-prompts",
    "1",
    "--eval-new-tokens",
    "8",
    "--log-every",
    "1000",
    "--device",
    "cpu",
    "--backend",
    "reference",
]


def _args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A handful of real standard-library modules copied into a folder (each file is one module)."""
    root = tmp_path_factory.mktemp("corpus")
    std = corpus_mod.stdlib_dir()
    for name in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "keyword.py", "fnmatch.py", "glob.py"):
        shutil.copy(std / name, root / name)
    return root


def _train(tmp_path, corpus, *extra, name="run"):
    args = _args("--corpus", str(corpus), "--output", str(tmp_path / name), *TINY, *extra)
    return train_mod.train(args, log=lambda s: None), tmp_path / name


def test_split_is_deterministic_and_by_module():
    c1, c2 = corpus_mod.find_corpus(), corpus_mod.find_corpus()
    assert c1.train_files == c2.train_files and c1.heldout_files == c2.heldout_files
    assert c1.heldout_files and len(c1.train_files) > 10 * len(c1.heldout_modules)
    train_modules = {corpus_mod.module_of(c1.root, f) for f in c1.train_files}
    assert not train_modules & set(c1.heldout_modules)
    assert not any(part in ("test", "site-packages") for f in c1.train_files for part in f.relative_to(c1.root).parts)


def test_tokenizer_special_tokens_and_round_trip(tiny_corpus):
    c = corpus_mod.find_corpus(tiny_corpus)
    tok = corpus_mod.train_tokenizer(c.train_files, 300)
    assert len(tok) == 300
    assert {tok.eos_token, tok.pad_token, tok.mask_token} == set(corpus_mod.SPECIAL_TOKENS)
    text = "def f(x):\n    return x  # é\n\n\tpass\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_training_reduces_both_losses_and_saves_tidar_settings(tiny_corpus, tmp_path):
    state, out = _train(tmp_path, tiny_corpus, "--max-steps", "40")
    hist = state["log_history"]
    assert len(hist) == 40
    for key in ("ar_loss", "diffusion_loss"):
        first = sum(h[key] for h in hist[:4]) / 4
        last = sum(h[key] for h in hist[-4:]) / 4
        assert last < first - 0.5, (key, first, last)
    ev = state["eval_history"][-1]
    assert {"ar_perplexity", "diffusion_loss"} <= set(ev)
    config = json.loads((out / "config.json").read_text())
    assert config["tidar_draft_len"] == 8 and config["mask_token_id"] is not None
    assert config["use_cache"] is True  # generate keeps its KV cache by default
    model, tok, _ = train_mod.load_checkpoint(out)
    assert model.config.mask_token_id == tok.mask_token_id
    assert model.config._attn_implementation == "sdpa"
    tidar.patch(model, draft_len=model.config.tidar_draft_len)
    ids = tok("def f(x):\n", return_tensors="pt")["input_ids"]
    res = tidar.generate(model, ids, max_new_tokens=8)
    tidar.unpatch(model)
    ar = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(res.sequences, ar)


def test_no_diffusion_baseline(tiny_corpus, tmp_path):
    state, out = _train(tmp_path, tiny_corpus, "--max-steps", "6", "--no-diffusion")
    assert all("diffusion_loss" not in h for h in state["log_history"])
    assert json.loads((out / "config.json").read_text())["tidar_objective"] == "ar"


def test_resume_reproduces_the_loss_curve(tiny_corpus, tmp_path):
    full, out = _train(
        tmp_path, tiny_corpus, "--max-steps", "8", "--save-every", "4", "--keep-checkpoints", "5", name="a"
    )
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()
    resumed, _ = _train(tmp_path, tiny_corpus, "--max-steps", "8", "--resume", str(out / "checkpoint-4"), name="b")
    assert resumed["log_history"] == full["log_history"]  # steps 1-4 carried over, 5-8 recomputed identically
    again, _ = _train(
        tmp_path, tiny_corpus, "--max-steps", "8", "--resume", "latest", name="a"
    )  # newest = 8: nothing left
    assert again["log_history"] == full["log_history"]


def test_bad_inputs(tiny_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _train(tmp_path, tmp_path / "nope", "--max-steps", "1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.py").write_text("")
    with pytest.raises(ValueError, match="no non-empty files"):
        _train(tmp_path, tmp_path / "empty", "--max-steps", "1")
    with pytest.raises(ValueError, match="not a multiple of --block-size"):
        _train(tmp_path, tiny_corpus, "--max-steps", "1", "--seq-len", "30")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _train(tmp_path, tiny_corpus, "--max-steps", "1", "--resume", "latest", name="fresh")


def test_corrupt_checkpoint(tiny_corpus, tmp_path, capsys):
    _, out = _train(tmp_path, tiny_corpus, "--max-steps", "2", "--save-every", "1")
    ck = out / "checkpoint-2"
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        train_mod.load_checkpoint(ck)
    with pytest.raises(ValueError, match="corrupt"):
        _train(tmp_path, tiny_corpus, "--max-steps", "3", "--resume", str(ck))
    (ck / "config.json").unlink()
    with pytest.raises(ValueError, match="incomplete: missing config.json"):
        train_mod.load_checkpoint(ck)
    # the CLI turns it into a one-line error and exit code 2
    from tidar.cli import main

    rc = main(["train", "--corpus", str(tiny_corpus), "--output", str(out), *TINY, "--resume", str(ck)])
    assert rc == 2 and "incomplete" in capsys.readouterr().err


def test_a_stop_file_ends_the_run_with_a_checkpoint_that_resumes_exactly(tiny_corpus, tmp_path):
    """A long background run is ended on demand: a STOP file in the output folder stops it after the current step
    with a checkpoint (the file is consumed), and ``--resume latest`` continues to the same losses as a run that was
    never stopped."""
    from tidar.train.trainer import STOP_FILE

    full, _ = _train(tmp_path, tiny_corpus, "--max-steps", "6", name="full")
    out = tmp_path / "stopped"
    out.mkdir()
    (out / STOP_FILE).write_text("")
    part, _ = _train(tmp_path, tiny_corpus, "--max-steps", "6", name="stopped")
    assert [h["step"] for h in part["log_history"]] == [1]
    assert (out / "checkpoint-1" / "optimizer.pt").is_file() and not (out / STOP_FILE).exists()
    resumed, _ = _train(tmp_path, tiny_corpus, "--max-steps", "6", "--resume", "latest", name="stopped")
    assert resumed["log_history"] == full["log_history"]


def test_sigterm_ends_a_training_process_with_a_checkpoint(tiny_corpus, tmp_path):
    """``kill PID`` (SIGTERM) on ``tidar train``: the process finishes its step, saves a checkpoint and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tidar", "train", "--corpus", str(tiny_corpus), "--output", str(out), *TINY]
    cmd += ["--max-steps", "100000", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training steps run (the handler is installed at the first step)
        lines.append(line)
        if line.startswith("step 3/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "stop requested" in log
    saved = sorted(out.glob("checkpoint-*"))
    assert saved and (saved[-1] / "optimizer.pt").is_file(), log[-2000:]


def test_a_run_started_with_init_from_resumes_from_its_checkpoint(tiny_corpus, tmp_path):
    """A conversion (``--init-from``) stopped with a checkpoint continues with ``--resume latest`` alone (the two
    options exclude each other) to the same losses as a conversion never stopped, and its record keeps the
    ``--init-from`` it started from, so a second resume is accepted too."""
    _, ar = _train(tmp_path, tiny_corpus, "--max-steps", "2", "--no-diffusion", name="ar")
    conv = ("--max-steps", "5", "--save-every", "0")
    full, _ = _train(tmp_path, tiny_corpus, "--init-from", str(ar), *conv, name="full")
    _train(tmp_path, tiny_corpus, "--init-from", str(ar), *conv, "--stop-after", "2", name="conv")
    _train(tmp_path, tiny_corpus, "--resume", "latest", *conv, "--stop-after", "4", name="conv")
    resumed, out = _train(tmp_path, tiny_corpus, "--resume", "latest", *conv, name="conv")
    assert resumed["log_history"] == full["log_history"]
    saved = json.loads((out / "checkpoint-4" / "tidar_state.json").read_text())["args"]
    assert saved["init_from"] == str(ar)
