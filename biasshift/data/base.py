"""Whole datasets as tensors: moved to the device once, batches sliced there.

MNIST-sized data fits on any GPU, so biasshift keeps the whole training and test set as tensors
on the training device and draws mini-batches by indexing; there is no per-batch host-to-device
copy and no DataLoader worker overhead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ArrayDataset",
    "ChecksumError",
    "DatasetNotFoundError",
    "batch_indices",
    "cache_dir",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were found nowhere and could not be downloaded."""


class ChecksumError(ValueError):
    """A dataset file exists but is corrupt: wrong md5, truncated, or not in the expected format."""


def cache_dir() -> Path:
    """The user cache folder for downloads: ``$XDG_CACHE_HOME/biasshift``.

    Without ``XDG_CACHE_HOME`` that is ``~/.cache/biasshift``.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "biasshift"


@dataclass(frozen=True)
class ArrayDataset:
    """A classification dataset held as four tensors.

    ``train_x``/``test_x`` are float images ``(N, C, H, W)`` scaled to [0, 1] (or preprocessed);
    ``train_y``/``test_y`` are int64 class indices.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: {split}_x has {x.shape[0]} samples "
                    f"but {split}_y has {y.shape[0]}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.train_x.shape[1:])

    @property
    def in_features(self) -> int:
        """The number of input values per sample (what a flattening MLP sees)."""
        return int(self.train_x[0].numel())

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ArrayDataset:
        """Move (and optionally cast the inputs of) the whole dataset, once."""
        def mv(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)

        return replace(
            self, train_x=mv(self.train_x), test_x=mv(self.test_x),
            train_y=self.train_y.to(device), test_y=self.test_y.to(device),
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> ArrayDataset:
        """The first ``n_train`` training and ``n_test`` test samples (for quick runs)."""
        return replace(
            self,
            train_x=self.train_x[:n_train], train_y=self.train_y[:n_train],
            test_x=self.test_x[:n_test], test_y=self.test_y[:n_test],
        )

    def __repr__(self) -> str:
        return (
            f"ArrayDataset({self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, classes={self.num_classes}, device={self.device})"
        )


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
    drop_last: bool = False,
) -> Iterator[Tensor]:
    """Shuffled mini-batch index tensors for one epoch, drawn from ``generator``.

    The permutation is drawn on the generator's device (CPU generators give the same order on every
    machine) and moved to ``device`` once per epoch.
    """
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]
