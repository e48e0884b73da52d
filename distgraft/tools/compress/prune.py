"""``distgraft compress prune``: remove filters for real (Li et al. 2017; APoZ of Hu et al. 2016).

Reads checkpoints written by ``distgraft train`` (whose config names the model and the
dataset) or by another ``distgraft compress`` step, and writes the compressed-checkpoint
format of ``distgraft.compress.archive``, which ``distgraft train --model.init=OUT.pt``
fine-tunes. Bad input (an unknown layer, a ratio outside [0, 1), a model family the removal
cannot handle, a checkpoint of another model, pruning every filter of a layer) stops with
exit code 2 and a message, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from distgraft.tools.compress.common import (
    CompressError,
    Loaded,
    add_common_options,
    before_after,
    device_of,
    floats,
    guarded,
    measure,
    open_checkpoint,
    out_paths,
    save_step,
    test_loader,
    validation_and_test,
)

__all__ = ["register", "run_prune"]

EXAMPLES = """\
examples:
  distgraft compress prune runs/r56/net0/best.pt --preset resnet56-b --out r56b.pt
  distgraft compress prune CKPT --ratio 0.5 --layers conv2 conv3 --criterion l2 --out p.pt
  distgraft compress prune CKPT --stage-ratios 0.6,0.3,0.1 --skip layer1.7.conv1 --out p.pt
  distgraft compress prune CKPT --criterion apoz --apoz-rule std --out trimmed.pt
  distgraft compress prune CKPT --criterion invalid --threshold 0.01 --out p.pt
  distgraft compress prune runs/g/net0/last.pt runs/g/net1/last.pt --ratio 0.3 \\
      --out 'runs/g/pruned{i}.pt'      # one shared choice: the networks stay graftable
  distgraft compress prune CKPT --list-layers
then fine-tune (Li et al.: constant lr 0.001, 40 epochs on CIFAR):
  torchrun --nproc-per-node 2 -m distgraft train --config CONFIG \\
      --model.init='runs/g/pruned{network}.pt' --optim.lr=0.001 --optim.schedule=constant \\
      --run.epochs=40 --run.name=NAME
"""


def same_architecture(loaded: list[Loaded]) -> None:
    first = loaded[0]
    for other in loaded[1:]:
        a = {k: tuple(v.shape) for k, v in first.model.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in other.model.state_dict().items()}
        if first.arch["model"] != other.arch["model"] or a != b:
            raise CompressError(
                f"{other.path} holds a different network than {first.path} (its base model "
                f"or layer shapes differ); prune checkpoints of one architecture together"
            )


def _ratios(args: argparse.Namespace, loaded: Loaded, groups: list) -> dict[str, float]:
    from distgraft.compress.presets import preset_ratios
    from distgraft.compress.prune import layer_ratios

    if args.preset:
        if args.ratio is not None or args.stage_ratios or args.layers:
            raise CompressError("--preset sets the ratios; drop --ratio/--stage-ratios/--layers")
        return preset_ratios(args.preset, loaded.model, groups)
    if _threshold_rule(args):
        return _rule_layers(args, groups)
    if args.ratio is None and not args.stage_ratios:
        raise CompressError("nothing to prune: give --preset, --ratio or --stage-ratios")
    return layer_ratios(groups, args.ratio, args.layers, args.stage_ratios, args.skip)


def _threshold_rule(args: argparse.Namespace) -> bool:
    """invalid (L1 below --threshold) and Hu's APoZ rule decide per layer, not by a ratio."""
    return args.criterion == "invalid" or (args.criterion == "apoz" and args.apoz_rule == "std")


