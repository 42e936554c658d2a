"""Small torch helpers shared by the monitor, the probe and the Fisher estimators."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None
