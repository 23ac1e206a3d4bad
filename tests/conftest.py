"""Shared fixtures: the backends under test, tiny Hugging Face models built from configs (no downloads), GPU-test
skipping.

Backends: a test that takes ``backend`` runs once per implementation of its module's ``OP`` that is live for the
tensors it uses (``backends_under_test``):
  - ``reference`` always (CPU tensors);
  - ``triton`` on CPU tensors under the Triton interpreter, only for tests marked ``triton_interpreter`` (the
    interpreter is slow: tests opt in);
  - on a CUDA machine, for tests that also take ``device``: ``triton`` and ``cuda`` on CUDA tensors, where live.
A test that takes ``device`` builds its tensors there (``reference`` runs on ``"cpu"``).
Without a GPU the suite runs under ``TRITON_INTERPRET=1``, set here, before anything imports triton.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (collection imports it)
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton_interpreter

    triton_interpreter.install()


# tests/vllm run in their own environment (.ci/vllm_tests.sh: vLLM pins its own torch, and its conftest would take the
# module name "conftest" that tests here import helpers from)
collect_ignore = ["vllm"]

ARCHS = ("qwen2", "llama", "qwen3", "mistral")


def pytest_report_header(config):
    """The versions this run tested (a fresh install takes the newest releases the declared ranges allow)."""
    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton_v}"
    return f"tidar versions tested: {versions}"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "triton_interpreter: also run on backend='triton' under the Triton interpreter (CPU tensors)"
    )


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it: results do not depend on the order
    the tests run in (or on which worker runs a test, under pytest-xdist)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def backends_under_test(op: str, *, on_device: bool, interpreter: bool) -> list[tuple[str, str]]:
    """(backend, device type) pairs a test of ``op`` runs on here: the reference on CPU, Triton under the
    interpreter (``interpreter``: the test opted in), and with ``on_device`` the live kernels on CUDA tensors."""
    from tidar_kernels import live_backends
    from tidar_kernels.backends import triton_interpreted

    pairs = [("reference", "cpu")]
    if interpreter and triton_interpreted() and "triton" in live_backends("cpu").get(op, []):
        pairs.append(("triton", "cpu"))
    if on_device and torch.cuda.is_available():
        pairs += [(b, "cuda") for b in live_backends("cuda").get(op, []) if b != "reference"]
    return pairs


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        raise pytest.UsageError(f"{metafunc.module.__name__} takes the backend fixture but names no OP (the op tested)")
    on_device = "device" in metafunc.fixturenames
    interpreter = metafunc.definition.get_closest_marker("triton_interpreter") is not None
    pairs = backends_under_test(op, on_device=on_device, interpreter=interpreter)
    if on_device:
        ids = [b if d == "cpu" or b != "triton" else f"{b}-{d}" for b, d in pairs]
        metafunc.parametrize(("backend", "device"), pairs, ids=ids)
    else:
        metafunc.parametrize("backend", [b for b, _ in pairs])


def arch_classes(arch: str):
    """(config class, causal-LM class) of one of ``ARCHS``."""
    import transformers as tf

    return {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]


@pytest.fixture(scope="module")
def module_one_thread():
    """Tiny models: one intra-op thread for a whole module (several threads spin for nothing on a loaded 2-core
    CI box). Used with ``pytestmark = pytest.mark.usefixtures("module_one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(
    arch: str = "qwen2",
    vocab: int = 97,
    seed: int = 0,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    init: float = 0.2,
    max_pos: int = 1024,
):
    """A tiny random-weight causal LM of the given family; the last vocab id is its [MASK].

    ``init`` is larger than HF's 0.02 so the logits are peaked and fp32 near-ties are rare.
    """
    cls = arch_classes(arch)
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        initializer_range=init,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        mask_token_id=vocab - 1,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        kw["head_dim"] = hidden // heads
    if arch == "mistral":
        kw["sliding_window"] = None
    torch.manual_seed(seed)
    config = cls[0](**kw)
    config._attn_implementation = "sdpa"
    return cls[1](config).eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def chi2_pvalue(samples, exact: dict) -> float:
    """Pearson chi-square p-value of ``samples`` (hashable outcomes) against the ``exact`` distribution
    (outcome -> probability), pooling the cells with expected count < 5 into one."""
    from scipy import stats

    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    n = len(samples)
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for s, p in exact.items():
        if p * n >= 5:
            obs.append(counts.get(s, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(s, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    return stats.chisquare(obs, exp).pvalue


@pytest.fixture
def impl_calls(monkeypatch):
    """Every registered backend implementation of every op replaced by a spy recording its ``(op, backend)``
    calls (bad-input tests: nothing runs before the error)."""
    from tidar_kernels import _loaders, backends

    _loaders.load_all()
    calls = []
    for op, impls in backends._IMPLS.items():
        for name, fn in list(impls.items()):

            def spy(*args, _fn=fn, _key=(op, name)):
                calls.append(_key)
                return _fn(*args)

            spy.__dict__.update(vars(fn))  # capability flags (e.g. ``philox``)
            monkeypatch.setitem(impls, name, spy)
    return calls


def two_steps(model, body, prompt: list, drafts: int):
    """A prompt's causal forward, then a decode step of ``drafts`` drafts + one block of masks per level, through a
    TidarCache, with ``body(input_ids, position_ids, step)`` (a decoder body): the hidden states of both forwards
    and the cache's K/V after them (the direct body's and the packed projections' tests compare these)."""
    from tidar.hf.attention import TidarStep
    from tidar.hf.cache import TidarCache
    from tidar_kernels import layouts

    dev = next(model.parameters()).device
    n = len(prompt)
    step = layouts.decode_step(drafts).to(dev)
    S = step.local_limit.shape[0]
    cache = TidarCache(1, n + S, backend="auto" if dev.type == "cuda" else "reference")
    lay = layouts.causal(n).to(dev)
    seg = torch.zeros(1, dtype=torch.int32, device=dev)
    h1 = body(torch.tensor([prompt], device=dev), lay.position_ids[None], TidarStep(lay, seg, cache, cache.backend))
    cache.commit([n])
    ids2 = torch.randint(0, 90, (1, S), generator=torch.Generator().manual_seed(7)).to(dev)
    seg2 = torch.full((1,), n, dtype=torch.int32, device=dev)
    h2 = body(ids2, (step.position_ids + n)[None], TidarStep(step, seg2, cache, cache.backend))
    return h1, h2, [t.clone() for t in cache.keys + cache.values]
