"""scikit-learn's bundled 8x8 digits: the embedded default that needs no download.

1,797 images of 8x8 pixels with values 0..16, shipped inside scikit-learn. They are scaled to
[0, 1] and split into a fixed stratified training (1,437) and test (360) set.
"""

from __future__ import annotations

import numpy as np
import torch

from biasshift.data.base import ArrayDataset

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """The 8x8 digits as an :class:`ArrayDataset` of float32 images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as _sk_load
    from sklearn.model_selection import train_test_split

    bunch = _sk_load()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return ArrayDataset(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(xtr)),
        train_y=torch.from_numpy(ytr),
        test_x=torch.from_numpy(np.ascontiguousarray(xte)),
        test_y=torch.from_numpy(yte),
        num_classes=10,
    )
