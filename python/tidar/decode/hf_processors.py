"""Hugging Face's logits processors inside TiDAR's verification (docs/design.md §1.5).

Verification row i of a step predicts the token after ``committed + drafts[:i]``; HF's processors take
``(input_ids, scores)``, so each row is processed with exactly the ``input_ids`` HF's own loop would hold when it
picks that token: the row's prompt as the caller gave it (left padding kept), the tokens emitted so far and the
drafts before row i. Greedy takes the argmax of the processed scores; sampling takes them as the target
distribution of the rejection sampler. So greedy output equals HF's token for token and sampled output has HF's
distribution. Drafts are proposals: they need not follow the processors (verification pays for that).

Every row has its own processor list (built by HF from the generation config, with that row's attention mask), so
processors that keep per-row state (the repetition penalty's prompt padding) see the row they were built for. A
caller's ``logits_processor=`` list is called the same way: on one row at a time (``input_ids`` ``[1, L]``).
"""

from __future__ import annotations

import torch

import tidar_kernels
from tidar.decode.drafts import virtual_blocks


class StopRules:
    """HF's stopping criteria (a caller's ``stopping_criteria``, ``stop_strings``, ``max_time``) checked after every
    emitted token: a row's step ends at the token that meets one (it is the token HF emits there, so the output is
    unchanged up to it) and the row stops there; it is marked done when the next step starts. As HF, a row that meets
    a criterion is padded after it only when an EOS criterion is among them (``pad_stopped``); otherwise rows decode
    on until every row has met one, and all end with the step the last did (``limit`` new tokens)."""

    def __init__(self, criteria, rows, pad_stopped: bool):
        self.criteria = criteria
        self.rows = rows  # per batch row, HF's input_ids row
        self.pad_stopped = pad_stopped
        self.stopped: set = set()  # rows whose last emitted token ends them
        self.first_stop: dict = {}  # row -> its new-token count when a criterion first met it (pad_stopped False)
        self.limit: int | None = None  # the new tokens of every row, once all rows met a criterion

    def start_step(self, dec) -> None:
        """Rows whose last step ended them are done."""
        for b in self.stopped:
            dec.done[b] = True
        self.stopped = set()

    def after_prefill(self, dec, first: list, scores) -> None:
        for b, tok in enumerate(first):
            if self._meets(b, [tok], scores[b]):
                self._met(b, 1)
        self._set_limit(dec, [1] * dec.B)

    def after_step(self, dec, res, host, scores) -> None:
        """End each row's step (``res``, ``_Decoder.step``'s tuples, edited in place) at its stopping token."""
        counts = [len(o) for o in dec.out]
        for b, (a, c, _, _) in enumerate(res):
            if dec.done[b]:
                continue
            emitted = host[b][1:a] + [c]
            for j, tok in enumerate(emitted):
                n = counts[b] + j + 1
                if self._ends(b, n, list(dec.out[b]) + emitted[: j + 1], scores[b][j]):
                    res[b] = (j + 1, tok, [], None)
                    self.stopped.add(b)
                    break
            counts[b] += 0 if b in self.stopped else len(emitted)
        self._set_limit(dec, counts)

    def _ends(self, b: int, n: int, tokens: list, scores) -> bool:
        """Whether row ``b`` ends with its ``n``-th new token (``tokens``: all its new tokens)."""
        if self.limit is not None and n >= self.limit:
            return True
        return b not in self.first_stop and self._meets(b, tokens, scores) and self._met(b, n)

    def _meets(self, b: int, tokens: list, scores: torch.Tensor) -> bool:
        ids = torch.tensor([self.rows[b] + tokens], dtype=torch.long, device=scores.device)
        return bool(self.criteria(ids, scores[None])[0])

    def _met(self, b: int, count: int) -> bool:
        """Row ``b`` met a criterion with its ``count``-th new token: True when it ends there."""
        if self.pad_stopped:
            self.stopped.add(b)
            return True
        self.first_stop.setdefault(b, count)
        return False

    def _set_limit(self, dec, counts: list) -> None:
        """Once every row met a criterion, all end at the largest count; rows already there end now."""
        if self.pad_stopped or self.limit is not None or len(self.first_stop) < dec.B:
            return
        self.limit = max(self.first_stop.values())
        self.stopped.update(b for b in range(dec.B) if counts[b] >= self.limit)


