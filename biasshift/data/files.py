"""Finding, verifying, downloading and unpacking dataset files (shared by the MNIST and CIFAR
readers).

Every reader follows the same search order for a dataset ``name``:

1. an explicit ``data_dir`` (the files directly in it, or in ``data_dir/<name>/``); a
   ``data_dir`` that does not exist is an error, not a reason to look elsewhere;
2. ``$BIASSHIFT_DATA/<name>/``;
3. the user cache folder ``$XDG_CACHE_HOME/biasshift/<name>/`` (default ``~/.cache/biasshift``);
4. a download into the cache folder (tqdm progress bar, md5 check, atomic write), unless
   ``download=False`` or ``$BIASSHIFT_OFFLINE`` is set (to anything but ``""``/``0``/``false``).

A file whose md5 differs from the canonical one raises :class:`ChecksumError` naming the file; a
file is never used unverified. Downloads go to a ``.part`` file beside the target and are moved into
place only after their md5 matched, so an interrupted or corrupt download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from biasshift.data.base import ChecksumError, DatasetNotFoundError, cache_dir

__all__ = [
    "check_md5",
    "download_file",
    "extract_members",
    "fetch",
    "md5sum",
    "not_found_error",
    "offline",
    "search_places",
]

#: Errors that mean "this mirror did not deliver", as opposed to "it delivered a corrupt file".
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
)


def md5sum(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_md5(path: str | os.PathLike[str], md5: str) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its md5 is ``md5``."""
    got = md5sum(path)
    if got != md5:
        raise ChecksumError(
            f"{path}: md5 {got} does not match the canonical {md5} (torchvision's); "
            "the file is corrupt, truncated or a different version. Delete it and fetch it again."
        )


def offline() -> bool:
    """Whether ``$BIASSHIFT_OFFLINE`` forbids downloads (any value but ``""``, ``0``, ``false``)."""
    return os.environ.get("BIASSHIFT_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def search_places(
    name: str, data_dir: str | os.PathLike[str] | None, layouts: Sequence[str] = ()
) -> list[Path]:
    """The folders searched for dataset ``name``, in order (see the module doc); cache last.

    ``layouts`` are further folders, relative to ``data_dir`` and to ``$BIASSHIFT_DATA``, tried
    after ``<name>/`` (e.g. torchvision's ``MNIST/raw``).

    Raises:
        DatasetNotFoundError: an explicit ``data_dir`` does not exist or is not a folder. A
            mistyped ``--data-dir`` is an error, never a silent fall-back to ``$BIASSHIFT_DATA``.
    """
    places: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise DatasetNotFoundError(
                f"{name}: the data dir {root} given (--data-dir / data_dir=) {what}. Check the "
                "path for a typo, or leave --data-dir out to search $BIASSHIFT_DATA/"
                f"{name}/ and the user cache ({cache_dir() / name})."
            )
        places += [root, root / name] + [root / sub for sub in layouts]
    env = os.environ.get("BIASSHIFT_DATA")
    if env:
        places += [Path(env) / name] + [Path(env) / sub for sub in layouts]
    places.append(cache_dir() / name)
    return places


