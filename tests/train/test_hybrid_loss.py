"""The hybrid objective (docs/design.md §3.1): hand-computed twin, gradients, no leaks, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import tidar
from tidar.train.objective import hybrid_forward
from tidar.train.trainer import HybridLossMixin

V = 97
MASK = V - 1


def _patched(arch="qwen2", **kw):
    return tidar.patch(tiny_model(arch, vocab=V, **kw), draft_len=4)


def _dense_training_mask(L, K):
    """The training mask written out from the table in docs/design.md §3.1 (True = visible), [2L, 2L]."""
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(L):
        m[i, : i + 1] = True  # clean i: causal over the clean half, never a mask
        b = i // K
        m[L + i, : b * K] = True  # mask i: the clean tokens before its block ...
        m[L + i, L + b * K : L + min(L, (b + 1) * K)] = True  # ... and its own block
    return m


def _hand_loss(model, x, K, alpha, valid=None):
    """The same loss with an unpatched model, HF's own SDPA path and an explicit 4D mask."""
    B, L = x.shape
    ids = torch.cat([x, torch.full_like(x, MASK)], 1)
    pos = torch.arange(L).repeat(2)[None].expand(B, -1)
    mask = _dense_training_mask(L, K)[None, None].expand(B, 1, -1, -1)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits.float()
    ar_ce = F.cross_entropy(logits[:, : L - 1].reshape(-1, V), x[:, 1:].reshape(-1), reduction="none").view(B, L - 1)
    diff_ce = F.cross_entropy(logits[:, L:].reshape(-1, V), x.reshape(-1), reduction="none").view(B, L)
    if valid is None:
        ar, diff = ar_ce.mean(), diff_ce.mean()
    else:
        v = valid.float()
        ar = (ar_ce * v[:, 1:]).sum() / v[:, 1:].sum()
        diff = (diff_ce * v).sum() / v.sum()
    return (alpha * ar + diff) / (1 + alpha), ar, diff, logits


