"""scikit-learn's bundled 8x8 digits: the offline dataset of the quickstart and the tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distgraft.train.data.loaders import DataError

__all__ = ["load_digits"]


def load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's bundled 8x8 digits, values 0..16 scaled to uint8, fixed stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(
            "data.name = 'digits' needs scikit-learn: pip install 'distgraft[digits]'"
        ) from e
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return as_t(xtr), as_t(ytr), as_t(xte), as_t(yte)
