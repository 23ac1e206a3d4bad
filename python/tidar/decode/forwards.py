"""The forwards of a decode step and its acceptance (docs/design.md §3-4): the base of ``tidar.Decoder``.

A step runs the decoder body on K drafts + one block of K masks per proposal level, applies the LM head to the K
draft rows, decides the acceptance (greedy: argmax compare; sampling: ``rejection_sample``), then the LM head on
the K rows of the one proposal block the next drafts come from (``lm_head``). The only host synchronisation of a
step reads the accepted counts and the candidate next drafts.

``StepForwards`` reads the decoder's state (``model``, ``cache``, ``g``: the checked arguments, ``sample_kw``...).
The prefill commits the prompts to the cache; a step writes only scratch K/V past the committed tokens, counts its
forward and advances the Philox offset: emitting and committing its tokens is the decoder's (``Decoder.step``).
"""

from __future__ import annotations

import torch

import tidar_kernels
from tidar.decode.drafts import virtual_blocks
from tidar.decode.planner import Plan
from tidar.hf.attention import TidarStep, tidar_forward
from tidar_kernels import layouts

# A greedy step needs the LM head on 2K of its K(1 + |levels|) rows, in two calls (the second depends on the
# first's acceptance). A call's fixed cost (reading the head's weight) dominates for few rows, so a step of at most
# this many tokens takes the head on all its rows in one call instead (on a CPU, measured in
# benchmarks/results/lm_head_cpu_few_rows.md: with the head's few-row GEMM of ``lm_head``, one call up to 16 rows,
# two calls of K rows above). On a GPU a call of a few hundred rows costs what a call of one does.
ONE_HEAD_CALL_ROWS = {"cpu": 16, "cuda": 128}
# Devices whose greedy acceptance is decided on the host (reading them costs no synchronisation); elsewhere the
# step stays on the device (``device_step``: one host sync per step, CUDA-graph capturable).
HOST_VERIFY = {"cpu"}


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``argmax(-1)`` (the first maximal index, NaN counted as maximal, as both document) via ``max``: about half
    the time of ``argmax`` on a CPU (benchmarks/results/decode_step_cpu_host_costs.md)."""
    return logits.max(-1).indices


class StepForwards:
    """The forwards and the acceptance of the prefill and of one decode step."""

    verifier = None  # an hf_processors.HfVerifier: HF's logits processors inside the acceptance
    pos_offset = None  # [B] long, set by the verifier: added to the positions of every token after the prompt

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids, pos, layout, seg_start):
        """Hidden states (or full logits) of one forward through the decoder's cache."""
        step = TidarStep(layout, seg_start, self.cache, self.backend)
        if self.full_logits:
            return tidar_forward(self.model, ids, pos, step).logits
        return self.body(ids, pos, step)

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
        hidden = self.body(ids, pos, TidarStep(lay, seg, None, self.backend))
        logits = tidar_forward(self.model, ids, pos, TidarStep(lay, seg, None, self.backend)).logits
        if not self.head.verify(hidden, logits):
            self.full_logits = True

    # ------------------------------------------------------------------ prefill
    def _prefill_forwards(self, K):
        """Prompt (causal) + one block of K masks (none at K = 1); returns the first tokens and drafts [B, K] (device)
        and their q, with the prompts committed to the cache."""
        lengths = list(map(len, self.g.prompts))
        if K == 1:  # a 1-slot block drafts nothing: the prompts' forward alone (the AR row is its own block)
            ar = self._prefill_prompts(lengths)
            blocks = ar[:, None]
        elif len(set(lengths)) == 1:
            ar, blocks = self._prefill_even(K, lengths[0])
        else:
            ar, blocks = self._prefill_ragged(K, lengths)
        if self.verifier is not None:  # HF's logits processors (hf_processors.HfVerifier)
            r = self.verifier.prefill(self, ar, blocks)
        else:
            r = tidar_kernels.draft_sample(ar, blocks, **self.sample_kw)
        self.cache.commit(lengths)
        return r.next_drafts, r.next_draft_probs

    def _prefill_even(self, K, n):
        """Prompts of one length: one forward of prompt + K masks (``layouts.prefill``)."""
        layout = layouts.prefill(n, K).to(self.device)
        ids = torch.tensor([p + [self.mask_id] * K for p in self.g.prompts], dtype=torch.long, device=self.device)
        pos = layout.position_ids[None].expand(self.B, -1)
        seg_start = torch.zeros(self.B, dtype=torch.int32, device=self.device)
        h = self._forward(ids, pos, layout, seg_start)
        self.counters.forwards += 1
        logits = self._rows(h, slice(n - 1, n + K))
        return logits[:, 0], logits[:, 1:]

    def _prefill_prompts(self, lengths):
        """The prompts alone, causal, in one forward (ragged ones right-padded to the longest: causal attention,
        so the padding after a row's prompt changes nothing before it, and its keys are scratch past the row's
        committed length). Returns the logits after each row's last prompt token ``[B, V]``."""
        P = max(lengths)
        layout = layouts.causal(P).to(self.device)
        ids = torch.tensor([p + [p[-1]] * (P - len(p)) for p in self.g.prompts], dtype=torch.long, device=self.device)
        zeros = torch.zeros(self.B, dtype=torch.int32, device=self.device)
        h = self._forward(ids, layout.position_ids[None].expand(self.B, -1), layout, zeros)
        self.counters.forwards += 1
        if len(set(lengths)) == 1:
            return self._rows(h, slice(P - 1, P))[:, 0]
        return self._rows(h, torch.tensor(lengths, device=self.device)[:, None] - 1)[:, 0]

    def _prefill_ragged(self, K, lengths):
        """Prompts of different lengths: two batched forwards instead of one per row. The prompts right-padded to
        the longest (``_prefill_prompts``), then each row's block of K masks at its own seg_start
        (``layouts.mask_block``: it sees the prompt and itself, as the masks of ``layouts.prefill`` do)."""
        ar = self._prefill_prompts(lengths)
        seg_start = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        block = layouts.mask_block(K).to(self.device)
        ids = torch.full((self.B, K), self.mask_id, dtype=torch.long, device=self.device)
        h = self._forward(ids, seg_start.long()[:, None] + block.position_ids[None], block, seg_start)
        self.counters.forwards += 1
        return ar, self._rows(h, slice(0, K))

    # ------------------------------------------------------------------ one step
    def _verify(self, plan: Plan, drafts: torch.Tensor, probs):
        """Run one decode step's forward and acceptance. Returns per row: accepted a, the correction/bonus token,
        the diffusion drafts for the next step (and their q rows when sampling)."""
        cache = self.cache
        cache.check_room(plan.seg_len)
        seg_start = cache.seq_lengths(self.device)
        if self.verifier is not None:  # HF's logits processors decide the acceptance (hf_processors.HfVerifier)
            return self.verifier.verify(self, self._body(plan, drafts, seg_start), plan, drafts, probs)
        if self.greedy and self.device.type in HOST_VERIFY:
            return self._greedy_host(plan, drafts, seg_start)
        if self.greedy:
            packed = self.device_step(plan, drafts, seg_start)
            return self._greedy_rows(packed.tolist(), plan)  # the step's one host synchronisation
        h = self._body(plan, drafts, seg_start)
        return self._sampled_verify(h, plan, drafts, probs)

    def _body(self, plan: Plan, drafts, seg_start):
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
        self.counters.forwards += 1
        return self._forward(ids, pos, layout, seg_start)

    def device_step(self, plan: Plan, drafts, seg_start) -> torch.Tensor:
        """The greedy step on the device, with no host synchronisation (CUDA-graph capturable given static
        ``drafts``/``seg_start`` buffers): ``[B, 2 + K]`` = accepted a, the correction/bonus token, then the
        K slots of the proposal block the next drafts come from (absent without levels). Commits nothing."""
        B, K, lv = self.B, plan.draft_len, plan.levels
        h = self._body(plan, drafts, seg_start)
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

    def _greedy_host(self, plan: Plan, drafts, seg_start):
        """The greedy step where the device is the host (a CPU): the same result as ``device_step`` +
        ``_greedy_rows``, with the acceptance decided on Python ints, since reading a CPU tensor costs no
        synchronisation and a dozen small tensor ops cost more than the loop
        (benchmarks/results/decode_step_cpu_host_costs.md)."""
        K, lv = plan.draft_len, plan.levels
        h = self._body(plan, drafts, seg_start)
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


__all__ = ["HOST_VERIFY", "ONE_HEAD_CALL_ROWS", "StepForwards"]
