"""The checkpoint format of compressed networks, and rebuilding any checkpoint distgraft writes.

A pruned, decomposed or sparse network is not the network its config names, so its
checkpoint records how to rebuild it from that base, next to the weights (a plain dict that
``torch.load(weights_only=True)`` reads; no pickled modules):

```
{"format": 1,                       # this layout's version
 "kind": "pruned" | "lowrank" | "sparse" | ...,
 "arch": {"model": "resnet56",      # the base model (distgraft.models name)
          "num_classes": 10, "in_channels": 3, "input_shape": [3, 32, 32],
          "width": 1.0,             # model.width (absent in older checkpoints: 1)
          "edits": [{"op": "prune", "group": "layer1.0.conv1", "keep": [0, 3, ...]},
                    {"op": "lowrank", "layer": "layer3.8.conv1", "rank": 12},
                    {"op": "dropout", "module": "drop1", "p": 0.21}, ...]},
 "model": state_dict,               # or "sparse": the encoding of compress/magnitude.py
 "config": "...",                   # the training run's resolved config (TOML): the dataset
 "report": {...}, "source": "runs/x/net0/best.pt"}
```

``distgraft train`` writes ``arch`` into its own checkpoints too, so ``load_model`` rebuilds
every checkpoint distgraft writes: plain, pruned, decomposed and sparse. Checkpoints of
earlier versions (no ``arch``) are rebuilt from their config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib
from torch import nn

from distgraft.files import load, load_error, save_atomic
from distgraft.models import build_model, is_known_model

__all__ = [
    "FORMAT",
    "KINDS",
    "CheckpointError",
    "kind_of",
    "base_arch",
    "width_of",
    "read_checkpoint",
    "arch_of",
    "config_of",
    "build",
    "weights_of",
    "apply_edits",
    "load_model",
    "save_compressed",
]

FORMAT = 1
KINDS = ("train", "pruned", "lowrank", "sparse")
"""The checkpoint kinds distgraft writes: ``train`` (``distgraft train``'s own checkpoints,
which carry no ``kind``), and those of ``distgraft compress`` prune/trim, lowrank and
magnitude (and the sparse.pt of a run that pruned while training)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or rebuilt; the message names the file and why."""


def base_arch(
    model: str,
    num_classes: int,
    in_channels: int,
    input_shape: Sequence[int],
    width: float = 1.0,
) -> dict[str, Any]:
    """The ``arch`` record of an unmodified ``model`` (``width``: its width multiplier)."""
    return {
        "model": model,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "input_shape": [int(s) for s in input_shape],
        "width": float(width),
        "edits": [],
    }


def width_of(arch: dict[str, Any]) -> float:
    """The width multiplier an ``arch`` record was built with (1 before it was recorded)."""
    return float(arch.get("width", 1.0))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, or CheckpointError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = load(path)
    except Exception as e:  # unpickling refused, torn file, not a torch file at all
        raise CheckpointError(load_error(path, e)) from None
    if not isinstance(state, dict) or not ("model" in state or "sparse" in state):
        raise CheckpointError(
            f"{str(path)!r} is not a distgraft checkpoint (no model weights); expected a file "
            "written by distgraft train or distgraft compress"
        )
    return state


def kind_of(state: dict[str, Any]) -> str:
    """The checkpoint's kind (one of KINDS), or CheckpointError naming an unknown one."""
    kind = state.get("kind", "train")
    if not isinstance(kind, str) or kind not in KINDS:
        raise CheckpointError(
            f"unknown checkpoint kind {kind!r}; distgraft writes {', '.join(KINDS)} "
            "(train: the checkpoints of distgraft train, which name no kind)"
        )
    return kind


def config_of(state: dict[str, Any]) -> dict[str, Any]:
    """The training config stored in a checkpoint, as a dict ({} if absent)."""
    text = state.get("config")
    if not isinstance(text, str):
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}


# Classes and input shape of the datasets, for checkpoints written before ``arch`` existed.
_DATASETS = {"digits": (10, (1, 8, 8)), "cifar10": (10, (3, 32, 32)),
             "cifar100": (100, (3, 32, 32)), "fashion-mnist": (10, (1, 28, 28))}  # fmt: skip


