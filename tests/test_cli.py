"""The ``biasshift`` command line: list, reproduce end to end on digits, errors, resume."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from biasshift.cli import main
from biasshift.reproduce import TIDY_COLUMNS

REPO = Path(__file__).resolve().parents[1]

QUANTITIES = {
    "activation-median": {"train_loss", "test_loss", "train_acc", "test_acc", "running_loss",
                          "median_of_means"},
    "median-variance": {"train_loss", "test_loss", "train_acc", "test_acc", "running_loss",
                        "median_of_means", "median_change_var"},
    # issue 14: the summed squared error beside the training loss, and the collapse statistics
    "autoencoder": {"train_loss", "test_loss", "running_loss", "train_sse", "test_sse",
                    "recon_var_ratio", "saturated_frac", "collapsed"},
}




def reproduce(name: str, tmp: Path, *extra: str) -> int:
    return main(["reproduce", name, "--quick", "--seeds", "1", "--activations", "elu,relu",
                 "--out", str(tmp / "out"), "--work-dir", str(tmp / "runs"), "--no-progress",
                 *extra])


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"unit": "Int64"})


def test_list_names_every_analysis(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in QUANTITIES:
        assert name in out
    assert "Fig. 2" in out and "Fig. 3" in out


def test_help_and_missing_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--dataset", "--data-dir", "--epochs", "--seeds", "--activations",
                 "--device", "--out", "--resume", "--jobs", "--threads", "--lr", "--work-dir",
                 "--probe-size"):
        assert flag in out
    assert main([]) == 2


@pytest.mark.parametrize(("name", "extra"), [
    ("activation-median", ("--epochs", "2")),
    ("median-variance", ("--epochs", "3")),
    ("autoencoder", ("--epochs", "2", "--lr", "1e-2,1e-4")),
])
def test_quick_preset_end_to_end(name: str, extra: tuple[str, ...], tmp_path, capsys) -> None:
    assert reproduce(name, tmp_path, *extra) == 0
    assert f"wrote {tmp_path / 'out' / name}" in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{name}.{ext}" for ext in ("csv", "json", "pdf", "png"))
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    df = read_csv(out / f"{name}.csv")
    added = ["loss", "init"] if name == "autoencoder" else []  # issue 14
    assert list(df.columns) == [*TIDY_COLUMNS, *added]
    n_runs = 4 if name == "autoencoder" else 2
    assert df["run"].nunique() == n_runs
    assert set(df["quantity"]) == QUANTITIES[name]
    assert (df["analysis"] == name).all() and (df["dataset"] == "digits").all()
    assert set(df["activation"]) == {"elu", "relu"}
    epochs = int(extra[1])
    whole = df[df["layer"] == "all"]
    assert sorted(whole["epoch"].unique()) == list(range(epochs + 1))
    # one row per run x epoch x layer x quantity (x unit for per-unit quantities)
    assert not df.duplicated(["run", "epoch", "layer", "unit", "quantity"]).any()
    per_unit = df[df["unit"].notna()]
    assert set(per_unit["quantity"]) <= {"median_change_var"}
    if name == "median-variance":
        assert len(per_unit) == n_runs * 5 * 256
        assert (per_unit["epoch"] == epochs).all()

    record = json.loads((out / f"{name}.json").read_text())
    for key in ("command", "biasshift", "torch", "git_revision", "device", "wall_time_s",
                "settings", "n_runs", "runs", "quick", "preset"):
        assert key in record
    assert record["command"].startswith(f"biasshift reproduce {name} --quick")
    assert record["quick"] is True and record["preset"] == "quick"
    assert record["device"] == "cpu" and record["n_runs"] == n_runs
    assert record["settings"]["epochs"] == epochs and record["settings"]["dataset"] == "digits"
    assert record["wall_time_s"] > 0
    assert record["tidy_columns"] == [*TIDY_COLUMNS, *added]


def test_quick_defaults_write_under_figures_quick(tmp_path, monkeypatch) -> None:
    # run folders go to the user cache (issue 13, item 15), never into the working directory
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc = main(["reproduce", "activation-median", "--quick", "--epochs", "1", "--seeds", "1",
               "--activations", "elu", "--no-progress"])
    assert rc == 0
    assert (work / "figures" / "quick" / "activation-median.csv").exists()
    assert (tmp_path / "cache" / "biasshift" / "runs" / "quick" / "activation-median"
            / "elu-lr0.01-seed0" / "done.json").exists()
    assert not (work / "figures" / "activation-median.csv").exists()
    assert [p.name for p in work.iterdir()] == ["figures"]


def test_unknown_analysis_exits_2_with_close_names(capsys) -> None:
    assert main(["reproduce", "activation-medain", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'activation-median'" in err and "Traceback" not in err


def test_unknown_activation_exits_2_listing_the_names(tmp_path, capsys) -> None:
    assert reproduce("activation-median", tmp_path, "--activations", "elu,swish") == 2
    err = capsys.readouterr().err
    assert "unknown activation 'swish'" in err
    for known in ("'elu'", "'relu'", "'lrelu'", "'srelu'"):
        assert known in err
    assert not (tmp_path / "out").exists()


def test_missing_data_exits_2_with_the_data_modules_message(tmp_path, monkeypatch,
                                                           capsys) -> None:
    monkeypatch.delenv("BIASSHIFT_DATA", raising=False)
    monkeypatch.setenv("BIASSHIFT_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["reproduce", "activation-median", "--data-dir", str(empty), "--epochs", "1",
               "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "runs"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("biasshift: error: ") and "mnist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_reuses_finished_runs_and_continues_partial_ones(tmp_path, capsys) -> None:
    # an interrupted analysis: every run has 1 of 2 epochs (a finished run keeps its checkpoint
    # only with --keep-checkpoints, issue 13 item 15)
    assert reproduce("activation-median", tmp_path, "--epochs", "1", "--keep-checkpoints") == 0
    assert reproduce("activation-median", tmp_path, "--epochs", "2", "--resume") == 0
    record = json.loads((tmp_path / "out" / "activation-median.json").read_text())
    assert [r["resumed_from_epoch"] for r in record["runs"]] == [1, 1]
    resumed = read_csv(tmp_path / "out" / "activation-median.csv")

    fresh_dir = tmp_path / "fresh"
    assert reproduce("activation-median", fresh_dir, "--epochs", "2") == 0
    pd.testing.assert_frame_equal(read_csv(fresh_dir / "out" / "activation-median.csv"),
                                  resumed, check_exact=True)

    # everything finished: --resume reuses every run and rewrites the same table
    capsys.readouterr()
    assert reproduce("activation-median", tmp_path, "--epochs", "2", "--resume") == 0
    assert "(2 reused)" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "activation-median.json").read_text())
    assert record["n_reused"] == 2 and all(r["reused"] for r in record["runs"])
    pd.testing.assert_frame_equal(read_csv(tmp_path / "out" / "activation-median.csv"),
                                  resumed, check_exact=True)

    # a run folder made with other settings is never mixed in
    assert reproduce("activation-median", tmp_path, "--epochs", "2", "--resume",
                     "--batch-size", "32") == 2
    assert "holds a different run" in capsys.readouterr().err


def test_divergence_is_reported_not_fatal(tmp_path, capsys) -> None:
    # lr 1 makes the 8x128 ELU net's loss non-finite in the first epoch; lr 0.01 does not
    rc = main(["reproduce", "activation-median", "--quick", "--seeds", "1", "--activations",
               "elu", "--lr", "1,0.01", "--epochs", "3", "--out", str(tmp_path / "out"),
               "--work-dir", str(tmp_path / "runs"), "--no-progress"])
    assert rc == 0
    assert "2 runs (1 diverged)" in capsys.readouterr().out
    df = read_csv(tmp_path / "out" / "activation-median.csv")
    flag = df[df["quantity"] == "diverged"]
    assert len(flag) == 1 and flag["run"].item() == "elu-lr1-seed0"
    stopped = df[df["run"] == "elu-lr1-seed0"]
    assert stopped["epoch"].max() == flag["epoch"].item() < 3
    assert df[df["run"] == "elu-lr0.01-seed0"]["epoch"].max() == 3
    record = json.loads((tmp_path / "out" / "activation-median.json").read_text())
    assert record["n_diverged"] == 1
    assert [r["status"] for r in record["runs"]] == ["diverged", "finished"]


@pytest.mark.parametrize("script", ["activation_median", "median_variance", "autoencoder"])
def test_thin_analysis_scripts(script: str, monkeypatch, capsys) -> None:
    path = REPO / "analyses" / f"{script}.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(path), run_name="__main__")
    assert exc.value.code == 0
    assert "usage: biasshift reproduce" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    exe = shutil.which("biasshift", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the biasshift console script is not installed in this environment")
    proc = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "activation-median" in proc.stdout
