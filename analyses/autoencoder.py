"""Thin entry point, the same as ``biasshift reproduce autoencoder [options]``."""

import sys

from biasshift.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "autoencoder", *sys.argv[1:]]))
