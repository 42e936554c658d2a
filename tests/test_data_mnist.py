"""The data core: IDX readers (MNIST, Fashion-MNIST), md5 checks, search order, mocked downloads,
the embedded digits, :class:`ArrayDataset` and :func:`batch_indices`."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from biasshift.data import (
    ArrayDataset,
    ChecksumError,
    DatasetNotFoundError,
    batch_indices,
    cache_dir,
    find_idx_files,
    load_dataset,
    read_idx,
)
from biasshift.data import mnist as mnist_mod
from biasshift.data.files import md5sum
from biasshift.data.mnist import content_md5

FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------------------- helpers
def idx_bytes(a: np.ndarray) -> bytes:
    """An uncompressed IDX file for a uint8 array, written independently of the reader."""
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) \
        + a.astype(np.uint8).tobytes()


def write_synthetic(folder: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        FILES[1]: np.arange(n_train, dtype=np.uint8) % 10,
        FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        FILES[3]: np.arange(n_test, dtype=np.uint8)[::-1] % 10,
    }
    for fname, a in arrays.items():
        (folder / fname).write_bytes(gzip.compress(idx_bytes(a), mtime=0))


def patch_md5_table(monkeypatch: pytest.MonkeyPatch, folder: Path, name: str = "mnist") -> None:
    """Make ``folder``'s files the canonical ones of ``name`` for this test."""
    spec = mnist_mod.IDX_DATASETS[name]
    files = {role: (f, content_md5(folder / f)) for role, (f, _) in spec.files.items()}
    monkeypatch.setitem(mnist_mod.IDX_DATASETS, name, dataclasses.replace(spec, files=files))


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $BIASSHIFT_DATA, no offline flag, and a private cache under tmp_path/xdg."""
    monkeypatch.delenv("BIASSHIFT_DATA", raising=False)
    monkeypatch.delenv("BIASSHIFT_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


@pytest.fixture
def source(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with valid MNIST files: the real ones when present, else small synthetic files
    whose md5s are patched into the table."""
    from conftest import data_root

    root = data_root()
    if root is not None and all((root / "mnist" / f).is_file() for f in FILES):
        return root / "mnist"
    src = isolated_env / "synthetic-src"
    write_synthetic(src)
    patch_md5_table(monkeypatch, src)
    return src


