"""Running an analysis: resolve settings, train every run (resumably, optionally in parallel),
aggregate the tidy table, plot, and publish ``NAME.csv``, ``NAME.png``, ``NAME.pdf``,
``NAME.json`` as one unit (:func:`biasshift.io.publish_result_set`).

Run folders
    Each run trains in ``<work_dir>/<run-id>/`` (default: the user cache,
    ``$XDG_CACHE_HOME/biasshift/runs/<name>/`` or ``~/.cache/biasshift/runs/<name>/``, quick
    presets ``.../runs/quick/<name>/``), which holds ``spec.json`` (what the run is),
    ``checkpoint.pt`` and ``history.csv`` (rewritten atomically after every epoch) and, once the
    run is complete, ``done.json`` (its spec, its data fingerprint, the SHA-256 and row count of
    ``history.csv``).  A finished run's checkpoint is removed unless ``keep_checkpoints``.

    With ``resume=True`` a complete run whose spec and data fingerprint match is reused as it is
    (after checking every file it trusts: JSON that parses, a ``history.csv`` with the recorded
    hash and one block of rows per epoch; a damaged file is named with the fix), a partial one
    continues from its checkpoint (bit-identically on the CPU; the checkpoint carries its own
    fingerprint, data included), and a run may be extended to more epochs when its checkpoint
    was kept.  A folder made for other settings is an error naming both (never silently mixed).
    Without ``resume`` a folder holding checkpointed work is an error too, unless
    ``overwrite=True`` discards it: work is never thrown away silently.

Locks and temporaries
    :func:`run_analysis` holds an exclusive lock on the work dir (a second command on the same
    ``--work-dir`` stops at once with a message) and :func:`run_one` one on its run folder; the
    kernel drops them when the process dies. Under its lock a run folder is swept of the
    temporaries a killed writer left behind.

Parallelism
    ``jobs > 1`` trains runs in that many worker processes (spawn context); every run sets
    ``torch.set_num_threads(threads)``. By default ``jobs`` x ``threads`` fill the cores
    available to the process (``os.sched_getaffinity``; ``$BIASSHIFT_CPUS`` overrides): one
    thread per run and as many jobs as runs and cores allow (the paper's small networks at batch
    64 gain little from intra-op threads). More than the cores is warned about (oversubscribed
    OpenMP threads made a run 25x slower). Results do not depend on ``jobs``; on the CPU they
    may depend on ``threads`` (the order of floating-point reductions), so a resume should keep
    it. Workers die with the main process, whatever kills it: they ask the kernel for SIGKILL
    when their parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux) and check between epochs that
    their parent is alive; an interrupted main process terminates its workers.

One run per process (schedulers, several machines)
    ``--jobs`` spreads runs over one machine. To spread them further, run each (analysis, run)
    as its own process with :func:`run_index` (``biasshift reproduce NAME --run-index I``, I
    from 0 to ``N - 1``; ``--list-runs`` prints the ``N`` runs): a Slurm job array
    (``--array=0-<N-1>`` with ``--run-index $SLURM_ARRAY_TASK_ID``), submitit or Ray can start
    them anywhere that sees the same ``--work-dir``. Each such process locks only its own run
    folder (not the work dir), trains or resumes its run and writes no figure; afterwards the
    same command with ``--resume`` (and without ``--run-index``) reuses every finished run and
    assembles the figure (it trains any run that is still missing).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from biasshift._names import unknown_name_error
from biasshift.activations import activation_names, is_activation_name
from biasshift.data import load_dataset
from biasshift.data.base import ArrayDataset
from biasshift.io import (
    FolderLock,
    FolderLockedError,
    file_sha256,
    provenance,
    publish_result_set,
    sweep_temporaries,
    writable_dir_problem,
    write_json,
)
from biasshift.reproduce.base import (
    DATASETS,
    QUICK_TEST_SIZE,
    QUICK_TRAIN_SIZE,
    TIDY_COLUMNS,
    Analysis,
    Preset,
    RunSpec,
    Settings,
    UsageError,
)
from biasshift.reproduce.registry import get_analysis
from biasshift.train.checkpoint import CheckpointError, data_fingerprint
from biasshift.train.trainer import CHECKPOINT_NAME, HISTORY_NAME, Trainer

__all__ = ["OversubscriptionWarning", "ReproduceResult", "RunOutcome", "WorkerDiedError",
           "available_cores", "list_runs", "plan_stacks", "resolve_settings", "run_analysis",
           "run_index", "run_one", "run_stack"]

SPEC_NAME = "spec.json"
DONE_NAME = "done.json"

ProgressFn = Callable[[str, int], None]


# ---------------------------------------------------------------------------- settings
class OversubscriptionWarning(UserWarning):
    """``jobs`` x ``threads`` exceeds the cores available to this process."""


def available_cores() -> int:
    """The CPU cores this process may run on: ``$BIASSHIFT_CPUS`` when set (a positive
    integer), else ``len(os.sched_getaffinity(0))`` where the platform has it (it honours
    ``taskset`` and container CPU sets), else ``os.cpu_count()``."""
    env = os.environ.get("BIASSHIFT_CPUS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise UsageError(f"$BIASSHIFT_CPUS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise UsageError(f"$BIASSHIFT_CPUS must be a positive integer, got {env!r}")
        return n
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - macOS, Windows


def _jobs_and_threads(jobs: int | None, threads: int | None, n_runs: int
                      ) -> tuple[int, int]:
    """Fill the cores: one thread per run and as many parallel runs as there are runs and
    cores; when there are fewer runs than cores, the spare cores go to threads. Given values
    are kept (the other one fills the rest); more than the cores is warned about."""
    cores = available_cores()
    if jobs is None and threads is None:
        jobs = max(1, min(cores, n_runs))
        threads = max(1, cores // jobs)
    elif jobs is None:
        assert threads is not None
        jobs = max(1, min(n_runs, cores // threads))
    elif threads is None:
        threads = max(1, cores // min(jobs, n_runs))
    used = min(jobs, n_runs) * threads
    if used > cores:
        warnings.warn(
            f"--jobs {jobs} x --threads {threads} uses {used} cores, but this process may use "
            f"only {cores}; "
            "oversubscribed threads can make training many times slower. Leave --jobs and "
            "--threads out to fill the cores, or lower them", OversubscriptionWarning,
            stacklevel=3)
    return jobs, threads


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _coerce_option(key: str, value: Any, default: Any) -> Any:
    """``value`` (from the command line: a string) as the type of the preset's ``default``."""
    def bad(what: str) -> UsageError:
        return UsageError(f"option {key}={value!r}: expected {what} (the preset has "
                          f"{key}={default!r})")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise bad("true or false")
    if isinstance(default, int):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad("an integer") from None
        if isinstance(value, bool) or not f.is_integer():
            raise bad("an integer")
        return int(f)
    if isinstance(default, float):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if isinstance(value, bool) or not math.isfinite(f):
            raise bad("a finite number")
        return f
    if isinstance(default, (tuple, list)):
        items = value if isinstance(value, (tuple, list)) else [
            t for t in (x.strip() for x in str(value).split(",")) if t]
        if not items:
            raise bad("a comma-separated list")
        proto = default[0] if len(default) else ""
        return tuple(_coerce_option(key, v, proto) for v in items)
    return str(value).strip()


