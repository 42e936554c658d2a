r"""Read-time synchronisation of biasshift's statistics under ``torch.distributed``.

Under data parallelism (``torchrun`` + :class:`~torch.nn.parallel.DistributedDataParallel`) each
rank sees a shard of the data, so a monitor that only reads its own rank reports that shard's
median, mean or Fisher, not the model's. Following torchmetrics' ``sync_on_compute``
convention, every *reader* of biasshift's statistics (``ActivationMonitor.stats()`` /
``snapshot()`` / ``histograms()``, :func:`~biasshift.monitor.probe.probe_statistics`,
``UnitFisher.matrix()`` / ``report()`` / ..., ``BiasShiftProbe`` measurements and
``UnitNaturalGradient``'s Fisher refresh) combines all ranks' samples when
``torch.distributed`` is initialised, and returns the same numbers on every rank:

* running moments (the ``(9, units)`` states of :mod:`biasshift.monitor.running`) are
  all-gathered and merged in rank order with the **same** Chan, Golub & LeVeque merge that
  combines batches, so the result equals the single-process statistic of the union of the
  shards to float64 rounding (the merge is exact for counts, min and max);
* counts, histograms and Fisher sums are all-reduced (sums are exact for integers);
* exact medians gather every value (padded with NaN, which the median leaves out).

``sync=False`` on any reader gives the rank's own statistics; ``process_group=`` reduces over a
sub-group. The hooks never communicate: the collectives run only when statistics are read
(or when the optimiser refreshes its factors). Every rank of the group must call the same
readers in the same order (as for any collective).

Devices: the collectives run on the backend's device: CUDA tensors for ``nccl``, CPU tensors
for ``gloo`` (tensors are moved there and back). Metadata (module lists, factor shapes) is
exchanged with small integer all-reduces or, for the Fisher's factor shapes, with
:func:`torch.distributed.all_gather_object`.

Cost (payload bytes each rank sends per read; :func:`record_traffic` measures them)
    With ``U`` units, ``M`` modules or layers, ``n1`` inputs per unit (bias included), ``P``
    probe rows and ``b`` bytes per number of the statistics' dtype:

    * ``ActivationMonitor.stats()`` / ``snapshot()``: ``72 U + 16 M`` (the float64 states and
      the unit counts), ``+ 8 U (bins + 2)`` with histograms (``histograms()`` alone sends the
      same). Tested exactly in ``tests/test_distributed.py``.
    * ``probe_statistics``: ``16 M + 8 (2 U + M)`` (checks, float64 sums and counts) and, with
      medians, every value: ``4 P U`` for float32 activations (``P`` of the largest rank).
    * ``UnitFisher``: a read after some rank accumulated sends ``b (g n1 + U (2 n1 + 1))`` per
      layer (the running sums), a few int64 counters, and the blocks: the dense sums
      ``b U n1²`` (twice for conv layers) or, while all ranks' factors together are smaller,
      the factors (the rows each rank stores). Later reads with nothing changed: 8 bytes.
    * ``BiasShiftProbe.measure()``: per layer the probe rows and weights ``b P (g n1 + U)`` and
      ``16 (U + 1)`` for the mean net inputs.
    * ``UnitNaturalGradient``: ``b U (n1² + 1)`` per refreshed layer.

    An all-gather *receives* ``world_size`` times the bytes it sends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Traffic",
    "all_gather",
    "all_gather_rows",
    "all_reduce",
    "check_same",
    "gather_object",
    "is_initialized",
    "merge_running_states",
    "rank",
    "record_traffic",
    "sync_group",
    "unwrap_model",
    "world_size",
]


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def sync_group(sync: bool | None = None, process_group: Any = None) -> Any:
    """The process group a reader combines over, or ``None`` for local statistics.

    ``sync=None`` (the readers' default) and ``sync=True`` combine over ``process_group``
    (default: the whole world) when ``torch.distributed`` is initialised and the group has more
    than one rank; ``sync=False`` never combines. Without an initialised default group every
    setting gives local statistics (a single process is its own world).
    """
    if sync is not None and not isinstance(sync, bool):
        raise TypeError(f"sync must be None, True or False, got {sync!r}")
    if sync is False or not is_initialized():
        if process_group is not None and sync is not False and not is_initialized():
            raise RuntimeError("process_group= was given but torch.distributed is not "
                               "initialised; call torch.distributed.init_process_group first")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def world_size(group: Any = None) -> int:
    """The number of ranks of ``group`` (1 without ``torch.distributed``)."""
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without ``torch.distributed``)."""
    return dist.get_rank(group) if is_initialized() else 0


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else
    ``model``), so that names lose the wrapper's ``module.`` prefix and biasshift's own forward
    passes do not go through DDP's gradient reducer."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


# -- traffic accounting -------------------------------------------------------------------------
@dataclass
class Traffic:
    """Payload bytes this rank sent in collectives (and how many calls), while recording."""

    bytes: int = 0
    calls: int = 0


_recorders: list[Traffic] = []


