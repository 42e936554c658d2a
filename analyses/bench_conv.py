"""Benchmark of the conv-activations protocol: training images/s per arm, and the monitor's cost.

For each arm (ELU, SReLU, LReLU, ReLU, each with and without BN) the 11-layer net of
``biasshift reproduce conv-activations`` (width multiplier ``--width``, pooling as the input
size allows) takes SGD steps (momentum 0.9, L2 5e-4, mini-batch ``--batch``) on random inputs of
the given shape; the arms are timed in interleaved rounds (the machine is shared and noisy) and
the median over rounds is reported, as images/s and as a ratio to ReLU without BN. The monitor's
overhead is the same step with an :class:`~biasshift.ActivationMonitor` attached to every
activation module (channels as units), as a ratio to the plain step, per arm.

    python analyses/bench_conv.py --width 0.125 --size 28 --channels 1 --threads 1
    python analyses/bench_conv.py --device cuda --width 1 --size 32 --channels 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from biasshift import ActivationMonitor
from biasshift.models.conv import cifar_conv11, cifar_pooled_stacks, paired_he_init_
from biasshift.timing import synchronize as _sync

ACTS = ("elu", "srelu", "lrelu", "relu")


def time_steps(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
               monitor: bool) -> float:
    """Seconds per SGD step (median of ``steps`` timed after 2 warm-up steps)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    mon = ActivationMonitor(net) if monitor else None
    if mon is not None:
        mon.__enter__()
    try:
        times = []
        for i in range(steps + 2):
            _sync(x.device)
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(x.device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        if mon is not None:
            mon.stats()  # the one host transfer, outside the timing
    finally:
        if mon is not None:
            mon.__exit__(None, None, None)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=g).to(dev)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(dev)
    pools = cifar_pooled_stacks(args.size)
    arms = [(a, bn) for a in ACTS for bn in (False, True)]
    nets = {arm: paired_he_init_(cifar_conv11(arm[0], num_classes=args.classes, batch_norm=arm[1],
                                              in_channels=args.channels, width=args.width,
                                              pooled_stacks=pools), 0).to(dev) for arm in arms}
    plain: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}
    mon: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm in arms:
            plain[arm].append(time_steps(nets[arm], x, y, args.steps, monitor=False))
            mon[arm].append(time_steps(nets[arm], x, y, args.steps, monitor=True))
    ref = statistics.median(plain[("relu", False)])
    rows = []
    for arm in arms:
        p, m = statistics.median(plain[arm]), statistics.median(mon[arm])
        rows.append({"arm": arm[0] + ("+bn" if arm[1] else ""),
                     "images_per_s": args.batch / p, "step_ms": 1000 * p,
                     "time_vs_relu": p / ref, "monitor_overhead": m / p})
    print(f"device {dev}, threads {args.threads}, width x{args.width:g}, input "
          f"{args.channels}x{args.size}x{args.size}, pooled stacks {pools}, batch {args.batch}, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'arm':10s} {'images/s':>9s} {'step ms':>8s} {'vs ReLU':>8s} {'monitor':>8s}")
    for r in rows:
        print(f"{r['arm']:10s} {r['images_per_s']:9.0f} {r['step_ms']:8.1f} "
              f"{r['time_vs_relu']:8.2f} {r['monitor_overhead']:8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
