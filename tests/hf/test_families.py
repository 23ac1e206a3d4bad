"""Every causal-LM family of the installed transformers: supported and exact, or refused at ``tidar.patch``.

For each family a tiny random-weight model is built from its config class (tests/family_models.py; a family
whose tiny model cannot be built generically is skipped with the construction error). Then either
- ``tidar.patch`` refuses it with ``UnsupportedModel`` naming the family and the reason, and the model is exactly
  as before (weights, attention implementation, no ``generate`` override); or
- it is supported: greedy TiDAR at K = 1, 4, 16 on a ragged batch with forced long acceptances (an oracle
  rewrites the mask rows' logits, as tests/decode/test_generate_oracle.py) and the drop-in ``model.generate`` on the
  left-padded batch all equal the unpatched model's HF greedy, row by row; ``unpatch``
  restores the model exactly.
The README's "Supported model families" list is generated for one named transformers release; it must agree with
the outcome only when that release is installed (regenerate it with ``python tests/family_models.py --write``).
On any other release in the declared range every family is still checked (exact or refused), and a family the
release adds never fails for not being in the README. Forced acceptances run at K = 1, 4 and 16 (a sliding
window too short for K = 16 must be refused before any forward); ``TIDAR_FAMILY_SWEEP=1`` adds the default decode path
of ``tidar.generate`` (the drop-in already runs it).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from family_models import KNOWN_FAILURES, MASK_ID, VOCAB, build, families

import tidar
from tidar.hf.probe import REFUSAL_CATEGORIES, UnsupportedModel

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest


PROMPTS = ([11, 12, 13, 14, 15, 16], [21, 22, 23])  # ragged on purpose
NEW = 8
K_CI = 4
SWEEP = os.environ.get("TIDAR_FAMILY_SWEEP") == "1"
README = (Path(__file__).parents[2] / "README.md").read_text()


def readme_version(readme: str = README) -> str | None:
    """The transformers release the README's family list was generated for."""
    m = re.search(
        r"<!-- families:begin -->\s*Checked by `tests/hf/test_families.py` against transformers ([\w.]+)", readme
    )
    return m.group(1) if m else None


def readme_supported(readme: str = README) -> set | None:
    """The README's supported families, or None when the installed transformers is not the release it names."""
    if readme_version(readme) != transformers.__version__:
        return None
    m = re.search(r"<!-- families:begin -->(.*?)<!-- families:end -->", readme, re.S)
    return set(re.findall(r"`([\w\-.]+)`", m.group(1).split("Refused at")[0])) if m else set()


def _readme_agrees(model_type: str, supported: bool) -> None:
    listed = readme_supported()
    if listed is None:  # another release than the README's: the outcome above is the whole check
        return
    if supported:
        assert model_type in listed, f"{model_type} is supported: regenerate the README list"
    else:
        assert model_type not in listed, f"README lists {model_type} as supported but it is not"


def _oracle(model, truth: torch.Tensor, K: int):
    """As tests/decode/test_generate_oracle.py: in each forward the mask slots of row b predict the true token up to
    slot c (cycling with the call and the row) and a wrong one after it, so long acceptances happen."""
    calls = [0]

    def hook(module, args, kwargs, output):
        step = kwargs.get("tidar_step")
        if step is None:
            return output
        pos = kwargs["position_ids"]
        B = pos.shape[0]
        is_mask = step.layout.block_id >= 0
        cols = is_mask.nonzero().flatten()
        if not len(cols):
            return output
        slot = (cols - cols[0]) % K
        for b in range(B):
            c = (calls[0] + 3 * b) % K
            target = truth[b, pos[b, cols].clamp_max(truth.shape[1] - 1)]
            target = torch.where(slot <= c, target, (target + 1) % VOCAB)
            output.logits[b, cols] = -30.0
            output.logits[b, cols, target] = 30.0
        calls[0] += 1
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        model.config._attn_implementation,
        "generate" in model.__dict__,
        model.training,
    )


