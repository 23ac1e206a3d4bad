"""Drive every acceptance length 1..K through the real loop, and check the committed cache.

Random weights accept few drafts, so an "oracle" forward hook rewrites the logits of the [MASK] rows
(the loop runs with ``full_logits=True`` so the hook sees every row's logits, and without context drafts)
(never the AR rows that verify) so that, in each forward, the proposal slots are right up to a chosen
slot c and wrong after it: the next step then accepts exactly 1 + c drafts. The output must still be
the model's AR greedy output, which also proves that long accepted runs commit the right K/V.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import tidar


def _oracle(model, truth: torch.Tensor, K: int):
    """Hook: mask token at absolute position p of row b predicts truth[b, p] iff its slot <= c (b, call)."""
    V = model.config.vocab_size
    calls = [0]

    def hook(module, args, kwargs, output):
        ids, pos = kwargs["input_ids"], kwargs["position_ids"]
        B, S = ids.shape
        step = kwargs.get("tidar_step")
        if step is None:
            return output
        # mask rows from the layout (a draft may be the [MASK] id itself: it is still an AR row)
        is_mask = (step.layout.block_id >= 0)[None].expand(B, -1)
        if not is_mask.any():
            return output
        logits = output.logits
        first_mask = is_mask.float().argmax(1)  # the first mask of the segment sits at slot 0 of its block
        for b in range(B):
            c = (calls[0] + 3 * b) % K  # cycles through 0..K-1: every acceptance length appears
            cols = is_mask[b].nonzero().flatten()
            slot = (cols - first_mask[b]) % K
            p = pos[b, cols].clamp_max(truth.shape[1] - 1)
            target = truth[b, p]
            target = torch.where(slot <= c, target, (target + 1) % V)
            logits[b, cols] = -30.0
            logits[b, cols, target] = 30.0
        calls[0] += 1
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(params=["host", "device"])
def verify_on(request, monkeypatch):
    """Greedy acceptance decided on the host (the CPU path) or by ``device_step`` (the GPU path, run on CPU)."""
    from tidar.decode import forwards as gen

    monkeypatch.setattr(gen, "HOST_VERIFY", {"cpu"} if request.param == "host" else set())
    return request.param


@pytest.mark.parametrize("arch,K,B", [("qwen2", 4, 1), ("llama", 16, 2), ("qwen3", 8, 3), ("mistral", 16, 1)])
def test_every_acceptance_length_and_exact_output(arch, K, B, verify_on):
    model = tiny_model(arch)
    V = model.config.vocab_size
    new = K * (K + 1) // 2 + 3 * K  # enough for a full cycle of acceptance lengths
    torch.manual_seed(7)
    ids = torch.randint(1, V - 1, (B, 6))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new + K * K + 2 * K)
    want = ref[:, : 6 + new]

    tidar.patch(model, draft_len=K)
    handle = _oracle(model, ref, K)
    try:
        out = tidar.generate(model, ids, max_new_tokens=new, full_logits=True, context_drafts=False)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, want)
    assert set(out.accepted_histogram) == set(range(1, K + 1)), out.accepted_histogram
    assert out.tokens_per_forward > 1.5

    # Cache exactness: per row, the committed K/V equal HF's AR cache of the same tokens.
    tidar.unpatch(model)
    for b in range(B):
        L = out.cache.lengths[b]
        seq = out.sequences[b].tolist()
        assert 6 + new - 1 <= L <= 6 + new  # everything but (at most) the pending last token
        with torch.no_grad():
            hf = model(torch.tensor([seq[:L]]), use_cache=True)
        kv = getattr(hf, "past_key_values", None) or hf.cache
        for layer in range(model.config.num_hidden_layers):
            k, v = out.cache.committed(layer, b)
            hk, hv = kv.layers[layer].keys[0], kv.layers[layer].values[0]
            torch.testing.assert_close(k, hk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, hv, atol=1e-5, rtol=1e-5)


def test_beta_mix_changes_targets_but_beta_one_is_exact():
    model = tiny_model("qwen2")
    ids = torch.tensor([[3, 4, 5, 6]])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)
    tidar.patch(model, draft_len=4)
    assert torch.equal(tidar.generate(model, ids, max_new_tokens=16, beta=1.0).sequences, want)
    mixed = tidar.generate(model, ids, max_new_tokens=16, beta=0.0)  # pure diffusion targets: not AR
    assert mixed.sequences.shape == want.shape
    assert not torch.equal(mixed.sequences, want)


@pytest.mark.parametrize(
    "arch,K,levels,B", [("qwen2", 6, (1, 3), 2), ("llama", 8, (2, 5, 8), 1), ("qwen3", 5, (1,), 2)]
)
def test_sparse_levels_exact_with_long_acceptances(arch, K, levels, B, verify_on):
    """Only the blocks of ``levels`` are computed; after an acceptance that is not a level the next drafts
    come from the largest level below it (fewer drafts). Output stays HF greedy, the cache stays exact."""
    model = tiny_model(arch)
    V = model.config.vocab_size
    new = 3 * K * K
    torch.manual_seed(11)
    ids = torch.randint(1, V - 1, (B, 7))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new + 3 * K)
    tidar.patch(model, draft_len=K, proposal_levels=levels)
    handle = _oracle(model, ref, K)
    try:
        out = tidar.generate(model, ids, max_new_tokens=new, full_logits=True, context_drafts=False)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, ref[:, : 7 + new])
    full = [lv for k, lv in zip(out.draft_lens[1:], out.levels[1:]) if k == K]  # K shrinks near the end
    assert full and all(lv == levels for lv in full), out.levels
    assert max(out.accepted_histogram) >= 3, out.accepted_histogram  # long runs were accepted
    assert len(out.accepted_histogram) >= 3
    # the fast path (LM head on needed rows, context drafts on) gives the same tokens
    lean = tidar.generate(model, ids, max_new_tokens=new)
    assert torch.equal(lean.sequences, out.sequences)
    tidar.unpatch(model)
