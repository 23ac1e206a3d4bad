"""Run Hugging Face's own generation tests (``GenerationTesterMixin``, through the Llama and Qwen2 model tests) with
every generative model ``tidar.patch``ed right after construction, each TiDAR ``generate`` checked against HF's own
``generate`` on an unpatched twin (same weights, same arguments, same RNG state). Not collected by pytest (run it).

    python tests/hf_suite/run_hf_generation_tests.py HF_ROOT [--plain] [--shim] [-k EXPR] [--json OUT]
    python tests/hf_suite/run_hf_generation_tests.py HF_ROOT --assemble CHECKOUT SDIST_TESTS

``HF_ROOT`` holds transformers' ``tests/`` package (tests/generation/test_utils.py, tests/causal_lm_tester.py,
tests/test_modeling_common.py, tests/models/{llama,qwen2}/...) and ``utils/test_module``; its test dependencies
(``parameterized``, ``httpx``) must be importable. ``--plain`` runs the same tests without the patch (the baseline).
``--shim`` restores two APIs that tests older than the installed library call (``install_shims``), so that those
tests run instead of failing on plain HF too.

A model built on the meta device (inside ``from_pretrained``) is patched once loaded. The unpatched twin runs
eagerly (``torch.compiler.set_stance("force_eager")``) without the model's compiled call: its graphs would share
dynamo's per-code caches with the patched model's and count as the model's recompilations.

The transformers sdist ships only the top-level ``tests/*.py`` (test_modeling_common.py, ...), not
tests/generation/ nor tests/models/. ``--assemble`` builds ``HF_ROOT`` from a transformers git checkout
(``CHECKOUT``: its tests/generation, tests/causal_lm_tester.py, tests/models/{llama,qwen2}, utils/test_module) and
the installed version's sdist ``tests/`` (``SDIST_TESTS``: the top-level files, matching the installed library),
with stubs for the two modules neither ships that generation tests never use (the export and distributed test
helpers) and ``src/transformers`` pointing at the installed package (test_pipeline_mixin.py reads it).

Prints, per test, passed / failed (with the error's first line) / skipped, the totals, and every generate whose
greedy output differs from the twin's ("outputs that differ": must be 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "qwen2")  # the model tests run by default (--families to change)
DRAFT_LEN = 4


class TidarPlugin:
    """Selects the GenerationTesterMixin tests; with ``patch`` on, patches every generative model after its
    construction and compares each of its generate calls with an unpatched twin's."""

    def __init__(self, patch: bool):
        self.patch = patch
        self.results: dict = {}
        self.diffs: list = []
        self.current = None
        self.generates = 0

    # ------------------------------------------------------------------ pytest hooks
    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if _is_mixin_test(i)]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

    def pytest_configure(self, config):
        if self.patch:
            self._install()

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            first = ""
            if report.outcome == "failed":
                text = str(report.longrepr)
                lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
                first = (lines[0] if lines else text.splitlines()[-1])[:300]
            elif report.outcome == "skipped":
                first = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)[:200]
            self.results[report.nodeid] = (report.outcome, first)

    # ------------------------------------------------------------------ the patch
    def _install(self):
        from transformers import PreTrainedModel

        plugin = self
        original = PreTrainedModel.post_init
        loading = PreTrainedModel.from_pretrained.__func__

        def post_init(model, *args, **kwargs):
            original(model, *args, **kwargs)
            if _generative(model) and getattr(model, "_tidar", None) is None and not _on_meta(model):
                plugin._patch(model)

        def from_pretrained(cls, *args, **kwargs):  # built on the meta device, then loaded: patched once loaded
            model = loading(cls, *args, **kwargs)
            if _generative(model) and getattr(model, "_tidar", None) is None:
                plugin._patch(model)
            return model

        PreTrainedModel.post_init = post_init
        PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    def _patch(self, model):
        import tidar

        vocab = model.get_input_embeddings().weight.shape[0]
        tidar.patch(model, draft_len=DRAFT_LEN, mask_token_id=vocab - 1)
        patched = model.generate
        plugin = self

        def checked(*args, **kwargs):
            twin = copy.deepcopy(model)
            tidar.unpatch(twin)
            for name in ("_compiled_call", "_last_compile_config"):  # bound to `model`, not to the copy
                twin.__dict__.pop(name, None)
            twin_args, twin_kwargs = _copy((args, kwargs))
            rng = torch.get_rng_state()
            try:  # eagerly: the twin's graphs would share dynamo's per-code caches with the model's (recompiles)
                with torch.compiler.set_stance("force_eager"):
                    want = twin.generate(*twin_args, **twin_kwargs)
            except Exception as e:  # HF's own error: TiDAR must raise too
                want = e
            torch.set_rng_state(rng)
            try:
                got = patched(*args, **kwargs)
            except Exception as e:
                got = e
            plugin._compare(want, got, kwargs)
            if isinstance(got, Exception):
                raise got
            return got

        model.generate = checked

    def _compare(self, want, got, kwargs):
        self.generates += 1
        sample = bool(kwargs.get("do_sample")) or bool(getattr(kwargs.get("generation_config"), "do_sample", False))
        if isinstance(want, Exception) or isinstance(got, Exception):
            if isinstance(want, Exception) and not isinstance(got, Exception):
                self.diffs.append((self.current, f"HF raised {type(want).__name__}: {want}"[:300], "TiDAR did not"))
            return
        w = want if isinstance(want, torch.Tensor) else want.sequences
        g = got if isinstance(got, torch.Tensor) else got.sequences
        if w.shape != g.shape or (not sample and not torch.equal(w, g)):
            self.diffs.append(
                (self.current, f"HF {tuple(w.shape)} {w.tolist()}", f"TiDAR {tuple(g.shape)} {g.tolist()}")
            )


