"""CIFAR-10 and CIFAR-100 from the canonical "python version" pickles (no torchvision).

The canonical files (Krizhevsky, 2009) are Python 2 pickles of dicts whose ``data`` entry is a
``(N, 3072)`` uint8 array, each row the 32x32 red, green and blue planes in row-major order, with
labels under ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100):

===========  ==================================  =========================================
dataset      folder (inside the archive)          files
===========  ==================================  =========================================
``cifar10``  ``cifar-10-batches-py/``             ``data_batch_1`` .. ``data_batch_5``,
                                                  ``test_batch``, ``batches.meta``
``cifar100`` ``cifar-100-python/``                ``train``, ``test``, ``meta``
===========  ==================================  =========================================

They are found in the search order of :mod:`biasshift.data.files` (``data_dir``, then
``$BIASSHIFT_DATA/<name>/``, then the cache, then a download): in each place either the extracted
folder (or its files directly) or the archive ``cifar-10-python.tar.gz`` /
``cifar-100-python.tar.gz``, which is md5-checked and safely extracted (no path traversal, only the
listed regular files) into the cache folder ``$XDG_CACHE_HOME/biasshift/<name>/``. Every file is
checked against torchvision's md5 before it is unpickled, and unpickling is restricted to the
numpy array constructors the format needs, so a foreign pickle can never run code.

Tests and private copies pass their own md5s with ``checksums=`` (file name -> md5); without it
the canonical md5s are required.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biasshift._names import unknown_name_error
from biasshift.data.base import ArrayDataset, ChecksumError, DatasetNotFoundError, cache_dir
from biasshift.data.files import (
    check_md5,
    extract_members,
    fetch,
    not_found_error,
    offline,
    search_places,
)

__all__ = ["CIFAR_DATASETS", "CifarSpec", "find_cifar_files", "load_cifar", "read_cifar_pickle"]


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR dataset's files live and what their canonical md5s are."""

    folder: str                      # the folder inside the archive
    archive: str                     # the canonical archive's file name
    train: tuple[str, ...]           # training batches, in order
    test: tuple[str, ...]
    meta: str
    md5: dict[str, str]              # file name (archive included) -> torchvision's md5
    labels: dict[str, str]           # label set ("fine"/"coarse") -> label key in a batch
    label_names: dict[str, str]      # label set -> key of the class names in the meta file
    num_classes: dict[str, int]
    mirrors: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


_MIRRORS = ("https://www.cs.toronto.edu/~kriz/", "https://cave.cs.toronto.edu/kriz/")

CIFAR_DATASETS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        md5={
            "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        labels={"fine": "labels"},
        label_names={"fine": "label_names"},
        num_classes={"fine": 10},
        mirrors=_MIRRORS,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        md5={
            "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
        labels={"fine": "fine_labels", "coarse": "coarse_labels"},
        label_names={"fine": "fine_label_names", "coarse": "coarse_label_names"},
        num_classes={"fine": 100, "coarse": 20},
        mirrors=_MIRRORS,
    ),
}

_IMAGE_SHAPE = (3, 32, 32)
_NUMPY2 = int(np.__version__.split(".")[0]) >= 2
# The only globals a CIFAR pickle needs: numpy's array/dtype reconstructors (Python 2 and 3
# spellings, numpy 1 and 2 module names) and the codec Python 3 uses to pickle bytes at protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays, lists, dicts and strings, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}, which a CIFAR "
                                         "file never does")
        if _NUMPY2:
            module = module.replace("numpy.core.", "numpy._core.")
        else:
            module = module.replace("numpy._core.", "numpy.core.")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Unpickle one CIFAR file (Python 2 or 3 pickle) into a dict with ``str`` keys.

    Python 2 strings are decoded as latin-1 (as torchvision does), so both the canonical files
    (whose keys are byte strings such as ``b"data"``) and re-pickled copies give ``"data"``,
    ``"labels"``, ... keys. Only numpy arrays, lists, dicts, numbers and strings can be built.

    Raises:
        ChecksumError: the file is truncated, not a pickle, not a dict, or refers to other objects.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise ChecksumError(
            f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err}); the file is "
            "truncated or corrupt. Delete it and fetch it again."
        ) from None
    if not isinstance(obj, dict):
        raise ChecksumError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _md5_table(spec: CifarSpec, checksums: Mapping[str, str] | None) -> dict[str, str]:
    table = dict(spec.md5)
    if checksums is not None:
        unknown = set(checksums) - set(table)
        if unknown:
            raise KeyError(f"checksums: unknown file(s) {sorted(unknown)}; the files are "
                           f"{', '.join(table)}")
        table.update(checksums)
    return table


def _unpack(spec: CifarSpec, archive: Path, target: Path, md5: Mapping[str, str]) -> Path:
    """Extract the dataset's files from a verified ``archive`` into ``target`` and verify them."""
    folder = target / spec.folder
    extract_members(archive, {f"{spec.folder}/{f}": f for f in spec.files}, folder)
    for f in spec.files:
        check_md5(folder / f, md5[f])
    return folder


