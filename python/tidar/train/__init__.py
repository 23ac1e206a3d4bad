"""Training: the hybrid objective, self-distilled targets, the Trainer subclass, the code corpus, checkpoints and
model folders, and the ``tidar train`` run. ``tidar.train.TidarTrainer`` is the Trainer (imported on first use,
so importing ``tidar`` does not import ``transformers.Trainer``)."""

import importlib


def __getattr__(name):
    if name in ("TidarTrainer", "HybridLossMixin"):
        return getattr(importlib.import_module("tidar.train.trainer"), name)
    raise AttributeError(f"module 'tidar.train' has no attribute {name!r}")
