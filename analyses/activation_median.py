"""Thin entry point, the same as ``biasshift reproduce activation-median [options]``."""

import sys

from biasshift.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "activation-median", *sys.argv[1:]]))
