"""``tidar demo``: the bundled TiDAR model completes held-out code prompts twice, with plain AR greedy
decoding (Hugging Face ``generate`` on the unpatched model) and with TiDAR greedy decoding (one forward
drafts with diffusion and verifies autoregressively), shows the texts are identical and compares
tokens per forward and tokens/s. Exits 1 if a greedy TiDAR text differs from the AR text.

    tidar demo                       # bundled model, its held-out prompts, 64 new tokens, K from the config
    tidar demo --prompt "def fib(n):" --draft-len 8 --json
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

BUNDLED_NAME = "tidar-stdlib-tiny"
PROMPTS_FILE = "demo_prompts.json"
# Used when the model folder has no demo_prompts.json: short openings of held-out-style code.
FALLBACK_PROMPTS = [
    'def read_config(path):\n    """Read a key = value file into a dict."""\n    result = {}\n',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def bundled_model_dir() -> Path:
    """The bundled model: ``$TIDAR_MODEL``, else ``models/tidar-stdlib-tiny`` of the source tree (editable
    install), else the copy shipped inside the package. Raises FileNotFoundError naming every place it looked."""
    import tidar

    here = Path(tidar.__file__).resolve().parent
    candidates = []
    if os.environ.get("TIDAR_MODEL"):
        candidates.append(Path(os.environ["TIDAR_MODEL"]))
    candidates += [here.parents[1] / "models" / BUNDLED_NAME, here / "models" / BUNDLED_NAME]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        "the bundled TiDAR model was not found; looked in: "
        + ", ".join(str(c) for c in candidates)
        + ". Run from a source checkout (pip install -e .), set TIDAR_MODEL=<folder>, or pass --model <folder>"
    )


def add_arguments(p):
    p.add_argument("--model", default=None, help=f"model folder (default: the bundled {BUNDLED_NAME})")
    p.add_argument(
        "--prompt", action="append", default=None, help="a prompt (repeat for several); default: held-out code prompts"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--draft-len",
        type=_draft_len,
        default="auto",
        help="K, or 'auto' (default): chosen per step from the measured token-slot curve and the acceptance",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (the default; the only mode with identical texts)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def parse_draft_len(text: str):
    """``--draft-len``: an int >= 1 or ``auto`` (ValueError naming the option otherwise)."""
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"--draft-len must be an int >= 1 or 'auto', got {text!r}")
    return k


def _draft_len(text: str):
    try:
        return parse_draft_len(text)
    except ValueError as e:  # argparse prints an ArgumentTypeError's own message
        raise __import__("argparse").ArgumentTypeError(str(e)) from None


def _load(model_dir, device):
    from tidar.train.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(model_dir, device)
    return model.eval(), tokenizer


def _prompts(args, model_dir):
    if args.prompt:
        return list(args.prompt)
    f = Path(model_dir) / PROMPTS_FILE
    if f.is_file():
        return json.loads(f.read_text())["prompts"]
    return list(FALLBACK_PROMPTS)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _streamer(tokenizer, enabled):
    if not enabled:
        return None
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True)


def run_demo(args, out=print) -> dict:
    import tidar
    from tidar.decode.slot_timing import slot_curve

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    model, tok = _load(model_dir, device)
    K = args.draft_len or "auto"
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    greedy = args.temperature == 0
    stream = not args.json
    eos = tok.eos_token_id
    prompts = _prompts(args, model_dir)
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be non-empty strings")
    gen = torch.Generator(device).manual_seed(args.seed)

    def ar_generate(ids, n, streamer=None):
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            streamer=streamer,
            **kw,
        )

    def use_tidar():  # not timed: patching runs a probe forward
        tidar.patch(model, draft_len=K)

    def use_ar():
        if tidar.is_patched(model):
            tidar.unpatch(model)

    def tidar_generate(ids, n, streamer=None):
        return tidar.generate(
            model,
            ids,
            max_new_tokens=n,
            temperature=args.temperature,
            eos_token_id=eos,
            generator=None if greedy else gen,
            streamer=streamer,
        )

    warm = tok(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    use_ar()
    ar_generate(warm, 2)  # first-call overheads out of the timings
    use_tidar()
    t0 = time.perf_counter()
    curve = slot_curve(model)  # measured once per model, device and dtype (the auto draft length's costs)
    curve_s = time.perf_counter() - t0
    tidar_generate(warm, 2)

    if stream:
        out(
            f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {device}; "
            f"draft_len {K}; {'greedy' if greedy else f'temperature {args.temperature}'}; "
            f"{args.max_new_tokens} new tokens"
        )
    results, hist_all = [], Counter()
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        if stream:
            out(f"\n=== prompt {i + 1}/{len(prompts)} ===\n{prompt}", end="")
            out("\n--- AR (Hugging Face generate) ---")
            sys.stdout.flush()
        use_ar()
        _sync(device)
        t0 = time.perf_counter()
        ar_seq = ar_generate(ids, args.max_new_tokens, _streamer(tok, stream))
        _sync(device)
        t_ar = time.perf_counter() - t0
        ar_new = ar_seq[0, ids.shape[1] :].tolist()
        if ar_new and eos in ar_new:
            ar_new = ar_new[: ar_new.index(eos) + 1]
        if stream:
            out("--- TiDAR ---")
            sys.stdout.flush()
        use_tidar()
        _sync(device)
        t0 = time.perf_counter()
        res = tidar_generate(ids, args.max_new_tokens, _streamer(tok, stream))
        _sync(device)
        t_td = time.perf_counter() - t0
        td_new = res.new_tokens[0]
        ar_text, td_text = tok.decode(ar_new), tok.decode(td_new)
        same = ar_new == td_new if greedy else None
        hist_all.update(res.accepted_histogram)
        r = {
            "prompt": prompt,
            "ar_text": ar_text,
            "tidar_text": td_text,
            "identical": same,
            "new_tokens": len(td_new),
            "ar_new_tokens": len(ar_new),
            "forwards": res.forwards,
            "ar_forwards": len(ar_new),
            "tokens_per_forward": len(td_new) / res.forwards,
            "accepted_histogram": {str(k): v for k, v in res.accepted_histogram.items()},
            "draft_lens": dict(sorted(Counter(res.draft_lens[1:]).items())),
            "draft_sources": res.draft_sources,
            "ar_tokens_per_s": len(ar_new) / t_ar,
            "tidar_tokens_per_s": len(td_new) / t_td,
        }
        results.append(r)
        if stream:
            verdict = {True: "identical to AR", False: "DIFFERS from AR", None: "(sampling: not compared)"}[same]
            out(
                f"--- {verdict}: {r['new_tokens']} tokens in {r['forwards']} forwards = "
                f"{r['tokens_per_forward']:.2f} tokens/forward; "
                f"accepted lengths {dict(sorted(res.accepted_histogram.items()))}; K used {r['draft_lens']}; "
                f"draft sources {res.draft_sources}; "
                f"tokens/s AR {r['ar_tokens_per_s']:.1f} vs TiDAR {r['tidar_tokens_per_s']:.1f}"
            )
    tokens = sum(r["new_tokens"] for r in results)
    forwards = sum(r["forwards"] for r in results)
    ar_time = sum(r["ar_new_tokens"] / r["ar_tokens_per_s"] for r in results)
    td_time = sum(r["new_tokens"] / r["tidar_tokens_per_s"] for r in results)
    summary = {
        "model": str(model_dir),
        "device": str(device),
        "draft_len": K,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "identical": all(r["identical"] for r in results) if greedy else None,
        "tokens_per_forward": tokens / forwards,
        "accepted_histogram": {str(k): v for k, v in sorted(hist_all.items())},
        "ar_tokens_per_s": sum(r["ar_new_tokens"] for r in results) / ar_time,
        "tidar_tokens_per_s": tokens / td_time,
        "speedup": (tokens / td_time) / (sum(r["ar_new_tokens"] for r in results) / ar_time),
        "slot_curve_ms": dict(zip(curve.tokens, curve.body_ms)),
        "slot_curve_measured_s": round(curve_s, 3),
        "prompts": results,
    }
    if stream:
        out(f"\n=== summary over {len(results)} prompts ===")
        if greedy:
            out("TiDAR text identical to AR text on every prompt: " + ("yes" if summary["identical"] else "NO"))
        out(f"TiDAR tokens per forward: {summary['tokens_per_forward']:.2f} (AR: 1.00)")
        out(f"accepted-length histogram (a: steps): {dict(sorted(hist_all.items()))}")
        out(
            f"tokens/s on {device}: AR {summary['ar_tokens_per_s']:.1f}, TiDAR {summary['tidar_tokens_per_s']:.1f} "
            f"({summary['speedup']:.2f}x)"
        )
        if K == "auto":
            out(
                f"draft_len auto: K and the proposal levels chosen per step from this machine's token-slot curve "
                f"(measured in {curve_s:.1f}s; `tidar profile` prints it) and the running acceptance"
            )
    return summary


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        summary = run_demo(args, out=print)
    except (ValueError, FileNotFoundError) as e:
        print(f"tidar demo: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1))
    if summary["identical"] is False:
        print("tidar demo: greedy TiDAR output differs from AR output", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_arguments", "bundled_model_dir", "run", "run_demo"]
