"""``distgraft compress lowrank``: cross-filter low-rank approximation (Wen et al. 2017).

Each conv W [N, C, k, k] is replaced by a basis conv of K filters and a 1x1 conv that
combines them into the N outputs (the original bias on it), K per layer from the
cumulative energy of the singular values of W as an N x Ckk matrix (``--energy``) or a
fixed fraction of the full rank (``--rank-ratio``). A layer whose decomposition would not
be smaller, and grouped (depthwise) convs, are left alone. The output is the compressed
checkpoint format: ``distgraft train --model.init=OUT.pt`` fine-tunes it.

Networks trained with Force Regularization (``regularize.force``) have filters that are
closer to each other, so the same energy keeps a lower rank: that is Wen et al.'s point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from distgraft.tools.compress.common import (
    CompressError,
    add_common_options,
    before_after,
    device_of,
    guarded,
    measure,
    open_checkpoint,
    save_step,
    test_loader,
    writable_file,
)

__all__ = ["register", "run_lowrank"]

EXAMPLES = """\
examples:
  distgraft compress lowrank runs/r56/net0/best.pt --energy 0.95 --out r56_lra.pt --eval
  distgraft compress lowrank CKPT --rank-ratio 0.5 --skip conv1 --out half.pt --json
  distgraft train --config configs/cifar10_resnet56.toml --model.init=r56_lra.pt \\
      --optim.lr=0.001 --optim.schedule=constant --run.epochs=20 --run.name=r56_lra_ft
"""


def _plans(args: argparse.Namespace, model: Any) -> list:
    from distgraft.compress.lowrank import plan_lowrank

    if (args.energy is None) == (args.rank_ratio is None):
        raise CompressError("give exactly one of --energy E (in (0, 1]) and --rank-ratio R")
    try:
        return plan_lowrank(model, energy=args.energy, rank_ratio=args.rank_ratio,
                            layers=args.layers or None, skip=args.skip)  # fmt: skip
    except ValueError as e:
        raise CompressError(str(e)) from e


def _layer_rows(plans: list) -> list[dict[str, Any]]:
    """Per conv: K, the rank the energy (or ratio) asked for, also of a conv kept whole;
    None for a grouped conv, which is never decomposed."""
    return [{"layer": p.name, "filters": p.n, "rank": None if p.reason == "grouped" else p.rank,
             "full_rank": p.full_rank, "decomposed": p.decomposed, "reason": p.reason}
            for p in plans]  # fmt: skip


def run_lowrank(args: argparse.Namespace) -> int:
    from distgraft.compress.lowrank import apply_lowrank, rank_ratio

    out = writable_file(Path(args.out))
    x = open_checkpoint(args.checkpoint)
    loader = test_loader(x, device_of(args.device), args.data_root) if args.eval else None
    plans = _plans(args, x.model)
    before = measure(x, x.model, args, loader)
    edits = apply_lowrank(x.model, plans)
    after = measure(x, x.model, args, loader)
    row = {"checkpoint": x.path, "out": str(out), "energy": args.energy,
           "rank_ratio": round(rank_ratio(plans), 4), **before_after(before, after),
           "acc_split": "test" if loader else None, "layers": _layer_rows(plans)}  # fmt: skip
    save_step(x, out, "lowrank", edits, row)
    _print(row, args.json)
    return 0


def _print(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(row))
        return
    print(f"{'layer':<28} {'N':>5} {'K':>5} {'K/N':>6}  note")
    for r in row["layers"]:
        if r["rank"] is None:
            print(f"{r['layer']:<28} {r['filters']:>5} {'-':>5} {'-':>6}  kept (grouped conv)")
            continue
        note = "" if r["decomposed"] else f"kept whole ({r['reason']})"
        print(f"{r['layer']:<28} {r['filters']:>5} {r['rank']:>5} "
              f"{r['rank'] / r['filters']:>6.2f}  {note}")  # fmt: skip
    print(f"rank ratio {row['rank_ratio']:.3f} (sum over the convs of K, or N where kept "
          "whole, / sum N)")  # fmt: skip
    for key in ("params", "flops", "latency_ms", "acc"):
        b, a = row.get(f"{key}_before"), row.get(f"{key}_after")
        label = f"acc ({row['acc_split']})" if key == "acc" else key
        if b is not None:
            print(f"{label:<11} {b:>14,.2f} -> {a:>14,.2f}" if isinstance(b, float)
                  else f"{label:<11} {b:>14,} -> {a:>14,}")  # fmt: skip
    print(f"wrote {row['out']}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lowrank",
        help="replace convs by a K-filter basis + 1x1 conv (Wen et al. 2017)",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--out", metavar="OUT.pt", help="the decomposed checkpoint to write")
    p.add_argument("--energy", type=float,
                   help="keep the singular values holding this fraction of the energy, (0, 1]")
    p.add_argument("--rank-ratio", type=float, help="keep this fraction of each full rank")
    p.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                   help="decompose only these convs (default: every conv whose decomposition "
                        "is smaller; grouped convs never)")
    p.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="convs left alone")
    add_common_options(p)
    p.set_defaults(func=guarded(run_lowrank), needs_out=True)
