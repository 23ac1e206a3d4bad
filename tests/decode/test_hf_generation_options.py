"""The drop-in ``model.generate`` against HF's own ``generate`` on an unpatched twin, in the shape of HF's
``GenerationTesterMixin``: the patch changes nothing shared, options are honoured or refused with a clear error
(never ignored), HF's logits processors run inside verification (greedy equal to HF token for token, sampling
with HF's processed distribution), HF's outputs and inputs. Two families (llama, qwen2), batches with left
padding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import chi2_pvalue, tiny_model

import tidar

pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny models: see conftest

FAMILIES = ("llama", "qwen2")
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])
BATCH = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 20, 21, 22, 23, 24]])
BATCH_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def _pair(arch, draft_len=4, **kw):
    """(patched model, unpatched twin with the same weights)."""
    twin = tiny_model(arch, **kw)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=draft_len)
    return model, twin


# ---------------------------------------------------------------------------------------- the patch is local


@pytest.mark.parametrize("arch", FAMILIES)
def test_patch_leaves_the_callers_config_untouched(arch):
    model = tiny_model(arch)
    cfg = model.config
    tidar.patch(model, draft_len=4)
    assert model.config._attn_implementation == "tidar"
    assert cfg._attn_implementation == "sdpa"  # the caller's object
    second = type(model)(cfg)  # a second model from the same config object is born as configured
    assert second.config._attn_implementation == "sdpa"
    assert not tidar.is_patched(second)
    tidar.unpatch(second)  # a no-op
    assert second.config._attn_implementation == "sdpa"
    tidar.unpatch(model)
    assert model.config is cfg
    assert all(getattr(m, "config", cfg) is cfg for m in model.modules())
    assert cfg._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", FAMILIES)
def test_output_attentions_on_a_plain_forward(arch):
    model, twin = _pair(arch)
    twin.set_attn_implementation("eager")
    for kw in (dict(input_ids=PROMPT), dict(input_ids=BATCH, attention_mask=BATCH_MASK)):
        got = model(**kw, output_attentions=True)
        want = twin(**kw, output_attentions=True)
        assert len(got.attentions) == len(want.attentions) == model.config.num_hidden_layers
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(got.logits[:, -1], want.logits[:, -1])


# ---------------------------------------------------------------------------------------- helpers


def _oracle(model, truth: torch.Tensor):
    """Forward hook: every [MASK] row at position p of row b predicts ``truth[b, p]`` (positions count from the
    row's first real token), so the drafts are what the output will be and long acceptances are exercised."""

    def hook(module, args, kwargs, output):
        step = kwargs.get("tidar_step")
        if step is None:
            return output
        is_mask = step.layout.block_id >= 0
        if not bool(is_mask.any()):
            return output
        cols = is_mask.nonzero().flatten()
        p = kwargs["position_ids"][:, cols].clamp_max(truth.shape[1] - 1)
        target = truth.gather(1, p)
        output.logits[:, cols] = -30.0
        output.logits[:, cols].scatter_(-1, target[..., None], 30.0)
        output.logits[torch.arange(len(target))[:, None], cols[None], target] = 30.0
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def _unpadded(seqs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows shifted left past their padding (the oracle's positions), padded on the right with token 1."""
    if mask is None:
        return seqs
    out = torch.ones_like(seqs)
    for b in range(seqs.shape[0]):
        n = int((mask[b] == 0).sum())
        out[b, : seqs.shape[1] - n] = seqs[b, n:]
    return out


def _greedy_pair(model, twin, prompt, mask, kwargs, new=14):
    """HF's greedy output on the twin, and TiDAR's with drafts forced right (every step accepts up to K)."""
    want = twin.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, **kwargs)
    handle = _oracle(model, _unpadded(want, mask))
    try:
        got = model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            full_logits=True,
            context_drafts=False,
            tidar_stats=True,
            **kwargs,
        )
    finally:
        handle.remove()
    return want, got


# ---------------------------------------------------------------------------------------- options


def test_static_cache_is_honoured():
    from transformers import StaticCache

    model, twin = _pair("llama")
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(model.generate(PROMPT, **kw), twin.generate(PROMPT, **kw))
    out = model.generate(PROMPT, return_dict_in_generate=True, **kw)
    assert isinstance(getattr(out, "cache", None), StaticCache)
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        model.generate(PROMPT, max_new_tokens=4, cache_implementation="offloaded")


GREEDY_OPTIONS = {
    "none": {},
    "repetition_penalty": dict(repetition_penalty=1.6),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids="BAD"),
    "min_new_tokens": dict(min_new_tokens=10, eos_token_id="EOS"),
    "min_length": dict(min_length=16, eos_token_id="EOS"),
    "suppress_tokens": dict(suppress_tokens="TOP"),
    "begin_suppress_tokens": dict(begin_suppress_tokens="TOP"),
    "sequence_bias": dict(sequence_bias="BIAS"),
    "forced_eos_token_id": dict(forced_eos_token_id=4, max_length=14),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(3, 3.0), eos_token_id=5),
    "eos_token_id=-1": dict(eos_token_id=-1),
    "remove_invalid_values + renormalize": dict(remove_invalid_values=True, renormalize_logits=True),
    "all at once": dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids="BAD", min_new_tokens=4),
}


