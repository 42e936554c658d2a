"""The ``biasshift`` command line.

``biasshift list``
    the analyses that ``reproduce`` knows, with one line each.
``biasshift reproduce NAME [options]``
    train the runs of an analysis and write ``NAME.png``, ``NAME.pdf``, ``NAME.csv`` (tidy) and
    ``NAME.json`` (provenance) into ``--out``; see ``biasshift reproduce --help``.

Exit codes: 0 success, 2 bad usage, missing/corrupt data or a file-system fault (a one-line
message naming the path and the fix, no traceback), 130 interrupted by Ctrl-C and 143 stopped by
SIGTERM (finished epochs are checkpointed; rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  biasshift list
  biasshift reproduce activation-median --quick        # embedded digits, < 2 min, figures/quick/
  biasshift reproduce activation-median --quick --resume   # again: reuse the finished runs
  biasshift reproduce activation-median --data-dir ../shared/data --jobs 4
  biasshift reproduce median-variance --activations relu,elu --epochs 200
  biasshift reproduce autoencoder --lr 1e-2,1e-3 --resume --work-dir runs/ae
  biasshift reproduce natural-gradient-gap --quick --option damping=1e-3
  biasshift reproduce activation-median --quick --list-runs     # the runs, numbered 0..N-1
  biasshift reproduce activation-median --quick --run-index 3   # one run (a Slurm array task)

Paper presets read MNIST from --data-dir, $BIASSHIFT_DATA/<name>/ or the user cache (and download
it unless $BIASSHIFT_OFFLINE is set). Runs checkpoint every epoch into --work-dir (default: the
user cache, $XDG_CACHE_HOME/biasshift/runs/ or ~/.cache/biasshift/runs/); after an interruption
the same command with --resume continues where it stopped. Rerunning without --resume or
--overwrite never discards checkpointed runs; it stops and says so. By default --jobs x --threads
fill the cores available ($BIASSHIFT_CPUS overrides their count).
"""


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got an empty one")
    return items


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a run index (an integer >= 0), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a run index (an integer >= 0), got {text!r}")
    return value


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``biasshift`` command."""
    parser = argparse.ArgumentParser(
        prog="biasshift",
        description="Measure and reproduce the ELU paper's bias-shift results (Clevert et al., "
                    "ICLR 2016).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from biasshift import __version__

    parser.add_argument("--version", action="version", version=f"biasshift {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list the analyses that `reproduce` runs",
                   description="List the analyses that `biasshift reproduce` runs.")
    rep = sub.add_parser(
        "reproduce", help="train the runs of an analysis and write its figure and data",
        description="Train every run of analysis NAME (activations x learning rates x seeds), "
                    "then write NAME.png, NAME.pdf, NAME.csv (tidy: analysis, run, dataset, "
                    "activation, seed, lr, epoch, layer, unit, quantity, value) and NAME.json "
                    "(command, versions, git revision, device, wall time) into --out. Options "
                    "left out take the preset's value (the paper's, or --quick).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("name", metavar="NAME", help="the analysis (see `biasshift list`)")
    rep.add_argument("--quick", action="store_true",
                     help="the quick preset: embedded 8x8 digits, few epochs and seeds (< 2 min "
                          "on 2 CPU cores; with --dataset mnist or fashion-mnist it trains on "
                          "the first 1500 training and 500 test images to stay as quick); "
                          "output defaults to figures/quick/")
    rep.add_argument("--dataset", metavar="NAME",
                     help="mnist, fashion-mnist, digits, cifar10 or cifar100 (preset: mnist; "
                          "quick: digits; conv-activations: fashion-mnist)")
    rep.add_argument("--data-dir", metavar="DIR",
                     help="folder with the dataset's IDX files (or with <dataset>/ inside)")
    rep.add_argument("--epochs", type=_positive, metavar="N", help="epochs per run")
    rep.add_argument("--seeds", type=_positive, metavar="N",
                     help="runs per activation and learning rate (seeds 0..N-1)")
    rep.add_argument("--activations", type=_csv, metavar="LIST",
                     help="comma-separated, from elu,relu,lrelu,srelu")
    rep.add_argument("--lr", type=_csv, metavar="LIST", dest="lrs",
                     help="comma-separated learning rates (autoencoder: 1e-2,1e-3,1e-4,1e-5)")
    rep.add_argument("--batch-size", type=_positive, metavar="N", help="mini-batch size (64)")
    rep.add_argument("--probe-size", metavar="N|all",
                     help="training samples in the fixed probe subset for the per-unit "
                          "statistics (0: none; 'all': the whole training set)")
    rep.add_argument("--device", default="cpu", metavar="DEV",
                     help="cpu (default; bit-identical resume) or cuda / cuda:N")
    rep.add_argument("--out", metavar="DIR",
                     help="output folder (default figures/, quick: figures/quick/)")
    rep.add_argument("--work-dir", metavar="DIR",
                     help="run folders with checkpoints (default: the user cache, "
                          "~/.cache/biasshift/runs/NAME/, quick: .../runs/quick/NAME/)")
    rep.add_argument("--resume", action="store_true",
                     help="reuse finished runs and continue interrupted ones from their "
                          "checkpoints")
    rep.add_argument("--overwrite", action="store_true",
                     help="discard the checkpointed runs in --work-dir and train afresh "
                          "(without --resume or --overwrite such runs are an error)")
    rep.add_argument("--keep-checkpoints", action="store_true",
                     help="keep each finished run's checkpoint.pt (needed to extend it to more "
                          "epochs later; by default it is removed when the run finishes)")
    rep.add_argument("--jobs", type=_positive, metavar="N",
                     help="runs trained in parallel processes (default: as many as runs and "
                          "cores allow)")
    rep.add_argument("--batch-runs", default=None, metavar="K",
                     help="train up to K runs that share an architecture as one stacked model "
                          "(batched GEMMs; 1 = one by one, 'auto' = as many as fit a quarter of "
                          "the free memory; default: the analysis's, 'auto' for "
                          "activation-median)")
    rep.add_argument("--threads", type=_positive, metavar="N",
                     help="torch threads per run (default: the cores left per job, usually 1; "
                          "jobs x threads above the cores is warned about)")
    rep.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                     dest="options",
                     help="an analysis-specific setting (repeatable), e.g. natural-gradient-gap's "
                          "--option damping=1e-3 --option optimizers=sgd; the JSON record lists "
                          "every option under settings.options")
    rep.add_argument("--run-index", type=_index, metavar="I",
                     help="train only run I (0 to N-1) in this process and write no figure "
                          "(Slurm arrays: --run-index $SLURM_ARRAY_TASK_ID); afterwards the "
                          "same command with --resume and without --run-index assembles the "
                          "figure")
    rep.add_argument("--list-runs", action="store_true",
                     help="print the runs (index and id, one a line) and exit")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _option_listing(paper: dict[str, object], quick: dict[str, object]) -> list[str]:
    """``KEY=VALUE`` for each ``--option`` of an analysis (the paper preset's default, and the
    quick preset's where it differs)."""
    def shown(v: object) -> str:
        return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)

    items = []
    for key, value in paper.items():
        text = f"{key}={shown(value)}"
        if key in quick and quick[key] != value:
            text += f" (quick: {shown(quick[key])})"
        items.append(text)
    return items


