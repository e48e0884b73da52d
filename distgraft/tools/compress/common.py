"""What the ``distgraft compress`` commands share: opening checkpoints, their data, measuring,
writing, and turning bad input into one line and exit code 2.

The commands (one module each) import this module and the library (``distgraft.compress``,
``distgraft.train.evaluate``, ``distgraft.train.data``), never each other. Nothing here
imports torch at module level: ``distgraft --help`` imports every command module.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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
    "validation_loader",
    "validation_and_test",
    "has_validation_split",
    "decided_on",
    "accuracy",
    "device_of",
    "out_paths",
    "writable_file",
    "writable_folder",
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
    """The test split of the checkpoint's dataset, on ``device``: for reports (``--eval``),
    never for decisions."""
    from distgraft.train.data import build_data

    cfg = loaded.config(data_root)
    return build_data(cfg.data, device, seed=0, split_seed=cfg.run.seed).test


def validation_loader(
    loaded: Loaded, device: Any, data_root: str | None, what: str, quiet: bool = False
):
    """The images every decision is taken on (APoZ, trimming's accuracy check, sensitivity).

    The validation split of the checkpoint's run, rebuilt from its stored config: the same
    run seed holds out the same images, which the run never trained on. A run without one
    (``data.val_size = 0``, or written before the split existed) trained on every training
    image; the dataset's default validation size is held out then. One line on stderr
    (unless ``quiet``: the other ranks) says which images ``what`` is decided on, and that
    the network has seen them when it has.
    """
    return validation_and_test(loaded, device, data_root, what, quiet)[0]


def validation_and_test(
    loaded: Loaded, device: Any, data_root: str | None, what: str, quiet: bool = False
):
    """(validation, test) loaders of the checkpoint's dataset, built once (see
    ``validation_loader``): one to decide on, one to report."""
    from distgraft.config import with_overrides
    from distgraft.train.data import build_data

    cfg = loaded.config(data_root)
    trained_on_all = not has_validation_split(loaded)
    if trained_on_all:
        cfg = with_overrides(cfg, data={"val_size": -1})
    data = build_data(cfg.data, device, seed=0, split_seed=cfg.run.seed)
    if not quiet:
        print(decided_on(loaded, what, data.info.val_size), file=sys.stderr, flush=True)
    if data.val is None:
        raise CompressError(f"{loaded.path}: {cfg.data.name} has too few training images to "
                            f"hold out a validation split for {what}")  # fmt: skip
    return data.val, data.test


def decided_on(loaded: Loaded, what: str, n: int | None = None) -> str:
    """The line that says which ``n`` images ``what`` is decided on."""
    if has_validation_split(loaded):
        count = f"{n}" if n is not None else "its"
        return (f"distgraft compress: {what} on the validation split of {loaded.path} "
                f"({count} held-out training images)")  # fmt: skip
    why = "data.val_size = 0" if _stored_val_size(loaded) == 0 else "written before it existed"
    count = f"{n} of its training images" if n is not None else "its training images"
    return (f"distgraft compress: note: {loaded.path} was trained without a validation split "
            f"({why}): {what} uses {count} (as many as the default validation split holds), "
            "which it trained on")  # fmt: skip


def has_validation_split(loaded: Loaded) -> bool:
    """Whether the checkpoint's run held out validation images it never trained on."""
    return _stored_val_size(loaded) not in (None, 0)


def _stored_val_size(loaded: Loaded) -> int | None:
    """``data.val_size`` of the checkpoint's run (None: written before the split existed)."""
    from distgraft.compress.archive import config_of

    return config_of(loaded.state).get("data", {}).get("val_size")


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
    """One output per input checkpoint: '{i}' in OUT becomes 0, 1, ... with several.

    Each is checked to be a file that can be written (``writable_file``)."""
    if n == 1:
        paths = [Path(out.replace("{i}", "0"))]
    elif "{i}" not in out:
        raise CompressError(f"{n} checkpoints need an --out with '{{i}}' (e.g. pruned{{i}}.pt)")
    else:
        paths = [Path(out.replace("{i}", str(i))) for i in range(n)]
    for path in paths:
        writable_file(path)
    return paths


def writable_file(path: Path, option: str = "--out") -> Path:
    """``path`` if a file can be written there, else CompressError naming ``option``.

    Checked before any work is done (the commands compute everything first, then write):
    not onto a folder, not under a file, not into a folder this process cannot write. The
    write itself is atomic, so a good file already at ``path`` is replaced only by a
    complete new one.
    """
    if path.is_dir():
        raise CompressError(f"{option} {path} is a folder; give a file name, e.g. "
                            f"{path / 'out.pt'}")  # fmt: skip
    _writable_folder(path.parent, option, path)
    return path


def writable_folder(path: Path, option: str = "--out") -> Path:
    """``path`` if it is, or can become, a folder this process writes into."""
    if path.exists() and not path.is_dir():
        raise CompressError(f"{option} {path} is a file; give a folder")
    _writable_folder(path, option, path)
    return path


def _writable_folder(folder: Path, option: str, target: Path) -> None:
    """The nearest existing folder of ``folder`` must be a folder and take a new file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CompressError(f"{option} {target}: {existing} is a file, not a folder")
    try:  # permissions, read-only mounts, quotas: only trying tells
        fd, probe = tempfile.mkstemp(prefix=".distgraft-probe-", dir=existing)
    except OSError as e:
        raise CompressError(f"{option} {target}: cannot write into {existing} "
                            f"({e.strerror or e})") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)


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
    p.add_argument("--data-root",
                   help="override the checkpoint's data.root (CIFAR, Fashion-MNIST, ImageNet)")
    p.add_argument("--latency-batch", type=int, default=0, metavar="B",
                   help="also time the forward pass of a batch of B images before and after "
                        "(median of 20)")  # fmt: skip
    if evaluate:
        p.add_argument("--eval", action="store_true",
                       help="also measure test accuracy before and after (no retraining)")
