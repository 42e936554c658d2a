r"""Measure the bias shift and the gap between gradient and unit natural gradient while training.

The ELU paper (Clevert et al., ICLR 2016, Section 2) argues that a unit's *bias shift* — the
change of its mean net input caused by an update, ``Δw₀ + E_p(a)ᵀΔw`` — slows learning, that the
unit natural gradient corrects it (Theorem 2), and that activations with means near zero bring
the plain gradient closer to the unit natural gradient.  :class:`BiasShiftTracker` measures
this on a trainer's actual updates.  It is a thin :class:`~biasshift.train.Trainer` plug-in over
:class:`~biasshift.BiasShiftProbe` (which works in any training loop): the tracker owns the
schedule, the probe batch drawn from the training data, the learning rates and the table; every
per-unit value comes from one probe measurement of the step.

At every tracked step (a :class:`StepSchedule` of 1-based optimizer steps), for every unit of
every ``nn.Linear``/``nn.Conv2d`` layer with a bias, the tracker takes

* ``g = (g₀, g)``: the unit's mini-batch gradient of the mean training loss (``p.grad`` of the
  bias and of ``weight[unit].flatten()``, read before ``optimizer.step()``);
* ``F``: the unit Fisher (the theorem's block ``E_pairs(δ² ã ãᵀ)``, see
  :class:`biasshift.UnitFisher`) on a **fixed probe batch**, of kind ``fisher`` (default
  ``"exact"``: the expectation over the model's own predictive distribution), damped
  ``F + λI`` (the bias entry damped too) with ``λ = damping`` (``damping_mode="absolute"``,
  the default here) or ``λ = damping ×`` the block's mean diagonal (``"relative"``);
* ``E_p(a)``: the unit's mean incoming vector on the probe (for a conv unit over every
  (sample, position) pair of its unfolded patches);

and records, per unit (``value`` of a tidy row, quantity names as below):

=================================  ===========================================================
``mean_net``                       the unit's mean net input on the probe before the update
``E_p_delta2``                     ``c = E_p(δ²)``
``norm_E_p_a``, ``norm_E_q_a``     ``|E_p(a)|`` (the same for all units of a layer without
                                   groups: the mean of the previous layer's outputs) and
                                   ``|E_q(a)|`` (per unit; undamped ``b/c``)
``s``, ``k``                       Theorem 1's ``s`` and Theorem 2's ``k`` (of ``F + λI``)
``k_undamped``, ``mean_scale_q``,  the paper's ``k`` of the undamped ``F``,
``mean_scale_p``                   ``E_q(a)ᵀVar_q(a)⁻¹E_q(a)`` and ``E_p(a)ᵀVar_p(a)⁻¹E_p(a)``
                                   (NaN where singular, see ``biasshift.fisher.bias_shift_probe``)
``damping``                        the ``λ`` of the unit's block
``grad_norm``                      ``|(g₀, g)|``
``cos_grad_ng``                    cos(``g``, ``(F + λI)⁻¹g``): 1 when the gradient already
                                   points along the unit natural gradient
``cos_ng_uncorrected``             cos(``(F + λI)⁻¹g``, ``F̃⁻¹g``), ``F̃`` without the bias
                                   coupling (``b = 0``): the turn of Theorem 1's correction
``bias_shift_sgd``                 ``g₀ + E_p(a)ᵀg`` — bias shift of the *direction* ``g``
``bias_shift_ng``                  ``Δw₀ + E_p(a)ᵀΔw`` for ``(Δw₀, Δw) = (F + λI)⁻¹g``
                                   (Theorem 2's value of the direction)
``bias_shift_ng_uncorrected``      the same without Theorem 1's correction (``b = 0``)
``ng_mean_term``, ``ng_bias_term`` Theorem 2's two terms ``(E_p(a) − kE_q(a))ᵀA⁻¹g`` and
                                   ``k c⁻¹ g₀`` (they sum to ``bias_shift_ng``)
``step_bias_shift_sgd``            ``−lr · bias_shift_sgd``: the first-order bias shift of a
                                   plain SGD step ``−lr·g`` with this gradient
``step_bias_shift_ng``             ``−lr · bias_shift_ng``: that of a unit natural-gradient step
                                   ``−lr·(F + λI)⁻¹g`` with the same learning rate
``step_bias_shift_first_order``    ``Δw₀ + E_p(a)ᵀΔw`` with the **actual** update ``Δ`` (the
                                   parameters after minus before ``optimizer.step()``)
``step_bias_shift_measured``       the measured bias shift: the change of the unit's mean net
                                   input on the probe caused by the step (after minus before)
``cond_F``                         condition number of ``F + λI`` (only with ``condition=True``)
=================================  ===========================================================

and per layer (``unit`` empty) ``lr``, the learning rate of the layer's parameter group.
``lr`` is read from the optimizer's ``param_groups`` (for plain SGD without momentum or weight
decay ``step_bias_shift_first_order`` equals ``step_bias_shift_sgd`` up to rounding).
``step_bias_shift_measured`` differs from the first-order prediction by the effect of the
*other* layers' updates on the unit's inputs (``E_p(Δa)ᵀw``) and by rounding; for the first
layer (inputs = data) the two agree.

Results
    :meth:`BiasShiftTracker.frame` is a tidy :class:`pandas.DataFrame` with the columns
    ``run, step, epoch, layer, unit, quantity, value`` (``step`` = the 1-based index of the
    tracked optimizer update, i.e. ``trainer.step`` after it; ``epoch`` = the 1-based epoch it
    belongs to; ``unit`` a nullable integer); :func:`summarize_tracking` gives per-layer (and
    pooled) medians and quantiles for plotting.  The fisher kind, damping, probe size and
    schedule are in ``frame().attrs`` and :meth:`BiasShiftTracker.info`.

Contract (see :mod:`biasshift.train.plugins`)
    Tracking does not change the training trajectory: the model is evaluated on the probe in
    eval mode (every submodule's flag restored), the probe differentiates with respect to layer
    outputs and never touches ``.grad``, parameters and the batch are only read, and no global
    random generator is used (``fisher="mc"`` draws from the probe's own generator, whose state
    is checkpointed).  Untracked steps cost one set lookup; a tracked step synchronises with the
    host once (:meth:`~biasshift.fisher.bias_shift_probe.Measurement.host`).  The state
    (every recorded value) is part of the trainer's checkpoint, so a resumed run continues the
    table bit-identically.

Non-finite values
    A diverged model (non-finite activations, ``δ`` or parameters) does not stop training: the
    Fisher-based quantities of that step are recorded as NaN, the measured ones as they are, and
    a warning says so.  :func:`summarize_tracking` leaves non-finite values out and counts them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from biasshift.fisher.bias_shift_probe import DAMPING_MODES, BiasShiftProbe, Measurement
from biasshift.fisher.bias_shift_probe import FISHER_QUANTITIES as _PROBE_FISHER
from biasshift.fisher.capture import LayerSelection, LayerSpec
from biasshift.fisher.likelihood import FISHER_KINDS
from biasshift.train.plugins import Plugin

if TYPE_CHECKING:
    from biasshift.train.trainer import Trainer

__all__ = [
    "FISHER_QUANTITIES",
    "LAYER_QUANTITIES",
    "TRACKING_COLUMNS",
    "UNIT_QUANTITIES",
    "BiasShiftTracker",
    "StepSchedule",
    "summarize_tracking",
]

TRACKING_COLUMNS = ("run", "step", "epoch", "layer", "unit", "quantity", "value")

#: per-unit quantities taken from a :class:`~biasshift.BiasShiftProbe` measurement (same names)
FISHER_QUANTITIES = _PROBE_FISHER
#: every per-unit quantity, in the order of the table (``cond_F`` only with ``condition=True``)
UNIT_QUANTITIES = ("mean_net", *FISHER_QUANTITIES, "step_bias_shift_sgd", "step_bias_shift_ng",
                   "step_bias_shift_first_order", "step_bias_shift_measured")
#: per-layer quantities (``unit`` empty)
LAYER_QUANTITIES = ("lr",)

_FORMAT = 1


# ============================================================================== the schedule
def _as_step(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point():
            return int(value)
        raise TypeError(f"StepSchedule: {where} must be an integer step, got {value!r}")
    return int(value)


class StepSchedule:
    """The optimizer steps at which a :class:`BiasShiftTracker` measures (1-based: step ``s`` is
    the ``s``-th update, after which ``trainer.step == s``).

    * ``StepSchedule([1, 10, 100])`` — an explicit strictly increasing sequence of steps;
    * :meth:`log_spaced` — about ``per_decade`` steps per decade, ``round(first·10^(i/per_decade))``
      for ``i = 0, 1, …`` up to ``last`` (default: the last step of the fit);
    * ``epoch_ends=True`` (either form) adds the last step of every epoch.

    The steps are resolved once per fit (:meth:`resolve`); membership is a set lookup.  The
    log grid is anchored at ``first`` and does not depend on the fit's length, so a run
    extended to more epochs tracks a superset of the shorter run's steps.

    Raises:
        ValueError: explicit steps that are not strictly increasing (the message names the
            offending positions) or below 1; ``per_decade < 1``; ``first < 1``; ``last < first``.
        TypeError: a step that is not an integer.
    """

    def __init__(self, steps: Iterable[int] = (), *, epoch_ends: bool = False) -> None:
        if isinstance(steps, Tensor):
            steps = steps.reshape(-1).tolist()
        values = [_as_step(v, f"steps[{i}]") for i, v in enumerate(steps)]
        bad = [i for i in range(1, len(values)) if values[i] <= values[i - 1]]
        if bad:
            shown = ", ".join(f"{i} ({values[i]} after {values[i - 1]})" for i in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ValueError(
                f"StepSchedule: steps must be strictly increasing; they are not at position(s) "
                f"{shown}{more}. Sort them and drop duplicates (sorted(set(steps)))"
            )
        low = [i for i, v in enumerate(values) if v < 1]
        if low:
            raise ValueError(
                f"StepSchedule: steps are 1-based optimizer updates (>= 1); got {values[low[0]]} "
                f"at position {low[0]}"
            )
        self.explicit: tuple[int, ...] = tuple(values)
        self.epoch_ends = bool(epoch_ends)
        self.log: tuple[int, int, int | None] | None = None  # (first, per_decade, last)

    @classmethod
    def log_spaced(cls, per_decade: int = 8, *, first: int = 1, last: int | None = None,
                   epoch_ends: bool = True) -> StepSchedule:
        """About ``per_decade`` steps per decade from ``first`` (anchored grid), plus epoch ends."""
        per_decade = _as_step(per_decade, "per_decade")
        first = _as_step(first, "first")
        if per_decade < 1:
            raise ValueError(f"StepSchedule.log_spaced: per_decade must be >= 1, got {per_decade}")
        if first < 1:
            raise ValueError(f"StepSchedule.log_spaced: first must be >= 1, got {first}")
        if last is not None:
            last = _as_step(last, "last")
            if last < first:
                raise ValueError(f"StepSchedule.log_spaced: last ({last}) must be >= first "
                                 f"({first})")
        sched = cls((), epoch_ends=epoch_ends)
        sched.log = (first, per_decade, last)
        return sched

    def resolve(self, total_steps: int, steps_per_epoch: int) -> frozenset[int]:
        """The set of tracked steps of a fit with ``total_steps`` updates of
        ``steps_per_epoch`` each (explicit steps beyond the end are warned about)."""
        steps: set[int] = set()
        late = [s for s in self.explicit if s > total_steps]
        if late:
            warnings.warn(
                f"StepSchedule: step(s) {late[:5]} lie beyond the fit's {total_steps} optimizer "
                "steps and will not be tracked", stacklevel=3)
        steps.update(s for s in self.explicit if s <= total_steps)
        if self.log is not None:
            first, per_decade, last = self.log
            end = total_steps if last is None else min(last, total_steps)
            i = 0
            while True:
                s = round(first * 10 ** (i / per_decade))
                if s > end:
                    break
                steps.add(s)
                i += 1
        if self.epoch_ends and steps_per_epoch > 0:
            steps.update(range(steps_per_epoch, total_steps + 1, steps_per_epoch))
        return frozenset(steps)

    def steps(self, total_steps: int, steps_per_epoch: int) -> list[int]:
        """:meth:`resolve` as a sorted list."""
        return sorted(self.resolve(total_steps, steps_per_epoch))

    def describe(self) -> str:
        parts = []
        if self.log is not None:
            first, per_decade, last = self.log
            parts.append(f"log-spaced, {per_decade} per decade from step {first}"
                         + (f" to {last}" if last is not None else ""))
        if self.explicit:
            shown = ", ".join(map(str, self.explicit[:6])) + (", ..." if len(self.explicit) > 6
                                                              else "")
            parts.append(f"steps [{shown}]")
        if self.epoch_ends:
            parts.append("every epoch end")
        return " + ".join(parts) or "no steps"

    def __repr__(self) -> str:
        return f"StepSchedule({self.describe()})"


# ============================================================================== the tracker
def _check_number(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"BiasShiftTracker: {name} must be a finite number {need}, got "
                         f"{value!r}")
    return float(value)


class BiasShiftTracker(Plugin):
    r"""A trainer plug-in that measures bias shifts and the gradient/natural-gradient gap.

    See the module docstring for what is recorded.  Typical use::

        tracker = BiasShiftTracker(probe_size=512, damping=1e-4)
        Trainer(model, data, epochs=15, plugins=[tracker]).fit()
        df = tracker.frame()                      # per unit
        summary = summarize_tracking(df)          # per layer: median and quantiles

    Args:
        probe_x, probe_y: the fixed probe batch (inputs of the training data's shape, and class
            indices for cross-entropy; for ``loss="reconstruction"`` ``probe_y`` is ignored).
            ``None``: ``probe_size`` training samples drawn at the start of the fit with a
            private generator seeded by ``probe_seed`` (the same samples in every run).
        schedule: a :class:`StepSchedule`; default ``StepSchedule.log_spaced(8,
            epoch_ends=True)``.
        damping: the absolute damping ``λ > 0`` of ``F + λI`` (``0`` is allowed and raises
            :class:`~biasshift.theory.SingularFisherError` at the first singular block, e.g. a
            dead unit or constant inputs).  The default ``1e-4`` is ~1/10–1/100 of ``E_p(δ²)``
            in the 8x128 MNIST net (see the module docstring of
            :mod:`biasshift.reproduce.natural_gradient_gap`).
        fisher: ``"exact"`` (default), ``"empirical"`` (the probe's labels) or ``"mc"``.
        layers: which ``nn.Linear``/``nn.Conv2d`` layers (as for
            :class:`~biasshift.UnitFisher`); default every one with a bias (layers without a
            bias are skipped with a warning; naming one is an error).
        likelihood: ``None`` (from the trainer's loss: ``"categorical"`` for cross-entropy,
            ``"gaussian"`` for reconstruction, whose ``F`` is that of ``½‖y − f‖²`` per image
            while the trainer's loss, hence ``g``, is ``‖y − f‖²``: natural-gradient directions
            and their bias shifts are then twice those of the likelihood's NLL, cosines are
            unaffected) or a likelihood for :class:`~biasshift.UnitFisher`.
        probe_size, probe_seed: see ``probe_x``.
        condition: also record ``cond_F`` (an eigendecomposition per unit: slower).
        refine: refinement steps of the float32 solves (see :class:`~biasshift.BiasShiftProbe`).
        mc_samples, seed: for ``fisher="mc"`` (the tracker's own generator).
        batch_size: samples per forward pass on the probe (memory).
        memory_budget: bytes per chunk of units in the Fisher solves.
        damping_mode: ``"absolute"`` (default, ``λ = damping``) or ``"relative"`` (``λ =
            damping ×`` each block's mean diagonal; see :class:`~biasshift.BiasShiftProbe`).
        dtype: computation dtype of the Fisher quantities; default the probe's (float32 for a
            float32 model, float64 for a float64 one).
    """

    def __init__(
        self,
        probe_x: Tensor | None = None,
        probe_y: Tensor | None = None,
        *,
        schedule: StepSchedule | Sequence[int] | None = None,
        damping: float = 1e-4,
        damping_mode: str = "absolute",
        fisher: str = "exact",
        layers: LayerSelection = None,
        likelihood: str | None = None,
        probe_size: int = 512,
        probe_seed: int = 0,
        condition: bool = False,
        refine: int = 1,
        mc_samples: int = 1,
        seed: int = 0,
        batch_size: int = 4096,
        memory_budget: int = 2**28,
        dtype: torch.dtype | None = None,
    ) -> None:
        if fisher not in FISHER_KINDS:
            raise ValueError(f"BiasShiftTracker: fisher must be one of {FISHER_KINDS}, got "
                             f"{fisher!r}")
        if schedule is None:
            schedule = StepSchedule.log_spaced(8, epoch_ends=True)
        elif not isinstance(schedule, StepSchedule):
            schedule = StepSchedule(schedule)
        if probe_x is not None and not isinstance(probe_x, Tensor):
            raise TypeError(f"BiasShiftTracker: probe_x must be a tensor, got "
                            f"{type(probe_x).__name__}")
        if probe_y is not None and not isinstance(probe_y, Tensor):
            raise TypeError(f"BiasShiftTracker: probe_y must be a tensor, got "
                            f"{type(probe_y).__name__}")
        if probe_x is not None and (probe_x.ndim < 2 or probe_x.shape[0] == 0):
            raise ValueError(
                f"BiasShiftTracker: probe_x must be a non-empty batch (M, ...) with dim 0 = "
                f"samples, got shape {tuple(probe_x.shape)}")
        for name, val in (("probe_size", probe_size), ("batch_size", batch_size),
                          ("mc_samples", mc_samples)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"BiasShiftTracker: {name} must be a positive int, got {val!r}")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"BiasShiftTracker: damping_mode must be one of {DAMPING_MODES}, "
                             f"got {damping_mode!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise TypeError(f"BiasShiftTracker: dtype must be a floating dtype, got {dtype!r}")
        self.probe_x_given = probe_x
        self.probe_y_given = probe_y
        self.schedule = schedule
        self.damping = _check_number("damping", damping)
        self.damping_mode = damping_mode
        self.fisher = fisher
        self.layer_selection = layers
        self.likelihood = likelihood
        self.probe_size = probe_size
        self.probe_seed = int(probe_seed)
        self.condition = bool(condition)
        self.refine = refine
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self.batch_size = batch_size
        self.memory_budget = int(memory_budget)
        self.dtype = dtype
        self.quantities: tuple[str, ...] = UNIT_QUANTITIES + (("cond_F",) if condition else ())

        # set at fit start
        self.run = "run"
        self.specs: dict[str, LayerSpec] = {}
        self.layers: list[str] = []
        self.units: list[int] = []
        self.probe_x: Tensor | None = None
        self.probe_y: Tensor | None = None
        self.tracked: frozenset[int] = frozenset()
        self.steps_per_epoch = 0
        self.total_steps = 0
        self._probe: BiasShiftProbe | None = None
        self._pending: tuple[Any, Measurement, int, int] | None = None
        self._warned_nonfinite = False
        # the table: one entry per tracked step
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._values: list[Tensor] = []  # (Q, U_total) float64, CPU
        self._lrs: list[Tensor] = []  # (layers,) float64, CPU

    # ------------------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: Trainer) -> None:
        model = trainer.model
        self.run = trainer.run_name
        # a fresh table per fit (a resume restores the saved one right after this call)
        self._steps, self._epochs, self._values, self._lrs = [], [], [], []
        self._pending = None
        self._warned_nonfinite = False
        self._resolve_probe(trainer)
        n_train = int(trainer.dataset.train_x.shape[0])
        spe = -(-n_train // trainer.batch_size)
        self.steps_per_epoch = spe
        self.total_steps = spe * trainer.epochs
        self.tracked = self.schedule.resolve(self.total_steps, spe)
        likelihood = self.likelihood or ("gaussian" if trainer.loss == "reconstruction"
                                         else "categorical")
        self._likelihood_name = likelihood
        assert self.probe_x is not None and self.probe_y is not None
        # the probe checks the layers (bias, frozen, called once) and the output in a dry run
        self._probe = BiasShiftProbe(
            model, self.probe_x, self.probe_y, fisher=self.fisher, damping=self.damping,
            damping_mode=self.damping_mode, layers=self.layer_selection, likelihood=likelihood,
            mc_samples=self.mc_samples, seed=self.seed, dtype=self.dtype,
            condition=self.condition, refine=self.refine, batch_size=self.batch_size,
            memory_budget=self.memory_budget, _owner="BiasShiftTracker")
        self.specs = dict(self._probe.specs)
        self.layers = list(self._probe.layers)
        self.units = list(self._probe.units)
        self._index = {q: i for i, q in enumerate(self._probe.quantities)}

    @property
    def _generator(self) -> torch.Generator | None:
        return None if self._probe is None else self._probe.generator

    def _resolve_probe(self, trainer: Trainer) -> None:
        ds = trainer.dataset
        device = trainer.device
        shape = tuple(ds.train_x.shape[1:])
        recon = trainer.loss == "reconstruction"
        if self.probe_x_given is None:
            n = int(ds.train_x.shape[0])
            if self.probe_size > n:
                raise ValueError(
                    f"BiasShiftTracker: probe_size={self.probe_size} exceeds the {n} training "
                    f"samples of {ds.name!r}; pass probe_size <= {n}")
            from biasshift.train.trainer import derive_seed

            g = torch.Generator().manual_seed(derive_seed(self.probe_seed, "tracker-probe"))
            idx = torch.randperm(n, generator=g)[: self.probe_size].sort().values.to(device)
            px = ds.train_x[idx]
            py = px.reshape(px.shape[0], -1) if recon else ds.train_y[idx]
        else:
            px = self.probe_x_given
            if tuple(px.shape[1:]) != shape:
                raise ValueError(
                    f"BiasShiftTracker: probe_x has shape {tuple(px.shape)} but the model is "
                    f"trained on inputs of shape (N, {', '.join(map(str, shape))}); pass a probe "
                    f"batch of shape (M, {', '.join(map(str, shape))})")
            if px.dtype != ds.train_x.dtype:
                raise TypeError(f"BiasShiftTracker: probe_x has dtype {px.dtype}, the training "
                                f"data {ds.train_x.dtype}")
            px = px.to(device)
            if recon:
                py = px.reshape(px.shape[0], -1)
            else:
                py = self.probe_y_given
                M = px.shape[0]
                if py is None:
                    raise ValueError("BiasShiftTracker: probe_y (class indices of shape "
                                     f"({M},)) is needed with loss='cross_entropy'")
                if tuple(py.shape) != (M,):
                    raise ValueError(
                        f"BiasShiftTracker: probe_y has shape {tuple(py.shape)}; expected ({M},) "
                        f"class indices, one per probe input (probe_x has shape "
                        f"{tuple(px.shape)})")
                if py.dtype != torch.int64:
                    raise TypeError(f"BiasShiftTracker: probe_y must hold int64 class indices, "
                                    f"got dtype {py.dtype}")
                k = ds.num_classes
                lo, hi = int(py.min()), int(py.max())
                if lo < 0 or (k and hi >= k):
                    raise ValueError(f"BiasShiftTracker: probe_y holds classes {lo}..{hi}; the "
                                     f"data has {k} classes (0..{k - 1})")
                py = py.to(device)
        self.probe_x = px
        self.probe_y = py

    def _lr_of(self, optimizer: torch.optim.Optimizer) -> list[float]:
        lrs = []
        for n, spec in self.specs.items():
            w = spec.module.weight
            lr = float("nan")
            for group in optimizer.param_groups:
                if any(p is w for p in group["params"]):
                    value = group.get("lr", float("nan"))
                    lr = float(value.item() if isinstance(value, Tensor) else value)
                    break
            else:
                raise RuntimeError(f"BiasShiftTracker: layer {n!r}'s weight is in no parameter "
                                   "group of the optimizer; it is not trained")
            lrs.append(lr)
        return lrs

    # ------------------------------------------------------------------------- callbacks
    def on_before_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                       loss: Tensor) -> None:
        if step + 1 not in self.tracked:
            return
        assert self._probe is not None
        cm = self._probe.measure()
        m = cm.__enter__()  # reads .grad and the parameters, evaluates the probe
        self._pending = (cm, m, step + 1, trainer.epoch + 1)

    def on_after_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                      loss: Tensor) -> None:
        pend = self._pending
        if pend is None:
            return
        self._pending = None
        cm, m, tracked_step, epoch = pend
        cm.__exit__(None, None, None)  # the parameter change and the probe after the step
        host = m.host()  # the step's one host transfer (raises for a singular block)
        if m.nonfinite and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"BiasShiftTracker: step {tracked_step}: non-finite activations or δ "
                          "on the probe (a diverged model); the Fisher quantities of such steps "
                          "are recorded as NaN", stacklevel=2)
        lrs = torch.tensor(self._lr_of(trainer.optimizer), dtype=torch.float64)
        per_unit_lr = torch.repeat_interleave(lrs, torch.tensor(self.units))
        iq = self._index
        rows = []
        for q in self.quantities:
            if q == "step_bias_shift_sgd":
                rows.append(-per_unit_lr * host[iq["bias_shift_sgd"]])
            elif q == "step_bias_shift_ng":
                rows.append(-per_unit_lr * host[iq["bias_shift_ng"]])
            else:
                rows.append(host[iq[q]])
        self._steps.append(tracked_step)
        self._epochs.append(epoch)
        self._values.append(torch.stack(rows).to(torch.float64))
        self._lrs.append(lrs)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._pending = None

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        T, U = len(self._steps), sum(self.units)
        values = torch.stack(self._values) if T else torch.zeros(0, len(self.quantities), U,
                                                                 dtype=torch.float64)
        lrs = torch.stack(self._lrs) if T else torch.zeros(0, len(self.layers),
                                                           dtype=torch.float64)
        return {
            "format": _FORMAT,
            "layers": list(self.layers),
            "units": list(self.units),
            "quantities": list(self.quantities),
            "fisher": self.fisher,
            "damping": self.damping,
            "damping_mode": self.damping_mode,
            "steps": torch.tensor(self._steps, dtype=torch.int64),
            "epochs": torch.tensor(self._epochs, dtype=torch.int64),
            "values": values,
            "lrs": lrs,
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"BiasShiftTracker: unknown state format {state.get('format')!r}")
        mine = {"layers": list(self.layers), "units": list(self.units),
                "quantities": list(self.quantities), "fisher": self.fisher,
                "damping": self.damping, "damping_mode": self.damping_mode}
        state = {"damping_mode": "absolute", **state}  # states saved before damping_mode
        diff = [k for k in mine if (list(state[k]) if isinstance(mine[k], list) else state[k])
                != mine[k]]
        if self.layers and diff:
            detail = "; ".join(f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in diff)
            raise ValueError(f"BiasShiftTracker: the saved state belongs to another set-up "
                             f"({detail}); resume with the same tracker settings")
        if not self.layers:  # loaded before a fit: take the layout from the state
            self.layers, self.units = list(state["layers"]), [int(u) for u in state["units"]]
            self.quantities = tuple(state["quantities"])
        self._steps = [int(s) for s in state["steps"].tolist()]
        self._epochs = [int(e) for e in state["epochs"].tolist()]
        self._values = [v.clone() for v in state["values"]]
        self._lrs = [v.clone() for v in state["lrs"]]
        if state.get("generator") is not None and self._generator is not None:
            self._generator.set_state(state["generator"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, index: int = 0) -> BiasShiftTracker:
        """The recorded table of a trainer checkpoint (``checkpoint.pt``) as a tracker whose
        :meth:`frame` and :meth:`values` work (``index``: which tracker, when there are several).
        """
        from biasshift.train.checkpoint import load_checkpoint

        state = load_checkpoint(Path(path))
        found = [p["state"] for p in state.get("plugins", []) if p["type"] == cls.__name__]
        if len(found) <= index:
            raise ValueError(f"{path} holds {len(found)} {cls.__name__} state(s); no index "
                             f"{index}")
        saved = found[index]
        tracker = cls(fisher=saved["fisher"], damping=float(saved["damping"]),
                      damping_mode=saved.get("damping_mode", "absolute"))
        tracker.load_state_dict(saved)
        tracker.run = str(state.get("run", "run"))
        return tracker

    # ------------------------------------------------------------------------- results
    @property
    def tracked_steps(self) -> list[int]:
        """The steps recorded so far."""
        return list(self._steps)

    def info(self) -> dict[str, Any]:
        """The tracker's settings (for provenance records)."""
        return {
            "fisher": self.fisher, "damping": self.damping, "damping_mode": self.damping_mode,
            "dtype": None if self._probe is None else str(self._probe.dtype).replace("torch.", ""),
            "probe_size": None if self.probe_x is None else int(self.probe_x.shape[0]),
            "schedule": self.schedule.describe(), "layers": list(self.layers),
            "likelihood": getattr(self, "_likelihood_name", self.likelihood),
            "condition": self.condition, "refine": self.refine,
        }

    def values(self) -> Tensor:
        """The raw table ``(tracked steps, quantities, units)`` (float64, CPU), units of all
        layers concatenated in the order of :attr:`layers`."""
        U = sum(self.units)
        if not self._values:
            return torch.zeros(0, len(self.quantities), U, dtype=torch.float64)
        return torch.stack(self._values)

    def frame(self) -> pd.DataFrame:
        """The tidy per-unit table (columns :data:`TRACKING_COLUMNS`), plus per-layer ``lr``."""
        vals = self.values().numpy()
        T, Q, U = vals.shape
        steps = np.asarray(self._steps, dtype=np.int64)
        epochs = np.asarray(self._epochs, dtype=np.int64)
        layer_of = np.repeat(np.asarray(self.layers, dtype=object), self.units)
        unit_of = np.concatenate([np.arange(u) for u in self.units]) if U else np.zeros(0, int)
        quantity = np.repeat(np.asarray(self.quantities, dtype=object), U)
        unit_part = pd.DataFrame({
            "run": self.run,
            "step": np.repeat(steps, Q * U),
            "epoch": np.repeat(epochs, Q * U),
            "layer": np.tile(layer_of, T * Q),
            "unit": pd.array(np.tile(unit_of, T * Q), dtype="Int64"),
            "quantity": np.tile(quantity, T),
            "value": vals.reshape(-1),
        })
        L = len(self.layers)
        lrs = self.values_lr().numpy()
        layer_part = pd.DataFrame({
            "run": self.run,
            "step": np.repeat(steps, L),
            "epoch": np.repeat(epochs, L),
            "layer": np.tile(np.asarray(self.layers, dtype=object), T),
            "unit": pd.array([pd.NA] * (T * L), dtype="Int64"),
            "quantity": "lr",
            "value": lrs.reshape(-1),
        })
        df = pd.concat([unit_part, layer_part], ignore_index=True)
        for col in ("run", "layer", "quantity"):
            df[col] = df[col].astype(object)
        df = df.sort_values(["step"], kind="stable", ignore_index=True)
        df.attrs.update(self.info())
        return df[list(TRACKING_COLUMNS)]

    def values_lr(self) -> Tensor:
        """The learning rates ``(tracked steps, layers)`` (float64, CPU)."""
        if not self._lrs:
            return torch.zeros(0, len(self.layers), dtype=torch.float64)
        return torch.stack(self._lrs)


# ============================================================================== summaries
def _qname(q: float) -> str:
    return "median" if q == 0.5 else f"q{q:g}"


def summarize_tracking(
    df: pd.DataFrame,
    quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
    *,
    pools: Mapping[str, Sequence[str] | None] | None = None,
    quantities: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per ``(run, step, epoch, layer, quantity)``: medians and quantiles over units.

    Args:
        df: a tracker table (:meth:`BiasShiftTracker.frame`).  Every column except ``unit``
            and ``value`` is a group key, so extra columns (``activation``, ``optimizer``,
            ``seed`` of an analysis) are kept.
        quantiles: which quantiles (``0.5`` is the ``median`` column; others ``q<p>``, e.g.
            ``q0.1``), by linear interpolation as :meth:`pandas.Series.quantile`.
        pools: extra rows pooling the units of several layers, ``{name: [layers]}`` (``None`` =
            all layers); default ``{"all": None}``.  ``{}`` gives per-layer rows only.
        quantities: restrict to these quantities (default all).

    Returns:
        One row per group with the key columns and ``n`` (finite values), ``nonfinite``,
        ``mean``, the quantile columns and ``median_abs`` (median of ``|value|``, e.g. of a bias
        shift).  Non-finite values are left out of every statistic (and counted).
    """
    for q in quantiles:
        if not (0.0 <= float(q) <= 1.0):
            raise ValueError(f"summarize_tracking: quantiles must lie in [0, 1], got {q!r}")
    missing = [c for c in ("step", "epoch", "layer", "quantity", "value") if c not in df]
    if missing:
        raise ValueError(f"summarize_tracking: the table lacks the column(s) {missing}; pass a "
                         "BiasShiftTracker.frame()")
    keys = [c for c in df.columns if c not in ("unit", "value")]
    data = df if quantities is None else df[df["quantity"].isin(list(quantities))]
    data = data[[*keys, "value"]]
    if pools is None:
        pools = {"all": None}
    parts = [data]
    for name, members in pools.items():
        sel = data if members is None else data[data["layer"].isin(list(members))]
        parts.append(sel.assign(layer=name))
    data = pd.concat(parts, ignore_index=True)
    v = data["value"].to_numpy(dtype=np.float64)
    finite = np.isfinite(v)
    fin = data[finite]
    g = fin.groupby(keys, sort=True, dropna=False)["value"]
    qs = [float(q) for q in dict.fromkeys(quantiles)]
    out = pd.DataFrame({"n": g.size(), "mean": g.mean()})
    if qs:
        qv = g.quantile(qs).unstack(-1)
        for q in qs:
            out[_qname(q)] = qv[q]
    out["median_abs"] = fin.assign(value=fin["value"].abs()).groupby(
        keys, sort=True, dropna=False)["value"].median()
    bad = data[~finite].groupby(keys, sort=True, dropna=False).size().rename("nonfinite")
    out = out.join(bad, how="outer")
    out["n"] = out["n"].fillna(0).astype(np.int64)
    out["nonfinite"] = out["nonfinite"].fillna(0).astype(np.int64)
    cols = ["n", "nonfinite", "mean", *[_qname(q) for q in qs], "median_abs"]
    return out.reset_index()[[*keys, *cols]]