def _options(analysis: Analysis, preset: Preset, given: Mapping[str, Any] | None
             ) -> dict[str, Any]:
    merged = dict(preset.options)
    for key, value in (given or {}).items():
        k = str(key).strip().replace("-", "_")
        if k not in preset.options:
            if not preset.options:
                raise UsageError(f"{analysis.name} takes no --option, got {key!r}")
            raise UsageError(unknown_name_error(f"{analysis.name} option", k,
                                                list(preset.options)).args[0])
        merged[k] = _coerce_option(k, value, preset.options[k])
    return merged


def _no_duplicates(name: str, values: Sequence[Any]) -> tuple[Any, ...]:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise UsageError(f"{name} lists {seen[0]!r} more than once")
    if not values:
        raise UsageError(f"{name} is empty")
    return tuple(values)


def resolve_settings(
    name: str,
    *,
    quick: bool = False,
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    activations: Sequence[str] | None = None,
    lrs: Sequence[float] | None = None,
    batch_size: int | None = None,
    probe_size: int | str | None = None,
    device: str = "cpu",
    out: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    jobs: int | None = None,
    threads: int | None = None,
    options: Mapping[str, Any] | None = None,
    batch_runs: int | str | None = None,
) -> Settings:
    """Merge the chosen preset (``"quick"`` or ``"paper"``) with overrides and check everything.

    ``None`` keeps the preset's value. ``probe_size`` is an int or ``"all"``. ``options``
    overrides the preset's analysis-specific options (``{"damping": 1e-3}``; strings are
    converted to the type of the preset's value, lists are comma-separated). ``jobs`` and
    ``threads`` left at ``None`` fill the :func:`available_cores` (one thread per run, as many
    parallel runs as runs and cores allow; on CUDA one job); jobs x threads above the cores warns
    (:class:`OversubscriptionWarning`). The quick preset on MNIST or Fashion-MNIST trains on
    the first :data:`~biasshift.reproduce.base.QUICK_TRAIN_SIZE` /
    :data:`~biasshift.reproduce.base.QUICK_TEST_SIZE` images. Raises :class:`UsageError` with a
    message that says what to change.  ``batch_runs``: runs trained together as one stacked
    model (:func:`plan_stacks`): ``1`` one by one, ``K`` at most ``K`` per stack, ``"auto"``
    (or ``0``) from the free memory; ``None``: the analysis's default
    (``Analysis.batch_runs``).
    """
    analysis = get_analysis(name)
    try:
        device_type = torch.device(str(device).strip().lower()).type
    except RuntimeError:
        device_type = "cpu"  # the bad device is reported below
    preset_name = analysis.preset_name(quick, device_type)
    preset = analysis.presets[preset_name]

    ds = (dataset or preset.dataset).strip().lower()
    if ds not in DATASETS:
        raise UsageError(unknown_name_error("dataset", ds, DATASETS).args[0])
    acts = [a.strip().lower() for a in (activations or preset.activations)]
    known = activation_names()
    for a in acts:
        if not is_activation_name(a):  # the paper's four, or a control (elu+c, crelu)
            raise UsageError(unknown_name_error("activation", a, known).args[0])
    lr_values = []
    for lr in (lrs or preset.lrs):
        try:
            lr_f = float(lr)
        except (TypeError, ValueError):
            raise UsageError(f"learning rate {lr!r} is not a number") from None
        if not (lr_f > 0 and math.isfinite(lr_f)):
            raise UsageError(f"learning rates must be positive and finite, got {lr!r}")
        lr_values.append(lr_f)

    if probe_size is None:
        probe: int | None = preset.probe_size
    elif isinstance(probe_size, str) and probe_size.strip().lower() == "all":
        probe = None
    else:
        try:
            probe = int(probe_size)
        except (TypeError, ValueError):
            raise UsageError(f"probe size must be an integer or 'all', got {probe_size!r}") \
                from None
        if probe < 0:
            raise UsageError(f"probe size must be >= 0 (0: no probe), got {probe}")

    dev = str(device).strip().lower()
    try:
        tdev = torch.device(dev)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from None
    if tdev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use cpu or cuda (cuda:N)")
    if tdev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available here; "
                         "use --device cpu")

    if batch_runs is None:
        batch_runs = getattr(analysis, "batch_runs", 1)
    if isinstance(batch_runs, str) and batch_runs.strip().lower() == "auto":
        batch_runs = 0
    try:
        batch_k = int(batch_runs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"--batch-runs must be a positive integer or 'auto', got "
                         f"{batch_runs!r}") from None
    if isinstance(batch_runs, bool) or batch_k < 0:
        raise UsageError(f"--batch-runs must be a positive integer or 'auto', got {batch_runs!r}")
    if jobs is not None:
        jobs = _positive_int("jobs", jobs)
    if threads is not None:
        threads = _positive_int("threads", threads)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume keeps the "
                         "checkpointed runs, --overwrite discards them")
    subset = quick and ds != "digits"
    settings = Settings(
        analysis=analysis.name,
        preset=preset_name,
        dataset=ds,
        data_dir=None if data_dir is None else str(data_dir),
        epochs=_positive_int("epochs", preset.epochs if epochs is None else epochs),
        seeds=_positive_int("seeds", preset.seeds if seeds is None else seeds),
        activations=_no_duplicates("activations", acts),
        lrs=_no_duplicates("learning rates", lr_values),
        batch_size=_positive_int("batch size",
                                 preset.batch_size if batch_size is None else batch_size),
        probe_size=probe,
        model=dict(preset.model),
        device=dev,
        out=Path(out) if out is not None else analysis.default_out(quick),
        work_dir=Path(work_dir) if work_dir is not None else analysis.default_work_dir(quick),
        resume=bool(resume),
        jobs=1,
        threads=1,
        options=_options(analysis, preset, options),
        overwrite=bool(overwrite),
        keep_checkpoints=bool(keep_checkpoints),
        train_size=QUICK_TRAIN_SIZE if subset else None,
        test_size=QUICK_TEST_SIZE if subset else None,
        batch_runs=batch_k,
    )
    analysis.validate(settings)
    if jobs is None and tdev.type == "cuda":
        jobs = 1  # parallel runs would share the one GPU; threads only feed its host side
    jobs, threads = _jobs_and_threads(jobs, threads, len(analysis.run_specs(settings)))
    return replace(settings, jobs=jobs, threads=threads)


