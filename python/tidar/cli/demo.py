"""``tidar demo``: the bundled TiDAR model completes held-out code prompts twice, with plain AR greedy
decoding (Hugging Face ``generate`` on the unpatched model) and with TiDAR greedy decoding (one forward
drafts with diffusion and verifies autoregressively), shows the texts are identical and compares
tokens per forward and tokens/s. Exits 1 if a greedy TiDAR text differs from the AR text. A repetition penalty
(``--repetition-penalty``, default the model folder's demo setting) is HF's logits processor on both sides: TiDAR
verifies against the processed scores (the patched ``model.generate``), so the texts stay identical.

    tidar demo                       # bundled model, its held-out prompts, 64 new tokens, K from the config
    tidar demo --prompt "def fib(n):" --draft-len 8 --json
    tidar demo --repetition-penalty 1.2       # HF's repetition penalty on both sides: the bundled model writes code
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

BUNDLED_NAME = "tidar-python-tiny"
PROMPTS_FILE = "demo_prompts.json"
# Used when the model folder has no demo_prompts.json: short openings of held-out-style code.
FALLBACK_PROMPTS = [
    'def read_config(path):\n    """Read a key = value file into a dict."""\n    result = {}\n',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def bundled_model_dir() -> Path:
    """The bundled model: ``$TIDAR_MODEL``, else ``models/tidar-python-tiny`` of the source tree (editable
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
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="HF's repetition penalty (> 0; 1 = off), applied to AR and TiDAR alike (TiDAR verifies against the "
        "processed scores, so greedy texts stay identical); default: the model folder's demo setting, else 1",
    )
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


def _demo_file(model_dir) -> dict:
    f = Path(model_dir) / PROMPTS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _prompts(args, model_dir):
    if args.prompt:
        return list(args.prompt)
    return list(_demo_file(model_dir).get("prompts") or FALLBACK_PROMPTS)


def _repetition_penalty(args, model_dir) -> float:
    """``--repetition-penalty``, else the model folder's ``repetition_penalty`` demo setting (a tiny model's greedy
    text loops; its card says which penalty makes it write code), else 1 (off)."""
    rp = args.repetition_penalty
    if rp is None:
        rp = _demo_file(model_dir).get("repetition_penalty", 1.0)
    if not isinstance(rp, (int, float)) or not rp > 0:
        raise ValueError(f"--repetition-penalty must be a number > 0 (1 = off), got {rp!r}")
    return float(rp)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _streamer(tokenizer, enabled):
    if not enabled:
        return None
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True)


