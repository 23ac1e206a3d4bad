"""The token-slot curve: what one forward of the patched model costs as a function of its token count.

A forward of a few tokens costs about what a forward of one token costs (the "free token slots"), then the cost
grows. Where it starts to grow is a property of the model, the device and the dtype, so it is measured, not
assumed: ``slot_curve(model)`` times forwards with the TiDAR cache behind a prefix, for a grid of token counts,
on the model's own device (CUDA events on a GPU), and keeps the result per (model config, dtype, device) for
the process (and in a JSON file when asked). ``draft_len="auto"`` chooses K and the proposal levels from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tidar_kernels import layouts

GRID = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 208, 272)
PREFIX = 64  # cached tokens before the measured segment (a typical prompt)
_CURVES: dict[str, SlotCurve] = {}


@dataclass
class SlotCurve:
    """Milliseconds of one forward (decoder body) by token count (fastest of a few runs), the LM head per call and
    per row, and the host work of a decode step (fixed and per row)."""

    tokens: list  # the measured token counts, increasing
    body_ms: list  # non-decreasing envelope of the timings (a noisy spike never makes more tokens cheaper)
    head_ms_per_row: float  # output embeddings (+ post-processing) on one more row
    device: str
    dtype: str
    key: str = ""
    measured_s: float = 0.0  # how long the measurement took
    head_ms_call: float = 0.0  # the LM head's fixed cost per call (reading its weight), beyond the per-row cost
    host_ms_step: float = 0.0  # host work of a decode step beyond its forward and head (measured by generate)
    host_ms_row: float = 0.0  # ... and per row of the batch
    sample_ms_ar: float = 0.0  # a sampled K = 1 step's sampling beyond a greedy one
    sample_ms_step: float = 0.0  # a sampled step's verification with drafts (rejection sampling), fixed
    sample_ms_row: float = 0.0  # ... per verified or proposal row
    # a greedy step with drafts: host work beyond a plain AR step's (verifying and committing the drafts, composing
    # the next ones, the proposal blocks' argmax); measured by generate, once, at batch 1
    draft_ms_step: float = 0.0
    host_measured: bool = False  # whether the host and sampling terms were measured (``generate`` does, once)
    # batch -> a greedy AR step's host work measured at that batch (``generate`` does, once per batch over 4): the
    # line through batch 1 and 4 overstates a batch of 16 twofold, and an AR step priced too high makes drafted
    # steps look cheap (benchmarks/results/2026-12-06-cpu-batch/README.md)
    host_ms_batch: dict = field(default_factory=dict)
    # whether the planner may replace this curve's prices by the decode steps' own timings (``step_costs``):
    # True for a curve ``measure_slot_curve`` made, False for one given by hand (a test's curve is the truth)
    step_feedback: bool = False

    def __post_init__(self):
        self.host_ms_batch = {int(b): float(ms) for b, ms in self.host_ms_batch.items()}  # JSON keys are strings

    def body(self, n: int) -> float:
        """Interpolated body cost of an ``n``-token forward (linear between grid points, linear beyond)."""
        t, c = self.tokens, self.body_ms
        if n <= t[0]:
            return c[0]
        for i in range(1, len(t)):
            if n <= t[i]:
                w = (n - t[i - 1]) / (t[i] - t[i - 1])
                return c[i - 1] + w * (c[i] - c[i - 1])
        slope = (c[-1] - c[-2]) / (t[-1] - t[-2]) if len(t) > 1 else 0.0
        return c[-1] + slope * (n - t[-1])

    def step(self, seg_len: int, head_rows: int) -> float:
        """Cost of a decode step: a ``seg_len``-token forward with the LM head on ``head_rows`` rows."""
        return self.body(seg_len) + self.head_ms_per_row * head_rows

    def batch_step(self, batch: int, seg_len: int, head_rows: int, head_calls: int = 1) -> float:
        """Cost of a decode step of ``batch`` rows: the forward and head (``device_step``) and the step's host work
        (measured at this batch when ``host_ms_batch`` has it, else fixed + per row)."""
        return self.device_step(batch, seg_len, head_rows, head_calls) + self.host_ms(batch)

    def device_step(self, batch: int, seg_len: int, head_rows: int, head_calls: int = 1) -> float:
        """The forward at all rows' tokens (the curve is measured on one row; a batch's matrix products cost what
        one row of as many tokens costs) and the LM head on ``head_rows`` rows per row in ``head_calls`` calls."""
        return self.body(batch * seg_len) + self.head_ms_per_row * batch * head_rows + self.head_ms_call * head_calls

    def host_ms(self, batch: int) -> float:
        """The host work of a step of ``batch`` rows beyond its forward and head."""
        measured = self.host_ms_batch.get(batch)
        return measured if measured is not None else self.host_ms_step + self.host_ms_row * batch

    def greedy_step(self, batch: int, K: int, levels: int) -> float:
        """Cost of a greedy decode step of plan (K, number of proposal levels): the forward at ``K * (1 + levels)``
        tokens per row, the LM head on the verified rows and, with levels, the block rows (two calls), the host
        work, and with drafts (K > 1) their host work (``draft_ms_step``)."""
        if K == 1:
            return self.batch_step(batch, 1, 1, 1)
        S = K * (1 + levels)
        return self.batch_step(batch, S, 2 * K if levels else K, 2 if levels else 1) + self.draft_ms_step

    def sampled_step(self, batch: int, K: int, levels: int) -> float:
        """Cost of a sampled decode step: the LM head on every row, and rejection sampling over the K verified rows
        and the K x K virtual proposal rows (``drafts.virtual_blocks``) when there are proposal blocks."""
        S = K * (1 + levels)
        if K == 1:
            return self.batch_step(batch, 1, 1, 1) + self.sample_ms_ar
        rows = K + (K * K if levels else 0)
        return self.batch_step(batch, S, S, 1) + self.sample_ms_step + self.sample_ms_row * batch * rows

    def table(self) -> str:
        rows = [f"{'tokens':>7} {'ms':>8} {'ms/token':>9}"]
        rows += [f"{n:>7} {ms:>8.2f} {ms / n:>9.3f}" for n, ms in zip(self.tokens, self.body_ms)]
        rows.append(f"LM head: {self.head_ms_per_row:.3f} ms per row ({self.device}, {self.dtype})")
        return "\n".join(rows)


def _key(model) -> str:
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    p = next(model.parameters())
    dev = str(p.device)
    if p.device.type == "cuda":
        dev += ":" + torch.cuda.get_device_name(p.device)
    else:
        dev += f":threads{torch.get_num_threads()}"
    blob = json.dumps(cfg, sort_keys=True, default=str) + f"|{type(model).__name__}|{p.dtype}|{dev}|{torch.__version__}"
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _timer(device):
    """ms of one call on ``device``: the project's one timer (CUDA events / perf_counter), as the benchmarks."""
    from tidar_kernels.timing import timer

    return timer(device)


