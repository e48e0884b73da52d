"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

Shared by training (``train/checkpoint.py``) and compression (``compress/archive.py``):
both write with ``save_atomic`` (temp file, fsync, rename, fsync of the folder, so a crash
at any instant leaves the old file or the new one, never half of one) and read with
``load`` (``torch.load(weights_only=True)``: tensors and plain containers only, so a
checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["save_atomic", "copy_atomic", "write_atomic", "load"]


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file or the new one, never half."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` with the guarantees of ``save_atomic``."""
    with open(src, "rb") as f:
        _write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into ``path`` with the guarantees of ``save_atomic`` (any content)."""
    _write_atomic(path, write)


def _write_atomic(path: str | Path, write) -> None:
    """``write(file)`` into a temp file beside ``path``, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)
