"""Model folders and training checkpoints of ``tidar train`` (no training code: ``tidar demo`` loads models here).

- a model folder (``save_pretrained`` format + tokenizer + ``config.json`` with the TiDAR settings) loads with
  :func:`load_checkpoint` or plain ``AutoModelForCausalLM.from_pretrained`` + ``tidar.patch``; weights stored in
  bf16 are upcast to fp32 on load;
- a checkpoint folder ``checkpoint-N`` is a model folder plus the HF Trainer state (optimizer, scheduler, RNG),
  ``tidar_state.json`` (the run's options and histories) and, for greedy self-distillation, ``distill_pool.pt``;
- :func:`load_init_model` prepares a local causal-LM folder for TiDAR training (``--init-from``): any family that
  ``tidar.patch`` accepts (its probe is the gate).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"  # the final model folder's run log (options, loss and evaluation histories)
TIDAR_STATE_FILE = "tidar_state.json"  # the same inside checkpoint-N (HF writes its own trainer_state.json there)
POOL_FILE = "distill_pool.pt"
# Config attributes of attention dropout: the TiDAR attention op has none (it refuses dropout > 0 in training).
ATTENTION_DROPOUTS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def load_tokenizer(path):
    """The folder's tokenizer (model folders, checkpoints, --init-from, --tokenizer). No downloads.

    ``PreTrainedTokenizerFast`` for folders written by ``tidar train``: for a ``qwen2`` config, transformers 5 maps
    AutoTokenizer to ``Qwen2Tokenizer``, whose own normaliser and pre-tokeniser split text differently from the
    byte-level BPE the model was trained with. ``AutoTokenizer`` for any other folder (a model's own class)."""
    path = Path(path)
    cfg = path / "tokenizer_config.json"
    cls = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    if cls in (None, "PreTrainedTokenizerFast", "TokenizersBackend") and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _read_state(path: Path) -> dict:
    for name in (TIDAR_STATE_FILE, STATE_FILE):
        f = path / name
        if f.is_file():
            try:
                state = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"checkpoint {path} is corrupt: {name} is not valid JSON ({e})") from e
            if name == STATE_FILE and "log_history" in state and "args" not in state and "step" not in state:
                return {}  # an HF Trainer state, not ours
            return state
    return {}


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, state) from a model or checkpoint folder written by ``tidar train``. fp32 weights
    (bf16-stored weights are upcast). Clear errors for a missing, incomplete or corrupt folder."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a folder)")
    need = ["config.json", "model.safetensors", "tokenizer.json"]
    missing = [n for n in need if not (path / n).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        tokenizer = load_tokenizer(path)
        # no attn_implementation: SDPA where the family supports it, else eager (Gemma 2)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and a hint
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    if getattr(model.config, "mask_token_id", None) is None:
        raise ValueError(f"checkpoint {path} has no mask token (config.mask_token_id); it is not a TiDAR model")
    return model.to(device), tokenizer, _read_state(path)


def settings_into_config(model, *, draft_len: int, block_size: int, objective: str):
    c = model.config
    c.tidar_draft_len = int(draft_len)
    c.tidar_block_size = int(block_size)
    c.tidar_objective = objective


def save_model_folder(folder, model, tokenizer, state: dict | None = None, dtype: torch.dtype | None = None):
    """Weights (optionally cast to ``dtype``, e.g. bf16 to halve the size; loading upcasts), tokenizer, config and
    the run log. Unpatches nothing: the config has no patch state."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        model.save_pretrained(folder, state_dict=sd, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if state is not None:
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))


def _reserved_unused_token(tokenizer, vocab_rows: int):
    """An added special token whose name says reserved/unused (Llama-3 style), with an embedding row."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for tid, tok in sorted(added.items()):
        content = getattr(tok, "content", str(tok))
        if re.search(r"reserved|unused", content, re.I) and tid < vocab_rows:
            return content, tid
    return None


def load_init_model(path, device="cpu", mask_token: str = "[MASK]"):
    """(model, tokenizer, how) to start TiDAR training from a local HF causal-LM folder (``--init-from``).

    The mask token: the tokenizer's own mask token if it has one; else an unused reserved special token
    (``<|reserved_special_token_N|>``-style) made the mask token; else ``mask_token`` is added and takes a spare
    embedding row if the embedding matrix is larger than the tokenizer (no resize: works under ZeRO-3/FSDP); else
    the embeddings grow by one row (initialised to the mean embedding). ``config.mask_token_id`` is set. ``how``
    says which. The weights of every other token are unchanged, so the AR logits equal the source model's.

    Any family ``tidar.patch`` accepts: its probe runs on the loaded model and a refusal is a ValueError with the
    probe's reason. Attention dropout and MoE router logits are switched off for training (``how`` says so)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--init-from {path} does not exist (or is not a folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--init-from {path} is not a saved Hugging Face model: no config.json")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--init-from {path}: config.json is unreadable ({type(e).__name__}: {e})") from e
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") or a in _causal_lm_classes() for a in archs):
        raise ValueError(
            f"--init-from {path} is not a causal LM (architectures {archs}); TiDAR needs a causal LM "
            "(*ForCausalLM, GPT2LMHeadModel, ...)"
        )
    if not any(
        (path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        raise ValueError(
            f"--init-from {path} has no tokenizer (tokenizer.json / tokenizer_config.json); save it "
            f"with tokenizer.save_pretrained into the same folder"
        )
    switched_off = _training_config(config)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--init-from {path} could not be loaded as a causal LM ({type(e).__name__}: {e})") from e
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < rows:
        how = f"reused the tokenizer's mask token {tokenizer.mask_token!r}"
    elif (found := _reserved_unused_token(tokenizer, rows)) is not None:
        tokenizer.mask_token = found[0]
        how = f"reused the unused reserved token {found[0]!r} as the mask token"
    else:
        tokenizer.add_special_tokens({"mask_token": mask_token})
        if tokenizer.mask_token_id < rows:
            how = f"added {mask_token!r} on a spare embedding row (no resize)"
        else:
            from tidar.patching import add_mask_token

            add_mask_token(model, tokenizer, mask_token)
            how = f"added {mask_token!r} and grew the embeddings to {model.get_input_embeddings().weight.shape[0]} rows"
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--init-from {path}: the tokenizer has no EOS token (needed between packed documents)")
    model.config.mask_token_id = tokenizer.mask_token_id
    _probe(model, path)
    if switched_off:
        how += "; for training: " + ", ".join(switched_off)
    return model.to(device), tokenizer, how


def _causal_lm_classes() -> set:
    """Class names of every causal LM transformers maps (``*ForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _training_config(config) -> list[str]:
    """Switch off, before the model is built, what a TiDAR training forward cannot run; returns what changed.
    Attention dropout: the TiDAR attention op has none and refuses it in training (GPT-2 style configs set 0.1).
    MoE router logits: their auxiliary loss reads a 2-D attention mask that a TiDAR forward does not pass (the
    forward fails), and it is no part of the hybrid objective (docs/design.md §3.1)."""
    changed = []
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        for name in ATTENTION_DROPOUTS:
            p = getattr(cfg, name, None)
            if isinstance(p, (int, float)) and p > 0:
                setattr(cfg, name, 0.0)
                changed.append(f"{name} {p} -> 0")
        if getattr(cfg, "output_router_logits", False):
            cfg.output_router_logits = False
            changed.append("output_router_logits -> False (no router auxiliary loss)")
    return changed


def _probe(model, path) -> None:
    """``tidar.patch``'s probe is the gate: a model TiDAR would not run exactly is refused with the probe's reason.
    The model is returned unpatched (``tidar train`` patches it with its own options)."""
    from tidar.patching import UnsupportedModel, patch, unpatch

    try:
        patch(model)
    except UnsupportedModel as e:
        reason = str(e).removeprefix("tidar.patch: ").removesuffix(" The model is unchanged.")
        raise ValueError(f"--init-from {path} cannot be trained with TiDAR: {reason}") from e
    unpatch(model)


__all__ = [
    "POOL_FILE",
    "STATE_FILE",
    "TIDAR_STATE_FILE",
    "load_checkpoint",
    "load_init_model",
    "load_tokenizer",
    "save_model_folder",
    "settings_into_config",
]