def install_shims() -> None:
    """Two APIs the older generation tests of a checkout call and the installed library renamed or dropped
    (``--shim``): ``PreTrainedModel._is_stateful`` (False: none of these models keep recurrent state) and
    ``Cache.get_max_cache_shape()`` (a layer's ``get_max_length()``)."""
    from transformers import Cache, PreTrainedModel

    if not hasattr(PreTrainedModel, "_is_stateful"):
        PreTrainedModel._is_stateful = False
    if not hasattr(Cache, "get_max_cache_shape"):
        Cache.get_max_cache_shape = lambda self, layer_idx=0: self.layers[layer_idx].get_max_length()


def _copy(x):
    """A deep copy for the twin's call; tensors detached (inputs with autograd history cannot be deep-copied)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_copy(v) for v in x)
    return copy.deepcopy(x)


def _on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _generative(model) -> bool:
    try:
        return bool(model.can_generate()) and model.get_input_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def _is_mixin_test(item) -> bool:
    fn = getattr(item, "function", None)
    qual = getattr(fn, "__qualname__", "")
    return qual.startswith("GenerationTesterMixin.")


def assemble(root: Path, checkout: Path, sdist_tests: Path, families=FAMILIES) -> None:
    """Build ``root`` (see the module docstring)."""
    import shutil

    import transformers

    tests = root / "tests"
    models = [f"tests/models/{f}" for f in families]
    for rel in ("tests/generation", *models, "tests/utils", "utils/test_module"):
        shutil.copytree(checkout / rel, root / rel, dirs_exist_ok=True)
    for rel in ("tests/__init__.py", "tests/models/__init__.py", "tests/causal_lm_tester.py"):
        shutil.copy(checkout / rel, root / rel)
    for f in sdist_tests.glob("*.py"):
        shutil.copy(f, tests / f.name)
    (tests / "exporters").mkdir(exist_ok=True)
    (tests / "exporters" / "__init__.py").write_text("")
    (tests / "exporters" / "test_export.py").write_text(
        "class ExportTesterMixin:  # stub: not a generation test\n    pass\n"
    )
    (tests / "distributed_testing_utils.py").write_text(
        "def run_distributed(*args, **kwargs):  # stub: not a generation test\n"
        "    raise NotImplementedError('distributed tests are not part of this run')\n\n\n"
        "def __getattr__(name):\n    return run_distributed\n"
    )
    (root / "src").mkdir(exist_ok=True)
    link = root / "src" / "transformers"
    if not link.exists():
        link.symlink_to(Path(transformers.__file__).parent)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_root", type=Path, help="the directory holding transformers' tests/ package")
    p.add_argument("--plain", action="store_true", help="run without tidar.patch (the baseline)")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--json", type=Path, default=None, help="write the per-test results here")
    p.add_argument("--assemble", nargs=2, type=Path, metavar=("CHECKOUT", "SDIST_TESTS"), help="build HF_ROOT first")
    p.add_argument("--families", default=",".join(FAMILIES), help="model test directories to run (comma-separated)")
    p.add_argument("--shim", action="store_true", help="the two renamed APIs older tests call (install_shims)")
    args = p.parse_args(argv)
    root = args.hf_root.resolve()
    families = [f for f in args.families.split(",") if f]
    if args.assemble:
        assemble(root, *(x.resolve() for x in args.assemble), families)
    sys.path[:0] = [str(root), str(root / "utils")]
    os.chdir(root)
    if args.shim:
        install_shims()
    plugin = TidarPlugin(patch=not args.plain)
    tests = [f"tests/models/{f}/test_modeling_{f}.py" for f in families]
    pytest_args = [*tests, "-q", "-p", "no:warnings", "-p", "no:cacheprovider", "-o", "addopts="]
    if args.k:
        pytest_args += ["-k", args.k]
    pytest.main(pytest_args, plugins=[plugin])
    counts: dict = {}
    for name, (outcome, first) in sorted(plugin.results.items()):
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome != "passed":
            print(f"{outcome:8s} {name}  {first}")
    print(f"\n{'plain HF' if args.plain else 'tidar.patch'}: {counts}; generate calls compared: {plugin.generates}")
    print(f"outputs that differ from the unpatched twin: {len(plugin.diffs)}")
    for d in plugin.diffs:
        print("  DIFF", *d)
    if args.json:
        args.json.write_text(json.dumps({"results": plugin.results, "diffs": plugin.diffs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
