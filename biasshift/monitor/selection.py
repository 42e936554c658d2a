"""Which modules of a model are monitored, and which dimension of their output holds the units.

Selecting modules (:func:`resolve_modules`)
    ``None`` selects every activation module (:func:`is_activation`: biasshift's units and torch's
    ReLU, ELU, LeakyReLU, GELU, Tanh, Sigmoid, SiLU, ...). An iterable may hold module objects
    and/or qualified names as in ``model.named_modules()``; a callable is a predicate
    ``(name, module) -> bool``.

The automatic unit-dimension rule (:func:`auto_unit_dim`)
    =============================  =================================================
    output shape                   units are
    =============================  =================================================
    ``(N, F)``                     dim 1 (Linear-style features)
    ``(N, C, H, W)``, 5-D          dim 1 (conv channels; every position is a sample)
    ``(N, C, L)`` after a conv     dim 1 (conv channels)
    ``(N, T, F)`` otherwise        dim 2 (sequence features; every step is a sample)
    =============================  =================================================

    A 3-D output is "after a conv" when the nearest layer registered before the module in
    ``model.named_modules()`` order (Linear, ConvNd, norms, pooling, embeddings, attention, RNNs)
    is a convolution, a 1-D pooling or a channel norm (BatchNorm1d, InstanceNorm1d, GroupNorm).
    Models whose registration order differs from their forward order, or functional code, should
    pass ``unit_dim`` explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Union

from torch import nn

from biasshift import activations as _ours
from biasshift._names import select_modules, unknown_name_error

__all__ = [
    "ACTIVATION_TYPES",
    "ModuleSpec",
    "UnitDimSpec",
    "auto_unit_dim",
    "is_activation",
    "resolve_modules",
    "resolve_unit_dims",
    "unit_dim_for",
]

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    _ours.ELU, _ours.ReLU, _ours.LReLU, _ours.SReLU,
    nn.ReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Softshrink,
    nn.Hardshrink, nn.GLU,
)

ModuleSpec = Union[None, Iterable[Union[str, nn.Module]], Callable[[str, nn.Module], bool]]  # noqa: UP007
UnitDimSpec = Union[None, int, Mapping[str, int]]  # noqa: UP007

# Layers whose kind tells the layout of a following 3-D activation: channel-first (N, C, L) after
# convolutions, 1-D pooling and channel norms; feature-last (N, T, F) after the others.
_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.GroupNorm,
)
_FEATURE_LAST: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm,
        getattr(nn, "RMSNorm", None), nn.MultiheadAttention, nn.RNNBase,
    ) if t is not None
)


def is_activation(module: nn.Module) -> bool:
    """True for modules that compute an elementwise unit activation (see ``ACTIVATION_TYPES``).

    A module of another type opts in with a class or instance attribute
    ``biasshift_activation = True``.
    """
    if isinstance(module, ACTIVATION_TYPES):
        return True
    return bool(getattr(module, "biasshift_activation", False))


def _monitorable_listing(model: nn.Module) -> str:
    named = [(n, m) for n, m in model.named_modules() if n]
    acts = [f"{n} ({type(m).__name__})" for n, m in named if is_activation(m)]
    rows = [f"{n} ({type(m).__name__})" for n, m in named]
    more = f" ... and {len(rows) - 40} more" if len(rows) > 40 else ""
    return (
        f"activation modules: {', '.join(acts) or '(none)'}; all modules: "
        f"{', '.join(rows[:40]) or '(the model has no submodules)'}{more}"
    )


def resolve_modules(model: nn.Module, modules: ModuleSpec = None) -> dict[str, nn.Module]:
    """Resolve a module selection to ``{qualified name: module}`` in ``named_modules()`` order.

    Raises:
        KeyError: a name is not in ``model.named_modules()`` (the message lists close names).
        ValueError: nothing matched, or a given module object is not part of ``model``
            (the message lists the monitorable module names).
        TypeError: ``modules`` is of an unsupported kind.
    """
    names = select_modules(
        model, modules, kind="module",
        default=lambda _n, m: is_activation(m), pool=lambda _n, _m: True,
        listing=lambda: "monitorable modules: " + _monitorable_listing(model),
    )
    if not names:
        what = ("no activation module found in the model" if modules is None
                else "the predicate matched no module" if callable(modules)
                else "the module list is empty")
        raise ValueError(f"{what}; nothing to monitor. Monitorable modules: "
                         + _monitorable_listing(model))
    named = dict(model.named_modules())
    return {n: named[n] for n in names}


def auto_unit_dim(model: nn.Module, name: str) -> Callable[[int], int]:
    """The automatic rule for module ``name``: a function from output ``ndim`` to the unit dim.

    See the module docstring for the rule. Raises :class:`ValueError` (at the first forward,
    when the rule is applied) for outputs with fewer than 2 dimensions.
    """
    channel_first_1d = False
    before: list[nn.Module] = []
    for n, m in model.named_modules():
        if n == name:
            break
        before.append(m)
    for m in reversed(before):
        if isinstance(m, _CHANNEL_FIRST):
            channel_first_1d = True
            break
        if isinstance(m, _FEATURE_LAST):
            break

    def rule(ndim: int) -> int:
        if ndim < 2:
            raise _no_unit_dim(name, ndim)
        if ndim == 3 and not channel_first_1d:
            return 2
        return 1

    return rule


def resolve_unit_dims(
    model: nn.Module, names: Iterable[str], unit_dim: UnitDimSpec = None
) -> dict[str, Callable[[int], int]]:
    """Per module name, a function from output ``ndim`` to the (non-negative) unit dimension.

    ``unit_dim`` is None (automatic rule), an int for every module, or a mapping name -> int
    (modules not in the mapping use the automatic rule). Unknown names in the mapping raise
    :class:`KeyError`.
    """
    names = list(names)
    if isinstance(unit_dim, Mapping):
        for key in unit_dim:
            if key not in names:
                raise unknown_name_error("monitored module", key, names)
    out: dict[str, Callable[[int], int]] = {}
    for n in names:
        fixed = unit_dim.get(n) if isinstance(unit_dim, Mapping) else unit_dim
        if fixed is None:
            out[n] = auto_unit_dim(model, n)
        else:
            if isinstance(fixed, bool) or not isinstance(fixed, int):
                raise TypeError(f"unit_dim for module {n!r} must be an int, got {fixed!r}")
            out[n] = _fixed_rule(n, fixed)
    return out


def _no_unit_dim(name: str, ndim: int) -> ValueError:
    """The error for a 0-d or 1-d output: dim 0 is the batch, so no dimension is left for units
    (no ``unit_dim`` can fix that)."""
    shape = "a scalar" if ndim == 0 else "one value per sample (N,)"
    return ValueError(
        f"module {name!r}: output has {ndim} dimension(s) ({shape}); dim 0 is the batch, so no "
        "dimension is left for units and no unit_dim can help (expected (N, F), (N, C, ...) or "
        "(N, T, F)). Monitor the module before the output is squeezed or reduced, or make it "
        "return (N, 1)"
    )


def _fixed_rule(name: str, dim: int) -> Callable[[int], int]:
    def rule(ndim: int) -> int:
        if ndim < 2:
            raise _no_unit_dim(name, ndim)
        if not -ndim <= dim < ndim or dim % ndim == 0:
            last = ndim - 1
            choices = "1 or -1" if last == 1 else f"1..{last} or -{last}..-1"
            raise ValueError(
                f"unit_dim={dim} is out of range for module {name!r} whose output has {ndim} "
                f"dimensions (dim 0 is the batch); choose {choices}"
            )
        return dim % ndim

    return rule


def unit_dim_for(name: str, shape: tuple[int, ...], rule: Callable[[int], int]) -> int:
    """Apply ``rule`` to an output ``shape``, re-raising errors with the module name and shape."""
    try:
        return rule(len(shape))
    except ValueError as err:
        raise ValueError(f"{err} (output shape {tuple(shape)})") from None
