"""The registry of analyses: ``ANALYSES[name] -> Analysis``.

Adding an analysis is one new module in :mod:`biasshift.reproduce` that defines an
:class:`~biasshift.reproduce.base.Analysis` subclass and calls :func:`register` on an instance,
plus its module name in ``_MODULES`` below (which fixes the order of ``biasshift list``).
"""

from __future__ import annotations

import importlib

from biasshift._names import unknown_name_error
from biasshift.reproduce.base import Analysis, UsageError

__all__ = ["ANALYSES", "get_analysis", "register"]

ANALYSES: dict[str, Analysis] = {}

_MODULES = ("activation_median", "median_variance", "autoencoder", "natural_gradient_gap")


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` under ``analysis.name`` (a second one with that name is an error)."""
    if not analysis.name:
        raise ValueError(f"{type(analysis).__name__} has no name")
    old = ANALYSES.get(analysis.name)
    if old is not None and type(old) is not type(analysis):
        raise ValueError(f"analysis {analysis.name!r} is registered twice "
                         f"({type(old).__name__} and {type(analysis).__name__})")
    for preset in ("paper", "quick"):
        if preset not in analysis.presets:
            raise ValueError(f"analysis {analysis.name!r} lacks the {preset!r} preset")
    ANALYSES[analysis.name] = analysis
    return analysis


def get_analysis(name: str) -> Analysis:
    """The registered analysis ``name``; :class:`UsageError` listing close names otherwise."""
    key = name.strip().lower().replace("_", "-")
    if key not in ANALYSES:
        raise UsageError(unknown_name_error("analysis", name, ANALYSES).args[0]
                         + " (run `biasshift list`)")
    return ANALYSES[key]


for _module in _MODULES:
    importlib.import_module(f"biasshift.reproduce.{_module}")
