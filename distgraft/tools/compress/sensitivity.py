"""``distgraft compress sensitivity``: Li et al.'s Figure 2 for one or several networks.

Every prunable layer is pruned alone at ratios 10%..90% and the network evaluated without
retraining, on the validation split of the checkpoint's run (rebuilt from its config: the
held-out training images it never trained on; a run without one is evaluated on the
default number of its training images, and says so). Under torchrun the (checkpoint,
layer) pairs are dealt round-robin to the ranks and the results gathered on rank 0, so 8
GPUs finish 8x sooner; the result does not depend on the number of ranks. Several
checkpoints (say a grafted and a baseline network of the same run) are analysed in one go
and drawn side by side: does grafting make a network more or less prunable?

Writes OUT/sensitivity.csv (one row per checkpoint, layer and ratio), OUT/sensitivity.json
and OUT/sensitivity.png (one panel per stage and checkpoint, one curve per layer).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distgraft.tools.compress.common import (
    CompressError,
    Loaded,
    accuracy,
    decided_on,
    floats,
    guarded,
    has_validation_split,
    open_checkpoint,
    validation_loader,
    writable_folder,
)

__all__ = ["register", "Row", "analyse", "write_csv", "plot"]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Row:
    """One point of one curve."""

    checkpoint: str
    """Label of the checkpoint (--labels, or its path)."""
    layer: str
    position: int
    """Place of the layer among the checkpoint's prunable layers, in forward order."""
    number: int | None
    """Li's layer number (CIFAR ResNets, VGG), else None."""
    stage: int
    filters: int
    ratio: float
    kept: int
    accuracy: float
    """Accuracy (%) on ``split`` with the layer pruned."""
    baseline: float
    """Accuracy of the unpruned network."""
    split: str = "val"
    """val: the run's held-out images; train: training images standing in for them (the
    run had no validation split)."""


def _structure(x: Loaded, layers: list[str]) -> tuple[list, dict[str, int]]:
    """The groups to analyse in ``x`` (unknown layer names fail) and Li's layer numbers."""
    from distgraft.compress.presets import layer_numbers
    from distgraft.compress.prune import PruneError, layer_ratios
    from distgraft.compress.structure import groups_of

    groups = groups_of(x.model, x.input_shape)
    layer_ratios(groups, 0.0, layers)  # raises on a name this network does not have
    try:
        numbers = layer_numbers(x.model, groups)
    except PruneError:
        numbers = {}
    return [g for g in groups if (g.name in layers if layers else g.default)], numbers


