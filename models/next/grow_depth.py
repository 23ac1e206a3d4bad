"""Grow a trained model deeper without changing what it computes (block expansion, as LLaMA Pro, Wu et al. 2024).

Why: a TiDAR draft slot predicts tokens two and more positions ahead without seeing the ones before them; with the
same 4 layers that also carry the AR head, v6's drafter stops at ~1.5 tokens per forward (issue 23). New layers give
the drafter depth without a new pretraining run: each new layer is a copy of the layer before it with its output
projections (attention `o_proj`, MLP `down_proj`) set to zero, so it adds nothing to the residual stream and the
grown model's logits equal the old model's exactly. Training then moves the copies away from zero.

    python models/next/grow_depth.py SRC_DIR DST_DIR --after 1 3     # 4 layers -> 6: copies after layers 1 and 3
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ZEROED = ("self_attn.o_proj.", "mlp.down_proj.")


def grow(src: Path, dst: Path, after: list[int]) -> list[int]:
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    if not after or any(not 0 <= i < n for i in after) or len(set(after)) != len(after):
        raise ValueError(f"--after takes distinct layer indices in [0, {n}), got {after}")
    order = []  # order[new index] = source layer; a copy's index is recorded as negative - 1 - source
    for i in range(n):
        order.append(i)
        if i in after:
            order.append(-1 - i)
    weights = load_file(str(src / "model.safetensors"))
    out = {k: v for k, v in weights.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(order):
        copy = old < 0
        old = -1 - old if copy else old
        prefix = f"model.layers.{old}."
        for k, v in weights.items():
            if k.startswith(prefix):
                rest = k[len(prefix) :]
                v = v.clone()
                if copy and rest.startswith(ZEROED):
                    v.zero_()
                out[f"model.layers.{new}.{rest}"] = v
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json", "README.md", "trainer_state.json"):
            shutil.copy2(f, dst / f.name)
    config["num_hidden_layers"] = len(order)
    if "layer_types" in config:
        config["layer_types"] = [config["layer_types"][o if o >= 0 else -1 - o] for o in order]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return order


def check_same_logits(src: Path, dst: Path) -> float:
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.randint(3, a.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--after", type=int, nargs="+", required=True, help="source layers to follow with a zeroed copy")
    a = p.parse_args()
    order = grow(a.src, a.dst, a.after)
    diff = check_same_logits(a.src, a.dst)
    print(f"layers {order} (negative: zeroed copy of -1-i); max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