class HfVerifier:
    """Replaces TiDAR's acceptance (``_Decoder.prefill`` / ``_Decoder.step``) when HF processors, HF's ``scores``
    / ``logits`` outputs, stopping rules or a right-padded prompt are in the call.

    ``processors``: one ``LogitsProcessorList`` per batch row. ``rows``: per batch row, HF's ``input_ids`` row
    (left padding kept). ``sample``: rejection sampling against the processed scores (else greedy).
    ``draft_temperature``: the temperature the diffusion drafts are sampled at (a proposal: any value is exact).
    ``record``: keep every emitted token's raw logits and processed scores (HF's ``output_logits`` /
    ``output_scores``). ``first_logits`` / ``pos_offset``: HF's first-token logits and the position shift of the
    new tokens for rows HF decodes differently from their unpadded prompt (``right_padding``). ``stopping``: HF's
    stopping criteria (see ``StopRules``; ``pad_stopped``: an EOS criterion is among them)."""

    def __init__(
        self,
        processors,
        rows,
        *,
        sample: bool,
        draft_temperature: float = 1.0,
        record: bool = False,
        first_logits: dict | None = None,
        pos_offset: torch.Tensor | None = None,
        stopping=None,
        pad_stopped: bool = True,
    ):
        self.processors = processors
        self.rows = rows
        self.sample = sample
        self.draft_temperature = draft_temperature
        self.record = record
        self.first_logits = first_logits or {}  # row -> the logits HF takes the first token from (right padding)
        self.pos_offset = pos_offset  # [B]: where HF places the new tokens, relative to TiDAR's positions
        self.stops = StopRules(stopping, rows, pad_stopped) if stopping is not None else None
        self.scores = [[] for _ in rows]  # per row: processed scores [V] of each token emitted (and maybe more)
        self.logits = [[] for _ in rows]  # per row: raw logits [V] of the same tokens

    def keep_emitted(self, counts: list) -> None:
        """Drop what was recorded past each row's last emitted token (drafts accepted after its EOS or length)."""
        for b, n in enumerate(counts):
            del self.scores[b][n:]
            del self.logits[b][n:]

    # ------------------------------------------------------------------ processing
    def process(self, b: int, prefix: list, logits: torch.Tensor) -> torch.Tensor:
        """HF's processed scores ``[V]`` (float32) for batch row ``b`` after ``prefix`` (the emitted tokens and
        drafts after the prompt) from the raw logits ``[V]``."""
        raw = logits.to(dtype=torch.float32)[None].clone()  # as HF: a float32 copy of the position's logits
        ids = torch.tensor([self.rows[b] + prefix], dtype=torch.long, device=logits.device)
        return self.processors[b](ids, raw)[0]

    def _keep(self, b: int, raw: torch.Tensor, scores: torch.Tensor) -> None:
        if self.record:
            self.logits[b].append(raw.to(dtype=torch.float32))
            self.scores[b].append(scores)

    def _kw(self, dec) -> dict:
        """The sampler arguments: greedy, or temperature 1 on the processed scores (HF's warpers are in them)."""
        kw = dict(dec.sample_kw)
        kw.update(temperature=1.0 if self.sample else 0.0, top_k=None, top_p=None, beta=1.0)
        return kw

    def _draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.draft_temperature if self.sample and self.draft_temperature != 1.0 else logits

    # ------------------------------------------------------------------ the hooks
    def prefill(self, dec, ar: torch.Tensor, blocks: torch.Tensor):
        """The first token from the processed AR row of each prompt; the first drafts from the mask block."""
        dec.pos_offset = self.pos_offset
        rows = []
        for b in range(dec.B):
            raw = self.first_logits.get(b, ar[b])
            s = self.process(b, [], raw)
            self._keep(b, raw, s)
            rows.append(s)
        r = tidar_kernels.draft_sample(torch.stack(rows), self._draft_logits(blocks.float()), **self._kw(dec))
        if self.stops is not None:
            self.stops.after_prefill(dec, r.next_drafts[:, 0].tolist(), rows)
        return r

    def verify(self, dec, h, plan, drafts: torch.Tensor, probs):
        """One step's acceptance against the processed scores. Returns ``_Decoder.step``'s per-row tuples
        ``(a, correction or bonus, next diffusion drafts, their q or None)``."""
        if self.stops is not None:
            self.stops.start_step(dec)
        if self.sample:
            res, scores = self._sampled(dec, h, plan, drafts, probs)
        else:
            res, scores = self._greedy(dec, h, plan, drafts)
        if self.stops is not None:
            self.stops.after_step(dec, res, drafts.tolist(), scores)
        return res

    @property
    def limit(self) -> int | None:
        """The new tokens of every row when stopping rules without an EOS criterion ended all rows (else None)."""
        return None if self.stops is None else self.stops.limit

    def _greedy(self, dec, h, plan, drafts):
        K = plan.draft_len
        logits = dec._rows(h, slice(0, K))
        host = drafts.tolist()
        acc, fixes, scores = [], [], [[] for _ in range(dec.B)]
        for b in range(dec.B):
            if dec.done[b]:
                acc.append(1)
                fixes.append(host[b][0])
                continue
            prefix = list(dec.out[b])  # ends with d_0
            for i in range(K):  # row i: after d_0..d_i; the first that disagrees with d_{i+1} is the correction
                s = self.process(b, prefix, logits[b, i])
                self._keep(b, logits[b, i], s)
                scores[b].append(s)
                t = int(s.argmax())
                if i + 1 < K and host[b][i + 1] == t:
                    prefix.append(t)
                    continue
                acc.append(i + 1)
                fixes.append(t)
                break
        slots = _block_slots(dec, h, plan, acc)
        res = []
        for a, c, sl in zip(acc, fixes, slots):
            n = plan.next_diffusion_drafts(a)
            res.append((a, c, sl[len(sl) - n :] if n else [], None))
        return res, scores

    def _sampled(self, dec, h, plan, drafts, probs):
        B, K = dec.B, plan.draft_len
        logits = dec._rows(h, slice(0, h.shape[1]))
        V = logits.shape[-1]
        host = drafts.tolist()
        target = logits[:, :K].float().clone()
        for b in range(B):
            if dec.done[b]:
                continue
            prefix = list(dec.out[b])
            for i in range(K):
                target[b, i] = self.process(b, prefix, logits[b, i])
                prefix.append(host[b][i + 1] if i + 1 < K else 0)
        blocks = virtual_blocks(self._draft_logits(logits[:, K:].float()), plan, V)
        if dec.seed is not None:  # Philox: every step draws fresh counters
            dec.sample_kw["offset"] += B * 2 * K
        r = tidar_kernels.rejection_sample(target, blocks, drafts, probs if K > 1 else None, **self._kw(dec))
        out = torch.cat([r.accepted[:, None], r.next_drafts], 1).tolist()
        res = []
        for b, row in enumerate(out):
            a = row[0]
            if not dec.done[b]:
                for i in range(a):
                    self._keep(b, logits[b, i], target[b, i])
            n = plan.next_diffusion_drafts(a)
            q = r.next_draft_probs[b, :n] if n > 0 and r.next_draft_probs is not None else None
            res.append((a, row[1], row[2 : 2 + n], q))
        return res, target


