"""``tidar env``: what was built, which versions run, which backends are live."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from tidar_kernels import env

    report = env.report()
    report["hf_direct_body"] = _direct_body()
    report["hf_cpu_packed"] = _cpu_packed()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        d, p = report["hf_direct_body"], report["hf_cpu_packed"]
        print(env.format_report({k: v for k, v in report.items() if not k.startswith("hf_")}))
        print(
            f"HF decoder body: direct for {', '.join(d['families'])} where proven per model, else the modules "
            f"({'on' if d['on'] else 'off'}; {d['switch']})"
        )
        state = "on" if p["on"] else f"off: {p['why']}"
        print(f"CPU projections and LM head on oneDNN-packed float32 weights: {state} ({p['switch']})")
    return 0


def _cpu_packed() -> dict:
    """The direct body's packed CPU projections (``tidar.hf.cpu_packed``): live or why not, and the switch."""
    from tidar.hf import cpu_packed

    return {"on": cpu_packed.enabled(), "why": cpu_packed.off_reason(), "switch": f"{cpu_packed.ENV}=0 turns it off"}


def _direct_body() -> dict:
    """The HF layer's direct decoder body (``tidar.hf.direct_body``): its families and its switch."""
    from tidar.hf import direct_body

    families = sorted(f.name for f in direct_body.FAMILIES.values())
    return {"on": direct_body.enabled(), "families": families, "switch": f"{direct_body.ENV}=0 turns it off"}
