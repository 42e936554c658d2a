"""Per-unit activation statistics: the running :class:`ActivationMonitor` and exact probes."""

from __future__ import annotations

from biasshift.monitor.activation_monitor import ActivationMonitor
from biasshift.monitor.histogram import HistogramSpec
from biasshift.monitor.probe import ProbeStatistics, exact_median, probe_statistics
from biasshift.monitor.running import STAT_COLUMNS, RunningStats
from biasshift.monitor.selection import (
    ACTIVATION_TYPES,
    auto_unit_dim,
    is_activation,
    resolve_modules,
    resolve_unit_dims,
)

__all__ = [
    "ACTIVATION_TYPES",
    "STAT_COLUMNS",
    "ActivationMonitor",
    "HistogramSpec",
    "ProbeStatistics",
    "RunningStats",
    "auto_unit_dim",
    "exact_median",
    "is_activation",
    "probe_statistics",
    "resolve_modules",
    "resolve_unit_dims",
]
