"""Plain mini-batch SGD as in the ELU paper, with plug-ins, per-epoch evaluation and exact resume.

The paper trains its MNIST networks with "stochastic gradient descent", learning rate 0.01 and
mini-batches of 64 (Section 4.1); :class:`Trainer` does exactly that by default
(:class:`torch.optim.SGD` without momentum or weight decay) and after every epoch records

* ``train_loss``, ``test_loss`` — the mean cross-entropy (or, for ``loss="reconstruction"``, the
  mean over images of the ``reconstruction_loss``: by default the per-image summed squared
  error) on the whole training and test set, computed in eval mode without gradients;
* ``train_sse``, ``test_sse`` — for ``loss="reconstruction"``, the mean over images of the
  per-image summed squared error whatever the training loss (the benchmark's reported error,
  :mod:`biasshift.train.reconstruction`);
* ``train_acc``, ``test_acc`` — classification accuracy (cross-entropy runs only);
* ``running_loss`` — the mean of the mini-batch losses the optimizer saw during the epoch;
* ``median_of_means`` — Fig. 2a's statistic: the median over units of each unit's mean activation
  on a fixed probe subset of the training set, pooled over all monitored layers (``layer="all"``)
  and per layer (``layer="act3"``, ...), the per-unit means computed as
  :func:`biasshift.monitor.probe_statistics` does (see :meth:`Trainer.probe`);
* ``diverged`` — 1.0 at the epoch where the loss or a parameter became non-finite; the run stops
  there cleanly (the non-finite values are recorded as they are).

The model is also evaluated before training (epoch 0) unless ``eval_initial=False``.

History
    :attr:`Trainer.history` is a tidy :class:`pandas.DataFrame` with the columns
    ``run, epoch, layer, unit, quantity, value`` (``layer="all"`` for whole-net quantities,
    ``unit`` a nullable integer, set only for per-unit rows logged by plug-ins).

Randomness and resume
    The trainer owns three random streams, all derived from ``seed`` with :func:`derive_seed`:

    * model initialisation (when ``model`` is a factory): built on the CPU under a private
      generator seeded with ``derive_seed(seed, "init")``, then moved to ``device`` — the same
      initial weights on every machine;
    * data order: epoch ``e`` shuffles with a fresh CPU :class:`torch.Generator` seeded with
      ``derive_seed(seed, "data", e)`` — the same order on every machine and after a resume;
    * torch's global generators (dropout and the like): seeded with ``derive_seed(seed, "train")``
      inside :func:`torch.random.fork_rng` (the caller's global RNG state is left untouched),
      saved in each checkpoint and restored on resume.

    The probe subset is drawn once with ``probe_seed`` (independent of ``seed``, so every run of
    an analysis is probed on the same samples). A checkpoint is written atomically after every
    epoch (model, optimizer, epoch, global step, plug-in states, history, RNG states);
    ``fit(resume=True)`` continues from it, and on the CPU the resumed run is bit-identical to
    an uninterrupted one. A killed run loses at most the epoch in progress.

Modes
    Every epoch trains with ``model.train()``; the evaluation and probe passes run under
    ``model.eval()`` and ``torch.no_grad()`` and restore every submodule's flag afterwards.

Speed
    The training loop never synchronises with the host: batches are index tensors on the
    device, the epoch's loss is accumulated in a device tensor, and the only transfers happen
    once per epoch, after the evaluation.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasshift.data.base import ArrayDataset
from biasshift.io import write_csv
from biasshift.monitor.probe import ProbeStatistics, probe_statistics
from biasshift.monitor.selection import (
    ModuleSpec,
)
from biasshift.train.checkpoint import (
    CheckpointError,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from biasshift.train.plugins import Plugin
from biasshift.train.reconstruction import (
    RECONSTRUCTION_LOSSES,
    reconstruction_loss,
    summed_squared_error,
)

__all__ = ["HISTORY_COLUMNS", "LOSSES", "Augment", "Trainer", "derive_seed"]

LOSSES = ("cross_entropy", "reconstruction")
HISTORY_COLUMNS = ("run", "epoch", "layer", "unit", "quantity", "value")
CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.csv"

#: fingerprint entries that older checkpoints lack, with the value they trained with
_FINGERPRINT_DEFAULTS = {"reconstruction_loss": "sse", "reconstruction_logits": False}

_CALLBACKS = ("on_fit_start", "on_before_step", "on_after_step", "on_epoch_end", "on_fit_end",
              "state_dict", "load_state_dict")

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
#: ``(batch, generator) -> batch``: a training-batch augmentation (e.g. the paper's CIFAR crops
#: and flips, :func:`biasshift.data.pad_crop_flip`); all its randomness from ``generator``
Augment = Callable[[Tensor, torch.Generator], Tensor]


def _noop(trainer: Trainer) -> None:
    return None


def _training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_training_flags(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def derive_seed(seed: int, stream: str, *more: int) -> int:
    """A 63-bit seed for the named random ``stream`` of run ``seed`` (numpy ``SeedSequence``).

    Distinct streams and epochs get statistically independent seeds, identical on every machine.
    """
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32, zlib.crc32(stream.encode())]
    words += [int(m) for m in more]
    a, b = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Trainer: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_labels(dataset: ArrayDataset) -> None:
    """Class-index labels for ``loss="cross_entropy"``: int64 ``(N,)`` in ``0..num_classes-1``.

    Checked once at construction (one host synchronisation per split), so that a wrong label
    tensor is named here rather than failing inside ``cross_entropy`` at the first step.
    """
    k = dataset.num_classes
    for split in ("train", "test"):
        x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
        where = f"Trainer: dataset {dataset.name!r}: {split}_y"
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{where} must be class indices of shape (N,) = ({x.shape[0]},), got "
                             f"shape {tuple(y.shape)}; pass y.reshape(-1) for (N, 1) labels or "
                             "y.argmax(1) for one-hot labels")
        if y.dtype != torch.int64:
            raise ValueError(f"{where} must be int64 class indices, got dtype {y.dtype} (shape "
                             f"{tuple(y.shape)}); convert with y.long()")
        if y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"{where} holds labels {lo}..{hi}, outside 0..{k - 1} "
                                 f"(num_classes={k}); fix the labels or the dataset's "
                                 "num_classes")


def _check_checkpoint_dir(path: Path) -> None:
    """``checkpoint_dir`` must be a folder or creatable as one: neither it nor a parent may be a
    file (that would fail only when the first checkpoint is written, after epoch 1)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise ValueError(f"Trainer: checkpoint_dir {path} {what}, not a folder; pass a "
                                 "folder path (created if missing) or checkpoint_dir=None")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"Trainer: checkpoint_dir {path}: {p} is not writable; pass a "
                                 "writable folder or checkpoint_dir=None")
            return


