r"""``natural-gradient-gap`` — does a zero-mean activation bring the gradient closer to the unit
natural gradient?  The paper's central claim (Section 2), measured during training.

The ELU paper argues, but never measures, that units with mean activation far from zero cause a
*bias shift* in the next layer, that the unit natural gradient corrects it (Theorem 2), and that
ELUs speed up learning because their mean activations near zero bring the plain gradient closer
to the unit natural gradient.  This analysis trains the Fig. 2 network (8x128 MLP, He
initialisation, mini-batch 64) with

1. plain SGD (the paper's lr 0.01) and a :class:`~biasshift.train.tracking.BiasShiftTracker`
   that, on a log-spaced schedule of steps (``per_decade`` per decade, plus every epoch end),
   measures for every unit of every layer, on a fixed probe batch of ``track_probe`` training
   samples (the same for every run) and the current mini-batch gradient: the cosine between
   the gradient and the damped unit natural gradient, ``|E_p(a)|``, ``|E_q(a)|``, ``k``,
   ``E_p(δ²)``, and the bias shift of the actual SGD step (measured on the probe, and its
   first-order prediction ``Δw₀ + E_p(a)ᵀΔw``) next to the bias shift a unit natural-gradient
   step with the same gradient and learning rate would cause (Theorem 2);
2. the unit natural-gradient optimizer :class:`biasshift.optim.UnitNaturalGradient` (running
   empirical unit Fisher, Theorem 1's block formula; tracked too with ``track_ung``).  If the
   paper is right, the differences between activations shrink under the natural gradient.

The study is about the early and middle phase of training: the paper preset runs 15 epochs
(MNIST, 4 activations, 3 seeds; the tracker on ~40 log-spaced steps plus 15 epoch ends).

Options (``--option KEY=VALUE``; the JSON record lists them under ``settings.options``)
    ==========================  ==================================================================
    ``optimizers``              ``sgd,ung`` (default) or one of them
    ``fisher``                  the tracker's Fisher kind: ``exact`` (default), ``empirical``,
                                ``mc``
    ``damping``                 the tracker's absolute damping λ of ``F + λI`` (default ``1e-4``:
                                ~1/10-1/100 of ``E_p(δ²)`` in this net, whose Fisher blocks have
                                eigenvalues up to ~0.1-1; the cosine grows with λ, see the
                                README's numbers at λ = 1e-4 and 1e-3)
    ``track_probe``             probe batch size (512; quick 256)
    ``per_decade``              tracked steps per decade (8; quick 4), plus every epoch end
    ``track_ung``               also track the natural-gradient runs (paper: yes; quick: no)
    ``ung_lr``, ``ung_damping``,  :class:`~biasshift.optim.UnitNaturalGradient`'s learning rate
    ``ung_ema``,                (0.01, SGD's), relative damping (0.1), EMA decay (0.95), longest
    ``ung_inverse_every``,      refresh interval of the factors (200 steps), Fisher update
    ``ung_update_every``,       interval after the warm-up (20 steps), KL trust region (0.1) and
    ``ung_kl_clip``,            what it bounds (``network``: the batch's Fisher along the whole
    ``ung_trust_region``        step; ``units``: the unit blocks' model): the optimiser's
                                defaults (a test checks that they are).  The figure of
                                2026-12-01 was made with the defaults of then, relative damping
                                1e-3 and ``kl_clip`` 1e-3 on the unit blocks; before the
                                optimiser had a trust region, lr 0.01 diverged and this study
                                had to use lr 0.001
    ==========================  ==================================================================

Tidy CSV (columns :data:`NG_COLUMNS`: the usual ones plus ``optimizer``, ``step``, ``stat``)
    * the trainer's per-epoch rows (``train_loss``, ``test_loss``, ``train_acc``,
      ``test_acc``, ``running_loss``, ``median_of_means``, ``diverged``) with
      ``stat="value"`` and ``step`` = optimizer steps at the end of the epoch;
    * the tracker's summaries over units at each tracked step: ``layer`` = a layer (``fc1``
      .. ``fc8``, ``out``) with ``stat="median"`` (and ``"median_abs"`` for signed quantities),
      or a pool of layers — ``all`` (every layer) and ``act_fed`` (every layer but the first,
      whose inputs are the data, not activation units) — with ``median``, ``q0.25``, ``q0.75``
      and ``median_abs``.  Quantities: ``cos_grad_ng``, ``norm_E_p_a``, ``norm_E_q_a``, ``k``,
      ``E_p_delta2``, ``step_bias_shift_measured``, ``step_bias_shift_first_order``,
      ``step_bias_shift_sgd``, ``step_bias_shift_ng`` (see :mod:`biasshift.train.tracking`).

    Each tracked run folder also holds ``tracking_summary.csv`` (every quantity and statistic
    of :func:`~biasshift.train.tracking.summarize_tracking`) and, in ``checkpoint.pt``, the full
    per-unit table (:meth:`BiasShiftTracker.from_checkpoint
    <biasshift.train.tracking.BiasShiftTracker.from_checkpoint>`).

Figure: (a) median over units of cos(g, F⁻¹g) vs step (pooled over ``act_fed``), per
activation, for SGD (solid) and, when they were tracked (``track_ung``), UNG runs (dashed);
(b) median |bias shift| of the SGD step, measured and first-order, and of the
natural-gradient step; (c) per (run, layer, step) the median cosine against ``|E_p(a)|``, with
Spearman's ρ; (d) training loss per epoch, SGD solid and UNG dashed; (e) the range of the
training loss across activations against its mean (one point per epoch), SGD vs UNG — a smaller
spread at the same loss level is a real shrinkage, a smaller spread at a lower loss need not be;
(f) per layer and activation the median cosine over the run.  The JSON's ``summary`` holds the
headline numbers (also the ratio max/min of the losses across activations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn

from biasshift.data.base import ArrayDataset
from biasshift.fisher.likelihood import FISHER_KINDS
from biasshift.io import write_csv, write_json
from biasshift.models import paper_mlp
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
    figure_title,
    ordered,
    plot_seed_lines,
)
from biasshift.train.plugins import Plugin
from biasshift.train.tracking import BiasShiftTracker, StepSchedule, summarize_tracking

if TYPE_CHECKING:
    from biasshift.train.trainer import OptimizerFactory, Trainer

__all__ = ["NG_COLUMNS", "NaturalGradientGap"]

_ACTS = ("elu", "relu", "lrelu", "srelu")
OPTIMIZERS = ("sgd", "ung")
NG_COLUMNS = (*TIDY_COLUMNS[:6], "optimizer", "epoch", "step", "layer", "unit", "quantity",
              "stat", "value")
#: tracker quantities written to the CSV; the signed ones also get ``median_abs``
CSV_QUANTITIES = ("cos_grad_ng", "norm_E_p_a", "norm_E_q_a", "k", "E_p_delta2",
                  "step_bias_shift_measured", "step_bias_shift_first_order",
                  "step_bias_shift_sgd", "step_bias_shift_ng")
SIGNED = ("k", "step_bias_shift_measured", "step_bias_shift_first_order", "step_bias_shift_sgd",
          "step_bias_shift_ng")
POOLS = ("all", "act_fed")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SUMMARY_NAME = "tracking_summary.csv"
INFO_NAME = "natural_gradient_gap.json"

_TRACKER_OPTIONS = ("fisher", "damping", "track_probe", "per_decade")
_UNG_OPTIONS = ("ung_damping", "ung_ema", "ung_inverse_every", "ung_update_every",
                "ung_kl_clip", "ung_trust_region")

_PAPER_OPTIONS: dict[str, Any] = {
    "optimizers": OPTIMIZERS,
    "fisher": "exact",
    "damping": 1e-4,
    "track_probe": 512,
    "per_decade": 8,
    "track_ung": True,
    "ung_lr": 0.01,
    # UnitNaturalGradient's defaults (tests/test_natural_gradient_gap.py checks them)
    "ung_damping": 0.1,
    "ung_ema": 0.95,
    "ung_inverse_every": 200,
    "ung_update_every": 20,
    "ung_kl_clip": 0.1,
    "ung_trust_region": "network",
}
_QUICK_OPTIONS = {**_PAPER_OPTIONS, "track_probe": 256, "per_decade": 4, "track_ung": False}


def check_trust_region(o: dict[str, Any]) -> None:
    """:class:`UsageError` unless ``o["ung_trust_region"]`` is one the optimiser knows."""
    from biasshift.optim.unit_natural_gradient import TRUST_REGIONS

    if o["ung_trust_region"] not in TRUST_REGIONS:
        raise UsageError(f"option ung_trust_region={o['ung_trust_region']!r}: choose one of "
                         f"{', '.join(TRUST_REGIONS)}")


def ung_factory(spec: RunSpec) -> OptimizerFactory | None:
    """``None`` (plain SGD) for ``spec.optimizer == "sgd"``, else a factory of the run's
    :class:`~biasshift.optim.UnitNaturalGradient` from its ``ung_*`` options (``lr`` the run's;
    ``ung_kl_clip`` ``none`` switches the clip off; a spec without ``ung_trust_region``, saved
    before the option existed, gets ``"units"``, the only region there was then).  Shared by
    the analyses with a natural-gradient arm."""
    if spec.optimizer == "sgd":
        return None
    from biasshift.optim import UnitNaturalGradient

    o = spec.options
    lr, damping, ema = spec.lr, float(o["ung_damping"]), float(o["ung_ema"])
    every, update = int(o["ung_inverse_every"]), int(o["ung_update_every"])
    kl = o["ung_kl_clip"]
    kl_clip = None if kl in (None, "none", "None") else float(kl)
    region = str(o.get("ung_trust_region", "units"))
    return lambda model: UnitNaturalGradient(model, lr=lr, damping=damping, ema=ema,
                                             inverse_every=every, update_every=update,
                                             kl_clip=kl_clip, trust_region=region)


class NaturalGradientGap(Analysis):
    name = "natural-gradient-gap"
    figure = "Section 2 (Theorems 1-2), measured"
    description = ("gradient vs unit natural gradient during training: cosine, bias shift, "
                   "|E_p(a)|, and training under the unit natural-gradient optimizer (8x128 MLP)")
    loss = "cross_entropy"
    tidy_columns = NG_COLUMNS
    presets = {  # noqa: RUF012
        "paper": Preset(dataset="mnist", epochs=15, seeds=3, activations=_ACTS, lrs=(0.01,),
                        batch_size=64, probe_size=10_000, model={"depth": 8, "width": 128},
                        options=dict(_PAPER_OPTIONS)),
        "quick": Preset(dataset="digits", epochs=5, seeds=1, activations=_ACTS, lrs=(0.01,),
                        batch_size=64, probe_size=10_000, model={"depth": 8, "width": 128},
                        options=dict(_QUICK_OPTIONS)),
    }

    # ------------------------------------------------------------------ settings and runs
    def validate(self, settings: Settings) -> None:
        super().validate(settings)
        o = settings.options
        opts = tuple(o["optimizers"])
        unknown = [x for x in opts if x not in OPTIMIZERS]
        if unknown or not opts or len(set(opts)) != len(opts):
            raise UsageError(f"option optimizers={','.join(opts)}: choose distinct names from "
                             f"{','.join(OPTIMIZERS)}")
        if o["fisher"] not in FISHER_KINDS:
            raise UsageError(f"option fisher={o['fisher']!r}: choose one of "
                             f"{', '.join(FISHER_KINDS)}")
        for key in ("damping", "ung_damping"):
            if not o[key] >= 0:
                raise UsageError(f"option {key}={o[key]!r} must be >= 0")
        for key in ("track_probe", "per_decade", "ung_inverse_every", "ung_update_every"):
            if o[key] < 1:
                raise UsageError(f"option {key}={o[key]!r} must be >= 1")
        if not o["ung_lr"] > 0:
            raise UsageError(f"option ung_lr={o['ung_lr']!r} must be > 0")
        if not 0 <= o["ung_ema"] < 1:
            raise UsageError(f"option ung_ema={o['ung_ema']!r} must be in [0, 1)")
        check_trust_region(o)

    def run_specs(self, settings: Settings) -> list[RunSpec]:
        """activations x optimizers x learning rates (SGD: ``--lr``; UNG: ``ung_lr``) x seeds."""
        o = settings.options
        specs = []
        for act in settings.activations:
            for opt in o["optimizers"]:
                lrs = settings.lrs if opt == "sgd" else (float(o["ung_lr"]),)
                tracked = opt == "sgd" or bool(o["track_ung"])
                keys = (_TRACKER_OPTIONS if tracked else ()) + (_UNG_OPTIONS if opt == "ung"
                                                                else ())
                options = {"tracked": tracked, **{k: o[k] for k in keys}}
                for lr in lrs:
                    for seed in range(settings.seeds):
                        specs.append(RunSpec(
                            analysis=self.name, run=RunSpec.run_id(act, lr, seed, opt),
                            dataset=settings.dataset, activation=act, seed=seed, lr=lr,
                            epochs=settings.epochs, batch_size=settings.batch_size,
                            probe_size=settings.probe_size, model=dict(settings.model),
                            optimizer=opt, options=dict(options)))
        return specs

    # ------------------------------------------------------------------ one run
    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        return paper_mlp(spec.activation, depth=int(spec.model["depth"]),
                         width=int(spec.model["width"]), in_features=dataset.in_features,
                         num_classes=dataset.num_classes)

    def plugins(self, spec: RunSpec) -> list[Plugin]:
        o = spec.options
        if not o.get("tracked"):
            return []
        return [BiasShiftTracker(
            probe_size=int(o["track_probe"]), probe_seed=0,
            schedule=StepSchedule.log_spaced(int(o["per_decade"]), epoch_ends=True),
            damping=float(o["damping"]), fisher=str(o["fisher"]), seed=spec.seed)]

    def optimizer(self, spec: RunSpec) -> OptimizerFactory | None:
        return ung_factory(spec)

    def run_frame(self, spec: RunSpec, frame: pd.DataFrame, run_dir: Path,
                  trainer: Trainer | None) -> pd.DataFrame:
        tracked = bool(spec.options.get("tracked"))
        info_path, summary_path = run_dir / INFO_NAME, run_dir / SUMMARY_NAME
        summ: pd.DataFrame | None = None
        if trainer is not None:
            spe = -(-int(trainer.dataset.train_x.shape[0]) // trainer.batch_size)
            info: dict[str, Any] = {"steps_per_epoch": spe}
            if tracked:
                tracker = next(p for p in trainer.plugins if isinstance(p, BiasShiftTracker))
                layers = tracker.layers
                summ = summarize_tracking(tracker.frame(), QUANTILES,
                                          pools={"all": None, "act_fed": layers[1:]})
                write_csv(summ, summary_path)
                info["tracker"] = tracker.info()
            write_json(info, info_path)
        else:
            if not info_path.exists() or (tracked and not summary_path.exists()):
                raise UsageError(f"{run_dir} lacks {INFO_NAME} or {SUMMARY_NAME}; rerun "
                                 "with --overwrite instead of --resume to train the run again")
            info = json.loads(info_path.read_text())
            if tracked:
                summ = pd.read_csv(summary_path, dtype={"run": str, "layer": str,
                                                        "quantity": str})
        spe = int(info["steps_per_epoch"])
        base = frame.assign(optimizer=spec.optimizer, step=frame["epoch"] * spe, stat="value")
        parts = [base]
        if summ is not None:
            parts.append(self._tracker_rows(spec, summ))
        df = pd.concat(parts, ignore_index=True)
        for col in ("optimizer", "stat", "layer", "quantity"):
            df[col] = df[col].astype(object)
        df["step"] = df["step"].astype(np.int64)
        df["epoch"] = df["epoch"].astype(np.int64)
        df["unit"] = df["unit"].astype("Int64")
        return df[list(NG_COLUMNS)]

    @staticmethod
    def _tracker_rows(spec: RunSpec, summ: pd.DataFrame) -> pd.DataFrame:
        summ = summ[summ["quantity"].isin(CSV_QUANTITIES)]
        pooled = summ["layer"].isin(POOLS)
        pieces = []
        for stat in ("median", "q0.25", "q0.75", "median_abs"):
            sel = summ if stat in ("median", "median_abs") else summ[pooled]
            if stat == "median_abs":
                sel = sel[sel["quantity"].isin(SIGNED)]
            pieces.append(sel[["epoch", "step", "layer", "quantity"]].assign(
                stat=stat, value=sel[stat].to_numpy(dtype=np.float64)))
        rows = pd.concat(pieces, ignore_index=True)
        return rows.assign(
            analysis=spec.analysis, run=spec.run, dataset=spec.dataset,
            activation=spec.activation, seed=spec.seed, lr=spec.lr, optimizer=spec.optimizer,
            unit=pd.array([pd.NA] * len(rows), dtype="Int64"),
        ).sort_values(["step", "layer", "quantity", "stat"], kind="stable", ignore_index=True)

    # ------------------------------------------------------------------ results
    def summary(self, df: pd.DataFrame, settings: Settings) -> dict[str, Any]:
        """Headline numbers (see the README section "Gradient vs unit natural gradient")."""
        o = settings.options
        out: dict[str, Any] = {
            "fisher": o["fisher"], "damping": o["damping"], "track_probe": o["track_probe"],
            "pool": "act_fed (every layer but the first)",
            "definition": "per activation and optimizer: median over runs and tracked steps "
                          "of the per-step median over the units of the act_fed layers; "
                          "'_epoch1' over the steps of epoch 1 only, '_after_epoch1' over the "
                          "later ones (the early phase differs: see panel a)",
        }
        acts = ordered(df["activation"], settings.activations)
        trk = df[(df["stat"] != "value")]
        per_act: dict[str, dict[str, float | None]] = {}
        for opt in ("sgd", "ung"):
            t = trk[(trk["optimizer"] == opt) & (trk["layer"] == "act_fed")]
            if t.empty:
                continue
            for act in acts:
                ta = t[t["activation"] == act]
                if ta.empty:
                    continue

                def med(q: str, stat: str = "median", ta: pd.DataFrame = ta) -> float | None:
                    v = ta[(ta["quantity"] == q) & (ta["stat"] == stat)]["value"]
                    v = v[np.isfinite(v.to_numpy(dtype=float))]
                    return float(v.median()) if len(v) else None

                for window, sel in (("_epoch1", ta["epoch"] <= 1),
                                    ("_after_epoch1", ta["epoch"] > 1)):
                    for q in ("cos_grad_ng", "norm_E_p_a"):
                        per_act.setdefault(act, {})[f"{opt}_median_{q}{window}"] = med(
                            q, ta=ta[sel])
                per_act.setdefault(act, {}).update({
                    f"{opt}_median_cos_grad_ng": med("cos_grad_ng"),
                    f"{opt}_median_norm_E_p_a": med("norm_E_p_a"),
                    f"{opt}_median_norm_E_q_a": med("norm_E_q_a"),
                    f"{opt}_median_k": med("k"),
                    f"{opt}_median_abs_bias_shift_measured": med("step_bias_shift_measured",
                                                                 "median_abs"),
                    f"{opt}_median_abs_bias_shift_first_order": med(
                        "step_bias_shift_first_order", "median_abs"),
                    f"{opt}_median_abs_bias_shift_ng_step": med("step_bias_shift_ng",
                                                                "median_abs"),
                })
        out["per_activation"] = per_act
        out["spearman"] = self._spearman(df)
        out["train_loss"] = self._loss_spread(df, settings)
        return out

    @staticmethod
    def _layer_points(df: pd.DataFrame, optimizer: str = "sgd") -> pd.DataFrame:
        """Per (run, layer, step): median cosine and |E_p(a)| of the act_fed layers."""
        t = df[(df["optimizer"] == optimizer) & (df["stat"] == "median")
               & ~df["layer"].isin(POOLS)
               & df["quantity"].isin(["cos_grad_ng", "norm_E_p_a"])]
        if t.empty:
            return pd.DataFrame(columns=["activation", "run", "layer", "step", "cos_grad_ng",
                                         "norm_E_p_a"])
        first = {r: sorted(g["layer"].unique(), key=_layer_order)[0]
                 for r, g in t.groupby("run")}
        t = t[t["layer"] != t["run"].map(first)]
        wide = t.pivot_table(index=["activation", "run", "layer", "step"], columns="quantity",
                             values="value", aggfunc="first").reset_index()
        return wide.dropna(subset=["cos_grad_ng", "norm_E_p_a"])

    def _spearman(self, df: pd.DataFrame) -> dict[str, Any]:
        from scipy.stats import spearmanr

        pts = self._layer_points(df)
        res: dict[str, Any] = {"points": "(SGD run, act_fed layer, tracked step): the layer's "
                                         "median cosine vs its |E_p(a)|",
                               "n": len(pts)}
        if len(pts) >= 3:
            rho, p = spearmanr(pts["norm_E_p_a"], pts["cos_grad_ng"])
            res.update(rho=float(rho), p_value=float(p))
            res["per_activation"] = {}
            for act, g in pts.groupby("activation", sort=False):
                if len(g) >= 3:
                    r, _ = spearmanr(g["norm_E_p_a"], g["cos_grad_ng"])
                    res["per_activation"][act] = float(r)
        return res

    @staticmethod
    def _seed_mean_loss(df: pd.DataFrame) -> pd.DataFrame:
        loss = df[(df["quantity"] == "train_loss") & (df["stat"] == "value")]
        loss = loss[np.isfinite(loss["value"].to_numpy(dtype=float))]
        return loss.groupby(["optimizer", "activation", "epoch"])["value"].agg(
            ["mean", "std", "count"]).reset_index()

    @staticmethod
    def _spread(m: pd.DataFrame) -> pd.DataFrame:
        """Per (optimizer, epoch) over activations of the seed-mean loss: ``mean``, ``range``
        (max − min) and ``ratio`` (max / min); only epochs with two or more activations."""
        g = m.groupby(["optimizer", "epoch"])["mean"]
        out = pd.DataFrame({"n": g.size(), "mean": g.mean(), "range": g.max() - g.min(),
                            "ratio": g.max() / g.min()}).reset_index()
        return out[out["n"] >= 2]

    def _loss_spread(self, df: pd.DataFrame, settings: Settings) -> dict[str, Any]:
        m = self._seed_mean_loss(df)
        out: dict[str, Any] = {
            "definition": "over activations, of the seed-mean training loss at an epoch: range "
                          "(max - min) and ratio (max / min); a smaller range at a lower loss "
                          "with the same ratio is no relative shrinkage",
        }
        last = int(df["epoch"].max()) if len(df) else 0
        marks = {e for e in (1, max(1, last // 3), max(1, 2 * last // 3), last)
                 if 1 <= e <= last}
        sp = self._spread(m)
        for opt, g in m.groupby("optimizer"):
            s_opt = sp[(sp["optimizer"] == opt) & sp["epoch"].isin(marks)]
            final = g[g["epoch"] == last]
            out[str(opt)] = {
                "range_at_epoch": {str(int(e)): float(v) for e, v in
                                   zip(s_opt["epoch"], s_opt["range"])},
                "ratio_at_epoch": {str(int(e)): float(v) for e, v in
                                   zip(s_opt["epoch"], s_opt["ratio"])},
                "final_mean_per_activation": {a: float(v) for a, v in
                                              zip(final["activation"], final["mean"])},
            }
        if "sgd" in out and "ung" in out:
            for key in ("range", "ratio"):
                s, u = (out[k][f"{key}_at_epoch"].get(str(last)) for k in ("sgd", "ung"))
                if s and u is not None:
                    out[f"final_{key}_ung_over_sgd"] = u / s
        return out

    # ------------------------------------------------------------------ the figure
    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        o = settings.options
        fig = Figure(figsize=(17, 9.5), layout="constrained")
        axes = fig.subplots(2, 3)
        (ax_a, ax_b, ax_c), (ax_d, ax_e, ax_f) = axes
        acts = ordered(df["activation"], settings.activations)
        trk = df[df["stat"] != "value"]
        pool = trk[trk["layer"] == "act_fed"]

        # (a) cosine vs step; UNG runs have lines only when they were tracked (track_ung)
        self._step_lines(ax_a, pool, acts, "cos_grad_ng", band=True)
        cos_rows = pool[pool["quantity"] == "cos_grad_ng"]
        drawn = [opt for opt in ("sgd", "ung") if (cos_rows["optimizer"] == opt).any()]
        ax_a.set_xscale("log")
        ax_a.set_xlabel("optimizer step")
        ax_a.set_ylabel("median over units of cos(g, (F+λI)⁻¹g)")
        if drawn == ["sgd", "ung"]:
            what = "SGD solid, UNG dashed"
        elif drawn == ["sgd"]:
            what = ("SGD runs; UNG runs untracked" if "ung" in o["optimizers"] else "SGD runs")
        else:
            what = "UNG runs (dashed)" if drawn else "no tracked runs"
        ax_a.set_title(f"a  gradient vs unit natural gradient ({what};\n"
                       "   band: IQR over units, mean over seeds)", loc="left",
                       fontsize="medium")
        handles_a = self._act_handles(acts)
        if len(drawn) == 2:  # the line styles need a key only when both are drawn
            handles_a += [Line2D([], [], color="0.3", ls="-", label="SGD"),
                          Line2D([], [], color="0.3", ls="--", label="UNG")]
        ax_a.legend(handles=handles_a, fontsize="small")

        # (b) |bias shift| of the step
        sgd_pool = pool[pool["optimizer"] == "sgd"]
        for q, ls in (("step_bias_shift_measured", "-"), ("step_bias_shift_first_order", "--"),
                      ("step_bias_shift_ng", ":")):
            self._step_lines(ax_b, sgd_pool, acts, q, stat="median_abs", linestyle=ls)
        ax_b.set_xscale("log")
        ax_b.set_yscale("log")
        ax_b.set_xlabel("optimizer step")
        ax_b.set_ylabel("median over units of |bias shift| of one step")
        ax_b.set_title("b  SGD step: measured (solid), first order Δw₀+E_p(a)ᵀΔw (dashed);\n"
                       "   natural-gradient step, same g and lr (dotted)", loc="left",
                       fontsize="medium")
        ax_b.legend(handles=self._act_handles(acts), fontsize="small")

        # (c) |E_p(a)| vs cosine across (run, layer, step)
        pts = self._layer_points(df)
        for act in acts:
            p = pts[pts["activation"] == act]
            ax_c.scatter(p["norm_E_p_a"], p["cos_grad_ng"], s=9, alpha=0.5, lw=0,
                         color=activation_color(act), label=activation_label(act))
        sp = self._spearman(df)
        text = (f"Spearman ρ = {sp['rho']:.2f} (n = {sp['n']})" if "rho" in sp
                else "too few points")
        ax_c.text(0.98, 0.97, text, transform=ax_c.transAxes, ha="right", va="top",
                  fontsize="small", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax_c.set_xlabel("|E_p(a)| of the layer's incoming activations (probe)")
        ax_c.set_ylabel("layer median of cos(g, (F+λI)⁻¹g)")
        ax_c.set_title("c  per (SGD run, layer, step); layers fc2..out", loc="left",
                       fontsize="medium")
        if len(pts):
            ax_c.legend(fontsize="small", markerscale=2)

        # (d) training loss, SGD vs UNG
        whole = df[(df["stat"] == "value") & (df["epoch"] >= 1)]
        for opt, ls in (("sgd", "-"), ("ung", "--")):
            d = whole[whole["optimizer"] == opt]
            plot_seed_lines(ax_d, d[d["quantity"] == "train_loss"], d, settings, band=False,
                            linestyle=ls, label=opt == "sgd")
        ax_d.set_yscale("log")
        ax_d.set_xlabel("epoch")
        ax_d.set_ylabel("training cross-entropy (mean over seeds)")
        ax_d.set_title("d  training loss: SGD (solid), unit natural gradient (dashed)",
                       loc="left", fontsize="medium")
        handles = self._act_handles(acts)
        for opt, ls in (("sgd", "-"), ("ung", "--")):
            d = df[df["optimizer"] == opt]
            if d.empty:
                continue
            n_div = d.loc[d["quantity"] == "diverged", "run"].nunique()
            text = opt.upper() + (f" ({n_div}/{d['run'].nunique()} runs diverged)" if n_div
                                  else "")
            handles.append(Line2D([], [], color="0.3", ls=ls, label=text))
        ax_d.legend(handles=handles, fontsize="small")

        # (e) spread across activations against the loss level
        sp = self._spread(self._seed_mean_loss(df[df["epoch"] >= 1]))
        for opt, ls in (("sgd", "-"), ("ung", "--")):
            g = sp[sp["optimizer"] == opt].sort_values("epoch")
            if g.empty:
                continue
            ax_e.plot(g["mean"], g["range"], color="0.2", ls=ls, marker="o", ms=3,
                      label={"sgd": "SGD", "ung": "unit natural gradient"}[opt])
            for e, x, y in zip(g["epoch"], g["mean"], g["range"]):
                ax_e.annotate(str(int(e)), (x, y), fontsize="x-small", xytext=(3, 2),
                              textcoords="offset points", color="0.35")
        if ax_e.lines:
            for axis, values in (("x", sp["mean"]), ("y", sp["range"])):
                v = values.to_numpy(dtype=float)
                v = v[np.isfinite(v) & (v > 0)]
                if len(v) and v.max() > 10 * v.min():  # log only when it spans a decade
                    getattr(ax_e, f"set_{axis}scale")("log")
            ax_e.legend(fontsize="small")
        ax_e.set_xlabel("mean over activations of the training loss")
        ax_e.set_ylabel("max − min over activations of the training loss")
        ax_e.set_title("e  spread between activations vs loss level (numbers: epochs)",
                       loc="left", fontsize="medium")

        # (f) per-layer heatmap
        self._heatmap(ax_f, fig, trk, acts)

        width, depth = settings.model.get("width"), settings.model.get("depth")
        lrs = ", ".join(f"{lr:g}" for lr in settings.lrs)
        ung = (f"; UNG lr {o['ung_lr']:g}, relative damping {o['ung_damping']:g}, kl_clip "
               f"{o['ung_kl_clip']} ({o['ung_trust_region']} region), ema {o['ung_ema']:g}"
               if "ung" in o["optimizers"] else "")
        fig.suptitle(figure_title(
            f"Gradient vs unit natural gradient: {depth}x{width} MLP, SGD lr {lrs}{ung}; "
            f"tracker: {o['fisher']} Fisher, damping λ = {o['damping']:g}, probe "
            f"{o['track_probe']}", settings))
        return fig

    @staticmethod
    def _act_handles(acts: list[str]) -> list[Line2D]:
        return [Line2D([], [], color=activation_color(a), label=activation_label(a))
                for a in acts]

    @staticmethod
    def _step_lines(ax: Any, pool: pd.DataFrame, acts: list[str], quantity: str, *,
                    stat: str = "median", band: bool = False, linestyle: str | None = None
                    ) -> None:
        q = pool[pool["quantity"] == quantity]
        for opt in ("sgd", "ung"):
            qo = q[q["optimizer"] == opt]
            ls = linestyle or ("-" if opt == "sgd" else "--")
            for act in acts:
                qa = qo[qo["activation"] == act]
                if qa.empty:
                    continue
                wide = qa.pivot_table(index="step", columns="stat", values="value",
                                      aggfunc="mean")
                if stat not in wide:
                    continue
                color = activation_color(act)
                ax.plot(wide.index, wide[stat], color=color, ls=ls, lw=1.4)
                if band and {"q0.25", "q0.75"} <= set(wide.columns):
                    ax.fill_between(wide.index, wide["q0.25"], wide["q0.75"], color=color,
                                    alpha=0.12 if opt == "sgd" else 0.06, lw=0)

    @staticmethod
    def _heatmap(ax: Any, fig: Figure, trk: pd.DataFrame, acts: list[str]) -> None:
        t = trk[(trk["optimizer"] == "sgd") & (trk["quantity"] == "cos_grad_ng")
                & (trk["stat"] == "median") & ~trk["layer"].isin(POOLS)]
        if t.empty:
            ax.text(0.5, 0.5, "no tracked SGD runs", ha="center", va="center")
            ax.set_axis_off()
            return
        grid = t.groupby(["layer", "activation"])["value"].median().unstack("activation")
        grid = grid.reindex(index=sorted(grid.index, key=_layer_order),
                            columns=[a for a in acts if a in grid.columns])
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid.iat[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                            color="white" if v < np.nanmean(grid.to_numpy(dtype=float))
                            else "black")
        ax.set_xticks(range(grid.shape[1]), [activation_label(a) for a in grid.columns])
        ax.set_yticks(range(grid.shape[0]), list(grid.index))
        ax.set_title("f  median cos(g, (F+λI)⁻¹g) per layer (SGD, over seeds and steps)",
                     loc="left", fontsize="medium")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label("median cos(g, (F+λI)⁻¹g)")


def _layer_order(name: str) -> tuple[int, int, str]:
    """fc1 < fc2 < ... < fc10 < out < anything else."""
    digits = "".join(ch for ch in name if ch.isdigit())
    if name == "out":
        return (1, 0, name)
    return (0, int(digits) if digits else 10**9, name)


register(NaturalGradientGap())
