"""RunningStats against brute-force numpy statistics: moments, extremes, counts, merges, state."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biasshift.monitor import running
from biasshift.monitor.running import (
    STAT_COLUMNS,
    RunningStats,
    ScratchPool,
    empty_state,
    merge_states,
    state_to_stats,
    summarize,
)


def reference(values: np.ndarray) -> dict[str, np.ndarray]:
    """Brute-force per-unit statistics of ``values`` (samples, units), float64 numpy."""
    v = np.asarray(values, dtype=np.float64)
    fin = np.isfinite(v)
    count = fin.sum(axis=0)
    out: dict[str, list[float]] = {c: [] for c in STAT_COLUMNS}
    for u in range(v.shape[1]):
        x = v[fin[:, u], u]
        n = x.size
        out["count"].append(n)
        out["nonfinite"].append(v.shape[0] - n)
        if n == 0:
            for c in ("mean", "var", "std", "min", "max", "frac_negative", "frac_zero"):
                out[c].append(math.nan)
            continue
        mean = math.fsum(x) / n
        var = math.fsum((x - mean) ** 2) / n
        out["mean"].append(mean)
        out["var"].append(var)
        out["std"].append(math.sqrt(var))
        out["min"].append(x.min())
        out["max"].append(x.max())
        out["frac_negative"].append((x < 0).sum() / n)
        out["frac_zero"].append((x == 0).sum() / n)
    res = {c: np.asarray(out[c], dtype=np.float64) for c in STAT_COLUMNS}
    assert (res["count"] == count).all()
    return res


def assert_stats_match(got: dict[str, torch.Tensor], ref: dict[str, np.ndarray], *,
                       rtol: float, atol: float = 0.0) -> None:
    for c in ("count", "nonfinite", "min", "max", "frac_negative", "frac_zero"):
        np.testing.assert_array_equal(got[c].cpu().numpy().astype(np.float64), ref[c],
                                      err_msg=c)
    # the mean's error is relative to the unit's spread (means near zero have no relative scale)
    np.testing.assert_allclose(got["mean"].cpu().numpy(), ref["mean"], rtol=rtol,
                               atol=atol + rtol * np.nan_to_num(ref["std"]).max(), err_msg="mean")
    for c in ("var", "std"):
        np.testing.assert_allclose(got[c].cpu().numpy(), ref[c], rtol=rtol, atol=atol, err_msg=c)


def _poison(x: torch.Tensor, gen: torch.Generator, frac: float = 0.05) -> torch.Tensor:
    """Replace a fraction of entries by NaN, +inf and -inf (one whole unit too)."""
    x = x.clone()
    r = torch.rand(x.shape, generator=gen)
    x[r < frac / 3] = math.nan
    x[(r >= frac / 3) & (r < 2 * frac / 3)] = math.inf
    x[(r >= 2 * frac / 3) & (r < frac)] = -math.inf
    return x


@pytest.mark.parametrize("buffer_rows", [0, 50, 10_000])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_against_brute_force_with_nonfinite(buffer_rows: int, compute_dtype: torch.dtype,
                                             device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    units = 7
    batches = []
    for i, n in enumerate([13, 1, 40, 64, 7, 90]):
        x = torch.randn(n, units, generator=gen) * 2 + 0.5
        x[:, 3] = torch.relu(x[:, 3])  # exact zeros
        x[:, 4] = torch.round(x[:, 4])  # zeros and ties
        if i == 2:
            x[:, 5] = math.nan  # a whole batch of one unit is missing
        batches.append(_poison(x, gen))
    batches[0][:, 6] = math.nan  # a unit whose first samples are non-finite
    rs = RunningStats(units, device, compute_dtype=compute_dtype, buffer_rows=buffer_rows)
    for b in batches:
        rs.update(b.to(device), unit_dim=1)
    ref = reference(torch.cat(batches).numpy())
    rtol = 1e-13 if compute_dtype == torch.float64 else 1e-6
    assert_stats_match(rs.stats(), ref, rtol=rtol)


def test_unit_without_finite_samples_reports_nan() -> None:
    x = torch.randn(20, 3)
    x[:, 1] = math.nan
    x[:5, 2] = math.inf
    rs = RunningStats(3)
    rs.update(x, 1)
    s = rs.stats()
    assert s["count"].tolist() == [20, 0, 15]
    assert s["nonfinite"].tolist() == [0, 20, 5]
    for c in ("mean", "var", "std", "min", "max", "frac_negative", "frac_zero"):
        assert math.isnan(s[c][1].item()), c
        assert math.isfinite(s[c][0].item()) and math.isfinite(s[c][2].item()), c


def test_huge_finite_values_are_not_nonfinite() -> None:
    x = torch.tensor([[3e38], [-3e38], [1.0], [math.inf]], dtype=torch.float32)
    rs = RunningStats(1)
    rs.update(x, 1)
    s = rs.stats()
    assert s["count"].item() == 3 and s["nonfinite"].item() == 1
    assert s["min"].item() == pytest.approx(-3e38, rel=1e-6)
    assert s["max"].item() == pytest.approx(3e38, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_accumulated_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3000, 5, generator=gen) * 3 + 100).to(dtype)
    for buffer_rows in (0, 4096):
        rs = RunningStats(5, buffer_rows=buffer_rows)
        for part in x.split(700):
            rs.update(part, 1)
        # float32 sums of exactly representable values: as good as float32 data
        assert_stats_match(rs.stats(), reference(x.double().numpy()), rtol=1e-6)


@pytest.mark.slow
def test_large_offset_float32_1e7_samples() -> None:
    """1e7 samples of 1e4 + N(0, 1) in float32: no catastrophic cancellation."""
    gen = torch.Generator().manual_seed(3)
    n, units = 5_000_000, 2
    x = (1e4 + torch.randn(n, units, generator=gen, dtype=torch.float64)).float()
    rs = RunningStats(units, buffer_rows=1 << 16)
    for part in x.split(250_000):
        rs.update(part, 1)
    cols = np.ascontiguousarray(x.double().numpy().T)
    s = rs.stats()
    for u in range(units):
        c = cols[u]
        mean = math.fsum(c) / n
        var = math.fsum((c - mean) ** 2) / n
        assert s["var"][u].item() == pytest.approx(var, rel=2e-7)
        assert s["mean"][u].item() == pytest.approx(mean, rel=1e-13)
        assert var == pytest.approx(1.0, rel=1e-2)  # the data are what we think


@pytest.mark.slow
@pytest.mark.parametrize("offset, spread", [(1e6, 1e-3)])
def test_large_offset_float64_exact_to_last_digits(offset: float, spread: float) -> None:
    """float64 data 1e6 + 1e-3 N(0, 1), 1e7 samples (2 units x 5e6): relative error ~1e-15."""
    gen = torch.Generator().manual_seed(4)
    n, units = 5_000_000, 2
    x = offset + spread * torch.randn(n, units, generator=gen, dtype=torch.float64)
    rs = RunningStats(units, compute_dtype=torch.float64, buffer_rows=1 << 15)
    for part in x.split(400_000):
        rs.update(part, 1)
    cols = np.ascontiguousarray(x.numpy().T)
    s = rs.stats()
    for u in range(units):
        c = cols[u]
        d = c - c[0]
        dm = math.fsum(d) / n
        var = math.fsum((d - dm) ** 2) / n
        assert s["var"][u].item() == pytest.approx(var, rel=1e-13)
        # the reported mean is a float64 near the offset: correct to one unit in the last place
        assert abs(s["mean"][u].item() - (c[0] + dm)) <= math.ulp(offset)


def test_textbook_one_pass_formula_would_fail_here() -> None:
    """Sanity check of the test above: the naive float64 E[x²] - E[x]² is useless at 1e6."""
    gen = torch.Generator().manual_seed(4)
    x = 1e6 + 1e-3 * torch.randn(100_000, dtype=torch.float64, generator=gen)
    naive = (x * x).mean() - x.mean() ** 2
    assert abs(naive.item() / x.var(correction=0).item() - 1) > 1e-3


def test_float32_counts_stay_exact_when_batches_are_split(monkeypatch) -> None:
    monkeypatch.setitem(running._MAX_EXACT_ROWS, torch.float32, 64)
    gen = torch.Generator().manual_seed(5)
    x = _poison(torch.randn(50, 4, 6, generator=gen), gen, frac=0.2)  # 24 rows per sample
    ref = reference(x.permute(0, 2, 1).reshape(-1, 4).numpy())
    assert_stats_match(state_to_stats(summarize(x, 1)), ref, rtol=1e-6)
    # unit dim 0: split along dim 1
    xt = x.transpose(0, 1).contiguous()
    assert_stats_match(state_to_stats(summarize(xt, 0)), ref, rtol=1e-6)
    # one sample has more positions than can be counted exactly: promoted to float64
    big = _poison(torch.randn(2, 3, 100, generator=gen), gen)
    ref = reference(big.permute(0, 2, 1).reshape(-1, 3).numpy())
    assert_stats_match(state_to_stats(summarize(big, 1)), ref, rtol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_summarize_any_layout(layout: str) -> None:
    gen = torch.Generator().manual_seed(6)
    x = _poison(torch.randn(4, 5, 6, 7, generator=gen), gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(4, 10, 6, 14, generator=gen)[:, ::2, :, ::2]
    ref = reference(x.permute(0, 2, 3, 1).reshape(-1, 5).numpy())
    pool = ScratchPool()
    for _ in range(2):  # second time reuses the scratch tensors
        assert_stats_match(state_to_stats(summarize(x, 1, scratch=pool)), ref, rtol=1e-6)


def test_summarize_empty_and_bad_input() -> None:
    st_ = summarize(torch.empty(0, 3), 1)
    assert torch.equal(st_, empty_state(3))
    with pytest.raises(TypeError, match="floating point"):
        summarize(torch.ones(3, 2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="compute_dtype"):
        summarize(torch.ones(3, 2), 1, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="units"):
        RunningStats(0)
    rs = RunningStats(3)
    with pytest.raises(ValueError, match="expected 3 units"):
        rs.update(torch.ones(4, 5), 1)


# -- merging --------------------------------------------------------------------------------------
_finite64 = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.lists(_finite64 | st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
                           min_size=3, max_size=3), min_size=1, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
    buffer_rows=st.sampled_from([0, 1, 5, 64]),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_any_split_gives_the_same_statistics(data, cuts, buffer_rows, offset) -> None:
    x = torch.tensor(data, dtype=torch.float64) + offset
    edges = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    rs = RunningStats(3, compute_dtype=torch.float64, buffer_rows=buffer_rows)
    for a, b in itertools.pairwise(edges):
        rs.update(x[a:b], 1)
    whole = RunningStats(3, compute_dtype=torch.float64)
    whole.update(x, 1)
    got, ref = rs.stats(), whole.stats()
    for c in STAT_COLUMNS:
        np.testing.assert_allclose(got[c].numpy(), ref[c].numpy(), rtol=1e-12,
                                   atol=1e-12 * (1 + offset), err_msg=c)
    # the numpy reference rounds too: its std of three equal values of 683 is 1.1e-13
    assert_stats_match(got, reference(x.numpy()), rtol=1e-11, atol=1e-12 * (1 + offset))


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 30), b=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_merge_states_is_chan_merge(a: int, b: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    xa = torch.randn(a, 4, generator=gen, dtype=torch.float64) * 3 + 7
    xb = torch.randn(b, 4, generator=gen, dtype=torch.float64) - 2
    merged = merge_states(summarize(xa, 1, compute_dtype=torch.float64),
                          summarize(xb, 1, compute_dtype=torch.float64))
    ref = reference(torch.cat([xa, xb]).numpy())
    assert_stats_match(state_to_stats(merged), ref, rtol=1e-12, atol=1e-14)


def test_merging_an_empty_state_changes_nothing_bitwise() -> None:
    x = torch.randn(30, 5, dtype=torch.float64) + 3
    s = summarize(x, 1, compute_dtype=torch.float64)
    assert torch.equal(merge_states(s, empty_state(5)), s)
    assert torch.equal(merge_states(empty_state(5), s), s)


def test_merge_of_two_accumulators() -> None:
    gen = torch.Generator().manual_seed(7)
    x = _poison(torch.randn(300, 6, generator=gen), gen)
    a = RunningStats(6, buffer_rows=64)
    b = RunningStats(6, buffer_rows=64)
    a.update(x[:120], 1)
    b.update(x[120:], 1)
    a.merge_(b)
    assert_stats_match(a.stats(), reference(x.numpy()), rtol=1e-6)
    with pytest.raises(ValueError, match="same units"):
        a.merge_(RunningStats(5))


# -- state -----------------------------------------------------------------------------------------
def test_reading_stats_does_not_change_the_result_bitwise() -> None:
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randn(37, 4, generator=gen) + 5 for _ in range(12)]
    a = RunningStats(4, buffer_rows=100)
    b = RunningStats(4, buffer_rows=100)
    for i, x in enumerate(batches):
        a.update(x, 1)
        b.update(x, 1)
        if i % 3 == 0:
            b.stats()
            b.state()
    assert torch.equal(a.state(), b.state())


@pytest.mark.parametrize("buffer_rows", [0, 100])
def test_state_dict_round_trip_is_bit_identical(buffer_rows: int, tmp_path) -> None:
    gen = torch.Generator().manual_seed(9)
    batches = [_poison(torch.randn(37, 4, generator=gen) + 5, gen) for _ in range(10)]
    from biasshift.monitor.histogram import HistogramSpec

    spec = HistogramSpec(bins=8, range=(2.0, 8.0))
    full = RunningStats(4, buffer_rows=buffer_rows, histogram=spec)
    for x in batches:
        full.update(x, 1)
    first = RunningStats(4, buffer_rows=buffer_rows, histogram=spec)
    for x in batches[:5]:
        first.update(x, 1)
    torch.save(first.state_dict(), tmp_path / "rs.pt")
    resumed = RunningStats(4, histogram=spec)
    resumed.load_state_dict(torch.load(tmp_path / "rs.pt"))
    assert resumed.buffer_rows == buffer_rows
    for x in batches[5:]:
        resumed.update(x, 1)
    assert torch.equal(resumed.state(), full.state())
    assert torch.equal(resumed.histogram_counts(), full.histogram_counts())
    assert resumed.batches == full.batches == 10


def test_load_state_dict_rejects_mismatches() -> None:
    rs = RunningStats(4)
    rs.update(torch.randn(5, 4), 1)
    sd = rs.state_dict()
    with pytest.raises(ValueError, match="units"):
        RunningStats(3).load_state_dict(sd)
    with pytest.raises(ValueError, match="histogram"):
        RunningStats(4, histogram=running.HistogramSpec()).load_state_dict(sd)
    with pytest.raises(KeyError, match="state"):
        RunningStats(4).load_state_dict({k: v for k, v in sd.items() if k != "state"})


def test_reset_and_state_to_stats_columns() -> None:
    rs = RunningStats(2, buffer_rows=10)
    rs.update(torch.ones(3, 2), 1)
    rs.reset()
    assert rs.stats()["count"].tolist() == [0, 0]
    assert set(state_to_stats(empty_state(2))) == set(STAT_COLUMNS)


def test_standalone_device_normalisation(device: torch.device) -> None:
    rs = RunningStats(3, device.type)  # "cuda" without an index still matches cuda:0 batches
    rs.update(torch.randn(4, 3, device=device), 1)
    assert rs.stats()["count"].device.type == device.type


@pytest.mark.parametrize("layout", ["rows_units", "units_rows", "nchw", "channels_last"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_tiled_reduction_matches_brute_force(layout: str, compute_dtype: torch.dtype,
                                             monkeypatch) -> None:
    """Tiles of a few elements (the first one without finite values for a unit) add up."""
    monkeypatch.setattr(running, "_TILE_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(10)
    if layout in ("nchw", "channels_last"):
        x = _poison(torch.randn(9, 4, 3, 2, generator=gen) * 3 + 100, gen)
        x[:2, 1] = math.nan  # unit 1 has no finite value in the first tile
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        unit_dim, flat = 1, x.permute(0, 2, 3, 1).reshape(-1, 4)
    else:
        flat = _poison(torch.randn(50, 4, generator=gen) * 3 + 100, gen)
        flat[:8, 1] = math.nan
        x, unit_dim = (flat, 1) if layout == "rows_units" else (flat.t().contiguous(), 0)
    rtol = 1e-13 if compute_dtype == torch.float64 else 1e-6
    got = state_to_stats(summarize(x, unit_dim, compute_dtype=compute_dtype))
    assert_stats_match(got, reference(flat.numpy()), rtol=rtol)


@pytest.mark.parametrize("layout", ["rows_units", "nchw", "channels_last", "nct"])
def test_staging_buffer_layouts(layout: str) -> None:
    """The buffer is (rows, units) for unit-last batches and (units, rows) otherwise."""
    gen = torch.Generator().manual_seed(11)
    shapes = {"rows_units": (6, 5), "nchw": (3, 5, 2, 2), "channels_last": (3, 5, 2, 2),
              "nct": (3, 5, 4)}
    batches = [torch.randn(shapes[layout], generator=gen) for _ in range(7)]
    if layout == "channels_last":
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    rs = RunningStats(5, buffer_rows=40)
    for b in batches:
        rs.update(b, 1)
    expect = "units_first" if layout in ("nchw", "nct") else "units_last"
    assert rs._layout == expect
    assert rs._buffer is not None and rs._buffer.shape == (
        (40, 5) if expect == "units_last" else (5, 40))
    flat = torch.cat([b.movedim(1, -1).reshape(-1, 5) for b in batches])
    assert_stats_match(rs.stats(), reference(flat.numpy()), rtol=1e-6)


# -- the fused reduction against the tiled reference -----------------------------------------------
_LAYOUTS = ["rows_units", "units_rows", "nchw", "channels_last", "strided"]


def _layout_batch(layout: str, n: int, units: int, gen: torch.Generator,
                  dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    if layout == "rows_units":
        return torch.randn(n, units, generator=gen, dtype=torch.float64).to(dtype), 1
    if layout == "units_rows":
        return torch.randn(units, n, generator=gen, dtype=torch.float64).to(dtype), 0
    x = torch.randn(n, units, 3, 2, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), 1
    if layout == "strided":
        return x[:, :, ::2], 1
    return x, 1


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from(_LAYOUTS),
    units=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    scale=st.sampled_from([1.0, 1e-3, 1e4]),
    offset=st.sampled_from([0.0, 3.0, -1e4]),
    buffer_rows=st.sampled_from([0, 7, 100]),
    tile=st.sampled_from([None, 40]),
    nonfinite=st.booleans(),
    finite_first=st.sampled_from([None, False, True]),
    width=st.sampled_from([None, 3, 8]),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_tiled_reference_bit_for_bit(layout, units, sizes, dtype, scale, offset,
                                                  buffer_rows, tile, nonfinite, finite_first,
                                                  width, seed) -> None:
    """The fused path (default), with and without finite-first tiles (the CPU's default: some
    tiles finite, others redone with the masked kernels), and the tiled reference
    (``fused=False``) give the same state bit for bit, whatever the layout, dtype, tiling and
    staging; on finite data and with NaN/±inf mixed in (the weaker "equal to float64
    rounding" holds a fortiori). Counts are compared exactly and checked against brute force
    too. ``width``: the fused extremes on regrouped rows (:func:`running._extreme_into`) even
    for these small tiles."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        x, unit_dim = _layout_batch(layout, n, units, gen, dtype)
        x = (x.double() * scale + offset).to(dtype)
        if nonfinite:
            x = _poison(x.double(), gen, frac=0.3).to(dtype)
            if x.shape[unit_dim] > 1:
                x.select(unit_dim, 0).fill_(math.nan)  # a unit without finite values
        batches.append((x, unit_dim))
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    with pytest.MonkeyPatch.context() as mp:
        if tile is not None:
            mp.setattr(running, "_TILE_ELEMENTS", tile)
        if width is not None:
            mp.setattr(running, "_EXTREME_WIDTH", width)
        fused = RunningStats(units, compute_dtype=cd, buffer_rows=buffer_rows,
                             finite_first=finite_first)
        ref = RunningStats(units, compute_dtype=cd, buffer_rows=buffer_rows, fused=False)
        assert fused.fused and not ref.fused
        for x, unit_dim in batches:
            fused.update(x, unit_dim)
            ref.update(x, unit_dim)
            want_b = summarize(x, unit_dim, compute_dtype=cd, fused=False)
            for ff in (None, False, True):
                assert torch.equal(summarize(x, unit_dim, compute_dtype=cd, finite_first=ff),
                                   want_b)
        a, b = fused.state(), ref.state()
    assert torch.equal(a, b), (a - b).abs().max()
    flat = torch.cat([x.movedim(d, -1).reshape(-1, units) for x, d in batches]).double()
    got = state_to_stats(a)
    want = reference(flat.numpy())
    for c in ("count", "nonfinite", "min", "max", "frac_negative", "frac_zero"):
        np.testing.assert_array_equal(got[c].numpy().astype(np.float64), want[c], err_msg=c)


@pytest.mark.parametrize("fused", [True, False])
def test_summarize_leaves_the_callers_shift_alone(fused: bool) -> None:
    x = torch.randn(20, 3) + 5
    shift = torch.tensor([5.0, math.nan, math.inf])
    st_ = summarize(x, 1, shift=shift, fused=fused)
    assert torch.equal(shift.isnan(), torch.tensor([False, True, False])) and shift[2] == math.inf
    # a non-finite shift is used as 0: only the float32 accuracy of the moments suffers
    assert_stats_match(state_to_stats(st_), reference(x.numpy()), rtol=1e-4)


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "overflow"])
def test_finite_first_redoes_exactly_the_tiles_with_nonfinite_sums(poison: str,
                                                                   monkeypatch) -> None:
    """Finite first: one non-finite value (or finite values whose squares overflow float32)
    sends its tile, and only its tile, to the masked kernels; the state equals the reference."""
    monkeypatch.setattr(running, "_TILE_ELEMENTS", 40)  # 10 rows x 4 units per tile
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "overflow": 3e30}[poison]
    x[23, 1] = value  # tile 2 of 5
    masked = []
    real = running._tile_sums_fused

    def spy(part, *a, **k):
        if not k.get("finite", False):
            masked.append(part.shape[0])
        return real(part, *a, **k)

    monkeypatch.setattr(running, "_tile_sums_fused", spy)
    got = summarize(x, 1, finite_first=True)
    assert masked == [10]
    monkeypatch.setattr(running, "_tile_sums_fused", real)
    assert torch.equal(got, summarize(x, 1, fused=False))
    assert torch.equal(got, summarize(x, 1, finite_first=False))
    stats = state_to_stats(got)
    assert stats["nonfinite"].tolist() == ([0, 1, 0, 0] if poison != "overflow" else [0] * 4)


