"""Per-unit running statistics of a stream of activations, vectorised over units.

:class:`RunningStats` accumulates, for each of ``units`` units, the number of finite samples, their
mean, the sum of squared deviations ``M2`` (population variance ``M2 / count``), min, max, the
numbers of negative and of zero samples and the number of non-finite samples, over any number of
batches. It follows baukit's ``runningstats`` design: everything lives on the data's device, is
updated without host synchronisation and has a ``state_dict``.

How a batch is reduced
    A batch ``x`` holds samples along every dim except ``unit_dim``. It is reduced per unit in the
    *compute dtype* (float32 for half, bfloat16 and float32 data; float64 for float64 data or on
    request) around a per-unit shift ``c``: the running mean, or for units with no data yet the
    batch's midrange ``(min + max) / 2``::

        d = x - c  (non-finite x -> 0),  s1 = Σ d,  s2 = Σ d²,
        n = #finite,  mean_b = c + s1 / n,  M2_b = s2 - s1² / n            (in float64)

    Shifting by a value close to the mean removes the cancellation of the textbook one-pass
    formula, so activations with a large common offset (``1e4 + N(0, 1)``) keep their variance
    (relative error ~1e-7 in float32, ~1e-15 in float64). The batch summary is merged into the
    running state with Chan, Golub & LeVeque's parallel update (float64)::

        n = n_a + n_b,  δ = mean_b - mean_a,  mean = mean_a + δ n_b / n,
        M2 = M2_a + M2_b + δ² n_a n_b / n.

    Non-finite values are masked arithmetically, never by branching: with ``x_lo`` (``x_hi``)
    the batch with its non-finite values replaced by ``+inf`` (``-inf``) and ``P, N, Z, B`` the
    numbers of positive, negative, zero and non-finite samples, ``min = min x_lo``,
    ``max = max x_hi``, ``Σ sign x_lo = P - N + B``, ``Σ |sign x_lo| = P + N + B`` and
    ``Σ sign x_hi = P - N - B`` give every count; non-finite values contribute nothing to the
    moments, extremes or sign counts. These sums of small integers are exact in float32 for up
    to ``2**24`` samples per unit and reduction (longer batches are split); running counts are
    kept in float64, exact up to ``2**53`` samples per unit. A reduction is about 15 elementwise
    passes (``nan_to_num``, ``sign_``, ``sub``, ``mul_`` into a reused work tensor, and
    ``sum``/``amin``/``amax`` over the sample dims), run in tiles of ``2**18`` elements that stay
    in the CPU's cache; tiles are combined with the multi-way form of the same merge.

    The default (``fused=True``) runs these kernels and writes every tile's sums in place
    into one ``(tiles, 8, units)`` tensor, with the shift's candidates computed once per batch;
    ``fused=False`` keeps the original tiled implementation as the reference. Both give the
    same state bit for bit, with or without non-finite values (a hypothesis test checks it).
    The masking costs no separate pass to skip: the ``±inf`` fills feed the extremes and the
    sign counts, and ``nan_to_num_`` on the shifted values is one in-cache pass. (Without a
    host read, a device-side "all finite" flag can only select between results that were
    both computed, so it cannot save work in eager mode.)

    *Finite first* (``finite_first``; default: on for CPU tensors, see
    :data:`FINITE_FIRST_DEVICES`): each tile is first reduced as if it held finite values only,
    in 10 passes instead of 15 (``amin``/``amax``/``sign`` straight on the data, no fills, no
    masking, and ``Σ sign x_hi = Σ sign x_lo``). One non-finite value makes its tile's ``s1`` or
    ``s2`` non-finite (``x - c`` is ±inf or NaN and a sum propagates it), so one read of the
    tiles' ``s1 + s2`` per reduction finds the tiles to redo with the masked kernels above. On
    finite data every kernel reads the values the masked ones would (``nan_to_num`` is then the
    identity), so the state is the same bit for bit either way; a tile whose finite sums
    overflow is redone too, and gets the masked kernels' result. The read is of a CPU tensor:
    on the CPU the data already live on the host and nothing waits for a device. On other
    devices it would be a synchronisation, so there the masked kernels run unconditionally.

Staging (``buffer_rows``)
    With ``buffer_rows > 0`` a batch is only *copied* (one kernel) into a per-accumulator buffer
    in the compute dtype (batches of at least :data:`DIRECT_ELEMENTS` elements are reduced at
    once: staging them would only add a copy): ``(buffer_rows, units)`` when the batch's unit
    dim is its innermost one
    (Linear and sequence outputs, channels-last convs: the copy is a memcpy), else
    ``(units, buffer_rows)`` (NCHW conv outputs). The buffer is reduced and merged when the next
    batch does not fit. This amortises the ~40 small kernels of a reduction over many training
    steps. Results depend only on the stream of batches (and the configuration), never on when
    :meth:`stats` is called: reading statistics merges the pending rows into a *copy* of the
    state. :meth:`state_dict` carries the pending rows, so a resumed run reproduces an
    uninterrupted one bit for bit.

The state is one ``(9, units)`` float64 tensor with the rows of :data:`STATE_ROWS`. Each unit's
mean is kept as an anchor ``ref`` (the shift of its first batch) plus ``dmean``, the mean's
deviation from it, and every merge works on deviations: a float64 mean of ``1e6`` would otherwise
round to 1e-10 and cost the variance of data like ``1e6 + 1e-3 N(0, 1)`` its last seven digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from biasshift._torch import Workspace
from biasshift.monitor.histogram import HistogramSpec, accumulate_histogram, index_dtype

__all__ = [
    "DIRECT_ELEMENTS",
    "FINITE_FIRST_DEVICES",
    "STATE_ROWS",
    "STAT_COLUMNS",
    "RunningStats",
    "ScratchPool",
    "merge_states",
    "state_to_stats",
    "summarize",
]

#: Rows of a state tensor ``(9, units)``, float64; the mean is ``ref + dmean``.
STATE_ROWS = ("count", "dmean", "m2", "min", "max", "negative", "zero", "nonfinite", "ref")
#: Statistics reported per unit by :meth:`RunningStats.stats` (and ``ActivationMonitor.stats``).
STAT_COLUMNS = (
    "count", "mean", "var", "std", "min", "max", "frac_negative", "frac_zero", "nonfinite",
)

_COUNT, _DMEAN, _M2, _MIN, _MAX, _NEG, _ZERO, _BAD, _REF = range(9)
_INF = math.inf
# Per-batch counts are float sums of 0/±1 values: exact while a unit has at most this many
# samples in one reduction (float32 mantissa). Batches with more samples per unit are split.
_MAX_EXACT_ROWS = {torch.float32: 2**24, torch.float64: 2**53}
# Elements per tile of a reduction: the tile and its work tensor stay in the CPU's cache.
_TILE_ELEMENTS = 2**18
#: Batches with at least this many elements are reduced at once instead of being staged.
DIRECT_ELEMENTS = 2**18
#: Device types on which reductions run finite first by default (``finite_first=None``): those
#: whose tensors the host can read without waiting for a device.
FINITE_FIRST_DEVICES = frozenset({"cpu"})
#: ``amin``/``amax`` over the rows of a units-last tile whose rows are not a multiple of
#: :data:`_FAST_ROW_BYTES` run on rows regrouped to at least this many columns (see
#: :func:`_extreme_into`)
_EXTREME_WIDTH = 1024
#: row widths (bytes) that torch's CPU ``amin``/``amax`` over the outer dim take on its
#: vectorised path: measured (torch 2.13, one thread) fast at multiples of 128 bytes and slow
#: otherwise; 256 also covers kernels with twice the vector width
_FAST_ROW_BYTES = 256


def empty_state(units: int, device: torch.device | str | None = None) -> Tensor:
    """The state of no samples: zero counts and moments, ``min = +inf``, ``max = -inf``."""
    st = torch.zeros(len(STATE_ROWS), units, dtype=torch.float64, device=device)
    st[_MIN] = _INF
    st[_MAX] = -_INF
    return st


def merge_states(a: Tensor, b: Tensor) -> Tensor:
    """Chan et al.'s parallel merge of two ``(9, units)`` states; returns a new state.

    Means are kept as ``ref + dmean`` with a per-unit anchor ``ref``, so that merging works on
    deviations that are small compared with a large common offset. Exact for the counts, min
    and max; merging an empty state leaves the other unchanged bit for bit.
    """
    out = a.clone()
    _merge_state_(out, b)
    return out


def _merge_state_(a: Tensor, b: Tensor) -> None:
    """:func:`merge_states` in place (into ``a``)."""
    na, nb = a[_COUNT], b[_COUNT]
    n = na + nb
    ref = torch.where(na > 0, a[_REF], b[_REF])
    delta = (b[_DMEAN] + (b[_REF] - ref)) - a[_DMEAN]  # b's mean - a's mean
    w = nb / n.clamp(min=1.0)
    a[_M2] += b[_M2] + delta * (delta * w * na)
    a[_DMEAN] += delta * w
    a[_REF] = ref
    a[_COUNT] = n
    torch.minimum(a[_MIN], b[_MIN], out=a[_MIN])
    torch.maximum(a[_MAX], b[_MAX], out=a[_MAX])
    a[_NEG:_REF] += b[_NEG:_REF]


def state_to_stats(state: Tensor) -> dict[str, Tensor]:
    """Per-unit statistics from a state: ``STAT_COLUMNS`` -> tensors (on the state's device).

    ``var`` is the population variance ``M2 / count`` and ``std`` its square root. Units without
    finite samples get NaN moments and extremes; ``count`` and ``nonfinite`` are int64.
    """
    n = state[_COUNT]
    empty = n == 0
    nan = torch.full_like(n, math.nan)
    var = state[_M2] / n
    return {
        "count": n.to(torch.int64),
        "mean": torch.where(empty, nan, state[_REF] + state[_DMEAN]),
        "var": var,
        "std": var.sqrt(),
        "min": torch.where(empty, nan, state[_MIN]),
        "max": torch.where(empty, nan, state[_MAX]),
        "frac_negative": state[_NEG] / n,
        "frac_zero": state[_ZERO] / n,
        "nonfinite": state[_BAD].to(torch.int64),
    }


class ScratchPool(Workspace):
    """Reusable work tensors (a :class:`~biasshift._torch.Workspace`), with the layouts the
    reductions need.

    Reductions write their elementwise intermediates into these instead of allocating fresh
    tensors: on the CPU, allocating (and page-faulting) a large tensor per kernel costs more than
    the kernel itself. A pool is used from one thread and one CUDA stream at a time.
    """

    def _get(self, slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.flat(slot, numel, dtype, device)

    def like(self, slot: str, x: Tensor, dtype: torch.dtype) -> Tensor:
        """A tensor with ``x``'s shape in ``dtype``; with ``x``'s memory layout when ``x`` is a
        permutation of a contiguous tensor (e.g. channels-last), else contiguous."""
        flat = self._get(slot, x.numel(), dtype, x.device)
        if x.is_contiguous():
            return flat.view(x.shape)
        perm = _layout_perm(x)
        if not x.permute(perm).is_contiguous():
            return flat.view(x.shape)
        permuted = flat.view([x.shape[p] for p in perm])
        return permuted.permute([perm.index(i) for i in range(x.ndim)])

    def stacked(self, slot: str, x: Tensor, dtype: torch.dtype, k: int) -> Tensor:
        """``k`` tensors like :meth:`like` in one allocation: ``(k, *x.shape)``, each slot with
        ``x``'s memory layout, so that one kernel can work on several slots at once."""
        flat = self._get(slot, k * x.numel(), dtype, x.device)
        perm = list(range(x.ndim))
        if not x.is_contiguous():
            p = _layout_perm(x)
            if x.permute(p).is_contiguous():
                perm = p
        v = flat.view([k] + [x.shape[p] for p in perm])
        return v.permute([0] + [perm.index(i) + 1 for i in range(x.ndim)])

    def rows(self, slot: str, n: int, units: int, dtype: torch.dtype,
             device: torch.device) -> Tensor:
        return self._get(slot, n * units, dtype, device).view(n, units)


def _normalize_device(device: torch.device | str | None) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so that comparisons with a tensor's device work."""
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        return torch.empty(0, device=device).device
    return device


def _layout_perm(x: Tensor) -> list[int]:
    # dims ordered from outermost to innermost in memory
    return sorted(range(x.ndim), key=lambda i: (-x.stride(i), -x.shape[i]))


def summarize(
    x: Tensor,
    unit_dim: int,
    shift: Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    scratch: ScratchPool | None = None,
    fused: bool = True,
    finite_first: bool | None = None,
) -> Tensor:
    """The ``(9, units)`` float64 state of one batch ``x`` (units along ``unit_dim``).

    Args:
        x: floating-point activations; every dim except ``unit_dim`` indexes samples.
        unit_dim: the units' dim (non-negative or negative).
        shift: per-unit values close to the units' means (``(units,)``); default: the midrange
            ``(min + max) / 2`` of each unit's finite values in ``x``. Only the accuracy
            depends on it.
        compute_dtype: float32 or float64, the dtype of the elementwise work and batch sums.
        scratch: work tensors to reuse (default: a fresh pool).
        fused: the fused reduction (default) or the tiled reference (``False``); both give
            the same state bit for bit.
        finite_first: with ``fused``, reduce each tile assuming finite values and redo only
            the tiles that had non-finite ones (one host read of a small tensor per call);
            ``None`` (default): on when ``x``'s device type is in
            :data:`FINITE_FIRST_DEVICES` (the CPU). The same state bit for bit either way.

    Without ``finite_first`` runs a fixed sequence of kernels (no host synchronisation, no
    branching on values).
    """
    if compute_dtype not in _MAX_EXACT_ROWS:
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got "
                         f"{compute_dtype}")
    if not x.is_floating_point():
        raise TypeError(f"activations must be floating point, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("activations must have a unit dimension, got a 0-dim tensor")
    state = empty_state(x.shape[unit_dim], x.device)
    _reduce_into(state, x, unit_dim % x.ndim, compute_dtype,
                 scratch if scratch is not None else ScratchPool(), shift=shift, fused=fused,
                 finite_first=finite_first)
    return state


def _reduce_into(state: Tensor, x: Tensor, unit_dim: int, cd: torch.dtype,
                 scratch: ScratchPool, *, shift: Tensor | None = None,
                 fused: bool = True, finite_first: bool | None = None) -> bool | None:
    """Merge batch ``x`` into ``state`` in place; returns whether every value of ``x`` was
    finite when a finite-first reduction found it out (its one host read), else ``None``.

    ``x`` is reduced in tiles of about :data:`_TILE_ELEMENTS` elements along its first sample
    dim, so that the ~15 elementwise passes of each tile run on cached data; each tile has its
    own shift and the tiles are combined by one vectorised multi-way Chan merge. A tile never
    holds more than ``2**24`` samples per unit in float32, so that the counts stay exact (one
    sample slice larger than that is reduced in float64).
    """
    units = x.shape[unit_dim]
    rows = x.numel() // units if units else 0
    if rows == 0:
        return None
    split = 1 if unit_dim == 0 else 0  # the first sample dim
    n_split = x.shape[split]
    per_slice = rows // n_split
    if per_slice > _MAX_EXACT_ROWS[cd]:
        cd = torch.float64
    step = max(1, min(_MAX_EXACT_ROWS[cd] // per_slice, _TILE_ELEMENTS // (per_slice * units)))
    if fused:
        if finite_first is None:
            finite_first = x.device.type in FINITE_FIRST_DEVICES
        return _reduce_fused(state, x, unit_dim, cd, scratch, shift, split, step, rows,
                             bool(finite_first))
    if step >= n_split:
        _merge_state_(state, _tile_state(_batch_sums(x, unit_dim, cd, scratch, state, shift),
                                         float(rows)))
        return None
    sums = [_batch_sums(x.narrow(split, start, min(step, n_split - start)), unit_dim, cd,
                        scratch, state, shift) for start in range(0, n_split, step)]
    tile_rows = torch.full((len(sums), 1), float(step * per_slice), dtype=torch.float64,
                           device=x.device)
    tile_rows[-1] = float(rows - step * per_slice * (len(sums) - 1))
    _merge_state_(state, _combine_tiles(_tile_state(torch.stack(sums), tile_rows)))
    return None


def _reduce_fused(state: Tensor, x: Tensor, unit_dim: int, cd: torch.dtype,
                  scratch: ScratchPool, shift: Tensor | None, split: int, step: int,
                  rows: int, finite_first: bool = False) -> bool | None:
    """:func:`_reduce_into` with the tiles' sums written by fewer, larger kernels (see
    :func:`_tile_sums_fused`) straight into one ``(tiles, 8, units)`` tensor: the same numbers,
    bit for bit, as the per-tile :func:`_batch_sums` of the reference path. ``finite_first``:
    first the finite kernels for every tile, then the masked kernels for the tiles whose
    moment sums came out non-finite (one host read)."""
    units = x.shape[unit_dim]
    n_split = x.shape[split]
    n_tiles = -(-n_split // step)
    sums = scratch.rows("tile_sums", n_tiles * 8, units, cd, x.device).view(n_tiles, 8, units)
    if shift is None:
        has_prior = state[_COUNT] > 0
        prior_mean = (state[_REF] + state[_DMEAN]).to(cd)
    else:
        has_prior = prior_mean = None
        shift = torch.nan_to_num(shift.to(cd), 0.0, 0.0, 0.0)  # never the caller's tensor
    def tile(t: int, finite: bool) -> None:
        part = x if n_tiles == 1 else x.narrow(split, t * step, min(step, n_split - t * step))
        _tile_sums_fused(part, unit_dim, cd, scratch, sums[t], has_prior, prior_mean, shift,
                         finite=finite)

    for t in range(n_tiles):
        tile(t, finite_first)
    all_finite = None
    if finite_first:
        # s1 + s2 of a tile is finite iff its values were (or an overflow: redone as well);
        # a read of CPU memory (finite_first is the default only where that waits for nothing)
        all_finite = True
        for t, ok in enumerate(torch.isfinite(sums[:, :2].sum((1, 2))).tolist()):
            if not ok:
                all_finite = False
                tile(t, False)
    sums64 = sums.to(torch.float64)
    if n_tiles == 1:
        _merge_state_(state, _tile_state(sums64[0], float(rows)))
        return all_finite
    per_slice = rows // n_split
    tile_rows = torch.full((n_tiles, 1), float(step * per_slice), dtype=torch.float64,
                           device=x.device)
    tile_rows[-1] = float(rows - step * per_slice * (n_tiles - 1))
    _merge_state_(state, _combine_tiles(_tile_state(sums64, tile_rows)))
    return all_finite


def _extreme_into(fn: Callable[..., Tensor], x: Tensor, unit_dim: int, dims: list[int],
                  out: Tensor) -> None:
    """``fn(x, dims, out=out)`` for ``fn`` = ``torch.amin``/``torch.amax``, the same values.

    On the CPU (torch 2.13, one thread) a min or max over the rows of a ``(rows, units)`` tile
    runs on torch's vectorised path only when a row is a multiple of 128 bytes (32 float32):
    2**18 float32 elements take 13-20 us for 32, 64, 96, 128, ... units and 42-780 us for
    every other count (2-30 units ~720 us, 48: 250 us, 100: 56 us, 130: 32 us; ~6.6 ms as an
    ``(N, T, 8)`` tile).  A contiguous tile whose unit dim is innermost and whose rows are a
    multiple of :data:`_FAST_ROW_BYTES` is reduced as ``(rows, units)`` directly; any other is
    viewed as ``(rows/k, k·units)`` rows, ``k·units`` a multiple of :data:`_FAST_ROW_BYTES`
    and at least :data:`_EXTREME_WIDTH` columns, reduced, and the ``k`` partial results (plus
    the remainder rows) reduced once more (before, 128 units were regrouped too: 36 us
    against 14 us direct).  Minima and maxima do not depend on the order of reduction, so the
    values are the reference's.
    """
    units = x.shape[unit_dim]
    if units >= 1 and unit_dim == x.ndim - 1 and x.is_contiguous() and x.device.type == "cpu":
        flat = x.view(-1, units)
        row = units * x.element_size()
        if row % _FAST_ROW_BYTES == 0:
            fn(flat, 0, out=out)
            return
        step = _FAST_ROW_BYTES // math.gcd(row, _FAST_ROW_BYTES)  # k·row: a multiple
        k = step * max(1, -(-_EXTREME_WIDTH // (step * units)))
        rows = flat.shape[0]
        main = rows - rows % k
        if main >= 2 * k:
            part = fn(flat[:main].view(main // k, k * units), 0).view(k, units)
            if main < rows:
                part = torch.cat([part, flat[main:]])
            fn(part, 0, out=out)
            return
    fn(x, dims, out=out)


def _tile_sums_fused(x: Tensor, unit_dim: int, cd: torch.dtype, scratch: ScratchPool,
                     out: Tensor, has_prior: Tensor | None, prior_mean: Tensor | None,
                     shift: Tensor | None, finite: bool = False) -> None:
    """The rows of :func:`_batch_sums` for one tile, written in place into ``out``
    (``(8, units)`` in ``cd``): the reference's elementwise kernels on a work tensor of the
    reference's layout, so every row equals the reference's bit for bit, but without its
    per-tile bookkeeping (the shift's candidates are computed once per batch, the sums are
    written where :func:`_tile_state` reads them: no ``stack`` and no per-tile conversion).

    ``finite``: for a tile of finite values, 10 passes instead of 15: the extremes and signs
    of the data themselves, ``Σ sign x_hi = Σ sign x_lo``, the moments unmasked. On finite
    data the same rows bit for bit; otherwise ``s1`` or ``s2`` is non-finite, which
    :func:`_reduce_fused` checks before it uses the rows.
    """
    units = x.shape[unit_dim]
    dims = [i for i in range(x.ndim) if i != unit_dim]
    bshape = [1] * x.ndim
    bshape[unit_dim] = units
    if x.dtype != cd:
        xc = scratch.like("convert", x, cd)
        xc.copy_(x)
        x = xc
    s = scratch.like("work", x, cd)
    lo, hi, c = out[5], out[6], out[7]
    if finite:
        _extreme_into(torch.amin, x, unit_dim, dims, lo)
        _extreme_into(torch.amax, x, unit_dim, dims, hi)
        torch.sign(x, out=s)
        torch.sum(s, dims, out=out[2])
        s.abs_()
        torch.sum(s, dims, out=out[3])
        out[4].copy_(out[2])
    else:
        # min and sign counts with non-finite -> +inf, max and Σ sign with non-finite -> -inf
        torch.nan_to_num(x, _INF, _INF, _INF, out=s)
        _extreme_into(torch.amin, s, unit_dim, dims, lo)
        s.sign_()
        torch.sum(s, dims, out=out[2])
        s.abs_()
        torch.sum(s, dims, out=out[3])
        torch.nan_to_num(x, -_INF, -_INF, -_INF, out=s)
        _extreme_into(torch.amax, s, unit_dim, dims, hi)
        s.sign_()
        torch.sum(s, dims, out=out[4])
    if shift is None:
        assert has_prior is not None and prior_mean is not None
        torch.where(has_prior, prior_mean, lo * 0.5 + hi * 0.5, out=c)
        c.nan_to_num_(0.0, 0.0, 0.0)
    else:
        c.copy_(shift)
    # moments around the shift; non-finite samples contribute 0 (masked path)
    torch.sub(x, c.view(bshape), out=s)
    if not finite:
        s.nan_to_num_(0.0, 0.0, 0.0)
    torch.sum(s, dims, out=out[0])
    s.mul_(s)
    torch.sum(s, dims, out=out[1])


def _tile_state(sums: Tensor, rows: float | Tensor) -> Tensor:
    """States ``(..., 9, units)`` from :func:`_batch_sums` rows ``(..., 8, units)``."""
    s1, s2, sign_lo, nonzero, sign_hi, lo, hi, c = sums.unbind(-2)
    bad = (sign_lo - sign_hi) * 0.5
    n = rows - bad
    d1 = s1 / n.clamp(min=1.0)  # mean - c
    m2 = (s2 - s1 * d1).clamp_(min=0.0)
    return torch.stack([n, d1, m2, lo, hi, (nonzero - sign_lo) * 0.5, rows - nonzero, bad, c],
                       dim=-2)


def _combine_tiles(st: Tensor) -> Tensor:
    """Multi-way Chan merge of ``(tiles, 9, units)`` states into one ``(9, units)`` state:
    ``n = Σ n_t``, ``mean = Σ n_t mean_t / n``, ``M2 = Σ M2_t + Σ n_t (mean_t - mean)²``, with
    means taken relative to the anchor of the tile with most samples."""
    n_t = st[:, _COUNT]
    ref = st[:, _REF].gather(0, n_t.argmax(0, keepdim=True)).squeeze(0)
    dev = (st[:, _REF] - ref) + st[:, _DMEAN]  # tile mean - ref
    n = n_t.sum(0)
    mean = (n_t * dev).sum(0) / n.clamp(min=1.0)
    m2 = st[:, _M2].sum(0) + (n_t * (dev - mean).square()).sum(0)
    return torch.cat([torch.stack([n, mean, m2, st[:, _MIN].amin(0), st[:, _MAX].amax(0)]),
                      st[:, _NEG:_REF].sum(0), ref.unsqueeze(0)])


def _batch_sums(x: Tensor, unit_dim: int, cd: torch.dtype, scratch: ScratchPool,
                prior: Tensor, shift: Tensor | None) -> Tensor:
    """Per-unit sums of one batch: ``(8, units)`` float64 rows ``s1, s2, Σ sign(x_lo),
    Σ |sign(x_lo)|, Σ sign(x_hi), min, max, shift`` (see the module docstring); ~15 passes.

    ``shift`` (per unit) defaults to the running mean of ``prior`` where it has data, else this
    batch's midrange.
    """
    units = x.shape[unit_dim]
    dims = [i for i in range(x.ndim) if i != unit_dim]
    bshape = [1] * x.ndim
    bshape[unit_dim] = units
    if x.dtype != cd:
        xc = scratch.like("convert", x, cd)
        xc.copy_(x)
        x = xc
    s = scratch.like("work", x, cd)
    # min and sign counts with non-finite -> +inf; max with non-finite -> -inf. With P, N, Z, B
    # the numbers of positive, negative, zero and non-finite samples:
    # Σ sign(lo-filled) = P - N + B, Σ |sign(lo-filled)| = P + N + B, Σ sign(hi-filled) = P - N - B
    torch.nan_to_num(x, _INF, _INF, _INF, out=s)
    lo = s.amin(dims)
    s.sign_()
    sign_lo = s.sum(dims)
    s.abs_()
    nonzero = s.sum(dims)
    torch.nan_to_num(x, -_INF, -_INF, -_INF, out=s)
    hi = s.amax(dims)
    s.sign_()
    sign_hi = s.sum(dims)
    if shift is None:
        mid = (lo * 0.5 + hi * 0.5).to(torch.float64)
        shift = torch.where(prior[_COUNT] > 0, prior[_REF] + prior[_DMEAN], mid)
    c = torch.nan_to_num(shift.to(cd), 0.0, 0.0, 0.0)
    # moments around the shift; non-finite samples contribute 0
    torch.sub(x, c.view(bshape), out=s)
    s.nan_to_num_(0.0, 0.0, 0.0)
    s1 = s.sum(dims)
    s.mul_(s)
    s2 = s.sum(dims)
    return torch.stack([s1, s2, sign_lo, nonzero, sign_hi, lo, hi, c]).to(torch.float64)


class RunningStats:
    """Running per-unit statistics of a stream of activation batches (see the module docstring).

    Args:
        units: number of units (the size of the unit dim of every batch).
        device: where the state lives (that of the batches).
        compute_dtype: float32 (default) or float64, for the elementwise work and batch sums;
            the running state is always float64.
        histogram: optional :class:`~biasshift.monitor.histogram.HistogramSpec` for per-unit
            fixed-bin histograms.
        buffer_rows: samples per unit staged before a reduction (0: reduce every batch).
            Batches of at least :data:`DIRECT_ELEMENTS` elements are reduced at once: they
            amortise a reduction's kernel launches themselves, and staging would only add a
            copy.
        scratch: a :class:`ScratchPool` to share work tensors with other accumulators.
        fused: reduce with the fused kernels (default) or the tiled reference implementation
            (``False``); the results are the same bit for bit, only the speed differs.
        finite_first: with ``fused``, reduce finite first (see the module docstring; one host
            read per reduction); ``None`` (default): on for devices in
            :data:`FINITE_FIRST_DEVICES` (the CPU). The same results bit for bit.

    All tensors are created on ``device`` and updated in place; nothing waits for a device.
    """

    def __init__(
        self,
        units: int,
        device: torch.device | str | None = None,
        *,
        compute_dtype: torch.dtype = torch.float32,
        histogram: HistogramSpec | None = None,
        buffer_rows: int = 0,
        scratch: ScratchPool | None = None,
        fused: bool = True,
        finite_first: bool | None = None,
    ) -> None:
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        if compute_dtype not in _MAX_EXACT_ROWS:
            raise ValueError(
                f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        if isinstance(buffer_rows, bool) or not isinstance(buffer_rows, int) or buffer_rows < 0:
            raise ValueError(f"buffer_rows must be a non-negative int, got {buffer_rows!r}")
        self.units = units
        self.device = _normalize_device(device)
        self.compute_dtype = compute_dtype
        self.histogram = histogram
        self.buffer_rows = min(buffer_rows, _MAX_EXACT_ROWS[compute_dtype])
        self.scratch = scratch if scratch is not None else ScratchPool()
        self.fused = bool(fused)
        self.finite_first = None if finite_first is None else bool(finite_first)
        self.batches = 0
        self._buffer: Tensor | None = None
        # "units_last": buffer (buffer_rows, units), for outputs whose unit dim is innermost (the
        # copy is a memcpy); "units_first": (units, buffer_rows), e.g. for NCHW conv outputs
        self._layout: str | None = None
        self._views: dict[tuple, Tensor] = {}
        self._fill = 0
        self.reset()

    # ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every sample (pending ones included)."""
        with torch.inference_mode(False):
            self._state = empty_state(self.units, self.device)
            self._hist = (
                torch.zeros(self.units, self.histogram.slots, dtype=torch.int64,
                            device=self.device) if self.histogram is not None else None
            )
        self._fill = 0
        self.batches = 0

    def update(self, x: Tensor, unit_dim: int = -1) -> None:
        """Add a batch: ``x`` holds ``units`` units along ``unit_dim``, samples along the rest.

        Only shapes are checked (Python ints). A batch is copied into the staging buffer (one
        kernel) or, when it does not fit, reduced at once. Data values reach the host only in
        a finite-first reduction (CPU tensors by default: one small read per reduction, which
        on the CPU waits for nothing); on other devices never.
        """
        shape = x.shape
        if not shape or shape[unit_dim] != self.units:
            raise ValueError(
                f"expected {self.units} units along dim {unit_dim}, got shape {tuple(shape)}")
        if x.device != self.device:
            raise ValueError(f"batch on {x.device}, statistics on {self.device}; call .to()")
        self.batches += 1
        numel = x.numel()
        rows = numel // self.units
        if rows == 0:
            return
        if rows > self.buffer_rows or numel >= DIRECT_ELEMENTS:
            with torch.no_grad(), torch.inference_mode(False):
                self._reduce(x.detach(), unit_dim % x.ndim, self._state, self._hist)
            return
        if self._fill + rows > self.buffer_rows:
            self._commit_buffer()
        key = (self._fill, shape, x.stride(), unit_dim)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= 4096:  # many distinct batch shapes: keep the cache small
                self._views.clear()
            view = self._buffer_view(x, unit_dim % x.ndim, rows)
            self._views[key] = view
        view.copy_(x.detach())
        self._fill += rows

    # ----------------------------------------------------------------------------------------
    def _buffer_view(self, x: Tensor, unit_dim: int, rows: int) -> Tensor:
        """The next ``rows`` buffer samples, viewed with ``x``'s shape (so ``copy_(x)`` fills)."""
        if self._buffer is None:
            units_last = x.stride(unit_dim) == 1 and x.shape[unit_dim] > 1
            self._layout = "units_last" if units_last else "units_first"
            self._alloc_buffer()
        assert self._buffer is not None
        rest = [s for i, s in enumerate(x.shape) if i != unit_dim]
        if self._layout == "units_last":
            part = self._buffer[self._fill : self._fill + rows].view(*rest, self.units)
            return part.movedim(-1, unit_dim)
        part = self._buffer[:, self._fill : self._fill + rows].view(self.units, *rest)
        return part.movedim(0, unit_dim)

    def _alloc_buffer(self) -> None:
        shape = ((self.buffer_rows, self.units) if self._layout == "units_last"
                 else (self.units, self.buffer_rows))
        with torch.inference_mode(False):
            self._buffer = torch.empty(shape, dtype=self.compute_dtype, device=self.device)
        self._views.clear()

    def _pending(self) -> tuple[Tensor, int] | None:
        """The staged samples and their unit dim, or None."""
        if not self._fill or self._buffer is None:
            return None
        if self._layout == "units_last":
            return self._buffer[: self._fill], 1
        return self._buffer[:, : self._fill], 0

    def _reduce(self, x: Tensor, unit_dim: int, state: Tensor, hist: Tensor | None) -> None:
        finite = _reduce_into(state, x, unit_dim, self.compute_dtype, self.scratch,
                              fused=self.fused, finite_first=self.finite_first)
        if hist is not None:
            assert self.histogram is not None
            split = 1 if unit_dim == 0 else 0
            step = max(1, _TILE_ELEMENTS * x.shape[split] // x.numel())
            for start in range(0, x.shape[split], step):
                part = x.narrow(split, start, min(step, x.shape[split] - start))
                work = self.scratch.like("hist", part, torch.float64)
                slots = self.scratch.like("hist_slots", part, torch.float32)
                index = self.scratch.like("hist_index", part,
                                          index_dtype(self.units * self.histogram.slots,
                                                      part.device))
                accumulate_histogram(hist, part, unit_dim, self.histogram, work, index, slots,
                                     finite=bool(finite))

    def _commit_buffer(self) -> None:
        pending = self._pending()
        if pending is not None:
            with torch.no_grad(), torch.inference_mode(False):
                self._reduce(*pending, self._state, self._hist)
        self._fill = 0

    def _merged(self) -> tuple[Tensor, Tensor | None]:
        """State and histogram counts including pending rows, without changing ``self``."""
        pending = self._pending()
        if pending is None:
            return self._state, self._hist
        with torch.no_grad(), torch.inference_mode(False):
            state = self._state.clone()
            hist = self._hist.clone() if self._hist is not None else None
            self._reduce(*pending, state, hist)
        return state, hist

    # ----------------------------------------------------------------------------------------
    def state(self) -> Tensor:
        """A copy of the ``(9, units)`` float64 state (rows :data:`STATE_ROWS`), pending rows in."""
        state, _ = self._merged()
        return state.clone() if state is self._state else state

    def histogram_counts(self) -> Tensor:
        """``(units, bins + 2)`` int64 counts: underflow, the bins, overflow (pending rows in)."""
        if self.histogram is None:
            raise RuntimeError("no histogram configured: pass histogram=HistogramSpec(...)")
        _, hist = self._merged()
        assert hist is not None
        return hist[:, : self.histogram.bins + 2].clone()

    def stats(self) -> dict[str, Tensor]:
        """Per-unit ``STAT_COLUMNS`` as tensors on the device (see :func:`state_to_stats`)."""
        return state_to_stats(self._merged()[0])

    def merge_(self, other: RunningStats) -> RunningStats:
        """Add the samples seen by ``other`` (same units and histogram bins); returns ``self``."""
        if other.units != self.units or other.histogram != self.histogram:
            raise ValueError("can only merge RunningStats with the same units and histogram")
        state, hist = other._merged()
        with torch.no_grad(), torch.inference_mode(False):
            self._state.copy_(merge_states(self._state, state.to(self.device)))
            if self._hist is not None and hist is not None:
                self._hist.add_(hist.to(self.device))
        self.batches += other.batches
        return self

    def set_compute_dtype(self, dtype: torch.dtype, buffer_rows: int | None = None) -> None:
        """Reduce future batches in ``dtype`` (pending rows are merged first)."""
        if dtype not in _MAX_EXACT_ROWS:
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {dtype}")
        self._commit_buffer()
        self._buffer = None
        self._layout = None
        self._views.clear()
        self.compute_dtype = dtype
        if buffer_rows is not None:
            self.buffer_rows = min(buffer_rows, _MAX_EXACT_ROWS[dtype])

    def to(self, device: torch.device | str) -> RunningStats:
        """Move the state (and pending rows) to ``device`` in place; returns ``self``."""
        device = _normalize_device(device)
        if device != self.device:
            with torch.inference_mode(False):  # no inference tensors: they are updated in place
                self._state = self._state.to(device)
                if self._hist is not None:
                    self._hist = self._hist.to(device)
                if self._buffer is not None:
                    self._buffer = self._buffer.to(device)
            self._views.clear()
            self.device = device
        return self

    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: state, histogram, pending rows, config."""
        pending = self._pending()
        return {
            "units": self.units,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "buffer_rows": self.buffer_rows,
            "histogram": self.histogram.to_dict() if self.histogram is not None else None,
            "batches": self.batches,
            "state": self._state.clone(),
            "hist": self._hist.clone() if self._hist is not None else None,
            "layout": self._layout,
            "pending": pending[0].clone() if pending is not None else None,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (tensors are copied to this object's device)."""
        for key in ("units", "compute_dtype", "buffer_rows", "histogram", "state"):
            if key not in sd:
                raise KeyError(f"RunningStats state_dict is missing {key!r}")
        if sd["units"] != self.units:
            raise ValueError(f"state_dict has {sd['units']} units, this accumulator {self.units}")
        hist_spec = HistogramSpec.coerce(sd["histogram"]) if sd["histogram"] else None
        if hist_spec != self.histogram:
            raise ValueError(f"state_dict histogram {sd['histogram']} differs from "
                             f"{self.histogram}")
        dtype = getattr(torch, str(sd["compute_dtype"]), None)
        if dtype not in _MAX_EXACT_ROWS:
            raise ValueError(f"state_dict has an invalid compute_dtype {sd['compute_dtype']!r}")
        state = torch.as_tensor(sd["state"])
        if state.shape != (len(STATE_ROWS), self.units):
            raise ValueError(f"state has shape {tuple(state.shape)}, expected "
                             f"{(len(STATE_ROWS), self.units)}")
        layout, pending = sd.get("layout"), sd.get("pending")
        if pending is not None:
            expect = 1 if layout == "units_last" else 0
            if layout not in ("units_last", "units_first") or pending.ndim != 2 \
                    or pending.shape[expect] != self.units:
                raise ValueError(f"pending rows of shape {tuple(pending.shape)} do not fit "
                                 f"layout {layout!r} with {self.units} units")
        self.compute_dtype = dtype
        self.buffer_rows = int(sd["buffer_rows"])
        self.batches = int(sd.get("batches", 0))
        with torch.inference_mode(False):
            self._state = state.to(self.device, torch.float64, copy=True)
            hist = sd.get("hist")
            self._hist = hist.to(self.device, torch.int64, copy=True) if hist is not None else (
                torch.zeros(self.units, self.histogram.slots, dtype=torch.int64,
                            device=self.device) if self.histogram is not None else None)
        self._buffer = None
        self._layout = layout
        self._views.clear()
        self._fill = 0
        if pending is not None:
            rows = pending.shape[0 if layout == "units_last" else 1]
            if rows > self.buffer_rows:
                raise ValueError(f"{rows} pending rows exceed buffer_rows={self.buffer_rows}")
            self._alloc_buffer()
            assert self._buffer is not None
            if layout == "units_last":
                self._buffer[:rows].copy_(pending)
            else:
                self._buffer[:, :rows].copy_(pending)
            self._fill = rows
