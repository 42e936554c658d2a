"""Atomic result files, result sets published as one unit, folder locks and provenance records.

Every figure biasshift writes comes with the tidy data behind it and a JSON record of how it was
made.  Files are written to a temporary file in the same folder and moved into place with
:func:`os.replace`, so a killed run never leaves a half-written file behind.

A result set (``NAME.csv``, ``NAME.png``, ``NAME.pdf`` and ``NAME.json``) is written into a
temporary folder and then published by :func:`publish_result_set`: the old ``NAME.json`` goes
first, the data files are moved into place, the new ``NAME.json`` (which records the SHA-256 of
every file of the set) comes last.  A kill in between leaves either no JSON or a JSON whose
hashes do not match, and :func:`check_result_set` refuses such a mixed set.

:class:`FolderLock` is an exclusive ``fcntl.flock`` on ``<folder>/.lock`` (released by the kernel
when its process dies, so a lock is never stale); the process holding it may remove the stale
temporaries of the folder (:func:`sweep_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

try:  # POSIX; elsewhere folders are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import pandas as pd

__all__ = [
    "FolderLock",
    "FolderLockedError",
    "ResultSetError",
    "append_csv",
    "atomic_open",
    "check_result_set",
    "file_sha256",
    "git_revision",
    "provenance",
    "publish_result_set",
    "sweep_temporaries",
    "writable_dir_problem",
    "write_csv",
    "write_json",
]

LOCK_NAME = ".lock"


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- folder locks
class FolderLockedError(RuntimeError):
    """Another process holds the lock of a folder."""


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` (``fcntl.flock`` on ``folder/.lock``).

    ``with FolderLock(path, what="work dir"):`` creates the folder, takes the lock or raises
    :class:`FolderLockedError` naming the folder and the pid that holds it, and removes the lock
    file on release.  The kernel drops the lock when its process dies (even by ``kill -9``), so
    a lock left behind by a dead process never blocks.  Without ``fcntl`` (Windows) nothing is
    locked.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        if fcntl is None:  # pragma: no cover - Windows
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = os.pread(fd, 64, 0).decode().strip()
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                by = f" (pid {holder})" if holder else ""
                raise FolderLockedError(
                    f"the {self.what} {self.folder} is in use by another biasshift process{by}; "
                    f"wait for it to finish, stop it, or choose another folder"
                ) from None
            # the holder before us may have removed the file after we opened it: retry then
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiting process retries on the new file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; returns what was removed.

    These are the ``.NAME.*.tmp`` files of :func:`atomic_open` (every temporary in the folder:
    call this only while holding the folder's :class:`FolderLock`) and the
    ``.NAME.<pid>.*.publish`` folders of :func:`publish_result_set` whose process is gone (those
    are swept without a lock, since their name carries their writer's pid).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        name = p.name
        if not name.startswith("."):
            continue
        if name.endswith(".tmp") and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
        elif name.endswith(".publish") and p.is_dir() and not _publish_owner_alive(name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _publish_owner_alive(name: str) -> bool:
    parts = name.split(".")
    # ".<stem>.<pid>.<random>.publish" -> [..., pid, random, "publish"]
    try:
        pid = int(parts[-3])
    except (IndexError, ValueError):
        return False
    return pid == os.getpid() or _pid_alive(pid)


# ----------------------------------------------------------------------------- result sets
class ResultSetError(ValueError):
    """A result set whose files do not belong together (or lack their JSON record)."""


def publish_result_set(
    stem: str | os.PathLike[str],
    writers: Mapping[str, Callable[[Path], object]],
    record: dict[str, Any],
) -> dict[str, Path]:
    """Write ``stem.<suffix>`` for each ``writers[suffix](path)`` and ``stem.json`` as one unit.

    Each writer writes its file to the path it is given, inside a temporary folder
    ``.<name>.<pid>.<random>.publish`` beside the results.  ``record`` (the provenance) gets
    ``sha256: {suffix: hex digest}`` of every file and is written as ``stem.json``.  Then the
    old ``stem.json`` is removed, the files are moved into place and the new JSON comes last,
    so an interrupted publish never leaves a JSON beside files it does not describe
    (:func:`check_result_set` tells).  Stale temporary folders of dead writers are swept first.
    Returns ``{suffix: path}`` including ``"json"``.
    """
    stem = Path(stem)
    out, name = stem.parent, stem.name
    out.mkdir(parents=True, exist_ok=True)
    _sweep_dead_publishes(out)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}.{os.getpid()}.", suffix=".publish"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        staged: dict[str, Path] = {}
        for suffix, write in writers.items():
            path = tmp / f"{name}.{suffix}"
            write(path)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            staged[suffix] = path
        record = dict(record)
        record["sha256"] = {suffix: file_sha256(p) for suffix, p in staged.items()}
        with open(tmp / f"{name}.json", "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        final = {suffix: out / f"{name}.{suffix}" for suffix in staged}
        json_path = out / f"{name}.json"
        json_path.unlink(missing_ok=True)
        _fsync_dir(out)
        for suffix, path in staged.items():
            os.replace(path, final[suffix])
        _fsync_dir(out)
        os.replace(tmp / f"{name}.json", json_path)
        _fsync_dir(out)
        final["json"] = json_path
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_dead_publishes(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name.endswith(".publish") and p.is_dir() and not _publish_owner_alive(p.name):
            shutil.rmtree(p, ignore_errors=True)


def check_result_set(stem: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``stem.json`` describes the files beside it; returns the JSON record.

    Raises:
        ResultSetError: the JSON is missing or unreadable, or a file of the set is missing or
            is not the one the JSON was written with (an interrupted publish, or two commands
            writing one ``--out``). The message names the file and says to rerun.
    """
    stem = Path(stem)
    json_path = stem.with_name(stem.name + ".json")
    fix = "rerun the command that made it (with --resume its finished runs are reused)"
    try:
        record = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ResultSetError(f"{json_path} is missing, so the result set {stem}.* is incomplete; "
                             f"{fix}") from None
    except (OSError, ValueError) as err:
        raise ResultSetError(f"{json_path} is unreadable ({err}); {fix}") from None
    hashes = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(hashes, dict):
        raise ResultSetError(f"{json_path} records no sha256 of its files (written by an older "
                             f"biasshift?); {fix}")
    for suffix, digest in hashes.items():
        path = stem.with_name(f"{stem.name}.{suffix}")
        if not path.is_file():
            raise ResultSetError(f"{path} is missing from the result set of {json_path}; {fix}")
        if file_sha256(path) != digest:
            raise ResultSetError(f"{path} is not the file {json_path} was written with (an "
                                 f"interrupted or concurrent write mixed two result sets); {fix}")
    return record


# ----------------------------------------------------------------------------- folders
def writable_dir_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot serve as an output folder, or ``None`` when it can.

    An existing ``path`` must be a folder in which a file can be created and written; a missing
    one must be creatable (its nearest existing ancestor a writable folder).  Nothing is left
    behind: the probe file is removed and no folder is created.
    """
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.is_symlink():
            return f"{probe_dir} is a broken symbolic link"
        parent = probe_dir.parent
        if parent == probe_dir:
            break
        probe_dir = parent
    if not probe_dir.is_dir():
        if probe_dir == path:
            return f"{path} is a file, not a folder"
        return f"{path} cannot be created: {probe_dir} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".biasshift-write-test.", suffix=".tmp")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        where = "" if probe_dir == path else f" (its nearest existing folder {probe_dir})"
        return f"{path}{where} is not writable: {reason}"
    return None


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
