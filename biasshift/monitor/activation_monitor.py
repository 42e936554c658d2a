"""``ActivationMonitor``: per-unit activation statistics of any model while it trains or evaluates.

The paper's argument is about the *mean activation* of units: units whose mean is far from zero
cause a bias shift in the next layer; ELUs (and units with negative values generally) keep it close
to zero. The monitor measures exactly that, per unit, for any ``torch.nn.Module``::

    monitor = ActivationMonitor(model)             # every activation module
    with monitor:                                  # hooks on enter, all removed on exit
        for x, y in loader:
            loss = loss_fn(model(x), y)
            ...
    monitor.stats()                                # one row per (module, unit)

Samples and units
    Each call of a monitored module contributes its whole output. The unit dim is chosen by the
    documented automatic rule of :mod:`biasshift.monitor.selection` (``(N, F)`` and conv outputs:
    dim 1; ``(N, T, F)``: dim 2) or by ``unit_dim``; every other position is a sample of its
    unit, so a conv channel gets ``N * H * W`` samples per call, a sequence feature ``N * T``.
    A module called several times in one forward pass counts every call.

Statistics (:meth:`ActivationMonitor.stats`)
    ``count`` finite samples; ``mean``; ``var`` the *population* variance ``M2 / count`` and
    ``std`` its square root; ``min``/``max`` of the finite samples; ``frac_negative`` and
    ``frac_zero`` among the finite samples; ``nonfinite`` the number of NaN/±inf samples, which
    never enter the other statistics. Accumulation is numerically stable (shifted batch sums,
    Chan's parallel merge in float64; see :mod:`biasshift.monitor.running`), half and bfloat16
    activations are reduced in float32.

Speed
    Hooks never synchronise with the host: no ``.item()``, ``.cpu()``, ``.tolist()`` or Python
    branching on values, only kernels queued on the activations' device and shape checks on
    Python ints. By default each call only copies its output into a per-module staging buffer
    (``buffer_bytes``, 4 MiB) that is reduced when full (outputs of at least ``2**18`` elements
    are reduced at once); :meth:`stats` is where the one transfer
    to the host happens.

Distributed (``torch.distributed``, DDP)
    When ``torch.distributed`` is initialised, :meth:`~ActivationMonitor.stats`,
    :meth:`~ActivationMonitor.histograms` and :meth:`~ActivationMonitor.snapshot` (hence
    :meth:`~ActivationMonitor.history`) report all ranks' samples together, the same on every
    rank: the per-rank states are all-gathered and merged with the same Chan merge as batches,
    histograms summed (:mod:`biasshift.distributed`; per sync each rank sends ``72`` bytes per
    unit, plus ``8 (bins + 2)`` with histograms). ``sync=False`` gives the rank's own
    statistics, ``process_group=`` a sub-group's; every rank of the group must call the reader.
    The hooks never communicate. A DDP-wrapped model may be passed as it is; module names are
    those of the wrapped module (a ``module.`` prefix is accepted and dropped).

``torch.compile``
    Enter the monitor (register the hooks) *before* compiling, or call
    ``torch._dynamo.reset()`` after entering it. The hook's work is excluded from compilation
    (``torch.compiler.disable``, entered only while dynamo traces the hook), so the compiled
    model breaks its graph at each monitored module and the statistics equal those of eager
    execution.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from biasshift import distributed as _dist
from biasshift._names import unknown_name_error
from biasshift.hooks import Trace
from biasshift.monitor.histogram import HistogramSpec, histogram_frame
from biasshift.monitor.running import (
    STAT_COLUMNS,
    RunningStats,
    ScratchPool,
    state_to_stats,
)
from biasshift.monitor.selection import (
    ModuleSpec,
    UnitDimSpec,
    resolve_modules,
    resolve_unit_dims,
    unit_dim_for,
)

__all__ = ["ActivationMonitor"]

_FORMAT = "biasshift.ActivationMonitor"
_VERSION = 1
_INT_COLUMNS = ("count", "nonfinite")
_RESERVED_TAGS = frozenset({"module", "unit", "bin", "bin_left", "bin_right", *STAT_COLUMNS})

_compiler_disable = torch.compiler.disable
_is_compiling = torch.compiler.is_compiling


def _empty_stats_frame(tag_names: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    cols: dict[str, pd.Series] = {t: pd.Series(dtype=object) for t in tag_names}
    cols["module"] = pd.Series(dtype=object)
    cols["unit"] = pd.Series(dtype="int64")
    for c in STAT_COLUMNS:
        cols[c] = pd.Series(dtype="int64" if c in _INT_COLUMNS else "float64")
    return pd.DataFrame(cols)


class ActivationMonitor:
    """Per-unit running statistics of the outputs of a model's activation modules.

    Args:
        model: any ``nn.Module``.
        modules: ``None`` (every activation module, ours and torch's: see
            :func:`~biasshift.monitor.selection.is_activation`), an iterable of modules or of
            qualified names as in ``model.named_modules()``, or a predicate
            ``(name, module) -> bool``.
        unit_dim: ``None`` (the automatic rule), an int for every monitored module, or a dict
            name -> int (others use the automatic rule).
        histogram: optional per-unit fixed-bin histograms: ``dict(bins=64, range=(-2.0, 6.0))``,
            a :class:`~biasshift.monitor.histogram.HistogramSpec`, or ``True`` for those
            defaults. See :meth:`histograms`.
        compute_dtype: dtype of the per-batch work: ``None`` (float32, or float64 for float64
            activations), ``torch.float32`` or ``torch.float64`` (slower, for float32
            activations whose mean is huge compared with their spread).
        buffer_bytes: per monitored module, the size of the staging buffer that batches are
            copied into and reduced from when full; ``0`` reduces every batch at once. A batch
            larger than the buffer, or of at least ``2**18`` elements, is reduced directly.
        max_history: keep at most this many snapshots in memory (``None``: no bound). When a
            snapshot would exceed it the oldest is dropped, counted in
            :attr:`dropped_snapshots`, with a warning the first time. See :meth:`snapshot`
            for what a snapshot costs and for ``snapshot(..., to=path)``, which keeps nothing.
        history_device: where snapshots are kept: ``None`` (the activations' device) or e.g.
            ``"cpu"``, to keep a long history off an accelerator.

    Raises:
        ValueError: no module matched (the message lists the monitorable modules).
        KeyError: an unknown module name (the message suggests close names).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSpec = None,
        unit_dim: UnitDimSpec = None,
        *,
        histogram: HistogramSpec | Mapping[str, Any] | bool | None = None,
        compute_dtype: torch.dtype | None = None,
        buffer_bytes: int = 4 << 20,
        max_history: int | None = None,
        history_device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype}")
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 0:
            raise ValueError(f"buffer_bytes must be a non-negative int, got {buffer_bytes!r}")
        self.model = model
        inner = _dist.unwrap_model(model)  # DDP: the names of the wrapped module
        self._modules = resolve_modules(inner, modules)
        self._rules = resolve_unit_dims(inner, self._modules, unit_dim)
        self.histogram = HistogramSpec.coerce(histogram)
        self.compute_dtype = compute_dtype
        self.buffer_bytes = buffer_bytes
        self._acc: dict[str, RunningStats] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dims: dict[str, dict[int, int]] = {n: {} for n in self._modules}
        self._history: list[dict[str, Any]] = []
        if max_history is not None and (isinstance(max_history, bool)
                                        or not isinstance(max_history, int) or max_history < 1):
            raise ValueError(f"max_history must be None or a positive int, got {max_history!r}")
        self.max_history = max_history
        self.history_device = torch.device(history_device) if history_device is not None \
            else None
        #: Snapshots dropped from memory because of ``max_history`` (oldest first).
        self.dropped_snapshots = 0
        self._spill_columns: dict[str, list[str]] = {}
        self._trace = Trace(self._modules, forward=self._hook)
        self._scratch = ScratchPool()

    # -- hooks --------------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Qualified names of the monitored modules, in ``named_modules()`` order."""
        return list(self._modules)

    @property
    def active(self) -> bool:
        """True while the hooks are registered (inside ``with monitor:``)."""
        return self._trace.active

    def attach(self) -> ActivationMonitor:
        """Register the forward hooks (what ``with monitor:`` does on enter); they are owned by
        a :class:`~biasshift.hooks.Trace`."""
        if self._trace.active:
            raise RuntimeError(
                "this ActivationMonitor is already attached (entered twice?); exit the first "
                "`with monitor:` block or call detach() before attaching it again")
        self._trace.add()
        return self

    def detach(self) -> None:
        """Remove every hook this monitor registered (what leaving ``with monitor:`` does)."""
        self._trace.remove()

    def __enter__(self) -> ActivationMonitor:
        return self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()

    def _hook(self, name: str, _module: nn.Module, _inputs: object, output: object) -> None:
        # eager: observe directly. Under torch.compile (dynamo tracing this hook) call the
        # disabled twin, so that the graph breaks here and the statistics are eager ones;
        # the decorator's wrapper would cost every eager call ~0.5 us (measured: 8 hooks of
        # the 8x128 MLP, forward 4.4 us faster without it; ~0.4 % of a training step)
        if _is_compiling():
            self._observe_disabled(name, output)
            return
        self._observe(name, output)

    @_compiler_disable
    def _observe_disabled(self, name: str, out: object) -> None:
        self._observe(name, out)

    def _observe(self, name: str, out: object) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"monitored module {name!r} returned {type(out).__name__}, not a "
                            "tensor; monitor a module whose output is one tensor")
        if not out.is_floating_point():
            raise TypeError(f"monitored module {name!r} returned a {out.dtype} tensor; only "
                            "floating-point activations can be monitored")
        shape = out.shape
        dims = self._dims[name]
        d = dims.get(len(shape))
        if d is None:
            d = dims[len(shape)] = unit_dim_for(name, tuple(shape), self._rules[name])
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = self._new_acc(name, out, d)
        elif acc.units != shape[d]:
            raise ValueError(
                f"monitored module {name!r}: output shape {tuple(shape)} has {shape[d]} units "
                f"along dim {d}, but its first output {self._shapes[name]} had {acc.units}; a "
                "module's unit count must not change (call monitor.reset() between models)")
        if acc.device != out.device:
            acc.to(out.device)
        if out.dtype == torch.float64 and acc.compute_dtype != torch.float64 \
                and self.compute_dtype is None:
            acc.set_compute_dtype(torch.float64, self._buffer_rows(acc.units, torch.float64))
        acc.update(out, d)

    def _buffer_rows(self, units: int, dtype: torch.dtype) -> int:
        return self.buffer_bytes // (units * dtype.itemsize)

    def _new_acc(self, name: str, out: Tensor, d: int) -> RunningStats:
        units = out.shape[d]
        if units == 0:
            raise ValueError(f"monitored module {name!r}: output shape {tuple(out.shape)} has no "
                             f"units along dim {d}")
        cd = self.compute_dtype or (torch.float64 if out.dtype == torch.float64
                                    else torch.float32)
        self._shapes[name] = tuple(out.shape)
        return RunningStats(units, out.device, compute_dtype=cd, histogram=self.histogram,
                            buffer_rows=self._buffer_rows(units, cd), scratch=self._scratch)

    # -- results ------------------------------------------------------------------------------
    def _seen(self) -> list[str]:
        return [n for n in self._modules if n in self._acc]

    def _states(self, sync: bool | None, process_group: Any, *, hist: bool
                ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """The states (and histogram counts) to report: this rank's, or with an active process
        group (:func:`biasshift.distributed.sync_group`) all ranks' merged."""
        names = self._seen()
        states = {n: self._acc[n].state() for n in names}
        hists = ({n: self._acc[n].histogram_counts() for n in names}
                 if hist and self.histogram is not None else None)
        group = _dist.sync_group(sync, process_group)
        if group is None:
            return states, hists
        slots = self.histogram.bins + 2 if self.histogram is not None else 0
        return _dist.merge_running_states(self.modules, states, hists, group, hist_slots=slots)

    def stats(self, *, sync: bool | None = None, process_group: Any = None) -> pd.DataFrame:
        """One row per (module, unit): ``module, unit`` and :data:`STAT_COLUMNS`.

        ``var`` is the population variance (``M2 / count``). Modules that were never called have
        no rows; before any forward pass the frame is empty (with these columns). Under
        ``torch.distributed`` the statistics of all ranks together (``sync=False``: this
        rank's; see the module docstring).
        """
        states, _ = self._states(sync, process_group, hist=False)
        return _stats_frame([({}, states)])

    def histograms(self, *, aggregate: bool = False, sync: bool | None = None,
                   process_group: Any = None) -> pd.DataFrame:
        """Per-unit histograms: ``module, unit, bin, bin_left, bin_right, count``.

        ``bin`` -1 is the underflow bin ``(-inf, lo)``, ``bins`` the overflow bin ``[hi, inf)``.
        With ``aggregate=True`` the counts are summed over each module's units (no ``unit``).
        Under ``torch.distributed`` all ranks' counts are summed (``sync=False``: this rank's).
        """
        spec = self._require_histogram()
        _, hists = self._states(sync, process_group, hist=True)
        assert hists is not None
        return histogram_frame(_to_numpy(hists), spec, aggregate=aggregate)

    def _require_histogram(self) -> HistogramSpec:
        if self.histogram is None:
            raise RuntimeError("this monitor keeps no histograms; create it with "
                               "histogram=dict(bins=64, range=(-2.0, 6.0))")
        return self.histogram

    # -- history ------------------------------------------------------------------------------
    def snapshot(self, *, to: str | os.PathLike[str] | None = None, sync: bool | None = None,
                 process_group: Any = None, **tags: Any) -> None:
        """Append the current statistics, labelled with ``tags`` (e.g. ``epoch=3, step=1200``).

        The snapshot stays on the device (no synchronisation); :meth:`history` converts it.
        Tag values are Python scalars, strings or 0-dim tensors (converted in ``history()``).

        Memory: a snapshot holds, per monitored module, its ``(9, units)`` float64 state
        (72 bytes per unit) and with histograms a ``(units, bins + 3)`` int64 table
        (``8 (bins + 3)`` bytes per unit), on the activations' device (or ``history_device``).
        The history grows by that much at every call and is never thinned: for the paper's
        8x128 MLP, 74 KB per snapshot, 0.6 MB more with 64-bin histograms; a snapshot every
        100 steps over 300 MNIST epochs (1,800 snapshots) is 0.13 GB, 1.1 GB with
        histograms (plus the allocator's overhead). Bound it with ``max_history``, keep it off
        an accelerator with ``history_device="cpu"``, or spill it with ``to``.

        Args:
            to: append this snapshot to the CSV file ``to`` (the columns of :meth:`history`,
                a header when the file is new) instead of keeping it, and its histograms, if
                any, to ``<to without .csv>.hist.csv`` (the columns of
                :meth:`histogram_history`). This transfers the statistics to the host (one
                synchronisation, like :meth:`stats`); each snapshot is one write, so memory
                stays flat however long the run. Read the file back with
                ``pandas.read_csv(to, dtype={"module": str})``.
            sync, process_group: under ``torch.distributed`` the snapshot holds all ranks'
                statistics together (a collective at each call; every rank must call it;
                with ``to`` only the group's rank 0 writes the combined rows);
                ``sync=False`` keeps this rank's (see the module docstring).
        """
        for key, value in tags.items():
            if key in _RESERVED_TAGS:
                raise ValueError(f"snapshot tag {key!r} clashes with a column of the history; "
                                 "rename it")
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise TypeError(f"snapshot tag {key!r}: tensors must have one element, got "
                                    f"shape {tuple(value.shape)}")
                tags[key] = _to_device(value.detach().clone(), self.history_device)
            elif isinstance(value, np.generic):
                tags[key] = value.item()  # a host value: plain Python for weights_only loads
            elif not (value is None or isinstance(value, (str, numbers.Number))):
                raise TypeError(f"snapshot tag {key!r} must be a scalar or string, got "
                                f"{type(value).__name__}")
        states, hists = self._states(sync, process_group, hist=True)
        dev = self.history_device
        entry: dict[str, Any] = {
            "tags": dict(tags),
            "state": {n: _to_device(t, dev) for n, t in states.items()},
            "hist": ({n: _to_device(t, dev) for n, t in hists.items()}
                     if hists is not None else None),
        }
        if to is not None:
            group = _dist.sync_group(sync, process_group)
            if group is None or _dist.rank(group) == 0:  # combined rows: written once
                self._spill(entry, Path(to))
            return
        self._history.append(entry)
        if self.max_history is not None and len(self._history) > self.max_history:
            drop = len(self._history) - self.max_history
            del self._history[:drop]
            if not self.dropped_snapshots:
                warnings.warn(
                    f"ActivationMonitor: more than max_history={self.max_history} snapshots; "
                    "the oldest are dropped from now on (count in monitor.dropped_snapshots); "
                    "use snapshot(..., to=path) to keep every snapshot on disk",
                    RuntimeWarning, stacklevel=2)
            self.dropped_snapshots += drop

    def _spill(self, entry: Mapping[str, Any], path: Path) -> None:
        """Append one snapshot's rows to ``path`` (and its histograms beside it)."""
        tag_names = list(entry["tags"])
        frames = [(path, _stats_frame([(entry["tags"], entry["state"])], tag_names=tag_names))]
        if entry["hist"] is not None:
            assert self.histogram is not None
            f = histogram_frame(_to_numpy(entry["hist"]), self.histogram)
            values = _tag_values(entry["tags"])
            for i, t in enumerate(tag_names):
                f.insert(i, t, values.get(t))
            stem = path.name[:-4] if path.name.endswith(".csv") else path.name
            frames.append((path.with_name(stem + ".hist.csv"), f))
        for target, frame in frames:
            _append_rows(frame, target, self._spill_columns)

    def history(self) -> pd.DataFrame:
        """All snapshots as one long tidy frame: the tags, ``module, unit`` and the statistics."""
        return _stats_frame([(e["tags"], e["state"]) for e in self._history],
                            tag_names=self._tag_names())

    def histogram_history(self, *, aggregate: bool = False) -> pd.DataFrame:
        """All snapshots' histograms: the tags, then the columns of :meth:`histograms`."""
        spec = self._require_histogram()
        frames = []
        tag_names = self._tag_names()
        for e in self._history:
            f = histogram_frame(_to_numpy(e["hist"]), spec, aggregate=aggregate)
            tags = _tag_values(e["tags"])
            for i, t in enumerate(tag_names):
                f.insert(i, t, tags.get(t))
            frames.append(f)
        if not frames:
            empty = histogram_frame({}, spec, aggregate=aggregate)
            for i, t in enumerate(tag_names):
                empty.insert(i, t, pd.Series(dtype=object))
            return empty
        return pd.concat(frames, ignore_index=True)

    def _tag_names(self) -> list[str]:
        names: dict[str, None] = {}
        for e in self._history:
            names.update(dict.fromkeys(e["tags"]))
        return list(names)

    def reset(self, *, history: bool = False) -> None:
        """Clear the running statistics (and the snapshots too with ``history=True``)."""
        self._acc.clear()
        self._shapes.clear()
        for d in self._dims.values():
            d.clear()
        if history:
            self._history.clear()
            self.dropped_snapshots = 0

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The running statistics, pending rows and history, for ``torch.save``.

        Restoring it with :meth:`load_state_dict` into a monitor of the same modules and
        histogram bins and feeding the same batches gives bit-identical statistics.
        """
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "histogram": self.histogram.to_dict() if self.histogram is not None else None,
            "modules": {n: self._acc[n].state_dict() for n in self._seen()},
            "dropped_snapshots": self.dropped_snapshots,
            "shapes": {n: list(self._shapes[n]) for n in self._seen()},
            "history": [
                {"tags": dict(e["tags"]),
                 "state": {n: t.clone() for n, t in e["state"].items()},
                 "hist": ({n: t.clone() for n, t in e["hist"].items()}
                          if e["hist"] is not None else None)}
                for e in self._history
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; tensors move to the activations' device lazily."""
        if state_dict.get("format") != _FORMAT:
            raise ValueError("not an ActivationMonitor state_dict (missing format marker "
                             f"{_FORMAT!r})")
        if state_dict.get("version") != _VERSION:
            raise ValueError(f"unsupported ActivationMonitor state_dict version "
                             f"{state_dict.get('version')!r} (expected {_VERSION})")
        spec = HistogramSpec.coerce(state_dict["histogram"]) if state_dict["histogram"] else None
        if spec != self.histogram:
            raise ValueError(f"state_dict was saved with histogram={spec}, this monitor has "
                             f"histogram={self.histogram}")
        modules = state_dict["modules"]
        for n in modules:
            if n not in self._modules:
                raise unknown_name_error("monitored module", n, list(self._modules))
        accs: dict[str, RunningStats] = {}
        for n, sd in modules.items():
            device = sd["state"].device
            acc = RunningStats(int(sd["units"]), device, compute_dtype=torch.float32,
                               histogram=self.histogram, scratch=self._scratch)
            acc.load_state_dict(sd)
            accs[n] = acc
        self.reset(history=True)
        self._acc.update(accs)
        self._shapes.update({n: tuple(s) for n, s in state_dict.get("shapes", {}).items()})
        self.dropped_snapshots = int(state_dict.get("dropped_snapshots", 0))
        for e in state_dict.get("history", []):
            self._history.append({
                "tags": dict(e["tags"]),
                "state": {n: t.clone() for n, t in e["state"].items()},
                "hist": ({n: t.clone() for n, t in e["hist"].items()}
                         if e.get("hist") is not None else None),
            })

    def __repr__(self) -> str:
        hist = f", histogram={self.histogram}" if self.histogram is not None else ""
        state = "attached" if self.active else "detached"
        return (f"ActivationMonitor({len(self._modules)} modules: "
                f"{', '.join(self._modules)}{hist}; {state})")


def _to_device(t: Tensor, device: torch.device | None) -> Tensor:
    return t if device is None else t.to(device)


def _append_rows(frame: pd.DataFrame, path: Path, known: dict[str, list[str]]) -> None:
    """Append ``frame``'s rows to the CSV ``path`` with one write (header if the file is new);
    its columns must equal the file's."""
    key = str(path.resolve()) if path.exists() else str(path.absolute())
    cols = list(frame.columns)
    new_file = not path.exists() or path.stat().st_size == 0
    if not new_file:
        have = known.get(key)
        if have is None:
            with open(path, encoding="utf-8") as fh:
                have = fh.readline().rstrip("\n").split(",")
        if have != cols:
            raise ValueError(
                f"snapshot(to={str(path)!r}): the file has columns {have}, this snapshot "
                f"{cols} (different tags or histogram settings); spill to a new file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = frame.to_csv(index=False, header=new_file)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as e:
        raise OSError(f"snapshot(to={str(path)!r}): cannot append to the file ({e}); pass a "
                      "writable path") from e
    known[str(path.resolve())] = cols


# -- conversion to pandas (the one host transfer) -----------------------------------------------
def _to_numpy(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Move several tensors to the host with one transfer per device."""
    if not tensors:
        return {}
    names = list(tensors)
    out: dict[str, np.ndarray] = {}
    by_device: dict[torch.device, list[str]] = {}
    for n in names:
        by_device.setdefault(tensors[n].device, []).append(n)
    for group in by_device.values():
        flat = torch.cat([tensors[n].reshape(-1) for n in group]).cpu().numpy()
        start = 0
        for n in group:
            t = tensors[n]
            out[n] = flat[start : start + t.numel()].reshape(tuple(t.shape))
            start += t.numel()
    return {n: out[n] for n in names}


def _tag_values(tags: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, Tensor) else v) for k, v in tags.items()}


def _stats_frame(entries: list[tuple[Mapping[str, Any], Mapping[str, Tensor]]],
                 tag_names: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Tidy frame from ``[(tags, {module: state})]``; one transfer per device for all states."""
    keyed = {f"{i}\x00{n}": st for i, (_, states) in enumerate(entries)
             for n, st in states.items()}
    if not keyed:
        return _empty_stats_frame(tag_names)
    # convert states to statistics on the device, then move everything at once
    stats = {k: torch.stack([v.to(torch.float64) for v in state_to_stats(st).values()])
             for k, st in keyed.items()}
    host = _to_numpy(stats)
    frames = []
    for i, (tags, states) in enumerate(entries):
        values = _tag_values(tags)
        for n in states:
            arr = host[f"{i}\x00{n}"]
            units = arr.shape[1]
            cols: dict[str, Any] = {t: values.get(t) for t in tag_names}
            cols["module"] = n
            cols["unit"] = np.arange(units)
            for j, c in enumerate(STAT_COLUMNS):
                col = arr[j]
                cols[c] = col.astype(np.int64) if c in _INT_COLUMNS else col
            frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)

