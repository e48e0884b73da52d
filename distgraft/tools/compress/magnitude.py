"""``distgraft compress magnitude``: magnitude pruning (Han et al. 2015) of a trained network.

Two uses. One shot: ``--quality Q`` (threshold = Q x std of each layer's weights) or
``--sparsity S`` prunes a dense checkpoint; ``distgraft train --model.init=OUT.pt`` then
retrains the survivors with the zeros held (the mask travels in the file). Conversion: a
checkpoint of a run that pruned while training (``compress.method = "magnitude"``) already
holds its masks; without --quality/--sparsity they are taken as they are. Either way the
output is the sparse checkpoint format (bitmask + kept values per layer), whose size on
disk shows the compression; it restores the dense weights bit for bit.

``--remove-dead`` removes units that pruning left without inputs or without outputs
(structured: the layers get narrower), exactly: outputs do not change.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from distgraft.tools.compress.common import (
    CompressError,
    Loaded,
    accuracy,
    add_common_options,
    device_of,
    guarded,
    open_checkpoint,
    test_loader,
    writable_file,
)

__all__ = ["register", "run_magnitude"]

EXAMPLES = """\
examples:
  distgraft compress magnitude runs/lenet/net0/best.pt --quality 1.0 --out q1.pt --eval
  distgraft train --config configs/digits_lenet300.toml --model.init=q1.pt \\
      --optim.lr=0.01 --optim.schedule=constant --run.epochs=20 --run.name=retrain
  distgraft compress magnitude runs/digits_lenet300_han/net0/last.pt --remove-dead \\
      --out lenet_sparse.pt --eval          # a run that pruned while training
"""


def _masks(args: argparse.Namespace, x: Loaded):
    """The masks: computed now (--quality/--sparsity), else the checkpoint's own."""
    from distgraft.compress.magnitude import Masks, masks_of_sparse, prunable_weights, prune_masks

    previous = None
    if x.state.get("masks"):
        previous = Masks(x.state["masks"])
    elif "sparse" in x.state:
        previous = masks_of_sparse(x.state["sparse"])
    if args.quality is None and args.sparsity is None:
        if previous is None:
            raise CompressError(f"{x.path} holds no pruning masks; give --quality or --sparsity")
        return previous
    try:
        keys = prunable_weights(x.model, args.layers, not args.prune_first, args.skip)
    except ValueError as e:
        raise CompressError(str(e)) from e
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise CompressError(f"--sparsity {args.sparsity:g} is outside [0, 1)")
    if args.quality is not None and not args.quality >= 0:
        raise CompressError(f"--quality {args.quality:g} must be >= 0")
    return prune_masks(x.model, keys, quality=args.quality, sparsity=args.sparsity,
                       previous=previous)  # fmt: skip


def _file_bytes(state: dict[str, Any]) -> int:
    """Bytes of ``state`` saved with torch.save (to compare dense and sparse on disk)."""
    import torch

    fd, name = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, name)
        return os.path.getsize(name)
    finally:
        os.unlink(name)


def _layer_rows(total: dict[str, int], masks) -> list[dict[str, Any]]:
    """Per layer: connections kept (after any dead-unit removal) of the original total."""
    kept = {c.name: c.kept for c in masks.counts()}
    return [{"layer": k, "kept": kept[k], "total": n, "sparsity": round(1 - kept[k] / n, 4)}
            for k, n in total.items()]  # fmt: skip


def _dead(x: Loaded, masks) -> tuple[list[dict], list[dict]]:
    """Remove dead units; (report rows, prune edits)."""
    from distgraft.compress.magnitude import remove_dead
    from distgraft.compress.prune import prune_edits
    from distgraft.compress.structure import groups_of

    groups = groups_of(x.model, x.input_shape)
    report, keep = remove_dead(x.model, masks, groups)
    rows = [{"layer": d.layer, "units": d.units, "no_inputs": len(d.no_inputs),
             "no_outputs": len(d.no_outputs), "removed": len(d.removed)}
            for d in report if d.no_inputs or d.no_outputs]  # fmt: skip
    return rows, prune_edits(keep)


