"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 28x28 grayscale product photos, 10 classes,
60,000 training and 10,000 test images, from the four gzipped IDX files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

``data.root`` holds the ``.gz`` files; its default is ``/usr/share/datasets/fashion-mnist``,
where Debian's package ``dataset-fashion-mnist`` puts them (read-only; ``make data`` installs
it when run as root). torchvision's IDX readers (``read_image_file``, ``read_label_file``)
do not open ``.gz`` files, so each file is decompressed once into ``data.cache``, in
torchvision's own layout (``CACHE/FashionMNIST/raw/train-images-idx3-ubyte``, so that
``torchvision.datasets.FashionMNIST(root=CACHE)`` reads the very same files), and read from
there with those readers.

Every process of a run reads the dataset as it starts, so the cache must survive many
processes arriving at once. One exclusive lock per cache folder covers the freshness check,
the decompression and the reading, so exactly one process decompresses and no process reads
a file another is writing. A file is decompressed into a temporary file beside its final
name, fsynced and renamed, so even a reader that takes no lock (torchvision) never sees half
a file; a stamp beside it (``NAME.source``: the ``.gz`` file's path, size and modification
time) says which original it came from, and a changed or different original is
decompressed again.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from distgraft.config import DataConfig
from distgraft.files import write_atomic
from distgraft.train.data.loaders import DataError
from distgraft.train.data.storage import (
    cache_of,
    cache_setting,
    check_writable,
    exclusive_lock,
    root_of,
    root_setting,
)

__all__ = ["FILES", "PACKAGE", "NUM_CLASSES", "cache_folder", "check_fashion",
           "prepare_cache", "load_fashion"]  # fmt: skip

PACKAGE = "dataset-fashion-mnist"
"""The Debian package that ships the files (``apt-get install dataset-fashion-mnist``)."""
NUM_CLASSES = 10
SIZE = 28
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The IDX files, uncompressed names; ``data.root`` holds each as NAME.gz."""


def cache_folder(cfg: DataConfig) -> Path:
    """Where the decompressed files go: torchvision's ``FashionMNIST/raw`` under the cache."""
    return cache_of(cfg) / "FashionMNIST" / "raw"


def _missing(cfg: DataConfig) -> list[str]:
    root = root_of(cfg)
    return [f"{name}.gz" for name in FILES if not (root / f"{name}.gz").is_file()]


def check_fashion(cfg: DataConfig) -> None:
    """Pre-flight: the four ``.gz`` files exist and the cache can be written. Reads nothing."""
    missing = _missing(cfg)
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {str(root_of(cfg))!r} ({root_setting(cfg)}; missing: "
            f"{', '.join(missing)}); install Debian's package as root: apt-get install "
            f"{PACKAGE} (or run make data), or set data.root to a folder holding the four "
            "*-ubyte.gz IDX files"
        )
    check_writable(cache_folder(cfg), cache_setting(cfg))


@contextlib.contextmanager
def _locked_cache(cfg: DataConfig) -> Iterator[Path]:
    """The cache folder, created, held under the machine-wide lock of this cache."""
    check_fashion(cfg)
    folder = cache_folder(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the cache folder {str(folder)!r} ({cache_setting(cfg)}): {e}; "
            "set data.cache to a writable folder"
        ) from e
    with exclusive_lock(folder.parent / ".lock"):
        yield folder


def _stamp(source: Path) -> dict[str, object]:
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_fresh(target: Path, stamp_path: Path, stamp: dict[str, object]) -> bool:
    try:
        return target.is_file() and json.loads(stamp_path.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _file_mode() -> int:
    """What a plain ``open(path, "w")`` would give (0o666 less the umask): a cache that
    others share must stay readable, and temp files start at 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write(target: Path, fill) -> None:
    def write(out) -> None:
        os.fchmod(out.fileno(), _file_mode())
        fill(out)

    write_atomic(target, write)


def _decompress(source: Path, target: Path, cfg: DataConfig) -> None:
    try:
        with gzip.open(source, "rb") as f:
            _write(target, lambda out: shutil.copyfileobj(f, out, 1 << 20))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"cannot decompress {str(source)!r} into {str(target)!r}: {e} ({root_setting(cfg)}, "
            f"{cache_setting(cfg)}); reinstall the file (apt-get install --reinstall {PACKAGE}) "
            "or free space in the cache"
        ) from e


def _refresh(cfg: DataConfig, folder: Path) -> list[str]:
    """Decompress every file that is missing or stale in ``folder``; the names written.

    The stamp goes first and comes back last, so a crash at any point leaves either no
    stamp (decompressed again next time) or a stamp that matches its file.
    """
    written = []
    for name in FILES:
        source = root_of(cfg) / f"{name}.gz"
        target, stamp_path = folder / name, folder / f"{name}.source"
        stamp = _stamp(source)
        if _is_fresh(target, stamp_path, stamp):
            continue
        stamp_path.unlink(missing_ok=True)
        _decompress(source, target, cfg)
        _write(stamp_path, lambda out, s=stamp: out.write(json.dumps(s).encode()))
        written.append(name)
    return written


def prepare_cache(cfg: DataConfig) -> list[str]:
    """Bring the cache up to date with ``data.root``; the names of the files decompressed
    (none when it already was). ``load_fashion`` does this itself."""
    with _locked_cache(cfg) as folder:
        return _refresh(cfg, folder)


def _read(folder: Path, split: str, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """One split as (uint8 [N, 1, 28, 28], int64 [N]), read with torchvision's IDX readers."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    def read(name: str, reader) -> Tensor:
        path = folder / name
        try:
            return reader(str(path))
        except (AssertionError, OSError, RuntimeError, TypeError, ValueError) as e:
            raise DataError(
                f"cannot read Fashion-MNIST file {str(path)!r} (decompressed from "
                f"{str(root_of(cfg) / (name + '.gz'))!r}): {type(e).__name__}: {e}; it is not an "
                f"IDX file of the expected type ({root_setting(cfg)}; reinstall: apt-get "
                f"install --reinstall {PACKAGE})"
            ) from e

    images = read(f"{split}-images-idx3-ubyte", read_image_file)
    labels = read(f"{split}-labels-idx1-ubyte", read_label_file)
    where = f"Fashion-MNIST {split} files in {str(root_of(cfg))!r} ({root_setting(cfg)})"
    if tuple(images.shape[1:]) != (SIZE, SIZE):
        raise DataError(f"{where} hold {tuple(images.shape)} images, expected [N, 28, 28]")
    if labels.shape != images.shape[:1]:
        raise DataError(f"{where}: {len(labels)} labels for {len(images)} images")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise DataError(f"{where} have labels outside [0, {NUM_CLASSES})")
    return images.unsqueeze(1), labels


def load_fashion(cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels): uint8 [N, 1, 28, 28], int64."""
    with _locked_cache(cfg) as folder:
        _refresh(cfg, folder)
        return (*_read(folder, "train", cfg), *_read(folder, "t10k", cfg))
