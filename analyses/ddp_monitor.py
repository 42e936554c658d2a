"""The CIFAR 11-layer net trained with DistributedDataParallel, monitored on every rank.

    torchrun --nproc-per-node 2 analyses/ddp_monitor.py                 # CPU: gloo, ~1 minute
    torchrun --nproc-per-node 2 analyses/ddp_monitor.py --dataset fashion-mnist --width 1
    python analyses/ddp_monitor.py                                      # one process works too

Every rank trains on its own shard of the data (``rank::world_size``) with the paper's 11-layer
CIFAR network (:func:`biasshift.models.conv.cifar_conv11`'s stacks, widths scaled by
``--width``; 10 classes, 1 input channel: Fashion-MNIST padded to 32x32, or synthetic images
with class-dependent means), an :class:`~biasshift.ActivationMonitor` (per-unit statistics and
histograms of every activation) and a :class:`~biasshift.BiasShiftProbe` (the bias shift and
the gradient / natural-gradient cosines of the SGD step, on the 1x1-map layers ``stack6.conv1``
and the logits convolution ``stack7.conv1``) attached to the DDP-wrapped model. Every
``--snapshot-every`` steps the monitor's snapshot (its statistics since the first step),
and every ``--probe-every`` steps the probe's
measurement, hold **all ranks' samples together** (read-time collectives of
:mod:`biasshift.distributed`; the hooks never communicate); at the end the exact probe
statistics (``probe_statistics``, exact medians over every rank's probe shard) are taken.

Rank 0 publishes, as the analyses do (:func:`biasshift.io.publish_result_set`), into ``--out``
(default ``figures/quick/``):

* ``ddp-monitor.csv``: the monitor's history, ``step, module, unit`` and the statistics;
* ``ddp-monitor.probe.csv``: the probe's measurements, ``step, layer, unit, quantity, value``;
* ``ddp-monitor.exact.csv``: the exact probe statistics, ``module, unit, mean, median, ...``;
* ``ddp-monitor.png``/``.pdf``: the median over units of the unit means per layer, and the
  median cosine of each tracked layer, against the step;
* ``ddp-monitor.json``: provenance, the settings, the world size and backend, the bytes each
  rank sent per synchronisation (measured with :func:`biasshift.distributed.record_traffic`),
  the time of a combined ``monitor.stats()`` against a local one (median of 5) and whether
  every rank got the same statistics (compared with an all-gather).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from biasshift import ActivationMonitor, BiasShiftProbe, probe_statistics
from biasshift.distributed import record_traffic
from biasshift.io import provenance, publish_result_set
from biasshift.models.conv import CIFAR11_DROPOUT, CIFAR11_STACKS, _cifar_net

NAME = "ddp-monitor"
PROBE_LAYERS = ["stack6.conv1", "stack7.conv1"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("synthetic", "fashion-mnist"), default="synthetic")
    p.add_argument("--data-dir", default=os.environ.get("BIASSHIFT_DATA"))
    p.add_argument("--activation", default="elu")
    p.add_argument("--width", type=float, default=0.25,
                   help="scale of every stack's width (1: the paper's 192..300 units)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--probe-size", type=int, default=32, help="probe samples per rank")
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--snapshot-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="figures/quick")
    return p.parse_args(argv)


def network(activation: str, width: float) -> nn.Module:
    """The 11-layer CIFAR net for 1-channel 32x32 inputs and 10 classes, stacks scaled."""
    stacks = tuple(tuple((n, max(1, round(u * width)), k) for n, u, k in stack)
                   for stack in CIFAR11_STACKS)
    return _cifar_net(stacks, CIFAR11_DROPOUT, "cifar_conv11", activation, 10, False, True, 1, {})


def data(args: argparse.Namespace, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images ``(n, 1, 32, 32)`` and labels, the same on every rank."""
    if args.dataset == "fashion-mnist":
        from biasshift.data import load_dataset

        ds = load_dataset("fashion-mnist", args.data_dir)
        x = F.pad(ds.train_x[:n].float(), (2, 2, 2, 2))  # 28x28 -> 32x32
        return (x - 0.2860) / 0.3530, ds.train_y[:n]
    g = torch.Generator().manual_seed(1234)
    y = torch.randint(0, 10, (n,), generator=g)
    centres = torch.randn(10, 1, 32, 32, generator=g)
    return centres[y] + torch.randn(n, 1, 32, 32, generator=g), y


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    distributed = dist.is_torchelastic_launched()  # started by torchrun
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    t0 = time.perf_counter()
    per_rank = args.steps * args.batch_size
    x, y = data(args, world * (per_rank + args.probe_size))
    shard = slice(rank, None, world)  # DistributedSampler's interleaving
    xs, ys = x[shard].to(device), y[shard].to(device)
    train_x, train_y = xs[:per_rank], ys[:per_rank]
    probe_x, probe_y = xs[per_rank:], ys[per_rank:]

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP checks)
    net = network(args.activation, args.width).to(device)
    model = nn.parallel.DistributedDataParallel(net) if distributed else net
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    monitor = ActivationMonitor(model, histogram=dict(bins=32, range=(-2.0, 4.0)))
    probe = BiasShiftProbe(model, probe_x, probe_y, fisher="exact", damping=1e-3,
                           layers=PROBE_LAYERS)

    measurements: list[pd.DataFrame] = []
    traffic: dict[str, int] = {}
    with monitor:
        for step in range(args.steps):
            sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
            model.train()
            loss = F.cross_entropy(model(train_x[sl]), train_y[sl])
            opt.zero_grad()
            loss.backward()
            if step % args.probe_every == 0:
                monitor.detach()  # the probe's passes are not training samples
                with record_traffic() as t, probe.measure() as m:
                    opt.step()
                monitor.attach()
                traffic["probe_measure"] = t.bytes
                frame = m.frame()
                frame.insert(0, "step", step + 1)
                measurements.append(frame)
            else:
                opt.step()
            if (step + 1) % args.snapshot_every == 0 or step + 1 == args.steps:
                with record_traffic() as t:
                    monitor.snapshot(step=step + 1)
                traffic["monitor_snapshot"] = t.bytes
    with record_traffic() as t:
        exact = probe_statistics(model, probe_x)
    traffic["probe_statistics"] = t.bytes

    # the cost of a combined read against a local one (median of 5 each, this run)
    timings: dict[str, float] = {}
    for key, kw in (("stats_synced_s", {}), ("stats_local_s", {"sync": False})):
        times = []
        for _ in range(5):
            t1 = time.perf_counter()
            monitor.stats(**kw)
            times.append(time.perf_counter() - t1)
        timings[key] = float(np.median(times))
    history = monitor.history()
    agree = True
    if distributed:  # every rank must hold the same statistics
        mine = torch.tensor(history[["mean", "var", "min", "max"]].to_numpy(np.float64))
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        agree = all(torch.equal(p.nan_to_num(0.0), parts[0].nan_to_num(0.0)) for p in parts)
    if rank == 0:
        probe_frame = pd.concat(measurements, ignore_index=True)
        publish(args, history, probe_frame, exact.to_frame(), world, traffic, agree,
                time.perf_counter() - t0, timings)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def publish(args: argparse.Namespace, history: pd.DataFrame, probe: pd.DataFrame,
            exact: pd.DataFrame, world: int, traffic: dict[str, int], agree: bool,
            wall: float, timings: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    acts = history[history["module"].str.contains("act")]
    med = acts.groupby(["module", "step"], sort=False)["mean"].median().reset_index()
    for module, df in med.groupby("module", sort=False):
        ax1.plot(df["step"], df["mean"], marker="o", label=module)
    ax1.set(xlabel="step", ylabel="median over units of the unit mean",
            title=f"{args.activation} units, {world} ranks")
    ax1.legend(fontsize=6, ncol=2)
    cos = probe[probe["quantity"] == "cos_grad_ng"]
    for layer, df in cos.groupby("layer", sort=False):
        m = df.groupby("step")["value"].median()
        ax2.plot(m.index, m.to_numpy(), marker="o", label=layer)
    ax2.set(xlabel="step", ylabel="median cos(grad, natural grad)", title="BiasShiftProbe")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    record: dict[str, Any] = provenance(
        analysis=NAME, command=" ".join(["torchrun", *sys.argv]),
        description="CIFAR 11-layer net under DDP with the monitor and the bias-shift probe",
        settings=vars(args), world_size=world,
        backend=dist.get_backend() if dist.is_initialized() else None,
        bytes_per_sync=traffic, ranks_agree=agree, wall_time_s=round(wall, 3),
        read_seconds=timings,
        outputs={k: f"{NAME}.{k}" for k in ("csv", "probe.csv", "exact.csv", "png", "pdf")},
    )
    writers = {
        "csv": lambda p: history.to_csv(p, index=False),
        "probe.csv": lambda p: probe.to_csv(p, index=False),
        "exact.csv": lambda p: exact.to_csv(p, index=False),
        "png": lambda p: fig.savefig(p, format="png", dpi=120),
        "pdf": lambda p: fig.savefig(p, format="pdf"),
    }
    paths = publish_result_set(Path(args.out) / NAME, writers, record)
    plt.close(fig)
    ratio = timings["stats_synced_s"] / timings["stats_local_s"]
    print(f"{NAME}: {world} rank(s), {args.steps} steps in {wall:.1f} s; ranks agree: {agree}; "
          f"bytes per sync {traffic}; monitor.stats() synced/local {ratio:.2f}x; wrote "
          f"{paths['json'].with_suffix('')}.{{csv,probe.csv,exact.csv,png,pdf,json}}")


if __name__ == "__main__":
    sys.exit(main())
