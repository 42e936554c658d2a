r"""The running (EMA) empirical unit Fisher of one layer, from the user's own training passes.

:class:`RunningLayerFisher` owns two hooks on one ``nn.Linear``/``nn.Conv2d`` layer, through
:class:`~biasshift.hooks.Trace` (the hook foundation of the monitor, the probe statistics and the
unit Fisher):

* a forward hook that, while recording is on, the module is training and gradients are enabled,
  registers a *pre-hook on the autograd node that produced the layer's output*.  That pre-hook
  receives ``∂loss/∂net`` (the layer's ``grad_output``) during backward, paired with the input
  ``x`` of the very same forward call (kept by reference; autograd keeps it anyway for the weight
  gradient).  Because it sits on the node and not on the output tensor, in-place operations after
  the layer (``ReLU(inplace=True)``) do not change what it sees;
* a post-accumulate-grad hook on the layer's weight that *commits* the pre-hook records of the
  backward pass that has just accumulated into ``weight.grad``.  Records are matched by autograd
  graph task, so passes that never reach ``weight.grad`` — ``torch.autograd.grad`` calls such as
  :meth:`biasshift.UnitFisher.accumulate`, or a tracker's probe passes — are never counted.

So the statistics of an optimiser step are exactly those of the backward passes that made the
gradient it applies (since the last step or ``zero_grad``).  :meth:`RunningLayerFisher.update`
turns them into the batch's unit blocks and folds them into an exponential moving average.

The empirical unit Fisher
    With a loss that is the **mean** over the ``N`` samples of a batch of per-sample negative
    log-likelihoods, ``δ = ∂ ln p/∂net = −N · grad_output`` (``reduction="sum"``:
    ``δ = −grad_output``).  The batch block of unit ``u`` is::

        F_batch[u] = 1/N Σ_samples Σ_positions δ² ã ãᵀ,     ã = (1, a)  (no 1 without a bias)

    the ELU paper's ``E_p(δ² ã ãᵀ)`` (Section 2) with the model's own targets: the *empirical*
    Fisher, which needs no extra backward pass.  For ``nn.Linear`` on ``(N, F)`` there is one
    position and this is exactly the mean outer product of the per-sample unit gradients.  For
    ``nn.Conv2d`` (and ``nn.Linear`` on ``(N, *, F)``) every output position is a row (KFAC-style,
    Grosse & Martens 2016: cross-position terms of the per-sample gradient are left out); a layer
    called several times in one forward pass contributes one row per call and position.
    Caveats of the empirical Fisher (Kunstner et al. 2019): it is the gradients' second moment,
    not the model's Fisher, so it shrinks as the training loss goes to zero and is biased towards
    the training targets; ``F`` is only an approximation of the curvature.  Losses that are not a
    negative log-likelihood (or that are scaled, e.g. by an AMP ``GradScaler``) scale ``F``.

EMA
    ``F ← ema·F + (1 − ema)·F_batch`` per update, with per-unit bias correction as in Adam: the
    running weight ``w ← ema·w + (1 − ema)`` is tracked alongside and ``F̂ = F / w`` is used (so
    the first update gives ``F̂ = F_batch``).  A unit whose ``δ`` or incoming activations are not
    all finite in a batch skips that batch: its ``F`` and ``w`` are both multiplied by ``ema``
    (``F̂`` unchanged) and nothing non-finite ever enters ``F``.  No step synchronises with the
    host.

Distributed (``torch.distributed``, DDP)
    Each rank keeps the EMA of its own shard's blocks; :meth:`RunningLayerFisher.fisher_hat`
    with a process group combines them at read time (the optimiser's refresh): with ``N_r``
    the samples of rank ``r``'s latest batch, ``F̂ = Σ_r N_r F_r / Σ_r N_r w_r`` (two
    all-reduces, ``units·n1² + units`` numbers). When every rank's batch size is the same at
    every step (uneven across ranks allowed; DDP's ``DistributedSampler`` with
    ``drop_last``), this is exactly the EMA of the blocks of the union of the ranks' batches.
    A batch that is non-finite on one rank only skips that rank's contribution.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from biasshift.fisher.blocks import chunk_units, column_blocks
from biasshift.fisher.capture import LayerSpec, delta_rows, incoming
from biasshift.hooks import Trace

__all__ = ["REDUCTIONS", "RunningLayerFisher", "column_blocks", "graph_task_id", "stat_dtype"]

REDUCTIONS = ("mean", "sum")


def graph_task_id() -> int:
    """The id of the autograd graph task running now (-1 outside backward)."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return -2 if get is None else int(get())


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics for data of ``dtype``: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Record:
    """One forward call's input and, from its backward, the output gradient."""

    x: Tensor
    version: int
    grad_out: Tensor
    samples: int


