"""Training corpus for ``tidar train``: a folder of text/code files (default: the running interpreter's
standard library source) or one ``.txt`` / ``.jsonl`` file, a deterministic train/held-out split, and a
byte-level BPE tokenizer trained with ``tokenizers`` on the training split.

A folder is split by *module* (the first path component under the root: ``json/`` or ``argparse.py``), decided
by a hash of its name, so it is the same on every machine and never splits one package across the halves.
A ``.txt`` file holds one document per line, a ``.jsonl`` file one ``{"text": ...}`` object per line; documents
are split by a hash of their text. Documents are packed into one token stream with EOS between them.

``find_code_corpus`` adds the Python sources of the packages installed in site-packages to the standard library
(``tidar train --site-packages``): see its docstring for the split, the de-duplication and the licence rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

EOS, PAD, MASK = "<|endoftext|>", "<|pad|>", "[MASK]"
SPECIAL_TOKENS = (EOS, PAD, MASK)
DEFAULT_EXTENSIONS = (".py",)
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", ".git"}


def stdlib_dir() -> Path:
    """The standard library source folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Corpus:
    root: Path
    train_files: list  # [Path] (a folder corpus; empty for a .txt/.jsonl file)
    heldout_files: list  # [Path]
    train_docs: list | None = None  # [str] (a .txt/.jsonl corpus)
    heldout_docs: list | None = None
    modules: dict | None = None  # {Path: module name} (a stdlib + site-packages corpus: files under two roots)
    manifest: dict | None = None  # packages, versions, licences, digest (find_code_corpus)

    def module(self, f: Path) -> str:
        return self.modules[f] if self.modules is not None else module_of(self.root, f)

    @property
    def heldout_modules(self) -> list:
        if self.heldout_docs is not None:
            return [f"{self.root.name}: {len(self.heldout_docs)} held-out documents"]
        return sorted({self.module(f) for f in self.heldout_files})

    def train_texts(self) -> list:
        return self.train_docs if self.train_docs is not None else [read_text(f) for f in self.train_files]

    def heldout_texts(self) -> list:
        return self.heldout_docs if self.heldout_docs is not None else [read_text(f) for f in self.heldout_files]


def read_documents(path: Path) -> list:
    """The documents of a ``.txt`` (one per non-empty line) or ``.jsonl`` (``{"text": ...}`` per line) file."""
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not valid JSON ({e})") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f'{path} line {n} has no "text" string field (each line must be {{"text": ...}})')
                if obj["text"]:
                    docs.append(obj["text"])
            else:
                docs.append(line.rstrip("\n"))
    if not docs:
        raise ValueError(f"corpus file {path} has no non-empty documents")
    return docs


def _doc_corpus(path: Path, heldout_percent: float) -> Corpus:
    docs = read_documents(path)
    train, held = [], []
    for d in docs:
        (held if is_heldout(d, heldout_percent) else train).append(d)
    if not train:
        raise ValueError(f"every document of {path} fell into the held-out split; lower --heldout-percent")
    if not held and heldout_percent > 0:  # tiny corpora: hold out the last document so evaluation has data
        held = [train.pop()] if len(train) > 1 else list(train)
    return Corpus(path, [], [], train, held)


