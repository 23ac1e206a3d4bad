"""Copy a ``tidar train`` checkpoint (``runs/NAME/checkpoint-N``) into a folder that can be committed, with the
run's ``corpus_manifest.json``; with ``--bf16`` the weights and the AdamW moments are stored in bf16 (half the
size; ``tidar train --resume`` upcasts both to fp32, so the resumed run is close to, not bit-identical with, an
uninterrupted one).

    python models/next/pack_checkpoint.py runs/next/checkpoint-1200 models/next/checkpoint [--bf16]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _bf16(t):
    return t.to(torch.bfloat16) if torch.is_tensor(t) and t.is_floating_point() else t


def pack_weights(src: Path, dst: Path):
    tensors = {k: _bf16(v).contiguous() for k, v in load_file(src).items()}
    save_file(tensors, dst, metadata={"format": "pt"})


def pack_optimizer(src: Path, dst: Path):
    sd = torch.load(src, map_location="cpu", weights_only=True)
    for st in sd["state"].values():
        for k, v in st.items():
            if k != "step":  # AdamW's exp_avg / exp_avg_sq; load_state_dict casts them back to the params' dtype
                st[k] = _bf16(v)
    torch.save(sd, dst)


def pack(src: Path, dst: Path, bf16: bool):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    manifest = src.parent / "corpus_manifest.json"
    if manifest.is_file():
        shutil.copy(manifest, dst / manifest.name)
    if bf16:
        pack_weights(src / "model.safetensors", dst / "model.safetensors")
        pack_optimizer(src / "optimizer.pt", dst / "optimizer.pt")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"{dst}: {size / 1e6:.1f} MB ({'bf16' if bf16 else 'as saved'})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--bf16", action="store_true", help="store weights and optimizer moments in bf16")
    a = p.parse_args()
    pack(a.src, a.dst, a.bf16)


if __name__ == "__main__":
    main()
