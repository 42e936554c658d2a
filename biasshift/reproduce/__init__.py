"""Reproduce the ELU paper's MNIST figures: ``biasshift reproduce NAME``.

:data:`ANALYSES` maps each name to its :class:`Analysis` (presets, model, plug-ins, aggregation,
plot): ``activation-median`` (Fig. 2), ``median-variance`` (appendix), ``autoencoder`` (Fig. 3).
:func:`resolve_settings` merges a preset with overrides; :func:`run_analysis` trains every run
(resumable, optionally in parallel processes) and writes ``NAME.csv`` (tidy, columns
:data:`TIDY_COLUMNS`), ``NAME.png``, ``NAME.pdf`` and ``NAME.json`` (provenance)::

    from biasshift.reproduce import resolve_settings, run_analysis
    result = run_analysis(resolve_settings("activation-median", quick=True, out="figs"))
"""

from __future__ import annotations

from biasshift.reproduce.base import (
    DATASETS,
    TIDY_COLUMNS,
    Analysis,
    Preset,
    RunSpec,
    Settings,
    UsageError,
)
from biasshift.reproduce.registry import ANALYSES, get_analysis, register
from biasshift.reproduce.runner import (
    ReproduceResult,
    RunOutcome,
    list_runs,
    resolve_settings,
    run_analysis,
    run_index,
    run_one,
)

__all__ = [
    "ANALYSES",
    "DATASETS",
    "TIDY_COLUMNS",
    "Analysis",
    "Preset",
    "ReproduceResult",
    "RunOutcome",
    "RunSpec",
    "Settings",
    "UsageError",
    "get_analysis",
    "list_runs",
    "register",
    "resolve_settings",
    "run_analysis",
    "run_index",
    "run_one",
]
