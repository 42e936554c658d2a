"""The activation units compared in the ELU paper (Clevert et al., ICLR 2016, Section 3 and 4).

=========  ===================================  =====================================
name       f(x)                                 f'(x)
=========  ===================================  =====================================
``elu``    x if x > 0 else α(eˣ − 1), α = 1     1 if x > 0 else f(x) + α  (= α eˣ)
``relu``   max(0, x)                            1 if x > 0 else 0
``lrelu``  x if x > 0 else αx, α = 0.1          1 if x > 0 else α
``srelu``  max(−1, x)  (the "shifted ReLU")     1 if x > −1 else 0
=========  ===================================  =====================================

All four are :class:`torch.nn.Module` subclasses built on torch's fused kernels, so they run on
any device and dtype, work under ``torch.compile`` and are recognised by
:func:`biasshift.monitor.selection.is_activation`.  :func:`make_activation` builds one by name::

    >>> make_activation("lrelu", negative_slope=0.2)
    LReLU(negative_slope=0.2)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ELU", "LReLU", "ReLU", "SReLU", "activation_names", "make_activation"]


class ELU(nn.Module):
    """Exponential linear unit, ``x`` for ``x > 0`` and ``alpha * (exp(x) - 1)`` otherwise.

    Its derivative is 1 for ``x > 0`` and ``f(x) + alpha`` otherwise (paper, Eq. 15), so the
    unit saturates to ``-alpha`` for large negative inputs.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"ELU: alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class ReLU(nn.Module):
    """Rectified linear unit ``max(0, x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class LReLU(nn.Module):
    """Leaky ReLU ``max(αx, x)`` with the paper's slope α = 0.1 by default."""

    def __init__(self, negative_slope: float = 0.1) -> None:
        super().__init__()
        if not 0 <= negative_slope < 1:
            raise ValueError(f"LReLU: negative_slope must be in [0, 1), got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class SReLU(nn.Module):
    """Shifted ReLU ``max(-1, x)``: a ReLU moved down so that its minimum is -1.

    ``shift`` generalises it to ``max(-shift, x)``; the paper uses ``shift = 1``.
    """

    def __init__(self, shift: float = 1.0) -> None:
        super().__init__()
        if not shift >= 0:
            raise ValueError(f"SReLU: shift must be >= 0, got {shift!r}")
        self.shift = float(shift)

    def forward(self, x: Tensor) -> Tensor:
        # torch.clamp passes the gradient where x >= -shift: the subgradient at the kink is 1.
        return torch.clamp(x, min=-self.shift)

    def extra_repr(self) -> str:
        return f"shift={self.shift}"


ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "elu": ELU,
    "relu": ReLU,
    "lrelu": LReLU,
    "srelu": SReLU,
}


def activation_names() -> list[str]:
    """The names :func:`make_activation` accepts, in the paper's order."""
    return list(ACTIVATIONS)


def make_activation(name: str, **kwargs: float) -> nn.Module:
    """Build an activation unit by name (``"elu"``, ``"relu"``, ``"lrelu"``, ``"srelu"``).

    Keyword arguments go to the unit's constructor: ``alpha`` for ELU, ``negative_slope`` for
    LReLU, ``shift`` for SReLU.  Names are case-insensitive.
    """
    key = name.strip().lower()
    if key not in ACTIVATIONS:
        raise KeyError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)} "
            f"(keyword parameters: elu alpha=, lrelu negative_slope=, srelu shift=)"
        )
    try:
        return ACTIVATIONS[key](**kwargs)
    except TypeError as err:
        raise TypeError(f"make_activation({name!r}): {err}") from None
