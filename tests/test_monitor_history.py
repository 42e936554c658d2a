"""Bounded snapshot history (issue 13, item 8): ``max_history``, ``history_device`` and
``snapshot(..., to=path)``, each over 10k training steps."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from biasshift import ActivationMonitor
from biasshift.activations import ELU

STEPS = 10_000


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), ELU(), nn.Linear(4, 2), ELU())


def _history_bytes(monitor: ActivationMonitor) -> int:
    total = 0
    for e in monitor.state_dict()["history"]:
        for part in ("state", "hist"):
            for t in (e[part] or {}).values():
                total += t.numel() * t.element_size()
    return total


@pytest.mark.slow
def test_max_history_bounds_memory_over_10k_steps() -> None:
    model = _net()
    xs = torch.randn(16, 8, 3, generator=torch.Generator().manual_seed(0))
    # a small staging buffer: a snapshot reduces the pending rows, keep them few
    monitor = ActivationMonitor(model, max_history=50, buffer_bytes=1024)
    sizes = {}
    with warnings.catch_warnings(record=True) as caught, monitor:
        warnings.simplefilter("always")
        for step in range(STEPS):
            model(xs[step % 16])
            if step % 10 == 9:  # 1,000 snapshots
                monitor.snapshot(step=step)
            if step + 1 in (1000, 5000, STEPS):
                sizes[step + 1] = _history_bytes(monitor)
    # the memory held by the history is flat once the bound is reached
    assert sizes[1000] == sizes[5000] == sizes[STEPS] > 0
    assert monitor.dropped_snapshots == STEPS // 10 - 50
    assert sum(issubclass(w.category, RuntimeWarning) for w in caught) == 1  # warned once
    hist = monitor.history()
    assert hist["step"].unique().tolist() == list(range(STEPS - 491, STEPS, 10))  # the newest
    assert len(hist) == 50 * 6  # 2 modules, 4 + 2 units
    last = hist[hist.step == STEPS - 1].drop(columns="step").reset_index(drop=True)
    pd.testing.assert_frame_equal(last, monitor.stats(), check_exact=True)
    # the bound and the count of dropped snapshots survive a checkpoint
    again = ActivationMonitor(_net(), max_history=50)
    again.load_state_dict(monitor.state_dict())
    assert again.dropped_snapshots == STEPS // 10 - 50
    pd.testing.assert_frame_equal(again.history(), hist, check_exact=True)
    monitor.reset(history=True)
    assert monitor.dropped_snapshots == 0 and monitor.history().empty


@pytest.mark.slow
def test_snapshot_to_path_keeps_memory_flat_over_10k_steps(tmp_path) -> None:
    model = _net()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(16, 8, 3, generator=gen)
    path = tmp_path / "spill" / "history.csv"
    monitor = ActivationMonitor(model, buffer_bytes=1024)
    expected = {}
    with monitor:
        for step in range(STEPS):
            model(xs[step % 16])
            if step % 10 == 9:
                monitor.snapshot(to=path, step=step, loss=torch.tensor(0.5))
                if step in (9, 4999, STEPS - 1):
                    assert _history_bytes(monitor) == 0  # nothing kept in memory
                    expected[step] = monitor.stats()
    assert monitor.history().empty
    df = pd.read_csv(path, dtype={"module": str})
    assert list(df.columns) == ["step", "loss", *monitor.history().columns]
    assert len(df) == STEPS // 10 * 6
    assert df["step"].unique().tolist() == list(range(9, STEPS, 10))
    for step, want in expected.items():
        got = df[df.step == step].drop(columns=["step", "loss"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_exact=True)  # CSV floats round-trip
    assert (df.groupby("step")["count"].max().to_numpy()
            == 8 * np.arange(10, STEPS + 1, 10)).all()


def test_spill_with_histograms_and_mismatched_columns(tmp_path) -> None:
    model = _net()
    monitor = ActivationMonitor(model, histogram=dict(bins=4, range=(-1, 1)))
    path = tmp_path / "h.csv"
    with monitor:
        for step in range(3):
            model(torch.randn(5, 3))
            monitor.snapshot(to=path, epoch=step)
    hh = pd.read_csv(tmp_path / "h.hist.csv", dtype={"module": str})
    assert list(hh.columns) == ["epoch", "module", "unit", "bin", "bin_left", "bin_right",
                                "count"]
    final = monitor.histograms()
    got = hh[hh.epoch == 2].drop(columns="epoch").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, final, check_dtype=False)
    assert len(pd.read_csv(path)) == 3 * 6
    with pytest.raises(ValueError, match="columns"):
        monitor.snapshot(to=path, step=1)  # other tags than the file's
    with pytest.raises(ValueError, match="max_history"):
        ActivationMonitor(model, max_history=0)
    bounded = ActivationMonitor(model, max_history=2, histogram=dict(bins=4, range=(-1, 1)))
    with bounded, pytest.warns(RuntimeWarning, match="max_history"):
        for step in range(5):
            model(torch.randn(5, 3))
            bounded.snapshot(step=step)
    assert bounded.histogram_history()["step"].unique().tolist() == [3, 4]
    assert bounded.dropped_snapshots == 3
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="writable"):
        monitor.snapshot(to=blocker / "h.csv", epoch=0)


def test_history_device_cpu() -> None:
    model = _net()
    monitor = ActivationMonitor(model, history_device="cpu")
    with monitor:
        model(torch.randn(4, 3))
        monitor.snapshot(step=torch.tensor(1))
    entry = monitor.state_dict()["history"][0]
    assert all(t.device.type == "cpu" for t in entry["state"].values())
    assert monitor.history()["step"].tolist() == [1] * 6


@pytest.mark.cuda
def test_history_device_moves_snapshots_off_the_gpu() -> None:
    model = _net().cuda()
    monitor = ActivationMonitor(model, history_device="cpu")
    with monitor:
        model(torch.randn(4, 3, device="cuda"))
        monitor.snapshot(step=1)
    entry = monitor.state_dict()["history"][0]
    assert all(t.device.type == "cpu" for t in entry["state"].values())
    assert (monitor.history()["count"] == 4).all()
