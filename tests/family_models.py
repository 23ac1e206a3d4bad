"""Tiny random-weight models of every causal-LM family in the installed transformers, built from config classes
(no downloads): the family test (tests/hf/test_families.py) and the README's supported-families list use them.

``build(model_type)`` returns ``(model, None)`` or ``(None, reason)`` when no tiny model of the family can be
built generically (the reason is the construction error): such families are reported as "not built", never
as supported.
"""

from __future__ import annotations

import signal
import warnings
from contextlib import contextmanager

import torch

VOCAB = 97
MASK_ID = VOCAB - 1
MAX_POS = 256
# Families accepted by the patch whose generation currently fails for a reason owned elsewhere: the family test
# marks them xfail(strict=False) and the README names them.
KNOWN_FAILURES: dict = {}
BUILD_SECONDS = 8  # a family whose tiny model takes longer to build is reported as not built
# Sizes set on every (sub-)config that has the attribute.
SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POS,
    initializer_range=0.2,
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=0,
    n_group=1,  # DeepSeek-V3-style group routing: one group of the 4 experts
    topk_group=1,
    n_layer=2,
    n_head=4,
    n_embd=32,
    d_model=32,
    num_layers=2,
    num_heads=4,
    ffn_dim=64,
    n_positions=MAX_POS,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    n_ctx=MAX_POS,
    dff=64,
    d_inner=64,
    n_inner=64,
    ffn_hidden_size=64,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    kv_lora_rank=16,
    q_lora_rank=16,
    rotary_dim=8,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
    is_decoder=True,
    add_cross_attention=False,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    dropout=0.0,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def families() -> list[tuple[str, str]]:
    """``(model_type, class name)`` of every causal-LM family transformers maps."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds):
    def handler(*_):
        raise _Timeout(f"building took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _shrink(cfg, seen) -> None:
    if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
        return
    seen.add(id(cfg))
    for k, v in SIZES.items():
        if hasattr(cfg, k):
            try:
                setattr(cfg, k, v)
            except Exception:  # read-only or validated per layer: keep the default
                pass
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) > 2:  # two layers, of two different kinds when there are two
        other = [t for t in types if t != types[0]]
        try:
            cfg.layer_types = [types[0], other[0] if other else types[0]]
        except Exception:
            pass
    for key in getattr(cfg, "sub_configs", {}) or {}:
        _shrink(getattr(cfg, key, None), seen)


def build(model_type: str, cls_name: str, seed: int = 0, **overrides):
    """``(model, None)`` or ``(None, reason)``. ``overrides`` are set on the text config after the sizes."""
    import transformers
    from transformers import CONFIG_MAPPING

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return None, f"transformers has no class {cls_name}"
    try:
        with _time_limit(BUILD_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = CONFIG_MAPPING[model_type]()
            _shrink(cfg, set())
            text = cfg.get_text_config()
            if hasattr(text, "kv_lora_rank"):  # multi-head latent attention: as many K/V heads as query heads
                text.num_key_value_heads = text.num_attention_heads
            for k, v in overrides.items():
                setattr(cfg.get_text_config(), k, v)
            cfg.mask_token_id = MASK_ID
            torch.manual_seed(seed)
            model = cls(cfg).eval()
            emb = model.get_input_embeddings()
            if emb is None or emb.weight.shape[0] != VOCAB:
                return (
                    None,
                    f"the tiny model's vocabulary is not {VOCAB} (got {None if emb is None else emb.weight.shape[0]})",
                )
            with torch.no_grad():  # the model's own plain forward must run
                model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    except BaseException as e:  # noqa: BLE001 - any construction failure is the reason the family is not built
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if getattr(model, "generation_config", None) is not None:  # plain greedy HF references, no EOS, no
        from transformers import GenerationConfig  # suppressed or forced tokens (Whisper's defaults)

        model.generation_config = GenerationConfig(pad_token_id=0)
    return model, None


def classify() -> dict:
    """``model_type -> ("supported", "") | ("refused", reason) | ("not built", reason)`` (build + patch only)."""
    import tidar
    from tidar.hf.probe import UnsupportedModel

    out = {}
    for model_type, cls_name in families():
        model, why = build(model_type, cls_name)
        if model is None:
            out[model_type] = ("not built", why)
            continue
        try:
            tidar.patch(model, draft_len=4)
            out[model_type] = ("supported", "")
        except UnsupportedModel as e:
            out[model_type] = ("refused", str(e).split("is not supported: ", 1)[1].rsplit(". The model", 1)[0])
    return out


def readme_section(result: dict) -> str:
    """The README's list (between the families markers), from ``classify()``."""
    import transformers

    sup = sorted(k for k, (s, _) in result.items() if s == "supported" and k not in KNOWN_FAILURES)
    known = sorted(k for k, (s, _) in result.items() if s == "supported" and k in KNOWN_FAILURES)
    ref = sorted((k, r) for k, (s, r) in result.items() if s == "refused")
    nb = sorted(k for k, (s, _) in result.items() if s == "not built")
    lines = [
        "<!-- families:begin -->",
        f"Checked by `tests/hf/test_families.py` against transformers {transformers.__version__} (tiny random-weight "
        "models built from each config class; regenerate with `python tests/family_models.py --write`).",
        "",
        f"**Supported ({len(sup)})**, greedy-exact with forced long acceptances, a ragged batch and the drop-in "
        "`model.generate`: " + ", ".join(f"`{k}`" for k in sup) + ".",
        "",
    ]
    if known:
        lines += [
            f"**Accepted by `tidar.patch`, generation failing (being fixed) ({len(known)})**: "
            + "; ".join(f"`{k}`: {KNOWN_FAILURES[k]}" for k in known)
            + ".",
            "",
        ]
    lines += [
        f"**Refused at `tidar.patch` ({len(ref)})**, with the reason it gives:",
        "",
    ]
    lines += [f"- `{k}`: {r}" for k, r in ref]
    lines += [
        "",
        f"**Not checked ({len(nb)})**: no tiny model could be built generically from the config: "
        + ", ".join(f"`{k}`" for k in nb)
        + ".",
        "<!-- families:end -->",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    section = readme_section(classify())
    readme = Path(__file__).parents[1] / "README.md"
    text = readme.read_text()
    if "--write" in sys.argv:
        import re

        if "<!-- families:begin -->" in text:
            text = re.sub(r"<!-- families:begin -->.*?<!-- families:end -->", lambda _: section, text, flags=re.S)
        else:
            head = "### The ops (`tidar_kernels`)"
            text = text.replace(head, "### Supported model families\n\n" + section + "\n\n" + head, 1)
        readme.write_text(text)
    print(section)
