"""biasshift: measure the ELU paper's bias shift and unit natural gradient on any PyTorch model.

Clevert, Unterthiner & Hochreiter, "Fast and Accurate Deep Network Learning by Exponential Linear
Units (ELUs)", ICLR 2016 (arXiv:1511.07289).

Public entry points (imported lazily, so ``import biasshift`` stays fast):

* :class:`ActivationMonitor` — per-unit activation statistics of any model while it trains;
* :func:`probe_statistics` — the paper's exact per-unit mean/median on a fixed probe set;
* :class:`UnitFisher` and :mod:`biasshift.theory` — unit Fisher blocks and Theorems 1-2;
* :class:`BiasShiftProbe` — the bias shift of one update and the gradient/natural-gradient gap,
  measured in any training loop with any optimizer;
* :class:`BiasShiftTracker` — a trainer plug-in that measures the bias shift and the
  gradient/natural-gradient gap during training;
* :class:`UnitNaturalGradient` — the unit natural gradient (Theorem 1) as an optimizer;
* :func:`make_activation` and the units ``ELU``, ``ReLU``, ``LReLU``, ``SReLU``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ActivationMonitor": "biasshift.monitor",
    "probe_statistics": "biasshift.monitor",
    "ProbeStatistics": "biasshift.monitor",
    "UnitFisher": "biasshift.fisher",
    "BiasShiftProbe": "biasshift.fisher.bias_shift_probe",
    "UnitNaturalGradient": "biasshift.optim",
    "BiasShiftTracker": "biasshift.train",
    "theory": "biasshift.theory",
    "make_activation": "biasshift.activations",
    "ELU": "biasshift.activations",
    "ReLU": "biasshift.activations",
    "LReLU": "biasshift.activations",
    "SReLU": "biasshift.activations",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == module.__name__.rsplit(".", 1)[-1] else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'biasshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
