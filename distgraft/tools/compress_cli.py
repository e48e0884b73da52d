"""``distgraft compress``: prune, trim, decompose and sparsify trained networks.

Every subcommand reads checkpoints written by ``distgraft train`` (whose config names the
model and the dataset) or by another ``distgraft compress`` step, and writes the
compressed-checkpoint format of ``distgraft.compress.archive``, which ``distgraft train
--model.init=OUT.pt`` fine-tunes. Bad input (an unknown layer, a ratio outside [0, 1), a
model family the removal cannot handle, a checkpoint of another model, pruning every filter
of a layer) stops with exit code 2 and a message, before anything is written.

The work itself is pure tensor code in ``distgraft.compress``; this module adds files,
data, timing and printing, and ``tools/sensitivity.py`` and ``tools/trim.py`` the parts
that need processes or training.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgraft.config import Config, ConfigError, config_from_toml

__all__ = [
    "register",
    "Loaded",
    "open_checkpoint",
    "CompressError",
    "usage_errors",
    "guarded",
    "save_step",
]


class CompressError(ValueError):
    """A usage problem of ``distgraft compress`` (exit code 2)."""


def usage_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input, not a bug: printed as one line, exit code 2."""
    from distgraft.compress.archive import CheckpointError
    from distgraft.compress.prune import PruneError
    from distgraft.compress.structure import UnsupportedModel
    from distgraft.train.data import DataError

    return (CompressError, CheckpointError, PruneError, UnsupportedModel, ConfigError, DataError)


@dataclass
class Loaded:
    """A checkpoint opened for compression."""

    path: str
    state: dict[str, Any]
    arch: dict[str, Any]
    model: Any
    """The rebuilt nn.Module, on the CPU, in eval mode."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.arch["input_shape"])

    def config(self, data_root: str | None = None) -> Config:
        """The training config stored in the checkpoint (data.root overridden if given)."""
        text = self.state.get("config")
        if not isinstance(text, str) or not text:
            raise CompressError(f"{self.path}: no training config inside; cannot find its data")
        return config_from_toml(text, [f"data.root={data_root}"] if data_root else [])


def open_checkpoint(path: str) -> Loaded:
    from distgraft.compress.archive import arch_of, build, read_checkpoint, weights_of

    state = read_checkpoint(path)
    arch = arch_of(state)
    model = build(arch)
    model.load_state_dict(weights_of(state), strict=True)
    return Loaded(path, state, arch, model.eval())


def test_loader(loaded: Loaded, device: Any, data_root: str | None):
    """The held-out (test) split of the checkpoint's dataset, on ``device``."""
    from distgraft.train.data import build_data

    cfg = loaded.config(data_root)
    return build_data(cfg.data, device, seed=0, split_seed=cfg.run.seed).test


def accuracy(model: Any, loader: Any) -> float:
    from distgraft.train.evaluate import accuracy as evaluate_accuracy

    return evaluate_accuracy(model, loader)