class RunningLayerFisher:
    """The exponential moving average of one layer's empirical unit Fisher blocks.

    Args:
        spec: the layer (from :func:`biasshift.fisher.capture.resolve_layers`).
        reduction: ``"mean"`` or ``"sum"``: how the training loss reduces over the batch
            (dimension 0); sets ``δ = −N·grad_output`` or ``δ = −grad_output``.
        dtype: dtype of the statistics; ``None``: float64 for float64 data, else float32.
        memory_budget: bytes for the temporary ``δ ã`` rows of a chunk of units.

    Attributes:
        fisher: the EMA sum ``(units, n1, n1)`` (not bias-corrected; ``None`` before the first
            update; for ``n1 ≥ 384`` only its block lower triangle is kept, see
            :func:`column_blocks`); :meth:`fisher_hat` gives the corrected, symmetric blocks.
        weight_sum: ``(units,)`` the EMA weight each unit's blocks carry.
        updates: the number of updates so far.
        recording: whether the forward hook records (set by the optimiser).
    """

    def __init__(self, spec: LayerSpec, *, reduction: str = "mean",
                 dtype: torch.dtype | None = None, memory_budget: int = 2**28) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.spec = spec
        self.reduction = reduction
        self.dtype = dtype
        self.memory_budget = int(memory_budget)
        self.fisher: Tensor | None = None
        self.weight_sum: Tensor | None = None
        self.updates = 0
        self.samples = 0  # samples of the latest update (the weight of this rank's EMA)
        self.recording = False
        self._pending: list[tuple[int, _Record]] = []
        self._batches: list[list[_Record]] = []
        self._handles: list[Any] = []
        self._finalizer: weakref.finalize | None = None
        self._group_index: Tensor | None = None

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register the forward hook and the weight's post-accumulate-grad hook.

        The hooks hold only a weak reference to this object, and are removed when it is
        garbage-collected: an optimiser that is dropped without :meth:`detach` leaves nothing
        recording on the model.
        """
        if self._handles:
            return
        module = self.spec.module
        weight = module.weight
        assert isinstance(weight, Tensor)
        ref = weakref.ref(self)

        def forward_hook(_name: str, mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            me = ref()
            if me is not None:
                me._forward_hook(mod, inputs, out)

        def commit(_name: str, w: Tensor) -> None:
            me = ref()
            if me is not None:
                me._commit(w)

        name = self.spec.name
        trace = Trace({name: module}, forward=forward_hook, post_accumulate=commit,
                      params={name: weight}).add()
        self._handles = [trace]
        self._finalizer = weakref.finalize(self, trace.remove)

    def detach(self) -> None:
        """Remove the hooks and drop every record not yet used."""
        for trace in self._handles:
            trace.remove()
        self._handles = []
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.discard()

    def discard(self) -> None:
        """Drop the records of the backward passes since the last update."""
        self._pending.clear()
        self._batches.clear()

    def _check_input(self, x: object) -> Tensor:
        spec = self.spec
        if not isinstance(x, Tensor):
            raise TypeError(f"layer {spec.name!r}: the first input is a {type(x).__name__}, not a "
                            "tensor")
        if spec.kind == "linear" and (x.ndim < 2 or x.shape[-1] != spec.n):
            raise ValueError(
                f"layer {spec.name!r}: input of shape {tuple(x.shape)}; UnitNaturalGradient needs "
                f"a batch (N, ..., {spec.n}) with dim 0 = samples (unbatched inputs have no "
                "per-sample statistics: add a batch dimension)"
            )
        if spec.kind == "conv2d" and x.ndim != 4:
            raise ValueError(
                f"layer {spec.name!r}: Conv2d input of shape {tuple(x.shape)}; "
                "UnitNaturalGradient needs a batch (N, C, H, W) with dim 0 = samples"
            )
        return x

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if not (self.recording and module.training and torch.is_grad_enabled()):
            return
        if not isinstance(out, Tensor) or out.grad_fn is None:
            return  # nothing in this call needs gradients: no weight.grad will come from it
        x = self._check_input(inputs[0] if inputs else None).detach()  # shares the version
        version, samples = x._version, x.shape[0]
        edge = get_gradient_edge(out)
        nr = edge.output_nr
        ref = weakref.ref(self)

        def prehook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            me, g = ref(), grad_outputs[nr]
            if me is not None and me._handles and g is not None:
                me._pending.append((graph_task_id(), _Record(x, version, g, samples)))

        edge.node.register_prehook(prehook)

    def _commit(self, _weight: Tensor) -> None:
        if not self._pending:
            return
        task = graph_task_id()
        batch = [r for t, r in self._pending if t == task]
        self._pending.clear()
        if batch:
            self._batches.append(batch)

    # ------------------------------------------------------------------ the EMA
    def _rows(self, batches: list[list[_Record]]) -> tuple[Tensor, Tensor, int]:
        """``ã`` rows ``(groups, R, n1)``, ``δ`` rows ``(R, units)`` and the sample count."""
        spec = self.spec
        a_parts, d_parts, samples = [], [], 0
        for batch in batches:
            samples += max(r.samples for r in batch)
            for r in batch:
                if r.x._version != r.version:
                    raise RuntimeError(
                        f"layer {spec.name!r}: its input was modified in place between the "
                        "forward pass and optimizer.step(); UnitNaturalGradient needs the input "
                        "as the forward pass saw it (clone it before modifying it)"
                    )
                dtype = self.dtype or stat_dtype(r.grad_out.dtype)
                a = incoming(spec, r.x, dtype)  # (N, groups, L, n1)
                N, G, L, n1 = a.shape
                a_parts.append(a.transpose(0, 1).reshape(G, N * L, n1))
                d = delta_rows(spec, r.grad_out).to(dtype)  # (N, L, units)
                if d.shape[:2] != (N, L):
                    raise RuntimeError(
                        f"layer {spec.name!r}: output gradient of shape {tuple(r.grad_out.shape)} "
                        f"does not match {N} samples x {L} positions of the input"
                    )
                if self.reduction == "mean":
                    d = d * N
                d_parts.append(d.reshape(N * L, spec.units))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)
        d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=0)
        return a, d, samples

    def take(self) -> list[list[_Record]]:
        """The committed backward passes since the last :meth:`take`/:meth:`update` (each a list
        of the layer's forward calls in that pass), handed over and dropped here."""
        batches = self._batches
        self._batches = []
        self._pending.clear()
        return batches

    def step_products(self, batches: list[list[_Record]], dw: Tensor,
                      db: Tensor | None) -> list[Tensor] | None:
        r"""Per sample, the directional derivative of its loss along the step ``(db, dw)``.

        For sample ``x`` of a pass with ``N`` samples this is ``g_xᵀ d = Σ_{positions, units}
        ∂ℓ_x/∂net · Δnet``, with ``Δnet`` the change of the layer's net input that the
        parameter change ``(db, dw)`` makes (the layer is linear in its parameters, so
        ``Δnet`` is the layer's own forward with ``(dw, db)`` as weights) and
        ``∂ℓ_x/∂net = N · grad_output`` (``reduction="sum"``: ``grad_output``).  A layer
        called several times in a pass adds its calls.  Summed over the layers of a network,
        ``mean_x (g_xᵀ d)²`` is the batch's exact empirical Fisher ``dᵀ F d`` of the whole step,
        cross-unit and cross-layer terms included.

        Returns one ``(N,)`` tensor per pass, or ``None`` when a call's batch size differs from
        its pass's (samples cannot be lined up).  No host synchronisation.
        """
        spec = self.spec
        out: list[Tensor] = []
        for batch in batches:
            samples = max(r.samples for r in batch)
            s: Tensor | None = None
            for r in batch:
                if r.samples != samples or r.grad_out.shape[0] != samples:
                    return None
                if r.x._version != r.version:
                    raise RuntimeError(
                        f"layer {spec.name!r}: its input was modified in place between the "
                        "forward pass and optimizer.step(); UnitNaturalGradient needs the input "
                        "as the forward pass saw it (clone it before modifying it)"
                    )
                go = r.grad_out
                x = r.x if r.x.dtype == dw.dtype else r.x.to(dw.dtype)
                dnet = spec.adapter.net_change(spec, x, dw, db)
                if go.dtype != dnet.dtype:
                    go = go.to(dnet.dtype)
                part = (go.reshape(samples, -1) * dnet.reshape(samples, -1)).sum(1)
                s = part if s is None else s + part
            assert s is not None
            out.append(s * samples if self.reduction == "mean" else s)
        return out

    def update(self, ema: float, batches: list[list[_Record]] | None = None) -> bool:
        """Fold the committed backward passes (or ``batches`` from :meth:`take`) into the EMA;
        ``False`` when there were none.

        ``F ← ema·F + (1 − ema)·F_batch`` chunk by chunk of units (one ``baddbmm`` per chunk);
        no host synchronisation.
        """
        if batches is None:
            batches = self.take()
        if not batches:
            return False
        spec = self.spec
        a, d, samples = self._rows(batches)
        G, R, n1 = a.shape
        U = spec.units
        finite_a = torch.isfinite(a)
        ok = torch.isfinite(d).all(0)
        if G == 1:
            ok = ok & finite_a.all()
        else:
            if self._group_index is None or self._group_index.device != a.device:
                self._group_index = torch.arange(U, device=a.device) // spec.units_per_group
            ok = ok & finite_a.flatten(1).all(1)[self._group_index]
        a = torch.where(finite_a, a, torch.zeros((), dtype=a.dtype, device=a.device))
        d = torch.where(ok, d, torch.zeros((), dtype=d.dtype, device=d.device))
        if self.fisher is None:
            self.fisher = torch.zeros(U, n1, n1, dtype=a.dtype, device=a.device)
            self.weight_sum = torch.zeros(U, dtype=a.dtype, device=a.device)
        elif self.fisher.device != a.device:
            self.fisher = self.fisher.to(a.device)
            self.weight_sum = self.weight_sum.to(a.device)  # type: ignore[union-attr]
        F, w = self.fisher, self.weight_sum
        assert w is not None
        if a.dtype != F.dtype:
            a, d = a.to(F.dtype), d.to(F.dtype)
        per_unit = R * n1 * a.element_size() * (2 if G > 1 else 1)
        step = chunk_units(U, per_unit, self.memory_budget)
        alpha = (1.0 - ema) / samples
        cols = column_blocks(n1)
        for c0 in range(0, U, step):
            c1 = min(U, c0 + step)
            dc = d[:, c0:c1].T.unsqueeze(-1)  # (units, R, 1)
            if G == 1:
                B = a[0] * dc
            else:
                assert self._group_index is not None
                B = a[self._group_index[c0:c1]]
                B.mul_(dc)
            # F ← ema·F + α BᵀB on the block lower triangle only (column blocks j: rows ≥ j)
            for j0, j1 in cols:
                F[c0:c1, j0:, j0:j1].baddbmm_(B[:, :, j0:].mT, B[:, :, j0:j1], beta=ema,
                                              alpha=alpha)
        w.mul_(ema).add_(ok.to(w.dtype), alpha=1.0 - ema)
        self.updates += 1
        self.samples = int(samples)
        return True

    def fisher_hat(self, symmetric: bool = True, group: Any = None) -> tuple[Tensor, Tensor]:
        """The bias-corrected blocks ``F / w`` and the mask of units with statistics.

        Units that never had a finite batch get the identity (and ``observed = False``).  Only
        the lower triangle of :attr:`fisher` is kept up to date; ``symmetric=False`` returns
        that (enough for a Cholesky factorisation), ``True`` mirrors it into the upper one.
        With a process ``group``: the blocks of all its ranks (see the module docstring).
        """
        if group is not None:
            from biasshift import distributed as _dist

            if self.fisher is None or self.weight_sum is None:  # this rank has nothing yet
                weight = self.spec.module.weight
                dt = self.dtype or stat_dtype(weight.dtype)
                n1 = self.spec.n1
                F_r = torch.zeros(self.spec.units, n1, n1, dtype=dt, device=weight.device)
                w_r = torch.zeros(self.spec.units, dtype=dt, device=weight.device)
            else:
                F_r, w_r = self.fisher * self.samples, self.weight_sum * self.samples
            F_sum = _dist.all_reduce(F_r, group)
            w = _dist.all_reduce(w_r, group)
            observed = w > 0
            F = F_sum / torch.where(observed, w, torch.ones_like(w))[:, None, None]
            if symmetric:
                F = F.tril() + F.tril(-1).mT
            F.diagonal(dim1=-2, dim2=-1).add_((~observed).to(F.dtype).unsqueeze(-1))
            return F, observed
        if self.fisher is None or self.weight_sum is None:
            raise RuntimeError(f"layer {self.spec.name!r}: no statistics yet")
        w = self.weight_sum
        observed = w > 0
        F = self.fisher / torch.where(observed, w, torch.ones_like(w))[:, None, None]
        if symmetric:
            F = F.tril() + F.tril(-1).mT
        F.diagonal(dim1=-2, dim2=-1).add_((~observed).to(F.dtype).unsqueeze(-1))
        return F, observed

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "weight_sum": self.weight_sum, "updates": self.updates,
                "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        F, w = state["fisher"], state["weight_sum"]
        n1 = self.spec.n1
        if F is not None and (tuple(F.shape) != (self.spec.units, n1, n1)
                              or w is None or tuple(w.shape) != (self.spec.units,)):
            raise ValueError(
                f"layer {self.spec.name!r}: the saved unit Fisher has shape {tuple(F.shape)}, the "
                f"layer needs {(self.spec.units, n1, n1)}; was the state saved for another model?"
            )
        # copies: the optimiser updates its state in place, the caller's dict stays as it was
        self.fisher = None if F is None else F.to(device, copy=True)
        self.weight_sum = None if w is None else w.to(device, copy=True)
        self.updates = int(state["updates"])
        self.samples = int(state.get("samples", 0))
        self.discard()
