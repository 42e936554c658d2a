"""Exact probe statistics: the paper's protocol for Fig. 2 and the appendix.

After each epoch the paper computes "the units' average activations on a fixed subset of the
training data" and plots "the median over all units" (Fig. 2a); the appendix computes "the median
activation of each hidden unit on the whole training set".  :func:`probe_statistics` runs a model
in eval mode under ``torch.no_grad()`` over a fixed probe set, keeps every activation of the
monitored modules, and returns each unit's exact mean and median.

Medians follow numpy's convention (the average of the two middle values for an even count).
Non-finite activations are left out of both statistics and counted in ``nonfinite``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from biasshift import distributed as _dist
from biasshift._names import unknown_name_error
from biasshift._torch import model_device
from biasshift.hooks import Trace, eval_mode
from biasshift.monitor.selection import (
    ModuleSpec,
    UnitDimSpec,
    resolve_modules,
    resolve_unit_dims,
    unit_dim_for,
)

__all__ = ["ProbeStatistics", "exact_median", "probe_statistics"]


def exact_median(values: Tensor, dim: int = 0) -> Tensor:
    """Median along ``dim`` ignoring NaNs, averaging the two middle values for even counts.

    Unlike :func:`torch.median` (which returns the lower of the two middle values) this agrees
    with :func:`numpy.nanmedian`. The average of the two middle values is rounded once (it is
    formed in float64 for lower precisions) and cannot overflow. A slice with no non-NaN value,
    or an empty ``dim``, gives NaN.
    """
    v = values.movedim(dim, 0)
    if v.shape[0] == 0:
        return torch.full(v.shape[1:], float("nan"), dtype=v.dtype, device=v.device)
    if v.is_floating_point():
        # selection, not a sort (4-8x faster): with k non-NaN values sorted s_0..s_{k-1},
        # nanmedian(v) is the lower middle value s_{(k-1)//2} and -nanmedian(-v) the upper one
        # s_{k//2}; both are NaN where k == 0
        a = torch.nanmedian(v, dim=0).values
        b = -torch.nanmedian(-v, dim=0).values
    else:
        s, _ = torch.sort(v, dim=0)
        a, b = s[(v.shape[0] - 1) // 2], s[v.shape[0] // 2]
    if v.dtype == torch.float64:
        mid = a * 0.5 + b * 0.5  # no overflow; exact unless subnormal
    else:  # exact in float64, then one rounding
        mid = ((a.double() + b.double()) * 0.5)
        if v.is_floating_point():
            mid = mid.to(v.dtype)
    return torch.where(a == b, a, mid)


@dataclass(frozen=True)
class ProbeStatistics:
    """Per monitored module, each unit's exact mean and median on the probe set.

    All tensors live on the model's device; nothing is moved to the host until
    :meth:`to_frame` or ``float()`` is called by the user.
    """

    mean: dict[str, Tensor]
    median: dict[str, Tensor]
    nonfinite: dict[str, Tensor]
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.mean)

    def _select(self, modules: Iterable[str] | None) -> list[str]:
        names = self.modules if modules is None else list(modules)
        for n in names:
            if n not in self.mean:
                raise unknown_name_error("probed module", n, self.modules)
        return names

    def median_of_means(self, modules: Iterable[str] | None = None) -> Tensor:
        """The paper's Fig. 2a summary: the median over all units of the units' mean activation.

        Units of all ``modules`` (default: every probed module) are pooled. Returns a 0-dim tensor.
        """
        names = self._select(modules)
        if not names:
            raise ValueError("median_of_means: no module selected")
        means = torch.cat([self.mean[n].reshape(-1) for n in names])
        return exact_median(means)

    def layer_median_of_means(self) -> dict[str, Tensor]:
        """Per module, the median over its units of the units' mean activation."""
        return {n: exact_median(m) for n, m in self.mean.items()}

    def to_frame(self) -> pd.DataFrame:
        """A tidy table, one row per (module, unit).

        Columns: ``module, unit, mean, median, samples, nonfinite`` (``median`` NaN when the
        statistics were taken with ``medians=False``).
        """
        frames = []
        for n in self.modules:
            units = self.mean[n].numel()
            frames.append(pd.DataFrame({
                "module": n,
                "unit": range(units),
                "mean": self.mean[n].detach().double().cpu().numpy(),
                "median": (self.median[n].detach().double().cpu().numpy()
                           if n in self.median else float("nan")),  # medians=False
                "samples": self.samples.get(n, 0),
                "nonfinite": self.nonfinite[n].detach().cpu().numpy(),
            }))
        cols = ["module", "unit", "mean", "median", "samples", "nonfinite"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _batches(probe: Tensor | Iterable[object], batch_size: int | None) -> Iterator[Tensor]:
    if isinstance(probe, Tensor):
        if probe.ndim == 0:
            raise ValueError("probe must be a batch (N, ...) of inputs, got a 0-dim tensor")
        if probe.shape[0] == 0:
            raise ValueError(f"probe is empty (shape {tuple(probe.shape)}); pass at least one "
                             "input")
        step = probe.shape[0] if batch_size is None else batch_size
        for start in range(0, probe.shape[0], step):
            yield probe[start : start + step]
        return
    for item in probe:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise TypeError(
                "probe batches must be tensors or (inputs, ...) tuples of tensors, "
                f"got {type(x).__name__}"
            )
        yield x


@torch.no_grad()
def probe_statistics(
    model: nn.Module,
    probe: Tensor | Iterable[object],
    modules: ModuleSpec = None,
    unit_dim: UnitDimSpec = None,
    *,
    batch_size: int | None = 4096,
    medians: bool = True,
    sync: bool | None = None,
    process_group: Any = None,
) -> ProbeStatistics:
    """Run ``model`` in eval mode without gradients over ``probe``; return per-unit mean and median.

    Args:
        model: any module; every submodule's training flag is restored afterwards.
        probe: a tensor of inputs (split into ``batch_size`` chunks) or an iterable of batches
            (tensors, or tuples whose first element is the input). Inputs are moved to the model's
            device.
        modules, unit_dim: as for :class:`biasshift.ActivationMonitor` (default: every activation
            module; the automatic unit-dimension rule).
        batch_size: chunk size for a tensor probe (``None``: one chunk).
        medians: keep every activation to compute exact medians (memory: all probe activations).
            With ``False`` only per-unit float64 sums are kept (streaming, constant memory) and
            ``median`` is empty; the means are the same.
        sync, process_group: under ``torch.distributed`` (see :mod:`biasshift.distributed`)
            each rank runs its own ``probe`` shard and the statistics are those of all ranks'
            samples together, the same on every rank: the float64 sums and counts are
            all-reduced and, for the medians, every rank's values are all-gathered (the
            exact median of the union). ``sync=False``: this rank's statistics. Every rank
            needs a non-empty probe shard.

    Every call of a monitored module contributes its outputs; for conv outputs every position is a
    sample of its channel.  Activations are kept in float32 (float64 stays float64) until the end.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    model = _dist.unwrap_model(model)  # DDP: our passes run on the wrapped module
    chosen = resolve_modules(model, modules)
    rules = resolve_unit_dims(model, chosen, unit_dim)
    # per module: running float64 sums of the finite values, their counts, the row count, the
    # output dtype; and (medians) every batch's values with non-finite entries set to NaN
    sums: dict[str, tuple[Tensor, Tensor, int, torch.dtype]] = {}
    store: dict[str, list[Tensor]] = {n: [] for n in chosen}
    first_shape: dict[str, tuple[int, ...]] = {}
    units_seen: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            if not isinstance(out, Tensor):
                raise TypeError(f"module {name!r} returned {type(out).__name__}, not a tensor")
            shape = tuple(out.shape)
            d = unit_dim_for(name, shape, rules[name])
            first = first_shape.setdefault(name, shape)
            if units_seen.setdefault(name, shape[d]) != shape[d]:
                raise ValueError(
                    f"module {name!r} produced outputs with different unit counts: shape "
                    f"{shape} has {shape[d]} units along dim {d}, its first output had shape "
                    f"{first}")
            vals = out.detach().movedim(d, -1).reshape(-1, out.shape[d])
            # streaming (per batch, cache-friendly): float64 sums of the finite values
            finite = torch.isfinite(vals)
            kept = torch.where(finite, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
            batch = (kept.sum(0, dtype=torch.float64), finite.sum(0), vals.shape[0],
                     vals.dtype if vals.dtype in (torch.float32, torch.float64) else torch.float32)
            if name in sums:
                s0, c0, n0, dt = sums[name]
                batch = (s0 + batch[0], c0 + batch[1], n0 + batch[2], dt)
            sums[name] = batch
            if medians:
                # a float32/float64 copy (the model may overwrite its output) with NaN for
                # non-finite values, which exact_median leaves out
                if vals.dtype in (torch.float32, torch.float64):
                    vals = vals.clone()
                else:
                    vals = vals.float()
                store[name].append(vals.masked_fill_(~finite, float("nan")))

        return hook

    device = model_device(model)
    hooks = {n: make_hook(n) for n in chosen}
    # eval_mode restores every submodule's own flag (some may be in eval already)
    with eval_mode(model), Trace(chosen, forward=lambda n, m, i, o: hooks[n](m, i, o)):
        n_batches = n_inputs = 0
        for x in _batches(probe, batch_size):
            n_batches += 1
            n_inputs += x.shape[0] if x.ndim else 1
            model(x.to(device, non_blocking=True) if device is not None else x)

    if n_inputs == 0:
        got = "no batches" if n_batches == 0 else f"{n_batches} batch(es) of 0 inputs each"
        raise ValueError(f"probe_statistics: the probe set is empty ({got}); pass a tensor "
                         "(N, ...) or an iterable of batches holding at least one input")
    mean: dict[str, Tensor] = {}
    median: dict[str, Tensor] = {}
    nonfinite: dict[str, Tensor] = {}
    samples: dict[str, int] = {}
    for n in chosen:
        if n not in sums:
            raise RuntimeError(
                f"module {n!r} was never called while running the probe; is it part of the forward?"
            )
    group = _dist.sync_group(sync, process_group)
    if group is not None:
        _sync_probe(chosen, sums, store if medians else None, group)
    for n in chosen:
        total, count, n_rows, dtype = sums[n]
        mean[n] = (total / count).to(dtype)  # 0/0 -> NaN for a unit with no finite value
        nonfinite[n] = n_rows - count
        samples[n] = n_rows
        if medians:
            parts = store.pop(n)  # free each module's copy as soon as its median is known
            median[n] = exact_median(parts[0] if len(parts) == 1 else torch.cat(parts), dim=0)
            del parts
    return ProbeStatistics(mean=mean, median=median, nonfinite=nonfinite, samples=samples)


def _sync_probe(names: list[str], sums: dict[str, tuple[Tensor, Tensor, int, torch.dtype]],
                store: dict[str, list[Tensor]] | None, group: Any) -> None:
    """Replace every rank's sums (and stored values) by those of all ranks, in place.

    One all-reduce of the float64 sums, counts and row counts of every module; with medians,
    per module an all-gather of the (NaN-padded) values, in rank order.
    """
    units = [sums[n][0].numel() for n in names]
    _dist.check_same(units, group, "the probed modules' unit counts")
    flat = torch.cat([torch.cat([sums[n][0], sums[n][1].to(torch.float64),
                                 sums[n][0].new_tensor([float(sums[n][2])])]) for n in names])
    total = _dist.all_reduce(flat, group)
    start = 0
    for n, u in zip(names, units):
        part = total[start: start + 2 * u + 1]
        start += 2 * u + 1
        sums[n] = (part[:u], part[u: 2 * u].round().to(torch.int64), int(part[2 * u]),
                   sums[n][3])
        if store is not None:
            parts = store[n]
            local = parts[0] if len(parts) == 1 else torch.cat(parts)
            store[n] = _dist.all_gather_rows(local, group, fill=float("nan"))
