"""`tidar train` on TidarTrainer: one process == torchrun x 2 (gloo) == gradient accumulation, gradient
checkpointing keeps the gradients, --init-from converts a saved AR model exactly, .txt/.jsonl corpora, the module
split, bad inputs fail before any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import TINY, _args, _train, tiny_corpus  # noqa: F401  (module fixture)

import tidar
from tidar.train import checkpoint as ck_mod
from tidar.train import corpus as corpus_mod
from tidar.train import run as train_mod

pytest.importorskip("accelerate", reason="the train extra (accelerate) is required by tidar train")


def _losses(state):
    return [h["loss"] for h in state["log_history"]]


def _close(a, b, rel=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def test_trainer_is_one_class():
    import tidar.train
    from tidar.train.trainer import TidarTrainer

    assert tidar.train.TidarTrainer is TidarTrainer
    assert issubclass(TidarTrainer, __import__("transformers").Trainer)


def test_gradient_accumulation_2x2_equals_1x4(tiny_corpus, tmp_path):  # noqa: F811
    one, out1 = _train(tmp_path, tiny_corpus, "--max-steps", "3", name="one")
    acc, out2 = _train(tmp_path, tiny_corpus, "--max-steps", "3", "--grad-accum", "2", name="acc")
    _close(_losses(acc), _losses(one), 1e-5)
    a = ck_mod.load_checkpoint(out1)[0].state_dict()
    b = ck_mod.load_checkpoint(out2)[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_same_gradients(tiny_corpus, tmp_path):  # noqa: F811
    from conftest import tiny_model

    model = tidar.patch(tiny_model("qwen2", vocab=97, seed=1), draft_len=4)
    model.train()
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for gc in (False, True):
        if gc:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        tidar.hybrid_loss(model, x, 4).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    plain, _ = _train(tmp_path, tiny_corpus, "--max-steps", "2", name="plain")
    ckpt, _ = _train(tmp_path, tiny_corpus, "--max-steps", "2", "--gradient-checkpointing", name="gc")
    _close(_losses(ckpt), _losses(plain), 1e-5)


GREEDY_MIX = (
    "--diffusion-target",
    "greedy",
    "--distill-prompt-len",
    "8",
    "--distill-refresh",
    "2",
    "--distill-rows",
    "2",
    "--distill-ratio",
    "0.5",
)  # rows with AR only, AR + data diffusion, and generated rows, spread over ranks


def _launched_equals_one(launcher: list, tiny_corpus, tmp_path, steps: int, cwd=None):  # noqa: F811
    """Run ``launcher -m tidar train ...`` (2 processes) and compare its losses with one process, same global batch."""
    one, _ = _train(tmp_path, tiny_corpus, "--max-steps", str(steps), *GREEDY_MIX, name="one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", *launcher, "-m", "tidar", "train", "--corpus", str(tiny_corpus), "--output", str(out)]
    cmd += [*TINY, "--max-steps", str(steps), *GREEDY_MIX]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / ck_mod.STATE_FILE).read_text())
    assert state["processes"] == 2
    _close(_losses(state), _losses(one), 1e-4)
    for key in ("ar_loss", "diffusion_loss"):
        _close([h[key] for h in state["log_history"]], [h[key] for h in one["log_history"]], 1e-4)


def test_torchrun_two_processes_equal_one(tiny_corpus, tmp_path):  # noqa: F811
    _launched_equals_one(
        ["torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"], tiny_corpus, tmp_path, 3
    )


def test_accelerate_launch_two_processes_equal_one(tiny_corpus, tmp_path):  # noqa: F811
    """`accelerate launch` (the user's accelerate config; here 2 CPU processes) runs the same CLI with the same
    losses as one process with the same global batch."""
    launcher = [
        "accelerate.commands.launch",
        "--multi_gpu",  # accelerate's multi-process launcher (torch.distributed.run); without CUDA it runs gloo on CPUs
        *("--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", "29534"),
    ]
    _launched_equals_one(launcher, tiny_corpus, tmp_path, 2, cwd=tmp_path)


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_sharded_training_refuses_decoding_evaluation_before_any_step(tiny_corpus, tmp_path, monkeypatch, sharding):  # noqa: F811
    """Under FSDP / DeepSpeed ZeRO-3 the weights are sharded, so the held-out TiDAR decoding cannot run: a clear
    error before any step, naming the option that avoids it."""
    from tidar.train.trainer import TidarTrainer

    init = TidarTrainer.__init__

    def sharded_init(self, *a, **k):  # what accelerate's FSDP / DeepSpeed plugins set up on the Trainer
        init(self, *a, **k)
        if sharding == "fsdp":
            self.is_fsdp_enabled = True
        else:
            self.is_deepspeed_enabled = True

    monkeypatch.setattr(TidarTrainer, "__init__", sharded_init)
    monkeypatch.setattr(train_mod, "_zero3", lambda trainer: sharding == "zero3")
    steps = []
    monkeypatch.setattr(TidarTrainer, "training_step", lambda self, *a, **k: steps.append(1) or 0.0)
    with pytest.raises(ValueError, match=r"--eval-prompts 0"):
        _train(tmp_path, tiny_corpus, "--max-steps", "1", "--eval-prompts", "2", name="refused")
    assert steps == [] and not (tmp_path / "refused" / "model.safetensors").exists()


def _save_ar_model(folder, tokenizer, vocab_rows=None, seed=0, arch="qwen2"):
    from conftest import arch_classes

    config_cls, model_cls = arch_classes(arch)
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = model_cls(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def _tokenizer_without_mask(tiny_corpus):  # noqa: F811
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    c = corpus_mod.find_corpus(tiny_corpus)
    tok.train_from_iterator(c.train_texts(), trainer=tr)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.mark.parametrize("case", ["has_mask", "spare_row", "grow"])
def test_init_from_keeps_the_ar_logits(tiny_corpus, tmp_path, case):  # noqa: F811
    c = corpus_mod.find_corpus(tiny_corpus)
    tok = corpus_mod.train_tokenizer(c.train_files, 300) if case == "has_mask" else _tokenizer_without_mask(tiny_corpus)
    rows = len(tok) + 8 if case == "spare_row" else None
    src = _save_ar_model(tmp_path / "src", tok, rows)
    model, tok2, how = ck_mod.load_init_model(tmp_path / "src")
    n_rows = model.get_input_embeddings().weight.shape[0]
    if case == "has_mask":
        assert "reused" in how and n_rows == len(tok) and tok2.mask_token_id == tok.mask_token_id
    elif case == "spare_row":
        assert "spare" in how and n_rows == rows and tok2.mask_token_id == len(tok)
    else:
        assert "grew" in how and n_rows == len(tok) + 1 and tok2.mask_token_id == len(tok)
    assert model.config.mask_token_id == tok2.mask_token_id
    ids = tok("def f(x):\n    return x + 1\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = src(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits[..., : want.shape[-1]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_init_from_trains_and_saves_a_working_tidar_model(tiny_corpus, tmp_path, arch):  # noqa: F811
    """The conversion recipe on other families than the bundled model's: trains, saves, loads, decodes exactly."""
    from transformers import AutoModelForCausalLM

    c = corpus_mod.find_corpus(tiny_corpus)
    _save_ar_model(tmp_path / "src", corpus_mod.train_tokenizer(c.train_files, 300), arch=arch)
    state, out = _train(tmp_path, tiny_corpus, "--max-steps", "25", "--init-from", str(tmp_path / "src"), name="conv")
    hist = state["log_history"]
    assert sum(h["loss"] for h in hist[-4:]) / 4 < sum(h["loss"] for h in hist[:4]) / 4 - 0.3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    tok = ck_mod.load_tokenizer(out)
    assert model.config.mask_token_id == tok.mask_token_id and model.config.tidar_block_size == 8
    tidar.patch(model, draft_len=model.config.tidar_draft_len)
    ids = tok("def f(x):\n", return_tensors="pt")["input_ids"]
    res = tidar.generate(model, ids, max_new_tokens=12)
    tidar.unpatch(model)
    assert torch.equal(res.sequences, model.generate(ids, max_new_tokens=12, do_sample=False))


def test_txt_and_jsonl_corpora(tmp_path):
    docs = [
        corpus_mod.read_text(corpus_mod.stdlib_dir() / n).replace("\n", " ")[:3000]
        for n in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py", "glob.py", "keyword.py")
    ]
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    a = corpus_mod.find_corpus(tmp_path / "d.txt", heldout_percent=20)
    b = corpus_mod.find_corpus(tmp_path / "d.jsonl", heldout_percent=20)
    assert a.train_texts() == b.train_texts() and a.heldout_texts() == b.heldout_texts()
    assert a.heldout_texts() and len(a.train_texts()) + len(a.heldout_texts()) == len(docs)
    state, out = _train(tmp_path, tmp_path / "d.jsonl", "--max-steps", "3", name="jsonl")
    assert len(state["log_history"]) == 3 and (out / "demo_prompts.json").is_file()


def test_demo_loads_without_the_training_modules():
    code = (
        "import sys, tidar.cli.demo as d; m, t = d._load(d.bundled_model_dir(), 'cpu'); "
        "bad = [k for k in ('tidar.train.trainer', 'tidar.train.self_distill', 'transformers.trainer') "
        "if k in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def _bad_folder(tmp_path, name, config=None, tokenizer=True):
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


@pytest.mark.parametrize(
    "kind,match",
    [
        ("missing", "does not exist"),
        ("no_config", "no config.json"),
        ("not_causal", "is not a causal LM"),
        ("no_tokenizer", "has no tokenizer"),
    ],
)
def test_init_from_bad_inputs(tiny_corpus, tmp_path, kind, match):  # noqa: F811
    folder = {
        "missing": lambda: tmp_path / "nope",
        "no_config": lambda: _bad_folder(tmp_path, "nc"),
        "not_causal": lambda: _bad_folder(
            tmp_path, "seq", {"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]}
        ),
        "no_tokenizer": lambda: _bad_folder(
            tmp_path, "notok", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, False
        ),
    }[kind]()
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _train(tmp_path, tiny_corpus, "--max-steps", "1", "--init-from", str(folder))
    assert not (tmp_path / "run").exists()


def test_bad_inputs_before_any_step(tiny_corpus, tmp_path):  # noqa: F811
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match='line 2 has no "text"'):
        _train(tmp_path, tmp_path / "bad.jsonl", "--max-steps", "1")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        _train(tmp_path, tmp_path / "empty.txt", "--max-steps", "1")
    with pytest.raises(ValueError, match="must be a multiple of processes x --grad-accum"):
        _train(tmp_path, tiny_corpus, "--max-steps", "1", "--grad-accum", "3")
    _, out = _train(tmp_path, tiny_corpus, "--max-steps", "2", "--save-every", "1", name="small")
    with pytest.raises(ValueError, match="checkpoint of another model: --hidden-size 32 there, 64 here"):
        _train(
            tmp_path,
            tiny_corpus,
            "--max-steps",
            "3",
            "--resume",
            str(out / "checkpoint-2"),
            "--hidden-size",
            "64",
            name="small",
        )
    with pytest.raises(ValueError, match="not a resumable"):
        _train(tmp_path, tiny_corpus, "--max-steps", "3", "--resume", str(out), name="small")
