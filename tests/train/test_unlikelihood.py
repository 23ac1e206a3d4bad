"""Sequence-level unlikelihood on the model's own continuations (``--unlikelihood``, issue 23): the repeat marks by
hand, the term by hand (-log(1 - p) at the marked tokens of the clean half), the step loss of ``tidar train`` is the
conversion's loss plus the weighted term, a few steps lower the probability the model gives its own repeats, and
bad options fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_hybrid_loss import V
from test_self_distill import _FixedPool, _x
from test_train import _args, _train, tiny_corpus  # noqa: F401  (module fixture)

import tidar
from tidar.train.objective import hybrid_forward, hybrid_loss_sums, repeat_positions


def test_repeat_positions_mark_every_token_of_a_repeated_ngram():
    x = torch.tensor([[5, 1, 2, 3, 1, 2, 3, 9, 1, 2]])
    # 2-grams: (1,2) repeats at 4-5 and 8-9, (2,3) at 5-6; nothing else repeats
    want = torch.zeros(1, 10, dtype=torch.bool)
    want[0, [4, 5, 6, 8, 9]] = True
    assert torch.equal(repeat_positions(x, 2), want)
    # start masks the prompt, even when a repeated n-gram straddles it
    want[0, :5] = False
    assert torch.equal(repeat_positions(x, 2, start=5), want)
    # a loop: everything after its first period (and the n-1 tokens before the first repeat) is marked
    loop = torch.tensor([[7, 8, 9] * 4])
    assert repeat_positions(loop, 4).tolist() == [[False] * 3 + [True] * 9]
    # no repeat, nothing marked; rows are independent
    both = torch.stack([torch.arange(12), loop[0]])
    assert not repeat_positions(both, 4)[0].any() and repeat_positions(both, 4)[1].any()


@pytest.mark.parametrize("bad,match", [((torch.zeros(3),), "must be a tensor"), ((torch.zeros(2, 3), 0), "n must")])
def test_repeat_positions_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        repeat_positions(*bad)


def test_unlikelihood_sum_equals_hand_computation():
    L, K = 8, 4
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=3), draft_len=K)
    x = _x(B=2, L=L, seed=4)
    marks = torch.zeros(2, L, dtype=torch.bool)
    marks[0, [0, 3, 5]] = True  # position 0 has no AR prediction: never counted
    marks[1, 7] = True
    with torch.no_grad():
        sums = hybrid_loss_sums(model, x, K, unlikelihood_valid=marks)
        plain = hybrid_loss_sums(model, x, K)
        logits = hybrid_forward(model, x, K)[:, :L].float()
    p = logits[:, :-1].softmax(-1).gather(-1, x[:, 1:, None])[..., 0]  # p(x[i] | x[:i]) at i = 1..L-1
    m = marks[:, 1:]
    want = -torch.log1p(-p[m]).sum()
    assert len(sums) == 6 and float(sums[5]) == 3.0
    torch.testing.assert_close(sums[4], want, atol=1e-5, rtol=1e-5)
    for a, b in zip(sums[:4], plain):  # the other terms are untouched
        torch.testing.assert_close(a, b)


def test_run_loss_adds_the_weighted_unlikelihood_of_the_generated_rows():
    from tidar.train.trainer import RunLoss

    L, K, P, B, n_gen, w = 8, 4, 3, 4, 2, 0.7
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=5), draft_len=K)
    real = _x(B=B, L=L, seed=6)
    gen = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]])  # row 0 repeats a 4-gram after P
    common = dict(
        seq_len=L, batch=B, block_size=K, alpha=1.5, no_diffusion=False, target="greedy", n_gen=n_gen, prompt_len=P
    )
    inputs = {"input_ids": real, "row": torch.arange(B)}
    base = RunLoss(**common, pool=_FixedPool(gen))(model, inputs, 0)
    run = RunLoss(**common, pool=_FixedPool(gen), unlikelihood=w, unlikelihood_ngram=4)
    got = run(model, inputs, 0)
    with torch.no_grad():
        logits = hybrid_forward(model, gen, K)[:, :L].float()
    p = F.softmax(logits[0, :-1], -1).gather(-1, gen[0, 1:, None])[:, 0]
    # the repeated 4-gram (1,2,3,4) covers positions 4..7, all after the prompt
    want_ul = -torch.log1p(-p[3:]).sum() / (n_gen * (L - P))
    torch.testing.assert_close(got, base + w * want_ul, atol=1e-5, rtol=1e-5)
    loss, _, _ = run.step_means()
    torch.testing.assert_close(run.last_unlikelihood, float(want_ul), atol=1e-5, rtol=1e-5)
    assert loss == pytest.approx(float(got.detach()), abs=1e-5)


def test_unlikelihood_steps_lower_the_models_own_repeats():
    """Gradient steps on the unlikelihood term alone lower the probability the AR head gives to the marked tokens
    of a loop (the term pushes in the right direction and reaches the weights)."""
    L, K, P = 16, 4, 4
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=7), draft_len=K)
    gen = torch.tensor([[3, 4, 5, 6] * 4, [7, 8] * 8])
    marks = repeat_positions(gen, 2, start=P)
    assert marks.sum() == 2 * (L - P)

    def repeated_nll():
        with torch.no_grad():
            return float(hybrid_loss_sums(model, gen, K, unlikelihood_valid=marks)[4])

    before = repeated_nll()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        hybrid_loss_sums(model, gen, K, unlikelihood_valid=marks)[4].backward()
        opt.step()
    assert repeated_nll() < 0.5 * before


def test_a_run_with_unlikelihood_logs_the_term(tiny_corpus, tmp_path):  # noqa: F811
    opts = ("--diffusion-target", "greedy", "--distill-prompt-len", "8", "--distill-refresh", "5")
    state, out = _train(tmp_path, tiny_corpus, "--max-steps", "10", *opts, "--unlikelihood", "1.0")
    hist = state["log_history"]
    assert all("unlikelihood_loss" in h and h["unlikelihood_loss"] >= 0 for h in hist)
    assert "unlikelihood=1.0" in (out / "config.json").read_text()


@pytest.mark.parametrize(
    "extra,match",
    [
        (("--unlikelihood", "1.0"), "--unlikelihood only apply to --diffusion-target greedy"),
        (("--diffusion-target", "greedy", "--unlikelihood", "-1"), "--unlikelihood must be a finite number >= 0"),
        (("--diffusion-target", "greedy", "--unlikelihood", "nan"), "--unlikelihood must be a finite number >= 0"),
        (
            ("--diffusion-target", "greedy", "--unlikelihood", "1", "--unlikelihood-ngram", "0"),
            "--unlikelihood-ngram must be >= 1",
        ),
        (
            ("--diffusion-target", "greedy", "--unlikelihood", "1", "--distill-ratio", "0"),
            "--unlikelihood needs generated rows",
        ),
    ],
)
def test_bad_unlikelihood_options(extra, match):
    from tidar.train.args import check_args

    with pytest.raises(ValueError, match=match):
        check_args(_args(*extra))
