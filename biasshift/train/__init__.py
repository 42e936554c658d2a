"""Training as in the ELU paper: plain SGD with plug-ins, per-epoch evaluation, exact resume.

* :class:`Trainer` — mini-batch SGD (lr 0.01, batch 64 by default), per-epoch losses, accuracies
  and probe statistics in a tidy history, atomic per-epoch checkpoints, bit-identical resume;
* :class:`Plugin` — the callback protocol (no-op base class); :class:`MonitorPlugin` keeps a
  :class:`biasshift.ActivationMonitor` attached for a whole fit;
* :class:`BiasShiftTracker` — measures, on a :class:`StepSchedule` of steps, each unit's bias
  shift and the gap between the gradient and the unit natural gradient
  (:mod:`biasshift.train.tracking`); :func:`summarize_tracking` gives per-layer quantiles;
* :class:`StepLearningRate` — a step learning-rate schedule plug-in;
  :func:`paper_cifar_schedule` is the paper's CIFAR schedule scaled to a run's length;
* :func:`save_checkpoint` / :func:`load_checkpoint` — atomic, ``weights_only`` checkpoints;
* :class:`BatchedTrainer` — ``K`` Trainer runs trained as one stacked model (batched GEMMs),
  each keeping its own init, data order, lr, history and checkpoints
  (:mod:`biasshift.train.batched`).
"""

from __future__ import annotations

from biasshift.train.batched import BatchedTrainer
from biasshift.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from biasshift.train.plugins import MonitorLike, MonitorPlugin, Plugin
from biasshift.train.schedule import StepLearningRate, paper_cifar_schedule
from biasshift.train.tracking import BiasShiftTracker, StepSchedule, summarize_tracking
from biasshift.train.trainer import HISTORY_COLUMNS, LOSSES, Trainer, derive_seed

__all__ = [
    "HISTORY_COLUMNS",
    "LOSSES",
    "BatchedTrainer",
    "BiasShiftTracker",
    "CheckpointError",
    "MonitorLike",
    "MonitorPlugin",
    "Plugin",
    "StepLearningRate",
    "StepSchedule",
    "Trainer",
    "derive_seed",
    "load_checkpoint",
    "paper_cifar_schedule",
    "save_checkpoint",
    "summarize_tracking",
]
