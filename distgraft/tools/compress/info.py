"""``distgraft compress info`` (what a checkpoint holds) and ``distgraft compress presets``
(Li et al.'s Table 1 next to what the presets give)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from distgraft.tools.compress.common import guarded, open_checkpoint

__all__ = ["register", "run_info", "run_presets", "preset_rows", "printed"]


def run_info(args: argparse.Namespace) -> int:
    from distgraft.compress.archive import width_of
    from distgraft.compress.counting import count

    x = open_checkpoint(args.checkpoint)
    c = count(x.model, x.input_shape)
    edits: dict[str, int] = {}
    for e in x.arch.get("edits", []):
        edits[e["op"]] = edits.get(e["op"], 0) + 1
    nonzero = sum(int((p != 0).sum()) for p in x.model.parameters())
    info = {"checkpoint": x.path, "kind": x.state.get("kind", "train"),
            "model": x.arch["model"], "width": width_of(x.arch),
            "input_shape": list(x.input_shape), "edits": edits,
            "params": c.params, "paper_params": c.paper_params, "flops": c.flops,
            "nonzero_params": nonzero}  # fmt: skip
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:<15} {v:,}" if isinstance(v, int) else f"{k:<15} {v}")
    return 0


def printed(value: float, like: str) -> str:
    """``value`` in Li's notation (3.13E8), with as many digits as ``like`` shows."""
    digits = len(like.split("E")[0].replace(".", "")) - 1
    return f"{value:.{digits}E}".replace("E+0", "E").replace("E+", "E")


def preset_rows() -> list[dict[str, Any]]:
    """Each preset applied to a freshly built network, next to Li's Table 1."""
    from distgraft.compress.counting import count
    from distgraft.compress.names import PRESETS
    from distgraft.compress.presets import preset_ratios
    from distgraft.compress.prune import PruneSpec, apply_pruning, select
    from distgraft.compress.structure import groups_of
    from distgraft.models import build_model

    rows = []
    for name, p in PRESETS.items():
        model = build_model(p.model, 10)
        groups = groups_of(model, (3, 32, 32))
        before = count(model, (3, 32, 32))
        keep = select([model], groups, PruneSpec(preset_ratios(name, model, groups)))
        apply_pruning(model, groups, keep)
        after = count(model, (3, 32, 32))
        cut = before.reduction(after)
        f0, f1, fp, p0, p1, pp = p.table
        rows.append({"preset": name, "model": p.model, "flops_before": before.flops,
                     "flops_after": after.flops, "flops_reduction_pct": round(cut["flops"], 2),
                     "paper_params_before": before.paper_params,
                     "paper_params_after": after.paper_params,
                     "paper_params_reduction_pct": round(cut["paper_params"], 2),
                     "li_flops": [f0, f1, fp], "li_params": [p0, p1, pp],
                     "flops_printed": printed(after.flops, f1),
                     "params_printed": printed(after.paper_params, p1)})  # fmt: skip
    return rows


def run_presets(args: argparse.Namespace) -> int:
    rows = preset_rows()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'preset':<12} {'model':<10} {'FLOPs':>17} {'Li':>15} {'params':>16} {'Li':>14}")
    for r in rows:
        f0, f1, fp = r["li_flops"]
        p0, p1, pp = r["li_params"]
        print(f"{r['preset']:<12} {r['model']:<10} {r['flops_printed']:>7} "
              f"(-{r['flops_reduction_pct']:5.2f}%) {f1:>7} (-{fp:4.1f}%) "
              f"{r['params_printed']:>7} (-{r['paper_params_reduction_pct']:5.2f}%) "
              f"{p1:>6} (-{pp:4.1f}%)")  # fmt: skip
    print("FLOPs: multiply-accumulates of conv and linear layers for one 32x32 image; params: "
          "conv and linear weights and biases (Li et al. 2017, Table 1)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Two small commands: ``presets`` and ``info``."""
    p = sub.add_parser("presets", help="Li et al.'s Table 1 next to what the presets give")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=guarded(run_presets), needs_out=False)

    p = sub.add_parser("info", help="what a checkpoint holds: model, edits, params, FLOPs")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=guarded(run_info), needs_out=False)
