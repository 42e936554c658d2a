"""Benchmark: UnitNaturalGradient's training step against plain SGD on the paper's 8x128 MLP.

The model is :func:`biasshift.models.paper_mlp` (784-128x8-10, ELU) on random MNIST-shaped data
(batch 64, 1x28x28, 10 classes).  A *training step* is what a user's loop pays: forward,
``zero_grad``, backward (with the optimiser's hooks) and ``step``.  Settings (each its own copy
of the model, same initial weights):

* ``sgd`` — ``torch.optim.SGD(lr)``;
* ``ung u=U i=I`` — ``UnitNaturalGradient(update_every=U, inverse_every=I)``; ``u=1 i=20`` are the
  defaults.

The settings run interleaved (round-robin, ``--steps`` steps each per round, ``--rounds``
rounds), so that machine load hits all of them alike.  Per setting: the median step time (a step
without a refresh of the factors) and the mean step time over all steps (refreshes amortised; the
step counter runs on across rounds, so every ``inverse_every`` steps one refresh is included), each
also as a ratio to SGD's.  Then a breakdown of one UnitNaturalGradient step (default settings):
the EMA update of every layer, one refresh of every layer's factors, and the application of
Theorem 1 to every layer's gradient.

    python analyses/bench_optim.py                  # CPU, 1 thread (about 3 minutes)
    python analyses/bench_optim.py --quick          # fewer steps
    python analyses/bench_optim.py --device cuda --out runs/bench_optim_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from biasshift.models import paper_mlp
from biasshift.optim import UnitNaturalGradient

SETTINGS = [
    ("sgd", None),
    ("ung u=1 i=20", dict(update_every=1, inverse_every=20)),
    ("ung u=1 i=100", dict(update_every=1, inverse_every=100)),
    ("ung u=5 i=50", dict(update_every=5, inverse_every=50)),
    ("ung u=20 i=100", dict(update_every=20, inverse_every=100)),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(kw: dict | None, device: torch.device, lr: float, damping: float):
    torch.manual_seed(0)
    model = paper_mlp("elu").to(device)
    if kw is None:
        return model, torch.optim.SGD(model.parameters(), lr=lr)
    return model, UnitNaturalGradient(model, lr=lr, damping=damping, ema=0.95, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per setting and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 10 steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 10, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    n_batches = 8
    xs = torch.rand(n_batches, args.batch, 1, 28, 28, generator=g).to(device)
    ys = torch.randint(0, 10, (n_batches, args.batch), generator=g).to(device)
    runs = {name: build(kw, device, args.lr, args.damping) for name, kw in SETTINGS}
    times: dict[str, list[float]] = {name: [] for name in runs}
    counters = dict.fromkeys(runs, 0)

    def one_step(name: str) -> float:
        model, opt = runs[name]
        i = counters[name] % n_batches
        counters[name] += 1
        sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t0

    for name in runs:  # warm-up: kernels, lazy allocation, the first refresh
        for _ in range(2):
            one_step(name)
    for _ in range(args.rounds):
        for name in runs:
            times[name].extend(one_step(name) for _ in range(args.steps))

    base_med = statistics.median(times["sgd"])
    base_mean = statistics.fmean(times["sgd"])
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps per setting (interleaved)")
    print(f"{'setting':16s} {'median ms':>10s} {'x SGD':>7s} {'mean ms':>10s} {'x SGD':>7s}")
    results = {}
    for name, ts in times.items():
        med, mean = statistics.median(ts), statistics.fmean(ts)
        results[name] = dict(median_s=med, mean_s=mean, median_ratio=med / base_med,
                             mean_ratio=mean / base_mean, steps=len(ts))
        print(f"{name:16s} {med * 1e3:10.2f} {med / base_med:7.1f} {mean * 1e3:10.2f} "
              f"{mean / base_mean:7.1f}")

    # breakdown of the default optimiser's work per layer kind
    model, opt = runs["ung u=1 i=20"]
    assert isinstance(opt, UnitNaturalGradient)
    loss = F.cross_entropy(model(xs[0]), ys[0])
    opt.zero_grad()
    loss.backward()
    sync(device)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    for layer in opt._layers:
        layer.running.update(opt.ema)
    sync(device)
    t_update = time.perf_counter() - t0
    t0 = time.perf_counter()
    for layer in opt._layers:
        opt._refresh(layer)
    sync(device)
    t_refresh = time.perf_counter() - t0
    lrs = {id(p): 0.0 for p in model.parameters()}  # lr 0: apply without moving
    t0 = time.perf_counter()
    for layer in opt._layers:
        opt._apply(layer, lrs)
    sync(device)
    t_apply = time.perf_counter() - t0
    breakdown = dict(update_s=t_update, refresh_s=t_refresh, apply_s=t_apply)
    print(f"default step breakdown: EMA update {t_update * 1e3:.1f} ms, refresh of the factors "
          f"{t_refresh * 1e3:.1f} ms (once per inverse_every steps), Theorem 1 applied "
          f"{t_apply * 1e3:.1f} ms; SGD step (fwd+bwd+step) {base_med * 1e3:.2f} ms")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            device=str(device), threads=torch.get_num_threads(), batch=args.batch,
            rounds=args.rounds, steps=args.steps, lr=args.lr, damping=args.damping,
            results=results, breakdown=breakdown,
            torch=torch.__version__,
        ), indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