def _resolve(option: dict, plain: torch.Tensor, P: int) -> dict:
    """Fill an option with tokens the plain greedy output emits, so that every option changes the output."""
    top = plain[:, P:].flatten().mode().values.item()
    first = plain[0, P].item()
    kw = dict(option)
    if kw.get("eos_token_id") == "EOS":
        kw["eos_token_id"] = plain[0, P + 2].item()
    if kw.get("suppress_tokens") == "TOP":
        kw["suppress_tokens"] = [top]
    if kw.get("begin_suppress_tokens") == "TOP":
        kw["begin_suppress_tokens"] = [first]
    if kw.get("bad_words_ids") == "BAD":
        kw["bad_words_ids"] = [[top], [first, plain[0, P + 1].item()]]
    if kw.get("sequence_bias") == "BIAS":
        kw["sequence_bias"] = {(top,): -20.0, (first, plain[0, P + 1].item()): -20.0}
    if "max_length" in kw:
        kw["max_length"] = P + kw["max_length"]
    return kw


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", list(GREEDY_OPTIONS))
def test_greedy_with_hf_processors_equals_hf(arch, name):
    model, twin = _pair(arch, draft_len=4)
    plain = twin.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False)
    kw = _resolve(GREEDY_OPTIONS[name], plain, BATCH.shape[1])
    if "max_length" in kw:
        want = twin.generate(BATCH, attention_mask=BATCH_MASK, do_sample=False, **kw)
        got = model.generate(BATCH, attention_mask=BATCH_MASK, do_sample=False, **kw)
        assert torch.equal(got, want)
        return
    want, got = _greedy_pair(model, twin, BATCH, BATCH_MASK, kw)
    assert torch.equal(got.sequences, want), (got.sequences, want)
    if name not in ("none", "eos_token_id=-1", "remove_invalid_values + renormalize"):
        assert not torch.equal(want, plain), f"{name} changes nothing here: the test would prove nothing"
    assert max(got.accepted_histogram) >= 3, got.accepted_histogram
    # the same without forced drafts (the model's own diffusion and context drafts)
    free = model.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False, **kw)
    assert torch.equal(free, want)


@pytest.mark.parametrize("arch", FAMILIES)
def test_generate_from_bos_with_forced_bos(arch):
    """No input_ids: HF starts from a BOS row (batch size from the mask's); forced_bos_token_id then applies."""
    model, twin = _pair(arch)
    for m in (model, twin):
        m.generation_config.bos_token_id = 2
    for kw in (dict(), dict(forced_bos_token_id=9)):
        want = twin.generate(max_new_tokens=8, do_sample=False, **kw)
        got = model.generate(max_new_tokens=8, do_sample=False, **kw)
        assert torch.equal(got, want)
    assert want[0, 1].item() == 9


# ---------------------------------------------------------------------------------------- sampling

V, T, N = 6, 3, 3000  # vocab (the last id is [MASK]), continuation length, draws
SAMPLE_PROMPT = [1, 3, 2]
SAMPLED_OPTIONS = {
    "repetition_penalty + top_k + temperature": dict(repetition_penalty=2.0, top_k=3, temperature=0.8),
    "no_repeat_ngram_size + min_p": dict(no_repeat_ngram_size=2, min_p=0.1),
    "typical_p + suppress_tokens": dict(typical_p=0.8, suppress_tokens=[0]),
    "epsilon_cutoff + top_p": dict(epsilon_cutoff=0.05, top_p=0.9),
    "eta_cutoff + sequence_bias": dict(eta_cutoff=0.05, sequence_bias={(3,): 2.0}),
}


