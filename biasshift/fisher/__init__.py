"""Unit Fisher estimators for any PyTorch model (the ELU paper's Section 2, measurable).

* :class:`UnitFisher` — accumulate per-unit Fisher blocks of ``nn.Linear``/``nn.Conv2d`` units,
  read the blocks, the moments, the unit natural gradient and a per-unit report;
* :class:`BiasShiftProbe` — the bias shift of one update and the gradient/natural-gradient gap
  in any training loop;
* :mod:`biasshift.theory` — the Section 2 formulas (Theorems 1 and 2) as batched functions.
"""

from biasshift.fisher.bias_shift_probe import BiasShiftProbe, Measurement
from biasshift.fisher.capture import SUPPORTED_LAYERS, LayerAdapter, LayerSpec, resolve_layers
from biasshift.fisher.likelihood import (
    FISHER_KINDS,
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    make_likelihood,
)
from biasshift.fisher.unit_fisher import LayerMoments, LayerQuantities, NonFiniteError, UnitFisher
from biasshift.theory import SingularFisherError

__all__ = [
    "FISHER_KINDS",
    "LIKELIHOODS",
    "SUPPORTED_LAYERS",
    "Bernoulli",
    "BiasShiftProbe",
    "Categorical",
    "Gaussian",
    "LayerAdapter",
    "LayerMoments",
    "LayerQuantities",
    "LayerSpec",
    "Likelihood",
    "Measurement",
    "NonFiniteError",
    "SingularFisherError",
    "UnitFisher",
    "make_likelihood",
    "resolve_layers",
]
