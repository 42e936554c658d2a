"""Speed of the trainer on the paper's Fig. 2 setting: 8x128 MLP, MNIST, SGD, batch 64.

Measures, on ``--threads`` torch threads (default 1):

* the training loop's steps per second (``Trainer._train_epoch`` over ``--steps`` mini-batches),
  next to a bare PyTorch loop doing the same work (the trainer's overhead);
* one epoch's evaluation (full train + test loss/accuracy) and probe (10,000 samples: means,
  and means + exact medians);
* the projected wall time of one 300-epoch run.

    python analyses/bench_trainer.py --data-dir ../shared/data [--device cuda] [--steps 400]

Prints a small table and, with ``--json PATH``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from biasshift.data import load_dataset
from biasshift.models import paper_mlp
from biasshift.timing import synchronize as _sync
from biasshift.train import Trainer


def bare_loop(ds, device: torch.device, steps: int, act: str) -> float:
    """Seconds per step of a minimal loop: gather, forward, backward, SGD step."""
    torch.manual_seed(0)
    model = paper_mlp(act).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs, ys = ds.train_x, ds.train_y
    perm = torch.randperm(xs.shape[0]).to(device)

    def run(n: int) -> None:
        for i in range(n):
            idx = perm[i * 64 : (i + 1) * 64]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(20)
    _sync(device)
    t0 = time.perf_counter()
    run(steps)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--activation", default="elu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ds = load_dataset("mnist", data_dir=args.data_dir).to(device)
    steps_per_epoch = math.ceil(ds.train_x.shape[0] / 64)

    bare = bare_loop(ds, device, args.steps, args.activation)

    # the trainer's own loop on a subset of exactly `steps` mini-batches (+ warm-up epoch)
    sub = ds.subset(64 * args.steps, None)
    t = Trainer(lambda: paper_mlp(args.activation), sub, epochs=1, device=device,
                threads=args.threads, eval_initial=False, probe_size=0)
    t._train_epoch(1)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    t._train_epoch(2)
    _sync(device)
    per_step = (time.perf_counter() - t0) / args.steps

    full = Trainer(lambda: paper_mlp(args.activation), ds, epochs=1, device=device,
                   threads=args.threads, probe_size=10_000)
    full.evaluate()
    _sync(device)
    t0 = time.perf_counter()
    vals = full.evaluate()
    float(vals["train_loss"])
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    float(full.probe().median_of_means())
    probe_s = time.perf_counter() - t0
    full.probe_medians = True
    t0 = time.perf_counter()
    float(full.probe().median_of_means())
    probe_median_s = time.perf_counter() - t0

    epoch_s = per_step * steps_per_epoch + eval_s + probe_s
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "activation": args.activation,
        "steps_timed": args.steps,
        "trainer_ms_per_step": per_step * 1e3,
        "trainer_steps_per_s": 1.0 / per_step,
        "bare_loop_ms_per_step": bare * 1e3,
        "eval_s_per_epoch": eval_s,
        "probe_means_s_per_epoch": probe_s,
        "probe_means_and_medians_s": probe_median_s,
        "projected_epoch_s": epoch_s,
        "projected_300_epochs_min": epoch_s * 300 / 60,
    }
    for k, v in result.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
