"""The direct decoder body (``tidar.hf.direct_body``): bit-identical to the module path where it runs, and the
module path wherever it is not proven (other families, hooks, adapters, training mode, a failed proof, the switch).

Bit-identical, not close: the body replaces the modules only because it runs the same ops on the same parameters,
so the hidden states of a cached decode step (drafts + a proposal block after a prompt) and the K/V it writes
must equal the module path's exactly, in fp32 and bf16, on every family it claims. The packed CPU projections
(``tidar.hf.cpu_packed``) change rounding on purpose and are off here; ``test_cpu_packed.py`` tests them against
the plain body these tests prove."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, two_steps
from torch import nn

import tidar
from tidar.hf import cpu_packed, direct_body
from tidar.hf.attention import tidar_hidden

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest


@pytest.fixture(autouse=True)
def _plain_projections(monkeypatch):
    """The body's own ops, as the proof runs them (the packed copies are ``test_cpu_packed.py``'s)."""
    monkeypatch.setenv(cpu_packed.ENV, "0")


PROMPT = [5, 9, 14, 3, 27, 41, 8]


def _patched(arch="qwen2", dtype=torch.float32, **kw):
    model = tiny_model(arch, **kw).to(dtype)
    return tidar.patch(model)


def _two_steps(model, body):
    """``conftest.two_steps`` on ``PROMPT`` with 3 drafts."""
    return two_steps(model, body, PROMPT, 3)


def _same_as_modules(model):
    """Both forwards of ``_two_steps`` and the K/V they wrote, bit-identical with the body and the modules."""
    with torch.no_grad():
        got = _two_steps(model, direct_body.decoder_body(model))
        want = _two_steps(model, lambda i, p, s: tidar_hidden(model, i, p, s))
    same_kv = len(got[2]) == len(want[2]) and all(torch.equal(g, w) for g, w in zip(got[2], want[2]))
    return same_kv and all(torch.equal(g, w) for g, w in zip(got[:2], want[:2]))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tests/gpu/session.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_direct_body_is_bit_identical_on_cuda(arch, dtype):
    """On a GPU the body runs the same kernels in the same order: bit-identical there too, and proven so."""
    model = tidar.patch(tiny_model(arch).to("cuda", dtype))
    assert direct_body.status(model) == f"direct ({arch})"
    assert next(model.parameters()).is_cuda and _same_as_modules(model)


def test_llama_with_attention_and_mlp_biases():
    base = tiny_model("llama")
    cfg = base.config
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(3)
    model = tidar.patch(type(base)(cfg).eval())
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.bias is not None and layer.mlp.up_proj.bias is not None
    assert direct_body.status(model) == "direct (llama)"
    assert _same_as_modules(model)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gemma_scaled_embedding_and_norm(dtype):
    """Gemma: the embedding scales in its own forward, the norm scales by (1 + weight) in float32."""
    from family_models import build

    model, why = build("gemma", "GemmaForCausalLM")
    if model is None:
        pytest.skip(f"no tiny Gemma: {why}")
    ref = copy.deepcopy(model)
    torch.manual_seed(4)
    with torch.no_grad():  # the norms' weights away from Gemma's zero init, so (1 + weight) matters
        for a, b in zip(model.parameters(), ref.parameters()):
            if a.dim() == 1:
                a.copy_(torch.randn_like(a) * 0.3)
                b.copy_(a)
    model, ref = model.to(dtype), ref.to(dtype)
    tidar.patch(model)
    assert direct_body.status(model) == "direct (gemma)"
    assert _same_as_modules(model)
    if dtype == torch.float32:
        ids = torch.tensor([PROMPT])
        out = tidar.generate(model, ids, max_new_tokens=16, draft_len=4, eos_token_id=[])
        assert out.new_tokens[0] == _hf_greedy(ref, PROMPT, 16)


@pytest.mark.parametrize("partial", [False, True], ids=["full-rope", "partial-rope"])
def test_phi3_fused_projections_and_partial_rope(partial):
    """Phi-3: q/k/v sliced from one projection, the MLP's halves from another, RoPE on part of each head."""
    from family_models import build

    kw = {}
    if partial:
        kw = dict(
            partial_rotary_factor=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )
    model, why = build("phi3", "Phi3ForCausalLM", **kw)
    if model is None:
        pytest.skip(f"no tiny Phi-3: {why}")
    ref = copy.deepcopy(model)
    head_dim = model.model.layers[0].self_attn.head_dim
    rot = model.model.rotary_emb(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.long))[0].shape[-1]
    assert (rot < head_dim) == partial
    tidar.patch(model)
    assert direct_body.status(model) == "direct (phi3)"
    assert _same_as_modules(model)
    out = tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=16, draft_len=4, eos_token_id=[])
    assert out.new_tokens[0] == _hf_greedy(ref, PROMPT, 16)


def test_other_families_keep_the_modules():
    from family_models import build

    model, why = build("olmo2", "Olmo2ForCausalLM")
    if model is None:
        pytest.skip(f"no tiny OLMo-2: {why}")
    tidar.patch(model)
    reason = direct_body.status(model)
    assert reason.startswith("modules: Olmo2Model is not one of ")


# ---------------------------------------------------------------- what keeps the modules (each rule can fail)