def _rule_layers(args: argparse.Namespace, groups: list) -> dict[str, float]:
    """The layers a threshold rule looks at: --layers, else every default prunable layer
    (what --list-layers marks), less --skip. Their ratio is unused (0)."""
    from distgraft.compress.prune import layer_ratios

    if args.ratio is not None or args.stage_ratios:
        rule = ("--criterion invalid removes every filter below --threshold"
                if args.criterion == "invalid" else
                "--apoz-rule std removes every channel above mean + std APoZ")  # fmt: skip
        raise CompressError(f"{rule} (a threshold rule, per layer): --ratio and --stage-ratios "
                            "do not apply; choose layers with --layers or --skip")  # fmt: skip
    layer_ratios(groups, None, args.layers, (), args.skip)  # unknown names fail here
    chosen = args.layers or [g.name for g in groups if g.default]
    return {name: 0.0 for name in chosen if name not in args.skip}


def _layer_rows(groups: list, keep: dict, numbers: dict[str, int]) -> list[dict]:
    return [
        {"layer": g.name, "number": numbers.get(g.name), "stage": g.stage,
         "filters": g.channels, "kept": len(keep[g.name]) if g.name in keep else g.channels,
         "default": g.default}
        for g in groups
    ]  # fmt: skip


def _numbers(model: Any, groups: list) -> dict[str, int]:
    from distgraft.compress.presets import layer_numbers
    from distgraft.compress.prune import PruneError

    try:
        return layer_numbers(model, groups)
    except PruneError:
        return {}


def print_layers(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'layer':<28} {'Li #':>5} {'stage':>5} {'filters':>8} {'kept':>6}")
    for r in rows:
        number = "" if r["number"] is None else r["number"]
        named = "" if r.get("default", True) else "  (only when named: a residual stream)"
        print(f"{r['layer']:<28} {number:>5} {r['stage']:>5} {r['filters']:>8} "
              f"{r['kept']:>6}{named}")  # fmt: skip


def print_summary(row: dict[str, Any], out: Path) -> None:
    def fmt(key: str) -> str:
        b, a = row.get(f"{key}_before"), row.get(f"{key}_after")
        if b is None:
            return ""
        if isinstance(b, float):
            return f"{key:<13} {b:>12.2f} -> {a:>12.2f}\n"
        pct = row.get(f"{key}_reduction_pct")
        tail = f"  (-{pct:.2f}%)" if pct is not None else ""
        return f"{key:<13} {b:>12,} -> {a:>12,}{tail}\n"

    text = "".join(fmt(k) for k in ("params", "paper_params", "flops", "latency_ms"))
    if row.get("acc_before") is not None:
        label = f"acc ({row['acc_split']})"
        text += f"{label:<13} {row['acc_before']:>12.2f} -> {row['acc_after']:>12.2f}\n"
    sys.stdout.write(text + f"wrote {out}\n")


def run_prune(args: argparse.Namespace) -> int:
    from distgraft.compress.criteria import apoz
    from distgraft.compress.prune import PruneSpec, apply_pruning, prune_edits, select
    from distgraft.compress.structure import groups_of

    outs = [] if args.list_layers else out_paths(args.out, len(args.checkpoints))
    loaded = [open_checkpoint(p) for p in args.checkpoints]
    same_architecture(loaded)
    first = loaded[0]
    groups = groups_of(first.model, first.input_shape)
    numbers = _numbers(first.model, groups)
    if args.list_layers:
        print_layers(_layer_rows(groups, {}, numbers), f"prunable layers of {first.path}:")
        return 0
    spec = PruneSpec(_ratios(args, first, groups), args.criterion, args.strategy,
                     args.threshold, args.apoz_rule)  # fmt: skip
    chosen = [g for g in groups if g.name in spec.ratios]
    val, test = _loaders(args, first, chosen)
    measured = None
    if val is not None:  # APoZ: measured on the validation split, for every network
        measured = [apoz(x.model.to(val.device), chosen, val) for x in loaded]
    keep = select([x.model.cpu() for x in loaded], groups, spec, measured)
    rows = []
    for x, out in zip(loaded, outs, strict=True):
        before = measure(x, x.model, args, test)
        apply_pruning(x.model, groups, keep)
        after = measure(x, x.model, args, test)
        row = {"checkpoint": x.path, "out": str(out), "criterion": args.criterion,
               **before_after(before, after), "acc_split": "test" if test else None,
               "layers": _layer_rows(groups, keep, numbers)}  # fmt: skip
        save_step(x, out, "pruned", prune_edits(keep), row)
        rows.append(row)
    _report(args, rows)
    return 0


