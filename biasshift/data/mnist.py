"""MNIST and Fashion-MNIST from the canonical IDX files, read with numpy (no torchvision).

Search order for the four files of a dataset ``name`` (``"mnist"`` or ``"fashion-mnist"``):

1. an explicit ``data_dir`` (the files directly in it, in ``data_dir/<name>/``, in torchvision's
   layout ``data_dir/MNIST/raw/`` (``FashionMNIST/raw/``), or in ``data_dir/raw/``); a
   ``data_dir`` that does not exist is an error;
2. ``$BIASSHIFT_DATA/<name>/`` (or ``$BIASSHIFT_DATA/MNIST/raw/``);
3. the user cache folder ``~/.cache/biasshift/<name>/`` (``$XDG_CACHE_HOME`` honoured);
4. a download into the cache folder from the canonical mirrors (tqdm progress bar, md5 check,
   atomic write), unless ``download=False`` or ``$BIASSHIFT_OFFLINE`` is set. A cache folder
   left with only some of the files by an interrupted download is completed, not refused.

Each file may be gzip-compressed (``train-images-idx3-ubyte.gz``, at any compression level and
with any gzip header) or plain IDX (``train-images-idx3-ubyte``, as torchvision unpacks it); when
both are present the plain file is used. Every file is checked before it is used against the md5
of its *decompressed* content (the widely published values, listed in ``shared/data/README.md``),
so a re-compressed copy (``gzip -9 -n``, the Debian package's files) is accepted and a changed
byte is not. A file that is another dataset's (Fashion-MNIST given as MNIST) is reported as
such; a wrong md5 or a truncated file raises :class:`ChecksumError` naming the file. Nothing is
silently skipped: a folder that holds some but not all of the files, or a corrupt file, is an
error, not a reason to look elsewhere.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biasshift._names import unknown_name_error
from biasshift.data.base import ArrayDataset, ChecksumError, DatasetNotFoundError, cache_dir
from biasshift.data.files import fetch, md5sum, not_found_error, offline, search_places

__all__ = [
    "IDX_DATASETS", "content_md5", "find_idx_files", "load_idx_dataset", "md5sum", "read_idx",
]


@dataclass(frozen=True)
class IdxSpec:
    """The files of one IDX dataset.

    ``files`` maps a role to the canonical ``.gz`` file name and the md5 of the file's
    decompressed IDX content; ``torchvision`` is the folder name torchvision uses
    (``<root>/<torchvision>/raw/``).
    """

    files: dict[str, tuple[str, str]]  # role -> (file name of the .gz, md5 of the IDX content)
    mirrors: tuple[str, ...]
    num_classes: int = 10
    torchvision: str = ""


IDX_DATASETS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        torchvision="MNIST",
    ),
    "fashion-mnist": IdxSpec(
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965"),
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        torchvision="FashionMNIST",
    ),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _content(path: Path) -> bytes:
    """The IDX bytes of ``path``: decompressed when it is gzip (by its magic bytes, any name)."""
    try:
        with open(path, "rb") as fh:
            compressed = fh.read(2) == _GZIP_MAGIC
        with (gzip.open if compressed else open)(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ChecksumError(f"{path}: cannot decompress it to check its md5 ({err}); the file is "
                            "truncated or corrupt. Delete it and fetch it again.") from None


def content_md5(path: str | os.PathLike[str]) -> str:
    """The hex md5 of an IDX file's decompressed content (of the file itself when uncompressed).

    Raises:
        ChecksumError: the file is gzip but cannot be decompressed (truncated or corrupt).
    """
    return hashlib.md5(_content(Path(path))).hexdigest()


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
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


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (told apart by its first bytes), into an array.

    Raises:
        ChecksumError: the file is truncated, not gzip, or its header does not match its size.
    """
    path = Path(path)
    return _parse_idx(_content(path), path)


