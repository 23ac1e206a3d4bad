"""``TidarProposer.propose``'s last say over a step's drafts (pure: no engine; context drafts from a stand-in, no
[MASK] layout): drafts that cost more than they save are withheld, and all of them when together they do not pay
for the step's verification; withheld drafts are scored as shadows."""

from __future__ import annotations

from tidar.vllm.draft_source import VERIFY_COST, SourceEvidence, fixed_prices
from tidar.vllm.options import TidarOptions
from tidar.vllm.proposer import TidarProposer


def _proposer(batch, drafts, q=0.5, verify_cost=VERIFY_COST):
    """A proposer between steps, ``batch`` requests, each with the context drafts ``drafts`` found for it and
    context evidence at ``q``."""
    p = TidarProposer.__new__(TidarProposer)
    p.options = TidarOptions(context=2)
    p.K, p.prices = 8, fixed_prices()
    p.prices.verify_cost = verify_cost
    p.layout = p.hidden = None
    p.req_ids = [f"r{i}" for i in range(batch)]
    p.contexts = {}
    p.evidence = {}
    for rid in p.req_ids:
        ev = p.evidence[rid] = SourceEvidence(prices=p.prices)
        ev.accepted["context"], ev.checked["context"] = q * 10, 10.0
        ev.accepted["diffusion"], ev.checked["diffusion"] = 2.5, 10.0  # q = 0.25: a block would pay alone
    p._context_drafts = lambda r, n, t: list(drafts)
    return p


def _propose(p):
    return p.propose([[7] for _ in p.req_ids], num_tokens_no_spec=None, token_ids_cpu=None)


def test_a_request_alone_proposes_its_drafts():
    p = _proposer(1, [1, 2, 3, 4])
    out = _propose(p)
    assert out[0] and out[0] == [1, 2, 3, 4][: len(out[0])]
    assert p.evidence["r0"].last == ("context", len(out[0]))


def test_a_full_batch_of_weak_drafts_proposes_none_and_keeps_scoring_them():
    p = _proposer(8, [1, 2, 3, 4], q=0.27)
    gains = [p.evidence[r].expected_gain("context", 1, 8) for r in p.req_ids]
    assert 0 < sum(gains) < VERIFY_COST  # each draft would pay its row, not together the verification
    out = _propose(p)
    assert out == [[] for _ in range(8)]
    ev = p.evidence["r3"]
    assert ev.shadow and ev.last == ("context", 0)
    assert ev.prefers_context() and not ev.wants_block(8, 1)  # still drafting from the context: no block
    q = ev.q("context")
    ev.observe([ev.shadow[0], 5])  # the text went on with the withheld draft: evidence for the context
    assert ev.q("context") > q


def test_without_a_verification_price_the_same_batch_drafts():
    p = _proposer(8, [1, 2, 3, 4], q=0.27, verify_cost=0.0)
    out = _propose(p)
    assert all(o for o in out)
