"""Thin entry point, the same as ``biasshift reproduce conv-activations [options]``."""

import sys

from biasshift.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "conv-activations", *sys.argv[1:]]))
