"""The ``biasshift`` command line.

``biasshift list``
    the analyses that ``reproduce`` knows, with one line each.
``biasshift reproduce NAME [options]``
    train the runs of an analysis and write ``NAME.png``, ``NAME.pdf``, ``NAME.csv`` (tidy) and
    ``NAME.json`` (provenance) into ``--out``; see ``biasshift reproduce --help``.

Exit codes: 0 success, 2 bad usage or missing/corrupt data (a one-line message, no traceback),
130 interrupted (finished epochs are checkpointed; rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  biasshift list
  biasshift reproduce activation-median --quick        # embedded digits, < 2 min, figures/quick/
  biasshift reproduce activation-median --data-dir ../shared/data --jobs 4
  biasshift reproduce median-variance --activations relu,elu --epochs 200
  biasshift reproduce autoencoder --lr 1e-2,1e-3 --resume --work-dir runs/ae
  biasshift reproduce natural-gradient-gap --quick --option damping=1e-3

Paper presets read MNIST from --data-dir, $BIASSHIFT_DATA/<name>/ or the user cache (and download
it unless $BIASSHIFT_OFFLINE is set). Runs checkpoint every epoch into --work-dir; after an
interruption the same command with --resume continues where it stopped.
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
                          "on 2 CPU cores); output defaults to figures/quick/")
    rep.add_argument("--dataset", metavar="NAME",
                     help="mnist, fashion-mnist or digits (preset: mnist; quick: digits)")
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
                     help="run folders with checkpoints (default runs/NAME/, quick: "
                          "runs/quick/NAME/)")
    rep.add_argument("--resume", action="store_true",
                     help="reuse finished runs and continue interrupted ones from their "
                          "checkpoints")
    rep.add_argument("--jobs", type=_positive, default=1, metavar="N",
                     help="runs trained in parallel processes (default 1)")
    rep.add_argument("--threads", type=_positive, metavar="N",
                     help="torch threads per run (default 1; use --jobs to fill the cores)")
    rep.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                     dest="options",
                     help="an analysis-specific setting (repeatable), e.g. natural-gradient-gap's "
                          "--option damping=1e-3 --option optimizers=sgd; the JSON record lists "
                          "every option under settings.options")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _list() -> int:
    from biasshift.reproduce import ANALYSES

    width = max(len(n) for n in ANALYSES)
    for name, analysis in ANALYSES.items():
        print(f"{name:<{width}}  {analysis.description}")
    print("\nRun one with `biasshift reproduce NAME --quick` (minutes on a laptop) or without "
          "--quick for the paper's settings.")
    return 0


def _reproduce(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from biasshift.reproduce import resolve_settings, run_analysis

    settings = resolve_settings(
        args.name, quick=args.quick, dataset=args.dataset, data_dir=args.data_dir,
        epochs=args.epochs, seeds=args.seeds, activations=args.activations, lrs=args.lrs,
        batch_size=args.batch_size, probe_size=args.probe_size, device=args.device,
        out=args.out, work_dir=args.work_dir, resume=args.resume, jobs=args.jobs,
        threads=args.threads, options=dict(args.options),
    )
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

    try:
        if args.command == "list":
            return _list()
        return _reproduce(args, argv)
    except (UsageError, DatasetNotFoundError, ChecksumError) as err:
        print(f"biasshift: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("biasshift: interrupted; finished epochs are checkpointed, rerun the same command "
              "with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
