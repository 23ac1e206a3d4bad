"""TiDAR decoding (docs/design.md §3-4): one forward per step drafts the next tokens and verifies the drafts.

Exact: with beta = 1, greedy output equals the model's AR greedy output token for token, and sampling has the
AR distribution (speculative sampling; any drafts are valid proposals). ``Decoder`` is one request's decoding, a
step at a time, with typed results; ``generate`` runs it to the end:

- ``prefill()``: the prompts with one block of K masks (``Prefilled``: every row's first token);
- ``plan()``: K and the proposal levels of the next step (``draft_len="auto"`` re-chooses them as generation goes
  on, ``planner``, from the measured token-slot curve, ``slot_timing``) and each row's drafts: from the diffusion
  block or from the context (n-gram match), whichever is expected to be accepted more (``PlannedStep``);
- ``step(planned)``: one forward verifies the drafts and drafts the next ones (``forwards``); the accepted drafts
  and the correction or bonus token are emitted and committed (``StepResult``).

The decoder keeps its counts (``counters``: forwards, tokens, drafts per source) apart from the planner's policy
input (``evidence``: the acceptance statistics of the request and its rows), see ``stats``.

    import torch, transformers, tidar

    config = transformers.Qwen2Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mask_token_id=99,
    )
    model = tidar.patch(transformers.Qwen2ForCausalLM(config).eval(), draft_len=4)
    dec = tidar.Decoder(model, torch.tensor([[1, 2, 3, 4]]), max_new_tokens=16)
    first = dec.prefill()  # Prefilled: first.tokens[b] is row b's first new token
    while not dec.finished:
        planned = dec.plan()  # PlannedStep: K, levels, and per row its drafts and their source
        res = dec.step(planned)  # StepResult: per row the drafts accepted and the tokens emitted
        print(res.draft_len, res.sources, res.drafted, res.accepted, res.emitted)
    out = dec.output()  # what tidar.generate returns: out.sequences, out.tokens_per_forward, ...
    assert torch.equal(out.sequences, tidar.generate(model, torch.tensor([[1, 2, 3, 4]]), max_new_tokens=16).sequences)

    stats = tidar.DecodeStats()  # counters summed over calls, and the last request's acceptance evidence
    tidar.generate(model, torch.tensor([[1, 2, 3, 4]]), max_new_tokens=16, stats=stats)
    print(stats.counters.forwards, stats.counters.drafts("diffusion"), stats.counters.accepted("diffusion"))
"""

from __future__ import annotations

import statistics
import time

import torch

from tidar.decode.args import check_decode_options, check_generate_args
from tidar.decode.context_drafts import NgramIndex
from tidar.decode.drafts import compose_drafts
from tidar.decode.forwards import StepForwards
from tidar.decode.planner import MAX_AUTO_DRAFT_LEN, Plan, Planner, levels_upto
from tidar.decode.results import PlannedStep, Prefilled, StepResult, TidarGenerateOutput
from tidar.decode.slot_timing import slot_curve
from tidar.decode.stats import AcceptanceEvidence, DecodeCounters, DecodeStats, check_stats
from tidar.decode.step_costs import step_costs
from tidar.hf.cache import TidarCache
from tidar.hf.direct_body import decoder_body
from tidar.hf.lm_head import output_head
from tidar.settings import settings_of


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


def _host_calibrated(model, batch: int = 1):
    """The model's slot curve with what the forward leaves out measured (once per curve), by timing this loop:
    the host work of a greedy step (plain AR steps at batch 1 and 4, less the curve's forward and LM head) and
    the extra cost of a sampled step: a plain AR one (K = 1), and rejection sampling with drafts, fixed and per row
    (K = 2 and 4 with all proposal blocks: 6 and 20 rows), at batch 1. A batch over 4 gets its own host work
    measured (once per batch size): the per-row line does not extrapolate (``SlotCurve.host_ms_batch``)."""
    curve = slot_curve(model)
    if not curve.host_measured:
        curve.host_measured = True  # before the runs below, which plan with a fixed K and do not come back here
        _measure_host(model, curve)
    if batch > 4 and batch not in curve.host_ms_batch:
        curve.host_ms_batch[batch] = _host_at(model, curve, batch)
    return curve


def _calibration_ids(model, batch: int) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
    return ids.to(next(model.parameters()).device)


