"""Datasets as whole tensors: MNIST, Fashion-MNIST (IDX files), CIFAR-10/100 (python pickles),
the embedded 8x8 digits, and the paper's CIFAR preprocessing.

:func:`load_dataset` is the one entry point::

    ds = load_dataset("mnist", data_dir="../shared/data").to("cuda")
    ds = load_dataset("cifar100", label="coarse")
"""

from __future__ import annotations

import os
from typing import Any

from biasshift._names import unknown_name_error
from biasshift.data.base import (
    ArrayDataset,
    ChecksumError,
    DatasetNotFoundError,
    batch_indices,
    cache_dir,
)
from biasshift.data.cifar import CIFAR_DATASETS, find_cifar_files, load_cifar, read_cifar_pickle
from biasshift.data.digits import load_digits
from biasshift.data.files import md5sum
from biasshift.data.mnist import IDX_DATASETS, find_idx_files, load_idx_dataset, read_idx
from biasshift.data.preprocess import ZCA, gcn_zca, global_contrast_normalize, pad_crop_flip

__all__ = [
    "CIFAR_DATASETS",
    "DATASETS",
    "ZCA",
    "ArrayDataset",
    "ChecksumError",
    "DatasetNotFoundError",
    "batch_indices",
    "cache_dir",
    "find_cifar_files",
    "find_idx_files",
    "gcn_zca",
    "global_contrast_normalize",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "md5sum",
    "pad_crop_flip",
    "read_cifar_pickle",
    "read_idx",
]

DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "cifar100")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None,
    **options: Any,
) -> ArrayDataset:
    """Load a dataset by name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` or
    ``"digits"`` (embedded, no download).

    ``data_dir`` and ``download`` apply to the file-based datasets; see
    :mod:`biasshift.data.files` for the search order and the checks. ``options`` go to
    :func:`~biasshift.data.cifar.load_cifar` (``label``, ``dtype``, ``checksums``) for CIFAR;
    the other datasets take none.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in CIFAR_DATASETS:
        return load_cifar(key, data_dir=data_dir, download=download, **options)
    if options:
        raise TypeError(f"load_dataset({name!r}): unexpected options {sorted(options)}; only the "
                        "CIFAR datasets take options (label=, dtype=, checksums=)")
    if key == "digits":
        return load_digits()
    if key in IDX_DATASETS:
        return load_idx_dataset(key, data_dir=data_dir, download=download)
    raise unknown_name_error("dataset", name, DATASETS)