class Trainer:
    """Train a model with mini-batch SGD, evaluate after each epoch, checkpoint, resume.

    Args:
        model: an :class:`torch.nn.Module`, or a zero-argument factory returning one. A factory
            is called on the CPU under a generator seeded from ``seed`` (reproducible
            initialisation); a module is used as it is. Either way it is moved to ``device``.
        dataset: an :class:`~biasshift.data.ArrayDataset`; moved to ``device`` once.
        loss: ``"cross_entropy"`` (logits ``(N, classes)``) or ``"reconstruction"`` (output
            ``(N, in_features)``, target the flattened input; the loss is
            ``reconstruction_loss``, averaged over images).
        reconstruction_loss: for ``loss="reconstruction"``: ``"sse"`` (default; the per-image
            summed squared error), ``"mse"`` (per-pixel mean) or ``"bce"`` (Bernoulli
            cross-entropy on logits, summed per image; needs ``reconstruction_logits``). See
            :mod:`biasshift.train.reconstruction`.
        reconstruction_logits: the model returns logits ``z`` and the reconstruction is
            ``sigmoid(z)`` (build the autoencoder with ``output="linear"``); default ``False``:
            the model returns the reconstruction itself.
        lr: learning rate of the default optimizer.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        epochs: number of epochs; ``fit(resume=True)`` continues up to it.
        seed: the run's seed (see "Randomness and resume" in the module docstring).
        device: where model, data and all statistics live.
        optimizer: ``model -> torch.optim.Optimizer``; default plain ``SGD(lr)`` without momentum
            or weight decay (then ``lr`` is the paper's learning rate). Called once, after the
            model is on ``device``.
        plugins: objects with the callbacks of :class:`~biasshift.train.Plugin`.
        probe_size: training samples in the fixed probe subset for ``median_of_means``
            (``None``: all; ``0``: no probe statistics).
        probe_modules: which modules are probed (as for
            :func:`~biasshift.monitor.probe_statistics`; default every activation module).
        probe_seed: seed of the probe subset draw.
        probe_medians: also compute each unit's exact median on the probe (what
            :func:`~biasshift.monitor.probe_statistics` does; it sorts every unit's activations,
            which on MNIST costs about as much as the training epoch). Off by default: only the
            per-unit means are accumulated (in float64, non-finite values left out and counted,
            as in ``probe_statistics``) and ``last_probe.median`` is empty.
        eval_batch_size: chunk size of the evaluation and probe passes.
        eval_initial: also evaluate the untrained model (epoch 0).
        checkpoint_dir: folder for ``checkpoint.pt`` and ``history.csv`` (written atomically
            after every epoch); ``None`` keeps everything in memory.
        run_name: the ``run`` column of the history.
        threads: ``torch.set_num_threads`` during :meth:`fit` (restored afterwards).
        progress: ``True`` for a tqdm bar over epochs (hidden when stderr is not a terminal), or a
            callable ``trainer -> None`` called after every epoch (and once after the initial
            evaluation or the resume).
        augment: ``(x, generator) -> x`` applied to every training mini-batch (never to the
            evaluation or probe passes), e.g. ``biasshift.data.pad_crop_flip``. Its generator
            lives on ``device`` and is reseeded each epoch with ``derive_seed(seed, "augment",
            epoch)``, so the augmentation is the same after a resume and independent of the
            global generators (dropout). ``None``: the batches as they are.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        dataset: ArrayDataset,
        *,
        loss: str = "cross_entropy",
        reconstruction_loss: str = "sse",
        reconstruction_logits: bool = False,
        lr: float = 0.01,
        batch_size: int = 64,
        epochs: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        optimizer: OptimizerFactory | None = None,
        plugins: Sequence[Plugin] = (),
        probe_size: int | None = 10_000,
        probe_modules: ModuleSpec = None,
        probe_seed: int = 0,
        probe_medians: bool = False,
        eval_batch_size: int = 4096,
        eval_initial: bool = True,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        run_name: str = "run",
        threads: int | None = None,
        progress: bool | Callable[[Trainer], None] = False,
        augment: Augment | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"Trainer: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr > 0
                                        and np.isfinite(lr)):
            raise ValueError(f"Trainer: lr must be a positive finite number, got {lr!r}")
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"Trainer: unknown reconstruction_loss {reconstruction_loss!r}; "
                             f"choose one of {', '.join(RECONSTRUCTION_LOSSES)}")
        if reconstruction_loss == "bce" and not reconstruction_logits:
            raise ValueError("Trainer: reconstruction_loss='bce' needs the model's logits: build "
                             "the model without its output sigmoid (autoencoder(output='linear')) "
                             "and pass reconstruction_logits=True")
        self.loss = loss
        self.reconstruction_loss = str(reconstruction_loss)
        self.reconstruction_logits = bool(reconstruction_logits)
        self.lr = float(lr)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.epochs = _check_int("epochs", epochs, 0)
        self.seed = _check_int("seed", seed, 0)
        self.probe_seed = _check_int("probe_seed", probe_seed, 0)
        self.eval_batch_size = _check_int("eval_batch_size", eval_batch_size, 1)
        self.threads = None if threads is None else _check_int("threads", threads, 1)
        if probe_size is not None:
            probe_size = _check_int("probe_size", probe_size, 0)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.eval_initial = bool(eval_initial)
        self.run_name = str(run_name)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        if self.checkpoint_dir is not None:
            _check_checkpoint_dir(self.checkpoint_dir)
        self.progress = progress
        if augment is not None and not callable(augment):
            raise TypeError(f"Trainer: augment must be a callable (x, generator) -> x, got "
                            f"{type(augment).__name__}")
        self.augment = augment

        if not isinstance(dataset, ArrayDataset):
            raise TypeError("Trainer: dataset must be an ArrayDataset (see load_dataset), "
                            f"got {type(dataset).__name__}")
        if dataset.train_x.shape[0] == 0 or dataset.test_x.shape[0] == 0:
            raise ValueError(f"Trainer: {dataset!r} has an empty training or test set")
        if loss == "cross_entropy":
            _check_labels(dataset)
        self.dataset = dataset.to(self.device)

        if isinstance(model, nn.Module):
            built = model
        elif callable(model):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(derive_seed(self.seed, "init"))
                built = model()
            if not isinstance(built, nn.Module):
                raise TypeError(f"Trainer: the model factory returned {type(built).__name__}, "
                                "not an nn.Module")
        else:
            raise TypeError("Trainer: model must be an nn.Module or a factory () -> nn.Module, "
                            f"got {type(model).__name__}")
        self.model: nn.Module = built.to(self.device)

        if optimizer is None:
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(),
                                                                    lr=self.lr)
        else:
            self.optimizer = optimizer(self.model)
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                got = type(self.optimizer).__name__
                raise TypeError("Trainer: optimizer must be a callable model -> "
                                f"torch.optim.Optimizer; it returned {got}")

        self.plugins: list[Plugin] = list(plugins)
        for p in self.plugins:
            missing = [c for c in _CALLBACKS if not callable(getattr(p, c, None))]
            if missing:
                raise TypeError(f"Trainer: plug-in {type(p).__name__} lacks {', '.join(missing)}; "
                                "subclass biasshift.train.Plugin for no-op defaults")

        n_train = self.dataset.train_x.shape[0]
        self.probe_modules = probe_modules
        self.probe_medians = bool(probe_medians)
        if probe_size == 0:
            self.probe_index: Tensor | None = None
        elif probe_size is None or probe_size >= n_train:
            self.probe_index = torch.arange(n_train)
        else:
            g = torch.Generator().manual_seed(derive_seed(self.probe_seed, "probe"))
            self.probe_index = torch.randperm(n_train, generator=g)[:probe_size].sort().values
        self.probe_x = (None if self.probe_index is None
                        else self.dataset.train_x[self.probe_index.to(self.device)])

        # progress of training
        self.epoch = 0  # the last completed epoch
        self.step = 0  # optimizer steps taken
        #: runs trained together in one stacked model with this one (set by a BatchedTrainer)
        self.stack_members = 1
        #: the generator this run's random training ops (dropout) draw from, when it is not
        #: torch's global one (a stack's member draws from its own); checkpointed as "rng"
        self.rng_generator: torch.Generator | None = None
        self.diverged = False
        self.last_probe: ProbeStatistics | None = None
        self.epoch_seconds: list[float] = []
        self._rows: dict[str, list[Any]] = {k: [] for k in ("epoch", "layer", "unit", "quantity",
                                                             "value")}
        self._final_rows: dict[str, list[Any]] = {k: [] for k in self._rows}
        self._pending: list[tuple[int, str, str, Tensor | float]] = []
        self._log_epoch = 0
        self._fitted = False
        self.resumed_from: int | None = None  # the checkpoint's epoch when fit() resumed

    # ------------------------------------------------------------------ public helpers
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    @property
    def history(self) -> pd.DataFrame:
        """The tidy history so far: ``run, epoch, layer, unit, quantity, value``."""
        cols = {k: self._rows[k] + self._final_rows[k] for k in self._rows}
        unit = pd.array([u if u >= 0 else None for u in cols["unit"]], dtype="Int64")
        return pd.DataFrame({
            "run": pd.Series([self.run_name] * len(cols["epoch"]), dtype=object),
            "epoch": np.asarray(cols["epoch"], dtype=np.int64),
            "layer": pd.Series(cols["layer"], dtype=object),
            "unit": unit,
            "quantity": pd.Series(cols["quantity"], dtype=object),
            "value": np.asarray(cols["value"], dtype=np.float64),
        }, columns=list(HISTORY_COLUMNS))

    def log(self, quantity: str, value: Tensor | float, layer: str = "all") -> None:
        """Add tidy rows to the history for the current epoch (a plug-in's way to report).

        ``value`` is a Python number, a 0-dim tensor (one row), or a 1-D tensor (one row per
        unit, ``unit`` = index). Tensors stay on their device until the epoch ends, so this is
        safe to call from per-step callbacks.
        """
        if isinstance(value, Tensor):
            if value.ndim > 1:
                raise ValueError(f"Trainer.log({quantity!r}, layer={layer!r}): value must be a "
                                 f"scalar or a 1-D per-unit tensor, got shape {tuple(value.shape)}")
            value = value.detach().clone()  # the plug-in may update its tensor in place
        elif not isinstance(value, (int, float, np.number)):
            raise TypeError(f"Trainer.log({quantity!r}): value must be a number or a tensor, got "
                            f"{type(value).__name__}")
        self._pending.append((self._log_epoch, str(layer), str(quantity), value))

    # ------------------------------------------------------------------ losses and evaluation
    def _outputs(self, out: Tensor, x: Tensor) -> Tensor:
        """Check the model output's shape; return the target for reconstruction."""
        if self.loss == "cross_entropy":
            if out.ndim != 2:
                raise ValueError(f"Trainer: loss='cross_entropy' needs logits (N, classes); the "
                                 f"model returned shape {tuple(out.shape)}")
            if out.shape[1] < self.dataset.num_classes:
                raise ValueError(f"Trainer: the model returns {out.shape[1]} logits but dataset "
                                 f"{self.dataset.name!r} has {self.dataset.num_classes} classes")
            return out
        target = x.reshape(x.shape[0], -1)
        if out.shape != target.shape:
            raise ValueError(f"Trainer: loss='reconstruction' needs an output of the flattened "
                             f"input's shape {tuple(target.shape)}; the model returned "
                             f"{tuple(out.shape)}")
        return target

    def _batch_loss(self, out: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if self.loss == "cross_entropy":
            self._outputs(out, x)
            return F.cross_entropy(out, y)
        target = self._outputs(out, x)
        return reconstruction_loss(out, target, self.reconstruction_loss,
                                   logits=self.reconstruction_logits)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Tensor]:
        """Whole-set losses (and accuracies) as 0-dim float64 device tensors; eval mode, no grad.

        Every submodule's training flag is restored afterwards.
        """
        modes = _training_flags(self.model)
        self.model.eval()
        out: dict[str, Tensor] = {}
        try:
            for split in ("train", "test"):
                xs = getattr(self.dataset, f"{split}_x")
                ys = getattr(self.dataset, f"{split}_y")
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                sse = torch.zeros((), dtype=torch.float64, device=self.device)
                correct = torch.zeros((), dtype=torch.int64, device=self.device)
                for start in range(0, xs.shape[0], self.eval_batch_size):
                    x = xs[start : start + self.eval_batch_size]
                    pred = self.model(x)
                    if self.loss == "cross_entropy":
                        self._outputs(pred, x)
                        y = ys[start : start + self.eval_batch_size]
                        total += F.cross_entropy(pred, y, reduction="sum").double()
                        correct += (pred.argmax(dim=1) == y).sum()
                    else:
                        target = self._outputs(pred, x)
                        total += reconstruction_loss(pred, target, self.reconstruction_loss,
                                                     logits=self.reconstruction_logits,
                                                     reduction="sum").double()
                        sse += summed_squared_error(pred, target,
                                                    self.reconstruction_logits).sum().double()
                out[f"{split}_loss"] = total / xs.shape[0]
                if self.loss == "reconstruction":
                    out[f"{split}_sse"] = sse / xs.shape[0]
                if self.loss == "cross_entropy":
                    out[f"{split}_acc"] = correct.double() / xs.shape[0]
        finally:
            _restore_training_flags(modes)
        return out

    @torch.no_grad()
    def probe(self) -> ProbeStatistics:
        """Per-unit statistics of the monitored modules on the fixed probe subset (eval mode).

        With ``probe_medians`` this is :func:`~biasshift.monitor.probe_statistics`; otherwise
        only the means (and the non-finite counts) are computed, by a streaming pass that keeps
        per-unit float64 sums instead of every activation, and ``median`` is empty.
        """
        if self.probe_x is None:
            raise RuntimeError("Trainer.probe(): the trainer was built with probe_size=0")
        return probe_statistics(self.model, self.probe_x, self.probe_modules,
                                batch_size=self.eval_batch_size, medians=self.probe_medians)

    # ------------------------------------------------------------------ history bookkeeping
    def _add_rows(self, rows: Iterator[tuple[int, str, int, str, float]] | list,
                  final: bool = False) -> None:
        target = self._final_rows if final else self._rows
        for epoch, layer, unit, quantity, value in rows:
            target["epoch"].append(int(epoch))
            target["layer"].append(layer)
            target["unit"].append(int(unit))
            target["quantity"].append(quantity)
            target["value"].append(float(value))

    def _flush_logs(self, final: bool = False) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        tensors = [v for *_, v in pending if isinstance(v, Tensor)]
        flat: list[np.ndarray] = []
        if tensors:
            by_device: dict[torch.device, list[int]] = {}
            for i, t in enumerate(tensors):
                by_device.setdefault(t.device, []).append(i)
            host: list[np.ndarray | None] = [None] * len(tensors)
            for idx in by_device.values():
                cat = torch.cat([tensors[i].reshape(-1).double() for i in idx]).cpu().numpy()
                offset = 0
                for i in idx:
                    n = tensors[i].numel()
                    host[i] = cat[offset : offset + n]
                    offset += n
            flat = [h for h in host if h is not None]
        rows = []
        it = iter(flat)
        for epoch, layer, quantity, v in pending:
            if isinstance(v, Tensor):
                vals = next(it)
                if v.ndim == 0:
                    rows.append((epoch, layer, -1, quantity, vals[0]))
                else:
                    rows.extend((epoch, layer, u, quantity, x) for u, x in enumerate(vals))
            else:
                rows.append((epoch, layer, -1, quantity, float(v)))
        self._add_rows(rows, final=final)

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict[str, Any]:
        if getattr(self, "_data_fingerprint", None) is None:
            self._data_fingerprint = data_fingerprint(self.dataset)
        return {
            "data": self._data_fingerprint,
            "loss": self.loss,
            "reconstruction_loss": self.reconstruction_loss,
            "reconstruction_logits": self.reconstruction_logits,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "dataset": self.dataset.name,
            "n_train": int(self.dataset.train_x.shape[0]),
            "n_test": int(self.dataset.test_x.shape[0]),
            "probe_size": 0 if self.probe_index is None else int(self.probe_index.numel()),
            "probe_seed": self.probe_seed,
            "probe_medians": self.probe_medians,
            "parameters": [[n, list(p.shape)] for n, p in self.model.named_parameters()],
            "optimizer": type(self.optimizer).__name__,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (what :meth:`fit` writes to the checkpoint each epoch)."""
        rng: dict[str, Tensor | None] = {"cpu": torch.get_rng_state(), "cuda": None}
        if self.rng_generator is not None:
            rng["cpu"] = self.rng_generator.get_state()
        elif self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "run": self.run_name,
            "config": self._fingerprint(),
            "epoch": self.epoch,
            "step": self.step,
            "diverged": self.diverged,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plugins": [{"type": type(p).__name__, "state": p.state_dict()}
                        for p in self.plugins],
            "rng": rng,
            "history": {k: list(v) for k, v in self._rows.items()},
            "epoch_seconds": list(self.epoch_seconds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (checks that it was made for this run's configuration)."""
        saved, now = state.get("config", {}), self._fingerprint()
        # checkpoints written before the data fingerprint existed lack "data"; those written
        # before the reconstruction losses existed trained on the default (sse, no logits)
        saved = {**_FINGERPRINT_DEFAULTS, **saved}
        diff = [k for k in now if saved.get(k) != now[k] and not (k == "data" and k not in saved)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in diff)
            where = self.checkpoint_path or "the state"
            raise CheckpointError(
                f"{where} was made for a different run configuration ({detail}); use another "
                "checkpoint_dir or start without resume"
            )
        # plug-ins with state (a non-empty state_dict) must match in order and type; stateless
        # ones (progress, read-only probes) may differ between the runs
        saved_plugins = [s for s in state["plugins"] if s["state"]]
        stateful = [p for p in self.plugins if p.state_dict()]
        if [s["type"] for s in saved_plugins] != [type(p).__name__ for p in stateful]:
            raise CheckpointError(
                f"{self.checkpoint_path or 'the state'} holds the states of the plug-ins "
                f"{[s['type'] for s in saved_plugins]}, but this trainer's stateful plug-ins are "
                f"{[type(p).__name__ for p in stateful]}; pass the same plug-ins to resume"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for p, s in zip(stateful, saved_plugins):
            p.load_state_dict(s["state"])
        if self.rng_generator is not None:
            self.rng_generator.set_state(state["rng"]["cpu"])
        else:
            torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.diverged = bool(state["diverged"])
        self._rows = {k: list(v) for k, v in state["history"].items()}
        self._final_rows = {k: [] for k in self._rows}
        self.epoch_seconds = list(state.get("epoch_seconds", []))

    # ------------------------------------------------------------------ the loop
    def epoch_order(self, epoch: int) -> Tensor:
        """The (CPU) permutation of the training set used in ``epoch`` (1-based).

        The same as :func:`biasshift.data.batch_indices` with a CPU generator seeded with
        ``derive_seed(seed, "data", epoch)``: independent of the device, the global RNG and
        everything that happened before the epoch.
        """
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
        return torch.randperm(self.dataset.train_x.shape[0], generator=gen)

    def _train_epoch(self, epoch: int) -> Tensor:
        """One pass over the shuffled training set; returns the mean mini-batch loss (device)."""
        model, opt, plugins = self.model, self.optimizer, self.plugins
        xs, ys = self.dataset.train_x, self.dataset.train_y
        recon = self.loss == "reconstruction"
        n, bs = xs.shape[0], self.batch_size
        # the order of biasshift.data.batch_indices, with an asynchronous copy to the device
        perm = self.epoch_order(epoch).to(self.device, non_blocking=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        augment, gen = self.augment, None
        if augment is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derive_seed(self.seed, "augment", epoch))
        model.train()
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            x = xs[idx]
            if gen is not None:
                x = augment(x, gen)
            y = x if recon else ys[idx]
            loss = self._batch_loss(model(x), x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            step = self.step
            for p in plugins:
                p.on_before_step(self, step, x, y, loss)
            opt.step()
            self.step = step + 1
            total.add_(loss.detach(), alpha=x.shape[0])
            for p in plugins:
                p.on_after_step(self, step, x, y, loss)
        return total / xs.shape[0]

    def _evaluation_callbacks(self, when: str) -> None:
        """The plug-ins' optional ``on_evaluate_start``/``on_evaluate_end`` (``when``)."""
        for p in self.plugins:
            getattr(p, f"on_evaluate_{when}", _noop)(self)

    def _evaluate_epoch(self, epoch: int, running: Tensor | None) -> tuple[dict[str, float], bool]:
        """Evaluate, record the epoch's rows; returns (metrics, finite) with one host transfer."""
        self._evaluation_callbacks("start")
        try:
            values = self.evaluate()
            probe = None
            if self.probe_x is not None:
                probe = self.probe()
        finally:
            self._evaluation_callbacks("end")
        if running is not None:
            values["running_loss"] = running
        if probe is not None:
            values["median_of_means"] = probe.median_of_means()
        layer_values = {} if probe is None else probe.layer_median_of_means()
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        finite = finite & torch.stack([torch.isfinite(v) for k, v in values.items()
                                       if k.endswith("loss")]).all()
        names = list(values)
        host = torch.stack([v.double() for v in values.values()]
                           + [v.double() for v in layer_values.values()]
                           + [finite.double()]).cpu().numpy()
        metrics = {k: float(host[i]) for i, k in enumerate(names)}
        rows = [(epoch, "all", -1, k, metrics[k]) for k in names]
        rows += [(epoch, layer, -1, "median_of_means", host[len(names) + j])
                 for j, layer in enumerate(layer_values)]
        self._add_rows(rows)
        self.last_probe = probe
        return metrics, bool(host[-1])

    def _save(self) -> None:
        if self.checkpoint_dir is None:
            return
        save_checkpoint(self.state_dict(), self.checkpoint_dir / CHECKPOINT_NAME)
        write_csv(self.history, self.checkpoint_dir / HISTORY_NAME)

    @contextlib.contextmanager
    def _rng_scope(self) -> Iterator[None]:
        devices = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    def fit(self, resume: bool = False) -> pd.DataFrame:
        """Train up to ``epochs`` epochs and return the tidy :attr:`history`.

        With ``resume=True`` an existing ``checkpoint_dir/checkpoint.pt`` is loaded and training
        continues after its epoch (a run that diverged stays stopped); without a checkpoint the
        run starts afresh. ``resume=False`` always starts afresh (overwriting the checkpoint).

        Raises:
            ValueError: ``resume=True`` without ``checkpoint_dir``.
            CheckpointError: the checkpoint is unreadable, belongs to another configuration, or
                holds more epochs than ``epochs``.
        """
        if resume and self.checkpoint_dir is None:
            raise ValueError("Trainer.fit(resume=True) needs a checkpoint_dir")
        if self._fitted:
            raise RuntimeError("Trainer.fit() was already called on this trainer; build a new "
                               "Trainer (with resume=True to continue from its checkpoint)")
        self._fitted = True
        state = None
        self.resumed_from = None
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            if int(state["epoch"]) > self.epochs:
                raise CheckpointError(
                    f"{self.checkpoint_path} holds {state['epoch']} epochs but this trainer is "
                    f"set to {self.epochs}; raise epochs or start without resume"
                )
            self.resumed_from = int(state["epoch"])
        old_threads = torch.get_num_threads()
        bar = None
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            with self._rng_scope():
                if state is None:
                    torch.default_generator.manual_seed(derive_seed(self.seed, "train"))
                    if self.device.type == "cuda":
                        with torch.cuda.device(self.device):
                            torch.cuda.manual_seed(derive_seed(self.seed, "train"))
                bar = self._make_bar()
                self._run(state, bar)
        finally:
            if bar is not None:
                bar.close()
            torch.set_num_threads(old_threads)
        return self.history

    def _make_bar(self) -> Any:
        if self.progress is True:
            from tqdm.auto import tqdm

            return tqdm(total=self.epochs, desc=self.run_name, unit="epoch", disable=None,
                        leave=False)
        return None

    def _report(self, bar: Any) -> None:
        if bar is not None:
            bar.n = self.epoch
            bar.refresh()
        elif callable(self.progress):
            self.progress(self)

    def _run(self, state: dict[str, Any] | None, bar: Any) -> None:
        for p in self.plugins:
            p.on_fit_start(self)
        ok = False
        try:
            if state is not None:
                self.load_state_dict(state)
            elif self.eval_initial:
                self._log_epoch = 0
                self._evaluate_epoch(0, None)
            self._report(bar)
            while not self.diverged and self.epoch < self.epochs:
                epoch = self.epoch + 1
                self._log_epoch = epoch
                t0 = time.perf_counter()
                running = self._train_epoch(epoch)
                metrics, finite = self._evaluate_epoch(epoch, running)
                self.epoch = epoch
                for p in self.plugins:
                    p.on_epoch_end(self, epoch, metrics)
                self._flush_logs()
                if not finite:
                    self.diverged = True
                    self._add_rows([(epoch, "all", -1, "diverged", 1.0)])
                self.epoch_seconds.append(time.perf_counter() - t0)
                self._save()
                if bar is not None and "train_loss" in metrics:
                    bar.set_postfix(train_loss=f"{metrics['train_loss']:.4g}", refresh=False)
                self._report(bar)
            ok = True
        finally:
            self._log_epoch = self.epoch
            for p in self.plugins:
                p.on_fit_end(self)
            if ok:
                self._flush_logs(final=True)
                if self.checkpoint_dir is not None:
                    write_csv(self.history, self.checkpoint_dir / HISTORY_NAME)
