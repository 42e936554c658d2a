"""Workers of tests/test_distributed.py: each runs in one of 2 gloo processes (spawned).

Every scenario builds the same model and the same global data on every rank (fixed seeds),
takes its rank's shard (uneven on purpose), and saves what it measured to
``<out>/<scenario>.<rank>.pt``; the test compares those with single-process references over
the union of the shards, computed in the parent process by the ``reference_*`` functions.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2


def model(seed: int = 0) -> nn.Module:
    """A small conv + MLP net in float64 (conv units: channels; MLP units: features)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ELU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 7), nn.ReLU(),
        nn.Linear(7, 4),
    ).double()


def batches(nan: bool = True) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per rank a list of (inputs, targets) batches: rank 0 three batches of 5, 3, 4 samples,
    rank 1 two of 6 and 1; with ``nan``, one input of rank 1 holds a NaN."""
    g = torch.Generator().manual_seed(1)
    sizes = [[5, 3, 4], [6, 1]]
    out = []
    for r, ss in enumerate(sizes):
        shard = []
        for s in ss:
            x = torch.randn(s, 1, 6, 6, generator=g, dtype=torch.float64) + 0.5
            y = torch.randint(0, 4, (s,), generator=g)
            shard.append((x, y))
        if nan and r == 1:
            shard[0][0][2, 0, 1, 1] = float("nan")
        out.append(shard)
    return out


def probe_shards() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(9, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)]


# -- what each scenario measures (run on a rank, or on one process for the references) ------------
def measure_monitor(shards: list[list[tuple[torch.Tensor, torch.Tensor]]], *, sync: Any,
                    probe: list[torch.Tensor]) -> dict[str, Any]:
    from biasshift import ActivationMonitor, probe_statistics

    net = model()
    wrapped = net
    if dist.is_initialized() and sync is not False:
        wrapped = nn.parallel.DistributedDataParallel(net)  # names with a `module.` prefix
    mon = ActivationMonitor(wrapped, histogram=dict(bins=8, range=(-2.0, 2.0)))
    with mon:
        for shard in shards:
            for x, _ in shard:
                with torch.no_grad():
                    net(x)
    kw = {} if sync is None else {"sync": sync}
    mon.snapshot(epoch=0, **kw)
    spill = os.environ.get("BIASSHIFT_TEST_SPILL", "") if dist.is_initialized() else ""
    if spill:  # the combined rows, written by rank 0 only
        mon.snapshot(epoch=0, to=f"{spill}.{sync}.{dist.get_rank()}.csv", **kw)
    ps = probe_statistics(wrapped, torch.cat(probe), ["1", "module.4"], **kw)
    means_only = probe_statistics(wrapped, torch.cat(probe), ["1", "module.4"], medians=False,
                                  **kw)
    return {
        "probe_means_only": means_only.to_frame(),
        "stats": mon.stats(**kw),
        "hist": mon.histograms(**kw),
        "history": mon.history(),
        "probe": ps.to_frame(),
    }


def measure_fisher(shards: list[list[tuple[torch.Tensor, torch.Tensor]]], *, sync: Any,
                   dense_budget: int = 4 * 2**30) -> dict[str, Any]:
    """UnitFisher of the conv (folded into dense sums with the default budget) and linear
    (factors) layers, every reader."""
    from biasshift import UnitFisher

    net = model()
    uf = UnitFisher(net, fisher="exact", dense_budget=dense_budget)
    for shard in shards:
        for x, y in shard:
            uf.accumulate(x, y)
    kw = {} if sync is None else {"sync": sync}
    out: dict[str, Any] = {"dense": {n: st.is_dense for n, st in uf._stores.items()}}
    for n in uf.layers:
        out[f"matrix/{n}"] = uf.matrix(n, **kw)
        out[f"pairs/{n}"] = uf.matrix(n, positions="pairs", **kw)
        out[f"gradient/{n}"] = uf.gradient(n, **kw)
        out[f"E_p_a/{n}"] = uf.moments(n, **kw).E_p_a
        out[f"blocks/{n}"] = torch.cat([b for _, b in uf.blocks(n, **kw)])
        out[f"ng/{n}"] = uf.natural_gradient(n, damping=1e-3, **kw)
    out["report"] = uf.report(damping=1e-3, **kw)
    return out


def measure_probe(probe: list[torch.Tensor], *, sync: Any) -> dict[str, Any]:
    """One SGD step measured by a BiasShiftProbe on ``probe`` (the same gradient and step on
    every rank: the loss of one fixed batch)."""
    from biasshift import BiasShiftProbe

    net = model()
    x = torch.cat(probe)
    kw = {} if sync is None else {"sync": sync}
    bsp = BiasShiftProbe(net, x, torch.zeros(x.shape[0], dtype=torch.long), fisher="exact",
                         damping=1e-3, **kw)
    xb, yb = batches(nan=False)[0][0]
    nn.functional.cross_entropy(net(xb), yb).backward()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with bsp.measure() as m:
        opt.step()
    return {"frame": m.frame()}


def measure_optimizer(shards: list[list[tuple[torch.Tensor, torch.Tensor]]], *,
                      sync: Any) -> dict[str, Any]:
    """Three UnitNaturalGradient steps on the mean loss of the union of the ranks' batches
    (rank ``r``: ``shards[r][t]`` at step ``t``; the gradients are combined by hand, with the
    ranks' sample counts as weights, so that they are those of the union)."""
    from biasshift import UnitNaturalGradient

    net = model()
    opt = UnitNaturalGradient(net, lr=0.05, update_every=1, inverse_every=1, sync=sync)
    for t in range(len(shards[0])):
        opt.zero_grad()
        x = torch.cat([s[t][0] for s in shards])
        y = torch.cat([s[t][1] for s in shards])
        nn.functional.cross_entropy(net(x), y).backward()
        if dist.is_initialized():
            n_tot = torch.tensor([float(x.shape[0])], dtype=torch.float64)
            dist.all_reduce(n_tot)
            for p in net.parameters():
                assert p.grad is not None
                p.grad.mul_(x.shape[0])
                dist.all_reduce(p.grad)
                p.grad.div_(n_tot)
        opt.step()
    return {"params": [p.detach().clone() for p in net.parameters()],
            "fisher": {n: opt.fisher(n) for n in opt.layers}}


def optimizer_shards() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Rank 0: 3 batches of 5 samples, rank 1: 3 batches of 3 (constant per rank)."""
    g = torch.Generator().manual_seed(3)
    return [[(torch.randn(s, 1, 6, 6, generator=g, dtype=torch.float64),
              torch.randint(0, 4, (s,), generator=g)) for _ in range(3)] for s in (5, 3)]


def run_scenario(name: str) -> dict[str, Any]:
    r = dist.get_rank()
    parts = batches()
    probe = probe_shards()
    if name == "monitor":
        return measure_monitor([parts[r]], sync=None, probe=[probe[r]])
    if name == "monitor_local":
        return measure_monitor([parts[r]], sync=False, probe=[probe[r]])
    if name == "fisher":
        return measure_fisher([batches(nan=False)[r]], sync=None)
    if name == "fisher_factors":
        return measure_fisher([batches(nan=False)[r]], sync=None, dense_budget=0)
    if name == "fisher_local":
        return measure_fisher([batches(nan=False)[r]], sync=False)
    if name == "fisher_nan":
        from biasshift import UnitFisher

        uf = UnitFisher(model(), fisher="empirical")
        for x, y in parts[r]:
            uf.accumulate(x, y)
        errors = []
        for sync in (None, False):
            try:
                uf.report(damping=1e-3, sync=sync)
                errors.append(None)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        return {"errors": errors}
    if name == "probe":
        return measure_probe([probe[r]], sync=None)
    if name == "probe_local":
        return measure_probe([probe[r]], sync=False)
    if name == "optimizer":
        return measure_optimizer([optimizer_shards()[r]], sync=None)
    if name == "optimizer_local":
        return measure_optimizer([optimizer_shards()[r]], sync=False)
    if name == "monitor_empty_rank":  # rank 1 sees no batch at all
        return measure_monitor([parts[r] if r == 0 else []], sync=None, probe=[probe[r]])
    if name == "fisher_cache":
        from biasshift import UnitFisher
        from biasshift.distributed import record_traffic

        ok = batches(nan=False)
        uf = UnitFisher(model(), fisher="empirical")
        for x, y in ok[r]:
            uf.accumulate(x, y)
        first = uf.report(damping=1e-3)
        with record_traffic() as t:  # nothing changed anywhere: the cached combination
            again = uf.report(damping=1e-3)
        if r == 1:  # only rank 1 accumulates more: both ranks must combine afresh
            uf.accumulate(*ok[0][0])
        third = uf.report(damping=1e-3)
        return {"first": first, "again": again, "cached_bytes": t.bytes, "third": third}
    if name == "traffic":
        from biasshift import ActivationMonitor
        from biasshift.distributed import record_traffic

        net = model()
        mon = ActivationMonitor(net)
        with mon, torch.no_grad():
            for x, _ in parts[r]:
                net(x)
        with record_traffic() as t:
            mon.stats()
        return {"bytes": t.bytes, "calls": t.calls}
    raise KeyError(name)


def worker(rank: int, out: str, scenarios: list[str], init: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name in scenarios:
            os.environ["BIASSHIFT_TEST_SPILL"] = str(Path(out) / f"spill-{name}")
            try:
                res: Any = run_scenario(name)
            except Exception:  # the test shows the rank's traceback
                res = {"error": traceback.format_exc()}
            torch.save(res, Path(out) / f"{name}.{rank}.pt")
    finally:
        dist.destroy_process_group()
