"""Atomic checkpoints: written to a temporary file beside the target and moved into place.

A checkpoint is a plain dictionary of tensors and Python values, saved with :func:`torch.save`
and read back with ``torch.load(weights_only=True)``, so loading one never runs pickled code.
A run killed while a checkpoint is being written keeps the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from biasshift.io import atomic_open

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, another format, or made for a different run."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save ``state`` to ``path`` atomically (temporary file + :func:`os.replace`)."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)
    return path


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
