"""Thin entry point, the same as ``biasshift reproduce natural-gradient-gap [options]``."""

import sys

from biasshift.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "natural-gradient-gap", *sys.argv[1:]]))
