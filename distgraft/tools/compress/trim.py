"""``distgraft compress trim``: network trimming (Hu et al. 2016), prune -> retrain -> repeat.

Each round measures APoZ (the share of zeros of each channel's activation after the ReLU
that really follows its conv and BatchNorm) on the validation split of the checkpoint's
run (the held-out training images it never trained on, rebuilt from its config), takes the
``--layers-per-round`` layers with the highest mean APoZ, removes every channel of them
whose APoZ lies above the layer's mean + 1 std, and retrains the smaller network *from its
surviving weights* (Hu et al.: retraining from scratch gives worse networks with more
zeros) with ``distgraft train`` for ``--epochs`` epochs at a constant lr. It stops after
``--rounds`` rounds, or when validation accuracy has fallen more than ``--max-drop`` points
below the starting network's; the last round within the margin is the result. Test
accuracy is reported beside it and decides nothing.

OUT/round{r}/ holds each round's pruned start (pruned.pt) and training run (net0/...);
OUT/metrics.jsonl one ``trim`` event per round (params, FLOPs, validation accuracy and its
drop, test accuracy); OUT/trimmed.pt the
result. Under torchrun the retraining uses every process as a DDP replica of the one
network, and rank 0's pruning choice is broadcast so every replica prunes alike.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgraft.tools.compress.common import (
    CompressError,
    accuracy,
    guarded,
    open_checkpoint,
    save_step,
    validation_and_test,
    writable_folder,
)

__all__ = ["register", "trim_layers"]


def trim_layers(loaded: Any, loader: Any, per_round: int) -> tuple[dict, list[str], dict]:
    """(kept indices, trimmed layer names, mean APoZ per layer) of one round.

    The ``per_round`` layers with the highest mean APoZ lose their channels above the
    layer's mean + 1 std (Hu et al.); layers where that rule removes nothing are passed
    over for the next ones.
    """
    from distgraft.compress.criteria import apoz
    from distgraft.compress.prune import PruneSpec, select
    from distgraft.compress.structure import groups_of

    groups = [g for g in groups_of(loaded.model, loaded.input_shape) if g.default and g.act]
    values = apoz(loaded.model.to(loader.device), groups, loader)
    loaded.model.cpu()
    means = {name: float(v.mean()) for name, v in values.items()}
    spec = PruneSpec(dict.fromkeys(values, 0.0), "apoz", apoz_rule="std")
    keep = select([loaded.model], groups, spec, [values])
    by_apoz = sorted(means, key=means.get, reverse=True)
    chosen = [n for n in by_apoz if len(keep[n]) < len(values[n])][:per_round]
    return {n: keep[n] for n in chosen}, chosen, means


def _retrain(args: argparse.Namespace, loaded: Any, start: Path, rnd: int, info: Any) -> Path:
    """Train the pruned network ``start`` for the round; its final checkpoint."""
    from distgraft.train.run import open_telemetry, train

    cfg = loaded.config(args.data_root)
    cfg = _round_config(cfg, args, start, rnd)
    telemetry, collector = open_telemetry(cfg, info)
    try:
        train(cfg, info, telemetry)
    finally:
        telemetry.close()
        if collector is not None:
            collector.stop()
    return cfg.run_dir / "net0" / "last.pt"


def _round_config(cfg: Any, args: argparse.Namespace, start: Path, rnd: int) -> Any:
    from distgraft.config import with_overrides

    return with_overrides(
        cfg,
        run={"dir": str(args.out), "name": f"round{rnd}", "epochs": args.epochs,
             "resume": False, "eval_every": args.epochs},
        model={"init": str(start)},
        optim={"lr": args.lr, "schedule": "constant", "difflr": False},
        graft={"networks": 1},
        telemetry={"zmq": False, "console": not args.quiet},
    )  # fmt: skip


@dataclass(frozen=True)
class Round:
    """One row of the table and one ``trim`` event."""

    round: int
    layers: list[str]
    counts: Any
    val_acc: float
    """Accuracy on the validation split: what the --max-drop check compares."""
    test_acc: float
    """Accuracy on the test split: reported, decides nothing."""


def _event(out: Path, r: Round, drop: float) -> None:
    from distgraft.telemetry.sinks import JsonlSink, Telemetry
    from distgraft.telemetry.tensorboard import TensorBoardSink, tensorboard_available

    sinks: list = [JsonlSink(out / "metrics.jsonl")]
    if tensorboard_available():  # the rounds as TensorBoard curves, step = round
        sinks.append(TensorBoardSink(out / "tb" / "trim"))
    with Telemetry(sinks) as t:
        t.emit("trim", 0, r.round, round=r.round, layers=r.layers, params=r.counts.params,
               flops=r.counts.flops, val_acc=r.val_acc, acc_drop=drop,
               test_acc=r.test_acc)  # fmt: skip


def _table(rows: list[Round]) -> str:
    lines = [f"{'round':>5}  {'params':>11}  {'FLOPs':>13}  {'val acc':>8}  {'test acc':>8}  "
             "trimmed layers"]  # fmt: skip
    for r in rows:
        lines.append(f"{r.round:>5}  {r.counts.params:>11,}  {r.counts.flops:>13,}  "
                     f"{r.val_acc:>7.2f}%  {r.test_acc:>7.2f}%  "
                     f"{', '.join(r.layers) or '-'}")  # fmt: skip
    return "\n".join(lines)


def _measure(current: Any, rnd: int, layers: list[str], val: Any, test: Any, device) -> Round:
    from distgraft.compress.counting import count

    model = current.model.to(device)
    row = Round(rnd, layers, count(current.model, current.input_shape), accuracy(model, val),
                accuracy(model, test))  # fmt: skip
    current.model.cpu()
    return row


def run_trim(args: argparse.Namespace) -> int:
    from distgraft.comm.dist import broadcast_object, distributed
    from distgraft.compress.prune import apply_pruning, prune_edits
    from distgraft.compress.structure import groups_of
    from distgraft.files import copy_atomic

    if args.rounds < 1 or args.epochs < 1 or args.layers_per_round < 1:
        raise CompressError("--rounds, --epochs and --layers-per-round must be >= 1")
    out = writable_folder(Path(args.out))
    current = open_checkpoint(args.checkpoint)
    with distributed(1, "auto", 600.0) as info:
        val, test = validation_and_test(current, info.device, args.data_root,
                                        "APoZ and the accuracy check",
                                        quiet=not info.is_main)  # fmt: skip
        rows = [_measure(current, 0, [], val, test, info.device)]
        result = Path(args.checkpoint)
        for rnd in range(1, args.rounds + 1):
            keep, layers, _ = trim_layers(current, val, args.layers_per_round)
            keep, layers = broadcast_object((keep, layers), info)
            if not layers:
                print(f"round {rnd}: no channel above mean + std APoZ; stopping", flush=True)
                break
            groups = groups_of(current.model, current.input_shape)
            apply_pruning(current.model, groups, keep)
            start = out / f"round{rnd}" / "pruned.pt"
            if info.is_main:
                save_step(current, start, "pruned", prune_edits(keep), {"round": rnd})
            _sync(info)
            trained = _retrain(args, current, start, rnd, info)
            current = open_checkpoint(str(trained))
            rows.append(_measure(current, rnd, layers, val, test, info.device))
            drop = rows[0].val_acc - rows[-1].val_acc
            if info.is_main:
                _event(out, rows[-1], drop)
            if drop > args.max_drop:
                print(f"round {rnd}: validation accuracy {rows[-1].val_acc:.2f}% is more than "
                      f"{args.max_drop} points below the start ({rows[0].val_acc:.2f}%); "
                      f"keeping round {rnd - 1}", flush=True)  # fmt: skip
                break
            result = trained
        if info.is_main:
            copy_atomic(result, out / "trimmed.pt")
            print(_table(rows))
            print(f"result: {out / 'trimmed.pt'} (from {result})", file=sys.stdout)
    return 0


def _sync(info: Any) -> None:
    from distgraft.comm.dist import barrier

    barrier(info, 600.0, "the pruned checkpoint of this round")


def register(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "trim",
        help="network trimming: APoZ prune -> retrain -> repeat (Hu et al. 2016)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog="example:\n  distgraft compress trim runs/digits/net0/best.pt --rounds 3 "
        "--epochs 5 --out runs/digits_trim",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--out", metavar="DIR", help="folder of the trimming run")
    p.add_argument("--rounds", type=int, default=3, help="at most this many rounds (3)")
    p.add_argument("--epochs", type=int, default=5, help="retraining epochs per round (5)")
    p.add_argument("--lr", type=float, default=0.001, help="constant retraining lr (0.001)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="stop when validation accuracy falls more than this many points "
                        "(1.0)")
    p.add_argument("--layers-per-round", type=int, default=1,
                   help="trim the N layers with the highest mean APoZ per round (1)")
    p.add_argument("--data-root", help="override the checkpoint's data.root")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines while retraining")
    p.set_defaults(func=guarded(run_trim), needs_out=True)
