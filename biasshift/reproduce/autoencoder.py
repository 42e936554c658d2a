"""``autoencoder`` — the paper's Fig. 3: deep autoencoder reconstruction error per learning rate.

Section 4.1: encoder 784-1000-500-250-30 with a mirrored decoder
(:func:`biasshift.models.autoencoder`: linear code layer, logistic output), SGD with mini-batches
of 64 for 500 epochs at the fixed learning rates 1e-2, 1e-3, 1e-4 and 1e-5, four activations.

The loss is not stated in the paper, whose setup is the deep-autoencoder benchmark of Hinton &
Salakhutdinov (2006) and Martens (2010).  That benchmark trains the logistic outputs on the
canonical Bernoulli cross-entropy and reports the per-image summed squared error (Martens'
``nnet_train_2.m``: ``L2 = sum((y - out)^2) / numcases``).  So does this analysis by default:
training loss ``bce``, reported error ``train_sse`` / ``test_sse`` (see
:mod:`biasshift.train.reconstruction`).  The model returns the output logits; the
reconstruction is their sigmoid, whatever the loss.

Options (``--option KEY=VALUE``; the JSON record lists them under ``settings.options``)
    ``losses``            comma-separated training losses, one set of runs each: ``bce``
                          (default), ``sse`` (per-image summed squared error), ``mse``
                          (per-pixel mean).
    ``inits``             comma-separated initialisations: ``he`` (default, the paper's) and/or
                          ``second-moment`` (the gain from each unit's second moment,
                          :mod:`biasshift.models.init_gain`).
    ``train_size``        train on the first N training images (0: all); ``test_size`` likewise
                          for the test images. The figure title states a subset.
    ``collapse_images``   the first N test images on which collapse is measured (1000).
    ``collapse_threshold``  ``collapsed`` = 1 when the variance across images of the
                          reconstruction is below this share of the images' own (1e-3).

Run ids are ``<activation>[-<loss>][-sm]-lr<lr>-seed<seed>`` (the loss only when it is not
``bce``; ``-sm`` for the second-moment initialisation); the tidy table adds the columns ``loss``
and ``init``.

Collapse and divergence
    Every run logs ``recon_var_ratio``, ``saturated_frac`` and ``collapsed`` per epoch
    (:class:`~biasshift.train.reconstruction.CollapseMonitor`).  A run that ever collapsed is
    left out of its activation's mean and band and drawn on its own (thin dash-dot line, a star
    where it collapsed), counted in the legend ("1/3 collapsed"); a run whose loss became
    non-finite stops with a ``diverged`` row and is marked with an x (as for classification).

The figure has one panel per learning rate (one row per loss x initialisation when there are
several): training (solid) and test (dotted) summed squared error per image, mean +- sd over
seeds, from epoch 0 (the untrained net), log scale.  The quick preset uses the 8x8 digits
(64 inputs) with a smaller encoder 256-128-64-16.  Probe statistics are off by default
(``--probe-size N`` turns them on for the hidden layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from torch import nn

from biasshift.data.base import ArrayDataset
from biasshift.models import autoencoder
from biasshift.monitor.selection import ModuleSpec
from biasshift.reproduce.base import (
    TIDY_COLUMNS,
    Analysis,
    Preset,
    RunSpec,
    Settings,
    UsageError,
    register,
)
from biasshift.reproduce.plotting import (
    activation_color,
    activation_label,
    activation_marker,
    figure_title,
    ordered,
    seed_band,
)
from biasshift.train.plugins import Plugin
from biasshift.train.reconstruction import RECONSTRUCTION_LOSSES, CollapseMonitor

if TYPE_CHECKING:
    from biasshift.train.trainer import Trainer

__all__ = ["AE_COLUMNS", "INITS", "Autoencoder"]

_ACTS = ("elu", "relu", "lrelu", "srelu")
_LRS = (1e-2, 1e-3, 1e-4, 1e-5)
INITS = ("he", "second-moment")
AE_COLUMNS = (*TIDY_COLUMNS, "loss", "init")
_OPTIONS: dict[str, Any] = {"losses": ("bce",), "inits": ("he",), "train_size": 0,
                            "test_size": 0, "collapse_images": 1000,
                            "collapse_threshold": 1e-3}
_LOSS_TEXT = {"bce": "cross-entropy", "sse": "SSE", "mse": "per-pixel MSE"}


def _hidden(name: str, module: nn.Module) -> bool:
    return name.startswith(("eact", "dact"))


def run_id(activation: str, lr: float, seed: int, loss: str = "bce", init: str = "he") -> str:
    """``<activation>[-<loss>][-sm]-lr<lr>-seed<seed>`` (see the module docstring)."""
    mid = ("" if loss == "bce" else f"-{loss}") + ("" if init == "he" else "-sm")
    return f"{activation}{mid}-lr{lr:g}-seed{seed}"


def _variants(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The (loss, init) pairs of a table; a table from before these columns: one, unnamed."""
    if "loss" not in df or "init" not in df:
        return [("", "")]
    pairs = df[["loss", "init"]].drop_duplicates().itertuples(index=False)
    order = {k: i for i, k in enumerate(RECONSTRUCTION_LOSSES)}
    return sorted(((str(a), str(b)) for a, b in pairs),
                  key=lambda p: (order.get(p[0], 9), p[1] != "he", p))


