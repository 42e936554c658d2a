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
      (:meth:`Trainer.epoch_order`, seeded with ``derive_seed(seed_k, "data", e)``);
    * the update: plain SGD, ``w_k ← w_k − lr_k ∇_k loss_k`` with the member's own ``lr_k``; the
      gradient of ``Σ_k loss_k`` with respect to member ``k``'s weights is the gradient of
      ``loss_k`` alone, since member ``k``'s output depends on nothing else;
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

__all__ = ["STACK_CHECKPOINT", "BatchedTrainer", "batchable", "member_bytes", "stack_size"]

STACK_CHECKPOINT = "stack.pt"


def batchable(trainer: Trainer) -> str | None:
    """``None`` when ``trainer`` can be a member of a :class:`BatchedTrainer`, else why not."""
    why = stackable(trainer.model)
    if why is not None:
        return why
    if trainer.plugins:
        return "it has plug-ins (per-step callbacks see one model)"
    if trainer.loss == "reconstruction" and (trainer.reconstruction_loss != "sse"
                                             or trainer.reconstruction_logits):
        return (f"its reconstruction loss is {trainer.reconstruction_loss!r}"
                f"{' on logits' if trainer.reconstruction_logits else ''}; a stack trains "
                "the summed squared error of the model's output only")
    opt = trainer.optimizer
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return f"its optimizer is {type(opt).__name__}, not the default plain SGD"
    g = opt.param_groups[0]
    if g.get("momentum", 0) or g.get("weight_decay", 0) or g.get("nesterov", False) \
            or g.get("lr") != trainer.lr:
        return "its SGD has momentum, weight decay or another lr than the trainer's"
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
            device, evaluation and probe settings; default SGD optimizer, no plug-ins); each
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
            t.optimizer = torch.optim.SGD(t.model.parameters(), lr=t.lr)
            if t.probe_x is not None and k > 0:
                t.probe_x = t0.probe_x  # one copy of the shared probe subset
            t.dataset = self.dataset
        self.lr = torch.tensor([t.lr for t in trainers], device=self.device)
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

    @torch.no_grad()
    def _sgd_step(self, active: list[bool]) -> None:
        """``w_k ← w_k − lr_k g_k`` for the active members; frozen members are left as they are
        (their gradient masked, so NaN/Inf never reach their weights)."""
        neg = -self.lr
        mask = None
        if not all(active):
            mask = torch.tensor(active, device=self.device)
            neg = torch.where(mask, neg, torch.zeros_like(neg))
        for p in self.stack.parameters():
            if p.grad is None:
                continue
            shape = (self.K,) + (1,) * (p.ndim - 1)
            g = p.grad
            if mask is not None:
                g = torch.where(mask.reshape(shape), g, torch.zeros((), dtype=g.dtype,
                                                                      device=g.device))
            p.addcmul_(g, neg.reshape(shape).to(p.dtype))

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
        self.stack.train()
        steps_here = 0
        for start in range(start0, n, bs):
            idx = perm[:, start:start + bs]  # (K, B)
            x = xs[idx]
            y = x if recon else ys[idx]
            losses = self._losses(self.stack(x), x, y)
            self.stack.zero_grad(set_to_none=True)
            losses.sum().backward()
            self._sgd_step(active)
            for t, a in zip(self.trainers, active):
                if a:
                    t.step += 1
            total.add_(losses.detach().double(), alpha=x.shape[1])
            steps_here += 1
            if self.checkpoint_every and steps_here % self.checkpoint_every == 0 \
                    and start + bs < n:
                self._save_stack({"epoch": epoch, "start": start + bs, "total": total.cpu()})
        return total / n

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
        values = self.evaluate()
        with self._batched_evaluation(values):
            for k in live:
                t = self.trainers[k]
                t._log_epoch = epoch
                metrics, finite = t._evaluate_epoch(epoch, None if running is None
                                                    else running[k])
                if running is None:
                    continue
                t.epoch = epoch
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
                self._run(resume)
        finally:
            torch.set_num_threads(old_threads)
        return self.history

    def _run(self, resume: bool) -> None:
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
        for t in self.trainers:
            t._log_epoch = t.epoch
            t._flush_logs(final=True)
            if t.checkpoint_dir is not None:
                write_csv(t.history, t.checkpoint_dir / HISTORY_NAME)
