"""Optimisers built on the ELU paper's unit natural gradient.

* :class:`UnitNaturalGradient` — every ``nn.Linear``/``nn.Conv2d`` unit's ``(bias, weight)``
  gradient preconditioned by its damped, running empirical unit Fisher (Theorem 1, by a
  Cholesky solve of the whole block), with relative damping, a KL trust region and SGD's
  momentum/weight decay; all other parameters plain SGD.
* :class:`DivergenceError` — what it raises when a step is non-finite or the Fisher explodes.
* :class:`RunningLayerFisher` — the hooks and the EMA behind it, usable on their own.
* :class:`BlockFactors` — batched Cholesky (or inverse) factors of damped unit blocks.
"""

from __future__ import annotations

from biasshift.optim.block_solve import BlockFactors
from biasshift.optim.running_fisher import RunningLayerFisher
from biasshift.optim.unit_natural_gradient import DivergenceError, UnitNaturalGradient

__all__ = ["BlockFactors", "DivergenceError", "RunningLayerFisher", "UnitNaturalGradient"]