def _list() -> int:
    from biasshift.reproduce import ANALYSES

    width = max(len(n) for n in ANALYSES)
    indent = " " * (width + 2)
    for name, analysis in ANALYSES.items():
        print(f"{name:<{width}}  {analysis.description}")
        items = _option_listing(analysis.presets["paper"].options,
                                analysis.presets["quick"].options)
        if items:
            print(textwrap.fill("--option KEY=VALUE: " + "  ".join(items), width=100,
                                initial_indent=indent, subsequent_indent=indent + "  ",
                                break_on_hyphens=False))
    print("\nRun one with `biasshift reproduce NAME --quick` (minutes on a laptop) or without "
          "--quick for the paper's settings; `biasshift reproduce --help` lists the options.")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM behaves like SIGINT: the run stops (its workers are terminated) and says so."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


_OS_FIXES = {
    errno.ENOSPC: "free some space there or choose a folder on another disk",
    errno.EDQUOT: "free some space there or choose a folder on another disk",
    errno.EACCES: "make it writable (readable, for data) or choose another folder",
    errno.EPERM: "make it writable (readable, for data) or choose another folder",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOTDIR: "a file stands where a folder is expected: move it or choose another folder",
    errno.EEXIST: "a file stands where a folder is expected: move it or choose another folder",
    errno.EISDIR: "a folder stands where a file is expected: move it or choose another path",
    errno.ENOENT: "check the path",
}


