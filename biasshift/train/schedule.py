"""Step learning-rate schedules as trainer plug-ins: the paper's CIFAR schedule, scaled.

Section 4.3 trains the 11-layer CIFAR-100 net with learning rate 0.01 for iterations 0-35k,
0.005 for 35k-85k, 0.0005 for 85k-135k and 0.00005 for 135k-165k. :func:`paper_cifar_schedule`
keeps the rates and the *fractions* of the run (35/165, 85/165, 135/165) and scales the
boundaries to a run of ``total_steps`` optimizer steps, so a reduced run sees the same
sequence of rates for the same share of its length.

:class:`StepLearningRate` applies a schedule: before every optimizer step it sets every
parameter group's ``lr`` to the rate of the current global step. The rate depends on the step
count only (a pure Python int), so the plug-in is stateless, costs no host synchronisation and
continues exactly after a resume.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from biasshift.train.plugins import Plugin

if TYPE_CHECKING:
    from biasshift.train.trainer import Trainer

__all__ = ["PAPER_CIFAR_BOUNDARIES", "PAPER_CIFAR_RATES", "PaperCifarSchedule", "StepLearningRate",
           "paper_cifar_schedule"]

#: the iterations at which the paper's CIFAR-100 rate changes, and its total (Section 4.3)
PAPER_CIFAR_BOUNDARIES = (35_000, 85_000, 135_000)
PAPER_CIFAR_TOTAL = 165_000
#: the rates of the four phases
PAPER_CIFAR_RATES = (0.01, 0.005, 0.0005, 0.00005)


class StepLearningRate(Plugin):
    """A piecewise-constant learning rate: ``rates[i]`` for ``boundaries[i-1] <= step <
    boundaries[i]`` (``boundaries`` strictly increasing, one fewer than ``rates``).

    ``step`` is the trainer's 0-based global optimizer step. Every parameter group of
    ``trainer.optimizer`` gets the rate (before ``optimizer.step()``), overriding the
    optimizer's own ``lr``. Stackable: in a stack each member's optimizer gets its rate.
    """

    stackable = True

    def __init__(self, boundaries: Sequence[int], rates: Sequence[float]) -> None:
        b = [int(x) for x in boundaries]
        r = [float(x) for x in rates]
        if len(r) != len(b) + 1:
            raise ValueError(f"StepLearningRate: need one more rate than boundaries, got "
                             f"{len(b)} boundaries {tuple(b)} and {len(r)} rates {tuple(r)}")
        if any(x < 0 for x in b) or any(b2 <= b1 for b1, b2 in itertools.pairwise(b)):
            raise ValueError(f"StepLearningRate: boundaries must be non-negative and strictly "
                             f"increasing, got {tuple(b)}")
        if any(not (x > 0 and x < float("inf")) for x in r):
            raise ValueError(f"StepLearningRate: rates must be positive and finite, got "
                             f"{tuple(r)}")
        self.boundaries = tuple(b)
        self.rates = tuple(r)

    def rate(self, step: int) -> float:
        """The learning rate of the 0-based global ``step``."""
        return self.rates[bisect.bisect_right(self.boundaries, int(step))]

    def on_before_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                       loss: Tensor) -> None:
        lr = self.rate(step)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr

    def info(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "rates": list(self.rates)}

    def __repr__(self) -> str:
        return f"StepLearningRate(boundaries={self.boundaries}, rates={self.rates})"


def paper_cifar_schedule(total_steps: int, base_lr: float = 0.01) -> StepLearningRate:
    """The paper's CIFAR-100 schedule scaled to ``total_steps`` optimizer steps.

    Boundaries ``round(total_steps * b / 165000)`` for ``b`` in 35k, 85k, 135k (the paper's
    own boundaries when ``total_steps = 165000``); rates ``(0.01, 0.005, 0.0005, 0.00005)``
    times ``base_lr / 0.01``. For very short runs, boundaries that would coincide are pushed
    apart by one step so that every phase keeps at least one step (``total_steps >= 4``).
    """
    if isinstance(total_steps, bool) or int(total_steps) < 4:
        raise ValueError(f"paper_cifar_schedule: total_steps must be >= 4 (one step per phase), "
                         f"got {total_steps!r}")
    total = int(total_steps)
    bounds: list[int] = []
    for b in PAPER_CIFAR_BOUNDARIES:
        at = max(1, round(total * b / PAPER_CIFAR_TOTAL))
        if bounds and at <= bounds[-1]:
            at = bounds[-1] + 1
        bounds.append(at)
    scale = float(base_lr) / PAPER_CIFAR_RATES[0]
    return StepLearningRate(bounds, [r * scale for r in PAPER_CIFAR_RATES])


class PaperCifarSchedule(Plugin):
    """:func:`paper_cifar_schedule` scaled to the run the plug-in is attached to.

    At ``on_fit_start`` the run's length is read from the trainer: ``epochs x
    ceil(n_train / batch_size)`` steps; the base rate is the trainer's ``lr``. So the same
    plug-in gives the paper's 165k-step schedule to a full CIFAR run and the same phases, in
    proportion, to a few-epoch run. (A resume that raises ``epochs`` rescales the remaining
    phases.) Stateless and stackable; :attr:`schedule` holds the resolved
    :class:`StepLearningRate`.
    """

    stackable = True

    def __init__(self) -> None:
        self.schedule: StepLearningRate | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        n = int(trainer.dataset.train_x.shape[0])
        steps = trainer.epochs * -(-n // trainer.batch_size)
        self.schedule = paper_cifar_schedule(max(4, steps), base_lr=trainer.lr)

    def on_before_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                       loss: Tensor) -> None:
        assert self.schedule is not None, "PaperCifarSchedule: on_fit_start was not called"
        self.schedule.on_before_step(trainer, step, x, y, loss)
