"""Plotting helpers shared by the analyses: figures without pyplot, colours, titles, saving.

Figures are :class:`matplotlib.figure.Figure` objects made without :mod:`matplotlib.pyplot`, so
no global backend is selected or changed and nothing is shown; :func:`save_figure` writes PNG and
PDF atomically. Each activation keeps its colour in every figure.

:func:`replot` redraws a finished figure from its committed ``NAME.csv`` and ``NAME.json``
without training anything (``python -m biasshift.reproduce.replot figures/NAME``), e.g. after
a change to the plotting code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from biasshift.io import atomic_open
from biasshift.reproduce.base import Settings

__all__ = [
    "activation_color",
    "activation_label",
    "activation_marker",
    "figure_title",
    "new_figure",
    "ordered",
    "plot_seed_lines",
    "read_result_csv",
    "replot",
    "save_figure",
    "seed_band",
]

#: Okabe & Ito's colour-blind-safe palette ("Color Universal Design", 2002): the four units get
#: four distinct hues (blue, vermillion, bluish green, reddish purple) that stay apart under
#: protanopia, deuteranopia and tritanopia; controls and other activations take the rest.
_COLORS = {"elu": "#0072B2", "relu": "#D55E00", "lrelu": "#009E73", "srelu": "#CC79A7"}
_LABELS = {"elu": "ELU", "relu": "ReLU", "lrelu": "LReLU", "srelu": "SReLU"}
_MARKERS = ["o", "s", "^", "D", "v", "P"]
#: Per activation, a marker of its own (told apart without colour, e.g. overlapping curves).
_ACT_MARKERS = {"elu": "o", "relu": "s", "lrelu": "^", "srelu": "D"}
_EXTRA = ["#E69F00", "#56B4E9", "#000000", "#F0E442"]


def activation_color(name: str) -> str:
    """The activation's colour (Okabe–Ito colour-blind-safe palette; stable across figures).

    ELU, ReLU, LReLU and SReLU have fixed, distinct hues; any other activation (a control such
    as tanh or the identity) gets one of the remaining palette colours, chosen from its name.
    """
    if name in _COLORS:
        return _COLORS[name]
    return _EXTRA[sum(map(ord, name)) % len(_EXTRA)]


def activation_marker(name: str) -> str:
    """The activation's marker (fixed for the four units; from its name otherwise)."""
    return _ACT_MARKERS.get(name) or _MARKERS[sum(map(ord, name)) % len(_MARKERS)]


def activation_label(name: str) -> str:
    return _LABELS.get(name, name)


def new_figure(ncols: int, *, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list]:
    """A constrained-layout figure with ``ncols`` axes side by side."""
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def figure_title(what: str, settings: Settings, runs: str | None = None) -> str:
    """``what`` plus what was run: dataset, epochs, seeds, and "quick preset" when quick."""
    seeds = f"{settings.seeds} seed" + ("s" if settings.seeds != 1 else "")
    parts = [settings.dataset, f"{settings.epochs} epochs", seeds]
    if runs:
        parts.append(runs)
    if settings.quick:
        parts.append("quick preset")
    return f"{what}\n(" + ", ".join(parts) + ")"


