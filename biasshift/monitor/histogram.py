"""Fixed-bin per-unit activation histograms (the "colorful dimension" view of a layer).

A :class:`HistogramSpec` ``(bins, range=(lo, hi))`` splits ``[lo, hi)`` into ``bins`` equal bins
and adds an underflow bin ``(-inf, lo)`` and an overflow bin ``[hi, inf)``; choose ``lo < 0`` to
see the negative part of ELU/LReLU/SReLU units (the paper's point: units with negative values
push the mean activation towards zero). Non-finite activations are not binned; they are counted
in the statistics' ``nonfinite`` column, so a unit's underflow + bins + overflow add up to its
``count`` of finite samples.

Bin assignment
    A finite value ``x`` goes to bin ``k = floor((x - lo) * (bins / (hi - lo)))`` (``k < 0``:
    underflow, ``k >= bins``: overflow); bin ``k`` is reported with edges
    ``lo + k * (hi - lo) / bins`` and ``lo + (k + 1) * (hi - lo) / bins``. When the scale
    ``s = bins / (hi - lo)`` is a power of two ``>= 1`` and ``lo · s`` an integer
    (:attr:`HistogramSpec.dyadic_integer`; e.g. ``range=(-2, 6), bins=64``: ``s = 8``) it is
    evaluated as ``floor(clamp(x, lo − 1/s, hi) · s) − lo · s``, which is exact (a product by a
    power of two), in float32 for float32, half and bfloat16 activations and in float64 for
    float64 ones: bins are exactly the half-open ``[left, right)``, values equal to an edge
    included, tiny values (``-1e-30`` lies in ``[-1/s, 0)``) too. For other ranges it is
    evaluated as written, in float64, and a value within one float64 rounding of an edge may
    fall into the neighbouring bin (``x - lo`` rounds when ``|x|`` is far below ``|lo|``).
    Counts are exact integers (int64), accumulated with one ``bincount`` / ``index_add_`` on
    ``unit * (bins + 3) + slot`` (int16 indices on the CPU below ``2**15`` slots, else int32;
    formed in float32 where they are below ``2**24``) per batch: no Python loop over units and
    no host synchronisation.
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

__all__ = ["HistogramSpec", "accumulate_histogram", "histogram_frame", "index_dtype"]

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
    def dyadic_integer(self) -> tuple[float, float] | None:
        """``(scale, lo · scale)`` when the bins admit exact float32 arithmetic: ``scale`` a
        power of two ``>= 1`` and ``lo · scale`` an integer below ``2**24`` in magnitude (e.g.
        ``range=(-2, 6), bins=64``: 8 and -16); else ``None``. Then every edge is a float32
        number and ``floor(x · scale) − lo · scale`` is the bin of a float32 ``x`` exactly."""
        scale = self.scale
        m, e = math.frexp(scale)
        L = self.range[0] * scale
        if m != 0.5 or e < 1 or L != math.floor(L) or abs(L) + self.bins + 2 >= 2**24:
            return None
        return scale, L

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
    index: Tensor | None = None, slots: Tensor | None = None, *, finite: bool = False,
) -> None:
    """Add the per-unit bin counts of ``x`` to ``counts`` (``(units, spec.slots)``, int64) in place.

    ``x`` holds samples along every dim except ``unit_dim``; ``work`` (float64) and, optional,
    ``slots`` (float32) and ``index`` (:func:`index_dtype`) are scratch tensors with the shape of
    ``x``. Nothing waits for the device. The bin index is computed as documented (module
    docstring): for bins with :attr:`HistogramSpec.dyadic_integer` and float32, half or
    bfloat16 activations in seven float32 passes (:func:`_float32_slots`, ``work`` unused);
    otherwise in float64, then, once it is a small integer, moved to float32 (exact below
    ``2**24``). It is offset by the unit and counted by one ``bincount`` (CPU) or
    ``index_add_`` (other devices) over the narrowest integer indices (:func:`index_dtype`).
    ``finite=True`` promises that every value of ``x`` is finite (a finite-first reduction of
    the same batch found it out): the two passes that route non-finite values to their slot
    are skipped, the counts are the same.
    """
    units = x.shape[unit_dim]
    lo, _ = spec.range
    total = units * spec.slots
    shape = [1] * x.ndim
    shape[unit_dim] = units
    dyadic = spec.dyadic_integer
    if dyadic is not None and x.dtype in _FLOAT32_EXACT and total < 2**24:
        _float32_slots(counts, x, spec, dyadic, shape, total, slots, index, finite)
        return
    work.copy_(x)
    if not finite:  # non-finite values become NaN (so that +-inf are not clamped)
        work.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)
    if dyadic is not None:  # floor(x s) − L, exact (see _float32_slots), in float64
        scale, L = dyadic
        work.clamp_(lo - 1.0 / scale, spec.range[1]).mul_(scale).floor_().sub_(L)
    else:  # t = (x - lo) * (bins / (hi - lo)) in float64, within a rounding of an edge
        work.sub_(lo).mul_(spec.scale)
        work.clamp_(-1.0, float(spec.bins)).floor_()
    narrow = torch.float32 if total < 2**24 else torch.float64  # exact small integers
    if slots is None or slots.dtype != narrow:
        slots = torch.empty_like(work, dtype=narrow)
    slots.copy_(work)
    _count_slots(counts, slots, 1.0, spec, shape, total, index, finite)


def _count_slots(counts: Tensor, slots: Tensor, first: float, spec: HistogramSpec,
                 shape: list[int], total: int, index: Tensor | None, finite: bool) -> None:
    """Count ``slots``, which holds ``slot − first`` per value (``slot`` in ``[0, bins + 1]``;
    NaN for a non-finite value, whose slot is ``bins + 2``), offset by ``unit · spec.slots``."""
    if not finite:
        slots.nan_to_num_(nan=float(spec.bins + 2) - first)
    units = counts.shape[0]
    offsets = torch.arange(units, device=slots.device, dtype=slots.dtype).mul_(spec.slots)
    slots.add_(offsets.add_(first).view(shape))
    idx_dtype = index_dtype(total, slots.device)
    if index is None or index.dtype != idx_dtype:
        index = torch.empty_like(slots, dtype=idx_dtype)
    index.copy_(slots)  # exact: non-negative integers below 2**24 (float32) or 2**53
    _count(counts, index.reshape(-1))


#: activation dtypes whose values float32 holds exactly (the fast path's input)
_FLOAT32_EXACT = (torch.float32, torch.float16, torch.bfloat16)


def _float32_slots(counts: Tensor, x: Tensor, spec: HistogramSpec,
                   dyadic: tuple[float, float], shape: list[int], total: int,
                   slots: Tensor | None, index: Tensor | None, finite: bool = False) -> None:
    """:func:`accumulate_histogram` for dyadic bins (:attr:`HistogramSpec.dyadic_integer`) in
    float32, bit for bit the float64 path's counts: with ``s = 2**e``, ``L = lo · s``::

        x' = clamp(x, lo − 1/s, hi)       (NaN for non-finite x first; exact comparisons)
        k  = floor(x' · s) − L            (x' · s exact: a power of two, no overflow)

    so ``k = floor((x − lo) s)`` clamped to ``[−1, bins]``, as the float64 path computes it.
    Seven float32 passes where the float64 path has six float64 and four float32 ones; five
    for ``finite`` float32 data."""
    scale, L = dyadic
    lo, hi = spec.range
    if slots is None or slots.dtype != torch.float32:
        slots = torch.empty_like(x, dtype=torch.float32)
    if finite:  # one pass from x (half, bfloat16: exact in float32)
        torch.clamp(x.float() if x.dtype != torch.float32 else x, lo - 1.0 / scale, hi,
                    out=slots)
    else:
        # non-finite values become NaN (so that +-inf are not clamped into the outer bins)
        if x.dtype == torch.float32:
            torch.nan_to_num(x, nan=math.nan, posinf=math.nan, neginf=math.nan, out=slots)
        else:
            slots.copy_(x).nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)
        slots.clamp_(lo - 1.0 / scale, hi)
    # floor(x' s) = slot − 1 + L: counted with first = 1 − L
    _count_slots(counts, slots.mul_(scale).floor_(), 1.0 - L, spec, shape, total, index,
                 finite)


def index_dtype(total: int, device: torch.device) -> torch.dtype:
    """The narrowest integer dtype that holds slot indices ``[0, total)`` and the counting
    kernel takes: int16 for ``bincount`` on the CPU (below ``2**15`` slots: measured per
    ``2**18`` indices 92 us against 110 us for int32, and 16 us against 21 us for the
    float32 -> integer conversion), else int32 (``index_add_`` takes int32 and int64
    only), int64 from ``2**31`` slots."""
    if total < 2**15 and torch.device(device).type == "cpu":
        return torch.int16
    return torch.int32 if total < 2**31 else torch.int64


def _count(counts: Tensor, index: Tensor) -> None:
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