def _md5_mismatch(name: str, role: str, path: Path, got: str) -> ChecksumError:
    """The error for a file whose content md5 is not ``name``'s: another dataset's, or corrupt."""
    for other, spec in IDX_DATASETS.items():
        for other_role, (fname, md5) in spec.files.items():
            if md5 != got or (other, other_role) == (name, role):
                continue
            if other != name:
                return ChecksumError(
                    f"{path}: this looks like {other}, not {name}: its content is {other}'s "
                    f"{fname} (md5 {got}). Use --dataset {other} (dataset={other!r}), or point "
                    f"--data-dir at the {name} files."
                )
            return ChecksumError(
                f"{path}: this is {name}'s {fname}, not its {IDX_DATASETS[name].files[role][0]}; "
                "the files were renamed or swapped. Restore the canonical file names."
            )
    want = IDX_DATASETS[name].files[role][1]
    return ChecksumError(
        f"{path}: md5 {got} of its decompressed content does not match {name}'s canonical {want}; "
        "the file is corrupt, truncated or a different version. Delete it and fetch it again."
    )


def _locate(
    name: str, data_dir: str | os.PathLike[str] | None, download: bool | None,
) -> tuple[dict[str, Path], dict[str, bytes]]:
    """The verified files of ``name`` and their decompressed contents (read once)."""
    if name not in IDX_DATASETS:
        raise unknown_name_error("IDX dataset", name, IDX_DATASETS)
    spec = IDX_DATASETS[name]
    files = [f for f, _ in spec.files.values()]
    if download is None:
        download = not offline()
    layouts = (f"{spec.torchvision}/raw", "raw") if spec.torchvision else ("raw",)
    places = search_places(name, data_dir, layouts)
    cache = cache_dir() / name
    for place in places:
        # The plain IDX file (torchvision unpacks beside the .gz) or the .gz, per role.
        found = {role: next((place / n for n in (f.removesuffix(".gz"), f)
                             if (place / n).is_file()), None)
                 for role, (f, _) in spec.files.items()}
        present = [spec.files[r][0] for r, p in found.items() if p is not None]
        if not present:
            continue
        if len(present) < len(files):
            if download and place == cache:
                break  # complete an interrupted download below
            missing = sorted(set(files) - set(present))
            raise DatasetNotFoundError(
                f"{place} holds {name} files {present} but not {missing} (gzip-compressed or "
                "not); add the missing files or remove the partial copy"
            )
        paths = {role: p for role, p in found.items() if p is not None}
        contents = {}
        for role, path in paths.items():
            raw = _content(path)
            got = hashlib.md5(raw).hexdigest()
            if got != spec.files[role][1]:
                raise _md5_mismatch(name, role, path, got)
            contents[role] = raw
        return paths, contents

    errors: list[str] = []
    if download:
        if all((cache / fname).is_file()
               or fetch(spec.mirrors, fname, cache / fname, md5, errors, content_md5)
               for fname, md5 in spec.files.values()):
            return _locate(name, data_dir=cache, download=False)
    wanted = (f"the four files {', '.join(files)} (gzip-compressed or not; torchvision's "
              f"{spec.torchvision or name}/raw/ layout is accepted)")
    raise not_found_error(name, wanted, places, errors, download)


def find_idx_files(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None
) -> dict[str, Path]:
    """Locate (and if needed download) the four verified files of ``name``; see the module doc.

    ``download=None`` downloads unless ``$BIASSHIFT_OFFLINE`` is set. A cache folder left holding
    only some of the files (an interrupted download) is completed by downloading the rest.

    Raises:
        ChecksumError: a file is corrupt or truncated, or is another dataset's (the message says
            which: "this looks like fashion-mnist").
        DatasetNotFoundError: found nowhere, a folder holds only some files, or ``data_dir``
            does not exist.
    """
    return _locate(name, data_dir, download)[0]


def load_idx_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool | None = None
) -> ArrayDataset:
    """MNIST or Fashion-MNIST as an :class:`ArrayDataset`.

    Images are float32 ``(N, 1, 28, 28)`` scaled to [0, 1]; labels int64.
    """
    paths, contents = _locate(name, data_dir, download)
    arrays = {role: _parse_idx(contents[role], p) for role, p in paths.items()}
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