def _host_at(model, curve, batch: int) -> float:
    """The host work of a plain greedy AR step at ``batch`` rows: a step's time less the curve's forward and head."""
    ms = _ms_per_forward(model, _calibration_ids(model, batch), max_new_tokens=17, draft_len=1)
    return max(0.0, ms - curve.device_step(batch, 1, 1, 1))


def _measure_host(model, curve):
    ids = _calibration_ids(model, 4)
    host = {B: _host_at(model, curve, B) for B in (1, 4)}
    curve.host_ms_row = (host[4] - host[1]) / 3 if host[4] > host[1] else 0.0
    curve.host_ms_step = max(0.0, host[1] - curve.host_ms_row)
    # the greedy drafted steps' own host work (verification, draft composition, the blocks' argmax): the median of
    # what real drafted steps cost beyond the curve's AR-step price of the same plan. Left out, it priced a drafted
    # step on this CPU about 40% under its time, and a request's first steps drafted where AR steps paid
    greedy = ((2, None), (4, None), (8, (1,)))
    curve.draft_ms_step = 0.0  # the price the extras are measured against leaves the term out
    extras = []
    for (K, levels), ms in zip(greedy, _step_ms(model, ids[:1], greedy, temperature=0.0)):
        extras.append(ms - curve.greedy_step(1, K, len(levels_upto(K, levels))))
    curve.draft_ms_step = max(0.0, statistics.median(extras))
    # the sampled terms: K = 1 gives the AR step's extra; a least-squares line ``fixed + per_row * rows`` through
    # drafted plans of few and many verified + virtual rows gives the rest, at the shapes the planner takes
    plans = ((1, None), (2, None), (4, None), (8, (1,)))
    points = []
    for (K, levels), ms in zip(plans, _step_ms(model, ids[:1], plans)):
        lv = len(levels_upto(K, levels)) if K > 1 else 0
        S, rows = K * (1 + lv), K + (K * K if lv else 0)
        extra = ms - curve.batch_step(1, S, S, 1)
        if K == 1:
            curve.sample_ms_ar = max(0.0, extra)
        else:
            points.append((rows, extra))
    mx, my = sum(r for r, _ in points) / len(points), sum(e for _, e in points) / len(points)
    var = sum((r - mx) ** 2 for r, _ in points)
    slope = sum((r - mx) * (e - my) for r, e in points) / var if var > 0 else 0.0
    curve.sample_ms_row = max(0.0, slope)
    curve.sample_ms_step = max(0.0, my - curve.sample_ms_row * mx)


def _step_ms(model, ids, plans, steps: int = 12, temperature: float = 1.0) -> list[float]:
    """Median ms of a step (sampled at ``temperature``, or greedy at 0) of each fixed ``(K, proposal levels)`` in
    ``plans``: real steps (planning, forward, verification, commit) of one request per plan after two warm-up
    steps. Medians of steps, not the fastest of a few whole calls, whose prefill mixed in and whose noise swung the
    fitted terms so far between processes that a drafted sampled step (1.9x an AR step) was priced near an AR
    step."""
    max_len = getattr(settings_of(model), "max_len", None)  # a small model's position range caps the request
    new = (steps + 2) * max(K for K, _ in plans) + 1
    new = new if max_len is None else max(1, min(new, max_len - ids.shape[1]))
    kw = dict(max_new_tokens=new, temperature=temperature, seed=0 if temperature > 0 else None)
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda *a: None)
    out = []
    with torch.no_grad():
        for K, levels in plans:
            dec = Decoder(model, ids, draft_len=K, proposal_levels=levels, context_drafts=False, eos_token_id=[], **kw)
            dec.prefill()
            times = []
            while len(times) < steps + 2 and not dec.finished:
                sync()
                t0 = time.perf_counter()
                dec.step()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            out.append(statistics.median(times[2:] or times))
    return out


def _sample_kw(g, generator, backend: str, seed) -> dict:
    """The sampler arguments of every prefill and step (Philox: ``seed`` and an offset each step advances)."""
    kw = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, beta=g.beta, generator=generator)
    kw["backend"] = backend
    if seed is not None:
        del kw["generator"]
        kw.update(seed=seed, offset=0)
    return kw


