"""CIFAR-10/100 readers on small files written here in the canonical format (Python 2 pickles of
dicts with byte-string keys and a (N, 3072) uint8 ``data`` array), the archive path, md5 checks,
safe extraction, the search order and mocked downloads."""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from biasshift.data import (
    CIFAR_DATASETS,
    ChecksumError,
    DatasetNotFoundError,
    find_cifar_files,
    load_cifar,
    load_dataset,
    read_cifar_pickle,
)
from biasshift.data.files import md5sum


# ---------------------------------------------------------------- a Python 2 pickle writer
def py2_pickle(obj: object) -> bytes:
    """Pickle ``obj`` as Python 2's cPickle (protocol 2) with numpy 1.x wrote the CIFAR files:
    ``bytes`` become Python 2 ``str`` (SHORT_BINSTRING/BINSTRING) and a uint8 matrix is an
    ``numpy.core.multiarray._reconstruct`` call plus a BUILD with the raw bytes as a ``str``."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else
                   b"T" + struct.pack("<I", len(b)) + b)

    def integer(v: int) -> None:
        out.extend(b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v))

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def write(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                write(k)
                write(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                write(v)
            out.extend(b"e")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            glob("numpy.core.multiarray", "_reconstruct")
            glob("numpy", "ndarray")
            integer(0)
            out.extend(b"\x85")            # (0,)
            string(b"b")
            out.extend(b"\x87R")           # _reconstruct(ndarray, (0,), 'b')
            out.extend(b"(")               # state: (1, shape, dtype, False, raw)
            integer(1)
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86")
            glob("numpy", "dtype")
            string(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")          # dtype('u1', 0, 1), then its state
            integer(3)
            string(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")          # BUILD the dtype; False (C order)
            string(o.tobytes())
            out.extend(b"tb")              # BUILD the array
        else:
            raise TypeError(type(o))

    write(obj)
    out.extend(b".")
    return bytes(out)


def _names(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def write_cifar(root: Path, name: str, writer=py2_pickle, seed: int = 0) -> dict:
    """Write a small copy of ``name`` in the canonical layout under ``root/<folder>/``; return
    the md5 table and the expected arrays."""
    spec = CIFAR_DATASETS[name]
    rng = np.random.default_rng(seed)
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict = {"train": [], "test": []}
    for split, files in (("train", spec.train), ("test", spec.test)):
        for f in files:
            n = 4 if name == "cifar10" else (12 if split == "train" else 5)
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            entry: dict = {b"batch_label": f"{f} of 1".encode(), b"data": data,
                           b"filenames": _names("img", n)}
            if name == "cifar10":
                labels = {"fine": [int(v) for v in rng.integers(0, 10, n)]}
                entry[b"labels"] = labels["fine"]
            else:
                labels = {"fine": [int(v) for v in rng.integers(0, 100, n)],
                          "coarse": [int(v) for v in rng.integers(0, 20, n)]}
                entry[b"fine_labels"] = labels["fine"]
                entry[b"coarse_labels"] = labels["coarse"]
            (folder / f).write_bytes(writer(entry))
            expected[split].append((data, labels))
    if name == "cifar10":
        meta = {b"label_names": _names("class", 10), b"num_cases_per_batch": 4, b"num_vis": 3072}
    else:
        meta = {b"fine_label_names": _names("fine", 100),
                b"coarse_label_names": _names("coarse", 20)}
    (folder / spec.meta).write_bytes(writer(meta))
    md5 = {f: md5sum(folder / f) for f in spec.files}
    out = {"folder": folder, "md5": md5}
    for split in ("train", "test"):
        out[f"{split}_data"] = np.concatenate([d for d, _ in expected[split]])
        for kind in ("fine", "coarse"):
            if kind in expected[split][0][1]:
                out[f"{split}_{kind}"] = np.concatenate([l[kind] for _, l in expected[split]])
    return out


def make_archive(src_folder: Path, dest: Path, extra: list[tarfile.TarInfo] | None = None,
                 skip: str | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for f in sorted(src_folder.iterdir()):
            if f.name != skip:
                tar.add(f, arcname=f"{src_folder.name}/{f.name}")
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return dest


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("BIASSHIFT_DATA", raising=False)
    monkeypatch.setenv("BIASSHIFT_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def cache_of(env: Path, name: str) -> Path:
    return env / "xdg" / "biasshift" / name


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------ reading
def test_py2_writer_is_a_faithful_python2_pickle():
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    blob = py2_pickle({b"data": data, b"labels": [1, 300, 70000]})
    plain = pickle.loads(blob, encoding="latin1")  # what torchvision does
    assert np.array_equal(plain["data"], data) and plain["labels"] == [1, 300, 70000]
    assert b"numpy.core.multiarray\n_reconstruct" in blob


@pytest.mark.parametrize("name, label", [("cifar10", "fine"), ("cifar100", "fine"),
                                         ("cifar100", "coarse")])
def test_reads_the_canonical_format(name: str, label: str, env: Path):
    w = write_cifar(env / "data", name)
    ds = load_cifar(name, data_dir=env / "data", label=label, checksums=w["md5"])
    n_train, n_test = len(w["train_data"]), len(w["test_data"])
    assert ds.train_x.shape == (n_train, 3, 32, 32) and ds.test_x.shape == (n_test, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    assert ds.num_classes == ({"cifar10": 10, "cifar100": 100}[name] if label == "fine" else 20)
    assert ds.name == (name if label == "fine" else f"{name}-coarse")
    assert ds.train_y.tolist() == w[f"train_{label}"].tolist()
    assert ds.test_y.tolist() == w[f"test_{label}"].tolist()
    # Pixel (i, c, h, w) is byte c * 1024 + h * 32 + w of row i (RGB planes, row-major).
    rng = np.random.default_rng(1)
    for _ in range(200):
        i, c, h, x = rng.integers(n_train), rng.integers(3), rng.integers(32), rng.integers(32)
        byte = w["train_data"][i, c * 1024 + h * 32 + x]
        assert ds.train_x[i, c, h, x].item() == np.float32(byte) / np.float32(255)
    raw = load_cifar(name, data_dir=env / "data", label=label, checksums=w["md5"],
                     dtype=torch.uint8)
    assert raw.test_x.dtype == torch.uint8
    assert torch.equal(raw.test_x.reshape(n_test, -1), torch.from_numpy(w["test_data"]))
    assert torch.equal(raw.train_x.float() / 255.0, ds.train_x)


def test_the_default_checksums_reject_other_files(env: Path):
    write_cifar(env / "data", "cifar10")
    with pytest.raises(ChecksumError, match=r"data_batch_1: md5 .*torchvision"):
        load_cifar("cifar10", data_dir=env / "data")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickles_load_too(protocol: int, env: Path):
    w = write_cifar(env / "data", "cifar100",
                    writer=lambda o: pickle.dumps(o, protocol=protocol))
    ds = load_cifar("cifar100", data_dir=env / "data", checksums=w["md5"], dtype=torch.uint8)
    assert torch.equal(ds.train_x.reshape(len(w["train_data"]), -1),
                       torch.from_numpy(w["train_data"]))


def test_read_cifar_pickle_gives_str_keys(tmp_path: Path):
    p = tmp_path / "batch"
    p.write_bytes(py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}))
    entry = read_cifar_pickle(p)
    assert sorted(entry) == ["data", "labels"] and entry["labels"] == [3]


def test_a_pickle_cannot_run_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = (b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    p = tmp_path / "data_batch_1"
    p.write_bytes(evil)
    with pytest.raises(ChecksumError, match=r"data_batch_1.*os\.system"):
        read_cifar_pickle(p)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "shape", "labels", "count", "meta", "not-dict"])
def test_damaged_files_are_refused_even_with_matching_md5s(damage: str, env: Path):
    w = write_cifar(env / "data", "cifar10")
    target = w["folder"] / ("batches.meta" if damage == "meta" else "data_batch_2")
    if damage == "truncated":
        blob = target.read_bytes()
        target.write_bytes(blob[: len(blob) // 2])
    elif damage == "shape":
        target.write_bytes(py2_pickle({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}))
    elif damage == "labels":
        target.write_bytes(py2_pickle({b"data": np.zeros((4, 3072), np.uint8),
                                       b"labels": [0, 1, 10, 2]}))
    elif damage == "count":
        target.write_bytes(py2_pickle({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0]}))
    elif damage == "meta":
        target.write_bytes(py2_pickle({b"label_names": _names("c", 9)}))
    else:
        target.write_bytes(py2_pickle([1, 2]))
    md5 = {**w["md5"], target.name: md5sum(target)}
    match = {"truncated": "truncated or corrupt", "shape": r"\(N, 3072\)", "labels": "outside 0..9",
             "count": "4 images", "meta": "10 class names", "not-dict": "dict"}[damage]
    with pytest.raises(ChecksumError, match=rf"{target.name}.*{match}"):
        load_cifar("cifar10", data_dir=env / "data", checksums=md5)


def test_argument_errors(env: Path):
    with pytest.raises(ValueError, match="only CIFAR-100 has coarse labels"):
        load_cifar("cifar10", label="coarse")
    with pytest.raises(ValueError, match="dtype"):
        load_cifar("cifar10", dtype=torch.int32)
    with pytest.raises(KeyError, match="did you mean 'cifar10'"):
        load_cifar("cifar01")
    with pytest.raises(KeyError, match="unknown file"):
        load_cifar("cifar10", checksums={"data_batch_9": "0" * 32})


def test_load_dataset_routes_cifar_with_options(env: Path):
    w = write_cifar(env / "data", "cifar100")
    ds = load_dataset("CIFAR-100", data_dir=env / "data", label="coarse", checksums=w["md5"])
    assert ds.num_classes == 20 and ds.name == "cifar100-coarse"
    assert ds.train_y.tolist() == w["train_coarse"].tolist()


# -------------------------------------------------------------------------------- archives
def test_archive_is_verified_extracted_into_the_cache_and_reused(env: Path):
    w = write_cifar(env / "build", "cifar10")
    (env / "data").mkdir()
    archive = make_archive(w["folder"], env / "data" / "cifar-10-python.tar.gz")
    md5 = {**w["md5"], archive.name: md5sum(archive)}
    folder = find_cifar_files("cifar10", data_dir=env / "data", checksums=md5)
    assert folder == cache_of(env, "cifar10") / "cifar-10-batches-py"
    spec = CIFAR_DATASETS["cifar10"]
    assert listing(cache_of(env, "cifar10")) == sorted(
        ["cifar-10-batches-py"] + [f"cifar-10-batches-py/{f}" for f in spec.files])
    assert archive.is_file()  # a user's archive is never deleted
    ds = load_cifar("cifar10", data_dir=env / "data", checksums=md5, dtype=torch.uint8)
    assert torch.equal(ds.train_x.reshape(20, -1), torch.from_numpy(w["train_data"]))
    archive.unlink()
    assert find_cifar_files("cifar10", data_dir=env / "data", checksums=md5) == folder
    # With the default (torchvision's) md5s the same archive is refused.
    make_archive(w["folder"], env / "data" / "cifar-10-python.tar.gz")
    shutil.rmtree(cache_of(env, "cifar10"))
    with pytest.raises(ChecksumError, match=r"cifar-10-python\.tar\.gz: md5"):
        find_cifar_files("cifar10", data_dir=env / "data")
    assert listing(cache_of(env, "cifar10")) == []


@pytest.mark.parametrize("evil", ["traversal", "absolute", "symlink"])
def test_unsafe_archives_are_refused(evil: str, env: Path):
    w = write_cifar(env / "build", "cifar100")
    (env / "data").mkdir()
    info = tarfile.TarInfo({"traversal": "cifar-100-python/../../../escaped",
                            "absolute": str(env / "escaped"),
                            "symlink": "cifar-100-python/link"}[evil])
    if evil == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, str(env / "escaped")
    else:
        info.size = 3
    archive = make_archive(w["folder"], env / "data" / "cifar-100-python.tar.gz", extra=[info])
    md5 = {**w["md5"], archive.name: md5sum(archive)}
    with pytest.raises(ChecksumError, match="refusing to extract"):
        load_cifar("cifar100", data_dir=env / "data", checksums=md5)
    assert not (env / "escaped").exists() and not (env.parent / "escaped").exists()
    assert listing(cache_of(env, "cifar100")) == []


@pytest.mark.parametrize("damage", ["truncated", "missing-member"])
def test_broken_archives_leave_nothing_behind(damage: str, env: Path):
    w = write_cifar(env / "build", "cifar10")
    (env / "data").mkdir()
    archive = make_archive(w["folder"], env / "data" / "cifar-10-python.tar.gz",
                           skip="test_batch" if damage == "missing-member" else None)
    if damage == "truncated":
        blob = archive.read_bytes()
        archive.write_bytes(blob[: len(blob) * 2 // 3])
    md5 = {**w["md5"], archive.name: md5sum(archive)}
    match = "truncated or corrupt" if damage == "truncated" else "no file 'cifar-10-batches-py/test"
    with pytest.raises(ChecksumError, match=rf"cifar-10-python\.tar\.gz.*{match}"):
        load_cifar("cifar10", data_dir=env / "data", checksums=md5)
    assert listing(cache_of(env, "cifar10")) == []


# --------------------------------------------------------------------- search order, errors
def test_search_order_data_dir_then_env_then_cache(env: Path, monkeypatch: pytest.MonkeyPatch):
    w = write_cifar(env / "build", "cifar10")
    explicit = env / "explicit"
    shutil.copytree(w["folder"], explicit / "cifar-10-batches-py")
    shutil.copytree(w["folder"], env / "envroot" / "cifar10" / "cifar-10-batches-py")
    shutil.copytree(w["folder"], cache_of(env, "cifar10") / "cifar-10-batches-py")
    monkeypatch.setenv("BIASSHIFT_DATA", str(env / "envroot"))
    md5 = w["md5"]
    assert find_cifar_files("cifar10", explicit, checksums=md5) == \
        explicit / "cifar-10-batches-py"
    # the files directly in data_dir
    assert find_cifar_files("cifar10", w["folder"], checksums=md5) == w["folder"]
    (env / "nothing").mkdir()  # an existing folder without the files falls through
    assert find_cifar_files("cifar10", env / "nothing", checksums=md5) == \
        env / "envroot" / "cifar10" / "cifar-10-batches-py"
    monkeypatch.delenv("BIASSHIFT_DATA")
    assert find_cifar_files("cifar10", checksums=md5) == \
        cache_of(env, "cifar10") / "cifar-10-batches-py"


def test_partial_folder_is_an_error(env: Path):
    w = write_cifar(env / "data", "cifar10")
    (w["folder"] / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError,
                       match=r"holds cifar10 files .* but not \['data_batch_3'\]"):
        load_cifar("cifar10", data_dir=env / "data", checksums=w["md5"])


def test_not_found_offline_names_files_places_and_the_fallback(env: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIASSHIFT_DATA", str(env / "envroot"))
    (env / "mine").mkdir()  # exists, but holds no files
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar("cifar100", data_dir=env / "mine")
    msg = str(info.value)
    for part in ("cifar-100-python.tar.gz", "cifar-100-python/", "train", "meta",
                 str(env / "mine"), str(env / "envroot" / "cifar100"),
                 str(cache_of(env, "cifar100")), "--dataset digits", "switched off"):
        assert part in msg


@pytest.mark.data
def test_real_cifar_when_present():
    from conftest import data_root

    root = data_root()
    found = [n for n in CIFAR_DATASETS if root is not None and (root / n).is_dir()]
    if not found:
        pytest.skip("no real CIFAR under $BIASSHIFT_DATA/cifar10 or /cifar100 (none could be "
                    "obtained for ../shared/data); the readers are tested on canonical files")
    for name in found:
        ds = load_cifar(name, data_dir=root, download=False)
        assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
        per_class = 50000 // ds.num_classes
        assert torch.bincount(ds.train_y, minlength=ds.num_classes).tolist() == \
            [per_class] * ds.num_classes
        assert torch.bincount(ds.test_y, minlength=ds.num_classes).tolist() == \
            [10000 // ds.num_classes] * ds.num_classes


# ------------------------------------------------------------------------------- downloads
class _Response(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_fetches_extracts_and_deletes_the_archive(env: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BIASSHIFT_OFFLINE")
    w = write_cifar(env / "build", "cifar100")
    archive = make_archive(w["folder"], env / "served.tar.gz")
    md5 = {**w["md5"], "cifar-100-python.tar.gz": md5sum(archive)}
    spec = CIFAR_DATASETS["cifar100"]
    requested: list[str] = []

    def urlopen(url: str, timeout: float | None = None) -> _Response:
        requested.append(url)
        if url == spec.mirrors[-1] + spec.archive:
            return _Response(archive.read_bytes())
        raise urllib.error.URLError("unreachable (fake)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    ds = load_cifar("cifar100", checksums=md5, dtype=torch.uint8)
    assert requested == [m + spec.archive for m in spec.mirrors]
    assert listing(cache_of(env, "cifar100")) == sorted(
        ["cifar-100-python"] + [f"cifar-100-python/{f}" for f in spec.files])
    assert torch.equal(ds.test_x.reshape(5, -1), torch.from_numpy(w["test_data"]))


def test_corrupt_download_raises_and_leaves_nothing(env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BIASSHIFT_OFFLINE")
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: _Response(b"\x1f\x8b not the archive"))
    with pytest.raises(ChecksumError, match=r"cifar-10-python\.tar\.gz downloaded from .* md5"):
        load_cifar("cifar10")
    assert [p for p in listing(env / "xdg") if p.endswith((".gz", ".part"))] == []
