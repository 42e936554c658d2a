"""Datasets as whole tensors: MNIST, Fashion-MNIST (IDX files), the embedded 8x8 digits.

:func:`load_dataset` is the one entry point::

    ds = load_dataset("mnist", data_dir="../shared/data").to("cuda")
"""

from __future__ import annotations

import os

from biasshift.data.base import (
    ArrayDataset,
    ChecksumError,
    DatasetNotFoundError,
    batch_indices,
    cache_dir,
)
from biasshift.data.digits import load_digits
from biasshift.data.mnist import IDX_DATASETS, find_idx_files, load_idx_dataset, read_idx

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "ChecksumError",
    "DatasetNotFoundError",
    "batch_indices",
    "cache_dir",
    "find_idx_files",
    "load_dataset",
    "load_digits",
    "read_idx",
]

DATASETS = ("mnist", "fashion-mnist", "digits")


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None
) -> ArrayDataset:
    """Load a dataset by name: ``"mnist"``, ``"fashion-mnist"`` or ``"digits"`` (embedded).

    ``data_dir`` and ``download`` apply to the IDX datasets; see :mod:`biasshift.data.mnist` for the
    search order and the checks.
    """
    key = name.strip().lower()
    if key == "digits":
        return load_digits()
    if key in IDX_DATASETS:
        return load_idx_dataset(key, data_dir=data_dir, download=download)
    raise KeyError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
