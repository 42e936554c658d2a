"""Fixed-bin per-unit activation histograms (the "colorful dimension" view of a layer).

A :class:`HistogramSpec` ``(bins, range=(lo, hi))`` splits ``[lo, hi)`` into ``bins`` equal bins
and adds an underflow bin ``(-inf, lo)`` and an overflow bin ``[hi, inf)``; choose ``lo < 0`` to
see the negative part of ELU/LReLU/SReLU units (the paper's point: units with negative values
push the mean activation towards zero). Non-finite activations are not binned; they are counted
in the statistics' ``nonfinite`` column, so a unit's underflow + bins + overflow add up to its
``count`` of finite samples.

Bin assignment
    A finite value ``x`` goes to bin ``k = floor((x - lo) * (bins / (hi - lo)))`` evaluated in
    float64 (``k < 0``: underflow, ``k >= bins``: overflow); bin ``k`` is reported with edges
    ``lo + k * (hi - lo) / bins`` and ``lo + (k + 1) * (hi - lo) / bins``. When ``(hi - lo) /
    bins`` and ``lo`` are dyadic (e.g. ``range=(-2, 6), bins=64``: width 1/8) every step is exact
    and bins are exactly the half-open ``[left, right)``, values equal to an edge included; for
    other ranges a value within one float64 rounding of an edge may fall into the neighbouring
    bin. Counts are exact integers (int64), accumulated with one ``bincount`` / ``index_add_`` on
    ``unit * (bins + 3) + slot`` (int32 indices, formed in float32 where they are below
    ``2**24``) per batch: no Python loop over units and no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["HistogramSpec", "accumulate_histogram", "histogram_frame"]

# Per unit the counts tensor has bins + 3 slots: underflow, the bins, overflow, and a last slot
# that collects non-finite values (it is dropped from every report; it equals ``nonfinite``).
_EXTRA_SLOTS = 3


@dataclass(frozen=True)
class HistogramSpec:
    """Fixed bins for per-unit histograms: ``bins`` equal bins over ``range = (lo, hi)``."""

    bins: int = 64
    range: tuple[float, float] = (-2.0, 6.0)

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 1:
            raise ValueError(f"histogram bins must be a positive int, got {self.bins!r}")
        try:
            lo, hi = (float(v) for v in self.range)
        except (TypeError, ValueError):
            raise ValueError(
                f"histogram range must be a pair (lo, hi) of numbers, got {self.range!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"histogram range must be finite with lo < hi, got {self.range!r}")
        object.__setattr__(self, "range", (lo, hi))

    @classmethod
    def coerce(cls, spec: HistogramSpec | Mapping[str, Any] | bool | None) -> HistogramSpec | None:
        """``None``/``False``: no histograms; ``True``: the defaults; a mapping: its fields."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, HistogramSpec):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"bins", "range"}
            if unknown:
                raise TypeError(
                    f"histogram accepts the keys 'bins' and 'range', got unknown {sorted(unknown)}"
                )
            return cls(**spec)
        raise TypeError(
            "histogram must be None, True, a HistogramSpec or a dict(bins=..., range=(lo, hi)), "
            f"got {type(spec).__name__}"
        )

    @property
    def slots(self) -> int:
        """Counts kept per unit: underflow, ``bins`` bins, overflow and non-finite."""
        return self.bins + _EXTRA_SLOTS

    @property
    def scale(self) -> float:
        """``bins / (hi - lo)``: multiply ``x - lo`` by it to get the fractional bin index."""
        lo, hi = self.range
        return self.bins / (hi - lo)

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges ``lo + k (hi - lo) / bins`` in float64 (last one ``hi``)."""
        lo, hi = self.range
        e = lo + np.arange(self.bins + 1, dtype=np.float64) * ((hi - lo) / self.bins)
        e[-1] = hi
        return e

    def to_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "range": list(self.range)}


def accumulate_histogram(
    counts: Tensor, x: Tensor, unit_dim: int, spec: HistogramSpec, work: Tensor,
    index: Tensor | None = None, slots: Tensor | None = None,
) -> None:
    """Add the per-unit bin counts of ``x`` to ``counts`` (``(units, spec.slots)``, int64) in place.

    ``x`` holds samples along every dim except ``unit_dim``; ``work`` (float64) and, optional,
    ``slots`` (float32) and ``index`` (int32, or int64) are scratch tensors with the shape of
    ``x``. Nothing waits for the device. The bin index is computed in float64 as documented;
    once it is a small integer it is moved to float32 (exact below ``2**24``), offset by the
    unit and counted by one ``bincount`` (CPU) or ``index_add_`` (other devices) over int32
    indices: six float64 passes instead of nine, and no float64 -> int64 conversion (which
    cost as much as three float64 passes).
    """
    units = x.shape[unit_dim]
    lo, _ = spec.range
    total = units * spec.slots
    shape = [1] * x.ndim
    shape[unit_dim] = units
    # t = (x - lo) * (bins / (hi - lo)) in float64
    work.copy_(x)
    work.sub_(lo).mul_(spec.scale)
    # non-finite values become NaN (so that +-inf are not clamped into the outer bins)
    work.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)
    work.clamp_(-1.0, float(spec.bins)).floor_()
    narrow = torch.float32 if total < 2**24 else torch.float64  # exact small integers
    idx_dtype = torch.int32 if total < 2**31 else torch.int64
    if slots is None or slots.dtype != narrow:
        slots = torch.empty_like(work, dtype=narrow)
    slots.copy_(work)
    # slot = floor(t) + 1 in [0, bins + 1], non-finite bins + 2; plus unit * slots
    slots.nan_to_num_(nan=float(spec.bins + 1))
    offsets = torch.arange(units, device=x.device, dtype=narrow).mul_(spec.slots).add_(1.0)
    slots.add_(offsets.view(shape))
    if index is None or index.dtype != idx_dtype:
        index = torch.empty_like(slots, dtype=idx_dtype)
    index.copy_(slots)  # exact: non-negative integers
    index = index.reshape(-1)
    flat = counts.view(-1)
    if index.device.type == "cpu":
        flat.add_(torch.bincount(index, minlength=flat.numel()))
    else:
        flat.index_add_(0, index, torch.ones((), dtype=torch.int64, device=index.device)
                        .expand(index.numel()))


def histogram_frame(
    counts: Mapping[str, np.ndarray], spec: HistogramSpec, *, aggregate: bool = False
) -> pd.DataFrame:
    """Tidy table of per-module histograms from ``{module: (units, slots) int64 array}``.

    Columns: ``module, unit, bin, bin_left, bin_right, count`` (``unit`` dropped when
    ``aggregate``, which sums over units). ``bin`` is ``-1`` for the underflow bin
    ``(-inf, lo)``, ``0 .. bins-1`` for the regular bins and ``bins`` for the overflow bin
    ``[hi, inf)``.
    """
    edges = spec.edges()
    left = np.concatenate([[-np.inf], edges])
    right = np.concatenate([edges, [np.inf]])
    bin_ids = np.arange(-1, spec.bins + 1)
    nb = spec.bins + 2
    frames = []
    for name, c in counts.items():
        c = np.asarray(c)[:, :nb]
        if aggregate:
            frames.append(pd.DataFrame({
                "module": name, "bin": bin_ids, "bin_left": left, "bin_right": right,
                "count": c.sum(axis=0),
            }))
        else:
            units = c.shape[0]
            frames.append(pd.DataFrame({
                "module": name,
                "unit": np.repeat(np.arange(units), nb),
                "bin": np.tile(bin_ids, units),
                "bin_left": np.tile(left, units),
                "bin_right": np.tile(right, units),
                "count": c.reshape(-1),
            }))
    cols = ["module", *([] if aggregate else ["unit"]), "bin", "bin_left", "bin_right", "count"]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_HIST_DTYPES[c]) for c in cols})
    return pd.concat(frames, ignore_index=True)[cols]


_HIST_DTYPES = {"module": object, "unit": "int64", "bin": "int64", "bin_left": "float64",
                "bin_right": "float64", "count": "int64"}
