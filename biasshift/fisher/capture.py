"""Which layers a :class:`~biasshift.UnitFisher` tracks, and the hooks that capture them.

Each supported layer type is one :class:`LayerAdapter` in a registry (:data:`ADAPTERS`,
:func:`register_adapter`): its incoming vectors, its δ rows, its unit view and its input
checks.  ``incoming``, ``delta_rows`` and ``resolve_layers`` dispatch on it, so a new layer
type is one class.

For every tracked layer one forward pass records

* the incoming vectors ``ã = (1, a)`` of every unit, as ``(N, groups, L, n+1)`` (bias column
  first; ``L`` positions per sample; no bias column for layers without bias):

  - ``nn.Linear`` on ``(N, F)``: ``L = 1``; on ``(N, *, F)`` the extra dimensions are flattened
    into ``L`` positions (treated exactly like conv positions);
  - ``nn.Conv2d`` (and ``nn.Conv1d``, as a 2-d convolution of height 1): the unfolded
    patches (:func:`torch.nn.functional.unfold`, honouring stride, padding — also ``'same'``
    and non-zero padding modes — dilation and groups).  A unit is an
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
from biasshift.hooks import Trace

__all__ = [
    "ADAPTERS",
    "SUPPORTED_LAYERS",
    "Capture",
    "Captured",
    "Conv1dAdapter",
    "Conv2dAdapter",
    "LayerAdapter",
    "LayerSelection",
    "LayerSpec",
    "LinearAdapter",
    "adapter_for",
    "delta_rows",
    "incoming",
    "incoming_checked",
    "nonfinite_flag",
    "register_adapter",
    "resolve_layers",
]

LayerSelection = Union[None, Iterable[Union[str, nn.Module]], Callable[[str, nn.Module], bool]]  # noqa: UP007


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer: ``units`` output units in ``groups`` groups, ``n`` inputs per unit.

    ``kind`` names the layer's :class:`LayerAdapter` (``"linear"``, ``"conv1d"``, ``"conv2d"``).
    """

    name: str
    module: nn.Module
    kind: str
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

    @property
    def adapter(self) -> LayerAdapter:
        """The adapter of the layer's type."""
        return ADAPTERS[self.kind]


