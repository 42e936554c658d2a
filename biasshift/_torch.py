"""Small torch helpers shared by the monitor, the probe and the Fisher estimators."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


class Workspace:
    """Reusable work tensors: one flat allocation per (slot, device, dtype), grown on demand.

    Code that needs large temporaries at every call (a reduction's work tensor, a probe
    measurement's blocks) takes them from here instead of allocating fresh ones: on the CPU a
    fresh large tensor is fresh pages, and page-faulting them costs about as much as one pass
    over the data (for 128 blocks of 512² float32, 37 of 54 ms of the first kernel that writes
    them). A view handed out stays valid until the same slot is requested again; one workspace
    is used from one thread and one CUDA stream at a time.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def flat(self, slot: str, numel: int, dtype: torch.dtype,
             device: torch.device | str) -> torch.Tensor:
        """The first ``numel`` elements of the slot's buffer (contents undefined)."""
        device = torch.device(device)
        key = (slot, device, dtype)
        buf = self._flat.get(key)
        if buf is None or buf.numel() < numel:
            self._flat.pop(key, None)  # free the old one first
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self._flat[key] = buf
        return buf[:numel]

    def empty(self, slot: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:
        """A contiguous tensor of ``shape`` in the slot's buffer (contents undefined)."""
        numel = 1
        for s in shape:
            numel *= int(s)
        return self.flat(slot, numel, dtype, device).view(tuple(shape))

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self._flat.values())

    def clear(self) -> None:
        """Free every buffer."""
        self._flat.clear()


_BLAS_CONTROLLER: Any = None


def scipy_blas_threads() -> contextlib.AbstractContextManager[Any] | None:
    """A context that limits the BLAS threads of scipy's LAPACK/BLAS to torch's thread count
    (so that a loop of per-block scipy calls uses the cores torch was given), or ``None`` when
    scipy or threadpoolctl is missing (callers then take torch's path)."""
    global _BLAS_CONTROLLER
    try:
        import scipy.linalg  # noqa: F401
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - both are dependencies (scikit-learn needs the latter)
        return None
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas")
