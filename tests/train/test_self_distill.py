"""Self-distilled diffusion targets (docs/design.md §3.1): hand-computed targets, no gradient into the
targets, the AR term untouched, a few steps lower the loss, bad option values fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_hybrid_loss import MASK, V, _hand_loss
from test_train import _args, _train, tiny_corpus  # noqa: F401  (module fixture)

import tidar
from tidar.train import self_distill
from tidar.train.objective import acceptance_weights, ar_loss, hybrid_forward, hybrid_loss


def _x(B=2, L=8, seed=2):
    torch.manual_seed(seed)
    return torch.randint(0, V - 1, (B, L))


@pytest.mark.parametrize("target", ["ar-hard", "ar-soft"])
def test_teacher_forced_targets_equal_hand_computation(target):
    L, K = 8, 4
    model = tiny_model("qwen2", vocab=V, seed=1)
    x = _x(L=L)
    *_, logits = _hand_loss(model, x, K, 1.0)  # unpatched model, explicit dense training mask
    ar_logits, mask_logits = logits[:, :L], logits[:, L:]
    want_ar = F.cross_entropy(ar_logits[:, : L - 1].reshape(-1, V), x[:, 1:].reshape(-1))
    # mask slot i (i >= 1) learns the AR head's prediction at position i, i.e. the clean logits at i-1
    if target == "ar-hard":
        t = ar_logits[:, : L - 1].argmax(-1)
        want_diff = F.cross_entropy(mask_logits[:, 1:].reshape(-1, V), t.reshape(-1))
    else:
        p = ar_logits[:, : L - 1].softmax(-1)
        want_diff = -(p * mask_logits[:, 1:].log_softmax(-1)).sum(-1).mean()
    tidar.patch(model, draft_len=K)
    got = hybrid_loss(model, x, K, alpha=1.0, diffusion_target=target)
    torch.testing.assert_close(got.ar_loss, want_ar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.diffusion_loss, want_diff, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, (want_ar + want_diff) / 2, atol=1e-5, rtol=1e-5)


def test_greedy_continuation_equals_a_cache_free_argmax_loop():
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=3), draft_len=4)
    model.train()
    prompts = _x(B=3, L=5, seed=4)
    got = self_distill.continue_greedy(model, prompts, 7, batch_size=2)
    assert tidar.is_patched(model) and model.training  # restored
    assert not got.requires_grad and got.dtype == torch.long
    tidar.unpatch(model)
    model.eval()
    seq = prompts.clone()
    with torch.no_grad():
        for _ in range(7):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
    # sampled continuations are reproducible from the generator and differ from greedy
    s1 = self_distill.continue_greedy(model, prompts, 7, temperature=1.0, generator=torch.Generator().manual_seed(0))
    s2 = self_distill.continue_greedy(model, prompts, 7, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, got)


def test_greedy_target_loss_equals_hand_computation_and_keeps_the_ar_term():
    L, K, P = 8, 4, 3
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=5), draft_len=K)
    real = _x(B=3, L=L, seed=6)
    gen = self_distill.continue_greedy(model, _x(B=2, L=P, seed=7), L - P)
    for n_data in (0, 2):
        got = self_distill.self_distill_loss(model, real, gen, P, K, alpha=0.5, n_data=n_data)
        # AR term: the real rows' plain next-token loss, whatever the diffusion rows are
        torch.testing.assert_close(got.ar_loss, ar_loss(model, real), atol=1e-5, rtol=1e-5)
        # diffusion term by hand: mask logits of each row under the training mask, data rows all positions,
        # generated rows positions >= P
        tidar.unpatch(model)
        ces, counts = [], []
        for rows, first in ((real[:n_data], 0), (gen, P)):
            if len(rows):
                *_, logits = _hand_loss(model, rows, K, 1.0)
                ce = F.cross_entropy(logits[:, L:].reshape(-1, V), rows.reshape(-1), reduction="none").view(
                    len(rows), L
                )
                ces.append(ce[:, first:].sum())
                counts.append(len(rows) * (L - first))
        tidar.patch(model, draft_len=K)
        want = sum(ces) / sum(counts)
        torch.testing.assert_close(got.diffusion_loss, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.loss, (0.5 * got.ar_loss + want) / 1.5, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["data", "ar-hard", "ar-soft"])
def test_ar_term_unchanged_by_the_target(target):
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=8), draft_len=4)
    x = _x(L=8, seed=9)
    base = hybrid_loss(model, x, 4)
    got = hybrid_loss(model, x, 4, diffusion_target=target)
    torch.testing.assert_close(got.ar_loss, base.ar_loss, atol=0, rtol=0)
    # and its gradient is the same
    g = []
    for r in (base, got):
        model.zero_grad()
        hybrid_loss(model, x, 4, diffusion_target=target if r is got else "data").ar_loss.backward()
        g.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(g[0], g[1], atol=0, rtol=0)


@pytest.mark.parametrize("target", ["ar-hard", "ar-soft"])
def test_no_gradient_flows_into_the_teacher(target):
    """The diffusion term's gradient equals that of a CE toward targets computed beforehand as constants."""
    L, K = 8, 4
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=10), draft_len=K)
    x = _x(L=L, seed=11)
    model.zero_grad()
    hybrid_loss(model, x, K, diffusion_target=target).diffusion_loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        teacher = hybrid_forward(model, x, K)[:, : L - 1].float()
    model.zero_grad()
    student = hybrid_forward(model, x, K)[:, L + 1 :].float()
    if target == "ar-hard":
        loss = F.cross_entropy(student.reshape(-1, V), teacher.argmax(-1).reshape(-1))
    else:
        loss = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
    loss.backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_generation_builds_no_graph():
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=12), draft_len=4)
    gen = self_distill.continue_greedy(model, _x(B=2, L=3), 5)
    assert gen.grad_fn is None and all(p.grad is None for p in model.parameters())


