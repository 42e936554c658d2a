"""The learning-rate sweep behind ``bias-shift-mechanism``'s natural-gradient arm.

For SGD (lr 0.003, 0.01, 0.03, 0.1) and :class:`~biasshift.optim.UnitNaturalGradient` (its
defaults, lr 0.01, 0.03, 0.1): the 8x128 ELU and ReLU nets of Fig. 2 trained one epoch on MNIST
(seed 100, not one of the analysis' paired seeds 0, 1, ...), the training cross-entropy on the
whole training set after the epoch.  The chosen lr of an optimizer minimises the mean of that
loss over the two units (a diverged run counts as infinitely bad).  The result (committed as
``figures/bias-shift-mechanism-lr-sweep.json``) set the preset's ``ng_sgd_lr`` and ``ung_lr``.

    python analyses/bias_shift_mechanism_lr_sweep.py [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from biasshift.data import load_dataset
from biasshift.io import provenance, write_json
from biasshift.models import paper_mlp
from biasshift.optim import UnitNaturalGradient
from biasshift.train.trainer import Trainer

GRID = {"sgd": (0.003, 0.01, 0.03, 0.1), "ung": (0.01, 0.03, 0.1)}
ACTIVATIONS = ("elu", "relu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="figures/bias-shift-mechanism-lr-sweep.json")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("mnist")
    runs = []
    for opt, lrs in GRID.items():
        for act in ACTIVATIONS:
            for lr in lrs:
                factory = None if opt == "sgd" else (
                    lambda m, lr=lr: UnitNaturalGradient(m, lr=lr))
                tr = Trainer(lambda act=act: paper_mlp(act), ds, lr=lr, epochs=args.epochs,
                             seed=100, optimizer=factory, probe_size=0, threads=1,
                             progress=False)
                t0 = time.perf_counter()
                h = tr.fit()
                last = h[(h["quantity"] == "train_loss") & (h["epoch"] == args.epochs)]
                loss = float(last["value"].iloc[0]) if len(last) else math.nan
                runs.append({"optimizer": opt, "activation": act, "lr": lr,
                             "train_loss": loss, "diverged": bool(tr.diverged),
                             "seconds": time.perf_counter() - t0})
                print(runs[-1], flush=True)
    chosen = {}
    for opt, lrs in GRID.items():
        def score(lr: float, opt: str = opt) -> float:
            v = [r["train_loss"] for r in runs if r["optimizer"] == opt and r["lr"] == lr]
            return math.inf if any(not math.isfinite(x) for x in v) else sum(v) / len(v)
        chosen[opt] = min(lrs, key=score)
    write_json(provenance(analysis="bias-shift-mechanism-lr-sweep", epochs=args.epochs,
                          seed=100, criterion="mean over ELU and ReLU of the training CE after "
                          f"{args.epochs} epoch(s); diverged = inf", runs=runs, chosen=chosen),
               args.out)
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