def find_cifar_files(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    *,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """The folder holding the verified files of ``"cifar10"`` or ``"cifar100"``.

    Looks in each place of the search order for the extracted folder (``<place>/<folder>/``, or
    the files directly in ``<place>``), then for the archive, which is md5-checked and extracted
    into the cache; finally downloads the archive into the cache (``download=None``: unless
    ``$BIASSHIFT_OFFLINE`` is set), extracts it and deletes the downloaded archive.
    ``checksums`` (file name -> md5) replaces canonical md5s, for private copies and tests.

    Raises:
        ChecksumError: a file or archive has the wrong md5, or the archive is unsafe or corrupt.
        DatasetNotFoundError: found nowhere (and not downloadable), or a folder holds only some
            of the files.
    """
    if name not in CIFAR_DATASETS:
        raise unknown_name_error("CIFAR dataset", name, CIFAR_DATASETS)
    spec = CIFAR_DATASETS[name]
    md5 = _md5_table(spec, checksums)
    if download is None:
        download = not offline()
    places = search_places(name, data_dir)
    cache = cache_dir() / name
    for place in places:
        for folder in (place / spec.folder, place):
            present = [f for f in spec.files if (folder / f).is_file()]
            if not present:
                continue
            if len(present) < len(spec.files):
                missing = [f for f in spec.files if f not in present]
                raise DatasetNotFoundError(
                    f"{folder} holds {name} files {present} but not {missing}; add the missing "
                    f"files, or remove the partial copy and provide {spec.archive}"
                )
            for f in spec.files:
                check_md5(folder / f, md5[f])
            return folder
        archive = place / spec.archive
        if archive.is_file():
            check_md5(archive, md5[spec.archive])
            return _unpack(spec, archive, cache, md5)

    errors: list[str] = []
    if download:
        archive = cache / spec.archive
        if fetch(spec.mirrors, spec.archive, archive, md5[spec.archive], errors):
            folder = _unpack(spec, archive, cache, md5)
            archive.unlink()
            return folder
    wanted = (f"the archive {spec.archive} or its extracted folder {spec.folder}/ "
              f"(files {', '.join(spec.files)})")
    raise not_found_error(name, wanted, places, errors, download)


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = read_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in entry:
            raise ChecksumError(f"{path}: no {key!r} entry (found {sorted(entry)}); not a CIFAR "
                                "batch of this dataset")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != int(np.prod(_IMAGE_SHAPE)):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ChecksumError(f"{path}: 'data' must be a uint8 array (N, 3072), got {got}")
    try:
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ChecksumError(f"{path}: {label_key!r} is not a list of integers ({err})") from None
    if labels.shape != (data.shape[0],):
        raise ChecksumError(f"{path}: {data.shape[0]} images but {label_key!r} has shape "
                            f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ChecksumError(f"{path}: {label_key!r} outside 0..{num_classes - 1} "
                            f"(min {labels.min()}, max {labels.max()})")
    return data, labels


def load_cifar(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    label: str = "fine",
    download: bool | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    checksums: Mapping[str, str] | None = None,
) -> ArrayDataset:
    """CIFAR-10 or CIFAR-100 as an :class:`ArrayDataset` of ``(N, 3, 32, 32)`` images.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the first place to look (see :func:`find_cifar_files` for the search order).
        label: ``"fine"`` (the 10 or 100 classes) or, for CIFAR-100, ``"coarse"`` (the 20
            superclasses; the dataset is then named ``"cifar100-coarse"``).
        download: download into the cache when found nowhere (None: unless ``$BIASSHIFT_OFFLINE``).
        dtype: a floating dtype gives pixels scaled to [0, 1]; ``torch.uint8`` the raw 0..255.
        checksums: file name -> md5 replacing torchvision's md5s (private copies, tests).

    Channels are RGB in the canonical order; labels are int64. 50,000 training and 10,000 test
    images for the canonical files.
    """
    if name not in CIFAR_DATASETS:
        raise unknown_name_error("CIFAR dataset", name, CIFAR_DATASETS)
    spec = CIFAR_DATASETS[name]
    if label not in spec.labels:
        raise ValueError(f"load_cifar({name!r}): label must be one of {sorted(spec.labels)}, "
                         f"got {label!r}" + (" (only CIFAR-100 has coarse labels)"
                                             if name == "cifar10" else ""))
    if not (dtype == torch.uint8 or dtype.is_floating_point):
        raise ValueError(f"load_cifar: dtype must be torch.uint8 or a floating dtype, got {dtype}")
    folder = find_cifar_files(name, data_dir, download, checksums=checksums)
    num_classes = spec.num_classes[label]

    meta = read_cifar_pickle(folder / spec.meta)
    names = meta.get(spec.label_names[label])
    if not isinstance(names, list) or len(names) != num_classes:
        raise ChecksumError(f"{folder / spec.meta}: expected {num_classes} class names under "
                            f"{spec.label_names[label]!r}, found {names!r:.200}")

    def split(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_batch(folder / f, spec.labels[label], num_classes) for f in files]
        data = np.concatenate([d for d, _ in parts]).reshape(-1, *_IMAGE_SHAPE)
        x = torch.from_numpy(data)
        if dtype != torch.uint8:
            x = x.to(dtype).div_(255.0)
        return x, torch.from_numpy(np.concatenate([y for _, y in parts]))

    train_x, train_y = split(spec.train)
    test_x, test_y = split(spec.test)
    return ArrayDataset(
        name=name if label == "fine" else f"{name}-{label}",
        train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, num_classes=num_classes,
    )
