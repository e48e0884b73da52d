"""``distgraft`` command line: one subcommand per module, each registering itself.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand -> module; imported lazily so `distgraft --help` does not import torch.
COMMANDS = {
    "train": "distgraft.train.cli",
    "monitor": "distgraft.telemetry.monitor",
    "analyze": "distgraft.tools.analyze",
    "report": "distgraft.tools.report",
    "compare": "distgraft.tools.compare",
    "compress": "distgraft.tools.compress.cli",
    "export": "distgraft.tools.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distgraft",
        description="Distributed filter grafting (Meng et al., CVPR 2020) for PyTorch: "
        "N networks train in parallel processes and graft each other's weights "
        "over a ring at every epoch boundary.",
        epilog="Run `distgraft COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
