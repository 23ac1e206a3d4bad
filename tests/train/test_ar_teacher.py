"""The AR head anchored to a frozen teacher (``--ar-teacher``, issue 23): KL(teacher || model) by hand, zero when the
teacher is the model, the step loss of ``tidar train`` is the conversion's loss plus the weighted KL over the real and
the generated rows, a few steps on the term alone pull the model's distributions to the teacher's, a run logs it,
and bad options fail clearly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_hybrid_loss import V
from test_self_distill import _FixedPool, _x
from test_train import _args, _train, tiny_corpus  # noqa: F401  (module fixture)

import tidar
from tidar.train.objective import ar_loss_sums, hybrid_forward, hybrid_loss_sums, teacher_kl_sums


def _kl_by_hand(student_logits, teacher_logits, valid):
    """sum over counted positions i (valid[:, i + 1]) of sum_v p_t(v) (log p_t(v) - log p_s(v))."""
    total, n = 0.0, 0
    B, L, _ = student_logits.shape
    for b in range(B):
        for i in range(L - 1):
            if not valid[b, i + 1]:
                continue
            pt = F.softmax(teacher_logits[b, i].double(), -1)
            ps = F.softmax(student_logits[b, i].double(), -1)
            total += float((pt * (pt.log() - ps.log())).sum())
            n += 1
    return total, n


def test_teacher_kl_equals_hand_computation_and_is_zero_for_the_model_itself():
    L, K = 8, 4
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=3), draft_len=K)
    teacher = tiny_model("qwen2", vocab=V, seed=9)
    x = _x(B=2, L=L, seed=4)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[0, [0, 3, 5]] = False  # position 0 has no AR prediction; 3 and 5: their predictions at 2 and 4 skipped
    with torch.no_grad():
        t_logits = teacher(input_ids=x).logits.float()
        s_logits = hybrid_forward(model, x, K)[:, :L].float()
        sums = hybrid_loss_sums(model, x, K, teacher_logits=t_logits, teacher_valid=valid)
        plain = hybrid_loss_sums(model, x, K)
        self_kl = hybrid_loss_sums(model, x, K, teacher_logits=s_logits)
    want, n = _kl_by_hand(s_logits, t_logits, valid)
    assert len(sums) == 6 and float(sums[5]) == n == 2 * (L - 1) - 2
    assert float(sums[4]) == pytest.approx(want, rel=1e-4)
    assert want > 0.01  # two different random models disagree
    for a, b in zip(sums[:4], plain):  # the other terms are untouched
        torch.testing.assert_close(a, b)
    assert abs(float(self_kl[4])) < 1e-4  # the model as its own teacher: nothing to learn
    # after the unlikelihood pair when both are asked for
    marks = torch.zeros(2, L, dtype=torch.bool)
    with torch.no_grad():
        both = hybrid_loss_sums(model, x, K, unlikelihood_valid=marks, teacher_logits=t_logits, teacher_valid=valid)
    assert len(both) == 8 and float(both[6]) == pytest.approx(want, rel=1e-4)
    # the plain causal forward gives the same KL on the same positions
    with torch.no_grad():
        ar = ar_loss_sums(model, x, teacher_logits=t_logits)
    want_all, n_all = _kl_by_hand(s_logits, t_logits, torch.ones(2, L, dtype=torch.bool))
    assert len(ar) == 4 and float(ar[3]) == n_all and float(ar[2]) == pytest.approx(want_all, rel=1e-4)


def test_teacher_kl_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="teacher_logits must have the model's logits' shape"):
        teacher_kl_sums(torch.randn(2, 8, V), torch.randn(2, 8, V + 1))


def test_run_loss_adds_the_weighted_kl_of_the_real_and_generated_rows():
    from tidar.train.trainer import RunLoss

    L, K, P, B, n_gen, w = 8, 4, 3, 4, 2, 0.7
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=5), draft_len=K)
    teacher = tiny_model("qwen2", vocab=V, seed=11).eval()
    real = _x(B=B, L=L, seed=6)
    gen = _x(B=n_gen, L=L, seed=8)
    common = dict(
        seq_len=L, batch=B, block_size=K, alpha=1.5, no_diffusion=False, target="greedy", n_gen=n_gen, prompt_len=P
    )
    inputs = {"input_ids": real, "row": torch.arange(B)}
    base = RunLoss(**common, pool=_FixedPool(gen))(model, inputs, 0)
    run = RunLoss(**common, pool=_FixedPool(gen), teacher=teacher, teacher_weight=w)
    got = run(model, inputs, 0)
    with torch.no_grad():
        rows = torch.cat([real, gen])
        s_logits = model(input_ids=rows).logits.float()
        t_logits = teacher(input_ids=rows).logits.float()
    total, n = _kl_by_hand(s_logits, t_logits, torch.ones(B + n_gen, L, dtype=torch.bool))
    assert n == (B + n_gen) * (L - 1)
    torch.testing.assert_close(got, base + w * total / n, atol=1e-5, rtol=1e-5)
    loss, _, _ = run.step_means()
    assert run.last_teacher_kl == pytest.approx(total / n, rel=1e-4)
    assert loss == pytest.approx(float(got.detach()), abs=1e-5)
    with pytest.raises(ValueError, match="greedy runs only"):
        RunLoss(**{**common, "target": "data"}, pool=None, teacher=teacher, teacher_weight=w)


def test_kl_steps_pull_the_model_to_its_teacher():
    """Gradient steps on the KL term alone bring the model's AR distributions to the teacher's (the term pushes in
    the right direction and reaches the weights)."""
    L, K = 16, 4
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=7), draft_len=K)
    teacher = copy.deepcopy(tiny_model("qwen2", vocab=V, seed=13)).eval()
    x = _x(B=2, L=L, seed=2)
    with torch.no_grad():
        t_logits = teacher(input_ids=x).logits.float()

    def kl():
        with torch.no_grad():
            return float(hybrid_loss_sums(model, x, K, teacher_logits=t_logits)[4])

    before = kl()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        hybrid_loss_sums(model, x, K, teacher_logits=t_logits)[4].backward()
        opt.step()
    assert kl() < 0.5 * before


def test_a_run_with_a_teacher_logs_the_term(tiny_corpus, tmp_path):  # noqa: F811
    opts = ("--diffusion-target", "greedy", "--distill-prompt-len", "8", "--distill-refresh", "5")
    _, first = _train(tmp_path, tiny_corpus, "--max-steps", "4", *opts, name="first")
    state, out = _train(
        tmp_path,
        tiny_corpus,
        "--max-steps",
        "6",
        *opts,
        "--init-from",
        str(first),
        "--ar-teacher",
        str(first),
        name="anchored",
    )
    hist = state["log_history"]
    assert hist and all("teacher_kl" in h and h["teacher_kl"] >= 0 for h in hist)
    assert hist[0]["teacher_kl"] < 1e-3  # the first step's model is its teacher
    assert f"ar_teacher={first}" in (out / "config.json").read_text()


@pytest.mark.parametrize(
    "extra,match",
    [
        (("--ar-teacher", "."), "--ar-teacher only apply to --diffusion-target greedy"),
        (("--diffusion-target", "greedy", "--ar-teacher", "/no/such/folder"), "--ar-teacher must be a model folder"),
        (("--diffusion-target", "greedy", "--ar-teacher", "."), "is not a saved Hugging Face model: no config.json"),
        (
            ("--diffusion-target", "greedy", "--ar-teacher", ".", "--ar-teacher-weight", "0"),
            "--ar-teacher-weight must be a finite number > 0",
        ),
        (
            ("--diffusion-target", "greedy", "--ar-teacher", ".", "--ar-teacher-weight", "nan"),
            "--ar-teacher-weight must be a finite number > 0",
        ),
    ],
)
def test_bad_teacher_options(extra, match):
    from tidar.train.args import check_args

    with pytest.raises(ValueError, match=match):
        check_args(_args(*extra))
