"""A Lightning ``Callback`` that monitors a ``LightningModule``'s units while it trains.

Needs ``lightning`` (``pip install biasshift[lightning]``; the older ``pytorch_lightning``
package works too)::

    import lightning.pytorch as pl
    from biasshift.integrations.lightning import BiasShiftCallback

    cb = BiasShiftCallback(histogram=dict(bins=32, range=(-2.0, 4.0)),
                           probe=(probe_x, probe_y), probe_every_n_steps=100)
    pl.Trainer(max_epochs=10, callbacks=[cb]).fit(module, loader)
    cb.monitor.history()          # one snapshot per epoch: tags epoch, step
    cb.probe_history()            # the probe's measurements: step, layer, unit, quantity, value

What it does
    * On ``fit`` start it creates an :class:`~biasshift.ActivationMonitor` on the
      ``LightningModule`` (``modules``, ``unit_dim``, ``histogram`` and ``monitor_kwargs`` as
      for the monitor) and keeps its hooks registered during the training batches only
      (validation, sanity checks and the probe's own passes are not counted).
    * At the end of every training epoch it takes a snapshot (``epoch``, ``step`` tags;
      ``reset_every_epoch=True``, the default, then starts the next epoch afresh, so each
      snapshot holds one epoch) and logs the per-module summaries of
      :mod:`biasshift.integrations.summaries` through **every logger of the trainer**: with a
      ``TensorBoardLogger`` as scalars and ``add_histogram_raw`` histograms
      (:func:`~biasshift.integrations.tensorboard.log_monitor`), with any other logger as
      ``log_metrics`` scalars.
    * With ``probe=(inputs, targets)`` a :class:`~biasshift.BiasShiftProbe` (``probe_kwargs``;
      it calls the module's ``forward`` on the probe inputs, so the module must define one)
      measures the optimizer step every ``probe_every_n_steps`` steps (the measurement spans
      Lightning's ``on_before_optimizer_step`` to ``on_train_batch_end``) and its medians of
      the tracked cosines and bias shifts are logged the same way.

Checkpoints
    The callback's ``state_dict`` (the monitor's statistics and snapshots, the probe's
    measurements) goes into Lightning's checkpoints; ``fit(..., ckpt_path=...)`` continues it.

Distributed (Lightning's DDP strategy)
    Every rank runs the callback; the statistics are those of all ranks together
    (:mod:`biasshift.distributed`: the snapshot and the probe are collectives, the hooks are
    not) and only global rank zero writes to the loggers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import pandas as pd

try:  # the unified package first, then the standalone one
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("biasshift.integrations.lightning needs Lightning: "
                          "pip install 'biasshift[lightning]'") from e

from biasshift.integrations.summaries import measurement_scalars, monitor_scalars

__all__ = ["BiasShiftCallback"]


def _is_tensorboard(logger: Any) -> bool:
    return type(logger).__name__ == "TensorBoardLogger" and hasattr(logger, "experiment")


class BiasShiftCallback(Callback):
    """Attach :class:`~biasshift.ActivationMonitor` (and optionally
    :class:`~biasshift.BiasShiftProbe`) to a ``LightningModule`` (see the module docstring).

    Args:
        modules, unit_dim, histogram: as for :class:`~biasshift.ActivationMonitor`.
        monitor_kwargs: more keyword arguments for the monitor.
        reset_every_epoch: start every epoch's statistics afresh (default) or keep them
            running over the whole fit.
        probe: ``(inputs, targets)`` of a fixed probe batch for the bias-shift probe, or
            ``None`` (no probe).
        probe_every_n_steps: measure the optimizer step when ``global_step`` is a multiple.
        probe_kwargs: keyword arguments for :class:`~biasshift.BiasShiftProbe`.
        prefix: the loggers' tag prefix.
        log_histograms: write the monitor's histograms to TensorBoard loggers.
    """

    def __init__(
        self,
        modules: Any = None,
        unit_dim: Any = None,
        *,
        histogram: Any = None,
        monitor_kwargs: Mapping[str, Any] | None = None,
        reset_every_epoch: bool = True,
        probe: tuple[Any, Any] | None = None,
        probe_every_n_steps: int = 100,
        probe_kwargs: Mapping[str, Any] | None = None,
        prefix: str = "biasshift",
        log_histograms: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(probe_every_n_steps, bool) or not isinstance(probe_every_n_steps, int) \
                or probe_every_n_steps < 1:
            raise ValueError(f"BiasShiftCallback: probe_every_n_steps must be a positive int, "
                             f"got {probe_every_n_steps!r}")
        if probe is not None and (not isinstance(probe, (tuple, list)) or len(probe) != 2):
            raise TypeError("BiasShiftCallback: probe must be (inputs, targets) or None")
        self.modules = modules
        self.unit_dim = unit_dim
        self.histogram = histogram
        self.monitor_kwargs = dict(monitor_kwargs or {})
        self.reset_every_epoch = bool(reset_every_epoch)
        self.probe_batch = probe
        self.probe_every_n_steps = probe_every_n_steps
        self.probe_kwargs = dict(probe_kwargs or {})
        self.prefix = prefix
        self.log_histograms = bool(log_histograms)
        self.monitor: Any = None
        self.probe: Any = None
        self._measure: Any = None
        self._measurement: Any = None
        self._probe_frames: list[pd.DataFrame] = []

    # -- set-up and teardown ------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from biasshift import ActivationMonitor, BiasShiftProbe

        if self.monitor is None:
            self.monitor = ActivationMonitor(pl_module, self.modules, self.unit_dim,
                                             histogram=self.histogram, **self.monitor_kwargs)
            self._restore()  # a checkpoint loaded before the fit started
        if self.probe_batch is not None and self.probe is None:
            forward = getattr(type(pl_module), "forward", None)
            owner = str(getattr(forward, "__module__", "")).split(".")[0]
            if owner in ("lightning", "pytorch_lightning", "torch"):
                raise TypeError(f"BiasShiftCallback: the probe runs the module on its inputs, "
                                f"but {type(pl_module).__name__} defines no forward(); add "
                                "`def forward(self, x): return self.net(x)` (or pass no probe)")
            x, y = self.probe_batch
            self.probe = BiasShiftProbe(pl_module, x, y, **self.probe_kwargs)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The monitor's statistics and snapshots and the probe's measurements, saved in
        Lightning checkpoints so that ``fit(..., ckpt_path=...)`` continues them."""
        return {"monitor": self.monitor.state_dict() if self.monitor is not None else None,
                "probe": self.probe_history().to_dict("list")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        if self.monitor is not None:
            self._restore()

    def _restore(self) -> None:
        state = getattr(self, "_restored", None)
        if not state:
            return
        self._restored = None
        if state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        probe = pd.DataFrame(state.get("probe") or {})
        self._probe_frames = [probe] if len(probe) else []

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._set_hooks(False)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._set_hooks(False)
        if self._measure is not None:
            with contextlib.suppress(Exception):
                self._measure.__exit__(type(exception), exception, None)
            self._measure = None

    def _set_hooks(self, on: bool) -> None:
        if self.monitor is None:
            return
        if on and not self.monitor.active:
            self.monitor.attach()
        elif not on and self.monitor.active:
            self.monitor.detach()

    # -- counting only the training batches ---------------------------------------------------
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._set_hooks(True)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._training = self.monitor is not None and self.monitor.active
        self._set_hooks(False)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(self, "_training", False):
            self._set_hooks(True)

    # -- the probe ----------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.probe is None or self._measure is not None \
                or trainer.global_step % self.probe_every_n_steps:
            return
        was = self.monitor.active
        self._set_hooks(False)  # the probe's passes are not training samples
        try:
            self._measure = self.probe.measure()
            self._measurement = self._measure.__enter__()
        finally:
            self._set_hooks(was)
        self._probe_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._measure is None:
            return
        was = self.monitor.active
        self._set_hooks(False)
        try:
            self._measure.__exit__(None, None, None)
        finally:
            self._measure = None
            self._set_hooks(was)
        m, self._measurement = self._measurement, None
        frame = m.frame()
        frame.insert(0, "step", self._probe_step)
        self._probe_frames.append(frame)
        self._log(trainer, measurement_scalars(m, self.prefix), self._probe_step)

    def probe_history(self) -> pd.DataFrame:
        """Every probe measurement: ``step, layer, unit, quantity, value``."""
        if not self._probe_frames:
            return pd.DataFrame(columns=["step", "layer", "unit", "quantity", "value"])
        return pd.concat(self._probe_frames, ignore_index=True)

    # -- per-epoch snapshots and logging ------------------------------------------------------
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            return
        self._set_hooks(False)
        step = int(trainer.global_step)
        self.monitor.snapshot(epoch=int(trainer.current_epoch), step=step)
        stats = self.monitor.stats()  # all ranks (a collective on every rank)
        scalars = monitor_scalars(stats, self.prefix)
        hist = None
        if self.log_histograms and self.monitor.histogram is not None and \
                any(_is_tensorboard(lg) for lg in trainer.loggers):
            from biasshift.integrations.tensorboard import monitor_histograms

            hist = monitor_histograms(self.monitor)
        self._log(trainer, scalars, step, hist)
        if self.reset_every_epoch:
            self.monitor.reset()

    def _log(self, trainer: Any, scalars: dict[str, float], step: int,
             hist: dict[str, dict[str, Any]] | None = None) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if _is_tensorboard(logger):
                writer = logger.experiment
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, global_step=step)
                for module, kw in (hist or {}).items():
                    writer.add_histogram_raw(f"{self.prefix}/{module}/activations",
                                             global_step=step, **kw)
            else:
                logger.log_metrics(scalars, step=step)
