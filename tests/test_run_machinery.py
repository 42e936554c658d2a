"""Runs that never lose work or mix results (issue 13): workers die with the main process,
locks, fingerprinted and validated reuse, temporaries, result sets, I/O faults at the command
line, no silent discarding, jobs x threads from the cores, provenance."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import biasshift.io as bio
from biasshift._names import unknown_name_error
from biasshift.cli import main
from biasshift.data import load_dataset
from biasshift.io import (
    FolderLock,
    FolderLockedError,
    ResultSetError,
    check_result_set,
    publish_result_set,
    writable_dir_problem,
)
from biasshift.models import paper_mlp
from biasshift.reproduce import RunSpec, UsageError, resolve_settings, run_analysis, run_one, runner
from biasshift.reproduce.runner import OversubscriptionWarning
from biasshift.train import Trainer
from biasshift.train.checkpoint import CheckpointError, data_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _spec(epochs: int = 2, **kw: Any) -> RunSpec:
    base = {"analysis": "activation-median", "run": "elu-lr0.01-seed0", "dataset": "digits",
            "activation": "elu", "seed": 0, "lr": 0.01, "epochs": epochs, "batch_size": 128,
            "probe_size": 200, "model": {"depth": 2, "width": 16}}
    base.update(kw)
    return RunSpec(**base)


def _cli(tmp: Path, *extra: str) -> list[str]:
    return ["reproduce", "activation-median", "--quick", "--seeds", "1", "--activations",
            "elu", "--epochs", "1", "--out", str(tmp / "out"), "--work-dir", str(tmp / "runs"),
            "--no-progress", *extra]


# ------------------------------------------------------------------------ 1. worker lifetime
def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_the_main_process(sig: signal.Signals, tmp_path) -> None:
    work = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "BIASSHIFT_CPUS": "2"}
    # output to files, not pipes: surviving workers holding a pipe would hang the test
    out, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as fo, err_path.open("w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "biasshift.cli", "reproduce", "activation-median", "--quick",
             "--seeds", "1", "--activations", "elu,relu", "--epochs", "1000", "--jobs", "2",
             "--out", str(tmp_path / "out"), "--work-dir", str(work), "--no-progress"],
            stdout=fo, stderr=fe, env=env)
    kids: set[int] = set()
    try:
        specs = [work / r / "spec.json" for r in ("elu-lr0.01-seed0", "relu-lr0.01-seed0")]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in specs):  # both workers are training
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, "the workers did not start within 120 s"
            time.sleep(0.2)
        kids = _children(proc.pid)
        assert len(kids) >= 2
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [k for k in kids if _alive(k)]
        assert not survivors, f"processes {survivors} outlived the main process"
        err = err_path.read_text()
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM
            assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
        else:
            assert proc.returncode == -signal.SIGKILL
    finally:
        for pid in [proc.pid, *kids]:  # leave nothing behind when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_worker_whose_parent_is_gone_stops_between_epochs(monkeypatch) -> None:
    # the fallback where no death signal exists: the per-epoch report checks the parent
    exits: list[int] = []
    monkeypatch.setattr(runner.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setitem(runner._WORKER, "parent", os.getppid() + 1)
    monkeypatch.setitem(runner._WORKER, "queue", None)
    runner._worker_report("run", 1)
    assert exits == [1]
    monkeypatch.setitem(runner._WORKER, "parent", os.getppid())
    runner._worker_report("run", 2)
    assert exits == [1]


# ------------------------------------------------------------------------ 2. locks
def test_a_held_work_dir_stops_a_second_command_at_once(tmp_path, capsys) -> None:
    with FolderLock(tmp_path / "runs", what="work dir"):
        assert main(_cli(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"work dir {tmp_path / 'runs'} is in use by another biasshift process (pid " in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "elu-lr0.01-seed0").exists()  # nothing was trained
    assert main(_cli(tmp_path)) == 0  # released: the lock file is gone with it
    assert not (tmp_path / "runs" / ".lock").exists()


def test_a_held_run_folder_is_refused(tmp_path) -> None:
    with FolderLock(tmp_path / "elu-lr0.01-seed0"), \
            pytest.raises(UsageError, match=r"run folder .* is in use"):
        run_one(_spec(1), work_dir=tmp_path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_lock_of_a_killed_process_is_not_stale(tmp_path) -> None:
    code = ("import sys, time; from biasshift.io import FolderLock; "
            f"FolderLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=rf"\(pid {proc.pid}\)"):
            FolderLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with FolderLock(tmp_path):  # kill -9 released it
        pass


# ------------------------------------------------------------------------ 2. fingerprints
def test_reuse_rejects_a_folder_mixed_by_another_command(tmp_path) -> None:
    # command A trained with batch 32; command B (batch 64) rewrote spec.json and was stopped
    run_one(_spec(1, batch_size=32), work_dir=tmp_path)
    run_dir = tmp_path / "elu-lr0.01-seed0"
    (run_dir / "spec.json").write_text(json.dumps(_spec(1, batch_size=64).to_dict()))
    with pytest.raises(UsageError, match=r"done\.json records a different run .*batch_size: "
                                         r"folder 32, now 64"):
        run_one(_spec(1, batch_size=64), work_dir=tmp_path, resume=True)


def test_reuse_rejects_other_data(tmp_path) -> None:
    full = load_dataset("digits")
    run_one(_spec(1), work_dir=tmp_path, dataset=full)
    other = full.subset(1000, 300)
    with pytest.raises(UsageError, match=r"trained on other data \(folder 'digits:1437/360:"
                                         r"[0-9a-f]{16}', now 'digits:1000/300:"):
        run_one(_spec(1), work_dir=tmp_path, resume=True, dataset=other)


def test_the_checkpoint_carries_a_data_fingerprint(tmp_path) -> None:
    ds = load_dataset("digits").subset(200, 50)
    changed = type(ds)(**{**ds.__dict__, "train_x": ds.train_x.clone()})
    changed.train_x[0, 0] += 1.0  # same name and sizes, one sample differs
    assert data_fingerprint(ds) != data_fingerprint(changed)
    assert data_fingerprint(ds) == data_fingerprint(type(ds)(**ds.__dict__))

    def trainer(data, epochs):
        return Trainer(lambda: paper_mlp("elu", depth=1, width=8, in_features=64), data,
                       epochs=epochs, batch_size=64, probe_size=0, checkpoint_dir=tmp_path)

    trainer(ds, 1).fit()
    with pytest.raises(CheckpointError, match=r"data: checkpoint 'digits:200/50:"):
        trainer(changed, 2).fit(resume=True)
    assert trainer(ds, 2).fit(resume=True)["epoch"].max() == 2


# ------------------------------------------------------------------------ 2. damaged files
@pytest.mark.parametrize(("name", "damage", "message"), [
    ("history.csv", lambda t: t[: len(t) // 2], r"history\.csv is damaged \(not the file"),
    ("done.json", lambda t: t[: len(t) // 2], r"done\.json is damaged \(not valid JSON"),
    ("spec.json", lambda t: "", r"spec\.json is damaged \(not valid JSON"),
    ("done.json", lambda t: "[]", r"done\.json is damaged \(a JSON list"),
])
def test_reuse_names_the_damaged_file_and_the_fix(tmp_path, name, damage, message) -> None:
    run_one(_spec(2), work_dir=tmp_path)
    path = tmp_path / "elu-lr0.01-seed0" / name
    path.write_text(damage(path.read_text()))
    with pytest.raises(UsageError, match=message) as exc:
        run_one(_spec(2), work_dir=tmp_path, resume=True)
    assert str(path) in str(exc.value) and "--overwrite" in str(exc.value)


def test_history_without_recorded_hash_is_checked_epoch_by_epoch(tmp_path) -> None:
    # a done.json of an older version (no hash, no row count): the epochs must all be there
    run_one(_spec(3), work_dir=tmp_path)
    run_dir = tmp_path / "elu-lr0.01-seed0"
    done = json.loads((run_dir / "done.json").read_text())
    for key in ("history_sha256", "history_rows", "spec", "data"):
        del done[key]
    (run_dir / "done.json").write_text(json.dumps(done))
    assert run_one(_spec(3), work_dir=tmp_path, resume=True).reused
    hist = pd.read_csv(run_dir / "history.csv")
    hist[hist["epoch"] < 3].to_csv(run_dir / "history.csv", index=False)
    with pytest.raises(UsageError, match=r"epochs \[3\] missing of 0\.\.3"):
        run_one(_spec(3), work_dir=tmp_path, resume=True)


# ------------------------------------------------------------------------ 3. temporaries
def test_opening_a_run_folder_sweeps_stale_temporaries(tmp_path) -> None:
    run_dir = tmp_path / "elu-lr0.01-seed0"
    run_dir.mkdir()
    stale = [run_dir / ".checkpoint.pt.k2j3h.tmp", run_dir / ".history.csv.x8a.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1024)
    run_one(_spec(1), work_dir=tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == ["done.json", "history.csv",
                                                         "spec.json"]


# ------------------------------------------------------------------------ 4. result sets
def _writers(text: str) -> dict[str, Any]:
    return {"csv": lambda p: p.write_text(text),
            "png": lambda p: p.write_bytes(b"png" + text.encode())}


def test_a_result_set_is_published_as_one_unit(tmp_path, monkeypatch) -> None:
    stem = tmp_path / "out" / "fig"
    paths = publish_result_set(stem, _writers("old"), {"what": "old"})
    assert sorted(paths) == ["csv", "json", "png"]
    assert check_result_set(stem)["what"] == "old"
    assert sorted(p.name for p in stem.parent.iterdir()) == ["fig.csv", "fig.json", "fig.png"]

    # killed after the new CSV is in place, before the rest
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_die(src, dst):
        calls.append(Path(dst).name)
        real_replace(src, dst)
        if Path(dst).name == "fig.csv":
            raise KeyboardInterrupt

    monkeypatch.setattr(bio.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        publish_result_set(stem, _writers("new"), {"what": "new"})
    monkeypatch.setattr(bio.os, "replace", real_replace)
    assert (stem.parent / "fig.csv").read_text() == "new"
    with pytest.raises(ResultSetError, match=r"fig\.json is missing"):
        check_result_set(stem)
    # no temporary folder is left behind
    assert sorted(p.name for p in stem.parent.iterdir()) == ["fig.csv", "fig.png"]

    publish_result_set(stem, _writers("again"), {"what": "again"})
    check_result_set(stem)
    (stem.parent / "fig.png").write_bytes(b"another run's figure")
    with pytest.raises(ResultSetError, match=r"fig\.png is not the file .*fig\.json was "):
        check_result_set(stem)


def test_stale_publish_folders_of_dead_writers_are_swept(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".fig.{dead}.abc123.publish"
    stale.mkdir()
    (stale / "fig.csv").write_text("x" * 1000)
    mine = tmp_path / f".fig.{os.getpid()}.zzz.publish"  # a live writer's: kept
    mine.mkdir()
    publish_result_set(tmp_path / "fig", _writers("x"), {})
    assert not stale.exists() and mine.exists()


def test_the_cli_publishes_hashes_that_check(tmp_path) -> None:
    assert main(_cli(tmp_path)) == 0
    record = check_result_set(tmp_path / "out" / "activation-median")
    assert set(record["sha256"]) == {"csv", "png", "pdf"}


# ------------------------------------------------------------------------ 5. I/O faults
def test_out_and_work_dir_are_checked_before_any_training(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag, value in (("--out", blocker), ("--work-dir", blocker / "sub")):
        argv = _cli(tmp_path)
        argv[argv.index(flag) + 1] = str(value)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"{flag}: " in err and str(blocker) in err and "is a file, not a folder" in err
        assert not (tmp_path / "runs").exists()  # no run was trained


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_training(tmp_path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = _cli(tmp_path)
        argv[argv.index("--out") + 1] = str(ro / "out")
        assert main(argv) == 2
        assert "not writable" in capsys.readouterr().err
        assert not (tmp_path / "runs").exists()
    finally:
        ro.chmod(0o755)


def test_writable_dir_check_leaves_nothing_behind(tmp_path) -> None:
    assert writable_dir_problem(tmp_path / "new" / "deeper") is None
    assert writable_dir_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("err", "fix"), [
    (OSError(errno.ENOSPC, "No space left on device"), "free some space"),
    (PermissionError(errno.EACCES, "Permission denied"), "make it writable"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
])
def test_os_errors_become_one_line_with_the_path_and_the_fix(tmp_path, monkeypatch, capsys,
                                                           err, fix) -> None:
    err.filename = str(tmp_path / "runs" / "elu-lr0.01-seed0" / "checkpoint.pt")

    def fail(*args: Any, **kw: Any) -> None:
        raise err

    monkeypatch.setattr("biasshift.reproduce.run_analysis", fail)
    assert main(_cli(tmp_path)) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and "Traceback" not in out
    assert out.startswith(f"biasshift: error: {err.strerror}: {err.filename}; ")
    assert fix in out
    assert f"runs finished so far are kept in {tmp_path / 'runs'}" in out and "--resume" in out


def test_unreadable_data_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    def unreadable(name: str, data_dir: Any = None) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied",
                              "/data/mnist/train-images-idx3-ubyte.gz")

    monkeypatch.setattr(runner, "_dataset", unreadable)
    assert main(_cli(tmp_path)) == 2
    out = capsys.readouterr().err
    assert "Permission denied: /data/mnist/train-images-idx3-ubyte.gz; " in out
    assert out.count("\n") == 1


# ------------------------------------------------------------------------ 6. no silent discard
def test_rerunning_without_resume_keeps_the_checkpointed_epochs(tmp_path, capsys) -> None:
    assert main(_cli(tmp_path, "--keep-checkpoints")) == 0
    run_dir = tmp_path / "runs" / "elu-lr0.01-seed0"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    capsys.readouterr()
    assert main(_cli(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "already holds checkpointed work of 1 of these runs (elu-lr0.01-seed0)" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert main(_cli(tmp_path, "--resume", "--overwrite")) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(_cli(tmp_path, "--overwrite")) == 0
    record = json.loads((tmp_path / "out" / "activation-median.json").read_text())
    assert record["n_reused"] == 0 and record["runs"][0]["resumed_from_epoch"] is None


# ------------------------------------------------------------------------ 7. jobs x threads
def test_jobs_and_threads_fill_the_available_cores(monkeypatch) -> None:
    monkeypatch.setenv("BIASSHIFT_CPUS", "4")

    def jt(**kw: Any) -> tuple[int, int]:
        s = resolve_settings("activation-median", quick=True, **kw)
        return s.jobs, s.threads

    assert jt() == (4, 1)  # 12 runs
    assert jt(seeds=1, activations=["elu", "relu"]) == (2, 2)  # 2 runs: 2 threads each
    assert jt(seeds=1, activations=["elu"]) == (1, 4)
    assert jt(jobs=2) == (2, 2)
    assert jt(threads=2) == (2, 2)
    with pytest.warns(OversubscriptionWarning, match="uses 8 cores, but this process may use "
                                                     "only 4"):
        assert jt(jobs=4, threads=2) == (4, 2)
    monkeypatch.delenv("BIASSHIFT_CPUS")
    if hasattr(os, "sched_getaffinity"):
        assert runner.available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("BIASSHIFT_CPUS", "zero")
    with pytest.raises(UsageError, match="BIASSHIFT_CPUS"):
        runner.available_cores()


def test_the_cli_warns_about_oversubscription(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BIASSHIFT_CPUS", "1")
    assert main(_cli(tmp_path, "--threads", "2")) == 0
    err = capsys.readouterr().err
    assert err.startswith("biasshift: warning: --jobs 1 x --threads 2 uses 2 cores")


# ------------------------------------------------------------------------ 15. quick, checkpoints
def test_quick_on_mnist_trains_on_a_digits_sized_subset(monkeypatch) -> None:
    s = resolve_settings("activation-median", quick=True, dataset="mnist")
    assert (s.train_size, s.test_size) == (1500, 500)
    assert resolve_settings("activation-median", quick=True).train_size is None
    assert resolve_settings("activation-median", dataset="mnist").train_size is None


@pytest.mark.data
def test_quick_on_real_mnist_is_quick(tmp_path, real_data_root) -> None:
    s = resolve_settings("activation-median", quick=True, dataset="mnist", epochs=1, seeds=1,
                         activations=["elu"], data_dir=real_data_root / "mnist",
                         out=tmp_path / "out", work_dir=tmp_path / "runs")
    res = run_analysis(s, progress=False)
    record = json.loads(res.paths["json"].read_text())
    assert record["n_train"] == 1500 and record["probe_size_used"] == 1500
    done = json.loads((tmp_path / "runs" / "elu-lr0.01-seed0" / "done.json").read_text())
    assert done["data"].startswith("mnist:1500/500:")


def test_finished_runs_drop_their_checkpoint_unless_kept(tmp_path) -> None:
    run_one(_spec(1), work_dir=tmp_path / "a")
    assert not (tmp_path / "a" / "elu-lr0.01-seed0" / "checkpoint.pt").exists()
    run_one(_spec(1), work_dir=tmp_path / "b", keep_checkpoint=True)
    assert (tmp_path / "b" / "elu-lr0.01-seed0" / "checkpoint.pt").exists()
    with pytest.raises(UsageError, match=r"checkpoint was removed.*--keep-checkpoints"):
        run_one(_spec(2), work_dir=tmp_path / "a", resume=True)
    assert run_one(_spec(2), work_dir=tmp_path / "b", resume=True).resumed_from == 1


# ------------------------------------------------------------------------ 17. provenance
def test_provenance_totals_the_training_time_and_records_the_probe_used(tmp_path) -> None:
    assert main(_cli(tmp_path, "--keep-checkpoints")) == 0
    argv = _cli(tmp_path, "--resume")
    argv[argv.index("--epochs") + 1] = "3"
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "activation-median.json").read_text())
    done = json.loads((tmp_path / "runs" / "elu-lr0.01-seed0" / "done.json").read_text())
    assert len(done["epoch_seconds"]) == 3  # the times of both calls
    assert record["wall_time_total_s"] == pytest.approx(sum(done["epoch_seconds"]), abs=2e-3)
    assert record["runs"][0]["train_s"] == pytest.approx(sum(done["epoch_seconds"]), abs=2e-3)
    assert record["wall_time_s"] > 0
    # the quick preset asks for 10000 probe samples; the digits have 1437
    assert record["settings"]["probe_size"] == 10_000
    assert record["probe_size_used"] == 1437 == record["runs"][0]["probe_size_used"]


# ------------------------------------------------------------------------ 14, 18. messages
def test_unknown_name_messages_read_well() -> None:
    msg = unknown_name_error("analysis", "zzz", ["activation-median"]).args[0]
    assert "no close match. Known analyses: 'activation-median'" in msg
    msg = unknown_name_error("activation", "qqq", ["elu"]).args[0]
    assert msg.endswith("no close match. Known activations: 'elu'")


def test_help_and_list_show_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = capsys.readouterr().out
    for flag in ("--batch-size", "--probe-size", "--threads", "--no-progress", "--overwrite",
                 "--keep-checkpoints", "--option"):
        assert flag in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "--option KEY=VALUE: optimizers=sgd,ung" in out
    assert "track_probe=512 (quick: 256)" in out.replace("\n", " ").replace("   ", " ")


def test_the_data_fingerprint_is_the_same_on_every_device() -> None:
    # the data fingerprint is taken on the CPU: the same for a dataset on any device
    ds = load_dataset("digits").subset(100, 20)
    if torch.cuda.is_available():
        assert data_fingerprint(ds.to("cuda")) == data_fingerprint(ds)
    assert data_fingerprint(ds).startswith("digits:100/20:")
