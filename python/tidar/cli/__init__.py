"""``tidar`` command line: ``tidar env``, ``tidar selftest``, ``tidar demo``, ``tidar train``, ``tidar profile``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "env": ("tidar.cli.env", "report the build, versions and live backends"),
    "selftest": ("tidar.cli.selftest", "check every live kernel backend against the reference"),
    "demo": ("tidar.cli.demo", "AR vs TiDAR greedy decoding on the bundled model"),
    "train": ("tidar.cli.train", "train a model with the TiDAR hybrid objective"),
    "profile": ("tidar.cli.profile", "token-slot curve, acceptance statistics and the draft length auto chooses"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tidar", description="TiDAR: think in diffusion, talk in autoregression")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        try:
            modules[name] = importlib.import_module(module)
        except ImportError as e:  # a subcommand whose module is missing says so when used
            p.set_defaults(_missing=f"tidar {name} is unavailable: {e}")
            continue
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(modules[args.command].run(args) or 0)