def _select(df: pd.DataFrame, variant: tuple[str, str]) -> pd.DataFrame:
    if variant == ("", ""):
        return df
    return df[(df["loss"] == variant[0]) & (df["init"] == variant[1])]


def _error_quantities(df: pd.DataFrame) -> tuple[str, str]:
    """``train_sse``/``test_sse``; a table from before they existed: the losses (then SSE)."""
    if (df["quantity"] == "train_sse").any():
        return "train_sse", "test_sse"
    return "train_loss", "test_loss"


def collapsed_runs(df: pd.DataFrame) -> dict[str, int]:
    """``run -> first epoch with collapsed == 1`` for the runs of ``df`` that ever collapsed."""
    c = df[(df["quantity"] == "collapsed") & (df["value"] == 1.0)]
    return {str(r): int(e) for r, e in c.groupby("run")["epoch"].min().items()}


class Autoencoder(Analysis):
    name = "autoencoder"
    figure = "Fig. 3"
    description = ("Fig. 3: deep autoencoder (784-1000-500-250-30 + mirror) train/test "
                   "reconstruction error per epoch at four learning rates")
    loss = "reconstruction"
    tidy_columns = AE_COLUMNS
    presets = {  # noqa: RUF012
        "paper": Preset(dataset="mnist", epochs=500, seeds=3, activations=_ACTS, lrs=_LRS,
                        batch_size=64, probe_size=0, model={"encoder": [1000, 500, 250, 30]},
                        options=dict(_OPTIONS)),
        "quick": Preset(dataset="digits", epochs=15, seeds=1, activations=_ACTS, lrs=_LRS,
                        batch_size=64, probe_size=0, model={"encoder": [256, 128, 64, 16]},
                        options=dict(_OPTIONS)),
    }

    # ------------------------------------------------------------------ settings and runs
    def validate(self, settings: Settings) -> None:
        super().validate(settings)
        o = settings.options
        for key, known in (("losses", RECONSTRUCTION_LOSSES), ("inits", INITS)):
            vals = tuple(o[key])
            if not vals or len(set(vals)) != len(vals) or any(v not in known for v in vals):
                raise UsageError(f"option {key}={','.join(vals)}: choose distinct names from "
                                 f"{','.join(known)}")
        for key in ("train_size", "test_size"):
            if o[key] < 0:
                raise UsageError(f"option {key}={o[key]} must be >= 0 (0: all images)")
        if o["collapse_images"] < 2:
            raise UsageError(f"option collapse_images={o['collapse_images']} must be >= 2")
        if not o["collapse_threshold"] > 0:
            raise UsageError(f"option collapse_threshold={o['collapse_threshold']} must be > 0")

    def run_specs(self, settings: Settings) -> list[RunSpec]:
        """activations x losses x initialisations x learning rates x seeds."""
        o = settings.options
        train = int(o["train_size"]) or settings.train_size
        test = int(o["test_size"]) or settings.test_size
        keep = {k: o[k] for k in ("collapse_images", "collapse_threshold")}
        return [
            RunSpec(analysis=self.name, run=run_id(act, lr, seed, loss, init),
                    dataset=settings.dataset, activation=act, seed=seed, lr=lr,
                    epochs=settings.epochs, batch_size=settings.batch_size,
                    probe_size=settings.probe_size, model=dict(settings.model),
                    options={"loss": loss, "init": init, **keep},
                    train_size=train, test_size=test)
            for act in settings.activations
            for loss in o["losses"]
            for init in o["inits"]
            for lr in settings.lrs
            for seed in range(settings.seeds)
        ]

    # ------------------------------------------------------------------ one run
    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        return autoencoder(spec.activation, in_features=dataset.in_features,
                           encoder=[int(h) for h in spec.model["encoder"]], output="linear",
                           init=str(spec.options.get("init", "he")))

    def trainer_options(self, spec: RunSpec) -> dict[str, Any]:
        return {"reconstruction_loss": str(spec.options.get("loss", "bce")),
                "reconstruction_logits": True}

    def plugins(self, spec: RunSpec) -> list[Plugin]:
        o = spec.options
        return [CollapseMonitor(int(o.get("collapse_images", 1000)),
                                float(o.get("collapse_threshold", 1e-3)), logits=True)]

    def probe_modules(self, spec: RunSpec) -> ModuleSpec:
        return _hidden

    def run_frame(self, spec: RunSpec, frame: pd.DataFrame, run_dir: Path,
                  trainer: Trainer | None) -> pd.DataFrame:
        return frame.assign(loss=str(spec.options.get("loss", "bce")),
                            init=str(spec.options.get("init", "he")))

    # ------------------------------------------------------------------ results
    def summary(self, df: pd.DataFrame, settings: Settings) -> dict[str, Any]:
        """Per loss/init and learning rate: each activation's last-epoch test SSE (mean, sd over
        the seeds that did not collapse or diverge), the runs that collapsed or diverged, and
        the ranking by mean test SSE."""
        _, test_q = _error_quantities(df)
        out: dict[str, Any] = {
            "reported": f"{test_q} at the last epoch: mean, sd over seeds (ddof=1) of the runs "
                        "that neither collapsed nor diverged",
            "train_size": settings.options.get("train_size") or settings.train_size,
            "test_size": settings.options.get("test_size") or settings.test_size,
            "results": [],
        }
        collapsed = collapsed_runs(df)
        div = set(df.loc[df["quantity"] == "diverged", "run"])
        for variant in _variants(df):
            d = _select(df, variant)
            for lr in sorted(d["lr"].unique(), reverse=True):
                entry: dict[str, Any] = {"loss": variant[0] or None, "init": variant[1] or None,
                                         "lr": float(lr), "activations": {}}
                for act in ordered(d["activation"], settings.activations):
                    a = d[(d["lr"] == lr) & (d["activation"] == act)]
                    runs = sorted(a["run"].unique())
                    good = [r for r in runs if r not in collapsed and r not in div]
                    t = a[(a["quantity"] == test_q) & a["run"].isin(good)]
                    last = t[t["epoch"] == t["epoch"].max()]["value"] if len(t) else t["value"]
                    vals = last.to_numpy(dtype=float)
                    entry["activations"][act] = {
                        "test_sse_mean": float(vals.mean()) if len(vals) else None,
                        "test_sse_sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                        "n": len(vals), "runs": len(runs),
                        "collapsed": sum(r in collapsed for r in runs),
                        "diverged": sum(r in div for r in runs),
                    }
                means = {k: v["test_sse_mean"] for k, v in entry["activations"].items()
                         if v["test_sse_mean"] is not None}
                entry["ranking"] = sorted(means, key=means.get)
                out["results"].append(entry)
        return out

    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        lrs = sorted(df["lr"].unique(), reverse=True) or list(settings.lrs)
        variants = _variants(df)
        train_q, test_q = _error_quantities(df)
        collapsed = collapsed_runs(df)
        div = df[df["quantity"] == "diverged"]
        fig = Figure(figsize=(4.2 * len(lrs), 3.8 * len(variants) + 0.4), layout="constrained")
        grid = fig.subplots(len(variants), len(lrs), squeeze=False)
        for row, variant in zip(grid, variants):
            d = _select(df, variant)
            for ax, lr in zip(row, lrs):
                sub = d[d["lr"] == lr]
                acts = ordered(sub["activation"], settings.activations)
                for a_i, act in enumerate(acts):
                    self._draw_activation(ax, sub[sub["activation"] == act], act, a_i,
                                          len(acts), (train_q, test_q), collapsed, div)
                ax.set_yscale("log")
                what = "" if variant == ("", "") else (
                    f"{_LOSS_TEXT.get(variant[0], variant[0])} training"
                    + ("" if variant[1] == "he" else f", {variant[1]} init") + "\n")
                ax.set_title(f"{what}learning rate {lr:g}", fontsize="medium")
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlim(-0.3, max(float(df["epoch"].max()), 1.0) + 0.3)
                handles, labels = ax.get_legend_handles_labels()
                if any(r in collapsed for r in sub["run"].unique()):
                    handles += [Line2D([], [], color="grey", ls="-."),
                                Line2D([], [], color="grey", marker="*", ls="none", ms=9)]
                    labels += ["collapsed run (own line)", "collapse onset"]
                stopped = div[div["run"].isin(sub["run"].unique())]
                if len(stopped):
                    handles.append(Line2D([], [], color="grey", marker="x", ls="none", ms=8,
                                          mew=2))
                    labels.append("diverged: last finite epoch")
                ax.legend(handles, labels, fontsize="x-small")
            row[0].set_ylabel("summed squared error per image")
        enc = "-".join(str(h) for h in settings.model.get("encoder", []))
        size = settings.options.get("train_size") or settings.train_size
        tsize = settings.options.get("test_size") or settings.test_size
        runs = None
        if size or tsize:
            runs = (f"first {size or 'all'} training / {tsize or 'all'} test images")
        losses = {v[0] for v in variants}
        trained_on = ("" if losses in ({""}, set()) or len(losses) > 1
                      else f", trained on {_LOSS_TEXT.get(next(iter(losses)))}")
        fig.suptitle(figure_title(
            f"Fig. 3: autoencoder {enc} + mirror{trained_on}; reconstruction error:\n"
            "training (solid), test (dotted), mean +- sd over seeds", settings, runs))
        return fig

    @staticmethod
    def _draw_activation(ax: Any, a: pd.DataFrame, act: str, a_i: int, n_acts: int,
                         quantities: tuple[str, str], collapsed: dict[str, int],
                         div: pd.DataFrame) -> None:
        color, marker = activation_color(act), activation_marker(act)
        runs = sorted(a["run"].unique())
        bad = [r for r in runs if r in collapsed]
        stops = div[div["run"].isin(runs)]
        notes = []
        if len(stops):
            notes.append(f"{stops['run'].nunique()}/{len(runs)} diverged")
        if bad:
            notes.append(f"{len(bad)}/{len(runs)} collapsed")
        label = activation_label(act) + (f" ({', '.join(notes)})" if notes else "")
        for q_i, q in enumerate(quantities):
            ls = "-" if q_i == 0 else ":"
            sel = a[(a["quantity"] == q) & ~a["run"].isin(bad)]
            stats = seed_band(sel, ["activation"]) if len(sel) else sel
            s = stats[stats["n"] > 0] if len(sel) else stats
            text = label if q_i == 0 else None
            if s.empty:
                if q_i == 0:
                    ax.plot([], [], color=color, marker=marker, label=text)
            else:
                ep, mean, sd = (s[c].to_numpy(dtype=float) for c in ("epoch", "mean", "sd"))
                every = max(1, len(ep) // 10)
                start = (a_i * every) // max(n_acts, 1)
                ax.plot(ep, mean, color=color, ls=ls, lw=1.4, marker=marker, ms=4,
                        markevery=(min(start, max(len(ep) - 1, 0)), every),
                        mfc=color if q_i == 0 else "white", label=text)
                if (s["n"] > 1).any():
                    ax.fill_between(ep, mean - sd, mean + sd, color=color, alpha=0.18, lw=0)
                for e in stops["epoch"]:
                    before = ep <= e
                    if before.any():
                        ax.plot(ep[before][-1], mean[before][-1], marker="x", color=color,
                                ms=8, mew=2, ls="none")
            for r in bad:
                one = a[(a["quantity"] == q) & (a["run"] == r)].sort_values("epoch")
                ep = one["epoch"].to_numpy(dtype=float)
                v = one["value"].to_numpy(dtype=float)
                ok = np.isfinite(v)
                ax.plot(ep[ok], v[ok], color=color, ls="-.", lw=0.9, alpha=0.9)
                at = ok & (ep == collapsed[r])
                if q_i == 0 and at.any():
                    ax.plot(ep[at], v[at], marker="*", color=color, ms=10, mec="black",
                            mew=0.6, ls="none")


register(Autoencoder())