def run_magnitude(args: argparse.Namespace) -> int:
    from distgraft.compress.archive import save_compressed
    from distgraft.compress.counting import count
    from distgraft.compress.magnitude import encode_sparse

    out = writable_file(Path(args.out))
    x = open_checkpoint(args.checkpoint)
    loader = test_loader(x, device_of(args.device), args.data_root) if args.eval else None
    dense_bytes = _file_bytes({k: v for k, v in x.model.state_dict().items()})
    params_before = count(x.model, x.input_shape).params
    acc_before = accuracy(x.model.to(loader.device), loader) if loader else None
    masks = _masks(args, x)
    x.model.cpu()
    masks.apply_(x.model)
    total = {c.name: c.total for c in masks.counts()}
    dead, edits = _dead(x, masks) if args.remove_dead else ([], [])
    arch = {**x.arch, "edits": [*x.arch.get("edits", []), *edits]}
    sparse = encode_sparse(x.model.state_dict(), masks)
    layers = _layer_rows(total, masks)
    weights, kept = sum(total.values()), sum(r["kept"] for r in layers)
    row: dict[str, Any] = {
        "checkpoint": x.path, "out": str(out), "compression": round(weights / max(kept, 1), 3),
        "weights": weights, "weights_kept": kept,
        "params_before": params_before, "params_after": count(x.model, x.input_shape).params,
        "dense_bytes": dense_bytes, "acc_before": acc_before,
        "acc_after": accuracy(x.model.to(loader.device), loader) if loader else None,
        "acc_split": "test" if loader else None, "layers": layers, "dead_units": dead,
    }  # fmt: skip
    x.model.cpu()
    report = {k: v for k, v in row.items() if k != "layers"}
    save_compressed(out, None, arch, kind="sparse", config=x.state.get("config", ""),
                    report=report, source=x.path, sparse=sparse)  # fmt: skip
    row["sparse_bytes"] = os.path.getsize(out)  # the file itself (it cannot hold its own size)
    _print(row, args.json)
    return 0


def _print(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(row))
        return
    print(f"{'layer':<20} {'kept':>8} {'total':>8} {'sparsity':>9}")
    for r in row["layers"]:
        print(f"{r['layer']:<20} {r['kept']:>8,} {r['total']:>8,} {100 * r['sparsity']:>8.2f}%")
    for d in row["dead_units"]:
        print(f"dead units of {d['layer']}: {d['no_inputs']} without inputs, "
              f"{d['no_outputs']} without outputs, {d['removed']} of {d['units']} removed")
    print(f"weights {row['weights']:,} -> {row['weights_kept']:,}: "
          f"{row['compression']:.1f}x fewer connections")  # fmt: skip
    print(f"on disk {row['dense_bytes']:,} B dense weights -> {row['sparse_bytes']:,} B sparse "
          "checkpoint")  # fmt: skip
    if row["acc_before"] is not None:
        print(f"{row['acc_split']} accuracy {row['acc_before']:.2f} -> {row['acc_after']:.2f} "
              "(no retraining)")  # fmt: skip
    print(f"wrote {row['out']}")


def register(sub: argparse._SubParsersAction) -> None:
    from distgraft.compress.names import MAGNITUDE_LAYERS

    p = sub.add_parser(
        "magnitude",
        help="prune small weights, write a sparse checkpoint (Han et al. 2015)",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--out", metavar="OUT.pt", help="the sparse checkpoint to write")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--quality", type=float,
                     help="threshold = QUALITY x std of each layer's weights (Han's rule)")
    how.add_argument("--sparsity", type=float, help="fraction of each layer's weights removed")
    p.add_argument("--layers", choices=MAGNITUDE_LAYERS, default="conv+linear",
                   help="which weights are pruned (biases never)")
    p.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="layers left alone")
    p.add_argument("--prune-first", action="store_true",
                   help="also prune the first conv (skipped by default: the most sensitive)")
    p.add_argument("--remove-dead", action="store_true",
                   help="remove units left without inputs or outputs (narrower layers)")
    add_common_options(p)
    p.set_defaults(func=guarded(run_magnitude), needs_out=True)
