"""Thin entry point, the same as ``biasshift reproduce median-variance [options]``."""

import sys

from biasshift.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "median-variance", *sys.argv[1:]]))
