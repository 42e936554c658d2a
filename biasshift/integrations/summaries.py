"""Per-layer scalar summaries of the monitor, the exact probe and the bias-shift probe.

Framework-free (plain ``{tag: float}`` dicts), shared by the TensorBoard writer and the Lightning
callback; every function does the one host transfer of the statistics it reads.

Per monitored module (``ActivationMonitor.stats()``; units with no finite sample left out)
    ``median_unit_mean``  the median over units of the units' mean activation (the paper's
    Fig. 2a summary of a layer); ``frac_negative`` the mean over units of the fraction of
    negative activations; ``dead_units`` the fraction of *dead* units, whose activation was
    the same value for every finite sample (a ReLU that never fired, a saturated unit);
    ``mean_unit_std`` the mean over units of the standard deviation.
Per probed module (:class:`~biasshift.ProbeStatistics`)
    ``probe_median_unit_mean`` and, with medians, ``probe_median_unit_median``.
Per tracked layer (a :class:`~biasshift.fisher.bias_shift_probe.Measurement`)
    the median over units of ``cos_grad_ng``, ``cos_ng_uncorrected``, ``k``, and of the
    absolute bias shifts ``|bias_shift_sgd|``, ``|bias_shift_ng|`` (the tracked cosines and
    shifts of the paper's Section 2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["COSINES", "measurement_scalars", "monitor_scalars", "probe_scalars"]

#: The BiasShiftProbe quantities summarised per layer (median over units; ``|x|`` for shifts).
COSINES = ("cos_grad_ng", "cos_ng_uncorrected", "k")
_SHIFTS = ("bias_shift_sgd", "bias_shift_ng")


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def monitor_scalars(stats: pd.DataFrame, prefix: str = "biasshift") -> dict[str, float]:
    """``{prefix/module/summary: value}`` from an ``ActivationMonitor.stats()`` frame."""
    out: dict[str, float] = {}
    for module, df in stats.groupby("module", sort=False):
        seen = df[df["count"] > 0]
        tag = f"{prefix}/{module}"
        out[f"{tag}/median_unit_mean"] = _median(seen["mean"].to_numpy())
        out[f"{tag}/frac_negative"] = float(seen["frac_negative"].mean()) if len(seen) \
            else float("nan")
        dead = (seen["max"] == seen["min"]).to_numpy()
        out[f"{tag}/dead_units"] = float(dead.mean()) if len(seen) else float("nan")
        out[f"{tag}/mean_unit_std"] = float(seen["std"].mean()) if len(seen) else float("nan")
    return out


def probe_scalars(stats: Any, prefix: str = "biasshift") -> dict[str, float]:
    """``{prefix/module/probe_*: value}`` from a :class:`~biasshift.ProbeStatistics`."""
    out: dict[str, float] = {}
    frame = stats.to_frame()
    for module, df in frame.groupby("module", sort=False):
        out[f"{prefix}/{module}/probe_median_unit_mean"] = _median(df["mean"].to_numpy())
        if stats.median:
            out[f"{prefix}/{module}/probe_median_unit_median"] = _median(
                df["median"].to_numpy())
    return out


def measurement_scalars(m: Any, prefix: str = "biasshift") -> dict[str, float]:
    """``{prefix/layer/quantity: median over units}`` of a BiasShiftProbe measurement."""
    values = m.host().numpy()
    index = {q: i for i, q in enumerate(m.quantities)}
    out: dict[str, float] = {}
    start = 0
    for layer, units in zip(m.layers, m.units):
        part = values[:, start:start + units]
        start += units
        for q in COSINES:
            if q in index:
                out[f"{prefix}/{layer}/{q}"] = _median(part[index[q]])
        for q in _SHIFTS:
            if q in index:
                out[f"{prefix}/{layer}/abs_{q}"] = _median(np.abs(part[index[q]]))
    return out