def _inferred_arch(state: dict[str, Any]) -> dict[str, Any]:
    cfg = config_of(state)
    name = cfg.get("model", {}).get("name")
    data = cfg.get("data", {})
    if not isinstance(name, str) or not is_known_model(name):
        raise CheckpointError("the checkpoint names no known model (no arch, no config)")
    dataset = data.get("name")
    if dataset in _DATASETS:
        classes, shape = _DATASETS[dataset]
    elif dataset == "synthetic":
        shape = tuple(data.get("synthetic_shape", (3, 32, 32)))
        classes = int(data.get("synthetic_classes", 10))
    else:  # imagenet: the classifier's rows tell the classes
        size = int(data.get("image_size", 224))
        shape = (3, size, size)
        classes = _classifier_rows(state.get("model", {}))
    width = cfg.get("model", {}).get("width", 1.0)
    return base_arch(name, classes, shape[0], shape, width)


def _classifier_rows(weights: dict[str, Any]) -> int:
    linear = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2]
    if not linear:
        raise CheckpointError("cannot tell the number of classes of this checkpoint")
    return int(linear[-1].shape[0])


def arch_of(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``arch`` record (inferred from its config for older checkpoints)."""
    arch = state.get("arch")
    if isinstance(arch, dict) and "model" in arch:
        return arch
    return _inferred_arch(state)


def apply_edits(model: nn.Module, edits: Sequence[dict], input_shape: Sequence[int]) -> None:
    """Replay recorded architecture edits on a freshly built base model, in order."""
    groups = None
    for edit in edits:
        op = edit.get("op")
        if op == "prune":
            from distgraft.compress.prune import apply_prune_edit
            from distgraft.compress.structure import by_name, groups_of

            if groups is None:  # group definitions hold for every width of the model
                groups = by_name(groups_of(model, input_shape))
            apply_prune_edit(model, groups, edit)
        elif op == "lowrank":
            from distgraft.compress.lowrank import apply_lowrank_edit

            apply_lowrank_edit(model, edit)
        elif op == "dropout":
            from distgraft.compress.magnitude import apply_dropout_edit

            apply_dropout_edit(model, edit)
        else:
            raise CheckpointError(f"unknown architecture edit {op!r} ({edit})")


def build(arch: dict[str, Any]) -> nn.Module:
    """The network an ``arch`` record describes (random weights)."""
    name = arch["model"]
    if not is_known_model(name):
        raise CheckpointError(f"the checkpoint's model {name!r} is not a known model")
    try:
        model = build_model(name, arch["num_classes"], arch["in_channels"], width_of(arch))
    except ValueError as e:  # a width the model does not take
        raise CheckpointError(f"the checkpoint's architecture cannot be built: {e}") from e
    apply_edits(model, arch.get("edits", []), arch["input_shape"])
    return model


def weights_of(state: dict[str, Any]) -> dict[str, Any]:
    """The dense state dict of a checkpoint (decoded when it is stored sparse)."""
    if "model" in state:
        return state["model"]
    from distgraft.compress.magnitude import decode_sparse

    return decode_sparse(state["sparse"])


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the network of any checkpoint distgraft writes (plain, pruned, decomposed,
    sparse), with its weights, on the CPU, in eval mode. Reads with weights_only=True."""
    state = read_checkpoint(path)
    model = build(arch_of(state))
    try:
        model.load_state_dict(weights_of(state), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: weights do not fit the recorded model: {e}") from e
    return model.eval()


def save_compressed(
    path: str | Path,
    model: nn.Module | None,
    arch: dict[str, Any],
    *,
    kind: str,
    config: str = "",
    report: dict[str, Any] | None = None,
    source: str = "",
    sparse: dict[str, Any] | None = None,
) -> None:
    """Write a compressed checkpoint atomically (dense ``model`` weights, or ``sparse``)."""
    state: dict[str, Any] = {"format": FORMAT, "kind": kind, "arch": arch, "config": config,
                             "report": report or {}, "source": source}  # fmt: skip
    if sparse is not None:
        state["sparse"] = sparse
    elif model is not None:
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        raise ValueError("save_compressed needs the model or its sparse encoding")
    save_atomic(state, path)