class LayerAdapter:
    """How a layer type looks to the unit Fisher: one subclass per supported layer type.

    A unit is one output feature (``nn.Linear``) or channel (convolutions); its incoming vector
    is the input (patch) that ``weight[unit].flatten()`` multiplies.  Subclasses set
    ``layer_type`` and ``kind`` and implement :meth:`spec`, :meth:`check_input`,
    :meth:`rows` and :meth:`unit_view`; :func:`register_adapter` adds them to the registry.
    """

    layer_type: type[nn.Module] = nn.Module
    kind = ""

    def spec(self, name: str, module: nn.Module) -> LayerSpec:
        raise NotImplementedError

    def check_input(self, spec: LayerSpec, x: Tensor) -> None:
        """Raise a clear error for an input this layer type cannot be read from."""

    def rows(self, spec: LayerSpec, x: Tensor) -> Tensor:
        """The incoming vectors without the bias column: ``(N, groups, L, n)``."""
        raise NotImplementedError

    def unit_view(self, spec: LayerSpec, out: Tensor) -> Tensor:
        """A layer-output-shaped tensor as ``(N, L, units)`` (positions in :meth:`rows`'s
        order)."""
        raise NotImplementedError

    def net_change(self, spec: LayerSpec, x: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
        """The change of the layer's output on input ``x`` when its weight changes by ``dw`` and
        its bias by ``db`` (``None``: unchanged): the layer's forward with ``(dw, db)`` as its
        parameters, since the output is linear in them."""
        params = {"weight": dw}
        if getattr(spec.module, "bias", None) is not None:
            params["bias"] = db if db is not None else torch.zeros_like(spec.module.bias)
        return torch.func.functional_call(spec.module, params, (x,))


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on ``(N, F)`` (``L = 1``) or ``(N, *, F)`` (the extra dimensions are
    positions)."""

    layer_type = nn.Linear
    kind = "linear"

    def spec(self, name: str, module: nn.Module) -> LayerSpec:
        assert isinstance(module, nn.Linear)
        return LayerSpec(name, module, self.kind, module.out_features, 1, module.in_features,
                         module.bias is not None)

    def check_input(self, spec: LayerSpec, x: Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(
                f"layer {spec.name!r}: input of shape {tuple(x.shape)} has no batch dimension; "
                "UnitFisher needs (N, ..., in_features) with dim 0 = samples"
            )

    def rows(self, spec: LayerSpec, x: Tensor) -> Tensor:
        return x.detach().reshape(x.shape[0], 1, -1, spec.n)

    def unit_view(self, spec: LayerSpec, out: Tensor) -> Tensor:
        return out.reshape(out.shape[0], -1, spec.units)

    def net_change(self, spec: LayerSpec, x: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
        return Fn.linear(x, dw, db)


class _ConvAdapter(LayerAdapter):
    """Shared by the convolutions: unit = output channel, incoming vector = the unfolded
    patch of its group's input channels (stride, padding incl. ``'same'`` and non-zero modes,
    dilation and groups honoured), in the order of ``weight[unit].flatten()``."""

    dims = 2

    def spec(self, name: str, module: nn.Module) -> LayerSpec:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        g = module.groups
        k = 1
        for s in module.kernel_size:
            k *= s
        return LayerSpec(name, module, self.kind, module.out_channels, g,
                         module.in_channels // g * k, module.bias is not None)

    def check_input(self, spec: LayerSpec, x: Tensor) -> None:
        if x.ndim != self.dims + 2:
            shape = "(N, C, L)" if self.dims == 1 else "(N, C, H, W)"
            raise ValueError(
                f"layer {spec.name!r}: {type(spec.module).__name__} input of shape "
                f"{tuple(x.shape)}; UnitFisher needs a batch {shape} with dim 0 = samples"
            )

    def _patches(self, m: nn.Module, x: Tensor) -> Tensor:
        padding = m.padding
        if isinstance(padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = Fn.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * self.dims
        if self.dims == 1:  # a 1-d convolution is a 2-d one on (N, C, 1, L)
            return Fn.unfold(x.unsqueeze(-2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                             padding=(0, padding[0]), stride=(1, m.stride[0]))
        return Fn.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding,
                         stride=m.stride)

    def rows(self, spec: LayerSpec, x: Tensor) -> Tensor:
        cols = self._patches(spec.module, x.detach())
        N, _, L = cols.shape
        return cols.reshape(N, spec.groups, spec.n, L).transpose(-1, -2)

    def unit_view(self, spec: LayerSpec, out: Tensor) -> Tensor:
        return out.movedim(1, -1).reshape(out.shape[0], -1, spec.units)

    def net_change(self, spec: LayerSpec, x: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
        return spec.module._conv_forward(x, dw, db)  # type: ignore[operator]


class Conv2dAdapter(_ConvAdapter):
    """``nn.Conv2d`` on ``(N, C, H, W)``."""

    layer_type = nn.Conv2d
    kind = "conv2d"
    dims = 2


class Conv1dAdapter(_ConvAdapter):
    """``nn.Conv1d`` on ``(N, C, L)``."""

    layer_type = nn.Conv1d
    kind = "conv1d"
    dims = 1


#: the registry: ``kind -> adapter`` (see :func:`register_adapter`)
ADAPTERS: dict[str, LayerAdapter] = {}
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = ()


def register_adapter(adapter: LayerAdapter) -> LayerAdapter:
    """Add a layer type to every unit-Fisher consumer (UnitFisher, BiasShiftProbe, the
    optimizer): one :class:`LayerAdapter` instance per type."""
    global SUPPORTED_LAYERS
    ADAPTERS[adapter.kind] = adapter
    SUPPORTED_LAYERS = tuple(a.layer_type for a in ADAPTERS.values())
    return adapter


for _adapter in (LinearAdapter(), Conv2dAdapter(), Conv1dAdapter()):
    register_adapter(_adapter)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of ``module``'s type (the first registered one it is an instance of)."""
    for a in ADAPTERS.values():
        if isinstance(module, a.layer_type):
            return a
    return None


def _supported_names() -> str:
    return ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)


def _spec(name: str, module: nn.Module) -> LayerSpec:
    if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is not initialised yet: its in_features "
            "(in_channels) are only known after the first forward. Run one forward pass, e.g. "
            "model(x[:1]), before creating UnitFisher, BiasShiftTracker or UnitNaturalGradient"
        )
    adapter = adapter_for(module)
    if adapter is None:
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}; UnitFisher supports "
            f"{_supported_names()} (and their subclasses). Choose supported layers with "
            "layers=[...]"
        )
    return adapter.spec(name, module)


