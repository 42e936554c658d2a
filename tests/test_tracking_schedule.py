"""StepSchedule (validation, log grid, epoch ends) and summarize_tracking (against pandas)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biasshift.train.tracking import StepSchedule, summarize_tracking


# ------------------------------------------------------------------------- schedule
def test_explicit_steps_must_be_strictly_increasing_and_positive() -> None:
    assert StepSchedule([1, 5, 9]).steps(100, 10) == [1, 5, 9]
    with pytest.raises(ValueError, match=r"position\(s\) 2 \(3 after 7\), 4 \(9 after 9\)"):
        StepSchedule([1, 7, 3, 9, 9])
    with pytest.raises(ValueError, match=r"1-based optimizer updates .* got 0 at position 0"):
        StepSchedule([0, 4])
    with pytest.raises(TypeError, match=r"steps\[1\] must be an integer step, got 2.5"):
        StepSchedule([1, 2.5])
    with pytest.raises(TypeError, match="integer step"):
        StepSchedule([True])
    assert StepSchedule(torch.tensor([2, 4])).steps(10, 5) == [2, 4]
    assert StepSchedule(np.array([3, 8])).steps(10, 5) == [3, 8]


def test_steps_beyond_the_fit_are_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"step\(s\) \[12, 30\] lie beyond the fit's 10"):
        assert StepSchedule([4, 12, 30]).steps(10, 5) == [4]


def test_log_spaced_grid_and_epoch_ends() -> None:
    s = StepSchedule.log_spaced(4, epoch_ends=False)
    assert s.steps(1000, 50) == [1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000]
    with_ends = StepSchedule.log_spaced(4, epoch_ends=True).steps(100, 30)
    assert with_ends == [1, 2, 3, 6, 10, 18, 30, 32, 56, 60, 90, 100]
    assert StepSchedule.log_spaced(2, first=5, last=60, epoch_ends=False).steps(1000, 10) == [
        5, 16, 50]
    assert StepSchedule((), epoch_ends=True).steps(9, 3) == [3, 6, 9]
    assert "8 per decade" in repr(StepSchedule.log_spaced(8))
    for bad, msg in (({"per_decade": 0}, "per_decade must be >= 1"),
                     ({"first": 0}, "first must be >= 1"),
                     ({"first": 10, "last": 5}, r"last \(5\) must be >= first \(10\)")):
        with pytest.raises(ValueError, match=msg):
            StepSchedule.log_spaced(**bad)


@settings(max_examples=60, deadline=None)
@given(per_decade=st.integers(1, 12), total=st.integers(1, 5000), spe=st.integers(1, 400),
       extra=st.integers(0, 3000))
def test_log_grid_properties(per_decade: int, total: int, spe: int, extra: int) -> None:
    sched = StepSchedule.log_spaced(per_decade, epoch_ends=True)
    steps = sched.steps(total, spe)
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] <= total
    # every epoch end is in, and the log grid is dense enough: consecutive grid points differ
    # by at most a factor 10^(1/per_decade) (up to rounding)
    assert set(range(spe, total + 1, spe)) <= set(steps)
    grid = StepSchedule.log_spaced(per_decade, epoch_ends=False).steps(total, spe)
    for a, b in itertools.pairwise(grid):
        assert b <= (a + 0.5) * 10 ** (1 / per_decade) + 0.5
    # a longer fit tracks a superset (extending a run keeps its tracked steps)
    longer = sched.steps(total + extra, spe)
    assert set(steps) <= set(longer)


# ------------------------------------------------------------------------- summaries
def _table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for run in ("a", "b"):
        for step in (1, 5):
            for layer, units in (("fc1", 7), ("fc2", 4)):
                for q in ("cos_grad_ng", "step_bias_shift_measured"):
                    vals = rng.normal(size=units)
                    for u, v in enumerate(vals):
                        rows.append((run, step, 1, layer, u, q, v))
    df = pd.DataFrame(rows, columns=["run", "step", "epoch", "layer", "unit", "quantity",
                                     "value"])
    df["unit"] = df["unit"].astype("Int64")
    return df


def test_summary_matches_pandas_groupby_quantiles() -> None:
    df = _table()
    df.loc[3, "value"] = np.nan
    df.loc[9, "value"] = np.inf
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    out = summarize_tracking(df, qs, pools={"all": None, "deep": ["fc2"]})
    keys = ["run", "step", "epoch", "layer", "quantity"]
    assert list(out.columns) == [*keys, "n", "nonfinite", "mean", "q0.1", "q0.25", "median",
                                 "q0.75", "q0.9", "median_abs"]
    fin = df[np.isfinite(df["value"])]
    pooled = pd.concat([fin, fin.assign(layer="all"), fin[fin["layer"] == "fc2"].assign(
        layer="deep")])
    g = pooled.groupby(keys)["value"]
    want = g.quantile(list(qs)).unstack(-1)
    got = out.set_index(keys)
    for q, col in zip(qs, ("q0.1", "q0.25", "median", "q0.75", "q0.9")):
        np.testing.assert_allclose(got[col], want.loc[got.index, q], rtol=1e-12)
    np.testing.assert_allclose(got["mean"], g.mean().loc[got.index], rtol=1e-12)
    np.testing.assert_allclose(got["median_abs"], pooled.assign(value=pooled["value"].abs())
                               .groupby(keys)["value"].median().loc[got.index], rtol=1e-12)
    assert got["n"].sum() == 3 * len(fin) - (fin["layer"] == "fc1").sum()
    bad = got[got["nonfinite"] > 0]
    # rows 3 and 9: fc1 units of two quantities (run a, step 1), also counted in "all"
    assert sorted(bad.index.get_level_values("layer")) == ["all", "all", "fc1", "fc1"]
    assert bad["nonfinite"].tolist() == [1, 1, 1, 1]


def test_summary_keeps_extra_key_columns_and_filters_quantities() -> None:
    df = _table().assign(activation="elu", optimizer="sgd")
    out = summarize_tracking(df, (0.5,), pools={}, quantities=["cos_grad_ng"])
    assert set(out["quantity"]) == {"cos_grad_ng"} and set(out["layer"]) == {"fc1", "fc2"}
    assert {"activation", "optimizer"} <= set(out.columns)
    assert "q0.5" not in out.columns and "median" in out.columns
    with pytest.raises(ValueError, match=r"quantiles must lie in \[0, 1\]"):
        summarize_tracking(df, (1.5,))
    with pytest.raises(ValueError, match="lacks the column"):
        summarize_tracking(df.drop(columns="step"))
