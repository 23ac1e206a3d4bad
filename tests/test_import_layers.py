"""The layers import one way: a module never imports a higher layer, not even inside a function, and no package
has an import circle. Read from the source (every ``import`` statement anywhere in a module, and
``importlib.import_module("constant")``), so a lazy import cannot hide a circle.

Layers of ``tidar`` (low to high): ``tidar_kernels`` < ``tidar.settings`` (and ``tidar.ordinary_prompts``, data) <
``tidar.hf`` < ``tidar.decode`` <
``tidar.patching`` < ``tidar.train`` | ``tidar.vllm`` (peers: neither imports the other) < the ``tidar`` package
itself (its ``__init__``: the public names) < ``tidar.cli`` / ``python -m tidar``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "tidar": REPO / "python" / "tidar",
    "tidar_kernels": REPO / "tidar_kernels",
    "benchmarks": REPO / "benchmarks",
}
LAYERS = [  # (module prefix, rank); the longest matching prefix wins
    ("tidar_kernels", 0),
    ("tidar.settings", 1),
    ("tidar.ordinary_prompts", 1),  # data (the benchmarks' and the model card's prompts): imports nothing
    ("tidar.hf", 2),
    ("tidar.decode", 3),
    ("tidar.patching", 4),
    ("tidar.train", 5),
    ("tidar.vllm", 5),
    ("tidar", 6),
    ("tidar.cli", 7),
    ("tidar.__main__", 7),
]


def modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    out = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


ALL = {**modules("tidar"), **modules("tidar_kernels"), **modules("benchmarks")}


def _resolve(name: str) -> str | None:
    """The known module ``name`` names (``a.b.attr`` -> ``a.b``), or None for a third-party module."""
    while name and name not in ALL:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, source: str | None = None) -> set[str]:
    """Every known module that ``module`` imports, anywhere in its source. ``from pkg import sub`` counts as
    importing ``pkg.sub`` (not ``pkg``'s ``__init__``, which any submodule runs anyway)."""
    path = ALL[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [s for s in subs if s in ALL] or [base]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.add(target)
    return found


def rank(module: str) -> int | None:
    best = None
    for prefix, r in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, r)
    return None if best is None else best[1]


def cycles(package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), within ``package``."""
    nodes = [m for m in ALL if m == package or m.startswith(package + ".")]
    graph = {m: [t for t in imports(m) if t in nodes] for m in nodes}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", ["tidar", "tidar_kernels", "benchmarks"])
def test_no_import_circle(package):
    assert cycles(package) == []


def test_lower_layers_never_import_upper_ones():
    bad = []
    for module in ALL:
        mine = rank(module)
        if mine is None:  # benchmarks: above everything
            continue
        for target in imports(module):
            theirs = rank(target)
            if theirs is None or theirs > mine:
                bad.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
            elif theirs == mine and module.split(".")[:2] != target.split(".")[:2] and mine == 5:
                bad.append(f"{module} imports its peer layer {target}")
    assert bad == []


def test_the_checker_sees_lazy_imports():
    """The check can fail: an in-function import of an upper layer, or one through importlib, is found."""
    assert "tidar.decode.hf_generate" in imports("tidar.patching")  # patching -> decode: allowed, and seen
    assert rank("tidar.hf.probe") < rank("tidar.decode.decoder") < rank("tidar.patching") < rank("tidar.cli.demo")
    src = ALL["tidar.hf.cache"].read_text()
    late = src + "\n\ndef _late():\n    from tidar.decode import planner\n"
    assert "tidar.decode.planner" in imports("tidar.hf.cache", late)
    via_importlib = src + "\n\ndef _late():\n    importlib.import_module('tidar.train.trainer')\n"
    assert "tidar.train.trainer" in imports("tidar.hf.cache", via_importlib)


def test_kernels_import_no_transformers():
    for module, path in modules("tidar_kernels").items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("transformers", "tidar") for n in names), module
