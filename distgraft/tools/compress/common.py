"""What the ``distgraft compress`` commands share: opening checkpoints, their data, measuring,
writing, and turning bad input into one line and exit code 2.

The commands (one module each) import this module and the library (``distgraft.compress``,
``distgraft.train.evaluate``, ``distgraft.train.data``), never each other. Nothing here
imports torch at module level: ``distgraft --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgraft.config import Config, ConfigError, config_from_toml

__all__ = [
    "CompressError",
    "usage_errors",
    "guarded",
    "Loaded",
    "open_checkpoint",
    "test_loader",
    "accuracy",
    "device_of",
    "out_paths",
    "measure",
    "before_after",
    "save_step",
    "floats",
    "add_common_options",
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


def save_step(loaded: Loaded, out: Path, kind: str, edits: list[dict], report: dict) -> None:
    """Write ``loaded.model`` with ``edits`` appended to its arch record."""
    from distgraft.compress.archive import save_compressed

    arch = {**loaded.arch, "edits": [*loaded.arch.get("edits", []), *edits]}
    report = {k: v for k, v in report.items() if k != "layers"}
    save_compressed(out, loaded.model, arch, kind=kind, config=loaded.state.get("config", ""),
                    report=report, source=loaded.path)  # fmt: skip


def floats(text: str) -> list[float]:
    """argparse type of ``0.6,0.3,0.1``."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}") from e


def add_common_options(p: argparse.ArgumentParser, evaluate: bool = True) -> None:
    """--json, --device, --data-root, --latency-batch (and --eval) of the one-shot commands."""
    p.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (latency, data)")
    p.add_argument("--data-root", help="override the checkpoint's data.root (CIFAR, ImageNet)")
    p.add_argument("--latency-batch", type=int, default=0, metavar="B",
                   help="also time the forward pass of a batch of B images before and after "
                        "(median of 20)")  # fmt: skip
    if evaluate:
        p.add_argument("--eval", action="store_true",
                       help="also measure test accuracy before and after (no retraining)")
