"""analyses/ddp_monitor.py in one process (torchrun runs the same code on every rank; the
statistics under 2 ranks are checked by tests/test_distributed.py): it publishes the tidy
result set of the analyses."""

from __future__ import annotations

import json

import pandas as pd
from _analyses import load_analysis

from biasshift.io import check_result_set


def test_single_process_run_publishes_the_result_set(tmp_path, capsys) -> None:
    mod = load_analysis("ddp_monitor")
    assert mod.main(["--steps", "3", "--width", "0.05", "--probe-every", "2",
                     "--snapshot-every", "2", "--probe-size", "8", "--batch-size", "4",
                     "--out", str(tmp_path)]) == 0
    assert "ranks agree: True" in capsys.readouterr().out
    check_result_set(tmp_path / "ddp-monitor")
    history = pd.read_csv(tmp_path / "ddp-monitor.csv")
    assert sorted(history["step"].unique()) == [2, 3]
    # 4 samples x 32 x 32 positions per step and conv channel of the first stack
    first = history[(history["module"] == "stack1.act1") & (history["step"] == 3)]
    assert (first["count"] == 3 * 4 * 32 * 32).all()
    probe = pd.read_csv(tmp_path / "ddp-monitor.probe.csv")
    assert sorted(probe["step"].unique()) == [1, 3]
    assert set(probe["layer"]) == {"stack6.conv1", "stack7.conv1"}
    exact = pd.read_csv(tmp_path / "ddp-monitor.exact.csv")
    assert {"module", "unit", "mean", "median"} <= set(exact.columns)
    record = json.loads((tmp_path / "ddp-monitor.json").read_text())
    assert record["world_size"] == 1 and record["ranks_agree"] is True
    assert record["bytes_per_sync"]["monitor_snapshot"] == 0  # one process: no collective
