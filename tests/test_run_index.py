"""`biasshift reproduce NAME --run-index I`: one run per process (Slurm arrays, submitit, Ray),
then `--resume` assembles the figure from the runs those processes left in the work dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from biasshift.cli import main

_REPO = Path(__file__).resolve().parents[1]
ARGS = ["activation-median", "--quick", "--epochs", "1", "--seeds", "1", "--activations",
        "elu,relu", "--no-progress", "--threads", "1"]


def _cli(tmp: Path, *extra: str) -> list[str]:
    return ["reproduce", *ARGS, "--work-dir", str(tmp / "runs"), "--out", str(tmp / "out"),
            *extra]


def test_list_runs_numbers_the_runs(tmp_path, capsys) -> None:
    assert main(_cli(tmp_path, "--list-runs")) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[:2] == ["0\telu-lr0.01-seed0", "1\trelu-lr0.01-seed0"]
    assert not (tmp_path / "runs").exists()  # listing trains nothing


def test_run_index_out_of_range_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(_cli(tmp_path, "--run-index", "2")) == 2
    err = capsys.readouterr().err
    assert "--run-index 2 is out of range" in err and "2 runs" in err and "0 to 1" in err


@pytest.mark.slow
def test_runs_in_separate_processes_assemble_into_the_figure(tmp_path, capsys) -> None:
    env = {**os.environ, "PYTHONPATH": str(_REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "BIASSHIFT_CPUS": "1", "MPLBACKEND": "Agg"}
    # both array tasks at once, sharing the work dir (each locks only its own run folder)
    procs = [subprocess.Popen([sys.executable, "-m", "biasshift.cli", *_cli(tmp_path,
                               "--run-index", str(i))], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert f"run {i} (" in out and "finished" in out
    assert not (tmp_path / "out").exists()  # no figure from a single run
    for run in ("elu-lr0.01-seed0", "relu-lr0.01-seed0"):
        assert (tmp_path / "runs" / run / "done.json").is_file()
    # a second task for an existing run without --resume refuses to discard it
    assert main(_cli(tmp_path, "--run-index", "0")) == 2
    assert "--resume" in capsys.readouterr().err
    # the assembly reuses both runs, trains nothing
    assert main(_cli(tmp_path, "--resume")) == 0
    assert "2 reused" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "activation-median.json").read_text())
    assert record["n_reused"] == 2 and record["n_runs"] == 2
    assembled = pd.read_csv(tmp_path / "out" / "activation-median.csv")
    # the same table as one process training both runs
    direct = tmp_path / "direct"
    assert main(["reproduce", *ARGS, "--work-dir", str(direct / "runs"), "--out",
                 str(direct / "out")]) == 0
    pd.testing.assert_frame_equal(assembled, pd.read_csv(direct / "out" /
                                                         "activation-median.csv"))
