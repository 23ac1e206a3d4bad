"""``tidar train --site-packages``: the standard library plus installed packages' sources, split by top-level name,
de-duplicated, licence-filtered, torch/transformers and the project left out; its manifest; resume on it."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil

import pytest

from tidar.train import corpus as corpus_mod
from tidar.train import run as train_mod
from tidar.train.args import add_arguments

STDLIB_FILES = ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "keyword.py", "fnmatch.py", "glob.py")
TINY = (
    "--hidden-size 32 --layers 1 --heads 2 --vocab-size 300 --seq-len 32 --block-size 8 --batch-size 4 --lr 1e-2 "
    "--warmup-steps 2 --eval-every 0 --eval-batches 1 --eval-prompts 1 --eval-new-tokens 8 --log-every 1000 "
    "--device cpu --backend reference --no-diffusion"
).split()


def _dist(sp, name, files, licence=None, classifiers=()):
    """A distribution in the fake site-packages ``sp``: its files (path -> text), METADATA and RECORD."""
    info = sp / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    meta = [f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0"]
    meta += [f"License-Expression: {licence}"] if licence else []
    meta += [f"Classifier: {c}" for c in classifiers]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    for rel, text in files.items():
        (sp / rel).parent.mkdir(parents=True, exist_ok=True)
        (sp / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*files, f"{info.name}/METADATA"]))


def _code(name, n=40):
    return "".join(f"def {name}_{i}(x):\n    return x + {i}  # {name}\n\n" for i in range(n))


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """A small 'standard library' (real stdlib modules) and a site-packages with one package of each kind."""
    std = tmp_path / "stdlib"
    std.mkdir()
    for name in STDLIB_FILES:
        shutil.copy(corpus_mod.stdlib_dir() / name, std / name)
    sp = tmp_path / "site-packages"
    _dist(sp, "goodpkg", {"goodpkg/__init__.py": _code("good"), "goodpkg/tests/test_a.py": _code("t")}, "MIT")
    _dist(sp, "vendoring", {"vendoring/a.py": _code("v"), "vendoring/_vendor/b.py": _code("vb")}, "BSD-3-Clause")
    _dist(sp, "zcopy", {"zcopy.py": _code("good")}, classifiers=["License :: OSI Approved :: MIT License"])
    _dist(sp, "lesser7", {"lesser7/core.py": _code("lesser7")}, "LGPL-2.1-only")
    _dist(sp, "gplpkg", {"gplpkg.py": _code("gpl")}, "GPL-3.0-only")
    _dist(sp, "closed", {"closed.py": _code("closed")}, classifiers=["License :: Other/Proprietary License"])
    _dist(sp, "nolicence", {"nolicence.py": _code("nolic")})
    _dist(sp, "torch", {"torch/__init__.py": _code("torch")}, "BSD-3-Clause")
    _dist(sp, "tidar-kernels", {"tidar_kernels_finder.py": _code("tidar")}, "MIT")
    monkeypatch.setattr(corpus_mod, "stdlib_dir", lambda: std)
    monkeypatch.setattr(corpus_mod, "installed_distributions", lambda: list(md.distributions(path=[str(sp)])))
    return std, sp


@pytest.mark.parametrize(
    "licence, ok",
    [
        ("MIT", True),
        ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", True),
        ("Apache-2.0 OR BSD-2-Clause", True),
        ("PSF-2.0", True),
        ("MPL-2.0 AND MIT", True),
        ("GNU Lesser General Public License v2 or later (LGPLv2+)", True),
        ("ISC License (ISCL)", True),
        ("GPL-3.0-only", False),
        ("GNU General Public License v3 (GPLv3)", False),
        ("MIT OR GPL-2.0-or-later", False),  # conservative: any strong copyleft term skips the package
        ("AGPL-3.0", False),
        ("LicenseRef-NVIDIA-Proprietary", False),
        ("Other/Proprietary License", False),
        ("", False),
        ("Copyright (c) someone, all rights reserved", False),
    ],
)
def test_licence_rule(licence, ok):
    assert corpus_mod.licence_allowed(licence) is ok


def test_code_corpus_on_a_fake_site_packages(fake_env):
    std, sp = fake_env
    c = corpus_mod.find_code_corpus(heldout_percent=12.0)
    alone = corpus_mod.find_corpus(None, heldout_percent=12.0)
    stdlib = lambda files: [f for f in files if f.parent == std]  # noqa: E731
    assert stdlib(c.train_files) == alone.train_files and stdlib(c.heldout_files) == alone.heldout_files
    m = c.manifest
    kept = {p["name"]: p for p in m["packages"]}
    skipped = {p["name"]: p["reason"] for p in m["skipped"]}
    assert set(kept) == {"goodpkg", "vendoring", "lesser7"}
    assert kept["goodpkg"]["licence"] == "MIT" and kept["goodpkg"]["version"] == "1.0"
    assert skipped == {
        "zcopy": "no source files",  # its one file is goodpkg's: a duplicate
        "gplpkg": "licence not permissive",
        "closed": "licence not permissive",
        "nolicence": "no licence metadata",
        "torch": "held out",
        "tidar-kernels": "the project itself",
    }
    assert m["duplicates_dropped"] == 1 and m["held_out_packages"] == ["torch", "transformers"]
    files = {f.relative_to(sp).as_posix() for f in c.train_files + c.heldout_files if sp in f.parents}
    assert files == {"goodpkg/__init__.py", "vendoring/a.py", "lesser7/core.py"}  # no tests/, no _vendor/
    for f in c.train_files + c.heldout_files:
        if sp in f.parents:  # a package's files are split by its top-level name, like a stdlib module
            top = f.relative_to(sp).parts[0]
            assert c.module(f) == top and (f in c.heldout_files) == corpus_mod.is_heldout(top, 12.0)
    assert kept["lesser7"]["heldout_files"] == 1 and kept["goodpkg"]["train_files"] == 1
    assert m["train_files"] == len(c.train_files) and m["heldout_files"] == len(c.heldout_files)
    assert corpus_mod.find_code_corpus(heldout_percent=12.0).manifest == m  # deterministic
    (sp / "lesser7" / "core.py").write_text(_code("changed"))
    assert corpus_mod.find_code_corpus(heldout_percent=12.0).manifest["digest"] != m["digest"]


def test_code_corpus_of_this_interpreter():
    c = corpus_mod.find_code_corpus()
    names = {p["name"] for p in c.manifest["packages"]}
    assert not names & {"torch", "transformers", "tidar-kernels"}
    tops = {c.module(f) for f in c.train_files + c.heldout_files}
    assert not tops & {"torch", "transformers", "functorch", "torchgen", "tidar", "tidar_kernels"}
    std = corpus_mod.find_corpus()
    assert set(std.heldout_files) <= set(c.heldout_files) and set(std.train_files) <= set(c.train_files)
    assert {"_compat_pickle", "_pydecimal", "abc", "pathlib", "turtledemo"} <= set(c.heldout_modules)
    assert len(c.train_files) > len(std.train_files)


def _train(out, *extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--site-packages", "--heldout-percent", "12", "--output", str(out), *TINY, *extra])
    return train_mod.train(args, log=lambda s: None)


def test_train_on_it_writes_the_manifest_and_resumes_exactly(fake_env, tmp_path):
    _, sp = fake_env
    full = _train(tmp_path / "a", "--max-steps", "6", "--save-every", "3", "--keep-checkpoints", "3")
    manifest = json.loads((tmp_path / "a" / "corpus_manifest.json").read_text())
    assert {p["name"] for p in manifest["packages"]} == {"goodpkg", "vendoring", "lesser7"}
    ck = tmp_path / "a" / "checkpoint-3"
    assert json.loads((ck / "tidar_state.json").read_text())["corpus"]["digest"] == manifest["digest"]
    resumed = _train(tmp_path / "b", "--max-steps", "6", "--resume", str(ck))
    assert resumed["log_history"] == full["log_history"]
    (sp / "lesser7" / "core.py").write_text(_code("changed"))
    with pytest.raises(ValueError, match="corpus differs"):
        _train(tmp_path / "c", "--max-steps", "6", "--resume", str(ck))
    _train(tmp_path / "c", "--max-steps", "4", "--resume", str(ck), "--allow-corpus-change")


def test_site_packages_with_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--site-packages"):
        _train(tmp_path / "x", "--corpus", str(tmp_path), "--max-steps", "1")