def copy_files(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(src / f, dest / f)
    return dest


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer (fake)")
        return super().read(n)


class FakeNet:
    """A stand-in for ``urllib.request.urlopen`` serving bytes (or errors) per URL."""

    def __init__(self, routes: dict[str, bytes | BaseException | FakeResponse]) -> None:
        self.routes = routes
        self.requested: list[str] = []

    def __call__(self, url: str, timeout: float | None = None) -> FakeResponse:
        self.requested.append(url)
        route = self.routes.get(url, urllib.error.URLError("no route to host (fake)"))
        if isinstance(route, BaseException):
            raise route
        if isinstance(route, FakeResponse):
            return route
        return FakeResponse(route)


def serve(src: Path, mirror: str, mutate=None) -> dict[str, bytes]:
    out = {}
    for f in FILES:
        data = (src / f).read_bytes()
        out[mirror + f] = mutate(data) if mutate else data
    return out


def all_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------- real datasets
@pytest.fixture(scope="module")
def real_mnist() -> ArrayDataset:
    from conftest import data_root

    root = data_root()
    if root is None or not (root / "mnist").is_dir():
        pytest.skip("real MNIST data not found: set BIASSHIFT_DATA (CI uses ../shared/data)")
    return load_dataset("mnist", data_dir=root, download=False)


@pytest.mark.data
def test_real_mnist_shapes_dtype_range_counts(real_mnist: ArrayDataset, real_data_root: Path):
    ds = real_mnist
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28) and ds.in_features == 784
    for x in (ds.train_x, ds.test_x):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(ds.train_y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(ds.test_y, minlength=10).tolist() == MNIST_TEST_COUNTS
    # Independent decoding of the first test images: gzip + fixed 16-byte header.
    raw = gzip.decompress((real_data_root / "mnist" / FILES[2]).read_bytes())
    first = np.frombuffer(raw, np.uint8, offset=16, count=5 * 784).reshape(5, 1, 28, 28).copy()
    assert torch.equal((ds.test_x[:5] * 255).round().to(torch.uint8), torch.from_numpy(first))
    labels = gzip.decompress((real_data_root / "mnist" / FILES[3]).read_bytes())[8:]
    assert ds.test_y.tolist() == list(labels)


@pytest.mark.data
def test_real_fashion_mnist_shapes_and_counts(real_data_root: Path):
    if not (real_data_root / "fashion-mnist").is_dir():
        pytest.skip("real Fashion-MNIST not found under the data root")
    ds = load_dataset("fashion-mnist", data_dir=real_data_root, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.test_y.dtype == torch.int64
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1.0
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [1000] * 10


@pytest.mark.data
def test_real_data_found_through_env(real_data_root: Path, isolated_env: Path,
                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIASSHIFT_DATA", str(real_data_root))
    paths = find_idx_files("mnist", download=False)
    assert paths["train_images"] == real_data_root / "mnist" / FILES[0]


# ----------------------------------------------------------------------- corrupt and truncated
def test_flipped_byte_gives_checksum_error_naming_the_file(source: Path, isolated_env: Path):
    d = copy_files(source, isolated_env / "copy")
    data = bytearray((d / FILES[3]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / FILES[3]).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz.*md5"):
        find_idx_files("mnist", data_dir=d, download=False)
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", data_dir=d, download=False)


def test_truncated_file_gives_checksum_error_naming_the_file(source: Path, isolated_env: Path):
    d = copy_files(source, isolated_env / "copy")
    data = (d / FILES[1]).read_bytes()
    (d / FILES[1]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match=r"train-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", data_dir=d, download=False)


def test_corrupt_file_is_not_skipped_for_a_good_copy_elsewhere(
    source: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
):
    good = copy_files(source, isolated_env / "env" / "mnist")
    monkeypatch.setenv("BIASSHIFT_DATA", str(good.parent))
    bad = copy_files(source, isolated_env / "bad")
    (bad / FILES[3]).write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ChecksumError, match=str(bad / FILES[3]).replace("\\", "\\\\")):
        find_idx_files("mnist", data_dir=bad, download=False)


def test_read_idx_detects_truncation_and_bad_headers(tmp_path: Path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(read_idx(good), a)
    plain = tmp_path / "plain-idx"
    plain.write_bytes(idx_bytes(a))
    assert np.array_equal(read_idx(plain), a)

    cut = tmp_path / "cut.gz"  # a truncated gzip stream
    cut.write_bytes(good.read_bytes()[:-12])
    with pytest.raises(ChecksumError, match=r"cut\.gz.*truncated"):
        read_idx(cut)
    short = tmp_path / "short.gz"  # valid gzip, but the IDX payload is shorter than its header says
    short.write_bytes(gzip.compress(idx_bytes(a)[:-5]))
    with pytest.raises(ChecksumError, match=r"short\.gz.*promises shape \(2, 3, 4\)"):
        read_idx(short)
    magic = tmp_path / "magic.gz"
    magic.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + bytes(10)))
    with pytest.raises(ChecksumError, match=r"magic\.gz.*magic"):
        read_idx(magic)
    flipped = tmp_path / "flipped.gz"  # a corrupt deflate stream
    data = bytearray(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)) + bytes(range(256))))
    data[20] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"flipped\.gz"):
        read_idx(flipped)