def download_file(
    url: str, dest: Path, md5: str, digest: Callable[[Path], str] = md5sum
) -> None:
    """Fetch ``url`` to ``dest`` atomically with a progress bar and an md5 check.

    The bytes go to a hidden ``.part`` file beside ``dest``, which is md5-checked and then moved
    onto ``dest``; on any failure (network, md5, interrupt) the ``.part`` file is removed.
    ``digest`` computes the md5 compared with ``md5`` (default: of the file's bytes; the IDX
    reader passes the md5 of the decompressed content). It may raise :class:`ChecksumError` for a
    file it cannot read.

    Raises:
        ChecksumError: the downloaded bytes do not have the md5 ``md5``.
        urllib.error.URLError, OSError, http.client.HTTPException: the download failed.
    """
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while block := resp.read(1 << 16):
                    out.write(block)
                    bar.update(len(block))
        try:
            got = digest(Path(tmp))
            problem = f"md5 {got} does not match the canonical {md5}"
        except ChecksumError as err:
            got, problem = None, f"its md5 cannot be computed ({err})"
        if got != md5:
            raise ChecksumError(
                f"{dest.name} downloaded from {url}: {problem}; the download is corrupt or "
                "truncated (nothing was kept)"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(
    mirrors: Sequence[str], fname: str, dest: Path, md5: str, errors: list[str],
    digest: Callable[[Path], str] = md5sum,
) -> bool:
    """Download ``fname`` from the first mirror that delivers it intact; record failures.

    A mirror that fails (network error) or serves a corrupt file is recorded in ``errors`` and the
    next mirror is tried. Returns False when every mirror failed on the network. ``digest`` is
    passed to :func:`download_file`.

    Raises:
        ChecksumError: no mirror delivered an intact file and at least one served a corrupt one.
    """
    corrupt: list[str] = []
    for mirror in mirrors:
        try:
            download_file(mirror + fname, dest, md5, digest)
            return True
        except NETWORK_ERRORS as err:
            errors.append(f"{mirror}{fname}: {err}")
        except ChecksumError as err:
            errors.append(str(err))
            corrupt.append(str(err))
    if corrupt:
        raise ChecksumError("\n".join(corrupt))
    return False


def not_found_error(
    name: str, wanted: str, places: Iterable[Path], errors: Sequence[str], download: bool
) -> DatasetNotFoundError:
    """The one error for a dataset found nowhere: what we wanted, where we looked, how to fix it.

    ``wanted`` describes the files, e.g. ``"the four files a.gz, b.gz, c.gz, d.gz"``.
    """
    looked = "\n".join(f"  - {p}" for p in places)
    if errors:
        tried = "\nDownload attempts failed:\n" + "\n".join(f"  - {e}" for e in errors)
    elif not download:
        tried = "\nDownloading was switched off (download=False or $BIASSHIFT_OFFLINE)."
    else:
        tried = ""
    return DatasetNotFoundError(
        f"{name}: could not find {wanted}.\nLooked in:\n{looked}{tried}\n"
        f"Fix: pass --data-dir DIR (or data_dir=) pointing at a folder with these files, set "
        f"BIASSHIFT_DATA=DIR so that DIR/{name}/ holds them, or run offline on the embedded data "
        "with --dataset digits."
    )


def extract_members(archive: Path, members: Mapping[str, str], dest: Path) -> None:
    """Safely unpack the regular files ``members`` (archive path -> file name) of a tar archive.

    The archive is first checked as a whole: a member with an absolute path, a ``..`` component, or
    a link or device is refused, so a crafted archive can never write outside ``dest`` (no path
    traversal). Only the listed members are written, to ``dest/<file name>``, via a temporary
    folder beside ``dest`` that is renamed into place when every member was written, so a failed
    extraction leaves no partial folder.

    Raises:
        ChecksumError: the archive is truncated/corrupt, holds an unsafe member, or lacks a member.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        with _reading(archive):
            tar = tarfile.open(archive, "r:*")
        with tar:
            with _reading(archive):
                found = {}
                for m in tar.getmembers():
                    _check_member(archive, m)
                    found[PurePosixPath(m.name).as_posix()] = m
            for inner in members:
                if inner not in found or not found[inner].isfile():
                    raise ChecksumError(
                        f"{archive}: the archive has no file {inner!r}; it is not the "
                        "canonical archive. Delete it and fetch it again."
                    )
            # In archive order: a compressed stream is only read forwards, once.
            for inner, fname in sorted(members.items(), key=lambda kv: found[kv[0]].offset):
                with _reading(archive):
                    src = tar.extractfile(found[inner])
                assert src is not None  # a regular file always has a stream
                with src, open(tmp / fname, "wb") as out:
                    while True:
                        with _reading(archive):
                            block = src.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _reading(archive: Path) -> Iterator[None]:
    """Turn the errors of reading a broken archive into a :class:`ChecksumError` naming it."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ChecksumError(
            f"{archive}: cannot read the archive ({type(err).__name__}: {err}); it is truncated "
            "or corrupt. Delete it and fetch it again."
        ) from None


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name)
    drive = bool(p.parts) and ":" in p.parts[0]  # "C:/..." on Windows
    if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")) or drive:
        raise ChecksumError(
            f"{archive}: refusing to extract the member {m.name!r}, whose path leaves the target "
            "folder (path traversal); the archive is not the canonical one"
        )
    if not (m.isfile() or m.isdir()):
        raise ChecksumError(
            f"{archive}: refusing to extract the member {m.name!r}, which is a link or special "
            "file; the archive is not the canonical one"
        )