def _assert_unchanged(model, snap):
    state, impl, own_gen, training = snap
    assert model.config._attn_implementation == impl
    assert ("generate" in model.__dict__) == own_gen and not tidar.is_patched(model)
    assert model.training == training
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _hf_rows(model, extra):
    """The unpatched model's HF greedy, one row at a time (the AR truth), NEW + extra tokens."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        out.append(
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW + extra)[
                0
            ].tolist()
        )
    return out


def _padded():
    P = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in PROMPTS])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


def _check_rows(seqs, truth, what):
    P = max(map(len, PROMPTS))
    for b, (p, t) in enumerate(zip(PROMPTS, truth)):
        got = seqs[b, P:].tolist()
        want = t[len(p) : len(p) + NEW]
        assert got == want, f"{what}: row {b} TiDAR {got} != HF greedy {want}"


def _run_supported(model, truth, Ks):
    ids, mask = _padded()
    width = max(map(len, truth))
    oracle_truth = torch.tensor([t + [t[-1]] * (width - len(t)) for t in truth])
    for K in Ks:
        tidar.patch(model, draft_len=K)  # re-patch updates the settings only
        window = model._tidar.window
        if window is not None and max(map(len, PROMPTS)) + NEW > window:
            with pytest.raises(ValueError, match=f"sliding window {window}"):  # before any forward
                tidar.generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
            continue
        # a window shorter than the steps at K: the loop shrinks K (down to AR steps) to keep the keys inside it
        shrunk = window is not None and max(map(len, PROMPTS)) + NEW - 1 + K + K * K > window
        handle = _oracle(model, oracle_truth, K) if K > 1 else None
        try:
            out = tidar.generate(
                model, ids, attention_mask=mask, max_new_tokens=NEW, full_logits=True, context_drafts=False
            )
        finally:
            if handle is not None:
                handle.remove()
        _check_rows(out.sequences, truth, f"forced acceptances at K={K}")
        if K > 1 and not shrunk:
            assert max(out.accepted_histogram) >= 3, f"no long acceptance at K={K}: {out.accepted_histogram}"
    tidar.patch(model, draft_len=K_CI)
    if SWEEP:
        out = tidar.generate(model, ids, attention_mask=mask, max_new_tokens=NEW)  # the default (lean) path
        _check_rows(out.sequences, truth, "default decode path")
    got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)  # the drop-in
    _check_rows(got, truth, "drop-in model.generate")


def _params():
    for model_type, cls_name in families():
        marks = (
            [pytest.mark.xfail(reason=KNOWN_FAILURES[model_type], strict=False)] if model_type in KNOWN_FAILURES else []
        )
        yield pytest.param(model_type, cls_name, id=model_type, marks=marks)


@pytest.mark.parametrize("model_type,cls_name", list(_params()))
def test_family_is_exact_or_refused(model_type, cls_name):
    model, why = build(model_type, cls_name)
    if model is None:
        _readme_agrees(model_type, supported=False)
        pytest.skip(f"no tiny {model_type} model could be built from its config: {why}")
    assert model.get_input_embeddings().weight.shape[0] == VOCAB and model.config.mask_token_id == MASK_ID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snap = _snapshot(model)
        try:
            tidar.patch(model, draft_len=K_CI)
        except UnsupportedModel as e:
            msg = str(e)
            assert msg.startswith(f"tidar.patch: {model_type} (") and "is not supported: " in msg, msg
            assert e.category in REFUSAL_CATEGORIES, (e.category, msg)
            _assert_unchanged(model, snap)
            _readme_agrees(model_type, supported=False)
            return
        _readme_agrees(model_type, supported=True)
        tidar.unpatch(model)  # the HF reference comes from the unpatched model
        _assert_unchanged(model, snap)
        truth = _hf_rows(model, extra=16)
        tidar.patch(model, draft_len=K_CI)
        _run_supported(model, truth, (1, K_CI, 16))
        tidar.unpatch(model)
        _assert_unchanged(model, snap)


def test_readme_family_list_names_its_release():
    """The list says which release it was generated for; parsing it finds the supported families."""
    version = readme_version()
    assert version is not None and re.fullmatch(r"\d+\.\d+\.\d+\S*", version), version
    fake = README.replace(f"against transformers {version} ", f"against transformers {transformers.__version__} ")
    listed = readme_supported(fake)
    assert {"llama", "qwen2", "qwen3", "mistral"} <= listed and "bart" not in listed