def test_a_matching_md5_is_not_the_only_defence(isolated_env: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    d = isolated_env / "syn"
    write_synthetic(d)
    (d / FILES[0]).write_bytes(gzip.compress(idx_bytes(np.zeros((30, 28, 28), np.uint8))[:-100]))
    patch_md5_table(monkeypatch, d)  # the md5 table now blesses the truncated file
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        load_dataset("mnist", data_dir=d, download=False)


@pytest.mark.parametrize("bad", ["label10", "count"])
def test_inconsistent_files_are_refused(bad: str, isolated_env: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    d = isolated_env / "syn"
    write_synthetic(d)
    labels = np.arange(12, dtype=np.uint8) % 10
    if bad == "label10":
        labels[3] = 10
    else:
        labels = labels[:11]
    (d / FILES[3]).write_bytes(gzip.compress(idx_bytes(labels)))
    patch_md5_table(monkeypatch, d)
    match = "outside 0..9" if bad == "label10" else "12 test images.*11 labels"
    with pytest.raises(ChecksumError, match=match):
        load_dataset("mnist", data_dir=d, download=False)


# --------------------------------------------------------------------------------- search order
def test_search_order_data_dir_then_env_then_cache(isolated_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    src = isolated_env / "src"
    write_synthetic(src)
    patch_md5_table(monkeypatch, src)
    explicit = copy_files(src, isolated_env / "explicit")
    env = copy_files(src, isolated_env / "env" / "mnist")
    cached = copy_files(src, cache_dir() / "mnist")
    assert cached == isolated_env / "xdg" / "biasshift" / "mnist"
    monkeypatch.setenv("BIASSHIFT_DATA", str(env.parent))

    assert find_idx_files("mnist", data_dir=explicit, download=False)["train_images"].parent \
        == explicit
    (isolated_env / "empty").mkdir()  # an existing folder without the files falls through
    assert find_idx_files("mnist", data_dir=isolated_env / "empty", download=False)[
        "test_labels"].parent == env
    assert find_idx_files("mnist", download=False)["test_labels"].parent == env
    monkeypatch.delenv("BIASSHIFT_DATA")
    assert find_idx_files("mnist", download=False)["test_labels"].parent == cached
    # data_dir/<name>/ is accepted too
    nested = copy_files(src, isolated_env / "root" / "mnist")
    assert find_idx_files("mnist", data_dir=nested.parent, download=False)[
        "train_labels"].parent == nested
    ds = load_dataset("mnist", data_dir=explicit, download=False)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_y.tolist() == [
        int(v) for v in np.arange(12)[::-1] % 10]


def test_partial_folder_is_an_error_not_a_fall_through(isolated_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    src = isolated_env / "src"
    write_synthetic(src)
    patch_md5_table(monkeypatch, src)
    copy_files(src, cache_dir() / "mnist")
    partial = copy_files(src, isolated_env / "partial")
    (partial / FILES[2]).unlink()
    with pytest.raises(DatasetNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        find_idx_files("mnist", data_dir=partial, download=False)


def test_cache_dir_follows_xdg_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "biasshift"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "biasshift"


# ------------------------------------------------------------------------------------ downloads
MIRRORS = mnist_mod.IDX_DATASETS["mnist"].mirrors


def test_download_writes_verified_files_atomically_to_the_cache(
    source: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
):
    net = FakeNet(serve(source, MIRRORS[0]))
    monkeypatch.setattr(urllib.request, "urlopen", net)
    ds = load_dataset("mnist")
    cache = isolated_env / "xdg" / "biasshift" / "mnist"
    assert all_files(cache) == sorted(FILES)  # no .part leftovers
    assert net.requested == [MIRRORS[0] + f for f in FILES]
    for f in FILES:
        assert (cache / f).read_bytes() == (source / f).read_bytes()
    ref = load_dataset("mnist", data_dir=source, download=False)
    assert torch.equal(ds.train_x, ref.train_x) and torch.equal(ds.test_y, ref.test_y)
    # The second load finds the cache and never touches the network.
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet({}))
    assert find_idx_files("mnist")["train_images"] == cache / FILES[0]


def test_download_falls_back_to_the_next_mirror(source: Path, isolated_env: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    routes: dict = serve(source, MIRRORS[1])
    routes[MIRRORS[0] + FILES[0]] = urllib.error.HTTPError(
        MIRRORS[0] + FILES[0], 503, "Service Unavailable", {}, None)  # type: ignore[arg-type]
    net = FakeNet(routes)
    monkeypatch.setattr(urllib.request, "urlopen", net)
    paths = find_idx_files("mnist")
    assert net.requested[:2] == [MIRRORS[0] + FILES[0], MIRRORS[1] + FILES[0]]
    assert all(p.is_file() for p in paths.values())


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_corrupt_download_raises_and_leaves_no_file(how: str, source: Path, isolated_env: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    def mutate(data: bytes) -> bytes:
        if how == "truncated":
            return data[: len(data) // 2]
        b = bytearray(data)
        b[len(b) // 3] ^= 0x55
        return bytes(b)

    routes = {**serve(source, MIRRORS[0], mutate), **serve(source, MIRRORS[1], mutate)}
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet(routes))
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz.*md5"):
        load_dataset("mnist")
    assert all_files(isolated_env / "xdg") in ([], ["biasshift", "mnist"])


def test_connection_dropped_mid_download_leaves_no_part_file(
    source: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
):
    data = (source / FILES[0]).read_bytes()
    routes: dict = {MIRRORS[0] + FILES[0]: FakeResponse(data, fail_after=len(data) // 2)}
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet(routes))
    with pytest.raises(DatasetNotFoundError, match="connection reset"):
        find_idx_files("mnist")
    assert all_files(isolated_env / "xdg") in ([], ["biasshift", "mnist"])


def test_every_mirror_failing_gives_one_clear_error(isolated_env: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIASSHIFT_DATA", str(isolated_env / "envdata"))
    net = FakeNet({})
    monkeypatch.setattr(urllib.request, "urlopen", net)
    (isolated_env / "mine").mkdir()  # exists, but holds no files
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", data_dir=isolated_env / "mine")
    msg = str(info.value)
    for f in FILES:
        assert f in msg
    for place in (isolated_env / "mine", isolated_env / "mine" / "mnist",
                  isolated_env / "envdata" / "mnist", isolated_env / "xdg" / "biasshift" / "mnist"):
        assert str(place) in msg
    assert "--dataset digits" in msg and "four files" in msg
    assert "Download attempts failed" in msg and "no route to host" in msg
    assert net.requested == [MIRRORS[0] + FILES[0], MIRRORS[1] + FILES[0]]
    assert all_files(isolated_env / "xdg") in ([], ["biasshift", "mnist"])


@pytest.mark.parametrize("value, online", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_offline_flag_skips_the_download(value: str, online: bool, isolated_env: Path,
                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIASSHIFT_OFFLINE", value)
    net = FakeNet({})
    monkeypatch.setattr(urllib.request, "urlopen", net)
    with pytest.raises(DatasetNotFoundError) as info:
        find_idx_files("fashion-mnist")
    assert bool(net.requested) == online
    assert ("switched off" in str(info.value)) != online
    net.requested.clear()
    with pytest.raises(DatasetNotFoundError, match="switched off"):
        find_idx_files("fashion-mnist", download=False)
    assert net.requested == []


def test_interrupted_download_in_the_cache_is_completed(source: Path, isolated_env: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    cache = cache_dir() / "mnist"
    cache.mkdir(parents=True)
    for f in FILES[:2]:
        shutil.copyfile(source / f, cache / f)
    net = FakeNet(serve(source, MIRRORS[0]))
    monkeypatch.setattr(urllib.request, "urlopen", net)
    paths = find_idx_files("mnist")
    assert net.requested == [MIRRORS[0] + f for f in FILES[2:]]
    assert sorted(p.name for p in paths.values()) == sorted(FILES)
    # Offline, the same partial cache is reported, not silently completed.
    (cache / FILES[3]).unlink()
    with pytest.raises(DatasetNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz"):
        find_idx_files("mnist", download=False)


# ------------------------------------------------------------------ digits and load_dataset
def test_digits_is_embedded_scaled_and_stratified():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    from sklearn.datasets import load_digits as sk

    counts = np.bincount(sk().target, minlength=10)
    test_counts = torch.bincount(ds.test_y, minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)
    again = load_dataset("DIGITS")
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    # The images are sklearn's, scaled by 1/16.
    flat = np.concatenate([ds.train_x.numpy(), ds.test_x.numpy()]).reshape(-1, 64) * 16
    ref = {row.tobytes() for row in sk().data.astype(np.float32)}
    assert all(row.tobytes() in ref for row in flat[:50])


def test_load_dataset_names_and_options():
    with pytest.raises(KeyError, match="did you mean 'mnist'"):
        load_dataset("mnsit")
    with pytest.raises(TypeError, match="only the CIFAR datasets take options"):
        load_dataset("digits", label="coarse")


# ---------------------------------------------------------------- ArrayDataset, batch indices
def test_array_dataset_checks_and_helpers():
    x, y = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match="toy: train_x has 10 samples but train_y has 9"):
        ArrayDataset("toy", x, y[:9], x, y, 3)
    ds = ArrayDataset("toy", x, y, x[:4], y[:4], 3)
    assert ds.input_shape == (1, 4, 4) and ds.in_features == 16
    sub = ds.subset(5, 2)
    assert sub.train_x.shape[0] == 5 and sub.test_y.shape[0] == 2 and sub.name == "toy"
    d64 = ds.to("cpu", dtype=torch.float64)
    assert d64.train_x.dtype == torch.float64 and d64.train_y.dtype == torch.int64
    assert torch.equal(d64.train_x, x.double())
    assert "toy" in repr(ds) and "(10, 1, 4, 4)" in repr(ds)


def test_batch_indices_cover_a_permutation(device: torch.device):
    g = torch.Generator().manual_seed(3)
    batches = list(batch_indices(103, 10, g, device))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert all(b.device.type == device.type for b in batches)
    assert sorted(torch.cat(batches).cpu().tolist()) == list(range(103))
    dropped = list(batch_indices(103, 10, torch.Generator().manual_seed(3), device, drop_last=True))
    assert len(dropped) == 10 and torch.equal(torch.cat(dropped), torch.cat(batches)[:100])
    again = torch.cat(list(batch_indices(103, 10, torch.Generator().manual_seed(3), device)))
    assert torch.equal(again, torch.cat(batches))
    other = torch.cat(list(batch_indices(103, 10, torch.Generator().manual_seed(4), device)))
    assert not torch.equal(other, again)


# ------------------------------------- content md5s, layouts, wrong dataset, explicit data dir
def gzip_9n(raw: bytes, dest: Path, level: int = 9) -> None:
    """Re-compress ``raw`` as ``gzip -9 -n`` does (the binary when present, else zlib)."""
    if shutil.which("gzip"):
        dest.write_bytes(subprocess.run(["gzip", f"-{level}", "-n", "-c"], input=raw, check=True,
                                        capture_output=True).stdout)
    else:
        dest.write_bytes(gzip.compress(raw, compresslevel=level, mtime=0))


def test_canonical_md5s_are_of_the_decompressed_content_the_data_readme_lists():
    # Independent copy of shared/data/README.md's "decompressed md5s" (not the .gz md5s).
    readme = {
        "mnist": ["6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                  "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"],
        "fashion-mnist": ["f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                          "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"],
    }
    for name, md5s in readme.items():
        spec = mnist_mod.IDX_DATASETS[name]
        assert [spec.files[r] for r in ("train_images", "train_labels", "test_images",
                                        "test_labels")] == list(zip(FILES, md5s, strict=True))


@pytest.mark.parametrize("form", ["gzip-9n", "gzip-1-named", "plain", "tv-raw", "tv-raw-both",
                                  "tv-root-mnist"])
def test_recompressed_plain_and_torchvision_layouts_are_accepted(
    form: str, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
):
    src = isolated_env / "src"
    write_synthetic(src)
    patch_md5_table(monkeypatch, src)
    ref = load_dataset("mnist", data_dir=src, download=False)
    raws = {f: gzip.decompress((src / f).read_bytes()) for f in FILES}
    root = isolated_env / "root"
    folder = {"tv-raw": root / "MNIST" / "raw", "tv-raw-both": root / "MNIST" / "raw",
              "tv-root-mnist": root / "MNIST" / "raw"}.get(form, root)
    folder.mkdir(parents=True)
    for f, raw in raws.items():
        if form == "gzip-9n":
            gzip_9n(raw, folder / f)
        elif form == "gzip-1-named":  # another level and a gzip header with a name and a date
            with open(folder / f, "wb") as out, gzip.GzipFile(
                filename=f[:-3], mode="wb", fileobj=out, compresslevel=1, mtime=1234567
            ) as gz:
                gz.write(raw)
        else:
            (folder / f[:-3]).write_bytes(raw)  # plain IDX, as torchvision unpacks it
            if form == "tv-raw-both":
                shutil.copyfile(src / f, folder / f)
    if form.startswith("gzip"):
        assert (folder / FILES[0]).read_bytes() != (src / FILES[0]).read_bytes()
    data_dir = root / "MNIST" if form == "tv-root-mnist" else root
    paths = find_idx_files("mnist", data_dir=data_dir, download=False)
    assert all(p.parent == folder for p in paths.values())
    if form.startswith(("plain", "tv")):
        assert paths["train_images"].name == "train-images-idx3-ubyte"  # the plain file is used
    ds = load_dataset("mnist", data_dir=data_dir, download=False)
    assert torch.equal(ds.train_x, ref.train_x) and torch.equal(ds.test_y, ref.test_y)
    # A changed byte in the decompressed content is still refused, in every form.
    victim = paths["test_images"]
    raw = bytearray(raws[FILES[2]])
    raw[-1] ^= 1
    if victim.name.endswith(".gz"):
        victim.write_bytes(gzip.compress(bytes(raw)))
    else:
        victim.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=rf"{victim.name}: md5 .* decompressed content"):
        load_dataset("mnist", data_dir=data_dir, download=False)


def test_fashion_mnist_files_given_as_mnist_say_so(isolated_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    mn, fa = isolated_env / "mn", isolated_env / "fa"
    write_synthetic(mn, seed=0)
    write_synthetic(fa, seed=1)
    (fa / FILES[1]).write_bytes(gzip.compress(idx_bytes(np.arange(30, dtype=np.uint8)[::-1] % 10)))
    patch_md5_table(monkeypatch, mn, "mnist")
    patch_md5_table(monkeypatch, fa, "fashion-mnist")
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte\.gz: this looks like "
                                            r"fashion-mnist, not mnist.*--dataset fashion-mnist"):
        load_dataset("mnist", data_dir=fa, download=False)
    with pytest.raises(ChecksumError, match="this looks like mnist, not fashion-mnist"):
        find_idx_files("fashion-mnist", data_dir=mn, download=False)
    # torchvision's FashionMNIST/raw layout is found for fashion-mnist
    tv = isolated_env / "tv" / "FashionMNIST" / "raw"
    copy_files(fa, tv)
    assert find_idx_files("fashion-mnist", data_dir=tv.parents[1], download=False)[
        "test_labels"] == tv / FILES[3]
    # Swapped train/test files of the same dataset are named as such, not as corrupt.
    sw = copy_files(mn, isolated_env / "swapped")
    (sw / FILES[1]).write_bytes((mn / FILES[3]).read_bytes())
    with pytest.raises(ChecksumError, match=r"this is mnist's t10k-labels-idx1-ubyte\.gz, not "
                                            r"its train-labels-idx1-ubyte\.gz"):
        find_idx_files("mnist", data_dir=sw, download=False)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_an_explicit_data_dir_that_does_not_exist_is_an_error(
    kind: str, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
):
    src = isolated_env / "env" / "mnist"
    write_synthetic(src)
    patch_md5_table(monkeypatch, src)
    monkeypatch.setenv("BIASSHIFT_DATA", str(src.parent))  # valid data there: no silent fallback
    typo = isolated_env / "shraed" / "data"
    if kind == "file":
        typo.parent.mkdir()
        typo.write_text("not a folder")
    what = "does not exist" if kind == "missing" else "is a file, not a folder"
    with pytest.raises(DatasetNotFoundError, match=rf"data dir {typo} .*{what}.*typo"):
        load_dataset("mnist", data_dir=typo, download=False)
    with pytest.raises(DatasetNotFoundError, match=what):
        load_dataset("cifar10", data_dir=typo, download=False)
    assert find_idx_files("mnist", download=False)["train_images"].parent == src


def test_download_is_verified_on_content_so_a_recompressed_mirror_copy_is_accepted(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
):
    src = isolated_env / "src"
    write_synthetic(src)
    patch_md5_table(monkeypatch, src)
    routes = serve(src, MIRRORS[0], lambda b: gzip.compress(gzip.decompress(b), 9, mtime=7))
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet(routes))
    paths = find_idx_files("mnist")
    assert paths["train_images"].read_bytes() == routes[MIRRORS[0] + FILES[0]]
    assert all_files(cache_dir() / "mnist") == sorted(FILES)


@pytest.mark.data
def test_real_data_recompressed_plain_torchvision_and_debian_forms(real_data_root: Path,
                                                                   tmp_path: Path):
    """The real files in the forms users have: ``gzip -9 -n``, torchvision's ``MNIST/raw`` (plain
    IDX), the Debian package's name-less gzip header; and Fashion-MNIST given as MNIST."""
    mn, fa = real_data_root / "mnist", real_data_root / "fashion-mnist"
    if not all((fa / f).is_file() for f in FILES):
        pytest.skip(f"real Fashion-MNIST not found under {fa}")
    ref = load_dataset("mnist", data_dir=real_data_root, download=False)
    re9 = tmp_path / "re9"
    tv = tmp_path / "tv" / "MNIST" / "raw"
    re9.mkdir()
    tv.mkdir(parents=True)
    for f in FILES:
        raw = gzip.decompress((mn / f).read_bytes())
        # gzip -9 is slow on the 47 MB train images (~25 s here): level 1 for that one file.
        gzip_9n(raw, re9 / f, level=1 if f == FILES[0] else 9)
        (tv / f[:-3]).write_bytes(raw)
    assert all(md5sum(re9 / f) != md5sum(mn / f) for f in FILES)  # other bytes, same content
    for folder, data_dir in ((re9, re9), (tv, tv.parents[1])):
        assert find_idx_files("mnist", data_dir=data_dir, download=False)[
            "train_images"].parent == folder
        ds = load_dataset("mnist", data_dir=data_dir, download=False)
        assert torch.equal(ds.train_x, ref.train_x) and torch.equal(ds.test_y, ref.test_y)
    # Debian's Fashion-MNIST files: Zalando's deflate stream behind a header without a file name.
    deb = tmp_path / "debian"
    deb.mkdir()
    for f in FILES:
        data = (fa / f).read_bytes()
        assert data[3] & 0x08  # FNAME set in the canonical file
        end = data.index(b"\0", 10) + 1
        (deb / f).write_bytes(data[:3] + bytes([data[3] & ~0x08]) + data[4:10] + data[end:])
        assert hashlib.md5(gzip.decompress((deb / f).read_bytes())).hexdigest() == \
            content_md5(fa / f)
    assert find_idx_files("fashion-mnist", data_dir=deb, download=False)["test_labels"] == \
        deb / FILES[3]
    with pytest.raises(ChecksumError, match="this looks like fashion-mnist, not mnist"):
        load_dataset("mnist", data_dir=fa, download=False)