def device_of(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {name}: CUDA is not available here; use cpu")
    return torch.device(name)


def out_paths(out: str, n: int) -> list[Path]:
    """One output per input checkpoint: '{i}' in OUT becomes 0, 1, ... with several."""
    if n == 1:
        return [Path(out.replace("{i}", "0"))]
    if "{i}" not in out:
        raise CompressError(f"{n} checkpoints need an --out with '{{i}}' (e.g. pruned{{i}}.pt)")
    return [Path(out.replace("{i}", str(i))) for i in range(n)]


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


def measure(loaded: Loaded, model: Any, args: argparse.Namespace, loader: Any) -> dict:
    """Params, paper params, FLOPs, and latency / accuracy when asked."""
    from distgraft.compress.counting import count, latency_ms

    c = count(model, loaded.input_shape)
    out: dict[str, Any] = {"params": c.params, "paper_params": c.paper_params, "flops": c.flops}
    if getattr(args, "latency_batch", 0):
        device = device_of(args.device)
        out["latency_ms"] = latency_ms(model.to(device), loaded.input_shape,
                                       args.latency_batch, device)  # fmt: skip
        model.cpu()
    if loader is not None:
        out["acc"] = accuracy(model.to(loader.device), loader)
        model.cpu()
    return out


def before_after(before: dict, after: dict) -> dict[str, Any]:
    """The flat JSON of a compression step: X_before, X_after for every measured X."""
    row: dict[str, Any] = {}
    for key in before:
        row[f"{key}_before"] = before[key]
        row[f"{key}_after"] = after.get(key)
    for key in ("params", "paper_params", "flops"):
        b, a = before[key], after[key]
        row[f"{key}_reduction_pct"] = round(100.0 * (b - a) / b, 2) if b else 0.0
    return row


def print_summary(row: dict[str, Any], out: Path) -> None:
    def fmt(key: str, scale: str = "") -> str:
        b, a = row.get(f"{key}_before"), row.get(f"{key}_after")
        if b is None:
            return ""
        if isinstance(b, float):
            return f"{key:<13} {b:>12.2f} -> {a:>12.2f}\n"
        pct = row.get(f"{key}_reduction_pct")
        tail = f"  (-{pct:.2f}%)" if pct is not None else ""
        return f"{key:<13} {b:>12,} -> {a:>12,}{tail}\n"

    text = "".join(fmt(k) for k in ("params", "paper_params", "flops", "latency_ms", "acc"))
    sys.stdout.write(text + f"wrote {out}\n")


# -- prune --------------------------------------------------------------------------------


def _ratios(args: argparse.Namespace, loaded: Loaded, groups: list) -> dict[str, float]:
    from distgraft.compress.presets import preset_ratios
    from distgraft.compress.prune import layer_ratios

    if args.preset:
        if args.ratio is not None or args.stage_ratios or args.layers:
            raise CompressError("--preset sets the ratios; drop --ratio/--stage-ratios/--layers")
        return preset_ratios(args.preset, loaded.model, groups)
    rule = args.criterion == "invalid" or (args.criterion == "apoz" and args.apoz_rule == "std")
    ratio = 0.0 if rule and args.ratio is None else args.ratio
    if ratio is None and not args.stage_ratios:
        raise CompressError("nothing to prune: give --preset, --ratio or --stage-ratios")
    ratios = layer_ratios(groups, ratio, args.layers, args.stage_ratios, args.skip)
    if rule:  # a threshold rule decides per layer; the ratio only names the layers
        ratios = dict.fromkeys(ratios, 0.0)
    return ratios


def _layer_rows(groups: list, keep: dict, numbers: dict[str, int]) -> list[dict]:
    return [
        {"layer": g.name, "number": numbers.get(g.name), "stage": g.stage,
         "filters": g.channels, "kept": len(keep[g.name]) if g.name in keep else g.channels}
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
        print(f"{r['layer']:<28} {number:>5} {r['stage']:>5} {r['filters']:>8} {r['kept']:>6}")


def run_prune(args: argparse.Namespace) -> int:
    from distgraft.compress.criteria import apoz
    from distgraft.compress.prune import PruneSpec, apply_pruning, prune_edits, select
    from distgraft.compress.structure import groups_of

    loaded = [open_checkpoint(p) for p in args.checkpoints]
    same_architecture(loaded)
    outs = [] if args.list_layers else out_paths(args.out, len(loaded))
    first = loaded[0]
    groups = groups_of(first.model, first.input_shape)
    numbers = _numbers(first.model, groups)
    if args.list_layers:
        print_layers(_layer_rows(groups, {}, numbers), f"prunable layers of {first.path}:")
        return 0
    spec = PruneSpec(_ratios(args, first, groups), args.criterion, args.strategy,
                     args.threshold, args.apoz_rule)  # fmt: skip
    loader = None
    if args.eval or args.criterion == "apoz":
        loader = test_loader(first, device_of(args.device), args.data_root)
    measured = None
    if args.criterion == "apoz":
        measured = [apoz(x.model.to(loader.device), [g for g in groups if g.name in spec.ratios],
                         loader) for x in loaded]  # fmt: skip
    keep = select([x.model.cpu() for x in loaded], groups, spec, measured)
    rows = []
    for x, out in zip(loaded, outs, strict=True):
        before = measure(x, x.model, args, loader if args.eval else None)
        apply_pruning(x.model, groups, keep)
        after = measure(x, x.model, args, loader if args.eval else None)
        row = {"checkpoint": x.path, "out": str(out), "criterion": args.criterion,
               **before_after(before, after),
               "layers": _layer_rows(groups, keep, numbers)}  # fmt: skip
        save_step(x, out, "pruned", prune_edits(keep), row)
        rows.append(row)
    _report(args, rows)
    return 0


def save_step(loaded: Loaded, out: Path, kind: str, edits: list[dict], report: dict) -> None:
    """Write ``loaded.model`` with ``edits`` appended to its arch record."""
    from distgraft.compress.archive import save_compressed

    arch = {**loaded.arch, "edits": [*loaded.arch.get("edits", []), *edits]}
    report = {k: v for k, v in report.items() if k != "layers"}
    save_compressed(out, loaded.model, arch, kind=kind, config=loaded.state.get("config", ""),
                    report=report, source=loaded.path)  # fmt: skip


def _report(args: argparse.Namespace, rows: list[dict]) -> None:
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        if "layers" in row:
            print_layers([r for r in row["layers"] if r["kept"] != r["filters"]],
                         f"{row['checkpoint']}: pruned layers")  # fmt: skip
        print_summary(row, Path(row["out"]))


# -- presets ------------------------------------------------------------------------------


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


# -- info ---------------------------------------------------------------------------------


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


# -- the command line ---------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from e


def _common(p: argparse.ArgumentParser, evaluate: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (latency, data)")
    p.add_argument("--data-root",
                   help="override the checkpoint's data.root (CIFAR, Fashion-MNIST, ImageNet)")
    p.add_argument("--latency-batch", type=int, default=0, metavar="B",
                   help="also time the forward pass of a batch of B images before and after "
                        "(median of 20)")  # fmt: skip
    if evaluate:
        p.add_argument("--eval", action="store_true",
                       help="also measure test accuracy before and after (no retraining)")


PRUNE_EXAMPLES = """\
examples:
  distgraft compress prune runs/r56/net0/best.pt --preset resnet56-b --out r56b.pt
  distgraft compress prune CKPT --ratio 0.5 --layers conv2 conv3 --criterion l2 --out p.pt
  distgraft compress prune CKPT --stage-ratios 0.6,0.3,0.1 --skip layer1.7.conv1 --out p.pt
  distgraft compress prune CKPT --criterion apoz --apoz-rule std --out trimmed.pt
  distgraft compress prune runs/g/net0/last.pt runs/g/net1/last.pt --ratio 0.3 \\
      --out 'runs/g/pruned{i}.pt'      # one shared choice: the networks stay graftable
  distgraft compress prune CKPT --list-layers
then fine-tune (Li et al.: constant lr 0.001, 40 epochs on CIFAR):
  torchrun --nproc-per-node 2 -m distgraft train --config CONFIG \\
      --model.init='runs/g/pruned{network}.pt' --optim.lr=0.001 --optim.schedule=constant \\
      --run.epochs=40 --run.name=NAME
"""


def _add_prune(sub: argparse._SubParsersAction) -> None:
    from distgraft.compress.names import CRITERIA, PRESETS, STRATEGIES

    p = sub.add_parser(
        "prune",
        help="remove filters for real (Li et al. 2017; APoZ of Hu et al. 2016)",
        description="Prune filters of trained networks and remove them with their feature "
        "maps, BatchNorm channels and the next layers' input kernels: the network gets "
        "smaller and faster. Presets: "
        + "; ".join(f"{k}: {v.note}" for k, v in PRESETS.items()),
        epilog=PRUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoint(s) of one architecture; several are pruned alike")
    p.add_argument("--out", metavar="OUT.pt", help="where to write ('{i}' with several)")
    how = p.add_argument_group("what to prune")
    how.add_argument("--preset", choices=sorted(PRESETS), help="a network of Li's Table 1")
    how.add_argument("--ratio", type=float, help="fraction of filters to remove, in [0, 1)")
    how.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                     help="layers --ratio applies to (default: every prunable layer)")
    how.add_argument("--stage-ratios", type=_floats, default=[], metavar="R1,R2,...",
                     help="one ratio per stage (feature-map size), e.g. 0.6,0.3,0.1")
    how.add_argument("--skip", nargs="+", default=[], metavar="LAYER", help="layers left alone")
    how.add_argument("--criterion", choices=CRITERIA, default="l1",
                     help="l1 (Li), l2, entropy (grafting's), apoz (Hu; needs the data), "
                          "invalid (L1 below --threshold)")
    how.add_argument("--strategy", choices=STRATEGIES, default="independent",
                     help="greedy ignores kernels of already removed input maps (Li 3.2)")
    how.add_argument("--threshold", type=float, default=0.01,
                     help="invalid: L1 norm below which a filter goes (default 0.01)")
    how.add_argument("--apoz-rule", choices=("ratio", "std"), default="ratio",
                     help="apoz: remove the --ratio highest, or all above mean + std (Hu)")
    how.add_argument("--list-layers", action="store_true",
                     help="print the prunable layers (Li's numbers, stages, filters) and exit")
    _common(p)
    p.set_defaults(func=guarded(run_prune), needs_out=True)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="Li et al.'s Table 1 next to what the presets give")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=guarded(run_presets), needs_out=False)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a checkpoint holds: model, edits, params, FLOPs")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=guarded(run_info), needs_out=False)


def guarded(fn):
    """Bad input -> one line on stderr and exit code 2; nothing half-written."""

    def run(args: argparse.Namespace) -> int:
        listing = getattr(args, "list_layers", False)
        if getattr(args, "needs_out", False) and not args.out and not listing:
            print(f"distgraft compress {args.compress_command}: error: --out is required",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            return fn(args)
        except usage_errors() as e:
            print(f"distgraft compress {args.compress_command}: error: {e}", file=sys.stderr)
            return 2

    return run


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
    _add_prune(cmds)
    tools = ("sensitivity", "trim", "magnitude", "lowrank")
    for module in (f"distgraft.tools.{name}" for name in tools):
        __import__(module, fromlist=["register"]).register(cmds)
    _add_presets(cmds)
    _add_info(cmds)

