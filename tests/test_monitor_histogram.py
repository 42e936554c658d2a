"""Per-unit fixed-bin histograms against numpy.histogram and brute-force edge comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from biasshift.monitor import running
from biasshift.monitor.histogram import HistogramSpec, accumulate_histogram, histogram_frame
from biasshift.monitor.running import RunningStats


def brute_force(values: np.ndarray, spec: HistogramSpec) -> np.ndarray:
    """(units, bins + 2): underflow, bins, overflow by comparisons with the reported edges."""
    e = spec.edges()
    out = np.zeros((values.shape[1], spec.bins + 2), dtype=np.int64)
    for u in range(values.shape[1]):
        x = values[:, u]
        x = x[np.isfinite(x)]
        out[u, 0] = (x < e[0]).sum()
        out[u, -1] = (x >= e[-1]).sum()
        for k in range(spec.bins):
            out[u, k + 1] = ((x >= e[k]) & (x < e[k + 1])).sum()
    return out


def _counts(x: torch.Tensor, unit_dim: int, spec: HistogramSpec) -> np.ndarray:
    counts = torch.zeros(x.shape[unit_dim], spec.slots, dtype=torch.int64, device=x.device)
    work = torch.empty_like(x, dtype=torch.float64)
    accumulate_histogram(counts, x, unit_dim, spec, work)
    return counts.cpu().numpy()


def test_dyadic_bins_match_numpy_and_edges_exactly(device: torch.device) -> None:
    spec = HistogramSpec(bins=64, range=(-2.0, 6.0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=gen) * 2.5 + 1
    x[:, 2] = torch.nn.functional.elu(x[:, 2])
    x[:65, 3] = torch.from_numpy(spec.edges().astype(np.float32))  # every value on an edge
    x[0, 4] = 6.0  # exactly hi: overflow (half-open bins)
    x[1, 4] = -2.0  # exactly lo: first bin
    x[2, 4] = math.nan
    x[3, 4] = math.inf
    x[4, 4] = -math.inf
    x[5, 4] = -1e-9  # just below the edge 0: must not round into [0, 0.125)
    c = _counts(x.to(device), 1, spec)
    ref = brute_force(x.double().numpy(), spec)
    np.testing.assert_array_equal(c[:, : spec.bins + 2], ref)
    assert c[4, -1] == 3  # the non-finite slot
    # numpy agrees on the inner bins (numpy closes its last bin at hi; we count hi as overflow)
    for u in range(6):
        xu = x[:, u].double().numpy()
        xu = xu[np.isfinite(xu) & (xu != 6.0)]
        h, _ = np.histogram(xu, bins=spec.edges())
        np.testing.assert_array_equal(c[u, 1 : spec.bins + 1], h)


def test_non_dyadic_range_matches_numpy_on_generic_data() -> None:
    spec = HistogramSpec(bins=7, range=(-0.3, 1.1))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4000, 3, generator=gen, dtype=torch.float64) * 2 - 0.6
    c = _counts(x, 1, spec)
    np.testing.assert_array_equal(c[:, : spec.bins + 2], brute_force(x.numpy(), spec))
    for u in range(3):
        h, _ = np.histogram(x[:, u].numpy(), bins=spec.edges())
        np.testing.assert_array_equal(c[u, 1:-2], h)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_layout_units_are_channels(layout: str) -> None:
    spec = HistogramSpec(bins=10, range=(-1.0, 1.5))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, 6, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = _counts(x, 1, spec)
    ref = brute_force(x.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy(), spec)
    np.testing.assert_array_equal(c[:, :-1], ref)


@pytest.mark.parametrize("tile", [None, 40])
@pytest.mark.parametrize("buffer_rows", [0, 64, 4096])
def test_running_histogram_totals_equal_counts(buffer_rows: int, tile: int | None,
                                               monkeypatch) -> None:
    if tile is not None:  # reductions and histograms in tiles of a few samples
        monkeypatch.setattr(running, "_TILE_ELEMENTS", tile)
    spec = HistogramSpec(bins=16, range=(-2.0, 2.0))
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(50, 5, generator=gen) * 2 for _ in range(6)]
    batches[2][:7, 1] = math.nan
    batches[3][:3, 2] = -math.inf
    rs = RunningStats(5, histogram=spec, buffer_rows=buffer_rows)
    for b in batches:
        rs.update(b, 1)
    h = rs.histogram_counts().numpy()
    assert h.shape == (5, spec.bins + 2)
    np.testing.assert_array_equal(h.sum(axis=1), rs.stats()["count"].numpy())
    np.testing.assert_array_equal(h, brute_force(torch.cat(batches).double().numpy(), spec))


def test_histogram_frame_tidy_format() -> None:
    spec = HistogramSpec(bins=3, range=(0.0, 3.0))
    counts = {"a": np.arange(2 * spec.slots).reshape(2, spec.slots)}
    df = histogram_frame(counts, spec)
    assert list(df.columns) == ["module", "unit", "bin", "bin_left", "bin_right", "count"]
    assert len(df) == 2 * (spec.bins + 2)
    first = df[df.unit == 0]
    assert first.bin.tolist() == [-1, 0, 1, 2, 3]
    assert first.bin_left.tolist() == [-math.inf, 0.0, 1.0, 2.0, 3.0]
    assert first.bin_right.tolist() == [0.0, 1.0, 2.0, 3.0, math.inf]
    assert first["count"].tolist() == [0, 1, 2, 3, 4]  # the non-finite slot is not reported
    agg = histogram_frame(counts, spec, aggregate=True)
    assert "unit" not in agg.columns
    assert agg["count"].tolist() == [0 + 6, 1 + 7, 2 + 8, 3 + 9, 4 + 10]
    empty = histogram_frame({}, spec)
    assert empty.empty and list(empty.columns) == list(df.columns)


@pytest.mark.parametrize("bad, err", [
    (dict(bins=0), ValueError), (dict(bins=2.5), ValueError), (dict(range=(1.0, 1.0)), ValueError),
    (dict(range=(0.0, math.inf)), ValueError), (dict(range="ab"), ValueError),
])
def test_spec_validation(bad: dict, err: type[Exception]) -> None:
    with pytest.raises(err):
        HistogramSpec(**bad)


def test_spec_coerce() -> None:
    assert HistogramSpec.coerce(None) is None and HistogramSpec.coerce(False) is None
    assert HistogramSpec.coerce(True) == HistogramSpec()
    assert HistogramSpec.coerce({"bins": 8, "range": [-1, 1]}) == HistogramSpec(8, (-1.0, 1.0))
    with pytest.raises(TypeError, match="unknown"):
        HistogramSpec.coerce({"bins": 8, "lo": 0})
    with pytest.raises(TypeError, match="histogram must be"):
        HistogramSpec.coerce(8)
    e = HistogramSpec(bins=64, range=(-2.0, 6.0)).edges()
    assert e[0] == -2.0 and e[-1] == 6.0 and np.all(np.diff(e) == 0.125)


def _special_float32(gen: torch.Generator, n: int, spec: HistogramSpec) -> torch.Tensor:
    """Values a bin assignment can get wrong: every edge and its float32 neighbours, values
    near the range's ends, huge and tiny (subnormal) magnitudes, signed zeros, ±inf, NaN."""
    e = torch.from_numpy(spec.edges().astype(np.float32))
    up = torch.nextafter(e, torch.full_like(e, math.inf))
    down = torch.nextafter(e, torch.full_like(e, -math.inf))
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-30, -1e-30, 3.0e38, -3.0e38,
                            math.inf, -math.inf, math.nan, 1e7, -1e7], dtype=torch.float32)
    lo, hi = spec.range
    spread = torch.rand(n, generator=gen) * (hi - lo) * 1.4 + lo - 0.2 * (hi - lo)
    return torch.cat([e, up, down, special, spread.float()])


