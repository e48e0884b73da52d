"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

Shared by training (``train/checkpoint.py``) and compression (``compress/archive.py``):
both write with ``save_atomic`` (temp file, fsync, rename, fsync of the folder, so a crash
at any instant leaves the old file or the new one, never half of one) and read with
``load`` (``torch.load(weights_only=True)``: tensors and plain containers only, so a
checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["save_atomic", "copy_atomic", "write_atomic", "load", "load_error", "load_reason"]


def save_atomic(
    obj: Any, path: str | Path, before_replace: Callable[[], None] | None = None
) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file or the new one, never half.

    ``before_replace`` runs once the new file is complete on disk, just before it takes
    ``path``'s place (checkpoint rotation keeps the old file under another name there).
    """
    _write_atomic(path, lambda f: torch.save(obj, f), before_replace)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` with the guarantees of ``save_atomic``."""
    with open(src, "rb") as f:
        _write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into ``path`` with the guarantees of ``save_atomic`` (any content)."""
    _write_atomic(path, write)


def _write_atomic(
    path: str | Path, write, before_replace: Callable[[], None] | None = None
) -> None:
    """``write(file)`` into a temp file beside ``path``, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
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


_ADVICE = re.compile(r"weights_only|Re-running|safe_globals|trust|file an issue", re.I)
"""Sentences of torch's messages that advise, rather than say what is wrong."""


def load_error(path: str | Path, error: BaseException) -> str:
    """A failed ``load`` of ``path`` as one line that says what is wrong with the file.

    torch's own message runs over several lines and advises loading again with
    weights_only=False, which would run whatever code the file holds; that advice is not
    passed on. The forbidden class is named, so a user can see what was pickled.
    """
    return f"cannot read {str(path)!r}: {load_reason(error)}"


def load_reason(error: BaseException) -> str:
    """Why a ``load`` failed, in a few words (no advice to load unsafely)."""
    if isinstance(error, FileNotFoundError | IsADirectoryError | PermissionError):
        return error.strerror or type(error).__name__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds a pickled {refused.group(1)}, and checkpoints are read with "
                "torch.load(weights_only=True), which takes only tensors and plain "
                "containers")  # fmt: skip
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    if unpickler:
        return (f"not a file torch.save wrote, or not one weights-only loading accepts "
                f"({' '.join(unpickler.group(1).split())})")  # fmt: skip
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    said = [s for s in sentences if not _ADVICE.search(s)]
    if isinstance(error, EOFError | OSError) or "zip archive" in text:
        first = said[0].rstrip(".") if said else ""  # the rest is torch's guessing
        return "the file is empty, cut short or not a torch file" + (f" ({first})" if first else "")
    return f"{type(error).__name__}: {' '.join(' '.join(said).split()[:40]) or 'no data'}"
