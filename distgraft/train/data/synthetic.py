"""Random images and labels: throughput benchmarks and tests of any input shape."""

from __future__ import annotations

import torch
from torch import Tensor

from distgraft.config import ConfigError, DataConfig

__all__ = ["load_synthetic"]


def load_synthetic(cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images and labels from a generator seeded 0: the same for every network."""
    if cfg.synthetic_train < 1 or cfg.synthetic_test < 1:
        raise ConfigError(
            f"data.synthetic_train = {cfg.synthetic_train} and data.synthetic_test = "
            f"{cfg.synthetic_test} must both be >= 1"
        )
    g = torch.Generator().manual_seed(0)
    shape = tuple(cfg.synthetic_shape)
    k = cfg.synthetic_classes
    xtr = torch.randint(0, 256, (cfg.synthetic_train, *shape), generator=g, dtype=torch.uint8)
    ytr = torch.randint(0, k, (cfg.synthetic_train,), generator=g)
    xte = torch.randint(0, 256, (cfg.synthetic_test, *shape), generator=g, dtype=torch.uint8)
    yte = torch.randint(0, k, (cfg.synthetic_test,), generator=g)
    return xtr, ytr, xte, yte