def _os_error_line(err: OSError) -> str:
    """One line for an :class:`OSError`: what failed, on which path, and the fix."""
    what = err.strerror or str(err)
    paths = [p for p in (err.filename, getattr(err, "filename2", None)) if p is not None]
    where = " -> ".join(os.fsdecode(p) for p in paths) or "(no path reported)"
    fix = _OS_FIXES.get(err.errno or -1, "check the path and its folder")
    return f"{what}: {where}; {fix}"


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"biasshift: warning: {w.message}", file=sys.stderr)


def _reproduce(args: argparse.Namespace, argv: Sequence[str], work_dir: list[Path]) -> int:
    from biasshift.reproduce import resolve_settings, run_analysis

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = resolve_settings(
            args.name, quick=args.quick, dataset=args.dataset, data_dir=args.data_dir,
            epochs=args.epochs, seeds=args.seeds, activations=args.activations, lrs=args.lrs,
            batch_size=args.batch_size, probe_size=args.probe_size, device=args.device,
            out=args.out, work_dir=args.work_dir, resume=args.resume, overwrite=args.overwrite,
            keep_checkpoints=args.keep_checkpoints, jobs=args.jobs, threads=args.threads,
            options=dict(args.options), batch_runs=args.batch_runs,
        )
    _print_warnings(caught)
    if args.list_runs:
        from biasshift.reproduce import list_runs

        for i, run in enumerate(list_runs(settings)):
            print(f"{i}\t{run}")
        return 0
    work_dir.append(settings.work_dir)
    if args.run_index is not None:
        from biasshift.reproduce import run_index

        outcome = run_index(settings, args.run_index, progress=not args.no_progress)
        what = "reused" if outcome.reused else outcome.status
        print(f"{settings.analysis}: run {args.run_index} ({outcome.spec.run}) {what}; in "
              f"{settings.work_dir}. When every run is done, the same command with --resume "
              "and without --run-index writes the figure")
        return 0
    result = run_analysis(settings, progress=not args.no_progress,
                          command=" ".join(["biasshift", *argv]))
    stem = result.paths["csv"].with_suffix("")
    diverged = sum(o.status == "diverged" for o in result.outcomes)
    reused = sum(o.reused for o in result.outcomes)
    notes = []
    if reused:
        notes.append(f"{reused} reused")
    if diverged:
        notes.append(f"{diverged} diverged")
    note = f" ({', '.join(notes)})" if notes else ""
    runs = f"{len(result.outcomes)} run" + ("s" if len(result.outcomes) != 1 else "")
    print(f"{settings.analysis}: {runs}{note} in {result.wall_s:.1f} s; "
          f"wrote {stem}.{{png,pdf,csv,json}}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2

    from biasshift.data.base import ChecksumError, DatasetNotFoundError
    from biasshift.reproduce.base import UsageError
    from biasshift.reproduce.runner import WorkerDiedError

    work_dir: list[Path] = []  # set once the settings are resolved

    def kept() -> str:
        if not work_dir:
            return ""
        return (f"; runs finished so far are kept in {work_dir[0]} and the same command with "
                "--resume reuses them")

    try:
        with _sigterm_stops():
            if args.command == "list":
                return _list()
            return _reproduce(args, argv, work_dir)
    except (UsageError, DatasetNotFoundError, ChecksumError, WorkerDiedError) as err:
        print(f"biasshift: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"biasshift: error: {_os_error_line(err)}{kept()}", file=sys.stderr)
        return 2
    except _Terminated:
        print("biasshift: stopped by SIGTERM; finished epochs are checkpointed, rerun the same "
              "command with --resume to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("biasshift: interrupted; finished epochs are checkpointed, rerun the same command "
              "with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