def _hf_processed_distribution(twin, kwargs, prompt=SAMPLE_PROMPT, mask=None):
    """P(x_1..x_T | prompt) under HF's processed scores (processors then warpers, HF's own list, built with the
    prompt's mask), by enumeration of every continuation with the unpatched model."""
    import itertools

    P = len(prompt)
    mask = torch.ones(1, P, dtype=torch.long) if mask is None else torch.tensor([mask])
    gen, _ = twin._prepare_generation_config(None, do_sample=True, max_length=P + T, **kwargs)
    twin._prepare_special_tokens(gen, True, device=torch.device("cpu"), batch_size=1)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    rows = {"attention_mask": mask.expand(len(seqs), -1)}
    procs = twin._get_logits_processor(gen, input_ids_seq_length=P, device="cpu", model_kwargs=rows)
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
    full = torch.cat([mask.expand(len(seqs), -1), torch.ones(len(seqs), T, dtype=torch.long)], 1)
    pos = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    with torch.no_grad():
        logits = twin(ids, attention_mask=full, position_ids=pos).logits.float()
    lp = torch.zeros(len(seqs), dtype=torch.float64)
    for t in range(T):
        scores = procs(ids[:, : P + t], logits[:, P - 1 + t].clone())
        lp += scores.double().log_softmax(-1).gather(1, seqs[:, t : t + 1]).squeeze(1)
    return {tuple(s): p for s, p in zip(seqs.tolist(), lp.exp().tolist())}


@pytest.mark.parametrize("name", list(SAMPLED_OPTIONS))
def test_sampling_with_hf_processors_has_hfs_distribution(name):
    kw = SAMPLED_OPTIONS[name]
    twin = tiny_model("qwen2", vocab=V, hidden=16, init=0.5, seed=3)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=4)
    exact = _hf_processed_distribution(twin, kw)
    plain = _hf_processed_distribution(twin, {})
    ids = torch.tensor([SAMPLE_PROMPT]).expand(N, -1).contiguous()
    torch.manual_seed(0)
    out = model.generate(ids, do_sample=True, max_new_tokens=T, tidar_stats=True, **kw)
    samples = [tuple(r) for r in out.sequences[:, len(SAMPLE_PROMPT) :].tolist()]
    assert max(out.accepted_histogram) > 1, "no draft was ever accepted: the test would prove nothing"
    assert chi2_pvalue(samples, exact) > 1e-3
    tv = 0.5 * sum(abs(exact[s] - samples.count(s) / N) for s in exact)
    assert tv < 0.07
    assert chi2_pvalue(samples, plain) < 1e-6  # power: the processors change the distribution