@pytest.mark.parametrize("bins,lo,hi", [(64, -2.0, 6.0), (8, 0.0, 8.0), (16, -0.5, 0.5),
                                        (3, -3.0, 0.0), (32, 1.0, 5.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float32_dyadic_path_equals_the_float64_path(bins, lo, hi, dtype) -> None:
    """Dyadic bins are counted in float32 (exact: a power-of-two scale, integer edges
    after scaling); the counts equal the float64 path's bit for bit, with every edge, its
    neighbours, huge, subnormal and non-finite values, in both layouts."""
    spec = HistogramSpec(bins=bins, range=(lo, hi))
    assert spec.dyadic_integer is not None
    gen = torch.Generator().manual_seed(bins)
    v = _special_float32(gen, 3000, spec).to(dtype)
    x = v[torch.randperm(v.numel(), generator=gen)][: (v.numel() // 4) * 4].reshape(-1, 4)
    ref = _counts(x.double(), 1, spec)  # float64 input: the float64 path
    np.testing.assert_array_equal(_counts(x, 1, spec), ref)
    # finite=True (a finite-first reduction found no NaN/Inf) skips two passes, same counts
    fin = x[torch.isfinite(x).all(1)]
    for data in (fin, fin.double()):
        c = torch.zeros(4, spec.slots, dtype=torch.int64)
        accumulate_histogram(c, data, 1, spec, torch.empty_like(data, dtype=torch.float64),
                             finite=True)
        np.testing.assert_array_equal(c.numpy(), _counts(data, 1, spec))
    np.testing.assert_array_equal(_counts(x.T.contiguous(), 0, spec), ref)
    np.testing.assert_array_equal(ref[:, : bins + 2],
                                  brute_force(x.double().numpy(), spec))


def test_dyadic_integer_names_the_exact_specs() -> None:
    assert HistogramSpec(64, (-2.0, 6.0)).dyadic_integer == (8.0, -16.0)
    assert HistogramSpec(3, (-3.0, 0.0)).dyadic_integer == (1.0, -3.0)
    # a scale below 1, not a power of two, or lo not on the scaled integer grid: float64
    assert HistogramSpec(4, (0.0, 8.0)).dyadic_integer is None
    assert HistogramSpec(10, (-1.0, 2.0)).dyadic_integer is None
    assert HistogramSpec(64, (-2.01, 5.99)).dyadic_integer is None


def test_float64_activations_on_dyadic_bins_are_exact_at_the_extremes() -> None:
    """float64 data keep the float64 path, with the same exact formula: values far below
    ``|lo|`` (which ``x - lo`` would round onto the edge 0), subnormals and huge values."""
    spec = HistogramSpec(bins=64, range=(-2.0, 6.0))
    x = torch.tensor([-1e-300, -5e-324, 5e-324, -1e-17, 1e-17, 1e308, -1e308, -2.0, 6.0,
                      -0.125, math.nextafter(0.0, -1.0), math.inf, math.nan],
                     dtype=torch.float64).reshape(-1, 1)
    c = _counts(x, 1, spec)
    np.testing.assert_array_equal(c[:, : spec.bins + 2], brute_force(x.numpy(), spec))
    assert c[0, 16] == 5  # the five tiny negatives lie in [-0.125, 0): slot 16 (bin 15)


def test_index_dtype_is_the_narrowest_the_counting_kernel_takes() -> None:
    from biasshift.monitor.histogram import index_dtype

    cpu = torch.device("cpu")
    assert index_dtype(2**15 - 1, cpu) == torch.int16
    assert index_dtype(2**15, cpu) == torch.int32
    assert index_dtype(2**31 - 1, cpu) == torch.int32
    assert index_dtype(2**31, cpu) == torch.int64
    assert index_dtype(100, torch.device("meta")) == torch.int32  # index_add_: no int16


# units * (bins + 3) slots just below 2**15 (int16 indices) and just above (int32)
@pytest.mark.parametrize(("bins", "units"), [(16, 1724), (16, 1725), (8, 2978), (8, 2979)])
@pytest.mark.parametrize("finite", [True, False])
def test_counts_on_both_sides_of_the_int16_index_limit(bins: int, units: int,
                                                       finite: bool) -> None:
    spec = HistogramSpec(bins=bins, range=(-2.0, 6.0))
    gen = torch.Generator().manual_seed(units + bins)
    x = torch.randn(40, units, generator=gen) * 3 + 1
    x[:, -1] = 6.0  # the last unit (the largest indices): all in the overflow bin
    x[0, 0] = -100.0
    if not finite:
        x[1, 1], x[2, 2], x[3, -1] = math.nan, math.inf, -math.inf
    acc = RunningStats(units, histogram=spec, buffer_rows=0)
    acc.update(x, 1)
    c = acc.histogram_counts().numpy()
    np.testing.assert_array_equal(c, brute_force(x.double().numpy(), spec))
    assert c[:, :].sum() == np.isfinite(x.numpy()).sum()
