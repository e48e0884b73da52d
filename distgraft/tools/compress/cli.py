"""``distgraft compress``: the command group, and its commands registered in help order.

Registration only. Each command lives in its own module of this package (``prune``,
``sensitivity``, ``trim``, ``magnitude``, ``lowrank``, ``info`` with ``presets``), shares
its helpers through ``common``, and calls the pure tensor code of ``distgraft.compress``;
no command module imports another. Imported by ``distgraft --help``, so none of them
imports torch before a command runs.
"""

from __future__ import annotations

import argparse

from distgraft.tools.compress import info, lowrank, magnitude, prune, sensitivity, trim

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="prune, trim, decompose or sparsify trained networks",
        description="Compression of trained networks: structured pruning (Li et al. 2017), "
        "network trimming by APoZ (Hu et al. 2016), sensitivity analysis, magnitude pruning "
        "(Han et al. 2015) and low-rank approximation (Wen et al. 2017). Outputs load with "
        "`distgraft train --model.init=OUT.pt` for fine-tuning.",
        epilog="Run `distgraft compress COMMAND --help` for the options of a command.",
    )
    cmds = p.add_subparsers(dest="compress_command", metavar="COMMAND", required=True)
    prune.register(cmds)
    sensitivity.register(cmds)
    trim.register(cmds)
    magnitude.register(cmds)
    lowrank.register(cmds)
    info.register(cmds)