def module_of(root: Path, path: Path) -> str:
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def is_heldout(module: str, heldout_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big")
    return (h % 10_000) < heldout_percent * 100


def find_corpus(root=None, extensions=DEFAULT_EXTENSIONS, heldout_percent: float = 8.0) -> Corpus:
    """Collect the files under ``root`` (default: the stdlib) with the given extensions, skipping tests,
    installed packages and caches, and split them by module. Raises a clear error for a missing or empty folder."""
    root = stdlib_dir() if root is None else Path(root)
    if not root.exists():
        raise FileNotFoundError(f"corpus folder {root} does not exist")
    if not 0 <= heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in [0, 100), got {heldout_percent}")
    if root.is_file() and root.suffix in (".txt", ".jsonl"):
        return _doc_corpus(root, heldout_percent)
    if not root.is_dir():
        raise NotADirectoryError(f"corpus {root} is not a folder, a .txt or a .jsonl file")
    exts = _exts(extensions)
    files = _walk(root, exts)
    if not files:
        raise ValueError(f"corpus folder {root} has no non-empty files ending in {', '.join(exts)}")
    train, held = [], []
    for f in files:
        (held if is_heldout(module_of(root, f), heldout_percent) else train).append(f)
    if not train:
        raise ValueError(f"every module of {root} fell into the held-out split; lower --heldout-percent")
    if not held and heldout_percent > 0:  # tiny corpora: hold out the last module so evaluation has data
        last = module_of(root, train[-1])
        held = [f for f in train if module_of(root, f) == last]
        train = [f for f in train if module_of(root, f) != last] or held
    return Corpus(root, train, held)


def _exts(extensions) -> tuple:
    return tuple(e if e.startswith(".") else "." + e for e in extensions)


def _walk(root: Path, exts: tuple) -> list:
    """The non-empty files under ``root`` ending in ``exts``, sorted, skipping tests, installed packages, caches."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.endswith(exts) and p.is_file() and p.stat().st_size > 0:
                files.append(p)
    return files


# ----------------------------------------------------------------------------------------------------
# The standard library plus the installed packages (tidar train --site-packages)

HELD_OUT_PACKAGES = ("torch", "transformers")  # never trained on: the evaluation's "other packages' code"
PROJECT_PACKAGES = ("tidar-kernels",)  # the project itself
VENDOR_DIRS = {"_vendor", "vendor", "_vendored", "vendored"}  # copies of other projects, under their own licences
LICENCE_RULE = (
    "kept: packages whose metadata (License-Expression, License, license classifiers) names only permissive or "
    "weak-copyleft licences: MIT, BSD, 0BSD, Apache, PSF, ISC, Zlib, CC0, Unlicense, HPND, CNRI-Python, BSL-1.0, "
    "MPL, LGPL; skipped: any strong-copyleft (GPL, AGPL), proprietary or unrecognised licence, and packages with "
    "no licence metadata; vendored copies (_vendor/ folders) are skipped (their licences are not the host's)"
)
_PERMISSIVE = re.compile(
    r"\b(MIT|BSD|0BSD|Apache|PSF|Python Software Foundation|ISC|Zlib|CC0|Unlicense|HPND|CNRI-Python|BSL-1\.0|"
    r"Boost|MPL|Mozilla Public|LGPL|Lesser General Public)",
    re.I,
)
_DENIED = re.compile(r"\bA?GPL|Affero|(?<!Lesser )General Public|Proprietary|NVIDIA|SSPL|Commons Clause", re.I)


def normalise_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def licence_of(metadata) -> str:
    """The licence a distribution declares: License-Expression, else its license classifiers, else the first line
    of License ('' when none)."""
    expr = (metadata.get("License-Expression") or "").strip()
    classifiers = [c.split(" :: ")[-1] for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    text = (metadata.get("License") or "").strip().splitlines()
    parts = [expr] if expr else []
    parts += [c for c in classifiers if c not in parts]
    if not parts and text and len(text[0]) <= 80:
        parts = [text[0]]
    return "; ".join(p for p in parts if p)


def licence_allowed(licence: str) -> bool:
    """``LICENCE_RULE``: permissive / weak-copyleft and nothing else."""
    return bool(_PERMISSIVE.search(licence)) and not _DENIED.search(licence)


def _dist_py_files(dist, exts: tuple) -> list:
    """(path, top-level name) of a distribution's source files under site-packages (from its RECORD), skipping
    tests, caches and vendored copies."""
    out = []
    for rel in dist.files or []:
        parts = rel.parts
        if not rel.name.endswith(exts) or len(parts) < 1 or parts[0].endswith((".dist-info", ".egg-info", ".data")):
            continue
        if parts[0].startswith("..") or any(p in SKIP_DIRS or p in VENDOR_DIRS for p in parts[:-1]):
            continue
        path = Path(dist.locate_file(rel))
        if path.is_file() and path.stat().st_size > 0:
            top = parts[0][: -len(path.suffix)] if len(parts) == 1 else parts[0]
            out.append((path, top))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_distributions() -> list:
    """The distributions installed for this interpreter (its site-packages)."""
    import importlib.metadata as md

    return list(md.distributions())


def site_packages_dists(exclude=HELD_OUT_PACKAGES):
    """(distribution, name, licence, reason skipped or '') of the installed distributions, sorted by name."""
    excluded = {normalise_name(n) for n in (*exclude, *PROJECT_PACKAGES)}
    seen, out = set(), []
    for d in sorted(installed_distributions(), key=lambda d: normalise_name(d.metadata["Name"] or "")):
        name = normalise_name(d.metadata["Name"] or "")
        if not name or name in seen:
            continue
        seen.add(name)
        lic = licence_of(d.metadata)
        if name in excluded:
            reason = "held out" if name in {normalise_name(n) for n in exclude} else "the project itself"
        elif not lic:
            reason = "no licence metadata"
        elif not licence_allowed(lic):
            reason = "licence not permissive"
        else:
            reason = ""
        out.append((d, name, lic, reason))
    return out


def find_code_corpus(exclude=HELD_OUT_PACKAGES, extensions=DEFAULT_EXTENSIONS, heldout_percent: float = 8.0):
    """The standard library (split exactly as ``find_corpus()``) plus the source files of the packages installed
    in this interpreter's site-packages, leaving out ``exclude`` (default torch and transformers: held out for
    evaluation), the project itself and packages whose licence ``LICENCE_RULE`` does not keep. A package's files
    are split by a hash of their top-level name (as stdlib modules are), with the same ``heldout_percent``.
    De-duplicated by content (sha256): a package file identical to a file already taken (stdlib first, then
    held-out packages, then training packages, each by name) is dropped. ``corpus.manifest`` lists every package
    (name, version, licence, split, files) and the skipped ones with the reason, and a digest of the whole corpus."""
    std = find_corpus(None, extensions, heldout_percent)
    exts = _exts(extensions)
    modules = {f: module_of(std.root, f) for f in std.train_files + std.heldout_files}
    seen = {_sha(f) for f in modules}
    entries, skipped, dropped = [], [], 0
    dists = site_packages_dists(exclude)
    taken = {}
    for d, name, lic, reason in dists:
        if reason:
            skipped.append({"name": name, "version": d.version, "licence": lic, "reason": reason})
            continue
        taken[name] = (d, lic, _dist_py_files(d, exts))
    ordered = sorted(taken, key=lambda n: (not any(is_heldout(t, heldout_percent) for _, t in taken[n][2]), n))
    train, held = list(std.train_files), list(std.heldout_files)
    digest = hashlib.sha256()
    for f in std.heldout_files + std.train_files:
        digest.update(_sha(f).encode())
    for name in ordered:
        d, lic, files = taken[name]
        n_train = n_held = 0
        for path, top in files:
            h = _sha(path)
            if h in seen:
                dropped += 1
                continue
            seen.add(h)
            digest.update(h.encode())
            modules[path] = top
            if is_heldout(top, heldout_percent):
                held.append(path)
                n_held += 1
            else:
                train.append(path)
                n_train += 1
        if n_train or n_held:
            entries.append(
                {"name": name, "version": d.version, "licence": lic, "train_files": n_train, "heldout_files": n_held}
            )
        else:
            skipped.append({"name": name, "version": d.version, "licence": lic, "reason": "no source files"})
    manifest = {
        "python": platform.python_version(),
        "stdlib": {"licence": "PSF-2.0", "train_files": len(std.train_files), "heldout_files": len(std.heldout_files)},
        "packages": entries,
        "skipped": skipped,
        "held_out_packages": list(exclude),
        "licence_rule": LICENCE_RULE,
        "duplicates_dropped": dropped,
        "heldout_percent": heldout_percent,
        "train_files": len(train),
        "heldout_files": len(held),
        "digest": digest.hexdigest(),
    }
    return Corpus(std.root, train, held, modules=modules, manifest=manifest)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files, vocab_size: int = 4096, texts=None):
    """A byte-level BPE tokenizer trained on ``files`` (or the strings ``texts``) with EOS, PAD and [MASK]
    special tokens, wrapped as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1} (bytes + special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts) if texts is not None else (read_text(f) for f in files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, mask_token=MASK, clean_up_tokenization_spaces=False
    )