def analyse(
    loaded: list[Loaded],
    labels: list[str],
    ratios: list[float],
    layers: list[str],
    criterion: str,
    device: Any,
    data_root: str | None,
    rank: int = 0,
    world: int = 1,
) -> list[Row]:
    """This rank's share of the rows: pairs ``rank``, ``rank + world``, ... of the task list.

    The checkpoints may hold different networks (a pruned one next to its original): each
    is analysed with its own layers.
    """
    from distgraft.compress.sensitivity import layer_curve

    structures = [_structure(x, layers) for x in loaded]
    tasks = [(c, i, g) for c, (groups, _) in enumerate(structures) for i, g in enumerate(groups)]
    rows: list[Row] = []
    loaders: dict[int, Any] = {}
    for c, i, g in tasks[rank::world]:
        x = loaded[c]
        if c not in loaders:
            loaders[c] = validation_loader(x, device, data_root, "sensitivity", quiet=True)
            x.model.to(device)
        base = accuracy(x.model, loaders[c])
        curve = layer_curve(x.model, g, ratios, lambda m, c=c: accuracy(m, loaders[c]), criterion)
        number = structures[c][1].get(g.name)
        split = "val" if has_validation_split(x) else "train"
        rows += [Row(labels[c], g.name, i, number, g.stage, g.channels, p.ratio, p.kept,
                     p.accuracy, base, split) for p in curve]  # fmt: skip
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    fields = list(asdict(rows[0])) if rows else [f for f in Row.__dataclass_fields__]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot(rows: list[Row], path: Path) -> None:
    """One panel per (stage, checkpoint), one curve per layer, like Li's Figure 2(b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpts = list(dict.fromkeys(r.checkpoint for r in rows))
    stages = sorted({r.stage for r in rows})
    fig, axes = plt.subplots(len(stages), len(ckpts), squeeze=False, sharex=True, sharey="row",
                             figsize=(4.2 * len(ckpts), 3.0 * len(stages)))  # fmt: skip
    for i, stage in enumerate(stages):
        for j, ckpt in enumerate(ckpts):
            ax = axes[i][j]
            mine = [r for r in rows if r.stage == stage and r.checkpoint == ckpt]
            layers = list(dict.fromkeys(r.layer for r in mine))
            cmap = plt.get_cmap("viridis")
            for k, layer in enumerate(layers):
                pts = sorted((r for r in mine if r.layer == layer), key=lambda r: r.ratio)
                base = pts[0].baseline if pts else 0.0
                label = f"#{pts[0].number}" if pts and pts[0].number else layer
                ax.plot([0] + [100 * r.ratio for r in pts], [base] + [r.accuracy for r in pts],
                        marker=".", color=cmap(k / max(1, len(layers) - 1)), label=label)
            ax.set_title(f"{ckpt}: stage {stage}", fontsize=9)
            ax.grid(alpha=0.3)
            if len(layers) <= 12:
                ax.legend(fontsize=6, ncol=2)
            if i == len(stages) - 1:
                ax.set_xlabel("filters pruned away (%)")
            if j == 0:
                ax.set_ylabel("validation accuracy (%)")
    fig.suptitle("Sensitivity to pruning each layer alone (no retraining)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[Row]) -> list[str]:
    """Mean accuracy over layers at each ratio, one column per checkpoint."""
    ckpts = list(dict.fromkeys(r.checkpoint for r in rows))
    ratios = sorted({r.ratio for r in rows})
    splits = {"val": "validation split", "train": "training images"}
    used = ", ".join(splits[s] for s in dict.fromkeys(r.split for r in rows))
    lines = [f"mean accuracy (%) over the layers, on the {used}",
             "ratio  " + "  ".join(f"{c[-24:]:>24}" for c in ckpts)]  # fmt: skip
    for p in ratios:
        cells = []
        for c in ckpts:
            accs = [r.accuracy for r in rows if r.checkpoint == c and r.ratio == p]
            cells.append(f"{sum(accs) / len(accs):>24.2f}" if accs else f"{'-':>24}")
        lines.append(f"{p:5.2f}  " + "  ".join(cells))
    return lines


def run_sensitivity(args: argparse.Namespace) -> int:
    from distgraft.comm.dist import distributed, gather_objects

    if args.labels and len(args.labels) != len(args.checkpoints):
        raise CompressError(f"{len(args.labels)} labels for {len(args.checkpoints)} checkpoints")
    if any(not (0 < r < 1) for r in args.ratios):
        raise CompressError(f"ratios must lie in (0, 1), got {args.ratios}")
    out = writable_folder(Path(args.out))
    loaded = [open_checkpoint(p) for p in args.checkpoints]
    labels = args.labels or args.checkpoints
    with distributed(0, "auto", args.timeout) as info:
        device = info.device if args.device == "auto" else args.device
        mine = analyse(loaded, labels, args.ratios, args.layers, args.criterion, device,
                       args.data_root, info.rank, info.world_size)  # fmt: skip
        every = gather_objects(mine, info, args.timeout, "the sensitivity results")
        if info.rank != 0:
            return 0
    for x in loaded:  # rank 0 may not have evaluated every checkpoint itself
        print(decided_on(x, "sensitivity"), file=sys.stderr, flush=True)
    rows = _in_order([r for part in every for r in part], labels)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sensitivity.csv")
    (out / "sensitivity.json").write_text(json.dumps([asdict(r) for r in rows]) + "\n")
    plot(rows, out / "sensitivity.png")
    if args.json:
        print(json.dumps({"rows": len(rows), "out": str(out), "ranks": info.world_size}))
    else:
        print("\n".join(summary(rows)))
        print(f"wrote {out / 'sensitivity.csv'}, {out / 'sensitivity.png'} ({len(rows)} rows, "
              f"{info.world_size} rank(s))", file=sys.stdout)  # fmt: skip
    return 0


def _in_order(rows: list[Row], labels: list[str]) -> list[Row]:
    """Rows by checkpoint, then layer in forward order (the ranks' order is lost), then ratio."""
    return sorted(rows, key=lambda r: (labels.index(r.checkpoint), r.position, r.ratio))


def register(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "sensitivity",
        help="prune each layer alone at 10..90%% and evaluate (Li et al. Fig. 2)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog="examples:\n"
        "  distgraft compress sensitivity runs/r56/net0/best.pt --out runs/r56/sens\n"
        "  torchrun --nproc-per-node 2 -m distgraft compress sensitivity \\\n"
        "      runs/graft/net0/best.pt runs/base/net0/best.pt --labels grafted baseline \\\n"
        "      --out runs/sens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--out", metavar="DIR", help="folder for the CSV, JSON and PNG")
    p.add_argument("--labels", nargs="+", default=[], help="one name per checkpoint")
    p.add_argument("--ratios", type=floats, default=list(DEFAULT_RATIOS), metavar="R,R,...",
                   help="fractions of filters to prune (default 0.1,...,0.9)")
    p.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                   help="only these layers (default: every layer `compress prune "
                        "--list-layers` shows, except the residual streams of torchvision "
                        "ResNets, led by the stem conv or a downsample conv)")
    p.add_argument("--criterion", choices=("l1", "l2", "entropy"), default="l1",
                   help="which filters go first (Li: smallest L1)")
    p.add_argument("--device", default="auto", help="auto (each rank's own) | cpu | cuda")
    p.add_argument("--data-root", help="override the checkpoints' data.root")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the slowest rank's results")
    p.add_argument("--json", action="store_true", help="print a JSON line instead of a table")
    p.set_defaults(func=guarded(run_sensitivity), needs_out=True)