# ---------------------------------------------------------------------------- one run
@dataclass
class RunOutcome:
    """What one run produced: its tidy rows and how it went."""

    spec: RunSpec
    frame: pd.DataFrame
    status: str  # "finished" | "diverged"
    epochs_done: int
    reused: bool = False
    resumed_from: int | None = None
    wall_s: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    probe_size: int | None = None  # the probe samples actually used (None: not recorded)

    @property
    def train_s(self) -> float:
        """Seconds spent training this run's epochs, summed over every call that trained some
        (the per-epoch times travel in the checkpoint)."""
        return float(sum(self.epoch_seconds))

    def info(self) -> dict[str, Any]:
        secs = self.epoch_seconds
        return {
            "run": self.spec.run, "activation": self.spec.activation, "seed": self.spec.seed,
            "lr": self.spec.lr, "status": self.status, "epochs_done": self.epochs_done,
            "reused": self.reused, "resumed_from_epoch": self.resumed_from,
            "wall_s": round(self.wall_s, 3), "train_s": round(self.train_s, 3),
            "probe_size_used": self.probe_size,
            "median_epoch_s": round(float(np.median(secs)), 4) if secs else None,
        }


_DATA_CACHE: dict[tuple[str, str | None], ArrayDataset] = {}


def _dataset(name: str, data_dir: str | None) -> ArrayDataset:
    key = (name, data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset per process at a time
        _DATA_CACHE[key] = load_dataset(name, data_dir=data_dir)
    return _DATA_CACHE[key]


def _normalised(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def _damaged(path: Path, what: str, run_dir: Path) -> UsageError:
    return UsageError(f"{path} is damaged ({what}); delete the run folder {run_dir} or rerun "
                      "with --overwrite to train the run again")


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    """A run folder's JSON file, or a :class:`UsageError` naming the damaged file."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _damaged(path, f"not valid JSON: {err}", run_dir) from None
    except UnicodeDecodeError:
        raise _damaged(path, "not text", run_dir) from None
    if not isinstance(obj, dict):
        raise _damaged(path, f"a JSON {type(obj).__name__}, not an object", run_dir)
    return obj


def _read_history(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"run": str, "layer": str, "quantity": str, "unit": "Int64"},
                     keep_default_na=False,
                     na_values={"unit": [""], "value": ["", "NaN", "nan"]})
    df["value"] = df["value"].astype(float)
    return df


_HISTORY_COLUMNS = ("epoch", "layer", "unit", "quantity", "value")


def _checked_history(path: Path, done: dict[str, Any], run_dir: Path) -> pd.DataFrame:
    """``history.csv`` of a finished run, checked against its ``done.json``: the recorded
    SHA-256 and row count (``done.json`` files of older versions lack them) and one set of rows
    for every epoch 0..epochs_done."""
    if not path.is_file():
        raise _damaged(path, "missing although done.json says the run finished", run_dir)
    digest = done.get("history_sha256")
    if digest is not None and file_sha256(path) != digest:
        raise _damaged(path, "not the file done.json was written with: truncated or changed",
                       run_dir)
    try:
        df = _read_history(path)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise _damaged(path, f"not a readable CSV: {err}", run_dir) from None
    missing = [c for c in _HISTORY_COLUMNS if c not in df.columns]
    if missing:
        raise _damaged(path, f"columns {missing} missing", run_dir)
    rows = done.get("history_rows")
    if rows is not None and len(df) != rows:
        raise _damaged(path, f"{len(df)} rows, done.json recorded {rows}", run_dir)
    want = list(range(int(done["epochs_done"]) + 1))
    have = sorted(int(e) for e in df["epoch"].unique())
    if have != want:
        lacking = sorted(set(want) - set(have))
        if lacking:
            more = " ..." if len(lacking) > 5 else ""
            what = f"epochs {lacking[:5]}{more} missing of 0..{want[-1]}"
        else:
            what = f"epochs {have[:5]}... instead of 0..{want[-1]}"
        raise _damaged(path, what, run_dir)
    return df


def _with_spec_columns(history: pd.DataFrame, spec: RunSpec) -> pd.DataFrame:
    df = history.copy()
    df["analysis"] = spec.analysis
    df["run"] = spec.run
    df["dataset"] = spec.dataset
    df["activation"] = spec.activation
    df["seed"] = spec.seed
    df["lr"] = spec.lr
    for col in ("analysis", "run", "dataset", "activation", "layer", "quantity"):
        df[col] = df[col].astype(object)
    df["epoch"] = df["epoch"].astype(np.int64)
    df["unit"] = df["unit"].astype("Int64")
    df["value"] = df["value"].astype(np.float64)
    return df[list(TIDY_COLUMNS)]


# fields added to RunSpec later read as these defaults in older spec.json files
_SPEC_DEFAULTS = {"optimizer": "sgd", "options": {}, "train_size": None, "test_size": None}


def _spec_diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    have = {**_SPEC_DEFAULTS, **have}
    diff = sorted(k for k in set(want) | set(have) if k != "epochs" and have.get(k) != want.get(k))
    return "; ".join(f"{k}: folder {have.get(k)!r}, now {want.get(k)!r}" for k in diff)


def run_holds_work(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds trained epochs (a checkpoint, a history or a finished run)."""
    d = Path(run_dir)
    return any((d / n).exists() for n in (CHECKPOINT_NAME, HISTORY_NAME, DONE_NAME))


def _refuse_discarding(run_dir: Path) -> UsageError:
    return UsageError(f"{run_dir} holds checkpointed work of this run; pass --resume to reuse "
                      "or continue it, or --overwrite to discard it and train afresh")


def run_one(
    spec: RunSpec,
    *,
    work_dir: str | os.PathLike[str],
    device: str = "cpu",
    threads: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoint: bool = False,
    data_dir: str | None = None,
    dataset: ArrayDataset | None = None,
    progress: ProgressFn | None = None,
) -> RunOutcome:
    """Train (or reuse, or resume) one run in ``<work_dir>/<spec.run>/``; return its outcome.

    The run folder is locked while this runs (:class:`~biasshift.io.FolderLock`; held by
    another process: :class:`UsageError`) and swept of stale temporaries. ``resume`` reuses a
    finished run or continues a checkpointed one; without it a folder holding trained epochs is
    refused unless ``overwrite``. ``keep_checkpoint`` keeps ``checkpoint.pt`` once the run
    has finished (removed otherwise; a run can then be reused but not extended).
    ``dataset`` (the full dataset; the spec's ``train_size``/``test_size`` are applied here)
    saves loading it again.
    """
    if resume and overwrite:
        raise UsageError("resume and overwrite exclude each other")
    run_dir = Path(work_dir) / spec.run
    try:
        lock = FolderLock(run_dir, what="run folder").acquire()
    except FolderLockedError as err:
        raise UsageError(str(err)) from None
    try:
        sweep_temporaries(run_dir)
        return _run_locked(spec, run_dir, device=device, threads=threads, resume=resume,
                           overwrite=overwrite, keep_checkpoint=keep_checkpoint,
                           data_dir=data_dir, dataset=dataset, progress=progress)
    finally:
        lock.release()


def _run_locked(spec: RunSpec, run_dir: Path, *, device: str, threads: int | None,
                resume: bool, overwrite: bool, keep_checkpoint: bool, data_dir: str | None,
                dataset: ArrayDataset | None, progress: ProgressFn | None) -> RunOutcome:
    analysis = get_analysis(spec.analysis)
    spec_path, done_path = run_dir / SPEC_NAME, run_dir / DONE_NAME
    hist_path, ckpt_path = run_dir / HISTORY_NAME, run_dir / CHECKPOINT_NAME
    want = _normalised(spec.to_dict())
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else _dataset(spec.dataset, data_dir)
    if spec.train_size is not None or spec.test_size is not None:
        ds = ds.subset(spec.train_size, spec.test_size)
    ds = analysis.prepare_dataset(spec, ds)
    data_id = data_fingerprint(ds)

    if resume and spec_path.exists():
        detail = _spec_diff(_read_json(spec_path, run_dir), want)
        if detail:
            raise UsageError(f"{run_dir} holds a different run ({detail}); choose another "
                             "--work-dir or pass --overwrite (without --resume) to discard it")
        if done_path.exists():
            done = _read_json(done_path, run_dir)
            missing = [k for k in ("status", "epochs", "epochs_done") if k not in done]
            if missing:
                raise _damaged(done_path, f"lacks {', '.join(missing)}", run_dir)
            if "spec" in done:
                detail = _spec_diff(done["spec"], want)
                if detail:
                    raise UsageError(f"{done_path} records a different run than {spec_path} "
                                     f"and this command ({detail}); pass --overwrite (without "
                                     "--resume) to discard it")
            if done.get("data") not in (None, data_id):
                raise UsageError(f"{run_dir} was trained on other data (folder "
                                 f"{done['data']!r}, now {data_id!r}); choose another "
                                 "--work-dir or pass --overwrite (without --resume) to "
                                 "discard it")
            stopped = done["status"] == "diverged" and done["epochs_done"] <= spec.epochs
            if done["epochs"] == spec.epochs or stopped:
                history = _checked_history(hist_path, done, run_dir)
                try:
                    frame = analysis.run_frame(spec, _with_spec_columns(history, spec),
                                               run_dir, None)
                except (ValueError, KeyError, pd.errors.ParserError) as err:
                    if isinstance(err, UsageError):
                        raise
                    raise _damaged(run_dir, f"a file of the finished run is unreadable: "
                                   f"{type(err).__name__}: {err}", run_dir) from None
                if progress is not None:
                    progress(spec.run, spec.epochs)
                return RunOutcome(spec, frame, done["status"], int(done["epochs_done"]),
                                  reused=True, wall_s=float(done.get("wall_s", 0.0)),
                                  epoch_seconds=list(done.get("epoch_seconds", [])),
                                  probe_size=done.get("probe_size"))
            if done["epochs"] > spec.epochs:
                raise UsageError(f"{run_dir} was completed with {done['epochs']} epochs, more "
                                 f"than the {spec.epochs} asked for; pass --epochs "
                                 f"{done['epochs']}, choose another --work-dir, or pass "
                                 "--overwrite (without --resume) to start afresh")
            # fewer epochs than asked for: continue from the checkpoint
            if not ckpt_path.exists():
                raise UsageError(f"{run_dir} finished with {done['epochs']} epochs and its "
                                 "checkpoint was removed, so it cannot be extended to "
                                 f"{spec.epochs}; pass --overwrite (without --resume) to train "
                                 "it afresh (--keep-checkpoints keeps finished runs' "
                                 "checkpoints for later extension)")
    if not resume:
        if run_holds_work(run_dir) and not overwrite:
            raise _refuse_discarding(run_dir)
        for p in (done_path, hist_path, ckpt_path):
            p.unlink(missing_ok=True)
    done_path.unlink(missing_ok=True)
    write_json(want, spec_path)

    trainer = Trainer(
        lambda: analysis.build_model(spec, ds),
        ds,
        loss=analysis.loss,
        lr=spec.lr,
        batch_size=spec.batch_size,
        epochs=spec.epochs,
        seed=spec.seed,
        device=device,
        optimizer=analysis.optimizer(spec),
        plugins=analysis.plugins(spec),
        probe_size=spec.probe_size,
        probe_modules=analysis.probe_modules(spec),
        probe_medians=analysis.probe_medians,
        checkpoint_dir=run_dir,
        run_name=spec.run,
        threads=threads,
        progress=(lambda tr: progress(spec.run, tr.epoch)) if progress is not None else False,
        **analysis.trainer_options(spec),
        augment=analysis.augment(spec),
    )
    try:
        history = trainer.fit(resume=resume)
    except CheckpointError as err:
        raise UsageError(f"{err} (run folder {run_dir})") from None
    status = "diverged" if trainer.diverged else "finished"
    frame = analysis.run_frame(spec, _with_spec_columns(history, spec), run_dir, trainer)
    wall = time.perf_counter() - t0
    probe = 0 if trainer.probe_index is None else int(trainer.probe_index.numel())
    write_json({"status": status, "epochs": spec.epochs, "epochs_done": trainer.epoch,
                "wall_s": wall, "epoch_seconds": trainer.epoch_seconds, "probe_size": probe,
                "data": data_id, "history_rows": len(history),
                "history_sha256": file_sha256(hist_path), "spec": want}, done_path)
    if not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
    if progress is not None:
        progress(spec.run, spec.epochs)
    return RunOutcome(spec, frame, status, trainer.epoch,
                      resumed_from=trainer.resumed_from, wall_s=wall,
                      epoch_seconds=list(trainer.epoch_seconds), probe_size=probe)


# ---------------------------------------------------------------------------- many runs
_WORKER: dict[str, Any] = {}

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerDiedError(RuntimeError):
    """A worker process of ``jobs > 1`` died (killed, out of memory); finished runs are kept."""


def _die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``prctl``);
    returns whether that was arranged."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return False


def _init_worker(progress_queue: Any, threads: int | None, parent: int) -> None:
    _die_with_parent()
    _WORKER["parent"] = parent
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)
    _WORKER["queue"] = progress_queue
    if threads is not None:
        torch.set_num_threads(threads)