def resolve_layers(model: nn.Module, layers: LayerSelection = None) -> dict[str, LayerSpec]:
    """Resolve ``layers`` to ``{qualified name: LayerSpec}`` in ``named_modules()`` order.

    ``None`` selects every layer of a supported type (:data:`SUPPORTED_LAYERS`); an iterable
    holds names and/or module objects; a callable is a predicate ``(name, module) -> bool`` over
    the supported layers.

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
    return incoming_checked(spec, x, dtype, sanitize=False)[0]


def nonfinite_flag(t: Tensor) -> Tensor:
    """0-dim bool: ``t`` holds a NaN or ±Inf (no host sync).  One read pass without a
    temporary (:func:`torch.aminmax`: a NaN propagates into both, an Inf is the min or max),
    cheaper than ``~isfinite(t).all()``, which writes and reads a boolean tensor of ``t``'s
    size, and exact (a sum could overflow)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def incoming_checked(spec: LayerSpec, x: Tensor, dtype: torch.dtype, *,
                     sanitize: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`incoming` and a 0-dim bool flag "non-finite input" (no host sync).

    With ``sanitize`` the copy into the result is :func:`torch.nan_to_num` (NaN and ±Inf to 0):
    the one pass that builds ``ã`` also cleans it, so nothing non-finite reaches a sum.
    """
    adapter = spec.adapter
    adapter.check_input(spec, x)
    a = adapter.rows(spec, x)
    # the flag of the layer's input itself: the rows hold its values (and padding), and it is
    # contiguous and smaller than the unfolded patches
    bad = nonfinite_flag(x.detach()) if sanitize else torch.zeros((), dtype=torch.bool,
                                                                   device=a.device)
    N, g, L, _ = a.shape
    out = torch.empty(N, g, L, spec.n1, dtype=dtype, device=a.device)
    body = out[..., 1:] if spec.has_bias else out
    if spec.has_bias:
        out[..., 0] = 1
    if sanitize:
        torch.nan_to_num(a.to(dtype) if a.dtype != dtype else a, nan=0.0, posinf=0.0,
                         neginf=0.0, out=body)
    else:
        body.copy_(a)
    return out, bad


def delta_rows(spec: LayerSpec, grad_out: Tensor) -> Tensor:
    """``δ`` of the layer's output gradient as ``(N, L, units)`` (positions in unfold order)."""
    return spec.adapter.unit_view(spec, grad_out)


@dataclass
class Captured:
    """What one forward pass recorded for a layer."""

    x: Tensor | None = None
    bad_x: Tensor | None = None  # 0-dim bool: the input held NaN/Inf (zeroed in ``x``)
    edge: GradientEdge | Tensor | None = None
    out_shape: tuple[int, ...] = ()
    calls: int = 0


class Capture:
    """Context manager: forward hooks on the tracked layers that record :class:`Captured`
    (owned by a :class:`~biasshift.hooks.Trace`).

    >>> with Capture(model, specs, torch.float64) as cap:  # doctest: +SKIP
    ...     out = model(x)
    ...     cap.check_after_forward(batch_size)
    """

    def __init__(self, model: nn.Module, specs: dict[str, LayerSpec], dtype: torch.dtype) -> None:
        self.model = model
        self.specs = specs
        self.dtype = dtype
        self.records: dict[str, Captured] = {}
        self._trace = Trace({n: s.module for n, s in specs.items()}, forward=self._hook)

    def __enter__(self) -> Capture:
        self.records = {n: Captured() for n in self.specs}
        self._trace.add()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        self._trace.remove()

    def _hook(self, name: str, _mod: nn.Module, inputs: tuple[object, ...], out: object) -> object:
        spec = self.specs[name]
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
        rec.x, rec.bad_x = incoming_checked(spec, x, self.dtype)
        rec.out_shape = tuple(out.shape)
        if out.requires_grad:
            rec.edge = get_gradient_edge(out)
            return None
        # Nothing upstream requires grad (frozen layers): make the output a leaf we can
        # differentiate with respect to, and hand the model a copy it may modify in place.
        leaf = out.detach().requires_grad_()
        rec.edge = leaf
        return leaf.clone()

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
