"""``conv-activations`` — the paper's conv-net comparison (Section 4.3, Fig. 4 and 5), with BN.

The paper trains its 11-layer CIFAR-100 net (:func:`~biasshift.models.cifar_conv11`) 10 times
per unit and reports test errors ELU 28.75 ± 0.24 % < SReLU 29.35 < LReLU 30.59 < ReLU 31.56
(Wilcoxon signed-rank p < 0.001), and that batch normalisation improves ReLU and LReLU but not
ELU or SReLU, with ELU beating ReLU + BN. This analysis runs that protocol:

* **Net**: the 11-layer stacks ``[1×192×5], [1×192×1, 1×240×3], ..., [1×300×1],
  [1×num_classes×1]`` with every hidden width times ``width`` (option; the paper: 1), 2x2 max
  pooling after as many leading stacks as the input allows
  (:func:`~biasshift.models.conv.cifar_pooled_stacks`: 5 at 32x32 — CIFAR, 32 -> 1 — and 4 at
  28x28 — Fashion-MNIST, 28 -> 14 -> 7 -> 3 -> 1; 3 for the 8x8 digits), dropout after the
  last layer of each stack ``(0, .1, .2, .3, .4, .5, 0)``.
* **Arms**: every activation (``--activations``, default ELU, SReLU, LReLU, ReLU) with and
  without batch normalisation (option ``bn``), i.e. 8 arms; option ``arms`` (e.g.
  ``elu,elu-bn,relu,relu-bn,srelu,lrelu``) keeps a subset of them; option
  ``finished_only`` keeps only the runs already finished in ``--work-dir`` (publish an
  interrupted analysis without training; the tests then use the seeds both arms have).
* **Paired seeds**: run ``r`` of every arm starts from the same initial weights
  (:func:`~biasshift.models.conv.paired_he_init_`: He normal from a generator seeded by the
  run's seed, independent of activation and BN; a BN net differs from its plain twin only by
  its BN parameters and the absent conv biases), sees the same mini-batch order (the trainer's
  data stream) and, since all arms have the same shapes, the same dropout masks.
* **Training**: SGD with momentum 0.9 and L2 weight decay 5e-4 (options), mini-batch 100,
  the paper's step schedule 0.01 / 0.005 / 0.0005 / 0.00005 at 35k / 85k / 135k of 165k
  iterations, scaled to the run's length (:class:`~biasshift.train.PaperCifarSchedule`).
* **Data**: ``--dataset cifar100`` / ``cifar10`` with the paper's global contrast
  normalisation and ZCA whitening (:func:`~biasshift.data.gcn_zca`, fitted on the training
  split, cached per process) and its 4-pixel zero padding with random 32x32 crops and flips
  (:func:`~biasshift.data.pad_crop_flip`, on the training batches); ``fashion-mnist`` (the
  default here, kept at **28x28**, 1 channel, standardised by the training set's pixel mean
  and sd, no augmentation) or the digits (quick preset). Options ``train_subset`` /
  ``test_subset`` keep the first images of each split (0: all).
* **Monitor**: an :class:`~biasshift.ActivationMonitor` on every activation module (channels
  as units: a channel's ``N·H·W`` values are its samples) over the training mini-batches of
  each epoch (train mode, reset every epoch): ``train_median_of_means`` per layer; and the
  trainer's fixed-probe statistic (Fig. 2's protocol, eval mode) ``median_of_means`` per
  layer. Both with and without BN (with BN the activations follow the normalised convolution).

Presets: ``paper`` — the reduced CPU protocol on Fashion-MNIST: width 1/8, the first 20,000
training and 5,000 test images, 6 epochs (1,200 steps), 6 paired seeds, about 100 minutes with
``--jobs 2`` on two cores (its exact scale is also in the JSON and the figure title);
``cuda`` (chosen by ``--device cuda``) — the paper's scale: CIFAR-100, full width, 10 seeds,
330 epochs of 500 steps (165k iterations at batch 100);
``quick`` — the digits, width 1/16, 2 epochs, 2 seeds (a smoke test, no claim).

Tidy CSV: the usual columns plus ``batch_norm`` (0/1). Rows: the trainer's per-epoch
quantities (``test_acc`` ...; the figure and statistics use ``test_error = 1 - test_acc``),
``median_of_means`` (probe) and ``train_median_of_means`` (monitor) per layer
(``stack1.act1`` ...) and pooled (``all``), and ``train_seconds_per_step`` per epoch.

Statistics (JSON ``summary``; :mod:`biasshift.reproduce.conv_stats`): final test error mean ±
sd per arm; the exact two-sided Wilcoxon signed-rank p for every pair of arms over the paired
seeds (smallest attainable ``2/2^n``); per activation the BN effect (BN minus plain, per seed)
with a run-level bootstrap 95 % CI; the optimizer steps to a target test error (option
``target_error``; 0 = the median over arms of their mean final error, rounded up to 0.5 %, so
about half the arms reach it on average; arms that never do are counted as not reaching it);
the training wall time per step, ELU / ReLU (paired per seed; the paper: ELU 5 % slower).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor, nn

from biasshift.data.base import ArrayDataset
from biasshift.io import write_csv
from biasshift.models.conv import cifar_conv11, cifar_pooled_stacks, paired_he_init_
from biasshift.reproduce.base import (
    TIDY_COLUMNS,
    Analysis,
    Preset,
    RunSpec,
    Settings,
    UsageError,
    register,
)
from biasshift.reproduce.conv_stats import (
    mean_sd,
    paired_bootstrap_ci,
    smallest_p,
    wilcoxon_exact,
)
from biasshift.reproduce.plotting import (
    activation_color,
    activation_label,
    figure_title,
    ordered,
)
from biasshift.train.plugins import MonitorPlugin, Plugin
from biasshift.train.schedule import PaperCifarSchedule
from biasshift.train.trainer import derive_seed

if TYPE_CHECKING:
    from biasshift.train.trainer import Augment, OptimizerFactory, Trainer

__all__ = ["CONV_COLUMNS", "ConvActivations", "IterationTimer", "arm_label"]

_ACTS = ("elu", "srelu", "lrelu", "relu")  # the paper's order (best to worst)
CONV_COLUMNS = (*TIDY_COLUMNS[:5], "batch_norm", *TIDY_COLUMNS[5:])
MONITOR_NAME = "monitor_medians.csv"
CIFAR = ("cifar10", "cifar100")

#: the options that shape a run (the others only shape the summary)
_RUN_OPTIONS = ("width", "train_subset", "test_subset", "momentum", "weight_decay",
                "schedule", "preprocess", "augment", "monitor")

_BASE_OPTIONS: dict[str, Any] = {
    "bn": (False, True),
    "width": 0.125,
    "train_subset": 0,
    "test_subset": 0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "paper",
    "preprocess": "auto",
    "augment": "auto",
    "monitor": True,
    "target_error": 0.0,
    "arms": (),
    "finished_only": False,
}
#: the reduced CPU protocol committed in figures/ (2 shared cores, about 80 minutes): the
#: monitor is off there (its per-batch cost, see analyses/bench_conv.py); the probe statistic
#: ``median_of_means`` (the paper's Fig. 2 protocol) is recorded for every layer either way
_PAPER_OPTIONS = {**_BASE_OPTIONS, "width": 0.125, "train_subset": 20_000,
                  "test_subset": 5_000, "monitor": False}
_CUDA_OPTIONS = {**_BASE_OPTIONS, "width": 1.0}
_QUICK_OPTIONS = {**_BASE_OPTIONS, "width": 0.0625}


def _arm_name(activation: str, batch_norm: bool | int) -> str:
    return activation + ("-bn" if int(batch_norm) else "")


def arm_label(activation: str, batch_norm: bool | int) -> str:
    """``ELU`` / ``ELU+BN``."""
    return activation_label(activation) + ("+BN" if int(batch_norm) else "")


class IterationTimer(Plugin):
    """Training wall time per optimizer step, per epoch (``train_seconds_per_step``).

    Measured from the first ``on_before_step`` of an epoch (after its first forward and
    backward pass) to the evaluation that ends it, divided by the steps in between; evaluation,
    probe and checkpoint writes are left out. On CUDA it synchronises once per epoch (at the
    evaluation), never per step. Stateless and stackable: in a stack of ``K`` runs
    (:class:`~biasshift.train.batched.BatchedTrainer`) a step trains all of them, and each
    member records its share, the stack's step time divided by ``K``
    (``trainer.stack_members``), so that a stacked run's time is comparable with the
    single runs' it replaces (not with its stack-mates': they all record the same share).
    """

    stackable = True

    def __init__(self) -> None:
        self._t0: float | None = None
        self._s0 = 0
        self._value: float | None = None

    def on_before_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                       loss: Tensor) -> None:
        if self._t0 is None:
            self._t0, self._s0 = time.perf_counter(), step

    def on_evaluate_start(self, trainer: Trainer) -> None:
        if self._t0 is None:
            return
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        steps = trainer.step - 1 - self._s0
        secs = time.perf_counter() - self._t0
        share = secs / getattr(trainer, "stack_members", 1)
        self._value = share / steps if steps > 0 else math.nan
        self._t0 = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if self._value is not None:
            trainer.log("train_seconds_per_step", self._value)
            self._value = None
        trainer.log("step", trainer.step)


class _EpochMonitor(MonitorPlugin):
    """A :class:`MonitorPlugin` whose :class:`~biasshift.ActivationMonitor` is built on the
    trainer's model at ``on_fit_start`` (the analysis makes plug-ins before the model exists);
    snapshots every epoch and resets, so each snapshot covers that epoch's training batches."""

    def __init__(self) -> None:
        self._entered = False
        self.snapshot = "epoch"
        self.reset_after_snapshot = True
        self.include_evaluation = False
        self.monitor: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from biasshift.monitor.activation_monitor import ActivationMonitor

        self.monitor = ActivationMonitor(trainer.model)
        super().on_fit_start(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.monitor is None else super().state_dict()


_PREP_CACHE: dict[tuple[Any, ...], ArrayDataset] = {}


def _standardise(ds: ArrayDataset) -> ArrayDataset:
    from dataclasses import replace

    x = ds.train_x.double()
    mean, sd = float(x.mean()), float(x.std())
    if not sd > 0:
        raise UsageError(f"conv-activations: dataset {ds.name!r} has constant training images; "
                         "cannot standardise")
    return replace(ds, train_x=((ds.train_x - mean) / sd).float(),
                   test_x=((ds.test_x - mean) / sd).float())


class ConvActivations(Analysis):
    name = "conv-activations"
    figure = "Fig. 4-5 (Section 4.3)"
    description = ("11-layer conv net (width-scaled): ELU/SReLU/LReLU/ReLU with and without "
                   "BN, paired seeds, Wilcoxon tests, median unit means per layer")
    loss = "cross_entropy"
    tidy_columns = CONV_COLUMNS
    # the arms of one BN setting share the net: "auto" stacks them on CUDA (on the CPU grouped
    # convolutions are slower, so they run one by one there); runs with the ActivationMonitor
    # (option monitor) always run one by one
    batch_runs = "auto"
    presets = {  # noqa: RUF012
        "paper": Preset(dataset="fashion-mnist", epochs=6, seeds=6, activations=_ACTS,
                        lrs=(0.01,), batch_size=100, probe_size=500,
                        options=dict(_PAPER_OPTIONS)),
        "cuda": Preset(dataset="cifar100", epochs=330, seeds=10, activations=_ACTS,
                       lrs=(0.01,), batch_size=100, probe_size=2000,
                       options=dict(_CUDA_OPTIONS)),
        "quick": Preset(dataset="digits", epochs=2, seeds=2, activations=_ACTS, lrs=(0.01,),
                        batch_size=100, probe_size=300, options=dict(_QUICK_OPTIONS)),
    }

    # ------------------------------------------------------------------ settings and runs
    def validate(self, settings: Settings) -> None:
        super().validate(settings)
        o = settings.options
        bn = tuple(bool(b) for b in o["bn"])
        if not bn or len(set(bn)) != len(bn):
            raise UsageError(f"option bn={o['bn']!r}: give off, on or off,on (distinct)")
        if not o["width"] > 0:
            raise UsageError(f"option width={o['width']!r} must be > 0 (1: the paper's net)")
        for key in ("train_subset", "test_subset"):
            if o[key] < 0:
                raise UsageError(f"option {key}={o[key]!r} must be >= 0 (0: all images)")
        if not 0 <= o["momentum"] < 1 or not o["weight_decay"] >= 0:
            raise UsageError("options momentum (in [0, 1)) and weight_decay (>= 0) out of range: "
                             f"{o['momentum']!r}, {o['weight_decay']!r}")
        for key, allowed in (("schedule", ("paper", "constant")),
                             ("preprocess", ("auto", "gcn_zca", "standardise", "none")),
                             ("augment", ("auto", "on", "off"))):
            if o[key] not in allowed:
                raise UsageError(f"option {key}={o[key]!r}: choose one of {', '.join(allowed)}")
        names = [_arm_name(a, b) for a in settings.activations for b in bn]
        bad = [x for x in o["arms"] if x not in names]
        if bad:
            raise UsageError(f"option arms={','.join(o['arms'])}: {', '.join(bad)} not among the "
                             f"arms of --activations and bn: {', '.join(names)}")
        if o["finished_only"] and not self.run_specs(settings):
            raise UsageError(f"option finished_only: no finished run of these settings in "
                             f"{settings.work_dir}; train them first (leave the option out)")
        if not 0 <= o["target_error"] < 1:
            raise UsageError(f"option target_error={o['target_error']!r} must be in [0, 1) "
                             "(0: the median over arms of their mean final test error)")

    def run_specs(self, settings: Settings) -> list[RunSpec]:
        """Seed-major: every arm of seed 0, then of seed 1, ... (so an interrupted run leaves
        complete pairs, and arms of one seed run close in time for the timing ratio). With
        ``finished_only`` only the runs with a ``done.json`` in ``--work-dir``."""
        o = settings.options
        run_opts = {k: o[k] for k in _RUN_OPTIONS}
        specs = []
        for seed in range(settings.seeds):
            for lr in settings.lrs:
                for act in settings.activations:
                    for bn in o["bn"]:
                        if o["arms"] and _arm_name(act, bn) not in o["arms"]:
                            continue
                        run = RunSpec.run_id(_arm_name(act, bn), lr, seed)
                        if o["finished_only"] and not (
                                Path(settings.work_dir) / run / "done.json").is_file():
                            continue
                        specs.append(RunSpec(
                            analysis=self.name, run=run, dataset=settings.dataset,
                            activation=act, seed=seed, lr=lr, epochs=settings.epochs,
                            batch_size=settings.batch_size, probe_size=settings.probe_size,
                            model={"net": "cifar_conv11", "width": float(o["width"]),
                                   "batch_norm": bool(bn)},
                            optimizer="sgd-momentum", options=dict(run_opts),
                            # the subset as the runner's own (so the record's n_train is it)
                            train_size=int(o["train_subset"]) or None,
                            test_size=int(o["test_subset"]) or None))
        return specs

    # ------------------------------------------------------------------ one run
    def prepare_dataset(self, spec: RunSpec, dataset: ArrayDataset) -> ArrayDataset:
        o = spec.options
        n_tr, n_te = int(o["train_subset"]) or None, int(o["test_subset"]) or None
        if n_tr is not None or n_te is not None:
            dataset = dataset.subset(n_tr, n_te)
        prep = o["preprocess"]
        if prep == "auto":
            prep = "gcn_zca" if spec.dataset in CIFAR else "standardise"
        if prep == "none":
            return dataset
        key = (spec.dataset, prep, dataset.train_x.data_ptr(), tuple(dataset.train_x.shape),
               dataset.test_x.data_ptr(), tuple(dataset.test_x.shape), str(dataset.device))
        if key not in _PREP_CACHE:
            _PREP_CACHE.clear()
            if prep == "gcn_zca":
                from biasshift.data.preprocess import gcn_zca

                _PREP_CACHE[key] = gcn_zca(dataset)[0]
            else:
                _PREP_CACHE[key] = _standardise(dataset)
        return _PREP_CACHE[key]

    def augment(self, spec: RunSpec) -> Augment | None:
        a = spec.options["augment"]
        if a == "off" or (a == "auto" and spec.dataset not in CIFAR):
            return None
        from biasshift.data.preprocess import pad_crop_flip

        def crop_flip(x: Tensor, gen: torch.Generator) -> Tensor:
            return pad_crop_flip(x, 4, generator=gen)  # type: ignore[return-value]

        return crop_flip

    def build_model(self, spec: RunSpec, dataset: ArrayDataset) -> nn.Module:
        c, h, w = dataset.input_shape
        net = cifar_conv11(spec.activation, num_classes=dataset.num_classes,
                           batch_norm=bool(spec.model["batch_norm"]), dropout=True,
                           in_channels=c, width=float(spec.model["width"]),
                           pooled_stacks=cifar_pooled_stacks(min(h, w)))
        return paired_he_init_(net, derive_seed(spec.seed, "conv-init"))

    def optimizer(self, spec: RunSpec) -> OptimizerFactory | None:
        lr, mom, wd = spec.lr, float(spec.options["momentum"]), float(
            spec.options["weight_decay"])
        return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=mom,
                                             weight_decay=wd)

    def plugins(self, spec: RunSpec) -> list[Plugin]:
        plugins: list[Plugin] = [IterationTimer()]
        if spec.options["schedule"] == "paper":
            plugins.insert(0, PaperCifarSchedule())
        if spec.options["monitor"]:
            plugins.append(_EpochMonitor())
        return plugins

    def run_frame(self, spec: RunSpec, frame: pd.DataFrame, run_dir: Path,
                  trainer: Trainer | None) -> pd.DataFrame:
        path = run_dir / MONITOR_NAME
        mon: pd.DataFrame | None = None
        if spec.options["monitor"]:
            if trainer is not None:
                plugin = next(p for p in trainer.plugins if isinstance(p, _EpochMonitor))
                mon = self._monitor_rows(plugin.history())
                write_csv(mon, path)
            else:
                if not path.exists():
                    raise UsageError(f"{run_dir} lacks {MONITOR_NAME}; rerun with --overwrite "
                                     "instead of --resume to train the run again")
                mon = pd.read_csv(path, dtype={"layer": str, "quantity": str})
        parts = [frame]
        if mon is not None and len(mon):
            rows = mon.assign(analysis=spec.analysis, run=spec.run, dataset=spec.dataset,
                              activation=spec.activation, seed=spec.seed, lr=spec.lr,
                              unit=pd.array([pd.NA] * len(mon), dtype="Int64"))
            parts.append(rows[list(TIDY_COLUMNS)])
        df = pd.concat(parts, ignore_index=True)
        df.insert(5, "batch_norm", int(bool(spec.model["batch_norm"])))
        for col in ("layer", "quantity", "activation", "run", "dataset", "analysis"):
            df[col] = df[col].astype(object)
        df["epoch"] = df["epoch"].astype(np.int64)
        df["unit"] = df["unit"].astype("Int64")
        return df[list(CONV_COLUMNS)]

    @staticmethod
    def _monitor_rows(hist: pd.DataFrame) -> pd.DataFrame:
        """Per epoch and layer the median over channels of their training-batch means, and the
        median over every layer's channels (``all``)."""
        cols = ["epoch", "layer", "quantity", "value"]
        if hist.empty:
            return pd.DataFrame(columns=cols)
        h = hist[np.isfinite(hist["mean"].to_numpy(dtype=float))]
        per = h.groupby(["epoch", "module"], sort=False)["mean"].median().reset_index()
        per = per.rename(columns={"module": "layer", "mean": "value"})
        pooled = h.groupby("epoch", sort=False)["mean"].median().reset_index()
        pooled = pooled.rename(columns={"mean": "value"}).assign(layer="all")
        out = pd.concat([per, pooled], ignore_index=True).assign(
            quantity="train_median_of_means")
        out["epoch"] = out["epoch"].astype(np.int64)
        return out[cols]

    # ------------------------------------------------------------------ results
    @staticmethod
    def final_errors(df: pd.DataFrame) -> pd.DataFrame:
        """One row per run: ``activation, batch_norm, seed, test_error`` at the last epoch."""
        acc = df[(df["quantity"] == "test_acc") & (df["layer"] == "all")]
        last = acc.sort_values("epoch").groupby("run", sort=False).tail(1)
        out = last[["run", "activation", "batch_norm", "seed", "epoch"]].copy()
        out["test_error"] = 1.0 - last["value"].to_numpy(dtype=float)
        return out.reset_index(drop=True)

    def summary(self, df: pd.DataFrame, settings: Settings) -> dict[str, Any]:
        o = settings.options
        fin = self.final_errors(df)
        acts = ordered(fin["activation"], settings.activations)
        bns = [int(bool(b)) for b in o["bn"]]
        arms = [(a, b) for a in acts for b in bns
                if len(fin[(fin["activation"] == a) & (fin["batch_norm"] == b)])]
        err = {(a, b): fin[(fin["activation"] == a) & (fin["batch_norm"] == b)]
               .set_index("seed")["test_error"] for a, b in arms}
        per_arm = {}
        for a, b in arms:
            m, sd, n = mean_sd(err[(a, b)].to_numpy())
            per_arm[arm_label(a, b)] = {"test_error_mean": m, "test_error_sd": sd, "n": n}
        pairs = []
        for i, x in enumerate(arms):
            for y in arms[i + 1:]:
                common = sorted(set(err[x].index) & set(err[y].index))
                dx = err[x].loc[common].to_numpy()
                dy = err[y].loc[common].to_numpy()
                keep = np.isfinite(dx) & np.isfinite(dy)
                w, p = wilcoxon_exact(dx[keep], dy[keep]) if keep.any() else (math.nan, 1.0)
                pairs.append({"a": arm_label(*x), "b": arm_label(*y), "n": int(keep.sum()),
                              "mean_diff_a_minus_b": float(np.mean(dx[keep] - dy[keep]))
                              if keep.any() else math.nan,
                              "wins_a": int(np.sum(dx[keep] < dy[keep])),
                              "W_plus": w, "p_exact": p,
                              "smallest_p": smallest_p(int(np.sum(dx[keep] != dy[keep])))})
        bn_effect = {}
        if set(bns) == {0, 1}:
            for a in acts:
                if (a, 0) in err and (a, 1) in err:
                    common = sorted(set(err[(a, 0)].index) & set(err[(a, 1)].index))
                    d_bn = err[(a, 1)].loc[common].to_numpy()
                    d_pl = err[(a, 0)].loc[common].to_numpy()
                    mean, lo, hi = paired_bootstrap_ci(d_bn, d_pl, seed=0)
                    bn_effect[activation_label(a)] = {
                        "bn_minus_plain_mean": mean, "ci95_low": lo, "ci95_high": hi,
                        "p_exact": wilcoxon_exact(d_bn, d_pl)[1], "n": len(common),
                        "definition": "per seed, test error with BN minus without; run-level "
                                      "percentile bootstrap over the paired seeds (10,000)"}
        target = float(o["target_error"]) or self._auto_target(per_arm)
        return {
            "scale": self._scale(df, settings),
            "test_error": per_arm,
            "wilcoxon_pairs": pairs,
            "smallest_attainable_p": smallest_p(settings.seeds),
            "bn_effect": bn_effect,
            "target_error": target,
            "steps_to_target": self._steps_to_target(df, target),
            "seconds_per_step": self._timing(df, acts, bns),
            "final_median_of_means": self._final_medians(df),
        }

    @staticmethod
    def _auto_target(per_arm: dict[str, dict[str, float]]) -> float:
        means = [v["test_error_mean"] for v in per_arm.values()
                 if np.isfinite(v["test_error_mean"])]
        if not means:
            return math.nan
        return math.ceil(float(np.median(means)) * 200) / 200  # up to the next 0.5 %

    @staticmethod
    def _scale(df: pd.DataFrame, settings: Settings) -> dict[str, Any]:
        o = settings.options
        return {"dataset": settings.dataset, "width": o["width"],
                "train_subset": o["train_subset"] or "all",
                "test_subset": o["test_subset"] or "all",
                "epochs": settings.epochs, "seeds": settings.seeds,
                "batch_size": settings.batch_size,
                "arms": [arm_label(a, b) for a in settings.activations for b in o["bn"]
                         if not o.get("arms") or _arm_name(a, b) in o["arms"]],
                "n_runs_in_table": int(df["run"].nunique())}

    @staticmethod
    def _steps_to_target(df: pd.DataFrame, target: float) -> dict[str, Any]:
        """Per arm: over seeds, the first epoch whose test error is <= target, and the
        optimizer steps taken by then (the ``step`` rows); medians over the seeds that reach
        it."""
        acc = df[(df["quantity"] == "test_acc") & (df["layer"] == "all") & (df["epoch"] >= 1)]
        out: dict[str, Any] = {}
        if not np.isfinite(target):
            return out
        steps = df[(df["quantity"] == "step") & (df["layer"] == "all")]
        step_at = {(r, int(e)): float(v) for r, e, v in
                   zip(steps["run"], steps["epoch"], steps["value"])}
        for (a, b), g in acc.groupby(["activation", "batch_norm"], sort=False):
            first, first_steps = [], []
            for run, r in g.groupby("run"):
                r = r.sort_values("epoch")
                hit = r[(1.0 - r["value"]) <= target]
                e = int(hit["epoch"].iloc[0]) if len(hit) else None
                first.append(math.nan if e is None else float(e))
                first_steps.append(math.nan if e is None else step_at.get((run, e), math.nan))
            arr, st = np.asarray(first), np.asarray(first_steps)
            reached = np.isfinite(arr)
            out[arm_label(a, b)] = {
                "median_epoch": float(np.median(arr[reached])) if reached.any() else math.nan,
                "median_steps": float(np.median(st[reached])) if reached.any() else math.nan,
                "reached": int(reached.sum()), "runs": len(arr)}
        return out

    @staticmethod
    def _timing(df: pd.DataFrame, acts: list[str], bns: list[int]) -> dict[str, Any]:
        t = df[df["quantity"] == "train_seconds_per_step"]
        per_run = t.groupby(["activation", "batch_norm", "seed"])["value"].median()
        out: dict[str, Any] = {}
        for (a, b), g in per_run.groupby(level=[0, 1]):
            out[arm_label(a, b)] = {"median_s": float(g.median()), "n": len(g)}
        for b in bns:
            if ("elu", b) in {(a, bb) for a, bb, _ in per_run.index} and \
                    ("relu", b) in {(a, bb) for a, bb, _ in per_run.index}:
                e = per_run.loc[("elu", b)]
                r = per_run.loc[("relu", b)]
                common = sorted(set(e.index) & set(r.index))
                ratios = (e.loc[common] / r.loc[common]).to_numpy()
                out[f"elu_over_relu{'_bn' if b else ''}"] = {
                    "median_ratio": float(np.median(ratios)), "n": len(common),
                    "note": "wall time per training step on a shared machine, paired by seed "
                            "(the paper: ELU 5 % slower on ImageNet)"}
        return out

    @staticmethod
    def _final_medians(df: pd.DataFrame) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for q in ("median_of_means", "train_median_of_means"):
            m = df[(df["quantity"] == q) & (df["layer"] == "all")]
            if m.empty:
                continue
            last = m[m["epoch"] == m["epoch"].max()]
            out[q] = {arm_label(a, b): float(g["value"].mean())
                      for (a, b), g in last.groupby(["activation", "batch_norm"], sort=False)}
        return out

    # ------------------------------------------------------------------ figure
    def plot(self, df: pd.DataFrame, settings: Settings) -> Figure:
        fig = Figure(figsize=(15.0, 8.6), layout="constrained")
        axes = list(fig.subplots(2, 3).ravel())
        ax_a, ax_b, ax_e, ax_c, ax_d, ax_f = axes
        acts = ordered(df["activation"], settings.activations)
        bns = sorted(int(b) for b in df["batch_norm"].unique())
        styles = {0: "-", 1: "--"}

        # a: test error per epoch, mean +- sd over seeds
        acc = df[(df["quantity"] == "test_acc") & (df["layer"] == "all") & (df["epoch"] >= 1)]
        for a in acts:
            for b in bns:
                g = acc[(acc["activation"] == a) & (acc["batch_norm"] == b)]
                if g.empty:
                    continue
                st = (1.0 - g["value"]).groupby(g["epoch"]).agg(["mean", "std"]).fillna(0.0)
                ax_a.plot(st.index, 100 * st["mean"], color=activation_color(a),
                          linestyle=styles[b], lw=1.4, label=arm_label(a, b))
                ax_a.fill_between(st.index, 100 * (st["mean"] - st["std"]),
                                  100 * (st["mean"] + st["std"]), color=activation_color(a),
                                  alpha=0.12, lw=0)
        ax_a.set_xlabel("epoch")
        ax_a.set_ylabel("test error (%)")
        ax_a.set_title("a  test error (mean ± sd over seeds)", loc="left", fontsize="medium")
        ax_a.legend(fontsize="x-small", ncol=2)

        # b: final test error per arm, one point per seed, lines join a seed's arms
        fin = self.final_errors(df)
        present = set(zip(fin["activation"], fin["batch_norm"].astype(int)))
        arms = [(a, b) for a in acts for b in bns if (a, b) in present]
        xpos = {arm: i for i, arm in enumerate(arms)}
        for _seed, g in fin.groupby("seed"):
            g = g.assign(x=[xpos[(a, b)] for a, b in zip(g["activation"], g["batch_norm"])])
            g = g.sort_values("x")
            ax_b.plot(g["x"], 100 * g["test_error"], color="0.8", lw=0.6, zorder=0)
        for (a, b), i in xpos.items():
            g = fin[(fin["activation"] == a) & (fin["batch_norm"] == b)]
            if g.empty:
                continue
            v = 100 * g["test_error"].to_numpy()
            ax_b.plot(np.full(len(v), i), v, linestyle="none", marker="o" if b == 0 else "s",
                      mfc=activation_color(a) if b == 0 else "white", ms=4,
                      color=activation_color(a))
            m, sd, _ = mean_sd(v)
            ax_b.errorbar([i + 0.25], [m], yerr=[sd], color=activation_color(a), capsize=3,
                          marker="_", ms=10)
        ax_b.set_xticks(range(len(arms)), [arm_label(a, b) for a, b in arms], rotation=45,
                        ha="right", fontsize="small")
        ax_b.set_ylabel("final test error (%)")
        ax_b.set_title("b  final test error per seed (grey: same seed)", loc="left",
                       fontsize="medium")

        # c: per-layer median of unit means at the last epoch (probe), plain vs BN
        med = df[(df["quantity"] == "median_of_means") & (df["layer"] != "all")]
        if not med.empty:
            last = med[med["epoch"] == med["epoch"].max()]
            layers = list(dict.fromkeys(last["layer"]))
            for a in acts:
                for b in bns:
                    g = last[(last["activation"] == a) & (last["batch_norm"] == b)]
                    if g.empty:
                        continue
                    m = g.groupby("layer")["value"].mean().reindex(layers)
                    ax_c.plot(range(len(layers)), m.to_numpy(), color=activation_color(a),
                              linestyle=styles[b], marker="o" if b == 0 else "s", ms=3,
                              mfc=activation_color(a) if b == 0 else "white")
            ax_c.set_xticks(range(len(layers)),
                            [name.replace(".act", "/") for name in layers], rotation=60,
                            fontsize="x-small")
        ax_c.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        ax_c.set_xlabel("layer (stack/conv)")
        ax_c.set_ylabel("median over channels of channel mean")
        ax_c.set_title("c  per layer, last epoch (probe, eval mode)", loc="left",
                       fontsize="medium")

        # d: pooled median of unit means per epoch: probe (eval) and training batches
        for q, marker in (("median_of_means", None), ("train_median_of_means", ".")):
            m = df[(df["quantity"] == q) & (df["layer"] == "all") & (df["epoch"] >= 1)]
            for a in acts:
                for b in bns:
                    g = m[(m["activation"] == a) & (m["batch_norm"] == b)]
                    if g.empty:
                        continue
                    st = g.groupby("epoch")["value"].mean()
                    ax_d.plot(st.index, st.to_numpy(), color=activation_color(a),
                              linestyle=styles[b], marker=marker, ms=4,
                              alpha=1.0 if marker is None else 0.6)
        ax_d.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        ax_d.set_xlabel("epoch")
        ax_d.set_ylabel("median over all channels of channel mean")
        monitored = (df["quantity"] == "train_median_of_means").any()
        ax_d.set_title("d  all layers: probe (lines), training batches (dots)" if monitored
                       else "d  all layers: probe (eval mode; monitor off)", loc="left",
                       fontsize="medium")
        handles = [Line2D([], [], color="0.3", linestyle="-", label="no BN"),
                   Line2D([], [], color="0.3", linestyle="--", label="BN")]
        ax_d.legend(handles=handles, fontsize="small")
        # e: the BN effect per activation (BN minus plain, per seed), bootstrap CI, Wilcoxon p
        summ = self.summary(df, settings)
        bn_eff = summ["bn_effect"]
        for i, a in enumerate(acts):
            e = bn_eff.get(activation_label(a))
            if e is None:
                continue
            c = activation_color(a)
            m, lo, hi = (100 * e[k] for k in ("bn_minus_plain_mean", "ci95_low", "ci95_high"))
            ax_e.errorbar([i], [m], yerr=[[m - lo], [hi - m]], color=c, marker="o", capsize=4)
            ax_e.annotate(f"p={e['p_exact']:.3g}\nn={e['n']}", (i, hi), textcoords="offset points",
                          xytext=(0, 4), ha="center", fontsize="x-small")
        ax_e.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        ax_e.margins(y=0.2)
        ax_e.set_xticks(range(len(acts)), [activation_label(a) for a in acts])
        ax_e.set_xlim(-0.5, len(acts) - 0.5)
        ax_e.set_ylabel("BN minus plain, final test error (points of %)")
        ax_e.set_title("e  BN effect: mean, bootstrap 95% CI, exact Wilcoxon p", loc="left",
                       fontsize="medium")
        if not bn_eff:
            ax_e.text(0.5, 0.5, "needs arms with and without BN", transform=ax_e.transAxes,
                      ha="center")

        # f: training wall time per step per arm, relative to ReLU without BN (per seed)
        t = df[df["quantity"] == "train_seconds_per_step"]
        per_run = t.groupby(["activation", "batch_norm", "seed"])["value"].median()
        if ("relu", 0) in {(a, b) for a, b, _ in per_run.index}:
            ref = per_run.loc[("relu", 0)]
            for i, (a, b) in enumerate(arms):
                if (a, b) not in {(x, y) for x, y, _ in per_run.index}:
                    continue
                r = per_run.loc[(a, b)]
                common = sorted(set(r.index) & set(ref.index))
                v = (r.loc[common] / ref.loc[common]).to_numpy()
                ax_f.plot(np.full(len(v), i), v, linestyle="none", color=activation_color(a),
                          marker="o" if b == 0 else "s",
                          mfc=activation_color(a) if b == 0 else "white", ms=4)
                ax_f.plot([i - 0.3, i + 0.3], [np.median(v)] * 2, color=activation_color(a))
            ax_f.axhline(1.0, color="0.6", lw=0.8, zorder=0)
            ax_f.set_xticks(range(len(arms)), [arm_label(a, b) for a, b in arms], rotation=45,
                            ha="right", fontsize="small")
        ax_f.set_ylabel("seconds per step / ReLU's (same seed)")
        ax_f.set_title("f  training time per step vs ReLU (bar: median)", loc="left",
                       fontsize="medium")
        for ax in axes:
            ax.tick_params(labelsize="small")
        o = settings.options
        sub = o["train_subset"] or "all"
        fig.suptitle(figure_title(
            f"11-layer conv net, width x{o['width']:g}, train images {sub}, batch "
            f"{settings.batch_size}, momentum {o['momentum']:g}, L2 {o['weight_decay']:g}, "
            f"{o['schedule']} step schedule", settings))
        return fig


def read_summary(path: str | Path) -> dict[str, Any]:
    """The ``summary`` of a published ``conv-activations.json``."""
    return json.loads(Path(path).read_text())["summary"]


register(ConvActivations())
