"""``autoencoder`` — the paper's Fig. 3: deep autoencoder reconstruction error per learning rate.

Section 4.1: encoder 784-1000-500-250-30 with a mirrored decoder
(:func:`biasshift.models.autoencoder`: linear code layer, logistic output), SGD with mini-batches
of 64 for 500 epochs at the fixed learning rates 1e-2, 1e-3, 1e-4 and 1e-5, four activations.
The loss is not stated in the paper; we use the per-image summed squared error, averaged over
images (the trainer's ``loss="reconstruction"``), for training and for the reported
training/test reconstruction error.

The figure has one panel per learning rate: training (solid) and test (dotted) reconstruction
error per epoch, one colour per activation, log scale. A run whose loss becomes non-finite
(e.g. large learning rates) stops with a ``diverged`` row and is marked with an x.

The quick preset uses the 8x8 digits (64 inputs) with a smaller encoder 256-128-64-16.
Probe statistics are off by default (``--probe-size N`` turns them on for the hidden layers).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from biasshift.data.base import ArrayDataset
from biasshift.models import autoencoder
from biasshift.monitor.selection import ModuleSpec
from biasshift.reproduce.base import Analysis, Preset, RunSpec, Settings, register
from biasshift.reproduce.plotting import figure_title, new_figure, plot_seed_lines

__all__ = ["Autoencoder"]

_ACTS = ("elu", "relu", "lrelu", "srelu")
_LRS = (1e-2, 1e-3, 1e-4, 1e-5)


def _hidden(name: str, module: nn.Module) -> bool:
    return name.startswith(("eact", "dact"))


class Autoencoder(Analysis):
    name = "autoencoder"
    figure = "Fig. 3"
    description = ("Fig. 3: deep autoencoder (784-1000-500-250-30 + mirror) train/test "
                   "reconstruction error per epoch at four learning rates")
    loss = "reconstruction"
    presets = {  # noqa: RUF012
        "paper": Preset(dataset="mnist", epochs=500, seeds=1, activations=_ACTS, lrs=_LRS,
                        batch_size=64, probe_size=0, model={"encoder": [1000, 500, 250, 30]}),
        "quick": Preset(dataset="digits", epochs=15, seeds=1, activations=_ACTS, lrs=_LRS,
                        batch_size=64, probe_size=0, model={"encoder": [256, 128, 64, 16]}),
    }

    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        return autoencoder(spec.activation, in_features=dataset.in_features,
                           encoder=[int(h) for h in spec.model["encoder"]])

    def probe_modules(self, spec: RunSpec) -> ModuleSpec:
        return _hidden

    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        lrs = sorted(df["lr"].unique(), reverse=True) or list(settings.lrs)
        fig, axes = new_figure(len(lrs), width=4.2, height=4.0)
        trained = df[df["epoch"] >= 1]
        for ax, lr in zip(axes, lrs):
            sub = trained[trained["lr"] == lr]
            plot_seed_lines(ax, sub[sub["quantity"] == "train_loss"], df, settings, band=False,
                            act_markers=True)
            plot_seed_lines(ax, sub[sub["quantity"] == "test_loss"], df, settings, band=False,
                            linestyle=":", label=False, act_markers=True)
            ax.set_yscale("log")
            ax.set_title(f"learning rate {lr:g}", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.legend(fontsize="small")
        axes[0].set_ylabel("reconstruction error\n(summed squared error per image)")
        enc = "-".join(str(h) for h in settings.model.get("encoder", []))
        fig.suptitle(figure_title(f"Fig. 3: autoencoder {enc} + mirror, reconstruction error:\n"
                                  "training (solid), test (dotted, open markers)", settings))
        return fig


register(Autoencoder())
