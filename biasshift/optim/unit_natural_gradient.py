r"""The unit natural gradient as an optimiser (Theorem 1 of the ELU paper, batched over units).

Clevert, Unterthiner & Hochreiter, ICLR 2016, Section 2: for unit ``i`` with incoming
``ã = (1, a)`` the unit Fisher is ``F = E_p(δ² ã ãᵀ) = [[c, bᵀ], [b, A]]`` and the unit natural
gradient of ``(g₀, g)`` is (Theorem 1)::

    s = (c − bᵀA⁻¹b)⁻¹,   Δw₀ = s (g₀ − bᵀA⁻¹g),   Δw = A⁻¹g − Δw₀ A⁻¹b.

:class:`UnitNaturalGradient` keeps a running (EMA) empirical unit Fisher per unit of every
``nn.Linear``/``nn.Conv2d`` layer (see :mod:`biasshift.optim.running_fisher`), damps it
(``F + λI``, the bias entry too), refreshes Theorem 1's factors every ``inverse_every`` steps
(:func:`biasshift.theory.natural_gradient_factors`) and steps every unit's ``(bias, weight)`` by
``−lr · (F + λI)⁻¹ (g₀, g)`` (:func:`biasshift.theory.apply_natural_gradient`).  Every other
parameter gets plain SGD, ``p ← p − lr·grad``.

Per step and layer
    * on a step with ``step_index % update_every == 0`` (counting from 0) the hooks record the
      training forward/backward passes before it and :meth:`~UnitNaturalGradient.step` folds them
      into the EMA (chunked batched matmuls; for blocks of 384 rows or more only the block lower
      triangle, 5/8 of the work);
    * on a step with ``step_index % inverse_every == 0`` (and on the first step that has
      statistics) the factors are refreshed if the EMA changed since the last refresh: a batched
      Cholesky of ``A + λI``, ``A⁻¹`` (form ``"inverse"``) or the factor (``"cholesky"``),
      ``A⁻¹b`` and ``s``.  This is the only place with a host synchronisation (the
      positive-definiteness check);
    * the direction is one batched vector-matrix product (``"inverse"``) or ``cholesky_solve``
      (``"cholesky"``) per layer.  A unit without statistics yet (before its first finite
      batch) moves along the plain gradient.

Which passes count
    The statistics of a step are those of the backward passes that accumulated into the
    layers' ``weight.grad`` since the last ``step()`` or ``zero_grad()`` while the module was in
    training mode with gradients enabled: exactly the passes that made the gradient being
    applied.  Forward passes under ``no_grad``/``inference_mode`` or in eval mode, forward passes
    never followed by ``backward()``, and ``torch.autograd.grad`` calls (e.g.
    :meth:`biasshift.UnitFisher.accumulate` or a tracking plug-in between ``backward()`` and
    ``step()``) are ignored.  Several backward passes before one step (gradient accumulation)
    form one batch (their samples pooled); clear stale gradients with the optimiser's
    ``zero_grad`` (``model.zero_grad()`` does not reach the optimiser's records).

Choosing ``lr`` and ``damping``
    In directions where the Fisher is large against ``λ`` the step is the natural gradient
    ``lr·F⁻¹g``; where it is small it is SGD with rate ``lr/λ``.  For the empirical Fisher of a
    batch, each unit's natural-gradient step lowers the batch loss by at most ``lr`` to first
    order (``gᵀF⁻¹g = E(v)ᵀE(vvᵀ)⁻¹E(v) < 1``, the paper's appendix identity), and the steps of
    all units add up: the 8×128 MNIST net has 1034 units, so ``lr`` has to be about ``1e-3``
    where SGD uses ``1e-2``, and ``lr/λ`` must be a stable SGD rate (about 0.1 or less).
    Measured on that net (seed 0, batch 64): with the defaults ``lr=1e-3, damping=1e-2`` all
    four units train, e.g. after 2 epochs on a 10k MNIST subset a training loss of 0.10 (ELU),
    0.12 (ReLU), 0.11 (LReLU), 0.10 (SReLU) against SGD's (lr 0.01) 0.28 (ELU) and 0.74
    (ReLU); ``lr=3e-3, damping=1e-2`` and (ELU) ``lr=3e-4, damping=1e-3`` train as well or
    better; ``lr=1e-3, damping=1e-3`` and ``lr=0.01`` with ``damping <= 0.03`` diverge on the
    digits; ``lr=0.01, damping=0.1`` is stable but no better than SGD (the damping dominates).

Cost
    Per layer and update ``units · rows · (n+1)²`` multiply-adds (``rows`` = samples ×
    positions), per refresh a Cholesky and an inverse of every ``(n+1)²`` block, per step a
    vector-matrix product per unit.  For the 8×128 MNIST net that is dominated by the first
    layer (128 blocks of 785²): a few hundred times an SGD step on one CPU core at the
    defaults, tens of times with ``update_every=5, inverse_every=50`` (see
    ``analyses/bench_optim.py``); on a GPU these are large batched matmuls.

Memory
    Per layer ``units × (n+1)²`` entries for the EMA and as many for the factors (8×128 MNIST
    net, float32: 0.70 GiB, 84 % of it in the first layer's 128 blocks of 785²).  The
    constructor refuses more than ``max_state_bytes`` in all (choose layers with ``modules=``).
    The state dict holds both, so that a checkpoint resumes bit-identically on the CPU (a
    trainer checkpoint of that net is about 0.7 GiB).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from biasshift.fisher.capture import SUPPORTED_LAYERS, LayerSpec, resolve_layers
from biasshift.optim.running_fisher import REDUCTIONS, RunningLayerFisher, stat_dtype
from biasshift.theory import (
    FACTOR_FORMS,
    NaturalGradientFactors,
    _raise_singular,
    apply_natural_gradient,
    natural_gradient_factors,
)

__all__ = ["UnitNaturalGradient"]

_STATE_KEY = "unit_natural_gradient"

ModuleSelection = Union[  # noqa: UP007
    nn.Module, Iterable[Union[str, nn.Module]], Callable[[str, nn.Module], bool], None  # noqa: UP007
]


def _supported(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and isinstance(m, SUPPORTED_LAYERS)}


class _Layer:
    """One preconditioned layer: its running Fisher, Theorem 1's factors, its parameters."""

    def __init__(self, spec: LayerSpec, bias: bool, running: RunningLayerFisher) -> None:
        self.spec = spec
        self.weight: Tensor = spec.module.weight  # type: ignore[assignment]
        # the bias is in the block only when the optimiser owns it
        self.bias: Tensor | None = spec.module.bias if bias else None  # type: ignore[assignment]
        self.running = running
        self.factors: NaturalGradientFactors | None = None
        self.observed: Tensor | None = None
        self.dirty = False  # the EMA changed since the factors were computed
        self.warned = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n1(self) -> int:
        return self.spec.n + int(self.bias is not None)

    def fisher_hat(self, symmetric: bool = True) -> tuple[Tensor, Tensor]:
        """The bias-corrected EMA blocks for the owned parameters, and the observed mask."""
        F, observed = self.running.fisher_hat(symmetric)
        if self.spec.has_bias and self.bias is None:
            F = F[:, 1:, 1:]  # the bias is not optimised here: only the weight block
        return F, observed


