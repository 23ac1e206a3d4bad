"""TiDAR generation (docs/design.md §3-4): one forward per step drafts the next tokens and verifies the drafts.

Exact: with beta = 1, greedy output equals the model's AR greedy output token for token, and sampling has the
AR distribution (speculative sampling; any drafts are valid proposals). The loop is prefill, then steps:

- each step runs the decoder body on K drafts + one block of K masks per proposal level, applies the LM head
  to the K draft rows, decides the acceptance (greedy: argmax compare; sampling: ``rejection_sample``), then
  the LM head on the K rows of the one proposal block the next drafts come from (``lm_head``);
- the only host synchronisation of a step reads the accepted counts and the candidate next drafts;
- the next drafts of a row come from the diffusion block or from the context (n-gram match), whichever is
  expected to be accepted more; ``draft_len="auto"`` re-chooses K and the levels as generation goes on
  (``planner``), from the measured token-slot curve (``slot_timing``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import tidar_kernels
from tidar.decode.args import check_draft_len, check_generate_args, check_levels
from tidar.decode.context_drafts import NgramIndex
from tidar.decode.drafts import compose_drafts, virtual_blocks
from tidar.decode.planner import MAX_K, Plan, Planner, levels_upto, new_row_stats, new_stats
from tidar.decode.slot_timing import slot_curve
from tidar.hf.attention import TidarStep, tidar_forward, tidar_hidden
from tidar.hf.cache import TidarCache
from tidar.hf.lm_head import output_head
from tidar.settings import settings
from tidar_kernels import layouts


@dataclass
class TidarGenerateOutput:
    sequences: torch.Tensor  # [B, P + new]: the prompt as given (left padding kept), then the new tokens
    forwards: int  # model forwards run (prefill included)
    tokens_per_forward: float  # new tokens / forwards, per row, averaged over rows
    accepted_histogram: dict = field(default_factory=dict)  # a (1..K) -> number of (row, step) pairs
    new_tokens: list = field(default_factory=list)  # per row: the generated token ids (no padding)
    cache: TidarCache | None = None  # per row, the committed K/V: a prefix of (prompt + new tokens)
    draft_lens: list = field(default_factory=list)  # K of every decode step (the prefill's block first)
    levels: list = field(default_factory=list)  # the proposal levels of every decode step
    draft_sources: dict = field(default_factory=dict)  # "diffusion" / "context" / "none" -> (row, step) pairs
    draft_events: list = field(default_factory=list)  # (source, drafts verified, drafts accepted) per (row, step)


# A greedy step needs the LM head on 2K of its K(1 + |levels|) rows, in two calls (the second depends on the
# first's acceptance). A call's fixed cost (reading the head's weight) dominates for few rows, so a step of at most
# this many tokens takes the head on all its rows in one call instead (2-core CPU, bundled model: 6 rows in one
# call 0.17 ms vs 2 x 0.16 ms; 20 rows 0.32 ms vs 2 x 0.18 ms). On a GPU a call of a few hundred rows costs what
# a call of one does.
ONE_HEAD_CALL_ROWS = {"cpu": 24, "cuda": 128}
# Devices whose greedy acceptance is decided on the host (reading them costs no synchronisation); elsewhere the
# step stays on the device (``device_step``: one host sync per step, CUDA-graph capturable).
HOST_VERIFY = {"cpu"}


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``argmax(-1)`` (the first maximal index, NaN counted as maximal, as both document) via ``max``: half
    the time of ``argmax`` on a CPU (0.06 vs 0.14 ms over 20 x 4096 logits)."""
    return logits.max(-1).indices


