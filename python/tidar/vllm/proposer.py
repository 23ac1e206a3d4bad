"""The TiDAR proposer vLLM loads with ``method="custom_class"`` (one forward per step, docs/design.md §1.5).

``load_model`` wraps the target model: each forward gets, after the rows vLLM scheduled, the [MASK] proposal
blocks of every request (``step_layout``); their attention runs in ``mask_attention``; their final hidden states
are kept, and the model returns the scheduled rows only, so vLLM's sampler, rejection sampler and metrics run
unchanged. ``propose`` then reads the next drafts off the block that matches each request's accepted length: no
second forward. A step whose requests carry no drafts is sampled by vLLM's plain sampler, not its rejection sampler
(``plain_sampler_step``; the same tokens, less work), so ``propose`` drafts nothing when the step's drafts are worth
less than that verification (``draft_source.step_pays``).
"""

from __future__ import annotations

import sys

import torch

from .draft_source import BLOCK_COST, ROW_COST, VERIFY_COST, SourceEvidence, fixed_prices, step_pays
from .engine_checks import SUPPORTED_ARCHITECTURES, check_vllm_config
from .mask_attention import LayerHook, MaskRows, check_layer
from .options import TidarOptions, parse_class_name
from .step_clock import StepClock
from .step_layout import plan_step


class _State:
    mask_rows = None  # the current forward's MaskRows, read by every layer hook


