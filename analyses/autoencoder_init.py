"""The Fig. 3 autoencoder at initialisation: He's gain against the second-moment gain (issue 14).

For every activation, initialisation (``he``: the paper's; ``second-moment``:
:mod:`biasshift.models.init_gain`) and seed, the untrained 784-1000-500-250-30 autoencoder
(linear code, logistic output) is run on the first ``--images`` MNIST test images and records

* ``net_sq`` per Linear layer: the second moment ``E[net^2]`` of its outputs over images and
  units (before the activation; ``out``: the output logits);
* ``logit_var``: the variance of the output logits over images and pixels;
* ``sse``: the mean per-image summed squared error of ``sigmoid(logits)``;
* ``recon_var_ratio`` and ``saturated_frac``
  (:func:`biasshift.train.reconstruction.collapse_statistics`).

Writes a tidy CSV (``activation, init, seed, layer, quantity, value``) and a JSON record with
the mean over seeds; prints the table.  Nothing is trained (a few seconds on one core)::

    python analyses/autoencoder_init.py --out figures/autoencoder_init
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from biasshift.data import load_dataset
from biasshift.io import provenance, write_csv, write_json
from biasshift.models import autoencoder
from biasshift.models.init_gain import activation_second_moment, second_moment_gain
from biasshift.train import derive_seed
from biasshift.train.reconstruction import collapse_statistics, summed_squared_error

ACTS = ("elu", "relu", "lrelu", "srelu")
INITS = ("he", "second-moment")


def measure(act: str, init: str, seed: int, x: torch.Tensor) -> list[tuple[str, str, float]]:
    """``(layer, quantity, value)`` rows of one freshly initialised autoencoder on ``x``."""
    # the trainer's initialisation stream for run seed ``seed``: the nets of the runs
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(seed, "init"))
        net = autoencoder(act, in_features=x.shape[1], output="linear", init=init)
    rows: list[tuple[str, str, float]] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: rows.append(
            (name, "net_sq", out.double().square().mean().item())))
        for name, m in net.named_children() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        z = net(x)
    for h in hooks:
        h.remove()
    rows.append(("all", "logit_var", z.double().var().item()))
    rows.append(("all", "sse", summed_squared_error(z.double(), x.double(), True).mean().item()))
    for k, v in collapse_statistics(net, x, logits=True).items():
        rows.append(("all", k, v.item()))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--out", type=Path, default=None, help="stem of the CSV and JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_dataset(args.dataset)
    x = ds.test_x[: args.images].reshape(args.images, -1).float()
    rows = []
    for act in ACTS:
        for init in INITS:
            for seed in range(args.seeds):
                rows += [(act, init, seed, *r) for r in measure(act, init, seed, x)]
    df = pd.DataFrame(rows, columns=["activation", "init", "seed", "layer", "quantity", "value"])
    mean = df.groupby(["activation", "init", "layer", "quantity"], sort=False)["value"].mean()
    table = mean.xs("all", level="layer").unstack("quantity")
    pd.set_option("display.width", 140)
    print(f"untrained autoencoder on the first {args.images} {args.dataset} test images, mean "
          f"over {args.seeds} seeds:")
    print(table.round(4).to_string())
    zeros = x.double().square().sum(1).mean().item()
    mean_img = (x.double() - x.double().mean(0)).square().sum(1).mean().item()
    print(f"reference: SSE of predicting zeros {zeros:.1f}, of the mean image {mean_img:.1f}")
    if args.out is not None:
        write_csv(df, args.out.with_suffix(".csv"))
        summary = {
            f"{a}/{i}": {q: float(table.loc[(a, i), q]) for q in table.columns}
            for a, i in table.index
        }
        layers = {f"{a}/{i}": {layer: float(mean[(a, i, layer, "net_sq")])
                               for layer in df.loc[df["quantity"] == "net_sq", "layer"].unique()}
                  for a, i in table.index}
        write_json(provenance(
            analysis="autoencoder-init", command=" ".join(sys.argv), images=args.images,
            seeds=args.seeds, dataset=args.dataset,
            second_moment={a: activation_second_moment(a) for a in ACTS},
            gain_over_he={a: second_moment_gain(a) for a in ACTS},
            sse_zeros=zeros, sse_mean_image=mean_img, mean_over_seeds=summary,
            net_sq_per_layer=layers), args.out.with_suffix(".json"))
        print(f"wrote {args.out}.csv, {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