def _block_slots(dec, h, plan, acc) -> list:
    """Per row, the argmax of the K slots of the proposal block its next drafts come from (block j*, the largest
    level <= a); empty lists when the step had no proposal blocks."""
    K = plan.draft_len
    if not plan.levels:
        return [[] for _ in acc]
    starts = [K + max(plan.block_index[a], 0) * K for a in acc]
    index = torch.tensor([list(range(r, r + K)) for r in starts], device=h.device)
    return dec._rows(h, index).argmax(-1).tolist()


def right_padding(model, ids, mask, embeds=None):
    """HF's decoding of right-padded rows (``attention_mask`` 0 in the last column), which is not that of the row's
    unmasked tokens: the first new token comes from the logits of the last column (a masked pad token as the query)
    and the new tokens take positions from 1 on (the last column's position, 0, plus one; with or without a cache,
    HF extends its position ids that way). Returns
    ``(first_logits, pos_offset)``: the first-token logits per right-padded row (one plain forward of the prompt, as
    HF's prefill) and the per-row shift of the new tokens' positions; ``({}, None)`` when no row is right-padded."""
    if mask is None or bool((mask[:, -1] == 1).all()):
        return {}, None
    from tidar.decode.hf_outputs import hf_positions

    rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
    with torch.no_grad():
        inputs = dict(input_ids=ids) if embeds is None else dict(inputs_embeds=embeds)
        logits = model(**inputs, attention_mask=mask, position_ids=hf_positions(mask)).logits[:, -1]
    n = mask.sum(1)
    offset = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    offset[rows] = 1 - n[rows]
    return {b: logits[b] for b in rows}, offset


def row_processors(model, gen, input_ids, attention_mask, user_processors=None) -> list:
    """One HF ``LogitsProcessorList`` per batch row, built by HF from the generation config exactly as its
    ``generate`` builds the batch's (``_get_logits_processor``), with that row's ``input_ids`` and mask."""
    lists = []
    for b in range(input_ids.shape[0]):
        mask = None if attention_mask is None else attention_mask[b : b + 1]
        lists.append(
            model._get_logits_processor(
                generation_config=gen,
                input_ids_seq_length=input_ids.shape[1],
                encoder_input_ids=input_ids[b : b + 1],
                prefix_allowed_tokens_fn=None,
                logits_processor=user_processors,
                device=input_ids.device,
                model_kwargs={"attention_mask": mask},
            )
        )
    return lists


__all__ = ["HfVerifier", "StopRules", "right_padding", "row_processors"]
