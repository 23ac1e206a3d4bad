"""Shared fixtures: tiny Hugging Face models built from configs (no downloads), GPU-test skipping."""
from __future__ import annotations

import warnings

import pytest
import torch

ARCHS = ("qwen2", "llama", "qwen3", "mistral")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    # The auto backend's one-time fallback notice is expected on CPU; keep test output readable.
    warnings.filterwarnings("ignore", message="tidar_kernels: backend='auto' falls back")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_model(arch: str = "qwen2", vocab: int = 97, seed: int = 0, *, hidden: int = 32, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, init: float = 0.2, max_pos: int = 1024):
    """A tiny random-weight causal LM of the given family; the last vocab id is its [MASK].

    ``init`` is larger than HF's 0.02 so the logits are peaked and fp32 near-ties are rare.
    """
    import transformers as tf

    cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]
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
