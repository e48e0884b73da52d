"""CIFAR-10/100 in torchvision's python format: presence check, download, reading.

CIFAR files are pickles, read with ``pickle.load`` exactly as torchvision does: only point
``data.root`` at files you trust.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distgraft.config import DataConfig
from distgraft.train.data.loaders import DataError
from distgraft.train.data.storage import exclusive_lock, root_of, root_setting

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_SPECS",
    "check_cifar",
    "load_cifar",
]

# The reference grafting code normalises with these (kuangliu's pytorch-cifar values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# Per-channel statistics of the CIFAR-100 training set.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
        "CIFAR10",
    ),
    "cifar100": CifarSpec(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        CIFAR100_MEAN,
        CIFAR100_STD,
        "CIFAR100",
    ),
}


def _cifar_missing(spec: CifarSpec, root: Path) -> list[str]:
    folder = root / spec.folder
    return [f for f in spec.train_files + spec.test_files if not (folder / f).is_file()]


def _cifar_missing_message(spec: CifarSpec, cfg: DataConfig, missing: list[str]) -> str:
    folder = root_of(cfg) / spec.folder
    return (
        f"{spec.title} not found under {str(folder)!r} ({root_setting(cfg)}); put the "
        f"torchvision python-format batches there or set data.download = true "
        f"(missing: {', '.join(missing)})"
    )


def _download_cifar(spec: CifarSpec, cfg: DataConfig) -> None:
    """Fetch the archive with torchvision, once per machine even if every rank asks."""
    import torchvision

    root = root_of(cfg)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{spec.folder}.download.lock"):
        if _cifar_missing(spec, root):
            cls = getattr(torchvision.datasets, spec.torchvision_class)
            try:
                cls(str(root), train=True, download=True)
            except (OSError, RuntimeError) as e:
                raise DataError(
                    f"downloading {spec.title} into {str(root)!r} failed: {e}; download it "
                    f"by hand into {str(root / spec.folder)!r} ({root_setting(cfg)}) "
                    "or check the network (data.download = true)"
                ) from e
    missing = _cifar_missing(spec, root)
    if missing:
        raise DataError(
            f"{spec.title} download into {str(root)!r} did not produce "
            f"{', '.join(missing)} under {str(root / spec.folder)!r} (data.download = true)"
        )


def _read_cifar_file(spec: CifarSpec, path: Path, setting: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [N, 3, 32, 32], int64 [N]); planes R, G, B, row-major."""
    hint = f"({setting}); replace it with the torchvision python-format file"
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[spec.label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read {spec.title} file {str(path)!r}: {e!r} {hint}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{spec.title} file {str(path)!r} holds data {data.dtype} {data.shape}, expected "
            f"uint8 [N, 3072] {hint}"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{spec.title} file {str(path)!r}: {len(labels)} labels for "
            f"{data.shape[0]} images {hint}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{spec.title} file {str(path)!r} has labels outside [0, {spec.num_classes}) {hint}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(spec: CifarSpec, cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    missing = _cifar_missing(spec, root_of(cfg))
    if missing:
        if not cfg.download:
            raise DataError(_cifar_missing_message(spec, cfg, missing))
        _download_cifar(spec, cfg)
    folder = root_of(cfg) / spec.folder

    def read(files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        parts = [_read_cifar_file(spec, folder / f, root_setting(cfg)) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    return (*read(spec.train_files), *read(spec.test_files))


def check_cifar(spec: CifarSpec, cfg: DataConfig) -> None:
    """Raise DataError when the batches are missing and ``data.download`` is off."""
    missing = _cifar_missing(spec, root_of(cfg))
    if missing and not cfg.download:
        raise DataError(_cifar_missing_message(spec, cfg, missing))