@contextlib.contextmanager
def record_traffic() -> Iterator[Traffic]:
    """Count the payload bytes this rank sends in biasshift's collectives inside the block.

    >>> with record_traffic() as t:          # doctest: +SKIP
    ...     monitor.stats()
    >>> t.bytes, t.calls
    """
    t = Traffic()
    _recorders.append(t)
    try:
        yield t
    finally:
        _recorders.remove(t)


def _count(nbytes: int) -> None:
    for t in _recorders:
        t.bytes += int(nbytes)
        t.calls += 1


# -- collectives --------------------------------------------------------------------------------
def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(t: Tensor, group: Any, op: str = "sum") -> Tensor:
    """A new tensor: ``t`` reduced (``"sum"``, ``"max"``, ``"min"``) over ``group``, on ``t``'s
    device; ``t`` is unchanged."""
    dev = _comm_device(group)
    work = t.detach().to(dev, copy=True).contiguous()
    _count(work.numel() * work.element_size())
    dist.all_reduce(work, op=_OPS[op], group=group)
    return work.to(t.device)


def all_gather(t: Tensor, group: Any) -> list[Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in rank order, on ``t``'s
    device."""
    dev = _comm_device(group)
    work = t.detach().to(dev).contiguous()
    out = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    _count(work.numel() * work.element_size())
    dist.all_gather(out, work, group=group)
    return [o.to(t.device) for o in out]


def all_gather_rows(t: Tensor, group: Any, fill: float = 0.0) -> list[Tensor]:
    """Every rank's ``t``, whose dim-0 size may differ between ranks (other dims and the dtype
    must agree), in rank order. Two collectives: the sizes, then the rows padded to the
    largest rank's with ``fill`` (the padding is cut off again)."""
    sizes = all_gather(torch.tensor([t.shape[0]], dtype=torch.int64), group)
    rows = [int(s) for s in torch.cat(sizes).tolist()]
    top = max(rows)
    if t.shape[0] < top:
        pad = torch.full((top - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        t = torch.cat([t, pad])
    parts = all_gather(t, group)
    return [p[:r] for p, r in zip(parts, rows)]


def gather_object(obj: Any, group: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (small metadata only), in rank order."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_same(values: Sequence[int], group: Any, what: str) -> None:
    """Raise the same :class:`ValueError` on every rank unless ``values`` agree across ranks."""
    t = torch.tensor(list(values), dtype=torch.int64)
    hi = all_reduce(t, group, "max")
    lo = all_reduce(t, group, "min")
    if not torch.equal(hi, lo):
        raise ValueError(f"{what} differ between the ranks (min {lo.tolist()}, max "
                         f"{hi.tolist()}); every rank must use the same model and settings")


def merge_running_states(
    names: Sequence[str],
    states: dict[str, Tensor],
    hists: dict[str, Tensor] | None,
    group: Any,
    hist_slots: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """All ranks' running states (``(9, units)``, :mod:`biasshift.monitor.running`) merged.

    ``names`` lists every module that any rank may have (the same list on every rank, e.g. the
    monitored modules); ``states`` holds the ones this rank has seen. Returns, on every rank,
    the states of the modules seen by some rank, each the Chan merge of the ranks' states in
    rank order, and the summed histogram counts (``(units, hist_slots)`` int64 each). Three
    collectives: one all-reduce of the unit counts, one all-gather of the concatenated states
    and one all-reduce of the histograms.
    """
    from biasshift.monitor.running import empty_state, merge_states

    units = [int(states[n].shape[1]) if n in states else 0 for n in names]
    t = torch.tensor(units + [-u if u else -(2**62) for u in units], dtype=torch.int64)
    hi = all_reduce(t, group, "max").tolist()
    top, low = hi[: len(names)], [-v for v in hi[len(names):]]
    for n, u, a, b in zip(names, units, top, low):
        if a and (b != a or (u and u != a)):
            raise ValueError(f"module {n!r} has different unit counts on different ranks "
                             f"({b} and {a}); every rank must run the same model")
    seen = [n for n, u in zip(names, top) if u]
    if not seen:
        return {}, ({} if hists is not None else None)
    device = next(iter(states.values())).device if states else torch.device("cpu")
    local = [states[n].to(device) if n in states else empty_state(u, device)
             for n, u in zip(names, top) if u]
    sizes = [s.shape[1] for s in local]
    gathered = all_gather(torch.cat(local, dim=1), group)
    merged: dict[str, Tensor] = {}
    for i, n in enumerate(seen):
        lo = sum(sizes[:i])
        parts = [g[:, lo: lo + sizes[i]] for g in gathered]
        acc = parts[0].clone()
        for p in parts[1:]:
            acc = merge_states(acc, p)
        merged[n] = acc
    out_hist: dict[str, Tensor] | None = None
    if hists is not None:
        slots = hist_slots
        flat = torch.cat([hists[n].to(device).reshape(-1) if n in hists else
                          torch.zeros(u * slots, dtype=torch.int64, device=device)
                          for n, u in zip(names, top) if u])
        total = all_reduce(flat, group, "sum")
        out_hist, start = {}, 0
        for n, u in zip(seen, sizes):
            out_hist[n] = total[start: start + u * slots].view(u, slots)
            start += u * slots
    return merged, out_hist