def _worker_report(run: str, epochs: int) -> None:
    # between epochs: a worker whose parent is gone stops (where no death signal exists)
    if os.getppid() != _WORKER.get("parent", os.getppid()):
        os._exit(1)
    q = _WORKER.get("queue")
    if q is not None:
        q.put((run, epochs))


def _worker_run(spec: RunSpec, kwargs: dict[str, Any]) -> RunOutcome:
    return run_one(spec, progress=_worker_report, **kwargs)


# ---------------------------------------------------------------------------- stacked runs
def _stack_key(spec: RunSpec) -> str:
    """Runs that may share a stack: everything but the activation, the lr and the seed."""
    d = spec.to_dict()
    for k in ("run", "activation", "lr", "seed"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _memory_budget(device: str) -> int:
    """Bytes a stack may use: a quarter of the free accelerator memory, or of the available
    RAM (``SC_AVPHYS_PAGES``), at least 256 MiB."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return max(free // 4, 256 * 2**20)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 4 * 2**30
    return max(avail // 4, 256 * 2**20)


def plan_stacks(analysis: Analysis, specs: Sequence[RunSpec], settings: Settings,
                dataset: ArrayDataset) -> list[list[RunSpec]]:
    """Group the runs into stacks for :func:`run_stack` (lists of length 1: the single path).

    Runs share a stack when they differ only in activation, lr and seed (so they share the
    prepared dataset and every option), the analysis trains them with ``torch.optim.SGD``
    (any momentum and weight decay), only :attr:`~biasshift.train.Plugin.stackable` plug-ins
    (schedules, timers; not monitors), no further trainer options (such as the autoencoder's
    ``reconstruction_loss``), and the model stacks
    (:func:`~biasshift.models.stacked.stackable`).  ``settings.batch_runs``: ``1`` = every run
    alone (today's path), ``K`` = stacks of at most ``K``, ``0`` = automatic: as many runs as
    fit a quarter of the free memory (:func:`~biasshift.train.batched.member_bytes`), spread
    over ``jobs`` stacks; conv nets only on CUDA (on the CPU grouped convolutions are slower
    than one run after another, so ``0`` leaves them alone there).  Runs whose folder already
    holds work are resumed alone unless they all stand in one stack's checkpoint.
    """
    from biasshift.models.stacked import stackable
    from biasshift.train.batched import member_bytes, stack_size

    cap = settings.batch_runs
    if cap == 1 or len(specs) < 2:
        return [[s] for s in specs]
    groups: dict[str, list[RunSpec]] = {}
    alone: list[RunSpec] = []
    for s in specs:
        if analysis.trainer_options(s) or not all(
                getattr(p, "stackable", False) for p in analysis.plugins(s)):
            alone.append(s)
            continue
        groups.setdefault(_stack_key(s), []).append(s)
    units: list[list[RunSpec]] = [[s] for s in alone]
    for group in groups.values():
        model = analysis.build_model(group[0], dataset)
        if stackable(model) is not None or not _plain_sgd(analysis, group[0], model):
            units += [[s] for s in group]
            continue
        if cap == 0:
            if _has_conv(model) and torch.device(settings.device).type != "cuda":
                # grouped convolutions are slower than K ungrouped ones on the CPU
                # (analyses/bench_batched.py --nets conv): stack conv nets only on request
                units += [[s] for s in group]
                continue
            per = member_bytes(model, group[0].batch_size, 4096,
                               input_shape=tuple(dataset.train_x.shape[1:]))
            k = stack_size(_memory_budget(settings.device), per, len(group))
            k = min(k, math.ceil(len(group) / max(1, settings.jobs)))
        else:
            k = cap
        units += [group[i:i + k] for i in range(0, len(group), k)]
    order = {s.run: i for i, s in enumerate(specs)}
    return sorted(units, key=lambda u: order[u[0].run])


def _plain_sgd(analysis: Analysis, spec: RunSpec, model: nn.Module) -> bool:
    """Whether the analysis trains ``spec`` with an optimizer a stack can run
    (:func:`~biasshift.train.batched.sgd_refusal`)."""
    from biasshift.train.batched import sgd_refusal

    factory = analysis.optimizer(spec)
    return factory is None or sgd_refusal(factory(model), spec.lr) is None


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _stack_dir(work_dir: Path, specs: Sequence[RunSpec]) -> Path:
    import hashlib

    h = hashlib.sha256("\n".join(s.run for s in specs).encode()).hexdigest()[:12]
    return work_dir / f"stack-{h}"


def run_stack(specs: Sequence[RunSpec], *, work_dir: str | os.PathLike[str],
              device: str = "cpu", threads: int | None = None, resume: bool = False,
              overwrite: bool = False, keep_checkpoint: bool = False,
              data_dir: str | None = None, dataset: ArrayDataset | None = None,
              progress: ProgressFn | None = None,
              checkpoint_every: int | None = 200) -> list[RunOutcome]:
    """Train several runs as one stacked model (:class:`~biasshift.train.batched
    .BatchedTrainer`), each in its own run folder, then finish each as :func:`run_one` does.

    Every member writes its own single-run ``checkpoint.pt`` and ``history.csv`` after every
    epoch; the stack also keeps ``<work_dir>/stack-<hash>/stack.pt`` (every
    ``checkpoint_every`` steps, so a killed stack resumes mid-epoch).  Finished runs (with
    ``resume``) are reused as they are; a run that cannot be stacked goes the single path.
    """
    from biasshift.train.batched import STACK_CHECKPOINT, BatchedTrainer, batchable

    work = Path(work_dir)
    kwargs: dict[str, Any] = dict(work_dir=work_dir, device=device, threads=threads,
                                  keep_checkpoint=keep_checkpoint, data_dir=data_dir,
                                  dataset=dataset, progress=progress)
    if resume and overwrite:
        raise UsageError("resume and overwrite exclude each other")
    ds = dataset if dataset is not None else _dataset(specs[0].dataset, data_dir)
    sub = ds
    if specs[0].train_size is not None or specs[0].test_size is not None:
        sub = ds.subset(specs[0].train_size, specs[0].test_size)
    stack_dir = _stack_dir(work, specs)
    stacked_resume = resume and (stack_dir / STACK_CHECKPOINT).exists()
    # finished runs are reused; runs with other work than the stack's go alone
    todo: list[RunSpec] = []
    results: dict[str, RunOutcome] = {}
    for s in specs:
        run_dir = work / s.run
        if resume and (run_dir / DONE_NAME).exists() and not stacked_resume:
            results[s.run] = run_one(s, resume=True, **kwargs)
        else:
            todo.append(s)
    if len(todo) < 2:
        for s in todo:
            results[s.run] = run_one(s, resume=resume, overwrite=overwrite, **kwargs)
        return [results[s.run] for s in specs]

    locks = []
    try:
        for s in todo:
            try:
                locks.append(FolderLock(work / s.run, what="run folder").acquire())
            except FolderLockedError as err:
                raise UsageError(str(err)) from None
            run_dir = work / s.run
            sweep_temporaries(run_dir)
            want = _normalised(s.to_dict())
            if resume and (run_dir / SPEC_NAME).exists():
                detail = _spec_diff(_read_json(run_dir / SPEC_NAME, run_dir), want)
                if detail:
                    raise UsageError(f"{run_dir} holds a different run ({detail}); choose "
                                     "another --work-dir or pass --overwrite (without "
                                     "--resume) to discard it")
            if not resume:
                if run_holds_work(run_dir) and not overwrite:
                    raise _refuse_discarding(run_dir)
                for name in (DONE_NAME, HISTORY_NAME, CHECKPOINT_NAME):
                    (run_dir / name).unlink(missing_ok=True)
            (run_dir / DONE_NAME).unlink(missing_ok=True)
            write_json(want, run_dir / SPEC_NAME)
        if not resume:
            (stack_dir / STACK_CHECKPOINT).unlink(missing_ok=True)
        t0 = time.perf_counter()
        analysis = get_analysis(todo[0].analysis)
        # each member as run_one builds it (the analysis's dataset preparation, optimizer,
        # plug-ins and augmentation); the members share the prepared data (same options)
        members = []
        for s in todo:
            ds_s = analysis.prepare_dataset(s, sub)
            members.append(Trainer(
                (lambda s=s, ds_s=ds_s: analysis.build_model(s, ds_s)), ds_s,
                loss=analysis.loss, lr=s.lr, batch_size=s.batch_size, epochs=s.epochs,
                seed=s.seed, device=device, optimizer=analysis.optimizer(s),
                plugins=analysis.plugins(s), probe_size=s.probe_size,
                probe_modules=analysis.probe_modules(s), probe_medians=analysis.probe_medians,
                checkpoint_dir=work / s.run, run_name=s.run,
                progress=(lambda tr: progress(tr.run_name, tr.epoch)) if progress is not None
                else False, **analysis.trainer_options(s), augment=analysis.augment(s),
            ))
        bad = [(s, batchable(t)) for s, t in zip(todo, members)]
        if any(why is not None for _, why in bad):
            raise UsageError(f"run {next(s.run for s, w in bad if w)} cannot be stacked: "
                             f"{next(w for _, w in bad if w)}; pass --batch-runs 1")
        stack = BatchedTrainer(members, checkpoint_dir=stack_dir, threads=threads,
                               checkpoint_every=checkpoint_every)
        try:
            stack.fit(resume=resume)
        except CheckpointError as err:
            raise UsageError(f"{err} (stack folder {stack_dir})") from None
        wall = (time.perf_counter() - t0) / len(todo)
    finally:
        for lock in locks:
            lock.release()
    # each member finishes as a single run: done.json, run_frame, the checkpoint's removal
    for s, t in zip(todo, members):
        out = run_one(s, resume=True, **kwargs)
        results[s.run] = replace(out, resumed_from=t.resumed_from, wall_s=wall + out.wall_s)
    if not keep_checkpoint:
        (stack_dir / STACK_CHECKPOINT).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            for p in stack_dir.iterdir():
                if p.name.startswith("."):
                    p.unlink()
            stack_dir.rmdir()
    return [results[s.run] for s in specs]


def _worker_stack(specs: list[RunSpec], kwargs: dict[str, Any]) -> list[RunOutcome]:
    return run_stack(specs, progress=_worker_report, **kwargs)


def _stop_workers(ex: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers now (an interrupt or error in the main process must not
    leave them training, nor wait for their runs to finish)."""
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(10)
            if p.is_alive():
                p.kill()


class _Bar:
    """An overall progress bar counting epochs over all runs."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.done: dict[str, int] = {}
        self.bar = tqdm(total=total, desc=desc, unit="epoch",
                        disable=None if enabled else True, dynamic_ncols=True)

    def __call__(self, run: str, epochs: int) -> None:
        delta = epochs - self.done.get(run, 0)
        if delta > 0:
            self.done[run] = epochs
            self.bar.update(delta)

    def close(self) -> None:
        self.bar.close()


def _run_kwargs(settings: Settings) -> dict[str, Any]:
    return {"work_dir": str(settings.work_dir), "device": settings.device,
            "threads": settings.threads, "resume": settings.resume,
            "overwrite": settings.overwrite, "keep_checkpoint": settings.keep_checkpoints,
            "data_dir": settings.data_dir}


def _execute(analysis: Analysis, specs: list[RunSpec], settings: Settings,
             dataset: ArrayDataset, bar: _Bar) -> list[RunOutcome]:
    units = plan_stacks(analysis, specs, settings, dataset)
    return _execute_units(units, specs, settings, _run_kwargs(settings), dataset, bar)


def _run_specs(analysis: Analysis, settings: Settings) -> list[RunSpec]:
    """The analysis's runs with the settings' training/test subset (the quick preset's),
    unless the analysis set the runs' own; the same for ``run_analysis`` and ``run_index``."""
    return [replace(s, train_size=settings.train_size if s.train_size is None else s.train_size,
                    test_size=settings.test_size if s.test_size is None else s.test_size)
            for s in analysis.run_specs(settings)]


def list_runs(settings: Settings) -> list[str]:
    """The run ids of ``settings.analysis``, in the order ``--run-index`` numbers them."""
    return [s.run for s in get_analysis(settings.analysis).run_specs(settings)]


def run_index(settings: Settings, index: int, *, progress: bool = True) -> RunOutcome:
    """Train (or reuse, or resume) run number ``index`` of ``settings.analysis`` in its
    folder of ``settings.work_dir``, in this process, and publish nothing (see "One run per
    process" in the module docstring). Only the run folder is locked, so that many such
    processes share one work dir; ``settings.jobs`` is ignored.

    Raises:
        UsageError: ``index`` is not in ``[0, N)`` (the message gives ``N``), or the run folder
            holds work and neither ``resume`` nor ``overwrite`` is set.
    """
    analysis = get_analysis(settings.analysis)
    analysis.validate(settings)
    specs = _run_specs(analysis, settings)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(specs):
        raise UsageError(f"--run-index {index!r} is out of range: {analysis.name} has "
                         f"{len(specs)} runs with these settings, numbered 0 to "
                         f"{len(specs) - 1} (--list-runs prints them)")
    problem = writable_dir_problem(settings.work_dir)
    if problem is not None:
        raise UsageError(f"--work-dir: {problem}; choose another --work-dir")
    spec = specs[index]
    if not (settings.resume or settings.overwrite) and \
            run_holds_work(Path(settings.work_dir) / spec.run):
        _refuse_discarding_any([spec], settings)
    dataset = _dataset(settings.dataset, settings.data_dir)
    bar = _Bar(spec.epochs, f"{analysis.name} [{index}]", progress)
    try:
        return run_one(spec, dataset=dataset, progress=bar, **_run_kwargs(settings))
    finally:
        bar.close()


def _execute_units(units: list[list[RunSpec]], specs: list[RunSpec], settings: Settings,
                   kwargs: dict[str, Any], dataset: ArrayDataset, bar: _Bar) -> list[RunOutcome]:
    """Run stacks (:func:`run_stack`) and single runs, in ``jobs`` worker processes when
    there is more than one unit and job."""
    results: dict[str, RunOutcome] = {}
    if settings.jobs == 1 or len(units) == 1:
        for u in units:
            outs = ([run_one(u[0], dataset=dataset, progress=bar, **kwargs)] if len(u) == 1
                    else run_stack(u, dataset=dataset, progress=bar, **kwargs))
            results.update({o.spec.run: o for o in outs})
        return [results[s.run] for s in specs]
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    ex = ProcessPoolExecutor(max_workers=min(settings.jobs, len(units)), mp_context=ctx,
                             initializer=_init_worker,
                             initargs=(progress_queue, settings.threads, os.getpid()))

    def drain() -> None:
        while True:
            try:
                run, epochs = progress_queue.get_nowait()
            except queue_mod.Empty:
                return
            bar(run, epochs)

    try:
        futures = [ex.submit(_worker_run, u[0], kwargs) if len(u) == 1
                   else ex.submit(_worker_stack, u, kwargs) for u in units]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            drain()
            for f in done:
                got = f.result()
                for o in (got if isinstance(got, list) else [got]):
                    results[o.spec.run] = o
        drain()
    except BrokenProcessPool as err:
        _stop_workers(ex)
        raise WorkerDiedError(
            "a worker process of --jobs died (out of memory? killed?); finished epochs are "
            "checkpointed, rerun with --resume. From a script, call run_analysis with "
            "jobs > 1 under `if __name__ == '__main__':` (spawned workers import the main "
            "module)"
        ) from err
    except BaseException:
        _stop_workers(ex)
        raise
    ex.shutdown(wait=True)
    progress_queue.close()
    return [results[s.run] for s in specs]

@dataclass
class ReproduceResult:
    """The written files, the tidy table and the per-run outcomes of :func:`run_analysis`."""

    paths: dict[str, Path]
    frame: pd.DataFrame
    outcomes: list[RunOutcome]
    wall_s: float


def check_output_folders(settings: Settings) -> None:
    """:class:`UsageError` unless ``--out`` and ``--work-dir`` can be created and written
    (checked before any training; nothing is created)."""
    for flag, path in (("--out", settings.out), ("--work-dir", settings.work_dir)):
        problem = writable_dir_problem(path)
        if problem is not None:
            raise UsageError(f"{flag}: {problem}; choose another {flag} (or fix its "
                             "permissions / free space)")


def _refuse_discarding_any(specs: Sequence[RunSpec], settings: Settings) -> None:
    if settings.resume or settings.overwrite:
        return
    held = [s.run for s in specs if run_holds_work(Path(settings.work_dir) / s.run)]
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise UsageError(f"{settings.work_dir} already holds checkpointed work of {len(held)} of "
                         f"these runs ({shown}); pass --resume to reuse and continue it, or "
                         "--overwrite to discard it and train afresh")


def run_analysis(settings: Settings, *, progress: bool = True,
                 command: str | None = None) -> ReproduceResult:
    """Run every run of ``settings.analysis`` and publish ``NAME.{csv,png,pdf,json}`` to ``out``.

    Before any training, ``out`` and ``work_dir`` are checked (creatable, writable), the data
    is loaded, the work dir is locked (another process using it: :class:`UsageError`) and, without
    ``resume``/``overwrite``, run folders holding checkpointed work are refused.  The four
    result files are published as one unit (:func:`biasshift.io.publish_result_set`; the JSON
    records their SHA-256).

    ``progress`` shows an overall tqdm bar (hidden when stderr is not a terminal). Data problems
    raise the data module's :class:`~biasshift.data.DatasetNotFoundError` /
    :class:`~biasshift.data.ChecksumError`; bad settings or run folders :class:`UsageError`;
    file system faults :class:`OSError` (finished runs are kept in the work dir either way).
    """
    t0 = time.perf_counter()
    analysis = get_analysis(settings.analysis)
    analysis.validate(settings)
    check_output_folders(settings)
    dataset = _dataset(settings.dataset, settings.data_dir)  # fails early when data is missing
    specs = _run_specs(analysis, settings)
    try:
        lock = FolderLock(settings.work_dir, what="work dir").acquire()
    except FolderLockedError as err:
        raise UsageError(f"{err} (--work-dir)") from None
    try:
        _refuse_discarding_any(specs, settings)
        bar = _Bar(sum(s.epochs for s in specs), analysis.name, progress)
        try:
            outcomes = _execute(analysis, specs, settings, dataset, bar)
        finally:
            bar.close()
        return _publish(analysis, settings, specs, outcomes, dataset, command, t0)
    finally:
        lock.release()


def _publish(analysis: Analysis, settings: Settings, specs: list[RunSpec],
             outcomes: list[RunOutcome], dataset: ArrayDataset, command: str | None,
             t0: float) -> ReproduceResult:
    df = analysis.aggregate([o.frame for o in outcomes], settings)
    summary = analysis.summary(df, settings)
    fig = analysis.plot(df, settings)
    stem = Path(settings.out) / analysis.name
    train_size = settings.train_size
    sizes = {sp.train_size for sp in specs}
    if len(sizes) == 1:  # an analysis may set the runs' training subset itself
        train_size = sizes.pop()
    n_train = (dataset.train_x.shape[0] if train_size is None
               else min(train_size, dataset.train_x.shape[0]))
    requested = settings.probe_size
    probe_used = n_train if requested is None else min(requested, n_train)
    extra: dict[str, Any] = {}
    if command is not None:
        extra["command"] = command
    if summary is not None:
        extra["summary"] = summary
    outputs = {k: str(stem.with_suffix(f".{k}")) for k in ("csv", "png", "pdf")}
    record = provenance(
        **extra,
        analysis=analysis.name,
        figure=analysis.figure,
        description=analysis.description,
        preset=settings.preset,
        quick=settings.quick,
        device=settings.device,
        device_name=(torch.cuda.get_device_name(torch.device(settings.device))
                     if settings.device.startswith("cuda") else "cpu"),
        settings=settings.to_dict(),
        n_train=int(n_train),
        probe_size_used=int(probe_used),
        n_runs=len(specs),
        n_diverged=sum(o.status == "diverged" for o in outcomes),
        n_reused=sum(o.reused for o in outcomes),
        runs=[o.info() for o in outcomes],
        tidy_columns=list(analysis.tidy_columns),
        outputs=outputs,
    )
    # the time of this call, and the training time of every run summed over all the calls
    # that trained it (with --jobs N, N runs overlap in time)
    wall = time.perf_counter() - t0
    record["wall_time_s"] = round(wall, 3)
    record["wall_time_total_s"] = round(sum(o.train_s for o in outcomes), 3)

    def write_csv_to(path: Path) -> None:
        df.to_csv(path, index=False)

    def figure_writer(fmt: str) -> Callable[[Path], None]:
        return lambda path: fig.savefig(path, format=fmt, dpi=150)

    published = publish_result_set(
        stem, {"csv": write_csv_to, "png": figure_writer("png"), "pdf": figure_writer("pdf")},
        record)
    paths = {k: published[k] for k in ("csv", "png", "pdf", "json")}
    return ReproduceResult(paths=paths, frame=df, outcomes=outcomes, wall_s=wall)
