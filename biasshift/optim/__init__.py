"""Optimisers built on the ELU paper's unit natural gradient.

* :class:`UnitNaturalGradient` — every ``nn.Linear``/``nn.Conv2d`` unit's ``(bias, weight)``
  gradient preconditioned by its damped, running empirical unit Fisher (Theorem 1's block
  formula, batched over units); all other parameters plain SGD.
* :class:`RunningLayerFisher` — the hooks and the EMA behind it, usable on their own.
"""

from __future__ import annotations

from biasshift.optim.running_fisher import RunningLayerFisher
from biasshift.optim.unit_natural_gradient import UnitNaturalGradient

__all__ = ["RunningLayerFisher", "UnitNaturalGradient"]