def _ms_per_forward(model, ids, **kw) -> float:
    """Fastest of 3 runs of ``generate``, in ms per forward."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = generate(model, ids, context_drafts=False, eos_token_id=[], **kw)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        best = min(best, (time.perf_counter() - t0) * 1e3 / max(1, out.forwards))
    return best


def _host_calibrated(model):
    """The model's slot curve with what the forward leaves out measured (once per curve), by timing this loop:
    the host work of a greedy step (plain AR steps at batch 1 and 4, less the curve's forward and LM head) and
    the extra cost of a sampled step: a plain AR one (K = 1), and rejection sampling with drafts, fixed and per row
    (K = 2 and 4 with all proposal blocks: 6 and 20 rows), at batch 1."""
    curve = slot_curve(model)
    if curve.host_measured:
        return curve
    curve.host_measured = True  # before the runs below, which plan with a fixed K and do not come back here
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (4, 16), generator=gen).to(device)
    new = 17
    host = {}
    for B in (1, 4):
        ms = _ms_per_forward(model, ids[:B], max_new_tokens=new, draft_len=1)
        host[B] = max(0.0, ms - curve.batch_step(B, 1, 1, 1))
    curve.host_ms_row = (host[4] - host[1]) / 3 if host[4] > host[1] else 0.0
    curve.host_ms_step = max(0.0, host[1] - curve.host_ms_row)
    extra = {}
    for K in (1, 2, 4):
        ms = _ms_per_forward(model, ids[:1], max_new_tokens=new, draft_len=K, temperature=1.0, seed=0)
        S = K * (1 + (K if K > 1 else 0))
        extra[K] = max(0.0, ms - curve.batch_step(1, S, S, 1))
    curve.sample_ms_ar = extra[1]
    curve.sample_ms_row = (extra[4] - extra[2]) / 14 if extra[4] > extra[2] else 0.0  # 20 rows at K = 4, 6 at K = 2
    curve.sample_ms_step = max(0.0, extra[2] - 6 * curve.sample_ms_row)
    return curve


class _Decoder:
    """The decoding state of one ``generate`` call, kept on the device; the host keeps token lists."""

    verifier = None  # an hf_processors.HfVerifier: HF's logits processors inside the acceptance
    pos_offset = None  # [B] long, set by the verifier: added to the positions of every token after the prompt

    def __init__(self, model, g, K, levels, backend, sample_kw, seed, context, full_logits):
        self.model, self.g, self.backend, self.sample_kw, self.seed = model, g, backend, sample_kw, seed
        s = settings(model)
        self.mask_id = s.mask_token_id
        self.device = g.device
        self.greedy = g.temperature == 0.0 and g.beta == 1.0  # the lean path: argmax rows only
        self.head = output_head(model)
        self.full_logits = full_logits
        self.B = len(g.prompts)
        self.max_pos = g.max_len  # positions a row may reach (max_position_embeddings, the sliding window)
        self.window = getattr(s, "window", None)  # keys a forward may attend to (the attention refuses more)
        # Every call starts from the priors: the statistics pick the draft sources and K, so a request's speed (and,
        # sampling, its tokens for a given seed) never depends on what ran before. The request's pooled evidence
        # scores the steady-state plans; each row's own evidence picks its source and its share of K.
        self.stats = new_stats()
        self.row_stats = new_row_stats(self.B)
        self.match_lens = [0] * self.B  # per row: the length of the current context match
        auto = K == "auto"
        self.planner = (
            Planner(_host_calibrated(model), self.stats, levels=levels, batch=self.B, sampling=not self.greedy)
            if auto
            else None
        )
        self.fixed = None if auto else (K, levels)
        self.max_k = MAX_K if auto else K
        self.out: list[list[int]] = [[] for _ in range(self.B)]
        self.done = [False] * self.B
        self.ngrams = [NgramIndex(p) for p in g.prompts] if context else None
        self.hist: Counter = Counter()
        self.sources: Counter = Counter()
        self.events: list = []
        self.draft_lens: list[int] = []
        self.level_log: list[tuple] = []
        self.forwards = 0
        self.row_forwards = [0] * self.B
        self._tables: dict = {}  # per plan / K: small index tensors kept on the device

    # ------------------------------------------------------------------ planning
    def _k_limit(self, lengths) -> int:
        """The largest K the remaining tokens and the position range allow (full levels assumed)."""
        rem = max((self.g.max_new_tokens - len(o) for o, d in zip(self.out, self.done) if not d), default=1)
        k = min(self.max_k, max(1, rem))
        if self.max_pos is not None:
            room = self.max_pos - max(lengths)  # positions m .. max_pos - 1 are free
            k = min(k, max(1, (room + 1) // 2))
        return k

    def _fits(self, plan: Plan, lengths) -> bool:
        m = max(lengths)
        if self.window is not None and m + plan.seg_len > self.window:
            return False
        return self.max_pos is None or m + plan.max_offset() <= max(self.max_pos - 1, m)

    def _fixed_plan(self, k_limit: int) -> Plan:
        K, levels = self.fixed
        K = min(K, k_limit)
        return Plan(K, levels_upto(K, levels))

    def _plan(self, rows, lengths) -> Plan:
        k_limit = self._k_limit(lengths)
        plan = self._fixed_plan(k_limit) if self.planner is None else self.planner.choose(rows, k_limit)
        while not self._fits(plan, lengths) and plan.draft_len > 1:  # near max_position_embeddings: shrink
            K = plan.draft_len - 1
            plan = Plan(K, tuple(j for j in plan.levels if j <= K) if K > 1 else ())
        if not self._fits(plan, lengths):
            plan = Plan(1, ())
        return plan

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids, pos, layout, seg_start, cache):
        """Hidden states (or full logits) of one forward; counts it."""
        step = TidarStep(layout, seg_start, cache, self.backend)
        if self.full_logits:
            return tidar_forward(self.model, ids, pos, step).logits
        return tidar_hidden(self.model, ids, pos, step)

    def _rows(self, h, index):
        """Logits of the rows ``index`` (``[B, R]`` or a slice) of a forward's output ``h``."""
        sel = (
            h[:, index]
            if not isinstance(index, torch.Tensor)
            else h.gather(1, index[:, :, None].expand(-1, -1, h.shape[-1]))
        )
        return sel if self.full_logits else self.head(sel)

    def _check_head(self, prompt):
        """Once per model: body + LM head must equal the model's own forward (else use full logits)."""
        if self.full_logits or self.head.verified is not None:
            if self.head.verified is False:
                self.full_logits = True
            return
        n = min(len(prompt), 16)
        ids = torch.tensor([prompt[:n]], device=self.device)
        lay = layouts.causal(n).to(self.device)
        seg = torch.zeros(1, dtype=torch.int32, device=self.device)
        pos = lay.position_ids[None]
        hidden = tidar_hidden(self.model, ids, pos, TidarStep(lay, seg, None, self.backend))
        logits = tidar_forward(self.model, ids, pos, TidarStep(lay, seg, None, self.backend)).logits
        if not self.head.verify(hidden, logits):
            self.full_logits = True

    # ------------------------------------------------------------------ prefill
    def prefill(self, cache, K):
        """Prompt (causal) + one block of K masks; returns the first drafts [B, K] (device) and their q."""
        prompts = self.g.prompts
        lengths = list(map(len, prompts))
        if len(set(lengths)) == 1:
            ar, blocks = self._prefill_even(cache, K, lengths[0])
        else:
            ar, blocks = self._prefill_ragged(cache, K, lengths)
        if self.verifier is not None:  # HF's logits processors (hf_processors.HfVerifier)
            r = self.verifier.prefill(self, ar, blocks)
        else:
            r = tidar_kernels.draft_sample(ar, blocks, **self.sample_kw)
        cache.commit(lengths)
        self.row_forwards = [1] * self.B
        return r.next_drafts, r.next_draft_probs

    def _prefill_even(self, cache, K, n):
        """Prompts of one length: one forward of prompt + K masks (``layouts.prefill``)."""
        layout = layouts.prefill(n, K).to(self.device)
        ids = torch.tensor([p + [self.mask_id] * K for p in self.g.prompts], dtype=torch.long, device=self.device)
        pos = layout.position_ids[None].expand(self.B, -1)
        seg_start = torch.zeros(self.B, dtype=torch.int32, device=self.device)
        h = self._forward(ids, pos, layout, seg_start, cache)
        self.forwards += 1
        logits = self._rows(h, slice(n - 1, n + K))
        return logits[:, 0], logits[:, 1:]

    def _prefill_ragged(self, cache, K, lengths):
        """Prompts of different lengths: two batched forwards instead of one per row. The prompts right-padded to
        the longest (causal attention: the padding after a row's prompt changes nothing before it; its keys are
        scratch past the row's committed length), then each row's block of K masks at its own seg_start
        (``layouts.mask_block``: it sees the prompt and itself, as the masks of ``layouts.prefill`` do)."""
        P = max(lengths)
        layout = layouts.causal(P).to(self.device)
        ids = torch.tensor([p + [p[-1]] * (P - len(p)) for p in self.g.prompts], dtype=torch.long, device=self.device)
        zeros = torch.zeros(self.B, dtype=torch.int32, device=self.device)
        h = self._forward(ids, layout.position_ids[None].expand(self.B, -1), layout, zeros, cache)
        last = torch.tensor(lengths, device=self.device)[:, None] - 1
        ar = self._rows(h, last)[:, 0]
        seg_start = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        block = layouts.mask_block(K).to(self.device)
        ids = torch.full((self.B, K), self.mask_id, dtype=torch.long, device=self.device)
        h = self._forward(ids, seg_start.long()[:, None] + block.position_ids[None], block, seg_start, cache)
        self.forwards += 2
        return ar, self._rows(h, slice(0, K))

    # ------------------------------------------------------------------ one step
    def step(self, cache, plan: Plan, drafts: torch.Tensor, probs):
        """Run one decode step. Returns per row: accepted a, the correction/bonus token, the diffusion drafts
        for the next step (and their q rows when sampling)."""
        cache.check_room(plan.seg_len)
        seg_start = cache.seq_lengths(self.device)
        if self.verifier is not None:  # HF's logits processors decide the acceptance (hf_processors.HfVerifier)
            return self.verifier.verify(self, self._body(cache, plan, drafts, seg_start), plan, drafts, probs)
        if self.greedy and self.device.type in HOST_VERIFY:
            return self._greedy_host(cache, plan, drafts, seg_start)
        if self.greedy:
            packed = self.device_step(cache, plan, drafts, seg_start)
            return self._greedy_rows(packed.tolist(), plan)  # the step's one host synchronisation
        h = self._body(cache, plan, drafts, seg_start)
        return self._sampled_verify(h, plan, drafts, probs)

    def _body(self, cache, plan: Plan, drafts, seg_start):
        B, K, lv = self.B, plan.draft_len, plan.levels
        layout = layouts.decode_step(K, lv).to(self.device)
        ids = (
            drafts
            if not lv
            else torch.cat(
                [drafts, torch.full((B, K * len(lv)), self.mask_id, dtype=drafts.dtype, device=self.device)], 1
            )
        )
        pos = seg_start.long()[:, None] + layout.position_ids[None]
        if self.pos_offset is not None:  # rows whose new tokens HF places elsewhere (hf_processors: right padding)
            pos = pos + self.pos_offset[:, None]
        self.forwards += 1
        return self._forward(ids, pos, layout, seg_start, cache)

    def device_step(self, cache, plan: Plan, drafts, seg_start) -> torch.Tensor:
        """The greedy step on the device, with no host synchronisation (CUDA-graph capturable given static
        ``drafts``/``seg_start`` buffers): ``[B, 2 + K]`` = accepted a, the correction/bonus token, then the
        K slots of the proposal block the next drafts come from (absent without levels)."""
        B, K, lv = self.B, plan.draft_len, plan.levels
        h = self._body(cache, plan, drafts, seg_start)
        one_call = self._one_head_call(plan)
        top = _argmax(self._rows(h, slice(0, plan.seg_len))) if one_call else None  # [B, S]
        tgt = top[:, :K] if one_call else _argmax(self._rows(h, slice(0, K)))  # [B, K]: AR argmax after d_0..d_i
        if K > 1:
            a = 1 + (drafts[:, 1:] == tgt[:, :-1]).int().cumprod(1).sum(1)
        else:
            a = torch.ones(B, dtype=torch.long, device=self.device)
        parts = [a[:, None], tgt.gather(1, (a - 1)[:, None])]
        if lv:
            bi = self._jstar_table(plan)[a].clamp_min(0)  # [B]: index of block j* among the levels
            rows = K + bi[:, None] * K + self._arange(K)[None]
            parts.append(top.gather(1, rows) if one_call else _argmax(self._rows(h, rows)))  # block j*'s slots
        return torch.cat(parts, 1)

    def _greedy_host(self, cache, plan: Plan, drafts, seg_start):
        """The greedy step where the device is the host (a CPU): the same result as ``device_step`` +
        ``_greedy_rows``, with the acceptance decided on Python ints, since reading a CPU tensor costs no
        synchronisation and a dozen small tensor ops cost more than the loop (about 0.1 ms a step)."""
        K, lv = plan.draft_len, plan.levels
        h = self._body(cache, plan, drafts, seg_start)
        one_call = self._one_head_call(plan)
        top = _argmax(self._rows(h, slice(0, plan.seg_len if one_call else K))).tolist()  # [B][S or K]
        host = drafts.tolist()
        acc = []
        for d, t in zip(host, top):
            a = 1  # d_0 is always kept; d_i is accepted while it equals the AR argmax after d_0..d_{i-1}
            while a < K and d[a] == t[a - 1]:
                a += 1
            acc.append(a)
        starts = [K + max(plan.block_index[a], 0) * K for a in acc]  # the row of block j*'s first slot
        if lv and not one_call:  # second call: the K rows of the block each row's next drafts come from
            rows = [list(range(r, r + K)) for r in starts]
            slots = _argmax(self._rows(h, torch.tensor(rows, device=h.device))).tolist()
        else:
            slots = [t[r : r + K] for r, t in zip(starts, top)]
        res = []
        for a, t, sl in zip(acc, top, slots):
            n = plan.next_diffusion_drafts(a)
            res.append((a, t[a - 1], sl[K - n :] if n else [], None))
        return res

    def _one_head_call(self, plan: Plan) -> bool:
        """Whether a greedy step takes the LM head on all its rows in one call (see ONE_HEAD_CALL_ROWS)."""
        return bool(plan.levels) and plan.seg_len <= ONE_HEAD_CALL_ROWS.get(self.device.type, 0)

    def _jstar_table(self, plan: Plan) -> torch.Tensor:
        t = self._tables.get(plan)
        if t is None:
            t = self._tables[plan] = torch.tensor(plan.block_index, device=self.device)
        return t

    def _arange(self, K: int) -> torch.Tensor:
        t = self._tables.get(K)
        if t is None:
            t = self._tables[K] = torch.arange(K, device=self.device)
        return t

    def _greedy_rows(self, host, plan):
        res = []
        for row in host:  # [a, correction, block j*'s K slots]: the next drafts are its last n slots
            n = plan.next_diffusion_drafts(row[0])
            res.append((row[0], row[1], row[len(row) - n :] if n else [], None))
        return res

    def _sampled_verify(self, h, plan, drafts, probs):
        B, K = self.B, plan.draft_len
        if K == 1 and self.g.beta == 1.0:  # a plain AR step: sample the one row (no drafts, no blocks to verify)
            return self._sampled_ar(h)
        logits = self._rows(h, slice(0, h.shape[1]))
        V = logits.shape[-1]
        blocks = virtual_blocks(logits[:, K:], plan, V)
        if self.seed is not None:  # Philox: every step draws fresh counters
            self.sample_kw["offset"] += B * 2 * K
        r = tidar_kernels.rejection_sample(logits[:, :K], blocks, drafts, probs if K > 1 else None, **self.sample_kw)
        host = torch.cat([r.accepted[:, None], r.next_drafts], 1).tolist()
        res = []
        for b, row in enumerate(host):
            a_ = row[0]
            n = plan.next_diffusion_drafts(a_)
            q = r.next_draft_probs[b, :n] if n > 0 and r.next_draft_probs is not None else None
            res.append((a_, row[1], row[2 : 2 + n], q))
        return res

    def _sampled_ar(self, h):
        """A sampled K = 1 step: the token from the AR row's processed distribution (``draft_sample`` with the row
        as its own one-slot block, which beta = 1 never reads), the same distribution ``rejection_sample`` draws
        at K = 1 without building the filler proposal blocks."""
        logits = self._rows(h, slice(0, 1))
        if self.seed is not None:  # Philox: the counters a K = 1 rejection step would use
            self.sample_kw["offset"] += self.B * 2
        r = tidar_kernels.draft_sample(logits[:, 0], logits, **self.sample_kw)
        return [(1, t, [], None) for t in r.next_drafts[:, 0].tolist()]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    draft_len: int | str | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beta: float = 1.0,
    eos_token_id=None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    backend: str | None = None,
    seed: int | None = None,
    proposal_levels=None,
    context_drafts: bool | None = None,
    full_logits: bool = False,
    verifier=None,
) -> TidarGenerateOutput:
    """Decode with TiDAR. ``model`` must be patched (``tidar.patch``).

    Args:
        input_ids / attention_mask: ``[B, P]`` prompts, left-padded as for HF ``generate``.
        max_new_tokens: new tokens per row (fewer when the row emits ``eos_token_id``).
        draft_len: K, or ``"auto"``: chosen per step from the measured token-slot curve and the running
            acceptance (default: the patch's). Near the end of ``max_new_tokens`` or of the model's
            ``max_position_embeddings`` the step uses a smaller K.
        proposal_levels: the acceptance counts that get a proposal block (a subset of 1..K; default: the
            patch's, else all, the paper's layout). Fewer blocks make a step cheaper; after an acceptance that
            is not a level the next step has fewer drafts. Output stays exact.
        context_drafts: fill a row's draft slots from an n-gram match in its text when that is expected to be
            accepted more than the diffusion drafts (default: the patch's, True). Exact either way.
        temperature 0 = greedy. top_k, top_p: sampling filters, applied to targets and drafts alike.
        beta: 1.0 (default) is exact; < 1 mixes the diffusion logits into the target ("trust diffusion"),
            which is faster to accept but no longer the AR distribution.
        eos_token_id: an int or a list; a row stops after emitting one. pad_token_id fills finished rows.
        generator: torch.Generator for sampling (reproducible); streamer: an HF streamer (batch 1).
        seed: instead of ``generator``, Philox4x32-10 counter-based sampling (the same tokens on every backend
            and device): the prefill uses offset 0 and each step advances the offset by B * 2K. Sampling calls
            start from the prior acceptance statistics, so a generator/seed reproduces its tokens; with
            ``draft_len="auto"`` the K sequence also follows the measured slot curve (fixed within a process).
        full_logits: apply the LM head to every row of each step (slower; for forward hooks that edit logits).
        verifier: an ``hf_processors.HfVerifier`` deciding the acceptance with HF's logits processors (the drop-in
            ``model.generate`` passes one when processors or score outputs are requested).
    """
    s = settings(model)
    K = check_draft_len(s.draft_len if draft_len is None else draft_len)
    levels = check_levels(s.proposal_levels if proposal_levels is None else proposal_levels, K)
    context = s.context_drafts if context_drafts is None else context_drafts
    if not isinstance(context, bool):
        raise ValueError(f"context_drafts must be True or False, got {context!r}")
    if not isinstance(full_logits, bool):
        raise ValueError(f"full_logits must be True or False, got {full_logits!r}")
    backend = s.backend if backend is None else backend
    if backend not in ("auto", "reference", "triton", "cuda"):
        raise ValueError(f"backend must be one of auto, reference, triton, cuda; got {backend!r}")
    g = check_generate_args(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        beta,
        eos_token_id,
        pad_token_id,
        generator,
        seed,
        streamer,
        draft_len=K,
    )
    sample_kw = dict(
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, beta=g.beta, generator=generator, backend=backend
    )
    if seed is not None:
        del sample_kw["generator"]
        sample_kw.update(seed=seed, offset=0)
    dec = _Decoder(model, g, K, levels, backend, sample_kw, seed, context, full_logits)
    dec.verifier = verifier
    B, device, V = dec.B, g.device, g.vocab
    dec._check_head(g.prompts[0])

    max_prompt = max(map(len, g.prompts))
    max_k = dec.max_k
    cache = TidarCache(B, max_prompt + g.max_new_tokens + max_k * (max_k + 1), backend=backend)
    first = (
        dec._plan([(MAX_K, 0)] * B, list(map(len, g.prompts)))
        if dec.planner is None
        else dec.planner.first(dec._k_limit(list(map(len, g.prompts))))
    )
    K0 = first.draft_len if dec.planner is None else (max(2, first.draft_len) if g.max_new_tokens > 1 else 1)
    drafts, probs = dec.prefill(cache, K0)
    out, done, eos = dec.out, dec.done, g.eos

    def emit(b, tokens):
        n = 0
        for t in tokens:
            out[b].append(t)
            n += 1
            if t in eos or len(out[b]) >= g.max_new_tokens:
                done[b] = True
                break
        if dec.ngrams is not None:
            dec.ngrams[b].extend(tokens[:n])
        return n

    host = drafts.tolist()
    for b in range(B):
        emit(b, [host[b][0]])
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(out[0]))
    # Per row: the diffusion drafts after d_0 (and their q when sampling), and the source of the current drafts.
    diff = [(host[b][1:], probs[b] if probs is not None else None) for b in range(B)]
    cur = None  # (plan, drafts tensor [B, K], q tensor [B, K-1, V] or None, per-row (source, n real drafts))

    while not all(done):
        lengths = cache.lengths
        matches = [
            dec.ngrams[b].match(MAX_K - 1) if dec.ngrams is not None and not done[b] else ([], 0) for b in range(B)
        ]
        ctx = [m[0] for m in matches]
        dec.match_lens = [m[1] for m in matches]
        rows = [
            (len(diff[b][0]), len(ctx[b]), dec.row_stats[b], dec.match_lens[b], g.max_new_tokens - len(out[b]))
            for b in range(B)
            if not done[b]
        ]
        plan = dec._plan(rows, lengths)
        cur = compose_drafts(dec, plan, out, diff, ctx, device, V)
        if streamer is not None:
            before = len(out[0])
        res = dec.step(cache, plan, cur[0], cur[1])
        dec.draft_lens.append(plan.draft_len)
        dec.level_log.append(plan.levels)
        commit = [0] * B
        for b, (a, c, dnext, q) in enumerate(res):
            if done[b]:
                continue
            src, n_real = cur[2][b]
            dec.sources[src] += 1
            if src != "none":
                dec.stats[src].update(n_real, a - 1)
                dec.row_stats[b][src].update(n_real, a - 1)
                dec.events.append((src, n_real, a - 1))
            dec.row_forwards[b] += 1
            dec.hist[a] += 1
            row_drafts = cur[3][b]
            n = emit(b, row_drafts[1:a] + [c])
            commit[b] = min(a, n + 1)  # d_0..d_{a-1}; a row that stopped mid-step keeps d_0 and what it emitted
            diff[b] = (dnext, q)
        if streamer is not None and len(out[0]) > before:
            streamer.put(torch.tensor(out[0][before:]))
        cache.commit(commit)
    if streamer is not None:
        streamer.end()

    width = max(map(len, out))
    new = torch.full((B, width), g.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for b, o in enumerate(out):
        new[b, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    tpf = sum(len(o) / f for o, f in zip(out, dec.row_forwards)) / B
    return TidarGenerateOutput(
        torch.cat([input_ids, new], 1),
        dec.forwards,
        tpf,
        dict(sorted(dec.hist.items())),
        out,
        cache,
        [K0] + dec.draft_lens,
        [tuple(range(1, K0 + 1))] + dec.level_log,
        dict(dec.sources),
        dec.events,
    )


__all__ = ["generate", "TidarGenerateOutput"]