def _loaders(args: argparse.Namespace, first: Loaded, chosen: list) -> tuple[Any, Any]:
    """(validation split for APoZ or None, test split for --eval or None)."""
    if args.criterion != "apoz":
        device = device_of(args.device)
        return None, test_loader(first, device, args.data_root) if args.eval else None
    streams = [g.name for g in chosen if g.act is None]
    if streams:
        raise CompressError(f"APoZ is not defined for {', '.join(streams)}: the channels of a "
                            "residual stream are a sum, not the output of one activation; use "
                            "a weight criterion (l1, l2, entropy)")  # fmt: skip
    val, test = validation_and_test(first, device_of(args.device), args.data_root, "APoZ")
    return val, test if args.eval else None


def _report(args: argparse.Namespace, rows: list[dict]) -> None:
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        if "layers" in row:
            print_layers([r for r in row["layers"] if r["kept"] != r["filters"]],
                         f"{row['checkpoint']}: pruned layers")  # fmt: skip
        print_summary(row, Path(row["out"]))


def register(sub: argparse._SubParsersAction) -> None:
    from distgraft.compress.names import CRITERIA, PRESETS, STRATEGIES

    p = sub.add_parser(
        "prune",
        help="remove filters for real (Li et al. 2017; APoZ of Hu et al. 2016)",
        description="Prune filters of trained networks and remove them with their feature "
        "maps, BatchNorm channels and the next layers' input kernels: the network gets "
        "smaller and faster. Presets: "
        + "; ".join(f"{k}: {v.note}" for k, v in PRESETS.items()),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoint(s) of one architecture; several are pruned alike")
    p.add_argument("--out", metavar="OUT.pt", help="where to write ('{i}' with several)")
    how = p.add_argument_group("what to prune")
    how.add_argument("--preset", choices=sorted(PRESETS), help="a network of Li's Table 1")
    how.add_argument("--ratio", type=float, help="fraction of filters to remove, in [0, 1)")
    how.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                     help="layers --ratio (or a threshold rule) applies to; default: every "
                          "layer --list-layers shows, except the residual streams of "
                          "torchvision ResNets (led by the stem conv or a downsample conv), "
                          "which are pruned only when named")
    how.add_argument("--stage-ratios", type=floats, default=[], metavar="R1,R2,...",
                     help="one ratio per stage (feature-map size), e.g. 0.6,0.3,0.1")
    how.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="layers left alone")
    how.add_argument("--criterion", choices=CRITERIA, default="l1",
                     help="l1 (Li), l2, entropy (grafting's), apoz (Hu; measured on the "
                          "validation split of the checkpoint's run), invalid (every filter "
                          "with L1 below --threshold)")
    how.add_argument("--strategy", choices=STRATEGIES, default="independent",
                     help="greedy ignores kernels of already removed input maps (Li 3.2)")
    how.add_argument("--threshold", type=float, default=0.01,
                     help="invalid: L1 norm below which a filter goes (default 0.01)")
    how.add_argument("--apoz-rule", choices=("ratio", "std"), default="ratio",
                     help="apoz: remove the --ratio highest, or every channel above the "
                          "layer's mean + std (Hu; no --ratio)")
    how.add_argument("--list-layers", action="store_true",
                     help="print the prunable layers (Li's numbers, stages, filters) and exit")
    add_common_options(p)
    p.set_defaults(func=guarded(run_prune), needs_out=True)