def encode_texts(tokenizer, texts) -> torch.Tensor:
    """One long int32 stream: every document's tokens followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; documents are packed with EOS between them")
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.int32)


def heldout_prompts(tokenizer, corpus: Corpus, n: int, prompt_tokens: int = 64, min_tokens: int = 384) -> list:
    """``n`` deterministic code prompts from held-out files: the first ``prompt_tokens`` tokens of the
    file's body after its docstring/imports (from the first ``def``/``class`` line), cut back to a line end,
    one per file."""
    prompts = []
    code = corpus.heldout_docs is None  # documents of a .txt/.jsonl file: their first tokens, no def/class search
    if not code:
        min_tokens = min(min_tokens, prompt_tokens + 16)
    for text in corpus.heldout_texts():
        lines = text.splitlines(keepends=True)
        start = next((i for i, l in enumerate(lines) if l.startswith(("def ", "class "))), None) if code else 0
        if start is None:
            continue
        body = "".join(lines[start:])
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens:
            continue
        prompt = tokenizer.decode(ids[:prompt_tokens])
        cut = prompt.rfind("\n") + 1 if code else 0  # end on a line boundary when that keeps most of the prompt
        prompts.append(prompt[:cut] if cut >= len(prompt) // 2 else prompt)
        if len(prompts) == n:
            break
    return prompts


__all__ = [
    "Corpus",
    "encode_texts",
    "find_code_corpus",
    "find_corpus",
    "heldout_prompts",
    "read_documents",
    "stdlib_dir",
    "train_tokenizer",
]
