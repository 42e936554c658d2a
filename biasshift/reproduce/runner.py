"""Running an analysis: resolve settings, train every run (resumably, optionally in parallel),
aggregate the tidy table, plot, and write ``NAME.csv``, ``NAME.png``, ``NAME.pdf``, ``NAME.json``.

Run folders
    Each run trains in ``<work_dir>/<run-id>/`` (default ``runs/<name>/``, quick presets
    ``runs/quick/<name>/``), which holds ``spec.json`` (what the run is), ``checkpoint.pt`` and
    ``history.csv`` (rewritten atomically after every epoch) and, once the run is complete,
    ``done.json``. With ``resume=True`` a complete run whose spec matches is reused as it is, a
    partial one continues from its checkpoint (bit-identically on the CPU), and a run may be
    extended to more epochs; a folder whose spec differs is an error (never silently mixed).
    Without ``resume`` every run starts afresh and its folder's files are replaced.

Parallelism
    ``jobs > 1`` trains runs in that many worker processes (spawn context); every run sets
    ``torch.set_num_threads(threads)`` (default 1: the paper's small networks at batch 64 gain
    little from intra-op threads, and OpenMP threads degrade badly on a busy machine; use
    ``jobs`` to fill the cores). Results do not depend on ``jobs``; on the CPU they may depend on
    ``threads`` (the order of floating-point reductions), so a resume should keep it.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from biasshift._names import unknown_name_error
from biasshift.activations import activation_names
from biasshift.data import load_dataset
from biasshift.data.base import ArrayDataset
from biasshift.io import provenance, write_csv, write_json
from biasshift.reproduce.base import (
    DATASETS,
    TIDY_COLUMNS,
    Analysis,
    Preset,
    RunSpec,
    Settings,
    UsageError,
)
from biasshift.reproduce.plotting import save_figure
from biasshift.reproduce.registry import get_analysis
from biasshift.train.checkpoint import CheckpointError
from biasshift.train.trainer import CHECKPOINT_NAME, HISTORY_NAME, Trainer

__all__ = ["ReproduceResult", "RunOutcome", "resolve_settings", "run_analysis", "run_one"]

SPEC_NAME = "spec.json"
DONE_NAME = "done.json"

ProgressFn = Callable[[str, int], None]


# ---------------------------------------------------------------------------- settings
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
    jobs: int = 1,
    threads: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the chosen preset (``"quick"`` or ``"paper"``) with overrides and check everything.

    ``None`` keeps the preset's value. ``probe_size`` is an int or ``"all"``. ``options``
    overrides the preset's analysis-specific options (``{"damping": 1e-3}``; strings are
    converted to the type of the preset's value, lists are comma-separated). Raises
    :class:`UsageError` with a message that says what to change.
    """
    analysis = get_analysis(name)
    preset_name = "quick" if quick else "paper"
    preset = analysis.presets[preset_name]

    ds = (dataset or preset.dataset).strip().lower()
    if ds not in DATASETS:
        raise UsageError(unknown_name_error("dataset", ds, DATASETS).args[0])
    acts = [a.strip().lower() for a in (activations or preset.activations)]
    known = activation_names()
    for a in acts:
        if a not in known:
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

    jobs = _positive_int("jobs", jobs)
    if threads is None:
        threads = 1
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
        jobs=jobs,
        threads=_positive_int("threads", threads),
        options=_options(analysis, preset, options),
    )
    analysis.validate(settings)
    return settings


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

    def info(self) -> dict[str, Any]:
        secs = self.epoch_seconds
        return {
            "run": self.spec.run, "activation": self.spec.activation, "seed": self.spec.seed,
            "lr": self.spec.lr, "status": self.status, "epochs_done": self.epochs_done,
            "reused": self.reused, "resumed_from_epoch": self.resumed_from,
            "wall_s": round(self.wall_s, 3),
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


def _read_history(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"run": str, "layer": str, "quantity": str, "unit": "Int64"},
                     keep_default_na=False,
                     na_values={"unit": [""], "value": ["", "NaN", "nan"]})
    df["value"] = df["value"].astype(float)
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


