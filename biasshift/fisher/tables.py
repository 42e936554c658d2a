"""Tidy tables of per-unit quantities, and the one batched host transfer behind them.

Every result of the unit-Fisher tools is computed as tensors on the model's device first
(:meth:`biasshift.UnitFisher.quantities`, :class:`biasshift.BiasShiftProbe`'s ``m.tensors``);
this module owns their conversion: :func:`to_host` moves any number of per-unit columns to the
host in **one** transfer (stacked as float64), :func:`wide_frame` and :func:`long_frame` are the
two table schemas (one row per unit with a column per quantity, as ``UnitFisher.report``; or
``layer, unit, quantity, value``, as ``Measurement.frame``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["LONG_COLUMNS", "long_frame", "to_host", "wide_frame"]

LONG_COLUMNS = ("layer", "unit", "quantity", "value")


def to_host(columns: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """``{name: (n,) tensor}`` (all of one length, on one device) as float64 numpy arrays, moved
    to the host in one transfer."""
    if not columns:
        return {}
    names = list(columns)
    lengths = {tuple(columns[k].shape) for k in names}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"to_host: the columns must be 1-d tensors of one length, got shapes "
                         f"{ {k: tuple(columns[k].shape) for k in names} }")
    stacked = torch.stack([columns[k].detach().to(torch.float64) for k in names])
    host = stacked.cpu().numpy()
    return {k: host[i] for i, k in enumerate(names)}


def wide_frame(parts: Sequence[Mapping[str, Any]], host: Mapping[str, np.ndarray],
               order: Sequence[str]) -> pd.DataFrame:
    """One row per unit: ``parts`` give each layer's scalar columns (``layer``, ``units`` and
    any constants), ``host`` the per-unit columns of all layers concatenated (from
    :func:`to_host`), ``order`` the column order."""
    frames = []
    start = 0
    for part in parts:
        u = int(part["units"])
        cols: dict[str, Any] = {}
        for k in order:
            if k == "unit":
                cols[k] = range(u)
            elif k in host:
                cols[k] = host[k][start:start + u]
            else:
                cols[k] = part[k]
        frames.append(pd.DataFrame(cols))
        start += u
    return pd.concat(frames, ignore_index=True)


def long_frame(layers: Sequence[str], units: Sequence[int], quantities: Sequence[str],
               values: np.ndarray) -> pd.DataFrame:
    """``layer, unit, quantity, value`` from a ``(quantities, units of all layers)`` array."""
    Q, U = values.shape
    layer_of = np.repeat(np.asarray(list(layers), dtype=object), list(units))
    unit_of = np.concatenate([np.arange(u) for u in units]) if U else np.zeros(0, np.int64)
    return pd.DataFrame({
        "layer": np.tile(layer_of, Q),
        "unit": np.tile(unit_of, Q),
        "quantity": np.repeat(np.asarray(list(quantities), dtype=object), U),
        "value": values.reshape(-1),
    })
