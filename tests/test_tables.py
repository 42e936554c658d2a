"""Tensor-first results: UnitFisher.quantities (device tensors) and report (its table), and the
tidy-table module's one batched host transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from biasshift import UnitFisher
from biasshift.fisher.tables import long_frame, to_host, wide_frame


def test_report_is_the_table_of_quantities() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    uf = UnitFisher(model, fisher="exact")
    uf.accumulate(x, y)
    q = uf.quantities(1e-3)
    df = uf.report(1e-3)
    assert list(q) == ["0", "2"] and q["0"].units == 4 and q["0"].n_samples == 30
    assert list(df.columns[:6]) == ["layer", "unit", "n_samples", "n_pairs", "damping", "solver"]
    for layer, lq in q.items():
        rows = df[df["layer"] == layer]
        assert rows["unit"].tolist() == list(range(lq.units))
        assert (rows["solver"] == lq.solver).all() and (rows["damping"] == 1e-3).all()
        for name, t in lq.tensors.items():
            assert isinstance(t, torch.Tensor) and t.shape == (lq.units,)
            np.testing.assert_array_equal(rows[name].to_numpy(), t.numpy(), err_msg=name)


def test_to_host_is_one_transfer_and_checks_shapes(monkeypatch) -> None:
    calls = []
    orig = torch.Tensor.cpu

    def cpu(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    host = to_host({"a": torch.arange(3.0), "b": torch.ones(3, dtype=torch.float32)})
    assert len(calls) == 1 and host["a"].dtype == np.float64
    np.testing.assert_array_equal(host["b"], np.ones(3))
    with pytest.raises(ValueError, match="1-d tensors of one length"):
        to_host({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_long_and_wide_frames() -> None:
    vals = np.arange(10.0).reshape(2, 5)
    df = long_frame(["x", "y"], [2, 3], ["q1", "q2"], vals)
    assert df["layer"].tolist() == ["x", "x", "y", "y", "y"] * 2
    assert df["unit"].tolist() == [0, 1, 0, 1, 2] * 2
    assert df["quantity"].tolist() == ["q1"] * 5 + ["q2"] * 5
    assert df["value"].tolist() == list(range(10))
    wide = wide_frame([{"layer": "x", "units": 2, "c": 7}, {"layer": "y", "units": 3, "c": 8}],
                      {"q1": vals[0]}, ["layer", "unit", "c", "q1"])
    assert wide["c"].tolist() == [7, 7, 8, 8, 8] and wide["q1"].tolist() == [0, 1, 2, 3, 4]
