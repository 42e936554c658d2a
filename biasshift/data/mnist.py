"""MNIST and Fashion-MNIST from the canonical IDX ``.gz`` files, read with numpy (no torchvision).

Search order for the four files of a dataset ``name`` (``"mnist"`` or ``"fashion-mnist"``):

1. an explicit ``data_dir`` (the files directly in it, or in ``data_dir/<name>/``);
2. ``$BIASSHIFT_DATA/<name>/``;
3. the user cache folder ``~/.cache/biasshift/<name>/`` (``$XDG_CACHE_HOME`` honoured);
4. a download into the cache folder from the canonical mirrors (tqdm progress bar, md5 check,
   atomic write), unless ``download=False`` or ``$BIASSHIFT_OFFLINE`` is set. A cache folder
   left with only some of the files by an interrupted download is completed, not refused.

Every file is checked against torchvision's md5 before it is used; a wrong md5 or a truncated file
raises :class:`ChecksumError` naming the file. Nothing is silently skipped: a folder that holds some
but not all of the files, or a corrupt file, is an error, not a reason to look elsewhere.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biasshift._names import unknown_name_error
from biasshift.data.base import ArrayDataset, ChecksumError, DatasetNotFoundError, cache_dir
from biasshift.data.files import check_md5, fetch, md5sum, not_found_error, offline, search_places

__all__ = ["IDX_DATASETS", "find_idx_files", "load_idx_dataset", "md5sum", "read_idx"]


@dataclass(frozen=True)
class IdxSpec:
    files: dict[str, tuple[str, str]]  # role -> (file name, md5 of the .gz)
    mirrors: tuple[str, ...]
    num_classes: int = 10


IDX_DATASETS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": IdxSpec(
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) into a numpy array.

    Raises:
        ChecksumError: the file is truncated, not gzip, or its header does not match its size.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ChecksumError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt. "
                            "Delete it and fetch it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ChecksumError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ChecksumError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ChecksumError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_idx_files(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None
) -> dict[str, Path]:
    """Locate (and if needed download) the four verified files of ``name``; see the module doc.

    ``download=None`` downloads unless ``$BIASSHIFT_OFFLINE`` is set. A cache folder left holding
    only some of the files (an interrupted download) is completed by downloading the rest.
    """
    if name not in IDX_DATASETS:
        raise unknown_name_error("IDX dataset", name, IDX_DATASETS)
    spec = IDX_DATASETS[name]
    files = [f for f, _ in spec.files.values()]
    if download is None:
        download = not offline()
    places = search_places(name, data_dir)
    cache = cache_dir() / name
    for place in places:
        present = [f for f in files if (place / f).is_file()]
        if not present:
            continue
        if len(present) < len(files):
            if download and place == cache:
                break  # complete an interrupted download below
            missing = sorted(set(files) - set(present))
            raise DatasetNotFoundError(
                f"{place} holds {name} files {present} but not {missing}; add the missing files "
                "or remove the partial copy"
            )
        for fname, md5 in spec.files.values():
            check_md5(place / fname, md5)
        return {role: place / fname for role, (fname, _) in spec.files.items()}

    errors: list[str] = []
    if download:
        if all((cache / fname).is_file() or fetch(spec.mirrors, fname, cache / fname, md5, errors)
               for fname, md5 in spec.files.values()):
            return find_idx_files(name, data_dir=cache, download=False)
    raise not_found_error(name, f"the four files {', '.join(files)}", places, errors, download)


def load_idx_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None
) -> ArrayDataset:
    """MNIST or Fashion-MNIST as an :class:`ArrayDataset`.

    Images are float32 ``(N, 1, 28, 28)`` scaled to [0, 1]; labels int64.
    """
    paths = find_idx_files(name, data_dir, download)
    arrays = {role: read_idx(p) for role, p in paths.items()}
    num_classes = IDX_DATASETS[name].num_classes
    for split in ("train", "test"):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        if img.ndim != 3 or img.dtype != np.uint8:
            raise ChecksumError(f"{img_path}: expected uint8 images (N, H, W), got "
                                f"{img.dtype} {img.shape}")
        if lab.ndim != 1:
            raise ChecksumError(f"{lab_path}: expected a label vector (N,), got {lab.shape}")
        if len(img) != len(lab):
            raise ChecksumError(f"{name}: {len(img)} {split} images ({img_path}) but {len(lab)} "
                                f"labels ({lab_path})")
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ChecksumError(f"{lab_path}: labels outside 0..{num_classes - 1} "
                                f"(min {int(lab.min())}, max {int(lab.max())})")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return ArrayDataset(
        name=name,
        train_x=images(arrays["train_images"]), train_y=labels(arrays["train_labels"]),
        test_x=images(arrays["test_images"]), test_y=labels(arrays["test_labels"]),
        num_classes=num_classes,
    )
