"""The probe's reference forwards (``tidar.hf.probe._reference``) on models whose own forward fails part of
the way: every model is decoded exactly or refused with :class:`tidar.UnsupportedModel` naming the reason, and
never fails inside the probe (an ``IndexError`` when the 4-D-mask forward failed after the first prompt).

DeepSeek-V3 (multi-head latent attention with equal key and value head dims, MoE layers) is the real model."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers

import tidar
from tidar.hf.probe import PROBE_K, PROMPT_LENGTHS, UnsupportedModel

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

VOCAB = 100
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def deepseek_v3(**overrides):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        mask_token_id=VOCAB - 1,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**kw)
    config._attn_implementation = "sdpa"
    return transformers.DeepseekV3ForCausalLM(config).eval()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation


def _assert_unchanged(model, snap):
    state, impl = snap
    assert not tidar.is_patched(model) and model.config._attn_implementation == impl
    assert "generate" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _exact_or_refused(model):
    """Patch: either TiDAR's greedy decode equals the model's own, or a refusal with a reason and the model as it
    was. Returns the refusal (None when patched)."""
    snap = _snapshot(model)
    try:
        tidar.patch(model, draft_len=3)
    except UnsupportedModel as e:
        assert "is not supported: " in str(e) and "The model is unchanged." in str(e)
        _assert_unchanged(model, snap)
        return e
    out = tidar.generate(model, IDS, max_new_tokens=12)
    tidar.unpatch(model)
    _assert_unchanged(model, snap)
    want = model.generate(IDS, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert out.sequences.tolist() == want.tolist()
    return None


def test_deepseek_v3_is_decoded_exactly_or_refused_with_a_reason():
    refusal = _exact_or_refused(deepseek_v3())
    assert refusal is None or "latent attention" in str(refusal) or "differ" in str(refusal)


def test_deepseek_v3_with_unequal_head_dims_is_refused_as_latent_attention():
    refusal = _exact_or_refused(deepseek_v3(v_head_dim=8))
    assert refusal is not None and "multi-head latent attention" in str(refusal)


def test_a_model_whose_own_forward_fails_is_refused_naming_the_error():
    # n_group 8 over 4 routed experts: DeepSeek-V3's router cannot run any forward
    refusal = _exact_or_refused(deepseek_v3(n_group=8, topk_group=4))
    assert refusal is not None and "its own forward failed on the probe prompts (RuntimeError" in str(refusal)


def _float_4d(kwargs):
    m = kwargs.get("attention_mask")
    return isinstance(m, torch.Tensor) and m.dim() == 4 and m.dtype.is_floating_point


# When the model's own forward raises (on the probe's reference forwards, the TiDAR forwards pass a bool mask):
FAILS = {
    # an additive 4-D mask, every prompt (the model takes no 4-D mask): the mask rows are not compared
    "4d_mask_every_row": lambda kw, n: _float_4d(kw),
    # an additive 4-D mask of the second prompt only: none of the mask rows is compared (all rows or none)
    "4d_mask_second_row": lambda kw, n: _float_4d(kw) and n == PROMPT_LENGTHS[1] + PROBE_K,
    # the causal forward of the second prompt + drafts: the model is refused
    "causal_second_row": lambda kw, n: (
        not _float_4d(kw) and n == PROMPT_LENGTHS[1] + PROBE_K and kw.get("tidar_step") is None
    ),
}


def _failing(model, fails):
    """``model`` with its own forward raising where ``FAILS[fails]`` says; returns the list of calls."""
    own, calls = model.forward, []

    def forward(input_ids=None, **kwargs):
        calls.append(input_ids.shape[1])
        if FAILS[fails](kwargs, input_ids.shape[1]):
            raise ValueError("this model takes no such forward")
        return own(input_ids=input_ids, **kwargs)

    model.forward = forward
    return calls


@pytest.mark.parametrize("fails", sorted(FAILS))
def test_a_reference_forward_that_fails_part_way_is_never_an_index_error(fails):
    model = deepseek_v3()
    calls = _failing(model, fails)
    refusal = _exact_or_refused(model)
    assert calls, "the probe ran no forward"
    if fails == "causal_second_row":
        assert refusal is not None and "its own forward failed on the probe prompts (ValueError" in str(refusal)
    else:
        assert refusal is None, refusal


def test_the_probe_reports_whether_the_mask_rows_were_compared(monkeypatch):
    patch_module = importlib.import_module("tidar.patching")  # (the attribute tidar.patch is the function)
    reports = []
    run = patch_module.run_probe
    monkeypatch.setattr(patch_module, "run_probe", lambda *args: reports.append(run(*args)) or reports[-1])
    for fails, compared in ((None, True), ("4d_mask_second_row", False)):
        model = deepseek_v3()
        if fails is not None:
            _failing(model, fails)
        tidar.patch(model, draft_len=2)
        assert reports[-1].compared_mask_rows is compared
        tidar.unpatch(model)