class _Demo:
    """The demo's model, tokenizer and settings, and its two ways to decode: HF ``generate`` on the unpatched model
    (AR) and ``tidar.generate`` on the patched one."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_dir = Path(args.model) if args.model else bundled_model_dir()
        self.model, self.tok = _load(self.model_dir, self.device)
        self.K = args.draft_len or "auto"
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        self.greedy = args.temperature == 0
        self.stream = not args.json
        self.eos = self.tok.eos_token_id
        self.prompts = _prompts(args, self.model_dir)
        self.penalty = _repetition_penalty(args, self.model_dir)
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("prompts must be non-empty strings")
        self.gen = torch.Generator(self.device).manual_seed(args.seed)

    def ids(self, prompt: str) -> torch.Tensor:
        return self.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)

    def use_tidar(self):  # not timed: patching runs a probe forward
        import tidar

        tidar.patch(self.model, draft_len=self.K)

    def use_ar(self):
        import tidar

        if tidar.is_patched(self.model):
            tidar.unpatch(self.model)

    def _hf_generate(self, ids, n, streamer=None, **extra):
        """HF ``generate`` on the model as it stands (unpatched: AR; patched: TiDAR's drop-in) with the demo's
        decoding options: greedy or plain sampling at the temperature, and the repetition penalty."""
        t = self.args.temperature
        kw = dict(do_sample=False) if self.greedy else dict(do_sample=True, temperature=t, top_k=0, top_p=1.0)
        if self.penalty != 1.0:
            kw["repetition_penalty"] = self.penalty
        return self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            eos_token_id=self.eos,
            pad_token_id=self.tok.pad_token_id,
            streamer=streamer,
            **kw,
            **extra,
        )

    def ar_generate(self, ids, n, streamer=None):
        return self._hf_generate(ids, n, streamer)

    def tidar_generate(self, ids, n, streamer=None):
        import tidar

        if self.penalty != 1.0:  # HF's processor: the patched model.generate verifies against HF's processed scores
            return self._hf_generate(ids, n, streamer, generator=None if self.greedy else self.gen, tidar_stats=True)
        return tidar.generate(
            self.model,
            ids,
            max_new_tokens=n,
            temperature=self.args.temperature,
            eos_token_id=self.eos,
            generator=None if self.greedy else self.gen,
            streamer=streamer,
        )

    def timed(self, fn, *a, **kw):
        """``(result, seconds)`` of one call, the device synchronised before and after."""
        _sync(self.device)
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        _sync(self.device)
        return result, time.perf_counter() - t0


WARM_UP_PROMPT = "import os\n\n\ndef main(argv=None):\n"  # decoded before the timings, never shown
WARM_UP_TOKENS = 32  # per side, on a prompt that is not timed: enough steps for the planner's step clock to learn


def _warm_up(demo: _Demo):
    """First-call overheads out of the timings, and the token-slot curve (measured once per model, device and dtype:
    the auto draft length's costs). Both sides decode ``WARM_UP_TOKENS`` tokens of a prompt that is not timed, so
    what each first call pays once per process (allocations, kernels' first use; for TiDAR the decode steps' own
    clock, ``tidar/decode/step_costs.py``, which prices a plan after it ran a few times) is out of the timings, as
    it is in the benchmarks. Returns ``(curve, seconds measuring it)``."""
    from tidar.decode.slot_timing import slot_curve

    warm = demo.ids(WARM_UP_PROMPT)
    demo.use_ar()
    demo.ar_generate(warm, WARM_UP_TOKENS)
    demo.use_tidar()
    t0 = time.perf_counter()
    curve = slot_curve(demo.model)
    curve_s = time.perf_counter() - t0
    demo.tidar_generate(warm, WARM_UP_TOKENS)
    return curve, curve_s


def _compare_prompt(demo: _Demo, i: int, prompt: str, out) -> dict:
    """One prompt decoded by AR and by TiDAR (timed, streamed unless --json); the comparison as a dict."""
    n, stream, eos = demo.args.max_new_tokens, demo.stream, demo.eos
    ids = demo.ids(prompt)
    if stream:
        out(f"\n=== prompt {i + 1}/{len(demo.prompts)} ===\n{prompt}", end="")
        out("\n--- AR (Hugging Face generate) ---")
        sys.stdout.flush()
    demo.use_ar()
    ar_seq, t_ar = demo.timed(demo.ar_generate, ids, n, _streamer(demo.tok, stream))
    ar_new = ar_seq[0, ids.shape[1] :].tolist()
    if ar_new and eos in ar_new:
        ar_new = ar_new[: ar_new.index(eos) + 1]
    if stream:
        out("--- TiDAR ---")
        sys.stdout.flush()
    demo.use_tidar()
    res, t_td = demo.timed(demo.tidar_generate, ids, n, _streamer(demo.tok, stream))
    td_new = res.new_tokens[0]
    r = {
        "prompt": prompt,
        "ar_text": demo.tok.decode(ar_new),
        "tidar_text": demo.tok.decode(td_new),
        "identical": ar_new == td_new if demo.greedy else None,
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
    if stream:
        verdict = {True: "identical to AR", False: "DIFFERS from AR", None: "(sampling: not compared)"}[r["identical"]]
        out(
            f"--- {verdict}: {r['new_tokens']} tokens in {r['forwards']} forwards = "
            f"{r['tokens_per_forward']:.2f} tokens/forward; "
            f"accepted lengths {dict(sorted(res.accepted_histogram.items()))}; K used {r['draft_lens']}; "
            f"draft sources {res.draft_sources}; "
            f"tokens/s AR {r['ar_tokens_per_s']:.1f} vs TiDAR {r['tidar_tokens_per_s']:.1f}"
        )
    return r


def _summary(demo: _Demo, results: list, hist_all: Counter, curve, curve_s: float) -> dict:
    tokens = sum(r["new_tokens"] for r in results)
    forwards = sum(r["forwards"] for r in results)
    ar_tokens = sum(r["ar_new_tokens"] for r in results)
    ar_time = sum(r["ar_new_tokens"] / r["ar_tokens_per_s"] for r in results)
    td_time = sum(r["new_tokens"] / r["tidar_tokens_per_s"] for r in results)
    args = demo.args
    return {
        "model": str(demo.model_dir),
        "device": str(demo.device),
        "draft_len": demo.K,
        "temperature": args.temperature,
        "repetition_penalty": demo.penalty,
        "max_new_tokens": args.max_new_tokens,
        "identical": all(r["identical"] for r in results) if demo.greedy else None,
        "tokens_per_forward": tokens / forwards,
        "accepted_histogram": {str(k): v for k, v in sorted(hist_all.items())},
        "ar_tokens_per_s": ar_tokens / ar_time,
        "tidar_tokens_per_s": tokens / td_time,
        "speedup": (tokens / td_time) / (ar_tokens / ar_time),
        "slot_curve_ms": dict(zip(curve.tokens, curve.body_ms)),
        "slot_curve_measured_s": round(curve_s, 3),
        "prompts": results,
    }


def _print_summary(demo: _Demo, summary: dict, hist_all: Counter, curve_s: float, out) -> None:
    out(f"\n=== summary over {len(summary['prompts'])} prompts ===")
    if demo.greedy:
        out("TiDAR text identical to AR text on every prompt: " + ("yes" if summary["identical"] else "NO"))
    out(f"TiDAR tokens per forward: {summary['tokens_per_forward']:.2f} (AR: 1.00)")
    out(f"accepted-length histogram (a: steps): {dict(sorted(hist_all.items()))}")
    out(
        f"tokens/s on {demo.device}: AR {summary['ar_tokens_per_s']:.1f}, TiDAR {summary['tidar_tokens_per_s']:.1f} "
        f"({summary['speedup']:.2f}x)"
    )
    if demo.K == "auto":
        out(
            f"draft_len auto: K and the proposal levels chosen per step from this machine's token-slot curve "
            f"(measured in {curve_s:.1f}s; `tidar profile` prints it) and the running acceptance"
        )


def run_demo(args, out=print) -> dict:
    """The demo: warm-up and slot curve, every prompt decoded by AR and by TiDAR, the summary."""
    demo = _Demo(args)
    curve, curve_s = _warm_up(demo)
    if demo.stream:
        a = demo.args
        out(
            f"model {demo.model_dir} ({sum(p.numel() for p in demo.model.parameters()) / 1e6:.2f}M params) on "
            f"{demo.device}; draft_len {demo.K}; {'greedy' if demo.greedy else f'temperature {a.temperature}'}; "
            f"{a.max_new_tokens} new tokens"
            + (
                f"; repetition penalty {demo.penalty:g} (HF's processor, in AR and TiDAR alike)"
                if demo.penalty != 1
                else ""
            )
        )
    results = [_compare_prompt(demo, i, prompt, out) for i, prompt in enumerate(demo.prompts)]
    hist_all = Counter()  # the TiDAR runs' accepted lengths, summed over the prompts (the warm-up left out)
    for r in results:
        hist_all.update({int(k): v for k, v in r["accepted_histogram"].items()})
    summary = _summary(demo, results, hist_all, curve, curve_s)
    if demo.stream:
        _print_summary(demo, summary, hist_all, curve_s, out)
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