def seed_band(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds of ``value`` per ``by`` + ``epoch``.

    Non-finite values (a diverged run's last epoch) are left out of mean and sd and counted in
    ``nonfinite``; ``n`` counts the finite values.
    """
    keys = [*by, "epoch"]
    d = df.assign(finite=np.isfinite(df["value"].to_numpy(dtype=float)))
    fin = d[d["finite"]]
    g = fin.groupby(keys, sort=True)["value"]
    out = pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0), "n": g.size()})
    nonfinite = d[~d["finite"]].groupby(keys).size().rename("nonfinite")
    out = out.join(nonfinite, how="outer").fillna({"nonfinite": 0, "n": 0})
    return out.reset_index()


def ordered(values: Sequence[str] | pd.Series, preferred: Sequence[str]) -> list[str]:
    """The distinct ``values``: those in ``preferred`` in its order, then the rest sorted."""
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + sorted(v for v in present
                                                           if v not in preferred)


def plot_seed_lines(ax: Axes, sel: pd.DataFrame, df: pd.DataFrame, settings: Settings, *,
                    band: bool = True, linestyle: str = "-", label: bool = True,
                    act_markers: bool = False) -> None:
    """One line per (activation, lr) of ``sel``'s ``value`` over epochs, mean over seeds.

    ``band`` adds mean +- sd over seeds; several learning rates get one marker each.
    ``act_markers`` instead gives each activation its own marker (:func:`activation_marker`),
    placed at staggered epochs per activation, so that curves lying on top of each other (the
    test losses of Fig. 2b) stay distinguishable. Runs that
    diverged (``quantity == "diverged"`` in ``df``) are counted in the label ("2/5 diverged")
    and marked with an x at the epoch where they stopped; their non-finite values are left out
    of the mean (see :func:`seed_band`).
    """
    if sel.empty:
        return
    multi_lr = sel["lr"].nunique() > 1
    stats = seed_band(sel, ["activation", "lr"])
    div = df[df["quantity"] == "diverged"]
    all_lrs = sorted(sel["lr"].unique(), reverse=True)
    acts = ordered(sel["activation"], settings.activations)
    for a_i, act in enumerate(acts):
        for lr in sorted(sel.loc[sel["activation"] == act, "lr"].unique(), reverse=True):
            marker = _MARKERS[all_lrs.index(lr) % len(_MARKERS)] if multi_lr else None
            if act_markers:
                marker = activation_marker(act)
            s = stats[(stats["activation"] == act) & (stats["lr"] == lr) & (stats["n"] > 0)]
            color = activation_color(act)
            text = activation_label(act) + (f", lr {lr:g}" if multi_lr else "")
            runs = sel.loc[(sel["activation"] == act) & (sel["lr"] == lr), "run"].nunique()
            stops = div.loc[(div["activation"] == act) & (div["lr"] == lr), "epoch"]
            if len(stops):
                text += f" ({len(stops)}/{runs} diverged)"
            if s.empty:  # nothing finite to draw: keep the legend entry
                ax.plot([], [], color=color, linestyle=linestyle, marker=marker,
                        label=text if label else None)
                continue
            ep, mean, sd = (s[c].to_numpy(dtype=float) for c in ("epoch", "mean", "sd"))
            every = max(1, len(ep) // 12)
            # staggered: activation i marks epochs i*every/n, i*every/n + every, ...
            start = (a_i * every) // len(acts) if act_markers else 0
            ax.plot(ep, mean, color=color, linestyle=linestyle, lw=1.4, marker=marker,
                    ms=4, markevery=(min(start, max(len(ep) - 1, 0)), every),
                    mfc="white" if act_markers and linestyle != "-" else color,
                    label=text if label else None)
            if band and (s["n"] > 1).any():
                ax.fill_between(ep, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            for e in stops:
                before = ep <= e
                if before.any():
                    ax.plot(ep[before][-1], mean[before][-1], marker="x", color=color, ms=8,
                            mew=2, linestyle="none")


def save_figure(fig: Figure, stem: str | os.PathLike[str],
                formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically; returns the paths."""
    paths = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=dpi)
        paths.append(path)
    return paths


#: Columns of the tidy result tables read as text (a layer "1" stays "1", "NA" stays "NA").
_TEXT_COLUMNS = ("analysis", "run", "dataset", "activation", "layer", "quantity", "stat",
                 "optimizer", "arm")


def read_result_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a tidy ``NAME.csv`` written by ``biasshift reproduce`` back into the frame the
    figure was drawn from (text columns as ``object``, ``unit`` as ``Int64``, ``value`` float)."""
    df = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS} | {"unit": "Int64"},
                     keep_default_na=False,
                     na_values={"unit": [""], "value": ["", "NaN", "nan"]})
    for c in _TEXT_COLUMNS:
        if c in df:
            df[c] = df[c].astype(object)
    df["value"] = df["value"].astype(np.float64)
    return df


def replot(stem: str | os.PathLike[str]) -> list[Path]:
    """Redraw ``stem.png`` and ``stem.pdf`` from ``stem.csv`` (or, when only that is there,
    ``stem.csv.gz``: large tables are committed compressed) and the settings in ``stem.json``.

    Nothing is trained and the CSV and JSON are left as they are: the figure is a function of
    the tidy table and the settings only (:meth:`Analysis.plot`).

    Raises:
        FileNotFoundError: ``stem.csv`` or ``stem.json`` is missing.
        ValueError: the JSON has no ``analysis``/``settings`` record.
    """
    from biasshift.reproduce.registry import get_analysis

    stem = Path(stem)
    record = json.loads(stem.with_suffix(".json").read_text())
    if "analysis" not in record or "settings" not in record:
        raise ValueError(f"{stem.with_suffix('.json')}: not a biasshift result record (no "
                         "'analysis'/'settings'); replot needs the JSON written with the CSV")
    raw = record["settings"]
    known = {f.name for f in dataclasses.fields(Settings)}
    kw = {k: v for k, v in raw.items() if k in known}
    kw["activations"], kw["lrs"] = tuple(kw["activations"]), tuple(kw["lrs"])
    kw["out"], kw["work_dir"] = Path(kw["out"]), Path(kw["work_dir"])
    settings = Settings(**kw)
    analysis = get_analysis(record["analysis"])
    csv = stem.with_suffix(".csv")
    gz = stem.with_suffix(".csv.gz")
    df = read_result_csv(gz if not csv.exists() and gz.exists() else csv)
    return save_figure(analysis.plot(df, settings), stem)

