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

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ELU", "CenteredReLU", "LReLU", "ReLU", "SReLU", "ShiftedELU",
           "activation_names", "is_activation_name", "make_activation"]


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


class ShiftedELU(nn.Module):
    """``ELU(x) + shift``: the ELU moved up or down by a constant.

    The derivative is the ELU's (1 for ``x > 0``, ``alpha·eˣ`` otherwise), so the shape, the
    saturation and the backpropagated ``δ`` of a unit are unchanged for the same net input; only
    the mean of the activation (the next layer's incoming mean ``E_p(a)``) moves by ``shift``.
    This isolates the quantity the paper's Theorem 2 is about (the bias shift grows with the
    incoming mean) from everything else that differs between ELU and ReLU.  Built by name as
    ``elu+0.5``, ``elu-0.5``, ``elu+1`` (:func:`make_activation`).
    """

    biasshift_activation = True  # monitors select it (biasshift.monitor.is_activation)

    def __init__(self, shift: float = 0.0, alpha: float = 1.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"ShiftedELU: alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        if not (isinstance(shift, (int, float)) and shift == shift and abs(shift) != float("inf")):
            raise ValueError(f"ShiftedELU: shift must be a finite number, got {shift!r}")
        self.shift = float(shift)

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x, alpha=self.alpha) + self.shift

    def extra_repr(self) -> str:
        return f"shift={self.shift:g}, alpha={self.alpha}"


class CenteredReLU(nn.Module):
    """The ReLU minus a per-unit mean of its output: ``max(0, x) − m``, a mean-only centring.

    Centring the units' outputs goes back to Schraudolph (1998, "Centering neural network
    gradient factors") and Raiko, Valpola & LeCun (2012, "Deep learning made easier by linear
    transformations in perceptrons"); unlike batch normalisation there is no division by a
    standard deviation and no learned scale or shift.  A unit is a feature (``x`` of shape
    ``(N, C)``) or a channel (``(N, C, ...)``: the mean runs over the batch and every position).

    * **Training mode**: ``m`` is the mean of ``max(0, x)`` over the mini-batch (gradients flow
      through it, as through batch normalisation's mean), so the unit's mean output on the batch
      is exactly 0; the buffer ``running_mean`` is updated as batch normalisation's,
      ``running_mean ← (1 − momentum)·running_mean + momentum·m`` (momentum 0.1), in place on
      the device (no host synchronisation).
    * **Evaluation mode**: ``m = running_mean`` (a fixed per-unit constant), so samples do not
      interact and the output is a deterministic function of the input (what
      :class:`~biasshift.BiasShiftProbe` and the evaluation passes need).

    The derivative with respect to ``x`` in evaluation mode is the ReLU's; the running mean
    starts at 0 (the first steps in evaluation mode are those of a plain ReLU).
    """

    biasshift_activation = True  # monitors select it (biasshift.monitor.is_activation)

    def __init__(self, num_features: int | None = None, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"CenteredReLU: momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.num_features = num_features
        # lazily sized on the first call unless num_features is given
        self.register_buffer("running_mean",
                             torch.zeros(num_features) if num_features else torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        key = prefix + "running_mean"
        if key in state_dict and state_dict[key].shape != self.running_mean.shape:
            self.running_mean = torch.zeros_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2:
            raise ValueError(f"CenteredReLU: expected input (N, C, ...) with units along dim 1, "
                             f"got shape {tuple(x.shape)}")
        C = x.shape[1]
        rm = self.running_mean
        if rm.numel() == 0:
            rm = self.running_mean = torch.zeros(C, dtype=x.dtype, device=x.device)
        elif rm.numel() != C:
            raise ValueError(f"CenteredReLU: {rm.numel()} units in running_mean but the input "
                             f"has {C} along dim 1 (shape {tuple(x.shape)})")
        y = F.relu(x)
        view = (1, C) + (1,) * (x.ndim - 2)
        if self.training:
            dims = [0, *range(2, x.ndim)]
            m = y.mean(dim=dims)
            with torch.no_grad():
                rm.mul_(1 - self.momentum).add_(m.detach().to(rm.dtype), alpha=self.momentum)
            return y - m.reshape(view)
        return y - rm.to(y.dtype).reshape(view)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "elu": ELU,
    "relu": ReLU,
    "lrelu": LReLU,
    "srelu": SReLU,
}


def activation_names() -> list[str]:
    """The names :func:`make_activation` accepts, in the paper's order."""
    return list(ACTIVATIONS)


_SHIFTED_ELU = re.compile(r"^elu([+-](?:\d+(?:\.\d*)?|\.\d+))$")


def _shifted_elu_shift(key: str) -> float | None:
    m = _SHIFTED_ELU.match(key)
    return None if m is None else float(m.group(1))


def is_activation_name(name: str) -> bool:
    """Whether :func:`make_activation` accepts ``name``: one of :func:`activation_names` or a
    control (``elu+c``/``elu-c`` for a number ``c``, ``crelu``)."""
    key = name.strip().lower()
    return key in ACTIVATIONS or key == "crelu" or _shifted_elu_shift(key) is not None


def make_activation(name: str, **kwargs: float) -> nn.Module:
    """Build an activation unit by name (``"elu"``, ``"relu"``, ``"lrelu"``, ``"srelu"``, and
    the controls ``"elu+c"`` / ``"elu-c"`` (:class:`ShiftedELU`) and ``"crelu"``
    (:class:`CenteredReLU`)).

    Keyword arguments go to the unit's constructor: ``alpha`` for ELU, ``negative_slope`` for
    LReLU, ``shift`` for SReLU, ``momentum`` for the centred ReLU.  Names are case-insensitive.
    """
    key = name.strip().lower()
    shift = _shifted_elu_shift(key)
    if shift is not None or key == "crelu":
        try:
            return ShiftedELU(shift, **kwargs) if shift is not None else CenteredReLU(**kwargs)
        except TypeError as err:
            raise TypeError(f"make_activation({name!r}): {err}") from None
    if key not in ACTIVATIONS:
        raise KeyError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}, elu+c, crelu "
            f"(keyword parameters: elu alpha=, lrelu negative_slope=, srelu shift=)"
        )
    try:
        return ACTIVATIONS[key](**kwargs)
    except TypeError as err:
        raise TypeError(f"make_activation({name!r}): {err}") from None
