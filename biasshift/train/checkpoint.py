"""Atomic checkpoints: written to a temporary file beside the target and moved into place.

A checkpoint is a plain dictionary of tensors and Python values, saved with :func:`torch.save`
and read back with ``torch.load(weights_only=True)``, so loading one never runs pickled code.
A run killed while a checkpoint is being written keeps the previous checkpoint intact.

A checkpoint carries the fingerprint of the run it belongs to (see ``Trainer``), including
:func:`data_fingerprint`: the dataset's name, sizes and a hash of a few of its samples, so a
checkpoint made on other data (another dataset, a subset, other preprocessing) is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from biasshift.data.base import ArrayDataset

from biasshift.io import atomic_open

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "data_fingerprint", "load_checkpoint",
           "save_checkpoint"]

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, another format, or made for a different run."""


def data_fingerprint(dataset: ArrayDataset, samples: int = 8) -> str:
    """``"<name>:<n_train>/<n_test>:<hash>"``: the hash (SHA-256, 16 hex digits) covers the
    shapes, dtypes and bytes of ``samples`` evenly spaced training and test samples and their
    labels, on the CPU (the same on every device).  Cheap (a few samples are copied to the host);
    not for hot paths.
    """
    h = hashlib.sha256()
    for x, y in ((dataset.train_x, dataset.train_y), (dataset.test_x, dataset.test_y)):
        n = int(x.shape[0])
        idx = torch.linspace(0, max(n - 1, 0), min(samples, n)).round().long()
        for t in (x, y):
            part = t[idx.to(t.device)].detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(part.numpy().tobytes())
    return (f"{dataset.name}:{int(dataset.train_x.shape[0])}/{int(dataset.test_x.shape[0])}:"
            f"{h.hexdigest()[:16]}")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save ``state`` to ``path`` atomically (temporary file + :func:`os.replace`).

    A tensor that is a view of a larger storage (a member of a stacked model holds views of
    the stack's parameters) is saved as a copy of its own elements: :func:`torch.save` would
    otherwise write the whole storage, and a member's checkpoint would hold every member."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        torch.save(_compact({"format": CHECKPOINT_FORMAT, **state}), fh)
    return path


def _compact(obj: Any) -> Any:
    """``obj`` with every tensor that views a larger storage replaced by a copy of itself."""
    if isinstance(obj, torch.Tensor):
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            return obj.clone()
        return obj
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_compact(v) for v in obj)
    return obj


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: torch.device | str | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable biasshift checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt file, foreign pickle, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: {err}. Delete it (or the run folder) to start the "
            "run afresh"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a biasshift checkpoint of format {CHECKPOINT_FORMAT} (found "
            f"{found!r}); delete it to start the run afresh"
        )
    return state
