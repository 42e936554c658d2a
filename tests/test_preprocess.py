"""GCN, ZCA and the pad/crop/flip augmentation against independent numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biasshift.data import ArrayDataset, gcn_zca, global_contrast_normalize, pad_crop_flip
from biasshift.data import preprocess as pp
from biasshift.data.preprocess import ZCA


def pylearn2_gcn(x: np.ndarray, scale: float, use_std: bool, sqrt_bias: float,
                 min_divisor: float = 1e-8) -> np.ndarray:
    """pylearn2.expr.preprocessing.global_contrast_normalize, restated in numpy (float64)."""
    X = x.reshape(len(x), -1).astype(np.float64)
    X = X - X.mean(axis=1)[:, None]
    if use_std:
        normalizers = np.sqrt(sqrt_bias + X.var(axis=1, ddof=1)) / scale
    else:
        normalizers = np.sqrt(sqrt_bias + (X**2).sum(axis=1)) / scale
    normalizers[normalizers < min_divisor] = 1.0
    return (X / normalizers[:, None]).reshape(x.shape)


# --------------------------------------------------------------------------------------- GCN
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(2, 40), scale=st.floats(0.5, 100.0),
       use_std=st.booleans(), sqrt_bias=st.sampled_from([0.0, 10.0]), seed=st.integers(0, 2**16))
def test_gcn_matches_pylearn2(n, d, scale, use_std, sqrt_bias, seed):
    x = np.random.default_rng(seed).normal(3.0, 2.0, (n, d))
    got = global_contrast_normalize(torch.from_numpy(x), scale=scale, use_std=use_std,
                                    sqrt_bias=sqrt_bias)
    np.testing.assert_allclose(got.numpy(), pylearn2_gcn(x, scale, use_std, sqrt_bias),
                               rtol=1e-12, atol=1e-12)


def test_gcn_gives_mean_zero_and_the_documented_scale(device: torch.device):
    x = torch.rand(20, 3, 32, 32, dtype=torch.float64, device=device) * 255
    y = global_contrast_normalize(x)  # default: scale 55, Euclidean norm
    assert y.shape == x.shape and y.device.type == device.type
    flat = y.reshape(20, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(20, dtype=torch.float64, device=device),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(flat.norm(dim=1), torch.full_like(flat[:, 0], 55.0))
    z = global_contrast_normalize(x, scale=2.0, use_std=True).reshape(20, -1)
    torch.testing.assert_close(z.std(dim=1, correction=1), torch.full_like(flat[:, 0], 2.0))


@settings(max_examples=20, deadline=None)
@given(a=st.floats(0.01, 100.0), b=st.floats(-50.0, 50.0), seed=st.integers(0, 2**16))
def test_gcn_is_invariant_to_brightness_and_contrast(a, b, seed):
    x = torch.from_numpy(np.random.default_rng(seed).random((4, 3, 5, 5)))
    torch.testing.assert_close(global_contrast_normalize(a * x + b), global_contrast_normalize(x),
                               rtol=1e-9, atol=1e-9)


def test_gcn_edge_cases(monkeypatch: pytest.MonkeyPatch):
    const = torch.full((2, 3, 4, 4), 7.0)
    assert torch.equal(global_contrast_normalize(const), torch.zeros_like(const))  # no 0/0
    u8 = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    y = global_contrast_normalize(u8)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, global_contrast_normalize(u8.float()))
    x = torch.randn(37, 3, 8, 8)
    full = global_contrast_normalize(x)
    monkeypatch.setattr(pp, "MEMORY_BUDGET", 5000)  # forces chunks of a few rows
    assert torch.equal(global_contrast_normalize(x), full)
    with pytest.raises(ValueError, match="NaN or Inf"):
        global_contrast_normalize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"expected samples \(N, \.\.\.\)"):
        global_contrast_normalize(torch.ones(5))


# --------------------------------------------------------------------------------------- ZCA
def correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(0.1, 3.0, d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 5


def test_zca_whitens_to_identity_up_to_the_regulariser(device: torch.device):
    x_np = correlated(800, 12)
    x = torch.from_numpy(x_np).to(device)
    eps = 0.1
    zca = ZCA(eps=eps).fit(x)
    p = zca.matrix
    assert p is not None and p.device.type == device.type
    assert torch.equal(p, p.T)  # the ZCA transform is symmetric
    z = zca.transform(x)
    zc = z - z.mean(0)
    cov_z = zc.T @ zc / len(x)
    eye = torch.eye(12, dtype=torch.float64, device=device)
    torch.testing.assert_close(cov_z + eps * p @ p, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(z.mean(0), torch.zeros(12, dtype=torch.float64, device=device),
                               atol=1e-10, rtol=0)
    # Independent reference: P = (C + eps I)^(-1/2) with the biased covariance C (scipy sqrtm).
    xc = x_np - x_np.mean(0)
    c = xc.T @ xc / len(x_np) + eps * np.eye(12)
    ref = np.linalg.inv(scipy.linalg.sqrtm(c).real)
    np.testing.assert_allclose(p.cpu().numpy(), ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(zca.inverse_matrix.cpu().numpy(), scipy.linalg.sqrtm(c).real,
                               rtol=1e-9, atol=1e-10)
    # Test data is centred with the training mean.
    t_np = correlated(30, 12, seed=1)
    np.testing.assert_allclose(zca.transform(torch.from_numpy(t_np).to(device)).cpu().numpy(),
                               (t_np - x_np.mean(0)) @ ref, rtol=1e-8, atol=1e-9)


def test_zca_without_regulariser_gives_exact_identity_covariance():
    x = torch.from_numpy(correlated(500, 10, seed=2))
    z = ZCA(eps=0.0).fit_transform(x)
    zc = z - z.mean(0)
    torch.testing.assert_close(zc.T @ zc / len(x), torch.eye(10, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_zca_on_images_float32_inverse_and_state(monkeypatch: pytest.MonkeyPatch):
    x64 = torch.from_numpy(correlated(300, 48, seed=3)).reshape(300, 3, 4, 4)
    zca = ZCA().fit(x64)
    assert zca.feature_shape == (3, 4, 4) and "D=48" in repr(zca)
    z64 = zca.transform(x64)
    assert z64.shape == (300, 3, 4, 4)
    torch.testing.assert_close(zca.inverse_transform(z64), x64, atol=1e-9, rtol=1e-9)
    z32 = zca.transform(x64.float())
    assert z32.dtype == torch.float32
    torch.testing.assert_close(z32.double(), z64, atol=1e-4, rtol=1e-4)
    # Chunked fitting and transforming give the same results.
    monkeypatch.setattr(pp, "MEMORY_BUDGET", 48 * 8 * 7)
    chunked = ZCA().fit(x64)
    torch.testing.assert_close(chunked.matrix, zca.matrix, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chunked.transform(x64), z64, atol=1e-12, rtol=1e-12)
    # state_dict round trip
    restored = ZCA(eps=0.5).load_state_dict(zca.state_dict())
    assert restored.eps == zca.eps and restored.feature_shape == (3, 4, 4)
    assert torch.equal(restored.transform(x64), z64)


def test_zca_errors():
    with pytest.raises(RuntimeError, match="call fit"):
        ZCA().transform(torch.ones(2, 3))
    zca = ZCA().fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"fitted on samples of shape \(3,\)"):
        zca.transform(torch.randn(4, 5))
    with pytest.raises(ValueError, match="singular"):
        ZCA(eps=0.0).fit(torch.randn(3, 10, dtype=torch.float64))  # rank 2 < 10
    with pytest.raises(ValueError, match="NaN or Inf"):
        ZCA().fit(torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ZCA(eps=-1.0)
    with pytest.raises(KeyError, match="missing"):
        ZCA().load_state_dict({"mean": torch.zeros(3)})


def test_gcn_zca_fits_on_train_and_applies_to_both():
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset("toy", torch.rand(200, 3, 4, 4, generator=g), torch.zeros(200).long(),
                      torch.rand(20, 3, 4, 4, generator=g), torch.zeros(20).long(), 1)
    out, zca = gcn_zca(ds.to("cpu", dtype=torch.float64), eps=0.1)
    gtrain = global_contrast_normalize(ds.train_x.double())
    gtest = global_contrast_normalize(ds.test_x.double())
    ref = ZCA(eps=0.1).fit(gtrain)
    torch.testing.assert_close(out.train_x, ref.transform(gtrain))
    torch.testing.assert_close(out.test_x, ref.transform(gtest))
    torch.testing.assert_close(zca.matrix, ref.matrix)
    assert out.name == "toy" and torch.equal(out.train_y, ds.train_y)
    u8 = ArrayDataset("u8", (ds.train_x * 255).to(torch.uint8), ds.train_y,
                      (ds.test_x * 255).to(torch.uint8), ds.test_y, 1)
    assert gcn_zca(u8)[0].train_x.dtype == torch.float32


# ------------------------------------------------------------------------------ pad/crop/flip
def brute_force_crop(img: np.ndarray, pad: int, oy: int, ox: int, h: int, w: int,
                     flip: bool) -> np.ndarray:
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
    out = np.empty((img.shape[0], h, w), dtype=img.dtype)
    for c in range(img.shape[0]):
        for i in range(h):
            for j in range(w):
                out[c, i, j] = padded[c, oy + i, ox + (w - 1 - j if flip else j)]
    return out


def test_crops_are_exact_subwindows_and_flips_exact(device: torch.device):
    x = torch.randn(8, 3, 32, 32, device=device) + 3.0  # nonzero, so padding is recognisable
    g = torch.Generator(device=device).manual_seed(0)
    out, offsets, flips = pad_crop_flip(x, pad=4, generator=g, return_params=True)
    assert out.shape == (8, 3, 32, 32) and out.device.type == device.type
    xs, outs = x.cpu().numpy(), out.cpu().numpy()
    for k in range(8):
        oy, ox = offsets[k].tolist()
        ref = brute_force_crop(xs[k], 4, oy, ox, 32, 32, bool(flips[k]))
        assert np.array_equal(outs[k], ref)
    # Without trusting the returned parameters: every crop is one of the 9 x 9 x 2 candidates.
    for k in range(3):
        padded = np.pad(xs[k], ((0, 0), (4, 4), (4, 4)))
        hits = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)
                if np.array_equal(outs[k], (lambda w: w[..., ::-1] if f else w)(
                    padded[:, oy : oy + 32, ox : ox + 32]))]
        assert hits == [(*offsets[k].tolist(), bool(flips[k]))]


def test_a_cpu_generator_gives_the_same_crops_on_every_device(device: torch.device):
    x = torch.randn(10, 3, 32, 32)
    ref = pad_crop_flip(x, generator=torch.Generator().manual_seed(9))
    got = pad_crop_flip(x.to(device), generator=torch.Generator().manual_seed(9))
    assert got.device.type == device.type and torch.equal(got.cpu(), ref)


def test_offsets_cover_0_to_8_uniformly_and_flips_are_fair():
    x = torch.ones(9000, 1, 2, 2)
    _, offsets, flips = pad_crop_flip(x, pad=4, size=2, generator=torch.Generator().manual_seed(1),
                                      return_params=True)
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=9)
        assert counts.numel() == 9 and int(counts.min()) > 800 and int(counts.max()) < 1200
    assert 0.47 < flips.double().mean().item() < 0.53


def test_same_seed_same_batch_and_other_options():
    x = torch.randn(16, 3, 12, 12)

    def run(seed: int, **kw):
        return pad_crop_flip(x, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))
    _, _, flips = run(5, flip=False, return_params=True)
    assert not flips.any()
    # pad 0 and a smaller, non-square window: the ImageNet-style random crop.
    out, offsets, flips = run(7, pad=0, size=(8, 10), return_params=True)
    assert out.shape == (16, 3, 8, 10)
    assert int(offsets[:, 0].max()) <= 4 and int(offsets[:, 1].max()) <= 2
    for k in range(4):
        ref = brute_force_crop(x[k].numpy(), 0, *offsets[k].tolist(), 8, 10, bool(flips[k]))
        assert np.array_equal(out[k].numpy(), ref)
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert pad_crop_flip(u8, generator=torch.Generator().manual_seed(0)).dtype == torch.uint8


def test_pad_crop_flip_errors():
    with pytest.raises(ValueError, match=r"expected images \(N, C, H, W\)"):
        pad_crop_flip(torch.ones(3, 32, 32))
    with pytest.raises(ValueError, match=r"crop size \(41, 41\) does not fit"):
        pad_crop_flip(torch.ones(1, 3, 32, 32), size=41)
    with pytest.raises(ValueError, match="pad must be >= 0"):
        pad_crop_flip(torch.ones(1, 3, 32, 32), pad=-1)