def run_one(
    spec: RunSpec,
    *,
    work_dir: str | os.PathLike[str],
    device: str = "cpu",
    threads: int | None = None,
    resume: bool = False,
    data_dir: str | None = None,
    dataset: ArrayDataset | None = None,
    progress: ProgressFn | None = None,
) -> RunOutcome:
    """Train (or reuse, or resume) one run in ``<work_dir>/<spec.run>/``; return its outcome."""
    analysis = get_analysis(spec.analysis)
    run_dir = Path(work_dir) / spec.run
    spec_path, done_path = run_dir / SPEC_NAME, run_dir / DONE_NAME
    hist_path, ckpt_path = run_dir / HISTORY_NAME, run_dir / CHECKPOINT_NAME
    want = _normalised(spec.to_dict())
    t0 = time.perf_counter()

    if resume and spec_path.exists():
        # fields added to RunSpec later read as their defaults in older spec.json files
        have = {"optimizer": "sgd", "options": {}, **json.loads(spec_path.read_text())}
        diff = sorted(k for k in set(want) | set(have)
                      if k != "epochs" and have.get(k) != want.get(k))
        if diff:
            detail = "; ".join(f"{k}: folder {have.get(k)!r}, now {want.get(k)!r}" for k in diff)
            raise UsageError(f"{run_dir} holds a different run ({detail}); choose another "
                             "--work-dir or drop --resume to start afresh")
        if done_path.exists() and hist_path.exists():
            done = json.loads(done_path.read_text())
            stopped = done.get("status") == "diverged" and done["epochs_done"] <= spec.epochs
            if done["epochs"] == spec.epochs or stopped:
                frame = analysis.run_frame(spec, _with_spec_columns(_read_history(hist_path),
                                                                    spec), run_dir, None)
                if progress is not None:
                    progress(spec.run, spec.epochs)
                return RunOutcome(spec, frame, done["status"], int(done["epochs_done"]),
                                  reused=True, wall_s=float(done.get("wall_s", 0.0)),
                                  epoch_seconds=list(done.get("epoch_seconds", [])))
            if done["epochs"] > spec.epochs:
                raise UsageError(f"{run_dir} was completed with {done['epochs']} epochs, more "
                                 f"than the {spec.epochs} asked for; pass --epochs "
                                 f"{done['epochs']}, choose another --work-dir, or drop "
                                 "--resume to start afresh")
            # fewer epochs than asked for: continue from the checkpoint
    if not resume:
        for p in (done_path, hist_path, ckpt_path):
            p.unlink(missing_ok=True)
    done_path.unlink(missing_ok=True)
    write_json(want, spec_path)

    ds = dataset if dataset is not None else _dataset(spec.dataset, data_dir)
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
    )
    try:
        history = trainer.fit(resume=resume)
    except CheckpointError as err:
        raise UsageError(f"{err} (run folder {run_dir})") from None
    status = "diverged" if trainer.diverged else "finished"
    frame = analysis.run_frame(spec, _with_spec_columns(history, spec), run_dir, trainer)
    wall = time.perf_counter() - t0
    write_json({"status": status, "epochs": spec.epochs, "epochs_done": trainer.epoch,
                "wall_s": wall, "epoch_seconds": trainer.epoch_seconds}, done_path)
    if progress is not None:
        progress(spec.run, spec.epochs)
    return RunOutcome(spec, frame, status, trainer.epoch,
                      resumed_from=trainer.resumed_from, wall_s=wall,
                      epoch_seconds=list(trainer.epoch_seconds))


# ---------------------------------------------------------------------------- many runs
_WORKER: dict[str, Any] = {}


def _init_worker(progress_queue: Any, threads: int | None) -> None:
    _WORKER["queue"] = progress_queue
    if threads is not None:
        torch.set_num_threads(threads)


def _worker_report(run: str, epochs: int) -> None:
    q = _WORKER.get("queue")
    if q is not None:
        q.put((run, epochs))


