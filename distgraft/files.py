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
from typing import Any

import torch

__all__ = ["save_atomic", "copy_atomic", "load", "load_error_message"]


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


# torch's unpickler ends its refusals with advice to turn the safety off; never pass it on.
_UNSAFE_ADVICE = ("Re-running `torch.load` with `weights_only` set to `False`",
                  "Re-running torch.load with weights_only set to False")  # fmt: skip


def load_error_message(e: BaseException) -> str:
    """One short line saying why ``load`` failed, without torch's advice to unpickle freely.

    A file that torch's safe loader refuses holds pickled objects, not only tensors and
    plain containers: it was not written by distgraft, and loading it unsafely could run
    code. So the message says that instead of the advice.
    """
    text = " ".join(str(e).split())
    if any(advice in text for advice in _UNSAFE_ADVICE) or "Weights only load failed" in text:
        return "it holds pickled objects that a weights-only load refuses (not a distgraft file)"
    if isinstance(e, EOFError) or "failed finding central directory" in text:
        return "truncated or not a torch file"
    return f"{type(e).__name__}: {text[:200]}"