@pytest.mark.parametrize("L,K,alpha", [(8, 4, 1.0), (12, 3, 0.25), (8, 8, 2.0), (6, 1, 1.0)])
def test_equals_hand_computed(L, K, alpha):
    model = tiny_model("qwen2", vocab=V, seed=1)
    torch.manual_seed(2)
    x = torch.randint(0, V - 1, (2, L))
    want = _hand_loss(model, x, K, alpha)
    tidar.patch(model, draft_len=K)
    got = tidar.hybrid_loss(model, x, K, alpha=alpha)
    for g, w in zip(got, want[:3]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    logits = hybrid_forward(model, x, K)
    torch.testing.assert_close(logits, want[3], atol=1e-5, rtol=1e-5)


def test_padding_mask_excludes_positions():
    model = tiny_model("qwen2", vocab=V, seed=3)
    torch.manual_seed(4)
    x = torch.randint(0, V - 1, (2, 8))
    valid = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    want = _hand_loss(model, x, 4, 1.0, valid)
    tidar.patch(model, draft_len=4)
    got = tidar.hybrid_loss(model, x, 4, attention_mask=valid)
    for g, w in zip(got, want[:3]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_alpha_weights_the_terms():
    model = _patched()
    x = torch.randint(0, V - 1, (1, 8), generator=torch.Generator().manual_seed(0))
    r0 = tidar.hybrid_loss(model, x, 4, alpha=0.0)
    torch.testing.assert_close(r0.loss, r0.diffusion_loss)
    r3 = tidar.hybrid_loss(model, x, 4, alpha=3.0)
    torch.testing.assert_close(r3.loss, (3 * r3.ar_loss + r3.diffusion_loss) / 4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gradients_reach_every_parameter(arch):
    model = _patched(arch).train()
    x = torch.randint(0, V - 1, (2, 8), generator=torch.Generator().manual_seed(0))
    tidar.hybrid_loss(model, x, 4).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_each_term_has_gradients():
    """The diffusion term alone also reaches every parameter (the mask half uses the whole network)."""
    model = _patched()
    x = torch.randint(0, V - 1, (2, 8), generator=torch.Generator().manual_seed(0))
    tidar.hybrid_loss(model, x, 4, alpha=0.0).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_mask_half_never_leaks_into_clean_half():
    """Whatever sits in the mask half, the AR (clean-half) logits are bit-identical."""
    model = _patched()
    g = torch.Generator().manual_seed(5)
    L, K = 12, 4
    x = torch.randint(0, V - 1, (2, L), generator=g)
    base = hybrid_forward(model, x, K)
    other_mask = hybrid_forward(model, x, K, mask_token_id=7)  # a different token in every mask slot
    assert torch.equal(base[:, :L], other_mask[:, :L])
    assert not torch.allclose(base[:, L:], other_mask[:, L:])  # the mask half itself did change
    # arbitrary (non-constant) mask-half inputs, through the same forward as hybrid_forward
    from tidar_kernels import layouts

    lay = layouts.training(L, K)
    junk = torch.randint(0, V, (2, L), generator=g)
    pos = lay.position_ids[None].expand(2, -1)
    step = tidar.TidarStep(lay, torch.zeros(2, dtype=torch.int32), None, "reference")
    out = tidar.tidar_forward(model, torch.cat([x, junk], 1), pos, step).logits
    assert torch.equal(out[:, :L], base[:, :L])
    # and so the AR loss does not depend on the mask token
    assert torch.equal(tidar.hybrid_loss(model, x, K).ar_loss, tidar.hybrid_loss(model, x, K, mask_token_id=7).ar_loss)


@pytest.mark.parametrize("j", [0, 3, 4, 9, 11])
def test_blocks_never_see_their_own_or_later_tokens(j):
    """Changing x[j] leaves the diffusion logits of every block b with b*K <= j (blocks that must not see
    x[j]) and the AR logits before j unchanged, and does change the blocks that see it."""
    model = _patched()
    L, K = 12, 4
    x = torch.randint(0, V - 1, (1, L), generator=torch.Generator().manual_seed(6))
    y = x.clone()
    y[0, j] = (x[0, j] + 1) % (V - 1)
    a, b = hybrid_forward(model, x, K), hybrid_forward(model, y, K)
    blind = (j // K + 1) * K  # mask slots [0, blind) belong to blocks that cannot see x[j]
    assert torch.equal(a[:, L : L + blind], b[:, L : L + blind])
    assert torch.equal(a[:, :j], b[:, :j])
    if blind < L:
        assert not torch.allclose(a[:, L + blind :], b[:, L + blind :])
    assert not torch.allclose(a[:, j:L], b[:, j:L])


def test_trainer_compute_loss_is_the_hybrid_loss():
    model = _patched()
    x = torch.randint(0, V - 1, (2, 8), generator=torch.Generator().manual_seed(0))
    mixin = HybridLossMixin()
    mixin.tidar_block_size, mixin.tidar_alpha = 4, 0.5
    loss, extra = mixin.compute_loss(model, {"input_ids": x}, return_outputs=True)
    want = tidar.hybrid_loss(model, x, 4, alpha=0.5)
    torch.testing.assert_close(loss, want.loss)
    torch.testing.assert_close(extra["diffusion_loss"], want.diffusion_loss)
    mixin.tidar_diffusion_weighting = "acceptance"
    loss, extra = mixin.compute_loss(model, {"input_ids": x}, return_outputs=True)
    weighted = tidar.hybrid_loss(model, x, 4, alpha=0.5, diffusion_weighting="acceptance")
    torch.testing.assert_close(loss, weighted.loss)
    assert float(extra["diffusion_loss"]) < float(want.diffusion_loss.detach())  # weights <= 1, and not all 1
    mixin.tidar_alpha = None  # AR-only baseline
    from tidar.train.objective import ar_loss

    torch.testing.assert_close(mixin.compute_loss(model, {"input_ids": x}), want.ar_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ar_loss(model, x), want.ar_loss, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    model = _patched()
    x = torch.randint(0, V - 1, (2, 10))
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        tidar.hybrid_loss(model, x, 4)
    with pytest.raises(ValueError, match="block_size"):
        tidar.hybrid_loss(model, x[:, :8], 0)
    with pytest.raises(ValueError, match="alpha"):
        tidar.hybrid_loss(model, x[:, :8], 4, alpha=-1.0)
    with pytest.raises(ValueError, match="input_ids"):
        tidar.hybrid_loss(model, x[0, :8], 4)
    with pytest.raises(ValueError, match="vocabulary"):
        tidar.hybrid_loss(model, torch.full((1, 8), V), 4)
    with pytest.raises(ValueError, match="mask_token_id"):
        tidar.hybrid_loss(model, x[:, :8], 4, mask_token_id=V + 5)
    with pytest.raises(ValueError, match="right-padded"):
        tidar.hybrid_loss(model, x[:, :8], 4, attention_mask=torch.tensor([[0] + [1] * 7] * 2))
    with pytest.raises(ValueError, match="patch"):
        tidar.hybrid_loss(tiny_model(vocab=V), x[:, :8], 4)


def test_model_without_mask_token():
    model = tiny_model(vocab=V)
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token"):
        tidar.patch(model)
    # patched with an explicit id, then the config loses it: hybrid_loss still uses the patch's id
    tidar.patch(model, mask_token_id=MASK)
    tidar.hybrid_loss(model, torch.randint(0, V - 1, (1, 8)), 4)
    from tidar.patching import mask_token_id_of  # the one mask-token check (patch and hybrid_loss)

    bare = tiny_model(vocab=V)
    bare.config.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token"):
        mask_token_id_of(bare, None)
