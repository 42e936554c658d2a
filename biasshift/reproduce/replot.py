"""Redraw finished figures from their ``NAME.csv`` and ``NAME.json``, without training.

    python -m biasshift.reproduce.replot figures/activation-median [figures/autoencoder ...]

See :func:`biasshift.reproduce.plotting.replot`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from biasshift.reproduce.plotting import replot

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m biasshift.reproduce.replot STEM [STEM ...] (STEM.csv or "
              "STEM.csv.gz, and STEM.json must exist; writes STEM.png and STEM.pdf)",
              file=sys.stderr)
        return 2
    for arg in args:
        stem = Path(arg.removesuffix(".gz"))
        if stem.suffix in (".csv", ".json", ".png", ".pdf"):
            stem = stem.with_suffix("")
        written = replot(stem)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
