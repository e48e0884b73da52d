"""Compression tests' shared parts: checkpoints as ``distgraft train`` writes them, and the
``distgraft compress`` command line in a fresh process or in this one."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import torch
from cli_helpers import run
from torch import nn

from distgraft.cli import main
from distgraft.compress.archive import base_arch
from distgraft.config import Config, to_toml, with_overrides
from distgraft.files import save_atomic
from distgraft.models import build_model

__all__ = [
    "CIFAR",
    "DIGITS",
    "checkpoint_config",
    "write_checkpoint",
    "splits",
    "plain",
    "compress",
    "compress_here",
]

CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)


def checkpoint_config(name: str, shape: tuple[int, ...], **data) -> Config:
    """The training config a checkpoint of ``name`` holds (``data`` overrides [data])."""
    dataset = "digits" if shape == DIGITS else "cifar10"
    return with_overrides(Config(), model={"name": name}, data={"name": dataset, **data})


def write_checkpoint(
    path: Path, name: str, shape: tuple[int, ...], seed: int = 0, model: nn.Module | None = None,
    **data,
) -> nn.Module:  # fmt: skip
    """A checkpoint as ``distgraft train`` writes it (weights, config, arch), of a random net
    (or of ``model``); ``data`` overrides the config's [data] section."""
    if model is None:
        torch.manual_seed(seed)
        model = build_model(name, 10, shape[0])
    cfg = checkpoint_config(name, shape, **data)
    save_atomic({"model": model.state_dict(), "config": to_toml(cfg), "epoch": 0,
                 "arch": base_arch(name, 10, shape[0], shape)}, path)  # fmt: skip
    return model


def splits(name: str, shape: tuple[int, ...], **data):
    """The (validation, test) loaders of a checkpoint written by ``write_checkpoint``, on the
    CPU: the held-out images its decisions must use, and the ones they must not."""
    from distgraft.train.data import build_data

    cfg = checkpoint_config(name, shape, **data)
    built = build_data(cfg.data, torch.device("cpu"), seed=0, split_seed=cfg.run.seed)
    return built.val, built.test


def plain(value) -> bool:
    """Only tensors and plain containers: what weights_only loading may contain."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | int | float | str | bool)


def compress(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``distgraft compress ARGS`` in a fresh process, as a user runs it."""
    return run([sys.executable, "-m", "distgraft", "compress", *args], timeout=timeout)


def compress_here(*args: str) -> subprocess.CompletedProcess:
    """The same command line in this process (no interpreter start): exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compress", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
