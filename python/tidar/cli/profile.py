"""``tidar profile``: what TiDAR costs and gains on this machine, and the draft length ``"auto"`` would choose.

    tidar profile                               # bundled model, its demo prompts, on cuda if available
    tidar profile --model DIR --device cpu --json
    tidar profile --prompt "def fib(n):" --max-new-tokens 32 --grid 1,2,4,8,16,32

Prints (1) the token-slot curve (``tidar.decode.slot_timing``: one forward's cost by its token count, LM head per row);
(2) a short greedy generation on the prompts with ``draft_len="auto"`` (or ``--draft-len K``) and what it did:
K and proposal levels per step, draft sources, tokens per forward; (3) the acceptance statistics it gathered,
per draft source (diffusion, context) and depth i: alpha_i = P(draft i accepted | drafts 1..i-1 accepted);
(4) the plans ``draft_len="auto"`` scores from (1) and (3): per K the best proposal levels, expected tokens
per step, step ms and expected tokens/s, against plain AR steps through the same cache.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from tidar.decode.planner import MAX_AUTO_DRAFT_LEN, SOURCES, Plan, Planner
from tidar.decode.slot_timing import GRID, SlotCurve, measure_slot_curve, set_slot_curve, slot_curve

DEFAULT_NEW_TOKENS = 48


def _grid(text: str | None):
    if text is None:
        return None
    try:
        grid = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        grid = []
    if not grid or grid[0] < 1:
        raise ValueError(f"--grid must be comma-separated token counts >= 1 (e.g. 1,2,4,8,16), got {text!r}")
    return grid


def add_arguments(p):
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt (repeat for several); default: the model folder's demo prompts",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_NEW_TOKENS,
        help=f"new tokens per prompt of the generation that gathers acceptance statistics "
        f"(default {DEFAULT_NEW_TOKENS})",
    )
    p.add_argument("--draft-len", default="auto", help="K of that generation, or auto (default)")
    p.add_argument("--no-context-drafts", action="store_true", help="diffusion drafts only")
    p.add_argument(
        "--grid",
        default=None,
        help=f"token counts of the slot curve, comma-separated (default: {','.join(map(str, GRID))})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ---------------------------------------------------------------------------------------------- the profile


def acceptance_table(stats: dict) -> dict:
    """Per source: one entry per depth i with trials, acceptances, the raw rate and the smoothed alpha_i the
    planner uses (prior-weighted), up to the deepest depth that had a trial."""
    out = {}
    for src in SOURCES:
        st = stats[src]
        depths = [i for i in range(1, MAX_AUTO_DRAFT_LEN) if st.trials[i] > 0]
        last = max(depths, default=0)
        rows = []
        for i in range(1, last + 1):
            t, a = st.trials[i], st.accepts[i]
            rows.append(
                {
                    "depth": i,
                    "trials": round(t, 2),
                    "accepts": round(a, 2),
                    "rate": round(a / t, 4) if t > 0 else None,
                    "alpha": round(st.alpha(i), 4),
                }
            )
        out[src] = {
            "prior": st.prior,
            "depths": rows,
            "expected_accepted_of_15": round(st.expected(MAX_AUTO_DRAFT_LEN - 1), 4),
        }
    return out


def plan_table(curve: SlotCurve, stats: dict, proposal_levels=None, max_k: int = MAX_AUTO_DRAFT_LEN) -> dict:
    """The plans ``draft_len="auto"`` scores: per candidate K its best levels (steady state, diffusion drafts),
    expected tokens per step, step ms (slot curve) and tokens/s; the one it would choose; plain AR; and the
    choice when a long context (n-gram) match is available."""
    planner = Planner(curve, stats, max_k=max_k, levels=proposal_levels)
    ar_ms = planner.cost(1, ())  # the planner's own AR step
    ar_tps = 1000.0 / ar_ms
    plans = []
    for K, (lv, tok, ms) in sorted(planner.steady_plans().items()):
        tps = 1000.0 * tok / ms
        plans.append(
            {
                "draft_len": K,
                "levels": list(lv),
                "seg_len": Plan(K, lv).seg_len,
                "tokens_per_step": round(tok, 4),
                "step_ms": round(ms, 4),
                "tokens_per_s": round(tps, 2),
                "x_ar": round(tps / ar_tps, 4),
            }
        )
    best = max(plans, key=lambda p: p["tokens_per_s"])
    ctx = Planner(curve, stats, max_k=max_k, levels=proposal_levels).choose([(0, MAX_AUTO_DRAFT_LEN - 1)], max_k)
    ctx_tok = 1.0 + stats["context"].expected(ctx.draft_len - 1)
    ctx_ms = planner.cost(ctx.draft_len, ctx.levels)  # priced as the planner prices it
    with_ctx = {
        "draft_len": ctx.draft_len,
        "levels": list(ctx.levels),
        "tokens_per_step": round(ctx_tok, 4),
        "step_ms": round(ctx_ms, 4),
        "tokens_per_s": round(1000.0 * ctx_tok / ctx_ms, 2),
        "x_ar": round(ctx_tok / ctx_ms * ar_ms, 4),
    }
    return {
        "plans": plans,
        "choice": best,
        "with_context_match": with_ctx,
        "ar": {"step_ms": round(ar_ms, 4), "tokens_per_s": round(ar_tps, 2)},
    }


def _check_profile_args(prompts, max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not prompts or any(not isinstance(p, (list, tuple)) or not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")


def _generate_run(model, ids, max_new_tokens: int, eos_token_id, stats) -> dict:
    """One prompt generated (its counts added to ``stats``), as a row of the report."""
    import tidar

    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = tidar.generate(model, x, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, stats=stats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    n = len(out.new_tokens[0])
    return {
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "forwards": out.forwards,
        "tokens_per_forward": round(out.tokens_per_forward, 4),
        "tokens_per_s": round(n / dt, 2),
        "accepted_histogram": {str(k): v for k, v in out.accepted_histogram.items()},
        "draft_sources": dict(out.draft_sources),
        "draft_lens": list(out.draft_lens),
    }


def _curve_report(curve: SlotCurve) -> dict:
    return {
        "tokens": list(curve.tokens),
        "body_ms": list(curve.body_ms),
        "head_ms_per_row": curve.head_ms_per_row,
        "head_ms_call": curve.head_ms_call,
        "host_ms_step": curve.host_ms_step,
        "host_ms_row": curve.host_ms_row,
        "draft_ms_step": curve.draft_ms_step,
        "measured_s": curve.measured_s,
        "key": curve.key,
    }


def _generation_report(runs: list, counters, draft_len, context_drafts: bool, max_new_tokens: int) -> dict:
    """What the runs did: per run, and summed (``counters``: ``tidar.DecodeCounters`` of every run)."""
    tokens = sum(r["new_tokens"] for r in runs)
    forwards = sum(r["forwards"] for r in runs)
    gen_s = sum(r["new_tokens"] / r["tokens_per_s"] for r in runs if r["tokens_per_s"] > 0)
    levels = Counter(",".join(map(str, lv)) or "-" for lv in counters.levels)
    return {
        "draft_len": draft_len,
        "context_drafts": context_drafts,
        "max_new_tokens": max_new_tokens,
        "prompts": len(runs),
        "new_tokens": tokens,
        "forwards": forwards,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else None,
        "tokens_per_s": round(tokens / gen_s, 2) if gen_s else None,
        "draft_lens": {str(k): v for k, v in sorted(Counter(counters.draft_lens).items())},
        "levels": dict(levels.most_common()),
        "draft_sources": dict(counters.draft_sources),
        "runs": runs,
    }


@torch.no_grad()
def profile_model(
    model,
    prompts,
    *,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    eos_token_id=None,
    grid=None,
    draft_len="auto",
    context_drafts: bool = True,
    curve: SlotCurve | None = None,
) -> dict:
    """Profile a patched (or patchable: it is patched with the given settings) TiDAR ``model`` on ``prompts``
    (lists of token ids). ``curve``: use this slot curve instead of measuring one (e.g. a synthetic curve);
    ``grid``: token counts to measure (default: ``slot_curve``'s full grid, cached per process).
    The acceptance table counts every draft of the runs (``tidar.DecodeStats``); each run plans on its own
    evidence, from the priors, as every ``generate`` call does."""
    import tidar
    from tidar.hf import direct_body
    from tidar.settings import settings_of

    _check_profile_args(prompts, max_new_tokens)
    tidar.patch(model, draft_len=draft_len, context_drafts=context_drafts)
    if curve is None:
        curve = slot_curve(model) if grid is None else measure_slot_curve(model, grid=grid)
    set_slot_curve(model, curve)  # the generation below plans with the curve printed
    stats = tidar.DecodeStats()
    runs = [_generate_run(model, ids, max_new_tokens, eos_token_id, stats) for ids in prompts]
    acceptance = stats.counters.acceptance_by_depth()
    p = next(model.parameters())
    return {
        "model": type(model).__name__,
        "device": str(p.device),
        "dtype": str(p.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "decoder_body": direct_body.status(model),
        "curve": _curve_report(curve),
        "generation": _generation_report(runs, stats.counters, draft_len, context_drafts, max_new_tokens),
        "acceptance": acceptance_table(acceptance),
        "auto": plan_table(curve, acceptance, settings_of(model).proposal_levels),
    }


# ---------------------------------------------------------------------------------------------- report


def format_report(r: dict) -> str:
    c = r["curve"]
    lines = [
        f"{r['model']} on {r['device']} ({r['dtype']}, {r['torch_threads']} torch threads)",
        f"decoder body: {r['decoder_body']}",
        "",
        f"token-slot curve (measured in {c['measured_s']:.1f} s; ms of one forward after a cached prefix):",
        f"{'tokens':>7} {'ms':>9} {'ms/token':>9} {'x 1 token':>10}",
    ]
    one = c["body_ms"][0] or 1e-9
    lines += [f"{n:>7} {ms:>9.3f} {ms / n:>9.3f} {ms / one:>10.2f}" for n, ms in zip(c["tokens"], c["body_ms"])]
    lines.append(f"LM head: {c['head_ms_per_row']:.4f} ms per row")
    g = r["generation"]
    lines += [
        "",
        f"generation: {g['prompts']} prompt(s) x {g['max_new_tokens']} new tokens, "
        f"draft_len={g['draft_len']}, context drafts {'on' if g['context_drafts'] else 'off'}",
        f"  {g['new_tokens']} tokens in {g['forwards']} forwards = {g['tokens_per_forward']} tokens/forward; "
        f"{g['tokens_per_s']} tokens/s (wall, first-call overheads included)",
        f"  K per step (K: steps): {g['draft_lens']}",
        f"  proposal levels (levels: steps): {g['levels']}",
        f"  draft sources (source: row-steps): {g['draft_sources']}",
    ]
    lines += [
        "",
        "acceptance: alpha_i = P(draft i accepted | drafts 1..i-1 accepted); smoothed toward the prior "
        "(the planner's value), raw rate in brackets",
    ]
    for src, a in r["acceptance"].items():
        if not a["depths"]:
            lines.append(f"  {src:<9}: no drafts of this source yet (prior {a['prior']})")
            continue
        cells = [f"{d['depth']}:{d['alpha']:.2f} ({d['rate']:.2f}, n={d['trials']:.0f})" for d in a["depths"]]
        lines.append(f"  {src:<9}: " + "  ".join(cells))
        lines.append(f"  {'':<9}  expected accepted drafts of 15: {a['expected_accepted_of_15']:.2f}")
    au = r["auto"]
    lines += [
        "",
        "draft_len='auto' plans (steady state with diffusion drafts; step ms from the curve):",
        f"{'K':>3} {'levels':<24} {'tokens':>7} {'tok/step':>9} {'step ms':>9} {'tok/s':>9} {'x AR':>6}",
    ]
    for p in au["plans"]:
        lv = ",".join(map(str, p["levels"])) or "- (plain AR step)"
        mark = "  <- chosen" if p is au["choice"] or p == au["choice"] else ""
        lines.append(
            f"{p['draft_len']:>3} {lv:<24} {p['seg_len']:>7} {p['tokens_per_step']:>9.3f} "
            f"{p['step_ms']:>9.3f} {p['tokens_per_s']:>9.1f} {p['x_ar']:>6.2f}{mark}"
        )
    ch, ctx, ar = au["choice"], au["with_context_match"], au["ar"]
    lines += [
        f"auto would choose K={ch['draft_len']} levels {ch['levels']}: {ch['tokens_per_step']:.2f} tokens/step, "
        f"{ch['step_ms']:.2f} ms/step, {ch['tokens_per_s']:.1f} tokens/s = {ch['x_ar']:.2f}x AR "
        f"({ar['tokens_per_s']:.1f} tokens/s at {ar['step_ms']:.2f} ms/step)",
        f"with a 15-token context match: K={ctx['draft_len']} levels {ctx['levels']}: "
        f"{ctx['tokens_per_step']:.2f} tokens/step, {ctx['step_ms']:.2f} ms, {ctx['tokens_per_s']:.1f} tokens/s "
        f"= {ctx['x_ar']:.2f}x AR",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from tidar.cli.demo import _prompts, bundled_model_dir, parse_draft_len
    from tidar.train.checkpoint import load_checkpoint

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        draft_len = parse_draft_len(args.draft_len)
        grid = _grid(args.grid)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model_dir = Path(args.model) if args.model else bundled_model_dir()
        model, tok, _ = load_checkpoint(model_dir, device)
        model.eval()
        texts = _prompts(args, model_dir)
        if not texts or any(not t for t in texts):
            raise ValueError("--prompt must be a non-empty string")
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        report = profile_model(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            grid=grid,
            draft_len=draft_len,
            context_drafts=not args.no_context_drafts,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"tidar profile: error: {e}", file=sys.stderr)
        return 2
    report["model_dir"] = str(model_dir)
    print(json.dumps(report, indent=1) if args.json else f"model {model_dir}\n" + format_report(report))
    return 0


__all__ = ["acceptance_table", "add_arguments", "format_report", "plan_table", "profile_model", "run"]
