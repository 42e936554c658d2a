r"""The unit natural gradient as an optimiser (Theorem 1 of the ELU paper, batched over units).

Clevert, Unterthiner & Hochreiter, ICLR 2016, Section 2: for unit ``i`` with incoming
``ã = (1, a)`` the unit Fisher is ``F = E_p(δ² ã ãᵀ) = [[c, bᵀ], [b, A]]`` and the unit natural
gradient of ``(g₀, g)`` is (Theorem 1)::

    s = (c − bᵀA⁻¹b)⁻¹,   Δw₀ = s (g₀ − bᵀA⁻¹g),   Δw = A⁻¹g − Δw₀ A⁻¹b,

which is the vector ``F⁻¹(g₀, g)``.  :class:`UnitNaturalGradient` keeps a running (EMA)
empirical unit Fisher per unit of every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layer
(:mod:`biasshift.optim.running_fisher`), damps it, factors it by Cholesky
(:mod:`biasshift.optim.block_solve`: the whole block, so nothing cancels) and moves every unit's
``(bias, weight)`` along ``d = (F̂ + λI)⁻¹ (g₀, g)``.  Every other parameter gets plain SGD.

What makes it stable (the three mechanisms, each on by default)
    1. **Damping relative to the layer's scale** (``damping_mode="relative"``):
       ``λ = ρ · mean_u tr(F̂_u)/m``, the damping ``ρ`` times the mean over the layer's units
       of each block's mean diagonal entry.  ``E_p(δ²)`` falls several-fold during training
       and differs twenty-fold between layers, so an absolute ``λ`` means strong damping in
       one layer and none in another; a relative ``ρ`` means the same in every layer and
       at every time.  It is one ``λ`` per layer, not one per unit.  With a per-unit
       ``λ_u = ρ tr(F̂_u)/m``, a unit whose ``δ`` is tiny (a nearly dead ReLU, say) gets a tiny
       ``λ_u``.  It then takes a huge weight step that its own block calls harmless, and the
       step blows up the next layer's inputs: on the 8×128 ReLU net on digits, lr 0.01, the
       loss went from 1.95 to 3e4 in one step.  The unit block ignores cross-unit effects;
       a per-layer ``λ`` bounds that step to the SGD step ``lr/λ`` of the layer.
       ``damping_mode="absolute"`` adds ``λ = ρ`` as given.
    2. **A trust region on the whole step** (``kl_clip``, as in K-FAC: Martens & Grosse
       2015, and KFAC-Pytorch's ``kl_clip``).  The step ``Δθ = −lr·d`` changes the model's
       predictive distribution by ``KL ≈ ½ Δθᵀ F Δθ`` with ``F`` the Fisher of the *network*.
       The unit blocks see only its diagonal blocks: the block model
       ``q_block = Σ_p lr_p² g_pᵀ d_p = lr² Σ_u gᵀ(F̂_u + λI)⁻¹g`` leaves out how the
       steps of all units of a layer, and of all layers, add up in the next layer's inputs.
       On the 8×128 net on digits the batch's exact empirical Fisher along the step was
       10³–10⁶ times the block model, and a clip on the block model alone let the loss jump
       9–86× in one step.  ``trust_region="network"`` (the default) therefore measures, on
       the samples ``x`` of the backward passes that made the gradient,
       ``q_net = mean_x (Σ_layers lr·g_xᵀ d)²``, the batch's exact empirical Fisher along
       the whole step of the group, cross-unit and cross-layer terms included (``g_xᵀ d`` is
       ``∂ℓ_x/∂net · Δnet``, one extra forward of each layer with ``d`` as its weights; see
       :meth:`RunningLayerFisher.step_products`).  A single batch's ratio
       ``r = q_net/q_block`` scatters by orders of magnitude from batch to batch, and a batch
       with a low ratio would take a step far too large for the others, so the step is
       budgeted with the upper envelope ``r̂_t = max(1, r_t, γ r̂_{t−1})`` (``γ = 0.9`` per
       step) and each param group's natural directions are scaled by::

           ν = min(1, sqrt(κ / (q_block · r̂))).

       So ``mean_x (g_xᵀΔθ)² ≤ κ`` and ``lr² Σ gᵀ(F̂+λI)⁻¹g ≤ κ`` on every step, and a
       step is at most ``1/sqrt(γ)`` times larger (relative to the block model) than the last.
       Where the passes cannot be lined up sample by sample (a layer called on batches of
       different sizes) the block model alone is used, as with ``trust_region="units"``.
       Under ``torch.distributed`` the sums over samples are all-reduced, so every rank takes
       the same step.  Parameters outside the layers (plain SGD) are neither counted nor
       scaled.  With momentum ``μ`` the clip budgets the steady-state step: ``lr_p`` is
       replaced by ``lr_p (1 − dampening)/(1 − μ)`` (Nesterov:
       ``lr_p (1 + μ (1 − dampening)/(1 − μ))``).  ``kl_clip=None`` turns it off.
       At SGD's learning rates (0.01–0.1) the region is active on almost every step, so the
       step length is set by ``κ``, not by ``lr``; ``lr`` matters once ``lr²·q < κ``.
    3. **Factors that never act long on little data.**  The EMA is bias-corrected (its first
       value is the first batch).  Until it holds ``⌈1/(1 − ema)⌉`` batches (its memory, 20 at
       ``ema = 0.95``) it is updated on every step, and only then every ``update_every``
       steps.  The factors of a layer are refreshed on the first step with statistics.
       After that they are refreshed whenever the EMA has moved enough, and at least every
       ``inverse_every`` steps.  "Moved enough" means that at least
       half of the EMA's weight comes from batches newer than the factors:
       ``1 − ema^k · w_r / w ≥ ½`` after ``k`` updates.  The test is computed on the host
       from the update count, with no synchronisation.  Early in training, when each update
       doubles the EMA's weight, this refreshes after nearly every update.  Later it
       refreshes every ``log ½ / log ema`` updates (14 at ``ema = 0.95``).

Divergence
    A non-finite natural direction never reaches the parameters: the unit is left where it
    is for that step, and the event is recorded on the device.  At the next refresh (at most
    ``inverse_every`` steps later; the refresh synchronises with the host anyway) the
    optimiser raises :class:`DivergenceError` (``on_divergence="raise"``, the default) or
    warns (``"warn"``).  It does the same when a layer's Fisher scale has grown more than
    ``explode_factor`` times since its first refresh, or when the closure's loss is not
    finite.  The message names the layer and the step and suggests settings.

torch.optim idioms
    Every hyperparameter is in ``defaults`` and can be set per param group: ``lr``,
    ``momentum``, ``dampening``, ``weight_decay``, ``nesterov`` (as in ``torch.optim.SGD``,
    applied to the clipped natural direction as K-FAC does), ``damping``, ``damping_mode``,
    ``ema``, ``kl_clip``, ``trust_region``, ``update_every`` and ``inverse_every``.  The
    layer-level ones (``damping``, ``damping_mode``, ``ema``, ``update_every``,
    ``inverse_every``) are read from the group that holds the layer's weight.
    ``lr_scheduler`` works as with SGD.
    ``state_dict()`` has the standard layout (``state`` by parameter index, ``param_groups``).
    A layer's running Fisher, its factors and its schedule are in the state of its weight,
    with the symmetric and triangular blocks packed to their lower triangles.  A checkpoint
    resumes bit-identically.

Which passes count
    The statistics of a step are those of the backward passes that accumulated into the
    layers' ``weight.grad`` since the last ``step()`` or ``zero_grad()``, while the module was
    in training mode with gradients enabled: exactly the passes that made the gradient
    being applied.  Forward passes under ``no_grad``/``inference_mode`` or in eval mode,
    forward passes never followed by ``backward()``, and ``torch.autograd.grad`` calls are
    ignored.  Several backward passes before one step (gradient accumulation) form one batch.

Cost (measured in ``analyses/bench_optim.py``)
    Per update, ``units · rows · (n+1)²`` multiply-adds per layer (only the block lower
    triangle for blocks of 384 rows or more).  Per refresh, one batched Cholesky.  Per step,
    two triangular solves per unit.  On a CPU these run in chunks that fit in cache, so each
    step streams every factor from memory once.  The per-step solves are memory-bound: on the
    8×128 MNIST net they read the first layer's 128 lower triangles of 786² (158 MB in
    float32) on every step.

Memory
    Per layer ``units × (n+1)²`` entries for the EMA and as many for the factors (8×128 MNIST
    net, float32: 0.70 GiB).  The constructor refuses more than ``max_state_bytes`` in all
    (choose layers with ``modules=``).  A checkpoint holds the packed lower triangles, half
    of that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from biasshift import distributed as _dist
from biasshift.fisher.capture import SUPPORTED_LAYERS, LayerSpec, resolve_layers
from biasshift.optim.block_solve import FORMS, BlockFactors, pack_tril, unpack_tril
from biasshift.optim.running_fisher import REDUCTIONS, RunningLayerFisher, stat_dtype
from biasshift.theory import raise_singular

__all__ = ["DAMPING_MODES", "DivergenceError", "UnitNaturalGradient"]

_STATE_KEY = "unit_natural_gradient"
_STATE_VERSION = 2
DAMPING_MODES = ("relative", "absolute")
TRUST_REGIONS = ("network", "units")
DIVERGENCE_ACTIONS = ("raise", "warn")
_RATIO_DECAY = 0.9  # per step, of the network trust region's curvature-ratio envelope

ModuleSelection = Union[  # noqa: UP007
    nn.Module, Iterable[Union[str, nn.Module]], Callable[[str, nn.Module], bool], None  # noqa: UP007
]


class DivergenceError(FloatingPointError):
    """Raised by :class:`UnitNaturalGradient` when a step is non-finite or the Fisher explodes.

    Attributes:
        layer: the layer's name (``None`` for a non-finite closure loss).
        step: the step at which it was detected.
    """

    def __init__(self, message: str, *, layer: str | None, step: int) -> None:
        super().__init__(message)
        self.layer = layer
        self.step = step


def _supported(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and isinstance(m, SUPPORTED_LAYERS)}


class _Layer:
    """One preconditioned layer: its running Fisher, its factors, its schedule."""

    def __init__(self, spec: LayerSpec, bias: bool, running: RunningLayerFisher) -> None:
        self.spec = spec
        self.weight: Tensor = spec.module.weight  # type: ignore[assignment]
        # the bias is in the block only when the optimiser owns it
        self.bias: Tensor | None = spec.module.bias if bias else None  # type: ignore[assignment]
        self.running = running
        self.factors: BlockFactors | None = None
        self.observed: Tensor | None = None  # units that use their factors
        self.dirty = False  # the EMA changed since the factors were computed
        self.warned = False
        self.step = 0  # this layer's step counter (its group's schedule)
        self.mass = 0.0  # EMA weight of a unit that saw every update (host-side, exact)
        self.mass_at_refresh = 0.0
        self.updates_since_refresh = 0
        self.steps_since_refresh = 0
        self.scale0: float | None = None  # mean diagonal at the first refresh
        self.nonfinite: Tensor | None = None  # device flag: a non-finite direction since check
        self.fold = True  # this step folds its batch into the EMA (set by _set_recording)
        self.first_bad_step: Tensor | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def m(self) -> int:
        return self.spec.n + int(self.bias is not None)

    def fisher_hat(self, symmetric: bool = True, group: Any = None) -> tuple[Tensor, Tensor]:
        """The bias-corrected EMA blocks for the owned parameters, and the observed mask (with
        a process ``group``: of all its ranks)."""
        F, observed = self.running.fisher_hat(symmetric, group)
        if self.spec.has_bias and self.bias is None:
            F = F[:, 1:, 1:]  # the bias is not optimised here: only the weight block
        return F, observed

    def new_fraction(self, ema: float) -> float:
        """The share of the EMA's weight from batches newer than the factors."""
        if self.mass <= 0:
            return 0.0
        return 1.0 - ema**self.updates_since_refresh * self.mass_at_refresh / self.mass


