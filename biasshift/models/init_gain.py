"""Initialisation gain from an activation's second moment (an option; the paper uses He's).

He et al. (2015) keep the second moment of the net inputs constant from layer to layer: a layer
fed by units ``a = f(z)`` with ``z ~ N(0, q)`` gets ``E[net^2] = fan_in Var(w) E[f(z)^2]``, and
for the ReLU ``E[f(z)^2] = q / 2``, hence ``Var(w) = 2 / fan_in``.  The ELU paper uses this He
initialisation for every unit (Section 4), but the other units have other second moments
(for ``z ~ N(0, 1)``):

========  =========================================================================  =======
unit      ``m_f = E[f(z)^2]``                                                        value
========  =========================================================================  =======
ReLU      1/2                                                                        0.5
LReLU     (1 + α²) / 2, α = 0.1                                                      0.505
ELU       1/2 + e² Φ(−2) − 2 e^{1/2} Φ(−1) + 1/2  (α = 1)                             0.6449
SReLU     1/2 + [Φ(0) − Φ(−1) − φ(1)] + Φ(−1)                                        0.7580
========  =========================================================================  =======

so that with He's gain the ELU and SReLU nets amplify the second moment by ``2 m_f`` ≈ 1.29 and
1.52 per layer.  :func:`second_moment_init_` instead gives every weight fed by the activation
``f`` the variance ``1 / (fan_in m_f)`` (``E[net^2] = 1`` when ``E[z^2] = 1``), i.e. He's
weights scaled by ``sqrt(1 / (2 m_f))``; layers fed by the data or by a linear unit (the
autoencoder's code layer) keep He's.  For the ReLU it is exactly He's initialisation.

:func:`activation_second_moment` computes ``m_f`` by Gauss–Legendre quadrature of
``f(z)^2 φ(z)`` on ``[-12, 12]`` split at the kinks ``-1`` and ``0`` (each piece is smooth, so
the rule converges exponentially; the tails beyond 12 weigh below 1e-30).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from biasshift.activations import make_activation

__all__ = ["activation_second_moment", "second_moment_gain", "second_moment_init_"]

_BREAKS = (-12.0, -1.0, 0.0, 12.0)


@lru_cache(maxsize=64)
def _second_moment(name: str, kwargs: tuple[tuple[str, float], ...], nodes: int) -> float:
    act = make_activation(name, **dict(kwargs))
    x, w = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for lo, hi in itertools.pairwise(_BREAKS):
        z = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
        with torch.no_grad():
            f = act(torch.from_numpy(z)).numpy()
        phi = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        total += 0.5 * (hi - lo) * float(np.sum(w * f * f * phi))
    return total


def activation_second_moment(name: str, nodes: int = 200, **act_kwargs: float) -> float:
    """``E[f(z)^2]`` for ``z ~ N(0, 1)`` and the activation ``name`` (quadrature, float64)."""
    return _second_moment(name, tuple(sorted(act_kwargs.items())), int(nodes))


def second_moment_gain(name: str, **act_kwargs: float) -> float:
    """The factor ``sqrt(1 / (2 m_f))`` that turns a He weight into a second-moment one."""
    return math.sqrt(1.0 / (2.0 * activation_second_moment(name, **act_kwargs)))


def second_moment_init_(model: nn.Sequential, activation: str, **act_kwargs: float
                        ) -> nn.Sequential:
    """Scale, in place, every He-initialised Linear weight that is fed by ``activation`` units.

    ``model`` is a :class:`torch.nn.Sequential` (as built by :mod:`biasshift.models.mlp`); a
    Linear layer counts as fed by the activation when the module before it (skipping nothing)
    is not a Linear layer, a ``Flatten`` or the model's start.  Returns ``model``.
    """
    gain = second_moment_gain(activation, **act_kwargs)
    prev: nn.Module | None = None
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear) and prev is not None and not isinstance(
                    prev, (nn.Linear, nn.Flatten)):
                m.weight.mul_(gain)
            prev = m
    return model