# greedy targets on the tiny corpus (seq-len 32): short prompts, a refresh within the 30 steps
GREEDY = ("--diffusion-target", "greedy", "--distill-prompt-len", "8", "--distill-refresh", "10")


@pytest.mark.parametrize(
    "extra",
    [
        ("--diffusion-target", "ar-hard"),
        ("--diffusion-target", "ar-soft"),
        GREEDY,
        (*GREEDY, "--diffusion-weighting", "acceptance"),
        (*GREEDY, "--distill-ratio", "0.5"),
        (*GREEDY, "--distill-temperature", "1.0"),
    ],
)
def test_a_few_steps_reduce_the_loss(tiny_corpus, tmp_path, extra):  # noqa: F811
    state, out = _train(tmp_path, tiny_corpus, "--max-steps", "30", *extra)
    hist = state["log_history"]
    first = sum(h["loss"] for h in hist[:4]) / 4
    last = sum(h["loss"] for h in hist[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert extra[1] in (out / "config.json").read_text()  # the objective is recorded in the config


def test_greedy_resume_reproduces_the_loss_curve(tiny_corpus, tmp_path):  # noqa: F811
    opts = (
        "--max-steps",
        "8",
        "--diffusion-target",
        "greedy",
        "--distill-prompt-len",
        "8",
        "--distill-refresh",
        "3",
        "--distill-ratio",
        "0.5",
    )
    full, out = _train(tmp_path, tiny_corpus, *opts, "--save-every", "4", "--keep-checkpoints", "5", name="a")
    assert (out / "checkpoint-4" / "distill_pool.pt").is_file()
    resumed, _ = _train(tmp_path, tiny_corpus, *opts, "--resume", str(out / "checkpoint-4"), name="b")
    assert resumed["log_history"] == full["log_history"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (("--diffusion-target", "teacher"), "--diffusion-target must be one of data, ar-hard, ar-soft, greedy"),
        (("--diffusion-target", "greedy", "--distill-ratio", "1.5"), r"--distill-ratio must be a number in \[0, 1\]"),
        (("--diffusion-target", "greedy", "--distill-ratio", "-0.1"), r"--distill-ratio must be a number in \[0, 1\]"),
        (("--diffusion-target", "greedy", "--distill-refresh", "0"), "--distill-refresh must be an int >= 1"),
        (("--diffusion-target", "greedy", "--distill-prompt-len", "32"), "--distill-prompt-len must be in"),
        (("--no-diffusion", "--diffusion-target", "ar-hard"), "contradicts"),
        (
            (*GREEDY, "--distill-temperature", "-1"),
            "--distill-temperature must be a finite",
        ),
        (
            (*GREEDY, "--distill-rows", "100"),
            "--distill-rows 100 must be <= --batch-size",
        ),
        (
            (*GREEDY, "--distill-rows", "0"),
            "--distill-rows must be an int >= 1",
        ),
        (("--diffusion-target", "ar-soft", "--distill-temperature", "1"), "--distill-temperature only apply to"),
        (("--distill-ratio", "0.5", "--distill-rows", "2"), "--distill-rows, --distill-ratio only apply to"),
        (("--diffusion-weighting", "linear"), "--diffusion-weighting must be one of uniform, acceptance"),
        (("--no-diffusion", "--diffusion-weighting", "acceptance"), "contradicts"),
    ],
)
def test_bad_option_values(tiny_corpus, tmp_path, extra, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        _train(tmp_path, tiny_corpus, "--max-steps", "2", *extra)
    assert not (tmp_path / "run").exists()  # rejected before anything ran or was written


def test_acceptance_weights_equal_hand_computation():
    """Slot j of a block: the product of exp(-ce) over the block's earlier valid slots; first slot 1."""
    K = 4
    torch.manual_seed(13)
    ce = torch.rand(2, 8) * 3
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False  # a generated row's prompt: no loss, counts as sure
    want = torch.ones(2, 8)
    for b in range(2):
        for blk in range(2):
            for j in range(K):
                for i in range(j):
                    pos = blk * K + i
                    if valid[b, pos]:
                        want[b, blk * K + j] *= float(torch.exp(-ce[b, pos]))
    got = acceptance_weights(ce.requires_grad_(), valid, K)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got.grad_fn is None  # detached: the weights are constants of the step
    with pytest.raises(ValueError, match="multiple of block_size=3"):
        acceptance_weights(ce, valid, 3)
    with pytest.raises(ValueError, match="one shape"):
        acceptance_weights(ce, valid[:, :4], K)


def test_acceptance_weighted_loss_equals_hand_computation_and_keeps_the_ar_term():
    L, K, P = 8, 4, 3
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=14), draft_len=K)
    real = _x(B=3, L=L, seed=15)
    gen = self_distill.continue_greedy(model, _x(B=2, L=P, seed=16), L - P)
    uni = self_distill.self_distill_loss(model, real, gen, P, K, alpha=2.0, n_data=1)
    got = self_distill.self_distill_loss(model, real, gen, P, K, alpha=2.0, n_data=1, diffusion_weighting="acceptance")
    torch.testing.assert_close(got.ar_loss, uni.ar_loss, atol=0, rtol=0)
    tidar.unpatch(model)
    x = torch.cat([real[:1], gen])
    *_, logits = _hand_loss(model, x, K, 1.0)
    tidar.patch(model, draft_len=K)
    ce = F.cross_entropy(logits[:, L:].reshape(-1, V), x.reshape(-1), reduction="none").view(3, L)
    valid = torch.ones(3, L, dtype=torch.bool)
    valid[1:, :P] = False
    w = torch.ones(3, L)
    for r in range(3):
        for pos in range(L):
            for i in range(pos - pos % K, pos):
                if valid[r, i]:
                    w[r, pos] *= float(torch.exp(-ce[r, i].detach()))
    want = (ce * w)[valid].sum() / valid.sum()
    torch.testing.assert_close(got.diffusion_loss, want, atol=1e-5, rtol=1e-5)
    assert float(got.diffusion_loss.detach()) < float(uni.diffusion_loss.detach())  # weights <= 1, some < 1
    # the gradient of the weighted term treats the weights as constants
    model.zero_grad()
    got.diffusion_loss.backward()
    g_got = [p.grad.clone() for p in model.parameters()]
    tidar.unpatch(model)
    model.zero_grad()
    *_, logits = _hand_loss(model, x, K, 1.0)
    ce = F.cross_entropy(logits[:, L:].reshape(-1, V), x.reshape(-1), reduction="none").view(3, L)
    ((ce * w)[valid].sum() / valid.sum()).backward()
    for a, p in zip(g_got, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


class _FixedPool:
    """A continuation pool that always hands out the same generated rows."""

    def __init__(self, rows):
        self.rows = rows

    def maybe_refresh(self, model, step):
        return False

    def rows_at(self, step, n):
        return self.rows[:n]


@pytest.mark.parametrize("weighting", ["uniform", "acceptance"])
def test_tidar_train_step_loss_equals_self_distill_loss(weighting):
    """`tidar train`'s step loss (RunLoss, rows spread over the batch) is the library's self_distill_loss."""
    from tidar.train.trainer import RunLoss, spread

    L, K, P, B, n_data, n_gen = 8, 4, 3, 4, 1, 2
    model = tidar.patch(tiny_model("qwen2", vocab=V, seed=17), draft_len=K)
    real = _x(B=B, L=L, seed=18)
    gen = self_distill.continue_greedy(model, _x(B=n_gen, L=P, seed=19), L - P)
    run = RunLoss(
        seq_len=L,
        batch=B,
        block_size=K,
        alpha=1.5,
        no_diffusion=False,
        target="greedy",
        n_data=n_data,
        n_gen=n_gen,
        prompt_len=P,
        pool=_FixedPool(gen),
        weighting=weighting,
    )
    rows = torch.arange(B)
    got = run(model, {"input_ids": real, "row": rows}, 0)
    data_rows = spread(rows, n_data, B) >= 0  # the real rows that also carry the data-target diffusion term
    order = torch.cat([rows[data_rows], rows[~data_rows]])
    want = self_distill.self_distill_loss(
        model, real[order], gen, P, K, alpha=1.5, n_data=n_data, diffusion_weighting=weighting
    )
    torch.testing.assert_close(got, want.loss, atol=1e-5, rtol=1e-5)


def test_bad_hybrid_loss_weighting():
    model = tidar.patch(tiny_model("qwen2", vocab=V), draft_len=4)
    with pytest.raises(ValueError, match="diffusion_weighting must be one of uniform, acceptance"):
        hybrid_loss(model, _x(), 4, diffusion_weighting="position")


@pytest.mark.parametrize("target", ["data", "ar-soft", "greedy"])
def test_option_checks_can_run_twice(target):
    """check_args fills in defaults; a second check of the same options (a library caller) still passes."""
    from tidar.train.args import check_args

    args = _args("--diffusion-target", target)
    check_args(args)
    check_args(args)
    assert (args.distill_rows is None) == (target != "greedy")


def test_bad_hybrid_loss_target():
    model = tidar.patch(tiny_model("qwen2", vocab=V), draft_len=4)
    with pytest.raises(ValueError, match="diffusion_target must be one of data, ar-hard, ar-soft"):
        hybrid_loss(model, _x(), 4, diffusion_target="greedy")
    assert MASK == V - 1
