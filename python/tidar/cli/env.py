"""``tidar env``: what was built, which versions run, which backends are live."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from tidar_kernels import env

    report = env.report()
    print(json.dumps(report, indent=2, default=str) if args.json else env.format_report(report))
    return 0
