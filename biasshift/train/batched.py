r"""Many runs as one model: :class:`BatchedTrainer` trains ``K`` :class:`Trainer` runs together.

Every member is an ordinary :class:`~biasshift.train.Trainer` (its own seed, learning rate, run
name, checkpoint folder, history, evaluation and probe); :class:`BatchedTrainer` replaces only
the training step: the members' networks are stacked into one
:class:`~biasshift.models.stacked.StackedSequential` and every SGD step of all members is one
forward and one backward pass of batched GEMMs (``bmm``) over ``(K, batch, features)``.

What stays exactly as in the single run
    * initial weights: each member's model is built by its own Trainer (the factory under the
      generator seeded with ``derive_seed(seed, "init")``) and copied into the stack;
    * data order: member ``k``'s epoch ``e`` uses its own permutation
      (:meth:`Trainer.epoch_order`, seeded with ``derive_seed(seed_k, "data", e)``), and its
      own augmentation (``augment`` with its generator seeded with
      ``derive_seed(seed_k, "augment", e)``; a mid-epoch checkpoint keeps the generators'
      states);
    * plug-ins that are :attr:`~biasshift.train.Plugin.stackable` (learning-rate schedules,
      timers): every callback once per member, with the member's trainer, mini-batch and
      loss, in the single run's order; a schedule sets the member's own ``lr``;
    * the update: ``torch.optim.SGD`` with the member's own ``lr``, momentum, dampening,
      Nesterov and weight decay (:class:`_StackedSGD`; the momentum buffers are in the
      member's optimizer state, as in its single run); the gradient of ``Σ_k loss_k`` with
      respect to member ``k``'s weights is the gradient of ``loss_k`` alone, since member
      ``k``'s output depends on nothing else;
    * per-epoch evaluation (whole train/test losses and accuracies, from one batched forward of
      every member on the shared data), probe statistics (:func:`probe_statistics` on the
      member's own view, :meth:`StackedSequential.member`), the tidy history rows with the
      member's ``run`` name, the ``diverged`` flag, and the member's own ``checkpoint.pt`` and
      ``history.csv`` after every epoch — in the single-run format, so a member can be resumed
      or finished by the single-run Trainer.

    Results equal the single runs to float32 rounding (a batched GEMM may sum in another order);
    bit-identity with a single run is not promised, but a stack resumed from its checkpoint is
    bit-identical to an uninterrupted stack on the CPU.

Divergence
    A member whose loss or parameters are non-finite at the end of an epoch is flagged (the
    ``diverged`` row, as in a single run) and frozen: its learning rate becomes 0, its gradient
    is masked (NaN never reaches its frozen weights) and it gets no more rows; the others go on.

Checkpoints
    With ``checkpoint_dir`` the stack writes ``stack.pt`` atomically after every epoch and, with
    ``checkpoint_every=S``, after every ``S`` steps inside an epoch (the members' states, the
    position in the epoch and the running losses): ``fit(resume=True)`` continues mid-epoch.
    Without a stack checkpoint, members' own epoch-end checkpoints are resumed when they all
    stand at the same epoch.

Memory
    :func:`member_bytes` estimates one member's working set (parameters, gradients, the
    activations kept for the backward pass at the training batch, the evaluation chunk);
    :func:`stack_size` turns a byte budget into ``K``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasshift.io import write_csv
from biasshift.models.stacked import StackedSequential, stackable
from biasshift.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from biasshift.train.trainer import HISTORY_NAME, Trainer, derive_seed

__all__ = ["STACK_CHECKPOINT", "BatchedTrainer", "batchable", "member_bytes", "sgd_refusal",
           "stack_size"]

STACK_CHECKPOINT = "stack.pt"


def batchable(trainer: Trainer) -> str | None:
    """``None`` when ``trainer`` can be a member of a :class:`BatchedTrainer`, else why not."""
    why = stackable(trainer.model)
    if why is not None:
        return why
    for p in trainer.plugins:
        if not getattr(p, "stackable", False):
            return (f"its plug-in {type(p).__name__} is not stackable (it may hook the model "
                    "or read gradients; see Plugin.stackable)")
    if trainer.loss == "reconstruction" and (trainer.reconstruction_loss != "sse"
                                             or trainer.reconstruction_logits):
        return (f"its reconstruction loss is {trainer.reconstruction_loss!r}"
                f"{' on logits' if trainer.reconstruction_logits else ''}; a stack trains "
                "the summed squared error of the model's output only")
    return sgd_refusal(trainer.optimizer, trainer.lr)


def sgd_refusal(opt: torch.optim.Optimizer, lr: float) -> str | None:
    """``None`` when a stack can run ``opt`` (``torch.optim.SGD``, one parameter group at
    ``lr``, any momentum and weight decay, not maximizing), else why not."""
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return f"its optimizer is {type(opt).__name__}, not torch.optim.SGD with one group"
    g = opt.param_groups[0]
    if g.get("maximize", False) or g.get("differentiable", False):
        return "its SGD maximizes or is differentiable"
    if g.get("lr") != lr:
        return f"its SGD's lr {g.get('lr')!r} is not the trainer's lr {lr!r}"
    return None


def member_bytes(model: nn.Module, batch_size: int, eval_batch_size: int,
                 itemsize: int = 4, *, input_shape: Sequence[int] | None = None) -> int:
    """Bytes one member adds to a stack: parameters, gradients and the update temporary (3 per
    weight), the activations kept for the backward pass at the training batch (per
    ``nn.Linear`` or convolution its input and output and their gradients, per other layer
    its output) and the two widest outputs of an evaluation chunk (without gradients only
    consecutive layers' outputs are alive).

    ``input_shape``: one sample's shape, e.g. ``(1, 28, 28)``; needed when the model has
    layers other than ``nn.Linear`` with parameters or buffers (convolutions, batch norm),
    whose output sizes are then traced on the meta device (no memory, no compute)."""
    params = sum(p.numel() for p in model.parameters())
    act = 0
    widest = 0
    shaped = [m for m in model.modules() if not isinstance(m, nn.Linear)
              and (any(True for _ in m.parameters(recurse=False))
                   or any(True for _ in m.buffers(recurse=False)))]
    if not shaped:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                act += batch_size * (m.in_features + 3 * m.out_features)
                widest = max(widest, m.out_features)
        return int((3 * params + act + 2 * eval_batch_size * widest) * itemsize)
    if input_shape is None:
        raise ValueError(f"member_bytes: the model has {type(shaped[0]).__name__} layers; pass "
                         "input_shape= (one sample's shape, e.g. (1, 28, 28)) so that their "
                         "activations can be sized")
    for numel_in, numel_out, weighted in _leaf_sizes(model, tuple(input_shape)):
        act += batch_size * ((numel_in + 3 * numel_out) if weighted else numel_out)
        widest = max(widest, numel_out)
    return int((3 * params + act + 2 * eval_batch_size * widest) * itemsize)


def _leaf_sizes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """``(input numel, output numel, has weights)`` per sample of every leaf module, in call
    order, from a forward of one sample on a meta-device copy."""
    from biasshift.hooks import Trace

    meta = copy.deepcopy(model).to("meta").eval()  # one sample: batch norm in eval mode
    leaves = {n: m for n, m in meta.named_modules() if not any(True for _ in m.children())}
    sizes: list[tuple[int, int, bool]] = []

    def seen(name: str, m: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        weighted = isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
        sizes.append((inputs[0].numel(), out.numel(), weighted))

    with torch.no_grad(), Trace(leaves, forward=seen):
        meta(torch.empty((1, *input_shape), device="meta"))
    return sizes


def stack_size(budget: int, per_member: int, runs: int) -> int:
    """The largest ``K <= runs`` whose ``K · per_member`` bytes fit ``budget`` (at least 1)."""
    if per_member <= 0:
        raise ValueError(f"stack_size: per_member must be > 0 bytes, got {per_member}")
    return int(max(1, min(runs, budget // per_member)))


class BatchedTrainer:
    """Train the runs of ``trainers`` as one stacked model (see the module docstring).

    Args:
        trainers: the members, built as for single runs (same dataset, loss, batch size, epochs,
            device, evaluation and probe settings; ``torch.optim.SGD`` with one parameter group,
            any momentum and weight decay; stackable plug-ins only); each
            keeps its own seed, lr, run name and checkpoint folder.  :meth:`fit` trains them and
            leaves each in the state its own :meth:`Trainer.fit` would (``epoch``, ``step``,
            ``diverged``, ``history``, ``last_probe``, checkpoint files).
        checkpoint_dir: folder for the stack's own ``stack.pt`` (``None``: none).
        checkpoint_every: also checkpoint the stack every this many steps inside an epoch.
        threads: ``torch.set_num_threads`` during :meth:`fit`.
    """

    def __init__(self, trainers: Sequence[Trainer], *,
                 checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_every: int | None = None, threads: int | None = None) -> None:
        trainers = list(trainers)
        if not trainers:
            raise ValueError("BatchedTrainer: give at least one member Trainer")
        for i, t in enumerate(trainers):
            if not isinstance(t, Trainer):
                raise TypeError(f"BatchedTrainer: member {i} is a {type(t).__name__}, not a "
                                "Trainer")
            why = batchable(t)
            if why is not None:
                raise ValueError(f"BatchedTrainer: member {i} ({t.run_name!r}) cannot be "
                                 f"stacked: {why}; train it alone (--batch-runs 1)")
            if t._fitted:
                raise RuntimeError(f"BatchedTrainer: member {i} ({t.run_name!r}) was fitted "
                                   "already; build a new Trainer")
        t0 = trainers[0]
        for i, t in enumerate(trainers[1:], start=1):
            for attr in ("loss", "batch_size", "epochs", "device", "eval_batch_size",
                         "eval_initial", "probe_medians"):
                if getattr(t, attr) != getattr(t0, attr):
                    raise ValueError(f"BatchedTrainer: member {i} has {attr}="
                                     f"{getattr(t, attr)!r}, member 0 {getattr(t0, attr)!r}; "
                                     "members must share it")
            same_data = t.dataset.train_x is t0.dataset.train_x or (
                t.dataset.train_x.shape == t0.dataset.train_x.shape
                and t._fingerprint()["data"] == t0._fingerprint()["data"])
            if not same_data:
                raise ValueError(f"BatchedTrainer: member {i} trains on other data than member 0")
            if (t.probe_index is None) != (t0.probe_index is None) or (
                    t.probe_index is not None and not torch.equal(t.probe_index, t0.probe_index)):
                raise ValueError(f"BatchedTrainer: member {i} has another probe subset than "
                                 "member 0 (probe_size/probe_seed must match)")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or
                                             not isinstance(checkpoint_every, int) or
                                             checkpoint_every < 1):
            raise ValueError("BatchedTrainer: checkpoint_every must be a positive number of "
                             f"steps or None, got {checkpoint_every!r}")
        self.trainers = trainers
        self.K = len(trainers)
        self.device = t0.device
        self.dataset = t0.dataset
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.threads = threads
        self.stack = StackedSequential([t.model for t in trainers]).to(self.device)
        for k, t in enumerate(trainers):
            t.model = self.stack.member(k)
            g = t.optimizer.param_groups[0]
            t.optimizer = torch.optim.SGD(
                t.model.parameters(), lr=t.lr, momentum=g["momentum"],
                dampening=g["dampening"], weight_decay=g["weight_decay"],
                nesterov=g["nesterov"])
            if t.probe_x is not None and k > 0:
                t.probe_x = t0.probe_x  # one copy of the shared probe subset
            t.dataset = self.dataset
            t.stack_members = len(trainers)
        self._sgd = _StackedSGD(self.stack, trainers, self.device)
        if self.device.type == "cpu":
            # each member's dropout masks from its own generator, seeded as its single run
            # seeds the global one (fit), checkpointed as its "rng": the single run's masks
            for t in trainers:
                t.rng_generator = torch.Generator()
            self.stack.use_member_generators([t.rng_generator for t in trainers])
        self.epoch = 0  # epochs completed by the stack
        self.resumed_from: tuple[int, int] | None = None  # (epoch, next sample) of a resume
        self._fitted = False

    # ------------------------------------------------------------------ state
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / STACK_CHECKPOINT

    @property
    def active(self) -> list[bool]:
        """Members still training (not diverged)."""
        return [not t.diverged for t in self.trainers]

    @property
    def history(self) -> pd.DataFrame:
        """All members' tidy histories, one block of rows per member (``run`` column)."""
        return pd.concat([t.history for t in self.trainers], ignore_index=True)

    def _stack_state(self, position: dict[str, Any] | None) -> dict[str, Any]:
        return {"kind": "stack", "runs": [t.run_name for t in self.trainers],
                "epoch": self.epoch, "position": position,
                "members": [t.state_dict() for t in self.trainers]}

    def _save_stack(self, position: dict[str, Any] | None) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(self._stack_state(position), self.checkpoint_path)

    def _load(self) -> dict[str, Any] | None:
        """Restore the stack checkpoint, else the members' own ones; the in-epoch position."""
        path = self.checkpoint_path
        if path is not None and path.exists():
            state = load_checkpoint(path)
            runs = [t.run_name for t in self.trainers]
            if state.get("kind") != "stack" or state.get("runs") != runs:
                raise CheckpointError(f"{path} holds the stack {state.get('runs')!r}, not "
                                      f"{runs!r}; use another checkpoint_dir or start afresh")
            for t, s in zip(self.trainers, state["members"]):
                t.load_state_dict(s)
            self._sgd.adopt()
            self.epoch = int(state["epoch"])
            return state["position"]
        found = [t.checkpoint_path is not None and t.checkpoint_path.exists()
                 for t in self.trainers]
        if not any(found):
            return None
        states = [load_checkpoint(t.checkpoint_path) if f else None  # type: ignore[arg-type]
                  for t, f in zip(self.trainers, found)]
        epochs = {int(s["epoch"]) if s is not None else 0 for s in states}
        if not all(found) or len(epochs) > 1:
            # a diverged member stopped earlier: its epoch is smaller, and it stays frozen
            live = {int(s["epoch"]) for s in states if s is not None and not s["diverged"]}
            if not all(found) or len(live) > 1:
                raise CheckpointError(
                    "BatchedTrainer: the members' checkpoints stand at different epochs "
                    f"({sorted(epochs)}); resume them one by one (--batch-runs 1)")
        for t, s in zip(self.trainers, states):
            assert s is not None
            t.load_state_dict(s)
        self._sgd.adopt()
        live = [int(s["epoch"]) for s in states if s is not None and not s["diverged"]]
        self.epoch = max(live) if live else max(epochs)
        return None

    # ------------------------------------------------------------------ the step
    def _losses(self, out: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Each member's mean mini-batch loss ``(K,)`` (the single run's ``_batch_loss``)."""
        t0 = self.trainers[0]
        K, B = out.shape[:2]
        if t0.loss == "cross_entropy":
            if out.ndim != 3 or out.shape[2] < t0.dataset.num_classes:
                raise ValueError(f"BatchedTrainer: loss='cross_entropy' needs logits (K, N, "
                                 f">= {t0.dataset.num_classes}); got {tuple(out.shape)}")
            return F.cross_entropy(out.reshape(K * B, -1), y.reshape(-1),
                                   reduction="none").reshape(K, B).mean(1)
        target = x.reshape(K, B, -1)
        if out.shape != target.shape:
            raise ValueError("BatchedTrainer: loss='reconstruction' needs an output of the "
                             f"flattened input's shape {tuple(target.shape)}; got "
                             f"{tuple(out.shape)}")
        return (out - target).square().sum((1, 2)) / B

    def _sgd_step(self, active: list[bool]) -> None:
        """One SGD step of every active member with its own hyperparameters (frozen members are
        left as they are; see :class:`_StackedSGD`)."""
        self._sgd.step(active)

    def epoch_orders(self, epoch: int) -> Tensor:
        """``(K, n)``: every member's permutation of the training set in ``epoch``."""
        return torch.stack([t.epoch_order(epoch) for t in self.trainers])

    def _train_epoch(self, epoch: int, position: dict[str, Any] | None) -> Tensor:
        t0 = self.trainers[0]
        xs, ys = self.dataset.train_x, self.dataset.train_y
        recon = t0.loss == "reconstruction"
        n, bs = xs.shape[0], t0.batch_size
        perm = self.epoch_orders(epoch).to(self.device, non_blocking=True)
        if position is not None:
            start0 = int(position["start"])
            total = position["total"].to(self.device)
        else:
            start0 = 0
            total = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        active = self.active
        gens = self._augment_generators(epoch, position)
        live = [(k, t) for k, t in enumerate(self.trainers) if active[k] and t.plugins]
        self.stack.train()
        steps_here = 0
        for start in range(start0, n, bs):
            idx = perm[:, start:start + bs]  # (K, B)
            x = xs[idx]
            if gens is not None:  # each member's own augmentation, as in its single run
                x = torch.stack([t.augment(x[k], g) if t.augment is not None else x[k]
                                 for k, (t, g) in enumerate(zip(self.trainers, gens))])
            y = x if recon else ys[idx]
            losses = self._losses(self.stack(x), x, y)
            self.stack.zero_grad(set_to_none=True)
            losses.sum().backward()
            for k, t in live:
                for p in t.plugins:
                    p.on_before_step(t, t.step, x[k], y[k], losses[k])
            self._sgd_step(active)
            for t, a in zip(self.trainers, active):
                if a:
                    t.step += 1
            for k, t in live:
                for p in t.plugins:
                    p.on_after_step(t, t.step - 1, x[k], y[k], losses[k])
            total.add_(losses.detach().double(), alpha=x.shape[1])
            steps_here += 1
            if self.checkpoint_every and steps_here % self.checkpoint_every == 0 \
                    and start + bs < n:
                pos: dict[str, Any] = {"epoch": epoch, "start": start + bs, "total": total.cpu()}
                if gens is not None:
                    pos["augment"] = [g.get_state() for g in gens]
                self._save_stack(pos)
        return total / n

    def _augment_generators(self, epoch: int, position: dict[str, Any] | None
                            ) -> list[torch.Generator] | None:
        """Each member's augmentation generator for ``epoch``, seeded as in its single run
        (``derive_seed(seed, "augment", epoch)``), or at the state a mid-epoch checkpoint
        saved; ``None`` when no member augments."""
        if all(t.augment is None for t in self.trainers):
            return None
        gens = []
        for k, t in enumerate(self.trainers):
            g = torch.Generator(device=self.device)
            g.manual_seed(derive_seed(t.seed, "augment", epoch))
            if position is not None and position.get("augment") is not None:
                g.set_state(position["augment"][k])
            gens.append(g)
        return gens

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> list[dict[str, Tensor]]:
        """Every member's whole-set losses (and accuracies) as 0-dim float64 device tensors,
        from one batched forward of all members per chunk (eval mode, no grad)."""
        t0 = self.trainers[0]
        modes = {m: m.training for m in self.stack.modules()}
        self.stack.eval()
        out: list[dict[str, Tensor]] = [{} for _ in range(self.K)]
        try:
            for split in ("train", "test"):
                xs = getattr(self.dataset, f"{split}_x")
                ys = getattr(self.dataset, f"{split}_y")
                total = torch.zeros(self.K, dtype=torch.float64, device=self.device)
                correct = torch.zeros(self.K, dtype=torch.int64, device=self.device)
                for s in range(0, xs.shape[0], t0.eval_batch_size):
                    x = xs[s:s + t0.eval_batch_size]
                    pred = self.stack.forward_shared(x)  # (K, n, out)
                    K, m = pred.shape[:2]
                    if t0.loss == "cross_entropy":
                        y = ys[s:s + t0.eval_batch_size]
                        ce = F.cross_entropy(pred.reshape(K * m, -1), y.repeat(K),
                                             reduction="none").reshape(K, m)
                        total += ce.sum(1).double()
                        correct += (pred.argmax(-1) == y).sum(1)
                    else:
                        target = x.reshape(m, -1)
                        total += (pred - target).square().sum((1, 2)).double()
                for k in range(self.K):
                    out[k][f"{split}_loss"] = total[k] / xs.shape[0]
                    if t0.loss == "reconstruction":  # the loss is the SSE (see batchable)
                        out[k][f"{split}_sse"] = total[k] / xs.shape[0]
                    if t0.loss == "cross_entropy":
                        out[k][f"{split}_acc"] = correct[k].double() / xs.shape[0]
        finally:
            for m, training in modes.items():
                m.training = training
        return out

    @contextlib.contextmanager
    def _batched_evaluation(self, values: list[dict[str, Tensor]]) -> Iterator[None]:
        """Members' :meth:`Trainer.evaluate` answer from the batched pass while they record
        their epoch (their own ``_evaluate_epoch``: probe, rows, divergence check)."""
        for t, v in zip(self.trainers, values):
            t.evaluate = (lambda v=v: dict(v))  # type: ignore[method-assign]
        try:
            yield
        finally:
            for t in self.trainers:
                del t.evaluate

    def _record(self, epoch: int, running: Tensor | None, seconds: float | None) -> None:
        live = [k for k, a in enumerate(self.active) if a]
        # the plug-ins' evaluation callbacks bracket the stack's batched evaluation, and then
        # (in the member's _evaluate_epoch) its own probe, as the single run's bracket both
        for k in live:
            self.trainers[k]._evaluation_callbacks("start")
        values = self.evaluate()
        for k in live:
            self.trainers[k]._evaluation_callbacks("end")
        with self._batched_evaluation(values):
            for k in live:
                t = self.trainers[k]
                t._log_epoch = epoch
                metrics, finite = t._evaluate_epoch(epoch, None if running is None
                                                    else running[k])
                if running is None:
                    continue
                t.epoch = epoch
                for p in t.plugins:
                    p.on_epoch_end(t, epoch, metrics)
                t._flush_logs()
                if not finite:
                    t.diverged = True
                    t._add_rows([(epoch, "all", -1, "diverged", 1.0)])
                if seconds is not None:
                    t.epoch_seconds.append(seconds / max(1, len(live)))
                t._save()
                t._report(None)
                del metrics

    # ------------------------------------------------------------------ fit
    def fit(self, resume: bool = False) -> pd.DataFrame:
        """Train every member up to ``epochs`` (or until it diverges); return :attr:`history`.

        ``resume=True`` continues from ``stack.pt`` (mid-epoch) or the members' own
        checkpoints; without either it starts afresh.
        """
        if self._fitted:
            raise RuntimeError("BatchedTrainer.fit() was already called; build a new one")
        self._fitted = True
        t0 = self.trainers[0]
        old_threads = torch.get_num_threads()
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            devices = [self.device.index] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.default_generator.manual_seed(derive_seed(t0.seed, "train"))
                for t in self.trainers:  # a resume restores them from the checkpoints
                    if t.rng_generator is not None:
                        t.rng_generator.manual_seed(derive_seed(t.seed, "train"))
                self._run(resume)
        finally:
            torch.set_num_threads(old_threads)
        return self.history

    def _run(self, resume: bool) -> None:
        # the single run's order: on_fit_start, then the checkpoint (plug-in states included)
        for t in self.trainers:
            for p in t.plugins:
                p.on_fit_start(t)
        try:
            self._run_started(resume)
        finally:
            for t in self.trainers:
                t._log_epoch = t.epoch
                for p in t.plugins:
                    p.on_fit_end(t)
        for t in self.trainers:
            t._flush_logs(final=True)
            if t.checkpoint_dir is not None:
                write_csv(t.history, t.checkpoint_dir / HISTORY_NAME)

    def _run_started(self, resume: bool) -> None:
        position = self._load() if resume else None
        if resume and (position is not None or self.epoch > 0):
            self.resumed_from = (self.epoch, 0 if position is None else int(position["start"]))
        for t in self.trainers:
            t._fitted = True
            t.resumed_from = self.epoch if self.resumed_from is not None else None
        if self.resumed_from is None and self.trainers[0].eval_initial:
            self._record(0, None, None)
            for t in self.trainers:
                t._flush_logs()
        for t in self.trainers:
            t._report(None)
        epochs = self.trainers[0].epochs
        while any(self.active) and self.epoch < epochs:
            epoch = self.epoch + 1
            start = time.perf_counter()
            if position is not None and int(position["epoch"]) != epoch:
                position = None
            running = self._train_epoch(epoch, position)
            position = None
            self._record(epoch, running, time.perf_counter() - start)
            self.epoch = epoch
            self._save_stack(None)


class _StackedSGD:
    r"""``torch.optim.SGD`` for every member of a stack at once, each with its own ``lr``,
    ``momentum``, ``dampening``, ``weight_decay`` and ``nesterov`` (the members' optimizers'
    ``param_groups[0]``, read at every step, so that an lr schedule a plug-in sets on a
    member's optimizer takes effect as in its single run).  With ``d = g + wd·w``::

        b ← d (the member's first step),  b ← μ b + (1 − τ) d (later),
        d ← d + μ b (nesterov) or b,       w ← w − lr · d,

    per member, as :class:`torch.optim.SGD` does (``μ = 0``: no buffer).  The momentum buffers
    live in one ``(K, ...)`` tensor per stacked parameter; each member's optimizer holds views
    of its slices as its ``state[p]["momentum_buffer"]``, so a member's checkpoint is a
    single-run one, and :meth:`adopt` takes the buffers back from the members' optimizers
    after they loaded a checkpoint.  Frozen (inactive) members keep their weights and buffers:
    their updates are selected away, so NaN or Inf in them never spreads.
    """

    def __init__(self, stack: StackedSequential, trainers: Sequence[Trainer],
                 device: torch.device) -> None:
        self.stack, self.trainers, self.device = stack, list(trainers), device
        self.K = len(self.trainers)
        self.params = list(stack.parameters())
        groups = [t.optimizer.param_groups[0] for t in self.trainers]
        self._hp = {k: [float(g[k]) for g in groups]
                    for k in ("momentum", "dampening", "weight_decay")}
        self._nesterov = [bool(g["nesterov"]) for g in groups]
        vec = {k: torch.tensor(v, device=device) for k, v in self._hp.items()}
        self.momentum, self.damped, self.weight_decay = (
            vec["momentum"], 1.0 - vec["dampening"], vec["weight_decay"])
        self.nesterov = torch.tensor(self._nesterov, device=device)
        self.uses_momentum = any(m != 0 for m in self._hp["momentum"])
        self.uses_decay = any(w != 0 for w in self._hp["weight_decay"])
        #: members whose momentum buffers hold a step (host-side, no synchronisation)
        self.has_buffer = [False] * self.K
        self.buffers: list[Tensor | None] = [None] * len(self.params)
        # member k's optimizer parameters -> (stacked parameter index, the slice's geometry)
        self._slices = [[self._locate(q) for q in t.optimizer.param_groups[0]["params"]]
                        for t in self.trainers]
        self._lr_values: list[float] | None = None
        self._lr = torch.zeros(self.K, device=device)

    def _locate(self, q: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
        ptr = q.untyped_storage().data_ptr()
        for j, p in enumerate(self.params):
            if p.untyped_storage().data_ptr() == ptr:
                return j, tuple(q.shape), tuple(q.stride()), q.storage_offset() - \
                    p.storage_offset()
        raise RuntimeError("BatchedTrainer: a member's parameter is not a slice of the stack")

    def _view(self, k: int, i: int) -> Tensor:
        j, shape, stride, offset = self._slices[k][i]
        buf = self.buffers[j]
        assert buf is not None
        return buf.as_strided(shape, stride, buf.storage_offset() + offset)

    def _buffer(self, j: int) -> Tensor:
        buf = self.buffers[j]
        if buf is None:  # laid out like the (dense) parameter, as the members' views are
            buf = self.buffers[j] = torch.zeros_like(self.params[j])
        return buf

    def lr(self) -> Tensor:
        """``(K,)``: the members' optimizers' current learning rates."""
        values = [float(t.optimizer.param_groups[0]["lr"]) for t in self.trainers]
        if values != self._lr_values:
            self._lr_values = values
            self._lr = torch.tensor(values, device=self.device)
        return self._lr

    @torch.no_grad()
    def step(self, active: list[bool]) -> None:
        """One step of every active member.  In place on the stack's gradients and buffers
        (no temporaries of the stack's size) except on the rare steps that select per member
        (a member's first momentum step, frozen members)."""
        neg = -self.lr()
        mask = None if all(active) else torch.tensor(active, device=self.device)
        fresh_any = self.uses_momentum and not all(
            h or not a or m == 0
            for h, a, m in zip(self.has_buffer, active, self._hp["momentum"]))
        fresh = (torch.tensor([not h for h in self.has_buffer], device=self.device)
                 if fresh_any else None)
        mixed = len(set(self._hp["momentum"])) > 1 or len(set(self._nesterov)) > 1
        undamped = all(d == 0 for d in self._hp["dampening"])
        zero = torch.zeros((), device=self.device)
        for j, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            shape = (self.K,) + (1,) * (p.ndim - 1)
            if self.uses_decay:  # g + wd·w, in the stack's own gradient
                g.addcmul_(p, self.weight_decay.reshape(shape).to(p.dtype))
            d = g
            if self.uses_momentum:
                buf = self._buffer(j)
                mu = self.momentum.reshape(shape).to(p.dtype)
                if fresh is not None or mask is not None:
                    new = buf * mu + g * self.damped.reshape(shape).to(p.dtype)
                    if fresh is not None:  # torch's first step: the buffer is the direction
                        new = torch.where(fresh.reshape(shape), g, new)
                    if mask is not None:
                        new = torch.where(mask.reshape(shape), new, buf)
                    buf.copy_(new)
                else:
                    buf.mul_(mu)
                    if undamped:
                        buf.add_(g)
                    else:
                        buf.addcmul_(g, self.damped.reshape(shape).to(p.dtype))
                step = buf
                if any(self._nesterov):  # Nesterov needs momentum > 0 (torch checks it)
                    step = (g.addcmul_(buf, mu) if all(self._nesterov)
                            else torch.where(self.nesterov.reshape(shape), g + buf * mu, buf))
                d = torch.where((self.momentum != 0).reshape(shape), step, g) if mixed \
                    else step
            if mask is not None:
                d = torch.where(mask.reshape(shape), d, zero.to(d.dtype))
            p.addcmul_(d, neg.reshape(shape).to(p.dtype))
        if self.uses_momentum:
            for k, t in enumerate(self.trainers):
                if active[k] and not self.has_buffer[k] and self._hp["momentum"][k] != 0:
                    self.has_buffer[k] = True
                    params = t.optimizer.param_groups[0]["params"]
                    for i, q in enumerate(params):
                        t.optimizer.state[q]["momentum_buffer"] = self._view(k, i)

    def adopt(self) -> None:
        """Take the momentum buffers from the members' optimizers (after they loaded a
        checkpoint) into the stacked buffers, and point the members' states at them."""
        if not self.uses_momentum:
            return
        for k, t in enumerate(self.trainers):
            params = t.optimizer.param_groups[0]["params"]
            saved = [t.optimizer.state.get(q, {}).get("momentum_buffer") for q in params]
            self.has_buffer[k] = all(b is not None for b in saved) and bool(saved)
            for i, (q, b) in enumerate(zip(params, saved)):
                self._buffer(self._slices[k][i][0])
                view = self._view(k, i)
                if self.has_buffer[k]:
                    view.copy_(b)
                    t.optimizer.state[q]["momentum_buffer"] = view
                else:
                    view.zero_()
                    t.optimizer.state.get(q, {}).pop("momentum_buffer", None)