def test_sampling_left_padded_batch_has_hfs_distribution():
    """A batch of two prompts, one left-padded: each row's samples have HF's processed distribution for its own
    row (HF's processors see the padding: the repetition penalty skips it, the n-gram ban does not)."""
    kw = dict(repetition_penalty=1.8, no_repeat_ngram_size=2, top_k=4)
    twin = tiny_model("llama", vocab=V, hidden=16, init=0.5, seed=5)
    model = copy.deepcopy(twin)
    tidar.patch(model, draft_len=3)
    padded, mask = [0, 0] + SAMPLE_PROMPT, [0, 0, 1, 1, 1]
    longer = [4, 1] + SAMPLE_PROMPT
    ids = torch.tensor([padded, longer] * (N // 2))
    batch_mask = torch.tensor([mask, [1] * 5] * (N // 2))
    res = model.generate(ids, attention_mask=batch_mask, do_sample=True, max_new_tokens=T, tidar_stats=True, **kw)
    assert max(res.accepted_histogram) > 1, "no draft was ever accepted: the test would prove nothing"
    out = res.sequences
    for row, (prompt, m) in enumerate(((padded, mask), (longer, None))):
        samples = [tuple(r) for r in out[row::2, 5:].tolist()]
        exact = _hf_processed_distribution(twin, kw, prompt, m)
        assert chi2_pvalue(samples, exact) > 1e-3, prompt


# ---------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False, "static"])
def test_dict_outputs_equal_hfs(arch, use_cache):
    """sequences, scores, logits, attentions and hidden states (an eager twin: SDPA returns no attentions) and the
    cache, with processors and a left-padded batch; with a static cache, attentions over all its keys, as HF's."""
    from transformers import DynamicCache, StaticCache

    static = use_cache == "static"
    use_cache = bool(use_cache)

    model, twin = _pair(arch)
    twin.set_attn_implementation("eager")
    kw = dict(
        attention_mask=BATCH_MASK,
        max_new_tokens=6,
        do_sample=False,
        repetition_penalty=1.3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_attentions=True,
        output_hidden_states=True,
        use_cache=use_cache,
        cache_implementation="static" if static else None,
    )
    want, got = twin.generate(BATCH, **kw), model.generate(BATCH, **kw)
    assert type(got) is type(want)
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(got, name)) == len(getattr(want, name)) == 6
        for a, b in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    real = BATCH_MASK.bool()  # padded query rows are undefined (each implementation fills them its own way)
    for step, (ga, wa, gh, wh) in enumerate(
        zip(got.attentions, want.attentions, got.hidden_states, want.hidden_states)
    ):
        rows = real if step == 0 or not use_cache else torch.ones(3, 1, dtype=torch.bool)
        if not use_cache:
            rows = torch.cat([real, torch.ones(3, step, dtype=torch.bool)], 1)
        for a, b in zip(ga, wa):
            assert a.shape == b.shape
            torch.testing.assert_close(a.transpose(1, 2)[rows], b.transpose(1, 2)[rows], atol=1e-5, rtol=1e-4)
        for a, b in zip(gh, wh):
            assert a.shape == b.shape
            torch.testing.assert_close(a[rows], b[rows], atol=1e-4, rtol=1e-4)
    if use_cache:
        assert isinstance(got.past_key_values, StaticCache if static else DynamicCache)
        assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length()
    else:
        assert got.past_key_values is None and want.past_key_values is None


@pytest.mark.parametrize("arch", FAMILIES)
def test_continue_from_returned_cache(arch):
    """A later generate continues from the returned past_key_values (HF's format), as HF's own continues."""
    model, twin = _pair(arch)
    kw = dict(attention_mask=BATCH_MASK, do_sample=False, return_dict_in_generate=True)
    full = twin.generate(BATCH, max_new_tokens=8, **kw).sequences
    first = model.generate(BATCH, max_new_tokens=4, **kw)
    mask = torch.cat([BATCH_MASK, torch.ones(3, 4, dtype=BATCH_MASK.dtype)], 1)
    # the returned cache (built from the TiDAR cache, no forward) holds HF's keys and values at every real position
    want = twin.generate(BATCH, max_new_tokens=4, **kw).past_key_values
    real = mask[:, :-1].bool()
    for g, w in zip(first.past_key_values.layers, want.layers):
        assert g.keys.shape == w.keys.shape
        torch.testing.assert_close(g.keys.transpose(1, 2)[real], w.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g.values.transpose(1, 2)[real], w.values.transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
    more = dict(kw, attention_mask=mask)
    got = model.generate(first.sequences, cache=first.past_key_values, max_new_tokens=4, **more)
    assert torch.equal(got.sequences, full)
    assert got.past_key_values is first.past_key_values  # filled further, as HF fills a given cache


@pytest.mark.parametrize("arch", FAMILIES)
def test_num_return_sequences(arch):
    model, twin = _pair(arch)
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=5, do_sample=True, num_return_sequences=3, top_k=None)
    got = model.generate(BATCH, **kw)
    assert got.shape == (9, BATCH.shape[1] + 5)
    assert torch.equal(got[:, : BATCH.shape[1]], BATCH.repeat_interleave(3, 0))
    with pytest.raises(ValueError, match="num_return_sequences"):  # HF's own rule for greedy
        model.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=4, num_return_sequences=2)


# ---------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("arch", FAMILIES)
def test_inputs_embeds_prompts(arch):
    model, twin = _pair(arch)
    embeds = twin.get_input_embeddings()(BATCH).detach()
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=8, do_sample=False, repetition_penalty=1.2)
    want = twin.generate(inputs_embeds=embeds, **kw)
    got = model.generate(inputs_embeds=embeds, **kw)
    assert want.shape == (3, 8) and torch.equal(got, want)  # new tokens only, as HF
    assert torch.equal(
        model.generate(BATCH, inputs_embeds=embeds, **kw), twin.generate(BATCH, inputs_embeds=embeds, **kw)
    )
    noise = embeds + 0.3 * torch.randn_like(embeds)  # embeddings of no token at all
    assert torch.equal(model.generate(inputs_embeds=noise, **kw), twin.generate(inputs_embeds=noise, **kw))


@pytest.mark.parametrize("arch", FAMILIES)
def test_any_attention_mask(arch):
    """HF masks a 0 anywhere: zeros in the middle, and right padding (HF's own decoding of it, warned about)."""
    model, twin = _pair(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    for use_cache in (True, False):
        kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, use_cache=use_cache)
        assert torch.equal(model.generate(ids, **kw), twin.generate(ids, **kw))


@pytest.mark.parametrize("arch", FAMILIES)
def test_position_ids_logits_to_keep_and_prompt_lookup(arch):
    model, twin = _pair(arch)
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=8, do_sample=False)
    want = twin.generate(BATCH, **kw)
    pos = (BATCH_MASK.cumsum(-1) - 1).masked_fill(BATCH_MASK == 0, 0)
    assert torch.equal(model.generate(BATCH, position_ids=pos, **kw), want)
    assert torch.equal(model.generate(BATCH, logits_to_keep=1, **kw), want)
    loop = torch.tensor([[4, 5, 6, 7, 4, 5, 6, 7, 4, 5]])
    lookup = dict(max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(model.generate(loop, **lookup), twin.generate(loop, **lookup))


def test_beam_search_and_assisted_decoding_are_refused():
    model, twin = _pair("llama")
    with pytest.raises(ValueError, match="num_beams=2 \\(beam search;"):
        model.generate(PROMPT, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="assistant_model= \\(assisted decoding with a second model\\)"):
        model.generate(PROMPT, max_new_tokens=4, assistant_model=twin)


@pytest.mark.parametrize("arch", FAMILIES)
def test_callers_logits_processor_equals_hf(arch):
    from transformers import LogitsProcessor, LogitsProcessorList

    class BanRecent(LogitsProcessor):  # bans the row's last 4 tokens: depends on each row's own prefix
        def __call__(self, input_ids, scores):
            return scores.scatter(1, input_ids[:, -4:], float("-inf"))

    model, twin = _pair(arch)
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False)
    plain = twin.generate(BATCH, **kw)
    want, got = _greedy_pair(model, twin, BATCH, BATCH_MASK, dict(logits_processor=LogitsProcessorList([BanRecent()])))
    assert torch.equal(got.sequences, want) and not torch.equal(want, plain)