class Decoder(StepForwards):
    """One request's TiDAR decoding, a step at a time: ``prefill()``, then ``plan()`` / ``step()`` until
    ``finished``, then ``output()`` (see the module's example). ``model`` must be patched (``tidar.patch``); the
    arguments are ``tidar.generate``'s, checked as it checks them, before any forward.

    ``out[b]``: row b's new tokens so far; ``done[b]``: whether row b has finished; ``counters`` and ``evidence``:
    this request's counts and the planner's acceptance evidence (``tidar.decode.stats``); ``cache``: the TiDAR cache
    (after the prefill)."""

    def __init__(
        self,
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
    ):
        s = settings_of(model)
        K, levels, context, backend = check_decode_options(
            s, draft_len, proposal_levels, context_drafts, full_logits, backend
        )
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
        self.model, self.g, self.input_ids, self.streamer, self.verifier = model, g, input_ids, streamer, verifier
        self.backend, self.seed, self.sample_kw = backend, seed, _sample_kw(g, generator, backend, seed)
        self.mask_id = s.mask_token_id
        self.device = g.device
        self.greedy = g.temperature == 0.0 and g.beta == 1.0  # the lean path: argmax rows only
        self.head = output_head(model)
        self.body = decoder_body(model)  # the direct body where proven for this model (tidar.hf.direct_body)
        self.full_logits = full_logits
        self.B = len(g.prompts)
        self.max_pos = g.max_len  # positions a row may reach (max_position_embeddings, the sliding window)
        self.window = getattr(s, "window", None)  # keys a forward may attend to (the attention refuses more)
        self.evidence = AcceptanceEvidence.priors(self.B)  # each request from the priors (see ``stats``)
        self.counters = DecodeCounters(requests=1)
        auto = K == "auto"
        self.planner = None
        if auto:
            curve = _host_calibrated(model, self.B)
            self.planner = Planner(
                curve,
                self.evidence.request,
                levels=levels,
                batch=self.B,
                sampling=not self.greedy,
                # greedy only: a greedy request's tokens do not depend on its plans, a sampled one's do (each plan
                # draws its own uniforms), and a seed must reproduce them, so sampled plans keep the fixed prices
                measured=step_costs(curve, self.B) if self.greedy else None,
            )
        self._plan_ms = (-1, 0.0)  # (step index, ms) of the last plan(): a step's time includes its planning
        self.fixed = None if auto else (K, levels)
        self.max_k = MAX_AUTO_DRAFT_LEN if auto else K
        self.out: list[list[int]] = [[] for _ in range(self.B)]
        self.done = [False] * self.B
        self.ngrams = [NgramIndex(p) for p in g.prompts] if context else None
        self.row_forwards = [0] * self.B  # per row: the forwards it took part in while decoding
        self.cache: TidarCache | None = None  # allocated by the prefill
        self._diff = None  # per row: the diffusion drafts after d_0 for the next step (and their q when sampling)
        self._steps = 0
        self._tables: dict = {}  # per plan / K: small index tensors kept on the device

    @property
    def finished(self) -> bool:
        """Whether every row has finished (EOS, its ``max_new_tokens``, or a stopping rule)."""
        return all(self.done)

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

    def _fit(self, plan: Plan, lengths) -> Plan:
        """``plan``, shrunk near ``max_position_embeddings`` or the sliding window until it fits."""
        while not self._fits(plan, lengths) and plan.draft_len > 1:
            K = plan.draft_len - 1
            plan = Plan(K, tuple(j for j in plan.levels if j <= K) if K > 1 else ())
        return plan if self._fits(plan, lengths) else Plan(1, ())

    def _fixed_plan(self, k_limit: int) -> Plan:
        K, levels = self.fixed
        K = min(K, k_limit)
        return Plan(K, levels_upto(K, levels))

    def _choose_plan(self, rows, lengths) -> Plan:
        k_limit = self._k_limit(lengths)
        return self._fit(
            self._fixed_plan(k_limit) if self.planner is None else self.planner.choose(rows, k_limit), lengths
        )

    def _first_draft_len(self, lengths) -> int:
        """K of the prefill's mask block: the fixed K (fitted as a step's), or with ``"auto"`` the planner's first
        plan: greedy at batch 1 at least 2 (drafts from the start) unless one new token is asked for; sampled or
        batched, K = 1 (no mask block) where the priors say drafts do not beat AR by the planner's margin."""
        k_limit = self._k_limit(lengths)
        if self.planner is None:
            return self._fit(self._fixed_plan(k_limit), lengths).draft_len
        if self.g.max_new_tokens <= 1:
            return 1
        first = self.planner.first(k_limit)
        if self.planner.margin > 1.0:  # sampling or a batch: drafts from the start only where they pay (K0 may be 1)
            return first.draft_len
        return max(2, first.draft_len)

    # ------------------------------------------------------------------ prefill
    def prefill(self) -> Prefilled:
        """The prompts' forward with one block of masks: every row's first token (once, before any step)."""
        with torch.no_grad():
            return self._prefill()

    def _prefill(self) -> Prefilled:
        if self.cache is not None:
            raise RuntimeError("Decoder.prefill runs once, before the first step")
        g, B, c = self.g, self.B, self.counters
        self._check_head(g.prompts[0])
        lengths = list(map(len, g.prompts))
        room = self.max_k * (self.max_k + 1)  # a step's segment past the committed tokens
        self.cache = TidarCache(B, max(lengths) + g.max_new_tokens + room, backend=self.backend)
        K0 = self._first_draft_len(lengths)
        before = c.forwards
        drafts, probs = self._prefill_forwards(K0)
        self.row_forwards = [1] * B
        host = drafts.tolist()
        for b in range(B):
            self._emit(b, [host[b][0]])
        self._diff = [(host[b][1:], probs[b] if probs is not None else None) for b in range(B)]
        c.draft_lens.append(K0)
        c.levels.append(tuple(range(1, K0 + 1)) if K0 > 1 else ())  # K0 = 1: no mask block
        return Prefilled([row[0] for row in host], K0, c.forwards - before)

    def _emit(self, b: int, tokens: list) -> int:
        """Append row ``b``'s new tokens up to its first EOS or its ``max_new_tokens``; returns how many."""
        out, g = self.out[b], self.g
        n = 0
        for t in tokens:
            out.append(t)
            n += 1
            if t in g.eos or len(out) >= g.max_new_tokens:
                self.done[b] = True
                break
        if self.ngrams is not None:
            self.ngrams[b].extend(tokens[:n])
        self.counters.new_tokens += n
        return n

    # ------------------------------------------------------------------ steps
    def plan(self) -> PlannedStep:
        """The next step: its K and levels (fixed, or the planner's) and every row's drafts and their source."""
        if self._diff is None:
            raise RuntimeError("Decoder.plan needs Decoder.prefill first")
        t0 = time.perf_counter()
        B, done, ev, ngrams, diff = self.B, self.done, self.evidence, self.ngrams, self._diff
        ctx, matches = [[]] * B, [0] * B
        if ngrams is not None:
            for b in range(B):
                if not done[b]:
                    ctx[b], matches[b] = ngrams[b].match(MAX_AUTO_DRAFT_LEN - 1)
        ev.match_lens = matches
        left = self.g.max_new_tokens
        rows = [
            (len(diff[b][0]), len(ctx[b]), ev.rows[b], matches[b], left - len(self.out[b]))
            for b in range(B)
            if not done[b]
        ]
        plan = self._choose_plan(rows, self.cache.lengths)
        drafts, probs, meta, tokens = compose_drafts(self, plan, self.out, diff, ctx, self.device, self.g.vocab)
        self._plan_ms = (self._steps, (time.perf_counter() - t0) * 1e3)
        return PlannedStep(plan, drafts, probs, meta, tokens, self._steps)

    def step(self, planned: PlannedStep | None = None, *, commit: bool = True) -> StepResult:
        """Run ``planned`` (default: ``plan()``): one forward verifies its drafts; the accepted drafts and the
        correction or bonus token are emitted and committed. ``commit=False``: the same forward and acceptance,
        nothing emitted or committed (the K/V it wrote past the committed tokens is scratch): a repeatable step."""
        if self.finished:
            raise RuntimeError("every row has finished: Decoder.step has nothing to decode")
        with torch.no_grad():
            planned = self.plan() if planned is None else planned
            return self._step(planned) if commit else self._trial(planned)

    def _step(self, planned: PlannedStep) -> StepResult:
        if planned.index != self._steps:
            raise ValueError(f"this PlannedStep was made for step {planned.index}, the decoder is at {self._steps}")
        t0 = time.perf_counter()
        plan, c, ev, done = planned.plan, self.counters, self.evidence, self.done
        res = self._verify(plan, planned.tokens, planned.probs)
        c.draft_lens.append(plan.draft_len)
        c.levels.append(plan.levels)
        commit, accepted, emitted = [0] * self.B, [0] * self.B, []
        for b, (a, tok, dnext, q) in enumerate(res):
            if done[b]:
                emitted.append([])
                continue
            src, n_real = planned.rows[b]
            c.draft_sources[src] += 1
            if src != "none":
                ev.request[src].update(n_real, a - 1)
                ev.rows[b][src].update(n_real, a - 1)
                c.events.append((src, n_real, a - 1))
            self.row_forwards[b] += 1
            c.accepted_histogram[a] += 1
            tokens = planned.host_tokens[b][1:a] + [tok]
            n = self._emit(b, tokens)
            commit[b] = min(a, n + 1)  # d_0..d_{a-1}; a row that stopped mid-step keeps d_0 and what it emitted
            accepted[b] = a - 1
            emitted.append(tokens[:n])
            self._diff[b] = (dnext, q)
        self.cache.commit(commit)
        if self.planner is not None:  # the step's own clock corrects the planner's prices (``step_costs``)
            ms = (time.perf_counter() - t0) * 1e3
            self.planner.observe(plan, ms + (self._plan_ms[1] if self._plan_ms[0] == self._steps else 0.0))
        self._steps += 1
        return StepResult(planned, accepted, emitted)

    def _trial(self, planned: PlannedStep) -> StepResult:
        res = self._verify(planned.plan, planned.tokens, planned.probs)
        tokens = [t[1:a] + [tok] for t, (a, tok, _, _) in zip(planned.host_tokens, res)]
        return StepResult(planned, [r[0] - 1 for r in res], tokens)

    # ------------------------------------------------------------------ the whole request
    def run(self) -> TidarGenerateOutput:
        """Prefill, steps until every row has finished (row 0 streamed to the streamer), the output: ``generate``."""
        streamer, done = self.streamer, self.done
        with torch.no_grad():
            self._prefill()
            if streamer is not None:
                streamer.put(self.input_ids.cpu())
                streamer.put(torch.tensor(self.out[0]))
            while not all(done):
                res = self._step(self.plan())
                if streamer is not None and res.emitted[0]:
                    streamer.put(torch.tensor(res.emitted[0]))
        if streamer is not None:
            streamer.end()
        return self.output()

    def output(self) -> TidarGenerateOutput:
        """The request's result so far, as ``tidar.generate`` returns it (finished rows padded)."""
        if self.cache is None:
            raise RuntimeError("Decoder.output needs Decoder.prefill first")
        out, c, ids = self.out, self.counters, self.input_ids
        new = torch.full((self.B, max(map(len, out))), self.g.pad_token_id, dtype=ids.dtype, device=ids.device)
        for b, o in enumerate(out):
            new[b, : len(o)] = torch.tensor(o, dtype=ids.dtype)
        tpf = sum(len(o) / f for o, f in zip(out, self.row_forwards)) / self.B
        hist = dict(sorted(c.accepted_histogram.items()))
        return TidarGenerateOutput(
            torch.cat([ids, new], 1),
            c.forwards,
            tpf,
            hist,
            out,
            self.cache,
            list(c.draft_lens),
            list(c.levels),
            dict(c.draft_sources),
            c.events,
        )


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
    stats: DecodeStats | None = None,
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
        stats: a ``tidar.DecodeStats``: the call adds its counts (forwards, tokens, drafts per source) to
            ``stats.counters`` and leaves its acceptance evidence in ``stats.evidence``.
    """
    check_stats(stats)
    dec = Decoder(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        draft_len,
        temperature,
        top_k,
        top_p,
        beta,
        eos_token_id,
        pad_token_id,
        generator,
        streamer,
        backend,
        seed,
        proposal_levels,
        context_drafts,
        full_logits,
        verifier,
    )
    out = dec.run()
    if stats is not None:
        stats.record(dec.counters, dec.evidence)
    return out


__all__ = ["Decoder", "generate"]
