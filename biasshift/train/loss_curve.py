r"""The training loss on a fixed subset of the training data at a schedule of steps.

The trainer evaluates the whole training set once per epoch; the learning-speed measures of
``biasshift reproduce bias-shift-mechanism`` (the training loss at fixed step counts, the number
of steps until the training cross-entropy falls below 0.3, 0.1 and 0.03) need it more often, on
a log-spaced grid.  :class:`LossCurve` is a :class:`~biasshift.train.Plugin` that, after every
scheduled optimizer step, evaluates the mean cross-entropy of the model on ``size`` training
samples (drawn once with a private generator, the same samples in every run) in evaluation mode
and without gradients.

Contract: the model is evaluated with :func:`biasshift.hooks.eval_mode` (every submodule's
training flag restored; batch normalisation and the centred ReLU use their running statistics
and do not update them), under ``torch.no_grad``, without touching parameters, gradients or
global random generators, so the training trajectory is the same with and without it.  The
values stay on the device until the epoch ends (one host transfer per epoch); the recorded
curve is part of the trainer's checkpoint, so a resumed run continues it.

:func:`steps_to_threshold` turns a curve into the number of steps until the loss first falls
below a threshold, by log-log interpolation between the last evaluated step above it and the
first below it; a curve that never gets there is *censored* at its last step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from biasshift.hooks import eval_mode
from biasshift.train.plugins import Plugin
from biasshift.train.tracking import StepSchedule

if TYPE_CHECKING:
    from biasshift.train.trainer import Trainer

__all__ = ["LossCurve", "loss_at_steps", "steps_to_threshold"]


class LossCurve(Plugin):
    """Record the training cross-entropy on a fixed subset at scheduled steps.

    Args:
        size: training samples of the subset (all of them when the set is smaller).
        schedule: a :class:`~biasshift.train.tracking.StepSchedule` (default 12 log-spaced steps
            per decade plus every epoch end; the 12-per-decade grid contains 10^k and
            10^(k+1/2) rounded, e.g. 100, 316, 1000, 3162).
        seed: seed of the private generator that draws the subset.
        batch_size: samples per forward pass.
    """

    def __init__(self, size: int = 10_000, schedule: StepSchedule | Sequence[int] | None = None,
                 *, seed: int = 0, batch_size: int = 4096) -> None:
        for name, val in (("size", size), ("batch_size", batch_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"LossCurve: {name} must be a positive int, got {val!r}")
        if schedule is None:
            schedule = StepSchedule.log_spaced(12, epoch_ends=True)
        elif not isinstance(schedule, StepSchedule):
            schedule = StepSchedule(schedule)
        self.size = size
        self.schedule = schedule
        self.seed = int(seed)
        self.batch_size = batch_size
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.tracked: frozenset[int] = frozenset()
        self._steps: list[int] = []
        self._values: list[float] = []
        self._pending: list[tuple[int, Tensor]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.loss != "cross_entropy":
            raise ValueError(f"LossCurve: records the cross-entropy; the trainer's loss is "
                             f"{trainer.loss!r}")
        from biasshift.train.trainer import derive_seed

        ds = trainer.dataset
        n = int(ds.train_x.shape[0])
        g = torch.Generator().manual_seed(derive_seed(self.seed, "loss-curve"))
        idx = torch.randperm(n, generator=g)[: min(self.size, n)].sort().values
        idx = idx.to(ds.train_x.device)
        self.x, self.y = ds.train_x[idx], ds.train_y[idx]
        spe = -(-n // trainer.batch_size)
        self.tracked = self.schedule.resolve(spe * trainer.epochs, spe)
        self._steps, self._values, self._pending = [], [], []

    @torch.no_grad()
    def _loss(self, trainer: Trainer) -> Tensor:
        assert self.x is not None and self.y is not None
        total = torch.zeros((), dtype=torch.float64, device=self.x.device)
        with eval_mode(trainer.model):
            for s in range(0, self.x.shape[0], self.batch_size):
                out = trainer.model(self.x[s:s + self.batch_size])
                total += F.cross_entropy(out, self.y[s:s + self.batch_size],
                                         reduction="sum").double()
        return total / self.x.shape[0]

    def on_after_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                      loss: Tensor) -> None:
        if step + 1 in self.tracked:  # a set lookup; the loss stays on the device
            self._pending.append((step + 1, self._loss(trainer)))

    def _flush(self) -> None:
        if self._pending:
            host = torch.stack([v for _, v in self._pending]).cpu().tolist()
            self._steps += [s for s, _ in self._pending]
            self._values += [float(v) for v in host]
            self._pending = []

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self._flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        self._flush()

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"steps": list(self._steps), "values": list(self._values), "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("size", self.size)) != self.size:
            raise ValueError(f"LossCurve: the saved curve used {state['size']} samples, this "
                             f"plug-in {self.size}; resume with the same size")
        self._steps = [int(s) for s in state["steps"]]
        self._values = [float(v) for v in state["values"]]
        self._pending = []

    def frame(self) -> pd.DataFrame:
        """``step``, ``loss`` (float64), one row per recorded step."""
        self._flush()
        return pd.DataFrame({"step": np.asarray(self._steps, dtype=np.int64),
                             "loss": np.asarray(self._values, dtype=np.float64)})


def steps_to_threshold(steps: Sequence[float], losses: Sequence[float], threshold: float
                       ) -> tuple[float, bool]:
    """The step at which the loss curve first falls below ``threshold``.

    Between the last evaluated step ``s₀`` whose loss is ``>= threshold`` and the next one
    ``s₁`` (loss below), ``log loss`` is interpolated linearly in ``log step``; at or before the
    first point the first step is returned.  Returns ``(steps, reached)``; a curve that never
    gets below is censored: ``(last step, False)``.  Non-finite losses count as not below (a
    diverged run never reaches the threshold).
    """
    if not threshold > 0:
        raise ValueError(f"steps_to_threshold: threshold must be > 0, got {threshold!r}")
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(losses, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps_to_threshold: steps {s.shape} and losses {v.shape} must be "
                         "equal-length non-empty 1-D sequences")
    if np.any(np.diff(s) <= 0) or s[0] <= 0:
        raise ValueError("steps_to_threshold: steps must be positive and strictly increasing")
    below = np.isfinite(v) & (v < threshold)
    if not below.any():
        return float(s[-1]), False
    i = int(np.argmax(below))
    if i == 0:
        return float(s[0]), True
    s0, s1, v0, v1 = s[i - 1], s[i], v[i - 1], v[i]
    if not (np.isfinite(v0) and v0 > 0 and v1 > 0):
        return float(s1), True
    t = (math.log(v0) - math.log(threshold)) / (math.log(v0) - math.log(v1))
    return float(math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))), True


def loss_at_steps(steps: Sequence[float], losses: Sequence[float], at: Sequence[int]
                  ) -> np.ndarray:
    """The loss at each step of ``at`` that the curve evaluated (NaN for the others)."""
    table = dict(zip(np.asarray(steps, dtype=np.int64).tolist(),
                     np.asarray(losses, dtype=np.float64).tolist()))
    return np.asarray([table.get(int(a), float("nan")) for a in at], dtype=np.float64)