@pytest.mark.parametrize("shape", [(1000, 2), (1001, 30), (37, 5), (5, 7), (4, 3), (64, 9, 8),
                                   (300, 1), (2050, 513), (700, 128), (20, 5, 64), (333, 96)])
@pytest.mark.parametrize("fn", [torch.amin, torch.amax])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extremes_on_regrouped_rows_equal_the_plain_reduction(shape, fn, dtype) -> None:
    """``_extreme_into`` (rows of a multiple of ``_FAST_ROW_BYTES`` reduced directly, others
    regrouped to wide rows, then the partial results and the remainder rows reduced) gives
    exactly ``fn(x, dims)``: units-last 2-D and 3-D tiles, row counts with and without a
    remainder, too few rows to regroup, NaN and ±inf, float32 and float64; other layouts take
    the plain reduction."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    x.view(-1)[::97] = math.inf
    x.view(-1)[5::101] = -math.inf
    units = shape[-1]
    dims = list(range(len(shape) - 1))
    for t in (x, torch.where(torch.rand(shape, generator=gen) < 0.01, math.nan, x)):
        for width in (8, 1024):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(running, "_EXTREME_WIDTH", width)
                out = torch.empty(units, dtype=dtype)
                running._extreme_into(fn, t, t.ndim - 1, dims, out)
            torch.testing.assert_close(out, fn(t, dims), rtol=0, atol=0, equal_nan=True)
    # units first (unit dim 0): the plain reduction
    out = torch.empty(shape[0], dtype=dtype)
    running._extreme_into(fn, x.movedim(0, -1).contiguous().movedim(-1, 0), 0,
                          list(range(1, x.ndim)), out)
    torch.testing.assert_close(out, fn(x, list(range(1, x.ndim))), rtol=0, atol=0)
