"""Thin entry point, the same as ``biasshift reproduce bias-shift-mechanism [options]``."""

import sys

from biasshift.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "bias-shift-mechanism", *sys.argv[1:]]))
