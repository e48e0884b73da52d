"""Where datasets live on this machine: ``data.root`` per dataset, the cache, the lock.

``data.root`` and ``data.cache`` are per-machine settings: an empty value means the
dataset's own default on the machine that reads it, so a config (or a checkpoint's stored
config) moves between machines unchanged.

* ``data.root = ""``: ``data`` (relative to the working folder) for CIFAR and ImageNet, as
  before; ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST (Debian's
  ``dataset-fashion-mnist``). Digits and the synthetic set read no files.
* ``data.cache = ""``: ``$XDG_CACHE_HOME/distgraft``, else ``~/.cache/distgraft``. It holds
  files distgraft derives from the read-only originals (Fashion-MNIST decompressed), so it
  must be writable; a local disk is best (the lock below is an ``flock``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from distgraft.config import DataConfig
from distgraft.train.data.loaders import DataError

__all__ = ["DEFAULT_ROOTS", "root_of", "root_setting", "cache_of", "cache_setting",
           "check_writable", "exclusive_lock"]  # fmt: skip

FALLBACK_ROOT = "data"
DEFAULT_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
"""``data.root = ""`` for the datasets whose files have a home of their own."""


def root_of(cfg: DataConfig) -> Path:
    """The folder ``cfg`` reads its dataset from (``data.root``, or the dataset's default)."""
    return Path(cfg.root or DEFAULT_ROOTS.get(cfg.name, FALLBACK_ROOT))


def root_setting(cfg: DataConfig) -> str:
    """``data.root`` as error messages name it, with the default it stood for."""
    if cfg.root:
        return f"data.root = {cfg.root!r}"
    return f"data.root = '' (the default for {cfg.name}: {str(root_of(cfg))!r})"


def cache_of(cfg: DataConfig) -> Path:
    """The folder of derived files (``data.cache``, or the XDG cache folder)."""
    if cfg.cache:
        return Path(cfg.cache)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distgraft"


def cache_setting(cfg: DataConfig) -> str:
    """``data.cache`` as error messages name it, with the default it stood for."""
    if cfg.cache:
        return f"data.cache = {cfg.cache!r}"
    return f"data.cache = '' (the default: {str(cache_of(cfg))!r})"


def check_writable(folder: Path, setting: str) -> None:
    """DataError unless ``folder`` exists writable or could be created; creates nothing.

    The pre-flight of a cache: its nearest existing ancestor must be a folder this user
    may write into.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        raise DataError(
            f"cache folder {str(folder)!r} cannot be used: {str(existing)!r} {what} "
            f"({setting}); set data.cache to a writable folder"
        )


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise the processes of one machine on ``path`` (no-op without fcntl).

    Every process of a run may reach a download or a decompression at the same moment;
    the first does the work, the others wait and then find it done.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        f = path.open("a")
    except OSError as e:
        raise DataError(
            f"cannot open the lock file {str(path)!r}: {e}; its folder must be writable"
        ) from e
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