class _SameNameMLP(nn.Module):
    """A stand-in named like the family's MLP (matched by identity, not by name)."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_SameNameMLP.__name__ = "Qwen2MLP"


def _own_forward(model):
    mlp = model.model.layers[0].mlp
    mlp.forward = mlp.forward  # an instance attribute, as offloading hooks and hub kernels set
    return lambda: mlp.__dict__.pop("forward")


def _pre_hook(model):
    return model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: None).remove


def _global_hook(model):
    from torch.nn.modules.module import register_module_forward_hook

    return register_module_forward_hook(lambda m, a, o: None).remove


def _compiled(model):
    layer = model.model.layers[1]
    layer.compile()
    return lambda: setattr(layer, "_compiled_call_impl", None)


def _same_name_class(model):
    layer = model.model.layers[1]
    old = layer.mlp
    layer.mlp = _SameNameMLP(old).eval()
    return lambda: setattr(layer, "mlp", old)


def _eager(model):
    model.set_attn_implementation("eager")
    return lambda: model.set_attn_implementation("tidar")


def _max_norm(model):
    model.model.embed_tokens.max_norm = 1.0
    return lambda: setattr(model.model.embed_tokens, "max_norm", None)


def _parametrized(model):
    from torch.nn.utils import parametrize

    lin = model.model.layers[0].self_attn.o_proj

    class Same(nn.Module):
        def forward(self, w):
            return w

    parametrize.register_parametrization(lin, "weight", Same())
    return lambda: parametrize.remove_parametrizations(lin, "weight")


def _kernel_func(model):
    funcs = getattr(model.model.layers[0].self_attn, "_kernel_funcs", None)
    if not funcs:
        pytest.skip("no hub kernel functions on this transformers/kernels install")
    f = next(iter(funcs.values()))
    f.forward = f.forward  # as kernelize() swaps a kernel in
    return lambda: f.__dict__.pop("forward")


MUTATIONS = {
    "own forward": (_own_forward, "has its own forward"),
    "pre-hook": (_pre_hook, "has forward hooks"),
    "global hook": (_global_hook, "global module hooks are registered"),
    "compiled layer": (_compiled, "is compiled"),
    "same-name class": (_same_name_class, "not transformers' Qwen2MLP"),
    "eager attention": (_eager, "the attention implementation is 'eager'"),
    "embedding max_norm": (_max_norm, "max_norm"),
    "parametrized weight": (_parametrized, "o_proj is a ParametrizedLinear"),
    "hub kernel function": (_kernel_func, "runs a hub kernel"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_what_keeps_the_modules_and_is_undone(mutation):
    """Each rule refuses with its reason after a first request, and undoing the change brings the body back."""
    make, reason = MUTATIONS[mutation]
    model = _patched("qwen2")
    tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=4, eos_token_id=[])
    assert direct_body.status(model) == "direct (qwen2)"
    undo = make(model)
    try:
        got = direct_body.status(model)
        assert got.startswith("modules: ") and reason in got, got
        assert not isinstance(direct_body.decoder_body(model), direct_body.DirectBody)
    finally:
        undo()
    assert direct_body.status(model) == "direct (qwen2)"


def test_a_forward_changed_on_the_class_is_proven_again(monkeypatch):
    model = _patched("qwen2")
    assert direct_body.status(model) == "direct (qwen2)"
    cls = type(model.model.layers[0].mlp)
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, x: real(self, x) * 2)
    assert direct_body.status(model) == "modules: its hidden states differ from the module path's on a probe forward"
    monkeypatch.setattr(cls, "forward", real)
    assert direct_body.status(model) == "direct (qwen2)"


def test_settings_changed_after_a_request_are_seen():
    """Layer count, a norm's epsilon and the dtype, changed between requests: the body follows (proven again)."""
    model = _patched("qwen3", layers=3)
    assert _same_as_modules(model)
    model.config.num_hidden_layers = 2
    assert direct_body.status(model) == "direct (qwen3)" and _same_as_modules(model)
    model.model.layers[0].post_attention_layernorm.variance_epsilon = 0.5
    model.model.layers[1].self_attn.k_norm.variance_epsilon = 0.25
    assert direct_body.status(model) == "direct (qwen3)" and _same_as_modules(model)
    model.to(torch.bfloat16)
    assert direct_body.status(model) == "direct (qwen3)" and _same_as_modules(model)
    assert direct_body.decoder_body(model).layers[0].q[0].dtype == torch.bfloat16


def test_a_sliding_window_refuses_as_the_modules_do():
    """Mistral's window (from its config) reaches the attention: too many keys raise on both paths (and the proof,
    which raises too, keeps the modules)."""
    model = _patched("mistral")
    assert direct_body.status(model) == "direct (mistral)"
    model.config.sliding_window = 4
    for layer in model.model.layers:
        layer.self_attn.config.sliding_window = 4
    assert direct_body.status(model).startswith("modules: ValueError: sliding-window attention (window 4)")
    body = direct_body.DirectBody(model, direct_body.FAMILIES["MistralModel"])
    assert [L.window for L in body.layers] == [4, 4]
    for f in (body, lambda i, p, s: tidar_hidden(model, i, p, s)):
        with torch.no_grad(), pytest.raises(ValueError, match="sliding-window attention"):
            _two_steps(model, f)


def test_the_body_does_not_keep_weights_alive():
    """Nothing is cached with the model but the proof: a replaced weight is freed once the request ends."""
    import gc
    import weakref

    model = _patched("qwen2")
    tidar.generate(model, torch.tensor([PROMPT]), max_new_tokens=4, eos_token_id=[])
    old = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    model.model.layers[0].mlp.up_proj.weight = nn.Parameter(old().detach().clone())
    gc.collect()
    assert old() is None
