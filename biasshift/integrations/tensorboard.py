"""TensorBoard summaries of the monitor, the exact probe and the bias-shift probe.

Needs the ``tensorboard`` package (``pip install biasshift[tensorboard]``); writes through
:class:`torch.utils.tensorboard.SummaryWriter`::

    from torch.utils.tensorboard import SummaryWriter
    from biasshift.integrations.tensorboard import log_monitor, log_measurement

    writer = SummaryWriter("runs/elu")
    ...                                           # train with the monitor attached
    log_monitor(writer, monitor, step)            # per-layer scalars + histograms
    log_measurement(writer, m, step)              # tracked cosines of a BiasShiftProbe step

Scalars (``biasshift/<module>/<summary>``, see :mod:`biasshift.integrations.summaries`):
``median_unit_mean``, ``frac_negative``, ``dead_units``, ``mean_unit_std`` per monitored module;
``probe_median_unit_mean`` (and ``probe_median_unit_median``) per probed module; per tracked
layer the medians over units of ``cos_grad_ng``, ``cos_ng_uncorrected``, ``k`` and the absolute
bias shifts.

Histograms
    A monitor created with ``histogram=...`` accumulates fixed-bin per-unit histograms on the
    device; :func:`log_monitor` sums them over each module's units and writes them with
    ``add_histogram_raw`` (no activation is copied to the host, only the ``bins + 2`` counts),
    with ``min``/``max``/``sum``/``sum_squares`` from the running statistics. TensorBoard's
    bucket ``i`` covers ``(limit[i-1], limit[i]]``: the underflow bin ``(-inf, lo)`` gets the
    limit ``lo`` (and starts at the observed minimum), the overflow bin ``[hi, inf)`` the
    observed maximum. :func:`log_measurement` adds a histogram over units of each cosine.

Under ``torch.distributed`` the monitor's statistics are those of all ranks (a collective, so
call :func:`log_monitor` on every rank); pass ``writer=None`` on the ranks that do not write.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from biasshift.integrations.summaries import (
    COSINES,
    measurement_scalars,
    monitor_scalars,
    probe_scalars,
)

__all__ = ["log_measurement", "log_monitor", "log_probe_statistics", "monitor_histograms",
           "summary_writer"]


def summary_writer(log_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A :class:`torch.utils.tensorboard.SummaryWriter` for ``log_dir`` (a clear error when the
    ``tensorboard`` package is missing)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("biasshift.integrations.tensorboard needs the tensorboard package: "
                          "pip install 'biasshift[tensorboard]'") from e
    return SummaryWriter(str(log_dir), **kwargs)


def monitor_histograms(monitor: Any, *, sync: bool | None = None) -> dict[str, dict[str, Any]]:
    """Per monitored module, the arguments of ``add_histogram_raw``: the module's histogram
    summed over its units, with min, max, num, sum and sum of squares of its samples."""
    spec = monitor.histogram
    if spec is None:
        raise RuntimeError("the monitor keeps no histograms; create it with "
                           "histogram=dict(bins=64, range=(-2.0, 6.0))")
    stats = monitor.stats(sync=sync)
    hist = monitor.histograms(aggregate=True, sync=sync)
    lo, hi = (float(v) for v in spec.range)
    edges = np.asarray(spec.edges(), dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for module, h in hist.groupby("module", sort=False):
        st = stats[(stats["module"] == module) & (stats["count"] > 0)]
        counts = h.sort_values("bin")["count"].to_numpy().astype(np.float64)
        num = float(st["count"].sum())
        if num == 0:
            continue
        mean, var, n = st["mean"].to_numpy(), st["var"].to_numpy(), st["count"].to_numpy()
        vmin, vmax = float(st["min"].min()), float(st["max"].max())
        top = vmax if vmax > hi else np.nextafter(hi, np.inf)
        limits = np.concatenate([[lo], edges[1:], [top]])
        out[module] = {
            "min": vmin, "max": vmax, "num": num, "sum": float((n * mean).sum()),
            "sum_squares": float((n * (var + mean**2)).sum()),
            "bucket_limits": limits.tolist(), "bucket_counts": counts.tolist(),
        }
    return out


def _scalars(writer: Any, scalars: dict[str, float], step: int) -> None:
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)


def log_monitor(writer: Any, monitor: Any, step: int, *, prefix: str = "biasshift",
                histograms: bool = True, sync: bool | None = None) -> dict[str, float]:
    """Write the monitor's per-module scalars (and, when it keeps histograms and
    ``histograms``, one histogram per module) at ``step``; returns the scalars."""
    scalars = monitor_scalars(monitor.stats(sync=sync), prefix)
    raw = monitor_histograms(monitor, sync=sync) \
        if histograms and monitor.histogram is not None else {}
    if writer is not None:
        _scalars(writer, scalars, step)
        for module, kw in raw.items():
            writer.add_histogram_raw(f"{prefix}/{module}/activations", global_step=step, **kw)
    return scalars


def log_probe_statistics(writer: Any, stats: Any, step: int, *,
                         prefix: str = "biasshift") -> dict[str, float]:
    """Write a :class:`~biasshift.ProbeStatistics`' per-module medians at ``step``."""
    scalars = probe_scalars(stats, prefix)
    if writer is not None:
        _scalars(writer, scalars, step)
        for module, mean in stats.mean.items():
            writer.add_histogram(f"{prefix}/{module}/probe_unit_means",
                                 mean.detach().double().cpu().numpy(), global_step=step)
    return scalars


def log_measurement(writer: Any, measurement: Any, step: int, *,
                    prefix: str = "biasshift") -> dict[str, float]:
    """Write a BiasShiftProbe measurement's per-layer medians (cosines, ``k``, bias shifts)
    and a histogram over units of each cosine at ``step``."""
    scalars = measurement_scalars(measurement, prefix)
    if writer is not None:
        _scalars(writer, scalars, step)
        values = measurement.host().numpy()
        index = {q: i for i, q in enumerate(measurement.quantities)}
        start = 0
        for layer, units in zip(measurement.layers, measurement.units):
            for q in COSINES[:2]:
                v = values[index[q], start:start + units]
                v = v[np.isfinite(v)]
                if v.size:
                    writer.add_histogram(f"{prefix}/{layer}/{q}_units", v, global_step=step)
            start += units
    return scalars
