"""Which layers a :class:`~biasshift.UnitFisher` tracks, and the hooks that capture them.

For every tracked layer one forward pass records

* the incoming vectors ``ã = (1, a)`` of every unit, as ``(N, groups, L, n+1)`` (bias column
  first; ``L`` positions per sample; no bias column for layers without bias):

  - ``nn.Linear`` on ``(N, F)``: ``L = 1``; on ``(N, *, F)`` the extra dimensions are flattened
    into ``L`` positions (treated exactly like conv positions);
  - ``nn.Conv2d``: the unfolded patches (:func:`torch.nn.functional.unfold`, honouring stride,
    padding — also ``'same'`` and non-zero padding modes — dilation and groups).  A unit is an
    output channel; its incoming vector has ``C_in/groups * kh * kw`` entries in the order of
    ``weight[unit].flatten()``.  Output channel ``o`` belongs to group ``o // (C_out/groups)``;

* a :class:`torch.autograd.graph.GradientEdge` of the layer's output, so that
  :func:`torch.autograd.grad` later returns ``δ = ∂ ln p / ∂net`` for every unit, sample and
  position in one backward pass, even when a later in-place operation (``ReLU(inplace=True)``)
  overwrites the output tensor.

:class:`Capture` owns its hook handles: they are removed on exit, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from biasshift._names import select_modules

__all__ = [
    "SUPPORTED_LAYERS",
    "Capture",
    "Captured",
    "LayerSelection",
    "LayerSpec",
    "delta_rows",
    "incoming",
    "resolve_layers",
]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

LayerSelection = Union[None, Iterable[Union[str, nn.Module]], Callable[[str, nn.Module], bool]]  # noqa: UP007


def _supported_names() -> str:
    return ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer: ``units`` output units in ``groups`` groups, ``n`` inputs per unit."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    units: int
    groups: int
    n: int
    has_bias: bool

    @property
    def n1(self) -> int:
        """Size of a unit block: ``n + 1`` with a bias, ``n`` without."""
        return self.n + int(self.has_bias)

    @property
    def units_per_group(self) -> int:
        return self.units // self.groups

    def group_of(self, unit: int) -> int:
        return unit // self.units_per_group


def _spec(name: str, module: nn.Module) -> LayerSpec:
    if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is not initialised yet: its in_features "
            "(in_channels) are only known after the first forward. Run one forward pass, e.g. "
            "model(x[:1]), before creating UnitFisher, BiasShiftTracker or UnitNaturalGradient"
        )
    if isinstance(module, nn.Linear):
        return LayerSpec(name, module, "linear", module.out_features, 1, module.in_features,
                         module.bias is not None)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        g = module.groups
        return LayerSpec(name, module, "conv2d", module.out_channels, g,
                         module.in_channels // g * kh * kw, module.bias is not None)
    raise TypeError(
        f"layer {name!r} is a {type(module).__name__}; UnitFisher supports {_supported_names()} "
        "(and their subclasses). Choose supported layers with layers=[...]"
    )


def resolve_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, LayerSpec]:
    """Resolve ``layers`` to ``{qualified name: LayerSpec}`` in ``named_modules()`` order.

    ``None`` selects every ``nn.Linear`` and ``nn.Conv2d``; an iterable holds names and/or
    module objects; a callable is a predicate ``(name, module) -> bool`` over the supported
    layers.

    Raises:
        KeyError: an unknown name (the message lists close names).
        TypeError: a named layer of an unsupported type (the message lists the supported ones).
        ValueError: nothing selected, a module that is not part of ``model``, or a lazy layer
            (``LazyLinear``) not initialised by a first forward yet.
    """
    named = {n: m for n, m in model.named_modules() if n}
    supported = {n: m for n, m in named.items() if isinstance(m, SUPPORTED_LAYERS)}
    chosen = select_modules(
        model, layers, kind="layer",
        default=lambda _n, m: isinstance(m, SUPPORTED_LAYERS),
        pool=lambda _n, m: isinstance(m, SUPPORTED_LAYERS),
        listing=lambda: f"supported layers of the model: {', '.join(supported) or '(none)'}",
    )
    if not chosen:
        raise ValueError(
            f"no layer selected: UnitFisher tracks {_supported_names()} layers; the model's "
            f"supported layers are: {', '.join(supported) or '(none)'}"
        )
    return {n: _spec(n, named[n]) for n in chosen}


def incoming(spec: LayerSpec, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The incoming vectors ``ã`` of every unit: ``(N, groups, L, n1)``, bias column first."""
    m = spec.module
    if spec.kind == "linear":
        if x.ndim < 2:
            raise ValueError(
                f"layer {spec.name!r}: input of shape {tuple(x.shape)} has no batch dimension; "
                "UnitFisher needs (N, ..., in_features) with dim 0 = samples"
            )
        N = x.shape[0]
        a = x.detach().reshape(N, 1, -1, spec.n)
    else:
        if x.ndim != 4:
            raise ValueError(
                f"layer {spec.name!r}: Conv2d input of shape {tuple(x.shape)}; UnitFisher needs "
                "a batch (N, C, H, W) with dim 0 = samples"
            )
        assert isinstance(m, nn.Conv2d)
        x = x.detach()
        padding = m.padding
        if isinstance(padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = Fn.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        cols = Fn.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        N, _, L = cols.shape
        a = cols.reshape(N, spec.groups, spec.n, L).transpose(-1, -2)
    N, g, L, _ = a.shape
    out = torch.empty(N, g, L, spec.n1, dtype=dtype, device=a.device)
    if spec.has_bias:
        out[..., 0] = 1
        out[..., 1:] = a
    else:
        out.copy_(a)
    return out


def delta_rows(spec: LayerSpec, grad_out: Tensor) -> Tensor:
    """``δ`` of the layer's output gradient as ``(N, L, units)`` (positions in unfold order)."""
    N = grad_out.shape[0]
    if spec.kind == "linear":
        return grad_out.reshape(N, -1, spec.units)
    return grad_out.permute(0, 2, 3, 1).reshape(N, -1, spec.units)


@dataclass
class Captured:
    """What one forward pass recorded for a layer."""

    x: Tensor | None = None
    edge: GradientEdge | Tensor | None = None
    out_shape: tuple[int, ...] = ()
    calls: int = 0


class Capture:
    """Context manager: forward hooks on the tracked layers that record :class:`Captured`.

    >>> with Capture(model, specs, torch.float64) as cap:  # doctest: +SKIP
    ...     out = model(x)
    ...     cap.check_after_forward(batch_size)
    """

    def __init__(self, model: nn.Module, specs: dict[str, LayerSpec], dtype: torch.dtype) -> None:
        self.model = model
        self.specs = specs
        self.dtype = dtype
        self.records: dict[str, Captured] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Capture:
        self.records = {n: Captured() for n in self.specs}
        try:
            for name, spec in self.specs.items():
                self._handles.append(spec.module.register_forward_hook(self._hook(name, spec)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str, spec: LayerSpec):
        def hook(_mod: nn.Module, inputs: tuple[object, ...], out: object) -> object:
            rec = self.records[name]
            rec.calls += 1
            if rec.calls > 1:
                raise RuntimeError(
                    f"layer {name!r} was called more than once in one forward pass (weight "
                    "sharing); UnitFisher needs one call per layer and forward. Track only the "
                    "layers that are called once (layers=[...])"
                )
            if not inputs or not isinstance(inputs[0], Tensor):
                raise TypeError(f"layer {name!r}: first input is not a tensor")
            if not isinstance(out, Tensor):
                raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
            x = inputs[0]
            # A copy made now: later in-place changes of the input cannot alter it.
            rec.x = incoming(spec, x, self.dtype)
            rec.out_shape = tuple(out.shape)
            if out.requires_grad:
                rec.edge = get_gradient_edge(out)
                return None
            # Nothing upstream requires grad (frozen layers): make the output a leaf we can
            # differentiate with respect to, and hand the model a copy it may modify in place.
            leaf = out.detach().requires_grad_()
            rec.edge = leaf
            return leaf.clone()

        return hook

    def check_after_forward(self, batch_size: int) -> None:
        """Every layer was called, with ``batch_size`` samples."""
        for name, rec in self.records.items():
            if rec.calls == 0 or rec.x is None:
                raise RuntimeError(
                    f"layer {name!r} was not called in the forward pass; is it part of the "
                    "model's forward? Track only layers that are used (layers=[...])"
                )
            if rec.x.shape[0] != batch_size or rec.out_shape[0] != batch_size:
                raise ValueError(
                    f"layer {name!r} saw a batch of {rec.x.shape[0]} samples (output shape "
                    f"{rec.out_shape}) but the targets hold {batch_size}; UnitFisher needs dim 0 "
                    "= samples in every tracked layer (sequence-first layouts are not supported)"
                )
