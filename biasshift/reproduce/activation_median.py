"""``activation-median`` — the paper's Fig. 2: ELUs keep the median activation near zero.

Section 4.1: a fully connected network with 8 hidden layers of 128 units, He initialisation,
plain SGD (lr 0.01, mini-batch 64) for 300 epochs on MNIST, five runs per activation. After each
epoch each unit's mean activation on a fixed subset of the training data (here 10,000 samples,
the same for every run) is computed.

* Panel a: the median over all hidden units of these means, per epoch, mean +- sd over seeds.
* Panel b: training (solid) and test (dotted) cross-entropy per epoch (log scale); each
  activation has its own marker, at staggered epochs, so overlapping test curves stay visible.

Rows of the tidy CSV (see :mod:`biasshift.reproduce.base` for the columns): every quantity the
trainer records — ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``, ``running_loss``,
``median_of_means`` (``layer="all"``: pooled over the hidden layers; ``act1``..``act8``: per
layer), ``diverged`` — from epoch 0 (the initial network) to the last epoch.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from biasshift.data.base import ArrayDataset
from biasshift.models import paper_mlp
from biasshift.reproduce.base import Analysis, Preset, RunSpec, Settings, register
from biasshift.reproduce.plotting import figure_title, new_figure, plot_seed_lines

__all__ = ["ActivationMedian"]

_ACTS = ("elu", "relu", "lrelu", "srelu")


class ActivationMedian(Analysis):
    name = "activation-median"
    figure = "Fig. 2"
    description = ("Fig. 2: median over hidden units of their mean activation, and train/test "
                   "cross-entropy, per epoch (8x128 MLP)")
    loss = "cross_entropy"
    batch_runs = "auto"  # every arm is the 8x128 MLP: the runs train as one stacked model
    presets = {  # noqa: RUF012
        "paper": Preset(dataset="mnist", epochs=300, seeds=5, activations=_ACTS, lrs=(0.01,),
                        batch_size=64, probe_size=10_000, model={"depth": 8, "width": 128}),
        "quick": Preset(dataset="digits", epochs=20, seeds=3, activations=_ACTS, lrs=(0.01,),
                        batch_size=64, probe_size=10_000, model={"depth": 8, "width": 128}),
    }

    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        return paper_mlp(spec.activation, depth=int(spec.model["depth"]),
                         width=int(spec.model["width"]), in_features=dataset.in_features,
                         num_classes=dataset.num_classes)

    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        fig, (ax_a, ax_b) = new_figure(2, width=5.5, height=4.2)
        trained = df[df["epoch"] >= 1]
        med = trained[(trained["quantity"] == "median_of_means") & (trained["layer"] == "all")]
        plot_seed_lines(ax_a, med, df, settings, band=True)
        ax_a.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        ax_a.set_xlabel("epoch")
        ax_a.set_ylabel("median over hidden units of unit mean activation")
        ax_a.set_title("a  median of unit mean activations (mean ± sd over seeds)", loc="left",
                       fontsize="medium")
        ax_a.legend(fontsize="small")

        loss = trained[trained["quantity"].isin(["train_loss", "test_loss"])]
        # one marker per activation, at staggered epochs: the test curves lie on top of each
        # other, and the markers keep all four visible
        plot_seed_lines(ax_b, loss[loss["quantity"] == "train_loss"], df, settings, band=False,
                        act_markers=True)
        plot_seed_lines(ax_b, loss[loss["quantity"] == "test_loss"], df, settings, band=False,
                        linestyle=":", label=False, act_markers=True)
        ax_b.set_yscale("log")
        ax_b.set_xlabel("epoch")
        ax_b.set_ylabel("cross-entropy")
        ax_b.set_title("b  training (solid, filled markers) and test (dotted, open markers) loss",
                       loc="left", fontsize="medium")
        ax_b.legend(fontsize="small")
        width = settings.model.get("width")
        depth = settings.model.get("depth")
        fig.suptitle(figure_title(f"Fig. 2: {depth}x{width} MLP, SGD lr "
                                  f"{', '.join(f'{lr:g}' for lr in settings.lrs)}, batch "
                                  f"{settings.batch_size}", settings))
        return fig


register(ActivationMedian())
