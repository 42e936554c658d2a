"""The registry of analyses: ``ANALYSES[name] -> Analysis``.

Adding an analysis is one new module in :mod:`biasshift.reproduce` that defines an
:class:`~biasshift.reproduce.base.Analysis` subclass and calls
:func:`biasshift.reproduce.base.register` on an instance, plus its module name in ``_MODULES``
below (which fixes the order of ``biasshift list``).  The analysis modules import only
:mod:`~biasshift.reproduce.base`, so there is no import loop: this module imports them.
"""

from __future__ import annotations

import importlib

from biasshift._names import unknown_name_error
from biasshift.reproduce.base import ANALYSES, Analysis, UsageError, register

__all__ = ["ANALYSES", "get_analysis", "register"]

_MODULES = ("activation_median", "median_variance", "autoencoder", "natural_gradient_gap",
            "conv_activations", "bias_shift_mechanism")


def get_analysis(name: str) -> Analysis:
    """The registered analysis ``name``; :class:`UsageError` listing close names otherwise."""
    key = name.strip().lower().replace("_", "-")
    if key not in ANALYSES:
        raise UsageError(unknown_name_error("analysis", name, ANALYSES).args[0]
                         + " (run `biasshift list`)")
    return ANALYSES[key]


for _module in _MODULES:
    importlib.import_module(f"biasshift.reproduce.{_module}")
