"""The direct decoder body (``tidar.hf.direct_body``): bit-identical to the module path where it runs, and the
module path wherever it is not proven (other families, hooks, adapters, training mode, a failed proof, the switch).

Bit-identical, not close: the body replaces the modules only because it runs the same ops on the same parameters,
so the hidden states of a cached decode step (drafts + a proposal block after a prompt) and the K/V it writes
must equal the module path's exactly, in fp32 and bf16, on every family it claims."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

import tidar
from tidar.hf import direct_body
from tidar.hf.attention import TidarStep, tidar_hidden
from tidar.hf.cache import TidarCache
from tidar_kernels import layouts

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

PROMPT = [5, 9, 14, 3, 27, 41, 8]


def _patched(arch="qwen2", dtype=torch.float32, **kw):
    model = tiny_model(arch, **kw).to(dtype)
    return tidar.patch(model)


def _two_steps(model, body):
    """A prompt's causal forward, then a decode step of 3 drafts + one block of 3 masks per level, through a
    TidarCache: the hidden states of both forwards and the cache's K/V after them."""
    dev = next(model.parameters()).device
    cache = TidarCache(1, 64)
    n = len(PROMPT)
    ids = torch.tensor([PROMPT], device=dev)
    lay = layouts.causal(n).to(dev)
    seg = torch.zeros(1, dtype=torch.int32, device=dev)
    h1 = body(ids, lay.position_ids[None], TidarStep(lay, seg, cache, "reference"))
    cache.commit([n])
    step = layouts.decode_step(3).to(dev)
    S = step.local_limit.shape[0]
    gen = torch.Generator().manual_seed(7)
    ids2 = torch.randint(0, 90, (1, S), generator=gen).to(dev)
    seg2 = torch.full((1,), n, dtype=torch.int32, device=dev)
    h2 = body(ids2, (step.position_ids + n)[None], TidarStep(step, seg2, cache, "reference"))
    return h1, h2, [t.clone() for t in cache.keys + cache.values]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_direct_body_is_bit_identical_to_the_modules(arch, dtype):
    model = _patched(arch, dtype)
    assert direct_body.status(model) == f"direct ({arch})"
    body = direct_body.decoder_body(model)
    assert isinstance(body, direct_body.DirectBody)
    with torch.no_grad():
        got = _two_steps(model, body)
        want = _two_steps(model, lambda i, p, s: tidar_hidden(model, i, p, s))
    for g, w in zip(got[:2], want[:2]):
        assert g.dtype == dtype and torch.equal(g, w)
    assert len(got[2]) == 2 * model.config.num_hidden_layers and all(torch.equal(g, w) for g, w in zip(got[2], want[2]))


def test_llama_with_attention_and_mlp_biases():
    base = tiny_model("llama")
    cfg = base.config
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(3)
    model = tidar.patch(type(base)(cfg).eval())
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.bias is not None and layer.mlp.up_proj.bias is not None
    assert direct_body.status(model) == "direct (llama)"
    with torch.no_grad():
        got = _two_steps(model, direct_body.decoder_body(model))
        want = _two_steps(model, lambda i, p, s: tidar_hidden(model, i, p, s))
    assert all(torch.equal(g, w) for g, w in zip(got[:2], want[:2]))


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_generate_runs_the_direct_body_and_stays_exact(arch, monkeypatch):
    ref_model = tiny_model(arch)
    want = _hf_greedy(ref_model, PROMPT, 24)
    model = tidar.patch(tiny_model(arch))
    calls = []
    real = direct_body.DirectBody.__call__
    monkeypatch.setattr(direct_body.DirectBody, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    for K in (1, 4, "auto"):
        calls.clear()
        out = tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=24, draft_len=K, eos_token_id=[])
        assert out.new_tokens[0] == want, K
        assert len(calls) >= out.forwards, K  # every forward of the request ran the direct body


def test_sampled_generate_has_the_same_draws_with_either_body(monkeypatch):
    """Same seed, same ops: the direct body changes no bit, so a sampled request draws the same tokens."""
    model = tidar.patch(tiny_model("qwen2"))
    kw = dict(max_new_tokens=20, temperature=0.9, draft_len=4, eos_token_id=[])
    a = tidar.generate(model, torch.tensor([PROMPT]), generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setenv(direct_body.ENV, "0")
    assert direct_body.status(model) == f"modules: {direct_body.ENV}=0"
    b = tidar.generate(model, torch.tensor([PROMPT]), generator=torch.Generator().manual_seed(5), **kw)
    assert a.new_tokens == b.new_tokens


def test_a_hook_an_adapter_or_training_mode_keep_the_modules():
    model = _patched("qwen2")
    assert direct_body.status(model) == "direct (qwen2)"
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(1))
    assert direct_body.status(model).startswith("modules: ")
    tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=4, eos_token_id=[])
    assert seen, "the user's hook must run: the module path decodes"
    handle.remove()
    assert direct_body.status(model) == "direct (qwen2)"

    class LoraLinear(nn.Linear):  # an adapter's replacement: a subclass, with its own forward
        def forward(self, x):
            return super().forward(x) * 1.5

    old = model.model.layers[0].self_attn.v_proj
    new = LoraLinear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    new.eval()
    model.model.layers[0].self_attn.v_proj = new
    reason = direct_body.status(model)
    assert reason.startswith("modules: ") and "v_proj" in reason and "LoraLinear" in reason
    model.model.layers[0].self_attn.v_proj = old
    assert direct_body.status(model) == "direct (qwen2)"

    model.train()
    assert direct_body.status(model) == "modules: the model is in training mode"
    model.eval()
    assert direct_body.status(model) == "direct (qwen2)"


def test_a_replaced_parameter_is_seen():
    """The body holds Parameter objects: a parameter replaced after a request rebuilds it (fingerprint)."""
    model = _patched("llama")
    ref = tiny_model("llama")
    tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=4, eos_token_id=[])
    torch.manual_seed(11)
    w = torch.randn_like(model.model.layers[0].mlp.up_proj.weight) * 0.2
    for m in (model, ref):
        m.model.layers[0].mlp.up_proj.weight = nn.Parameter(w.clone())
    out = tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=16, draft_len=4, eos_token_id=[])
    assert out.new_tokens[0] == _hf_greedy(ref, PROMPT, 16)


def test_a_proof_that_fails_keeps_the_modules(monkeypatch):
    """The proof can fail: a body whose norm is off by one ulp is refused, and decoding stays exact."""

    def off_by_a_bit(x, weight, eps):
        return torch.nextafter(
            weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype),
            torch.tensor(float("inf"), dtype=x.dtype),
        )

    monkeypatch.setattr(direct_body, "_rms", off_by_a_bit)
    model = _patched("qwen2")
    assert direct_body.status(model) == "modules: its hidden states differ from the module path's on a probe forward"
    ref = tiny_model("qwen2")
    out = tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=12, draft_len=4, eos_token_id=[])
    assert out.new_tokens[0] == _hf_greedy(ref, PROMPT, 12)


def test_other_families_keep_the_modules():
    from family_models import build

    model, why = build("gemma", "GemmaForCausalLM")
    if model is None:
        pytest.skip(f"no tiny Gemma: {why}")
    tidar.patch(model)
    reason = direct_body.status(model)
    assert reason.startswith("modules: GemmaModel is not one of ")