def _worker_run(spec: RunSpec, kwargs: dict[str, Any]) -> RunOutcome:
    return run_one(spec, progress=_worker_report, **kwargs)


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


def _execute(analysis: Analysis, specs: list[RunSpec], settings: Settings,
             dataset: ArrayDataset, bar: _Bar) -> list[RunOutcome]:
    kwargs = {"work_dir": str(settings.work_dir), "device": settings.device,
              "threads": settings.threads, "resume": settings.resume,
              "data_dir": settings.data_dir}
    if settings.jobs == 1 or len(specs) == 1:
        return [run_one(s, dataset=dataset, progress=bar, **kwargs) for s in specs]

    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    results: dict[int, RunOutcome] = {}

    def drain() -> None:
        while True:
            try:
                run, epochs = progress_queue.get_nowait()
            except queue_mod.Empty:
                return
            bar(run, epochs)

    with ProcessPoolExecutor(max_workers=min(settings.jobs, len(specs)), mp_context=ctx,
                             initializer=_init_worker,
                             initargs=(progress_queue, settings.threads)) as ex:
        futures: dict[Future[RunOutcome], int] = {
            ex.submit(_worker_run, s, kwargs): i for i, s in enumerate(specs)
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                drain()
                for f in done:
                    results[futures[f]] = f.result()
        except BrokenProcessPool as err:
            raise RuntimeError(
                "a worker process of --jobs died (out of memory? killed?); finished epochs are "
                "checkpointed, rerun with --resume. From a script, call run_analysis with "
                "jobs > 1 under `if __name__ == '__main__':` (spawned workers import the main "
                "module)"
            ) from err
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        drain()
    return [results[i] for i in range(len(specs))]


@dataclass
class ReproduceResult:
    """The written files, the tidy table and the per-run outcomes of :func:`run_analysis`."""

    paths: dict[str, Path]
    frame: pd.DataFrame
    outcomes: list[RunOutcome]
    wall_s: float


def run_analysis(settings: Settings, *, progress: bool = True,
                 command: str | None = None) -> ReproduceResult:
    """Run every run of ``settings.analysis`` and write ``NAME.{csv,png,pdf,json}`` to ``out``.

    ``progress`` shows an overall tqdm bar (hidden when stderr is not a terminal). Data problems
    raise the data module's :class:`~biasshift.data.DatasetNotFoundError` /
    :class:`~biasshift.data.ChecksumError`; bad settings or run folders :class:`UsageError`.
    """
    t0 = time.perf_counter()
    analysis = get_analysis(settings.analysis)
    analysis.validate(settings)
    dataset = _dataset(settings.dataset, settings.data_dir)  # fails early when data is missing
    specs = analysis.run_specs(settings)
    bar = _Bar(sum(s.epochs for s in specs), analysis.name, progress)
    try:
        outcomes = _execute(analysis, specs, settings, dataset, bar)
    finally:
        bar.close()
    df = analysis.aggregate([o.frame for o in outcomes], settings)

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / analysis.name
    paths = {"csv": write_csv(df, stem.with_suffix(".csv"))}
    summary = analysis.summary(df, settings)
    fig = analysis.plot(df, settings)
    for p in save_figure(fig, stem):
        paths[p.suffix.lstrip(".")] = p
    wall = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    if command is not None:
        extra["command"] = command
    if summary is not None:
        extra["summary"] = summary
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
        n_runs=len(specs),
        n_diverged=sum(o.status == "diverged" for o in outcomes),
        n_reused=sum(o.reused for o in outcomes),
        runs=[o.info() for o in outcomes],
        tidy_columns=list(analysis.tidy_columns),
        outputs={k: str(v) for k, v in paths.items()},
        wall_time_s=round(wall, 3),
    )
    paths["json"] = write_json(record, stem.with_suffix(".json"))
    return ReproduceResult(paths=paths, frame=df, outcomes=outcomes, wall_s=wall)
