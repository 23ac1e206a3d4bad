"""tidar: TiDAR for Hugging Face causal LMs (the thin layer over ``tidar_kernels``).

tidar.add_mask_token(model, tokenizer)   # once, if the model has no [MASK]
tidar.patch(model, draft_len=16)         # "tidar" attention + drop-in model.generate
out = tidar.generate(model, input_ids, max_new_tokens=64)
dec = tidar.Decoder(model, input_ids, max_new_tokens=64)   # the same, a typed step at a time: prefill/plan/step
loss = tidar.hybrid_loss(model, input_ids, block_size=16).loss   # training objective
tidar.unpatch(model)                     # back to the exact original
"""

from tidar.decode.decoder import Decoder, generate
from tidar.decode.results import PlannedStep, Prefilled, StepResult, TidarGenerateOutput
from tidar.decode.slot_timing import slot_curve
from tidar.decode.stats import AcceptanceEvidence, DecodeCounters, DecodeStats
from tidar.hf.attention import TidarStep, tidar_forward
from tidar.hf.cache import TidarCache
from tidar.patching import UnsupportedModel, add_mask_token, is_patched, patch, unpatch
from tidar.train.objective import HybridLoss, hybrid_loss
from tidar_kernels._version import __version__ as __version__  # one version for both packages

__all__ = [
    "AcceptanceEvidence",
    "DecodeCounters",
    "DecodeStats",
    "Decoder",
    "HybridLoss",
    "PlannedStep",
    "Prefilled",
    "StepResult",
    "TidarCache",
    "TidarGenerateOutput",
    "TidarStep",
    "UnsupportedModel",
    "add_mask_token",
    "generate",
    "hybrid_loss",
    "is_patched",
    "patch",
    "slot_curve",
    "tidar_forward",
    "unpatch",
]
