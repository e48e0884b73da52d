"""``distgraft analyze CKPT [CKPT ...]``: information and invalid filters of checkpoints.

Grafting exists to revive *invalid* filters (filters whose L1 norm is near zero and so
contribute nothing) and to raise the information (entropy) of each layer. This command
measures both on saved checkpoints, side by side, so a grafted run can be compared with
its baseline layer by layer. It reuses the criteria of ``distgraft.graft.entropy``, so the
numbers are the ones the grafting itself computes.

Checkpoints are read with ``weights_only=True``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily so `distgraft --help` stays fast
    from torch import Tensor

__all__ = ["AnalyzeError", "load_state", "conv_layers", "analyze", "render", "register", "run"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class AnalyzeError(Exception):
    """A checkpoint is missing, unreadable or does not match the others: exit code 2."""


def load_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state_dict of a checkpoint: ``{"model": state_dict, ...}`` or a bare state_dict."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise AnalyzeError(f"{p}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AnalyzeError(f"{p}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    state = obj.get("model") if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise AnalyzeError(
            f"{p}: not a checkpoint (expected a state_dict or a dict with key 'model')"
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = str(key)
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        out[name] = value
    return out


def conv_layers(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """Conv weights in state order: floating 4-D (Conv2d) and 3-D (Conv1d) ``*weight``."""
    return [
        (k, v)
        for k, v in state.items()
        if k.endswith("weight") and v.dim() in (3, 4) and v.is_floating_point()
    ]


def _signature(layers: list[tuple[str, Tensor]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in layers]


def _check_same(first: Path, ref: list, path: Path, sig: list) -> None:
    for (ka, sa), (kb, sb) in zip(ref, sig, strict=False):
        if ka != kb:
            raise AnalyzeError(
                f"{path} does not match {first}: first differing layer is {ka!r} "
                f"(vs {kb!r} in {path})"
            )
        if sa != sb:
            raise AnalyzeError(
                f"{path} does not match {first}: layer {ka!r} has shape {list(sb)} "
                f"(vs {list(sa)} in {first})"
            )
    if len(ref) != len(sig):
        longer, name = (first, ref) if len(ref) > len(sig) else (path, sig)
        key = name[min(len(ref), len(sig))][0]
        raise AnalyzeError(
            f"{path} does not match {first}: layer {key!r} exists only in {longer} "
            f"({len(ref)} vs {len(sig)} conv layers)"
        )


def analyze(
    paths: list[str | os.PathLike[str]],
    thresholds: tuple[float, ...] = (0.1, 0.01),
    bins: int = 10,
) -> dict[str, Any]:
    """Per conv layer and checkpoint: entropy, mean |w|, invalid filters per threshold.

    Returns a JSON-ready dict: ``layers`` (name, shape, filters, and per checkpoint
    ``entropy``, ``l1``, ``invalid`` with one count per threshold) and ``totals`` (per
    checkpoint: ``filters`` and ``invalid`` per threshold).
    """
    from distgraft.graft.entropy import filter_l1, layer_entropies, layer_l1

    if not paths:
        raise AnalyzeError("no checkpoint given")
    if bins < 2:
        raise AnalyzeError(f"--bins must be >= 2, got {bins}")
    per_ckpt: list[list[tuple[str, Tensor]]] = []
    ref: list = []
    for path in paths:
        layers = conv_layers(load_state(path))
        if not layers:
            raise AnalyzeError(f"{path}: no conv layers (3-D or 4-D floating '*weight' tensors)")
        if per_ckpt:
            _check_same(Path(paths[0]), ref, Path(path), _signature(layers))
        else:
            ref = _signature(layers)
        per_ckpt.append(layers)

    rows = [
        {"name": k, "shape": list(v.shape), "filters": int(v.shape[0]), "stats": []}
        for k, v in per_ckpt[0]
    ]
    totals = []
    for path, layers in zip(paths, per_ckpt, strict=True):
        weights = [v for _, v in layers]
        try:
            ent = layer_entropies(weights, bins).tolist()
            l1 = layer_l1(weights).tolist()
            fl1 = [filter_l1(w) for w in weights]
        except ValueError as e:  # NaN / Inf weights
            raise AnalyzeError(f"{path}: {e}") from e
        invalid_total = [0] * len(thresholds)
        for row, h, m, f in zip(rows, ent, l1, fl1, strict=True):
            invalid = [int((f < t).sum()) for t in thresholds]
            invalid_total = [a + b for a, b in zip(invalid_total, invalid, strict=True)]
            row["stats"].append({"entropy": h, "l1": m, "invalid": invalid})
        totals.append({"filters": sum(r["filters"] for r in rows), "invalid": invalid_total})
    return {
        "checkpoints": [str(p) for p in paths],
        "thresholds": list(thresholds),
        "bins": bins,
        "layers": rows,
        "totals": totals,
    }


def _labels(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def render(result: dict[str, Any]) -> str:
    """The text table: rows per layer, a column group per checkpoint, a totals row."""
    th = [f"<{t:g}" for t in result["thresholds"]]
    name_w = max([len("layer")] + [len(r["name"]) for r in result["layers"]])
    shape_w = max([len("shape")] + [len("x".join(map(str, r["shape"]))) for r in result["layers"]])
    total_filters = result["totals"][0]["filters"] if result["totals"] else 0
    inv_w = max([len(t) for t in th] + [len(f"{total_filters}/{total_filters}")])
    group_cols = ["entropy", "mean|w|", *th]
    widths = [7, 9] + [inv_w] * len(th)

    def group(cells: list[str]) -> str:
        return " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))

    group_w = len(group(group_cols))
    head1 = " " * (name_w + shape_w + 2 + 8)
    for label in _labels(result["checkpoints"]):
        head1 += f" | {label[-group_w:]:^{group_w}}"
    head2 = f"{'layer':<{name_w}} {'shape':<{shape_w}} {'filters':>8}"
    head2 += f" | {group(group_cols)}" * len(result["checkpoints"])
    lines = [head1.rstrip(), head2, "-" * len(head2)]
    for r in result["layers"]:
        shape = "x".join(map(str, r["shape"]))
        line = f"{r['name']:<{name_w}} {shape:<{shape_w}} {r['filters']:>8}"
        for st in r["stats"]:
            cells = [f"{st['entropy']:.4f}", f"{st['l1']:.3g}", *map(str, st["invalid"])]
            line += " | " + group(cells)
        lines.append(line)
    lines.append("-" * len(head2))
    line = f"{'total':<{name_w}} {'':<{shape_w}} {total_filters:>8}"
    for tot in result["totals"]:
        cells = ["", "", *(f"{n}/{tot['filters']}" for n in tot["invalid"])]
        line += " | " + group(cells)
    lines.append(line)
    lines.append(
        f"entropy: histogram entropy of the whole layer ({result['bins']} bins, nats); "
        f"mean|w|: mean absolute weight; {', '.join(th)}: filters whose L1 norm is below"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        result = analyze(args.checkpoints, tuple(args.thresholds), args.bins)
    except AnalyzeError as e:
        print(f"distgraft analyze: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0


def register(sub: Any) -> None:
    """Add the ``analyze`` command to the ``distgraft`` CLI."""
    p = sub.add_parser(
        "analyze",
        help="entropy, L1 and invalid filters of checkpoints, side by side",
        description="Per conv layer of each checkpoint: whole-layer histogram entropy, mean "
        "|w|, and the number of invalid filters (L1 norm below each threshold), with "
        "totals. Checkpoints must have the same conv layers.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (.pt)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument(
        "--thresholds",
        nargs="+",
        type=float,
        default=[0.1, 0.01],
        metavar="T",
        help="L1 thresholds for invalid filters (default: 0.1 0.01)",
    )
    p.add_argument("--bins", type=int, default=10, help="histogram bins (default 10)")
    p.set_defaults(func=run)