class TidarProposer:
    """``vllm`` custom proposer; the options come from the class name (``options``)."""

    options = TidarOptions()

    def __init__(self, vllm_config):
        check_vllm_config(vllm_config)
        self.vllm_config = vllm_config
        self.K = vllm_config.speculative_config.num_speculative_tokens
        self.options.check(self.K)
        # the prices of rows and blocks: measured on the engine's own steps (``step_clock``), or the row cost the
        # options fix (then never corrected, as a slot curve given by hand)
        if self.options.row_cost is None:
            self.prices = StepClock(ROW_COST, BLOCK_COST, VERIFY_COST)
        else:
            self.prices = fixed_prices(self.options.row_cost)
        hf = vllm_config.model_config.hf_config
        self.mask_token_id = int(hf.mask_token_id)
        self.max_position = vllm_config.model_config.max_model_len
        self.state = _State()
        self.scheduler_output = None  # set by the runner hook (plugin) before each execute_model
        self.runner = None
        self.hidden = None  # the last forward's mask rows' hidden states
        self.layout = None
        self.req_ids = []  # the current step's requests, in the runner's batch order
        self.contexts = {}  # req_id -> NgramIndex (context drafts)
        self.evidence = {}  # req_id -> SourceEvidence (context or diffusion drafts)
        self.plain_sampler_steps = 0  # steps sampled without vLLM's rejection sampler (``plain_sampler_step``)

    # --- the runner hook (plugin.py) ---
    def begin_step(self, runner, scheduler_output) -> None:
        self.runner, self.scheduler_output = runner, scheduler_output
        self.hidden = self.layout = None
        self.prices.begin()

    def plain_sampler_step(self, runner, metadata) -> bool:
        """The runner hook (plugin.py) asks, before sampling a step, whether vLLM's plain sampler may sample it
        instead of the rejection sampler: when no request in the step has drafts, the rejection sampler only
        samples each request's bonus token with that same sampler, on the same logits and per-request generators
        (greedy and seeded requests get the same tokens; unseeded ones draw from the global generator in another
        order, the same distribution). Not when the step wants logprobs of any kind (the rejection sampler computes
        them its own way), when a request still holds draft tokens that penalties or bad words would count, or when
        a thinking budget is tracked (its forced tokens are placed by the bonus-token path's row offsets)."""
        if metadata.max_spec_len != 0:
            return False
        sm = runner.input_batch.sampling_metadata
        if sm.max_num_logprobs is not None or getattr(sm, "logprob_token_ids", None):
            return False
        if sm.spec_token_ids is not None and any(sm.spec_token_ids):
            return False
        holder = getattr(sm, "thinking_budget_state_holder", None)
        if holder is not None and holder.has_tracked_requests():
            return False
        self.plain_sampler_steps += 1
        return True

    # --- vLLM's interface ---
    def load_model(self, model) -> None:
        from vllm.model_executor.layers.attention.attention import Attention

        arch = type(model).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"TiDAR in vLLM supports the model classes {SUPPORTED_ARCHITECTURES}; this model is {arch}"
            )
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        if not layers:
            raise ValueError(f"TiDAR found no vLLM Attention layer in {arch}")
        self.hooks = []
        for layer in layers:
            check_layer(layer)
            layer.forward = LayerHook(layer, self.state)
            self.hooks.append(layer.forward)
        self.model = model
        orig_forward = model.forward

        def forward(input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            rows = self._plan(input_ids, positions)
            if rows is None:
                return orig_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
            P = rows.num_input_rows
            mask_ids = torch.full((rows.layout.num_rows,), self.mask_token_id, dtype=input_ids.dtype)
            ids = torch.cat([input_ids, mask_ids.to(input_ids.device)])
            pos = torch.cat([positions, rows.layout.positions.to(positions)])
            self.state.mask_rows = rows
            try:
                hidden = orig_forward(ids, pos, intermediate_tensors, inputs_embeds, **kwargs)
            finally:
                self.state.mask_rows = None
            self.hidden, self.layout = hidden[P:], rows.layout
            return hidden[:P]

        model.forward = forward

    def _plan(self, input_ids, positions):
        """The mask rows of this forward, or None (no scheduler step: a profiling or dummy run; or no request
        needs a block)."""
        from vllm.forward_context import get_forward_context

        so, runner = self.scheduler_output, self.runner
        self.scheduler_output = None  # one forward per scheduler step: a later dummy run must not reuse it
        self.req_ids = []
        if so is None or input_ids is None:
            return None
        meta = get_forward_context().attn_metadata
        if not meta:
            self.prices.skip()
            return None
        if isinstance(meta, list):
            meta = meta[0]
        m = next(iter(meta.values()))
        num_reqs = m.seq_lens.shape[0]
        qsl = m.query_start_loc[: num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:num_reqs].tolist()
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        sched = [qsl[i + 1] - qsl[i] for i in range(num_reqs)]
        for rid, n in zip(req_ids, sched):
            if so.num_scheduled_tokens.get(rid) != n:
                raise RuntimeError(
                    f"TiDAR: request {rid} has {n} rows in the forward, the scheduler gave it "
                    f"{so.num_scheduled_tokens.get(rid)} (the runner's batch order is not the one it expects)"
                )
        self.req_ids = req_ids
        drafts = [len(so.scheduled_spec_decode_tokens.get(rid, ())) for rid in req_ids]
        computed = [s - n for s, n in zip(seq_lens, sched)]
        # each request's block, priced against this step's batch; a request that will draft from the context again
        # appends none (draft_source)
        batch = len(req_ids)
        levels, ks = [], []
        for rid in req_ids:
            ev = self.evidence.setdefault(rid, SourceEvidence(prices=self.prices))
            block = ev.wants_block(self.K, batch)
            ev.planned(block)
            levels.append(self.options.levels if block else ())
            ks.append(ev.block_drafts(self.K, batch))
        layout = plan_step(computed, sched, drafts, ks, levels, self.max_position)
        self.prices.ran(input_ids.shape[0] + layout.num_rows, layout.num_rows > 0, any(drafts))
        if layout.num_rows == 0:
            return None
        block_size = self.hooks[0].kv_cache().shape[2]  # the pool's [num_blocks, Hkv, block_size, 2 * D]
        return MaskRows(layout, input_ids.shape[0], seq_lens, m.block_table[:num_reqs], block_size)

    def propose(self, sampled_token_ids, num_tokens_no_spec=None, token_ids_cpu=None, slot_mappings=None, **_):
        """The next drafts of each request: a context (n-gram) continuation when ``options.context`` is on and the
        text's end matches, else the slots of the block that assumed its accepted length (greedy); none at all when
        together they do not pay for the step's verification (``step_pays``)."""
        layout, hidden = self.layout, self.hidden
        self.layout = self.hidden = None
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        picks = []  # (request, first row, count)
        gains = {}  # request -> the expected gain of its drafts
        batch = sum(1 for s in sampled_token_ids[: len(self.req_ids)] if s)  # requests of the next step, about
        for r, sampled in enumerate(sampled_token_ids):
            if not sampled or r >= len(self.req_ids):
                continue
            ev = self.evidence.setdefault(self.req_ids[r], SourceEvidence(prices=self.prices))
            ev.observe(sampled)
            level = len(sampled)
            found = layout.block_for(r, level) if layout is not None else None
            first = None if found is None else level - found[1] + 1  # slot of the first next draft in that block
            k = layout.block_len[r] - 1 if found is not None else 0
            has_block = first is not None and first <= k
            if self.options.context:
                ctx = self._context_drafts(r, num_tokens_no_spec, token_ids_cpu)
                use = ctx[: ev.context_drafts(self.K, batch)] if ev.prefers_context() or not has_block else []
                if use:
                    out[r] = use
                    ev.last = ("context", len(use))
                    gains[r] = ev.expected_gain("context", len(use), batch)
                    continue
                ev.shadow = ctx or None
            ev.last = ("diffusion", k + 1 - first) if has_block else None
            if has_block:
                picks.append((r, found[0] + first, k + 1 - first))
                gains[r] = ev.expected_gain("diffusion", k + 1 - first, batch)
        if picks:
            idx = torch.cat([torch.arange(s, s + c) for _, s, c in picks]).to(hidden.device)
            logits = self.model.compute_logits(hidden.index_select(0, idx))
            tokens = logits.argmax(dim=-1).tolist()
            i = 0
            for r, _, c in picks:
                out[r] = tokens[i : i + c]
                i += c
        # drafts expected to cost more than they save are withheld; the rest only if together they do not pay for the
        # step's verification (drafting nothing lets the next step skip the rejection sampler). Withheld drafts
        # become shadows of their source.
        pays = step_pays([g for g in gains.values() if g > 0], self.prices.verify_cost)
        for r, g in gains.items():
            if g <= 0 or not pays:
                ev = self.evidence[self.req_ids[r]]
                ev.withhold(ev.last[0], out[r])
                out[r] = []
        live = set(self.req_ids)
        for table in (self.contexts, self.evidence):
            for rid in [k for k in table if k not in live]:
                del table[rid]
        return out

    def _context_drafts(self, r, num_tokens_no_spec, token_ids_cpu) -> list[int]:
        from ._deps import NgramIndex

        rid = self.req_ids[r]
        n = int(num_tokens_no_spec[r])
        idx = self.contexts.get(rid)
        if idx is None or len(idx.seq) > n:
            idx = self.contexts[rid] = NgramIndex([], max_n=max(4, self.options.context), min_n=self.options.context)
        idx.extend(token_ids_cpu[r, len(idx.seq) : n].tolist())
        drafts, length = idx.match(self.K)
        return drafts if length >= self.options.context else []


def __getattr__(name: str):
    """``TidarProposer__levels_...`` (see ``options``): a subclass carrying those options, made once."""
    if not name.startswith("TidarProposer__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    opts = parse_class_name(name)
    cls = type(name, (TidarProposer,), {"options": opts, "__module__": __name__})
    setattr(sys.modules[__name__], name, cls)
    return cls
