"""The LM head on the rows that need it (docs/design.md §4).

A decode step needs logits only at its K draft rows (verification) and at the K rows of the one proposal
block whose drafts are used next: 2K of K + K*|levels| rows. So the step runs the model's body (decoder
stack + final norm) for every token and the output embeddings (+ the family's logit post-processing) only
on those rows. ``OutputHead`` does the second part and proves, on a probe, that body + head equals the
model's own forward; where it does not (an unknown post-processing), the step computes the full logits.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from tidar.hf import cpu_packed


class OutputHead:
    """``head(hidden_rows) -> logits`` for a Hugging Face causal LM, as its own forward computes them."""

    def __init__(self, model):
        self.model = weakref.proxy(model)
        self.body = getattr(model, "base_model", None)
        self.proj = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self.proj is None or self.body is None or self.body is model:
            raise ValueError(
                f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): TiDAR needs "
                "a causal LM with an LM head"
            )
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        self.scale = (
            getattr(model, "logit_scale", None)
            if isinstance(getattr(model, "logit_scale", None), float)
            else getattr(cfg, "logit_scale", None)
        )  # Cohere
        self.divide = getattr(cfg, "logits_scaling", None)  # Granite
        self.verified: bool | None = None  # set by verify(): body + head == the model's forward
        self.reason = ""
        self._wt = None  # (weight, its version, contiguous transposed copy): see _project
        self._packed = cpu_packed.PackedHead()  # float32 on a CPU where packing is on (``cpu_packed``)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._project(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output embeddings. On a CPU, MKL's GEMM of ``F.linear`` is slow for the few rows of a decode step
        (benchmarks/results/lm_head_cpu_few_rows.md): one row runs as ``hidden @ W^T`` with ``W^T`` kept
        contiguous (rebuilt when the weight changes: training steps bump its version), 2 or more rows as
        ``W @ hidden^T``, transposed back into a contiguous ``[..., V]`` (at 2 to 4 rows faster than either, at 4
        to 16 rows up to 2.9x faster than the copy). A float32 head runs on its oneDNN-packed copy instead where
        ``cpu_packed`` is on (every row count: 1.3x faster for one row, 3-5x for 2-24). Heads over ``_MAX_COPY_BYTES``
        keep ``F.linear``."""
        proj = self.proj
        w = getattr(proj, "weight", None)
        if (
            type(proj) is not torch.nn.Linear
            or w.device.type != "cpu"
            or w.is_inference()
            or w.numel() * w.element_size() > _MAX_COPY_BYTES
            or torch.is_grad_enabled()
        ):
            return proj(hidden)
        if w.dtype == torch.float32 and hidden.dtype == torch.float32 and cpu_packed.enabled():
            out = self._packed(hidden, w, proj.bias)
            if out is not None:
                return out
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] > 1:
            out = torch.mm(w.detach(), rows.t()).t().contiguous().view(*hidden.shape[:-1], w.shape[0])
        else:
            memo = self._wt
            if memo is None or memo[0] is not w or memo[1] != w._version:
                memo = self._wt = (w, w._version, w.detach().t().contiguous())
            out = hidden @ memo[2]
        return out if proj.bias is None else out + proj.bias

    def verify(self, forward_hidden, forward_logits) -> bool:
        """Compare ``self(forward_hidden)`` with the model's logits of the same forward (once per model)."""
        if self.verified is None:
            ref = forward_logits.float()
            tol = 1e-4 if ref.dtype == torch.float32 and forward_hidden.dtype == torch.float32 else 2e-2
            try:
                mine = self(forward_hidden).float()
                err = (mine - ref).abs().max().item() if mine.shape == ref.shape else float("inf")
            except RuntimeError:  # a head with layers between the body and the output embeddings (Electra)
                err = float("inf")
            scale = ref.abs().max().item() + 1e-6
            self.verified = err <= tol * max(1.0, scale)
            if not self.verified:
                self.reason = (
                    f"{type(self.model).__name__}: its LM head post-processing is not known to tidar "
                    f"(max difference {err:.3g}); every step computes the full logits instead"
                )
                warnings.warn(f"tidar: LM head on needed rows disabled for {self.reason}", stacklevel=3)
        return self.verified


_MAX_COPY_BYTES = 64 << 20  # a transposed copy of a larger head costs more memory than its speed-up is worth
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OutputHead (nothing stored on it)


def output_head(model) -> OutputHead:
    """The model's ``OutputHead``, built once per model."""
    head = _HEADS.get(model)
    if head is None:
        head = _HEADS[model] = OutputHead(model)
    return head