def test_scores_stop_with_the_row_and_beta_is_refused_with_processors():
    model, twin = _pair("qwen2")
    plain = twin.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=10, do_sample=False)
    eos = plain[0, BATCH.shape[1] + 2].item()  # row 0 stops after 3 tokens
    kw = dict(attention_mask=BATCH_MASK, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    out = model.generate(BATCH, return_dict_in_generate=True, output_scores=True, **kw)
    assert torch.equal(out.sequences, twin.generate(BATCH, **kw))
    stopped = (out.sequences[0, BATCH.shape[1] :] == eos).int().argmax().item() + 1
    assert all(bool((s[0] == 0).all()) for s in out.scores[stopped:])  # nothing decided for row 0 after its EOS
    assert all(not bool((s[0] == 0).all()) for s in out.scores[:stopped])
    with pytest.raises(ValueError, match="beta=0.5"):
        model.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=4, repetition_penalty=1.2, beta=0.5)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("forced", [True, False])
@pytest.mark.parametrize("with_eos", [True, False])
def test_stopping_criteria_equal_hf(arch, forced, with_eos):
    """A caller's StoppingCriteria stops rows where HF stops them (mid-step, inside a run of accepted drafts): with
    an EOS criterion a stopped row is padded, without one it decodes on until every row has met a criterion."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, twin = _pair(arch)
    plain = twin.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False)
    P = BATCH.shape[1]
    stop = {plain[0, P + 5].item(), plain[2, P + 3].item(), plain[1, P + 7].item()}

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([t in stop for t in input_ids[:, -1].tolist()])

    kw = dict(stopping_criteria=StoppingCriteriaList([StopOn()]))
    if with_eos:  # an EOS no row emits: HF then pads the rows its criteria stopped
        kw["eos_token_id"] = min(set(range(1, 90)) - set(plain.flatten().tolist()))
    if forced:
        want, got = _greedy_pair(model, twin, BATCH, BATCH_MASK, kw)
        got = got.sequences
    else:
        want = twin.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False, **kw)
        got = model.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False, **kw)
    assert want.shape[1] < plain.shape[1]
    assert torch.equal(got, want)
    out = model.generate(BATCH, attention_mask=BATCH_MASK, max_new_tokens=14, do_sample=False, max_time=60.0)
    assert torch.equal(out, plain)
