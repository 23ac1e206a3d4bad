"""The model shapes every benchmark uses, in one place: the public configs of Qwen2.5-1.5B (the main shape) and
Llama-3-8B (a larger one), and a tiny Qwen2 for ``--smoke``. The kernel benchmarks take their heads, head size and
vocabulary from here; the end-to-end ones build random-weight models of these shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODELS = {  # name: (family, config kwargs) -- the public configs' shapes, random weights
    "qwen2.5-1.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "llama3-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
    ),
    "tiny-qwen2": (
        "qwen2",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
}
MAIN = "qwen2.5-1.5b"  # the shape of the goals
LARGE = "llama3-8b"
SMOKE = "tiny-qwen2"
LLAMA2_VOCAB = 32000  # the other common vocabulary size (Llama-2, Mistral) of the rejection rows


@dataclass(frozen=True)
class Attention:
    """A model's attention shape: query heads, K/V heads, head size."""

    q_heads: int
    kv_heads: int
    head_dim: int


def attention(name: str) -> Attention:
    """The attention shape of model ``name`` (Qwen2.5-1.5B: 12 query heads, 2 K/V heads, D = 128)."""
    kw = MODELS[name][1]
    return Attention(
        kw["num_attention_heads"], kw["num_key_value_heads"], kw["hidden_size"] // kw["num_attention_heads"]
    )


def vocab_size(name: str) -> int:
    return MODELS[name][1]["vocab_size"]


def n_params(name: str) -> float:
    _, kw = MODELS[name]
    h, i, L, V = kw["hidden_size"], kw["intermediate_size"], kw["num_hidden_layers"], kw["vocab_size"]
    kv = h // kw["num_attention_heads"] * kw["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return L * per_layer + V * h * (1 if kw["tie_word_embeddings"] else 2)


def build_model(name: str, device: torch.device, dtype: torch.dtype, max_pos: int):
    """A random-weight HF model of shape ``name`` (SDPA attention, eval mode)."""
    import transformers as tf

    family, kw = MODELS[name]
    cfg_cls, model_cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    }[family]
    cfg = cfg_cls(
        **kw,
        max_position_embeddings=max_pos,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        mask_token_id=kw["vocab_size"] - 1,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()
