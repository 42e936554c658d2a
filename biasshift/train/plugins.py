"""The trainer's plug-in protocol and the :class:`MonitorPlugin` adapter.

A plug-in is any object with the callbacks of :class:`Plugin` (subclass it to inherit no-op
defaults). The trainer calls them in this order::

    on_fit_start(trainer)                         # once per fit() call, also when resuming
    load_state_dict(state)                        # only when resuming, right after on_fit_start
    [on_evaluate_start / on_evaluate_end]         # around the initial evaluation (epoch 0)
    for each epoch:
        for each mini-batch:
            on_before_step(trainer, step, x, y, loss)   # after backward, before optimizer.step()
            on_after_step(trainer, step, x, y, loss)    # after optimizer.step()
        on_evaluate_start(trainer)                # the trainer's own forward passes follow:
        on_evaluate_end(trainer)                  #   whole-set losses and the probe
        on_epoch_end(trainer, epoch, metrics)     # after the epoch's evaluation, before the
                                                  # checkpoint (whose plug-in state it includes)
    on_fit_end(trainer)                           # always, also when fit() raises

``on_evaluate_start``/``on_evaluate_end`` are optional (the trainer calls them when present); a
plug-in that hooks the model uses them to leave the evaluation passes out of its statistics.

``step`` is the global step (0-based, counted over all epochs), ``x``/``y`` the current
mini-batch on the training device (``y`` is ``x`` for reconstruction), ``loss`` the batch's
0-dim loss tensor (still attached to the graph in ``on_before_step``; the gradients are in
``p.grad``). ``metrics`` maps the epoch's whole-net quantities to floats. Through ``trainer`` a
plug-in reaches ``model``, ``optimizer``, ``epoch``, ``step``, ``dataset``, ``device`` and
``last_probe`` (the epoch's :class:`~biasshift.monitor.ProbeStatistics`).

Contract
    * Per-step callbacks run in the hot loop: no ``.item()``, ``.cpu()``, printing or Python
      branching on tensor values there (keep device tensors; convert at epoch end).
    * Tracking must not change the training trajectory: a plug-in must not draw from torch's
      global random number generators (the trainer owns them and restores them on resume), must
      not modify parameters, gradients or the batch, and must leave the model's training flag as
      it found it. A plug-in that needs randomness keeps its own ``torch.Generator``.
    * ``state_dict()`` returns tensors and plain Python values only (checkpoints are loaded
      with ``torch.load(weights_only=True)``); ``load_state_dict`` restores it. On resume the
      plug-ins with a non-empty state must be the same (type and order) as when the checkpoint
      was written; stateless plug-ins may be added or left out.
    * Tidy rows: call :meth:`biasshift.train.Trainer.log` (``quantity``, a scalar or a per-unit
      1-D tensor, ``layer``); logged tensors stay on the device until the epoch ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from biasshift.train.trainer import Trainer

__all__ = ["MonitorLike", "MonitorPlugin", "Plugin"]


class Plugin:
    """Base class for trainer plug-ins: every callback is a no-op; override what you need.

    ``stackable``: whether runs with this plug-in may be trained as members of one stacked
    model (:class:`~biasshift.train.batched.BatchedTrainer`). A stack calls every callback
    once per member, with the member's trainer (whose ``model`` is a view of the member's
    weights, and whose ``optimizer`` holds its ``lr``, which a schedule may set), its
    mini-batch and its 0-dim loss. A plug-in may set it when it neither hooks the model's
    modules (a stack's forward pass never calls the member's modules) nor reads
    ``p.grad`` (the gradients are the stack's); learning-rate schedules and timers qualify,
    monitors and trackers do not. In a stack ``on_evaluate_start``/``on_evaluate_end`` come
    twice per epoch: around the stack's evaluation of every member, then around the member's
    own probe. Default ``False``.
    """

    stackable: bool = False

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once at the start of :meth:`Trainer.fit` (before a resume's state is loaded)."""

    def on_before_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                       loss: Tensor) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``."""

    def on_after_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                      loss: Tensor) -> None:
        """Called after ``optimizer.step()``."""

    def on_evaluate_start(self, trainer: Trainer) -> None:
        """Called before the trainer's evaluation passes (model in eval mode, no gradients)."""

    def on_evaluate_end(self, trainer: Trainer) -> None:
        """Called after the trainer's evaluation passes."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """Called after the epoch's evaluation (``trainer.last_probe`` is current)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called when :meth:`Trainer.fit` ends, normally, by divergence or by an exception."""

    def state_dict(self) -> dict[str, Any]:
        """The plug-in's state for the checkpoint (tensors and plain Python values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@runtime_checkable
class MonitorLike(Protocol):
    """The part of :class:`biasshift.ActivationMonitor`'s contract that :class:`MonitorPlugin` uses.

    A context manager that attaches its hooks on ``__enter__`` and removes them on ``__exit__``,
    with ``snapshot(**tags)``, ``history()`` (a tidy DataFrame), ``reset()``, ``state_dict()`` and
    ``load_state_dict(state)``.
    """

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> Any: ...
    def snapshot(self, **tags: Any) -> Any: ...
    def history(self) -> Any: ...
    def reset(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class MonitorPlugin(Plugin):
    """Keep an activation monitor attached for the whole fit and snapshot it during training.

    Args:
        monitor: an :class:`biasshift.ActivationMonitor` (or any object with its contract, see
            :class:`MonitorLike`) built on the trainer's model.
        snapshot: ``"epoch"`` (default) snapshots at every epoch end; an int ``n`` snapshots after
            every ``n``-th optimizer step (global step count) instead. Snapshots are tagged
            ``epoch=`` and ``step=`` (the number of optimizer steps taken so far).
        reset_after_snapshot: call ``monitor.reset()`` after each snapshot, so that every snapshot
            covers only the steps since the previous one.
        include_evaluation: also record the trainer's evaluation passes (whole training and
            test set, probe). Off by default: the monitor's hooks are detached around them, so
            the statistics cover exactly the training mini-batches.

    The monitor is entered in ``on_fit_start`` and exited in ``on_fit_end``; its state (and so
    its snapshot history) is part of the trainer's checkpoint. Read the results with
    :meth:`history` (the monitor's own tidy table).
    """

    def __init__(self, monitor: MonitorLike, snapshot: str | int = "epoch", *,
                 reset_after_snapshot: bool = False, include_evaluation: bool = False) -> None:
        missing = [m for m in ("__enter__", "__exit__", "snapshot", "history", "reset",
                               "state_dict", "load_state_dict") if not hasattr(monitor, m)]
        if missing:
            raise TypeError(
                f"MonitorPlugin: {type(monitor).__name__} lacks {', '.join(missing)}; pass an "
                "ActivationMonitor or an object with its contract (see MonitorLike)"
            )
        if snapshot != "epoch" and (isinstance(snapshot, bool) or not isinstance(snapshot, int)
                                    or snapshot < 1):
            raise ValueError(
                f"MonitorPlugin: snapshot must be 'epoch' or a positive step interval, got "
                f"{snapshot!r}"
            )
        self.monitor = monitor
        self.snapshot = snapshot
        self.reset_after_snapshot = reset_after_snapshot
        self.include_evaluation = include_evaluation
        self._entered = False

    def _take(self, trainer: Trainer) -> None:
        self.monitor.snapshot(epoch=trainer.epoch, step=trainer.step)
        if self.reset_after_snapshot:
            self.monitor.reset()

    def on_fit_start(self, trainer: Trainer) -> None:
        self.monitor.__enter__()
        self._entered = True

    def on_after_step(self, trainer: Trainer, step: int, x: Tensor, y: Tensor,
                      loss: Tensor) -> None:
        # trainer.step already counts this step; a plain int, no host sync
        if self.snapshot != "epoch" and trainer.step % self.snapshot == 0:
            self._take(trainer)

    def on_evaluate_start(self, trainer: Trainer) -> None:
        if self._entered and not self.include_evaluation:
            self.monitor.__exit__(None, None, None)

    def on_evaluate_end(self, trainer: Trainer) -> None:
        if self._entered and not self.include_evaluation:
            self.monitor.__enter__()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if self.snapshot == "epoch":
            self._take(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._entered:
            self._entered = False
            self.monitor.__exit__(None, None, None)

    def history(self) -> Any:
        """The monitor's tidy snapshot history (``monitor.history()``)."""
        return self.monitor.history()

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])