class UnitNaturalGradient(torch.optim.Optimizer):
    r"""Precondition every unit's ``(bias, weight)`` gradient by its damped unit Fisher.

    The direction of unit ``u`` of a ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layer is
    ``d_u = (F̂_u + λ_u I)⁻¹ (g₀, g)_u``, Theorem 1's unit natural gradient of the damped
    block, with ``F̂_u`` the bias-corrected exponential moving average of the empirical unit
    Fisher of the training batches.  Each param group scales its natural directions by the
    trust-region factor ``ν`` (``kl_clip``), then every parameter takes an SGD step
    (momentum, weight decay, Nesterov as ``torch.optim.SGD``) along its direction: ``ν·d``
    for the preconditioned weights and biases, the plain gradient for all others.  See the
    module docstring for the maths of the damping, the trust region and the refresh schedule.

    Args:
        params_or_model: an ``nn.Module`` (its Linear/Conv2d layers get the natural gradient,
            all other parameters SGD), or an iterable of parameters or param groups (then pass
            ``modules=``: parameters cannot be hooked).  A layer gets the natural gradient when
            its weight is among the parameters (and requires grad).  Its bias is in the block
            when it is among them too; otherwise the weight block ``A`` alone is used.
        lr: learning rate.  ``kl_clip`` bounds every step, so the SGD learning rates of the
            paper (0.01 to 0.1) are stable.
        damping: ``ρ ≥ 0``: with ``damping_mode="relative"`` ``λ = ρ · mean_u tr(F̂_u)/m`` per
            layer, with ``"absolute"`` ``λ = ρ``.  The bias entry is damped too.
        ema: decay of the moving average, in ``[0, 1)``; ``0`` keeps only the latest batch.
        momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        kl_clip: ``κ > 0`` of the trust region, or ``None`` for unclipped steps.
        damping_mode: ``"relative"`` or ``"absolute"``.
        update_every: fold the training batch into the EMA on every ``update_every``-th step of
            the layer (the hooks are idle on the others).
        inverse_every: refresh the factors at least every ``inverse_every`` steps (and earlier
            when the EMA has moved, see the module docstring).
        reduction: how the training loss reduces over the batch (dimension 0): ``"mean"``
            (``δ = −N · grad_output``) or ``"sum"`` (``δ = −grad_output``).
        modules: which layers get the natural gradient.  Given a model: ``None`` (all its
            Linear/Conv2d layers), a submodule (the layers inside it), an iterable of layer
            names and/or layer modules, or a predicate ``(name, module) -> bool``.  Given
            parameters: the model (or an iterable of its layers) owning them.
        dtype: dtype of the statistics and factors (default float32, float64 for float64
            layers).
        factor: ``"cholesky"`` (default, backward stable) or ``"inverse"`` (an explicit
            inverse: one vector-matrix product per step, see
            :mod:`biasshift.optim.block_solve` for when it is accurate).
        on_divergence: ``"raise"`` a :class:`DivergenceError` or ``"warn"``.
        explode_factor: growth of a layer's Fisher scale (mean diagonal) since its first
            refresh that counts as divergence.
        memory_budget: bytes for the temporaries of one chunk of units in the Fisher update.
        max_state_bytes: refuse layers whose EMA and factors need more bytes in all.
        sync, process_group: under ``torch.distributed`` (DDP), each refresh combines the
            ranks' running Fisher blocks (two all-reduces per refreshed layer; see
            :mod:`biasshift.optim.running_fisher`), so every rank preconditions with the
            Fisher of the global batch; ``sync=False``: each rank its own. Every rank must
            step in lockstep (as under DDP); the steps themselves never communicate.

    Raises:
        ValueError: no supported layer owns any of the parameters; bad hyperparameters; a
            layer whose state exceeds ``max_state_bytes``; two layers sharing one weight.
        biasshift.theory.SingularFisherError: at a refresh with ``damping=0``, a block is
            singular (fewer samples than rows); the message gives a damping to use.
        DivergenceError: see ``on_divergence``.

    Hooks are registered in the constructor and removed by :meth:`remove_hooks` (alias
    :meth:`close`), on leaving a ``with`` block, or when the optimiser is garbage-collected;
    after :meth:`remove_hooks` the optimiser keeps its last factors and stops updating them.

    >>> opt = UnitNaturalGradient(model, lr=0.05)                          # doctest: +SKIP
    >>> loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    >>> Trainer(model, data, epochs=10, optimizer=lambda m: UnitNaturalGradient(m))  # +SKIP
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        damping: float = 1e-1,
        ema: float = 0.95,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        kl_clip: float | None = 1e-1,
        trust_region: str = "network",
        damping_mode: str = "relative",
        update_every: int = 20,
        inverse_every: int = 200,
        reduction: str = "mean",
        modules: ModuleSelection = None,
        dtype: torch.dtype | None = None,
        factor: str = "cholesky",
        on_divergence: str = "raise",
        explode_factor: float = 1e8,
        memory_budget: int = 2**28,
        max_state_bytes: int = 2**32,
        sync: bool | None = None,
        process_group: Any = None,
    ) -> None:
        name = type(self).__name__
        if reduction not in REDUCTIONS:
            raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if factor not in FORMS:
            raise ValueError(f"{name}: factor must be one of {FORMS}, got {factor!r}")
        if on_divergence not in DIVERGENCE_ACTIONS:
            raise ValueError(f"{name}: on_divergence must be one of {DIVERGENCE_ACTIONS}, got "
                             f"{on_divergence!r}")
        if not (isinstance(explode_factor, (int, float)) and explode_factor > 1):
            raise ValueError(f"{name}: explode_factor must be a number > 1, got "
                             f"{explode_factor!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: dtype must be torch.float32, torch.float64 or None, got "
                             f"{dtype!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, damping=damping,
                        damping_mode=damping_mode, ema=ema, kl_clip=kl_clip,
                        trust_region=trust_region,
                        update_every=update_every, inverse_every=inverse_every)
        _check_hyperparameters(defaults, name)

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
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyperparameters(group, name)

        self.reduction = reduction
        self.factor = factor
        self.dtype = dtype
        self.on_divergence = on_divergence
        self.explode_factor = float(explode_factor)
        self.memory_budget = int(memory_budget)
        self.sync = sync
        self.process_group = process_group
        _dist.sync_group(sync, process_group)  # checks the arguments
        self._step_count = 0
        self._curvature: dict[int, Tensor] = {}  # param group index -> curvature-ratio envelope
        self._layers: list[_Layer] = self._build_layers(model, selection, max_state_bytes)
        self._owned = {id(p) for layer in self._layers for p in (layer.weight, layer.bias)
                       if p is not None}
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # states saved before the network trust region existed stepped with the block model
            group.setdefault("trust_region", "units")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_hyperparameters(self.param_groups[-1], type(self).__name__)

    # ------------------------------------------------------------------ public helpers
    @property
    def layers(self) -> list[str]:
        """Names of the layers that get the unit natural gradient."""
        return [layer.name for layer in self._layers]

    @property
    def step_count(self) -> int:
        """The number of :meth:`step` calls so far."""
        return self._step_count

    # the first group's layer-level hyperparameters, for reading (set them per group)
    damping = property(lambda self: self.param_groups[0]["damping"])
    damping_mode = property(lambda self: self.param_groups[0]["damping_mode"])
    ema = property(lambda self: self.param_groups[0]["ema"])
    kl_clip = property(lambda self: self.param_groups[0]["kl_clip"])
    update_every = property(lambda self: self.param_groups[0]["update_every"])
    inverse_every = property(lambda self: self.param_groups[0]["inverse_every"])

    def fisher(self, layer: str, *, sync: bool | None = None,
               process_group: Any = None) -> Tensor | None:
        """The bias-corrected EMA unit Fisher ``(units, m, m)`` of ``layer`` (bias at index 0
        when the layer's bias is optimised), undamped; ``None`` before its first update.
        Under ``torch.distributed``: all ranks' (as at a refresh; ``sync=False``: this
        rank's)."""
        lay = self._layer(layer)
        if lay.running.fisher is None:
            return None
        group = _dist.sync_group(self.sync if sync is None else sync,
                                 process_group if process_group is not None
                                 else self.process_group)
        return lay.fisher_hat(group=group)[0]

    def factors(self, layer: str) -> BlockFactors | None:
        """The factors the steps of ``layer`` use now (``None`` before its first refresh)."""
        return self._layer(layer).factors

    def _layer(self, layer: str) -> _Layer:
        for lay in self._layers:
            if lay.name == layer:
                return lay
        from biasshift._names import unknown_name_error

        raise unknown_name_error("layer", layer, self.layers)

    def _group(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise RuntimeError(f"{type(self).__name__}: a preconditioned parameter is in no param "
                           "group")

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
        g = self.param_groups[0]
        keys = ("lr", "damping", "damping_mode", "ema", "kl_clip", "update_every",
                "inverse_every")
        return (f"{type(self).__name__}(" + ", ".join(f"{k}={g[k]!r}" for k in keys)
                + f", layers={self.layers})")

    def _set_recording(self) -> None:
        for layer in self._layers:
            hp = self._group(layer.weight)
            on = (layer.running.updates < _warmup_updates(hp["ema"])
                  or layer.step % hp["update_every"] == 0)
            layer.fold = on
            net = hp["kl_clip"] is not None and hp["trust_region"] == "network"
            layer.running.recording = (on or net) and layer.running.attached

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also drops the statistics of the backward passes
        since the last step (they belong to the gradient being cleared)."""
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers:
            layer.running.discard()

    # ------------------------------------------------------------------ the factors
    def _due(self, layer: _Layer, hp: dict[str, Any]) -> bool:
        if not layer.dirty:
            return False
        if layer.factors is None or layer.steps_since_refresh >= hp["inverse_every"]:
            return True
        return layer.new_fraction(hp["ema"]) >= 0.5

    def _refresh(self, layer: _Layer, hp: dict[str, Any]) -> None:
        # a fresh tensor (damped in place); its lower triangle is all a Cholesky reads
        F, observed = layer.fisher_hat(
            symmetric=False, group=_dist.sync_group(self.sync, self.process_group))
        m = F.shape[-1]
        diag = F.diagonal(dim1=-2, dim2=-1)
        mean_diag = diag.sum(-1) / m
        # a unit whose δ was 0 in every batch (a dead unit) has nothing to precondition
        observed = observed & (mean_diag > 0)
        rho = float(hp["damping"])
        if hp["damping_mode"] == "relative":
            # the layer's scale: the mean over its units of each block's mean diagonal entry
            # (one λ for the layer, so a unit whose δ is tiny is damped like its neighbours)
            layer_scale = (torch.where(observed, mean_diag, torch.zeros_like(mean_diag)).sum()
                           / observed.sum().clamp_min(1))
            lam = rho * torch.where(layer_scale > 0, layer_scale,
                                    torch.ones_like(layer_scale)).expand_as(mean_diag).clone()
        else:
            lam = torch.full_like(mean_diag, rho)
        factors = BlockFactors.compute(F, lam, form=self.factor, overwrite=True,
                                       strict=rho == 0)
        bad = ~factors.ok & observed
        # the optimiser's one host synchronisation, once per refresh
        scale = float(torch.where(observed, mean_diag, torch.zeros_like(mean_diag)).sum()
                      / observed.sum().clamp_min(1))
        self._check_divergence(layer, hp, scale)
        if bool(bad.any()):
            if rho == 0:
                F.diagonal(dim1=-2, dim2=-1).sub_(lam.unsqueeze(-1))
                raise_singular(F, bad, 0.0, layer=layer.name)
            # damping > 0: only a Fisher that overflowed or outgrew the damping by ~1/eps gets
            # here; those units take the plain gradient until the next refresh
            warnings.warn(
                f"UnitNaturalGradient: layer {layer.name!r}: the damped unit Fisher of "
                f"{int(bad.sum())} unit(s) is not numerically positive definite or not finite "
                f"(mean diagonal entry {scale:.3g}, damping {rho:g} {hp['damping_mode']}; is the "
                "training diverging?); those units take the plain gradient until the next "
                "refresh. Lower lr, raise damping or use dtype=torch.float64", RuntimeWarning,
                stacklevel=4)
            observed = observed & ~bad
        layer.factors, layer.observed, layer.dirty = factors, observed, False
        layer.mass_at_refresh = layer.mass
        layer.updates_since_refresh = 0
        layer.steps_since_refresh = 0

    def _check_divergence(self, layer: _Layer, hp: dict[str, Any], scale: float) -> None:
        """Report the non-finite steps recorded on the device and an exploding Fisher."""
        problems = []
        for other in self._layers:
            if other.nonfinite is not None and bool(other.nonfinite):
                step = int(other.first_bad_step)  # type: ignore[arg-type]
                other.nonfinite.zero_()
                problems.append((other.name, step, f"layer {other.name!r}: a non-finite "
                                 f"natural-gradient step at step {step} (its units were not "
                                 "moved)"))
        if math.isfinite(scale) and scale > 0:
            if layer.scale0 is None:
                layer.scale0 = scale
            elif scale > self.explode_factor * layer.scale0:
                problems.append((layer.name, self._step_count,
                                 f"layer {layer.name!r}: the unit Fisher's mean diagonal grew "
                                 f"from {layer.scale0:.3g} to {scale:.3g} "
                                 f"(x{scale / layer.scale0:.2g} > explode_factor "
                                 f"{self.explode_factor:g}) by step {self._step_count}"))
        elif not math.isfinite(scale):
            problems.append((layer.name, self._step_count,
                             f"layer {layer.name!r}: the unit Fisher is not finite at step "
                             f"{self._step_count}"))
        for name, step, what in problems:
            self._diverged(name, step, what, hp)

    def _diverged(self, layer: str | None, step: int, what: str, hp: dict[str, Any]) -> None:
        lr = hp["lr"]
        message = (
            f"UnitNaturalGradient: the training is diverging: {what}. Settings: lr {lr:g}, "
            f"damping {hp['damping']:g} ({hp['damping_mode']}), kl_clip {hp['kl_clip']}. Try "
            f"lr={lr / 10:g}, a smaller kl_clip (e.g. {(hp['kl_clip'] or 1e-2) / 10:g}) or a "
            f"larger damping (e.g. {max(hp['damping'] * 10, 1e-3):g}); "
            "on_divergence='warn' to go on."
        )
        if self.on_divergence == "raise":
            raise DivergenceError(message, layer=layer, step=step)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: update the EMA (on update steps), refresh the factors (when due), move
        every preconditioned unit along ``ν · (F̂ + λI)⁻¹ (g₀, g)`` and every other parameter
        along its gradient, with SGD's momentum and weight decay.  Returns ``closure()``'s
        value when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, Tensor) and loss.numel() == 1 and not bool(
                    torch.isfinite(loss.detach())):
                self._diverged(None, self._step_count, f"the closure's loss is {float(loss)}",
                               self.param_groups[0])
        t = self._step_count
        directions: dict[int, Tensor] = {}
        quad: dict[int, Tensor] = {}  # id(group) -> Σ lr² gᵀd of its natural directions
        captured: list[tuple[_Layer, list[Any]]] = []
        for layer in self._layers:
            hp = self._group(layer.weight)
            batches = layer.running.take()  # the passes of this step's gradient
            if not layer.running.recording:
                batches = []
            self._update_statistics(layer, hp, t, batches)
            if self._due(layer, hp):
                self._refresh(layer, hp)
            self._natural_direction(layer, directions, quad)
            layer.step += 1
            layer.steps_since_refresh += 1
            if batches and id(layer.weight) in directions:
                captured.append((layer, batches))
        network = self._network_quadratic(captured, directions)
        for gi, group in enumerate(self.param_groups):
            kl = group["kl_clip"]
            nu = None
            if kl is not None and id(group) in quad:
                q = quad[id(group)]
                qn = network.get(id(group))
                if qn is not None:
                    q = self._network_model(gi, q, qn.to(q.dtype))
                nu = torch.sqrt(kl / q.clamp_min(torch.finfo(q.dtype).tiny)).clamp(max=1.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("UnitNaturalGradient does not support sparse gradients")
                d = directions.get(id(p))
                if d is None:
                    d = p.grad
                elif nu is not None:
                    d = d * nu.to(d.dtype)
                self._sgd(p, d, group)
        self._step_count = t + 1
        self._set_recording()
        return loss

    def _update_statistics(self, layer: _Layer, hp: dict[str, Any], t: int,
                           batches: list[Any]) -> None:
        running = layer.running
        if not (running.recording and layer.fold):
            return
        ema = hp["ema"]
        if running.update(ema, batches):
            layer.dirty = True
            layer.mass = ema * layer.mass + (1.0 - ema)
            layer.updates_since_refresh += 1
        elif layer.weight.grad is not None and running.attached and not layer.warned:
            layer.warned = True
            warnings.warn(
                f"UnitNaturalGradient: no training forward/backward pass of layer "
                f"{layer.name!r} was recorded before step() {t} (model in eval mode, "
                "forward under no_grad, or the gradient set by hand?); its unit Fisher "
                "was not updated", RuntimeWarning, stacklevel=4)

    def _network_model(self, gi: int, qb: Tensor, qn: Tensor) -> Tensor:
        r"""The quadratic model of group ``gi``'s step under the network trust region:
        ``q_block · r̂`` with ``r̂_t = max(1, q_net/q_block, γ r̂_{t−1})``, the upper envelope
        of the batch's cross-unit curvature ratio, decaying by ``γ`` per step.  The ratio
        of a single batch scatters by orders of magnitude; a batch whose own curvature along
        its step is small cannot enlarge the step by more than ``1/sqrt(γ)``.  A non-finite
        ``q_net`` (a non-finite gradient; its units are not moved) keeps the envelope."""
        r = qn / qb.clamp_min(torch.finfo(qb.dtype).tiny)
        prev = self._curvature.get(gi)
        if prev is None:
            prev = torch.ones((), dtype=qb.dtype, device=qb.device)
        else:
            prev = prev.to(qb.device, qb.dtype)
        decayed = (prev * _RATIO_DECAY).clamp_min(1.0)
        rhat = torch.where(torch.isfinite(r), torch.maximum(r, decayed), decayed)
        self._curvature[gi] = rhat
        return qb * rhat

    def _network_quadratic(self, captured: list[tuple[_Layer, list[Any]]],
                           directions: dict[int, Tensor]) -> dict[int, Tensor]:
        r"""Per param group with ``trust_region="network"``, the batch's exact empirical Fisher
        along the group's whole step: ``mean_x (Σ_layers lr·g_xᵀ d)²`` over the samples ``x``
        of the backward passes that made the gradient (see
        :meth:`RunningLayerFisher.step_products`).  A group whose layers' passes do not line
        up (different passes or batch sizes) gets none (its block model alone is used)."""
        sums: dict[int, list[Tensor] | None] = {}
        for layer, batches in captured:
            group = self._group(layer.weight)
            if group["kl_clip"] is None or group["trust_region"] != "network":
                continue
            key = id(group)
            if key in sums and sums[key] is None:
                continue
            w, b = layer.weight, layer.bias
            dw = directions[id(w)]
            db = directions.get(id(b)) if b is not None else None
            if b is not None and db is None:
                db = torch.zeros_like(b)
            if db is not None and self._group(b) is not group:  # type: ignore[arg-type]
                db = db * (_effective_lr(self._group(b)) / _effective_lr(group))  # type: ignore[arg-type]
            prods = layer.running.step_products(batches, dw, db)
            if prods is None:
                sums[key] = None
                continue
            lr = _effective_lr(group)
            prods = [p * lr for p in prods]
            have = sums.get(key)
            if have is None:
                sums[key] = prods
            elif [p.shape for p in have] != [p.shape for p in prods]:
                sums[key] = None
            else:
                sums[key] = [a + p for a, p in zip(have, prods)]
        # per group (sum over samples of the squares, samples, 1 where the passes line up)
        parts: dict[int, Tensor] = {}
        for key, prods in sums.items():
            if prods:
                sq = sum((p.square().sum() for p in prods[1:]), prods[0].square().sum())
                total = float(sum(p.shape[0] for p in prods))
                # filled on the device (no host-to-device copy per step)
                parts[key] = torch.stack([
                    sq.double(), torch.full((), total, dtype=torch.float64, device=sq.device),
                    torch.ones((), dtype=torch.float64, device=sq.device)])
        comm = _dist.sync_group(self.sync, self.process_group)
        if comm is not None:
            # every rank adds its samples; a rank whose passes did not line up (or that had
            # none) sends zeros, and the group then keeps its block model on every rank
            keys = [id(g) for g in self.param_groups
                    if g["kl_clip"] is not None and g["trust_region"] == "network"]
            if not keys:
                return {}
            like = next(iter(parts.values())) if parts else None
            device = like.device if like is not None else self._layers[0].weight.device
            local = torch.stack([parts.get(k, torch.zeros(3, dtype=torch.float64, device=device))
                                 for k in keys])
            summed = _dist.all_reduce(local, comm)
            world = float(_dist.world_size(comm))
            return {k: torch.where((row[2] == world) & (row[1] > 0),
                                   row[0] / row[1].clamp_min(1.0),
                                   torch.full_like(row[0], float("nan")))
                    for k, row in zip(keys, summed)}
        return {k: v[0] / v[1] for k, v in parts.items()}

    def _natural_direction(self, layer: _Layer, directions: dict[int, Tensor],
                           quad: dict[int, Tensor]) -> None:
        """``(F̂ + λI)⁻¹ g`` per unit into ``directions`` (by parameter), ``lr² gᵀd`` into
        ``quad`` (by param group).  Units without factors take the plain gradient; a unit
        whose direction is not finite is not moved, and that is flagged on the device."""
        w, b = layer.weight, layer.bias
        if w.grad is None:
            return  # no weight gradient: SGD for the bias, if it has one
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
            d = g  # no statistics yet: plain gradient
        else:
            if factors.factor.device != g.device:
                layer.factors = factors = factors.to(g.device)
                layer.observed = layer.observed.to(g.device)  # type: ignore[union-attr]
            assert layer.observed is not None
            d = torch.where(layer.observed.unsqueeze(-1), factors.apply(g), g)
        finite = torch.isfinite(d).all(-1, keepdim=True)
        zero = torch.zeros((), dtype=d.dtype, device=d.device)
        d, g = torch.where(finite, d, zero), torch.where(finite, g, zero)
        bad = ~finite.all()
        if layer.nonfinite is None:
            layer.nonfinite = torch.zeros((), dtype=torch.bool, device=g.device)
            layer.first_bad_step = torch.zeros((), dtype=torch.long, device=g.device)
        assert layer.first_bad_step is not None
        layer.first_bad_step.copy_(torch.where(bad & ~layer.nonfinite, self._step_count,
                                               layer.first_bad_step))
        layer.nonfinite.logical_or_(bad)
        off = 0
        parts = []
        if b is not None:
            parts.append((b, 0, 1))
            off = 1
        parts.append((w, off, off + n))
        for p, i0, i1 in parts:
            if p.grad is None:
                continue
            group = self._group(p)
            dp = d[:, i0:i1]
            directions[id(p)] = dp.reshape(p.shape).to(p.dtype)
            term = (g[:, i0:i1] * dp).sum() * _effective_lr(group) ** 2
            quad[id(group)] = quad[id(group)] + term if id(group) in quad else term

    def _sgd(self, p: Tensor, d: Tensor, group: dict[str, Any]) -> None:
        """``torch.optim.SGD``'s update of ``p`` with ``d`` in place of the gradient."""
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd:
            d = d.add(p, alpha=wd)
        if momentum:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(d).detach()
            else:
                buf.mul_(momentum).add_(d, alpha=1 - group["dampening"])
            d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(d, alpha=-group["lr"])

    # ------------------------------------------------------------------ state
    def _param_index(self) -> dict[int, int]:
        """``id(p) -> index`` as ``torch.optim.Optimizer.state_dict`` numbers the parameters."""
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return index

    def state_dict(self) -> dict[str, Any]:
        """The standard ``torch.optim`` state; each layer's running Fisher, factors and schedule
        are under ``"unit_fisher"`` in the state of its weight, with the blocks packed to their
        lower triangles (loads with ``torch.load(weights_only=True)``)."""
        state = super().state_dict()
        index = self._param_index()
        for layer in self._layers:
            running, f = layer.running, layer.factors
            m1 = layer.spec.n1
            entry = {
                "fisher": None if running.fisher is None else pack_tril(running.fisher),
                "weight_sum": running.weight_sum,
                "updates": running.updates,
                "n1": m1,
                "bias": layer.bias is not None,
                "factor": None if f is None else pack_tril(f.factor),
                "factor_form": None if f is None else f.form,
                "factor_damping": None if f is None else f.damping,
                "factor_ok": None if f is None else f.ok,
                "observed": layer.observed,
                "dirty": layer.dirty,
                "step": layer.step,
                "mass": layer.mass,
                "mass_at_refresh": layer.mass_at_refresh,
                "updates_since_refresh": layer.updates_since_refresh,
                "steps_since_refresh": layer.steps_since_refresh,
                "scale0": layer.scale0,
                "nonfinite": layer.nonfinite,
                "first_bad_step": layer.first_bad_step,
            }
            state["state"].setdefault(index[id(layer.weight)], {})["unit_fisher"] = entry
        state[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "step": self._step_count,
            "layers": [(layer.name, layer.bias is not None) for layer in self._layers],
            "reduction": self.reduction,
            "factor": self.factor,
            # the network trust region's curvature-ratio envelope, by param group index
            "curvature": {gi: r.clone() for gi, r in self._curvature.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (hyperparameters included, as ``torch.optim`` restores
        ``lr``); checks that the layers match.  The statistics keep their own dtype."""
        name = type(self).__name__
        ours = state_dict.get(_STATE_KEY)
        if ours is None or ours.get("version") != _STATE_VERSION:
            raise ValueError(f"{name}.load_state_dict: not a {name} state of this version (no "
                             f"{_STATE_KEY!r} entry with version {_STATE_VERSION})")
        saved = [tuple(x) for x in ours["layers"]]
        now = [(layer.name, layer.bias is not None) for layer in self._layers]
        if saved != now:
            raise ValueError(f"{name}.load_state_dict: the state is for the layers (name, bias) "
                             f"{saved}, this optimiser has {now}")
        # take the layer entries out before torch casts every tensor to its parameter's dtype
        per_param = {k: dict(v) for k, v in state_dict["state"].items()}
        entries = {k: v.pop("unit_fisher") for k, v in per_param.items() if "unit_fisher" in v}
        super().load_state_dict({**state_dict, "state": {k: v for k, v in per_param.items()
                                                         if v}})
        index = self._param_index()
        for layer in self._layers:
            e = entries.get(index[id(layer.weight)])
            if e is None:
                raise ValueError(f"{name}.load_state_dict: no unit Fisher state for layer "
                                 f"{layer.name!r}")
            device = layer.weight.device
            m1 = layer.spec.n1
            if int(e["n1"]) != m1:
                raise ValueError(f"{name}.load_state_dict: layer {layer.name!r}: the saved blocks "
                                 f"are {e['n1']}², the layer needs {m1}²")
            packed = e["fisher"]
            layer.running.load_state_dict({
                "fisher": None if packed is None else unpack_tril(packed, m1, symmetric=False),
                "weight_sum": e["weight_sum"], "updates": e["updates"]}, device)
            if e["factor"] is None:
                layer.factors = None
            else:
                m = layer.m
                form = e["factor_form"]
                # the layouts BlockFactors.compute gives: Cholesky factors row-major,
                # inverses column-major
                factor = unpack_tril(e["factor"].to(device), m, symmetric=form == "inverse",
                                     column_major=form == "inverse")
                layer.factors = BlockFactors(form, factor, e["factor_damping"].to(device),
                                             e["factor_ok"].to(device))

            def dev(t: Tensor | None, device: torch.device = device) -> Tensor | None:
                return None if t is None else t.to(device, copy=True)

            layer.observed = dev(e["observed"])
            layer.dirty = bool(e["dirty"])
            layer.step = int(e["step"])
            layer.mass = float(e["mass"])
            layer.mass_at_refresh = float(e["mass_at_refresh"])
            layer.updates_since_refresh = int(e["updates_since_refresh"])
            layer.steps_since_refresh = int(e["steps_since_refresh"])
            layer.scale0 = None if e["scale0"] is None else float(e["scale0"])
            layer.nonfinite = dev(e["nonfinite"])
            layer.first_bad_step = dev(e["first_bad_step"])
            layer.warned = False
        self._step_count = int(ours["step"])
        device = self._layers[0].weight.device if self._layers else torch.device("cpu")
        self._curvature = {int(gi): r.to(device, copy=True)
                           for gi, r in ours.get("curvature", {}).items()}
        self.reduction = str(ours["reduction"])
        self.factor = str(ours["factor"])
        for layer in self._layers:
            layer.running.reduction = self.reduction
        self._set_recording()


def _effective_lr(group: dict[str, Any]) -> float:
    """The learning rate of the steady-state step: with momentum ``μ`` the buffer of a constant
    direction ``d`` tends to ``(1 − dampening) d / (1 − μ)`` (Nesterov adds ``μ`` times it)."""
    lr, mu = group["lr"], group["momentum"]
    if not mu:
        return lr
    tail = (1 - group["dampening"]) / (1 - mu) if mu < 1 else float("inf")
    return lr * (1 + mu * tail if group["nesterov"] else tail)


def _warmup_updates(ema: float) -> int:
    """Updates on every step until the EMA holds ``⌈1/(1 − ema)⌉`` batches (its memory)."""
    return math.ceil(1.0 / (1.0 - ema) - 1e-9)


def _check_hyperparameters(hp: dict[str, Any], name: str) -> None:
    """Validate one param group's (or the defaults') hyperparameters."""

    def number(key: str, ok: Callable[[float], bool], what: str) -> None:
        v = hp[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not ok(v):
            raise ValueError(f"{name}: {key} must be {what}, got {v!r}")

    number("lr", lambda v: v > 0, "a positive finite number")
    number("damping", lambda v: v >= 0, "a finite number >= 0 (F + damping*I)")
    number("ema", lambda v: 0 <= v < 1, "in [0, 1) (F <- ema*F + (1-ema)*F_batch)")
    number("momentum", lambda v: v >= 0, "a finite number >= 0")
    number("dampening", lambda v: True, "a finite number")
    number("weight_decay", lambda v: v >= 0, "a finite number >= 0")
    if hp["kl_clip"] is not None:
        number("kl_clip", lambda v: v > 0, "a positive finite number or None")
    if hp.get("trust_region", "network") not in TRUST_REGIONS:
        raise ValueError(f"{name}: trust_region must be one of {TRUST_REGIONS}, got "
                         f"{hp['trust_region']!r}")
    if hp["damping_mode"] not in DAMPING_MODES:
        raise ValueError(f"{name}: damping_mode must be one of {DAMPING_MODES}, got "
                         f"{hp['damping_mode']!r}")
    if not isinstance(hp["nesterov"], bool):
        raise ValueError(f"{name}: nesterov must be a bool, got {hp['nesterov']!r}")
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise ValueError(f"{name}: nesterov needs momentum > 0 and dampening 0")
    for key in ("update_every", "inverse_every"):
        v = hp[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {key} must be an integer >= 1, got {v!r}")