@torch.no_grad()
def measure_slot_curve(
    model, grid=GRID, repeats: int | None = None, prefix: int = PREFIX, budget_s: float = 10.0
) -> SlotCurve:
    """Time the patched ``model``'s forward (decoder body) for every token count in ``grid`` after ``prefix``
    cached tokens, and its LM head per row. The fastest of ``repeats`` runs after a warm-up. Stops after
    ``budget_s`` seconds (a large model on a CPU): the curve is extended linearly past the last count measured."""
    from tidar.hf.attention import TidarStep
    from tidar.hf.cache import TidarCache
    from tidar.hf.direct_body import decoder_body
    from tidar.hf.lm_head import output_head
    from tidar.settings import settings_of

    s = settings_of(model)
    grid = sorted({int(n) for n in grid if int(n) >= 1})
    if not grid:
        raise ValueError("grid must hold token counts >= 1")
    max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prefix = max(1, min(prefix, max_pos - grid[-1]))
    grid = [n for n in grid if prefix + n <= max_pos] or [1]
    p = next(model.parameters())
    device = p.device
    repeats = repeats or (10 if device.type == "cuda" else 5)
    head = output_head(model)
    timer = _timer(device)
    was_training = model.training
    model.eval()
    body = decoder_body(model)  # after eval(): a model in training mode runs its modules
    t0 = time.perf_counter()
    try:
        cache = TidarCache(1, prefix + grid[-1], backend=s.backend)
        vocab = model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, vocab, (1, prefix + grid[-1]), generator=gen).to(device)

        def forward(start, n):
            lay = layouts.causal(n).to(device)
            seg = torch.full((1,), start, dtype=torch.int32, device=device)
            pos = (lay.position_ids + start)[None]
            return body(ids[:, start : start + n], pos, TidarStep(lay, seg, cache, s.backend))

        hidden = forward(0, prefix)  # the cached prefix (and the warm-up)
        cache.commit([prefix])
        # Warm-up round (one forward of every shape) that also fixes the grid: a large model on a slow device
        # stops where the projected cost would pass the budget. Then rounds over the whole grid, keeping each
        # count's fastest run: interference from other work only adds time, and it hits different counts in
        # different rounds instead of one stretch of the curve.
        measured = []
        for n in grid:
            t = timer(lambda n=n: forward(prefix, n))
            measured.append(n)
            if len(measured) >= 2 and (time.perf_counter() - t0) + t / 1e3 * (repeats + 1) * 2 > budget_s:
                break
        best = {n: float("inf") for n in measured}
        for r in range(repeats):
            for n in measured:
                best[n] = min(best[n], timer(lambda n=n: forward(prefix, n)))
            if r >= 1 and time.perf_counter() - t0 > budget_s:
                break
        medians = [best[n] for n in measured]
        rows = hidden[:, :32] if hidden.shape[1] >= 32 else hidden
        one = min(timer(lambda: head(rows[:, :1])) for _ in range(repeats))
        many = min(timer(lambda: head(rows)) for _ in range(repeats))
        per_row = max(0.0, (many - one) / max(1, rows.shape[1] - 1))
        head_call = max(0.0, one - per_row)
    finally:
        model.train(was_training)
    envelope = medians[:]
    for i in range(len(envelope) - 2, -1, -1):  # non-decreasing: min over all larger counts
        envelope[i] = min(envelope[i], envelope[i + 1])
    return SlotCurve(
        measured,
        [round(m, 4) for m in envelope],
        round(per_row, 5),
        str(device),
        str(p.dtype).removeprefix("torch."),
        _key(model),
        round(time.perf_counter() - t0, 3),
        round(head_call, 5),
        step_feedback=True,
    )


def slot_curve(model, *, refresh: bool = False, cache_file: str | os.PathLike | None = None) -> SlotCurve:
    """The model's token-slot curve: measured once per (model config, dtype, device) in this process; read
    from / written to ``cache_file`` (JSON) when given (default: ``$TIDAR_SLOT_CURVE_CACHE`` if set)."""
    key = _key(model)
    if not refresh and key in _CURVES:
        return _CURVES[key]
    cache_file = cache_file or os.environ.get("TIDAR_SLOT_CURVE_CACHE")
    stored = {}
    if cache_file and Path(cache_file).is_file():
        try:
            stored = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):
            stored = {}
        if not refresh and key in stored:
            _CURVES[key] = SlotCurve(**stored[key])
            return _CURVES[key]
    curve = measure_slot_curve(model)
    _CURVES[key] = curve
    if cache_file:
        stored[key] = asdict(curve)
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps(stored, indent=1))
    return curve


def set_slot_curve(model, curve: SlotCurve) -> None:
    """Use ``curve`` for ``model`` (e.g. a synthetic curve in tests, or one measured elsewhere)."""
    _CURVES[_key(model)] = curve
