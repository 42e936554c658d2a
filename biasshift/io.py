"""Atomic result files and provenance records.

Every figure biasshift writes comes with the tidy data behind it and a JSON record of how it was
made.  Files are written to a temporary file in the same folder and moved into place with
:func:`os.replace`, so a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pandas as pd

__all__ = ["append_csv", "atomic_open", "git_revision", "provenance", "write_csv", "write_json"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success move it onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` (without its index) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        df.to_csv(fh, index=False)
    return Path(path)


def append_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Append rows to a CSV file atomically (the whole file is rewritten via a temporary file).

    The columns must match the existing file's; a mismatch raises :class:`ValueError` rather than
    silently writing misaligned rows.
    """
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        old = pd.read_csv(path)
        if list(old.columns) != list(df.columns):
            raise ValueError(
                f"append_csv({path}): columns {list(df.columns)} differ from the file's "
                f"{list(old.columns)}; write to a new file instead"
            )
        df = pd.concat([old, df], ignore_index=True)
    return write_csv(df, path)


def write_json(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    return Path(path)


def git_revision(start: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the checkout that holds ``start`` (default: this package), or None.

    A ``-dirty`` suffix marks uncommitted changes.
    """
    where = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(**extra: Any) -> dict[str, Any]:
    """A JSON-ready record of how a result was made: command line, versions, git revision, host.

    Keyword arguments (device, wall time, settings, ...) are added to the record.
    """
    import numpy as np
    import torch

    from biasshift import __version__

    record: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "argv": list(sys.argv),
        "biasshift": __version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    record.update(extra)
    return record