class UnitNaturalGradient(torch.optim.Optimizer):
    r"""Precondition every unit's ``(bias, weight)`` gradient by its damped unit Fisher.

    The step of unit ``i`` of a ``nn.Linear``/``nn.Conv2d`` layer is
    ``(w₀, w) ← (w₀, w) − lr · (F̂ + λI)⁻¹ (g₀, g)`` computed by Theorem 1's block formula, with
    ``F̂`` the bias-corrected exponential moving average of the empirical unit Fisher of the
    training batches (module docstring, :mod:`biasshift.optim.running_fisher`); every other
    parameter steps ``p ← p − lr · grad``.  With ``ema=0`` and ``inverse_every=1`` each step uses
    exactly the current batch's blocks.

    Args:
        params_or_model: an ``nn.Module`` (its Linear/Conv2d layers get the natural gradient,
            all other parameters SGD), or an iterable of parameters or param groups (then pass
            ``modules=``: parameters cannot be hooked).  A layer gets the natural gradient when
            its weight is among the parameters (and requires grad); its bias is in the block
            when it is among them too, else the weight block ``A`` alone is used.
        lr: learning rate (per param group, as in ``torch.optim.SGD``); see "Choosing lr and
            damping" in the module docstring.
        damping: ``λ ≥ 0`` added to every block's diagonal, bias entry included.
        ema: decay of the moving average, in ``[0, 1)``; ``0`` keeps only the latest batch.
        update_every: fold the training batch into the EMA on every ``update_every``-th step
            (the hooks are idle on the others).
        inverse_every: refresh Theorem 1's factors every ``inverse_every``-th step.
        reduction: how the training loss reduces over the batch (dimension 0): ``"mean"``
            (``δ = −N · grad_output``) or ``"sum"`` (``δ = −grad_output``).
        modules: which layers get the natural gradient.  Given a model: ``None`` (all its
            Linear/Conv2d layers), a submodule (the layers inside it), an iterable of layer
            names and/or layer modules, or a predicate ``(name, module) -> bool``.  Given
            parameters: the model (or an iterable of its layers) owning them.
        dtype: dtype of the statistics and factors (default float32, float64 for float64
            layers).
        factor: ``"inverse"`` (keep ``A⁻¹``; one batched vector-matrix product per step) or
            ``"cholesky"`` (keep ``chol(A)``; one ``cholesky_solve`` per step, cheaper
            refreshes).
        memory_budget: bytes for the temporaries of one chunk of units in the Fisher update.
        max_state_bytes: refuse layers whose EMA and factors need more bytes in all.

    Raises:
        ValueError: no supported layer owns any of the parameters; bad hyperparameters; a layer
            whose state exceeds ``max_state_bytes``; two layers sharing one weight.
        biasshift.theory.SingularFisherError: at a refresh with ``damping=0``, a block is
            singular (fewer samples than rows); the message gives the smallest eigenvalue and a
            damping to use.  With ``damping > 0`` a block that is still not numerically positive
            definite or not finite (only in a diverging run) gives a ``RuntimeWarning`` and its
            unit takes the plain gradient until the next refresh.

    Hooks are registered in the constructor and removed by :meth:`remove_hooks` (alias
    :meth:`close`), on leaving a ``with`` block, or when the optimiser is garbage-collected;
    after :meth:`remove_hooks` the optimiser keeps its last factors and stops updating them.

    >>> opt = UnitNaturalGradient(model, lr=1e-3, damping=1e-2, ema=0.95)  # doctest: +SKIP
    >>> loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    >>> Trainer(model, data, epochs=10, optimizer=lambda m: UnitNaturalGradient(m))  # +SKIP
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        damping: float = 1e-2,
        ema: float = 0.95,
        *,
        update_every: int = 1,
        inverse_every: int = 20,
        reduction: str = "mean",
        modules: ModuleSelection = None,
        dtype: torch.dtype | None = None,
        factor: str = "inverse",
        memory_budget: int = 2**28,
        max_state_bytes: int = 2**32,
    ) -> None:
        name = type(self).__name__
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{name}: lr must be a positive finite number, got {lr!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (
                damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"{name}: damping must be a finite number >= 0 (F + damping*I), "
                             f"got {damping!r}")
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
            raise ValueError(f"{name}: ema must be in [0, 1) (F <- ema*F + (1-ema)*F_batch), "
                             f"got {ema!r}")
        for key, value in (("update_every", update_every), ("inverse_every", inverse_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be an integer >= 1, got {value!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if factor not in FACTOR_FORMS:
            raise ValueError(f"{name}: factor must be one of {FACTOR_FORMS}, got {factor!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: dtype must be torch.float32, torch.float64 or None, got "
                             f"{dtype!r}")

        if isinstance(params_or_model, nn.Module):
            model: nn.Module | None = params_or_model
            params: Any = list(params_or_model.parameters())
            selection = None if modules is model else modules
            if isinstance(modules, nn.Module) and modules is not model:  # a part of the model
                inside = {id(m) for m in modules.modules()}
                selection = lambda _n, m: id(m) in inside  # noqa: E731
        else:
            params = list(params_or_model)
            model, selection = None, None
            if isinstance(modules, nn.Module):
                model = modules
            elif modules is not None and not callable(modules):
                items = list(modules)
                if not all(isinstance(m, nn.Module) for m in items):
                    raise TypeError(f"{name}: given parameters, modules= must be the model or an "
                                    "iterable of its layers (nn.Module objects)")
                model = nn.ModuleList(items)
            elif modules is not None:
                raise TypeError(f"{name}: given parameters, modules= must be the model or its "
                                "layers; a predicate needs the model as the first argument")
        super().__init__(params, {"lr": float(lr)})

        self.damping = float(damping)
        self.ema = float(ema)
        self.update_every = update_every
        self.inverse_every = inverse_every
        self.reduction = reduction
        self.factor = factor
        self.dtype = dtype
        self.memory_budget = int(memory_budget)
        self._step_count = 0
        self._layers: list[_Layer] = self._build_layers(model, selection, max_state_bytes)
        owned = {id(p) for layer in self._layers for p in (layer.weight, layer.bias)
                 if p is not None}
        self._owned = owned
        for layer in self._layers:
            layer.running.attach()
        self._set_recording()

    # ------------------------------------------------------------------ construction
    def _build_layers(self, model: nn.Module | None, selection: ModuleSelection,
                      max_state_bytes: int) -> list[_Layer]:
        name = type(self).__name__
        ids = {id(p) for g in self.param_groups for p in g["params"]}
        how = ("pass the model: UnitNaturalGradient(model, ...), or modules=model when passing "
               "parameters or param groups")
        if model is None:
            raise ValueError(f"{name}: no Linear/Conv2d layer found: parameters alone cannot be "
                             f"hooked; {how}")
        supported = _supported(model)
        if not supported:
            raise ValueError(
                f"{name}: no Linear/Conv2d layer found in {type(model).__name__}; the unit "
                "natural gradient needs nn.Linear or nn.Conv2d layers (use torch.optim.SGD for "
                "other models)"
            )
        try:
            specs = resolve_layers(model, selection)
        except ValueError as e:
            raise ValueError(f"{name}: modules={selection!r}: {e}") from e
        chosen = {n: s for n, s in specs.items() if id(s.module.weight) in ids
                  and s.module.weight.requires_grad}
        if not chosen:
            raise ValueError(
                f"{name}: no Linear/Conv2d layer found that owns any of the given parameters "
                f"(the model's layers: {', '.join(supported)}); {how}"
            )
        seen: dict[int, str] = {}
        layers, total, sizes = [], 0, []
        for n, spec in chosen.items():
            w = spec.module.weight
            if id(w) in seen:
                raise ValueError(f"{name}: layers {seen[id(w)]!r} and {n!r} share one weight; "
                                 "precondition only one of them (modules=[...])")
            seen[id(w)] = n
            bias = (spec.has_bias and id(spec.module.bias) in ids
                    and spec.module.bias.requires_grad)
            dtype = self.dtype or stat_dtype(w.dtype)
            nbytes = 2 * spec.units * spec.n1**2 * torch.finfo(dtype).bits // 8
            total += nbytes
            sizes.append((nbytes, n, spec))
            running = RunningLayerFisher(spec, reduction=self.reduction, dtype=dtype,
                                         memory_budget=self.memory_budget)
            layers.append(_Layer(spec, bias, running))
        if total > max_state_bytes:
            big = ", ".join(f"{n!r} {b / 2**30:.2f} GiB ({s.units} units x {s.n1}² x 2)"
                            for b, n, s in sorted(sizes, key=lambda t: -t[0])[:3])
            raise ValueError(
                f"{name}: the unit Fisher and its factors need {total / 2**30:.2f} GiB "
                f"(largest: {big}), more than max_state_bytes={max_state_bytes / 2**30:.2f} GiB; "
                "choose the layers with modules=[...] or raise max_state_bytes"
            )
        return layers

    # ------------------------------------------------------------------ public helpers
    @property
    def layers(self) -> list[str]:
        """Names of the layers that get the unit natural gradient."""
        return [layer.name for layer in self._layers]

    @property
    def step_count(self) -> int:
        """The number of :meth:`step` calls so far."""
        return self._step_count

    def fisher(self, layer: str) -> Tensor | None:
        """The bias-corrected EMA unit Fisher ``(units, n1, n1)`` of ``layer`` (bias at index 0
        when the layer's bias is optimised), undamped; ``None`` before its first update."""
        lay = self._layer(layer)
        if lay.running.fisher is None:
            return None
        return lay.fisher_hat()[0]

    def _layer(self, layer: str) -> _Layer:
        for lay in self._layers:
            if lay.name == layer:
                return lay
        from biasshift._names import unknown_name_error

        raise unknown_name_error("layer", layer, self.layers)

    def remove_hooks(self) -> None:
        """Remove the hooks from the model; later steps reuse the last factors."""
        for layer in self._layers:
            layer.running.detach()
        self._set_recording()

    close = remove_hooks

    def __enter__(self) -> UnitNaturalGradient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lr={self.param_groups[0]['lr']}, damping={self.damping}, "
                f"ema={self.ema}, update_every={self.update_every}, "
                f"inverse_every={self.inverse_every}, layers={self.layers})")

    def _set_recording(self) -> None:
        on = self._step_count % self.update_every == 0
        for layer in self._layers:
            layer.running.recording = on and layer.running.attached

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also drops the statistics of the backward passes
        since the last step (they belong to the gradient being cleared)."""
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers:
            layer.running.discard()

    # ------------------------------------------------------------------ the step
    def _refresh(self, layer: _Layer) -> None:
        # a fresh tensor (damped in place below); its lower triangle is all a Cholesky reads
        F, observed = layer.fisher_hat(symmetric=False)
        # a PSD block with a finite diagonal is finite (|F_ij| <= max(F_ii, F_jj)); overflow
        # shows on the diagonal
        finite = torch.isfinite(F.diagonal(dim1=-2, dim2=-1)).all(-1)
        factors = natural_gradient_factors(F, self.damping, bias=layer.bias is not None,
                                           form=self.factor, check=False, overwrite=True)
        bad = (factors.bad | ~finite) & observed
        if bool(bad.any()):  # the one host synchronisation, once per refresh
            if self.damping == 0 and bool(finite.all()):
                _raise_singular(F, bad, self.damping, layer=layer.name)
            # damping > 0: only a Fisher that outgrew the damping by ~1/eps (a run that is
            # diverging) or overflowed gets here; those units take the plain gradient
            scale = float(F.diagonal(dim1=-2, dim2=-1).amax())
            warnings.warn(
                f"UnitNaturalGradient: layer {layer.name!r}: the damped unit Fisher of "
                f"{int(bad.sum())} unit(s) is not numerically positive definite or not finite "
                f"(largest diagonal entry {scale:.3g}, damping {self.damping:g}; is the training "
                "diverging?); those units take the plain gradient until the next refresh. Lower "
                "lr, raise damping or use dtype=torch.float64", RuntimeWarning, stacklevel=5)
            observed = observed & ~bad
        layer.factors, layer.observed, layer.dirty = factors, observed, False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: update the EMA (on update steps), refresh the factors (on refresh steps),
        move every unit along ``−lr · (F̂ + λI)⁻¹ (g₀, g)`` and every other parameter along
        ``−lr · grad``.  Returns ``closure()``'s value when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self._step_count
        lrs = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        for layer in self._layers:
            running = layer.running
            if running.recording:
                if running.update(self.ema):
                    layer.dirty = True
                elif (layer.weight.grad is not None and running.attached
                      and not layer.warned):
                    layer.warned = True
                    warnings.warn(
                        f"UnitNaturalGradient: no training forward/backward pass of layer "
                        f"{layer.name!r} was recorded before step() {t} (model in eval mode, "
                        "forward under no_grad, or the gradient set by hand?); its unit Fisher "
                        "was not updated", RuntimeWarning, stacklevel=4)
            else:
                running.discard()
            if layer.dirty and (layer.factors is None or t % self.inverse_every == 0):
                self._refresh(layer)
            self._apply(layer, lrs)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in self._owned:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("UnitNaturalGradient does not support sparse gradients")
                p.add_(p.grad, alpha=-group["lr"])
        self._step_count = t + 1
        self._set_recording()
        return loss

    def _apply(self, layer: _Layer, lrs: dict[int, float]) -> None:
        w, b = layer.weight, layer.bias
        if w.grad is None:
            if b is not None and b.grad is not None:  # no weight gradient: SGD for the bias
                b.add_(b.grad, alpha=-lrs[id(b)])
            return
        U, n = layer.spec.units, layer.spec.n
        factors = layer.factors
        dtype = factors.factor.dtype if factors is not None else stat_dtype(w.dtype)
        gw = w.grad.reshape(U, n).to(dtype)
        if b is not None:
            g0 = (b.grad if b.grad is not None else torch.zeros_like(b)).reshape(U, 1)
            g = torch.cat([g0.to(dtype), gw], dim=1)
        else:
            g = gw
        if factors is None:
            direction = g  # no statistics yet: plain gradient
        else:
            if factors.factor.device != g.device:
                layer.factors = factors = _factors_to(factors, g.device)
                layer.observed = layer.observed.to(g.device)  # type: ignore[union-attr]
            assert layer.observed is not None
            direction = torch.where(layer.observed.unsqueeze(-1),
                                    apply_natural_gradient(factors, g), g)
        off = 0
        if b is not None:
            b.add_(direction[:, 0].reshape(b.shape).to(b.dtype), alpha=-lrs[id(b)])
            off = 1
        w.add_(direction[:, off:].reshape(w.shape).to(w.dtype), alpha=-lrs[id(w)])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus the running Fisher and the factors of every
        layer (tensors and plain values only: loads with ``torch.load(weights_only=True)``)."""
        state = super().state_dict()
        layers = []
        for layer in self._layers:
            f = layer.factors
            layers.append({
                "name": layer.name,
                "bias": layer.bias is not None,
                "running": layer.running.state_dict(),
                "dirty": layer.dirty,
                "observed": layer.observed,
                "factors": None if f is None else {
                    "form": f.form, "factor": f.factor, "A_inv_b": f.A_inv_b, "s": f.s,
                    "bad": f.bad,
                },
            })
        state[_STATE_KEY] = {
            "step": self._step_count,
            "damping": self.damping,
            "ema": self.ema,
            "update_every": self.update_every,
            "inverse_every": self.inverse_every,
            "reduction": self.reduction,
            "factor": self.factor,
            "layers": layers,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (hyperparameters included, as ``torch.optim`` restores
        ``lr``); checks that the layers match."""
        state = dict(state_dict)
        ours = state.pop(_STATE_KEY, None)
        if ours is None:
            raise ValueError("UnitNaturalGradient.load_state_dict: not a UnitNaturalGradient "
                             f"state (no {_STATE_KEY!r} entry)")
        saved = [(s["name"], s["bias"]) for s in ours["layers"]]
        now = [(layer.name, layer.bias is not None) for layer in self._layers]
        if saved != now:
            raise ValueError(
                f"UnitNaturalGradient.load_state_dict: the state is for the layers (name, bias) "
                f"{saved}, this optimiser has {now}"
            )
        super().load_state_dict(state)
        for layer, s in zip(self._layers, ours["layers"]):
            device = layer.weight.device
            layer.running.load_state_dict(s["running"], device)
            layer.dirty = bool(s["dirty"])
            layer.observed = None if s["observed"] is None else s["observed"].to(device)
            f = s["factors"]
            layer.factors = None if f is None else _factors_to(NaturalGradientFactors(
                form=f["form"], factor=f["factor"], A_inv_b=f["A_inv_b"], s=f["s"],
                bad=f["bad"]), device, copy=True)
            layer.warned = False
        self._step_count = int(ours["step"])
        self.damping = float(ours["damping"])
        self.ema = float(ours["ema"])
        self.update_every = int(ours["update_every"])
        self.inverse_every = int(ours["inverse_every"])
        self.reduction = str(ours["reduction"])
        self.factor = str(ours["factor"])
        for layer in self._layers:
            layer.running.reduction = self.reduction
        self._set_recording()


def _factors_to(f: NaturalGradientFactors, device: torch.device,
                copy: bool = False) -> NaturalGradientFactors:
    def mv(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device, copy=copy)

    factor = f.factor.to(device, copy=copy)
    return NaturalGradientFactors(form=f.form, factor=factor, A_inv_b=mv(f.A_inv_b), s=mv(f.s),
                                  bad=f.bad.to(device, copy=copy))
