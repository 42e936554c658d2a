"""``median-variance`` — the paper's appendix: the median activation varies more in ReLU nets.

Appendix ("Variance of Mean Activations in ELU and ReLU Networks"): a network with 5 hidden
layers of 256 units, trained for 200 epochs with learning rate 0.01 on MNIST, once with ReLU and
once with ELU. "After each epoch, we calculated the median activation of each hidden unit on the
whole training set. We then calculated the variance of these changes."

Here: after every epoch ``e >= 1`` each unit's exact median activation ``m_e`` on the whole
training set (:func:`biasshift.monitor.probe_statistics`); per unit, the sample variance
(``ddof=1``) of its changes ``m_e - m_{e-1}`` for ``e = 2..E`` (the move away from the random
initialisation, epoch 0 -> 1, is not a change "after each epoch" and is left out), so ``E >= 3``.
:class:`MedianChangeVariance` accumulates it online (Welford), resumably.

Rows of the tidy CSV: the trainer's quantities (as for ``activation-median``, with
``median_of_means`` per layer ``act1``..``act5``), and per hidden unit one row
``quantity="median_change_var"`` with ``layer`` and ``unit`` set and ``epoch`` the last epoch.
The figure shows these per-unit variances per layer as box plots, ReLU vs ELU, on a log scale
(symmetric-log with a linear band at zero when some units never changed, e.g. dead ReLUs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from biasshift.data.base import ArrayDataset
from biasshift.models import paper_mlp
from biasshift.reproduce.base import Analysis, Preset, RunSpec, Settings, UsageError, register
from biasshift.reproduce.plotting import (
    activation_color,
    activation_label,
    figure_title,
    new_figure,
    ordered,
)
from biasshift.train.plugins import Plugin
from biasshift.train.trainer import Trainer

__all__ = ["MedianChangeVariance", "MedianVariance"]


class MedianChangeVariance(Plugin):
    """Per unit, the variance over epochs of the change of its median activation on the probe set.

    Reads ``trainer.last_probe.median`` at every epoch end (so the trainer needs
    ``probe_medians=True``; the appendix uses the whole training set, ``probe_size=None``). The
    changes from epoch ``e - 1`` to ``e`` for ``e >= 2`` are accumulated per unit with Welford's
    algorithm in float64 on the model's device; at the end of the fit the sample variances
    (``ddof=1``; NaN with fewer than two changes) are logged as ``median_change_var`` per layer
    and unit.
    """

    quantity = "median_change_var"

    def __init__(self) -> None:
        self.count = 0
        self.prev: dict[str, Tensor] = {}
        self.mean: dict[str, Tensor] = {}
        self.m2: dict[str, Tensor] = {}

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        probe = trainer.last_probe
        if probe is None or not trainer.probe_medians:
            raise RuntimeError("MedianChangeVariance needs the trainer's per-unit probe medians; "
                               "build the Trainer with probe_medians=True and probe_size=None "
                               "(whole training set) or > 0")
        medians = {n: m.detach().double() for n, m in probe.median.items()}
        if self.prev:
            self.count += 1
            for n, m in medians.items():
                delta = m - self.prev[n]
                if n not in self.mean:
                    self.mean[n] = torch.zeros_like(m)
                    self.m2[n] = torch.zeros_like(m)
                d0 = delta - self.mean[n]
                self.mean[n] += d0 / self.count
                self.m2[n] += d0 * (delta - self.mean[n])
        self.prev = medians

    def variances(self) -> dict[str, Tensor]:
        """Per layer, each unit's sample variance (``ddof=1``) of its median changes so far."""
        if self.count < 2:
            return {n: torch.full_like(m, float("nan")) for n, m in self.prev.items()}
        return {n: m2 / (self.count - 1) for n, m2 in self.m2.items()}

    def on_fit_end(self, trainer: Trainer) -> None:
        for n, v in self.variances().items():
            trainer.log(self.quantity, v, layer=n)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "prev": dict(self.prev), "mean": dict(self.mean),
                "m2": dict(self.m2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.prev = dict(state["prev"])
        self.mean = dict(state["mean"])
        self.m2 = dict(state["m2"])


class MedianVariance(Analysis):
    name = "median-variance"
    figure = "appendix"
    description = ("Appendix: per-unit variance of the epoch-to-epoch change of the median "
                   "activation on the training set, ReLU vs ELU (5x256 MLP)")
    loss = "cross_entropy"
    min_epochs = 3
    probe_medians = True
    presets = {  # noqa: RUF012
        "paper": Preset(dataset="mnist", epochs=200, seeds=1, activations=("relu", "elu"),
                        lrs=(0.01,), batch_size=64, probe_size=None,
                        model={"depth": 5, "width": 256}),
        "quick": Preset(dataset="digits", epochs=25, seeds=2, activations=("relu", "elu"),
                        lrs=(0.01,), batch_size=64, probe_size=None,
                        model={"depth": 5, "width": 256}),
    }

    def validate(self, settings: Settings) -> None:
        super().validate(settings)
        if settings.probe_size == 0:
            raise UsageError("median-variance needs the probe (the appendix uses the whole "
                             "training set); drop --probe-size 0")

    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        return paper_mlp(spec.activation, depth=int(spec.model["depth"]),
                         width=int(spec.model["width"]), in_features=dataset.in_features,
                         num_classes=dataset.num_classes)

    def plugins(self, spec: RunSpec) -> list[Plugin]:
        return [MedianChangeVariance()]

    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        """(a) per layer and activation, boxes of the units' variances on a log scale, over the
        units whose median changed at all, with the share of units whose median never changed
        (variance exactly 0, e.g. ReLU units with median 0 every epoch) written above each box;
        (b) per layer the mean variance over all units (zeros included)."""
        import seaborn as sns

        fig, (ax, ax_mean) = new_figure(2, width=6.5, height=4.5)
        data = df[df["quantity"] == MedianChangeVariance.quantity].copy()
        data = data[np.isfinite(data["value"].to_numpy(dtype=float))]
        acts = ordered(data["activation"], settings.activations)
        layers = sorted(data["layer"].unique(), key=lambda s: (len(s), s))
        ax.set_title("a  per-unit variance (units whose median changed)", loc="left",
                     fontsize="medium", pad=14)  # room for the shares above the boxes
        ax_mean.set_title("b  mean over all units of a layer (zeros included)", loc="left",
                          fontsize="medium")
        if data.empty:
            for a in (ax, ax_mean):
                a.text(0.5, 0.5, "no finite per-unit variances (all runs diverged?)",
                       ha="center", va="center", transform=a.transAxes)
        else:
            labels = [activation_label(a) for a in acts]
            palette = [activation_color(a) for a in acts]
            data["activation"] = data["activation"].map(activation_label)
            positive = data[data["value"] > 0]
            if not positive.empty:
                sns.boxplot(data=positive, x="layer", y="value", hue="activation", order=layers,
                            hue_order=labels, palette=palette, ax=ax, fliersize=2,
                            linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("variance of the median's change per epoch")
            # the share of units with zero variance, above each box (seaborn's dodge layout)
            zero = data.assign(z=data["value"] <= 0).groupby(["layer", "activation"])["z"].mean()
            width = 0.8 / max(len(labels), 1)
            for i, layer in enumerate(layers):
                for j, lab in enumerate(labels):
                    if (layer, lab) not in zero.index:
                        continue
                    x = i - 0.4 + (j + 0.5) * width
                    ax.text(x, 1.0, f"{100 * zero[(layer, lab)]:.0f}%", ha="center", va="bottom",
                            fontsize="x-small", color=palette[j],
                            transform=ax.get_xaxis_transform())
            ax.text(0.0, -0.16, "above boxes: % of units whose median never changed (variance 0)",
                    fontsize="x-small", transform=ax.transAxes)
            sns.barplot(data=data, x="layer", y="value", hue="activation", order=layers,
                        hue_order=labels, palette=palette, ax=ax_mean, estimator="mean",
                        errorbar=None)
            ax_mean.set_yscale("log")
            ax_mean.set_ylabel("mean variance of the median's change")
            for a in (ax, ax_mean):
                if a.get_legend() is not None:
                    a.legend(title=None, fontsize="small")
        for a in (ax, ax_mean):
            a.set_xlabel("hidden layer")
        width = settings.model.get("width")
        depth = settings.model.get("depth")
        units = data.groupby("activation")["run"].nunique()
        runs = ", ".join(f"{a}: {n} run{'s' if n != 1 else ''}" for a, n in units.items())
        fig.suptitle(figure_title(f"Appendix: variance of per-unit median changes, {depth}x"
                                  f"{width} MLP", settings, runs=runs or None))
        return fig


register(MedianVariance())
